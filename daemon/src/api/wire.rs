//! The wire documents of the status API (and `expertd plan --json`). The only place that
//! derives `Serialize` for daemon state: internal types stay plain and are mapped here.
//!
//! # Status document (`GET /status`, `expertd status --json`), schema 1
//!
//! ```text
//! {
//!   "schema": 1,
//!   "daemon": { "version", "pid", "started_at" (unix s), "uptime_s", "state": "running"|"stopping",
//!               "config_path", "socket" (served), "socket_error": string|null (why the
//!               config's socket is not the one served), "reloads" },
//!   "host":   null | { "total_ram", "cgroup_memory_limit", "usable_cores", "disk_read_bytes_per_sec",
//!                      "gpus": [{index, name, total_memory, free_memory}] },   // the last probe
//!   "config": { "path", "error": string|null },          // error: the config on disk is not applied
//!   "model":  { "source" (as written), "path" (GGUF; the first file of a split model),
//!               "splits": [every file of a split model] (absent for a model in one file),
//!               "ollama": null|{name, digest, server_version, note} },
//!   "engine": { "state": "stopped"|"starting"|"serving"|"restarting"|"crash_loop"|"stopping",
//!               "pid": int|null, "host", "port", "binary", "restarts" (after crashes),
//!               "replans" (restarts for a changed plan), "recent_crashes", "started_at", "ready_at",
//!               "load_seconds", "last_exit", "next_start_at" },
//!   "last_error": string|null, "last_error_at": unix s|null,
//!   "plan": PlanDoc|null,
//!   "pool": null | { "available": bool, "hits", "misses", "hit_rate"|null, "evictions", "bytes_read",
//!                    "stall_seconds", "prefetch_issued", "prefetch_used", "not_fit", "errors",
//!                    "updated_at", "layers": [{layer, hits, misses, hit_rate, ...}], "raw": <file> },
//!   "decode": null | { "tokens_per_second", "tokens_predicted_total", "prompt_tokens_per_second" }
//! }
//! ```
//! Scripts may rely on `engine.state` (`serving` once the engine answers `/health`),
//! `engine.pid`, `engine.port`, `engine.restarts`, `last_error` and `plan`; fields are
//! only ever added within a schema number.
//!
//! # Plan document
//! `{ model, pool: null|{slots, slots_per_layer, slot_tier, cache_mib, policy, prefetch,
//! assumed_hit_rate, assumed_ram_hit_rate, stats_path}, gpu_layers, n_cpu_moe, ctx_size,
//! kv_type, flash_attn, threads, threads_batch, batch_size, ubatch_size, parallel,
//! prompt_cache_mib, memory: [{tier, total, budget, weights, experts, kv, compute, base}], roofline: {...},
//! predicted_tok_s, args, reasons: [{topic, choice, why}], warnings, within_budget }`
//! (byte counts are integers, rates bytes/s).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::plan::Plan;
use crate::supervisor::Status;
use crate::supervisor::stats::{EngineMetrics, PoolCounters};

/// Version of the status document.
pub const SCHEMA: u32 = 1;

fn unix(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| (d.as_millis() as f64) / 1000.0)
        .unwrap_or(0.0)
}

/// The status document (schema above).
#[derive(Serialize)]
pub struct StatusDoc {
    pub schema: u32,
    pub daemon: DaemonDoc,
    pub host: Option<HostDoc>,
    pub config: ConfigDoc,
    pub model: ModelDoc,
    pub engine: EngineDoc,
    pub last_error: Option<String>,
    pub last_error_at: Option<f64>,
    pub plan: Option<PlanDoc>,
    pub pool: Option<PoolDoc>,
    pub decode: Option<DecodeDoc>,
}

/// `daemon`: the daemon process.
#[derive(Serialize)]
pub struct DaemonDoc {
    pub version: &'static str,
    pub pid: u32,
    pub started_at: f64,
    pub uptime_s: f64,
    pub state: &'static str,
    pub config_path: Option<String>,
    pub socket: String,
    pub socket_error: Option<String>,
    pub reloads: u32,
}

/// `host`: what the last probe saw.
#[derive(Serialize)]
pub struct HostDoc {
    pub total_ram: u64,
    pub cgroup_memory_limit: Option<u64>,
    pub usable_cores: u32,
    pub disk_read_bytes_per_sec: Option<u64>,
    pub gpus: Vec<GpuDoc>,
}

