"""InterfaceWatch's judgement, from netlink messages written here as the kernel writes them.

The qdisc and filter messages are struct tcmsg + TCA_KIND (what RTM_GETQDISC
and RTM_GETTFILTER dumps return); filters are handed over under the hook
whose dump returned them, as the watcher does. The kernel's default qdiscs
(handle major 0) and a clsact with no filter change nothing; an operator's
qdisc or an egress filter hands packets routed out to the kernel; an ingress
filter hands arriving packets over.
"""

from __future__ import annotations

import asyncio
import struct

import pytest

from fibsync.errors import DecodeError
from fibsync.netlink import rtnl as nl
from fibsync.watch import RTNL_DUTY, RTNL_PAUSE_MAX, Condition, paced
from fibsync.watch.interfaces import (
    EGRESS,
    INGRESS,
    ROOT,
    InterfaceWatch,
    TcView,
    handle_text,
    parse_qdisc,
)
from fibsync.watch.veth import (
    ETHTOOL_A_BITSET_BIT_NAME,
    ETHTOOL_A_BITSET_BIT_VALUE,
    ETHTOOL_A_BITSET_BITS,
    ETHTOOL_A_BITSET_BITS_BIT,
    ETHTOOL_A_BITSET_NOMASK,
    ETHTOOL_A_BITSET_VALUE,
    ETHTOOL_A_FEATURES_ACTIVE,
    ETHTOOL_A_FEATURES_HEADER,
    ETHTOOL_A_HEADER_DEV_INDEX,
    ETHTOOL_A_HEADER_DEV_NAME,
    GENLMSGHDR,
    Link,
    Peer,
    active_features,
    checksum_conditions,
    parse_link,
)

NAMES = {2: "eth0", 3: "eth1"}
ETHTOOL_A_FEATURES_HW = 2  # the set the hardware offers: in every reply, never read
ROOT_PARENT = nl.TC_H_ROOT
HOOK_PARENT = nl.TC_H_INGRESS


def tcmsg(ifindex: int, handle: int, parent: int, kind: str) -> bytes:
    return nl.TCMSG.pack(nl.AF_UNSPEC, ifindex, handle, parent, 0) + \
        nl.attr(nl.TCA_KIND, kind.encode() + b"\0")


def view(qdiscs: list[bytes], filters: dict[tuple[int, int], list[bytes]] | None = None,
         tcx: dict[tuple[int, int], list[int]] | None = None) -> TcView:
    v = TcView()
    for q in qdiscs:
        v.add_qdisc(q)
    for (ifindex, parent), msgs in (filters or {}).items():
        assert (ifindex, parent) in v.hooks(), "the watcher would not have dumped this hook"
        for m in msgs:
            v.add_filter(ifindex, parent, m)
    v.tcx.update(tcx or {})
    return v


def kinds(conds: list[Condition]) -> set[tuple[str, int]]:
    return {(c.kind, c.ifindex) for c in conds}


DEFAULTS = [
    tcmsg(2, 0, ROOT_PARENT, "mq"),  # a multi-queue NIC: mq 0: root, fq_codel 0: parent :1..
    tcmsg(2, 0, 0x00000001, "fq_codel"),
    tcmsg(2, 0, 0x00000002, "fq_codel"),
    tcmsg(3, 0, ROOT_PARENT, "noqueue"),  # a veth
]
CLSACT = tcmsg(3, 0xFFFF0000, HOOK_PARENT, "clsact")


def test_the_kernels_default_qdiscs_change_nothing() -> None:
    assert view(DEFAULTS).conditions(NAMES) == []
    assert view([tcmsg(2, 0, ROOT_PARENT, "pfifo_fast")]).conditions(NAMES) == []
    # `tc qdisc add dev eth1 root noqueue` gets a handle of its own, and still queues nothing
    assert view([tcmsg(3, 0x800F0000, ROOT_PARENT, "noqueue")]).conditions(NAMES) == []


@pytest.mark.parametrize("qdisc, shown", [
    (tcmsg(3, 0x80010000, ROOT_PARENT, "tbf"), "qdisc tbf 8001: root"),
    (tcmsg(3, 0x10000, ROOT_PARENT, "htb"), "qdisc htb 1: root"),
    (tcmsg(3, 0x80020000, ROOT_PARENT, "fq_codel"), "qdisc fq_codel 8002: root"),  # by hand
    (tcmsg(2, 0x80030000, 0x00000001, "netem"), "qdisc netem 8003: parent 0:1"),  # under mq
])
def test_an_operators_qdisc_sends_packets_routed_out_to_the_kernel(qdisc: bytes,
                                                                   shown: str) -> None:
    conds = view([*DEFAULTS, qdisc]).conditions(NAMES)
    ifindex = parse_qdisc(qdisc).ifindex
    assert kinds(conds) == {("egress_qdisc", ifindex)}
    assert conds[0].family == 0
    assert shown in conds[0].detail and NAMES[ifindex] in conds[0].detail


