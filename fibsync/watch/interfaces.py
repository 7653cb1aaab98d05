"""Interface state that XDP_REDIRECT bypasses: qdiscs, tc and tcx programs, veth offload (issue 12).

Why. A frame the fast path redirects goes straight to the egress driver
(ndo_xdp_xmit): it never meets the egress interface's qdisc nor tc/tcx
egress; and XDP runs before tc/tcx ingress. Where the operator put any of
them, the fast path must hand the packets to the kernel:

- ``egress_qdisc`` (family 0, the interface): a qdisc of the operator's, a tc
  filter at egress (clsact ffff:fff3, or on the root qdisc) or a tcx egress
  program. The kernel's own qdiscs have a handle of major 0 (`noqueue 0:
  root`, `mq 0: root` and its `0:` children, pfifo_fast or fq_codel `0:`);
  whatever the operator adds gets a major of its own (tc's, or the kernel's
  800N: even for `handle 0:`), so a root fq_codel or pfifo_fast added by hand
  counts; ffff: is the ingress hook (ingress, clsact), judged by its filters.
  A noqueue of any handle has no queue and no filters: nothing to bypass.
  Seen on 6.18 on a veth: `tc qdisc add dev v0 root tbf ...` shows `tbf 8001:
  root`, `... root handle 0: tbf ...` `tbf 800e: root`, `tc qdisc replace dev
  v0 root pfifo_fast` `pfifo_fast 8010: root`, and after `tc qdisc del dev v0
  root` the kernel's `noqueue 0: root` is back.
- ``tc_ingress`` (family 0, the interface): a tc filter at ingress (parent
  ffff:fff2 of clsact or ingress) or a tcx ingress program. A clsact with no
  ingress filter changes nothing.
- ``checksum``: a veth whose peer leaves TCP/UDP checksums to offload (veth.py).

How. Qdiscs: one RTM_GETQDISC dump. Filters: one RTM_GETTFILTER dump per
hook that can hold them (the kernel dumps filters per interface and parent);
a filter is attributed to the hook asked for, since one on a shared block
comes back with the block's index instead of an interface. RTNLGRP_TC and
RTNLGRP_LINK notifications, and an overrun, only say that something changed:
DEBOUNCE later everything is dumped again (a burst costs one dump, and what
the dump says is exact). tcx: attaching a program through bpf() sends no
netlink message at all, so every interface is asked with BPF_PROG_QUERY once
a second (POLL): a tcx program is found within a second, as is a veth peer's
`ethtool -K ... tx on` (the peer's namespace hears of it, ours does not).
A veth that appears, or whose peer changes, is checked at the dump its
RTM_NEWLINK causes. Dumps and polls all take the RTNL lock: while a routing
storm holds it they are paced (``watch.paced``), a few seconds apart.

All kernel I/O runs on one worker thread that lives in the watched namespace
(bpf() finds an ifindex in the calling thread's namespace); the event loop
only reads notifications, schedules, and publishes conditions.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog

from fibsync.errors import DecodeError, MapError
from fibsync.fastpath import bpfsys
from fibsync.netlink import rtnl as nl
from fibsync.process import wait_event

from . import Condition, paced
from .veth import Link, Peer, PeerProbe, checksum_conditions, parse_link

log = structlog.get_logger(__name__)
_T = TypeVar("_T")

DEBOUNCE = 0.03  # seconds from a notification to the dump it causes
POLL = 1.0  # seconds between tcx queries and veth peer checks
RCVBUF = 1 << 20

HOOK = 0xFFFF0000  # the handle of the ingress and clsact qdiscs (ffff:)
# the parents a filter dump asks for: the root qdisc's block, and the ingress hook's two
ROOT = 0
INGRESS = nl.TC_H_INGRESS & 0xFFFF0000 | nl.TC_H_MIN_INGRESS  # ffff:fff2
EGRESS = nl.TC_H_INGRESS & 0xFFFF0000 | nl.TC_H_MIN_EGRESS  # ffff:fff3
TCX = {INGRESS: bpfsys.BPF_TCX_INGRESS, EGRESS: bpfsys.BPF_TCX_EGRESS}


def handle_text(handle: int) -> str:
    """A handle as tc writes it: ``8001:``, ``ffff:fff2``, ``:1``."""
    major, minor = handle >> 16, handle & 0xFFFF
    return f"{major:x}:{minor:x}" if minor else f"{major:x}:"


@dataclass(frozen=True, slots=True)
class Qdisc:
    ifindex: int
    handle: int
    parent: int
    kind: str

    @property
    def hook(self) -> bool:
        """The ingress hook's qdisc (ingress or clsact): judged by its filters."""
        return self.handle == HOOK and self.kind in ("ingress", "clsact")

    @property
    def operators(self) -> bool:
        """Attached by someone, not by the kernel (which uses major 0), and doing
        something XDP_REDIRECT skips (a noqueue does nothing)."""
        return not self.hook and self.handle >> 16 != 0 and self.kind != "noqueue"

    def __str__(self) -> str:
        where = "root" if self.parent == nl.TC_H_ROOT else f"parent {handle_text(self.parent)}"
        return f"qdisc {self.kind} {handle_text(self.handle)} {where}"


