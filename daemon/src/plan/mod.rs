//! The planner: a pure function from a probe [`Snapshot`] and the [`Config`] to a [`Plan`]
//! — where the weights go, whether the expert pool is on and how many slots it gets,
//! context and KV type, threads and batch sizes, the memory each tier will hold, a
//! roofline prediction of decode speed, and a reason for every choice.
//!
//! Invariants: [`plan`] does no I/O, cannot fail and is deterministic. Budgets come from
//! totals (RAM, cgroup limit, VRAM), not from what is free now, so re-planning while the
//! engine runs gives the same plan. A plan with `within_budget == true` predicts no tier
//! above its budget; when no placement fits, the plan says so (`within_budget == false`,
//! with a warning) rather than failing.
//!
//! The model (all numbers are stated in the reasons of every plan):
//! - Per decoded token the engine reads all non-expert weights once and `n_used` experts
//!   of every MoE layer from the tier that computes them; with the pool, a miss is first
//!   copied into a slot (from the RAM cache over PCIe, or from disk) and then read. Time per token is the sum over tiers of bytes / bandwidth (no
//!   overlap: a lower bound on speed's upper bound, i.e. a roofline).
//! - Bandwidths: VRAM and PCIe from NVML when probed (else [`ASSUMED_VRAM_BW`],
//!   [`ASSUMED_PCIE_BW`]); RAM is not probed: [`RAM_BW_PER_THREAD`] per decode thread up
//!   to [`RAM_BW_MAX`]; disk from the probe (else [`ASSUMED_DISK_BW`]).
//! - Pool hit rate with `N` of `E` experts resident per layer: `(N/E)^0.25` (0.71 at 1/4,
//!   close to the 74.9% LRU hit rate published for Qwen3-235B at 32 of 128; 0.5 at 1/16,
//!   in the 25-47% range of consecutive-token reuse published for OLMoE).

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use crate::config::{Budget, Config, KvType, PoolMode, human_bytes};
use crate::probe::Snapshot;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// Assumed RAM read bandwidth per decode thread (RAM is not probed).
pub const RAM_BW_PER_THREAD: u64 = 10_000_000_000;
/// Upper bound of the assumed RAM bandwidth.
pub const RAM_BW_MAX: u64 = 80_000_000_000;
/// VRAM bandwidth when NVML does not report it.
pub const ASSUMED_VRAM_BW: u64 = 300_000_000_000;
/// Host-to-GPU bandwidth when NVML does not report it (PCIe 4 x8-ish, conservative).
pub const ASSUMED_PCIE_BW: u64 = 12_000_000_000;
/// Disk read bandwidth when the probe has no result (DESIGN.md §4: 1.0 GiB/s at depth 1).
pub const ASSUMED_DISK_BW: u64 = 1_000_000_000;
/// Exponent of the assumed hit-rate curve `(N/E)^HIT_EXPONENT`.
pub const HIT_EXPONENT: f64 = 0.25;
/// The engine's own RAM besides weights, KV and compute buffers (measured: llama-server
/// with a 15 MiB model holds 21 MiB of anonymous memory; this keeps a 3x margin. With
/// 128 MiB the demo's 1 GiB plan peaked 250 MiB under its prediction, bench/RESULTS.md).
pub const ENGINE_BASE_RAM: u64 = 64 * MIB;
/// llama-server's default `--cache-ram`: up to this many MiB of RAM keep the KV state of
/// finished prompts for reuse, on top of everything the plan budgets (measured: a 1 GiB
/// plan's engine grew ~95 MiB per 4k-token request without a limit, bench/RESULTS.md).
pub const ENGINE_PROMPT_CACHE_DEFAULT_MIB: u64 = 8192;
/// Context when the model says nothing and the config sets none, and the default cap.
pub const DEFAULT_MAX_CTX: u32 = 32768;
/// The smallest context the planner shrinks to.
pub const MIN_CTX: u32 = 2048;
/// `--ctx-checkpoints` for models with sliding-window layers: llama-server keeps up to
/// this many checkpoints of a sequence's sliding-window cells in RAM to reuse prompts.
/// Its own default, passed explicitly so that the budget and the engine agree.
pub const CTX_CHECKPOINTS: u64 = 32;

/// KV cache gets at most this fraction of its tier's budget (auto context).
pub const KV_SHARE: f64 = 0.25;

/// Where a group of bytes lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Tier {
    Vram,
    Ram,
    Disk,
}

impl Tier {
    /// The name in plan documents.
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Vram => "vram",
            Tier::Ram => "ram",
            Tier::Disk => "disk",
        }
    }
}

/// The expert pool's settings, when it is on.
#[derive(Clone, Debug, PartialEq)]
pub struct PoolPlan {
    /// N_SLOTS per MoE layer (layer index -> slots); the same for every layer today.
    pub slots_per_layer: BTreeMap<u32, u32>,
    /// The slot count passed to the engine (`--expert-pool-slots`).
    pub slots: u32,
    /// Where the slots live.
    pub slot_tier: Tier,
    /// RAM cache between the slots and the disk (GPU hosts), MiB; 0 on CPU hosts where the
    /// slots are the RAM tier. Passed as `--expert-pool-mib`.
    pub cache_mib: u64,
    pub policy: String,
    pub prefetch: bool,
    /// Assumed hit rate of the slots.
    pub assumed_hit_rate: f64,
    /// Assumed fraction of lookups served by slots or the RAM cache.
    pub assumed_ram_hit_rate: f64,
    /// Where pool statistics are published.
    pub stats_path: PathBuf,
}

/// Memory one tier will hold, by use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TierUse {
    pub tier: Tier,
    pub weights: u64,
    /// Resident experts: whole layers, pool slots, or the pool's RAM cache.
    pub experts: u64,
    pub kv: u64,
    pub compute: u64,
    /// The engine's own memory: in RAM its base (`ENGINE_BASE_RAM`) and, for models with
    /// sliding-window layers, llama-server's context checkpoints (`CTX_CHECKPOINTS`).
    pub base: u64,
    pub budget: u64,
}

impl TierUse {
    /// Everything the tier holds.
    pub fn total(&self) -> u64 {
        self.weights + self.experts + self.kv + self.compute + self.base
    }
}

/// Bytes read per decoded token from each source, and the rates used.
#[derive(Clone, Debug, PartialEq)]
pub struct Roofline {
    pub vram_bytes: u64,
    pub ram_bytes: u64,
    pub pcie_bytes: u64,
    pub disk_bytes: u64,
    pub vram_bw: u64,
    pub ram_bw: u64,
    pub pcie_bw: u64,
    pub disk_bw: u64,
    /// Seconds per token: sum of bytes / bandwidth.
    pub seconds_per_token: f64,
}

/// One choice and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reason {
    /// What was chosen ("pool", "ctx", "threads", ...).
    pub topic: &'static str,
    /// The value, as a person reads it.
    pub choice: String,
    pub why: String,
}

