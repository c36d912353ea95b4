#!/usr/bin/env bash
# Planner memory prediction vs the engine: for each synthetic preset, `expertd plan --json`,
# then llama-server with exactly the plan's arguments, one 16-token completion, and the
# engine's RSS split into anonymous and file-backed memory.
# Usage: bench/daemon_plan_calibration.sh [PRESET...]   (default: tiny mid bench)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
EXPERTD=${EXPERTD:-${CARGO_TARGET_DIR:-$ROOT/target}/release/expertd}
ENGINE=${ENGINE:-$ROOT/target/engine/cpu/bin/llama-server}
[[ -x "$EXPERTD" && -x "$ENGINE" ]] || { echo "need $EXPERTD and $ENGINE" >&2; exit 1; }
WORK=$(mktemp -d /tmp/expertd-calib.XXXXXX)
EPID=""
trap '[[ -n "$EPID" ]] && kill "$EPID" 2>/dev/null; rm -rf "$WORK"' EXIT
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
kib() { awk -v k="$1:" '$1 == k {print $2}' "/proc/$EPID/status"; }
for p in "${@:-tiny mid bench}"; do
  for preset in $p; do
    "$EXPERTD" synth --preset "$preset" -o "$WORK/$preset.gguf" >/dev/null 2>&1
    printf 'model = "%s"\nstate_dir = "%s"\nsocket = "%s"\n[engine]\nport = %s\n' \
      "$WORK/$preset.gguf" "$WORK/state" "$WORK/s.sock" "$PORT" > "$WORK/$preset.toml"
    "$EXPERTD" plan --json --config "$WORK/$preset.toml" > "$WORK/$preset.plan.json"
    pred=$(jq '.memory[] | select(.tier == "ram") | .total' "$WORK/$preset.plan.json")
    eval "set -- $(jq -r '.args | @sh' "$WORK/$preset.plan.json")"
    "$ENGINE" "$@" >/dev/null 2>&1 &
    EPID=$!
    until curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; do sleep 0.1; done
    curl -s "http://127.0.0.1:$PORT/completion" -d '{"prompt":"hello","n_predict":16}' >/dev/null
    printf '%s: predicted %d MiB; RSS %d MiB (anonymous %d MiB, file-backed %d MiB), peak %d MiB\n' \
      "$preset" $((pred / 1048576)) $(( $(kib VmRSS) / 1024 )) $(( $(kib RssAnon) / 1024 )) \
      $(( $(kib RssFile) / 1024 )) $(( $(kib VmHWM) / 1024 ))
    kill "$EPID"; wait "$EPID" 2>/dev/null || true; EPID=""
  done
done
