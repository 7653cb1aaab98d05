"""verify's judgement: what a pass may compare, and what it must leave to the next one."""

from __future__ import annotations

import asyncio
import os
import random

import pytest

from fibsync import verify
from fibsync.errors import NetlinkOverrun
from fibsync.fastpath import abi, bpfsys
from fibsync.fastpath.abi import GROUP, NEXTHOP, ROUTE, U32, V4_KEY, V6_KEY
from fibsync.fastpath.maps import (
    RouteMap,
    RouteTable,
    _route_doc,
    read_routes,
    route_key_prefix,
)
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
    RouteType,
    Snapshot,
)
from fibsync.netlink import source
from fibsync.rib import Filter, Rib
from fibsync.verify import Entries, Entry, InFlight, Side, entry_of, expected_table

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


def test_a_local_address_without_its_local_v4_bit_is_a_difference() -> None:
    """The route map may equal the kernel while `local_v4` lacks a local address's bit:
    the program would forward from that source. verify says so, and a rewrite of the
    prefix (the audit's repair) puts the bit back."""
    ours = Route(Prefix.parse("198.51.100.9/32"), table=255, type=RouteType.LOCAL)
    snapshot = world(via4("198.51.100.0/24"), ours)
    rib = Rib(Filter())
    rib.resync(snapshot)
    memory = MemoryMaps()
    writer = MapWriter(memory, v4_table="lpm")
    writer.write(rib.take_diff())
    expected, krib = expected_table(snapshot, Filter())

    def differing() -> set[Prefix]:
        s = Side(Entries(expected), Entries(RouteTable(memory)), InFlight(), krib)
        return set(s.differing()[0])

    assert differing() == set()
    words = memory.maps["local_v4"]
    for k, v in list(words.items()):
        words[k] = bytes(len(v))  # every bit lost
    assert differing() == {Prefix.parse("198.51.100.9/32")}
    doc = RouteTable(memory).doc(route_key(Prefix.parse("198.51.100.9/32")))
    assert doc is not None and doc["reason"] == "PASS_LOCAL without its local_v4 bit"
    rib.rewrite(Prefix.parse("198.51.100.9/32"))  # the audit's repair rewrites the prefix
    writer.write(rib.take_diff())
    assert differing() == set()


# ------------------------------------------------------------ the comparison at numpy speed


def _random_maps(rng: random.Random, keys: list[bytes], ids: range) -> MemoryMaps:
    """Map contents as a writer (or a bug) could leave them: nexthops and groups under
    arbitrary ids, routes over a random part of ``keys`` pointing at them or at
    nothing, with every action."""
    memory = MemoryMaps()
    nexthops = []
    for i in ids:
        if rng.random() < 0.8:
            gw = bytes([192, 0, 2, rng.randrange(1, 4)])
            flags = rng.choice([0, abi.FS_NH_RESOLVED, abi.FS_NH_CONNECTED,
                                abi.FS_NH_RESOLVED | abi.FS_NH_CONNECTED])
            memory.update("nexthops", [(U32.pack(i), NEXTHOP.pack(
                rng.choice([3, 4]), rng.choice([1500, 9000]), flags, AF_INET, bytes(6),
                bytes([2, 0, 0, 0, 0, rng.randrange(1, 3)]), gw.ljust(16, b"\0")))])
            nexthops.append(i)
    for i in ids:
        if nexthops and rng.random() < 0.3:
            members = rng.sample(nexthops, min(len(nexthops), rng.randrange(1, 3)))
            weights = [rng.randrange(1, 3) for _ in members]
            pad = [0] * (abi.FS_GROUP_MEMBERS - len(members))
            memory.update("groups", [(U32.pack(i), GROUP.pack(
                abi.FS_GROUP_BUCKETS, *[0] * abi.FS_GROUP_BUCKETS, len(members), *members, *pad,
                *weights, *pad))])
    for key in keys:
        if rng.random() < 0.7:
            name = "routes_v4" if len(key) == V4_KEY.size else "routes_v6"
            action = rng.choice([0, 0, 0, 1, 2, 3])
            reason = rng.choice([abi.Reason.PASS_LOCAL, abi.Reason.PASS_UNREACHABLE])
            value = ROUTE.pack(rng.choice(ids), action, rng.choice([0, abi.FS_ROUTE_GROUP]),
                               reason if action == 2 else 0, U32.unpack_from(key)[0])
            memory.update(name, [(key, value)])
    return memory


def _random_keys(rng: random.Random) -> list[bytes]:
    keys = set()
    for _ in range(300):
        plen = rng.choice([8, 16, 24, 32])
        keys.add(V4_KEY.pack(plen, bytes([10, rng.randrange(4), rng.randrange(4), 0])))
        plen = rng.choice([32, 48, 64, 128])
        keys.add(V6_KEY.pack(plen, bytes.fromhex("20010db8") + bytes([rng.randrange(4)])
                             + bytes(10) + bytes([rng.randrange(2)])))
    return sorted(keys)