/// What the engine will run with.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub model_path: PathBuf,
    pub pool: Option<PoolPlan>,
    /// `-ngl`: layers (of block_count + 1, the output) on the GPU. llama.cpp counts MTP
    /// blocks (after the last layer) in block_count and offloads from the end, so a plan
    /// that offloads any layer adds them, though they are not loaded without MTP.
    pub gpu_layers: u32,
    /// `--n-cpu-moe`: the first N layers keep their experts in RAM.
    pub n_cpu_moe: u32,
    pub ctx_size: u32,
    pub kv_type: KvType,
    /// Flash attention on (needed for a quantized V cache).
    pub flash_attn: bool,
    pub threads: u32,
    pub threads_batch: u32,
    pub batch_size: u32,
    pub ubatch_size: u32,
    pub parallel: u32,
    /// `--ctx-checkpoints`, passed and budgeted for models with a sliding window (0: not
    /// passed; llama-server's default then applies to recurrent models' checkpoints,
    /// which the plan does not budget).
    pub ctx_checkpoints: u64,
    /// `--cache-ram`: MiB of RAM llama-server may use to keep finished prompts' KV state,
    /// what the RAM budget leaves after everything else (0 turns the cache off).
    pub prompt_cache_mib: u64,
    /// Memory per tier (RAM always; VRAM when a GPU is used).
    pub memory: Vec<TierUse>,
    pub roofline: Roofline,
    /// Predicted decode tokens per second: a roofline, an upper bound only where the
    /// pool's hit rate and the disk are no better than assumed (the demo's engine, at a
    /// measured 76% against an assumed 61%, decodes faster than its prediction).
    pub predicted_tok_s: f64,
    /// The whole llama-server command line after the binary.
    pub args: Vec<String>,
    pub reasons: Vec<Reason>,
    pub warnings: Vec<String>,
    /// Whether every tier's predicted use is within its budget.
    pub within_budget: bool,
}

/// The assumed hit rate with `slots` of `experts` per layer resident.
pub fn assumed_hit_rate(slots: u32, experts: u32) -> f64 {
    if experts == 0 {
        return 1.0;
    }
    let f = (slots as f64 / experts as f64).clamp(0.0, 1.0);
    f.powf(HIT_EXPONENT)
}

/// Facts derived once from the snapshot.
struct Model {
    layers: u32,
    /// MTP blocks after the `layers` (in block_count, not computed).
    nextn: u32,
    n_exp: u32,
    n_used: u32,
    non_expert: u64,
    expert_total: u64,
    /// Bytes of one expert summed over the MoE layers.
    one_expert_all_layers: u64,
    /// Whole-layer expert bytes, by layer index.
    layer_experts: BTreeMap<u32, u64>,
    /// Bytes read per token from experts (n_used of each MoE layer).
    expert_read: u64,
    kv_per_token_f16: u64,
    /// Of `kv_per_token_f16`, the sliding-window layers' share (0: none known).
    kv_swa_per_token_f16: u64,
    /// Their window in tokens.
    swa_window: u32,
    /// How many of the `layers` slide.
    swa_layers: u32,
    n_embd: u64,
    ctx_train: u64,
}

impl Model {
    fn from(s: &Snapshot) -> Model {
        let i = &s.model.info;
        let n_exp = i.expert_count;
        let layer_experts: BTreeMap<u32, u64> = i
            .expert_bytes_per_layer
            .iter()
            .map(|(l, b)| (*l, b * u64::from(n_exp)))
            .collect();
        let one: u64 = i.expert_bytes_per_layer.values().sum();
        Model {
            // the layers the engine computes: MTP blocks are loaded only for MTP
            // speculative decoding, which the plan does not turn on
            layers: i.block_count.saturating_sub(i.nextn_layers),
            nextn: i.nextn_layers.min(i.block_count),
            n_exp,
            n_used: i.expert_used_count.min(n_exp),
            non_expert: i.non_expert_bytes,
            expert_total: i.expert_bytes,
            one_expert_all_layers: one,
            layer_experts,
            expert_read: one * u64::from(i.expert_used_count.min(n_exp)),
            kv_per_token_f16: i.kv_bytes_per_token_f16,
            kv_swa_per_token_f16: if i.sliding_window > 0 {
                i.kv_swa_bytes_per_token_f16.min(i.kv_bytes_per_token_f16)
            } else {
                0
            },
            swa_window: i.sliding_window,
            swa_layers: if i.sliding_window > 0 {
                i.swa_layers
            } else {
                0
            },
            n_embd: i.n_embd,
            ctx_train: i.context_length,
        }
    }

    /// `-ngl` for the last `g` of the layers the engine computes and the output (`g`
    /// counts the output as one): llama.cpp offloads the last `-ngl` of block_count + 1,
    /// which ends with the MTP blocks.
    fn ngl(&self, g: u32) -> u32 {
        if g == 0 {
            0
        } else {
            g.saturating_add(self.nextn)
        }
    }

    fn moe(&self) -> bool {
        self.n_exp > 0 && !self.layer_experts.is_empty()
    }

    /// KV cache bytes for a context of `ctx` tokens shared by `parallel` sequences:
    /// every layer holds the context, except sliding-window layers, which hold the window
    /// plus one ubatch per sequence (`cells`).
    fn kv(&self, ctx: u32, t: KvType, ubatch: u32, parallel: u32) -> u64 {
        let (n, d) = t.ratio_to_f16();
        let (full_cells, swa_cells) = self.cells(ctx, ubatch, parallel);
        let full = self.kv_per_token_f16 - self.kv_swa_per_token_f16;
        full.saturating_mul(full_cells)
            .saturating_add(self.kv_swa_per_token_f16.saturating_mul(swa_cells))
            .saturating_mul(n)
            / d
    }

    /// KV cells of a full-attention layer and of a sliding-window layer, all sequences
    /// together, as llama.cpp allocates them for llama-server with an explicit
    /// `--parallel` (a non-unified cache: one stream per sequence): the context padded to
    /// 256, each sequence's share of it padded to 256; a sliding-window layer's stream
    /// holds the window plus a ubatch, at most the share, padded to 256.
    fn cells(&self, ctx: u32, ubatch: u32, parallel: u32) -> (u64, u64) {
        let p = u64::from(parallel.max(1));
        let n_ctx = u64::from(ctx).next_multiple_of(256);
        let per_seq = if p == 1 {
            n_ctx
        } else {
            (n_ctx / p).next_multiple_of(256)
        };
        let swa = (u64::from(self.swa_window) + u64::from(ubatch))
            .min(per_seq)
            .next_multiple_of(256);
        (p * per_seq, p * swa)
    }

    /// At most the KV bytes of any `count` of the layers (where `-ngl` offloads some):
    /// full-attention layers first, each its share of their KV, then sliding-window ones.
    fn kv_of_layers(&self, count: u32, ctx: u32, t: KvType, ubatch: u32, parallel: u32) -> u64 {
        let (n, d) = t.ratio_to_f16();
        let (full_cells, swa_cells) = self.cells(ctx, ubatch, parallel);
        let n_swa = self.swa_layers.min(self.layers);
        let n_full = self.layers - n_swa;
        let full_each = (self.kv_per_token_f16 - self.kv_swa_per_token_f16)
            .saturating_mul(full_cells)
            .div_ceil(u64::from(n_full.max(1)));
        let swa_each = self
            .kv_swa_per_token_f16
            .saturating_mul(swa_cells)
            .div_ceil(u64::from(n_swa.max(1)));
        let f = count.min(n_full);
        let sw = (count - f).min(n_swa);
        let bytes = full_each
            .saturating_mul(u64::from(f))
            .saturating_add(swa_each.saturating_mul(u64::from(sw)))
            .saturating_mul(n)
            / d;
        bytes.min(self.kv(ctx, t, ubatch, parallel))
    }

