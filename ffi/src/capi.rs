//! The C ABI. Every function here is declared in `ffi/include/expert_pool.h`, which
//! states ownership and thread safety. This layer only converts: it checks pointers,
//! builds slices, calls [`crate::pool::Pool`], and maps errors to status codes.
//!
//! No panic crosses this boundary: every entry point runs its body in `catch_unwind`.
//! Types are named as in C (`ep_pool_config`, ...) so that the bindgen check in
//! `ffi/abi-check` can compare them with the header.

#![allow(non_camel_case_types)]

use std::cell::RefCell;
use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::os::unix::ffi::OsStrExt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::ptr::NonNull;

use crate::dest::{FnSink, RawSlots, SlotSink};
use crate::error::{PoolError, Result, Status};
use crate::io::IoMode;
use crate::pool::{LayerSpec, LogLevel, Pool, PoolConfig, ProjSpec};

pub use crate::metrics::Counters as ep_stats;

/// NUL-terminated copy of [`crate::VERSION`] with static lifetime.
static VERSION_C: &str = concat!(env!("CARGO_PKG_VERSION"), "\0");

/// `ep_status` in C.
pub type ep_status = i32;

/// Status constants, equal to [`Status`] values (checked against the header).
pub const EP_OK: ep_status = Status::Ok as i32;
/// See the header.
pub const EP_DOES_NOT_FIT: ep_status = Status::DoesNotFit as i32;
/// See the header.
pub const EP_DROPPED: ep_status = Status::Dropped as i32;
/// See the header.
pub const EP_ERR_INVALID_ARGUMENT: ep_status = Status::InvalidArgument as i32;
/// See the header.
pub const EP_ERR_IO: ep_status = Status::Io as i32;
/// See the header.
pub const EP_ERR_FILE_CHANGED: ep_status = Status::FileChanged as i32;
/// See the header.
pub const EP_ERR_NO_MEMORY: ep_status = Status::NoMemory as i32;
/// See the header.
pub const EP_ERR_STATE: ep_status = Status::State as i32;
/// See the header.
pub const EP_ERR_REENTRANT: ep_status = Status::Reentrant as i32;
/// See the header.
pub const EP_ERR_INTERNAL: ep_status = Status::Internal as i32;

/// `ep_log_fn` in C.
pub type ep_log_fn =
    Option<unsafe extern "C" fn(user: *mut c_void, level: i32, msg: *const c_char)>;

/// `ep_copy_fn` in C.
pub type ep_copy_fn = Option<
    unsafe extern "C" fn(
        user: *mut c_void,
        layer: i32,
        proj: i32,
        slot: i32,
        src: *const c_void,
        len: usize,
    ),
>;

/// `ep_stage_fn` in C.
pub type ep_stage_fn = Option<
    unsafe extern "C" fn(
        user: *mut c_void,
        layer: i32,
        expert: i32,
        slot: i32,
        proj: i32,
        src: *const c_void,
        len: usize,
    ),
>;

/// `ep_pool_config` in C.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ep_pool_config {
    /// `EP_POLICY_*`.
    pub policy: u32,
    /// `EP_IO_*`.
    pub io_mode: u32,
    /// io_uring entries; 0 = 256.
    pub queue_depth: u32,
    /// Prefetch fills in flight at most; 0 = 64.
    pub max_prefetch_inflight: u32,
    /// Stats file; NULL = none.
    pub stats_path: *const c_char,
    /// Minimum interval between stats writes; 0 = 1000.
    pub stats_interval_ms: u32,
    /// Log sink or NULL.
    pub log_fn: ep_log_fn,
    /// Passed to `log_fn`.
    pub log_user: *mut c_void,
    /// Routing trace file; NULL = none.
    pub trace_path: *const c_char,
}

/// `ep_proj_desc` in C.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ep_proj_desc {
    /// File id.
    pub file: i32,
    /// Absolute offset of expert 0.
    pub offset: u64,
    /// Distance between experts in the file.
    pub expert_stride: u64,
    /// Bytes per expert.
    pub expert_bytes: u64,
    /// Engine slot memory or NULL.
    pub dst_base: *mut c_void,
    /// Bytes between slots at `dst_base`.
    pub dst_slot_stride: u64,
}

