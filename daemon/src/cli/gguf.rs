//! `expertd gguf` (not built yet).

use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct GgufArgs {}

pub fn run(_args: GgufArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`expertd gguf` is not built yet")
}
