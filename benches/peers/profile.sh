#!/usr/bin/env bash
# User-space instructions per request of Tidegate's request path, under callgrind: the
# steady figure to compare code changes on a noisy machine (scheduler noise does not change
# instruction counts). Starts bench-backend, Tidegate (bench-config rules|norules) under
# valgrind with collection off, warms up, switches collection on for a fixed open-loop run of
# the peer request, and prints instructions per request plus the top functions.
#
#   benches/peers/profile.sh [rules|norules|nginx|haproxy]   # RATE (400 req/s), SECS (10), CONNS (10)
#
# `nginx` and `haproxy` profile those proxies by the same method (one process, one worker or
# thread, the configs of benches/peers/*.in, which do the same forwarding-header work), so the
# figures compare. Needs valgrind (and nginx or haproxy for those modes: apt-get install
# nginx haproxy). Uses the release binaries in target/release (build them first);
# TIDEGATE=/path/to/another/tidegate profiles that binary instead (an older build, for A/B).
# TRACING='{"sample_ratio": 0.1, "otlp_endpoint": "http://@BACKEND@/v1/traces"}' sets the
# gateway's `server.tracing` to that object (rules|norules), `@BACKEND@` replaced by the
# backend's address: bench-backend answers every POST 200, so it stands in for the OTLP
# collector and the export's whole cost (encoding, the POSTs) is counted.
# Where two profiles differ, per request and by function (the rules' cost: profile `rules`,
# then `norules`, then `benches/peers/profile_diff.py /tmp/tidegate-profile-rules.out
# /tmp/tidegate-profile-norules.out`; an A/B: copy the first build's profile aside first).
# CACHE=1 also simulates the caches (valgrind's --cache-sim, several times slower) and
# prints the L1 misses per request: instructions, data reads and data writes. User time
# follows them as well as the instruction count (an L1 miss costs about ten cycles).
# INSTR=1 keeps costs per instruction address (valgrind's --dump-instr), to read a profile
# instruction by instruction (kcachegrind's machine-code view, or the addresses matched
# against `objdump -d -l` of the binary): which instructions of an inlined path a change
# removed, where a function-level diff only shows the caller's total.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
. "$ROOT/benches/peers/common.sh"
MODE=${1:-rules}
RATE=${RATE:-400}
SECS=${SECS:-10}
CONNS=${CONNS:-10}
BIN=$ROOT/target/release
DIR=$(mktemp -d /tmp/tidegate-profile.XXXXXX)
PIDS=()
trap stop_started EXIT
BACK=$(port); LISTEN=$(port); ADMIN=$(port)
"$BIN/bench-backend" "127.0.0.1:$BACK" >"$DIR/backend.log" 2>&1 &
PIDS+=($!)
# The proxy under test, as one process: Tidegate with one worker, nginx without its master
# process, HAProxy with one thread in the foreground.
case "$MODE" in
    rules|norules)
        "$BIN/bench-config" "$MODE" "127.0.0.1:$LISTEN" "127.0.0.1:$ADMIN" "127.0.0.1:$BACK" >"$DIR/gw.json"
        if [ -n "${TRACING:-}" ]; then
            TRACING=${TRACING//@BACKEND@/127.0.0.1:$BACK} python3 - "$DIR/gw.json" <<'PY'
import json, os, sys
c = json.load(open(sys.argv[1]))
c["server"]["tracing"] = json.loads(os.environ["TRACING"])
json.dump(c, open(sys.argv[1], "w"))
PY
        fi
        PROXY=("${TIDEGATE:-$BIN/tidegate}" run --config "$DIR/gw.json" --workers "${WORKERS:-1}") ;;
    nginx|haproxy)
        conf=$([ "$MODE" = nginx ] && echo nginx.conf || echo haproxy.cfg)
        sed -e "s#@DIR@#$DIR#g" -e "s#@LISTEN@#127.0.0.1:$LISTEN#g" -e "s#@BACKEND@#127.0.0.1:$BACK#g" \
            "$ROOT/benches/peers/$conf.in" >"$DIR/$conf"
        if [ "$MODE" = nginx ]; then
            PROXY=("$(command -v nginx || echo /usr/sbin/nginx)" -c "$DIR/nginx.conf" -p "$DIR" -g "master_process off;")
        else
            PROXY=("$(command -v haproxy || echo /usr/sbin/haproxy)" -f "$DIR/haproxy.cfg" -db)
        fi ;;
    *) echo "usage: $0 [rules|norules|nginx|haproxy]" >&2; exit 2 ;;
