//! The C ABI. Every function here is declared in `ffi/include/expert_pool.h`, which
//! states ownership and thread safety. No panic crosses this boundary.

use std::ffi::c_char;

/// NUL-terminated copy of [`crate::VERSION`] with static lifetime.
static VERSION_C: &str = concat!(env!("CARGO_PKG_VERSION"), "\0");

/// Returns the pool's version as a static NUL-terminated string. Never NULL; the caller
/// must not free it. Thread-safe.
#[unsafe(no_mangle)]
pub extern "C" fn expert_pool_version() -> *const c_char {
    VERSION_C.as_ptr().cast()
}