def test_a_clsact_without_filters_is_harmless() -> None:
    v = view([*DEFAULTS, CLSACT])
    assert [h for h in v.hooks() if h[0] == 3] == [(3, INGRESS), (3, EGRESS)]  # asked: nothing
    assert v.conditions(NAMES) == []


def test_an_ingress_filter_hands_arriving_packets_to_the_kernel() -> None:
    conds = view([*DEFAULTS, CLSACT], {(3, INGRESS): [tcmsg(3, 0, INGRESS, "u32")]}
                 ).conditions(NAMES)
    assert kinds(conds) == {("tc_ingress", 3)}
    assert "eth1: tc ingress filters (u32)" in conds[0].detail


def test_an_egress_filter_hands_packets_routed_out_to_the_kernel() -> None:
    conds = view([*DEFAULTS, CLSACT], {(3, EGRESS): [tcmsg(3, 0, EGRESS, "bpf")]}
                 ).conditions(NAMES)
    assert kinds(conds) == {("egress_qdisc", 3)}
    assert "tc egress filters (bpf)" in conds[0].detail


def test_a_filter_on_a_shared_block_counts_for_the_hook_that_was_asked() -> None:
    # a shared block's filters come back with TCM_IFINDEX_MAGIC_BLOCK and the block index
    shared = nl.TCMSG.pack(nl.AF_UNSPEC, -1, 0, 22, 0) + nl.attr(nl.TCA_KIND, b"u32\0")
    conds = view([*DEFAULTS, CLSACT], {(3, INGRESS): [shared]}).conditions(NAMES)
    assert kinds(conds) == {("tc_ingress", 3)}


def test_the_ingress_qdisc_is_asked_for_ingress_filters_only() -> None:
    # the ingress qdisc has one block: asking its ffff:fff3 would return the ingress filters
    v = view([*DEFAULTS, tcmsg(3, 0xFFFF0000, HOOK_PARENT, "ingress")])
    assert [h for h in v.hooks() if h[0] == 3] == [(3, INGRESS)]


def test_filters_on_the_kernels_root_qdisc_count_as_egress() -> None:
    v = view([tcmsg(2, 0, ROOT_PARENT, "fq_codel"), tcmsg(3, 0, ROOT_PARENT, "noqueue")],
             {(2, ROOT): [tcmsg(2, 0, 0, "u32")]})
    assert v.hooks() == [(2, ROOT)]  # noqueue holds no filters: not asked
    assert kinds(v.conditions(NAMES)) == {("egress_qdisc", 2)}


def test_tcx_programs_count_like_tc_filters() -> None:
    conds = view(DEFAULTS, tcx={(2, INGRESS): [41], (2, EGRESS): [], (3, EGRESS): [42, 43]}
                 ).conditions(NAMES)
    assert kinds(conds) == {("tc_ingress", 2), ("egress_qdisc", 3)}
    assert "tcx egress program id 42, 43" in next(c.detail for c in conds if c.ifindex == 3)


def test_a_qdisc_message_it_cannot_read_sends_everything_to_the_kernel() -> None:
    v = view([*DEFAULTS, b"\0" * 8])
    assert v.bad == 1
    assert kinds(v.conditions(NAMES)) == {("tc_ingress", 0)}
    with pytest.raises(DecodeError):
        parse_qdisc(b"\0" * 8)


def test_handles_are_written_as_tc_writes_them() -> None:
    assert [handle_text(h) for h in (0, 0x80010000, 0xFFFFFFF2, 1)] == \
        ["0:", "8001:", "ffff:fff2", "0:1"]


# ---------------------------------------------------------------- veth peers


def linkmsg(ifindex: int, name: str, kind: str, peer: int, nsid: int | None) -> bytes:
    body = nl.IFINFOMSG.pack(nl.AF_UNSPEC, 1, ifindex, 0, 0)
    body += nl.attr(nl.IFLA_IFNAME, name.encode() + b"\0")
    body += nl.attr_u32(nl.IFLA_LINK, peer)
    if nsid is not None:
        body += nl.attr(nl.IFLA_LINK_NETNSID, struct.pack("=i", nsid))
    return body + nl.attr(nl.IFLA_LINKINFO, nl.attr(nl.IFLA_INFO_KIND, kind.encode() + b"\0"))


def test_a_veth_names_its_peer_and_the_peers_namespace() -> None:
    assert parse_link(linkmsg(5, "r-h1", "veth", 2, 3)) == Link(5, "r-h1", "veth", 2, 3)
    same = parse_link(linkmsg(6, "v1", "veth", 7, None))
    assert same.veth and same.peer_nsid is None
    assert not parse_link(linkmsg(8, "br0", "bridge", 8, None)).veth


def bit(name: str, value: bool) -> bytes:
    inner = nl.attr(ETHTOOL_A_BITSET_BIT_NAME, name.encode() + b"\0")
    if value:
        inner += nl.attr(ETHTOOL_A_BITSET_BIT_VALUE, b"")
    return nl.attr(ETHTOOL_A_BITSET_BITS_BIT | nl.NLA_F_NESTED, inner)


