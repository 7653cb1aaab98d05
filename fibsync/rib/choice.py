"""The fast-path entry of a prefix, chosen from its routes the way the kernel chooses.

Pure functions: the routes the kernel holds for one prefix in, a ``Choice``
out. A choice is the entry itself when it needs no next hop (to the kernel,
drop), a nexthop object's id when the entry is that object's, the inline
paths when they are to be interned, or None when the fast path holds nothing
for the prefix. Fast-path ids are given out elsewhere (``entries.py``).

``kernel_picks_path`` decides, from the state of an ECMP group's paths,
whether the group's own buckets may choose among them or only the kernel's
selection can (see its docstring).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

from ..model import (
    NUD_VALID,
    RT_TABLE_LOCAL,
    Link,
    Neighbour,
    Nexthop,
    NexthopObject,
    Route,
    RouteType,
)
from ..netlink.rtnl import RTNH_F_DEAD
from .types import Action, FpRoute

_KERNEL_REASON = {
    RouteType.LOCAL: "PASS_LOCAL",
    RouteType.BROADCAST: "PASS_LOCAL",
    RouteType.ANYCAST: "PASS_LOCAL",
    RouteType.MULTICAST: "PASS_MULTICAST",
    RouteType.UNREACHABLE: "PASS_UNREACHABLE",
    RouteType.PROHIBIT: "PASS_UNREACHABLE",
}
# entries without a nexthop are the same for every prefix: one object each
KERNEL_ENTRY = {t: FpRoute(Action.KERNEL, reason=r) for t, r in _KERNEL_REASON.items()}
DROP = FpRoute(Action.DROP)
FIB = FpRoute(Action.FIB)


@functools.lru_cache(maxsize=1 << 16)
def forward(nh_id: int, group: bool) -> FpRoute:
    """One entry object per next hop or group, whatever the number of prefixes using it."""
    return FpRoute(Action.FORWARD, nh_id, group)


# A "path set" is what a route forwards over: a kernel nexthop object, or inline paths.
PathKey = int | tuple[Nexthop, ...]
Choice = FpRoute | PathKey | None


def best(routes: list[Route] | None) -> list[Route]:
    """The routes the kernel chooses among: local table first, then the lowest metric."""
    if not routes or len(routes) == 1:
        return routes or []
    pool = [r for r in routes if r.table == RT_TABLE_LOCAL] or routes
    top = min(pool, key=lambda r: (r.tos != 0, r.metric))
    return [r for r in pool if r.metric == top.metric and r.tos == top.tos]


def choose(routes: list[Route] | None) -> Choice:
    """What the fast path does for a prefix with these routes."""
    chosen = best(routes)
    if not chosen:
        return None
    assert routes is not None
    if chosen[0].tos or (len(routes) > 1 and any(r.tos for r in routes)):
        # the fast path does not match on TOS: let the kernel's lookup decide
        return FIB
    if len(chosen) > 1 and len(kernel := {KERNEL_ENTRY.get(r.type) for r in chosen}) == 1 \
            and None not in kernel:
        # aliases the kernel answers alike (unreachable beside prohibit): whichever it
        # uses, the packet goes to it with the same reason
        return kernel.pop()
    if len(chosen) > 1 and (len({r.type for r in chosen}) > 1
                            or chosen[0].type == RouteType.UNICAST):
        # IPv6 entries or IPv4 aliases side by side: the kernel picks one per
        # lookup (IPv6 by neighbour state and round robin, IPv4 the first
        # alias with a live path); only its own lookup can do the same
        return FIB
    return _route_choice(chosen[0])


def _route_choice(route: Route) -> Choice:
    rtype = route.type
    if route.nhid and rtype == RouteType.BLACKHOLE:
        # the kernel reports a route over a blackhole object as a blackhole route,
        # and as unicast again once the object has a gateway: the object decides
        rtype = RouteType.UNICAST
    if rtype in KERNEL_ENTRY:
        return KERNEL_ENTRY[rtype]
    if rtype == RouteType.BLACKHOLE:
        return DROP
    if rtype != RouteType.UNICAST:
        return FIB
    if route.nhid:
        return route.nhid
    paths = tuple(n for n in route.nexthops if not n.flags & RTNH_F_DEAD)
    if not paths or any(n.encap for n in paths):
        # nothing alive, or the kernel adds headers (MPLS, SRv6) we do not
        return FIB
    return paths


def object_entry(nhid: int, objects: Mapping[int, NexthopObject],
                 fp_ids: Mapping[int, int]) -> FpRoute:
    """The entry of a unicast route over nexthop object ``nhid``, whose own
    fast-path nexthop or group is ``fp_ids[nhid]``."""
    obj = objects.get(nhid)
    if obj is None:
        return FIB
    if _blackhole(obj, objects):
        # a group of blackholes drops
        return DROP
    if _encap(obj, objects):
        # a group with encapsulation goes to the kernel
        return FIB
    return forward(fp_ids[obj.id], obj.is_group)


def _blackhole(obj: NexthopObject, objects: Mapping[int, NexthopObject]) -> bool:
    if not obj.is_group:
        return obj.blackhole
    members = [objects.get(m) for m, _ in obj.group]
    return all(m is not None and m.blackhole for m in members)


def _encap(obj: NexthopObject, objects: Mapping[int, NexthopObject]) -> bool:
    if obj.encap:
        return True
    return any(m in objects and objects[m].encap for m, _ in obj.group)


def kernel_picks_path(states: Sequence[tuple[bool, bool]], object_group: bool,
                      use_neigh: bool) -> bool:
    """Whether an ECMP group must leave the choice of its path to the kernel: True
    when the kernel's selection may pass over one of its paths (``states``: each
    path's ``path_state``, which FpTable keeps for every fast-path nexthop).

    The kernel's hash-threshold selection skips a path whose gateway's neighbour
    entry exists and is not NUD_VALID (INCOMPLETE, FAILED, NONE; no entry counts as
    good): always in a nexthop-object group (``nexthop_select_path_hthr`` /
    ``nexthop_is_good_nh``), in a route's own paths only under
    net.ipv4.fib_multipath_use_neigh (``fib_select_multipath`` / ``fib_good_nh``,
    which also judges the IPv6 gateways of IPv4 routes). IPv6 routes' own paths
    ignore neighbours when forwarding, but inline paths are interned whatever the
    route's family, so the sysctl applies to all of them: asking the kernel where
    it was not needed costs time, never a wrong path. A path over a link without
    carrier is skipped under ignore_routes_with_linkdown, one over a link down or
    unknown is dead; neither sysctl is read: the kernel decides for both alike.

    The group's buckets only approximate the kernel's hash, so they do not try to
    skip what it skips: while any path may be skipped, every packet of the group
    goes to bpf_fib_lookup, which runs the kernel's own path selection. A group of
    one path has nothing to choose: the program's own fallback suffices.
    """
    if len(states) < 2:
        return False
    if object_group or use_neigh:
        return any(dead or neighbour_invalid for dead, neighbour_invalid in states)
    return any(dead for dead, _ in states)


def path_state(link: Link | None, neighbour: Neighbour | None, gateway: bool
               ) -> tuple[bool, bool]:
    """What ``kernel_picks_path`` reads of one path: whether it is dead (its link down
    or unknown), and whether its gateway's neighbour entry exists and is not
    NUD_VALID. FpTable renders a group again only when this changes for a path of it."""
    return (link is None or not link.up,
            gateway and neighbour is not None and not neighbour.state & NUD_VALID)
