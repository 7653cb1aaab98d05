"""A fresh IPv4 route trie filled while the kernel's routes are still dumped.

At a full table the first write's slowest part is the kernel inserting a
million prefixes into the ``routes_v4`` LPM trie (~0.9 µs each), and it used
to wait for the whole dump and the RIB's resync. The dump hands its route
columns over a part at a time (``netlink/columns.py``, ~55k routes each); a
``Prefill`` writes each part's likely rows (the RIB's guess: its compact
rows, with their objects' entries) into the trie from a thread of its own,
beside the dump (the bpf() calls release the GIL).

Nothing here decides what the map holds. The resync's first write brings the
RIB's answer, and ``reconcile`` returns what the map still needs for it: the
rows not written ahead or written with another value, and the keys written
ahead that the answer does not have (deleted first). After that write the
map holds exactly what it would have held without the prefill. A key whose
write may or may not have happened (a batch that failed part way, a thread
stopped by an error) counts as written with an unknown value: rewritten if
the answer has it, deleted if not.

Only a map this run created empty (``MapWriter.fresh``) is filled ahead: no
program reads it before the first write is complete.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ..errors import MapFullError
from ..model import RouteColumns
from ..rib.types import RouteRows

# the rows of a part of the dump, as the RIB expects them to end up
RowsOf = Callable[[RouteColumns], RouteRows]
# writes route records laid end to end (keys, values) into the map: the writer's
Put = Callable[[np.ndarray[Any, Any], np.ndarray[Any, Any]], None]


class Encoded(Protocol):
    """What the writer encodes rows into (its ``RouteBatch``): keys and values as
    the map takes them (8 bytes each for IPv4), in the order they are written."""

    keys: np.ndarray[Any, Any]
    vals: np.ndarray[Any, Any]


# a value no written record has (its last byte, the prefix length, is at most 32):
# what a write that may not have happened is recorded with
UNSURE = np.uint64(0xFFFFFFFFFFFFFFFF)
# final rows compared at a time (bounds the temporaries at the first write's peak)
_CHUNK = 1 << 16


def order_keys(keys: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """IPv4 route keys (struct fs_v4_key: prefix length, address) as integers in the
    order the first write takes them (``RouteBatch`` by address): by address, then
    longest first — address << 8 | (255 - length). The kernel dumps a table in
    that order too, so a prefill's records come sorted."""
    words = keys.view(">u8")
    ordered = words & np.uint64(0xFFFFFFFF)
    ordered <<= np.uint64(8)
    ordered |= np.uint64(0xFF) - (words >> np.uint64(56))
    return ordered


