//! The header and the Rust exports agree. A signature mismatch fails compilation (the
//! two function pointers must have one type); layouts and constants are asserted.

#![allow(non_camel_case_types, non_upper_case_globals, dead_code, clippy::all)]

use std::collections::BTreeSet;
use std::mem::{align_of, offset_of, size_of};

use expert_pool::capi;
use expert_pool::io::IoMode;
use expert_pool::policy::PolicyKind;

/// Bindgen's view of the header's functions, in terms of the Rust crate's types.
mod c_fns {
    #![allow(improper_ctypes)]
    #[allow(unused_imports)]
    use expert_pool::capi::*;
    include!(concat!(env!("OUT_DIR"), "/c_fns.rs"));
}

/// Bindgen's view of the header's types and constants.
mod c_full {
    include!(concat!(env!("OUT_DIR"), "/c_full.rs"));
}

fn same<T>(_: T, _: T) {}

/// Checks that the header's declaration and the Rust definition of each function have
/// the same type; the `_` placeholders give the arity. Records the name.
macro_rules! check_fns {
    ($set:ident; $($name:ident ( $($a:tt),* );)*) => {
        $(
            same(
                c_fns::$name as unsafe extern "C" fn($($a),*) -> _,
                capi::$name as unsafe extern "C" fn($($a),*) -> _,
            );
            $set.insert(stringify!($name).to_string());
        )*
    };
}

#[test]
fn every_function_matches_the_header() {
    let mut checked = BTreeSet::new();
    check_fns!(checked;
        expert_pool_version();
        ep_last_error();
        ep_status_name(_);
        ep_pool_config_init(_);
        ep_pool_new(_, _);
        ep_pool_delete(_);
        ep_pool_add_file(_, _, _);
        ep_pool_add_fd(_, _, _);
        ep_pool_add_layer(_, _);
        ep_pool_slot_memory(_, _, _, _, _);
        ep_pool_request(_, _, _, _, _, _, _);
        ep_pool_request_start(_, _, _, _, _, _, _, _);
        ep_pool_request_wait(_, _, _);
        ep_pool_stage(_, _, _, _, _, _, _, _);
        ep_pool_stage_ahead(_, _, _, _, _);
        ep_pool_prefetch(_, _, _, _, _);
        ep_pool_poll(_);
        ep_pool_stats(_, _, _);
        ep_pool_stats_json(_, _, _, _);
        ep_pool_publish_stats(_);
    );
    // Every function the header declares is checked above ...
    let header_fns = names_after(
        include_str!(concat!(env!("OUT_DIR"), "/c_fns.rs")),
        "pub fn ",
    );
    assert_eq!(header_fns, checked, "header functions vs checked list");
    // ... and every extern "C" function of capi.rs is in the header.
    let src = include_str!("../../src/capi.rs");
    let rust_fns: BTreeSet<String> = names_after(src, "extern \"C\" fn ")
        .into_iter()
        .filter(|n| !n.is_empty())
        .collect();
    assert_eq!(rust_fns, checked, "Rust exports vs header");
}

