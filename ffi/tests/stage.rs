//! Staging (`Pool::stage`, `ep_pool_stage`): every distinct expert of a large ubatch is
//! handed over exactly once, from its slot when ready there and otherwise as the file's
//! exact bytes, through every I/O mode; slots and policy state stay as they were; a
//! changed file is an error. Also the routing trace the pool records.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::*;
use expert_pool::io::IoMode;
use expert_pool::policy::PolicyKind;
use expert_pool::pool::Staged;
use expert_pool::trace::Trace;
use expert_pool::{LayerSpec, Pool, PoolConfig, PoolError};

const N_EXPERTS: u32 = 32;
const N_SLOTS: u32 = 8;

fn model() -> TestModel {
    let pb = [q4k_bytes(512, 16), q4k_bytes(512, 16), q8_0_bytes(256, 32)];
    write_model("stage-model.bin", 2, N_EXPERTS, &pb, 7)
}

/// The tests' pool settings: LRU, a small queue, the given I/O mode.
fn config(mode: IoMode) -> PoolConfig {
    PoolConfig {
        io_mode: mode,
        policy: PolicyKind::Lru,
        queue_depth: 8,
        ..Default::default()
    }
}

fn pool(m: &TestModel, mode: IoMode, trace: Option<std::path::PathBuf>) -> Pool {
    pool_with(
        m,
        PoolConfig {
            trace_path: trace,
            ..config(mode)
        },
    )
}

/// A pool with `cfg` and both model layers registered (engine layers 1 and 3).
fn pool_with(m: &TestModel, cfg: PoolConfig) -> Pool {
    m.pool(cfg, [1, 3], N_EXPERTS, [N_SLOTS; 2])
}

/// Waits until no read is in flight: every finished read is routed (released, or kept
/// for the announcement that wants it).
fn settle(p: &Pool) {
    while p.reads_in_flight().unwrap() > 0 {
        p.poll().unwrap();
    }
}

/// What a stage call handed over: expert -> slot, and (expert, proj) -> bytes.
#[derive(Default)]
struct Got {
    from_slot: BTreeMap<u32, u32>,
    from_file: BTreeMap<(u32, usize), Vec<u8>>,
}

fn stage(
    p: &Pool,
    layer: i32,
    ids: &[i32],
    n_used: usize,
    n_tokens: usize,
) -> Result<Got, PoolError> {
    let mut got = Got::default();
    p.stage(
        layer,
        ids,
        n_used,
        n_tokens,
        n_used,
        &mut |item| match item {
            Staged::FromSlot { expert, slot } => {
                assert!(
                    got.from_slot.insert(expert, slot).is_none(),
                    "expert {expert} twice"
                );
            }
            Staged::FromFile { expert, proj, data } => {
                assert!(
                    got.from_file
                        .insert((expert, proj), data.to_vec())
                        .is_none(),
                    "expert {expert} proj {proj} twice"
                );
            }
        },
    )?;
    Ok(got)
}

