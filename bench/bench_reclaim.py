"""DIR-24-8 on a long-running router: a route change once the never-used tbl8 groups are gone.

    .venv/bin/python bench/bench_reclaim.py [--groups 64] [--changes 2000]

A /32 needs a tbl8 group; deleting it retires the group, which may be handed
out again only after an RCU grace period (a real one here: membarrier). After
``--groups`` changes the pool has no never-used group left, as on a router
that has run for days. Times each add of a /32 (its delete in between), side
by side: the grace waited for on the write path, against the daemon's way
(a grace period waited for in a thread between changes, ``Dir24Table.begin_reclaim``).
In-process, private memory; no root needed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fibsync.fastpath import dir24  # noqa: E402
from fibsync.fastpath.abi import ROUTE  # noqa: E402


def run(groups: int, changes: int, background: bool) -> dict[str, float]:
    table = dir24.Dir24Table(*dir24.memory_buffers(groups, 64), cover=lambda addr, depth: None)
    value = ROUTE.pack(7, 0, 0, 0, 0)
    base = 0xC0000200  # 192.0.2.0
    times = []
    for i in range(changes):
        addr = base + i % 256
        t = time.perf_counter()
        table.add([(addr, 32, value)])
        times.append((time.perf_counter() - t) * 1000)
        table.delete([(addr, 32)])
        if background:
            reclaim = table.begin_reclaim()
            if reclaim:
                grace = threading.Thread(target=dir24.rcu_grace)
                grace.start()
                grace.join()  # the daemon awaits it in the event loop instead
                reclaim.done()
    times.sort()
    return {"p50_ms": round(statistics.median(times), 3),
            "p99_ms": round(times[int(len(times) * 0.99) - 1], 3),
            "max_ms": round(times[-1], 3),
            "graces_on_write_path": table.groups.graces}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--groups", type=int, default=64)
    ap.add_argument("--changes", type=int, default=2000)
    args = ap.parse_args()
    print(json.dumps({
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.node()} {os.cpu_count()} cores, {platform.release()}",
        "tbl8_groups": args.groups, "changes": args.changes,
        "grace_on_write_path": run(args.groups, args.changes, background=False),
        "grace_in_background": run(args.groups, args.changes, background=True),
    }, indent=2))


if __name__ == "__main__":
    main()
