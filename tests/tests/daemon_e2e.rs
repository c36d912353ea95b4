//! End-to-end tests of `expertd serve` with the real llama-server on a tiny synthetic model:
//! serving, restart after kill -9, crash loop, invalid config, model change (also to a model
//! that appears later), socket change, SIGTERM.
//! They fail (never skip) when no llama-server is built: see `daemon_support::engine_binary`.
//! Each test holds a lock so that only one engine runs at a time.

use std::time::Duration;

use expertd_tests::daemon_support::{
    Daemon, alive, engine_binary, expertd_binary, group_members, serial, signal, tiny_model,
    wait_for, write_tiny_model,
};

const SERVE: Duration = Duration::from_secs(120);

#[test]
fn serves_survives_kill9_and_stops_cleanly_on_sigterm() {
    let _one = serial();
    let engine = engine_binary();
    let mut d = Daemon::start(&tiny_model(), &engine, "", "");
    let s = d.wait_serving(SERVE);
    let pid = s["engine"]["pid"].as_u64().expect("engine.pid") as u32;
    assert_eq!(s["engine"]["port"], d.port);
    assert_eq!(s["engine"]["restarts"], 0);
    assert!(s["last_error"].is_null(), "{}", s["last_error"]);
    assert!(s["plan"]["args"].as_array().is_some_and(|a| !a.is_empty()));
    assert!(
        s["plan"]["pool"].is_null(),
        "the tiny model fits: stock engine"
    );
    assert!(s["engine"]["load_seconds"].as_f64().is_some());
    let text = d.complete("Hello", 8).expect("a completion while serving");
    assert!(!text.is_empty(), "empty completion");

    // The CLI, as an operator runs it.
    let out = std::process::Command::new(expertd_binary())
        .args(["status", "--config"])
        .arg(&d.config)
        .output()
        .unwrap();
    assert!(out.status.success());
    let human = String::from_utf8_lossy(&out.stdout);
    assert!(human.contains("engine: serving"), "{human}");
    assert!(human.contains(&format!("pid {pid}")), "{human}");
    let out = std::process::Command::new(expertd_binary())
        .args(["status", "--json", "--config"])
        .arg(&d.config)
        .output()
        .unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status --json");
    assert_eq!(doc["engine"]["state"], "serving");
    assert_eq!(doc["schema"], 1);
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&d.socket).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o660, "socket mode {mode:o}");
    }
    println!("{human}");
    let metrics = d.get("/metrics").expect("/metrics");
    assert!(metrics.contains("expertd_engine_serving 1"), "{metrics}");
    assert!(metrics.contains("# TYPE expertd_engine_restarts_total counter"));

    // The engine's decode speed reaches the status (polled from its /metrics).
    let s = d.wait_status("decode speed in status", Duration::from_secs(15), |s| {
        s["decode"]["tokens_per_second"]
            .as_f64()
            .is_some_and(|t| t > 0.0)
    });
    assert!(s["decode"]["tokens_predicted_total"].as_f64().unwrap() >= 1.0);

    // kill -9 the engine: restarted, serving again, counted.
    assert!(signal("KILL", &pid.to_string()));
    let s = d.wait_status("engine restarted after kill -9", SERVE, |s| {
        s["engine"]["state"] == "serving" && s["engine"]["restarts"] == 1
    });
    let pid2 = s["engine"]["pid"].as_u64().unwrap() as u32;
    assert_ne!(pid, pid2);
    assert!(!alive(pid));
    assert!(
        s["last_error"].as_str().unwrap_or("").contains("SIGKILL"),
        "{}",
        s["last_error"]
    );
    assert!(d.complete("Hello again", 4).is_ok());

    // SIGTERM the daemon: it stops the engine and exits 0, leaving no process behind.
    let daemon_pid = d.pid();
    let code = d.terminate(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{}", d.log_text());
    assert!(!alive(pid2), "engine {pid2} outlived the daemon");
    assert!(
        group_members(pid2).is_empty(),
        "orphans in the engine's group"
    );
    assert!(!alive(daemon_pid));
    assert!(!d.socket.exists(), "socket left behind");
    let log = d.log_text();
    assert!(
        log.contains("expertd::engine"),
        "engine output not in the daemon's log"
    );
}

