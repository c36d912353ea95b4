//! The daemon's configuration: a TOML file, by default `/etc/expertd/expertd.toml`.
//!
//! Only `model` is required; every other key has a default, documented on the field and
//! in `systemd/expertd.toml.example`. Unknown keys and bad values are errors that name the
//! key and the reason. Parsing is split in two: serde reads the file into a raw form
//! (`deny_unknown_fields`, every leaf optional), then [`Config::from_raw`] checks every
//! value and fills in the defaults. Which file is read: `--config PATH` if given, else
//! `$EXPERTD_CONFIG` if set and non-empty, else `/etc/expertd/expertd.toml`.
//!
//! Invariants: loading does no I/O but reading the one file (defaults that depend on the
//! environment come from a [`ConfigEnv`] value), and it never checks that paths exist:
//! that is the supervisor's job when it resolves the model and the engine.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// The system-wide config file, used when neither `--config` nor `$EXPERTD_CONFIG` names one.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/expertd/expertd.toml";
/// Environment variable naming the config file (below `--config`, above the default).
pub const CONFIG_ENV: &str = "EXPERTD_CONFIG";
/// The longest path a unix socket can have on Linux (`sun_path` is 108 bytes with NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Where a service's status socket is, when the config does not name one.
pub const SERVICE_SOCKET: &str = "/run/expertd/status.sock";
/// The engine's path in a system install (the package puts the patched llama-server here).
pub const INSTALLED_ENGINE: &str = "/usr/lib/expertd/bin/llama-server";

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

/// Why a config was rejected. Every message names the file and, for a value, the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {err}")]
    Read { path: PathBuf, err: std::io::Error },
    /// The file is not valid TOML or has an unknown key or a value of the wrong type.
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// A value is out of range or malformed.
    #[error("config {path}: {key}: {reason}")]
    Invalid {
        path: PathBuf,
        key: &'static str,
        reason: String,
    },
}

impl ConfigError {
    /// The key the error is about, when it is about one value.
    pub fn key(&self) -> Option<&'static str> {
        match self {
            ConfigError::Invalid { key, .. } => Some(key),
            _ => None,
        }
    }
}

/// Which config file to read and why (for messages).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigLocation {
    pub path: PathBuf,
    /// "--config", "$EXPERTD_CONFIG" or "default".
    pub source: &'static str,
}

/// Picks the config file: explicit flag > `$EXPERTD_CONFIG` (non-empty) > the /etc path.
pub fn locate(flag: Option<&Path>, env_value: Option<&str>) -> ConfigLocation {
    if let Some(p) = flag {
        return ConfigLocation {
            path: p.to_path_buf(),
            source: "--config",
        };
    }
    if let Some(v) = env_value.filter(|v| !v.is_empty()) {
        return ConfigLocation {
            path: PathBuf::from(v),
            source: "$EXPERTD_CONFIG",
        };
    }
    ConfigLocation {
        path: PathBuf::from(DEFAULT_CONFIG_PATH),
        source: "default",
    }
}

/// The parts of the process environment that defaults depend on. A value, so that tests
/// can load configs as root, as a user, or under systemd without touching the real one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConfigEnv {
    pub uid: u32,
    /// `$STATE_DIRECTORY`, set by systemd for `StateDirectory=`.
    pub state_directory: Option<PathBuf>,
    /// `$RUNTIME_DIRECTORY`, set by systemd for `RuntimeDirectory=`.
    pub runtime_directory: Option<PathBuf>,
    pub xdg_runtime_dir: Option<PathBuf>,
    pub xdg_state_home: Option<PathBuf>,
    pub home: Option<PathBuf>,
    /// `$OLLAMA_HOST`, Ollama's own variable for its address.
    pub ollama_host: Option<String>,
    /// `$OLLAMA_MODELS`, Ollama's own variable for its model store.
    pub ollama_models: Option<PathBuf>,
}

