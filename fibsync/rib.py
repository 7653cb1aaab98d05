"""The kernel mirror: what the kernel holds, and the fast-path entry for each prefix.

The RIB takes decoded netlink state (a full ``Snapshot`` after a dump, then
ordered ``Change`` batches) and keeps a copy of the kernel's routes, nexthop
objects, neighbours, links and addresses. From that copy it derives the
fast-path state the XDP program reads, and records what changed in a
``FastPathDiff`` for the map writer. It never touches a socket or a map.

Fast-path identities:
- every kernel nexthop object gets a fast-path id of its own, so a change to
  the object is one map write, whatever number of routes use it;
- inline paths (RTA_GATEWAY/RTA_MULTIPATH routes) are interned: routes with
  the same paths share one fast-path nexthop or group, freed with the last user.

A full table is mostly one route per prefix over a nexthop object. A dump
hands those over as columns (netlink/columns.py); the RIB keeps them compact —
one dict entry per prefix, keyed by an integer made of the address and the
length, whose value is a shared tuple of the route's attributes — and hands
them to the writer as arrays (``RouteRows``). Their fast-path entry is the
object's, so nothing else is kept per prefix. The first change that names
such a prefix turns it into a ``Route`` of the general structures
(``_promote``); the rest of the RIB never sees the difference.

The kernel changes some state without telling anyone (seen on 6.18): when a
link stops carrying traffic, is deleted or loses its last IPv4 address, it
flushes nexthop objects, shrinks their groups, kills or revives paths and
removes routes, with no RTM_DEL* message. ``_set_link``, ``_set_address`` and
``_del_nh_object`` replay each rule (docs/architecture.md lists them), through
indexes by link and by nexthop object, so that a link flap costs in proportion
to the routes over that link, not to the table.
"""

from __future__ import annotations

import functools
import itertools
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from enum import IntEnum
from typing import Any

import numpy as np

from .model import (
    AF_INET,
    AF_INET6,
    NUD_FAILED,
    RT_TABLE_LOCAL,
    Address,
    Change,
    KernelObject,
    Link,
    Neighbour,
    Nexthop,
    NexthopObject,
    Op,
    Prefix,
    Route,
    RouteType,
    Snapshot,
)

NLM_F_REPLACE = 0x100
NLM_F_APPEND = 0x800
RTPROT_RA = 9
RTNH_F_DEAD = 0x1
IFF_UP = 0x1
IFF_RUNNING = 0x40
IFF_LOWER_UP = 0x10000

GROUP_BUCKETS = 128
ZERO_MAC = b"\0" * 6


class Action(IntEnum):
    """What the XDP program does with a prefix (values are bpf/fibsync.h's FS_ACT_*)."""

    FORWARD = 0
    DROP = 1
    KERNEL = 2
    FIB = 3


@dataclass(frozen=True, slots=True)
class FpNexthop:
    ifindex: int
    mtu: int
    resolved: bool
    connected: bool
    family: int
    smac: bytes
    dmac: bytes
    gateway: bytes


@dataclass(frozen=True, slots=True)
class FpGroup:
    """ECMP buckets (nexthop ids by weight) and the members with their kernel weights."""

    buckets: tuple[int, ...]
    members: tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class FpRoute:
    action: Action
    nh_id: int = 0
    group: bool = False
    reason: str = ""


@dataclass(slots=True)
class RouteRows:
    """Routes to set, as arrays: row i is prefix ``addrs[i]/lens[i]`` with entry
    ``entries[ids[i]]``. No row's prefix is also in the diff's ``routes``."""

    family: int
    addrs: np.ndarray[Any, Any]  # uint8 (n, 4 | 16), network order
    lens: np.ndarray[Any, Any]  # uint8
    ids: np.ndarray[Any, Any]  # intp
    entries: list[FpRoute]

    def __len__(self) -> int:
        return len(self.lens)

    def items(self) -> Iterator[tuple[Prefix, FpRoute]]:
        entries = self.entries
        for addr, length, i in zip(self.addrs, self.lens.tolist(), self.ids.tolist(),
                                   strict=True):
            yield Prefix(self.family, addr.tobytes(), length), entries[i]


@dataclass(slots=True)
class FastPathDiff:
    """What the maps must change, coalesced: None means delete."""

    nexthops: dict[int, FpNexthop | None] = field(default_factory=dict)
    groups: dict[int, FpGroup | None] = field(default_factory=dict)
    routes: dict[Prefix, FpRoute | None] = field(default_factory=dict)
    neighbours: dict[tuple[int, int, bytes], bytes | None] = field(default_factory=dict)
    resolve: set[tuple[int, int, bytes]] = field(default_factory=set)
    # more routes to set, as arrays (a resync's compact routes)
    bulk: list[RouteRows] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.nexthops or self.groups or self.routes or self.neighbours
                    or any(len(rows) for rows in self.bulk))

    def __len__(self) -> int:
        return (len(self.nexthops) + len(self.groups) + len(self.routes) + len(self.neighbours)
                + sum(len(rows) for rows in self.bulk))

    def expand(self) -> None:
        """Move the ``bulk`` rows into ``routes`` (for code that edits entries one by one)."""
        for rows in self.bulk:
            self.routes.update(rows.items())
        self.bulk = []


@dataclass(frozen=True, slots=True)
class Filter:
    """Which kernel routes feed the fast path."""

    table: int = 254
    protocols: frozenset[int] | None = None

    def follows(self, route: Route) -> bool:
        if route.table == RT_TABLE_LOCAL:
            return route.type in _LOCAL_TYPES
        if route.table != self.table:
            return False
        return self.protocols is None or route.protocol in self.protocols


_LOCAL_TYPES = {RouteType.LOCAL, RouteType.BROADCAST, RouteType.ANYCAST, RouteType.MULTICAST}
_KERNEL_REASON = {
    RouteType.LOCAL: "PASS_LOCAL",
    RouteType.BROADCAST: "PASS_LOCAL",
    RouteType.ANYCAST: "PASS_LOCAL",
    RouteType.MULTICAST: "PASS_MULTICAST",
    RouteType.UNREACHABLE: "PASS_UNREACHABLE",
    RouteType.PROHIBIT: "PASS_UNREACHABLE",
}
# entries without a nexthop are the same for every prefix: one object each
_KERNEL_ENTRY = {t: FpRoute(Action.KERNEL, reason=r) for t, r in _KERNEL_REASON.items()}
_DROP = FpRoute(Action.DROP)
_FIB = FpRoute(Action.FIB)


@functools.lru_cache(maxsize=1 << 16)
def _forward(nh_id: int, group: bool) -> FpRoute:
    """One entry object per next hop or group, whatever the number of prefixes using it."""
    return FpRoute(Action.FORWARD, nh_id, group)