esac
VGOPTS=()
[ -n "${CACHE:-}" ] && VGOPTS+=(--cache-sim=yes)
[ -n "${INSTR:-}" ] && VGOPTS+=(--dump-instr=yes)
valgrind --tool=callgrind --instr-atstart=no ${VGOPTS[@]+"${VGOPTS[@]}"} \
    --callgrind-out-file="$DIR/callgrind.out" \
    "${PROXY[@]}" >"$DIR/gw.log" 2>&1 &
VG=$!
PIDS+=($VG)
wait_port "$BACK"; wait_port "$LISTEN"
sed -e "s#http://127.0.0.1:8080#http://127.0.0.1:$LISTEN#" \
    -e "s#\"from\": 10000#\"from\": $RATE#" -e "s#\"secs\": 5#\"secs\": $SECS#" \
    "$ROOT/benches/scenarios/peer-get.json" >"$DIR/scenario.json"
# Warm-up: connections opened, limiter keys and metric series created; 6 s, past the limiter
# sweep's first periods (a busy store is swept every second, a quiet one every fifth), so
# that the per-user limit's tables have grown to about their steady size (the profile is of
# the steady state, not of the first period's growth; a 12 s warm-up counts the same).
"$BIN/tidegate-pressure" "$DIR/scenario.json" --connections "$CONNS" --threads 1 --quiet \
    --time-scale 0.6 --seed 7 >/dev/null
callgrind_control -i on "$VG" >/dev/null
"$BIN/tidegate-pressure" "$DIR/scenario.json" --connections "$CONNS" --threads 1 --quiet \
    --json "$DIR/run.json" | tee "$DIR/run.txt"
callgrind_control -d "$VG" >/dev/null
callgrind_control -i off "$VG" >/dev/null || true
sleep 1
set +o pipefail
REQS=$(python3 -c "import json;print(json.load(open('$DIR/run.json'))['overall']['offered'])")
OUTF=$(ls -S "$DIR"/callgrind.out* | head -1)
IR=$(callgrind_annotate "$OUTF" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",","",$1); print $1; exit}')
echo "mode=$MODE requests=$REQS instructions=$IR per_request=$(( REQS > 0 ? IR / REQS : 0 ))"
if [ -n "${CACHE:-}" ]; then
    python3 - "$OUTF" "$REQS" <<'PY'
import sys
events, totals = [], []
for line in open(sys.argv[1]):
    if line.startswith("events:"):
        events = line.split()[1:]
    elif line.startswith(("summary:", "totals:")):
        totals = [int(x) for x in line.split()[1:]]
per = {e: t / max(int(sys.argv[2]), 1) for e, t in zip(events, totals)}
print("l1_misses_per_request instr=%.0f data_read=%.0f data_write=%.0f"
      % (per["I1mr"], per["D1mr"], per["D1mw"]))
PY
fi
callgrind_annotate --inclusive=no "$OUTF" 2>/dev/null | sed -n '/file:function/,$p' | head -45
cp "$OUTF" "/tmp/tidegate-profile-$MODE.out"
echo "$REQS" >"/tmp/tidegate-profile-$MODE.requests"
echo "profile kept in /tmp/tidegate-profile-$MODE.out (benches/peers/profile_diff.py compares two)"
