"""Initial sync of a full table: `fibsync run` -> `state: synced`, beside `ip route show`.

    .venv/bin/python bench/bench_sync.py [--v4 1000000] [--v6 250000] [--runs 3]
                                         [--restarts 1]
                                         [--json FILE] [--plot PNG] [--from-json FILE]

Builds a throwaway namespace, installs the table through nexthop objects (as
FRR does), times `ip route show table all` for both families (the reference),
then starts fibsync ``--runs`` times, the first with an empty program cache
(bcc compiles: a first start on a machine) and the others with the cache
filled (every later start); then ``--restarts`` times over the pinned maps
and the attached program the previous run left (a restart: the maps
adopted). Each start is timed from `fibsync run` to its READY=1, received on
a NOTIFY_SOCKET as systemd does (nothing polls the daemon meanwhile: a
`fibsync status` every 0.1 s took a core from the start it measured, ~0.5 s
of a full table's), and to the daemon's `sync.done` log line (its
timestamp). Reports the ratios, the daemon's RSS
(steady and peak) and the maps' memory. Everything is removed at the end.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import report  # noqa: E402
from fulltable import install, router, start_until_ready, time_ip_show  # noqa: E402


def proc_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def maps_mb(instance: str) -> dict[str, float]:
    out = {}
    pin = Path("/sys/fs/bpf/fibsync") / instance
    for name in ("routes_v4", "routes_v6", "v6_hash", "v6_lengths", "v4_tbl24", "v4_tbl8",
                 "nexthops", "groups", "neighbours"):
        r = subprocess.run(["bpftool", "-j", "map", "show", "pinned", str(pin / name)],
                           capture_output=True, text=True)
        if r.returncode == 0:
            out[name] = json.loads(r.stdout).get("bytes_memlock", 0) / 2**20
    return out


def log_time(log: Path, event: str) -> float:
    """Wall-clock time of the last ``event`` in the daemon's JSON log."""
    for line in reversed(log.read_text().splitlines()):
        if f'"{event}"' in line:
            stamp = json.loads(line)["timestamp"].replace("Z", "+00:00")
            return datetime.datetime.fromisoformat(stamp).timestamp()
    raise SystemExit(f"no {event} in {log}")


def plot(doc: dict[str, Any], path: str) -> None:
    plt = report.pyplot()
    ref = doc["ip_route_show_all_s"]
    labels = ["ip route show\ntable all"]
    values = [ref]
    for i, run in enumerate(doc["runs"], 1):
        labels.append(f"fibsync {run.get('kind', 'start')} #{i}\n({run['program']} program)")
        values.append(run.get("run_to_ready_s", run["run_to_synced_s"]))
    fig, ax = plt.subplots(figsize=(8, 4))
    bars = ax.bar(labels, values, color=["grey"] + ["tab:blue"] * (len(values) - 1))
    ax.axhline(1.2 * ref, color="tab:red", linestyle="--",
               label="goal: 1.2x ip route show (program cached)")
    for bar, v in zip(bars, values, strict=True):
        ax.text(bar.get_x() + bar.get_width() / 2, v, f"{v:.2f} s", ha="center", va="bottom")
    ax.set_ylabel("seconds")
    ax.set_title(f"initial sync, {doc['routes']} routes ({doc['date']}, {doc['machine']})",
                 fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--v4", type=int, default=1_000_000)
    ap.add_argument("--v6", type=int, default=250_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--restarts", type=int, default=1,
                    help="then restart the daemon this many times over its pinned maps")
    report.add_arguments(ap)
    report.add_tree_argument(ap)
    args = ap.parse_args()
    if report.replotted(args, plot):
        return
    report.use_tree(args)

    with router("fsb") as (name, daemon), tempfile.TemporaryDirectory() as cache:
        daemon.env["FIBSYNC_CACHE_DIR"] = cache
        t = install(name, args.v4, args.v6)
        ip_show = min(time_ip_show(name) for _ in range(3))
        runs = []
        kinds = ["start"] * args.runs + ["restart"] * args.restarts
        for i, kind in enumerate(kinds):
            started = time.time()
            ready = start_until_ready(daemon)
            pid = daemon.pid or 0
            synced = log_time(daemon.log_file, "sync.done") - started
            load = json.loads(next(line for line in reversed(
                daemon.log_file.read_text().splitlines()) if '"fastpath.load"' in line))
            time.sleep(1)  # the memory release after the sync
            runs.append({
                "kind": kind,
                "program": "cached" if load.get("cached") else "compiled",
                "run_to_ready_s": round(ready, 2),
                "run_to_synced_s": round(synced, 2),
                "rss_mb": round(proc_mb(pid, "VmRSS"), 1),
                "peak_rss_mb": round(proc_mb(pid, "VmHWM"), 1),
            })
            status = daemon.status()
            maps = maps_mb(name)
            daemon.stop()
            if i + 1 < len(kinds) and kinds[i + 1] == "restart":
                continue  # XDP attached, maps pinned: the next start adopts them
            # otherwise a fresh instance each time
            daemon.remove_pins()
            for b in range(4):
                subprocess.run(["ip", "-n", name, "link", "set", f"b{b}", "xdp", "off"],
                               check=True)
            ip_show = min(ip_show, time_ip_show(name))
        for run in runs:  # against the best `ip route show` of the whole session
            run["ratio"] = round(run["run_to_ready_s"] / ip_show, 2)
        fp = status["fastpath"]
        result = {
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.node()} {os.cpu_count()} cores, {platform.release()}",
            "routes": f"{args.v4} IPv4 + {args.v6} IPv6",
            "ip_batch_install_s": round(t["ip_batch_install"], 2),
            "install_errors": t["install_errors"],
            "ip_route_show_all_s": round(ip_show, 2),
            "runs": runs,
            "fast_path_routes": f"{fp['routes_v4']} v4 + {fp['routes_v6']} v6",
            "maps_mb": {k: round(v, 1) for k, v in maps.items()},
        }
        report.publish(result, args, plot)


if __name__ == "__main__":
    main()
