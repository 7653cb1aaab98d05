"""`local_v4`: which IPv4 sources may be this host's, as a bitmap the program reads first.

A forwarded packet whose source is an address of this host is a martian
(ip_route_input_slow), and the program finds out by looking the source up in
the route table: a PASS_LOCAL entry (a route of type local, broadcast or
anycast) means the kernel decides. That lookup is a walk through the 64 MiB
DIR-24-8 table (or the trie) for every packet, a cache miss for each new
source; without rp_filter nothing else needs it.

The bitmap answers first. Bit ``bit(a)`` (a hash of the /24 that holds ``a``)
is set while some PASS_LOCAL IPv4 prefix overlaps that /24, so a clear bit
proves the source is not ours and the walk is skipped; a set bit (ours, or a
neighbour in the hash) sends the packet through the walk as before. The
bitmap may only ever say "maybe" too often, never too rarely: the writer sets
a new prefix's bits before it writes the route and clears bits only after
the routes are gone.

Prefixes inside 0/8 and 127/8 set no bit (the program hands those sources to
the kernel before it asks: martians), and a local prefix shorter than /8
sets them all. bpf/fibsync.h has the layout (FS_LOCAL_V4_*).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from ..model import Prefix
from . import abi

_MARTIAN_FIRST_OCTETS = (0, 127)
ALL = np.uint64(0xFFFFFFFFFFFFFFFF)  # a word of every bit


def bits(addr: bytes, length: int) -> np.ndarray | None:  # type: ignore[type-arg]
    """The bits of prefix addr/length (network order); None: every bit."""
    if length < 8:
        return None
    if addr[0] in _MARTIAN_FIRST_OCTETS:
        return np.zeros(0, np.uint32)
    first = int.from_bytes(addr, "big") >> 8
    count = 1 << max(0, 24 - length)
    first &= ~(count - 1)
    slash24 = np.arange(first, first + count, dtype=np.uint64)
    return abi.fibonacci_hash(slash24, abi.FS_LOCAL_V4_HASH, abi.FS_LOCAL_V4_BITS)


def _split(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[type-arg]
    """Bits -> (the words that hold them, each bit's mask in its word)."""
    return (b >> 6).astype(np.intp), np.left_shift(np.uint64(1), (b & 63).astype(np.uint64))


def bitmap(prefixes: Iterable[Prefix]) -> np.ndarray:  # type: ignore[type-arg]
    """The map's words (uint64) for these PASS_LOCAL IPv4 prefixes."""
    words = np.zeros(abi.FS_LOCAL_V4_WORDS, np.uint64)
    for p in prefixes:
        b = bits(p.addr, p.length)
        if b is None:
            words[:] = ALL
            break
        np.bitwise_or.at(words, *_split(b))
    return words


def marked(words: np.ndarray, addr: bytes, length: int) -> bool:  # type: ignore[type-arg]
    """Whether ``words`` (the map's) hold every bit of prefix addr/length."""
    b = bits(addr, length)
    if b is None:
        return bool((words == ALL).all())
    index, mask = _split(b)
    return bool(((words[index] & mask) != 0).all())


class LocalV4:
    """The PASS_LOCAL IPv4 prefixes the writer has written, and the bitmap's
    words as last written. ``stage`` takes a write's changes and returns the
    words to write before its routes (bits gained); ``commit`` those to write
    after its deletes (bits lost). The first write writes every word: an
    adopted map holds the previous run's bitmap."""

    def __init__(self) -> None:
        self.prefixes: set[Prefix] = set()
        self._written: np.ndarray | None = None  # type: ignore[type-arg]
        self._target: np.ndarray | None = None  # type: ignore[type-arg]

    def stage(self, local: Iterable[Prefix], other: Iterable[Prefix]
              ) -> list[tuple[bytes, bytes]]:
        """``local``: prefixes written now with a PASS_LOCAL entry; ``other``:
        prefixes written with another entry or deleted."""
        local = list(local)
        added = [p for p in local if p not in self.prefixes]
        removed = [p for p in other if p in self.prefixes]
        self.prefixes.update(added)
        self.prefixes.difference_update(removed)
        if self._written is not None and not added and not removed:
            # written again (a repair rewrites its prefixes): its words too
            self._target = None
            again = [b for p in local if (b := bits(p.addr, p.length)) is not None]
            words = np.unique(_split(np.concatenate(again))[0]) if again else []
            return _items(self._written, np.asarray(words, np.intp))
        target = bitmap(self.prefixes)
        self._target = target
        if self._written is None:
            self._written = target
            return _items(target, np.arange(len(target)))
        grown = self._written | target
        items = _items(grown, np.flatnonzero(grown != self._written))
        self._written = grown
        return items

    def commit(self) -> list[tuple[bytes, bytes]]:
        target, self._target = self._target, None
        if target is None or self._written is None:
            return []
        items = _items(target, np.flatnonzero(target != self._written))
        self._written = target
        return items


def _items(words: np.ndarray, index: np.ndarray) -> list[tuple[bytes, bytes]]:  # type: ignore[type-arg]
    return [(abi.U32.pack(int(i)), abi.U64.pack(int(words[i]))) for i in index.tolist()]