    fn has_swa(&self) -> bool {
        self.swa_window > 0 && self.kv_swa_per_token_f16 > 0
    }

    /// RAM for llama-server's context checkpoints (sliding-window models): up to
    /// `CTX_CHECKPOINTS` per sequence, each a copy of the cells the sequence's
    /// sliding-window layers still see, at most the window (measured: 128 cells and their
    /// positions for a 128-token window). Where the layers are not known (a window in
    /// an architecture the daemon does not list), as if every layer slid.
    fn checkpoints(&self, t: KvType, parallel: u32) -> u64 {
        if self.swa_window == 0 {
            return 0;
        }
        let per_token = if self.has_swa() {
            self.kv_swa_per_token_f16
        } else {
            self.kv_per_token_f16
        };
        let (n, d) = t.ratio_to_f16();
        // a checkpoint holds at most the window's cells (and a few bytes per cell of
        // positions): budgeted as the window padded to 256
        let cells = (u64::from(self.swa_window) + 1).next_multiple_of(256);
        (CTX_CHECKPOINTS * u64::from(parallel.max(1)) * cells)
            .saturating_mul(per_token)
            .saturating_mul(n)
            / d
    }

    fn compute(&self, ubatch: u32) -> u64 {
        // Compute buffers for one ubatch with flash attention (which `auto` picks where the
        // backend has it): a stated estimate, not measured.
        64 * MIB + u64::from(ubatch) * self.n_embd * 64
    }
}

/// The GPUs the engine will see when `CUDA_VISIBLE_DEVICES` (from `engine.env`, else the
/// daemon's, which the engine inherits) selects some, with why; `None` when it is not set
/// or names GPUs by UUID (not mapped: every GPU counts). Like CUDA, an entry that is not
/// a GPU index ends the list (`-1` hides them all). The indices are CUDA's order, NVML's
/// (PCI bus) order when `CUDA_DEVICE_ORDER=PCI_BUS_ID`; on hosts of identical GPUs the
/// two agree on everything the plan uses.
fn visible_gpus(s: &Snapshot, c: &Config) -> Option<(Vec<crate::probe::GpuProbe>, String)> {
    let (spec, from) = match c.engine.env.get("CUDA_VISIBLE_DEVICES") {
        Some(v) => (v.as_str(), "engine.env"),
        None => (
            s.cuda_visible_devices.as_deref()?,
            "the daemon's environment",
        ),
    };
    let entries: Vec<&str> = spec.split(',').map(str::trim).collect();
    if entries
        .iter()
        .any(|e| e.starts_with("GPU-") || e.starts_with("MIG-"))
    {
        return None;
    }
    let mut gpus = Vec::new();
    for e in entries {
        match e
            .parse::<u32>()
            .ok()
            .and_then(|i| s.gpus.iter().find(|g| g.index == i))
        {
            Some(g) if !gpus.contains(g) => gpus.push(g.clone()),
            Some(_) => {}
            None => break,
        }
    }
    let why = format!(
        "CUDA_VISIBLE_DEVICES={spec:?} ({from}): the engine sees {}",
        if gpus.is_empty() {
            "no GPU".to_string()
        } else {
            gpus.iter()
                .map(|g| format!("GPU {}", g.index))
                .collect::<Vec<_>>()
                .join(", ")
        }
    );
    Some((gpus, why))
}

/// Budgets in force.
struct Budgets {
    ram: u64,
    vram: u64,
    gpus: usize,
}

fn budgets(
    s: &Snapshot,
    c: &Config,
    reasons: &mut Vec<Reason>,
    warnings: &mut Vec<String>,
) -> Budgets {
    let limit = match s.host.cgroup_memory_limit {
        Some(l) => l.min(s.host.total_ram),
        None => s.host.total_ram,
    };
    let reserve = c
        .memory
        .ram_reserve
        .unwrap_or_else(|| (limit / 10).clamp(256 * MIB, 4 * GIB));
    let ram = match c.memory.ram {
        Budget::Auto => {
            let b = limit.saturating_sub(reserve);
            let src = if s
                .host
                .cgroup_memory_limit
                .is_some_and(|l| l < s.host.total_ram)
            {
                format!("cgroup limit {}", human_bytes(limit))
            } else {
                format!("RAM {}", human_bytes(limit))
            };
            reasons.push(Reason {
                topic: "ram_budget",
                choice: human_bytes(b),
                why: format!("auto: {src} minus a reserve of {}", human_bytes(reserve)),
            });
            b
        }
        Budget::Bytes(b) if b > limit => {
            warnings.push(format!(
                "memory.ram {} is above what this host allows ({}): using {}",
                human_bytes(b),
                human_bytes(limit),
                human_bytes(limit)
            ));
            reasons.push(Reason {
                topic: "ram_budget",
                choice: human_bytes(limit),
                why: "memory.ram capped at the host's RAM / cgroup limit".into(),
            });
            limit
        }
        Budget::Bytes(b) => {
            reasons.push(Reason {
                topic: "ram_budget",
                choice: human_bytes(b),
                why: "memory.ram in the config".into(),
            });
            b
        }
    };
    let vram_avail: u64 = s
        .gpus
        .iter()
        .map(|g| g.total_memory.saturating_sub(c.memory.vram_reserve))
        .sum();
    let vram = match c.memory.vram {
        Budget::Auto => vram_avail,
        Budget::Bytes(b) => {
            if b > vram_avail {
                warnings.push(format!(
                    "memory.vram {} is above the GPUs' memory less reserve ({}): using {}",
                    human_bytes(b),
                    human_bytes(vram_avail),
                    human_bytes(vram_avail)
                ));
            }
            b.min(vram_avail)
        }
    };
    if !s.gpus.is_empty() {
        reasons.push(Reason {
            topic: "vram_budget",
            choice: human_bytes(vram),
            why: match c.memory.vram {
                Budget::Auto => format!(
                    "auto: {} GPU(s), total memory minus {} reserve each",
                    s.gpus.len(),
                    human_bytes(c.memory.vram_reserve)
                ),
                Budget::Bytes(_) => "memory.vram in the config".into(),
            },
        });
    }
    Budgets {
        ram,
        vram,
        gpus: s.gpus.len(),
    }
}

/// A placement of weights for a given context and KV type.
struct Placement {
    gpu_layers: u32,
    n_cpu_moe: u32,
    pool: Option<(u32, Tier, u64)>, // (slots, slot tier, ram cache bytes)
    vram: TierUse,
    ram: TierUse,
    roof: (u64, u64, u64, u64), // vram, ram, pcie, disk bytes per token
    fits: bool,
    why: Vec<Reason>,
}

