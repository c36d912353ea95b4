//! Links the stock engine's static libraries (libllama, libggml*) and generates Rust
//! bindings of `llama.h` with bindgen (libclang).
//!
//! Where the engine is: `$EXPERTD_ENGINE_BUILD_DIR` (a cmake build directory of the pinned
//! llama.cpp, CPU backend, `BUILD_SHARED_LIBS=OFF`), else the stock CPU build tree that
//! `expertd engine build --stock` leaves in `<workspace>/target/engine-work/stock/build-cpu`.
//! The headers come from the source tree that build directory was configured from
//! (`CMAKE_HOME_DIRECTORY` in its `CMakeCache.txt`), so bindings and libraries always match.
//! When the engine is not built the build fails with the command that builds it.

use std::path::{Path, PathBuf};

/// The static libraries, in link order (dependents first), and where cmake puts them.
const LIBS: [(&str, &str); 4] = [
    ("llama", "src"),
    ("ggml", "ggml/src"),
    ("ggml-cpu", "ggml/src"),
    ("ggml-base", "ggml/src"),
];

fn fail(msg: &str) -> ! {
    eprintln!("\nexpertd-recorder: {msg}\n");
    eprintln!(
        "expertd-recorder links the stock llama.cpp engine. Build it first with\n\n    \
         cargo run --release -p expertd -- engine build --stock\n\n\
         (`expertd engine build --stock`; scripts/test.sh does it), or set \
         EXPERTD_ENGINE_BUILD_DIR to a CPU cmake build directory of the pinned llama.cpp \
         (static libraries).\n"
    );
    std::process::exit(1);
}

fn cache_value<'a>(cache: &'a str, key: &str) -> Option<&'a str> {
    cache.lines().find_map(|line| {
        let (k, v) = line.split_once('=')?;
        (k.split(':').next() == Some(key)).then_some(v.trim())
    })
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=EXPERTD_ENGINE_BUILD_DIR");
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let workspace = manifest
        .parent()
        .and_then(Path::parent)
        .expect("ffi/recorder sits two levels below the workspace root")
        .to_path_buf();
    let build_dir = match std::env::var_os("EXPERTD_ENGINE_BUILD_DIR") {
        Some(d) => PathBuf::from(d),
        None => workspace
            .join("target")
            .join("engine-work")
            .join("stock")
            .join("build-cpu"),
    };
    let cache_file = build_dir.join("CMakeCache.txt");
    println!("cargo:rerun-if-changed={}", cache_file.display());
    let cache = match std::fs::read_to_string(&cache_file) {
        Ok(c) => c,
        Err(e) => fail(&format!(
            "the stock engine is not built: cannot read {} ({e})",
            cache_file.display()
        )),
    };
    if cache_value(&cache, "BUILD_SHARED_LIBS") != Some("OFF") {
        fail(&format!(
            "{} was not configured with BUILD_SHARED_LIBS=OFF",
            build_dir.display()
        ));
    }
    for gpu in ["GGML_CUDA", "GGML_VULKAN", "GGML_METAL", "GGML_HIP"] {
        if cache_value(&cache, gpu) == Some("ON") {
            fail(&format!(
                "{} is a {gpu} build; the recorder links the CPU build (build-cpu)",
                build_dir.display()
            ));
        }
    }
    let Some(src) = cache_value(&cache, "CMAKE_HOME_DIRECTORY").map(PathBuf::from) else {
        fail(&format!(
            "{} names no source directory",
            cache_file.display()
        ));
    };
    let header = src.join("include").join("llama.h");
    if !header.is_file() {
        fail(&format!(
            "{} is missing (source tree of {})",
            header.display(),
            build_dir.display()
        ));
    }
    println!("cargo:rerun-if-changed={}", header.display());

    for (name, sub) in LIBS {
        let dir = build_dir.join(sub);
        let lib = dir.join(format!("lib{name}.a"));
        if !lib.is_file() {
            fail(&format!(
                "the stock engine is not built: {} is missing",
                lib.display()
            ));
        }
        println!("cargo:rerun-if-changed={}", lib.display());
        println!("cargo:rustc-link-search=native={}", dir.display());
        println!("cargo:rustc-link-lib=static={name}");
    }
    println!("cargo:rustc-link-lib=dylib=stdc++");
    if cache_value(&cache, "GGML_OPENMP_ENABLED") == Some("ON") {
        println!("cargo:rustc-link-lib=dylib=gomp");
    }
    println!("cargo:rustc-link-lib=dylib=m");

    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let bindings = bindgen::Builder::default()
        .header(header.to_string_lossy())
        .clang_arg(format!("-I{}", src.join("include").display()))
        .clang_arg(format!("-I{}", src.join("ggml").join("include").display()))
        .allowlist_function("llama_.*|ggml_.*")
        .allowlist_type("llama_.*|ggml_.*")
        .allowlist_var("LLAMA_.*|GGML_.*")
        .prepend_enum_name(false)
        .rust_edition(bindgen::RustEdition::Edition2024)
        .rust_target(bindgen::RustTarget::stable(85, 0).expect("bindgen knows Rust 1.85"))
        .generate()
        .unwrap_or_else(|e| fail(&format!("bindgen could not read {}: {e}", header.display())));
    bindings
        .write_to_file(out.join("llama_sys.rs"))
        .unwrap_or_else(|e| fail(&format!("writing the bindings: {e}")));
    // Where the libraries came from, for `--version`-style reports.
    println!(
        "cargo:rustc-env=EXPERTD_RECORDER_ENGINE_DIR={}",
        build_dir.display()
    );
}
