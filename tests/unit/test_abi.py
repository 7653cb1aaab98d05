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
from fibsync.model import AF_INET, Prefix

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
    """struct name -> [(field, C type, array length or 0)], in header order.

    A C type is ``__uN`` or ``struct NAME`` of a struct defined above it.
    """
    consts = header_constants()
    structs = {}
    for name, body in re.findall(r"struct\s+(\w+)\s*\{(.*?)\};", _source(), flags=re.S):
        fields = []
        for line in body.strip().splitlines():
            m = re.fullmatch(r"\s*(__u\d+|struct\s+\w+)\s+(\w+)(?:\[(\w+)\])?;\s*", line)
            assert m, f"struct {name}: cannot parse {line!r}"
            size = m.group(3)
            count = 0 if size is None else int(size) if size.isdigit() else consts[size]
            fields.append((m.group(2), " ".join(m.group(1).split()), count))
        structs[name] = fields
    return structs


def c_layouts() -> dict[str, type[ctypes.Structure]]:
    """Every header struct as ctypes lays it out, from the parsed fields alone."""
    layouts: dict[str, type[ctypes.Structure]] = {}
    for name, fields in header_structs().items():
        spec = []
        for field, ctype, count in fields:
            base = layouts[ctype.split()[1]] if ctype.startswith("struct ") else _CTYPES[ctype]
            spec.append((field, base * count if count else base))
        layouts[name] = type(name, (ctypes.Structure,), {"_fields_": spec})
    return layouts


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
            sizes.tx_ports, sizes.tbl8_groups, sizes.slots) == (
        consts["FS_MAX_ROUTES_V4"], consts["FS_MAX_ROUTES_V6"], consts["FS_MAX_NEXTHOPS"],
        consts["FS_MAX_GROUPS"], consts["FS_MAX_NEIGH"], consts["FS_MAX_TX_PORTS"],
        consts["FS_MAX_TBL8_GROUPS"], consts["FS_MAX_SLOTS"])


def test_every_struct_has_a_twin() -> None:
    assert set(header_structs()) == set(abi.STRUCTS)


@pytest.mark.parametrize("name", sorted(abi.STRUCTS))
def test_struct_layout_matches(name: str) -> None:
    c_fields = header_structs()[name]
    c_struct = c_layouts()[name]
    twin = abi.STRUCTS[name]
    assert [f[0] for f in twin._fields_] == [f for f, _, _ in c_fields]
    for field, _, _ in c_fields:
        ours, theirs = getattr(twin, field), getattr(c_struct, field)
        assert (ours.offset, ours.size) == (theirs.offset, theirs.size), field
    assert ctypes.sizeof(twin) == ctypes.sizeof(c_struct)
    assert ctypes.alignment(twin) == ctypes.alignment(c_struct)


# The layouts other parts of fibsync were promised: (field, offset, size).
# Structs may grow at the end, never change in front.
CONTRACT = {
    "fs_v4_key": [("prefixlen", 0, 4), ("addr", 4, 4)],
    "fs_v6_key": [("prefixlen", 0, 4), ("addr", 4, 16)],
    "fs_route": [("nh_id", 0, 4), ("action", 4, 1), ("flags", 5, 1), ("reason", 6, 1),
                 ("plen", 7, 1)],
    "fs_dir_pair": [("entry", 0, 8)],
    "fs_nexthop": [("ifindex", 0, 4), ("mtu", 4, 2), ("flags", 6, 1), ("family", 7, 1),
                   ("smac", 8, 6), ("dmac", 14, 6), ("gateway", 20, 16)],
    "fs_group": [("nbuckets", 0, 4), ("buckets", 4, 512)],
    "fs_neigh_key": [("ifindex", 0, 4), ("family", 4, 4), ("addr", 8, 16)],
    "fs_neigh": [("mac", 0, 6), ("pad", 6, 2)],
    "fs_counter": [("packets", 0, 8), ("bytes", 8, 8)],
    "fs_heartbeat": [("fresh_until", 0, 8), ("watched_until", 8, 8)],
    "fs_config": [("hash_policy_v4", 0, 4), ("hash_policy_v6", 4, 4), ("flags", 8, 4),
                  ("v4_table", 12, 4), ("v6_table", 16, 4)],
    "fs_v6_lengths": [("lengths", 0, 24)],
}
# Keys are exact: a longer key changes what a lookup matches on.
EXACT_SIZES = {"fs_v4_key": 8, "fs_v6_key": 20, "fs_neigh_key": 24,
               # fastpath/dir24.py writes these through mmap at an 8-byte stride
               "fs_route": 8, "fs_dir_pair": 8,
               # fastpath/v6hash.py writes these through mmap as three u64 words
               "fs_v6_lengths": 24}


