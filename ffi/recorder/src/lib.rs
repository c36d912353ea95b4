//! `expertd trace record`: expert routing traces from a real llama.cpp run of any GGUF,
//! with the stock (unpatched) engine.
//!
//! The recorder drives libllama through bindgen bindings of `llama.h` and watches the
//! router through the public eval callback (`cb_eval` in `llama_context_params`): the
//! scheduler asks the callback about every graph node, the callback asks for the nodes
//! named `ffn_moe_topk-<layer>` (the router's selected experts, I32
//! `[n_expert_used, n_tokens]`, a strided view of the argsort, so columns are `nb[1]`
//! apart), the scheduler computes the graph up to that node, synchronizes, and hands it
//! over; the callback copies it out with `ggml_backend_tensor_get`. That costs one
//! synchronization per MoE layer and ubatch: fine for recording, too slow for serving.
//!
//! What a recording holds: every processed token in order, prompt tokens first (processed
//! in batches, as llama.cpp does prefill) and then the generated tokens (one per decode).
//! Every token asks for its logits, because llama.cpp otherwise runs the last layer only
//! for the tokens whose output is wanted. The trace format has no per-token flags, so the
//! prompt/generated split is kept beside the trace (see [`Recording`]), and callers can
//! drop the prompt part ([`Recording::generated_only`]).
//!
//! Invariant: the trace has one layer per MoE layer that computed `ffn_moe_topk` (model
//! order, dense layers left out), and every layer saw exactly the tokens that were
//! decoded; anything else is an error, never a silently short trace.

mod sys;

use std::collections::BTreeMap;
use std::ffi::{CStr, CString, c_char, c_void};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Mutex, Once};
use std::time::Instant;

use expert_pool::trace::{Trace, TraceError};

/// Name prefix of the router's selected-experts tensor in llama.cpp's graphs.
pub const TOPK_PREFIX: &str = "ffn_moe_topk-";

/// The cmake build directory whose libraries this crate was linked with.
pub const ENGINE_BUILD_DIR: &str = env!("EXPERTD_RECORDER_ENGINE_DIR");

/// What to feed the model before generating.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// Text, tokenized by the model's own tokenizer (with BOS when the model adds one).
    Text(String),
    /// Token ids as they are.
    Tokens(Vec<i32>),
    /// This many random token ids (control and end-of-generation tokens left out),
    /// after BOS when the model adds one: what `llama-bench` feeds.
    Random(u32),
}

/// How to run a recording.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordOptions {
    /// The GGUF model.
    pub model: PathBuf,
    /// The prompt.
    pub prompt: Prompt,
    /// Tokens to generate (and decode) after the prompt.
    pub generate: u32,
    /// Context size; default: prompt + generated tokens, rounded up to a multiple of 256.
    pub ctx: Option<u32>,
    /// CPU threads; default: all available.
    pub threads: Option<u32>,
    /// Prompt tokens per `llama_decode` (and per ubatch).
    pub batch: u32,
    /// Seed of the sampler (when `temp > 0`) and of random prompts.
    pub seed: u32,
    /// Sampling temperature; 0 means greedy.
    pub temp: f32,
    /// Keep generating after an end-of-generation token.
    pub ignore_eos: bool,
    /// Pass llama.cpp's log through (otherwise only its errors).
    pub verbose: bool,
}

impl RecordOptions {
    /// Greedy generation of `generate` tokens after `prompt`, default everything else.
    pub fn new(model: &Path, prompt: Prompt, generate: u32) -> RecordOptions {
        RecordOptions {
            model: model.to_path_buf(),
            prompt,
            generate,
            ctx: None,
            threads: None,
            batch: 256,
            seed: 0,
            temp: 0.0,
            ignore_eos: false,
            verbose: false,
        }
    }
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stop {
    /// The requested number of tokens was generated.
    Length,
    /// The model produced an end-of-generation token (not decoded, not in the trace).
    EndOfGeneration,
}

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Stop::Length => "length",
            Stop::EndOfGeneration => "end of generation",
        })
    }
}

