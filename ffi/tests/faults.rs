//! Faults seen through the C ABI: the model file truncated, modified or replaced under
//! the pool, bad registrations, bad arguments. Every case must give a clear status and
//! message, never a crash, and never serve bytes that differ from the registered file.

mod common;

use std::ffi::{CStr, CString};
use std::os::unix::fs::FileExt;
use std::ptr;

use common::*;
use expert_pool::capi::*;

const N_EXPERTS: u32 = 12;
const N_SLOTS: u32 = 4;

struct Fixture {
    m: TestModel,
    pool: *mut ep_pool,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        // SAFETY: pool came from ep_pool_new and is deleted once.
        unsafe { ep_pool_delete(self.pool) };
    }
}

fn last_error() -> String {
    // SAFETY: ep_last_error never returns NULL and the string lives until the next call.
    unsafe { CStr::from_ptr(ep_last_error()) }
        .to_string_lossy()
        .into_owned()
}

fn setup(io_mode: u32, by_fd: bool) -> Fixture {
    let pb = [q4k_bytes(512, 16), q8_0_bytes(512, 16)];
    let m = write_model("faults-model.bin", 1, N_EXPERTS, &pb, 9);
    let mut cfg = std::mem::MaybeUninit::<ep_pool_config>::uninit();
    let mut pool = ptr::null_mut();
    let mut file = -1;
    // SAFETY: cfg is initialised by ep_pool_config_init before use; pointers are valid.
    unsafe {
        ep_pool_config_init(cfg.as_mut_ptr());
        let mut cfg = cfg.assume_init();
        cfg.io_mode = io_mode;
        assert_eq!(ep_pool_new(&cfg, &mut pool), EP_OK);
        if by_fd {
            let f = std::fs::File::open(m.path()).unwrap();
            use std::os::fd::AsRawFd;
            assert_eq!(ep_pool_add_fd(pool, f.as_raw_fd(), &mut file), EP_OK);
            // The pool keeps its own dup: closing ours is fine.
        } else {
            let p = CString::new(m.path().to_str().unwrap()).unwrap();
            assert_eq!(ep_pool_add_file(pool, p.as_ptr(), &mut file), EP_OK);
        }
    }
    let projs: Vec<ep_proj_desc> = m.tensors[0]
        .iter()
        .map(|t| ep_proj_desc {
            file,
            offset: t.offset,
            expert_stride: t.bytes,
            expert_bytes: t.bytes,
            dst_base: ptr::null_mut(),
            dst_slot_stride: 0,
        })
        .collect();
    let desc = ep_layer_desc {
        layer: 0,
        n_experts: N_EXPERTS,
        n_slots: N_SLOTS,
        n_proj: projs.len() as u32,
        proj: projs.as_ptr(),
        copy_fn: None,
        copy_user: ptr::null_mut(),
    };
    // SAFETY: desc and projs are valid for the call.
    let st = unsafe { ep_pool_add_layer(pool, &desc) };
    assert_eq!(st, EP_OK, "{}", last_error());
    Fixture { m, pool }
}

fn request(fx: &Fixture, ids: &[i32], out: &mut [i32]) -> ep_status {
    // SAFETY: ids and out are valid for the shape given.
    unsafe {
        ep_pool_request(
            fx.pool,
            0,
            ids.as_ptr(),
            ids.len() as u32,
            1,
            ids.len() * 4,
            out.as_mut_ptr(),
        )
    }
}

/// The slot bytes served for `ids` equal the registered file's bytes.
fn assert_served_bytes(fx: &Fixture, ids: &[i32], out: &[i32]) {
    for (j, &e) in ids.iter().enumerate() {
        for p in 0..2 {
            let mut base = ptr::null_mut();
            let mut stride = 0u64;
            // SAFETY: out pointers are valid.
            let st = unsafe { ep_pool_slot_memory(fx.pool, 0, p, &mut base, &mut stride) };
            assert_eq!(st, EP_OK);
            let want = fx.m.expert(0, p as usize, e as u32);
            // SAFETY: the slot returned by the request lies inside the pool's slot
            // memory and holds want.len() bytes.
            let got = unsafe {
                std::slice::from_raw_parts(
                    (base as *const u8).add(out[j] as usize * stride as usize),
                    want.len(),
                )
            };
            assert!(
                got == want,
                "expert {e} proj {p}: served bytes differ from the file"
            );
        }
    }
}

