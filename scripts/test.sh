#!/usr/bin/env bash
# The whole test suite, as CI runs it: set up, build the patched and the stock engine,
# then run every test in the workspace (unit, property, end-to-end with the real engine).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PATH="$HOME/.cargo/bin:$PATH"

bash scripts/setup.sh
cargo build --release -p expertd
./target/release/expertd engine build
./target/release/expertd engine build --stock
# End-to-end tests start llama-server processes: two at a time is what 2 cores take.
cargo test --workspace --release -- --test-threads=2
