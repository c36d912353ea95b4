//! The synthetic model generator: what it writes reads back exactly (compared with the
//! generator's own manifest), the file is deterministic per seed and thread count, the
//! weights have the statistics the generator promises, bad options are refused with a
//! clear message, and no temp file is left behind.

use std::collections::BTreeMap;

use expertd::gguf::{GgmlType, GgufFile, ModelInfo, Value};
use expertd::synth::{self, ExpertType, Preset, SynthConfig, quant};

/// A small model (about 1 MiB) for the tests that write files.
fn small(seed: u64) -> SynthConfig {
    let mut c = SynthConfig::preset(Preset::Tiny);
    c.layers = 2;
    c.n_expert = 8;
    c.n_expert_used = 2;
    c.vocab = 512;
    c.seed = seed;
    c
}

#[test]
fn round_trip_matches_manifest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let types = [ExpertType::Q4K, ExpertType::Q8_0, ExpertType::Q4KM];
    for (i, expert_type) in types.into_iter().enumerate() {
        let path = dir.path().join(format!("m{i}.gguf"));
        let mut cfg = SynthConfig::preset(Preset::Tiny);
        cfg.expert_type = expert_type;
        let m = synth::write_model(&cfg, &path, 2).expect("write");
        let f = GgufFile::open(&path).expect("read back");

        assert_eq!(std::fs::metadata(&path).expect("stat").len(), m.file_size);
        assert_eq!(f.file_size, m.file_size);
        assert_eq!(f.data_offset, m.data_offset);
        assert_eq!(f.alignment, m.alignment);
        assert_eq!(f.version, 3);
        // Every tensor: name, dims, type, offset and size, in file order.
        assert_eq!(f.tensors, m.tensors);
        // Every key with its value, and nothing else.
        assert_eq!(f.metadata.len(), m.metadata.len());
        for (k, v) in &m.metadata {
            assert_eq!(f.get(k), Some(v), "key {k}");
        }

        // The summary agrees with the config.
        let info = ModelInfo::from_gguf(&f).expect("summary");
        assert_eq!(info.arch, "qwen3moe");
        assert_eq!(info.block_count, cfg.layers);
        assert_eq!(info.n_embd, u64::from(cfg.n_embd));
        assert_eq!(info.n_head, cfg.n_head);
        assert_eq!(info.n_head_kv, cfg.n_head_kv);
        assert_eq!(info.context_length, u64::from(cfg.ctx));
        assert_eq!(info.expert_count, cfg.n_expert);
        assert_eq!(info.expert_used_count, cfg.n_expert_used);
        let one_expert = |l: u32| {
            let row = |down: bool, n: u32| {
                expert_type
                    .ggml(down, l)
                    .row_bytes(u64::from(n))
                    .expect("row")
            };
            2 * row(false, cfg.n_embd) * u64::from(cfg.expert_ffn)
                + row(true, cfg.expert_ffn) * u64::from(cfg.n_embd)
        };
        let expected: BTreeMap<u32, u64> = (0..cfg.layers).map(|l| (l, one_expert(l))).collect();
        assert_eq!(info.expert_bytes_per_layer, expected);
        assert_eq!(
            info.expert_bytes,
            (0..cfg.layers).map(one_expert).sum::<u64>() * u64::from(cfg.n_expert)
        );
        if expert_type == ExpertType::Q4KM {
            // down is Q6_K in even layers: the layers' experts differ in size
            assert_eq!(
                f.tensor("blk.0.ffn_down_exps.weight").unwrap().ggml_type,
                GgmlType::Q6_K
            );
            assert_eq!(
                f.tensor("blk.1.ffn_down_exps.weight").unwrap().ggml_type,
                GgmlType::Q4_K
            );
            assert!(one_expert(0) > one_expert(1));
        }
        assert_eq!(
            info.kv_bytes_per_token_f16,
            2 * 2 * u64::from(cfg.layers * cfg.n_head_kv * cfg.head_dim())
        );
        assert_eq!(info.total_bytes, f.tensor_bytes());
    }
    // Only the models are left in the directory: no temp files.
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), types.len(), "{names:?}");
}

