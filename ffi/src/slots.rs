//! The slot map of one MoE layer: which expert lives in which slot, and the state of
//! every slot. Pure bookkeeping, no I/O: the pool drives it and performs the reads,
//! the trace simulator drives it with instant fills.
//!
//! Invariants (checked by the property tests in `ffi/tests/prop.rs`):
//! - `expert_slot` and `slot_expert` are inverse partial maps.
//! - A request's distinct experts each get their own slot, so the slots of one token
//!   are distinct; a request never evicts an expert it needs.
//! - A prefetch never evicts an expert held by the latest successful request of the
//!   layer (the engine may still be computing with it) nor a slot being filled.
//! - A slot is served only in state [`SlotState::Ready`]; every fill carries the slot's
//!   generation, and a completion whose generation is stale is discarded.

use crate::error::{PoolError, Result};
use crate::policy::{Policy, PolicyKind};

/// Marks "no expert" / "no slot".
pub const NONE: u32 = u32::MAX;

/// The largest number of experts or slots of one layer.
pub const MAX_PER_LAYER: u32 = 1 << 16;

/// What a slot holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotState {
    /// No expert.
    Empty,
    /// An expert is assigned and its bytes are being read; not servable.
    Filling,
    /// The expert's bytes are in the slot.
    Ready,
}

/// A fill the caller must perform: read `expert` into `slot`, then report
/// [`SlotMap::complete`] with `generation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FillOrder {
    /// Expert to read.
    pub expert: u32,
    /// Destination slot.
    pub slot: u32,
    /// The slot's generation when the fill was ordered.
    pub generation: u32,
}

/// An expert that left its slot to make room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Eviction {
    /// The evicted expert.
    pub expert: u32,
    /// Its slot.
    pub slot: u32,
    /// It had been placed by a prefetch and never used (wasted prefetch).
    pub unused_prefetch: bool,
    /// It was still being filled (its in-flight read is now stale).
    pub was_filling: bool,
}

/// The outcome of planning one request; reused between requests to avoid allocation.
#[derive(Debug, Default, Clone)]
pub struct RequestPlan {
    /// Distinct experts of the request, in first-seen order.
    pub distinct: Vec<u32>,
    /// Distinct experts already ready.
    pub hits: u32,
    /// Needed slots still being filled by an earlier (prefetch) fill: wait for them.
    pub waits: Vec<u32>,
    /// New fills to perform before the request can be served.
    pub fills: Vec<FillOrder>,
    /// Evictions made for the fills.
    pub evictions: Vec<Eviction>,
    /// Needed experts that a prefetch placed and that had not been used yet.
    pub prefetch_useful: u32,
}

impl RequestPlan {
    fn clear(&mut self) {
        self.distinct.clear();
        self.hits = 0;
        self.waits.clear();
        self.fills.clear();
        self.evictions.clear();
        self.prefetch_useful = 0;
    }
}

/// The outcome of one prefetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefetchPlan {
    /// The expert is already resident or being filled: nothing to do.
    AlreadyResident,
    /// A fill must be performed.
    Fill(FillOrder, Option<Eviction>),
    /// Every slot is held by the latest request or being filled: dropped.
    NoSlot,
}

/// What [`SlotMap::complete`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    /// The slot is now ready.
    Ready,
    /// The fill failed; the expert was unmapped and the slot is empty.
    Failed,
    /// The slot was reassigned since the fill was ordered; nothing changed.
    Stale,
}

/// The slot map of one layer. See the module documentation for its invariants.
#[derive(Debug)]
pub struct SlotMap {
    n_experts: u32,
    expert_slot: Vec<u32>,
    slot_expert: Vec<u32>,
    state: Vec<SlotState>,
    generation: Vec<u32>,
    /// Logical time of the latest request that needed the slot.
    need: Vec<u64>,
    /// Placed by a prefetch and not used by a request since.
    by_prefetch: Vec<bool>,
    /// Per-expert stamp: time of the request that last listed it (deduplication).
    seen: Vec<u64>,
    /// Per-expert stamp: the token that last listed it (duplicates within a token).
    token_seen: Vec<u64>,
    token_counter: u64,
    /// Logical time: one per request attempt.
    now: u64,
    /// Time of the latest successful request; its slots are held.
    held: u64,
    policy: Box<dyn Policy>,
    candidates: Vec<u32>,
}

