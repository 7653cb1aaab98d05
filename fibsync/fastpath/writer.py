"""Diffs from the RIB -> map updates, batched and ordered.

The writer never decides anything: it encodes the ``FastPathDiff`` with
abi.py's layouts of bpf/fibsync.h and applies it in an order that never lets
the XDP program see a reference to something that is not there yet:

    nexthops set -> groups set -> routes set (longest prefixes first)
    -> routes deleted -> groups deleted -> nexthops deleted -> neighbours

IPv4 routes go to the LPM trie ``routes_v4`` in either IPv4 mode: it is the
prefix list ``fibsync routes`` shows, and the covering-route lookup the
DIR-24-8 table needs on a delete. With ``v4_table="dir24"`` the IPv4 routes
that made it into ``routes_v4`` also go to the DIR-24-8 table (``dir24.py``)
— all at once on the first write (the RIB's first diff is the whole table),
change by change afterwards. IPv6 routes go to one table: the hash
``v6_hash`` with its ``v6_lengths`` (``v6_table="hash"``, ``v6hash.py``) or
the LPM trie ``routes_v6``; the route map of a family (``route_map``) is the
one the program reads. Once the first write is complete the writer points
the program at its tables (``fs_config.v4_table``/``v6_table``).

Every map write goes through a ``MapSet``: the pinned BPF maps in the daemon,
``MemoryMaps`` in tests (the same idea as httpx's MockTransport).
"""

from __future__ import annotations

import concurrent.futures
import functools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np

from ..errors import MapError, MapFullError
from ..model import AF_INET, AF_INET6, Prefix, RouteColumns
from ..rib.types import Action, FastPathDiff, FpGroup, FpNexthop, FpRoute, RouteRows
from . import abi, bpfsys, dir24, v6hash
from .local import LocalV4
from .prefill import Prefill, RowsOf

ROUTE_MAPS = {AF_INET: "routes_v4", AF_INET6: "routes_v6"}
V6_TABLES = {abi.FS_V6_LPM: "routes_v6", abi.FS_V6_HASH: "v6_hash"}
DIR24_MAPS = ("v4_tbl24", "v4_tbl8", "v4_slots", "v4_nh")
V4Table = Literal["dir24", "lpm"]
V6Table = Literal["hash", "lpm"]
# routes per family above which both families' maps are written side by side
_PARALLEL_ROUTES = 20000
# routes in a batch up to which LocalV4's bookkeeping is done in Python, not numpy
_SMALL_BATCH = 64

class MapSet(Protocol):
    """Where the writer's bytes go: one named BPF map each."""

    def update(self, name: str, items: list[tuple[bytes, bytes]]) -> None: ...

    def delete(self, name: str, keys: list[bytes]) -> None: ...

    def items(self, name: str) -> Iterator[tuple[bytes, bytes]]: ...


@dataclass
class MemoryMaps:
    """An in-memory MapSet with the kernel's capacity rule (E2BIG when full).

    ``dir24=True`` adds private memory shaped like the DIR-24-8 arrays (pages
    are allocated only where written) and LPM lookups on ``routes_v4``;
    ``v6_hash=True`` memory shaped like ``v6_lengths``.
    """

    capacity: dict[str, int] = field(default_factory=dict)
    maps: dict[str, dict[bytes, bytes]] = field(default_factory=dict)
    dir24: bool = False
    tbl8_groups: int = 256
    slots: int = 1024
    buffers: dict[str, Any] = field(default_factory=dict)
    v6_hash: bool = False

    def __post_init__(self) -> None:
        if self.dir24 and not self.buffers:
            self.buffers = dict(zip(DIR24_MAPS, dir24.memory_buffers(self.tbl8_groups,
                                                                     self.slots), strict=True))
        if self.v6_hash and "v6_lengths" not in self.buffers:
            self.buffers["v6_lengths"] = v6hash.memory_buffer()

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

    def buffer(self, name: str) -> Any:
        """The memory behind an mmapable array (KeyError when there is none)."""
        return self.buffers[name]

    def match(self, name: str, key: bytes) -> bytes | None:
        """Longest-prefix match on an LPM map, as a lookup in the kernel's trie."""
        m = self.maps.get(name, {})
        plen, addr = abi.V4_KEY.unpack(key)
        n = int.from_bytes(addr, "big")
        for length in range(plen, -1, -1):
            masked = (n >> (32 - length) << (32 - length)) if length else 0
            value = m.get(abi.V4_KEY.pack(length, masked.to_bytes(4, "big")))
            if value is not None:
                return value
        return None


