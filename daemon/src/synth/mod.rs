//! Synthetic MoE models: a `qwen3moe` GGUF (or `hy_v3`, `gpt-oss`, `glm4moe`: [`SynthArch`]) with
//! random weights that the pinned llama.cpp loads and runs, with the real tensor names,
//! shapes and types, a byte-fallback SPM vocabulary, and knobs for how routing behaves.
//!
//! Invariants: the file is a pure function of [`SynthConfig`] (same config and seed, same
//! bytes, whatever the thread count: every tensor row has its own PRNG stream); the file
//! appears atomically (temp file in the same directory, fsync, rename) or not at all.
//!
//! Weights (std of the dequantized values; all zero-mean):
//! - `token_embd` Q8_0: `token_weight`.
//! - `attn_q/k/v` Q8_0: 1/sqrt(n_embd); `attn_output` Q8_0 of layer l:
//!   `context_weight` * (l + 1)^-`context_decay` / sqrt(n_embd_q) (with normalized q/k the
//!   attention is a soft average of the context, so this scales how much the context moves
//!   the hidden state that the routers see; the decay keeps the context, which piles up in
//!   the residual stream, from taking over the deep layers).
//! - With `attn_recency` > 0: `attn_q.bias`/`attn_k.bias` F32, every element
//!   [`RECENCY_BIAS`], and `attn_q_norm`/`attn_k_norm` `sqrt(attn_recency)` (see the field).
//! - `ffn_gate_inp` F32: `router_scale`/sqrt(n_embd) (router logits have std
//!   `router_scale`), each expert's row times exp(`router_skew` * N(0,1)).
//! - `ffn_gate_exps`/`ffn_up_exps`: 1/sqrt(n_embd); `ffn_down_exps`: 1/sqrt(expert_ffn).
//! - `output` Q8_0: logits of std 2.5, except the 259 special and byte tokens whose rows
//!   are scaled by 1/16 so that greedy output is text and rarely ends early.
//! - other norms F32: 1.
//! - gpt-oss's biases (q/k/v, attention output, router, every expert's gate, up and down)
//!   and glm4moe's (q/k/v unless `attn_recency` sets q/k, the selection bias
//!   `exp_probs_b`) F32 normals of std 0.1; gpt-oss's attention sinks F32 normals of std 1.
//! - glm4moe's MTP block `nextn.eh_proj` Q8_0: 1/sqrt(2 n_embd).
//!
//! [`Locality`] names calibrated knob settings (routing locality like published real models,
//! or clearly harder); bench/RESULTS.md has the measurements.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use crate::gguf::{self, GgmlType, TensorInfo, TensorSpec, Value};

pub mod quant;
pub mod rng;
pub mod vocab;

use rng::Rng;

/// The architecture written by default.
pub const ARCH: &str = "qwen3moe";

/// The architecture of the model: its metadata prefix and the expert tensors' layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum SynthArch {
    /// `qwen3moe`: separate gate, up and down expert tensors, softmax routing.
    Qwen3Moe,
    /// `hy_v3`: gate and up experts fused in one tensor (`ffn_gate_up_exps`, as newer
    /// conversions of DeepSeek and Qwen3.5 MoE models have them), a shared expert every
    /// token uses, sigmoid routing, and dense layers without experts: the first (as
    /// DeepSeek-style models lead with) and, with 4 layers or more, the middle one (as
    /// models that interleave dense and MoE layers have).
    HyV3,
    /// `gpt-oss`: per-expert biases on gate, up and down (added by the router's expert
    /// ids, not the pool's slots), a router bias, the clamped SwiGLU of OpenAI's models,
    /// softmax over the selected experts, attention sinks, q/k/v and output biases, no
    /// q/k norms, and sliding-window attention in every other layer.
    GptOss,
    /// `glm4moe` (GLM-4.5): a dense first layer, a shared expert, sigmoid routing with a
    /// selection bias (`exp_probs_b`) and normalized weights, q/k/v biases, partial RoPE,
    /// and one multi-token-prediction block after the last layer (`nextn_predict_layers`,
    /// with experts of its own), which llama.cpp loads only for MTP speculative decoding.
    Glm4Moe,
}

impl SynthArch {
    /// `general.architecture`.
    pub fn name(self) -> &'static str {
        match self {
            SynthArch::Qwen3Moe => ARCH,
            SynthArch::HyV3 => "hy_v3",
            SynthArch::GptOss => "gpt-oss",
            SynthArch::Glm4Moe => "glm4moe",
        }
    }
}

/// gpt-oss's attention window in its sliding-window layers (its real value).
pub const GPT_OSS_WINDOW: u32 = 128;
/// Std of gpt-oss's and glm4moe's random F32 biases (q/k/v, attention output, router,
/// experts, selection bias).
const BIAS_STD: f64 = 0.1;
/// glm4moe's dense layers before the first MoE layer (`leading_dense_block_count`).
const GLM4MOE_DENSE_LEAD: u32 = 1;
/// Logit std of the output projection for normal tokens.
const OUTPUT_LOGIT_STD: f64 = 2.5;
/// Output rows of special and byte tokens are scaled by this.
const OUTPUT_SPECIAL_DAMPING: f64 = 1.0 / 16.0;
/// Value of every Q and K bias element when `attn_recency` is on: four times the std of
/// the token-dependent part of a query or key element (rows of std 1/sqrt(n_embd) times a
/// normalized input), so that after the q/k norms every query and key points about the
/// same way (cosine about 0.97).
pub const RECENCY_BIAS: f32 = 4.0;
/// Target size of one generated chunk (a run of rows of one tensor).
const CHUNK_BYTES: u64 = 4 << 20;

