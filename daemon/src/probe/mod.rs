//! Probe: what the planner needs to know about the model and the host, as one plain,
//! serialisable [`Snapshot`] (tests replay recorded snapshots from `daemon/testdata/`).
//!
//! Sources: the GGUF header through [`crate::gguf`]; RAM and cores from sysinfo and the
//! cgroup limits ([`cgroup`]); GPUs from NVML ([`gpu`], absent NVML is a normal result);
//! disk read bandwidth from a short, cached probe ([`disk`]).
//!
//! Invariants: only the model is required: a host part that cannot be read is recorded as
//! unknown, never an error. Probing is blocking I/O (run it off the async runtime).

pub mod cgroup;
pub mod disk;
pub mod gpu;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::{Config, ModelSource};
use crate::gguf::{GgufModel, ModelInfo};

/// Everything the planner looks at.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub model: ModelProbe,
    pub host: HostProbe,
    #[serde(default)]
    pub gpus: Vec<GpuProbe>,
    /// Why `gpus` is empty (no NVML, no GPU), if it is.
    #[serde(default)]
    pub gpu_note: Option<String>,
    /// `None` when the disk could not be probed.
    #[serde(default)]
    pub disk: Option<DiskProbe>,
    /// The daemon's `CUDA_VISIBLE_DEVICES`, which the engine inherits unless `engine.env`
    /// sets it: NVML lists every GPU, CUDA only these.
    #[serde(default)]
    pub cuda_visible_devices: Option<String>,
}

/// The model file and its header summary.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelProbe {
    /// The file the engine is given (the first split of a split model).
    pub path: PathBuf,
    /// Bytes of all the model's files.
    pub file_size: u64,
    /// Every file of a split model, the first one first; empty for a model in one file.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub splits: Vec<PathBuf>,
    /// Summary over all the files.
    pub info: ModelInfo,
}

/// Host memory and CPUs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HostProbe {
    /// Physical RAM, bytes.
    pub total_ram: u64,
    /// RAM available now (informative; plans use totals, which do not move when the
    /// engine itself takes memory).
    pub available_ram: u64,
    /// The cgroup memory limit in force, if any.
    #[serde(default)]
    pub cgroup_memory_limit: Option<u64>,
    /// 1 or 2, when a cgroup hierarchy was found.
    #[serde(default)]
    pub cgroup_version: Option<u8>,
    pub logical_cores: u32,
    pub physical_cores: u32,
    /// CPUs this process may use (affinity and cgroup quota), as std reports them.
    pub usable_cores: u32,
}

/// One GPU.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GpuProbe {
    pub index: u32,
    pub name: String,
    pub total_memory: u64,
    pub free_memory: u64,
    /// Peak memory bandwidth, bytes/s, from bus width and memory clock.
    #[serde(default)]
    pub memory_bandwidth: Option<u64>,
    /// Peak host link bandwidth, bytes/s, from PCIe generation and width.
    #[serde(default)]
    pub pcie_bandwidth: Option<u64>,
}

/// Disk read bandwidth on the model's file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DiskProbe {
    pub read_bytes_per_sec: u64,
    pub bytes_read: u64,
    /// Whether reads bypassed the page cache (`O_DIRECT`).
    pub direct: bool,
    /// Whether this came from the cache in the state dir.
    #[serde(default)]
    pub cached: bool,
}

/// Why a probe failed (only the model can make it fail).
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The model file is not a usable GGUF.
    #[error("model: {err}")]
    Model {
        path: PathBuf,
        err: crate::gguf::GgufError,
    },
    /// An `ollama:` model could not be resolved.
    #[error(transparent)]
    Ollama(#[from] crate::ollama::OllamaError),
}

/// The model as the engine will load it.
#[derive(Clone, Debug, PartialEq)]
pub struct ResolvedModel {
    /// The GGUF file.
    pub path: PathBuf,
    /// How an `ollama:` name was resolved.
    pub ollama: Option<crate::ollama::Resolved>,
}

/// Resolves the config's model to a GGUF file (through Ollama for `ollama:` names).
pub async fn resolve_model(config: &Config) -> Result<ResolvedModel, ProbeError> {
    match &config.model {
        ModelSource::Path(p) => Ok(ResolvedModel {
            path: p.clone(),
            ollama: None,
        }),
        ModelSource::Ollama(name) => {
            let client = crate::ollama::Client::new(&config.ollama.url)?;
            let r = crate::ollama::resolve(name, &config.ollama.models_dir, &client).await?;
            Ok(ResolvedModel {
                path: r.gguf.clone(),
                ollama: Some(r),
            })
        }
    }
}

/// Reads the model's header (the headers of every split of a split model).
pub fn model(path: &Path) -> Result<ModelProbe, ProbeError> {
    let err = |err| ProbeError::Model {
        path: path.to_path_buf(),
        err,
    };
    let files = GgufModel::open(path).map_err(err)?;
    let info = ModelInfo::from_model(&files).map_err(err)?;
    let paths = files.paths();
    Ok(ModelProbe {
        path: path.to_path_buf(),
        file_size: files.file_size(),
        splits: if paths.len() > 1 { paths } else { Vec::new() },
        info,
    })
}

/// RAM, cores and cgroup limits of this host and process.
pub fn host() -> HostProbe {
    use sysinfo::{MemoryRefreshKind, RefreshKind, System};
    let sys = System::new_with_specifics(
        RefreshKind::nothing().with_memory(MemoryRefreshKind::nothing().with_ram()),
    );
    let limits = cgroup::limits(Path::new("/"));
    let logical = std::fs::read_to_string("/proc/cpuinfo")
        .map(|t| t.lines().filter(|l| l.starts_with("processor")).count() as u32)
        .unwrap_or(0);
    let usable = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    let logical = if logical == 0 { usable } else { logical };
    HostProbe {
        total_ram: sys.total_memory(),
        available_ram: sys.available_memory(),
        cgroup_memory_limit: limits.memory,
        cgroup_version: limits.version,
        logical_cores: logical,
        physical_cores: System::physical_core_count()
            .map(|n| n as u32)
            .unwrap_or(logical),
        usable_cores: usable,
    }
}

/// Probes everything for the model at `model_path` (blocking).
pub fn snapshot(model_path: &Path, state_dir: &Path) -> Result<Snapshot, ProbeError> {
    let model = model(model_path)?;
    let host = host();
    let (gpus, gpu_note) = gpu::probe();
    // The disk is measured on the largest file: a split model's first file may hold the
    // metadata only (gguf-split --no-tensor-first-split).
    let largest = model
        .splits
        .iter()
        .max_by_key(|p| std::fs::metadata(p).map_or(0, |m| m.len()))
        .map_or(model_path, PathBuf::as_path);
    let disk = disk::probe_cached(largest, state_dir);
    Ok(Snapshot {
        model,
        host,
        gpus,
        gpu_note,
        disk,
        cuda_visible_devices: std::env::var("CUDA_VISIBLE_DEVICES").ok(),
    })
}

/// Writes `bytes` to `path` atomically: a temp file in the same directory, fsync, rename.
/// Creates the directory if needed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}
