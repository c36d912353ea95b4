//! The supervisor: one task owns the engine and all of its state, and takes typed
//! [`Command`]s over an mpsc channel. Everything else sees the state through a `watch`
//! channel of [`Status`] snapshots.
//!
//! Life of the engine: start with the plan's arguments in its own process group ->
//! `starting` until `/health` answers 200 -> `serving`. An exit the supervisor did not ask
//! for is a crash: restart after an exponential backoff; too many crashes within the
//! window is a crash loop, reported, with no more restarts until a reload. A reload
//! (config or model file changed, SIGHUP) validates the config, re-probes and re-plans,
//! and restarts the engine only when what it would run changed; an invalid config is
//! reported and the running engine keeps serving; a valid config whose model cannot be
//! used yet (not downloaded) has its model's files watched too, and is applied when they
//! appear. Shutdown stops the engine gracefully (SIGTERM to the group, SIGKILL after the
//! stop timeout). systemd's watchdog is pinged from the task's loop and during its long
//! waits (a reload's probe, stopping the engine).
//!
//! Invariants: only this task starts or stops the engine; the engine is never left
//! running when the task ends (the child guard kills its group on drop).

pub mod child;
pub mod daemon;
mod dirs;
pub mod restart;
pub mod sd;
pub mod stats;

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, watch};

use crate::config::{Config, INSTALLED_ENGINE};
use crate::plan::Plan;
use crate::probe::{ResolvedModel, Snapshot};
use child::{EngineChild, describe_exit};
use restart::{AfterCrash, CrashHistory};

/// How often `/health` is asked while the engine loads.
const STARTING_POLL: Duration = Duration::from_millis(200);
/// How often `/health` is asked while it serves.
const SERVING_POLL: Duration = Duration::from_secs(5);
/// Consecutive failed health checks of a serving engine that count as a crash.
const HEALTH_FAILURES: u32 = 3;
/// Quiet time after a file event before reloading (editors write in several steps).
const DEBOUNCE: Duration = Duration::from_millis(400);

/// What the supervisor can be told.
#[derive(Debug)]
pub enum Command {
    /// Re-read the config, re-probe, re-plan; restart the engine if the plan changed (or
    /// if it is not running).
    Reload { why: String },
    /// Stop the engine and end the task.
    Shutdown,
}

/// The engine's state, as status reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineState {
    /// Not started (no plan yet).
    Stopped,
    /// Process running, `/health` not yet 200.
    Starting,
    /// `/health` answered 200.
    Serving,
    /// Crashed; waiting out the backoff before the next start.
    Restarting,
    /// Crashed too often; not restarting until a reload.
    CrashLoop,
    /// Being stopped (reload or shutdown).
    Stopping,
}

impl EngineState {
    /// The name in the status document.
    pub fn as_str(self) -> &'static str {
        match self {
            EngineState::Stopped => "stopped",
            EngineState::Starting => "starting",
            EngineState::Serving => "serving",
            EngineState::Restarting => "restarting",
            EngineState::CrashLoop => "crash_loop",
            EngineState::Stopping => "stopping",
        }
    }
}

/// The engine part of [`Status`].
#[derive(Clone, Debug)]
pub struct EngineStatus {
    pub state: EngineState,
    pub pid: Option<u32>,
    pub host: String,
    pub port: u16,
    pub binary: Option<PathBuf>,
    /// Restarts after crashes since the daemon started.
    pub restarts: u32,
    /// Restarts because the plan changed.
    pub replans: u32,
    pub started_at: Option<SystemTime>,
    pub ready_at: Option<SystemTime>,
    /// Start to first 200 from `/health`, for the current process.
    pub load_time: Option<Duration>,
    /// How the last engine process ended.
    pub last_exit: Option<String>,
    /// When the next start is due (state `restarting`).
    pub next_start_at: Option<SystemTime>,
    /// Crashes within the crash-loop window.
    pub recent_crashes: u32,
    /// The API key the running engine was started with, for its `/metrics`.
    pub api_key: Option<stats::ApiKey>,
}

