//! `expertd synth`: write a synthetic MoE GGUF with random weights.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;

use crate::gguf::ModelInfo;
use crate::synth::{self, ExpertType, Locality, Preset, SynthArch, SynthConfig};

/// Preset names on the command line.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum PresetArg {
    /// 4 layers, n_embd 256, 32 experts (4 used): loads and answers in well under a second.
    Tiny,
    /// 8 layers, n_embd 512, 64 experts (8 used): ~100 MiB, for bit-exactness tests.
    Mid,
    /// 24 layers, n_embd 1024, 128 experts (8 used), Q4_K experts: ~2.6 GiB.
    Bench,
}

/// Calibrated routing-knob settings on the command line.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum LocalityArg {
    /// The preset's own knobs.
    Default,
    /// Routing locality like published real models (reuse 25-47% per layer, LRU at a
    /// quarter of the experts about 75%; calibrated on the bench preset).
    Realistic,
    /// Clearly harder to cache (reuse under 20%, LRU at a quarter under 50%).
    Hard,
}

/// Architectures on the command line.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum ArchArg {
    /// Separate gate, up and down experts, softmax routing.
    #[value(name = "qwen3moe")]
    Qwen3Moe,
    /// Gate and up experts fused in one tensor, a shared expert, sigmoid routing, dense
    /// layers without experts (the first and, from 4 layers, the middle one).
    #[value(name = "hy_v3")]
    HyV3,
    /// Per-expert biases, a router bias, OpenAI's clamped SwiGLU, attention sinks and
    /// biases, sliding-window attention in every other layer (use with
    /// --expert-type mxfp4, as gpt-oss ships).
    #[value(name = "gpt-oss")]
    GptOss,
    /// GLM-4.5's layout: a dense first layer, a shared expert, sigmoid routing with a
    /// selection bias, q/k/v biases, partial RoPE, and a multi-token-prediction block
    /// after the last layer.
    #[value(name = "glm4moe")]
    Glm4Moe,
}

/// Expert tensor types on the command line.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum ExpertTypeArg {
    /// Q4_K (rows must be multiples of 256).
    #[value(name = "q4_k")]
    Q4K,
    /// Q8_0 (rows must be multiples of 32).
    #[value(name = "q8_0")]
    Q8_0,
    /// Mixed like llama.cpp's Q4_K_M: gate and up Q4_K, down Q6_K in even layers and
    /// Q4_K in odd ones (rows must be multiples of 256).
    #[value(name = "q4_k_m")]
    Q4KM,
    /// MXFP4, as gpt-oss ships its experts (rows must be multiples of 32).
    #[value(name = "mxfp4")]
    Mxfp4,
    /// Q2_K, as the smallest quants of the largest models have most experts (rows must
    /// be multiples of 256).
    #[value(name = "q2_k")]
    Q2K,
}

/// Options of `expertd synth`; explicit options override the preset.
#[derive(Debug, clap::Args)]
pub struct SynthArgs {
    /// Starting point for every option below.
    #[arg(long, value_enum, default_value = "tiny")]
    pub preset: PresetArg,
    /// Routing-knob settings applied to the preset (explicit knob options override them;
    /// see bench/RESULTS.md for what each measures).
    #[arg(long, value_enum, default_value = "default")]
    pub locality: LocalityArg,
    /// Output file (written atomically).
    #[arg(short = 'o', long)]
    pub output: PathBuf,
    /// Transformer blocks.
    #[arg(long)]
    pub layers: Option<u32>,
    /// Hidden size.
    #[arg(long)]
    pub embd: Option<u32>,
    /// Attention heads.
    #[arg(long)]
    pub heads: Option<u32>,
    /// KV heads.
    #[arg(long)]
    pub heads_kv: Option<u32>,
    /// Experts per layer.
    #[arg(long)]
    pub experts: Option<u32>,
    /// Experts used per token.
    #[arg(long)]
    pub experts_used: Option<u32>,
    /// FFN size of one expert.
    #[arg(long)]
    pub expert_ffn: Option<u32>,
    /// Vocabulary size.
    #[arg(long)]
    pub vocab: Option<u32>,
    /// Trained context length.
    #[arg(long)]
    pub ctx: Option<u32>,
    /// Sigma of the log-normal scale of each expert's router row (expert popularity skew).
    #[arg(long)]
    pub router_skew: Option<f32>,
    /// Std of the router logits before the skew (higher: more peaked routing).
    #[arg(long)]
    pub router_scale: Option<f32>,
    /// Token embedding scale: how much routing depends on the current token.
    #[arg(long)]
    pub token_weight: Option<f32>,
    /// Attention output scale: how much routing depends on the context.
    #[arg(long)]
    pub context_weight: Option<f32>,
    /// Attention recency (0: off): higher makes the context the routers see an average
    /// over fewer recent tokens.
    #[arg(long)]
    pub attn_recency: Option<f32>,
    /// Layer l's attention output scale is the context weight times (l + 1)^-DECAY.
    #[arg(long)]
    pub context_decay: Option<f32>,
    /// PRNG seed (same seed and options, same bytes).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Type of the expert tensors.
    #[arg(long, value_enum)]
    pub expert_type: Option<ExpertTypeArg>,
    /// Generator threads (default: available cores, at most 4).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Architecture (the preset's sizes apply to either).
    #[arg(long, value_enum, default_value = "qwen3moe")]
    pub arch: ArchArg,
    /// Print the manifest (config, tensors, offsets) as JSON on stdout (with `--splits`:
    /// the offsets of the unsplit file, and the splits' paths under "splits").
    #[arg(long)]
    pub json: bool,
    /// Split the model into this many files, as llama.cpp's gguf-split does:
    /// NAME-00001-of-0000N.gguf and so on next to the output, which is then removed
    /// (the engine and `expertd serve` are given the first file).
    #[arg(long, value_parser = clap::value_parser!(u16).range(2..))]
    pub splits: Option<u16>,
}

