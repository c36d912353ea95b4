//! `expertd trace record`: runs `expertd-trace-record` (crate `expertd-recorder` in
//! `ffi/recorder/`), which links the stock llama.cpp engine and so is built apart from
//! `expertd` (after `expertd engine build --stock`), then prints the trace's statistics
//! with the code behind `expertd trace stats`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, bail};

/// File name of the recorder binary.
pub const RECORDER_BIN: &str = "expertd-trace-record";

/// Arguments of `expertd trace record` (passed on to `expertd-trace-record`).
#[derive(Debug, clap::Args)]
pub struct RecordArgs {
    /// The GGUF model (any MoE architecture llama.cpp runs).
    pub model: PathBuf,
    /// Output trace file (binary unless --text); TRACE.json beside it holds the tokens and
    /// how many of the trace's leading tokens are prompt tokens.
    #[arg(short = 'o', long)]
    pub output: PathBuf,
    /// Prompt text from this file.
    #[arg(long, group = "prompt_source")]
    pub prompt_file: Option<PathBuf>,
    /// Prompt text.
    #[arg(long, group = "prompt_source")]
    pub prompt: Option<String>,
    /// A prompt of N random tokens (like llama-bench).
    #[arg(long, value_name = "N", group = "prompt_source")]
    pub random_tokens: Option<u32>,
    /// Tokens to generate after the prompt.
    #[arg(long, default_value_t = 64)]
    pub tokens: u32,
    /// Context size (default: prompt + generated, rounded up to 256).
    #[arg(long)]
    pub ctx: Option<u32>,
    /// CPU threads (default: all).
    #[arg(long)]
    pub threads: Option<u32>,
    /// Prompt tokens per batch.
    #[arg(long, default_value_t = 256)]
    pub batch: u32,
    /// Seed of the sampler and of --random-tokens.
    #[arg(long, default_value_t = 0)]
    pub seed: u32,
    /// Sampling temperature (0: greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temp: f32,
    /// Keep generating after an end-of-generation token.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Leave the prompt tokens out of the trace (the sidecar still lists them).
    #[arg(long)]
    pub skip_prompt: bool,
    /// Write the text encoding of the trace.
    #[arg(long)]
    pub text: bool,
    /// Show llama.cpp's log.
    #[arg(long)]
    pub verbose: bool,
}

impl RecordArgs {
    /// The recorder's command line for these arguments: every value joined to its
    /// option (`--prompt=- item`: a separate value starting with `-` would be read as an
    /// option) and the model after `--`.
    pub fn to_argv(&self) -> Vec<OsString> {
        let mut v: Vec<OsString> = Vec::new();
        let mut opt = |name: &str, val: Option<OsString>| {
            if let Some(val) = val {
                let mut joined = OsString::from(format!("{name}="));
                joined.push(val);
                v.push(joined);
            }
        };
        opt("--output", Some(self.output.clone().into()));
        opt("--prompt-file", self.prompt_file.clone().map(Into::into));
        opt("--prompt", self.prompt.clone().map(Into::into));
        opt(
            "--random-tokens",
            self.random_tokens.map(|n| n.to_string().into()),
        );
        opt("--tokens", Some(self.tokens.to_string().into()));
        opt("--ctx", self.ctx.map(|n| n.to_string().into()));
        opt("--threads", self.threads.map(|n| n.to_string().into()));
        opt("--batch", Some(self.batch.to_string().into()));
        opt("--seed", Some(self.seed.to_string().into()));
        opt("--temp", Some(self.temp.to_string().into()));
        for (on, flag) in [
            (self.ignore_eos, "--ignore-eos"),
            (self.skip_prompt, "--skip-prompt"),
            (self.text, "--text"),
            (self.verbose, "--verbose"),
        ] {
            if on {
                v.push(flag.into());
            }
        }
        // `expertd` prints the full statistics table itself.
        v.push("--no-stats".into());
        v.push("--".into());
        v.push(self.model.clone().into());
        v
    }
}

/// Where to look for the recorder: `$EXPERTD_TRACE_RECORD`; next to this executable;
/// `target/{release,debug}` of the workspace this executable or the current directory
/// is in; `$CARGO_TARGET_DIR/{release,debug}`.
pub fn recorder_candidates(exe: Option<&Path>, cwd: Option<&Path>) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(dir) = exe.and_then(Path::parent) {
        dirs.push(dir.to_path_buf());
    }
    for start in [exe, cwd].into_iter().flatten() {
        if let Some(ws) = crate::engine::find_workspace(start) {
            for profile in ["release", "debug"] {
                dirs.push(ws.join("target").join(profile));
            }
        }
    }
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
        for profile in ["release", "debug"] {
            dirs.push(PathBuf::from(&t).join(profile));
        }
    }
    let mut out: Vec<PathBuf> = Vec::new();
    for d in dirs {
        let p = d.join(RECORDER_BIN);
        if !out.contains(&p) {
            out.push(p);
        }
    }
    out
}

