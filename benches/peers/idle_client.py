"""Open N idle keep-alive connections to a proxy, one request each, and hold them.

    idle_client.py PORT N SETTLE [PID...] [--then COMMAND]

Waits SETTLE seconds, reads the resident memory of the PIDs (and their children), opens the
connections in batches (`GET /envelopes/I` as app7, a distinct user per connection), reads
each answer, waits SETTLE seconds with all of them idle and reads the memory again; then
fails if the proxy closed any of them meanwhile (the figure would be a closed connection's).
With `--then`, runs COMMAND (a shell command, with POINT set to `before` or `with`) at each
of the two points, before the memory is read (benches/peers/idle-heap.sh takes the heap
profiler's snapshots with it). Prints one line of figures. Used by
benches/peers/idle-memory.sh and idle-heap.sh.
"""
import os, selectors, socket, subprocess, sys, time

args = sys.argv[1:]
then = None
if "--then" in args:
    i = args.index("--then")
    then = args[i + 1]
    args = args[:i] + args[i + 2:]
port, n, settle, pids = int(args[0]), int(args[1]), float(args[2]), args[3:]
BATCH = 100  # connect in batches: the listeners' accept queues (the backend's too) are finite


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


def point(name):
    """The memory at one of the two points (after the hook, if any)."""
    if then:
        subprocess.run(then, shell=True, check=True, env=dict(os.environ, POINT=name))
    return rss_kib()


def open_idle():
    """Open the connections, one request on each; return them, idle, and the answers read."""
    sel = selectors.DefaultSelector()
    socks, answered = [], 0
    for start in range(0, n, BATCH):
        pending = 0
        for i in range(start, min(n, start + BATCH)):
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
    return socks, answered


# The baseline settles as the idle state does: start-up's garbage (a large rule set is parsed
# and compiled) is given back on the allocator's own schedule.
time.sleep(settle)
before = point("before")
t0 = time.time()
socks, answered = open_idle()
time.sleep(settle)
with_conns = point("with")
# Every connection must still be open at the reading: one the proxy closed (a head deadline
# or idle timeout shorter than the wait) would make the figure a closed connection's.
closed = 0
for s in socks:
    try:
        if s.recv(1, socket.MSG_PEEK) == b"":
            closed += 1
    except BlockingIOError:
        pass
if closed:
    sys.exit(f"{closed} of {answered} connections were closed by the proxy before the reading")
print(f"connections={answered} before_kib={before} with_kib={with_conns} "
      f"per_conn_bytes={(with_conns - before) * 1024 // max(answered, 1)} "
      f"open_secs={time.time() - t0:.1f}")
for s in socks:
    s.close()