/// Type of the expert tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum ExpertType {
    /// Q4_K: rows must be multiples of 256.
    Q4K,
    /// Q8_0: rows must be multiples of 32.
    Q8_0,
    /// Mixed, as llama.cpp's Q4_K_M files mix them: gate and up Q4_K, down Q6_K in even
    /// layers and Q4_K in odd ones (so expert sizes differ by projection and by layer);
    /// rows must be multiples of 256.
    Q4KM,
    /// MXFP4 (as gpt-oss ships its experts): rows must be multiples of 32.
    Mxfp4,
    /// Q2_K (as the smallest quants of the largest MoE models have most experts): rows
    /// must be multiples of 256.
    Q2K,
}

impl std::fmt::Display for ExpertType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExpertType::Q4KM => f.write_str("q4_K_M"),
            _ => write!(f, "{}", self.ggml(false, 0)),
        }
    }
}

impl ExpertType {
    /// The ggml type of layer `layer`'s gate and up (`down` false) or down experts.
    pub fn ggml(self, down: bool, layer: u32) -> GgmlType {
        match self {
            ExpertType::Q4K => GgmlType::Q4_K,
            ExpertType::Q8_0 => GgmlType::Q8_0,
            ExpertType::Q4KM if down && layer % 2 == 0 => GgmlType::Q6_K,
            ExpertType::Q4KM => GgmlType::Q4_K,
            ExpertType::Mxfp4 => GgmlType::MXFP4,
            ExpertType::Q2K => GgmlType::Q2_K,
        }
    }
}

/// Named starting points.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    /// Loads and answers in well under a second (4 layers, 32 experts).
    Tiny,
    /// A few hundred MiB at most, for bit-exactness tests (8 layers, 64 experts).
    Mid,
    /// The benchmark model (24 layers, 128 experts, about 2.6 GiB).
    Bench,
}

/// Calibrated settings of the routing knobs (router skew and scale, token and context
/// weights, attention recency, context decay), measured on the bench preset with English
/// prompts (bench/RESULTS.md, "Routing locality of the synthetic models").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Locality {
    /// The presets' own knobs (the models as they always were).
    Default,
    /// Like published real models: consecutive-token reuse within 25-47% in every layer,
    /// LRU with a quarter of the experts as slots about 75%.
    Realistic,
    /// Clearly harder to cache: reuse under 20%, LRU at a quarter under 50%.
    Hard,
}

impl Locality {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Locality::Default => "default",
            Locality::Realistic => "realistic",
            Locality::Hard => "hard",
        }
    }
}

impl Preset {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Preset::Tiny => "tiny",
            Preset::Mid => "mid",
            Preset::Bench => "bench",
        }
    }
}

/// Everything that determines a synthetic model's bytes.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct SynthConfig {
    /// Preset the values started from (recorded in the file).
    pub preset: String,
    /// Transformer blocks.
    pub layers: u32,
    /// Hidden size.
    pub n_embd: u32,
    /// Attention heads (head dim = n_embd / n_head).
    pub n_head: u32,
    /// KV heads (divides n_head).
    pub n_head_kv: u32,
    /// Experts per layer.
    pub n_expert: u32,
    /// Experts used per token.
    pub n_expert_used: u32,
    /// FFN size of one expert.
    pub expert_ffn: u32,
    /// Vocabulary size.
    pub vocab: u32,
    /// Trained context length.
    pub ctx: u32,
    /// Sigma of the log-normal scale of each expert's router row (popularity skew).
    pub router_skew: f32,
    /// Std of the router logits before the skew.
    pub router_scale: f32,
    /// Scale of the token embeddings (routing depends on the current token).
    pub token_weight: f32,
    /// Scale of the attention output projection (routing depends on the context).
    pub context_weight: f32,
    /// Recency of attention (0: off). When on, every layer gets constant Q and K biases
    /// that dominate the normalized queries and keys, so RoPE turns the attention scores
    /// into a decaying function of the distance between tokens, and the q/k norm weights
    /// are `sqrt(attn_recency)`, which sharpens that decay: the context the routers see
    /// is then an average over the last few tokens instead of the whole prompt.
    pub attn_recency: f32,
    /// Layer l's attention output scale is `context_weight * (l + 1)^-context_decay`.
    pub context_decay: f32,
    /// PRNG seed.
    pub seed: u64,
    /// Expert tensor type.
    pub expert_type: ExpertType,
    /// Architecture.
    pub arch: SynthArch,
}

impl SynthConfig {
    /// The values of a preset (seed 0).
    pub fn preset(p: Preset) -> SynthConfig {
        let base = SynthConfig {
            preset: p.name().to_string(),
            layers: 24,
            n_embd: 1024,
            n_head: 16,
            n_head_kv: 4,
            n_expert: 128,
            n_expert_used: 8,
            expert_ffn: 512,
            vocab: 4096,
            ctx: 4096,
            router_skew: 0.5,
            router_scale: 1.0,
            token_weight: 1.0,
            context_weight: 1.0,
            attn_recency: 0.0,
            context_decay: 0.0,
            seed: 0,
            expert_type: ExpertType::Q4K,
            arch: SynthArch::Qwen3Moe,
        };
        match p {
            Preset::Bench => base,
            Preset::Mid => SynthConfig {
                layers: 8,
                n_embd: 512,
                n_head: 8,
                n_head_kv: 2,
                n_expert: 64,
                n_expert_used: 8,
                expert_ffn: 256,
                vocab: 2048,
                ..base
            },
            Preset::Tiny => SynthConfig {
                layers: 4,
                n_embd: 256,
                n_head: 4,
                n_head_kv: 2,
                n_expert: 32,
                n_expert_used: 4,
                expert_ffn: 256,
                vocab: 1024,
                ctx: 2048,
                ..base
            },
        }
    }