/// Everything `expertd status` shows, as plain data.
#[derive(Clone, Debug)]
pub struct Status {
    pub started_at: SystemTime,
    pub stopping: bool,
    pub config_path: Option<PathBuf>,
    /// The status socket the applied config names (the API moves to it).
    pub socket: PathBuf,
    /// The current config problem (cleared when a valid config loads).
    pub config_error: Option<String>,
    /// The config's `model` as written.
    pub model_source: String,
    pub model_path: Option<PathBuf>,
    pub ollama: Option<crate::ollama::Resolved>,
    pub engine: EngineStatus,
    /// The most recent error of any kind, and when.
    pub last_error: Option<(SystemTime, String)>,
    pub plan: Option<Arc<Plan>>,
    /// What the last successful probe saw.
    pub snapshot: Option<Arc<Snapshot>>,
    /// Reloads handled (file changes, SIGHUP), valid or not.
    pub reloads: u32,
}

impl Status {
    fn new(config: &Config) -> Status {
        Status {
            started_at: SystemTime::now(),
            stopping: false,
            config_path: config.path.clone(),
            socket: config.socket.clone(),
            config_error: None,
            model_source: config.model.to_string(),
            model_path: None,
            ollama: None,
            engine: EngineStatus {
                state: EngineState::Stopped,
                pid: None,
                host: config.engine.host.clone(),
                port: config.engine.port,
                binary: None,
                restarts: 0,
                replans: 0,
                started_at: None,
                ready_at: None,
                load_time: None,
                last_exit: None,
                next_start_at: None,
                recent_crashes: 0,
                api_key: None,
            },
            last_error: None,
            plan: None,
            snapshot: None,
            reloads: 0,
        }
    }
}

/// Why the engine could not be prepared (resolve, probe).
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error(transparent)]
    Probe(#[from] crate::probe::ProbeError),
    /// No engine binary found.
    #[error("no engine binary: {0}")]
    Engine(String),
    /// The probe task failed.
    #[error("probe task failed: {0}")]
    Task(String),
}

/// A config turned into something runnable: the model, the probe, the plan, the binary.
#[derive(Clone, Debug)]
pub struct Prepared {
    pub config: Config,
    pub model: ResolvedModel,
    pub snapshot: Arc<Snapshot>,
    pub plan: Arc<Plan>,
    pub spec: LaunchSpec,
}

/// What the engine process runs; a restart is needed exactly when this changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaunchSpec {
    pub binary: PathBuf,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// The identity (device, inode, size, mtime) of the model's file, or of every split
    /// of a split model: a replaced file restarts.
    pub model_id: Vec<Option<FileId>>,
}

/// Identity of a file: device, inode, size, mtime (s, ns).
pub type FileId = (u64, u64, u64, i64, i64);

/// The identity of the file at `path`, if it can be read.
pub fn file_id(path: &Path) -> Option<FileId> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.dev(), m.ino(), m.len(), m.mtime(), m.mtime_nsec()))
}

/// Finds the engine: the config's `engine.binary`, else the patched llama-server built
/// in the workspace's `target/engine/{cuda,cpu}/bin/` found from this executable's path
/// (an ancestor directory holding `target/engine` or `engine`), else [`INSTALLED_ENGINE`].
pub fn find_engine(config: &Config) -> Result<PathBuf, String> {
    if let Some(b) = &config.engine.binary {
        return if is_executable(b) {
            Ok(b.clone())
        } else {
            Err(format!(
                "engine.binary {} is not an executable file",
                b.display()
            ))
        };
    }
    let mut tried = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1) {
            for base in [dir.join("target/engine"), dir.join("engine")] {
                for backend in ["cuda", "cpu"] {
                    let p = base.join(backend).join("bin/llama-server");
                    if is_executable(&p) {
                        return Ok(p);
                    }
                }
            }
            if tried.len() < 4 {
                tried.push(
                    dir.join("target/engine/*/bin/llama-server")
                        .display()
                        .to_string(),
                );
            }
        }
    }
    let installed = PathBuf::from(INSTALLED_ENGINE);
    if is_executable(&installed) {
        return Ok(installed);
    }
    tried.push(INSTALLED_ENGINE.to_string());
    Err(format!(
        "no llama-server found (tried {} ...); build it with `expertd engine build` or set engine.binary",
        tried.join(", ")
    ))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Resolves the model, probes (off the async threads) and plans.
