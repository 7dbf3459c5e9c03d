#!/usr/bin/env bash
# A profile-guided release build of the gateway: the build to ship, and the one the peer
# benchmarks measure (benches/peers/run.sh PGO=1). The compiler lays out the request path
# from a profile of it under load: hot code together and in line, cold code (errors, start-up,
# rare branches) out of the way. On the peer request that is about 19% fewer instructions per
# request than the plain release build and fewer L1 instruction-cache misses (figures:
# docs/benchmarks.md).
#
#   scripts/pgo-build.sh            # from anywhere in the repository; about 15 min on 2 cores
#
# Steps: build an instrumented gateway (target/pgo-gen), run it under the bundled load tool
# against bench-backend (HTTP/1.1 GETs with the realistic rules and without, h2 GETs, POSTs
# with bodies; about 30 s), merge the counts with llvm-profdata (rustup's llvm-tools
# component, added when missing), build again with them (target/pgo). Prints the binary's
# path: target/pgo/release/tidegate. Code the training does not run (TLS, WebSocket,
# cluster limits) is treated as cold: placed away from the hot path and, in some passes,
# optimized for size; add a `train` run of any traffic the deployment depends on.
# The profile is made from the current source each time: one from another commit would
# leave every changed function without counts.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
. "$ROOT/benches/peers/common.sh"
export CARGO_INCREMENTAL=0

host=$(rustc -vV | awk '/^host:/ {print $2}')
PROFDATA=$(rustc --print sysroot)/lib/rustlib/$host/bin/llvm-profdata
if [ ! -x "$PROFDATA" ]; then
    command -v rustup >/dev/null || { echo "llvm-profdata not found at $PROFDATA and no rustup to add llvm-tools with" >&2; exit 1; }
    rustup component add llvm-tools
fi

DIR=$(mktemp -d /tmp/tidegate-pgo.XXXXXX)
PIDS=()
trap stop_and_clean EXIT

echo "building the load tool and the backend (release)"
cargo build --release -q -p tidegate-benches --bin tidegate-pressure --bin bench-backend --bin bench-config
BIN=$ROOT/target/release

echo "building the instrumented gateway (target/pgo-gen)"
# A fixed place for the counts, so that a second run reuses the instrumented build (the
# flag is part of what cargo compares); emptied before each training.
RAW=$ROOT/target/pgo-gen/profiles
RUSTFLAGS="-Cprofile-generate=$RAW" cargo build --release -q -p tidegate --target-dir target/pgo-gen
rm -rf "$RAW"

# One training run: the instrumented gateway with bench-config $1 (rules|norules) in front of
# bench-backend, the scenario $2 sent at it with the load tool's extra arguments after it;
# the gateway is stopped with SIGTERM so that it writes its counts on the way out.
train() { # rules|norules scenario [pressure args...]
    local mode=$1 scenario=$2 back listen admin gw
    shift 2
    back=$(port); listen=$(port); admin=$(port)
    "$BIN/bench-backend" "127.0.0.1:$back" >"$DIR/backend.log" 2>&1 &
    PIDS+=($!)
    "$BIN/bench-config" "$mode" "127.0.0.1:$listen" "127.0.0.1:$admin" "127.0.0.1:$back" >"$DIR/gw.json"
    RUST_LOG=warn target/pgo-gen/release/tidegate run --config "$DIR/gw.json" --workers 1 >"$DIR/gw.log" 2>&1 &
    gw=$!
    PIDS+=($gw)
    wait_port "$back"; wait_port "$listen"
    timeout 120 "$BIN/tidegate-pressure" "$scenario" --target "http://127.0.0.1:$listen" \
        --threads 1 --quiet --seed 7 "$@" | tail -n 1
    kill -TERM "$gw"
    wait "$gw" || { echo "the instrumented gateway did not exit cleanly; its log:" >&2; tail "$DIR/gw.log" >&2; exit 1; }
    stop_started
    PIDS=()
}

# The peer request (GET as one app over 100,000 users) and a POST with a body through the
# same routes: what a gateway's request path spends its time on, the rules' phases included.
cat >"$DIR/mixed.json" <<'EOF'
{
  "name": "pgo-training",
  "description": "GETs and POSTs with small bodies as one app over 100,000 users",
  "target": "http://127.0.0.1:8080",
  "connections": 50,
  "users": 100000,
  "headers": { "x-app-id": "app7" },
  "profile": [ { "secs": 8, "from": 8000 } ],
  "mix": [
    { "name": "open", "method": "GET", "path": "/envelopes/{seq}", "weight": 4 },
    { "name": "grab", "method": "POST", "path": "/envelopes/{seq}/grab", "body": "{\"n\":1}", "weight": 1 }
  ]
}
EOF
echo "training (about 30 s)"
train rules benches/scenarios/peer-get.json --rate-scale 1.0
train norules benches/scenarios/peer-get.json --rate-scale 0.6
train rules "$DIR/mixed.json"
train rules benches/scenarios/peer-get.json --protocol h2 --rate-scale 0.5

# A training run that wrote nothing (a gateway killed before its exit handler) would leave
# a build without counts: as slow as a plain one, and silently so.
ls "$RAW"/*.profraw >/dev/null 2>&1 || { echo "the training wrote no profile" >&2; exit 1; }
"$PROFDATA" merge -o "$DIR/merged.profdata" "$RAW"

echo "building the profile-guided gateway (target/pgo)"
RUSTFLAGS="-Cprofile-use=$DIR/merged.profdata" cargo build --release -q -p tidegate --target-dir target/pgo
echo "$ROOT/target/pgo/release/tidegate"
