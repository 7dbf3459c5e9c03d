#!/usr/bin/env bash
# Resident memory of Tidegate and nginx holding idle keep-alive client connections.
#
#   benches/peers/idle-memory.sh         # CONNS (10000), SETTLE seconds before reading (10)
#
# Starts bench-backend, then each proxy in turn in front of it: Tidegate (`bench-config rules`,
# `--workers 1`, idle timeout 10 min, head deadline 5 min, max_connections 20,000: the
# `idle_config` of common.sh) and nginx (one worker, the config of benches/peers/nginx.conf.in
# with keepalive_timeout 10 min and room for the connections). A python3 client
# (benches/peers/idle_client.py) opens CONNS connections to the proxy, sends one request on
# each (`GET /envelopes/N` as app7, a distinct user per connection), reads the answer and
# leaves the connection open and idle. Resident memory (VmRSS of /proc/PID/status; nginx's
# master and worker summed) is read SETTLE seconds after start-up, before the connections,
# and SETTLE seconds after the last answer; the client fails if the proxy closed any
# connection meanwhile. Tidegate's workers ask the allocator to give freed pages back as
# they go idle (at most once a second), so its figure settles a few seconds after the
# burst; benches/peers/idle-heap.sh counts its heap per idle connection exactly. Uses the release binaries in target/release (build them first: cargo
# build --release -p tidegate -p tidegate-benches); TIDEGATE=/path/to/tidegate measures that
# binary instead. Needs nginx (apt-get install nginx).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
. "$ROOT/benches/peers/common.sh"
CONNS=${CONNS:-10000}
SETTLE=${SETTLE:-10}
BIN=$ROOT/target/release
DIR=$(mktemp -d /tmp/tidegate-idle.XXXXXX)
# The client, nginx and the backend each hold about CONNS descriptors; Tidegate up to twice
# that (a connection keeps its upstream connection until it parks, a second after its
# answer). Without the right to raise the hard limit, CONNS is lowered to what fits, and said.
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

BACK=$(port)
"$BIN/bench-backend" "127.0.0.1:$BACK" >"$DIR/backend.log" 2>&1 &
PIDS+=($!)
wait_port "$BACK"

measure() { # name port pid...
    local name=$1 p=$2; shift 2
    printf '%-9s ' "$name"
    python3 "$ROOT/benches/peers/idle_client.py" "$p" "$CONNS" "$SETTLE" "$@"
}

# Tidegate: the realistic rules, one worker, connections kept idle long enough.
LISTEN=$(port); ADMIN=$(port)
idle_config "${RULES:-rules}" "$LISTEN" "$ADMIN" "$BACK" >"$DIR/gw.json"
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