#[test]
fn truncated_file_is_reported_and_residents_stay_correct() {
    for by_fd in [false, true] {
        for io in [0u32, 3] {
            let fx = setup(io, by_fd);
            let mut out = [0i32; 2];
            assert_eq!(request(&fx, &[1, 2], &mut out), EP_OK);
            assert_served_bytes(&fx, &[1, 2], &out);
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(fx.m.path())
                .unwrap();
            f.set_len(fx.m.bytes.len() as u64 / 2).unwrap();
            let mut out2 = [-1i32; 2];
            assert_eq!(request(&fx, &[7, 11], &mut out2), EP_ERR_FILE_CHANGED);
            let msg = last_error();
            assert!(msg.contains("truncated"), "{msg}");
            assert_eq!(out2, [-1, -1]);
            // Residents read before the change still hold the registered bytes.
            assert_eq!(request(&fx, &[1, 2], &mut out), EP_OK);
            assert_served_bytes(&fx, &[1, 2], &out);
            let mut st = std::mem::MaybeUninit::<ep_stats>::uninit();
            // SAFETY: st is written by the call.
            let rc = unsafe { ep_pool_stats(fx.pool, -1, st.as_mut_ptr()) };
            assert_eq!(rc, EP_OK);
            // SAFETY: initialised by ep_pool_stats.
            let st = unsafe { st.assume_init() };
            assert_eq!(st.errors, 1);
        }
    }
}

#[test]
fn modified_file_is_reported() {
    let fx = setup(0, false);
    std::thread::sleep(std::time::Duration::from_millis(5));
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(fx.m.path())
        .unwrap();
    f.write_at(b"garbage", 5000).unwrap();
    drop(f);
    let mut out = [0i32; 1];
    assert_eq!(request(&fx, &[3], &mut out), EP_ERR_FILE_CHANGED);
    assert!(last_error().contains("modified"), "{}", last_error());
}

#[test]
fn replaced_file_is_reported() {
    let fx = setup(0, false);
    let tmp = format!("{}.new", fx.m.path().display());
    std::fs::write(&tmp, vec![0u8; fx.m.bytes.len()]).unwrap();
    std::fs::rename(&tmp, fx.m.path()).unwrap();
    let mut out = [0i32; 1];
    assert_eq!(request(&fx, &[3], &mut out), EP_ERR_FILE_CHANGED);
    assert!(last_error().contains("replaced"), "{}", last_error());
}

#[test]
fn prefetch_in_flight_when_the_file_shrinks_is_not_served() {
    let fx = setup(0, false);
    let ids = [4i32, 5, 6];
    let mut started = 0u32;
    // SAFETY: ids valid for 3 reads; started writable.
    let st = unsafe { ep_pool_prefetch(fx.pool, 0, ids.as_ptr(), 3, &mut started) };
    assert!(st == EP_OK || st == EP_DROPPED);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(fx.m.path())
        .unwrap();
    f.set_len(100).unwrap();
    let mut out = [0i32; 3];
    let st = request(&fx, &ids, &mut out);
    if started > 0 {
        assert!(
            st == EP_ERR_FILE_CHANGED || st == EP_ERR_IO,
            "{st}: {}",
            last_error()
        );
    }
    // Nothing of the shrunken file is resident afterwards.
    assert_ne!(request(&fx, &ids, &mut out), EP_OK);
}

