"""Control-plane tax and mixed churn: what fibsync costs the routing daemon's installs.

    .venv/bin/python bench/bench_tax.py [--v4 1000000] [--v6 250000] [--changes 200000]
        [--compat 1] [--seed 14] [--rounds 1] [--only MODES] [--json FILE]
        [--profile FILE.txt|FILE.svg] [--keep-log FILE]

The router namespace holds the full table (``fulltable.py``: nexthop objects,
as FRR installs it) and the stress harness's world (tests/netns/churn.py:
``StressChurn.prefill``, ~36k IPv4 and IPv6 routes over links, nexthop
objects and groups). One burst of ``--changes`` seeded mixed changes (routes,
multipath, nexthop objects and groups replaced and deleted under their
routes, links going down and away, v4 and v6) is applied with
``ip -force -batch`` in ``nexthop_compat_mode`` ``--compat`` (1, the kernel's
default, re-announces every route over a replaced object), side by side in
one run:

- ``alone``: nothing listens;
- ``ip monitor``: ``ip monitor`` joined to the groups fibsync joins, printing
  to a file in /run (the cost of merely reading and printing the messages);
- ``fibsync``: the daemon at its default settings, synced.

Each mode gets a fresh namespace with the same table and the same burst (the
burst's last line adds a sentinel route). Reported per mode: the wall time of
``ip -batch`` and its CPU; the listener's CPU (user + system, threads and
waited-for children) from the burst's start until it has read everything
(``ip monitor``: its CPU stops growing; fibsync: the sentinel is in the pinned
map); for fibsync, the lag from ``ip`` exiting to the sentinel in the map, and
``fibsync verify`` right after (exit 0: the maps equal the kernel).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import report  # noqa: E402
from bench_churn import in_map  # noqa: E402
from fulltable import install, router  # noqa: E402

from fibsync.fastpath import bpfsys  # noqa: E402
from fibsync.lab import Netns  # noqa: E402
from tests.netns.churn import StressChurn, World  # noqa: E402

MODES = ("alone", "ip monitor", "fibsync")
SENTINEL = "203.0.113.254/32"
# the groups fibsync's sockets join (netlink/source.py, watch/routing.py, watch/interfaces.py)
MONITOR_OBJECTS = ("link", "address", "neigh", "route", "nexthop", "rule", "netconf")
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int, children: bool = True) -> float:
    """User + system CPU of ``pid`` and its threads, and of its children (fibsync's
    self-audits) unless ``children`` is False: those waited for, and those still
    running (an audit that has not ended by the sentinel counts too)."""
    ticks = _ticks(pid, 15 if children else 13)
    for child in _children(pid) if children else ():
        try:  # after the parent's stat: a child reaped meanwhile is missed, not counted twice
            ticks += _ticks(child, 15)
        except FileNotFoundError:
            continue
    return ticks / TICK


def _ticks(pid: int, end: int) -> int:
    """utime + stime (end 13), and cutime + cstime too (end 15), of /proc/PID/stat
    (its fields after the command name: state first)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:end])


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except FileNotFoundError:
            continue
    return out


def burst_lines(seed: int, changes: int) -> tuple[list[str], list[str]]:
    """(the world and its prefilled routes, the burst ending with the sentinel)."""
    churn = StressChurn(seed)
    setup = World().setup() + churn.prefill()
    burst = churn.steps(changes) + churn.closing() + [f"route add {SENTINEL} nhid 10"]
    return setup, burst


