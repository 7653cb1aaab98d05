"""Differential tests: after any storm of kernel changes, the maps equal the kernel.

A seeded random sequence of route, nexthop-object, neighbour, address and link
changes (tests/netns/churn.py) is applied with `ip -force -batch` at full speed
while fibsync runs; once the kernel is quiet, `fibsync routes --json` must
equal what the kernel holds (`ip -j route`, `ip -j nexthop`, `ip -j neigh`):
zero differences, next hops, weights, MACs and MTUs included.

Each variant runs one seed here; more seeds run locally with
``FIBSYNC_CHURN_SEEDS=1,2,3 pytest tests/netns/test_mirror.py``.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fibsync.demo import RouterDaemon
from fibsync.lab import Netns

from .churn import MARKER, MARKER_TABLE, Churn, World
from .kernel_view import differences, fibsync_view, kernel_view

SEEDS = [int(s) for s in os.environ.get("FIBSYNC_CHURN_SEEDS", "").split(",") if s.strip()]


def seeds(default: int) -> list[int]:
    return SEEDS or [default]


@pytest.fixture
def world_ns(netns_factory: Callable[[str], Netns], lab_rundir: Path) -> Iterator[Netns]:
    ns = netns_factory("mirror")
    batch(ns, World().setup(), lab_rundir)
    yield ns


def batch(ns: Netns, lines: list[str], rundir: Path) -> None:
    """Apply lines with `ip -force -batch`; a batch that never gets to its end fails the test.

    iproute2 exits in the middle of a batch on some errors (seen rarely, depending on
    timing): then the rest is applied from just after the last line iproute2
    reported failing. Lines after that one that had gone in already are applied
    again; the kernel stays the reference, so the comparison is as strict. When
    the lines end with churn's marker route, the marker must be there at the end.
    """
    path = rundir / "batch.txt"
    ns.run(["ip", "route", "flush", "table", str(MARKER_TABLE)], check=False)
    rest, stderr = lines, ""
    for _ in range(20):
        path.write_text("\n".join(rest) + "\n")
        r = ns.run(["ip", "-force", "-batch", str(path)], check=False, timeout=300)
        stderr = r.stderr
        if not lines[-1].endswith(f"table {MARKER_TABLE}") or _has_marker(ns):
            return
        failed = [int(n) for n in re.findall(rf"Command failed {re.escape(str(path))}:(\d+)",
                                              stderr)]
        rest = rest[max(failed, default=0):]
    raise AssertionError(f"the batch never reached its end: {stderr[-500:]}")


def _has_marker(ns: Netns) -> bool:
    r = ns.run(["ip", "-j", "route", "show", "table", str(MARKER_TABLE)], check=False)
    return r.returncode == 0 and any(m["dst"] == MARKER.split("/")[0]
                                     for m in json.loads(r.stdout or "[]"))


def start(ns: Netns, rundir: Path, instance: str, *extra: str) -> RouterDaemon:
    daemon = RouterDaemon(ns, rundir, instance, list(World().links), list(extra))
    daemon.start()
    return daemon


def settle(daemon: RouterDaemon, ns: Netns, table: str = "main",
           timeout: float = 90) -> list[str]:
    """Wait until the maps equal the kernel; return the differences left at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        diff = differences(kernel_view(ns.ip_json, table), fibsync_view(daemon.routes()))
        if not diff or time.monotonic() > deadline:
            return diff
        time.sleep(0.5)


@pytest.fixture
def daemons() -> Iterator[list[RouterDaemon]]:
    started: list[RouterDaemon] = []
    yield started
    for d in started:
        d.stop()
        d.remove_pins()