def features_reply(active: list[str], hw: list[str]) -> bytes:
    header = nl.attr(ETHTOOL_A_FEATURES_HEADER | nl.NLA_F_NESTED,
                     nl.attr_u32(ETHTOOL_A_HEADER_DEV_INDEX, 2)
                     + nl.attr(ETHTOOL_A_HEADER_DEV_NAME, b"h1-r\0"))
    # HW: with a mask (every bit listed, VALUE on the set ones); ACTIVE: NOMASK, set bits only
    hw_set = nl.attr(ETHTOOL_A_FEATURES_HW | nl.NLA_F_NESTED, nl.attr(
        ETHTOOL_A_BITSET_BITS | nl.NLA_F_NESTED,
        b"".join(bit(n, True) for n in hw) + bit("tx-checksum-ipv4", False)))
    act = nl.attr(ETHTOOL_A_FEATURES_ACTIVE | nl.NLA_F_NESTED,
                  nl.attr(ETHTOOL_A_BITSET_NOMASK, b"")
                  + nl.attr(ETHTOOL_A_BITSET_BITS | nl.NLA_F_NESTED,
                            b"".join(bit(n, False) for n in active)))
    return GENLMSGHDR.pack(11, 1) + header + hw_set + act


def test_the_active_features_of_an_ethtool_reply() -> None:
    name, active = active_features(features_reply(
        ["tx-checksum-ip-generic", "rx-gro"], ["tx-checksum-ip-generic", "rx-gro"]))
    assert name == "h1-r" and active == {"tx-checksum-ip-generic", "rx-gro"}
    assert active_features(features_reply(["rx-gro"], ["tx-checksum-ip-generic"]))[1] == \
        {"rx-gro"}  # a feature the hardware has but that is off is not active
    with pytest.raises(DecodeError):  # no active set at all
        active_features(GENLMSGHDR.pack(11, 1))
    compact = nl.attr(ETHTOOL_A_FEATURES_ACTIVE | nl.NLA_F_NESTED,
                      nl.attr(ETHTOOL_A_BITSET_VALUE, b"\xff" * 8))
    with pytest.raises(DecodeError):  # bit numbers without names: cannot tell
        active_features(GENLMSGHDR.pack(11, 1) + compact)


def test_checksum_conditions_name_the_peer_and_the_fix() -> None:
    links = [Link(5, "r-h1", "veth", 2, 0), Link(6, "r-h2", "veth", 2, 1),
             Link(7, "r-h3", "veth", 9, 4), Link(8, "r-h4", "veth", 3, None),
             Link(9, "eth0", "", 0, None)]
    peers = {5: Peer("h1-r", "lab-h1", frozenset({"tx-checksum-ip-generic"})),
             6: Peer("h2-r", "lab-h2"),  # tx off
             7: Peer("", "nsid 4", problem="its namespace (nsid 4) is not found")}
    conds = checksum_conditions(links, peers)
    assert kinds(conds) == {("checksum", 5), ("checksum", 7), ("checksum", 8)}
    by = {c.ifindex: c.detail for c in conds}
    assert by[5] == ("veth peer h1-r (netns lab-h1) has tx checksumming on: run "
                     "`ethtool -K h1-r tx off` there, or its TCP/UDP goes to the kernel")
    assert "not found" in by[7] and "goes to the kernel" in by[7]
    assert "not checked yet" in by[8]  # careful until its peer has been read


# --- pacing: dumps and polls wait for the RTNL lock, which a routing storm holds


def test_a_quick_kernel_keeps_the_interval_and_a_slow_one_stretches_it() -> None:
    assert paced(1.0, 0.004) == 1.0  # the usual answer: polled once a second
    assert paced(1.0, 0.3) == pytest.approx(0.3 / RTNL_DUTY)  # waiting for the lock
    assert paced(1.0, 60.0) == RTNL_PAUSE_MAX  # never longer than this


def test_a_dump_or_poll_that_spun_on_the_lock_delays_the_next_one() -> None:
    class Worker:
        cpu = 0.0

    async def go() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        watch = InterfaceWatch(None, lambda: None)
        state = Worker()

        async def job(cpu: float, wall: float = 0.0) -> None:
            await asyncio.sleep(wall)
            state.cpu += cpu  # what the worker thread counted (time.thread_time)

        t0 = loop.time()
        await watch._paced(loop, state, job(0.004))  # spun 4 ms on the RTNL lock
        # waited 50 ms for a busy core, spending nothing: no reason to pause after it
        await watch._paced(loop, state, job(0.0, wall=0.05))
        t1 = loop.time()
        await watch._paced(loop, state, job(0.0))
        return t1 - 0.05 - t0, loop.time() - t1

    spun_to_next, waited_to_next = asyncio.run(go())
    assert spun_to_next >= 0.004 / RTNL_DUTY - 0.005
    assert waited_to_next < 0.02
