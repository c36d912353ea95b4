#!/usr/bin/env bash
# Fill throughput of the expert pool vs the disk's raw random-read bandwidth (fio,
# io_uring engine, direct=1, random offsets 4 KiB aligned like expert slices at
# arbitrary tensor offsets), measured in the same run with the same block sizes and
# queue depths. The page cache is dropped before every measurement; each point is run
# ROUNDS times alternating fio and the pool, and medians are compared.
# fio runs twice: with its default buffers (malloc'd 4 KiB pages) and with huge-page
# buffers (--mem=shmhuge). On a virtualised disk the second is faster: a read costs more
# the more physically separate pieces its buffer has, and the pool reads into huge pages
# (ffi/src/arena.rs), so the pool is compared with the faster of the two.
# The pool runs twice: experts 32 bytes apart (each read copied into its slot) and laid
# out as in GGUF files (whole pages back to back: read straight into pool-owned slots).
# Needs root (drop_caches, vm.nr_hugepages for fio's buffers), fio and python3.
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
OLD_HUGE=$(cat /proc/sys/vm/nr_hugepages)
trap 'rm -f "$FILE"; echo "$OLD_HUGE" > /proc/sys/vm/nr_hugepages' EXIT
# fio's huge-page buffers: depth x 3 MiB at most, in 2 MiB pages, with room to spare.
echo $((OLD_HUGE + 32)) > /proc/sys/vm/nr_hugepages
command -v fio >/dev/null || { echo "fio is not installed" >&2; exit 1; }

echo "# writing a ${GIB} GiB file at $FILE (random data, real blocks)"
dd if=/dev/urandom of="$FILE" bs=16M count=$((GIB * 64)) status=none
sync

cargo bench -p expert-pool --bench pool_fill --no-run >/dev/null 2>&1
BIN=$(ls -t "${CARGO_TARGET_DIR:-target}"/release/deps/pool_fill-* | grep -v '\.d$' | head -1)

drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }
median() { python3 -c 'import sys,statistics; print("%.1f" % statistics.median(float(x) for x in sys.argv[1:]))' "$@"; }

fio_mibs() { # BS DEPTH [extra fio args]
  fio --name=rr --filename="$FILE" --rw=randread --bs="$1" --blockalign=4k --ioengine=io_uring \
    --direct=1 --iodepth="$2" --runtime="$SECS" --time_based --output-format=json \
    --randrepeat=0 "${@:3}" 2>/dev/null | python3 -c 'import json,sys; print("%.0f" % (json.load(sys.stdin)["jobs"][0]["read"]["bw"]/1024))'
}
printf "%-8s %-5s %-20s %-20s %-20s %-20s %7s %7s %7s %9s %7s %9s %9s\n" "expert" "depth" \
  "pool MiB/s (runs)" "pool gguf (runs)" "fio MiB/s (runs)" "fio huge (runs)" "pool" "gguf" "fio" \
  "fio huge" "ratio" "vs huge" "gguf/huge"
for KIB in 512 864 1536 3072; do
  BYTES=$((KIB * 1024))
  for DEPTH in 1 8; do
    P=(); G=(); F=(); H=()
    for _ in $(seq "$ROUNDS"); do
      drop_caches
      F+=("$(fio_mibs "${KIB}k" "$DEPTH")")
      drop_caches
      H+=("$(fio_mibs "${KIB}k" "$DEPTH" --mem=shmhuge)")
      drop_caches
      LINE=$("$BIN" "$FILE" "$BYTES" "$DEPTH" "$SECS" auto)
      grep -q "direct=true" <<<"$LINE" || echo "# note: O_DIRECT not used: $LINE"
      P+=("$(sed -n 's/.*MiB\/s=\([0-9.]*\).*/\1/p' <<<"$LINE" | cut -d. -f1)")
      drop_caches
      LINE=$("$BIN" "$FILE" "$BYTES" "$DEPTH" "$SECS" auto sync gguf)
      G+=("$(sed -n 's/.*MiB\/s=\([0-9.]*\).*/\1/p' <<<"$LINE" | cut -d. -f1)")
    done
    PM=$(median "${P[@]}"); GM=$(median "${G[@]}"); FM=$(median "${F[@]}"); HM=$(median "${H[@]}")
    printf "%-8s %-5s %-20s %-20s %-20s %-20s %7s %7s %7s %9s %7.3f %9.3f %9.3f\n" "${KIB}KiB" "$DEPTH" \
      "$(IFS=,; echo "${P[*]}")" "$(IFS=,; echo "${G[*]}")" "$(IFS=,; echo "${F[*]}")" \
      "$(IFS=,; echo "${H[*]}")" "$PM" "$GM" "$FM" "$HM" "$(python3 -c "print($PM/$FM)")" \
      "$(python3 -c "print($PM/$HM)")" "$(python3 -c "print($GM/$HM)")"
  done
done
