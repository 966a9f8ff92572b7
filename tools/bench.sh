#!/usr/bin/env bash
# The whole comparison in one run (issue 4): the machine's ceilings, the standard
# scenarios through ringbus-loadgen, and the same workloads against Redis Streams,
# then one table with ringbus as a ratio of each ceiling and of the peer.
#
#   tools/bench.sh [SCRATCH_DIR]      (default: target/bench; needs root for apt-get)
#
# Environment: DURATION (default 10s) and WARMUP (2s) per timed scenario;
# BACKLOG_MSGS (2000000, about 2 GB) for the catch-up scenario; SETTLE_S (30, in
# seconds) of idle before e, before each floor and before e-steady; STEADY_RETENTION
# (1073741824 bytes) and STEADY_WARMUP (4s) for the steady-state rows.
#
# The standard scenarios run on a fresh broker: every segment is a new file. The
# steady-state rows (a-steady, e-steady: a and e again, on a topic with a size limit
# that the warm-up passes) measure a broker that has run past its retention, where
# each new segment reuses an expired segment's file (docs/ARCHITECTURE.md, "Recycled
# segments"). They are reported beside the targets, which are judged on a and e.
#
# Ceilings, measured first:
#   - disk: dd O_DIRECT sequential write, 2 GiB in 1 MiB blocks (queue depth 1);
#   - disk best: fio, 1 MiB O_DIRECT writes through io_uring, 4 jobs x queue depth 32;
#   - fsync latency: fio, 1 MiB O_DIRECT writes each followed by fdatasync (p50/p99);
#   - loopback TCP: iperf3, one stream, 5 s;
#   - and, after e and SETTLE_S of idle, e's floor: the device alone at e's rate,
#     open loop, with an ideal group commit: each message's latency from its
#     intended send time to durable, as the load generator measures e (no broker,
#     network or load generator); and before e-steady, e-steady's floor: the same
#     over blocks written before, as e-steady's recycled segment files are.
# Scenarios (1 KB messages unless noted; embedded broker with its default placement):
#   a  1 producer, 1 partition, batches of 1,000, fsync
#   b  the same with memory durability
#   c  4 producers x 4 partitions across the shards, fsync
#   d  1 consumer catching up on a backlog of BACKLOG_MSGS written just before
#   d-cold  the same after a broker restart with the segments out of the page cache
#      (read from the disk; no target, no peer figure)
#   e  fixed rate at 50% of a's throughput, fsync, 1 live consumer: latency
#      percentiles, after SETTLE_S of idle: right after d-cold (2 GB written, then
#      read back), e's p99 was 4-7x what it was 20-30 s later (docs/PERFORMANCE.md),
#      and the fsync ceiling it is held to was measured on a device at rest
#   f  100 B messages in batches of 100, fsync
# Peer: redis-server from Debian, Redis Streams (XADD / XRANGE) driven by
# redis-benchmark with pipelines the size of ringbus's batches; appendfsync always
# stands for fsync durability, appendonly with appendfsync no for memory.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/bench}
mkdir -p "$out"
out=$(cd "$out" && pwd)
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-2s}
BACKLOG_MSGS=${BACKLOG_MSGS:-2000000}
SETTLE_S=${SETTLE_S:-30}

