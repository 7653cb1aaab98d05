"""The common form of a route dump, decoded as columns.

A full table is a million RTM_NEWROUTE messages that differ only in their
prefix and nexthop object. ``decode()`` builds model objects one message at a
time (~2.7 µs a route, measured on 1.25M routes); this reads a dump in
batches with numpy instead: messages of one layout (the same length, and the
same attribute headers at the same offsets) are checked and read as columns
in a handful of array operations, ~0.3 µs a route.

What a ``RouteDump`` claims: RTM_NEWROUTE with the dump's sequence number and
without NLM_F_DUMP_INTR, IPv4 or IPv6, not cloned, over a nexthop object
(RTA_NH_ID non-zero), whose attributes are all in ``_PLAIN`` with the lengths
decode() requires. The inline paths nexthop_compat_mode=1 adds to such a
route (RTA_GATEWAY, RTA_OIF, RTA_MULTIPATH) are not read: the object decides
where the route goes. Every other message — another type, another layout,
the NLMSG_DONE that ends the dump, anything malformed — is handed back as its
own bytes, in dump order, for ``decode()``; a claimed message is one decode()
would have turned into the same route (tests/unit/test_columns.py checks that).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from fibsync.errors import DecodeError
from fibsync.model import AF_INET, AF_INET6, RouteColumns
from fibsync.netlink.decode import decode as _decode
from fibsync.netlink.rtnl import (
    NLATTR,
    NLM_F_DUMP_INTR,
    NLMSGHDR,
    RTA_CACHEINFO,
    RTA_DST,
    RTA_EXPIRES,
    RTA_GATEWAY,
    RTA_MULTIPATH,
    RTA_NH_ID,
    RTA_OIF,
    RTA_PREF,
    RTA_PREFSRC,
    RTA_PRIORITY,
    RTA_TABLE,
    RTM_F_CLONED,
    RTM_NEWROUTE,
    RTMSG,
)

RTMSG_END = NLMSGHDR.size + RTMSG.size

# attribute type -> the length it must have (None: any; it is not read)
_PLAIN: dict[int, int | None] = {
    RTA_TABLE: 8,
    RTA_DST: -1,  # the family's address
    RTA_PRIORITY: 8,
    RTA_NH_ID: 8,
    RTA_OIF: 8,  # compat mode
    RTA_GATEWAY: -1,  # compat mode
    RTA_MULTIPATH: None,  # compat mode, groups
    RTA_PREFSRC: None,
    RTA_CACHEINFO: None,  # IPv6
    RTA_PREF: None,  # IPv6
    RTA_EXPIRES: None,  # IPv6
}
_MAX_LAYOUTS = 16  # layouts tried per message length and batch before the rest goes to decode()
_HDR = struct.Struct("=IH")  # nlmsghdr's length and type
_U16 = struct.Struct("=H")

Unclaimed = list[tuple[int, bytes]]

# bytes held back before a batch is read: a batch is at most this plus one received
# buffer (32 KiB), so that it and every array made of it stay under the daemon's
# malloc mmap threshold (process.MMAP_THRESHOLD, 128 KiB) and come from the heap,
# reused; above it each would be mapped afresh and its pages faulted in (4 MiB
# batches: ~250k page faults and ~0.2-0.3 s more for a 1.25M-route dump, measured)
BATCH = 96 << 10
MERGE = 64  # batches' columns joined into one part


@dataclass(slots=True)
class _Layout:
    """One message layout: the bytes that must match, and where the values are.

    ``claim`` is False for a layout of another form: messages of it go to
    decode() together, without a layout of their own each.
    """

    cols: np.ndarray[Any, Any]  # byte offsets that must equal ``want``
    want: np.ndarray[Any, Any]
    claim: bool
    family: int = 0
    addr_len: int = 0
    dst: int = -1  # offset of RTA_DST's payload, -1 without one
    table: int = -1  # same for RTA_TABLE
    metric: int = -1  # RTA_PRIORITY
    nhid: int = -1  # RTA_NH_ID


def _layout(msg: bytes) -> _Layout | None:
    """The layout of one route message (None: decode() must see this one alone).

    The skeleton is every byte a structural check of decode() reads: the
    message type, the family, each attribute's header and, inside
    RTA_MULTIPATH, each path's length and attribute headers. A message with the
    same skeleton as one decode() accepts is accepted too; only the values
    (addresses, ids, numbers) differ, and those decode() does not judge
    beyond what is checked per row (prefix length, RTM_F_CLONED, nhid).
    """
    length = len(msg)
    cols = [4, 5, 16]  # nlmsg_type and rtm_family
    at = {RTA_DST: -1, RTA_TABLE: -1, RTA_PRIORITY: -1, RTA_NH_ID: -1}
    claim = length >= RTMSG_END and msg[16] in (AF_INET, AF_INET6)
    addr_len = 4 if msg[16] == AF_INET else 16
    pos = RTMSG_END
    while pos < length:
        if length - pos < 4:
            return None
        alen, atype = NLATTR.unpack_from(msg, pos)
        if alen < 4 or pos + alen > length:
            return None
        cols.extend(range(pos, pos + 4))
        rule = _PLAIN.get(atype, 0)  # a set NLA_F_* bit makes it unknown too
        fits = rule != 0 and (rule is None or alen == (4 + addr_len if rule < 0 else rule))
        if not fits or (atype == RTA_MULTIPATH
                        and not _paths_layout(msg, pos + 4, pos + alen, cols)):
            claim = False
        if atype in at:
            at[atype] = pos + 4
        pos += (alen + 3) & ~3
    if claim and at[RTA_NH_ID] < 0:
        claim = False
    if claim:
        try:
            decode_one(msg)  # the reference says yes to this one
        except DecodeError:
            return None  # maybe for a value of this message only: not for its whole layout
    cols_a = np.array(cols, np.intp)
    want = np.frombuffer(msg, np.uint8)[cols_a].copy()
    if not claim:
        return _Layout(cols_a, want, False)
    return _Layout(cols_a, want, True, msg[16], addr_len, at[RTA_DST], at[RTA_TABLE],
                   at[RTA_PRIORITY], at[RTA_NH_ID])


def _paths_layout(msg: bytes, pos: int, end: int, cols: list[int]) -> bool:
    """Add RTA_MULTIPATH's structure to the skeleton; False where a path holds an
    attribute decode() reads by value (RTA_VIA: its family)."""
    while pos + 8 <= end:
        rtnh_len = _U16.unpack_from(msg, pos)[0]
        cols.extend((pos, pos + 1))
        if rtnh_len < 8 or pos + rtnh_len > end:
            return True  # decode_one() refuses it
        apos, nh_end = pos + 8, pos + rtnh_len
        while apos + 4 <= nh_end:
            alen, atype = NLATTR.unpack_from(msg, apos)
            cols.extend(range(apos, apos + 4))
            if atype & 0x3FFF == 18:  # RTA_VIA
                return False
            if alen < 4:
                return True
            apos += (alen + 3) & ~3
        pos += (rtnh_len + 3) & ~3
    return True


def decode_one(msg: bytes) -> None:
    """Run the reference decoder over one message; DecodeError if it refuses it."""
    for _ in _decode(msg):
        pass


def _rows(data: np.ndarray[Any, Any], starts: np.ndarray[Any, Any], size: int
          ) -> np.ndarray[Any, Any]:
    """The ``size`` bytes at each of ``starts``, one row each (a copy). Taken from a
    view of every window of ``data``: an index of a byte per byte taken
    (``starts[:, None] + np.arange(size)``) would be eight bytes of int64 per byte
    copied, ~30 MB for a 4 MB batch of routes, all of it fresh pages to fault in."""
    return np.lib.stride_tricks.sliding_window_view(data, size)[starts]


def _u32(rows: np.ndarray[Any, Any], at: int) -> np.ndarray[Any, Any]:
    return np.ascontiguousarray(rows[:, at:at + 4]).view("=u4").ravel()


class RouteDump:
    """One route dump, fed chunk by chunk as received.

    ``feed`` returns the messages it does not claim, as (ordinal, bytes), in
    order; it holds chunks back until ``batch`` bytes have arrived or the
    dump's end (an NLMSG_DONE or NLMSG_ERROR) is in sight, so a caller
    meets the end of the dump only after every route before it.
    ``columns(family)`` gives what it claimed.
    """

    def __init__(self, seq: int, first_ordinal: int = 0, batch: int = BATCH) -> None:
        self.seq = seq
        self.batch = batch
        self.next_ordinal = first_ordinal
        self.claimed = 0
        self._chunks: list[bytes] = []
        self._offsets: list[int] = []
        self._size = 0
        # each batch's columns (small arrays, from the heap), and those of every
        # MERGE batches joined (from their own mappings): the heap holds no full
        # table's worth of small arrays, interleaved with the batches' temporaries
        self._parts: dict[int, list[RouteColumns]] = {AF_INET: [], AF_INET6: []}
        self._merged: dict[int, list[RouteColumns]] = {AF_INET: [], AF_INET6: []}
        # called with each joined part as it is made (read-only: the columns are
        # the dump's), in the reading thread
        self.on_part: Callable[[RouteColumns], None] | None = None

    def feed(self, chunk: bytes) -> Unclaimed:
        offsets = self._offsets
        base = self._size
        size = len(chunk)
        pos = 0
        end = False
        unpack = _HDR.unpack_from
        while pos + 16 <= size:
            length, mtype = unpack(chunk, pos)
            if length < 16 or pos + length > size:
                break  # broken framing: decode() reports it with the rest of the chunk
            offsets.append(base + pos)
            if mtype < 16:  # NLMSG_NOOP/ERROR/DONE/OVERRUN: the end, or trouble
                end = True
            pos += (length + 3) & ~3
        if pos < size:
            offsets.append(base + pos)  # the unreadable rest, as one piece
            end = True
        self._chunks.append(chunk)
        self._size += size
        if end or self._size >= self.batch:
            return self._process()
        return []

    def flush(self) -> Unclaimed:
        return self._process() if self._chunks else []

    def seal(self) -> None:
        """The dump is over: the batches' columns not joined yet become the last
        part (handed to ``on_part`` like the others)."""
        for family, parts in self._parts.items():
            if parts:
                self._join(family)

    def _join(self, family: int) -> None:
        part = RouteColumns.concat(family, self._parts[family])
        self._parts[family] = []
        self._merged[family].append(part)
        if self.on_part is not None:
            self.on_part(part)

    def columns(self, family: int) -> RouteColumns:
        return RouteColumns.concat(family, self._merged[family] + self._parts[family])

    def _process(self) -> Unclaimed:
        buf = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        starts = np.array(self._offsets, np.int64)
        first = self.next_ordinal
        self.next_ordinal += len(starts)
        self._chunks, self._offsets, self._size = [], [], 0
        ends = np.append(starts[1:], len(buf))
        claimed = np.zeros(len(starts), bool)
        data = np.frombuffer(buf, np.uint8)
        if len(buf) >= 16:
            # every message but a broken last piece has its 16-byte header
            head = _rows(data, np.minimum(starts, len(buf) - 16), 16)
            length = _u32(head, 0).astype(np.int64)
            ok = ((starts + 16 <= len(buf)) & (length >= RTMSG_END)
                  & (length <= ends - starts) & (head[:, 4] == RTM_NEWROUTE)
                  & (head[:, 5] == 0) & (head[:, 6] & NLM_F_DUMP_INTR == 0)
                  & (_u32(head, 8) == self.seq))
            for size in np.unique(length[ok]).tolist():
                rows = np.flatnonzero(ok & (length == size))
                self._claim(buf, data, starts[rows], rows + first, size, claimed, rows)
        self.claimed += int(claimed.sum())
        return [(first + i, buf[starts[i]:ends[i]]) for i in np.flatnonzero(~claimed).tolist()]

    def _claim(self, buf: bytes, data: np.ndarray[Any, Any], starts: np.ndarray[Any, Any],
               ordinals: np.ndarray[Any, Any], size: int, claimed: np.ndarray[Any, Any],
               rows: np.ndarray[Any, Any]) -> None:
        """Claim the messages of one length, layout by layout."""
        msgs = _rows(data, starts, size)
        todo = np.arange(len(starts))
        for _ in range(_MAX_LAYOUTS):
            if not len(todo):
                return
            lead = int(starts[todo[0]])
            layout = _layout(buf[lead:lead + size])
            if layout is None:
                todo = todo[1:]  # decode() takes this one
                continue
            m = msgs[todo]
            same = np.all(m[:, layout.cols] == layout.want, axis=1)
            hit = todo[same]
            todo = todo[~same]
            if not layout.claim:
                continue  # decode() takes all of these
            m = msgs[hit]  # a copy: the columns below must not keep ``msgs`` alive
            nhid = _u32(m, layout.nhid)
            good = ((_u32(m, 24) & RTM_F_CLONED == 0) & (nhid != 0)
                    & (m[:, 17] <= layout.addr_len * 8))
            hit, m, nhid = hit[good], m[good], nhid[good]
            if not len(hit):
                continue
            claimed[rows[hit]] = True
            n = len(hit)
            if len(self._parts[layout.family]) >= MERGE:
                self._join(layout.family)
            self._parts[layout.family].append(RouteColumns(
                family=layout.family,
                ordinal=ordinals[hit],
                dst=(m[:, layout.dst:layout.dst + layout.addr_len].copy() if layout.dst >= 0
                     else np.zeros((n, layout.addr_len), np.uint8)),
                dst_len=m[:, 17].copy(),
                tos=m[:, 19].copy(),
                table=_u32(m, layout.table) if layout.table >= 0 else m[:, 20].astype(np.uint32),
                protocol=m[:, 21].copy(),
                scope=m[:, 22].copy(),
                type=m[:, 23].copy(),
                flags=_u32(m, 24),
                metric=_u32(m, layout.metric) if layout.metric >= 0 else np.zeros(n, np.uint32),
                nhid=nhid,
            ))
