//! Fill correctness: the bytes in a slot equal the file's bytes for that expert, for
//! Q4_K-like (144-byte blocks) and Q8_0-like (34-byte blocks) tensors at 32-byte
//! aligned offsets, through io_uring with O_DIRECT, io_uring buffered, and pread; and
//! through every destination kind. Also the completion handling under injected
//! EINTR, short reads and errors.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use common::*;
use expert_pool::dest::FnSink;
use expert_pool::io::{ActiveIo, Fault, IoMode};
use expert_pool::policy::PolicyKind;
use expert_pool::{LayerSpec, Pool, PoolConfig, PoolError};

const N_EXPERTS: u32 = 16;

/// Bytes a callback sink received, by (projection, slot).
type Captured = Arc<Mutex<HashMap<(usize, u32), Vec<u8>>>>;
const N_SLOTS: u32 = 6;

fn model() -> TestModel {
    // gate and up: Q4_K-like (cols 1024, rows 24); down: Q8_0-like (cols 512, rows 40).
    let pb = [
        q4k_bytes(1024, 24),
        q4k_bytes(1024, 24),
        q8_0_bytes(512, 40),
    ];
    assert!(pb.iter().all(|b| b % 4096 != 0));
    write_model("fill-model.bin", 2, N_EXPERTS, &pb, 42)
}

fn pool_with(mode: IoMode) -> Pool {
    Pool::new(PoolConfig {
        io_mode: mode,
        policy: PolicyKind::Lru,
        queue_depth: 8, // small, so batches exceed the ring and backpressure is exercised
        ..Default::default()
    })
    .unwrap()
}

/// A pool (`pool_with(mode)`) over `model()` with its layer 0 registered, N_SLOTS slots.
fn layer0_pool(mode: IoMode) -> (Pool, TestModel) {
    layer0_pool_of(mode, model())
}

/// Like [`layer0_pool`], over `m`.
fn layer0_pool_of(mode: IoMode, m: TestModel) -> (Pool, TestModel) {
    let pool = pool_with(mode);
    let f = pool.add_file(m.path()).unwrap();
    pool.add_layer(
        &LayerSpec {
            layer: 0,
            n_experts: N_EXPERTS,
            n_slots: N_SLOTS,
            projs: m.specs(0, f),
        },
        None,
    )
    .unwrap();
    (pool, m)
}

/// Requests every expert (in batches of 4 per token, 1-2 tokens) and checks the bytes.
fn check_all_experts(pool: &Pool, m: &TestModel, layer: i32) {
    let li = layer as usize;
    let mut out = [0i32; 8];
    for round in 0..3u32 {
        for start in (0..N_EXPERTS).step_by(4) {
            let ids: Vec<i32> = (0..4)
                .map(|j| ((start + j + round) % N_EXPERTS) as i32)
                .collect();
            pool.request(layer, &ids, 4, 1, 4, &mut out[..4]).unwrap();
            for (j, &e) in ids.iter().enumerate() {
                let slot = out[j] as u32;
                for p in 0..3 {
                    let got = pool.slot_bytes(layer, p, slot).unwrap().unwrap();
                    assert!(
                        got == m.expert(li, p, e as u32),
                        "layer {layer} proj {p} expert {e} slot {slot}: bytes differ"
                    );
                }
            }
        }
    }
}

