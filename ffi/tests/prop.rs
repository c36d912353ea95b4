//! Property tests of the pool's invariants over random sequences of requests,
//! prefetches and polls, for every policy and both I/O engines:
//! - every returned slot holds its expert's file bytes (resident before return; for a
//!   started request, each projection once its wait returned, whatever prefetches and
//!   polls come in between);
//! - the slots of one token are distinct;
//! - a prefetch never evicts an expert held by the layer's latest request;
//! - metrics add up (hits + inflight_hits + misses = distinct experts requested, bytes
//!   read = (misses + prefetches) x expert bytes, ...).

mod common;

use std::collections::HashMap;
use std::sync::OnceLock;

use common::*;
use expert_pool::io::IoMode;
use expert_pool::policy::PolicyKind;
use expert_pool::slots::SlotState;
use expert_pool::{PoolConfig, PoolError};
use proptest::prelude::*;

const N_EXPERTS: u32 = 12;
const SLOTS: [u32; 2] = [4, 7];

fn model() -> &'static TestModel {
    static M: OnceLock<TestModel> = OnceLock::new();
    M.get_or_init(|| {
        write_model(
            "prop-model.bin",
            2,
            N_EXPERTS,
            &[q4k_bytes(256, 5), q8_0_bytes(64, 7)],
            5,
        )
    })
}

#[derive(Debug, Clone)]
enum Op {
    /// `start`: through `request_start`, then `between` is prefetched on the same layer
    /// before the waits (projection 0, 1, then all).
    Request {
        layer: i32,
        tokens: Vec<Vec<i32>>,
        start: bool,
        between: Vec<i32>,
    },
    Prefetch {
        layer: i32,
        experts: Vec<i32>,
    },
    Poll,
}

fn token(k: usize) -> impl Strategy<Value = Vec<i32>> {
    proptest::sample::subsequence((0..N_EXPERTS as i32).collect::<Vec<_>>(), k).prop_shuffle()
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..2i32, 1..=3usize, 1..=3usize).prop_flat_map(|(layer, k, n)| {
            (
                proptest::collection::vec(token(k), n),
                any::<bool>(),
                proptest::collection::vec(0..N_EXPERTS as i32, 0..4),
            )
                .prop_map(move |(tokens, start, between)| Op::Request { layer, tokens, start, between })
        }),
        3 => (0..2i32, proptest::collection::vec(0..N_EXPERTS as i32, 0..6))
            .prop_map(|(layer, experts)| Op::Prefetch { layer, experts }),
        1 => Just(Op::Poll),
    ]
}

