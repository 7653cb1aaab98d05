"""The pinned maps against a fresh kernel dump: ``fibsync verify`` and the daemon's audit.

One pass:

1. subscribe to the rtnetlink groups the daemon follows (``InFlight`` notes
   every change they announce from now on);
2. dump the kernel: links, addresses, neighbours, nexthop objects, routes;
3. read the pinned maps;
4. read the changes announced meanwhile.

The kernel's side is the fast path a fresh RIB builds from that dump, encoded
by the daemon's writer and described through the same ``RouteTable`` as the
pinned maps (``fibsync routes``). Both sides are then one description per
prefix: type, reason, and the next hops with gateway, link, weight,
resolution, MAC and MTU; fast-path ids do not take part.

A full table is 1.25M prefixes and a few dozen distinct map values: each
side's routes are arrays (``RouteMap``), each distinct value is described
once, and the two sides are matched and compared with numpy
(``Comparison``); only the prefixes that differ become Python objects.

What a pass may not judge (``InFlight.judges``):

- a prefix that changed during the pass, or whose next hops did (a link, a
  neighbour or a nexthop object it uses): its two sides were read at
  different moments;
- a prefix the maps hold and the dump lacks, when the dump may have skipped
  live routes. The kernel resumes an IPv6 route dump after its tree changed
  by counting nodes again from the root (``fib6_dump_table``:
  ``w->skip = w->count``), so a route deleted before the dump's cursor hides
  a live one further on. An IPv4 dump resumes by key, but counts the aliases
  inside one trie leaf (``fn_trie_dump_leaf``), so a deletion at the same
  address can hide one. Link, address and nexthop-object changes may remove
  routes without a message.

A difference is reported only when a second pass, taken afterwards, finds the
same two sides again and could judge it both times: what was in flight in
between is not a divergence.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import itertools
import json
import os
import select
import socket
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DecodeError, NetlinkOverrun
from .fastpath.abi import ROUTE
from .fastpath.maps import PinnedMaps, RouteMap, RouteTable, matching_rows
from .fastpath.writer import (
    ROUTE_MAPS,
    MapSet,
    MapWriter,
    MemoryMaps,
    RouteBatch,
    route_key,
)
from .model import (
    AF_INET,
    AF_INET6,
    Address,
    Change,
    Link,
    Neighbour,
    NexthopObject,
    Op,
    Prefix,
    Route,
    Snapshot,
)
from .netlink import rtnl, source
from .netlink.decode import decode
from .rib import Filter, Rib

# room for the announcements of a whole pass at full speed (the kernel caps it at rmem_max
# unless SO_RCVBUFFORCE is allowed)
EVENT_RCVBUF = 256 << 20
RECHECK_DELAY = 0.3  # seconds between the two passes
DRAIN_TIMEOUT = 30.0  # seconds to read a pass's announcements up to its barrier

Entry = tuple[Any, ...]
ROUTE_IDENTITY = ROUTE.size - 1  # struct fs_route without its last byte, the prefix length
ROUTE_IDENTITY_MASK = (1 << 8 * ROUTE_IDENTITY) - 1  # the same bytes of the value read as "<u8"


def entry_of(doc: dict[str, Any]) -> Entry:
    """A ``read_routes`` document without fast-path ids: what the XDP program does."""
    hops = []
    for h in doc["nexthops"]:
        if h.get("missing"):
            hops.append(("missing",))
        else:
            hops.append((h["gateway"] or "", h["ifindex"], h["weight"], h["resolved"],
                         h["mac"] or "", h["mtu"]))
    return (doc["type"], doc.get("reason", ""), tuple(sorted(hops, key=repr)))


@dataclass(slots=True)
class InFlight:
    """What rtnetlink announced during a pass."""

    prefixes: set[Prefix] = field(default_factory=set)
    ifindexes: set[int] = field(default_factory=set)
    nhids: set[int] = field(default_factory=set)
    neighbours: set[tuple[int, bytes]] = field(default_factory=set)
    v4_deleted: set[bytes] = field(default_factory=set)  # addresses of deleted IPv4 routes
    v6_deleted: bool = False
    silent: bool = False  # a change after which the kernel may remove routes unannounced
    overrun: bool = False  # announcements were lost: nothing can be judged
    changes: int = 0

    def note(self, change: Change) -> None:
        self.changes += 1
        obj = change.obj
        if isinstance(obj, Route):
            self.prefixes.add(obj.prefix)
            if change.op is Op.DEL:
                if obj.prefix.family == AF_INET6:
                    self.v6_deleted = True
                else:
                    self.v4_deleted.add(obj.prefix.addr)
        elif isinstance(obj, Neighbour):
            self.neighbours.add((obj.ifindex, obj.address))
        elif isinstance(obj, NexthopObject):
            self.nhids.add(obj.id)
            if change.op is Op.DEL:
                self.silent = True
        elif isinstance(obj, Link):
            self.ifindexes.add(obj.ifindex)
            if change.op is Op.DEL or not obj.up:
                self.silent = True
        elif isinstance(obj, Address):
            self.ifindexes.add(obj.ifindex)
            if change.op is Op.DEL:
                self.silent = True

    def judges(self, prefix: Prefix, kernel: Entry | None, maps: Entry | None,
               nhids: set[int]) -> bool:
        """Whether this pass's two sides of ``prefix`` can be compared (module docstring).

        ``nhids``: the kernel nexthop objects the prefix's routes use, groups and
        their members alike.
        """
        if self.overrun or prefix in self.prefixes or nhids & self.nhids:
            return False
        for entry in (kernel, maps):
            for hop in entry[2] if entry else ():
                if len(hop) > 1 and (hop[1] in self.ifindexes or
                                     (hop[1], _packed(hop[0])) in self.neighbours):
                    return False
        if prefix.family == AF_INET and prefix.addr in self.v4_deleted:
            return False
        if kernel is None:
            return not (self.silent or (prefix.family == AF_INET6 and self.v6_deleted))
        return True


def _packed(gateway: str) -> bytes:
    if not gateway:
        return b""
    return socket.inet_pton(AF_INET6 if ":" in gateway else AF_INET, gateway)


class EventWatch:
    """An rtnetlink subscription that feeds an ``InFlight``."""

    def __init__(self, netns: str | None = None) -> None:
        self.sock = rtnl.open_socket(netns=netns, rcvbuf=EVENT_RCVBUF,
                                     groups=source.EVENT_GROUPS)
        self.inflight = InFlight()
        self._buf = bytearray(rtnl.RECV_BUFFER)

    def drain(self, timeout: float = DRAIN_TIMEOUT) -> InFlight:
        """Read the announcements queued up to now.

        Up to a barrier, not until the socket is empty, which during a storm it
        never is: the kernel queues the acknowledgement of a request sent now behind
        every notification already queued (as NetlinkSource.caught_up does). An
        overrun may drop the acknowledgement too: past ``timeout`` the pass is
        marked overrun, which judges nothing.
        """
        inflight = self.inflight
        view = memoryview(self._buf)
        msg = rtnl.request(rtnl.NLMSG_NOOP, b"", rtnl.NLM_F_REQUEST | rtnl.NLM_F_ACK)
        barrier = rtnl.seq_of(msg)
        self.sock.send(msg)
        deadline = time.monotonic() + timeout
        while True:
            try:
                n = self.sock.recv_into(self._buf, 0, socket.MSG_TRUNC)
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                    inflight.overrun = True
                    return inflight
                continue
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                inflight.overrun = True
                continue
            if n > len(self._buf):
                inflight.overrun = True
                continue
            try:
                for mtype, _flags, seq, payload in decode(view[:n], lambda _e: None):
                    if mtype == rtnl.NLMSG_ERROR and seq == barrier:
                        return inflight
                    if payload.__class__ is Change:
                        inflight.note(payload)  # type: ignore[arg-type]
            except DecodeError:
                inflight.overrun = True

    def close(self) -> None:
        self.sock.close()


class Entries:
    """One side of a pass: a ``RouteTable`` whose entries are compared as ``entry_of``
    says, computed once per distinct map value (a full table shares a few dozen)."""

    def __init__(self, table: RouteTable) -> None:
        self.table = table
        self._by_value: dict[bytes, Entry] = {}

    def column(self, family: int) -> tuple[np.ndarray[Any, Any], list[Entry]]:
        """Every row's entry, as an index into the list of distinct entries returned."""
        rows = self.table.routes[family]
        if not len(rows):
            return np.zeros(0, np.intp), []
        # struct fs_route without its last byte, the prefix length: the key's, not the entry's
        identity = rows.values.view("<u8").ravel() & np.uint64(ROUTE_IDENTITY_MASK)
        values, index = np.unique(identity, return_inverse=True)
        some_row = np.empty(len(values), np.intp)
        some_row[index] = np.arange(len(index))  # any row with the value will do
        return index, [self.entry(family, int(row)) for row in some_row]

    def entry(self, family: int, row: int) -> Entry:
        ident = self.table.routes[family].values[row, :ROUTE_IDENTITY].tobytes()
        entry = self._by_value.get(ident)
        if entry is None:
            entry = self._by_value[ident] = entry_of(self.table.doc_at(family, row))
        return entry


