"""Initial sync of a full table: `fibsync run` -> `state: synced`, beside `ip route show`.

    .venv/bin/python bench/bench_sync.py [--v4 1000000] [--v6 250000]

Builds a throwaway namespace, installs the table through nexthop objects (as
FRR does), times `ip route show table all` for both families (the reference),
then starts fibsync and times it until its status says `synced`. Reports the
ratio, the daemon's RSS and the maps' memory. Everything is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fulltable import install, router, time_ip_show  # noqa: E402


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def maps_mb(instance: str) -> dict[str, float]:
    out = {}
    pin = Path("/sys/fs/bpf/fibsync") / instance
    for name in ("routes_v4", "routes_v6", "nexthops", "groups", "neighbours"):
        r = subprocess.run(["bpftool", "-j", "map", "show", "pinned", str(pin / name)],
                           capture_output=True, text=True)
        if r.returncode == 0:
            out[name] = json.loads(r.stdout).get("bytes_memlock", 0) / 2**20
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--v4", type=int, default=1_000_000)
    ap.add_argument("--v6", type=int, default=250_000)
    args = ap.parse_args()

    with router("fsb") as (name, daemon):
        t = install(name, args.v4, args.v6)
        ip_show = min(time_ip_show(name) for _ in range(3))
        t0 = time.monotonic()
        daemon.start(timeout=600)
        synced = time.monotonic() - t0
        pid = daemon.pid or 0
        status = daemon.status()
        sync_log = [json.loads(line) for line in daemon.log_file.read_text().splitlines()
                    if '"sync.done"' in line]
        fp = status["fastpath"]
        result = {
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.node()} {os.cpu_count()} cores, {platform.release()}",
            "routes": f"{args.v4} IPv4 + {args.v6} IPv6",
            "ip_batch_install_s": round(t["ip_batch_install"], 2),
            "install_errors": t["install_errors"],
            "ip_route_show_all_s": round(ip_show, 2),
            "fibsync_start_to_synced_s": round(synced, 2),
            "fibsync_sync_only_s": sync_log[0]["seconds"] if sync_log else None,
            "ratio_to_ip_route_show": round(synced / ip_show, 2),
            "fast_path_routes": f"{fp['routes_v4']} v4 + {fp['routes_v6']} v6",
            "daemon_rss_mb": round(rss_mb(pid), 1),
            "maps_mb": {k: round(v, 1) for k, v in maps_mb(name).items()},
        }
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
