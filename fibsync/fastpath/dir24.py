"""The IPv4 DIR-24-8 table (DPDK rte_lpm style) that the XDP program reads
when ``fs_config.v4_table`` is ``FS_V4_DIR24``.

Four buffers, the BPF_F_MMAPABLE arrays ``v4_tbl24``, ``v4_tbl8``,
``v4_slots`` and ``v4_nh`` mapped into this process (or plain memory in
tests), hold the whole table; bpf/fibsync.h documents the entry format. This
module keeps no per-prefix state of its own: the depth (prefix length) of the
route an entry holds sits in the entry, and the route that takes over a
deleted prefix's addresses comes from ``cover``, a longest-prefix lookup in
the route list (the ``routes_v4`` LPM trie, which the writer fills in either
mode).

Readers run concurrently on other CPUs, so every change keeps the table
answerable at each instant:

- each entry changes with one aligned 4-byte store (a memoryview item, or
  numpy's element-wise masked/fancy assignment: never memcpy/memset, whose
  byte-wise tails could tear an entry);
- a slot's value is written before any entry names it and never changes while
  named, except the nexthop copy it names (a FORWARD slot to one nexthop
  names one of its two copies in ``v4_nh``: a nexthop change writes the other
  copy, then switches the slot's nh_id with one 4-byte store; a copy is
  rewritten only after a grace period since the slot's last switch, and a slot
  switched again sooner borrows the pair of a free slot number); a tbl8
  group is filled completely before the tbl24 entry that points to it is
  stored (x86-64 keeps stores in program order, and nothing here issues a
  fence: a weakly ordered CPU would need one; the reader's second read
  depends on the first, so it cannot run ahead);
- a slot or group that no entry names any more is retired, and handed out
  again only after an RCU grace period (``membarrier(MEMBARRIER_CMD_GLOBAL)``
  waits for every XDP program run that may still hold it);
- the initial load builds the new table in private memory, one range of
  tbl24 (1 MiB) at a time, and publishes it entry by entry, each entry going
  straight from its old answer to its new one, using groups and slots the
  old table does not use: a previous run's table (adopted maps, program
  attached) keeps answering until replaced.

A miss is always safe (the program asks ``bpf_fib_lookup``); a wrong answer
never is. When no tbl8 group is left for a /25../32 route, its /24 is
*pinned* to a slot that asks ``bpf_fib_lookup`` (the kernel answers for the
whole /24) and the route is reported as not written.

Longer than our ~500-line mark on purpose: the rules above hold only if every
writer of the four buffers keeps them, so the pools, the slots, the copies and
the entry writes stay in one module where one reader can check them together.
"""

from __future__ import annotations

import ctypes
import mmap
import platform
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from . import abi, bpfsys

EXT = abi.FS_DIR_EXT
INDEX = abi.FS_DIR_INDEX
SHIFT = abi.FS_DIR_DEPTH_SHIFT
DEPTH = abi.FS_DIR_DEPTH_MASK
PINNED = abi.FS_DIR_PINNED
TBL24 = abi.FS_DIR24_ENTRIES
TBL8 = abi.FS_TBL8_ENTRIES
NH_SIZE = abi.NEXTHOP.size
NH_STRIDE = abi.array_stride(NH_SIZE)
FIB_SLOT_VALUE = abi.ROUTE.pack(0, abi.FS_ACT_FIB, 0, 0, 0)

# A route value is struct fs_route's 8 bytes (plen ignored); cover(addr, depth)
# gives (prefix length, value) of the longest route covering addr that is
# shorter than depth, or None.
Cover = Callable[[int, int], "tuple[int, bytes] | None"]
# nexthop(id) gives struct fs_nexthop's bytes of a fast-path nexthop, or None
Nexthops = Callable[[int], "bytes | None"]
U32Array = npt.NDArray[np.uint32]

_CHUNK = 1 << 18  # tbl24 entries a load builds and publishes per step: bounds its memory
_SCALAR_SPAN = 16  # ranges up to this many entries are cheaper entry by entry than with numpy


def entry(depth: int, slot: int) -> int:
    return (depth << SHIFT) | slot


def depth_of(e: int) -> int:
    return (e >> SHIFT) & DEPTH  # 0 for an empty entry


