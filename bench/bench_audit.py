"""What one self-audit costs at the full table, and what it does to single changes meanwhile.

    .venv/bin/python bench/bench_audit.py [--v4 1000000] [--v6 250000] [--singles 300]

1. Cost: the audit's child (``python -m fibsync.verify``, exactly what the daemon
   runs) against the synced full table, timed from outside: wall clock and CPU
   (user + system of the child, from wait4), and its peak RSS.
2. Single-change latency while audits run back to back, beside the same figure
   with no audit (bench_churn.py's single_changes: a route added over netlink,
   the pinned LPM map polled until it holds it); p50/p99/max.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_churn import single_changes  # noqa: E402
from fulltable import install, router  # noqa: E402

from fibsync.fastpath import bpfsys  # noqa: E402


def run_child(name: str) -> dict[str, float]:
    args = json.dumps({"pin_dir": f"/sys/fs/bpf/fibsync/{name}", "table": 254, "protocols": []})
    t0 = time.monotonic()
    # nsenter keeps the host's mounts (bpffs); `ip netns exec` would hide the pins
    proc = subprocess.Popen(["nsenter", f"--net=/run/netns/{name}", sys.executable, "-m",
                             "fibsync.verify", args], stdout=subprocess.PIPE)
    out = proc.stdout.read() if proc.stdout else b""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - t0
    doc = json.loads(out)
    cpu = usage.ru_utime + usage.ru_stime
    return {"wall_seconds": round(wall, 2), "cpu_seconds": round(cpu, 2),
            "peak_rss_mb": round(usage.ru_maxrss / 1024), "checked": doc["checked"],
            "differences": len(doc["differences"]), "in_flight": doc["in_flight"],
            "exit": os.waitstatus_to_exitcode(status)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--v4", type=int, default=1_000_000)
    ap.add_argument("--v6", type=int, default=250_000)
    ap.add_argument("--singles", type=int, default=300)
    args = ap.parse_args()
    out: dict[str, object] = {"machine": f"{platform.node()} {os.cpu_count()} cores "
                              f"{platform.release()}", "date": time.strftime("%Y-%m-%d"),
                              "v4": args.v4, "v6": args.v6}
    with router("fsa") as (name, daemon):
        install(name, args.v4, args.v6)
        # the daemon's own audits off: this script runs them
        daemon.extra = ["--audit-interval", "0"]
        daemon.start(timeout=900)
        out["audit"] = [run_child(name) for _ in range(2)]
        fd = bpfsys.obj_get(f"/sys/fs/bpf/fibsync/{name}/routes_v4")
        out["singles_idle"] = single_changes(name, fd, args.singles)
        stop = threading.Event()
        during: list[dict[str, float]] = []

        def audits() -> None:
            while not stop.is_set():
                during.append(run_child(name))

        t = threading.Thread(target=audits)
        t.start()
        try:
            out["singles_during_audit"] = single_changes(name, fd, args.singles)
        finally:
            stop.set()
            t.join()
            os.close(fd)
        out["audits_during"] = during
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