fn run_mode(mode: IoMode, expect_uring: bool, expect_direct: bool) {
    let m = model();
    let pool = pool_with(mode);
    let f = pool.add_file(m.path()).unwrap();
    let direct = pool.file_is_direct(f).unwrap();
    if expect_direct && !direct {
        println!(
            "NOTE: O_DIRECT refused for {} ({:?}): tested the buffered path instead",
            m.path().display(),
            pool.warnings().unwrap()
        );
    }
    if !expect_direct {
        assert!(!direct, "{mode:?} must not use O_DIRECT");
    }
    let uring = pool.io_active().unwrap() == ActiveIo::Uring;
    if expect_uring && !uring {
        println!(
            "NOTE: io_uring unavailable ({:?}): tested pread",
            pool.warnings().unwrap()
        );
    }
    if !expect_uring {
        assert!(!uring);
    }
    println!("{mode:?}: io_uring={uring} O_DIRECT={direct}");
    for layer in 0..2 {
        pool.add_layer(
            &LayerSpec {
                layer,
                n_experts: N_EXPERTS,
                n_slots: N_SLOTS,
                projs: m.specs(layer as usize, f),
            },
            None,
        )
        .unwrap();
    }
    check_all_experts(&pool, &m, 0);
    check_all_experts(&pool, &m, 1);
    let c = pool.counters(None).unwrap();
    let eb: u64 = m.tensors[0].iter().map(|t| t.bytes).sum();
    assert_eq!(c.bytes_read, c.misses * eb);
    assert!(c.misses >= u64::from(N_EXPERTS) * 2);
}

#[test]
fn uring_direct() {
    run_mode(IoMode::Auto, true, true);
}

#[test]
fn uring_buffered() {
    run_mode(IoMode::UringBuffered, true, false);
}

#[test]
fn pread_buffered() {
    run_mode(IoMode::Pread, false, false);
}

#[test]
fn pread_direct() {
    run_mode(IoMode::PreadDirect, false, true);
}

#[test]
fn callback_sink_gets_exact_bytes() {
    let m = model();
    let pool = pool_with(IoMode::Auto);
    let f = pool.add_file(m.path()).unwrap();
    let got: Captured = Default::default();
    let g2 = Arc::clone(&got);
    let sink = FnSink(move |layer: i32, proj: usize, slot: u32, data: &[u8]| {
        assert_eq!(layer, 1);
        g2.lock().unwrap().insert((proj, slot), data.to_vec());
    });
    pool.add_layer(
        &LayerSpec {
            layer: 1,
            n_experts: N_EXPERTS,
            n_slots: N_SLOTS,
            projs: m.specs(1, f),
        },
        Some(Box::new(sink)),
    )
    .unwrap();
    let ids = [3, 9, 15, 0];
    let mut out = [0i32; 4];
    pool.request(1, &ids, 4, 1, 4, &mut out).unwrap();
    let got = got.lock().unwrap();
    for (j, &e) in ids.iter().enumerate() {
        for p in 0..3 {
            assert_eq!(got[&(p, out[j] as u32)], m.expert(1, p, e as u32));
        }
    }
    assert!(
        pool.slot_base(1, 0).is_err(),
        "callback layers have no slot memory"
    );
}

/// EINTR and short reads are retried transparently, in both engines.
#[test]
fn eintr_and_short_reads_are_retried() {
    for mode in [IoMode::Auto, IoMode::UringBuffered, IoMode::Pread] {
        let (pool, m) = layer0_pool(mode);
        pool.inject_faults(&[
            Fault::Errno(libc::EINTR),
            Fault::Short(100),
            Fault::Errno(libc::EAGAIN),
            Fault::Short(4096),
            Fault::Short(1),
        ])
        .unwrap();
        check_all_experts(&pool, &m, 0);
    }
}

/// A read error fails the request with EP_ERR_IO-class errors, serves nothing, and the
/// pool keeps working afterwards.
#[test]
fn read_errors_are_reported_and_not_served() {
    for mode in [IoMode::Auto, IoMode::Pread] {
        let (pool, m) = layer0_pool(mode);
        pool.inject_faults(&[Fault::Errno(libc::EIO)]).unwrap();
        let mut out = [-7i32; 2];
        let err = pool.request(0, &[5, 6], 2, 1, 2, &mut out).unwrap_err();
        assert!(matches!(err, PoolError::Io { .. }), "{err}");
        assert!(err.to_string().contains("Input/output error"), "{err}");
        assert_eq!(out, [-7, -7], "nothing written on error");
        // The failed expert is not resident; the other may be.
        let c = pool.counters(Some(0)).unwrap();
        assert_eq!((c.errors, c.requests), (1, 0));
        // Without faults the same request now succeeds with the right bytes.
        pool.request(0, &[5, 6], 2, 1, 2, &mut out).unwrap();
        assert_slots_hold(&pool, 0, &m, 0, &out, &[5, 6], &format!("{mode:?}"));
    }
}

