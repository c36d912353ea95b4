//! The `expertd` binary: parse arguments, set up logging, hand over to the library.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = expertd::cli::Cli::parse();
    expertd::cli::init_tracing();
    match expertd::cli::run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("expertd: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
