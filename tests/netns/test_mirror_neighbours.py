"""Neighbours: a next hop's MAC follows the kernel's ARP/NDP table within 100 ms.

On the lab's router, a route of our own via h2's address on r-h2a. The
router's kernel resolves the next hop when it sends there (fibsync asks it
for nothing); then the entry's MAC changes, the entry goes, and comes back.
Timed on the pinned maps (what `fibsync routes --json` reads).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from fibsync.config import PIN_ROOT
from fibsync.demo import RouterDaemon
from fibsync.fastpath.maps import PinnedMaps
from fibsync.lab import Lab

pytestmark = pytest.mark.privileged

OTHER_MAC = "02:00:00:00:00:99"


def hop(daemon: RouterDaemon, prefix: str) -> dict[str, Any] | None:
    maps = PinnedMaps(PIN_ROOT / daemon.instance)
    try:
        entry = next((e for e in maps.routes() if e["prefix"] == prefix), None)
    finally:
        maps.close()
    return entry["nexthops"][0] if entry and entry["nexthops"] else None


def wait_for(predicate: Callable[[], bool], timeout: float) -> float:
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            return float("inf")
        time.sleep(0.002)
    return time.monotonic() - t0


@pytest.mark.parametrize("family", [4, 6])
def test_next_hop_mac_follows_the_neighbour_table_within_100ms(
        lab: Lab, fibsync: RouterDaemon, family: int) -> None:
    link = lab.h2_links[0]
    gateway = str(link.host_v4.ip if family == 4 else link.host_v6.ip)
    prefix = "198.18.0.0/24" if family == 4 else "2001:db8:ff::/48"
    real_mac = lab.h2.ip_json("link", "show", "dev", link.host_if)[0]["address"]
    lab.r.ip(f"-{family}", "route", "add", prefix, "via", gateway, "dev", link.router_if)

    def mac() -> str | None:
        h = hop(fibsync, prefix)
        return h["mac"] if h else None

    def kernel_resolves() -> None:
        lab.r.run(["ping", f"-{family}", "-c", "1", "-W", "2", "-I", link.router_if, gateway])

    # nobody sends to the next hop: nothing resolves it, as without fibsync
    time.sleep(0.5)
    assert mac() is None
    kernel_resolves()
    assert wait_for(lambda: mac() == real_mac, 10) < 10

    lab.r.ip("neigh", "replace", gateway, "lladdr", OTHER_MAC, "dev", link.router_if,
             "nud", "permanent")
    elapsed = wait_for(lambda: mac() == OTHER_MAC, 2)
    assert elapsed <= 0.1, f"MAC change reached the fast path after {elapsed:.3f}s"

    lab.r.ip("neigh", "del", gateway, "dev", link.router_if)
    elapsed = wait_for(lambda: mac() != OTHER_MAC, 2)
    assert elapsed <= 0.1, f"a deleted neighbour was still used after {elapsed:.3f}s"
    # and it comes back once the kernel asks again, h2 answering with its own address
    kernel_resolves()
    assert wait_for(lambda: mac() == real_mac, 10) < 10

