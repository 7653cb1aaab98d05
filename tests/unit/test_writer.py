"""MapWriter on in-memory maps: encoding, write order, and the DIR-24-8 table
kept equal to the LPM trie through loads, changes, deletes and full maps."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest

from fibsync.errors import MapError
from fibsync.fastpath import abi
from fibsync.fastpath.abi import CONFIG, NEXTHOP, ROUTE, V4_KEY
from fibsync.fastpath.maps import route_key_prefix
from fibsync.fastpath.writer import MapWriter, MemoryMaps, neigh_key, route_key
from fibsync.model import Prefix
from fibsync.rib import Action, FastPathDiff, FpNexthop, FpRoute


def fwd(nh: int) -> FpRoute:
    return FpRoute(Action.FORWARD, nh_id=nh)


def diff(routes: dict[str, FpRoute | None]) -> FastPathDiff:
    return FastPathDiff(routes={Prefix.parse(p): e for p, e in routes.items()})


def config(maps: MemoryMaps) -> tuple[int, int, int, int, int]:
    raw = maps.maps.get("config", {}).get(b"\0\0\0\0", CONFIG.pack(0, 0, 0, 0, 0))
    return CONFIG.unpack(raw)  # type: ignore[return-value]


def dir24_agrees_with_lpm(writer: MapWriter, maps: MemoryMaps, addrs: list[int]) -> list[str]:
    """Every address answered alike by the DIR-24-8 table and routes_v4."""
    assert writer.dir24 is not None
    bad = []
    for a in addrs:
        lpm = maps.match("routes_v4", V4_KEY.pack(32, a.to_bytes(4, "big")))
        want = None if lpm is None else lpm[:7] + b"\0"
        got = writer.dir24.lookup(a)
        if want != got:
            bad.append(f"{a:#010x}: lpm {want!r} dir24 {got!r}")
    return bad


def probe_addrs(prefixes: list[Prefix], rng: random.Random) -> list[int]:
    out = []
    for p in prefixes:
        a = int.from_bytes(p.addr, "big")
        out += [a, a + (1 << (32 - p.length)) - 1]
    return out + [(10 << 24) | rng.randrange(1 << 20) for _ in range(1000)]


def random_prefix(rng: random.Random) -> Prefix:
    length = rng.choice([8, 12, 16, 18, 20, 22, 24, 24, 24, 25, 27, 30, 32])
    n = ((10 << 24) | rng.randrange(1 << 20)) >> (32 - length) << (32 - length)
    return Prefix.of(2, n.to_bytes(4, "big"), length)


def test_route_values_carry_the_prefix_length() -> None:
    maps = MemoryMaps()
    MapWriter(maps).write(diff({"10.0.0.0/8": fwd(1), "2001:db8::/32": fwd(2)}))
    assert ROUTE.unpack(maps.maps["routes_v4"][route_key(Prefix.parse("10.0.0.0/8"))]) == \
        (1, 0, 0, 0, 8)
    assert ROUTE.unpack(maps.maps["routes_v6"][route_key(Prefix.parse("2001:db8::/32"))])[4] \
        == 32


class Recording(MemoryMaps):
    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[str, str, list[bytes]]] = []

    def update(self, name: str, items: list[tuple[bytes, bytes]]) -> None:
        self.log.append(("set", name, [k for k, _ in items]))
        super().update(name, items)

    def delete(self, name: str, keys: list[bytes]) -> None:
        self.log.append(("del", name, list(keys)))
        super().delete(name, keys)

    def items(self, name: str) -> Iterator[tuple[bytes, bytes]]:
        return super().items(name)


def test_write_order_nexthops_then_longest_routes_then_deletes() -> None:
    maps = Recording()
    writer = MapWriter(maps)
    nh = FpNexthop(1, 1500, True, False, 2, b"\2" * 6, b"\4" * 6, bytes(16))
    writer.write(FastPathDiff(nexthops={5: nh}, routes={Prefix.parse("10.9.0.0/16"): fwd(5)}))
    maps.log.clear()
    writer.write(FastPathDiff(
        nexthops={6: nh, 5: None},
        routes={Prefix.parse("10.0.0.0/8"): fwd(6), Prefix.parse("10.1.2.0/24"): fwd(6),
                Prefix.parse("10.9.0.0/16"): None}))
    kinds = [(op, name) for op, name, _ in maps.log]
    assert kinds.index(("set", "nexthops")) < kinds.index(("set", "routes_v4")) \
        < kinds.index(("del", "routes_v4")) < kinds.index(("del", "nexthops"))
    routes = next(keys for op, name, keys in maps.log if (op, name) == ("set", "routes_v4"))
    assert [V4_KEY.unpack(k)[0] for k in routes] == [24, 8]


def test_sweep_keeps_what_its_key_tests_keep_and_deletes_routes_first() -> None:
    maps = Recording()
    writer = MapWriter(maps)
    nh = FpNexthop(1, 1500, True, False, 2, b"\2" * 6, b"\4" * 6, bytes(16))
    neighbour = (1, 2, bytes([192, 0, 2, 2]))
    writer.write(FastPathDiff(
        nexthops={5: nh, 6: nh},
        routes={Prefix.parse(p): fwd(5) for p in ("10.0.0.0/8", "10.1.0.0/16", "2001:db8::/32")},
        neighbours={neighbour: b"\2" * 6, (1, 2, bytes([192, 0, 2, 3])): b"\3" * 6}))
    maps.log.clear()
    kept = {Prefix.parse("10.1.0.0/16"), Prefix.parse("2001:db8::/32")}

    def holds(family: int, addr: bytes, length: int) -> bool:
        return Prefix(family, addr, length) in kept

    assert writer.sweep(holds, {5}, set(), {neighbour}) == 3
    assert {Prefix(*route_key_prefix(k)) for name in ("routes_v4", "routes_v6")
            for k in maps.maps[name]} == kept
    assert set(maps.maps["nexthops"]) == {abi.U32.pack(5)}
    assert list(maps.maps["neighbours"]) == [neigh_key(neighbour)]
    deleted = [name for op, name, keys in maps.log if op == "del" and keys]
    assert deleted == ["routes_v4", "nexthops", "neighbours"]


def test_dir24_is_loaded_on_the_first_write_then_selected() -> None:
    maps = MemoryMaps(dir24=True)
    writer = MapWriter(maps)
    assert writer.v4_table == "dir24"
    assert config(maps)[3] == abi.FS_V4_LPM
    writer.write(diff({"10.0.0.0/8": fwd(1), "10.1.0.0/25": fwd(2)}))
    assert writer.dir24 is not None and writer.dir24.stats.loads == 1
    assert config(maps)[3] == abi.FS_V4_DIR24
    assert writer.dir24.lookup(0x0A010001) == ROUTE.pack(2, 0, 0, 0, 0)
    assert writer.dir24.lookup(0x0A020001) == ROUTE.pack(1, 0, 0, 0, 0)


def test_selecting_the_table_keeps_the_other_config_fields() -> None:
    maps = MemoryMaps(dir24=True)
    maps.update("config", [(b"\0\0\0\0", CONFIG.pack(1, 1, abi.FS_CFG_PASS_FRAGMENTS, 0, 0))])
    MapWriter(maps).write(diff({"10.0.0.0/8": fwd(1)}))
    assert config(maps) == (1, 1, abi.FS_CFG_PASS_FRAGMENTS, abi.FS_V4_DIR24, abi.FS_V6_LPM)


def test_lpm_mode_leaves_dir24_alone() -> None:
    maps = MemoryMaps(dir24=True)
    maps.update("config", [(b"\0\0\0\0", CONFIG.pack(0, 0, 0, abi.FS_V4_DIR24, 0))])
    writer = MapWriter(maps, v4_table="lpm")
    writer.write(diff({"10.0.0.0/8": fwd(1)}))
    assert writer.dir24 is None
    assert config(maps)[3] == abi.FS_V4_LPM
    assert not any(maps.buffers["v4_tbl24"][:])


def test_dir24_needs_its_arrays() -> None:
    with pytest.raises(MapError):
        MapWriter(MemoryMaps(), v4_table="dir24")
    assert MapWriter(MemoryMaps()).v4_table == "lpm"


@pytest.mark.parametrize("seed", range(3))
def test_dir24_follows_every_change_of_routes_v4(seed: int) -> None:
    rng = random.Random(seed)
    maps = MemoryMaps(dir24=True, tbl8_groups=2048)
    writer = MapWriter(maps)
    live: dict[Prefix, FpRoute] = {random_prefix(rng): fwd(rng.randrange(1, 5))
                                   for _ in range(300)}
    writer.write(FastPathDiff(routes=dict(live)))
    assert dir24_agrees_with_lpm(writer, maps, probe_addrs(list(live), rng)) == []
    for _ in range(10):
        change: dict[Prefix, FpRoute | None] = {}
        for p in rng.sample(sorted(live), 20):
            change[p] = None
        for _ in range(30):
            change[random_prefix(rng)] = fwd(rng.randrange(1, 5))
        for p, e in change.items():
            if e is None:
                live.pop(p, None)
            else:
                live[p] = e
        writer.write(FastPathDiff(routes=change))
        assert dir24_agrees_with_lpm(writer, maps, probe_addrs(list(live), rng)) == []


def test_a_prefix_routes_v4_cannot_take_stays_out_of_dir24() -> None:
    maps = MemoryMaps(dir24=True, capacity={"routes_v4": 2})
    writer = MapWriter(maps)
    writer.write(diff({"10.0.0.0/8": fwd(1), "10.1.0.0/16": fwd(2), "10.1.2.0/24": fwd(3)}))
    # longest first: the /8 found the map full
    assert writer.unwritten == {Prefix.parse("10.0.0.0/8")}
    assert writer.stats.full == 1
    assert writer.dir24 is not None
    assert writer.dir24.lookup(0x0A090000) is None
    assert dir24_agrees_with_lpm(writer, maps, [0x0A010203, 0x0A010300, 0x0A090000]) == []


def test_a_large_first_write_that_routes_v4_cannot_take_whole_keeps_dir24_to_it() -> None:
    """The first write's DIR-24-8 load, of a table too big for routes_v4: it holds
    only what routes_v4 took, and answers as routes_v4 does."""
    rng = random.Random(5)
    live: dict[Prefix, FpRoute] = {}
    while len(live) < 24000:
        live[random_prefix(rng)] = fwd(rng.randrange(1, 5))
    maps = MemoryMaps(dir24=True, tbl8_groups=4097, capacity={"routes_v4": 23000})
    writer = MapWriter(maps)
    writer.write(FastPathDiff(routes=dict(live)))
    assert len(writer.unwritten) == 1000 and writer.stats.full == 1
    assert writer.dir24 is not None and writer.dir24.stats.loads == 1
    assert dir24_agrees_with_lpm(writer, maps, probe_addrs(list(live), rng)) == []


def test_a_route_without_a_tbl8_group_is_unwritten_and_handed_to_the_kernel() -> None:
    maps = MemoryMaps(dir24=True, tbl8_groups=2)
    writer = MapWriter(maps)
    writer.write(diff({"10.0.0.0/8": fwd(1), "10.0.1.0/25": fwd(2)}))
    writer.write(diff({"10.0.2.0/25": fwd(3)}))
    assert writer.unwritten == {Prefix.parse("10.0.2.0/25")}
    assert writer.stats.full == 1 and "v4_tbl8" in writer.stats.last_error
    assert writer.dir24 is not None
    assert ROUTE.unpack(writer.dir24.lookup(0x0A000201) or b"")[1] == abi.FS_ACT_FIB


def test_dir24_slots_follow_nexthop_changes() -> None:
    maps = MemoryMaps(dir24=True)
    writer = MapWriter(maps)
    nh = FpNexthop(3, 1500, True, False, 2, b"\2" * 6, b"\4" * 6, bytes(16))
    writer.write(FastPathDiff(nexthops={5: nh}, routes={Prefix.parse("10.0.0.0/8"): fwd(5)}))
    assert writer.dir24 is not None
    assert writer.dir24.nexthop_copy(0x0A000001) == maps.maps["nexthops"][b"\5\0\0\0"]
    moved = FpNexthop(4, 1500, True, False, 2, b"\2" * 6, b"\6" * 6, bytes(16))
    writer.write(FastPathDiff(nexthops={5: moved}))
    assert writer.dir24.nexthop_copy(0x0A000001) == maps.maps["nexthops"][b"\5\0\0\0"]
    assert NEXTHOP.unpack(writer.dir24.nexthop_copy(0x0A000001) or b"")[0] == 4
