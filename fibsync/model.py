"""The routing vocabulary shared by every stage: what the kernel holds, decoded.

Objects are slotted, hashable values: the netlink decoder makes them, the RIB
keeps them, nobody mutates them. They are deliberately not ``frozen=True``:
a frozen dataclass costs ~1.4 µs to build against ~0.3 µs (measured on this
machine), and a full table decodes millions of them; ``unsafe_hash`` keeps them
usable as keys. Change one with ``dataclasses.replace``, never by assignment.
Addresses are packed bytes (4 or 16) so that they go into BPF keys without
conversion; ``str()`` gives the usual text forms.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, NamedTuple

import numpy as np

AF_INET = socket.AF_INET
AF_INET6 = socket.AF_INET6

ADDR_LEN = {AF_INET: 4, AF_INET6: 16}


def addr_str(family: int, addr: bytes) -> str:
    return socket.inet_ntop(family, addr)


def family_of(text: str) -> int:
    return AF_INET6 if ":" in text else AF_INET


class RouteType(IntEnum):
    """The kernel's RTN_* route types."""

    UNSPEC = 0
    UNICAST = 1
    LOCAL = 2
    BROADCAST = 3
    ANYCAST = 4
    MULTICAST = 5
    BLACKHOLE = 6
    UNREACHABLE = 7
    PROHIBIT = 8
    THROW = 9
    NAT = 10
    XRESOLVE = 11


# RouteType by its number: a tuple index, cheaper than the enum's call on a dump's hot path
ROUTE_TYPES = tuple(RouteType(t) for t in range(len(RouteType)))


class Op(IntEnum):
    ADD = 1
    DEL = 2


# neighbour states (NUD_*) whose lladdr is usable for forwarding
NUD_INCOMPLETE = 0x01
NUD_REACHABLE = 0x02
NUD_STALE = 0x04
NUD_DELAY = 0x08
NUD_PROBE = 0x10
NUD_FAILED = 0x20
NUD_NOARP = 0x40
NUD_PERMANENT = 0x80
NUD_VALID = NUD_REACHABLE | NUD_STALE | NUD_DELAY | NUD_PROBE | NUD_PERMANENT | NUD_NOARP

RT_TABLE_MAIN = 254
RT_TABLE_LOCAL = 255

ARPHRD_ETHER = 1  # ifinfomsg.ifi_type of an Ethernet interface (veth, bridge, bond, vlan...)


class Prefix(NamedTuple):
    """A destination prefix; host bits are always zero.

    A tuple, not a dataclass: prefixes are the keys of every table the RIB
    keeps, and a tuple hashes and compares in C (a dataclass's __hash__ is a
    Python call on every dict lookup).
    """

    family: int
    addr: bytes
    length: int

    @classmethod
    def parse(cls, text: str) -> Prefix:
        net = ipaddress.ip_network(text, strict=False)
        family = AF_INET6 if net.version == 6 else AF_INET
        return cls(family, net.network_address.packed, net.prefixlen)

    @classmethod
    def of(cls, family: int, addr: bytes, length: int) -> Prefix:
        """Build from a possibly unmasked address (the kernel always masks)."""
        n = int.from_bytes(addr, "big")
        bits = len(addr) * 8
        mask = ((1 << bits) - 1) ^ ((1 << (bits - length)) - 1)
        return cls(family, (n & mask).to_bytes(len(addr), "big"), length)

    def __str__(self) -> str:
        return f"{addr_str(self.family, self.addr)}/{self.length}"


@dataclass(slots=True, unsafe_hash=True)
class Nexthop:
    """One path of a route: RTA_GATEWAY/RTA_VIA + RTA_OIF, or one RTA_MULTIPATH entry.

    ``gateway`` is None for a connected (on-link) path; ``gateway_family`` may
    differ from the route's family (IPv4 via an IPv6 next hop, RFC 5549).
    """

    ifindex: int
    gateway: bytes | None = None
    gateway_family: int = 0
    weight: int = 1
    flags: int = 0
    # lwtunnel encapsulation (LWTUNNEL_ENCAP_*, RTA_ENCAP_TYPE); non-zero means
    # the kernel adds headers (MPLS, SRv6, ...) the fast path does not
    encap: int = 0

    def __str__(self) -> str:
        via = f"via {addr_str(self.gateway_family, self.gateway)} " if self.gateway else ""
        return f"{via}ifindex {self.ifindex} weight {self.weight}"


