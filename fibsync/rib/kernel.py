"""The kernel side of the mirror: what the kernel holds, and the rules it applies silently.

``KernelState`` keeps the kernel's routes (the general ones, and the compact
store of a full table's common routes), nexthop objects, links, addresses
and neighbours, with indexes by link and by nexthop object. It tells a
``KernelWatcher`` (the fast-path table, ``entries.py``) what changed, as it
changes; it never decides what the fast path holds.

The kernel changes some state without telling anyone (seen on 6.18): when a
link stops carrying traffic, is deleted or loses its last IPv4 address, it
flushes nexthop objects, shrinks their groups, kills or revives paths and
removes routes, with no RTM_DEL* message. ``set_link``, ``set_address`` and
``del_nh_object`` replay each rule (docs/architecture.md lists them), through
the indexes, so that a link flap costs in proportion to the routes over that
link, not to the table.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import replace
from typing import Any, Protocol

from ..model import (
    AF_INET,
    AF_INET6,
    NUD_VALID,
    Address,
    Link,
    Neighbour,
    NexthopObject,
    Op,
    Prefix,
    Route,
    Snapshot,
)
from ..netlink.rtnl import IFF_LOWER_UP, IFF_RUNNING, IFF_UP
from . import routes as rules
from .compact import CompactRoutes


class KernelWatcher(Protocol):
    """What the kernel side reports, in the order it happens."""

    def routes_changed(self, prefix: Prefix) -> None:
        """The routes of a prefix changed (or it has none left)."""

    def route_promoted(self, prefix: Prefix, nhid: int) -> None:
        """A compact route over ``nhid`` became a general one; its entry stays."""

    def compact_route_changed(self, prefix: Prefix, nhid: int | None) -> None:
        """A compact route's entry is its object's again (None: the route went)."""

    def object_set(self, obj: NexthopObject, old: NexthopObject | None) -> None:
        """A nexthop object is new or changed, before the routes over it are told."""

    def object_deleted(self, obj: NexthopObject) -> None:
        """A nexthop object is gone, after everything that used it."""

    def neighbour_changed(self, key: tuple[int, int, bytes], was: bytes | None,
                          now: bytes | None) -> None:
        """A neighbour changed; ``was``/``now``: its usable lladdr before and after."""

    def link_changed(self, ifindex: int) -> None:
        """A link changed (or went), after the routes and objects it took along."""


class KernelState:
    def __init__(self) -> None:
        self.links: dict[int, Link] = {}
        self.addresses: dict[tuple[int, int, bytes, int], Address] = {}
        self.neighbours: dict[tuple[int, int, bytes], Neighbour] = {}
        self.nh_objects: dict[int, NexthopObject] = {}
        # counts the changes of nh_objects, for caches of what derives from them
        self.nh_objects_version = 0
        # routes we follow, by prefix: usually one, several with other metrics/tables
        self.routes: dict[Prefix, list[Route]] = {}
        # the common form of a full table, compact; a prefix is here or in routes
        self.compact = CompactRoutes()
        # set by whoever builds the fast path from this state (the Rib)
        self.watcher: KernelWatcher
        # what the kernel's silent removals need to find without a scan of every
        # route: prefixes with inline paths over a link, prefixes with routes via
        # a nexthop object, single nexthop objects on a link, groups holding an object
        self._prefixes_by_link: dict[int, set[Prefix]] = defaultdict(set)
        self._prefixes_by_nhid: dict[int, set[Prefix]] = defaultdict(set)
        self._objects_by_link: dict[int, set[int]] = defaultdict(set)
        self._groups_by_member: dict[int, set[int]] = defaultdict(set)

    def load(self, snapshot: Snapshot) -> None:
        """A dump's links, addresses, neighbours and nexthop objects (its routes
        come through ``add_route`` and the compact store)."""
        for link in snapshot.links:
            self.links[link.ifindex] = link
        for addr in snapshot.addresses:
            self.addresses[addr.key] = addr
        for n in snapshot.neighbours:
            self.neighbours[n.key] = n
        for obj in sorted(snapshot.nexthops, key=lambda o: o.is_group):
            self.set_nh_object(obj)

    # ----------------------------------------------------------------- routes

    def add_route(self, route: Route, nlflags: int) -> None:
        if not self._promote(route.prefix, route):
            return
        self._set_routes(route.prefix, rules.added(self.routes.get(route.prefix), route,
                                                   nlflags))

    def del_route(self, route: Route) -> None:
        self._promote(route.prefix)
        left = rules.deleted(self.routes.get(route.prefix, []), route)
        if left is not None:
            self._set_routes(route.prefix, left)

    def _set_routes(self, prefix: Prefix, routes: list[Route]) -> None:
        """Set the routes of a prefix, keeping the link and nexthop-object indexes."""
        old = self.routes.get(prefix)
        if routes == old:
            return  # a route announced again, as it was: nothing to tell
        if old:
            old_links, new_links = rules.links_of(old), rules.links_of(routes)
            for ifindex in old_links - new_links:
                unindex(self._prefixes_by_link, ifindex, prefix)
            for ifindex in new_links - old_links:
                self._prefixes_by_link[ifindex].add(prefix)
            old_ids = {r.nhid for r in old if r.nhid}
            new_ids = {r.nhid for r in routes if r.nhid}
            for nhid in old_ids - new_ids:
                unindex(self._prefixes_by_nhid, nhid, prefix)
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
        self.watcher.routes_changed(prefix)

    def _promote(self, prefix: Prefix, announced: Route | None = None) -> bool:
        """Turn a compact route into a ``Route`` of the general structures, before a change.

        Nothing changes for the maps: its entry was the object's, and stays. False
        when the compact route is ``announced`` as it is held (nexthop_compat_mode=1
        announces every route over a replaced object again, a full table's worth):
        it stays compact, and there is no change to make.
        """
        route = self.compact.pop(prefix, unless=announced)
        if route is None:
            return True
        if route is announced:
            return False
        self.routes[prefix] = [route]
        self._prefixes_by_nhid[route.nhid].add(prefix)
        self.watcher.route_promoted(prefix, route.nhid)
        return True

    # ------------------------------------------------------ nexthop objects

    def set_nh_object(self, obj: NexthopObject) -> None:
        old = self.nh_objects.get(obj.id)
        self.nh_objects[obj.id] = obj
        self.nh_objects_version += 1
        self._index_object(old, obj)
        self.watcher.object_set(obj, old)
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
                    self.watcher.routes_changed(prefix)
            for prefix, nhid in self.compact.via(affected):
                self.watcher.compact_route_changed(prefix, nhid)

    def del_nh_object(self, nhid: int) -> None:
        """The kernel's removal of a nexthop object, with what it takes along silently.

        Its groups lose it (no RTM_NEWNEXTHOP), a group left empty goes too (no
        RTM_DELNEXTHOP), and so do the routes using either: silently for IPv4,
        and for IPv6 with ``nexthop_compat_mode=0`` (seen on 6.18).
        """
        obj = self.nh_objects.pop(nhid, None)
        if obj is None:
            return
        self.nh_objects_version += 1
        self._index_object(obj, None)
        for gid in list(self._groups_by_member.get(nhid, ())):
            group = self.nh_objects.get(gid)
            if group is None:
                continue
            rest = tuple((m, w) for m, w in group.group if m != nhid)
            if rest:
                self.set_nh_object(replace(group, group=rest))
            else:
                self.del_nh_object(gid)
        for prefix in list(self._prefixes_by_nhid.get(nhid, ())):
            self._set_routes(prefix, [r for r in self.routes.get(prefix, ()) if r.nhid != nhid])
        for prefix in self.compact.drop_via(nhid):
            self.watcher.compact_route_changed(prefix, None)
        self.watcher.object_deleted(obj)

    def _index_object(self, old: NexthopObject | None, new: NexthopObject | None) -> None:
        if old is not None:
            if old.ifindex and not old.is_group:
                unindex(self._objects_by_link, old.ifindex, old.id)
            for member, _ in old.group:
                unindex(self._groups_by_member, member, old.id)
        if new is not None:
            if new.ifindex and not new.is_group:
                self._objects_by_link[new.ifindex].add(new.id)
            for member, _ in new.group:
                self._groups_by_member[member].add(new.id)

    # ------------------------------------------------ neighbours and links

    def set_neighbour(self, n: Neighbour, op: Op) -> None:
        old = self.neighbours.get(n.key)
        if op is Op.ADD:
            self.neighbours[n.key] = n
        else:
            self.neighbours.pop(n.key, None)
        new = n if op is Op.ADD else None
        if _neighbour_use(old) == _neighbour_use(new):
            return  # e.g. REACHABLE -> STALE: nothing the fast path reads changed
        was = old.lladdr if old is not None and old.valid else None
        now = new.lladdr if new is not None and new.valid else None
        self.watcher.neighbour_changed(n.key, was, now)

    def set_link(self, link: Link, op: Op) -> None:
        """Follow a link, and replay what the kernel does silently when its state changes.

        Seen on 6.18 (see docs/architecture.md, "Silent changes"):
        - nexthop objects on a link go when it does not carry (admin down, no
          carrier, deleted), with what depends on them (``del_nh_object``);
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
        self.watcher.link_changed(ifindex)

    def set_address(self, addr: Address, op: Op) -> None:
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
            self.del_nh_object(nhid)

    def _paths_down(self, ifindex: int, family: int, keep_local: bool,
                    unregister: bool = False) -> None:
        """Kill the inline paths over a link (``routes.paths_down``), prefix by prefix."""
        for prefix in list(self._prefixes_by_link.get(ifindex, ())):
            if prefix.family != family:
                continue
            routes = self.routes[prefix]
            keep = rules.paths_down(routes, ifindex, family, keep_local, unregister)
            if keep != routes:
                self._set_routes(prefix, keep)

    def _paths_up(self, ifindex: int, family: int) -> None:
        """Revive the dead paths over a link (routes that lost every path are gone for good)."""
        for prefix in list(self._prefixes_by_link.get(ifindex, ())):
            if prefix.family != family:
                continue
            routes = self.routes[prefix]
            revived = rules.paths_up(routes, ifindex)
            if revived != routes:
                self._set_routes(prefix, revived)

    # -------------------------------------------------------------- queries

    def nhids_of(self, prefix: Prefix) -> set[int]:
        """The kernel nexthop objects the followed routes of ``prefix`` use."""
        nhid = self.compact.nhid(prefix)
        if nhid is not None:
            return {nhid}
        return {r.nhid for r in self.routes.get(prefix, ()) if r.nhid}

    def objects_using(self, nhids: Iterable[int]) -> set[int]:
        """These nexthop objects and the groups that hold any of them."""
        out = set(nhids)
        for nhid in list(out):
            out |= self._groups_by_member.get(nhid, set())
        return out


def unindex(index: dict[Any, set[Any]], key: Any, value: Any) -> None:
    """Take ``value`` out of ``index[key]``, and the key with its last value."""
    users = index.get(key)
    if users is not None:
        users.discard(value)
        if not users:
            del index[key]


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


def _neighbour_use(n: Neighbour | None) -> tuple[bool, bytes | None] | None:
    """What the fast path reads of a neighbour entry: whether it exists, whether it
    is NUD_VALID (the kernel's ECMP skips an existing invalid one), its address
    while valid."""
    if n is None:
        return None
    return bool(n.state & NUD_VALID), n.lladdr if n.valid else None
