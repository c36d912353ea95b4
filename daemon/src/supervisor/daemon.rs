//! `expertd serve`: config -> prepare (probe, plan) -> status socket -> supervisor, until
//! SIGTERM or SIGINT. SIGHUP reloads.
//!
//! Exit codes (for systemd's `RestartPreventExitStatus=` and scripts): 0 clean stop;
//! [`EXIT_CONFIG`] (78) the config is invalid, or the model or engine it names cannot be
//! used (restarting will not help); [`EXIT_CANTCREAT`] (73) the status socket cannot be
//! made (e.g. another daemon runs); [`EXIT_SOFTWARE`] (70) an internal failure, such as
//! the supervisor task ending on its own (a panic): the daemon then stops serving status
//! and exits rather than answer with a frozen state (the engine child's guard has already
//! killed the engine's process group when the task's state was dropped).

use std::path::PathBuf;

use tokio::sync::{mpsc, watch};

use super::{Command, Supervisor, prepare, sd, stats};
use crate::config::Config;

/// The config is invalid or names a model or engine that cannot be used (sysexits EX_CONFIG).
pub const EXIT_CONFIG: u8 = 78;
/// The status socket or the state directory cannot be created (sysexits EX_CANTCREAT).
pub const EXIT_CANTCREAT: u8 = 73;
/// Internal failure (sysexits EX_SOFTWARE).
pub const EXIT_SOFTWARE: u8 = 70;

/// Why the daemon ended with an error.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The first plan could not be made.
    #[error("cannot start: {0}")]
    Prepare(#[from] super::PrepareError),
    #[error(transparent)]
    Socket(#[from] crate::api::ApiError),
    /// The state directory cannot be made, or another user controls it.
    #[error("state directory {path}: {err}")]
    StateDir {
        path: std::path::PathBuf,
        err: std::io::Error,
    },
    /// Signal handlers could not be installed.
    #[error("signals: {0}")]
    Signals(std::io::Error),
    /// The supervisor task ended without being told to (it panicked).
    #[error("the supervisor task ended unexpectedly: {0}")]
    Supervisor(String),
}

impl DaemonError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            DaemonError::Config(_) | DaemonError::Prepare(_) => EXIT_CONFIG,
            DaemonError::Socket(_) | DaemonError::StateDir { .. } => EXIT_CANTCREAT,
            DaemonError::Signals(_) | DaemonError::Supervisor(_) => EXIT_SOFTWARE,
        }
    }
}

/// Runs the daemon with the config at `config_path` until SIGTERM/SIGINT.
pub async fn run(config_path: PathBuf) -> Result<(), DaemonError> {
    use tokio::signal::unix::{SignalKind, signal};
    // Absolute: the watcher compares it with the absolute paths of file events.
    let config_path = std::path::absolute(&config_path).unwrap_or(config_path);
    let config = Config::load(&config_path)?;
    tracing::info!(
        config = %config_path.display(),
        model = %config.model,
        socket = %config.socket.display(),
        "expertd {} starting",
        env!("CARGO_PKG_VERSION")
    );
    // The probe reads its cache there, and the engine writes its pool stats there.
    crate::api::trusted_dir(&config.state_dir).map_err(|err| DaemonError::StateDir {
        path: config.state_dir.clone(),
        err,
    })?;
    let prepared = prepare(&config).await?;
    tracing::info!("plan:\n{}", prepared.plan);
    let listener = crate::api::bind(&config.socket).await?;
    let mut term = signal(SignalKind::terminate()).map_err(DaemonError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?;
    let mut hup = signal(SignalKind::hangup()).map_err(DaemonError::Signals)?;

    let (status_tx, status_rx) = watch::channel(Supervisor::initial_status(&config));
    let (metrics_tx, metrics_rx) = watch::channel(stats::EngineMetrics::default());
    let (cmd_tx, cmd_rx) = mpsc::channel(16);
    let (stop_api_tx, mut stop_api_rx) = watch::channel(false);

    let supervisor = Supervisor::new(
        config_path.clone(),
        prepared,
        status_tx,
        sd::Notifier::from_env(),
    );
    let mut sup_task = tokio::spawn(supervisor.run(cmd_rx));
    let poll_task = tokio::spawn(stats::poll(status_rx.clone(), metrics_tx));
    let sources = crate::api::Sources {
        status: status_rx,
        metrics: metrics_rx,
        socket: config.socket.clone(),
        socket_error: None,
    };
    let api_task = tokio::spawn(crate::api::serve(listener, sources, async move {
        let _ = stop_api_rx.wait_for(|v| *v).await;
    }));

    // Set when the supervisor task ended before it was told to stop.
    let mut failure = None;
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: stopping"); break; }
            _ = int.recv() => { tracing::info!("SIGINT: stopping"); break; }
            _ = hup.recv() => {
                let _ = cmd_tx.send(Command::Reload { why: "SIGHUP".into() }).await;
            }
            r = &mut sup_task => {
                let why = match r {
                    Ok(()) => "it returned".to_string(),
                    Err(e) => e.to_string(),
                };
                tracing::error!("the supervisor task ended unexpectedly ({why}): stopping");
                failure = Some(why);
                break;
            }
        }
    }
    if failure.is_none() {
        let _ = cmd_tx.send(Command::Shutdown).await;
        if let Err(e) = sup_task.await {
            tracing::error!("supervisor task: {e}");
            failure = Some(e.to_string());
        }
    }
    let _ = stop_api_tx.send(true);
    // The API task returns the socket it served last (a reload may have moved it).
    let socket = api_task.await.unwrap_or(config.socket);
    poll_task.abort();
    let _ = std::fs::remove_file(&socket);
    match failure {
        Some(why) => Err(DaemonError::Supervisor(why)),
        None => {
            tracing::info!("expertd stopped");
            Ok(())
        }
    }
}
