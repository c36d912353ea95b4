//! The GGUF header parser. It reads sequentially from any `Read` whose total length is
//! known, checks every length and count against the bytes that remain before allocating,
//! and grows collections only as real bytes arrive, so a hostile header cannot make it
//! allocate more than the file holds. All arithmetic on file values is checked.

// Never panic on any input: no indexing, unwrap, panics or unchecked arithmetic.
#![deny(
    clippy::indexing_slicing,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::arithmetic_side_effects
)]

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use super::{
    ALIGNMENT_KEY, DEFAULT_ALIGNMENT, GgmlType, GgufError, GgufFile, MAGIC, MAX_ARRAY_DEPTH,
    MAX_DIMS, MAX_TENSOR_NAME, TensorInfo, Value,
};

/// Value type ids (`enum gguf_type`).
const T_U8: u32 = 0;
const T_I8: u32 = 1;
const T_U16: u32 = 2;
const T_I16: u32 = 3;
const T_U32: u32 = 4;
const T_I32: u32 = 5;
const T_F32: u32 = 6;
const T_BOOL: u32 = 7;
const T_STRING: u32 = 8;
const T_ARRAY: u32 = 9;
const T_U64: u32 = 10;
const T_I64: u32 = 11;
const T_F64: u32 = 12;

/// Fewest bytes one key-value pair can take: key length, type, a one-byte value.
const MIN_KV_BYTES: u64 = 8 + 4 + 1;
/// Fewest bytes one tensor info can take: name length, n_dims, type, offset.
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 4 + 8;
/// Collections start no larger than this and grow as elements are actually read.
const INITIAL_CAPACITY: usize = 4096;
/// Read buffer for files: the header is read in order, once.
const READ_BUFFER: usize = 256 * 1024;

pub(super) fn open(path: &Path) -> Result<GgufFile, GgufError> {
    let io = |source| GgufError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    parse(BufReader::with_capacity(READ_BUFFER, file), len, path)
}

pub(super) fn parse<R: Read>(
    reader: R,
    file_size: u64,
    path: &Path,
) -> Result<GgufFile, GgufError> {
    let mut p = Parser {
        r: reader,
        pos: 0,
        len: file_size,
        path: path.to_path_buf(),
    };
    p.file()
}

struct Parser<R> {
    r: R,
    /// Bytes consumed so far (absolute offset of the next read).
    pos: u64,
    /// Total file length.
    len: u64,
    path: PathBuf,
}

impl<R: Read> Parser<R> {
    fn remaining(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }

    fn truncated(&self, what: impl FnOnce() -> String, offset: u64, needed: u64) -> GgufError {
        GgufError::Truncated {
            path: self.path.clone(),
            what: what(),
            offset,
            needed,
            available: self.len.saturating_sub(offset),
        }
    }

    /// Fills `buf` or reports truncation (also when the file is shorter than its stated
    /// length, e.g. it shrank under us).
    fn fill(&mut self, buf: &mut [u8], what: impl FnOnce() -> String) -> Result<(), GgufError> {
        let n = u64::try_from(buf.len()).unwrap_or(u64::MAX);
        let offset = self.pos;
        if n > self.remaining() {
            return Err(self.truncated(what, offset, n));
        }
        match self.r.read_exact(buf) {
            Ok(()) => {
                self.pos = self.pos.saturating_add(n); // n <= remaining
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                Err(self.truncated(what, offset, n))
            }
            Err(source) => Err(GgufError::Io {
                path: self.path.clone(),
                source,
            }),
        }
    }

    fn array<const N: usize>(
        &mut self,
        what: impl FnOnce() -> String,
    ) -> Result<[u8; N], GgufError> {
        let mut b = [0u8; N];
        self.fill(&mut b, what)?;
        Ok(b)
    }