/// The tensors and keys the pinned qwen3moe loader asks for (src/models/qwen3moe.cpp,
/// src/llama-model.cpp load_hparams, src/llama-vocab.cpp), with their shapes.
#[test]
fn has_what_the_qwen3moe_loader_needs() {
    let cfg = SynthConfig::preset(Preset::Bench);
    let (md, lay) = synth::layout(&cfg).expect("layout");
    let md: BTreeMap<&str, &Value> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let u = |k: &str| {
        md.get(k)
            .and_then(|v| v.as_u64())
            .unwrap_or_else(|| panic!("{k}"))
    };
    assert_eq!(md["general.architecture"].as_str(), Some("qwen3moe"));
    assert_eq!(u("qwen3moe.block_count"), 24);
    assert_eq!(u("qwen3moe.embedding_length"), 1024);
    assert_eq!(u("qwen3moe.attention.head_count"), 16);
    assert_eq!(u("qwen3moe.attention.head_count_kv"), 4);
    assert_eq!(u("qwen3moe.attention.key_length"), 64);
    assert_eq!(u("qwen3moe.expert_count"), 128);
    assert_eq!(u("qwen3moe.expert_used_count"), 8);
    assert_eq!(u("qwen3moe.expert_feed_forward_length"), 512);
    assert!(
        md["qwen3moe.attention.layer_norm_rms_epsilon"]
            .as_f64()
            .is_some()
    );
    assert_eq!(md["tokenizer.ggml.model"].as_str(), Some("llama"));
    let n_tokens = md["tokenizer.ggml.tokens"]
        .as_array()
        .expect("tokens")
        .len();
    assert_eq!(n_tokens, 4096);
    assert_eq!(
        md["tokenizer.ggml.scores"]
            .as_array()
            .expect("scores")
            .len(),
        n_tokens
    );
    assert_eq!(
        md["tokenizer.ggml.token_type"]
            .as_array()
            .expect("types")
            .len(),
        n_tokens
    );

    let by_name: BTreeMap<&str, (&[u64], GgmlType)> = lay
        .tensors
        .iter()
        .map(|t| (t.name.as_str(), (t.dims.as_slice(), t.ggml_type)))
        .collect();
    let expect = |name: &str, dims: &[u64], ty: GgmlType| {
        let (d, t) = by_name
            .get(name)
            .unwrap_or_else(|| panic!("missing {name}"));
        assert_eq!((*d, *t), (dims, ty), "{name}");
    };
    let (q8, f32_, q4k) = (GgmlType::Q8_0, GgmlType::F32, GgmlType::Q4_K);
    expect("token_embd.weight", &[1024, 4096], q8);
    expect("output_norm.weight", &[1024], f32_);
    expect("output.weight", &[1024, 4096], q8);
    for l in 0..24 {
        let n = |s: &str| format!("blk.{l}.{s}.weight");
        expect(&n("attn_norm"), &[1024], f32_);
        expect(&n("attn_q"), &[1024, 1024], q8);
        expect(&n("attn_k"), &[1024, 256], q8);
        expect(&n("attn_v"), &[1024, 256], q8);
        expect(&n("attn_output"), &[1024, 1024], q8);
        expect(&n("attn_q_norm"), &[64], f32_);
        expect(&n("attn_k_norm"), &[64], f32_);
        expect(&n("ffn_norm"), &[1024], f32_);
        expect(&n("ffn_gate_inp"), &[1024, 128], f32_);
        expect(&n("ffn_gate_exps"), &[1024, 512, 128], q4k);
        expect(&n("ffn_up_exps"), &[1024, 512, 128], q4k);
        expect(&n("ffn_down_exps"), &[512, 1024, 128], q4k);
    }
    // Nothing else: the loader rejects files with tensors it did not ask for.
    assert_eq!(lay.tensors.len(), 3 + 24 * 12);
    // About 2.6 GiB, one expert 0.84 MiB per layer.
    let gib = lay.file_size as f64 / f64::from(1u32 << 30);
    assert!((2.55..2.65).contains(&gib), "{gib} GiB");
    let gate = by_name["blk.0.ffn_gate_exps.weight"];
    assert_eq!(q4k.row_bytes(gate.0[0]).expect("row") * 512 * 3, 884_736);
}