@dataclass(slots=True, unsafe_hash=True)
class Route:
    """A kernel route (RTM_NEWROUTE).

    A route either carries its paths inline (``nexthops``) or refers to a
    kernel nexthop object (``nhid``); with ``nexthop_compat_mode=1`` the
    kernel sends both, and ``nhid`` wins: the decoder keeps no inline paths on
    a route over an object.
    """

    prefix: Prefix
    table: int = RT_TABLE_MAIN
    type: RouteType = RouteType.UNICAST
    protocol: int = 0
    scope: int = 0
    metric: int = 0
    tos: int = 0
    nexthops: tuple[Nexthop, ...] = ()
    nhid: int = 0
    mtu: int = 0
    flags: int = 0

    @property
    def key(self) -> tuple[int, Prefix, int, int]:
        """The kernel's identity of a route within a table (prefix, tos, metric)."""
        return (self.table, self.prefix, self.tos, self.metric)


@dataclass(slots=True)
class RouteColumns:
    """Routes of one family as columns, one row each: the common form of a full
    table (routes over nexthop objects), as netlink/columns.py reads a dump.

    ``ordinal`` is each route's message number in the dump: rows are grouped
    by layout, not in dump order, and routes decoded one by one
    (``Snapshot.route_ordinals``) go back among them by it.
    """

    family: int
    ordinal: np.ndarray[Any, Any]  # int64
    dst: np.ndarray[Any, Any]  # uint8 (n, 4 | 16), network order
    dst_len: np.ndarray[Any, Any]  # uint8
    tos: np.ndarray[Any, Any]  # uint8
    table: np.ndarray[Any, Any]  # uint32: RTA_TABLE, else rtm_table
    protocol: np.ndarray[Any, Any]  # uint8
    scope: np.ndarray[Any, Any]  # uint8
    type: np.ndarray[Any, Any]  # uint8 (RTN_*)
    flags: np.ndarray[Any, Any]  # uint32 (rtm_flags)
    metric: np.ndarray[Any, Any]  # uint32
    nhid: np.ndarray[Any, Any]  # uint32

    FIELDS = ("ordinal", "dst", "dst_len", "tos", "table", "protocol", "scope", "type",
              "flags", "metric", "nhid")

    def __len__(self) -> int:
        return len(self.ordinal)

    def route(self, i: int) -> Route:
        """Row ``i`` as the model object decode() makes (without the inline paths)."""
        rtype = int(self.type[i])
        return Route(
            Prefix(self.family, self.dst[i].tobytes(), int(self.dst_len[i])),
            int(self.table[i]),
            ROUTE_TYPES[rtype] if rtype < len(ROUTE_TYPES) else RouteType.UNSPEC,
            int(self.protocol[i]),
            int(self.scope[i]),
            int(self.metric[i]),
            int(self.tos[i]),
            (),
            int(self.nhid[i]),
            0,
            int(self.flags[i]),
        )

    @classmethod
    def empty(cls, family: int) -> RouteColumns:
        z8 = np.zeros(0, np.uint8)
        z32 = np.zeros(0, np.uint32)
        return cls(family, np.zeros(0, np.int64), np.zeros((0, ADDR_LEN[family]), np.uint8),
                   z8, z8, z32, z8, z8, z8, z32, z32, z32)

    @classmethod
    def concat(cls, family: int, parts: list[RouteColumns]) -> RouteColumns:
        if not parts:
            return cls.empty(family)
        if len(parts) == 1:
            return parts[0]
        return cls(family, *(np.concatenate([getattr(p, f) for p in parts])
                             for f in cls.FIELDS))


