//! The engine: llama.cpp's `llama-server` and `llama-bench`, built from the pinned source,
//! patched (with the expert pool linked in) or stock.
//!
//! Layout under the workspace's `target/` (fixed: tests, benchmarks and the daemon find the
//! binaries there):
//! - `target/engine/<backend>/bin/{llama-server,llama-bench}`: patched build.
//! - `target/engine-stock/<backend>/bin/{llama-server,llama-bench}`: stock build, same pin.
//! - `target/engine-work/<flavor>/src`: the patched or pristine source tree.
//! - `target/engine-work/<flavor>/build-<backend>`: the cmake build directory.

pub mod build;
pub mod tree;

use std::fmt;
use std::path::{Path, PathBuf};

/// The ggml backend an engine is built for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    Cpu,
    Cuda,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Cpu => "cpu",
            Backend::Cuda => "cuda",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Patched (expert pool linked in) or stock (the pin as published).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    Patched,
    Stock,
}

impl Flavor {
    pub fn as_str(self) -> &'static str {
        match self {
            Flavor::Patched => "patched",
            Flavor::Stock => "stock",
        }
    }
}

/// Where one flavor and backend of the engine lives under a workspace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineLayout {
    /// The workspace root (holds `vendor/`, `patches/`, `ffi/`, `target/`).
    pub workspace: PathBuf,
    pub flavor: Flavor,
    pub backend: Backend,
}

impl EngineLayout {
    pub fn new(workspace: &Path, flavor: Flavor, backend: Backend) -> EngineLayout {
        EngineLayout {
            workspace: workspace.to_path_buf(),
            flavor,
            backend,
        }
    }

    fn target(&self) -> PathBuf {
        self.workspace.join("target")
    }

    /// Directory holding the installed binaries.
    pub fn bin_dir(&self) -> PathBuf {
        let top = match self.flavor {
            Flavor::Patched => "engine",
            Flavor::Stock => "engine-stock",
        };
        self.target()
            .join(top)
            .join(self.backend.as_str())
            .join("bin")
    }

    pub fn llama_server(&self) -> PathBuf {
        self.bin_dir().join("llama-server")
    }

    pub fn llama_bench(&self) -> PathBuf {
        self.bin_dir().join("llama-bench")
    }

    /// Work area shared by the backends of one flavor.
    pub fn work_dir(&self) -> PathBuf {
        self.target().join("engine-work").join(self.flavor.as_str())
    }

    /// The (patched or pristine) source tree cmake builds from.
    pub fn src_dir(&self) -> PathBuf {
        self.work_dir().join("src")
    }

    pub fn build_dir(&self) -> PathBuf {
        self.work_dir().join(format!("build-{}", self.backend))
    }

    /// The verified pristine tree that `vendor/fetch.sh` extracts.
    pub fn vendor_dir(&self) -> PathBuf {
        self.workspace.join("vendor").join("llama.cpp")
    }

    pub fn patches_dir(&self) -> PathBuf {
        self.workspace.join("patches")
    }
}

/// Finds the workspace root: `$EXPERTD_WORKSPACE`, else the nearest ancestor of `start`
/// that holds `vendor/llama.cpp.pin`.
pub fn find_workspace(start: &Path) -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("EXPERTD_WORKSPACE") {
        return Some(PathBuf::from(dir));
    }
    start
        .ancestors()
        .find(|dir| dir.join("vendor").join("llama.cpp.pin").is_file())
        .map(Path::to_path_buf)
}