def _kind(payload: bytes) -> str:
    for kind, value in nl.attrs(payload, nl.TCMSG.size):
        if kind == nl.TCA_KIND:
            return value.rstrip(b"\0").decode(errors="replace")
    return "?"


def parse_qdisc(payload: bytes) -> Qdisc:
    if len(payload) < nl.TCMSG.size:
        raise DecodeError(f"qdisc message of {len(payload)} bytes")
    _family, ifindex, handle, parent, _info = nl.TCMSG.unpack_from(payload)
    return Qdisc(ifindex, handle, parent, _kind(payload))


@dataclass
class TcView:
    """What the dumps said: qdiscs, filters per (interface, hook), tcx programs."""

    qdiscs: list[Qdisc] = field(default_factory=list)
    filters: dict[tuple[int, int], set[str]] = field(default_factory=dict)
    tcx: dict[tuple[int, int], list[int]] = field(default_factory=dict)
    problems: dict[tuple[int, int], str] = field(default_factory=dict)  # hook -> why unknown
    bad: int = 0  # messages that could not be read

    def add_qdisc(self, payload: bytes) -> None:
        try:
            self.qdiscs.append(parse_qdisc(payload))
        except DecodeError as exc:
            self.bad += 1
            self.problems[(0, INGRESS)] = f"a qdisc message fibsync cannot read ({exc})"

    def add_filter(self, ifindex: int, parent: int, payload: bytes) -> None:
        """A message of the filter dump of ``parent`` (ROOT, INGRESS, EGRESS) on ``ifindex``."""
        if len(payload) < nl.TCMSG.size:
            self.bad += 1
        self.filters.setdefault((ifindex, parent), set()).add(
            _kind(payload) if len(payload) >= nl.TCMSG.size else "?")

    def hooks(self) -> list[tuple[int, int]]:
        """The (ifindex, parent) filter dumps that can find filters."""
        out = []
        for q in self.qdiscs:
            if q.hook:
                out.append((q.ifindex, INGRESS))
                if q.kind == "clsact":
                    out.append((q.ifindex, EGRESS))
            elif q.parent == nl.TC_H_ROOT and not q.operators and q.kind != "noqueue":
                out.append((q.ifindex, ROOT))  # the kernel's fq_codel takes filters too
        return sorted(set(out))

    def conditions(self, names: Mapping[int, str]) -> list[Condition]:
        egress: dict[int, list[str]] = {}
        ingress: dict[int, list[str]] = {}
        for q in self.qdiscs:
            if q.operators:
                egress.setdefault(q.ifindex, []).append(str(q))
        for (ifindex, parent), kinds in sorted(self.filters.items()):
            where = ingress if parent == INGRESS else egress
            hook = "ingress" if parent == INGRESS else "egress" if parent == EGRESS else "root"
            where.setdefault(ifindex, []).append(f"tc {hook} filters ({', '.join(sorted(kinds))})")
        for (ifindex, parent), ids in sorted(self.tcx.items()):
            if ids:
                where = ingress if parent == INGRESS else egress
                hook = "ingress" if parent == INGRESS else "egress"
                where.setdefault(ifindex, []).append(
                    f"tcx {hook} program id {', '.join(map(str, ids))}")
        for (ifindex, parent), why in sorted(self.problems.items()):
            (ingress if parent == INGRESS else egress).setdefault(ifindex, []).append(why)
        out = []
        for ifindex, causes in sorted(egress.items()):
            name = names.get(ifindex, f"#{ifindex}")
            out.append(Condition("egress_qdisc", 0, ifindex, f"{name}: {'; '.join(causes)}: "
                                 f"packets routed out of {name} go to the kernel "
                                 "(XDP_REDIRECT would bypass qdisc and tc)"))
        for ifindex, causes in sorted(ingress.items()):
            name = names.get(ifindex, f"#{ifindex}") if ifindex else "every interface"
            out.append(Condition("tc_ingress", 0, ifindex, f"{name}: {'; '.join(causes)}: "
                                 f"packets arriving on {name} go to the kernel "
                                 "(tc runs after XDP)"))
        return out


