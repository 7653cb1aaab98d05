"""The IPv6 hash table: the lengths the writer keeps in v6_lengths lead the
program's probes to the longest matching prefix, through adds, deletes and
rebuilds (the program's probing emulated by ``v6hash.match``; the kernel
test in tests/bpf/test_v6hash_kernel.py runs the program itself)."""

from __future__ import annotations

import ipaddress
import random

import numpy as np
import pytest

from fibsync.fastpath import abi, v6hash
from fibsync.fastpath.maps import RouteTable
from fibsync.fastpath.writer import MapWriter, MemoryMaps, route_key
from fibsync.model import Prefix
from fibsync.rib.types import Action, FastPathDiff, FpRoute

# a few /32s of 3fff::/20 (RFC 9637), so that prefixes overlap and share slots
BLOCKS = [0x3FFF0000 | i for i in (0, 1, 7, 0x123, 0xFFF)]


def random_prefix(rng: random.Random) -> Prefix:
    length = rng.choice([0, 12, 16, 20, 24, 28, 29, 31, 32, 32, 33, 36, 40, 44, 47, 48, 48, 48,
                         56, 60, 64, 64, 65, 96, 112, 120, 127, 128, 128])
    n = rng.choice(BLOCKS) << 96 | rng.getrandbits(96)
    n = n >> (128 - length) << (128 - length) if length else 0
    return Prefix.parse(f"{ipaddress.IPv6Address(n)}/{length}")


def fwd(nh: int) -> FpRoute:
    return FpRoute(Action.FORWARD, nh_id=nh)


