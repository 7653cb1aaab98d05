"""One scaffolding for the unit tests of the mirror: RIB -> writer -> in-memory maps.

``Mirror`` wires a ``Rib``, a ``MapWriter`` and ``MemoryMaps`` the way the
daemon does (``guard=True``: through its ``FullMapGuard`` too), and reads the
maps back with the reader ``fibsync routes`` uses; the functions below build
the decoded kernel objects the tests feed it.
"""

from __future__ import annotations

import socket

import structlog

from fibsync.fastpath.guard import FullMapGuard
from fibsync.fastpath.maps import read_routes
from fibsync.fastpath.writer import MapWriter, MemoryMaps
from fibsync.model import (
    AF_INET,
    AF_INET6,
    NUD_REACHABLE,
    Address,
    Change,
    Link,
    Neighbour,
    Nexthop,
    NexthopObject,
    Op,
    Prefix,
    Route,
    RouteType,
    Snapshot,
)
from fibsync.rib import Filter, Rib

UP = 0x1 | 0x40 | 0x10000  # IFF_UP | IFF_RUNNING | IFF_LOWER_UP
NO_CARRIER = 0x1  # administratively up, no carrier (the peer went down)
DOWN = 0x0
MAC1 = bytes.fromhex("020000000001")
MAC2 = bytes.fromhex("020000000002")


def ip(text: str) -> bytes:
    return socket.inet_pton(AF_INET6 if ":" in text else AF_INET, text)


def addr(ifindex: int, text: str) -> Address:
    address, length = text.split("/")
    return Address(AF_INET6 if ":" in address else AF_INET, ifindex, ip(address), int(length))


def link(ifindex: int, flags: int = UP) -> Link:
    return Link(ifindex, f"eth{ifindex}", bytes([2, 0, 0, 0, 0, ifindex]), 1500, flags)


def neigh(ifindex: int, addr: str, mac: bytes = MAC1, state: int = NUD_REACHABLE) -> Neighbour:
    return Neighbour(AF_INET6 if ":" in addr else AF_INET, ifindex, ip(addr), mac, state)


def route(prefix: str, *paths: tuple[str | None, int, int], nhid: int = 0,
          type: RouteType = RouteType.UNICAST, table: int = 254, metric: int = 0,
          protocol: int = 186, dead: tuple[int, ...] = ()) -> Route:
    hops = tuple(Nexthop(ifindex, ip(gw) if gw else None,
                         (AF_INET6 if gw and ":" in gw else AF_INET) if gw else 0, weight,
                         0x1 if i in dead else 0)  # RTNH_F_DEAD
                 for i, (gw, ifindex, weight) in enumerate(paths))
    return Route(Prefix.parse(prefix), table, type, protocol, 0, metric, 0, hops, nhid)


def nh_obj(id: int, gw: str | None = None, ifindex: int = 0,
           group: tuple[tuple[int, int], ...] = (), blackhole: bool = False) -> NexthopObject:
    family = AF_INET6 if gw and ":" in gw else AF_INET
    return NexthopObject(id, family, ifindex, ip(gw) if gw else None, blackhole, group)


class Mirror:
    """RIB + writer + in-memory maps, the way the daemon wires them."""

    def __init__(self, filter: Filter | None = None, maps: MemoryMaps | None = None,
                 first_id: int = 1, guard: bool = False) -> None:
        self.rib = Rib(filter, first_id=first_id)
        self.maps = maps or MemoryMaps()
        self.writer = MapWriter(self.maps)
        self.guard = FullMapGuard(self.rib, self.writer, structlog.get_logger()) if guard \
            else None
        self.writes: list[int] = []

    def sync(self, **kw: list) -> None:  # type: ignore[type-arg]
        self.rib.resync(Snapshot(**kw))
        self._flush()

    def apply(self, *changes: Change) -> None:
        self.rib.apply(changes)
        self._flush()

    def add(self, *objs: object) -> None:
        self.apply(*(Change(Op.ADD, o) for o in objs))  # type: ignore[arg-type]

    def delete(self, *objs: object) -> None:
        self.apply(*(Change(Op.DEL, o) for o in objs))  # type: ignore[arg-type]

    def _flush(self) -> None:
        diff = self.rib.take_diff()
        self.writes.append(len(diff))
        if self.guard is not None:
            self.guard.write(diff)
        else:
            self.writer.write(diff)

    def sweep(self) -> int:
        """The daemon's sweep once synced: what the RIB does not want leaves the maps."""
        return self.writer.sweep(self.rib.holds_prefix, *self.rib.fast_path_keys())

    def routes(self) -> dict[str, dict]:  # type: ignore[type-arg]
        return {e["prefix"]: e for e in read_routes(self.maps)}

    def paths(self, prefix: str) -> set[tuple[str | None, int, int, bool]]:
        e = self.routes()[prefix]
        return {(h["gateway"], h["ifindex"], h["weight"], h["resolved"]) for h in e["nexthops"]}
