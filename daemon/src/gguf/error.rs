//! Why a GGUF file was rejected: one variant per reason, each naming the file and where.

// Never panic on any input: no indexing, unwrap, panics or unchecked arithmetic.
#![deny(
    clippy::indexing_slicing,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::arithmetic_side_effects
)]

use std::path::PathBuf;

/// Why a GGUF file was rejected.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The file could not be opened or read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The first four bytes are not `GGUF`.
    #[error("{path}: not a GGUF file: magic is {found:02x?}, expected \"GGUF\"")]
    BadMagic {
        /// The file.
        path: PathBuf,
        /// The bytes found at offset 0.
        found: [u8; 4],
    },
    /// Version 1, 0, or newer than 3.
    #[error("{path}: unsupported GGUF version {version} ({})", version_hint(*version))]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// The version field.
        version: u32,
    },
    /// A fixed-size field runs past the end of the file.
    #[error(
        "{path}: truncated: {what} at byte {offset} needs {needed} bytes but the file ends \
         {available} bytes later"
    )]
    Truncated {
        /// The file.
        path: PathBuf,
        /// What was being read.
        what: String,
        /// Absolute offset of the read.
        offset: u64,
        /// Bytes the field needs.
        needed: u64,
        /// Bytes left in the file at that offset.
        available: u64,
    },
    /// A count or length needs more bytes than the rest of the file holds.
    #[error(
        "{path}: {what} at byte {offset} is {count}, which needs at least {needed} bytes but \
         only {available} remain (truncated or corrupt)"
    )]
    TooLong {
        /// The file.
        path: PathBuf,
        /// Which count or length.
        what: String,
        /// Absolute offset of the count field.
        offset: u64,
        /// The value read.
        count: u64,
        /// Minimum bytes that count implies (saturating).
        needed: u64,
        /// Bytes left in the file.
        available: u64,
    },
    /// A key, string value or tensor name is not valid UTF-8.
    #[error("{path}: {what} at byte {offset} is not valid UTF-8")]
    InvalidUtf8 {
        /// The file.
        path: PathBuf,
        /// Which string.
        what: String,
        /// Absolute offset of its length field.
        offset: u64,
    },
    /// A metadata key is the empty string.
    #[error("{path}: metadata key #{index} at byte {offset} is empty")]
    EmptyKey {
        /// The file.
        path: PathBuf,
        /// Index of the key-value pair.
        index: u64,
        /// Absolute offset of the key.
        offset: u64,
    },
    /// The same metadata key appears twice.
    #[error("{path}: duplicate metadata key '{key}' at byte {offset}")]
    DuplicateKey {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// Absolute offset of the second occurrence.
        offset: u64,
    },
    /// A value type id outside the GGUF value types.
    #[error("{path}: key '{key}': unknown value type {type_id} at byte {offset}")]
    UnknownValueType {
        /// The file.
        path: PathBuf,
        /// The key whose value it is.
        key: String,
        /// The type id read.
        type_id: u32,
        /// Absolute offset of the type field.
        offset: u64,
    },
    /// Arrays nested deeper than [`super::MAX_ARRAY_DEPTH`].
    #[error("{path}: key '{key}': arrays nested deeper than {max} at byte {offset}")]
    ArrayTooDeep {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// The limit.
        max: u32,
        /// Absolute offset of the inner array's type field.
        offset: u64,
    },
    /// `general.alignment` is not a u32 power of two.
    #[error("{path}: general.alignment must be a u32 power of two, found {found}")]
    BadAlignment {
        /// The file.
        path: PathBuf,
        /// The value found, with its type.
        found: String,
    },
    /// A tensor name is longer than ggml allows.
    #[error(
        "{path}: tensor #{index} at byte {offset}: name '{name}' is {len} bytes, the limit is {max}"
    )]
    TensorNameTooLong {
        /// The file.
        path: PathBuf,
        /// Index of the tensor info.
        index: u64,
        /// Absolute offset of the name.
        offset: u64,
        /// The name.
        name: String,
        /// Its length in bytes.
        len: usize,
        /// The longest accepted length.
        max: usize,
    },
    /// The same tensor name appears twice.
    #[error("{path}: duplicate tensor name '{name}' at byte {offset}")]
    DuplicateTensor {
        /// The file.
        path: PathBuf,
        /// The name.
        name: String,
        /// Absolute offset of the second occurrence.
        offset: u64,
    },
    /// More than four dimensions.
    #[error("{path}: tensor '{name}' has {n_dims} dimensions, at most {max} are allowed")]
    TooManyDims {
        /// The file.
        path: PathBuf,
        /// Tensor name.
        name: String,
        /// n_dims read.
        n_dims: u32,
        /// The limit.
        max: usize,
    },
    /// A dimension of zero.
    #[error("{path}: tensor '{name}' has dimension {index} of size 0 (dims {dims:?})")]
    ZeroDim {
        /// The file.
        path: PathBuf,
        /// Tensor name.
        name: String,
        /// Which dimension.
        index: usize,
        /// All dims.
        dims: Vec<u64>,
    },
    /// The element count or byte size does not fit in 63 bits.
    #[error("{path}: tensor '{name}' with dims {dims:?} overflows (element count or byte size)")]
    ShapeOverflow {
        /// The file.
        path: PathBuf,
        /// Tensor name.
        name: String,
        /// Its dims.
        dims: Vec<u64>,
    },
    /// A ggml type id the pinned ggml does not know (or has removed).
    #[error("{path}: tensor '{name}' has unknown ggml type {type_id}")]
    UnknownTensorType {
        /// The file.
        path: PathBuf,
        /// Tensor name.
        name: String,
        /// Type id read.
        type_id: u32,
    },
    /// The row length is not a multiple of the type's block size.
    #[error(
        "{path}: tensor '{name}': row of {ne0} elements is not a multiple of the {ty} block \
         size {block_size}"
    )]
    RowNotBlockMultiple {
        /// The file.
        path: PathBuf,
        /// Tensor name.
        name: String,
        /// dims[0].
        ne0: u64,
        /// Type name.
        ty: &'static str,
        /// Block size of the type.
        block_size: u64,
    },
    /// A tensor's offset is not a multiple of the alignment.
    #[error(
        "{path}: tensor '{name}' offset {offset} is not a multiple of the alignment {alignment}"
    )]
    MisalignedTensor {
        /// The file.
        path: PathBuf,
        /// Tensor name.
        name: String,
        /// Offset relative to the data section.
        offset: u64,
        /// The alignment.
        alignment: u64,
    },
    /// A tensor's data runs past the end of the file.
    #[error(
        "{path}: tensor '{name}' data [{start}, {end}) extends past the end of the file \
         ({file_size} bytes)"
    )]
    TensorPastEof {
        /// The file.
        path: PathBuf,
        /// Tensor name.
        name: String,
        /// Absolute start offset.
        start: u64,
        /// Absolute end offset (saturating).
        end: u64,
        /// The file's size.
        file_size: u64,
    },
    /// Two tensors' data ranges overlap.
    #[error(
        "{path}: tensors '{first}' [{first_start}, {first_end}) and '{second}' starting at \
         {second_start} overlap"
    )]
    OverlappingTensors {
        /// The file.
        path: PathBuf,
        /// The tensor that starts first.
        first: String,
        /// Its start (relative to the data section).
        first_start: u64,
        /// Its end.
        first_end: u64,
        /// The tensor that starts inside it.
        second: String,
        /// Its start.
        second_start: u64,
    },
    /// A metadata key the model summary needs is absent.
    #[error("{path}: missing metadata key '{key}' ({why})")]
    MissingKey {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// Why it is needed.
        why: &'static str,
    },
    /// A metadata key has the wrong type or an unusable value.
    #[error("{path}: metadata key '{key}': {reason}")]
    BadKey {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// A tensor does not have the shape the model summary expects.
    #[error("{path}: tensor '{name}': {reason}")]
    BadTensor {
        /// The file.
        path: PathBuf,
        /// Tensor name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// A later split of a split model was given where the model is opened from its first.
    #[error(
        "{path}: split {no} of {count}: a split model is opened from its first split{}",
        first.as_ref().map(|f| format!(", {}", f.display())).unwrap_or_default()
    )]
    SplitNotFirst {
        /// The file.
        path: PathBuf,
        /// Its 1-based split number.
        no: u32,
        /// Splits in the model.
        count: u16,
        /// The first split's path, when the name says it.
        first: Option<PathBuf>,
    },
    /// A split's name does not say where the other splits are.
    #[error(
        "{path}: split {no} of {count}, but the file name does not end in '{suffix}', so the \
         other splits cannot be found (llama.cpp names them PREFIX-NNNNN-of-MMMMM.gguf)"
    )]
    SplitName {
        /// The file.
        path: PathBuf,
        /// Its 1-based split number.
        no: u32,
        /// Splits in the model.
        count: u16,
        /// The ending its name needs.
        suffix: String,
    },
    /// A split of the model is not there.
    #[error("{path}: missing: split {no} of {count} of {}", first.display())]
    SplitMissing {
        /// The missing file.
        path: PathBuf,
        /// Its 1-based split number.
        no: u32,
        /// Splits in the model.
        count: u16,
        /// The model's first split.
        first: PathBuf,
    },
    /// A file in a split's place is not that split of this model.
    #[error("{path}: {found}, expected split {no} of {count}")]
    SplitMismatch {
        /// The file.
        path: PathBuf,
        /// What it says it is.
        found: String,
        /// The 1-based split number expected.
        no: u32,
        /// Splits in the model.
        count: u16,
    },
    /// A tensor is in two splits.
    #[error("{path}: tensor '{name}' is also in an earlier split")]
    SplitDuplicateTensor {
        /// The later file.
        path: PathBuf,
        /// The tensor.
        name: String,
    },
    /// `split.tensors.count` is not what the splits hold.
    #[error(
        "{path}: split.tensors.count is {expected} but the {count} splits hold {found} tensors"
    )]
    SplitTensorCount {
        /// The first split.
        path: PathBuf,
        /// `split.tensors.count`.
        expected: u64,
        /// Tensors found.
        found: u64,
        /// Splits in the model.
        count: u16,
    },
    /// One file of a split model summarised as if it were the model.
    #[error("{path}: split {no} of {count}: a split model is summarised from all its files")]
    SplitPart {
        /// The file.
        path: PathBuf,
        /// Its 1-based split number.
        no: u32,
        /// Splits in the model.
        count: u16,
    },
}

