//! The patched engine with the expert pool on: the same tokens and logits as stock
//! llama.cpp at every N_SLOTS down to the experts a token uses; pool off is stock;
//! repeated and parallel requests and context shifts keep working; under a memory cap
//! below the model size the run finishes within the cap; a read error fails the request,
//! not the server.

use std::path::{Path, PathBuf};

use expertd::engine::Flavor;
use expertd::synth::{ExpertType, Preset, SynthArch, SynthConfig, write_model};
use expertd_tests::{Greedy, MemCap, Server, engine_binary, greedy_request};

/// About 150 prompt tokens with the synthetic vocabulary; the prompt is one ubatch, so it
/// goes through the staging path whenever the slots are fewer than the experts.
const PROMPT: &str = "An expert pool keeps the experts of every layer that the router \
    picks most often in a few slots of fast memory, and reads the others from the model \
    file when a token needs them. The engine asks the pool for the experts of each layer \
    and gets slot numbers back; the matrix products then read the slots. A long prompt \
    needs more experts than there are slots, so it is computed from a staging area.";

fn model(dir: &Path, preset: Preset, experts: ExpertType, seed: u64) -> (PathBuf, SynthConfig) {
    model_with(dir, preset, experts, seed, |_| {})
}

/// A model of `preset` with `experts`, changed by `tweak`.
fn model_with(
    dir: &Path,
    preset: Preset,
    experts: ExpertType,
    seed: u64,
    tweak: impl Fn(&mut SynthConfig),
) -> (PathBuf, SynthConfig) {
    let mut config = SynthConfig::preset(preset);
    config.seed = seed;
    config.expert_type = experts;
    tweak(&mut config);
    let path = dir.join(format!(
        "{}-{}-{:?}-{}x{}-{seed}.gguf",
        preset.name(),
        config.arch.name(),
        experts,
        config.layers,
        config.n_embd
    ));
    write_model(&config, &path, 2).expect("writing the model");
    (path, config)
}

fn run(flavor: Flavor, model: &Path, extra: &[&str], n_probs: usize) -> Greedy {
    let server = Server::start(&engine_binary(flavor, "llama-server"), model, extra).unwrap();
    let g = server.greedy_with_probs(PROMPT, 64, n_probs).unwrap();
    assert_eq!(g.tokens.len(), 64, "{}", g.answer);
    let evaluated = g.answer["tokens_evaluated"].as_u64().unwrap();
    assert!(evaluated >= 100, "the prompt is only {evaluated} tokens");
    g
}

fn assert_same(stock: &Greedy, other: &Greedy, what: &str) {
    assert_eq!(
        stock.tokens, other.tokens,
        "{what}: generated tokens differ from stock"
    );
    assert_eq!(stock.logprobs.len(), other.logprobs.len(), "{what}");
    for (pos, (a, b)) in stock.logprobs.iter().zip(&other.logprobs).enumerate() {
        assert_eq!(a.len(), b.len(), "{what}: position {pos}");
        for ((ta, la), (tb, lb)) in a.iter().zip(b) {
            assert!(
                ta == tb && la.to_bits() == lb.to_bits(),
                "{what}: position {pos}: stock has token {ta} at {la}, got token {tb} at {lb}"
            );
        }
    }
}

/// Stock, patched with the pool off, and the pool at each slot count give bit-identical
/// greedy output and full log-probability vectors (n_probs = the vocabulary). The slot
/// counts in `prefetch_at` run once more with prefetch (decode read-ahead) on, those in
/// `wait_all_at` once more with EXPERTD_POOL_OVERLAP=off (a request waits for all its
/// reads before any matmul, instead of each matmul waiting for its projection's).
fn check_exact(
    preset: Preset,
    experts: ExpertType,
    slots: &[u32],
    prefetch_at: &[u32],
    wait_all_at: &[u32],
) {
    check_exact_arch(preset, |_| {}, experts, slots, prefetch_at, wait_all_at);
}

