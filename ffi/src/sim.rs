//! Replays a routing trace against the pool's policies (through the same [`SlotMap`]
//! code the pool runs, with instant fills) and against Belady's optimum.
//!
//! Every (token, layer) of the trace is one request of that layer; each layer has its
//! own `slots` slots. Hits and misses count distinct experts per request.
//!
//! Belady for multi-expert requests: on a miss with every slot taken, evict the
//! resident expert that the current request does not need whose next use is farthest
//! in the future (never used again counts as infinitely far).

use serde::Serialize;

use crate::policy::PolicyKind;
use crate::slots::{RequestPlan, SlotMap};
use crate::trace::Trace;

/// Hits and misses of one policy over a whole trace.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SimRow {
    /// Policy name (`belady` for the optimum).
    pub policy: String,
    /// Distinct requested experts found resident.
    pub hits: u64,
    /// Distinct requested experts that had to be read.
    pub misses: u64,
    /// hits / (hits + misses).
    pub hit_rate: f64,
    /// This hit rate divided by Belady's.
    pub ratio_to_belady: f64,
}

/// The slot count is below the experts one token uses.
#[derive(Debug, thiserror::Error)]
#[error("{slots} slots cannot hold the {used} experts one token uses")]
pub struct TooFewSlots {
    /// Slots asked for.
    pub slots: u32,
    /// Experts per token.
    pub used: u32,
}

/// Per-layer (hits, misses) of `policy` with `slots` slots per layer.
pub fn simulate_per_layer(
    t: &Trace,
    slots: u32,
    policy: PolicyKind,
) -> Result<Vec<(u64, u64)>, TooFewSlots> {
    if slots < t.used {
        return Err(TooFewSlots {
            slots,
            used: t.used,
        });
    }
    // More slots than experts hold every expert, as many slots as experts do.
    let slots = slots.min(t.experts);
    let k = t.used as usize;
    let mut out = vec![(0u64, 0u64); t.layers as usize];
    let mut plan = RequestPlan::default();
    let mut ids = vec![0i32; k];
    let mut slots_out = vec![0i32; k];
    for (l, acc) in out.iter_mut().enumerate() {
        let mut map = SlotMap::new(t.experts, slots, policy).expect("trace shape was validated");
        for tok in 0..t.tokens() {
            for (d, &s) in ids.iter_mut().zip(t.get(tok, l)) {
                *d = i32::from(s);
            }
            map.plan_request(&ids, k, 1, k, &mut plan)
                .expect("trace ids are valid and fit");
            for &f in &plan.fills {
                map.complete(f, true);
            }
            map.finish(&ids, k, 1, k, &mut slots_out)
                .expect("all fills completed");
            acc.0 += u64::from(plan.hits);
            acc.1 += plan.fills.len() as u64;
        }
    }
    Ok(out)
}

/// Per-layer (hits, misses) of Belady's optimum with `slots` slots per layer.
pub fn belady_per_layer(t: &Trace, slots: u32) -> Result<Vec<(u64, u64)>, TooFewSlots> {
    if slots < t.used {
        return Err(TooFewSlots {
            slots,
            used: t.used,
        });
    }
    let slots = slots.min(t.experts); // as in simulate_per_layer
    let (n, k, e) = (t.tokens(), t.used as usize, t.experts as usize);
    let mut out = Vec::with_capacity(t.layers as usize);
    let mut next = vec![0usize; n * k];
    for l in 0..t.layers as usize {
        // next[tok * k + j]: the next token after tok that uses expert get(tok, l)[j].
        let mut seen = vec![usize::MAX; e];
        for tok in (0..n).rev() {
            for (j, &x) in t.get(tok, l).iter().enumerate() {
                next[tok * k + j] = seen[x as usize];
                seen[x as usize] = tok;
            }
        }
        let mut next_use = vec![usize::MAX; e];
        let mut resident: Vec<u16> = Vec::with_capacity(slots as usize);
        let mut is_res = vec![false; e];
        let (mut hits, mut misses) = (0u64, 0u64);
        for tok in 0..n {
            let ids = t.get(tok, l);
            for &x in ids {
                if is_res[x as usize] {
                    hits += 1;
                }
            }
            for &x in ids {
                if is_res[x as usize] {
                    continue;
                }
                misses += 1;
                if resident.len() == slots as usize {
                    // Farthest next use among residents this token does not need.
                    let (vi, _) = resident
                        .iter()
                        .enumerate()
                        .filter(|(_, r)| !ids.contains(r))
                        .max_by_key(|(_, r)| next_use[**r as usize])
                        .expect("slots >= used leaves a victim");
                    is_res[resident[vi] as usize] = false;
                    resident.swap_remove(vi);
                }
                resident.push(x);
                is_res[x as usize] = true;
            }
            for (j, &x) in ids.iter().enumerate() {
                next_use[x as usize] = next[tok * k + j];
            }
        }
        out.push((hits, misses));
    }
    Ok(out)
}

