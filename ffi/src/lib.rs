//! The expert pool: keeps the hot experts of every MoE layer in a fixed number of slots
//! and brings misses in from the GGUF file.
//!
//! Code map (each module states its invariants):
//! - [`slots`]: one layer's expert<->slot maps and slot states (pure bookkeeping).
//! - [`policy`]: eviction policies behind the [`policy::Policy`] trait.
//! - [`io`]: reads of expert slices (io_uring, O_DIRECT, pread fallback).
//! - [`arena`]: huge-page memory the reads land in.
//! - [`dest`]: where filled bytes go (pool memory, engine memory, callback).
//! - [`pool`]: the pool itself: files, layers, requests, prefetch, metrics.
//! - [`metrics`]: counters, the stats snapshot and the stats file format.
//! - [`trace`] and [`sim`]: routing traces (format, generator, statistics) and the
//!   policy simulator with Belady's optimum.
//! - [`capi`]: the C ABI declared in `ffi/include/expert_pool.h`. This crate is the
//!   only place in the workspace with `extern "C"` functions.

pub mod arena;
pub mod capi;
pub mod dest;
pub mod error;
pub mod io;
pub mod metrics;
pub mod policy;
pub mod pool;
pub mod sim;
pub mod slots;
pub mod trace;

pub use error::{PoolError, Status};
pub use pool::{LayerSpec, Pool, PoolConfig, ProjSpec};

/// The pool's version, as reported through the C ABI.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
