//! `expertd synth` (not built yet).

use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct SynthArgs {}

pub fn run(_args: SynthArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`expertd synth` is not built yet")
}