#[test]
fn deterministic_per_seed_and_thread_count() {
    let dir = tempfile::tempdir().expect("tempdir");
    let write = |name: &str, seed: u64, threads: usize| {
        let p = dir.path().join(name);
        synth::write_model(&small(seed), &p, threads).expect("write");
        std::fs::read(&p).expect("read")
    };
    let a = write("a.gguf", 7, 1);
    let b = write("b.gguf", 7, 3);
    let c = write("c.gguf", 8, 1);
    assert!(
        a == b,
        "same seed must give the same bytes, whatever the thread count"
    );
    assert_eq!(a.len(), c.len());
    let f = GgufFile::parse_bytes(&a).expect("parse");
    // Every tensor with random content differs under another seed (norms are all ones).
    for t in &f.tensors {
        let start = (f.data_offset + t.offset) as usize;
        let range = start..start + t.size as usize;
        let same = a[range.clone()] == c[range];
        assert_eq!(same, t.name.ends_with("norm.weight"), "{}", t.name);
    }
}

/// Dequantizes a tensor's bytes with the reference dequantizers.
fn dequant(bytes: &[u8], ty: GgmlType) -> Vec<f32> {
    quant::dequant(ty, bytes).unwrap_or_else(|| panic!("unexpected type {ty}"))
}

fn mean_std(x: &[f32]) -> (f64, f64) {
    let n = x.len() as f64;
    let mean = x.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let var = x
        .iter()
        .map(|&v| (f64::from(v) - mean).powi(2))
        .sum::<f64>()
        / n;
    (mean, var.sqrt())
}

#[test]
fn weights_have_the_promised_statistics() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("w.gguf");
    let mut cfg = SynthConfig::preset(Preset::Tiny);
    cfg.token_weight = 2.0;
    cfg.context_weight = 0.5;
    cfg.router_skew = 1.0;
    cfg.seed = 3;
    let m = synth::write_model(&cfg, &path, 2).expect("write");
    let bytes = std::fs::read(&path).expect("read");
    let data = |name: &str| {
        let t = m.tensors.iter().find(|t| t.name == name).expect(name);
        let s = (m.data_offset + t.offset) as usize;
        dequant(&bytes[s..s + t.size as usize], t.ggml_type)
    };
    let check = |name: &str, want: f64| {
        let (mean, std) = mean_std(&data(name));
        assert!(mean.abs() < 0.02 * want, "{name}: mean {mean}");
        assert!(
            (std / want - 1.0).abs() < 0.03,
            "{name}: std {std}, want {want}"
        );
    };
    let e = f64::from(cfg.n_embd);
    check("token_embd.weight", 2.0);
    check("blk.1.attn_q.weight", 1.0 / e.sqrt());
    check("blk.1.attn_output.weight", 0.5 / e.sqrt());
    check("blk.2.ffn_gate_exps.weight", 1.0 / e.sqrt());
    check(
        "blk.2.ffn_down_exps.weight",
        1.0 / f64::from(cfg.expert_ffn).sqrt(),
    );
    assert!(data("blk.0.ffn_norm.weight").iter().all(|&x| x == 1.0));

    // Router rows: log-normal scales, so their stds spread by about exp(+-skew).
    let router = data("blk.0.ffn_gate_inp.weight");
    let mut row_stds: Vec<f64> = router
        .chunks_exact(cfg.n_embd as usize)
        .map(|r| mean_std(r).1)
        .collect();
    row_stds.sort_by(f64::total_cmp);
    let log_stds: Vec<f64> = row_stds.iter().map(|s| s.ln()).collect();
    let (_, sigma) = mean_std(&log_stds.iter().map(|&x| x as f32).collect::<Vec<_>>());
    assert!(
        (0.6..1.5).contains(&sigma),
        "log-std of router rows {sigma}, want about 1"
    );

    // Output rows of special and byte tokens are damped.
    let out = data("output.weight");
    let rows: Vec<&[f32]> = out.chunks_exact(cfg.n_embd as usize).collect();
    let special = mean_std(&rows[..259].concat()).1;
    let normal = mean_std(&rows[259..].concat()).1;
    assert!(
        (normal / special - 16.0).abs() < 1.0,
        "{normal} / {special}"
    );
}

