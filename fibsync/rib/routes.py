"""How the kernel keeps the routes of one prefix (seen on 6.18).

Pure functions from a prefix's route list to the next one: a route added,
replaced, appended or prepended, a route deleted, the paths over a link
killed or revived. ``kernel.py`` applies them to the mirror and keeps its
indexes; nothing here knows about other prefixes or the fast path.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..model import AF_INET, AF_INET6, Nexthop, Route, RouteType
from ..netlink.rtnl import NLM_F_APPEND, NLM_F_REPLACE, RTNH_F_DEAD, RTPROT_RA


def added(held: list[Route] | None, route: Route, nlflags: int) -> list[Route]:
    """The routes of ``route``'s prefix once the kernel has added it with ``nlflags``."""
    if not held:
        return [route]
    routes = list(held)
    same = [i for i, r in enumerate(routes) if r.key == route.key]
    if route.prefix.family == AF_INET6:
        _add6(routes, same, route, nlflags)
    else:
        _add4(routes, same, route, nlflags)
    return routes


def _add4(routes: list[Route], same: list[int], route: Route, nlflags: int) -> None:
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


def _add6(routes: list[Route], same: list[int], route: Route, nlflags: int) -> None:
    """IPv6 keeps several routes under one key (table, prefix, metric), seen on 6.18.

    Gateway routes join as ECMP siblings: one entry, and an append arrives
    with every sibling. Routes that cannot be siblings (via a link only,
    via a nexthop object, blackholes and other types) stay entries of
    their own beside it when appended. A replace takes the first entry of
    its own kind (the whole sibling set for a gateway route), else the
    first entry there is.
    """
    ecmp = _ecmp6(route)
    # a route we hold, announced again, stays where it is (see _add4)
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


def deleted(held: list[Route], route: Route) -> list[Route] | None:
    """The routes left once the kernel has deleted ``route``; None when it names
    none of them."""
    routes = list(held)
    same = [i for i, r in enumerate(routes) if r.key == route.key]
    if not same:
        return None
    if route.prefix.family == AF_INET:
        # the delete names the alias it took (the first one when asked for none)
        del routes[next((i for i in same if _same_entry(routes[i], route)), same[0])]
        return routes
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
        return routes
    return None


def paths_down(routes: list[Route], ifindex: int, family: int, keep_local: bool,
               unregister: bool) -> list[Route]:
    """The routes left once the inline paths over a link are dead: a route with
    no live path left goes.

    With ``unregister`` (the link is deleted) an IPv4 route with any path
    over it goes whole, and IPv6 routes lose those paths.
    """
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
    return keep


def paths_up(routes: list[Route], ifindex: int) -> list[Route]:
    """The routes with their dead paths over a link alive again."""
    return [
        _with_nexthops(r, tuple(_alive(n) if n.ifindex == ifindex else n
                                for n in r.nexthops)) if not r.nhid else r
        for r in routes
    ]


def links_of(routes: Iterable[Route]) -> set[int]:
    """Links that inline paths of these routes run over (nexthop objects are indexed apart)."""
    return {n.ifindex for r in routes if not r.nhid for n in r.nexthops}


# The model's constructors by hand, not dataclasses.replace (0.8 against 0.2 µs: it
# reads the fields' definitions each call; a link going down rewrites every route
# with a path over it): tests/unit/test_rib.py checks that these copy every field.

def _with_nexthops(r: Route, nexthops: tuple[Nexthop, ...]) -> Route:
    return Route(r.prefix, r.table, r.type, r.protocol, r.scope, r.metric, r.tos, nexthops,
                 r.nhid, r.mtu, r.flags)


def _with_flags(n: Nexthop, flags: int) -> Nexthop:
    return Nexthop(n.ifindex, n.gateway, n.gateway_family, n.weight, flags, n.encap)


def _dead(n: Nexthop) -> Nexthop:
    return _with_flags(n, n.flags | RTNH_F_DEAD)


def _alive(n: Nexthop) -> Nexthop:
    return _with_flags(n, n.flags & ~RTNH_F_DEAD) if n.flags & RTNH_F_DEAD else n


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


def _path_id(n: Nexthop) -> tuple[int, bytes | None]:
    """What the kernel matches a path by when it deletes one: link and gateway."""
    return (n.ifindex, n.gateway)


def _merge_paths(old: tuple[Nexthop, ...], new: tuple[Nexthop, ...]) -> tuple[Nexthop, ...]:
    """Old paths in their order, updated by the new message, then the paths it adds."""
    fresh = {_path_id(n): n for n in new}
    merged = [fresh.pop(_path_id(n), n) for n in old]
    return tuple(merged) + tuple(fresh.values())
