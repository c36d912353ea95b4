//! Records routing traces from the tiny synthetic model with the real (stock) libllama and
//! checks them: the pool's reader takes them, the shape is right, every group is valid,
//! recordings are reproducible, batching does not change them, and the recorded routing
//! is the model's routing, computed independently from the GGUF's weights for the first
//! token through every layer.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use expert_pool::trace::Trace;
use expertd::gguf::{GgmlType, GgufFile};
use expertd::synth::{self, Locality, Preset, SynthConfig, quant};
use expertd_recorder::{Prompt, RecordOptions, Recording, Stop, record};

const TEXT: &str = "The lighthouse keeper climbed the spiral stairs every evening, counting the \
    steps out of habit. Ninety-one, always ninety-one. From the lamp room he could see the \
    fishing boats coming home, their lights strung along the dark water like beads.";

/// The tiny preset, written once per test process.
fn tiny() -> &'static (tempfile::TempDir, PathBuf) {
    static MODEL: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    MODEL.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tiny.gguf");
        synth::write_model(&SynthConfig::preset(Preset::Tiny), &path, 2).expect("tiny model");
        (dir, path)
    })
}

fn opts(prompt: Prompt, generate: u32) -> RecordOptions {
    RecordOptions {
        threads: Some(2),
        ..RecordOptions::new(&tiny().1, prompt, generate)
    }
}

fn check_shape(rec: &Recording, c: &SynthConfig) {
    let t = &rec.trace;
    assert_eq!(t.layers, c.layers, "every layer of qwen3moe is a MoE layer");
    assert_eq!(t.experts, c.n_expert);
    assert_eq!(t.used, c.n_expert_used);
    assert_eq!(rec.moe_layers, (0..c.layers).collect::<Vec<_>>());
    assert_eq!(t.tokens(), rec.prompt_tokens + rec.generated_tokens);
    assert_eq!(t.tokens(), rec.tokens.len());
    for tok in 0..t.tokens() {
        for l in 0..t.layers as usize {
            let g = t.get(tok, l);
            assert_eq!(g.len(), c.n_expert_used as usize);
            for (j, &id) in g.iter().enumerate() {
                assert!(u32::from(id) < c.n_expert, "token {tok} layer {l}: id {id}");
                assert!(
                    !g[..j].contains(&id),
                    "token {tok} layer {l}: {id} repeated"
                );
            }
        }
    }
}

#[test]
fn text_prompt_trace_is_valid_and_reproducible() {
    let c = SynthConfig::preset(Preset::Tiny);
    let rec = record(&opts(Prompt::Text(TEXT.into()), 12)).expect("recording");
    assert_eq!(rec.arch, "qwen3moe");
    assert_eq!(rec.tokens[0], 1, "the prompt starts with BOS");
    assert!(
        rec.prompt_tokens > 20,
        "{} prompt tokens",
        rec.prompt_tokens
    );
    assert_eq!(
        rec.stop,
        Stop::Length,
        "greedy output of the synth model is text"
    );
    assert_eq!(rec.generated_tokens, 12);
    check_shape(&rec, &c);

    // The pool's reader takes both encodings and gets the same trace back.
    let dir = tempfile::tempdir().unwrap();
    for text in [false, true] {
        let p = dir.path().join(format!("t{text}"));
        rec.trace.write(&p, text).unwrap();
        assert_eq!(Trace::read(&p).unwrap(), rec.trace);
    }

    // Same model, prompt and options: the same trace and the same tokens.
    let again = record(&opts(Prompt::Text(TEXT.into()), 12)).unwrap();
    assert_eq!(again.trace, rec.trace);
    assert_eq!(again.tokens, rec.tokens);

    // The generated-only trace is the tail of the full one.
    let gen_only = rec.generated_only().unwrap();
    assert_eq!(gen_only.tokens(), 12);
    for tok in 0..12 {
        for l in 0..c.layers as usize {
            assert_eq!(
                gen_only.get(tok, l),
                rec.trace.get(rec.prompt_tokens + tok, l)
            );
        }
    }
}

