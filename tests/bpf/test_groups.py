"""ECMP groups: one member per flow, all members over many flows, weights by
repetition, and the L3 / L4 hash policies of fs_config."""

from __future__ import annotations

from collections import Counter

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Packet, Raw

from fibsync.fastpath import abi
from fibsync.fastpath.abi import Reason
from tests.bpf.harness import ROUTER, XDP_PASS, XDP_REDIRECT, Lab

pytestmark = pytest.mark.privileged

LO = 1
MEMBER_MAC = {1: "02:00:00:00:0a:01", 2: "02:00:00:00:0a:02"}


@pytest.fixture
def ecmp(lab: Lab) -> Lab:
    lab.tx_port(LO)
    for nh_id, dmac in MEMBER_MAC.items():
        lab.nexthop(nh_id, LO, "02:00:00:00:00:02", dmac)
    lab.group(100, [1, 2])
    lab.route("10.0.0.0/8", 100, group=True)
    lab.route("2001:db8::/32", 100, group=True)
    return lab


def v4(src: str = "192.0.2.1", sport: int = 1000, dport: int = 80, **ip: object) -> Packet:
    return (Ether(dst=ROUTER) / IP(src=src, dst="10.1.1.1", **ip)
            / UDP(sport=sport, dport=dport) / Raw(b"p" * 16))


def v6(src: str = "2001:db8:ff::1", sport: int = 1000, fl: int = 0) -> Packet:
    return (Ether(dst=ROUTER) / IPv6(src=src, dst="2001:db8:1::1", fl=fl)
            / UDP(sport=sport, dport=80) / Raw(b"p" * 16))


def member(lab: Lab, pkt: Packet) -> int:
    retval, out = lab.run(bytes(pkt))
    assert retval == XDP_REDIRECT
    dmac = Ether(out).dst
    return next(nh for nh, mac in MEMBER_MAC.items() if mac == dmac)


def test_one_flow_stays_on_one_member(ecmp: Lab) -> None:
    for pkt in (v4(), v6()):
        assert len({member(ecmp, pkt) for _ in range(20)}) == 1


def test_many_flows_use_every_member(ecmp: Lab) -> None:
    spread = Counter(member(ecmp, v4(src=f"192.0.2.{i}")) for i in range(1, 201))
    assert set(spread) == {1, 2}
    assert min(spread.values()) > 60  # of 200: a fair hash is near 100 each


def test_weights_by_repetition(ecmp: Lab) -> None:
    ecmp.group(100, [1, 1, 1, 2])
    spread = Counter(member(ecmp, v4(src=f"198.51.100.{i}", sport=i)) for i in range(1, 251))
    share = spread[1] / 250
    assert 0.6 < share < 0.9, spread


def test_l3_policy_ignores_ports(ecmp: Lab) -> None:
    ecmp.config(v4=abi.FS_HASH_L3, v6=abi.FS_HASH_L3)
    assert len({member(ecmp, v4(sport=p)) for p in range(1000, 1100)}) == 1
    assert len({member(ecmp, v6(sport=p)) for p in range(1000, 1100)}) == 1


def test_l4_policy_spreads_ports(ecmp: Lab) -> None:
    ecmp.config(v4=abi.FS_HASH_L4, v6=abi.FS_HASH_L4)
    assert {member(ecmp, v4(sport=p)) for p in range(1000, 1100)} == {1, 2}
    assert {member(ecmp, v6(sport=p)) for p in range(1000, 1100)} == {1, 2}


def test_l3_policy_v6_uses_the_flow_label(ecmp: Lab) -> None:
    ecmp.config(v6=abi.FS_HASH_L3)
    assert {member(ecmp, v6(fl=label)) for label in range(1, 101)} == {1, 2}


def test_l4_policy_keeps_fragments_of_a_datagram_together(ecmp: Lab) -> None:
    """Non-first fragments have no ports, so no fragment hashes on them."""
    ecmp.config(v4=abi.FS_HASH_L4)
    chosen = {member(ecmp, v4(sport=p, flags="MF")) for p in range(1000, 1100)}
    chosen |= {member(ecmp, v4(sport=p, frag=100)) for p in range(1000, 1100)}
    assert len(chosen) == 1


def test_empty_group_falls_back_to_the_fib(ecmp: Lab) -> None:
    ecmp.group(100, [])
    retval, _ = ecmp.run(bytes(v4()))
    assert retval == XDP_PASS
    assert set(ecmp.counters()) == {Reason.PASS_FIB_OTHER}


def test_group_member_missing_falls_back_to_the_fib(ecmp: Lab) -> None:
    ecmp.group(100, [77])
    retval, _ = ecmp.run(bytes(v4()))
    assert retval == XDP_PASS
    assert set(ecmp.counters()) == {Reason.PASS_FIB_OTHER}
