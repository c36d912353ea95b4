//! Eviction policies. A policy only ranks the residents of one layer's slots; the slot
//! map ([`crate::slots`]) decides which slots are eligible (never one the current
//! request needs, never one held by the previous request when a prefetch asks) and
//! always fills empty slots first, so a policy cannot break the pool's invariants.
//!
//! Time is logical: `now` is the layer's request counter, which grows by one per
//! request (a request is one ubatch; during decode, one token).

use std::fmt;

/// The policies the pool offers. `Default` in the C ABI maps to [`PolicyKind::DEFAULT`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PolicyKind {
    /// Least recently used: evict the expert whose last use is oldest.
    Lru,
    /// Least-stale (layer-aware): experts prefetched for this layer's next request are
    /// "fresh" and protected until a request of this layer has passed; among the rest
    /// the stalest (oldest last use) goes first. Without prefetch this equals LRU.
    LeastStale,
    /// LFU with exponential decay: evict the lowest decayed use frequency (half-life
    /// [`LFU_HALF_LIFE`] requests), ties broken by recency.
    LfuDecay,
    /// Frequency plus recency with a learned reuse rate: the score of an expert is its
    /// decayed use frequency plus, if the previous request used it, the layer's
    /// measured consecutive-request reuse rate; the lowest score is evicted.
    Lfru,
    /// Expected reuse distance: estimates, for every resident, the expected number of
    /// requests until its next use (1 with the learned reuse probability if the previous
    /// request used it, else the inverse of its decayed use frequency) and evicts the
    /// largest: an online stand-in for Belady's farthest-next-use rule.
    Erd,
}

/// Half-life, in requests, of the frequency estimate of [`PolicyKind::LfuDecay`] and
/// [`PolicyKind::Lfru`].
pub const LFU_HALF_LIFE: f64 = 256.0;

impl PolicyKind {
    /// The policy used when the caller does not choose one (the best in
    /// `bench/RESULTS.md` on traces with published real-model statistics).
    pub const DEFAULT: PolicyKind = PolicyKind::LfuDecay;

    /// Every policy, in table order.
    pub const ALL: [PolicyKind; 5] = [
        PolicyKind::Lru,
        PolicyKind::LeastStale,
        PolicyKind::LfuDecay,
        PolicyKind::Lfru,
        PolicyKind::Erd,
    ];

    /// Short name used in tables, JSON and the CLI.
    pub fn name(self) -> &'static str {
        match self {
            PolicyKind::Lru => "lru",
            PolicyKind::LeastStale => "least-stale",
            PolicyKind::LfuDecay => "lfu-decay",
            PolicyKind::Lfru => "lfru",
            PolicyKind::Erd => "erd",
        }
    }

    /// Parses a name as printed by [`PolicyKind::name`].
    pub fn from_name(name: &str) -> Option<PolicyKind> {
        PolicyKind::ALL.into_iter().find(|k| k.name() == name)
    }

    /// The C ABI code (`EP_POLICY_*`); 0 is "default".
    pub fn code(self) -> u32 {
        match self {
            PolicyKind::Lru => 1,
            PolicyKind::LeastStale => 2,
            PolicyKind::LfuDecay => 3,
            PolicyKind::Lfru => 4,
            PolicyKind::Erd => 5,
        }
    }

    /// Inverse of [`PolicyKind::code`]; 0 gives [`PolicyKind::DEFAULT`].
    pub fn from_code(code: u32) -> Option<PolicyKind> {
        match code {
            0 => Some(PolicyKind::DEFAULT),
            1 => Some(PolicyKind::Lru),
            2 => Some(PolicyKind::LeastStale),
            3 => Some(PolicyKind::LfuDecay),
            4 => Some(PolicyKind::Lfru),
            5 => Some(PolicyKind::Erd),
            _ => None,
        }
    }

    /// A fresh policy instance for one layer.
    pub fn build(self, n_experts: u32, n_slots: u32) -> Box<dyn Policy> {
        match self {
            PolicyKind::Lru => Box::new(Lru::new(n_slots)),
            PolicyKind::LeastStale => Box::new(LeastStale::new(n_slots)),
            PolicyKind::LfuDecay => Box::new(LfuDecay::new(n_experts, n_slots)),
            PolicyKind::Lfru => Box::new(Lfru::new(n_experts, n_slots, false)),
            PolicyKind::Erd => Box::new(Lfru::new(n_experts, n_slots, true)),
        }
    }
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Ranks the residents of one layer's slots. Called only by the slot map, which owns
/// the invariants; a policy keeps whatever per-slot or per-expert state it needs.
pub trait Policy: Send + fmt::Debug {
    /// Which policy this is.
    fn kind(&self) -> PolicyKind;
    /// A request of this layer starts; `now` is its logical time (strictly growing).
    fn on_request(&mut self, _now: u64) {}
    /// A demand request uses `expert`, resident in `slot` (hit or freshly filled). Called
    /// once per distinct expert per request.
    fn on_use(&mut self, slot: u32, expert: u32, now: u64);
    /// `expert` was placed in `slot`; `prefetch` tells whether a prefetch placed it (a
    /// demand fill is followed by [`Policy::on_use`]).
    fn on_insert(&mut self, slot: u32, expert: u32, now: u64, prefetch: bool);
    /// Chooses the victim among `candidates` (non-empty; every candidate slot holds an
    /// expert, `slot_expert[slot]`). Must return one of the candidates.
    fn victim(&mut self, candidates: &[u32], slot_expert: &[u32], now: u64) -> u32;
}

