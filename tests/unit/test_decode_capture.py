"""Capture the decoder's fixtures from a real kernel (privileged).

The fixtures under tests/unit/fixtures/netlink/ are netlink messages this
kernel sent, one per file, as hex. This test builds the same scenario in a
throwaway namespace and checks that every fixture is still what the kernel
sends (decoded, since sequence numbers and timers differ from run to run).

Regenerate them after changing the scenario:

    FIBSYNC_CAPTURE_FIXTURES=1 .venv/bin/pytest tests/unit/test_decode_capture.py
"""

from __future__ import annotations

import ipaddress
import os
import select
import socket
import struct
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fibsync.model import AF_INET6, Change, Prefix
from fibsync.netlink import rtnl as nl
from fibsync.netlink.decode import decode
from fibsync.netlink.rtnl import open_socket, request
from fibsync.netlink.source import EVENT_GROUPS

FIXTURES = Path(__file__).parent / "fixtures" / "netlink"
AF_BRIDGE = 7

pytestmark = pytest.mark.privileged


def split(buf: bytes) -> list[bytes]:
    out = []
    pos = 0
    while pos + 16 <= len(buf):
        length = struct.unpack_from("=I", buf, pos)[0]
        out.append(buf[pos : pos + length])
        pos += (length + 3) & ~3
    return out


def to_hex(message: bytes, comment: str) -> str:
    lines = [f"# {line}" for line in comment.splitlines()]
    lines += [message[i : i + 16].hex(" ") for i in range(0, len(message), 16)]
    return "\n".join(lines) + "\n"


def recv_all(sock: socket.socket, until_done: bool, timeout: float = 2.0) -> list[bytes]:
    """Messages on ``sock``: up to NLMSG_DONE/ERROR, or until it stays quiet."""
    out: list[bytes] = []
    while True:
        ready, _, _ = select.select([sock], [], [], timeout if until_done else 0.3)
        if not ready:
            if until_done:
                raise TimeoutError("no NLMSG_DONE")
            return out
        for message in split(sock.recv(1 << 20)):
            out.append(message)
            if until_done and struct.unpack_from("=H", message, 4)[0] in (
                nl.NLMSG_DONE,
                nl.NLMSG_ERROR,
            ):
                return out


