//! What the running engine publishes: the expert pool's statistics (a JSON file the
//! patched engine writes at `--expert-pool-stats PATH`) and llama-server's Prometheus
//! `/metrics` (decode speed). A poller task reads both every few seconds so that status
//! requests do no I/O.
//!
//! The pool stats reader is tolerant: a missing or half-written file means "no stats yet";
//! totals are taken from a `total`/`totals` object or the top level, or summed over a
//! `layers` array; unknown fields are kept in `raw`.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use super::{EngineState, Status};

/// How often the poller reads.
pub const POLL: Duration = Duration::from_secs(2);

/// Pool counters (totals over layers).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PoolCounters {
    /// Needed experts found in a slot, ready or being filled (the pool's `hits` +
    /// `inflight_hits`, as the pool's own hit rate counts them).
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
    pub bytes_read: u64,
    pub stall_ns: u64,
    /// Experts read ahead of the request or stage call that needed them: the pool's
    /// slot prefetches plus its read-ahead (`stage_ahead`; what the engine uses).
    pub prefetch_issued: u64,
    /// Of those, experts then needed (`prefetch_useful` + `stage_ahead_used`).
    pub prefetch_used: u64,
    /// Requests larger than the slots (the pool's `does_not_fit`).
    pub not_fit: u64,
    /// Failed requests, stage calls and prefetch fills (a read error, the model file
    /// changed): each failed request or stage call failed the engine's computation, and
    /// with it a client's request.
    pub errors: u64,
}

impl PoolCounters {
    /// hits / (hits + misses), None before any lookup.
    pub fn hit_rate(&self) -> Option<f64> {
        let n = self.hits + self.misses;
        (n > 0).then(|| self.hits as f64 / n as f64)
    }
}

/// The pool stats file, parsed.
#[derive(Clone, Debug, PartialEq)]
pub struct PoolStats {
    pub total: PoolCounters,
    /// Per-layer counters, by layer index, when the file has them.
    pub layers: Vec<(u32, PoolCounters)>,
    /// The file as published.
    pub raw: serde_json::Value,
    pub modified: Option<SystemTime>,
}

/// The engine's decode numbers from `/metrics`: averages since the engine started, from
/// its counters. (Its `*_tokens_seconds` gauges are averages over the window since the
/// previous scrape of `/metrics` by anyone, 0 when that window had no request, so they
/// are not used.)
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DecodeStats {
    /// `llamacpp:tokens_predicted_total / llamacpp:tokens_predicted_seconds_total`:
    /// average decode speed (None before the first generated token).
    pub tokens_per_second: Option<f64>,
    /// `llamacpp:tokens_predicted_total`.
    pub tokens_predicted_total: Option<f64>,
    /// `llamacpp:prompt_tokens_total / llamacpp:prompt_seconds_total`: average prefill
    /// speed (None before the first prompt).
    pub prompt_tokens_per_second: Option<f64>,
}

/// The latest of both, as the poller last saw them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EngineMetrics {
    pub pool: Option<Arc<PoolStats>>,
    pub decode: Option<DecodeStats>,
}

fn counters(v: &serde_json::Value) -> PoolCounters {
    let g = |names: &[&str]| -> u64 {
        names
            .iter()
            .find_map(|n| v.get(*n).and_then(|x| x.as_u64()))
            .unwrap_or(0)
    };
    PoolCounters {
        hits: g(&["hits"]) + g(&["inflight_hits"]),
        misses: g(&["misses"]),
        evictions: g(&["evictions"]),
        bytes_read: g(&["bytes_read"]),
        stall_ns: g(&["stall_ns"]),
        prefetch_issued: g(&["prefetch_issued", "prefetches", "prefetch"]) + g(&["stage_ahead"]),
        prefetch_used: g(&["prefetch_used", "prefetch_hits", "prefetch_useful"])
            + g(&["stage_ahead_used"]),
        not_fit: g(&["does_not_fit", "not_fit"]),
        errors: g(&["errors"]),
    }
}

