#!/usr/bin/env bash
# Resident memory of Tidegate and nginx holding idle keep-alive client connections.
#
#   benches/peers/idle-memory.sh         # CONNS (10000), SETTLE seconds before reading (10)
#
# Starts bench-backend, then each proxy in turn in front of it: Tidegate (`bench-config rules`,
# `--workers 1`, idle timeout 10 min, max_connections 20,000) and nginx (one worker, the
# config of benches/peers/nginx.conf.in with keepalive_timeout 10 min and room for the
# connections). A python3 client opens CONNS connections to the proxy, sends one request on
# each (`GET /envelopes/N` as app7, a distinct user per connection), reads the answer and
# leaves the connection open and idle. Resident memory (VmRSS of /proc/PID/status; nginx's
# master and worker summed) is read SETTLE seconds after start-up, before the connections;
# SETTLE seconds after the answers of the first half of them; and as long after the second
# half's. per_conn_bytes is the growth over all of them, marginal_bytes the second half's
# per connection (steadier: start-up's garbage and the allocator's first pages are behind). Tidegate parks a connection after a second
# idle, freeing what served it, and its allocator (mimalloc) gives freed pages back to the
# system only after a purge delay (1 s), at its next call that gets round to it; read at 3 s,
# part of the memory of the 10,000 served and parked connections is still counted. Uses the
# release binaries in target/release (build them first: cargo build --release -p tidegate
# -p tidegate-benches); TIDEGATE=/path/to/tidegate measures that binary instead. Needs nginx
# (apt-get install nginx).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
. "$ROOT/benches/peers/common.sh"
CONNS=${CONNS:-10000}
SETTLE=${SETTLE:-10}
BIN=$ROOT/target/release
DIR=$(mktemp -d /tmp/tidegate-idle.XXXXXX)
# The client, nginx and the backend each hold about CONNS descriptors; Tidegate up to twice
# that (a connection keeps its upstream connection until it parks, a second after its answer). Without the right to raise the
# hard limit, CONNS is lowered to what fits, and said.
want=$((CONNS * 2 + 512))
hard=$(ulimit -Hn)
if [ "$hard" != unlimited ] && [ "$hard" -lt "$want" ]; then
    CONNS=$(((hard - 512) / 2))
    echo "open-file hard limit $hard: CONNS lowered to $CONNS" >&2
    want=$hard
fi
ulimit -n "$want"
PIDS=()
trap stop_started EXIT

cat >"$DIR/idle.py" <<'EOF'
"""Open N idle keep-alive connections (one request each); print RSS before and with them."""
import os, selectors, socket, sys, time

port, n, settle, pids = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4:]

def rss_kib():
    """VmRSS of the processes and their children, in KiB."""
    seen, todo, total = set(), list(pids), 0
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
            for t in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{t}/children") as f:
                    todo += f.read().split()
        except (FileNotFoundError, StopIteration, ProcessLookupError):
            pass
    return total

# The baseline settles too: the start-up's garbage (a large rule set is parsed and compiled)
# is given back on the allocator's own schedule, and read too early it would be counted as
# memory the connections freed.
time.sleep(settle)
before = rss_kib()
sel = selectors.DefaultSelector()
socks, answered, t0 = [], 0, time.time()
BATCH = 100  # connect in batches: the listeners' accept queues (the backend's too) are finite


