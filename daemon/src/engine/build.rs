//! `expertd engine build`: fetch the pin, prepare the (patched or pristine) tree, build the
//! expert pool staticlib (patched only), configure and build llama.cpp with cmake and
//! ccache, install the binaries at their fixed paths.
//!
//! Incremental: the source tree is re-prepared only when the pin or the patches change, and
//! then only files whose content changed are rewritten; cmake and ninja do the rest.

use std::collections::VecDeque;
use std::fs;
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::tree::{self, TreeError};
use super::{Backend, EngineLayout, Flavor};

/// The binaries every engine build produces.
pub const TARGETS: [&str; 2] = ["llama-server", "llama-bench"];

/// What to build.
#[derive(Clone, Debug)]
pub struct BuildOptions {
    pub backend: Backend,
    pub flavor: Flavor,
    /// Parallel compile jobs; default: the number of CPUs.
    pub jobs: Option<usize>,
    /// Extra `-D...` arguments for cmake's configure step.
    pub cmake_args: Vec<String>,
    /// A prebuilt `libexpert_pool.a` to link instead of building it with cargo (for a
    /// machine without Rust, e.g. a GPU host the library was built for).
    pub pool_lib: Option<PathBuf>,
}

/// A finished build.
#[derive(Clone, Debug)]
pub struct BuiltEngine {
    pub layout: EngineLayout,
    pub llama_server: PathBuf,
    pub llama_bench: PathBuf,
}

/// Why a build failed. Each message names the step and, where there is one, the fix.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{tool} is not installed or not on PATH: {hint}")]
    MissingTool { tool: String, hint: String },
    #[error("fetching the pinned llama.cpp source failed (vendor/fetch.sh exited with {status})")]
    Fetch { status: String },
    #[error(transparent)]
    Tree(#[from] TreeError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "{step} failed ({status}); last lines:\n{tail}\nfull log: {}",
        log.display()
    )]
    Step {
        step: String,
        status: String,
        tail: String,
        log: PathBuf,
    },
    #[error("the build finished but {path} is missing")]
    MissingOutput { path: PathBuf },
    #[error("the prebuilt expert pool library {path} does not exist")]
    PoolLibMissing { path: PathBuf },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> BuildError + '_ {
    move |source| BuildError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Builds the engine described by `opts` in the workspace at `workspace`. `say` receives
