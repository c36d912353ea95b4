//! `expertd trace`: generate synthetic routing traces, print their statistics, and
//! replay them against the pool's eviction policies and Belady's optimum. The trace
//! format is documented in `ffi/TRACE_FORMAT.md` (and `expert_pool::trace`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use expert_pool::sim;
use expert_pool::trace::{self, GenParams, Trace};

mod record;

/// `expertd trace` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum TraceCommand {
    /// Replay a routing trace against every policy and Belady's optimum.
    Sim(SimArgs),
    /// Per-layer statistics of a trace: consecutive-token reuse, popularity skew, LRU.
    Stats(StatsArgs),
    /// Write a synthetic trace with given reuse and Zipf popularity.
    Gen(GenArgs),
    /// Upper bound on any online eviction policy's hit rate on a `trace gen` trace
    /// (from the generator's own probabilities), next to the policies and Belady.
    Bound(BoundArgs),
    /// Record a trace from a real run of the stock llama.cpp on a GGUF model.
    Record(record::RecordArgs),
}

/// Arguments of `expertd trace sim`.
#[derive(Debug, clap::Args)]
pub struct SimArgs {
    /// Trace file (text or binary).
    pub trace: PathBuf,
    /// Slots per layer (repeat or comma-separate for several tables).
    #[arg(long, value_delimiter = ',', required = true)]
    pub slots: Vec<u32>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `expertd trace stats`.
#[derive(Debug, clap::Args)]
pub struct StatsArgs {
    /// Trace file (text or binary).
    pub trace: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// The generator's parameters (`expertd trace gen`, `expertd trace bound`).
#[derive(Debug, clap::Args)]
pub struct GenModelArgs {
    /// Consecutive-token reuse: one value, or LO..HI spread over the layers.
    #[arg(long, default_value = "0.36")]
    pub reuse: String,
    /// Zipf exponent of expert popularity.
    #[arg(long, default_value_t = 0.65)]
    pub zipf: f64,
    /// MoE layers.
    #[arg(long, default_value_t = 24)]
    pub layers: u32,
    /// Experts per layer.
    #[arg(long, default_value_t = 128)]
    pub experts: u32,
    /// Experts used per token.
    #[arg(long, default_value_t = 8)]
    pub used: u32,
    /// Tokens.
    #[arg(long, default_value_t = 4096)]
    pub tokens: u32,
    /// Random seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

impl GenModelArgs {
    fn params(&self) -> anyhow::Result<GenParams> {
        Ok(GenParams {
            layers: self.layers,
            experts: self.experts,
            used: self.used,
            tokens: self.tokens,
            reuse: parse_reuse(&self.reuse)?,
            zipf: self.zipf,
            seed: self.seed,
        })
    }
}

/// Arguments of `expertd trace gen`.
#[derive(Debug, clap::Args)]
pub struct GenArgs {
    #[command(flatten)]
    pub model: GenModelArgs,
    /// Write the text encoding instead of binary.
    #[arg(long)]
    pub text: bool,
    /// Output file.
    #[arg(short = 'o', long)]
    pub output: PathBuf,
}

/// Arguments of `expertd trace bound`.
#[derive(Debug, clap::Args)]
pub struct BoundArgs {
    #[command(flatten)]
    pub model: GenModelArgs,
    /// Slots per layer (repeat or comma-separate).
    #[arg(long, value_delimiter = ',', required = true)]
    pub slots: Vec<u32>,
    /// Draws of the next token per token and layer to estimate its probabilities.
    #[arg(long, default_value_t = 256)]
    pub samples: u32,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Runs one `expertd trace` subcommand.
pub fn run(cmd: TraceCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        TraceCommand::Sim(a) => run_sim(a),
        TraceCommand::Stats(a) => run_stats(a),
        TraceCommand::Gen(a) => run_gen(a),
        TraceCommand::Bound(a) => run_bound(a),
        TraceCommand::Record(a) => record::run(a),
    }
}

/// Reads a trace to replay or describe: one with no tokens is an error.
fn read(path: &std::path::Path) -> anyhow::Result<Trace> {
    let t = Trace::read(path).with_context(|| format!("reading trace {}", path.display()))?;
    if t.tokens() == 0 {
        anyhow::bail!("trace {} has no tokens", path.display());
    }
    Ok(t)
}

fn run_sim(a: SimArgs) -> anyhow::Result<ExitCode> {
    let t = read(&a.trace)?;
    let mut tables = Vec::new();
    for &slots in &a.slots {
        let rows = sim::sim_table(&t, slots).with_context(|| format!("--slots {slots}"))?;
        tables.push((slots, rows));
    }
    if a.json {
        let v: Vec<_> = tables
            .iter()
            .map(|(slots, rows)| serde_json::json!({"slots": slots, "rows": rows}))
            .collect();
        let out = serde_json::json!({
            "trace": a.trace.display().to_string(),
            "layers": t.layers, "experts": t.experts, "used": t.used, "tokens": t.tokens(),
            "tables": v,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "trace {}: {} layers, {} experts, {} used, {} tokens",
        a.trace.display(),
        t.layers,
        t.experts,
        t.used,
        t.tokens()
    );
    for (slots, rows) in tables {
        println!("\nslots per layer: {slots}");
        println!(
            "{:<12} {:>12} {:>12} {:>9} {:>10}",
            "policy", "hits", "misses", "hit rate", "vs belady"
        );
        for r in rows {
            println!(
                "{:<12} {:>12} {:>12} {:>8.2}% {:>10.3}",
                r.policy,
                r.hits,
                r.misses,
                100.0 * r.hit_rate,
                r.ratio_to_belady
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The model layer of each MoE layer of a recorded trace, from the `moe_layers` of its
/// sidecar (`TRACE.json`, written by `trace record`), when there is one.
fn moe_layers_of(trace: &std::path::Path) -> Option<Vec<u64>> {
    let mut side = trace.as_os_str().to_owned();
    side.push(".json");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(side).ok()?).ok()?;
    v.get("moe_layers")?
        .as_array()?
        .iter()
        .map(serde_json::Value::as_u64)
        .collect()
}

fn run_stats(a: StatsArgs) -> anyhow::Result<ExitCode> {
    let t = read(&a.trace)?;
    let s = trace::stats(&t);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(ExitCode::SUCCESS);
    }
    let lru_slots = (t.experts as usize).div_ceil(4).max(t.used as usize);
    // The format numbers MoE layers 0.. without dense layers; `trace record`'s sidecar
    // (TRACE.json) names the model's layers.
    let model_layers = moe_layers_of(&a.trace).filter(|m| m.len() == s.len());
    println!(
        "trace {}: {} MoE layers, {} experts, {} used, {} tokens",
        a.trace.display(),
        t.layers,
        t.experts,
        t.used,
        t.tokens()
    );
    println!(
        "{:>5} {:>8} {:>10} {:>8} {:>14}",
        if model_layers.is_some() { "blk" } else { "moe" },
        "reuse",
        "top10%",
        "zipf s",
        format!("LRU@{lru_slots}")
    );
    for (i, l) in s.iter().enumerate() {
        let layer = model_layers
            .as_ref()
            .and_then(|m| m.get(i).copied())
            .unwrap_or(u64::from(l.layer));
        println!(
            "{:>5} {:>7.1}% {:>9.1}% {:>8.2} {:>13.1}%",
            layer,
            100.0 * l.reuse,
            100.0 * l.top10_share,
            l.zipf_s,
            100.0 * l.lru_hit_rate_25
        );
    }
    let n = s.len().max(1) as f64;
    println!(
        "{:>5} {:>7.1}% {:>9.1}% {:>8.2} {:>13.1}%",
        "mean",
        100.0 * s.iter().map(|l| l.reuse).sum::<f64>() / n,
        100.0 * s.iter().map(|l| l.top10_share).sum::<f64>() / n,
        s.iter().map(|l| l.zipf_s).sum::<f64>() / n,
        100.0 * s.iter().map(|l| l.lru_hit_rate_25).sum::<f64>() / n
    );
    Ok(ExitCode::SUCCESS)
}

fn parse_reuse(s: &str) -> anyhow::Result<(f64, f64)> {
    let parse = |x: &str| -> anyhow::Result<f64> {
        let v: f64 = x
            .trim()
            .parse()
            .with_context(|| format!("--reuse: not a number: {x:?}"))?;
        if !(0.0..=1.0).contains(&v) {
            bail!("--reuse: {v} is not in 0..=1");
        }
        Ok(v)
    };
    match s.split_once("..") {
        Some((lo, hi)) => Ok((parse(lo)?, parse(hi)?)),
        None => {
            let v = parse(s)?;
            Ok((v, v))
        }
    }
}

fn run_gen(a: GenArgs) -> anyhow::Result<ExitCode> {
    let p = a.model.params()?;
    let t = trace::generate(&p).context("generating the trace")?;
    t.write(&a.output, a.text)
        .with_context(|| format!("writing {}", a.output.display()))?;
    eprintln!(
        "wrote {} ({} tokens x {} layers x {} experts used of {})",
        a.output.display(),
        t.tokens(),
        t.layers,
        t.used,
        t.experts
    );
    Ok(ExitCode::SUCCESS)
}

fn run_bound(a: BoundArgs) -> anyhow::Result<ExitCode> {
    let p = a.model.params()?;
    let t = trace::generate(&p).context("generating the trace")?;
    let bounds = trace::online_bound(&p, &a.slots, a.samples).context("computing the bound")?;
    let mut rows = Vec::new();
    for (&slots, &bound) in a.slots.iter().zip(&bounds) {
        let sim = sim::sim_table(&t, slots).with_context(|| format!("--slots {slots}"))?;
        let rate = |name: &str| sim.iter().find(|r| r.policy == name).map(|r| r.hit_rate);
        let belady = rate("belady").context("the simulator has no belady row")?;
        let best = sim
            .iter()
            .filter(|r| r.policy != "belady")
            .max_by(|x, y| x.hit_rate.total_cmp(&y.hit_rate))
            .context("the simulator has no policy rows")?;
        rows.push(serde_json::json!({
            "slots": slots,
            "online_bound": bound,
            "belady": belady,
            "bound_to_belady": if belady > 0.0 { bound / belady } else { 0.0 },
            "best_policy": best.policy,
            "best_policy_hit_rate": best.hit_rate,
            "best_policy_to_bound": if bound > 0.0 { best.hit_rate / bound } else { 0.0 },
        }));
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "generator: reuse {} zipf {} ({} layers, {} experts, {} used, {} tokens, seed {}); {} samples",
        a.model.reuse, p.zipf, p.layers, p.experts, p.used, p.tokens, p.seed, a.samples
    );
    println!(
        "{:>6}  {:>12}  {:>8}  {:>14}  {:>21}  {:>12}",
        "slots", "online bound", "belady", "bound / belady", "best policy", "best / bound"
    );
    for r in &rows {
        let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
        println!(
            "{:>6}  {:>11.1}%  {:>7.1}%  {:>14.3}  {:>13} {:>6.1}%  {:>12.3}",
            r["slots"].as_u64().unwrap_or(0),
            100.0 * f("online_bound"),
            100.0 * f("belady"),
            f("bound_to_belady"),
            r["best_policy"].as_str().unwrap_or(""),
            100.0 * f("best_policy_hit_rate"),
            f("best_policy_to_bound"),
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuse_ranges_parse() {
        assert_eq!(parse_reuse("0.3").unwrap(), (0.3, 0.3));
        assert_eq!(parse_reuse("0.25..0.47").unwrap(), (0.25, 0.47));
        assert!(parse_reuse("1.5").is_err());
        assert!(parse_reuse("a..b").is_err());
    }

    /// A trace with no tokens is an error for the tools that replay or describe it
    /// (their tables would be all zeros).
    #[test]
    fn an_empty_trace_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.trace");
        std::fs::write(&path, "expert-trace 1 layers=2 experts=8 used=2\n").unwrap();
        let err = read(&path).unwrap_err().to_string();
        assert!(err.contains("has no tokens"), "{err}");
        std::fs::write(
            &path,
            "expert-trace 1 layers=2 experts=8 used=2\n0 1 | 2 3\n",
        )
        .unwrap();
        assert_eq!(read(&path).unwrap().tokens(), 1);
    }
}