/// Experts larger than the io_uring chunk size are read in several chunks in flight at
/// once; bytes must still match, under EINTR, short reads and a failing chunk.
#[test]
fn large_experts_span_several_chunks() {
    let big = q4k_bytes(4096, 544); // 1.2 MiB: several chunks
    assert!(big > 2 * expert_pool::io::CHUNK as u64);
    let m = write_model("fill-big.bin", 1, 5, &[big, q8_0_bytes(4096, 300)], 11);
    for mode in [IoMode::Auto, IoMode::UringBuffered, IoMode::Pread] {
        let pool = pool_with(mode);
        let f = pool.add_file(m.path()).unwrap();
        let sink_owned = mode != IoMode::UringBuffered;
        let got: Captured = Default::default();
        let g2 = Arc::clone(&got);
        let sink = FnSink(move |_l: i32, proj: usize, slot: u32, data: &[u8]| {
            g2.lock().unwrap().insert((proj, slot), data.to_vec());
        });
        pool.add_layer(
            &LayerSpec {
                layer: 0,
                n_experts: 5,
                n_slots: 2,
                projs: m.specs(0, f),
            },
            if sink_owned {
                None
            } else {
                Some(Box::new(sink))
            },
        )
        .unwrap();
        let check = |ids: &[i32], out: &[i32]| {
            for (j, &e) in ids.iter().enumerate() {
                for p in 0..2 {
                    let bytes = if sink_owned {
                        pool.slot_bytes(0, p, out[j] as u32).unwrap().unwrap()
                    } else {
                        got.lock().unwrap()[&(p, out[j] as u32)].clone()
                    };
                    assert!(
                        bytes == m.expert(0, p, e as u32),
                        "{mode:?} expert {e} proj {p}"
                    );
                }
            }
        };
        let mut out = [0i32; 2];
        pool.inject_faults(&[
            Fault::Errno(libc::EINTR),
            Fault::Short(5000),
            Fault::Short(1),
        ])
        .unwrap();
        pool.request(0, &[1, 3], 2, 1, 2, &mut out).unwrap();
        check(&[1, 3], &out);
        // One failing chunk fails the request; nothing of it is served.
        pool.inject_faults(&[Fault::Errno(libc::EIO)]).unwrap();
        let err = pool.request(0, &[0, 4], 2, 1, 2, &mut out).unwrap_err();
        assert!(matches!(err, PoolError::Io { .. }), "{mode:?}: {err}");
        assert_eq!(
            pool.reads_in_flight().unwrap(),
            0,
            "the failed request waited for its chunks"
        );
        pool.request(0, &[4, 0], 2, 1, 2, &mut out).unwrap();
        check(&[4, 0], &out);
        // Prefetch of a large expert, then a request that waits for it.
        pool.prefetch(0, &[2]).unwrap();
        pool.request(0, &[2, 0], 2, 1, 2, &mut out).unwrap();
        check(&[2, 0], &out);
        let c = pool.counters(Some(0)).unwrap();
        // Every fill read both projections but one: the projection whose chunk failed.
        // The failed request's two fills read too, but it was not served, so its
        // misses are not counted.
        let all = (c.misses + c.prefetch_issued + 2) * (big + q8_0_bytes(4096, 300));
        assert!(
            [all - big, all - q8_0_bytes(4096, 300)].contains(&c.bytes_read),
            "{mode:?}: bytes_read {} of {all}",
            c.bytes_read
        );
    }
}

