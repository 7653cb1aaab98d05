"""bpfsys: the bpf(2) layer the map writer and the CLI use, on private maps."""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Iterator

import pytest

from fibsync.errors import MapError, MapFullError
from fibsync.fastpath import abi, bpfsys
from fibsync.model import Prefix
from tests.bpf.harness import Lab

pytestmark = pytest.mark.privileged


@pytest.fixture
def hash_map() -> Iterator[int]:
    fd = bpfsys.map_create(abi.MAP_HASH, 4, 8, 20000, name="t_hash")
    yield fd
    os.close(fd)


@pytest.fixture
def lpm_map() -> Iterator[int]:
    fd = bpfsys.map_create(abi.MAP_LPM_TRIE, 8, 8, 20000, flags=abi.BPF_F_NO_PREALLOC,
                           name="t_lpm")
    yield fd
    os.close(fd)


def u32s(values: range | list[int]) -> bytes:
    return struct.pack(f"={len(values)}I", *values)


def test_map_info(hash_map: int) -> None:
    info = bpfsys.map_info(hash_map)
    assert (info.type, info.key_size, info.value_size, info.max_entries, info.name) == (
        abi.MAP_HASH, 4, 8, 20000, "t_hash")
    assert info.id > 0


def test_lookup_update_delete(hash_map: int) -> None:
    key = struct.pack("=I", 7)
    assert bpfsys.lookup(hash_map, key) is None
    bpfsys.update(hash_map, key, b"abcdefgh")
    assert bpfsys.lookup(hash_map, key) == b"abcdefgh"
    with pytest.raises(MapError) as err:
        bpfsys.update(hash_map, key, b"12345678", bpfsys.BPF_NOEXIST)
    assert err.value.errno == errno.EEXIST  # type: ignore[attr-defined]
    assert bpfsys.delete(hash_map, key) is True
    assert bpfsys.delete(hash_map, key) is False


def test_batch_update_and_iterate_hash(hash_map: int) -> None:
    n = 10000
    keys = u32s(range(n))
    values = b"".join(struct.pack("=Q", i * 3) for i in range(n))
    bpfsys.update_batch(hash_map, keys, values, n)
    got = {struct.unpack("=I", k)[0]: struct.unpack("=Q", v)[0]
           for k, v in bpfsys.iterate(hash_map, batch=1000) if isinstance(v, bytes)}
    assert got == {i: i * 3 for i in range(n)}


def test_batch_update_and_iterate_lpm(lpm_map: int) -> None:
    prefixes = [Prefix.parse(f"10.{i // 256}.{i % 256}.0/24") for i in range(3000)]
    keys = b"".join(bytes(abi.route_key(p)) for p in prefixes)
    values = b"".join(bytes(abi.FsRoute(i, 0, 0, 0, 0)) for i in range(3000))
    bpfsys.update_batch(lpm_map, keys, values, len(prefixes))
    got = dict(bpfsys.iterate(lpm_map))
    assert len(got) == 3000
    assert got[bytes(abi.route_key(prefixes[1234]))] == bytes(abi.FsRoute(1234, 0, 0, 0, 0))


def test_batch_delete_skips_absent_keys(hash_map: int) -> None:
    bpfsys.update_batch(hash_map, u32s(range(10)), bytes(80), 10)
    assert bpfsys.delete_batch(hash_map, u32s([1, 2, 99, 3, 98]), 5) == 3
    assert sorted(struct.unpack("=I", k)[0] for k, _ in bpfsys.iterate(hash_map)) == [
        0, 4, 5, 6, 7, 8, 9]


def test_full_map_raises_map_full_with_progress() -> None:
    fd = bpfsys.map_create(abi.MAP_HASH, 4, 8, 4, name="t_small")
    try:
        with pytest.raises(MapFullError) as err:
            bpfsys.update_batch(fd, u32s(range(8)), bytes(64), 8)
        assert err.value.errno == errno.E2BIG
        assert err.value.done == 4
        assert "4 of 8 written" in str(err.value)
    finally:
        os.close(fd)


def test_map_without_batch_support_falls_back(lab: Lab) -> None:
    """DEVMAP_HASH has no batch update: entries go in one by one."""
    fd = bpfsys.map_create(abi.MAP_DEVMAP_HASH, 4, 4, 8, name="t_dev")
    try:
        bpfsys.update_batch(fd, u32s([1]), u32s([1]), 1)  # lo exists in every namespace
        assert list(bpfsys.iterate(fd)) == [(u32s([1]), u32s([1]))]
        assert bpfsys.delete_batch(fd, u32s([1, 5]), 2) == 1
    finally:
        os.close(fd)


def test_one_by_one_fallback_reports_progress_too(lab: Lab) -> None:
    fd = bpfsys.map_create(abi.MAP_DEVMAP_HASH, 4, 4, 8, name="t_dev")
    try:
        with pytest.raises(MapError) as err:  # ifindex 999999 exists nowhere
            bpfsys.update_batch(fd, u32s([1, 999999]), u32s([1, 999999]), 2)
        assert err.value.done == 1
    finally:
        os.close(fd)


def test_repeated_lookups_reuse_their_buffers(hash_map: int) -> None:
    bpfsys.update(hash_map, u32s([7]), b"v" * 8)
    lookup = bpfsys.Lookup(hash_map, 4, 8)
    assert lookup(u32s([7])) == b"v" * 8
    assert lookup(u32s([8])) is None
    assert lookup(u32s([7])) == b"v" * 8


def test_percpu_values_are_lists() -> None:
    fd = bpfsys.map_create(abi.MAP_PERCPU_ARRAY, 4, 12, 2, name="t_pcpu")
    try:
        ncpu = bpfsys.possible_cpus()
        values = [bytes([cpu]) * 12 for cpu in range(ncpu)]
        bpfsys.update(fd, u32s([1]), values)
        assert bpfsys.lookup(fd, u32s([1])) == values
        got = dict(bpfsys.iterate(fd))
        assert got[u32s([0])] == [bytes(12)] * ncpu
        assert got[u32s([1])] == values
    finally:
        os.close(fd)


def test_missing_pin_is_a_map_error() -> None:
    with pytest.raises(MapError) as err:
        bpfsys.obj_get("/sys/fs/bpf/fibsync-no-such-pin")
    assert err.value.errno == errno.ENOENT
