//! The daemon's command line without an engine: exit codes of `serve` for the errors
//! systemd must not retry, `status` with no daemon, `plan`, and `engine path`.

use std::process::Command;

use expertd_tests::daemon_support::{expertd_binary, tiny_model};
use expertd_tests::workspace;

fn expertd(args: &[&str], config: &std::path::Path) -> std::process::Output {
    Command::new(expertd_binary())
        .args(args)
        .arg("--config")
        .arg(config)
        .env_remove("EXPERTD_CONFIG")
        .env_remove("NOTIFY_SOCKET")
        .output()
        .expect("running expertd")
}

#[test]
fn serve_exit_codes_say_what_systemd_should_not_retry() {
    let t = tempfile::tempdir().unwrap();
    let cfg = t.path().join("c.toml");
    let sock = t.path().join("s.sock");
    let base = format!(
        "state_dir = {:?}\nsocket = {:?}\n",
        t.path().join("state").display().to_string(),
        sock.display().to_string()
    );

    std::fs::write(
        &cfg,
        format!("{base}model = \"/m.gguf\"\n[engine]\nport = 0\n"),
    )
    .unwrap();
    let out = expertd(&["serve"], &cfg);
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("engine.port"));

    std::fs::write(
        &cfg,
        format!("{base}model = \"/nonexistent/m.gguf\"\n[engine]\nbinary = \"/bin/true\"\n"),
    )
    .unwrap();
    let out = expertd(&["serve"], &cfg);
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/m.gguf"));

    std::fs::write(
        &cfg,
        format!("{base}model = \"/m.gguf\"\n[engine]\nbinary = \"/nonexistent/llama-server\"\n"),
    )
    .unwrap();
    let out = expertd(&["serve"], &cfg);
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("engine.binary"));

    // Someone answers on the socket: another daemon. 73, and the socket is left alone.
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let model = tiny_model();
    std::fs::write(
        &cfg,
        format!(
            "{base}model = {:?}\n[engine]\nbinary = \"/bin/true\"\n",
            model.display().to_string()
        ),
    )
    .unwrap();
    let out = expertd(&["serve"], &cfg);
    assert_eq!(
        out.status.code(),
        Some(73),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("another expertd is running"));
    assert!(sock.exists());
    drop(listener);
}

#[test]
fn status_without_a_daemon_exits_69_and_plan_needs_none() {
    let t = tempfile::tempdir().unwrap();
    let cfg = t.path().join("c.toml");
    let model = tiny_model();
    std::fs::write(
        &cfg,
        format!(
            "model = {:?}\nstate_dir = {:?}\nsocket = {:?}\n",
            model.display().to_string(),
            t.path().join("state").display().to_string(),
            t.path().join("s.sock").display().to_string()
        ),
    )
    .unwrap();
    let out = expertd(&["status"], &cfg);
    assert_eq!(out.status.code(), Some(69));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no expertd answers"));

    let out = expertd(&["plan", "--json"], &cfg);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(plan["pool"].is_null(), "the tiny model fits");
    assert!(plan["within_budget"].as_bool().unwrap());
    assert!(plan["reasons"].as_array().unwrap().len() >= 8);
    // The disk probe was cached in the state dir.
    assert!(t.path().join("state/disk-probe.json").is_file());

    let out = expertd(&["plan"], &cfg);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("pool: off") && text.contains("reasons:"),
        "{text}"
    );

    // Record and replay: the snapshot plans the same.
    let out = expertd(&["plan", "--snapshot"], &cfg);
    let snap = t.path().join("snap.json");
    std::fs::write(&snap, &out.stdout).unwrap();
    let out = expertd(
        &["plan", "--json", "--from-snapshot", snap.to_str().unwrap()],
        &cfg,
    );
    let replayed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(replayed["args"], plan["args"]);
}

