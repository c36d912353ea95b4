#!/usr/bin/env bash
# Hit rate of every eviction policy vs Belady's optimum at 8, 16, 32, 64 of 128 slots,
# and an upper bound on any online eviction policy (`expertd trace bound`), on synthetic
# traces from `expertd trace gen`:
#   realistic: consecutive-token reuse 25..47% over the layers, Zipf s = 0.65
#              (published OLMoE statistics), 128 experts, 8 used, 24 layers, 8192 tokens;
#   harder:    reuse 10..20%, Zipf s = 0.4 (flatter popularity, less reuse).
# Usage: bench/pool_policy.sh [OUT_DIR]   (default bench/out)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/out}
mkdir -p "$OUT"
cargo build --release -p expertd >/dev/null 2>&1
E="${CARGO_TARGET_DIR:-target}/release/expertd"

run() {
  local name=$1; shift
  "$E" trace gen "$@" --experts 128 --used 8 --layers 24 --tokens 8192 --seed 1 -o "$OUT/$name.trace"
  echo "## $name: expertd trace gen $* --experts 128 --used 8 --layers 24 --tokens 8192 --seed 1"
  "$E" trace stats "$OUT/$name.trace" | tail -1
  "$E" trace sim "$OUT/$name.trace" --slots 8,16,32,64
  "$E" trace sim "$OUT/$name.trace" --slots 8,16,32,64 --json > "$OUT/$name.sim.json"
  # The best any online eviction policy can expect on this generator's trace.
  "$E" trace bound "$@" --experts 128 --used 8 --layers 24 --tokens 8192 --seed 1 --slots 8,16,32,64 --samples 1024
  echo
}
run realistic --reuse 0.25..0.47 --zipf 0.65
run harder --reuse 0.10..0.20 --zipf 0.4