/// A change to a config, and a fragment of the error it must cause.
type BadCase = (fn(&mut SynthConfig), &'static str);

#[test]
fn bad_options_are_refused_clearly() {
    let cases: Vec<BadCase> = vec![
        (
            |c| c.n_embd = 320,
            "--embd 320 must be a positive multiple of 256",
        ),
        (
            |c| c.expert_ffn = 100,
            "--expert-ffn 100 must be a positive multiple of 256",
        ),
        (|c| c.n_head = 3, "must be a multiple of --heads 3"),
        (|c| c.n_head_kv = 3, "must be a multiple of --heads-kv 3"),
        (
            |c| c.n_expert_used = 64,
            "--experts-used 64 must be in 1..=--experts (32)",
        ),
        (|c| c.vocab = 100, "--vocab 100 must be in"),
        (|c| c.layers = 0, "--layers 0"),
        (|c| c.router_skew = f32::NAN, "--router-skew"),
        (
            |c| c.router_skew = 30.0,
            "--router-skew 30 must be in 0..=10",
        ),
        (
            |c| c.expert_ffn = 1 << 30,
            "overflows the model's feed_forward_length",
        ),
        (|c| c.token_weight = -1.0, "--token-weight"),
        (
            |c| {
                c.arch = synth::SynthArch::GptOss;
                c.attn_recency = 3.0;
            },
            "q/k norms, which gpt-oss has none of",
        ),
        (
            |c| {
                c.arch = synth::SynthArch::Glm4Moe;
                c.layers = 1;
            },
            "--layers 1: glm4moe's first layer is dense",
        ),
        (
            |c| {
                c.arch = synth::SynthArch::Glm4Moe;
                c.n_head = 128;
                c.n_head_kv = 2;
            },
            "head dim 2 (embd / heads) must be a multiple of 4",
        ),
    ];
    let dir = tempfile::tempdir().expect("tempdir");
    for (tweak, fragment) in cases {
        let mut c = SynthConfig::preset(Preset::Tiny);
        tweak(&mut c);
        let p = dir.path().join("x.gguf");
        let e = synth::write_model(&c, &p, 1)
            .expect_err(fragment)
            .to_string();
        assert!(e.contains(fragment), "{e:?} lacks {fragment:?}");
        assert!(!p.exists());
    }
    // Q8_0 experts only need multiples of 32.
    let mut c = SynthConfig::preset(Preset::Tiny);
    c.expert_type = ExpertType::Q8_0;
    c.expert_ffn = 96;
    c.validate().expect("q8_0 rows of 96");
    assert_eq!(
        std::fs::read_dir(dir.path()).expect("ls").count(),
        0,
        "no temp files left"
    );
}

#[test]
fn write_errors_leave_nothing_behind() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("no/such/dir/m.gguf");
    let e = synth::write_model(&small(1), &missing, 1).expect_err("missing dir");
    assert!(e.to_string().contains("no/such/dir"), "{e}");
    // An existing file is replaced atomically: the old content stays until the rename.
    let p = dir.path().join("m.gguf");
    std::fs::write(&p, b"old").expect("write");
    synth::write_model(&small(1), &p, 1).expect("replace");
    GgufFile::open(&p).expect("new file is complete");
    assert_eq!(std::fs::read_dir(dir.path()).expect("ls").count(), 1);
}

