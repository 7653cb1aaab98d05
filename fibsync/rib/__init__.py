"""The kernel mirror: what the kernel holds, and the fast-path entry for each prefix.

The RIB takes decoded netlink state (a full ``Snapshot`` after a dump, then
ordered ``Change`` batches) and keeps a copy of the kernel's routes, nexthop
objects, neighbours, links and addresses. From that copy it derives the
fast-path state the XDP program reads, and records what changed in a
``FastPathDiff`` for the map writer. It never touches a socket or a map.

``Rib`` is a thin front over small parts, one job each:

- ``kernel.py``: the kernel side (``KernelState``) and the rules the kernel
  applies without telling anyone; ``routes.py``: how the kernel keeps the
  routes of one prefix;
- ``compact.py``: the compact store of a full table's common routes;
- ``choice.py``: the choice of a prefix's fast-path entry, a pure function of
  its routes;
- ``entries.py``: fast-path ids, interned paths and entries (``FpTable``),
  which own the diff;
- ``types.py``: what the writer imports (``Action``, the ``Fp*`` entries,
  ``FastPathDiff``, ``RouteRows``) and the route ``Filter``.

Changes flow one way: the front hands each change to the kernel side, which
reports what it changed to the ``FpTable`` (its ``KernelWatcher``), which
chooses the entries and records the diff.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

from ..model import (
    AF_INET,
    AF_INET6,
    Address,
    Change,
    KernelObject,
    Link,
    Neighbour,
    NexthopObject,
    Op,
    Prefix,
    Route,
    RouteColumns,
    Snapshot,
)
from .choice import FIB
from .compact import likely_rows
from .entries import FpTable, weighted_buckets
from .kernel import KernelState
from .types import (
    GROUP_BUCKETS,
    Action,
    FastPathDiff,
    Filter,
    FpGroup,
    FpNexthop,
    FpRoute,
    RouteRows,
)


class EntryView(Mapping[Prefix, FpRoute]):
    """Every prefix's fast-path entry, the general and the compact ones alike."""

    def __init__(self, rib: Rib) -> None:
        self._rib = rib

    def __getitem__(self, prefix: Prefix) -> FpRoute:
        table = self._rib.table
        entry = table.entries.get(prefix)
        if entry is None:
            nhid = self._rib.kernel.compact.nhid(prefix)
            if nhid is None:
                raise KeyError(prefix)
            entry = table.nhid_entry(nhid)
        return entry

    def __iter__(self) -> Iterator[Prefix]:
        yield from self._rib.table.entries
        yield from self._rib.kernel.compact

    def __len__(self) -> int:
        return len(self._rib.table.entries) + len(self._rib.kernel.compact)


@dataclass
class _Begun:
    """A resync begun before its dump had its routes (``Rib.prepare``): the fresh
    kernel side and table, and what they were begun from."""

    snapshot: Snapshot
    old: FpTable
    use_neigh: bool
    changes: int
    kernel: KernelState
    table: FpTable