def _naive(kernel: MemoryMaps, maps: MemoryMaps) -> dict[Prefix, tuple[Entry | None,
                                                                       Entry | None]]:
    """Every key of both sides described and compared one by one."""
    sides = []
    for memory in (kernel, maps):
        table = RouteTable(memory)
        routes = {k: v for name in ("routes_v4", "routes_v6") for k, v in memory.items(name)}
        sides.append({k: entry_of(_route_doc(*route_key_prefix(k), v, table.nexthops,
                                             table.groups, table.names))
                      for k, v in routes.items()})
    out = {}
    for key in sides[0].keys() | sides[1].keys():
        ke, me = sides[0].get(key), sides[1].get(key)
        if ke != me:
            out[Prefix(*route_key_prefix(key))] = (ke, me)
    return out


def _renumbered(memory: MemoryMaps, by: int) -> MemoryMaps:
    """The same fast path under other nexthop and group ids (as another writer's)."""
    out = MemoryMaps()
    for k, v in memory.items("nexthops"):
        out.update("nexthops", [(U32.pack(U32.unpack(k)[0] + by), v)])
    for k, v in memory.items("groups"):
        fields = list(GROUP.unpack(v))
        n = fields[abi.FS_GROUP_BUCKETS + 1]
        for i in range(abi.FS_GROUP_BUCKETS + 2, abi.FS_GROUP_BUCKETS + 2 + n):
            fields[i] += by
        out.update("groups", [(U32.pack(U32.unpack(k)[0] + by), GROUP.pack(*fields))])
    for name in ("routes_v4", "routes_v6"):
        for k, v in memory.items(name):
            nh_id, *rest = ROUTE.unpack(v)
            out.update(name, [(k, ROUTE.pack(nh_id + by, *rest))])
    return out


@pytest.mark.parametrize("seed", range(30))
def test_the_comparison_finds_what_a_naive_one_finds(seed: int) -> None:
    """On random map contents (other nexthop ids, missing nexthops and groups, every
    action, prefixes on one side only) the vectorised comparison reports exactly the
    prefixes, and the entries, that describing each key one by one does."""
    rng = random.Random(seed)
    keys = _random_keys(rng)
    kernel = _random_maps(rng, keys, range(1, 8))
    if seed % 3 == 0:  # the kernel's maps under other ids, a few keys gone or changed
        maps = _renumbered(kernel, 50)
        for key in rng.sample(keys, 8):
            name = "routes_v4" if len(key) == V4_KEY.size else "routes_v6"
            if rng.random() < 0.5:
                maps.maps[name].pop(key, None)
            else:
                maps.update(name, [(key, ROUTE.pack(rng.randrange(48, 60), 0, 0, 0, 0))])
    elif seed % 3 == 1:  # the same maps, a next hop changed
        maps = MemoryMaps(maps={name: dict(entries) for name, entries in kernel.maps.items()})
        if maps.maps.get("nexthops"):
            key = rng.choice(sorted(maps.maps["nexthops"]))
            ifindex, mtu, *rest = NEXTHOP.unpack(maps.maps["nexthops"][key])
            maps.maps["nexthops"][key] = NEXTHOP.pack(ifindex, mtu + 1, *rest)
    else:  # unrelated contents
        maps = _random_maps(rng, keys, range(50, 58))
    s = Side(Entries(RouteTable(kernel)), Entries(RouteTable(maps)), InFlight(),
             Rib(Filter()))
    found, unjudged = s.differing()
    assert (found, unjudged) == (_naive(kernel, maps), 0)
    union = {k for m in (kernel, maps) for n in ("routes_v4", "routes_v6")
             for k in m.maps.get(n, {})}
    assert s.checked() == len(union)


def test_a_route_map_keeps_the_later_copy_of_a_key_read_twice() -> None:
    """An LPM trie's walk starts again from its first key when the current one is
    deleted meanwhile: the read then holds keys twice, the later copy the fresher."""
    a, b = V4_KEY.pack(24, bytes([10, 0, 0, 0])), V4_KEY.pack(16, bytes([10, 0, 0, 0]))
    old, new = ROUTE.pack(1, 0, 0, 0, 24), ROUTE.pack(2, 0, 0, 0, 24)
    rows = RouteMap(AF_INET, a + b + a, old + ROUTE.pack(1, 0, 0, 0, 16) + new)
    assert len(rows) == 2
    row = rows.find(a)
    assert row is not None and rows.values[row].tobytes() == new
    assert rows.prefix(row) == (bytes([10, 0, 0, 0]), 24)
    assert rows.find(V4_KEY.pack(8, bytes([10, 0, 0, 0]))) is None


