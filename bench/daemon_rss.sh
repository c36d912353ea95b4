#!/usr/bin/env bash
# Daemon memory: RSS of `expertd serve` while the engine serves, and after 1000 status
# queries; baseline in the same run: the engine's own RSS. Goal: daemon RSS < 20 MiB.
# Usage: bench/daemon_rss.sh   (env: see bench/daemon_common.sh)
source "$(dirname "$0")/daemon_common.sh"
start_daemon
wait_serving
sleep 1
EPID=$(status_json | jq -r '.engine.pid')
d0=$(rss_kib "$DPID")
for _ in $(seq 1000); do status_json >/dev/null; done
for _ in $(seq 100); do curl -s --unix-socket "$SOCK" http://localhost/metrics >/dev/null; done
d1=$(rss_kib "$DPID"); dh=$(hwm_kib "$DPID"); e=$(rss_kib "$EPID")
awk -v d0="$d0" -v d1="$d1" -v dh="$dh" -v e="$e" 'BEGIN {
  printf "daemon RSS serving: %.1f MiB; after 1000 status + 100 metrics queries: %.1f MiB (peak %.1f MiB)\n", d0/1024, d1/1024, dh/1024
  printf "engine RSS (baseline): %.1f MiB; daemon/engine = %.3f\n", e/1024, d1/e
  printf "goal < 20 MiB: daemon peak / goal = %.2f -> %s\n", dh/1024/20, (dh/1024 < 20 ? "met" : "NOT met")
}'