fn add(a: &mut PoolCounters, b: &PoolCounters) {
    a.hits += b.hits;
    a.misses += b.misses;
    a.evictions += b.evictions;
    a.bytes_read += b.bytes_read;
    a.stall_ns += b.stall_ns;
    a.prefetch_issued += b.prefetch_issued;
    a.prefetch_used += b.prefetch_used;
    a.not_fit += b.not_fit;
    a.errors += b.errors;
}

/// Parses pool stats JSON; None if it is not a JSON object.
pub fn parse_pool_stats(text: &[u8]) -> Option<PoolStats> {
    let raw: serde_json::Value = serde_json::from_slice(text).ok()?;
    if !raw.is_object() {
        return None;
    }
    let layers: Vec<(u32, PoolCounters)> = raw
        .get("layers")
        .and_then(|l| l.as_array())
        .map(|a| {
            a.iter()
                .enumerate()
                .map(|(i, l)| {
                    let idx = l.get("layer").and_then(|x| x.as_u64()).unwrap_or(i as u64) as u32;
                    // The pool nests a layer's counters in `counters`.
                    (idx, counters(l.get("counters").unwrap_or(l)))
                })
                .collect()
        })
        .unwrap_or_default();
    let total_obj = raw.get("total").or_else(|| raw.get("totals"));
    let total = match total_obj {
        Some(t) => counters(t),
        None => {
            let top = counters(&raw);
            if top == PoolCounters::default() && !layers.is_empty() {
                let mut s = PoolCounters::default();
                for (_, c) in &layers {
                    add(&mut s, c);
                }
                s
            } else {
                top
            }
        }
    };
    Some(PoolStats {
        total,
        layers,
        raw,
        modified: None,
    })
}

/// Reads the stats file; None when it is absent or not (yet) valid.
pub fn read_pool_stats(path: &Path) -> Option<PoolStats> {
    let text = std::fs::read(path).ok()?;
    let mut s = parse_pool_stats(&text)?;
    s.modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    Some(s)
}

/// Picks the decode numbers out of llama-server's Prometheus text.
pub fn parse_engine_metrics(text: &str) -> DecodeStats {
    let mut d = DecodeStats::default();
    let (mut predicted_s, mut prompt_n, mut prompt_s) = (None, None, None);
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let mut it = line.split_whitespace();
        let (Some(name), Some(value)) = (it.next(), it.next()) else {
            continue;
        };
        let Ok(v) = value.parse::<f64>() else {
            continue;
        };
        match name {
            "llamacpp:tokens_predicted_total" => d.tokens_predicted_total = Some(v),
            "llamacpp:tokens_predicted_seconds_total" => predicted_s = Some(v),
            "llamacpp:prompt_tokens_total" => prompt_n = Some(v),
            "llamacpp:prompt_seconds_total" => prompt_s = Some(v),
            _ => {}
        }
    }
    let rate = |n: Option<f64>, s: Option<f64>| match (n, s) {
        (Some(n), Some(s)) if n > 0.0 && s > 0.0 => Some(n / s),
        _ => None,
    };
    d.tokens_per_second = rate(d.tokens_predicted_total, predicted_s);
    d.prompt_tokens_per_second = rate(prompt_n, prompt_s);
    d
}

/// An API key the engine was started with: llama-server then answers `/metrics` only
/// with it (`/health` is exempt). Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(..)")
    }
}

