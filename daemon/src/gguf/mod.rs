//! GGUF files: a reader for the header, metadata and tensor infos (never tensor data),
//! a writer for headers (used by `synth`), and the model summary every later part
//! (planner, pool, synth tests) uses.
//!
//! Invariants: reading never panics on any input and never allocates more than the bytes
//! it has actually read (plus a constant factor for the in-memory representation); every
//! error names the file, what is wrong and where (byte offset, key or tensor).
//!
//! Layout of a GGUF v2/v3 file (little endian): magic `GGUF`, u32 version, u64 tensor
//! count, u64 metadata count, the metadata (key string, u32 value type, value), the tensor
//! infos (name string, u32 n_dims, u64 dims, u32 ggml type, u64 offset), padding up to
//! `general.alignment`, then the data section. Strings are a u64 length plus UTF-8 bytes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

mod error;
mod ggml_type;
mod model;
mod read;
mod split;
mod write;

pub use error::GgufError;
pub use split::{
    GgufModel, SPLIT_COUNT_KEY, SPLIT_NO_KEY, SPLIT_TENSORS_KEY, SplitInfo, SplitWriteError,
    split_info, split_paths, split_paths_by_name, write_split,
};
pub use write::{GgufLayout, TensorSpec, WriteError, layout};

/// The four bytes every GGUF file starts with.
pub const MAGIC: [u8; 4] = *b"GGUF";
/// Alignment of the data section and of every tensor when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// The metadata key that sets the alignment (must be a u32 power of two).
pub const ALIGNMENT_KEY: &str = "general.alignment";
/// ggml's `GGML_MAX_DIMS`.
pub const MAX_DIMS: usize = 4;
/// ggml's `GGML_MAX_NAME`: tensor names must be shorter than this.
pub const MAX_TENSOR_NAME: usize = 64;
/// Deepest nesting of arrays inside arrays the reader accepts.
pub const MAX_ARRAY_DEPTH: u32 = 8;

/// A ggml tensor element type, as stored in a GGUF tensor info (`enum ggml_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct GgmlType(pub u32);

impl GgmlType {
    /// 32-bit float.
    pub const F32: GgmlType = GgmlType(0);
    /// 16-bit IEEE float.
    pub const F16: GgmlType = GgmlType(1);
    /// 4-bit, blocks of 32 with an f16 scale.
    pub const Q4_0: GgmlType = GgmlType(2);
    /// 8-bit, blocks of 32 with an f16 scale.
    pub const Q8_0: GgmlType = GgmlType(8);
    /// 2-bit k-quant, super-blocks of 256.
    pub const Q2_K: GgmlType = GgmlType(10);
    /// 4-bit k-quant, super-blocks of 256.
    pub const Q4_K: GgmlType = GgmlType(12);
    /// 6-bit k-quant, super-blocks of 256.
    pub const Q6_K: GgmlType = GgmlType(14);
    /// bfloat16.
    pub const BF16: GgmlType = GgmlType(30);
    /// MXFP4: 32-element blocks of E2M1 codes with an E8M0 scale.
    pub const MXFP4: GgmlType = GgmlType(39);

    /// Upstream name ("q4_K", "f32", ...), or None for an unknown or removed type.
    pub fn name(self) -> Option<&'static str> {
        ggml_type::traits(self).map(|t| t.name)
    }
    /// Elements per block (1 for f32, 32 for q8_0, 256 for q4_K), None if unknown.
    pub fn block_size(self) -> Option<u64> {
        ggml_type::traits(self).map(|t| t.block_size)
    }
    /// Bytes per block, None if unknown.
    pub fn type_size(self) -> Option<u64> {
        ggml_type::traits(self).map(|t| t.type_size)
    }
    /// Bytes of a row of `n` elements; None if unknown type or `n` not a block multiple.
    pub fn row_bytes(self, n: u64) -> Option<u64> {
        let t = ggml_type::traits(self)?;
        if n % t.block_size != 0 {
            return None;
        }
        (n / t.block_size).checked_mul(t.type_size)
    }
    /// Looks a type up by its upstream name (case-insensitive: "q4_k" finds Q4_K).
    pub fn from_name(name: &str) -> Option<GgmlType> {
        ggml_type::from_name(name)
    }
    /// Every type the pinned ggml knows, in id order.
    pub fn all() -> impl Iterator<Item = GgmlType> {
        ggml_type::all()
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.name() {
            Some(n) => f.write_str(n),
            None => write!(f, "unknown type {}", self.0),
        }
    }
}