/// [`check_exact`] on a model changed by `tweak` (another architecture, layer count or
/// shape).
fn check_exact_arch(
    preset: Preset,
    tweak: impl Fn(&mut SynthConfig),
    experts: ExpertType,
    slots: &[u32],
    prefetch_at: &[u32],
    wait_all_at: &[u32],
) {
    let dir = tempfile::tempdir().unwrap();
    let (path, config) = model_with(dir.path(), preset, experts, 5, tweak);
    let arch = config.arch;
    let n_probs = config.vocab as usize;
    assert!(slots.contains(&config.n_expert_used) && slots.contains(&config.n_expert));

    let stock = run(Flavor::Stock, &path, &[], n_probs);
    assert_eq!(stock.logprobs[0].len(), n_probs);
    let off = run(Flavor::Patched, &path, &[], n_probs);
    assert_same(&stock, &off, "pool off");
    let runs = slots
        .iter()
        .map(|&n| (n, false, true))
        .chain(prefetch_at.iter().map(|&n| (n, true, true)))
        .chain(wait_all_at.iter().map(|&n| (n, false, false)));
    for (n, prefetch, overlap) in runs {
        let stats = dir
            .path()
            .join(format!("stats-{n}-{prefetch}-{overlap}.json"));
        let args = [
            "--expert-pool-slots",
            &n.to_string(),
            "--expert-pool-stats",
            stats.to_str().unwrap(),
            "--expert-pool-prefetch",
            if prefetch { "on" } else { "off" },
        ];
        let env: &[(&str, &str)] = if overlap {
            &[]
        } else {
            &[("EXPERTD_POOL_OVERLAP", "off")]
        };
        let server = Server::start_with_env(
            &engine_binary(Flavor::Patched, "llama-server"),
            &path,
            &args,
            env,
        )
        .unwrap();
        let pooled = server.greedy_with_probs(PROMPT, 64, n_probs).unwrap();
        server.stop().unwrap(); // the pool writes its stats once more when the model is freed
        assert_same(
            &stock,
            &pooled,
            &format!(
                "{} {} {experts:?}, {n} slots, prefetch {prefetch}, overlap {overlap}",
                preset.name(),
                arch.name()
            ),
        );

        // The pool really served the run: every decode step of every layer went
        // through the slots, and the prompt through staging when slots < experts.
        let s: serde_json::Value = serde_json::from_slice(&std::fs::read(&stats).unwrap()).unwrap();
        let total = &s["total"];
        let layers = u64::from(config.moe_layers());
        assert!(total["requests"].as_u64().unwrap() >= 63 * layers, "{s}");
        // the pool serves exactly the layers with experts (hy_v3 has dense ones)
        let served: Vec<u64> = s["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["layer"].as_u64().unwrap())
            .collect();
        let moe: Vec<u64> = (0..config.layers)
            .filter(|&l| !config.is_dense(l))
            .map(u64::from)
            .collect();
        assert_eq!(served, moe, "{s}");
        for l in s["layers"].as_array().unwrap() {
            assert!(l["counters"]["requests"].as_u64().unwrap() >= 63, "{s}");
        }
        assert_eq!(total["errors"], 0, "{s}");
        // Decode read-ahead (prefetch on) filled misses from reads started a layer
        // early; off, none (a prompt's last layer, served by a request, gets no
        // read-ahead). The pool's slot-filling prefetch is not used by the engine.
        let ahead_fills = total["ahead_fills"].as_u64().unwrap();
        assert_eq!(total["prefetch_issued"], 0, "{s}");
        if !prefetch {
            assert_eq!(ahead_fills, 0, "{s}");
        } else if n < config.n_expert {
            assert!(ahead_fills > 0, "prefetch on but no miss read ahead: {s}");
        }
        if n < config.n_expert {
            assert!(
                total["staged"].as_u64().unwrap() >= layers - 1,
                "prompt not staged: {s}"
            );
            assert!(total["misses"].as_u64().unwrap() > 0, "{s}");
            // The prompt's later layers were read ahead while the previous MoE layer
            // computed (across dense layers between them), all but the first MoE layer
            // and the model's last (which computes the output row only, not staged).
            let last = u64::from(config.layers - 1);
            let read_ahead: Vec<u64> = served[1..].iter().copied().filter(|&l| l != last).collect();
            for l in s["layers"].as_array().unwrap() {
                if read_ahead.contains(&l["layer"].as_u64().unwrap()) {
                    assert!(
                        l["counters"]["stage_ahead_used"].as_u64().unwrap() > 0,
                        "layer {} not read ahead for staging: {s}",
                        l["layer"]
                    );
                }
            }
        } else {
            assert_eq!(total["staged"], 0, "{s}");
        }
    }
}

#[test]
fn pool_is_bit_exact_on_tiny_q4_k() {
    check_exact(
        Preset::Tiny,
        ExpertType::Q4K,
        &[4, 8, 16, 32],
        &[4, 8],
        &[4],
    );
}

#[test]
fn pool_is_bit_exact_on_tiny_q8_0() {
    // Q8_0 experts are not repacked on x86: slots are plain memory the pool writes itself.
    check_exact(Preset::Tiny, ExpertType::Q8_0, &[4, 32], &[4], &[4]);
}

#[test]
fn pool_is_bit_exact_on_tiny_q4_k_m() {
    // Mixed like llama.cpp's Q4_K_M files: gate and up Q4_K, down Q6_K in even layers, so
    // a layer's projections differ in size and layout (on x86 Q4_K slots are repacked,
    // Q6_K ones are plain memory the pool writes itself), and the layers differ.
    check_exact(Preset::Tiny, ExpertType::Q4KM, &[4, 8, 32], &[4], &[4]);
}

#[test]
fn pool_is_bit_exact_on_tiny_q2_k() {
    // Q2_K, as the smallest quants of the largest MoE models have most experts: on x86
    // with AVX-512 its slots are repacked (q2_K 8x8), elsewhere plain memory.
    check_exact(Preset::Tiny, ExpertType::Q2K, &[4, 8, 32], &[4], &[4]);
}

#[test]
fn pool_is_bit_exact_on_fused_gate_up_experts() {
    // hy_v3: gate and up in one expert tensor (the pool's GATE_UP projection, read and
    // waited for before down), a shared expert outside the pool, sigmoid routing, and
    // dense layers the pool does not serve: the first, and one between two MoE layers,
    // which read-ahead (staging, and decode with prefetch on) skips to the next MoE layer.
    // Six layers: dense 0 and 3, MoE 1, 2, 4, 5 (a prompt's last layer is never staged,
    // so read-ahead across layer 3 needs MoE layers after 4).
    check_exact_arch(
        Preset::Tiny,
        |c| {
            c.arch = SynthArch::HyV3;
            c.layers = 6;
        },
        ExpertType::Q4K,
        &[4, 8, 32],
        &[4],
        &[4],
    );
}

#[test]
fn pool_is_bit_exact_on_gpt_oss() {
    // gpt-oss: MXFP4 experts (repacked on x86, like Q4_K), per-expert biases that keep
    // the router's expert ids while the matmuls read slots, a router bias, the clamped
    // SwiGLU, attention sinks, and a window of 128 tokens in every other layer, which the
    // prompt (about 150 tokens) and the 64 generated ones run past. Rows of 288 weights,
    // as gpt-oss's 2880 a multiple of MXFP4's 32 but not of 256 (9 blocks per row).
    check_exact_arch(
        Preset::Tiny,
        |c| {
            c.arch = SynthArch::GptOss;
            c.n_embd = 288;
            c.expert_ffn = 288;
        },
        ExpertType::Mxfp4,
        &[4, 8, 32],
        &[4],
        &[4],
    );
}

#[test]
fn pool_is_bit_exact_on_glm4moe() {
    // GLM-4.5's layout: a dense first layer, a shared expert, sigmoid routing with a
    // selection bias, and a multi-token-prediction block (with experts) after the last
    // layer, which llama.cpp skips without MTP: the pool must leave it alone (loading
    // such a model with the pool on failed before: the loader counted the skipped
    // expert tensors twice).
    check_exact_arch(
        Preset::Tiny,
        |c| c.arch = SynthArch::Glm4Moe,
        ExpertType::Q4K,
        &[4, 8, 32],
        &[4],
        &[4],
    );
}

/// MTP speculative decoding (`--spec-type draft-mtp`) on glm4moe: the MTP block drafts
/// tokens in a context of its own, computing its own experts, which the pool serves as
/// one more MoE layer, and the main context checks the drafts in ubatches of several
/// tokens. The pool gives the same tokens and logits as stock with the same decoding.
#[test]
fn pool_is_bit_exact_with_mtp_speculative_decoding() {
    let dir = tempfile::tempdir().unwrap();
    let (path, config) = model_with(dir.path(), Preset::Tiny, ExpertType::Q4K, 5, |c| {
        c.arch = SynthArch::Glm4Moe
    });
    let n_probs = config.vocab as usize;
    let spec = ["--spec-type", "draft-mtp"];
    let stock = run(Flavor::Stock, &path, &spec, n_probs);
    let drafted = |g: &Greedy| g.answer["timings"]["draft_n"].as_u64().unwrap_or(0);
    assert!(
        drafted(&stock) > 0,
        "stock drafted nothing: {}",
        stock.answer
    );
    let mtp_layer = u64::from(config.layers); // the block after the last layer
    for n in [config.n_expert_used, 2 * config.n_expert_used] {
        let stats = dir.path().join(format!("mtp-stats-{n}.json"));
        let mut args = spec.to_vec();
        let n_str = n.to_string();
        args.extend([
            "--expert-pool-slots",
            &n_str,
            "--expert-pool-stats",
            stats.to_str().unwrap(),
        ]);
        let server = Server::start(
            &engine_binary(Flavor::Patched, "llama-server"),
            &path,
            &args,
        )
        .unwrap();
        let pooled = server.greedy_with_probs(PROMPT, 64, n_probs).unwrap();
        server.stop().unwrap(); // the pool writes its stats once more when the model is freed
        assert_eq!(drafted(&pooled), drafted(&stock), "{}", pooled.answer);
        assert_same(
            &stock,
            &pooled,
            &format!("MTP speculative decoding, {n} slots"),
        );
        let s: serde_json::Value = serde_json::from_slice(&std::fs::read(&stats).unwrap()).unwrap();
        assert_eq!(s["total"]["errors"], 0, "{s}");
        let mtp = s["layers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["layer"].as_u64() == Some(mtp_layer))
            .unwrap_or_else(|| panic!("the MTP block is not served: {s}"));
        assert!(
            mtp["counters"]["requests"].as_u64().unwrap() > 0,
            "the MTP block's experts never went through the pool: {s}"
        );
    }
}

#[test]
fn pool_is_bit_exact_on_mid_q4_k() {
    check_exact(
        Preset::Mid,
        ExpertType::Q4K,
        &[8, 16, 32, 64],
        &[8, 16],
        &[8],
    );
}

/// `kB` fields of /proc/PID/status, in bytes.
fn proc_status(pid: u32) -> std::collections::BTreeMap<String, u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            let kb: u64 = v.trim().strip_suffix(" kB")?.parse().ok()?;
            Some((k.to_string(), kb << 10))
        })
        .collect()
}

