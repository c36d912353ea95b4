//! expertd's library: everything but argument parsing lives here.
//!
//! See ARCHITECTURE.md for the code map and the invariants each module keeps.

pub mod cli;
pub mod engine;
pub mod gguf;
pub mod synth;
