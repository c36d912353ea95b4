#!/usr/bin/env bash
# Routing locality of the synthetic models, measured with the real (stock) engine:
# for each preset and --locality setting, write the model, record routing traces with
# `expertd trace record` on the English prompts in bench/prompts/ (the whole prompt plus
# 64 greedily generated tokens) and on 512 random tokens (what llama-bench feeds), and
# print `expertd trace stats` (per-layer consecutive-token reuse, top-10% share, fitted
# Zipf s, LRU at a quarter of the experts) and `expertd trace sim` at a quarter of the
# experts (every policy vs Belady's optimum).
#
# Needs the stock engine (`expertd engine build --stock`) for the recorder.
# Usage: bench/trace_locality.sh [OUT_DIR]      (default bench/out/locality)
#   PRESETS="mid bench" LOCALITIES="default realistic hard" THREADS=2 override the sets.
# The bench models are 2.6 GiB each (written to OUT_DIR, removed after use unless KEEP=1).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/out/locality}
PRESETS=${PRESETS:-"mid bench"}
LOCALITIES=${LOCALITIES:-"default realistic hard"}
THREADS=${THREADS:-2}
mkdir -p "$OUT"
cargo build --release -p expertd -p expertd-recorder >/dev/null
BIN="${CARGO_TARGET_DIR:-target}/release"
E="$BIN/expertd"
export EXPERTD_TRACE_RECORD="$BIN/expertd-trace-record"

for preset in $PRESETS; do
  for loc in $LOCALITIES; do
    model="$OUT/$preset-$loc.gguf"
    "$E" synth --preset "$preset" --locality "$loc" -o "$model" --threads "$THREADS" >/dev/null
    experts=$("$E" gguf "$model" --json | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["model"]["expert_count"])' 2>/dev/null || echo 0)
    slots=$(( experts > 0 ? (experts + 3) / 4 : 32 ))
    for src in prompts/harbor prompts/notes random; do
      name="$preset-$loc-${src#prompts/}"
      if [ "$src" = random ]; then
        input=(--random-tokens 512)
      else
        input=(--prompt-file "bench/$src.txt")
      fi
      echo "## $name: expertd synth --preset $preset --locality $loc; expertd trace record ${input[*]} --tokens 64"
      "$E" trace record "$model" -o "$OUT/$name.trace" "${input[@]}" --tokens 64 --threads "$THREADS" \
        2> "$OUT/$name.log" | tail -1
      "$E" trace stats --json "$OUT/$name.trace" > "$OUT/$name.stats.json"
      "$E" trace sim "$OUT/$name.trace" --slots "$slots" | tail -n +3
      echo
    done
    [ "${KEEP:-0}" = 1 ] || rm -f "$model"
  done
done