/// In every load mode llama.cpp has (mmap, none, mlock, mmap+mlock, dio), the pooled
/// expert weights stay in the file: not paged in through the mapping, not read into
/// anonymous memory, not locked; and the output is stock's.
#[test]
fn pooled_experts_stay_in_the_file_in_every_load_mode() {
    let dir = tempfile::tempdir().unwrap();
    let (path, config) = model(dir.path(), Preset::Mid, ExpertType::Q4K, 5);
    let info = expertd::gguf::ModelInfo::from_gguf(&expertd::gguf::GgufFile::open(&path).unwrap())
        .unwrap();
    let experts = info.expert_bytes;
    let short = "The expert pool keeps the experts in slots.";
    // stock reading everything into memory: the anonymous memory the experts would take
    let stock = Server::start(
        &engine_binary(Flavor::Stock, "llama-server"),
        &path,
        &["-lm", "none"],
    )
    .unwrap();
    let (stock_tokens, _) = stock.greedy(short, 16).unwrap();
    let stock_anon = proc_status(stock.pid())["RssAnon"];
    stock.stop().unwrap();
    assert!(
        stock_anon > experts,
        "stock -lm none holds {stock_anon} bytes"
    );
    let slots = (2 * config.n_expert_used).to_string();
    for mode in ["mmap", "none", "mlock", "mmap+mlock", "dio"] {
        let server = Server::start(
            &engine_binary(Flavor::Patched, "llama-server"),
            &path,
            &["-lm", mode, "--expert-pool-slots", &slots],
        )
        .unwrap();
        let (tokens, _) = server.greedy(short, 16).unwrap();
        let st = proc_status(server.pid());
        server.stop().unwrap();
        assert_eq!(tokens, stock_tokens, "-lm {mode}");
        let what = format!("-lm {mode}: {st:?}, experts {experts} bytes");
        // not paged in through the mapping
        assert!(st["RssFile"] < experts / 4, "{what}");
        // not read into memory: the slots, staging area and buffers take far less
        assert!(st["RssAnon"] + experts / 2 < stock_anon, "{what}");
        // not locked (the non-expert weights may be)
        assert!(st["VmLck"] <= info.non_expert_bytes + (8 << 20), "{what}");
    }
}