def _partial(name: str, done: int) -> MapFullError:
    err = MapFullError(f"{name}: map full after {done} entries")
    err.done = done
    return err


def route_key(prefix: Prefix) -> bytes:
    if prefix.family == AF_INET:
        return abi.V4_KEY.pack(prefix.length, prefix.addr)
    return abi.V6_KEY.pack(prefix.length, prefix.addr)


def encode_route(entry: FpRoute, plen: int = 0) -> bytes:
    """struct fs_route; ``plen`` is the prefix length of the key it is stored under."""
    reason = abi.Reason[entry.reason].value if entry.reason else 0
    return abi.ROUTE.pack(entry.nh_id, int(entry.action),
                          abi.FS_ROUTE_GROUP if entry.group else 0, reason, plen)


def encode_nexthop(nh: FpNexthop) -> bytes:
    flags = (abi.FS_NH_RESOLVED if nh.resolved else 0) | \
        (abi.FS_NH_CONNECTED if nh.connected else 0)
    return abi.NEXTHOP.pack(nh.ifindex, nh.mtu, flags, nh.family, nh.smac, nh.dmac, nh.gateway)


def encode_group(group: FpGroup) -> bytes:
    return abi.pack_group(group.buckets, group.members)


def neigh_key(key: tuple[int, int, bytes]) -> bytes:
    ifindex, family, addr = key
    return abi.NEIGH_KEY.pack(ifindex, family, addr)


@functools.cache
def _empty_batch(family: int) -> RouteBatch:
    """A batch of no route (read-only, like every RouteBatch once built)."""
    return RouteBatch(family, [])


