#!/usr/bin/env bash
# Fill throughput of the expert pool vs the disk's raw random-read bandwidth (fio,
# io_uring engine, direct=1, random offsets 4 KiB aligned like expert slices at
# arbitrary tensor offsets), measured in the same run with the same block sizes and
# queue depths. The page cache is dropped before every measurement; each point is run
# ROUNDS times alternating fio and the pool, and medians are compared.
# Needs root (drop_caches), fio and python3.
#
# Usage: bench/pool_fill.sh [FILE_GIB] [SECONDS] [ROUNDS]   (defaults 12, 5, 3)
# Env: CARGO_TARGET_DIR (default target), POOL_FILL_DIR (default /var/tmp).
set -euo pipefail
cd "$(dirname "$0")/.."
GIB=${1:-12}
SECS=${2:-5}
ROUNDS=${3:-3}
DIR=${POOL_FILL_DIR:-/var/tmp}
FILE="$DIR/pool_fill.$$.bin"
trap 'rm -f "$FILE"' EXIT
command -v fio >/dev/null || { echo "fio is not installed" >&2; exit 1; }

echo "# writing a ${GIB} GiB file at $FILE (random data, real blocks)"
dd if=/dev/urandom of="$FILE" bs=16M count=$((GIB * 64)) status=none
sync

cargo bench -p expert-pool --bench pool_fill --no-run >/dev/null 2>&1
BIN=$(ls -t "${CARGO_TARGET_DIR:-target}"/release/deps/pool_fill-* | grep -v '\.d$' | head -1)

drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }
median() { python3 -c 'import sys,statistics; print("%.1f" % statistics.median(float(x) for x in sys.argv[1:]))' "$@"; }

printf "%-8s %-5s %-20s %-20s %8s %8s %7s\n" "expert" "depth" "pool MiB/s (runs)" "fio MiB/s (runs)" "pool" "fio" "ratio"
for KIB in 512 864 1536 3072; do
  BYTES=$((KIB * 1024))
  for DEPTH in 1 8; do
    P=(); F=()
    for _ in $(seq "$ROUNDS"); do
      drop_caches
      F+=("$(fio --name=rr --filename="$FILE" --rw=randread --bs="${KIB}k" --blockalign=4k --ioengine=io_uring \
            --direct=1 --iodepth="$DEPTH" --runtime="$SECS" --time_based --output-format=json \
            --randrepeat=0 | python3 -c 'import json,sys; print("%.0f" % (json.load(sys.stdin)["jobs"][0]["read"]["bw"]/1024))')")
      drop_caches
      LINE=$("$BIN" "$FILE" "$BYTES" "$DEPTH" "$SECS" auto)
      grep -q "direct=true" <<<"$LINE" || echo "# note: O_DIRECT not used: $LINE"
      P+=("$(sed -n 's/.*MiB\/s=\([0-9.]*\).*/\1/p' <<<"$LINE" | cut -d. -f1)")
    done
    PM=$(median "${P[@]}"); FM=$(median "${F[@]}")
    printf "%-8s %-5s %-20s %-20s %8s %8s %7.3f\n" "${KIB}KiB" "$DEPTH" "$(IFS=,; echo "${P[*]}")" \
      "$(IFS=,; echo "${F[*]}")" "$PM" "$FM" "$(python3 -c "print($PM/$FM)")"
  done
done
