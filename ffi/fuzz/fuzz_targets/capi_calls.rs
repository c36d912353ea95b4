//! Fuzzes sequences of C ABI calls on one pool: registrations with arbitrary (often
//! invalid) descriptors, requests with arbitrary shapes and ids, prefetches, stage
//! calls and their read-ahead, polls, stats. Every buffer handed over matches the shape declared to the pool (the C
//! contract); everything else is fair game. Checks: no crash, statuses are known codes,
//! and every EP_OK request returns distinct in-range slots per token holding exactly
//! the file's bytes of each expert; stage calls hand over exactly the file's bytes.
//!
//! Run: `cd ffi/fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run capi_calls -- -max_total_time=60`

#![no_main]

use std::ffi::{CStr, CString};
use std::ptr;
use std::sync::OnceLock;

use expert_pool::capi::*;
use libfuzzer_sys::fuzz_target;

const FILE_LEN: usize = 64 * 1024;

/// The model file all inputs use: deterministic bytes, written once per process.
fn model() -> &'static (CString, Vec<u8>) {
    static M: OnceLock<(CString, Vec<u8>)> = OnceLock::new();
    M.get_or_init(|| {
        let bytes: Vec<u8> = (0..FILE_LEN)
            .map(|i| (i * 31 % 251) as u8 ^ (i >> 8) as u8)
            .collect();
        let path = std::env::temp_dir().join(format!("ep-fuzz-{}.bin", std::process::id()));
        std::fs::write(&path, &bytes).unwrap();
        (CString::new(path.to_str().unwrap()).unwrap(), bytes)
    })
}

/// Reads the fuzz input as a stream of small integers.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u8(&mut self) -> Option<u8> {
        let (b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(*b)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from(self.u8()?) | (u16::from(self.u8()?) << 8))
    }
}

struct Layer {
    id: i32,
    n_experts: u32,
    n_slots: u32,
    projs: Vec<ep_proj_desc>,
}

/// A layer id (one of the registered layers, or -1) and up to `max - 1` expert ids
/// (-1..=42, often out of range) from the input; None when the input ran out.
fn layer_and_experts(inp: &mut Input, layers: &[Layer], max: u8) -> Option<(i32, Vec<i32>)> {
    let (l, n) = (inp.u8()?, inp.u8()?);
    let layer = layers
        .get(usize::from(l) % (layers.len() + 1))
        .map(|x| x.id)
        .unwrap_or(-1);
    let ex = (0..n % max)
        .map(|_| i32::from(inp.u8().unwrap_or(0) % 44) - 1)
        .collect();
    Some((layer, ex))
}

/// The slice's pointer, or NULL for an empty one (what a C caller passes).
fn ptr_or_null(ex: &[i32]) -> *const i32 {
    if ex.is_empty() {
        ptr::null()
    } else {
        ex.as_ptr()
    }
}

/// What a stage call's sink checks against: the layer's projections and the file.
struct StageCheck<'a> {
    lay: &'a Layer,
    file: &'a [u8],
    bad: bool,
}

/// Stage sink: bytes from the file must be the file's bytes of that expert/projection.
unsafe extern "C" fn stage_check(
    user: *mut std::ffi::c_void,
    _layer: i32,
    expert: i32,
    slot: i32,
    proj: i32,
    src: *const std::ffi::c_void,
    len: usize,
) {
    // SAFETY: user is the StageCheck the fuzz target passed, alive for the call.
    let c = unsafe { &mut *user.cast::<StageCheck>() };
    if slot >= 0 {
        return; // ready in a slot: the request checks cover slot contents
    }
    let Some(pd) = c.lay.projs.get(proj as usize) else {
        c.bad = true;
        return;
    };
    let start = (pd.offset + expert as u64 * pd.expert_stride) as usize;
    let want = &c.file[start..start + pd.expert_bytes as usize];
    // SAFETY: src holds len bytes during the call (the sink contract).
    let got = unsafe { std::slice::from_raw_parts(src.cast::<u8>(), len) };
    if got != want {
        c.bad = true;
    }
}

fn known(st: ep_status) -> bool {
    (-7..=2).contains(&st)
}

