//! Planner tests on recorded probe snapshots (`daemon/testdata/planner/NAME.snapshot.json`).
//!
//! Each case plans a snapshot under a config (`NAME.toml` if present, else one with only
//! the model) and compares the plan document with `NAME.plan.json`; run with
//! `UPDATE_EXPECT=1` to rewrite the expected files after a deliberate change, and review the
//! diff. Independently of the snapshots, every case asserts the properties that must hold
//! whatever the numbers: the plan stays inside every budget, the pool is on exactly when
//! the model does not fit, slot counts are sane, every choice has a reason.

use std::path::{Path, PathBuf};

use expertd::config::{Config, ConfigEnv, PoolMode};
use expertd::plan::{Plan, plan};
use expertd::probe::Snapshot;

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/planner")
}

fn root_env() -> ConfigEnv {
    ConfigEnv {
        uid: 0,
        ..ConfigEnv::default()
    }
}

fn load(name: &str) -> (Snapshot, Config) {
    let dir = testdata();
    let text = std::fs::read(dir.join(format!("{name}.snapshot.json"))).unwrap();
    let snap: Snapshot = serde_json::from_slice(&text).unwrap();
    let cfg_path = dir.join(format!("{name}.toml"));
    let cfg_text = std::fs::read_to_string(&cfg_path).unwrap_or_else(|_| {
        format!(
            "model = {}\n",
            toml::Value::String(snap.model.path.display().to_string())
        )
    });
    let config = Config::parse(
        &cfg_text,
        Path::new("/etc/expertd/expertd.toml"),
        &root_env(),
    )
    .unwrap();
    (snap, config)
}

/// Compares `actual` with the expect file, or rewrites it under `UPDATE_EXPECT=1`.
/// The plan's memory tier named `name` ("ram" or "vram"), if it has one.
fn tier<'a>(p: &'a Plan, name: &str) -> Option<&'a expertd::plan::TierUse> {
    p.memory.iter().find(|t| t.tier.as_str() == name)
}