    fn u32(&mut self, what: impl FnOnce() -> String) -> Result<u32, GgufError> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: impl FnOnce() -> String) -> Result<u64, GgufError> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// Checks that `count` items of at least `min_each` bytes fit in what remains.
    fn check_count(
        &self,
        count: u64,
        min_each: u64,
        offset: u64,
        what: impl FnOnce() -> String,
    ) -> Result<(), GgufError> {
        let needed = count.checked_mul(min_each);
        match needed {
            Some(n) if n <= self.remaining() => Ok(()),
            _ => Err(GgufError::TooLong {
                path: self.path.clone(),
                what: what(),
                offset,
                count,
                needed: needed.unwrap_or(u64::MAX),
                available: self.remaining(),
            }),
        }
    }

    /// A u64 length plus UTF-8 bytes; the length is checked against the remaining bytes
    /// before anything is allocated.
    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String, GgufError> {
        let offset = self.pos;
        let n = self.u64(|| format!("length of {}", what()))?;
        self.check_count(n, 1, offset, || format!("length of {}", what()))?;
        // n <= remaining bytes of the file, so this allocation is backed by the file.
        let n = usize::try_from(n).map_err(|_| GgufError::TooLong {
            path: self.path.clone(),
            what: format!("length of {}", what()),
            offset,
            count: n,
            needed: n,
            available: self.remaining(),
        })?;
        let mut buf = vec![0u8; n];
        self.fill(&mut buf, what)?;
        String::from_utf8(buf).map_err(|_| GgufError::InvalidUtf8 {
            path: self.path.clone(),
            what: what(),
            offset,
        })
    }

    fn file(&mut self) -> Result<GgufFile, GgufError> {
        let magic: [u8; 4] = self.array(|| "magic".into())?;
        if magic != MAGIC {
            return Err(GgufError::BadMagic {
                path: self.path.clone(),
                found: magic,
            });
        }
        let version = self.u32(|| "version".into())?;
        if version != 2 && version != 3 {
            return Err(GgufError::UnsupportedVersion {
                path: self.path.clone(),
                version,
            });
        }
        let count_offset = self.pos;
        let n_tensors = self.u64(|| "tensor count".into())?;
        let n_kv = self.u64(|| "metadata count".into())?;
        self.check_count(n_tensors, MIN_TENSOR_INFO_BYTES, count_offset, || {
            "tensor count".into()
        })?;
        self.check_count(n_kv, MIN_KV_BYTES, count_offset.saturating_add(8), || {
            "metadata count".into()
        })?;
        // Both counts together must fit, too.
        let min_total = n_tensors
            .saturating_mul(MIN_TENSOR_INFO_BYTES)
            .saturating_add(n_kv.saturating_mul(MIN_KV_BYTES));
        if min_total > self.remaining() {
            return Err(GgufError::TooLong {
                path: self.path.clone(),
                what: "tensor count plus metadata count".into(),
                offset: count_offset,
                count: n_tensors.saturating_add(n_kv),
                needed: min_total,
                available: self.remaining(),
            });
        }

        let mut metadata = BTreeMap::new();
        for index in 0..n_kv {
            let offset = self.pos;
            let key = self.string(&|| format!("metadata key #{index}"))?;
            if key.is_empty() {
                return Err(GgufError::EmptyKey {
                    path: self.path.clone(),
                    index,
                    offset,
                });
            }
            if metadata.contains_key(&key) {
                return Err(GgufError::DuplicateKey {
                    path: self.path.clone(),
                    key,
                    offset,
                });
            }
            let type_offset = self.pos;
            let type_id = self.u32(|| format!("value type of key '{key}'"))?;
            let value = self.value(&key, type_id, type_offset, 0)?;
            metadata.insert(key, value);
        }

        let alignment = match metadata.get(ALIGNMENT_KEY) {
            None => DEFAULT_ALIGNMENT,
            Some(Value::U32(a)) if a.is_power_of_two() => u64::from(*a),
            Some(v) => {
                return Err(GgufError::BadAlignment {
                    path: self.path.clone(),
                    found: format!("{} {v:?}", v.type_name()),
                });
            }
        };

        let mut tensors: Vec<TensorInfo> = Vec::with_capacity(clamp_capacity(n_tensors));
        let mut names: HashSet<String> = HashSet::with_capacity(clamp_capacity(n_tensors));
        for index in 0..n_tensors {
            let info = self.tensor_info(index, &names)?;
            names.insert(info.name.clone());
            tensors.push(info);
        }

        let header_end = self.pos;
        let data_offset = align_up(header_end, alignment).ok_or_else(|| GgufError::TooLong {
            path: self.path.clone(),
            what: "header".into(),
            offset: 0,
            count: header_end,
            needed: u64::MAX,
            available: self.len,
        })?;
        self.check_layout(&tensors, alignment, data_offset)?;

        Ok(GgufFile {
            path: self.path.clone(),
            version,
            file_size: self.len,
            alignment,
            data_offset,
            metadata,
            tensors,
        })
    }

    /// One value of type `type_id` (already read at `type_offset`), for key `key`.
    fn value(
        &mut self,
        key: &str,
        type_id: u32,
        type_offset: u64,
        depth: u32,
    ) -> Result<Value, GgufError> {
        let what = || format!("value of key '{key}'");
        Ok(match type_id {
            T_U8 => Value::U8(u8::from_le_bytes(self.array(what)?)),
            T_I8 => Value::I8(i8::from_le_bytes(self.array(what)?)),
            T_U16 => Value::U16(u16::from_le_bytes(self.array(what)?)),
            T_I16 => Value::I16(i16::from_le_bytes(self.array(what)?)),
            T_U32 => Value::U32(u32::from_le_bytes(self.array(what)?)),
            T_I32 => Value::I32(i32::from_le_bytes(self.array(what)?)),
            T_F32 => Value::F32(f32::from_le_bytes(self.array(what)?)),
            T_BOOL => Value::Bool(u8::from_le_bytes(self.array(what)?) != 0),
            T_U64 => Value::U64(u64::from_le_bytes(self.array(what)?)),
            T_I64 => Value::I64(i64::from_le_bytes(self.array(what)?)),
            T_F64 => Value::F64(f64::from_le_bytes(self.array(what)?)),
            T_STRING => Value::String(self.string(&what)?),
            T_ARRAY => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(GgufError::ArrayTooDeep {
                        path: self.path.clone(),
                        key: key.to_string(),
                        max: MAX_ARRAY_DEPTH,
                        offset: type_offset,
                    });
                }
                let elem_offset = self.pos;
                let elem_type = self.u32(|| format!("array element type of key '{key}'"))?;
                let min_each =
                    min_value_bytes(elem_type).ok_or_else(|| GgufError::UnknownValueType {
                        path: self.path.clone(),
                        key: key.to_string(),
                        type_id: elem_type,
                        offset: elem_offset,
                    })?;
                let count_offset = self.pos;
                let n = self.u64(|| format!("array length of key '{key}'"))?;
                self.check_count(n, min_each, count_offset, || {
                    format!("array length of key '{key}'")
                })?;
                let mut items = Vec::with_capacity(clamp_capacity(n));
                for _ in 0..n {
                    items.push(self.value(key, elem_type, elem_offset, depth.saturating_add(1))?);
                }
                Value::Array(items)
            }
            _ => {
                return Err(GgufError::UnknownValueType {
                    path: self.path.clone(),
                    key: key.to_string(),
                    type_id,
                    offset: type_offset,
                });
            }
        })
    }

    fn tensor_info(&mut self, index: u64, seen: &HashSet<String>) -> Result<TensorInfo, GgufError> {
        let offset = self.pos;
        let name = self.string(&|| format!("name of tensor #{index}"))?;
        if name.len() >= MAX_TENSOR_NAME {
            return Err(GgufError::TensorNameTooLong {
                path: self.path.clone(),
                index,
                offset,
                len: name.len(),
                name,
                max: MAX_TENSOR_NAME - 1,
            });
        }
        if seen.contains(&name) {
            return Err(GgufError::DuplicateTensor {
                path: self.path.clone(),
                name,
                offset,
            });
        }
        let n_dims = self.u32(|| format!("n_dims of tensor '{name}'"))?;
        let max_dims = u32::try_from(MAX_DIMS).unwrap_or(u32::MAX);
        if n_dims > max_dims {
            return Err(GgufError::TooManyDims {
                path: self.path.clone(),
                name,
                n_dims,
                max: MAX_DIMS,
            });
        }
        let mut dims = Vec::with_capacity(MAX_DIMS);
        for i in 0..n_dims {
            dims.push(self.u64(|| format!("dimension {i} of tensor '{name}'"))?);
        }
        let type_id = self.u32(|| format!("type of tensor '{name}'"))?;
        let tensor_offset = self.u64(|| format!("offset of tensor '{name}'"))?;

        if let Some(index) = dims.iter().position(|&d| d == 0) {
            return Err(GgufError::ZeroDim {
                path: self.path.clone(),
                name,
                index,
                dims,
            });
        }
        let ty = GgmlType(type_id);
        let (Some(ty_name), Some(block_size)) = (ty.name(), ty.block_size()) else {
            return Err(GgufError::UnknownTensorType {
                path: self.path.clone(),
                name,
                type_id,
            });
        };
        // Like ggml, the element count must fit in an i64.
        let n_elements = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .filter(|&n| i64::try_from(n).is_ok());
        if n_elements.is_none() {
            return Err(GgufError::ShapeOverflow {
                path: self.path.clone(),
                name,
                dims,
            });
        }
        let ne0 = dims.first().copied().unwrap_or(1);
        let Some(row) = ty.row_bytes(ne0) else {
            return Err(GgufError::RowNotBlockMultiple {
                path: self.path.clone(),
                name,
                ne0,
                ty: ty_name,
                block_size,
            });
        };
        let size = dims
            .iter()
            .skip(1)
            .try_fold(row, |acc, &d| acc.checked_mul(d))
            .filter(|&n| i64::try_from(n).is_ok());
        let Some(size) = size else {
            return Err(GgufError::ShapeOverflow {
                path: self.path.clone(),
                name,
                dims,
            });
        };
        Ok(TensorInfo {
            name,
            dims,
            ggml_type: ty,
            offset: tensor_offset,
            size,
        })
    }

    /// Alignment, bounds and overlap of the tensor data ranges.
    fn check_layout(
        &self,
        tensors: &[TensorInfo],
        alignment: u64,
        data_offset: u64,
    ) -> Result<(), GgufError> {
        for t in tensors {
            if t.offset.checked_rem(alignment) != Some(0) {
                return Err(GgufError::MisalignedTensor {
                    path: self.path.clone(),
                    name: t.name.clone(),
                    offset: t.offset,
                    alignment,
                });
            }
            let start = data_offset.checked_add(t.offset);
            let end = start.and_then(|s| s.checked_add(t.size));
            match end {
                Some(end) if end <= self.len => {}
                _ => {
                    return Err(GgufError::TensorPastEof {
                        path: self.path.clone(),
                        name: t.name.clone(),
                        start: start.unwrap_or(u64::MAX),
                        end: end.unwrap_or(u64::MAX),
                        file_size: self.len,
                    });
                }
            }
        }
        // All ends are now known to fit in the file, so the sums below cannot overflow.
        let mut order: Vec<&TensorInfo> = tensors.iter().collect();
        order.sort_by_key(|t| (t.offset, t.size));
        for pair in order.windows(2) {
            if let [a, b] = pair {
                let a_end = a.offset.saturating_add(a.size);
                if b.offset < a_end {
                    return Err(GgufError::OverlappingTensors {
                        path: self.path.clone(),
                        first: a.name.clone(),
                        first_start: a.offset,
                        first_end: a_end,
                        second: b.name.clone(),
                        second_start: b.offset,
                    });
                }
            }
        }
        Ok(())
    }
}

/// Fewest bytes a value of this type takes in the file; None for unknown types.
fn min_value_bytes(type_id: u32) -> Option<u64> {
    Some(match type_id {
        T_U8 | T_I8 | T_BOOL => 1,
        T_U16 | T_I16 => 2,
        T_U32 | T_I32 | T_F32 => 4,
        T_U64 | T_I64 | T_F64 => 8,
        T_STRING => 8,
        T_ARRAY => 4 + 8,
        _ => return None,
    })
}

fn clamp_capacity(n: u64) -> usize {
    usize::try_from(n)
        .unwrap_or(usize::MAX)
        .min(INITIAL_CAPACITY)
}

/// `x` rounded up to a multiple of `a` (a power of two); None on overflow.
pub(super) fn align_up(x: u64, a: u64) -> Option<u64> {
    let mask = a.checked_sub(1)?;
    x.checked_add(mask).map(|v| v & !mask)
}