/// An engine started with an API key answers /metrics only with it: the daemon sends
/// the key, so the decode speed still reaches the status.
#[test]
fn decode_speed_is_read_from_an_engine_with_an_api_key() {
    let _one = serial();
    let mut d = Daemon::start(
        &tiny_model(),
        &engine_binary(),
        "extra_args = [\"--api-key\", \"sesame\"]",
        "",
    );
    d.wait_serving(SERVE);
    let refused = d.complete("Hello", 4).unwrap_err();
    assert!(refused.contains("401"), "the key is enforced: {refused}");
    d.api_key = Some("sesame".into());
    d.complete("Hello", 4).expect("a completion with the key");
    let s = d.wait_status("decode speed in status", Duration::from_secs(15), |s| {
        s["decode"]["tokens_per_second"]
            .as_f64()
            .is_some_and(|t| t > 0.0)
    });
    assert!(s["decode"]["tokens_predicted_total"].as_f64().unwrap() >= 1.0);
    let log = std::fs::read_to_string(&d.log).unwrap();
    assert!(
        !log.contains("sesame"),
        "the key must not reach the daemon's log"
    );
}

#[test]
fn an_engine_that_always_crashes_is_a_reported_crash_loop() {
    let _one = serial();
    let _engine = engine_binary(); // the suite needs the real engine; fail early without it
    let dir = tempfile::tempdir().unwrap();
    let crasher = dir.path().join("crasher.sh");
    std::fs::write(
        &crasher,
        "#!/bin/sh\necho \"crasher: cannot serve\" >&2\nexit 3\n",
    )
    .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&crasher, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let mut d = Daemon::start(
        &tiny_model(),
        &crasher,
        "",
        "[restart]\nbackoff_initial_ms = 50\nbackoff_max_secs = 1\ncrash_loop_restarts = 3\ncrash_loop_window_secs = 60",
    );
    let s = d.wait_status("crash loop", Duration::from_secs(60), |s| {
        s["engine"]["state"] == "crash_loop"
    });
    assert_eq!(
        s["engine"]["restarts"], 2,
        "two restarts, then the third crash stops it"
    );
    assert_eq!(s["engine"]["last_exit"], "exited with status 3");
    let err = s["last_error"].as_str().unwrap();
    assert!(err.contains("crash loop"), "{err}");
    assert!(s["engine"]["pid"].is_null());
    // Still alive and answering, and not restarting any more.
    std::thread::sleep(Duration::from_millis(1500));
    let s2 = d.status().expect("daemon alive after the crash loop");
    assert_eq!(s2["engine"]["state"], "crash_loop");
    assert_eq!(s2["engine"]["restarts"], 2);
    assert!(d.log_text().contains("crasher: cannot serve"));
    assert_eq!(d.terminate(Duration::from_secs(10)), Some(0));
}

#[test]
fn an_invalid_config_is_reported_and_the_engine_keeps_serving() {
    let _one = serial();
    let (mut d, pid) = serving_on(&tiny_model());
    let good = std::fs::read_to_string(&d.config).unwrap();

    // A harmless edit (a comment): re-planned, same plan, no restart.
    d.write_config(&format!("# edited\n{good}"));
    std::thread::sleep(Duration::from_secs(2));
    let s = d.status().unwrap();
    assert_eq!(
        s["engine"]["pid"].as_u64(),
        Some(pid),
        "restarted for an unchanged plan"
    );
    assert_eq!(s["engine"]["replans"], 0);

    d.write_config(&format!("{good}\n[pool]\nmode = \"sometimes\"\n"));
    let s = d.wait_status("config error in status", Duration::from_secs(30), |s| {
        s["config"]["error"].is_string()
    });
    let err = s["config"]["error"].as_str().unwrap();
    assert!(err.contains("pool.mode"), "{err}");
    assert!(s["last_error"].as_str().unwrap().contains("pool.mode"));
    assert_eq!(s["engine"]["state"], "serving");
    assert_eq!(
        s["engine"]["pid"].as_u64(),
        Some(pid),
        "the old engine must keep serving"
    );
    assert!(d.complete("Still here?", 4).is_ok());
    // `expertd status` still finds the daemon although the config file is broken.
    let out = std::process::Command::new(expertd_binary())
        .args(["status", "--config"])
        .arg(&d.config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("config error"));

    // Fixed again: the error clears, still the same engine.
    d.write_config(&good);
    let s = d.wait_status("config error cleared", Duration::from_secs(30), |s| {
        s["config"]["error"].is_null()
    });
    assert_eq!(s["engine"]["pid"].as_u64(), Some(pid));

    // SIGHUP (systemctl reload): re-planned, unchanged, so the engine keeps running.
    let reloads = s["daemon"]["reloads"].as_u64().unwrap();
    assert!(signal("HUP", &d.pid().to_string()));
    let s = d.wait_status("SIGHUP reload", Duration::from_secs(30), |s| {
        s["daemon"]["reloads"].as_u64() == Some(reloads + 1)
    });
    assert_eq!(s["engine"]["pid"].as_u64(), Some(pid));
    assert_eq!(s["engine"]["state"], "serving");
    assert_eq!(d.terminate(Duration::from_secs(30)), Some(0));
}

