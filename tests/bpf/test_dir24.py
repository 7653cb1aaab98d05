"""The program's DIR-24-8 path: it reads the table fs_config selects, one
tbl24 read for /24 and shorter, a tbl8 group for longer prefixes, and the
packet leaves with the MACs, TTL and checksum of the route it found."""

from __future__ import annotations

import struct

import pytest
from scapy.layers.l2 import Ether

from fibsync.fastpath import abi, bpfsys
from fibsync.fastpath.abi import Reason
from fibsync.model import Prefix
from tests.bpf.harness import XDP_PASS, XDP_REDIRECT, Lab
from tests.bpf.test_xdp_table import LO, NH_DMAC, NH_SMAC, forwarded, v4

pytestmark = pytest.mark.privileged

MACS = {n: (f"02:00:00:00:{n:02x}:01", f"02:00:00:00:{n:02x}:02") for n in range(1, 8)}


def nexthops(lab: Lab) -> None:
    lab.tx_port(LO)
    for n, (smac, dmac) in MACS.items():
        lab.nexthop(n, LO, smac, dmac)


def egress(lab: Lab, dst: str) -> int | None:
    """Which nexthop the packet left through (by its MACs); None if not redirected."""
    retval, out = lab.run(bytes(v4(dst=dst)))
    if retval != XDP_REDIRECT:
        return None
    eth = Ether(out)
    return next(n for n, (smac, dmac) in MACS.items() if (eth.src, eth.dst) == (smac, dmac))


def test_the_program_reads_the_table_fs_config_selects(lab: Lab) -> None:
    lab.use_v4_table("dir24")
    nexthops(lab)
    # disagreeing tables on purpose: the LPM trie says 1, DIR-24-8 says 2
    p = Prefix.parse("10.0.0.0/8")
    bpfsys.update(lab.fp.map_fd("routes_v4"), bytes(abi.route_key(p)),
                  bytes(abi.FsRoute(1, abi.FS_ACT_FORWARD, 0, 0, 8)))
    assert lab.dir24 is not None
    lab.dir24.add([(10 << 24, 8, bytes(abi.FsRoute(2, abi.FS_ACT_FORWARD, 0, 0, 0)))])
    assert egress(lab, "10.1.2.3") == 2
    lab.v4_table = "lpm"
    lab.config()
    assert egress(lab, "10.1.2.3") == 1


def test_longer_prefixes_through_a_tbl8_group(lab: Lab) -> None:
    lab.use_v4_table("dir24")
    nexthops(lab)
    lab.route("10.1.0.0/16", 1)
    lab.route("10.1.2.0/24", 2)
    lab.route("10.1.2.128/25", 3)
    lab.route("10.1.2.200/30", 4)
    lab.route("10.1.2.201/32", 5)
    assert {dst: egress(lab, dst) for dst in (
        "10.1.9.9", "10.1.2.1", "10.1.2.127", "10.1.2.128", "10.1.2.199", "10.1.2.200",
        "10.1.2.201", "10.1.2.202", "10.1.2.203", "10.1.2.204", "10.1.2.255")} == {
        "10.1.9.9": 1, "10.1.2.1": 2, "10.1.2.127": 2, "10.1.2.128": 3, "10.1.2.199": 3,
        "10.1.2.200": 4, "10.1.2.201": 5, "10.1.2.202": 4, "10.1.2.203": 4,
        "10.1.2.204": 3, "10.1.2.255": 3}
    assert lab.counters() == {Reason.FWD_FAST: (11, 11 * len(v4()))}


def test_a_packet_through_a_group_is_rewritten_like_any_other(lab: Lab) -> None:
    lab.use_v4_table("dir24")
    lab.tx_port(LO)
    lab.nexthop(1, LO, NH_SMAC, NH_DMAC)
    lab.route("10.7.7.7/32", 1)
    for ttl, dst in ((64, "10.7.7.7"), (255, "10.7.7.7"), (2, "10.7.7.7")):
        pkt = v4(dst=dst, ttl=ttl, src="192.0.2.255")
        retval, out = lab.run(bytes(pkt))
        assert retval == XDP_REDIRECT
        assert out.hex() == bytes(forwarded()(pkt)).hex()
    retval, _ = lab.run(bytes(v4(dst="10.7.7.8")))
    assert retval == XDP_PASS  # the rest of the /24 is a miss: bpf_fib_lookup decides


def test_deletes_hand_addresses_to_the_covering_route(lab: Lab) -> None:
    lab.use_v4_table("dir24")
    nexthops(lab)
    lab.route("0.0.0.0/0", 1)
    lab.route("10.0.0.0/8", 2)
    lab.route("10.1.2.0/26", 3)
    assert [egress(lab, d) for d in ("10.1.2.3", "10.9.9.9", "192.0.2.99")] == [3, 2, 1]
    lab.unroute("10.0.0.0/8")
    assert [egress(lab, d) for d in ("10.1.2.3", "10.9.9.9", "192.0.2.99")] == [3, 1, 1]
    lab.unroute("10.1.2.0/26")
    assert [egress(lab, d) for d in ("10.1.2.3", "10.9.9.9")] == [1, 1]
    lab.unroute("0.0.0.0/0")
    assert lab.dir24 is not None and not lab.dir24._t24.any()


def test_blackhole_and_kernel_routes_in_dir24(lab: Lab) -> None:
    lab.use_v4_table("dir24")
    nexthops(lab)
    lab.route("10.0.0.0/8", 1)
    lab.route("10.66.0.0/16", action=abi.FS_ACT_DROP)
    lab.route("10.77.1.1/32", action=abi.FS_ACT_KERNEL, reason=Reason.PASS_LOCAL)
    assert lab.run(bytes(v4(dst="10.66.1.1")))[0] == 1  # XDP_DROP
    assert lab.run(bytes(v4(dst="10.77.1.1")))[0] == XDP_PASS
    assert egress(lab, "10.77.1.2") == 1
    counters = lab.counters()
    assert counters[Reason.DROP_BLACKHOLE][0] == 1 and counters[Reason.PASS_LOCAL][0] == 1


def test_a_nexthop_change_reaches_routes_through_their_copies(lab: Lab) -> None:
    lab.use_v4_table("dir24")
    lab.tx_port(LO)
    lab.nexthop(1, LO, *MACS[1])
    lab.route("10.0.0.0/8", 1)
    assert egress(lab, "10.1.1.1") == 1
    lab.nexthop(1, LO, *MACS[2])  # same nexthop, new MACs
    assert egress(lab, "10.1.1.1") == 2
    # the slot names its own copy: the program no longer needs the hash map entry
    bpfsys.delete(lab.fp.map_fd("nexthops"), struct.pack("=I", 1))
    assert egress(lab, "10.1.1.1") == 2