/// A finished recording: the trace and what it was recorded from.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Recording {
    /// Every processed token: `prompt_tokens` prompt tokens, then the generated ones.
    #[serde(skip)]
    pub trace: Trace,
    /// The model file.
    pub model: PathBuf,
    /// `general.architecture`.
    pub arch: String,
    /// Model layer index of each trace layer (the MoE layers, in order).
    pub moe_layers: Vec<u32>,
    /// Experts per layer.
    pub experts: u32,
    /// Experts selected per token.
    pub used: u32,
    /// Leading tokens of the trace that are prompt (prefill) tokens.
    pub prompt_tokens: usize,
    /// Trailing tokens of the trace that were generated (decoded one at a time).
    pub generated_tokens: usize,
    /// Token ids, in trace order.
    pub tokens: Vec<i32>,
    /// The generated text.
    pub generated_text: String,
    /// Why generation stopped.
    pub stop: Stop,
    /// Sampler seed (and random-prompt seed).
    pub seed: u32,
    /// Sampling temperature (0: greedy).
    pub temp: f32,
    /// Seconds spent on the prompt (prefill).
    pub prefill_seconds: f64,
    /// Seconds spent generating.
    pub generate_seconds: f64,
}

impl Recording {
    /// The trace of the generated tokens only (the prompt part dropped).
    pub fn generated_only(&self) -> Result<Trace, TraceError> {
        let mut t = Trace::new(self.trace.layers, self.trace.experts, self.trace.used)?;
        let per_token = self.trace.layers as usize * self.trace.used as usize;
        t.ids = self.trace.ids[self.prompt_tokens * per_token..].to_vec();
        Ok(t)
    }
}

/// Why a recording failed.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The options make no sense.
    #[error("{0}")]
    Options(String),
    /// The model file is not there.
    #[error("{0}: no such file")]
    NoModel(PathBuf),
    /// llama.cpp refused the model.
    #[error("llama.cpp could not load {0} (run with --verbose to see its log)")]
    Load(PathBuf),
    /// The model has no experts.
    #[error("{path} is not a Mixture-of-Experts model ({reason})")]
    NotMoe {
        /// The model file.
        path: PathBuf,
        /// What showed it.
        reason: String,
    },
    /// llama.cpp could not make a context.
    #[error("llama.cpp could not create a context with n_ctx {0} (run with --verbose)")]
    Context(u32),
    /// The prompt could not be tokenized.
    #[error("tokenizing the prompt: {0}")]
    Tokenize(String),
    /// `llama_decode` failed.
    #[error("llama_decode returned {status} at token {at}")]
    Decode {
        /// Its return value.
        status: i32,
        /// Index of the first token of the failed batch.
        at: usize,
    },
    /// The routing tensors were not what the recorder expects.
    #[error("capturing the routing: {0}")]
    Capture(String),
    /// The trace could not be built.
    #[error(transparent)]
    Trace(#[from] TraceError),
}

/// One recording at a time per process: llama.cpp's log callback is global, and the
/// tests record from several threads.
static LOCK: Mutex<()> = Mutex::new(());
static BACKEND: Once = Once::new();
static VERBOSE: AtomicBool = AtomicBool::new(false);
static LAST_LEVEL: AtomicU32 = AtomicU32::new(0);

/// Parses `ffn_moe_topk-<layer>` into the layer index.
pub fn topk_layer(name: &[u8]) -> Option<u32> {
    let rest = name.strip_prefix(TOPK_PREFIX.as_bytes())?;
    std::str::from_utf8(rest).ok()?.parse().ok()
}

/// The routing seen so far: per model layer, the selected expert ids of every token,
/// token-major. Filled by the eval callback; checked after every decode.
#[derive(Debug, Default)]
struct Capture {
    experts: u32,
    used: Option<usize>,
    layers: BTreeMap<u32, Vec<u16>>,
    error: Option<String>,
    buf: Vec<u8>,
}

