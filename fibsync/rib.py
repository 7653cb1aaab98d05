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

The kernel removes some state without telling anyone (measured on 6.18): when a
link goes administratively down or disappears it flushes the nexthop objects on
it (no RTM_DELNEXTHOP), the groups left empty, and the IPv4 routes using
either or running over the link (no RTM_DELROUTE). ``_link_gone`` replays those
removals so that the mirror stays equal to the kernel.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from enum import IntEnum

from .model import (
    AF_INET,
    AF_INET6,
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
RTNH_F_DEAD = 0x1
IFF_UP = 0x1
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
class FastPathDiff:
    """What the maps must change, coalesced: None means delete."""

    nexthops: dict[int, FpNexthop | None] = field(default_factory=dict)
    groups: dict[int, FpGroup | None] = field(default_factory=dict)
    routes: dict[Prefix, FpRoute | None] = field(default_factory=dict)
    neighbours: dict[tuple[int, int, bytes], bytes | None] = field(default_factory=dict)
    resolve: set[tuple[int, int, bytes]] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.nexthops or self.groups or self.routes or self.neighbours)

    def __len__(self) -> int:
        return len(self.nexthops) + len(self.groups) + len(self.routes) + len(self.neighbours)


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

# A "path set" is what a route forwards over: a kernel nexthop object, or inline paths.
PathKey = int | tuple[Nexthop, ...]


