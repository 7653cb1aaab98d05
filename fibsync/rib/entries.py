"""The fast path as the maps must hold it: ids, interned paths, entries, and the diff.

Fast-path identities:
- every kernel nexthop object gets a fast-path id of its own, so a change to
  the object is one map write, whatever number of routes use it;
- inline paths (RTA_GATEWAY/RTA_MULTIPATH routes) are interned: routes with
  the same paths share one fast-path nexthop or group, freed with the last user.

``FpTable`` watches the kernel side (``kernel.KernelWatcher``): each change
there becomes the entries it implies (``choice.choose`` for a prefix's
routes), and what changed of them is recorded in ``diff``, coalesced, until
the Rib hands it to the writer (``take_diff``). It reads the kernel side,
never changes it.
"""

from __future__ import annotations

import functools
import itertools
from collections import defaultdict
from collections.abc import Sequence

from ..model import AF_INET, Nexthop, NexthopObject, Prefix, Snapshot
from .choice import (
    Choice,
    PathKey,
    choose,
    forward,
    kernel_picks_path,
    object_entry,
    path_state,
)
from .compact import rows_to_write
from .kernel import KernelState, unindex
from .types import GROUP_BUCKETS, Action, FastPathDiff, FpGroup, FpNexthop, FpRoute, RouteRows

ZERO_MAC = b"\0" * 6