def test_a_route_map_finds_every_key_and_sorts_by_prefix() -> None:
    rng = random.Random(7)
    keys = _random_keys(rng)
    for family, size in ((AF_INET, V4_KEY.size), (AF_INET6, V6_KEY.size)):
        mine = [k for k in keys if len(k) == size]
        rng.shuffle(mine)
        rows = RouteMap(family, b"".join(mine), b"".join(ROUTE.pack(i, 0, 0, 0, 0)
                                                         for i in range(len(mine))))
        assert [rows.find(k) for k in mine] == [
            sorted(mine, key=route_key_prefix).index(k) for k in mine]
        for i, k in enumerate(mine):
            row = rows.find(k)
            assert row is not None and U32.unpack(rows.values[row][:4].tobytes())[0] == i
            assert Prefix(family, *rows.prefix(row)) == Prefix(*route_key_prefix(k))
    empty = RouteMap(AF_INET6, b"", b"")
    assert len(empty) == 0 and empty.find(V6_KEY.pack(0, bytes(16))) is None


def test_routes_lists_every_entry_by_prefix() -> None:
    """``fibsync routes`` (read_routes): one document per key, by family, address, length."""
    rng = random.Random(3)
    memory = _random_maps(rng, _random_keys(rng), range(1, 8))
    table = RouteTable(memory)
    routes = {k: v for name in ("routes_v4", "routes_v6") for k, v in memory.items(name)}
    assert read_routes(memory) == [
        _route_doc(*route_key_prefix(k), routes[k], table.nexthops, table.groups, table.names)
        for k in sorted(routes, key=route_key_prefix)]


@pytest.mark.privileged
def test_a_whole_lpm_map_read_at_once_is_what_iterate_reads() -> None:
    fd = bpfsys.map_create(abi.MAP_LPM_TRIE, V4_KEY.size, ROUTE.size, 10000,
                           flags=abi.BPF_F_NO_PREALLOC, name="t_read_all")
    try:
        entries = [(V4_KEY.pack(24, i.to_bytes(3, "big") + b"\0"), ROUTE.pack(i, 0, 0, 0, 24))
                   for i in range(5000)]
        bpfsys.update_batch(fd, b"".join(k for k, _ in entries),
                            b"".join(v for _, v in entries), len(entries))
        keys, values, count = bpfsys.read_all(fd, batch=1000)
        listed = list(bpfsys.iterate(fd))
        assert count == len(listed) == 5000
        assert (keys, values) == (b"".join(k for k, _ in listed), b"".join(v for _, v in listed))
        assert sorted(listed) == sorted(entries)
    finally:
        os.close(fd)


def test_a_corrupt_entry_is_described_not_raised() -> None:
    """A nexthop of family 0 or a reason this build does not know (a corrupt map, or one
    another version wrote) still gets a document: `routes` and the audit keep going."""
    nexthops = {7: (3, 1500, abi.FS_NH_RESOLVED, 0, bytes(6), bytes(6), bytes(16))}
    doc = _route_doc(AF_INET, bytes([198, 51, 100, 0]), 24, ROUTE.pack(7, 0, 0, 0, 24),
                     nexthops, {}, {})
    assert doc["nexthops"][0]["gateway"] == "family 0 " + "00" * 16
    doc = _route_doc(AF_INET, bytes([198, 51, 100, 0]), 24, ROUTE.pack(0, 2, 0, 250, 24),
                     {}, {}, {})
    assert doc["reason"] == "reason 250"


class _Watch:
    """EventWatch without a socket: nothing announced."""

    def __init__(self, _netns: object = None) -> None:
        pass

    def drain(self) -> InFlight:
        return InFlight()

    def close(self) -> None:
        pass


@pytest.mark.parametrize("interrupted", [1, 3])
def test_an_interrupted_dump_is_taken_again_and_never_fails_the_pass(
        interrupted: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """NLM_F_DUMP_INTR (a table changed under the dump: links, often, in a storm) made
    the audit's child exit 1, and `fibsync verify` fail. Now the dump is taken again;
    interrupted every time, the pass judges nothing instead."""
    kernel = world(via4("198.51.100.0/24"))
    calls: list[int] = []

    async def dump(_self: object) -> Snapshot:
        calls.append(1)
        if len(calls) <= interrupted:
            raise NetlinkOverrun("links dump interrupted (NLM_F_DUMP_INTR)")
        return kernel

    monkeypatch.setattr(source.NetlinkSource, "dump", dump)
    monkeypatch.setattr(verify, "EventWatch", _Watch)
    maps = MemoryMaps()
    passed = asyncio.run(verify.one_pass(maps, Filter()))
    found, unjudged = passed.differing()
    if interrupted < verify.DUMP_ATTEMPTS:
        assert len(calls) == interrupted + 1
        assert list(found) == [Prefix.parse("198.51.100.0/24")]  # judged: the maps lack it
    else:
        assert len(calls) == verify.DUMP_ATTEMPTS
        assert passed.inflight.overrun and found == {}
