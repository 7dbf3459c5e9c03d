# Helpers of the peer scripts (run.sh, rules-cost.sh, profile.sh, syscalls.sh,
# idle-memory.sh, idle-heap.sh): sourced, not run. The caller sets DIR (where the started
# processes log), PIDS (what it started) and BIN (where the release binaries are).

# A free loopback port.
port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null \
        || echo $((20000 + RANDOM % 20000))
}

# Wait up to 30 s for something to listen on port $1; else say so, with the logs' tails.
wait_port() {
    for _ in $(seq 300); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "nothing listening on port $1; logs:" >&2
    tail -n 5 "$DIR"/*.log >&2 || true
    return 1
}

# Stop what the script started.
stop_started() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}

# Stop what the script started and remove its scratch directory $DIR: `trap stop_and_clean EXIT`.
stop_and_clean() {
    stop_started
    rm -rf "$DIR"
}

# A gateway config that holds idle connections: `bench-config $1` (rules|norules) listening
# on port $2, admin on $3, backend on $4, with a 10 min idle timeout (a 5 min head deadline:
# under valgrind a first head may be slow to be read) and room for 20,000 connections.
idle_config() {
    "$BIN/bench-config" "$1" "127.0.0.1:$2" "127.0.0.1:$3" "127.0.0.1:$4" |
        python3 -c 'import json,sys; c=json.load(sys.stdin)
c["server"]["limits"] = {"idle_timeout_ms": 600000, "max_connections": 20000,
                         "header_read_timeout_ms": 300000}
json.dump(c, sys.stdout)'
}

# CPU time (clock ticks, `getconf CLK_TCK` per second) of process $1 and its children
# (nginx's workers): utime + stime, or utime alone with `user` as $2.
cpu_ticks() {
    local t=0 p expr='$12 + $13'
    [ "${2:-}" = user ] && expr='$12'
    for p in $1 $(pgrep -P "$1" || true); do
        t=$((t + $(awk "{sub(/.*\\) /, \"\"); print $expr}" "/proc/$p/stat" 2>/dev/null || echo 0)))
    done
    echo "$t"
}