/// Identifiers that follow `marker` in `src`.
fn names_after(src: &str, marker: &str) -> BTreeSet<String> {
    src.match_indices(marker)
        .map(|(i, _)| {
            src[i + marker.len()..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect::<String>()
        })
        .filter(|n| !n.is_empty())
        .collect()
}

/// Same size, alignment, field names (exhaustive patterns) and field offsets.
macro_rules! check_struct {
    ($t:ident { $($f:ident),* $(,)? }) => {{
        assert_eq!(size_of::<c_full::$t>(), size_of::<capi::$t>(), "size of {}", stringify!($t));
        assert_eq!(align_of::<c_full::$t>(), align_of::<capi::$t>(), "align of {}", stringify!($t));
        $(
            assert_eq!(
                offset_of!(c_full::$t, $f),
                offset_of!(capi::$t, $f),
                "offset of {}.{}", stringify!($t), stringify!($f)
            );
        )*
        fn _exhaustive(c: &c_full::$t, r: &capi::$t) {
            let c_full::$t { $($f: _),* } = c;
            let capi::$t { $($f: _),* } = r;
        }
    }};
}

#[test]
fn structs_match_the_header() {
    check_struct!(ep_pool_config {
        policy,
        io_mode,
        queue_depth,
        max_prefetch_inflight,
        stats_path,
        stats_interval_ms,
        log_fn,
        log_user,
        trace_path,
    });
    check_struct!(ep_proj_desc {
        file,
        offset,
        expert_stride,
        expert_bytes,
        dst_base,
        dst_slot_stride,
    });
    check_struct!(ep_layer_desc {
        layer,
        n_experts,
        n_slots,
        n_proj,
        proj,
        copy_fn,
        copy_user,
    });
    check_struct!(ep_stats {
        requests,
        hits,
        inflight_hits,
        misses,
        evictions,
        bytes_read,
        stall_ns,
        prefetch_issued,
        prefetch_issued_bytes,
        prefetch_useful,
        prefetch_useful_bytes,
        prefetch_wasted,
        prefetch_wasted_bytes,
        prefetch_dropped,
        does_not_fit,
        errors,
        staged,
        staged_from_slots,
        staged_reads,
        copy_ns,
        stage_ahead,
        stage_ahead_used,
        ahead_fills,
    });
    // The callback typedefs are the very types the Rust side uses.
    same::<Option<_>>(
        None::<<c_full::ep_copy_fn as Unwrap>::F>,
        None::<<capi::ep_copy_fn as Unwrap>::F>,
    );
    same::<Option<_>>(
        None::<<c_full::ep_stage_fn as Unwrap>::F>,
        None::<<capi::ep_stage_fn as Unwrap>::F>,
    );
    same::<Option<_>>(
        None::<<c_full::ep_log_fn as Unwrap>::F>,
        None::<<capi::ep_log_fn as Unwrap>::F>,
    );
    same::<c_full::ep_status>(0, capi::EP_OK);
}

trait Unwrap {
    type F;
}
impl<T> Unwrap for Option<T> {
    type F = T;
}

#[test]
fn constants_match_the_header() {
    let pairs = [
        (c_full::EP_OK as i64, capi::EP_OK),
        (c_full::EP_DOES_NOT_FIT as i64, capi::EP_DOES_NOT_FIT),
        (c_full::EP_DROPPED as i64, capi::EP_DROPPED),
        (
            c_full::EP_ERR_INVALID_ARGUMENT as i64,
            capi::EP_ERR_INVALID_ARGUMENT,
        ),
        (c_full::EP_ERR_IO as i64, capi::EP_ERR_IO),
        (
            c_full::EP_ERR_FILE_CHANGED as i64,
            capi::EP_ERR_FILE_CHANGED,
        ),
        (c_full::EP_ERR_NO_MEMORY as i64, capi::EP_ERR_NO_MEMORY),
        (c_full::EP_ERR_STATE as i64, capi::EP_ERR_STATE),
        (c_full::EP_ERR_REENTRANT as i64, capi::EP_ERR_REENTRANT),
        (c_full::EP_ERR_INTERNAL as i64, capi::EP_ERR_INTERNAL),
    ];
    for (c, r) in pairs {
        assert_eq!(c, i64::from(r));
    }
    let policies = [
        (c_full::EP_POLICY_DEFAULT, PolicyKind::DEFAULT),
        (c_full::EP_POLICY_LRU, PolicyKind::Lru),
        (c_full::EP_POLICY_LEAST_STALE, PolicyKind::LeastStale),
        (c_full::EP_POLICY_LFU_DECAY, PolicyKind::LfuDecay),
        (c_full::EP_POLICY_LFRU, PolicyKind::Lfru),
        (c_full::EP_POLICY_ERD, PolicyKind::Erd),
    ];
    for (c, k) in policies {
        assert_eq!(PolicyKind::from_code(c as u32), Some(k));
    }
    assert_eq!(
        policies.len(),
        PolicyKind::ALL.len() + 1,
        "every policy has a constant"
    );
    let ios = [
        (c_full::EP_IO_AUTO, IoMode::Auto),
        (c_full::EP_IO_URING, IoMode::Uring),
        (c_full::EP_IO_URING_BUFFERED, IoMode::UringBuffered),
        (c_full::EP_IO_PREAD, IoMode::Pread),
        (c_full::EP_IO_PREAD_DIRECT, IoMode::PreadDirect),
    ];
    for (c, m) in ios {
        assert_eq!(IoMode::from_code(c as u32), Some(m));
    }
    assert_eq!(IoMode::from_code(ios.len() as u32), None);
    assert_eq!(
        c_full::EP_LOG_WARN as i32,
        expert_pool::pool::LogLevel::Warn as i32
    );
    assert_eq!(
        c_full::EP_LOG_ERROR as i32,
        expert_pool::pool::LogLevel::Error as i32
    );
    assert_eq!(
        c_full::EP_LOG_INFO as i32,
        expert_pool::pool::LogLevel::Info as i32
    );
}
