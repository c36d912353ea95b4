#!/usr/bin/env bash
# A/B of two llama-bench builds under a cgroup-v1 memory cap, alternating processes so
# that the disk's drift (this VM's virtio disk varies up to 2x over minutes) hits both
# sides alike. The page cache is dropped before every process. For the patched engine
# each repetition's pool counters (`expert-pool-rep:` lines) give the time per token spent
# waiting for reads ("stall"), the rest ("other") and the hit rate.
#
# Usage: bench/engine_ab.sh CAP_MIB ROUNDS MODEL 'A_CMD' 'B_CMD' -- LLAMA_BENCH_ARGS...
#   A_CMD/B_CMD: a llama-bench binary and its own flags, e.g.
#     'target/engine-stock/cpu/bin/llama-bench --repack 0'
#     '/tmp/llama-bench-new --expert-pool-slots 26'
# Prints per process: tok/s of every repetition, and for pool runs stall/other ms per token.
# Needs root (cgroup, drop_caches).
set -euo pipefail
[ $# -ge 6 ] && [ "$6" = "--" ] || { sed -n 2,13p "$0"; exit 2; }
CAP=$1; ROUNDS=$2; MODEL=$3; A=$4; B=$5; shift 6
CG=/sys/fs/cgroup/memory/expertd-ab.$$
mkdir "$CG"
trap 'rmdir "$CG" 2>/dev/null || true' EXIT
echo $((CAP << 20)) > "$CG/memory.limit_in_bytes"

summarise() {
  python3 -c '
import json, sys
text = sys.stdin.read()
reps = []
for line in text.splitlines():
    if line.startswith("expert-pool-rep: "):
        j = json.loads(line[len("expert-pool-rep: "):])
        n = j["n_prompt"] + j["n_gen"]
        seen = j["hits"] + j["misses"]
        reps.append("%.1f/%.1f/%.0f%%" % (j["stall_ns"] / 1e6 / n, (j["t_ns"] - j["stall_ns"]) / 1e6 / n,
                                          100.0 * j["hits"] / seen if seen else 0.0))
start = text.find("[\n")
res = json.loads(text[start:text.rindex("]") + 1]) if start >= 0 else []
ts = res[0]["samples_ts"] if res else []
print("tok/s", " ".join("%.1f" % x for x in ts) or "(failed)", end="")
print("   stall/other ms/token/hit rate", " ".join(reps) if reps else "", end="")
print()
'
}

for round in $(seq "$ROUNDS"); do
  for side in A B; do
    cmd=$A; [ "$side" = B ] && cmd=$B
    sync; echo 3 > /proc/sys/vm/drop_caches
    out=$(sh -c "echo \$\$ > $CG/cgroup.procs && exec $cmd -m '$MODEL' -o json $*" 2>&1 || true)
    printf "round %s %s: %s\n" "$round" "$side" "$(summarise <<<"$out")"
  done
done