impl Capture {
    /// Takes one `ffn_moe_topk` tensor of layer `il`: `ne = [used, n_tokens]`, byte
    /// strides `nb`, and its bytes from its first element (`ggml_nbytes` of them).
    fn take(&mut self, il: u32, ne: [i64; 2], nb: [usize; 2], data: &[u8]) -> Result<(), String> {
        let (k, n) = (usize::try_from(ne[0]), usize::try_from(ne[1]));
        let (Ok(k), Ok(n)) = (k, n) else {
            return Err(format!("layer {il}: bad shape {ne:?}"));
        };
        if k == 0 || k > usize::from(u16::MAX) {
            return Err(format!("layer {il}: {k} experts used per token"));
        }
        match self.used {
            None => self.used = Some(k),
            Some(u) if u != k => {
                return Err(format!(
                    "layer {il} selects {k} experts per token, earlier layers {u}"
                ));
            }
            Some(_) => {}
        }
        let out = self.layers.entry(il).or_default();
        for col in 0..n {
            for row in 0..k {
                let off = row * nb[0] + col * nb[1];
                let Some(b) = data.get(off..off + 4) else {
                    return Err(format!(
                        "layer {il}: element ({row}, {col}) at byte {off} is past the {} bytes read",
                        data.len()
                    ));
                };
                let id = i32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                if id < 0 || id as u64 >= u64::from(self.experts) {
                    return Err(format!(
                        "layer {il}: token {col} selected expert {id}, the model has {}",
                        self.experts
                    ));
                }
                out.push(id as u16);
            }
        }
        Ok(())
    }

    /// After `tokens` tokens were decoded every MoE layer must have seen all of them.
    fn check(&mut self, tokens: usize) -> Result<(), RecordError> {
        if let Some(e) = self.error.take() {
            return Err(RecordError::Capture(e));
        }
        let Some(k) = self.used else {
            return Err(RecordError::Capture(format!(
                "no {TOPK_PREFIX}<layer> tensor was computed for {tokens} tokens"
            )));
        };
        for (il, ids) in &self.layers {
            if ids.len() != tokens * k {
                return Err(RecordError::Capture(format!(
                    "layer {il} saw {} tokens, {tokens} were decoded",
                    ids.len() / k
                )));
            }
        }
        Ok(())
    }
}

/// The eval callback: asks for `ffn_moe_topk-*` nodes and copies them into the
/// [`Capture`] that `user_data` points to. Never unwinds into C.
unsafe extern "C" fn eval_callback(
    t: *mut sys::ggml_tensor,
    ask: bool,
    user_data: *mut c_void,
) -> bool {
    let res = std::panic::catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: the scheduler passes a live graph node, valid for this call.
        let t = unsafe { &*t };
        // SAFETY: ggml keeps `name` NUL-terminated (ggml_set_name/format_name truncate
        // to GGML_MAX_NAME - 1 and terminate).
        let name = unsafe { CStr::from_ptr(t.name.as_ptr()) };
        let Some(il) = topk_layer(name.to_bytes()) else {
            // Not ours: do not ask for it; after compute, keep going.
            return !ask;
        };
        if ask {
            return true;
        }
        // SAFETY: `user_data` is the `Capture` that `record` allocated for this context;
        // it outlives the context, and nothing else touches it while llama_decode runs
        // (the callback runs on the decoding thread).
        let cap = unsafe { &mut *user_data.cast::<Capture>() };
        if t.type_ != sys::GGML_TYPE_I32 {
            cap.error.get_or_insert(format!(
                "{} has ggml type {}, expected I32",
                name.to_string_lossy(),
                t.type_
            ));
            return true;
        }
        // SAFETY: `t` is a valid tensor (see above).
        let n = unsafe { sys::ggml_nbytes(t) };
        let mut buf = std::mem::take(&mut cap.buf);
        buf.resize(n, 0);
        // SAFETY: the node has been computed and its backend synchronized before the
        // callback runs with ask = false; `buf` has room for the tensor's `ggml_nbytes`
        // bytes (first to last element, strides included), the whole range the call
        // may read.
        unsafe { sys::ggml_backend_tensor_get(t, buf.as_mut_ptr().cast(), 0, n) };
        let r = cap.take(il, [t.ne[0], t.ne[1]], [t.nb[0], t.nb[1]], &buf);
        cap.buf = buf;
        if t.ne[2] != 1 || t.ne[3] != 1 {
            cap.error.get_or_insert(format!(
                "{} has shape {:?}, expected 2-D",
                name.to_string_lossy(),
                t.ne
            ));
        }
        if let Err(e) = r {
            cap.error.get_or_insert(e);
        }
        true
    }));
    match res {
        Ok(v) => v,
        Err(_) => {
            if !ask {
                // SAFETY: as above (the same live `Capture`, on the decoding thread); the
                // unwinding closure's borrow of it has ended.
                let cap = unsafe { &mut *user_data.cast::<Capture>() };
                cap.error
                    .get_or_insert_with(|| "the eval callback panicked".to_string());
            }
            // Asking: do not ask. After compute: continue the graph.
            !ask
        }
    }
}