/// `ep_layer_desc` in C.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ep_layer_desc {
    /// Engine layer index.
    pub layer: i32,
    /// Experts of the layer.
    pub n_experts: u32,
    /// Slots of the layer.
    pub n_slots: u32,
    /// Number of projections.
    pub n_proj: u32,
    /// Projection descriptors.
    pub proj: *const ep_proj_desc,
    /// Fill callback or NULL.
    pub copy_fn: ep_copy_fn,
    /// Passed to `copy_fn`.
    pub copy_user: *mut c_void,
}

/// The opaque pool handle (`ep_pool` in C).
pub struct ep_pool(Pool);

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(msg: &str) {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// Runs `f`, catching panics; errors set the thread's last error.
fn guard(f: impl FnOnce() -> Result<Status>) -> ep_status {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(s)) => s as i32,
        Ok(Err(e)) => {
            set_last_error(&e.to_string());
            e.status() as i32
        }
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            set_last_error(&format!("internal error (panic): {msg}"));
            Status::Internal as i32
        }
    }
}

fn null(what: &str) -> PoolError {
    PoolError::invalid(format!("{what} is NULL"))
}

/// # Safety
/// `p` must be NULL or a pointer from `ep_pool_new` not yet deleted.
unsafe fn pool_ref<'a>(p: *mut ep_pool) -> Result<&'a Pool> {
    // SAFETY: by the caller's contract p is NULL or points to a live ep_pool.
    unsafe { p.as_ref() }
        .map(|p| &p.0)
        .ok_or_else(|| null("pool"))
}

/// Writes `value` to an optional out parameter (NULL: the caller does not want it).
///
/// # Safety
/// `p` NULL or valid for a write of `T`.
unsafe fn write_opt<T>(p: *mut T, value: T) {
    if !p.is_null() {
        // SAFETY: non-null and writable by the caller's contract.
        unsafe { p.write(value) };
    }
}

/// # Safety
/// `p` must be NULL (only when `len` is 0) or valid for reads of `len` elements.
unsafe fn slice_in<'a, T>(p: *const T, len: usize, what: &str) -> Result<&'a [T]> {
    if len == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(null(what));
    }
    if !p.is_aligned() {
        return Err(PoolError::invalid(format!("{what} is misaligned")));
    }
    // SAFETY: non-null, aligned, and valid for len elements by the caller's contract.
    Ok(unsafe { std::slice::from_raw_parts(p, len) })
}

/// Returns the pool's version as a static NUL-terminated string. Never NULL; the caller
/// must not free it. Thread-safe.
#[unsafe(no_mangle)]
pub extern "C" fn expert_pool_version() -> *const c_char {
    VERSION_C.as_ptr().cast()
}

/// See `ep_last_error` in the header.
#[unsafe(no_mangle)]
pub extern "C" fn ep_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// See `ep_status_name` in the header.
#[unsafe(no_mangle)]
pub extern "C" fn ep_status_name(status: ep_status) -> *const c_char {
    let s: &'static CStr = match status {
        EP_OK => c"EP_OK",
        EP_DOES_NOT_FIT => c"EP_DOES_NOT_FIT",
        EP_DROPPED => c"EP_DROPPED",
        EP_ERR_INVALID_ARGUMENT => c"EP_ERR_INVALID_ARGUMENT",
        EP_ERR_IO => c"EP_ERR_IO",
        EP_ERR_FILE_CHANGED => c"EP_ERR_FILE_CHANGED",
        EP_ERR_NO_MEMORY => c"EP_ERR_NO_MEMORY",
        EP_ERR_STATE => c"EP_ERR_STATE",
        EP_ERR_REENTRANT => c"EP_ERR_REENTRANT",
        EP_ERR_INTERNAL => c"EP_ERR_INTERNAL",
        _ => c"EP_UNKNOWN",
    };
    s.as_ptr()
}

/// See `ep_pool_config_init` in the header.
///
/// # Safety
/// `cfg` must be NULL or valid for writing an `ep_pool_config`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ep_pool_config_init(cfg: *mut ep_pool_config) {
    if cfg.is_null() {
        return;
    }
    let d = ep_pool_config {
        policy: 0,
        io_mode: 0,
        queue_depth: 0,
        max_prefetch_inflight: 0,
        stats_path: std::ptr::null(),
        stats_interval_ms: 0,
        log_fn: None,
        log_user: std::ptr::null_mut(),
        trace_path: std::ptr::null(),
    };
    // SAFETY: cfg is non-null and valid for writes by the caller's contract.
    unsafe { cfg.write(d) };
}