#[test]
fn seeded_sampling_is_reproducible() {
    let sampled = |seed| {
        record(&RecordOptions {
            temp: 1.0,
            seed,
            ignore_eos: true,
            ..opts(Prompt::Random(24), 16)
        })
        .unwrap()
    };
    let a = sampled(7);
    check_shape(&a, &SynthConfig::preset(Preset::Tiny));
    assert_eq!(a.prompt_tokens, 25, "BOS + 24 random tokens");
    let b = sampled(7);
    assert_eq!(a.tokens, b.tokens);
    assert_eq!(a.trace, b.trace);
    let other = sampled(8);
    assert_ne!(
        a.tokens, other.tokens,
        "another seed draws another prompt and other samples"
    );
}

/// The routing of a prompt must not depend on how it is cut into batches: a wrong column
/// stride or token order in the capture would scramble it.
#[test]
fn batching_does_not_change_the_routing() {
    let whole = record(&opts(Prompt::Text(TEXT.into()), 0)).unwrap();
    let n = whole.trace.tokens();
    for batch in [1, 7] {
        let cut = record(&RecordOptions {
            batch,
            ..opts(Prompt::Text(TEXT.into()), 0)
        })
        .unwrap();
        assert_eq!(cut.tokens, whole.tokens);
        let mut same = 0;
        let mut total = 0;
        for tok in 0..n {
            for l in 0..whole.trace.layers as usize {
                let mut a = whole.trace.get(tok, l).to_vec();
                let mut b = cut.trace.get(tok, l).to_vec();
                a.sort_unstable();
                b.sort_unstable();
                same += usize::from(a == b);
                total += 1;
            }
        }
        // Different kernels for 1 and for many rows round differently, which may flip a
        // near tie now and then; scrambled columns would match almost nowhere.
        assert!(
            same as f64 >= 0.95 * total as f64,
            "batch {batch}: {same} of {total} (token, layer) groups agree"
        );
    }
}

/// The calibrated locality settings move the recorded routing the way they promise, on
/// real text: `realistic` has more consecutive-token reuse and a higher LRU hit rate than
/// the default knobs, `hard` less. (The numbers they are calibrated to are for the bench
/// preset and are measured by a benchmark, bench/RESULTS.md; this checks the direction
/// on the tiny preset.)
#[test]
fn locality_settings_order_the_routing() {
    let dir = tempfile::tempdir().unwrap();
    let text = include_str!("../../../bench/prompts/harbor.txt");
    let mut got = Vec::new();
    for loc in [Locality::Hard, Locality::Default, Locality::Realistic] {
        let path = dir.path().join(format!("{}.gguf", loc.name()));
        let cfg = SynthConfig::preset(Preset::Tiny).with_locality(loc);
        synth::write_model(&cfg, &path, 2).unwrap();
        let rec = record(&RecordOptions {
            threads: Some(2),
            ..RecordOptions::new(&path, Prompt::Text(text.into()), 0)
        })
        .unwrap();
        let s = expert_pool::trace::stats(&rec.trace);
        let n = s.len() as f64;
        let reuse = s.iter().map(|l| l.reuse).sum::<f64>() / n;
        let lru = s.iter().map(|l| l.lru_hit_rate_25).sum::<f64>() / n;
        got.push((loc.name(), reuse, lru));
    }
    let [(_, r_hard, l_hard), (_, r_def, l_def), (_, r_real, l_real)] = got[..] else {
        unreachable!()
    };
    assert!(
        r_hard + 0.04 < r_def && r_def + 0.08 < r_real,
        "consecutive-token reuse (hard, default, realistic): {got:?}"
    );
    assert!(
        l_hard + 0.06 < l_def && l_def + 0.06 < l_real,
        "LRU hit rate at a quarter of the experts (hard, default, realistic): {got:?}"
    );
}

/// Reads a tensor's bytes from the GGUF.
fn tensor(g: &GgufFile, f: &File, name: &str) -> (Vec<u8>, GgmlType, Vec<u64>) {
    let t = g.tensor(name).unwrap_or_else(|| panic!("{name} missing"));
    let mut buf = vec![0u8; t.size as usize];
    f.read_exact_at(&mut buf, g.absolute_offset(t)).unwrap();
    (buf, t.ggml_type, t.dims.clone())
}

/// Dequantizes a whole tensor of Q8_0, Q4_K or F32 rows.
fn dequant(bytes: &[u8], ty: GgmlType) -> Vec<f32> {
    match ty {
        GgmlType::Q8_0 => quant::dequant_q8_0(bytes),
        GgmlType::Q4_K => quant::dequant_q4_k(bytes),
        GgmlType::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        other => panic!("unexpected type {other:?}"),
    }
}