/// A model split over three GGUF files (llama.cpp's `gguf-split` layout, written by
/// `expertd::gguf::write_split`): stock reads the split files like the whole one, and the
/// pool, whose experts now come from three files at other offsets, gives the same tokens
/// and logits.
#[test]
fn pool_is_bit_exact_on_a_split_model() {
    let dir = tempfile::tempdir().unwrap();
    let (path, config) = model(dir.path(), Preset::Tiny, ExpertType::Q4K, 5);
    let n_probs = config.vocab as usize;
    let splits = expertd::gguf::write_split(&path, 3).unwrap();
    assert_eq!(splits.len(), 3);
    // every split holds expert tensors, so every file is read by the pool
    for p in &splits {
        let f = expertd::gguf::GgufFile::open(p).unwrap();
        assert!(
            f.tensors
                .iter()
                .any(|t| expertd::gguf::is_expert_tensor(&t.name)),
            "{} holds no expert tensor",
            p.display()
        );
    }
    let stock = run(Flavor::Stock, &path, &[], n_probs);
    let stock_split = run(Flavor::Stock, &splits[0], &[], n_probs);
    assert_same(&stock, &stock_split, "stock on the split model");
    for n in [config.n_expert_used, 2 * config.n_expert_used] {
        let stats = dir.path().join(format!("split-stats-{n}.json"));
        let args = [
            "--expert-pool-slots",
            &n.to_string(),
            "--expert-pool-stats",
            stats.to_str().unwrap(),
        ];
        let server = Server::start(
            &engine_binary(Flavor::Patched, "llama-server"),
            &splits[0],
            &args,
        )
        .unwrap();
        let pooled = server.greedy_with_probs(PROMPT, 64, n_probs).unwrap();
        server.stop().unwrap();
        assert_same(&stock, &pooled, &format!("split model, {n} slots"));
        let s: serde_json::Value = serde_json::from_slice(&std::fs::read(&stats).unwrap()).unwrap();
        let total = &s["total"];
        assert!(total["misses"].as_u64().unwrap() > 0, "{s}");
        assert_eq!(total["errors"], 0, "{s}");
    }
}

