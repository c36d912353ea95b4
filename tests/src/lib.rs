//! Helpers shared by the end-to-end tests in `tests/tests/`: where the workspace and the
//! engine binaries are, starting llama-server and talking to it over HTTP.
//!
//! These tests run the real engine. They fail (never skip) when it is not built: build it
//! with `expertd engine build` and `expertd engine build --stock` (scripts/test.sh does).

pub mod daemon_support;

use std::fs;
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use expertd::engine::{Backend, EngineLayout, Flavor};
use serde_json::Value;

/// The workspace root (the directory holding `vendor/llama.cpp.pin`).
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Path of a built CPU engine binary; panics with the command that builds it when absent.
pub fn engine_binary(flavor: Flavor, name: &str) -> PathBuf {
    let layout = EngineLayout::new(&workspace(), flavor, Backend::Cpu);
    let path = layout.bin_dir().join(name);
    assert!(
        path.is_file(),
        "{} is not built: run `cargo run -p expertd -- engine build{}` first (scripts/test.sh does)",
        path.display(),
        if flavor == Flavor::Stock {
            " --stock"
        } else {
            ""
        }
    );
    path
}

/// A TCP port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding an ephemeral port on 127.0.0.1")
}

/// A running llama-server, killed and reaped on drop.
pub struct Server {
    child: Child,
    pub port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Server {
    /// Starts `binary` on `model` with `extra` arguments, on a free port, and waits until
    /// `/health` answers 200 (at most `timeout`).
    pub fn start(binary: &Path, model: &Path, extra: &[&str]) -> anyhow::Result<Server> {
        Self::start_with_env(binary, model, extra, &[])
    }

    pub fn start_with_env(
        binary: &Path,
        model: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Server> {
        let dir = tempfile::tempdir()?;
        let log = dir.path().join("server.log");
        let out = fs::File::create(&log)?;
        let port = free_port();
        let mut cmd = Command::new(binary);
        cmd.arg("-m")
            .arg(model)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["-t", "2", "--no-warmup"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        for (key, value) in env {
            cmd.env(key, value);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let mut server = Server {
            child,
            port,
            log,
            _dir: dir,
        };
        server.wait_healthy(Duration::from_secs(120))?;
        Ok(server)
    }

    fn wait_healthy(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "llama-server exited with {status} before it was ready; log:\n{}",
                    self.log_text()
                );
            }
            if let Ok(resp) = ureq::get(&self.url("/health")).call() {
                if resp.status() == 200 {
                    return Ok(());
                }
            }
            if start.elapsed() > timeout {
                bail!(
                    "llama-server not ready after {timeout:?}; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    /// Everything the server printed so far.
    pub fn log_text(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut text);
        }
        text
    }

    /// POSTs `body` as JSON to `path` and returns the JSON answer.
    pub fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        let mut resp = ureq::post(&self.url(path))
            .send_json(body)
            .with_context(|| format!("POST {path}"))?;
        Ok(resp.body_mut().read_json()?)
    }

    /// Greedy completion of `prompt`: the generated token ids (exactly `n_predict`, with
    /// end-of-generation ignored) and the full answer.
    pub fn greedy(&self, prompt: &str, n_predict: usize) -> anyhow::Result<(Vec<i64>, Value)> {
        let answer = self.post(
            "/completion",
            &serde_json::json!({
                "prompt": prompt,
                "n_predict": n_predict,
                "temperature": 0.0,
                "top_k": 1,
                "ignore_eos": true,
                "cache_prompt": false,
                "return_tokens": true,
                "n_probs": 4,
            }),
        )?;
        let tokens = answer["tokens"]
            .as_array()
            .with_context(|| format!("no tokens in the answer: {answer}"))?
            .iter()
            .map(|t| t.as_i64().context("token id is not an integer"))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok((tokens, answer))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