    /// Sets the routing knobs to a calibrated [`Locality`] (and names it in `preset`).
    pub fn with_locality(mut self, locality: Locality) -> SynthConfig {
        let (skew, scale, token, context, recency, decay) = match locality {
            Locality::Default => (0.5, 1.0, 1.0, 1.0, 0.0, 0.0),
            Locality::Realistic => (0.75, 1.0, 1.0, 2.5, 3.0, 0.5),
            Locality::Hard => (0.3, 1.0, 1.0, 0.4, 0.0, 0.0),
        };
        self.router_skew = skew;
        self.router_scale = scale;
        self.token_weight = token;
        self.context_weight = context;
        self.attn_recency = recency;
        self.context_decay = decay;
        if locality != Locality::Default {
            self.preset = format!("{}-{}", self.preset, locality.name());
        }
        self
    }

    /// The attention output scale of layer `l`.
    pub fn context_weight_of(&self, l: u32) -> f64 {
        f64::from(self.context_weight) * (f64::from(l) + 1.0).powf(-f64::from(self.context_decay))
    }

    /// `feed_forward_length`: the width of a dense FFN (hy_v3's first layer), as wide as
    /// the experts a token uses together.
    pub fn dense_ffn(&self) -> u32 {
        self.expert_ffn.saturating_mul(self.n_expert_used)
    }

    /// Whether layer `l` has a dense FFN and no experts (hy_v3's first and middle ones,
    /// glm4moe's first).
    pub fn is_dense(&self, l: u32) -> bool {
        match self.arch {
            SynthArch::HyV3 => l == 0 || (self.layers >= 4 && l == self.layers / 2),
            SynthArch::Glm4Moe => l < GLM4MOE_DENSE_LEAD,
            SynthArch::Qwen3Moe | SynthArch::GptOss => false,
        }
    }

    /// Multi-token-prediction blocks after the `layers` the model computes (glm4moe: 1).
    pub fn nextn_layers(&self) -> u32 {
        u32::from(self.arch == SynthArch::Glm4Moe)
    }

    /// `block_count`: the layers plus the multi-token-prediction blocks.
    pub fn block_count(&self) -> u32 {
        self.layers.saturating_add(self.nextn_layers())
    }

    /// Layers with experts that the model computes (not counting MTP blocks).
    pub fn moe_layers(&self) -> u32 {
        (0..self.layers).filter(|&l| !self.is_dense(l)).count() as u32
    }

    /// Head dimension.
    pub fn head_dim(&self) -> u32 {
        self.n_embd.checked_div(self.n_head).unwrap_or(0)
    }

    /// Checks that the pinned llama.cpp can load the model and the types fit the shapes.
    pub fn validate(&self) -> Result<(), SynthError> {
        let bad = |msg: String| Err(SynthError::Config(msg));
        let (min_vocab, max_vocab) = (vocab::MIN_VOCAB, vocab::MAX_VOCAB);
        // llama.cpp's LLAMA_MAX_LAYERS bounds block_count, MTP blocks included
        let max_layers = 512 - self.nextn_layers();
        if self.layers == 0 || self.layers > max_layers {
            return bad(format!(
                "--layers {} must be in 1..={max_layers}",
                self.layers
            ));
        }
        if matches!(self.arch, SynthArch::HyV3 | SynthArch::Glm4Moe) && self.layers < 2 {
            return bad(format!(
                "--layers {}: {}'s first layer is dense, so it needs at least 2",
                self.layers,
                self.arch.name()
            ));
        }
        if self.arch == SynthArch::Glm4Moe && self.head_dim() % 4 != 0 {
            return bad(format!(
                "head dim {} (embd / heads) must be a multiple of 4: glm4moe ropes half of it",
                self.head_dim()
            ));
        }
        if self.arch == SynthArch::GptOss && self.attn_recency > 0.0 {
            return bad(format!(
                "--attn-recency {}: it works through q/k norms, which gpt-oss has none of \
                 (use --locality default or hard)",
                self.attn_recency
            ));
        }
        if self.n_head == 0 || self.n_embd % self.n_head != 0 {
            return bad(format!(
                "--embd {} must be a multiple of --heads {}",
                self.n_embd, self.n_head
            ));
        }
        if self.head_dim() % 2 != 0 {
            return bad(format!(
                "head dim {} (embd / heads) must be even for RoPE",
                self.head_dim()
            ));
        }
        if self.n_head_kv == 0 || self.n_head % self.n_head_kv != 0 {
            return bad(format!(
                "--heads {} must be a multiple of --heads-kv {}",
                self.n_head, self.n_head_kv
            ));
        }
        if self.n_expert < 2 || self.n_expert > 1024 {
            return bad(format!("--experts {} must be in 2..=1024", self.n_expert));
        }
        if self.n_expert_used == 0 || self.n_expert_used > self.n_expert {
            return bad(format!(
                "--experts-used {} must be in 1..=--experts ({})",
                self.n_expert_used, self.n_expert
            ));
        }
        if self.vocab < min_vocab || self.vocab > max_vocab {
            return bad(format!(
                "--vocab {} must be in {min_vocab}..={max_vocab}",
                self.vocab
            ));
        }
        if self.ctx == 0 {
            return bad("--ctx must be positive".into());
        }
        // Q8_0 attention, embeddings and output: rows of n_embd and n_head * head_dim.
        if self.n_embd % 32 != 0 {
            return bad(format!(
                "--embd {} must be a multiple of 32 (Q8_0 rows)",
                self.n_embd
            ));
        }
        let (block, ty) = match self.expert_type {
            ExpertType::Q4K => (256, "q4_K"),
            ExpertType::Q8_0 => (32, "q8_0"),
            ExpertType::Q4KM => (256, "q4_K and q6_K"),
            ExpertType::Mxfp4 => (32, "mxfp4"),
            ExpertType::Q2K => (256, "q2_K"),
        };
        for (what, n) in [("--embd", self.n_embd), ("--expert-ffn", self.expert_ffn)] {
            if n == 0 || n % block != 0 {
                return bad(format!(
                    "{what} {n} must be a positive multiple of {block}: {ty} expert rows are \
                     {block}-element blocks"
                ));
            }
        }
        // A router row is scaled by exp(skew * z) with z ~ N(0,1) over thousands of rows:
        // with a skew of 30 the largest rows overflow f32 and routing turns to NaN.
        if !(0.0..=10.0).contains(&self.router_skew) {
            return bad(format!(
                "--router-skew {} must be in 0..=10",
                self.router_skew
            ));
        }
        if self.expert_ffn.checked_mul(self.n_expert_used).is_none() {
            return bad(format!(
                "--expert-ffn {} x --experts-used {} overflows the model's feed_forward_length",
                self.expert_ffn, self.n_expert_used
            ));
        }
        for (what, v) in [
            ("--router-scale", self.router_scale),
            ("--token-weight", self.token_weight),
            ("--context-weight", self.context_weight),
            ("--attn-recency", self.attn_recency),
            ("--context-decay", self.context_decay),
        ] {
            if !(0.0..=100.0).contains(&v) {
                return bad(format!("{what} {v} must be in 0..=100"));
            }
        }
        Ok(())
    }
}