/// Plans the engine for `snapshot` under `config`. Pure; cannot fail.
pub fn plan(snapshot: &Snapshot, config: &Config) -> Plan {
    let mut reasons = Vec::new();
    let mut warnings = Vec::new();
    // From here on the GPUs are those the engine will see.
    let visible;
    let snapshot = match visible_gpus(snapshot, config) {
        Some((gpus, why)) => {
            reasons.push(Reason {
                topic: "gpu_visible",
                choice: format!("{} of {}", gpus.len(), snapshot.gpus.len()),
                why,
            });
            visible = Snapshot {
                gpus,
                ..snapshot.clone()
            };
            &visible
        }
        None => snapshot,
    };
    let m = Model::from(snapshot);
    let b = budgets(snapshot, config, &mut reasons, &mut warnings);
    let threads = config.plan.threads.unwrap_or_else(|| {
        snapshot
            .host
            .physical_cores
            .min(snapshot.host.usable_cores)
            .max(1)
    });
    let threads_batch = config
        .plan
        .threads
        .unwrap_or(snapshot.host.usable_cores.max(1));
    reasons.push(Reason {
        topic: "threads",
        choice: format!("{threads} (batch {threads_batch})"),
        why: match config.plan.threads {
            Some(_) => "plan.threads in the config".into(),
            None => format!(
                "decode is memory-bound: one thread per physical core ({} physical, {} usable by this process); prefill uses every usable core",
                snapshot.host.physical_cores, snapshot.host.usable_cores
            ),
        },
    });
    if config.plan.threads.is_none() && snapshot.host.usable_cores < snapshot.host.logical_cores {
        reasons.push(Reason {
            topic: "cpu_limit",
            choice: format!(
                "{} of {} cores",
                snapshot.host.usable_cores, snapshot.host.logical_cores
            ),
            why: "the process's CPU affinity or cgroup quota allows fewer cores than the host has"
                .into(),
        });
    }

    let use_gpu = b.gpus > 0 && b.vram > 0;
    if b.gpus > 0 && !use_gpu {
        warnings.push("GPU present but the VRAM budget is 0: planning for the CPU".into());
    }
    if b.gpus == 0
        && let Some(n) = &snapshot.gpu_note
    {
        reasons.push(Reason {
            topic: "gpu",
            choice: "none".into(),
            why: n.clone(),
        });
    }

    // Context and KV type: preferred by the config, else the model's context up to the
    // default cap, halved (after trying q8_0) while the KV cache takes more than its share.
    let ctx_max = match config.plan.ctx_size {
        Some(c) => c,
        None => {
            let t = if m.ctx_train == 0 {
                u64::from(DEFAULT_MAX_CTX)
            } else {
                m.ctx_train
            };
            t.min(u64::from(DEFAULT_MAX_CTX)) as u32
        }
    };
    let ctx_min = match config.plan.ctx_size {
        Some(c) => c,
        None => MIN_CTX.min(ctx_max),
    };
    let kv_types: Vec<KvType> = match config.plan.kv_type {
        Some(t) => vec![t],
        None => vec![KvType::F16, KvType::Q8_0],
    };
    let parallel = config.plan.parallel;
    // The KV tier: VRAM when the non-expert weights fit there, else RAM.
    let kv_tier_budget = if use_gpu && m.non_expert < b.vram {
        b.vram - m.non_expert
    } else {
        b.ram.saturating_sub(m.non_expert)
    };
    let mut candidates: Vec<(u32, KvType)> = Vec::new();
    let mut ctx = ctx_max;
    loop {
        for t in &kv_types {
            candidates.push((ctx, *t));
        }
        if ctx <= ctx_min {
            break;
        }
        ctx = (ctx / 2).max(ctx_min);
    }
    let kv_cap = (kv_tier_budget as f64 * KV_SHARE) as u64;
    // First candidate whose KV is within its share and whose placement fits; else the first
    // that fits at all; else the smallest (reported as over budget).
    // With several GPUs each holds a compute buffer: the share is of one GPU's part.
    let gpus = if use_gpu { b.gpus.max(1) as u64 } else { 1 };
    let ubatch = choose_ubatch(&m, if use_gpu { b.vram / gpus } else { b.ram });
    let mut chosen = None;
    for (i, (ctx, t)) in candidates.iter().enumerate() {
        let p = place(&m, &b, config, *ctx, *t, ubatch, parallel, use_gpu);
        if p.fits && m.kv(*ctx, *t, ubatch, parallel) <= kv_cap {
            chosen = Some((i, p));
            break;
        }
    }
    if chosen.is_none() {
        for (i, (ctx, t)) in candidates.iter().enumerate() {
            let p = place(&m, &b, config, *ctx, *t, ubatch, parallel, use_gpu);
            if p.fits {
                chosen = Some((i, p));
                break;
            }
        }
    }
    let nothing_fits = chosen.is_none();
    let (idx, placement) = chosen.unwrap_or_else(|| {
        let i = candidates.len() - 1;
        let (ctx, t) = candidates[i];
        (i, place(&m, &b, config, ctx, t, ubatch, parallel, use_gpu))
    });
    let (ctx_size, kv_type) = candidates[idx];
    let kv_bytes = m.kv(ctx_size, kv_type, ubatch, parallel);
    reasons.push(Reason {
        topic: "ctx",
        choice: ctx_size.to_string(),
        why: match config.plan.ctx_size {
            Some(_) => "plan.ctx_size in the config".into(),
            None if nothing_fits => format!(
                "the smallest tried (from {ctx_max}, halved down to {ctx_min}): at no context do the weights fit the budget"
            ),
            None if ctx_size == ctx_max => format!(
                "the model's context ({}) capped at {DEFAULT_MAX_CTX}; its KV cache ({}) fits",
                m.ctx_train,
                human_bytes(kv_bytes)
            ),
            None => format!(
                "halved from {ctx_max} until the KV cache ({}) takes at most {:.0}% of its tier's budget and the weights fit",
                human_bytes(kv_bytes),
                KV_SHARE * 100.0
            ),
        },
    });
    let flash_attn = kv_type != KvType::F16;
    reasons.push(Reason {
        topic: "kv_type",
        choice: kv_type.as_str().into(),
        why: match (config.plan.kv_type, kv_type) {
            (Some(_), _) => "plan.kv_type in the config".into(),
            (None, _) if nothing_fits => format!(
                "{}: the smaller cache, as nothing fits the budget; needs flash attention",
                kv_type.as_str()
            ),
            (None, KvType::F16) => "f16: full quality, and it fits".into(),
            (None, _) => format!(
                "{}: an f16 cache would take more than {:.0}% of the budget at this context; needs flash attention",
                kv_type.as_str(),
                KV_SHARE * 100.0
            ),
        },
    });
    reasons.push(Reason {
        topic: "batch",
        choice: format!("-b 2048 -ub {ubatch}"),
        why: format!(
            "compute buffers ({}) kept to at most 10% of the fast tier{}; prefill batches larger than the pool's slots are computed from its staging area",
            human_bytes(m.compute(ubatch).saturating_mul(gpus)),
            if gpus > 1 {
                format!(" (one on each of the {gpus} GPUs)")
            } else {
                String::new()
            }
        ),
    });
    if m.has_swa() {
        let (_, swa_cells) = m.cells(ctx_size, ubatch, parallel);
        let swa_kv = m.kv_swa_per_token_f16.saturating_mul(swa_cells);
        let (n, d) = kv_type.ratio_to_f16();
        reasons.push(Reason {
            topic: "sliding_window",
            choice: format!("{} tokens", m.swa_window),
            why: format!(
                "the model's sliding-window layers keep the window plus a ubatch per sequence ({} cells, {}), not the whole context; llama-server keeps up to {CTX_CHECKPOINTS} context checkpoints per sequence in RAM, each the last window of those layers ({}, budgeted with the engine's base)",
                swa_cells,
                human_bytes(swa_kv.saturating_mul(n) / d),
                human_bytes(m.checkpoints(kv_type, parallel))
            ),
        });
    } else if m.swa_window > 0 {
        reasons.push(Reason {
            topic: "sliding_window",
            choice: format!("{} tokens", m.swa_window),
            why: format!(
                "the planner does not know which of this architecture's layers slide: every layer's KV is counted at the whole context, and llama-server's up to {CTX_CHECKPOINTS} context checkpoints per sequence as if every layer slid ({}, budgeted with the engine's base)",
                human_bytes(m.checkpoints(kv_type, parallel))
            ),
        });
    }
    if parallel > 1 {
        reasons.push(Reason {
            topic: "parallel",
            choice: parallel.to_string(),
            why: "plan.parallel in the config: the context is shared by the sequences".into(),
        });
    }
    reasons.extend(placement.why.iter().cloned());

    // llama-server's prompt cache lives in RAM beside everything above: it gets what the
    // RAM budget leaves, at most its own default, so the engine stays within the budget.
    let ram_left = placement.ram.budget.saturating_sub(placement.ram.total());
    let prompt_cache_mib = (ram_left / MIB).min(ENGINE_PROMPT_CACHE_DEFAULT_MIB);
    let keeps = format!(
        "llama-server keeps finished prompts' KV state in RAM (up to {} GiB by default)",
        ENGINE_PROMPT_CACHE_DEFAULT_MIB / 1024
    );
    reasons.push(Reason {
        topic: "prompt_cache",
        choice: format!("{prompt_cache_mib} MiB"),
        why: if prompt_cache_mib == 0 {
            format!("{keeps}; the RAM budget leaves no room, so that cache is off")
        } else if prompt_cache_mib == ENGINE_PROMPT_CACHE_DEFAULT_MIB {
            format!(
                "llama-server's default for the RAM that keeps finished prompts' KV state; the RAM budget leaves more ({} MiB)",
                ram_left / MIB
            )
        } else {
            format!(
                "{keeps}; capped to what the RAM budget leaves ({} MiB)",
                ram_left / MIB
            )
        },
    });

    let mut memory = vec![placement.ram.clone()];
    if use_gpu {
        memory.insert(0, placement.vram.clone());
    }
    let within_budget = placement.fits;
    if !within_budget {
        warnings.push(format!(
            "no placement fits the budgets (RAM {}, VRAM {}): the model needs more memory; the engine will page weights from disk",
            human_bytes(b.ram),
            human_bytes(b.vram)
        ));
    }

    // Roofline.
    let ram_bw = (u64::from(threads) * RAM_BW_PER_THREAD).min(RAM_BW_MAX);
    let vram_bw = snapshot
        .gpus
        .iter()
        .filter_map(|g| g.memory_bandwidth)
        .min()
        .unwrap_or(ASSUMED_VRAM_BW);
    let pcie_bw = snapshot
        .gpus
        .iter()
        .filter_map(|g| g.pcie_bandwidth)
        .min()
        .unwrap_or(ASSUMED_PCIE_BW);
    let disk_bw = snapshot
        .disk
        .as_ref()
        .map(|d| d.read_bytes_per_sec)
        .filter(|b| *b > 0)
        .unwrap_or(ASSUMED_DISK_BW);
    let (vb, rb, pb, db) = placement.roof;
    let secs = vb as f64 / vram_bw as f64
        + rb as f64 / ram_bw as f64
        + pb as f64 / pcie_bw as f64
        + db as f64 / disk_bw as f64;
    let predicted_tok_s = if secs > 0.0 { 1.0 / secs } else { 0.0 };
    reasons.push(Reason {
        topic: "prediction",
        choice: format!("{predicted_tok_s:.1} tok/s"),
        why: format!(
            "roofline per token: {} from VRAM at {}/s, {} from RAM at {}/s (assumed {} per thread), {} over PCIe at {}/s, {} from disk at {}/s{}",
            human_bytes(vb),
            human_bytes(vram_bw),
            human_bytes(rb),
            human_bytes(ram_bw),
            human_bytes(RAM_BW_PER_THREAD),
            human_bytes(pb),
            human_bytes(pcie_bw),
            human_bytes(db),
            human_bytes(disk_bw),
            match &snapshot.disk {
                None => " (disk assumed, not probed)",
                Some(d) if !d.direct => " (probed with buffered reads: the page cache may have flattered it)",
                Some(_) => "",
            }
        ),
    });

    let stats_path = config.state_dir.join("pool-stats.json");
    let pool = placement.pool.map(|(slots, tier, cache)| {
        let h = assumed_hit_rate(slots, m.n_exp);
        let cache_experts = cache.checked_div(m.one_expert_all_layers).unwrap_or(0);
        let h_ram = assumed_hit_rate(
            (u64::from(slots) + cache_experts).min(u64::from(m.n_exp)) as u32,
            m.n_exp,
        );
        PoolPlan {
            slots_per_layer: m.layer_experts.keys().map(|l| (*l, slots)).collect(),
            slots,
            slot_tier: tier,
            cache_mib: cache / MIB,
            policy: config.pool.policy.clone(),
            prefetch: config.pool.prefetch,
            assumed_hit_rate: h,
            assumed_ram_hit_rate: h_ram,
            stats_path: stats_path.clone(),
        }
    });

    let mut p = Plan {
        model_path: snapshot.model.path.clone(),
        pool,
        gpu_layers: placement.gpu_layers,
        n_cpu_moe: placement.n_cpu_moe,
        ctx_size,
        kv_type,
        flash_attn,
        threads,
        threads_batch,
        batch_size: 2048,
        ubatch_size: ubatch,
        parallel,
        ctx_checkpoints: if m.swa_window > 0 { CTX_CHECKPOINTS } else { 0 },
        prompt_cache_mib,
        memory,
        roofline: Roofline {
            vram_bytes: vb,
            ram_bytes: rb,
            pcie_bytes: pb,
            disk_bytes: db,
            vram_bw,
            ram_bw,
            pcie_bw,
            disk_bw,
            seconds_per_token: secs,
        },
        predicted_tok_s,
        args: Vec::new(),
        reasons,
        warnings,
        within_budget,
    };
    p.args = engine_args(&p, config);
    p
}