impl ConfigEnv {
    /// Reads the variables of this process.
    pub fn from_process() -> ConfigEnv {
        fn path_var(name: &str) -> Option<PathBuf> {
            std::env::var_os(name)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        }
        // systemd separates several directories with ':'; the first is ours.
        fn first_dir(name: &str) -> Option<PathBuf> {
            let v = std::env::var(name).ok()?;
            v.split(':').find(|s| !s.is_empty()).map(PathBuf::from)
        }
        ConfigEnv {
            uid: rustix::process::getuid().as_raw(),
            state_directory: first_dir("STATE_DIRECTORY"),
            runtime_directory: first_dir("RUNTIME_DIRECTORY"),
            xdg_runtime_dir: path_var("XDG_RUNTIME_DIR"),
            xdg_state_home: path_var("XDG_STATE_HOME"),
            home: path_var("HOME"),
            ollama_host: std::env::var("OLLAMA_HOST").ok().filter(|v| !v.is_empty()),
            ollama_models: path_var("OLLAMA_MODELS"),
        }
    }

    /// Default state directory: systemd's `$STATE_DIRECTORY`, else `/var/lib/expertd` for
    /// root, else `$XDG_STATE_HOME/expertd`, `~/.local/state/expertd`, `/tmp/expertd-UID/state`.
    pub fn default_state_dir(&self) -> PathBuf {
        if let Some(d) = &self.state_directory {
            return d.clone();
        }
        if self.uid == 0 {
            return PathBuf::from("/var/lib/expertd");
        }
        if let Some(d) = &self.xdg_state_home {
            return d.join("expertd");
        }
        if let Some(h) = &self.home {
            return h.join(".local/state/expertd");
        }
        PathBuf::from(format!("/tmp/expertd-{}/state", self.uid))
    }

    /// Default socket: `$RUNTIME_DIRECTORY/status.sock`, else `/run/expertd/status.sock`
    /// for root, else `$XDG_RUNTIME_DIR/expertd/status.sock`, else `/tmp/expertd-UID/status.sock`.
    pub fn default_socket(&self) -> PathBuf {
        if let Some(d) = &self.runtime_directory {
            return d.join("status.sock");
        }
        if self.uid == 0 {
            return PathBuf::from(SERVICE_SOCKET);
        }
        if let Some(d) = &self.xdg_runtime_dir {
            return d.join("expertd/status.sock");
        }
        PathBuf::from(format!("/tmp/expertd-{}/status.sock", self.uid))
    }

    /// Default Ollama store: `$OLLAMA_MODELS`, else the service install's
    /// `/usr/share/ollama/.ollama/models` for root, else `~/.ollama/models`.
    pub fn default_ollama_models(&self) -> PathBuf {
        if let Some(d) = &self.ollama_models {
            return d.clone();
        }
        match (&self.home, self.uid) {
            (Some(h), uid) if uid != 0 => h.join(".ollama/models"),
            _ => PathBuf::from("/usr/share/ollama/.ollama/models"),
        }
    }
}

/// Where the model comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelSource {
    /// A GGUF file (absolute; a relative path in the file is taken from the file's directory).
    Path(PathBuf),
    /// `ollama:NAME[:TAG]`: resolved through Ollama's API and store to the GGUF blob.
    Ollama(String),
}

impl std::fmt::Display for ModelSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModelSource::Path(p) => write!(f, "{}", p.display()),
            ModelSource::Ollama(n) => write!(f, "ollama:{n}"),
        }
    }
}

/// A memory budget: sized from the probe, or a fixed number of bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Budget {
    /// Total memory of the tier (RAM: the smaller of physical RAM and the cgroup limit)
    /// minus the tier's reserve.
    Auto,
    Bytes(u64),
}

/// Whether the engine runs with the expert pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolMode {
    /// On only when the model does not fit the budgets (stock is fastest when it fits).
    Auto,
    On,
    Off,
}

/// KV cache element type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum KvType {
    F16,
    Q8_0,
    Q4_0,
}

impl KvType {
    /// The name llama-server's `--cache-type-k/v` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            KvType::F16 => "f16",
            KvType::Q8_0 => "q8_0",
            KvType::Q4_0 => "q4_0",
        }
    }

    /// Bytes of this type per f16 byte, as a ratio (num, den): f16 2 bytes per element,
    /// q8_0 34 bytes per 32, q4_0 18 bytes per 32.
    pub fn ratio_to_f16(self) -> (u64, u64) {
        match self {
            KvType::F16 => (1, 1),
            KvType::Q8_0 => (34, 64),
            KvType::Q4_0 => (18, 64),
        }
    }
}