class RouteBatch:
    """Routes of one family, encoded at once: keys and values as the LPM map
    takes them, in the order they are written in: longest prefixes first
    (a new less-specific never catches a new more-specific's traffic), by
    address within a length (the kernel's trie inserts neighbours ~3x faster
    than scattered prefixes: 1M IPv4 routes in 2.7 s against 9 s, measured).

    Built from the diff's routes one by one and from its ``RouteRows``
    (a resync's compact routes, already arrays). ``by_address`` orders by
    address alone, for a map no program reads yet: the trie takes a table in
    address order ~25% faster (1M IPv4 routes: 0.87 against 1.15 s).
    """

    def __init__(self, family: int, routes: list[tuple[Prefix, FpRoute]],
                 rows: Iterable[RouteRows] = (), by_address: bool = False) -> None:
        self.family = family
        alen = 4 if family == AF_INET else 16
        n = len(routes)
        # FpRoute's own __hash__ is Python code (its Action too): a tuple of its
        # fields hashes in C, 0.26 against 0.7 µs a route
        ids: dict[tuple[int, bool, str, Action], int] = {}
        id_parts = [np.fromiter((ids.setdefault((e.nh_id, e.group, e.reason, e.action), len(ids))
                                 for _, e in routes), np.int32, n)]
        len_parts = [np.fromiter((p.length for p, _ in routes), np.uint8, n)]
        addr_parts = [np.frombuffer(b"".join(p.addr for p, _ in routes),
                                    np.uint8).reshape(n, alen)]
        for r in rows:
            if not len(r):
                continue
            local = np.array([ids.setdefault((e.nh_id, e.group, e.reason, e.action), len(ids))
                              for e in r.entries], np.int32)
            id_parts.append(local[r.ids])
            len_parts.append(r.lens)
            addr_parts.append(r.addrs)
        self.ids = _joined(id_parts)
        self.lens = _joined(len_parts)
        self.addrs = np.ascontiguousarray(_joined(addr_parts))
        self.values = [encode_route(FpRoute(action, nh_id, group, reason))
                       for nh_id, group, reason, action in ids]
        words = self.addrs.view(">u8" if alen == 16 else ">u4")
        by_length = -self.lens.astype(np.int16)
        by_addr = [words[:, i] for i in range(words.shape[1] - 1, -1, -1)]
        # np.lexsort sorts by its last key first
        self.order = np.lexsort((by_length, *by_addr) if by_address else (*by_addr, by_length)
                                ).astype(np.int32)
        keys = np.zeros(len(self.lens), abi.route_key_dtype(alen))
        keys["plen"] = self.lens[self.order]
        keys["addr"] = self.addrs[self.order]
        table = np.frombuffer(b"".join(self.values), abi.ROUTE_DTYPE) if self.values \
            else np.zeros(0, abi.ROUTE_DTYPE)
        values = table[self.ids[self.order]]
        values["plen"] = self.lens[self.order]
        # the map's keys and values laid end to end, as the records' own bytes (a
        # copy as bytes was ~20 MB more at a full table's peak; a writable buffer
        # also goes to the kernel without the copy a read-only one needs)
        self.keys = keys.view(np.uint8)
        self.vals = values.view(np.uint8)
        self.key_size = keys.itemsize

    def __len__(self) -> int:
        return len(self.lens)

    def prefix(self, i: int) -> Prefix:
        return Prefix(self.family, self.addrs[i].tobytes(), int(self.lens[i]))

    def prefixes(self, rows: np.ndarray[Any, Any]) -> list[Prefix]:
        return [self.prefix(i) for i in rows.tolist()]

    def map_keys(self, positions: np.ndarray[Any, Any]) -> list[bytes]:
        """The map keys at these positions of the write order (indexes or a mask)."""
        return [k.tobytes() for k in self.keys.reshape(-1, self.key_size)[positions]]

    def local_changes(self, known: set[Prefix], deleted: list[Prefix]
                      ) -> tuple[list[Prefix], list[Prefix]]:
        """For LocalV4.stage: the prefixes this batch writes with a PASS_LOCAL
        entry, and those of ``known`` (the local ones) it writes with another
        entry or that are ``deleted``. Array work: a batch may be a whole table."""
        local = [i for i, v in enumerate(self.values)
                 if abi.ROUTE.unpack(v)[3] == abi.Reason.PASS_LOCAL.value]
        gone = [p for p in deleted if p in known]
        if len(self) <= _SMALL_BATCH:  # a change or a few: numpy's calls cost more (~40 µs)
            ours: list[Prefix] = []
            for i, entry_id in enumerate(self.ids.tolist()):
                p = self.prefix(i)
                if entry_id in local:
                    ours.append(p)
                elif p in known:
                    gone.append(p)
            return ours, gone
        is_local = np.isin(self.ids, local) if local else np.zeros(len(self), bool)
        if known:
            words = self.addrs.view(">u4").ravel().astype(np.uint64)
            keys = (words << np.uint64(8)) | self.lens.astype(np.uint64)
            known_keys = np.array([int.from_bytes(p.addr, "big") << 8 | p.length
                                   for p in known], np.uint64)
            gone += self.prefixes(np.flatnonzero(np.isin(keys, known_keys) & ~is_local))
        return self.prefixes(np.flatnonzero(is_local)), gone

    def host_addrs(self) -> np.ndarray[Any, np.dtype[np.uint32]]:
        """IPv4 addresses as host-order integers, in the batch's input order."""
        return self.addrs.view(">u4").ravel().astype(np.uint32)


@dataclass
class WriterStats:
    batches: int = 0
    entries: int = 0
    errors: int = 0
    full: int = 0
    last_error: str = ""
    ahead: int = 0  # IPv4 routes written while the first dump ran (prefill.py)


