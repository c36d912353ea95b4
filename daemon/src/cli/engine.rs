//! `expertd engine build` and `expertd engine path`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

use crate::engine::build::{BuildOptions, build_engine};
use crate::engine::{Backend, EngineLayout, Flavor, find_workspace};

#[derive(Debug, clap::Subcommand)]
pub enum EngineCommand {
    /// Build llama-server and llama-bench from the pinned source: patched (expert pool
    /// linked in) into target/engine/<backend>/bin, or stock into target/engine-stock/.
    Build(BuildArgs),
    /// Print the path of an engine binary (whether or not it is built yet).
    Path(PathArgs),
}

#[derive(Debug, clap::Args)]
pub struct BuildArgs {
    /// ggml backend to build for.
    #[arg(long, value_enum, default_value_t = Backend::Cpu)]
    backend: Backend,
    /// Build the stock (unpatched) engine of the same pin instead.
    #[arg(long)]
    stock: bool,
    /// Parallel compile jobs (default: number of CPUs).
    #[arg(short, long, value_parser = clap::value_parser!(u32).range(1..))]
    jobs: Option<u32>,
    /// Extra cmake configure argument (repeatable), e.g. --cmake-arg=-DCMAKE_CUDA_ARCHITECTURES=90.
    #[arg(long = "cmake-arg", allow_hyphen_values = true)]
    cmake_args: Vec<String>,
    /// Link this prebuilt libexpert_pool.a instead of building it with cargo.
    #[arg(long)]
    pool_lib: Option<PathBuf>,
    /// The expertd workspace (default: found from the current directory).
    #[arg(long)]
    workspace: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct PathArgs {
    /// llama-server (default) or llama-bench.
    #[arg(default_value = "llama-server")]
    binary: String,
    #[arg(long, value_enum, default_value_t = Backend::Cpu)]
    backend: Backend,
    #[arg(long)]
    stock: bool,
    #[arg(long)]
    workspace: Option<PathBuf>,
}

/// The workspace: `--workspace`, else `$EXPERTD_WORKSPACE`, else found above the current
/// directory or this executable; checked (it holds `vendor/llama.cpp.pin`) and absolute,
/// so that the paths printed work from anywhere.
fn workspace(explicit: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let (dir, source) = match explicit {
        Some(dir) => (dir, "--workspace"),
        None => {
            let from_env = std::env::var_os("EXPERTD_WORKSPACE").is_some();
            let cwd = std::env::current_dir().context("reading the current directory")?;
            let exe = std::env::current_exe().ok();
            let found = find_workspace(&cwd)
                .or_else(|| exe.as_deref().and_then(find_workspace))
                .context("no expertd workspace found (a directory with vendor/llama.cpp.pin) above the current directory; pass --workspace")?;
            (
                found,
                if from_env {
                    "EXPERTD_WORKSPACE"
                } else {
                    "the current directory"
                },
            )
        }
    };
    if !dir.join("vendor").join("llama.cpp.pin").is_file() {
        anyhow::bail!(
            "{source}: {:?} is not an expertd workspace (no vendor/llama.cpp.pin in it)",
            dir.display().to_string()
        );
    }
    std::path::absolute(&dir).with_context(|| format!("{source}: {}", dir.display()))
}

fn flavor(stock: bool) -> Flavor {
    if stock {
        Flavor::Stock
    } else {
        Flavor::Patched
    }
}

pub fn run(cmd: EngineCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        EngineCommand::Build(args) => {
            let ws = workspace(args.workspace)?;
            let opts = BuildOptions {
                backend: args.backend,
                flavor: flavor(args.stock),
                jobs: args.jobs.map(|j| j as usize),
                cmake_args: args.cmake_args,
                pool_lib: args.pool_lib,
            };
            let built = build_engine(&ws, &opts, &mut |line| eprintln!("expertd engine: {line}"))
                .with_context(|| {
                format!(
                    "building the {} engine ({})",
                    opts.flavor.as_str(),
                    opts.backend
                )
            })?;
            println!("{}", built.llama_server.display());
        }
        EngineCommand::Path(args) => {
            let ws = workspace(args.workspace)?;
            let layout = EngineLayout::new(&ws, flavor(args.stock), args.backend);
            println!("{}", layout.bin_dir().join(&args.binary).display());
        }
    }
    Ok(ExitCode::SUCCESS)
}
