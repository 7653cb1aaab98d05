"""verify's judgement: what a pass may compare, and what it must leave to the next one."""

from __future__ import annotations

from fibsync.fastpath.maps import RouteTable
from fibsync.fastpath.writer import MapWriter, MemoryMaps, route_key
from fibsync.model import (
    AF_INET,
    AF_INET6,
    NUD_REACHABLE,
    Change,
    Link,
    Neighbour,
    Nexthop,
    NexthopObject,
    Op,
    Prefix,
    Route,
    Snapshot,
)
from fibsync.rib import Filter, Rib
from fibsync.verify import Entries, InFlight, Side, entry_of, expected_table

GW4 = bytes([192, 0, 2, 2])
GW6 = bytes.fromhex("20010db8000000000000000000000002")
MAC = bytes.fromhex("020000000002")
UP = 0x1 | 0x40 | 0x10000


def world(*routes: Route, nexthops: tuple[NexthopObject, ...] = ()) -> Snapshot:
    return Snapshot(
        links=[Link(3, "e0", bytes(6), 1500, UP)],
        neighbours=[Neighbour(AF_INET, 3, GW4, MAC, NUD_REACHABLE),
                    Neighbour(AF_INET6, 3, GW6, MAC, NUD_REACHABLE)],
        nexthops=list(nexthops), routes=list(routes))


def via4(prefix: str, **kw: object) -> Route:
    return Route(Prefix.parse(prefix), nexthops=(Nexthop(3, GW4, AF_INET),), **kw)  # type: ignore[arg-type]


def via6(prefix: str) -> Route:
    return Route(Prefix.parse(prefix), nexthops=(Nexthop(3, GW6, AF_INET6),))


def side(kernel: Snapshot, maps: Snapshot, inflight: InFlight | None = None) -> Side:
    expected, rib = expected_table(kernel, Filter())
    actual, _ = expected_table(maps, Filter())
    inflight = inflight or InFlight()
    inflight.nhids = rib.objects_using(inflight.nhids)
    return Side(Entries(expected), Entries(actual), inflight, rib)


def test_the_kernel_side_describes_what_the_program_does() -> None:
    kernel, _ = expected_table(world(via4("198.51.100.0/24"), via6("2001:db8:1::/48")),
                               Filter())
    doc = kernel.doc(route_key(Prefix.parse("198.51.100.0/24")))
    assert doc is not None
    assert entry_of(doc) == ("unicast", "", (("192.0.2.2", 3, 1, True, "02:00:00:00:00:02",
                                              1500),))
    assert kernel.doc(route_key(Prefix.parse("2001:db8:1::/48"))) is not None


def test_fast_path_ids_take_no_part() -> None:
    """The same routes written in another order get other ids: still equal."""
    a = world(via4("198.51.100.0/24"), via4("203.0.113.0/24", metric=5))
    b = world(via4("203.0.113.0/24", metric=5), via4("198.51.100.0/24"))
    found, unjudged = side(a, b).differing()
    assert (found, unjudged) == ({}, 0)


def test_a_route_missing_from_the_maps_is_found() -> None:
    found, _ = side(world(via4("198.51.100.0/24"), via6("2001:db8:1::/48")),
                    world(via4("198.51.100.0/24"))).differing()
    assert list(found) == [Prefix.parse("2001:db8:1::/48")]
    kernel, maps = found[Prefix.parse("2001:db8:1::/48")]
    assert kernel is not None and kernel[0] == "unicast" and maps is None


def test_a_stale_next_hop_is_found() -> None:
    moved = Route(Prefix.parse("198.51.100.0/24"),
                  nexthops=(Nexthop(3, bytes([192, 0, 2, 3]), AF_INET),))
    found, _ = side(world(via4("198.51.100.0/24")), world(moved)).differing()
    assert list(found) == [Prefix.parse("198.51.100.0/24")]


