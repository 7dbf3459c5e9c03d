#!/usr/bin/env bash
# Heap bytes per idle keep-alive connection in Tidegate, counted exactly: the steady figure
# behind idle-memory.sh's resident memory (which spreads between runs of one build, as the
# allocator gives freed pages back lazily and partly).
#
#   benches/peers/idle-heap.sh         # CONNS (3000), SETTLE seconds (15)
#
# Builds Tidegate with the `system-allocator` feature (valgrind's massif counts only the
# system allocator's calls; thin LTO, in target/heap) unless TIDEGATE names a binary built
# so. Starts bench-backend and Tidegate under massif (`bench-config rules`, one worker, idle
# timeout 10 min), lets it settle, takes a heap snapshot, opens CONNS connections with one
# request each (benches/peers/idle_client.py), lets them go idle for SETTLE seconds and takes
# another. Prints the live heap (massif's mem_heap_B: what the program asked for) and the
# allocator's overhead on it (mem_heap_extra_B, massif's estimate) per connection; the
# snapshots are kept for ms_print. Needs valgrind, and target/release's bench-backend and
# bench-config (cargo build --release -p tidegate-benches).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
. "$ROOT/benches/peers/common.sh"
CONNS=${CONNS:-3000}
SETTLE=${SETTLE:-15}
BIN=$ROOT/target/release
DIR=$(mktemp -d /tmp/tidegate-heap.XXXXXX)
if [ -z "${TIDEGATE:-}" ]; then
    cargo build --release -q -p tidegate --bin tidegate --features system-allocator \
        --target-dir "$ROOT/target/heap" --config profile.release.lto='"thin"'
    TIDEGATE=$ROOT/target/heap/release/tidegate
fi
ulimit -n $((CONNS * 2 + 512))
PIDS=()
trap stop_started EXIT
BACK=$(port); LISTEN=$(port); ADMIN=$(port)
"$BIN/bench-backend" "127.0.0.1:$BACK" >"$DIR/backend.log" 2>&1 &
PIDS+=($!)
wait_port "$BACK"
idle_config rules "$LISTEN" "$ADMIN" "$BACK" >"$DIR/gw.json"
valgrind --tool=massif --vgdb=yes --massif-out-file="$DIR/massif.out" \
    "$TIDEGATE" run --config "$DIR/gw.json" --workers 1 >"$DIR/gw.log" 2>&1 &
VG=$!
PIDS+=($VG)
wait_port "$LISTEN"
python3 "$ROOT/benches/peers/idle_client.py" "$LISTEN" "$CONNS" "$SETTLE" \
    --then "vgdb --pid=$VG snapshot $DIR/heap.\$POINT >/dev/null 2>&1" >"$DIR/client.txt"
python3 - "$DIR" "$(cat "$DIR/client.txt")" <<'PY'
import re, sys
d, client = sys.argv[1], sys.argv[2]
n = int(re.search(r"connections=(\d+)", client).group(1))
def heap(name):
    text = open(f"{d}/heap.{name}").read()
    return [int(re.search(rf"^{k}=(\d+)", text, re.M).group(1))
            for k in ("mem_heap_B", "mem_heap_extra_B")]
(b, be), (w, we) = heap("before"), heap("with")
print(f"connections={n} heap_before={b} heap_with={w} heap_per_conn={(w - b) // n} "
      f"overhead_per_conn={(we - be) // n} snapshots in {d}/heap.*")
PY
