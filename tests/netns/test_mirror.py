"""Differential tests: after any storm of kernel changes, the maps equal the kernel.

A seeded random sequence of route, nexthop-object, neighbour and link changes
is applied with `ip -force -batch` at full speed while fibsync runs; once the
kernel is quiet, `fibsync routes --json` must equal what the kernel holds
(`ip -j route`, `ip -j nexthop`): zero differences.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fibsync.demo import RouterDaemon
from fibsync.lab import Netns

from .churn import Churn, World
from .kernel_view import differences, fibsync_view, kernel_view

pytestmark = pytest.mark.privileged


@pytest.fixture
def world_ns(netns_factory: Callable[[str], Netns], lab_rundir: Path) -> Iterator[Netns]:
    ns = netns_factory("mirror")
    batch(ns, World().setup(), lab_rundir)
    yield ns


def batch(ns: Netns, lines: list[str], rundir: Path) -> None:
    path = rundir / "batch.txt"
    path.write_text("\n".join(lines) + "\n")
    ns.run(["ip", "-force", "-batch", str(path)], check=False, timeout=300)


def start(ns: Netns, rundir: Path, instance: str, *extra: str) -> RouterDaemon:
    daemon = RouterDaemon(ns, rundir, instance, list(World().links), list(extra))
    daemon.start()
    return daemon


def settle(daemon: RouterDaemon, ns: Netns, table: str = "main",
           timeout: float = 30) -> list[str]:
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


@pytest.mark.parametrize("compat", [1, 0])
def test_churn_leaves_maps_equal_to_kernel(world_ns: Netns, lab_rundir: Path,
                                           unique_prefix: str, daemons: list[RouterDaemon],
                                           compat: int) -> None:
    world_ns.sysctl("net.ipv4.nexthop_compat_mode", compat)
    daemon = start(world_ns, lab_rundir, f"{unique_prefix}c{compat}")
    daemons.append(daemon)
    batch(world_ns, Churn(seed=1000 + compat).lines(20_000), lab_rundir)
    diff = settle(daemon, world_ns)
    assert not diff, "\n".join(diff)
    # the storm reached the fast path: the view is not trivially empty
    assert len(daemon.routes()) > 50


def test_overruns_resync_to_an_exact_mirror(world_ns: Netns, lab_rundir: Path,
                                            unique_prefix: str,
                                            daemons: list[RouterDaemon]) -> None:
    daemon = start(world_ns, lab_rundir, f"{unique_prefix}ob", "--netlink-rcvbuf", "4096")
    daemons.append(daemon)
    batch(world_ns, Churn(seed=7).lines(20_000), lab_rundir)
    diff = settle(daemon, world_ns)
    assert not diff, "\n".join(diff)
    netlink = daemon.status()["netlink"]
    assert netlink["overruns"] > 0
    assert netlink["resyncs"] > 0


def test_other_table_is_followed_when_asked(world_ns: Netns, lab_rundir: Path,
                                            unique_prefix: str,
                                            daemons: list[RouterDaemon]) -> None:
    daemon = start(world_ns, lab_rundir, f"{unique_prefix}t", "--table", "100")
    daemons.append(daemon)
    batch(world_ns, Churn(seed=3).lines(5_000), lab_rundir)
    diff = settle(daemon, world_ns, table="100")
    assert not diff, "\n".join(diff)
