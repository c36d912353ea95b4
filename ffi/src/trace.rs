//! Routing traces: which experts each token selected in each MoE layer.
//!
//! # Trace file format (version 1)
//!
//! A trace has `layers` MoE layers (numbered 0.. in model order, dense layers left
//! out), `experts` experts per layer and `used` experts per token; for every token and
//! every layer it lists the `used` selected expert ids (each `< experts`, distinct
//! within the token and layer). Two encodings hold the same content; readers detect
//! which one by the first bytes.
//!
//! **Text** (for tests and hand-written traces):
//! ```text
//! expert-trace 1 layers=2 experts=8 used=2
//! # comments and blank lines are ignored
//! 0 3 | 5 1
//! 0 4 | 5 2
//! ```
//! The header line is `expert-trace 1` followed by `layers=`, `experts=`, `used=`; then
//! one line per token with `layers` groups of `used` ids, groups separated by `|`.
//!
//! **Binary** (compact, for long traces): all integers little-endian.
//! ```text
//! offset 0   8 bytes  magic "EXPTRACE"
//! offset 8   u32      version = 1
//! offset 12  u32      layers
//! offset 16  u32      experts (<= 65536)
//! offset 20  u32      used
//! offset 24  u64      tokens
//! offset 32  u16 ids  tokens * layers * used, token-major, then layer, then slot
//! ```

use std::fmt::Write as _;
use std::path::Path;

/// Magic bytes of the binary encoding.
pub const BINARY_MAGIC: &[u8; 8] = b"EXPTRACE";
/// First word of the text encoding.
pub const TEXT_MAGIC: &str = "expert-trace";
/// The format version this code reads and writes.
pub const VERSION: u32 = 1;

/// Errors reading or validating a trace.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// File path.
        path: String,
        /// OS error.
        source: std::io::Error,
    },
    /// Neither encoding's magic was found.
    #[error("not an expert trace (expected \"{TEXT_MAGIC} 1 ...\" or binary magic EXPTRACE)")]
    BadMagic,
    /// A version this code does not read.
    #[error("unsupported trace version {0} (this build reads version {VERSION})")]
    Version(u32),
    /// Malformed text.
    #[error("line {line}: {msg}")]
    Parse {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        msg: String,
    },
    /// The binary data ends early or has extra bytes.
    #[error("binary trace: {0}")]
    Binary(String),
    /// Shape or ids out of range.
    #[error("invalid trace: {0}")]
    Invalid(String),
}

/// A routing trace held in memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trace {
    /// MoE layers.
    pub layers: u32,
    /// Experts per layer.
    pub experts: u32,
    /// Experts selected per token and layer.
    pub used: u32,
    /// `tokens * layers * used` ids, token-major.
    pub ids: Vec<u16>,
}

/// Most MoE layers a trace may have (llama.cpp's limit is 512).
pub const MAX_LAYERS: u32 = 4096;

/// Largest Zipf exponent `generate` takes: real routers measure about 0.3-1, and much
/// steeper popularity leaves the rarest ranks too unlikely to draw the distinct experts
/// a token needs in reasonable time.
pub const MAX_ZIPF: f64 = 2.0;

