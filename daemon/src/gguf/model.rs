//! `ModelInfo::from_gguf`: the model summary derived from a parsed header.

// Never panic on any input: no indexing, unwrap, panics or unchecked arithmetic.
#![deny(
    clippy::indexing_slicing,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::arithmetic_side_effects
)]

use std::collections::BTreeMap;

use super::{GgufError, GgufFile, ModelInfo, Value};

/// The expert weight tensors the engine's pool serves (the patch's
/// `llama_expert_pool_is_expert_tensor`).
const EXPERT_KINDS: [&str; 4] = [
    "ffn_gate_exps",
    "ffn_up_exps",
    "ffn_down_exps",
    "ffn_gate_up_exps",
];

pub(super) fn is_expert_tensor(name: &str) -> bool {
    // `blk.N.<kind>.weight` with the kinds the engine's pool serves (not `_chexps`,
    // `_shexp`, nor other per-expert tensors such as Arctic's `ffn_norm_exps`).
    let Some(rest) = name.strip_prefix("blk.") else {
        return false;
    };
    let Some((_, rest)) = rest.split_once('.') else {
        return false;
    };
    match rest.rsplit_once('.') {
        Some((stem, suffix)) => EXPERT_KINDS.contains(&stem) && suffix == "weight",
        None => false,
    }
}

pub(super) fn layer_of(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("blk.")?;
    let (n, _) = rest.split_once('.')?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse().ok()
}

struct Keys<'a> {
    file: &'a GgufFile,
    arch: &'a str,
}

impl Keys<'_> {
    fn key(&self, suffix: &str) -> String {
        format!("{}.{}", self.arch, suffix)
    }

    fn bad(&self, key: &str, reason: String) -> GgufError {
        GgufError::BadKey {
            path: self.file.path.clone(),
            key: key.to_string(),
            reason,
        }
    }

    fn missing(&self, key: &str, why: &'static str) -> GgufError {
        GgufError::MissingKey {
            path: self.file.path.clone(),
            key: key.to_string(),
            why,
        }
    }

    /// An unsigned integer (a non-negative signed one is accepted too).
    fn uint(&self, suffix: &str) -> Result<Option<u64>, GgufError> {
        let key = self.key(suffix);
        match self.file.get(&key) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                self.bad(
                    &key,
                    format!(
                        "expected a non-negative integer, found {} {v:?}",
                        v.type_name()
                    ),
                )
            }),
        }
    }

    fn required_uint(&self, suffix: &str, why: &'static str) -> Result<u64, GgufError> {
        self.uint(suffix)?
            .ok_or_else(|| self.missing(&self.key(suffix), why))
    }

    /// `v` if it is at most `max`: sizes beyond any real model are a corrupt header
    /// (and would overflow or hang the sums over layers and the planner's arithmetic).
    fn at_most(&self, suffix: &str, v: u64, max: u64) -> Result<u64, GgufError> {
        if v > max {
            return Err(self.bad(
                &self.key(suffix),
                format!("{v} is beyond any real model (at most {max})"),
            ));
        }
        Ok(v)
    }

    /// `v` as a u32 if it is at most `max` (below u32::MAX): a count of layers or heads.
    fn u32_at_most(&self, suffix: &str, v: u64, max: u64) -> Result<u32, GgufError> {
        self.u32_of(suffix, self.at_most(suffix, v, max)?)
    }

    /// An optional unsigned integer that is at most `max`.
    fn uint_at_most(&self, suffix: &str, max: u64) -> Result<Option<u64>, GgufError> {
        self.uint(suffix)?
            .map(|v| self.at_most(suffix, v, max))
            .transpose()
    }

    /// A u32 that fits: for counts that ggml keeps as u32.
    fn u32_of(&self, suffix: &str, v: u64) -> Result<u32, GgufError> {
        u32::try_from(v)
            .map_err(|_| self.bad(&self.key(suffix), format!("{v} does not fit in u32")))
    }

    /// A scalar or a per-layer array of non-negative integers, as a list (a scalar is a
    /// list of one). Empty arrays are rejected.
    fn uint_or_array(&self, suffix: &str) -> Result<Option<Vec<u64>>, GgufError> {
        let key = self.key(suffix);
        let Some(v) = self.file.get(&key) else {
            return Ok(None);
        };
        let items: Vec<u64> = match v {
            Value::Array(a) => a
                .iter()
                .map(|x| x.as_u64())
                .collect::<Option<Vec<u64>>>()
                .ok_or_else(|| {
                    self.bad(&key, "expected an array of non-negative integers".into())
                })?,
            v => vec![v.as_u64().ok_or_else(|| {
                self.bad(
                    &key,
                    format!(
                        "expected a non-negative integer or an array of them, found {}",
                        v.type_name()
                    ),
                )
            })?],
        };
        if items.is_empty() {
            return Err(self.bad(&key, "empty array".into()));
        }
        Ok(Some(items))
    }
}