#[test]
fn bad_registrations_and_arguments() {
    let fx = setup(0, false);
    let mut file = 0;
    let missing = CString::new("/nonexistent/model.gguf").unwrap();
    // SAFETY: all pointers are valid or deliberately NULL.
    unsafe {
        assert_eq!(
            ep_pool_add_file(fx.pool, missing.as_ptr(), &mut file),
            EP_ERR_IO
        );
        assert!(last_error().contains("/nonexistent/model.gguf"));
        assert_eq!(
            ep_pool_add_file(ptr::null_mut(), missing.as_ptr(), &mut file),
            EP_ERR_INVALID_ARGUMENT
        );
        assert_eq!(
            ep_pool_add_file(fx.pool, ptr::null(), &mut file),
            EP_ERR_INVALID_ARGUMENT
        );
        assert_eq!(ep_pool_add_fd(fx.pool, -1, &mut file), EP_ERR_IO);
        // Experts past the end of the file.
        let proj = ep_proj_desc {
            file: 0,
            offset: fx.m.bytes.len() as u64 - 10,
            expert_stride: 100,
            expert_bytes: 100,
            dst_base: ptr::null_mut(),
            dst_slot_stride: 0,
        };
        let mut desc = ep_layer_desc {
            layer: 1,
            n_experts: 4,
            n_slots: 2,
            n_proj: 1,
            proj: &proj,
            copy_fn: None,
            copy_user: ptr::null_mut(),
        };
        assert_eq!(ep_pool_add_layer(fx.pool, &desc), EP_ERR_INVALID_ARGUMENT);
        assert!(last_error().contains("past the end"), "{}", last_error());
        desc.layer = 0;
        assert_eq!(
            ep_pool_add_layer(fx.pool, &desc),
            EP_ERR_STATE,
            "duplicate layer"
        );
        desc.n_proj = 0;
        assert_eq!(ep_pool_add_layer(fx.pool, &desc), EP_ERR_INVALID_ARGUMENT);
        // Requests: unknown layer, bad id, duplicate id, bad stride, NULL with n > 0.
        let mut out = [0i32; 4];
        let ids = [1i32, 99];
        assert_eq!(
            ep_pool_request(fx.pool, 5, ids.as_ptr(), 1, 1, 4, out.as_mut_ptr()),
            EP_ERR_STATE
        );
        assert_eq!(
            ep_pool_request(fx.pool, 0, ids.as_ptr(), 2, 1, 8, out.as_mut_ptr()),
            EP_ERR_INVALID_ARGUMENT
        );
        assert!(last_error().contains("out of range"));
        let dup = [3i32, 3];
        assert_eq!(
            ep_pool_request(fx.pool, 0, dup.as_ptr(), 2, 1, 8, out.as_mut_ptr()),
            EP_ERR_INVALID_ARGUMENT
        );
        assert_eq!(
            ep_pool_request(fx.pool, 0, ids.as_ptr(), 2, 1, 6, out.as_mut_ptr()),
            EP_ERR_INVALID_ARGUMENT
        );
        assert_eq!(
            ep_pool_request(fx.pool, 0, ptr::null(), 2, 1, 8, out.as_mut_ptr()),
            EP_ERR_INVALID_ARGUMENT
        );
        assert_eq!(
            ep_pool_request(fx.pool, 0, ids.as_ptr(), 1, 1, 4, ptr::null_mut()),
            EP_ERR_INVALID_ARGUMENT
        );
        // Empty requests and prefetches accept NULL.
        assert_eq!(
            ep_pool_request(fx.pool, 0, ptr::null(), 0, 0, 0, ptr::null_mut()),
            EP_OK
        );
        assert_eq!(
            ep_pool_prefetch(fx.pool, 0, ptr::null(), 0, ptr::null_mut()),
            EP_OK
        );
        // Too many distinct experts: 2 tokens x 3 = 6 > 4 slots.
        let six = [0i32, 1, 2, 3, 4, 5];
        assert_eq!(
            ep_pool_request(fx.pool, 0, six.as_ptr(), 3, 2, 12, out.as_mut_ptr()),
            EP_DOES_NOT_FIT
        );
        assert_eq!(
            ep_pool_stats_json(fx.pool, ptr::null_mut(), 0, ptr::null_mut()),
            EP_OK
        );
        assert_eq!(ep_pool_publish_stats(fx.pool), EP_ERR_STATE);
        assert_eq!(ep_pool_poll(ptr::null_mut()), EP_ERR_INVALID_ARGUMENT);
        assert_eq!(
            CStr::from_ptr(ep_status_name(EP_DOES_NOT_FIT))
                .to_str()
                .unwrap(),
            "EP_DOES_NOT_FIT"
        );
        ep_pool_delete(ptr::null_mut());
    }
}