fn run(mode: IoMode) {
    let m = model();
    let p = pool(&m, mode, None);
    // Make experts 0..4 resident in layer 1 (engine layer 1 = model layer 0).
    let mut slots = [0i32; 4];
    p.request(1, &[0, 1, 2, 3], 4, 1, 4, &mut slots).unwrap();
    let before: Vec<_> = (0..N_SLOTS).map(|s| p.slot_state(1, s).unwrap()).collect();

    // A 16-token ubatch of 4 experts each, touching 20 distinct experts with repeats.
    let ids: Vec<i32> = (0..16)
        .flat_map(|t| (0..4).map(move |j| (t * 3 + j * 5) % 20))
        .collect();
    let distinct: BTreeSet<u32> = ids.iter().map(|&e| e as u32).collect();
    let got = stage(&p, 1, &ids, 4, 16).unwrap();

    let resident: BTreeSet<u32> = (0..4).collect();
    assert_eq!(
        got.from_slot.keys().copied().collect::<BTreeSet<_>>(),
        &distinct & &resident
    );
    for (&e, &s) in &got.from_slot {
        assert_eq!(
            slots[e as usize] as u32, s,
            "expert {e} handed over from the wrong slot"
        );
    }
    let read: BTreeSet<u32> = got.from_file.keys().map(|(e, _)| *e).collect();
    assert_eq!(read, &distinct - &resident);
    for ((e, proj), bytes) in &got.from_file {
        assert!(
            bytes == m.expert(0, *proj, *e),
            "expert {e} proj {proj}: bytes differ"
        );
    }
    // Slots unchanged, counters add up.
    let after: Vec<_> = (0..N_SLOTS).map(|s| p.slot_state(1, s).unwrap()).collect();
    assert_eq!(before, after, "staging changed the slots");
    let c = p.counters(Some(1)).unwrap();
    assert_eq!(c.staged, 1);
    assert_eq!(c.staged_from_slots, got.from_slot.len() as u64);
    assert_eq!(c.staged_reads, read.len() as u64);
    let proj_bytes: u64 = (0..3).map(|pj| m.expert(0, pj, 0).len() as u64).sum();
    assert_eq!(c.bytes_read, proj_bytes * (4 + read.len() as u64));
}

/// Experts announced with `stage_ahead` are read before the stage call and handed over
/// by it with the file's bytes; resident and repeated ones are skipped, a new
/// announcement replaces the old, unneeded ones are not handed over, and the next stage
/// call reads everything itself.
fn run_ahead(mode: IoMode) {
    let m = model();
    let p = pool(&m, mode, None);
    let mut slots = [0i32; 2];
    p.request(1, &[0, 1], 2, 1, 2, &mut slots).unwrap();
    // Replaced by the next announcement (its reads are released when they finish).
    assert_eq!(p.stage_ahead(1, &[20, 21]).unwrap(), 2);
    assert!(p.stage_ahead(1, &[40]).is_err(), "id 40 is out of range");
    // 0 is resident, 9 is announced twice, 30 and 31 will not be needed; 20 is still
    // being read for the dropped announcement, unless that read finished already.
    let n = p.stage_ahead(1, &[0, 5, 6, 9, 9, 30, 31]).unwrap();
    assert_eq!(n, 5);
    let ids = [0, 5, 6, 7, 9, 10, 5, 1];
    let got = stage(&p, 1, &ids, 2, 4).unwrap();
    let read: BTreeSet<u32> = got.from_file.keys().map(|(e, _)| *e).collect();
    assert_eq!(read, BTreeSet::from([5, 6, 7, 9, 10]));
    assert_eq!(
        got.from_slot.keys().copied().collect::<BTreeSet<_>>(),
        BTreeSet::from([0, 1])
    );
    for ((e, proj), bytes) in &got.from_file {
        assert!(
            bytes == m.expert(0, *proj, *e),
            "expert {e} proj {proj}: bytes differ"
        );
    }
    let c = p.counters(Some(1)).unwrap();
    assert_eq!(c.stage_ahead, 2 + 5);
    assert_eq!(
        c.stage_ahead_used, 3,
        "5, 6 and 9 were announced and needed"
    );
    // The announcement is used up: the next stage call reads everything itself, and
    // the reads of 30 and 31 do not come back.
    let got = stage(&p, 1, &[30, 11], 2, 1).unwrap();
    assert_eq!(got.from_file.len(), 2 * 3);
    for ((e, proj), bytes) in &got.from_file {
        assert!(bytes == m.expert(0, *proj, *e), "expert {e} proj {proj}");
    }
    assert_eq!(p.counters(Some(1)).unwrap().stage_ahead_used, 3);
    // Announcing for one layer and staging another leaves both correct.
    p.stage_ahead(3, &[2, 3]).unwrap();
    let got = stage(&p, 1, &[2, 3], 2, 1).unwrap();
    for ((e, proj), bytes) in &got.from_file {
        assert!(bytes == m.expert(0, *proj, *e), "expert {e} proj {proj}");
    }
    let got = stage(&p, 3, &[3, 4], 2, 1).unwrap();
    assert_eq!(got.from_file.len(), 2 * 3);
    for ((e, proj), bytes) in &got.from_file {
        assert!(
            bytes == m.expert(1, *proj, *e),
            "layer 3 expert {e} proj {proj}"
        );
    }
    assert_eq!(p.counters(Some(3)).unwrap().stage_ahead_used, 1);
    assert_eq!(p.counters(None).unwrap().errors, 1, "the bad id only");
}

