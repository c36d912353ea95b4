//! Passes the target triple to the C ABI test (which compiles C with the `cc` crate).
fn main() {
    println!(
        "cargo:rustc-env=TEST_TARGET={}",
        std::env::var("TARGET").expect("cargo sets TARGET")
    );
    println!("cargo:rerun-if-changed=build.rs");
}
