"""The XDP program on one packet at a time: a table of {description, packet,
map contents, expected action and reason, expected output bytes}, run once
with IPv4 routes read from the LPM trie and once from the DIR-24-8 table.

Runs happen in a bare namespace (forwarding off), so every bpf_fib_lookup
fallback here answers FWD_DISABLED; test_fib_lookup.py covers real lookups.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrHopByHop
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.packet import Packet, Raw

from fibsync.fastpath import abi
from fibsync.fastpath.abi import Reason
from tests.bpf.harness import (
    ACTION_NAMES,
    ROUTER,
    XDP_DROP,
    XDP_PASS,
    XDP_REDIRECT,
    Lab,
    inside,
    sh,
)

pytestmark = pytest.mark.privileged

CLIENT = "02:00:00:00:00:aa"
NH_SMAC = "02:00:00:00:01:01"
NH_DMAC = "02:00:00:00:01:02"
NEIGH_MAC = "02:00:00:00:02:02"
LO = 1  # egress: the namespace's lo, the one device every namespace has


def v4(dst: str = "10.1.2.3", src: str = "192.0.2.1", ttl: int = 64, **ip: object) -> Packet:
    return (Ether(src=CLIENT, dst=ROUTER) / IP(src=src, dst=dst, ttl=ttl, **ip)
            / UDP(sport=1234, dport=53) / Raw(b"x" * 32))


def v6(dst: str = "2001:db8:1::3", src: str = "2001:db8:ff::1", hlim: int = 64) -> Packet:
    return (Ether(src=CLIENT, dst=ROUTER) / IPv6(src=src, dst=dst, hlim=hlim)
            / UDP(sport=1234, dport=53) / Raw(b"x" * 32))


def forwarded(smac: str = NH_SMAC, dmac: str = NH_DMAC) -> Callable[[Packet], Packet]:
    """The expected output: MACs rewritten, TTL/hop limit down by one,
    IPv4 checksum recomputed from scratch (scapy), everything else equal."""

    def expect(pkt: Packet) -> Packet:
        out = Ether(bytes(pkt))
        out.src, out.dst = smac, dmac
        if IP in out:
            out[IP].ttl -= 1
            del out[IP].chksum
        else:
            out[IPv6].hlim -= 1
        return Ether(bytes(out))

    return expect


def basic(lab: Lab) -> None:
    """One resolved nexthop on lo; 10/8 and 2001:db8::/32 use it."""
    lab.tx_port(LO)
    lab.nexthop(1, LO, NH_SMAC, NH_DMAC)
    lab.route("10.0.0.0/8", 1)
    lab.route("2001:db8::/32", 1)


def with_routes(*routes: tuple[str, dict[str, object]]) -> Callable[[Lab], None]:
    def setup(lab: Lab) -> None:
        basic(lab)
        for prefix, kw in routes:
            lab.route(prefix, **kw)  # type: ignore[arg-type]

    return setup


def then(*steps: Callable[[Lab], None]) -> Callable[[Lab], None]:
    def setup(lab: Lab) -> None:
        for step in steps:
            step(lab)

    return setup


@dataclass
class Case:
    description: str
    packet: Packet
    setup: Callable[[Lab], None]
    action: int
    reason: Reason
    output: Callable[[Packet], Packet] | None = None  # None: the frame comes back untouched
    ingress: int = 0  # where the frame arrives (0: the harness's fsin0)


def _ipv4_options() -> Packet:
    pkt = v4()
    pkt[IP].options = b"\x94\x04\x00\x00"  # router alert
    return pkt


def _truncated_ipv4() -> bytes:
    return bytes(v4())[:14 + 12]


def _ipv4_total_length_beyond_frame() -> Packet:
    return v4(len=200)


def _ipv6_payload_beyond_frame() -> Packet:
    pkt = v6()
    pkt[IPv6].plen = 500
    return pkt


def _broadcast_frame() -> Packet:
    pkt = v4()
    pkt[Ether].dst = "ff:ff:ff:ff:ff:ff"
    return pkt


def _ipv4_fragment() -> Packet:
    return v4(flags="MF", frag=0)


CASES = [
    Case("v4 hit: MACs, TTL and checksum rewritten, redirected",
         v4(), basic, XDP_REDIRECT, Reason.FWD_FAST, forwarded()),
    Case("v6 LPM hit: MACs and hop limit rewritten, redirected",
         v6(), basic, XDP_REDIRECT, Reason.FWD_FAST, forwarded()),
    Case("longest prefix wins",
         v4(dst="10.9.9.9"),
         then(basic, lambda lab: lab.nexthop(2, LO, "02:00:00:00:09:01", "02:00:00:00:09:02"),
              lambda lab: lab.route("10.9.0.0/16", 2)),
         XDP_REDIRECT, Reason.FWD_FAST, forwarded("02:00:00:00:09:01", "02:00:00:00:09:02")),
    Case("TTL 2 is forwarded with TTL 1", v4(ttl=2), basic, XDP_REDIRECT, Reason.FWD_FAST,
         forwarded()),
    Case("TTL 1 goes to the kernel (time exceeded)", v4(ttl=1), basic, XDP_PASS,
         Reason.PASS_TTL),
    Case("TTL 0 goes to the kernel", v4(ttl=0), basic, XDP_PASS, Reason.PASS_TTL),
    Case("TTL 255 checksum carry", v4(ttl=255, dst="10.255.255.255", src="192.0.2.255"),
         basic, XDP_REDIRECT, Reason.FWD_FAST, forwarded()),
    Case("hop limit 1 goes to the kernel", v6(hlim=1), basic, XDP_PASS, Reason.PASS_TTL),
    Case("hop limit 2 is forwarded", v6(hlim=2), basic, XDP_REDIRECT, Reason.FWD_FAST,
         forwarded()),
    Case("blackhole route drops", v4(dst="10.66.0.1"),
         with_routes(("10.66.0.0/16", {"action": abi.FS_ACT_DROP})),
         XDP_DROP, Reason.DROP_BLACKHOLE),
    Case("v6 blackhole route drops", v6(dst="2001:db8:66::1"),
         with_routes(("2001:db8:66::/48", {"action": abi.FS_ACT_DROP})),
         XDP_DROP, Reason.DROP_BLACKHOLE),
    Case("local route passes with its reason", v4(dst="10.0.0.1"),
         with_routes(("10.0.0.1/32", {"action": abi.FS_ACT_KERNEL,
                                      "reason": Reason.PASS_LOCAL})),
         XDP_PASS, Reason.PASS_LOCAL),
    Case("unreachable route passes with its reason", v4(dst="10.77.0.1"),
         with_routes(("10.77.0.0/16", {"action": abi.FS_ACT_KERNEL,
                                       "reason": Reason.PASS_UNREACHABLE})),
         XDP_PASS, Reason.PASS_UNREACHABLE),
    Case("kernel route with an unknown reason is counted as such", v4(dst="10.78.0.1"),
         with_routes(("10.78.0.0/16", {"action": abi.FS_ACT_KERNEL, "reason": 200})),
         XDP_PASS, Reason.PASS_KERNEL_ROUTE),
    Case("IPv4 options go to the kernel", _ipv4_options(), basic, XDP_PASS,
         Reason.PASS_IP_OPTIONS),
    Case("IPv6 hop-by-hop header goes to the kernel",
         Ether(src=CLIENT, dst=ROUTER) / IPv6(src="2001:db8:ff::1", dst="2001:db8:1::3")
         / IPv6ExtHdrHopByHop() / UDP(), basic, XDP_PASS, Reason.PASS_IP_OPTIONS),
    Case("a fragment is forwarded (L3 fields only feed the hash)", _ipv4_fragment(), basic,
         XDP_REDIRECT, Reason.FWD_FAST, forwarded()),
    Case("a fragment goes to the kernel when configured so", _ipv4_fragment(),
         then(basic, lambda lab: lab.config(flags=abi.FS_CFG_PASS_FRAGMENTS)),
         XDP_PASS, Reason.PASS_FRAGMENT),
    Case("larger than the nexthop MTU goes to the kernel", v4(dst="10.5.0.1") / Raw(b"y" * 1000),
         then(basic, lambda lab: lab.nexthop(5, LO, NH_SMAC, NH_DMAC, mtu=1000),
              lambda lab: lab.route("10.5.0.0/16", 5)),
         XDP_PASS, Reason.PASS_MTU),
    Case("exactly the nexthop MTU is forwarded",
         v4(dst="10.5.0.1") / Raw(b"y" * (1000 - 20 - 8 - 32)),
         then(basic, lambda lab: lab.nexthop(5, LO, NH_SMAC, NH_DMAC, mtu=1000),
              lambda lab: lab.route("10.5.0.0/16", 5)),
         XDP_REDIRECT, Reason.FWD_FAST, forwarded()),
    Case("v6 larger than the nexthop MTU goes to the kernel (PTB)",
         v6(dst="2001:db8:5::1") / Raw(b"y" * 1400),
         then(basic, lambda lab: lab.nexthop(5, LO, NH_SMAC, NH_DMAC, mtu=1280),
              lambda lab: lab.route("2001:db8:5::/48", 5)),
         XDP_PASS, Reason.PASS_MTU),
    Case("VLAN-tagged IPv4 goes to the kernel",
         Ether(src=CLIENT, dst=ROUTER) / Dot1Q(vlan=10) / IP(src="192.0.2.1", dst="10.1.2.3")
         / UDP(), basic, XDP_PASS, Reason.PASS_VLAN),
    Case("double-tagged (QinQ) frame goes to the kernel",
         Ether(src=CLIENT, dst=ROUTER, type=0x88A8) / Dot1Q(vlan=100) / Dot1Q(vlan=10)
         / IP(src="192.0.2.1", dst="10.1.2.3") / UDP(), basic, XDP_PASS, Reason.PASS_VLAN),
    Case("VLAN-tagged ARP is not IP",
         Ether(src=CLIENT, dst="ff:ff:ff:ff:ff:ff") / Dot1Q(vlan=10) / ARP(pdst="10.1.2.3"),
         basic, XDP_PASS, Reason.PASS_NOT_IP),
    Case("ARP is not IP", Ether(src=CLIENT, dst="ff:ff:ff:ff:ff:ff") / ARP(pdst="10.1.2.3"),
         basic, XDP_PASS, Reason.PASS_NOT_IP),
    Case("IPv4 multicast destination", v4(dst="239.1.2.3"), basic, XDP_PASS,
         Reason.PASS_MULTICAST),
    Case("IPv4 limited broadcast", v4(dst="255.255.255.255"), basic, XDP_PASS,
         Reason.PASS_MULTICAST),
    Case("link-layer broadcast frame", _broadcast_frame(), basic,
         XDP_PASS, Reason.PASS_MULTICAST),
    Case("IPv6 multicast destination", v6(dst="ff02::1"), basic, XDP_PASS,
         Reason.PASS_MULTICAST),
    Case("IPv6 link-local destination", v6(dst="fe80::1"), basic, XDP_PASS, Reason.PASS_LOCAL),
    Case("IPv6 link-local source", v6(src="fe80::1"), basic, XDP_PASS, Reason.PASS_LOCAL),
    Case("martian IPv4 source", v4(src="127.0.0.1"), basic, XDP_PASS, Reason.PASS_MALFORMED),
    Case("limited-broadcast IPv4 source", v4(src="255.255.255.255"), basic, XDP_PASS,
         Reason.PASS_MALFORMED),
    Case("multicast IPv4 source", v4(src="224.0.0.5"), basic, XDP_PASS, Reason.PASS_MALFORMED),
    Case("IPv4 destination in 0/8", v4(dst="0.1.2.3"), basic, XDP_PASS, Reason.PASS_MALFORMED),
    Case("IPv6 loopback destination", v6(dst="::1"), basic, XDP_PASS, Reason.PASS_MALFORMED),
    Case("IPv6 v4-mapped source", v6(src="::ffff:192.0.2.1"), basic, XDP_PASS,
         Reason.PASS_MALFORMED),
    Case("IPv6 multicast source", v6(src="ff02::1"), basic, XDP_PASS, Reason.PASS_MALFORMED),
    Case("IPv4 total length beyond the frame", _ipv4_total_length_beyond_frame(), basic,
         XDP_PASS, Reason.PASS_MALFORMED),
    Case("IPv6 payload length beyond the frame", _ipv6_payload_beyond_frame(), basic,
         XDP_PASS, Reason.PASS_MALFORMED),
    Case("egress not in tx_ports: untouched, to the kernel", v4(dst="10.8.0.1"),
         then(basic, lambda lab: lab.nexthop(8, 4242, NH_SMAC, NH_DMAC),
              lambda lab: lab.route("10.8.0.0/16", 8)),
         XDP_PASS, Reason.PASS_EGRESS),
    Case("unresolved gateway: bpf_fib_lookup decides (no kernel route here)",
         v4(dst="10.3.0.1"),
         then(basic, lambda lab: lab.nexthop(3, LO, NH_SMAC, None, gateway="192.0.2.254"),
              lambda lab: lab.route("10.3.0.0/16", 3)),
         XDP_PASS, Reason.PASS_FIB_OTHER),
    Case("unresolved v6 gateway: bpf_fib_lookup decides", v6(dst="2001:db8:3::1"),
         then(basic, lambda lab: lab.nexthop(3, LO, NH_SMAC, None, gateway="fe80::1"),
              lambda lab: lab.route("2001:db8:3::/48", 3)),
         XDP_PASS, Reason.PASS_FIB_OTHER),
    Case("connected nexthop: the packet's destination from neighbours", v4(dst="10.4.0.9"),
         then(basic, lambda lab: lab.nexthop(4, LO, NH_SMAC, None, connected=True),
              lambda lab: lab.route("10.4.0.0/24", 4),
              lambda lab: lab.neighbour(LO, "10.4.0.9", NEIGH_MAC)),
         XDP_REDIRECT, Reason.FWD_FAST, forwarded(NH_SMAC, NEIGH_MAC)),
    Case("connected v6 nexthop with a neighbour", v6(dst="2001:db8:4::9"),
         then(basic, lambda lab: lab.nexthop(4, LO, NH_SMAC, None, connected=True),
              lambda lab: lab.route("2001:db8:4::/64", 4),
              lambda lab: lab.neighbour(LO, "2001:db8:4::9", NEIGH_MAC)),
         XDP_REDIRECT, Reason.FWD_FAST, forwarded(NH_SMAC, NEIGH_MAC)),
    Case("connected nexthop without neighbour: bpf_fib_lookup decides",
         v4(dst="10.4.0.10"),
         then(basic, lambda lab: lab.nexthop(4, LO, NH_SMAC, None, connected=True),
              lambda lab: lab.route("10.4.0.0/24", 4)),
         XDP_PASS, Reason.PASS_FIB_OTHER),
    Case("route to a nexthop not (yet) stored falls back to the FIB", v4(dst="10.6.0.1"),
         with_routes(("10.6.0.0/16", {"nh": 999})), XDP_PASS, Reason.PASS_FIB_OTHER),
    Case("route with action FIB asks bpf_fib_lookup", v4(dst="10.7.0.1"),
         with_routes(("10.7.0.0/16", {"action": abi.FS_ACT_FIB})), XDP_PASS,
         Reason.PASS_FIB_OTHER),
    Case("LPM miss asks bpf_fib_lookup", v4(dst="172.16.0.1"), basic, XDP_PASS,
         Reason.PASS_FIB_OTHER),
    Case("group of one forwards to its member", v4(dst="10.20.0.1"),
         then(basic, lambda lab: lab.group(20, [1]),
              lambda lab: lab.route("10.20.0.0/16", 20, group=True)),
         XDP_REDIRECT, Reason.FWD_FAST, forwarded()),
    Case("group without buckets (the kernel picks its path) asks bpf_fib_lookup",
         v4(dst="10.22.0.1"),
         then(basic, lambda lab: lab.group(22, []),
              lambda lab: lab.route("10.22.0.0/16", 22, group=True)),
         XDP_PASS, Reason.PASS_FIB_OTHER),
    Case("missing group falls back to the FIB", v4(dst="10.21.0.1"),
         with_routes(("10.21.0.0/16", {"nh": 21, "group": True})), XDP_PASS,
         Reason.PASS_FIB_OTHER),
    Case("TCP over IPv4 is forwarded",
         Ether(src=CLIENT, dst=ROUTER) / IP(src="192.0.2.1", dst="10.1.2.3") / TCP(),
         basic, XDP_REDIRECT, Reason.FWD_FAST, forwarded()),
]


@pytest.mark.parametrize("case", CASES, ids=[c.description for c in CASES])
@pytest.mark.parametrize("tables", [("lpm", "lpm"), ("dir24", "hash")], ids=["lpm", "dir24+hash"])
def test_packet(lab: Lab, case: Case, tables: tuple[str, str]) -> None:
    lab.use_v4_table(tables[0])
    lab.use_v6_table(tables[1])
    case.setup(lab)
    frame = bytes(case.packet)
    retval, out = lab.run(frame)

    assert ACTION_NAMES[retval] == ACTION_NAMES[case.action]
    expected = bytes(case.output(case.packet)) if case.output else frame
    assert out.hex() == expected.hex()
    assert lab.counters() == {case.reason: (1, len(frame))}


@pytest.mark.privileged
def test_truncated_ipv4_header(lab: Lab) -> None:
    basic(lab)
    frame = _truncated_ipv4()
    retval, out = lab.run(frame)
    assert (retval, out) == (XDP_PASS, frame)
    assert lab.counters() == {Reason.PASS_MALFORMED: (1, len(frame))}


def repeatable(lab: Lab) -> None:
    """basic(), the next hop's MAC the router's own: a repeated run (BPF_PROG_TEST_RUN
    reuses the rewritten frame) meets a frame still addressed to the router."""
    basic(lab)
    lab.nexthop(1, LO, NH_SMAC, ROUTER)


def test_counters_accumulate_per_reason_with_bytes(lab: Lab) -> None:
    repeatable(lab)
    fwd, ttl, arp = bytes(v4(ttl=255)), bytes(v6(hlim=1)), bytes(
        Ether(src=CLIENT, dst="ff:ff:ff:ff:ff:ff") / ARP())
    lab.run(fwd, repeat=100)
    lab.run(ttl, repeat=7)
    lab.run(arp, repeat=3)
    assert lab.counters() == {
        Reason.FWD_FAST: (100, 100 * len(fwd)),
        Reason.PASS_TTL: (7, 7 * len(ttl)),
        Reason.PASS_NOT_IP: (3, 3 * len(arp)),
    }


def test_repeat_decrements_ttl_until_the_kernel_takes_over(lab: Lab) -> None:
    repeatable(lab)
    retval, out = lab.run(bytes(v4(ttl=5)), repeat=10)
    assert retval == XDP_PASS
    assert Ether(out)[IP].ttl == 1
    assert lab.counters()[Reason.FWD_FAST][0] == 4
    assert lab.counters()[Reason.PASS_TTL][0] == 6


@pytest.mark.parametrize("ifindex", [abi.FS_TX_DIRECT - 1, abi.FS_TX_DIRECT,
                                     abi.FS_MAX_IFACES - 1])
def test_any_ifindex_is_a_redirect_target(lab: Lab, ifindex: int) -> None:
    """Below FS_TX_DIRECT the program redirects through tx_direct (an array), from there
    on through tx_ports (a hash): both forward, and both refuse a port not allowed."""
    sh("ip", "-n", lab.ns, "link", "add", "name", "big0", "index", str(ifindex), "type",
       "veth", "peer", "name", "big1")
    try:
        sh("ip", "-n", lab.ns, "link", "set", "big0", "up")
        sh("ip", "-n", lab.ns, "link", "set", "big1", "up")
        assert lab.ifindex("big0") == ifindex
        lab.nexthop(1, ifindex, NH_SMAC, NH_DMAC)
        lab.route("10.0.0.0/8", 1)
        frame = bytes(v4())
        assert lab.run(frame)[0] == XDP_PASS  # not allowed yet
        lab.tx_port(ifindex)
        retval, out = lab.run(frame)
        assert retval == XDP_REDIRECT and out == bytes(forwarded()(v4()))
        lab.fp.forbid_port(ifindex)
        assert lab.run(frame)[0] == XDP_PASS
        assert lab.counters() == {Reason.PASS_EGRESS: (2, 2 * len(frame)),
                                  Reason.FWD_FAST: (1, len(frame))}
    finally:
        sh("ip", "-n", lab.ns, "link", "del", "big0")


def test_a_port_whose_interface_is_gone_is_written_nowhere_and_raises_nothing(
        lab: Lab) -> None:
    """A devmap takes only a device that exists (EINVAL otherwise), and an interface can
    go between the daemon's look and its write: a link deleted under a storm while the
    daemon re-attaches it, or released from an egress condition once deleted. Such a
    port is no redirect target and nothing to fail on (it stopped the daemon, exit 1:
    "update: Invalid argument")."""
    sh("ip", "-n", lab.ns, "link", "add", "name", "gone0", "type", "veth", "peer", "name",
       "gone1")
    ifindex = lab.ifindex("gone0")
    sh("ip", "-n", lab.ns, "link", "del", "gone0")
    with inside(lab.ns):
        lab.fp.hold_ports({ifindex})
        lab.fp.allow_port(ifindex)  # held: nothing written yet
        lab.fp.hold_ports(())  # released: now it would be
        lab.fp.allow_port(ifindex)
        assert ifindex not in lab.fp.ports()
        lab.fp.forbid_port(ifindex)


def test_an_interface_beyond_the_conditions_map_is_left_to_the_kernel(lab: Lab) -> None:
    """`ifaces` has FS_MAX_IFACES entries: past it the program cannot know an
    interface's conditions (qdisc, tc, netfilter), so fibsync never makes it a
    redirect target, and the program says why it did not redirect."""
    ifindex = abi.FS_MAX_IFACES + 4464
    sh("ip", "-n", lab.ns, "link", "add", "name", "big0", "index", str(ifindex), "type",
       "veth", "peer", "name", "big1")
    try:
        sh("ip", "-n", lab.ns, "link", "set", "big0", "up")
        lab.nexthop(1, ifindex, NH_SMAC, NH_DMAC)
        lab.route("10.0.0.0/8", 1)
        lab.tx_port(ifindex)
        frame = bytes(v4())
        assert lab.run(frame)[0] == XDP_PASS
        assert lab.counters() == {Reason.PASS_IFACE_UNKNOWN: (1, len(frame))}
    finally:
        sh("ip", "-n", lab.ns, "link", "del", "big0")