class Side:
    """One pass's two sides."""

    def __init__(self, kernel: Entries, maps: Entries, inflight: InFlight, rib: Rib) -> None:
        self.kernel = kernel
        self.maps = maps
        self.inflight = inflight
        self.rib = rib  # the kernel side's, built from the pass's dump
        self._compared: dict[int, Comparison] = {}

    def compared(self, family: int) -> Comparison:
        c = self._compared.get(family)
        if c is None:
            c = self._compared[family] = Comparison(self.kernel, self.maps, family)
        return c

    def checked(self) -> int:
        """Prefixes on either side."""
        return sum(self.compared(family).union for family in (AF_INET, AF_INET6))

    def differing(self, exclude: Iterable[Prefix] = ()) -> tuple[dict[Prefix, tuple[Entry | None,
                                                                                  Entry | None]],
                                                              int]:
        """Prefixes whose sides differ and could be judged, and how many could not."""
        skip = set(exclude)
        touched = self.inflight.nhids
        out: dict[Prefix, tuple[Entry | None, Entry | None]] = {}
        unjudged = 0
        differences = itertools.chain(self.compared(AF_INET).differences(),
                                      self.compared(AF_INET6).differences(),
                                      self._unmarked_local())
        for prefix, ke, me in differences:
            if prefix in skip:
                continue
            skip.add(prefix)  # judged once (a differing route may also lack its bits)
            if self.inflight.judges(prefix, ke, me, self.rib.nhids_of(prefix) & touched):
                out[prefix] = (ke, me)
            else:
                unjudged += 1
        return out, unjudged

    def _unmarked_local(self) -> Iterator[tuple[Prefix, Entry | None, Entry]]:
        """Local prefixes the maps hold without their `local_v4` bits (fastpath/local.py):
        equal in the route map, yet the program would forward from such a source."""
        table = self.maps.table
        routes = table.routes[AF_INET]
        for row in sorted(table.unmarked_local):
            prefix = Prefix(AF_INET, *routes.prefix(row))
            krow = self.kernel.table.routes[AF_INET].find(route_key(prefix))
            ke = None if krow is None else self.kernel.entry(AF_INET, krow)
            me = self.maps.entry(AF_INET, row)
            yield prefix, ke, (me[0], f"{me[1]} without its local_v4 bit", *me[2:])

    def docs(self, prefix: Prefix) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        key = route_key(prefix)
        return self.kernel.table.doc(key), self.maps.table.doc(key)