fn version_hint(version: u32) -> &'static str {
    if version == 1 {
        "GGUF v1 is no longer supported; convert the model again"
    } else if version != 0 && version & 0xffff == 0 {
        "looks byte-swapped: a big-endian file? only little-endian v2 and v3 are supported"
    } else {
        "only versions 2 and 3 are supported"
    }
}

impl GgufError {
    /// The file the error is about.
    pub fn path(&self) -> &std::path::Path {
        match self {
            GgufError::Io { path, .. }
            | GgufError::BadMagic { path, .. }
            | GgufError::UnsupportedVersion { path, .. }
            | GgufError::Truncated { path, .. }
            | GgufError::TooLong { path, .. }
            | GgufError::InvalidUtf8 { path, .. }
            | GgufError::EmptyKey { path, .. }
            | GgufError::DuplicateKey { path, .. }
            | GgufError::UnknownValueType { path, .. }
            | GgufError::ArrayTooDeep { path, .. }
            | GgufError::BadAlignment { path, .. }
            | GgufError::TensorNameTooLong { path, .. }
            | GgufError::DuplicateTensor { path, .. }
            | GgufError::TooManyDims { path, .. }
            | GgufError::ZeroDim { path, .. }
            | GgufError::ShapeOverflow { path, .. }
            | GgufError::UnknownTensorType { path, .. }
            | GgufError::RowNotBlockMultiple { path, .. }
            | GgufError::MisalignedTensor { path, .. }
            | GgufError::TensorPastEof { path, .. }
            | GgufError::OverlappingTensors { path, .. }
            | GgufError::MissingKey { path, .. }
            | GgufError::BadKey { path, .. }
            | GgufError::BadTensor { path, .. }
            | GgufError::SplitNotFirst { path, .. }
            | GgufError::SplitName { path, .. }
            | GgufError::SplitMissing { path, .. }
            | GgufError::SplitMismatch { path, .. }
            | GgufError::SplitDuplicateTensor { path, .. }
            | GgufError::SplitTensorCount { path, .. }
            | GgufError::SplitPart { path, .. } => path,
        }
    }
}