/// llama.cpp's log: errors always, everything with `verbose`.
unsafe extern "C" fn log_callback(
    level: sys::ggml_log_level,
    text: *const c_char,
    _ud: *mut c_void,
) {
    let level = if level == sys::GGML_LOG_LEVEL_CONT {
        LAST_LEVEL.load(Ordering::Relaxed)
    } else {
        LAST_LEVEL.store(level, Ordering::Relaxed);
        level
    };
    if (VERBOSE.load(Ordering::Relaxed) || level >= sys::GGML_LOG_LEVEL_ERROR) && !text.is_null() {
        // SAFETY: llama.cpp passes a NUL-terminated message valid for this call.
        let s = unsafe { CStr::from_ptr(text) };
        eprint!("{}", s.to_string_lossy());
    }
}

/// A loaded model, freed on drop.
struct Model(*mut sys::llama_model);

impl Model {
    fn load(path: &Path) -> Result<Model, RecordError> {
        let c = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| {
            RecordError::Options(format!("{}: path has a NUL byte", path.display()))
        })?;
        // SAFETY: plain struct returned by value.
        let mut params = unsafe { sys::llama_model_default_params() };
        params.n_gpu_layers = 0;
        // SAFETY: `c` is a NUL-terminated path that outlives the call.
        let m = unsafe { sys::llama_model_load_from_file(c.as_ptr(), params) };
        if m.is_null() {
            return Err(RecordError::Load(path.to_path_buf()));
        }
        Ok(Model(m))
    }

    fn vocab(&self) -> *const sys::llama_vocab {
        // SAFETY: `self.0` is a live model; the vocab lives as long as the model.
        unsafe { sys::llama_model_get_vocab(self.0) }
    }

    /// A metadata value as a string.
    fn meta(&self, key: &str) -> Option<String> {
        let k = CString::new(key).ok()?;
        let mut buf = vec![0u8; 256];
        loop {
            // SAFETY: live model, NUL-terminated key, `buf` writable for its length.
            let n = unsafe {
                sys::llama_model_meta_val_str(
                    self.0,
                    k.as_ptr(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                )
            };
            let n = usize::try_from(n).ok()?;
            if n < buf.len() {
                buf.truncate(n);
                return String::from_utf8(buf).ok();
            }
            buf.resize(n + 1, 0);
        }
    }
}

impl Drop for Model {
    fn drop(&mut self) {
        // SAFETY: loaded by llama_model_load_from_file, freed once, after every context.
        unsafe { sys::llama_model_free(self.0) }
    }
}

/// A context, freed on drop (before its model and its capture).
struct Context(*mut sys::llama_context);

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: made by llama_init_from_model, freed once.
        unsafe { sys::llama_free(self.0) }
    }
}

/// A sampler chain, freed on drop.
struct Sampler(*mut sys::llama_sampler);

