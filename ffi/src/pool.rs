//! The pool: registered files and layers, reads in flight, prefetch and metrics. All
//! state sits behind one mutex; every public method locks it, so a [`Pool`] can be
//! shared between threads and calls on one pool are serialised.
//!
//! A request plans with the layer's [`SlotMap`], starts one read per projection of
//! every miss (all submitted as one batch), then reaps completions until every needed
//! slot is ready. Completed reads of any layer are copied into their slots by whichever
//! pool call reaps them (request, prefetch or poll), never by a background thread, so
//! sink callbacks run only inside pool calls, on the caller's thread.

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::dest::{FnSink, OwnedSlots, SlotSink};
use crate::error::{PoolError, Result};
use crate::io::{ActiveIo, Event, IoEngine, IoMode, ModelFile};
use crate::metrics::{self, Counters, LayerStats, StatsSnapshot};
use crate::policy::PolicyKind;
use crate::slots::{Completion, FillOrder, NONE, PrefetchPlan, RequestPlan, SlotMap, SlotState};

/// Severity of a log message handed to [`PoolConfig::log`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum LogLevel {
    /// Informational.
    Info = 0,
    /// Something degraded (a fallback) but the pool works.
    Warn = 1,
    /// An operation failed.
    Error = 2,
}

/// A log sink: called with the pool locked, on the thread of the pool call.
pub type LogFn = Box<dyn Fn(LogLevel, &str) + Send + Sync>;

/// Largest engine layer index accepted.
pub const MAX_LAYER: i32 = 65535;

/// Most projections per layer (gate, up, down; or gate_up, down; one spare).
pub const MAX_PROJ: usize = 4;

/// Default limit of prefetch fills in flight.
pub const DEFAULT_MAX_PREFETCH_INFLIGHT: u32 = 64;

/// Bytes a stage call's own reads hold at most, and bytes of read buffers in use beyond
/// which read-ahead announces no more experts. A stage call starts its reads as their
/// buffers come back rather than all at once (and always one when none of its own is
/// out, so any expert size makes progress); read-ahead for the next layer may be out at
/// the same time, so staging holds at most about twice this. Before the bound, a
/// 128-token prompt on the bench model held ~265 MiB of read and copy buffers at its
/// peak, which a memory budget must leave free of slots (bench/RESULTS.md).
pub const STAGE_READ_BUDGET: usize = 64 << 20;

/// How to build a pool.
pub struct PoolConfig {
    /// Eviction policy of every layer.
    pub policy: PolicyKind,
    /// I/O path wanted.
    pub io_mode: IoMode,
    /// io_uring queue depth (0: default 256).
    pub queue_depth: u32,
    /// Prefetch fills in flight at most (0: default 64).
    pub max_prefetch_inflight: u32,
    /// Bytes of read buffers stage calls and read-ahead hold at most (0: default
    /// [`STAGE_READ_BUDGET`]).
    pub stage_read_budget: usize,
    /// Stats file rewritten by a background thread; `None` for none.
    pub stats_path: Option<PathBuf>,
    /// Minimum interval between stats file writes (0: 1000 ms).
    pub stats_interval_ms: u32,
    /// Log sink for warnings (fallbacks) and errors.
    pub log: Option<LogFn>,
    /// Routing trace written here (binary trace format, `ffi/TRACE_FORMAT.md`) when the
    /// pool is dropped, on [`Pool::publish_stats`], and by the background thread every
    /// `trace_interval_ms` while it grows (so a killed engine loses at most that much);
    /// `None` for none.
    pub trace_path: Option<PathBuf>,
    /// Interval of the background thread's trace writes (0: [`TRACE_WRITE_EVERY`]).
    pub trace_interval_ms: u32,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            policy: PolicyKind::DEFAULT,
            io_mode: IoMode::Auto,
            queue_depth: 0,
            max_prefetch_inflight: 0,
            stage_read_budget: 0,
            stats_path: None,
            stats_interval_ms: 0,
            log: None,
            trace_path: None,
            trace_interval_ms: 0,
        }
    }
}

/// One projection (gate, up, down, gate_up) of a layer's experts in a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProjSpec {
    /// File id from [`Pool::add_file`] / [`Pool::add_fd`].
    pub file: u32,
    /// Absolute file offset of expert 0 (GGUF data offset + tensor offset).
    pub offset: u64,
    /// Distance between consecutive experts in the file (`nb[2]`).
    pub stride: u64,
    /// Bytes of one expert.
    pub bytes: u64,
}

/// A MoE layer to register.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerSpec {
    /// The engine's layer index (0..=65535).
    pub layer: i32,
    /// Experts of the layer.
    pub n_experts: u32,
    /// Slots of the layer.
    pub n_slots: u32,
    /// Projections; expert `e` of all of them shares one slot.
    pub projs: Vec<ProjSpec>,
}

/// What a prefetch call did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefetchOutcome {
    /// Fills started.
    pub started: u32,
    /// Hints already resident or in flight.
    pub resident: u32,
    /// Hints dropped (no eligible slot, or the in-flight limit).
    pub dropped: u32,
}

/// What [`Pool::stage`] hands the engine for one distinct expert of a ubatch.
#[derive(Debug)]
pub enum Staged<'a> {
    /// The expert is ready in `slot`: the engine copies it from the slot (all
    /// projections at once; the slot keeps its expert).
    FromSlot {
        /// The expert.
        expert: u32,
        /// The slot holding it.
        slot: u32,
    },
    /// The bytes of projection `proj` of `expert`, read from the file.
    FromFile {
        /// The expert.
        expert: u32,
        /// The projection.
        proj: usize,
        /// Its bytes, valid during the call.
        data: &'a [u8],
    },
}

/// Tag bit of reads started by [`Pool::stage`] (fill reads never set it). Without
/// [`AHEAD_TAG`] the tag also holds the stage call's number (bits 32..62, see
/// [`stage_tag`]), the expert's index in the call (bits 8..32) and the projection.
const STAGE_TAG: u64 = 1 << 63;
/// With [`STAGE_TAG`]: a read started by `stage_ahead`; the tag also holds the layer
/// index (bits 32..62), the expert (bits 8..32) and the projection (bits 0..8).
const AHEAD_TAG: u64 = 1 << 62;

fn ahead_tag(li: usize, expert: u32, proj: usize) -> u64 {
    STAGE_TAG | AHEAD_TAG | ((li as u64) << 32) | (u64::from(expert) << 8) | proj as u64
}

/// Bits of a stage call's number kept in its reads' tags.
const STAGE_CALL_MASK: u64 = (1 << 30) - 1;

fn stage_tag(call: u64, index: usize, proj: usize) -> u64 {
    STAGE_TAG | ((call & STAGE_CALL_MASK) << 32) | ((index as u64) << 8) | proj as u64
}

/// The stage call a (non-ahead) stage read belongs to.
fn stage_call_of(tag: u64) -> u64 {
    (tag >> 32) & STAGE_CALL_MASK
}

/// A (non-ahead) stage read's expert index in its call and projection.
fn stage_parts(tag: u64) -> (usize, usize) {
    (((tag >> 8) & 0xff_ffff) as usize, (tag & 0xff) as usize)
}

fn ahead_parts(tag: u64) -> (usize, u32, usize) {
    (
        ((tag & !(STAGE_TAG | AHEAD_TAG)) >> 32) as usize,
        ((tag >> 8) & 0xff_ffff) as u32,
        (tag & 0xff) as usize,
    )
}

thread_local! {
    /// Set while this thread runs a pool callback (sink or log); pool calls refuse.
    static IN_CALLBACK: Cell<bool> = const { Cell::new(false) };
}

/// Whether this thread is inside a pool callback (where pool calls are refused).
pub fn in_pool_callback() -> bool {
    IN_CALLBACK.with(|c| c.get())
}

/// Runs `f` with the re-entrancy flag set.
fn in_callback<R>(f: impl FnOnce() -> R) -> R {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            IN_CALLBACK.with(|c| c.set(self.0));
        }
    }
    let _reset = Reset(IN_CALLBACK.with(|c| c.replace(true)));
    f()
}

struct Proj {
    file: usize,
    offset: u64,
    stride: u64,
    bytes: usize,
}

struct Layer {
    id: i32,
    map: SlotMap,
    projs: Vec<Proj>,
    sink: Box<dyn SlotSink>,
    counters: Counters,
    expert_bytes: u64,
    /// Experts announced by [`Pool::stage_ahead`] for the next stage call or request (by
    /// expert).
    ahead_mark: Vec<bool>,
    /// By expert: the fill of a request that took the expert's read-ahead reads (its
    /// reads still in flight feed the fill), or [`NO_FILL`].
    ahead_fill: Vec<usize>,
    /// Read-ahead reads still in the kernel, by expert.
    ahead_inflight: Vec<u32>,
    /// Finished read-ahead reads not yet handed over: (expert, projection, read, result).
    ahead_done: Vec<(u32, usize, usize, Result<()>)>,
    /// By slot: the projections of the slot's latest fill already handed to the sink
    /// (bit `p` for projection `p`).
    proj_done: Vec<u32>,
    /// The request begun by [`Pool::request_start`] that no wait for every projection
    /// has ended yet.
    started: Started,
    /// Blocking requests read the file straight into the slots (`Fill::direct`): only
    /// for slot memory the pool allocated itself, laid out for it.
    direct_reads: bool,
}

