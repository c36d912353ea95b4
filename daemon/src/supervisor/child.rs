//! The engine process: spawned in its own process group, its output forwarded line by line
//! to tracing, and owned by a guard that kills and reaps the whole group on drop.
//!
//! Invariant: the group is signalled only while its leader is unreaped (the leader, a
//! zombie at worst, keeps the pgid from being reused), plus one SIGKILL right after the
//! leader is reaped, to its stragglers; never later, when the pgid could be another's.

use std::collections::VecDeque;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};
use tokio::io::{AsyncBufReadExt, BufReader};

/// Lines of output kept for error messages.
const TAIL_LINES: usize = 12;

/// A running engine. Dropping it kills the process group (SIGKILL) and reaps the leader.
#[derive(Debug)]
pub struct EngineChild {
    child: tokio::process::Child,
    pid: u32,
    /// The last lines the engine printed (stdout and stderr interleaved).
    tail: Arc<Mutex<VecDeque<String>>>,
    pub started: Instant,
    /// The leader's exit status once it was reaped: from then on the group is not
    /// signalled any more.
    reaped: Option<ExitStatus>,
}

impl EngineChild {
    /// Starts `binary` with `args` and `env` in a new process group.
    pub fn spawn(
        binary: &Path,
        args: &[String],
        env: &std::collections::BTreeMap<String, String>,
    ) -> std::io::Result<EngineChild> {
        let mut cmd = tokio::process::Command::new(binary);
        cmd.args(args)
            .envs(env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        // SAFETY: the closure runs in the forked child before exec and only makes the
        // prctl(PR_SET_PDEATHSIG) system call, which is async-signal-safe; it touches no
        // memory shared with the parent and allocates nothing.
        unsafe {
            cmd.pre_exec(|| {
                // The engine dies with the daemon even when the daemon is SIGKILLed.
                rustix::process::set_parent_process_death_signal(Some(Signal::KILL))
                    .map_err(std::io::Error::from)
            });
        }
        let mut child = cmd.spawn()?;
        let pid = child.id().unwrap_or(0);
        let tail = Arc::new(Mutex::new(VecDeque::with_capacity(TAIL_LINES)));
        if let Some(out) = child.stdout.take() {
            forward(out, "stdout", pid, tail.clone());
        }
        if let Some(err) = child.stderr.take() {
            forward(err, "stderr", pid, tail.clone());
        }
        Ok(EngineChild {
            child,
            pid,
            tail,
            started: Instant::now(),
            reaped: None,
        })
    }

    /// The engine's pid (also its process group id).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The last lines of output, oldest first.
    pub fn tail(&self) -> Vec<String> {
        self.tail
            .lock()
            .map(|t| t.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Waits for the leader to exit (cancel safe), reaps it and kills what is left of its
    /// group, once; later calls return the same status.
    pub async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        if let Some(status) = self.reaped {
            return Ok(status);
        }
        let status = self.child.wait().await?;
        // Right after the reap, stragglers of the engine still hold the pgid: kill them.
        self.kill_group(Signal::KILL);
        self.reaped = Some(status);
        Ok(status)
    }

    /// Sends `sig` to the whole process group while its leader is unreaped (a group that
    /// is gone is not an error); does nothing after.
    pub fn signal_group(&self, sig: Signal) {
        if self.reaped.is_none() {
            self.kill_group(sig);
        }
    }

    fn kill_group(&self, sig: Signal) {
        if let Some(pgid) = Pid::from_raw(self.pid as i32) {
            let _ = rustix::process::kill_process_group(pgid, sig);
        }
    }

    /// SIGTERM to the group, then SIGKILL after `timeout`; returns the leader's status
    /// (the recorded one if it was already reaped).
    pub async fn stop(&mut self, timeout: Duration) -> std::io::Result<ExitStatus> {
        if let Some(status) = self.reaped {
            return Ok(status);
        }
        self.signal_group(Signal::TERM);
        match tokio::time::timeout(timeout, self.wait()).await {
            Ok(r) => r,
            Err(_) => {
                tracing::warn!(
                    pid = self.pid,
                    "engine did not stop within {timeout:?} of SIGTERM: SIGKILL"
                );
                self.signal_group(Signal::KILL);
                self.wait().await
            }
        }
    }
}

impl Drop for EngineChild {
    fn drop(&mut self) {
        if self.reaped.is_some() {
            return;
        }
        self.signal_group(Signal::KILL);
        // Reap the leader: it dies promptly after SIGKILL; tokio's orphan queue reaps it
        // later if it takes longer than this.
        for _ in 0..100 {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }
}

fn forward<R>(stream: R, name: &'static str, pid: u32, tail: Arc<Mutex<VecDeque<String>>>)
where
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let mut lines = BufReader::new(stream).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            tracing::info!(target: "expertd::engine", pid, stream = name, "{line}");
            if let Ok(mut t) = tail.lock() {
                if t.len() == TAIL_LINES {
                    t.pop_front();
                }
                t.push_back(line);
            }
        }
    });
}