/// Wraps the C log callback; the user pointer travels as an address.
fn log_closure(
    f: unsafe extern "C" fn(*mut c_void, i32, *const c_char),
    user: usize,
) -> crate::pool::LogFn {
    Box::new(move |level: LogLevel, msg: &str| {
        let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
        // SAFETY: the header requires log_fn to be callable from any thread calling the
        // pool with the user pointer it was given; msg is valid during the call.
        unsafe { f(user as *mut c_void, level as i32, c.as_ptr()) }
    })
}

/// See `ep_pool_new` in the header.
///
/// # Safety
/// `cfg` must be NULL or point to a valid `ep_pool_config` (with `stats_path` NULL or a
/// NUL-terminated string); `out` must be valid for writing a pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ep_pool_new(
    cfg: *const ep_pool_config,
    out: *mut *mut ep_pool,
) -> ep_status {
    guard(|| {
        if out.is_null() {
            return Err(null("out"));
        }
        // SAFETY: out is non-null and writable by the caller's contract.
        unsafe { out.write(std::ptr::null_mut()) };
        let mut config = PoolConfig::default();
        // SAFETY: cfg is NULL or valid by the caller's contract.
        if let Some(c) = unsafe { cfg.as_ref() } {
            config.policy = crate::policy::PolicyKind::from_code(c.policy)
                .ok_or_else(|| PoolError::invalid(format!("unknown policy {}", c.policy)))?;
            config.io_mode = IoMode::from_code(c.io_mode)
                .ok_or_else(|| PoolError::invalid(format!("unknown io mode {}", c.io_mode)))?;
            config.queue_depth = c.queue_depth;
            config.max_prefetch_inflight = c.max_prefetch_inflight;
            config.stats_interval_ms = c.stats_interval_ms;
            if !c.stats_path.is_null() {
                // SAFETY: a non-null stats_path is NUL-terminated by the contract.
                let p = unsafe { CStr::from_ptr(c.stats_path) };
                if p.is_empty() {
                    return Err(PoolError::invalid("stats_path is empty"));
                }
                config.stats_path = Some(PathBuf::from(std::ffi::OsStr::from_bytes(p.to_bytes())));
            }
            if let Some(f) = c.log_fn {
                config.log = Some(log_closure(f, c.log_user as usize));
            }
            if !c.trace_path.is_null() {
                // SAFETY: a non-null trace_path is NUL-terminated by the contract.
                let p = unsafe { CStr::from_ptr(c.trace_path) };
                if p.is_empty() {
                    return Err(PoolError::invalid("trace_path is empty"));
                }
                config.trace_path = Some(PathBuf::from(std::ffi::OsStr::from_bytes(p.to_bytes())));
            }
        }
        let pool = Pool::new(config)?;
        let p = Box::into_raw(Box::new(ep_pool(pool)));
        // SAFETY: as above.
        unsafe { out.write(p) };
        Ok(Status::Ok)
    })
}

/// See `ep_pool_delete` in the header.
///
/// # Safety
/// `pool` must be NULL or a pointer from `ep_pool_new` not yet deleted, with no other
/// call on it in progress.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ep_pool_delete(pool: *mut ep_pool) {
    if pool.is_null() {
        return;
    }
    if crate::pool::in_pool_callback() {
        // The pool is locked by the call that runs this callback: deleting it here
        // would deadlock, and free it under that call. Refused; the pool stays valid.
        set_last_error(
            "ep_pool_delete called from a pool callback: refused, the pool is not deleted",
        );
        return;
    }
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: pool came from Box::into_raw in ep_pool_new and is deleted once.
        drop(unsafe { Box::from_raw(pool) });
    }));
}