# A "path set" is what a route forwards over: a kernel nexthop object, or inline paths.
PathKey = int | tuple[Nexthop, ...]

# A compact route: (table, type, protocol, scope, metric, tos, nhid, flags), shared
# by every prefix with the same attributes; keyed by _compact_key(prefix).
Compact = tuple[int, int, int, int, int, int, int, int]
_NHID = 6
_COMPACT_FIELDS = ("table", "type", "protocol", "scope", "metric", "tos", "nhid", "flags")
_ROUTE_TYPES = tuple(RouteType(t) for t in range(len(RouteType)))


def _compact_key(prefix: Prefix) -> int:
    return int.from_bytes(prefix.addr, "big") << 8 | prefix.length


def _compact_prefix(family: int, key: int) -> Prefix:
    return Prefix(family, (key >> 8).to_bytes(4 if family == AF_INET else 16, "big"), key & 0xFF)


def _compact_keys(addrs: np.ndarray[Any, Any], lens: np.ndarray[Any, Any]) -> list[int]:
    """_compact_key of every row, at numpy speed where it fits 64 bits."""
    if addrs.shape[1] == 4:
        words = addrs.view(">u4").ravel().astype(np.uint64)
        return (words << np.uint64(8) | lens.astype(np.uint64)).tolist()
    halves = addrs.view(">u8")
    return [hi << 72 | lo << 8 | n for hi, lo, n in
            zip(halves[:, 0].tolist(), halves[:, 1].tolist(), lens.tolist(), strict=True)]


def _factorize(columns: list[np.ndarray[Any, Any]]) -> tuple[list[Compact], np.ndarray[Any, Any]]:
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


class FibView(Mapping[Prefix, FpRoute]):
    """Every prefix's fast-path entry, the general and the compact ones alike."""

    def __init__(self, rib: Rib) -> None:
        self._rib = rib

    def __getitem__(self, prefix: Prefix) -> FpRoute:
        entry = self._rib._fib.get(prefix)
        if entry is None:
            attrs = self._rib._compact[prefix.family].get(_compact_key(prefix))
            if attrs is None:
                raise KeyError(prefix)
            entry = self._rib._nhid_entry(attrs[_NHID])
        return entry

    def __iter__(self) -> Iterator[Prefix]:
        yield from self._rib._fib
        for family, compact in self._rib._compact.items():
            for key in compact:
                yield _compact_prefix(family, key)

    def __len__(self) -> int:
        return len(self._rib._fib) + sum(len(c) for c in self._rib._compact.values())