/// One GPU of `host.gpus`.
#[derive(Serialize)]
pub struct GpuDoc {
    pub index: u32,
    pub name: String,
    pub total_memory: u64,
    pub free_memory: u64,
}

/// `config`: the file and whether it is applied.
#[derive(Serialize)]
pub struct ConfigDoc {
    pub path: Option<String>,
    pub error: Option<String>,
}

/// `model`: as configured and as resolved.
#[derive(Serialize)]
pub struct ModelDoc {
    pub source: String,
    pub path: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub splits: Vec<String>,
    pub ollama: Option<OllamaDoc>,
}

/// `model.ollama`: how an `ollama:` name was resolved.
#[derive(Serialize)]
pub struct OllamaDoc {
    pub name: String,
    pub digest: String,
    pub server_version: Option<String>,
    pub architecture: Option<String>,
    pub note: Option<String>,
}

/// `engine`: the llama-server process.
#[derive(Serialize)]
pub struct EngineDoc {
    pub state: &'static str,
    pub pid: Option<u32>,
    pub host: String,
    pub port: u16,
    pub binary: Option<String>,
    pub restarts: u32,
    pub replans: u32,
    pub recent_crashes: u32,
    pub started_at: Option<f64>,
    pub ready_at: Option<f64>,
    pub load_seconds: Option<f64>,
    pub last_exit: Option<String>,
    pub next_start_at: Option<f64>,
}

/// `pool`: the expert pool's published statistics.
#[derive(Serialize)]
pub struct PoolDoc {
    /// Whether the engine has published stats yet.
    pub available: bool,
    pub hits: u64,
    pub misses: u64,
    pub hit_rate: Option<f64>,
    pub evictions: u64,
    pub bytes_read: u64,
    pub stall_seconds: f64,
    pub prefetch_issued: u64,
    pub prefetch_used: u64,
    pub not_fit: u64,
    /// Failed pool requests, stage calls and prefetch fills (read errors, a changed
    /// model file); a failed request or stage call fails a client's request.
    pub errors: u64,
    pub updated_at: Option<f64>,
    pub layers: Vec<PoolLayerDoc>,
    pub raw: serde_json::Value,
}

/// One layer of `pool.layers`.
#[derive(Serialize)]
pub struct PoolLayerDoc {
    pub layer: u32,
    pub hits: u64,
    pub misses: u64,
    pub hit_rate: Option<f64>,
    pub evictions: u64,
    pub bytes_read: u64,
    pub stall_seconds: f64,
}

/// `decode`: the engine's own speed counters.
#[derive(Serialize)]
pub struct DecodeDoc {
    pub tokens_per_second: Option<f64>,
    pub tokens_predicted_total: Option<f64>,
    pub prompt_tokens_per_second: Option<f64>,
}

/// The plan document (status `plan`, `expertd plan --json`).
#[derive(Serialize)]
pub struct PlanDoc {
    pub model: String,
    pub pool: Option<PoolPlanDoc>,
    pub gpu_layers: u32,
    pub n_cpu_moe: u32,
    pub ctx_size: u32,
    pub kv_type: &'static str,
    pub flash_attn: bool,
    pub threads: u32,
    pub threads_batch: u32,
    pub batch_size: u32,
    pub ubatch_size: u32,
    pub parallel: u32,
    pub prompt_cache_mib: u64,
    pub memory: Vec<TierDoc>,
    pub roofline: RooflineDoc,
    pub predicted_tok_s: f64,
    pub args: Vec<String>,
    pub reasons: Vec<ReasonDoc>,
    pub warnings: Vec<String>,
    pub within_budget: bool,
}

/// `plan.pool`.
#[derive(Serialize)]
pub struct PoolPlanDoc {
    pub slots: u32,
    pub slots_per_layer: std::collections::BTreeMap<u32, u32>,
    pub slot_tier: &'static str,
    pub cache_mib: u64,
    pub policy: String,
    pub prefetch: bool,
    pub assumed_hit_rate: f64,
    pub assumed_ram_hit_rate: f64,
    pub stats_path: String,
}

/// One tier of `plan.memory`.
#[derive(Serialize)]
pub struct TierDoc {
    pub tier: &'static str,
    pub total: u64,
    pub budget: u64,
    pub weights: u64,
    pub experts: u64,
    pub kv: u64,
    pub compute: u64,
    pub base: u64,
}