fuzz_target!(|data: &[u8]| {
    let (path, bytes) = model();
    let mut inp = Input(data);
    let mut cfg = std::mem::MaybeUninit::<ep_pool_config>::uninit();
    let mut pool = ptr::null_mut();
    // SAFETY: cfg is initialised by ep_pool_config_init; pointers are valid.
    unsafe {
        ep_pool_config_init(cfg.as_mut_ptr());
        let mut cfg = cfg.assume_init();
        cfg.policy = u32::from(inp.u8().unwrap_or(0) % 7);
        cfg.io_mode = u32::from(inp.u8().unwrap_or(0) % 6);
        cfg.queue_depth = u32::from(inp.u8().unwrap_or(0) % 9);
        cfg.max_prefetch_inflight = u32::from(inp.u8().unwrap_or(0) % 5);
        let st = ep_pool_new(&cfg, &mut pool);
        assert!(known(st));
        if st != EP_OK {
            assert!(pool.is_null());
            return;
        }
    }
    let mut file = -1;
    // SAFETY: path is NUL-terminated; file is writable.
    assert_eq!(
        unsafe { ep_pool_add_file(pool, path.as_ptr(), &mut file) },
        EP_OK
    );
    let mut layers: Vec<Layer> = Vec::new();
    while let Some(op) = inp.u8() {
        match op % 8 {
            0 => {
                // Register a layer with arbitrary shape (often invalid: must be refused).
                let (Some(id), Some(ne), Some(ns), Some(np)) =
                    (inp.u8(), inp.u8(), inp.u8(), inp.u8())
                else {
                    break;
                };
                let n_proj = u32::from(np % 5);
                let mut projs = Vec::new();
                for _ in 0..n_proj {
                    let (Some(off), Some(b), Some(extra)) = (inp.u16(), inp.u16(), inp.u8()) else {
                        break;
                    };
                    let bytes_per = u64::from(b % 2048);
                    projs.push(ep_proj_desc {
                        file: if extra & 0x80 != 0 { 3 } else { file },
                        offset: u64::from(off) * 32 % FILE_LEN as u64,
                        // bit 6: whole pages apart, as in GGUF files (the pool then
                        // reads straight into its slots where the offset allows)
                        expert_stride: if extra & 0x40 != 0 {
                            4096
                        } else {
                            bytes_per + u64::from(extra & 0x3f)
                        },
                        expert_bytes: bytes_per,
                        dst_base: ptr::null_mut(),
                        dst_slot_stride: 0,
                    });
                }
                let desc = ep_layer_desc {
                    layer: i32::from(id % 8) - 1,
                    n_experts: u32::from(ne % 40),
                    n_slots: u32::from(ns % 12),
                    n_proj: projs.len() as u32,
                    proj: if projs.is_empty() {
                        ptr::null()
                    } else {
                        projs.as_ptr()
                    },
                    copy_fn: None,
                    copy_user: ptr::null_mut(),
                };
                // SAFETY: desc and projs are valid for the call.
                let st = unsafe { ep_pool_add_layer(pool, &desc) };
                assert!(known(st));
                if st == EP_OK {
                    layers.push(Layer {
                        id: desc.layer,
                        n_experts: desc.n_experts,
                        n_slots: desc.n_slots,
                        projs,
                    });
                }
            }
            1 | 2 => {
                // A request with arbitrary shape and ids; with op 2 a started request,
                // waited for projection by projection.
                let started = op % 8 == 2;
                let (Some(l), Some(k), Some(n), Some(pad)) =
                    (inp.u8(), inp.u8(), inp.u8(), inp.u8())
                else {
                    break;
                };
                let layer = layers
                    .get(usize::from(l) % (layers.len() + 1))
                    .map(|x| x.id)
                    .unwrap_or(i32::from(l) - 100);
                let (n_used, n_tokens) = (usize::from(k % 5), usize::from(n % 4));
                let stride = n_used + usize::from(pad % 3);
                let mut ids = vec![
                    0i32;
                    if n_tokens == 0 {
                        0
                    } else {
                        (n_tokens - 1) * stride + n_used
                    }
                ];
                for id in ids.iter_mut() {
                    *id = i32::from(inp.u8().unwrap_or(0) % 48) - 2;
                }
                let mut out = vec![-1i32; n_used * n_tokens];
                let ids_ptr = if ids.is_empty() {
                    ptr::null()
                } else {
                    ids.as_ptr()
                };
                let out_ptr = if out.is_empty() {
                    ptr::null_mut()
                } else {
                    out.as_mut_ptr()
                };
                let mut in_flight = u32::MAX;
                let (u, t, s) = (n_used as u32, n_tokens as u32, stride * 4);
                // SAFETY: ids and out match the declared shape; in_flight is writable.
                let mut st = unsafe {
                    if started {
                        ep_pool_request_start(pool, layer, ids_ptr, u, t, s, out_ptr, &mut in_flight)
                    } else {
                        ep_pool_request(pool, layer, ids_ptr, u, t, s, out_ptr)
                    }
                };
                if started && st == EP_OK {
                    assert!(in_flight as usize <= n_used * n_tokens, "in flight {in_flight}");
                }
                assert!(known(st), "status {st}");
                if started && st == EP_OK {
                    let n_proj = layers
                        .iter()
                        .find(|x| x.id == layer)
                        .map_or(0, |x| x.projs.len() as i32);
                    for p in (0..n_proj).chain([-1]) {
                        // SAFETY: valid pool.
                        st = unsafe { ep_pool_request_wait(pool, layer, p) };
                        assert!(known(st), "status {st}");
                        if st != EP_OK {
                            break;
                        }
                    }
                }
                if st < 0 {
                    // SAFETY: never NULL.
                    let msg = unsafe { CStr::from_ptr(ep_last_error()) };
                    assert!(!msg.to_bytes().is_empty());
                }
                if st == EP_OK && n_used > 0 {
                    let lay = layers
                        .iter()
                        .find(|x| x.id == layer)
                        .expect("OK only for registered layers");
                    for t in 0..n_tokens {
                        let row = &out[t * n_used..(t + 1) * n_used];
                        for (j, &s) in row.iter().enumerate() {
                            assert!(s >= 0 && (s as u32) < lay.n_slots);
                            assert!(!row[..j].contains(&s), "slots of a token must be distinct");
                            let e = ids[t * stride + j];
                            assert!(e >= 0 && (e as u32) < lay.n_experts);
                            for (p, pd) in lay.projs.iter().enumerate() {
                                let mut base = ptr::null_mut();
                                let mut sstride = 0u64;
                                // SAFETY: out pointers valid.
                                assert_eq!(
                                    unsafe {
                                        ep_pool_slot_memory(
                                            pool,
                                            layer,
                                            p as i32,
                                            &mut base,
                                            &mut sstride,
                                        )
                                    },
                                    EP_OK
                                );
                                let start = (pd.offset + e as u64 * pd.expert_stride) as usize;
                                let want = &bytes[start..start + pd.expert_bytes as usize];
                                // SAFETY: the pool-owned slot holds expert_bytes bytes.
                                let got = unsafe {
                                    std::slice::from_raw_parts(
                                        (base as *const u8).add(s as usize * sstride as usize),
                                        want.len(),
                                    )
                                };
                                assert!(got == want, "served bytes differ from the file");
                            }
                        }
                    }
                }
            }
            3 => {
                let Some((layer, ex)) = layer_and_experts(&mut inp, &layers, 6) else {
                    break;
                };
                let mut started = 0u32;
                // SAFETY: the pointer is valid for ex.len() reads (NULL when empty).
                let st = unsafe {
                    ep_pool_prefetch(pool, layer, ptr_or_null(&ex), ex.len(), &mut started)
                };
                assert!(known(st));
            }
            4 => {
                // SAFETY: valid pool.
                assert_eq!(unsafe { ep_pool_poll(pool) }, EP_OK);
            }
            5 => {
                // Read-ahead for a stage call: arbitrary (often invalid) layers and ids.
                let Some((layer, ex)) = layer_and_experts(&mut inp, &layers, 9) else {
                    break;
                };
                let mut n_ahead = 0u32;
                // SAFETY: the pointer is valid for ex.len() reads (NULL when empty).
                let st = unsafe {
                    ep_pool_stage_ahead(pool, layer, ptr_or_null(&ex), ex.len(), &mut n_ahead)
                };
                assert!(known(st));
            }
            6 => {
                // A stage call: every expert handed over from the file must be the
                // file's bytes of that expert and projection.
                let (Some(l), Some(k), Some(n)) = (inp.u8(), inp.u8(), inp.u8()) else {
                    break;
                };
                let Some(lay) = layers.get(usize::from(l) % layers.len().max(1)) else {
                    continue;
                };
                let (n_used, n_tokens) = (usize::from(k % 4) + 1, usize::from(n % 6) + 1);
                let ids: Vec<i32> = (0..n_used * n_tokens)
                    .map(|_| i32::from(inp.u8().unwrap_or(0) % 40))
                    .collect();
                let mut seen = StageCheck {
                    lay,
                    file: &model().1,
                    bad: false,
                };
                // SAFETY: ids holds n_tokens rows of n_used; the callback and `seen`
                // outlive the call.
                let st = unsafe {
                    ep_pool_stage(
                        pool,
                        lay.id,
                        ids.as_ptr(),
                        n_used as u32,
                        n_tokens as u32,
                        n_used,
                        Some(stage_check),
                        (&mut seen as *mut StageCheck).cast(),
                    )
                };
                assert!(known(st));
                assert!(
                    !seen.bad || st != EP_OK,
                    "a stage call handed over wrong bytes"
                );
            }
            _ => {
                let cap = usize::from(inp.u8().unwrap_or(0));
                let mut buf = vec![0u8; cap];
                let mut len = 0usize;
                let mut st = std::mem::MaybeUninit::<ep_stats>::uninit();
                // SAFETY: buf valid for cap bytes; outputs writable.
                unsafe {
                    assert_eq!(
                        ep_pool_stats_json(
                            pool,
                            if cap == 0 {
                                ptr::null_mut()
                            } else {
                                buf.as_mut_ptr().cast()
                            },
                            cap,
                            &mut len
                        ),
                        EP_OK
                    );
                    assert_eq!(ep_pool_stats(pool, -1, st.as_mut_ptr()), EP_OK);
                    let s = st.assume_init();
                    assert!(s.prefetch_useful + s.prefetch_wasted <= s.prefetch_issued);
                    assert!(s.inflight_hits <= s.prefetch_useful);
                }
                if cap > 0 {
                    assert_eq!(buf[len.min(cap - 1)], 0, "NUL-terminated");
                }
            }
        }
    }
    // SAFETY: created above, deleted once.
    unsafe { ep_pool_delete(pool) };
});