pub async fn prepare(config: &Config) -> Result<Prepared, PrepareError> {
    let binary = find_engine(config).map_err(PrepareError::Engine)?;
    let model = crate::probe::resolve_model(config).await?;
    let path = model.path.clone();
    let state_dir = config.state_dir.clone();
    let snapshot = tokio::task::spawn_blocking(move || crate::probe::snapshot(&path, &state_dir))
        .await
        .map_err(|e| PrepareError::Task(e.to_string()))??;
    let plan = crate::plan::plan(&snapshot, config);
    let spec = LaunchSpec {
        binary,
        args: plan.args.clone(),
        env: config.engine.env.clone(),
        model_id: if snapshot.model.splits.is_empty() {
            vec![file_id(&model.path)]
        } else {
            snapshot.model.splits.iter().map(|p| file_id(p)).collect()
        },
    };
    Ok(Prepared {
        config: config.clone(),
        model,
        snapshot: Arc::new(snapshot),
        plan: Arc::new(plan),
        spec,
    })
}

/// The supervisor task's state.
pub struct Supervisor {
    config_path: PathBuf,
    current: Prepared,
    engine: Option<EngineChild>,
    status: Status,
    status_tx: watch::Sender<Status>,
    crashes: CrashHistory,
    /// Since when the engine answers `/health` (state `serving`): a crash after
    /// `restart.reset_after` of serving starts the crash history afresh.
    serving_since: Option<Instant>,
    /// When to start the engine next (backoff after a crash).
    start_at: Option<Instant>,
    /// When the loading engine must have answered `/health`.
    ready_deadline: Option<Instant>,
    next_health: Option<Instant>,
    health_failures: u32,
    /// A file event arrived: reload at this time unless more arrive.
    reload_at: Option<Instant>,
    watches: Option<dirs::DirWatches>,
    fs_rx: mpsc::UnboundedReceiver<notify::Event>,
    fs_tx: mpsc::UnboundedSender<notify::Event>,
    /// The newest config that loaded but could not be prepared (e.g. its model is not
    /// there yet): the files it names are watched too, so that it is applied when they
    /// appear. Cleared when a config is applied or a newer one does not load.
    unprepared: Option<Config>,
    notifier: sd::Notifier,
    /// When to send `WATCHDOG=1` (systemd's `WatchdogSec=`), if systemd expects it.
    watchdog: Option<tokio::time::Interval>,
    sent_ready: bool,
}

impl Supervisor {
    /// A supervisor for a prepared config; `status_tx` publishes its state.
    pub fn new(
        config_path: PathBuf,
        prepared: Prepared,
        status_tx: watch::Sender<Status>,
        notifier: sd::Notifier,
    ) -> Supervisor {
        let mut status = Status::new(&prepared.config);
        status.model_path = Some(prepared.model.path.clone());
        status.ollama = prepared.model.ollama.clone();
        status.plan = Some(prepared.plan.clone());
        status.snapshot = Some(prepared.snapshot.clone());
        status.engine.binary = Some(prepared.spec.binary.clone());
        let (fs_tx, fs_rx) = mpsc::unbounded_channel();
        Supervisor {
            config_path,
            current: prepared,
            engine: None,
            status,
            status_tx,
            crashes: CrashHistory::default(),
            serving_since: None,
            start_at: None,
            ready_deadline: None,
            next_health: None,
            health_failures: 0,
            reload_at: None,
            watches: None,
            fs_rx,
            fs_tx,
            unprepared: None,
            notifier,
            watchdog: None,
            sent_ready: false,
        }
    }

    /// The initial status for a `watch` channel.
    pub fn initial_status(config: &Config) -> Status {
        Status::new(config)
    }

    fn publish(&mut self) {
        self.crashes.expire(
            Instant::now(),
            self.current.config.restart.crash_loop_window,
        );
        self.status.engine.recent_crashes = self.crashes.count();
        self.status_tx.send_replace(self.status.clone());
    }

    fn error(&mut self, message: String) {
        tracing::error!("{message}");
        self.status.last_error = Some((SystemTime::now(), message));
    }