/// "exited with status 1", "killed by signal 9 (SIGKILL)".
pub fn describe_exit(status: &ExitStatus) -> String {
    if let Some(code) = status.code() {
        format!("exited with status {code}")
    } else if let Some(sig) = status.signal() {
        let name = match sig {
            1 => " (SIGHUP)",
            2 => " (SIGINT)",
            6 => " (SIGABRT)",
            9 => " (SIGKILL)",
            11 => " (SIGSEGV)",
            15 => " (SIGTERM)",
            _ => "",
        };
        format!("killed by signal {sig}{name}")
    } else {
        format!("ended ({status})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alive(pid: u32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                let state = s
                    .rsplit_once(')')
                    .map(|(_, r)| r.trim_start())
                    .unwrap_or("");
                !state.starts_with('Z')
            })
            .unwrap_or(false)
    }

    /// Pids of live processes in process group `pgid`.
    fn group(pgid: u32) -> Vec<u32> {
        let mut v = Vec::new();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            let f: Vec<String> = stat
                .rsplit_once(')')
                .map(|(_, r)| r.split_whitespace().map(String::from).collect())
                .unwrap_or_default();
            if f.len() > 2 && f[2] == pgid.to_string() && !f[0].starts_with('Z') {
                v.push(pid);
            }
        }
        v
    }

    fn sh(script: &str) -> EngineChild {
        EngineChild::spawn(
            Path::new("/bin/sh"),
            &["-c".to_string(), script.to_string()],
            &Default::default(),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn dropping_the_guard_kills_the_whole_group() {
        // The leader and a background child share the group.
        let c = sh("sleep 100 & sleep 100");
        let pid = c.pid();
        let deadline = Instant::now() + Duration::from_secs(5);
        while group(pid).len() < 2 {
            assert!(Instant::now() < deadline, "group never had two members");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop(c);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !group(pid).is_empty() {
            assert!(Instant::now() < deadline, "left behind: {:?}", group(pid));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!alive(pid), "leader not reaped");
    }

    #[tokio::test]
    async fn stop_after_the_engine_exited_reports_its_real_status() {
        let mut c = sh("exit 3");
        let status = c.wait().await.unwrap();
        assert_eq!(describe_exit(&status), "exited with status 3");
        // Waiting again and stopping give the recorded status, and signal nothing.
        assert_eq!(
            describe_exit(&c.wait().await.unwrap()),
            "exited with status 3"
        );
        let status = c.stop(Duration::from_millis(100)).await.unwrap();
        assert_eq!(describe_exit(&status), "exited with status 3");
    }

    #[tokio::test]
    async fn stop_escalates_to_sigkill_and_reports_output() {
        let mut c = sh("trap '' TERM; echo started; while :; do sleep 0.05; done");
        let deadline = Instant::now() + Duration::from_secs(5);
        while c.tail().is_empty() {
            assert!(Instant::now() < deadline, "no output forwarded");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(c.tail(), vec!["started".to_string()]);
        let t0 = Instant::now();
        let status = c.stop(Duration::from_millis(300)).await.unwrap();
        assert!(t0.elapsed() >= Duration::from_millis(300));
        assert_eq!(describe_exit(&status), "killed by signal 9 (SIGKILL)");
        // The shell's `sleep` got the group's SIGKILL too; it may still be on its way out
        // when the shell has been reaped (it failed here once, seen running right after).
        let deadline = Instant::now() + Duration::from_secs(2);
        while !group(c.pid()).is_empty() {
            assert!(
                Instant::now() < deadline,
                "left behind: {:?}",
                group(c.pid())
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
