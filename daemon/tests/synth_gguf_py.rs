//! Cross-check with upstream's own Python reader (vendor/llama.cpp/gguf-py): a generated
//! model parses there with the same tensors (name, type, shape, absolute offset, bytes)
//! and the same metadata, and upstream's dequantizers see the weights our reference
//! dequantizers see (statistics, and a sum weighted by position), for every expert type.
//!
//! It needs python3 with numpy and PyYAML (scripts/setup.sh installs them) and the fetched
//! vendor tree; it fails (does not skip) when a prerequisite is missing.

use std::path::PathBuf;
use std::process::Command;

use expertd::synth::{self, ExpertType, Preset, SynthArch, SynthConfig, quant};

const SCRIPT: &str = r#"
import json, sys
import numpy as np
import gguf
r = gguf.GGUFReader(sys.argv[1])
out = {"tensors": [], "fields": {}}
for t in r.tensors:
    w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64)
    out["tensors"].append({
        "name": t.name, "type": int(t.tensor_type), "shape": [int(x) for x in t.shape],
        "offset": int(t.data_offset), "n_bytes": int(t.n_bytes),
        "mean": float(w.mean()), "std": float(w.std()),
        "wsum": float((w.ravel() * (np.arange(w.size) % 97 + 1)).sum()),
    })
for k, f in r.fields.items():
    if k.startswith("GGUF."):
        continue
    v = f.contents()
    out["fields"][k] = len(v) if isinstance(v, list) else v
print(json.dumps(out))
"#;

fn gguf_py() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../vendor/llama.cpp/gguf-py")
}

#[test]
fn upstream_python_reader_agrees() {
    let py = gguf_py();
    assert!(
        py.join("gguf/gguf_reader.py").exists(),
        "{} is missing: run vendor/fetch.sh",
        py.display()
    );
    let dir = tempfile::tempdir().expect("tempdir");
    for (i, (arch, ty)) in [
        (SynthArch::Qwen3Moe, ExpertType::Q4K),
        (SynthArch::Qwen3Moe, ExpertType::Q8_0),
        (SynthArch::Qwen3Moe, ExpertType::Q4KM),
        (SynthArch::GptOss, ExpertType::Mxfp4),
        (SynthArch::Glm4Moe, ExpertType::Q2K),
    ]
    .into_iter()
    .enumerate()
    {
        let path = dir.path().join(format!("m{i}.gguf"));
        let mut cfg = SynthConfig::preset(Preset::Tiny);
        cfg.arch = arch;
        cfg.expert_type = ty;
        cfg.seed = 11;
        let m = synth::write_model(&cfg, &path, 2).expect("write");
        let out = Command::new("python3")
            .arg("-c")
            .arg(SCRIPT)
            .arg(&path)
            .env("PYTHONPATH", &py)
            .output()
            .expect("python3 runs");
        assert!(
            out.status.success(),
            "gguf-py failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        let tensors = v["tensors"].as_array().expect("tensors");
        assert_eq!(tensors.len(), m.tensors.len());
        let bytes = std::fs::read(&path).expect("read");
        for (p, t) in tensors.iter().zip(&m.tensors) {
            assert_eq!(p["name"], t.name.as_str());
            assert_eq!(p["type"], t.ggml_type.0);
            // GGUFReader's `shape` is in ggml order, like our dims.
            let shape: Vec<u64> = p["shape"]
                .as_array()
                .expect("shape")
                .iter()
                .filter_map(|x| x.as_u64())
                .collect();
            assert_eq!(shape, t.dims, "{}", t.name);
            assert_eq!(p["offset"], m.data_offset + t.offset, "{}", t.name);
            assert_eq!(p["n_bytes"], t.size, "{}", t.name);
            // Upstream's dequantizer and ours agree on the weight statistics.
            let s = (m.data_offset + t.offset) as usize;
            let raw = &bytes[s..s + t.size as usize];
            let ours = quant::dequant(t.ggml_type, raw)
                .unwrap_or_else(|| panic!("{}: unexpected type {}", t.name, t.ggml_type));
            let n = ours.len() as f64;
            let mean = ours.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
            let std = (ours
                .iter()
                .map(|&x| (f64::from(x) - mean).powi(2))
                .sum::<f64>()
                / n)
                .sqrt();
            let (pm, ps) = (
                p["mean"].as_f64().expect("mean"),
                p["std"].as_f64().expect("std"),
            );
            assert!(
                (pm - mean).abs() <= 1e-6 * (1.0 + std),
                "{}: mean {pm} vs {mean}",
                t.name
            );
            assert!(
                (ps - std).abs() <= 1e-6 * (1.0 + std),
                "{}: std {ps} vs {std}",
                t.name
            );
            // and on where each weight is (a sum weighted by position)
            let wsum: f64 = ours
                .iter()
                .enumerate()
                .map(|(i, &x)| f64::from(x) * ((i % 97) + 1) as f64)
                .sum();
            let pw = p["wsum"].as_f64().expect("wsum");
            assert!(
                (pw - wsum).abs() <= 1e-6 * (1.0 + wsum.abs() + std * n),
                "{}: position-weighted sum {pw} vs {wsum}",
                t.name
            );
        }
        let fields = v["fields"].as_object().expect("fields");
        assert_eq!(fields.len(), m.metadata.len());
        for (k, val) in &m.metadata {
            let p = &fields[k.as_str()];
            match val {
                expertd::gguf::Value::Array(a) => assert_eq!(p, a.len(), "{k}"),
                expertd::gguf::Value::String(s) => assert_eq!(p, s.as_str(), "{k}"),
                other => {
                    let ours = other.as_f64().or(match other {
                        expertd::gguf::Value::Bool(b) => Some(f64::from(u8::from(*b))),
                        _ => None,
                    });
                    let theirs = p.as_f64().or(p.as_bool().map(|b| f64::from(u8::from(b))));
                    assert_eq!(theirs, ours, "{k}");
                }
            }
        }
    }
}
