//! Hot-path cost of an all-hit request of 8 experts (one token), through the C ABI and
//! through the Rust API, with every policy. Baseline measured in the same run: the
//! cheapest possible lookup (8 loads from a slot table behind an uncontended mutex).
//!
//! Run: `cargo bench -p expert-pool --bench pool_hotpath`

use std::hint::black_box;
use std::sync::Mutex;
use std::time::Instant;

use expert_pool::capi::*;
use expert_pool::policy::PolicyKind;
use expert_pool::{LayerSpec, Pool, PoolConfig, ProjSpec};

const ITERS: u32 = 2_000_000;

fn main() {
    let dir = std::env::temp_dir().join(format!("pool-hotpath-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.bin");
    std::fs::write(&path, vec![7u8; 128 * 256]).unwrap();

    // Baseline: mutex + 8 table loads + 8 stores.
    let table = Mutex::new((0..128i32).collect::<Vec<i32>>());
    let ids_sets: Vec<[i32; 8]> = (0..16)
        .map(|k| std::array::from_fn(|j| ((k + j * 3) % 24) as i32))
        .collect();
    let mut out = [0i32; 8];
    let t = Instant::now();
    for i in 0..ITERS {
        let ids = black_box(&ids_sets[i as usize % 16]);
        let g = table.lock().unwrap();
        for j in 0..8 {
            out[j] = g[ids[j] as usize];
        }
        black_box(&out);
    }
    let base_ns = t.elapsed().as_nanos() as f64 / f64::from(ITERS);
    println!("baseline (mutex + 8 lookups): {base_ns:.1} ns/request");

    for policy in PolicyKind::ALL {
        let pool = Pool::new(PoolConfig {
            policy,
            ..Default::default()
        })
        .unwrap();
        let f = pool.add_file(&path).unwrap();
        pool.add_layer(
            &LayerSpec {
                layer: 0,
                n_experts: 128,
                n_slots: 32,
                projs: vec![
                    ProjSpec {
                        file: f,
                        offset: 0,
                        stride: 256,
                        bytes: 256
                    };
                    3
                ],
            },
            None,
        )
        .unwrap();
        // Warm: 24 experts resident in 32 slots; the request sets rotate among them.
        for ids in &ids_sets {
            pool.request(0, ids, 8, 1, 8, &mut out).unwrap();
        }
        let misses_before = pool.counters(None).unwrap().misses;
        let t = Instant::now();
        for i in 0..ITERS {
            let ids = black_box(&ids_sets[i as usize % 16]);
            pool.request(0, ids, 8, 1, 8, &mut out).unwrap();
            black_box(&out);
        }
        let rust_ns = t.elapsed().as_nanos() as f64 / f64::from(ITERS);
        let c = pool.counters(None).unwrap();
        assert_eq!(c.misses, misses_before, "the timed loop must be all hits");
        println!(
            "{:<12} rust API: {rust_ns:7.1} ns/request ({:.2}x baseline, {:.3} of the 2 us goal)",
            policy.name(),
            rust_ns / base_ns,
            rust_ns / 2000.0
        );
    }

    // Through the C ABI, default policy.
    let mut pool = std::ptr::null_mut();
    let cpath = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    let mut file = 0;
    // SAFETY: valid pointers; the pool is deleted below.
    unsafe {
        assert_eq!(ep_pool_new(std::ptr::null(), &mut pool), EP_OK);
        assert_eq!(ep_pool_add_file(pool, cpath.as_ptr(), &mut file), EP_OK);
    }
    let projs = [ep_proj_desc {
        file,
        offset: 0,
        expert_stride: 256,
        expert_bytes: 256,
        dst_base: std::ptr::null_mut(),
        dst_slot_stride: 0,
    }; 3];
    let desc = ep_layer_desc {
        layer: 0,
        n_experts: 128,
        n_slots: 32,
        n_proj: 3,
        proj: projs.as_ptr(),
        copy_fn: None,
        copy_user: std::ptr::null_mut(),
    };
    // SAFETY: desc and projs outlive the call.
    assert_eq!(unsafe { ep_pool_add_layer(pool, &desc) }, EP_OK);
    for ids in &ids_sets {
        // SAFETY: ids and out hold 8 ints.
        let st = unsafe { ep_pool_request(pool, 0, ids.as_ptr(), 8, 1, 32, out.as_mut_ptr()) };
        assert_eq!(st, EP_OK);
    }
    let t = Instant::now();
    for i in 0..ITERS {
        let ids = black_box(&ids_sets[i as usize % 16]);
        // SAFETY: as above.
        let st = unsafe { ep_pool_request(pool, 0, ids.as_ptr(), 8, 1, 32, out.as_mut_ptr()) };
        debug_assert_eq!(st, EP_OK);
        black_box(st);
    }
    let c_ns = t.elapsed().as_nanos() as f64 / f64::from(ITERS);
    let mut st = std::mem::MaybeUninit::<ep_stats>::uninit();
    // SAFETY: st is written by the call; the pool is deleted once.
    let s = unsafe {
        assert_eq!(ep_pool_stats(pool, -1, st.as_mut_ptr()), EP_OK);
        ep_pool_delete(pool);
        st.assume_init()
    };
    assert_eq!(s.misses, 24, "only the warm-up missed");
    println!(
        "{:<12} C ABI:    {c_ns:7.1} ns/request ({:.2}x baseline, {:.3} of the 2 us goal)",
        PolicyKind::DEFAULT.name(),
        c_ns / base_ns,
        c_ns / 2000.0
    );
    let _ = std::fs::remove_dir_all(&dir);
}