/// See `ep_pool_add_file` in the header.
///
/// # Safety
/// `pool` as for `ep_pool_delete` (but concurrent calls are fine); `path` NULL or
/// NUL-terminated; `out_file` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ep_pool_add_file(
    pool: *mut ep_pool,
    path: *const c_char,
    out_file: *mut i32,
) -> ep_status {
    guard(|| {
        // SAFETY: per the function's contract.
        let pool = unsafe { pool_ref(pool) }?;
        if path.is_null() {
            return Err(null("path"));
        }
        if out_file.is_null() {
            return Err(null("out_file"));
        }
        // SAFETY: path is non-null and NUL-terminated by the contract.
        let p = unsafe { CStr::from_ptr(path) };
        let id = pool.add_file(std::path::Path::new(std::ffi::OsStr::from_bytes(
            p.to_bytes(),
        )))?;
        // SAFETY: out_file is non-null and writable by the contract.
        unsafe { out_file.write(id as i32) };
        Ok(Status::Ok)
    })
}

/// See `ep_pool_add_fd` in the header.
///
/// # Safety
/// As for `ep_pool_add_file`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ep_pool_add_fd(
    pool: *mut ep_pool,
    fd: c_int,
    out_file: *mut i32,
) -> ep_status {
    guard(|| {
        // SAFETY: per the function's contract.
        let pool = unsafe { pool_ref(pool) }?;
        if out_file.is_null() {
            return Err(null("out_file"));
        }
        let id = pool.add_fd(fd)?;
        // SAFETY: out_file is non-null and writable by the contract.
        unsafe { out_file.write(id as i32) };
        Ok(Status::Ok)
    })
}

/// Sends a C copy callback's user pointer across threads.
struct CopyCb {
    f: unsafe extern "C" fn(*mut c_void, i32, i32, i32, *const c_void, usize),
    user: usize,
}

/// See `ep_pool_add_layer` in the header.
///
/// # Safety
/// `pool` as for `ep_pool_add_file`; `desc` NULL or valid, with `proj` valid for
/// `n_proj` descriptors; engine slot memory as described in the header.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ep_pool_add_layer(
    pool: *mut ep_pool,
    desc: *const ep_layer_desc,
) -> ep_status {
    guard(|| {
        // SAFETY: per the function's contract.
        let pool = unsafe { pool_ref(pool) }?;
        // SAFETY: desc is NULL or valid by the contract.
        let d = unsafe { desc.as_ref() }.ok_or_else(|| null("desc"))?;
        // SAFETY: proj is valid for n_proj descriptors by the contract.
        let projs = unsafe { slice_in(d.proj, d.n_proj as usize, "desc->proj") }?;
        if projs.is_empty() {
            return Err(PoolError::invalid("a layer needs at least one projection"));
        }
        let spec = LayerSpec {
            layer: d.layer,
            n_experts: d.n_experts,
            n_slots: d.n_slots,
            projs: projs
                .iter()
                .map(|p| {
                    if p.file < 0 {
                        return Err(PoolError::invalid(format!("negative file id {}", p.file)));
                    }
                    Ok(ProjSpec {
                        file: p.file as u32,
                        offset: p.offset,
                        stride: p.expert_stride,
                        bytes: p.expert_bytes,
                    })
                })
                .collect::<Result<_>>()?,
        };
        let n_dst = projs.iter().filter(|p| !p.dst_base.is_null()).count();
        let sink: Option<Box<dyn SlotSink>> = match (d.copy_fn, n_dst) {
            (Some(f), 0) => {
                let cb = CopyCb {
                    f,
                    user: d.copy_user as usize,
                };
                Some(Box::new(FnSink(
                    move |layer: i32, proj: usize, slot: u32, data: &[u8]| {
                        // SAFETY: the header requires copy_fn to accept these arguments from
                        // any thread calling the pool; data is valid during the call.
                        unsafe {
                            (cb.f)(
                                cb.user as *mut c_void,
                                layer,
                                proj as i32,
                                slot as i32,
                                data.as_ptr().cast(),
                                data.len(),
                            )
                        }
                    },
                )))
            }
            (Some(_), _) => {
                return Err(PoolError::invalid(
                    "copy_fn is set: every dst_base must be NULL",
                ));
            }
            (None, 0) => None,
            (None, n) if n == projs.len() => {
                let mut v = Vec::with_capacity(projs.len());
                for (i, p) in projs.iter().enumerate() {
                    if p.dst_slot_stride < p.expert_bytes {
                        return Err(PoolError::invalid(format!(
                            "proj {i}: dst_slot_stride {} < expert_bytes {}",
                            p.dst_slot_stride, p.expert_bytes
                        )));
                    }
                    let base = NonNull::new(p.dst_base.cast::<u8>()).expect("counted non-null");
                    v.push((base, p.dst_slot_stride as usize, p.expert_bytes as usize));
                }
                // SAFETY: the header makes the engine guarantee that each dst_base is valid
                // for n_slots slots of dst_slot_stride bytes until ep_pool_delete, and that
                // it reads only slots a request returned.
                Some(Box::new(unsafe { RawSlots::new(v) }))
            }
            (None, _) => {
                return Err(PoolError::invalid(
                    "dst_base must be set for every projection or for none",
                ));
            }
        };
        pool.add_layer(&spec, sink)?;
        Ok(Status::Ok)
    })
}