/// one line per step and progress update.
pub fn build_engine(
    workspace: &Path,
    opts: &BuildOptions,
    say: &mut dyn FnMut(&str),
) -> Result<BuiltEngine, BuildError> {
    // Absolute: patches are applied and cmake runs from other directories.
    let workspace = &fs::canonicalize(workspace).map_err(io_err(workspace))?;
    let layout = EngineLayout::new(workspace, opts.flavor, opts.backend);
    check_tools(opts)?;
    // One build at a time per workspace: two would fetch, stage and sync the same trees.
    let _lock = lock_builds(&layout, say)?;

    say("fetching and verifying the pinned llama.cpp source");
    fetch(workspace)?;

    prepare_source(&layout, say)?;

    let mut configure = base_cmake_args(opts);
    if opts.flavor == Flavor::Patched {
        let lib = match &opts.pool_lib {
            // cmake runs in the build directory: hand it an absolute path.
            Some(lib) if lib.is_file() => fs::canonicalize(lib).map_err(io_err(lib))?,
            Some(lib) => return Err(BuildError::PoolLibMissing { path: lib.clone() }),
            None => {
                say("building the expert pool staticlib (cargo build -p expert-pool --release)");
                build_pool_staticlib(workspace, &layout)?
            }
        };
        configure.push(format!("-DEXPERTD_POOL_LIB={}", lib.display()));
        configure.push(format!(
            "-DEXPERTD_POOL_INCLUDE_DIR={}",
            workspace.join("ffi").join("include").display()
        ));
    }
    configure.extend(opts.cmake_args.iter().cloned());

    let build_dir = layout.build_dir();
    fs::create_dir_all(&build_dir).map_err(io_err(&build_dir))?;
    let args_file = build_dir.join("expertd-configure-args");
    let args_text = configure.join("\n");
    let cache = build_dir.join("CMakeCache.txt");
    let configured =
        cache.is_file() && fs::read_to_string(&args_file).is_ok_and(|t| t == args_text);
    let log = layout
        .work_dir()
        .join(format!("build-{}.log", opts.backend));
    let mut log_file = fs::File::create(&log).map_err(io_err(&log))?;
    if !configured {
        say(&format!(
            "configuring {} llama.cpp ({}) with cmake",
            opts.flavor.as_str(),
            opts.backend
        ));
        // cmake keeps cached values of arguments no longer given (and a generator it
        // was first configured with): other arguments, or a configure that failed,
        // start from an empty cache. The objects stay, and ccache has them anyway.
        remove_if_exists(&args_file)?;
        remove_if_exists(&cache)?;
        let files = build_dir.join("CMakeFiles");
        if files.exists() {
            fs::remove_dir_all(&files).map_err(io_err(&files))?;
        }
        let mut cmd = Command::new("cmake");
        cmd.arg("-S")
            .arg(layout.src_dir())
            .arg("-B")
            .arg(&build_dir)
            .args(&configure);
        run_logged(&mut cmd, "cmake configure", &log, &mut log_file, say, false)?;
        fs::write(&args_file, &args_text).map_err(io_err(&args_file))?;
    }

    let jobs = opts
        .jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    say(&format!(
        "building {} with {jobs} jobs (ccache; first build takes minutes)",
        TARGETS.join(", ")
    ));
    let mut cmd = Command::new("cmake");
    cmd.arg("--build")
        .arg(&build_dir)
        .arg("--target")
        .args(TARGETS)
        .arg("-j")
        .arg(jobs.to_string())
        // Relative paths under the work area let ccache share objects between the
        // stock and the patched tree.
        .env(
            "CCACHE_BASEDIR",
            workspace.join("target").join("engine-work"),
        );
    run_logged(&mut cmd, "cmake build", &log, &mut log_file, say, true)?;

    install(&layout, say)
}

fn check_tools(opts: &BuildOptions) -> Result<(), BuildError> {
    let apt = "apt-get install cmake ninja-build ccache g++ git";
    let need = |tool: &str, args: &[&str], hint: &str| -> Result<(), BuildError> {
        match Command::new(tool)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
        {
            Ok(_) => Ok(()),
            Err(_) => Err(BuildError::MissingTool {
                tool: tool.to_string(),
                hint: hint.to_string(),
            }),
        }
    };
    need("cmake", &["--version"], apt)?;
    need(
        "c++",
        &["--version"],
        "install a C++ compiler: apt-get install g++",
    )?;
    need(
        "cc",
        &["--version"],
        "install a C compiler: apt-get install gcc",
    )?;
    need(
        "git",
        &["--version"],
        "git applies the patches: apt-get install git",
    )?;
    if opts.flavor == Flavor::Patched && opts.pool_lib.is_none() {
        need(
            "cargo",
            &["--version"],
            "the patched engine links the Rust expert pool: install Rust (https://rustup.rs)",
        )?;
    }
    if opts.backend == Backend::Cuda {
        need(
            "nvcc",
            &["--version"],
            "the CUDA backend needs the CUDA toolkit's nvcc on PATH",
        )?;
    }
    Ok(())
}

fn base_cmake_args(opts: &BuildOptions) -> Vec<String> {
    let mut args = vec![
        "-DCMAKE_BUILD_TYPE=Release".to_string(),
        // One self-contained binary per tool: nothing to install beside it.
        "-DBUILD_SHARED_LIBS=OFF".into(),
        "-DGGML_CCACHE=ON".into(),
        "-DGGML_NATIVE=ON".into(),
        "-DLLAMA_BUILD_TESTS=OFF".into(),
        "-DLLAMA_BUILD_EXAMPLES=OFF".into(),
        "-DLLAMA_BUILD_APP=OFF".into(),
        // The web UI would be downloaded or built with npm; the API is all we serve.
        "-DLLAMA_BUILD_UI=OFF".into(),
        "-DLLAMA_USE_PREBUILT_UI=OFF".into(),
        "-DLLAMA_OPENSSL=OFF".into(),
    ];
    if has_ninja() {
        args.insert(0, "-GNinja".into());
    }
    if opts.backend == Backend::Cuda {
        args.push("-DGGML_CUDA=ON".into());
    }
    args
}