    /// Runs until [`Command::Shutdown`] (or all senders are gone); stops the engine on the
    /// way out.
    pub async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        self.watchdog = self.notifier.watchdog_interval().map(|d| {
            let mut i = tokio::time::interval(d);
            i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            i
        });
        self.update_watches();
        self.start_engine().await;
        loop {
            tokio::select! {
                cmd = commands.recv() => match cmd {
                    Some(Command::Reload { why }) => self.reload(&why).await,
                    Some(Command::Shutdown) | None => break,
                },
                exit = wait_engine(&mut self.engine) => self.on_exit(exit),
                _ = sleep_until(self.start_at) => {
                    self.start_at = None;
                    self.status.engine.restarts += 1;
                    self.start_engine().await;
                }
                _ = sleep_until(self.next_health) => self.health_tick().await,
                Some(ev) = self.fs_rx.recv() => self.on_fs_event(ev),
                _ = sleep_until(self.reload_at) => {
                    self.reload_at = None;
                    self.reload("a watched file changed").await;
                }
                _ = tick(&mut self.watchdog) => self.notifier.notify("WATCHDOG=1"),
                // The oldest crash leaves the window: status shows one fewer.
                _ = sleep_until(self.crashes.next_expiry(self.current.config.restart.crash_loop_window)) => {
                    self.publish();
                }
            }
        }
        self.status.stopping = true;
        self.notifier.notify("STOPPING=1");
        self.stop_engine().await;
        self.status.engine.state = EngineState::Stopped;
        self.publish();
    }

    async fn start_engine(&mut self) {
        let spec = self.current.spec.clone();
        self.status.engine.binary = Some(spec.binary.clone());
        self.status.engine.host = self.current.config.engine.host.clone();
        self.status.engine.port = self.current.config.engine.port;
        self.status.engine.ready_at = None;
        self.status.engine.load_time = None;
        self.status.engine.next_start_at = None;
        self.serving_since = None;
        // A stale stats file from an earlier engine must not be shown as this one's.
        if let Some(pool) = &self.current.plan.pool {
            let _ = std::fs::remove_file(&pool.stats_path);
        }
        let _ = std::fs::create_dir_all(&self.current.config.state_dir);
        let host = self.current.config.engine.host.clone();
        let port = self.current.config.engine.port;
        if let Err(e) = port_free(&host, port).await {
            if e.kind() == std::io::ErrorKind::AddrInUse {
                self.error(format!(
                    "engine address {host}:{port} is not free ({e}): another process holds it"
                ));
                self.status.engine.last_exit = Some("not started: port in use".into());
            } else {
                // e.g. the daemon is out of file descriptors: not the port's fault
                self.error(format!("cannot check engine address {host}:{port}: {e}"));
                self.status.engine.last_exit = Some(format!("not started: {e}"));
            }
            self.crashed();
            return;
        }
        tracing::info!(
            binary = %spec.binary.display(),
            "starting engine: {}",
            crate::plan::shown_args(&spec.args).join(" ")
        );
        match EngineChild::spawn(&spec.binary, &spec.args, &spec.env) {
            Ok(child) => {
                self.status.engine.pid = Some(child.pid());
                self.status.engine.api_key = stats::engine_api_key(&spec.args, &spec.env);
                self.status.engine.started_at = Some(SystemTime::now());
                self.status.engine.state = EngineState::Starting;
                self.engine = Some(child);
                self.ready_deadline =
                    Some(Instant::now() + self.current.config.engine.start_timeout);
                self.next_health = Some(Instant::now() + STARTING_POLL);
                self.health_failures = 0;
                self.notifier.notify("STATUS=engine loading");
            }
            Err(e) => {
                self.error(format!(
                    "cannot start engine {}: {e}",
                    spec.binary.display()
                ));
                self.status.engine.last_exit = Some(format!("not started: {e}"));
                self.crashed();
                return;
            }
        }
        self.publish();
    }

    /// Records a crash and decides: restart after a backoff, or crash loop.
    fn crashed(&mut self) {
        let now = Instant::now();
        let r = self.current.config.restart.clone();
        let served_for = self
            .serving_since
            .take()
            .map(|t| now.saturating_duration_since(t));
        let after = self.crashes.record(now, served_for, &r);
        self.status.engine.pid = None;
        self.ready_deadline = None;
        self.next_health = None;
        match after {
            AfterCrash::CrashLoop { crashes: n } => {
                self.status.engine.state = EngineState::CrashLoop;
                self.start_at = None;
                let msg = format!(
                    "crash loop: the engine failed {n} times within {}s; not restarting until the config or model changes or SIGHUP (last: {})",
                    r.crash_loop_window.as_secs(),
                    self.status.engine.last_exit.as_deref().unwrap_or("?")
                );
                self.error(msg.clone());
                if !self.sent_ready {
                    // The daemon is up (it answers status and watches for a fix) even
                    // though the engine is not: tell systemd so the unit does not time out.
                    self.sent_ready = true;
                    self.notifier.notify(&format!("READY=1\nSTATUS={msg}"));
                } else {
                    self.notifier.notify(&format!("STATUS={msg}"));
                }
            }
            AfterCrash::Restart { delay, crashes: n } => {
                self.status.engine.state = EngineState::Restarting;
                self.start_at = Some(now + delay);
                self.status.engine.next_start_at = Some(SystemTime::now() + delay);
                tracing::warn!("restarting the engine in {delay:?} (crash {n} within the window)");
            }
        }
        self.publish();
    }

    fn on_exit(&mut self, exit: std::io::Result<std::process::ExitStatus>) {
        let child = self.engine.take();
        let how = match &exit {
            Ok(s) => describe_exit(s),
            Err(e) => format!("wait failed: {e}"),
        };
        let tail = child.as_ref().map(|c| c.tail()).unwrap_or_default();
        let was = self.status.engine.state;
        self.status.engine.last_exit = Some(how.clone());
        let mut msg = format!("engine {how} while {}", was.as_str());
        if !tail.is_empty() {
            let last: Vec<&String> = tail.iter().rev().take(3).collect::<Vec<_>>();
            let last: Vec<&str> = last.iter().rev().map(|s| s.as_str()).collect();
            msg.push_str(&format!("; last output: {}", last.join(" | ")));
        }
        self.error(msg);
        self.crashed();
    }

    async fn health_tick(&mut self) {
        let host = self.current.config.engine.host.clone();
        let port = self.current.config.engine.port;
        let state = self.status.engine.state;
        let timeout = if state == EngineState::Starting {
            Duration::from_secs(1)
        } else {
            Duration::from_secs(3)
        };
        let answer =
            crate::api::http::tcp_request(&host, port, "GET", "/health", None, None, timeout).await;
        if let Err(e) = &answer
            && out_of_descriptors(e)
        {
            // The daemon's own shortage says nothing about the engine: check again later.
            tracing::warn!("engine /health not checked: {e}");
            self.next_health = Some(Instant::now() + STARTING_POLL);
            return;
        }
        let ok = matches!(answer, Ok(r) if r.status == 200);
        match state {
            EngineState::Starting if ok => {
                let load = self.engine.as_ref().map(|c| c.started.elapsed());
                self.status.engine.state = EngineState::Serving;
                self.status.engine.ready_at = Some(SystemTime::now());
                self.status.engine.load_time = load;
                self.serving_since = Some(Instant::now());
                self.ready_deadline = None;
                self.next_health = Some(Instant::now() + SERVING_POLL);
                tracing::info!("engine serving on {host}:{port} (loaded in {load:?})");
                let status = format!(
                    "STATUS=serving {} on {host}:{port}",
                    self.status.model_source
                );
                if self.sent_ready {
                    self.notifier.notify(&status);
                } else {
                    self.sent_ready = true;
                    self.notifier.notify(&format!("READY=1\n{status}"));
                }
                self.publish();
            }
            EngineState::Starting => {
                if self.ready_deadline.is_some_and(|d| Instant::now() >= d) {
                    let t = self.current.config.engine.start_timeout;
                    self.kill_engine().await;
                    self.status.engine.last_exit =
                        Some(format!("killed: no answer from /health within {t:?}"));
                    self.error(format!(
                        "engine did not answer /health within {t:?} (engine.start_timeout_secs)"
                    ));
                    self.crashed();
                } else {
                    self.next_health = Some(Instant::now() + STARTING_POLL);
                }
            }
            EngineState::Serving => {
                if ok {
                    self.health_failures = 0;
                } else {
                    self.health_failures += 1;
                    tracing::warn!("engine /health failed ({} in a row)", self.health_failures);
                }
                if self.health_failures >= HEALTH_FAILURES {
                    self.kill_engine().await;
                    self.status.engine.last_exit = Some("killed: stopped answering /health".into());
                    self.error(format!(
                        "engine stopped answering /health ({HEALTH_FAILURES} checks in a row): killed"
                    ));
                    self.crashed();
                } else {
                    self.next_health = Some(Instant::now() + SERVING_POLL);
                }
            }
            _ => self.next_health = None,
        }
    }

    async fn kill_engine(&mut self) {
        if let Some(mut c) = self.engine.take() {
            c.signal_group(rustix::process::Signal::KILL);
            let _ = with_watchdog(&mut self.watchdog, &self.notifier, c.wait()).await;
        }
    }

    async fn stop_engine(&mut self) {
        self.start_at = None;
        self.serving_since = None;
        self.ready_deadline = None;
        self.next_health = None;
        if let Some(mut c) = self.engine.take() {
            self.status.engine.state = EngineState::Stopping;
            self.publish();
            let timeout = self.current.config.engine.stop_timeout;
            match with_watchdog(&mut self.watchdog, &self.notifier, c.stop(timeout)).await {
                Ok(s) => {
                    tracing::info!("engine stopped ({})", describe_exit(&s));
                    self.status.engine.last_exit = Some(describe_exit(&s));
                }
                Err(e) => tracing::warn!("stopping the engine: {e}"),
            }
        }
        self.status.engine.pid = None;
        self.status.engine.state = EngineState::Stopped;
    }

    async fn reload(&mut self, why: &str) {
        tracing::info!("reload: {why}");
        self.status.reloads += 1;
        let config = match Config::load(&self.config_path) {
            Ok(c) => c,
            Err(e) => {
                let msg = format!("config not applied, the engine keeps its plan: {e}");
                self.status.config_error = Some(e.to_string());
                self.error(msg);
                self.unprepared = None;
                self.update_watches();
                self.publish();
                return;
            }
        };
        // Resolving an Ollama model may wait on its API for a while: keep systemd's
        // watchdog fed meanwhile.
        let prepared =
            match with_watchdog(&mut self.watchdog, &self.notifier, prepare(&config)).await {
                Ok(p) => p,
                Err(e) => {
                    let msg = format!("config not applied, the engine keeps its plan: {e}");
                    self.status.config_error = Some(e.to_string());
                    self.error(msg);
                    // Watch what it names: the model may be on its way.
                    self.unprepared = Some(config);
                    self.update_watches();
                    self.publish();
                    return;
                }
            };
        self.status.config_error = None;
        self.unprepared = None;
        // The API task moves to the new socket when it sees this change.
        self.status.socket = config.socket.clone();
        let changed = prepared.spec != self.current.spec;
        let running = matches!(
            self.status.engine.state,
            EngineState::Starting | EngineState::Serving
        );
        self.status.model_source = config.model.to_string();
        self.status.model_path = Some(prepared.model.path.clone());
        self.status.ollama = prepared.model.ollama.clone();
        self.status.plan = Some(prepared.plan.clone());
        self.status.snapshot = Some(prepared.snapshot.clone());
        self.current = prepared;
        self.update_watches();
        if changed || !running {
            tracing::info!(
                "{}: restarting the engine",
                if changed {
                    "the plan changed"
                } else {
                    "the engine is not running"
                }
            );
            self.stop_engine().await;
            self.crashes.clear();
            if changed {
                self.status.engine.replans += 1;
            }
            self.start_engine().await;
        } else {
            tracing::info!("the plan is unchanged: the engine keeps running");
        }
        self.publish();
    }

    /// Watches the directories of the config file and the model (and an Ollama manifest),
    /// and those of a replaced directory anew ([`dirs`]).
    fn update_watches(&mut self) {
        if !self.current.config.watch {
            self.watches = None;
            return;
        }
        if self.watches.is_none() {
            match dirs::DirWatches::new(self.fs_tx.clone()) {
                Ok(w) => self.watches = Some(w),
                Err(e) => {
                    self.error(format!("cannot watch files for changes: {e}"));
                    return;
                }
            }
        }
        let wanted = self
            .watched_files()
            .iter()
            .filter_map(|f| watch_dir(f))
            .collect();
        if let Some(w) = self.watches.as_mut() {
            w.set(wanted);
        }
    }

    /// The config, the applied model (all its splits, and its Ollama manifest), and the
    /// model files of a config that could not be prepared yet.
    fn watched_files(&self) -> Vec<PathBuf> {
        let mut v = vec![self.config_path.clone(), self.current.model.path.clone()];
        // every split of a split model (the first one is the path above)
        v.extend(self.current.snapshot.model.splits.iter().skip(1).cloned());
        if let Some(o) = &self.current.model.ollama {
            v.push(
                o.reference
                    .manifest_path(&self.current.config.ollama.models_dir),
            );
        }
        if let Some(c) = &self.unprepared {
            v.extend(model_files(c));
        }
        v
    }

    fn on_fs_event(&mut self, ev: notify::Event) {
        if let Some(w) = self.watches.as_mut() {
            w.note(&ev);
        }
        use notify::EventKind;
        use notify::event::{AccessKind, AccessMode};
        let relevant_kind = matches!(
            ev.kind,
            EventKind::Create(_)
                | EventKind::Modify(_)
                | EventKind::Remove(_)
                | EventKind::Access(AccessKind::Close(AccessMode::Write))
        );
        if !relevant_kind {
            return;
        }
        // A watched file, or a directory on the way to one that does not exist yet.
        let files = self.watched_files();
        if ev
            .paths
            .iter()
            .any(|p| files.iter().any(|f| f.starts_with(p)))
        {
            tracing::debug!("file event {:?} on {:?}", ev.kind, ev.paths);
            self.reload_at = Some(Instant::now() + DEBOUNCE);
        }
    }
}

