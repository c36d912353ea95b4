//! `expertd serve`: run the daemon in the foreground (what the systemd unit starts).

use std::path::PathBuf;
use std::process::ExitCode;

/// Arguments of `expertd serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Config file. Default: $EXPERTD_CONFIG if set, else /etc/expertd/expertd.toml.
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
}

pub fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    use crate::supervisor::daemon;
    let loc = crate::config::locate(
        args.config.as_deref(),
        std::env::var(crate::config::CONFIG_ENV).ok().as_deref(),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match rt.block_on(daemon::run(loc.path.clone())) {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            eprintln!("expertd: error: {e} (config from {})", loc.source);
            Ok(ExitCode::from(e.exit_code()))
        }
    }
}
