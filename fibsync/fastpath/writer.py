"""Diffs from the RIB -> map updates, batched and ordered.

The writer never decides anything: it encodes the ``FastPathDiff`` into the
layouts of bpf/fibsync.h and applies it in an order that never lets the XDP
program see a reference to something that is not there yet:

    nexthops set -> groups set -> routes set (longest prefixes first)
    -> routes deleted -> groups deleted -> nexthops deleted -> neighbours

Every map write goes through a ``MapSet``: the pinned BPF maps in the daemon,
``MemoryMaps`` in tests (the same idea as httpx's MockTransport).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from ..errors import MapError, MapFullError
from ..model import AF_INET, AF_INET6, Prefix
from ..rib import GROUP_BUCKETS, FastPathDiff, FpGroup, FpNexthop, FpRoute, Rib
from . import abi

# layouts of bpf/fibsync.h (checked against abi's ctypes twins by tests/unit/test_writer.py)
V4_KEY = struct.Struct("=I4s")
V6_KEY = struct.Struct("=I16s")
ROUTE = struct.Struct("=IBBBB")
NEXTHOP = struct.Struct("=IHBB6s6s16s")
GROUP_MEMBERS = 64
GROUP = struct.Struct(f"=I{GROUP_BUCKETS}II{GROUP_MEMBERS}I{GROUP_MEMBERS}I")
NEIGH_KEY = struct.Struct("=II16s")
NEIGH = struct.Struct("=6sH")
U32 = struct.Struct("=I")

NH_RESOLVED = 0x1
NH_CONNECTED = 0x2
ROUTE_GROUP = 0x1

ROUTE_MAPS = {AF_INET: "routes_v4", AF_INET6: "routes_v6"}


class MapSet(Protocol):
    """Where the writer's bytes go: one named BPF map each."""

    def update(self, name: str, items: list[tuple[bytes, bytes]]) -> None: ...

    def delete(self, name: str, keys: list[bytes]) -> None: ...

    def items(self, name: str) -> Iterator[tuple[bytes, bytes]]: ...


@dataclass
class MemoryMaps:
    """An in-memory MapSet with the kernel's capacity rule (E2BIG when full)."""

    capacity: dict[str, int] = field(default_factory=dict)
    maps: dict[str, dict[bytes, bytes]] = field(default_factory=dict)

    def update(self, name: str, items: list[tuple[bytes, bytes]]) -> None:
        m = self.maps.setdefault(name, {})
        limit = self.capacity.get(name)
        for i, (k, v) in enumerate(items):
            if limit is not None and k not in m and len(m) >= limit:
                raise _partial(name, i)
            m[k] = v

    def delete(self, name: str, keys: list[bytes]) -> None:
        m = self.maps.setdefault(name, {})
        for k in keys:
            m.pop(k, None)

    def items(self, name: str) -> Iterator[tuple[bytes, bytes]]:
        return iter(list(self.maps.get(name, {}).items()))


def _partial(name: str, done: int) -> MapFullError:
    err = MapFullError(f"{name}: map full after {done} entries")
    err.done = done  # type: ignore[attr-defined]
    return err


def route_key(prefix: Prefix) -> bytes:
    if prefix.family == AF_INET:
        return V4_KEY.pack(prefix.length, prefix.addr)
    return V6_KEY.pack(prefix.length, prefix.addr)


def encode_route(entry: FpRoute) -> bytes:
    reason = abi.Reason[entry.reason].value if entry.reason else 0
    return ROUTE.pack(entry.nh_id, int(entry.action), ROUTE_GROUP if entry.group else 0,
                      reason, 0)


def encode_nexthop(nh: FpNexthop) -> bytes:
    flags = (NH_RESOLVED if nh.resolved else 0) | (NH_CONNECTED if nh.connected else 0)
    return NEXTHOP.pack(nh.ifindex, nh.mtu, flags, nh.family, nh.smac, nh.dmac, nh.gateway)


def encode_group(group: FpGroup) -> bytes:
    buckets = list(group.buckets) + [0] * (GROUP_BUCKETS - len(group.buckets))
    members = group.members[:GROUP_MEMBERS]
    pad = [0] * (GROUP_MEMBERS - len(members))
    return GROUP.pack(len(group.buckets), *buckets, len(members),
                      *[m for m, _ in members], *pad, *[w for _, w in members], *pad)


