"""The RIB's compact routes (a dump's columns) against the general path.

Two mirrors get the same kernel state: one as model objects only, the other
with every route of the common form as columns, the way the netlink source
hands over a full table. Then both take the same random changes — routes
replaced and deleted, nexthop objects changed, blackholed and deleted, links
going down, up and away — and after every step the maps they wrote must be
the same, entry for entry, and so must what the RIB reports.
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from fibsync.model import (
    AF_INET,
    AF_INET6,
    Change,
    Link,
    NexthopObject,
    Op,
    Prefix,
    Route,
    RouteColumns,
    RouteType,
    Snapshot,
)
from fibsync.rib import Filter

from .mirror import DOWN, UP, Mirror, addr, link, neigh, nh_obj, route

NLM_F_REPLACE, NLM_F_CREATE = 0x100, 0x400


def columns_of(routes: list[tuple[int, Route]], family: int) -> RouteColumns:
    """(ordinal, route) pairs as the columns netlink/columns.py makes."""
    rows = [(o, r) for o, r in routes if r.prefix.family == family]
    alen = 4 if family == AF_INET else 16

    def col(get: Any, dtype: Any) -> np.ndarray:  # type: ignore[type-arg]
        return np.array([get(r) for _, r in rows], dtype)

    return RouteColumns(
        family=family,
        ordinal=np.array([o for o, _ in rows], np.int64),
        dst=np.frombuffer(b"".join(r.prefix.addr for _, r in rows), np.uint8).reshape(-1, alen),
        dst_len=col(lambda r: r.prefix.length, np.uint8),
        tos=col(lambda r: r.tos, np.uint8),
        table=col(lambda r: r.table, np.uint32),
        protocol=col(lambda r: r.protocol, np.uint8),
        scope=col(lambda r: r.scope, np.uint8),
        type=col(lambda r: int(r.type), np.uint8),
        flags=col(lambda r: r.flags, np.uint32),
        metric=col(lambda r: r.metric, np.uint32),
        nhid=col(lambda r: r.nhid, np.uint32),
    )


def split(snapshot: Snapshot) -> Snapshot:
    """The same snapshot with every route over a nexthop object as columns."""
    objects, ordinals, rows = [], [], []
    for i, r in enumerate(snapshot.routes):
        if r.nhid:
            rows.append((i, replace(r, nexthops=())))
        else:
            objects.append(r)
            ordinals.append(i)
    cols = [columns_of(rows, f) for f in (AF_INET, AF_INET6)]
    return replace(snapshot, routes=objects, route_ordinals=ordinals,
                   route_columns=[c for c in cols if len(c)])


def v4(rng: random.Random) -> str:
    length = rng.choice([16, 20, 22, 24, 24, 24, 28, 32])
    a = rng.randrange(0xC6120000, 0xC6140000) >> (32 - length) << (32 - length)  # 198.18/15
    return f"{a >> 24}.{a >> 16 & 255}.{a >> 8 & 255}.{a & 255}/{length}"


def v6(rng: random.Random) -> str:
    length = rng.choice([32, 40, 48, 48, 64])
    a = (0x20010DB8 << 96 | rng.getrandbits(96)) >> (128 - length) << (128 - length)
    groups = [(a >> (112 - 16 * i)) & 0xFFFF for i in range(8)]
    return ":".join(f"{g:x}" for g in groups) + f"/{length}"


V4_OBJECTS = [10, 11, 12, 30]
V6_OBJECTS = [20, 21, 40]


def objects() -> list[NexthopObject]:
    return [nh_obj(10, "192.0.2.2", 1), nh_obj(11, "198.51.100.2", 2),
            nh_obj(12, "203.0.113.2", 3), nh_obj(13, "203.0.113.3", 3),
            nh_obj(20, "2001:db8:1::2", 1), nh_obj(21, "2001:db8:2::2", 2),
            nh_obj(30, group=((10, 1), (11, 2))), nh_obj(40, group=((20, 1), (21, 1))),
            nh_obj(50, blackhole=True)]


def kernel_state(rng: random.Random, count: int) -> Snapshot:
    routes: list[Route] = []
    for _ in range(count):
        family = rng.random() < 0.75
        prefix = v4(rng) if family else v6(rng)
        nhid = rng.choice(V4_OBJECTS if family else V6_OBJECTS)
        kind = rng.random()
        if kind < 0.75:
            routes.append(route(prefix, nhid=nhid))
        elif kind < 0.8:
            routes.append(route(prefix, nhid=nhid, table=100))  # not followed
        elif kind < 0.85:
            routes.append(route(prefix, nhid=50, type=RouteType.BLACKHOLE))
        elif kind < 0.9:
            # the same prefix twice: over an object and inline, other metrics
            routes.append(route(prefix, nhid=nhid, metric=10))
            gw = ("192.0.2.2", 1, 1) if family else ("2001:db8:1::2", 1, 1)
            routes.append(route(prefix, gw, metric=20))
        elif kind < 0.95:
            routes.append(route(prefix, nhid=nhid, protocol=2))  # another protocol
        else:
            gw = ("198.51.100.2", 2, 1) if family else ("2001:db8:2::2", 2, 1)
            routes.append(route(prefix, gw))  # inline only
    local = [route("192.0.2.1/32", (None, 1, 1), type=RouteType.LOCAL, table=255)]
    return Snapshot(
        links=[link(1), link(2), link(3)],
        addresses=[addr(1, "192.0.2.1/24"), addr(2, "198.51.100.1/24"),
                   addr(3, "203.0.113.1/24"), addr(1, "2001:db8:1::1/64"),
                   addr(2, "2001:db8:2::1/64")],
        neighbours=[neigh(1, "192.0.2.2"), neigh(2, "198.51.100.2"), neigh(3, "203.0.113.2"),
                    neigh(1, "2001:db8:1::2"), neigh(2, "2001:db8:2::2")],
        nexthops=objects(),
        routes=routes + local,
    )


def random_change(rng: random.Random, routes: list[Route]) -> list[Change]:
    kind = rng.random()
    held = rng.choice(routes)
    family = held.prefix.family == AF_INET
    if kind < 0.3:  # a followed route replaced: another object or inline
        nhid = rng.choice(V4_OBJECTS if family else V6_OBJECTS)
        new = replace(held, nhid=nhid) if rng.random() < 0.7 else \
            route(str(held.prefix), ("192.0.2.2", 1, 1) if family else ("2001:db8:1::2", 1, 1))
        return [Change(Op.ADD, new, NLM_F_REPLACE | NLM_F_CREATE)]
    if kind < 0.5:
        return [Change(Op.DEL, held)]
    if kind < 0.6:  # a second route on a held prefix, another metric
        return [Change(Op.ADD, replace(held, metric=held.metric + 5), NLM_F_CREATE)]
    if kind < 0.7:  # an object gets another gateway, or turns blackhole
        obj = rng.choice([o for o in objects() if not o.group and not o.blackhole])
        new = replace(obj, blackhole=True, ifindex=0, gateway=None) if rng.random() < 0.3 \
            else replace(obj, ifindex=rng.choice([1, 2]))
        return [Change(Op.ADD, new)]
    if kind < 0.75:  # a group loses or regains a member
        return [Change(Op.ADD, rng.choice([nh_obj(30, group=((10, 1),)),
                                           nh_obj(30, group=((10, 1), (11, 2), (12, 1))),
                                           nh_obj(40, group=((21, 1),))]))]
    if kind < 0.8:
        return [Change(Op.DEL, nh_obj(rng.choice([11, 12, 21, 30])))]
    if kind < 0.9:  # a link goes down (no carrier, or admin) and comes back
        ifindex = rng.choice([1, 2, 3])
        flags = rng.choice([DOWN, 0x1])
        return [Change(Op.ADD, link(ifindex, flags)), Change(Op.ADD, link(ifindex, UP))]
    if kind < 0.95:
        return [Change(Op.DEL, Link(rng.choice([2, 3]), "gone"))]
    # an object comes (back) and routes over it
    obj = rng.choice(objects())
    return [Change(Op.ADD, obj), Change(Op.ADD, route(v4(rng), nhid=10), NLM_F_CREATE)]


def same(general: Mirror, compact: Mirror) -> None:
    assert compact.routes() == general.routes()
    assert dict(compact.rib.entries) == dict(general.rib.entries)
    assert compact.rib.counts() == general.rib.counts()
    # counted as they change, not scanned: the counts must still be what a scan says
    for m in (general, compact):
        held = dict(m.rib.entries)
        v4 = sum(1 for p in held if p.family == AF_INET)
        assert (m.rib.counts()["routes_v4"], m.rib.counts()["routes_v6"]) == (v4, len(held) - v4)
    assert compact.rib.stats["ignored"] == general.rib.stats["ignored"]


@pytest.mark.parametrize("seed", range(8))
def test_compact_routes_behave_as_general_ones(seed: int) -> None:
    rng = random.Random(seed)
    snapshot = kernel_state(rng, 400)
    general, compact = Mirror(), Mirror()
    general.rib.resync(snapshot)
    general._flush()
    compact.rib.resync(split(snapshot))
    compact._flush()
    assert len(compact.rib.kernel.compact) > 200  # the columns took
    same(general, compact)
    routes = list(snapshot.routes)
    for step in range(150):
        changes = random_change(rng, routes)
        routes += [c.obj for c in changes if isinstance(c.obj, Route) and c.op is Op.ADD]
        general.rib.apply(changes)
        general._flush()
        compact.rib.apply(changes)
        compact._flush()
        same(general, compact)
        if step % 50 == 49:
            # a resync (after an overrun) with the first dump again: only differences written
            general.rib.resync(snapshot)
            general._flush()
            compact.rib.resync(split(snapshot))
            compact._flush()
            same(general, compact)


def test_a_resync_writes_only_what_changed() -> None:
    snapshot = kernel_state(random.Random(7), 300)
    m = Mirror()
    m.rib.resync(split(snapshot))
    m._flush()
    first = m.writes[-1]
    m.rib.resync(split(snapshot))
    m._flush()
    assert first > 250 and m.writes[-1] == 0
    # one object turned blackhole between the dumps: what changed entry is written, no more
    before = dict(m.rib.entries)
    moved = replace(snapshot, nexthops=[o if o.id != 11 else replace(o, blackhole=True)
                                        for o in snapshot.nexthops])
    m.rib.resync(split(moved))
    after = dict(m.rib.entries)
    diff = m.rib.take_diff()
    written = {p for rows in diff.bulk for p, _ in rows.items()} | set(diff.routes)
    changed = {p for p in after if before.get(p) != after[p]}
    assert changed and written == changed
    assert all(after[p].action.name == "DROP" for p in changed)


def test_filtered_protocols_and_tables_stay_out() -> None:
    snapshot = kernel_state(random.Random(3), 200)
    only = Filter(table=254, protocols=frozenset({186}))
    general, compact = Mirror(only), Mirror(only)
    general.rib.resync(snapshot)
    general._flush()
    compact.rib.resync(split(snapshot))
    compact._flush()
    same(general, compact)
    assert all(r["prefix"] for r in compact.routes().values())
    followed = {str(r.prefix) for r in snapshot.routes
                if r.table == 254 and r.protocol == 186 and r.nhid}
    assert followed <= set(compact.routes())


def test_prefix_of_a_compact_route_round_trips() -> None:
    m = Mirror()
    snap = Snapshot(links=[link(1)], neighbours=[neigh(1, "192.0.2.2"), neigh(1, "2001:db8::2")],
                    nexthops=[nh_obj(10, "192.0.2.2", 1), nh_obj(20, "2001:db8::2", 1)],
                    routes=[route("0.0.0.0/0", nhid=10), route("255.255.255.255/32", nhid=10),
                            route("::/0", nhid=20), route("ffff::/16", nhid=20),
                            route("2001:db8:ffff:ffff:ffff:ffff:ffff:ffff/128", nhid=20)])
    m.rib.resync(split(snap))
    m._flush()
    assert set(m.rib.entries) == {r.prefix for r in snap.routes}
    assert set(m.routes()) == {str(r.prefix) for r in snap.routes}
    assert Prefix.parse("::/0") in m.rib.entries and m.rib.kernel.compact.count(AF_INET6) == 3


@pytest.mark.parametrize("nlflags", [0, NLM_F_REPLACE], ids=["no-flags", "replace"])
def test_routes_announced_again_over_a_replaced_object_change_nothing(nlflags: int) -> None:
    """nexthop_compat_mode=1 (the kernel's default): replacing an object announces
    every route over it again, a full table's worth under one of FRR's objects. Each
    decodes as the route held (the object decides; test_decode: no inline paths on a
    route over an object): the compact ones stay compact, and the object's new
    nexthop is all that is written."""
    prefixes = [f"198.18.{i}.0/24" for i in range(100)] + [f"2001:db8:{i:x}::/48"
                                                          for i in range(50)]
    m = Mirror()
    m.rib.resync(split(Snapshot(
        links=[link(1)], neighbours=[neigh(1, "192.0.2.2"), neigh(1, "192.0.2.3")],
        nexthops=[nh_obj(10, "192.0.2.2", 1)],
        routes=[route(p, nhid=10) for p in prefixes] + [route("203.0.113.0/24", nhid=10,
                                                              metric=7)])))
    m._flush()
    # one route changed since the dump (another protocol): a general one now
    m.apply(Change(Op.ADD, route("203.0.113.0/24", nhid=10, metric=7, protocol=12),
                   NLM_F_REPLACE))
    assert len(m.rib.kernel.compact) == 150 and len(m.rib.kernel.routes) == 1
    general = m.rib.kernel.routes[Prefix.parse("203.0.113.0/24")]
    before = m.routes()
    diff_before = len(m.writes)

    m.rib.apply([Change(Op.ADD, nh_obj(10, "192.0.2.3", 1))]
                + [Change(Op.ADD, route(p, nhid=10), nlflags) for p in prefixes]
                + [Change(Op.ADD, route("203.0.113.0/24", nhid=10, metric=7, protocol=12),
                          nlflags)])
    diff = m.rib.take_diff()
    assert not diff.routes and not diff.bulk, "no route entry is written again"
    assert list(diff.nexthops) and all(nh for nh in diff.nexthops.values())
    m.writer.write(diff)
    assert len(m.rib.kernel.compact) == 150 and len(m.rib.kernel.routes) == 1
    assert m.rib.kernel.routes[Prefix.parse("203.0.113.0/24")] == general
    after = m.routes()
    assert after.keys() == before.keys() and len(m.writes) == diff_before
    assert {h["gateway"] for e in after.values() for h in e["nexthops"]} == {"192.0.2.3"}
