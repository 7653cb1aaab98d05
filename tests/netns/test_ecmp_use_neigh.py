"""ECMP and a failed neighbour under fib_multipath_use_neigh: fibsync changes nothing.

A router forwards 198.18.0.0/24 over two gateways, each in a host namespace of
its own; a third host sends UDP probes to 60 destinations in it. With
net.ipv4.fib_multipath_use_neigh=1 and an administrator's
``ip neigh replace GW2 dev r2 nud failed``, the kernel alone sends every probe
to GW1 and leaves the entry FAILED. fibsync must do the same: nothing of it
resolves the entry again, and the fast path leaves the choice of the path to
the kernel (bpf_fib_lookup) while the kernel may skip one. Once the entry is
valid again, the fast path spreads the probes over both gateways itself, and
the router's kernel forwards none of them.

Probes that reach a gateway's namespace are counted by its kernel (Ip
InReceives): those hosts do not forward, and drop the probes silently.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fibsync.demo import RouterDaemon
from fibsync.lab import Netns, veth, wait_until

pytestmark = pytest.mark.privileged

GW1, GW2 = "10.1.0.2", "10.2.0.2"
GW2_MAC = "02:00:00:00:02:02"
DESTINATIONS = [f"198.18.0.{i}" for i in range(1, 61)]
EACH = 3  # probes per destination


@dataclass
class Net:
    src: Netns
    r: Netns
    g1: Netns
    g2: Netns


@pytest.fixture
def net(netns_factory: Callable[[str], Netns]) -> Net:
    n = Net(*(netns_factory(name) for name in ("src", "r", "g1", "g2")))
    veth(n.src, "s0", n.r, "rs")
    veth(n.r, "r1", n.g1, "g1")
    veth(n.r, "r2", n.g2, "g2")
    n.g2.ip("link", "set", "g2", "address", GW2_MAC)
    for ns, cmds in (
        (n.src, ["addr add 10.0.0.2/24 dev s0", "route add default via 10.0.0.1"]),
        (n.r, ["addr add 10.0.0.1/24 dev rs", "addr add 10.1.0.1/24 dev r1",
               "addr add 10.2.0.1/24 dev r2",
               f"route add 198.18.0.0/24 nexthop via {GW1} dev r1 nexthop via {GW2} dev r2"]),
        (n.g1, [f"addr add {GW1}/24 dev g1"]),
        (n.g2, [f"addr add {GW2}/24 dev g2"]),
    ):
        for cmd in cmds:
            ns.ip(*cmd.split())
    n.r.sysctl("net.ipv4.conf.all.forwarding", 1)
    n.r.sysctl("net.ipv4.fib_multipath_use_neigh", 1)
    # GW1 resolved; GW2 marked failed by the administrator (not pinged first: its
    # host would then check its own entry for the router, and the router's kernel
    # would learn GW2 again from that ARP request, fibsync or not)
    n.r.run(["ping", "-c", "1", "-W", "2", GW1])
    n.r.ip("neigh", "replace", GW2, "dev", "r2", "nud", "failed")
    assert neighbour_state(n) == ["FAILED"]
    return n


@pytest.fixture
def fibsync(net: Net, lab_rundir: Path, unique_prefix: str) -> Iterator[RouterDaemon]:
    daemon = RouterDaemon(net.r, lab_rundir, unique_prefix, ["rs", "r1", "r2"])
    try:
        yield daemon
    finally:
        daemon.stop()
        daemon.remove_pins()


def neighbour_state(n: Net) -> list[str]:
    (entry,) = n.r.ip_json("neigh", "show", GW2, "dev", "r2")
    return entry["state"]  # type: ignore[no-any-return]


def received(ns: Netns) -> int:
    """IPv4 packets the namespace's kernel received (Ip InReceives)."""
    rows = [line.split() for line in ns.run(["cat", "/proc/net/snmp"]).stdout.splitlines()
            if line.startswith("Ip: ")]
    return int(rows[1][rows[0].index("InReceives")])


def probe(n: Net) -> tuple[int, int]:
    """Send the probes; what GW1's and GW2's hosts received of them."""
    before = received(n.g1), received(n.g2)
    n.src.run(["python3", "-c", f"""
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for dst in {DESTINATIONS!r}:
    for _ in range({EACH}):
        s.sendto(b"probe", (dst, 9))
"""])
    total = len(DESTINATIONS) * EACH

    def arrived() -> tuple[int, int] | None:
        got = received(n.g1) - before[0], received(n.g2) - before[1]
        return got if sum(got) >= total else None

    return wait_until(arrived, timeout=5, what=f"{total} probes at the gateways")  # type: ignore[no-any-return]


def fwd(daemon: RouterDaemon) -> dict[str, int]:
    counters = daemon.status()["counters"]
    return {r: int(counters[r]["packets"]) for r in ("FWD_FAST", "FWD_FIB")}


def test_a_failed_path_stays_failed_and_unused_as_without_fibsync(
        net: Net, fibsync: RouterDaemon) -> None:
    total = len(DESTINATIONS) * EACH
    # the kernel alone
    assert probe(net) == (total, 0)
    time.sleep(5)
    assert neighbour_state(net) == ["FAILED"]

    # the same with fibsync: the group is the kernel's to choose, and nothing asks
    # the kernel to resolve GW2
    fibsync.start()
    assert fibsync.status()["fastpath"]["groups_by_kernel"] == 1
    before, kernel = fwd(fibsync), net.r.kernel_forwarded()
    assert probe(net) == (total, 0)
    after = fwd(fibsync)
    assert after["FWD_FIB"] - before["FWD_FIB"] == total  # bpf_fib_lookup chose GW1
    assert net.r.kernel_forwarded() == kernel
    time.sleep(5)
    assert neighbour_state(net) == ["FAILED"]
    assert probe(net) == (total, 0)

    # without use_neigh the kernel would use GW2 too: the fast path follows the sysctl
    net.r.sysctl("net.ipv4.fib_multipath_use_neigh", 0)
    wait_until(lambda: fibsync.status()["fastpath"]["groups_by_kernel"] == 0, timeout=5,
               what="the group's buckets back once use_neigh is 0")
    net.r.sysctl("net.ipv4.fib_multipath_use_neigh", 1)
    wait_until(lambda: fibsync.status()["fastpath"]["groups_by_kernel"] == 1, timeout=5,
               what="the group the kernel's again once use_neigh is 1")
    assert any(e.get("event") == "ecmp.use_neigh" for e in fibsync.logs())
    assert neighbour_state(net) == ["FAILED"]

    # GW2 valid again: both paths, chosen and carried by the fast path alone
    net.r.ip("neigh", "replace", GW2, "lladdr", GW2_MAC, "dev", "r2", "nud", "reachable")
    wait_until(lambda: fibsync.status()["fastpath"]["groups_by_kernel"] == 0, timeout=5,
               what="the group's buckets back once GW2 is reachable")
    before, kernel = fwd(fibsync), net.r.kernel_forwarded()
    to_gw1, to_gw2 = probe(net)
    assert to_gw1 > 0 and to_gw2 > 0 and to_gw1 + to_gw2 == total
    assert fwd(fibsync)["FWD_FAST"] - before["FWD_FAST"] == total
    assert net.r.kernel_forwarded() == kernel, "the router's kernel forwarded probes"