/// The largest ubatch (512, 256, 128) whose compute buffer is at most 10% of `budget`.
fn choose_ubatch(m: &Model, budget: u64) -> u32 {
    for ub in [512, 256, 128] {
        if m.compute(ub) <= budget / 10 {
            return ub;
        }
    }
    128
}

/// Expert bytes per token that miss the slots: (served by the RAM cache, read from disk).
fn pool_reads(m: &Model, slots: u32, cached_experts: u64) -> (u64, u64) {
    let h = assumed_hit_rate(slots, m.n_exp);
    let h2 = assumed_hit_rate(
        (u64::from(slots) + cached_experts).min(u64::from(m.n_exp)) as u32,
        m.n_exp,
    );
    let r = m.expert_read as f64;
    ((r * (h2 - h)) as u64, (r * (1.0 - h2)) as u64)
}

#[allow(clippy::too_many_arguments)]
fn place(
    m: &Model,
    b: &Budgets,
    c: &Config,
    ctx: u32,
    kv_type: KvType,
    ubatch: u32,
    parallel: u32,
    use_gpu: bool,
) -> Placement {
    let kv = m.kv(ctx, kv_type, ubatch, parallel);
    let compute = m.compute(ubatch);
    let all_layers = m.layers.saturating_add(1);
    let min_slots = (m.n_used * parallel).clamp(1, m.n_exp.max(1));
    let mode = if m.moe() { c.pool.mode } else { PoolMode::Off };
    let mut why = Vec::new();
    let tier = |t, budget| TierUse {
        tier: t,
        weights: 0,
        experts: 0,
        kv: 0,
        compute: 0,
        base: 0,
        budget,
    };
    let mut vram = tier(Tier::Vram, b.vram);
    let mut ram = tier(Tier::Ram, b.ram);
    ram.base = ENGINE_BASE_RAM + m.checkpoints(kv_type, parallel);
    let model_bytes = m.non_expert + m.expert_total;

    if !use_gpu {
        ram.weights = m.non_expert;
        ram.kv = kv;
        ram.compute = compute;
        let fixed = ram.total();
        let stock_fits = fixed + m.expert_total <= b.ram;
        let pool_on = match mode {
            PoolMode::On => true,
            PoolMode::Off => false,
            PoolMode::Auto => !stock_fits,
        };
        if !pool_on {
            ram.experts = m.expert_total;
            let fits = stock_fits;
            let disk = if fits {
                0
            } else {
                let resident = b.ram.saturating_sub(fixed);
                let frac = 1.0 - (resident as f64 / m.expert_total.max(1) as f64).min(1.0);
                ram.experts = m.expert_total.min(resident);
                (m.expert_read as f64 * frac) as u64
            };
            why.push(Reason {
                topic: "pool",
                choice: "off".into(),
                why: if !m.moe() {
                    "dense model: no experts to pool".into()
                } else if mode == PoolMode::Off {
                    "pool.mode = \"off\" in the config".into()
                } else {
                    format!(
                        "the model ({}) with KV and buffers fits the RAM budget ({}): stock llama.cpp is fastest",
                        human_bytes(model_bytes),
                        human_bytes(b.ram)
                    )
                },
            });
            why.push(Reason {
                topic: "placement",
                choice: "-ngl 0".into(),
                why: "no usable GPU: every layer on the CPU".into(),
            });
            return Placement {
                gpu_layers: 0,
                n_cpu_moe: 0,
                pool: None,
                vram,
                roof: (0, m.non_expert + m.expert_read - disk, 0, disk),
                ram,
                fits,
                why,
            };
        }
        let avail = b.ram.saturating_sub(fixed);
        let (slots, pool_bytes, fits) = ram_slots(m, avail, min_slots);
        ram.experts = pool_bytes;
        let (_, miss) = pool_reads(m, slots, 0);
        why.push(Reason {
            topic: "pool",
            choice: format!("on, {slots} of {} slots per layer in RAM", m.n_exp),
            why: format!(
                "{}: the model ({}) does not fit the RAM budget ({}); after non-expert weights ({}), KV ({}) and buffers, {}; assumed hit rate {:.0}%, misses read from disk",
                if mode == PoolMode::On { "pool.mode = \"on\"" } else { "auto" },
                human_bytes(model_bytes),
                human_bytes(b.ram),
                human_bytes(m.non_expert),
                human_bytes(kv),
                slots_phrase(m, avail, slots, fits),
                assumed_hit_rate(slots, m.n_exp) * 100.0
            ),
        });
        why.push(Reason {
            topic: "placement",
            choice: "-ngl 0".into(),
            why: "no usable GPU: every layer on the CPU; expert tensors stay mapped from the file for prefill".into(),
        });
        return Placement {
            gpu_layers: 0,
            n_cpu_moe: 0,
            pool: Some((slots, Tier::Ram, 0)),
            vram,
            ram,
            roof: (0, m.non_expert + m.expert_read, 0, miss),
            fits,
            why,
        };
    }

    // GPU host. llama.cpp splits the layers over the GPUs and every GPU that computes
    // holds its own compute buffer, so VRAM pays one per GPU.
    let gpus = b.gpus.max(1) as u64;
    let gpu_compute = compute.saturating_mul(gpus);
    let gpu_fixed = m.non_expert + kv + gpu_compute;
    ram.compute = 128 * MIB; // host-side buffers with full offload (stated estimate)
    if gpu_fixed + m.expert_total <= b.vram && mode != PoolMode::On {
        vram.weights = m.non_expert;
        vram.experts = m.expert_total;
        vram.kv = kv;
        vram.compute = gpu_compute;
        why.push(Reason {
            topic: "pool",
            choice: "off".into(),
            why: if m.moe() {
                format!(
                    "the whole model ({}) with KV and buffers fits the VRAM budget ({}): stock llama.cpp is fastest",
                    human_bytes(model_bytes),
                    human_bytes(b.vram)
                )
            } else {
                "dense model: no experts to pool".into()
            },
        });
        why.push(Reason {
            topic: "placement",
            choice: format!("-ngl {}, --n-cpu-moe 0", m.ngl(all_layers)),
            why: "all layers and the output on the GPU".into(),
        });
        let fits = ram.total() <= b.ram;
        return Placement {
            gpu_layers: m.ngl(all_layers),
            n_cpu_moe: 0,
            pool: None,
            vram,
            ram,
            roof: (m.non_expert + m.expert_read, 0, 0, 0),
            fits,
            why,
        };
    }

    if gpu_fixed <= b.vram && m.moe() {
        // Attention and shared weights on the GPU; experts of the first K layers in RAM.
        let room = b.vram - gpu_fixed;
        let layers: Vec<(u32, u64)> = m.layer_experts.iter().map(|(l, x)| (*l, *x)).collect();
        // The smallest K such that experts of layers K.. fit `room`.
        let mut k = layers.len();
        let mut on_gpu = 0u64;
        while k > 0 && on_gpu + layers[k - 1].1 <= room {
            on_gpu += layers[k - 1].1;
            k -= 1;
        }
        // --n-cpu-moe counts block indices: the first K MoE layers' block index + 1.
        let n_cpu_moe = if k == 0 { 0 } else { layers[k - 1].0 + 1 };
        let cpu_experts: u64 = layers[..k].iter().map(|(_, x)| x).sum();
        let cpu_read: u64 = layers[..k]
            .iter()
            .map(|(l, _)| m.layer_experts_one(*l) * u64::from(m.n_used))
            .sum();
        ram.compute = compute;
        let stock_ram_fits = ram.total() + cpu_experts <= b.ram;
        if mode != PoolMode::On && (stock_ram_fits || mode == PoolMode::Off) {
            vram.weights = m.non_expert;
            vram.experts = on_gpu;
            vram.kv = kv;
            vram.compute = gpu_compute;
            let resident = b.ram.saturating_sub(ram.total());
            ram.experts = cpu_experts.min(resident);
            let disk = if stock_ram_fits {
                0
            } else {
                let frac = 1.0 - (resident as f64 / cpu_experts.max(1) as f64).min(1.0);
                (cpu_read as f64 * frac) as u64
            };
            why.push(Reason {
                topic: "pool",
                choice: "off".into(),
                why: if mode == PoolMode::Off {
                    "pool.mode = \"off\" in the config".into()
                } else {
                    format!(
                        "the model ({}) fits VRAM ({}) and RAM ({}) together: stock llama.cpp with experts split between them is fastest",
                        human_bytes(model_bytes),
                        human_bytes(b.vram),
                        human_bytes(b.ram)
                    )
                },
            });
            why.push(Reason {
                topic: "placement",
                choice: format!("-ngl {}, --n-cpu-moe {n_cpu_moe}", m.ngl(all_layers)),
                why: format!(
                    "non-expert weights ({}), KV ({}) and buffers on the GPU; the experts of the last {} MoE layers ({}) fill the remaining VRAM, the first {n_cpu_moe} layers' experts ({}) stay in RAM",
                    human_bytes(m.non_expert),
                    human_bytes(kv),
                    layers.len() - k,
                    human_bytes(on_gpu),
                    human_bytes(cpu_experts)
                ),
            });
            return Placement {
                gpu_layers: m.ngl(all_layers),
                n_cpu_moe,
                pool: None,
                vram,
                roof: (
                    m.non_expert + (m.expert_read - cpu_read),
                    cpu_read - disk,
                    0,
                    disk,
                ),
                ram,
                fits: stock_ram_fits,
                why,
            };
        }
        // Pool: the engine keeps its slots in RAM (slots in VRAM are not built yet), so
        // every MoE layer's experts are computed on the CPU from the slots; attention,
        // shared weights, KV and buffers stay on the GPU.
        vram.weights = m.non_expert;
        vram.experts = 0;
        vram.kv = kv;
        vram.compute = gpu_compute;
        let avail = b.ram.saturating_sub(ram.total());
        let (slots, pool_bytes, slots_fit) = ram_slots(m, avail, min_slots);
        ram.experts = pool_bytes;
        let (_, miss) = pool_reads(m, slots, 0);
        let fits = slots_fit && ram.total() <= b.ram;
        why.push(Reason {
            topic: "pool",
            choice: format!("on, {slots} of {} slots per layer in RAM", m.n_exp),
            why: format!(
                "{}: the model ({}) does not fit VRAM ({}) and RAM ({}) together; the engine's pool keeps its slots in RAM (VRAM slots are not built yet), where {} (assumed hit rate {:.0}%), misses read from disk",
                if mode == PoolMode::On { "pool.mode = \"on\"" } else { "auto" },
                human_bytes(model_bytes),
                human_bytes(b.vram),
                human_bytes(b.ram),
                slots_phrase(m, avail, slots, slots_fit),
                assumed_hit_rate(slots, m.n_exp) * 100.0
            ),
        });
        let moe_layers = m.layer_experts.keys().next_back().map_or(0, |l| l + 1);
        why.push(Reason {
            topic: "placement",
            choice: format!("-ngl {}, --n-cpu-moe {moe_layers}", m.ngl(all_layers)),
            why: "all layers on the GPU except the experts: they stay in the file on the host and the pool's RAM slots serve them to the CPU".into(),
        });
        return Placement {
            gpu_layers: m.ngl(all_layers),
            n_cpu_moe: moe_layers,
            pool: Some((slots, Tier::Ram, 0)),
            vram,
            ram,
            roof: (m.non_expert, m.expert_read - miss, 0, miss),
            fits,
            why,
        };
    }

    // The non-expert weights do not fit VRAM: offload what fits, layer by layer; every
    // expert on the CPU.
    let per_layer = (m.non_expert / u64::from(all_layers)).max(1);
    // (a layer's KV counted as a full-attention layer's: the offloaded last layers may
    // be those, not the sliding-window ones)
    let kv_per_layer = m.kv_of_layers(1, ctx, kv_type, ubatch, parallel);
    let room = b.vram.saturating_sub(gpu_compute);
    let g = ((room / (per_layer + kv_per_layer)).min(u64::from(m.layers))) as u32;
    // At most what there is (per_layer is at least 1 byte, more than a tiny model has).
    vram.weights = (per_layer * u64::from(g)).min(m.non_expert);
    vram.kv = m.kv_of_layers(g, ctx, kv_type, ubatch, parallel);
    // the GPUs that get layers (at most one per offloaded layer) hold a compute buffer each
    vram.compute = compute.saturating_mul(gpus.min(u64::from(g)));
    ram.weights = m.non_expert - vram.weights;
    ram.kv = m.kv_of_layers(m.layers - g, ctx, kv_type, ubatch, parallel);
    ram.compute = compute;
    let moe_layers = m.layer_experts.keys().next_back().map_or(0, |l| l + 1);
    let fixed = ram.total();
    let stock_fits = fixed + m.expert_total <= b.ram;
    let pool_on = m.moe()
        && match mode {
            PoolMode::On => true,
            PoolMode::Off => false,
            PoolMode::Auto => !stock_fits,
        };
    why.push(Reason {
        topic: "placement",
        choice: format!("-ngl {}, --n-cpu-moe {moe_layers}", m.ngl(g)),
        why: format!(
            "the non-expert weights ({}) and KV ({}) do not fit the VRAM budget ({}): {g} of {all_layers} layers' attention on the GPU, every expert on the CPU",
            human_bytes(m.non_expert),
            human_bytes(kv),
            human_bytes(b.vram)
        ),
    });
    let vram_read = vram.weights;
    if !pool_on {
        let resident = b.ram.saturating_sub(fixed);
        ram.experts = m.expert_total.min(resident);
        let frac = 1.0 - (resident as f64 / m.expert_total.max(1) as f64).min(1.0);
        let disk = (m.expert_read as f64 * frac) as u64;
        why.push(Reason {
            topic: "pool",
            choice: "off".into(),
            why: if !m.moe() {
                "dense model: no experts to pool".into()
            } else if mode == PoolMode::Off {
                "pool.mode = \"off\" in the config".into()
            } else {
                "the experts fit the RAM budget: stock llama.cpp is fastest".into()
            },
        });
        return Placement {
            gpu_layers: m.ngl(g),
            n_cpu_moe: moe_layers,
            pool: None,
            vram,
            roof: (vram_read, ram.weights + m.expert_read - disk, 0, disk),
            ram,
            fits: stock_fits,
            why,
        };
    }
    let avail = b.ram.saturating_sub(fixed);
    let (slots, pool_bytes, fits) = ram_slots(m, avail, min_slots);
    ram.experts = pool_bytes;
    let (_, miss) = pool_reads(m, slots, 0);
    why.push(Reason {
        topic: "pool",
        choice: format!("on, {slots} of {} slots per layer in RAM", m.n_exp),
        why: format!(
            "the experts ({}) do not fit the RAM budget ({}); {} (assumed hit rate {:.0}%), misses from disk",
            human_bytes(m.expert_total),
            human_bytes(b.ram),
            slots_phrase(m, avail, slots, fits),
            assumed_hit_rate(slots, m.n_exp) * 100.0
        ),
    });
    Placement {
        gpu_layers: m.ngl(g),
        n_cpu_moe: moe_layers,
        pool: Some((slots, Tier::Ram, 0)),
        vram,
        roof: (vram_read, ram.weights + m.expert_read, 0, miss),
        ram,
        fits,
        why,
    }
}