/// A pool over a model whose one projection is 1 MiB (four io_uring chunks), with a
/// queue depth of 1 (a two-entry completion queue): queuing a read's later chunks has
/// to wait for completions of its earlier ones, which is where a chunk can fail while
/// the rest of its read is still being queued.
fn tight_ring_pool(mode: IoMode, name: &str) -> (Pool, TestModel) {
    let m = write_model(name, 1, 4, &[1 << 20], 3);
    let pool = Pool::new(PoolConfig {
        io_mode: mode,
        policy: PolicyKind::Lru,
        queue_depth: 1,
        ..Default::default()
    })
    .unwrap();
    let f = pool.add_file(m.path()).unwrap();
    pool.add_layer(
        &LayerSpec {
            layer: 0,
            n_experts: 4,
            n_slots: 2,
            projs: m.specs(0, f),
        },
        None,
    )
    .unwrap();
    (pool, m)
}

/// After a failed read the pool serves the right bytes: a read that fails while its
/// later chunks are still being queued must not be reported done (and its buffer
/// handed back) with chunks still going to the kernel, which then wrote into a buffer
/// the next read had taken, and that read was served with another expert's bytes.
#[test]
fn a_read_failing_while_its_chunks_are_queued_ends_before_its_buffer_is_reused() {
    for mode in [IoMode::Auto, IoMode::UringBuffered] {
        for round in 0..10 {
            let what = format!("{mode:?} round {round}");
            let (pool, m) = tight_ring_pool(mode, "fill-tight-ring.bin");
            if round % 2 == 0 {
                // A read error on the first chunk, reaped while the others are queued.
                pool.inject_faults(&[Fault::Errno(libc::EIO)]).unwrap();
            } else {
                // A failed wait while queuing: the chunks in flight finish later.
                pool.inject_wait_failure(libc::EIO).unwrap();
            }
            let mut out = [-7i32; 1];
            assert!(pool.request(0, &[0], 1, 1, 1, &mut out).is_err(), "{what}");
            assert_eq!(out, [-7], "{what}: nothing written on error");
            // A stage call reads expert 2 into buffers the failed read used.
            pool.stage_ahead(0, &[2]).unwrap();
            let mut got = Vec::new();
            pool.stage(0, &[2], 1, 1, 1, &mut |s| {
                if let expert_pool::pool::Staged::FromFile { data, .. } = s {
                    got.extend_from_slice(data);
                }
            })
            .unwrap();
            assert!(
                got == m.expert(0, 0, 2),
                "{what}: staged bytes differ from the file"
            );
            pool.request(0, &[1], 1, 1, 1, &mut out).unwrap();
            assert_slots_hold(&pool, 0, &m, 0, &out, &[1], &what);
            // Nothing of the failed read is left over: no read in the kernel, no buffer.
            pool.poll().unwrap();
            assert_eq!(pool.reads_in_flight().unwrap(), 0, "{what}");
            assert_eq!(pool.read_buffers_held().unwrap(), 0, "{what}");
        }
    }
}

/// A pool deleted with reads in flight waits for them (short reads included, whose
/// rest is read on the still-open files) and does not hang.
#[test]
fn a_pool_deleted_with_reads_in_flight_finishes() {
    for mode in [IoMode::Auto, IoMode::UringBuffered] {
        let (pool, _m) = tight_ring_pool(mode, "fill-delete-inflight.bin");
        pool.inject_faults(&[Fault::Short(100), Fault::Short(4096)])
            .unwrap();
        pool.stage_ahead(0, &[0, 1]).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            drop(pool);
            let _ = tx.send(());
        });
        rx.recv_timeout(std::time::Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("{mode:?}: deleting the pool did not finish"));
    }
}

