"""`local_v4`, the bitmap that spares sources the table walk (fastpath/local.py):
it may say "maybe ours" too often, never too rarely, and MapWriter sets bits
before the routes that need them and clears them after the routes are gone."""

from __future__ import annotations

import ipaddress
import random

import numpy as np

from fibsync.fastpath import abi
from fibsync.fastpath.local import bitmap, bits
from fibsync.fastpath.writer import MapWriter, MemoryMaps
from fibsync.model import AF_INET, Prefix
from fibsync.rib import Action, FastPathDiff, FpRoute, RouteRows
from tests.unit.test_writer import Recording

LOCAL = FpRoute(Action.KERNEL, reason="PASS_LOCAL")
FORWARD = FpRoute(Action.FORWARD, nh_id=1)


def program_bit(addr: str) -> int:
    """The bit bpf/fibsync.c's fs_maybe_local_v4 reads, computed as it does (u32)."""
    a = int(ipaddress.IPv4Address(addr))
    return (((a >> 8) * abi.FS_LOCAL_V4_HASH) & 0xFFFFFFFF) >> (32 - abi.FS_LOCAL_V4_BITS)


def is_set(words: dict[bytes, bytes], addr: str) -> bool:
    bit = program_bit(addr)
    word = words.get(abi.U32.pack(bit >> 6))
    return word is not None and (abi.U64.unpack(word)[0] >> (bit & 63)) & 1 == 1


def prefix_bits(prefix: str) -> np.ndarray | None:  # type: ignore[type-arg]
    p = Prefix.parse(prefix)
    return bits(p.addr, p.length)


def test_a_prefix_sets_the_bits_of_the_slash24s_it_overlaps() -> None:
    one = prefix_bits("192.0.2.9/32")
    assert one is not None and one.tolist() == [program_bit("192.0.2.200")]
    sixteen = prefix_bits("198.51.0.0/16")
    assert sixteen is not None and len(sixteen) == 256
    assert {program_bit(f"198.51.{i}.1") for i in range(256)} == set(sixteen.tolist())
    assert prefix_bits("0.0.0.0/4") is None  # shorter than /8: every bit
    # the program hands sources in 0/8 and 127/8 to the kernel before it asks
    assert len(prefix_bits("127.0.0.0/8")) == 0  # type: ignore[arg-type]
    assert len(prefix_bits("0.0.0.0/8")) == 0  # type: ignore[arg-type]


def test_never_too_rarely_random_prefixes() -> None:
    rng = random.Random(12)
    prefixes = []
    for _ in range(300):
        length = rng.choice([8, 12, 16, 20, 23, 24, 26, 30, 32, 32, 32])
        n = rng.getrandbits(32) >> (32 - length) << (32 - length)
        if n >> 24 not in (0, 127):
            prefixes.append(Prefix.of(AF_INET, n.to_bytes(4, "big"), length))
    words = {abi.U32.pack(i): abi.U64.pack(int(w)) for i, w in enumerate(bitmap(prefixes))}
    for p in prefixes:
        base = int.from_bytes(p.addr, "big")
        for _ in range(20):
            addr = base + rng.randrange(1 << (32 - p.length))
            assert is_set(words, str(ipaddress.IPv4Address(addr))), (p, addr)


def test_a_host_s_addresses_spare_almost_every_other_source() -> None:
    rng = random.Random(13)
    ours = [Prefix.of(AF_INET, rng.getrandbits(32).to_bytes(4, "big"), 32) for _ in range(200)]
    words = {abi.U32.pack(i): abi.U64.pack(int(w)) for i, w in enumerate(bitmap(ours))}
    walked = sum(is_set(words, str(ipaddress.IPv4Address(rng.getrandbits(32))))
                 for _ in range(10000))
    assert walked < 50  # 200 of 2^18 bits: ~0.1%


def words(maps: MemoryMaps) -> dict[bytes, bytes]:
    return maps.maps.get("local_v4", {})