/// A daemon with the default config serving `model`, and the engine's pid.
fn serving_on(model: &std::path::Path) -> (Daemon, u64) {
    let mut d = Daemon::start(model, &engine_binary(), "", "");
    let s = d.wait_serving(SERVE);
    let pid = s["engine"]["pid"].as_u64().unwrap();
    (d, pid)
}

/// A daemon serving a copy of the tiny model in a directory of its own (which the test
/// may change): the directory, the model's path, the daemon and the engine's pid.
fn serving_on_a_copy() -> (tempfile::TempDir, std::path::PathBuf, Daemon, u64) {
    let models = tempfile::tempdir().unwrap();
    let model = models.path().join("model.gguf");
    std::fs::copy(tiny_model(), &model).unwrap();
    let (d, pid) = serving_on(&model);
    (models, model, d, pid)
}

#[test]
fn a_changed_model_file_is_replanned_and_restarted() {
    let _one = serial();
    let (models, model, mut d, pid) = serving_on_a_copy();

    // Replace the model the way a download does: write aside, rename over.
    let next = models.path().join("model.gguf.part");
    write_tiny_model(&next, 7);
    std::fs::rename(&next, &model).unwrap();
    let s = d.wait_status("restart for the new model", SERVE, |s| {
        s["engine"]["replans"] == 1 && s["engine"]["state"] == "serving"
    });
    assert_ne!(s["engine"]["pid"].as_u64(), Some(pid));
    assert_eq!(s["engine"]["restarts"], 0, "a re-plan is not a crash");
    assert!(!alive(pid as u32));
    assert!(d.complete("New model", 4).is_ok());

    // An unreadable model keeps the running engine (replaced by rename: the engine's
    // mapping of the old file stays intact, as with any download).
    std::fs::write(&next, b"not a gguf").unwrap();
    std::fs::rename(&next, &model).unwrap();
    let s = d.wait_status("model error reported", Duration::from_secs(30), |s| {
        s["config"]["error"].is_string()
    });
    assert_eq!(s["engine"]["state"], "serving");
    assert!(d.complete("Still serving", 4).is_ok());

    // The model's directory is deleted and made again with a model in it: applied, and
    // the new directory is watched (its inotify watch died with the old one), so a later
    // download into it is applied too.
    std::fs::remove_dir_all(models.path()).unwrap();
    std::fs::create_dir(models.path()).unwrap();
    write_tiny_model(&next, 9);
    std::fs::rename(&next, &model).unwrap();
    d.wait_status("the model in the new directory applied", SERVE, |s| {
        s["engine"]["replans"] == 2
            && s["engine"]["state"] == "serving"
            && s["config"]["error"].is_null()
    });
    // Let the events of the deletion settle (they may re-plan once more), then download.
    std::thread::sleep(Duration::from_secs(2));
    let replans = d.status().expect("status")["engine"]["replans"]
        .as_u64()
        .unwrap();
    write_tiny_model(&next, 13);
    std::fs::rename(&next, &model).unwrap();
    let s = d.wait_status("a later download into it applied", SERVE, |s| {
        s["engine"]["replans"].as_u64() == Some(replans + 1) && s["engine"]["state"] == "serving"
    });
    assert!(d.complete("Newest model", 4).is_ok());
    assert_eq!(d.terminate(Duration::from_secs(30)), Some(0));
    wait_for("engine gone", Duration::from_secs(5), || {
        (!alive(s["engine"]["pid"].as_u64().unwrap() as u32)).then_some(())
    });
}