/// A temp file a killed run left (its PID gone) is removed by the next write of the same
/// model; one of a run still alive is left alone.
#[test]
fn a_killed_runs_temp_file_is_removed_by_the_next_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let stale = dir.path().join(".x.gguf.tmp-999999999-7"); // above any pid_max
    let live = dir
        .path()
        .join(format!(".x.gguf.tmp-{}-7", std::process::id()));
    std::fs::write(&stale, b"half a model").unwrap();
    std::fs::write(&live, b"being written").unwrap();
    let p = dir.path().join("x.gguf");
    synth::write_model(&SynthConfig::preset(Preset::Tiny), &p, 1).expect("write");
    assert!(p.exists());
    assert!(!stale.exists(), "the dead run's temp file is gone");
    assert!(live.exists(), "a live run's temp file stays");
}

/// FNV-1a (64 bit) of `bytes`: pins a file's content in a test.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The presets' bytes do not change by accident (new options leave them alone): the tiny
/// preset's file, seed 0, is pinned. A deliberate change of the generator updates the
/// digest here (and regenerates the benchmark models, whose results it would change).
#[test]
fn the_tiny_preset_is_byte_for_byte_what_it_was() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("tiny.gguf");
    synth::write_model(&SynthConfig::preset(Preset::Tiny), &p, 2).expect("write");
    let bytes = std::fs::read(&p).expect("read");
    assert_eq!(
        (bytes.len(), format!("{:016x}", fnv1a(&bytes))),
        (TINY_LEN, TINY_FNV.to_string())
    );
}
/// Measured on 2026-11-24; a tiny.gguf the tests wrote a day earlier, before this
/// session's synth changes (Q6_K, hy_v3), has the same digest.
const TINY_LEN: usize = 15_716_768;
const TINY_FNV: &str = "d55c53dc0defe42d";

/// hy_v3: fused gate/up experts, a shared expert, dense layers without experts (the first
/// and the middle one); the summary counts the experts of the MoE layers only.
#[test]
fn hy_v3_has_fused_experts_a_shared_expert_and_dense_layers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("hy.gguf");
    let mut cfg = SynthConfig::preset(Preset::Tiny);
    cfg.arch = synth::SynthArch::HyV3;
    synth::write_model(&cfg, &p, 2).expect("write");
    let f = GgufFile::open(&p).expect("read back");
    assert_eq!(
        f.get("general.architecture"),
        Some(&Value::String("hy_v3".into()))
    );
    let key = |k: &str| f.get(&format!("hy_v3.{k}")).and_then(Value::as_u64);
    assert_eq!(key("feed_forward_length"), Some(u64::from(cfg.dense_ffn())));
    assert_eq!(
        key("expert_feed_forward_length"),
        Some(u64::from(cfg.expert_ffn))
    );
    assert_eq!(
        key("expert_shared_feed_forward_length"),
        Some(u64::from(cfg.expert_ffn))
    );
    let (e, ff, n) = (
        u64::from(cfg.n_embd),
        u64::from(cfg.expert_ffn),
        u64::from(cfg.n_expert),
    );
    let dims = |name: &str| f.tensor(name).map(|t| t.dims.clone());
    let dense: Vec<u32> = (0..cfg.layers).filter(|&l| cfg.is_dense(l)).collect();
    assert_eq!(dense, [0, cfg.layers / 2]);
    for &l in &dense {
        let d = |s: &str| dims(&format!("blk.{l}.{s}.weight"));
        assert_eq!(d("ffn_gate"), Some(vec![e, u64::from(cfg.dense_ffn())]));
        assert_eq!(d("ffn_gate_inp"), None);
        assert_eq!(d("ffn_down_exps"), None);
    }
    for l in (0..cfg.layers).filter(|l| !dense.contains(l)) {
        let d = |s: &str| dims(&format!("blk.{l}.{s}.weight"));
        assert_eq!(d("ffn_gate_up_exps"), Some(vec![e, 2 * ff, n]));
        assert_eq!(d("ffn_gate_exps"), None);
        assert_eq!(d("ffn_down_exps"), Some(vec![ff, e, n]));
        assert_eq!(d("ffn_gate_shexp"), Some(vec![e, ff]));
        assert_eq!(d("ffn_down_shexp"), Some(vec![ff, e]));
    }
    let info = ModelInfo::from_gguf(&f).expect("summary");
    let one_expert =
        GgmlType::Q4_K.row_bytes(e).unwrap() * 2 * ff + GgmlType::Q4_K.row_bytes(ff).unwrap() * e;
    let expected: BTreeMap<u32, u64> = (0..cfg.layers)
        .filter(|l| !dense.contains(l))
        .map(|l| (l, one_expert))
        .collect();
    assert_eq!(info.expert_bytes_per_layer, expected);
    assert_eq!(cfg.moe_layers(), cfg.layers - 2);
}

