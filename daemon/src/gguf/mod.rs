//! GGUF files: a reader for the header, metadata and tensor infos (never tensor data),
//! and the model summary every later part (planner, pool, synth tests) uses.
//!
//! Invariants: reading never panics on any input and never allocates more than the file
//! could hold; every error names what is wrong and where (byte offset, key or tensor).
//!
//! API CONTRACT (skeleton; bodies are being filled in): other modules code against the
//! public items below, so keep their names and signatures.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A ggml tensor element type, as stored in a GGUF tensor info (`enum ggml_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct GgmlType(pub u32);

impl GgmlType {
    pub const F32: GgmlType = GgmlType(0);
    pub const F16: GgmlType = GgmlType(1);
    pub const Q4_0: GgmlType = GgmlType(2);
    pub const Q8_0: GgmlType = GgmlType(8);
    pub const Q4_K: GgmlType = GgmlType(12);
    pub const Q6_K: GgmlType = GgmlType(14);
    pub const BF16: GgmlType = GgmlType(30);

    /// Upstream name ("q4_K", "f32", ...), or None for an unknown or removed type.
    pub fn name(self) -> Option<&'static str> {
        todo_contract()
    }
    /// Elements per block (1 for f32, 32 for q8_0, 256 for q4_K), None if unknown.
    pub fn block_size(self) -> Option<u64> {
        todo_contract()
    }
    /// Bytes per block, None if unknown.
    pub fn type_size(self) -> Option<u64> {
        todo_contract()
    }
    /// Bytes of a row of `n` elements; None if unknown type or `n` not a block multiple.
    pub fn row_bytes(self, n: u64) -> Option<u64> {
        let _ = n;
        todo_contract()
    }
}

/// A metadata value.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    /// Any unsigned or non-negative signed integer as u64.
    pub fn as_u64(&self) -> Option<u64> {
        todo_contract()
    }
    pub fn as_f64(&self) -> Option<f64> {
        todo_contract()
    }
    pub fn as_str(&self) -> Option<&str> {
        todo_contract()
    }
}

/// One tensor's info from the header.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: dims[0] is the contiguous (row) dimension.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Offset relative to the start of the data section.
    pub offset: u64,
    /// Size of the tensor's data in bytes (from type and dims).
    pub size: u64,
}

/// A parsed GGUF header.
#[derive(Clone, Debug, serde::Serialize)]
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub file_size: u64,
    /// `general.alignment`, default 32.
    pub alignment: u64,
    /// Absolute offset of the data section (after header and padding).
    pub data_offset: u64,
    pub metadata: BTreeMap<String, Value>,
    /// In file order.
    pub tensors: Vec<TensorInfo>,
}

impl GgufFile {
    /// Reads and validates the header of the file at `path`.
    pub fn open(path: &Path) -> Result<GgufFile, GgufError> {
        let _ = path;
        todo_contract()
    }
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }
    /// Absolute file offset of a tensor's first byte.
    pub fn absolute_offset(&self, t: &TensorInfo) -> u64 {
        self.data_offset + t.offset
    }
}

/// Why a GGUF file was rejected.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// Catch-all for the skeleton; the real reader has one variant per reason.
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// What the planner and the pool need to know about a model, derived from its header.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ModelInfo {
    pub arch: String,
    pub name: Option<String>,
    pub block_count: u32,
    pub n_embd: u64,
    pub n_head: u32,
    pub n_head_kv: u32,
    pub context_length: u64,
    /// 0 for a dense model.
    pub expert_count: u32,
    pub expert_used_count: u32,
    /// Total tensor data bytes.
    pub total_bytes: u64,
    /// Bytes of all expert tensors (`*_exps`), all layers.
    pub expert_bytes: u64,
    /// Bytes of one expert in one layer (gate + up + down), per MoE layer index; layers
    /// without experts are absent.
    pub expert_bytes_per_layer: BTreeMap<u32, u64>,
    /// Bytes of everything that is not an expert tensor.
    pub non_expert_bytes: u64,
    /// KV cache bytes per token at f16 (all layers, K and V).
    pub kv_bytes_per_token_f16: u64,
}

impl ModelInfo {
    pub fn from_gguf(file: &GgufFile) -> Result<ModelInfo, GgufError> {
        let _ = file;
        todo_contract()
    }
    pub fn is_moe(&self) -> bool {
        self.expert_count > 0
    }
}

fn todo_contract<T>() -> T {
    unimplemented!("gguf reader is being written")
}