@dataclass
class _Dump:
    links: dict[int, Link]
    tc: TcView
    peers: dict[int, Peer]  # of the veths that are new or changed


@dataclass
class _Poll:
    tcx: dict[tuple[int, int], list[int]]  # program ids by (ifindex, INGRESS or EGRESS)
    problems: dict[tuple[int, int], str]
    peers: dict[int, Peer]
    tcx_supported: bool


def _cpu_counted(method: Callable[..., _T]) -> Callable[..., _T]:
    """A _Worker method that adds the CPU time it takes to the worker's ``cpu``."""

    @functools.wraps(method)
    def run(self: _Worker, *args: Any) -> _T:
        started = time.thread_time()
        try:
            return method(self, *args)
        finally:
            self.cpu += time.thread_time() - started
    return run


class _Worker:
    """The blocking half: every request to the kernel, on the worker thread only."""

    def __init__(self, here: str) -> None:
        self.peers = PeerProbe(here)
        self.tcx_supported = True
        self.cpu = 0.0  # seconds of CPU the dumps and polls took (this thread's)

    @_cpu_counted
    def dump(self, known: Mapping[int, Link]) -> _Dump:
        with nl.Rtnl() as rtnl:
            body = nl.IFINFOMSG.pack(nl.AF_UNSPEC, 0, 0, 0, 0) + \
                nl.attr_u32(nl.IFLA_EXT_MASK, nl.RTEXT_FILTER_SKIP_STATS)
            links = {}
            for _t, payload in rtnl.ask(nl.RTM_GETLINK, body, nl.NLM_F_DUMP):
                try:
                    link = parse_link(payload)
                except DecodeError:
                    continue
                links[link.ifindex] = link
            tc = TcView()
            for _t, payload in rtnl.ask(nl.RTM_GETQDISC, nl.TCMSG.pack(nl.AF_UNSPEC, 0, 0, 0, 0),
                                        nl.NLM_F_DUMP):
                tc.add_qdisc(payload)
            for ifindex, parent in tc.hooks():
                body = nl.TCMSG.pack(nl.AF_UNSPEC, ifindex, 0, parent, 0)
                for _t, payload in rtnl.ask(nl.RTM_GETTFILTER, body, nl.NLM_F_DUMP):
                    tc.add_filter(ifindex, parent, payload)
        changed = [link for link in links.values() if link.veth and known.get(link.ifindex) != link]
        return _Dump(links, tc, self.peers.probe(changed) if changed else {})

    @_cpu_counted
    def poll(self, links: Iterable[Link]) -> _Poll:
        links = list(links)
        tcx: dict[tuple[int, int], list[int]] = {}
        problems = {}
        for link in links if self.tcx_supported else ():
            for parent, attach in TCX.items():
                try:
                    tcx[(link.ifindex, parent)] = bpfsys.prog_query(link.ifindex, attach)
                except MapError as exc:
                    err = getattr(exc, "errno", 0)
                    if err == errno.EINVAL:  # a kernel before tcx (6.6): nothing to find
                        self.tcx_supported = False
                        return _Poll({}, {}, self.peers.probe(links), False)
                    if err != errno.ENODEV:  # ENODEV: gone since the dump
                        problems[(link.ifindex, parent)] = f"tcx cannot be queried ({exc})"
        return _Poll(tcx, problems, self.peers.probe(links), self.tcx_supported)


