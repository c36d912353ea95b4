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
        Self::start_in(binary, model, extra, env, None)
    }

    /// Like [`Server::start_with_env`], inside the memory cgroup `cap` when given.
    pub fn start_in(
        binary: &Path,
        model: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
        cap: Option<&MemCap>,
    ) -> anyhow::Result<Server> {
        let dir = tempfile::tempdir()?;
        let log = dir.path().join("server.log");
        let out = fs::File::create(&log)?;
        let port = free_port();
        let mut cmd = match cap {
            // The shell joins the group, then becomes the server (same pid).
            Some(cap) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg("echo $$ > \"$1\" && shift && exec \"$@\"")
                    .arg("sh")
                    .arg(cap.dir.join("cgroup.procs"))
                    .arg(binary);
                c
            }
            None => Command::new(binary),
        };
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
        let mut resp = match ureq::post(&self.url(path)).send_json(body) {
            Ok(resp) => resp,
            Err(e) => {
                // The server may have died: say how, and what it printed last.
                std::thread::sleep(Duration::from_millis(200));
                let log = self.log_text();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                bail!(
                    "POST {path}: {e}; llama-server's last lines:\n{}",
                    tail.join("\n")
                );
            }
        };
        Ok(resp.body_mut().read_json()?)
    }

    /// POSTs `body` as JSON to `path` and returns the HTTP status with the JSON answer,
    /// error statuses included (`post` treats those as failures).
    pub fn post_any(&self, path: &str, body: &Value) -> anyhow::Result<(u16, Value)> {
        let mut resp = ureq::post(&self.url(path))
            .config()
            .http_status_as_error(false)
            .build()
            .send_json(body)
            .with_context(|| format!("POST {path}"))?;
        let status = resp.status().as_u16();
        Ok((status, resp.body_mut().read_json()?))
    }

    /// Everything the server printed, once it contains every one of `needles` (its log
    /// thread may write after an answer has gone out), or as it is after `timeout`.
    pub fn log_containing(&self, needles: &[&str], timeout: Duration) -> String {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let log = self.log_text();
            if needles.iter().all(|n| log.contains(n)) || std::time::Instant::now() > deadline {
                return log;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Greedy completion of `prompt`: the generated token ids (exactly `n_predict`, with
    /// end-of-generation ignored) and the full answer.
    pub fn greedy(&self, prompt: &str, n_predict: usize) -> anyhow::Result<(Vec<i64>, Value)> {
        let g = self.greedy_with_probs(prompt, n_predict, 4)?;
        Ok((g.tokens, g.answer))
    }

    /// Greedy completion with the `n_probs` most likely tokens' log-probabilities at
    /// every generated position, computed from the raw logits (before sampling). With
    /// `n_probs` = the vocabulary size this is the whole log-softmax of the logits.
    pub fn greedy_with_probs(
        &self,
        prompt: &str,
        n_predict: usize,
        n_probs: usize,
    ) -> anyhow::Result<Greedy> {
        let answer = self.post("/completion", &greedy_request(prompt, n_predict, n_probs))?;
        let tokens = answer["tokens"]
            .as_array()
            .with_context(|| format!("no tokens in the answer: {answer}"))?
            .iter()
            .map(|t| t.as_i64().context("token id is not an integer"))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut logprobs = Vec::new();
        for pos in answer["completion_probabilities"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let mut row = Vec::new();
            for p in pos["top_logprobs"].as_array().into_iter().flatten() {
                row.push((
                    p["id"].as_i64().context("top_logprobs id")?,
                    p["logprob"].as_f64().context("top_logprobs logprob")?,
                ));
            }
            logprobs.push(row);
        }
        Ok(Greedy {
            tokens,
            logprobs,
            answer,
        })
    }

    /// Stops the server gracefully (SIGTERM, then SIGKILL after 20 s), so it frees the
    /// model (the pool writes its stats one last time). Returns its exit status.
    pub fn stop(mut self) -> anyhow::Result<std::process::ExitStatus> {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .context("running kill")?;
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if start.elapsed() > Duration::from_secs(20) {
                self.child.kill()?;
                bail!("llama-server did not stop within 20 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Peak resident memory of the server so far (VmHWM), in bytes.
    pub fn peak_rss(&self) -> anyhow::Result<u64> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let kb = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .context("no VmHWM in /proc/PID/status")?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse::<u64>()?;
        Ok(kb * 1024)
    }
}

/// The `/completion` body of a greedy completion: `n_predict` tokens (end-of-generation
/// ignored, no prompt cache), the ids returned, and the `n_probs` most likely tokens'
/// log-probabilities from the raw logits at every position.
pub fn greedy_request(prompt: &str, n_predict: usize, n_probs: usize) -> Value {
    serde_json::json!({
        "prompt": prompt,
        "n_predict": n_predict,
        "temperature": 0.0,
        "top_k": 1,
        "ignore_eos": true,
        "cache_prompt": false,
        "return_tokens": true,
        "n_probs": n_probs,
        "post_sampling_probs": false,
    })
}

/// A greedy completion: generated tokens and, per position, (token, log-probability)
/// pairs from the raw logits, most likely first.
#[derive(Debug, Clone)]
pub struct Greedy {
    pub tokens: Vec<i64>,
    pub logprobs: Vec<Vec<(i64, f64)>>,
    pub answer: Value,
}

/// A cgroup-v1 memory group with a limit, removed on drop (its processes must be gone).
pub struct MemCap {
    pub dir: PathBuf,
    pub limit: u64,
}

impl MemCap {
    /// Creates a memory cgroup limited to `limit` bytes, or says why it cannot.
    pub fn new(limit: u64) -> Result<MemCap, String> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let root = Path::new("/sys/fs/cgroup/memory");
        if !root.join("memory.limit_in_bytes").exists() {
            return Err(format!(
                "no cgroup-v1 memory controller at {}",
                root.display()
            ));
        }
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = root.join(format!("expertd-test-{}-{n}", std::process::id()));
        fs::create_dir(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let cap = MemCap { dir, limit };
        fs::write(cap.dir.join("memory.limit_in_bytes"), limit.to_string())
            .map_err(|e| format!("setting the limit: {e}"))?;
        // No swap: the limit is on memory alone (absent when swap accounting is off).
        let _ = fs::write(cap.dir.join("memory.swappiness"), "0");
        Ok(cap)
    }

    /// Times the group hit its limit (memory.failcnt) and whether the OOM killer acted.
    pub fn pressure(&self) -> (u64, bool) {
        let failcnt = fs::read_to_string(self.dir.join("memory.failcnt"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        let oom = fs::read_to_string(self.dir.join("memory.oom_control"))
            .map(|s| {
                s.lines()
                    .any(|l| l.starts_with("oom_kill ") && !l.ends_with(" 0"))
            })
            .unwrap_or(false);
        (failcnt, oom)
    }
}

impl Drop for MemCap {
    fn drop(&mut self) {
        for _ in 0..50 {
            if fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