impl ApiKey {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The API key an engine started with `args` and `env` (on top of the daemon's own
/// environment) accepts, as llama-server reads them: `--api-key KEYS` (comma-separated;
/// any one works), `--api-key-file FILE` (a key per line), `LLAMA_API_KEY`.
pub fn engine_api_key(
    args: &[String],
    env: &std::collections::BTreeMap<String, String>,
) -> Option<ApiKey> {
    let first_key = |keys: &str| {
        keys.split(',')
            .map(str::trim)
            .find(|k| !k.is_empty())
            .map(|k| ApiKey(k.to_string()))
    };
    let flag = |name: &str| -> Option<String> {
        let mut found = None;
        for (i, a) in args.iter().enumerate() {
            if a == name {
                found = args.get(i + 1).cloned();
            } else if let Some(v) = a.strip_prefix(name).and_then(|r| r.strip_prefix('=')) {
                found = Some(v.to_string());
            }
        }
        found
    };
    if let Some(k) = flag("--api-key").as_deref().and_then(first_key) {
        return Some(k);
    }
    if let Some(file) = flag("--api-key-file") {
        if let Ok(text) = std::fs::read_to_string(file) {
            if let Some(k) = text.lines().find_map(first_key) {
                return Some(k);
            }
        }
    }
    env.get("LLAMA_API_KEY")
        .cloned()
        .or_else(|| std::env::var("LLAMA_API_KEY").ok())
        .as_deref()
        .and_then(first_key)
}

/// The process that wrote a pool stats file (its `pid`), if it says.
fn writer_pid(stats: &PoolStats) -> Option<u32> {
    let pid = stats.raw.get("pid")?.as_u64()?;
    u32::try_from(pid).ok()
}

/// The engine process whose numbers count now: the one starting or serving.
fn running_pid(engine: &super::EngineStatus) -> Option<u32> {
    let running = matches!(engine.state, EngineState::Starting | EngineState::Serving);
    engine.pid.filter(|_| running)
}

/// `stats` if the running engine wrote them.
fn live_pool_stats(stats: Option<PoolStats>, running: Option<u32>) -> Option<PoolStats> {
    stats.filter(|s| running.is_some() && writer_pid(s) == running)
}

/// Polls while the daemon runs; ends when the status channel closes.
///
/// Pool stats count only while the engine that wrote them runs (the file's `pid` is the
/// engine's): a crashed engine's last file stays until the next start, and must not be
/// shown as the current one. The engine answers `/metrics` between batches, so a scrape
/// can time out during a long prompt: the numbers last read from the same engine stay
/// until a scrape succeeds again.
pub async fn poll(status: watch::Receiver<Status>, out: watch::Sender<EngineMetrics>) {
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The last decode numbers read, and the engine they came from.
    let mut last_decode: Option<(u32, DecodeStats)> = None;
    loop {
        tick.tick().await;
        if status.has_changed().is_err() {
            return;
        }
        let (serving, running, api_key, host, port, stats_path) = {
            let s = status.borrow();
            (
                s.engine.state == EngineState::Serving,
                running_pid(&s.engine),
                s.engine.api_key.clone(),
                s.engine.host.clone(),
                s.engine.port,
                s.plan
                    .as_ref()
                    .and_then(|p| p.pool.as_ref().map(|pool| pool.stats_path.clone())),
            )
        };
        let pool = match (&stats_path, running) {
            (Some(p), Some(_)) => {
                let p = p.clone();
                let read = tokio::task::spawn_blocking(move || read_pool_stats(&p))
                    .await
                    .ok()
                    .flatten();
                live_pool_stats(read, running).map(Arc::new)
            }
            _ => None,
        };
        let decode = match (serving, running) {
            (true, Some(pid)) => {
                let fresh = match crate::api::http::tcp_request(
                    &host,
                    port,
                    "GET",
                    "/metrics",
                    None,
                    api_key.as_ref().map(ApiKey::as_str),
                    Duration::from_secs(1),
                )
                .await
                {
                    Ok(r) if r.status == 200 => Some(parse_engine_metrics(&r.text())),
                    _ => None,
                };
                match fresh {
                    Some(d) => {
                        last_decode = Some((pid, d.clone()));
                        Some(d)
                    }
                    None => last_decode
                        .as_ref()
                        .filter(|(p, _)| *p == pid)
                        .map(|(_, d)| d.clone()),
                }
            }
            _ => None,
        };
        out.send_replace(EngineMetrics { pool, decode });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_stats_shapes() {
        let a =
            parse_pool_stats(br#"{"total":{"hits":30,"misses":10,"bytes_read":4096}}"#).unwrap();
        assert_eq!(a.total.hits, 30);
        assert_eq!(a.total.hit_rate(), Some(0.75));
        let b = parse_pool_stats(
            br#"{"layers":[{"layer":0,"hits":1,"misses":1},{"layer":1,"hits":3,"misses":0,"stall_ns":7}]}"#,
        )
        .unwrap();
        assert_eq!((b.total.hits, b.total.misses, b.total.stall_ns), (4, 1, 7));
        assert_eq!(b.layers[1].0, 1);
        assert!(parse_pool_stats(b"{\"hits\":").is_none());
        assert!(parse_pool_stats(b"[]").is_none());
        assert!(read_pool_stats(Path::new("/nonexistent/expertd/stats.json")).is_none());
    }

    /// The file the pool really writes: totals, per-layer counters nested in `counters`,
    /// the pool's names for did-not-fit and read-ahead.
    #[test]
    fn pool_stats_as_the_pool_writes_them() {
        use expert_pool::metrics::{Counters, LayerStats, STATS_FORMAT, StatsSnapshot};
        let c = |hits, misses| Counters {
            hits,
            misses,
            does_not_fit: 2,
            stage_ahead: 5,
            stage_ahead_used: 3,
            prefetch_issued: 1,
            prefetch_useful: 1,
            errors: 1,
            inflight_hits: 2,
            ..Default::default()
        };
        let layer = |layer, counters| LayerStats {
            layer,
            n_experts: 128,
            n_slots: 30,
            resident: 30,
            counters,
        };
        let mut total = c(7, 3);
        total.add(&c(1, 1));
        let snap = StatsSnapshot {
            format: STATS_FORMAT.into(),
            version: 1,
            pid: 1,
            unix_ms: 0,
            io: "io_uring".into(),
            direct_files: 1,
            files: 1,
            policy: "lfu-decay".into(),
            warnings: vec![],
            total,
            layers: vec![layer(0, c(7, 3)), layer(2, c(1, 1))],
        };
        let s = parse_pool_stats(&serde_json::to_vec(&snap).unwrap()).unwrap();
        // In-flight hits are hits, as in the pool's own hit rate.
        assert_eq!((s.total.hits, s.total.misses, s.total.not_fit), (12, 4, 4));
        assert_eq!((s.total.prefetch_issued, s.total.prefetch_used), (12, 8));
        assert_eq!(s.total.errors, 2);

        // Through the status document, `expertd status` and /metrics.
        let config = crate::config::Config::parse(
            "model = \"/srv/models/m.gguf\"",
            Path::new("/etc/expertd/expertd.toml"),
            &crate::config::ConfigEnv::default(),
        )
        .unwrap();
        let status = Status::new(&config);
        let m = EngineMetrics {
            pool: Some(Arc::new(s.clone())),
            decode: None,
        };
        let doc = serde_json::to_value(crate::api::wire::status_doc(
            &status,
            &m,
            Path::new("/run/expertd.sock"),
            None,
        ))
        .unwrap();
        assert_eq!(doc["pool"]["errors"], 2);
        assert!(
            crate::cli::status::summary(&doc).contains("pool: 2 errors (a read failed"),
            "{}",
            crate::cli::status::summary(&doc)
        );
        let text = crate::api::wire::metrics_text(&status, &m);
        assert!(text.contains("expertd_pool_errors_total 2\n"), "{text}");
        assert_eq!(s.layers.len(), 2);
        assert_eq!(
            (s.layers[1].0, s.layers[1].1.hits, s.layers[1].1.misses),
            (2, 3, 1)
        );
        assert_eq!(s.layers[0].1.hit_rate(), Some(0.75));
    }

    /// The key /metrics is scraped with: as llama-server reads it.
    #[test]
    fn the_engines_api_key_is_found_where_llama_server_reads_it() {
        use std::collections::BTreeMap;
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let none = BTreeMap::new();
        let key = |a: &[&str], env: &BTreeMap<String, String>| {
            engine_api_key(&args(a), env).map(|k| k.as_str().to_string())
        };
        assert_eq!(key(&["--api-key", " k1 ,k2"], &none).as_deref(), Some("k1"));
        assert_eq!(key(&["--api-key=k3"], &none).as_deref(), Some("k3"));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("keys");
        std::fs::write(&file, "\nfrom-file\nsecond\n").unwrap();
        assert_eq!(
            key(&["--api-key-file", file.to_str().unwrap()], &none).as_deref(),
            Some("from-file")
        );
        let env = BTreeMap::from([("LLAMA_API_KEY".to_string(), "from-env".to_string())]);
        assert_eq!(key(&["-m", "x"], &env).as_deref(), Some("from-env"));
        assert_eq!(key(&["--api-key", "flag"], &env).as_deref(), Some("flag"));
        assert_eq!(
            format!("{:?}", engine_api_key(&args(&["--api-key", "s"]), &none)),
            "Some(ApiKey(..))"
        );
    }

    /// Pool stats count only while the engine that wrote them starts or serves: a
    /// crashed engine's file stays on disk until the next start.
    #[test]
    fn only_the_running_engines_pool_stats_count() {
        let stats = |pid: Option<u32>| {
            let text = match pid {
                Some(p) => format!(r#"{{"pid":{p},"total":{{"hits":3,"misses":1}}}}"#),
                None => r#"{"total":{"hits":3,"misses":1}}"#.to_string(),
            };
            parse_pool_stats(text.as_bytes())
        };
        let config = crate::config::Config::parse(
            "model = \"/srv/models/m.gguf\"",
            Path::new("/etc/expertd/expertd.toml"),
            &crate::config::ConfigEnv::default(),
        )
        .unwrap();
        let engine = |state, pid| {
            let mut e = Status::new(&config).engine;
            (e.state, e.pid) = (state, pid);
            e
        };
        let serving = running_pid(&engine(EngineState::Serving, Some(41)));
        assert_eq!(serving, Some(41));
        assert!(live_pool_stats(stats(Some(41)), serving).is_some());
        assert!(
            live_pool_stats(stats(Some(40)), serving).is_none(),
            "an earlier engine's file"
        );
        assert!(
            live_pool_stats(stats(None), serving).is_none(),
            "no writer named"
        );
        assert_eq!(
            running_pid(&engine(EngineState::Starting, Some(41))),
            Some(41)
        );
        for state in [
            EngineState::CrashLoop,
            EngineState::Restarting,
            EngineState::Stopped,
            EngineState::Stopping,
        ] {
            let running = running_pid(&engine(state, Some(41)));
            assert!(
                live_pool_stats(stats(Some(41)), running).is_none(),
                "{state:?}"
            );
        }
    }

    #[test]
    fn engine_metrics() {
        // The window gauges are 0 after an idle scrape window; the counters still hold
        // the averages since the start.
        let d = parse_engine_metrics(
            "# HELP x\nllamacpp:prompt_tokens_total 201\nllamacpp:prompt_seconds_total 2\nllamacpp:prompt_tokens_seconds 0\nllamacpp:predicted_tokens_seconds 0\nllamacpp:tokens_predicted_total 17\nllamacpp:tokens_predicted_seconds_total 0.5\n",
        );
        assert_eq!(d.tokens_per_second, Some(34.0));
        assert_eq!(d.tokens_predicted_total, Some(17.0));
        assert_eq!(d.prompt_tokens_per_second, Some(100.5));
        // Before the first request: no rate, not 0 or NaN.
        let d = parse_engine_metrics(
            "llamacpp:tokens_predicted_total 0\nllamacpp:tokens_predicted_seconds_total 0\n",
        );
        assert_eq!(
            (d.tokens_per_second, d.tokens_predicted_total),
            (None, Some(0.0))
        );
        assert_eq!(d.prompt_tokens_per_second, None);
    }
}
