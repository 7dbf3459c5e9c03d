#!/usr/bin/env python3
"""Where two profiles of benches/peers/profile.sh differ, per request.

    benches/peers/profile_diff.py A.out B.out [--top N]

A and B are callgrind outputs that profile.sh kept (/tmp/tidegate-profile-MODE.out, with
the request count beside it in .requests): the rules and no-rules builds to see what the
rules cost, or one mode of two builds (TIDEGATE=...) for an A/B. Prints each profile's
instructions per request, in total and inside the runtime's task polls (the request path;
the rest is mostly the event loop's parks, which move with how requests bunch), then the
functions whose own instructions per request differ most, A minus B. With fat LTO much is
inlined: a function's own cost includes what was inlined into it (--by-file splits it by
the source file the inlined code came from).
"""

import argparse
import collections
import pathlib
import re
import subprocess
import sys

LINE = re.compile(r"^\s*([\d,]+) \(\s*[\d.]+%\)\s+(\S.*?)(?:\s+\[[^\]]*\])?\s*$")
POLLS = "tokio::runtime::task::raw::poll"


def annotate(path, inclusive):
    out = subprocess.run(
        ["callgrind_annotate", "--auto=no", f"--inclusive={'yes' if inclusive else 'no'}", str(path)],
        capture_output=True, text=True, check=True,
    ).stdout
    costs = collections.Counter()
    total = 0
    for line in out.splitlines():
        m = LINE.match(line)
        if not m:
            continue
        n, name = int(m.group(1).replace(",", "")), m.group(2)
        if name.startswith("PROGRAM TOTALS"):
            total = n
        elif ":" in name and not name.startswith(("=>", "<", "*")):
            costs[name] += n
    return total, costs


def requests(path):
    side = pathlib.Path(path).with_suffix(".requests")
    try:
        return int(side.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        sys.exit(f"{side}: no request count (profile.sh writes it beside the profile)")


def polls(incl):
    # The task poll's own entry (raw.rs), not the lines inlined under core.rs.
    hits = [n for name, n in incl.items() if name.endswith(POLLS) and "task/raw.rs" in name]
    return max(hits, default=0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--by-file", action="store_true", help="split each function by source file")
    args = ap.parse_args()
    rows = []
    for path in (args.a, args.b):
        reqs = requests(path)
        total, own = annotate(path, inclusive=False)
        _, incl = annotate(path, inclusive=True)
        if not args.by_file:
            by_fn = collections.Counter()
            for name, n in own.items():
                by_fn[name.split(":", 1)[1]] += n
            own = by_fn
        rows.append((path, reqs, total, polls(incl), own))
    for path, reqs, total, in_polls, _ in rows:
        print(f"{path}: {reqs} requests, {total / reqs:,.0f} instructions per request, "
              f"{in_polls / reqs:,.0f} in task polls")
    (_, ra, ta, pa, a), (_, rb, tb, pb, b) = rows
    print(f"A - B: {ta / ra - tb / rb:+,.0f} per request, {pa / ra - pb / rb:+,.0f} in task polls")
    diff = {k: a[k] / ra - b[k] / rb for k in set(a) | set(b)}
    print(f"\nown instructions per request, A - B (top {args.top}):")
    for name, d in sorted(diff.items(), key=lambda kv: -abs(kv[1]))[: args.top]:
        print(f"{d:+9.1f}  {name}")


if __name__ == "__main__":
    main()