/// Architectures whose sliding-window layers llama.cpp (at the pin) picks with a
/// repeating pattern when the file has a window: (architecture, pattern length, whether
/// the first layer of each period is the full-attention one). A pattern of n makes n - 1
/// of every n layers sliding-window ones: the last of each n, or with the flag the
/// first, attends to the whole context. Architectures not listed (or with a chunked
/// or shared cache, such as llama4 and gemma3n) are planned with every layer's KV at the
/// full context, which over-counts the KV but never under-counts it, and their context
/// checkpoints as if every layer slid.
const SWA_PATTERNS: [(&str, u64, bool); 7] = [
    ("gpt-oss", 2, false),
    ("gemma2", 2, false),
    ("gemma3", 6, false),
    ("cohere2", 4, false),
    ("cohere2moe", 4, true),
    ("exaone-moe", 4, false),
    ("afmoe", 4, false),
];

/// The sliding-window layers among the first `trunk`, as llama.cpp's `set_swa_pattern`
/// and `load_swa_pattern` choose them: none without a window; a per-layer bool array or a
/// pattern length in `<arch>.attention.sliding_window_pattern` where the file has one,
/// else the architecture's default pattern.
fn swa_layers(k: &Keys<'_>, trunk: u32) -> Result<(u32, Vec<bool>), GgufError> {
    let window_key = "attention.sliding_window";
    let Some(&(_, default_pattern, dense_first)) = SWA_PATTERNS.iter().find(|p| p.0 == k.arch)
    else {
        // Not a layout the daemon knows: the window alone (for the planner's bound on
        // llama-server's context checkpoints), read leniently (llama.cpp may ignore it).
        let window = k
            .file
            .get(&k.key(window_key))
            .and_then(Value::as_u64)
            .filter(|&w| w <= MAX_WINDOW)
            .and_then(|w| u32::try_from(w).ok())
            .unwrap_or(0);
        return Ok((window, Vec::new()));
    };
    let window = k.uint_at_most(window_key, MAX_WINDOW)?.unwrap_or(0);
    if window == 0 {
        return Ok((0, Vec::new()));
    }
    let window = k.u32_of(window_key, window)?;
    let pattern_key = k.key("attention.sliding_window_pattern");
    let by_period = |n: u64| -> Vec<bool> {
        (0..u64::from(trunk))
            .map(|il| {
                n == 0
                    || match il.checked_rem(n) {
                        Some(r) if dense_first => r != 0,
                        Some(r) => r < n.saturating_sub(1),
                        None => true,
                    }
            })
            .collect()
    };
    let layers = match k.file.get(&pattern_key) {
        None => by_period(default_pattern),
        Some(Value::Array(a)) => {
            // (llama.cpp reads any integer or bool array: non-zero slides)
            let flags = a
                .iter()
                .map(|v| match v {
                    Value::Bool(b) => Some(*b),
                    v => v.as_u64().map(|x| x != 0),
                })
                .collect::<Option<Vec<bool>>>()
                .ok_or_else(|| {
                    k.bad(
                        &pattern_key,
                        "expected an array of booleans or non-negative integers".into(),
                    )
                })?;
            // llama.cpp reads one flag per layer; missing ones are full attention
            (0..trunk as usize)
                .map(|il| flags.get(il).copied().unwrap_or(false))
                .collect()
        }
        Some(v) => by_period(v.as_u64().ok_or_else(|| {
            k.bad(
                &pattern_key,
                format!(
                    "expected a pattern length or an array of booleans, found {}",
                    v.type_name()
                ),
            )
        })?),
    };
    Ok((window, layers))
}

/// More layers than any real model has (the largest have a few hundred).
const MAX_LAYERS: u64 = 1 << 16;
/// A longer attention window than any real model's (they are 128 to 8192 tokens).
const MAX_WINDOW: u64 = 1 << 24;
/// Larger than any real hidden size, head count or head size (the largest are ~2^15).
const MAX_WIDTH: u64 = 1 << 20;