fn rms_norm(x: &[f32], eps: f32) -> Vec<f32> {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let s = 1.0 / (ms + eps).sqrt();
    x.iter().map(|v| v * s).collect()
}

/// `rows` rows of `x.len()` weights times `x`.
fn matvec(w: &[f32], x: &[f32]) -> Vec<f32> {
    w.chunks_exact(x.len())
        .map(|row| row.iter().zip(x).map(|(a, b)| a * b).sum())
        .collect()
}

/// Expert ids by descending logit, and the gap between the k-th and the (k+1)-th logit.
fn top_k(logits: &[f32], k: usize) -> (Vec<u16>, f32) {
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    let gap = logits[idx[k - 1]] - logits[idx[k]];
    (idx[..k].iter().map(|&i| i as u16).collect(), gap)
}

/// The first token sees only itself: attention returns its own value vector, so the whole
/// forward pass of token 0 needs no attention scores, RoPE or KV cache. This computes it
/// from the weights in the file (norm weights are 1 in synth models, and checked) and
/// compares the router's top-k of every layer with the trace.
#[test]
fn recorded_routing_is_the_models_routing() {
    let c = SynthConfig::preset(Preset::Tiny);
    let path = &tiny().1;
    let rec = record(&opts(Prompt::Text(TEXT.into()), 0)).unwrap();
    let g = GgufFile::open(path).unwrap();
    let f = File::open(path).unwrap();
    let (n_embd, hd) = (c.n_embd as usize, c.head_dim() as usize);
    let group = (c.n_head / c.n_head_kv) as usize;
    let (n_ff, k) = (c.expert_ffn as usize, c.n_expert_used as usize);
    let eps = 1e-6;

    let (emb, ty, dims) = tensor(&g, &f, "token_embd.weight");
    assert_eq!(dims[0] as usize, n_embd);
    let row_bytes = emb.len() / dims[1] as usize;
    let tok0 = rec.tokens[0] as usize;
    let mut h = dequant(&emb[tok0 * row_bytes..(tok0 + 1) * row_bytes], ty);

    let mut checked = 0;
    for l in 0..c.layers as usize {
        let w = |s: &str| {
            let (b, ty, _) = tensor(&g, &f, &format!("blk.{l}.{s}.weight"));
            dequant(&b, ty)
        };
        for norm in ["attn_norm", "ffn_norm"] {
            assert!(
                w(norm).iter().all(|&v| v == 1.0),
                "{norm} of layer {l} is not 1"
            );
        }
        // Attention of a single token: each query head gets its KV head's value.
        let v = matvec(&w("attn_v"), &rms_norm(&h, eps));
        let heads: Vec<f32> = (0..c.n_head as usize)
            .flat_map(|q| v[(q / group) * hd..(q / group + 1) * hd].to_vec())
            .collect();
        let o = matvec(&w("attn_output"), &heads);
        for (hi, oi) in h.iter_mut().zip(&o) {
            *hi += oi;
        }
        // The router.
        let x = rms_norm(&h, eps);
        let logits = matvec(&w("ffn_gate_inp"), &x);
        let (want, gap) = top_k(&logits, k);
        let mut got = rec.trace.get(0, l).to_vec();
        let mut want_sorted = want.clone();
        got.sort_unstable();
        want_sorted.sort_unstable();
        assert_eq!(
            got, want_sorted,
            "layer {l}: recorded experts vs the reference top-{k} (gap between the k-th and \
             the next logit: {gap})"
        );
        checked += 1;
        // The experts: softmax weights over the top k, normalized (qwen3moe norm_w).
        let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let p: Vec<f32> = want
            .iter()
            .map(|&e| (logits[e as usize] - m).exp())
            .collect();
        let sum: f32 = p.iter().sum();
        let (gate_b, gty, _) = tensor(&g, &f, &format!("blk.{l}.ffn_gate_exps.weight"));
        let (up_b, uty, _) = tensor(&g, &f, &format!("blk.{l}.ffn_up_exps.weight"));
        let (down_b, dty, _) = tensor(&g, &f, &format!("blk.{l}.ffn_down_exps.weight"));
        let per = |b: &[u8], e: usize| {
            let n = b.len() / c.n_expert as usize;
            b[e * n..(e + 1) * n].to_vec()
        };
        let mut out = vec![0f32; n_embd];
        for (j, &e) in want.iter().enumerate() {
            let e = e as usize;
            let gte = matvec(&dequant(&per(&gate_b, e), gty), &x);
            let upe = matvec(&dequant(&per(&up_b, e), uty), &x);
            let act: Vec<f32> = gte
                .iter()
                .zip(&upe)
                .map(|(a, b)| a / (1.0 + (-a).exp()) * b)
                .collect();
            assert_eq!(act.len(), n_ff);
            let d = matvec(&dequant(&per(&down_b, e), dty), &act);
            for (oi, di) in out.iter_mut().zip(&d) {
                *oi += p[j] / sum * di;
            }
        }
        for (hi, oi) in h.iter_mut().zip(&out) {
            *hi += oi;
        }
    }
    assert_eq!(checked, c.layers as usize);
}

