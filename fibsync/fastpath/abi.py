"""User-space twin of ``bpf/fibsync.h``: constants, reason codes, map structs.

Every struct here has the exact size and field offsets of its C original;
``tests/unit/test_abi.py`` parses the header and fails on any difference. Map
keys and values are built as these ctypes structs and written with
``bytes(struct)``; addresses are packed bytes (``model.Prefix.addr``).

This is the only place in fibsync's Python that says how map bytes are laid
out: the hot paths (the writer, the map readers, the DIR-24-8 table) encode
and decode with the ``struct.Struct`` and numpy
twins of ``LAYOUTS`` below, which ``tests/unit/test_abi_layouts.py`` checks
field by field against the ctypes structs.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import numpy as np

from fibsync.model import AF_INET, AF_INET6, Prefix

# Map sizes: the header's defaults (each overridable with -D, see Sizes).
FS_MAX_ROUTES_V4 = 2097152
FS_MAX_ROUTES_V6 = 524288
FS_MAX_NEXTHOPS = 65536
FS_MAX_GROUPS = 16384
FS_MAX_NEIGH = 65536
FS_MAX_TX_PORTS = 1024
FS_TX_DIRECT = 4096
FS_MAX_TBL8_GROUPS = 16384
FS_MAX_SLOTS = 65536

# DIR-24-8 entries (see the header's comment above FS_DIR24_ENTRIES)
FS_DIR24_ENTRIES = 16777216
FS_TBL8_ENTRIES = 256
FS_DIR_EXT = 0x80000000
FS_DIR_INDEX = 0xFFFFFF
FS_DIR_DEPTH_SHIFT = 24
FS_DIR_DEPTH_MASK = 0x3F
FS_DIR_PINNED = 63

FS_V4_LPM = 0
FS_V4_DIR24 = 1

# The IPv6 hash table (see the header's comment above FS_V6_SLOT_BITS)
FS_V6_SLOT_BITS = 18
FS_V6_SLOTS = 262144
FS_V6_SLOT_HASH = 0x9E3779B1
FS_V6_LENGTH_WORDS = 3
FS_V6_LPM = 0
FS_V6_HASH = 1

FS_GROUP_BUCKETS = 128
FS_GROUP_MEMBERS = 64

FS_ACT_FORWARD = 0
FS_ACT_DROP = 1
FS_ACT_KERNEL = 2
FS_ACT_FIB = 3

FS_ROUTE_GROUP = 0x1
FS_ROUTE_NH_COPY = 0x2

FS_NH_RESOLVED = 0x1
FS_NH_CONNECTED = 0x2

FS_HASH_L3 = 0
FS_HASH_L4 = 1

FS_CFG_PASS_FRAGMENTS = 0x1

FS_MAX_IFACES = 65536
FS_LOCAL_V4_BITS = 18
FS_LOCAL_V4_WORDS = 4096
FS_LOCAL_V4_HASH = 0x9E3779B1
FS_IF_RPF_LOOSE = 0x1
FS_IF_RPF_STRICT = 0x2
FS_IF_CHECKSUM = 0x4
FS_IF_RULES_V4 = 0x8
FS_IF_RULES_V6 = 0x10


class Reason(IntEnum):
    """Why a packet left the fast path as it did; the index into ``counters``."""

    description: str

    def __new__(cls, value: int, description: str) -> Reason:
        obj = int.__new__(cls, value)
        obj._value_ = value
        obj.description = description
        return obj

    FWD_FAST = 0, "forwarded by a hit in the fast path's own tables"
    FWD_FIB = 1, "forwarded using bpf_fib_lookup"
    PASS_NOT_IP = 2, "not IPv4 or IPv6 (ARP, LLDP, ...)"
    PASS_TTL = 3, "TTL or hop limit would expire: the kernel sends time exceeded"
    PASS_IP_OPTIONS = 4, "IPv4 options or an IPv6 hop-by-hop header"
    PASS_FRAGMENT = 5, "IP fragment, handed to the kernel by configuration"
    PASS_MTU = 6, "larger than the egress MTU: the kernel fragments or sends PTB"
    PASS_LOCAL = 7, "for this host, or link-local"
    PASS_MULTICAST = 8, "multicast or broadcast"
    PASS_UNREACHABLE = 9, "unreachable or prohibit route: the kernel answers ICMP"
    PASS_NO_ROUTE = 10, "no route, or the FIB does not forward it"
    PASS_NO_NEIGH = 11, "next hop's neighbour unresolved: the kernel resolves it"
    PASS_EGRESS = 12, "egress interface is not one the fast path may redirect to"
    PASS_VLAN = 13, "VLAN-tagged frame"
    PASS_FIB_OTHER = 14, "bpf_fib_lookup gave another answer (forwarding disabled, ...)"
    PASS_MALFORMED = 15, "truncated or invalid header, or martian address"
    DROP_BLACKHOLE = 16, "dropped by a blackhole route"
    PASS_KERNEL_ROUTE = 17, "route says: kernel, with an unknown reason code"
    FWD_STALE = 18, "forwarded using bpf_fib_lookup alone: the daemon's tables are stale"
    PASS_FORWARDING_OFF = 19, "forwarding is off (IPv4: the ingress interface's; IPv6: all)"
    PASS_RULES = 20, ("policy rules the fast path cannot evaluate (fwmark, uid, ports, "
                      "l3mdev, action)")
    FWD_RULES = 21, "forwarded using bpf_fib_lookup, which applies the policy rules in place"
    PASS_VRF = 22, "ingress interface is enslaved to a VRF (l3mdev)"
    PASS_RP_FILTER = 23, "rp_filter or a custom rule set: the kernel validates the source"
    PASS_NETFILTER = 24, "netfilter rules may act on this family's forwarded traffic"
    PASS_XFRM = 25, "IPsec (XFRM) policies may cover this family's forwarded traffic"
    PASS_TC_INGRESS = 26, "tc or tcx ingress on the ingress interface: it runs before routing"
    PASS_EGRESS_QDISC = 27, "egress interface has its own qdisc or tc/tcx egress"
    PASS_CHECKSUM = 28, "TCP/UDP from a veth whose peer leaves checksums to offload"
    PASS_HAIRPIN = 29, "egress is the ingress interface: the kernel may send a redirect"
    PASS_MARTIAN_SOURCE = 30, "source is an address of this host: the kernel drops it"
    PASS_IFACE_UNKNOWN = 31, "interface without fast path state (ifindex beyond FS_MAX_IFACES)"
    PASS_OTHERHOST = 32, ("frame not addressed to the ingress interface's MAC: the kernel "
                          "drops it")
    PASS_NO_DAEMON = 33, ("no daemon follows the kernel (its heartbeat ran out): the kernel "
                          "forwards")


FS_REASON_MAX = 34


class FsV4Key(ctypes.Structure):
    _fields_ = [("prefixlen", ctypes.c_uint32), ("addr", ctypes.c_uint8 * 4)]


class FsV6Key(ctypes.Structure):
    _fields_ = [("prefixlen", ctypes.c_uint32), ("addr", ctypes.c_uint8 * 16)]


class FsRoute(ctypes.Structure):
    _fields_ = [
        ("nh_id", ctypes.c_uint32),
        ("action", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("reason", ctypes.c_uint8),
        ("plen", ctypes.c_uint8),
    ]


class FsDirPair(ctypes.Structure):
    _fields_ = [("entry", ctypes.c_uint32 * 2)]


class FsV6Lengths(ctypes.Structure):
    _fields_ = [("lengths", ctypes.c_uint64 * FS_V6_LENGTH_WORDS)]


class FsNexthop(ctypes.Structure):
    _fields_ = [
        ("ifindex", ctypes.c_uint32),
        ("mtu", ctypes.c_uint16),
        ("flags", ctypes.c_uint8),
        ("family", ctypes.c_uint8),
        ("smac", ctypes.c_uint8 * 6),
        ("dmac", ctypes.c_uint8 * 6),
        ("gateway", ctypes.c_uint8 * 16),
    ]


class FsGroup(ctypes.Structure):
    _fields_ = [
        ("nbuckets", ctypes.c_uint32),
        ("buckets", ctypes.c_uint32 * FS_GROUP_BUCKETS),
        ("nmembers", ctypes.c_uint32),
        ("member_ids", ctypes.c_uint32 * FS_GROUP_MEMBERS),
        ("member_weights", ctypes.c_uint32 * FS_GROUP_MEMBERS),
    ]


class FsNeighKey(ctypes.Structure):
    _fields_ = [
        ("ifindex", ctypes.c_uint32),
        ("family", ctypes.c_uint32),
        ("addr", ctypes.c_uint8 * 16),
    ]


class FsNeigh(ctypes.Structure):
    _fields_ = [("mac", ctypes.c_uint8 * 6), ("pad", ctypes.c_uint16)]


class FsCounter(ctypes.Structure):
    _fields_ = [("packets", ctypes.c_uint64), ("bytes", ctypes.c_uint64)]


class FsIface(ctypes.Structure):
    _fields_ = [
        ("pass_v4", ctypes.c_uint8),
        ("pass_v6", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("egress", ctypes.c_uint8),
        ("mac", ctypes.c_uint8 * 6),
        ("pad", ctypes.c_uint16),
    ]


class FsConfig(ctypes.Structure):
    _fields_ = [
        ("hash_policy_v4", ctypes.c_uint32),
        ("hash_policy_v6", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("v4_table", ctypes.c_uint32),
        ("v6_table", ctypes.c_uint32),
    ]


class FsHeartbeat(ctypes.Structure):
    _fields_ = [("fresh_until", ctypes.c_uint64), ("watched_until", ctypes.c_uint64)]


class FsTrustMemo(ctypes.Structure):
    """The program's own per-CPU memo of fs_trust's answer (user space never writes it)."""

    _fields_ = [("jiffies", ctypes.c_uint64), ("fresh_until", ctypes.c_uint64),
                ("watched_until", ctypes.c_uint64), ("trust", ctypes.c_uint64)]


# C struct name -> ctypes twin (what the ABI test compares).
STRUCTS: dict[str, type[ctypes.Structure]] = {
    "fs_v4_key": FsV4Key,
    "fs_v6_key": FsV6Key,
    "fs_route": FsRoute,
    "fs_dir_pair": FsDirPair,
    "fs_v6_lengths": FsV6Lengths,
    "fs_nexthop": FsNexthop,
    "fs_group": FsGroup,
    "fs_neigh_key": FsNeighKey,
    "fs_neigh": FsNeigh,
    "fs_counter": FsCounter,
    "fs_config": FsConfig,
    "fs_heartbeat": FsHeartbeat,
    "fs_trust_memo": FsTrustMemo,
    "fs_iface": FsIface,
}

# struct.Struct twins of the structs above, for the hot paths that encode or
# decode many entries at once; same field order, fixed-size byte arrays as "s".
V4_KEY = struct.Struct("=I4s")
V6_KEY = struct.Struct("=I16s")
ROUTE = struct.Struct("=IBBBB")
NEXTHOP = struct.Struct("=IHBB6s6s16s")
GROUP = struct.Struct(f"=I{FS_GROUP_BUCKETS}II{FS_GROUP_MEMBERS}I{FS_GROUP_MEMBERS}I")
NEIGH_KEY = struct.Struct("=II16s")
NEIGH = struct.Struct("=6sH")
COUNTER = struct.Struct("=QQ")
CONFIG = struct.Struct("=IIIII")
IFACE = struct.Struct("=BBBB6sH")
HEARTBEAT = struct.Struct("=QQ")
# the key of the maps keyed by an index or an id (nexthops, groups, config, ...)
U32 = struct.Struct("=I")
U64 = struct.Struct("=Q")

# C struct name -> struct.Struct twin (what tests/unit/test_abi_layouts.py compares).
LAYOUTS: dict[str, struct.Struct] = {
    "fs_v4_key": V4_KEY,
    "fs_v6_key": V6_KEY,
    "fs_route": ROUTE,
    "fs_nexthop": NEXTHOP,
    "fs_group": GROUP,
    "fs_neigh_key": NEIGH_KEY,
    "fs_neigh": NEIGH,
    "fs_counter": COUNTER,
    "fs_config": CONFIG,
    "fs_heartbeat": HEARTBEAT,
    "fs_iface": IFACE,
}

# numpy twins, for encoding and reading whole route tables as arrays
ROUTE_DTYPE = np.dtype([("nh_id", "=u4"), ("action", "u1"), ("flags", "u1"),
                        ("reason", "u1"), ("plen", "u1")])


def route_key_dtype(addr_len: int) -> np.dtype[Any]:
    """fs_v4_key (``addr_len`` 4) or fs_v6_key (16) as a numpy record."""
    return np.dtype([("plen", "=u4"), ("addr", "u1", (addr_len,))])


def pack_group(buckets: Sequence[int], members: Sequence[tuple[int, int]]) -> bytes:
    """struct fs_group: the buckets (nexthop ids), then the first FS_GROUP_MEMBERS
    (nexthop id, weight) members."""
    members = members[:FS_GROUP_MEMBERS]
    pad = [0] * (FS_GROUP_MEMBERS - len(members))
    return GROUP.pack(len(buckets), *buckets, *[0] * (FS_GROUP_BUCKETS - len(buckets)),
                      len(members), *[m for m, _ in members], *pad,
                      *[w for _, w in members], *pad)


def group_buckets(value: bytes) -> int:
    """nbuckets of a struct fs_group (0: every packet asks bpf_fib_lookup)."""
    return int(U32.unpack_from(value)[0])


def group_members(value: bytes) -> list[tuple[int, int]]:
    """The (nexthop id, weight) members of a struct fs_group."""
    fields = GROUP.unpack(value[:GROUP.size])
    n = fields[FS_GROUP_BUCKETS + 1]
    ids = fields[FS_GROUP_BUCKETS + 2:FS_GROUP_BUCKETS + 2 + n]
    base = FS_GROUP_BUCKETS + 2 + FS_GROUP_MEMBERS
    return list(zip(ids, fields[base:base + n], strict=True))


def fibonacci_hash(values: np.ndarray[Any, Any], mult: int, bits: int) -> np.ndarray[Any, Any]:
    """The top ``bits`` of value * mult (mod 2^32), as the program's fs_fibonacci_hash
    (bpf/hash.h): `local_v4`'s bits and `v6_lengths`' slots."""
    return ((values.astype(np.uint64) * mult) & 0xFFFFFFFF) >> (32 - bits)


def array_stride(value_size: int) -> int:
    """Where the values of a BPF array map sit apart: value_size rounded up to 8."""
    return (value_size + 7) & ~7


# BPF_MAP_TYPE_* values (stable UAPI) of the maps below.
MAP_HASH = 1
MAP_ARRAY = 2
MAP_PERCPU_ARRAY = 6
MAP_LPM_TRIE = 11
MAP_DEVMAP = 14
MAP_DEVMAP_HASH = 25

BPF_F_NO_PREALLOC = 0x1
BPF_F_MMAPABLE = 0x400
BPF_F_RDONLY_PROG = 0x80  # the kernel adds it to devmaps by itself: ignored when adopting


@dataclass(frozen=True, slots=True)
class Sizes:
    """max_entries of the sized maps (the header's FS_MAX_* macros)."""

    routes_v4: int = FS_MAX_ROUTES_V4
    routes_v6: int = FS_MAX_ROUTES_V6
    nexthops: int = FS_MAX_NEXTHOPS
    groups: int = FS_MAX_GROUPS
    neighbours: int = FS_MAX_NEIGH
    tx_ports: int = FS_MAX_TX_PORTS
    tbl8_groups: int = FS_MAX_TBL8_GROUPS
    slots: int = FS_MAX_SLOTS

    def cflags(self) -> list[str]:
        """The -D flags that make the C program agree with these sizes."""
        return [
            f"-DFS_MAX_ROUTES_V4={self.routes_v4}",
            f"-DFS_MAX_ROUTES_V6={self.routes_v6}",
            f"-DFS_MAX_NEXTHOPS={self.nexthops}",
            f"-DFS_MAX_GROUPS={self.groups}",
            f"-DFS_MAX_NEIGH={self.neighbours}",
            f"-DFS_MAX_TX_PORTS={self.tx_ports}",
            f"-DFS_MAX_TBL8_GROUPS={self.tbl8_groups}",
            f"-DFS_MAX_SLOTS={self.slots}",
        ]


@dataclass(frozen=True, slots=True)
class MapSpec:
    """What a pinned map must be to be adopted rather than replaced."""

    name: str
    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int = 0
    # created anew on every start, never adopted: see map_specs
    renew: bool = False

    @property
    def kernel_name(self) -> str:
        """The name the kernel keeps for the map (pins keep ``name``): it carries
        ``LAYOUT``, so that a map written under another meaning is never adopted."""
        return f"fs{LAYOUT}_{self.name}"[:15]


# The meaning of the maps' contents. Bump it when a value or key changes meaning
# without changing size (a size, type or flag change is caught anyway): a
# restart then replaces every map instead of adopting what the previous
# version wrote, and the old program keeps its maps until the new one is in.
LAYOUT = 1


def map_specs(sizes: Sizes) -> tuple[MapSpec, ...]:
    """Every map of the contract, in pin-file order.

    The route tables (the tries, the DIR-24-8 arrays, the IPv6 hash and its
    lengths) are renewed on a restart rather than adopted: the whole table is
    written anyway, and into an empty trie in address order it goes in as fast as
    on a fresh start, with no previous run's keys to walk and sweep after (the
    walk alone, ``get_next_key`` from the root for each of 1.25M keys, took longer
    than the write); DIR-24-8 is built in place, not beside a previous run's
    table it would first have to learn. The previous run's program keeps its own
    tables until the new program replaces it on each interface.
    """
    s = ctypes.sizeof
    return (
        MapSpec("routes_v4", MAP_LPM_TRIE, s(FsV4Key), s(FsRoute), sizes.routes_v4,
                BPF_F_NO_PREALLOC, renew=True),
        MapSpec("routes_v6", MAP_LPM_TRIE, s(FsV6Key), s(FsRoute), sizes.routes_v6,
                BPF_F_NO_PREALLOC, renew=True),
        MapSpec("nexthops", MAP_HASH, 4, s(FsNexthop), sizes.nexthops),
        MapSpec("groups", MAP_HASH, 4, s(FsGroup), sizes.groups),
        MapSpec("neighbours", MAP_HASH, s(FsNeighKey), s(FsNeigh), sizes.neighbours),
        MapSpec("tx_ports", MAP_DEVMAP_HASH, 4, 4, sizes.tx_ports),
        MapSpec("tx_direct", MAP_DEVMAP, 4, 4, FS_TX_DIRECT),
        MapSpec("counters", MAP_PERCPU_ARRAY, 4, s(FsCounter), FS_REASON_MAX),
        MapSpec("config", MAP_ARRAY, 4, s(FsConfig), 1),
        MapSpec("heartbeat", MAP_ARRAY, 4, s(FsHeartbeat), 1),
        MapSpec("trust_memo", MAP_PERCPU_ARRAY, 4, s(FsTrustMemo), 1),
        MapSpec("ifaces", MAP_ARRAY, 4, s(FsIface), FS_MAX_IFACES),
        MapSpec("local_v4", MAP_ARRAY, 4, 8, FS_LOCAL_V4_WORDS),
        MapSpec("v4_tbl24", MAP_ARRAY, 4, s(FsDirPair), FS_DIR24_ENTRIES // 2, BPF_F_MMAPABLE,
                renew=True),
        MapSpec("v4_tbl8", MAP_ARRAY, 4, s(FsDirPair),
                sizes.tbl8_groups * FS_TBL8_ENTRIES // 2, BPF_F_MMAPABLE, renew=True),
        MapSpec("v4_slots", MAP_ARRAY, 4, s(FsRoute), sizes.slots, BPF_F_MMAPABLE, renew=True),
        MapSpec("v4_nh", MAP_ARRAY, 4, s(FsNexthop), sizes.slots * 2, BPF_F_MMAPABLE,
                renew=True),
        MapSpec("v6_hash", MAP_HASH, s(FsV6Key), s(FsRoute), sizes.routes_v6,
                BPF_F_NO_PREALLOC, renew=True),
        MapSpec("v6_lengths", MAP_ARRAY, 4, s(FsV6Lengths), FS_V6_SLOTS + 1, BPF_F_MMAPABLE,
                renew=True),
    )


MAP_NAMES = tuple(spec.name for spec in map_specs(Sizes()))
# Maps an earlier version pinned and this one has not: a start over its pins removes
# them (the old program keeps its own reference until the new one replaces it).
RETIRED_MAPS = ("neigh_miss",)


def _addr(family: int, addr: bytes) -> bytes:
    if (family, len(addr)) not in ((AF_INET, 4), (AF_INET6, 16)):
        raise ValueError(f"address of {len(addr)} bytes for family {family}")
    return addr


def route_key(prefix: Prefix) -> FsV4Key | FsV6Key:
    """The LPM key of a prefix (routes_v4 or routes_v6 by its family)."""
    addr = _addr(prefix.family, prefix.addr)
    if prefix.family == AF_INET:
        return FsV4Key(prefix.length, (ctypes.c_uint8 * 4)(*addr))
    return FsV6Key(prefix.length, (ctypes.c_uint8 * 16)(*addr))


def neigh_key(ifindex: int, family: int, addr: bytes) -> FsNeighKey:
    """The neighbours key; IPv4 addresses are zero-padded to 16 bytes."""
    padded = _addr(family, addr).ljust(16, b"\0")
    return FsNeighKey(ifindex, family, (ctypes.c_uint8 * 16)(*padded))


def mac(text_or_bytes: str | bytes) -> ctypes.Array[ctypes.c_uint8]:
    """A 6-byte MAC for smac/dmac/mac fields, from bytes or "aa:bb:..."."""
    raw = bytes.fromhex(text_or_bytes.replace(":", "")) if isinstance(text_or_bytes, str) \
        else text_or_bytes
    if len(raw) != 6:
        raise ValueError(f"MAC of {len(raw)} bytes")
    return (ctypes.c_uint8 * 6)(*raw)


def gateway(family: int, addr: bytes | None) -> ctypes.Array[ctypes.c_uint8]:
    """fs_nexthop.gateway: the address zero-padded to 16 bytes (zeros if none)."""
    raw = b"" if addr is None else _addr(family, addr)
    return (ctypes.c_uint8 * 16)(*raw.ljust(16, b"\0"))

