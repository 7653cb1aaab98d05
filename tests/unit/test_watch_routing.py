"""RoutingWatch's state and conditions, from synthesised netlink messages.

The messages are built the way the kernel fills them (fib_nl_fill_rule,
inet_netconf_fill_devconf / inet6_netconf_fill_devconf, rtnl_fill_ifinfo),
so no root is needed. VRFs are tested only here: this kernel has no vrf
module, so a VRF and its ports exist only as synthesised RTM_NEWLINK messages.
"""

from __future__ import annotations

import ipaddress
import struct

import pytest

from fibsync.model import AF_INET, AF_INET6
from fibsync.netlink import rtnl as nl
from fibsync.watch import Condition
from fibsync.watch.routing import (
    LinkState,
    RoutingState,
    RoutingWatch,
    decode_link,
    decode_netconf,
)
from fibsync.watch.rules import decode_rule, format_rule, judge

LO, ETH0, ETH1, BARE, VRF, BR = 1, 2, 3, 4, 10, 11
NAMES = {LO: "lo", ETH0: "eth0", ETH1: "eth1", BARE: "bare0", VRF: "blue", BR: "br0"}
ALL, DEFAULT = -1, -2


def u32(value: int) -> bytes:
    return struct.pack("=I", value & 0xFFFFFFFF)


def s32(value: int) -> bytes:
    return struct.pack("=i", value)


def msg(mtype: int, payload: bytes, *, seq: int = 0, pid: int = 0, flags: int = 0) -> bytes:
    """A whole netlink message, as a receive buffer holds it."""
    raw = nl.NLMSGHDR.pack(nl.NLMSGHDR.size + len(payload), mtype, flags, seq, pid) + payload
    return raw + bytes(-len(raw) % 4)


def rule(family: int, pref: int, table: int = 100, *, src: str | None = None,
         dst: str | None = None, action: int = nl.FR_ACT_TO_TBL, flags: int = 0,
         suppress: int = -1, extra: tuple[tuple[int, bytes], ...] = ()) -> bytes:
    """An RTM_NEWRULE/DELRULE body in fib_nl_fill_rule's order."""
    src_net = ipaddress.ip_network(src) if src else None
    dst_net = ipaddress.ip_network(dst) if dst else None
    hdr = nl.FIB_RULE_HDR.pack(family, dst_net.prefixlen if dst_net else 0,
                               src_net.prefixlen if src_net else 0, 0,
                               table if table < 256 else 252, 0, 0, action, flags)
    body = nl.attr(nl.FRA_TABLE, u32(table)) + nl.attr(nl.FRA_SUPPRESS_PREFIXLEN, u32(suppress))
    body += nl.attr(nl.FRA_PROTOCOL, bytes([nl.RTPROT_KERNEL]))
    if pref:
        body += nl.attr(nl.FRA_PRIORITY, u32(pref))
    for kind, value in extra:
        body += nl.attr(kind, value)
    if dst_net:
        body += nl.attr(nl.FRA_DST, dst_net.network_address.packed)
    if src_net:
        body += nl.attr(nl.FRA_SRC, src_net.network_address.packed)
    return hdr + body


def netconf(family: int, ifindex: int, **values: int) -> bytes:
    """An RTM_NEWNETCONF body; values by NETCONFA_* name in lower case."""
    body = nl.NETCONFMSG.pack(family) + nl.attr(nl.NETCONFA_IFINDEX, s32(ifindex))
    for name, value in values.items():
        body += nl.attr(getattr(nl, f"NETCONFA_{name.upper()}"), s32(value))
    return body


def link(ifindex: int, *, master: int = 0, kind: str = "", slave_kind: str = "",
         force_forwarding: int | None = None, family: int = nl.AF_UNSPEC) -> bytes:
    """An RTM_NEWLINK body with what rtnl_fill_ifinfo puts there that the watch reads."""
    body = nl.IFINFOMSG.pack(family, 0, ifindex, nl.IFF_UP, 0)
    body += nl.attr(nl.IFLA_IFNAME, NAMES[ifindex].encode() + b"\0")
    if master:
        body += nl.attr(nl.IFLA_MASTER, u32(master))
    info = b""
    if kind:
        info += nl.attr(nl.IFLA_INFO_KIND, kind.encode() + b"\0")
    if slave_kind:
        info += nl.attr(nl.IFLA_INFO_SLAVE_KIND, slave_kind.encode() + b"\0")
    if info:
        body += nl.attr(nl.IFLA_LINKINFO | nl.NLA_F_NESTED, info)
    if force_forwarding is not None:
        conf = [0] * 60
        conf[nl.DEVCONF_FORCE_FORWARDING] = force_forwarding
        inet6 = nl.attr(nl.IFLA_INET6_CONF, struct.pack("=60i", *conf))
        body += nl.attr(nl.IFLA_AF_SPEC, nl.attr(AF_INET6, inet6))
    return body