/// Why a model could not be written.
#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    /// The options do not describe a loadable model.
    #[error("invalid synth options: {0}")]
    Config(String),
    /// The header could not be laid out.
    #[error("cannot lay out the GGUF header: {0}")]
    Layout(#[from] gguf::WriteError),
    /// Writing failed (the partial temp file is removed).
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A generator thread failed.
    #[error("generator thread failed: {0}")]
    Worker(String),
}

/// What was written: the generator's own record, for tests to compare a reader against.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Manifest {
    /// The final path.
    pub path: PathBuf,
    /// The config written.
    pub config: SynthConfig,
    /// Metadata in file order.
    pub metadata: Vec<(String, Value)>,
    /// Tensors in file order, offsets relative to `data_offset`.
    pub tensors: Vec<TensorInfo>,
    /// Alignment of the data section.
    pub alignment: u64,
    /// Absolute offset of the data section.
    pub data_offset: u64,
    /// Total bytes written.
    pub file_size: u64,
}

/// How a tensor's rows are filled.
#[derive(Clone, Copy, Debug)]
enum Fill {
    /// F32 ones.
    Ones,
    /// F32, every element this value.
    Const(f32),
    /// F32 normals with this std, each row scaled by exp(skew * N(0,1)).
    Router { std: f64, skew: f64 },
    /// Quantized rows with this std; the first `damped_rows` rows are scaled by `damping`.
    Quant {
        std: f64,
        damped_rows: u64,
        damping: f64,
    },
}

struct Planned {
    spec: TensorSpec,
    fill: Fill,
}

