//! `expertd trace` (not built yet).

use std::process::ExitCode;

#[derive(Debug, clap::Subcommand)]
pub enum TraceCommand {
    /// Replay a routing trace against every policy and Belady's optimum.
    Sim {},
}

pub fn run(_cmd: TraceCommand) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`expertd trace` is not built yet")
}
