"""abi's struct.Struct and numpy layouts read and write exactly its ctypes structs.

The ctypes structs are checked against bpf/fibsync.h (tests/unit/test_abi.py);
these tests carry that to the layouts the writer, the map readers and the
DIR-24-8 table use: same size, and every field at
its place (a struct filled with a distinct value per field reads back as
those values, in order).
"""

from __future__ import annotations

import ctypes
import itertools
from typing import Any

import numpy as np
import pytest

from fibsync.fastpath import abi


def filled(cls: type[ctypes.Structure]) -> tuple[ctypes.Structure, tuple[Any, ...]]:
    """A struct with a value of its own in every field, and those values in a
    struct.Struct's order (byte arrays as bytes, other arrays item by item)."""
    obj = cls()
    values: list[Any] = []
    count = itertools.count(1)
    for name, ctype in cls._fields_:  # type: ignore[misc]
        if issubclass(ctype, ctypes.Array):
            if ctype._type_ is ctypes.c_uint8:
                raw = bytes(next(count) % 251 + 1 for _ in range(ctype._length_))
                setattr(obj, name, ctype(*raw))
                values.append(raw)
            else:
                items = [next(count) for _ in range(ctype._length_)]
                setattr(obj, name, ctype(*items))
                values.extend(items)
        else:
            value = next(count) % 251 + 1
            setattr(obj, name, value)
            values.append(value)
    return obj, tuple(values)


@pytest.mark.parametrize("name", sorted(abi.LAYOUTS))
def test_each_layout_is_its_ctypes_twin_field_by_field(name: str) -> None:
    cls, layout = abi.STRUCTS[name], abi.LAYOUTS[name]
    assert layout.size == ctypes.sizeof(cls)
    obj, values = filled(cls)
    assert layout.unpack(bytes(obj)) == values
    assert layout.pack(*values) == bytes(obj)


def test_every_map_struct_has_a_layout() -> None:
    # the DIR-24-8 pairs are read and written as u32 words (dir24.py), the IPv6
    # lengths as u64 words (v6hash.py); the trust memo is the program's alone
    assert set(abi.STRUCTS) - set(abi.LAYOUTS) == {"fs_dir_pair", "fs_v6_lengths",
                                                   "fs_trust_memo"}


def test_the_numpy_route_records_are_the_ctypes_structs() -> None:
    route, (nh_id, action, flags, reason, plen) = filled(abi.FsRoute)
    record = np.frombuffer(bytes(route), abi.ROUTE_DTYPE)[0]
    assert abi.ROUTE_DTYPE.itemsize == ctypes.sizeof(abi.FsRoute)
    assert (record["nh_id"], record["action"], record["flags"], record["reason"],
            record["plen"]) == (nh_id, action, flags, reason, plen)
    for cls, alen in ((abi.FsV4Key, 4), (abi.FsV6Key, 16)):
        key, (prefixlen, addr) = filled(cls)
        dtype = abi.route_key_dtype(alen)
        assert dtype.itemsize == ctypes.sizeof(cls)
        record = np.frombuffer(bytes(key), dtype)[0]
        assert (record["plen"], record["addr"].tobytes()) == (prefixlen, addr)


def test_array_values_sit_at_an_8_byte_stride() -> None:
    assert abi.array_stride(ctypes.sizeof(abi.FsNexthop)) == 40
    assert abi.array_stride(ctypes.sizeof(abi.FsRoute)) == 8


def test_a_group_packs_as_the_ctypes_struct_reads_it() -> None:
    buckets = tuple(range(1, 129))
    members = [(1000 + i, i % 7 + 1) for i in range(70)]  # more than fit
    value = abi.pack_group(buckets, members)
    group = abi.FsGroup.from_buffer_copy(value)
    assert (group.nbuckets, tuple(group.buckets)) == (128, buckets)
    assert group.nmembers == abi.FS_GROUP_MEMBERS
    assert list(zip(group.member_ids, group.member_weights, strict=True)) == members[:64]
    assert abi.group_members(value) == members[:64]
    short = abi.pack_group((7, 8), [(7, 1), (8, 3)])
    assert abi.FsGroup.from_buffer_copy(short).nbuckets == 2
    assert abi.group_members(short) == [(7, 1), (8, 3)]