/// See `ep_pool_slot_memory` in the header.
///
/// # Safety
/// `pool` as for `ep_pool_add_file`; `out_base` and `out_slot_stride` writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ep_pool_slot_memory(
    pool: *mut ep_pool,
    layer: i32,
    proj: i32,
    out_base: *mut *mut c_void,
    out_slot_stride: *mut u64,
) -> ep_status {
    guard(|| {
        // SAFETY: per the function's contract.
        let pool = unsafe { pool_ref(pool) }?;
        if out_base.is_null() || out_slot_stride.is_null() {
            return Err(null("out_base or out_slot_stride"));
        }
        if proj < 0 {
            return Err(PoolError::invalid("negative projection index"));
        }
        let (base, stride) = pool.slot_base(layer, proj as usize)?;
        // SAFETY: both out pointers are non-null and writable by the contract.
        unsafe {
            out_base.write(base.cast());
            out_slot_stride.write(stride as u64);
        }
        Ok(Status::Ok)
    })
}

/// Checks a strided ids matrix (`n_tokens` rows of `n_used` I32, rows
/// `ids_row_stride` bytes apart): returns the entry count, the elements it spans and the
/// row stride in elements.
fn ids_shape(
    n_used: usize,
    n_tokens: usize,
    ids_row_stride: usize,
) -> Result<(usize, usize, usize)> {
    let n = n_used
        .checked_mul(n_tokens)
        .ok_or_else(|| PoolError::invalid("n_used * n_tokens overflows"))?;
    if n == 0 {
        return Ok((0, 0, n_used));
    }
    if ids_row_stride % 4 != 0 || ids_row_stride / 4 < n_used {
        return Err(PoolError::invalid(format!(
            "ids_row_stride {ids_row_stride} must be a multiple of 4 and >= 4 * n_used"
        )));
    }
    let stride = ids_row_stride / 4;
    let len = (n_tokens - 1)
        .checked_mul(stride)
        .and_then(|x| x.checked_add(n_used))
        .ok_or_else(|| PoolError::invalid("ids shape overflows"))?;
    Ok((n, len, stride))
}

/// See `ep_pool_stage` in the header.
///
/// # Safety
/// `pool` as for `ep_pool_add_file`; `ids` valid for `n_tokens` rows of `n_used` ids at
/// `ids_row_stride` bytes; `stage_fn` callable as the header describes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ep_pool_stage(
    pool: *mut ep_pool,
    layer: i32,
    ids: *const i32,
    n_used: u32,
    n_tokens: u32,
    ids_row_stride: usize,
    stage_fn: ep_stage_fn,
    user: *mut c_void,
) -> ep_status {
    guard(|| {
        // SAFETY: per the function's contract.
        let pool = unsafe { pool_ref(pool) }?;
        let f = stage_fn.ok_or_else(|| null("stage_fn"))?;
        let (n_used, n_tokens) = (n_used as usize, n_tokens as usize);
        let (_, ids_len, stride) = ids_shape(n_used, n_tokens, ids_row_stride)?;
        // SAFETY: ids is valid for the strided shape, which spans ids_len elements.
        let ids = unsafe { slice_in(ids, ids_len, "ids") }?;
        let mut sink = |item: crate::pool::Staged<'_>| {
            let (expert, slot, proj, src, len) = match item {
                crate::pool::Staged::FromSlot { expert, slot } => {
                    (expert as i32, slot as i32, -1, std::ptr::null(), 0)
                }
                crate::pool::Staged::FromFile { expert, proj, data } => (
                    expert as i32,
                    -1,
                    proj as i32,
                    data.as_ptr().cast(),
                    data.len(),
                ),
            };
            // SAFETY: the header requires stage_fn to accept these arguments on the
            // calling thread; src is valid for len bytes during the call.
            unsafe { f(user, layer, expert, slot, proj, src, len) }
        };
        pool.stage(layer, ids, n_used, n_tokens, stride, &mut sink)?;
        Ok(Status::Ok)
    })
}

