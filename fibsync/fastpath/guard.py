"""FullMapGuard: the write policy for a full route map.

It sits between the RIB's diffs and the writer: when a route map has no room
for a prefix, no written less-specific prefix may catch that prefix's traffic.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from typing import Any

from ..model import Prefix
from ..rib import Action, FastPathDiff, FpRoute, Rib
from .writer import MapWriter


class FullMapGuard:
    """Keeps the fast path right when a route map is full.

    A prefix the writer could not store (``MapWriter.unwritten``) is absent
    from its LPM trie, so a written less-specific prefix would catch its
    traffic and send it the wrong way. Every written prefix that covers an
    unwritten one is therefore stored as ``FIB`` instead of its own entry
    (the program asks ``bpf_fib_lookup``, which knows the kernel's whole
    table): those destinations leave the fast path for the kernel's FIB, none
    is misrouted. Rewriting an existing key needs no room, so this works on a
    full map. When room comes back (routes deleted, the start-up sweep), the
    unwritten prefixes are tried again and demoted prefixes get their own
    entries back once nothing below them is missing.
    """

    def __init__(self, rib: Rib, writer: MapWriter, log: Any) -> None:
        self.rib = rib
        self.writer = writer
        self.log = log
        self.demoted: set[Prefix] = set()
        self.episodes = 0  # times a route map ran out of room
        self._index: dict[int, list[tuple[int, int]]] = {}
        self._indexed: frozenset[Prefix] = frozenset()

    def write(self, diff: FastPathDiff) -> None:
        before = frozenset(self.writer.unwritten)
        if before:
            diff.expand()  # the shield looks at every route entry
            self._shield(diff)
        self.writer.write(diff)
        if before or self.writer.unwritten:
            if self.writer.unwritten and any(e is None for e in diff.routes.values()):
                self.retry(settle=False)
            self._settle(before)

    def retry(self, settle: bool = True) -> None:
        """Try the unwritten prefixes again (after deletions made room)."""
        before = frozenset(self.writer.unwritten)
        if not before:
            return
        self._reindex()
        entries = self.rib.entries
        diff = FastPathDiff(routes={p: entries[p] for p in before if p in entries})
        self._shield(diff)
        self.writer.write(diff)
        self.writer.unwritten.difference_update(p for p in before if p not in entries)
        if settle:
            self._settle(before)

    def _shield(self, diff: FastPathDiff) -> None:
        """Turn entries of this diff that cover an unwritten prefix into FIB."""
        self._reindex()
        for prefix, entry in diff.routes.items():
            if entry is None or not self._covers_unwritten(prefix):
                self.demoted.discard(prefix)
            elif entry.action != Action.FIB:
                diff.routes[prefix] = FpRoute(Action.FIB)
                self.demoted.add(prefix)

    def _settle(self, before: frozenset[Prefix]) -> None:
        after = frozenset(self.writer.unwritten)
        self._reindex()
        entries = self.rib.entries
        demote: dict[Prefix, FpRoute | None] = {}
        for prefix in after - before:
            for up in _covering(prefix):
                if up in entries and up not in after and up not in self.demoted:
                    if entries[up].action != Action.FIB:
                        demote[up] = FpRoute(Action.FIB)
                    self.demoted.add(up)
        restore: dict[Prefix, FpRoute | None] = {}
        if after:
            candidates = {up for p in before - after for up in _covering(p)} & self.demoted
        else:
            candidates = set(self.demoted)
        for up in candidates:
            if not self._covers_unwritten(up):
                self.demoted.discard(up)
                if up in entries:
                    restore[up] = entries[up]
        if demote or restore:
            self.writer.write(FastPathDiff(routes={**demote, **restore}))
        if after and not before:
            self.episodes += 1
            self.log.warning("map.full", unwritten=len(after), demoted=len(self.demoted),
                             error=self.writer.stats.last_error,
                             note="covering prefixes now use bpf_fib_lookup; raise the "
                                  "maps.* capacity and restart")
        elif before and not after:
            self.log.info("map.recovered", restored=len(restore))

    def _reindex(self) -> None:
        unwritten = frozenset(self.writer.unwritten)
        if unwritten == self._indexed:
            return
        index: dict[int, list[tuple[int, int]]] = {}
        for p in unwritten:
            index.setdefault(p.family, []).append((int.from_bytes(p.addr, "big"), p.length))
        for entries in index.values():
            entries.sort()
        self._index = index
        self._indexed = unwritten

    def _covers_unwritten(self, prefix: Prefix) -> bool:
        """Whether a more-specific prefix inside ``prefix`` is unwritten."""
        entries = self._index.get(prefix.family)
        if not entries:
            return False
        bits = len(prefix.addr) * 8
        start = int.from_bytes(prefix.addr, "big")
        end = start + (1 << (bits - prefix.length)) - 1
        # entries that start where prefix starts and are not longer sort before this
        i = bisect.bisect_left(entries, (start, prefix.length + 1))
        return i < len(entries) and entries[i][0] <= end


def _covering(prefix: Prefix) -> Iterator[Prefix]:
    """Every shorter prefix that contains ``prefix``, longest first."""
    bits = len(prefix.addr) * 8
    addr = int.from_bytes(prefix.addr, "big")
    for length in range(prefix.length - 1, -1, -1):
        shift = bits - length
        masked = addr >> shift << shift if length else 0
        yield Prefix(prefix.family, masked.to_bytes(bits // 8, "big"), length)
