"""Where the time and memory of an initial sync go, stage by stage.

    .venv/bin/python bench/profile_sync.py [--v4 200000] [--v6 50000] [--cprofile]

Runs the daemon's stages by hand in a throwaway namespace: bcc build and load,
netlink dump and decode, RIB resync, map writes; prints seconds and RSS after
each stage. `--cprofile` prints the top functions of the RIB and writer stages.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import pstats
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fulltable import install  # noqa: E402

from fibsync import netns  # noqa: E402
from fibsync.fastpath.maps import PinnedMaps  # noqa: E402
from fibsync.fastpath.program import FastPath, remove  # noqa: E402
from fibsync.fastpath.writer import MapWriter  # noqa: E402
from fibsync.lab import Netns  # noqa: E402
from fibsync.model import Snapshot  # noqa: E402
from fibsync.netlink.source import NetlinkSource  # noqa: E402
from fibsync.rib import Rib  # noqa: E402


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Capture:
    def __init__(self) -> None:
        self.snapshot: Snapshot | None = None
        self.done = asyncio.Event()

    def before_routes(self, snapshot: Snapshot) -> None:
        return None

    def resync(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self.done.set()

    def apply(self, changes: list) -> None:  # type: ignore[type-arg]
        pass


async def dump() -> Snapshot:
    sink = Capture()
    task = asyncio.create_task(NetlinkSource().run(sink))
    await sink.done.wait()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert sink.snapshot is not None
    return sink.snapshot


def stage(name: str, t0: float) -> float:
    t = time.monotonic()
    print(f"{name:<28} {t - t0:7.2f} s   rss {rss_mb():7.1f} MB", flush=True)
    return t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--v4", type=int, default=200_000)
    ap.add_argument("--v6", type=int, default=50_000)
    ap.add_argument("--cprofile", action="store_true")
    args = ap.parse_args()
    name = f"fsp{uuid.uuid4().hex[:6]}"
    ns = Netns(name).create()
    try:
        install(name, args.v4, args.v6)
        netns.enter(name)
        t = stage("start", time.monotonic())
        fp = FastPath.load(name)
        t = stage("bcc build + load", t)
        snapshot = asyncio.run(dump())
        t = stage(f"dump+decode {snapshot.route_count()} routes", t)
        prof = cProfile.Profile() if args.cprofile else None
        if prof:
            prof.enable()
        rib = Rib()
        rib.resync(snapshot)
        diff = rib.take_diff()
        t = stage("rib resync", t)
        del snapshot
        gc.collect()
        t = stage("snapshot freed", t)
        writer = MapWriter(PinnedMaps(fp.pin_dir))
        writer.write(diff)
        t = stage(f"write {len(diff)} entries", t)
        if prof:
            prof.disable()
            pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
        del diff
        gc.collect()
        stage("steady state", t)
        fp.close()
    finally:
        remove(name)
        ns.delete()


if __name__ == "__main__":
    main()
