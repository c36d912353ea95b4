//! `expertd engine build`'s pipeline (fetch, stage, patch, sync, configure, build,
//! install) on a fake workspace: a C program standing in for llama.cpp, one patch, a
//! fetch script with nothing to fetch. Needs cmake and a C compiler, as the real build.

use std::path::{Path, PathBuf};
use std::process::Command;

use expertd::engine::build::{BuildOptions, build_engine};
use expertd::engine::{Backend, Flavor};

const CMAKE: &str = r#"cmake_minimum_required(VERSION 3.14)
project(fake C)
set(GREETING "default" CACHE STRING "what the programs print first")
add_executable(llama-server src/main.c src/msg.c)
add_executable(llama-bench src/main.c src/msg.c)
target_compile_definitions(llama-server PRIVATE GREETING="${GREETING}")
target_compile_definitions(llama-bench PRIVATE GREETING="${GREETING}")
set_target_properties(llama-server llama-bench PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/bin)
"#;

const PATCH: &str = "--- a/src/msg.c\n+++ b/src/msg.c\n@@ -1 +1 @@\n-const char *msg(void) { return \"pristine\"; }\n+const char *msg(void) { return \"patched\"; }\n";

/// A workspace whose "llama.cpp" prints GREETING and a word the patch changes.
fn fake_workspace(dir: &Path) -> PathBuf {
    let ws = dir.join("ws");
    let src = ws.join("vendor/llama.cpp/src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::create_dir_all(ws.join("patches")).unwrap();
    std::fs::create_dir_all(ws.join("ffi/include")).unwrap();
    let write = |p: &str, text: &str| std::fs::write(ws.join(p), text).unwrap();
    write("vendor/fetch.sh", "exit 0\n");
    write(
        "vendor/llama.cpp.pin",
        "package=fake\nversion=1\nsha256=0\n",
    );
    write("vendor/llama.cpp/CMakeLists.txt", CMAKE);
    write(
        "vendor/llama.cpp/src/main.c",
        "#include <stdio.h>\nconst char *msg(void);\nint main(void) { printf(\"%s %s\\n\", GREETING, msg()); return 0; }\n",
    );
    write(
        "vendor/llama.cpp/src/msg.c",
        "const char *msg(void) { return \"pristine\"; }\n",
    );
    write("patches/0001-msg.patch", PATCH);
    write("ffi/include/expert_pool.h", "");
    write("libexpert_pool.a", "");
    ws
}

fn build(ws: &Path, cmake_args: &[&str]) -> String {
    let opts = BuildOptions {
        backend: Backend::Cpu,
        flavor: Flavor::Patched,
        jobs: Some(2),
        cmake_args: cmake_args.iter().map(|s| s.to_string()).collect(),
        pool_lib: Some(ws.join("libexpert_pool.a")),
    };
    let built = build_engine(ws, &opts, &mut |_| {}).expect("the build");
    let out = Command::new(&built.llama_server).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `path` relative to this process's working directory.
fn relative(path: &Path) -> PathBuf {
    let cwd = std::env::current_dir().unwrap();
    let mut rel = PathBuf::new();
    for _ in cwd.components().skip(1) {
        rel.push("..");
    }
    rel.join(path.strip_prefix("/").unwrap())
}

#[test]
fn a_dropped_cmake_argument_is_dropped_and_a_relative_workspace_builds() {
    let dir = tempfile::tempdir().unwrap();
    let ws = relative(&fake_workspace(dir.path()));
    assert!(ws.is_relative());
    assert_eq!(build(&ws, &["-DGREETING=custom"]), "custom patched");
    // cmake's cache would keep GREETING=custom: a changed argument list starts afresh.
    assert_eq!(build(&ws, &[]), "default patched");
    assert_eq!(build(&ws, &[]), "default patched");
}

#[test]
fn two_builds_at_once_take_turns() {
    let dir = tempfile::tempdir().unwrap();
    let ws = fake_workspace(dir.path());
    let outs: Vec<String> = std::thread::scope(|s| {
        let a = s.spawn(|| build(&ws, &[]));
        let b = s.spawn(|| build(&ws, &[]));
        vec![a.join().unwrap(), b.join().unwrap()]
    });
    assert_eq!(outs, ["default patched", "default patched"]);
}
