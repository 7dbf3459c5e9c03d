# Helpers of the peer scripts (run.sh, profile.sh, idle-memory.sh): sourced, not run. The
# caller sets DIR (where the started processes log) and PIDS (what it started).

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