class MapWriter:
    """``v4_table``: "dir24" (the default where the map set has the DIR-24-8
    arrays) or "lpm"; ``v6_table``: "hash" (the default where the map set has
    ``v6_hash`` and ``v6_lengths``) or "lpm". The program reads whichever
    tables the writer completed."""

    def __init__(self, maps: MapSet, batch: int = 65536, v4_table: V4Table | None = None,
                 fresh: Iterable[str] = (), v6_table: V6Table | None = None) -> None:
        self.maps = maps
        # maps created empty by this run: no program reads them before the first
        # write is complete (the program is attached after it)
        self.fresh = frozenset(fresh)
        self.batch = batch
        self.stats = WriterStats()
        # prefixes the maps could not take: the fast path must not answer for them
        self.unwritten: set[Prefix] = set()
        self.dir24: dir24.Dir24Table | None = None
        buffers = _dir24_buffers(maps) if v4_table != "lpm" else None
        if v4_table == "dir24" and buffers is None:
            raise MapError("v4_table dir24: this map set has no DIR-24-8 arrays "
                           f"({', '.join(DIR24_MAPS)})")
        # struct fs_nexthop of every nexthop written, for the DIR-24-8 table's copies
        self._nexthops: dict[int, bytes] = {}
        if buffers is not None:
            # a previous run's table (adopted arrays) is learnt while the daemon dumps
            self.dir24 = dir24.Dir24Table(*buffers, cover=_v4_cover(maps),
                                          nexthop=self._nexthops.get,
                                          adopt_aside=not self.fresh.issuperset(DIR24_MAPS))
        self.v4_table: V4Table = "dir24" if self.dir24 is not None else "lpm"
        self.v6: v6hash.V6Lengths | None = None
        if v6_table != "lpm":
            lengths = map_buffer(maps, "v6_lengths") if _has(maps, "v6_hash") else None
            if lengths is None and v6_table == "hash":
                raise MapError("v6_table hash: this map set has no v6_hash and v6_lengths")
            self.v6 = v6hash.V6Lengths(lengths) if lengths is not None else None
        self.v6_table: V6Table = "hash" if self.v6 is not None else "lpm"
        # the map each family's routes go to: the one the program reads
        self.route_maps = {**ROUTE_MAPS, AF_INET6: V6_TABLES[abi.FS_V6_HASH if self.v6
                                                              else abi.FS_V6_LPM]}
        # the `local_v4` bitmap, where the map set has it
        self.local = LocalV4() if _has(maps, "local_v4") else None
        self._first = True
        # the fresh IPv4 route map filled while the routes are dumped, until the first write
        self._prefill: Prefill | None = None

    def prefill(self, rows_of: RowsOf) -> Callable[[RouteColumns], None] | None:
        """What takes the parts of a route dump as it is read, to fill a fresh IPv4
        route map ahead of the first write (``prefill.py``; ``rows_of`` is the
        RIB's guess at a part's rows). None when there is nothing to fill ahead:
        the first write is done, or the map is not this run's own, empty one."""
        name = self.route_maps[AF_INET]
        if not self._first or name not in self.fresh:
            return None
        if self._prefill is None:
            self._prefill = Prefill(
                functools.partial(_put_records, self.maps, name, _fd(self.maps, name)),
                self.batch, lambda rows: RouteBatch(AF_INET, [], [rows], by_address=True))
        ahead = self._prefill
        ahead.restart()  # a dump again (the one before was lost): its parts are stale

        def take(part: RouteColumns) -> None:
            if part.family == AF_INET:
                ahead.put(part, rows_of)

        return take

    @property
    def prefilled(self) -> bool:
        """Routes were written ahead: the first write must come, even with nothing in
        its diff (it deletes what the resync did not confirm)."""
        return self._prefill is not None and self._first

    def write(self, diff: FastPathDiff) -> None:
        encoded = {i: encode_nexthop(nh) for i, nh in diff.nexthops.items() if nh}
        self._update("nexthops", [(abi.U32.pack(i), v) for i, v in encoded.items()])
        if self.dir24 is not None:
            self._nexthops.update(encoded)
            self.dir24.nexthops_changed(encoded)
        grp_set = [(abi.U32.pack(i), encode_group(b)) for i, b in diff.groups.items() if b]
        self._update("groups", grp_set)

        adds: dict[int, list[tuple[Prefix, FpRoute]]] = {AF_INET: [], AF_INET6: []}
        dels: dict[int, list[Prefix]] = {AF_INET: [], AF_INET6: []}
        for p, e in diff.routes.items():
            if e is None:
                dels[p.family].append(p)
            else:
                adds[p.family].append((p, e))
        batches = {}
        for family, name in self.route_maps.items():
            rows = [r for r in diff.bulk if r.family == family and len(r)]
            # most batches of changes are of one family: the other's is the shared
            # empty one (a RouteBatch's numpy work is ~25 µs even for no route)
            batches[family] = RouteBatch(family, adds[family], rows,
                                         by_address=self._first and name in self.fresh) \
                if adds[family] or rows else _empty_batch(family)
        if self.local is not None:
            # bits gained before the routes that need them, bits lost after
            self._update("local_v4", self.local.stage(*batches[AF_INET].local_changes(
                self.local.prefixes, dels[AF_INET])))
        done = self._put_routes(batches)
        for family, name in self.route_maps.items():
            # taken out: a full table's IPv4 batch (~25 MB) goes before IPv6's lengths
            batch = batches.pop(family)
            written = self._routes_written(name, batch, done[family])
            self._delete(name, [route_key(p) for p in dels[family]])
            if self.unwritten:
                self.unwritten.difference_update(dels[family])
            if family == AF_INET and self.dir24 is not None:
                self._write_dir24(batch, written, dels[family])
            if family == AF_INET6 and self.v6 is not None:
                self._write_v6_lengths(batch, written, len(dels[family]))

        if self.local is not None:
            self._update("local_v4", self.local.commit())
        self._delete("groups", [abi.U32.pack(i) for i, b in diff.groups.items() if not b])
        gone = [i for i, nh in diff.nexthops.items() if not nh]
        self._delete("nexthops", [abi.U32.pack(i) for i in gone])
        for i in gone:
            self._nexthops.pop(i, None)
        self._update("neighbours", [(neigh_key(k), abi.NEIGH.pack(mac[:6], 0))
                                    for k, mac in diff.neighbours.items() if mac])
        self._delete("neighbours", [neigh_key(k) for k, mac in diff.neighbours.items()
                                    if not mac])
        if self._first:
            # the tables the program reads are complete only now
            self._first = False
            self._select_tables()

    def sweep(self, holds_prefix: Callable[[int, bytes, int], bool], nexthops: Iterable[int],
              groups: Iterable[int], neighbours: Iterable[tuple[int, int, bytes]]) -> int:
        """Delete every map entry not to be kept (a previous run's leftovers).

        What to keep: ``holds_prefix(family, addr, length)`` answers for the
        route maps, key by key (a set of a full table's keys would be ~1.25M
        objects more: 2.6 s against ~1 s, measured); the nexthop ids, group
        ids and neighbour keys (ifindex, family, address) are given whole.
        Routes go first, then what they pointed to, so nothing dangles. The
        DIR-24-8 table needs no sweep: its first write replaced it whole, and
        neither do the ``fresh`` maps (created empty by this run).
        """
        v4, v6, u32 = abi.V4_KEY.unpack, abi.V6_KEY.unpack, abi.U32.pack

        def keep_v4(key: bytes) -> bool:
            plen, addr = v4(key)
            return holds_prefix(AF_INET, addr, plen)

        def keep_v6(key: bytes) -> bool:
            plen, addr = v6(key)
            return holds_prefix(AF_INET6, addr, plen)

        want: dict[str, Callable[[], Callable[[bytes], bool]]] = {
            "routes_v4": lambda: keep_v4,
            self.route_maps[AF_INET6]: lambda: keep_v6,
            "groups": lambda: {u32(i) for i in groups}.__contains__,
            "nexthops": lambda: {u32(i) for i in nexthops}.__contains__,
            "neighbours": lambda: {neigh_key(k) for k in neighbours}.__contains__,
        }
        swept = 0
        for name, wanted in want.items():
            if name in self.fresh:
                continue
            keep = wanted()
            stale = [k for k, _ in self.maps.items(name) if not keep(k)]
            self._delete(name, stale)
            swept += len(stale)
        return swept

    def _put_routes(self, batches: dict[int, RouteBatch]) -> dict[int, np.ndarray[Any, Any]]:
        """Write each family's batch, longest prefixes first; returns the positions
        (in each batch's order) of the routes the map holds now: all, unless a map
        is full or fails.

        The kernel's LPM trie takes ~1.3 µs an insert; with a big batch for
        each family the two maps are written side by side, IPv6 in a thread
        (the bpf() calls release the GIL, and each trie has its own lock).
        """
        names = self.route_maps
        ahead, self._prefill = self._prefill, None

        def put(family: int) -> tuple[np.ndarray[Any, Any], int, MapError | None]:
            if family == AF_INET and ahead is not None:
                return self._put_rest(names[family], batches[family], ahead)
            return self._put_batch(names[family], batches[family])

        if min(len(b) for b in batches.values()) >= _PARALLEL_ROUTES and \
                _fd(self.maps, names[AF_INET6]) is not None:
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                v6 = pool.submit(put, AF_INET6)
                results = {AF_INET: put(AF_INET), AF_INET6: v6.result()}
        else:
            results = {f: put(f) for f in batches}
        done = {}
        for family, (written, calls, error) in results.items():
            self.stats.batches += calls
            self.stats.entries += len(written)
            if error is not None:
                self._error(error, full=isinstance(error, MapFullError))
            done[family] = written
        return done

    def _put_rest(self, name: str, batch: RouteBatch, ahead: Prefill
                  ) -> tuple[np.ndarray[Any, Any], int, MapError | None]:
        """The first write's IPv4 batch into a map filled ahead: the keys the batch
        does not have deleted first, then the rows held with another value (no room
        needed), then the rows not there. A row held with another value that could
        not be written is deleted: what the writer notes as unwritten is absent."""
        todo = ahead.reconcile(batch)
        self.stats.ahead = ahead.routes
        ks = batch.key_size
        self._delete(name, [todo.gone[i:i + ks].tobytes() for i in range(0, len(todo.gone), ks)])
        rows = np.concatenate([todo.replace, todo.insert])
        written, calls, error = self._put_batch(name, batch, rows)
        if error is not None:
            # those written came first
            self._delete(name, batch.map_keys(todo.replace[len(written):]))
        return np.concatenate([todo.held, written]), calls, error

    def _put_batch(self, name: str, batch: RouteBatch, rows: np.ndarray[Any, Any] | None = None
                   ) -> tuple[np.ndarray[Any, Any], int, MapError | None]:
        """Write the batch's routes (those at ``rows``, positions in its order: all by
        default). Returns (the positions written, bpf calls, the error that stopped
        it); no bookkeeping here: this may run in a thread."""
        ks = batch.key_size
        keys, vals = batch.keys, batch.vals
        if rows is not None:
            keys = keys.reshape(-1, ks)[rows].ravel()
            vals = vals.reshape(-1, 8)[rows].ravel()
        n = len(vals) // 8
        done = calls = 0
        fd = _fd(self.maps, name)
        error: MapError | None = None
        for lo in range(0, n, self.batch):
            hi = min(lo + self.batch, n)
            try:
                _put_records(self.maps, name, fd, keys[lo * ks:hi * ks], vals[lo * 8:hi * 8])
            except MapFullError as e:
                done, error = done + e.done, e
                break
            except MapError as e:
                error = e
                break
            done += hi - lo
            calls += 1
        return (np.arange(done) if rows is None else rows[:done]), calls, error

    def _routes_written(self, name: str, batch: RouteBatch, written: np.ndarray[Any, Any]
                        ) -> np.ndarray[Any, Any]:
        """Note which routes of a batch the map did not take (``written``: positions
        of those it did); returns the indexes of those it did, longest first.

        A route not taken is deleted from the map: one it held already keeps its
        old value when the batch stops before it (a full map stops a batch at its
        first new key, and replacing needs no room), and the guard counts on
        an unwritten prefix being absent. Not needed on the first write into a map
        this run created: what it holds is what the write put there
        (``_put_rest`` deletes its own)."""
        if len(written) == len(batch):
            rows = batch.order
            left = batch.order[:0]
        else:
            written = np.sort(written)
            rows = batch.order[written]
            missed = np.ones(len(batch), bool)
            missed[written] = False
            left = batch.order[missed]
            if not (self._first and name in self.fresh):
                self._delete(name, batch.map_keys(missed))
        if self.unwritten:
            self.unwritten.difference_update(batch.prefixes(rows))
        self.unwritten.update(batch.prefixes(left))
        return rows

    def _write_dir24(self, batch: RouteBatch, written: np.ndarray[Any, Any],
                     dels: list[Prefix]) -> None:
        table = self.dir24
        assert table is not None
        if self._first:
            unread = self.fresh.issuperset(DIR24_MAPS)
            if len(written) == len(batch):  # all of it (a copy of each column less)
                failed = table.load(batch.host_addrs(), batch.lens, batch.ids, batch.values,
                                    unread=unread)
            else:
                written = np.sort(written)
                failed = written[table.load(batch.host_addrs()[written], batch.lens[written],
                                            batch.ids[written], batch.values, unread=unread)]
            failed_prefixes = batch.prefixes(failed)
        else:
            order = written.tolist()  # longest first, as routes_v4 got them
            addrs = batch.host_addrs()[written].tolist()
            values, ids, lens = batch.values, batch.ids[written].tolist(), batch.lens.tolist()
            routes = [(a, lens[i], values[v]) for a, i, v in zip(addrs, order, ids, strict=True)]
            failed_prefixes = [batch.prefix(order[i]) for i in table.add(routes)]
            table.delete([(int.from_bytes(p.addr, "big"), p.length) for p in dels])
        if failed_prefixes:
            self.unwritten.update(failed_prefixes)
            self._error(MapFullError(f"v4_tbl8: no tbl8 group or slot left for "
                                     f"{len(failed_prefixes)} prefixes (e.g. "
                                     f"{failed_prefixes[0]}); the kernel answers for them"),
                        full=True)

    def _write_v6_lengths(self, batch: RouteBatch, written: np.ndarray[Any, Any],
                          deleted: int) -> None:
        """The lengths of the IPv6 routes just written (their entries are in
        v6_hash already); all of them rebuilt on the first write into lengths
        this run did not create (a previous run's bits) and after enough
        deletions."""
        lengths = self.v6
        assert lengths is not None
        if self._first and "v6_lengths" not in self.fresh:
            lengths.rebuild(batch.addrs[written], batch.lens[written])
            return
        lengths.add(batch.addrs[written], batch.lens[written])
        if lengths.note_deleted(deleted):
            keys, _ = read_whole(self.maps, self.route_maps[AF_INET6])
            table = np.frombuffer(keys, abi.route_key_dtype(16))
            lengths.rebuild(table["addr"], table["plen"])

    def _select_tables(self) -> None:
        """Point the program at the tables this writer fills (fs_config)."""
        v4 = abi.FS_V4_DIR24 if self.v4_table == "dir24" else abi.FS_V4_LPM
        v6 = abi.FS_V6_HASH if self.v6_table == "hash" else abi.FS_V6_LPM
        key = abi.U32.pack(0)
        current = dict(self.maps.items("config")).get(key, abi.CONFIG.pack(0, 0, 0, 0, 0))
        fields = abi.CONFIG.unpack(current[:abi.CONFIG.size])
        if fields[3:] != (v4, v6):
            self._update("config", [(key, abi.CONFIG.pack(*fields[:3], v4, v6))])

    def _update(self, name: str, items: list[tuple[bytes, bytes]]) -> int:
        """Write items in batches; returns how many made it (all, unless a map is full)."""
        done = 0
        for chunk in _chunks(items, self.batch):
            try:
                self.maps.update(name, chunk)
            except MapFullError as e:
                self._error(e, full=True)
                return done + e.done
            except MapError as e:
                self._error(e)
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
                self._error(e)
                continue
            self.stats.batches += 1
            self.stats.entries += len(chunk)

    def _error(self, e: MapError, full: bool = False) -> None:
        self.stats.errors += 1
        self.stats.full += full
        self.stats.last_error = str(e)


