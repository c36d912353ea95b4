//! Support for the daemon's end-to-end tests (`tests/tests/daemon_*.rs`): the `expertd` and
//! `llama-server` binaries, a synthetic model, free ports, and a [`Daemon`] handle that runs
//! `expertd serve` as a child process, asks it for status, and kills what is left on drop.
//!
//! Nothing here skips: a missing engine binary is a test failure with the reason.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// The workspace root (holds `target/`, `vendor/`).
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The llama-server the daemon tests run: `$EXPERTD_TEST_ENGINE`, else the patched build
/// `target/engine/cpu/bin/llama-server`, else the stock build
/// `target/engine-stock/cpu/bin/llama-server`. Panics (fails the test) when none exists.
pub fn engine_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("EXPERTD_TEST_ENGINE") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "$EXPERTD_TEST_ENGINE={} is not a file",
            p.display()
        );
        return p;
    }
    let ws = workspace();
    let candidates = [
        ws.join("target/engine/cpu/bin/llama-server"),
        ws.join("target/engine-stock/cpu/bin/llama-server"),
    ];
    for c in &candidates {
        if c.is_file() {
            return c.clone();
        }
    }
    panic!(
        "no llama-server: none of {} exists; build it with `expertd engine build` (or set $EXPERTD_TEST_ENGINE)",
        candidates
            .iter()
            .map(|c| c.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
}

/// The `expertd` binary of this build: `$EXPERTD_BIN`, else `<target>/<profile>/expertd`
/// next to this test executable, built first (`cargo build -p expertd --bin expertd`, a
/// no-op when fresh) so that `cargo test -p expertd-tests` alone works.
pub fn expertd_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("EXPERTD_BIN") {
            return PathBuf::from(p);
        }
        let exe = std::env::current_exe().expect("current_exe");
        // <target>/<profile>/deps/<test>
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test executable under <target>/<profile>/deps")
            .to_path_buf();
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "-p", "expertd", "--bin", "expertd"])
            .current_dir(workspace());
        if release {
            cmd.arg("--release");
        }
        if let Some(target) = profile_dir.parent() {
            cmd.env("CARGO_TARGET_DIR", target);
        }
        let status = cmd
            .status()
            .expect("running cargo build for the expertd binary");
        assert!(status.success(), "cargo build -p expertd failed");
        let bin = profile_dir.join("expertd");
        assert!(bin.is_file(), "{} missing after cargo build", bin.display());
        bin
    })
    .clone()
}

/// A tiny synthetic model (4 layers, 32 experts), written once per test process.
pub fn tiny_model() -> PathBuf {
    static MODEL: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("tiny.gguf");
            write_tiny_model(&path, 0);
            (dir, path)
        })
        .1
        .clone()
}

/// Writes the tiny preset with `seed` to `path`.
pub fn write_tiny_model(path: &Path, seed: u64) {
    let mut cfg = expertd::synth::SynthConfig::preset(expertd::synth::Preset::Tiny);
    cfg.seed = seed;
    expertd::synth::write_model(&cfg, path, 2).expect("writing the tiny model");
}

/// A TCP port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Serialises the daemon tests: each runs a real engine, and the machine has few cores.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Polls `f` every 100 ms until it returns Some, or panics with `what` after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sends a signal with kill(1): `target` is a pid, or `-PGID` for a process group.
pub fn signal(sig: &str, target: &str) -> bool {
    Command::new("kill")
        .args([format!("-{sig}").as_str(), "--", target])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether a process exists (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            // "pid (comm) S ..." — the state follows the last ')'.
            let state = s
                .rsplit_once(')')
                .map(|(_, r)| r.trim_start())
                .unwrap_or("");
            !state.starts_with('Z')
        }
        Err(_) => false,
    }
}

/// Live processes whose process group is `pgid`.
pub fn group_members(pgid: u32) -> Vec<u32> {
    let mut v = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return v;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        // fields after ')': state ppid pgrp ...
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.len() > 2 && f[2].parse::<u32>().ok() == Some(pgid) && !f[0].starts_with('Z') {
            v.push(pid);
        }
    }
    v
}

/// A running `expertd serve` in a temp dir of its own.
pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub port: u16,
    pub log: PathBuf,
    /// Sent as a bearer token with [`Daemon::complete`] (an engine with `--api-key`).
    pub api_key: Option<String>,
    child: Option<Child>,
}

impl Daemon {
    /// Writes a config (`extra` appended to model, state_dir, socket and the [engine]
    /// table with `engine_toml` lines) and starts the daemon.
    pub fn start(model: &Path, engine_binary: &Path, engine_toml: &str, extra: &str) -> Daemon {
        Daemon::start_with_env(model, engine_binary, engine_toml, extra, &[], None)
    }