/// Memory budgets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryConfig {
    /// `memory.ram`: RAM for the engine; default "auto".
    pub ram: Budget,
    /// `memory.vram`: VRAM for the engine, all GPUs together; default "auto".
    pub vram: Budget,
    /// `memory.ram_reserve`: RAM left to the rest of the host under "auto"; default "auto"
    /// (`None`): 10% of RAM (or of the cgroup limit), at least 256 MiB and at most 4 GiB.
    pub ram_reserve: Option<u64>,
    /// `memory.vram_reserve`: VRAM left free per GPU under "auto"; default 512 MiB.
    pub vram_reserve: u64,
}

/// The engine process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineConfig {
    /// `engine.binary`: llama-server to run; default: the built patched llama-server next
    /// to expertd's target dir, else [`INSTALLED_ENGINE`]. `None` means "find it".
    pub binary: Option<PathBuf>,
    /// `engine.host`: address the engine listens on; default "127.0.0.1".
    pub host: String,
    /// `engine.port`: port the engine listens on; default 8080.
    pub port: u16,
    /// `engine.extra_args`: appended after the planned arguments (llama-server takes the
    /// last of a repeated flag, so these override the plan); default none.
    pub extra_args: Vec<String>,
    /// `engine.env`: extra environment for the engine; default none.
    pub env: BTreeMap<String, String>,
    /// `engine.start_timeout_secs`: how long loading may take before `/health` answers;
    /// default 600.
    pub start_timeout: Duration,
    /// `engine.stop_timeout_secs`: SIGTERM to SIGKILL; default 10.
    pub stop_timeout: Duration,
}

/// Expert pool choices the planner takes as given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolConfig {
    /// `pool.mode`: "auto" | "on" | "off"; default "auto".
    pub mode: PoolMode,
    /// `pool.policy`: eviction policy passed to the engine (one of [`POLICIES`]); default
    /// [`DEFAULT_POLICY`].
    pub policy: String,
    /// `pool.prefetch`: during decode, read the next layer's likely experts ahead; default
    /// false (measured not to pay on the bench models: `bench/RESULTS.md`).
    pub prefetch: bool,
}

/// Overrides of planned values; `None` lets the planner choose.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PlanOverrides {
    /// `plan.ctx_size`: context size in tokens; 0 or absent = auto.
    pub ctx_size: Option<u32>,
    /// `plan.kv_type`: "auto" | "f16" | "q8_0" | "q4_0".
    pub kv_type: Option<KvType>,
    /// `plan.threads`: decode threads; 0 or absent = auto.
    pub threads: Option<u32>,
    /// `plan.parallel`: concurrent sequences the engine serves; default 1.
    pub parallel: u32,
}

/// The engine's eviction policies (`--expert-pool-policy`).
pub const POLICIES: &[&str] = &["lru", "least-stale", "lfu-decay", "lfru", "erd"];

/// The policy the pool's benchmarks found closest to Belady's optimum (bench/RESULTS.md).
pub const DEFAULT_POLICY: &str = "lfu-decay";

/// Restart policy after an engine crash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestartConfig {
    /// `restart.backoff_initial_ms`: delay before the first restart; default 500.
    pub backoff_initial: Duration,
    /// `restart.backoff_max_secs`: the delay doubles per crash up to this; default 30.
    pub backoff_max: Duration,
    /// `restart.crash_loop_restarts`: this many crashes within the window stop the
    /// restarts (reported as a crash loop); default 5.
    pub crash_loop_restarts: u32,
    /// `restart.crash_loop_window_secs`: default 300.
    pub crash_loop_window: Duration,
    /// `restart.reset_after_secs`: an engine that served this long before it crashed
    /// starts the crash history afresh (its crash gets the first backoff); default 120.
    pub reset_after: Duration,
}

/// Where Ollama is, for `ollama:` models.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OllamaConfig {
    /// `ollama.url`: Ollama's API; default `$OLLAMA_HOST` or "http://127.0.0.1:11434".
    pub url: String,
    /// `ollama.models_dir`: Ollama's model store; default `$OLLAMA_MODELS`, else
    /// `/usr/share/ollama/.ollama/models` (root) or `~/.ollama/models`.
    pub models_dir: PathBuf,
}

