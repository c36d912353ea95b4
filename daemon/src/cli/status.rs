//! `expertd status`: ask the running daemon over its unix socket.
//!
//! Exit codes: 0 the daemon answered (whatever the engine's state); 69 (EX_UNAVAILABLE)
//! no daemon answers on the socket(s).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

use crate::config::{Config, ConfigEnv, human_bytes};

/// No daemon answers (sysexits EX_UNAVAILABLE).
pub const EXIT_UNAVAILABLE: u8 = 69;
/// A daemon's socket exists but this user may not connect to it (sysexits EX_NOPERM).
pub const EXIT_NOPERM: u8 = 77;

/// Arguments of `expertd status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Print the status document as JSON (schema: see `expertd::api::wire`).
    #[arg(long)]
    pub json: bool,
    /// Config file (to find the socket). Default: $EXPERTD_CONFIG, else /etc/expertd/expertd.toml.
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Print the Prometheus metrics instead.
    #[arg(long, conflicts_with = "json")]
    pub metrics: bool,
}

/// The sockets to try: from the config; if the config cannot be loaded (the daemon may
/// still run with an earlier valid one), its `socket` key if readable, else the defaults.
fn sockets(args: &StatusArgs) -> Vec<PathBuf> {
    let loc = crate::config::locate(
        args.config.as_deref(),
        std::env::var(crate::config::CONFIG_ENV).ok().as_deref(),
    );
    match Config::load(&loc.path) {
        Ok(c) => c.client_sockets(),
        Err(e) => {
            eprintln!("expertd: warning: {e}");
            let env = ConfigEnv::from_process();
            let explicit = std::fs::read_to_string(&loc.path)
                .ok()
                .and_then(|t| t.parse::<toml::Table>().ok())
                .and_then(|t| t.get("socket").and_then(|s| s.as_str()).map(PathBuf::from));
            match explicit {
                Some(s) => vec![s],
                None => {
                    let mut v = vec![env.default_socket()];
                    let svc = PathBuf::from(crate::config::SERVICE_SOCKET);
                    if !v.contains(&svc) {
                        v.push(svc);
                    }
                    v
                }
            }
        }
    }
}

pub fn run(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let sockets = sockets(&args);
    let path = if args.metrics { "/metrics" } else { "/status" };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let body = match rt.block_on(crate::api::get(&sockets, path)) {
        Ok(b) => b,
        Err(e @ crate::api::ClientError::Unreachable { .. }) => {
            eprintln!("expertd: {e}");
            // A daemon applies a changed `socket` on reload, but keeps its old socket when
            // the new one cannot be made (or it runs with another config).
            eprintln!(
                "expertd: if a daemon runs, it may still listen on an earlier socket (one started with another config, or a socket change it could not apply: see its log)"
            );
            return Ok(ExitCode::from(EXIT_UNAVAILABLE));
        }
        Err(e @ crate::api::ClientError::Denied { .. }) => {
            eprintln!("expertd: {e}");
            return Ok(ExitCode::from(EXIT_NOPERM));
        }
        Err(e) => return Err(e.into()),
    };
    if args.json || args.metrics {
        print!("{body}");
        return Ok(ExitCode::SUCCESS);
    }
    let doc: serde_json::Value = serde_json::from_str(&body).context("status is not JSON")?;
    print!("{}", summary(&doc));
    Ok(ExitCode::SUCCESS)
}

/// The short human summary of a status document.
pub fn summary(d: &serde_json::Value) -> String {
    let s = |v: &serde_json::Value| v.as_str().unwrap_or("?").to_string();
    let mut o = String::new();
    let dm = &d["daemon"];
    o.push_str(&format!(
        "expertd {} (pid {}, up {:.0}s), config {}\n",
        s(&dm["version"]),
        dm["pid"],
        dm["uptime_s"].as_f64().unwrap_or(0.0),
        s(&dm["config_path"])
    ));
    let e = &d["engine"];
    let mut line = format!("engine: {}", s(&e["state"]));
    if let Some(pid) = e["pid"].as_u64() {
        line.push_str(&format!(" (pid {pid})"));
    }
    line.push_str(&format!(" on {}:{}", s(&e["host"]), e["port"]));
    line.push_str(&format!(
        ", restarts {}, replans {}",
        e["restarts"], e["replans"]
    ));
    if let Some(l) = e["load_seconds"].as_f64() {
        line.push_str(&format!(", loaded in {l:.1}s"));
    }
    if let Some(x) = e["last_exit"].as_str() {
        line.push_str(&format!(", last exit: {x}"));
    }
    o.push_str(&line);
    o.push('\n');
    let (source, path) = (s(&d["model"]["source"]), s(&d["model"]["path"]));
    let splits = d["model"]["splits"].as_array().map_or(0, Vec::len);
    let files = if splits > 1 {
        format!(", split over {splits} files")
    } else {
        String::new()
    };
    if source == path {
        o.push_str(&format!("model: {source}{files}\n"));
    } else {
        o.push_str(&format!("model: {source} ({path}{files})\n"));
    }
    let p = &d["plan"];
    if p.is_object() {
        let pool = if p["pool"].is_object() {
            format!(
                "pool on, {} slots per layer in {}",
                p["pool"]["slots"],
                s(&p["pool"]["slot_tier"])
            )
        } else {
            "pool off".into()
        };
        o.push_str(&format!(
            "plan: {pool}; -ngl {} --n-cpu-moe {}; ctx {} ({}); threads {}; predicted {:.1} tok/s\n",
            p["gpu_layers"],
            p["n_cpu_moe"],
            p["ctx_size"],
            s(&p["kv_type"]),
            p["threads"],
            p["predicted_tok_s"].as_f64().unwrap_or(0.0)
        ));
        if let Some(mem) = p["memory"].as_array() {
            for t in mem {
                o.push_str(&format!(
                    "  {}: {} of {}\n",
                    s(&t["tier"]),
                    human_bytes(t["total"].as_u64().unwrap_or(0)),
                    human_bytes(t["budget"].as_u64().unwrap_or(0))
                ));
            }
        }
    }
    let pl = &d["pool"];
    if pl.is_object() {
        if pl["available"].as_bool() == Some(true) {
            o.push_str(&format!(
                "pool: hit rate {}, {} misses, {} read, stalls {:.2}s\n",
                pl["hit_rate"]
                    .as_f64()
                    .map(|h| format!("{:.1}%", h * 100.0))
                    .unwrap_or_else(|| "-".into()),
                pl["misses"],
                human_bytes(pl["bytes_read"].as_u64().unwrap_or(0)),
                pl["stall_seconds"].as_f64().unwrap_or(0.0)
            ));
            if let Some(n) = pl["errors"].as_u64().filter(|n| *n > 0) {
                o.push_str(&format!(
                    "pool: {n} errors (a read failed or the model file changed; the engine's log says which requests failed)\n"
                ));
            }
        } else {
            o.push_str("pool: no statistics published yet\n");
        }
    }
    if let Some(t) = d["decode"]["tokens_per_second"].as_f64() {
        o.push_str(&format!(
            "decode: {t:.1} tok/s (average since the engine started)\n"
        ));
    }
    if let Some(e) = d["daemon"]["socket_error"].as_str() {
        o.push_str(&format!("socket: {e}\n"));
    }
    if let Some(c) = d["config"]["error"].as_str() {
        o.push_str(&format!("config error (not applied): {c}\n"));
    }
    if let Some(err) = d["last_error"].as_str() {
        o.push_str(&format!("last error: {err}\n"));
    }
    o
}
