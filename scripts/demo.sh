#!/usr/bin/env bash
# The main job on one machine, no GPU needed: set up, build expertd and the patched engine,
# generate the demo MoE model (the 2.6 GiB bench preset), then run the daemon in the
# foreground with a RAM budget of 1 GiB, well below the model: the plan turns the expert
# pool on. Shows `expertd plan`, `expertd status` once the engine serves, a completion, and
# the status again with the pool's hit rate; then stops the daemon (SIGTERM), which stops
# the engine.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PATH="$HOME/.cargo/bin:$PATH"

bash scripts/setup.sh
cargo build --release -p expertd
expertd=$PWD/target/release/expertd
$expertd engine build >/dev/null

demo=$PWD/target/demo
mkdir -p "$demo"
model=$demo/demo-bench.gguf
[ -f "$model" ] || $expertd synth --preset bench --seed 1 -o "$model"

port=${EXPERTD_DEMO_PORT:-18080}
config=$demo/expertd.toml
cat >"$config" <<EOF
# The demo's config: the bench model with a 1 GiB RAM budget.
model = "$model"
state_dir = "$demo/state"
socket = "$demo/status.sock"

[memory]
ram = "1GiB"

[engine]
port = $port
EOF

echo "== expertd plan --config $config"
$expertd plan --config "$config"

log=$demo/daemon.log
echo "== expertd serve --config $config (log: $log)"
$expertd serve --config "$config" >"$log" 2>&1 &
daemon=$!
trap 'kill -TERM $daemon 2>/dev/null; wait $daemon 2>/dev/null' EXIT
for _ in $(seq 1 600); do
  state=$($expertd status --json --config "$config" 2>/dev/null |
          python3 -c 'import json,sys; print(json.load(sys.stdin)["engine"]["state"])' 2>/dev/null || true)
  [ "$state" = serving ] && break
  kill -0 $daemon 2>/dev/null || { cat "$log"; echo "demo: the daemon exited" >&2; exit 1; }
  sleep 0.5
done
[ "$state" = serving ] || { tail -50 "$log"; echo "demo: the engine did not come up" >&2; exit 1; }

echo "== expertd status"
$expertd status --config "$config"

echo "== a completion from the engine on 127.0.0.1:$port (random weights: random words)"
curl -sf "http://127.0.0.1:$port/completion" \
  -d '{"prompt": "The expert pool keeps the hot experts", "n_predict": 64, "temperature": 0}' |
  python3 -c '
import json, sys
a = json.load(sys.stdin)
t = a["timings"]
print(repr(a["content"]))
print("%d tokens at %.1f tok/s, prompt %d tokens at %.1f tok/s"
      % (t["predicted_n"], t["predicted_per_second"], t["prompt_n"], t["prompt_per_second"]))'
sleep 2.5 # the pool publishes its stats about once a second, the daemon reads them every 2 s
echo "== expertd status (after the completion)"
$expertd status --config "$config"
