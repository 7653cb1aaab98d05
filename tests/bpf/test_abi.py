"""abi.py must say exactly what bpf/fibsync.h says (no root needed).

The header is parsed, not compiled: it is written in a plain subset of C for
this purpose (one field per line, literal or macro array sizes).
"""

from __future__ import annotations

import ctypes
import re
from pathlib import Path

import pytest

from fibsync.fastpath import abi
from fibsync.fastpath.program import bpf_source_dir

HEADER = bpf_source_dir() / "fibsync.h"

_CTYPES = {"__u8": ctypes.c_uint8, "__u16": ctypes.c_uint16, "__u32": ctypes.c_uint32,
           "__u64": ctypes.c_uint64}


def _source() -> str:
    text = Path(HEADER).read_text()
    return re.sub(r"/\*.*?\*/", "", text, flags=re.S)


def header_constants() -> dict[str, int]:
    consts: dict[str, int] = {}
    for name, value in re.findall(r"^#define\s+(FS_\w+)\s+(0x[0-9a-fA-F]+|\d+)\s*$",
                                  _source(), flags=re.M):
        consts.setdefault(name, int(value, 0))
    for name, value in re.findall(r"^\s*(FS_\w+)\s*=\s*(\d+)\s*,?\s*$", _source(), flags=re.M):
        consts.setdefault(name, int(value))
    return consts


def header_reasons() -> list[tuple[str, int, str]]:
    return [(n, int(v), d) for n, v, d in
            re.findall(r'X\((\w+),\s*(\d+),\s*"([^"]*)"\)', _source())]


def header_structs() -> dict[str, list[tuple[str, str, int]]]:
    """struct name -> [(field, C type, array length or 0)]"""
    consts = header_constants()
    structs = {}
    for name, body in re.findall(r"struct\s+(\w+)\s*\{(.*?)\};", _source(), flags=re.S):
        fields = []
        for line in body.strip().splitlines():
            m = re.fullmatch(r"\s*(__u\d+)\s+(\w+)(?:\[(\w+)\])?;\s*", line)
            assert m, f"struct {name}: cannot parse {line!r}"
            size = m.group(3)
            count = 0 if size is None else int(size) if size.isdigit() else consts[size]
            fields.append((m.group(2), m.group(1), count))
        structs[name] = fields
    return structs


def _c_layout(fields: list[tuple[str, str, int]]) -> type[ctypes.Structure]:
    spec = [(f, _CTYPES[t] * n if n else _CTYPES[t]) for f, t, n in fields]
    return type("C", (ctypes.Structure,), {"_fields_": spec})


def test_reason_table_matches() -> None:
    reasons = header_reasons()
    assert [(r.name, r.value, r.description) for r in abi.Reason] == reasons


def test_reason_codes_are_dense_and_bounded() -> None:
    values = [v for _, v, _ in header_reasons()]
    assert values == list(range(len(values)))
    assert header_constants()["FS_REASON_MAX"] == len(values) == abi.FS_REASON_MAX


def test_required_reasons_exist() -> None:
    required = {"FWD_FAST", "FWD_FIB", "PASS_NOT_IP", "PASS_TTL", "PASS_IP_OPTIONS",
                "PASS_FRAGMENT", "PASS_MTU", "PASS_LOCAL", "PASS_MULTICAST",
                "PASS_UNREACHABLE", "PASS_NO_ROUTE", "PASS_NO_NEIGH", "PASS_EGRESS",
                "PASS_VLAN", "PASS_FIB_OTHER", "PASS_MALFORMED", "DROP_BLACKHOLE"}
    assert required <= set(abi.Reason.__members__)


def test_constants_match() -> None:
    consts = header_constants()
    assert consts, "no FS_ constants found in the header"
    for name, value in consts.items():
        assert getattr(abi, name) == value, name


def test_default_sizes_match_header() -> None:
    consts = header_constants()
    sizes = abi.Sizes()
    assert (sizes.routes_v4, sizes.routes_v6, sizes.nexthops, sizes.groups, sizes.neighbours,
            sizes.tx_ports, sizes.neigh_miss_bytes) == (
        consts["FS_MAX_ROUTES_V4"], consts["FS_MAX_ROUTES_V6"], consts["FS_MAX_NEXTHOPS"],
        consts["FS_MAX_GROUPS"], consts["FS_MAX_NEIGH"], consts["FS_MAX_TX_PORTS"],
        consts["FS_NEIGH_MISS_BYTES"])


def test_every_struct_has_a_twin() -> None:
    assert set(header_structs()) == set(abi.STRUCTS)


@pytest.mark.parametrize("name", sorted(abi.STRUCTS))
def test_struct_layout_matches(name: str) -> None:
    c_fields = header_structs()[name]
    c_struct = _c_layout(c_fields)
    twin = abi.STRUCTS[name]
    assert [f[0] for f in twin._fields_] == [f for f, _, _ in c_fields]
    for field, _, _ in c_fields:
        ours, theirs = getattr(twin, field), getattr(c_struct, field)
        assert (ours.offset, ours.size) == (theirs.offset, theirs.size), field
    assert ctypes.sizeof(twin) == ctypes.sizeof(c_struct)
    assert ctypes.alignment(twin) == ctypes.alignment(c_struct)


def test_contract_sizes() -> None:
    """The sizes other parts of fibsync were promised."""
    assert {n: ctypes.sizeof(t) for n, t in abi.STRUCTS.items()} == {
        "fs_v4_key": 8, "fs_v6_key": 20, "fs_route": 8, "fs_nexthop": 36, "fs_group": 1032,
        "fs_neigh_key": 24, "fs_neigh": 8, "fs_counter": 16, "fs_config": 16, "fs_miss": 24,
    }


def test_map_specs_use_the_struct_sizes() -> None:
    specs = {s.name: s for s in abi.map_specs(abi.Sizes())}
    assert tuple(specs) == abi.MAP_NAMES == (
        "routes_v4", "routes_v6", "nexthops", "groups", "neighbours", "tx_ports", "counters",
        "config", "neigh_miss")
    assert (specs["routes_v4"].key_size, specs["routes_v4"].value_size) == (8, 8)
    assert (specs["routes_v6"].key_size, specs["routes_v6"].value_size) == (20, 8)
    assert specs["counters"].max_entries == abi.FS_REASON_MAX


def test_route_key_packs_prefix() -> None:
    from fibsync.model import Prefix

    assert bytes(abi.route_key(Prefix.parse("10.1.0.0/16"))) == \
        (16).to_bytes(4, "little") + bytes([10, 1, 0, 0])
    key = abi.neigh_key(7, abi.AF_INET, bytes([192, 0, 2, 1]))
    assert bytes(key) == (7).to_bytes(4, "little") + (2).to_bytes(4, "little") + \
        bytes([192, 0, 2, 1]) + bytes(12)