/// ", plus ... read buffers" and, when the slots are fewer than the experts, the staging
/// area of one layer's experts.
fn staging_note(m: &Model, slots: u32) -> String {
    if slots < m.n_exp {
        format!(
            ", plus a staging area of one layer's experts ({}) for prompts and read buffers ({})",
            human_bytes(m.staging()),
            human_bytes(POOL_IO_BYTES)
        )
    } else {
        format!(", plus read buffers ({})", human_bytes(POOL_IO_BYTES))
    }
}

/// What `avail` bytes of RAM give the pool: "X hold N experts per layer (...)", or, when
/// they cannot hold the minimum N, how much that minimum needs (the plan is then over
/// budget and says so in its warnings).
fn slots_phrase(m: &Model, avail: u64, slots: u32, fits: bool) -> String {
    let what = format!(
        "{slots} experts per layer (one expert in every layer is {}){}",
        human_bytes(m.one_expert_all_layers),
        staging_note(m, slots)
    );
    if fits {
        format!("{} hold {what}", human_bytes(avail))
    } else {
        let need = u64::from(slots) * m.one_expert_all_layers
            + if slots < m.n_exp { m.staging() } else { 0 }
            + POOL_IO_BYTES;
        format!(
            "{} cannot hold the fewest slots a token needs, {what}: {} in all, so the plan is over budget",
            human_bytes(avail),
            human_bytes(need)
        )
    }
}

