"""What the RIB hands to the map writer: fast-path entries, and the diff of them.

These are the meaning of bpf/fibsync.h's map values; their bytes are
fastpath/abi.py's, and the writer encodes them there. ``Filter`` says which
kernel routes feed the fast path at all.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import numpy as np

from ..fastpath import abi
from ..model import RT_TABLE_LOCAL, Prefix, Route, RouteType

GROUP_BUCKETS = abi.FS_GROUP_BUCKETS


class Action(IntEnum):
    """What the XDP program does with a prefix (bpf/fibsync.h's FS_ACT_*)."""

    FORWARD = abi.FS_ACT_FORWARD
    DROP = abi.FS_ACT_DROP
    KERNEL = abi.FS_ACT_KERNEL
    FIB = abi.FS_ACT_FIB


@dataclass(frozen=True, slots=True)
class FpNexthop:
    ifindex: int
    mtu: int
    resolved: bool
    connected: bool
    family: int
    smac: bytes
    dmac: bytes
    gateway: bytes


@dataclass(frozen=True, slots=True)
class FpGroup:
    """ECMP buckets (nexthop ids by weight) and the members with their kernel weights.

    No bucket: the kernel picks the path (every packet asks bpf_fib_lookup), while
    its selection may skip a member (``choice.kernel_picks_path``)."""

    buckets: tuple[int, ...]
    members: tuple[tuple[int, int], ...]

    @property
    def by_kernel(self) -> bool:
        return not self.buckets


@dataclass(frozen=True, slots=True)
class FpRoute:
    action: Action
    nh_id: int = 0
    group: bool = False
    reason: str = ""


@dataclass(slots=True)
class RouteRows:
    """Routes to set, as arrays: row i is prefix ``addrs[i]/lens[i]`` with entry
    ``entries[ids[i]]``. No row's prefix is also in the diff's ``routes``."""

    family: int
    addrs: np.ndarray[Any, Any]  # uint8 (n, 4 | 16), network order
    lens: np.ndarray[Any, Any]  # uint8
    ids: np.ndarray[Any, Any]  # intp
    entries: list[FpRoute]

    def __len__(self) -> int:
        return len(self.lens)

    def items(self) -> Iterator[tuple[Prefix, FpRoute]]:
        entries = self.entries
        for addr, length, i in zip(self.addrs, self.lens.tolist(), self.ids.tolist(),
                                   strict=True):
            yield Prefix(self.family, addr.tobytes(), length), entries[i]


@dataclass(slots=True)
class FastPathDiff:
    """What the maps must change, coalesced: None means delete."""

    nexthops: dict[int, FpNexthop | None] = field(default_factory=dict)
    groups: dict[int, FpGroup | None] = field(default_factory=dict)
    routes: dict[Prefix, FpRoute | None] = field(default_factory=dict)
    neighbours: dict[tuple[int, int, bytes], bytes | None] = field(default_factory=dict)
    # more routes to set, as arrays (a resync's compact routes)
    bulk: list[RouteRows] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.nexthops or self.groups or self.routes or self.neighbours
                    or any(len(rows) for rows in self.bulk))

    def __len__(self) -> int:
        return (len(self.nexthops) + len(self.groups) + len(self.routes) + len(self.neighbours)
                + sum(len(rows) for rows in self.bulk))

    def expand(self) -> None:
        """Move the ``bulk`` rows into ``routes`` (for code that edits entries one by one)."""
        for rows in self.bulk:
            self.routes.update(rows.items())
        self.bulk = []


_LOCAL_TYPES = {RouteType.LOCAL, RouteType.BROADCAST, RouteType.ANYCAST, RouteType.MULTICAST}


@dataclass(frozen=True, slots=True)
class Filter:
    """Which kernel routes feed the fast path."""

    table: int = 254
    protocols: frozenset[int] | None = None

    def follows(self, route: Route) -> bool:
        if route.table == RT_TABLE_LOCAL:
            return route.type in _LOCAL_TYPES
        if route.table != self.table:
            return False
        return self.protocols is None or route.protocol in self.protocols