/// gpt-oss: MXFP4 experts with per-expert biases, a router bias, attention sinks and
/// biases, no q/k norms, a sliding window; the biases are not expert data in the summary.
#[test]
fn gpt_oss_has_biased_mxfp4_experts_and_sinks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("oss.gguf");
    let mut cfg = SynthConfig::preset(Preset::Tiny);
    cfg.arch = synth::SynthArch::GptOss;
    cfg.expert_type = ExpertType::Mxfp4;
    let m = synth::write_model(&cfg, &p, 2).expect("write");
    let f = GgufFile::open(&p).expect("read back");
    let key = |k: &str| f.get(&format!("gpt-oss.{k}")).and_then(Value::as_u64);
    assert_eq!(
        key("attention.sliding_window"),
        Some(u64::from(synth::GPT_OSS_WINDOW))
    );
    let (e, ff, n) = (
        u64::from(cfg.n_embd),
        u64::from(cfg.expert_ffn),
        u64::from(cfg.n_expert),
    );
    let dims = |name: &str| f.tensor(name).map(|t| (t.dims.clone(), t.ggml_type));
    let f32_ = GgmlType::F32;
    for l in 0..cfg.layers {
        let d = |s: &str| dims(&format!("blk.{l}.{s}"));
        assert_eq!(
            d("ffn_gate_exps.weight"),
            Some((vec![e, ff, n], GgmlType::MXFP4))
        );
        assert_eq!(
            d("ffn_down_exps.weight"),
            Some((vec![ff, e, n], GgmlType::MXFP4))
        );
        assert_eq!(d("ffn_gate_exps.bias"), Some((vec![ff, n], f32_)));
        assert_eq!(d("ffn_up_exps.bias"), Some((vec![ff, n], f32_)));
        assert_eq!(d("ffn_down_exps.bias"), Some((vec![e, n], f32_)));
        assert_eq!(d("ffn_gate_inp.bias"), Some((vec![n], f32_)));
        assert_eq!(
            d("attn_sinks.weight"),
            Some((vec![u64::from(cfg.n_head)], f32_))
        );
        assert_eq!(d("attn_output.bias"), Some((vec![e], f32_)));
        assert_eq!(d("post_attention_norm.weight"), Some((vec![e], f32_)));
        assert_eq!(d("attn_q_norm.weight"), None);
        assert_eq!(d("ffn_norm.weight"), None);
    }
    // the experts have the promised statistics through the MXFP4 reference dequantizer
    let bytes = std::fs::read(&p).expect("read");
    let t = m
        .tensors
        .iter()
        .find(|t| t.name == "blk.1.ffn_up_exps.weight")
        .expect("up");
    let s = (m.data_offset + t.offset) as usize;
    assert_eq!(t.ggml_type, GgmlType::MXFP4);
    let (mean, std) = mean_std(&dequant(&bytes[s..s + t.size as usize], t.ggml_type));
    let want = 1.0 / (e as f64).sqrt();
    assert!(mean.abs() < 0.02 * want, "mean {mean}");
    assert!((std / want - 1.0).abs() < 0.03, "std {std}, want {want}");
    // one expert is its three MXFP4 matrices; the biases stay with the other weights
    let info = ModelInfo::from_gguf(&f).expect("summary");
    let mx = |cols: u64, rows: u64| GgmlType::MXFP4.row_bytes(cols).unwrap() * rows;
    let one_expert = 2 * mx(e, ff) + mx(ff, e);
    assert!(
        info.expert_bytes_per_layer
            .values()
            .all(|&b| b == one_expert),
        "{info:?}"
    );
    assert_eq!(info.expert_bytes, one_expert * n * u64::from(cfg.layers));
}