/// `--expert-pool-trace`: the engine records the routing of its generated tokens in the
/// trace format, and writes it while it runs (every 10 s), so an engine killed with
/// SIGKILL keeps it.
#[test]
fn the_routing_trace_survives_a_killed_engine() {
    let dir = tempfile::tempdir().unwrap();
    let (path, config) = model(dir.path(), Preset::Tiny, ExpertType::Q4K, 5);
    let trace = dir.path().join("routing.trace");
    let server = Server::start(
        &engine_binary(Flavor::Patched, "llama-server"),
        &path,
        &[
            "--expert-pool-slots",
            "8",
            "--expert-pool-trace",
            trace.to_str().unwrap(),
        ],
    )
    .unwrap();
    let (tokens, _) = server.greedy(PROMPT, 16).unwrap();
    assert_eq!(tokens.len(), 16);
    // The 15 decode steps after the prompt's (whose last layer computes only the output
    // row, so the prompt is not a token of the trace), on disk while the engine runs.
    let start = std::time::Instant::now();
    let t = loop {
        match expert_pool::trace::Trace::read(&trace) {
            Ok(t) if t.tokens() >= 15 => break t,
            _ => {}
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(30),
            "no trace of the generated tokens on disk after 30 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let status = std::process::Command::new("kill")
        .args(["-KILL", &server.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    drop(server);
    // still whole and the same after the kill
    let after = expert_pool::trace::Trace::read(&trace).unwrap();
    assert_eq!(after.ids, t.ids);
    assert_eq!(
        (t.layers, t.experts, t.used, t.tokens()),
        (
            config.moe_layers(),
            config.n_expert,
            config.n_expert_used,
            15
        )
    );
}

#[test]
fn repeated_and_parallel_requests_and_context_shift_work_with_the_pool() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = model(dir.path(), Preset::Tiny, ExpertType::Q4K, 9);
    let patched = engine_binary(Flavor::Patched, "llama-server");
    let stock = engine_binary(Flavor::Stock, "llama-server");

    // Two slots of the server, 4 experts per layer in the pool (the experts one token
    // uses): a decode step with both sequences needs staging.
    let stats = dir.path().join("stats.json");
    let pool_args = [
        "--expert-pool-slots",
        "4",
        "-np",
        "2",
        "-c",
        "2048",
        "--expert-pool-stats",
        stats.to_str().unwrap(),
    ];
    let server = Server::start(&patched, &path, &pool_args).unwrap();
    let reference = Server::start(&stock, &path, &["-np", "2", "-c", "2048"]).unwrap();
    let want = reference
        .greedy("Repeated requests give the same answer.", 24)
        .unwrap()
        .0;
    for round in 0..3 {
        let got = server
            .greedy("Repeated requests give the same answer.", 24)
            .unwrap()
            .0;
        assert_eq!(got, want, "round {round}");
    }
    std::thread::scope(|s| {
        let handles: Vec<_> = [
            "The first of two requests",
            "A second one, running alongside",
        ]
        .into_iter()
        .map(|p| s.spawn(|| server.greedy(p, 40).unwrap().0))
        .collect();
        for h in handles {
            assert_eq!(h.join().unwrap().len(), 40);
        }
    });
    server.stop().unwrap();
    let s: serde_json::Value = serde_json::from_slice(&std::fs::read(&stats).unwrap()).unwrap();
    assert_eq!(s["total"]["errors"], 0, "{s}");
    assert!(s["total"]["requests"].as_u64().unwrap() > 0, "{s}");

    // Context shift: a 128-token context overflows several times during 300 tokens.
    let shift = ["-c", "128", "--context-shift", "--keep", "8"];
    let mut pooled_shift: Vec<&str> = shift.to_vec();
    pooled_shift.extend(["--expert-pool-slots", "8"]);
    let a = Server::start(&stock, &path, &shift)
        .unwrap()
        .greedy("Context shift", 300)
        .unwrap()
        .0;
    let b = Server::start(&patched, &path, &pooled_shift)
        .unwrap()
        .greedy("Context shift", 300)
        .unwrap()
        .0;
    assert_eq!(a.len(), 300);
    assert_eq!(a, b, "context shift: the pool changed the output");
}

/// A greedy completion's HTTP status and answer, errors included.
fn completion_status(server: &Server, prompt: &str, n_predict: usize) -> (u16, serde_json::Value) {
    server
        .post_any("/completion", &greedy_request(prompt, n_predict, 0))
        .expect("the server answers")
}

#[test]
fn a_read_error_fails_the_request_and_the_server_keeps_serving() {
    // The model file loses everything from the middle of layer 1's down projections on
    // (experts 16-31 there, and the later layers' experts; the other weights were loaded
    // into memory at start-up) while llama-server runs with 4 slots per layer: the next
    // prompt needs those experts, the pool's read fails, and that request gets an error
    // while the server stays up. Once the bytes (and the mtime) are back, the same request
    // gives the same tokens as before: nothing of the failed one was kept.
    let dir = tempfile::tempdir().unwrap();
    let mut config = SynthConfig::preset(Preset::Tiny);
    config.seed = 13;
    let path = dir.path().join("tiny.gguf");
    let manifest = write_model(&config, &path, 2).expect("writing the model");
    let down1 = manifest
        .tensors
        .iter()
        .find(|t| t.name == "blk.1.ffn_down_exps.weight")
        .unwrap();
    assert!(config.layers > 2);
    let cut = manifest.data_offset + down1.offset + down1.size / 2;

    let stats = dir.path().join("stats.json");
    let server = Server::start(
        &engine_binary(Flavor::Patched, "llama-server"),
        &path,
        &[
            "--expert-pool-slots",
            "4",
            "--expert-pool-stats",
            stats.to_str().unwrap(),
        ],
    )
    .unwrap();
    let prompt = "The file under the pool loses a piece while it serves.";
    let (status, before) = completion_status(&server, prompt, 24);
    assert_eq!(status, 200, "{before}");

    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    let mtime = file.metadata().unwrap().modified().unwrap();
    let bytes = std::fs::read(&path).unwrap();
    file.set_len(cut).unwrap();

    let (status, failed) = completion_status(&server, prompt, 24);
    assert_eq!(
        status, 500,
        "a request whose experts cannot be read: {failed}"
    );
    let why = [
        "the expert pool failed, the computation is discarded",
        "staging experts failed: EP_ERR_FILE_CHANGED",
        "was truncated",
    ];
    let log = server.log_containing(&why, std::time::Duration::from_secs(10));
    assert!(
        why.iter().all(|n| log.contains(n)),
        "llama-server's log does not say why:\n{log}"
    );
    // The same at decode: a one-token prompt (BOS) fits the slots, so every step asks
    // the pool to make its experts resident (the prompt above was staged).
    let (status, failed) = completion_status(&server, "", 24);
    assert_eq!(
        status, 500,
        "decoding with experts that cannot be read: {failed}"
    );
    let why = "making experts resident failed: EP_ERR_FILE_CHANGED";
    let log = server.log_containing(&[why], std::time::Duration::from_secs(10));
    assert!(
        log.contains(why),
        "llama-server's log does not say why:\n{log}"
    );
    let health = ureq::get(&server.url("/health"))
        .call()
        .map(|r| r.status().as_u16());
    assert_eq!(
        health.ok(),
        Some(200),
        "the server is not healthy after the error"
    );

    // The bytes come back as they were (same size, same mtime): the pool serves again.
    use std::io::{Seek, SeekFrom, Write};
    let mut file = file;
    file.seek(SeekFrom::Start(cut)).unwrap();
    file.write_all(&bytes[cut as usize..]).unwrap();
    file.set_modified(mtime).unwrap();
    drop(file);
    let (status, after) = completion_status(&server, prompt, 24);
    assert_eq!(status, 200, "{after}");
    assert_eq!(
        after["tokens"], before["tokens"],
        "after the failed request"
    );

    server.stop().unwrap();
    let s: serde_json::Value = serde_json::from_slice(&std::fs::read(&stats).unwrap()).unwrap();
    // One error per failed request: after the first failure a computation skips the
    // pool (layers 2 and 3 would have failed too).
    assert_eq!(s["total"]["errors"], 2, "{s}");
}

#[test]
fn pool_run_fits_under_a_memory_cap_below_the_model_size() {
    // A 450 MiB model: 8 layers of 128 experts (8 used), expert FFN 512.
    let dir = tempfile::tempdir().unwrap();
    let mut config = SynthConfig::preset(Preset::Mid);
    config.n_expert = 128;
    config.expert_ffn = 512;
    config.seed = 3;
    let path = dir.path().join("capped.gguf");
    write_model(&config, &path, 2).unwrap();
    let model_bytes = std::fs::metadata(&path).unwrap().len();
    // Non-expert weights, 16 slots and the staging area of 8 layers, KV and buffers take
    // about 220 MiB; the rest of the cap is for the binary and the page cache.
    let limit: u64 = 320 << 20;
    assert!(
        model_bytes > limit * 13 / 10,
        "the model ({model_bytes} bytes) must exceed the cap"
    );

    let cap = match MemCap::new(limit) {
        Ok(cap) => cap,
        Err(why) => {
            println!("SKIPPED pool_run_fits_under_a_memory_cap_below_the_model_size: {why}");
            return;
        }
    };
    // Page cache from writing the model would count against the group: start clean.
    let _ = std::process::Command::new("sh")
        .args(["-c", "sync; echo 1 > /proc/sys/vm/drop_caches"])
        .status();
    let args = ["--expert-pool-slots", "16", "-c", "1024"];
    let server = Server::start_in(
        &engine_binary(Flavor::Patched, "llama-server"),
        &path,
        &args,
        &[],
        Some(&cap),
    )
    .expect("the pool run starts under the cap");
    let g = server.greedy_with_probs(PROMPT, 32, 1).unwrap();
    assert_eq!(g.tokens.len(), 32);
    let peak = server.peak_rss().unwrap();
    let (failcnt, oom) = cap.pressure();
    server.stop().unwrap();
    println!(
        "capped run: model {model_bytes} bytes, cap {limit}, peak RSS {peak}, limit hits {failcnt}"
    );
    assert!(!oom, "the OOM killer acted in the group");
    assert!(peak < limit, "peak RSS {peak} exceeds the cap {limit}");
}