/// A failed request writes no slot ids and counts no hits or misses: the counters add
/// up to the distinct experts of served requests.
#[test]
fn a_failed_request_writes_nothing_and_counts_no_hits() {
    for mode in [IoMode::Auto, IoMode::Pread] {
        let (pool, _m) = layer0_pool(mode);
        let mut out = [-7i32; 2];
        pool.request(0, &[0], 1, 1, 1, &mut out[..1]).unwrap();
        let mut out = [-7i32; 2];
        pool.inject_faults(&[Fault::Errno(libc::EIO)]).unwrap();
        // Expert 0 is a hit, expert 1 a miss whose read fails.
        assert!(pool.request(0, &[0, 1], 2, 1, 2, &mut out).is_err());
        assert_eq!(out, [-7, -7], "{mode:?}: nothing written on error");
        let c = pool.counters(Some(0)).unwrap();
        assert_eq!((c.requests, c.errors), (1, 1), "{mode:?}");
        assert_eq!(
            (c.hits, c.inflight_hits, c.misses),
            (0, 0, 1),
            "{mode:?}: only the served request counts"
        );
    }
}

/// A started request (`request_start`) hands out the slots a plain request would, and
/// each projection's bytes are in every slot once its wait returns, in every I/O mode,
/// through a ring too small for the batch and with short reads and EINTR on the way.
#[test]
fn a_started_request_serves_each_projection_after_its_wait() {
    for mode in [IoMode::Auto, IoMode::UringBuffered, IoMode::Pread] {
        let (pool, m) = layer0_pool(mode);
        let (plain, _m2) = layer0_pool(mode);
        pool.inject_faults(&[Fault::Errno(libc::EINTR), Fault::Short(100)])
            .unwrap();
        for round in 0..4u32 {
            let ids: Vec<i32> = (0..5)
                .map(|j| ((j * 3 + round * 2) % N_EXPERTS) as i32)
                .collect();
            let (mut out, mut want) = ([-1i32; 5], [-2i32; 5]);
            let in_flight = pool.request_start(0, &ids, 5, 1, 5, &mut out).unwrap();
            let misses = plain.counters(Some(0)).unwrap().misses;
            plain.request(0, &ids, 5, 1, 5, &mut want).unwrap();
            let misses = plain.counters(Some(0)).unwrap().misses - misses;
            assert_eq!(
                u64::from(in_flight),
                misses,
                "{mode:?} round {round}: misses in flight"
            );
            assert_eq!(
                out, want,
                "{mode:?} round {round}: the same slots as a request"
            );
            for p in 0..3 {
                pool.request_wait(0, Some(p)).unwrap();
                for (&e, &s) in ids.iter().zip(&out) {
                    let got = pool.slot_bytes(0, p, s as u32).unwrap().unwrap();
                    assert!(
                        got == m.expert(0, p, e as u32),
                        "{mode:?} round {round}: projection {p} of expert {e} differs after its wait"
                    );
                }
            }
            pool.request_wait(0, None).unwrap();
            let experts: Vec<u32> = ids.iter().map(|&e| e as u32).collect();
            assert_slots_hold(&pool, 0, &m, 0, &out, &experts, &format!("{mode:?}"));
            // Ended: waiting again is a usage error.
            let err = pool.request_wait(0, Some(0)).unwrap_err();
            assert!(matches!(err, PoolError::State(_)), "{err}");
        }
        // Counted like the plain requests, once each request ended.
        let (a, b) = (
            pool.counters(Some(0)).unwrap(),
            plain.counters(Some(0)).unwrap(),
        );
        assert_eq!(
            (a.requests, a.hits, a.misses, a.bytes_read, a.errors),
            (b.requests, b.hits, b.misses, b.bytes_read, b.errors),
            "{mode:?}"
        );
    }
}

