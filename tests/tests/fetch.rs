//! vendor/fetch.sh: it verifies the pin, refuses a corrupted download, and is idempotent.
//!
//! Uses the sdist that the set-up step downloaded into the cache (~/.cache/expertd or
//! $EXPERTD_CACHE); it fails, not skips, when that is missing.

use std::fs;
use std::path::PathBuf;
use std::process::{Command, Output};

use expertd_tests::workspace;

fn pin_value(key: &str) -> String {
    let pin = fs::read_to_string(workspace().join("vendor/llama.cpp.pin")).unwrap();
    pin.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("pin has no {key}"))
        .to_string()
}

fn cached_sdist() -> PathBuf {
    let cache = std::env::var_os("EXPERTD_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/expertd"));
    let name = format!(
        "{}-{}.tar.gz",
        pin_value("package").replace('-', "_"),
        pin_value("version")
    );
    let path = cache.join(name);
    assert!(
        path.is_file(),
        "{} is missing: run vendor/fetch.sh once (scripts/test.sh does)",
        path.display()
    );
    path
}

fn fetch(dest: &std::path::Path, sdist: &std::path::Path) -> Output {
    Command::new("bash")
        .arg(workspace().join("vendor/fetch.sh"))
        .arg(dest)
        .env("EXPERTD_SDIST", sdist)
        .output()
        .expect("running vendor/fetch.sh")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn verified_sdist_extracts_the_tree_once() {
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("llama.cpp");
    let sdist = cached_sdist();

    let out = fetch(&dest, &sdist);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("sha256 verified"), "{}", text(&out));
    assert!(dest.join("CMakeLists.txt").is_file());
    assert!(dest.join("tools/server/server.cpp").is_file());
    assert!(
        !dest.join(".git").exists(),
        "the sdist's submodule pointer must be removed"
    );
    let stamp = fs::read_to_string(dest.join(".expertd-pin")).unwrap();
    assert!(stamp.contains(&pin_value("sha256")), "{stamp}");

    // Second run: nothing to do, tree untouched.
    let out = fetch(&dest, &sdist);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("nothing to do"), "{}", text(&out));
}

#[test]
fn corrupted_download_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = fs::read(cached_sdist()).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    let corrupt = dir.path().join("corrupt.tar.gz");
    fs::write(&corrupt, &bytes).unwrap();
    let truncated = dir.path().join("truncated.tar.gz");
    fs::write(&truncated, &bytes[..middle]).unwrap();

    for bad in [&corrupt, &truncated] {
        let dest = dir.path().join("llama.cpp");
        let out = fetch(&dest, bad);
        assert!(
            !out.status.success(),
            "accepted {}: {}",
            bad.display(),
            text(&out)
        );
        let msg = text(&out);
        assert!(msg.contains("checksum mismatch"), "{msg}");
        assert!(
            msg.contains(&pin_value("sha256")),
            "names the expected sum: {msg}"
        );
        assert!(
            !dest.exists(),
            "nothing may be extracted from a bad download"
        );
    }
}

#[test]
fn missing_sdist_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let out = fetch(&dir.path().join("dest"), &dir.path().join("nope.tar.gz"));
    assert!(!out.status.success());
    assert!(text(&out).contains("nope.tar.gz"), "{}", text(&out));
}