/// Read and conversion buffers the engine's pool holds at most besides its slots and
/// staging area: the pool keeps at most 128 MiB of read buffers (its arena,
/// `MAX_READ_MEMORY` in `ffi/src/io.rs`, with staging reads bounded by
/// `STAGE_READ_BUDGET` in `ffi/src/pool.rs`) and the engine's conversion queue at most
/// 64 MiB (patch 0002).
pub const POOL_IO_BYTES: u64 = 192 << 20;

/// Slots per layer the pool gets from `avail` bytes of RAM: (slots, bytes the pool holds,
/// whether at least `min_slots` fit). The pool's read and conversion buffers
/// ([`POOL_IO_BYTES`]) come out of `avail` first; with fewer slots than experts the
/// engine also keeps a staging area of one layer's experts (prompts too large for the
/// slots are computed from it).
fn ram_slots(m: &Model, avail: u64, min_slots: u32) -> (u32, u64, bool) {
    let one = m.one_expert_all_layers.max(1);
    let avail = avail.saturating_sub(POOL_IO_BYTES);
    if avail / one >= u64::from(m.n_exp) {
        return (m.n_exp, u64::from(m.n_exp) * one + POOL_IO_BYTES, true);
    }
    let staging = m.staging();
    let fit_slots = (avail.saturating_sub(staging) / one).min(u64::from(m.n_exp)) as u32;
    let slots = fit_slots.max(min_slots);
    // With a slot for every expert (the fewest a token needs can be all of them) the
    // engine keeps no staging area.
    let staging = if slots < m.n_exp { staging } else { 0 };
    (
        slots,
        u64::from(slots) * one + staging + POOL_IO_BYTES,
        fit_slots >= min_slots,
    )
}