def _put_records(maps: MapSet, name: str, fd: int | None, keys: np.ndarray[Any, Any],
                 vals: np.ndarray[Any, Any]) -> None:
    """Route records laid end to end (keys, 8-byte values) into map ``name``: in one
    bpf() call on its fd, or item by item through the map set where it has none
    (``MemoryMaps``). A full map raises MapFullError with how many went in."""
    count = len(vals) // 8
    if fd is not None:
        bpfsys.update_batch(fd, memoryview(keys), memoryview(vals), count)
        return
    ks = len(keys) // count if count else 0
    k, v = keys.tobytes(), vals.tobytes()
    maps.update(name, [(k[i * ks:(i + 1) * ks], v[i * 8:(i + 1) * 8]) for i in range(count)])


def _joined(parts: list[np.ndarray[Any, Any]]) -> np.ndarray[Any, Any]:
    """The parts end to end; a single non-empty one (a resync's rows alone, or
    changes alone) is taken as it is, not copied."""
    filled = [p for p in parts if len(p)] or parts[:1]
    return filled[0] if len(filled) == 1 else np.concatenate(filled)


def _chunks(items: list[bytes] | list[tuple[bytes, bytes]], n: int) -> Iterable[list]:  # type: ignore[type-arg]
    for i in range(0, len(items), n):
        yield items[i:i + n]


