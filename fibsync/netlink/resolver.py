"""Ask the kernel to resolve a next hop's link-layer address (ARP/ND).

Packets the XDP fast path forwards never reach the kernel, so the kernel
never learns it should resolve their next hops, and with forwarding disabled
it would not anyway. ``NeighbourResolver`` sends the same request as
``ip neigh replace ADDR dev DEV use``: RTM_NEWNEIGH with NTF_USE, which makes
``neigh_add()`` (net/core/neighbour.c) create the entry if missing (hence
NLM_F_CREATE) and call ``neigh_event_send()``, i.e. start ARP/ND exactly as a
packet waiting for that neighbour would. The answer arrives as an ordinary
RTM_NEWNEIGH on the source's event socket.

NTF_USE also clears NUD_PERMANENT from an existing entry (``__neigh_update``
with NEIGH_UPDATE_F_USE), which would turn an administrator's static entry
into a dynamic, unresolved one. So each request first reads the entry
(RTM_GETNEIGH) and leaves PERMANENT and NOARP entries, and entries already
being confirmed, alone.

Requests are rate-limited per (ifindex, family, address). One that comes
within the interval is not dropped: a single retry is scheduled for when the
interval ends, so a neighbour asked for again (e.g. deleted just after it was
resolved) is not left unresolved until some packet happens to ask. Kernel
errors are counted in ``stats`` and logged at debug level, never raised.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import time
from dataclasses import dataclass
from enum import Enum
from typing import Any

import structlog

from fibsync.errors import DecodeError
from fibsync.model import (
    ADDR_LEN,
    NUD_DELAY,
    NUD_NOARP,
    NUD_PERMANENT,
    NUD_PROBE,
    NUD_REACHABLE,
)
from fibsync.netlink import rtnl as nl
from fibsync.netlink.decode import decode
from fibsync.netlink.rtnl import open_socket, request, seq_of

# entries the kernel is already confirming, or must not be touched
_LEAVE_ALONE = NUD_PERMANENT | NUD_NOARP
_IN_PROGRESS = NUD_REACHABLE | NUD_DELAY | NUD_PROBE
_RATE_TABLE_MAX = 65536


class Outcome(Enum):
    SENT = "sent"  # the kernel accepted the request and is resolving
    RATE_LIMITED = "rate_limited"  # asked for this neighbour less than `interval` ago
    IN_PROGRESS = "in_progress"  # REACHABLE/DELAY/PROBE: the kernel is on it
    STATIC = "static"  # PERMANENT or NOARP entry: left alone
    ERROR = "error"  # the kernel refused or did not answer (see stats)


@dataclass(slots=True)
class ResolverStats:
    requests: int = 0  # NTF_USE requests the kernel accepted
    rate_limited: int = 0
    skipped: int = 0  # entries left alone (static, or already being confirmed)
    errors: int = 0
    last_error: str = ""


class NeighbourResolver:
    """``await resolve(ifindex, family, address)``, or fire-and-forget ``request(...)``."""

    def __init__(
        self,
        *,
        netns: str | None = None,
        interval: float = 1.0,
        timeout: float = 1.0,
        log: Any = None,
    ) -> None:
        self.netns = netns
        self.interval = interval
        self.timeout = timeout
        self.log = log if log is not None else structlog.get_logger()
        self.stats = ResolverStats()
        self._last: dict[tuple[int, int, bytes], float] = {}
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiting: dict[int, asyncio.Future[tuple[int, Any]]] = {}
        self._tasks: set[asyncio.Task[Outcome]] = set()
        self._retries: dict[tuple[int, int, bytes], asyncio.TimerHandle] = {}

    def request(self, ifindex: int, family: int, address: bytes) -> None:
        """Schedule ``resolve()`` on the running loop, for callers that cannot await."""
        task = asyncio.get_running_loop().create_task(self.resolve(ifindex, family, address))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def resolve(self, ifindex: int, family: int, address: bytes) -> Outcome:
        if ADDR_LEN.get(family) != len(address):
            return self._error(f"family {family} with a {len(address)}-byte address")
        key = (ifindex, family, address)
        now = time.monotonic()
        last = self._last.get(key, -self.interval)
        if now - last < self.interval:
            self.stats.rate_limited += 1
            if key not in self._retries:
                self._retries[key] = asyncio.get_running_loop().call_later(
                    last + self.interval - now, self._retry, key)
            return Outcome.RATE_LIMITED
        if len(self._last) >= _RATE_TABLE_MAX:
            self._last = {k: t for k, t in self._last.items() if now - t < self.interval}
        self._last[key] = now
        try:
            ndmsg = nl.NDMSG.pack(family, ifindex, 0, 0, 0)
            dst = nl.attr(nl.NDA_DST, address)
            kind, payload = await self._ask(request(nl.RTM_GETNEIGH, ndmsg + dst, nl.NLM_F_REQUEST))
            if kind == nl.RTM_NEWNEIGH and payload is not None:
                state = payload.obj.state
                if state & _LEAVE_ALONE or state & _IN_PROGRESS:
                    self.stats.skipped += 1
                    return Outcome.STATIC if state & _LEAVE_ALONE else Outcome.IN_PROGRESS
            elif kind == nl.NLMSG_ERROR and payload != errno.ENOENT:
                return self._error(f"RTM_GETNEIGH: {os.strerror(payload)}")
            use = nl.NDMSG.pack(family, ifindex, 0, nl.NTF_USE, 0)
            kind, payload = await self._ask(
                request(
                    nl.RTM_NEWNEIGH,
                    use + dst,
                    nl.NLM_F_REQUEST | nl.NLM_F_ACK | nl.NLM_F_CREATE | nl.NLM_F_REPLACE,
                )
            )
            if kind != nl.NLMSG_ERROR or payload:
                return self._error(f"RTM_NEWNEIGH NTF_USE: {os.strerror(payload or 0)}")
        except (OSError, TimeoutError) as exc:
            return self._error(f"{type(exc).__name__}: {exc}")
        self.stats.requests += 1
        return Outcome.SENT

    def _retry(self, key: tuple[int, int, bytes]) -> None:
        del self._retries[key]
        self.request(*key)

    def close(self) -> None:
        for handle in self._retries.values():
            handle.cancel()
        self._retries.clear()
        for task in list(self._tasks):
            task.cancel()
        if self._sock is not None:
            assert self._loop is not None
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        for future in self._waiting.values():
            future.cancel()
        self._waiting.clear()

    def _error(self, message: str) -> Outcome:
        self.stats.errors += 1
        self.stats.last_error = message
        self.log.debug("neighbour.resolve_failed", error=message)
        return Outcome.ERROR

    async def _ask(self, req: bytes) -> tuple[int, Any]:
        """Send one request; the reply's (type, payload) from decode()."""
        loop = asyncio.get_running_loop()
        if self._sock is None:
            self._sock = open_socket(netns=self.netns)
            self._loop = loop
            loop.add_reader(self._sock.fileno(), self._on_readable)
        seq = seq_of(req)
        future: asyncio.Future[tuple[int, Any]] = loop.create_future()
        self._waiting[seq] = future
        try:
            self._sock.send(req)
            return await asyncio.wait_for(future, self.timeout)
        finally:
            self._waiting.pop(seq, None)

    def _on_readable(self) -> None:
        assert self._sock is not None
        while True:
            try:
                data = self._sock.recv(65536)
            except BlockingIOError:
                return
            except OSError as exc:
                self._error(f"resolver socket: {exc}")
                return
            try:
                for mtype, _flags, seq, payload in decode(data):
                    future = self._waiting.get(seq)
                    if future is not None and not future.done():
                        future.set_result((mtype, payload))
            except DecodeError as exc:
                self._error(f"undecodable reply: {exc}")