def run_batch(name: str, path: Path) -> tuple[float, float]:
    """``ip -force -batch path`` in ``name``: (wall seconds, CPU seconds of ip)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(["ip", "-n", name, "-force", "-batch", str(path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # non-zero: -force went on past errors
    return time.monotonic() - t0, usage.ru_utime + usage.ru_stime


def settle(pid: int, quiet: float = 1.0, limit: float = 600) -> float:
    """CPU of ``pid`` once it has not grown for ``quiet`` seconds (it has read everything)."""
    last, since, start = cpu_seconds(pid), time.monotonic(), time.monotonic()
    while time.monotonic() - since < quiet and time.monotonic() - start < limit:
        time.sleep(0.1)
        now = cpu_seconds(pid)
        if now != last:
            last, since = now, time.monotonic()
    return last


def prepare(name: str, rundir: Path, args: argparse.Namespace, setup: list[str],
            burst: list[str]) -> Path:
    """Namespace ``name`` with the full table and the stress world, in ``args.compat``
    mode; the burst written to a batch file, whose path this returns."""
    install(name, args.v4, args.v6)
    Netns(name).sysctl("net.ipv4.nexthop_compat_mode", args.compat)
    rundir.mkdir(parents=True, exist_ok=True)
    (rundir / "setup.txt").write_text("\n".join(setup) + "\n")
    (rundir / "burst.txt").write_text("\n".join(burst) + "\n")
    # -force: the prefill collides with the full table here and there (as in the harness)
    subprocess.run(["ip", "-n", name, "-force", "-batch", str(rundir / "setup.txt")],
                   check=False, capture_output=True)
    return rundir / "burst.txt"


def one_mode(mode: str, args: argparse.Namespace, setup: list[str], burst: list[str],
             ) -> dict[str, Any]:
    with router("fst") as (name, daemon):
        batch = prepare(name, daemon.rundir, args, setup, burst)
        rundir = daemon.rundir
        out: dict[str, Any] = {"mode": mode}
        listener: subprocess.Popen[bytes] | None = None
        pid = None
        fd = -1
        try:
            if mode == "ip monitor":
                printed = open(rundir / "monitor.txt", "wb")  # noqa: SIM115 - closed below
                listener = subprocess.Popen(["ip", "-n", name, "monitor", *MONITOR_OBJECTS],
                                            stdout=printed, stderr=subprocess.STDOUT)
                pid = listener.pid
                time.sleep(0.5)
            elif mode == "fibsync":
                daemon.start(timeout=600)
                pid = daemon.pid
                fd = bpfsys.obj_get(f"/sys/fs/bpf/fibsync/{name}/routes_v4")
                time.sleep(2)  # the start's own work (trim, first audit's scheduling) done
            spy = None
            if args.profile and mode == "fibsync" and pid:
                # the burst alone: py-spy joins the synced daemon, and leaves at the sentinel
                spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record",
                                        "-r", "200", "-o", args.profile, "--pid", str(pid),
                                        "--threads", "-f",
                                        "raw" if args.profile.endswith(".txt") else "flamegraph"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(1)
            cpu0 = cpu_seconds(pid) if pid else 0.0
            own0 = cpu_seconds(pid, children=False) if pid else 0.0
            wall, ip_cpu = run_batch(name, batch)
            done = time.monotonic()
            out.update(ip_batch_s=round(wall, 2), ip_cpu_s=round(ip_cpu, 2))
            if mode == "ip monitor" and pid:
                out["listener_cpu_s"] = round(settle(pid) - cpu0, 2)
                printed.close()
                text = (rundir / "monitor.txt").read_bytes()
                # what it printed (a message per line, multipath routes on several)
                out["printed_lines"] = text.count(b"\n")
                out["overruns"] = text.count(b"No buffer space")
            elif mode == "fibsync" and pid:
                while not in_map(fd, SENTINEL):
                    if time.monotonic() - done > 600:
                        raise SystemExit("fibsync never caught up")
                    time.sleep(0.002)
                out["lag_s"] = round(time.monotonic() - done, 3)
                out["listener_cpu_s"] = round(cpu_seconds(pid) - cpu0, 2)
                out["audits_cpu_s"] = round(out["listener_cpu_s"] - (
                    cpu_seconds(pid, children=False) - own0), 2)
                if spy is not None:
                    spy.send_signal(2)
                    spy.wait(timeout=120)
                r = daemon.cli("verify", check=False)
                out["verify_exit"] = r.returncode
                out["verify"] = (r.stdout.strip().splitlines() or [""])[-1][:200]
                doc = daemon.status()
                out["netlink"] = doc.get("netlink")
                out["dir24"] = doc.get("writer", {}).get("dir24")
        finally:
            if args.keep_log and daemon.log_file.exists():
                shutil.copy(daemon.log_file, args.keep_log)
            if fd >= 0:
                os.close(fd)
            if listener is not None:
                listener.terminate()
                listener.wait()
    print(f"  {mode}: {out}", file=sys.stderr, flush=True)
    return out


def add_burst_arguments(ap: argparse.ArgumentParser, *, v4: int, v6: int,
                        changes: int) -> None:
    """The table under the burst and the burst itself (also bench_apply.py's)."""
    ap.add_argument("--v4", type=int, default=v4)
    ap.add_argument("--v6", type=int, default=v6)
    ap.add_argument("--changes", type=int, default=changes)
    ap.add_argument("--compat", type=int, default=1)
    ap.add_argument("--seed", type=int, default=14)


def main() -> None:
    ap = argparse.ArgumentParser()
    add_burst_arguments(ap, v4=1_000_000, v6=250_000, changes=200_000)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--only", default=",".join(MODES), help="modes, comma-separated")
    ap.add_argument("--keep-log", help="copy fibsync's log here")
    ap.add_argument("--profile", help="py-spy on fibsync during the burst, into this file "
                                      "(.txt: collapsed stacks, else an SVG flame graph)")
    report.add_tree_argument(ap)
    report.add_arguments(ap)
    args = ap.parse_args()
    report.use_tree(args)
    modes = [m.strip() for m in args.only.split(",")]
    setup, burst = burst_lines(args.seed, args.changes)
    runs = [one_mode(mode, args, setup, burst) for _ in range(args.rounds) for mode in modes]
    best: dict[str, dict[str, Any]] = {}
    for r in runs:
        if r["mode"] not in best or r["ip_batch_s"] < best[r["mode"]]["ip_batch_s"]:
            best[r["mode"]] = r
    ratios: dict[str, float] = {}
    if "alone" in best:
        for mode in ("ip monitor", "fibsync"):
            if mode in best:
                ratios[f"ip -batch with {mode} / alone"] = round(
                    best[mode]["ip_batch_s"] / best["alone"]["ip_batch_s"], 2)
    if "ip monitor" in best and "fibsync" in best:
        ratios["fibsync CPU / ip monitor CPU"] = round(
            best["fibsync"]["listener_cpu_s"] / best["ip monitor"]["listener_cpu_s"], 2)
    report.publish({
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.node()} {os.cpu_count()} cores, {platform.release()}",
        "table": f"{args.v4} IPv4 + {args.v6} IPv6 (nexthop objects) + the stress world",
        "burst": f"{len(burst)} lines, seed {args.seed}, nexthop_compat_mode {args.compat}",
        "runs": runs, "ratios": ratios,
    }, args, lambda doc, path: None)


if __name__ == "__main__":
    main()