fn expect_file(path: &Path, actual: &str) {
    if std::env::var_os("UPDATE_EXPECT").is_some() {
        std::fs::write(path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(path).unwrap_or_else(|_| {
        panic!(
            "{} is missing: run with UPDATE_EXPECT=1 to create it",
            path.display()
        )
    });
    if expected != actual {
        let line = expected
            .lines()
            .zip(actual.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(expected.lines().count().min(actual.lines().count()));
        panic!(
            "{} differs from the plan, first at line {}:\n  expected: {}\n  actual:   {}\n(run with UPDATE_EXPECT=1 to accept, then review the diff)",
            path.display(),
            line + 1,
            expected.lines().nth(line).unwrap_or("<end>"),
            actual.lines().nth(line).unwrap_or("<end>")
        );
    }
}

/// Properties every plan must have.
fn assert_properties(name: &str, snap: &Snapshot, config: &Config, p: &Plan) {
    assert!(
        p.within_budget,
        "{name}: plan is over budget: {:?}",
        p.warnings
    );
    for t in &p.memory {
        assert!(
            t.total() <= t.budget,
            "{name}: {} uses {} of a {} budget",
            t.tier.as_str(),
            t.total(),
            t.budget
        );
    }
    let i = &snap.model.info;
    match &p.pool {
        Some(pool) => {
            assert!(
                pool.slots >= i.expert_used_count,
                "{name}: fewer slots than used experts"
            );
            assert!(
                pool.slots <= i.expert_count,
                "{name}: more slots than experts"
            );
            assert_eq!(pool.slots_per_layer.len(), i.expert_bytes_per_layer.len());
            let at = p
                .args
                .iter()
                .position(|a| a == "--expert-pool-slots")
                .expect("slots arg");
            assert_eq!(p.args[at + 1], pool.slots.to_string());
            assert!(pool.stats_path.starts_with(&config.state_dir));
            assert!(p.args.iter().any(|a| a == "--expert-pool-stats"));
        }
        None => assert!(
            !p.args.iter().any(|a| a.starts_with("--expert-pool")),
            "{name}: pool flags without the pool"
        ),
    }
    let a = |flag: &str| {
        p.args
            .iter()
            .position(|x| x == flag)
            .map(|i| p.args[i + 1].clone())
    };
    assert_eq!(
        a("--model").as_deref(),
        Some(&*snap.model.path.display().to_string())
    );
    assert_eq!(a("--ctx-size"), Some(p.ctx_size.to_string()));
    assert_eq!(a("--n-gpu-layers"), Some(p.gpu_layers.to_string()));
    assert_eq!(a("--fit").as_deref(), Some("off"));
    // llama-server's prompt cache (8 GiB by default) lives in RAM beside what the plan
    // budgets: the plan bounds it by what the RAM budget leaves.
    assert_eq!(a("--cache-ram"), Some(p.prompt_cache_mib.to_string()));
    let ram = tier(p, "ram").expect("a RAM tier");
    assert!(
        ram.total() + (p.prompt_cache_mib << 20) <= ram.budget,
        "{name}: RAM {} + prompt cache {} MiB over the budget {}",
        ram.total(),
        p.prompt_cache_mib,
        ram.budget
    );
    assert!(p.predicted_tok_s.is_finite() && p.predicted_tok_s > 0.0);
    assert!(p.threads >= 1 && p.threads <= snap.host.usable_cores.max(1));
    for topic in [
        "ram_budget",
        "threads",
        "ctx",
        "kv_type",
        "batch",
        "pool",
        "placement",
        "prediction",
        "prompt_cache",
    ] {
        assert!(
            p.reasons
                .iter()
                .any(|r| r.topic == topic && !r.why.is_empty()),
            "{name}: no reason for {topic}"
        );
    }
    // Pure and stable: the same input plans the same; what is free right now does not
    // change the plan (budgets come from totals, so a running engine does not move them).
    assert_eq!(
        &plan(snap, config),
        p,
        "{name}: planning is not deterministic"
    );
    let mut busy = snap.clone();
    busy.host.available_ram /= 3;
    for g in &mut busy.gpus {
        g.free_memory /= 3;
    }
    assert_eq!(
        plan(&busy, config).args,
        p.args,
        "{name}: plan depends on free memory"
    );
}

/// Plans a case, checks its properties and its expect file; returns the plan.
fn check(name: &str, pool_on: bool) -> Plan {
    let (snap, config) = load(name);
    let p = plan(&snap, &config);
    assert_properties(name, &snap, &config, &p);
    assert_eq!(p.pool.is_some(), pool_on, "{name}: pool on/off\n{p}");
    let doc = expertd::api::wire::PlanDoc::from(&p);
    let mut json = serde_json::to_string_pretty(&doc).unwrap();
    json.push('\n');
    expect_file(&testdata().join(format!("{name}.plan.json")), &json);
    p
}

#[test]
fn cpu_host_model_fits_runs_stock() {
    let p = check("cpu_fits", false);
    assert_eq!((p.gpu_layers, p.n_cpu_moe), (0, 0));
}

#[test]
fn cpu_host_ram_40_percent_of_model_pools_in_ram() {
    let p = check("cpu_ram_40pct", true);
    let pool = p.pool.unwrap();
    assert_eq!(pool.slot_tier, expertd::plan::Tier::Ram);
    assert_eq!(pool.cache_mib, 0);
}

#[test]
fn gpu_12gb_30b_a3b_splits_experts_between_vram_and_ram() {
    let p = check("gpu12_qwen3_30b_a3b", false);
    assert_eq!(p.gpu_layers, 49);
    assert!(
        p.n_cpu_moe > 0 && p.n_cpu_moe < 48,
        "n_cpu_moe {}",
        p.n_cpu_moe
    );
}

#[test]
fn gpu_24gb_120b_pools_experts_in_ram_with_the_rest_on_the_gpu() {
    // The engine's pool keeps its slots in RAM (VRAM slots are not built yet): attention
    // and KV on the GPU, every MoE layer's experts served from RAM slots to the CPU.
    let p = check("gpu24_gpt_oss_120b", true);
    let pool = p.pool.unwrap();
    assert_eq!(pool.slot_tier, expertd::plan::Tier::Ram);
    assert_eq!(pool.cache_mib, 0);
    assert_eq!(
        p.n_cpu_moe, 36,
        "expert tensors stay on the host for the pool"
    );
    assert_eq!(p.gpu_layers, 37);
}

#[test]
fn gpu_80gb_120b_fits_in_vram() {
    let p = check("gpu80_gpt_oss_120b", false);
    assert_eq!((p.gpu_layers, p.n_cpu_moe), (37, 0));
}

#[test]
fn a_model_that_fits_nowhere_is_reported_not_hidden() {
    let (mut snap, config) = load("cpu_ram_40pct");
    snap.host.cgroup_memory_limit = Some(300 << 20);
    let p = plan(&snap, &config);
    assert!(!p.within_budget);
    assert!(!p.warnings.is_empty());
    // The reasons say so too, instead of claiming a fit the numbers contradict.
    let why = |topic: &str| {
        p.reasons
            .iter()
            .find(|r| r.topic == topic)
            .map(|r| r.why.clone())
            .unwrap()
    };
    assert!(
        why("pool").contains("cannot hold") && why("pool").contains("over budget"),
        "{}",
        why("pool")
    );
    assert!(!why("pool").contains(" hold 8 experts"), "{}", why("pool"));
    assert!(
        why("ctx").contains("at no context do the weights fit"),
        "{}",
        why("ctx")
    );
    assert!(!why("ctx").contains("halved from"), "{}", why("ctx"));
    assert!(
        why("kv_type").contains("nothing fits"),
        "{}",
        why("kv_type")
    );
}

#[test]
fn forced_pool_modes_are_obeyed() {
    let (snap, mut config) = load("cpu_fits");
    config.pool.mode = PoolMode::On;
    let p = plan(&snap, &config);
    let pool = p.pool.as_ref().expect("pool on by config");
    assert_eq!(
        pool.slots, snap.model.info.expert_count,
        "all experts fit: every slot"
    );
    assert!(p.within_budget);

    let (snap, mut config) = load("cpu_ram_40pct");
    config.pool.mode = PoolMode::Off;
    let p = plan(&snap, &config);
    assert!(p.pool.is_none());
    assert!(
        !p.warnings.is_empty(),
        "pool off on a model that does not fit must warn"
    );
}

#[test]
fn config_overrides_win() {
    let (snap, mut config) = load("gpu12_qwen3_30b_a3b");
    config.plan.ctx_size = Some(8192);
    config.plan.kv_type = Some(expertd::config::KvType::F16);
    config.plan.threads = Some(3);
    config.engine.extra_args = vec!["--jinja".into()];
    let p = plan(&snap, &config);
    assert_eq!(
        (p.ctx_size, p.kv_type, p.threads),
        (8192, expertd::config::KvType::F16, 3)
    );
    assert_eq!(p.args.last().map(String::as_str), Some("--jinja"));
    assert_properties("overrides", &snap, &config, &p);
}

#[test]
fn dense_model_never_pools() {
    let (mut snap, mut config) = load("cpu_ram_40pct");
    let i = &mut snap.model.info;
    i.expert_count = 0;
    i.expert_used_count = 0;
    i.expert_bytes_per_layer.clear();
    i.non_expert_bytes += i.expert_bytes;
    i.expert_bytes = 0;
    config.pool.mode = PoolMode::On;
    let p = plan(&snap, &config);
    assert!(p.pool.is_none());
}

#[test]
fn h100_recorded_with_nvml_fits_in_vram() {
    // Recorded with `expertd plan --snapshot` on a real H100 host (NVML, cgroup v2).
    let p = check("h100_recorded_tiny", false);
    assert_eq!((p.gpu_layers, p.n_cpu_moe), (5, 0));
    assert_eq!(p.memory[0].tier, expertd::plan::Tier::Vram);
}

/// A model whose non-expert weights are fewer bytes than it has layers (a tiny or odd
/// file) on a GPU too small for them: the layers offloaded never account for more weights
/// than there are, so RAM's share cannot wrap around into a plan that looks in budget.
#[test]
fn tiny_non_expert_weights_on_a_small_gpu_stay_accounted() {
    let (mut snap, mut config) = load("gpu12_qwen3_30b_a3b");
    snap.model.info.non_expert_bytes = 0;
    config.memory.vram = expertd::config::Budget::Bytes(2 << 30);
    config.plan.ctx_size = Some(32768);
    let p = plan(&snap, &config);
    for t in &p.memory {
        assert!(
            t.weights <= snap.model.info.non_expert_bytes + snap.model.info.expert_bytes,
            "{}: {} bytes of weights, more than the model has",
            t.tier.as_str(),
            t.weights
        );
    }
    if p.within_budget {
        for t in &p.memory {
            assert!(t.total() <= t.budget, "{}: over budget", t.tier.as_str());
        }
    }
}

/// `snap` with two copies of its GPU (indices 0 and 1), each with `memory_share` of its
/// memory.
fn two_gpus(snap: &expertd::probe::Snapshot, memory_share: u64) -> expertd::probe::Snapshot {
    let mut two = snap.clone();
    let gpu = two.gpus[0].clone();
    two.gpus = (0..2)
        .map(|i| {
            let mut g = gpu.clone();
            g.index = i;
            g.total_memory /= memory_share;
            g.free_memory /= memory_share;
            g
        })
        .collect();
    two
}

/// Two GPUs of half the memory: llama.cpp splits the layers over them and each one that
/// computes holds its own compute buffer, so the plan pays for two (it counted one, as if
/// the GPUs were one pool of memory) and still stays within the VRAM budget.
#[test]
fn two_gpus_hold_a_compute_buffer_each() {
    let (one_snap, config) = load("gpu80_gpt_oss_120b");
    let one = plan(&one_snap, &config);
    let snap = two_gpus(&one_snap, 2);
    let two = plan(&snap, &config);
    assert_properties("two GPUs", &snap, &config, &two);
    let vram = |p: &Plan| tier(p, "vram").cloned().unwrap();
    let (v1, v2) = (vram(&one), vram(&two));
    assert!(v1.compute > 0);
    assert_eq!(v2.compute, 2 * v1.compute, "one compute buffer per GPU");
    assert!(v2.total() <= v2.budget);
    let batch = two.reasons.iter().find(|r| r.topic == "batch").unwrap();
    assert!(
        batch.why.contains("one on each of the 2 GPUs"),
        "{}",
        batch.why
    );
}

/// When the fewest slots a token needs are every expert (here 2 used by each of 4
/// parallel sequences, of 8 experts), the engine keeps no staging area, so the plan
/// counts none, also when those slots do not fit: the pool is the experts and the read
/// buffers.
#[test]
fn a_slot_for_every_expert_needs_no_staging_area() {
    let (mut snap, mut config) = load("cpu_ram_40pct");
    let i = &mut snap.model.info;
    i.expert_count = 8;
    i.expert_used_count = 2;
    config.plan.parallel = 4;
    config.pool.mode = PoolMode::On;
    // Too little RAM for 8 experts per layer: the plan is over budget, at the minimum.
    config.memory.ram = expertd::config::Budget::Bytes(400 << 20);
    let p = plan(&snap, &config);
    assert_eq!(p.pool.as_ref().map(|x| x.slots), Some(8));
    assert!(!p.within_budget);
    let ram = tier(&p, "ram").unwrap();
    let one: u64 = snap.model.info.expert_bytes_per_layer.values().sum();
    assert_eq!(ram.experts, 8 * one + expertd::plan::POOL_IO_BYTES, "{p}");
}

/// NVML lists every GPU; CUDA_VISIBLE_DEVICES (the engine's, from `engine.env` or the
/// daemon's environment) decides which the engine uses, and the plan budgets only those.
#[test]
fn only_the_gpus_cuda_shows_the_engine_count() {
    let (one_snap, config) = load("gpu80_gpt_oss_120b");
    let two = two_gpus(&one_snap, 1);
    let vram = |p: &Plan| tier(p, "vram").map(|t| t.budget);
    let both = plan(&two, &config);
    let one = plan(&one_snap, &config);
    assert_eq!(vram(&both), vram(&one).map(|b| 2 * b));

    // From the daemon's environment: one GPU, as if the host had one.
    let mut snap = two.clone();
    snap.cuda_visible_devices = Some("1".into());
    let p = plan(&snap, &config);
    assert_eq!(vram(&p), vram(&one));
    let why = p.reasons.iter().find(|r| r.topic == "gpu_visible").unwrap();
    assert_eq!(why.choice, "1 of 2");
    assert!(why.why.contains("the engine sees GPU 1"), "{}", why.why);
    assert_properties("CUDA_VISIBLE_DEVICES=1", &snap, &config, &p);

    // engine.env wins over the daemon's; -1 hides every GPU: a CPU plan.
    let mut cfg = config.clone();
    cfg.engine
        .env
        .insert("CUDA_VISIBLE_DEVICES".into(), "-1".into());
    let p = plan(&snap, &cfg);
    assert_eq!(vram(&p), None, "{p}");
    assert_eq!(p.gpu_layers, 0);

    // UUIDs are not mapped to NVML's list: every GPU counts.
    let mut snap = two.clone();
    snap.cuda_visible_devices = Some("GPU-8a1f".into());
    assert_eq!(vram(&plan(&snap, &config)), vram(&both));
}

/// A multi-token-prediction block after the last layer (GLM-4.5, DeepSeek-V3 files) is in
/// block_count but not loaded without MTP: the plan is the same as without it, except
/// that `-ngl`, which llama.cpp counts from the end of block_count + 1, grows by one
/// wherever a layer is offloaded (else the first offloaded layer would stay on the CPU).
#[test]
fn an_mtp_block_leaves_the_plan_alone_but_for_the_offload_count() {
    let mut cases = Vec::new();
    for name in [
        "cpu_fits",
        "cpu_ram_40pct",
        "gpu12_qwen3_30b_a3b",
        "gpu24_gpt_oss_120b",
        "gpu80_gpt_oss_120b",
    ] {
        cases.push((name, load(name)));
    }
    // and a partial offload: the non-expert weights do not fit a small GPU
    let (snap, mut config) = load("gpu12_qwen3_30b_a3b");
    config.memory.vram = expertd::config::Budget::Bytes(1 << 30);
    cases.push(("gpu12 with 1 GiB of VRAM", (snap, config)));
    let mut partial = false;
    for (name, (snap, config)) in cases {
        let p = plan(&snap, &config);
        let mut mtp = snap.clone();
        mtp.model.info.block_count += 1;
        mtp.model.info.nextn_layers = 1;
        mtp.model.info.nextn_bytes = 3 << 30;
        mtp.model.info.total_bytes += 3 << 30;
        let q = plan(&mtp, &config);
        let want = if p.gpu_layers == 0 {
            0
        } else {
            p.gpu_layers + 1
        };
        assert_eq!(q.gpu_layers, want, "{name}");
        partial |= p.gpu_layers > 0 && p.gpu_layers < snap.model.info.block_count + 1;
        assert_eq!(
            (q.n_cpu_moe, &q.pool, q.ctx_size, &q.memory),
            (p.n_cpu_moe, &p.pool, p.ctx_size, &p.memory),
            "{name}"
        );
        assert_properties(name, &mtp, &config, &q);
    }
    assert!(partial, "no case offloads part of the layers");
}

/// A partial offload of a sliding-window model: `-ngl` offloads the last layers, and
/// those may be the full-attention ones (gpt-oss: every other layer, the last included),
/// so a tier holding a layer is budgeted at least a full-attention layer's KV, and the
/// tiers together at least the whole KV.
#[test]
fn a_partial_offload_of_a_sliding_window_model_counts_full_layers_first() {
    let (snap, mut config) = load("gpu24_gpt_oss_120b");
    config.memory.vram = expertd::config::Budget::Bytes(2 << 30);
    config.plan.ctx_size = Some(32768);
    config.plan.kv_type = Some(expertd::config::KvType::F16);
    let p = plan(&snap, &config);
    let i = &snap.model.info;
    let layers = i.block_count;
    assert!(
        p.gpu_layers > 0 && p.gpu_layers < layers,
        "a partial offload: -ngl {}",
        p.gpu_layers
    );
    // one sequence: every full layer holds the context, every sliding one 768 cells
    let full_layer = (i.kv_bytes_per_token_f16 - i.kv_swa_bytes_per_token_f16) / 18 * 32768;
    let all = (i.kv_bytes_per_token_f16 - i.kv_swa_bytes_per_token_f16) * 32768
        + i.kv_swa_bytes_per_token_f16 * 768;
    let kv = |t: &str| tier(&p, t).unwrap().kv;
    // -ngl g offloads the output and the last g - 1 layers (any of them may be full)
    let on_gpu = u64::from(p.gpu_layers - 1);
    let on_cpu = u64::from(layers) - on_gpu;
    assert!(on_gpu >= 2, "-ngl {}: too few to tell", p.gpu_layers);
    assert!(
        kv("vram") >= on_gpu.min(18) * full_layer,
        "vram KV {} for {on_gpu} layers",
        kv("vram")
    );
    assert!(
        kv("ram") >= on_cpu.min(18) * full_layer,
        "ram KV {} for {on_cpu} layers",
        kv("ram")
    );
    assert!(kv("vram") + kv("ram") >= all);
    assert_properties("gpu24 with 2 GiB of VRAM", &snap, &config, &p);
}

/// A window in an architecture whose sliding layers the planner does not know: the KV
/// stays counted at the whole context in every layer, and llama-server's context
/// checkpoints (which it keeps for any model with a window) are passed and budgeted as
/// if every layer slid.
#[test]
fn an_unknown_sliding_window_layout_keeps_the_full_kv_and_budgets_checkpoints() {
    let (snap, config) = load("cpu_fits");
    let p = plan(&snap, &config);
    let mut windowed = snap.clone();
    windowed.model.info.sliding_window = 4096;
    let q = plan(&windowed, &config);
    let ram = |p: &Plan| tier(p, "ram").unwrap().clone();
    assert_eq!(ram(&q).kv, ram(&p).kv, "the same KV");
    let (n, d) = config.plan.kv_type.unwrap_or(p.kv_type).ratio_to_f16();
    let checkpoints = 32 * 4352 * snap.model.info.kv_bytes_per_token_f16 * n / d;
    assert_eq!(ram(&q).base, ram(&p).base + checkpoints);
    let at = q
        .args
        .iter()
        .position(|a| a == "--ctx-checkpoints")
        .expect("passed");
    assert_eq!(q.args[at + 1], "32");
    assert!(!p.args.iter().any(|a| a == "--ctx-checkpoints"));
    assert!(q.reasons.iter().any(|r| r.topic == "sliding_window"));
    assert_properties("cpu_fits with a window", &windowed, &config, &q);
}
