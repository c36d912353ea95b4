//! Raw bindings of the pinned `llama.h` (and the parts of `ggml.h` it needs), generated
//! by bindgen in `build.rs`. Nothing here is safe to call without reading the header.

#![allow(
    non_camel_case_types,
    non_upper_case_globals,
    non_snake_case,
    dead_code,
    missing_docs,
    unnecessary_transmutes,
    clippy::all,
    clippy::undocumented_unsafe_blocks,
    reason = "generated code"
)]

include!(concat!(env!("OUT_DIR"), "/llama_sys.rs"));