#[test]
fn stage_ahead_uring_direct() {
    run_ahead(IoMode::Auto);
}

#[test]
fn stage_ahead_uring_buffered() {
    run_ahead(IoMode::UringBuffered);
}

#[test]
fn stage_ahead_pread() {
    run_ahead(IoMode::Pread);
}

#[test]
fn stage_ahead_then_a_changed_file_fails_the_stage_call() {
    let m = model();
    let p = pool(&m, IoMode::Auto, None);
    p.stage_ahead(1, &[5, 6]).unwrap();
    let mut other = m.bytes.clone();
    fill_random(&mut other, 98);
    std::fs::write(m.path(), &other).unwrap();
    let err = stage(&p, 1, &[5, 6], 2, 1).err().expect("the file changed");
    assert!(matches!(err, PoolError::FileChanged { .. }), "{err}");
}

/// The file changes between an announcement and the request that takes its reads: the
/// request fails with the change named, and nothing is served.
#[test]
fn stage_ahead_then_a_changed_file_fails_the_request() {
    for settle_first in [false, true] {
        let m = model();
        let p = pool(&m, IoMode::Auto, None);
        p.stage_ahead(1, &[5, 6]).unwrap();
        if settle_first {
            settle(&p);
        }
        let mut other = m.bytes.clone();
        fill_random(&mut other, 98);
        std::fs::write(m.path(), &other).unwrap();
        let mut slots = [-7i32; 2];
        let err = p.request(1, &[5, 6], 2, 1, 2, &mut slots).unwrap_err();
        assert!(matches!(err, PoolError::FileChanged { .. }), "{err}");
        assert_eq!(slots, [-7, -7]);
        settle(&p);
        assert_eq!(p.read_buffers_held().unwrap(), 0);
    }
}

#[test]
fn stage_uring_direct() {
    run(IoMode::Auto);
}

#[test]
fn stage_uring_buffered() {
    run(IoMode::UringBuffered);
}

#[test]
fn stage_pread() {
    run(IoMode::Pread);
}

#[test]
fn stage_refuses_bad_ids_and_changed_files() {
    let m = model();
    let p = pool(&m, IoMode::Auto, None);
    let err = stage(&p, 1, &[0, 40], 2, 1)
        .err()
        .expect("id 40 is out of range");
    assert!(matches!(err, PoolError::InvalidArgument(_)), "{err}");
    assert!(
        stage(&p, 2, &[0, 1], 2, 1).is_err(),
        "layer 2 is not registered"
    );

    // Rewrite the file with other bytes (same size): the stage call must fail.
    let mut other = m.bytes.clone();
    fill_random(&mut other, 99);
    std::fs::write(m.path(), &other).unwrap();
    let err = stage(&p, 1, &[5, 6], 2, 1).err().expect("the file changed");
    assert!(matches!(err, PoolError::FileChanged { .. }), "{err}");
}