def addr(ifindex: int, address: str, prefixlen: int) -> bytes:
    packed = ipaddress.ip_address(address).packed
    return nl.IFADDRMSG.pack(AF_INET, prefixlen, 0, 0, ifindex) + nl.attr(nl.IFA_LOCAL, packed)


DEFAULT_RULES_V4 = [rule(AF_INET, 0, 255), rule(AF_INET, 32766, 254), rule(AF_INET, 32767, 253)]
DEFAULT_RULES_V6 = [rule(AF_INET6, 0, 255), rule(AF_INET6, 32766, 254)]


def baseline() -> list[tuple[int, bytes]]:
    """A router as a fresh namespace with forwarding on: default rules, rp_filter 0,
    eth0 and eth1 with addresses, bare0 without one, lo."""
    out = [(nl.RTM_NEWRULE, r) for r in DEFAULT_RULES_V4 + DEFAULT_RULES_V6]
    for ifindex in (LO, ETH0, ETH1, BARE):
        out.append((nl.RTM_NEWLINK, link(ifindex, force_forwarding=0)))
        out.append((nl.RTM_NEWNETCONF, netconf(AF_INET, ifindex, forwarding=1, rp_filter=0)))
        out.append((nl.RTM_NEWNETCONF, netconf(AF_INET6, ifindex, forwarding=1)))
    for ifindex in (ALL, DEFAULT):
        out.append((nl.RTM_NEWNETCONF, netconf(AF_INET, ifindex, forwarding=1, rp_filter=0)))
        out.append((nl.RTM_NEWNETCONF, netconf(AF_INET6, ifindex, forwarding=1)))
    out += [(nl.RTM_NEWADDR, addr(ifindex, address, 24))
            for ifindex, address in ((LO, "127.0.0.1"), (ETH0, "10.0.0.1"), (ETH1, "10.0.1.1"))]
    return out


def new_link(ifindex: int, **kw: object) -> list[tuple[int, bytes]]:
    """A link that appears, and the IPv4 configuration the kernel gives it."""
    return [(nl.RTM_NEWNETCONF, netconf(AF_INET, ifindex, forwarding=1, rp_filter=0)),
            (nl.RTM_NEWLINK, link(ifindex, **kw))]  # type: ignore[arg-type]


def state_after(*messages: tuple[int, bytes]) -> RoutingState:
    state = RoutingState()
    for mtype, payload in [*baseline(), *messages]:
        state.apply(mtype, payload)
    return state


def held(state: RoutingState) -> set[tuple[str, int, int]]:
    return {(c.kind, c.family, c.ifindex) for c in state.conditions()}


NEW, DEL = nl.RTM_NEWRULE, nl.RTM_DELRULE
NC, LINK, ADDR, DELADDR = nl.RTM_NEWNETCONF, nl.RTM_NEWLINK, nl.RTM_NEWADDR, nl.RTM_DELADDR
FWMARK = ((nl.FRA_FWMARK, u32(1)), (nl.FRA_FWMASK, u32(0xFFFFFFFF)))

