//! Fill throughput of expert-sized reads through the pool: every request needs `depth`
//! experts that are not resident (all misses, one batch of `depth` reads), experts at
//! 32-byte aligned (not page aligned) offsets, copied into pool-owned slot memory.
//!
//! Run (the bench/pool_fill.sh script does this, with fio as the baseline):
//! `cargo bench -p expert-pool --bench pool_fill -- FILE EXPERT_BYTES DEPTH SECONDS [MODE] [PIPE] [LAYOUT]`
//! MODE: auto (io_uring + O_DIRECT, default), uring-buffered, pread.
//! PIPE: `sync` (default): each request waits for its own batch of `depth` misses;
//! `pipe`: two layers alternate as an engine with prefetch would run them: while a
//! request of one layer waits, the next batch is already prefetched for the other, so
//! about `2 * depth` reads stay in flight.
//! LAYOUT: `spaced` (default; experts 32 bytes apart, copied into the slots) or `gguf`
//! (experts back to back in whole pages, as in GGUF files: read straight into the slots).
//! Prints one line: `pool_fill bytes=.. depth=.. mode=.. direct=.. MiB/s=.. reads=..`.

use std::time::{Duration, Instant};

use expert_pool::io::IoMode;
use expert_pool::trace::Rng;
use expert_pool::{LayerSpec, Pool, PoolConfig, ProjSpec};

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    if args.len() < 4 {
        eprintln!(
            "usage: pool_fill FILE EXPERT_BYTES DEPTH SECONDS [auto|uring-buffered|pread] [sync|pipe] [spaced|gguf]"
        );
        // `cargo bench` without arguments: nothing to measure, say so and succeed.
        println!("pool_fill: no arguments given; see bench/pool_fill.sh");
        return;
    }
    let path = std::path::PathBuf::from(&args[0]);
    let bytes: u64 = args[1].parse().expect("EXPERT_BYTES");
    let depth: u32 = args[2].parse().expect("DEPTH");
    let secs: f64 = args[3].parse().expect("SECONDS");
    let mode = match args.get(4).map(String::as_str).unwrap_or("auto") {
        "auto" => IoMode::Auto,
        "uring-buffered" => IoMode::UringBuffered,
        "pread" => IoMode::Pread,
        m => panic!("unknown mode {m}"),
    };
    let size = std::fs::metadata(&path).expect("FILE").len();
    // LAYOUT `spaced` (default): consecutive experts start 32-aligned, not page aligned,
    // so each read's bytes are copied into its slot; `gguf`: as in GGUF files, experts
    // follow each other (sizes that are whole pages) from a tensor 128 bytes into a page,
    // so the pool reads the file straight into its slots.
    let gguf = args.get(6).map(String::as_str) == Some("gguf");
    let (stride, offset) = if gguf {
        assert!(bytes % 4096 == 0, "the gguf layout needs whole pages");
        (bytes, 4096 + 128)
    } else {
        (bytes + 32, 4096 + 96)
    };
    let n_experts = ((size - offset) / stride) as u32;
    assert!(
        n_experts > 4 * depth,
        "file too small for {depth} x {bytes}"
    );
    let pool = Pool::new(PoolConfig {
        io_mode: mode,
        queue_depth: depth.max(8) * 2,
        ..Default::default()
    })
    .unwrap();
    let pipe = args.get(5).map(String::as_str) == Some("pipe");
    let f = pool.add_file(&path).unwrap();
    for layer in 0..2 {
        let projs = vec![ProjSpec {
            file: f,
            offset,
            stride,
            bytes,
        }];
        let spec = LayerSpec {
            layer,
            n_experts,
            n_slots: 2 * depth,
            projs,
        };
        pool.add_layer(&spec, None).unwrap();
    }
    let mut rng = Rng::new(0xF111);
    let mut ids = vec![0i32; depth as usize];
    let mut next = vec![0i32; depth as usize];
    let mut out = vec![0i32; depth as usize];
    let mut layer = 0;
    let t = Instant::now();
    let limit = Duration::from_secs_f64(secs);
    let mut lat_us: Vec<u32> = Vec::new();
    let mut pick = |v: &mut Vec<i32>| {
        for j in 0..v.len() {
            loop {
                let e = rng.below(n_experts as usize) as i32;
                if !v[..j].contains(&e) {
                    v[j] = e;
                    break;
                }
            }
        }
    };
    pick(&mut ids);
    if pipe {
        pool.prefetch(layer, &ids).unwrap();
    }
    let d = depth as usize;
    while t.elapsed() < limit {
        if pipe {
            // The other layer's next batch is read while this one is waited for.
            pick(&mut next);
            pool.prefetch(1 - layer, &next).unwrap();
        }
        let r0 = Instant::now();
        pool.request(layer, &ids, d, 1, d, &mut out).unwrap();
        lat_us.push(r0.elapsed().as_micros() as u32);
        if pipe {
            std::mem::swap(&mut ids, &mut next);
            layer = 1 - layer;
        } else {
            pick(&mut ids);
        }
    }
    lat_us.sort_unstable();
    let pct = |p: f64| {
        lat_us
            .get(((lat_us.len() as f64 - 1.0) * p) as usize)
            .copied()
            .unwrap_or(0)
    };
    let el = t.elapsed().as_secs_f64();
    let c = pool.counters(None).unwrap();
    println!(
        "pool_fill bytes={bytes} depth={depth} mode={} pipe={pipe} layout={} direct={} MiB/s={:.1} reads={} hits={} stall_share={:.3} copy_share={:.3} p50_us={} p99_us={}",
        args.get(4).map(String::as_str).unwrap_or("auto"),
        if gguf { "gguf" } else { "spaced" },
        pool.file_is_direct(f).unwrap(),
        c.bytes_read as f64 / el / (1024.0 * 1024.0),
        c.misses + c.prefetch_issued,
        c.hits + c.inflight_hits,
        c.stall_ns as f64 / 1e9 / el,
        c.copy_ns as f64 / 1e9 / el,
        pct(0.5),
        pct(0.99)
    );
}
