#!/usr/bin/env bash
# Peer comparison: the backend direct, Tidegate (no rules, realistic rules), nginx and
# HAProxy as keep-alive reverse proxies to the same trivial backend, on one machine, in one
# run, rounds interleaved. Same load tool (tidegate-pressure), same connections, same backend.
#
#   benches/peers/run.sh                 # from the repository root (or anywhere inside it)
#
# Environment: ROUNDS (3), SECS per measurement (5), CONNS (50), RATE for the fixed-rate
# latency measurement (5000 req/s), PROXY_CPU (0) and LOAD_CPU (1). The proxy under test is
# always pinned to PROXY_CPU (on one core nginx runs one worker, HAProxy one thread and
# Tidegate one runtime worker); LAYOUT says where the backend goes:
#   split   the load tool and the backend share LOAD_CPU: the proxy has its core to itself;
#   shared  the backend shares PROXY_CPU with the proxy, the load tool has LOAD_CPU: the
#           proxy competes with the backend for its core (as a sidecar or a small box does);
# LAYOUT="split shared" (the default) measures both, one after the other, with the same
# processes (the backend is re-pinned between them), and prints one table per layout.
# OUT (target/peers): where results go (rounds-LAYOUT.tsv, table-LAYOUT.md, table.md).
# PGO=1 measures the profile-guided build (scripts/pgo-build.sh, the build to ship; made
# first unless SKIP_BUILD is set, then target/pgo/release/tidegate is used as it is);
# TIDEGATE=/path/to/a/tidegate measures that binary instead of target/release/tidegate.
# BASELINE=/path/to/an/older/tidegate adds a sixth target, `tidegate-baseline`: that binary
# with the realistic rules, in the same rounds, for an A/B of a code change under the same
# noise.
#
# Installs nginx, haproxy and jq with apt-get when missing. Traffic stays on 127.0.0.1 and
# every step is bounded in time. SKIP_BUILD=1 uses the binaries already in target/release. Not a CI test: absolute numbers depend on the machine;
# the ratios are the point.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
. "$ROOT/benches/peers/common.sh"
cd "$ROOT"
ROUNDS=${ROUNDS:-3}
SECS=${SECS:-5}
CONNS=${CONNS:-50}
RATE=${RATE:-5000}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
OUT=${OUT:-$ROOT/target/peers}
LAYOUT=${LAYOUT:-split shared}
for l in $LAYOUT; do
    case "$l" in split|shared) ;; *) echo "LAYOUT: split, shared or both (\"split shared\"), not $l" >&2; exit 2 ;; esac
done
BIN=$ROOT/target/release