impl Model {
    /// The engine's staging area: the experts of the largest MoE layer.
    fn staging(&self) -> u64 {
        self.layer_experts.values().copied().max().unwrap_or(0)
    }

    fn layer_experts_one(&self, layer: u32) -> u64 {
        self.layer_experts.get(&layer).copied().unwrap_or(0) / u64::from(self.n_exp.max(1))
    }
}

/// `args` as they may be shown (logs, the status document, `expertd plan`): the value
/// of `--api-key` (given in `engine.extra_args`) replaced by `***`.
pub fn shown_args(args: &[String]) -> Vec<String> {
    let mut out = Vec::with_capacity(args.len());
    let mut secret_next = false;
    for a in args {
        if secret_next {
            out.push("***".to_string());
            secret_next = false;
        } else if a == "--api-key" {
            out.push(a.clone());
            secret_next = true;
        } else if a.starts_with("--api-key=") {
            out.push("--api-key=***".to_string());
        } else {
            out.push(a.clone());
        }
    }
    out
}

/// The llama-server arguments for a plan under a config: model, address, the plan's
/// choices, the pool's flags when it is on, then `engine.extra_args` (last, so they win).
pub fn engine_args(p: &Plan, c: &Config) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |k: &str, v: String| {
        a.push(k.to_string());
        a.push(v);
    };
    push("--model", p.model_path.display().to_string());
    push("--host", c.engine.host.clone());
    push("--port", c.engine.port.to_string());
    push("--fit", "off".into());
    push("--n-gpu-layers", p.gpu_layers.to_string());
    if p.n_cpu_moe > 0 {
        push("--n-cpu-moe", p.n_cpu_moe.to_string());
    }
    push("--ctx-size", p.ctx_size.to_string());
    push("--cache-type-k", p.kv_type.as_str().into());
    push("--cache-type-v", p.kv_type.as_str().into());
    push(
        "--flash-attn",
        if p.flash_attn { "on" } else { "auto" }.into(),
    );
    push("--threads", p.threads.to_string());
    push("--threads-batch", p.threads_batch.to_string());
    push("--batch-size", p.batch_size.to_string());
    push("--ubatch-size", p.ubatch_size.to_string());
    push("--parallel", p.parallel.to_string());
    if p.ctx_checkpoints > 0 {
        push("--ctx-checkpoints", p.ctx_checkpoints.to_string());
    }
    push("--cache-ram", p.prompt_cache_mib.to_string());
    if let Some(pool) = &p.pool {
        push("--expert-pool-slots", pool.slots.to_string());
        push("--expert-pool-mib", pool.cache_mib.to_string());
        push("--expert-pool-policy", pool.policy.clone());
        push(
            "--expert-pool-prefetch",
            if pool.prefetch { "on" } else { "off" }.into(),
        );
        push("--expert-pool-stats", pool.stats_path.display().to_string());
    }
    a.push("--metrics".into());
    a.extend(c.engine.extra_args.iter().cloned());
    a
}

impl fmt::Display for Plan {
    /// The human form `expertd plan` prints.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "model: {}", self.model_path.display())?;
        match &self.pool {
            None => writeln!(f, "pool: off")?,
            Some(p) => writeln!(
                f,
                "pool: on, {} slots per layer in {} ({} layers), RAM cache {} MiB, policy {}, prefetch {}",
                p.slots,
                p.slot_tier.as_str(),
                p.slots_per_layer.len(),
                p.cache_mib,
                p.policy,
                if p.prefetch { "on" } else { "off" }
            )?,
        }
        writeln!(
            f,
            "engine: -ngl {} --n-cpu-moe {} -c {} kv {} threads {}/{} -b {} -ub {} --cache-ram {}",
            self.gpu_layers,
            self.n_cpu_moe,
            self.ctx_size,
            self.kv_type.as_str(),
            self.threads,
            self.threads_batch,
            self.batch_size,
            self.ubatch_size,
            self.prompt_cache_mib
        )?;
        for t in &self.memory {
            writeln!(
                f,
                "memory {}: {} of {} budget (weights {}, experts {}, kv {}, compute {}, base {})",
                t.tier.as_str(),
                human_bytes(t.total()),
                human_bytes(t.budget),
                human_bytes(t.weights),
                human_bytes(t.experts),
                human_bytes(t.kv),
                human_bytes(t.compute),
                human_bytes(t.base)
            )?;
        }
        writeln!(
            f,
            "predicted decode: {:.1} tok/s (roofline at the assumed hit rate)",
            self.predicted_tok_s
        )?;
        writeln!(f, "reasons:")?;
        for r in &self.reasons {
            writeln!(f, "  {}: {} — {}", r.topic, r.choice, r.why)?;
        }
        for w in &self.warnings {
            writeln!(f, "warning: {w}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::shown_args;

    #[test]
    fn the_api_key_is_not_shown() {
        let args: Vec<String> = [
            "-m",
            "m.gguf",
            "--api-key",
            "k1,k2",
            "--api-key=k3",
            "--port",
            "8080",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            shown_args(&args),
            [
                "-m",
                "m.gguf",
                "--api-key",
                "***",
                "--api-key=***",
                "--port",
                "8080"
            ]
        );
    }
}
