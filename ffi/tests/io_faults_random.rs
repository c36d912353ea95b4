//! Randomized fault sequences against the I/O engine itself: reads of 1 byte to three
//! chunks at aligned and unaligned offsets, on a ring of one or two entries (so queuing a
//! read's chunks waits for completions), with injected EINTR, EAGAIN, EIO, EINVAL, short
//! reads and failed waits, submits and reaps in random order. Checks: every `Part` and
//! every successful `Done` carries the file's bytes, nothing of a read comes after its
//! `Done`, `Done` comes once, a read can be released right at its `Done` (`release`
//! asserts that none of its chunks is in the kernel), and after draining every read is
//! done and no buffer is held. `FUZZ_SEEDS=N` runs more seeds (default 300 per mode).
mod common;

use std::collections::HashMap;

use common::*;
use expert_pool::io::{CHUNK, Event, Fault, IoEngine, IoMode, ModelFile};

#[derive(Debug)]
struct Rd {
    off: u64,
    len: usize,
    op: Option<usize>,
    done: bool,
}

fn handle(
    eng: &mut IoEngine,
    reads: &mut HashMap<u64, Rd>,
    bytes: &[u8],
    evs: &mut Vec<Event>,
    seed: u64,
    okc: &mut u64,
    errc: &mut u64,
) {
    eng.take_events(evs);
    for ev in evs.drain(..) {
        match ev {
            Event::Part { op, tag, range } => {
                let rd = reads.get(&tag).expect("part of unknown tag");
                assert!(!rd.done, "seed {seed}: Part after Done {rd:?}");
                if let Some(o) = rd.op {
                    assert_eq!(o, op);
                }
                // Partial data must already be right.
                let d = eng.data(op);
                let s = rd.off as usize;
                assert!(
                    d[range.clone()] == bytes[s + range.start..s + range.end],
                    "seed {seed}: part bytes differ {rd:?} {range:?}"
                );
            }
            Event::Done { op, tag, result } => {
                let rd = reads.get_mut(&tag).expect("done of unknown tag");
                assert!(!rd.done, "seed {seed}: Done twice {rd:?}");
                rd.done = true;
                if result.is_ok() {
                    let d = eng.data(op);
                    let s = rd.off as usize;
                    assert!(
                        d == &bytes[s..s + rd.len],
                        "seed {seed}: done bytes differ {rd:?}"
                    );
                    *okc += 1;
                } else {
                    *errc += 1;
                }
                // release asserts nothing of it is in the kernel
                eng.release(op);
            }
        }
    }
}

fn run(seed: u64, mode: IoMode, path: &std::path::Path, bytes: &[u8]) -> (u64, u64) {
    let mut r = XorShift::new(seed);
    let qd = 1 + r.below(2) as u32;
    let f = ModelFile::open(path, mode).unwrap();
    let mut eng = IoEngine::new(mode, qd);
    let mut reads: HashMap<u64, Rd> = HashMap::new();
    let mut evs = Vec::new();
    let mut tag = 0u64;
    let (mut okc, mut errc) = (0, 0);
    for _step in 0..40 {
        match r.below(10) {
            0..=3 => {
                let len = 1 + r.below(3 * CHUNK as u64 + 10000) as usize;
                let off = r.below((bytes.len() - len) as u64);
                let off = if r.below(3) == 0 { off & !4095 } else { off };
                tag += 1;
                let op = eng.start_read(&f, off, len, tag).unwrap();
                reads.insert(
                    tag,
                    Rd {
                        off,
                        len,
                        op: Some(op),
                        done: false,
                    },
                );
            }
            4..=5 => {
                let n = 1 + r.below(4);
                let fs: Vec<Fault> = (0..n).map(|_| r.fault()).collect();
                eng.inject_faults(&fs);
            }
            6 => eng.fail_next_wait(libc::EIO),
            7 => {
                let _ = eng.submit();
            }
            _ => {
                let _ = eng.reap(r.below(2) == 0);
            }
        }
        handle(
            &mut eng, &mut reads, bytes, &mut evs, seed, &mut okc, &mut errc,
        );
    }
    // finish everything
    let mut guard = 0;
    while eng.pending() > 0 {
        let _ = eng.submit();
        let _ = eng.reap(true);
        handle(
            &mut eng, &mut reads, bytes, &mut evs, seed, &mut okc, &mut errc,
        );
        guard += 1;
        assert!(guard < 100000, "seed {seed}: does not drain");
    }
    handle(
        &mut eng, &mut reads, bytes, &mut evs, seed, &mut okc, &mut errc,
    );
    for (t, rd) in &reads {
        assert!(rd.done, "seed {seed}: read {t} never Done: {rd:?}");
    }
    assert_eq!(eng.held_bytes(), 0, "seed {seed}: buffers held");
    (okc, errc)
}

#[test]
fn random_fault_sequences_keep_reads_whole() {
    let n_seeds: u64 = fuzz_seeds(300);
    let m = write_model("io-faults-random.bin", 1, 4, &[1 << 20], 9);
    let bytes = std::fs::read(m.path()).unwrap();
    for mode in [IoMode::Auto, IoMode::UringBuffered] {
        let (mut ok, mut err) = (0, 0);
        for seed in 0..n_seeds {
            let (o, e) = run(seed + 1, mode, m.path(), &bytes);
            ok += o;
            err += e;
        }
        eprintln!("{mode:?}: ok reads {ok}, failed reads {err}");
    }
}