/// The files a config's model is read from, as far as they can be known without resolving
/// it: the GGUF path (every split's, when its name is that of a split), or the Ollama
/// manifest in the config's model store.
fn model_files(config: &Config) -> Vec<PathBuf> {
    match &config.model {
        crate::config::ModelSource::Path(p) => {
            crate::gguf::split_paths_by_name(p).unwrap_or_else(|| vec![p.clone()])
        }
        crate::config::ModelSource::Ollama(name) => crate::ollama::ModelRef::parse(name)
            .map(|r| vec![r.manifest_path(&config.ollama.models_dir)])
            .unwrap_or_default(),
    }
}

/// The directory to watch for `file`: its parent, or the nearest ancestor that exists (a
/// download may create the directories first).
fn watch_dir(file: &Path) -> Option<PathBuf> {
    file.ancestors()
        .skip(1)
        .find(|d| d.is_dir())
        .map(Path::to_path_buf)
}

/// Whether a request failed because this process (or the system) has no file
/// descriptor left, not because of the peer.
fn out_of_descriptors(e: &crate::api::http::HttpError) -> bool {
    use rustix::io::Errno;
    match e {
        crate::api::http::HttpError::Connect { err, .. } => [Errno::MFILE, Errno::NFILE]
            .iter()
            .any(|n| err.raw_os_error() == Some(n.raw_os_error())),
        _ => false,
    }
}