/// The recorder binary to run, or an error that says how to build it.
pub fn find_recorder() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("EXPERTD_TRACE_RECORD") {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!(
                "EXPERTD_TRACE_RECORD={} is not a file; unset it or point it at {RECORDER_BIN}",
                p.display()
            );
        }
        return Ok(p);
    }
    let exe = std::env::current_exe().ok();
    let cwd = std::env::current_dir().ok();
    let candidates = recorder_candidates(exe.as_deref(), cwd.as_deref());
    if let Some(p) = candidates.iter().find(|p| p.is_file()) {
        return Ok(p.clone());
    }
    bail!(
        "{RECORDER_BIN} is not built (looked for {}). It links the stock llama.cpp engine, so \
         it is built apart from expertd: run `expertd engine build --stock`, then \
         `cargo build --release -p expertd-recorder` (or set EXPERTD_TRACE_RECORD to the binary)",
        candidates
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// Runs `expertd trace record`.
pub fn run(a: RecordArgs) -> anyhow::Result<ExitCode> {
    if !a.model.is_file() {
        bail!("{}: no such file", a.model.display());
    }
    let bin = find_recorder()?;
    let status = Command::new(&bin)
        .args(a.to_argv())
        .status()
        .with_context(|| format!("running {}", bin.display()))?;
    if !status.success() {
        // The recorder has printed its error.
        bail!("{} failed ({status})", bin.display());
    }
    super::run_stats(super::StatsArgs {
        trace: a.output,
        json: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, clap::Parser)]
    struct Wrap {
        #[command(flatten)]
        args: RecordArgs,
    }

    fn argv(cmd: &[&str]) -> Vec<String> {
        let w = Wrap::try_parse_from(std::iter::once("x").chain(cmd.iter().copied())).unwrap();
        w.args
            .to_argv()
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect()
    }

    #[test]
    fn arguments_pass_through() {
        let v = argv(&[
            "m.gguf",
            "-o",
            "t.trace",
            "--prompt-file",
            "p.txt",
            "--tokens",
            "5",
            "--threads",
            "2",
            "--temp",
            "0.7",
            "--skip-prompt",
            "--verbose",
        ]);
        assert_eq!(
            v,
            [
                "--output=t.trace",
                "--prompt-file=p.txt",
                "--tokens=5",
                "--threads=2",
                "--batch=256",
                "--seed=0",
                "--temp=0.7",
                "--skip-prompt",
                "--verbose",
                "--no-stats",
                "--",
                "m.gguf",
            ]
        );
        let v = argv(&["m.gguf", "-o", "t", "--random-tokens", "9", "--text"]);
        assert!(v.contains(&"--random-tokens=9".to_string()), "{v:?}");
        assert!(v.contains(&"--text".to_string()));
        // Values that start with '-' stay values.
        let v = argv(&["--output=-t", "--prompt=- item", "--", "-m.gguf"]);
        assert!(v.contains(&"--prompt=- item".to_string()), "{v:?}");
        assert!(v.contains(&"--output=-t".to_string()), "{v:?}");
        assert_eq!(v[v.len() - 2..], ["--", "-m.gguf"]);
        // One prompt source at most.
        assert!(
            Wrap::try_parse_from(["x", "m", "-o", "t", "--prompt", "a", "--random-tokens", "3"])
                .is_err()
        );
    }

    #[test]
    fn the_recorder_is_looked_for_next_to_expertd_first() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("bin").join("expertd");
        let c = recorder_candidates(Some(&exe), None);
        assert_eq!(c[0], dir.path().join("bin").join(RECORDER_BIN));
        // From inside a workspace: its target/release and target/debug.
        let ws = dir.path().join("ws");
        std::fs::create_dir_all(ws.join("vendor")).unwrap();
        std::fs::write(ws.join("vendor").join("llama.cpp.pin"), "").unwrap();
        if std::env::var_os("EXPERTD_WORKSPACE").is_some() {
            eprintln!("not checking the workspace lookup: EXPERTD_WORKSPACE overrides it");
            return;
        }
        let c = recorder_candidates(Some(&exe), Some(&ws.join("daemon")));
        assert!(
            c.contains(&ws.join("target/release").join(RECORDER_BIN)),
            "{c:?}"
        );
        assert!(
            c.contains(&ws.join("target/debug").join(RECORDER_BIN)),
            "{c:?}"
        );
    }
}