impl SlotMap {
    /// A layer with `n_experts` experts and `n_slots` slots, all empty.
    pub fn new(n_experts: u32, n_slots: u32, policy: PolicyKind) -> Result<Self> {
        if n_experts == 0 || n_experts > MAX_PER_LAYER {
            return Err(PoolError::invalid(format!(
                "n_experts must be in 1..={MAX_PER_LAYER}, got {n_experts}"
            )));
        }
        if n_slots == 0 || n_slots > MAX_PER_LAYER {
            return Err(PoolError::invalid(format!(
                "n_slots must be in 1..={MAX_PER_LAYER}, got {n_slots}"
            )));
        }
        let (e, s) = (n_experts as usize, n_slots as usize);
        Ok(SlotMap {
            n_experts,
            expert_slot: vec![NONE; e],
            slot_expert: vec![NONE; s],
            state: vec![SlotState::Empty; s],
            generation: vec![0; s],
            need: vec![0; s],
            by_prefetch: vec![false; s],
            seen: vec![0; e],
            token_seen: vec![0; e],
            token_counter: 0,
            now: 0,
            held: 0,
            policy: policy.build(n_experts, n_slots),
            candidates: Vec::with_capacity(s),
        })
    }

    /// Number of experts of the layer.
    pub fn n_experts(&self) -> u32 {
        self.n_experts
    }

    /// Number of slots of the layer.
    pub fn n_slots(&self) -> u32 {
        self.slot_expert.len() as u32
    }

    /// The policy in use.
    pub fn policy_kind(&self) -> PolicyKind {
        self.policy.kind()
    }

    /// Slot of `expert`, if assigned (ready or filling).
    pub fn slot_of(&self, expert: u32) -> Option<u32> {
        self.expert_slot
            .get(expert as usize)
            .copied()
            .filter(|&s| s != NONE)
    }

    /// Expert assigned to `slot`, if any.
    pub fn expert_in(&self, slot: u32) -> Option<u32> {
        self.slot_expert
            .get(slot as usize)
            .copied()
            .filter(|&e| e != NONE)
    }

    /// State of `slot`.
    pub fn state(&self, slot: u32) -> SlotState {
        self.state[slot as usize]
    }

    /// Current generation of `slot`.
    pub fn generation(&self, slot: u32) -> u32 {
        self.generation[slot as usize]
    }

    /// Whether `slot` is held by the latest successful request.
    pub fn is_held(&self, slot: u32) -> bool {
        self.held != 0 && self.need[slot as usize] == self.held
    }

    /// Number of slots holding a ready expert.
    pub fn ready_count(&self) -> usize {
        self.state
            .iter()
            .filter(|&&s| s == SlotState::Ready)
            .count()
    }

    /// Plans a request: validates the ids, deduplicates them, checks the fit, finds the
    /// hits and the slots to wait for, evicts and orders fills for the misses. `ids`
    /// holds `n_tokens` rows of `n_used` ids, row `t` starting at `t * row_stride`.
    ///
    /// On error nothing changes but the logical clock. On success the caller must
    /// perform the fills, report each with [`SlotMap::complete`], wait for `waits`, and
    /// then call [`SlotMap::finish`] (or give up on the request, which is safe: the
    /// experts stay assigned and are served once ready).
    pub fn plan_request(
        &mut self,
        ids: &[i32],
        n_used: usize,
        n_tokens: usize,
        row_stride: usize,
        plan: &mut RequestPlan,
    ) -> Result<()> {
        plan.clear();
        self.now += 1;
        let now = self.now;
        if n_tokens > 0 && n_used > 0 {
            if row_stride < n_used {
                return Err(PoolError::invalid(format!(
                    "ids row stride ({row_stride} ids) is smaller than n_used ({n_used})"
                )));
            }
            let need_len = (n_tokens - 1)
                .checked_mul(row_stride)
                .and_then(|x| x.checked_add(n_used));
            if need_len.is_none_or(|n| n > ids.len()) {
                return Err(PoolError::invalid("ids buffer shorter than its shape"));
            }
        }
        for t in 0..n_tokens {
            self.token_counter += 1;
            let row = &ids[t * row_stride..t * row_stride + n_used];
            for &id in row {
                if id < 0 || id as u32 >= self.n_experts {
                    return Err(PoolError::invalid(format!(
                        "expert id {id} out of range 0..{} (token {t})",
                        self.n_experts
                    )));
                }
                let e = id as usize;
                if self.token_seen[e] == self.token_counter {
                    return Err(PoolError::invalid(format!(
                        "expert id {id} appears twice in token {t}"
                    )));
                }
                self.token_seen[e] = self.token_counter;
                if self.seen[e] != now {
                    self.seen[e] = now;
                    plan.distinct.push(id as u32);
                }
            }
        }
        if plan.distinct.len() > self.slot_expert.len() {
            return Err(PoolError::DoesNotFit {
                layer: -1,
                needed: plan.distinct.len(),
                slots: self.slot_expert.len(),
            });
        }
        self.policy.on_request(now);
        // Pass 1: residents. Mark them needed first so that no miss evicts them.
        let mut n_miss = 0;
        for &e in &plan.distinct {
            let s = self.expert_slot[e as usize];
            if s == NONE {
                n_miss += 1;
                continue;
            }
            let si = s as usize;
            self.need[si] = now;
            if self.by_prefetch[si] {
                self.by_prefetch[si] = false;
                plan.prefetch_useful += 1;
            }
            match self.state[si] {
                SlotState::Ready => plan.hits += 1,
                SlotState::Filling => plan.waits.push(s),
                SlotState::Empty => unreachable!("assigned slot {s} is empty"),
            }
            self.policy.on_use(s, e, now);
        }
        // Pass 2: misses.
        if n_miss > 0 {
            for i in 0..plan.distinct.len() {
                let e = plan.distinct[i];
                if self.expert_slot[e as usize] != NONE {
                    continue;
                }
                let (slot, ev) = self
                    .take_slot(false)
                    .expect("fit check guarantees a slot the request does not need");
                if let Some(ev) = ev {
                    plan.evictions.push(ev);
                }
                let generation = self.assign(slot, e, false);
                self.need[slot as usize] = now;
                self.policy.on_insert(slot, e, now, false);
                self.policy.on_use(slot, e, now);
                plan.fills.push(FillOrder {
                    expert: e,
                    slot,
                    generation,
                });
            }
        }
        Ok(())
    }