fn check_sequence(policy: PolicyKind, io: IoMode, ops: &[Op]) -> Result<(), TestCaseError> {
    let m = model();
    let pool = m.pool(
        PoolConfig {
            policy,
            io_mode: io,
            queue_depth: 4,
            max_prefetch_inflight: 5,
            ..Default::default()
        },
        [0, 1],
        N_EXPERTS,
        SLOTS,
    );
    let mut held: [HashMap<u32, u32>; 2] = Default::default();
    let mut distinct_served = [0u64; 2];
    let mut served = [0u64; 2];
    let mut not_fit = [0u64; 2];
    for op in ops {
        match op {
            Op::Request {
                layer,
                tokens,
                start,
                between,
            } => {
                let li = *layer as usize;
                let k = tokens[0].len();
                let ids: Vec<i32> = tokens.concat();
                let mut distinct = ids.clone();
                distinct.sort_unstable();
                distinct.dedup();
                let mut out = vec![-1; ids.len()];
                let res = if *start {
                    pool.request_start(*layer, &ids, k, tokens.len(), k, &mut out)
                        .and_then(|_| {
                            pool.prefetch(*layer, between)?;
                            for p in 0..2 {
                                pool.request_wait(*layer, Some(p))?;
                                for (&e, &s) in ids.iter().zip(&out) {
                                    let got = pool.slot_bytes(*layer, p, s as u32)?.unwrap();
                                    assert!(
                                        got == m.expert(li, p, e as u32),
                                        "projection {p} of expert {e} differs after its wait"
                                    );
                                }
                            }
                            pool.request_wait(*layer, None)
                        })
                } else {
                    pool.request(*layer, &ids, k, tokens.len(), k, &mut out)
                };
                match res {
                    Ok(()) => {
                        prop_assert!(distinct.len() <= SLOTS[li] as usize);
                        served[li] += 1;
                        distinct_served[li] += distinct.len() as u64;
                        held[li].clear();
                        for (t, row) in out.chunks(k).enumerate() {
                            let mut s = row.to_vec();
                            s.sort_unstable();
                            s.dedup();
                            prop_assert_eq!(
                                s.len(),
                                k,
                                "slots of token {} not distinct: {:?}",
                                t,
                                row
                            );
                        }
                        for (&e, &s) in ids.iter().zip(&out) {
                            prop_assert!((0..SLOTS[li] as i32).contains(&s));
                            let (ex, state, is_held) = pool.slot_state(*layer, s as u32).unwrap();
                            prop_assert_eq!(ex, Some(e as u32));
                            prop_assert_eq!(state, SlotState::Ready);
                            prop_assert!(is_held);
                            for p in 0..2 {
                                let got = pool.slot_bytes(*layer, p, s as u32).unwrap().unwrap();
                                prop_assert!(
                                    got == m.expert(li, p, e as u32),
                                    "bytes of expert {} differ",
                                    e
                                );
                            }
                            held[li].insert(s as u32, e as u32);
                        }
                    }
                    Err(PoolError::DoesNotFit { needed, slots, .. }) => {
                        prop_assert!(distinct.len() > SLOTS[li] as usize);
                        prop_assert_eq!((needed, slots), (distinct.len(), SLOTS[li] as usize));
                        not_fit[li] += 1;
                    }
                    Err(e) => return Err(TestCaseError::fail(format!("request failed: {e}"))),
                }
            }
            Op::Prefetch { layer, experts } => {
                pool.prefetch(*layer, experts).unwrap();
            }
            Op::Poll => pool.poll().unwrap(),
        }
        // Held experts survive anything but the next request of their layer.
        for (li, h) in held.iter().enumerate() {
            for (&s, &e) in h {
                let (ex, state, is_held) = pool.slot_state(li as i32, s).unwrap();
                prop_assert_eq!(
                    ex,
                    Some(e),
                    "held slot {} of layer {} lost its expert",
                    s,
                    li
                );
                prop_assert_eq!(state, SlotState::Ready);
                prop_assert!(is_held);
            }
        }
    }
    // Let prefetches land, then check the books.
    for _ in 0..10_000 {
        if pool.reads_in_flight().unwrap() == 0 {
            break;
        }
        pool.poll().unwrap();
        std::thread::yield_now();
    }
    prop_assert_eq!(pool.reads_in_flight().unwrap(), 0);
    let eb: u64 = m.tensors[0].iter().map(|t| t.bytes).sum();
    let mut total = expert_pool::metrics::Counters::default();
    for li in 0..2 {
        let c = pool.counters(Some(li as i32)).unwrap();
        total.add(&c);
        prop_assert_eq!(c.hits + c.inflight_hits + c.misses, distinct_served[li]);
        prop_assert_eq!(c.requests, served[li]);
        prop_assert_eq!(c.does_not_fit, not_fit[li]);
        prop_assert_eq!(c.errors, 0);
        prop_assert_eq!(c.bytes_read, (c.misses + c.prefetch_issued) * eb);
        prop_assert_eq!(c.prefetch_issued_bytes, c.prefetch_issued * eb);
        prop_assert!(c.prefetch_useful + c.prefetch_wasted <= c.prefetch_issued);
        prop_assert!(c.inflight_hits <= c.prefetch_useful);
        prop_assert!(c.evictions <= c.misses + c.prefetch_issued);
        let resident = pool.snapshot().unwrap().layers[li].resident;
        prop_assert!(resident <= SLOTS[li]);
    }
    prop_assert_eq!(pool.counters(None).unwrap(), total);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn invariants_hold_for_every_policy(
        policy in proptest::sample::select(PolicyKind::ALL.to_vec()),
        io in proptest::sample::select(vec![IoMode::Auto, IoMode::Pread]),
        ops in proptest::collection::vec(op(), 1..40),
    ) {
        check_sequence(policy, io, &ops)?;
    }
}

/// Every policy gets a long run, independent of the random choice above.
#[test]
fn every_policy_long_sequence() {
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 6,
        ..ProptestConfig::default()
    });
    for policy in PolicyKind::ALL {
        for io in [IoMode::Auto, IoMode::Pread] {
            runner
                .run(&proptest::collection::vec(op(), 100..200), |ops| {
                    check_sequence(policy, io, &ops)
                })
                .unwrap_or_else(|e| panic!("{policy} {io:?}: {e}"));
        }
    }
}