CASES = [
    ("default rule sets", [], set()),
    ("from prefix lookup table", [(NEW, rule(AF_INET, 32765, 100, src="192.0.2.0/24"))],
     {("rules_lookup", AF_INET, 0)}),
    ("to prefix, dscp, suppress_prefixlength", [
        (NEW, rule(AF_INET, 100, 254, dst="198.51.100.0/24", extra=(
            (nl.FRA_DSCP, b"\x2e"), (nl.FRA_DSCP_MASK, b"\x3f")))),
        (NEW, rule(AF_INET, 200, 254, suppress=0)),
    ], {("rules_lookup", AF_INET, 0)}),
    ("fwmark", [(NEW, rule(AF_INET, 32765, 100, extra=FWMARK))], {("rules_kernel", AF_INET, 0)}),
    ("fwmark beats an earlier plain rule", [
        (NEW, rule(AF_INET, 100, 100, src="192.0.2.0/24")),
        (NEW, rule(AF_INET, 200, 100, extra=FWMARK))], {("rules_kernel", AF_INET, 0)}),
    ("iif", [(NEW, rule(AF_INET, 32765, 100, extra=((nl.FRA_IIFNAME, b"eth0\0"),)))],
     {("rules_kernel", AF_INET, 0)}),
    ("uid range", [(NEW, rule(AF_INET, 5, 100, extra=((nl.FRA_UID_RANGE, u32(0) + u32(9)),)))],
     {("rules_kernel", AF_INET, 0)}),
    ("l3mdev", [(NEW, rule(AF_INET, 1000, 0, extra=((nl.FRA_L3MDEV, b"\x01"),)))],
     {("rules_kernel", AF_INET, 0)}),
    ("blackhole action", [(NEW, rule(AF_INET, 5, 0, src="192.0.2.0/24",
                                     action=nl.FR_ACT_BLACKHOLE))], {("rules_kernel", AF_INET, 0)}),
    ("goto", [(NEW, rule(AF_INET, 5, 0, action=nl.FR_ACT_GOTO,
                         extra=((nl.FRA_GOTO, u32(32766)),)))], {("rules_kernel", AF_INET, 0)}),
    ("an attribute from a newer kernel", [(NEW, rule(AF_INET, 5, 100, extra=((99, u32(1)),)))],
     {("rules_kernel", AF_INET, 0)}),
    ("ipv6 rule", [(NEW, rule(AF_INET6, 32765, 100, src="2001:db8::/32"))],
     {("rules_lookup", AF_INET6, 0)}),
    ("ipv6 flowlabel", [(NEW, rule(AF_INET6, 9, 100, extra=(
        (nl.FRA_FLOWLABEL, b"\0\0\0\1"), (nl.FRA_FLOWLABEL_MASK, b"\0\x0f\xff\xff"))))],
     {("rules_kernel", AF_INET6, 0)}),
    ("deleted back to the defaults", [
        (NEW, rule(AF_INET, 32765, 100, src="192.0.2.0/24")),
        (NEW, rule(AF_INET, 32764, 100, extra=FWMARK)),
        (DEL, rule(AF_INET, 32765, 100, src="192.0.2.0/24")),
        (DEL, rule(AF_INET, 32764, 100, extra=FWMARK))], set()),
    ("main's rule deleted", [(DEL, rule(AF_INET, 32766, 254))], {("rules_lookup", AF_INET, 0)}),
    ("local's rule moved", [(NEW, rule(AF_INET6, 1000, 255)), (DEL, rule(AF_INET6, 0, 255))],
     {("rules_lookup", AF_INET6, 0)}),
    ("multicast (ipmr) rules are not unicast forwarding", [(NEW, rule(128, 5, 100, extra=FWMARK))],
     set()),
    # forwarding
    ("ipv4 forwarding off on one interface", [(NC, netconf(AF_INET, ETH1, forwarding=0))],
     {("forwarding", AF_INET, ETH1)}),
    ("ipv4 all.forwarding alone does not count", [(NC, netconf(AF_INET, ALL, forwarding=0))],
     set()),
    ("ipv6 all.forwarding off", [(NC, netconf(AF_INET6, ALL, forwarding=0))],
     {("forwarding", AF_INET6, 0)}),
    ("ipv6 per-interface forwarding alone does not count",
     [(NC, netconf(AF_INET6, ETH0, forwarding=0))], set()),
    ("ipv6 force_forwarding on eth0", [
        (NC, netconf(AF_INET6, ALL, forwarding=0)), (LINK, link(ETH0, force_forwarding=1))],
     {("forwarding", AF_INET6, i) for i in (LO, ETH1, BARE)}),
    ("an interface without IPv4 configuration", [(LINK, link(BR))], {("forwarding", AF_INET, BR)}),
    # rp_filter
    ("rp_filter strict on one interface", [(NC, netconf(AF_INET, ETH0, rp_filter=1))],
     {("rp_filter_strict", AF_INET, ETH0)}),
    ("rp_filter all=1: every interface, max(all, if)", [
        (NC, netconf(AF_INET, ALL, rp_filter=1)), (NC, netconf(AF_INET, ETH1, rp_filter=2))],
     {("rp_filter_strict", AF_INET, LO), ("rp_filter_strict", AF_INET, ETH0),
      ("rp_filter_loose", AF_INET, ETH1), ("rp_filter_kernel", AF_INET, BARE)}),
    ("rp_filter all=2 over if=1 is loose", [
        (NC, netconf(AF_INET, ALL, rp_filter=2)), (NC, netconf(AF_INET, ETH0, rp_filter=1))],
     {("rp_filter_loose", AF_INET, i) for i in (LO, ETH0, ETH1)}
     | {("rp_filter_kernel", AF_INET, BARE)}),
    ("rp_filter on an interface without an IPv4 address",
     [(NC, netconf(AF_INET, BARE, rp_filter=2))], {("rp_filter_kernel", AF_INET, BARE)}),
    ("rp_filter on an interface whose address went",
     [(NC, netconf(AF_INET, ETH1, rp_filter=1)), (DELADDR, addr(ETH1, "10.0.1.1", 24))],
     {("rp_filter_kernel", AF_INET, ETH1)}),
    ("rp_filter default alone does not count", [(NC, netconf(AF_INET, DEFAULT, rp_filter=1))],
     set()),
    # VRF
    ("vrf port by its master's kind", [*new_link(VRF, kind="vrf"), (LINK, link(ETH1, master=VRF))],
     {("vrf", 0, ETH1)}),
    ("vrf port by its slave kind", [(LINK, link(ETH1, master=VRF, slave_kind="vrf"))],
     {("vrf", 0, ETH1)}),
    ("bridge under a vrf: the bridge and its port", [
        *new_link(VRF, kind="vrf"), *new_link(BR, kind="bridge", master=VRF),
        (LINK, link(ETH0, master=BR, slave_kind="bridge"))],
     {("vrf", 0, BR), ("vrf", 0, ETH0)}),
    ("a bridge port is not a vrf port", [
        *new_link(BR, kind="bridge"), (LINK, link(ETH0, master=BR, slave_kind="bridge")),
        (LINK, link(ETH0, master=BR, family=7))], set()),
    ("vrf port released", [
        *new_link(VRF, kind="vrf"), (LINK, link(ETH1, master=VRF)), (LINK, link(ETH1))], set()),
]