def open_idle(first, last):
    """Open connections first..last-1, one request on each, and leave them idle."""
    global answered
    for start in range(first, last, BATCH):
        pending = 0
        for i in range(start, min(last, start + BATCH)):
            s = socket.create_connection(("127.0.0.1", port))
            s.setblocking(False)
            s.sendall(f"GET /envelopes/{i} HTTP/1.1\r\nHost: 127.0.0.1\r\nx-app-id: app7\r\n"
                      f"x-user-id: idle-{i}\r\n\r\n".encode())
            sel.register(s, selectors.EVENT_READ, bytearray())
            socks.append(s)
            pending += 1
        while pending:
            events = sel.select(timeout=30)
            if not events:
                sys.exit(f"no answer on {pending} connections")
            for key, _ in events:
                buf = key.data
                chunk = key.fileobj.recv(65536)
                if not chunk:
                    sys.exit("a connection was closed")
                buf += chunk
                head, sep, body = bytes(buf).partition(b"\r\n\r\n")
                if not sep:
                    continue
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    k, _, v = line.partition(b":")
                    if k.strip().lower() == b"content-length":
                        length = int(v)
                if not head.startswith(b"HTTP/1.1 200"):
                    sys.exit(f"unexpected answer after {answered} answers: {bytes(buf)!r}")
                if len(body) >= length:
                    sel.unregister(key.fileobj)
                    pending -= 1
                    answered += 1


# Half, then the other half: the second half's growth is what one more idle connection
# costs once the process and its allocator are past their start-up (the marginal figure,
# the steadier of the two).
half = n // 2
open_idle(0, half)
time.sleep(settle)
mid = rss_kib()
open_idle(half, n)
time.sleep(settle)
with_conns = rss_kib()
print(f"connections={answered} before_kib={before} half_kib={mid} with_kib={with_conns} "
      f"per_conn_bytes={(with_conns - before) * 1024 // max(answered, 1)} "
      f"marginal_bytes={(with_conns - mid) * 1024 // max(answered - half, 1)} "
      f"open_secs={time.time() - t0:.1f}")
for s in socks:
    s.close()
EOF

BACK=$(port)
"$BIN/bench-backend" "127.0.0.1:$BACK" >"$DIR/backend.log" 2>&1 &
PIDS+=($!)
wait_port "$BACK"

measure() { # name port pid...
    local name=$1 p=$2; shift 2
    printf '%-9s ' "$name"
    python3 "$DIR/idle.py" "$p" "$CONNS" "$SETTLE" "$@"
}

# Tidegate: the realistic rules, one worker, connections kept idle long enough.
LISTEN=$(port); ADMIN=$(port)
"$BIN/bench-config" "${RULES:-rules}" "127.0.0.1:$LISTEN" "127.0.0.1:$ADMIN" "127.0.0.1:$BACK" |
    python3 -c 'import json,sys; c=json.load(sys.stdin)
c["server"]["limits"] = {"idle_timeout_ms": 600000, "max_connections": 20000}
json.dump(c, sys.stdout)' >"$DIR/gw.json"
RUST_LOG=${RUST_LOG:-warn} "${TIDEGATE:-$BIN/tidegate}" run --config "$DIR/gw.json" --workers 1 >"$DIR/gw.log" 2>&1 &
TG=$!
PIDS+=($TG)
wait_port "$LISTEN"
sleep 1
measure tidegate "$LISTEN" "$TG"
kill "$TG"; wait "$TG" 2>/dev/null || true

# nginx: one worker (and its master), the peer comparison's config.
LISTEN=$(port)
sed -e "s#@DIR@#$DIR#g" -e "s#@LISTEN@#127.0.0.1:$LISTEN#g" -e "s#@BACKEND@#127.0.0.1:$BACK#g" \
    -e "s#worker_connections 10000;#worker_connections $((CONNS * 2 + 1024));#" \
    -e "s#^worker_processes 1;#worker_processes 1;\nworker_rlimit_nofile $want;#" \
    -e "s#keepalive_requests 1000000;#keepalive_requests 1000000;\n    keepalive_timeout 600s;#" \
    "$ROOT/benches/peers/nginx.conf.in" >"$DIR/nginx.conf"
"$(command -v nginx || echo /usr/sbin/nginx)" -c "$DIR/nginx.conf" -p "$DIR" >"$DIR/nginx.log" 2>&1 &
NG=$!
PIDS+=($NG)
wait_port "$LISTEN"
sleep 1
measure nginx "$LISTEN" "$NG"
kill "$NG"; wait "$NG" 2>/dev/null || true
echo "logs in $DIR"