class Scenario:
    """A namespace plus netlink sockets to dump it and to watch its events."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.captured: dict[str, tuple[bytes, str]] = {}
        subprocess.run(["ip", "netns", "add", name], check=True)
        self.events = open_socket(netns=name, rcvbuf=8 << 20, groups=EVENT_GROUPS)
        self.query = open_socket(netns=name)

    def close(self) -> None:
        self.events.close()
        self.query.close()
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)

    def sh(self, *commands: str) -> None:
        for command in commands:
            subprocess.run(
                ["ip", "netns", "exec", self.name, *command.split()],
                check=True,
                capture_output=True,
            )

    def ask(self, mtype: int, body: bytes, flags: int) -> list[bytes]:
        self.query.send(request(mtype, body, flags))
        if flags & nl.NLM_F_DUMP:
            return recv_all(self.query, until_done=True)
        select.select([self.query], [], [], 2.0)
        return split(self.query.recv(1 << 20))

    def dump(self, mtype: int, body: bytes) -> list[bytes]:
        return self.ask(mtype, body, nl.NLM_F_REQUEST | nl.NLM_F_DUMP)

    def drain_events(self) -> list[bytes]:
        return recv_all(self.events, until_done=False)

    def keep(
        self,
        name: str,
        messages: list[bytes],
        mtype: int,
        match: Callable[[Any], bool],
        how: str,
    ) -> None:
        for message in messages:
            if struct.unpack_from("=H", message, 4)[0] != mtype:
                continue
            [(_, _, _, payload)] = list(decode(message))
            if isinstance(payload, Change) and match(payload.obj):
                self.captured[name] = (message, how)
                return
        raise AssertionError(f"{name}: no matching message among {len(messages)}")


def address_is(text: str) -> Callable[[Any], bool]:
    wanted = ipaddress.ip_address(text).packed
    return lambda obj: getattr(obj, "address", None) == wanted


def id_is(nh_id: int) -> Callable[[Any], bool]:
    return lambda obj: getattr(obj, "id", None) == nh_id


def prefix_is(text: str) -> Callable[[Any], bool]:
    wanted = Prefix.parse(text)
    return lambda obj: getattr(obj, "prefix", None) == wanted


def run_scenario(s: Scenario) -> None:
    rtmsg = {f: struct.pack("=BBBBBBBBI", f, 0, 0, 0, 0, 0, 0, 0, 0) for f in (2, 10)}
    s.sh(
        "ip link set lo up",
        "ip link add name v0 address 02:00:00:00:00:01 type veth"
        " peer name v1 address 02:00:00:00:00:02",
        "ip link set v0 up",
        "ip link set v1 up",
        "ip addr add 192.0.2.1/24 dev v0",
        "ip addr add 2001:db8::1/64 dev v0 nodad",
        "ip addr add 198.51.100.1 peer 198.51.100.2/32 dev v1",
        "ip neigh add 192.0.2.2 lladdr 02:00:00:00:00:02 dev v0 nud permanent",
        "ip -6 neigh add 2001:db8::2 lladdr 02:00:00:00:00:02 dev v0 nud permanent",
        "ip nexthop add id 1001 via 192.0.2.2 dev v0",
        "ip nexthop add id 1002 via 192.0.2.3 dev v0",
        "ip nexthop add id 1003 via 2001:db8::2 dev v0",
        "ip nexthop add id 1004 blackhole",
        "ip nexthop add id 1010 group 1001,1/1002,3",
        "ip nexthop add id 1020 via 192.0.2.9 fdb",
        "ip nexthop add id 1030 encap ip id 5 dst 198.51.100.9 dev v0",
        "ip route add 10.1.0.0/16 via 192.0.2.2 dev v0 metric 20 mtu 1400 table 1000",
        "ip route add 10.2.0.0/16 nexthop via 192.0.2.2 weight 1 nexthop via 192.0.2.3 weight 3",
        "ip route add 10.3.0.0/16 via inet6 2001:db8::2 dev v0",
        "ip route add blackhole 10.4.0.0/16",
        "ip route add unreachable 10.5.0.0/16",
        "ip route add 10.6.0.0/16 nhid 1010",
        "ip route add 10.7.0.0/16 nhid 1001 proto 196 metric 20",
        "ip route add 10.8.0.0/16 tos 0x10 via 192.0.2.2",
        "ip route add 10.9.0.0/16 encap ip id 5 dst 198.51.100.9 dev v0",
        "ip route add 10.10.0.0/16 nexthop encap ip id 5 dst 198.51.100.9 dev v0"
        " nexthop via 192.0.2.2 dev v0",
        "ip -6 route add 2001:db8:100::/48 via 2001:db8::2 dev v0",
        "ip -6 route add 2001:db8:200::/48 nexthop via 2001:db8::2 dev v0 weight 2"
        " nexthop via fe80::2 dev v0 weight 5",
        "ip -6 route add 2001:db8:300::/48 nhid 1003",
    )
    s.drain_events()

    links = s.dump(nl.RTM_GETLINK, bytes(16))
    s.keep("link_veth", links, nl.RTM_NEWLINK, lambda o: o.name == "v0", "RTM_GETLINK dump, v0")
    s.captured["done"] = (links[-1], "the NLMSG_DONE ending the RTM_GETLINK dump")

    addresses = s.dump(nl.RTM_GETADDR, bytes(8))
    s.keep(
        "addr_v4",
        addresses,
        nl.RTM_NEWADDR,
        lambda o: o.address == bytes([192, 0, 2, 1]),
        "RTM_GETADDR dump, ip addr add 192.0.2.1/24 dev v0",
    )
    s.keep(
        "addr_v6",
        addresses,
        nl.RTM_NEWADDR,
        lambda o: o.family == AF_INET6 and o.address[:4] == bytes.fromhex("20010db8"),
        "RTM_GETADDR dump, ip addr add 2001:db8::1/64 dev v0 nodad",
    )
    s.keep(
        "addr_peer",
        addresses,
        nl.RTM_NEWADDR,
        lambda o: o.address == bytes([198, 51, 100, 1]),
        "RTM_GETADDR dump, ip addr add 198.51.100.1 peer 198.51.100.2/32 dev v1"
        " (IFA_LOCAL is ours, IFA_ADDRESS the peer)",
    )

    for family, name, addr in ((2, "neigh_v4", "192.0.2.2"), (10, "neigh_v6", "2001:db8::2")):
        s.keep(
            name,
            s.dump(nl.RTM_GETNEIGH, struct.pack("=BxxxiHBB", family, 0, 0, 0, 0)),
            nl.RTM_NEWNEIGH,
            address_is(addr),
            f"RTM_GETNEIGH dump, ip neigh add {addr} lladdr 02:00:00:00:00:02 dev v0 nud permanent",
        )

    nexthops = s.dump(nl.RTM_GETNEXTHOP, bytes(8))
    for nh_id, name, how in (
        (1001, "nexthop_v4", "ip nexthop add id 1001 via 192.0.2.2 dev v0"),
        (1003, "nexthop_v6", "ip nexthop add id 1003 via 2001:db8::2 dev v0"),
        (1004, "nexthop_blackhole", "ip nexthop add id 1004 blackhole"),
        (1010, "nexthop_group", "ip nexthop add id 1010 group 1001,1/1002,3"),
        (
            1030,
            "nexthop_encap",
            "ip nexthop add id 1030 encap ip id 5 dst 198.51.100.9 dev v0",
        ),
    ):
        s.keep(name, nexthops, nl.RTM_NEWNEXTHOP, id_is(nh_id), f"dump, {how}")
    fdb = [m for m in nexthops if len(m) >= 32 and struct.unpack_from("=HHI", m, 24)[2] == 1020]
    s.captured["nexthop_fdb"] = (
        fdb[0],
        "RTM_GETNEXTHOP dump, ip nexthop add id 1020 via 192.0.2.9 fdb",
    )

    routes = s.dump(nl.RTM_GETROUTE, rtmsg[2]) + s.dump(nl.RTM_GETROUTE, rtmsg[10])
    for name, prefix, how in (
        ("route_v4_table", "10.1.0.0/16", "via 192.0.2.2 dev v0 metric 20 mtu 1400 table 1000"),
        (
            "route_v4_multipath",
            "10.2.0.0/16",
            "nexthop via 192.0.2.2 weight 1 nexthop via 192.0.2.3 weight 3",
        ),
        ("route_v4_via_v6", "10.3.0.0/16", "via inet6 2001:db8::2 dev v0 (RFC 5549)"),
        ("route_blackhole", "10.4.0.0/16", "blackhole 10.4.0.0/16"),
        ("route_unreachable", "10.5.0.0/16", "unreachable 10.5.0.0/16"),
        ("route_v4_nhid_group_compat", "10.6.0.0/16", "nhid 1010, nexthop_compat_mode=1"),
        ("route_v4_tos", "10.8.0.0/16", "tos 0x10 via 192.0.2.2"),
        ("route_v4_encap", "10.9.0.0/16", "encap ip id 5 dst 198.51.100.9 dev v0"),
        (
            "route_v4_multipath_encap",
            "10.10.0.0/16",
            "nexthop encap ip id 5 dst 198.51.100.9 dev v0 nexthop via 192.0.2.2 dev v0",
        ),
        ("route_v6", "2001:db8:100::/48", "via 2001:db8::2 dev v0"),
        (
            "route_v6_multipath",
            "2001:db8:200::/48",
            "nexthop via 2001:db8::2 dev v0 weight 2 nexthop via fe80::2 dev v0 weight 5",
        ),
        ("route_v6_nhid_compat", "2001:db8:300::/48", "nhid 1003, nexthop_compat_mode=1"),
        ("route_v4_default_table_local", "192.0.2.1/32", "the kernel's local route for 192.0.2.1"),
    ):
        s.keep(
            name,
            routes,
            nl.RTM_NEWROUTE,
            prefix_is(prefix),
            f"RTM_GETROUTE dump, ip route add {prefix} {how}",
        )

    s.sh("sysctl -qw net.ipv4.nexthop_compat_mode=0")
    routes = s.dump(nl.RTM_GETROUTE, rtmsg[2]) + s.dump(nl.RTM_GETROUTE, rtmsg[10])
    s.keep(
        "route_v4_nhid",
        routes,
        nl.RTM_NEWROUTE,
        prefix_is("10.7.0.0/16"),
        "RTM_GETROUTE dump, ip route add 10.7.0.0/16 nhid 1001 proto 196 metric 20,"
        " nexthop_compat_mode=0 (RTA_NH_ID only)",
    )
    s.keep(
        "route_v6_nhid",
        routes,
        nl.RTM_NEWROUTE,
        prefix_is("2001:db8:300::/48"),
        "RTM_GETROUTE dump, ip -6 route add 2001:db8:300::/48 nhid 1003, nexthop_compat_mode=0",
    )

    # ip route get: the reply is a cloned route, which the decoder skips
    get = struct.pack("=BBBBBBBBI", 2, 32, 0, 0, 0, 0, 0, 0, 0) + struct.pack(
        "=HH4s", 8, nl.RTA_DST, socket.inet_aton("192.0.2.77")
    )
    s.captured["route_cloned"] = (
        s.ask(nl.RTM_GETROUTE, get, nl.NLM_F_REQUEST)[0],
        "RTM_GETROUTE (ip route get 192.0.2.77): a reply flagged RTM_F_CLONED",
    )
    # deleting what is not there: NLMSG_ERROR with ESRCH
    missing = struct.pack("=BBBBBBBBI", 2, 16, 0, 0, 254, 0, 0, 1, 0) + struct.pack(
        "=HH4s", 8, nl.RTA_DST, socket.inet_aton("10.99.0.0")
    )
    s.captured["error_esrch"] = (
        s.ask(nl.RTM_DELROUTE, missing, nl.NLM_F_REQUEST | nl.NLM_F_ACK)[0],
        "NLMSG_ERROR answering RTM_DELROUTE 10.99.0.0/16 (no such route)",
    )

    # events: deletes, as the kernel multicasts them
    s.drain_events()
    s.sh("ip route del 10.2.0.0/16")
    s.keep(
        "del_route_multipath",
        s.drain_events(),
        nl.RTM_DELROUTE,
        prefix_is("10.2.0.0/16"),
        "event, ip route del 10.2.0.0/16",
    )
    s.sh("ip -6 route append 2001:db8:200::/48 via 2001:db8::3 dev v0")
    s.keep(
        "route_v6_append_event",
        s.drain_events(),
        nl.RTM_NEWROUTE,
        prefix_is("2001:db8:200::/48"),
        "event, ip -6 route append 2001:db8:200::/48 via 2001:db8::3 dev v0"
        " (IPv6 multipath grows by one path)",
    )
    s.sh("ip -6 route del 2001:db8:200::/48 via 2001:db8::3 dev v0")
    s.keep(
        "del_route_v6_one_path",
        s.drain_events(),
        nl.RTM_DELROUTE,
        prefix_is("2001:db8:200::/48"),
        "event, ip -6 route del 2001:db8:200::/48 via 2001:db8::3 dev v0"
        " (one path of an IPv6 multipath route)",
    )
    s.sh("ip route del 10.7.0.0/16")
    s.sh("ip nexthop del id 1001")
    events = s.drain_events()
    s.keep(
        "del_nexthop",
        events,
        nl.RTM_DELNEXTHOP,
        lambda o: o.id == 1001,
        "event, ip nexthop del id 1001 (member of group 1010)",
    )
    s.keep(
        "nexthop_group_shrunk",
        events,
        nl.RTM_NEWNEXTHOP,
        lambda o: o.id == 1010,
        "event, group 1010 after its member 1001 was deleted",
    )
    s.sh("ip neigh del 192.0.2.2 dev v0")
    s.keep(
        "del_neigh",
        s.drain_events(),
        nl.RTM_DELNEIGH,
        lambda o: o.address == bytes([192, 0, 2, 2]),
        "event, ip neigh del 192.0.2.2 dev v0",
    )
    s.sh("ip addr del 192.0.2.1/24 dev v0")
    s.keep(
        "del_addr",
        s.drain_events(),
        nl.RTM_DELADDR,
        lambda o: o.address == bytes([192, 0, 2, 1]),
        "event, ip addr del 192.0.2.1/24 dev v0",
    )

    # bridge port and bridge FDB: AF_BRIDGE messages the decoder skips
    s.sh(
        "ip link add name br0 type bridge",
        "ip link set v1 master br0",
        "bridge fdb add 02:00:00:00:00:99 dev v1 master static",
    )
    s.drain_events()
    s.captured["link_bridge_port"] = (
        s.dump(nl.RTM_GETLINK, struct.pack("=BxHiII", AF_BRIDGE, 0, 0, 0, 0))[0],
        "RTM_GETLINK dump with ifi_family AF_BRIDGE: v1 as a port of br0",
    )
    fdb_neigh = [
        m
        for m in s.dump(nl.RTM_GETNEIGH, struct.pack("=BxxxiHBB", AF_BRIDGE, 0, 0, 0, 0))
        if struct.unpack_from("=H", m, 4)[0] == nl.RTM_NEWNEIGH
    ]
    s.captured["neigh_bridge_fdb"] = (fdb_neigh[0], "RTM_GETNEIGH dump, AF_BRIDGE (bridge fdb)")

    s.sh("ip link del v1")
    s.keep(
        "del_link",
        s.drain_events(),
        nl.RTM_DELLINK,
        lambda o: o.name == "v1",
        "event, ip link del v1 (the peer v0 goes with it)",
    )


@pytest.fixture
def scenario(unique_prefix: str) -> Iterator[Scenario]:
    s = Scenario(f"{unique_prefix}-cap")
    try:
        yield s
    finally:
        s.close()


def load_fixture(path: Path) -> bytes:
    text = "".join(
        line for line in path.read_text().splitlines() if line and not line.startswith("#")
    )
    return bytes.fromhex(text)


def test_fixtures_are_what_this_kernel_sends(scenario: Scenario) -> None:
    run_scenario(scenario)
    if os.environ.get("FIBSYNC_CAPTURE_FIXTURES"):
        FIXTURES.mkdir(parents=True, exist_ok=True)
        for name, (message, how) in scenario.captured.items():
            (FIXTURES / f"{name}.hex").write_text(to_hex(message, how))
    stored = {p.stem for p in FIXTURES.glob("*.hex")}
    assert stored == set(scenario.captured), "fixture set differs from the scenario's"
    for name, (message, _) in scenario.captured.items():
        fresh = [(t, p) for t, _f, _s, p in decode(message)]
        kept = [(t, p) for t, _f, _s, p in decode(load_fixture(FIXTURES / f"{name}.hex"))]
        assert fresh == kept, name