    /// Finishes a request planned by [`SlotMap::plan_request`] once every needed slot is
    /// ready: writes the slot of every id to `out` (`n_tokens * n_used`, row-major) and
    /// holds the request's slots until the next request of this layer.
    ///
    /// Fails (and writes nothing) if a needed expert is not ready, e.g. its fill failed.
    pub fn finish(
        &mut self,
        ids: &[i32],
        n_used: usize,
        n_tokens: usize,
        row_stride: usize,
        out: &mut [i32],
    ) -> Result<()> {
        self.hand_out(ids, n_used, n_tokens, row_stride, out, true)
    }

    /// Like [`SlotMap::finish`], but right after [`SlotMap::plan_request`], with the
    /// request's fills still in flight: every needed expert has a slot, ready or being
    /// filled. The caller must not read a slot until its fill has completed (the pool's
    /// [`request_start`](crate::pool::Pool::request_start) and `request_wait`).
    pub fn assigned(
        &mut self,
        ids: &[i32],
        n_used: usize,
        n_tokens: usize,
        row_stride: usize,
        out: &mut [i32],
    ) -> Result<()> {
        self.hand_out(ids, n_used, n_tokens, row_stride, out, false)
    }

    fn hand_out(
        &mut self,
        ids: &[i32],
        n_used: usize,
        n_tokens: usize,
        row_stride: usize,
        out: &mut [i32],
        ready_only: bool,
    ) -> Result<()> {
        if out.len() < n_used * n_tokens {
            return Err(PoolError::invalid(
                "output buffer shorter than n_used * n_tokens",
            ));
        }
        // Every expert first, so that a failure leaves `out` untouched.
        for t in 0..n_tokens {
            for &e in &ids[t * row_stride..t * row_stride + n_used] {
                let s = self.expert_slot[e as usize];
                let servable = s != NONE
                    && match self.state[s as usize] {
                        SlotState::Ready => true,
                        SlotState::Filling => !ready_only,
                        SlotState::Empty => false,
                    };
                if !servable {
                    return Err(PoolError::State(format!(
                        "expert {e} is not resident after its fill"
                    )));
                }
            }
        }
        for t in 0..n_tokens {
            for j in 0..n_used {
                out[t * n_used + j] = self.expert_slot[ids[t * row_stride + j] as usize] as i32;
            }
        }
        self.held = self.now;
        Ok(())
    }

    /// Plans a prefetch of `expert`. Never evicts a held slot or a slot being filled.
    pub fn plan_prefetch(&mut self, expert: u32) -> Result<PrefetchPlan> {
        if expert >= self.n_experts {
            return Err(PoolError::invalid(format!(
                "prefetch expert id {expert} out of range 0..{}",
                self.n_experts
            )));
        }
        if self.expert_slot[expert as usize] != NONE {
            return Ok(PrefetchPlan::AlreadyResident);
        }
        let Some((slot, ev)) = self.take_slot(true) else {
            return Ok(PrefetchPlan::NoSlot);
        };
        let generation = self.assign(slot, expert, true);
        self.policy.on_insert(slot, expert, self.now, true);
        Ok(PrefetchPlan::Fill(
            FillOrder {
                expert,
                slot,
                generation,
            },
            ev,
        ))
    }

