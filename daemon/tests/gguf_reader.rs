//! The GGUF reader against hand-built files: one valid file, a table of corrupt and
//! truncated variants (each must give its own error, naming where), a deterministic
//! mutation run that must never panic, and the model summary.

use std::io::Cursor;
use std::path::Path;

use expertd::gguf::{GgmlType, GgufError, GgufFile, ModelInfo, Value};
use expertd::synth::rng::Rng;
use expertd::synth::{self, Preset, SynthConfig};

// ---------- a tiny GGUF byte builder, independent of the crate's writer ----------

fn s(x: &str) -> Vec<u8> {
    raw_str(x.as_bytes())
}

fn raw_str(b: &[u8]) -> Vec<u8> {
    let mut v = (b.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(b);
    v
}

/// One key-value pair: key, type id, encoded value.
fn kv(key: &str, ty: u32, value: &[u8]) -> Vec<u8> {
    let mut v = s(key);
    v.extend_from_slice(&ty.to_le_bytes());
    v.extend_from_slice(value);
    v
}

fn kv_u32(key: &str, x: u32) -> Vec<u8> {
    kv(key, 4, &x.to_le_bytes())
}

fn kv_str(key: &str, x: &str) -> Vec<u8> {
    kv(key, 8, &s(x))
}

/// An array value: element type, count, encoded elements.
fn arr(elem: u32, n: u64, body: &[u8]) -> Vec<u8> {
    let mut v = elem.to_le_bytes().to_vec();
    v.extend_from_slice(&n.to_le_bytes());
    v.extend_from_slice(body);
    v
}

/// One tensor info.
fn ti(name: &str, dims: &[u64], ty: u32, offset: u64) -> Vec<u8> {
    ti_raw(&s(name), dims.len() as u32, dims, ty, offset)
}

fn ti_raw(name: &[u8], n_dims: u32, dims: &[u64], ty: u32, offset: u64) -> Vec<u8> {
    let mut v = name.to_vec();
    v.extend_from_slice(&n_dims.to_le_bytes());
    for d in dims {
        v.extend_from_slice(&d.to_le_bytes());
    }
    v.extend_from_slice(&ty.to_le_bytes());
    v.extend_from_slice(&offset.to_le_bytes());
    v
}

#[derive(Clone)]
struct Spec {
    magic: [u8; 4],
    version: u32,
    n_tensors: Option<u64>,
    n_kv: Option<u64>,
    kvs: Vec<Vec<u8>>,
    tensors: Vec<Vec<u8>>,
    /// Padding of the header is computed with this alignment.
    alignment: u64,
    data_len: u64,
}

impl Spec {
    /// A valid file: two keys and an array, an f32 tensor [64] at 0 and a q8_0 tensor
    /// [32, 2] at 256; data section 352 bytes (324 used, padded to 32).
    fn valid() -> Spec {
        let mut tokens = Vec::new();
        for t in ["a", "b", "c"] {
            tokens.extend_from_slice(&s(t));
        }
        Spec {
            magic: *b"GGUF",
            version: 3,
            n_tensors: None,
            n_kv: None,
            kvs: vec![
                kv_str("general.architecture", "test"),
                kv_u32("test.block_count", 1),
                kv("tokenizer.ggml.tokens", 9, &arr(8, 3, &tokens)),
            ],
            tensors: vec![ti("a", &[64], 0, 0), ti("b", &[32, 2], 8, 256)],
            alignment: 32,
            data_len: 352,
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let mut v = self.magic.to_vec();
        v.extend_from_slice(&self.version.to_le_bytes());
        v.extend_from_slice(
            &self
                .n_tensors
                .unwrap_or(self.tensors.len() as u64)
                .to_le_bytes(),
        );
        v.extend_from_slice(&self.n_kv.unwrap_or(self.kvs.len() as u64).to_le_bytes());
        for k in &self.kvs {
            v.extend_from_slice(k);
        }
        for t in &self.tensors {
            v.extend_from_slice(t);
        }
        let padded = v.len().div_ceil(self.alignment as usize) * self.alignment as usize;
        v.resize(padded + self.data_len as usize, 0);
        v
    }

    fn with(mut self, f: impl FnOnce(&mut Spec)) -> Spec {
        f(&mut self);
        self
    }
}

/// Parses `bytes` and checks that it fails with the expected variant and that the
/// message names the file and contains `fragment`.
#[track_caller]
fn check(bytes: &[u8], variant: fn(&GgufError) -> bool, fragment: &str) {
    match GgufFile::parse_bytes(bytes) {
        Ok(f) => panic!("expected an error containing {fragment:?}, parsed {f:?}"),
        Err(e) => {
            let msg = e.to_string();
            assert!(variant(&e), "wrong variant: {e:?}");
            assert!(
                msg.starts_with("<memory>: "),
                "message must name the file: {msg}"
            );
            assert!(msg.contains(fragment), "message {msg:?} lacks {fragment:?}");
        }
    }
}

#[test]
fn valid_file_parses() {
    let f = GgufFile::parse_bytes(&Spec::valid().bytes()).expect("valid file");
    assert_eq!(f.version, 3);
    assert_eq!(f.alignment, 32);
    assert_eq!(f.data_offset % 32, 0);
    assert_eq!(
        f.get("general.architecture").and_then(Value::as_str),
        Some("test")
    );
    assert_eq!(f.get("test.block_count").and_then(Value::as_u64), Some(1));
    let tokens = f
        .get("tokenizer.ggml.tokens")
        .and_then(Value::as_array)
        .expect("array");
    assert_eq!(tokens.len(), 3);
    assert_eq!(tokens[2].as_str(), Some("c"));
    assert_eq!(f.tensors.len(), 2);
    let b = f.tensor("b").expect("b");
    assert_eq!(b.dims, vec![32, 2]);
    assert_eq!(b.ggml_type, GgmlType::Q8_0);
    assert_eq!(b.size, 2 * 34);
    assert_eq!(f.absolute_offset(b), f.data_offset + 256);
    // Version 2 has the same layout.
    let v2 = Spec::valid().with(|s| s.version = 2).bytes();
    assert_eq!(GgufFile::parse_bytes(&v2).expect("v2").version, 2);
    // A file with exactly the bytes the tensors need (no trailing padding) is fine too.
    let tight = Spec::valid().with(|s| s.data_len = 256 + 68).bytes();
    GgufFile::parse_bytes(&tight).expect("unpadded end");
}

#[test]
fn all_value_types_and_nested_arrays() {
    let mut nested = Vec::new();
    for row in [[1i16, -2], [3, -4]] {
        let mut body = Vec::new();
        for x in row {
            body.extend_from_slice(&x.to_le_bytes());
        }
        nested.extend_from_slice(&arr(3, 2, &body));
    }
    let spec = Spec::valid().with(|s| {
        s.kvs.extend([
            kv("u8", 0, &[200]),
            kv("i8", 1, &[0xfe]),
            kv("u16", 2, &500u16.to_le_bytes()),
            kv("i16", 3, &(-500i16).to_le_bytes()),
            kv("i32", 5, &(-7i32).to_le_bytes()),
            kv("f32", 6, &1.5f32.to_le_bytes()),
            kv("bool", 7, &[1]),
            kv("u64", 10, &(1u64 << 40).to_le_bytes()),
            kv("i64", 11, &(-1i64).to_le_bytes()),
            kv("f64", 12, &0.25f64.to_le_bytes()),
            kv("nested", 9, &arr(9, 2, &nested)),
            kv("empty", 9, &arr(4, 0, &[])),
        ])
    });
    let f = GgufFile::parse_bytes(&spec.bytes()).expect("parses");
    let g = |k: &str| f.get(k).cloned().expect(k);
    assert_eq!(g("u8"), Value::U8(200));
    assert_eq!(g("i8"), Value::I8(-2));
    assert_eq!(g("u16"), Value::U16(500));
    assert_eq!(g("i16"), Value::I16(-500));
    assert_eq!(g("i32"), Value::I32(-7));
    assert_eq!(g("f32"), Value::F32(1.5));
    assert_eq!(g("bool"), Value::Bool(true));
    assert_eq!(g("u64").as_u64(), Some(1 << 40));
    assert_eq!(g("i64").as_u64(), None);
    assert_eq!(g("i64").as_f64(), Some(-1.0));
    assert_eq!(g("f64").as_f64(), Some(0.25));
    assert_eq!(
        g("nested"),
        Value::Array(vec![
            Value::Array(vec![Value::I16(1), Value::I16(-2)]),
            Value::Array(vec![Value::I16(3), Value::I16(-4)]),
        ])
    );
    assert_eq!(g("empty"), Value::Array(vec![]));
}

type V = fn(&GgufError) -> bool;

#[test]
fn corrupt_and_truncated_files() {
    use GgufError as E;
    let valid = Spec::valid();
    let vb = valid.bytes();
    // Offsets within the valid file, for truncation cases.
    let header_len = 4 + 4 + 8 + 8;
    let kv_len: usize = valid.kvs.iter().map(Vec::len).sum();
    let tensors_start = header_len + kv_len;
    // Without tensors, so that the up-front count check passes and the cut is found
    // where it is.
    let kb = valid
        .clone()
        .with(|s| {
            s.tensors.clear();
            s.data_len = 0;
        })
        .bytes();

    let deep = {
        // 9 levels of arrays, each holding one array; the innermost holds nothing.
        let mut v = arr(0, 0, &[]);
        for _ in 0..9 {
            v = arr(9, 1, &v);
        }
        v
    };

    let cases: Vec<(&str, Vec<u8>, V, &str)> = vec![
        (
            "empty file",
            vec![],
            |e| matches!(e, E::Truncated { .. }),
            "magic at byte 0",
        ),
        (
            "short magic",
            b"GG".to_vec(),
            |e| matches!(e, E::Truncated { .. }),
            "magic",
        ),
        (
            "bad magic",
            valid.clone().with(|s| s.magic = *b"GGML").bytes(),
            |e| matches!(e, E::BadMagic { .. }),
            "not a GGUF file",
        ),
        (
            "version 1",
            valid.clone().with(|s| s.version = 1).bytes(),
            |e| matches!(e, E::UnsupportedVersion { version: 1, .. }),
            "v1 is no longer supported",
        ),
        (
            "version 4",
            valid.clone().with(|s| s.version = 4).bytes(),
            |e| matches!(e, E::UnsupportedVersion { version: 4, .. }),
            "only versions 2 and 3",
        ),
        (
            "byte-swapped version",
            valid
                .clone()
                .with(|s| s.version = 3u32.swap_bytes())
                .bytes(),
            |e| matches!(e, E::UnsupportedVersion { .. }),
            "big-endian",
        ),
        (
            "truncated in the counts",
            vb[..10].to_vec(),
            |e| matches!(e, E::Truncated { .. }),
            "tensor count at byte 8",
        ),
        (
            "absurd tensor count",
            valid.clone().with(|s| s.n_tensors = Some(1 << 60)).bytes(),
            |e| matches!(e, E::TooLong { .. }),
            "tensor count at byte 8",
        ),
        (
            "absurd metadata count",
            valid.clone().with(|s| s.n_kv = Some(u64::MAX)).bytes(),
            |e| matches!(e, E::TooLong { .. }),
            "metadata count at byte 16",
        ),
        (
            "counts that fit alone but not together",
            {
                let bytes = valid.bytes();
                let room = (bytes.len() - header_len) as u64;
                valid
                    .clone()
                    .with(|s| s.n_kv = Some(room / 13))
                    .with(|s| s.n_tensors = Some(room / 24))
                    .bytes()
            },
            |e| matches!(e, E::TooLong { .. }),
            "tensor count plus metadata count",
        ),
        (
            "absurd key length",
            valid
                .clone()
                .with(|s| s.kvs[0] = u64::MAX.to_le_bytes().to_vec())
                .bytes(),
            |e| matches!(e, E::TooLong { .. }),
            "length of metadata key #0 at byte 24",
        ),
        (
            "truncated inside a key's length",
            kb[..header_len + valid.kvs[0].len() + 3].to_vec(),
            |e| matches!(e, E::Truncated { .. }),
            "length of metadata key #1 at byte 68",
        ),
        (
            "truncated inside a string value",
            kb[..header_len + valid.kvs[0].len() - 2].to_vec(),
            |e| matches!(e, E::TooLong { .. }),
            "length of value of key 'general.architecture'",
        ),
        (
            "truncated inside a u32 value",
            kb[..header_len + valid.kvs[0].len() + valid.kvs[1].len() - 1].to_vec(),
            |e| matches!(e, E::Truncated { .. }),
            "value of key 'test.block_count'",
        ),
        (
            "absurd array length",
            valid
                .clone()
                .with(|s| s.kvs[2] = kv("tokenizer.ggml.tokens", 9, &arr(8, 1 << 40, &[])))
                .bytes(),
            |e| matches!(e, E::TooLong { .. }),
            "array length of key 'tokenizer.ggml.tokens'",
        ),
        (
            "array of u64 longer than the file",
            valid
                .clone()
                .with(|s| s.kvs[2] = kv("x", 9, &arr(10, 100, &[])))
                .bytes(),
            |e| matches!(e, E::TooLong { needed: 800, .. }),
            "array length of key 'x'",
        ),
        (
            "invalid UTF-8 key",
            valid
                .clone()
                .with(|s| {
                    s.kvs[1] =
                        [raw_str(b"bad\xff"), 4u32.to_le_bytes().to_vec(), vec![0; 4]].concat()
                })
                .bytes(),
            |e| matches!(e, E::InvalidUtf8 { .. }),
            "metadata key #1",
        ),
        (
            "invalid UTF-8 string value",
            valid
                .clone()
                .with(|s| s.kvs[0] = kv("general.architecture", 8, &raw_str(b"\xc3(")))
                .bytes(),
            |e| matches!(e, E::InvalidUtf8 { .. }),
            "value of key 'general.architecture'",
        ),
        (
            "unknown value type",
            valid
                .clone()
                .with(|s| s.kvs[1] = kv("test.block_count", 13, &[0; 4]))
                .bytes(),
            |e| matches!(e, E::UnknownValueType { type_id: 13, .. }),
            "key 'test.block_count': unknown value type 13",
        ),
        (
            "unknown array element type",
            valid
                .clone()
                .with(|s| s.kvs[2] = kv("arr", 9, &arr(99, 0, &[])))
                .bytes(),
            |e| matches!(e, E::UnknownValueType { type_id: 99, .. }),
            "key 'arr': unknown value type 99",
        ),
        (
            "arrays nested too deep",
            valid
                .clone()
                .with(|s| s.kvs[2] = kv("deep", 9, &deep))
                .bytes(),
            |e| matches!(e, E::ArrayTooDeep { .. }),
            "key 'deep': arrays nested deeper than 8",
        ),
        (
            "duplicate key",
            valid
                .clone()
                .with(|s| s.kvs[2] = kv_u32("test.block_count", 2))
                .bytes(),
            |e| matches!(e, E::DuplicateKey { .. }),
            "duplicate metadata key 'test.block_count'",
        ),
        (
            "empty key",
            valid.clone().with(|s| s.kvs[1] = kv_u32("", 2)).bytes(),
            |e| matches!(e, E::EmptyKey { .. }),
            "metadata key #1",
        ),
        (
            "alignment not a power of two",
            valid
                .clone()
                .with(|s| s.kvs.push(kv_u32("general.alignment", 48)))
                .bytes(),
            |e| matches!(e, E::BadAlignment { .. }),
            "power of two, found u32 U32(48)",
        ),
        (
            "alignment zero",
            valid
                .clone()
                .with(|s| s.kvs.push(kv_u32("general.alignment", 0)))
                .bytes(),
            |e| matches!(e, E::BadAlignment { .. }),
            "found u32 U32(0)",
        ),
        (
            "alignment of the wrong type",
            valid
                .clone()
                .with(|s| {
                    s.kvs
                        .push(kv("general.alignment", 10, &32u64.to_le_bytes()))
                })
                .bytes(),
            |e| matches!(e, E::BadAlignment { .. }),
            "found u64",
        ),
        (
            "truncation caught by the up-front count check",
            vb[..header_len + 3].to_vec(),
            |e| matches!(e, E::TooLong { .. }),
            "tensor count at byte 8 is 2, which needs at least 48 bytes but only 3 remain",
        ),
        (
            "truncated inside the tensor infos",
            vb[..tensors_start + valid.tensors[0].len() + 5].to_vec(),
            |e| matches!(e, E::TooLong { .. } | E::Truncated { .. }),
            "tensor #1",
        ),
        (
            "truncated at a tensor's offset field",
            vb[..tensors_start + valid.tensors[0].len() - 4].to_vec(),
            |e| matches!(e, E::Truncated { .. }),
            "offset of tensor 'a'",
        ),
        (
            "unknown tensor type",
            valid
                .clone()
                .with(|s| s.tensors[1] = ti("b", &[32, 2], 43, 256))
                .bytes(),
            |e| matches!(e, E::UnknownTensorType { type_id: 43, .. }),
            "tensor 'b' has unknown ggml type 43",
        ),
        (
            "removed tensor type",
            valid
                .clone()
                .with(|s| s.tensors[1] = ti("b", &[32, 2], 31, 256))
                .bytes(),
            |e| matches!(e, E::UnknownTensorType { type_id: 31, .. }),
            "unknown ggml type 31",
        ),
        (
            "too many dims",
            valid
                .clone()
                .with(|s| s.tensors[0] = ti("a", &[64, 1, 1, 1, 1], 0, 0))
                .bytes(),
            |e| matches!(e, E::TooManyDims { n_dims: 5, .. }),
            "tensor 'a' has 5 dimensions",
        ),
        (
            "huge n_dims",
            valid
                .clone()
                .with(|s| s.tensors[0] = ti_raw(&raw_str(b"a"), u32::MAX, &[], 0, 0))
                .bytes(),
            |e| matches!(e, E::TooManyDims { .. }),
            "tensor 'a' has 4294967295 dimensions",
        ),
        (
            "zero dim",
            valid
                .clone()
                .with(|s| s.tensors[1] = ti("b", &[32, 0], 8, 256))
                .bytes(),
            |e| matches!(e, E::ZeroDim { index: 1, .. }),
            "tensor 'b' has dimension 1 of size 0",
        ),
        (
            "element count overflow",
            valid
                .clone()
                .with(|s| s.tensors[1] = ti("b", &[1 << 32, 1 << 32], 0, 256))
                .bytes(),
            |e| matches!(e, E::ShapeOverflow { .. }),
            "tensor 'b' with dims [4294967296, 4294967296] overflows",
        ),
        (
            "byte size overflow",
            valid
                .clone()
                .with(|s| s.tensors[1] = ti("b", &[1 << 31, 1 << 31], 0, 256))
                .bytes(),
            |e| matches!(e, E::ShapeOverflow { .. }),
            "tensor 'b'",
        ),
        (
            "row not a block multiple",
            valid
                .clone()
                .with(|s| s.tensors[1] = ti("b", &[33, 2], 8, 256))
                .bytes(),
            |e| matches!(e, E::RowNotBlockMultiple { ne0: 33, .. }),
            "tensor 'b': row of 33 elements is not a multiple of the q8_0 block size 32",
        ),
        (
            "misaligned offset",
            valid
                .clone()
                .with(|s| s.tensors[1] = ti("b", &[32, 2], 8, 264))
                .bytes(),
            |e| matches!(e, E::MisalignedTensor { offset: 264, .. }),
            "tensor 'b' offset 264 is not a multiple of the alignment 32",
        ),
        (
            "overlapping tensors",
            valid
                .clone()
                .with(|s| s.tensors[1] = ti("b", &[32, 2], 8, 224))
                .bytes(),
            |e| matches!(e, E::OverlappingTensors { .. }),
            "tensors 'a' [0, 256) and 'b' starting at 224 overlap",
        ),
        (
            "duplicate tensor name",
            valid
                .clone()
                .with(|s| s.tensors[1] = ti("a", &[32, 2], 8, 256))
                .bytes(),
            |e| matches!(e, E::DuplicateTensor { .. }),
            "duplicate tensor name 'a'",
        ),
        (
            "tensor name too long",
            valid
                .clone()
                .with(|s| s.tensors[1] = ti(&"n".repeat(64), &[32, 2], 8, 256))
                .bytes(),
            |e| matches!(e, E::TensorNameTooLong { len: 64, .. }),
            "is 64 bytes, the limit is 63",
        ),
        (
            "tensor name not UTF-8",
            valid
                .clone()
                .with(|s| s.tensors[1] = ti_raw(&raw_str(b"\xff"), 1, &[32], 0, 256))
                .bytes(),
            |e| matches!(e, E::InvalidUtf8 { .. }),
            "name of tensor #1",
        ),
        (
            "tensor data past the end of the file",
            valid.clone().with(|s| s.data_len = 256 + 67).bytes(),
            |e| matches!(e, E::TensorPastEof { .. }),
            "tensor 'b' data",
        ),
        (
            "tensor offset near u64::MAX",
            valid
                .clone()
                .with(|s| s.tensors[1] = ti("b", &[32, 2], 8, u64::MAX - 31))
                .bytes(),
            |e| matches!(e, E::TensorPastEof { .. }),
            "extends past the end of the file",
        ),
        (
            "no data section at all",
            vb[..tensors_start + valid.tensors.iter().map(Vec::len).sum::<usize>()].to_vec(),
            |e| matches!(e, E::TensorPastEof { .. }),
            "tensor 'a' data",
        ),
    ];
    for (name, bytes, variant, fragment) in &cases {
        eprintln!("case: {name}");
        check(bytes, *variant, fragment);
    }
}

#[test]
fn open_names_the_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("broken.gguf");
    std::fs::write(&p, b"GGUF\x01\x00\x00\x00").expect("write");
    let e = GgufFile::open(&p).expect_err("v1");
    assert!(e.to_string().starts_with(&p.display().to_string()), "{e}");
    assert_eq!(e.path(), p);
    let missing = dir.path().join("missing.gguf");
    let e = GgufFile::open(&missing).expect_err("missing");
    assert!(matches!(e, GgufError::Io { .. }));
    assert!(e.to_string().contains("missing.gguf"), "{e}");
    let ok = dir.path().join("ok.gguf");
    std::fs::write(&ok, Spec::valid().bytes()).expect("write");
    let f = GgufFile::open(&ok).expect("valid file from disk");
    assert_eq!(f.path, ok);
    assert_eq!(f.file_size, Spec::valid().bytes().len() as u64);
}

/// Applies one random mutation: byte flips, truncation, insertion, deletion, or a
/// "interesting" 8-byte value written over a random spot.
fn mutate(rng: &mut Rng, base: &[u8]) -> Vec<u8> {
    let mut v = base.to_vec();
    let pick = |rng: &mut Rng, n: usize| (rng.next_u64() % n.max(1) as u64) as usize;
    let rounds = 1 + pick(rng, 4);
    for _ in 0..rounds {
        match pick(rng, 5) {
            0 => {
                let i = pick(rng, v.len());
                if let Some(b) = v.get_mut(i) {
                    *b = rng.next_u64() as u8;
                }
            }
            1 => {
                let n = pick(rng, v.len() + 1);
                v.truncate(n);
            }
            2 => {
                let i = pick(rng, v.len() + 1);
                let b = rng.next_u64() as u8;
                v.insert(i.min(v.len()), b);
            }
            3 => {
                if !v.is_empty() {
                    let i = pick(rng, v.len());
                    v.remove(i);
                }
            }
            _ => {
                const INTERESTING: [u64; 8] = [0, 1, 4, 0x7f, 1 << 31, 1 << 32, 1 << 63, u64::MAX];
                let x = INTERESTING[pick(rng, INTERESTING.len())].to_le_bytes();
                let i = pick(rng, v.len());
                for (k, b) in x.iter().enumerate() {
                    if let Some(d) = v.get_mut(i + k) {
                        *d = *b;
                    }
                }
            }
        }
    }
    v
}

/// Invariants every successfully parsed file keeps.
fn check_invariants(f: &GgufFile) {
    assert!(f.alignment.is_power_of_two());
    assert_eq!(f.data_offset % f.alignment, 0);
    for t in &f.tensors {
        assert!(
            f.data_offset + t.offset + t.size <= f.file_size,
            "{}",
            t.name
        );
        assert_eq!(t.offset % f.alignment, 0);
    }
}

#[test]
fn mutations_never_panic() {
    // A hand-built file, and the real header of a synthetic model (parsed with the file
    // size its tensors need, so only the header bytes are held in memory).
    let small = Spec::valid().with(|s| {
        s.kvs.push(kv("f", 6, &1.0f32.to_le_bytes()));
        s.kvs.push(kv(
            "n",
            9,
            &arr(9, 1, &arr(5, 2, &[1, 0, 0, 0, 2, 0, 0, 0])),
        ));
    });
    let mut cfg = SynthConfig::preset(Preset::Tiny);
    cfg.layers = 1;
    cfg.vocab = 512;
    let (_, lay) = synth::layout(&cfg).expect("layout");
    let inputs: Vec<(Vec<u8>, u64)> = vec![
        {
            let b = small.bytes();
            let n = b.len() as u64;
            (b, n)
        },
        (lay.header.clone(), lay.file_size),
    ];
    for (b, size) in &inputs {
        // The unmutated inputs parse.
        let f = GgufFile::from_reader(Cursor::new(b), *size, Path::new("m.gguf")).expect("base");
        check_invariants(&f);
    }
    let mut rng = Rng::new(0x5eed);
    let (mut ok, mut err) = (0, 0);
    for i in 0..6000 {
        let (base, size) = &inputs[i % inputs.len()];
        let m = mutate(&mut rng, base);
        // For the synthetic header, keep the stated file size (truncations then look like
        // a header cut short inside a longer file); for the small file, use its length.
        let size = if i % 2 == 0 { m.len() as u64 } else { *size };
        match GgufFile::from_reader(Cursor::new(&m), size, Path::new("m.gguf")) {
            Ok(f) => {
                ok += 1;
                check_invariants(&f);
                let _ = ModelInfo::from_gguf(&f);
            }
            Err(e) => {
                err += 1;
                assert!(e.to_string().starts_with("m.gguf: "), "{e}");
            }
        }
    }
    eprintln!("mutations: {ok} parsed, {err} rejected");
    assert!(
        err > 1000,
        "mutations should mostly be rejected: {ok} ok, {err} errors"
    );
}

// ---------- ModelInfo ----------

fn moe_spec() -> Spec {
    moe_spec_of("m")
}

fn moe_spec_of(arch: &str) -> Spec {
    // 2 layers, 4 experts; layer 1 has a fused gate_up plus down; layer 0 gate/up/down.
    let f32_ = 0;
    let q8 = 8;
    let mut tensors = Vec::new();
    let mut off = 0u64;
    let mut add = |name: &str, dims: &[u64], ty: u32, bytes: u64| {
        tensors.push(ti(name, dims, ty, off));
        off += bytes.div_ceil(32) * 32;
    };
    add("token_embd.weight", &[64, 10], q8, 68 * 10);
    add("blk.0.ffn_gate_exps.weight", &[64, 32, 4], q8, 68 * 32 * 4);
    add("blk.0.ffn_up_exps.weight", &[64, 32, 4], q8, 68 * 32 * 4);
    add("blk.0.ffn_down_exps.weight", &[32, 64, 4], q8, 34 * 64 * 4);
    add(
        "blk.1.ffn_gate_up_exps.weight",
        &[64, 64, 4],
        q8,
        68 * 64 * 4,
    );
    add("blk.1.ffn_down_exps.weight", &[32, 64, 4], q8, 34 * 64 * 4);
    add("blk.1.ffn_down_exps.scale", &[4], f32_, 16);
    let data_len = off;
    Spec {
        magic: *b"GGUF",
        version: 3,
        n_tensors: None,
        n_kv: None,
        kvs: vec![
            kv_str("general.architecture", arch),
            kv_str("general.name", "moe test"),
            kv_u32(&format!("{arch}.block_count"), 2),
            kv_u32(&format!("{arch}.embedding_length"), 64),
            kv_u32(&format!("{arch}.context_length"), 1024),
            kv(
                &format!("{arch}.attention.head_count"),
                9,
                &arr(4, 2, &[4, 0, 0, 0, 8, 0, 0, 0]),
            ),
            kv_u32(&format!("{arch}.attention.head_count_kv"), 2),
            kv_u32(&format!("{arch}.expert_count"), 4),
            kv_u32(&format!("{arch}.expert_used_count"), 2),
        ],
        tensors,
        alignment: 32,
        data_len,
    }
}

#[test]
fn model_info_of_an_moe_file() {
    let f = GgufFile::parse_bytes(&moe_spec().bytes()).expect("parses");
    let m = ModelInfo::from_gguf(&f).expect("summary");
    assert_eq!(m.arch, "m");
    assert_eq!(m.name.as_deref(), Some("moe test"));
    assert_eq!(m.block_count, 2);
    assert_eq!(m.n_embd, 64);
    assert_eq!(m.n_head, 8, "max over the per-layer array");
    assert_eq!(m.n_head_kv, 2);
    assert_eq!(m.context_length, 1024);
    assert_eq!(m.expert_count, 4);
    assert_eq!(m.expert_used_count, 2);
    assert!(m.is_moe());
    // Layer 0: gate 68*32 + up 68*32 + down 34*64 bytes per expert.
    assert_eq!(
        m.expert_bytes_per_layer.get(&0),
        Some(&(68 * 32 * 2 + 34 * 64))
    );
    // Layer 1: gate_up 68*64 + down 34*64 bytes per expert; its per-expert scale (4 bytes
    // each) stays in memory with the other weights, so it is not expert data.
    assert_eq!(m.expert_bytes_per_layer.get(&1), Some(&(68 * 64 + 34 * 64)));
    assert_eq!(m.total_bytes, f.tensor_bytes());
    assert_eq!(m.non_expert_bytes, 680 + 4 * 4);
    assert_eq!(m.expert_bytes, m.total_bytes - 680 - 4 * 4);
    // KV: per layer 2 (K,V) * 2 bytes * n_head_kv 2 * head dim (64/4 = 16, then 64/8 = 8).
    assert_eq!(m.kv_bytes_per_token_f16, 2 * 2 * 2 * 16 + 2 * 2 * 2 * 8);
}

/// Sliding-window layers as llama.cpp picks them: the architecture's default pattern
/// (gpt-oss: every other layer from the first; cohere2moe: all but the first of every
/// four), a pattern length or per-layer flags in the file, nothing without a window or
/// for an architecture the daemon does not know. KV per token: layer 0 128 bytes,
/// layer 1 64 (see `model_info_of_an_moe_file`).
#[test]
fn sliding_window_layers_follow_the_architectures_pattern() {
    let info = |arch: &str, extra: Vec<Vec<u8>>| {
        let spec = moe_spec_of(arch).with(|s| s.kvs.extend(extra));
        let f = GgufFile::parse_bytes(&spec.bytes()).expect("parses");
        ModelInfo::from_gguf(&f)
    };
    let window = |arch: &str| kv_u32(&format!("{arch}.attention.sliding_window"), 128);
    // (and the number of sliding-window layers, checked against the bytes: layer 0
    // holds 128 bytes per token, layer 1 64)
    let swa = |m: ModelInfo| {
        let bytes = [0, 128, 192][m.swa_layers as usize];
        assert!(
            m.kv_swa_bytes_per_token_f16 <= bytes,
            "{} layers",
            m.swa_layers
        );
        (m.sliding_window, m.kv_swa_bytes_per_token_f16)
    };
    assert_eq!(
        swa(info("gpt-oss", vec![window("gpt-oss")]).unwrap()),
        (128, 128)
    );
    assert_eq!(swa(info("gpt-oss", vec![]).unwrap()), (0, 0), "no window");
    assert_eq!(
        swa(info("m", vec![window("m")]).unwrap()),
        (128, 0),
        "unknown layout: the window alone"
    );
    assert_eq!(
        swa(info("cohere2moe", vec![window("cohere2moe")]).unwrap()),
        (128, 64),
        "the first of every four attends to the whole context"
    );
    // gemma3's default: five of every six (both of these two layers)
    assert_eq!(
        swa(info("gemma3", vec![window("gemma3")]).unwrap()),
        (128, 192)
    );
    // an architecture without sliding windows ignores the key, whatever it holds
    let odd = kv_str("m.attention.sliding_window", "wide");
    assert_eq!(swa(info("m", vec![odd]).unwrap()), (0, 0));
    // a pattern length of 1: no layer slides
    let one = kv_u32("gpt-oss.attention.sliding_window_pattern", 1);
    assert_eq!(
        swa(info("gpt-oss", vec![window("gpt-oss"), one]).unwrap()).1,
        0
    );
    // per-layer flags (GGUF bool = type 7)
    let flags = kv(
        "gemma3.attention.sliding_window_pattern",
        9,
        &arr(7, 2, &[0, 1]),
    );
    assert_eq!(
        swa(info("gemma3", vec![window("gemma3"), flags]).unwrap()),
        (128, 64)
    );
    // ... or integers (u32 = type 4; non-zero slides)
    let ints = kv(
        "gemma3.attention.sliding_window_pattern",
        9,
        &arr(4, 2, &[1, 0, 0, 0, 0, 0, 0, 0]),
    );
    assert_eq!(
        swa(info("gemma3", vec![window("gemma3"), ints]).unwrap()),
        (128, 128)
    );
    let bad = kv_str("gemma3.attention.sliding_window_pattern", "every other");
    let e = info("gemma3", vec![window("gemma3"), bad]).expect_err("a string");
    assert!(
        e.to_string()
            .contains("'gemma3.attention.sliding_window_pattern': expected a pattern length"),
        "{e}"
    );
}

#[test]
fn mtp_blocks_are_neither_expert_nor_resident_data() {
    // Layer 1 as a multi-token-prediction block (as GLM-4.5 and DeepSeek-V3 files carry
    // after their last layer): llama.cpp loads it only for MTP speculative decoding.
    let spec = moe_spec().with(|s| s.kvs.push(kv_u32("m.nextn_predict_layers", 1)));
    let f = GgufFile::parse_bytes(&spec.bytes()).expect("parses");
    let m = ModelInfo::from_gguf(&f).expect("summary");
    assert_eq!(m.block_count, 2);
    assert_eq!(m.nextn_layers, 1);
    assert_eq!(m.nextn_bytes, 68 * 64 * 4 + 34 * 64 * 4 + 16);
    assert_eq!(
        m.expert_bytes_per_layer.keys().copied().collect::<Vec<_>>(),
        vec![0]
    );
    assert_eq!(m.expert_bytes, (68 * 32 * 2 + 34 * 64) * 4);
    assert_eq!(m.non_expert_bytes, 680);
    assert_eq!(
        m.total_bytes,
        m.expert_bytes + m.non_expert_bytes + m.nextn_bytes
    );
    // the KV cache of layer 0 only
    assert_eq!(m.kv_bytes_per_token_f16, 2 * 2 * 2 * 16);
    // a file of MTP blocks only is a draft head, not a model to serve
    let spec = moe_spec().with(|s| s.kvs.push(kv_u32("m.nextn_predict_layers", 2)));
    let f = GgufFile::parse_bytes(&spec.bytes()).expect("parses");
    let e = ModelInfo::from_gguf(&f).expect_err("only MTP blocks");
    assert!(e.to_string().contains("all 2 blocks are MTP blocks"), "{e}");
    // more MTP blocks than layers is a corrupt header
    let spec = moe_spec().with(|s| s.kvs.push(kv_u32("m.nextn_predict_layers", 3)));
    let f = GgufFile::parse_bytes(&spec.bytes()).expect("parses");
    let e = ModelInfo::from_gguf(&f).expect_err("3 of 2 layers");
    assert!(
        e.to_string()
            .contains("'m.nextn_predict_layers': 3 MTP blocks but block_count is 2"),
        "{e}"
    );
}

#[test]
fn model_info_errors_name_the_key() {
    let drop_key = |key: &str| {
        let enc = s(key);
        moe_spec().with(|sp| sp.kvs.retain(|k| !k.starts_with(&enc)))
    };
    let cases: Vec<(Spec, &str)> = vec![
        (
            drop_key("general.architecture"),
            "missing metadata key 'general.architecture'",
        ),
        (
            drop_key("m.block_count"),
            "missing metadata key 'm.block_count'",
        ),
        (
            drop_key("m.embedding_length"),
            "missing metadata key 'm.embedding_length'",
        ),
        (
            drop_key("m.attention.head_count"),
            "missing metadata key 'm.attention.head_count'",
        ),
        (
            drop_key("m.expert_used_count"),
            "missing metadata key 'm.expert_used_count'",
        ),
        (drop_key("m.expert_count"), "expert_count is absent or 0"),
        (
            moe_spec().with(|s| s.kvs[2] = kv_str("m.block_count", "two")),
            "metadata key 'm.block_count': expected a non-negative integer, found string",
        ),
        (
            moe_spec().with(|s| s.kvs[8] = kv_u32("m.expert_used_count", 5)),
            "5 experts used per token, must be in 1..=4",
        ),
        (
            moe_spec().with(|s| s.kvs[7] = kv_u32("m.expert_count", 8)),
            "last dimension is 4",
        ),
        (
            moe_spec().with(|s| s.kvs[2] = kv_u32("m.block_count", 1)),
            "layer 1 but block_count is 1",
        ),
        // Sizes beyond any real model: a corrupt header, not a plan of absurd numbers
        // (or 4 billion layers to sum the KV cache over).
        (
            moe_spec().with(|s| s.kvs[2] = kv_u32("m.block_count", u32::MAX)),
            "metadata key 'm.block_count': 4294967295 is beyond any real model",
        ),
        (
            moe_spec().with(|s| s.kvs[3] = kv_u32("m.embedding_length", 1 << 30)),
            "metadata key 'm.embedding_length': 1073741824 is beyond any real model",
        ),
    ];
    for (spec, fragment) in cases {
        let f = GgufFile::parse_bytes(&spec.bytes()).expect("header itself is valid");
        let e = ModelInfo::from_gguf(&f).expect_err(fragment);
        let msg = e.to_string();
        assert!(msg.starts_with("<memory>: "), "{msg}");
        assert!(msg.contains(fragment), "{msg:?} lacks {fragment:?}");
    }
}

#[test]
fn dense_model_info() {
    let spec = Spec::valid().with(|s| {
        s.kvs = vec![
            kv_str("general.architecture", "llama"),
            kv_u32("llama.block_count", 2),
            kv_u32("llama.embedding_length", 128),
            kv_u32("llama.context_length", 512),
            kv_u32("llama.attention.head_count", 4),
            kv_u32("llama.attention.key_length", 64),
            kv_u32("llama.attention.value_length", 32),
        ];
    });
    let f = GgufFile::parse_bytes(&spec.bytes()).expect("parses");
    let m = ModelInfo::from_gguf(&f).expect("summary");
    assert!(!m.is_moe());
    assert_eq!(m.expert_used_count, 0);
    assert!(m.expert_bytes_per_layer.is_empty());
    assert_eq!(m.n_head_kv, 4, "defaults to n_head");
    // 2 layers * 4 kv heads * (64 + 32) * 2 bytes.
    assert_eq!(m.kv_bytes_per_token_f16, 2 * 4 * 96 * 2);
    assert_eq!(m.non_expert_bytes, m.total_bytes);
}