class Rib:
    def _reset(self) -> None:
        self.links: dict[int, Link] = {}
        self.addresses: dict[tuple[int, int, bytes, int], Address] = {}
        self.neighbours: dict[tuple[int, int, bytes], Neighbour] = {}
        self.nh_objects: dict[int, NexthopObject] = {}
        # routes we follow, by prefix: usually one, several with other metrics/tables
        self.routes: dict[Prefix, list[Route]] = {}
        self.fib: dict[Prefix, FpRoute] = {}
        self._ids = itertools.count(self.first_id)
        self._free_ids: list[int] = []
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
        self._prefixes_by_obj: dict[int, set[Prefix]] = defaultdict(set)
        self._path_of_prefix: dict[Prefix, PathKey] = {}
        self.diff = FastPathDiff()

    def __init__(self, filter: Filter | None = None, first_id: int = 1) -> None:
        self.filter = filter or Filter()
        # ids below first_id belong to entries a previous run left in the maps
        self.first_id = first_id
        self.stats = {"changes": 0, "ignored": 0, "resyncs": 0}
        self._reset()

    # ------------------------------------------------------------------ input

    def resync(self, snapshot: Snapshot) -> None:
        """Replace the whole mirror by a fresh dump: mark and sweep.

        The fast-path entries that are still right keep their ids and are not
        rewritten; only what differs reaches the diff, so the maps never lose a
        valid entry during a resync.
        """
        self.stats["resyncs"] += 1
        old_fib = self.fib
        old_objs = self.nh_objects
        old_neigh = self.neighbours
        # keep fast-path ids of surviving objects so that their entries stay put
        keep_obj_fp = self._obj_fp
        keep_inline = self._inline
        keep_fp_nh = self._fp_nexthops
        keep_fp_groups = self._fp_groups
        resolve = self.diff.resolve
        self._reset()
        self.diff.resolve = resolve
        self._reserve_ids(keep_obj_fp, keep_inline, old_objs, snapshot)
        for link in snapshot.links:
            self.links[link.ifindex] = link
        for addr in snapshot.addresses:
            self.addresses[addr.key] = addr
        for n in snapshot.neighbours:
            self.neighbours[n.key] = n
        for obj in sorted(snapshot.nexthops, key=lambda o: o.is_group):
            self._set_nh_object(obj)
        for route in snapshot.routes:
            self._add_route(route, 0)
        self._drop_unused_inline()
        # sweep: compare what the maps held with what they must hold now
        diff = self.diff
        diff.nexthops = {k: v for k, v in self._fp_nexthops.items() if keep_fp_nh.get(k) != v}
        diff.nexthops.update({k: None for k in keep_fp_nh if k not in self._fp_nexthops})
        diff.groups = {k: v for k, v in self._fp_groups.items() if keep_fp_groups.get(k) != v}
        diff.groups.update({k: None for k in keep_fp_groups if k not in self._fp_groups})
        diff.routes = {p: e for p, e in self.fib.items() if old_fib.get(p) != e}
        diff.routes.update({p: None for p in old_fib if p not in self.fib})
        new_neigh = {k: n.lladdr for k, n in self.neighbours.items() if n.valid}
        diff.neighbours = {
            k: mac for k, mac in new_neigh.items()
            if not (k in old_neigh and old_neigh[k].valid and old_neigh[k].lladdr == mac)
        }
        diff.neighbours.update({
            k: None for k, n in old_neigh.items() if n.valid and k not in new_neigh
        })

    def _reserve_ids(self, obj_fp: dict[int, int], inline: dict[tuple[Nexthop, ...], list[int]],
                     old_objs: dict[int, NexthopObject], snapshot: Snapshot) -> None:
        """Carry fast-path ids over a resync for objects that still exist unchanged in kind."""
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
        top = max(used, default=self.first_id - 1)
        self._ids = itertools.count(top + 1)
        self._free_ids = sorted(set(range(self.first_id, top + 1)) - used, reverse=True)

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
                if change.op is Op.ADD:
                    self.addresses[obj.key] = obj
                else:
                    self.addresses.pop(obj.key, None)
            else:
                self.stats["ignored"] += 1
        self._drop_unused_inline()

    def take_diff(self) -> FastPathDiff:
        diff, self.diff = self.diff, FastPathDiff()
        return diff

    # ----------------------------------------------------------------- routes

    def _add_route(self, route: Route, nlflags: int) -> None:
        if not self.filter.follows(route):
            self.stats["ignored"] += 1
            return
        routes = self.routes.setdefault(route.prefix, [])
        for i, old in enumerate(routes):
            if old.key == route.key:
                if (route.prefix.family == AF_INET6 and not nlflags & NLM_F_REPLACE
                        and not route.nhid and not old.nhid):
                    # IPv6 ECMP arrives as siblings: a non-replacing add joins the route
                    merged = old.nexthops + tuple(n for n in route.nexthops
                                                  if n not in old.nexthops)
                    route = _with_nexthops(route, merged)
                routes[i] = route
                break
        else:
            routes.append(route)
        self._refresh_prefix(route.prefix)

    def _del_route(self, route: Route) -> None:
        routes = self.routes.get(route.prefix)
        if not routes:
            return
        for i, old in enumerate(routes):
            if old.key != route.key:
                continue
            rest = tuple(n for n in old.nexthops if n not in route.nexthops)
            if (route.prefix.family == AF_INET6 and route.nexthops and rest
                    and len(rest) < len(old.nexthops)):
                # one IPv6 sibling removed: the route lives on with the others
                routes[i] = _with_nexthops(old, rest)
            else:
                del routes[i]
            break
        else:
            return
        if not routes:
            del self.routes[route.prefix]
        self._refresh_prefix(route.prefix)

    def _best(self, prefix: Prefix) -> Route | None:
        routes = self.routes.get(prefix)
        if not routes:
            return None
        local = [r for r in routes if r.table == RT_TABLE_LOCAL]
        if local:
            return local[0]
        return min(routes, key=lambda r: (r.tos != 0, r.metric))

    def _refresh_prefix(self, prefix: Prefix) -> None:
        best = self._best(prefix)
        old = self.fib.get(prefix)
        old_path = self._path_of_prefix.get(prefix)
        new_path: PathKey | None = None
        if best is None:
            entry = None
        else:
            entry, new_path = self._entry_for(best)
            if any(r.tos for r in self.routes.get(prefix, ())):
                # the fast path does not match on TOS: let the kernel's lookup decide
                entry = FpRoute(Action.FIB)
        if new_path != old_path:
            if new_path is not None:
                self._use_path(new_path, prefix)
            if old_path is not None:
                self._release_path(old_path, prefix)
        if entry is None:
            if old is not None:
                del self.fib[prefix]
                self.diff.routes[prefix] = None
        elif entry != old:
            self.fib[prefix] = entry
            self.diff.routes[prefix] = entry

    def _entry_for(self, route: Route) -> tuple[FpRoute, PathKey | None]:
        rtype = route.type
        if rtype in _KERNEL_REASON:
            return FpRoute(Action.KERNEL, reason=_KERNEL_REASON[rtype]), None
        if rtype == RouteType.BLACKHOLE:
            return FpRoute(Action.DROP), None
        if rtype != RouteType.UNICAST:
            return FpRoute(Action.FIB), None
        if route.nhid:
            obj = self.nh_objects.get(route.nhid)
            if obj is None:
                return FpRoute(Action.FIB), route.nhid
            if obj.blackhole:
                return FpRoute(Action.DROP), route.nhid
            if self._obj_encap(obj):
                return FpRoute(Action.FIB), route.nhid
            return FpRoute(Action.FORWARD, self._obj_fp[obj.id], obj.is_group), route.nhid
        paths = tuple(n for n in route.nexthops if not n.flags & RTNH_F_DEAD)
        if not paths or any(n.encap for n in paths):
            # nothing alive, or the kernel adds headers (MPLS, SRv6) we do not
            return FpRoute(Action.FIB), None
        fid, is_group = self._intern(paths)
        return FpRoute(Action.FORWARD, fid, bool(is_group)), paths

    def _use_path(self, path: PathKey, prefix: Prefix) -> None:
        self._path_of_prefix[prefix] = path
        if isinstance(path, int):
            self._prefixes_by_obj[path].add(prefix)
        else:
            self._inline[path][2] += 1

    def _release_path(self, path: PathKey, prefix: Prefix) -> None:
        if self._path_of_prefix.get(prefix) == path:
            del self._path_of_prefix[prefix]
        if isinstance(path, int):
            users = self._prefixes_by_obj.get(path)
            if users is not None:
                users.discard(prefix)
                if not users:
                    del self._prefixes_by_obj[path]
        else:
            entry = self._inline.get(path)
            if entry is not None:
                entry[2] -= 1

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
            self._free_ids.append(fid)
        for paths in [p for p, e in self._inline.items() if e[2] <= 0]:
            fid = self._inline.pop(paths)[0]
            self._del_fp_nexthop(fid)
            self._free_ids.append(fid)

    # ------------------------------------------------------ nexthop objects

    def _set_nh_object(self, obj: NexthopObject) -> None:
        old = self.nh_objects.get(obj.id)
        self.nh_objects[obj.id] = obj
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
                or old.encap != obj.encap):
            for prefix in list(self._prefixes_by_obj.get(obj.id, ())):
                self._refresh_prefix(prefix)

    def _obj_encap(self, obj: NexthopObject) -> bool:
        if obj.encap:
            return True
        return any(m in self.nh_objects and self.nh_objects[m].encap for m, _ in obj.group)

    def _forget_obj_fp(self, nhid: int, old: NexthopObject) -> None:
        fid = self._obj_fp.pop(nhid, None)
        if fid is None:
            return
        if old.is_group:
            self._del_group(fid)
        else:
            self._del_fp_nexthop(fid)
        self._free_ids.append(fid)

    def _del_nh_object(self, nhid: int) -> None:
        obj = self.nh_objects.pop(nhid, None)
        if obj is None:
            return
        fid = self._obj_fp.get(nhid)
        # the kernel removes a deleted member from its groups, and empty groups with it
        if fid is not None and not obj.is_group:
            for gid in list(self._groups_by_nh.get(fid, ())):
                kernel_gid = next((k for k, v in self._obj_fp.items() if v == gid), None)
                if kernel_gid is None:
                    continue
                group = self.nh_objects.get(kernel_gid)
                if group is None:
                    continue
                rest = tuple((m, w) for m, w in group.group if m != nhid)
                if rest:
                    self._set_nh_object(_with_group(group, rest))
                else:
                    self._del_nh_object(kernel_gid)
        # and the routes using it, silently for IPv4: mirror that for both families
        for prefix in list(self._prefixes_by_obj.get(nhid, ())):
            routes = self.routes.get(prefix, [])
            routes[:] = [r for r in routes if r.nhid != nhid]
            if not routes:
                self.routes.pop(prefix, None)
            self._refresh_prefix(prefix)
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
        self._nh_by_link.get(ifindex, set()).discard(fid)
        if gateway is not None:
            users = self._nh_by_neigh.get((ifindex, family, gateway))
            if users is not None:
                users.discard(fid)
                if not users:
                    del self._nh_by_neigh[(ifindex, family, gateway)]

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
            elif usable:
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

    def _set_group(self, gid: int, members: tuple[tuple[int, int], ...]) -> None:
        for mid, _ in self._group_members.get(gid, ()):
            self._groups_by_nh[mid].discard(gid)
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
            users = self._groups_by_nh.get(mid)
            if users is not None:
                users.discard(gid)
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
        old = self.links.get(link.ifindex)
        if op is Op.ADD:
            self.links[link.ifindex] = link
        else:
            self.links.pop(link.ifindex, None)
        admin_down = op is Op.DEL or not link.flags & IFF_UP
        if admin_down and (old is None or old.flags & IFF_UP or op is Op.DEL):
            self._link_gone(link.ifindex)
        if op is Op.DEL:
            for key in [k for k, a in self.addresses.items() if a.ifindex == link.ifindex]:
                del self.addresses[key]
        for fid in list(self._nh_by_link.get(link.ifindex, ())):
            self._render_nexthop(fid)

    def _link_gone(self, ifindex: int) -> None:
        """Replay what the kernel does, silently, when a link goes down or away."""
        for obj in [o for o in self.nh_objects.values()
                    if not o.is_group and o.ifindex == ifindex]:
            self._del_nh_object(obj.id)
        for prefix, routes in list(self.routes.items()):
            if prefix.family != AF_INET:
                continue
            keep = []
            changed = False
            for r in routes:
                if not r.nhid and r.nexthops and all(n.ifindex == ifindex for n in r.nexthops):
                    changed = True
                    continue
                if r.nexthops and not r.nhid and any(n.ifindex == ifindex for n in r.nexthops):
                    r = _with_nexthops(r, tuple(
                        _dead(n) if n.ifindex == ifindex else n for n in r.nexthops))
                    changed = True
                keep.append(r)
            if changed:
                if keep:
                    self.routes[prefix] = keep
                else:
                    del self.routes[prefix]
                self._refresh_prefix(prefix)

    # -------------------------------------------------------------- queries

    def fast_path_keys(self) -> tuple[set[Prefix], set[int], set[int], set[tuple[int, int, bytes]]]:
        """What the maps must hold, and nothing else: prefixes, nexthop, group, neighbour keys."""
        return (set(self.fib), set(self._fp_nexthops), set(self._fp_groups),
                {k for k, n in self.neighbours.items() if n.valid})

    def counts(self) -> dict[str, int]:
        v4 = sum(1 for p in self.fib if p.family == AF_INET)
        return {
            "routes_v4": v4,
            "routes_v6": len(self.fib) - v4,
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


__all__ = ["AF_INET6", "Action", "FastPathDiff", "Filter", "FpGroup", "FpNexthop", "FpRoute", "Rib",
           "weighted_buckets"]