    /// Reports the end of the fill `order`. Stale completions change nothing.
    pub fn complete(&mut self, order: FillOrder, ok: bool) -> Completion {
        let s = order.slot as usize;
        if self.generation[s] != order.generation
            || self.slot_expert[s] != order.expert
            || self.state[s] != SlotState::Filling
        {
            return Completion::Stale;
        }
        if ok {
            self.state[s] = SlotState::Ready;
            Completion::Ready
        } else {
            self.unassign(order.slot);
            Completion::Failed
        }
    }

    /// Empties every slot (e.g. after the file changed). Pending fills become stale.
    /// Returns the evictions made.
    pub fn clear(&mut self) -> Vec<Eviction> {
        let mut out = Vec::new();
        for s in 0..self.slot_expert.len() as u32 {
            if let Some(e) = self.expert_in(s) {
                out.push(Eviction {
                    expert: e,
                    slot: s,
                    unused_prefetch: self.by_prefetch[s as usize],
                    was_filling: self.state[s as usize] == SlotState::Filling,
                });
                self.unassign(s);
            }
        }
        out
    }

    /// Picks a slot for a new expert: an empty eligible slot, else the policy's victim
    /// among eligible ready slots, else (demand only) an eligible slot still being
    /// filled by a prefetch. Eligible: not needed by the current request (demand), or
    /// not held and not filling (prefetch). Evicts the slot's expert.
    fn take_slot(&mut self, prefetch: bool) -> Option<(u32, Option<Eviction>)> {
        let now = self.now;
        let held = self.held;
        let eligible = |s: usize, need: &[u64], state: &[SlotState]| {
            if prefetch {
                (held == 0 || need[s] != held) && state[s] != SlotState::Filling
            } else {
                need[s] != now
            }
        };
        self.candidates.clear();
        let mut filling = None;
        for s in 0..self.slot_expert.len() {
            if !eligible(s, &self.need, &self.state) {
                continue;
            }
            match self.state[s] {
                SlotState::Empty => return Some((s as u32, None)),
                SlotState::Ready => self.candidates.push(s as u32),
                SlotState::Filling => {
                    filling.get_or_insert(s as u32);
                }
            }
        }
        let victim = if !self.candidates.is_empty() {
            self.policy.victim(&self.candidates, &self.slot_expert, now)
        } else {
            filling?
        };
        let vi = victim as usize;
        let ev = Eviction {
            expert: self.slot_expert[vi],
            slot: victim,
            unused_prefetch: self.by_prefetch[vi],
            was_filling: self.state[vi] == SlotState::Filling,
        };
        self.unassign(victim);
        Some((victim, Some(ev)))
    }

    fn assign(&mut self, slot: u32, expert: u32, prefetch: bool) -> u32 {
        let s = slot as usize;
        debug_assert_eq!(self.slot_expert[s], NONE);
        debug_assert_eq!(self.expert_slot[expert as usize], NONE);
        self.slot_expert[s] = expert;
        self.expert_slot[expert as usize] = slot;
        self.state[s] = SlotState::Filling;
        self.by_prefetch[s] = prefetch;
        self.generation[s] = self.generation[s].wrapping_add(1);
        self.generation[s]
    }

