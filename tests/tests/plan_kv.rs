//! The planner's KV cache against the engine's. llama-server started with exactly a
//! plan's arguments allocates the KV cache the plan budgets: every layer at the whole
//! context, except sliding-window layers, which get the window plus a ubatch per
//! sequence (gpt-oss: every other layer). The sizes come from llama-server's own log
//! (`llama_kv_cache: size = ... MiB`, one line per cache).

use std::path::Path;
use std::process::Command;

use expertd::engine::Flavor;
use expertd::synth::{ExpertType, Preset, SynthArch, SynthConfig, write_model};
use expertd_tests::daemon_support::expertd_binary;
use expertd_tests::{Server, engine_binary};

/// `expertd plan --json` for `model` with the given context and sequences (f16 KV).
fn plan(dir: &Path, model: &Path, ctx: u32, parallel: u32) -> serde_json::Value {
    let cfg = dir.join(format!("plan-{ctx}-{parallel}.toml"));
    std::fs::write(
        &cfg,
        format!(
            "model = {:?}\nstate_dir = {:?}\nsocket = {:?}\n[plan]\nctx_size = {ctx}\nparallel = {parallel}\nkv_type = \"f16\"\n",
            model.display().to_string(),
            dir.join("state").display().to_string(),
            dir.join("s.sock").display().to_string()
        ),
    )
    .unwrap();
    let out = Command::new(expertd_binary())
        .args(["plan", "--json", "--config"])
        .arg(&cfg)
        .env_remove("EXPERTD_CONFIG")
        .output()
        .expect("running expertd plan");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The plan's arguments without the model and the address (the test's server sets them).
fn engine_args(plan: &serde_json::Value) -> Vec<String> {
    let args: Vec<String> = plan["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < args.len() {
        if matches!(args[i].as_str(), "--model" | "--host" | "--port") {
            i += 2;
            continue;
        }
        out.push(args[i].clone());
        i += 1;
    }
    out
}

/// The KV bytes the plan budgets (every tier).
fn planned_kv(plan: &serde_json::Value) -> u64 {
    plan["memory"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["kv"].as_u64().unwrap())
        .sum()
}

/// The KV caches llama-server allocated, in MiB, one per cache, from its log.
fn engine_kv_mib(log: &str) -> Vec<f64> {
    log.lines()
        .filter_map(|l| {
            let rest = l.split("llama_kv_cache: size =").nth(1)?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .collect()
}

fn check(dir: &Path, model: &Path, ctx: u32, parallel: u32, caches: usize) {
    let plan = plan(dir, model, ctx, parallel);
    assert!(plan["pool"].is_null(), "the tiny model fits: pool off");
    let mut args = engine_args(&plan);
    args.push("--verbose".into()); // llama_kv_cache's lines are info-level
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = Server::start(
        &engine_binary(Flavor::Patched, "llama-server"),
        model,
        &args,
    )
    .unwrap();
    let log = server.log_text();
    let sizes = engine_kv_mib(&log);
    assert_eq!(
        sizes.len(),
        caches,
        "ctx {ctx}, parallel {parallel}: KV caches in the log:\n{log}"
    );
    let engine: f64 = sizes.iter().sum();
    eprintln!("ctx {ctx}, parallel {parallel}: engine KV caches {sizes:?} MiB");
    let planned = planned_kv(&plan) as f64 / 1048576.0;
    // The log prints two decimals of MiB.
    assert!(
        (engine - planned).abs() <= 0.01 * caches as f64,
        "ctx {ctx}, parallel {parallel}: the engine's KV caches {sizes:?} MiB, the plan {planned:.2} MiB"
    );
}

/// gpt-oss: half the layers at the context, half at window 128 + ubatch per sequence; one
/// sequence, two (each then has its own window), and three sharing a context that does
/// not split into multiples of 256. A model without sliding-window layers: every layer at
/// the context.
#[test]
fn the_plans_kv_cache_is_the_engines_with_and_without_sliding_windows() {
    let dir = tempfile::tempdir().unwrap();
    let mut gpt_oss = SynthConfig::preset(Preset::Tiny);
    gpt_oss.arch = SynthArch::GptOss;
    gpt_oss.expert_type = ExpertType::Mxfp4;
    let swa = dir.path().join("tiny-gpt-oss.gguf");
    write_model(&gpt_oss, &swa, 2).unwrap();
    let info = expertd::gguf::ModelInfo::from_gguf(
        &expertd::gguf::GgufFile::open(&swa).expect("reading the model"),
    )
    .unwrap();
    assert_eq!(info.sliding_window, expertd::synth::GPT_OSS_WINDOW);
    assert_eq!(
        2 * info.kv_swa_bytes_per_token_f16,
        info.kv_bytes_per_token_f16,
        "every other layer slides"
    );
    for parallel in [1, 2] {
        check(dir.path(), &swa, 8192, parallel, 2);
    }
    // a context that splits unevenly: llama.cpp pads it, then each sequence's share
    check(dir.path(), &swa, 5000, 3, 2);

    let plain = dir.path().join("tiny.gguf");
    write_model(&SynthConfig::preset(Preset::Tiny), &plain, 2).unwrap();
    check(dir.path(), &plain, 4096, 1, 1);
}
