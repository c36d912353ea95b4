//! The GGUF writer's half: lay out a v3 header (metadata in the given order, tensor infos
//! with offsets packed in order, each tensor padded to the alignment, as the pinned ggml
//! requires) and encode it. Writing the tensor data is the caller's job: it writes
//! `header`, then each tensor's `size` bytes at `data_offset + offset`, zero padding in
//! between and up to `file_size`.

use super::read::align_up;
use super::{
    ALIGNMENT_KEY, DEFAULT_ALIGNMENT, GgmlType, MAX_DIMS, MAX_TENSOR_NAME, TensorInfo, Value,
};

/// A tensor to lay out: its offset and size are computed.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorSpec {
    /// Tensor name (shorter than 64 bytes, unique).
    pub name: String,
    /// ggml order: dims[0] is the row length.
    pub dims: Vec<u64>,
    /// Element type.
    pub ggml_type: GgmlType,
}

impl From<&TensorInfo> for TensorSpec {
    /// The spec of a tensor read from a header (to lay it out again, e.g. in a split).
    fn from(t: &TensorInfo) -> TensorSpec {
        TensorSpec {
            name: t.name.clone(),
            dims: t.dims.clone(),
            ggml_type: t.ggml_type,
        }
    }
}

/// A laid-out file: the encoded header and where every tensor goes.
#[derive(Clone, Debug)]
pub struct GgufLayout {
    /// Magic, version 3, counts, metadata and tensor infos, then zero padding up to
    /// `data_offset`.
    pub header: Vec<u8>,
    /// Tensor infos in file order, offsets relative to `data_offset`.
    pub tensors: Vec<TensorInfo>,
    /// The alignment used.
    pub alignment: u64,
    /// Absolute offset of the data section (= `header.len()`).
    pub data_offset: u64,
    /// Total size of the file: the last tensor is padded to the alignment too.
    pub file_size: u64,
}

/// Why a header could not be laid out.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// Two metadata entries with the same key.
    #[error("duplicate metadata key '{0}'")]
    DuplicateKey(String),
    /// An empty key.
    #[error("empty metadata key")]
    EmptyKey,
    /// An array whose elements differ in type.
    #[error("metadata key '{0}': array elements must all have the same type")]
    MixedArray(String),
    /// `general.alignment` present but not a u32 power of two.
    #[error("general.alignment must be a u32 power of two")]
    BadAlignment,
    /// Two tensors with the same name.
    #[error("duplicate tensor name '{0}'")]
    DuplicateTensor(String),
    /// A tensor ggml would reject.
    #[error("tensor '{name}': {reason}")]
    BadTensor {
        /// Tensor name.
        name: String,
        /// What is wrong.
        reason: String,
    },
}

/// Lays out a GGUF v3 file. The alignment is `general.alignment` if `metadata` has it,
/// else 32. Empty arrays are written with element type u8 (their type is not kept by
/// [`Value`]).
pub fn layout(
    metadata: &[(String, Value)],
    tensors: &[TensorSpec],
) -> Result<GgufLayout, WriteError> {
    let mut alignment = DEFAULT_ALIGNMENT;
    let mut keys = std::collections::HashSet::new();
    for (k, v) in metadata {
        if k.is_empty() {
            return Err(WriteError::EmptyKey);
        }
        if !keys.insert(k.as_str()) {
            return Err(WriteError::DuplicateKey(k.clone()));
        }
        check_homogeneous(k, v)?;
        if k == ALIGNMENT_KEY {
            match v {
                Value::U32(a) if a.is_power_of_two() => alignment = u64::from(*a),
                _ => return Err(WriteError::BadAlignment),
            }
        }
    }

    let mut h = Vec::with_capacity(4096);
    h.extend_from_slice(&super::MAGIC);
    h.extend_from_slice(&3u32.to_le_bytes());
    h.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    h.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata {
        put_str(&mut h, k);
        h.extend_from_slice(&v.type_id().to_le_bytes());
        put_value(&mut h, v);
    }

    let mut infos = Vec::with_capacity(tensors.len());
    let mut names = std::collections::HashSet::new();
    let mut offset: u64 = 0;
    for t in tensors {
        let bad = |reason: String| WriteError::BadTensor {
            name: t.name.clone(),
            reason,
        };
        if !names.insert(t.name.as_str()) {
            return Err(WriteError::DuplicateTensor(t.name.clone()));
        }
        if t.name.len() >= MAX_TENSOR_NAME {
            return Err(bad(format!(
                "name longer than {} bytes",
                MAX_TENSOR_NAME - 1
            )));
        }
        if t.dims.is_empty() || t.dims.len() > MAX_DIMS || t.dims.contains(&0) {
            return Err(bad(format!("dims {:?}: need 1 to 4 non-zero dims", t.dims)));
        }
        let ne0 = t.dims.first().copied().unwrap_or(1);
        let row = t.ggml_type.row_bytes(ne0).ok_or_else(|| {
            bad(format!(
                "row length {ne0} is not a multiple of the {} block size {:?}",
                t.ggml_type,
                t.ggml_type.block_size()
            ))
        })?;
        let size = t
            .dims
            .iter()
            .skip(1)
            .try_fold(row, |a, &d| a.checked_mul(d))
            .ok_or_else(|| bad("size overflows".into()))?;
        put_str(&mut h, &t.name);
        h.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            h.extend_from_slice(&d.to_le_bytes());
        }
        h.extend_from_slice(&t.ggml_type.0.to_le_bytes());
        h.extend_from_slice(&offset.to_le_bytes());
        infos.push(TensorInfo {
            name: t.name.clone(),
            dims: t.dims.clone(),
            ggml_type: t.ggml_type,
            offset,
            size,
        });
        offset = align_up(size, alignment)
            .and_then(|s| offset.checked_add(s))
            .ok_or_else(|| bad("file size overflows".into()))?;
    }
    let data_offset = align_up(h.len() as u64, alignment).ok_or(WriteError::BadAlignment)?;
    h.resize(data_offset as usize, 0);
    let file_size = data_offset
        .checked_add(offset)
        .ok_or_else(|| WriteError::BadTensor {
            name: String::new(),
            reason: "file size overflows".into(),
        })?;
    Ok(GgufLayout {
        header: h,
        tensors: infos,
        alignment,
        data_offset,
        file_size,
    })
}

fn check_homogeneous(key: &str, v: &Value) -> Result<(), WriteError> {
    if let Value::Array(items) = v {
        if let Some(first) = items.first() {
            let ty = first.type_id();
            for it in items {
                if it.type_id() != ty {
                    return Err(WriteError::MixedArray(key.to_string()));
                }
                check_homogeneous(key, it)?;
            }
        }
    }
    Ok(())
}

fn put_str(h: &mut Vec<u8>, s: &str) {
    h.extend_from_slice(&(s.len() as u64).to_le_bytes());
    h.extend_from_slice(s.as_bytes());
}

fn put_value(h: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => h.push(*x),
        Value::I8(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::U16(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::U64(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => h.push(u8::from(*x)),
        Value::String(s) => put_str(h, s),
        Value::Array(items) => {
            let elem = items.first().map_or(0, Value::type_id);
            h.extend_from_slice(&elem.to_le_bytes());
            h.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for it in items {
                put_value(h, it);
            }
        }
    }
}
