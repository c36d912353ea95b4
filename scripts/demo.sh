#!/usr/bin/env bash
# The main job on one machine, no GPU needed: set up, build expertd and the patched engine,
# generate the demo MoE model, serve it with the patched llama-server, print one completion.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PATH="$HOME/.cargo/bin:$PATH"

bash scripts/setup.sh
cargo build --release -p expertd
expertd=./target/release/expertd
server=$($expertd engine build)

model=target/demo/demo-mid.gguf
if [ ! -f "$model" ]; then
  mkdir -p target/demo
  $expertd synth --preset mid --seed 1 -o "$model"
fi

port=${EXPERTD_DEMO_PORT:-18080}
log=target/demo/llama-server.log
echo "demo: serving $model with $server on 127.0.0.1:$port (log: $log)"
"$server" -m "$model" --host 127.0.0.1 --port "$port" -t "$(nproc)" >"$log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null' EXIT
for _ in $(seq 1 600); do
  curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
  kill -0 $pid 2>/dev/null || { cat "$log"; echo "demo: llama-server exited" >&2; exit 1; }
  sleep 0.1
done
grep -m1 "expertd expert pool" "$log" || { echo "demo: the engine did not report the expert pool" >&2; exit 1; }
echo "demo: completion of \"The expert pool\" (random weights, so the words are random too):"
curl -sf "http://127.0.0.1:$port/completion" \
  -d '{"prompt": "The expert pool", "n_predict": 24, "temperature": 0}' \
  | python3 -c 'import json,sys; a=json.load(sys.stdin); print(repr(a["content"])); t=a["timings"]; print(f"demo: {t[\"predicted_n\"]} tokens at {t[\"predicted_per_second\"]:.1f} tok/s")'
