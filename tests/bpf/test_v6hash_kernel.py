"""Both IPv6 tables answer like the kernel FIB (differential, privileged).

The IPv6 twin of test_dir24_kernel.py: a namespace gets a few thousand
random IPv6 routes of every length from /12 to /128, nested inside each
other in a few /32s of 3fff::/20 (RFC 9637) so that a destination meets
many lengths: unicast through nexthop objects and inline gateways,
blackhole, unreachable and prohibit. fibsync's pipeline (netlink dump ->
RIB -> MapWriter on the pinned maps) loads them into the LPM trie and into
the hash per prefix length, the kernel table changes (deletes, which leave
stale lengths, re-adds, new prefixes) and the diff is written. Then ``ip
-batch`` asks the kernel about 12,000 destinations (``route get ADDR
fibmatch``) and BPF_PROG_TEST_RUN asks the program, once with each table:
every answer must agree, and every unicast answer must come from the fast
path's own table.
"""

from __future__ import annotations

import ipaddress
import random
import socket
import struct
from collections.abc import Iterator

import pytest

from fibsync.fastpath import v6hash
from fibsync.fastpath.maps import PinnedMaps
from fibsync.fastpath.program import FastPath
from fibsync.fastpath.writer import MapWriter
from fibsync.rib import Rib
from tests.bpf import test_dir24_kernel as kernel_test
from tests.bpf.harness import Dir24Memory, Lab, netns, sh
from tests.bpf.test_dir24_kernel import dump, ip_batch

pytestmark = pytest.mark.privileged

# as `ip` prints them (2001:db8:ffff::2, not 2001:db8:ffff:0::2)
GATEWAYS = {str(ipaddress.IPv6Address(f"2001:db8:ffff:{i}::2")): f"02:00:00:00:1{i}:02"
            for i in range(4)}
NHIDS = {9101 + i: gw for i, gw in enumerate(GATEWAYS)}
IN_MAC = "02:00:00:00:00:0b"
SOURCE = "2001:db8:ffff:100::2"
BLOCKS = [0x3FFF0000 | b for b in (0x0, 0x1, 0x7, 0x42, 0x123, 0xABC, 0xFFF)]
LENGTHS = [12, 16, 20, 24, 29, 32, 32, 36, 40, 44, 47, 48, 48, 48, 52, 56, 60, 64, 64, 65, 72,
           80, 96, 112, 120, 124, 127, 128]


@pytest.fixture
def kernel_ns(unique_prefix: str) -> Iterator[str]:
    with netns(f"{unique_prefix}k6fib") as ns:
        ip_batch(ns, kernel_test.router_lines(IN_MAC, f"{SOURCE[:-1]}1/64 nodad", GATEWAYS,
                                              NHIDS, lambda gw: gw[:-1] + "1/64 nodad"))
        sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        yield ns


def prefix(rng: random.Random, known: list[str]) -> str:
    """A random prefix, half the time inside one already made (nested lengths)."""
    length = rng.choice(LENGTHS)
    if known and rng.random() < 0.5:
        outer = ipaddress.IPv6Network(rng.choice(known))
        if outer.prefixlen < 128:
            length = rng.choice([n for n in LENGTHS if n > outer.prefixlen] or [128])
            n = int(outer.network_address) | rng.getrandbits(128 - outer.prefixlen)
            return str(ipaddress.IPv6Network((n >> (128 - length) << (128 - length), length)))
    n = rng.choice(BLOCKS) << 96 | rng.getrandbits(96)
    return str(ipaddress.IPv6Network((n >> (128 - length) << (128 - length), length)))


def route_line(rng: random.Random, p: str) -> str:
    return kernel_test.route_line(rng, p, NHIDS, GATEWAYS)


def destinations(rng: random.Random, prefixes: list[str]) -> list[str]:
    return kernel_test.destinations(rng, prefixes,
                                    lambda rng: rng.choice(BLOCKS) << 96 | rng.getrandbits(96))


def frame(dst: str) -> bytes:
    udp = struct.pack("!HHHH", 1234, 53, 8, 0)
    hdr = struct.pack("!IHBB16s16s", 6 << 28, len(udp), 17, 64,
                      socket.inet_pton(socket.AF_INET6, SOURCE),
                      socket.inet_pton(socket.AF_INET6, dst))
    eth = bytes.fromhex(IN_MAC.replace(":", "")) + bytes.fromhex("0200000000ab") + b"\x86\xdd"
    return eth + hdr + udp


def test_lpm_and_hash_answer_like_the_kernel(fastpath: FastPath, dir24_memory: Dir24Memory,
                                             kernel_ns: str) -> None:
    rng = random.Random(2026)
    lab = Lab(fastpath, kernel_ns, dir24_memory)
    lab.clear()
    dir24_memory.dirty = True  # the writer below fills v6_lengths through its own mapping
    for i in range(len(GATEWAYS)):
        lab.tx_port(lab.ifindex(f"v{i}"))
    ingress = lab.ifindex("in0")
    lab.iface(ingress, IN_MAC)

    made: list[str] = []
    for _ in range(3000):
        made.append(prefix(rng, made))
    lines = {p: route_line(rng, p) for p in made}
    ip_batch(kernel_ns, list(lines.values()))
    rib = Rib()
    rib.resync(dump(kernel_ns))
    maps = PinnedMaps(fastpath.pin_dir)
    writers = [MapWriter(maps, v4_table="lpm", v6_table=t) for t in ("lpm", "hash")]
    first = rib.take_diff()
    for w in writers:
        w.write(first)
    hashed = writers[1].v6
    assert hashed is not None

    gone = rng.sample(sorted(lines), len(lines) // 4)
    changes = [f"route del {p}" for p in gone]
    changes += [route_line(rng, p) for p in rng.sample(sorted(set(lines) - set(gone)),
                                                       len(lines) // 7)]
    changes += [route_line(rng, p) for p in gone[::2]]
    new = [p for p in (prefix(rng, made) for _ in range(600)) if p not in lines]
    changes += [route_line(rng, p) for p in new]
    ip_batch(kernel_ns, changes)
    rib.resync(dump(kernel_ns))
    diff = rib.take_diff()
    assert sum(e is None for e in diff.routes.values()) > 300
    for w in writers:
        w.write(diff)
        assert w.unwritten == set() and w.stats.errors == 0
    assert 0 < hashed.deleted < v6hash.REBUILD_AFTER  # stale lengths are in the table

    dsts = destinations(rng, sorted(lines) + new)

    def use(table: str) -> None:
        lab.v6_table = table  # the tables are the writers' (use_v6_table would clear them)
        lab.config()

    kernel_test.answer_like_the_kernel(lab, kernel_ns, ingress, dsts,
                                       {t: use for t in ("lpm", "hash")}, frame, GATEWAYS)