impl SynthArgs {
    /// The preset with every explicit option applied.
    pub fn config(&self) -> SynthConfig {
        let preset = match self.preset {
            PresetArg::Tiny => Preset::Tiny,
            PresetArg::Mid => Preset::Mid,
            PresetArg::Bench => Preset::Bench,
        };
        let locality = match self.locality {
            LocalityArg::Default => Locality::Default,
            LocalityArg::Realistic => Locality::Realistic,
            LocalityArg::Hard => Locality::Hard,
        };
        let mut c = SynthConfig::preset(preset).with_locality(locality);
        let set = |dst: &mut u32, v: Option<u32>| {
            if let Some(v) = v {
                *dst = v;
            }
        };
        set(&mut c.layers, self.layers);
        set(&mut c.n_embd, self.embd);
        set(&mut c.n_head, self.heads);
        set(&mut c.n_head_kv, self.heads_kv);
        set(&mut c.n_expert, self.experts);
        set(&mut c.n_expert_used, self.experts_used);
        set(&mut c.expert_ffn, self.expert_ffn);
        set(&mut c.vocab, self.vocab);
        set(&mut c.ctx, self.ctx);
        let setf = |dst: &mut f32, v: Option<f32>| {
            if let Some(v) = v {
                *dst = v;
            }
        };
        setf(&mut c.router_skew, self.router_skew);
        setf(&mut c.router_scale, self.router_scale);
        setf(&mut c.token_weight, self.token_weight);
        setf(&mut c.context_weight, self.context_weight);
        setf(&mut c.attn_recency, self.attn_recency);
        setf(&mut c.context_decay, self.context_decay);
        c.seed = self.seed;
        c.arch = match self.arch {
            ArchArg::Qwen3Moe => SynthArch::Qwen3Moe,
            ArchArg::HyV3 => SynthArch::HyV3,
            ArchArg::GptOss => SynthArch::GptOss,
            ArchArg::Glm4Moe => SynthArch::Glm4Moe,
        };
        if let Some(t) = self.expert_type {
            c.expert_type = match t {
                ExpertTypeArg::Q4K => ExpertType::Q4K,
                ExpertTypeArg::Q8_0 => ExpertType::Q8_0,
                ExpertTypeArg::Q4KM => ExpertType::Q4KM,
                ExpertTypeArg::Mxfp4 => ExpertType::Mxfp4,
                ExpertTypeArg::Q2K => ExpertType::Q2K,
            };
        }
        c
    }
}

/// Runs `expertd synth`.
pub fn run(args: SynthArgs) -> anyhow::Result<ExitCode> {
    let config = args.config();
    let threads = args.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(4)
    });
    let start = Instant::now();
    let manifest = synth::write_model(&config, &args.output, threads)
        .with_context(|| format!("writing {}", args.output.display()))?;
    let splits = match args.splits {
        None => Vec::new(),
        Some(n) => {
            let paths = crate::gguf::write_split(&args.output, n)
                .with_context(|| format!("splitting {}", args.output.display()))?;
            std::fs::remove_file(&args.output).with_context(|| {
                format!("removing {} after splitting it", args.output.display())
            })?;
            paths
        }
    };
    let secs = start.elapsed().as_secs_f64();
    if args.json {
        let mut v = serde_json::to_value(&manifest)?;
        if !splits.is_empty() {
            v["splits"] = serde_json::to_value(&splits)?;
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    let read_from = splits.first().unwrap_or(&args.output);
    let model = crate::gguf::GgufModel::open(read_from)
        .with_context(|| format!("reading back {}", read_from.display()))?;
    let info = ModelInfo::from_model(&model)?;
    let per_expert = info
        .expert_bytes_per_layer
        .values()
        .next()
        .copied()
        .unwrap_or(0);
    println!(
        "{} {} ({} bytes, {:.2} GiB) in {secs:.1}s with {threads} threads",
        if splits.is_empty() {
            "wrote"
        } else {
            "generated and split"
        },
        args.output.display(),
        manifest.file_size,
        manifest.file_size as f64 / f64::from(1u32 << 30)
    );
    println!(
        "{}: {} layers, n_embd {}, {} heads ({} kv), {} experts ({} used), expert ffn {}, \
         vocab {}, {} experts, seed {}",
        config.preset,
        config.layers,
        config.n_embd,
        config.n_head,
        config.n_head_kv,
        config.n_expert,
        config.n_expert_used,
        config.expert_ffn,
        config.vocab,
        config.expert_type,
        config.seed
    );
    println!(
        "{} tensors; one expert is {per_expert} bytes per layer; experts are {:.1}% of the data",
        manifest.tensors.len(),
        100.0 * info.expert_bytes as f64 / info.total_bytes.max(1) as f64
    );
    if !splits.is_empty() {
        println!(
            "split into {} files (llama.cpp's gguf-split layout; give the engine the first):",
            splits.len()
        );
        for p in &splits {
            println!("  {}", p.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}