@pytest.mark.parametrize("messages, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_conditions(messages: list[tuple[int, bytes]], expected: set[tuple[str, int, int]]) -> None:
    assert held(state_after(*messages)) == expected


def test_details_name_the_rule_and_the_sysctls() -> None:
    state = state_after(
        (NEW, rule(AF_INET, 32765, 100, src="192.0.2.0/24")),
        (NEW, rule(AF_INET, 32764, 100, extra=FWMARK)),
        (NEW, rule(AF_INET6, 32765, 100, src="2001:db8::/32")),
        (NC, netconf(AF_INET, ALL, rp_filter=1)), (NC, netconf(AF_INET, ETH1, rp_filter=2)),
        (NC, netconf(AF_INET, ETH0, forwarding=0)))
    details = {(c.kind, c.family, c.ifindex): c.detail for c in state.conditions()}
    assert details[("rules_kernel", AF_INET, 0)] == "32764: from all fwmark 0x1 lookup 100"
    assert details[("rules_lookup", AF_INET6, 0)] == "32765: from 2001:db8::/32 lookup 100"
    assert details[("forwarding", AF_INET, ETH0)] == "net.ipv4.conf.eth0.forwarding is 0"
    assert details[("rp_filter_loose", AF_INET, ETH1)] == (
        "rp_filter 2 (max of net.ipv4.conf.all.rp_filter=1 and net.ipv4.conf.eth1.rp_filter=2)")
    assert "bare0, which has no IPv4 address" in details[("rp_filter_kernel", AF_INET, BARE)]


@pytest.mark.parametrize("payload, text", [
    (rule(AF_INET, 32765, 100, src="192.0.2.0/24"), "32765: from 192.0.2.0/24 lookup 100"),
    (rule(AF_INET, 0, 255), "0: from all lookup local"),
    (rule(AF_INET, 10, 254, dst="198.51.100.0/24", flags=nl.FIB_RULE_INVERT, suppress=0),
     "10: not from all to 198.51.100.0/24 lookup main suppress_prefixlength 0"),
    (rule(AF_INET, 7, 100, extra=((nl.FRA_FWMARK, u32(1)), (nl.FRA_FWMASK, u32(0xff)))),
     "7: from all fwmark 0x1/0xff lookup 100"),
    (rule(AF_INET, 8, 0, action=nl.FR_ACT_PROHIBIT, extra=((nl.FRA_IIFNAME, b"eth0\0"),)),
     "8: from all iif eth0 prohibit"),
    (rule(AF_INET, 9, 100, extra=((nl.FRA_IP_PROTO, b"\x06"),
                                  (nl.FRA_DPORT_RANGE, struct.pack("=HH", 22, 22)))),
     "9: from all ipproto 6 dport 22 lookup 100"),
    (rule(AF_INET, 1000, 0, extra=((nl.FRA_L3MDEV, b"\x01"),)),
     "1000: from all lookup [l3mdev-table]"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_format_rule_as_ip_rule(payload: bytes, text: str) -> None:
    assert format_rule(decode_rule(payload)) == text


def test_rule_identity_ignores_the_kernels_detached_flag() -> None:
    """An iif rule added before its interface exists is announced with
    FIB_RULE_IIF_DETACHED; its deletion after the interface came may not be."""
    iif = ((nl.FRA_IIFNAME, b"eth9\0"),)
    state = state_after(
        (NEW, rule(AF_INET, 5, 100, extra=iif, flags=nl.FIB_RULE_IIF_DETACHED)),
        (DEL, rule(AF_INET, 5, 100, extra=iif)))
    assert held(state) == set()


def test_judge_defaults_per_family() -> None:
    v4 = [decode_rule(r) for r in DEFAULT_RULES_V4]
    v6 = [decode_rule(r) for r in DEFAULT_RULES_V6]
    assert judge(AF_INET, v4) is None
    assert judge(AF_INET6, v6) is None
    # IPv6 has no "default" table rule: one is an addition there
    assert judge(AF_INET6, [*v6, decode_rule(rule(AF_INET6, 32767, 253))]) == (
        "rules_lookup", "32767: from all lookup default")
    assert judge(AF_INET, v4[:2]) == ("rules_lookup",
                                      "default rule deleted: 32767: from all lookup default")


@pytest.mark.parametrize("mtype, payload, follow", [
    (NC, netconf(AF_INET, DEFAULT, rp_filter=1), ["dump netconf4"]),  # devinet_copy_dflt_conf
    (NC, netconf(AF_INET, ALL, rp_filter=1), []),
    (NC, netconf(AF_INET6, ETH0), ["link 2"]),  # force_forwarding, announced without a value
    (NC, netconf(AF_INET6, ALL, forwarding=0), ["dump links"]),  # force_forwarding cleared
    (NC, netconf(AF_INET6, ETH0, forwarding=0), []),
    (DEL, rule(AF_INET, 5, 100), ["dump rules4"]),
    (NEW, rule(AF_INET6, 5, 100), []),
    (NEW, b"\x02\x00", ["dump rules4", "dump rules6"]),  # undecodable
], ids=lambda v: "" if isinstance(v, bytes) else None)
def test_notifications_ask_for_what_they_leave_unsaid(mtype: int, payload: bytes,
                                                      follow: list[str]) -> None:
    state = state_after()
    assert state.apply(mtype, payload) == follow
    assert state_after().apply(mtype, payload, notification=False) == []


def test_undecodable_message_makes_the_careful_condition_hold_until_a_dump() -> None:
    state = state_after()
    state.apply(nl.RTM_NEWNETCONF, b"\x0a\x00\x00\x00")  # no NETCONFA_IFINDEX
    assert state.stats["undecodable"] == 1
    assert {("forwarding", AF_INET, 0), ("forwarding", AF_INET6, 0)} <= held(state)
    for table in ("netconf4", "netconf6"):
        state.begin(table)
    for mtype, payload in baseline():
        if mtype == NC:
            state.apply(mtype, payload, notification=False)
    for table in ("netconf4", "netconf6"):
        state.commit(table)
    assert held(state) == set()


def test_a_dump_replaces_its_table_and_keeps_notifications_met_on_the_way() -> None:
    state = state_after((NEW, rule(AF_INET, 5, 100, src="192.0.2.0/24")))
    # the rule was deleted while notifications were lost; a new dump starts
    state.begin("rules4")
    for payload in DEFAULT_RULES_V4[:2]:
        state.apply(NEW, payload, notification=False)
    state.apply(NEW, rule(AF_INET, 6, 100, extra=FWMARK))  # a notification during the dump
    state.apply(NEW, DEFAULT_RULES_V4[2], notification=False)
    assert ("rules_kernel", AF_INET, 0) in held(state)  # live table meanwhile: both rules
    state.commit("rules4")
    assert [c.detail for c in state.conditions()] == ["6: from all fwmark 0x1 lookup 100"]


def test_failed_dump_is_careful() -> None:
    state = state_after()
    state.fail("rules6", "dump failed: Address family not supported by protocol")
    state.fail("links", "dump failed: Cannot allocate memory")
    assert held(state) == {("rules_kernel", AF_INET6, 0), ("vrf", 0, 0)}


def test_decoders() -> None:
    assert decode_netconf(netconf(AF_INET6, ALL, forwarding=0)) == (AF_INET6, ALL, {2: 0})
    assert decode_link(link(ETH1, master=VRF, slave_kind="vrf", force_forwarding=1)) == (
        0, ETH1, LinkState("eth1", VRF, "", "vrf", 1))
    # a kernel before 6.17 sends a shorter IFLA_INET6_CONF: no force_forwarding
    short = link(ETH1) + nl.attr(nl.IFLA_AF_SPEC, nl.attr(
        AF_INET6, nl.attr(nl.IFLA_INET6_CONF, bytes(4 * 40))))
    assert decode_link(short)[2].force_forwarding == 0


class FakeSocket:
    """Records what the watch sends; its answers are fed back with ``feed``."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> int:
        self.sent.append(data)
        return len(data)


PORTID = 4242


def answer(watch: RoutingWatch, sock: FakeSocket, rows: list[tuple[int, bytes]]) -> None:
    """Answer the request the watch sent last with ``rows`` and NLMSG_DONE."""
    seq = nl.seq_of(sock.sent[-1])
    buf = b"".join(msg(mtype, payload, seq=seq, pid=PORTID, flags=nl.NLM_F_MULTI)
                   for mtype, payload in rows)
    watch.feed(buf + msg(nl.NLMSG_DONE, s32(0), seq=seq, pid=PORTID))
    watch._send_next()
    watch._publish()


def test_watch_protocol_first_sync_then_notifications() -> None:
    """The request sequence on one socket: six dumps, one at a time; ready and
    on_change after the last; a notification then changes the conditions."""
    changes: list[list[Condition]] = []
    watch = RoutingWatch(None, lambda: changes.append(watch.conditions()))
    sock = FakeSocket()
    watch._sock, watch._portid = sock, PORTID  # type: ignore[assignment]
    watch._queue = dict.fromkeys(f"dump {t}" for t in
                                 ("rules4", "rules6", "netconf4", "netconf6", "links", "addrs4"))
    watch._send_next()
    rows = baseline()
    by_request = {
        nl.RTM_GETRULE: lambda req: [r for r in rows if r[0] == NEW and r[1][0] == req[16]],
        nl.RTM_GETNETCONF: lambda req: [r for r in rows if r[0] == NC and r[1][0] == req[16]],
        nl.RTM_GETLINK: lambda req: [r for r in rows if r[0] == LINK],
        nl.RTM_GETADDR: lambda req: [r for r in rows if r[0] == ADDR],
    }
    for _ in range(6):
        assert not watch.ready.is_set()
        request = sock.sent[-1]
        answer(watch, sock, by_request[struct.unpack_from("=H", request, 4)[0]](request))
    assert len(sock.sent) == 6 and watch.ready.is_set()
    assert changes == [[]]
    # a notification from `ip rule add` (its sender's pid and sequence number)
    watch.feed(msg(NEW, rule(AF_INET, 32765, 100, extra=FWMARK), seq=7, pid=999))
    watch._publish()
    assert [(c.kind, c.family) for c in changes[-1]] == [("rules_kernel", AF_INET)]
    # force_forwarding's bare announcement makes the watch ask for the link
    watch.feed(msg(NC, netconf(AF_INET6, ETH0)))
    watch._send_next()
    assert struct.unpack_from("=H", sock.sent[-1], 4)[0] == nl.RTM_GETLINK
    assert nl.IFINFOMSG.unpack_from(sock.sent[-1], 16)[2] == ETH0