/// A metadata value.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub enum Value {
    /// GGUF type 0.
    U8(u8),
    /// GGUF type 1.
    I8(i8),
    /// GGUF type 2.
    U16(u16),
    /// GGUF type 3.
    I16(i16),
    /// GGUF type 4.
    U32(u32),
    /// GGUF type 5.
    I32(i32),
    /// GGUF type 10.
    U64(u64),
    /// GGUF type 11.
    I64(i64),
    /// GGUF type 6.
    F32(f32),
    /// GGUF type 12.
    F64(f64),
    /// GGUF type 7 (one byte, non-zero is true).
    Bool(bool),
    /// GGUF type 8 (UTF-8).
    String(String),
    /// All elements have the same type (the reader checks it; the writer requires it).
    Array(Vec<Value>),
}

impl Value {
    /// Any unsigned or non-negative signed integer as u64.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }
    /// Any number (integer or float) as f64.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            Value::I8(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            // Large 64-bit integers lose precision, as any conversion to f64 does.
            Value::I64(v) => Some(v as f64),
            _ => self.as_u64().map(|v| v as f64),
        }
    }
    /// The string, if this is a string value.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
    /// The elements, if this is an array.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
    /// The GGUF value type id of this value (`enum gguf_type`).
    pub fn type_id(&self) -> u32 {
        match self {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::String(_) => 8,
            Value::Array(_) => 9,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }
    /// Short name of the value's type ("u32", "string", "array", ...), for messages.
    pub fn type_name(&self) -> &'static str {
        value_type_name(self.type_id()).unwrap_or("?")
    }
}

/// Name of a GGUF value type id, None if the id is unknown.
pub fn value_type_name(id: u32) -> Option<&'static str> {
    const NAMES: [&str; 13] = [
        "u8", "i8", "u16", "i16", "u32", "i32", "f32", "bool", "string", "array", "u64", "i64",
        "f64",
    ];
    NAMES.get(usize::try_from(id).ok()?).copied()
}

/// One tensor's info from the header.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct TensorInfo {
    /// Tensor name, e.g. `blk.3.ffn_up_exps.weight`.
    pub name: String,
    /// ggml order: dims[0] is the contiguous (row) dimension.
    pub dims: Vec<u64>,
    /// Element type.
    pub ggml_type: GgmlType,
    /// Offset relative to the start of the data section.
    pub offset: u64,
    /// Size of the tensor's data in bytes (from type and dims).
    pub size: u64,
}

/// A parsed GGUF header.
#[derive(Clone, Debug, serde::Serialize)]
pub struct GgufFile {
    /// Where it was read from (`<memory>` for [`GgufFile::parse_bytes`]).
    pub path: PathBuf,
    /// 2 or 3.
    pub version: u32,
    /// Total bytes of the file.
    pub file_size: u64,
    /// `general.alignment`, default 32.
    pub alignment: u64,
    /// Absolute offset of the data section (after header and padding).
    pub data_offset: u64,
    /// All metadata, by key.
    pub metadata: BTreeMap<String, Value>,
    /// In file order.
    pub tensors: Vec<TensorInfo>,
}

impl GgufFile {
    /// Reads and validates the header of the file at `path` (buffered reads of the header
    /// only; tensor data is never read).
    pub fn open(path: &Path) -> Result<GgufFile, GgufError> {
        read::open(path)
    }
    /// Parses and validates a GGUF image held in memory (tests, fuzzing). Errors name
    /// the path `<memory>`.
    pub fn parse_bytes(bytes: &[u8]) -> Result<GgufFile, GgufError> {
        let len = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
        read::parse(bytes, len, Path::new("<memory>"))
    }
    /// Parses and validates a header from any reader positioned at the file's start;
    /// `file_size` is the total length of the file (bounds every length and count).
    pub fn from_reader<R: std::io::Read>(
        reader: R,
        file_size: u64,
        path: &Path,
    ) -> Result<GgufFile, GgufError> {
        read::parse(reader, file_size, path)
    }
    /// The metadata value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }
    /// The tensor named `name`, if present.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }
    /// Absolute file offset of a tensor's first byte.
    pub fn absolute_offset(&self, t: &TensorInfo) -> u64 {
        self.data_offset + t.offset
    }
    /// Sum of all tensors' data sizes.
    pub fn tensor_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.size).sum()
    }
}

