//! `expertd-trace-record`: records an expert routing trace from a run of the stock
//! llama.cpp engine (what `expertd trace record` runs). Logic lives in the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Parser;
use expertd_recorder::{Prompt, RecordOptions, record};

/// Record which experts a MoE model's routers select, token by token, into a routing trace
/// (ffi/TRACE_FORMAT.md) plus a JSON sidecar (TRACE.json: tokens, prompt/generated split).
#[derive(Debug, Parser)]
#[command(name = "expertd-trace-record", version)]
struct Args {
    /// The GGUF model (any MoE architecture llama.cpp runs).
    model: PathBuf,
    /// Output trace file (written atomically; binary unless --text).
    #[arg(short = 'o', long)]
    output: PathBuf,
    /// Prompt text from this file.
    #[arg(long, group = "prompt_source")]
    prompt_file: Option<PathBuf>,
    /// Prompt text.
    #[arg(long, group = "prompt_source")]
    prompt: Option<String>,
    /// A prompt of N random tokens (like llama-bench).
    #[arg(long, value_name = "N", group = "prompt_source")]
    random_tokens: Option<u32>,
    /// Tokens to generate after the prompt.
    #[arg(long, default_value_t = 64)]
    tokens: u32,
    /// Context size (default: prompt + generated, rounded up to 256).
    #[arg(long)]
    ctx: Option<u32>,
    /// CPU threads (default: all).
    #[arg(long)]
    threads: Option<u32>,
    /// Prompt tokens per batch.
    #[arg(long, default_value_t = 256)]
    batch: u32,
    /// Seed of the sampler and of --random-tokens.
    #[arg(long, default_value_t = 0)]
    seed: u32,
    /// Sampling temperature (0: greedy).
    #[arg(long, default_value_t = 0.0)]
    temp: f32,
    /// Keep generating after an end-of-generation token.
    #[arg(long)]
    ignore_eos: bool,
    /// Leave the prompt tokens out of the trace (the sidecar still lists them).
    #[arg(long)]
    skip_prompt: bool,
    /// Write the text encoding of the trace.
    #[arg(long)]
    text: bool,
    /// Do not print the trace's statistics.
    #[arg(long)]
    no_stats: bool,
    /// Show llama.cpp's log.
    #[arg(long)]
    verbose: bool,
}

fn sidecar_path(trace: &Path) -> PathBuf {
    let mut s = trace.as_os_str().to_owned();
    s.push(".json");
    PathBuf::from(s)
}

fn run(a: Args) -> anyhow::Result<()> {
    let prompt = if let Some(f) = &a.prompt_file {
        let text = std::fs::read_to_string(f)
            .with_context(|| format!("reading the prompt file {}", f.display()))?;
        Prompt::Text(text)
    } else if let Some(t) = &a.prompt {
        Prompt::Text(t.clone())
    } else if let Some(n) = a.random_tokens {
        Prompt::Random(n)
    } else {
        Prompt::Text(String::new())
    };
    if a.skip_prompt && a.tokens == 0 {
        bail!("--skip-prompt with --tokens 0 would record nothing");
    }
    let opts = RecordOptions {
        ctx: a.ctx,
        threads: a.threads,
        batch: a.batch,
        seed: a.seed,
        temp: a.temp,
        ignore_eos: a.ignore_eos,
        verbose: a.verbose,
        ..RecordOptions::new(&a.model, prompt, a.tokens)
    };
    let rec = record(&opts).with_context(|| format!("recording {}", a.model.display()))?;
    let trace = if a.skip_prompt {
        rec.generated_only()?
    } else {
        rec.trace.clone()
    };
    if trace.tokens() == 0 {
        bail!("nothing was recorded (the model ended generation at once?)");
    }
    trace
        .write(&a.output, a.text)
        .with_context(|| format!("writing {}", a.output.display()))?;
    let mut meta = serde_json::to_value(&rec)?;
    if let Some(m) = meta.as_object_mut() {
        m.insert("trace".into(), a.output.display().to_string().into());
        m.insert("trace_tokens".into(), trace.tokens().into());
        m.insert("trace_includes_prompt".into(), (!a.skip_prompt).into());
        m.insert("engine".into(), expertd_recorder::ENGINE_BUILD_DIR.into());
    }
    let side = sidecar_path(&a.output);
    expert_pool::trace::write_synced(&side, serde_json::to_string_pretty(&meta)?.as_bytes())
        .with_context(|| format!("writing {}", side.display()))?;

    eprintln!(
        "recorded {} tokens ({} prompt{}, {} generated, stop: {}) x {} MoE layers x {} of {} \
         experts; prefill {:.1}s, generation {:.1}s ({:.1} tok/s with the routing capture)",
        rec.trace.tokens(),
        rec.prompt_tokens,
        if a.skip_prompt { ", left out" } else { "" },
        rec.generated_tokens,
        rec.stop,
        rec.trace.layers,
        rec.used,
        rec.experts,
        rec.prefill_seconds,
        rec.generate_seconds,
        rec.generated_tokens as f64 / rec.generate_seconds.max(1e-9)
    );
    eprintln!(
        "wrote {} ({} tokens) and {}",
        a.output.display(),
        trace.tokens(),
        side.display()
    );
    if !a.no_stats {
        let s = expert_pool::trace::stats(&trace);
        let n = s.len().max(1) as f64;
        let mean =
            |f: fn(&expert_pool::trace::LayerTraceStats) -> f64| s.iter().map(f).sum::<f64>() / n;
        println!(
            "mean over {} layers: reuse {:.1}%, top-10% share {:.1}%, zipf s {:.2}, LRU@{} {:.1}% \
             (per layer: expertd trace stats {})",
            s.len(),
            100.0 * mean(|l| l.reuse),
            100.0 * mean(|l| l.top10_share),
            mean(|l| l.zipf_s),
            (trace.experts as usize)
                .div_ceil(4)
                .max(trace.used as usize),
            100.0 * mean(|l| l.lru_hit_rate_25),
            a.output.display()
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("expertd-trace-record: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