/// A model split over three files (llama.cpp's `gguf-split` layout) is served from its
/// first file, the status lists its files, and replacing a later split restarts the engine
/// as replacing a whole model does.
#[test]
fn a_split_model_is_served_and_a_replaced_split_restarts_the_engine() {
    let _one = serial();
    let models = tempfile::tempdir().unwrap();
    let whole = models.path().join("model.gguf");
    std::fs::copy(tiny_model(), &whole).unwrap();
    let splits = expertd::gguf::write_split(&whole, 3).unwrap();
    std::fs::remove_file(&whole).unwrap();
    let (mut d, pid) = serving_on(&splits[0]);
    let s = d.status().expect("status");
    let listed: Vec<String> = splits.iter().map(|p| p.display().to_string()).collect();
    assert_eq!(s["model"]["splits"], serde_json::json!(listed));
    assert!(d.complete("Split model", 4).is_ok());
    let out = std::process::Command::new(expertd_binary())
        .args(["status", "--config"])
        .arg(&d.config)
        .output()
        .unwrap();
    let human = String::from_utf8_lossy(&out.stdout);
    assert!(human.contains("split over 3 files"), "{human}");

    // The third split of the same model with other weights, downloaded next to it and
    // renamed into place.
    let other = tempfile::tempdir().unwrap();
    let other_whole = other.path().join("model.gguf");
    write_tiny_model(&other_whole, 7);
    let other_splits = expertd::gguf::write_split(&other_whole, 3).unwrap();
    let part = models.path().join("part");
    std::fs::copy(&other_splits[2], &part).unwrap();
    std::fs::rename(&part, &splits[2]).unwrap();
    let s = d.wait_status("restart for the replaced split", SERVE, |s| {
        s["engine"]["replans"] == 1 && s["engine"]["state"] == "serving"
    });
    assert_ne!(s["engine"]["pid"].as_u64(), Some(pid));
    assert!(d.complete("Replaced split", 4).is_ok());

    // A split going missing is reported and the engine keeps serving; when it is back,
    // the model is applied again.
    let pid = s["engine"]["pid"].as_u64();
    let kept = other.path().join("kept");
    std::fs::rename(&splits[1], &kept).unwrap();
    let s = d.wait_status("missing split reported", Duration::from_secs(30), |s| {
        s["config"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("missing: split 2 of 3"))
    });
    assert_eq!(s["engine"]["pid"].as_u64(), pid);
    assert_eq!(s["engine"]["state"], "serving");
    std::fs::copy(&kept, &part).unwrap();
    std::fs::rename(&part, &splits[1]).unwrap();
    // (a copy: another file, so the engine restarts on it)
    let s = d.wait_status("the split back, the model applied", SERVE, |s| {
        s["config"]["error"].is_null()
            && s["engine"]["replans"] == 2
            && s["engine"]["state"] == "serving"
    });
    assert_ne!(s["engine"]["pid"].as_u64(), pid);
    assert!(d.complete("All splits back", 4).is_ok());

    // The config names another split model whose second split is still downloading:
    // reported; when it arrives, applied (the new model's splits are watched by name).
    let third = tempfile::tempdir().unwrap();
    let third_whole = third.path().join("next.gguf");
    write_tiny_model(&third_whole, 9);
    let next = expertd::gguf::write_split(&third_whole, 2).unwrap();
    let held = other.path().join("held");
    std::fs::rename(&next[1], &held).unwrap();
    let text = std::fs::read_to_string(&d.config).unwrap();
    let model_line = format!("model = {:?}", splits[0].display().to_string());
    assert!(text.contains(&model_line), "{text}");
    d.write_config(&text.replace(
        &model_line,
        &format!("model = {:?}", next[0].display().to_string()),
    ));
    d.wait_status(
        "the new model's missing split reported",
        Duration::from_secs(30),
        |s| {
            s["config"]["error"]
                .as_str()
                .is_some_and(|e| e.contains("missing: split 2 of 2"))
        },
    );
    let part = third.path().join("part");
    std::fs::copy(&held, &part).unwrap();
    std::fs::rename(&part, &next[1]).unwrap();
    let s = d.wait_status("the new split model applied", SERVE, |s| {
        s["config"]["error"].is_null()
            && s["engine"]["replans"] == 3
            && s["engine"]["state"] == "serving"
    });
    assert_eq!(s["model"]["path"], next[0].display().to_string());
    assert!(d.complete("Next model", 4).is_ok());
    assert_eq!(d.terminate(Duration::from_secs(30)), Some(0));
}

#[test]
fn a_config_naming_a_model_not_there_yet_is_applied_when_it_appears() {
    let _one = serial();
    let (models, model, mut d, pid) = serving_on_a_copy();

    // The config names a model in a directory that does not exist yet: reported, and the
    // running engine keeps serving.
    let next = models.path().join("new/next.gguf");
    let text = std::fs::read_to_string(&d.config).unwrap();
    let model_line = format!("model = {:?}", model.display().to_string());
    assert!(text.contains(&model_line), "{text}");
    d.write_config(&text.replace(
        &model_line,
        &format!("model = {:?}", next.display().to_string()),
    ));
    let s = d.wait_status("missing model reported", Duration::from_secs(30), |s| {
        s["config"]["error"].is_string()
    });
    assert_eq!(s["engine"]["pid"].as_u64(), Some(pid));
    assert_eq!(s["engine"]["state"], "serving");

    // The download arrives (directory first, then the file renamed into place): applied
    // without SIGHUP.
    std::fs::create_dir(models.path().join("new")).unwrap();
    let part = models.path().join("new/next.gguf.part");
    write_tiny_model(&part, 11);
    std::fs::rename(&part, &next).unwrap();
    let s = d.wait_status("the new model applied", SERVE, |s| {
        s["engine"]["replans"] == 1
            && s["engine"]["state"] == "serving"
            && s["config"]["error"].is_null()
    });
    assert_eq!(s["model"]["path"], next.display().to_string());
    assert_ne!(s["engine"]["pid"].as_u64(), Some(pid));
    assert!(d.complete("New model", 4).is_ok());
    assert_eq!(d.terminate(Duration::from_secs(30)), Some(0));
}