/// A read error of a started request fails its waits (the one that finds it with the
/// reason, later ones as a usage error), counts one error and no served request, and
/// the next request reads the expert again and serves the file's bytes.
#[test]
fn a_started_request_whose_read_fails_fails_its_waits() {
    for mode in [IoMode::Auto, IoMode::Pread] {
        let (pool, m) = layer0_pool(mode);
        let mut out = [-7i32; 2];
        pool.inject_faults(&[Fault::Errno(libc::EIO)]).unwrap();
        pool.request_start(0, &[5, 6], 2, 1, 2, &mut out).unwrap();
        let err = pool.request_wait(0, None).unwrap_err();
        assert!(
            err.to_string().contains("Input/output error"),
            "{mode:?}: {err}"
        );
        let err = pool.request_wait(0, Some(1)).unwrap_err();
        assert!(matches!(err, PoolError::State(_)), "{mode:?}: {err}");
        let c = pool.counters(Some(0)).unwrap();
        assert_eq!((c.requests, c.errors, c.misses), (0, 1, 0), "{mode:?}");
        pool.request(0, &[5, 6], 2, 1, 2, &mut out).unwrap();
        assert_slots_hold(&pool, 0, &m, 0, &out, &[5, 6], &format!("{mode:?}"));
    }
}

/// A started request whose experts are all ready needs no wait: nothing is in flight, and
/// it is counted as served at once.
#[test]
fn a_started_request_of_ready_experts_is_served_at_once() {
    let (pool, m) = layer0_pool(IoMode::Auto);
    let mut out = [0i32; 2];
    pool.request(0, &[3, 4], 2, 1, 2, &mut out).unwrap();
    let before = pool.counters(Some(0)).unwrap();
    assert_eq!(
        pool.request_start(0, &[4, 3], 2, 1, 2, &mut out).unwrap(),
        0
    );
    let after = pool.counters(Some(0)).unwrap();
    assert_eq!(
        (after.requests, after.hits),
        (before.requests + 1, before.hits + 2)
    );
    assert_slots_hold(&pool, 0, &m, 0, &out, &[4, 3], "ready at once");
    // Waiting anyway returns at once and counts nothing twice.
    pool.request_wait(0, Some(1)).unwrap();
    pool.request_wait(0, None).unwrap();
    assert_eq!(pool.counters(Some(0)).unwrap().requests, after.requests);
}

/// Waiting with no started request, or for a projection the layer does not have, is an
/// error; a plain request ends a started one.
#[test]
fn waits_need_a_started_request_and_a_real_projection() {
    let (pool, _m) = layer0_pool(IoMode::Auto);
    let err = pool.request_wait(0, None).unwrap_err();
    assert!(matches!(err, PoolError::State(_)), "{err}");
    let mut out = [0i32; 2];
    pool.request_start(0, &[1, 2], 2, 1, 2, &mut out).unwrap();
    let err = pool.request_wait(0, Some(3)).unwrap_err();
    assert!(matches!(err, PoolError::InvalidArgument(_)), "{err}");
    assert!(
        pool.request_wait(1, None).is_err(),
        "layer 1 is not registered"
    );
    pool.request(0, &[3, 4], 2, 1, 2, &mut out).unwrap();
    let err = pool.request_wait(0, None).unwrap_err();
    assert!(matches!(err, PoolError::State(_)), "{err}");
}

/// A started request reads its misses' last projection (down) only once every earlier
/// one was waited for, so that it comes in while the engine computes with those.
#[test]
fn a_started_request_reads_the_last_projection_after_the_others() {
    let (pool, m) = layer0_pool(IoMode::Auto);
    assert_eq!(
        pool.io_active().unwrap(),
        ActiveIo::Uring,
        "io_uring is available here"
    );
    let mut out = [0i32; 2];
    assert_eq!(
        pool.request_start(0, &[7, 8], 2, 1, 2, &mut out).unwrap(),
        2
    );
    // one chunk per projection of these small experts
    assert_eq!(
        pool.reads_in_flight().unwrap(),
        4,
        "gate and up of both misses, not down"
    );
    pool.request_wait(0, Some(0)).unwrap();
    pool.request_wait(0, Some(1)).unwrap();
    assert_eq!(
        pool.reads_in_flight().unwrap(),
        2,
        "down of both misses, just started"
    );
    pool.request_wait(0, None).unwrap();
    assert_slots_hold(&pool, 0, &m, 0, &out, &[7, 8], "after the last wait");
}

