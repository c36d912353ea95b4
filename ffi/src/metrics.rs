//! Pool metrics: plain counters in each layer's state (the pool lock makes them
//! single-writer, so the hot path pays a few additions), a serialisable snapshot, and
//! the stats file the daemon reads.
//!
//! # The stats file
//!
//! When the engine gives the pool a path, the pool rewrites that file atomically
//! (write `PATH.tmp.PID`, then rename over `PATH`) at most every `stats_interval_ms`
//! milliseconds from a background thread, once more when the pool is deleted, and on
//! `ep_pool_publish_stats`. The content is one JSON object, [`StatsSnapshot`]:
//!
//! ```json
//! {"format":"expert-pool-stats","version":1,"pid":1234,"unix_ms":1700000000000,
//!  "io":"io_uring","direct_files":1,"policy":"lfru","warnings":[],
//!  "total":{"requests":10,"hits":70,"inflight_hits":2,"misses":8, ...},
//!  "layers":[{"layer":3,"n_experts":128,"n_slots":32,"resident":32,
//!             "counters":{"requests":10, ...}}]}
//! ```
//!
//! Counters are cumulative since the pool was created (see [`Counters`] for each).
//! `hits + inflight_hits + misses` equals the distinct experts of all requests that
//! were served (did-not-fit and invalid requests count only in their own counters).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Cumulative counters of one layer, or of the whole pool.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
#[repr(C)]
pub struct Counters {
    /// Requests served (every needed expert made resident and slots returned).
    pub requests: u64,
    /// Distinct requested experts that were ready in a slot.
    pub hits: u64,
    /// Distinct requested experts whose (prefetch) fill was in flight: waited for.
    pub inflight_hits: u64,
    /// Distinct requested experts that were not resident: read on demand.
    pub misses: u64,
    /// Experts removed from a slot to make room (demand or prefetch).
    pub evictions: u64,
    /// Bytes of expert data read from files (demand and prefetch; wanted bytes).
    pub bytes_read: u64,
    /// Nanoseconds requests spent waiting for reads.
    pub stall_ns: u64,
    /// Prefetch fills started.
    pub prefetch_issued: u64,
    /// Bytes of prefetch fills started.
    pub prefetch_issued_bytes: u64,
    /// Prefetched experts that a request used before they were evicted.
    pub prefetch_useful: u64,
    /// Bytes of those.
    pub prefetch_useful_bytes: u64,
    /// Prefetched experts evicted (or cancelled) before any request used them.
    pub prefetch_wasted: u64,
    /// Bytes of those.
    pub prefetch_wasted_bytes: u64,
    /// Prefetch hints not started: no slot free of held/filling experts, or the
    /// in-flight prefetch limit was reached.
    pub prefetch_dropped: u64,
    /// Requests whose distinct experts exceeded the slots (served by the engine's
    /// original tensors).
    pub does_not_fit: u64,
    /// Requests or prefetches that failed with an error (I/O, changed file, bad ids).
    pub errors: u64,
    /// Stage calls served (ubatches too large for the slots, computed from a staging
    /// area the engine owns; the slots are not changed).
    pub staged: u64,
    /// Distinct experts of stage calls copied from a slot that held them.
    pub staged_from_slots: u64,
    /// Distinct experts of stage calls read from the file (their bytes count in
    /// `bytes_read`).
    pub staged_reads: u64,
    /// Nanoseconds spent handing read bytes to the engine (slot copies or repacks, and
    /// staging copies); part of `stall_ns` when a request or stage call waited.
    pub copy_ns: u64,
    /// Experts announced by `stage_ahead` and read ahead for the layer's next stage call
    /// or request (their bytes count in `bytes_read`).
    pub stage_ahead: u64,
    /// Of those, experts the stage call or request needed (the rest were read for
    /// nothing).
    pub stage_ahead_used: u64,
    /// Misses of served requests filled from read-ahead reads (also counted in `misses`
    /// and `stage_ahead_used`): their reads had started before the request.
    pub ahead_fills: u64,
}

