#!/usr/bin/env bash
# Crash recovery: kill -9 the engine, time until it serves again (its /health answers 200,
# polled every 10 ms), against the engine's own load time measured in the same run (the
# same llama-server command started by hand, spawn to first 200). Default restart policy
# (first backoff 500 ms). Goal: gap < load time + 1 s.
# Usage: PRESET=mid bench/daemon_restart_gap.sh   (N=5 kills by default)
source "$(dirname "$0")/daemon_common.sh"
N=${N:-5}
# A short crash-loop window so that every kill is a first crash (backoff 500 ms).
EXTRA_CONFIG=$'[restart]\ncrash_loop_window_secs = 1'
start_daemon
wait_serving
health() { curl -s -o /dev/null -w '%{http_code}' --max-time 1 "http://127.0.0.1:$1/health" 2>/dev/null || true; }
# Baseline: the engine alone, same arguments, another port.
ARGS=$(status_json | jq -r '.plan.args | @sh')
BPORT=$(free_port)
for i in $(seq "$N"); do
  eval "set -- $ARGS"
  t0=$(now_ns)
  "$ENGINE" "$@" --port "$BPORT" >/dev/null 2>&1 &
  bp=$!
  until [[ "$(health "$BPORT")" == 200 ]]; do sleep 0.01; done
  t1=$(now_ns)
  kill -KILL "$bp"; wait "$bp" 2>/dev/null || true
  echo "$(( (t1 - t0) / 1000000 ))" >> "$WORK/load.ms"
done
for i in $(seq "$N"); do
  sleep 1.5
  old=$(status_json | jq -r '.engine.pid')
  t0=$(now_ns)
  kill -KILL "$old"
  while :; do
    if [[ "$(health "$PORT")" == 200 ]]; then
      pid=$(status_json | jq -r '.engine.pid')
      [[ "$pid" != "$old" && "$pid" != null ]] && break
    fi
    sleep 0.01
  done
  t1=$(now_ns)
  echo "$(( (t1 - t0) / 1000000 ))" >> "$WORK/gap.ms"
done
restarts=$(status_json | jq -r '.engine.restarts')
read -r l50 l99 < <(percentiles "$WORK/load.ms")
read -r g50 g99 < <(percentiles "$WORK/gap.ms")
awk -v l50="$l50" -v g50="$g50" -v gmax="$g99" -v lmax="$l99" -v n="$N" -v r="$restarts" 'BEGIN {
  printf "engine load alone (baseline): median %.0f ms, max %.0f ms\n", l50, lmax
  printf "kill -9 -> serving again:      median %.0f ms, max %.0f ms (%d kills, restarts counted: %d)\n", g50, gmax, n, r
  printf "gap - load (backoff 500 ms + crash detection + spawn): median %.0f ms, worst %.0f ms; goal < 1000 ms -> %s\n", g50-l50, gmax-l50, (gmax-l50 < 1000 ? "met" : "NOT met")
}'
