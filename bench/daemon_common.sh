# Sourced by bench/daemon_*.sh: builds nothing, starts `expertd serve` on a synthetic model
# with the real llama-server in a temp dir, and cleans up on exit.
#
# Environment: EXPERTD (default: $CARGO_TARGET_DIR or target/, release/expertd),
# ENGINE (default: target/engine/cpu/bin/llama-server, else target/engine-stock/...),
# PRESET (synthetic model preset: tiny | mid | bench; default tiny).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
EXPERTD=${EXPERTD:-${CARGO_TARGET_DIR:-$ROOT/target}/release/expertd}
if [[ -z "${ENGINE:-}" ]]; then
  for c in "$ROOT/target/engine/cpu/bin/llama-server" "$ROOT/target/engine-stock/cpu/bin/llama-server"; do
    if [[ -x "$c" ]]; then ENGINE=$c; break; fi
  done
fi
PRESET=${PRESET:-tiny}
[[ -x "$EXPERTD" ]] || { echo "no expertd at $EXPERTD (cargo build --release -p expertd)" >&2; exit 1; }
[[ -n "${ENGINE:-}" && -x "$ENGINE" ]] || { echo "no llama-server (expertd engine build --stock, or set ENGINE)" >&2; exit 1; }

WORK=$(mktemp -d /tmp/expertd-bench.XXXXXX)
DPID=""
cleanup() {
  if [[ -n "$DPID" ]] && kill -0 "$DPID" 2>/dev/null; then
    kill -TERM "$DPID" 2>/dev/null || true
    wait "$DPID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
now_ns() { date +%s%N; }
SOCK=$WORK/status.sock
PORT=$(free_port)
MODEL=$WORK/model.gguf
"$EXPERTD" synth --preset "$PRESET" -o "$MODEL" >/dev/null 2>&1

# EXTRA_CONFIG: more TOML appended at the top level (before [engine]).
start_daemon() {
  cat > "$WORK/expertd.toml" <<TOML
model = "$MODEL"
state_dir = "$WORK/state"
socket = "$SOCK"
${EXTRA_CONFIG:-}
[engine]
binary = "$ENGINE"
port = $PORT
TOML
  RUST_LOG=warn "$EXPERTD" serve --config "$WORK/expertd.toml" 2>"$WORK/daemon.log" &
  DPID=$!
}

status_json() { curl -s --max-time 5 --unix-socket "$SOCK" http://localhost/status; }

wait_serving() {
  local deadline=$(( $(date +%s) + ${1:-300} ))
  until [[ "$(status_json 2>/dev/null | jq -r '.engine.state' 2>/dev/null)" == serving ]]; do
    if (( $(date +%s) > deadline )); then
      echo "engine not serving in time; log:" >&2; tail -20 "$WORK/daemon.log" >&2; exit 1
    fi
    sleep 0.05
  done
}

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
hwm_kib() { awk '/^VmHWM:/ {print $2}' "/proc/$1/status"; }

# p50 and p99 of a file of numbers (one per line).
percentiles() { sort -g "$1" | awk '{a[NR]=$1} END {i50=int(NR*0.50); i99=int(NR*0.99); if(i50<1)i50=1; if(i99<1)i99=1; printf "%.3f %.3f\n", a[i50], a[i99]}'; }

echo "# expertd $("$EXPERTD" --version 2>/dev/null | awk '{print $2}'), engine $ENGINE, model preset $PRESET ($(du -h "$MODEL" | cut -f1)), $(nproc) cores"
