#!/usr/bin/env bash
# Status query latency: 1000 `GET /status` over the unix socket (curl's time_total), p50
# and p99; baseline in the same run: 1000 `GET /health` to the engine over TCP.
# Goal: status p99 < 5 ms.  Usage: bench/daemon_status_latency.sh
source "$(dirname "$0")/daemon_common.sh"
N=${N:-1000}
start_daemon
wait_serving
sleep 2   # let the metrics poller run once
for _ in $(seq 20); do status_json >/dev/null; done   # warm up
for _ in $(seq "$N"); do
  curl -s -o /dev/null -w '%{time_total}\n' --unix-socket "$SOCK" http://localhost/status
done | awk '{print $1*1000}' > "$WORK/status.ms"
for _ in $(seq "$N"); do
  curl -s -o /dev/null -w '%{time_total}\n' "http://127.0.0.1:$PORT/health"
done | awk '{print $1*1000}' > "$WORK/health.ms"
read -r s50 s99 < <(percentiles "$WORK/status.ms")
read -r h50 h99 < <(percentiles "$WORK/health.ms")
bytes=$(status_json | wc -c)
awk -v s50="$s50" -v s99="$s99" -v h50="$h50" -v h99="$h99" -v n="$N" -v b="$bytes" 'BEGIN {
  printf "status (%d B JSON, unix socket): p50 %.3f ms, p99 %.3f ms over %d queries\n", b, s50, s99, n
  printf "engine /health (baseline, TCP):   p50 %.3f ms, p99 %.3f ms\n", h50, h99
  printf "ratio status/health: p50 %.2f, p99 %.2f; goal p99 < 5 ms -> %s\n", s50/h50, s99/h99, (s99 < 5 ? "met" : "NOT met")
}'