fn has_ninja() -> bool {
    Command::new("ninja")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn fetch(workspace: &Path) -> Result<(), BuildError> {
    let script = workspace.join("vendor").join("fetch.sh");
    let status = Command::new("bash")
        .arg(&script)
        .status()
        .map_err(io_err(&script))?;
    if !status.success() {
        return Err(BuildError::Fetch {
            status: status.to_string(),
        });
    }
    Ok(())
}

/// Makes `layout.src_dir()` the pristine tree plus (for the patched flavor) every patch,
/// unless the stamp says it already is.
fn prepare_source(layout: &EngineLayout, say: &mut dyn FnMut(&str)) -> Result<(), BuildError> {
    let patches = match layout.flavor {
        Flavor::Patched => tree::list_patches(&layout.patches_dir())?,
        Flavor::Stock => Vec::new(),
    };
    let pin = layout.workspace.join("vendor").join("llama.cpp.pin");
    let stamp = tree::source_stamp(&pin, &patches)?;
    let stamp_file = layout.work_dir().join("source-stamp");
    let src = layout.src_dir();
    if src.join("CMakeLists.txt").is_file()
        && fs::read_to_string(&stamp_file).is_ok_and(|s| s == stamp)
    {
        return Ok(());
    }
    say(&format!(
        "preparing the {} source tree ({} patches)",
        layout.flavor.as_str(),
        patches.len()
    ));
    let stage = layout.work_dir().join("stage");
    tree::sync_tree(&layout.vendor_dir(), &stage)?;
    remove_if_exists(&stage.join(".expertd-pin"))?;
    if let Err(err) = tree::apply_patches(&stage, &patches) {
        // A half-patched stage must not be mistaken for a clean copy next time.
        let _ = fs::remove_dir_all(&stage);
        return Err(err.into());
    }
    for patch in &patches {
        say(&format!(
            "  applied {}",
            patch.file_name().unwrap_or_default().to_string_lossy()
        ));
    }
    // The stamp goes first: a sync cut short (disk full, interrupted) must not leave a
    // mixed tree that an old stamp vouches for.
    remove_if_exists(&stamp_file)?;
    let written = tree::sync_tree(&stage, &src)?;
    say(&format!("  {written} files changed in {}", src.display()));
    fs::write(&stamp_file, &stamp).map_err(io_err(&stamp_file))?;
    Ok(())
}

/// Takes the workspace's engine build lock (`target/engine-work/.lock`, released when
/// the file is dropped), waiting for another build that holds it.
fn lock_builds(layout: &EngineLayout, say: &mut dyn FnMut(&str)) -> Result<fs::File, BuildError> {
    use rustix::fs::{FlockOperation, flock};
    let dir = layout
        .work_dir()
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let path = dir.join(".lock");
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_err(&path))?;
    if flock(&file, FlockOperation::NonBlockingLockExclusive).is_err() {
        say("another engine build runs in this workspace: waiting for it");
        flock(&file, FlockOperation::LockExclusive).map_err(|e| BuildError::Io {
            path: path.clone(),
            source: e.into(),
        })?;
    }
    Ok(file)
}

fn remove_if_exists(path: &Path) -> Result<(), BuildError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(path)(e)),
        _ => Ok(()),
    }
}

