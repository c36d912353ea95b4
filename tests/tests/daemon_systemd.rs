//! The systemd side: the unit files pass `systemd-analyze verify` (with the drop-in
//! example applied), the unit has the settings operators rely on, and the daemon speaks
//! the notify protocol: READY=1 once the engine serves, WATCHDOG=1 pings, STOPPING=1.

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::{Duration, Instant};

use expertd_tests::daemon_support::{
    Daemon, engine_binary, expertd_binary, serial, tiny_model, workspace,
};

fn unit_text() -> String {
    std::fs::read_to_string(workspace().join("systemd/expertd.service")).unwrap()
}

#[test]
fn unit_has_the_settings_operators_rely_on() {
    let u = unit_text();
    for line in [
        "Type=notify",
        "Restart=on-failure",
        "WatchdogSec=",
        "StateDirectory=expertd",
        "RuntimeDirectory=expertd",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
        "ProtectHome=yes",
        "RestartPreventExitStatus=73 78",
        "ExecStart=/usr/bin/expertd serve --config /etc/expertd/expertd.toml",
        "ExecReload=/bin/kill -HUP $MAINPID",
    ] {
        assert!(u.lines().any(|l| l.starts_with(line)), "unit lacks {line}");
    }
    // The exit codes the unit names are the ones the daemon uses.
    assert_eq!(expertd::supervisor::daemon::EXIT_CONFIG, 78);
    assert_eq!(expertd::supervisor::daemon::EXIT_CANTCREAT, 73);
}

#[test]
fn systemd_analyze_verify_passes() {
    let Ok(out) = Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("SKIPPED: systemd-analyze not installed (apt-get install systemd)");
        return;
    };
    assert!(out.status.success());
    let t = tempfile::tempdir().unwrap();
    // ExecStart must name an existing executable: use this build's expertd.
    let bin = expertd_binary();
    let unit = unit_text().replace("/usr/bin/expertd", &bin.display().to_string());
    std::fs::write(t.path().join("expertd.service"), unit).unwrap();
    let verify = |what: &str| {
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(t.path().join("expertd.service"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{what}: verify failed: {stderr}");
        // Unknown keys and bad values are only warnings (exit 0): none allowed.
        assert!(stderr.trim().is_empty(), "{what}: {stderr}");
    };
    verify("unit");
    // The drop-in example with every setting uncommented.
    let example = std::fs::read_to_string(
        workspace().join("systemd/expertd.service.d/override.conf.example"),
    )
    .unwrap();
    let dropin: String = example
        .lines()
        .map(|l| match l.strip_prefix('#') {
            Some(r) if r.starts_with(|c: char| c.is_ascii_uppercase()) => r.to_string(),
            _ => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
        .replace("/usr/bin/expertd", &bin.display().to_string());
    assert!(dropin.contains("\nMemoryMax="), "uncommenting failed");
    let d = t.path().join("expertd.service.d");
    std::fs::create_dir(&d).unwrap();
    std::fs::write(d.join("override.conf"), &dropin).unwrap();
    verify("unit with the drop-in example");
    // The check has teeth: a bad value in a drop-in is caught.
    std::fs::write(d.join("override.conf"), "[Service]\nProtectSystem=banana\n").unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(t.path().join("expertd.service"))
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&out.stderr).trim().is_empty());
}

fn recv_until(sock: &UnixDatagram, want: &str, timeout: Duration, seen: &mut Vec<String>) -> bool {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    while start.elapsed() < timeout {
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            let hit = msg.lines().any(|l| l == want);
            seen.push(msg);
            if hit {
                return true;
            }
        }
    }
    false
}

#[test]
fn the_daemon_speaks_the_notify_protocol() {
    let _one = serial();
    let engine = engine_binary();
    let t = tempfile::tempdir().unwrap();
    let path = t.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let env = [
        ("NOTIFY_SOCKET", path.display().to_string()),
        ("WATCHDOG_USEC", "1000000".to_string()),
    ];
    let mut d = Daemon::start_with_env(&tiny_model(), &engine, "", "", &env, None);
    let mut seen = Vec::new();
    assert!(
        recv_until(&sock, "READY=1", Duration::from_secs(120), &mut seen),
        "no READY=1: {seen:?}\n{}",
        d.log_text()
    );
    // READY=1 comes only once the engine serves.
    let s = d.status().unwrap();
    assert_eq!(s["engine"]["state"], "serving");
    // WATCHDOG_USEC=1s: pings every 0.5 s.
    let mut pings = Vec::new();
    assert!(
        recv_until(&sock, "WATCHDOG=1", Duration::from_secs(3), &mut pings),
        "{pings:?}"
    );
    assert!(
        recv_until(&sock, "WATCHDOG=1", Duration::from_secs(3), &mut pings),
        "{pings:?}"
    );
    assert_eq!(d.terminate(Duration::from_secs(30)), Some(0));
    let mut rest = Vec::new();
    assert!(
        recv_until(&sock, "STOPPING=1", Duration::from_secs(1), &mut rest),
        "{rest:?}"
    );
}