fn plan_tensors(c: &SynthConfig) -> Vec<Planned> {
    let n_embd = u64::from(c.n_embd);
    let head_dim = u64::from(c.head_dim());
    let n_q = u64::from(c.n_head) * head_dim;
    let n_kv = u64::from(c.n_head_kv) * head_dim;
    let n_vocab = u64::from(c.vocab);
    let n_ff = u64::from(c.expert_ffn);
    let n_exp = u64::from(c.n_expert);
    let q8 = GgmlType::Q8_0;
    let inv_sqrt = |n: u64| 1.0 / (n as f64).sqrt();
    let quant = |std: f64| Fill::Quant {
        std,
        damped_rows: 0,
        damping: 1.0,
    };
    let t = |name: String, dims: Vec<u64>, ggml_type: GgmlType, fill: Fill| Planned {
        spec: TensorSpec {
            name,
            dims,
            ggml_type,
        },
        fill,
    };

    let mut v = vec![
        t(
            "token_embd.weight".into(),
            vec![n_embd, n_vocab],
            q8,
            quant(f64::from(c.token_weight)),
        ),
        t(
            "output_norm.weight".into(),
            vec![n_embd],
            GgmlType::F32,
            Fill::Ones,
        ),
        t(
            "output.weight".into(),
            vec![n_embd, n_vocab],
            q8,
            Fill::Quant {
                std: OUTPUT_LOGIT_STD * inv_sqrt(n_embd),
                damped_rows: u64::from(vocab::N_SPECIAL_AND_BYTES),
                damping: OUTPUT_SPECIAL_DAMPING,
            },
        ),
    ];
    let gpt_oss = c.arch == SynthArch::GptOss;
    let glm = c.arch == SynthArch::Glm4Moe;
    // small F32 values, for gpt-oss's and glm4moe's biases
    let normal = |std: f64| Fill::Router { std, skew: 0.0 };
    for l in 0..c.block_count() {
        let n = |s: &str| format!("blk.{l}.{s}.weight");
        let b = |s: &str| format!("blk.{l}.{s}.bias");
        v.push(t(n("attn_norm"), vec![n_embd], GgmlType::F32, Fill::Ones));
        v.push(t(
            n("attn_q"),
            vec![n_embd, n_q],
            q8,
            quant(inv_sqrt(n_embd)),
        ));
        v.push(t(
            n("attn_k"),
            vec![n_embd, n_kv],
            q8,
            quant(inv_sqrt(n_embd)),
        ));
        v.push(t(
            n("attn_v"),
            vec![n_embd, n_kv],
            q8,
            quant(inv_sqrt(n_embd)),
        ));
        if c.attn_recency > 0.0 {
            // Constant biases make the normalized queries and keys nearly the same vector
            // for every token (all pairs of RoPE dimensions equally), so q . k depends
            // mostly on the tokens' distance.
            let bias = |name: &str, len: u64| {
                t(b(name), vec![len], GgmlType::F32, Fill::Const(RECENCY_BIAS))
            };
            v.push(bias("attn_q", n_q));
            v.push(bias("attn_k", n_kv));
        }
        if gpt_oss || glm {
            // q/k/v biases (q and k are the recency ones above when that is on)
            for (name, len) in [("attn_q", n_q), ("attn_k", n_kv), ("attn_v", n_kv)] {
                if name != "attn_v" && c.attn_recency > 0.0 {
                    continue;
                }
                v.push(t(b(name), vec![len], GgmlType::F32, normal(BIAS_STD)));
            }
        }
        v.push(t(
            n("attn_output"),
            vec![n_q, n_embd],
            q8,
            quant(c.context_weight_of(l) * inv_sqrt(n_q)),
        ));
        if gpt_oss {
            v.push(t(
                b("attn_output"),
                vec![n_embd],
                GgmlType::F32,
                normal(BIAS_STD),
            ));
            // a sink logit per head, next to the scores of the attended tokens
            v.push(t(
                n("attn_sinks"),
                vec![u64::from(c.n_head)],
                GgmlType::F32,
                normal(1.0),
            ));
            v.push(t(
                n("post_attention_norm"),
                vec![n_embd],
                GgmlType::F32,
                Fill::Ones,
            ));
        } else {
            let qk_norm = if c.attn_recency > 0.0 {
                Fill::Const(c.attn_recency.sqrt())
            } else {
                Fill::Ones
            };
            v.push(t(n("attn_q_norm"), vec![head_dim], GgmlType::F32, qk_norm));
            v.push(t(n("attn_k_norm"), vec![head_dim], GgmlType::F32, qk_norm));
            let ffn_norm = if glm {
                "post_attention_norm"
            } else {
                "ffn_norm"
            };
            v.push(t(n(ffn_norm), vec![n_embd], GgmlType::F32, Fill::Ones));
        }
        // A dense SiLU FFN `width` wide in Q8_0: ffn_gate{sfx}, ffn_up{sfx}, ffn_down{sfx}.
        let push_dense_ffn = |v: &mut Vec<Planned>, sfx: &str, width: u64| {
            let name = |s: &str| format!("blk.{l}.{s}{sfx}.weight");
            let from_embd = quant(inv_sqrt(n_embd));
            v.push(t(name("ffn_gate"), vec![n_embd, width], q8, from_embd));
            v.push(t(name("ffn_up"), vec![n_embd, width], q8, from_embd));
            v.push(t(
                name("ffn_down"),
                vec![width, n_embd],
                q8,
                quant(inv_sqrt(width)),
            ));
        };
        if c.is_dense(l) {
            // no experts: a dense FFN as wide as the experts a token uses together
            push_dense_ffn(&mut v, "", u64::from(c.dense_ffn()));
            continue;
        }
        v.push(t(
            n("ffn_gate_inp"),
            vec![n_embd, n_exp],
            GgmlType::F32,
            Fill::Router {
                std: f64::from(c.router_scale) * inv_sqrt(n_embd),
                skew: f64::from(c.router_skew),
            },
        ));
        if gpt_oss {
            v.push(t(
                b("ffn_gate_inp"),
                vec![n_exp],
                GgmlType::F32,
                normal(BIAS_STD),
            ));
        }
        if glm {
            // added to the router's scores for choosing the experts only
            v.push(t(
                b("exp_probs_b"),
                vec![n_exp],
                GgmlType::F32,
                normal(BIAS_STD),
            ));
        }
        let ex = c.expert_type.ggml(false, l);
        match c.arch {
            SynthArch::Qwen3Moe | SynthArch::GptOss | SynthArch::Glm4Moe => {
                v.push(t(
                    n("ffn_gate_exps"),
                    vec![n_embd, n_ff, n_exp],
                    ex,
                    quant(inv_sqrt(n_embd)),
                ));
                v.push(t(
                    n("ffn_up_exps"),
                    vec![n_embd, n_ff, n_exp],
                    ex,
                    quant(inv_sqrt(n_embd)),
                ));
                if glm {
                    push_dense_ffn(&mut v, "_shexp", n_ff);
                }
            }
            SynthArch::HyV3 => {
                // one expert's gate rows, then its up rows
                v.push(t(
                    n("ffn_gate_up_exps"),
                    vec![n_embd, 2 * n_ff, n_exp],
                    ex,
                    quant(inv_sqrt(n_embd)),
                ));
                push_dense_ffn(&mut v, "_shexp", n_ff);
            }
        }
        v.push(t(
            n("ffn_down_exps"),
            vec![n_ff, n_embd, n_exp],
            c.expert_type.ggml(true, l),
            quant(inv_sqrt(n_ff)),
        ));
        if gpt_oss {
            // one bias row per expert, added by the router's expert ids
            for (name, len) in [
                ("ffn_gate_exps", n_ff),
                ("ffn_up_exps", n_ff),
                ("ffn_down_exps", n_embd),
            ] {
                v.push(t(
                    b(name),
                    vec![len, n_exp],
                    GgmlType::F32,
                    normal(BIAS_STD),
                ));
            }
        }
        if l >= c.layers {
            // a multi-token-prediction block: the next token's embedding and this block's
            // input, normalized and projected back to n_embd
            v.push(t(
                format!("blk.{l}.nextn.eh_proj.weight"),
                vec![2 * n_embd, n_embd],
                q8,
                quant(inv_sqrt(2 * n_embd)),
            ));
            for name in ["enorm", "hnorm"] {
                v.push(t(
                    format!("blk.{l}.nextn.{name}.weight"),
                    vec![n_embd],
                    GgmlType::F32,
                    Fill::Ones,
                ));
            }
        }
    }
    v
}