# ---------------------------------------------------------------- grace periods

_MEMBARRIER = {"x86_64": 324, "aarch64": 283, "riscv64": 283, "ppc64le": 365, "s390x": 356,
               "armv7l": 389}
_MEMBARRIER_CMD_GLOBAL = 1
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def rcu_grace() -> None:
    """Return once every XDP program run that started before the call is over.

    MEMBARRIER_CMD_GLOBAL is synchronize_rcu(), and XDP programs run inside
    RCU read-side sections. Kernels booted with nohz_full refuse it: there a
    pause a thousand times longer than any program run has to do.
    """
    nr = _MEMBARRIER.get(platform.machine())
    if nr is not None and _libc.syscall(nr, _MEMBARRIER_CMD_GLOBAL, 0) == 0:
        return
    time.sleep(0.05)


class Pool:
    """Numbers 1..size-1 for slots or tbl8 groups (0 is never handed out).

    Never-used numbers go first; numbers retired since the last grace period
    come back only after one. Numbers a previous run's table uses are
    ``reserve``d: skipped until ``release_reserved`` retires them.
    """

    def __init__(self, size: int, grace: Callable[[], None]) -> None:
        self.size = size
        self.in_use = 0
        self.graces = 0
        self._grace = grace
        self._next = 1
        self._free: list[int] = []
        self._retired: list[int] = []
        self._skip: set[int] = set()  # never handed out fresh: reserved, or retired from there
        self._reserved: list[int] = []
        # retired numbers a grace period is running for, outside (``begin_reclaim``)
        self._reclaiming: list[int] = []

    def reserve(self, numbers: list[int]) -> None:
        self._reserved = numbers
        self._skip = set(numbers)

    def release_reserved(self) -> None:
        self._retired.extend(self._reserved)
        self._reserved = []

    def take(self, wait: bool = True) -> int | None:
        """A free number; None when there is none, or (``wait`` False) when only a
        grace period waited for here could free one."""
        n = self._take(wait)
        if n is not None:
            self.in_use += 1
        return n

    def _take(self, wait: bool) -> int | None:
        if self._free:
            return self._free.pop()
        while self._next < self.size:
            n = self._next
            self._next += 1
            if n not in self._skip:
                return n
        if wait and (self._retired or self._reclaiming):
            # the one wait on the write path; begin_reclaim/end_reclaim save it
            self._grace()
            self.graces += 1
            self._free, self._retired = self._retired + self._reclaiming, []
            self._reclaiming = []
            return self._free.pop()
        return None

    def retire(self, n: int) -> None:
        self.in_use -= 1
        self._retired.append(n)

    def begin_reclaim(self) -> list[int] | None:
        """Hand the retired numbers to a grace period that runs elsewhere (a thread):
        the token for ``end_reclaim``, or None when there is nothing to do."""
        if not self._retired or self._reclaiming:
            return None
        self._reclaiming, self._retired = self._retired, []
        return self._reclaiming

    def end_reclaim(self, token: list[int]) -> None:
        """A grace period that began after ``begin_reclaim`` has ended: its numbers
        are free (unless a take() waited for a grace itself and freed them already)."""
        if token is self._reclaiming:
            self._free.extend(token)
            self._reclaiming = []


@dataclass
class Dir24Stats:
    loads: int = 0
    adds: int = 0
    deletes: int = 0
    pinned: int = 0  # /24s handed to bpf_fib_lookup for want of a tbl8 group
    slot_gcs: int = 0
    copy_switches: int = 0  # slots switched to another copy of their nexthop
    copy_borrows: int = 0  # of those, into a borrowed pair (switched again within a grace)
    copy_waits: int = 0  # of those, after a grace period waited for here (no number free)


class Reclaim:
    """Retired slots and tbl8 groups made free again by a grace period that the
    daemon waits for in a thread, off the write path (~5 ms here: the time a
    single route change would otherwise wait once a pool has run out of
    never-used numbers)."""

    def __init__(self, pools: list[Pool], switches: Callable[[], None] | None = None) -> None:
        self._tokens = [(p, t) for p in pools if (t := p.begin_reclaim()) is not None]
        self._switches = switches  # nexthop copies switched before now: free after it

    def __bool__(self) -> bool:
        return bool(self._tokens) or self._switches is not None

    def done(self) -> None:
        """Call once a grace period that began after this object was made is over."""
        for pool, token in self._tokens:
            pool.end_reclaim(token)
        if self._switches is not None:
            self._switches()


