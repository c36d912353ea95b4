//! The expert pool: keeps the hot experts of every MoE layer in a fixed number of slots
//! and brings misses in from the GGUF file.
//!
//! This crate is the only place in the workspace with `extern "C"` functions; they live
//! in [`capi`] and are declared for C in `ffi/include/expert_pool.h`.

pub mod capi;

/// The pool's version, as reported through the C ABI.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