def route_keys(ordered: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """``order_keys`` back to the map's keys, laid end to end."""
    words = (np.uint64(0xFF) - (ordered & np.uint64(0xFF))) << np.uint64(56)
    words |= ordered >> np.uint64(8)
    return words.astype(">u8").view(np.uint8)


def _increasing(keys: np.ndarray[Any, Any]) -> bool:
    return bool(np.all(keys[1:] > keys[:-1]))


@dataclass
class Reconciled:
    """What the first write's batch needs once routes were written ahead: positions
    in the batch (its order) of the rows the map ``held`` with their value, those
    it holds with another value (or may: a write that may have failed) to
    ``replace``, and those to ``insert``; and the keys it holds that the batch
    does not have (``gone``, laid end to end: deleted first). Replacing needs no
    room in a full map, inserting does."""

    held: np.ndarray[Any, Any]
    replace: np.ndarray[Any, Any]
    insert: np.ndarray[Any, Any]
    gone: np.ndarray[Any, Any]


class Prefill:
    """Fills the fresh map ``name`` (IPv4 routes) ahead of the first write.

    ``put`` queues a part of the dump (from the dump's thread); a thread of its
    own turns each into rows (``rows_of``), encodes them (``encode``) and writes
    them ``batch`` at a time (``write``, the writer's). ``reconcile`` (the first
    write) stops the thread and says what is left to do.
    """

    def __init__(self, write: Put, batch: int, encode: Callable[[RouteRows], Encoded]) -> None:
        self.write = write
        self.batch = batch
        self.encode = encode
        self.routes = 0  # rows written ahead (confirmed)
        self.error: BaseException | None = None  # what stopped it, if anything did
        self._parts: queue.Queue[tuple[RouteColumns, RowsOf] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        # what went into the map, in write order: keys (order_keys) and values (the
        # records' 8 bytes as an integer; UNSURE where the write may have failed)
        self._keys: list[np.ndarray[Any, Any]] = []
        self._vals: list[np.ndarray[Any, Any]] = []

    def restart(self) -> None:
        """A new dump begins: parts of the one before that are still queued are
        dropped (what was written of them stays recorded)."""
        while True:
            try:
                self._parts.get_nowait()
            except queue.Empty:
                return

    def put(self, part: RouteColumns, rows_of: RowsOf) -> None:
        if self.error is not None:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="prefill", daemon=True)
            self._thread.start()
        self._parts.put((part, rows_of))

    def _run(self) -> None:
        while (item := self._parts.get()) is not None:
            try:
                self._write(self.encode(item[1](item[0])))
            except BaseException as exc:  # noqa: BLE001 - the first write does it all then
                self.error = exc
                return

    def _write(self, batch: Encoded) -> None:
        keys, vals = batch.keys, batch.vals
        n = len(vals) // 8
        ordered = order_keys(keys)
        values = vals.view(np.uint64)
        for lo in range(0, n, self.batch):
            hi = min(lo + self.batch, n)
            # recorded before the write: a write that raises mid-way leaves keys the
            # reconciliation must not take for absent
            self._keys.append(ordered[lo:hi])
            written = np.full(hi - lo, UNSURE)
            self._vals.append(written)
            try:
                self.write(keys[lo * 8:hi * 8], vals[lo * 8:hi * 8])
            except MapFullError as e:
                written[:e.done] = values[lo:lo + e.done]
                self.routes += e.done
                raise
            written[:] = values[lo:hi]
            self.routes += hi - lo

    def _stop(self) -> None:
        if self._thread is not None:
            self._parts.put(None)
            self._thread.join()
            self._thread = None

    def reconcile(self, batch: Encoded) -> Reconciled:
        """The first write's whole batch against what was written ahead. Stops the
        thread; call once."""
        self._stop()
        final = order_keys(batch.keys)
        final_vals = batch.vals.view(np.uint64)
        if not self._keys:
            none = np.zeros(0, np.intp)
            return Reconciled(none, none, np.arange(len(final)), np.zeros(0, np.uint8))
        keys, self._keys = np.concatenate(self._keys), []
        vals, self._vals = np.concatenate(self._vals), []
        if not _increasing(keys):
            # parts of a lost dump, or a dump out of order: by key, each key's last
            # write (a stable sort keeps the writes' order among equal keys)
            by_key = np.argsort(keys, kind="stable")
            keys = keys[by_key]
            last = np.ones(len(keys), bool)
            last[:-1] = keys[1:] != keys[:-1]
            keys, vals = keys[last], vals[by_key[last]]
            del by_key, last
        if not _increasing(final):  # not a first write by address: compared in key order
            by_key = np.argsort(final, kind="stable")
            final, final_vals = final[by_key], final_vals[by_key]
        else:
            by_key = None
        held = np.zeros(len(final), bool)
        found = np.zeros(len(final), bool)
        for lo in range(0, len(final), _CHUNK):
            want = final[lo:lo + _CHUNK]
            at = np.minimum(np.searchsorted(keys, want), len(keys) - 1)
            found[lo:lo + _CHUNK] = keys[at] == want
            held[lo:lo + _CHUNK] = found[lo:lo + _CHUNK] & (vals[at] == final_vals[lo:lo + _CHUNK])
        gone = []
        for lo in range(0, len(keys) if len(final) else 0, _CHUNK):
            have = keys[lo:lo + _CHUNK]
            at = np.minimum(np.searchsorted(final, have), len(final) - 1)
            gone.append(have[final[at] != have])
        left = np.concatenate(gone) if len(final) else keys
        if by_key is not None:
            held, found = _unsorted(held, by_key), _unsorted(found, by_key)
        return Reconciled(np.flatnonzero(held), np.flatnonzero(found & ~held),
                          np.flatnonzero(~found), route_keys(left))


def _unsorted(mask: np.ndarray[Any, Any], order: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """A mask over sorted rows back in the rows' own order (``order`` sorted them)."""
    back = np.zeros(len(mask), bool)
    back[order] = mask
    return back
