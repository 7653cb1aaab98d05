"""The rtnetlink source: subscribe, dump, stream, and start over on overrun.

One session is: open an event socket and join the multicast groups, *then*
dump links, addresses, neighbours, nexthop objects and routes on a second
socket, hand the dump to the sink as one ``Snapshot``, then hand it every
event that arrived since the subscription, in order, as batches. Events that
arrive during the dump are replayed after the snapshot; replaying a change the
dump already saw is harmless because each event carries the object's whole
state.

Whatever makes the mirror untrustworthy ends the session: ENOBUFS on the event
socket (the kernel dropped notifications), NLM_F_DUMP_INTR on a dump (the
kernel's tables changed under it), or a dump error. The next session starts
from fresh sockets and the sink gets ``resync()`` again. NETLINK_NO_ENOBUFS is
deliberately not set: a silent drop would leave the fast path wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import queue
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from fibsync.errors import DecodeError, NetlinkError, NetlinkOverrun
from fibsync.model import AF_INET, AF_INET6, Change, RouteColumns, Snapshot
from fibsync.netlink import rtnl as nl
from fibsync.netlink.columns import RouteDump
from fibsync.netlink.decode import HANDLED_TYPES, decode
from fibsync.netlink.rtnl import RECV_BUFFER, open_socket, request, seq_of

EVENT_GROUPS = (
    nl.RTNLGRP_LINK,
    nl.RTNLGRP_IPV4_IFADDR,
    nl.RTNLGRP_IPV6_IFADDR,
    nl.RTNLGRP_NEIGH,
    nl.RTNLGRP_IPV4_ROUTE,
    nl.RTNLGRP_IPV6_ROUTE,
    nl.RTNLGRP_NEXTHOP,
)

DUMP_RCVBUF = 4 << 20


class Sink(Protocol):
    def before_routes(self, snapshot: Snapshot) -> Callable[[RouteColumns], None] | None:
        """The dump has every object but the routes; returns what takes each part of
        the route columns as the dump reads it (in the dump's thread), or None."""

    def resync(self, snapshot: Snapshot) -> None:
        """Full state after a (re)dump; replaces everything held before."""

    def apply(self, changes: list[Change]) -> None:
        """Ordered changes since the last resync or apply."""


@dataclass(slots=True)
class SourceStats:
    messages: int = 0  # netlink messages received on the event socket
    batches: int = 0  # apply() calls
    undecodable: int = 0  # messages DecodeError rejected (skipped)
    unknown: int = 0  # message types the decoder does not handle (skipped)
    overruns: int = 0  # ENOBUFS on the event socket
    dump_intr: int = 0  # dumps the kernel flagged NLM_F_DUMP_INTR
    dump_errors: int = 0  # dumps that ended in an error
    resyncs: int = 0  # snapshots handed to the sink
    last_resync_seconds: float = 0.0  # subscribe + dump + sink.resync, last time
    rcvbuf: int = 0  # the event socket's receive buffer as the kernel granted it


def dump_requests() -> list[tuple[str, bytes]]:
    """The snapshot's dumps, in the order the sink expects them."""
    link = nl.IFINFOMSG.pack(0, 0, 0, 0, 0) + nl.attr_u32(
        nl.IFLA_EXT_MASK, nl.RTEXT_FILTER_SKIP_STATS)
    out = [("links", request(nl.RTM_GETLINK, link))]
    for family in (AF_INET, AF_INET6):
        out.append(("addresses", request(nl.RTM_GETADDR, nl.IFADDRMSG.pack(family, 0, 0, 0, 0))))
    for family in (AF_INET, AF_INET6):
        # per family: AF_UNSPEC would also dump the bridge FDB
        out.append(("neighbours", request(nl.RTM_GETNEIGH, nl.NDMSG.pack(family, 0, 0, 0, 0))))
    out.append(("nexthops", request(nl.RTM_GETNEXTHOP, nl.NHMSG.pack(0, 0, 0, 0, 0))))
    for family in (AF_INET, AF_INET6):
        # rtm_table 0 dumps every table; AF_UNSPEC would add MPLS and mroute
        out.append(("routes", request(nl.RTM_GETROUTE, nl.RTMSG.pack(family, *[0] * 8))))
    return out



async def _wait_readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    ready: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


async def dump_raw(sock: socket.socket, req: bytes, on_chunk: Callable[[bytes], bool]) -> None:
    """Send one dump request and hand every received buffer to ``on_chunk``.

    ``on_chunk`` returns True when it has seen the NLMSG_DONE (or error) that
    ends the dump. The caller checks sequence numbers and flags; this only
    moves bytes. Used by the source and by bench/bench_decode.py.
    """
    loop = asyncio.get_running_loop()
    sock.send(req)
    buf = bytearray(RECV_BUFFER)
    while True:
        try:
            chunk = read_chunk(sock, buf)
        except BlockingIOError:
            await _wait_readable(loop, sock)
            continue
        if on_chunk(chunk):
            return


def read_chunk(sock: socket.socket, buf: bytearray) -> bytes:
    """One received dump buffer (an empty queue's BlockingIOError passes through: both
    callers read non-blocking sockets)."""
    n = sock.recv_into(buf, 0, socket.MSG_TRUNC)
    if n > len(buf):
        raise NetlinkError(f"a {n}-byte dump message does not fit the receive buffer")
    return bytes(memoryview(buf)[:n])


class NetlinkSource:
    """Mirrors rtnetlink into a ``Sink``: one ``resync`` per (re)dump, then ``apply`` batches."""

    def __init__(
        self,
        *,
        rcvbuf: int = 64 << 20,
        netns: str | None = None,
        log: Any = None,
        max_reads: int = 256,
    ) -> None:
        self.rcvbuf = rcvbuf
        self.netns = netns
        self.log = log if log is not None else structlog.get_logger()
        self.max_reads = max_reads  # recv() calls per wakeup before yielding to the loop
        self.stats = SourceStats()
        self._buf = bytearray(RECV_BUFFER)
        self._pending: list[Change] = []
        self._wake = asyncio.Event()
        self._overrun: str | None = None
        self._synced = False
        self._events: socket.socket | None = None  # the live session's event socket
        self._sink: Sink | None = None
        # caught_up()'s requests by sequence number, and those whose reply was read
        self._barriers: dict[int, asyncio.Future[bool]] = {}
        self._reached: list[int] = []

    async def run(self, sink: Sink) -> None:
        """Mirror forever; cancel the task to stop."""
        reason = "start"
        failures = 0  # sessions in a row that ended before the sink was in sync
        while True:
            self._synced = False
            try:
                await self._session(sink, reason)
            except NetlinkOverrun as exc:
                reason = str(exc)
                self.log.warning("netlink.overrun", reason=reason, overruns=self.stats.overruns)
            except (NetlinkError, OSError) as exc:
                # a dump the kernel refused, or a socket that failed
                reason = f"error: {exc}"
                self.log.error("netlink.error", error=str(exc))
            failures = 0 if self._synced else failures + 1
            if failures > 1:
                # start over at once the first time; back off when it keeps
                # failing, so that a persistent problem does not spin
                await asyncio.sleep(min(0.05 * 2 ** (failures - 2), 5.0))

    async def _session(self, sink: Sink, reason: str) -> None:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        self.log.debug("resync.start", reason=reason)
        self._pending = []
        self._reached = []
        self._overrun = None
        self._wake = asyncio.Event()
        events = open_socket(netns=self.netns, rcvbuf=self.rcvbuf, groups=EVENT_GROUPS)
        self.stats.rcvbuf = events.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        fd = events.fileno()
        self._events, self._sink = events, sink
        try:
            loop.add_reader(fd, self._drain, events)
            heard = self.stats.messages + self.stats.undecodable
            snapshot = await self.dump(sink.before_routes)
            # what the kernel announced while the dump ran is in the socket by now;
            # any notification at all, decodable or not, makes the dump unquiet
            self._drain(events)
            self._check_overrun()
            snapshot.quiet = self.stats.messages + self.stats.undecodable == heard
            routes = snapshot.route_count()  # before the sink, which may consume the columns
            sink.resync(snapshot)
            self._synced = True
            self.stats.resyncs += 1
            self.stats.last_resync_seconds = time.monotonic() - started
            self.log.info(
                "resync.done",
                duration=round(self.stats.last_resync_seconds, 3),
                links=len(snapshot.links),
                addresses=len(snapshot.addresses),
                neighbours=len(snapshot.neighbours),
                nexthops=len(snapshot.nexthops),
                routes=routes,
                queued=len(self._pending),
            )
            del snapshot  # a full table's worth: not to be held for the session's life
            while True:
                if not self._pending and not self._reached and self._overrun is None:
                    self._wake.clear()
                    await self._wake.wait()
                self._check_overrun()
                batch, self._pending = self._pending, []
                reached, self._reached = self._reached, []
                if batch:
                    self.stats.batches += 1
                    sink.apply(batch)
                self._settle_barriers(reached, True)
        finally:
            self._events = None
            self._settle_barriers([*self._reached, *self._barriers], False)
            self._reached = []
            loop.remove_reader(fd)
            events.close()

    @property
    def in_sync(self) -> bool:
        """The sink holds the kernel's state as of the last change read: a session is
        live, its resync done, and nothing was lost since."""
        return self._synced and self._overrun is None and self._events is not None

    async def caught_up(self) -> bool:
        """Wait until the sink has applied every change the kernel announced before this
        call; False if the session is lost first (or is not in sync: a resync follows).

        A barrier, not a drain: the socket may never be empty during a storm. The kernel
        queues its notifications on the event socket when it makes each change, and the
        acknowledgement of a request sent on the same socket (NLMSG_NOOP with NLM_F_ACK)
        behind them: once it is read,
        everything announced before the call has been read too, and it is applied with
        the batch it belongs to.
        """
        if not self.in_sync:
            return False
        assert self._events is not None
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        msg = request(nl.NLMSG_NOOP, b"", nl.NLM_F_REQUEST | nl.NLM_F_ACK)
        self._barriers[seq_of(msg)] = done
        try:
            self._events.send(msg)
        except OSError:
            self._barriers.pop(seq_of(msg), None)
            return False
        return await done

    def _settle_barriers(self, reached: list[int], result: bool) -> None:
        for seq in reached:
            done = self._barriers.pop(seq, None)
            if done is not None and not done.done():
                done.set_result(result)

    def _check_overrun(self) -> None:
        if self._overrun is not None:
            raise NetlinkOverrun(self._overrun)

    def _undecodable(self, exc: DecodeError) -> None:
        self.stats.undecodable += 1
        self.log.debug("netlink.undecodable", error=str(exc))

    def _drain(self, sock: socket.socket) -> None:
        """Reader callback: read what the event socket holds, decode, queue."""
        buf = self._buf
        view = memoryview(buf)
        pending = self._pending
        stats = self.stats
        on_error = self._undecodable
        reached, barriers = self._reached, self._barriers
        for _ in range(self.max_reads):
            try:
                n = sock.recv_into(buf, 0, socket.MSG_TRUNC)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    stats.overruns += 1
                    self._lost(sock, "ENOBUFS: the kernel dropped notifications")
                else:
                    self._lost(sock, f"event socket failed: {exc}")
                return
            if n > len(buf):
                stats.undecodable += 1
                self._lost(sock, f"a {n}-byte notification did not fit the receive buffer")
                return
            try:
                for mtype, _flags, seq, payload in decode(view[:n], on_error):
                    if mtype == nl.NLMSG_ERROR and seq in barriers:
                        # a caught_up() barrier's acknowledgement (a notification is
                        # never NLMSG_ERROR; it may carry the seq of whoever caused it)
                        reached.append(seq)
                        continue
                    stats.messages += 1
                    if payload.__class__ is Change:
                        pending.append(payload)
                    elif payload is None and mtype not in HANDLED_TYPES:
                        stats.unknown += 1
            except DecodeError as exc:
                # framing broken: the rest of this buffer, and the changes in
                # it, are lost
                on_error(exc)
                self._lost(sock, f"undecodable event buffer: {exc}")
                return
        if pending or reached:
            self._wake.set()

    def _lost(self, sock: socket.socket, reason: str) -> None:
        """Notifications were lost: stop reading, and have the session start over."""
        asyncio.get_running_loop().remove_reader(sock.fileno())
        self._overrun = reason
        self._wake.set()

    async def dump(self, before_routes: Callable[[Snapshot], Callable[[RouteColumns], None]
                                                 | None] | None = None) -> Snapshot:
        """One full dump on sockets of its own (the session's, and ``fibsync verify``'s).
        ``before_routes`` is called once every object but the routes is in the
        snapshot; what it returns takes the route columns a part at a time."""
        snapshot = Snapshot()
        routes: list[_Dump] = []
        sock = open_socket(netns=self.netns, rcvbuf=DUMP_RCVBUF)
        try:
            for what, req in dump_requests():
                if what == "routes":
                    # the bulk of a full table is read as columns (netlink/columns.py)
                    seq = seq_of(req)
                    cols = RouteDump(seq, first_ordinal=len(routes) << 40)
                    routes.append(_Dump(self, what, req, cols))
                    continue
                dump = _Dump(self, what, req)
                await dump_raw(sock, req, dump.on_chunk)
                dump.finish()
                getattr(snapshot, what).extend(dump.objects)
                self._check_overrun()
        finally:
            sock.close()
        take = before_routes(snapshot) if before_routes is not None else None
        for d in routes:
            assert d.columns is not None
            d.columns.on_part = take
        # The route dumps side by side, each in a thread of its own (and each
        # received by another, _Receiver): the kernel builds a dump inside recv(),
        # which releases the GIL, so the two families' dumps run on two cores
        # (1M IPv4 + 250k IPv6 routes: 1.4 s against 1.9 s one after the other,
        # measured).
        loop = asyncio.get_running_loop()
        try:
            await asyncio.gather(*(loop.run_in_executor(None, d.run_blocking) for d in routes))
        finally:
            for d in routes:
                d.cancelled = True  # a thread still reading stops at its next wakeup
        for d in routes:
            d.finish()
            snapshot.routes += d.objects
            snapshot.route_ordinals += d.ordinals
            assert d.columns is not None
            cols = d.columns.columns(d.req[16])  # rtm_family of the request
            if len(cols):
                snapshot.route_columns.append(cols)
        self._check_overrun()
        return snapshot


class _Dump:
    """One dump's messages, into ``objects`` (and, for routes, ``columns``).

    Runs in the event loop (``dump_raw``) or in a thread of its own
    (``run_blocking``): it keeps its own counts and failure, which the
    loop's ``finish`` hands to the source.
    """

    def __init__(self, source: NetlinkSource, what: str, req: bytes,
                 columns: RouteDump | None = None) -> None:
        self.source = source
        self.what = what
        self.req = req
        self.seq = seq_of(req)
        self.columns = columns
        self.objects: list[Any] = []
        self.ordinals: list[int] = []  # with columns: each object's place in the dump
        self.failure: BaseException | None = None
        self.cancelled = False
        self.dump_intr = self.dump_errors = self.unknown = 0
        self.undecodable: list[DecodeError] = []

    def finish(self) -> None:
        """Back in the loop: counts to the source's stats; the failure, if any, raised."""
        stats = self.source.stats
        stats.dump_intr += self.dump_intr
        stats.dump_errors += self.dump_errors
        stats.unknown += self.unknown
        for exc in self.undecodable:
            self.source._undecodable(exc)
        if self.failure is not None:
            raise self.failure

    def run_blocking(self) -> None:
        with _Receiver(self.source.netns, self.req, self._abandoned) as chunks:
            for chunk in chunks:
                if self.on_chunk(chunk):
                    break
        if self.columns is not None and self.failure is None and not self._abandoned():
            self.columns.seal()  # the last part handed on too

    def _abandoned(self) -> bool:
        return self.cancelled or self.source._overrun is not None

    def on_chunk(self, chunk: bytes) -> bool:
        """One received buffer; True once the dump is over (or lost)."""
        if self.source._overrun is not None or self.cancelled:
            return True  # the session is lost anyway: do not finish the dump
        try:
            if self.columns is None:
                return self._messages(chunk, 0)
            for ordinal, message in self.columns.feed(chunk):
                if self._messages(message, ordinal):
                    return True
        except DecodeError as exc:
            self.undecodable.append(exc)
            self.failure = NetlinkError(f"{self.what} dump undecodable: {exc}")
            return True
        return False

    def _messages(self, chunk: bytes, ordinal: int) -> bool:
        what = self.what
        for mtype, flags, mseq, payload in decode(chunk, self.undecodable.append):
            if mseq != self.seq:
                continue
            if flags & nl.NLM_F_DUMP_INTR:
                self.dump_intr += 1
                self.failure = NetlinkOverrun(f"{what} dump interrupted (NLM_F_DUMP_INTR)")
                return True
            if payload.__class__ is Change:
                self.objects.append(payload.obj)
                if self.columns is not None:
                    self.ordinals.append(ordinal)
            elif mtype == nl.NLMSG_DONE or mtype == nl.NLMSG_ERROR:
                if payload == errno.EOPNOTSUPP and what == "nexthops":
                    return True  # a kernel without nexthop objects has none
                if payload:
                    self.dump_errors += 1
                    self.failure = NetlinkError(
                        f"{what} dump failed: {os.strerror(payload)}")  # type: ignore[arg-type]
                return True
            elif payload is None and mtype not in HANDLED_TYPES:
                self.unknown += 1
        return False


class _Receiver:
    """One dump's socket, received by a thread of its own; iterate for the buffers.

    The kernel builds a dump's next buffer (~32 KiB) inside the recv() that takes
    the one before, and only then: received and read in one thread, the kernel's
    work and the reading take turns. Here a thread that only receives keeps the
    kernel building while the caller's thread reads the buffer before (recv()
    releases the GIL). At most ``AHEAD`` buffers wait, so a slow reader bounds
    the memory, not the dump.
    """

    AHEAD = 64

    def __init__(self, netns: str | None, req: bytes, abandoned: Callable[[], bool]) -> None:
        self.req = req
        self.abandoned = abandoned  # checked while nothing arrives: the dump is not wanted
        self.buffers: queue.Queue[bytes | BaseException | None] = queue.Queue(self.AHEAD)
        self.stop = threading.Event()
        self.sock = open_socket(netns=netns, rcvbuf=DUMP_RCVBUF)
        self.wake_r, self.wake_w = os.pipe()
        self.thread = threading.Thread(target=self._receive, name="dump-recv", daemon=True)

    def __enter__(self) -> _Receiver:
        try:
            self.sock.send(self.req)
            self.thread.start()
        except BaseException:
            self._close()
            raise
        return self

    def __iter__(self) -> Iterator[bytes]:
        while True:
            item = self.buffers.get()
            if item is None:
                return  # abandoned
            if isinstance(item, BaseException):
                raise item
            yield item

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        os.write(self.wake_w, b"\0")
        while self.thread.is_alive():  # a receiver waiting for room gets it
            with contextlib.suppress(queue.Empty):
                while True:
                    self.buffers.get_nowait()
            self.thread.join(0.01)
        self._close()

    def _close(self) -> None:
        self.sock.close()
        os.close(self.wake_r)
        os.close(self.wake_w)

    def _receive(self) -> None:
        buf = bytearray(RECV_BUFFER)
        poll = select.poll()
        poll.register(self.sock, select.POLLIN)
        poll.register(self.wake_r, select.POLLIN)
        try:
            while not self.stop.is_set():
                try:
                    chunk = read_chunk(self.sock, buf)
                except BlockingIOError:
                    if self.abandoned():
                        break
                    poll.poll(500)
                    continue
                self._put(chunk)
        except BaseException as exc:  # the reader's to raise
            self._put(exc)
        self._put(None)

    def _put(self, item: bytes | BaseException | None) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(queue.Full):
                self.buffers.put(item, timeout=0.5)
                return