/// `plan.roofline`: bytes per token and rates.
#[derive(Serialize)]
pub struct RooflineDoc {
    pub vram_bytes_per_token: u64,
    pub ram_bytes_per_token: u64,
    pub pcie_bytes_per_token: u64,
    pub disk_bytes_per_token: u64,
    pub vram_bw: u64,
    pub ram_bw: u64,
    pub pcie_bw: u64,
    pub disk_bw: u64,
    pub seconds_per_token: f64,
}

/// One of `plan.reasons`.
#[derive(Serialize)]
pub struct ReasonDoc {
    pub topic: &'static str,
    pub choice: String,
    pub why: String,
}

/// Rounds for stable, readable JSON.
fn r3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

impl From<&Plan> for PlanDoc {
    fn from(p: &Plan) -> PlanDoc {
        PlanDoc {
            model: p.model_path.display().to_string(),
            pool: p.pool.as_ref().map(|pp| PoolPlanDoc {
                slots: pp.slots,
                slots_per_layer: pp.slots_per_layer.clone(),
                slot_tier: pp.slot_tier.as_str(),
                cache_mib: pp.cache_mib,
                policy: pp.policy.clone(),
                prefetch: pp.prefetch,
                assumed_hit_rate: r3(pp.assumed_hit_rate),
                assumed_ram_hit_rate: r3(pp.assumed_ram_hit_rate),
                stats_path: pp.stats_path.display().to_string(),
            }),
            gpu_layers: p.gpu_layers,
            n_cpu_moe: p.n_cpu_moe,
            ctx_size: p.ctx_size,
            kv_type: p.kv_type.as_str(),
            flash_attn: p.flash_attn,
            threads: p.threads,
            threads_batch: p.threads_batch,
            batch_size: p.batch_size,
            ubatch_size: p.ubatch_size,
            parallel: p.parallel,
            prompt_cache_mib: p.prompt_cache_mib,
            memory: p
                .memory
                .iter()
                .map(|t| TierDoc {
                    tier: t.tier.as_str(),
                    total: t.total(),
                    budget: t.budget,
                    weights: t.weights,
                    experts: t.experts,
                    kv: t.kv,
                    compute: t.compute,
                    base: t.base,
                })
                .collect(),
            roofline: RooflineDoc {
                vram_bytes_per_token: p.roofline.vram_bytes,
                ram_bytes_per_token: p.roofline.ram_bytes,
                pcie_bytes_per_token: p.roofline.pcie_bytes,
                disk_bytes_per_token: p.roofline.disk_bytes,
                vram_bw: p.roofline.vram_bw,
                ram_bw: p.roofline.ram_bw,
                pcie_bw: p.roofline.pcie_bw,
                disk_bw: p.roofline.disk_bw,
                seconds_per_token: (p.roofline.seconds_per_token * 1e6).round() / 1e6,
            },
            predicted_tok_s: r3(p.predicted_tok_s),
            args: crate::plan::shown_args(&p.args),
            reasons: p
                .reasons
                .iter()
                .map(|r| ReasonDoc {
                    topic: r.topic,
                    choice: r.choice.clone(),
                    why: r.why.clone(),
                })
                .collect(),
            warnings: p.warnings.clone(),
            within_budget: p.within_budget,
        }
    }
}

fn pool_layer(layer: u32, c: &PoolCounters) -> PoolLayerDoc {
    PoolLayerDoc {
        layer,
        hits: c.hits,
        misses: c.misses,
        hit_rate: c.hit_rate().map(r3),
        evictions: c.evictions,
        bytes_read: c.bytes_read,
        stall_seconds: c.stall_ns as f64 / 1e9,
    }
}

