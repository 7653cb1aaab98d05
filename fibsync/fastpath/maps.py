"""The pinned maps of one instance, opened by path: no compiler, no daemon needed.

``PinnedMaps`` is the ``MapSet`` the daemon's writer uses (batched bpf(2)
calls), and it is what ``fibsync routes``, ``fibsync lookup`` and the offline
``fibsync status`` read: they show what the XDP program really sees, not what
the daemon believes.
"""

from __future__ import annotations

import functools
import ipaddress
import mmap
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ..errors import FastPathError, MapFullError
from ..model import AF_INET, AF_INET6
from . import abi, bpfsys, local, v6hash
from .abi import CONFIG, COUNTER, HEARTBEAT, NEXTHOP, ROUTE, U32, V4_KEY, V6_KEY
from .writer import ROUTE_MAPS, MapSet, map_buffer, read_whole, route_map

ROUTE_REASON = abi.ROUTE_DTYPE.fields["reason"][1]  # its byte in struct fs_route

CLOCK_MONOTONIC_COARSE = 6  # bpf_ktime_get_coarse_ns's clock
ACTIONS = {abi.FS_ACT_FORWARD: "unicast", abi.FS_ACT_DROP: "blackhole",
           abi.FS_ACT_KERNEL: "kernel", abi.FS_ACT_FIB: "fib"}