fn metadata(c: &SynthConfig) -> Vec<(String, Value)> {
    let arch = c.arch.name();
    let a = |k: &str| format!("{arch}.{k}");
    let pieces = vocab::build(c.vocab);
    let mut md = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (
            "general.name".into(),
            Value::String(format!("expertd synth {} seed {}", c.preset, c.seed)),
        ),
        ("general.quantization_version".into(), Value::U32(2)),
        // llama_ftype, for display only (the loader would otherwise guess "all F32" from
        // the many small F32 tensors): Q4_K_M or Q8_0 by the expert type.
        (
            "general.file_type".into(),
            Value::U32(match c.expert_type {
                ExpertType::Q4K | ExpertType::Q4KM => 15,
                ExpertType::Q8_0 => 7,
                ExpertType::Mxfp4 => 38,
                ExpertType::Q2K => 10,
            }),
        ),
        (a("block_count"), Value::U32(c.block_count())),
        (a("context_length"), Value::U32(c.ctx)),
        (a("embedding_length"), Value::U32(c.n_embd)),
        // qwen3moe ignores it when expert_feed_forward_length is set (real files carry
        // it); hy_v3 sizes its dense layers with it.
        (a("feed_forward_length"), Value::U32(c.dense_ffn())),
        (a("expert_feed_forward_length"), Value::U32(c.expert_ffn)),
        (a("attention.head_count"), Value::U32(c.n_head)),
        (a("attention.head_count_kv"), Value::U32(c.n_head_kv)),
        (a("attention.key_length"), Value::U32(c.head_dim())),
        (a("attention.value_length"), Value::U32(c.head_dim())),
        (a("attention.layer_norm_rms_epsilon"), Value::F32(1e-6)),
        (a("rope.freq_base"), Value::F32(1_000_000.0)),
        (a("expert_count"), Value::U32(c.n_expert)),
        (a("expert_used_count"), Value::U32(c.n_expert_used)),
        ("tokenizer.ggml.model".into(), Value::String("llama".into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(
                pieces
                    .iter()
                    .map(|p| Value::String(p.text.clone()))
                    .collect(),
            ),
        ),
        (
            "tokenizer.ggml.scores".into(),
            Value::Array(pieces.iter().map(|p| Value::F32(p.score)).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(pieces.iter().map(|p| Value::I32(p.token_type)).collect()),
        ),
        (
            "tokenizer.ggml.bos_token_id".into(),
            Value::U32(vocab::BOS_ID),
        ),
        (
            "tokenizer.ggml.eos_token_id".into(),
            Value::U32(vocab::EOS_ID),
        ),
        (
            "tokenizer.ggml.unknown_token_id".into(),
            Value::U32(vocab::UNK_ID),
        ),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(true)),
        ("tokenizer.ggml.add_eos_token".into(), Value::Bool(false)),
        (
            "expertd.synth.preset".into(),
            Value::String(c.preset.clone()),
        ),
        ("expertd.synth.seed".into(), Value::U64(c.seed)),
        (
            "expertd.synth.router_skew".into(),
            Value::F32(c.router_skew),
        ),
        (
            "expertd.synth.router_scale".into(),
            Value::F32(c.router_scale),
        ),
        (
            "expertd.synth.token_weight".into(),
            Value::F32(c.token_weight),
        ),
        (
            "expertd.synth.context_weight".into(),
            Value::F32(c.context_weight),
        ),
    ];
    // Only when on, so that models without them keep their bytes.
    if c.attn_recency > 0.0 {
        md.push((
            "expertd.synth.attn_recency".into(),
            Value::F32(c.attn_recency),
        ));
    }
    if c.context_decay > 0.0 {
        md.push((
            "expertd.synth.context_decay".into(),
            Value::F32(c.context_decay),
        ));
    }
    if c.arch == SynthArch::GptOss {
        // every other layer attends to a sliding window (llama.cpp's default pattern for
        // gpt-oss), with its real window
        md.push((a("attention.sliding_window"), Value::U32(GPT_OSS_WINDOW)));
    }
    if c.arch == SynthArch::Glm4Moe {
        md.extend([
            (a("nextn_predict_layers"), Value::U32(c.nextn_layers())),
            (
                a("leading_dense_block_count"),
                Value::U32(GLM4MOE_DENSE_LEAD),
            ),
            (a("expert_shared_count"), Value::U32(1)),
            // llama_expert_gating_func_type: 2 = sigmoid
            (a("expert_gating_func"), Value::U32(2)),
            (a("expert_weights_norm"), Value::Bool(true)),
            (a("expert_weights_scale"), Value::F32(1.0)),
            // GLM ropes half of each head
            (a("rope.dimension_count"), Value::U32(c.head_dim() / 2)),
        ]);
    }
    if c.arch == SynthArch::HyV3 {
        // the shared expert is as wide as a routed one
        md.push((
            a("expert_shared_feed_forward_length"),
            Value::U32(c.expert_ffn),
        ));
    }
    md
}

/// The header layout (metadata, tensors, offsets) of the model `config` describes,
/// without generating any data.
pub fn layout(
    config: &SynthConfig,
) -> Result<(Vec<(String, Value)>, gguf::GgufLayout), SynthError> {
    config.validate()?;
    let md = metadata(config);
    let specs: Vec<TensorSpec> = plan_tensors(config).into_iter().map(|p| p.spec).collect();
    let lay = gguf::layout(&md, &specs)?;
    Ok((md, lay))
}

/// One unit of generation: rows `rows` of tensor `tensor`.
#[derive(Clone, Debug)]
struct Chunk {
    tensor: usize,
    row_start: u64,
    n_rows: u64,
}