impl Sampler {
    fn new(temp: f32, seed: u32) -> Sampler {
        // SAFETY: the chain takes ownership of the samplers added to it; all are freshly
        // made and added once.
        unsafe {
            let chain = sys::llama_sampler_chain_init(sys::llama_sampler_chain_default_params());
            if temp > 0.0 {
                sys::llama_sampler_chain_add(chain, sys::llama_sampler_init_temp(temp));
                sys::llama_sampler_chain_add(chain, sys::llama_sampler_init_dist(seed));
            } else {
                sys::llama_sampler_chain_add(chain, sys::llama_sampler_init_greedy());
            }
            Sampler(chain)
        }
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        // SAFETY: made by llama_sampler_chain_init, freed once.
        unsafe { sys::llama_sampler_free(self.0) }
    }
}

/// A token batch of fixed capacity, freed on drop.
struct Batch {
    raw: sys::llama_batch,
    cap: usize,
}

impl Batch {
    fn new(cap: usize) -> Batch {
        let n = i32::try_from(cap).expect("batch size fits i32");
        // SAFETY: allocates arrays of `cap` entries (tokens, positions, one seq id each).
        let raw = unsafe { sys::llama_batch_init(n, 0, 1) };
        Batch { raw, cap }
    }

    /// Fills the batch with `tokens` at positions `pos..`, sequence 0, all logits on.
    fn fill(&mut self, tokens: &[i32], pos: usize) {
        assert!(tokens.len() <= self.cap, "batch overflow");
        for (i, &tok) in tokens.iter().enumerate() {
            // SAFETY: `i < cap`: every array llama_batch_init allocated has `cap` entries,
            // and `seq_id[i]` points to room for one id (n_seq_max = 1).
            unsafe {
                *self.raw.token.add(i) = tok;
                *self.raw.pos.add(i) = (pos + i) as i32;
                *self.raw.n_seq_id.add(i) = 1;
                *(*self.raw.seq_id.add(i)) = 0;
                *self.raw.logits.add(i) = 1;
            }
        }
        self.raw.n_tokens = tokens.len() as i32;
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        // SAFETY: made by llama_batch_init, freed once.
        unsafe { sys::llama_batch_free(self.raw) }
    }
}

/// The capture, allocated before the context and freed after it.
struct CaptureBox(*mut Capture);

impl CaptureBox {
    fn new(experts: u32) -> CaptureBox {
        CaptureBox(Box::into_raw(Box::new(Capture {
            experts,
            ..Capture::default()
        })))
    }

    /// The capture, between decodes (when the callback cannot run).
    fn get(&mut self) -> &mut Capture {
        // SAFETY: allocated in `new`, freed only in `drop`; the callback only runs inside
        // llama_decode, and `&mut self` is not held across a decode.
        unsafe { &mut *self.0 }
    }
}

impl Drop for CaptureBox {
    fn drop(&mut self) {
        // SAFETY: from Box::into_raw in `new`; the context that used it is already freed
        // (it is declared after the capture in `record`, so it drops first).
        drop(unsafe { Box::from_raw(self.0) });
    }
}

fn tokenize(vocab: *const sys::llama_vocab, text: &str) -> Result<Vec<i32>, RecordError> {
    let len = i32::try_from(text.len())
        .map_err(|_| RecordError::Tokenize("the prompt is over 2 GiB".into()))?;
    let mut toks = vec![0i32; text.len() + 2];
    for _ in 0..2 {
        // SAFETY: `text` is readable for `len` bytes; `toks` writable for its length.
        let n = unsafe {
            sys::llama_tokenize(
                vocab,
                text.as_ptr().cast(),
                len,
                toks.as_mut_ptr(),
                toks.len() as i32,
                true,
                false,
            )
        };
        if n >= 0 {
            toks.truncate(n as usize);
            return Ok(toks);
        }
        if n == i32::MIN {
            break;
        }
        toks.resize(n.unsigned_abs() as usize, 0);
    }
    Err(RecordError::Tokenize("llama_tokenize failed".into()))
}

