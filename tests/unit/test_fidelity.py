"""fidelity.entries: kernel conditions -> the `ifaces` entries the XDP program reads,
and Fidelity's bookkeeping with stand-in watchers (no kernel needed)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from fibsync.fastpath import abi
from fibsync.fastpath.abi import Reason
from fibsync.fidelity import CAREFUL, Fidelity, entries, entry
from fibsync.model import AF_INET, AF_INET6
from fibsync.watch import Condition


def fs_iface(raw: bytes) -> tuple[int, int, int, int]:
    """(pass_v4, pass_v6, flags, egress) of a struct fs_iface."""
    return abi.IFACE.unpack(raw)[:4]  # type: ignore[return-value]


@pytest.mark.parametrize("conds, ifindex, want", [
    ([], 3, (0, 0, 0, 0)),
    # IPv4 forwarding is the ingress interface's: only that interface's IPv4 goes over
    ([Condition("forwarding", AF_INET, 3, "forwarding=0")], 3,
     (Reason.PASS_FORWARDING_OFF, 0, 0, 0)),
    ([Condition("forwarding", AF_INET, 3, "forwarding=0")], 4, (0, 0, 0, 0)),
    # IPv6 forwarding is all's: every interface
    ([Condition("forwarding", AF_INET6, 0, "all.forwarding=0")], 4,
     (0, Reason.PASS_FORWARDING_OFF, 0, 0)),
    ([Condition("netfilter", 0, 0, "table inet fw")], 7,
     (Reason.PASS_NETFILTER, Reason.PASS_NETFILTER, 0, 0)),
    ([Condition("xfrm", AF_INET6, 0, "policy dir fwd")], 7, (0, Reason.PASS_XFRM, 0, 0)),
    ([Condition("vrf", 0, 5, "master vrf-blue")], 5, (Reason.PASS_VRF, Reason.PASS_VRF, 0, 0)),
    # forwarding off outranks the rest: the reason says the first thing to fix
    ([Condition("netfilter", 0, 0, "t"), Condition("forwarding", AF_INET, 3, "f")], 3,
     (Reason.PASS_FORWARDING_OFF, Reason.PASS_NETFILTER, 0, 0)),
    ([Condition("rules_lookup", AF_INET, 0, "from 192.0.2.1 lookup 100")], 3,
     (0, 0, abi.FS_IF_RULES_V4, 0)),
    ([Condition("rules_lookup", 0, 0, "both")], 3,
     (0, 0, abi.FS_IF_RULES_V4 | abi.FS_IF_RULES_V6, 0)),
    ([Condition("rules_kernel", AF_INET, 0, "fwmark 1 lookup 100")], 3,
     (Reason.PASS_RULES, 0, 0, 0)),
    ([Condition("rp_filter_loose", AF_INET, 3, "2")], 3, (0, 0, abi.FS_IF_RPF_LOOSE, 0)),
    # both reported (all=2, interface=1): the kernel takes the max, strict
    ([Condition("rp_filter_loose", AF_INET, 3, "2"), Condition("rp_filter_strict", AF_INET, 3,
                                                               "1")], 3,
     (0, 0, abi.FS_IF_RPF_STRICT, 0)),
    ([Condition("rp_filter_kernel", AF_INET, 3, "no IPv4 address")], 3,
     (Reason.PASS_RP_FILTER, 0, 0, 0)),
    ([Condition("checksum", 0, 3, "peer tx on")], 3, (0, 0, abi.FS_IF_CHECKSUM, 0)),
    ([Condition("tc_ingress", 0, 3, "clsact filter")], 3,
     (Reason.PASS_TC_INGRESS, Reason.PASS_TC_INGRESS, 0, 0)),
    # egress conditions stay on their interface: they never hand over what arrives there
    ([Condition("egress_qdisc", 0, 3, "tbf")], 3, (0, 0, 0, Reason.PASS_EGRESS_QDISC)),
    ([Condition("egress_qdisc", 0, 3, "tbf")], 4, (0, 0, 0, 0)),
    # an egress condition of every interface (a watcher that has not reported yet)
    ([Condition("egress_qdisc", 0, 0, "not reported yet")], 4,
     (0, 0, 0, Reason.PASS_EGRESS_QDISC)),
    ([Condition("netfilter_egress", 0, 3, "netdev egress")], 3,
     (0, 0, 0, Reason.PASS_NETFILTER)),
])
def test_entry(conds: list[Condition], ifindex: int, want: tuple[int, ...]) -> None:
    assert fs_iface(entry(conds, ifindex)) == tuple(int(x) for x in want)


def test_entries_cover_every_interface_and_those_conditions_name() -> None:
    mac = bytes.fromhex("020000000001")
    got = entries([Condition("egress_qdisc", 0, 9, "tbf")], {1: bytes(6), 2: mac})
    assert sorted(got) == [1, 2, 9]
    # each entry carries its interface's MAC (unicast frames to another go to the kernel)
    assert abi.IFACE.unpack(got[2])[4] == mac and abi.IFACE.unpack(got[9])[4] == bytes(6)
    # the map has FS_MAX_IFACES entries: the program hands over what lies beyond
    assert entries([], {abi.FS_MAX_IFACES: mac}) == {}


MAC = bytes.fromhex("020000000001")


class FakeWatch:
    def __init__(self, conds: list[Condition], ready: bool = True) -> None:
        self.ready = asyncio.Event()
        self.stats: dict[str, Any] = {"dumps": 1}
        self.conds = conds
        self.fail: Exception | None = None
        if ready:
            self.ready.set()

    async def run(self) -> None:
        if self.fail is not None:
            raise self.fail
        await asyncio.Event().wait()

    def conditions(self) -> list[Condition]:
        return self.conds


class Log:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def info(self, event: str, **kw: Any) -> None:
        self.events.append((event, kw))

    error = info


def fidelity(watchers: dict[str, FakeWatch], netfilter: str = "respect"
             ) -> tuple[Fidelity, dict[int, bytes], Log]:
    ifaces: dict[int, bytes] = {}
    log = Log()

    def update(items: list[tuple[bytes, bytes]]) -> None:
        for k, v in items:
            ifaces[abi.U32.unpack(k)[0]] = v

    f = Fidelity(update, log, netfilter, watchers=lambda _: watchers,  # type: ignore[arg-type,return-value]
                 links=lambda: {2: MAC, 3: MAC})
    return f, ifaces, log


def test_conditions_reach_the_map_and_leave_it() -> None:
    async def scenario() -> None:
        nf = FakeWatch([Condition("netfilter", AF_INET, 0, "table ip nat, chain post")])
        f, ifaces, log = fidelity({"netfilter": nf})
        await f.start()
        assert fs_iface(ifaces[2])[:2] == (Reason.PASS_NETFILTER, 0)
        assert any(e == "fidelity.condition" for e, _ in log.events)
        nf.conds = []
        f.changed()
        await asyncio.sleep(0)
        assert fs_iface(ifaces[2]) == (0, 0, 0, 0)  # back to the fast path
        assert any(e == "fidelity.condition_gone" for e, _ in log.events)
        assert f.doc()["conditions"] == []
        await f.stop()
    asyncio.run(scenario())


def test_an_egress_with_conditions_is_held_out_of_the_redirect_targets() -> None:
    """A qdisc on interface 3: FastPath is told to keep 3 out of tx_ports (after
    `ifaces` names the reason), and to let it back in when the qdisc goes."""
    async def scenario() -> None:
        tc = FakeWatch([Condition("egress_qdisc", 0, 3, "qdisc htb")])
        f, ifaces, _ = fidelity({"tc": tc})
        calls: list[frozenset[int]] = []
        f.hold = lambda held: calls.append(held) or None  # type: ignore[func-returns-value]
        await f.start()
        assert calls == [frozenset({3})] and f.held == frozenset({3})
        assert fs_iface(ifaces[3])[3] == Reason.PASS_EGRESS_QDISC
        f.changed()
        await asyncio.sleep(0)
        assert calls == [frozenset({3})]  # unchanged: not told again
        tc.conds = []
        f.changed()
        await asyncio.sleep(0)
        assert calls[-1] == frozenset()
        await f.stop()
    asyncio.run(scenario())


def test_bypass_ignores_netfilter_only() -> None:
    async def scenario() -> None:
        nf = FakeWatch([Condition("netfilter", 0, 0, "t"), Condition("netfilter_egress", 0, 3,
                                                                     "e")])
        x = FakeWatch([Condition("xfrm", AF_INET, 0, "p")])
        f, ifaces, _ = fidelity({"netfilter": nf, "xfrm": x}, netfilter="bypass")
        await f.start()
        assert fs_iface(ifaces[3]) == (Reason.PASS_XFRM, 0, 0, 0)
        f.set_netfilter("respect")
        assert fs_iface(ifaces[3]) == (Reason.PASS_NETFILTER, Reason.PASS_NETFILTER, 0,
                                       Reason.PASS_NETFILTER)
        await f.stop()
    asyncio.run(scenario())


def test_a_watcher_not_ready_or_failed_stands_for_its_careful_condition() -> None:
    async def scenario() -> None:
        late = FakeWatch([], ready=False)
        broken = FakeWatch([])
        broken.fail = RuntimeError("bad message")
        f, ifaces, log = fidelity({"routing": late, "xfrm": broken})
        f.READY_TIMEOUT = 0.05
        await f.start()
        await asyncio.sleep(0.01)
        assert {*CAREFUL["routing"], *CAREFUL["xfrm"]} <= set(f.active)
        assert fs_iface(ifaces[2])[:2] == (Reason.PASS_XFRM, Reason.PASS_XFRM)
        assert f.doc()["watchers"]["xfrm"]["last_error"] == "RuntimeError: bad message"
        broken.fail = None
        late.ready.set()
        await asyncio.sleep(Fidelity.RETRY_SECONDS + 0.1)
        broken.ready.set()  # the restarted watcher dumped again
        await asyncio.sleep(0.01)
        assert f.active == [] and fs_iface(ifaces[2]) == (0, 0, 0, 0)
        await f.stop()
    asyncio.run(scenario())


def test_nothing_is_written_before_every_watcher_had_its_first_dump() -> None:
    """On a restart the previous run's entries stay in force until the watchers know:
    a watcher that reports early must not get the others' careful conditions written."""
    async def scenario() -> None:
        early = FakeWatch([])
        late = FakeWatch([], ready=False)
        f, ifaces, _ = fidelity({"routing": early, "interfaces": late})
        task = asyncio.create_task(f.start())
        await asyncio.sleep(0.05)
        f.changed()  # the early one reports a change
        await asyncio.sleep(0.01)
        assert ifaces == {}
        late.ready.set()
        await task
        assert fs_iface(ifaces[2]) == (0, 0, 0, 0) and f.active == []
        await f.stop()
    asyncio.run(scenario())