class Rib:
    def _reset(self) -> None:
        self.links: dict[int, Link] = {}
        self.addresses: dict[tuple[int, int, bytes, int], Address] = {}
        self.neighbours: dict[tuple[int, int, bytes], Neighbour] = {}
        self.nh_objects: dict[int, NexthopObject] = {}
        # routes we follow, by prefix: usually one, several with other metrics/tables
        self.routes: dict[Prefix, list[Route]] = {}
        self._fib: dict[Prefix, FpRoute] = {}
        # the common form of a full table, compact (see the module docstring), and
        # how many compact prefixes use each nexthop object
        self._compact: dict[int, dict[int, Compact]] = {AF_INET: {}, AF_INET6: {}}
        self._compact_users: dict[int, int] = defaultdict(int)
        # the entry of a route via each nexthop object: shared by all its prefixes
        # (one FpRoute object, not one per prefix), dropped when any object changes
        self._obj_entry: dict[int, FpRoute] = {}
        # what the kernel's silent removals need to find without a scan of every
        # route: prefixes with inline paths over a link, prefixes with routes via
        # a nexthop object, single nexthop objects on a link, groups holding an object
        self._prefixes_by_link: dict[int, set[Prefix]] = defaultdict(set)
        self._prefixes_by_nhid: dict[int, set[Prefix]] = defaultdict(set)
        self._objects_by_link: dict[int, set[int]] = defaultdict(set)
        self._groups_by_member: dict[int, set[int]] = defaultdict(set)
        self._ids = itertools.count(self.first_id)
        self._free_ids: list[int] = []
        # ids freed since the last take_diff(): the maps may still hold them, and
        # the writer sets new entries before it deletes old routes, so they are
        # handed on only from the next diff
        self._released: list[int] = []
        # kernel nexthop object id -> fast-path id (nexthop or group id space)
        self._obj_fp: dict[int, int] = {}
        # interned inline paths -> [fast-path id, is group, user count]
        self._inline: dict[tuple[Nexthop, ...], list[int]] = {}
        # fast-path nexthops as written, and what they hang on
        self._fp_nexthops: dict[int, FpNexthop] = {}
        self._fp_groups: dict[int, FpGroup] = {}
        self._fp_nh_source: dict[int, tuple[int, int, bytes | None]] = {}
        self._nh_by_neigh: dict[tuple[int, int, bytes], set[int]] = defaultdict(set)
        self._nh_by_link: dict[int, set[int]] = defaultdict(set)
        self._group_members: dict[int, tuple[tuple[int, int], ...]] = {}
        self._groups_by_nh: dict[int, set[int]] = defaultdict(set)
        self._path_of_prefix: dict[Prefix, PathKey] = {}
        self.diff = FastPathDiff()

    def __init__(self, filter: Filter | None = None, first_id: int = 1) -> None:
        self.filter = filter or Filter()
        # ids below first_id belong to entries a previous run left in the maps
        self.first_id = first_id
        self.stats = {"changes": 0, "ignored": 0, "resyncs": 0}
        self._reset()

    @property
    def fib(self) -> FibView:
        """Prefix -> fast-path entry, for every prefix the fast path holds."""
        return FibView(self)

    # ------------------------------------------------------------------ input

    def resync(self, snapshot: Snapshot) -> None:
        """Replace the whole mirror by a fresh dump: mark and sweep.

        The fast-path entries that are still right keep their ids and are not
        rewritten; only what differs reaches the diff, so the maps never lose a
        valid entry during a resync.
        """
        self.stats["resyncs"] += 1
        old_fib = self._fib
        old_compact = self._compact
        # compact entries are the objects' entries: remember those as written
        old_entry = {nhid: self._nhid_entry(nhid) for nhid in self._compact_users}
        old_neigh = self.neighbours
        # keep fast-path ids of surviving objects so that their entries stay put
        keep_obj_fp = self._obj_fp
        keep_inline = self._inline
        keep_fp_nh = self._fp_nexthops
        keep_fp_groups = self._fp_groups
        resolve = self.diff.resolve
        old_objs = self.nh_objects
        self._reset()
        self.diff.resolve = resolve
        self._reserve_ids(keep_obj_fp, keep_inline, old_objs, snapshot,
                          set(keep_fp_nh) | set(keep_fp_groups))
        for link in snapshot.links:
            self.links[link.ifindex] = link
        for addr in snapshot.addresses:
            self.addresses[addr.key] = addr
        for n in snapshot.neighbours:
            self.neighbours[n.key] = n
        for obj in sorted(snapshot.nexthops, key=lambda o: o.is_group):
            self._set_nh_object(obj)
        rows = self._add_routes(snapshot)
        self._drop_unused_inline()
        # sweep: compare what the maps held with what they must hold now
        diff = self.diff
        diff.nexthops = {k: v for k, v in self._fp_nexthops.items() if keep_fp_nh.get(k) != v}
        diff.nexthops.update({k: None for k in keep_fp_nh if k not in self._fp_nexthops})
        diff.groups = {k: v for k, v in self._fp_groups.items() if keep_fp_groups.get(k) != v}
        diff.groups.update({k: None for k in keep_fp_groups if k not in self._fp_groups})

        def held(prefix: Prefix) -> FpRoute | None:
            entry = old_fib.get(prefix)
            if entry is None:
                attrs = old_compact[prefix.family].get(_compact_key(prefix))
                if attrs is not None:
                    entry = old_entry[attrs[_NHID]]
            return entry

        diff.routes = {p: e for p, e in self._fib.items() if held(p) != e}
        fib = self.fib
        diff.routes.update({p: None for p in old_fib if p not in fib})
        for family, compact in old_compact.items():
            now = self._compact[family]
            for key in compact:
                if key not in now:
                    prefix = _compact_prefix(family, key)
                    if prefix not in self._fib:
                        diff.routes[prefix] = None
        diff.bulk = [self._unwritten_rows(r, old_compact[r.family], old_entry) for r in rows]
        new_neigh = {k: n.lladdr for k, n in self.neighbours.items() if n.valid}
        diff.neighbours = {
            k: mac for k, mac in new_neigh.items()
            if not (k in old_neigh and old_neigh[k].valid and old_neigh[k].lladdr == mac)
        }
        diff.neighbours.update({
            k: None for k, n in old_neigh.items() if n.valid and k not in new_neigh
        })

    def _add_routes(self, snapshot: Snapshot) -> list[RouteRows]:
        """A dump's routes: the compact ones at once, the others one by one in dump order.

        A row of the columns stays compact when the RIB would keep it as the
        only route of its prefix, over a nexthop object, in the followed
        table: anything else about its prefix (another route in the dump, a
        local-table route) makes it a ``Route`` like the rest. Returns the
        compact rows, for the diff.
        """
        if not snapshot.route_columns:
            for route in snapshot.routes:
                self._add_route(route, 0)
            return []
        ordinals = snapshot.route_ordinals or range(-len(snapshot.routes), 0)
        general: list[tuple[int, Route]] = list(zip(ordinals, snapshot.routes, strict=True))
        taken: dict[int, set[int]] = {AF_INET: set(), AF_INET6: set()}
        for route in snapshot.routes:
            taken[route.prefix.family].add(_compact_key(route.prefix))
        rows: list[RouteRows] = []
        f = self.filter
        for cols in snapshot.route_columns:
            follows = cols.table == f.table
            if f.protocols is not None:
                follows &= np.isin(cols.protocol, np.array(sorted(f.protocols), np.uint8))
            local = cols.table == RT_TABLE_LOCAL
            self.stats["ignored"] += int(np.count_nonzero(~follows & ~local))
            compact = follows & (cols.tos == 0) & ((cols.type == RouteType.UNICAST)
                                                   | (cols.type == RouteType.BLACKHOLE))
            # rows the RIB must see as routes: local-table ones, and followed ones of other kinds
            for i in np.flatnonzero(~compact & (follows | local)).tolist():
                general.append((int(cols.ordinal[i]), cols.route(i)))
                taken[cols.family].add(_compact_key(general[-1][1].prefix))
            idx = np.flatnonzero(compact)
            keys = _compact_keys(cols.dst[idx], cols.dst_len[idx])
            shared, ids = _factorize([getattr(cols, name)[idx] for name in _COMPACT_FIELDS])
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
            target = self._compact[cols.family]
            if target:
                target.update(table)
            else:
                self._compact[cols.family] = target = table
            kept_ids = ids[keep]
            for a, count in zip(shared, np.bincount(kept_ids, minlength=len(shared)).tolist(),
                                strict=True):
                if count:
                    self._compact_users[a[_NHID]] += count
            rows.append(RouteRows(cols.family, cols.dst[idx[keep]], cols.dst_len[idx[keep]],
                                  kept_ids, [self._nhid_entry(a[_NHID]) for a in shared]))
        general.sort(key=lambda pair: pair[0])
        for _, route in general:
            self._add_route(route, 0)
        return rows

    def _unwritten_rows(self, rows: RouteRows, old: dict[int, Compact],
                        old_entry: dict[int, FpRoute]) -> RouteRows:
        """The rows whose entry the maps do not hold yet (all of them on a first sync)."""
        if not old:
            return rows
        keys = _compact_keys(rows.addrs, rows.lens)
        entries = rows.entries
        ids = rows.ids.tolist()
        stale = np.fromiter(
            ((a := old.get(k)) is None or old_entry[a[_NHID]] != entries[i]
             for k, i in zip(keys, ids, strict=True)), bool, len(keys))
        return RouteRows(rows.family, rows.addrs[stale], rows.lens[stale], rows.ids[stale],
                         entries)

    def _reserve_ids(self, obj_fp: dict[int, int], inline: dict[tuple[Nexthop, ...], list[int]],
                     old_objs: dict[int, NexthopObject], snapshot: Snapshot,
                     stale: set[int]) -> None:
        """Carry fast-path ids over a resync for objects that still exist unchanged in kind.

        ``stale`` are the ids the maps hold: those not carried over are deleted
        by this resync's diff, and not handed to anything new before.
        """
        alive = {o.id: o for o in snapshot.nexthops}
        used: set[int] = set()
        for kid, fid in obj_fp.items():
            new = alive.get(kid)
            old = old_objs.get(kid)
            if new is not None and old is not None and new.is_group == old.is_group:
                self._obj_fp[kid] = fid
                used.add(fid)
        for paths, (fid, is_group, _) in inline.items():
            self._inline[paths] = [fid, is_group, 0]
            used.add(fid)
        top = max(used | stale, default=self.first_id - 1)
        self._ids = itertools.count(top + 1)
        self._free_ids = sorted(set(range(self.first_id, top + 1)) - used - stale, reverse=True)
        self._released = sorted(stale - used)

    def apply(self, changes: Iterable[Change]) -> None:
        for change in changes:
            self.stats["changes"] += 1
            obj: KernelObject = change.obj
            if isinstance(obj, Route):
                if change.op is Op.ADD:
                    self._add_route(obj, change.nlflags)
                else:
                    self._del_route(obj)
            elif isinstance(obj, Neighbour):
                self._set_neighbour(obj, change.op)
            elif isinstance(obj, NexthopObject):
                if change.op is Op.ADD:
                    self._set_nh_object(obj)
                else:
                    self._del_nh_object(obj.id)
            elif isinstance(obj, Link):
                self._set_link(obj, change.op)
            elif isinstance(obj, Address):
                self._set_address(obj, change.op)
            else:
                self.stats["ignored"] += 1
        self._drop_unused_inline()

    def take_diff(self) -> FastPathDiff:
        diff, self.diff = self.diff, FastPathDiff()
        self._free_ids.extend(self._released)
        self._released.clear()
        return diff

    # ----------------------------------------------------------------- routes

    def _store(self, prefix: Prefix, routes: list[Route]) -> None:
        """Set the routes of a prefix, keeping the link and nexthop-object indexes."""
        old = self.routes.get(prefix)
        if old:
            old_links, new_links = _links_of(old), _links_of(routes)
            for ifindex in old_links - new_links:
                _unindex(self._prefixes_by_link, ifindex, prefix)
            for ifindex in new_links - old_links:
                self._prefixes_by_link[ifindex].add(prefix)
            old_ids = {r.nhid for r in old if r.nhid}
            new_ids = {r.nhid for r in routes if r.nhid}
            for nhid in old_ids - new_ids:
                _unindex(self._prefixes_by_nhid, nhid, prefix)
            for nhid in new_ids - old_ids:
                self._prefixes_by_nhid[nhid].add(prefix)
        else:
            # the common case (a new prefix, every route of a dump): index it all
            for r in routes:
                if r.nhid:
                    self._prefixes_by_nhid[r.nhid].add(prefix)
                else:
                    for n in r.nexthops:
                        self._prefixes_by_link[n.ifindex].add(prefix)
        if routes:
            self.routes[prefix] = routes
        else:
            self.routes.pop(prefix, None)

    def _add_route(self, route: Route, nlflags: int) -> None:
        if not self.filter.follows(route):
            self.stats["ignored"] += 1
            return
        self._promote(route.prefix)
        held = self.routes.get(route.prefix)
        if not held:
            routes = [route]
        else:
            routes = list(held)
            same = [i for i, r in enumerate(routes) if r.key == route.key]
            if route.prefix.family == AF_INET6:
                self._add_route6(routes, same, route, nlflags)
            else:
                self._add_route4(routes, same, route, nlflags)
        self._store(route.prefix, routes)
        self._refresh_prefix(route.prefix)

    @staticmethod
    def _add_route4(routes: list[Route], same: list[int], route: Route, nlflags: int) -> None:
        """IPv4 keeps aliases under one key (table, prefix, TOS, metric), seen on 6.18.

        A replace takes the first alias; an append (NLM_F_APPEND) goes after
        the others, a prepend (NLM_F_CREATE alone) before them, and a dump
        lists them in the kernel's order.
        """
        if not same:
            routes.append(route)
            return
        held = next((i for i in same if _same_entry(routes[i], route)), None)
        if held is not None:
            # a route we hold, announced again: the kernel refuses a replace that
            # would duplicate an alias, so this is a replayed event, or a route
            # over a replaced object (nexthop_compat_mode=1 announces those again)
            routes[held] = route
        elif nlflags & NLM_F_REPLACE:
            routes[same[0]] = route
        elif nlflags & NLM_F_APPEND or not nlflags:
            routes.insert(same[-1] + 1, route)
        else:
            routes.insert(same[0], route)

    @staticmethod
    def _add_route6(routes: list[Route], same: list[int], route: Route, nlflags: int) -> None:
        """IPv6 keeps several routes under one key (table, prefix, metric), seen on 6.18.

        Gateway routes join as ECMP siblings: one entry, and an append arrives
        with every sibling. Routes that cannot be siblings (via a link only,
        via a nexthop object, blackholes and other types) stay entries of
        their own beside it when appended. A replace takes the first entry of
        its own kind (the whole sibling set for a gateway route), else the
        first entry there is.
        """
        ecmp = _ecmp6(route)
        # a route we hold, announced again, stays where it is (see _add_route4)
        target = next((i for i in same if _same_entry(routes[i], route)), None)
        if target is None and nlflags & NLM_F_REPLACE:
            target = next((i for i in same if _ecmp6(routes[i]) == ecmp), same[0] if same else None)
        elif target is None and ecmp:
            target = next((i for i in same if _ecmp6(routes[i])), None)
            if target is not None:
                route = _with_nexthops(route, _merge_paths(routes[target].nexthops,
                                                           route.nexthops))
        if target is None:
            routes.append(route)
        else:
            routes[target] = route

    def _del_route(self, route: Route) -> None:
        if not self.filter.follows(route):
            return  # nothing held can match it (and a compact route stays compact)
        self._promote(route.prefix)
        routes = list(self.routes.get(route.prefix, ()))
        same = [i for i, r in enumerate(routes) if r.key == route.key]
        if not same:
            return
        if route.prefix.family == AF_INET:
            # the delete names the alias it took (the first one when asked for none)
            del routes[next((i for i in same if _same_entry(routes[i], route)), same[0])]
        else:
            gone = {_path_id(n) for n in route.nexthops}
            for i in same:
                old = routes[i]
                if old.nhid or route.nhid:
                    if old.nhid != route.nhid:
                        continue
                elif old.type != route.type or (
                        gone and not gone & {_path_id(n) for n in old.nexthops}):
                    continue
                rest = tuple(n for n in old.nexthops if _path_id(n) not in gone)
                if rest and gone and not old.nhid:
                    # sibling by sibling: the route lives on with the others
                    routes[i] = _with_nexthops(old, rest)
                else:
                    del routes[i]
                break
            else:
                return
        self._store(route.prefix, routes)
        self._refresh_prefix(route.prefix)

    def _best(self, prefix: Prefix) -> list[Route]:
        """The routes the kernel chooses among: local table first, then the lowest metric."""
        routes = self.routes.get(prefix)
        if not routes or len(routes) == 1:
            return routes or []
        pool = [r for r in routes if r.table == RT_TABLE_LOCAL] or routes
        top = min(pool, key=lambda r: (r.tos != 0, r.metric))
        return [r for r in pool if r.metric == top.metric and r.tos == top.tos]

    def _promote(self, prefix: Prefix) -> None:
        """Turn a compact route into a ``Route`` of the general structures, before a change.

        Nothing changes for the maps: its entry was the object's, and stays.
        """
        compact = self._compact[prefix.family]
        if not compact:
            return
        attrs = compact.pop(_compact_key(prefix), None)
        if attrs is None:
            return
        table, rtype, protocol, scope, metric, tos, nhid, flags = attrs
        self._forget_compact_user(nhid)
        self.routes[prefix] = [Route(prefix, table, _ROUTE_TYPES[rtype], protocol, scope, metric,
                                     tos, (), nhid, 0, flags)]
        self._prefixes_by_nhid[nhid].add(prefix)
        self._fib[prefix] = self._nhid_entry(nhid)
        self._path_of_prefix[prefix] = nhid

    def _forget_compact_user(self, nhid: int) -> None:
        self._compact_users[nhid] -= 1
        if not self._compact_users[nhid]:
            del self._compact_users[nhid]

    def _compact_via(self, nhids: set[int]) -> list[tuple[int, int]]:
        """(family, key) of the compact routes over these nexthop objects: a scan of the
        table, done only when some exist (an object deleted or changed in kind)."""
        if not any(n in self._compact_users for n in nhids):
            return []
        return [(family, key) for family, compact in self._compact.items()
                for key, attrs in compact.items() if attrs[_NHID] in nhids]

    def _refresh_prefix(self, prefix: Prefix) -> None:
        best = self._best(prefix)
        old = self._fib.get(prefix)
        old_path = self._path_of_prefix.get(prefix)
        new_path: PathKey | None = None
        if not best:
            entry = None
        elif best[0].tos or (len(self.routes[prefix]) > 1
                             and any(r.tos for r in self.routes[prefix])):
            # the fast path does not match on TOS: let the kernel's lookup decide
            entry = _FIB
        elif len(best) > 1 and (len({r.type for r in best}) > 1
                                or best[0].type == RouteType.UNICAST):
            # IPv6 entries or IPv4 aliases side by side: the kernel picks one per
            # lookup (IPv6 by neighbour state and round robin, IPv4 the first
            # alias with a live path); only its own lookup can do the same
            entry = _FIB
        else:
            entry, new_path = self._entry_for(best[0])
        if new_path != old_path:
            if new_path is not None:
                self._use_path(new_path, prefix)
            else:
                del self._path_of_prefix[prefix]
            if isinstance(old_path, tuple):
                self._inline[old_path][2] -= 1
        if entry is None:
            if old is not None:
                del self._fib[prefix]
                self.diff.routes[prefix] = None
        elif entry != old:
            self._fib[prefix] = entry
            self.diff.routes[prefix] = entry

    def _entry_for(self, route: Route) -> tuple[FpRoute, PathKey | None]:
        rtype = route.type
        if route.nhid and rtype == RouteType.BLACKHOLE:
            # the kernel reports a route over a blackhole object as a blackhole route,
            # and as unicast again once the object has a gateway: the object decides
            rtype = RouteType.UNICAST
        if rtype in _KERNEL_ENTRY:
            return _KERNEL_ENTRY[rtype], None
        if rtype == RouteType.BLACKHOLE:
            return _DROP, None
        if rtype != RouteType.UNICAST:
            return _FIB, None
        if route.nhid:
            return self._nhid_entry(route.nhid), route.nhid
        paths = tuple(n for n in route.nexthops if not n.flags & RTNH_F_DEAD)
        if not paths or any(n.encap for n in paths):
            # nothing alive, or the kernel adds headers (MPLS, SRv6) we do not
            return _FIB, None
        fid, is_group = self._intern(paths)
        return _forward(fid, bool(is_group)), paths

    def _nhid_entry(self, nhid: int) -> FpRoute:
        """The entry of a unicast route over a nexthop object (cached per object)."""
        entry = self._obj_entry.get(nhid)
        if entry is None:
            entry = self._obj_entry[nhid] = self._object_entry(nhid)
        return entry

    def _object_entry(self, nhid: int) -> FpRoute:
        obj = self.nh_objects.get(nhid)
        if obj is None:
            return _FIB
        if self._obj_blackhole(obj):
            return _DROP
        if self._obj_encap(obj):
            return _FIB
        return _forward(self._obj_fp[obj.id], obj.is_group)

    def _use_path(self, path: PathKey, prefix: Prefix) -> None:
        self._path_of_prefix[prefix] = path
        if isinstance(path, tuple):
            self._inline[path][2] += 1

    # --------------------------------------------------------- fast-path ids

    def _alloc_id(self) -> int:
        return self._free_ids.pop() if self._free_ids else next(self._ids)

    def _intern(self, paths: tuple[Nexthop, ...]) -> tuple[int, int]:
        entry = self._inline.get(paths)
        if entry is not None and (entry[0] in self._fp_nexthops or entry[0] in self._fp_groups):
            return entry[0], entry[1]
        if entry is None:
            fid = self._alloc_id()
            is_group = int(len(paths) > 1)
            entry = self._inline[paths] = [fid, is_group, 0]
        fid, is_group = entry[0], entry[1]
        if is_group:
            members = []
            for p in paths:
                mid, _ = self._intern((p,))
                self._inline[(p,)][2] += 1
                members.append((mid, p.weight))
            self._set_group(fid, tuple(members))
        else:
            p = paths[0]
            self._set_fp_nexthop(fid, p.ifindex, p.gateway_family or 0, p.gateway)
        return fid, is_group

    def _drop_unused_inline(self) -> None:
        for paths in [p for p, e in self._inline.items() if e[2] <= 0 and len(p) > 1]:
            fid = self._inline.pop(paths)[0]
            if fid in self._group_members:
                for p in paths:
                    self._inline[(p,)][2] -= 1
            self._del_group(fid)
            self._released.append(fid)
        for paths in [p for p, e in self._inline.items() if e[2] <= 0]:
            fid = self._inline.pop(paths)[0]
            self._del_fp_nexthop(fid)
            self._released.append(fid)

    # ------------------------------------------------------ nexthop objects

    def _set_nh_object(self, obj: NexthopObject) -> None:
        self._obj_entry.clear()
        old = self.nh_objects.get(obj.id)
        self.nh_objects[obj.id] = obj
        self._index_object(old, obj)
        if old is not None and old.is_group != obj.is_group:
            self._forget_obj_fp(obj.id, old)
        fid = self._obj_fp.get(obj.id)
        if fid is None:
            fid = self._obj_fp[obj.id] = self._alloc_id()
        if obj.is_group:
            members = tuple((self._obj_fp[m], w) for m, w in obj.group if m in self._obj_fp)
            self._set_group(fid, members)
        elif not obj.blackhole:
            self._set_fp_nexthop(fid, obj.ifindex, obj.family, obj.gateway)
        else:
            self._del_fp_nexthop(fid)
        # the route entry itself changes only when the kind of object does (or it is new:
        # routes may have been waiting for it); otherwise the object's map entry is enough
        if (old is None or old.blackhole != obj.blackhole or old.is_group != obj.is_group
                or old.encap != obj.encap or old.group != obj.group):
            affected = {obj.id}
            if old is not None and not obj.is_group:
                # a group of blackholes drops, a group with encapsulation goes to the kernel
                affected |= self._groups_by_member.get(obj.id, set())
            for nhid in affected:
                for prefix in list(self._prefixes_by_nhid.get(nhid, ())):
                    self._refresh_prefix(prefix)
            for family, key in self._compact_via(affected):
                nhid = self._compact[family][key][_NHID]
                self.diff.routes[_compact_prefix(family, key)] = self._nhid_entry(nhid)

    def _index_object(self, old: NexthopObject | None, new: NexthopObject | None) -> None:
        if old is not None:
            if old.ifindex and not old.is_group:
                _unindex(self._objects_by_link, old.ifindex, old.id)
            for member, _ in old.group:
                _unindex(self._groups_by_member, member, old.id)
        if new is not None:
            if new.ifindex and not new.is_group:
                self._objects_by_link[new.ifindex].add(new.id)
            for member, _ in new.group:
                self._groups_by_member[member].add(new.id)

    def _obj_blackhole(self, obj: NexthopObject) -> bool:
        if not obj.is_group:
            return obj.blackhole
        members = [self.nh_objects.get(m) for m, _ in obj.group]
        return all(m is not None and m.blackhole for m in members)

    def _obj_encap(self, obj: NexthopObject) -> bool:
        if obj.encap:
            return True
        return any(m in self.nh_objects and self.nh_objects[m].encap for m, _ in obj.group)

    def _forget_obj_fp(self, nhid: int, old: NexthopObject) -> None:
        self._obj_entry.clear()
        fid = self._obj_fp.pop(nhid, None)
        if fid is None:
            return
        if old.is_group:
            self._del_group(fid)
        else:
            self._del_fp_nexthop(fid)
        self._released.append(fid)

    def _del_nh_object(self, nhid: int) -> None:
        """The kernel's removal of a nexthop object, with what it takes along silently.

        Its groups lose it (no RTM_NEWNEXTHOP), a group left empty goes too (no
        RTM_DELNEXTHOP), and so do the routes using either: silently for IPv4,
        and for IPv6 with ``nexthop_compat_mode=0`` (seen on 6.18).
        """
        obj = self.nh_objects.pop(nhid, None)
        if obj is None:
            return
        self._obj_entry.clear()
        self._index_object(obj, None)
        for gid in list(self._groups_by_member.get(nhid, ())):
            group = self.nh_objects.get(gid)
            if group is None:
                continue
            rest = tuple((m, w) for m, w in group.group if m != nhid)
            if rest:
                self._set_nh_object(_with_group(group, rest))
            else:
                self._del_nh_object(gid)
        for prefix in list(self._prefixes_by_nhid.get(nhid, ())):
            self._store(prefix, [r for r in self.routes.get(prefix, ()) if r.nhid != nhid])
            self._refresh_prefix(prefix)
        for family, key in self._compact_via({nhid}):
            del self._compact[family][key]
            self._forget_compact_user(nhid)
            self.diff.routes[_compact_prefix(family, key)] = None
        self._forget_obj_fp(nhid, obj)

    # ------------------------------------------------- fast-path nexthops/groups

    def _set_fp_nexthop(self, fid: int, ifindex: int, family: int, gateway: bytes | None) -> None:
        old_src = self._fp_nh_source.get(fid)
        src = (ifindex, family, gateway)
        if old_src != src:
            if old_src is not None:
                self._unindex_nh(fid, old_src)
            self._fp_nh_source[fid] = src
            self._nh_by_link[ifindex].add(fid)
            if gateway is not None:
                self._nh_by_neigh[(ifindex, family, gateway)].add(fid)
        self._render_nexthop(fid)

    def _unindex_nh(self, fid: int, src: tuple[int, int, bytes | None]) -> None:
        ifindex, family, gateway = src
        _unindex(self._nh_by_link, ifindex, fid)
        if gateway is not None:
            _unindex(self._nh_by_neigh, (ifindex, family, gateway), fid)

    def _render_nexthop(self, fid: int) -> None:
        ifindex, family, gateway = self._fp_nh_source[fid]
        link = self.links.get(ifindex)
        usable = link is not None and link.up
        smac = (link.mac if link and link.mac else ZERO_MAC)[:6].ljust(6, b"\0")
        mtu = min(link.mtu, 0xFFFF) if link else 0
        dmac = ZERO_MAC
        if gateway is None:
            resolved, connected = usable, True
        else:
            connected = False
            n = self.neighbours.get((ifindex, family, gateway))
            resolved = usable and n is not None and n.valid
            if resolved:
                assert n is not None and n.lladdr is not None
                dmac = n.lladdr[:6].ljust(6, b"\0")
            elif usable and (n is None or not n.state & NUD_FAILED):
                # not while FAILED: the kernel gave up (it asks again when a packet
                # or the neigh_miss ring wants it), or it is deleting the entry,
                # which it reports as FAILED first: ask once it is gone
                self.diff.resolve.add((ifindex, family, gateway))
        nh = FpNexthop(ifindex, mtu, resolved, connected, family or AF_INET, smac, dmac,
                       (gateway or b"").ljust(16, b"\0"))
        if self._fp_nexthops.get(fid) != nh:
            self._fp_nexthops[fid] = nh
            self.diff.nexthops[fid] = nh
        for gid in list(self._groups_by_nh.get(fid, ())):
            self._render_group(gid)

    def _del_fp_nexthop(self, fid: int) -> None:
        src = self._fp_nh_source.pop(fid, None)
        if src is not None:
            self._unindex_nh(fid, src)
        if self._fp_nexthops.pop(fid, None) is not None:
            self.diff.nexthops[fid] = None
        for gid in list(self._groups_by_nh.get(fid, ())):
            self._render_group(gid)

    def _set_group(self, gid: int, members: tuple[tuple[int, int], ...]) -> None:
        for mid, _ in self._group_members.get(gid, ()):
            _unindex(self._groups_by_nh, mid, gid)
        self._group_members[gid] = members
        for mid, _ in members:
            self._groups_by_nh[mid].add(gid)
        self._render_group(gid)

    def _render_group(self, gid: int) -> None:
        members = self._group_members.get(gid, ())
        # like the kernel, spread over the paths that can carry traffic
        live = [(m, w) for m, w in members
                if (nh := self._fp_nexthops.get(m)) is not None and nh.resolved]
        known = [(m, w) for m, w in members if m in self._fp_nexthops]
        buckets = weighted_buckets(live or known)
        if not buckets:
            if self._fp_groups.pop(gid, None) is not None:
                self.diff.groups[gid] = None
            return
        group = FpGroup(buckets, tuple(known))
        if self._fp_groups.get(gid) != group:
            self._fp_groups[gid] = group
            self.diff.groups[gid] = group

    def _del_group(self, gid: int) -> None:
        for mid, _ in self._group_members.pop(gid, ()):
            _unindex(self._groups_by_nh, mid, gid)
        if self._fp_groups.pop(gid, None) is not None:
            self.diff.groups[gid] = None

    # ------------------------------------------------ neighbours and links

    def _set_neighbour(self, n: Neighbour, op: Op) -> None:
        old = self.neighbours.get(n.key)
        if op is Op.ADD:
            self.neighbours[n.key] = n
        else:
            self.neighbours.pop(n.key, None)
        was = old.lladdr if old is not None and old.valid else None
        now = n.lladdr if op is Op.ADD and n.valid else None
        if was != now:
            self.diff.neighbours[n.key] = now
        for fid in list(self._nh_by_neigh.get(n.key, ())):
            self._render_nexthop(fid)

    def _set_link(self, link: Link, op: Op) -> None:
        """Follow a link, and replay what the kernel does silently when its state changes.

        Seen on 6.18 (see docs/architecture.md, "Silent changes"):
        - nexthop objects on a link go when it does not carry (admin down, no
          carrier, deleted), with what depends on them (``_del_nh_object``);
        - admin down: IPv4 paths over the link die, routes left without a live
          path go, but the local routes of its addresses stay; IPv6 siblings die;
        - admin up revives dead IPv4 paths; IPv6 ones once the link is ready
          (up, running, with carrier);
        - deleted: every IPv4 route with a path over the link goes, IPv6 loses the paths.
        """
        ifindex = link.ifindex
        old = self.links.get(ifindex)
        was = old.flags if old is not None else 0
        if op is Op.DEL:
            self.links.pop(ifindex, None)
            self._flush_objects(ifindex)
            self._paths_down(ifindex, AF_INET, keep_local=False, unregister=True)
            self._paths_down(ifindex, AF_INET6, keep_local=False, unregister=True)
            for key in [k for k, a in self.addresses.items() if a.ifindex == ifindex]:
                del self.addresses[key]
        else:
            self.links[ifindex] = link
            now = link.flags
            if not _carries(now):
                # not only on the transition: an object may have been created
                # while the kernel saw the carrier back and we did not yet
                # (linkwatch reports it later, or not at all if it goes again)
                self._flush_objects(ifindex)
            if was & IFF_UP and not now & IFF_UP:
                self._paths_down(ifindex, AF_INET, keep_local=True)
                self._paths_down(ifindex, AF_INET6, keep_local=False)
            if now & IFF_UP and not was & IFF_UP:
                self._paths_up(ifindex, AF_INET)
            if _ready(now) and not _ready(was):
                self._paths_up(ifindex, AF_INET6)
        for fid in list(self._nh_by_link.get(ifindex, ())):
            self._render_nexthop(fid)

    def _set_address(self, addr: Address, op: Op) -> None:
        """Follow an address; the last IPv4 one going takes the IPv4 paths over its link.

        Seen on 6.18: removing a link's last IPv4 address kills every IPv4
        path over the link, local ones too, and removes the routes left with no
        live path, without RTM_DELROUTE (nexthop objects stay); adding an IPv4
        address to a link that is up revives them.
        """
        ifindex = addr.ifindex
        if op is Op.ADD:
            self.addresses[addr.key] = addr
            link = self.links.get(ifindex)
            if addr.family == AF_INET and link is not None and link.flags & IFF_UP:
                self._paths_up(ifindex, AF_INET)
            return
        if self.addresses.pop(addr.key, None) is None or addr.family != AF_INET:
            return
        if not any(a.ifindex == ifindex and a.family == AF_INET for a in self.addresses.values()):
            self._paths_down(ifindex, AF_INET, keep_local=False)

    def _flush_objects(self, ifindex: int) -> None:
        for nhid in list(self._objects_by_link.get(ifindex, ())):
            self._del_nh_object(nhid)

    def _paths_down(self, ifindex: int, family: int, keep_local: bool,
                    unregister: bool = False) -> None:
        """Mark the inline paths over a link dead; routes with no live path left go.

        With ``unregister`` (the link is deleted) an IPv4 route with any path
        over it goes whole, and IPv6 routes lose those paths.
        """
        for prefix in list(self._prefixes_by_link.get(ifindex, ())):
            if prefix.family != family:
                continue
            routes = self.routes[prefix]
            keep = []
            for r in routes:
                if r.nhid or not any(n.ifindex == ifindex for n in r.nexthops) or (
                        keep_local and r.type == RouteType.LOCAL):
                    keep.append(r)
                    continue
                if all(n.ifindex == ifindex or n.flags & RTNH_F_DEAD for n in r.nexthops):
                    continue  # no live path left: the route goes
                if unregister:
                    if family == AF_INET:
                        continue
                    hops = tuple(n for n in r.nexthops if n.ifindex != ifindex)
                else:
                    hops = tuple(_dead(n) if n.ifindex == ifindex else n for n in r.nexthops)
                if all(n.flags & RTNH_F_DEAD for n in hops):
                    continue
                keep.append(_with_nexthops(r, hops))
            if keep != routes:
                self._store(prefix, keep)
                self._refresh_prefix(prefix)

    def _paths_up(self, ifindex: int, family: int) -> None:
        """Revive the dead paths over a link (routes that lost every path are gone for good)."""
        for prefix in list(self._prefixes_by_link.get(ifindex, ())):
            if prefix.family != family:
                continue
            routes = self.routes[prefix]
            revived = [
                _with_nexthops(r, tuple(_alive(n) if n.ifindex == ifindex else n
                                        for n in r.nexthops)) if not r.nhid else r
                for r in routes
            ]
            if revived != routes:
                self._store(prefix, revived)
                self._refresh_prefix(prefix)

    # -------------------------------------------------------------- queries

    def fast_path_keys(self) -> tuple[set[int], set[int], set[tuple[int, int, bytes]]]:
        """The nexthop, group and neighbour keys the maps must hold, and nothing else
        (prefixes: ``holds_prefix``)."""
        return (set(self._fp_nexthops), set(self._fp_groups),
                {k for k, n in self.neighbours.items() if n.valid})

    def holds_prefix(self, family: int, addr: bytes, length: int) -> bool:
        """Whether the fast path must hold this prefix (the sweep asks, map key by map key)."""
        if int.from_bytes(addr, "big") << 8 | length in self._compact[family]:
            return True
        return Prefix(family, addr, length) in self._fib

    def rewrite(self, prefix: Prefix) -> None:
        """Put the prefix's entry, and the next hops and group it uses, in the diff
        again, whatever the maps are believed to hold (a repair after an audit)."""
        entry = self.fib.get(prefix)
        self.diff.routes[prefix] = entry
        if entry is None or entry.action is not Action.FORWARD:
            return
        ids = [entry.nh_id]
        if entry.group:
            self.diff.groups[entry.nh_id] = self._fp_groups.get(entry.nh_id)
            ids = [m for m, _ in self._group_members.get(entry.nh_id, ())]
        for fid in ids:
            self.diff.nexthops[fid] = self._fp_nexthops.get(fid)

    def nhids_of(self, prefix: Prefix) -> set[int]:
        """The kernel nexthop objects the followed routes of ``prefix`` use."""
        attrs = self._compact[prefix.family].get(_compact_key(prefix))
        if attrs is not None:
            return {attrs[_NHID]}
        return {r.nhid for r in self.routes.get(prefix, ()) if r.nhid}

    def objects_using(self, nhids: Iterable[int]) -> set[int]:
        """These nexthop objects and the groups that hold any of them."""
        out = set(nhids)
        for nhid in list(out):
            out |= self._groups_by_member.get(nhid, set())
        return out

    def counts(self) -> dict[str, int]:
        v4 = sum(1 for p in self._fib if p.family == AF_INET)
        return {
            "routes_v4": v4 + len(self._compact[AF_INET]),
            "routes_v6": len(self._fib) - v4 + len(self._compact[AF_INET6]),
            "nexthops": len(self._fp_nexthops),
            "groups": len(self._fp_groups),
            "neighbours": sum(1 for n in self.neighbours.values() if n.valid),
            "links": len(self.links),
            "nexthop_objects": len(self.nh_objects),
        }