/// Index of the candidate with the smallest key (first on ties).
fn argmin_by_key<K: PartialOrd>(candidates: &[u32], mut key: impl FnMut(u32) -> K) -> u32 {
    let mut best = candidates[0];
    let mut best_key = key(best);
    for &c in &candidates[1..] {
        let k = key(c);
        if k < best_key {
            best = c;
            best_key = k;
        }
    }
    best
}

/// See [`PolicyKind::Lru`].
#[derive(Debug)]
pub struct Lru {
    last_use: Vec<u64>,
}

impl Lru {
    /// A policy for `n_slots` slots.
    pub fn new(n_slots: u32) -> Self {
        Lru {
            last_use: vec![0; n_slots as usize],
        }
    }
}

impl Policy for Lru {
    fn kind(&self) -> PolicyKind {
        PolicyKind::Lru
    }
    fn on_use(&mut self, slot: u32, _expert: u32, now: u64) {
        self.last_use[slot as usize] = now;
    }
    fn on_insert(&mut self, slot: u32, _expert: u32, now: u64, _prefetch: bool) {
        self.last_use[slot as usize] = now;
    }
    fn victim(&mut self, candidates: &[u32], _slot_expert: &[u32], _now: u64) -> u32 {
        argmin_by_key(candidates, |s| self.last_use[s as usize])
    }
}

/// See [`PolicyKind::LeastStale`].
#[derive(Debug)]
pub struct LeastStale {
    last_use: Vec<u64>,
    /// Logical time a prefetch placed the slot's expert, if it has not been used since.
    fresh_since: Vec<Option<u64>>,
}

impl LeastStale {
    /// A policy for `n_slots` slots.
    pub fn new(n_slots: u32) -> Self {
        LeastStale {
            last_use: vec![0; n_slots as usize],
            fresh_since: vec![None; n_slots as usize],
        }
    }
}

impl Policy for LeastStale {
    fn kind(&self) -> PolicyKind {
        PolicyKind::LeastStale
    }
    fn on_use(&mut self, slot: u32, _expert: u32, now: u64) {
        self.last_use[slot as usize] = now;
        self.fresh_since[slot as usize] = None;
    }
    fn on_insert(&mut self, slot: u32, _expert: u32, now: u64, prefetch: bool) {
        self.last_use[slot as usize] = now;
        self.fresh_since[slot as usize] = prefetch.then_some(now);
    }
    fn victim(&mut self, candidates: &[u32], _slot_expert: &[u32], now: u64) -> u32 {
        // A prefetch placed at time p targets the request after p; once a request at
        // time > p has passed without using it, the prediction is stale.
        argmin_by_key(candidates, |s| {
            let fresh = matches!(self.fresh_since[s as usize], Some(p) if p + 1 >= now);
            (fresh, self.last_use[s as usize])
        })
    }
}

/// Lazily decayed per-expert use frequency: an exponentially weighted moving average of
/// "did request t use expert e", updated only when e is used.
#[derive(Debug)]
struct DecayedFreq {
    value: Vec<f64>,
    at: Vec<u64>,
    decay: f64,
}

impl DecayedFreq {
    fn new(n_experts: u32, half_life: f64) -> Self {
        DecayedFreq {
            value: vec![0.0; n_experts as usize],
            at: vec![0; n_experts as usize],
            decay: 0.5f64.powf(1.0 / half_life),
        }
    }
    fn get(&self, e: u32, now: u64) -> f64 {
        let dt = now.saturating_sub(self.at[e as usize]);
        self.value[e as usize] * self.decay.powi(dt.min(i32::MAX as u64) as i32)
    }
    fn bump(&mut self, e: u32, now: u64) {
        let v = self.get(e, now);
        self.value[e as usize] = v + (1.0 - self.decay);
        self.at[e as usize] = now;
    }
}