# ---------------------------------------------------------------- map set access
#
# The pinned maps (fastpath/maps.py) are reached through their fds for what
# MapSet does not say: bulk writes from one buffer, LPM lookups, mmap.


def _fd(maps: MapSet, name: str) -> int | None:
    fd: Callable[[str], int] | None = getattr(maps, "fd", None)
    return fd(name) if fd is not None else None


def _has(maps: MapSet, name: str) -> bool:
    """Whether the map set has map ``name`` (MemoryMaps have every map)."""
    try:
        return isinstance(maps, MemoryMaps) or _fd(maps, name) is not None
    except (OSError, MapError):
        return False  # pinned by an older fibsync that did not have it


def read_whole(maps: MapSet, name: str) -> tuple[bytes, bytes]:
    """Every key and every value of a map, each laid end to end: in one call where the
    map set can (``PinnedMaps.read_all``), entry by entry otherwise."""
    read_all = getattr(maps, "read_all", None)
    if read_all is not None:
        return read_all(name)  # type: ignore[no-any-return]
    items = list(maps.items(name))
    return b"".join(k for k, _ in items), b"".join(v for _, v in items)


def route_map(maps: MapSet, family: int) -> str:
    """The route map the program reads for a family (fs_config.v6_table says
    which for IPv6; routes_v4 is the IPv4 prefix list in either IPv4 mode)."""
    if family == AF_INET:
        return ROUTE_MAPS[AF_INET]
    current = dict(maps.items("config")).get(abi.U32.pack(0), b"")
    table = abi.CONFIG.unpack(current)[4] if len(current) == abi.CONFIG.size else abi.FS_V6_LPM
    return V6_TABLES.get(table, ROUTE_MAPS[AF_INET6])