/// The table printed by `expertd trace sim`: every policy and Belady, with `slots`
/// slots per layer, summed over layers.
pub fn sim_table(t: &Trace, slots: u32) -> Result<Vec<SimRow>, TooFewSlots> {
    let sum = |v: Vec<(u64, u64)>| v.iter().fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    let (bh, bm) = sum(belady_per_layer(t, slots)?);
    let rate = |h: u64, m: u64| {
        if h + m == 0 {
            0.0
        } else {
            h as f64 / (h + m) as f64
        }
    };
    let b_rate = rate(bh, bm);
    let row = |policy: String, h: u64, m: u64| SimRow {
        policy,
        hits: h,
        misses: m,
        hit_rate: rate(h, m),
        ratio_to_belady: if b_rate == 0.0 {
            0.0
        } else {
            rate(h, m) / b_rate
        },
    };
    let mut rows = Vec::new();
    for p in PolicyKind::ALL {
        let (h, m) = sum(simulate_per_layer(t, slots, p)?);
        rows.push(row(p.name().into(), h, m));
    }
    rows.push(row("belady".into(), bh, bm));
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trace(text: &str) -> Trace {
        Trace::parse(text.as_bytes()).unwrap()
    }

    #[test]
    fn belady_beats_lru_on_a_cyclic_pattern() {
        // 3 experts cycling through 2 slots: LRU always misses, Belady hits half.
        let mut s = String::from("expert-trace 1 layers=1 experts=3 used=1\n");
        for i in 0..30 {
            s.push_str(&format!("{}\n", i % 3));
        }
        let t = trace(&s);
        let rows = sim_table(&t, 2).unwrap();
        let lru = rows.iter().find(|r| r.policy == "lru").unwrap();
        let bel = rows.iter().find(|r| r.policy == "belady").unwrap();
        assert_eq!(lru.hits, 0);
        assert_eq!(bel.hits + bel.misses, 30);
        assert_eq!(bel.misses, 2 + 14);
    }

    #[test]
    fn belady_is_an_upper_bound() {
        let t = crate::trace::generate(&crate::trace::GenParams {
            layers: 3,
            experts: 32,
            used: 4,
            tokens: 500,
            reuse: (0.2, 0.5),
            zipf: 0.8,
            seed: 3,
        })
        .unwrap();
        for slots in [4, 8, 16] {
            let rows = sim_table(&t, slots).unwrap();
            let b = rows.last().unwrap().hits;
            for r in &rows {
                assert!(r.hits <= b, "{r:?} beats belady {b} at {slots} slots");
                assert_eq!(r.hits + r.misses, 500 * 3 * 4);
            }
        }
    }

    /// The online bound of `trace::online_bound` holds every policy's hit rate (up to
    /// the realised trace's luck), equals the reuse rate when the slots hold only one
    /// token's experts, and 1 when they hold every expert.
    #[test]
    fn the_online_bound_holds_every_policy() {
        let p = crate::trace::GenParams {
            layers: 3,
            experts: 32,
            used: 4,
            tokens: 2000,
            reuse: (0.2, 0.5),
            zipf: 0.8,
            seed: 3,
        };
        let t = crate::trace::generate(&p).unwrap();
        let slots = [4, 8, 16, 32];
        let bounds = crate::trace::online_bound(&p, &slots, 512).unwrap();
        for (&n, &bound) in slots.iter().zip(&bounds) {
            for r in sim_table(&t, n).unwrap() {
                if r.policy != "belady" {
                    assert!(
                        r.hit_rate <= bound + 0.01,
                        "{r:?} beats the bound {bound} at {n} slots"
                    );
                }
            }
        }
        assert!((bounds[0] - 0.35).abs() < 1e-9, "mean reuse: {}", bounds[0]);
        assert!(
            (bounds[3] - 1.0).abs() < 0.01,
            "every expert resident: {}",
            bounds[3]
        );
        assert!(bounds.windows(2).all(|w| w[0] < w[1]), "{bounds:?}");
        assert!(crate::trace::online_bound(&p, &[3], 8).is_err());
    }

    #[test]
    fn too_few_slots() {
        let t = trace("expert-trace 1 layers=1 experts=4 used=2\n0 1\n");
        assert!(sim_table(&t, 1).is_err());
    }

    /// More slots than experts hold every expert, like as many slots as experts: no
    /// panic (the slot map takes at most 65536) and no giant allocation.
    #[test]
    fn slots_beyond_the_experts_are_all_the_experts() {
        let t = trace("expert-trace 1 layers=1 experts=4 used=2\n0 1\n2 3\n0 2\n");
        let all = sim_table(&t, 4).unwrap();
        assert_eq!(sim_table(&t, 70_000).unwrap(), all);
        assert_eq!(sim_table(&t, u32::MAX).unwrap(), all);
    }
}
