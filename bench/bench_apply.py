"""The live path's CPU per message, in process: a recorded burst replayed through
what the daemon runs for each notification.

    .venv/bin/python bench/bench_apply.py [--v4 200000] [--v6 50000] [--changes 60000]
        [--compat 1] [--seed 14] [--rounds 3] [--save FILE | --load FILE]
        [--maps pinned|memory] [--cprofile] [--json FILE]

``bench_tax.py`` measures what fibsync costs a burst, as a whole daemon beside
``ip -batch``; this takes the same kind of burst apart. In a throwaway
namespace with the full table (``fulltable.py``) and the stress world
(tests/netns/churn.py), it records the snapshot the daemon would dump and
every notification of one seeded mixed burst (``--changes``, the same
generator as bench_tax), on a socket joined to the source's groups. Then, in
this process, without the kernel in the way, each round replays the
recording: the snapshot through ``SyncSink.resync`` (the first write), then
the notifications in the batches the source reads them in (``max_reads``
buffers a wakeup), each batch decoded as ``NetlinkSource._drain`` decodes it
and applied as ``SyncSink.apply`` applies it: RIB, FullMapGuard, writer. The
maps are new pinned BPF maps of the daemon's sizes (the program loaded beside
them, as the daemon's writer finds them), or with ``--maps memory``
``MemoryMaps``: the writer's Python alone.

Reported per round, in µs a message (CPU time of this process, user and
system): decode, the RIB, the write (guard and writer: with pinned maps the
bpf() calls and the DIR-24-8 stores included; a wait for an RCU grace period
is not CPU), and their sum; the messages and batches. What the daemon adds
(recv() per message, the event loop's wakeups, other sockets) is bench_tax's
figure less this one.
``--save`` keeps the recording (pickle) and ``--load`` replays one, so that
two checkouts compare on the same bytes (run with PYTHONPATH=<tree>).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import errno
import os
import pickle
import platform
import pstats
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import report  # noqa: E402
from bench_tax import add_burst_arguments, burst_lines, prepare, run_batch  # noqa: E402
from fulltable import router  # noqa: E402

from fibsync import process  # noqa: E402
from fibsync.fastpath import abi  # noqa: E402
from fibsync.fastpath.guard import FullMapGuard  # noqa: E402
from fibsync.fastpath.maps import PinnedMaps  # noqa: E402
from fibsync.fastpath.program import FastPath, remove  # noqa: E402
from fibsync.fastpath.writer import MapWriter, MemoryMaps  # noqa: E402
from fibsync.log import configure  # noqa: E402
from fibsync.model import Change  # noqa: E402
from fibsync.netlink.decode import decode  # noqa: E402
from fibsync.netlink.rtnl import RECV_BUFFER, open_socket  # noqa: E402
from fibsync.netlink.source import EVENT_GROUPS, NetlinkSource  # noqa: E402
from fibsync.process import SdNotify  # noqa: E402
from fibsync.rib import Filter, Rib  # noqa: E402
from fibsync.sync import SyncSink  # noqa: E402

MAX_READS = NetlinkSource().max_reads  # buffers the source reads a wakeup


def record(args: argparse.Namespace) -> dict[str, Any]:
    """The snapshot and the burst's notifications, as the daemon would receive them."""
    setup, burst = burst_lines(args.seed, args.changes)
    with router("fsa") as (name, daemon):
        batch = prepare(name, daemon.rundir, args, setup, burst)
        # subscribed before the dump, as the source is; what arrives meanwhile is replayed
        events = open_socket(netns=name, rcvbuf=1 << 30, groups=EVENT_GROUPS)
        try:
            snapshot = asyncio.run(NetlinkSource(netns=name).dump())
            before = _drain(events)
            wall, _ = run_batch(name, batch)
            messages = before + _drain(events)
        finally:
            events.close()
    print(f"  recorded {snapshot.route_count()} routes and {len(messages)} notifications "
          f"(ip -batch {wall:.1f} s)", file=sys.stderr, flush=True)
    return {"snapshot": pickle.dumps(snapshot), "messages": messages,
            "v4": args.v4, "v6": args.v6, "changes": args.changes, "compat": args.compat,
            "seed": args.seed}


def _drain(sock: socket.socket) -> list[bytes]:
    buf = bytearray(RECV_BUFFER)
    out = []
    while True:
        try:
            n = sock.recv_into(buf, 0, socket.MSG_TRUNC)
        except BlockingIOError:
            return out
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:
                raise SystemExit("the recording overran its socket: fewer --changes") from exc
            raise
        out.append(bytes(buf[:n]))


