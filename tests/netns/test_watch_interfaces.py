"""InterfaceWatch against a real kernel: what `tc`, tcx and `ethtool` do shows within a second.

Each test watches a fresh router namespace ``r`` whose veths lead to host
namespaces, makes one change with the operator's tools, and waits for the
condition to appear, then undoes it and waits for it to go. tc changes are
announced (RTNLGRP_TC: tens of ms); tcx attachments and a peer's `ethtool -K`
are not, and are found by the once-a-second poll: the limit is 1 s plus the
poll's own run time, LIMIT below.

This kernel has no act_gact (`action drop`) nor cls_matchall: the filters
here are u32 match-alls without an action, which is no different for the
judgement (a filter is there).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import struct
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import uvloop

from fibsync.fastpath import bpfsys
from fibsync.lab import Netns, veth
from fibsync.netlink import rtnl as nl
from fibsync.watch import Condition
from fibsync.watch.interfaces import InterfaceWatch

pytestmark = pytest.mark.privileged

LIMIT = 1.2  # seconds: one poll period (1 s) and the poll's own time


def run(coro: Coroutine[Any, Any, None]) -> None:
    uvloop.run(coro)  # as the daemon runs


class Watched:
    def __init__(self, ns: Netns) -> None:
        self.ns = ns
        self.changes = 0
        self.watch = InterfaceWatch(ns.name, self._changed)
        self.task: asyncio.Task[None] | None = None

    def _changed(self) -> None:
        self.changes += 1

    def ifindex(self, ifname: str) -> int:
        return int(self.ns.run(["cat", f"/sys/class/net/{ifname}/ifindex"]).stdout)

    def find(self, kind: str, ifname: str) -> Condition | None:
        ifindex = self.ifindex(ifname)
        return next((c for c in self.watch.conditions() if c.kind == kind
                     and c.ifindex == ifindex), None)

    async def until(self, what: str, predicate: Callable[[], Any], limit: float = LIMIT) -> Any:
        """Wait for ``predicate`` to hold; fail after ``limit`` seconds. Returns its value."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        while True:
            assert self.task is not None
            if self.task.done():
                self.task.result()
                raise AssertionError("the watcher stopped")
            value = predicate()
            if value:
                return value
            if loop.time() - start > limit:
                raise AssertionError(f"not within {limit}s: {what}; conditions now: "
                                     f"{self.watch.conditions()}")
            await asyncio.sleep(0.01)

    async def appears(self, kind: str, ifname: str) -> Condition:
        index = self.ifindex(ifname)
        found: Condition = await self.until(
            f"{kind} on {ifname}", lambda: next((c for c in self.watch.conditions()
                                                  if c.kind == kind and c.ifindex == index), None))
        return found

    async def goes(self, kind: str, ifname: str) -> None:
        index = self.ifindex(ifname)
        await self.until(f"no {kind} on {ifname}", lambda: not any(
            c.kind == kind and c.ifindex == index for c in self.watch.conditions()))

    async def settled(self) -> None:
        """Two polls from now: every change made before has been dumped and polled."""
        polls = self.watch.stats["polls"]
        await self.until("two polls", lambda: self.watch.stats["polls"] >= polls + 2,
                         limit=2 * LIMIT + 0.1)


@contextlib.asynccontextmanager
async def watching(ns: Netns) -> AsyncIterator[Watched]:
    w = Watched(ns)
    w.task = asyncio.create_task(w.watch.run())
    try:
        await asyncio.wait_for(w.watch.ready.wait(), 5)
        yield w
    finally:
        w.task.cancel()
        await asyncio.gather(w.task, return_exceptions=True)


async def sh(ns: Netns, *argv: str) -> None:
    await asyncio.to_thread(ns.run, list(argv))


@pytest.fixture
def router(netns_factory: Callable[[str], Netns]) -> tuple[Netns, Netns]:
    """r (watched) and h, joined by r's v0 and h's h0, with tx checksumming off at h0."""
    r, h = netns_factory("r"), netns_factory("h")
    veth(r, "v0", h, "h0")  # the lab's veth: tx off at both ends
    return r, h