/// Builds `libexpert_pool.a` in the workspace's own target dir and returns its path.
fn build_pool_staticlib(workspace: &Path, layout: &EngineLayout) -> Result<PathBuf, BuildError> {
    let target_dir = workspace.join("target");
    let log = layout.work_dir().join("cargo-expert-pool.log");
    fs::create_dir_all(layout.work_dir()).map_err(io_err(&layout.work_dir()))?;
    let mut log_file = fs::File::create(&log).map_err(io_err(&log))?;
    let mut cmd = Command::new("cargo");
    cmd.arg("build")
        .arg("--release")
        .arg("--package")
        .arg("expert-pool")
        .arg("--manifest-path")
        .arg(workspace.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir);
    run_logged(
        &mut cmd,
        "cargo build of the expert pool",
        &log,
        &mut log_file,
        &mut |_| {},
        false,
    )?;
    let lib = target_dir.join("release").join("libexpert_pool.a");
    if !lib.is_file() {
        return Err(BuildError::MissingOutput { path: lib });
    }
    Ok(lib)
}

/// Runs `cmd`, appending its output to the log; on failure returns the last lines. With
/// `progress`, forwards ninja's `[n/m]` counters now and then.
fn run_logged(
    cmd: &mut Command,
    step: &str,
    log: &Path,
    log_file: &mut fs::File,
    say: &mut dyn FnMut(&str),
    progress: bool,
) -> Result<(), BuildError> {
    const TAIL: usize = 40;
    writeln!(log_file, "$ {cmd:?}").map_err(io_err(log))?;
    // stderr goes into the same pipe so the log keeps the order of events.
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| BuildError::MissingTool {
            tool: format!("{:?}", cmd.get_program()),
            hint: e.to_string(),
        })?;
    let stderr = child.stderr.take();
    let err_thread = std::thread::spawn(move || {
        let mut lines = Vec::new();
        if let Some(stderr) = stderr {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                lines.push(line);
            }
        }
        lines
    });
    let mut tail: VecDeque<String> = VecDeque::with_capacity(TAIL);
    let mut last_report = Instant::now();
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            writeln!(log_file, "{line}").map_err(io_err(log))?;
            if progress && line.starts_with('[') && last_report.elapsed() >= Duration::from_secs(10)
            {
                let counter = line.split(']').next().unwrap_or_default();
                say(&format!("  {counter}]"));
                last_report = Instant::now();
            }
            if tail.len() == TAIL {
                tail.pop_front();
            }
            tail.push_back(line);
        }
    }
    let status = child.wait().map_err(io_err(log))?;
    let err_lines = err_thread.join().unwrap_or_default();
    for line in &err_lines {
        writeln!(log_file, "{line}").map_err(io_err(log))?;
    }
    if status.success() {
        return Ok(());
    }
    let mut lines: Vec<String> = tail.into_iter().collect();
    lines.extend(err_lines);
    let keep = lines.len().saturating_sub(TAIL);
    Err(BuildError::Step {
        step: step.to_string(),
        status: status.to_string(),
        tail: lines[keep..].join("\n"),
        log: log.to_path_buf(),
    })
}

/// Copies the built binaries to their fixed paths (atomically: copy, then rename).
fn install(layout: &EngineLayout, say: &mut dyn FnMut(&str)) -> Result<BuiltEngine, BuildError> {
    let bin = layout.bin_dir();
    fs::create_dir_all(&bin).map_err(io_err(&bin))?;
    for name in TARGETS {
        let built = layout.build_dir().join("bin").join(name);
        if !built.is_file() {
            return Err(BuildError::MissingOutput { path: built });
        }
        let dest = bin.join(name);
        let tmp = bin.join(format!(".{name}.tmp"));
        fs::copy(&built, &tmp).map_err(io_err(&tmp))?;
        fs::rename(&tmp, &dest).map_err(io_err(&dest))?;
    }
    say(&format!(
        "installed {} and {} in {}",
        TARGETS[0],
        TARGETS[1],
        bin.display()
    ));
    Ok(BuiltEngine {
        llama_server: layout.llama_server(),
        llama_bench: layout.llama_bench(),
        layout: layout.clone(),
    })
}
