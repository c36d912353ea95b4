//! Shared helpers of the pool's integration tests: synthetic "GGUF-like" model files
//! whose expert tensors start at 32-byte aligned (not page aligned) offsets.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use expert_pool::{LayerSpec, Pool, PoolConfig, ProjSpec};

/// One projection's tensor in a test model.
#[derive(Debug, Clone, Copy)]
pub struct TensorLayout {
    /// Absolute offset of expert 0.
    pub offset: u64,
    /// Bytes per expert (= stride: experts are contiguous, as in GGUF).
    pub bytes: u64,
}

/// A test model file: `layers` layers of `n_proj` projections of `n_experts` experts.
#[derive(Debug, Clone)]
pub struct TestModel {
    pub path: PathBuf,
    pub n_experts: u32,
    /// [layer][proj]
    pub tensors: Vec<Vec<TensorLayout>>,
    pub bytes: Vec<u8>,
}

/// Q4_K-like expert: rows of `cols / 256` blocks of 144 bytes.
pub fn q4k_bytes(cols: u64, rows: u64) -> u64 {
    cols / 256 * 144 * rows
}

/// Q8_0-like expert: rows of `cols / 32` blocks of 34 bytes.
pub fn q8_0_bytes(cols: u64, rows: u64) -> u64 {
    cols / 32 * 34 * rows
}

/// Deterministic pseudo-random bytes.
pub fn fill_random(buf: &mut [u8], seed: u64) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

/// A directory on a real disk (not tmpfs), for O_DIRECT.
pub fn disk_dir() -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("expert-pool-tests");
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Writes a model with `layers` layers; `proj_bytes` gives each projection's expert
/// size. The data section starts at 4096 + 96 (32-aligned, not page-aligned), and each
/// tensor is padded to 32 bytes, as GGUF does.
pub fn write_model(
    name: &str,
    layers: usize,
    n_experts: u32,
    proj_bytes: &[u64],
    seed: u64,
) -> TestModel {
    write_model_at(name, layers, n_experts, proj_bytes, seed, 4096 + 96)
}

/// Like [`write_model`], with the first tensor at byte `first` (later ones follow at
/// 32-byte aligned offsets).
pub fn write_model_at(
    name: &str,
    layers: usize,
    n_experts: u32,
    proj_bytes: &[u64],
    seed: u64,
    first: u64,
) -> TestModel {
    static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = disk_dir().join(format!("{name}.{}.{n}", std::process::id()));
    let mut off = first;
    let mut tensors = Vec::new();
    for _ in 0..layers {
        let mut t = Vec::new();
        for &b in proj_bytes {
            t.push(TensorLayout {
                offset: off,
                bytes: b,
            });
            off += b * u64::from(n_experts);
            off = off.div_ceil(32) * 32;
        }
        tensors.push(t);
    }
    let mut bytes = vec![0u8; off as usize + 1000];
    fill_random(&mut bytes, seed);
    let tmp = PathBuf::from(format!("{}.tmp", path.display()));
    std::fs::write(&tmp, &bytes).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    TestModel {
        path,
        n_experts,
        tensors,
        bytes,
    }
}

impl TestModel {
    /// The file bytes of projection `proj` of `expert` in `layer`.
    pub fn expert(&self, layer: usize, proj: usize, expert: u32) -> &[u8] {
        let t = self.tensors[layer][proj];
        let start = (t.offset + u64::from(expert) * t.bytes) as usize;
        &self.bytes[start..start + t.bytes as usize]
    }

    /// Projection specs of `layer` for file id `file`.
    pub fn specs(&self, layer: usize, file: u32) -> Vec<ProjSpec> {
        self.tensors[layer]
            .iter()
            .map(|t| ProjSpec {
                file,
                offset: t.offset,
                stride: t.bytes,
                bytes: t.bytes,
            })
            .collect()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A pool with `cfg` and this file's two layers registered: model layer `i` as pool
    /// layer `ids[i]`, with `n_experts` experts and `slots[i]` slots.
    pub fn pool(&self, cfg: PoolConfig, ids: [i32; 2], n_experts: u32, slots: [u32; 2]) -> Pool {
        let pool = Pool::new(cfg).unwrap();
        let f = pool.add_file(self.path()).unwrap();
        for i in 0..2 {
            pool.add_layer(
                &LayerSpec {
                    layer: ids[i],
                    n_experts,
                    n_slots: slots[i],
                    projs: self.specs(i, f),
                },
                None,
            )
            .unwrap();
        }
        pool
    }
}

impl Drop for TestModel {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Asserts that `slots[j]` of pool layer `layer` holds the file's bytes of `experts[j]`
/// of model layer `model_layer`, every projection (memory sinks only).
pub fn assert_slots_hold(
    pool: &Pool,
    layer: i32,
    m: &TestModel,
    model_layer: usize,
    slots: &[i32],
    experts: &[u32],
    what: &str,
) {
    for (&slot, &e) in slots.iter().zip(experts) {
        for p in 0..m.tensors[model_layer].len() {
            assert!(
                pool.slot_bytes(layer, p, slot as u32).unwrap().unwrap()
                    == m.expert(model_layer, p, e),
                "{what}: expert {e} proj {p}: bytes differ"
            );
        }
    }
}

/// A small deterministic generator (xorshift64) for the randomized fault tests.
pub struct XorShift(u64);

impl XorShift {
    /// A generator for `seed` (any value; 0 is mapped to a nonzero state).
    pub fn new(seed: u64) -> XorShift {
        XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number in 0..n (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// A completion fault: retried errnos (EINTR, EAGAIN), a hard error (EIO), EINVAL (an
    /// O_DIRECT read at an unaligned point falls back to buffered), or a short read of a
    /// few bytes, whole pages, or 100 bytes.
    pub fn fault(&mut self) -> expert_pool::io::Fault {
        use expert_pool::io::Fault;
        match self.below(7) {
            0 => Fault::Errno(libc::EINTR),
            1 => Fault::Errno(libc::EAGAIN),
            2 => Fault::Errno(libc::EIO),
            3 => Fault::Errno(libc::EINVAL),
            4 => Fault::Short(1 + self.below(4096) as usize),
            5 => Fault::Short(4096 * (1 + self.below(64) as usize)),
            _ => Fault::Short(100),
        }
    }
}

/// How many seeds a randomized test runs: `FUZZ_SEEDS` from the environment, else `default`.
pub fn fuzz_seeds(default: u64) -> u64 {
    std::env::var("FUZZ_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}