/// See [`PolicyKind::LfuDecay`].
#[derive(Debug)]
pub struct LfuDecay {
    freq: DecayedFreq,
    last_use: Vec<u64>,
}

impl LfuDecay {
    /// A policy for a layer with `n_experts` experts and `n_slots` slots.
    pub fn new(n_experts: u32, n_slots: u32) -> Self {
        LfuDecay {
            freq: DecayedFreq::new(n_experts, LFU_HALF_LIFE),
            last_use: vec![0; n_slots as usize],
        }
    }
}

impl Policy for LfuDecay {
    fn kind(&self) -> PolicyKind {
        PolicyKind::LfuDecay
    }
    fn on_use(&mut self, slot: u32, expert: u32, now: u64) {
        self.freq.bump(expert, now);
        self.last_use[slot as usize] = now;
    }
    fn on_insert(&mut self, slot: u32, _expert: u32, now: u64, _prefetch: bool) {
        self.last_use[slot as usize] = now;
    }
    fn victim(&mut self, candidates: &[u32], slot_expert: &[u32], now: u64) -> u32 {
        argmin_by_key(candidates, |s| {
            (
                self.freq.get(slot_expert[s as usize], now),
                self.last_use[s as usize],
            )
        })
    }
}

/// See [`PolicyKind::Lfru`].
#[derive(Debug)]
pub struct Lfru {
    freq: DecayedFreq,
    last_use: Vec<u64>,
    /// Whether each expert was used by the previous request (and when).
    expert_last_use: Vec<u64>,
    /// Uses in the current request that the previous request also used, and all uses.
    cur_reused: u32,
    cur_used: u32,
    /// Moving average of the consecutive-request reuse rate.
    reuse_rate: f64,
    /// Time of the previous request (for "used by the previous request").
    prev_request: u64,
    cur_request: u64,
    /// Rank by expected reuse distance ([`PolicyKind::Erd`]) instead of the score.
    distance: bool,
}

impl Lfru {
    /// A policy for a layer with `n_experts` experts and `n_slots` slots.
    pub fn new(n_experts: u32, n_slots: u32, distance: bool) -> Self {
        Lfru {
            distance,
            freq: DecayedFreq::new(n_experts, LFU_HALF_LIFE),
            last_use: vec![0; n_slots as usize],
            expert_last_use: vec![0; n_experts as usize],
            cur_reused: 0,
            cur_used: 0,
            reuse_rate: 0.3,
            prev_request: 0,
            cur_request: 0,
        }
    }

    /// Higher is more worth keeping.
    fn score(&self, expert: u32, now: u64) -> f64 {
        let f = self.freq.get(expert, now);
        let used_last = self.expert_last_use[expert as usize];
        // "Recent" means used by the latest complete request (or the current one).
        let recent = used_last != 0 && used_last >= self.prev_request;
        if self.distance {
            let far = 1.0 / f.max(1e-9);
            let d = if recent {
                self.reuse_rate + (1.0 - self.reuse_rate) * far
            } else {
                far
            };
            -d
        } else if recent {
            f + self.reuse_rate
        } else {
            f
        }
    }
}

impl Policy for Lfru {
    fn kind(&self) -> PolicyKind {
        if self.distance {
            PolicyKind::Erd
        } else {
            PolicyKind::Lfru
        }
    }
    fn on_request(&mut self, now: u64) {
        if self.cur_used > 0 {
            let r = f64::from(self.cur_reused) / f64::from(self.cur_used);
            self.reuse_rate += (r - self.reuse_rate) / 32.0;
        }
        self.cur_reused = 0;
        self.cur_used = 0;
        self.prev_request = self.cur_request;
        self.cur_request = now;
    }
    fn on_use(&mut self, slot: u32, expert: u32, now: u64) {
        let prev = self.expert_last_use[expert as usize];
        if prev != 0 && prev == self.prev_request {
            self.cur_reused += 1;
        }
        self.cur_used += 1;
        self.expert_last_use[expert as usize] = now;
        self.freq.bump(expert, now);
        self.last_use[slot as usize] = now;
    }
    fn on_insert(&mut self, slot: u32, _expert: u32, now: u64, _prefetch: bool) {
        self.last_use[slot as usize] = now;
    }
    fn victim(&mut self, candidates: &[u32], slot_expert: &[u32], now: u64) -> u32 {
        argmin_by_key(candidates, |s| {
            (
                self.score(slot_expert[s as usize], now),
                self.last_use[s as usize],
            )
        })
    }
}