/// glm4moe: a dense first layer, shared experts, a selection bias, and an MTP block after
/// the last layer, which the summary keeps out of the expert and resident data.
#[test]
fn glm4moe_has_a_dense_layer_shared_experts_and_an_mtp_block() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("glm.gguf");
    let mut cfg = SynthConfig::preset(Preset::Tiny);
    cfg.arch = synth::SynthArch::Glm4Moe;
    synth::write_model(&cfg, &p, 2).expect("write");
    let f = GgufFile::open(&p).expect("read back");
    let key = |k: &str| f.get(&format!("glm4moe.{k}")).and_then(Value::as_u64);
    assert_eq!(key("block_count"), Some(u64::from(cfg.layers) + 1));
    assert_eq!(key("nextn_predict_layers"), Some(1));
    assert_eq!(key("leading_dense_block_count"), Some(1));
    assert_eq!(key("expert_shared_count"), Some(1));
    assert_eq!(key("expert_gating_func"), Some(2));
    assert_eq!(
        key("rope.dimension_count"),
        Some(u64::from(cfg.head_dim() / 2))
    );
    let (e, ff, n) = (
        u64::from(cfg.n_embd),
        u64::from(cfg.expert_ffn),
        u64::from(cfg.n_expert),
    );
    let dims = |name: &str| f.tensor(name).map(|t| t.dims.clone());
    assert_eq!(
        dims("blk.0.ffn_gate.weight"),
        Some(vec![e, u64::from(cfg.dense_ffn())])
    );
    assert_eq!(dims("blk.0.ffn_gate_exps.weight"), None);
    let mtp = cfg.layers;
    for l in 1..=mtp {
        let d = |s: &str| dims(&format!("blk.{l}.{s}"));
        assert_eq!(d("ffn_gate_exps.weight"), Some(vec![e, ff, n]), "{l}");
        assert_eq!(d("exp_probs_b.bias"), Some(vec![n]), "{l}");
        assert_eq!(d("ffn_up_shexp.weight"), Some(vec![e, ff]), "{l}");
        assert!(d("attn_v.bias").is_some(), "{l}");
        assert_eq!(d("nextn.eh_proj.weight").is_some(), l == mtp, "{l}");
    }
    let info = ModelInfo::from_gguf(&f).expect("summary");
    assert_eq!(info.nextn_layers, 1);
    let expected: Vec<u32> = (1..cfg.layers).collect();
    assert_eq!(
        info.expert_bytes_per_layer
            .keys()
            .copied()
            .collect::<Vec<_>>(),
        expected
    );
    let mtp_bytes: u64 = f
        .tensors
        .iter()
        .filter(|t| t.name.starts_with(&format!("blk.{mtp}.")))
        .map(|t| t.size)
        .sum();
    assert!(mtp_bytes > 0);
    assert_eq!(info.nextn_bytes, mtp_bytes);
    assert_eq!(
        info.total_bytes,
        info.expert_bytes + info.non_expert_bytes + info.nextn_bytes
    );
    assert_eq!(cfg.moe_layers(), cfg.layers - 1);
}
