//! expertd's library: everything but argument parsing lives here.
//!
//! See ARCHITECTURE.md for the code map and the invariants each module keeps.

pub mod api;
pub mod cli;
pub mod config;
pub mod engine;
pub mod gguf;
pub mod ollama;
pub mod plan;
pub mod probe;
pub mod supervisor;
pub mod synth;