def map_buffer(maps: MapSet, name: str) -> Any:
    """The memory behind an mmapable array of the map set (None: it has none)."""
    buffer: Callable[[str], Any] | None = getattr(maps, "buffer", None)
    try:
        if buffer is not None:
            return buffer(name)
        fd = _fd(maps, name)
        return dir24.map_buffer(fd) if fd is not None else None
    except (KeyError, MapError, OSError):
        return None


def _dir24_buffers(maps: MapSet) -> list[Any] | None:
    buffers = [map_buffer(maps, n) for n in DIR24_MAPS]
    return buffers if all(b is not None for b in buffers) else None


def _v4_cover(maps: MapSet) -> dir24.Cover:
    """cover(addr, depth) for the DIR-24-8 table: the longest route in
    ``routes_v4`` shorter than depth that covers addr (the trie's own lookup)."""
    match: Callable[[str, bytes], bytes | None] | None = getattr(maps, "match", None)
    if match is None:
        fd = _fd(maps, "routes_v4")
        assert fd is not None
        lookup = bpfsys.Lookup(fd, abi.V4_KEY.size, abi.ROUTE.size)

        def match(_name: str, key: bytes) -> bytes | None:
            return lookup(key)

    def cover(addr: int, depth: int) -> tuple[int, bytes] | None:
        value = match("routes_v4", abi.V4_KEY.pack(depth - 1, addr.to_bytes(4, "big")))
        if value is None:
            return None
        return value[7], value[:8]

    return cover