need=()
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
command -v jq >/dev/null || need+=(jq)
if [ ${#need[@]} -gt 0 ]; then
    echo "installing ${need[*]}"
    SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
HAPROXY=$(command -v haproxy || echo /usr/sbin/haproxy)

if [ -z "${SKIP_BUILD:-}" ]; then
    echo "building (release)"
    cargo build --release -q -p tidegate -p tidegate-benches
    [ "${PGO:-0}" = 1 ] && "$ROOT/scripts/pgo-build.sh"
fi
TIDEGATE=${TIDEGATE:-$BIN/tidegate}
[ "${PGO:-0}" = 1 ] && TIDEGATE=$ROOT/target/pgo/release/tidegate
echo "measuring $TIDEGATE"

rm -rf "$OUT"; mkdir -p "$OUT"
DIR=$(mktemp -d /tmp/tidegate-peers.XXXXXX)
# Private copies: a concurrent build in the shared target dir cannot swap them mid-run.
mkdir -p "$DIR/bin"
cp "$BIN"/{tidegate-pressure,bench-backend,bench-config} "$DIR/bin/"
cp "$TIDEGATE" "$DIR/bin/tidegate"
[ -n "${BASELINE:-}" ] && cp "$BASELINE" "$DIR/bin/tidegate-baseline"
BIN=$DIR/bin
PIDS=()
trap stop_and_clean EXIT

TICK=$(getconf CLK_TCK)

BACKEND_PORT=$(port)
taskset -c "$LOAD_CPU" "$BIN/bench-backend" "127.0.0.1:$BACKEND_PORT" 1 >"$DIR/backend.log" 2>&1 &
BACKEND_PID=$!
PIDS+=($!)
wait_port "$BACKEND_PORT"

declare -A PORT PID
PORT[direct]=$BACKEND_PORT

start_tidegate() { # name rules|norules [binary]
    local p a
    p=$(port); a=$(port)
    "$BIN/bench-config" "$2" "127.0.0.1:$p" "127.0.0.1:$a" "127.0.0.1:$BACKEND_PORT" >"$DIR/$1.json"
    RUST_LOG=warn taskset -c "$PROXY_CPU" "${3:-$BIN/tidegate}" run --config "$DIR/$1.json" --workers 1 >"$DIR/$1.log" 2>&1 &
    PID[$1]=$!; PIDS+=($!); PORT[$1]=$p
    wait_port "$p"
}
start_tidegate tidegate-norules norules
start_tidegate tidegate-rules rules
TARGETS=(direct tidegate-norules tidegate-rules nginx haproxy)
if [ -n "${BASELINE:-}" ]; then
    start_tidegate tidegate-baseline rules "$BIN/tidegate-baseline"
    TARGETS+=(tidegate-baseline)
fi

P=$(port)
sed -e "s#@DIR@#$DIR#g" -e "s#@LISTEN@#127.0.0.1:$P#g" -e "s#@BACKEND@#127.0.0.1:$BACKEND_PORT#g" \
    benches/peers/nginx.conf.in >"$DIR/nginx.conf"
taskset -c "$PROXY_CPU" "$NGINX" -c "$DIR/nginx.conf" -p "$DIR" >"$DIR/nginx.log" 2>&1 &
PID[nginx]=$!; PIDS+=($!); PORT[nginx]=$P
wait_port "$P"

P=$(port)
sed -e "s#@DIR@#$DIR#g" -e "s#@LISTEN@#127.0.0.1:$P#g" -e "s#@BACKEND@#127.0.0.1:$BACKEND_PORT#g" \
    benches/peers/haproxy.cfg.in >"$DIR/haproxy.cfg"
taskset -c "$PROXY_CPU" "$HAPROXY" -f "$DIR/haproxy.cfg" -db >"$DIR/haproxy.log" 2>&1 &
PID[haproxy]=$!; PIDS+=($!); PORT[haproxy]=$P
wait_port "$P"

SCEN=benches/scenarios/peer-get.json
load() { # target closed|open secs json
    local mode=()
    [ "$2" = closed ] && mode=(--closed-loop)
    timeout $(( $3 + 30 )) taskset -c "$LOAD_CPU" "$BIN/tidegate-pressure" "$SCEN" \
        --target "http://127.0.0.1:${PORT[$1]}" --connections "$CONNS" --threads 1 \
        --time-scale "$(awk "BEGIN{print $3/5}")" --rate-scale "$(awk "BEGIN{print $RATE/10000}")" \
        "${mode[@]}" --quiet --json "$4" >/dev/null
}

# One layout's rounds and table: pins the backend for it (the proxies stay on PROXY_CPU).
measure() { # split|shared
    local backend_cpu where
    case "$1" in
        split) backend_cpu=$LOAD_CPU
            where="proxy alone on cpu $PROXY_CPU; load tool and backend on cpu $LOAD_CPU" ;;
        shared) backend_cpu=$PROXY_CPU
            where="proxy and backend on cpu $PROXY_CPU; load tool on cpu $LOAD_CPU" ;;
    esac
    taskset -a -p -c "$backend_cpu" "$BACKEND_PID" >/dev/null
    echo "layout=$1 rounds=$ROUNDS secs=$SECS conns=$CONNS fixed-rate=$RATE proxy-cpu=$PROXY_CPU load-cpu=$LOAD_CPU backend-cpu=$backend_cpu"
    echo "round target rps p50_ms p99_ms cpu_us_per_req fixed_p50_ms fixed_p99_ms errors user_us_per_req" | tee "$OUT/rounds-$1.tsv"
    local nt=${#TARGETS[@]} k t order
    local -A cpu ucpu
    for r in $(seq "$ROUNDS"); do
        # Each round starts one target later: none is always measured first, and a host
        # whose load drifts within a round does not favour the same target every round.
        order=()
        for ((k = 0; k < nt; k++)); do order+=("${TARGETS[$(( (k + r - 1) % nt ))]}"); done
        # The closed-loop runs back to back, then the fixed-rate ones: the CPU figures that
        # are compared (each target against nginx, the rules against none) are taken
        # seconds apart, under the same host load.
        for t in "${order[@]}"; do
            load "$t" closed 1 "$DIR/warm.json" # warm-up: connections, pools, limiter keys
            before=$( [ "$t" = direct ] && echo 0 || cpu_ticks "${PID[$t]}")
            ubefore=$( [ "$t" = direct ] && echo 0 || cpu_ticks "${PID[$t]}" user)
            load "$t" closed "$SECS" "$DIR/max-$t.json"
            after=$( [ "$t" = direct ] && echo 0 || cpu_ticks "${PID[$t]}")
            uafter=$( [ "$t" = direct ] && echo 0 || cpu_ticks "${PID[$t]}" user)
            cpu[$t]=$(( after - before )); ucpu[$t]=$(( uafter - ubefore ))
        done
        for t in "${order[@]}"; do
            load "$t" open "$SECS" "$DIR/fixed-$t.json"
            reqs=$(jq '.overall.succeeded + .overall.failed + .overall.limited + .overall.shed + .overall.degraded' "$DIR/max-$t.json")
            errs=$(jq '.overall.errors + .overall.failed + .overall.unsent' "$DIR/max-$t.json")
            errs=$((errs + $(jq '.overall.errors + .overall.failed + .overall.unsent' "$DIR/fixed-$t.json")))
            line=$(jq -r --arg r "$r" --arg t "$t" --argjson reqs "$reqs" --argjson cpu "${cpu[$t]}" \
                --argjson tick "$TICK" --argjson errs "$errs" --slurpfile f "$DIR/fixed-$t.json" \
                --argjson ucpu "${ucpu[$t]}" \
                '[$r, $t, (.overall.rps|floor), .overall.latency_ms.p50, .overall.latency_ms.p99,
                  (if $reqs > 0 then ($cpu / $tick * 1e6 / $reqs * 100 | round / 100) else 0 end),
                  $f[0].overall.latency_ms.p50, $f[0].overall.latency_ms.p99, $errs,
                  (if $reqs > 0 then ($ucpu / $tick * 1e6 / $reqs * 100 | round / 100) else 0 end)] | @tsv' "$DIR/max-$t.json")
            echo "$line" | tee -a "$OUT/rounds-$1.tsv"
        done
    done

    # Medians over the rounds, and ratios against the direct backend and against nginx.
    awk -F'\t' -v targets="${TARGETS[*]}" -v layout="$1" -v where="$where" '
        NR == 1 { next }
        { n[$2]++; rps[$2, n[$2]] = $3; p50[$2, n[$2]] = $4; p99[$2, n[$2]] = $5; cpu[$2, n[$2]] = $6;
          f50[$2, n[$2]] = $7; f99[$2, n[$2]] = $8; err[$2] += $9; usr[$2, n[$2]] = $10 }
        function med(a, t, k,   v, i, j, x, m) {
            m = n[t]; for (i = 1; i <= m; i++) v[i] = a[t, i]
            for (i = 2; i <= m; i++) { x = v[i]; for (j = i - 1; j >= 1 && v[j] > x; j--) v[j + 1] = v[j]; v[j + 1] = x }
            return (m % 2) ? v[(m + 1) / 2] : (v[m / 2] + v[m / 2 + 1]) / 2
        }
        END {
            nt = split(targets, order, " ")
            printf "layout %s: %s\n\n", layout, where
            for (i = 1; i <= nt; i++) { t = order[i]; R[t] = med(rps, t); C[t] = med(cpu, t) }
            printf "| target | req/s | × direct | × nginx | p50 ms | p99 ms | CPU µs/req | × nginx CPU | of it user µs/req | p50 ms @ fixed rate | p99 ms @ fixed rate | errors |\n"
            printf "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
            for (i = 1; i <= nt; i++) {
                t = order[i]
                printf "| %s | %.0f | %.2f | %.2f | %.2f | %.2f | %s | %s | %s | %.2f | %.2f | %d |\n", t, R[t], R[t] / R["direct"], R[t] / R["nginx"],
                    med(p50, t), med(p99, t), (t == "direct" ? "-" : sprintf("%.1f", C[t])),
                    (t == "direct" ? "-" : sprintf("%.2f", C[t] / C["nginx"])),
                    (t == "direct" ? "-" : sprintf("%.1f", med(usr, t))), med(f50, t), med(f99, t), err[t]
            }
            # Each round measures every target within about a minute; a host that gets busier
            # between rounds moves the medians above, not these ratios.
            printf "\nagainst nginx in the same round: median of the per-round ratios (rounds at or better than nginx)\n\n"
            printf "| target | CPU per request | req/s | p99 |\n|---|---|---|---|\n"
            for (i = 1; i <= nt; i++) {
                t = order[i]
                if (t == "direct" || t == "nginx") continue
                bc = br = bp = 0
                for (k = 1; k <= n[t]; k++) {
                    rc[t, k] = cpu[t, k] / cpu["nginx", k]; bc += rc[t, k] <= 1
                    rr[t, k] = rps[t, k] / rps["nginx", k]; br += rr[t, k] >= 1
                    rp[t, k] = p99[t, k] / p99["nginx", k]; bp += rp[t, k] <= 1
                }
                printf "| %s | %.2f (%d of %d) | %.2f (%d of %d) | %.2f (%d of %d) |\n", t,
                    med(rc, t), bc, n[t], med(rr, t), br, n[t], med(rp, t), bp, n[t]
            }
            # The cost of the rules paired by round too: the two Tidegate builds of one round ran
            # under the same host load.
            for (k = 1; k <= n["tidegate-rules"]; k++) {
                costc["rules", k] = cpu["tidegate-rules", k] / cpu["tidegate-norules", k] - 1
                costr["rules", k] = 1 - rps["tidegate-rules", k] / rps["tidegate-norules", k]
            }
            n["rules"] = n["tidegate-rules"]
            printf "\ntidegate rules cost: %.1f%% of its no-rule CPU per request and %.1f%% of its req/s by the medians of the per-round ratios; %.1f%% and %.1f%% by the medians above\n",
                med(costc, "rules") * 100, med(costr, "rules") * 100,
                (C["tidegate-rules"] / C["tidegate-norules"] - 1) * 100, (1 - R["tidegate-rules"] / R["tidegate-norules"]) * 100
            if (R["tidegate-baseline"] > 0)
                printf "tidegate-rules against the baseline binary: %.2fx req/s, %.2fx CPU per request\n", R["tidegate-rules"] / R["tidegate-baseline"], C["tidegate-rules"] / C["tidegate-baseline"]
        }' "$OUT/rounds-$1.tsv" | tee "$OUT/table-$1.md"
    echo "layout $1: medians of $ROUNDS rounds; per-round figures in $OUT/rounds-$1.tsv, this table in $OUT/table-$1.md"
}

: >"$OUT/table.md"
for l in $LAYOUT; do
    measure "$l"
    { cat "$OUT/table-$l.md"; echo; } >>"$OUT/table.md"
done
echo "all layouts' tables in $OUT/table.md"
