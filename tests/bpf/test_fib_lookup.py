"""The bpf_fib_lookup fallback against a real FIB (selftests fib_lookup.c style).

A namespace holds a veth pair, in0 (ingress) and out0 (egress), addresses,
routes of every type and permanent neighbours; packets are run with in0 as
their ingress device.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Packet, Raw

from fibsync.fastpath import abi
from fibsync.fastpath.abi import Reason
from fibsync.fastpath.program import FastPath
from tests.bpf.harness import ACTION_NAMES, XDP_DROP, XDP_PASS, XDP_REDIRECT, Lab, netns, sh

pytestmark = pytest.mark.privileged

GW_MAC = "02:00:00:00:02:02"
OUT_MAC = "02:00:00:00:00:0b"
IN_MAC = "02:00:00:00:00:0a"
CLIENT = "02:00:00:00:00:aa"


@dataclass
class FibNet:
    lab: Lab
    in_ifindex: int
    out_ifindex: int

    def run(self, pkt: Packet) -> tuple[int, bytes]:
        return self.lab.run(bytes(pkt), ingress=self.in_ifindex)


@pytest.fixture(scope="module")
def fib_ns(fastpath: FastPath) -> Iterator[str]:
    with netns(f"fst{uuid.uuid4().hex[:5]}fib") as ns:
        ip = ("ip", "-n", ns)
        sh(*ip, "link", "add", "in0", "address", IN_MAC, "type", "veth", "peer", "name", "out0",
           "address", OUT_MAC)
        for cmd in (
            "link set in0 up", "link set out0 up",
            "addr add 10.1.0.1/24 dev in0", "addr add 10.2.0.1/24 dev out0",
            "-6 addr add 2001:db8:1::1/64 dev in0 nodad",
            "-6 addr add 2001:db8:2::1/64 dev out0 nodad",
            f"neigh add 10.2.0.2 lladdr {GW_MAC} dev out0 nud permanent",
            f"-6 neigh add 2001:db8:2::2 lladdr {GW_MAC} dev out0 nud permanent",
            "route add 192.0.2.0/25 via 10.2.0.2",
            "route add 192.0.2.128/25 via 10.2.0.2 mtu lock 1000",
            "route add 198.51.100.0/24 via 10.2.0.3",  # no neighbour
            "route add unreachable 203.0.113.0/26",
            "route add prohibit 203.0.113.64/26",
            "route add blackhole 203.0.113.128/25",
            "-6 route add 2001:db8:99::/48 via 2001:db8:2::2",
        ):
            sh(*ip, *cmd.split())
        for key in ("net.ipv4.conf.all.forwarding", "net.ipv4.conf.in0.forwarding",
                    "net.ipv6.conf.all.forwarding"):
            sh("ip", "netns", "exec", ns, "sysctl", "-qw", f"{key}=1")
        yield ns


@pytest.fixture
def net(fastpath: FastPath, fib_ns: str) -> FibNet:
    lab = Lab(fastpath, fib_ns)
    lab.clear()
    net = FibNet(lab, lab.ifindex("in0"), lab.ifindex("out0"))
    lab.iface(net.in_ifindex, IN_MAC)
    lab.tx_port(net.out_ifindex)
    return net


def v4(dst: str, size: int = 32, ttl: int = 64) -> Packet:
    return (Ether(src=CLIENT, dst=IN_MAC) / IP(src="10.1.0.7", dst=dst, ttl=ttl)
            / UDP(sport=4000, dport=53) / Raw(b"z" * size))


def v6(dst: str, hlim: int = 64) -> Packet:
    return (Ether(src=CLIENT, dst=IN_MAC) / IPv6(src="2001:db8:1::7", dst=dst, hlim=hlim)
            / UDP(sport=4000, dport=53) / Raw(b"z" * 32))


def via_gateway(pkt: Packet) -> bytes:
    out = Ether(bytes(pkt))
    out.src, out.dst = OUT_MAC, GW_MAC
    if IP in out:
        out[IP].ttl -= 1
        del out[IP].chksum
    else:
        out[IPv6].hlim -= 1
    return bytes(out)


CASES = [
    ("v4 miss, FIB success", v4("192.0.2.9"), XDP_REDIRECT, Reason.FWD_FIB),
    ("v6 miss, FIB success", v6("2001:db8:99::9"), XDP_REDIRECT, Reason.FWD_FIB),
    ("no route", v4("100.127.0.1"), XDP_PASS, Reason.PASS_NO_ROUTE),
    ("v6 no route", v6("2001:db8:77::1"), XDP_PASS, Reason.PASS_NO_ROUTE),
    ("gateway without neighbour", v4("198.51.100.1"), XDP_PASS, Reason.PASS_NO_NEIGH),
    ("unreachable route", v4("203.0.113.1"), XDP_PASS, Reason.PASS_UNREACHABLE),
    ("prohibit route", v4("203.0.113.65"), XDP_PASS, Reason.PASS_UNREACHABLE),
    ("blackhole route", v4("203.0.113.129"), XDP_DROP, Reason.DROP_BLACKHOLE),
    ("larger than the route MTU", v4("192.0.2.130", size=1200), XDP_PASS, Reason.PASS_MTU),
    ("within the route MTU", v4("192.0.2.130", size=900), XDP_REDIRECT, Reason.FWD_FIB),
    ("TTL 1 after a FIB success", v4("192.0.2.9", ttl=1), XDP_PASS, Reason.PASS_TTL),
]


@pytest.mark.parametrize(("description", "pkt", "action", "reason"), CASES,
                         ids=[c[0] for c in CASES])
def test_fib_fallback(net: FibNet, description: str, pkt: Packet, action: int,
                      reason: Reason) -> None:
    retval, out = net.run(pkt)
    assert ACTION_NAMES[retval] == ACTION_NAMES[action]
    assert out == (via_gateway(pkt) if action == XDP_REDIRECT else bytes(pkt))
    assert net.lab.counters() == {reason: (1, len(pkt))}


def test_fib_egress_not_in_tx_ports(net: FibNet) -> None:
    net.lab.clear()  # tx_ports emptied (and ifaces: in0 again)
    net.lab.iface(net.in_ifindex, IN_MAC)
    pkt = v4("192.0.2.9")
    assert net.run(pkt) == (XDP_PASS, bytes(pkt))
    assert net.lab.counters() == {Reason.PASS_EGRESS: (1, len(pkt))}


def test_forwarding_disabled_on_ingress(net: FibNet, fib_ns: str) -> None:
    sh("ip", "netns", "exec", fib_ns, "sysctl", "-qw", "net.ipv4.conf.in0.forwarding=0")
    try:
        pkt = v4("192.0.2.9")
        assert net.run(pkt) == (XDP_PASS, bytes(pkt))
        assert net.lab.counters() == {Reason.PASS_FIB_OTHER: (1, len(pkt))}
    finally:
        sh("ip", "netns", "exec", fib_ns, "sysctl", "-qw", "net.ipv4.conf.in0.forwarding=1")


def test_route_action_fib_uses_the_kernel_fib(net: FibNet) -> None:
    net.lab.route("192.0.2.0/24", action=abi.FS_ACT_FIB)
    pkt = v4("192.0.2.9")
    assert net.run(pkt) == (XDP_REDIRECT, via_gateway(pkt))
    assert net.lab.counters() == {Reason.FWD_FIB: (1, len(pkt))}


def test_group_without_buckets_is_the_kernels_choice(net: FibNet) -> None:
    """A group whose path the kernel may skip has no bucket: its resolved member
    is not used, bpf_fib_lookup picks the path."""
    net.lab.nexthop(1, net.out_ifindex, OUT_MAC, "02:00:00:00:03:03")
    net.lab.group(5, [])
    net.lab.route("192.0.2.0/24", 5, group=True)
    pkt = v4("192.0.2.9")
    assert net.run(pkt) == (XDP_REDIRECT, via_gateway(pkt))
    assert net.lab.counters() == {Reason.FWD_FIB: (1, len(pkt))}


def test_unresolved_nexthop_falls_back_to_the_fib(net: FibNet) -> None:
    """The fast path's own entry is unresolved, the kernel's neighbour is not:
    the kernel's FIB forwards the packet."""
    net.lab.nexthop(1, net.out_ifindex, OUT_MAC, None, gateway="10.2.0.2")
    net.lab.route("192.0.2.0/24", 1)
    pkt = v4("192.0.2.9")
    assert net.run(pkt) == (XDP_REDIRECT, via_gateway(pkt))
    assert net.lab.counters() == {Reason.FWD_FIB: (1, len(pkt))}


