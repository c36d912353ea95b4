//! Compiles `tests/c/smoke.c` against `include/expert_pool.h` and the staticlib
//! (`libexpert_pool.a`, built by cargo next to the test binary) with the system C
//! compiler, then runs it against a test model file.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::*;

fn staticlib() -> PathBuf {
    // The test binary lives in <target>/<profile>/deps; the staticlib in <profile>.
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|d| d.parent()).unwrap();
    let lib = dir.join("libexpert_pool.a");
    assert!(
        lib.exists(),
        "{} is missing: cargo builds it with the lib's staticlib crate-type",
        lib.display()
    );
    lib
}

#[test]
fn c_program_uses_the_pool_through_the_header() {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let lib = staticlib();
    let exe = disk_dir().join(format!("smoke-{}", std::process::id()));
    let compiler = cc::Build::new()
        .cargo_metadata(false)
        .opt_level(0)
        .target(env!("TEST_TARGET"))
        .host(env!("TEST_TARGET"))
        .get_compiler();
    let out = compiler
        .to_command()
        .args([
            "-std=c11",
            "-D_GNU_SOURCE",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-I",
        ])
        .arg(manifest.join("include"))
        .arg(manifest.join("tests/c/smoke.c"))
        .arg(&lib)
        .args(["-lpthread", "-ldl", "-lm", "-o"])
        .arg(&exe)
        .output()
        .expect("running the C compiler");
    assert!(
        out.status.success(),
        "C compile failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let m = write_model(
        "c-model.bin",
        1,
        10,
        &[q4k_bytes(512, 8), q4k_bytes(512, 8), q8_0_bytes(256, 12)],
        77,
    );
    let mut cmd = Command::new(&exe);
    cmd.arg(m.path());
    for t in &m.tensors[0] {
        cmd.arg(format!("{}:{}", t.offset, t.bytes));
    }
    let run = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    println!("{stdout}{}", String::from_utf8_lossy(&run.stderr));
    let _ = std::fs::remove_file(&exe);
    assert!(run.status.success(), "C program failed: {stdout}");
    assert!(stdout.contains("ok: 0 failures"));
}