#[test]
fn a_changed_socket_is_moved_to_on_reload() {
    let _one = serial();
    let (mut d, pid) = serving_on(&tiny_model());
    let old = d.socket.clone();
    let text = std::fs::read_to_string(&d.config).unwrap();
    let socket_line = |p: &std::path::Path| format!("socket = {:?}", p.display().to_string());
    assert!(text.contains(&socket_line(&old)), "{text}");

    // A new socket (in a directory that does not exist yet): served, the old one removed,
    // and the engine untouched.
    let new = d.dir.path().join("run2/status.sock");
    d.write_config(&text.replace(&socket_line(&old), &socket_line(&new)));
    d.socket = new.clone();
    let s = d.wait_status("status on the new socket", Duration::from_secs(30), |s| {
        s["daemon"]["socket"] == new.display().to_string()
    });
    assert!(s["daemon"]["socket_error"].is_null());
    assert_eq!(s["engine"]["pid"].as_u64(), Some(pid));
    wait_for("old socket removed", Duration::from_secs(5), || {
        (!old.exists()).then_some(())
    });
    let out = std::process::Command::new(expertd_binary())
        .args(["status", "--config"])
        .arg(&d.config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A socket path that cannot be made: reported, the current socket kept.
    let blocked = d.dir.path().join("not-a-socket");
    std::fs::write(&blocked, b"a file").unwrap();
    let text = std::fs::read_to_string(&d.config).unwrap();
    d.write_config(&text.replace(&socket_line(&new), &socket_line(&blocked)));
    let s = d.wait_status("socket error in status", Duration::from_secs(30), |s| {
        s["daemon"]["socket_error"].is_string()
    });
    let err = s["daemon"]["socket_error"].as_str().unwrap();
    assert!(
        err.contains("not applied") && err.contains("not a socket"),
        "{err}"
    );
    assert_eq!(s["daemon"]["socket"], new.display().to_string());
    assert_eq!(s["engine"]["state"], "serving");
    let out = std::process::Command::new(expertd_binary())
        .args(["status", "--config"])
        .arg(&d.config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("may still listen on an earlier socket"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The cause removed, a reload (SIGHUP, config unchanged) tries that socket again.
    std::fs::remove_file(&blocked).unwrap();
    assert!(signal("HUP", &d.pid().to_string()));
    d.socket = blocked.clone();
    let s = d.wait_status(
        "status on the unblocked socket",
        Duration::from_secs(30),
        |s| s["daemon"]["socket"] == blocked.display().to_string(),
    );
    assert!(s["daemon"]["socket_error"].is_null());
    assert_eq!(d.terminate(Duration::from_secs(30)), Some(0));
    assert!(!new.exists(), "old socket left behind");
    assert!(!blocked.exists(), "socket left behind");
}

#[test]
fn an_engine_port_held_by_another_process_is_reported_then_recovered() {
    let _one = serial();
    let engine = engine_binary();
    // Another process listens on the engine's port before the daemon starts.
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = squatter.local_addr().unwrap().port();
    let mut d = Daemon::start_with_env(
        &tiny_model(),
        &engine,
        "",
        "[restart]\nbackoff_initial_ms = 200\nbackoff_max_secs = 1\ncrash_loop_restarts = 50",
        &[],
        Some(port),
    );
    let s = d.wait_status("port conflict reported", Duration::from_secs(30), |s| {
        s["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("not free"))
    });
    assert_ne!(s["engine"]["state"], "serving");
    drop(squatter);
    let s = d.wait_serving(SERVE);
    assert!(s["engine"]["restarts"].as_u64().unwrap() >= 1);
    assert!(d.complete("Port is mine now", 4).is_ok());
    assert_eq!(d.terminate(Duration::from_secs(30)), Some(0));
}