def test_unresolved_everywhere_goes_to_the_kernel_untouched(net: FibNet, fib_ns: str) -> None:
    """Neither the fast path nor the kernel knows the gateway's MAC: bpf_fib_lookup
    answers NO_NEIGH and the packet goes to the kernel, which resolves the gateway
    when and as it would have; the program itself asks the kernel for nothing."""
    net.lab.nexthop(1, net.out_ifindex, OUT_MAC, None, gateway="10.2.0.3")
    net.lab.route("198.51.100.0/24", 1)
    pkt = v4("198.51.100.1")
    assert net.run(pkt) == (XDP_PASS, bytes(pkt))
    assert net.lab.counters() == {Reason.PASS_NO_NEIGH: (1, len(pkt))}
    assert sh("ip", "-n", fib_ns, "neigh", "show", "10.2.0.3").strip() == ""


def test_resolved_nexthop_beats_the_fib(net: FibNet) -> None:
    net.lab.nexthop(1, net.out_ifindex, OUT_MAC, "02:00:00:00:03:03")
    net.lab.route("192.0.2.0/24", 1)
    pkt = v4("192.0.2.9")
    retval, out = net.run(pkt)
    assert retval == XDP_REDIRECT
    assert Ether(out).dst == "02:00:00:00:03:03"
    assert net.lab.counters() == {Reason.FWD_FAST: (1, len(pkt))}


