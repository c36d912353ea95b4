#!/usr/bin/env bash
# Decode on text prompts through llama-server under a cgroup-v1 memory cap, two pool
# settings A and B in alternating processes (page cache dropped before each). Each
# process answers WARM_FILE to warm the pool, then every PROMPT_FILE, measured: greedy,
# NGEN generated tokens, no prompt cache. Prints per measured request the decode speed
# and the decode hit rate (the pool's hits and misses around the request; prompts are
# computed from the staging area and count neither).
# llama-bench cannot do this: it feeds random tokens, whose routing differs from text's.
#
# Usage: bench/server_decode.sh CAP_MIB ROUNDS MODEL 'A_ARGS' 'B_ARGS' WARM_FILE PROMPT_FILE...
#   e.g. bench/server_decode.sh 1536 3 target/bench/bench.gguf '--expert-pool-slots 55' \
#        '--expert-pool-layer-slots 75,81,...' bench/prompts/harbor.txt bench/prompts/notes.txt
# Env: NGEN (default 128), PORT (default 18081).
# Needs root (cgroup, drop_caches), curl, python3, the patched engine (expertd engine build).
set -euo pipefail
[ $# -ge 7 ] || { sed -n 2,14p "$0"; exit 2; }
CAP=$1; ROUNDS=$2; MODEL=$3; A=$4; B=$5; WARM=$6; shift 6
NGEN=${NGEN:-128}; PORT=${PORT:-18081}
cd "$(dirname "$0")/.."
CG=/sys/fs/cgroup/memory/expertd-srv.$$
REQ=$(mktemp); LOG=$(mktemp)
mkdir "$CG"
echo $((CAP << 20)) > "$CG/memory.limit_in_bytes"
pid=
stop() { if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; pid=; fi; }
trap 'stop; rmdir "$CG" 2>/dev/null || true; rm -f "$REQ"' EXIT

counters() { # hits misses
  curl -sf "127.0.0.1:$PORT/metrics" | awk '/^expert_pool_hits_total / { h = $2 } /^expert_pool_misses_total / { m = $2 } END { print h + 0, m + 0 }'
}

for round in $(seq "$ROUNDS"); do
  for side in A B; do
    args=$A; [ "$side" = B ] && args=$B
    sync; echo 3 > /proc/sys/vm/drop_caches
    # shellcheck disable=SC2086 # the pool arguments are words
    sh -c "echo \$\$ > $CG/cgroup.procs && exec target/engine/cpu/bin/llama-server -m '$MODEL' -c 4096 -t 2 --port $PORT --metrics $args" > "$LOG" 2>&1 &
    pid=$!
    for _ in $(seq 120); do curl -sf "127.0.0.1:$PORT/health" > /dev/null && break; sleep 1; done
    curl -sf "127.0.0.1:$PORT/health" > /dev/null || { echo "round $round $side: llama-server did not start (log: $LOG)"; tail -5 "$LOG"; exit 1; }
    line=""
    for f in "$WARM" "$@"; do
      python3 -c 'import json, sys; print(json.dumps({"prompt": open(sys.argv[1]).read(), "n_predict": int(sys.argv[2]), "temperature": 0, "cache_prompt": False}))' "$f" "$NGEN" > "$REQ"
      read -r h0 m0 < <(counters)
      tg=$(curl -sf "127.0.0.1:$PORT/completion" -d @"$REQ" | python3 -c 'import json, sys; print("%.1f" % json.load(sys.stdin)["timings"]["predicted_per_second"])') || tg=failed
      read -r h1 m1 < <(counters)
      hit=$(python3 -c "h, m = $h1 - $h0, $m1 - $m0; print('%.1f%%' % (100.0 * h / (h + m)) if h + m else '-')")
      line+="  $(basename "$f"): $tg tok/s hit $hit"
    done
    printf "round %s %s:%s\n" "$round" "$side" "$line"
    stop
  done
done
