#!/usr/bin/env bash
# What the realistic rules cost in CPU per request, and which part of them: Tidegate with
# no rules, with the realistic rules (bench-config rules) and with variants of them, one
# process each, measured in interleaved rounds close together (1 s warm-up and SECS of
# closed loop each, back to back; each round starts one variant later). Prints every
# round, then per variant the median and mean of its per-round ratio to the no-rules
# process: run.sh's comparison with nginx spaces the two Tidegate runs further apart, so
# this resolves a few percent better.
#
#   benches/peers/rules-cost.sh                       # rules against norules, shared layout
#   VARIANTS="rules no-splits no-limits" benches/peers/rules-cost.sh
#   PGO=1 ROUNDS=16 LAYOUT=split benches/peers/rules-cost.sh
#
# VARIANTS (rules): the realistic rules (`rules`) or them less one part: `no-splits` (the
# split routes send everything to `v1`), `no-routes` (the default route only), `no-limits`,
# `no-per-user`, `no-dry-run`, `no-breaker`; `baseline`, the realistic rules on the binary
# BASELINE names (an A/B of a code change: its cost against this build's no-rules). ROUNDS (10), SECS (4), CONNS (50), LAYOUT
# (shared: the backend on PROXY_CPU with the proxy, as run.sh's `shared`; split: on
# LOAD_CPU with the load tool), PROXY_CPU (0), LOAD_CPU (1). Uses target/release (build
# it first), PGO=1 the profile-guided build, TIDEGATE= another binary. Needs jq.
# PERF=1 also samples each variant's process during the last round with `perf record`
# (PERF_HZ, 4999 a second; needs perf with access to the process) and prints its top
# PERF_TOP (25) symbols in µs per request.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
. "$ROOT/benches/peers/common.sh"
BIN=$ROOT/target/release
TIDEGATE=${TIDEGATE:-$BIN/tidegate}
[ "${PGO:-0}" = 1 ] && TIDEGATE=$ROOT/target/pgo/release/tidegate
VARIANTS=${VARIANTS:-rules}
PERF_HZ=${PERF_HZ:-4999}
PERF_TOP=${PERF_TOP:-25}
ROUNDS=${ROUNDS:-10}
SECS=${SECS:-4}
CONNS=${CONNS:-50}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
case "${LAYOUT:-shared}" in
    shared) BACKEND_CPU=$PROXY_CPU ;;
    split) BACKEND_CPU=$LOAD_CPU ;;
    *) echo "LAYOUT: shared or split, not $LAYOUT" >&2; exit 2 ;;
esac
command -v jq >/dev/null || { echo "needs jq (apt-get install jq)" >&2; exit 2; }
DIR=$(mktemp -d /tmp/tidegate-rules-cost.XXXXXX)
PIDS=()
trap stop_and_clean EXIT

# The realistic rules less one part, as jq filters over `bench-config rules`.
filter() {
    case "$1" in
        rules|baseline) echo '.' ;;
        no-splits) echo '.routes |= map(if .split then (del(.split) | .upstream = "v1") else . end)' ;;
        no-routes) echo '.routes = [.routes[0]]' ;;
        no-limits) echo '.limits = []' ;;
        no-per-user) echo 'del(.limits[] | select(.name == "per-user"))' ;;
        no-dry-run) echo 'del(.limits[] | select(.name == "global-dry"))' ;;
        no-breaker) echo '.breakers = []' ;;
        *) echo "unknown variant $1: rules, no-splits, no-routes, no-limits, no-per-user, no-dry-run, no-breaker or baseline" >&2
            return 1 ;;
    esac
}
# Every variant checked before anything starts: a misspelt one must not run as another.
for v in $VARIANTS; do filter "$v" >/dev/null || exit 2; done

BACK=$(port)
taskset -c "$BACKEND_CPU" "$BIN/bench-backend" "127.0.0.1:$BACK" 1 >"$DIR/backend.log" 2>&1 &
PIDS+=($!)
wait_port "$BACK"

declare -A PORT PID
TARGETS=(norules $VARIANTS)
for v in "${TARGETS[@]}"; do
    p=$(port); a=$(port)
    if [ "$v" = norules ]; then
        "$BIN/bench-config" norules "127.0.0.1:$p" "127.0.0.1:$a" "127.0.0.1:$BACK" >"$DIR/$v.json"
    else
        "$BIN/bench-config" rules "127.0.0.1:$p" "127.0.0.1:$a" "127.0.0.1:$BACK" |
            jq "$(filter "$v")" >"$DIR/$v.json"
    fi
    bin=$TIDEGATE
    if [ "$v" = baseline ]; then
        bin=${BASELINE:?the baseline variant needs BASELINE=/path/to/another/tidegate}
    fi
    RUST_LOG=warn taskset -c "$PROXY_CPU" "$bin" run --config "$DIR/$v.json" --workers 1 >"$DIR/$v.log" 2>&1 &
    PID[$v]=$!; PIDS+=($!); PORT[$v]=$p
    wait_port "$p"