impl Counters {
    /// Adds `o` into `self`.
    pub fn add(&mut self, o: &Counters) {
        self.requests += o.requests;
        self.hits += o.hits;
        self.inflight_hits += o.inflight_hits;
        self.misses += o.misses;
        self.evictions += o.evictions;
        self.bytes_read += o.bytes_read;
        self.stall_ns += o.stall_ns;
        self.prefetch_issued += o.prefetch_issued;
        self.prefetch_issued_bytes += o.prefetch_issued_bytes;
        self.prefetch_useful += o.prefetch_useful;
        self.prefetch_useful_bytes += o.prefetch_useful_bytes;
        self.prefetch_wasted += o.prefetch_wasted;
        self.prefetch_wasted_bytes += o.prefetch_wasted_bytes;
        self.prefetch_dropped += o.prefetch_dropped;
        self.does_not_fit += o.does_not_fit;
        self.errors += o.errors;
        self.staged += o.staged;
        self.staged_from_slots += o.staged_from_slots;
        self.staged_reads += o.staged_reads;
        self.copy_ns += o.copy_ns;
        self.stage_ahead += o.stage_ahead;
        self.stage_ahead_used += o.stage_ahead_used;
        self.ahead_fills += o.ahead_fills;
    }

    /// Hit rate over distinct requested experts (in-flight hits count as hits), or 0.
    pub fn hit_rate(&self) -> f64 {
        let total = self.hits + self.inflight_hits + self.misses;
        if total == 0 {
            0.0
        } else {
            (self.hits + self.inflight_hits) as f64 / total as f64
        }
    }
}

/// One layer in a [`StatsSnapshot`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerStats {
    /// The engine's layer index.
    pub layer: i32,
    /// Experts of the layer.
    pub n_experts: u32,
    /// Slots of the layer.
    pub n_slots: u32,
    /// Slots holding a ready expert now.
    pub resident: u32,
    /// Cumulative counters.
    pub counters: Counters,
}

/// The published stats (see the module documentation for the file format).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatsSnapshot {
    /// Always `"expert-pool-stats"`.
    pub format: String,
    /// Format version, 1.
    pub version: u32,
    /// Process id of the engine.
    pub pid: u32,
    /// Wall-clock time of the snapshot, milliseconds since the Unix epoch.
    pub unix_ms: u64,
    /// I/O path: `"io_uring"` or `"pread"`.
    pub io: String,
    /// Registered files read with O_DIRECT.
    pub direct_files: u32,
    /// Registered files.
    pub files: u32,
    /// Eviction policy.
    pub policy: String,
    /// Warnings raised so far (e.g. fallbacks), oldest first.
    pub warnings: Vec<String>,
    /// Sum over layers.
    pub total: Counters,
    /// Per registered layer, in registration order.
    pub layers: Vec<LayerStats>,
}

/// The `format` field of [`StatsSnapshot`].
pub const STATS_FORMAT: &str = "expert-pool-stats";

impl StatsSnapshot {
    /// Parses a stats file's content.
    pub fn from_json(s: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(s)
    }
}

/// Writes `snap` to `path` atomically: a temp file in the same directory, fsync-free
/// (stats are advisory), then rename. Each call has a temp file of its own (the pool's
/// publisher thread and `ep_pool_publish_stats`, or two pools, may write at once).
pub fn write_atomic(path: &Path, snap: &StatsSnapshot) -> std::io::Result<()> {
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let json = serde_json::to_vec(snap).map_err(std::io::Error::other)?;
    let mut tmp = PathBuf::from(path);
    let name = format!(
        "{}.tmp.{}.{}",
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "stats".into()),
        std::process::id(),
        WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    tmp.set_file_name(name);
    {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(&json)?;
        f.write_all(b"\n")?;
    }
    fs::rename(&tmp, path).inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writers at once (the publisher thread and an explicit publish) each succeed, and
    /// the file always holds one whole snapshot: with one temp name per process, one
    /// writer truncated the other's file and the second rename failed.
    #[test]
    fn writers_at_once_each_publish_a_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stats.json");
        let snap = |pid| StatsSnapshot {
            format: STATS_FORMAT.into(),
            version: 1,
            pid,
            unix_ms: 0,
            io: "pread".into(),
            direct_files: 0,
            files: 1,
            policy: "lru".into(),
            warnings: vec!["x".repeat(4096)],
            total: Counters::default(),
            layers: vec![],
        };
        std::thread::scope(|s| {
            for w in 0..4u32 {
                let (path, snap) = (&path, snap(w));
                s.spawn(move || {
                    for _ in 0..200 {
                        write_atomic(path, &snap).expect("every write succeeds");
                        let text = std::fs::read(path).unwrap();
                        serde_json::from_slice::<StatsSnapshot>(&text).expect("a whole snapshot");
                    }
                });
            }
        });
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temp files left"
        );
    }
}