class FpTable:
    """Implements ``kernel.KernelWatcher`` for the ``kernel`` it is built on."""

    def __init__(self, kernel: KernelState, first_id: int, use_neigh: bool = False) -> None:
        self.kernel = kernel
        # ids below first_id belong to entries a previous run left in the maps
        self.first_id = first_id
        # the entry of every prefix of kernel.routes that has one (a compact
        # route's entry is its object's: nhid_entry)
        self.entries: dict[Prefix, FpRoute] = {}
        self.v4_entries = 0  # how many of them are IPv4
        # fast-path nexthops and groups as written, and each group's members
        self.nexthops: dict[int, FpNexthop] = {}
        self.groups: dict[int, FpGroup] = {}
        self.members: dict[int, tuple[tuple[int, int], ...]] = {}
        self.diff = FastPathDiff()
        # net.ipv4.fib_multipath_use_neigh: whether the kernel's ECMP over a route's
        # own paths skips those whose neighbour failed (choice.kernel_picks_path)
        self.use_neigh = use_neigh
        # the groups of nexthop objects (the others are interned inline paths)
        self._object_groups: set[int] = set()
        # the entry of a route via each nexthop object: shared by all its prefixes
        # (one FpRoute object, not one per prefix), dropped when any object changes
        self._obj_entry: dict[int, FpRoute] = {}
        self._obj_entry_version = kernel.nh_objects_version
        self._ids = itertools.count(first_id)
        self._free_ids: list[int] = []
        # ids freed since the last take_diff(): the maps may still hold them, and
        # the writer sets new entries before it deletes old routes, so they are
        # handed on only from the next diff
        self._released: list[int] = []
        # kernel nexthop object id -> fast-path id (nexthop or group id space)
        self._obj_fp: dict[int, int] = {}
        # interned inline paths -> [fast-path id, is group, user count]
        self._inline: dict[tuple[Nexthop, ...], list[int]] = {}
        # interned paths that may have lost their last user since the last settle()
        # (an ordered set: ids are released in a stable order)
        self._unused: dict[tuple[Nexthop, ...], None] = {}
        # what each fast-path nexthop hangs on, and the reverse indexes
        self._nh_source: dict[int, tuple[int, int, bytes | None]] = {}
        self._nh_by_neigh: dict[tuple[int, int, bytes], set[int]] = defaultdict(set)
        self._nh_by_link: dict[int, set[int]] = defaultdict(set)
        self._groups_by_nh: dict[int, set[int]] = defaultdict(set)
        # groups whose members changed state since the last settle(): rendered once
        # there, however many of their paths' neighbours and links changed meanwhile
        self._stale_groups: set[int] = set()
        # what the groups read of each fast-path nexthop (choice.path_state)
        self._nh_state: dict[int, tuple[bool, bool]] = {}
        self._path_of_prefix: dict[Prefix, PathKey] = {}

    # --------------------------------------------------- the kernel's reports

    def routes_changed(self, prefix: Prefix) -> None:
        self._set_entry(prefix, choose(self.kernel.routes.get(prefix)))

    def route_promoted(self, prefix: Prefix, nhid: int) -> None:
        if prefix not in self.entries:
            self._count(prefix, 1)
        self.entries[prefix] = self.nhid_entry(nhid)
        self._path_of_prefix[prefix] = nhid

    def compact_route_changed(self, prefix: Prefix, nhid: int | None) -> None:
        self.diff.routes[prefix] = None if nhid is None else self.nhid_entry(nhid)

    def object_set(self, obj: NexthopObject, old: NexthopObject | None) -> None:
        if old is not None and old.is_group != obj.is_group:
            self._forget_obj_fp(obj.id, old)
        fid = self._obj_fp.get(obj.id)
        if fid is None:
            fid = self._obj_fp[obj.id] = self._alloc_id()
        if obj.is_group:
            self._object_groups.add(fid)
            members = tuple((self._obj_fp[m], w) for m, w in obj.group if m in self._obj_fp)
            self._set_group(fid, members)
        elif not obj.blackhole:
            self._set_fp_nexthop(fid, obj.ifindex, obj.family, obj.gateway)
        else:
            self._del_fp_nexthop(fid)

    def object_deleted(self, obj: NexthopObject) -> None:
        self._forget_obj_fp(obj.id, obj)

    def neighbour_changed(self, key: tuple[int, int, bytes], was: bytes | None,
                          now: bytes | None) -> None:
        if was != now:
            self.diff.neighbours[key] = now
        for fid in list(self._nh_by_neigh.get(key, ())):
            self._render_nexthop(fid)

    def link_changed(self, ifindex: int) -> None:
        for fid in list(self._nh_by_link.get(ifindex, ())):
            self._render_nexthop(fid)

    def set_use_neigh(self, on: bool) -> bool:
        """Follow fib_multipath_use_neigh: the groups of inline paths are chosen
        again (object groups skip failed neighbours whatever it says)."""
        if on == self.use_neigh:
            return False
        self.use_neigh = on
        for gid in [g for g in self.members if g not in self._object_groups]:
            self._render_group(gid)
        return True

    # ---------------------------------------------------------------- entries

    def _set_entry(self, prefix: Prefix, choice: Choice) -> None:
        old = self.entries.get(prefix)
        old_path = self._path_of_prefix.get(prefix)
        new_path: PathKey | None = None
        if choice is None or isinstance(choice, FpRoute):
            entry = choice
        elif isinstance(choice, int):
            entry, new_path = self.nhid_entry(choice), choice
        else:
            fid, is_group = self._intern(choice)
            entry, new_path = forward(fid, bool(is_group)), choice
        if new_path != old_path:
            if new_path is not None:
                self._path_of_prefix[prefix] = new_path
                if isinstance(new_path, tuple):
                    self._inline[new_path][2] += 1
            else:
                del self._path_of_prefix[prefix]
            if isinstance(old_path, tuple):
                self._inline[old_path][2] -= 1
                self._unused[old_path] = None
        if entry is None:
            if old is not None:
                del self.entries[prefix]
                self._count(prefix, -1)
                self.diff.routes[prefix] = None
        elif entry != old:
            if old is None:
                self._count(prefix, 1)
            self.entries[prefix] = entry
            self.diff.routes[prefix] = entry

    def _count(self, prefix: Prefix, delta: int) -> None:
        """Keep ``v4_entries`` (status asks every few seconds: a scan of the entries
        would be a full table's worth where no route uses a nexthop object)."""
        if prefix.family == AF_INET:
            self.v4_entries += delta

    def nhid_entry(self, nhid: int) -> FpRoute:
        """The entry of a unicast route over a nexthop object (cached per object)."""
        if self._obj_entry_version != self.kernel.nh_objects_version:
            self._obj_entry.clear()
            self._obj_entry_version = self.kernel.nh_objects_version
        entry = self._obj_entry.get(nhid)
        if entry is None:
            entry = self._obj_entry[nhid] = object_entry(nhid, self.kernel.nh_objects,
                                                         self._obj_fp)
        return entry

    def rewrite(self, prefix: Prefix, entry: FpRoute | None) -> None:
        """Put the prefix's entry, and the next hops and group it uses, in the diff
        again, whatever the maps are believed to hold."""
        self.diff.routes[prefix] = entry
        if entry is None or entry.action is not Action.FORWARD:
            return
        ids = [entry.nh_id]
        if entry.group:
            self.diff.groups[entry.nh_id] = self.groups.get(entry.nh_id)
            ids = [m for m, _ in self.members.get(entry.nh_id, ())]
        for fid in ids:
            self.diff.nexthops[fid] = self.nexthops.get(fid)

    def take_diff(self) -> FastPathDiff:
        diff, self.diff = self.diff, FastPathDiff()
        self._free_ids.extend(self._released)
        self._released.clear()
        return diff

    # --------------------------------------------------------- fast-path ids

    def _alloc_id(self) -> int:
        return self._free_ids.pop() if self._free_ids else next(self._ids)

    def _intern(self, paths: tuple[Nexthop, ...]) -> tuple[int, int]:
        entry = self._inline.get(paths)
        if entry is not None and (entry[0] in self.nexthops or entry[0] in self.groups):
            return entry[0], entry[1]
        if entry is None:
            fid = self._alloc_id()
            is_group = int(len(paths) > 1)
            entry = self._inline[paths] = [fid, is_group, 0]
            self._unused[paths] = None
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

    def settle(self) -> None:
        """End of a batch of changes: free the interned paths no route uses any
        more, and render the groups whose paths changed (each once)."""
        self._drop_unused_inline()
        stale, self._stale_groups = self._stale_groups, set()
        for gid in stale:
            if gid in self.members:
                self._render_group(gid)

    def _drop_unused_inline(self) -> None:
        candidates, self._unused = self._unused, {}
        singles = {p: None for p in candidates if len(p) == 1}
        for paths in [p for p in candidates if len(p) > 1]:
            entry = self._inline.get(paths)
            if entry is None or entry[2] > 0:
                continue
            fid = self._inline.pop(paths)[0]
            if fid in self.members:
                for p in paths:
                    self._inline[(p,)][2] -= 1
                    singles[(p,)] = None
            self._del_group(fid)
            self._released.append(fid)
        for paths in singles:
            entry = self._inline.get(paths)
            if entry is None or entry[2] > 0:
                continue
            fid = self._inline.pop(paths)[0]
            self._del_fp_nexthop(fid)
            self._released.append(fid)

    def _forget_obj_fp(self, nhid: int, old: NexthopObject) -> None:
        self._obj_entry.clear()
        fid = self._obj_fp.pop(nhid, None)
        if fid is None:
            return
        if old.is_group:
            self._object_groups.discard(fid)
            self._del_group(fid)
        else:
            self._del_fp_nexthop(fid)
        self._released.append(fid)

    # ------------------------------------------------- fast-path nexthops/groups

    def _set_fp_nexthop(self, fid: int, ifindex: int, family: int, gateway: bytes | None) -> None:
        old_src = self._nh_source.get(fid)
        src = (ifindex, family, gateway)
        if old_src != src:
            if old_src is not None:
                self._unindex_nh(fid, old_src)
            self._nh_source[fid] = src
            self._nh_by_link[ifindex].add(fid)
            if gateway is not None:
                self._nh_by_neigh[(ifindex, family, gateway)].add(fid)
        self._render_nexthop(fid)

    def _unindex_nh(self, fid: int, src: tuple[int, int, bytes | None]) -> None:
        ifindex, family, gateway = src
        unindex(self._nh_by_link, ifindex, fid)
        if gateway is not None:
            unindex(self._nh_by_neigh, (ifindex, family, gateway), fid)

    def _render_nexthop(self, fid: int) -> None:
        ifindex, family, gateway = self._nh_source[fid]
        link = self.kernel.links.get(ifindex)
        usable = link is not None and link.up
        smac = (link.mac if link and link.mac else ZERO_MAC)[:6].ljust(6, b"\0")
        mtu = min(link.mtu, 0xFFFF) if link else 0
        dmac = ZERO_MAC
        n = None
        if gateway is None:
            resolved, connected = usable, True
        else:
            connected = False
            n = self.kernel.neighbours.get((ifindex, family, gateway))
            resolved = usable and n is not None and n.valid
            if resolved:
                assert n is not None and n.lladdr is not None
                dmac = n.lladdr[:6].ljust(6, b"\0")
        nh = FpNexthop(ifindex, mtu, resolved, connected, family or AF_INET, smac, dmac,
                       (gateway or b"").ljust(16, b"\0"))
        old = self.nexthops.get(fid)
        if old != nh:
            self.nexthops[fid] = nh
            self.diff.nexthops[fid] = nh
        # its groups are rendered again only when what they read of it changed: that
        # it exists, and what choice.kernel_picks_path judges (not its MAC or MTU)
        state = path_state(link, n, gateway is not None)
        if old is None or self._nh_state.get(fid) != state:
            self._nh_state[fid] = state
            self._stale_groups.update(self._groups_by_nh.get(fid, ()))

    def _del_fp_nexthop(self, fid: int) -> None:
        src = self._nh_source.pop(fid, None)
        if src is not None:
            self._unindex_nh(fid, src)
        self._nh_state.pop(fid, None)
        if self.nexthops.pop(fid, None) is not None:
            self.diff.nexthops[fid] = None
        self._stale_groups.update(self._groups_by_nh.get(fid, ()))

    def _set_group(self, gid: int, members: tuple[tuple[int, int], ...]) -> None:
        for mid, _ in self.members.get(gid, ()):
            unindex(self._groups_by_nh, mid, gid)
        self.members[gid] = members
        for mid, _ in members:
            self._groups_by_nh[mid].add(gid)
        self._render_group(gid)

    def _render_group(self, gid: int) -> None:
        members = self.members.get(gid, ())
        known = tuple([(m, w) for m, w in members if m in self.nexthops])
        if not known:
            if self.groups.pop(gid, None) is not None:
                self.diff.groups[gid] = None
            return
        # Buckets over every path, resolved or not: a bucket whose next hop is
        # unresolved asks bpf_fib_lookup, and the kernel then forwards the packet
        # (resolving the neighbour) or picks another path, as it would have. While
        # the kernel may skip a path, no bucket: every packet asks bpf_fib_lookup.
        # each member's path_state as _render_nexthop keeps it (a group is rendered
        # again whenever one changes): no link or neighbour looked up again here
        state = self._nh_state
        by_kernel = kernel_picks_path([state[m] for m, _ in known],
                                      gid in self._object_groups, self.use_neigh)
        old = self.groups.get(gid)
        if old is not None and old.members == known and old.by_kernel == by_kernel:
            return  # the buckets follow from these two
        group = FpGroup(() if by_kernel else weighted_buckets(known), known)
        if old != group:
            self.groups[gid] = group
            self.diff.groups[gid] = group

    def _del_group(self, gid: int) -> None:
        for mid, _ in self.members.pop(gid, ()):
            unindex(self._groups_by_nh, mid, gid)
        if self.groups.pop(gid, None) is not None:
            self.diff.groups[gid] = None

    # ----------------------------------------------------------------- resync

    def take_over(self, old: FpTable, snapshot: Snapshot) -> None:
        """Start a resync from what ``old`` left in the maps.

        Fast-path ids carry over for the objects that still exist unchanged in
        kind, and for interned paths; the ids the maps hold and that are not
        carried over are deleted by this resync's diff, and not handed to
        anything new before.
        """
        stale = set(old.nexthops) | set(old.groups)
        alive = {o.id: o for o in snapshot.nexthops}
        used: set[int] = set()
        for kid, fid in old._obj_fp.items():
            new = alive.get(kid)
            held = old.kernel.nh_objects.get(kid)
            if new is not None and held is not None and new.is_group == held.is_group:
                self._obj_fp[kid] = fid
                used.add(fid)
        for paths, (fid, is_group, _) in old._inline.items():
            self._inline[paths] = [fid, is_group, 0]
            self._unused[paths] = None
            used.add(fid)
        top = max(used | stale, default=self.first_id - 1)
        self._ids = itertools.count(top + 1)
        self._free_ids = sorted(set(range(self.first_id, top + 1)) - used - stale, reverse=True)
        self._released = sorted(stale - used)

    def diff_from(self, old: FpTable, rows: list[RouteRows]) -> None:
        """The diff at the end of a resync: what the maps must hold now against what
        they held (``old``'s entries), so that an entry still right is not rewritten.
        ``rows``: the compact routes the resync loaded."""
        compact, old_compact = self.kernel.compact, old.kernel.compact
        # compact entries are the objects' entries: those as written
        old_entry = {nhid: old.nhid_entry(nhid) for nhid in old_compact.users}
        diff = self.diff
        diff.nexthops = {k: v for k, v in self.nexthops.items() if old.nexthops.get(k) != v}
        diff.nexthops.update({k: None for k in old.nexthops if k not in self.nexthops})
        diff.groups = {k: v for k, v in self.groups.items() if old.groups.get(k) != v}
        diff.groups.update({k: None for k in old.groups if k not in self.groups})

        def held(prefix: Prefix) -> FpRoute | None:
            entry = old.entries.get(prefix)
            if entry is None:
                nhid = old_compact.nhid(prefix)
                if nhid is not None:
                    entry = old_entry[nhid]
            return entry

        entries = self.entries
        diff.routes = {p: e for p, e in entries.items() if held(p) != e}
        diff.routes.update({p: None for p in old.entries
                            if p not in entries and compact.nhid(p) is None})
        for prefix in old_compact.missing_from(compact):
            if prefix not in entries:
                diff.routes[prefix] = None
        diff.bulk = [rows_to_write(r, old_compact, old_entry) for r in rows]
        old_neigh = old.kernel.neighbours
        new_neigh = {k: n.lladdr for k, n in self.kernel.neighbours.items() if n.valid}
        diff.neighbours = {
            k: mac for k, mac in new_neigh.items()
            if not (k in old_neigh and old_neigh[k].valid and old_neigh[k].lladdr == mac)
        }
        diff.neighbours.update({
            k: None for k, n in old_neigh.items() if n.valid and k not in new_neigh
        })


