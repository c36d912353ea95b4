//! Test-only crate: its build script runs bindgen on `ffi/include/expert_pool.h` and
//! `tests/abi.rs` checks every declaration against the Rust exports of `expert-pool`
//! (function signatures must be identical types; structs must agree in size,
//! alignment, field names and field offsets; constants must agree in value).