/// A layer's request begun by [`Pool::request_start`].
#[derive(Debug, Default)]
struct Started {
    state: StartedState,
    /// Its distinct experts: (expert, slot, the slot's generation when it began).
    experts: Vec<(u32, u32, u32)>,
    /// What it adds to the counters once served (`None`: counted already).
    served: Option<Served>,
    /// Its fills whose read of the layer's last projection has not started (see
    /// `Inner::start_fills`); empty when every read started.
    held_back: Vec<usize>,
    /// The first failure of one of its fills (its waits report it).
    error: Option<PoolError>,
}

/// A served request's share of the counters.
#[derive(Debug, Default, Clone, Copy)]
struct Served {
    hits: u64,
    inflight_hits: u64,
    misses: u64,
    ahead_fills: u64,
}

impl Served {
    fn count(self, c: &mut Counters) {
        c.requests += 1;
        c.hits += self.hits;
        c.inflight_hits += self.inflight_hits;
        c.misses += self.misses;
        c.ahead_fills += self.ahead_fills;
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum StartedState {
    /// None, or the last one ended.
    #[default]
    None,
    /// Its slots are handed out; some fills may still be in flight.
    Live,
    /// A wait found one of its fills failed: its slots must not be used.
    Failed,
}

/// What [`Inner::started_progress`] found.
enum Progress {
    Done,
    Busy,
    Failed,
}

/// No fill (in [`Layer::ahead_fill`]).
const NO_FILL: usize = usize::MAX;

struct Fill {
    layer: usize,
    order: FillOrder,
    remaining: u32,
    error: Option<PoolError>,
    prefetch: bool,
    /// Its reads go straight into the slot (pool-owned slots laid out for it, and only
    /// in a blocking request, which returns after every read it started has finished:
    /// so no read into a slot outlives the fill that owns the slot).
    direct: bool,
}

struct Inner {
    policy: PolicyKind,
    io_mode: IoMode,
    max_prefetch_inflight: usize,
    stage_read_budget: usize,
    /// Declared before `files`, so it drops first: its `Drop` waits for the reads in
    /// flight, and may queue the rest of a short read, on the files' descriptors.
    io: IoEngine,
    files: Vec<ModelFile>,
    layers: Vec<Layer>,
    /// Engine layer index -> index into `layers` (NONE if unregistered).
    layer_index: Vec<u32>,
    fills: Vec<Option<Fill>>,
    free_fills: Vec<usize>,
    prefetch_inflight: usize,
    warnings: Vec<String>,
    log: Option<LogFn>,
    stats_path: Option<PathBuf>,
    plan: RequestPlan,
    events: Vec<Event>,
    /// The latest fill failure, handed to the request that waited for it.
    last_fill_error: Option<PoolError>,
    /// Completions of stage reads, taken by [`Inner::stage`].
    stage_done: Vec<(usize, u64, Result<()>)>,
    /// The number of the running stage call (`stage_reads`), if one runs: its reads'
    /// tags carry it, and reads of an earlier call that failed before they finished
    /// are released when they come back instead of being taken for this call's.
    stage_call: Option<u64>,
    /// Numbers the stage calls.
    stage_calls: u64,
    /// The layer whose announcement (`stage_ahead`) is live. At most one is: the engine
    /// announces only the next layer, and an announcement that layer never took (it
    /// was not computed, or served by a request) must not keep holding read buffers.
    ahead_layer: Option<usize>,
    /// Routing trace being recorded, if configured.
    trace: Option<crate::trace::Recorder>,
    /// Scratch of [`Inner::request_planned`]: the misses read from the file.
    fresh_fills: Vec<FillOrder>,
    /// Scratch of [`Inner::start_fills`].
    fill_ids: Vec<usize>,
    /// Why the pool stopped serving: reads into its slots (`Fill::direct`) may still be
    /// in the kernel because waiting for them failed. Every later call fails, and the
    /// slot memory is leaked rather than freed when the pool is dropped.
    broken: Option<String>,
}

/// The expert pool. See the module documentation.
pub struct Pool {
    inner: Arc<Mutex<Inner>>,
    publisher: Option<Publisher>,
    /// The routing trace's file, if one is recorded (shared with the publisher thread).
    trace_file: Option<Arc<crate::trace::TraceFile>>,
}

/// How often the background thread writes a routing trace that grew, at the least (a
/// whole atomic rewrite: the wait after a write is also at least ten times the write's
/// own time, so a long trace never takes more than a tenth of the disk's time).
pub const TRACE_WRITE_EVERY: Duration = Duration::from_secs(10);

struct Publisher {
    stop: mpsc::Sender<()>,
    handle: JoinHandle<()>,
}

impl Pool {
    /// Creates a pool. Warnings (io_uring unavailable) go to the log sink once and to
    /// [`Pool::warnings`].
    pub fn new(cfg: PoolConfig) -> Result<Pool> {
        let io = IoEngine::new(cfg.io_mode, cfg.queue_depth);
        let mut inner = Inner {
            policy: cfg.policy,
            io_mode: cfg.io_mode,
            stage_read_budget: if cfg.stage_read_budget == 0 {
                STAGE_READ_BUDGET
            } else {
                cfg.stage_read_budget
            },
            max_prefetch_inflight: if cfg.max_prefetch_inflight == 0 {
                DEFAULT_MAX_PREFETCH_INFLIGHT as usize
            } else {
                cfg.max_prefetch_inflight as usize
            },
            files: Vec::new(),
            layers: Vec::new(),
            layer_index: Vec::new(),
            io,
            fills: Vec::new(),
            free_fills: Vec::new(),
            prefetch_inflight: 0,
            warnings: Vec::new(),
            log: cfg.log,
            stats_path: cfg.stats_path.clone(),
            plan: RequestPlan::default(),
            events: Vec::new(),
            last_fill_error: None,
            stage_done: Vec::new(),
            stage_call: None,
            stage_calls: 0,
            ahead_layer: None,
            fresh_fills: Vec::new(),
            fill_ids: Vec::new(),
            broken: None,
            trace: cfg
                .trace_path
                .is_some()
                .then(crate::trace::Recorder::default),
        };
        if let Some(why) = inner.io.uring_refused.clone() {
            inner.warn(format!(
                "{why}; falling back to pread (no overlap of prefetch)"
            ));
        }
        let inner = Arc::new(Mutex::new(inner));
        let trace_file = cfg
            .trace_path
            .map(|p| Arc::new(crate::trace::TraceFile::new(p)));
        let publisher = (cfg.stats_path.is_some() || trace_file.is_some()).then(|| {
            let interval = Duration::from_millis(match cfg.stats_interval_ms {
                0 => 1000,
                ms => u64::from(ms),
            });
            let trace_every = match cfg.trace_interval_ms {
                0 => TRACE_WRITE_EVERY,
                ms => Duration::from_millis(u64::from(ms)),
            };
            spawn_publisher(
                Arc::clone(&inner),
                cfg.stats_path.map(|p| (p, interval)),
                trace_file.clone().map(|f| (f, trace_every)),
            )
        });
        Ok(Pool {
            inner,
            publisher,
            trace_file,
        })
    }

    fn lock(&self) -> Result<MutexGuard<'_, Inner>> {
        if IN_CALLBACK.with(|c| c.get()) {
            return Err(PoolError::Reentrant);
        }
        let g = self.inner.lock().map_err(|_| {
            PoolError::Internal("the pool is unusable after a panic in an earlier call".into())
        })?;
        if let Some(why) = &g.broken {
            return Err(PoolError::Internal(format!("the pool stopped: {why}")));
        }
        Ok(g)
    }

    /// Registers a model file by path; returns its file id.
    pub fn add_file(&self, path: &Path) -> Result<u32> {
        let mut g = self.lock()?;
        let mode = g.io_mode;
        let f = ModelFile::open(path, mode)?;
        Ok(g.push_file(f))
    }

    /// Registers an open descriptor (the pool keeps a duplicate); returns its file id.
    pub fn add_fd(&self, fd: i32) -> Result<u32> {
        let mut g = self.lock()?;
        let mode = g.io_mode;
        let f = ModelFile::from_fd(fd, mode)?;
        Ok(g.push_file(f))
    }

    /// Registers a layer. With `sink == None` the pool allocates the slot memory (see
    /// [`Pool::slot_base`]).
    pub fn add_layer(&self, spec: &LayerSpec, sink: Option<Box<dyn SlotSink>>) -> Result<()> {
        let mut g = self.lock()?;
        g.add_layer(spec, sink)
    }

    /// Makes every expert of `ids` resident and writes its slot to `out`. `ids` holds
    /// `n_tokens` rows of `n_used` expert ids, row `t` at `ids[t * row_stride..]`; `out`
    /// gets `n_tokens * n_used` slots, row-major. Slots of one token are distinct.
    /// Misses announced by [`Pool::stage_ahead`] are filled from their read-ahead reads;
    /// the rest of the layer's announcement is dropped.
    pub fn request(
        &self,
        layer: i32,
        ids: &[i32],
        n_used: usize,
        n_tokens: usize,
        row_stride: usize,
        out: &mut [i32],
    ) -> Result<()> {
        let mut g = self.lock()?;
        g.request(layer, ids, n_used, n_tokens, row_stride, out, true)
            .map(|_| ())
    }

    /// Like [`Pool::request`], but returns once the slots are assigned, with the misses'
    /// reads in flight, so that the engine can compute while they come in. `out` gets
    /// the same slots [`Pool::request`] would give. A slot's projection `p` must not be
    /// read before [`Pool::request_wait`] with `Some(p)` (or `None`) has returned Ok;
    /// `request_wait(layer, None)` waits for every projection and ends the request.
    /// Any later request of the layer ends it too (its slots are then no longer held).
    /// Misses are read in two waves: every projection but the last now, the last one once
    /// the engine has waited for all the others, so that it comes in while the engine
    /// computes with them.
    /// Returns how many of the request's distinct experts are still being read: with 0
    /// every slot is ready, the request is counted as served, and the waits may be
    /// skipped (they return at once).
    #[allow(clippy::too_many_arguments)]
    pub fn request_start(
        &self,
        layer: i32,
        ids: &[i32],
        n_used: usize,
        n_tokens: usize,
        row_stride: usize,
        out: &mut [i32],
    ) -> Result<u32> {
        let mut g = self.lock()?;
        g.request(layer, ids, n_used, n_tokens, row_stride, out, false)
    }

    /// Waits until projection `proj` (every projection with `None`) of every expert of
    /// the layer's started request ([`Pool::request_start`]) is in its slot. With
    /// `None` and Ok, the request has ended: every one of its experts is resident, as
    /// after [`Pool::request`]. An error (a fill failed, the file changed) fails the
    /// request: its slots must not be used, and later waits on it fail too. Waiting with
    /// no started request is an error.
    pub fn request_wait(&self, layer: i32, proj: Option<usize>) -> Result<()> {
        let mut g = self.lock()?;
        g.request_wait(layer, proj)
    }

    /// Hands every distinct expert of `ids` (same layout as [`Pool::request`]) to
    /// `sink`, for a ubatch computed from a staging area the engine owns: an expert
    /// ready in a slot as [`Staged::FromSlot`], any other as its file bytes per
    /// projection ([`Staged::FromFile`], all read as one batch). Slots and the policy's
    /// state are not changed. On error, nothing more is handed over.
    pub fn stage(
        &self,
        layer: i32,
        ids: &[i32],
        n_used: usize,
        n_tokens: usize,
        row_stride: usize,
        sink: &mut dyn FnMut(Staged<'_>),
    ) -> Result<()> {
        let mut g = self.lock()?;
        g.stage(layer, ids, n_used, n_tokens, row_stride, sink)
    }

    /// Announces experts that `layer`'s next stage call or request is likely to need,
    /// and starts reading those not ready in a slot (O_DIRECT where possible) into read
    /// buffers without waiting: the reads proceed while the engine computes the previous
    /// layer, and the stage call hands their bytes over (a request fills its misses from
    /// them) instead of reading them again. Replaces the previous announcement, of any
    /// layer. Returns the number of experts whose reads started. A hint: what a stage
    /// call hands over, or a request fills, is the file's bytes either way.
    pub fn stage_ahead(&self, layer: i32, experts: &[i32]) -> Result<u32> {
        let mut g = self.lock()?;
        g.stage_ahead(layer, experts)
    }

    /// Starts fills for predicted experts of `layer` without waiting for them.
    pub fn prefetch(&self, layer: i32, experts: &[i32]) -> Result<PrefetchOutcome> {
        let mut g = self.lock()?;
        g.prefetch(layer, experts)
    }

    /// Copies completed reads into their slots; never blocks on I/O.
    pub fn poll(&self) -> Result<()> {
        let mut g = self.lock()?;
        g.poll_nowait()
    }

    /// Counters of one layer, or of the whole pool with `None`.
    pub fn counters(&self, layer: Option<i32>) -> Result<Counters> {
        let g = self.lock()?;
        match layer {
            None => {
                let mut c = Counters::default();
                for l in &g.layers {
                    c.add(&l.counters);
                }
                Ok(c)
            }
            Some(id) => Ok(g.layers[g.index_of(id)?].counters),
        }
    }

    /// A snapshot of all stats, as published in the stats file.
    pub fn snapshot(&self) -> Result<StatsSnapshot> {
        Ok(self.lock()?.snapshot())
    }

    /// Writes the stats file (error if the pool has no stats path) and the routing trace
    /// (if one is recorded) now.
    pub fn publish_stats(&self) -> Result<()> {
        let (snap, path) = {
            let g = self.lock()?;
            if let (Some(r), Some(f)) = (&g.trace, &self.trace_file) {
                f.sync_from(r);
            }
            (g.snapshot(), g.stats_path.clone())
        };
        if let Some(f) = &self.trace_file {
            f.write()
                .map_err(|e| PoolError::State(format!("writing the routing trace: {e}")))?;
        }
        let path = path.ok_or_else(|| PoolError::State("the pool has no stats file".into()))?;
        metrics::write_atomic(&path, &snap).map_err(|source| PoolError::Io {
            path: path.display().to_string(),
            offset: 0,
            len: 0,
            source,
        })
    }

    /// Base pointer and slot stride of projection `proj` of `layer`, for memory sinks.
    pub fn slot_base(&self, layer: i32, proj: usize) -> Result<(*mut u8, usize)> {
        let g = self.lock()?;
        let l = &g.layers[g.index_of(layer)?];
        if proj >= l.projs.len() {
            return Err(PoolError::invalid(format!(
                "layer {layer} has {} projections, asked for {proj}",
                l.projs.len()
            )));
        }
        l.sink.base(proj).ok_or_else(|| {
            PoolError::State(format!(
                "layer {layer} fills through a callback: no slot memory"
            ))
        })
    }

    /// The bytes of projection `proj` in `slot` of `layer` (memory sinks only; tests).
    pub fn slot_bytes(&self, layer: i32, proj: usize, slot: u32) -> Result<Option<Vec<u8>>> {
        let g = self.lock()?;
        let l = &g.layers[g.index_of(layer)?];
        let len = l.projs.get(proj).map(|p| p.bytes).unwrap_or(0);
        Ok(l.sink.read(proj, slot, len))
    }

    /// Expert in `slot` of `layer` and whether it is ready (tests, introspection).
    pub fn slot_state(&self, layer: i32, slot: u32) -> Result<(Option<u32>, SlotState, bool)> {
        let g = self.lock()?;
        let l = &g.layers[g.index_of(layer)?];
        if slot >= l.map.n_slots() {
            return Err(PoolError::invalid("slot out of range"));
        }
        Ok((
            l.map.expert_in(slot),
            l.map.state(slot),
            l.map.is_held(slot),
        ))
    }

    /// The I/O path in use.
    pub fn io_active(&self) -> Result<ActiveIo> {
        Ok(self.lock()?.io.active())
    }

    /// Whether file `file` is read with O_DIRECT.
    pub fn file_is_direct(&self, file: u32) -> Result<bool> {
        let g = self.lock()?;
        g.files
            .get(file as usize)
            .map(|f| f.is_direct())
            .ok_or_else(|| PoolError::invalid(format!("unknown file id {file}")))
    }

    /// Warnings raised so far.
    pub fn warnings(&self) -> Result<Vec<String>> {
        Ok(self.lock()?.warnings.clone())
    }

    /// Makes the next read completions report `faults` (fault-injection for tests of the
    /// completion handling: errors, EINTR, short reads).
    #[doc(hidden)]
    pub fn inject_faults(&self, faults: &[crate::io::Fault]) -> Result<()> {
        self.lock()?.io.inject_faults(faults);
        Ok(())
    }

    /// Makes the next wait for read completions fail with `errno` (fault injection for
    /// tests of a failed `io_uring_enter` while reads are in flight).
    #[doc(hidden)]
    pub fn inject_wait_failure(&self, errno: i32) -> Result<()> {
        self.lock()?.io.fail_next_wait(errno);
        Ok(())
    }

    /// Reads in flight (submitted, not reaped).
    pub fn reads_in_flight(&self) -> Result<usize> {
        Ok(self.lock()?.io.pending())
    }

    /// Bytes of read buffers held by reads not yet released (in flight, or read ahead
    /// and not yet handed over).
    pub fn read_buffers_held(&self) -> Result<usize> {
        Ok(self.lock()?.io.held_bytes())
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        if let Some(p) = self.publisher.take() {
            let _ = p.stop.send(());
            let _ = p.handle.join();
        }
        if let Ok(mut g) = self.inner.lock() {
            if g.broken.is_some() && !g.io.drain() {
                // The kernel may still write into slot memory: leak it rather than free it.
                for l in &mut g.layers {
                    let noop: Box<dyn SlotSink> = Box::new(FnSink(|_, _, _, _: &[u8]| {}));
                    std::mem::forget(std::mem::replace(&mut l.sink, noop));
                }
            }
            if let (Some(r), Some(f)) = (&g.trace, &self.trace_file) {
                f.sync_from(r);
                let _ = f.write();
            }
            if let Some(path) = g.stats_path.clone() {
                let snap = g.snapshot();
                drop(g);
                let _ = metrics::write_atomic(&path, &snap);
            }
        }
    }
}

/// The background thread: the stats file every `stats.1`, and a growing routing trace
/// every `trace.1` at the least (see [`TRACE_WRITE_EVERY`]); the trace's new tokens are
/// taken under the pool's lock, the file is written outside it.
fn spawn_publisher(
    inner: Arc<Mutex<Inner>>,
    stats: Option<(PathBuf, Duration)>,
    trace: Option<(Arc<crate::trace::TraceFile>, Duration)>,
) -> Publisher {
    let (stop, rx) = mpsc::channel::<()>();
    let handle = std::thread::Builder::new()
        .name("expert-pool-stats".into())
        .spawn(move || {
            let start = Instant::now();
            let mut next_stats = stats.as_ref().map(|s| start + s.1);
            let mut next_trace = trace.as_ref().map(|t| start + t.1);
            loop {
                let Some(next) = next_stats.into_iter().chain(next_trace).min() else {
                    return;
                };
                let wait = next.saturating_duration_since(Instant::now());
                if !matches!(rx.recv_timeout(wait), Err(mpsc::RecvTimeoutError::Timeout)) {
                    return; // stopped (or the pool is gone)
                }
                let now = Instant::now();
                let do_stats = next_stats.is_some_and(|t| now >= t);
                let do_trace = next_trace.is_some_and(|t| now >= t);
                let snap = {
                    let Ok(g) = inner.lock() else {
                        return;
                    };
                    if let (true, Some(r), Some((f, _))) = (do_trace, &g.trace, &trace) {
                        f.sync_from(r);
                    }
                    do_stats.then(|| g.snapshot())
                };
                if let (Some(snap), Some((path, every))) = (snap, &stats) {
                    let _ = metrics::write_atomic(path, &snap);
                    next_stats = Some(now + *every);
                }
                if let (true, Some((f, every))) = (do_trace, &trace) {
                    let t0 = Instant::now();
                    let _ = f.write();
                    next_trace = Some(Instant::now() + (*every).max(t0.elapsed() * 10));
                }
            }
        })
        .expect("spawning the stats thread");
    Publisher { stop, handle }
}

impl Inner {
    fn warn(&mut self, msg: String) {
        if self.warnings.contains(&msg) {
            return;
        }
        if let Some(log) = &self.log {
            in_callback(|| log(LogLevel::Warn, &msg));
        }
        self.warnings.push(msg);
    }

    fn push_file(&mut self, f: ModelFile) -> u32 {
        if let Some(why) = f.direct_refused.clone() {
            let msg = format!("{}: {why}; using buffered reads", f.name);
            self.warn(msg);
        }
        self.files.push(f);
        (self.files.len() - 1) as u32
    }

    fn index_of(&self, layer: i32) -> Result<usize> {
        if !(0..=MAX_LAYER).contains(&layer) {
            return Err(PoolError::invalid(format!(
                "layer index {layer} out of range 0..={MAX_LAYER}"
            )));
        }
        match self.layer_index.get(layer as usize) {
            Some(&i) if i != NONE => Ok(i as usize),
            _ => Err(PoolError::State(format!("layer {layer} is not registered"))),
        }
    }

    fn add_layer(&mut self, spec: &LayerSpec, sink: Option<Box<dyn SlotSink>>) -> Result<()> {
        if !(0..=MAX_LAYER).contains(&spec.layer) {
            return Err(PoolError::invalid(format!(
                "layer index {} out of range 0..={MAX_LAYER}",
                spec.layer
            )));
        }
        if self.index_of(spec.layer).is_ok() {
            return Err(PoolError::State(format!(
                "layer {} is already registered",
                spec.layer
            )));
        }
        if spec.projs.is_empty() || spec.projs.len() > MAX_PROJ {
            return Err(PoolError::invalid(format!(
                "a layer needs 1..={MAX_PROJ} projections, got {}",
                spec.projs.len()
            )));
        }
        let map = SlotMap::new(spec.n_experts, spec.n_slots, self.policy)?;
        let mut projs = Vec::with_capacity(spec.projs.len());
        for (p, ps) in spec.projs.iter().enumerate() {
            let file = self.files.get(ps.file as usize).ok_or_else(|| {
                PoolError::invalid(format!("projection {p}: unknown file id {}", ps.file))
            })?;
            if ps.bytes == 0 || ps.bytes > u64::from(u32::MAX) {
                return Err(PoolError::invalid(format!(
                    "projection {p}: expert bytes must be in 1..=4 GiB, got {}",
                    ps.bytes
                )));
            }
            if ps.stride < ps.bytes {
                return Err(PoolError::invalid(format!(
                    "projection {p}: stride {} is smaller than the expert size {}",
                    ps.stride, ps.bytes
                )));
            }
            let end = u64::from(spec.n_experts - 1)
                .checked_mul(ps.stride)
                .and_then(|x| x.checked_add(ps.offset))
                .and_then(|x| x.checked_add(ps.bytes));
            match end {
                Some(end) if end <= file.size() => {}
                _ => {
                    return Err(PoolError::invalid(format!(
                        "projection {p}: experts end past the end of {} ({} bytes)",
                        file.name,
                        file.size()
                    )));
                }
            }
            projs.push(Proj {
                file: ps.file as usize,
                offset: ps.offset,
                stride: ps.stride,
                bytes: ps.bytes as usize,
            });
        }
        let mut direct_reads = false;
        let sink = match sink {
            Some(s) => s,
            None => {
                // Where every expert of each projection starts at the same place in a
                // page of the file (its stride is whole pages, as in real GGUF files),
                // blocking requests read the file straight into the slots.
                let page = crate::arena::PAGE as u64;
                let heads: Option<Vec<(usize, usize)>> = projs
                    .iter()
                    .map(|p| {
                        let head = (p.offset % page) as usize;
                        (p.stride % page == 0 && head % crate::dest::SLOT_ALIGN == 0)
                            .then_some((p.bytes, head))
                    })
                    .collect();
                match heads {
                    Some(layout) => {
                        direct_reads = true;
                        Box::new(OwnedSlots::new_direct(spec.n_slots, &layout)?)
                    }
                    None => {
                        let bytes: Vec<usize> = projs.iter().map(|p| p.bytes).collect();
                        Box::new(OwnedSlots::new(spec.n_slots, &bytes)?)
                    }
                }
            }
        };
        let expert_bytes = projs.iter().map(|p| p.bytes as u64).sum();
        let idx = self.layers.len() as u32;
        self.layers.push(Layer {
            id: spec.layer,
            map,
            projs,
            sink,
            counters: Counters::default(),
            expert_bytes,
            ahead_mark: vec![false; spec.n_experts as usize],
            ahead_inflight: vec![0; spec.n_experts as usize],
            ahead_done: Vec::new(),
            ahead_fill: vec![NO_FILL; spec.n_experts as usize],
            proj_done: vec![0; spec.n_slots as usize],
            started: Started::default(),
            direct_reads,
        });
        let li = spec.layer as usize;
        if self.layer_index.len() <= li {
            self.layer_index.resize(li + 1, NONE);
        }
        self.layer_index[li] = idx;
        Ok(())
    }

    /// [`Pool::request`] (`wait`) or [`Pool::request_start`] (not `wait`). Returns the
    /// number of the request's distinct experts still being read (0 with `wait`).
    #[allow(clippy::too_many_arguments)]
    fn request(
        &mut self,
        layer: i32,
        ids: &[i32],
        n_used: usize,
        n_tokens: usize,
        row_stride: usize,
        out: &mut [i32],
        wait: bool,
    ) -> Result<u32> {
        let li = self.index_of(layer)?;
        // Any request ends the layer's started one (its slots are no longer held); the
        // reads it held back start, so that its fills end.
        self.start_held_back(li)?;
        self.layers[li].started.state = StartedState::None;
        if out.len() < n_used * n_tokens {
            return Err(PoolError::invalid(
                "output buffer shorter than n_used * n_tokens",
            ));
        }
        if self.io.pending() > 0 || self.io.has_completions() {
            self.poll_nowait()?;
        }
        let mut plan = std::mem::take(&mut self.plan);
        let res = self.request_planned(li, ids, n_used, n_tokens, row_stride, out, &mut plan, wait);
        // A request that does not fit changed nothing: the engine stages that ubatch
        // instead, and the stage call takes the announced experts.
        let fits = !matches!(res, Err(PoolError::DoesNotFit { .. }));
        if self.ahead_layer == Some(li) && fits {
            // The request took the announced experts it missed; the rest were read for
            // nothing. Their buffers go back now: kept, they counted against every later
            // announcement's budget, which then started nothing (bench/RESULTS.md).
            self.forget_ahead(li);
        }
        if res.is_ok() {
            self.record(li, ids, n_used, n_tokens, row_stride);
        }
        let in_flight = if res.is_ok() && !wait {
            self.started_in_flight(li)
        } else {
            0
        };
        let l = &mut self.layers[li];
        match &res {
            Ok(ahead_fills) => {
                // Counted for served requests only, so that they add up to the distinct
                // experts those requests asked for: a started one when its last wait
                // returns, or now when nothing of it is left to read (its waits may then
                // be skipped).
                let served = Served {
                    hits: u64::from(plan.hits),
                    inflight_hits: plan.waits.len() as u64,
                    misses: plan.fills.len() as u64,
                    ahead_fills: *ahead_fills,
                };
                if wait || in_flight == 0 {
                    served.count(&mut l.counters);
                    l.started.served = None;
                } else {
                    l.started.served = Some(served);
                }
            }
            Err(PoolError::DoesNotFit { .. }) => l.counters.does_not_fit += 1,
            Err(_) => l.counters.errors += 1,
        }
        self.plan = plan;
        res.map(|_| in_flight).map_err(|e| match e {
            PoolError::DoesNotFit { needed, slots, .. } => PoolError::DoesNotFit {
                layer,
                needed,
                slots,
            },
            e => e,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn request_planned(
        &mut self,
        li: usize,
        ids: &[i32],
        n_used: usize,
        n_tokens: usize,
        row_stride: usize,
        out: &mut [i32],
        plan: &mut RequestPlan,
        wait: bool,
    ) -> Result<u64> {
        let l = &mut self.layers[li];
        l.map
            .plan_request(ids, n_used, n_tokens, row_stride, plan)?;
        let eb = l.expert_bytes;
        let c = &mut l.counters;
        c.prefetch_useful += u64::from(plan.prefetch_useful);
        c.prefetch_useful_bytes += u64::from(plan.prefetch_useful) * eb;
        for ev in &plan.evictions {
            c.evictions += 1;
            if ev.unused_prefetch {
                c.prefetch_wasted += 1;
                c.prefetch_wasted_bytes += eb;
            }
        }
        if plan.fills.is_empty() && plan.waits.is_empty() {
            self.layers[li]
                .map
                .finish(ids, n_used, n_tokens, row_stride, out)?;
            if !wait {
                self.mark_started(li, plan);
            }
            return Ok(0);
        }
        let t0 = Instant::now();
        self.last_fill_error = None;
        let mut early_error = None;
        // Misses filled from read-ahead reads (counted by the caller if served).
        let mut ahead_fills = 0;
        if !plan.fills.is_empty() {
            if let Err(e) = self.check_layer_files(li) {
                for &f in &plan.fills {
                    self.layers[li].map.complete(f, false);
                }
                early_error = Some(e);
            } else {
                let mut fresh = std::mem::take(&mut self.fresh_fills);
                fresh.clear();
                for &f in &plan.fills {
                    if self.layers[li].ahead_mark[f.expert as usize] {
                        self.take_ahead(li, f);
                        ahead_fills += 1;
                    } else {
                        fresh.push(f);
                    }
                }
                self.start_fills(li, &fresh, !wait);
                self.fresh_fills = fresh;
                if let Err(e) = self.io.submit() {
                    // not started: what it held back must still be read, so its fills end
                    let _ = self.start_held_back(li);
                    if wait {
                        self.drain_slot_reads();
                    }
                    return Err(e);
                }
            }
        }
        if !wait {
            if let Some(e) = early_error {
                return Err(e);
            }
            // A miss filled from read-ahead reads that had all finished, one failed, is
            // not resident now.
            if let Err(e) = self.layers[li]
                .map
                .assigned(ids, n_used, n_tokens, row_stride, out)
            {
                let _ = self.start_held_back(li);
                return Err(self.last_fill_error.take().unwrap_or(e));
            }
            self.mark_started(li, plan);
            return Ok(ahead_fills);
        }
        // Wait until no needed slot is still being filled.
        let wait_result = loop {
            self.process_finished();
            let map = &self.layers[li].map;
            let busy = plan
                .fills
                .iter()
                .map(|f| f.slot)
                .chain(plan.waits.iter().copied())
                .any(|s| map.state(s) == SlotState::Filling);
            if !busy {
                break Ok(());
            }
            if self.io.pending() == 0 {
                break Err(PoolError::Internal(
                    "a needed slot is filling but no read is in flight".into(),
                ));
            }
            if let Err(e) = self.io.reap(true) {
                break Err(e);
            }
        };
        self.layers[li].counters.stall_ns += t0.elapsed().as_nanos() as u64;
        if wait_result.is_err() {
            self.drain_slot_reads();
        }
        wait_result?;
        if let Some(e) = early_error {
            return Err(e);
        }
        match self.layers[li]
            .map
            .finish(ids, n_used, n_tokens, row_stride, out)
        {
            Ok(()) => Ok(ahead_fills),
            Err(e) => Err(self.last_fill_error.take().unwrap_or(e)),
        }
    }

    /// A blocking request that failed: no read into a slot may outlive it
    /// (`Fill::direct`), so it waits for every read; where even that fails, the pool stops.
    fn drain_slot_reads(&mut self) {
        if !self.io.drain() {
            self.broken = Some(
                "waiting for reads into the slots failed; they may still be in the kernel".into(),
            );
        }
    }

    fn check_layer_files(&self, li: usize) -> Result<()> {
        let l = &self.layers[li];
        for (i, p) in l.projs.iter().enumerate() {
            if l.projs[..i].iter().any(|q| q.file == p.file) {
                continue;
            }
            self.files[p.file].check_unchanged()?;
        }
        Ok(())
    }

    /// Starts the reads (queued; the caller submits) of every projection of `expert` of
    /// layer `li`, projection `p` tagged `tag(p)`. Returns how many started, and the
    /// error that stopped the rest, if any.
    fn start_expert_reads(
        &mut self,
        li: usize,
        expert: u32,
        tag: impl Fn(usize) -> u64,
    ) -> (u32, Option<PoolError>) {
        let mut started = 0;
        for p in 0..self.layers[li].projs.len() {
            let proj = &self.layers[li].projs[p];
            let off = proj.offset + u64::from(expert) * proj.stride;
            match self
                .io
                .start_read(&self.files[proj.file], off, proj.bytes, tag(p))
            {
                Ok(_) => started += 1,
                Err(e) => return (started, Some(e)),
            }
        }
        (started, None)
    }

    /// Stores a new fill with no reads yet and returns its id.
    fn new_fill(&mut self, li: usize, order: FillOrder, prefetch: bool) -> usize {
        let fid = match self.free_fills.pop() {
            Some(i) => i,
            None => {
                self.fills.push(None);
                self.fills.len() - 1
            }
        };
        self.fills[fid] = Some(Fill {
            layer: li,
            order,
            remaining: 0,
            error: None,
            prefetch,
            direct: false,
        });
        self.layers[li].proj_done[order.slot as usize] = 0;
        if prefetch {
            self.prefetch_inflight += 1;
        }
        fid
    }

    /// Starts the reads of a request's misses (queued; the caller submits). With `hold_last`
    /// (a started request), the last projection (down) of every miss is held back until
    /// the engine has waited for all the others (`start_held_back`): this VM's disk completes
    /// the reads it is given together, so the first projections read alone come in
    /// sooner, and the last one's reads come in while the engine computes with them. A
    /// fill counts its held-back reads in `remaining`, so it cannot end before they are
    /// read.
    fn start_fills(&mut self, li: usize, orders: &[FillOrder], hold_last: bool) {
        let n_projs = self.layers[li].projs.len();
        let mut fids = std::mem::take(&mut self.fill_ids);
        fids.clear();
        for &order in orders {
            let fid = self.new_fill(li, order, false);
            // (a blocking request: see Fill::direct)
            let direct = !hold_last && self.layers[li].direct_reads;
            let fill = self.fills[fid].as_mut().expect("fill just stored");
            fill.remaining = n_projs as u32;
            fill.direct = direct;
            fids.push(fid);
        }
        let first_held = if hold_last {
            (n_projs - 1).max(1)
        } else {
            n_projs
        };
        for p in 0..first_held {
            self.start_proj_reads(li, &fids, p);
        }
        if first_held < n_projs {
            let held = &mut self.layers[li].started.held_back;
            held.clear();
            held.extend_from_slice(&fids);
        }
        self.fill_ids = fids;
    }

    /// Starts the read of projection `p` of every fill of `fids` (queued; the caller
    /// submits); a fill that already failed skips it. Ends fills left with no read.
    fn start_proj_reads(&mut self, li: usize, fids: &[usize], p: usize) {
        for &fid in fids {
            let fill = self.fills[fid]
                .as_ref()
                .expect("a fill with reads to start");
            let res = if fill.error.is_some() {
                None // a read of it failed or could not start: it fails, read no more
            } else {
                let proj = &self.layers[li].projs[p];
                let off = proj.offset + u64::from(fill.order.expert) * proj.stride;
                let tag = ((fid as u64) << 8) | p as u64;
                let file = &self.files[proj.file];
                match fill
                    .direct
                    .then(|| self.layers[li].sink.direct_region(p, fill.order.slot))
                {
                    Some(None) => Some(Err(PoolError::Internal(
                        "a slot laid out for direct reads has no region".into(),
                    ))),
                    Some(Some(region)) => {
                        // SAFETY: the region is the memory of the fill's slot, which the
                        // slot map gave this fill alone (state Filling: not served, not
                        // given to another fill until this one ends, and this blocking
                        // request ends only once every read it started is done).
                        Some(unsafe { self.io.start_read_into(file, off, proj.bytes, tag, region) })
                    }
                    None => Some(self.io.start_read(file, off, proj.bytes, tag)),
                }
            };
            let fill = self.fills[fid].as_mut().expect("fill");
            match res {
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    fill.error = Some(e);
                    fill.remaining -= 1;
                }
                None => fill.remaining -= 1,
            }
            if fill.remaining == 0 {
                self.end_fill(fid);
            }
        }
    }

    /// Starts (and submits) the reads of the last projection that the layer's started
    /// request holds back. Returns false when it holds none back.
    fn start_held_back(&mut self, li: usize) -> Result<bool> {
        let mut fids = std::mem::take(&mut self.layers[li].started.held_back);
        if fids.is_empty() {
            return Ok(false);
        }
        let last = self.layers[li].projs.len() - 1;
        self.start_proj_reads(li, &fids, last);
        fids.clear(); // every read started (the vector is kept for its allocation)
        self.layers[li].started.held_back = fids;
        self.io.submit()?;
        Ok(true)
    }

    /// Records the request just planned (and served or started) as the layer's started
    /// request.
    fn mark_started(&mut self, li: usize, plan: &RequestPlan) {
        let l = &mut self.layers[li];
        l.started.experts.clear();
        for &e in &plan.distinct {
            let s = l
                .map
                .slot_of(e)
                .expect("a planned request's experts have slots");
            l.started.experts.push((e, s, l.map.generation(s)));
        }
        l.started.state = StartedState::Live;
        l.started.error = None;
    }

    /// How many of the started request's experts are still being read.
    fn started_in_flight(&self, li: usize) -> u32 {
        let l = &self.layers[li];
        let filling = l
            .started
            .experts
            .iter()
            .filter(|&&(_, s, _)| l.map.state(s) == SlotState::Filling)
            .count();
        filling as u32
    }

    /// Where the layer's started request stands for the projections in `mask`.
    fn started_progress(&self, li: usize, mask: u32) -> Progress {
        let l = &self.layers[li];
        let mut busy = false;
        for &(e, s, g) in &l.started.experts {
            if l.map.expert_in(s) != Some(e) || l.map.generation(s) != g {
                return Progress::Failed; // its fill failed, or the slots were cleared
            }
            match l.map.state(s) {
                SlotState::Ready => {}
                SlotState::Filling => {
                    if l.proj_done[s as usize] & mask != mask {
                        busy = true;
                    }
                }
                SlotState::Empty => return Progress::Failed,
            }
        }
        if busy { Progress::Busy } else { Progress::Done }
    }

    fn request_wait(&mut self, layer: i32, proj: Option<usize>) -> Result<()> {
        let li = self.index_of(layer)?;
        let n_projs = self.layers[li].projs.len();
        let mask = match proj {
            Some(p) if p < n_projs => 1u32 << p,
            Some(p) => {
                return Err(PoolError::invalid(format!(
                    "projection {p} out of range 0..{n_projs}"
                )));
            }
            None => u32::MAX, // never all set: waits for the fills to complete
        };
        match self.layers[li].started.state {
            StartedState::Live => {}
            StartedState::None => {
                return Err(PoolError::State(format!(
                    "layer {layer} has no started request to wait for"
                )));
            }
            StartedState::Failed => {
                return Err(PoolError::State(format!(
                    "layer {layer}'s started request failed"
                )));
            }
        }
        // The projections waited for are read (the last one may have been held back).
        let res = if proj.is_none_or(|p| p + 1 == n_projs) {
            self.start_held_back(li).map(|_| ())
        } else {
            Ok(())
        };
        let t0 = Instant::now();
        let res = res.and_then(|()| {
            loop {
                self.process_finished();
                match self.started_progress(li, mask) {
                    Progress::Done => break Ok(()),
                    Progress::Failed => {
                        let own = self.layers[li].started.error.take();
                        break Err(own.or_else(|| self.last_fill_error.take()).unwrap_or_else(
                            || {
                                PoolError::State(
                                    "an expert of the request is not resident after its fill"
                                        .into(),
                                )
                            },
                        ));
                    }
                    Progress::Busy => {}
                }
                if self.io.pending() == 0 {
                    // A fill that failed still holds reads back: start them, so it ends.
                    match self.start_held_back(li) {
                        Ok(true) => continue,
                        Ok(false) => {}
                        Err(e) => break Err(e),
                    }
                    break Err(PoolError::Internal(
                        "a needed slot is filling but no read is in flight".into(),
                    ));
                }
                if let Err(e) = self.io.reap(true) {
                    break Err(e);
                }
            }
        });
        self.layers[li].counters.stall_ns += t0.elapsed().as_nanos() as u64;
        let res = match res {
            // The held-back last projection's reads start once every earlier one is in,
            // and come in while the engine computes with those.
            Ok(()) if proj.is_some() => {
                let earlier = (1u32 << (n_projs - 1)) - 1;
                if !self.layers[li].started.held_back.is_empty()
                    && matches!(self.started_progress(li, earlier), Progress::Done)
                {
                    self.start_held_back(li).map(|_| ())
                } else {
                    Ok(())
                }
            }
            Err(e) => {
                // Nothing of the request is used now; its fills must still end.
                let _ = self.start_held_back(li);
                Err(e)
            }
            ok => ok,
        };
        let l = &mut self.layers[li];
        match &res {
            Ok(()) if proj.is_none() => {
                l.started.state = StartedState::None;
                if let Some(served) = l.started.served.take() {
                    served.count(&mut l.counters);
                }
            }
            Ok(()) => {}
            Err(_) => {
                l.started.state = StartedState::Failed;
                l.counters.errors += 1;
            }
        }
        res
    }

    /// Starts the reads of one fill (queued; the caller submits).
    fn start_fill(&mut self, li: usize, order: FillOrder, prefetch: bool) {
        let fid = self.new_fill(li, order, prefetch);
        let (started, error) =
            self.start_expert_reads(li, order.expert, |p| ((fid as u64) << 8) | p as u64);
        let fill = self.fills[fid].as_mut().expect("fill just stored");
        fill.remaining += started;
        if let Some(e) = error {
            fill.error = Some(e);
        }
        if fill.remaining == 0 {
            self.end_fill(fid);
        }
    }

    /// Fills `order` (a miss of a request) from the read-ahead reads of its expert, which
    /// was announced: those finished feed it now, those in flight when they finish.
    fn take_ahead(&mut self, li: usize, order: FillOrder) {
        let fid = self.new_fill(li, order, false);
        let e = order.expert as usize;
        let n_projs = self.layers[li].projs.len() as u32;
        self.fills[fid]
            .as_mut()
            .expect("fill just stored")
            .remaining = n_projs;
        let l = &mut self.layers[li];
        // An announced expert has every projection's read started (a failed
        // announcement is dropped whole), each finished or in flight.
        debug_assert_eq!(
            l.ahead_inflight[e]
                + l.ahead_done.iter().filter(|d| d.0 == order.expert).count() as u32,
            n_projs
        );
        l.ahead_mark[e] = false;
        l.ahead_fill[e] = fid;
        l.counters.stage_ahead_used += 1;
        let (done, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut l.ahead_done)
            .into_iter()
            .partition(|d| d.0 == order.expert);
        l.ahead_done = rest;
        for (_, proj, op, result) in done {
            self.fill_read_done(fid, proj, op, result, true);
        }
    }

    /// One read of fill `fid` (projection `proj`) finished: hands its bytes to the sink
    /// (all of them when `whole`, else only what chunks did not already deliver) if the
    /// fill is still current, releases the read, and ends the fill after its last read.
    /// `bytes_read` is the caller's to count.
    fn fill_read_done(
        &mut self,
        fid: usize,
        proj: usize,
        op: usize,
        result: Result<()>,
        whole: bool,
    ) {
        let fill = self.fills[fid].as_mut().expect("read of an unknown fill");
        let order = fill.order;
        match result {
            Ok(()) => {
                let l = &mut self.layers[fill.layer];
                let current = l.map.generation(order.slot) == order.generation
                    && l.map.state(order.slot) == SlotState::Filling;
                if current && fill.error.is_none() {
                    if (whole || !l.sink.partial()) && !fill.direct {
                        let data = self.io.data(op);
                        let (sink, id) = (&mut l.sink, l.id);
                        let t0 = Instant::now();
                        in_callback(|| sink.write(id, proj, order.slot, 0, data));
                        l.counters.copy_ns += t0.elapsed().as_nanos() as u64;
                    }
                    // (a partial sink got every chunk as it arrived)
                    l.proj_done[order.slot as usize] |= 1 << proj;
                }
            }
            Err(e) => {
                if fill.error.is_none() {
                    fill.error = Some(e);
                }
            }
        }
        self.io.release(op);
        let fill = self.fills[fid].as_mut().expect("fill");
        fill.remaining -= 1;
        if fill.remaining == 0 {
            let l = &mut self.layers[fill.layer];
            if l.ahead_fill[order.expert as usize] == fid {
                l.ahead_fill[order.expert as usize] = NO_FILL;
            }
            self.end_fill(fid);
        }
    }

    /// Handles read events: copies the bytes into the slot when the fill is still
    /// current (each chunk as it arrives for memory sinks, the whole projection at the
    /// end for callbacks), and completes fills whose reads are all done.
    fn process_finished(&mut self) {
        let mut events = std::mem::take(&mut self.events);
        self.io.take_events(&mut events);
        for ev in events.drain(..) {
            match ev {
                Event::Part { tag, .. } if tag & STAGE_TAG != 0 => {}
                Event::Done { op, tag, result } if tag & STAGE_TAG != 0 => {
                    self.stage_done.push((op, tag, result));
                }
                Event::Part { op, tag, range } => {
                    let (fid, proj) = ((tag >> 8) as usize, (tag & 0xff) as usize);
                    let fill = self.fills[fid].as_ref().expect("read of an unknown fill");
                    let order = fill.order;
                    let l = &mut self.layers[fill.layer];
                    let current = l.map.generation(order.slot) == order.generation
                        && l.map.state(order.slot) == SlotState::Filling;
                    if current && fill.error.is_none() && l.sink.partial() && !fill.direct {
                        let data = &self.io.data(op)[range.clone()];
                        let (sink, id) = (&mut l.sink, l.id);
                        let t0 = Instant::now();
                        in_callback(|| sink.write(id, proj, order.slot, range.start, data));
                        l.counters.copy_ns += t0.elapsed().as_nanos() as u64;
                    }
                }
                Event::Done { op, tag, result } => {
                    let (fid, proj) = ((tag >> 8) as usize, (tag & 0xff) as usize);
                    let fill = self.fills[fid].as_ref().expect("read of an unknown fill");
                    if result.is_ok() {
                        self.layers[fill.layer].counters.bytes_read +=
                            self.io.data(op).len() as u64;
                    }
                    self.fill_read_done(fid, proj, op, result, false);
                }
            }
        }
        self.events = events;
        // Read-ahead reads go to their layer's announcement, or back when it was dropped.
        self.route_stage_done();
    }

    /// Completes fill `fid` (all its reads are in, or none could start).
    fn end_fill(&mut self, fid: usize) {
        let mut fill = self.fills[fid].take().expect("ending an unknown fill");
        self.free_fills.push(fid);
        if fill.prefetch {
            self.prefetch_inflight -= 1;
        }
        let li = fill.layer;
        if fill.error.is_none() {
            // Data read while the file changed must not be served.
            let l = &self.layers[li];
            for p in &l.projs {
                if let Err(e) = self.files[p.file].check_unchanged() {
                    fill.error = Some(e);
                    break;
                }
            }
        }
        let ok = fill.error.is_none();
        let outcome = self.layers[li].map.complete(fill.order, ok);
        if let (Completion::Failed, Some(e)) = (outcome, fill.error) {
            let l = &mut self.layers[li];
            if fill.prefetch {
                l.counters.errors += 1;
            }
            let msg = format!(
                "layer {}: filling expert {} failed: {e}",
                l.id, fill.order.expert
            );
            if let Some(log) = &self.log {
                in_callback(|| log(LogLevel::Error, &msg));
            }
            // A started request's own failure waits for its waits (other calls in between
            // may fail other fills, and a request resets `last_fill_error`).
            let st = &mut self.layers[li].started;
            let of_started = st.state == StartedState::Live
                && st.error.is_none()
                && st
                    .experts
                    .iter()
                    .any(|&(_, s, g)| s == fill.order.slot && g == fill.order.generation);
            if of_started {
                st.error = Some(e);
            } else {
                self.last_fill_error = Some(e);
            }
        }
    }

    fn poll_nowait(&mut self) -> Result<()> {
        if self.io.pending() > 0 {
            self.io.submit()?;
            self.io.reap(false)?;
        }
        self.process_finished();
        Ok(())
    }

    fn prefetch(&mut self, layer: i32, experts: &[i32]) -> Result<PrefetchOutcome> {
        let li = self.index_of(layer)?;
        self.poll_nowait()?;
        let mut out = PrefetchOutcome::default();
        let mut checked = false;
        for &e in experts {
            let n_experts = self.layers[li].map.n_experts();
            if e < 0 || e as u32 >= n_experts {
                self.layers[li].counters.errors += 1;
                return Err(PoolError::invalid(format!(
                    "prefetch expert id {e} out of range 0..{n_experts}"
                )));
            }
            if self.layers[li].map.slot_of(e as u32).is_some() {
                out.resident += 1;
                continue;
            }
            if self.prefetch_inflight >= self.max_prefetch_inflight {
                out.dropped += 1;
                self.layers[li].counters.prefetch_dropped += 1;
                continue;
            }
            if !checked {
                if let Err(err) = self.check_layer_files(li) {
                    self.layers[li].counters.errors += 1;
                    return Err(err);
                }
                checked = true;
            }
            let l = &mut self.layers[li];
            match l.map.plan_prefetch(e as u32)? {
                PrefetchPlan::AlreadyResident => out.resident += 1,
                PrefetchPlan::NoSlot => {
                    out.dropped += 1;
                    l.counters.prefetch_dropped += 1;
                }
                PrefetchPlan::Fill(order, ev) => {
                    let eb = l.expert_bytes;
                    if let Some(ev) = ev {
                        l.counters.evictions += 1;
                        if ev.unused_prefetch {
                            l.counters.prefetch_wasted += 1;
                            l.counters.prefetch_wasted_bytes += eb;
                        }
                    }
                    l.counters.prefetch_issued += 1;
                    l.counters.prefetch_issued_bytes += eb;
                    out.started += 1;
                    self.start_fill(li, order, true);
                }
            }
        }
        self.io.submit()?;
        // pread completes at once: copy now rather than at the next call.
        if self.io.active() == ActiveIo::Pread {
            self.process_finished();
        }
        Ok(out)
    }

    fn stage_ahead(&mut self, layer: i32, experts: &[i32]) -> Result<u32> {
        let li = self.index_of(layer)?;
        let n_experts = self.layers[li].map.n_experts() as usize;
        if let Some(&e) = experts.iter().find(|&&e| e < 0 || e as usize >= n_experts) {
            self.layers[li].counters.errors += 1;
            return Err(PoolError::invalid(format!(
                "layer {layer}: expert id {e} out of range 0..{n_experts}"
            )));
        }
        if let Some(other) = self.ahead_layer.filter(|&o| o != li) {
            self.forget_ahead(other);
        }
        self.forget_ahead(li);
        self.check_layer_files(li)?;
        let mut started = 0u32;
        let mut error = None;
        for &e in experts {
            let e = e as u32;
            let l = &mut self.layers[li];
            let ready = matches!(l.map.slot_of(e), Some(s) if l.map.state(s) == SlotState::Ready);
            // Skipped: ready in a slot, announced twice, or still being read for an
            // announcement that was dropped (part of it may be released already; the
            // stage call then reads it itself).
            if ready || l.ahead_mark[e as usize] || l.ahead_inflight[e as usize] > 0 {
                continue;
            }
            if self.io.held_bytes() >= self.stage_read_budget {
                // The rest is read by the stage call, within the same bound.
                break;
            }
            let l = &mut self.layers[li];
            l.ahead_mark[e as usize] = true;
            self.ahead_layer = Some(li);
            started += 1;
            let (n, err) = self.start_expert_reads(li, e, |p| ahead_tag(li, e, p));
            self.layers[li].ahead_inflight[e as usize] += n;
            if err.is_some() {
                error = err;
                break;
            }
        }
        self.layers[li].counters.stage_ahead += u64::from(started);
        if let Err(e) = self.io.submit() {
            error.get_or_insert(e);
        }
        if let Some(e) = error {
            // Reads that did start finish on their own and are released unused.
            self.forget_ahead(li);
            self.layers[li].counters.errors += 1;
            return Err(e);
        }
        Ok(started)
    }

    /// Drops layer `li`'s announcement: finished read-ahead reads are released, those
    /// still in flight are released when they finish.
    fn forget_ahead(&mut self, li: usize) {
        if self.ahead_layer == Some(li) {
            self.ahead_layer = None;
        }
        let l = &mut self.layers[li];
        l.ahead_mark.iter_mut().for_each(|m| *m = false);
        for (_, _, op, _) in std::mem::take(&mut l.ahead_done) {
            self.io.release(op);
        }
    }

    /// Moves finished read-ahead reads out of `stage_done` to their layers (feeding the
    /// fills of requests that took them, releasing those no announcement wants any
    /// more), and releases reads of a stage call that
    /// is no longer running (it failed before they finished). What stays is the
    /// running stage call's own.
    fn route_stage_done(&mut self) {
        let current = self.stage_call;
        let own = |tag: u64| tag & AHEAD_TAG == 0 && Some(stage_call_of(tag)) == current;
        if self.stage_done.iter().all(|(_, tag, _)| own(*tag)) {
            return;
        }
        let done = std::mem::take(&mut self.stage_done);
        for (op, tag, result) in done {
            if own(tag) {
                self.stage_done.push((op, tag, result));
                continue;
            }
            if tag & AHEAD_TAG == 0 {
                self.io.release(op);
                continue;
            }
            let (li, e, p) = ahead_parts(tag);
            let l = &mut self.layers[li];
            l.ahead_inflight[e as usize] -= 1;
            if result.is_ok() {
                l.counters.bytes_read += self.io.data(op).len() as u64;
            }
            let fid = l.ahead_fill[e as usize];
            if fid != NO_FILL {
                self.fill_read_done(fid, p, op, result, true);
            } else if l.ahead_mark[e as usize] {
                l.ahead_done.push((e, p, op, result));
            } else {
                self.io.release(op);
            }
        }
    }

    fn stage(
        &mut self,
        layer: i32,
        ids: &[i32],
        n_used: usize,
        n_tokens: usize,
        row_stride: usize,
        sink: &mut dyn FnMut(Staged<'_>),
    ) -> Result<()> {
        let li = self.index_of(layer)?;
        let n_experts = self.layers[li].map.n_experts() as usize;
        if n_used == 0 || row_stride < n_used {
            return Err(PoolError::invalid(format!(
                "bad ids layout: n_used {n_used}, row stride {row_stride}"
            )));
        }
        if n_tokens > 0 && ids.len() < (n_tokens - 1) * row_stride + n_used {
            return Err(PoolError::invalid("ids shorter than n_tokens rows"));
        }
        let mut wanted = vec![false; n_experts];
        for t in 0..n_tokens {
            for &e in &ids[t * row_stride..t * row_stride + n_used] {
                if e < 0 || e as usize >= n_experts {
                    self.layers[li].counters.errors += 1;
                    return Err(PoolError::invalid(format!(
                        "layer {layer}: expert id {e} out of range 0..{n_experts}"
                    )));
                }
                wanted[e as usize] = true;
            }
        }
        self.poll_nowait()?;
        let t0 = Instant::now();
        let mut to_read = Vec::new();
        let mut from_slots = 0u64;
        for (e, _) in wanted.iter().enumerate().filter(|(_, w)| **w) {
            let map = &self.layers[li].map;
            match map.slot_of(e as u32) {
                Some(slot) if map.state(slot) == SlotState::Ready => {
                    let t1 = Instant::now();
                    in_callback(|| {
                        sink(Staged::FromSlot {
                            expert: e as u32,
                            slot,
                        })
                    });
                    self.layers[li].counters.copy_ns += t1.elapsed().as_nanos() as u64;
                    from_slots += 1;
                }
                _ => to_read.push(e as u32),
            }
        }
        let res = self.stage_reads(li, &to_read, sink);
        // The announcement is used up: announced experts this call did not need are
        // released (now, or when their reads finish).
        self.forget_ahead(li);
        let c = &mut self.layers[li].counters;
        c.stall_ns += t0.elapsed().as_nanos() as u64;
        match &res {
            Ok(()) => {
                c.staged += 1;
                c.staged_from_slots += from_slots;
                c.staged_reads += to_read.len() as u64;
                self.record(li, ids, n_used, n_tokens, row_stride);
            }
            Err(_) => c.errors += 1,
        }
        res
    }

    /// Reads every projection of `experts` of layer `li`, at most `stage_read_budget`
    /// bytes of them out at once, and hands the bytes to `sink`; experts announced by
    /// `stage_ahead` come from their read-ahead reads instead. Waits for every read it
    /// needs, even after an error.
    fn stage_reads(
        &mut self,
        li: usize,
        experts: &[u32],
        sink: &mut dyn FnMut(Staged<'_>),
    ) -> Result<()> {
        if experts.is_empty() {
            return Ok(());
        }
        self.check_layer_files(li)?;
        self.stage_calls += 1;
        let call = self.stage_calls & STAGE_CALL_MASK;
        self.stage_call = Some(call);
        let res = self.stage_reads_in(li, call, experts, sink);
        self.stage_call = None;
        // Reads this call started and did not wait for (it failed) go back when they
        // finish.
        self.route_stage_done();
        res
    }

    /// [`Inner::stage_reads`] as stage call number `call`.
    fn stage_reads_in(
        &mut self,
        li: usize,
        call: u64,
        experts: &[u32],
        sink: &mut dyn FnMut(Staged<'_>),
    ) -> Result<()> {
        self.route_stage_done();
        let n_projs = self.layers[li].projs.len();
        let mut error = None;
        let mut outstanding = 0usize;
        let mut ahead_left = 0usize;
        // Announced experts this call needs, and the projections of them not yet in.
        let mut ahead_needed = vec![false; self.layers[li].ahead_mark.len()];
        // The others, by index in `experts`: read here, started within the budget, and
        // the bytes of those started and not yet handed over.
        let mut to_start = std::collections::VecDeque::new();
        let mut own_bytes = 0usize;
        let budget = self.stage_read_budget;
        // Another read may start: within the budget, or the first when none is out.
        let room = |own_bytes: usize, outstanding: usize| own_bytes < budget || outstanding == 0;
        for (i, &e) in experts.iter().enumerate() {
            if self.layers[li].ahead_mark[e as usize] {
                // Read ahead (in flight, or done and waiting in ahead_done).
                ahead_needed[e as usize] = true;
                ahead_left += n_projs;
                self.layers[li].counters.stage_ahead_used += 1;
            } else {
                to_start.push_back(i);
            }
        }
        // Each projection is handed over as soon as it is in, so read buffers recycle
        // and the engine's copies overlap the remaining reads.
        loop {
            while error.is_none() && room(own_bytes, outstanding) {
                let Some(i) = to_start.pop_front() else { break };
                let (n, err) = self.start_expert_reads(li, experts[i], |p| stage_tag(call, i, p));
                outstanding += n as usize;
                let projs = &self.layers[li].projs[..n as usize];
                own_bytes += projs.iter().map(|p| p.bytes).sum::<usize>();
                if err.is_some() {
                    error = err;
                }
            }
            if let Err(e) = self.io.submit() {
                error.get_or_insert(e);
            }
            self.process_finished();
            let (mut ready, unneeded): (Vec<_>, Vec<_>) =
                std::mem::take(&mut self.layers[li].ahead_done)
                    .into_iter()
                    .partition(|(e, ..)| ahead_needed[*e as usize]);
            // Announced but not needed by this call: the announcement ends with it, and
            // the buffers go back now (they count against the budget).
            for (_, _, op, _) in unneeded {
                self.io.release(op);
            }
            ahead_left -= ready.len();
            // process_finished left only this call's own reads here.
            for (op, tag, result) in std::mem::take(&mut self.stage_done) {
                debug_assert_eq!(stage_call_of(tag), call);
                outstanding -= 1;
                let (i, p) = stage_parts(tag);
                if let Ok(()) = &result {
                    self.layers[li].counters.bytes_read += self.io.data(op).len() as u64;
                }
                own_bytes -= self.io.data(op).len();
                ready.push((experts[i], p, op, result));
            }
            for (expert, proj, op, result) in ready {
                match result {
                    Ok(()) if error.is_none() => {
                        let item = Staged::FromFile {
                            expert,
                            proj,
                            data: self.io.data(op),
                        };
                        let t1 = Instant::now();
                        in_callback(|| sink(item));
                        self.layers[li].counters.copy_ns += t1.elapsed().as_nanos() as u64;
                    }
                    Ok(()) => {}
                    Err(e) => {
                        error.get_or_insert(e);
                    }
                }
                self.io.release(op);
            }
            if outstanding == 0 && ahead_left == 0 && (to_start.is_empty() || error.is_some()) {
                break;
            }
            if error.is_none() && !to_start.is_empty() && room(own_bytes, outstanding) {
                continue;
            }
            if self.io.pending() == 0 && !self.io.has_completions() {
                error.get_or_insert(PoolError::Internal(
                    "stage reads are outstanding but none is in flight".into(),
                ));
                break;
            }
            if let Err(e) = self.io.reap(true) {
                error.get_or_insert(e);
                break;
            }
        }
        // Bytes read while the file changed were handed over: the call fails, and the
        // engine must not use the staging area.
        if error.is_none() {
            if let Err(e) = self.check_layer_files(li) {
                error = Some(e);
            }
        }
        match error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Adds a served ubatch of layer `li` to the routing trace, if one is recorded.
    fn record(&mut self, li: usize, ids: &[i32], n_used: usize, n_tokens: usize, stride: usize) {
        let Some(t) = self.trace.as_mut() else {
            return;
        };
        let order: Vec<i32> = self.layers.iter().map(|l| l.id).collect();
        let n_experts = self
            .layers
            .iter()
            .map(|l| l.map.n_experts())
            .max()
            .unwrap_or(0);
        t.record(
            &order,
            self.layers[li].id,
            n_experts,
            ids,
            n_used,
            n_tokens,
            stride,
        );
    }

    fn snapshot(&self) -> StatsSnapshot {
        let mut total = Counters::default();
        let layers = self
            .layers
            .iter()
            .map(|l| {
                total.add(&l.counters);
                LayerStats {
                    layer: l.id,
                    n_experts: l.map.n_experts(),
                    n_slots: l.map.n_slots(),
                    resident: l.map.ready_count() as u32,
                    counters: l.counters,
                }
            })
            .collect();
        StatsSnapshot {
            format: metrics::STATS_FORMAT.into(),
            version: 1,
            pid: std::process::id(),
            unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            io: match self.io.active() {
                ActiveIo::Uring => "io_uring".into(),
                ActiveIo::Pread => "pread".into(),
            },
            direct_files: self.files.iter().filter(|f| f.is_direct()).count() as u32,
            files: self.files.len() as u32,
            policy: self.policy.name().into(),
            warnings: self.warnings.clone(),
            total,
            layers,
        }
    }
}
