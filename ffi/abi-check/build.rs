//! Generates Rust bindings of `ffi/include/expert_pool.h` with bindgen (libclang):
//! `c_full.rs` has the header's own types and constants; `c_fns.rs` has only
//! the function declarations, written against the Rust crate's types
//! (`expert_pool::capi::*`), so that the tests can compare signatures exactly.

use std::path::PathBuf;

fn main() {
    let header = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../include/expert_pool.h");
    println!("cargo:rerun-if-changed={}", header.display());
    println!("cargo:rerun-if-changed=build.rs");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let h = header.to_str().expect("UTF-8 path");
    bindgen::Builder::default()
        .header(h)
        .allowlist_type("ep_.*")
        .allowlist_var("EP_.*")
        .layout_tests(false)
        .generate()
        .expect("bindgen on expert_pool.h")
        .write_to_file(out.join("c_full.rs"))
        .expect("writing c_full.rs");
    bindgen::Builder::default()
        .header(h)
        .allowlist_function("ep_.*|expert_pool_.*")
        .blocklist_type("ep_.*")
        .layout_tests(false)
        .generate()
        .expect("bindgen on expert_pool.h")
        .write_to_file(out.join("c_fns.rs"))
        .expect("writing c_fns.rs");
}