/// `expertd engine path` names where a binary goes: the workspace is checked (a typo is
/// an error that names where it came from) and the path printed is absolute. `engine
/// build --jobs 0` is a usage error (cmake's own error named no flag).
#[test]
fn engine_path_checks_the_workspace_and_prints_an_absolute_path() {
    let run = |args: &[&str], env: Option<&str>| {
        let mut cmd = std::process::Command::new(expertd_binary());
        cmd.args(["engine", "path"])
            .args(args)
            .current_dir(workspace());
        match env {
            Some(v) => cmd.env("EXPERTD_WORKSPACE", v),
            None => cmd.env_remove("EXPERTD_WORKSPACE"),
        };
        cmd.output().unwrap()
    };
    let out = run(&["--workspace", "/nonexistent/ws"], None);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--workspace") && err.contains("not an expertd workspace"),
        "{err}"
    );
    let out = run(&[], Some("/nonexistent/ws"));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("EXPERTD_WORKSPACE"));
    let out = std::process::Command::new(expertd_binary())
        .args(["engine", "build", "--jobs", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "a usage error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--jobs"));
    let out = run(&["--workspace", "."], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(path.starts_with('/'), "{path}");
    assert!(path.starts_with(workspace().to_str().unwrap()), "{path}");
}

/// `expertd synth --splits N` writes llama.cpp's split layout, and `expertd gguf` on the
/// first file summarises the whole model (the same as the model in one file); on a later
/// file it says which to give instead.
#[test]
fn synth_splits_a_model_and_gguf_reads_it_whole() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        Command::new(expertd_binary())
            .args(args)
            .output()
            .expect("running expertd")
    };
    let whole = dir.path().join("w.gguf");
    let split = dir.path().join("s.gguf");
    let out = run(&["synth", "--preset", "tiny", "-o", whole.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let out = run(&[
        "synth",
        "--preset",
        "tiny",
        "--splits",
        "3",
        "-o",
        split.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{out:?}");
    assert!(!split.exists(), "the whole file is removed after splitting");
    let first = dir.path().join("s-00001-of-00003.gguf");
    let json = |p: &std::path::Path| -> serde_json::Value {
        let out = run(&["gguf", "--json", p.to_str().unwrap()]);
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let w = json(&whole);
    let s = json(&first);
    assert_eq!(s["split"]["count"], 3);
    assert_eq!(s["model_files"].as_array().unwrap().len(), 3);
    assert_eq!(w["model"], s["model"]);
    let second = dir.path().join("s-00002-of-00003.gguf");
    let later = json(&second);
    let e = later["model_error"].as_str().unwrap();
    assert!(e.contains("opened from its first split"), "{e}");

    let out = run(&["synth", "--splits", "1", "-o", split.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

/// `expertd trace stats` numbers a trace's MoE layers 0.. (the format leaves dense layers
/// out), or by the model's layer where `trace record`'s sidecar (TRACE.json) names them.
#[test]
fn trace_stats_names_the_model_layers_when_the_sidecar_does() {
    let t = tempfile::tempdir().unwrap();
    let trace = t.path().join("t.trace");
    std::fs::write(
        &trace,
        "expert-trace 1 layers=2 experts=8 used=2\n0 1 | 2 3\n0 4 | 2 5\n1 4 | 6 5\n",
    )
    .unwrap();
    let stats = || {
        let out = Command::new(expertd_binary())
            .args(["trace", "stats"])
            .arg(&trace)
            .output()
            .expect("running expertd");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    // the first cell of each row after the two header lines
    let rows = |text: &str| -> Vec<String> {
        text.lines()
            .skip(1)
            .map(|l| l.split_whitespace().next().unwrap_or("").to_string())
            .collect()
    };
    let plain = stats();
    assert!(plain.contains("2 MoE layers"), "{plain}");
    assert_eq!(rows(&plain), ["moe", "0", "1", "mean"], "{plain}");
    std::fs::write(
        t.path().join("t.trace.json"),
        r#"{"moe_layers": [1, 3], "arch": "glm4moe"}"#,
    )
    .unwrap();
    let named = stats();
    assert_eq!(rows(&named), ["blk", "1", "3", "mean"], "{named}");
    // a sidecar that does not match the trace is ignored
    std::fs::write(t.path().join("t.trace.json"), r#"{"moe_layers": [1]}"#).unwrap();
    assert_eq!(rows(&stats()), ["moe", "0", "1", "mean"]);
}