/// A checked configuration with every default filled in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The file it was read from, if any.
    pub path: Option<PathBuf>,
    /// `model`: a GGUF path or `ollama:NAME[:TAG]`. Required.
    pub model: ModelSource,
    /// `state_dir`: probe cache and other state; see [`ConfigEnv::default_state_dir`].
    pub state_dir: PathBuf,
    /// `socket`: the status API's unix socket; see [`ConfigEnv::default_socket`].
    pub socket: PathBuf,
    /// Whether `socket` was set in the file (clients then try only that path).
    pub socket_explicit: bool,
    /// `watch`: re-plan when the config or the model file changes; default true.
    pub watch: bool,
    pub memory: MemoryConfig,
    pub engine: EngineConfig,
    pub pool: PoolConfig,
    pub plan: PlanOverrides,
    pub restart: RestartConfig,
    pub ollama: OllamaConfig,
}

// ---- raw form, as serde reads it ----

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    model: Option<String>,
    state_dir: Option<PathBuf>,
    socket: Option<PathBuf>,
    watch: Option<bool>,
    #[serde(default)]
    memory: RawMemory,
    #[serde(default)]
    engine: RawEngine,
    #[serde(default)]
    pool: RawPool,
    #[serde(default)]
    plan: RawPlan,
    #[serde(default)]
    restart: RawRestart,
    #[serde(default)]
    ollama: RawOllama,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMemory {
    ram: Option<toml::Value>,
    vram: Option<toml::Value>,
    ram_reserve: Option<toml::Value>,
    vram_reserve: Option<toml::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEngine {
    binary: Option<PathBuf>,
    host: Option<String>,
    port: Option<i64>,
    extra_args: Option<Vec<String>>,
    env: Option<BTreeMap<String, String>>,
    start_timeout_secs: Option<i64>,
    stop_timeout_secs: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPool {
    mode: Option<String>,
    policy: Option<String>,
    prefetch: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlan {
    ctx_size: Option<i64>,
    kv_type: Option<String>,
    threads: Option<i64>,
    parallel: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRestart {
    backoff_initial_ms: Option<i64>,
    backoff_max_secs: Option<i64>,
    crash_loop_restarts: Option<i64>,
    crash_loop_window_secs: Option<i64>,
    reset_after_secs: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOllama {
    url: Option<String>,
    models_dir: Option<PathBuf>,
}

/// Flags llama-server must get from the plan, not from `engine.extra_args`: the daemon
/// relies on them (model, address) or they are what the plan is about.
/// Flags expertd sets, or that would move what it relies on: the model, the address,
/// the pool's stats file, and the path of `/health` (`--api-prefix`: the health checks
/// would get 404 and the engine would be killed as unresponsive).
const RESERVED_ENGINE_ARGS: &[&str] = &[
    "-m",
    "--model",
    "--host",
    "--port",
    "--expert-pool-stats",
    "--api-prefix",
];

impl Config {
    /// Reads and checks the file at `path` with this process's environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        // Absolute, so that relative paths in it and file-watch events match.
        let path = &std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let text = std::fs::read_to_string(path).map_err(|err| ConfigError::Read {
            path: path.to_path_buf(),
            err,
        })?;
        Config::parse(&text, path, &ConfigEnv::from_process())
    }

    /// Parses and checks config text; `path` is used in messages and to resolve a relative
    /// model path (against its directory).
    pub fn parse(text: &str, path: &Path, env: &ConfigEnv) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        Config::from_raw(raw, path, env)
    }

    fn from_raw(raw: RawConfig, path: &Path, env: &ConfigEnv) -> Result<Config, ConfigError> {
        let invalid = |key: &'static str, reason: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            key,
            reason,
        };
        let base_dir = path.parent().unwrap_or(Path::new("/"));

        let model = match raw.model.as_deref().map(str::trim) {
            None => {
                return Err(invalid(
                    "model",
                    "required: a GGUF path or \"ollama:NAME[:TAG]\"".into(),
                ));
            }
            Some("") => return Err(invalid("model", "must not be empty".into())),
            Some(m) => match m.strip_prefix("ollama:") {
                Some(name) => {
                    crate::ollama::ModelRef::parse(name)
                        .map_err(|reason| invalid("model", reason))?;
                    ModelSource::Ollama(name.to_string())
                }
                None => ModelSource::Path(absolute(base_dir, Path::new(m))),
            },
        };

        let state_dir = match raw.state_dir {
            Some(p) => require_absolute(p, "state_dir").map_err(|r| invalid("state_dir", r))?,
            None => env.default_state_dir(),
        };
        let socket_explicit = raw.socket.is_some();
        let socket = match raw.socket {
            Some(p) => require_absolute(p, "socket").map_err(|r| invalid("socket", r))?,
            None => env.default_socket(),
        };
        // sockaddr_un holds 108 bytes with the terminating NUL.
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(invalid(
                "socket",
                format!(
                    "{} is {} bytes long; a unix socket path has at most {MAX_SOCKET_PATH}{}",
                    socket.display(),
                    socket.as_os_str().len(),
                    if socket_explicit {
                        ""
                    } else {
                        " (set `socket` to a shorter path)"
                    }
                ),
            ));
        }

        let m = raw.memory;
        let memory = MemoryConfig {
            ram: budget(m.ram.as_ref()).map_err(|r| invalid("memory.ram", r))?,
            vram: budget(m.vram.as_ref()).map_err(|r| invalid("memory.vram", r))?,
            ram_reserve: match m.ram_reserve.as_ref() {
                None => None,
                Some(v) => match budget(Some(v)).map_err(|r| invalid("memory.ram_reserve", r))? {
                    Budget::Auto => None,
                    Budget::Bytes(b) => Some(b),
                },
            },
            vram_reserve: match m.vram_reserve.as_ref() {
                None => 512 * MIB,
                Some(v) => match budget(Some(v)).map_err(|r| invalid("memory.vram_reserve", r))? {
                    Budget::Auto => 512 * MIB,
                    Budget::Bytes(b) => b,
                },
            },
        };
        if memory.ram == Budget::Bytes(0) {
            return Err(invalid(
                "memory.ram",
                "must be more than 0 (or \"auto\")".into(),
            ));
        }

        let e = raw.engine;
        let host = e.host.unwrap_or_else(|| "127.0.0.1".into());
        if host.trim().is_empty() || host.contains(char::is_whitespace) {
            return Err(invalid(
                "engine.host",
                format!("not a host name or address: {host:?}"),
            ));
        }
        let port = match e.port {
            None => 8080,
            Some(p) if (1..=65535).contains(&p) => p as u16,
            Some(p) => {
                return Err(invalid(
                    "engine.port",
                    format!("must be 1..=65535, got {p}"),
                ));
            }
        };
        let extra_args = e.extra_args.unwrap_or_default();
        for a in &extra_args {
            let flag = a.split('=').next().unwrap_or(a);
            if RESERVED_ENGINE_ARGS.contains(&flag) {
                return Err(invalid(
                    "engine.extra_args",
                    if flag == "--api-prefix" {
                        format!(
                            "{flag} moves /health, which expertd checks to know the engine is up"
                        )
                    } else {
                        format!(
                            "{flag} is set by expertd (use `model`, `engine.host`, `engine.port`)"
                        )
                    },
                ));
            }
        }
        let env_vars = e.env.unwrap_or_default();
        for k in env_vars.keys() {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(invalid("engine.env", format!("not a variable name: {k:?}")));
            }
            if k == "LLAMA_ARG_API_PREFIX" {
                return Err(invalid(
                    "engine.env",
                    format!("{k} moves /health, which expertd checks to know the engine is up"),
                ));
            }
        }
        let binary = match e.binary {
            Some(p) if p.as_os_str().is_empty() => {
                return Err(invalid("engine.binary", "must not be empty".into()));
            }
            Some(p) => Some(absolute(base_dir, &p)),
            None => None,
        };
        let engine = EngineConfig {
            binary,
            host,
            port,
            extra_args,
            env: env_vars,
            start_timeout: seconds(e.start_timeout_secs, 600)
                .map_err(|r| invalid("engine.start_timeout_secs", r))?,
            stop_timeout: seconds(e.stop_timeout_secs, 10)
                .map_err(|r| invalid("engine.stop_timeout_secs", r))?,
        };

        let p = raw.pool;
        let mode = match p.mode.as_deref() {
            None | Some("auto") => PoolMode::Auto,
            Some("on") => PoolMode::On,
            Some("off") => PoolMode::Off,
            Some(o) => {
                return Err(invalid(
                    "pool.mode",
                    format!("expected \"auto\", \"on\" or \"off\", got {o:?}"),
                ));
            }
        };
        let policy = p.policy.unwrap_or_else(|| DEFAULT_POLICY.into());
        if !POLICIES.contains(&policy.as_str()) {
            return Err(invalid(
                "pool.policy",
                format!("expected one of {}, got {policy:?}", POLICIES.join(", ")),
            ));
        }
        let pool = PoolConfig {
            mode,
            policy,
            prefetch: p.prefetch.unwrap_or(false),
        };

        let pl = raw.plan;
        let ctx_size = match pl.ctx_size {
            None | Some(0) => None,
            Some(c) if (256..=16 * 1024 * 1024).contains(&c) => Some(c as u32),
            Some(c) => {
                return Err(invalid(
                    "plan.ctx_size",
                    format!("must be 0 (auto) or 256..=16777216, got {c}"),
                ));
            }
        };
        let kv_type = match pl.kv_type.as_deref() {
            None | Some("auto") => None,
            Some("f16") => Some(KvType::F16),
            Some("q8_0") => Some(KvType::Q8_0),
            Some("q4_0") => Some(KvType::Q4_0),
            Some(o) => {
                return Err(invalid(
                    "plan.kv_type",
                    format!("expected \"auto\", \"f16\", \"q8_0\" or \"q4_0\", got {o:?}"),
                ));
            }
        };
        let threads = match pl.threads {
            None | Some(0) => None,
            Some(t) if (1..=4096).contains(&t) => Some(t as u32),
            Some(t) => {
                return Err(invalid(
                    "plan.threads",
                    format!("must be 0 (auto) or 1..=4096, got {t}"),
                ));
            }
        };
        let parallel = match pl.parallel {
            None => 1,
            Some(n) if (1..=256).contains(&n) => n as u32,
            Some(n) => {
                return Err(invalid(
                    "plan.parallel",
                    format!("must be 1..=256, got {n}"),
                ));
            }
        };
        let plan = PlanOverrides {
            ctx_size,
            kv_type,
            threads,
            parallel,
        };

        let r = raw.restart;
        let backoff_initial = millis(r.backoff_initial_ms, 500)
            .map_err(|e| invalid("restart.backoff_initial_ms", e))?;
        let backoff_max =
            seconds(r.backoff_max_secs, 30).map_err(|e| invalid("restart.backoff_max_secs", e))?;
        if backoff_max < backoff_initial {
            return Err(invalid(
                "restart.backoff_max_secs",
                format!(
                    "must not be below restart.backoff_initial_ms ({} ms)",
                    backoff_initial.as_millis()
                ),
            ));
        }
        let restart = RestartConfig {
            backoff_initial,
            backoff_max,
            crash_loop_restarts: positive(r.crash_loop_restarts, 5)
                .map_err(|e| invalid("restart.crash_loop_restarts", e))?
                .min(u32::MAX as u64) as u32,
            crash_loop_window: seconds(r.crash_loop_window_secs, 300)
                .map_err(|e| invalid("restart.crash_loop_window_secs", e))?,
            reset_after: seconds(r.reset_after_secs, 120)
                .map_err(|e| invalid("restart.reset_after_secs", e))?,
        };

        let o = raw.ollama;
        let url = o
            .url
            .or_else(|| env.ollama_host.as_deref().map(ollama_host_to_url))
            .unwrap_or_else(|| "http://127.0.0.1:11434".into());
        crate::ollama::parse_http_url(&url).map_err(|r| invalid("ollama.url", r))?;
        let ollama = OllamaConfig {
            url,
            models_dir: match o.models_dir {
                Some(p) => absolute(base_dir, &p),
                None => env.default_ollama_models(),
            },
        };

        Ok(Config {
            path: Some(path.to_path_buf()),
            model,
            state_dir,
            socket,
            socket_explicit,
            watch: raw.watch.unwrap_or(true),
            memory,
            engine,
            pool,
            plan,
            restart,
            ollama,
        })
    }

    /// Sockets a client tries, in order: the configured one; when the config names none,
    /// also the service's socket (an operator's `expertd status` finds the service).
    pub fn client_sockets(&self) -> Vec<PathBuf> {
        let mut v = vec![self.socket.clone()];
        if !self.socket_explicit && self.socket != Path::new(SERVICE_SOCKET) {
            v.push(PathBuf::from(SERVICE_SOCKET));
        }
        v
    }
}

