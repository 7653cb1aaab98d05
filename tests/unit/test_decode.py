"""fibsync.netlink.decode against messages a real kernel sent (see fixtures/netlink/README.md)."""

from __future__ import annotations

import errno
import ipaddress
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fibsync.errors import DecodeError
from fibsync.model import (
    AF_INET,
    AF_INET6,
    NUD_FAILED,
    NUD_PERMANENT,
    Address,
    Change,
    Link,
    Neighbour,
    Nexthop,
    NexthopObject,
    Op,
    Prefix,
    Route,
    RouteType,
)
from fibsync.netlink import rtnl as nl
from fibsync.netlink.decode import HANDLED_TYPES, decode

FIXTURES = Path(__file__).parent / "fixtures" / "netlink"

RTPROT_KERNEL = 2
RTPROT_BOOT = 3  # what `ip route add` installs with
RTPROT_FRR_STATIC = 196
RT_SCOPE_LINK = 253
RT_SCOPE_HOST = 254
LWTUNNEL_ENCAP_IP = 2
IFF_UP_BROADCAST_RUNNING_MULTICAST_LOWER_UP = 0x1 | 0x2 | 0x40 | 0x1000 | 0x10000
IFF_BROADCAST_MULTICAST = 0x2 | 0x1000

# the scenario's interfaces: veth v1 is created first (as v0's peer)
V1, V0 = 2, 3


def load(name: str) -> bytes:
    text = "".join(
        line
        for line in (FIXTURES / f"{name}.hex").read_text().splitlines()
        if line and not line.startswith("#")
    )
    return bytes.fromhex(text)