class Comparison:
    """One family's rows of both sides matched by prefix, and their entries compared
    all at once: only the prefixes that differ become Python objects.

    The entries of both sides get one numbering (0: no entry), so that a row's
    number stands for its entry on either side.
    """

    def __init__(self, kernel: Entries, maps: Entries, family: int) -> None:
        self.family = family
        numbering: dict[Entry | None, int] = {None: 0}
        codes = []
        for side in (kernel, maps):
            index, entries = side.column(family)
            lut = np.array([numbering.setdefault(e, len(numbering)) for e in entries], np.intp)
            codes.append(lut[index])
        self.entries = list(numbering)  # by number: a dict keeps the order of insertion
        self.kernel_codes, self.maps_codes = codes
        self.kernel_rows, self.maps_rows = kernel.table.routes[family], maps.table.routes[family]
        self.kernel_pairs, self.maps_pairs = matching_rows(self.kernel_rows, self.maps_rows)
        self.union = len(self.kernel_rows) + len(self.maps_rows) - len(self.kernel_pairs)

    def differences(self) -> Iterator[tuple[Prefix, Entry | None, Entry | None]]:
        """(prefix, kernel entry, maps entry) of every prefix whose entries differ."""
        k, m = self.kernel_codes, self.maps_codes
        kp, mp = self.kernel_pairs, self.maps_pairs
        changed = k[kp] != m[mp]
        yield from self._rows(self.kernel_rows, kp[changed], k[kp[changed]], m[mp[changed]])
        only = _unpaired(len(k), kp)
        yield from self._rows(self.kernel_rows, only, k[only], np.zeros_like(only))
        only = _unpaired(len(m), mp)
        yield from self._rows(self.maps_rows, only, np.zeros_like(only), m[only])

    def _rows(self, rows: RouteMap, index: np.ndarray[Any, Any], kernel: np.ndarray[Any, Any],
              maps: np.ndarray[Any, Any]) -> Iterator[tuple[Prefix, Entry | None, Entry | None]]:
        entries = self.entries
        for i, ke, me in zip(index.tolist(), kernel.tolist(), maps.tolist(), strict=True):
            yield Prefix(self.family, *rows.prefix(i)), entries[ke], entries[me]