def test_a_stale_heartbeat_checks_the_source_by_the_kernel_fib_too(net: FibNet) -> None:
    """Strict rp_filter, and tables behind the kernel's: the stale table routes the
    source back through the ingress, the kernel's FIB through out0. The kernel would
    drop the packet; the program must not forward it by its stale table's word."""
    coarse = time.clock_gettime_ns(6)  # CLOCK_MONOTONIC_COARSE
    net.lab.iface(net.in_ifindex, IN_MAC, flags=abi.FS_IF_RPF_STRICT)
    net.lab.nexthop(2, net.in_ifindex, IN_MAC, CLIENT)
    net.lab.route("192.0.2.0/24", 2)  # the kernel has 192.0.2.0/25 via out0
    pkt = (Ether(src=CLIENT, dst=IN_MAC) / IP(src="192.0.2.9", dst="192.0.2.200")
           / UDP(sport=4000, dport=53) / Raw(b"z" * 32))
    net.lab.heartbeat(coarse - 1)
    assert net.run(pkt) == (XDP_PASS, bytes(pkt))
    assert net.lab.counters() == {Reason.PASS_RP_FILTER: (1, len(pkt))}
    # a source the kernel's FIB routes back through in0 is forwarded, by the FIB
    net.lab.clear_counters()
    ok = v4("192.0.2.200")  # from 10.1.0.7, in0's own network
    assert net.run(ok) == (XDP_REDIRECT, via_gateway(ok))
    assert net.lab.counters() == {Reason.FWD_STALE: (1, len(ok))}


def test_a_stale_heartbeat_hands_every_lookup_to_the_kernel_fib(net: FibNet) -> None:
    """Past fresh_until the program trusts none of its own entries: a route the daemon
    never heard withdrawn (100.127.0.0/16 here) stops being forwarded, and the rest
    follows the kernel's FIB (its gateway's MAC, not the stale entry's)."""
    coarse = time.clock_gettime_ns(6)  # CLOCK_MONOTONIC_COARSE: bpf_ktime_get_coarse_ns
    net.lab.nexthop(1, net.out_ifindex, OUT_MAC, "02:00:00:00:03:03")
    net.lab.route("192.0.2.0/24", 1)
    net.lab.route("100.127.0.0/16", 1)
    net.lab.route("2001:db8:99::/48", 1)
    fresh, gone, fresh6 = v4("192.0.2.9"), v4("100.127.0.1"), v6("2001:db8:99::9")

    net.lab.heartbeat(coarse + 60 * 10**9)
    for pkt in (fresh, gone, fresh6):
        retval, out = net.run(pkt)
        assert (retval, Ether(out).dst) == (XDP_REDIRECT, "02:00:00:00:03:03")
    assert set(net.lab.counters()) == {Reason.FWD_FAST}

    net.lab.clear_counters()
    net.lab.heartbeat(coarse - 1)
    assert net.run(fresh) == (XDP_REDIRECT, via_gateway(fresh))
    assert net.run(fresh6) == (XDP_REDIRECT, via_gateway(fresh6))
    assert net.run(gone) == (XDP_PASS, bytes(gone))
    assert net.lab.counters() == {Reason.FWD_STALE: (2, len(fresh) + len(fresh6)),
                                  Reason.PASS_NO_ROUTE: (1, len(gone))}

    net.lab.clear_counters()
    net.lab.heartbeat(0)  # stale_after = 0: no promise needed
    assert net.run(gone)[0] == XDP_REDIRECT
    assert net.lab.counters() == {Reason.FWD_FAST: (1, len(gone))}