def weighted_buckets(members: list[tuple[int, int]], size: int = GROUP_BUCKETS
                     ) -> tuple[int, ...]:
    """Spread ``size`` buckets over members in proportion to their weights.

    Largest-remainder rounding, every member at least one bucket; buckets are
    dealt by smooth weighted round-robin so that shares interleave.
    """
    if not members:
        return ()
    if len(members) == 1:
        return (members[0][0],)
    members = members[:size]
    total = sum(max(w, 1) for _, w in members)
    exact = [size * max(w, 1) / total for _, w in members]
    counts = [max(1, int(e)) for e in exact]
    ranked = sorted(range(len(members)), key=lambda k: counts[k] - exact[k])
    while sum(counts) > size:  # clamped members took buckets: take them back from the richest
        k = next(k for k in reversed(ranked) if counts[k] > 1)
        counts[k] -= 1
        ranked = sorted(range(len(members)), key=lambda k: counts[k] - exact[k])
    for k in ranked[: size - sum(counts)]:
        counts[k] += 1
    out = []
    current = [0] * len(members)
    for _ in range(size):
        for k, c in enumerate(counts):
            current[k] += c
        k = max(range(len(members)), key=lambda j: current[j])
        current[k] -= size
        out.append(members[k][0])
    return tuple(out)