#[test]
fn trace_records_requests_and_stages_token_major() {
    let m = model();
    let path = disk_dir().join(format!("stage-trace.{}", std::process::id()));
    {
        let p = pool(&m, IoMode::Pread, Some(path.clone()));
        let mut out = [0i32; 8];
        // Token 0 through requests, tokens 1-2 through staging.
        p.request(1, &[3, 4], 2, 1, 2, &mut out[..2]).unwrap();
        p.request(3, &[5, 6], 2, 1, 2, &mut out[..2]).unwrap();
        stage(&p, 1, &[7, 8, 9, 10], 2, 2).unwrap();
        stage(&p, 3, &[11, 12, 13, 14], 2, 2).unwrap();
        p.publish_stats().err(); // no stats path: error, but the trace is written first
    }
    let t = Trace::read(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    assert_eq!((t.layers, t.experts, t.used), (2, N_EXPERTS, 2));
    assert_eq!(t.tokens(), 3);
    assert_eq!(t.get(0, 1), &[5, 6]);
    assert_eq!(t.get(2, 0), &[9, 10]);
    assert_eq!(t.get(2, 1), &[13, 14]);
}

/// A growing trace is written by the background thread while the pool lives (so a
/// killed engine keeps what it recorded up to the last write), without a stats file.
#[test]
fn a_growing_trace_is_written_while_the_pool_lives() {
    let m = model();
    let path = disk_dir().join(format!("stage-trace-live.{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let p = pool_with(
        &m,
        PoolConfig {
            trace_path: Some(path.clone()),
            trace_interval_ms: 20,
            stats_interval_ms: 10,
            ..config(IoMode::Pread)
        },
    );
    let tokens_on_disk = |want: usize| {
        let start = std::time::Instant::now();
        loop {
            if let Ok(t) = Trace::read(&path) {
                if t.tokens() == want {
                    return t;
                }
                assert!(t.tokens() < want, "{} tokens on disk", t.tokens());
            }
            assert!(
                start.elapsed() < std::time::Duration::from_secs(10),
                "the trace never reached {want} tokens on disk"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    };
    let mut out = [0i32; 2];
    p.request(1, &[3, 4], 2, 1, 2, &mut out).unwrap();
    p.request(3, &[5, 6], 2, 1, 2, &mut out).unwrap();
    assert_eq!(tokens_on_disk(1).get(0, 1), &[5, 6]);
    p.request(1, &[7, 8], 2, 1, 2, &mut out).unwrap();
    p.request(3, &[9, 10], 2, 1, 2, &mut out).unwrap();
    let t = tokens_on_disk(2);
    assert_eq!((t.get(0, 0), t.get(1, 1)), (&[3, 4][..], &[9, 10][..]));
    drop(p);
    assert_eq!(Trace::read(&path).unwrap().tokens(), 2);
    // no temp file left beside it
    let dir = path.parent().unwrap();
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    let left: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&name) && n != &name)
        .collect();
    assert!(left.is_empty(), "{left:?}");
    let _ = std::fs::remove_file(&path);
}

/// With a read budget of one byte, read-ahead announces one expert at a time and a stage
/// call reads one projection at a time; every byte still arrives, and no buffer stays
/// held after the call.
fn run_budget(mode: IoMode) {
    let m = model();
    let p = pool_with(
        &m,
        PoolConfig {
            stage_read_budget: 1,
            ..config(mode)
        },
    );
    assert_eq!(
        p.stage_ahead(1, &[5, 6, 7]).unwrap(),
        1,
        "the first expert's reads fill the budget"
    );
    let ids: Vec<i32> = (0..20).collect();
    let got = stage(&p, 1, &ids, 4, 5).unwrap();
    assert_eq!(got.from_file.len(), 20 * 3);
    for ((e, proj), bytes) in &got.from_file {
        assert!(
            bytes == m.expert(0, *proj, *e),
            "expert {e} proj {proj}: bytes differ"
        );
    }
    let c = p.counters(Some(1)).unwrap();
    assert_eq!((c.stage_ahead, c.stage_ahead_used), (1, 1));
    assert_eq!(p.read_buffers_held().unwrap(), 0);
}

#[test]
fn stage_within_a_read_budget_uring_direct() {
    run_budget(IoMode::Auto);
}

#[test]
fn stage_within_a_read_budget_pread() {
    run_budget(IoMode::Pread);
}

#[test]
fn no_read_buffer_is_held_after_stage_calls() {
    let m = model();
    let p = pool(&m, IoMode::Auto, None);
    p.stage_ahead(1, &[5, 6, 30]).unwrap();
    stage(&p, 1, &[5, 6, 7, 8], 2, 2).unwrap();
    // 30 was announced and not needed: released when its reads finish.
    settle(&p);
    p.stage_ahead(3, &[1, 2]).unwrap();
    stage(&p, 3, &[1, 2], 2, 1).unwrap();
    assert_eq!(p.read_buffers_held().unwrap(), 0);
}

/// A pool whose read budget holds three experts, and how many of experts 5..=8 of layer 1
/// an announcement then started (the budget stops it before the fourth).
fn pool_announcing_within_a_budget(m: &TestModel) -> (Pool, u32) {
    let expert: usize = (0..3).map(|p| m.expert(0, p, 0).len()).sum();
    let p = pool_with(
        m,
        PoolConfig {
            stage_read_budget: 3 * expert,
            ..config(IoMode::Auto)
        },
    );
    let first = p.stage_ahead(1, &[5, 6, 7, 8]).unwrap();
    assert!((1..4).contains(&first), "the budget stops it: {first}");
    (p, first)
}

/// Bytes of one expert of the test model (all projections).
fn expert_bytes(m: &TestModel) -> u64 {
    (0..3).map(|p| m.expert(0, p, 0).len() as u64).sum()
}

/// A request fills its misses that were announced from their read-ahead reads (whether
/// those finished before it or during it) instead of reading them again, with the
/// file's bytes, and drops the rest of the announcement: its read buffers go back, and
/// later announcements get the whole budget. (llama.cpp computes the last layer of a
/// prompt for the output tokens only, so a layer announced for staging can be served by
/// a request; with decode read-ahead every announcement is for a request.)
fn run_request_takes_ahead(mode: IoMode, settle_first: bool) {
    let m = model();
    let p = pool(&m, mode, None);
    let mut slots = [0i32; 2];
    p.request(1, &[0, 1], 2, 1, 2, &mut slots).unwrap();
    // 0 is resident (skipped); 5 and 6 are read ahead.
    assert_eq!(p.stage_ahead(1, &[0, 5, 6]).unwrap(), 2);
    if settle_first {
        settle(&p);
    }
    let mut slots = [0i32; 3];
    p.request(1, &[0, 5, 9], 3, 1, 3, &mut slots).unwrap();
    assert_slots_hold(&p, 1, &m, 0, &slots, &[0, 5, 9], &format!("{mode:?}"));
    settle(&p);
    let c = p.counters(Some(1)).unwrap();
    assert_eq!(
        (c.hits, c.misses),
        (1, 2 + 2),
        "0 hit; 0 and 1 missed before, 5 and 9 now"
    );
    assert_eq!(
        (c.stage_ahead, c.stage_ahead_used, c.ahead_fills),
        (2, 1, 1)
    );
    assert_eq!(
        c.bytes_read,
        5 * expert_bytes(&m),
        "0, 1, 9 on demand, 5 and 6 ahead: 5 not read twice"
    );
    assert_eq!(p.read_buffers_held().unwrap(), 0, "6's reads went back");
    // The announcement is used up: the next request reads 6 itself.
    let mut slots = [0i32; 1];
    p.request(1, &[6], 1, 1, 1, &mut slots).unwrap();
    assert_slots_hold(&p, 1, &m, 0, &slots, &[6], &format!("{mode:?}"));
    let c = p.counters(Some(1)).unwrap();
    assert_eq!((c.stage_ahead_used, c.ahead_fills), (1, 1));
    assert_eq!(c.bytes_read, 6 * expert_bytes(&m));
    assert_eq!(c.errors, 0);
}

#[test]
fn a_request_takes_announced_misses_uring_direct() {
    run_request_takes_ahead(IoMode::Auto, false);
    run_request_takes_ahead(IoMode::Auto, true);
}

#[test]
fn a_request_takes_announced_misses_uring_buffered() {
    run_request_takes_ahead(IoMode::UringBuffered, false);
    run_request_takes_ahead(IoMode::UringBuffered, true);
}

#[test]
fn a_request_takes_announced_misses_pread() {
    run_request_takes_ahead(IoMode::Pread, false);
}

/// Through a callback sink (how the engine fills slots): the taken expert's projections
/// are each handed over once, whole, with the file's bytes.
#[test]
fn a_request_hands_read_ahead_bytes_to_a_callback_sink() {
    use expert_pool::dest::FnSink;
    use std::sync::{Arc, Mutex};
    let m = model();
    let p = Pool::new(config(IoMode::Auto)).unwrap();
    let f = p.add_file(m.path()).unwrap();
    // (projection, slot, bytes) of every hand-over
    type Handed = Vec<(usize, u32, Vec<u8>)>;
    let got: Arc<Mutex<Handed>> = Arc::default();
    let g = got.clone();
    let sink = FnSink(move |_l: i32, proj: usize, slot: u32, data: &[u8]| {
        g.lock().unwrap().push((proj, slot, data.to_vec()));
    });
    p.add_layer(
        &LayerSpec {
            layer: 1,
            n_experts: N_EXPERTS,
            n_slots: N_SLOTS,
            projs: m.specs(0, f),
        },
        Some(Box::new(sink)),
    )
    .unwrap();
    assert_eq!(p.stage_ahead(1, &[4, 5]).unwrap(), 2);
    let mut slots = [0i32; 2];
    p.request(1, &[5, 7], 2, 1, 2, &mut slots).unwrap();
    let got = got.lock().unwrap();
    assert_eq!(
        got.len(),
        2 * 3,
        "each projection of 5 and 7 once: {}",
        got.len()
    );
    for (j, e) in [5u32, 7].into_iter().enumerate() {
        for pj in 0..3 {
            let n = got
                .iter()
                .filter(|(q, s, d)| {
                    *q == pj && *s == slots[j] as u32 && d[..] == *m.expert(0, pj, e)
                })
                .count();
            assert_eq!(n, 1, "expert {e} proj {pj}");
        }
    }
    assert_eq!(p.counters(Some(1)).unwrap().ahead_fills, 1);
}

/// A read-ahead read that fails fails the request that took it, like its own read
/// would: an I/O error, nothing served, the expert not resident; the next request reads
/// it again and gets the file's bytes.
#[test]
fn a_failed_read_ahead_fails_the_request_that_took_it() {
    for mode in [IoMode::Auto, IoMode::Pread] {
        let m = model();
        let p = pool(&m, mode, None);
        p.inject_faults(&[expert_pool::io::Fault::Errno(libc::EIO)])
            .unwrap();
        assert_eq!(p.stage_ahead(1, &[5]).unwrap(), 1);
        let mut slots = [-7i32; 2];
        let err = p.request(1, &[5, 6], 2, 1, 2, &mut slots).unwrap_err();
        assert!(matches!(err, PoolError::Io { .. }), "{mode:?}: {err}");
        assert_eq!(slots, [-7, -7], "nothing written on error");
        let c = p.counters(Some(1)).unwrap();
        // The request took the read-ahead (used) but was not served: no miss counted,
        // so no miss filled from read-ahead either.
        assert_eq!(
            (
                c.errors,
                c.requests,
                c.stage_ahead_used,
                c.misses,
                c.ahead_fills
            ),
            (1, 0, 1, 0, 0)
        );
        p.request(1, &[5, 6], 2, 1, 2, &mut slots).unwrap();
        assert_slots_hold(&p, 1, &m, 0, &slots, &[5, 6], &format!("{mode:?}"));
        settle(&p);
        assert_eq!(p.read_buffers_held().unwrap(), 0);
    }
}

/// An announcement that a request of the layer does not need at all still ends with the
/// request: its buffers go back and later announcements get the whole budget.
#[test]
fn a_request_drops_the_rest_of_the_layers_announcement() {
    let m = model();
    let (p, first) = pool_announcing_within_a_budget(&m);
    let mut slots = [0i32; 2];
    p.request(1, &[9, 10], 2, 1, 2, &mut slots).unwrap();
    settle(&p);
    assert_eq!(
        p.read_buffers_held().unwrap(),
        0,
        "the announcement's reads went back"
    );
    assert_eq!(
        p.stage_ahead(3, &[1, 2, 3, 4]).unwrap(),
        first,
        "the whole budget again"
    );
    // Layer 1's next stage call reads for itself.
    let got = stage(&p, 1, &[6, 8], 2, 1).unwrap();
    assert_eq!(got.from_file.len(), 2 * 3);
    assert_eq!(p.counters(Some(1)).unwrap().stage_ahead_used, 0);
}

/// Only one announcement lives: announcing for another layer drops the previous one (a
/// layer announced and then never computed must not hold read buffers).
#[test]
fn a_new_announcement_drops_another_layers() {
    let m = model();
    let (p, first) = pool_announcing_within_a_budget(&m);
    settle(&p);
    assert!(
        p.read_buffers_held().unwrap() > 0,
        "layer 1's reads wait for it"
    );
    assert_eq!(
        p.stage_ahead(3, &[1, 2, 3, 4]).unwrap(),
        first,
        "layer 1's announcement went back: the whole budget again"
    );
    let got = stage(&p, 1, &[5, 6], 2, 1).unwrap();
    assert_eq!(got.from_file.len(), 2 * 3);
    for ((e, proj), bytes) in &got.from_file {
        assert!(bytes == m.expert(0, *proj, *e), "expert {e} proj {proj}");
    }
    assert_eq!(p.counters(Some(1)).unwrap().stage_ahead_used, 0);
    let got = stage(&p, 3, &[1, 2], 2, 1).unwrap();
    for ((e, proj), bytes) in &got.from_file {
        assert!(
            bytes == m.expert(1, *proj, *e),
            "layer 3 expert {e} proj {proj}"
        );
    }
    assert_eq!(
        p.counters(Some(3)).unwrap().stage_ahead_used,
        u64::from(first.min(2))
    );
    assert_eq!(p.read_buffers_held().unwrap(), 0);
}

/// A stage call whose wait for completions fails returns with its reads still in flight.
/// When they finish, during later calls, they are released, not taken for a later
/// call's reads: those hand over the file's bytes of their own experts, and every read
/// buffer goes back.
#[test]
fn a_failed_stage_calls_late_reads_are_released() {
    let m = model();
    let p = pool(&m, IoMode::Uring, None);
    assert_eq!(
        p.io_active().unwrap(),
        expert_pool::io::ActiveIo::Uring,
        "this test needs io_uring: {:?}",
        p.warnings().unwrap()
    );
    p.inject_wait_failure(libc::EIO).unwrap();
    let err = stage(&p, 1, &[5, 6, 7, 8], 2, 2)
        .err()
        .expect("the wait failed");
    assert!(matches!(err, PoolError::Io { .. }), "{err}");
    assert!(
        p.reads_in_flight().unwrap() > 0,
        "the failed call's reads are out"
    );
    // Another layer's call with other experts at the same positions, then this layer's.
    let got = stage(&p, 3, &[9, 10, 11, 12], 2, 2).unwrap();
    assert_eq!(got.from_file.len(), 4 * 3);
    for ((e, proj), bytes) in &got.from_file {
        assert!(
            bytes == m.expert(1, *proj, *e),
            "layer 3 expert {e} proj {proj}"
        );
    }
    let got = stage(&p, 1, &[13, 14, 15, 16], 2, 2).unwrap();
    assert_eq!(got.from_file.len(), 4 * 3);
    for ((e, proj), bytes) in &got.from_file {
        assert!(bytes == m.expert(0, *proj, *e), "expert {e} proj {proj}");
    }
    settle(&p);
    assert_eq!(p.read_buffers_held().unwrap(), 0);
}