/// `OLLAMA_HOST` may be "host:port", "host", or a URL; the API wants a URL.
fn ollama_host_to_url(v: &str) -> String {
    if v.starts_with("http://") || v.starts_with("https://") {
        v.to_string()
    } else if v.contains(':') {
        format!("http://{v}")
    } else {
        format!("http://{v}:11434")
    }
}

fn absolute(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

fn require_absolute(p: PathBuf, what: &str) -> Result<PathBuf, String> {
    if p.is_absolute() {
        Ok(p)
    } else {
        Err(format!(
            "{what} must be an absolute path, got {:?}",
            p.display().to_string()
        ))
    }
}

fn positive(v: Option<i64>, default: u64) -> Result<u64, String> {
    match v {
        None => Ok(default),
        Some(n) if n > 0 => Ok(n as u64),
        Some(n) => Err(format!("must be a positive integer, got {n}")),
    }
}

/// The longest any duration key may be: one day. Longer values are surely mistakes, and
/// the supervisor adds durations to the clock, which must not overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 60 * 60);

/// A `*_secs` key: 1..=86400.
fn seconds(v: Option<i64>, default: u64) -> Result<Duration, String> {
    in_range(v, default, MAX_DURATION.as_secs()).map(Duration::from_secs)
}

/// A `*_ms` key: 1..=86400000.
fn millis(v: Option<i64>, default: u64) -> Result<Duration, String> {
    in_range(v, default, MAX_DURATION.as_millis() as u64).map(Duration::from_millis)
}

fn in_range(v: Option<i64>, default: u64, max: u64) -> Result<u64, String> {
    match v {
        None => Ok(default),
        Some(n) if n > 0 && n as u64 <= max => Ok(n as u64),
        Some(n) => Err(format!(
            "must be a positive integer up to one day (1..={max}), got {n}"
        )),
    }
}

/// "auto", a size string ("24GiB", "512 MiB", "1.5GB"), or a number of bytes.
fn budget(v: Option<&toml::Value>) -> Result<Budget, String> {
    match v {
        None => Ok(Budget::Auto),
        Some(toml::Value::Integer(n)) if *n >= 0 => Ok(Budget::Bytes(*n as u64)),
        Some(toml::Value::Integer(n)) => Err(format!("must not be negative, got {n}")),
        Some(toml::Value::String(s)) if s.trim() == "auto" => Ok(Budget::Auto),
        Some(toml::Value::String(s)) => parse_size(s).map(Budget::Bytes),
        Some(other) => Err(format!(
            "expected \"auto\", a size like \"24GiB\" or a number of bytes, got {} {other}",
            other.type_str()
        )),
    }
}

/// Parses "24GiB", "512 MiB", "1.5GB", "1000000" (bytes). Binary (KiB, MiB, GiB, TiB) and
/// decimal (KB, MB, GB, TB) units, case-insensitive; "B" or no unit means bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(format!(
            "expected \"auto\" or a size like \"24GiB\", got {s:?}"
        ));
    }
    let unit = unit.trim().to_ascii_lowercase();
    let mult: u64 = match unit.as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => {
            return Err(format!(
                "unknown unit {unit:?} in {s:?} (use B, KiB, MiB, GiB, TiB, KB, MB, GB or TB)"
            ));
        }
    };
    let value: f64 = num
        .parse()
        .map_err(|_| format!("expected \"auto\" or a size like \"24GiB\", got {s:?}"))?;
    let bytes = value * mult as f64;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(format!("size too large: {s:?}"));
    }
    Ok(bytes.round() as u64)
}

/// Formats bytes for people: "1.50 GiB", "512 MiB", "100 B".
pub fn human_bytes(b: u64) -> String {
    if b >= GIB {
        format!("{:.2} GiB", b as f64 / GIB as f64)
    } else if b >= MIB {
        format!("{:.0} MiB", b as f64 / MIB as f64)
    } else if b >= 1024 {
        format!("{:.0} KiB", b as f64 / 1024.0)
    } else {
        format!("{b} B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("24GiB"), Ok(24 * GIB));
        assert_eq!(parse_size("512 MiB"), Ok(512 * MIB));
        assert_eq!(parse_size("1.5gb"), Ok(1_500_000_000));
        assert_eq!(parse_size("100"), Ok(100));
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("GiB").is_err());
    }

    #[test]
    fn locate_precedence() {
        let flag = Path::new("/a.toml");
        assert_eq!(locate(Some(flag), Some("/b.toml")).path, flag);
        assert_eq!(locate(None, Some("/b.toml")).path, Path::new("/b.toml"));
        assert_eq!(locate(None, Some("")).path, Path::new(DEFAULT_CONFIG_PATH));
        assert_eq!(locate(None, None).source, "default");
    }
}