def _with_nexthops(route: Route, nexthops: tuple[Nexthop, ...]) -> Route:
    return replace(route, nexthops=nexthops)


def _with_group(obj: NexthopObject, group: tuple[tuple[int, int], ...]) -> NexthopObject:
    return replace(obj, group=group)


def _dead(n: Nexthop) -> Nexthop:
    return replace(n, flags=n.flags | RTNH_F_DEAD)


def _ecmp6(route: Route) -> bool:
    """An IPv6 route that can be an ECMP sibling (rt6_qualify_for_ecmp): via gateways only."""
    return (route.type == RouteType.UNICAST and not route.nhid and bool(route.nexthops)
            and route.protocol != RTPROT_RA
            and all(n.gateway is not None for n in route.nexthops))


def _same_entry(a: Route, b: Route) -> bool:
    """One kernel route? Over a nexthop object, the object is its identity (the
    reported type follows the object: blackhole or unicast)."""
    if a.nhid or b.nhid:
        return a.nhid == b.nhid
    return a.type == b.type and \
        {_path_id(n) for n in a.nexthops} == {_path_id(n) for n in b.nexthops}


def _links_of(routes: Iterable[Route]) -> set[int]:
    """Links that inline paths of these routes run over (nexthop objects are indexed apart)."""
    return {n.ifindex for r in routes if not r.nhid for n in r.nexthops}