done

load() { # variant secs json
    timeout $(( $2 + 30 )) taskset -c "$LOAD_CPU" "$BIN/tidegate-pressure" "$ROOT/benches/scenarios/peer-get.json" \
        --target "http://127.0.0.1:${PORT[$1]}" --connections "$CONNS" --threads 1 --closed-loop \
        --time-scale "$(awk "BEGIN{print $2/5}")" --quiet --json "$3" >/dev/null
}

echo "layout=${LAYOUT:-shared} rounds=$ROUNDS secs=$SECS conns=$CONNS binary=$TIDEGATE"
echo "CPU µs per request (utime + stime over the requests answered), by round:"
TICK=$(getconf CLK_TCK)
nt=${#TARGETS[@]}
: >"$DIR/rounds.tsv"
for r in $(seq "$ROUNDS"); do
    line="round $r"
    for ((k = 0; k < nt; k++)); do
        v=${TARGETS[$(( (k + r - 1) % nt ))]}
        load "$v" 1 "$DIR/warm.json"
        perf=
        if [ "${PERF:-0}" = 1 ] && [ "$r" = "$ROUNDS" ]; then
            perf record -q -F "$PERF_HZ" -p "${PID[$v]}" -o "$DIR/perf-$v.data" 2>/dev/null &
            perf=$!
        fi
        before=$(cpu_ticks "${PID[$v]}")
        load "$v" "$SECS" "$DIR/run.json"
        after=$(cpu_ticks "${PID[$v]}")
        [ -n "$perf" ] && { kill -INT "$perf"; wait "$perf" || true; }
        reqs=$(jq '.overall.succeeded + .overall.limited + .overall.shed + .overall.degraded' "$DIR/run.json")
        [ "$reqs" -gt 0 ] || { echo "$v answered no request; its log:" >&2; tail -n 5 "$DIR/$v.log" >&2; exit 1; }
        echo "$reqs" >"$DIR/reqs-$v"
        us=$(awk "BEGIN{printf \"%.2f\", ($after - $before) / $TICK * 1e6 / $reqs}")
        printf '%s\t%s\t%s\n' "$r" "$v" "$us" >>"$DIR/rounds.tsv"
        line+=" $v=$us"
    done
    echo "$line"
done

awk -F'\t' -v variants="$VARIANTS" '
    { us[$1, $2] = $3; if ($1 > rounds) rounds = $1 }
    END {
        printf "\ncost against norules: median (mean) of the per-round ratios, and the rounds above 5%%\n"
        nv = split(variants, vs, " ")
        for (i = 1; i <= nv; i++) {
            v = vs[i]; sum = 0; over = 0
            for (r = 1; r <= rounds; r++) {
                x[r] = us[r, v] / us[r, "norules"] - 1; sum += x[r]; over += x[r] > 0.05
            }
            for (a = 2; a <= rounds; a++) { t = x[a]; for (b = a - 1; b >= 1 && x[b] > t; b--) x[b + 1] = x[b]; x[b + 1] = t }
            med = (rounds % 2) ? x[(rounds + 1) / 2] : (x[rounds / 2] + x[rounds / 2 + 1]) / 2
            printf "%-12s %5.1f%% (%.1f%%)  %d of %d rounds above 5%%\n", v, med * 100, sum / rounds * 100, over, rounds
        }
    }' "$DIR/rounds.tsv"

# The last round's samples by symbol, in µs per request: where the variants' time differs.
if [ "${PERF:-0}" = 1 ]; then
    for v in "${TARGETS[@]}"; do
        perf report -i "$DIR/perf-$v.data" -n --no-children --sort dso,sym --stdio 2>/dev/null |
            awk -v hz="$PERF_HZ" -v reqs="$(cat "$DIR/reqs-$v")" -v top="$PERF_TOP" -v v="$v" '
                /^#/ || NF < 4 { next }
                { n = $2; $1 = ""; $2 = ""; all += n; sym[++k] = $0; cnt[k] = n }
                END {
                    printf "\n%s: %.2f µs per request sampled; the top %d symbols, µs per request:\n", v, all / hz * 1e6 / reqs, top
                    for (i = 1; i <= k && i <= top; i++) printf "%8.3f %s\n", cnt[i] / hz * 1e6 / reqs, sym[i]
                }'
    done
fi
