//! Config parsing: a table of bad configs and the key and reason each error must name, the
//! defaults a minimal config gets, and the example file in `systemd/` staying valid.

use std::path::{Path, PathBuf};
use std::time::Duration;

use expertd::config::{Budget, Config, ConfigEnv, ConfigError, KvType, ModelSource, PoolMode};

const PATH: &str = "/etc/expertd/expertd.toml";

fn user_env() -> ConfigEnv {
    ConfigEnv {
        uid: 1000,
        home: Some("/home/op".into()),
        xdg_runtime_dir: Some("/run/user/1000".into()),
        ..ConfigEnv::default()
    }
}

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new(PATH), &user_env())
}

/// (config text, the key the error must name, a fragment of the reason)
const BAD: &[(&str, &str, &str)] = &[
    ("", "model", "required"),
    ("model = \"\"", "model", "empty"),
    ("model = \"ollama:\"", "model", "empty Ollama model name"),
    ("model = \"ollama:a/b/c/d\"", "model", "too many '/'"),
    ("model = \"m.gguf\"\nmodle = 1", "modle", "unknown field"),
    (
        "model = \"m.gguf\"\n[memory]\nram = \"lots\"",
        "memory.ram",
        "size like",
    ),
    (
        "model = \"m.gguf\"\n[memory]\nram = \"12 parsecs\"",
        "memory.ram",
        "unknown unit",
    ),
    (
        "model = \"m.gguf\"\n[memory]\nram = -5",
        "memory.ram",
        "negative",
    ),
    (
        "model = \"m.gguf\"\n[memory]\nram = 0",
        "memory.ram",
        "more than 0",
    ),
    (
        "model = \"m.gguf\"\n[memory]\nvram = true",
        "memory.vram",
        "got boolean",
    ),
    (
        "model = \"m.gguf\"\n[memory]\nswap = \"1GiB\"",
        "swap",
        "unknown field",
    ),
    (
        "model = \"m.gguf\"\n[engine]\nport = 70000",
        "engine.port",
        "1..=65535",
    ),
    (
        "model = \"m.gguf\"\n[engine]\nport = \"http\"",
        "port",
        "invalid type",
    ),
    (
        "model = \"m.gguf\"\n[engine]\nhost = \"\"",
        "engine.host",
        "not a host",
    ),
    (
        "model = \"m.gguf\"\n[engine]\nextra_args = [\"--port\", \"1\"]",
        "engine.extra_args",
        "--port is set by expertd",
    ),
    (
        "model = \"m.gguf\"\nsocket = \"/run/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa/status.sock\"",
        "socket",
        "a unix socket path has at most 107",
    ),
    (
        "model = \"m.gguf\"\n[engine]\nextra_args = [\"--api-prefix\", \"/x\"]",
        "engine.extra_args",
        "--api-prefix moves /health",
    ),
    (
        "model = \"m.gguf\"\n[engine.env]\nLLAMA_ARG_API_PREFIX = \"/x\"",
        "engine.env",
        "LLAMA_ARG_API_PREFIX moves /health",
    ),
    (
        "model = \"m.gguf\"\n[engine]\nextra_args = [\"-m=x.gguf\"]",
        "engine.extra_args",
        "-m is set by expertd",
    ),
    (
        "model = \"m.gguf\"\n[engine]\nbinary = \"\"",
        "engine.binary",
        "empty",
    ),
    (
        "model = \"m.gguf\"\n[engine]\nstop_timeout_secs = 0",
        "engine.stop_timeout_secs",
        "positive",
    ),
    (
        "model = \"m.gguf\"\n[engine]\nstart_timeout_secs = 9223372036854775807",
        "engine.start_timeout_secs",
        "(1..=86400), got 9223372036854775807",
    ),
    (
        "model = \"m.gguf\"\n[engine]\nstop_timeout_secs = 86401",
        "engine.stop_timeout_secs",
        "1..=86400",
    ),
    (
        "model = \"m.gguf\"\n[restart]\nbackoff_initial_ms = 86400001",
        "restart.backoff_initial_ms",
        "1..=86400000",
    ),
    (
        "model = \"m.gguf\"\n[restart]\nbackoff_max_secs = 100000",
        "restart.backoff_max_secs",
        "1..=86400",
    ),
    (
        "model = \"m.gguf\"\n[restart]\ncrash_loop_window_secs = 100000",
        "restart.crash_loop_window_secs",
        "1..=86400",
    ),
    (
        "model = \"m.gguf\"\n[restart]\nreset_after_secs = 0",
        "restart.reset_after_secs",
        "positive",
    ),
    (
        "model = \"m.gguf\"\n[restart]\nreset_after_secs = 86401",
        "restart.reset_after_secs",
        "1..=86400",
    ),
    (
        "model = \"m.gguf\"\n[engine]\nenv = { \"A=B\" = \"1\" }",
        "engine.env",
        "not a variable name",
    ),
    (
        "model = \"m.gguf\"\n[pool]\nmode = \"maybe\"",
        "pool.mode",
        "\"auto\", \"on\" or \"off\"",
    ),
    (
        "model = \"m.gguf\"\n[pool]\npolicy = \"L R U\"",
        "pool.policy",
        "expected one of lru, least-stale, lfu-decay, lfru, erd",
    ),
    (
        "model = \"m.gguf\"\n[plan]\nctx_size = 100",
        "plan.ctx_size",
        "256..=",
    ),
    (
        "model = \"m.gguf\"\n[plan]\nkv_type = \"q5_1\"",
        "plan.kv_type",
        "\"q8_0\"",
    ),
    (
        "model = \"m.gguf\"\n[plan]\nthreads = -1",
        "plan.threads",
        "1..=4096",
    ),
    (
        "model = \"m.gguf\"\n[plan]\nparallel = 0",
        "plan.parallel",
        "1..=256",
    ),
    (
        "model = \"m.gguf\"\n[restart]\nbackoff_initial_ms = 5000\nbackoff_max_secs = 1",
        "restart.backoff_max_secs",
        "must not be below",
    ),
    (
        "model = \"m.gguf\"\n[restart]\ncrash_loop_restarts = 0",
        "restart.crash_loop_restarts",
        "positive",
    ),
    (
        "model = \"m.gguf\"\nstate_dir = \"relative/dir\"",
        "state_dir",
        "absolute",
    ),
    (
        "model = \"m.gguf\"\nsocket = \"s.sock\"",
        "socket",
        "absolute",
    ),
    (
        "model = \"m.gguf\"\n[ollama]\nurl = \"https://example\"",
        "ollama.url",
        "http:// URL",
    ),
    (
        "model = \"m.gguf\"\n[ollama]\nurl = \"http://h:port\"",
        "ollama.url",
        "bad port",
    ),
    ("model = \"m.gguf\" x", "model", "expected"),
];