/// The summary of a model whose metadata is in `file` and whose tensors are those of
/// `parts` (`file` itself, or every split of a split model, `file` first).
pub(super) fn from_gguf(file: &GgufFile, parts: &[&GgufFile]) -> Result<ModelInfo, GgufError> {
    let arch_key = "general.architecture";
    let arch = match file.get(arch_key) {
        None => {
            return Err(GgufError::MissingKey {
                path: file.path.clone(),
                key: arch_key.into(),
                why: "every model names its architecture",
            });
        }
        Some(v) => v.as_str().ok_or_else(|| GgufError::BadKey {
            path: file.path.clone(),
            key: arch_key.into(),
            reason: format!("expected a string, found {}", v.type_name()),
        })?,
    };
    let k = Keys { file, arch };
    let name = file
        .get("general.name")
        .and_then(Value::as_str)
        .map(str::to_string);

    let block_count = k.required_uint("block_count", "the number of layers")?;
    let block_count = k.u32_at_most("block_count", block_count, MAX_LAYERS)?;
    let nextn_key = "nextn_predict_layers";
    let nextn_layers = k.uint(nextn_key)?.unwrap_or(0);
    if nextn_layers > u64::from(block_count) {
        return Err(k.bad(
            &k.key(nextn_key),
            format!("{nextn_layers} MTP blocks but block_count is {block_count}"),
        ));
    }
    let nextn_layers = k.u32_of(nextn_key, nextn_layers)?;
    if nextn_layers == block_count {
        return Err(k.bad(
            &k.key(nextn_key),
            format!(
                "all {block_count} blocks are MTP blocks: a draft head for MTP speculative \
                 decoding, not a model to serve"
            ),
        ));
    }
    // the layers the model computes; the MTP blocks come after them
    let trunk = block_count.saturating_sub(nextn_layers);
    let n_embd = k.required_uint("embedding_length", "the hidden size")?;
    let n_embd = k.at_most("embedding_length", n_embd, MAX_WIDTH)?;
    let context_length = k.required_uint("context_length", "the trained context size")?;

    let head_key = "attention.head_count";
    let heads = k
        .uint_or_array(head_key)?
        .ok_or_else(|| k.missing(&k.key(head_key), "the number of attention heads"))?;
    let n_head = k.u32_at_most(
        head_key,
        heads.iter().copied().max().unwrap_or(0),
        MAX_WIDTH,
    )?;
    let kv_key = "attention.head_count_kv";
    let heads_kv = k.uint_or_array(kv_key)?.unwrap_or_else(|| heads.clone());
    let n_head_kv = k.u32_at_most(
        kv_key,
        heads_kv.iter().copied().max().unwrap_or(0),
        MAX_WIDTH,
    )?;

    let expert_count = k.uint("expert_count")?.unwrap_or(0);
    let expert_count = k.u32_of("expert_count", expert_count)?;
    let expert_used_count = if expert_count > 0 {
        let used_key = "expert_used_count";
        let used = k.uint_or_array(used_key)?.ok_or_else(|| {
            k.missing(
                &k.key(used_key),
                "an MoE model must say how many experts each token uses",
            )
        })?;
        let used = k.u32_of(used_key, used.iter().copied().max().unwrap_or(0))?;
        if used == 0 || used > expert_count {
            return Err(k.bad(
                &k.key(used_key),
                format!("{used} experts used per token, must be in 1..={expert_count}"),
            ));
        }
        used
    } else {
        0
    };

    // KV cache: K and V per layer, f16, per KV head; head sizes from key_length and
    // value_length, else n_embd / n_head (with n_head the layer's own count).
    let key_len = k.uint_at_most("attention.key_length", MAX_WIDTH)?;
    let value_len = k.uint_at_most("attention.value_length", MAX_WIDTH)?;
    let (sliding_window, swa) = swa_layers(&k, trunk)?;
    let mut kv_bytes: u64 = 0;
    let mut kv_swa_bytes: u64 = 0;
    let mut swa_count: u32 = 0;
    for layer in 0..u64::from(trunk) {
        let per_layer = |list: &[u64]| -> u64 {
            if list.len() == 1 {
                list.first().copied().unwrap_or(0)
            } else {
                usize::try_from(layer)
                    .ok()
                    .and_then(|i| list.get(i))
                    .copied()
                    .unwrap_or(0)
            }
        };
        let h = per_layer(&heads);
        let h_kv = per_layer(&heads_kv);
        if h_kv == 0 {
            continue; // recurrent or attention-free layer
        }
        let default_head = n_embd.checked_div(h).unwrap_or(0);
        let kl = key_len.unwrap_or(default_head);
        let vl = value_len.unwrap_or(default_head);
        let layer_bytes = h_kv
            .checked_mul(kl.saturating_add(vl))
            .and_then(|x| x.checked_mul(2))
            .ok_or_else(|| k.bad(&k.key(kv_key), "KV cache size overflows".into()))?;
        kv_bytes = kv_bytes
            .checked_add(layer_bytes)
            .ok_or_else(|| k.bad(&k.key(kv_key), "KV cache size overflows".into()))?;
        let is_swa = usize::try_from(layer)
            .ok()
            .and_then(|i| swa.get(i))
            .copied()
            .unwrap_or(false);
        if is_swa {
            // (at most kv_bytes, which did not overflow)
            kv_swa_bytes = kv_swa_bytes.saturating_add(layer_bytes);
            swa_count = swa_count.saturating_add(1);
        }
    }

    let mut total_bytes: u64 = 0;
    let mut expert_bytes: u64 = 0;
    let mut nextn_bytes: u64 = 0;
    let mut per_layer: BTreeMap<u32, u64> = BTreeMap::new();
    for (part, t) in parts
        .iter()
        .flat_map(|p| p.tensors.iter().map(move |t| (p, t)))
    {
        // The reader bounded every tensor by the file size, so these sums fit.
        total_bytes = total_bytes.saturating_add(t.size);
        if layer_of(&t.name).is_some_and(|l| l >= trunk && l < block_count) {
            nextn_bytes = nextn_bytes.saturating_add(t.size);
            continue;
        }
        if !is_expert_tensor(&t.name) {
            continue;
        }
        let bad = |reason: String| GgufError::BadTensor {
            path: part.path.clone(),
            name: t.name.clone(),
            reason,
        };
        let layer = layer_of(&t.name).ok_or_else(|| bad("no layer index in the name".into()))?;
        if layer >= block_count {
            return Err(bad(format!(
                "layer {layer} but block_count is {block_count}"
            )));
        }
        let n_exp = t.dims.last().copied().unwrap_or(1);
        if expert_count == 0 {
            return Err(bad(
                "an expert tensor, but expert_count is absent or 0".into()
            ));
        }
        if n_exp != u64::from(expert_count) {
            return Err(bad(format!(
                "last dimension is {n_exp} (dims {:?}), expected expert_count {expert_count}",
                t.dims
            )));
        }
        let Some(per_expert) = t
            .size
            .checked_div(n_exp)
            .filter(|p| p.checked_mul(n_exp) == Some(t.size))
        else {
            return Err(bad(format!(
                "{} bytes do not split into {n_exp} experts",
                t.size
            )));
        };
        expert_bytes = expert_bytes.saturating_add(t.size);
        let e = per_layer.entry(layer).or_insert(0);
        *e = e.saturating_add(per_expert);
    }
    if expert_count > 0 && per_layer.is_empty() {
        return Err(GgufError::BadTensor {
            path: file.path.clone(),
            name: "blk.*.*_exps.weight".into(),
            reason: format!("expert_count is {expert_count} but no expert tensors exist"),
        });
    }

    Ok(ModelInfo {
        arch: arch.to_string(),
        name,
        block_count,
        n_embd,
        n_head,
        n_head_kv,
        context_length,
        expert_count,
        expert_used_count,
        total_bytes,
        expert_bytes,
        expert_bytes_per_layer: per_layer,
        non_expert_bytes: total_bytes
            .saturating_sub(expert_bytes)
            .saturating_sub(nextn_bytes),
        nextn_layers,
        nextn_bytes,
        kv_bytes_per_token_f16: kv_bytes,
        sliding_window,
        kv_swa_bytes_per_token_f16: kv_swa_bytes,
        swa_layers: swa_count,
    })
}

