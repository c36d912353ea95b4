//! `expertd engine build`.

use std::process::ExitCode;

#[derive(Debug, clap::Subcommand)]
pub enum EngineCommand {
    /// Build llama-server and llama-bench from the pinned source.
    Build {},
}

pub fn run(_cmd: EngineCommand) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`expertd engine build` is not built yet")
}