def _unpaired(n: int, paired: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    alone = np.ones(n, bool)
    alone[paired] = False
    return np.flatnonzero(alone)


def expected_table(snapshot: Snapshot, route_filter: Filter) -> tuple[RouteTable, Rib]:
    """The fast path a fresh RIB builds from ``snapshot``, encoded by the daemon's writer.

    A fresh RIB's diff only sets entries. Its next hops and groups go through
    ``MapWriter`` into memory; its routes are the writer's ``RouteBatch``es, the
    arrays ``MapWriter`` hands the LPM maps, taken as they are (a full table's
    1.25M routes through an in-memory map cost ~2 s and ~400 MB).
    """
    rib = Rib(route_filter)
    rib.resync(snapshot)
    diff = rib.take_diff()
    routes = {}
    for family in ROUTE_MAPS:
        batch = RouteBatch(family, [(p, e) for p, e in diff.routes.items()
                                    if p.family == family and e is not None],
                           [rows for rows in diff.bulk if rows.family == family],
                           by_address=True)
        routes[family] = RouteMap(family, batch.keys, batch.vals)
    diff.routes, diff.bulk = {}, []
    memory = MemoryMaps()
    MapWriter(memory, v4_table="lpm").write(diff)
    return RouteTable(memory, routes), rib


DUMP_ATTEMPTS = 3  # dumps the kernel interrupted (NLM_F_DUMP_INTR) are taken again


async def one_pass(maps: MapSet, route_filter: Filter, netns: str | None = None) -> Side:
    watch = EventWatch(netns)
    try:
        snapshot, interrupted = Snapshot(), True
        for _ in range(DUMP_ATTEMPTS):
            try:
                snapshot = await source.NetlinkSource(netns=netns).dump()
            except NetlinkOverrun:
                continue  # a table changed under the dump (links, often, in a storm)
            interrupted = False
            break
        actual = RouteTable(maps)
        inflight = watch.drain()
        # still interrupted: this pass judges nothing (the audit is inconclusive and
        # runs again), it does not fail
        inflight.overrun |= interrupted
    finally:
        watch.close()
    kernel, rib = expected_table(snapshot, route_filter)
    inflight.nhids = rib.objects_using(inflight.nhids)
    return Side(Entries(kernel), Entries(actual), inflight, rib)


@dataclass(slots=True)
class Report:
    differences: list[dict[str, Any]]
    unjudged: int  # prefixes in flight during a pass
    checked: int  # prefixes on either side
    changes: int  # announcements during the passes
    overrun: bool
    seconds: float

    @property
    def equal(self) -> bool:
        return not self.differences

    def doc(self) -> dict[str, Any]:
        return {"equal": self.equal, "differences": self.differences,
                "checked": self.checked, "in_flight": self.unjudged,
                "changes_during": self.changes, "overrun": self.overrun,
                "seconds": round(self.seconds, 3)}


async def verify(maps: MapSet, route_filter: Filter, netns: str | None = None,
                 exclude: Iterable[Prefix] = (), recheck_delay: float = RECHECK_DELAY) -> Report:
    """Compare, and re-check what differs before calling it a difference."""
    t0 = time.monotonic()
    skip = set(exclude)
    first = await one_pass(maps, route_filter, netns)
    found, unjudged = first.differing(skip)
    changes, overrun = first.inflight.changes, first.inflight.overrun
    checked = first.checked()
    confirmed: list[dict[str, Any]] = []
    if found:
        await asyncio.sleep(recheck_delay)
        second = await one_pass(maps, route_filter, netns)
        again, _ = second.differing(skip)
        changes += second.inflight.changes
        overrun |= second.inflight.overrun
        for prefix in sorted(found, key=_order):
            if again.get(prefix) == found[prefix]:
                kernel, maps_doc = second.docs(prefix)
                confirmed.append({"prefix": str(prefix), "kernel": kernel, "maps": maps_doc,
                                  "nhids": sorted(second.rib.nhids_of(prefix))})
            else:
                unjudged += 1
    return Report(confirmed, unjudged, checked, changes, overrun, time.monotonic() - t0)


def _order(prefix: Prefix) -> tuple[int, bytes, int]:
    return (prefix.family, prefix.addr, prefix.length)


def render(doc: dict[str, Any]) -> str:
    """A report's document (``Report.doc``) as text: one line per difference, then a summary."""
    lines = []
    for d in doc["differences"]:
        lines.append(f"{d['prefix']}: kernel {_describe(d['kernel'])}; "
                     f"maps {_describe(d['maps'])}")
    n = len(doc["differences"])
    verdict = "equal" if not n else f"{n} difference{'s' if n != 1 else ''}"
    lines.append(f"{verdict}: {doc['checked']} prefixes checked, {doc['in_flight']} changing "
                 f"while read (not judged), {doc['seconds']:.2f} s")
    return "\n".join(lines)


def _describe(doc: dict[str, Any] | None) -> str:
    if doc is None:
        return "none"
    if doc["type"] != "unicast":
        return doc["type"] + (f" ({doc['reason']})" if doc.get("reason") else "")
    hops = []
    for h in doc["nexthops"]:
        if h.get("missing"):
            hops.append(f"nexthop {h['id']} missing")
            continue
        via = f"via {h['gateway']}" if h["gateway"] else "connected"
        state = f"lladdr {h['mac']}" if h["mac"] else ("resolved" if h["resolved"]
                                                        else "unresolved")
        hops.append(f"{via} dev {h['ifname'] or h['ifindex']} weight {h['weight']} "
                    f"mtu {h['mtu']} {state}")
    return "unicast " + ", ".join(hops)


def run_pinned(pin_dir: Path, route_filter: Filter, exclude: Iterable[Prefix] = ()) -> Report:
    maps = PinnedMaps(pin_dir)
    try:
        return asyncio.run(verify(maps, route_filter, exclude=exclude))
    finally:
        maps.close()


def audit_child() -> None:
    """``python -m fibsync.verify ARGS``: the daemon's audit (fibsync/audit.py). ARGS is
    a JSON object (pin_dir, table, protocols, exclude); the report goes to stdout as JSON."""
    with contextlib.suppress(OSError):  # a sandbox may refuse; the audit runs all the same
        os.nice(10)  # behind the daemon, which writes the maps
    # a process of a few seconds that leaves no cycles worth collecting: the collector
    # would only rescan the fresh RIB's objects (~0.1 s of ~5 at 1.25M routes, measured)
    gc.disable()
    args = json.loads(sys.argv[1])
    protocols = frozenset(args["protocols"]) or None
    exclude = [Prefix.parse(p) for p in args.get("exclude", ())]
    report = run_pinned(Path(args["pin_dir"]), Filter(args["table"], protocols), exclude)
    json.dump(report.doc(), sys.stdout)


if __name__ == "__main__":
    audit_child()
