#!/usr/bin/env bash
# Storage-engine benchmark with its ceiling measured in the same run.
# 1. Disk ceiling: dd O_DIRECT sequential write, 2 GiB in 1 MiB blocks (queue depth 1).
# 2. The io_uring ceiling: glommio alone writing 1 MiB O_DIRECT blocks at queue depth 4
#    (examples/uring_ceiling.rs), what the engine's own I/O path could reach.
# 3. criterion: CRC, batch validation, segment append (memory, fsync), sequential read.
# 4. Prints each append figure as a ratio of both ceilings.
# Usage: tools/bench-storage.sh [DIR]   (DIR: where to write; default: target/bench-scratch)
set -euo pipefail
cd "$(dirname "$0")/.."
scratch=${1:-target/bench-scratch}
mkdir -p "$scratch"

. tools/dd-ceiling.sh
secs=$(dd_ceiling "$scratch")
ceiling_mib=$(python3 -c "print(2048/$secs)")
printf 'ceiling: %.0f MiB/s\n' "$ceiling_mib"

if command -v fio >/dev/null; then
  echo "== device maximum: fio O_DIRECT 1 MiB writes, 4 jobs x queue depth 32"
  fio --name=devmax --directory="$scratch" --rw=write --bs=1M --size=1G --direct=1 \
    --ioengine=io_uring --iodepth=32 --numjobs=4 --group_reporting \
    --output-format=terse --terse-version=3 2>/dev/null |
    awk -F';' -v dd="$ceiling_mib" '{printf "device max: %.0f MiB/s = %.2f x dd\n", $48/1024, $48/1024/dd}'
  rm -f "$scratch"/devmax*
fi

echo "== io_uring ceiling: glommio alone, 1 MiB O_DIRECT writes at queue depth 4"
cargo build --release --example uring_ceiling >/dev/null 2>&1
uring_out=$(./target/release/examples/uring_ceiling 4 "$scratch")
echo "$uring_out"
uring_mib=$(echo "$uring_out" | sed -E 's/.*: ([0-9]+) MB\/s/\1/' | python3 -c "import sys; print(int(sys.stdin.read())*1e6/1048576)")

echo "== criterion"
cargo bench --bench crc 2>&1 | grep -E '^crc/|thrpt:' | tee target/bench-crc.txt
cargo bench --bench batch 2>&1 | grep -E '^batch/|thrpt:' | tee target/bench-batch.txt
cargo bench --bench segment 2>&1 | grep -E '^segment|thrpt:' | tee target/bench-segment.txt

echo "== ratios to the disk ceiling (median throughput)"
python3 - "$ceiling_mib" target/bench-segment.txt "$uring_mib" <<'PY'
import re, sys
ceiling = float(sys.argv[1])
uring = float(sys.argv[3])
name = None
for line in open(sys.argv[2]):
    if line.startswith("segment"):
        name = line.split()[0]
    m = re.search(r"thrpt:\s+\[\S+ \S+ ([0-9.]+) (GiB|MiB)/s", line)
    if m and name:
        v = float(m.group(1)) * (1024 if m.group(2) == "GiB" else 1)
        print(f"{name:50s} {v:6.0f} MiB/s = {v / ceiling:4.2f} x dd ({ceiling:.0f} MiB/s), {v / uring:4.2f} x io_uring QD4 ({uring:.0f} MiB/s)")
        name = None
PY