@contextlib.contextmanager
def fresh_maps(kind: str) -> Iterator[MapWriter]:
    """A writer over new maps of the daemon's sizes: pinned BPF maps (the program
    loaded, from the cache after the first round), or ``MemoryMaps``."""
    if kind == "memory":
        yield MapWriter(MemoryMaps(dir24=True, tbl8_groups=abi.FS_MAX_TBL8_GROUPS,
                                   slots=abi.FS_MAX_SLOTS, v6_hash=True))
        return
    instance = f"fsa{uuid.uuid4().hex[:6]}"
    try:
        fp = FastPath.load(instance)
        try:
            yield MapWriter(PinnedMaps(fp.pin_dir), fresh=[
                name for name, origin in fp.map_origin.items() if origin != "adopted"])
        finally:
            fp.close()
    finally:
        remove(instance)


def replay(rec: dict[str, Any], writer: MapWriter,
           profile: cProfile.Profile | None) -> dict[str, Any]:
    """One round: a fresh RIB over ``writer``'s fresh maps; the snapshot, then every batch."""
    rib = Rib(Filter(), first_id=1)
    guard = FullMapGuard(rib, writer, _Quiet())
    sink = SyncSink(rib, guard, SdNotify(), lambda _t: None)
    t0 = time.process_time()
    sink.resync(pickle.loads(rec["snapshot"]))
    first_write = time.process_time() - t0
    messages = rec["messages"]
    spent = {"decode": 0.0, "rib": 0.0, "write": 0.0}
    changes = batches = 0
    if profile is not None:
        profile.enable()
    for lo in range(0, len(messages), MAX_READS):
        t0 = time.process_time()
        pending: list[Change] = []
        for message in messages[lo:lo + MAX_READS]:
            for _mtype, _flags, _seq, payload in decode(memoryview(message)):
                if payload.__class__ is Change:
                    pending.append(payload)
        t1 = time.process_time()
        rib.apply(pending)
        t2 = time.process_time()
        sink.flush()
        t3 = time.process_time()
        spent["decode"] += t1 - t0
        spent["rib"] += t2 - t1
        spent["write"] += t3 - t2
        changes += len(pending)
        batches += 1
    if profile is not None:
        profile.disable()
    n = len(messages)
    per = {k: round(v / n * 1e6, 2) for k, v in spent.items()}
    per["total"] = round(sum(spent.values()) / n * 1e6, 2)
    return {"messages": n, "changes": changes, "batches": batches,
            "first_write_s": round(first_write, 2), "us_per_message": per,
            "seconds": round(sum(spent.values()), 2)}


class _Quiet:
    """A logger that drops everything (the guard logs a full map; none is here)."""

    def __getattr__(self, _name: str) -> Any:
        return lambda *a, **k: None


def main() -> None:
    ap = argparse.ArgumentParser()
    add_burst_arguments(ap, v4=200_000, v6=50_000, changes=60_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--save", help="keep the recording in this file")
    ap.add_argument("--load", help="replay this recording instead of making one")
    ap.add_argument("--maps", choices=("pinned", "memory"), default="pinned",
                    help="pinned BPF maps, as the daemon writes (root), or MemoryMaps")
    ap.add_argument("--cprofile", action="store_true", help="print the top functions of the "
                    "replays (decode, RIB, write; not the first write)")
    report.add_arguments(ap)
    args = ap.parse_args()
    configure("warning")
    # the daemon's process settings (daemon.main), where the checkout measured has them
    getattr(process, "relax_gc", lambda: None)()
    if args.load:
        rec = pickle.loads(Path(args.load).read_bytes())
    else:
        if os.geteuid() != 0:
            raise SystemExit("recording needs root (namespaces)")
        rec = record(args)
        if args.save:
            Path(args.save).write_bytes(pickle.dumps(rec))
    profile = cProfile.Profile() if args.cprofile else None
    rounds = []
    for i in range(args.rounds):
        with fresh_maps(args.maps) as writer:
            rounds.append(replay(rec, writer, profile))
        print(f"  round {i}: {rounds[-1]}", file=sys.stderr, flush=True)
    if profile is not None:
        pstats.Stats(profile, stream=sys.stderr).sort_stats("tottime").print_stats(30)
    best = min(rounds, key=lambda r: r["seconds"])
    doc = {"machine": platform.node(), "kernel": platform.release(),
           "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M"),
           "fibsync": str(Path(sys.modules["fibsync"].__file__ or "").parent.parent),
           "recording": {k: rec[k] for k in ("v4", "v6", "changes", "compat", "seed")},
           "rounds": rounds, "best_us_per_message": best["us_per_message"]}
    report.publish(doc, args, lambda _doc, _png: None)


if __name__ == "__main__":
    main()