fn chunks(tensors: &[TensorInfo]) -> Vec<Chunk> {
    let mut out = Vec::new();
    for (i, t) in tensors.iter().enumerate() {
        let rows: u64 = t.dims.iter().skip(1).product();
        let row_bytes = t.size / rows.max(1);
        let per_chunk = (CHUNK_BYTES / row_bytes.max(1)).max(1);
        let mut r = 0;
        while r < rows {
            let n = per_chunk.min(rows - r);
            out.push(Chunk {
                tensor: i,
                row_start: r,
                n_rows: n,
            });
            r += n;
        }
    }
    out
}

/// Generates the bytes of one chunk. Every row is seeded from (seed, tensor name, row).
fn generate(seed: u64, info: &TensorInfo, fill: Fill, chunk: &Chunk) -> Vec<u8> {
    let rows: u64 = info.dims.iter().skip(1).product();
    let row_bytes = (info.size / rows.max(1)) as usize;
    let n = info.dims.first().copied().unwrap_or(1) as usize;
    let tensor_id = rng::fnv1a(&info.name);
    let mut out = Vec::with_capacity(row_bytes * chunk.n_rows as usize);
    for row in chunk.row_start..chunk.row_start + chunk.n_rows {
        let mut r = Rng::new(rng::row_seed(seed, tensor_id, row));
        match fill {
            Fill::Ones => {
                for _ in 0..n {
                    out.extend_from_slice(&1.0f32.to_le_bytes());
                }
            }
            Fill::Const(v) => {
                for _ in 0..n {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }

            Fill::Router { std, skew } => {
                let scale = std * (skew * r.normal()).exp();
                for _ in 0..n {
                    out.extend_from_slice(&((scale * r.normal()) as f32).to_le_bytes());
                }
            }
            Fill::Quant {
                std,
                damped_rows,
                damping,
            } => {
                let std = if row < damped_rows {
                    std * damping
                } else {
                    std
                };
                match info.ggml_type {
                    GgmlType::Q4_K => quant::q4_k_row(&mut r, n, std, &mut out),
                    GgmlType::Q6_K => quant::q6_k_row(&mut r, n, std, &mut out),
                    GgmlType::MXFP4 => quant::mxfp4_row(&mut r, n, std, &mut out),
                    GgmlType::Q2_K => quant::q2_k_row(&mut r, n, std, &mut out),
                    _ => quant::q8_0_row(&mut r, n, std, &mut out),
                }
            }
        }
    }
    debug_assert_eq!(out.len(), row_bytes * chunk.n_rows as usize);
    out
}

/// Removes the temp file unless the write completed.
struct TempGuard {
    path: PathBuf,
    armed: bool,
}

impl Drop for TempGuard {
    fn drop(&mut self) {
        if self.armed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Removes temp files (`PREFIX<pid>-...`) that runs no longer alive left in `dir` (killed
/// before their clean-up ran): each may be gigabytes.
fn remove_stale_temps(dir: &Path, prefix: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(prefix)) else {
            continue;
        };
        let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
        let alive = pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
        if pid.is_some() && !alive {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Writes the model `config` describes to `path` atomically, generating chunks on
/// `threads` worker threads (at least 1), and returns what it wrote.
pub fn write_model(
    config: &SynthConfig,
    path: &Path,
    threads: usize,
) -> Result<Manifest, SynthError> {
    config.validate()?;
    let md = metadata(config);
    let planned = plan_tensors(config);
    let specs: Vec<TensorSpec> = planned.iter().map(|p| p.spec.clone()).collect();
    let fills: Vec<Fill> = planned.iter().map(|p| p.fill).collect();
    let lay = gguf::layout(&md, &specs)?;

    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| SynthError::Io { path: p, source }
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| SynthError::Config(format!("{}: not a file path", path.display())))?;
    // The whole file is written before it is renamed into place: refuse at once when it
    // cannot fit (a typo in a size would otherwise fill the disk first).
    if let Ok(st) = rustix::fs::statvfs(&dir) {
        let free = st.f_bavail.saturating_mul(st.f_frsize);
        if lay.file_size > free {
            return Err(SynthError::Config(format!(
                "the model needs {:.1} GiB and {} has {:.1} GiB free",
                lay.file_size as f64 / (1u64 << 30) as f64,
                dir.display(),
                free as f64 / (1u64 << 30) as f64
            )));
        }
    }
    let tmp_prefix = format!(".{}.tmp-", file_name.to_string_lossy());
    remove_stale_temps(&dir, &tmp_prefix);
    // pid and time: a temp name is never one an earlier run left (e.g. as PID 1 in a
    // container, killed before it could remove it)
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let tmp = dir.join(format!("{tmp_prefix}{}-{nanos}", std::process::id()));
    let mut guard = TempGuard {
        path: tmp.clone(),
        armed: true,
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(io(&tmp))?;

    file.write_all(&lay.header).map_err(io(&tmp))?;
    write_data(config.seed, &lay, &fills, &mut file, threads.max(1), &tmp)?;
    file.sync_all().map_err(io(&tmp))?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(io(path))?;
    guard.armed = false;
    // Make the rename itself durable.
    File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(io(&dir))?;

    Ok(Manifest {
        path: path.to_path_buf(),
        config: config.clone(),
        metadata: md,
        tensors: lay.tensors,
        alignment: lay.alignment,
        data_offset: lay.data_offset,
        file_size: lay.file_size,
    })
}

/// Generates all chunks on worker threads (chunk i on worker i % n) and writes them in
/// order, with zero padding after each tensor. Each worker has its own bounded channel,
/// so memory stays at a few chunks per worker.
fn write_data(
    seed: u64,
    lay: &gguf::GgufLayout,
    fills: &[Fill],
    out: &mut File,
    threads: usize,
    tmp: &Path,
) -> Result<(), SynthError> {
    let all = chunks(&lay.tensors);
    let tensors = &lay.tensors;
    let io = |source| SynthError::Io {
        path: tmp.to_path_buf(),
        source,
    };
    std::thread::scope(|s| {
        let mut receivers = Vec::with_capacity(threads);
        for w in 0..threads {
            let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(2);
            receivers.push(rx);
            let all = &all;
            s.spawn(move || {
                for c in all.iter().skip(w).step_by(threads) {
                    let (Some(info), Some(fill)) = (tensors.get(c.tensor), fills.get(c.tensor))
                    else {
                        return;
                    };
                    if tx.send(generate(seed, info, *fill, c)).is_err() {
                        return; // the writer stopped on an error
                    }
                }
            });
        }
        let mut written = lay.data_offset;
        for (i, c) in all.iter().enumerate() {
            let rx = &receivers[i % threads];
            let buf = rx
                .recv()
                .map_err(|_| SynthError::Worker(format!("no data for chunk {i}")))?;
            out.write_all(&buf).map_err(io)?;
            written += buf.len() as u64;
            let last_of_tensor = all.get(i + 1).is_none_or(|n| n.tensor != c.tensor);
            if last_of_tensor {
                let end = match tensors.get(c.tensor + 1) {
                    Some(next) => lay.data_offset + next.offset,
                    None => lay.file_size,
                };
                let pad = end.checked_sub(written).ok_or_else(|| {
                    SynthError::Worker(format!("tensor {} overran its slot", c.tensor))
                })?;
                out.write_all(&vec![0u8; pad as usize]).map_err(io)?;
                written = end;
            }
        }
        drop(receivers);
        if written != lay.file_size {
            return Err(SynthError::Worker(format!(
                "wrote {written} bytes, layout says {}",
                lay.file_size
            )));
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor_bytes(m: &Manifest, bytes: &[u8], name: &str) -> Vec<u8> {
        let t = m.tensors.iter().find(|t| t.name == name).expect(name);
        let s = (m.data_offset + t.offset) as usize;
        bytes[s..s + t.size as usize].to_vec()
    }

    fn f32s(b: &[u8]) -> Vec<f32> {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    fn std_of(x: &[f32]) -> f64 {
        let n = x.len() as f64;
        let mean = x.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        (x.iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / n)
            .sqrt()
    }

    #[test]
    fn default_locality_is_the_preset() {
        for p in [Preset::Tiny, Preset::Mid, Preset::Bench] {
            let c = SynthConfig::preset(p);
            assert_eq!(c.clone().with_locality(Locality::Default), c);
            // Neither new tensors nor new keys: the presets keep their bytes.
            let (md, lay) = layout(&c).unwrap();
            assert!(!lay.tensors.iter().any(|t| t.name.ends_with(".bias")));
            assert!(
                !md.iter()
                    .any(|(k, _)| k.contains("recency") || k.contains("decay"))
            );
        }
        let r = SynthConfig::preset(Preset::Bench).with_locality(Locality::Realistic);
        assert_eq!(r.preset, "bench-realistic");
        let h = SynthConfig::preset(Preset::Bench).with_locality(Locality::Hard);
        assert_eq!(h.preset, "bench-hard");
        assert!(h.context_weight < r.context_weight && h.attn_recency == 0.0);
    }

    #[test]
    fn recency_and_context_decay_are_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.gguf");
        let mut c = SynthConfig::preset(Preset::Tiny);
        c.attn_recency = 3.0;
        c.context_decay = 1.0;
        c.context_weight = 2.0;
        let m = write_model(&c, &path, 2).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let n_q = (c.n_head * c.head_dim()) as usize;
        let n_kv = (c.n_head_kv * c.head_dim()) as usize;
        for l in 0..c.layers {
            let q = f32s(&tensor_bytes(&m, &bytes, &format!("blk.{l}.attn_q.bias")));
            let k = f32s(&tensor_bytes(&m, &bytes, &format!("blk.{l}.attn_k.bias")));
            assert_eq!((q.len(), k.len()), (n_q, n_kv));
            assert!(q.iter().chain(&k).all(|&v| v == RECENCY_BIAS));
            for norm in ["attn_q_norm", "attn_k_norm"] {
                let w = f32s(&tensor_bytes(&m, &bytes, &format!("blk.{l}.{norm}.weight")));
                assert!(w.iter().all(|&v| v == 3f32.sqrt()), "{norm} of layer {l}");
            }
            // attn_output: std context_weight / (l + 1) / sqrt(n_q).
            let o = quant::dequant_q8_0(&tensor_bytes(
                &m,
                &bytes,
                &format!("blk.{l}.attn_output.weight"),
            ));
            let want = 2.0 / f64::from(l + 1) / (n_q as f64).sqrt();
            let got = std_of(&o);
            assert!(
                (got / want - 1.0).abs() < 0.03,
                "layer {l}: std {got}, want {want}"
            );
        }
        let key = |k: &str| {
            m.metadata
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(key("expertd.synth.attn_recency"), Some(Value::F32(3.0)));
        assert_eq!(key("expertd.synth.context_decay"), Some(Value::F32(1.0)));
        // And the loader-facing header reads back.
        let f = gguf::GgufFile::open(&path).unwrap();
        assert_eq!(f.tensors, m.tensors);
    }

    #[test]
    fn bad_locality_knobs_are_refused() {
        for (tweak, flag) in [
            (
                (|c: &mut SynthConfig| c.attn_recency = -1.0) as fn(&mut SynthConfig),
                "--attn-recency",
            ),
            (
                |c: &mut SynthConfig| c.context_decay = f32::NAN,
                "--context-decay",
            ),
        ] {
            let mut c = SynthConfig::preset(Preset::Tiny);
            tweak(&mut c);
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(flag), "{e}");
        }
    }
}