/// What the planner and the pool need to know about a model, derived from its header.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ModelInfo {
    /// `general.architecture`, e.g. `qwen3moe`.
    pub arch: String,
    /// `general.name`, if present.
    pub name: Option<String>,
    /// `<arch>.block_count`.
    pub block_count: u32,
    /// `<arch>.embedding_length`.
    pub n_embd: u64,
    /// `<arch>.attention.head_count` (the maximum over layers if given per layer).
    pub n_head: u32,
    /// `<arch>.attention.head_count_kv` (the maximum over layers; default n_head).
    pub n_head_kv: u32,
    /// `<arch>.context_length`.
    pub context_length: u64,
    /// 0 for a dense model.
    pub expert_count: u32,
    /// `<arch>.expert_used_count` (0 for a dense model).
    pub expert_used_count: u32,
    /// Total tensor data bytes.
    pub total_bytes: u64,
    /// Bytes of all expert weight tensors (`*_exps.weight`), all layers.
    pub expert_bytes: u64,
    /// Bytes of one expert's weights in one layer (gate + up + down), per MoE layer index; layers
    /// without experts are absent.
    pub expert_bytes_per_layer: BTreeMap<u32, u64>,
    /// Bytes of everything that is not an expert tensor (nor an MTP block's).
    pub non_expert_bytes: u64,
    /// `<arch>.nextn_predict_layers`: multi-token-prediction blocks after the layers the
    /// model computes (GLM-4.5, DeepSeek-V3 files carry one). llama.cpp loads them only
    /// for MTP speculative decoding, so their tensors are in neither `expert_bytes` nor
    /// `non_expert_bytes`, and their layers in neither the per-layer sizes nor the KV.
    #[serde(default)]
    pub nextn_layers: u32,
    /// Bytes of the MTP blocks' tensors.
    #[serde(default)]
    pub nextn_bytes: u64,
    /// KV cache bytes per token at f16 (all layers, K and V).
    pub kv_bytes_per_token_f16: u64,
    /// `<arch>.attention.sliding_window` (0: none). Where the daemon does not know the
    /// architecture's layout, `kv_swa_bytes_per_token_f16` is 0 and every layer counts
    /// at the full context.
    #[serde(default)]
    pub sliding_window: u32,
    /// The sliding-window layers' share of `kv_bytes_per_token_f16`: llama.cpp keeps
    /// about window + ubatch cells for them (per sequence), not the whole context.
    #[serde(default)]
    pub kv_swa_bytes_per_token_f16: u64,
    /// How many of the layers the model computes are sliding-window layers.
    #[serde(default)]
    pub swa_layers: u32,
}

impl ModelInfo {
    /// Summarises a whole model's parsed header; errors name the missing or malformed key
    /// or tensor. A file of a split model is refused (its tensors are only part of the
    /// model): read those with [`GgufModel::open`] and [`ModelInfo::from_model`].
    pub fn from_gguf(file: &GgufFile) -> Result<ModelInfo, GgufError> {
        if let Some(s) = split_info(file)? {
            return Err(GgufError::SplitPart {
                path: file.path.clone(),
                no: u32::from(s.no) + 1,
                count: s.count,
            });
        }
        model::from_gguf(file, &[file])
    }
    /// Summarises a model from all its files (one, or every split).
    pub fn from_model(model: &GgufModel) -> Result<ModelInfo, GgufError> {
        let parts: Vec<&GgufFile> = model.files().collect();
        model::from_gguf(model.first(), &parts)
    }
    /// True when the model has experts.
    pub fn is_moe(&self) -> bool {
        self.expert_count > 0
    }
}

/// True for the expert weight tensors, which the pool serves from its slots
/// (`blk.N.ffn_{gate,up,down,gate_up}_exps.weight`; the expert index is their last
/// dimension). Per-expert biases and scales (`_exps.bias`, `_exps.scale`, e.g.
/// gpt-oss's) are small, stay in memory with the other weights, and so count as
/// non-expert bytes.
pub fn is_expert_tensor(name: &str) -> bool {
    model::is_expert_tensor(name)
}

/// The layer index of a `blk.N.*` tensor name.
pub fn layer_of(name: &str) -> Option<u32> {
    model::layer_of(name)
}