fn piece(vocab: *const sys::llama_vocab, tok: i32) -> String {
    let mut buf = vec![0u8; 64];
    for _ in 0..2 {
        // SAFETY: `buf` is writable for its length.
        let n = unsafe {
            sys::llama_token_to_piece(
                vocab,
                tok,
                buf.as_mut_ptr().cast(),
                buf.len() as i32,
                0,
                false,
            )
        };
        if n >= 0 {
            buf.truncate(n as usize);
            return String::from_utf8_lossy(&buf).into_owned();
        }
        buf.resize(n.unsigned_abs() as usize, 0);
    }
    String::new()
}

fn random_tokens(vocab: *const sys::llama_vocab, n: u32, seed: u32) -> Vec<i32> {
    // SAFETY: live vocab.
    let n_vocab = unsafe { sys::llama_vocab_n_tokens(vocab) };
    let mut rng = expert_pool::trace::Rng::new(u64::from(seed) ^ 0x7261_6e64_746f_6b73);
    let mut out = Vec::with_capacity(n as usize);
    let mut tries = 0u64;
    while out.len() < n as usize && tries < 1000 * u64::from(n) + 1000 {
        tries += 1;
        let t = rng.below(n_vocab.max(1) as usize) as i32;
        // SAFETY: live vocab, `t` in range.
        let skip =
            unsafe { sys::llama_vocab_is_control(vocab, t) || sys::llama_vocab_is_eog(vocab, t) };
        if !skip {
            out.push(t);
        }
    }
    out
}

