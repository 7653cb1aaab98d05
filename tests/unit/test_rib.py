"""The mirror, tested with decoded kernel objects in and map contents out.

Every test drives ``Rib`` -> ``MapWriter`` -> ``MemoryMaps`` and reads the maps
back with the same reader ``fibsync routes`` uses: what is asserted is what
the XDP program would see.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fibsync.fastpath.writer import MemoryMaps
from fibsync.model import (
    AF_INET,
    NUD_FAILED,
    Change,
    Nexthop,
    Op,
    Prefix,
    Route,
    RouteType,
    Snapshot,
)
from fibsync.netlink.rtnl import RTNH_F_DEAD
from fibsync.rib import GROUP_BUCKETS, Filter, routes, weighted_buckets

from .mirror import (
    DOWN,
    MAC1,
    MAC2,
    NO_CARRIER,
    Mirror,
    addr,
    link,
    neigh,
    nh_obj,
    route,
)

NLM_F_REPLACE, NLM_F_CREATE, NLM_F_APPEND = 0x100, 0x400, 0x800


@pytest.fixture
def m() -> Mirror:
    mirror = Mirror()
    mirror.sync(links=[link(1), link(2), link(3)],
                neighbours=[neigh(1, "192.0.2.2"), neigh(2, "198.51.100.2", MAC2),
                            neigh(3, "198.51.100.6", MAC2)])
    return mirror


def test_gateway_route_resolves_to_neighbour_mac(m: Mirror) -> None:
    m.add(route("192.0.2.64/26", ("192.0.2.2", 1, 1)))
    e = m.routes()["192.0.2.64/26"]
    assert e["type"] == "unicast"
    assert e["nexthops"][0]["mac"] == MAC1.hex(":")
    assert m.paths("192.0.2.64/26") == {("192.0.2.2", 1, 1, True)}


def test_unresolved_gateway_is_marked_until_the_kernel_resolves_it(m: Mirror) -> None:
    """Nothing asks the kernel to resolve a next hop: a packet handed to it does,
    as it would without the fast path; the RIB only follows the neighbour."""
    m.add(route("203.0.113.0/24", ("192.0.2.9", 1, 1)))
    assert m.paths("203.0.113.0/24") == {("192.0.2.9", 1, 1, False)}
    m.add(neigh(1, "192.0.2.9", MAC2))
    assert m.paths("203.0.113.0/24") == {("192.0.2.9", 1, 1, True)}
    m.add(neigh(1, "192.0.2.9", MAC2, NUD_FAILED))
    assert m.paths("203.0.113.0/24") == {("192.0.2.9", 1, 1, False)}
    m.delete(neigh(1, "192.0.2.9", MAC2, NUD_FAILED))
    assert m.paths("203.0.113.0/24") == {("192.0.2.9", 1, 1, False)}


def test_connected_route_and_neighbour_map(m: Mirror) -> None:
    m.add(route("192.0.2.0/30", (None, 1, 1), protocol=2))
    assert m.paths("192.0.2.0/30") == {(None, 1, 1, True)}
    assert len(m.maps.maps["neighbours"]) == 3
    m.delete(neigh(1, "192.0.2.2"))
    assert len(m.maps.maps["neighbours"]) == 2


def test_nexthop_object_change_is_one_map_write(m: Mirror) -> None:
    m.add(nh_obj(10, "198.51.100.2", 2))
    m.add(*(route(f"203.0.{i}.0/24", nhid=10) for i in range(200)))
    assert len(m.routes()) == 200
    before = dict(m.maps.maps["routes_v4"])
    m.add(nh_obj(10, "198.51.100.6", 3))
    assert m.writes[-1] == 1  # the nexthop entry, not 200 routes
    assert m.maps.maps["routes_v4"] == before
    assert m.paths("203.0.7.0/24") == {("198.51.100.6", 3, 1, True)}


def test_group_object_with_weights(m: Mirror) -> None:
    m.add(nh_obj(10, "198.51.100.2", 2), nh_obj(11, "198.51.100.6", 3),
          nh_obj(12, group=((10, 1), (11, 3))))
    m.add(route("203.0.113.0/24", nhid=12))
    assert m.paths("203.0.113.0/24") == {("198.51.100.2", 2, 1, True),
                                         ("198.51.100.6", 3, 3, True)}


def test_inline_multipath_shares_and_frees_entries(m: Mirror) -> None:
    paths = (("198.51.100.2", 2, 1), ("198.51.100.6", 3, 2))
    m.add(route("203.0.113.0/24", *paths), route("203.0.112.0/24", *paths))
    assert m.paths("203.0.113.0/24") == {("198.51.100.2", 2, 1, True),
                                         ("198.51.100.6", 3, 2, True)}
    assert len(m.maps.maps["groups"]) == 1
    m.delete(route("203.0.113.0/24", *paths), route("203.0.112.0/24", *paths))
    assert m.routes() == {}
    assert m.maps.maps["groups"] == {} and m.maps.maps["nexthops"] == {}


def test_deleted_nexthop_object_takes_its_routes_silently(m: Mirror) -> None:
    m.add(nh_obj(10, "198.51.100.2", 2), nh_obj(11, "198.51.100.6", 3),
          nh_obj(12, group=((10, 1), (11, 1))))
    m.add(route("203.0.113.0/24", nhid=12), route("198.51.100.128/25", nhid=10))
    m.delete(nh_obj(10))
    assert "198.51.100.128/25" not in m.routes()
    assert m.paths("203.0.113.0/24") == {("198.51.100.6", 3, 1, True)}
    m.delete(nh_obj(11))  # the group is now empty: the kernel removes it and its routes
    assert m.routes() == {}


# --- what the kernel removes or changes without a word (each rule seen on 6.18,
# see docs/architecture.md "Silent removals")

def test_link_down_flushes_nexthop_objects_and_ipv4_routes_but_keeps_local(m: Mirror) -> None:
    m.add(nh_obj(10, "198.51.100.2", 2), nh_obj(20, "2001:db8::2", 2))
    m.add(route("203.0.113.0/24", nhid=10), route("203.0.112.0/24", ("198.51.100.2", 2, 1)),
          route("2001:db8:5::/48", nhid=20), route("192.0.2.64/26", ("192.0.2.2", 1, 1)),
          route("198.51.100.1/32", (None, 2, 1), type=RouteType.LOCAL, table=255),
          route("198.51.100.3/32", (None, 2, 1), type=RouteType.BROADCAST, table=255),
          route("198.51.100.0/30", (None, 2, 1), protocol=2))
    m.add(link(2, DOWN))
    # the local route of the link's address stays while the address does
    assert set(m.routes()) == {"192.0.2.64/26", "198.51.100.1/32"}
    assert m.rib.nh_objects == {}


def test_link_down_kills_multipath_members_and_up_revives_them(m: Mirror) -> None:
    m.add(neigh(2, "2001:db8:2::2"), neigh(3, "2001:db8:3::2"))
    v4 = route("203.0.113.0/24", ("198.51.100.2", 2, 1), ("198.51.100.6", 3, 1))
    v6 = route("2001:db8:20::/64", ("2001:db8:2::2", 2, 1), ("2001:db8:3::2", 3, 1))
    m.add(v4, v6)
    m.add(link(2, DOWN))
    assert m.paths("203.0.113.0/24") == {("198.51.100.6", 3, 1, True)}
    assert m.paths("2001:db8:20::/64") == {("2001:db8:3::2", 3, 1, True)}
    m.add(link(3, DOWN))  # no live path left: the kernel removes both routes
    assert m.routes() == {}
    m.add(link(3), link(2))
    assert m.routes() == {}


def test_link_up_revives_ipv4_at_once_and_ipv6_with_carrier(m: Mirror) -> None:
    m.add(neigh(2, "2001:db8:2::2"), neigh(3, "2001:db8:3::2"))
    m.add(route("203.0.113.0/24", ("198.51.100.2", 2, 1), ("198.51.100.6", 3, 1)),
          route("2001:db8:20::/64", ("2001:db8:2::2", 2, 1), ("2001:db8:3::2", 3, 1)))
    m.add(link(2, DOWN))
    # admin up while the peer is down; RUNNING may still show from before
    m.add(link(2, NO_CARRIER | 0x40))
    assert {p[0] for p in m.paths("203.0.113.0/24")} == {"198.51.100.2", "198.51.100.6"}
    assert {p[0] for p in m.paths("2001:db8:20::/64")} == {"2001:db8:3::2"}
    m.add(link(2))
    assert {p[0] for p in m.paths("2001:db8:20::/64")} == {"2001:db8:2::2", "2001:db8:3::2"}


def test_carrier_loss_flushes_nexthop_objects_only(m: Mirror) -> None:
    m.add(nh_obj(10, "198.51.100.2", 2), nh_obj(11, "198.51.100.6", 3),
          nh_obj(12, group=((10, 1), (11, 1))), nh_obj(13, group=((10, 1),)))
    m.add(route("203.0.113.0/24", nhid=12), route("203.0.112.0/24", nhid=13),
          route("2001:db8:5::/48", nhid=10), route("198.51.100.128/25", ("198.51.100.2", 2, 1)))
    m.add(link(2, NO_CARRIER))
    # the group loses the member, the group left empty goes with its route
    assert set(m.routes()) == {"203.0.113.0/24", "198.51.100.128/25"}
    assert m.paths("203.0.113.0/24") == {("198.51.100.6", 3, 1, True)}
    # the inline route stays (with linkdown), unresolved while the link has no carrier
    assert m.paths("198.51.100.128/25") == {("198.51.100.2", 2, 1, False)}
    assert set(m.rib.nh_objects) == {11, 12}


def test_carrier_loss_reported_before_the_carrier_came_flushes_too(m: Mirror) -> None:
    """The kernel checks the carrier itself when an object is created; the NEWLINK
    telling us the carrier is back comes later (linkwatch), and may never come
    when the carrier goes again at once: every NEWLINK without carrier flushes."""
    m.add(link(2, NO_CARRIER))
    m.add(nh_obj(10, "198.51.100.2", 2), route("203.0.113.0/24", nhid=10))
    m.add(link(2, NO_CARRIER))
    assert m.routes() == {}
    assert m.rib.nh_objects == {}


def test_last_ipv4_address_removed_kills_ipv4_paths_over_the_link(m: Mirror) -> None:
    m.add(addr(2, "198.51.100.1/30"), addr(2, "198.51.100.9/29"), addr(2, "2001:db8:2::1/64"))
    m.add(nh_obj(10, "198.51.100.2", 2))
    m.add(route("203.0.113.0/24", nhid=10), route("203.0.112.0/24", ("198.51.100.2", 2, 1)),
          route("203.0.111.0/24", ("198.51.100.2", 2, 1), ("198.51.100.6", 3, 1)),
          route("203.0.110.0/24", ("2001:db8:2::2", 2, 1)),
          route("2001:db8:5::/48", ("2001:db8:2::2", 2, 1)))
    m.delete(addr(2, "198.51.100.9/29"))
    assert len(m.routes()) == 5
    m.delete(addr(2, "198.51.100.1/30"))
    # nexthop objects and IPv6 stay; RFC 5549 routes are IPv4 routes and go
    assert set(m.routes()) == {"203.0.113.0/24", "203.0.111.0/24", "2001:db8:5::/48"}
    assert m.paths("203.0.111.0/24") == {("198.51.100.6", 3, 1, True)}
    m.add(addr(2, "198.51.100.1/30"))
    assert {p[0] for p in m.paths("203.0.111.0/24")} == {"198.51.100.2", "198.51.100.6"}


def test_deleted_link_takes_every_ipv4_route_with_a_path_over_it(m: Mirror) -> None:
    m.add(nh_obj(10, "198.51.100.2", 2), addr(2, "198.51.100.1/30"))
    m.add(route("203.0.113.0/24", ("198.51.100.2", 2, 1), ("198.51.100.6", 3, 1)),
          route("198.51.100.1/32", (None, 2, 1), type=RouteType.LOCAL, table=255),
          route("2001:db8:20::/64", ("2001:db8:2::2", 2, 1), ("2001:db8:3::2", 3, 1)),
          route("203.0.112.0/24", nhid=10))
    m.delete(link(2))
    assert set(m.routes()) == {"2001:db8:20::/64"}
    assert {p[0] for p in m.paths("2001:db8:20::/64")} == {"2001:db8:3::2"}
    assert m.rib.addresses == {}


def test_deleted_object_takes_routes_that_are_not_the_best_too(m: Mirror) -> None:
    m.add(nh_obj(10, "198.51.100.2", 2))
    m.add(route("203.0.113.0/24", nhid=10, metric=20),
          route("203.0.113.0/24", ("192.0.2.2", 1, 1), metric=10))
    m.delete(nh_obj(10))
    m.delete(route("203.0.113.0/24", ("192.0.2.2", 1, 1), metric=10))
    assert m.routes() == {}


def test_route_over_a_blackhole_object_follows_the_object(m: Mirror) -> None:
    m.add(nh_obj(10, blackhole=True), nh_obj(11, group=((10, 1),)))
    # the kernel reports such routes with type blackhole
    m.add(route("203.0.113.0/24", nhid=10, type=RouteType.BLACKHOLE),
          route("203.0.112.0/24", nhid=11, type=RouteType.BLACKHOLE))
    assert {e["type"] for e in m.routes().values()} == {"blackhole"}
    m.add(nh_obj(10, "198.51.100.2", 2))
    assert m.paths("203.0.113.0/24") == {("198.51.100.2", 2, 1, True)}
    assert m.paths("203.0.112.0/24") == {("198.51.100.2", 2, 1, True)}


def test_ipv6_route_over_an_object_is_one_route_whatever_type_it_is_reported_with(
        m: Mirror) -> None:
    m.add(nh_obj(20, "2001:db8:2::2", 2), neigh(2, "2001:db8:2::2"))
    m.add(route("2001:db8:5::/48", nhid=20))
    m.add(nh_obj(20, blackhole=True))
    # a replayed add and the delete both carry the type the kernel reports now
    m.add(route("2001:db8:5::/48", nhid=20, type=RouteType.BLACKHOLE))
    assert m.routes()["2001:db8:5::/48"]["type"] == "blackhole"
    m.delete(route("2001:db8:5::/48", nhid=20, type=RouteType.BLACKHOLE))
    assert m.routes() == {}


def test_ipv4_aliases_appended_or_prepended_go_to_the_kernel_lookup(m: Mirror) -> None:
    a = route("203.0.113.0/24", ("192.0.2.2", 1, 1))
    b = route("203.0.113.0/24", ("198.51.100.2", 2, 1))
    c = route("203.0.113.0/24", ("198.51.100.6", 3, 1))
    m.add(a)
    m.apply(Change(Op.ADD, b, NLM_F_CREATE | NLM_F_APPEND))
    assert m.routes()["203.0.113.0/24"]["type"] == "fib"
    m.apply(Change(Op.ADD, c, NLM_F_CREATE))  # prepend: c comes first
    m.delete(b)
    m.apply(Change(Op.ADD, route("203.0.113.0/24", ("198.51.100.2", 2, 1)), NLM_F_REPLACE))
    m.delete(a)  # the replace took c, the first alias
    assert m.paths("203.0.113.0/24") == {("198.51.100.2", 2, 1, True)}


def test_a_route_renotified_with_replace_is_that_route_not_the_first_alias(m: Mirror) -> None:
    """With nexthop_compat_mode=1 the kernel announces again, flagged NLM_F_REPLACE,
    every route over an object it replaced."""
    m.add(nh_obj(10, "198.51.100.2", 2))
    for prefix in ("203.0.113.0/24", "2001:db8:5::/48"):
        first = route(prefix, type=RouteType.BLACKHOLE)
        via_object = route(prefix, nhid=10)
        m.add(first)
        m.apply(Change(Op.ADD, via_object, NLM_F_CREATE | NLM_F_APPEND))
        m.apply(Change(Op.ADD, via_object, NLM_F_REPLACE))
        m.delete(via_object)
        assert m.routes()[prefix]["type"] == "blackhole"


def test_unreachable_beside_prohibit_is_one_behaviour_not_a_lookup(m: Mirror) -> None:
    """Aliases the kernel answers alike: whichever it uses, the packet is the kernel's,
    for the same reason (a stress loop's kernel view found the FIB entry odd)."""
    unreachable = route("203.0.113.0/24", type=RouteType.UNREACHABLE)
    m.add(unreachable)
    m.apply(Change(Op.ADD, route("203.0.113.0/24", type=RouteType.PROHIBIT),
                   NLM_F_CREATE | NLM_F_APPEND))
    assert (m.routes()["203.0.113.0/24"]["type"],
            m.routes()["203.0.113.0/24"]["reason"]) == ("kernel", "PASS_UNREACHABLE")
    m.apply(Change(Op.ADD, route("203.0.113.0/24", type=RouteType.BLACKHOLE),
                   NLM_F_CREATE | NLM_F_APPEND))
    assert m.routes()["203.0.113.0/24"]["type"] == "fib"  # a drop beside them: the kernel picks


# --- IPv6 keeps several routes under one (table, prefix, metric)

def test_ipv6_routes_side_by_side_go_to_the_kernel_lookup(m: Mirror) -> None:
    m.add(neigh(2, "2001:db8:2::2"), neigh(3, "2001:db8:3::2"))
    via = route("2001:db8:20::/64", ("2001:db8:2::2", 2, 1))
    dev = route("2001:db8:20::/64", (None, 3, 1))
    m.add(via)
    m.apply(Change(Op.ADD, dev, NLM_F_CREATE | NLM_F_APPEND))
    assert m.routes()["2001:db8:20::/64"]["type"] == "fib"
    # a replace takes the entry of its own kind
    m.apply(Change(Op.ADD, route("2001:db8:20::/64", ("2001:db8:3::2", 3, 1)), NLM_F_REPLACE))
    m.delete(dev)
    assert m.paths("2001:db8:20::/64") == {("2001:db8:3::2", 3, 1, True)}


def test_ipv6_replace_of_another_kind_takes_the_first_entry(m: Mirror) -> None:
    m.add(neigh(2, "2001:db8:2::2"))
    m.add(route("2001:db8:20::/64", ("2001:db8:2::2", 2, 1), ("2001:db8:3::2", 3, 1)))
    m.apply(Change(Op.ADD, route("2001:db8:20::/64", type=RouteType.BLACKHOLE), NLM_F_REPLACE))
    assert m.routes()["2001:db8:20::/64"]["type"] == "blackhole"
    m.delete(route("2001:db8:20::/64", type=RouteType.BLACKHOLE))
    assert m.routes() == {}


def test_ipv6_multicast_on_every_link_goes_to_the_kernel(m: Mirror) -> None:
    m.add(*(route("ff00::/8", (None, i, 1), type=RouteType.MULTICAST, table=255, metric=256)
            for i in (1, 2, 3)))
    assert m.routes()["ff00::/8"]["reason"] == "PASS_MULTICAST"
    for i in (1, 2):
        m.delete(route("ff00::/8", (None, i, 1), type=RouteType.MULTICAST, table=255, metric=256))
        assert m.routes()["ff00::/8"]["reason"] == "PASS_MULTICAST"
    m.delete(route("ff00::/8", (None, 3, 1), type=RouteType.MULTICAST, table=255, metric=256))
    assert m.routes() == {}


def test_route_types(m: Mirror) -> None:
    m.add(route("203.0.113.0/24", type=RouteType.BLACKHOLE),
          route("198.51.100.0/24", type=RouteType.UNREACHABLE),
          route("192.0.2.1/32", (None, 1, 1), type=RouteType.LOCAL, table=255),
          route("192.0.2.0/30", (None, 1, 1)))
    r = m.routes()
    assert r["203.0.113.0/24"]["type"] == "blackhole"
    assert (r["198.51.100.0/24"]["type"], r["198.51.100.0/24"]["reason"]) == \
        ("kernel", "PASS_UNREACHABLE")
    assert (r["192.0.2.1/32"]["type"], r["192.0.2.1/32"]["reason"]) == ("kernel", "PASS_LOCAL")
    assert r["192.0.2.0/30"]["type"] == "unicast"


def test_lowest_metric_wins_and_falls_back(m: Mirror) -> None:
    a = route("203.0.113.0/24", ("192.0.2.2", 1, 1), metric=20)
    b = route("203.0.113.0/24", ("198.51.100.2", 2, 1), metric=10)
    m.add(a, b)
    assert m.paths("203.0.113.0/24") == {("198.51.100.2", 2, 1, True)}
    m.delete(b)
    assert m.paths("203.0.113.0/24") == {("192.0.2.2", 1, 1, True)}


def test_filter_by_table_and_protocol() -> None:
    mirror = Mirror(Filter(table=100, protocols=frozenset({186})))
    mirror.sync(links=[link(1)], neighbours=[neigh(1, "192.0.2.2")])
    mirror.add(route("203.0.113.0/24", ("192.0.2.2", 1, 1), table=100),
               route("198.51.100.0/24", ("192.0.2.2", 1, 1), table=254),
               route("203.0.112.0/24", ("192.0.2.2", 1, 1), table=100, protocol=4))
    assert set(mirror.routes()) == {"203.0.113.0/24"}


def test_ipv6_siblings_join_and_leave(m: Mirror) -> None:
    m.add(neigh(2, "2001:db8:2::2"), neigh(3, "2001:db8:3::2"))
    m.add(route("2001:db8:20::/64", ("2001:db8:2::2", 2, 1)))
    m.add(route("2001:db8:20::/64", ("2001:db8:3::2", 3, 1)))
    assert {p[0] for p in m.paths("2001:db8:20::/64")} == {"2001:db8:2::2", "2001:db8:3::2"}
    m.delete(route("2001:db8:20::/64", ("2001:db8:2::2", 2, 1)))
    assert {p[0] for p in m.paths("2001:db8:20::/64")} == {"2001:db8:3::2"}


def test_resync_keeps_valid_entries_and_sweeps_stale(m: Mirror) -> None:
    keep = route("203.0.113.0/24", ("192.0.2.2", 1, 1))
    gone = route("198.51.100.128/25", ("198.51.100.2", 2, 1))
    m.add(keep, gone)
    snapshot = dict(links=[link(1), link(2), link(3)], neighbours=[neigh(1, "192.0.2.2")],
                    routes=[keep, route("203.0.112.0/24", ("192.0.2.2", 1, 1))])
    m.rib.resync(Snapshot(**snapshot))
    diff = m.rib.take_diff()
    # nothing valid is deleted or rewritten: only the stale prefix goes, the new one comes
    assert {str(p): e is None for p, e in diff.routes.items()} == {
        "198.51.100.128/25": True, "203.0.112.0/24": False}
    m.writer.write(diff)
    assert set(m.routes()) == {"203.0.113.0/24", "203.0.112.0/24"}


def test_an_id_freed_by_a_diff_is_not_reused_by_the_same_diff(m: Mirror) -> None:
    """The writer sets new next hops before it deletes old routes: were an id handed
    on within one diff, a route on its way out would forward over the newcomer."""
    m.add(nh_obj(10, "192.0.2.2", 1), route("203.0.113.0/24", nhid=10))
    old_id = m.rib.entries[Prefix.parse("203.0.113.0/24")].nh_id
    m.rib.apply([Change(Op.DEL, nh_obj(10)), Change(Op.ADD, nh_obj(12, "198.51.100.2", 2)),
                 Change(Op.ADD, route("198.51.100.128/25", nhid=12))])
    diff = m.rib.take_diff()
    assert diff.nexthops[old_id] is None
    assert diff.routes[Prefix.parse("203.0.113.0/24")] is None
    m.writer.write(diff)
    m.add(route("203.0.112.0/24", ("198.51.100.6", 3, 1)))  # a later diff may take it
    assert m.rib.entries[Prefix.parse("203.0.112.0/24")].nh_id == old_id


def test_resync_does_not_hand_on_the_ids_of_stale_entries(m: Mirror) -> None:
    m.add(nh_obj(10, "198.51.100.2", 2), route("203.0.113.0/24", nhid=10))
    stale = m.rib.entries[Prefix.parse("203.0.113.0/24")].nh_id
    # the object and its route went while we missed the events; a new one came
    m.rib.resync(Snapshot(links=[link(1), link(2), link(3)],
                          neighbours=[neigh(2, "198.51.100.6", MAC2)],
                          nexthops=[nh_obj(11, "198.51.100.6", 2)],
                          routes=[route("203.0.112.0/24", nhid=11)]))
    diff = m.rib.take_diff()
    assert diff.nexthops[stale] is None
    assert diff.routes[Prefix.parse("203.0.113.0/24")] is None


def test_restart_adopts_maps_and_sweeps_leftovers() -> None:
    old = Mirror()
    old.sync(links=[link(1)], neighbours=[neigh(1, "192.0.2.2")],
             routes=[route("203.0.113.0/24", ("192.0.2.2", 1, 1)),
                     route("198.51.100.0/24", ("192.0.2.2", 1, 1))])
    # a new daemon on the same maps: ids above the old ones, then a sweep
    new = Mirror(maps=old.maps, first_id=100)
    new.sync(links=[link(1)], neighbours=[neigh(1, "192.0.2.2")],
             routes=[route("203.0.113.0/24", ("192.0.2.2", 1, 1))])
    assert set(new.routes()) == {"203.0.113.0/24", "198.51.100.0/24"}  # not yet swept
    swept = new.sweep()
    assert swept >= 2
    assert set(new.routes()) == {"203.0.113.0/24"}
    assert new.paths("203.0.113.0/24") == {("192.0.2.2", 1, 1, True)}


def test_full_map_is_counted_not_fatal(m: Mirror) -> None:
    small = Mirror(maps=MemoryMaps(capacity={"routes_v4": 2}))
    small.sync(links=[link(1)], neighbours=[neigh(1, "192.0.2.2")])
    small.add(*(route(f"203.0.{i}.0/24", ("192.0.2.2", 1, 1)) for i in range(5)))
    assert len(small.routes()) == 2
    assert small.writer.stats.full == 1
    assert len(small.writer.unwritten) == 3


@given(st.lists(st.integers(1, 256), min_size=1, max_size=16))
def test_weighted_buckets_follow_weights(weights: list[int]) -> None:
    members = [(i + 1, w) for i, w in enumerate(weights)]
    buckets = weighted_buckets(members)
    if len(members) == 1:
        assert buckets == (1,)
        return
    assert len(buckets) == GROUP_BUCKETS
    share = Counter(buckets)
    total = sum(weights)
    exact = {mid: GROUP_BUCKETS * w / total for mid, w in members}
    clamped = sum(1 for e in exact.values() if e < 1)
    for mid, _ in members:
        assert share[mid] >= 1
        assert abs(share[mid] - exact[mid]) < 1 + clamped


def test_path_copies_keep_every_field_of_the_model() -> None:
    """routes.py builds the model's objects by hand where a path dies or revives (a
    dataclasses.replace costs 4x): a field added to Route or Nexthop must be copied."""
    # every field set to something other than its default
    nexthop = Nexthop(7, bytes(range(4)), AF_INET, 3, 0x40, 5)
    route = Route(Prefix.parse("198.51.100.0/24"), 100, RouteType.BLACKHOLE, 186, 253, 20, 8,
                  (nexthop,), 0, 1400, 0x200)
    for f in dataclasses.fields(Nexthop):
        assert getattr(nexthop, f.name) != f.default, f.name
    for f in dataclasses.fields(Route):
        if f.name != "nhid":  # a route over an object carries no inline paths
            assert getattr(route, f.name) != f.default, f.name
    other = (Nexthop(9),)
    assert routes._with_nexthops(route, other) == dataclasses.replace(route, nexthops=other)
    dead = routes._dead(nexthop)
    assert dead == dataclasses.replace(nexthop, flags=0x40 | RTNH_F_DEAD)
    assert routes._alive(dead) == nexthop
