#!/usr/bin/env bash
# The plan's llama-server under a cgroup-v1 memory cap: the engine started with exactly a
# plan's arguments (`expertd plan --json`) inside a cap, then NREQ requests of 3900 random
# token ids + 150 generated tokens each (the context nearly full; every prompt staged).
# Prints the engine's RSS after loading and after each request, the cgroup's peak (page
# cache included, which the kernel reclaims under the cap), OOM kills, the pool's hit rate.
#
# Usage: bench/plan_memory_cap.sh PLAN_JSON CAP_MIB NREQ
#   e.g. expertd plan --json --config C > plan.json; bench/plan_memory_cap.sh plan.json 1024 4
# Needs root (cgroup, drop_caches), jq, curl, and the patched engine (expertd engine build).
# The plan's port and stats path are replaced by 18080 and a temporary file.
set -euo pipefail
[ $# -eq 3 ] || { sed -n 2,11p "$0"; exit 2; }
PLAN=$1; CAP=$2; NREQ=$3
cd "$(dirname "$0")/.."
CG=/sys/fs/cgroup/memory/expertd-plancap.$$
STATS=$(mktemp); REQ=$(mktemp); LOG=$(mktemp)
mkdir "$CG"
echo $((CAP << 20)) > "$CG/memory.limit_in_bytes"
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null && sleep 2; rmdir "$CG" 2>/dev/null || true; rm -f "$STATS" "$REQ"; }
trap cleanup EXIT
args=$(jq -r --arg stats "$STATS" '.args | map(if . == "8080" then "18080" else . end)
  | (index("--expert-pool-stats")) as $i | if $i then .[$i + 1] = $stats else . end | @sh' "$PLAN")
eval "set -- $args"
sync; echo 3 > /proc/sys/vm/drop_caches
sh -c "echo \$\$ > $CG/cgroup.procs && exec target/engine/cpu/bin/llama-server $(printf '%q ' "$@")" > "$LOG" 2>&1 &
pid=$!
for _ in $(seq 120); do curl -sf 127.0.0.1:18080/health > /dev/null && break; sleep 1; done
rss() { awk '/VmRSS/ { print int($2 / 1024) }' "/proc/$pid/status"; }
echo "loaded: rss $(rss) MiB (engine log: $LOG)"
for s in $(seq "$NREQ"); do
  python3 -c "import random, json; random.seed($s); print(json.dumps({'prompt': [random.randrange(10, 4000) for _ in range(3900)], 'n_predict': 150, 'temperature': 0}))" > "$REQ"
  speed=$(curl -s 127.0.0.1:18080/completion -d @"$REQ" | python3 -c 'import json, sys; t = json.load(sys.stdin)["timings"]; print("pp %.1f tg %.1f tok/s" % (t["prompt_per_second"], t["predicted_per_second"]))' || echo "request failed")
  echo "request $s: $speed, rss $(rss) MiB, cgroup peak $(($(cat "$CG/memory.max_usage_in_bytes") >> 20)) MiB"
done
echo "oom kills: $(awk '/oom_kill / { print $2 }' "$CG/memory.oom_control")"
echo "pool hit rate: $(jq '.total | .hits / (.hits + .misses)' "$STATS")"