    fn unassign(&mut self, slot: u32) {
        let s = slot as usize;
        let e = self.slot_expert[s];
        if e != NONE {
            self.expert_slot[e as usize] = NONE;
        }
        self.slot_expert[s] = NONE;
        self.state[s] = SlotState::Empty;
        self.by_prefetch[s] = false;
        self.generation[s] = self.generation[s].wrapping_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(map: &mut SlotMap, ids: &[i32], n_used: usize) -> (RequestPlan, Vec<i32>) {
        let n_tokens = ids.len() / n_used;
        let mut plan = RequestPlan::default();
        map.plan_request(ids, n_used, n_tokens, n_used, &mut plan)
            .unwrap();
        for f in plan.fills.clone() {
            assert_eq!(map.complete(f, true), Completion::Ready);
        }
        let mut out = vec![-1; ids.len()];
        map.finish(ids, n_used, n_tokens, n_used, &mut out).unwrap();
        (plan, out)
    }

    #[test]
    fn hits_misses_and_distinct_slots() {
        let mut m = SlotMap::new(16, 4, PolicyKind::Lru).unwrap();
        let (p, out) = run(&mut m, &[1, 2, 2, 3], 2);
        assert_eq!((p.hits, p.fills.len()), (0, 3));
        assert_ne!(out[0], out[1]);
        assert_ne!(out[2], out[3]);
        assert_eq!(out[1], out[2]);
        let (p, _) = run(&mut m, &[3, 1], 2);
        assert_eq!((p.hits, p.fills.len()), (2, 0));
        // LRU: 2 is the least recently used; 9 and 10 need two slots: empty + 2.
        let (p, _) = run(&mut m, &[9, 10], 2);
        assert_eq!(p.evictions.len(), 1);
        assert_eq!(p.evictions[0].expert, 2);
    }

    #[test]
    fn does_not_fit_and_bad_ids() {
        let mut m = SlotMap::new(16, 2, PolicyKind::Lru).unwrap();
        let mut plan = RequestPlan::default();
        let err = m
            .plan_request(&[1, 2, 3, 4], 2, 2, 2, &mut plan)
            .unwrap_err();
        assert!(matches!(err, PoolError::DoesNotFit { needed: 4, .. }));
        let err = m.plan_request(&[1, 16], 2, 1, 2, &mut plan).unwrap_err();
        assert!(matches!(err, PoolError::InvalidArgument(_)));
        let err = m.plan_request(&[1, 1], 2, 1, 2, &mut plan).unwrap_err();
        assert!(matches!(err, PoolError::InvalidArgument(_)));
        let err = m.plan_request(&[1, 2], 2, 2, 2, &mut plan).unwrap_err();
        assert!(matches!(err, PoolError::InvalidArgument(_)));
    }

    #[test]
    fn prefetch_respects_held_and_filling() {
        let mut m = SlotMap::new(16, 3, PolicyKind::Lru).unwrap();
        run(&mut m, &[0, 1], 2);
        // One free slot: the first prefetch takes it, the second finds none (0 and 1
        // are held, the third is filling).
        let PrefetchPlan::Fill(f, None) = m.plan_prefetch(5).unwrap() else {
            panic!()
        };
        assert_eq!(m.plan_prefetch(6).unwrap(), PrefetchPlan::NoSlot);
        assert_eq!(m.plan_prefetch(5).unwrap(), PrefetchPlan::AlreadyResident);
        // A demand request waits for the in-flight prefetch of 5 and counts it useful.
        let mut plan = RequestPlan::default();
        m.plan_request(&[5, 0], 2, 1, 2, &mut plan).unwrap();
        assert_eq!(plan.waits, vec![f.slot]);
        assert_eq!(plan.prefetch_useful, 1);
        assert_eq!(m.complete(f, true), Completion::Ready);
        let mut out = [0; 2];
        m.finish(&[5, 0], 2, 1, 2, &mut out).unwrap();
        assert_eq!(out[0], f.slot as i32);
    }

    #[test]
    fn demand_cancels_inflight_prefetch_when_needed() {
        let mut m = SlotMap::new(16, 2, PolicyKind::Lru).unwrap();
        let PrefetchPlan::Fill(f1, _) = m.plan_prefetch(7).unwrap() else {
            panic!()
        };
        let PrefetchPlan::Fill(f2, _) = m.plan_prefetch(8).unwrap() else {
            panic!()
        };
        let mut plan = RequestPlan::default();
        m.plan_request(&[1, 2], 2, 1, 2, &mut plan).unwrap();
        assert_eq!(plan.evictions.len(), 2);
        assert!(
            plan.evictions
                .iter()
                .all(|e| e.unused_prefetch && e.was_filling)
        );
        assert_eq!(m.complete(f1, true), Completion::Stale);
        assert_eq!(m.complete(f2, true), Completion::Stale);
        for f in plan.fills.clone() {
            m.complete(f, true);
        }
        let mut out = [0; 2];
        m.finish(&[1, 2], 2, 1, 2, &mut out).unwrap();
    }

    #[test]
    fn failed_fill_unmaps() {
        let mut m = SlotMap::new(4, 2, PolicyKind::Lru).unwrap();
        let mut plan = RequestPlan::default();
        m.plan_request(&[3], 1, 1, 1, &mut plan).unwrap();
        let f = plan.fills[0];
        assert_eq!(m.complete(f, false), Completion::Failed);
        assert_eq!(m.slot_of(3), None);
        let mut out = [0; 1];
        assert!(m.finish(&[3], 1, 1, 1, &mut out).is_err());
    }
}