@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_contract_layout(name: str) -> None:
    twin = abi.STRUCTS[name]
    for field, offset, size in CONTRACT[name]:
        assert (getattr(twin, field).offset, getattr(twin, field).size) == (offset, size), field
    _, last_offset, last_size = CONTRACT[name][-1]
    assert ctypes.sizeof(twin) >= last_offset + last_size
    if name in EXACT_SIZES:
        assert ctypes.sizeof(twin) == EXACT_SIZES[name]


def test_group_size_as_committed() -> None:
    """fs_group grew by member ids and weights for user space (8611928)."""
    assert ctypes.sizeof(abi.FsGroup) == 1032


def test_map_specs_use_the_struct_sizes() -> None:
    specs = {s.name: s for s in abi.map_specs(abi.Sizes())}
    assert tuple(specs) == abi.MAP_NAMES == (
        "routes_v4", "routes_v6", "nexthops", "groups", "neighbours", "tx_ports", "tx_direct",
        "counters", "config", "heartbeat", "trust_memo", "ifaces", "local_v4", "v4_tbl24",
        "v4_tbl8", "v4_slots", "v4_nh", "v6_hash", "v6_lengths")
    assert not set(abi.RETIRED_MAPS) & set(abi.MAP_NAMES)
    assert (specs["heartbeat"].type, specs["heartbeat"].value_size,
            specs["heartbeat"].max_entries) == (abi.MAP_ARRAY, 16, 1)
    # the program's own: one memo per CPU
    assert (specs["trust_memo"].type, specs["trust_memo"].max_entries) == (
        abi.MAP_PERCPU_ARRAY, 1)
    assert (specs["tx_direct"].type, specs["tx_direct"].max_entries) == (
        abi.MAP_DEVMAP, abi.FS_TX_DIRECT)
    assert (specs["routes_v4"].key_size, specs["routes_v4"].value_size) == (8, 8)
    assert (specs["routes_v6"].key_size, specs["routes_v6"].value_size) == (20, 8)
    assert specs["counters"].max_entries == abi.FS_REASON_MAX
    # DIR-24-8: two entries per 8-byte element, every array mmapable
    assert specs["v4_tbl24"].max_entries * 2 == abi.FS_DIR24_ENTRIES == 1 << 24
    assert specs["v4_tbl8"].max_entries * 2 == abi.FS_MAX_TBL8_GROUPS * abi.FS_TBL8_ENTRIES
    for name in ("v4_tbl24", "v4_tbl8", "v4_slots", "v4_nh"):
        assert (specs[name].type, specs[name].flags) == (abi.MAP_ARRAY, abi.BPF_F_MMAPABLE)
    assert [specs[n].value_size for n in ("v4_tbl24", "v4_tbl8", "v4_slots")] == [8, 8, 8]
    # two copies of a nexthop per slot, at the 8-byte stride dir24.py writes with
    assert specs["v4_nh"].max_entries == 2 * specs["v4_slots"].max_entries
    assert (specs["v4_nh"].value_size + 7) & ~7 == 40
    # the IPv6 hash: routes_v6's keys and values; one lengths slot more than FS_V6_SLOTS
    assert (specs["v6_hash"].type, specs["v6_hash"].key_size, specs["v6_hash"].value_size) \
        == (abi.MAP_HASH, 20, 8)
    assert (specs["v6_lengths"].max_entries, specs["v6_lengths"].flags) == (
        abi.FS_V6_SLOTS + 1, abi.BPF_F_MMAPABLE)
    assert abi.FS_V6_SLOTS == 1 << abi.FS_V6_SLOT_BITS
    assert all(specs[n].renew for n in ("routes_v4", "routes_v6", "v6_hash", "v6_lengths"))


def test_route_key_packs_prefix() -> None:
    assert bytes(abi.route_key(Prefix.parse("10.1.0.0/16"))) == \
        (16).to_bytes(4, "little") + bytes([10, 1, 0, 0])
    key = abi.neigh_key(7, AF_INET, bytes([192, 0, 2, 1]))
    assert bytes(key) == (7).to_bytes(4, "little") + (2).to_bytes(4, "little") + \
        bytes([192, 0, 2, 1]) + bytes(12)