def test_the_writer_sets_a_local_route_s_bit_before_the_route() -> None:
    maps = Recording()
    writer = MapWriter(maps)
    writer.write(FastPathDiff(routes={Prefix.parse("10.0.0.0/8"): FORWARD}))
    # the first write replaces a previous run's bitmap whole
    assert len(words(maps)) == abi.FS_LOCAL_V4_WORDS
    assert not is_set(words(maps), "192.0.2.9")
    maps.log.clear()
    writer.write(FastPathDiff(routes={Prefix.parse("192.0.2.9/32"): LOCAL}))
    assert is_set(words(maps), "192.0.2.9") and is_set(words(maps), "192.0.2.10")
    kinds = [(op, name) for op, name, _ in maps.log]
    assert kinds.index(("set", "local_v4")) < kinds.index(("set", "routes_v4"))
    assert len(next(keys for op, name, keys in maps.log if name == "local_v4")) == 1


def test_the_writer_clears_a_bit_after_the_route_is_gone() -> None:
    maps = Recording()
    writer = MapWriter(maps)
    writer.write(FastPathDiff(routes={Prefix.parse("192.0.2.9/32"): LOCAL,
                                      Prefix.parse("198.51.100.1/32"): LOCAL}))
    maps.log.clear()
    writer.write(FastPathDiff(routes={Prefix.parse("192.0.2.9/32"): None}))
    assert not is_set(words(maps), "192.0.2.9")
    assert is_set(words(maps), "198.51.100.1")
    kinds = [(op, name) for op, name, _ in maps.log]
    assert kinds.index(("del", "routes_v4")) < kinds.index(("set", "local_v4"))
    # replaced by a route of another kind: no longer ours either
    writer.write(FastPathDiff(routes={Prefix.parse("198.51.100.1/32"): FORWARD}))
    assert not is_set(words(maps), "198.51.100.1")
    assert writer.local is not None and writer.local.prefixes == set()


def test_a_bit_stays_while_another_local_prefix_holds_it() -> None:
    maps = MemoryMaps()
    writer = MapWriter(maps)
    writer.write(FastPathDiff(routes={Prefix.parse("192.0.2.9/32"): LOCAL,
                                      Prefix.parse("192.0.2.255/32"): LOCAL}))
    writer.write(FastPathDiff(routes={Prefix.parse("192.0.2.9/32"): None}))
    assert is_set(words(maps), "192.0.2.9")  # the same /24's bit: still maybe ours


def rows(entries: list[FpRoute], prefixes: list[str], ids: list[int]) -> RouteRows:
    ps = [Prefix.parse(p) for p in prefixes]
    return RouteRows(AF_INET, np.array([list(p.addr) for p in ps], np.uint8),
                     np.array([p.length for p in ps], np.uint8), np.array(ids, np.intp),
                     entries)


def test_a_resync_s_rows_set_and_clear_bits_too() -> None:
    maps = MemoryMaps()
    writer = MapWriter(maps)
    writer.write(FastPathDiff(bulk=[rows([FORWARD, LOCAL],
                                         ["10.0.0.0/8", "192.0.2.9/32", "203.0.113.0/24"],
                                         [0, 1, 1])]))
    assert is_set(words(maps), "192.0.2.9") and is_set(words(maps), "203.0.113.77")
    assert not is_set(words(maps), "10.1.2.3")
    writer.write(FastPathDiff(bulk=[rows([FORWARD], ["203.0.113.0/24"], [0])]))
    assert not is_set(words(maps), "203.0.113.77")
    assert is_set(words(maps), "192.0.2.9")


def test_a_whole_table_s_rows_take_the_array_path_alike() -> None:
    """Past _SMALL_BATCH rows the writer finds local and replaced prefixes with numpy."""
    table = [f"10.{i // 256}.{i % 256}.0/24" for i in range(500)]
    maps = MemoryMaps()
    writer = MapWriter(maps)
    writer.write(FastPathDiff(bulk=[rows([FORWARD, LOCAL], [*table, "192.0.2.9/32"],
                                         [0] * len(table) + [1])]))
    assert is_set(words(maps), "192.0.2.9") and not is_set(words(maps), "10.1.2.3")
    writer.write(FastPathDiff(bulk=[rows([FORWARD], [*table, "192.0.2.9/32"],
                                         [0] * (len(table) + 1))]))
    assert not is_set(words(maps), "192.0.2.9")
    assert writer.local is not None and writer.local.prefixes == set()