@pytest.mark.parametrize(("promise", "after"), [("fresh_until", Reason.FWD_STALE),
                                                  ("watched_until", Reason.PASS_NO_DAEMON)])
def test_a_promise_runs_out_unwritten(net: FibNet, promise: str, after: Reason) -> None:
    """The program reads the clock once per jiffy and heartbeat (`trust_memo`): a
    promise that nobody rewrites still runs out on time, as the clock passes it. A
    memo kept beyond its tick would go on forwarding by the tables."""
    net.lab.nexthop(1, net.out_ifindex, OUT_MAC, "02:00:00:00:03:03")
    net.lab.route("192.0.2.0/24", 1)
    pkt = v4("192.0.2.9")
    far = time.clock_gettime_ns(6) + 60 * 10**9  # CLOCK_MONOTONIC_COARSE
    deadline = time.clock_gettime_ns(6) + 300 * 10**6
    net.lab.heartbeat(**{"fresh_until": far, "watched_until": far, promise: deadline})
    # runs in the promise's last ticks: the memo holds their answer
    verdicts = {net.run(pkt)[0] for _ in range(50)}
    assert time.clock_gettime_ns(6) < deadline, "the runs came too late to tell"
    assert (verdicts, net.lab.counters()) == ({XDP_REDIRECT},
                                              {Reason.FWD_FAST: (50, 50 * len(pkt))})
    # past the deadline by a few ticks (at HZ 100, 10 ms each), heartbeat unchanged
    time.sleep((deadline - time.clock_gettime_ns(6)) / 1e9 + 0.05)
    net.lab.clear_counters()
    net.run(pkt)
    assert net.lab.counters() == {after: (1, len(pkt))}


def test_no_live_daemon_hands_every_packet_to_the_kernel(net: FibNet) -> None:
    """Past watched_until no daemon follows the kernel: not its tables, and not its
    conditions either (a firewall rule added, a sysctl changed since it stopped are in
    no `ifaces` entry). The program trusts nothing it was given and hands every packet
    to the kernel, untouched, even where its tables are still promised fresh."""
    coarse = time.clock_gettime_ns(6)  # CLOCK_MONOTONIC_COARSE: bpf_ktime_get_coarse_ns
    net.lab.nexthop(1, net.out_ifindex, OUT_MAC, "02:00:00:00:03:03")
    net.lab.route("192.0.2.0/24", 1)
    net.lab.route("2001:db8:99::/48", 1)
    packets = (v4("192.0.2.9"), v6("2001:db8:99::9"))

    net.lab.heartbeat(coarse + 60 * 10**9, coarse + 60 * 10**9)
    assert [net.run(pkt)[0] for pkt in packets] == [XDP_REDIRECT] * 2
    net.lab.clear_counters()
    net.lab.heartbeat(coarse - 1, coarse + 60 * 10**9)  # watched: the kernel's FIB decides
    assert [net.run(pkt)[0] for pkt in packets] == [XDP_REDIRECT] * 2
    assert set(net.lab.counters()) == {Reason.FWD_STALE}

    for fresh_until in (coarse + 60 * 10**9, coarse - 1, 0):
        net.lab.clear_counters()
        net.lab.heartbeat(fresh_until, coarse - 1)
        assert [net.run(pkt) for pkt in packets] == [(XDP_PASS, bytes(pkt)) for pkt in packets]
        assert net.lab.counters() == {
            Reason.PASS_NO_DAEMON: (2, sum(len(pkt) for pkt in packets))}
