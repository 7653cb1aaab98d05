"""The compact route store: the common form of a full table, as sorted arrays.

A full table is mostly one route per prefix over a nexthop object. A dump
hands those over as columns (``RouteColumns``); the store keeps them compact
— per family, the prefixes' keys (address and length) sorted, each row's
attributes as an index into tuples shared by every prefix with the same
ones, its nexthop object, and whether it is still held — and hands them to
the writer as arrays (``RouteRows``). Their fast-path entry is the object's,
so nothing else is kept per prefix. The store only shrinks after the load:
the first change that names such a prefix takes it out as a ``Route`` of the
general structures (``pop``, a binary search and a cleared flag); the rest
of the RIB never sees the difference.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from ..model import (
    AF_INET,
    AF_INET6,
    ROUTE_TYPES,
    RT_TABLE_LOCAL,
    Prefix,
    Route,
    RouteColumns,
    RouteType,
    Snapshot,
)
from .types import Filter, FpRoute, RouteRows

# A compact route: (table, type, protocol, scope, metric, tos, nhid, flags), shared
# by every prefix with the same attributes; keyed by key_of(prefix).
Compact = tuple[int, int, int, int, int, int, int, int]
NHID = 6
_FIELDS = ("table", "type", "protocol", "scope", "metric", "tos", "nhid", "flags")


def keys_of(family: int, addrs: np.ndarray[Any, Any], lens: np.ndarray[Any, Any]
            ) -> np.ndarray[Any, Any]:
    """Sortable keys of prefixes given as columns (addresses (n, 4 | 16), lengths):
    IPv4 a uint64 (address << 8 | length), IPv6 17 bytes (address, length + 1:
    a last byte never 0, which numpy's bytes would strip)."""
    if family == AF_INET:
        words = np.ascontiguousarray(addrs).view(">u4").ravel().astype(np.uint64)
        words <<= np.uint64(8)  # in place: a full table's temporaries are 8 MB each
        words |= lens
        return words
    raw = np.concatenate([addrs.reshape(-1, 16), (lens.astype(np.uint16) + 1).astype(np.uint8)
                          .reshape(-1, 1)], axis=1)
    return np.ascontiguousarray(raw).view("S17").ravel()


def _prefix_keys(family: int, prefixes: list[Prefix]) -> np.ndarray[Any, Any]:
    alen = 4 if family == AF_INET else 16
    addrs = np.frombuffer(b"".join(p.addr for p in prefixes), np.uint8).reshape(-1, alen)
    return keys_of(family, addrs, np.array([p.length for p in prefixes], np.uint8))


def _prefixes(family: int, keys: np.ndarray[Any, Any]) -> list[Prefix]:
    if family == AF_INET:
        return [Prefix(family, (k >> 8).to_bytes(4, "big"), k & 0xFF) for k in keys.tolist()]
    return [Prefix(family, k[:16], k[16] - 1) for k in keys.tolist()]


def factorize(columns: list[np.ndarray[Any, Any]]) -> tuple[list[Compact], np.ndarray[Any, Any]]:
    """The distinct rows of these columns, and each row's index among them.

    np.unique over a structured array sorts at ~2 µs a row; here constant
    columns (most of them, in a full table) cost one comparison, the others
    one np.unique each, and their codes are combined into one integer.
    """
    n = len(columns[0])
    varying = [col for col in columns if n and not (col == col[0]).all()]
    if len(varying) <= 1:
        # the usual full table: only the nexthop object varies (one sort, no codes)
        key = varying[0] if varying else np.zeros(n, np.uint8)
        _, first, ids = np.unique(key, return_index=True, return_inverse=True)
        picked = [col[first].tolist() for col in columns]
        return list(zip(*picked, strict=True)), ids.ravel()  # type: ignore[arg-type]
    code = np.zeros(n, np.int64)
    distinct = 1  # an upper bound of the codes in use
    for col in varying:
        uniq, inv = np.unique(col, return_inverse=True)
        if distinct * len(uniq) >= 1 << 62:
            _, code = np.unique(code, return_inverse=True)  # renumber densely
            distinct = int(code.max()) + 1
        code = code * len(uniq) + inv
        distinct *= len(uniq)
    _, first, ids = np.unique(code, return_index=True, return_inverse=True)
    picked = [col[first].tolist() for col in columns]
    return list(zip(*picked, strict=True)), ids  # type: ignore[arg-type]


def _kinds(cols: RouteColumns, follow: Filter) -> tuple[np.ndarray[Any, Any],
                                                       np.ndarray[Any, Any]]:
    """(followed, compact-able) masks of a part's rows: a row in the followed table
    (and of a followed protocol), and one of those the compact store can keep
    (unicast or blackhole, no TOS), unless its prefix has other routes."""
    follows = cols.table == follow.table
    if follow.protocols is not None:
        follows &= np.isin(cols.protocol, np.array(sorted(follow.protocols), np.uint8))
    compact = follows & (cols.tos == 0) & ((cols.type == RouteType.UNICAST)
                                           | (cols.type == RouteType.BLACKHOLE))
    return follows, compact


def likely_rows(cols: RouteColumns, follow: Filter, entry_of: Callable[[int], FpRoute]
                ) -> RouteRows:
    """The rows a part of a route dump most likely gives the fast path: the
    compact-able ones, each with its nexthop object's entry. A guess (another
    route of the same prefix, elsewhere in the dump, makes a row a ``Route``
    of the general kind), for a writer filling a fresh map ahead of the
    resync, which decides."""
    idx = np.flatnonzero(_kinds(cols, follow)[1])
    objects, ids = np.unique(cols.nhid[idx], return_inverse=True)
    return RouteRows(cols.family, cols.dst[idx], cols.dst_len[idx], ids.ravel(),
                     [entry_of(n) for n in objects.tolist()])


class _Part:
    """One family's compact routes as arrays sorted by key: each row's attributes
    (an index into ``shared``), its nexthop object, and whether it is still held
    (rows only ever leave after load: a pop clears ``alive``)."""

    def __init__(self, family: int) -> None:
        self.family = family
        self.keys: np.ndarray[Any, Any] = keys_of(family, np.zeros((0, 4 if family == AF_INET
                                                                   else 16), np.uint8),
                                                  np.zeros(0, np.uint8))
        self.attr: np.ndarray[Any, Any] = np.zeros(0, np.int32)
        self.nhid: np.ndarray[Any, Any] = np.zeros(0, np.uint32)
        self.alive: np.ndarray[Any, Any] = np.zeros(0, bool)
        self.shared: list[Compact] = []
        self.count = 0

    def find(self, prefix: Prefix) -> int | None:
        """The row of a prefix still held, None if it has none."""
        if not self.count:
            return None
        key: Any = (np.uint64(int.from_bytes(prefix.addr, "big") << 8 | prefix.length)
                    if self.family == AF_INET else prefix.addr + bytes((prefix.length + 1,)))
        i = int(self.keys.searchsorted(key))
        if i < len(self.keys) and self.keys[i] == key and self.alive[i]:
            return i
        return None

    def rows(self, keys: np.ndarray[Any, Any]) -> tuple[np.ndarray[Any, Any],
                                                        np.ndarray[Any, Any]]:
        """For each key, (whether it is held, its row where it is)."""
        if not self.count or not len(keys):
            return np.zeros(len(keys), bool), np.zeros(len(keys), np.intp)
        i = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        return (self.keys[i] == keys) & self.alive[i], i

    def held(self) -> np.ndarray[Any, Any]:
        return self.keys[self.alive]


def _route(part: _Part, i: int, prefix: Prefix) -> Route:
    attrs = part.shared[part.attr[i]]
    rtype, protocol, scope, metric, tos, nhid, flags = attrs[1:]
    return Route(prefix, attrs[0], ROUTE_TYPES[rtype], protocol, scope, metric, tos, (),
                 nhid, 0, flags)


class CompactRoutes:
    """The compact routes of both families, and how many use each nexthop object.

    A full table's million prefixes as arrays (~14 bytes a prefix), where a dict
    of integer keys took ~100 bytes: ~100 MB of the daemon's RSS at a full table.
    """

    def __init__(self) -> None:
        self.parts: dict[int, _Part] = {AF_INET: _Part(AF_INET), AF_INET6: _Part(AF_INET6)}
        self.users: dict[int, int] = defaultdict(int)

    def __len__(self) -> int:
        return sum(p.count for p in self.parts.values())

    def __iter__(self) -> Iterator[Prefix]:
        for family, part in self.parts.items():
            if part.count:
                yield from _prefixes(family, part.held())

    def count(self, family: int) -> int:
        return self.parts[family].count

    def holds(self, family: int, addr: bytes, length: int) -> bool:
        return self.parts[family].find(Prefix(family, addr, length)) is not None

    def nhid(self, prefix: Prefix) -> int | None:
        """The nexthop object of the prefix's compact route (None: it has none)."""
        part = self.parts[prefix.family]
        i = part.find(prefix)
        return None if i is None else int(part.nhid[i])

    def pop(self, prefix: Prefix, unless: Route | None = None) -> Route | None:
        """Take the prefix's compact route out, as a ``Route`` (None: it has none).
        One equal to ``unless`` stays where it is, and ``unless`` itself is returned
        (a route announced again as it is held: ``KernelState.add_route``)."""
        part = self.parts[prefix.family]
        i = part.find(prefix)
        if i is None:
            return None
        route = _route(part, i, prefix)
        if route == unless:
            return unless
        part.alive[i] = False
        part.count -= 1
        self._forget_user(route.nhid)
        return route

    def _via(self, nhids: set[int]) -> list[tuple[_Part, np.ndarray[Any, Any]]]:
        wanted = np.array(sorted(nhids), np.uint32)
        return [(part, np.flatnonzero(part.alive & np.isin(part.nhid, wanted)))
                for part in self.parts.values() if part.count]

    def via(self, nhids: set[int]) -> list[tuple[Prefix, int]]:
        """(prefix, nexthop object) of the routes over these objects (an object deleted
        or changed in kind), found with numpy: a Python walk of a full table took
        ~0.1 s an object, and a storm deletes objects by the hundred."""
        if not any(n in self.users for n in nhids):
            return []
        return [pair for part, rows in self._via(nhids) for pair in
                zip(_prefixes(part.family, part.keys[rows]), part.nhid[rows].tolist(),
                    strict=True)]

    def drop_via(self, nhid: int) -> list[Prefix]:
        """Remove the routes over a nexthop object; returns their prefixes."""
        if nhid not in self.users:
            return []
        gone: list[Prefix] = []
        for part, rows in self._via({nhid}):
            part.alive[rows] = False
            part.count -= len(rows)
            gone += _prefixes(part.family, part.keys[rows])
        self._forget_user(nhid, len(gone))
        return gone

    def missing_from(self, other: CompactRoutes) -> Iterator[Prefix]:
        """The prefixes held here and not in ``other``."""
        for family, part in self.parts.items():
            if part.count:
                mine = part.held()
                yield from _prefixes(family, mine[~np.isin(mine, other.parts[family].held())])

    def _forget_user(self, nhid: int, routes: int = 1) -> None:
        self.users[nhid] -= routes
        if not self.users[nhid]:
            del self.users[nhid]

    def load(self, snapshot: Snapshot, follow: Filter,
             entry_of: Callable[[int], FpRoute]) -> tuple[list[Route], list[RouteRows], int]:
        """Take a dump's columns: the rows that can stay compact are kept here.

        A row stays compact when the RIB would keep it as the only route of
        its prefix, over a nexthop object, in the followed table: anything
        else about its prefix (another route in the dump, a local-table
        route) makes it a ``Route`` like the rest. Returns the routes for the
        general structures in dump order (the dump's own objects among them),
        the compact rows with their entries (``entry_of`` a nexthop object),
        and how many rows the filter left out. Called once, on an empty store.
        """
        ordinals = snapshot.route_ordinals or range(-len(snapshot.routes), 0)
        general: list[tuple[int, Route]] = list(zip(ordinals, snapshot.routes, strict=True))
        taken: dict[int, list[Prefix]] = {AF_INET: [], AF_INET6: []}
        for route in snapshot.routes:
            taken[route.prefix.family].append(route.prefix)
        rows: list[RouteRows] = []
        kept: dict[int, list[tuple[np.ndarray[Any, Any], np.ndarray[Any, Any],
                                   np.ndarray[Any, Any]]]] = {AF_INET: [], AF_INET6: []}
        ignored = 0
        for cols in snapshot.route_columns:
            family = cols.family
            follows, compact = _kinds(cols, follow)
            local = cols.table == RT_TABLE_LOCAL
            ignored += int(np.count_nonzero(~follows & ~local))
            # rows the RIB must see as routes: local-table ones, and followed ones of other kinds
            for i in np.flatnonzero(~compact & (follows | local)).tolist():
                general.append((int(cols.ordinal[i]), cols.route(i)))
                taken[family].append(general[-1][1].prefix)
            idx = np.flatnonzero(compact)
            # a full table is compact whole: its columns are used as they are, not
            # copied (~25 MB of copies at the first sync's peak)
            whole = len(idx) == len(compact)

            def pick(column: np.ndarray[Any, Any], rows: np.ndarray[Any, Any] = idx,
                     whole: bool = whole) -> np.ndarray[Any, Any]:
                return column if whole else column[rows]

            keys = keys_of(family, pick(cols.dst), pick(cols.dst_len))
            shared, ids = factorize([pick(getattr(cols, name)) for name in _FIELDS])
            ids = ids.astype(np.int32)  # half the intp inverse: rows live through the write
            # a prefix in several rows, or among the routes: all of them are routes of
            # the general kind
            clash = np.isin(keys, _prefix_keys(family, taken[family])) if taken[family] \
                else np.zeros(len(keys), bool)
            order = np.argsort(keys, kind="stable")
            ordered = keys[order]
            same = ordered[1:] == ordered[:-1]
            if same.any():
                clash[order[1:][same]] = True
                clash[order[:-1][same]] = True
            for j in np.flatnonzero(clash).tolist():
                general.append((int(cols.ordinal[idx[j]]), cols.route(int(idx[j]))))
            clashed = bool(clash.any())
            keep = ~clash
            part = self.parts[family]
            kept_ids = ids[keep] if clashed else ids
            nh = np.array([a[NHID] for a in shared], np.uint32)
            # kept sorted by key: the chunk's order, less its clashes
            if clashed:
                order = order[keep[order]]
                ordered = keys[order]
            kept[family].append((ordered, (ids[order] + len(part.shared)).astype(np.int32),
                                 nh[ids[order]] if len(shared) else np.zeros(0, np.uint32)))
            del order, ordered
            part.shared += shared
            for a, count in zip(shared, np.bincount(kept_ids, minlength=len(shared)).tolist(),
                                strict=True):
                if count:
                    self.users[a[NHID]] += count
            if clashed:
                addrs, lens = cols.dst[idx[keep]], cols.dst_len[idx[keep]]
            else:
                addrs, lens = pick(cols.dst), pick(cols.dst_len)
            rows.append(RouteRows(family, addrs, lens, kept_ids,
                                  [entry_of(a[NHID]) for a in shared]))
        for family, chunks in kept.items():
            if not chunks:
                continue
            part = self.parts[family]
            if len(chunks) == 1:  # one dump per family: sorted already
                part.keys, part.attr, part.nhid = chunks[0]
            else:
                keys = np.concatenate([c[0] for c in chunks])
                order = np.argsort(keys, kind="stable")
                part.keys = keys[order]
                part.attr = np.concatenate([c[1] for c in chunks])[order]
                part.nhid = np.concatenate([c[2] for c in chunks])[order]
            part.alive = np.ones(len(part.keys), bool)
            part.count = len(part.keys)
        general.sort(key=lambda pair: pair[0])
        return [route for _, route in general], rows, ignored


def rows_to_write(rows: RouteRows, old: CompactRoutes,
                  old_entry: Mapping[int, FpRoute]) -> RouteRows:
    """The rows whose entry the maps do not hold yet, when they held the ``old``
    compact routes with the entries ``old_entry`` of their objects (all rows on a
    first sync)."""
    part = old.parts[rows.family]
    if not part.count:
        return rows
    held, at = part.rows(keys_of(rows.family, rows.addrs, rows.lens))
    # one comparison of entries per (old object, new entry) pair in use
    pairs = np.where(held, part.nhid[at], 0).astype(np.int64) << 32 | rows.ids.astype(np.int64)
    uniq, inverse = np.unique(pairs, return_inverse=True)
    same = np.array([old_entry.get(p >> 32) == rows.entries[p & 0xFFFFFFFF]
                     for p in uniq.tolist()], bool)
    stale = ~held | ~same[inverse.ravel()]
    return RouteRows(rows.family, rows.addrs[stale], rows.lens[stale], rows.ids[stale],
                     rows.entries)