def _unindex(index: dict[Any, set[Any]], key: Any, value: Any) -> None:
    users = index.get(key)
    if users is not None:
        users.discard(value)
        if not users:
            del index[key]


def _path_id(n: Nexthop) -> tuple[int, bytes | None]:
    """What the kernel matches a path by when it deletes one: link and gateway."""
    return (n.ifindex, n.gateway)


def _merge_paths(old: tuple[Nexthop, ...], new: tuple[Nexthop, ...]) -> tuple[Nexthop, ...]:
    """Old paths in their order, updated by the new message, then the paths it adds."""
    fresh = {_path_id(n): n for n in new}
    merged = [fresh.pop(_path_id(n), n) for n in old]
    return tuple(merged) + tuple(fresh.values())


def _carries(flags: int) -> bool:
    """A link that nexthop objects may use: up, with carrier (RUNNING or LOWER_UP)."""
    return bool(flags & IFF_UP) and bool(flags & (IFF_RUNNING | IFF_LOWER_UP))


def _ready(flags: int) -> bool:
    """IPv6's "link ready" (addrconf_link_ready): operationally up, and a live qdisc.

    The qdisc is live only once the link has carrier: right after an admin up
    without carrier the kernel may still report RUNNING (the operstate is
    updated later), but IPv6 does not count the link as ready.
    """
    return flags & (IFF_UP | IFF_RUNNING | IFF_LOWER_UP) == IFF_UP | IFF_RUNNING | IFF_LOWER_UP


def _alive(n: Nexthop) -> Nexthop:
    return replace(n, flags=n.flags & ~RTNH_F_DEAD) if n.flags & RTNH_F_DEAD else n


__all__ = ["AF_INET6", "Action", "FastPathDiff", "FibView", "Filter", "FpGroup", "FpNexthop",
           "FpRoute", "Rib", "RouteRows", "weighted_buckets"]