def weighted_buckets(members: Sequence[tuple[int, int]], size: int = GROUP_BUCKETS
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
    ids = [m for m, _ in members]
    return tuple([ids[k] for k in _bucket_pattern(tuple(max(w, 1) for _, w in members), size)])


@functools.lru_cache(maxsize=4096)
def _bucket_pattern(weights: tuple[int, ...], size: int) -> tuple[int, ...]:
    """The member index of each bucket for these weights (groups share few patterns:
    a storm that re-renders thousands of groups computes each pattern once)."""
    total = sum(weights)
    exact = [size * w / total for w in weights]
    counts = [max(1, int(e)) for e in exact]
    ranked = sorted(range(len(weights)), key=lambda k: counts[k] - exact[k])
    while sum(counts) > size:  # clamped members took buckets: take them back from the richest
        k = next(k for k in reversed(ranked) if counts[k] > 1)
        counts[k] -= 1
        ranked = sorted(range(len(weights)), key=lambda k: counts[k] - exact[k])
    for k in ranked[: size - sum(counts)]:
        counts[k] += 1
    out = []
    current = [0] * len(weights)
    for _ in range(size):
        for k, c in enumerate(counts):
            current[k] += c
        k = max(range(len(weights)), key=lambda j: current[j])
        current[k] -= size
        out.append(k)
    return tuple(out)

