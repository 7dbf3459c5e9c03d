#!/usr/bin/env bash
# System calls and voluntary context switches per request, Tidegate (bench-config rules and
# norules) against nginx, pinned as run.sh's split layout: the proxy on PROXY_CPU (0), the
# load tool and the backend on LOAD_CPU (1). For each proxy: 1 s of closed-loop warm-up,
# then SECS (5) of closed loop on CONNS (50) connections while `perf stat` counts the
# kernel's syscall tracepoints for the proxy's process; the counts are divided by the
# requests answered.
#
#   benches/peers/syscalls.sh             # uses target/release (build it first)
#   PGO=1 benches/peers/syscalls.sh       # the profile-guided build (scripts/pgo-build.sh)
#   TIDEGATE=/path/to/tidegate benches/peers/syscalls.sh
#
# Needs perf with access to tracepoints (root, or kernel.perf_event_paranoid <= -1) and nginx.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
. "$ROOT/benches/peers/common.sh"
BIN=$ROOT/target/release
TIDEGATE=${TIDEGATE:-$BIN/tidegate}
[ "${PGO:-0}" = 1 ] && TIDEGATE=$ROOT/target/pgo/release/tidegate
SECS=${SECS:-5}
CONNS=${CONNS:-50}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
DIR=$(mktemp -d /tmp/tidegate-syscalls.XXXXXX)
PIDS=()
trap stop_and_clean EXIT

CALLS=(recvfrom sendto read write readv writev recvmsg sendmsg epoll_wait epoll_ctl futex madvise)
EVENTS=raw_syscalls:sys_enter
for c in "${CALLS[@]}"; do EVENTS+=",syscalls:sys_enter_$c"; done

BACK=$(port)
taskset -c "$LOAD_CPU" "$BIN/bench-backend" "127.0.0.1:$BACK" 1 >"$DIR/backend.log" 2>&1 &
PIDS+=($!)
wait_port "$BACK"

load() { # port secs [json]
    local json=()
    [ -n "${3:-}" ] && json=(--json "$3")
    timeout $(( $2 + 30 )) taskset -c "$LOAD_CPU" "$BIN/tidegate-pressure" "$ROOT/benches/scenarios/peer-get.json" \
        --target "http://127.0.0.1:$1" --connections "$CONNS" --threads 1 --closed-loop \
        --time-scale "$(awk "BEGIN{print $2/5}")" --quiet "${json[@]}" >/dev/null
}

switches() { awk '/^voluntary_ctxt_switches/ {print $2}' "/proc/$1/status"; }

measure() { # name pid port
    load "$3" 1
    local before reqs
    before=$(switches "$2")
    perf stat -x, -e "$EVENTS" -p "$2" -o "$DIR/$1.perf" &
    local perf=$!
    load "$3" "$SECS" "$DIR/$1.json"
    kill -INT "$perf"; wait "$perf" || true
    reqs=$(python3 -c "import json; print(json.load(open('$DIR/$1.json'))['overall']['succeeded'])")
    printf '%s: %s requests; per request: voluntary context switches %s\n' "$1" "$reqs" \
        "$(awk -v a="$before" -v b="$(switches "$2")" -v r="$reqs" 'BEGIN {printf "%.3f", (b - a) / r}')"
    awk -F, -v r="$reqs" '!/^#/ && $1 > 0 {sub(/^(raw_)?syscalls:sys_enter_?/, "", $3); printf "  %-12s %.3f\n", ($3 == "" ? "all" : $3), $1 / r}' "$DIR/$1.perf"
}

for mode in rules norules; do
    P=$(port); A=$(port)
    "$BIN/bench-config" "$mode" "127.0.0.1:$P" "127.0.0.1:$A" "127.0.0.1:$BACK" >"$DIR/$mode.json"
    RUST_LOG=warn taskset -c "$PROXY_CPU" "$TIDEGATE" run --config "$DIR/$mode.json" --workers 1 >"$DIR/$mode.log" 2>&1 &
    pid=$!; PIDS+=($pid)
    wait_port "$P"
    measure "tidegate-$mode" "$pid" "$P"
    kill "$pid"
done
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
P=$(port)
sed -e "s#@DIR@#$DIR#g" -e "s#@LISTEN@#127.0.0.1:$P#g" -e "s#@BACKEND@#127.0.0.1:$BACK#g" \
    "$ROOT/benches/peers/nginx.conf.in" >"$DIR/nginx.conf"
taskset -c "$PROXY_CPU" "$NGINX" -c "$DIR/nginx.conf" -p "$DIR" -g "master_process off;" >"$DIR/nginx.log" 2>&1 &
pid=$!; PIDS+=($pid)
wait_port "$P"
measure nginx "$pid" "$P"