def ip(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def nh(gateway: str | None, weight: int = 1, ifindex: int = V0, encap: int = 0) -> Nexthop:
    if gateway is None:
        return Nexthop(ifindex, None, 0, weight, 0, encap)
    family = AF_INET6 if ":" in gateway else AF_INET
    return Nexthop(ifindex, ip(gateway), family, weight, 0, encap)


def route(prefix: str, *nexthops: Nexthop, **fields: object) -> Route:
    fields.setdefault("protocol", RTPROT_BOOT)
    if ":" in prefix:
        fields.setdefault("metric", 1024)
    return Route(Prefix.parse(prefix), nexthops=tuple(nexthops), **fields)  # type: ignore[arg-type]


def only(name: str) -> tuple[int, int, object]:
    [(mtype, flags, _seq, payload)] = list(decode(load(name)))
    return mtype, flags, payload


DUMP = nl.NLM_F_MULTI  # dump replies carry NLM_F_MULTI and nothing else

EXPECTED: dict[str, tuple[int, Change]] = {
    # routes
    "route_v4_table": (
        nl.RTM_NEWROUTE,
        Change(
            Op.ADD,
            route("10.1.0.0/16", nh("192.0.2.2"), table=1000, metric=20, mtu=1400),
            DUMP,
        ),
    ),
    "route_v4_multipath": (
        nl.RTM_NEWROUTE,
        Change(Op.ADD, route("10.2.0.0/16", nh("192.0.2.2", 1), nh("192.0.2.3", 3)), DUMP),
    ),
    "route_v4_via_v6": (
        nl.RTM_NEWROUTE,
        Change(Op.ADD, route("10.3.0.0/16", nh("2001:db8::2")), DUMP),
    ),
    "route_blackhole": (
        nl.RTM_NEWROUTE,
        Change(Op.ADD, route("10.4.0.0/16", type=RouteType.BLACKHOLE), DUMP),
    ),
    "route_unreachable": (
        nl.RTM_NEWROUTE,
        Change(Op.ADD, route("10.5.0.0/16", type=RouteType.UNREACHABLE), DUMP),
    ),
    "route_v4_nhid_group_compat": (
        nl.RTM_NEWROUTE,
        Change(
            Op.ADD,
            # nexthop_compat_mode=1 copies the group's paths in: the object decides, and
            # the route decodes as without them (a re-announcement equals the route held)
            route("10.6.0.0/16", nhid=1010),
            DUMP,
        ),
    ),
    "route_v4_nhid": (
        nl.RTM_NEWROUTE,
        Change(
            Op.ADD, route("10.7.0.0/16", nhid=1001, protocol=RTPROT_FRR_STATIC, metric=20), DUMP
        ),
    ),
    "route_v4_tos": (
        nl.RTM_NEWROUTE,
        Change(Op.ADD, route("10.8.0.0/16", nh("192.0.2.2"), tos=0x10), DUMP),
    ),
    "route_v4_encap": (
        nl.RTM_NEWROUTE,
        Change(
            Op.ADD,
            route("10.9.0.0/16", nh(None, encap=LWTUNNEL_ENCAP_IP), scope=RT_SCOPE_LINK),
            DUMP,
        ),
    ),
    "route_v4_multipath_encap": (
        nl.RTM_NEWROUTE,
        Change(
            Op.ADD,
            route("10.10.0.0/16", nh(None, encap=LWTUNNEL_ENCAP_IP), nh("192.0.2.2")),
            DUMP,
        ),
    ),
    "route_v4_default_table_local": (
        nl.RTM_NEWROUTE,
        Change(
            Op.ADD,
            route(
                "192.0.2.1/32",
                nh(None),
                table=255,
                type=RouteType.LOCAL,
                protocol=RTPROT_KERNEL,
                scope=RT_SCOPE_HOST,
            ),
            DUMP,
        ),
    ),
    "route_v6": (
        nl.RTM_NEWROUTE,
        Change(Op.ADD, route("2001:db8:100::/48", nh("2001:db8::2")), DUMP),
    ),
    "route_v6_multipath": (
        nl.RTM_NEWROUTE,
        Change(
            Op.ADD,
            route("2001:db8:200::/48", nh("2001:db8::2", 2), nh("fe80::2", 5)),
            DUMP,
        ),
    ),
    "route_v6_nhid_compat": (
        nl.RTM_NEWROUTE,
        Change(Op.ADD, route("2001:db8:300::/48", nhid=1003), DUMP),  # as route_v6_nhid
    ),
    "route_v6_nhid": (
        nl.RTM_NEWROUTE,
        Change(Op.ADD, route("2001:db8:300::/48", nhid=1003), DUMP),
    ),
    # the kernel notifies an IPv6 append with the whole route, new path first
    "route_v6_append_event": (
        nl.RTM_NEWROUTE,
        Change(
            Op.ADD,
            route(
                "2001:db8:200::/48",
                nh("2001:db8::3"),
                nh("2001:db8::2", 2),
                nh("fe80::2", 5),
            ),
            nl.NLM_F_CREATE | nl.NLM_F_APPEND,
        ),
    ),
    "del_route_multipath": (
        nl.RTM_DELROUTE,
        Change(Op.DEL, route("10.2.0.0/16", nh("192.0.2.2", 1), nh("192.0.2.3", 3)), 0),
    ),
    # ...but an IPv6 path delete with only the path that went away
    "del_route_v6_one_path": (
        nl.RTM_DELROUTE,
        Change(Op.DEL, route("2001:db8:200::/48", nh("2001:db8::3")), 0),
    ),
    # nexthop objects
    "nexthop_v4": (
        nl.RTM_NEWNEXTHOP,
        Change(Op.ADD, NexthopObject(1001, AF_INET, V0, ip("192.0.2.2")), DUMP),
    ),
    "nexthop_v6": (
        nl.RTM_NEWNEXTHOP,
        Change(Op.ADD, NexthopObject(1003, AF_INET6, V0, ip("2001:db8::2")), DUMP),
    ),
    "nexthop_blackhole": (
        nl.RTM_NEWNEXTHOP,
        Change(Op.ADD, NexthopObject(1004, AF_INET, blackhole=True), DUMP),
    ),
    "nexthop_group": (
        nl.RTM_NEWNEXTHOP,
        Change(Op.ADD, NexthopObject(1010, group=((1001, 1), (1002, 3))), DUMP),
    ),
    "nexthop_encap": (
        nl.RTM_NEWNEXTHOP,
        Change(Op.ADD, NexthopObject(1030, AF_INET, V0, encap=LWTUNNEL_ENCAP_IP), DUMP),
    ),
    # nexthop notifications carry the request's flags (here REQUEST|ACK from ip)
    "del_nexthop": (
        nl.RTM_DELNEXTHOP,
        Change(
            Op.DEL,
            NexthopObject(1001, AF_INET, V0, ip("192.0.2.2")),
            nl.NLM_F_REQUEST | nl.NLM_F_ACK,
        ),
    ),
    "nexthop_group_shrunk": (
        nl.RTM_NEWNEXTHOP,
        Change(Op.ADD, NexthopObject(1010, group=((1002, 3),)), nl.NLM_F_REQUEST | nl.NLM_F_ACK),
    ),
    # neighbours
    "neigh_v4": (
        nl.RTM_NEWNEIGH,
        Change(
            Op.ADD,
            Neighbour(AF_INET, V0, ip("192.0.2.2"), mac("02:00:00:00:00:02"), NUD_PERMANENT),
            DUMP,
        ),
    ),
    "neigh_v6": (
        nl.RTM_NEWNEIGH,
        Change(
            Op.ADD,
            Neighbour(AF_INET6, V0, ip("2001:db8::2"), mac("02:00:00:00:00:02"), NUD_PERMANENT),
            DUMP,
        ),
    ),
    "del_neigh": (
        nl.RTM_DELNEIGH,
        Change(Op.DEL, Neighbour(AF_INET, V0, ip("192.0.2.2"), None, NUD_FAILED), 0),
    ),
    # links
    "link_veth": (
        nl.RTM_NEWLINK,
        Change(
            Op.ADD,
            Link(
                V0,
                "v0",
                mac("02:00:00:00:00:01"),
                1500,
                IFF_UP_BROADCAST_RUNNING_MULTICAST_LOWER_UP,
                "veth",
                V1,
            ),
            DUMP,
        ),
    ),
    "del_link": (
        nl.RTM_DELLINK,
        Change(
            Op.DEL,
            Link(V1, "v1", mac("02:00:00:00:00:02"), 1500, IFF_BROADCAST_MULTICAST, "veth"),
            0,
        ),
    ),
    # addresses
    "addr_v4": (nl.RTM_NEWADDR, Change(Op.ADD, Address(AF_INET, V0, ip("192.0.2.1"), 24), DUMP)),
    "addr_v6": (
        nl.RTM_NEWADDR,
        Change(Op.ADD, Address(AF_INET6, V0, ip("2001:db8::1"), 64), DUMP),
    ),
    "addr_peer": (
        nl.RTM_NEWADDR,
        Change(Op.ADD, Address(AF_INET, V1, ip("198.51.100.1"), 32), DUMP),
    ),
    "del_addr": (nl.RTM_DELADDR, Change(Op.DEL, Address(AF_INET, V0, ip("192.0.2.1"), 24), 0)),
}

# deliberately skipped: decoded to None, but of a handled type
SKIPPED = {
    "route_cloned": nl.RTM_NEWROUTE,  # `ip route get` answer, RTM_F_CLONED
    "nexthop_fdb": nl.RTM_NEWNEXTHOP,  # NHA_FDB
    "neigh_bridge_fdb": nl.RTM_NEWNEIGH,  # AF_BRIDGE
    "link_bridge_port": nl.RTM_NEWLINK,  # AF_BRIDGE port info, not a new link
}

CONTROL = {
    "done": (nl.NLMSG_DONE, nl.NLM_F_MULTI, 0),
    "error_esrch": (nl.NLMSG_ERROR, 0, errno.ESRCH),
}

ALL_FIXTURES = sorted(p.stem for p in FIXTURES.glob("*.hex"))


def test_every_fixture_has_an_expectation() -> None:
    assert set(ALL_FIXTURES) == set(EXPECTED) | set(SKIPPED) | set(CONTROL)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixture_decodes_to_exact_model_object(name: str) -> None:
    mtype, change = EXPECTED[name]
    assert only(name) == (mtype, change.nlflags, change)


@pytest.mark.parametrize("name", sorted(SKIPPED))
def test_skipped_fixture_is_a_handled_type_with_no_payload(name: str) -> None:
    mtype, _flags, payload = only(name)
    assert mtype == SKIPPED[name]
    assert mtype in HANDLED_TYPES
    assert payload is None


@pytest.mark.parametrize("name", sorted(CONTROL))
def test_control_messages_carry_their_errno(name: str) -> None:
    assert only(name) == CONTROL[name]


def test_link_state_reads_as_the_model_says() -> None:
    link_up = EXPECTED["link_veth"][1].obj
    link_down = EXPECTED["del_link"][1].obj
    assert isinstance(link_up, Link) and link_up.up
    assert isinstance(link_down, Link) and not link_down.up


def test_a_buffer_of_many_messages_decodes_in_order() -> None:
    names = ALL_FIXTURES
    buf = b"".join(load(name) for name in names)
    got = [mtype for mtype, _f, _s, _p in decode(buf)]
    assert got == [only(name)[0] for name in names]


@pytest.mark.parametrize("kind", [bytearray, memoryview])
def test_accepts_bytearray_and_memoryview(kind: type) -> None:
    buf = load("route_v4_multipath") + load("nexthop_group")
    assert list(decode(kind(buf))) == list(decode(buf))


def test_empty_buffer_yields_nothing() -> None:
    assert list(decode(b"")) == []


def test_unknown_message_type_is_yielded_without_payload() -> None:
    rtm_newrule = 32
    body = bytes(12)
    msg = struct.pack("=IHHII", 16 + len(body), rtm_newrule, 0, 7, 0) + body
    assert next(decode(msg + load("route_v6"))) == (rtm_newrule, 0, 7, None)
    assert rtm_newrule not in HANDLED_TYPES


def test_unknown_route_family_is_skipped() -> None:
    rtnl_family_ipmr = 128
    msg = bytearray(load("route_v4_tos"))
    msg[16] = rtnl_family_ipmr
    [(_, _, _, payload)] = list(decode(bytes(msg)))
    assert payload is None


def _attr(atype: int, data: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(data), atype) + data
    return raw + bytes(-len(raw) % 4)


def _message(mtype: int, header: bytes, *attrs: bytes) -> bytes:
    body = header + b"".join(attrs)
    return struct.pack("=IHHII", 16 + len(body), mtype, 0, 1, 0) + body


def test_vlan_link_id_from_linkinfo() -> None:
    # built here: this kernel has no 8021q, so no VLAN link could be captured
    ifinfo = struct.pack("=BxHiII", 0, 1, 7, 0x1 | 0x10000, 0)
    msg = _message(
        nl.RTM_NEWLINK,
        ifinfo,
        _attr(nl.IFLA_IFNAME, b"v0.100\0"),
        _attr(nl.IFLA_MTU, struct.pack("=I", 1500)),
        _attr(nl.IFLA_LINK, struct.pack("=I", 3)),
        _attr(
            nl.IFLA_LINKINFO | 0x8000,  # NLA_F_NESTED, as newer iproute2 sends it
            _attr(nl.IFLA_INFO_KIND, b"vlan\0")
            + _attr(nl.IFLA_INFO_DATA, _attr(nl.IFLA_VLAN_ID, struct.pack("=H", 100))),
        ),
    )
    [(_, _, _, change)] = list(decode(msg))
    assert change == Change(Op.ADD, Link(7, "v0.100", None, 1500, 0x10001, "vlan", 3, 100), 0)


def test_info_data_of_other_kinds_is_not_read_as_vlan() -> None:
    ifinfo = struct.pack("=BxHiII", 0, 1, 8, 0, 0)
    msg = _message(
        nl.RTM_NEWLINK,
        ifinfo,
        _attr(
            nl.IFLA_LINKINFO,
            _attr(nl.IFLA_INFO_KIND, b"vxlan\0")
            + _attr(nl.IFLA_INFO_DATA, _attr(1, struct.pack("=I", 42))),
        ),
    )
    [(_, _, _, change)] = list(decode(msg))
    assert isinstance(change, Change) and isinstance(change.obj, Link)
    assert (change.obj.kind, change.obj.vlan_id) == ("vxlan", 0)


def test_proxy_neighbour_is_skipped() -> None:
    ntf_proxy = 0x08
    ndmsg = struct.pack("=BxxxiHBB", AF_INET, 3, 0, ntf_proxy, 1)
    msg = _message(nl.RTM_NEWNEIGH, ndmsg, _attr(nl.NDA_DST, ip("192.0.2.50")))
    [(_, _, _, payload)] = list(decode(msg))
    assert payload is None


def test_sixteen_bit_group_weight() -> None:
    # weight_high (kernel 6.12+): member weights above 256
    nhmsg = struct.pack("=BBBBI", 0, 0, 0, 0, 0)
    group = struct.pack("=IBBH", 1001, 0xFF, 0x03, 0) + struct.pack("=IBBH", 1002, 0, 0, 0)
    msg = _message(
        nl.RTM_NEWNEXTHOP,
        nhmsg,
        _attr(nl.NHA_ID, struct.pack("=I", 77)),
        _attr(nl.NHA_GROUP, group),
    )
    [(_, _, _, change)] = list(decode(msg))
    assert isinstance(change, Change)
    assert change.obj == NexthopObject(77, group=((1001, 0x3FF + 1), (1002, 1)))


# malformed input


def test_truncated_header_is_a_decode_error() -> None:
    with pytest.raises(DecodeError):
        list(decode(load("route_v6")[:10]))


def test_length_beyond_the_buffer_is_a_decode_error() -> None:
    with pytest.raises(DecodeError):
        list(decode(load("route_v6")[:-4]))


@pytest.mark.parametrize(
    "name", ["route_v4_multipath", "route_v6_multipath", "nexthop_group", "link_veth", "addr_v6"]
)
def test_shortened_messages_raise_nothing_but_decode_error(name: str) -> None:
    # shrink nlmsg_len one byte at a time: the message ends inside a struct
    # or an attribute, and the decoder must notice
    full = load(name)
    for cut in range(16, len(full)):
        _drain(struct.pack("=I", cut) + full[4:cut])


def test_bad_attribute_length_is_a_decode_error() -> None:
    msg = bytearray(load("route_v4_tos"))
    struct.pack_into("=H", msg, 28, 2)  # first attribute claims 2 bytes
    with pytest.raises(DecodeError):
        list(decode(bytes(msg)))


def test_wrong_address_size_is_a_decode_error() -> None:
    rtmsg = struct.pack("=BBBBBBBBI", AF_INET, 24, 0, 0, 254, 3, 0, 1, 0)
    msg = _message(nl.RTM_NEWROUTE, rtmsg, _attr(nl.RTA_DST, ip("2001:db8::")))
    with pytest.raises(DecodeError, match="RTA_DST"):
        list(decode(msg))


def test_prefix_longer_than_the_family_is_a_decode_error() -> None:
    rtmsg = struct.pack("=BBBBBBBBI", AF_INET, 33, 0, 0, 254, 3, 0, 1, 0)
    with pytest.raises(DecodeError):
        list(decode(_message(nl.RTM_NEWROUTE, rtmsg)))


def test_on_error_skips_only_the_bad_message() -> None:
    bad = bytearray(load("route_v4_tos"))
    struct.pack_into("=H", bad, 28, 2)
    buf = load("route_v6") + bytes(bad) + load("nexthop_v4")
    errors: list[DecodeError] = []
    got = [payload for _t, _f, _s, payload in decode(buf, errors.append)]
    assert got == [EXPECTED["route_v6"][1], EXPECTED["nexthop_v4"][1]]
    assert len(errors) == 1


def test_on_error_does_not_hide_broken_framing() -> None:
    with pytest.raises(DecodeError):
        list(decode(load("route_v6") + b"\xff" * 8, lambda exc: None))


# fuzzing: whatever the bytes, DecodeError is the only exception

REAL = [load(name) for name in ALL_FIXTURES]


def _drain(buf: bytes) -> None:
    try:
        for _ in decode(buf):
            pass
    except DecodeError as exc:
        # decode() turns a stray struct.error/IndexError into DecodeError as a
        # last line of defence; the explicit checks should make it unnecessary
        assert exc.__cause__ is None, f"only the safety net caught {exc.__cause__!r}"


@settings(max_examples=2000, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_fuzz_random_bytes(buf: bytes) -> None:
    _drain(buf)


@settings(max_examples=3000, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(REAL),
    st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), min_size=1, max_size=8),
    st.integers(0, 4096),
)
def test_fuzz_mutated_real_messages(msg: bytes, flips: list[tuple[int, int]], cut: int) -> None:
    buf = bytearray(msg)
    for offset, value in flips:
        buf[offset % len(buf)] = value
    _drain(bytes(buf[: max(cut, 1)]) if cut < len(buf) else bytes(buf))


