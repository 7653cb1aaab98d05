"""Test harness for the XDP program: namespaces, map contents, test runs.

The program under test is the real one, loaded once per session under a
unique instance name; each test starts from empty maps. Test runs execute in
a throwaway network namespace so that bpf_fib_lookup and tx_ports see only
what the test built.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import socket
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from fibsync.fastpath import abi, bpfsys, dir24
from fibsync.fastpath.abi import Reason
from fibsync.fastpath.local import LocalV4
from fibsync.fastpath.program import FastPath
from fibsync.fastpath.v6hash import V6Lengths
from fibsync.model import AF_INET, AF_INET6, Prefix
from fibsync.netns import inside

XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = range(5)
ACTION_NAMES = {0: "ABORTED", 1: "DROP", 2: "PASS", 3: "TX", 4: "REDIRECT"}

INGRESS = 4000  # ifindex of the test namespace's fsin0
ROUTER = "02:00:00:00:00:01"  # its MAC (in `ifaces`): test frames are addressed to it

# The tiny sizes keep map creation cheap; the layout is what matters.
TEST_SIZES = abi.Sizes(routes_v4=16384, routes_v6=4096, nexthops=1024, groups=256,
                       neighbours=1024, tx_ports=64, tbl8_groups=1024, slots=4096)


def sh(*args: str) -> str:
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


@contextlib.contextmanager
def netns(name: str) -> Iterator[str]:
    """A fresh namespace with lo up, deleted afterwards whatever happens."""
    sh("ip", "netns", "add", name)
    try:
        sh("ip", "-n", name, "link", "set", "lo", "up")
        # where test frames arrive unless a test says otherwise: an interface no
        # test routes to (a frame sent back out of its ingress is a hairpin)
        sh("ip", "-n", name, "link", "add", "fsin0", "index", str(INGRESS), "type", "veth", "peer",
           "name", "fsin1", "index", str(INGRESS + 1))
        sh("ip", "-n", name, "link", "set", "fsin0", "up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


class Dir24Memory:
    """The session program's mmapable arrays (DIR-24-8's, and v6_lengths), mapped
    once; zeroed between tests only when a test wrote them."""

    def __init__(self, fp: FastPath) -> None:
        self.buffers = [dir24.map_buffer(fp.map_fd(n)) for n in ("v4_tbl24", "v4_tbl8",
                                                                 "v4_slots", "v4_nh")]
        self.v6_lengths = dir24.map_buffer(fp.map_fd("v6_lengths"))
        self.dirty = False

    def clear(self) -> None:
        if self.dirty:
            for buf in [*self.buffers, self.v6_lengths]:
                np.frombuffer(buf, np.uint8)[:] = 0
            self.dirty = False


@dataclass
class Lab:
    """The loaded program, its maps, and the namespace its test runs use.

    IPv4 routes go to the LPM trie and, once ``use_v4_table("dir24")`` was
    called, to the DIR-24-8 table too; IPv6 routes to the LPM trie and, once
    ``use_v6_table("hash")`` was called, to the IPv6 hash and its lengths too.
    The program reads the selected ones.
    """

    fp: FastPath
    ns: str
    memory: Dir24Memory | None = None
    v4_table: str = "lpm"
    v6_table: str = "lpm"
    dir24: dir24.Dir24Table | None = field(default=None, repr=False)
    v6: V6Lengths | None = field(default=None, repr=False)
    nexthop_bytes: dict[int, bytes] = field(default_factory=dict, repr=False)
    local_v4: LocalV4 = field(default_factory=LocalV4, repr=False)

    # ------------------------------------------------------------ map contents

    def _fresh_memory(self) -> Dir24Memory:
        """The mapped arrays zeroed, and marked to be zeroed again after the test."""
        assert self.memory is not None
        self.memory.clear()
        self.memory.dirty = True
        return self.memory

    def use_v4_table(self, table: str) -> None:
        self.v4_table = table
        if table == "dir24" and self.dir24 is None:
            memory = self._fresh_memory()
            lookup = bpfsys.Lookup(self.fp.map_fd("routes_v4"), 8, 8)

            def cover(addr: int, depth: int) -> tuple[int, bytes] | None:
                value = lookup(bytes(abi.FsV4Key(depth - 1, (ctypes.c_uint8 * 4)(
                    *addr.to_bytes(4, "big")))))
                return None if value is None else (value[7], value)

            self.dir24 = dir24.Dir24Table(*memory.buffers, cover=cover,
                                          nexthop=self.nexthop_bytes.get)
        self.config()

    def use_v6_table(self, table: str) -> None:
        self.v6_table = table
        if table == "hash" and self.v6 is None:
            self.v6 = V6Lengths(self._fresh_memory().v6_lengths)
        self.config()

    def route(self, prefix: str, nh: int = 0, *, action: int = abi.FS_ACT_FORWARD,
              group: bool = False, reason: int = 0) -> None:
        p = Prefix.parse(prefix)
        name = "routes_v4" if p.family == AF_INET else "routes_v6"
        value = bytes(abi.FsRoute(nh, action, abi.FS_ROUTE_GROUP if group else 0, reason,
                                  p.length))
        local = p.family == AF_INET and reason == Reason.PASS_LOCAL
        self._local_v4(p, local)  # bits gained first, as MapWriter does
        bpfsys.update(self.fp.map_fd(name), bytes(abi.route_key(p)), value)
        if self.dir24 is not None and p.family == AF_INET:
            assert self.dir24.add([(int.from_bytes(p.addr, "big"), p.length, value)]) == []
        if self.v6 is not None and p.family == AF_INET6:
            bpfsys.update(self.fp.map_fd("v6_hash"), bytes(abi.route_key(p)), value)
            self.v6.add(np.frombuffer(p.addr, np.uint8).reshape(1, 16),
                        np.array([p.length], np.uint8))

    def unroute(self, prefix: str) -> None:
        p = Prefix.parse(prefix)
        name = "routes_v4" if p.family == AF_INET else "routes_v6"
        bpfsys.delete(self.fp.map_fd(name), bytes(abi.route_key(p)))
        if self.dir24 is not None and p.family == AF_INET:
            self.dir24.delete([(int.from_bytes(p.addr, "big"), p.length)])
        if self.v6 is not None and p.family == AF_INET6:
            bpfsys.delete(self.fp.map_fd("v6_hash"), bytes(abi.route_key(p)))  # its length stays
        self._local_v4(p, False)

    def _local_v4(self, p: Prefix, local: bool) -> None:
        """`local_v4` as MapWriter keeps it: p is, or is no longer, a PASS_LOCAL prefix."""
        if p.family != AF_INET:
            return
        fd = self.fp.map_fd("local_v4")
        for items in (self.local_v4.stage([p] if local else [], [] if local else [p]),
                      self.local_v4.commit()):
            if items:  # a new Lab's first: every word, in one call
                bpfsys.update_batch(fd, b"".join(k for k, _ in items),
                                    b"".join(w for _, w in items), len(items))

    def nexthop(self, nh_id: int, ifindex: int, smac: str, dmac: str | None = None, *,
                mtu: int = 0, connected: bool = False, gateway: str | None = None) -> None:
        flags = (abi.FS_NH_CONNECTED if connected else 0) | (abi.FS_NH_RESOLVED if dmac else 0)
        gw = ipaddress.ip_address(gateway) if gateway else None
        family = (AF_INET6 if gw.version == 6 else AF_INET) if gw else 0
        value = bytes(abi.FsNexthop(ifindex, mtu, flags, family, abi.mac(smac),
                                    abi.mac(dmac or "00:00:00:00:00:00"),
                                    abi.gateway(family, gw.packed if gw else None)))
        bpfsys.update(self.fp.map_fd("nexthops"), struct.pack("=I", nh_id), value)
        self.nexthop_bytes[nh_id] = value
        if self.dir24 is not None:
            self.dir24.nexthops_changed({nh_id: value})

    def group(self, group_id: int, members: list[int]) -> None:
        buckets = (ctypes.c_uint32 * abi.FS_GROUP_BUCKETS)(*members)
        bpfsys.update(self.fp.map_fd("groups"), struct.pack("=I", group_id),
                      bytes(abi.FsGroup(len(members), buckets)))

    def neighbour(self, ifindex: int, addr: str, mac: str) -> None:
        ip = ipaddress.ip_address(addr)
        family = AF_INET6 if ip.version == 6 else AF_INET
        key = abi.neigh_key(ifindex, family, ip.packed)
        bpfsys.update(self.fp.map_fd("neighbours"), bytes(key), bytes(abi.FsNeigh(abi.mac(mac), 0)))

    def tx_port(self, ifindex: int) -> None:
        with inside(self.ns):  # the devmap resolves ifindex in the caller's namespace
            self.fp.allow_port(ifindex)

    def config(self, v4: int = abi.FS_HASH_L3, v6: int = abi.FS_HASH_L3, flags: int = 0) -> None:
        table = abi.FS_V4_DIR24 if self.v4_table == "dir24" else abi.FS_V4_LPM
        table6 = abi.FS_V6_HASH if self.v6_table == "hash" else abi.FS_V6_LPM
        bpfsys.update(self.fp.map_fd("config"), struct.pack("=I", 0),
                      bytes(abi.FsConfig(v4, v6, flags, table, table6)))

    def heartbeat(self, fresh_until: int, watched_until: int = 0) -> None:
        """fs_heartbeat, in CLOCK_MONOTONIC_COARSE ns (0: no promise needed)."""
        bpfsys.update(self.fp.map_fd("heartbeat"), struct.pack("=I", 0),
                      bytes(abi.FsHeartbeat(fresh_until, watched_until)))

    def iface(self, ifindex: int, mac: str = "00:00:00:00:00:00", *, pass_v4: int = 0,
              pass_v6: int = 0, flags: int = 0, egress: int = 0) -> None:
        """An interface's entry in `ifaces` (struct fs_iface): its MAC and conditions;
        with egress conditions the port is held out of tx_ports, as Fidelity has it."""
        bpfsys.update(self.fp.map_fd("ifaces"), struct.pack("=I", ifindex),
                      abi.IFACE.pack(pass_v4, pass_v6, flags, egress, bytes(abi.mac(mac)), 0))
        held = set(self.fp.held_ports)
        if egress:
            held.add(ifindex)
        else:
            held.discard(ifindex)
        with inside(self.ns):
            self.fp.hold_ports(held)

    def clear(self) -> None:
        self.heartbeat(0)
        fd = self.fp.map_fd("ifaces")
        for key, value in list(bpfsys.iterate(fd)):
            if any(value):
                bpfsys.update(fd, key, bytes(len(value)))
        with inside(self.ns):
            self.fp.hold_ports(())
        self.iface(INGRESS, ROUTER)  # frames arrive on fsin0 unless a test says otherwise
        for ifindex in self.fp.ports():
            self.fp.forbid_port(ifindex)
        for name in ("routes_v4", "routes_v6", "v6_hash", "nexthops", "groups", "neighbours"):
            fd = self.fp.map_fd(name)
            for key in [k for k, _ in bpfsys.iterate(fd)]:
                bpfsys.delete(fd, key)
        self.clear_counters()
        if self.memory is not None:
            self.memory.clear()
        self.config()

    def clear_counters(self) -> None:
        zero = bytes(ctypes.sizeof(abi.FsCounter))
        for reason in range(abi.FS_REASON_MAX):
            bpfsys.update(self.fp.map_fd("counters"), struct.pack("=I", reason),
                          [zero] * bpfsys.possible_cpus())

    # ------------------------------------------------------------ observation

    def counters(self) -> dict[Reason, tuple[int, int]]:
        """reason -> (packets, bytes) summed over CPUs, non-zero ones only."""
        out = {}
        fd = self.fp.map_fd("counters")
        for reason in Reason:
            per_cpu = bpfsys.lookup(fd, struct.pack("=I", reason))
            assert isinstance(per_cpu, list)
            pkts = sum(abi.FsCounter.from_buffer_copy(v).packets for v in per_cpu)
            nbytes = sum(abi.FsCounter.from_buffer_copy(v).bytes for v in per_cpu)
            if pkts or nbytes:
                out[reason] = (pkts, nbytes)
        return out

    def run(self, frame: bytes, *, repeat: int = 1, ingress: int = 0) -> tuple[int, bytes]:
        ctx = bpfsys.xdp_md(len(frame), ingress or INGRESS)
        with inside(self.ns):
            retval, out, _ = bpfsys.prog_test_run(self.fp.prog_fd, frame, repeat, ctx=ctx)
        return retval, out

    def ifindex(self, ifname: str) -> int:
        with inside(self.ns):
            return socket.if_nametoindex(ifname)
