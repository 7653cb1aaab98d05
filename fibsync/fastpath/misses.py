"""Read the ``neigh_miss`` ring buffer: next hops the XDP program found unresolved.

The program reserves an ``fs_miss`` record whenever a forwarding decision needs
a neighbour that the maps do not hold; the daemon drains the ring and asks the
kernel to resolve each address (a router whose kernel forwarding is off would
otherwise never ARP for it). This is the kernel's BPF ring buffer protocol read
through mmap, no bcc needed: a consumer position page (read-write), then the
producer position page and the data area mapped twice in a row (read-only).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass

from . import bpfsys

BUSY = 1 << 31
DISCARD = 1 << 30
HDR = struct.Struct("=II")
POS = struct.Struct("=Q")
MISS = struct.Struct("=II16s")


@dataclass(frozen=True, slots=True)
class Miss:
    ifindex: int
    family: int
    addr: bytes


class MissReader:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        size = bpfsys.map_info(fd).max_entries
        page = mmap.PAGESIZE
        self.mask = size - 1
        self.consumer = mmap.mmap(fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                                  offset=0)
        self.producer = mmap.mmap(fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ,
                                  offset=page)
        self.data_off = page
        self.dropped = 0

    def drain(self, limit: int = 4096) -> list[Miss]:
        """Everything the program has submitted since the last call (up to ``limit``)."""
        out: list[Miss] = []
        cons = POS.unpack_from(self.consumer, 0)[0]
        prod = POS.unpack_from(self.producer, 0)[0]
        while cons < prod and len(out) < limit:
            off = self.data_off + (cons & self.mask)
            length, _ = HDR.unpack_from(self.producer, off)
            if length & BUSY:
                break
            size = length & ~(BUSY | DISCARD)
            if not length & DISCARD and size >= MISS.size:
                ifindex, family, addr = MISS.unpack_from(self.producer, off + HDR.size)
                out.append(Miss(ifindex, family, addr[:16 if family == 10 else 4]))
            elif not length & DISCARD:
                self.dropped += 1
            cons += (size + HDR.size + 7) & ~7
        POS.pack_into(self.consumer, 0, cons)
        return out

    def close(self) -> None:
        self.consumer.close()
        self.producer.close()
