#!/usr/bin/env python3
"""Decode and prefill speed of the expert pool vs stock llama.cpp under memory caps.

For every cap (a cgroup-v1 memory limit; 0 = uncapped) it runs, in this order and with
the page cache dropped before each run:
  stock llama-bench (capped: --repack 0, the setting that fits: with repack stock copies
  every expert into anonymous memory and is OOM-killed under a cap below the model),
  the patched llama-bench with the pool (slots: what the cap leaves after the non-expert
  weights, the staging area and a fixed reserve for buffers),
for decode (-p 0 -n TOKENS) and prefill (-p PROMPT -n 0). The pool starts empty: each
pool decode run makes --reps repetitions in one process (--reps-uncapped uncapped), the
first is reported as the cold start and the median of the last three as warm
(llama-bench's warmup decodes one token before them). The patched llama-bench prints the
pool's counters for every repetition, so the hit rate and the bytes read are those of
the repetitions reported.
The disk's random-read bandwidth for expert-sized reads is measured in the same run
(fio, io_uring, O_DIRECT, depth 8, on the model file; the faster of fio's default
buffers and huge-page buffers, which read faster on a virtualised disk), and the I/O bound
of each pool run is that bandwidth over the expert bytes it read per decoded token.

Needs root (cgroups, drop_caches), fio, the built engines (expertd engine build, and
--stock). Prints a table and writes JSON to bench/out/pool_capped.json.

Usage: bench/pool_capped.py [--caps 1024,1536,2048,0] [--tokens 64] [--prompt 128]
                            [--model PATH] [--threads 2] [--reserve-mib 220] [--prefetch on,off]
                            [--reps 6] [--reps-uncapped 12] [--out FILE]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CG = Path("/sys/fs/cgroup/memory")


def sh(cmd, **kw):
    return subprocess.run(cmd, text=True, capture_output=True, **kw)


def drop_caches():
    subprocess.run(["sync"])
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def expertd():
    for p in [ROOT / "target/release/expertd", ROOT / "target/debug/expertd"]:
        if p.exists():
            return str(p)
    sys.exit("build expertd first: cargo build --release -p expertd")


def model_info(model):
    out = sh([expertd(), "gguf", str(model), "--json"])
    if out.returncode != 0:
        sys.exit(out.stderr)
    return json.loads(out.stdout)["model"]


class Cgroup:
    def __init__(self, limit_mib):
        self.dir = CG / f"expertd-bench-{os.getpid()}"
        self.dir.mkdir(exist_ok=True)
        (self.dir / "memory.limit_in_bytes").write_text(str(limit_mib << 20))
        try:
            (self.dir / "memory.swappiness").write_text("0")
        except OSError:
            pass
        (self.dir / "memory.max_usage_in_bytes").write_text("0")
        (self.dir / "memory.failcnt").write_text("0")

    def wrap(self, cmd):
        return ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self.dir / "cgroup.procs")] + cmd

    def peak_mib(self):
        return int((self.dir / "memory.max_usage_in_bytes").read_text()) / 2**20

    def close(self):
        for _ in range(50):
            try:
                self.dir.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def llama_bench(binary, model, args, cap_mib, threads, reps=1):
    """Runs llama-bench (`reps` repetitions in one process), returns (tokens/s of each
    repetition or None, peak MiB or None, note, the pool's counters during each repetition
    (the patched llama-bench's `expert-pool-rep:` stderr lines; empty without a pool))."""
    cmd = [str(binary), "-m", str(model), "-t", str(threads), "-r", str(reps), "-o", "json"] + args
    cg = Cgroup(cap_mib) if cap_mib else None
    try:
        drop_caches()
        out = sh(cg.wrap(cmd) if cg else cmd)
        peak = cg.peak_mib() if cg else None
    finally:
        if cg:
            cg.close()
    if out.returncode != 0:
        killed = out.returncode in (137, -9)
        return None, peak, ("OOM-killed" if killed else f"exit {out.returncode}: {out.stderr[-300:]}"), []
    res = json.loads(out.stdout)
    pool_reps = [json.loads(line.split(":", 1)[1]) for line in out.stderr.splitlines()
                 if line.startswith("expert-pool-rep:")]
    return res[0]["samples_ts"], peak, "", pool_reps


def pool_summary(reps, disk_bw):
    """Hit rate, expert bytes read per token and the I/O bound over some repetitions."""
    requests = sum(r["requests"] for r in reps)
    hits = sum(r["hits"] + r["inflight_hits"] for r in reps)
    seen = hits + sum(r["misses"] for r in reps)
    tokens = sum(r["n_gen"] or r["n_prompt"] for r in reps)
    read = sum(r["bytes_read"] for r in reps)
    per_token = read / tokens if tokens else None
    return {
        "hit_rate": hits / seen if seen else None,
        "miss_bytes_per_token": per_token,
        "io_bound_tps": disk_bw / per_token if per_token else None,
        "stall_s": sum(r["stall_ns"] for r in reps) / 1e9,
        "requests": requests,
    }


def fio_bandwidth(model, block_kib, seconds=5, mem=None):
    drop_caches()
    out = sh(["fio", "--name=rr", f"--filename={model}", "--rw=randread", f"--bs={block_kib}k",
              "--blockalign=4k", "--ioengine=io_uring", "--direct=1", "--iodepth=8",
              f"--runtime={seconds}", "--time_based", "--output-format=json", "--readonly"]
             + ([f"--mem={mem}"] if mem else []))
    if out.returncode != 0:
        return None
    return json.loads(out.stdout)["jobs"][0]["read"]["bw"] * 1024  # bytes/s


def best_fio_bandwidth(model, block_kib):
    """(best, default buffers, huge-page buffers) in bytes/s: fio with its default
    buffers and with huge-page ones (vm.nr_hugepages raised for the run, then restored)."""
    plain = fio_bandwidth(model, block_kib)
    nr = Path("/proc/sys/vm/nr_hugepages")
    old = nr.read_text().strip()
    try:
        nr.write_text(str(int(old) + 32))
        huge = fio_bandwidth(model, block_kib, mem="shmhuge")
    finally:
        nr.write_text(old)
    return max(plain or 0, huge or 0) or None, plain, huge


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--caps", default="1024,1536,2048,0")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--model", default=str(ROOT / "target/bench/bench.gguf"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reserve-mib", type=int, default=220,
                    help="memory kept for the pool's read and conversion buffers (bounded), compute "
                         "buffers, KV, the binary and page-cache headroom, besides the non-expert "
                         "weights and the staging area")
    ap.add_argument("--policy", default=None)
    ap.add_argument("--prefetch", default="on,off", help="pool runs: prefetch on, off, or both")
    ap.add_argument("--skip-prefill", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench/out/pool_capped.json"), help="JSON results")
    ap.add_argument("--skip-stock", action="store_true", help="pool runs only (while tuning; the table then lacks its baseline)")
    ap.add_argument("--reps", type=int, default=6, help="pool decode repetitions under a cap")
    ap.add_argument("--reps-uncapped", type=int, default=12,
                    help="pool decode repetitions uncapped (every expert has a slot; the rarely "
                         "routed ones take many tokens to be read once)")
    args = ap.parse_args()

    model = Path(args.model)
    if not model.exists():
        model.parent.mkdir(parents=True, exist_ok=True)
        print(f"# generating {model} (expertd synth --preset bench --seed 1)", flush=True)
        subprocess.run([expertd(), "synth", "--preset", "bench", "--seed", "1", "-o", str(model)], check=True)
    info = model_info(model)
    n_layers = info["block_count"]
    n_expert = info["expert_count"]
    expert_bytes = info["expert_bytes"] / (n_layers * n_expert)  # one expert of one layer
    non_expert_mib = info["non_expert_bytes"] / 2**20
    staging_mib = n_expert * expert_bytes / 2**20
    model_mib = info["total_bytes"] / 2**20

    stock = ROOT / "target/engine-stock/cpu/bin/llama-bench"
    patched = ROOT / "target/engine/cpu/bin/llama-bench"
    for b in (stock, patched):
        if not b.exists():
            sys.exit(f"{b} is missing: expertd engine build [--stock]")

    disk_bw, fio_plain, fio_huge = best_fio_bandwidth(model, int(expert_bytes / 1024))
    print(f"# model {model.name}: {model_mib:.0f} MiB, {n_layers} layers x {n_expert} experts of "
          f"{expert_bytes / 2**20:.2f} MiB; non-expert {non_expert_mib:.0f} MiB; staging {staging_mib:.0f} MiB")
    gib = lambda b: f"{b / 2**30:.2f}" if b else "failed"
    print(f"# disk: {disk_bw / 2**30:.2f} GiB/s random {expert_bytes / 1024:.0f} KiB O_DIRECT reads (fio, io_uring, depth 8; "
          f"default buffers {gib(fio_plain)}, huge-page buffers {gib(fio_huge)})")

    rows = []
    stock_uncapped = None
    for cap in [int(c) for c in args.caps.split(",")]:
        if cap:
            budget = cap - non_expert_mib - staging_mib - args.reserve_mib
            slots = int(budget * 2**20 // (n_layers * expert_bytes))
        else:
            slots = n_expert
        slots = max(0, min(slots, n_expert))
        row = {"cap_mib": cap, "slots": slots}
        # Capped stock: --repack 0 (repacking copies every expert into anonymous memory,
        # which a cap below the model cannot hold). One repetition: it only gets slower.
        stock_args = ["--repack", "0"] if cap else []
        tg = ["-p", "0", "-n", str(args.tokens)]
        samples, row["stock_tg_peak_mib"], row["stock_tg_note"] = None, None, "skipped"
        if not args.skip_stock:
            samples, row["stock_tg_peak_mib"], row["stock_tg_note"], _ = llama_bench(
                stock, model, tg + stock_args, cap, args.threads, reps=1 if cap else 3)
        row["stock_tg_samples"] = samples
        row["stock_tg"] = statistics.median(samples) if samples else None
        if cap == 0:
            stock_uncapped = row["stock_tg"]
        for prefetch in args.prefetch.split(","):
            key = f"pool_pf_{prefetch}"
            pool_args = ["--expert-pool-slots", str(slots), "--expert-pool-prefetch", prefetch]
            if args.policy:
                pool_args += ["--expert-pool-policy", args.policy]
            if slots < info["expert_used_count"]:
                row[key] = {"note": f"the cap leaves {slots} slots"}
                continue
            # Repetitions in one process: the pool starts empty. The first repetition is
            # the cold start (after llama-bench's one-token warmup); warm = the median of
            # the last three, with the pool's hit rate and reads during those three.
            reps = args.reps_uncapped if cap == 0 else args.reps
            samples, peak, note, pool_reps = llama_bench(patched, model, tg + pool_args, cap, args.threads, reps=reps)
            r = {"samples": samples, "peak_mib": peak, "note": note, "reps": pool_reps}
            if samples:
                r["cold"] = samples[0]
                r["warm"] = statistics.median(samples[-3:])
            if len(pool_reps) == reps:
                r["cold_pool"] = pool_summary(pool_reps[:1], disk_bw)
                r.update(pool_summary(pool_reps[-3:], disk_bw))
            row[key] = r
        if not args.skip_prefill:
            # Prefill: three repetitions each; the pool's first one starts empty.
            pp = ["-p", str(args.prompt), "-n", "0"]
            samples, row["stock_pp_note"] = None, "skipped"
            if not args.skip_stock:
                samples, _, row["stock_pp_note"], _ = llama_bench(stock, model, pp + stock_args, cap, args.threads, reps=3)
            row["stock_pp_samples"] = samples
            row["stock_pp"] = statistics.median(samples) if samples else None
            if slots >= info["expert_used_count"]:
                samples, _, row["pool_pp_note"], pool_reps = llama_bench(
                    patched, model, pp + ["--expert-pool-slots", str(slots)], cap, args.threads, reps=3)
                row["pool_pp_samples"] = samples
                row["pool_pp"] = statistics.median(samples) if samples else None
                row["pool_pp_reps"] = pool_reps
        rows.append(row)
        print(json.dumps({k: ({kk: vv for kk, vv in v.items() if kk != "reps"} if isinstance(v, dict) else v)
                          for k, v in row.items() if not k.endswith("_reps")}), flush=True)

    def f(x, fmt="{:.2f}"):
        return "-" if x is None else fmt.format(x)

    print()
    print(f"Uncapped stock decode: {f(stock_uncapped)} tok/s (median of 3). Pool tok/s: cold = the first "
          f"repetition (the pool starts empty), warm = median of the last 3 of {args.reps} "
          f"({args.reps_uncapped} uncapped); hit rate, miss MiB/token and the I/O bound are those of the "
          f"warm repetitions. Stock under a cap: one repetition (it only gets slower).")
    print()
    print("| cap MiB | slots | prefetch | stock tg | pool tg cold | pool tg warm | warm/stock | hit rate | miss MiB/token | I/O bound tok/s | warm / min(I/O bound, uncapped stock) | stock pp | pool pp |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        for key in sorted(k for k in r if k.startswith("pool_pf_")):
            p = r[key]
            warm = p.get("warm")
            ratio = warm / r["stock_tg"] if warm and r.get("stock_tg") else None
            bounds = [x for x in [p.get("io_bound_tps"), stock_uncapped] if x]
            frac = warm / min(bounds) if warm and bounds else None
            stock_note = f" ({r['stock_tg_note']})" if r.get("stock_tg_note") else ""
            print(f"| {r['cap_mib'] or 'none'} | {r['slots']} | {key[8:]} | {f(r.get('stock_tg'))}{stock_note} "
                  f"| {f(p.get('cold'))} | {f(warm)} | {f(ratio, '{:.1f}x')} | {f(p.get('hit_rate'), '{:.1%}')} "
                  f"| {f((p.get('miss_bytes_per_token') or 0) / 2**20)} | {f(p.get('io_bound_tps'), '{:.1f}')} | {f(frac)} "
                  f"| {f(r.get('stock_pp'), '{:.1f}')} | {f(r.get('pool_pp'), '{:.1f}')} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": str(model), "disk_bytes_per_s": disk_bw,
                               "fio_default_buffers": fio_plain, "fio_huge_buffers": fio_huge, "args": vars(args), "rows": rows}, indent=1))
    print(f"\n# wrote {out}")


if __name__ == "__main__":
    main()