need=()
command -v fio >/dev/null || need+=(fio)
command -v iperf3 >/dev/null || need+=(iperf3)
command -v redis-server >/dev/null || need+=(redis-server)
command -v redis-benchmark >/dev/null || need+=(redis-tools)
if ((${#need[@]})); then
  echo "== installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

echo "== building"
cargo build --release -q -p ringbus-loadgen
loadgen=target/release/ringbus-loadgen

. tools/dd-ceiling.sh
dd_secs=$(dd_ceiling "$out")
disk_mb=$(python3 -c "print(2048*1048576/$dd_secs/1e6)")

# The device's best write bandwidth, with as much in flight as it can use: the
# ceiling for memory durability (b), which acknowledges once the write landed.
echo "== disk best: fio, 1 MiB O_DIRECT writes through io_uring, 4 jobs x queue depth 32"
fio --name=best --directory="$out" --rw=write --bs=1M --size=512M --numjobs=4 --iodepth=32 \
  --direct=1 --ioengine=io_uring --group_reporting --output-format=json >"$out/fio-best.json" 2>/dev/null
rm -f "$out"/best.*
best_mb=$(python3 -c "import json; print(json.load(open('$out/fio-best.json'))['jobs'][0]['write']['bw_bytes']/1e6)")
printf 'disk best: %.0f MB/s\n' "$best_mb"

echo "== fsync latency: fio, 1 MiB O_DIRECT writes, fdatasync after each"
fio --name=fsync --directory="$out" --rw=write --bs=1M --size=512M --direct=1 \
  --ioengine=psync --fdatasync=1 --output-format=json >"$out/fio-fsync.json" 2>/dev/null
rm -f "$out"/fsync.*
read -r fsync_p50 fsync_p99 < <(python3 - "$out/fio-fsync.json" <<'PY'
import json, sys
p = json.load(open(sys.argv[1]))["jobs"][0]["sync"]["lat_ns"]["percentile"]
print(p["50.000000"] / 1000, p["99.000000"] / 1000)
PY
)
echo "fdatasync p50 ${fsync_p50} us, p99 ${fsync_p99} us"

echo "== loopback ceiling: iperf3, 1 stream, 5 s"
iperf3 -s -p 5299 -1 >/dev/null 2>&1 &
sleep 0.5
iperf3 -c 127.0.0.1 -p 5299 -t 5 -J >"$out/iperf3.json"
wait
loop_mb=$(python3 -c "import json; print(json.load(open('$out/iperf3.json'))['end']['sum_received']['bits_per_second']/8/1e6)")
printf 'loopback: %.0f MB/s\n' "$loop_mb"

run() { # name, loadgen args...
  local name=$1
  shift
  echo "== ringbus scenario $name: $*"
  "$loadgen" --embedded --quiet --json "$out/ringbus-$name.json" "$@"
}
run a --producers 1 --partitions 1 --consumers 0 --batch-size 1000 --durability fsync --duration "$DURATION" --warmup "$WARMUP"
run b --producers 1 --partitions 1 --consumers 0 --batch-size 1000 --durability memory --duration "$DURATION" --warmup "$WARMUP"
run c --broker-cores 2 --producers 4 --partitions 4 --consumers 0 --batch-size 1000 --durability fsync --duration "$DURATION" --warmup "$WARMUP"
run d --producers 1 --partitions 1 --consumers 1 --batch-size 1000 --durability memory --messages "$BACKLOG_MSGS" --catch-up
run d-cold --producers 1 --partitions 1 --consumers 1 --batch-size 1000 --durability memory --messages "$BACKLOG_MSGS" --catch-up --cold
half=$(python3 -c "import json; print(int(json.load(open('$out/ringbus-a.json'))['produce_msgs_per_s'] / 2))")
echo "== settling for ${SETTLE_S} s before e (the fsync ceiling was measured at rest)"
sleep "$SETTLE_S"
run e --producers 1 --partitions 1 --consumers 1 --batch-size 1000 --linger-us 500 --durability fsync --rate "$half" --duration "$DURATION" --warmup "$WARMUP"

# e's floor on this disk: what the device alone, driven open loop at e's rate, gives a
# message, with no broker, network or load generator. Batches close on e's schedule
# (one per linger, 500 us); whenever the writer is free it writes every batch closed
# so far in one O_DIRECT write and fdatasyncs (an ideal group commit); a message's
# latency runs from its intended send time to the end of that fdatasync, as the load
# generator measures e (so a slow write delays every message due meanwhile, and not
# just one sample). A message's acknowledgement cannot beat it.
# Two forms: FRESH writes only blocks never written, as e's fresh segments do (room
# for the whole run, fallocated); RECYCLED first writes a STEADY_RETENTION-sized area
# once and then goes round it, as e-steady's recycled segment files do (overwritten
# blocks skip ext4's unwritten-extent conversion). Prints p50 p99 of the messages and
# p50 p99 of the write + fdatasync cycles, in us.
cat >"$out/floor.py" <<'PY'
import mmap, os, sys, time
path, rate, mode, recycle_area = sys.argv[1], float(sys.argv[2]), sys.argv[3], int(sys.argv[4])
record = 1024 + 32  # a 1 KB message as stored, batch header amortised
per_batch = max(1.0, min(1000, rate * 500e-6))  # --batch-size 1000, --linger-us 500
interval = per_batch / rate  # one batch closes every interval
secs, most = 10, 64 << 20
bsize = int(per_batch * record)
if mode == "fresh":
    area = (int(rate * record * (secs + 1)) // 4096 + 1) * 4096
else:
    area = max(recycle_area // 4096 * 4096, 4 * most)
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT)
os.posix_fallocate(fd, 0, area)  # like a segment: allocated, never written
buf = mmap.mmap(-1, most)  # page-aligned, as O_DIRECT needs
buf.write(os.urandom(most))
view = memoryview(buf)
if mode == "recycled":  # every block written once, as in a recycled segment file
    for o in range(0, area, most):
        os.pwritev(fd, [view[:min(most, area - o)]], o)
    os.fdatasync(fd)
    time.sleep(2)
lat, cycles, off, written = [], [], 0, 0
start = time.perf_counter()
while (now := time.perf_counter()) - start < secs:
    closed = int((now - start) / interval)
    if closed == written:
        time.sleep(max(0.0, start + (written + 1) * interval - now))
        continue
    size = ((closed - written) * bsize + 4095) // 4096 * 4096
    if off + size > area:
        if mode == "fresh":
            break  # cannot happen at the planned rate; never overwrite
        off = 0  # round the recycled area again
    for part in range(0, size, most):  # a backlog past the buffer, in pieces
        os.pwritev(fd, [view[:min(most, size - part)]], off + part)
    os.fdatasync(fd)
    done = time.perf_counter()
    cycles.append((done - now) * 1e6)
    for k in range(written, closed):
        # 8 of the batch's messages, spread over the linger it spent filling
        first = start + k * interval
        lat.extend((done - first - j * interval / 8) * 1e6 for j in range(8))
    written, off = closed, off + size
os.close(fd)
os.unlink(path)
lat.sort()
cycles.sort()
q = lambda a, p: a[int(p * (len(a) - 1))]
print(f"{q(lat, .5):.0f} {q(lat, .99):.0f} {q(cycles, .5):.0f} {q(cycles, .99):.0f}")
PY
STEADY_RETENTION=${STEADY_RETENTION:-1073741824}
STEADY_WARMUP=${STEADY_WARMUP:-4s}
echo "== settling for ${SETTLE_S} s, then e floor: the device alone at e's rate, open loop, ideal group commit, 10 s"
sleep "$SETTLE_S"
read -r floor_p50 floor_p99 cycle_p50 cycle_p99 < <(python3 "$out/floor.py" "$out/floor" "$half" fresh 0)
echo "e floor: a message, intended send to durable, p50 ${floor_p50} us, p99 ${floor_p99} us;" \
  "one group-commit cycle (write + fdatasync) p50 ${cycle_p50} us, p99 ${cycle_p99} us"
run f --producers 1 --partitions 1 --consumers 0 --message-size 100 --batch-size 100 --durability fsync --duration "$DURATION" --warmup "$WARMUP"
run a-steady --producers 1 --partitions 1 --consumers 0 --batch-size 1000 --durability fsync --duration "$DURATION" --warmup "$STEADY_WARMUP" --retention-bytes "$STEADY_RETENTION"
echo "== settling for ${SETTLE_S} s, then e-steady's floor: the device alone at e's rate over blocks written before, 10 s"
sleep "$SETTLE_S"
read -r rfloor_p50 rfloor_p99 rcycle_p50 rcycle_p99 < <(python3 "$out/floor.py" "$out/floor" "$half" recycled "$STEADY_RETENTION")
echo "e-steady floor: a message, intended send to durable, p50 ${rfloor_p50} us, p99 ${rfloor_p99} us;" \
  "one cycle p50 ${rcycle_p50} us, p99 ${rcycle_p99} us"
echo "== settling for ${SETTLE_S} s before e-steady"
sleep "$SETTLE_S"
run e-steady --producers 1 --partitions 1 --consumers 1 --batch-size 1000 --linger-us 500 --durability fsync --rate "$half" --duration "$DURATION" --warmup "$STEADY_WARMUP" --retention-bytes "$STEADY_RETENTION"

echo "== peer: Redis Streams ($(redis-server --version | awk '{print $3}'))"
redis_dir="$out/redis"
redis_port=6399
start_redis() { # appendfsync mode
  rm -rf "$redis_dir" && mkdir -p "$redis_dir"
  redis-server --port $redis_port --dir "$redis_dir" --save "" --appendonly yes \
    --appendfsync "$1" --daemonize yes --logfile "$redis_dir/log" --pidfile "$redis_dir/pid"
  for _ in $(seq 50); do redis-cli -p $redis_port ping >/dev/null 2>&1 && return; sleep 0.1; done
  echo "redis did not start" >&2
  exit 1
}
stop_redis() {
  redis-cli -p $redis_port shutdown nosave >/dev/null 2>&1 || true
  sleep 0.5
}
value1k=$(head -c 1024 /dev/zero | tr '\0' x)
value100=$(head -c 100 /dev/zero | tr '\0' x)
bench_redis() { # name, redis-benchmark args... (prints requests per second)
  local name=$1
  shift
  redis-benchmark -p $redis_port --csv "$@" >"$out/redis-$name.csv"
  tail -1 "$out/redis-$name.csv" | cut -d, -f2 | tr -d '"'
}
start_redis always
redis_a=$(bench_redis a -c 1 -P 1000 -n 1000000 XADD s '*' v "$value1k")
redis_c=$(bench_redis c -c 4 -P 1000 -n 2000000 -r 4 XADD 's:__rand_int__' '*' v "$value1k")
# f: as many XADDs in flight as ringbus-loadgen has messages in flight (16 requests of
# 100); Redis did better with that than with -P 100 (221k against 186k XADD/s). For
# a-c, -P 1000 is Redis's better depth (-P 16000 gave 39k against 48k XADD/s).
redis_f=$(bench_redis f -c 1 -P 1600 -n 2000000 XADD small '*' v "$value100")
stop_redis
start_redis "no"
redis_b=$(bench_redis b -c 1 -P 1000 -n 1000000 XADD s '*' v "$value1k")
# d: 1,000-entry ranges of the 1 GB stream just written (Redis serves every range
# from memory, so reading the same range again costs what a new one does).
redis_d=$(bench_redis d -c 1 -P 1 -n 3000 XRANGE s - + COUNT 1000)
stop_redis
echo "redis XADD/s: a=$redis_a b=$redis_b c=$redis_c f=$redis_f; XRANGE(1000)/s: d=$redis_d"

echo
python3 - "$out" "$disk_mb" "$loop_mb" "$fsync_p50" "$fsync_p99" "$floor_p50" "$floor_p99" "$best_mb" \
  "$cycle_p50" "$cycle_p99" "$redis_a" "$redis_b" "$redis_c" "$redis_d" "$redis_f" \
  "$rfloor_p50" "$rfloor_p99" "$rcycle_p50" "$rcycle_p99" <<'PY'
import json, sys
out, disk, loop, f50, f99, floor50, floor99, best, cyc50, cyc99 = sys.argv[1], *map(float, sys.argv[2:11])
redis = dict(zip("abcdf", (float(x) for x in sys.argv[11:16])))
rfloor50, rfloor99, rcyc50, rcyc99 = map(float, sys.argv[16:20])
r = {s: json.load(open(f"{out}/ringbus-{s}.json")) for s in [*"abcdef", "d-cold", "a-steady", "e-steady"]}
# Redis figures in MB/s of message payload: XADDs per second x value size;
# XRANGE calls per second x 1,000 entries x 1 KB.
redis_mb = {"a": redis["a"] * 1024 / 1e6, "b": redis["b"] * 1024 / 1e6,
            "c": redis["c"] * 1024 / 1e6, "f": redis["f"] * 100 / 1e6,
            "d": redis["d"] * 1000 * 1024 / 1e6}
print(f"ceilings: disk (dd O_DIRECT) {disk:.0f} MB/s, loopback (iperf3) {loop:.0f} MB/s, "
      f"fdatasync after 1 MiB p50 {f50:.0f} us / p99 {f99:.0f} us")
print(f"device alone: best write bandwidth (fio 4 x QD32) {best:.0f} MB/s; at e's rate, open loop "
      f"with an ideal group commit: a message from its intended send to durable p50 {floor50:.0f} us / "
      f"p99 {floor99:.0f} us (one write + fdatasync cycle p50 {cyc50:.0f} / p99 {cyc99:.0f} us); "
      f"the same over blocks written before (e-steady's floor): p50 {rfloor50:.0f} us / p99 {rfloor99:.0f} us "
      f"(cycle p50 {rcyc50:.0f} / p99 {rcyc99:.0f} us)")
print()
hdr = f"{'scenario':<44} {'ringbus':>12} {'msgs/s':>11} {'vs disk':>8} {'vs loop':>8} {'redis':>10} {'vs redis':>9}"
print(hdr)
print("-" * len(hdr))
names = {
    "a": "a 1p/1part 1KB x1000 fsync (produce)",
    "b": "b 1p/1part 1KB x1000 memory (produce)",
    "c": "c 4p/4part 2 shards fsync (produce)",
    "d": "d catch-up consumer (consume)",
    "d-cold": "d-cold catch-up after a restart (from disk)",
    "e": "e fixed rate 50% of a, fsync (produce)",
    "f": "f 100 B x100 fsync (produce)",
    "a-steady": "a-steady: a past retention (recycled files)",
    "e-steady": "e-steady: e past retention (recycled files)",
}
rows = {}
for s in [*"abcd", "d-cold", *"ef", "a-steady", "e-steady"]:
    j = r[s]
    mb = j["consume_mb_per_s"] if s.startswith("d") else j["produce_mb_per_s"]
    msgs = j["consume_msgs_per_s"] if s.startswith("d") else j["produce_msgs_per_s"]
    peer = redis_mb.get(s)
    rows[s] = mb
    print(f"{names[s]:<44} {mb:>7.0f} MB/s {msgs:>11.0f} {mb/disk:>7.2f}x {mb/loop:>7.2f}x "
          + (f"{peer:>5.0f} MB/s {mb/peer:>8.2f}x" if peer else f"{'n/a':>10} {'':>9}"))
print()
for s in ("e", "e-steady"):
    lat, lat2 = r[s]["produce_ack_us"], r[s]["end_to_end_us"] or {}
    label = f"{s} latency (us):"
    print(f"{label:<22}" + "  ".join(f"{k}={lat[k]}" for k in ("p50", "p90", "p99", "p99_9", "p99_99", "max"))
          + "  (produce ack)")
    if lat2:
        print(" " * 22 + "  ".join(f"{k}={lat2[k]}" for k in ("p50", "p90", "p99", "p99_9", "p99_99", "max"))
              + "  (end to end)")
ack = r["e"]["produce_ack_us"]
print()
checks = [
    ("a produces at >= 0.70x the disk ceiling", rows["a"] / disk, 0.70),
    ("b produces at >= 0.70x the loopback ceiling", rows["b"] / loop, 0.70),
    ("d consumes at >= 0.70x the loopback ceiling", rows["d"] / loop, 0.70),
]
for name, got, want in checks:
    print(f"target: {name}: {got:.2f}x  {'met' if got >= want else 'MISSED'}")
print(f"        (b's target is {0.7 * loop:.0f} MB/s; the device's best write bandwidth {best:.0f} MB/s; "
      f"b = {rows['b'] / best:.2f}x of it)")
got = ack["p99"] / f99
print(f"target: e p99 ack <= 3x fdatasync p99: {ack['p99']:.0f} us = {got:.1f}x  {'met' if got <= 3 else 'MISSED'}")
print(f"        (target {3 * f99:.0f} us; the device alone at e's rate, open loop: p99 {floor99:.0f} us, "
      f"{floor99 / (3 * f99):.1f}x the target; ringbus = {ack['p99'] / floor99:.1f}x that floor)")
steady = r["e-steady"]["produce_ack_us"]["p99"]
print(f"        (e-steady, past retention: p99 ack {steady:.0f} us = {steady / f99:.1f}x the fdatasync p99; "
      f"its floor, the device alone over blocks written before: p99 {rfloor99:.0f} us, "
      f"{rfloor99 / (3 * f99):.1f}x the target; ringbus = {steady / rfloor99:.1f}x that floor)")
print(f"        (a-steady {rows['a-steady'] / disk:.2f}x the disk ceiling)")
for s in "abcdf":
    ratio = rows[s] / redis_mb[s]
    print(f"target: {s} beats redis: {ratio:.2f}x  {'met' if ratio > 1 else 'MISSED'}")
json.dump({"disk_mb_per_s": disk, "disk_best_mb_per_s": best, "loopback_mb_per_s": loop,
           "fdatasync_p50_us": f50, "fdatasync_p99_us": f99, "e_floor_p50_us": floor50,
           "e_floor_p99_us": floor99, "e_floor_cycle_p50_us": cyc50,
           "e_floor_cycle_p99_us": cyc99, "e_steady_floor_p50_us": rfloor50,
           "e_steady_floor_p99_us": rfloor99, "e_steady_floor_cycle_p50_us": rcyc50,
           "e_steady_floor_cycle_p99_us": rcyc99, "redis_mb_per_s": redis_mb,
           "ringbus": r},
          open(f"{out}/summary.json", "w"), indent=1)
PY