def test_a_prefix_that_changed_while_read_is_left_to_the_next_pass() -> None:
    inflight = InFlight()
    inflight.note(Change(Op.ADD, via6("2001:db8:1::/48")))
    found, unjudged = side(world(via6("2001:db8:1::/48")), world(), inflight).differing()
    assert (found, unjudged) == ({}, 1)


def test_absence_is_not_judged_after_an_ipv6_delete() -> None:
    """The kernel's IPv6 dump may skip live routes after a delete: the maps' extra
    route may be one of them."""
    inflight = InFlight()
    inflight.note(Change(Op.DEL, via6("2001:db8:9::/48")))
    found, unjudged = side(world(), world(via6("2001:db8:1::/48")), inflight).differing()
    assert (found, unjudged) == ({}, 1)
    # a route the kernel has and the maps lack is still judged: a dump invents nothing
    found, _ = side(world(via6("2001:db8:1::/48")), world(), inflight).differing()
    assert list(found) == [Prefix.parse("2001:db8:1::/48")]


def test_an_ipv4_delete_spares_other_addresses() -> None:
    """An IPv4 dump can skip only an alias of the same trie leaf (same address)."""
    inflight = InFlight()
    inflight.note(Change(Op.DEL, via4("198.51.100.0/25")))
    found, unjudged = side(world(), world(via4("198.51.100.0/24"), via4("203.0.113.0/24")),
                           inflight).differing()
    assert list(found) == [Prefix.parse("203.0.113.0/24")] and unjudged == 1


def test_next_hops_in_flight_are_not_judged() -> None:
    for change in (Change(Op.ADD, Link(3, "e0", bytes(6), 9000, UP)),
                   Change(Op.ADD, Neighbour(AF_INET, 3, GW4, MAC, NUD_REACHABLE))):
        inflight = InFlight()
        inflight.note(change)
        moved = Route(Prefix.parse("198.51.100.0/24"),
                      nexthops=(Nexthop(3, bytes([192, 0, 2, 3]), AF_INET),))
        found, unjudged = side(world(via4("198.51.100.0/24")), world(moved),
                               inflight).differing()
        assert (found, unjudged) == ({}, 1), change


def test_routes_over_a_changed_nexthop_object_or_its_groups_are_not_judged() -> None:
    objs = (NexthopObject(7, AF_INET, 3, GW4), NexthopObject(8, group=((7, 1),)))
    snapshot = world(Route(Prefix.parse("198.51.100.0/24"), nhid=8), nexthops=objs)
    rib = Rib(Filter())
    rib.resync(snapshot)
    assert rib.objects_using({7}) == {7, 8}
    assert rib.nhids_of(Prefix.parse("198.51.100.0/24")) == {8}
    assert side(snapshot, world(), InFlight(nhids={7})).differing() == ({}, 1)
    # the same difference, nothing in flight: judged
    assert len(side(snapshot, world()).differing()[0]) == 1


def test_an_overrun_judges_nothing() -> None:
    found, unjudged = side(world(via4("198.51.100.0/24")), world(),
                           InFlight(overrun=True)).differing()
    assert (found, unjudged) == ({}, 1)


def test_the_maps_side_reads_what_the_writer_wrote() -> None:
    """Both sides go through one writer and one decoder: a lost map entry shows."""
    rib = Rib(Filter())
    rib.resync(world(via4("198.51.100.0/24"), via4("203.0.113.0/24")))
    memory = MemoryMaps()
    MapWriter(memory, v4_table="lpm").write(rib.take_diff())
    key = next(k for k in memory.maps["routes_v4"] if k[4:8] == bytes([203, 0, 113, 0]))
    del memory.maps["routes_v4"][key]
    expected, rib = expected_table(world(via4("198.51.100.0/24"), via4("203.0.113.0/24")),
                                   Filter())
    s = Side(Entries(expected), Entries(RouteTable(memory)), InFlight(), rib)
    assert s.differing()[0].keys() == {Prefix.parse("203.0.113.0/24")}
