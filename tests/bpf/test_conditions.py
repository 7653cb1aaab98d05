"""The XDP program against each kernel condition of issue 12, as `ifaces` states it
(fibsync/fidelity.py writes the entries; tests/unit/test_fidelity.py checks that
part, the watchers' tests the detection, tests/netns/test_fidelity*.py the whole).

One table of {condition, packet, entries, expected action and reason}: the
program hands a packet to the kernel under the condition's own reason, or does
exactly what the kernel would. VRF is tested here and in the watcher's unit
test only: this kernel has no vrf module, so the decision is shown with a
synthesised condition and BPF_PROG_TEST_RUN.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.l2 import Ether

from fibsync.fastpath import abi
from fibsync.fastpath.abi import Reason
from tests.bpf.harness import INGRESS, ROUTER, XDP_PASS, XDP_REDIRECT, Lab
from tests.bpf.test_fib_lookup import IN_MAC, FibNet, fib_ns, net  # noqa: F401 - fixtures
from tests.bpf.test_xdp_table import (
    CLIENT,
    LO,
    NH_DMAC,
    NH_SMAC,
    Case,
    basic,
    forwarded,
    v4,
    v6,
)

pytestmark = pytest.mark.privileged


def iface(lab: Lab, ifindex: int, pass_v4: int = 0, pass_v6: int = 0, flags: int = 0,
          egress: int = 0) -> None:
    lab.iface(ifindex, ROUTER, pass_v4=pass_v4, pass_v6=pass_v6, flags=flags, egress=egress)


@pytest.fixture
def cond_lab(lab: Lab) -> Iterator[Lab]:
    yield lab
    for ifindex in (LO, INGRESS):
        iface(lab, ifindex)


def with_iface(ifindex: int = INGRESS, **kw: int) -> Callable[[Lab], None]:
    def setup(lab: Lab) -> None:
        basic(lab)
        lab.route("192.0.2.0/24", 1)  # the clients' sources have a route (via lo)
        lab.route("2001:db8:ff::/48", 1)
        iface(lab, ifindex, **kw)
    return setup


def and_then(first: Callable[[Lab], None], step: Callable[[Lab], None]) -> Callable[[Lab], None]:
    def setup(lab: Lab) -> None:
        first(lab)
        step(lab)
    return setup


CASES = [
    Case("no condition: forwarded", v4(), with_iface(), XDP_REDIRECT, Reason.FWD_FAST),
    Case("IPv4 forwarding off on the ingress", v4(),
         with_iface(pass_v4=Reason.PASS_FORWARDING_OFF), XDP_PASS, Reason.PASS_FORWARDING_OFF),
    Case("... leaves IPv6 alone", v6(),
         with_iface(pass_v4=Reason.PASS_FORWARDING_OFF), XDP_REDIRECT, Reason.FWD_FAST),
    Case("IPv6 netfilter", v6(), with_iface(pass_v6=Reason.PASS_NETFILTER), XDP_PASS,
         Reason.PASS_NETFILTER),
    Case("VRF slave: both families to the kernel (v4)", v4(),
         with_iface(pass_v4=Reason.PASS_VRF, pass_v6=Reason.PASS_VRF), XDP_PASS,
         Reason.PASS_VRF),
    Case("VRF slave: both families to the kernel (v6)", v6(),
         with_iface(pass_v4=Reason.PASS_VRF, pass_v6=Reason.PASS_VRF), XDP_PASS,
         Reason.PASS_VRF),
    Case("IPsec policy", v4(), with_iface(pass_v4=Reason.PASS_XFRM), XDP_PASS,
         Reason.PASS_XFRM),
    Case("tc ingress", v4(), with_iface(pass_v4=Reason.PASS_TC_INGRESS), XDP_PASS,
         Reason.PASS_TC_INGRESS),
    Case("rules the fast path cannot evaluate", v4(), with_iface(pass_v4=Reason.PASS_RULES),
         XDP_PASS, Reason.PASS_RULES),
    Case("veth peer offloading checksums: UDP to the kernel", v4(),
         with_iface(flags=abi.FS_IF_CHECKSUM), XDP_PASS, Reason.PASS_CHECKSUM),
    Case("... ICMP still forwarded",
         Ether(src=CLIENT, dst=ROUTER) / IP(src="192.0.2.1", dst="10.1.2.3") / ICMP(),
         with_iface(flags=abi.FS_IF_CHECKSUM), XDP_REDIRECT, Reason.FWD_FAST),
    Case("a source that is an address of this host is a martian", v4(src="192.0.2.9"),
         and_then(with_iface(), lambda lab: lab.route(
             "192.0.2.9/32", action=abi.FS_ACT_KERNEL, reason=Reason.PASS_LOCAL)),
         XDP_PASS, Reason.PASS_MARTIAN_SOURCE),
    Case("... another source of the same /24 (the same `local_v4` bit) is forwarded",
         v4(src="192.0.2.10"),
         and_then(with_iface(), lambda lab: lab.route(
             "192.0.2.9/32", action=abi.FS_ACT_KERNEL, reason=Reason.PASS_LOCAL)),
         XDP_REDIRECT, Reason.FWD_FAST),
    Case("a source under a local prefix (AnyIP) is a martian", v4(src="198.51.100.7"),
         and_then(with_iface(), lambda lab: (lab.route("198.51.0.0/16", 1), lab.route(
             "198.51.0.0/16", action=abi.FS_ACT_KERNEL, reason=Reason.PASS_LOCAL))),
         XDP_PASS, Reason.PASS_MARTIAN_SOURCE),
    Case("an address of this host no longer: its source is forwarded again", v4(src="192.0.2.9"),
         and_then(with_iface(), lambda lab: (lab.route(
             "192.0.2.9/32", action=abi.FS_ACT_KERNEL, reason=Reason.PASS_LOCAL),
             lab.unroute("192.0.2.9/32"))),
         XDP_REDIRECT, Reason.FWD_FAST),
    Case("loose rp_filter: a source with a route passes", v4(),
         with_iface(flags=abi.FS_IF_RPF_LOOSE), XDP_REDIRECT, Reason.FWD_FAST),
    Case("loose rp_filter: a source without a route goes to the kernel",
         v4(src="198.51.100.7"), with_iface(flags=abi.FS_IF_RPF_LOOSE), XDP_PASS,
         Reason.PASS_RP_FILTER),
    Case("loose rp_filter: a source under a blackhole goes to the kernel",
         v4(src="198.51.100.7"),
         and_then(with_iface(flags=abi.FS_IF_RPF_LOOSE),
                  lambda lab: lab.route("198.51.100.0/24", action=abi.FS_ACT_DROP)),
         XDP_PASS, Reason.PASS_RP_FILTER),
    Case("strict rp_filter: the source's route leaves by another interface",
         v4(), with_iface(flags=abi.FS_IF_RPF_STRICT), XDP_PASS, Reason.PASS_RP_FILTER),
    Case("strict rp_filter: the source's route leaves by the ingress", v4(src="198.51.100.7"),
         and_then(with_iface(flags=abi.FS_IF_RPF_STRICT), lambda lab: (
             lab.nexthop(7, INGRESS, NH_SMAC, NH_DMAC), lab.route("198.51.100.0/24", 7))),
         XDP_REDIRECT, Reason.FWD_FAST),
    Case("strict rp_filter: an ECMP source route is left to the kernel",
         v4(src="198.51.100.7"),
         and_then(with_iface(flags=abi.FS_IF_RPF_STRICT), lambda lab: (
             lab.nexthop(7, INGRESS, NH_SMAC, NH_DMAC), lab.group(70, [7, 1]),
             lab.route("198.51.100.0/24", 70, group=True))),
         XDP_PASS, Reason.PASS_RP_FILTER),
    Case("an egress with its own qdisc", v4(), with_iface(LO, egress=Reason.PASS_EGRESS_QDISC),
         XDP_PASS, Reason.PASS_EGRESS_QDISC),
    Case("... and once the qdisc is gone, the port is a redirect target again", v4(),
         and_then(with_iface(LO, egress=Reason.PASS_EGRESS_QDISC), lambda lab: iface(lab, LO)),
         XDP_REDIRECT, Reason.FWD_FAST),
    Case("a hairpin (out of the ingress) goes to the kernel, which may send a redirect",
         v4(), and_then(with_iface(), lambda lab: iface(lab, LO)), XDP_PASS,
         Reason.PASS_HAIRPIN, ingress=LO),
    # what ip_rcv_core() and ip6_forward() drop before routing
    Case("a unicast frame to another MAC (PACKET_OTHERHOST)",
         Ether(src=CLIENT, dst="02:00:00:00:00:99") / IP(src="192.0.2.1", dst="10.1.2.3")
         / UDP(), with_iface(), XDP_PASS, Reason.PASS_OTHERHOST),
    Case("an interface whose MAC the daemon never wrote forwards nothing", v4(),
         and_then(with_iface(), lambda lab: lab.iface(INGRESS)), XDP_PASS,
         Reason.PASS_OTHERHOST),
    Case("an IPv4 header with a wrong checksum", v4(chksum=0x1234), with_iface(), XDP_PASS,
         Reason.PASS_MALFORMED),
    Case("IPv6 from the unspecified address", v6(src="::"), with_iface(), XDP_PASS,
         Reason.PASS_MALFORMED),
]


@pytest.mark.parametrize("table", ["lpm", "dir24"])
@pytest.mark.parametrize("case", CASES, ids=[c.description for c in CASES])
def test_condition(cond_lab: Lab, table: str, case: Case) -> None:
    lab = cond_lab
    lab.use_v4_table(table)
    case.setup(lab)
    retval, _ = lab.run(bytes(case.packet), ingress=case.ingress)
    assert (retval, list(lab.counters())) == (case.action, [case.reason])


def test_policy_rules_forward_by_bpf_fib_lookup_and_check_the_source(net: FibNet) -> None:  # noqa: F811
    """Under policy rules (FS_IF_RULES_V4) our own tables are not used: the packet
    goes by bpf_fib_lookup, which applies the rules (FWD_RULES), once its source
    has a unicast route by the same lookup; a source without one goes to the kernel."""
    lab = net.lab
    lab.nexthop(1, LO, NH_SMAC, NH_DMAC)
    lab.route("192.0.2.0/24", 1)  # our table would send it to lo: it must not be asked
    try:
        lab.iface(net.in_ifindex, IN_MAC, flags=abi.FS_IF_RULES_V4)
        pkt = (Ether(src=CLIENT, dst=IN_MAC) / IP(src="10.1.0.2", dst="192.0.2.7")
               / UDP(sport=1, dport=2))
        assert net.run(pkt)[0] == XDP_REDIRECT
        assert lab.counters() == {Reason.FWD_RULES: (1, len(bytes(pkt)))}
        lab.clear_counters()
        unrouted = pkt.copy()
        unrouted[IP].src = "100.64.0.1"  # no route back to it
        assert net.run(unrouted)[0] == XDP_PASS
        assert list(lab.counters()) == [Reason.PASS_RP_FILTER]
    finally:
        lab.iface(net.in_ifindex, IN_MAC)


@pytest.mark.parametrize("family", ["v4", "v6"])
def test_bytes_after_the_ip_packet_are_trimmed_as_the_kernel_does(cond_lab: Lab,
                                                                  family: str) -> None:
    """pskb_trim_rcsum(): the kernel forwards the IP packet without what follows it in
    the frame (Ethernet padding, junk); so does the fast path."""
    lab = cond_lab
    with_iface()(lab)
    pkt = v4() if family == "v4" else v6()
    frame = bytes(pkt) + b"\xee" * 23
    retval, out = lab.run(frame)
    assert retval == XDP_REDIRECT
    assert out == bytes(forwarded()(pkt))