@dataclass(slots=True, unsafe_hash=True)
class NexthopObject:
    """A kernel nexthop object (RTM_NEWNEXTHOP): a single path, a blackhole, or a group.

    ``group`` holds (member id, weight) pairs; weights are 1..256 as ``ip
    nexthop`` shows them.
    """

    id: int
    family: int = 0
    ifindex: int = 0
    gateway: bytes | None = None
    blackhole: bool = False
    group: tuple[tuple[int, int], ...] = ()
    flags: int = 0
    protocol: int = 0
    # lwtunnel encapsulation (NHA_ENCAP_TYPE), as Nexthop.encap
    encap: int = 0

    @property
    def is_group(self) -> bool:
        return bool(self.group)


@dataclass(slots=True, unsafe_hash=True)
class Neighbour:
    """An ARP/NDP entry (RTM_NEWNEIGH)."""

    family: int
    ifindex: int
    address: bytes
    lladdr: bytes | None = None
    state: int = 0
    flags: int = 0

    @property
    def valid(self) -> bool:
        return self.lladdr is not None and bool(self.state & NUD_VALID)

    @property
    def key(self) -> tuple[int, int, bytes]:
        return (self.ifindex, self.family, self.address)


@dataclass(slots=True, unsafe_hash=True)
class Link:
    """A network interface (RTM_NEWLINK)."""

    ifindex: int
    name: str
    mac: bytes | None = None
    mtu: int = 1500
    flags: int = 0
    kind: str = ""
    link: int = 0
    vlan_id: int = 0
    arphrd: int = ARPHRD_ETHER  # ifinfomsg's ifi_type: what ``mac`` is an address of

    @property
    def ethernet_mac(self) -> bytes:
        """The interface's Ethernet address; zeros for one that has none (lo,
        tunnels, any other hardware type), as SIOCGIFHWADDR would say."""
        if self.arphrd == ARPHRD_ETHER and self.mac is not None and len(self.mac) == 6:
            return self.mac
        return bytes(6)

    @property
    def up(self) -> bool:
        # IFF_UP and IFF_LOWER_UP: administratively up with carrier
        return bool(self.flags & 0x1) and bool(self.flags & 0x10000)


@dataclass(slots=True, unsafe_hash=True)
class Address:
    """An interface address (RTM_NEWADDR)."""

    family: int
    ifindex: int
    address: bytes
    prefixlen: int

    @property
    def key(self) -> tuple[int, int, bytes, int]:
        return (self.ifindex, self.family, self.address, self.prefixlen)


KernelObject = Route | NexthopObject | Neighbour | Link | Address


@dataclass(slots=True, unsafe_hash=True)
class Change:
    """One netlink notification, decoded: add/replace or delete of one object.

    ``nlflags`` keeps the header flags (NLM_F_REPLACE, NLM_F_APPEND, ...)
    because IPv6 multipath updates depend on them.
    """

    op: Op
    obj: KernelObject
    nlflags: int = 0


@dataclass(slots=True)
class Snapshot:
    """Everything a full dump returned, in dump order.

    Routes come two ways: the common form of a full table (routes over
    nexthop objects) as ``route_columns``, one row per route, and every
    other route as a model object in ``routes``. ``route_ordinals`` gives
    each object's place in the dump beside the rows' ``ordinal`` (empty:
    the objects are in order and there are no columns).
    """

    links: list[Link] = field(default_factory=list)
    addresses: list[Address] = field(default_factory=list)
    neighbours: list[Neighbour] = field(default_factory=list)
    nexthops: list[NexthopObject] = field(default_factory=list)
    routes: list[Route] = field(default_factory=list)
    route_ordinals: list[int] = field(default_factory=list)
    route_columns: list[RouteColumns] = field(default_factory=list)
    # the kernel announced no change while the dump was taken (NetlinkSource): a
    # consistent picture, which the dump-skip the self-audit exists for cannot have hit
    quiet: bool = False

    def route_count(self) -> int:
        return len(self.routes) + sum(len(c) for c in self.route_columns)

    def all_routes(self) -> list[Route]:
        """Every route as a model object, in dump order (slow for a full table)."""
        if not self.route_columns:
            return list(self.routes)
        ordered = list(zip(self.route_ordinals, self.routes, strict=True))
        for cols in self.route_columns:
            ordered += ((int(o), cols.route(i)) for i, o in enumerate(cols.ordinal.tolist()))
        ordered.sort(key=lambda pair: pair[0])
        return [route for _, route in ordered]