/// Runs the model on the prompt, generates, and returns the routing of every token.
pub fn record(opts: &RecordOptions) -> Result<Recording, RecordError> {
    let _one_at_a_time = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if opts.batch == 0 {
        return Err(RecordError::Options("--batch must be at least 1".into()));
    }
    if !(opts.temp >= 0.0 && opts.temp.is_finite()) {
        return Err(RecordError::Options(format!(
            "--temp {} must be >= 0",
            opts.temp
        )));
    }
    if !opts.model.is_file() {
        return Err(RecordError::NoModel(opts.model.clone()));
    }
    VERBOSE.store(opts.verbose, Ordering::Relaxed);
    // SAFETY: a plain function pointer with the ggml_log_callback signature, valid forever.
    unsafe { sys::llama_log_set(Some(log_callback), std::ptr::null_mut()) };
    // SAFETY: global initialization, once per process.
    BACKEND.call_once(|| unsafe { sys::llama_backend_init() });

    let model = Model::load(&opts.model)?;
    let vocab = model.vocab();
    let arch = model.meta("general.architecture").unwrap_or_default();
    let experts: u32 = model
        .meta(&format!("{arch}.expert_count"))
        .and_then(|v| v.trim().parse().ok())
        .filter(|&e| e > 0)
        .ok_or_else(|| RecordError::NotMoe {
            path: opts.model.clone(),
            reason: format!("no {arch}.expert_count in its metadata"),
        })?;
    if experts > 65536 {
        return Err(RecordError::Capture(format!(
            "{experts} experts: the trace format holds at most 65536"
        )));
    }

    let mut prompt = match &opts.prompt {
        Prompt::Text(s) => tokenize(vocab, s)?,
        Prompt::Tokens(t) => t.clone(),
        Prompt::Random(n) => {
            let mut v = Vec::new();
            // SAFETY: live vocab.
            if unsafe { sys::llama_vocab_get_add_bos(vocab) } {
                // SAFETY: live vocab.
                v.push(unsafe { sys::llama_vocab_bos(vocab) });
            }
            v.extend(random_tokens(vocab, *n, opts.seed));
            v
        }
    };
    if prompt.is_empty() {
        // An empty text prompt: start from BOS when the model has one.
        // SAFETY: live vocab.
        let bos = unsafe { sys::llama_vocab_bos(vocab) };
        if bos < 0 {
            return Err(RecordError::Options(
                "the prompt is empty and the model has no BOS token to start from".into(),
            ));
        }
        prompt.push(bos);
    }
    // SAFETY: live vocab.
    let n_vocab = unsafe { sys::llama_vocab_n_tokens(vocab) };
    if let Some(bad) = prompt.iter().find(|&&t| t < 0 || t >= n_vocab) {
        return Err(RecordError::Options(format!(
            "prompt token {bad} is outside the vocabulary (0..{n_vocab})"
        )));
    }
    let total = prompt.len() + opts.generate as usize;
    let n_ctx = match opts.ctx {
        Some(c) => c,
        None => u32::try_from(total.div_ceil(256) * 256)
            .map_err(|_| RecordError::Options("prompt and generation are too long".into()))?,
    };
    if total > n_ctx as usize {
        return Err(RecordError::Options(format!(
            "{} prompt + {} generated tokens do not fit --ctx {n_ctx}",
            prompt.len(),
            opts.generate
        )));
    }
    let threads = opts.threads.map_or_else(
        || std::thread::available_parallelism().map_or(1, |n| n.get() as i32),
        |t| t.max(1) as i32,
    );

    // Declared before the context so that it is dropped after it.
    let mut capture = CaptureBox::new(experts);
    // SAFETY: plain struct returned by value.
    let mut cparams = unsafe { sys::llama_context_default_params() };
    cparams.n_ctx = n_ctx;
    // llama.cpp caps a batch at the context size.
    let n_batch = opts.batch.min(n_ctx);
    cparams.n_batch = n_batch;
    cparams.n_ubatch = n_batch;
    cparams.n_seq_max = 1;
    cparams.n_threads = threads;
    cparams.n_threads_batch = threads;
    cparams.no_perf = true;
    cparams.cb_eval = Some(eval_callback);
    cparams.cb_eval_user_data = capture.0.cast();
    // SAFETY: live model; the callback's user data outlives the context (see above).
    let raw_ctx = unsafe { sys::llama_init_from_model(model.0, cparams) };
    if raw_ctx.is_null() {
        return Err(RecordError::Context(n_ctx));
    }
    let ctx = Context(raw_ctx);
    let sampler = Sampler::new(opts.temp, opts.seed);
    let mut batch = Batch::new(n_batch as usize);

    let decode = |batch: &mut Batch, toks: &[i32], pos: usize| -> Result<(), RecordError> {
        batch.fill(toks, pos);
        // SAFETY: live context; the batch holds `toks.len()` filled entries.
        let status = unsafe { sys::llama_decode(ctx.0, batch.raw) };
        if status != 0 {
            return Err(RecordError::Decode { status, at: pos });
        }
        Ok(())
    };

    let start = Instant::now();
    let mut done = 0usize;
    for chunk in prompt.chunks(n_batch as usize) {
        decode(&mut batch, chunk, done)?;
        done += chunk.len();
        capture.get().check(done)?;
    }
    let prefill_seconds = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let mut tokens = prompt.clone();
    let mut generated_text = String::new();
    let mut stop = Stop::Length;
    for _ in 0..opts.generate {
        // SAFETY: live sampler and context; the last decode produced logits for its
        // last token (index -1).
        let next = unsafe { sys::llama_sampler_sample(sampler.0, ctx.0, -1) };
        // SAFETY: live vocab.
        if !opts.ignore_eos && unsafe { sys::llama_vocab_is_eog(vocab, next) } {
            stop = Stop::EndOfGeneration;
            break;
        }
        decode(&mut batch, &[next], done)?;
        done += 1;
        capture.get().check(done)?;
        tokens.push(next);
        generated_text.push_str(&piece(vocab, next));
    }
    let generate_seconds = start.elapsed().as_secs_f64();
    drop(batch);
    drop(sampler);
    drop(ctx);

    let cap = capture.get();
    let used = cap.used.unwrap_or(0);
    let moe_layers: Vec<u32> = cap.layers.keys().copied().collect();
    let mut trace = Trace::new(moe_layers.len() as u32, experts, used as u32)?;
    let mut per_layer: Vec<Vec<u16>> = vec![Vec::with_capacity(used); moe_layers.len()];
    for tok in 0..done {
        for (dst, ids) in per_layer.iter_mut().zip(cap.layers.values()) {
            dst.clear();
            dst.extend_from_slice(&ids[tok * used..(tok + 1) * used]);
        }
        trace.push_token(&per_layer)?;
    }
    Ok(Recording {
        trace,
        model: opts.model.clone(),
        arch,
        moe_layers,
        experts,
        used: used as u32,
        prompt_tokens: prompt.len(),
        generated_tokens: done - prompt.len(),
        tokens,
        generated_text,
        stop,
        seed: opts.seed,
        temp: opts.temp,
        prefill_seconds,
        generate_seconds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topk_names_parse() {
        assert_eq!(topk_layer(b"ffn_moe_topk-0"), Some(0));
        assert_eq!(topk_layer(b"ffn_moe_topk-23"), Some(23));
        assert_eq!(topk_layer(b"ffn_moe_topk-"), None);
        assert_eq!(topk_layer(b"ffn_moe_topk-x"), None);
        assert_eq!(topk_layer(b"ffn_moe_argsort-3"), None);
        assert_eq!(topk_layer(b"ffn_moe_topk"), None);
    }

    /// The argsort is [n_expert, n_tokens]; the top-k view keeps its row stride.
    fn strided(n_expert: usize, k: usize, cols: &[Vec<i32>]) -> (Vec<u8>, [usize; 2]) {
        let nb1 = n_expert * 4;
        let n = cols.len();
        let bytes = k * 4 + (n - 1) * nb1; // ggml_nbytes of the view
        let mut data = vec![0xffu8; bytes];
        for (c, col) in cols.iter().enumerate() {
            for (r, &id) in col.iter().enumerate() {
                let off = r * 4 + c * nb1;
                data[off..off + 4].copy_from_slice(&id.to_le_bytes());
            }
        }
        (data, [4, nb1])
    }

    #[test]
    fn strided_views_are_read_through_nb1() {
        let mut cap = Capture {
            experts: 8,
            ..Capture::default()
        };
        let cols = vec![vec![3, 1], vec![0, 7], vec![5, 4]];
        let (data, nb) = strided(8, 2, &cols);
        cap.take(2, [2, 3], nb, &data).unwrap();
        assert_eq!(cap.layers[&2], vec![3, 1, 0, 7, 5, 4]);
        cap.take(5, [2, 3], nb, &data).unwrap();
        cap.check(3).unwrap();
        // A layer that missed a ubatch is caught.
        let (d1, nb1) = strided(8, 2, &[vec![1, 2]]);
        cap.take(2, [2, 1], nb1, &d1).unwrap();
        let err = cap.check(4).unwrap_err().to_string();
        assert!(
            err.contains("layer 2 saw 4 tokens") || err.contains("layer 5 saw 3"),
            "{err}"
        );
    }

    #[test]
    fn bad_routing_tensors_are_errors() {
        let mut cap = Capture {
            experts: 4,
            ..Capture::default()
        };
        let (data, nb) = strided(8, 2, &[vec![3, 6]]);
        let err = cap.take(0, [2, 1], nb, &data).unwrap_err();
        assert!(err.contains("expert 6, the model has 4"), "{err}");
        let mut cap = Capture {
            experts: 8,
            ..Capture::default()
        };
        cap.take(0, [2, 1], nb, &data).unwrap();
        let (d3, nb3) = strided(8, 3, &[vec![0, 1, 2]]);
        let err = cap.take(1, [3, 1], nb3, &d3).unwrap_err();
        assert!(err.contains("earlier layers 2"), "{err}");
        // Short data is an error, not a panic.
        let err = cap.take(0, [2, 2], nb, &data).unwrap_err();
        assert!(err.contains("past the"), "{err}");
        let mut empty = Capture::default();
        assert!(
            empty
                .check(1)
                .unwrap_err()
                .to_string()
                .contains("no ffn_moe_topk")
        );
    }
}