def test_an_operators_qdisc_shows_and_goes(router: tuple[Netns, Netns]) -> None:
    r, _h = router

    async def scenario() -> None:
        async with watching(r) as w:
            await w.settled()
            assert w.watch.conditions() == []  # noqueue 0: root on both veths
            await sh(r, "tc", "qdisc", "add", "dev", "v0", "root", "tbf", "rate", "1mbit",
                     "burst", "32kbit", "latency", "400ms")
            cond = await w.appears("egress_qdisc", "v0")
            assert "qdisc tbf" in cond.detail and cond.family == 0
            await sh(r, "tc", "qdisc", "del", "dev", "v0", "root")
            await w.goes("egress_qdisc", "v0")
            await sh(r, "tc", "qdisc", "add", "dev", "v0", "root", "handle", "1:", "htb")
            assert "qdisc htb 1: root" in (await w.appears("egress_qdisc", "v0")).detail
            await sh(r, "tc", "qdisc", "del", "dev", "v0", "root")
            await w.goes("egress_qdisc", "v0")

    run(scenario())


def test_tc_filters_at_ingress_and_egress_show_and_go(router: tuple[Netns, Netns]) -> None:
    r, _h = router
    match_all = ["protocol", "all", "prio", "1", "u32", "match", "u32", "0", "0"]

    async def scenario() -> None:
        async with watching(r) as w:
            await sh(r, "tc", "qdisc", "add", "dev", "v0", "clsact")
            await w.settled()
            assert w.watch.conditions() == []  # a clsact without filters is harmless
            await sh(r, "tc", "filter", "add", "dev", "v0", "ingress", *match_all)
            assert "tc ingress filters (u32)" in (await w.appears("tc_ingress", "v0")).detail
            assert w.find("egress_qdisc", "v0") is None
            await sh(r, "tc", "filter", "add", "dev", "v0", "egress", *match_all)
            assert "tc egress filters (u32)" in (await w.appears("egress_qdisc", "v0")).detail
            await sh(r, "tc", "filter", "del", "dev", "v0", "ingress")
            await w.goes("tc_ingress", "v0")
            assert w.find("egress_qdisc", "v0") is not None
            await sh(r, "tc", "qdisc", "del", "dev", "v0", "clsact")
            await w.goes("egress_qdisc", "v0")
            # the old ingress qdisc, filters at ffff:
            await sh(r, "tc", "qdisc", "add", "dev", "v0", "ingress")
            await sh(r, "tc", "filter", "add", "dev", "v0", "parent", "ffff:", *match_all)
            await w.appears("tc_ingress", "v0")
            assert w.find("egress_qdisc", "v0") is None
            await sh(r, "tc", "qdisc", "del", "dev", "v0", "ingress")
            await w.goes("tc_ingress", "v0")

    run(scenario())


# a SCHED_CLS program of two instructions: r0 = -1 (TCX_NEXT); exit
TCX_NEXT = struct.pack("<BBhi", 0xB7, 0, 0, -1) + struct.pack("<BBhi", 0x95, 0, 0, 0)
BPF_LINK_CREATE = 28
BPF_PROG_TYPE_SCHED_CLS = 3


def tcx_link(ns: Netns, ifindex: int, attach_type: int) -> int:
    """Attach a pass-through program at a tcx hook of ``ns``; the link fd (close: detach)."""
    prog = bpfsys.prog_load(BPF_PROG_TYPE_SCHED_CLS, TCX_NEXT, name="fsq_tcx")
    result: list[int] = []

    def inside() -> None:  # bpf() finds target_ifindex in the calling thread's namespace
        nl._enter_netns(ns.name)
        attr = (ctypes.c_uint32 * 16)(prog, ifindex, attach_type, 0)  # union bpf_attr.link_create
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        fd = libc.syscall(321, BPF_LINK_CREATE, ctypes.byref(attr), ctypes.sizeof(attr))
        result.append(fd if fd >= 0 else -ctypes.get_errno())

    try:
        thread = threading.Thread(target=inside)
        thread.start()
        thread.join()
    finally:
        os.close(prog)  # the link holds the program
    if result[0] < 0:
        pytest.fail(f"cannot attach a tcx program: {os.strerror(-result[0])}")
    return result[0]