    /// [`Daemon::start`] with extra environment for the daemon (e.g. `NOTIFY_SOCKET`) and,
    /// optionally, a given engine port (else a free one).
    pub fn start_with_env(
        model: &Path,
        engine_binary: &Path,
        engine_toml: &str,
        extra: &str,
        env: &[(&str, String)],
        port: Option<u16>,
    ) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = port.unwrap_or_else(free_port);
        let socket = dir.path().join("status.sock");
        let config = dir.path().join("expertd.toml");
        let text = Daemon::config_text(&dir, model, engine_binary, port, engine_toml, extra);
        std::fs::write(&config, text).expect("writing config");
        let log = dir.path().join("daemon.log");
        let log_file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(expertd_binary())
            .args(["serve", "--config"])
            .arg(&config)
            .env("RUST_LOG", "info")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("EXPERTD_CONFIG")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log"))
            .stderr(log_file)
            .spawn()
            .expect("starting expertd serve");
        Daemon {
            dir,
            config,
            socket,
            port,
            log,
            api_key: None,
            child: Some(child),
        }
    }

    /// The config text `start` writes (tests edit it to reconfigure).
    pub fn config_text(
        dir: &tempfile::TempDir,
        model: &Path,
        engine_binary: &Path,
        port: u16,
        engine_toml: &str,
        extra: &str,
    ) -> String {
        format!(
            "model = {model:?}\nstate_dir = {state:?}\nsocket = {sock:?}\n{extra}\n[engine]\nbinary = {bin:?}\nport = {port}\nstart_timeout_secs = 120\nstop_timeout_secs = 5\n{engine_toml}\n",
            model = model.display().to_string(),
            state = dir.path().join("state").display().to_string(),
            sock = dir.path().join("status.sock").display().to_string(),
            bin = engine_binary.display().to_string(),
        )
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// The status document, or None if the daemon does not answer.
    pub fn status(&self) -> Option<serde_json::Value> {
        let body =
            expertd::api::blocking::get(std::slice::from_ref(&self.socket), "/status").ok()?;
        serde_json::from_str(&body).ok()
    }

    /// `GET path` on the status socket.
    pub fn get(&self, path: &str) -> Option<String> {
        expertd::api::blocking::get(std::slice::from_ref(&self.socket), path).ok()
    }

    /// Waits until the status satisfies `pred`; returns that status.
    pub fn wait_status(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let start = Instant::now();
        loop {
            if let Some(s) = self.status()
                && pred(&s)
            {
                return s;
            }
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(st)) = c.try_wait()
            {
                panic!(
                    "daemon exited ({st}) while waiting for {what}\n{}",
                    self.log_text()
                );
            }
            if start.elapsed() > timeout {
                panic!(
                    "timed out after {timeout:?} waiting for {what}; last status: {}\n--- daemon log ---\n{}",
                    self.status()
                        .map(|s| s.to_string())
                        .unwrap_or_else(|| "none".into()),
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for `engine.state == "serving"`.
    pub fn wait_serving(&mut self, timeout: Duration) -> serde_json::Value {
        self.wait_status("engine serving", timeout, |s| {
            s["engine"]["state"] == "serving"
        })
    }

    /// POST /completion to the engine; returns the generated text.
    pub fn complete(&self, prompt: &str, n_predict: u32) -> Result<String, String> {
        let body = serde_json::json!({"prompt": prompt, "n_predict": n_predict, "temperature": 0})
            .to_string()
            .into_bytes();
        let r = expertd::api::blocking::tcp_request(
            "127.0.0.1",
            self.port,
            "POST",
            "/completion",
            Some(body),
            self.api_key.as_deref(),
            Duration::from_secs(60),
        )
        .map_err(|e| e.to_string())?;
        if r.status != 200 {
            return Err(format!("HTTP {}: {}", r.status, r.text()));
        }
        let v: serde_json::Value = serde_json::from_slice(&r.body).map_err(|e| e.to_string())?;
        v["content"]
            .as_str()
            .map(String::from)
            .ok_or_else(|| format!("no content in {v}"))
    }

    /// Sends SIGTERM and waits for the daemon to exit; returns its exit code.
    pub fn terminate(&mut self, timeout: Duration) -> Option<i32> {
        let mut child = self.child.take()?;
        signal("TERM", &child.id().to_string());
        let start = Instant::now();
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                return st.code();
            }
            if start.elapsed() > timeout {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "daemon did not exit within {timeout:?} of SIGTERM\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The daemon's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Replaces the config atomically (temp file + rename, as editors and tools do).
    pub fn write_config(&self, text: &str) {
        let tmp = self.dir.path().join(".expertd.toml.tmp");
        std::fs::write(&tmp, text).expect("write temp config");
        std::fs::rename(&tmp, &self.config).expect("rename config");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // A failed test must not leave a daemon or an engine behind.
        let engine = self.status().and_then(|s| s["engine"]["pid"].as_u64());
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(pgid) = engine {
            signal("KILL", &format!("-{pgid}"));
        }
    }
}
