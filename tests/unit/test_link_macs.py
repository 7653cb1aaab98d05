"""The interfaces' MACs the `ifaces` entries carry, as the RIB mirrors the links.

The daemon's Fidelity reads them from the RIB once its first sync is in (an
interface list asked of the kernel is a link dump under the RTNL lock), and
rewrites `ifaces` whenever a batch or a resync changed a link: what a user
sees is the program comparing a frame's destination with the MAC the
interface has now (tests/netns/test_datapath.py, the MAC change).
"""

from __future__ import annotations

import struct

import pytest
import structlog

from fibsync.fastpath.guard import FullMapGuard
from fibsync.fastpath.writer import MapWriter, MemoryMaps
from fibsync.model import AF_INET, ARPHRD_ETHER, Change, Link, Neighbour, Op, Snapshot
from fibsync.netlink import rtnl as nl
from fibsync.netlink.decode import decode
from fibsync.rib import Rib
from fibsync.sync import SyncSink

MAC = bytes.fromhex("02aabbccdd01")
ARPHRD_LOOPBACK, ARPHRD_IPGRE, ARPHRD_IEEE80211_RADIOTAP = 772, 778, 803


@pytest.mark.parametrize(("arphrd", "mac", "want"), [
    (ARPHRD_ETHER, MAC, MAC),
    (ARPHRD_ETHER, None, bytes(6)),                   # no IFLA_ADDRESS
    (ARPHRD_LOOPBACK, bytes(6), bytes(6)),
    (ARPHRD_IPGRE, bytes([192, 0, 2, 1]), bytes(6)),  # a tunnel's IPv4 address
    (ARPHRD_IEEE80211_RADIOTAP, MAC, bytes(6)),       # six bytes, but no Ethernet
])
def test_only_an_ethernet_address_is_a_mac(arphrd: int, mac: bytes | None,
                                            want: bytes) -> None:
    assert Link(5, "x0", mac, arphrd=arphrd).ethernet_mac == want


def _attr(atype: int, data: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(data), atype) + data
    return raw + bytes(-len(raw) % 4)


def test_the_link_type_is_decoded() -> None:
    body = struct.pack("=BxHiII", 0, ARPHRD_IPGRE, 9, 0x1, 0) + \
        _attr(nl.IFLA_IFNAME, b"gre1\0") + _attr(nl.IFLA_ADDRESS, bytes([192, 0, 2, 1]))
    msg = struct.pack("=IHHII", 16 + len(body), nl.RTM_NEWLINK, 0, 1, 0) + body
    [(_, _, _, change)] = list(decode(msg))
    assert isinstance(change.obj, Link)
    assert (change.obj.arphrd, change.obj.ethernet_mac) == (ARPHRD_IPGRE, bytes(6))


class Notify:
    def ping(self, force: bool = False) -> None:
        pass


def test_a_batch_or_resync_that_changes_links_is_told() -> None:
    rib = Rib()
    writer = MapWriter(MemoryMaps(), fresh=("routes_v4", "routes_v6", "nexthops", "groups",
                                            "neighbours", "local_v4", "config"))
    told: list[dict[int, bytes]] = []
    sink = SyncSink(rib, FullMapGuard(rib, writer, structlog.get_logger()), Notify(),  # type: ignore[arg-type]
                    on_resync=lambda t0: None, on_links=lambda: told.append(rib.link_macs()))
    lo = Link(1, "lo", bytes(6), flags=0x1, arphrd=ARPHRD_LOOPBACK)
    sink.resync(Snapshot(links=[lo, Link(2, "eth0", MAC, flags=0x1)]))
    assert told == [{1: bytes(6), 2: MAC}]

    other = bytes.fromhex("02aabbccdd02")
    sink.apply([Change(Op.ADD, Link(2, "eth0", other, flags=0x1))])
    assert told[-1] == {1: bytes(6), 2: other}
    sink.apply([Change(Op.ADD, Neighbour(AF_INET, 2, bytes([192, 0, 2, 7]), MAC, 0x2))])
    assert len(told) == 2  # no link in that batch: nothing to tell
    sink.apply([Change(Op.DEL, Link(2, "eth0", other))])
    assert told[-1] == {1: bytes(6)}