class Rib:
    def __init__(self, filter: Filter | None = None, first_id: int = 1) -> None:
        self.filter = filter or Filter()
        # ids below first_id belong to entries a previous run left in the maps
        self.first_id = first_id
        self.stats = {"changes": 0, "ignored": 0, "resyncs": 0}
        # links applied: what follows the links (Fidelity's `ifaces` entries) compares
        # it before and after a batch (a resync replaces them all anyway)
        self.link_changes = 0
        self.use_neigh = False  # net.ipv4.fib_multipath_use_neigh
        self.kernel, self.table = self._fresh()
        self._begun: _Begun | None = None

    def _fresh(self) -> tuple[KernelState, FpTable]:
        kernel = KernelState()
        table = FpTable(kernel, self.first_id, self.use_neigh)
        kernel.watcher = table
        return kernel, table

    # the kernel side, as the rest of fibsync reads it
    @property
    def routes(self) -> dict[Prefix, list[Route]]:
        return self.kernel.routes

    @property
    def links(self) -> dict[int, Link]:
        return self.kernel.links

    def link_macs(self) -> dict[int, bytes]:
        """ifindex -> Ethernet address of every link the kernel announced (zeros for
        one that has none), as the mirror holds them: no syscall."""
        return {i: link.ethernet_mac for i, link in self.kernel.links.items()}

    @property
    def addresses(self) -> dict[tuple[int, int, bytes, int], Address]:
        return self.kernel.addresses

    @property
    def neighbours(self) -> dict[tuple[int, int, bytes], Neighbour]:
        return self.kernel.neighbours

    @property
    def nh_objects(self) -> dict[int, NexthopObject]:
        return self.kernel.nh_objects

    @property
    def entries(self) -> EntryView:
        """Prefix -> fast-path entry, for every prefix the fast path holds."""
        return EntryView(self)

    # ------------------------------------------------------------------ input

    def prepare(self, snapshot: Snapshot) -> Callable[[RouteColumns], RouteRows]:
        """Begin the resync of a dump that has everything but its routes yet: the
        kernel side and the ids of its nexthop objects, which ``resync`` of the same
        snapshot goes on from (the mirror itself is untouched). Returns the rows a
        part of the route dump most likely gives (``compact.likely_rows``): it may
        run in another thread while the dump goes on."""
        kernel, table = self._fresh_from(snapshot)
        self._begun = _Begun(snapshot, self.table, self.use_neigh, self.stats["changes"],
                             kernel, table)
        entries = {o.id: table.nhid_entry(o.id) for o in snapshot.nexthops}
        follow = self.filter

        def rows_of(part: RouteColumns) -> RouteRows:
            return likely_rows(part, follow, lambda nhid: entries.get(nhid, FIB))

        return rows_of

    def _begin(self, snapshot: Snapshot) -> tuple[KernelState, FpTable]:
        """The fresh kernel side and table of a resync: those ``prepare`` made, when
        nothing they were made from has changed since."""
        begun, self._begun = self._begun, None
        if begun is not None and begun.snapshot is snapshot and begun.old is self.table \
                and begun.use_neigh == self.use_neigh and begun.changes == self.stats["changes"]:
            return begun.kernel, begun.table
        return self._fresh_from(snapshot)

    def _fresh_from(self, snapshot: Snapshot) -> tuple[KernelState, FpTable]:
        """A fresh kernel side with the snapshot's links, addresses, neighbours and
        nexthop objects, and a table that takes over the current one's ids."""
        kernel, table = self._fresh()
        table.take_over(self.table, snapshot)
        kernel.load(snapshot)
        return kernel, table

    def resync(self, snapshot: Snapshot) -> None:
        """Replace the whole mirror by a fresh dump: mark and sweep.

        The fast-path entries that are still right keep their ids and are not
        rewritten; only what differs reaches the diff, so the maps never lose a
        valid entry during a resync.
        """
        self.stats["resyncs"] += 1
        old = self.table
        self.kernel, self.table = self._begin(snapshot)
        rows = self._add_routes(snapshot)
        self.table.settle()
        self.table.diff_from(old, rows)

    def _add_routes(self, snapshot: Snapshot) -> list[RouteRows]:
        """A dump's routes: the compact ones at once, the others one by one in dump
        order. Returns the compact rows, for the diff."""
        if not snapshot.route_columns:
            for route in snapshot.routes:
                self._add_route(route, 0)
            return []
        general, rows, ignored = self.kernel.compact.load(snapshot, self.filter,
                                                          self.table.nhid_entry)
        self.stats["ignored"] += ignored
        for route in general:
            self._add_route(route, 0)
        return rows

    def apply(self, changes: Iterable[Change]) -> None:
        kernel = self.kernel
        for change in changes:
            self.stats["changes"] += 1
            obj: KernelObject = change.obj
            if isinstance(obj, Route):
                if change.op is Op.ADD:
                    self._add_route(obj, change.nlflags)
                elif self.filter.follows(obj):
                    # (one not followed matches nothing held, and a compact route stays)
                    kernel.del_route(obj)
            elif isinstance(obj, Neighbour):
                kernel.set_neighbour(obj, change.op)
            elif isinstance(obj, NexthopObject):
                if change.op is Op.ADD:
                    kernel.set_nh_object(obj)
                else:
                    kernel.del_nh_object(obj.id)
            elif isinstance(obj, Link):
                kernel.set_link(obj, change.op)
                self.link_changes += 1
            elif isinstance(obj, Address):
                kernel.set_address(obj, change.op)
            else:
                self.stats["ignored"] += 1
        self.table.settle()

    def _add_route(self, route: Route, nlflags: int) -> None:
        if not self.filter.follows(route):
            self.stats["ignored"] += 1
            return
        self.kernel.add_route(route, nlflags)

    def set_multipath_use_neigh(self, on: bool) -> bool:
        """Follow net.ipv4.fib_multipath_use_neigh (no netlink event announces it);
        True when it changed, and the groups it decides for are in the diff."""
        self.use_neigh = on
        return self.table.set_use_neigh(on)

    def take_diff(self) -> FastPathDiff:
        return self.table.take_diff()

    # -------------------------------------------------------------- queries

    def fast_path_keys(self) -> tuple[set[int], set[int], set[tuple[int, int, bytes]]]:
        """The nexthop, group and neighbour keys the maps must hold, and nothing else
        (prefixes: ``holds_prefix``)."""
        return (set(self.table.nexthops), set(self.table.groups),
                {k for k, n in self.kernel.neighbours.items() if n.valid})

    def holds_prefix(self, family: int, addr: bytes, length: int) -> bool:
        """Whether the fast path must hold this prefix (the sweep asks, map key by map key)."""
        if self.kernel.compact.holds(family, addr, length):
            return True
        return Prefix(family, addr, length) in self.table.entries

    def rewrite(self, prefix: Prefix) -> None:
        """Put the prefix's entry, and the next hops and group it uses, in the diff
        again, whatever the maps are believed to hold (a repair after an audit)."""
        self.table.rewrite(prefix, self.entries.get(prefix))

    def nhids_of(self, prefix: Prefix) -> set[int]:
        """The kernel nexthop objects the followed routes of ``prefix`` use."""
        return self.kernel.nhids_of(prefix)

    def objects_using(self, nhids: Iterable[int]) -> set[int]:
        """These nexthop objects and the groups that hold any of them."""
        return self.kernel.objects_using(nhids)

    def counts(self) -> dict[str, int]:
        entries = self.table.entries
        compact = self.kernel.compact
        v4 = self.table.v4_entries
        return {
            "routes_v4": v4 + compact.count(AF_INET),
            "routes_v6": len(entries) - v4 + compact.count(AF_INET6),
            "nexthops": len(self.table.nexthops),
            "groups": len(self.table.groups),
            # groups whose path the kernel picks while it may skip one of them
            "groups_by_kernel": sum(1 for g in self.table.groups.values() if not g.buckets),
            "neighbours": sum(1 for n in self.kernel.neighbours.values() if n.valid),
            "links": len(self.kernel.links),
            "nexthop_objects": len(self.kernel.nh_objects),
        }


__all__ = ["GROUP_BUCKETS", "Action", "FastPathDiff", "EntryView", "Filter", "FpGroup",
           "FpNexthop", "FpRoute", "Rib", "RouteRows", "weighted_buckets"]