/// A started request's read error is reported by its own wait even when another layer's
/// request ran in between (it reaped the failed read, and a request clears the pool's
/// last fill error).
#[test]
fn a_started_requests_read_error_survives_other_requests() {
    let m = model();
    let pool = m.pool(
        PoolConfig {
            io_mode: IoMode::Auto,
            policy: PolicyKind::Lru,
            ..Default::default()
        },
        [0, 1],
        N_EXPERTS,
        [N_SLOTS, N_SLOTS],
    );
    let mut out = [0i32; 2];
    pool.request_start(0, &[5, 6], 2, 1, 2, &mut out).unwrap();
    pool.request_wait(0, Some(0)).unwrap();
    pool.request_wait(0, Some(1)).unwrap();
    // down's reads are in flight now; the next completion fails
    pool.inject_faults(&[Fault::Errno(libc::EIO)]).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(50));
    let mut other = [0i32; 2];
    pool.request(1, &[1, 2], 2, 1, 2, &mut other).unwrap();
    let err = pool.request_wait(0, None).unwrap_err();
    assert!(err.to_string().contains("Input/output error"), "{err}");
    assert_slots_hold(&pool, 1, &m, 1, &other, &[1, 2], "the other layer");
}

/// A started request that needs a read-ahead read that failed returns that read's error
/// and starts nothing; the misses it did start are read to the end (the next request
/// of the layer is served).
#[test]
fn a_started_request_on_a_failed_read_ahead_returns_its_error() {
    let (pool, m) = layer0_pool(IoMode::Auto);
    pool.inject_faults(&[Fault::Errno(libc::EIO)]).unwrap();
    assert_eq!(pool.stage_ahead(0, &[9]).unwrap(), 1);
    for _ in 0..10_000 {
        if pool.reads_in_flight().unwrap() == 0 {
            break;
        }
        pool.poll().unwrap();
        std::thread::yield_now();
    }
    let mut out = [-7i32; 2];
    let err = pool
        .request_start(0, &[9, 10], 2, 1, 2, &mut out)
        .unwrap_err();
    assert!(err.to_string().contains("Input/output error"), "{err}");
    assert_eq!(out, [-7, -7], "nothing written on error");
    let err = pool.request_wait(0, None).unwrap_err();
    assert!(
        matches!(err, PoolError::State(_)),
        "nothing was started: {err}"
    );
    pool.request(0, &[10, 11], 2, 1, 2, &mut out).unwrap();
    assert_slots_hold(&pool, 0, &m, 0, &out, &[10, 11], "after the failed start");
}

