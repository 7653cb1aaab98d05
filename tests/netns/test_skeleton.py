"""End to end on the lab: FRR installs routes, fibsync mirrors them, XDP forwards.

The router's kernel forwarding stays on (fibsync honours it). What XDP carries
never reaches the router's stack, so its kernel forwarding counters
(ForwDatagrams, Ip6OutForwDatagrams) stay flat while traffic crosses; without
fibsync the same traffic raises them.
"""

from __future__ import annotations

import re
import time

import pytest

from fibsync.config import PIN_ROOT
from fibsync.demo import RouterDaemon
from fibsync.fastpath.maps import PinnedMaps
from fibsync.lab import Lab

from .test_operations_restart import XdpProof, warm_up

pytestmark = pytest.mark.privileged


def ping(lab: Lab, src: str, dst: str, count: int) -> int:
    r = lab.h1.run(["ping", "-c", str(count), "-i", "0.05", "-W", "1", "-I", src, dst],
                   check=False)
    m = re.search(r"(\d+) received", r.stdout)
    return int(m.group(1)) if m else 0


@pytest.mark.parametrize("family", [4, 6])
def test_xdp_forwards_and_the_routers_kernel_forwards_none(lab: Lab, fibsync: RouterDaemon,
                                                            family: int) -> None:
    src = str(getattr(lab, f"h1_lan_v{family}").ip)
    dst = str(getattr(lab, f"h2_lan_v{family}").ip)
    # the router may resolve its next hops on the first packets (kernel), not later
    warm_up(lab, src, dst)
    proof = XdpProof(lab, fibsync)
    received = ping(lab, src, dst, 20)
    assert received == 20
    # each echo crosses the router twice: request h1 -> h2, reply h2 -> h1
    proof.check(crossed=2 * received)


def test_without_fibsync_the_routers_kernel_counts_what_it_forwards(lab: Lab) -> None:
    """The control for the test above: flat counters mean something, because the
    kernel counts every packet it forwards (each echo and each reply)."""
    for src, dst, index in ((lab.h1_lan_v4.ip, lab.h2_lan_v4.ip, 0),
                            (lab.h1_lan_v6.ip, lab.h2_lan_v6.ip, 1)):
        before = lab.r.kernel_forwarded()
        assert ping(lab, str(src), str(dst), 3) == 3
        after = lab.r.kernel_forwarded()
        assert after[index] - before[index] == 6, (before, after)
        assert after[1 - index] == before[1 - index]


def _prefixes(daemon: RouterDaemon) -> set[str]:
    """The prefixes in the pinned maps, read in-process: what `fibsync routes` reads,
    without a CLI start-up (~0.3 s) inside the latency being measured."""
    maps = PinnedMaps(PIN_ROOT / daemon.instance)
    try:
        return {e["prefix"] for e in maps.routes()}
    finally:
        maps.close()


def _wait_for(predicate, timeout: float) -> float:  # type: ignore[no-untyped-def]
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            return float("inf")
        time.sleep(0.02)
    return time.monotonic() - t0


def test_static_route_from_frr_appears_and_disappears_within_1s(
        lab: Lab, fibsync: RouterDaemon) -> None:
    gw = str(lab.h1_link.host_v4.ip)
    prefix = "198.51.100.128/25"
    assert prefix not in _prefixes(fibsync)
    lab.frr.vtysh("configure terminal", f"ip route {prefix} {gw}")
    assert _wait_for(lambda: prefix in _prefixes(fibsync), 1.0) <= 1.0
    entry = next(e for e in fibsync.routes() if e["prefix"] == prefix)
    assert entry["type"] == "unicast"
    assert [h["gateway"] for h in entry["nexthops"]] == [gw]
    lab.frr.vtysh("configure terminal", f"no ip route {prefix} {gw}")
    assert _wait_for(lambda: prefix not in _prefixes(fibsync), 1.0) <= 1.0


def test_status_reports_synced_with_interfaces(lab: Lab, fibsync: RouterDaemon) -> None:
    doc = fibsync.status()
    assert doc["state"] == "synced"
    assert doc["daemon"] == "up"
    assert sorted(i["name"] for i in doc["interfaces"]) == sorted(lab.router_interfaces)
    assert all(i["prog_id"] for i in doc["interfaces"])
    assert doc["fastpath"]["routes_v4"] >= 4
    text = fibsync.cli("status").stdout
    assert "synced" in text and "r-h1" in text