def test_churn_covers_what_the_mirror_must_follow() -> None:
    """The generator really produces every kind of change the issue names (no root needed)."""
    text = "\n".join(Churn(seed=1000).lines(20_000))
    wanted = {
        "IPv4 route via a gateway": r"route replace 198\.\S+ via 192\.",
        "IPv6 route via a gateway": r"route replace 2001:\S+ via 2001:",
        "route via a link": r"route replace \S+ dev e\d$",
        "route via a nexthop object": r"route replace \S+ nhid",
        "multipath with weights": r"nexthop via \S+ dev e\d weight \d nexthop",
        "RFC 5549 route": r"route replace 198\.\S+ via inet6",
        "RFC 5549 path in multipath": r"nexthop via inet6 .* nexthop",
        "IPv6 sibling appended": r"route append 2001:",
        "IPv4 alias appended": r"route append 198\.",
        "IPv4 alias prepended": r"route prepend 198\.",
        "IPv6 sibling deleted": r"route del 2001:\S+ via",
        "blackhole": r"replace blackhole", "unreachable": r"replace unreachable",
        "prohibit": r"replace prohibit", "throw": r"replace throw",
        "table 100": r"table 100", "table 200": r"table 200", "metrics": r"metric 20",
        "nexthop object": r"nexthop replace id \d+ via", "IPv6 nexthop object":
            r"nexthop replace id \d+ via 2001:", "blackhole object": r"id \d+ blackhole",
        "weighted group": r"group \d+,\d/", "object deleted": r"nexthop del id",
        "neighbour": r"neigh replace .* nud reachable", "permanent neighbour": r"nud permanent",
        "neighbour flushed": r"neigh flush", "link down": r"link set e\d down",
        "carrier lost": r"link set p\d down", "last IPv4 address removed":
            r"addr del 192\.0\.2\.\d+/26", "link deleted": r"link del e\d",
        "MTU change": r"mtu 9000", "MAC change": r"address 02:aa",
    }
    missing = [what for what, pattern in wanted.items()
               if not re.search(pattern, text, re.MULTILINE)]
    assert not missing


@pytest.mark.privileged
@pytest.mark.parametrize("seed", seeds(1000))
@pytest.mark.parametrize("compat", [1, 0])
def test_churn_leaves_maps_equal_to_kernel(world_ns: Netns, lab_rundir: Path,
                                           unique_prefix: str, daemons: list[RouterDaemon],
                                           compat: int, seed: int) -> None:
    world_ns.sysctl("net.ipv4.nexthop_compat_mode", compat)
    daemon = start(world_ns, lab_rundir, f"{unique_prefix}c{compat}")
    daemons.append(daemon)
    batch(world_ns, Churn(seed=seed + compat).lines(20_000), lab_rundir)
    diff = settle(daemon, world_ns)
    assert not diff, "\n".join([*diff, daemon.postmortem()])
    # the storm reached the fast path: the view is not trivially empty
    assert len(daemon.routes()) > 50
    assert daemon.status()["state"] == "synced"


@pytest.mark.privileged
@pytest.mark.parametrize("seed", seeds(7))
def test_overruns_resync_to_an_exact_mirror(world_ns: Netns, lab_rundir: Path,
                                            unique_prefix: str, daemons: list[RouterDaemon],
                                            seed: int) -> None:
    daemon = start(world_ns, lab_rundir, f"{unique_prefix}ob", "--netlink-rcvbuf", "4096")
    daemons.append(daemon)
    batch(world_ns, Churn(seed=seed).lines(20_000), lab_rundir)
    diff = settle(daemon, world_ns)
    assert not diff, "\n".join([*diff, daemon.postmortem()])
    netlink = daemon.status()["netlink"]
    assert netlink["overruns"] > 0
    assert netlink["resyncs"] > 0


@pytest.mark.privileged
@pytest.mark.parametrize("seed", seeds(3))
def test_other_table_is_followed_when_asked(world_ns: Netns, lab_rundir: Path,
                                            unique_prefix: str, daemons: list[RouterDaemon],
                                            seed: int) -> None:
    daemon = start(world_ns, lab_rundir, f"{unique_prefix}t", "--table", "100")
    daemons.append(daemon)
    batch(world_ns, Churn(seed=seed).lines(5_000), lab_rundir)
    diff = settle(daemon, world_ns, table="100")
    assert not diff, "\n".join([*diff, daemon.postmortem()])