#[test]
fn bad_configs_name_the_key_and_the_reason() {
    let mut failures = Vec::new();
    for (text, key, reason) in BAD {
        match parse(text) {
            Ok(_) => failures.push(format!("{text:?}: accepted")),
            Err(e) => {
                let msg = e.to_string();
                if !msg.contains(key) || !msg.contains(reason) || !msg.contains(PATH) {
                    failures.push(format!(
                        "{text:?}: message {msg:?} should name {key:?}, {reason:?} and the file"
                    ));
                }
                if let ConfigError::Invalid { key: k, .. } = &e {
                    assert_eq!(*k, *key, "{text:?}");
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn a_model_is_all_a_config_needs() {
    let c = parse("model = \"models/m.gguf\"").unwrap();
    assert_eq!(
        c.model,
        ModelSource::Path("/etc/expertd/models/m.gguf".into())
    );
    assert_eq!(c.memory.ram, Budget::Auto);
    assert_eq!(c.memory.vram, Budget::Auto);
    assert_eq!(c.memory.vram_reserve, 512 << 20);
    assert_eq!((c.engine.host.as_str(), c.engine.port), ("127.0.0.1", 8080));
    assert_eq!(c.engine.binary, None);
    assert_eq!(c.engine.stop_timeout, Duration::from_secs(10));
    assert_eq!(c.pool.mode, PoolMode::Auto);
    assert_eq!(c.pool.policy, "lfu-decay");
    assert!(!c.pool.prefetch && c.watch);
    assert_eq!(c.plan.parallel, 1);
    assert_eq!(c.restart.crash_loop_restarts, 5);
    assert_eq!(c.restart.reset_after, Duration::from_secs(120));
    // Not a service, not root: per-user places.
    assert_eq!(c.state_dir, PathBuf::from("/home/op/.local/state/expertd"));
    assert_eq!(
        c.socket,
        PathBuf::from("/run/user/1000/expertd/status.sock")
    );
    assert_eq!(
        c.client_sockets(),
        vec![
            PathBuf::from("/run/user/1000/expertd/status.sock"),
            PathBuf::from("/run/expertd/status.sock")
        ]
    );
    assert_eq!(c.ollama.url, "http://127.0.0.1:11434");
    assert_eq!(
        c.ollama.models_dir,
        PathBuf::from("/home/op/.ollama/models")
    );
}

#[test]
fn systemd_dirs_and_root_defaults() {
    let env = ConfigEnv {
        uid: 0,
        state_directory: Some("/var/lib/expertd".into()),
        runtime_directory: Some("/run/expertd".into()),
        ..ConfigEnv::default()
    };
    let c = Config::parse("model = \"ollama:qwen3:30b\"", Path::new(PATH), &env).unwrap();
    assert_eq!(c.model, ModelSource::Ollama("qwen3:30b".into()));
    assert_eq!(c.socket, PathBuf::from("/run/expertd/status.sock"));
    assert_eq!(c.state_dir, PathBuf::from("/var/lib/expertd"));
    assert_eq!(
        c.ollama.models_dir,
        PathBuf::from("/usr/share/ollama/.ollama/models")
    );
    let nobody = ConfigEnv {
        uid: 4242,
        ..ConfigEnv::default()
    };
    let c = Config::parse("model = \"/m.gguf\"", Path::new(PATH), &nobody).unwrap();
    assert_eq!(c.socket, PathBuf::from("/tmp/expertd-4242/status.sock"));
    assert_eq!(c.state_dir, PathBuf::from("/tmp/expertd-4242/state"));
    let ollama_env = ConfigEnv {
        ollama_host: Some("0.0.0.0:9999".into()),
        ..nobody
    };
    let c = Config::parse("model = \"/m.gguf\"", Path::new(PATH), &ollama_env).unwrap();
    assert_eq!(c.ollama.url, "http://0.0.0.0:9999");
}

#[test]
fn every_key_parses() {
    let c = parse(
        r#"
model = "/srv/m.gguf"
state_dir = "/srv/state"
socket = "/srv/s.sock"
watch = false
[memory]
ram = "24GiB"
vram = 10000000000
ram_reserve = "2GiB"
vram_reserve = "1GiB"
[engine]
binary = "/opt/llama-server"
host = "0.0.0.0"
port = 9000
extra_args = ["--jinja"]
env = { CUDA_VISIBLE_DEVICES = "0" }
start_timeout_secs = 60
stop_timeout_secs = 3
[pool]
mode = "on"
policy = "lru"
prefetch = true
[plan]
ctx_size = 8192
kv_type = "q8_0"
threads = 4
parallel = 2
[restart]
backoff_initial_ms = 100
backoff_max_secs = 5
crash_loop_restarts = 3
crash_loop_window_secs = 60
reset_after_secs = 90
[ollama]
url = "http://10.0.0.2:11434"
models_dir = "/srv/ollama"
"#,
    )
    .unwrap();
    assert_eq!(c.memory.ram, Budget::Bytes(24 << 30));
    assert_eq!(c.memory.ram_reserve, Some(2 << 30));
    assert_eq!(
        c.engine.env.get("CUDA_VISIBLE_DEVICES").map(String::as_str),
        Some("0")
    );
    assert_eq!(c.plan.kv_type, Some(KvType::Q8_0));
    assert!(c.pool.prefetch);
    assert_eq!(c.restart.backoff_initial, Duration::from_millis(100));
    assert_eq!(c.restart.reset_after, Duration::from_secs(90));
    assert!(c.socket_explicit && !c.watch);
    assert_eq!(c.client_sockets(), vec![PathBuf::from("/srv/s.sock")]);
    // The largest durations are accepted.
    let c = parse("model = \"m\"\n[engine]\nstart_timeout_secs = 86400\n[restart]\nbackoff_initial_ms = 86400000\nbackoff_max_secs = 86400").unwrap();
    assert_eq!(c.engine.start_timeout, Duration::from_secs(86400));
    assert_eq!(c.restart.backoff_initial, Duration::from_millis(86_400_000));
}

#[test]
fn the_example_config_is_valid_and_documents_every_key() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/expertd.toml.example");
    let text = std::fs::read_to_string(&example).unwrap();
    // The example has every key commented out but `model`; uncommenting all of them must
    // give a valid config too.
    parse(&text).unwrap();
    let uncommented: String = text
        .lines()
        .map(|l| {
            l.strip_prefix("# ")
                .filter(|r| looks_like_setting(r))
                .unwrap_or(l)
        })
        .collect::<Vec<_>>()
        .join("\n");
    let c = parse(&uncommented).unwrap_or_else(|e| panic!("uncommented example: {e}"));
    for key in [
        "state_dir",
        "socket",
        "watch",
        "ram",
        "vram",
        "ram_reserve",
        "vram_reserve",
        "binary",
        "host",
        "port",
        "extra_args",
        "env",
        "start_timeout_secs",
        "stop_timeout_secs",
        "mode",
        "policy",
        "prefetch",
        "ctx_size",
        "kv_type",
        "threads",
        "parallel",
        "backoff_initial_ms",
        "backoff_max_secs",
        "crash_loop_restarts",
        "crash_loop_window_secs",
        "reset_after_secs",
        "url",
        "models_dir",
    ] {
        assert!(
            uncommented
                .lines()
                .any(|l| l.starts_with(&format!("{key} ="))),
            "example does not document {key}"
        );
    }
    assert_eq!(c.engine.port, 8080);
}

fn looks_like_setting(s: &str) -> bool {
    s.starts_with('[')
        || s.split_once(" = ")
            .is_some_and(|(k, _)| k.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
}