def neigh_key(key: tuple[int, int, bytes]) -> bytes:
    ifindex, family, addr = key
    return NEIGH_KEY.pack(ifindex, family, addr)


@dataclass
class WriterStats:
    batches: int = 0
    entries: int = 0
    errors: int = 0
    full: int = 0
    last_error: str = ""


class MapWriter:
    def __init__(self, maps: MapSet, batch: int = 65536) -> None:
        self.maps = maps
        self.batch = batch
        self.stats = WriterStats()
        # prefixes the maps could not take: the fast path must not answer for them
        self.unwritten: set[Prefix] = set()

    def write(self, diff: FastPathDiff) -> None:
        nh_set = [(U32.pack(i), encode_nexthop(nh)) for i, nh in diff.nexthops.items() if nh]
        grp_set = [(U32.pack(i), encode_group(b)) for i, b in diff.groups.items() if b]
        self._update("nexthops", nh_set)
        self._update("groups", grp_set)

        for family, name in ROUTE_MAPS.items():
            adds = sorted(((p, e) for p, e in diff.routes.items()
                           if e is not None and p.family == family),
                          key=lambda pe: -pe[0].length)
            self._update_routes(name, adds)
            dels = [route_key(p) for p, e in diff.routes.items()
                    if e is None and p.family == family]
            self._delete(name, dels)
            for p, e in diff.routes.items():
                if e is None and p.family == family:
                    self.unwritten.discard(p)

        self._delete("groups", [U32.pack(i) for i, b in diff.groups.items() if not b])
        self._delete("nexthops", [U32.pack(i) for i, nh in diff.nexthops.items() if not nh])
        self._update("neighbours", [(neigh_key(k), NEIGH.pack(mac[:6], 0))
                                    for k, mac in diff.neighbours.items() if mac])
        self._delete("neighbours", [neigh_key(k) for k, mac in diff.neighbours.items()
                                    if not mac])

    def sweep(self, rib: Rib) -> int:
        """Delete every map entry the RIB does not want (a previous run's leftovers).

        Routes go first, then what they pointed to, so nothing dangles.
        """
        prefixes, nexthops, groups, neighbours = rib.fast_path_keys()
        want = {
            "routes_v4": {route_key(p) for p in prefixes if p.family == AF_INET},
            "routes_v6": {route_key(p) for p in prefixes if p.family == AF_INET6},
            "groups": {U32.pack(i) for i in groups},
            "nexthops": {U32.pack(i) for i in nexthops},
            "neighbours": {neigh_key(k) for k in neighbours},
        }
        swept = 0
        for name, keys in want.items():
            stale = [k for k, _ in self.maps.items(name) if k not in keys]
            self._delete(name, stale)
            swept += len(stale)
        return swept

    def _update_routes(self, name: str, adds: list[tuple[Prefix, FpRoute]]) -> None:
        items = [(route_key(p), encode_route(e)) for p, e in adds]
        done = self._update(name, items)
        for p, _ in adds[:done]:
            self.unwritten.discard(p)
        self.unwritten.update(p for p, _ in adds[done:])

    def _update(self, name: str, items: list[tuple[bytes, bytes]]) -> int:
        """Write items in batches; returns how many made it (all, unless a map is full)."""
        done = 0
        for chunk in _chunks(items, self.batch):
            try:
                self.maps.update(name, chunk)
            except MapFullError as e:
                self.stats.full += 1
                self.stats.errors += 1
                self.stats.last_error = str(e)
                return done + int(getattr(e, "done", 0))
            except MapError as e:
                self.stats.errors += 1
                self.stats.last_error = str(e)
                return done
            done += len(chunk)
            self.stats.batches += 1
            self.stats.entries += len(chunk)
        return done

    def _delete(self, name: str, keys: list[bytes]) -> None:
        for chunk in _chunks(keys, self.batch):
            try:
                self.maps.delete(name, chunk)
            except MapError as e:
                self.stats.errors += 1
                self.stats.last_error = str(e)
                continue
            self.stats.batches += 1
            self.stats.entries += len(chunk)


def _chunks(items: list[bytes] | list[tuple[bytes, bytes]], n: int) -> Iterable[list]:  # type: ignore[type-arg]
    for i in range(0, len(items), n):
        yield items[i:i + n]