/// See `ep_pool_request` in the header.
///
/// # Safety
/// `pool` as for `ep_pool_add_file`; `ids` valid for `n_tokens` rows of `n_used` ids at
/// `ids_row_stride` bytes; `out_slots` valid for `n_tokens * n_used` writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ep_pool_request(
    pool: *mut ep_pool,
    layer: i32,
    ids: *const i32,
    n_used: u32,
    n_tokens: u32,
    ids_row_stride: usize,
    out_slots: *mut i32,
) -> ep_status {
    // SAFETY: the caller's contract is request_common's.
    unsafe {
        request_common(
            pool,
            layer,
            ids,
            n_used,
            n_tokens,
            ids_row_stride,
            out_slots,
            None,
        )
    }
}

/// See `ep_pool_request_start` in the header.
///
/// # Safety
/// As for `ep_pool_request`; `out_in_flight` NULL or writable.
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn ep_pool_request_start(
    pool: *mut ep_pool,
    layer: i32,
    ids: *const i32,
    n_used: u32,
    n_tokens: u32,
    ids_row_stride: usize,
    out_slots: *mut i32,
    out_in_flight: *mut u32,
) -> ep_status {
    // SAFETY: the caller's contract is request_common's.
    unsafe {
        request_common(
            pool,
            layer,
            ids,
            n_used,
            n_tokens,
            ids_row_stride,
            out_slots,
            Some(out_in_flight),
        )
    }
}

/// `ep_pool_request` (`started` None) and `ep_pool_request_start` (`started`: where the
/// number of experts in flight goes, may be NULL).
///
/// # Safety
/// As for `ep_pool_request`; a `started` pointer NULL or writable.
#[allow(clippy::too_many_arguments)]
unsafe fn request_common(
    pool: *mut ep_pool,
    layer: i32,
    ids: *const i32,
    n_used: u32,
    n_tokens: u32,
    ids_row_stride: usize,
    out_slots: *mut i32,
    started: Option<*mut u32>,
) -> ep_status {
    guard(|| {
        // SAFETY: per the function's contract.
        let pool = unsafe { pool_ref(pool) }?;
        let (n_used, n_tokens) = (n_used as usize, n_tokens as usize);
        let (n, ids_len, stride) = ids_shape(n_used, n_tokens, ids_row_stride)?;
        // SAFETY: ids is valid for the strided shape, which spans ids_len elements.
        let ids = unsafe { slice_in(ids, ids_len, "ids") }?;
        if n > 0 && out_slots.is_null() {
            return Err(null("out_slots"));
        }
        if n > 0 && !out_slots.is_aligned() {
            return Err(PoolError::invalid("out_slots is misaligned"));
        }
        let out: &mut [i32] = if n == 0 {
            &mut []
        } else {
            // SAFETY: non-null, aligned, valid for n writes by the contract, and not
            // aliased by ids (the header: ids and out_slots must not overlap).
            unsafe { std::slice::from_raw_parts_mut(out_slots, n) }
        };
        match started {
            None => pool.request(layer, ids, n_used, n_tokens, stride, out)?,
            Some(out_in_flight) => {
                let n = pool.request_start(layer, ids, n_used, n_tokens, stride, out)?;
                // SAFETY: NULL or writable by the contract.
                unsafe { write_opt(out_in_flight, n) };
            }
        }
        Ok(Status::Ok)
    })
}

/// See `ep_pool_request_wait` in the header.
///
/// # Safety
/// `pool` as for `ep_pool_add_file`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ep_pool_request_wait(
    pool: *mut ep_pool,
    layer: i32,
    proj: i32,
) -> ep_status {
    guard(|| {
        // SAFETY: per the function's contract.
        let pool = unsafe { pool_ref(pool) }?;
        let proj = usize::try_from(proj).ok(); // negative: every projection
        pool.request_wait(layer, proj)?;
        Ok(Status::Ok)
    })
}