class Dir24Table:
    """One DIR-24-8 table over its buffers (see the module docstring). Without
    ``nh`` and ``nexthop`` (where nexthop contents come from), slots name
    nexthops by id and the program looks them up in ``nexthops``."""

    def __init__(self, tbl24: Any, tbl8: Any, slots: Any, nh: Any = None, *, cover: Cover,
                 nexthop: Nexthops | None = None,
                 grace: Callable[[], None] = rcu_grace, adopt_aside: bool = False) -> None:
        self._t24: U32Array = np.frombuffer(tbl24, dtype=np.uint32)
        self._t8: U32Array = np.frombuffer(tbl8, dtype=np.uint32)
        if self._t24.size != TBL24 or self._t8.size % TBL8:
            raise ValueError(f"tbl24 of {self._t24.size} entries, tbl8 of {self._t8.size}")
        # memoryview items: the cheapest single 4-byte load and store from Python
        self._m24 = memoryview(tbl24).cast("B").cast("I")
        self._m8 = memoryview(tbl8).cast("B").cast("I")
        self._slots = memoryview(slots).cast("B")
        self._slot_words = self._slots.cast("I")  # word 2 * slot: the slot's nh_id
        self._cover = cover
        self._grace = grace
        self.groups = Pool(self._t8.size // TBL8, grace)
        self.slots = Pool(len(self._slots) // abi.ROUTE.size, grace)
        self._slot_of: dict[bytes, int] = {}
        self._value_of: dict[int, bytes] = {}
        # nexthop copies: the copy a slot names (its index in v4_nh: 2 * slot or
        # 2 * slot + 1, its own pair, or 2 * b of a number b it borrowed from the
        # pool), the number it borrowed, the slots of each nexthop, and the grace
        # epoch of each slot's last switch
        self._nh = memoryview(nh).cast("B") if nh is not None and nexthop is not None else None
        self._nexthop = nexthop
        self._copy: dict[int, int] = {}
        self._borrowed: dict[int, int] = {}
        self._slots_of_nh: dict[int, set[int]] = {}
        self._switched: dict[int, int] = {}
        self._epoch = 0  # switches made now belong to this epoch
        self._settled = -1  # a grace period has passed since every switch of epochs <= this
        self._switches_pending = False  # switches in this epoch, no grace period begun since
        self._held: set[int] = set()  # slots interned by the operation under way
        self.stats = Dir24Stats()
        # ``adopt_aside``: learn the buffers' table in a thread (~0.15 s over a full
        # table's, a restart's: the daemon dumps the kernel's tables meanwhile);
        # whatever takes or frees a group or slot waits for it first (``_adopted``)
        self._adopting: threading.Thread | None = None
        self._adopt_failure: BaseException | None = None
        if adopt_aside:
            self._adopting = threading.Thread(target=self._adopt_in_thread,
                                              name="dir24-adopt", daemon=True)
            self._adopting.start()
        else:
            self._adopt()

    # ------------------------------------------------------------ slots

    def _adopt(self) -> None:
        """Learn which groups and slots the table in the buffers uses (a previous
        run's, when the maps were adopted): they stay untouched until replaced."""
        groups, slots = self._referenced()
        self.groups.reserve(groups.tolist())
        # and the numbers whose copy pair a slot borrowed (``nexthops_changed``)
        named = slots.tolist()
        lent = {self._slot_words[2 * s] // 2 for s in named
                if self._slots[s * 8 + 5] & abi.FS_ROUTE_NH_COPY}
        self.slots.reserve(sorted(set(named) | lent))

    def _adopt_in_thread(self) -> None:
        try:
            self._adopt()
        except BaseException as exc:  # raised where the table is next used
            self._adopt_failure = exc

    def _adopted(self) -> None:
        if self._adopting is not None:
            self._adopting.join()
            self._adopting = None
            if self._adopt_failure is not None:
                raise self._adopt_failure

    def _referenced(self) -> tuple[U32Array, U32Array]:
        """(groups, slots) that entries of the table name, read a range at a time
        (the whole table's temporaries were ~100 MB at a restart's peak), each marked
        in an array of flags (np.unique's sorts took ~0.2 s of a restart, before
        its dump could start)."""
        groups = np.zeros(self.groups.size, bool)
        slots = np.zeros(self.slots.size, bool)
        for lo in range(0, TBL24, _CHUNK):
            part = self._t24[lo:lo + _CHUNK]
            part = part[part != 0]
            ext = (part & EXT) != 0
            _mark(groups, part[ext] & INDEX)
            _mark(slots, part[~ext] & INDEX)
        used = np.flatnonzero(groups).astype(np.uint32)
        t8, per = self._t8.reshape(-1, TBL8), _CHUNK // TBL8
        for i in range(0, used.size, per):
            part = t8[used[i:i + per]].ravel()
            _mark(slots, part[part != 0] & INDEX)
        return used, np.flatnonzero(slots).astype(np.uint32)

    def _slot(self, value: bytes) -> int | None:
        """The slot holding this route value, written now if it is new."""
        if value[7]:
            value = value[:7] + b"\0"  # plen: where the value came from, not what it says
        slot = self._slot_of.get(value)
        if slot is None:
            slot = self.slots.take()
            if slot is None:
                self._collect_slots()
                slot = self.slots.take()
                if slot is None:
                    return None
            self._slots[slot * 8:slot * 8 + 8] = self._with_copy(slot, value)
            self._slot_of[value] = slot
            self._value_of[slot] = value
        self._held.add(slot)
        return slot

    def _with_copy(self, slot: int, value: bytes) -> bytes:
        """What the slot stores: the value, or for a FORWARD route to one nexthop
        whose bytes are known, the value naming a fresh copy of that nexthop."""
        nh_id, action, flags, reason, _ = abi.ROUTE.unpack(value)
        if self._nh is None or action != abi.FS_ACT_FORWARD or flags & abi.FS_ROUTE_GROUP \
                or not self._has_pair(slot):
            return value
        assert self._nexthop is not None
        nhb = self._nexthop(nh_id)
        if nhb is None:
            return value
        self._nh[2 * slot * NH_STRIDE:2 * slot * NH_STRIDE + NH_SIZE] = nhb
        self._copy[slot] = 2 * slot
        self._slots_of_nh.setdefault(nh_id, set()).add(slot)
        return abi.ROUTE.pack(2 * slot, action, flags | abi.FS_ROUTE_NH_COPY, reason, 0)

    def begin_reclaim(self) -> Reclaim:
        """What a grace period starting now frees: retired groups and slots, and the
        other copy of every slot switched so far (``nexthops_changed``)."""
        self._adopted()
        switches = None
        if self._switches_pending:
            epoch = self._epoch
            self._epoch += 1
            self._switches_pending = False

            def switches() -> None:
                self._settled = max(self._settled, epoch)
        return Reclaim([self.groups, self.slots], switches)

    def nexthops_changed(self, changed: dict[int, bytes]) -> None:
        """Nexthops (id -> struct fs_nexthop bytes) got new contents: every slot
        naming a copy of one switches to another copy, written first.

        A copy a slot left is rewritten only once a grace period has passed since
        (a reader may still hold it). A slot switched again before one has passed
        since its last switch borrows the copy pair of a free slot number instead
        (the pool hands out only numbers no reader can hold), and gives it back when
        it switches away; only with no number free does it wait for a grace period
        here. The daemon runs grace periods off the write path (``begin_reclaim``).
        Contents equal to what the slot's copy holds (a re-announcement) switch
        nothing."""
        self._adopted()
        if self._nh is None:
            return
        for nh_id, nhb in changed.items():
            for slot in self._slots_of_nh.get(nh_id, ()):
                at = self._copy[slot] * NH_STRIDE
                if self._nh[at:at + NH_SIZE] == nhb:
                    continue
                self._switch(slot, nhb)

    def _switch(self, slot: int, nhb: bytes) -> None:
        now = self._copy[slot]
        lent = None
        if self._switched.get(slot, -1) > self._settled:
            # the copy it left last may still be read
            lent = self.slots.take(wait=False)
            if lent is not None and not self._has_pair(lent):
                self.slots.retire(lent)
                lent = None
            if lent is None:
                self.stats.copy_waits += 1
                self._grace()
                self._settled = self._epoch
                self._epoch += 1
        # with its last switch settled, its own pair is free but for the copy it names
        to = 2 * lent if lent is not None else 2 * slot + (now == 2 * slot)
        self._nh[to * NH_STRIDE:to * NH_STRIDE + NH_SIZE] = nhb
        self._slot_words[2 * slot] = to
        self._copy[slot] = to
        self._switched[slot] = self._epoch
        self._switches_pending = True
        self.stats.copy_switches += 1
        self.stats.copy_borrows += lent is not None
        self._give_back(slot)  # the pair it leaves, if borrowed
        if lent is not None:
            self._borrowed[slot] = lent

    def _has_pair(self, n: int) -> bool:
        """The copies' array holds a pair for number n (2 * n and 2 * n + 1)."""
        assert self._nh is not None
        return 2 * n + 1 < len(self._nh) // NH_STRIDE

    def _give_back(self, slot: int) -> None:
        """Retire the number whose pair the slot borrowed, if any: read until a grace
        period has passed, as any retired number."""
        lent = self._borrowed.pop(slot, None)
        if lent is not None:
            self.slots.retire(lent)

    def _collect_slots(self) -> None:
        """Retire the slots no entry names any more (values no route uses now).

        Values are interned, so a slot is needed exactly while an entry names
        it: a covering route whose entries are all shadowed gets a slot again
        (from ``cover``) when a delete uncovers it.
        """
        self.stats.slot_gcs += 1
        _, named = self._referenced()
        keep = set(named.tolist()) | self._held
        for value, slot in list(self._slot_of.items()):
            if slot not in keep:
                del self._slot_of[value]
                del self._value_of[slot]
                if self._copy.pop(slot, None) is not None:
                    self._slots_of_nh[abi.ROUTE.unpack(value)[0]].discard(slot)
                    self._switched.pop(slot, None)
                    self._give_back(slot)
                self.slots.retire(slot)

    # ------------------------------------------------------------ load

    def load(self, addrs: npt.NDArray[np.uint32], lens: npt.NDArray[np.uint8],
             ids: npt.NDArray[np.intp], values: Sequence[bytes],
             unread: bool = False) -> npt.NDArray[np.intp]:
        """Replace the whole table with these routes: route i is
        ``addrs[i]/lens[i]`` (host order) with value ``values[ids[i]]``.
        ``unread``: the arrays were created empty by this run and no program
        reads them yet, so the table is built in place; otherwise it is built
        in private memory a range of tbl24 at a time (1 MiB, not the whole
        64 MiB table, at a restart's peak) and published entry by entry.

        Returns the indexes of the routes that could not be placed (no slot,
        or no tbl8 group: their /24 is pinned to bpf_fib_lookup). Only a new
        table object loads: it knows which groups and slots the table it
        replaces uses, and nothing else yet.
        """
        self._adopted()
        if self.stats.loads or self.stats.adds or self.stats.deletes:
            raise RuntimeError("a Dir24Table loads once, before any change")
        self.stats.loads += 1
        lens = lens.astype(np.uint32)
        slot_of_value = np.array([self._slot(v) or 0 for v in values] or [0], dtype=np.uint32)
        entries = (lens << SHIFT) | slot_of_value[ids]
        placed = (entries & INDEX) != 0
        failed = [np.flatnonzero(~placed)]

        # One range of tbl24 at a time, shortest routes first: in place when no
        # program reads the arrays, else in private memory published entry by entry
        # (a range at a time: 1 MiB, not a whole 64 MiB table, at the peak). A
        # range's routes are found by their address's top bits (one byte a route:
        # an argsort of a full table's addresses was 12 MB more at a restart's
        # peak), except the few wider than a range, which are painted first.
        step = TBL24 if unread else _CHUNK
        private = None if unread else np.empty(_CHUNK, np.uint32)
        range_bits = TBL24.bit_length() - step.bit_length()  # log2 of the ranges
        wide_depth = range_bits  # a route this short covers a whole range
        bucket = (addrs >> np.uint32(32 - range_bits)).astype(np.uint8) if range_bits else None
        wide = np.flatnonzero(placed & (lens <= wide_depth))
        wide = wide[np.argsort(lens[wide], kind="stable")].tolist()
        for lo in range(0, TBL24, step):
            hi = lo + step
            new = self._t24[lo:hi] if private is None else private
            if private is not None:
                new.fill(0)
            for i in wide:
                span = 1 << (24 - int(lens[i]))
                if (int(addrs[i]) >> 8) & ~(span - 1) == lo & ~(span - 1):
                    new[:] = entries[i]
            rows = slice(None) if bucket is None else np.flatnonzero(bucket == lo // step)
            r_addrs, r_lens, r_entries = addrs[rows], lens[rows], entries[rows]
            r_placed = placed[rows]
            for depth in range(wide_depth + 1, 25):
                sel = np.flatnonzero(r_placed & (r_lens == depth))
                if not sel.size:
                    continue
                span = 1 << (24 - depth)
                at = ((r_addrs[sel] >> np.uint32(8)) - np.uint32(lo)) >> np.uint32(24 - depth)
                new.reshape(-1, span)[at] = r_entries[sel][:, None]
            longer = np.flatnonzero(r_placed & (r_lens > 24))
            if longer.size:
                longer = longer if bucket is None else rows[longer]
                failed.append(self._load_groups(new, (addrs[longer] >> np.uint32(8)) - lo,
                                                addrs, lens, entries, longer))
            if private is not None:
                self._publish(new, lo)
        self.groups.release_reserved()
        self.slots.release_reserved()
        self._held.clear()
        return np.sort(np.concatenate(failed))

    def _load_groups(self, new: U32Array, rows: npt.NDArray[np.uint32],
                     addrs: npt.NDArray[np.uint32], lens: npt.NDArray[np.uint32],
                     entries: U32Array, longer: npt.NDArray[np.intp]) -> npt.NDArray[np.intp]:
        """Build the tbl8 groups of the /25../32 routes ``longer`` (in ``new``'s
        entries ``rows``) and point ``new`` at them; returns the routes left out."""
        uniq, which = np.unique(rows, return_inverse=True)
        gids = []
        for _ in range(uniq.size):
            g = self.groups.take()
            if g is None:
                break
            gids.append(g)
        have = len(gids)
        grp = np.repeat(new[uniq[:have]][:, None], TBL8, axis=1)
        ok = which < have
        for depth in range(25, 33):
            sel = np.flatnonzero(ok & (lens[longer] == depth))
            if not sel.size:
                continue
            span = 1 << (32 - depth)
            cols = (addrs[longer[sel]] & np.uint32(0xFF)) >> np.uint32(32 - depth)
            grp.reshape(have, -1, span)[which[sel], cols] = entries[longer[sel]][:, None]
        if have:
            # groups no entry names yet: any copy will do
            self._t8.reshape(-1, TBL8)[np.array(gids)] = grp
            new[uniq[:have]] = np.uint32(EXT) | np.array(gids, dtype=np.uint32)
        if have < uniq.size:
            fib = self._slot(FIB_SLOT_VALUE) or 0
            new[uniq[have:]] = entry(PINNED, fib)
            self.stats.pinned += uniq.size - have
        return longer[~ok]

    def _publish(self, new: U32Array, lo: int) -> None:
        """Make the live tbl24 from entry ``lo`` on equal to ``new``, changed entries
        only, one 4-byte store each (fancy assignment copies element by element)."""
        cur = self._t24[lo:lo + new.size]
        diff = np.flatnonzero(cur != new)
        if diff.size:
            cur[diff] = new[diff]

    # ------------------------------------------------------------ changes

    def add(self, routes: Sequence[tuple[int, int, bytes]]) -> list[int]:
        """Add or change routes (addr host order, prefix length, value), the
        longest first; returns the indexes of those that could not be placed."""
        self._adopted()
        failed: list[int] = []
        try:
            i = 0
            while i < len(routes):
                if routes[i][1] == 24:
                    # /24s, most of a table, go in at once
                    j = i
                    while j < len(routes) and routes[j][1] == 24:
                        j += 1
                    failed += [i + k for k in self._add24(routes[i:j])]
                    i = j
                    continue
                addr, depth, value = routes[i]
                slot = self._slot(value)
                if slot is None or not self._add(addr, depth, entry(depth, slot)):
                    failed.append(i)
                i += 1
            self.stats.adds += len(routes)
        finally:
            self._held.clear()
        return failed

    def _add24(self, routes: Sequence[tuple[int, int, bytes]]) -> list[int]:
        """Add /24 routes (one tbl24 entry each, all different); returns the
        indexes of those left out for want of a slot."""
        slot_of: dict[bytes, int] = {}
        slots = np.zeros(len(routes), np.uint32)
        for k, (_, _, value) in enumerate(routes):
            slot = slot_of.get(value)
            if slot is None:
                slot = slot_of[value] = self._slot(value) or 0
            slots[k] = slot
        rows = np.fromiter((a for a, _, _ in routes), np.uint32, len(routes)) >> np.uint32(8)
        entries = np.uint32(entry(24, 0)) | slots
        cur = self._t24[rows]
        plain = (cur & EXT) == 0
        ok = slots != 0
        # element-wise fancy assignment: one 4-byte store per entry
        write = ok & plain & (((cur >> SHIFT) & DEPTH) <= 24)
        self._t24[rows[write]] = entries[write]
        for k in np.flatnonzero(ok & ~plain).tolist():
            self._set8(int(cur[k]) & INDEX, 0, TBL8, 24, int(entries[k]))
        return np.flatnonzero(~ok).tolist()

    def delete(self, prefixes: Sequence[tuple[int, int]]) -> None:
        """Remove routes (addr host order, prefix length), after ``cover``
        stopped knowing them: their addresses go to the route that covers them
        now, or to bpf_fib_lookup."""
        self._adopted()
        try:
            for addr, depth in prefixes:
                got = self._cover(addr, depth) if depth else None
                rep = 0
                if got is not None:
                    slot = self._slot(got[1])
                    rep = entry(got[0], slot) if slot is not None else 0
                self._delete(addr, depth, rep)
                self.stats.deletes += 1
        finally:
            self._held.clear()

    def _add(self, addr: int, depth: int, new: int) -> bool:
        if depth <= 24:
            lo = addr >> 8
            span = 1 << (24 - depth)
            if span <= _SCALAR_SPAN:
                m24 = self._m24
                for i in range(lo, lo + span):
                    e = m24[i]
                    if e & EXT:
                        self._set8(e & INDEX, 0, TBL8, depth, new)
                    elif depth_of(e) <= depth:
                        m24[i] = new
                return True
            seg = self._t24[lo:lo + span]
            ext = (seg & EXT) != 0
            seg[~ext & (((seg >> SHIFT) & DEPTH) <= depth)] = new
            if ext.any():
                for g in np.unique(seg[ext] & INDEX).tolist():
                    self._set8(g, 0, TBL8, depth, new)
            return True
        row = addr >> 8
        off = addr & 0xFF
        span = 1 << (32 - depth)
        e = self._m24[row]
        if e & EXT:
            self._set8(e & INDEX, off, span, depth, new)
            return True
        if depth_of(e) == PINNED:
            return False
        g = self.groups.take()
        if g is None:
            fib = self._slot(FIB_SLOT_VALUE)
            if fib is not None:
                self._m24[row] = entry(PINNED, fib)
                self.stats.pinned += 1
            return False
        grp = self._t8[g * TBL8:(g + 1) * TBL8]
        grp[:] = e  # no entry names the group yet: any store will do
        grp[off:off + span] = new
        self._m24[row] = EXT | g
        return True

    def _set8(self, g: int, off: int, span: int, depth: int, new: int) -> None:
        base = g * TBL8 + off
        if span <= _SCALAR_SPAN:
            m8 = self._m8
            for i in range(base, base + span):
                if depth_of(m8[i]) <= depth:
                    m8[i] = new
            return
        seg = self._t8[base:base + span]
        seg[((seg >> SHIFT) & DEPTH) <= depth] = new

    def _delete(self, addr: int, depth: int, rep: int) -> None:
        if depth <= 24:
            lo = addr >> 8
            span = 1 << (24 - depth)
            if span <= _SCALAR_SPAN:
                m24 = self._m24
                for i in range(lo, lo + span):
                    e = m24[i]
                    if e & EXT:
                        self._clear8(e & INDEX, 0, TBL8, depth, rep)
                    elif e and depth_of(e) == depth:
                        m24[i] = rep
                return
            seg = self._t24[lo:lo + span]
            ext = (seg & EXT) != 0
            seg[~ext & (seg != 0) & (((seg >> SHIFT) & DEPTH) == depth)] = rep
            if ext.any():
                for g in np.unique(seg[ext] & INDEX).tolist():
                    self._clear8(g, 0, TBL8, depth, rep)
            return
        row = addr >> 8
        e = self._m24[row]
        if not e & EXT:
            return
        g = e & INDEX
        self._clear8(g, addr & 0xFF, 1 << (32 - depth), depth, rep)
        grp = self._t8[g * TBL8:(g + 1) * TBL8]
        first = int(grp[0])
        if depth_of(first) <= 24 and bool((grp == first).all()):
            # no /25../32 left: the /24 answers alone again
            self._m24[row] = first
            self.groups.retire(g)

    def _clear8(self, g: int, off: int, span: int, depth: int, rep: int) -> None:
        base = g * TBL8 + off
        if span <= _SCALAR_SPAN:
            m8 = self._m8
            for i in range(base, base + span):
                e = m8[i]
                if e and depth_of(e) == depth:
                    m8[i] = rep
            return
        seg = self._t8[base:base + span]
        seg[(seg != 0) & (((seg >> SHIFT) & DEPTH) == depth)] = rep

    # ------------------------------------------------------------ reading

    def lookup(self, addr: int) -> bytes | None:
        """The route value found for addr (host order), as the writer gave it
        (a slot naming a nexthop copy answers with the nexthop's id); None
        for a miss."""
        e = self._m24[addr >> 8]
        if e & EXT:
            e = self._m8[(e & INDEX) * TBL8 + (addr & 0xFF)]
        if not e:
            return None
        slot = e & INDEX
        return self._value_of.get(slot, bytes(self._slots[slot * 8:slot * 8 + 8]))

    def nexthop_copy(self, addr: int) -> bytes | None:
        """The nexthop copy the program reads for addr, if its slot names one."""
        e = self._m24[addr >> 8]
        if e & EXT:
            e = self._m8[(e & INDEX) * TBL8 + (addr & 0xFF)]
        slot = e & INDEX
        if not e or self._nh is None or slot not in self._copy:
            return None
        at = self._slot_words[2 * slot] * NH_STRIDE
        return bytes(self._nh[at:at + NH_SIZE])

    def memory(self) -> dict[str, int]:
        """Bytes of each table, and how many groups and slots are in use."""
        self._adopted()
        return {"tbl24_bytes": self._t24.nbytes, "tbl8_bytes": self._t8.nbytes,
                "slots_bytes": len(self._slots),
                "nexthop_copies_bytes": len(self._nh) if self._nh is not None else 0,
                "groups_in_use": self.groups.in_use, "slots_in_use": self.slots.in_use}


# ---------------------------------------------------------------- backing memory


def map_buffer(fd: int) -> mmap.mmap:
    """A BPF_F_MMAPABLE array's values, mapped shared and writable."""
    info = bpfsys.map_info(fd)
    size = info.max_entries * ((info.value_size + 7) & ~7)
    return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)


def memory_buffers(tbl8_groups: int = abi.FS_MAX_TBL8_GROUPS,
                   slots: int = abi.FS_MAX_SLOTS) -> tuple[mmap.mmap, ...]:
    """Private zeroed memory shaped like the four maps (tbl24, tbl8, slots,
    nexthop copies; pages are only allocated when written), for tests and the
    in-memory map set."""
    return (mmap.mmap(-1, TBL24 * 4), mmap.mmap(-1, tbl8_groups * TBL8 * 4),
            mmap.mmap(-1, slots * abi.ROUTE.size), mmap.mmap(-1, 2 * slots * NH_STRIDE))


def _mark(seen: npt.NDArray[np.bool_], index: U32Array) -> None:
    """Flag each index below seen's size (a larger one names nothing this table has)."""
    seen[index[index < seen.size]] = True