def destinations(rng: random.Random, prefixes: list[Prefix], n: int) -> list[bytes]:
    out = []
    for p in rng.sample(prefixes, min(len(prefixes), n // 2)):
        host = rng.getrandbits(128 - p.length) if p.length < 128 else 0
        out.append((int.from_bytes(p.addr, "big") | host).to_bytes(16, "big"))
    while len(out) < n:
        out.append((rng.choice(BLOCKS) << 96 | rng.getrandbits(96)).to_bytes(16, "big"))
    return out


def longest_match(table: dict[Prefix, FpRoute], addr: bytes) -> tuple[int, int] | None:
    n = int.from_bytes(addr, "big")
    for length in range(128, -1, -1):
        masked = (n >> (128 - length) << (128 - length)) if length else 0
        p = Prefix(10, masked.to_bytes(16, "big"), length)
        if p in table:
            return length, table[p].nh_id
    return None


def program_match(maps: MemoryMaps, writer: MapWriter, addr: bytes) -> tuple[int, int] | None:
    assert writer.v6 is not None
    found = v6hash.match(writer.v6.words, maps.maps.get("v6_hash", {}).get, addr)
    return None if found is None else (found[0], abi.ROUTE.unpack(found[1])[0])


def check(maps: MemoryMaps, writer: MapWriter, table: dict[Prefix, FpRoute],
          rng: random.Random) -> None:
    dsts = destinations(rng, list(table), 3000)
    wrong = [(ipaddress.IPv6Address(d), longest_match(table, d), program_match(maps, writer, d))
             for d in dsts if longest_match(table, d) != program_match(maps, writer, d)]
    assert wrong == [], wrong[:5]
    hits = sum(longest_match(table, d) is not None for d in dsts)
    assert hits > 2000  # most destinations have a route: the test sees answers, not misses


def exact_words(table: dict[Prefix, FpRoute]) -> np.ndarray:  # type: ignore[type-arg]
    words = np.zeros_like(np.frombuffer(v6hash.memory_buffer(), np.uint64))
    for p in table:
        at, bit = v6hash.positions(np.frombuffer(p.addr, np.uint8).reshape(1, 16),
                                   np.array([p.length], np.uint8))
        words[at] |= bit
    return words


def test_the_probes_find_the_longest_prefix_through_adds_deletes_and_rebuilds(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(v6hash, "REBUILD_AFTER", 150)
    rng = random.Random(6)
    maps = MemoryMaps(v6_hash=True)
    writer = MapWriter(maps)
    assert writer.v6_table == "hash"
    table = {random_prefix(rng): fwd(rng.randrange(1, 9)) for _ in range(1500)}
    writer.write(FastPathDiff(routes=dict(table)))
    assert "routes_v6" not in maps.maps  # one IPv6 table: the one the program reads
    assert np.array_equal(writer.v6.words, exact_words(table))  # type: ignore[union-attr]
    check(maps, writer, table, rng)

    rebuilt = 0
    for _ in range(4):  # changes in batches: the lengths gain bits, deletions leave them
        gone = rng.sample(sorted(table, key=str), 60)
        changes: dict[Prefix, FpRoute | None] = {p: None for p in gone}
        changes |= {random_prefix(rng): fwd(rng.randrange(1, 9)) for _ in range(80)}
        for p, e in changes.items():
            if e is None:
                table.pop(p)
            else:
                table[p] = e
        writer.write(FastPathDiff(routes=changes))
        exact = exact_words(table)
        assert not (exact & ~writer.v6.words).any()  # type: ignore[union-attr]  # a superset
        rebuilt += writer.v6.deleted == 0  # type: ignore[union-attr]
        check(maps, writer, table, rng)
    assert rebuilt >= 1
    # past a rebuild, deleted lengths are gone again
    writer.write(FastPathDiff(routes={p: None for p in rng.sample(sorted(table, key=str), 150)}))
    table = {p: e for p, e in table.items() if route_key(p) in maps.maps["v6_hash"]}
    assert np.array_equal(writer.v6.words, exact_words(table))  # type: ignore[union-attr]
    check(maps, writer, table, rng)


def test_lpm_mode_writes_the_trie_and_says_so() -> None:
    maps = MemoryMaps(v6_hash=True)
    writer = MapWriter(maps, v6_table="lpm")
    writer.write(FastPathDiff(routes={Prefix.parse("2001:db8::/32"): fwd(1)}))
    assert writer.v6 is None and list(maps.maps["routes_v6"]) and "v6_hash" not in maps.maps
    assert abi.CONFIG.unpack(maps.maps.get("config", {}).get(
        b"\0\0\0\0", abi.CONFIG.pack(0, 0, 0, 0, 0)))[4] == abi.FS_V6_LPM
    hashed = MemoryMaps(v6_hash=True)
    MapWriter(hashed).write(FastPathDiff(routes={Prefix.parse("2001:db8::/32"): fwd(1)}))
    assert abi.CONFIG.unpack(hashed.maps["config"][b"\0\0\0\0"])[4] == abi.FS_V6_HASH


def test_hash_mode_needs_its_maps() -> None:
    from fibsync.errors import MapError
    with pytest.raises(MapError):
        MapWriter(MemoryMaps(), v6_table="hash")
    assert MapWriter(MemoryMaps()).v6_table == "lpm"


def test_a_prefix_whose_length_is_not_probed_is_a_difference() -> None:
    """verify reads what the program reads: a v6_hash entry whose length
    v6_lengths lacks is never found, and its document says so."""
    maps = MemoryMaps(v6_hash=True)
    writer = MapWriter(maps)
    writer.write(FastPathDiff(routes={Prefix.parse("2001:db8::/32"): fwd(1),
                                      Prefix.parse("2001:db8:1::/48"): fwd(2)}))
    key = route_key(Prefix.parse("2001:db8:1::/48"))
    assert "without" not in RouteTable(maps).doc(key).get("reason", "")  # type: ignore[union-attr]
    assert writer.v6 is not None
    at, bit = v6hash.positions(np.frombuffer(Prefix.parse("2001:db8:1::/48").addr,
                                             np.uint8).reshape(1, 16), np.array([48], np.uint8))
    writer.v6.words[at] &= ~bit
    doc = RouteTable(maps).doc(key)
    assert doc is not None and "without its length in v6_lengths" in doc["reason"]
