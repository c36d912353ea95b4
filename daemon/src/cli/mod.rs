//! Command-line surface of `expertd`. Each subcommand has its arguments and its `run`
//! in a module of its own; this is the edge of the program, so errors are `anyhow`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod engine;
mod gguf;
mod plan;
mod serve;
pub(crate) mod status;
mod synth;
mod trace;

/// expertd: run large Mixture-of-Experts models well on machines too small for them.
#[derive(Debug, Parser)]
#[command(name = "expertd", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Build the (patched or stock) llama.cpp engine from the pinned source.
    #[command(subcommand)]
    Engine(engine::EngineCommand),
    /// Write a synthetic MoE model (qwen3moe GGUF with random weights).
    Synth(synth::SynthArgs),
    /// Inspect a GGUF file: header, metadata and tensors.
    Gguf(gguf::GgufArgs),
    /// Record and replay expert routing traces.
    #[command(subcommand)]
    Trace(trace::TraceCommand),
    /// Run the daemon in the foreground.
    Serve(serve::ServeArgs),
    /// Show the running daemon's status.
    Status(status::StatusArgs),
    /// Print the plan for this host and model without starting anything.
    Plan(plan::PlanArgs),
}

/// Runs one parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Engine(cmd) => engine::run(cmd),
        Command::Synth(args) => synth::run(args),
        Command::Gguf(args) => gguf::run(args),
        Command::Trace(cmd) => trace::run(cmd),
        Command::Serve(args) => serve::run(args),
        Command::Status(args) => status::run(args),
        Command::Plan(args) => plan::run(args),
    }
}

/// Logs go to stderr; `RUST_LOG` picks the level (default `info`).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