def test_tcx_programs_are_found_within_a_second(router: tuple[Netns, Netns]) -> None:
    r, _h = router
    if os.uname().machine != "x86_64":
        pytest.skip("the link_create call here uses x86_64's bpf(2) number")

    async def scenario() -> None:
        async with watching(r) as w:
            await w.settled()
            index = w.ifindex("v0")
            for attach, kind in ((bpfsys.BPF_TCX_INGRESS, "tc_ingress"),
                                 (bpfsys.BPF_TCX_EGRESS, "egress_qdisc")):
                link = tcx_link(r, index, attach)
                try:
                    cond = await w.appears(kind, "v0")
                    assert "tcx" in cond.detail and "program id" in cond.detail
                finally:
                    os.close(link)
                await w.goes(kind, "v0")

    run(scenario())


def test_veth_peer_tx_checksumming_shows_and_goes(router: tuple[Netns, Netns],
                                                  netns_factory: Callable[[str], Netns]) -> None:
    r, h = router

    async def scenario() -> None:
        async with watching(r) as w:
            await w.settled()
            assert w.find("checksum", "v0") is None  # the lab's veth: tx off at h0
            await sh(h, "ethtool", "-K", "h0", "tx", "on")
            cond = await w.appears("checksum", "v0")
            assert cond.detail == (f"veth peer h0 (netns {h.name}) has tx checksumming on: run "
                                   "`ethtool -K h0 tx off` there, or its TCP/UDP goes to the "
                                   "kernel")
            await sh(h, "ethtool", "-K", "h0", "tx", "off")
            await w.goes("checksum", "v0")
            # a pair inside the watched namespace, tx on as veths come: both ends, at their dump
            await sh(r, "ip", "link", "add", "v1", "type", "veth", "peer", "name", "v2")
            assert "veth peer v2" in (await w.appears("checksum", "v1")).detail
            assert "veth peer v1" in (await w.appears("checksum", "v2")).detail
            await sh(r, "ethtool", "-K", "v1", "tx", "off")
            await w.goes("checksum", "v2")
            assert w.find("checksum", "v1") is not None
            await sh(r, "ip", "link", "del", "v1")
            await w.until("v1 and v2 gone", lambda: not w.watch.conditions())

    run(scenario())


def test_a_peer_namespace_held_by_a_process_only(router: tuple[Netns, Netns],
                                                 netns_factory: Callable[[str], Netns]) -> None:
    r, _h = router
    p = netns_factory("p")
    veth(r, "v3", p, "p3")
    holder = p.popen(["sleep", "60"])  # then the name goes: only this process holds p
    try:
        # only once it is inside: `ip netns exec` needs the name to get there (deleting
        # it first lost the namespace, and v3 with it, under a loaded CI run)
        inode = os.stat(p.path).st_ino
        deadline = time.monotonic() + 10
        while os.stat(f"/proc/{holder.pid}/ns/net").st_ino != inode:
            assert time.monotonic() < deadline, "the holder never entered the namespace"
            time.sleep(0.01)
        subprocess.run(["ip", "netns", "del", p.name], check=True)

        async def scenario() -> None:
            async with watching(r) as w:
                await w.settled()
                assert w.find("checksum", "v3") is None  # found under /proc, tx off
                nsenter = ["nsenter", "-n", "-t", str(holder.pid)]
                await asyncio.to_thread(subprocess.run, [*nsenter, "ethtool", "-K", "p3", "tx",
                                                         "on"], check=True, capture_output=True)
                cond = await w.appears("checksum", "v3")
                assert f"`nsenter -n -t {holder.pid}`" in cond.detail
                assert "`ethtool -K p3 tx off`" in cond.detail

        run(scenario())
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def test_a_peer_namespace_nobody_can_find_is_careful(router: tuple[Netns, Netns],
                                                     netns_factory: Callable[[str], Netns],
                                                     tmp_path: Path) -> None:
    r, _h = router
    p = netns_factory("q")
    veth(r, "v4", p, "q4")
    hidden = tmp_path / "netns"
    hidden.touch()
    subprocess.run(["mount", "--bind", str(p.path), str(hidden)], check=True)
    try:
        subprocess.run(["ip", "netns", "del", p.name], check=True)  # only the mount holds it

        async def scenario() -> None:
            async with watching(r) as w:
                cond = await w.appears("checksum", "v4")
                assert "neither under /run/netns nor any process's" in cond.detail
                assert "goes to the kernel" in cond.detail
                assert w.watch.stats["peers_unchecked"] == 1

        run(scenario())
    finally:
        subprocess.run(["umount", str(hidden)], check=False)  # the namespace and its veths go
