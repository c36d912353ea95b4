//! A short read-bandwidth probe of the disk that holds the model, cached in the state dir.
//!
//! Reads up to [`PROBE_BYTES`] of the model file in 1 MiB blocks spread over the file with
//! `O_DIRECT` (so the page cache does not flatter the result; falls back to buffered
//! reads where the filesystem refuses `O_DIRECT`, and says so), stopping after
//! [`PROBE_TIME`]. A result read with `O_DIRECT` is cached per (device, file, size) for
//! [`CACHE_TTL_SECS`]; a buffered one is not (it may have read the page cache, so it
//! says how warm the file was, not how fast the disk is, and is measured again next time;
//! the probe drops what its buffered reads brought into the page cache, so that the next
//! one is not flattered by its own leftovers).

use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::DiskProbe;

/// Upper bound of bytes one probe reads.
pub const PROBE_BYTES: u64 = 64 << 20;
/// Upper bound of time one probe takes.
pub const PROBE_TIME: Duration = Duration::from_millis(1500);
/// How long a cached result is trusted.
pub const CACHE_TTL_SECS: u64 = 7 * 24 * 3600;
const BLOCK: usize = 1 << 20;
const ALIGN: usize = 4096;
const CACHE_FILE: &str = "disk-probe.json";

#[derive(Debug, Serialize, Deserialize)]
struct CacheEntry {
    device: u64,
    path: PathBuf,
    size: u64,
    measured_at: u64,
    probe: DiskProbe,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The cached result for `model`, or a fresh measurement (then cached). `None` when the
/// file cannot be read at all.
pub fn probe_cached(model: &Path, state_dir: &Path) -> Option<DiskProbe> {
    probe_cached_with(model, state_dir, measure)
}

/// [`probe_cached`] with the measurement given (tests).
fn probe_cached_with(
    model: &Path,
    state_dir: &Path,
    measure: impl FnOnce(&Path) -> std::io::Result<DiskProbe>,
) -> Option<DiskProbe> {
    let meta = std::fs::metadata(model).ok()?;
    let cache = state_dir.join(CACHE_FILE);
    if let Ok(text) = std::fs::read(&cache)
        && let Ok(e) = serde_json::from_slice::<CacheEntry>(&text)
        && e.device == meta.dev()
        && e.path == model
        && e.size == meta.len()
        && now_secs().saturating_sub(e.measured_at) < CACHE_TTL_SECS
    {
        let mut p = e.probe;
        p.cached = true;
        return Some(p);
    }
    let probe = measure(model).ok()?;
    if !probe.direct {
        return Some(probe);
    }
    let entry = CacheEntry {
        device: meta.dev(),
        path: model.to_path_buf(),
        size: meta.len(),
        measured_at: now_secs(),
        probe: probe.clone(),
    };
    if let Ok(text) = serde_json::to_vec_pretty(&entry)
        && let Err(e) = crate::probe::write_atomic(&cache, &text)
    {
        tracing::warn!("cannot cache the disk probe in {}: {e}", cache.display());
    }
    Some(probe)
}

/// Measures read bandwidth on `path` now.
pub fn measure(path: &Path) -> std::io::Result<DiskProbe> {
    let (mut file, direct) = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
        .open(path)
    {
        Ok(f) => (f, true),
        Err(_) => (std::fs::File::open(path)?, false),
    };
    let size = file.metadata()?.len();
    let mut storage = vec![0u8; BLOCK + ALIGN];
    let start_at = storage.as_ptr().align_offset(ALIGN).min(ALIGN);
    let buf = &mut storage[start_at..start_at + BLOCK];
    let blocks_in_file = (size / BLOCK as u64).max(1);
    let want = (PROBE_BYTES / BLOCK as u64).min(blocks_in_file);
    // Spread the reads over the file: a stride that is coprime-ish with the block count.
    let stride = (blocks_in_file / want).max(1);
    let block_offset = |i: u64| ((i * stride) % blocks_in_file) * BLOCK as u64;
    let t0 = Instant::now();
    let mut read = 0u64;
    let mut direct_ok = direct;
    for i in 0..want {
        let offset = block_offset(i);
        let n = match file.read_at(buf, offset) {
            Ok(n) => n,
            Err(e) if direct_ok && e.raw_os_error() == Some(22) => {
                // EINVAL: the filesystem takes O_DIRECT at open but not for this read.
                direct_ok = false;
                file = std::fs::File::open(path)?;
                file.read_at(buf, offset)?
            }
            Err(e) => return Err(e),
        };
        read += n as u64;
        if t0.elapsed() > PROBE_TIME {
            break;
        }
    }
    let secs = t0.elapsed().as_secs_f64().max(1e-6);
    if !direct_ok {
        // Buffered reads left these blocks in the page cache: drop them (pages mapped by
        // a running engine stay), so that the next probe, which reads the same blocks,
        // measures the disk again and not this probe's leftovers. A hint: errors ignored.
        for i in 0..want {
            let _ = rustix::fs::fadvise(
                &file,
                block_offset(i),
                std::num::NonZeroU64::new(BLOCK as u64),
                rustix::fs::Advice::DontNeed,
            );
        }
    }
    Ok(DiskProbe {
        read_bytes_per_sec: (read as f64 / secs) as u64,
        bytes_read: read,
        direct: direct_ok,
        cached: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(direct: bool) -> DiskProbe {
        DiskProbe {
            read_bytes_per_sec: 1 << 30,
            bytes_read: 64 << 20,
            direct,
            cached: false,
        }
    }

    #[test]
    fn a_direct_result_is_cached_and_a_buffered_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("model.gguf");
        std::fs::write(&model, vec![0u8; 4096]).unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir(&state).unwrap();

        // Buffered reads may have come from the page cache: used once, never cached.
        let p = probe_cached_with(&model, &state, |_| Ok(probe(false))).unwrap();
        assert!(!p.direct && !p.cached);
        assert!(
            !state.join(CACHE_FILE).exists(),
            "a buffered probe was cached"
        );
        let p = probe_cached_with(&model, &state, |_| Ok(probe(true))).unwrap();
        assert!(p.direct && !p.cached, "measured again");

        // O_DIRECT reads: cached, and the next call does not measure.
        let p = probe_cached_with(&model, &state, |_| panic!("measured again")).unwrap();
        assert!(p.direct && p.cached);
        assert_eq!(p.read_bytes_per_sec, 1 << 30);
    }
}