/// The path of a binary of this build, built on demand (`cargo build -p PKG --bin BIN`)
/// into this test's own target directory and profile.
fn built_binary(package: &str, bin: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).unwrap().to_path_buf();
    let release = profile_dir.file_name().is_some_and(|n| n == "release");
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args(["build", "-p", package, "--bin", bin])
        .current_dir(&workspace)
        .env("CARGO_TARGET_DIR", profile_dir.parent().unwrap());
    if release {
        cmd.arg("--release");
    }
    assert!(
        cmd.status().unwrap().success(),
        "cargo build -p {package} failed"
    );
    profile_dir.join(bin)
}

/// `expertd trace record` finds `expertd-trace-record` next to itself, runs it, and
/// prints the statistics table; the trace and its sidecar are written.
#[test]
fn expertd_trace_record_runs_the_recorder() {
    let expertd = built_binary("expertd", "expertd");
    let recorder = PathBuf::from(env!("CARGO_BIN_EXE_expertd-trace-record"));
    assert_eq!(
        expertd.parent(),
        recorder.parent(),
        "both binaries are in the same target directory"
    );
    let dir = tempfile::tempdir().unwrap();
    let prompt = dir.path().join("prompt.txt");
    std::fs::write(&prompt, TEXT).unwrap();
    // `expertd trace record MODEL -o OUT ARGS...`
    let expertd_record = |out: &std::path::Path, args: &[&str]| {
        Command::new(&expertd)
            .args(["trace", "record"])
            .arg(&tiny().1)
            .arg("-o")
            .arg(out)
            .args(args)
            .env_remove("EXPERTD_TRACE_RECORD")
            .output()
            .unwrap()
    };
    let out = dir.path().join("rec.trace");
    let prompt_arg = format!("--prompt-file={}", prompt.display());
    let run = expertd_record(
        &out,
        &[
            &prompt_arg,
            "--tokens",
            "5",
            "--threads",
            "2",
            "--seed",
            "3",
            "--batch",
            "16",
        ],
    );
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(
        stdout.contains("LRU@8") && stdout.contains("mean"),
        "{stdout}"
    );
    let t = Trace::read(&out).unwrap();
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("rec.trace.json")).unwrap()).unwrap();
    let prompt_tokens = meta["prompt_tokens"].as_u64().unwrap() as usize;
    assert_eq!(t.tokens(), prompt_tokens + 5);
    assert_eq!(meta["generated_tokens"], 5);
    assert_eq!(meta["trace_includes_prompt"], true);

    // A prompt that starts with '-' reaches the recorder as a prompt, not an option.
    let dashed = dir.path().join("dashed.trace");
    let run = expertd_record(
        &dashed,
        &["--prompt=- first item", "--tokens", "2", "--threads", "2"],
    );
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(Trace::read(&dashed).unwrap().tokens() > 2);

    // The same recording through the library gives the same trace.
    let rec = record(&RecordOptions {
        seed: 3,
        batch: 16,
        ..opts(Prompt::Text(TEXT.into()), 5)
    })
    .unwrap();
    assert_eq!(rec.trace, t);

    // --skip-prompt keeps the generated tokens only; bad input is a clear error.
    let only = dir.path().join("gen.trace");
    let run = Command::new(&recorder)
        .arg(&tiny().1)
        .arg("-o")
        .arg(&only)
        .args([
            "--random-tokens",
            "8",
            "--tokens",
            "4",
            "--skip-prompt",
            "--text",
        ])
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(Trace::read(&only).unwrap().tokens(), 4);
    let bad = Command::new(&recorder)
        .arg(dir.path().join("missing.gguf"))
        .args(["-o", "x"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("missing.gguf: no such file"), "{err}");
}
