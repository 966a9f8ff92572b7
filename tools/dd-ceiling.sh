# Sourced by the bench scripts: the disk ceiling, measured the same way in both.
# dd_ceiling DIR: writes 2 GiB with dd O_DIRECT in 1 MiB blocks (queue depth 1),
# prints dd's summary on stderr and the seconds it took on stdout.
dd_ceiling() {
  echo "== disk ceiling: dd oflag=direct bs=1M count=2048" >&2
  local out
  out=$(dd if=/dev/zero of="$1/dd.test" bs=1M count=2048 oflag=direct 2>&1 | tail -1)
  rm -f "$1/dd.test"
  echo "$out" >&2
  echo "$out" | sed -E 's/.* copied, ([0-9.]+) s.*/\1/'
}
