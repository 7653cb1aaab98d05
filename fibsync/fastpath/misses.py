"""Next hops the XDP program found unresolved, read from its ``neigh_miss`` ring.

The program submits an ``fs_miss`` record whenever a forwarding decision needs
a neighbour the maps do not hold; the daemon drains the ring and asks the
kernel to resolve each address once (a router whose kernel forwarding is off
would otherwise never ARP for it). The ring protocol itself is
``bpfsys.RingBuffer``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..model import AF_INET6
from .abi import MISS
from .bpfsys import RingBuffer


@dataclass(frozen=True, slots=True)
class Miss:
    ifindex: int
    family: int
    addr: bytes


class MissReader:
    def __init__(self, fd: int) -> None:
        self.ring = RingBuffer(fd)
        self.malformed = 0

    def fileno(self) -> int:
        return self.ring.fileno()

    def drain(self) -> set[Miss]:
        """The distinct misses submitted since the last call: one packet burst to an
        unresolved next hop submits one record per packet."""
        out = set()
        for record in self.ring.drain():
            if len(record) < MISS.size:
                self.malformed += 1
                continue
            ifindex, family, addr = MISS.unpack_from(record)
            out.add(Miss(ifindex, family, addr[:16 if family == AF_INET6 else 4]))
        return out

    def close(self) -> None:
        self.ring.close()