/// Writes `data` to `path` atomically: written and synced aside (`PATH.tmp.PID.N`, N
/// counting this process's writes, so two threads never share one), then renamed over,
/// so the path holds the old file or the whole new one; a failure leaves no temp file
/// behind. For traces and their sidecars.
pub fn write_synced(path: &Path, data: &[u8]) -> std::io::Result<()> {
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(
        ".tmp.{}.{}",
        std::process::id(),
        WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let written = (|| {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    written.inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

impl Trace {
    /// An empty trace of the given shape (validated).
    pub fn new(layers: u32, experts: u32, used: u32) -> Result<Self, TraceError> {
        if layers == 0
            || layers > MAX_LAYERS
            || experts == 0
            || used == 0
            || experts > 65536
            || used > experts
        {
            return Err(TraceError::Invalid(format!(
                "shape layers={layers} experts={experts} used={used}: need 1 <= layers <= \
                 {MAX_LAYERS}, used >= 1, used <= experts <= 65536"
            )));
        }
        Ok(Trace {
            layers,
            experts,
            used,
            ids: Vec::new(),
        })
    }

    /// Number of tokens.
    pub fn tokens(&self) -> usize {
        self.ids.len() / (self.layers as usize * self.used as usize)
    }

    /// The experts of `token` in `layer`.
    pub fn get(&self, token: usize, layer: usize) -> &[u16] {
        let k = self.used as usize;
        let start = (token * self.layers as usize + layer) * k;
        &self.ids[start..start + k]
    }

    /// Appends one token: `per_layer[l]` are its experts in layer `l`.
    pub fn push_token(&mut self, per_layer: &[Vec<u16>]) -> Result<(), TraceError> {
        if per_layer.len() != self.layers as usize {
            return Err(TraceError::Invalid(format!(
                "token has {} layers, trace has {}",
                per_layer.len(),
                self.layers
            )));
        }
        for (l, ids) in per_layer.iter().enumerate() {
            check_group(ids, self.experts, self.used).map_err(|m| {
                TraceError::Invalid(format!("token {} layer {l}: {m}", self.tokens()))
            })?;
        }
        for ids in per_layer {
            self.ids.extend_from_slice(ids);
        }
        Ok(())
    }

    /// Parses either encoding.
    pub fn parse(bytes: &[u8]) -> Result<Self, TraceError> {
        if bytes.starts_with(BINARY_MAGIC) {
            Self::parse_binary(bytes)
        } else if bytes.starts_with(TEXT_MAGIC.as_bytes()) {
            let text = std::str::from_utf8(bytes).map_err(|e| TraceError::Parse {
                line: 0,
                msg: format!("not UTF-8: {e}"),
            })?;
            Self::parse_text(text)
        } else {
            Err(TraceError::BadMagic)
        }
    }

    /// Reads a trace file of either encoding.
    pub fn read(path: &Path) -> Result<Self, TraceError> {
        let bytes = std::fs::read(path).map_err(|source| TraceError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&bytes)
    }

    /// Writes the trace atomically (temp file + rename), binary or text.
    pub fn write(&self, path: &Path, text: bool) -> Result<(), TraceError> {
        let data = if text {
            self.to_text().into_bytes()
        } else {
            self.to_binary()
        };
        write_synced(path, &data).map_err(|source| TraceError::Io {
            path: path.display().to_string(),
            source,
        })
    }

    /// The text encoding.
    pub fn to_text(&self) -> String {
        let mut s = format!(
            "{TEXT_MAGIC} {VERSION} layers={} experts={} used={}\n",
            self.layers, self.experts, self.used
        );
        for t in 0..self.tokens() {
            for l in 0..self.layers as usize {
                if l > 0 {
                    s.push_str(" |");
                }
                for (j, id) in self.get(t, l).iter().enumerate() {
                    if l > 0 || j > 0 {
                        s.push(' ');
                    }
                    let _ = write!(s, "{id}");
                }
            }
            s.push('\n');
        }
        s
    }

    /// The binary encoding.
    pub fn to_binary(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(32 + self.ids.len() * 2);
        v.extend_from_slice(BINARY_MAGIC);
        v.extend_from_slice(&VERSION.to_le_bytes());
        v.extend_from_slice(&self.layers.to_le_bytes());
        v.extend_from_slice(&self.experts.to_le_bytes());
        v.extend_from_slice(&self.used.to_le_bytes());
        v.extend_from_slice(&(self.tokens() as u64).to_le_bytes());
        for id in &self.ids {
            v.extend_from_slice(&id.to_le_bytes());
        }
        v
    }

    fn parse_binary(b: &[u8]) -> Result<Self, TraceError> {
        if b.len() < 32 {
            return Err(TraceError::Binary(format!(
                "header needs 32 bytes, file has {}",
                b.len()
            )));
        }
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let version = u32_at(8);
        if version != VERSION {
            return Err(TraceError::Version(version));
        }
        let mut t = Trace::new(u32_at(12), u32_at(16), u32_at(20))?;
        let tokens = u64::from_le_bytes(b[24..32].try_into().expect("8 bytes"));
        let n = (tokens as u128) * u128::from(t.layers) * u128::from(t.used);
        let want = n * 2;
        let have = (b.len() - 32) as u128;
        if have != want {
            return Err(TraceError::Binary(format!(
                "{tokens} tokens need {want} bytes of ids, file has {have}"
            )));
        }
        t.ids = b[32..]
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        let k = t.used as usize;
        for (g, ids) in t.ids.chunks_exact(k).enumerate() {
            check_group(ids, t.experts, t.used).map_err(|m| {
                TraceError::Invalid(format!(
                    "token {} layer {}: {m}",
                    g / t.layers as usize,
                    g % t.layers as usize
                ))
            })?;
        }
        Ok(t)
    }

    fn parse_text(text: &str) -> Result<Self, TraceError> {
        let mut lines = text.lines().enumerate();
        let (_, header) = lines.next().ok_or(TraceError::BadMagic)?;
        let perr = |line: usize, msg: String| TraceError::Parse {
            line: line + 1,
            msg,
        };
        let mut words = header.split_whitespace();
        if words.next() != Some(TEXT_MAGIC) {
            return Err(TraceError::BadMagic);
        }
        let version: u32 = words
            .next()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| perr(0, "missing version after expert-trace".into()))?;
        if version != VERSION {
            return Err(TraceError::Version(version));
        }
        let (mut layers, mut experts, mut used) = (None, None, None);
        for w in words {
            let (k, v) = w
                .split_once('=')
                .ok_or_else(|| perr(0, format!("expected key=value, got {w:?}")))?;
            let v: u32 = v
                .parse()
                .map_err(|_| perr(0, format!("{k}: not a number: {v:?}")))?;
            match k {
                "layers" => layers = Some(v),
                "experts" => experts = Some(v),
                "used" => used = Some(v),
                _ => return Err(perr(0, format!("unknown header key {k:?}"))),
            }
        }
        let (Some(layers), Some(experts), Some(used)) = (layers, experts, used) else {
            return Err(perr(0, "header needs layers=, experts= and used=".into()));
        };
        let mut t = Trace::new(layers, experts, used)?;
        for (i, line) in lines {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let groups: Vec<&str> = line.split('|').collect();
            if groups.len() != layers as usize {
                return Err(perr(
                    i,
                    format!("{} layer groups, header says {layers}", groups.len()),
                ));
            }
            for (l, g) in groups.iter().enumerate() {
                let ids: Vec<u16> = g
                    .split_whitespace()
                    .map(|w| {
                        w.parse::<u16>()
                            .map_err(|_| perr(i, format!("bad expert id {w:?}")))
                    })
                    .collect::<Result<_, _>>()?;
                check_group(&ids, experts, used).map_err(|m| perr(i, format!("layer {l}: {m}")))?;
                t.ids.extend_from_slice(&ids);
            }
        }
        Ok(t)
    }
}

fn check_group(ids: &[u16], experts: u32, used: u32) -> Result<(), String> {
    if ids.len() != used as usize {
        return Err(format!("{} ids, expected {used}", ids.len()));
    }
    for (j, &id) in ids.iter().enumerate() {
        if u32::from(id) >= experts {
            return Err(format!("expert id {id} >= experts ({experts})"));
        }
        if ids[..j].contains(&id) {
            return Err(format!("expert id {id} repeated"));
        }
    }
    Ok(())
}

/// A small deterministic PRNG (SplitMix64) for the generator; no external dependency.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform in 0..n.
    pub fn below(&mut self, n: usize) -> usize {
        (self.f64() * n as f64) as usize % n.max(1)
    }
}

/// Parameters of a synthetic trace.
#[derive(Debug, Clone, PartialEq)]
pub struct GenParams {
    /// MoE layers.
    pub layers: u32,
    /// Experts per layer.
    pub experts: u32,
    /// Experts per token.
    pub used: u32,
    /// Tokens.
    pub tokens: u32,
    /// Consecutive-token reuse: layer `l` gets `lo + (hi - lo) * l / (layers - 1)`.
    pub reuse: (f64, f64),
    /// Zipf exponent of expert popularity (0 = uniform).
    pub zipf: f64,
    /// Seed.
    pub seed: u64,
}

/// Generates a trace: each layer has its own random popularity order with Zipf(s)
/// weights; at every token each expert of the previous token is kept with probability
/// `reuse` (so the expected consecutive-token reuse is `reuse`), and the rest are drawn
/// by popularity among experts not used by the previous token (when there are enough
/// experts, else among all).
pub fn generate(p: &GenParams) -> Result<Trace, TraceError> {
    let mut t = Trace::new(p.layers, p.experts, p.used)?;
    let mut rng = Rng::new(p.seed ^ 0x005E_ED0F_E79E);
    let g = Generator::new(p, &mut rng)?;
    let mut prev: Vec<Vec<u16>> = vec![Vec::new(); p.layers as usize];
    let mut cur: Vec<Vec<u16>> = vec![Vec::new(); p.layers as usize];
    for _ in 0..p.tokens {
        for l in 0..p.layers as usize {
            g.step(l, &prev[l], &mut cur[l], &mut rng);
        }
        t.push_token(&cur)?;
        std::mem::swap(&mut prev, &mut cur);
    }
    Ok(t)
}

/// What [`generate`] draws from besides its random stream: per layer a popularity order
/// and the CDF of Zipf weights over ranks, and the reuse per layer.
struct Generator {
    experts: usize,
    used: usize,
    layers: u32,
    reuse: (f64, f64),
    cdf: Vec<f64>,
    /// Per layer: popularity rank -> expert id.
    perms: Vec<Vec<u16>>,
    /// Fresh draws skip the previous token's experts (when there are enough experts).
    exclude_prev: bool,
}

impl Generator {
    /// Checks `p` and draws the popularity orders from `rng`.
    fn new(p: &GenParams, rng: &mut Rng) -> Result<Generator, TraceError> {
        if !(0.0..=1.0).contains(&p.reuse.0)
            || !(0.0..=1.0).contains(&p.reuse.1)
            || !(0.0..=MAX_ZIPF).contains(&p.zipf)
        {
            return Err(TraceError::Invalid(format!(
                "reuse must be in 0..=1 and zipf in 0..={MAX_ZIPF}"
            )));
        }
        if p.tokens == 0 {
            return Err(TraceError::Invalid("tokens must be at least 1".into()));
        }
        let (e, k) = (p.experts as usize, p.used as usize);
        let weights: Vec<f64> = (1..=e).map(|r| (r as f64).powf(-p.zipf)).collect();
        let sum: f64 = weights.iter().sum();
        let cdf: Vec<f64> = weights
            .iter()
            .scan(0.0, |acc, w| {
                *acc += w / sum;
                Some(*acc)
            })
            .collect();
        let perms: Vec<Vec<u16>> = (0..p.layers)
            .map(|_| {
                let mut v: Vec<u16> = (0..e as u32).map(|x| x as u16).collect();
                for i in (1..e).rev() {
                    v.swap(i, rng.below(i + 1));
                }
                v
            })
            .collect();
        Ok(Generator {
            experts: e,
            used: k,
            layers: p.layers,
            reuse: p.reuse,
            cdf,
            perms,
            exclude_prev: e >= 2 * k,
        })
    }

    fn reuse_of(&self, l: usize) -> f64 {
        if self.layers <= 1 {
            self.reuse.0
        } else {
            self.reuse.0 + (self.reuse.1 - self.reuse.0) * l as f64 / f64::from(self.layers - 1)
        }
    }

    /// Draws layer `l`'s experts of the token after one that used `prev` into `c`.
    fn step(&self, l: usize, prev: &[u16], c: &mut Vec<u16>, rng: &mut Rng) {
        let r = self.reuse_of(l);
        c.clear();
        for &x in prev {
            if rng.f64() < r {
                c.push(x);
            }
        }
        while c.len() < self.used {
            let u = rng.f64();
            let rank = self.cdf.partition_point(|&q| q < u).min(self.experts - 1);
            let x = self.perms[l][rank];
            if c.contains(&x) || (self.exclude_prev && prev.contains(&x)) {
                continue;
            }
            c.push(x);
        }
    }
}

/// An upper bound on the hit rate of every online eviction policy (demand fills only,
/// any rule, even one that knows the generator) on the trace [`generate`] writes for
/// `p`, for each slot count in `slots` (each at least `p.used`).
///
/// Before the request of token t + 1 a layer's slots hold the experts of token t (a
/// request makes all of its experts resident and nothing is read between requests) and
/// at most `slots - used` others. The generator is Markov in the previous token's
/// experts, so whatever a policy knows, its expected hits on token t + 1 are at most
/// `sum of P(e used at t + 1 | token t)` over token t's experts plus the `slots - used`
/// largest such probabilities among the other experts. Summed over the trace (token 0,
/// all misses, is left out) and divided by the requested experts, that is the bound. The
/// probabilities of experts outside token t are estimated from `samples` draws of the
/// next token (a separate random stream; the trace is the same as [`generate`]'s); the
/// estimate's noise biases the top-k sums up, so the bound stays an upper bound.
/// Token t's experts come back with exactly the layer's reuse probability when fresh
/// draws exclude them (enough experts); otherwise they are sampled too.
pub fn online_bound(p: &GenParams, slots: &[u32], samples: u32) -> Result<Vec<f64>, TraceError> {
    if let Some(&n) = slots.iter().find(|&&n| n < p.used || n > p.experts) {
        return Err(TraceError::Invalid(format!(
            "slots {n} not in {}..={}",
            p.used, p.experts
        )));
    }
    if samples == 0 {
        return Err(TraceError::Invalid("samples must be > 0".into()));
    }
    Trace::new(p.layers, p.experts, p.used)?;
    let mut rng = Rng::new(p.seed ^ 0x005E_ED0F_E79E);
    let g = Generator::new(p, &mut rng)?;
    let mut mc = Rng::new(p.seed ^ 0x0B0D_1DEA_5EED);
    let (e, k) = (g.experts, g.used);
    let mut prev: Vec<Vec<u16>> = vec![Vec::new(); p.layers as usize];
    let mut cur: Vec<Vec<u16>> = vec![Vec::new(); p.layers as usize];
    let mut expected = vec![0.0f64; slots.len()];
    let mut requested = 0u64;
    let mut count = vec![0u32; e];
    let mut draw = Vec::with_capacity(k);
    let mut others = Vec::with_capacity(e);
    for t in 0..p.tokens {
        for l in 0..p.layers as usize {
            if t > 0 {
                let before = &prev[l];
                count.iter_mut().for_each(|c| *c = 0);
                for _ in 0..samples {
                    g.step(l, before, &mut draw, &mut mc);
                    for &x in &draw {
                        count[x as usize] += 1;
                    }
                }
                let prob = |x: usize| f64::from(count[x]) / f64::from(samples);
                let held: f64 = if g.exclude_prev {
                    g.reuse_of(l) * before.len() as f64
                } else {
                    before.iter().map(|&x| prob(x as usize)).sum()
                };
                others.clear();
                others.extend((0..e).filter(|&x| !before.contains(&(x as u16))).map(prob));
                others.sort_by(|a, b| b.total_cmp(a));
                for (i, &n) in slots.iter().enumerate() {
                    let free = (n as usize).saturating_sub(before.len());
                    expected[i] += held + others.iter().take(free).sum::<f64>();
                }
                requested += k as u64;
            }
            g.step(l, &prev[l], &mut cur[l], &mut rng);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    Ok(expected
        .into_iter()
        .map(|x| {
            if requested == 0 {
                0.0
            } else {
                x / requested as f64
            }
        })
        .collect())
}

/// Statistics of one layer of a trace.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LayerTraceStats {
    /// Layer index in the trace.
    pub layer: u32,
    /// Mean fraction of a token's experts that the previous token also used.
    pub reuse: f64,
    /// Share of all selections that go to the most popular 10% of experts.
    pub top10_share: f64,
    /// Zipf exponent fitted to the rank-frequency curve (least squares in log-log).
    pub zipf_s: f64,
    /// LRU hit rate with a quarter of the experts as slots (at least `used`).
    pub lru_hit_rate_25: f64,
}

/// Per-layer statistics of a trace.
pub fn stats(t: &Trace) -> Vec<LayerTraceStats> {
    let (e, k) = (t.experts as usize, t.used as usize);
    let slots = ((t.experts as usize).div_ceil(4)).max(k) as u32;
    let lru = crate::sim::simulate_per_layer(t, slots, crate::policy::PolicyKind::Lru)
        .expect("slots >= used");
    (0..t.layers as usize)
        .map(|l| {
            let mut counts = vec![0u64; e];
            let mut reused = 0u64;
            for tok in 0..t.tokens() {
                let ids = t.get(tok, l);
                for &x in ids {
                    counts[x as usize] += 1;
                }
                if tok > 0 {
                    let prev = t.get(tok - 1, l);
                    reused += ids.iter().filter(|x| prev.contains(x)).count() as u64;
                }
            }
            let reuse = if t.tokens() > 1 {
                reused as f64 / ((t.tokens() - 1) * k) as f64
            } else {
                0.0
            };
            counts.sort_unstable_by(|a, b| b.cmp(a));
            let total: u64 = counts.iter().sum();
            let top = (e.div_ceil(10)).max(1);
            let top10_share = if total == 0 {
                0.0
            } else {
                counts[..top].iter().sum::<u64>() as f64 / total as f64
            };
            let (hits, misses) = lru[l];
            LayerTraceStats {
                layer: l as u32,
                reuse,
                top10_share,
                zipf_s: fit_zipf(&counts),
                lru_hit_rate_25: if hits + misses == 0 {
                    0.0
                } else {
                    hits as f64 / (hits + misses) as f64
                },
            }
        })
        .collect()
}

/// Fits `count(rank) ~ rank^-s` by least squares on log-log over nonzero counts.
fn fit_zipf(sorted_desc: &[u64]) -> f64 {
    let pts: Vec<(f64, f64)> = sorted_desc
        .iter()
        .enumerate()
        .filter(|(_, c)| **c > 0)
        .map(|(i, &c)| (((i + 1) as f64).ln(), (c as f64).ln()))
        .collect();
    if pts.len() < 2 {
        return 0.0;
    }
    let n = pts.len() as f64;
    let mx = pts.iter().map(|p| p.0).sum::<f64>() / n;
    let my = pts.iter().map(|p| p.1).sum::<f64>() / n;
    let sxy: f64 = pts.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let sxx: f64 = pts.iter().map(|p| (p.0 - mx).powi(2)).sum();
    if sxx == 0.0 { 0.0 } else { -sxy / sxx }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_and_binary_round_trip() {
        let text = "expert-trace 1 layers=2 experts=8 used=2\n# c\n0 3 | 5 1\n\n0 4 | 5 2\n";
        let t = Trace::parse(text.as_bytes()).unwrap();
        assert_eq!(t.tokens(), 2);
        assert_eq!(t.get(1, 1), &[5, 2]);
        assert_eq!(Trace::parse(t.to_text().as_bytes()).unwrap(), t);
        assert_eq!(Trace::parse(&t.to_binary()).unwrap(), t);
    }

    #[test]
    fn bad_traces_are_rejected_with_a_reason() {
        let cases: &[(&str, &str)] = &[
            ("nope", "not an expert trace"),
            ("expert-trace 2 layers=1 experts=4 used=1\n", "version 2"),
            ("expert-trace 1 layers=1 experts=4\n", "needs layers"),
            (
                "expert-trace 1 layers=2 experts=4 used=1\n1\n",
                "1 layer groups",
            ),
            (
                "expert-trace 1 layers=1 experts=4 used=2\n1 1\n",
                "repeated",
            ),
            (
                "expert-trace 1 layers=1 experts=4 used=1\n4\n",
                ">= experts",
            ),
            (
                "expert-trace 1 layers=1 experts=4 used=1\nx\n",
                "bad expert id",
            ),
            // a tiny file must not make the tools loop over billions of layers
            (
                "expert-trace 1 layers=4000000000 experts=1 used=1\n",
                "layers <= 4096",
            ),
        ];
        for (text, want) in cases {
            let err = Trace::parse(text.as_bytes()).unwrap_err().to_string();
            assert!(err.contains(want), "{text:?}: {err}");
        }
        let t = Trace::parse(b"expert-trace 1 layers=1 experts=4 used=1\n1\n2\n").unwrap();
        let mut b = t.to_binary();
        b.pop();
        assert!(Trace::parse(&b).unwrap_err().to_string().contains("need"));
    }

    #[test]
    fn generator_hits_its_targets() {
        let p = GenParams {
            layers: 4,
            experts: 128,
            used: 8,
            tokens: 4000,
            reuse: (0.25, 0.45),
            zipf: 0.65,
            seed: 7,
        };
        let t = generate(&p).unwrap();
        let s = stats(&t);
        assert!((s[0].reuse - 0.25).abs() < 0.02, "{:?}", s[0]);
        assert!((s[3].reuse - 0.45).abs() < 0.02, "{:?}", s[3]);
        for l in &s {
            assert!(l.zipf_s > 0.3 && l.zipf_s < 1.0, "{l:?}");
            assert!(l.top10_share > 0.15, "{l:?}");
        }
        // Same seed, same trace.
        assert_eq!(generate(&p).unwrap(), t);
    }

    /// Parameters the generator cannot draw from in reasonable time (the rarest ranks of
    /// a steep or NaN popularity are never drawn) or that make an empty trace are refused.
    #[test]
    fn the_generator_refuses_what_it_cannot_draw() {
        let ok = GenParams {
            layers: 2,
            experts: 16,
            used: 4,
            tokens: 10,
            reuse: (0.3, 0.3),
            zipf: MAX_ZIPF,
            seed: 1,
        };
        assert_eq!(
            generate(&ok).unwrap().tokens(),
            10,
            "the steepest allowed draws"
        );
        for zipf in [f64::NAN, f64::INFINITY, 20.0, -0.1] {
            let err = generate(&GenParams { zipf, ..ok.clone() })
                .unwrap_err()
                .to_string();
            assert!(err.contains("zipf in 0..=2"), "{zipf}: {err}");
        }
        let err = generate(&GenParams {
            tokens: 0,
            ..ok.clone()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("tokens must be at least 1"), "{err}");
    }
}

/// Records the routing a pool serves into a [`Trace`] (`--expert-pool-trace`; the file
/// is a [`TraceFile`]). The pool calls [`Recorder::record`] for every served request
/// or stage call; a token enters the trace once every registered layer has reported it
/// within one ubatch (layers in registration order, the first one starting a ubatch).
/// Ubatches whose layers saw different token counts are left out and counted in
/// [`Recorder::dropped`]: llama.cpp's last layer computes only the output rows of a
/// prompt, so in practice the trace holds the generated tokens and single-token steps.
#[derive(Default)]
pub struct Recorder {
    trace: Option<Trace>,
    /// Ids of the ubatch being assembled, per layer position.
    pending: Vec<Option<Vec<u16>>>,
    /// Tokens of that ubatch; `None` once its layers disagree.
    pending_tokens: Option<usize>,
    /// Ubatches left out.
    pub dropped: u64,
}

impl Recorder {
    /// The trace so far (`None` before the first recorded ubatch).
    pub fn trace(&self) -> Option<&Trace> {
        self.trace.as_ref()
    }

    /// Records a ubatch of `layer`, one of `order` (the registered layers in model
    /// order). `ids` holds `n_tokens` rows of `n_used` ids, `stride` apart.
    #[allow(clippy::too_many_arguments)]
    pub fn record(
        &mut self,
        order: &[i32],
        layer: i32,
        n_experts: u32,
        ids: &[i32],
        n_used: usize,
        n_tokens: usize,
        stride: usize,
    ) {
        let Some(pos) = order.iter().position(|&l| l == layer) else {
            return;
        };
        if self.trace.is_none() {
            match Trace::new(order.len() as u32, n_experts, n_used as u32) {
                Ok(t) => self.trace = Some(t),
                Err(_) => {
                    self.dropped += 1;
                    return;
                }
            }
        }
        let trace = self.trace.as_mut().expect("set above");
        if trace.used as usize != n_used || trace.layers as usize != order.len() {
            self.dropped += 1;
            return;
        }
        if pos == 0 || self.pending.len() != order.len() {
            if self.pending.iter().any(Option::is_some) {
                self.dropped += 1;
            }
            self.pending = vec![None; order.len()];
            self.pending_tokens = Some(n_tokens);
        }
        if self.pending[pos].is_some() || self.pending_tokens != Some(n_tokens) {
            self.pending_tokens = None;
        }
        let mut rows = Vec::with_capacity(n_tokens * n_used);
        for t in 0..n_tokens {
            let row = &ids[t * stride..t * stride + n_used];
            rows.extend(row.iter().map(|&e| e as u16));
        }
        self.pending[pos] = Some(rows);
        if pos + 1 < order.len() {
            return;
        }
        let pending = std::mem::take(&mut self.pending);
        let Some(n) = self.pending_tokens.take() else {
            self.dropped += 1;
            return;
        };
        let layers: Option<Vec<Vec<u16>>> = pending.into_iter().collect();
        let Some(layers) = layers else {
            self.dropped += 1;
            return;
        };
        for t in 0..n {
            let per_layer: Vec<Vec<u16>> = layers
                .iter()
                .map(|rows| rows[t * n_used..(t + 1) * n_used].to_vec())
                .collect();
            if trace.push_token(&per_layer).is_err() {
                self.dropped += 1;
                return;
            }
        }
    }
}

/// The file a [`Recorder`]'s trace is written to, shared by every thread that writes it
/// (the pool's publisher thread, `publish_stats`, the pool's drop). It keeps its own copy
/// of the trace: [`TraceFile::sync_from`], called under the pool's lock, appends only the
/// tokens the copy lacks; [`TraceFile::write`], called without it, writes the copy
/// atomically. Writes are serialised and never replace the file with fewer tokens.
pub struct TraceFile {
    path: std::path::PathBuf,
    /// The copy and the tokens in the file; held only briefly (never during I/O).
    state: std::sync::Mutex<(Option<Trace>, usize)>,
    /// Held for the length of a write, so writes land in order.
    writing: std::sync::Mutex<()>,
}

impl TraceFile {
    /// The trace file at `path` (nothing is written until there is a token).
    pub fn new(path: std::path::PathBuf) -> TraceFile {
        TraceFile {
            path,
            state: std::sync::Mutex::new((None, 0)),
            writing: std::sync::Mutex::new(()),
        }
    }

    /// Takes the tokens `rec` has that the copy lacks (all of them if its shape changed).
    pub fn sync_from(&self, rec: &Recorder) {
        let Some(t) = rec.trace() else {
            return;
        };
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        match &mut state.0 {
            Some(c) if (c.layers, c.experts, c.used) == (t.layers, t.experts, t.used) => {
                let per_token = (c.layers * c.used) as usize;
                if let Some(new) = t.ids.get(c.tokens() * per_token..) {
                    c.ids.extend_from_slice(new);
                }
            }
            copy => *copy = Some(t.clone()),
        }
    }

    /// Writes the copy if it holds more tokens than the file (also after a failed write:
    /// the next call tries again). Nothing to write is not an error.
    pub fn write(&self) -> Result<(), TraceError> {
        let poisoned = || TraceError::Invalid("a trace writer panicked".into());
        let _order = self.writing.lock().map_err(|_| poisoned())?;
        let (data, tokens) = {
            let state = self.state.lock().map_err(|_| poisoned())?;
            match &state.0 {
                Some(c) if c.tokens() > state.1 => (c.to_binary(), c.tokens()),
                _ => return Ok(()),
            }
        };
        write_synced(&self.path, &data).map_err(|source| TraceError::Io {
            path: self.path.display().to_string(),
            source,
        })?;
        self.state.lock().map_err(|_| poisoned())?.1 = tokens;
        Ok(())
    }
}

#[cfg(test)]
mod recorder_tests {
    use super::*;

    #[test]
    fn tokens_enter_once_every_layer_reported_and_uneven_ubatches_are_dropped() {
        let dir = std::env::temp_dir().join(format!("ep-rec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.bin");
        let mut r = Recorder::default();
        let order = [1, 3];
        // A two-token ubatch, both layers.
        r.record(&order, 1, 8, &[0, 1, 2, 3], 2, 2, 2);
        assert_eq!(r.trace().unwrap().tokens(), 0);
        r.record(&order, 3, 8, &[4, 5, 6, 7], 2, 2, 2);
        assert_eq!(r.trace().unwrap().tokens(), 2);
        assert_eq!(r.trace().unwrap().get(1, 1), &[6, 7]);
        // A prompt whose last layer saw only the output row: dropped.
        r.record(&order, 1, 8, &[0, 1, 2, 3], 2, 2, 2);
        r.record(&order, 3, 8, &[5, 6], 2, 1, 2);
        assert_eq!(r.trace().unwrap().tokens(), 2);
        assert_eq!(r.dropped, 1);
        // Strided rows (ggml views): row t at t * stride.
        r.record(&order, 1, 8, &[1, 2, 9, 9], 2, 1, 4);
        r.record(&order, 3, 8, &[3, 4, 9, 9], 2, 1, 4);
        assert_eq!(r.trace().unwrap().get(2, 0), &[1, 2]);
        let file = TraceFile::new(path.clone());
        file.write().unwrap();
        assert!(!path.exists(), "nothing synced yet, nothing written");
        file.sync_from(&r);
        file.write().unwrap();
        let back = Trace::read(&path).unwrap();
        assert_eq!(back.tokens(), 3);
        // A write of no more tokens than the file has is skipped.
        std::fs::remove_file(&path).unwrap();
        file.sync_from(&r);
        file.write().unwrap();
        assert!(!path.exists());
        // New tokens are appended to the copy, and written.
        r.record(&order, 1, 8, &[6, 7], 2, 1, 2);
        r.record(&order, 3, 8, &[0, 5], 2, 1, 2);
        file.sync_from(&r);
        file.write().unwrap();
        let back = Trace::read(&path).unwrap();
        assert_eq!(back.ids, r.trace().unwrap().ids);
        assert_eq!(back.tokens(), 4);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