/// Runs `fut` to completion while sending `WATCHDOG=1` when due, so that a long wait of the
/// supervisor (a reload's probe, stopping the engine) does not look like a hung daemon to
/// systemd.
async fn with_watchdog<F: std::future::Future>(
    watchdog: &mut Option<tokio::time::Interval>,
    notifier: &sd::Notifier,
    fut: F,
) -> F::Output {
    tokio::pin!(fut);
    loop {
        tokio::select! {
            out = &mut fut => return out,
            _ = tick(watchdog) => notifier.notify("WATCHDOG=1"),
        }
    }
}

/// Whether `host:port` can be bound (with SO_REUSEADDR, as llama-server binds it, so that
/// connections of a killed engine in TIME_WAIT do not count).
async fn port_free(host: &str, port: u16) -> std::io::Result<()> {
    let addr = tokio::net::lookup_host((host, port))
        .await?
        .next()
        .ok_or_else(|| std::io::Error::other(format!("{host} has no address")))?;
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    // Listening is what conflicts with another server on Linux, not binding alone.
    sock.listen(1).map(drop)
}

async fn wait_engine(
    engine: &mut Option<EngineChild>,
) -> std::io::Result<std::process::ExitStatus> {
    match engine {
        Some(c) => c.wait().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

async fn tick(i: &mut Option<tokio::time::Interval>) {
    match i {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A long wait of the supervisor (here a sleep standing in for a hung Ollama or a slow
    /// stop) still sends `WATCHDOG=1` every half interval.
    #[tokio::test]
    async fn long_waits_keep_the_watchdog_fed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let listener = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        listener.set_nonblocking(true).unwrap();
        let notifier = sd::Notifier::to_socket(&path, Some(Duration::from_millis(100))).unwrap();
        let mut watchdog = notifier.watchdog_interval().map(tokio::time::interval);
        // The interval's first tick is immediate; the loop would have taken it.
        tick(&mut watchdog).await;
        let out = with_watchdog(
            &mut watchdog,
            &notifier,
            tokio::time::sleep(Duration::from_millis(330)),
        )
        .await;
        assert_eq!(out, ());
        let mut pings = 0;
        let mut buf = [0u8; 64];
        while let Ok(n) = listener.recv(&mut buf) {
            assert_eq!(&buf[..n], b"WATCHDOG=1");
            pings += 1;
        }
        // Every 50 ms for 330 ms: 6, give or take a slow scheduler (none without the
        // helper).
        assert!((3..=7).contains(&pings), "{pings} pings");
    }

    #[test]
    fn a_health_check_without_descriptors_is_not_the_engines_failure() {
        use crate::api::http::HttpError;
        use rustix::io::Errno;
        let connect = |errno: Errno| HttpError::Connect {
            target: "127.0.0.1:8080".into(),
            err: std::io::Error::from_raw_os_error(errno.raw_os_error()),
        };
        assert!(out_of_descriptors(&connect(Errno::MFILE)));
        assert!(out_of_descriptors(&connect(Errno::NFILE)));
        assert!(!out_of_descriptors(&connect(Errno::CONNREFUSED)));
        assert!(!out_of_descriptors(&HttpError::Timeout {
            target: "127.0.0.1:8080".into(),
            timeout: Duration::from_secs(3),
        }));
    }

    #[test]
    fn model_files_of_a_config_not_yet_prepared() {
        let env = crate::config::ConfigEnv::default();
        let c = Config::parse(
            "model = \"models/m.gguf\"",
            Path::new("/etc/expertd/expertd.toml"),
            &env,
        )
        .unwrap();
        assert_eq!(
            model_files(&c),
            vec![PathBuf::from("/etc/expertd/models/m.gguf")]
        );
        let c = Config::parse(
            "model = \"ollama:qwen3:30b\"\n[ollama]\nmodels_dir = \"/srv/ollama\"",
            Path::new("/etc/expertd/expertd.toml"),
            &env,
        )
        .unwrap();
        assert_eq!(
            model_files(&c),
            vec![PathBuf::from(
                "/srv/ollama/manifests/registry.ollama.ai/library/qwen3/30b"
            )]
        );
        // A split model not there yet: every split, from the first's name.
        let c = Config::parse(
            "model = \"/m/q-00001-of-00002.gguf\"",
            Path::new("/etc/expertd/expertd.toml"),
            &env,
        )
        .unwrap();
        assert_eq!(
            model_files(&c),
            vec![
                PathBuf::from("/m/q-00001-of-00002.gguf"),
                PathBuf::from("/m/q-00002-of-00002.gguf")
            ]
        );
        // A directory that does not exist yet is watched through its nearest ancestor.
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a/b/m.gguf");
        assert_eq!(watch_dir(&f), Some(dir.path().to_path_buf()));
    }
}