/// Builds the status document.
pub fn status_doc(
    s: &Status,
    m: &EngineMetrics,
    socket: &std::path::Path,
    socket_error: Option<&str>,
) -> StatusDoc {
    let now = SystemTime::now();
    let e = &s.engine;
    let pool = match (&m.pool, s.plan.as_ref().and_then(|p| p.pool.as_ref())) {
        (Some(ps), _) => Some(PoolDoc {
            available: true,
            hits: ps.total.hits,
            misses: ps.total.misses,
            hit_rate: ps.total.hit_rate().map(r3),
            evictions: ps.total.evictions,
            bytes_read: ps.total.bytes_read,
            stall_seconds: ps.total.stall_ns as f64 / 1e9,
            prefetch_issued: ps.total.prefetch_issued,
            prefetch_used: ps.total.prefetch_used,
            not_fit: ps.total.not_fit,
            errors: ps.total.errors,
            updated_at: ps.modified.map(unix),
            layers: ps.layers.iter().map(|(l, c)| pool_layer(*l, c)).collect(),
            raw: ps.raw.clone(),
        }),
        (None, Some(_)) => Some(PoolDoc {
            available: false,
            hits: 0,
            misses: 0,
            hit_rate: None,
            evictions: 0,
            bytes_read: 0,
            stall_seconds: 0.0,
            prefetch_issued: 0,
            prefetch_used: 0,
            not_fit: 0,
            errors: 0,
            updated_at: None,
            layers: Vec::new(),
            raw: serde_json::Value::Null,
        }),
        (None, None) => None,
    };
    StatusDoc {
        schema: SCHEMA,
        daemon: DaemonDoc {
            version: env!("CARGO_PKG_VERSION"),
            pid: std::process::id(),
            started_at: unix(s.started_at),
            uptime_s: r3(now
                .duration_since(s.started_at)
                .unwrap_or(Duration::ZERO)
                .as_secs_f64()),
            state: if s.stopping { "stopping" } else { "running" },
            config_path: s.config_path.as_ref().map(|p| p.display().to_string()),
            socket: socket.display().to_string(),
            socket_error: socket_error.map(String::from),
            reloads: s.reloads,
        },
        host: s.snapshot.as_ref().map(|snap| HostDoc {
            total_ram: snap.host.total_ram,
            cgroup_memory_limit: snap.host.cgroup_memory_limit,
            usable_cores: snap.host.usable_cores,
            disk_read_bytes_per_sec: snap.disk.as_ref().map(|d| d.read_bytes_per_sec),
            gpus: snap
                .gpus
                .iter()
                .map(|g| GpuDoc {
                    index: g.index,
                    name: g.name.clone(),
                    total_memory: g.total_memory,
                    free_memory: g.free_memory,
                })
                .collect(),
        }),
        config: ConfigDoc {
            path: s.config_path.as_ref().map(|p| p.display().to_string()),
            error: s.config_error.clone(),
        },
        model: ModelDoc {
            source: s.model_source.clone(),
            path: s.model_path.as_ref().map(|p| p.display().to_string()),
            splits: s
                .snapshot
                .as_ref()
                .map(|snap| {
                    snap.model
                        .splits
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect()
                })
                .unwrap_or_default(),
            ollama: s.ollama.as_ref().map(|o| OllamaDoc {
                name: o.reference.short_name(),
                digest: o.digest.clone(),
                server_version: o.server_version.clone(),
                architecture: o.architecture.clone(),
                note: o.note.clone(),
            }),
        },
        engine: EngineDoc {
            state: e.state.as_str(),
            pid: e.pid,
            host: e.host.clone(),
            port: e.port,
            binary: e.binary.as_ref().map(|b| b.display().to_string()),
            restarts: e.restarts,
            replans: e.replans,
            recent_crashes: e.recent_crashes,
            started_at: e.started_at.map(unix),
            ready_at: e.ready_at.map(unix),
            load_seconds: e.load_time.map(|d| r3(d.as_secs_f64())),
            last_exit: e.last_exit.clone(),
            next_start_at: e.next_start_at.map(unix),
        },
        last_error: s.last_error.as_ref().map(|(_, m)| m.clone()),
        last_error_at: s.last_error.as_ref().map(|(t, _)| unix(*t)),
        plan: s.plan.as_deref().map(PlanDoc::from),
        pool,
        decode: m.decode.as_ref().map(|d| DecodeDoc {
            tokens_per_second: d.tokens_per_second,
            tokens_predicted_total: d.tokens_predicted_total,
            prompt_tokens_per_second: d.prompt_tokens_per_second,
        }),
    }
}