class PinnedMaps:
    def __init__(self, pin_dir: Path, fds: dict[str, int] | None = None) -> None:
        """``fds``: maps open already (the daemon's, from ``program.OpenMaps``), which this
        object then owns; any other map is opened by its pin when first used."""
        self.pin_dir = pin_dir
        if not (pin_dir / "routes_v4").exists():
            raise FastPathError(
                f"no fast path pinned at {pin_dir}: start `fibsync run` for this instance "
                f"(or name it with --instance)")
        self._fds: dict[str, int] = dict(fds or {})

    def fd(self, name: str) -> int:
        fd = self._fds.get(name)
        if fd is None:
            fd = self._fds[name] = bpfsys.obj_get(str(self.pin_dir / name))
        return fd

    # ------------------------------------------------------------ MapSet

    def update(self, name: str, items: list[tuple[bytes, bytes]]) -> None:
        if not items:
            return
        fd = self.fd(name)
        try:
            bpfsys.update_batch(fd, b"".join(k for k, _ in items),
                                b"".join(v for _, v in items), len(items))
        except MapFullError as err:
            # The batch stopped at the first entry that found no room; the rest were not even
            # tried. Rewrite them one by one (replacing an existing key needs no room), and
            # delete any key that still fails, so that no entry keeps a stale value. The
            # writer counts everything from the first failure on as unwritten.
            first = self._update_each(fd, items)
            if first is None:
                return
            err.done = first
            raise err from None

    @staticmethod
    def _update_each(fd: int, items: list[tuple[bytes, bytes]]) -> int | None:
        first = None
        for i, (key, value) in enumerate(items):
            try:
                bpfsys.update(fd, key, value)
            except MapFullError:
                bpfsys.delete(fd, key)
                if first is None:
                    first = i
        return first

    def delete(self, name: str, keys: list[bytes]) -> None:
        if keys:
            bpfsys.delete_batch(self.fd(name), b"".join(keys), len(keys))

    def items(self, name: str) -> Iterator[tuple[bytes, bytes]]:
        return bpfsys.iterate(self.fd(name))

    def read_all(self, name: str) -> tuple[bytes, bytes]:
        """Every key and every value of a map, each laid end to end (no object per entry)."""
        keys, values, _ = bpfsys.read_all(self.fd(name))
        return keys, values

    def set_hash_policy(self, ipv4: int, ipv6: int) -> None:
        """ECMP hashing as net.ipv{4,6}.fib_multipath_hash_policy; the rest of fs_config
        (flags, the tables the writer chose) is kept as it is."""
        key = U32.pack(0)
        old = bpfsys.lookup(self.fd("config"), key)
        _, _, *rest = CONFIG.unpack_from(old) if isinstance(old, bytes) else (0,) * 5
        bpfsys.update(self.fd("config"), key, CONFIG.pack(ipv4, ipv6, *rest))

    def heartbeat(self) -> tuple[int, int]:
        """fs_heartbeat: (fresh_until, watched_until); 0: no promise needed."""
        raw = bpfsys.lookup(self.fd("heartbeat"), U32.pack(0))
        return HEARTBEAT.unpack_from(raw) if isinstance(raw, bytes) else (0, 0)

    def set_heartbeat(self, fresh_until_ns: int, watched_until_ns: int) -> None:
        """fs_heartbeat, in CLOCK_MONOTONIC_COARSE ns (0: always): the program trusts
        the tables until fresh_until, and anything of the daemon's until watched_until
        (bpf/fibsync.h)."""
        bpfsys.update(self.fd("heartbeat"), U32.pack(0),
                      HEARTBEAT.pack(fresh_until_ns, watched_until_ns))

    def config(self) -> tuple[int, int, int, int, int]:
        """fs_config: (hash_policy_v4, hash_policy_v6, flags, v4_table, v6_table)."""
        raw = bpfsys.lookup(self.fd("config"), U32.pack(0))
        return CONFIG.unpack_from(raw) if isinstance(raw, bytes) else (0, 0, 0, 0, 0)

    # ------------------------------------------------------------ readers

    def counters(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        fd = self.fd("counters")
        for reason in abi.Reason:
            per_cpu = bpfsys.lookup(fd, U32.pack(reason.value)) or []
            packets = bytes_ = 0
            for value in per_cpu:
                p, b = COUNTER.unpack_from(value)
                packets += p
                bytes_ += b
            out[reason.name] = {"packets": packets, "bytes": bytes_,
                                "description": reason.description}
        return out

    def routes(self) -> list[dict[str, Any]]:
        return read_routes(self)

    def lookup(self, address: str) -> dict[str, Any]:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            raise FastPathError(f"{address!r} is not an IPv4 or IPv6 address") from None
        family = AF_INET6 if ip.version == 6 else AF_INET
        name, key = route_map(self, family), V6_KEY if family == AF_INET6 else V4_KEY
        bits = ip.max_prefixlen
        keys = {k[:key.size]: v for k, v in self.items(name)}
        n = int(ip)
        for plen in range(bits, -1, -1):
            masked = (n >> (bits - plen) << (bits - plen)) if plen else 0
            k = key.pack(plen, masked.to_bytes(bits // 8, "big"))
            if k in keys:
                doc = _route_doc(family, masked.to_bytes(bits // 8, "big"), plen, keys[k],
                                 _nexthops(self), _groups(self), _ifnames())
                doc["address"] = address
                doc["path"] = _explain(doc)
                return doc
        return {"address": address, "prefix": None,
                "path": "no fast-path prefix: the XDP program asks bpf_fib_lookup, and "
                        "passes the packet to the kernel if that finds no usable route"}

    def close(self) -> None:
        import os
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _nexthops(maps: MapSet) -> dict[int, tuple[Any, ...]]:
    return {U32.unpack(k)[0]: NEXTHOP.unpack(v[:NEXTHOP.size]) for k, v in maps.items("nexthops")}


class Group(NamedTuple):
    members: list[tuple[int, int]]  # (member nexthop id, kernel weight)
    by_kernel: bool  # no bucket: the kernel picks the path (bpf_fib_lookup)


def _local_v4(maps: MapSet) -> np.ndarray[Any, Any] | None:
    """`local_v4`'s words, None where the map set has none."""
    try:
        keys, values = read_whole(maps, "local_v4")
    except (OSError, FastPathError):
        return None
    if not keys:
        return None
    words = np.zeros(abi.FS_LOCAL_V4_WORDS, np.uint64)
    words[np.frombuffer(keys, "=u4")] = np.frombuffer(values, "=u8")
    return words


def _groups(maps: MapSet) -> dict[int, Group]:
    return {U32.unpack(k)[0]: Group(abi.group_members(v), abi.group_buckets(v) == 0)
            for k, v in maps.items("groups")}


def read_routes(maps: MapSet, attempts: int = 5) -> list[dict[str, Any]]:
    """One entry per fast-path prefix with its next hops, sorted by family and prefix.

    The maps are read one after the other while the daemon may be writing: a
    route can show up before the nexthop it points to was read, or after it
    went. Such a read is taken again; a reference still missing after that
    is reported (``missing: true``), as the XDP program would meet it.
    """
    for _ in range(attempts):
        out = _read_routes_once(maps)
        if not any(h.get("missing") for e in out for h in e["nexthops"]):
            break
    return out


def _read_routes_once(maps: MapSet) -> list[dict[str, Any]]:
    return RouteTable(maps).docs()


def route_key_prefix(key: bytes) -> tuple[int, bytes, int]:
    """(family, address, length) of a route map's key (the family by the key's size)."""
    family, fmt = (AF_INET, V4_KEY) if len(key) == V4_KEY.size else (AF_INET6, V6_KEY)
    plen, addr = fmt.unpack(key)
    return family, addr, plen


class RouteMap:
    """One route map read whole, as arrays sorted by prefix (address, then length):
    row i is the key of ``prefix(i)`` with value ``values[i]`` (struct fs_route's bytes).

    The keys are held as the columns they sort by (``_key_columns``). A full table is
    a million rows: arrays hold them in ~20 MB, where a dict of bytes took ~200 MB
    and seconds to fill. No key appears twice: where a read returned one twice
    (``bpfsys.read_all``), the later copy is kept.
    """

    def __init__(self, family: int, keys: bytes, values: bytes) -> None:
        self.family = family
        columns = _key_columns(family, keys)
        vals = np.frombuffer(values, np.uint8).reshape(-1, ROUTE.size)
        if len(vals) != len(columns[0]):
            raise FastPathError(f"{len(columns[0])} route keys but {len(vals)} values")
        # stable: of two copies of a key the later stays last. A map read (the trie's
        # postorder) or a writer's batch is nearly sorted already, which lexsort exploits.
        order = np.lexsort(columns[::-1])
        columns = [c[order] for c in columns]
        if len(order) and (repeated := _same_as_next(columns)).any():
            last = np.append(~repeated, True)
            columns, order = [c[last] for c in columns], order[last]
        self.columns = columns  # most significant first
        self.values = vals[order]

    def __len__(self) -> int:
        return len(self.values)

    def find(self, key: bytes) -> int | None:
        """The row of a map key, None when the map lacks it."""
        lo, hi = 0, len(self)
        for column, wanted in zip(self.columns, _key_columns(self.family, key), strict=True):
            part = column[lo:hi]
            lo, hi = (lo + int(np.searchsorted(part, wanted[0], "left")),
                      lo + int(np.searchsorted(part, wanted[0], "right")))
        return lo if lo < hi else None

    def prefix(self, row: int) -> tuple[bytes, int]:
        """(address, length) of a row's key."""
        words = [int(c[row]) for c in self.columns]
        if self.family == AF_INET:
            return (words[0] >> 32).to_bytes(4, "big"), words[0] & 0xFFFFFFFF
        return words[0].to_bytes(8, "big") + words[1].to_bytes(8, "big"), words[2]


def _key_columns(family: int, keys: bytes) -> list[np.ndarray[Any, Any]]:
    """Route map keys laid end to end as the columns that order them by address, then
    length: IPv4 one 64-bit word (address, length); IPv6 the address's two 64-bit
    halves, then the length. Either holds the whole key."""
    size = V4_KEY.size if family == AF_INET else V6_KEY.size
    n = len(keys) // size

    def field(dtype: str, offset: int) -> np.ndarray[Any, Any]:
        # one field of every key, read in place (numpy copes with the misalignment)
        if not n:
            return np.zeros(0, np.uint64)
        return np.ndarray((n,), dtype, keys, offset, (size,)).astype(np.uint64)

    plen = field("=u4", 0)
    if family == AF_INET:
        words = field(">u4", 4)
        words <<= np.uint64(32)
        words |= plen
        return [words]
    return [field(">u8", 4), field(">u8", 12), plen]


def _same_as_next(columns: list[np.ndarray[Any, Any]]) -> np.ndarray[Any, Any]:
    """Of sorted rows, whether row i has the key of row i + 1 (one fewer than rows)."""
    same = columns[0][1:] == columns[0][:-1]
    for c in columns[1:]:
        same &= c[1:] == c[:-1]
    return same


def matching_rows(a: RouteMap, b: RouteMap) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """The rows of two route maps that hold the same key: (rows of a, rows of b)."""
    if len(a) == len(b) and all(np.array_equal(x, y)
                                for x, y in zip(a.columns, b.columns, strict=True)):
        same = np.arange(len(a))  # the usual audit: the same prefixes on both sides
        return same, same
    both = [np.concatenate([x, y]) for x, y in zip(a.columns, b.columns, strict=True)]
    order = np.lexsort(both[::-1])
    # a key is in each map at most once: equal neighbours are a row of each, and the
    # stable sort keeps a's (the lower index) first
    first = np.flatnonzero(_same_as_next([c[order] for c in both]))
    return order[first], order[first + 1] - len(a)


def read_route_map(maps: MapSet, family: int) -> RouteMap:
    """The route map of a family, from a map set that can read a map whole
    (``PinnedMaps.read_all``) or entry by entry."""
    return RouteMap(family, *read_whole(maps, route_map(maps, family)))


def _v6_lengths(maps: MapSet) -> np.ndarray[Any, Any] | None:
    """`v6_lengths`' words where the program reads the IPv6 hash, else None."""
    if route_map(maps, AF_INET6) != "v6_hash":
        return None
    buffer = map_buffer(maps, "v6_lengths")
    if buffer is None:
        return None
    words = np.frombuffer(buffer, np.uint64).copy()
    if isinstance(buffer, mmap.mmap):
        buffer.close()
    return words


class RouteTable:
    """Both route maps read once, with the nexthops and groups their entries point to:
    raw values by prefix (``RouteMap``, one per family), described on demand.

    Nexthops and groups are read before the routes, as the writer writes them before
    the routes that use them; a route written meanwhile may point at one this read
    missed (``missing: true``). ``routes``: route maps read already (verify's kernel
    side, encoded without a map in between).
    """

    def __init__(self, maps: MapSet, routes: dict[int, RouteMap] | None = None) -> None:
        self.nexthops = _nexthops(maps)
        self.groups = _groups(maps)
        self.names = _ifnames()
        # read before the routes: the writer sets a local prefix's bits before its route
        self.local_v4 = _local_v4(maps) if routes is None else None
        self.v6_lengths = _v6_lengths(maps) if routes is None else None
        self.routes = routes if routes is not None else {
            family: read_route_map(maps, family) for family in ROUTE_MAPS}

    def doc(self, key: bytes) -> dict[str, Any] | None:
        """What ``fibsync routes`` shows for this key, None if the maps lack it."""
        family = AF_INET if len(key) == V4_KEY.size else AF_INET6
        row = self.routes[family].find(key)
        if row is None:
            return None
        doc = self.doc_at(family, row)
        if family == AF_INET and row in self.unmarked_local:
            doc["reason"] = doc.get("reason", "") + " without its local_v4 bit"
        if family == AF_INET6 and row in self.unprobed_v6:
            doc["reason"] = doc.get("reason", "") + " without its length in v6_lengths"
        return doc

    @functools.cached_property
    def unprobed_v6(self) -> frozenset[int]:
        """Rows of v6_hash whose length v6_lengths lacks: the program never probes
        them, and answers with a shorter prefix (none where it reads the trie)."""
        if self.v6_lengths is None or not len(self.routes[AF_INET6]):
            return frozenset()
        m = self.routes[AF_INET6]
        addrs = np.concatenate([c.astype(">u8").view(np.uint8).reshape(-1, 8)
                                for c in m.columns[:2]], axis=1)
        at, bit = v6hash.positions(addrs, m.columns[2].astype(np.uint8))
        return frozenset(np.flatnonzero((self.v6_lengths[at] & bit) == 0).tolist())

    @functools.cached_property
    def unmarked_local(self) -> frozenset[int]:
        """Rows of routes_v4 holding a PASS_LOCAL entry whose bits `local_v4` lacks: the
        program would take that source for another host's (none without the map)."""
        if self.local_v4 is None:
            return frozenset()
        m = self.routes[AF_INET]
        rows = np.flatnonzero(m.values[:, ROUTE_REASON] == abi.Reason.PASS_LOCAL.value)
        return frozenset(row for row in rows.tolist()
                         if not local.marked(self.local_v4, *m.prefix(row)))

    def doc_at(self, family: int, row: int) -> dict[str, Any]:
        """The document of one row of a family's route map."""
        m = self.routes[family]
        return _route_doc(family, *m.prefix(row), m.values[row].tobytes(), self.nexthops,
                          self.groups, self.names)

    def docs(self) -> list[dict[str, Any]]:
        """Every row's document, by family, address and length."""
        return [self.doc_at(family, row) for family in sorted(self.routes)
                for row in range(len(self.routes[family]))]


def _route_doc(family: int, addr: bytes, plen: int, value: bytes,
               nexthops: dict[int, tuple[Any, ...]], groups: dict[int, Group],
               names: dict[int, str]) -> dict[str, Any]:
    nh_id, action, flags, reason, _ = ROUTE.unpack(value[:ROUTE.size])
    doc: dict[str, Any] = {
        "prefix": f"{socket.inet_ntop(family, addr)}/{plen}",
        "type": ACTIONS.get(action, f"action{action}"),
        "nexthops": [],
    }
    if action == 2:
        doc["reason"] = _reason_name(reason)
    if action != 0:
        return doc
    if flags & abi.FS_ROUTE_GROUP:
        doc["group"] = nh_id
        if nh_id not in groups:
            doc["nexthops"].append({"id": nh_id, "missing": True})
            return doc
        members = groups[nh_id].members
        if groups[nh_id].by_kernel:
            doc["ecmp"] = "kernel"
    else:
        members = [(nh_id, 1)]
    for mid, weight in members:
        nh = nexthops.get(mid)
        if nh is None:
            doc["nexthops"].append({"id": mid, "missing": True})
            continue
        ifindex, mtu, nflags, nfamily, _smac, dmac, gateway = nh
        connected = bool(nflags & abi.FS_NH_CONNECTED)
        doc["nexthops"].append({
            "gateway": None if connected else _gateway_text(nfamily, gateway),
            "ifname": names.get(ifindex),
            "ifindex": ifindex,
            "weight": weight,
            "resolved": bool(nflags & abi.FS_NH_RESOLVED),
            "mac": None if connected or not nflags & abi.FS_NH_RESOLVED else dmac.hex(":"),
            "mtu": mtu,
        })
    return doc


def _reason_name(reason: int) -> str:
    """A route's reason code by name; a code this build does not know (a map written by
    another version, or corrupt) by number, rather than an exception."""
    try:
        return abi.Reason(reason).name
    except ValueError:
        return f"reason {reason}"


def _gateway_text(family: int, gateway: bytes) -> str:
    """A nexthop's gateway as text, whatever the map holds (family 0 in a corrupt map
    must not stop `routes` or the audit)."""
    if family in (AF_INET, AF_INET6):
        return socket.inet_ntop(family, gateway[:16 if family == AF_INET6 else 4])
    return f"family {family} {gateway.hex()}"


def _explain(doc: dict[str, Any]) -> str:
    kind = doc["type"]
    if kind == "blackhole":
        return f"{doc['prefix']} is a blackhole: dropped in XDP"
    if kind == "kernel":
        return f"{doc['prefix']}: handed to the kernel ({doc.get('reason')})"
    if kind == "fib":
        return f"{doc['prefix']}: the XDP program asks bpf_fib_lookup (route it cannot mirror)"
    hops = doc["nexthops"]
    ready = [h for h in hops if h.get("resolved")]
    via = ", ".join(f"{h['gateway'] or 'connected'} dev {h['ifname']}" for h in hops)
    if not ready:
        return (f"{doc['prefix']} via {via}: next hop not resolved yet, so bpf_fib_lookup/the "
                f"kernel forward and resolve it")
    if doc.get("ecmp") == "kernel":
        return (f"{doc['prefix']} via {via}: the kernel may skip one of these paths (its "
                f"neighbour failed, or its link is down): bpf_fib_lookup picks the path")
    return f"{doc['prefix']} via {via}: forwarded by the fast path"


def render_routes(entries: list[dict[str, Any]]) -> str:
    lines = []
    for e in entries:
        if e["type"] != "unicast":
            extra = f" ({e['reason']})" if e.get("reason") else ""
            lines.append(f"{e['prefix']:<24} {e['type']}{extra}")
            continue
        for i, h in enumerate(e["nexthops"]):
            head = f"{e['prefix']:<24}" if i == 0 else " " * 24
            if i == 0 and e.get("ecmp") == "kernel":
                lines.append(f"{head} (ECMP by the kernel: bpf_fib_lookup picks the path)")
                head = " " * 24
            if h.get("missing"):
                lines.append(f"{head} nexthop {h['id']} missing from the maps")
                continue
            via = f"via {h['gateway']}" if h.get("gateway") else "connected"
            state = "" if h.get("resolved") else "  (unresolved)"
            weight = f" weight {h['weight']}" if len(e["nexthops"]) > 1 else ""
            lines.append(f"{head} {via} dev {h.get('ifname')}{weight}{state}")
    return "\n".join(lines) if lines else "(no fast-path prefixes)"


def render_lookup(doc: dict[str, Any]) -> str:
    return f"{doc['address']}: {doc['path']}"


def _ifnames() -> dict[int, str]:
    return {i: n for i, n in socket.if_nameindex()}


def offline_status(settings: Any) -> dict[str, Any]:
    """What ``fibsync status`` shows when no daemon answers: the pinned maps' content."""
    doc: dict[str, Any] = {"instance": settings.instance, "daemon": "down", "state": "down"}
    try:
        maps = PinnedMaps(settings.pin_dir)
    except FastPathError as e:
        doc["state"] = "not running"
        doc["note"] = str(e)
        return doc
    names = {"routes_v4": "routes_v4", "routes_v6": route_map(maps, AF_INET6),
             "nexthops": "nexthops", "groups": "groups", "neighbours": "neighbours"}
    counts = {shown: sum(1 for _ in maps.items(name)) for shown, name in names.items()}
    doc["fastpath"] = counts
    doc["maps"] = {shown: {"entries": counts[shown],
                           "capacity": bpfsys.map_info(maps.fd(name)).max_entries}
                   for shown, name in names.items()}
    doc["counters"] = maps.counters()
    now = time.clock_gettime_ns(CLOCK_MONOTONIC_COARSE)
    fresh_until, watched_until = maps.heartbeat()
    if fresh_until or watched_until:
        doc["heartbeat"] = {
            "fresh_for_seconds": round((fresh_until - now) / 1e9, 1) if fresh_until else None,
            "watched_for_seconds": round((watched_until - now) / 1e9, 1)
            if watched_until else None}
    from .program import attached
    doc["interfaces"] = [{"name": a.ifname, "ifindex": a.ifindex, "mode": a.mode,
                          "prog_id": a.prog_id} for a in attached(settings.instance)]
    doc["note"] = ("the daemon is down: once its last heartbeat is stale_after old the XDP "
                   "program hands every packet to the kernel (PASS_NO_DAEMON); start "
                   "`fibsync run` to resync, or `fibsync detach`")
    return doc


__all__ = ["PinnedMaps", "offline_status", "render_lookup", "render_routes"]
