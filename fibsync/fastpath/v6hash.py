"""The IPv6 hash table the XDP program reads when ``fs_config.v6_table`` is
``FS_V6_HASH``: a hash per prefix length over the lengths in use, probed
longest first (bpf/fibsync.h has the layout, above FS_V6_SLOT_BITS).

Two maps. ``v6_hash`` holds every IPv6 prefix under the key and value the
LPM trie ``routes_v6`` would (the writer writes it with the trie's batches,
and every reader of a route map reads it alike). ``v6_lengths``, a
BPF_F_MMAPABLE array this module writes in place, says which lengths to
probe: slot ``slot(a)`` (a hash of the /32 that holds ``a``) the lengths
33-128 of the prefixes inside the /32s that hash to it, the last slot the
lengths 0-32 in use. A destination costs a probe per length set in its
slot, then per short length, up to the first hit: one or two in a table
of /48s and /32s, against a walk of ~20 trie nodes.

The lengths may only ever say "maybe" too often, never too rarely, and
readers run concurrently, so:

- a length's bit is set after the prefix's entry is written (either order
  is safe: without the bit a packet finds the shorter route it found
  before the change), with one aligned 8-byte store per word (numpy's
  ``bitwise_or.at``: read, or, store, element by element);
- a deleted prefix leaves its bit set (a probe that misses, never a wrong
  answer: which other prefix still needs it is not known without the whole
  table) until ``rebuild`` recomputes every slot from the table, which the
  writer does after ``REBUILD_AFTER`` deletions and on its first write.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from . import abi

SLOTS = abi.FS_V6_SLOTS
LAST = SLOTS  # the slot of the lengths 0-32
WORDS = abi.FS_V6_LENGTH_WORDS
# deletions after which the lengths are rebuilt from the table: a full table's
# rebuild reads 250k entries (~0.1 s), and until then a stale length costs a
# packet to that slot one probe that misses
REBUILD_AFTER = 65536
U64 = np.uint64


def slot(top: npt.NDArray[np.uint32]) -> npt.NDArray[np.intp]:
    """The v6_lengths slot of /32s given as host-order integers (Fibonacci hashing)."""
    return abi.fibonacci_hash(top, abi.FS_V6_SLOT_HASH, abi.FS_V6_SLOT_BITS).astype(np.intp)


def positions(addrs: npt.NDArray[np.uint8], lens: npt.NDArray[np.uint8]
              ) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.uint64]]:
    """Where the prefixes' lengths go: the index of their word in the flat
    v6_lengths array (slot * WORDS + word) and the bit in that word."""
    top = np.ascontiguousarray(addrs[:, :4]).view(">u4").ravel()
    lens = lens.astype(np.intp)
    slots = np.where(lens > 32, slot(top), LAST)
    i = 128 - lens
    return slots * WORDS + (i >> 6), np.left_shift(U64(1), (i & 63).astype(np.uint64))


def probe_order(words: npt.NDArray[np.uint64], addr: bytes) -> list[int]:
    """The lengths the program probes for ``addr``, in order (longest first)."""
    top = np.frombuffer(addr[:4], ">u4")
    s = int(slot(top)[0])
    out: list[int] = []
    # the words the program reads: the slot's lengths 128-33, the last slot's 32-0
    for row, first in ((s, 0), (LAST, 1)):
        for w in range(first, first + 2):
            bits = int(words[row * WORDS + w])
            out += [128 - (64 * w + i) for i in range(64) if bits >> i & 1]
    return out


def match(words: npt.NDArray[np.uint64], get: Callable[[bytes], bytes | None],
          addr: bytes) -> tuple[int, bytes] | None:
    """What the program finds for ``addr``: (prefix length, value) of the first
    probe that hits, ``get`` looking a fs_v6_key up in v6_hash; None: a miss."""
    n = int.from_bytes(addr, "big")
    for length in probe_order(words, addr):
        masked = (n >> (128 - length) << (128 - length)) if length else 0
        value = get(abi.V6_KEY.pack(length, masked.to_bytes(16, "big")))
        if value is not None:
            return length, value
    return None


class V6Lengths:
    """The v6_lengths array, written in place: the BPF map's mmap in the
    daemon, plain memory in tests."""

    def __init__(self, buffer: Any) -> None:
        self.words: npt.NDArray[np.uint64] = np.frombuffer(buffer, np.uint64)
        assert len(self.words) == (SLOTS + 1) * WORDS, "v6_lengths has another size"
        # prefixes deleted since the last rebuild: bits that may be stale
        self.deleted = 0

    def add(self, addrs: npt.NDArray[np.uint8], lens: npt.NDArray[np.uint8]) -> None:
        """Set the bits of these prefixes' lengths (after their entries are written)."""
        if not len(lens):
            return
        at, bit = positions(addrs, lens)
        missing = (self.words[at] & bit) == 0
        if missing.any():
            np.bitwise_or.at(self.words, at[missing], bit[missing])

    def note_deleted(self, n: int) -> bool:
        """Count deleted prefixes; True when enough went for a rebuild."""
        self.deleted += n
        return self.deleted >= REBUILD_AFTER

    def rebuild(self, addrs: npt.NDArray[np.uint8], lens: npt.NDArray[np.uint8]) -> int:
        """Make every slot exactly the lengths of these prefixes (the whole table);
        returns how many words changed. A word only gains bits or loses stale
        ones, each with one 8-byte store."""
        exact = np.zeros_like(self.words)
        if len(lens):
            at, bit = positions(addrs, lens)
            np.bitwise_or.at(exact, at, bit)
        changed = np.flatnonzero(exact != self.words)
        self.words[changed] = exact[changed]
        self.deleted = 0
        return len(changed)


def memory_buffer() -> bytearray:
    """Private memory shaped like v6_lengths (``MemoryMaps(v6_hash=True)``)."""
    return bytearray((SLOTS + 1) * WORDS * 8)