/// Prometheus text exposition of the status.
pub fn metrics_text(s: &Status, m: &EngineMetrics) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let mut g = |name: &str, help: &str, kind: &str, samples: &[(String, f64)]| {
        let _ = writeln!(o, "# HELP {name} {help}");
        let _ = writeln!(o, "# TYPE {name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(o, "{name}{labels} {v}");
        }
    };
    let one = |v: f64| vec![(String::new(), v)];
    let e = &s.engine;
    g(
        "expertd_up",
        "The daemon answers (always 1).",
        "gauge",
        &one(1.0),
    );
    g(
        "expertd_uptime_seconds",
        "Seconds since the daemon started.",
        "gauge",
        &one(SystemTime::now()
            .duration_since(s.started_at)
            .unwrap_or(Duration::ZERO)
            .as_secs_f64()),
    );
    let states = [
        "stopped",
        "starting",
        "serving",
        "restarting",
        "crash_loop",
        "stopping",
    ];
    let state_samples: Vec<(String, f64)> = states
        .iter()
        .map(|st| {
            (
                format!("{{state=\"{st}\"}}"),
                if e.state.as_str() == *st { 1.0 } else { 0.0 },
            )
        })
        .collect();
    g(
        "expertd_engine_state",
        "1 for the engine's current state.",
        "gauge",
        &state_samples,
    );
    g(
        "expertd_engine_serving",
        "1 when the engine answers /health.",
        "gauge",
        &one(if e.state.as_str() == "serving" {
            1.0
        } else {
            0.0
        }),
    );
    g(
        "expertd_engine_restarts_total",
        "Engine restarts after crashes.",
        "counter",
        &one(e.restarts as f64),
    );
    g(
        "expertd_engine_replans_total",
        "Engine restarts because the plan changed.",
        "counter",
        &one(e.replans as f64),
    );
    if let Some(l) = e.load_time {
        g(
            "expertd_engine_load_seconds",
            "Start to first healthy answer of the current engine.",
            "gauge",
            &one(l.as_secs_f64()),
        );
    }
    g(
        "expertd_config_error",
        "1 when the config on disk is not applied.",
        "gauge",
        &one(if s.config_error.is_some() { 1.0 } else { 0.0 }),
    );
    if let Some(p) = &s.plan {
        g(
            "expertd_plan_pool_enabled",
            "1 when the plan runs the expert pool.",
            "gauge",
            &one(if p.pool.is_some() { 1.0 } else { 0.0 }),
        );
        if let Some(pp) = &p.pool {
            g(
                "expertd_plan_pool_slots",
                "Expert pool slots per MoE layer.",
                "gauge",
                &one(pp.slots as f64),
            );
        }
        g(
            "expertd_plan_predicted_tokens_per_second",
            "Roofline prediction of decode speed.",
            "gauge",
            &one(p.predicted_tok_s),
        );
        let mem: Vec<(String, f64)> = p
            .memory
            .iter()
            .map(|t| {
                (
                    format!("{{tier=\"{}\"}}", t.tier.as_str()),
                    t.total() as f64,
                )
            })
            .collect();
        g(
            "expertd_plan_memory_bytes",
            "Predicted memory per tier.",
            "gauge",
            &mem,
        );
        let bud: Vec<(String, f64)> = p
            .memory
            .iter()
            .map(|t| (format!("{{tier=\"{}\"}}", t.tier.as_str()), t.budget as f64))
            .collect();
        g(
            "expertd_plan_budget_bytes",
            "Memory budget per tier.",
            "gauge",
            &bud,
        );
    }
    if let Some(ps) = &m.pool {
        let t = &ps.total;
        g(
            "expertd_pool_hits_total",
            "Expert pool hits (experts found in a slot, ready or being filled).",
            "counter",
            &one(t.hits as f64),
        );
        g(
            "expertd_pool_misses_total",
            "Expert pool misses.",
            "counter",
            &one(t.misses as f64),
        );
        g(
            "expertd_pool_evictions_total",
            "Expert pool evictions.",
            "counter",
            &one(t.evictions as f64),
        );
        g(
            "expertd_pool_read_bytes_total",
            "Bytes the pool read from the model file: misses, staged experts and read-ahead.",
            "counter",
            &one(t.bytes_read as f64),
        );
        g(
            "expertd_pool_stall_seconds_total",
            "Time the engine waited for expert reads.",
            "counter",
            &one(t.stall_ns as f64 / 1e9),
        );
        g(
            "expertd_pool_errors_total",
            "Failed expert pool requests, stage calls and prefetch fills (read errors, a changed model file).",
            "counter",
            &one(t.errors as f64),
        );
        if let Some(h) = t.hit_rate() {
            g(
                "expertd_pool_hit_ratio",
                "hits / (hits + misses).",
                "gauge",
                &one(h),
            );
        }
    }
    if let Some(d) = &m.decode
        && let Some(v) = d.tokens_per_second
    {
        g(
            "expertd_decode_tokens_per_second",
            "The engine's average decode speed since it started (from its counters).",
            "gauge",
            &one(v),
        );
    }
    o
}
