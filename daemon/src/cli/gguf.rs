//! `expertd gguf FILE [--json] [--tensors]`: the header summary of a GGUF file; for the
//! first file of a split model, the model summary covers all its files.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::gguf::{GgufError, GgufFile, GgufModel, ModelInfo, Value, split_info};

/// Options of `expertd gguf`.
#[derive(Debug, clap::Args)]
pub struct GgufArgs {
    /// The GGUF file.
    pub file: PathBuf,
    /// Print the parsed header and the model summary as JSON (arrays longer than 64
    /// elements, such as token lists, are shown as their length).
    #[arg(long)]
    pub json: bool,
    /// List every tensor (name, type, dims, offset, size).
    #[arg(long)]
    pub tensors: bool,
}

/// Runs `expertd gguf`.
pub fn run(args: GgufArgs) -> anyhow::Result<ExitCode> {
    // The errors name the file and the reason already.
    let file = GgufFile::open(&args.file)?;
    // (the model summary, the files it was read from); a malformed split key is a model
    // error like any other, printed after the header
    type Summary = Result<(ModelInfo, Vec<PathBuf>), GgufError>;
    let (split, info): (_, Summary) = match split_info(&file) {
        Ok(None) => (
            None,
            ModelInfo::from_gguf(&file).map(|i| (i, vec![file.path.clone()])),
        ),
        Ok(Some(s)) => (
            Some(s),
            GgufModel::open(&args.file)
                .and_then(|m| ModelInfo::from_model(&m).map(|i| (i, m.paths()))),
        ),
        Err(e) => (None, Err(e)),
    };
    if args.json {
        let mut v = serde_json::json!({ "file": &file });
        if !args.tensors {
            if let Some(obj) = v.get_mut("file").and_then(|f| f.as_object_mut()) {
                obj.remove("tensors");
                obj.insert("tensor_count".into(), file.tensors.len().into());
            }
        }
        // Token lists are long; keep their length only.
        if let Some(md) = v
            .get_mut("file")
            .and_then(|f| f.get_mut("metadata"))
            .and_then(|m| m.as_object_mut())
        {
            for (k, val) in md.iter_mut() {
                if let Some(Value::Array(a)) = file.metadata.get(k) {
                    if a.len() > 64 {
                        *val = serde_json::json!({ "array_len": a.len() });
                    }
                }
            }
        }
        if let Some(sp) = split {
            v["split"] =
                serde_json::json!({ "no": sp.no, "count": sp.count, "tensors": sp.tensors });
        }
        match &info {
            Ok((i, files)) => {
                v["model"] = serde_json::to_value(i)?;
                v["model_files"] = serde_json::to_value(files)?;
            }
            Err(e) => v["model_error"] = e.to_string().into(),
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }

    println!("file:        {}", file.path.display());
    println!("version:     {}", file.version);
    println!(
        "size:        {} bytes ({})",
        file.file_size,
        human(file.file_size)
    );
    println!("alignment:   {}", file.alignment);
    println!("data offset: {}", file.data_offset);
    println!("metadata:    {} keys", file.metadata.len());
    println!(
        "tensors:     {} ({})",
        file.tensors.len(),
        human(file.tensor_bytes())
    );
    if let Some(sp) = split {
        println!(
            "split:       {} of {} ({} tensors in all)",
            u32::from(sp.no) + 1,
            sp.count,
            sp.tensors
        );
    }
    match &info {
        Ok((i, files)) => {
            if files.len() > 1 {
                println!(
                    "model:       {} files, {} of tensors",
                    files.len(),
                    human(i.total_bytes)
                );
            }
            println!("arch:        {}", i.arch);
            if let Some(n) = &i.name {
                println!("name:        {n}");
            }
            if i.nextn_layers > 0 {
                println!(
                    "layers:      {} and {} MTP block(s) ({}, loaded only for MTP speculative decoding)",
                    i.block_count.saturating_sub(i.nextn_layers),
                    i.nextn_layers,
                    human(i.nextn_bytes)
                );
            } else {
                println!("layers:      {}", i.block_count);
            }
            println!("n_embd:      {}", i.n_embd);
            println!("heads:       {} (kv {})", i.n_head, i.n_head_kv);
            println!("context:     {}", i.context_length);
            if i.is_moe() {
                println!(
                    "experts:     {} ({} used per token)",
                    i.expert_count, i.expert_used_count
                );
                println!(
                    "expert data: {} ({:.1}% of tensors), non-expert {}",
                    human(i.expert_bytes),
                    100.0 * i.expert_bytes as f64 / i.total_bytes.max(1) as f64,
                    human(i.non_expert_bytes)
                );
                let mut sizes: Vec<u64> = i.expert_bytes_per_layer.values().copied().collect();
                sizes.dedup();
                if let [one] = sizes.as_slice() {
                    println!(
                        "one expert:  {one} bytes ({}) in each of {} layers",
                        human(*one),
                        i.expert_bytes_per_layer.len()
                    );
                } else {
                    for (l, b) in &i.expert_bytes_per_layer {
                        println!("one expert:  layer {l}: {b} bytes ({})", human(*b));
                    }
                }
            } else {
                println!("experts:     none (dense)");
            }
            if i.sliding_window > 0 && i.kv_swa_bytes_per_token_f16 > 0 {
                println!(
                    "kv/token:    {} bytes at f16, {} of them in sliding-window layers (window {} tokens)",
                    i.kv_bytes_per_token_f16, i.kv_swa_bytes_per_token_f16, i.sliding_window
                );
            } else {
                println!("kv/token:    {} bytes at f16", i.kv_bytes_per_token_f16);
            }
        }
        Err(e) => println!("model:       not summarised: {e}"),
    }
    if args.tensors {
        println!();
        println!(
            "{:<40} {:>8} {:>28} {:>14} {:>12}",
            "tensor", "type", "dims", "offset", "bytes"
        );
        for t in &file.tensors {
            println!(
                "{:<40} {:>8} {:>28} {:>14} {:>12}",
                t.name,
                t.ggml_type.to_string(),
                format!("{:?}", t.dims),
                file.absolute_offset(t),
                t.size
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= f64::from(1u32 << 30) {
        format!("{:.2} GiB", b / f64::from(1u32 << 30))
    } else if b >= f64::from(1u32 << 20) {
        format!("{:.1} MiB", b / f64::from(1u32 << 20))
    } else {
        format!("{:.1} KiB", b / 1024.0)
    }
}
