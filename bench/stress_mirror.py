"""Stress loops of issue 10: is the mirror exact after storms that overrun its netlink socket?

    .venv/bin/python bench/stress_mirror.py [--loops 50] [--seed S ...] [--changes 200000]
                                            [--compat 0|1] [--rcvbuf 4096|...|default]

Each loop (tests/netns/stress.py) builds a fresh namespace with ~36k IPv4 and
IPv6 routes over links, nexthop objects and groups, starts fibsync there,
applies ``--changes`` seeded random changes in bursts and lulls, and compares
fibsync's maps with the kernel until equal (or until the differences left
have not changed for ``--timeout`` seconds). One line per loop: seed, compat mode,
receive buffer, changes, overruns, resyncs, differences by family, time to
equal; then a summary.
Exit status 1 when any loop ended with differences (or a dead daemon).

A seed decides the whole loop, including its compat mode and receive buffer
unless they are given: ``--seed S --loops 1`` replays a loop. Without
``--seed``, every loop draws a fresh one. ``--fibsync-tree DIR`` runs the
daemon and the CLI from another checkout (e.g. an older commit exported with
``git archive``), to show a bug before its fix.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import uuid
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import report  # noqa: E402

from tests.netns.stress import (  # noqa: E402
    DEFAULT_CHANGES,
    SETTLE_TIMEOUT,
    SMALL_RCVBUFS,
    Loop,
    Outcome,
    run_loop,
    scratch,
)

# small buffers overrun in every burst; 1 MiB carries the daemon through a resync
# while changes still come in; the default (64 MiB) overruns only in the largest storms
RCVBUFS: tuple[int | None, ...] = (*SMALL_RCVBUFS, 1 << 20, None)


def parse_rcvbuf(text: str) -> int | None:
    if text == "default":
        return None
    units = {"k": 1 << 10, "m": 1 << 20}
    t = text.lower().removesuffix("ib").removesuffix("b")
    return int(t[:-1]) * units[t[-1]] if t and t[-1] in units else int(t)


def loop_for(seed: int, args: argparse.Namespace) -> Loop:
    rng = random.Random(seed)
    compat = rng.choice((0, 1))
    rcvbuf = rng.choice(RCVBUFS)
    if args.compat is not None:
        compat = args.compat
    if args.rcvbuf is not None:
        rcvbuf = parse_rcvbuf(args.rcvbuf)
    return Loop(seed, compat, rcvbuf, args.changes)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--loops", type=int, default=50)
    ap.add_argument("--seed", type=int, action="append", default=[],
                    help="seed of a loop (repeat for several); the rest draw fresh ones")
    ap.add_argument("--changes", type=int, default=DEFAULT_CHANGES)
    ap.add_argument("--compat", type=int, choices=(0, 1), default=None,
                    help="net.ipv4.nexthop_compat_mode (default: drawn from the seed)")
    ap.add_argument("--rcvbuf", default=None,
                    help="--netlink-rcvbuf in bytes (4096, 64k, 1MiB) or 'default' "
                         "(default: drawn from the seed)")
    ap.add_argument("--timeout", type=float, default=SETTLE_TIMEOUT,
                    help="seconds the differences left must stay the same to count "
                         "(while they change, the daemon is still catching up)")
    ap.add_argument("--v4", type=int, default=24_000, help="IPv4 prefix pool")
    ap.add_argument("--v6", type=int, default=24_000, help="IPv6 prefix pool")
    report.add_tree_argument(ap)
    ap.add_argument("--jsonl", type=Path, default=None, help="append each loop's outcome here")
    ap.add_argument("--logs", type=Path, default=Path("/tmp/fibsync-stress"),
                    help="where the daemon logs of failed loops go (SEED.log)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces, BPF)", file=sys.stderr)
        return 2
    report.use_tree(args)
    seeds = list(args.seed)
    fresh = random.SystemRandom()
    while len(seeds) < args.loops:
        seeds.append(fresh.randrange(1, 1 << 31))

    outcomes: list[Outcome] = []
    started = time.monotonic()
    for i, seed in enumerate(seeds[:args.loops]):
        loop = loop_for(seed, args)
        name = f"fsb{uuid.uuid4().hex[:5]}"
        print(f"[{i + 1}/{args.loops}] ", end="", flush=True)
        try:
            with scratch(name) as (ns, rundir):
                outcome = run_loop(ns, rundir, name, loop, timeout=args.timeout,
                                   keep_log=args.logs / f"{seed}.log", v4=args.v4, v6=args.v6)
        except Exception as exc:  # noqa: BLE001 - a loop that broke is a failed loop, go on
            outcome = Outcome(loop, problem=f"{type(exc).__name__}: {exc}")
        outcomes.append(outcome)
        print(("ok   " if outcome.ok else "FAIL ") + outcome.summary(), flush=True)
        if not outcome.ok:
            print("\n".join("    " + d for d in outcome.differences), flush=True)
            print(f"    daemon log: {args.logs / f'{seed}.log'}", flush=True)
        if args.jsonl is not None:
            with args.jsonl.open("a") as f:
                doc = asdict(outcome)
                doc["ok"] = outcome.ok
                f.write(json.dumps(doc) + "\n")

    failed = [o for o in outcomes if not o.ok]
    equal = [o.seconds_to_equal for o in outcomes if o.seconds_to_equal is not None]
    print(f"\n{len(outcomes)} loops in {time.monotonic() - started:.0f} s: "
          f"{len(outcomes) - len(failed)} exact, {len(failed)} with differences")
    for fam in ("ipv4", "ipv6"):
        lost = sum(o.missing.get(fam, 0) for o in outcomes)
        extra = sum(o.extra.get(fam, 0) for o in outcomes)
        wrong = sum(o.wrong.get(fam, 0) for o in outcomes)
        print(f"  {fam}: {lost} prefixes missing, {extra} extra, {wrong} wrong (all loops)")
    if equal:
        print(f"  time to equal: median {sorted(equal)[len(equal) // 2]:.1f} s, "
              f"max {max(equal):.1f} s")
    print(f"  overruns {sum(o.overruns for o in outcomes)}, "
          f"resyncs {sum(o.resyncs for o in outcomes)}")
    for o in failed:
        print(f"  FAILED {o.loop}: replay with --seed {o.loop.seed} --loops 1"
              + (f" --fibsync-tree {args.fibsync_tree}" if args.fibsync_tree else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