def _enter(netns: str | None) -> None:
    if netns is not None:
        nl._enter_netns(netns)


class InterfaceWatch:
    """Watches qdiscs, tc filters, tcx programs and veth peers of one namespace."""

    def __init__(self, netns: str | None, on_change: Callable[[], None]) -> None:
        self.netns = netns
        self.on_change = on_change
        self.ready = asyncio.Event()
        self.stats: dict[str, Any] = dict(dumps=0, polls=0, notifications=0, overruns=0,
                                          bad_messages=0, errors=0, veths=0, peers_unchecked=0,
                                          paced=0, tcx="queried every second")
        self._conditions: list[Condition] = []
        self._reset()

    def _reset(self) -> None:
        """A fresh state for each run (a failed run is started again by fidelity)."""
        self._links: dict[int, Link] = {}
        self._resume_at = 0.0  # loop time before which no dump or poll starts (_paced)
        self._tc: TcView | None = None  # None: the last dump failed
        self._tcx: dict[tuple[int, int], list[int]] = {}
        self._tcx_problems: dict[tuple[int, int], str] = {}
        self._peers: dict[int, Peer] = {}
        self._failure = ""
        self._dump_wanted = True
        self._wake: asyncio.Event | None = None

    def conditions(self) -> list[Condition]:
        return list(self._conditions)

    async def run(self) -> None:
        self._reset()
        loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        sock = nl.open_socket(netns=self.netns, rcvbuf=RCVBUF,
                              groups=(nl.RTNLGRP_LINK, nl.RTNLGRP_TC))
        worker = ThreadPoolExecutor(1, thread_name_prefix="watch-interfaces",
                                    initializer=_enter, initargs=(self.netns,))
        state = _Worker(self.netns or "of the daemon")
        buf = bytearray(1 << 16)
        loop.add_reader(sock.fileno(), self._drain, sock, buf)
        try:
            next_poll = loop.time()
            while True:
                if self._dump_wanted:
                    self._dump_wanted = False
                    await self._paced(loop, state, self._dump(loop, worker, state))
                if loop.time() >= next_poll:
                    next_poll = loop.time() + POLL  # or later: _paced
                    await self._paced(loop, state, self._poll(loop, worker, state))
                self._publish()
                self.ready.set()
                await self._wait(loop, next_poll)
        finally:
            loop.remove_reader(sock.fileno())
            sock.close()
            worker.shutdown(wait=False, cancel_futures=True)

    async def _paced(self, loop: asyncio.AbstractEventLoop, state: _Worker,
                     job: Awaitable[None]) -> None:
        """Run a dump or a poll no sooner than the CPU the last one spent allows
        (``paced``): both take the RTNL lock, on which a storm makes them spin."""
        pause = self._resume_at - loop.time()
        if pause > 0:
            self.stats["paced"] += 1
            await asyncio.sleep(pause)
        started, spent = loop.time(), state.cpu
        await job
        self._resume_at = started + paced(0.0, state.cpu - spent)

    async def _dump(self, loop: asyncio.AbstractEventLoop, worker: ThreadPoolExecutor,
                    state: _Worker) -> None:
        try:
            dump = await loop.run_in_executor(worker, state.dump, dict(self._links))
        except OSError as exc:
            # the notification socket still hears every change; a retry comes with the poll
            self.stats["errors"] += 1
            self._tc, self._failure = None, f"the qdisc/filter dump failed: {exc}"
            self._dump_wanted = True
            log.warning("watch.interfaces.dump_failed", netns=self.netns, error=str(exc))
            return
        self.stats["dumps"] += 1
        self.stats["bad_messages"] += dump.tc.bad
        self._links, self._tc, self._failure = dump.links, dump.tc, ""
        self._peers.update(dump.peers)

    async def _poll(self, loop: asyncio.AbstractEventLoop, worker: ThreadPoolExecutor,
                    state: _Worker) -> None:
        try:
            result = await loop.run_in_executor(worker, state.poll, list(self._links.values()))
        except OSError as exc:  # the last answers stand until the next poll
            self.stats["errors"] += 1
            log.warning("watch.interfaces.poll_failed", netns=self.netns, error=str(exc))
            return
        self.stats["polls"] += 1
        self._tcx, self._tcx_problems, self._peers = result.tcx, result.problems, result.peers
        if not result.tcx_supported:
            self.stats["tcx"] = "not in this kernel"

    async def _wait(self, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        """Until the next poll is due or a notification came (and DEBOUNCE more)."""
        assert self._wake is not None
        timeout = deadline - loop.time()
        if self._dump_wanted and self._tc is None:
            timeout = min(timeout, POLL)  # a failed dump is tried again, not in a busy loop
        elif self._dump_wanted:
            timeout = 0
        if timeout > 0:
            await wait_event(self._wake, timeout)
        if self._wake.is_set():
            self._wake.clear()
            await asyncio.sleep(DEBOUNCE)

    def _drain(self, sock: socket.socket, buf: bytearray) -> None:
        """Read every pending notification: each one (or an overrun) asks for a dump."""
        assert self._wake is not None
        while True:
            try:
                n = sock.recv_into(buf)
            except BlockingIOError:
                return
            except OSError as exc:
                self.stats["overruns" if exc.errno == errno.ENOBUFS else "errors"] += 1
                self._want_dump()
                if exc.errno != errno.ENOBUFS:
                    return
                continue
            offset = 0
            while offset + nl.NLMSGHDR.size <= n:
                length = nl.NLMSGHDR.unpack_from(buf, offset)[0]
                if length < nl.NLMSGHDR.size:
                    self.stats["bad_messages"] += 1
                    break
                self.stats["notifications"] += 1
                offset += (length + 3) & ~3
            self._want_dump()

    def _want_dump(self) -> None:
        assert self._wake is not None
        self._dump_wanted = True
        self._wake.set()

    def _publish(self) -> None:
        veths = [link for link in self._links.values() if link.veth]
        self.stats["veths"] = len(veths)
        self.stats["peers_unchecked"] = sum(1 for v in veths if v.ifindex not in self._peers
                                            or self._peers[v.ifindex].problem)
        if self._tc is None:
            conds = [Condition("tc_ingress", 0, 0, f"{self._failure}: packets go to the kernel")]
            conds += [Condition("egress_qdisc", 0, i, f"{link.name}: {self._failure}")
                      for i, link in self._links.items()]
        else:
            view = TcView(self._tc.qdiscs, self._tc.filters,
                          {k: v for k, v in self._tcx.items() if k[0] in self._links},
                          {**self._tc.problems, **{k: v for k, v in self._tcx_problems.items()
                                                   if k[0] in self._links}})
            conds = view.conditions({i: link.name for i, link in self._links.items()})
        conds += checksum_conditions(veths, self._peers)
        conds = sorted(set(conds))
        if conds == self._conditions:
            return
        self._conditions = conds
        try:
            self.on_change()
        except Exception as exc:  # noqa: BLE001 - the caller's bug must not stop the watch
            self.stats["errors"] += 1
            log.error("watch.interfaces.on_change_failed", error=repr(exc))