#[cfg(test)]
#[allow(
    clippy::indexing_slicing,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::arithmetic_side_effects
)]
mod tests {
    use super::*;

    #[test]
    fn expert_names() {
        for yes in [
            "blk.0.ffn_gate_exps.weight",
            "blk.12.ffn_down_exps.weight",
            "blk.3.ffn_gate_up_exps.weight",
        ] {
            assert!(is_expert_tensor(yes), "{yes}");
        }
        for no in [
            "blk.0.ffn_gate_inp.weight",
            "blk.0.ffn_gate_shexp.weight",
            "blk.0.ffn_gate_chexps.weight",
            "token_embd.weight",
            "ffn_gate_exps.weight",
            "blk.0.ffn_gate_exps",
            // per-expert biases and scales stay with the other weights
            "blk.3.ffn_up_exps.bias",
            "blk.3.ffn_up_exps.scale",
            // per-expert tensors the pool does not serve
            "blk.3.ffn_norm_exps.weight",
        ] {
            assert!(!is_expert_tensor(no), "{no}");
        }
        assert_eq!(layer_of("blk.17.attn_q.weight"), Some(17));
        assert_eq!(layer_of("blk.x.attn_q.weight"), None);
        assert_eq!(layer_of("blk.+1.attn_q.weight"), None);
        assert_eq!(layer_of("output.weight"), None);
    }
}