/// See `ep_pool_stage_ahead` in the header.
///
/// # Safety
/// `pool` as for `ep_pool_add_file`; `experts` valid for `n` reads (or NULL with n = 0);
/// `out_n` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ep_pool_stage_ahead(
    pool: *mut ep_pool,
    layer: i32,
    experts: *const i32,
    n: usize,
    out_n: *mut u32,
) -> ep_status {
    guard(|| {
        // SAFETY: per the function's contract.
        let pool = unsafe { pool_ref(pool) }?;
        // SAFETY: experts is valid for n reads by the contract.
        let experts = unsafe { slice_in(experts, n, "experts") }?;
        let started = pool.stage_ahead(layer, experts)?;
        // SAFETY: NULL or writable by the contract.
        unsafe { write_opt(out_n, started) };
        Ok(Status::Ok)
    })
}

/// See `ep_pool_prefetch` in the header.
///
/// # Safety
/// `pool` as for `ep_pool_add_file`; `experts` valid for `n` reads (or NULL with n = 0);
/// `out_started` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ep_pool_prefetch(
    pool: *mut ep_pool,
    layer: i32,
    experts: *const i32,
    n: usize,
    out_started: *mut u32,
) -> ep_status {
    guard(|| {
        // SAFETY: per the function's contract.
        let pool = unsafe { pool_ref(pool) }?;
        // SAFETY: experts is valid for n reads by the contract.
        let experts = unsafe { slice_in(experts, n, "experts") }?;
        let o = pool.prefetch(layer, experts)?;
        // SAFETY: NULL or writable by the contract.
        unsafe { write_opt(out_started, o.started) };
        Ok(if o.dropped > 0 {
            Status::Dropped
        } else {
            Status::Ok
        })
    })
}

/// See `ep_pool_poll` in the header.
///
/// # Safety
/// `pool` as for `ep_pool_add_file`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ep_pool_poll(pool: *mut ep_pool) -> ep_status {
    guard(|| {
        // SAFETY: per the function's contract.
        unsafe { pool_ref(pool) }?.poll()?;
        Ok(Status::Ok)
    })
}

/// See `ep_pool_stats` in the header.
///
/// # Safety
/// `pool` as for `ep_pool_add_file`; `out` writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ep_pool_stats(
    pool: *mut ep_pool,
    layer: i32,
    out: *mut ep_stats,
) -> ep_status {
    guard(|| {
        // SAFETY: per the function's contract.
        let pool = unsafe { pool_ref(pool) }?;
        if out.is_null() {
            return Err(null("out"));
        }
        let c = pool.counters((layer >= 0).then_some(layer))?;
        // SAFETY: out is non-null and writable by the contract.
        unsafe { out.write(c) };
        Ok(Status::Ok)
    })
}

/// See `ep_pool_stats_json` in the header.
///
/// # Safety
/// `pool` as for `ep_pool_add_file`; `buf` valid for `cap` writes (or NULL with cap 0);
/// `out_len` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ep_pool_stats_json(
    pool: *mut ep_pool,
    buf: *mut c_char,
    cap: usize,
    out_len: *mut usize,
) -> ep_status {
    guard(|| {
        // SAFETY: per the function's contract.
        let pool = unsafe { pool_ref(pool) }?;
        if cap > 0 && buf.is_null() {
            return Err(null("buf"));
        }
        let json = serde_json::to_string(&pool.snapshot()?)
            .map_err(|e| PoolError::Internal(format!("serialising stats: {e}")))?;
        if cap > 0 {
            let n = json.len().min(cap - 1);
            // SAFETY: buf is valid for cap >= n + 1 writes by the contract and does not
            // overlap the freshly allocated json.
            unsafe {
                std::ptr::copy_nonoverlapping(json.as_ptr(), buf.cast::<u8>(), n);
                buf.add(n).write(0);
            }
        }
        // SAFETY: NULL or writable by the contract.
        unsafe { write_opt(out_len, json.len()) };
        Ok(Status::Ok)
    })
}

/// See `ep_pool_publish_stats` in the header.
///
/// # Safety
/// `pool` as for `ep_pool_add_file`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ep_pool_publish_stats(pool: *mut ep_pool) -> ep_status {
    guard(|| {
        // SAFETY: per the function's contract.
        unsafe { pool_ref(pool) }?.publish_stats()?;
        Ok(Status::Ok)
    })
}