/// Pool-owned slots of experts whose stride is whole pages (as in real GGUF files) are
/// read straight into (no copy: `copy_ns` stays 0), in every I/O mode and through
/// EINTR and short reads; the bytes equal the file's. A read error fails the request
/// with no read left in flight (none may write into a slot afterwards), and the expert
/// is read correctly later.
#[test]
fn pool_owned_slots_are_read_into_directly() {
    // gate/up Q4_K-like 1024 x 64 and down Q8_0-like 512 x 128: 9 and 17 pages an expert
    let pb = [
        q4k_bytes(1024, 64),
        q4k_bytes(1024, 64),
        q8_0_bytes(512, 128),
    ];
    assert!(pb.iter().all(|b| b % 4096 == 0));
    for mode in [
        IoMode::Auto,
        IoMode::UringBuffered,
        IoMode::Pread,
        IoMode::PreadDirect,
    ] {
        // the first tensor 128 bytes into a page (every expert starts there)
        let m = write_model_at("direct-model.bin", 1, N_EXPERTS, &pb, 7, 8192 + 128);
        let (pool, m) = layer0_pool_of(mode, m);
        pool.inject_faults(&[
            Fault::Errno(libc::EINTR),
            Fault::Short(100),
            Fault::Short(4096),
        ])
        .unwrap();
        check_all_experts(&pool, &m, 0);
        let c = pool.counters(Some(0)).unwrap();
        assert!(c.misses > 0 && c.bytes_read > 0, "{mode:?}");
        assert_eq!(
            c.copy_ns, 0,
            "{mode:?}: the slots were read into, not copied into"
        );
        // The slot memory as the C ABI hands it out (slot 0 and the stride) holds the
        // experts at their place too, and a started request (which reads into read
        // buffers and copies) fills the same layout right.
        let mut out = [0i32; 4];
        let ids = [1, 2, 14, 15];
        pool.request(0, &[4, 5, 6, 7], 4, 1, 4, &mut out).unwrap();
        pool.request(0, &[8, 9, 10, 11], 4, 1, 4, &mut out).unwrap();
        let in_flight = pool.request_start(0, &ids, 4, 1, 4, &mut out).unwrap();
        assert!(in_flight > 0, "{mode:?}: the started request misses");
        pool.request_wait(0, None).unwrap();
        assert!(
            pool.counters(Some(0)).unwrap().copy_ns > 0,
            "{mode:?}: it copied"
        );
        for (p, &bytes) in pb.iter().enumerate() {
            let (base, stride) = pool.slot_base(0, p).unwrap();
            for (j, &e) in ids.iter().enumerate() {
                // SAFETY: the slot lies inside the pool's slot memory (stride apart from
                // slot 0), holds its expert's bytes after the wait, and nothing writes it
                // until the next request of the layer.
                let got = unsafe {
                    std::slice::from_raw_parts(base.add(out[j] as usize * stride), bytes as usize)
                };
                assert!(
                    got == m.expert(0, p, e as u32),
                    "{mode:?}: slot memory of expert {e} proj {p}"
                );
            }
        }

        // A failure on the way (`inject`): the request fails, no read stays in flight
        // (none may write into a slot afterwards), and the experts come in right later.
        let ids = [3, 5, 9, 12];
        let fails_cleanly = |inject: &dyn Fn(), what: &str| -> PoolError {
            let mut out = [0i32; 4];
            // (a fresh set first, so that all four miss)
            pool.request(0, &[0, 1, 2, 4], 4, 1, 4, &mut out).unwrap();
            pool.request(0, &[6, 7, 8, 10], 4, 1, 4, &mut out).unwrap();
            inject();
            let e = pool.request(0, &ids, 4, 1, 4, &mut out).unwrap_err();
            assert_eq!(
                pool.reads_in_flight().unwrap(),
                0,
                "{mode:?}: {what}: reads left in flight"
            );
            pool.request(0, &ids, 4, 1, 4, &mut out).unwrap();
            for (j, &e) in ids.iter().enumerate() {
                for p in 0..3 {
                    let got = pool.slot_bytes(0, p, out[j] as u32).unwrap().unwrap();
                    assert!(
                        got == m.expert(0, p, e as u32),
                        "{mode:?}: {what}: expert {e} proj {p} afterwards"
                    );
                }
            }
            e
        };
        let e = fails_cleanly(
            &|| pool.inject_faults(&[Fault::Errno(libc::EIO)]).unwrap(),
            "a read error",
        );
        assert!(
            e.to_string().contains("Input/output error")
                || e.to_string().contains("EIO")
                || e.to_string().contains("os error 5"),
            "{mode:?}: {e}"
        );
        // waiting itself fails (io_uring)
        if pool.io_active().unwrap() == ActiveIo::Uring {
            fails_cleanly(
                &|| pool.inject_wait_failure(libc::EIO).unwrap(),
                "a failed wait",
            );
        }
    }
}
