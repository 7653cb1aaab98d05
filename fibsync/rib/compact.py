"""The compact route store: the common form of a full table, one dict entry per prefix.

A full table is mostly one route per prefix over a nexthop object. A dump
hands those over as columns (``RouteColumns``); the store keeps them compact
— one dict entry per prefix, keyed by an integer made of the address and the
length, whose value is a shared tuple of the route's attributes — and hands
them to the writer as arrays (``RouteRows``). Their fast-path entry is the
object's, so nothing else is kept per prefix. The first change that names
such a prefix takes it out of the store as a ``Route`` of the general
structures (``pop``); the rest of the RIB never sees the difference.
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
    RouteType,
    Snapshot,
)
from .types import Filter, FpRoute, RouteRows

# A compact route: (table, type, protocol, scope, metric, tos, nhid, flags), shared
# by every prefix with the same attributes; keyed by key_of(prefix).
Compact = tuple[int, int, int, int, int, int, int, int]
NHID = 6
_FIELDS = ("table", "type", "protocol", "scope", "metric", "tos", "nhid", "flags")


def key_of(prefix: Prefix) -> int:
    return int.from_bytes(prefix.addr, "big") << 8 | prefix.length


def prefix_of(family: int, key: int) -> Prefix:
    return Prefix(family, (key >> 8).to_bytes(4 if family == AF_INET else 16, "big"), key & 0xFF)


def keys_of(addrs: np.ndarray[Any, Any], lens: np.ndarray[Any, Any]) -> list[int]:
    """key_of every row, at numpy speed where it fits 64 bits."""
    if addrs.shape[1] == 4:
        words = addrs.view(">u4").ravel().astype(np.uint64)
        return (words << np.uint64(8) | lens.astype(np.uint64)).tolist()
    halves = addrs.view(">u8")
    return [hi << 72 | lo << 8 | n for hi, lo, n in
            zip(halves[:, 0].tolist(), halves[:, 1].tolist(), lens.tolist(), strict=True)]


def factorize(columns: list[np.ndarray[Any, Any]]) -> tuple[list[Compact], np.ndarray[Any, Any]]:
    """The distinct rows of these columns, and each row's index among them.

    np.unique over a structured array sorts at ~2 µs a row; here constant
    columns (most of them, in a full table) cost one comparison, the others
    one np.unique each, and their codes are combined into one integer.
    """
    n = len(columns[0])
    code = np.zeros(n, np.int64)
    distinct = 1  # an upper bound of the codes in use
    for col in columns:
        if not n or (col == col[0]).all():
            continue
        uniq, inv = np.unique(col, return_inverse=True)
        if distinct * len(uniq) >= 1 << 62:
            _, code = np.unique(code, return_inverse=True)  # renumber densely
            distinct = int(code.max()) + 1
        code = code * len(uniq) + inv
        distinct *= len(uniq)
    _, first, ids = np.unique(code, return_index=True, return_inverse=True)
    picked = [col[first].tolist() for col in columns]
    return list(zip(*picked, strict=True)), ids  # type: ignore[arg-type]


class CompactRoutes:
    """The compact routes of both families, and how many use each nexthop object."""

    def __init__(self) -> None:
        self.tables: dict[int, dict[int, Compact]] = {AF_INET: {}, AF_INET6: {}}
        self.users: dict[int, int] = defaultdict(int)
        # what load() took, as (family, keys, nexthop object of each): the routes over
        # an object are found from it (``via``) without walking the tables in Python.
        # The store only shrinks after load(), so a row found here is checked against
        # the table and skipped when its prefix has left it.
        self._loaded: list[tuple[int, list[int], np.ndarray[Any, Any]]] = []

    def __len__(self) -> int:
        return sum(len(t) for t in self.tables.values())

    def __iter__(self) -> Iterator[Prefix]:
        for family, table in self.tables.items():
            for key in table:
                yield prefix_of(family, key)

    def count(self, family: int) -> int:
        return len(self.tables[family])

    def holds(self, family: int, addr: bytes, length: int) -> bool:
        return int.from_bytes(addr, "big") << 8 | length in self.tables[family]

    def nhid(self, prefix: Prefix) -> int | None:
        """The nexthop object of the prefix's compact route (None: it has none)."""
        attrs = self.tables[prefix.family].get(key_of(prefix))
        return None if attrs is None else attrs[NHID]

    def pop(self, prefix: Prefix) -> Route | None:
        """Take the prefix's compact route out, as a ``Route`` (None: it has none)."""
        table = self.tables[prefix.family]
        if not table:
            return None
        attrs = table.pop(key_of(prefix), None)
        if attrs is None:
            return None
        rtype, protocol, scope, metric, tos, nhid, flags = attrs[1:]
        self._forget_user(nhid)
        return Route(prefix, attrs[0], ROUTE_TYPES[rtype], protocol, scope, metric, tos, (),
                     nhid, 0, flags)

    def via(self, nhids: set[int]) -> list[tuple[Prefix, int]]:
        """(prefix, nexthop object) of the routes over these objects (an object deleted
        or changed in kind), found in load()'s columns: a Python walk of a full table
        took ~0.1 s an object, and a storm deletes objects by the hundred."""
        if not any(n in self.users for n in nhids):
            return []
        wanted = np.array(sorted(nhids), np.uint32)
        out = []
        for family, keys, objects in self._loaded:
            table = self.tables[family]
            for i in np.flatnonzero(np.isin(objects, wanted)).tolist():
                attrs = table.get(keys[i])
                if attrs is not None and attrs[NHID] in nhids:
                    out.append((prefix_of(family, keys[i]), attrs[NHID]))
        return out

    def drop_via(self, nhid: int) -> list[Prefix]:
        """Remove the routes over a nexthop object; returns their prefixes."""
        gone = [prefix for prefix, _ in self.via({nhid})]
        for prefix in gone:
            del self.tables[prefix.family][key_of(prefix)]
            self._forget_user(nhid)
        return gone

    def missing_from(self, other: CompactRoutes) -> Iterator[Prefix]:
        """The prefixes held here and not in ``other``."""
        for family, table in self.tables.items():
            now = other.tables[family]
            for key in table:
                if key not in now:
                    yield prefix_of(family, key)

    def _forget_user(self, nhid: int) -> None:
        self.users[nhid] -= 1
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
        and how many rows the filter left out.
        """
        ordinals = snapshot.route_ordinals or range(-len(snapshot.routes), 0)
        general: list[tuple[int, Route]] = list(zip(ordinals, snapshot.routes, strict=True))
        taken: dict[int, set[int]] = {AF_INET: set(), AF_INET6: set()}
        for route in snapshot.routes:
            taken[route.prefix.family].add(key_of(route.prefix))
        rows: list[RouteRows] = []
        ignored = 0
        for cols in snapshot.route_columns:
            follows = cols.table == follow.table
            if follow.protocols is not None:
                follows &= np.isin(cols.protocol, np.array(sorted(follow.protocols), np.uint8))
            local = cols.table == RT_TABLE_LOCAL
            ignored += int(np.count_nonzero(~follows & ~local))
            compact = follows & (cols.tos == 0) & ((cols.type == RouteType.UNICAST)
                                                   | (cols.type == RouteType.BLACKHOLE))
            # rows the RIB must see as routes: local-table ones, and followed ones of other kinds
            for i in np.flatnonzero(~compact & (follows | local)).tolist():
                general.append((int(cols.ordinal[i]), cols.route(i)))
                taken[cols.family].add(key_of(general[-1][1].prefix))
            idx = np.flatnonzero(compact)
            keys = keys_of(cols.dst[idx], cols.dst_len[idx])
            shared, ids = factorize([getattr(cols, name)[idx] for name in _FIELDS])
            table = dict(zip(keys, map(shared.__getitem__, ids.tolist()), strict=True))
            clash = taken[cols.family] & table.keys()
            if len(table) < len(keys):
                # one prefix in several rows: all of them are routes of the general kind
                seen: set[int] = set()
                clash |= {k for k in keys if k in seen or seen.add(k)}  # type: ignore[func-returns-value]
            keep = np.ones(len(idx), bool)
            if clash:
                for j, key in enumerate(keys):
                    if key in clash:
                        keep[j] = False
                        general.append((int(cols.ordinal[idx[j]]), cols.route(int(idx[j]))))
                for key in clash:
                    table.pop(key, None)
            target = self.tables[cols.family]
            if target:
                target.update(table)
            else:
                self.tables[cols.family] = target = table
            kept_ids = ids[keep]
            self._loaded.append((cols.family, keys, cols.nhid[idx]))
            for a, count in zip(shared, np.bincount(kept_ids, minlength=len(shared)).tolist(),
                                strict=True):
                if count:
                    self.users[a[NHID]] += count
            rows.append(RouteRows(cols.family, cols.dst[idx[keep]], cols.dst_len[idx[keep]],
                                  kept_ids, [entry_of(a[NHID]) for a in shared]))
        general.sort(key=lambda pair: pair[0])
        return [route for _, route in general], rows, ignored


def rows_to_write(rows: RouteRows, old: dict[int, Compact],
                   old_entry: Mapping[int, FpRoute]) -> RouteRows:
    """The rows whose entry the maps do not hold yet, when they held the ``old``
    compact routes with the entries ``old_entry`` of their objects (all rows on a
    first sync)."""
    if not old:
        return rows
    keys = keys_of(rows.addrs, rows.lens)
    entries = rows.entries
    ids = rows.ids.tolist()
    stale = np.fromiter(
        ((a := old.get(k)) is None or old_entry[a[NHID]] != entries[i]
         for k, i in zip(keys, ids, strict=True)), bool, len(keys))
    return RouteRows(rows.family, rows.addrs[stale], rows.lens[stale], rows.ids[stale], entries)
