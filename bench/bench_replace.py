"""A nexthop object replaced under its routes: what the re-announcements cost fibsync.

    .venv/bin/python bench/bench_replace.py [--v4 200000] [--v6 50000] [--replaces 2]
        [--fibsync-tree DIR] [--json FILE]

With ``nexthop_compat_mode=1`` (the kernel's default) replacing a nexthop object
announces every route over it again (RTM_NEWROUTE each, the object's paths
copied in): FRR replaces an object when a next hop's resolution changes, and
under a full table one object may carry a third of it. ``fulltable.py``
installs the table over four single objects and two groups; object 10 carries
1/6 of the IPv4 prefixes directly and group 30 (10 and 11) another 1/6.

With fibsync synced, each round replaces object 10 (gateway .3, then .2 again)
and adds a sentinel route in the same ``ip -batch``; reported per round: the
time until the sentinel is in the pinned map (fibsync applies changes in
kernel order), the daemon's CPU (without its self-audits) and RSS meanwhile,
and the overruns and resyncs it took; ``fibsync verify`` at the end.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import report  # noqa: E402
from bench_churn import in_map  # noqa: E402
from bench_sync import proc_mb  # noqa: E402
from bench_tax import cpu_seconds  # noqa: E402
from fulltable import install, router  # noqa: E402

from fibsync.fastpath import bpfsys  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--v4", type=int, default=200_000)
    ap.add_argument("--v6", type=int, default=50_000)
    ap.add_argument("--replaces", type=int, default=2)
    report.add_tree_argument(ap)
    report.add_arguments(ap)
    args = ap.parse_args()
    report.use_tree(args)
    rounds: list[dict[str, Any]] = []
    with router("fsr") as (name, daemon):
        install(name, args.v4, args.v6)
        daemon.start(timeout=600)
        time.sleep(12)  # the start's own audit done
        fd = bpfsys.obj_get(f"/sys/fs/bpf/fibsync/{name}/routes_v4")
        try:
            pid = daemon.pid
            for i in range(args.replaces):
                gateway = "198.18.0.3" if i % 2 == 0 else "198.18.0.2"
                sentinel = f"203.0.113.{10 + i}/32"
                netlink0 = daemon.status()["netlink"]
                rss0, cpu0 = proc_mb(pid, "VmRSS"), cpu_seconds(pid, children=False)
                t0 = time.monotonic()
                subprocess.run(["ip", "-n", name, "-batch", "-"], check=True, text=True,
                               input=f"nexthop replace id 10 via {gateway} dev b0\n"
                                     f"route add {sentinel} nhid 11\n")
                ip_s = time.monotonic() - t0
                while not in_map(fd, sentinel):
                    if time.monotonic() - t0 > 300:
                        raise SystemExit("fibsync never caught up")
                    time.sleep(0.002)
                done = time.monotonic() - t0
                netlink = daemon.status()["netlink"]
                rounds.append({
                    "ip_s": round(ip_s, 2), "sentinel_s": round(done, 2),
                    "cpu_s": round(cpu_seconds(pid, children=False) - cpu0, 2),
                    "rss_mb": [round(rss0), round(proc_mb(pid, "VmRSS"))],
                    "messages": netlink["messages"] - netlink0["messages"],
                    "overruns": netlink["overruns"] - netlink0["overruns"],
                    "resyncs": netlink["resyncs"] - netlink0["resyncs"]})
                print(f"  round {i}: {rounds[-1]}", file=sys.stderr, flush=True)
                time.sleep(3)
            r = daemon.cli("verify", check=False)
        finally:
            os.close(fd)
    report.publish({
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.node()} {os.cpu_count()} cores, {platform.release()}",
        "table": f"{args.v4} IPv4 + {args.v6} IPv6 over nexthop objects",
        "routes_over_object_10": args.v4 // 3,
        "tree": str(args.fibsync_tree or "this checkout"),
        "rounds": rounds, "verify_exit": r.returncode,
        "verify": (r.stdout.strip().splitlines() or [""])[-1][:200],
    }, args, lambda doc, path: None)


if __name__ == "__main__":
    main()