@settings(max_examples=1000, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(REAL),
    st.lists(st.tuples(st.integers(16, 4095), st.integers(0, 0xFFFF)), min_size=1, max_size=4),
)
def test_fuzz_real_messages_with_forged_lengths(msg: bytes, forged: list[tuple[int, int]]) -> None:
    # aim at the 16-bit length fields of attributes and rtnexthops
    buf = bytearray(msg)
    for offset, value in forged:
        offset = (offset % max(len(buf) - 1, 1)) & ~1
        struct.pack_into("=H", buf, offset, value)
    _drain(bytes(buf))


@settings(max_examples=4000, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(REAL), st.integers(4, 4095), st.integers(0, 24), st.booleans())
def test_fuzz_short_field_at_the_end(msg: bytes, slot: int, value: int, cut: bool) -> None:
    # Every attribute and rtnexthop length is a u16 at a 4-aligned offset. Make
    # one claim a tiny length and, optionally, end the message right there, so
    # that a missing size check would read past the end of the buffer.
    offset = 16 + 4 * (slot % max((len(msg) - 16) // 4, 1))
    buf = bytearray(msg)
    struct.pack_into("=H", buf, offset, value)
    if cut:
        end = min(offset + max(value, 4), len(buf))
        buf = buf[:end]
        struct.pack_into("=I", buf, 0, end)
    _drain(bytes(buf))
