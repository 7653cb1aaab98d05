"""Fidelity (issue 12), randomised: what leaves r is the same, frame for frame, with fibsync or not.

At least 10,000 random frames leave h1 for r (tests/netns/fidelity.py: the
topology, sending and catching): once with r's kernel alone, once with fibsync
attached. Every host's veth is watched; the multisets of (receiving host, frame
bytes) must be equal, after the normalisation ``fidelity.normalise`` documents
(the identification, and IPv4 header checksum, of packets r originates; frames
padded to Ethernet's 60 bytes). This runs four times: with no condition, with
rp_filter strict on r's ingress, with rp_filter loose, and under policy rules
(the fast path then checks the source, or applies the rules, itself).

A fifth run sends frames a router must refuse or repair, each random frame
spoilt one way (``MUTATIONS``: a wrong IPv4 header checksum, a destination MAC
not r's, bytes after the IP packet, an IP length too short or too long, ...).

The frames: destinations in r's table and around it (inside a route, just
outside, unrouted, unreachable/blackhole/prohibit routes, r's own addresses,
its hosts, link network and broadcast addresses, multicast, hairpins back to
h1's side), sources mostly h1's but also spoofed, unrouted, r's own and
martian; TTL or hop limit 1 to 3 (some 64); sizes around the 1400-byte MTU of
r's link to h2, with and without DF; IPv4 options, IPv4 fragments and IPv6
fragment headers, IPv6 extension headers; UDP, TCP, ICMP and other protocols,
some with a wrong layer-4 checksum. The IPv4 timestamp option is left out: r
writes its clock into it.

r answers every packet it should: its ICMP rate limits are off (both runs must
send every error; ip_error()'s own bucket is met by the choice of sources, see
V4_IP_ERROR), it sends no ICMP redirects (they are rate limited per
destination over tens of seconds, so two runs would not send the same number),
its hosts are permanent neighbour entries, and the on-link addresses nobody owns
fail resolution in 0.3 s, within the run. ARP and neighbour discovery are not
compared (timers decide them); nor is the number of r's answers to a failed
resolution (a race in the kernel decides it: ``fidelity.answered_unresolved``),
only which destinations got one. No ECMP: the fast path's multipath hash is not
the kernel's.

``FIDELITY_SEED`` replays a run (the seed is printed, and named on a failure);
``FIDELITY_FRAMES`` changes the number of frames.
"""

from __future__ import annotations

import ipaddress
import os
import random
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterator

import pytest

from .fidelity import (
    LINKS,
    Router,
    Topology,
    answered_unresolved,
    counter_delta,
    describe,
    exchange,
    fast_path_carries,
    multiset,
)

pytestmark = [pytest.mark.privileged, pytest.mark.slow]

FRAMES = int(os.environ.get("FIDELITY_FRAMES", "10000"))

ROUTER_SYSCTLS = {
    # (the topology switches r's ICMP rate limits off: fidelity.ICMP_UNLIMITED)
    # redirects are rate limited per peer over ~20 s: not reproducible between runs
    **{f"net.ipv4.conf.{i}.send_redirects": 0
       for i in ("all", "default", *(link.router_if for link in LINKS))},
    # an on-link destination nobody owns fails resolution after 3 probes, and r then
    # answers each packet it queued with host/address unreachable: 0.3 s, not 3 s, so
    # that those answers arrive within the run that caused them
    **{f"net.ipv{v}.neigh.{link.router_if}.retrans_time_ms": 100
       for v in (4, 6) for link in LINKS},
    # ... and every packet waiting for that resolution fits in its queue: which ones
    # an overflow drops (silently) would depend on timing
    **{f"net.ipv{v}.neigh.{link.router_if}.unres_qlen_bytes": 16 << 20
       for v in (4, 6) for link in LINKS},
}
# seconds without a frame that end a run: longer than a failed resolution (above)
QUIET = 1.0
FORWARDED = ("FWD_FAST", "FWD_RULES")  # policy rules: bpf_fib_lookup forwards
# On-link destinations nobody owns: their resolution fails. How many of the packets
# queued behind a failure r answers is a race in the kernel
# (fidelity.answered_unresolved): the runs are compared on which of these were
# answered, not on how often.
UNRESOLVED_V4 = ("192.0.2.0", "198.51.100.0", "198.51.100.4")
UNRESOLVED_V6 = ("2001:db8:2::99", "2001:db8:3::abcd")
RACY = frozenset(ipaddress.ip_address(a).packed for a in UNRESOLVED_V4 + UNRESOLVED_V6)


# --- building frames ---------------------------------------------------------------


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071): 2^16 = 1 modulo 0xffff, so the one's complement
    sum of the 16-bit words is the number modulo 0xffff."""
    if len(data) % 2:
        data += b"\0"
    n = int.from_bytes(data, "big")
    s = n % 0xFFFF
    if s == 0 and n:
        s = 0xFFFF
    return ~s & 0xFFFF


def _addr(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def pseudo(src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    if len(src) == 4:
        return src + dst + struct.pack("!BBH", 0, proto, length)
    return src + dst + struct.pack("!I3xB", length, proto)


def l4(rng: random.Random, proto: int, src: bytes, dst: bytes, size: int) -> bytes:
    """A layer-4 segment of ``size`` bytes (at least its header), checksummed; one in
    twenty carries a wrong checksum (a router forwards it all the same)."""
    if proto == 17:
        body = rng.randbytes(max(0, size - 8))
        sport, dport = rng.choice((53, 123, 5000, 5001, 33434)), rng.randrange(1, 65536)
        seg = struct.pack("!HHHH", sport, dport, 8 + len(body), 0) + body
        where = 6
    elif proto == 6:
        body = rng.randbytes(max(0, size - 20))
        flags = rng.choice((0x02, 0x10, 0x18, 0x11, 0x04, 0x12, 0x29))
        seg = struct.pack("!HHIIBBHHH", rng.randrange(1024, 65536), rng.choice((22, 80, 179, 443)),
                          rng.getrandbits(32), rng.getrandbits(32), 5 << 4, flags,
                          rng.randrange(1, 65536), 0, 0) + body
        where = 16
    elif proto in (1, 58):
        body = rng.randbytes(max(0, size - 8))
        kind = (8 if proto == 1 else 128) if rng.random() < 0.8 else \
            rng.choice((0, 3, 11) if proto == 1 else (1, 129, 4))
        seg = struct.pack("!BBHHH", kind, 0, 0, rng.getrandbits(16), rng.getrandbits(16)) + body
        where = 2
    else:
        return rng.randbytes(size)
    head = pseudo(src, dst, proto, len(seg)) if proto != 1 else b""
    c = checksum(head + seg)
    if proto == 17 and c == 0:
        c = 0xFFFF
    if rng.random() < 0.05:
        c ^= 0x5A5A
    return seg[:where] + struct.pack("!H", c) + seg[where + 2:]


def fragment(rng: random.Random, seg: bytes, room: int) -> tuple[bytes, int, bool]:
    """A piece of a datagram longer than ``seg`` (its first piece, or one further on),
    at most ``room`` bytes: (piece, offset in bytes, more fragments)."""
    seg += rng.randbytes(rng.randrange(0, 600))
    off = rng.randrange(0, max(1, (len(seg) - 8) // 8)) * 8 if rng.random() < 0.6 else 0
    piece = seg[off:off + max(8, room) // 8 * 8]
    more = off + len(piece) < len(seg)
    return piece, off, more


V4_OPTIONS: tuple[bytes, ...] = (
    b"\x01\x01\x01\x01",  # NOPs
    b"\x07\x0b\x04" + bytes(8) + b"\x00",  # record route, room for two
    b"\x07\x07\x08" + bytes(4) + b"\x00",  # record route, full: nothing to write
    b"\x94\x04\x00\x00",  # router alert
    b"\x83\x0b\x04" + _addr("203.0.113.10") + _addr("203.0.113.130") + b"\x00",  # LSRR
    b"\x07\x02\x04\x00",  # record route of length 2: malformed, parameter problem
    b"\x9e\x04\x00\x00",  # an unknown option
    b"\x82\x0b" + bytes(9) + b"\x00",  # security (RFC 1108)
)


def ipv4(rng: random.Random, src: bytes, dst: bytes, proto: int, total: int,
         ttl: int) -> bytes:
    options = rng.choice(V4_OPTIONS) if rng.random() < 0.1 else b""
    hlen = 20 + len(options)
    seg = l4(rng, proto, src, dst, max(total - hlen, 8))
    flags = 0x4000 if rng.random() < 0.5 else 0
    if rng.random() < 0.08:
        seg, off, more = fragment(rng, seg, total - hlen)
        flags = (0x2000 if more else 0) | (off // 8) | (flags if rng.random() < 0.3 else 0)
    tos = rng.choice((0, 0, 0x10, 0xB8, 0x01, 0x03))
    header = struct.pack("!BBHHHBBH4s4s", 0x40 | (hlen // 4), tos, hlen + len(seg),
                         rng.getrandbits(16), flags, ttl, proto, 0, src, dst) + options
    header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    return header + seg


def ipv6(rng: random.Random, src: bytes, dst: bytes, proto: int, total: int,
         hops: int) -> bytes:
    ext = b""
    first = proto
    pick = rng.random()
    if pick < 0.06:  # hop-by-hop: PadN, or a router alert
        first, ext = 0, bytes([proto, 0]) + rng.choice((b"\x01\x04\x00\x00\x00\x00",
                                                        b"\x05\x02\x00\x00\x01\x00"))
    elif pick < 0.11:  # destination options
        first, ext = 60, bytes([proto, 0]) + b"\x01\x04\x00\x00\x00\x00"
    elif pick < 0.14:  # a type 0 routing header, one segment left
        first, ext = 43, bytes([proto, 2, 0, 1]) + bytes(4) + _addr("2001:db8:ee::9")
    elif pick < 0.22:  # a fragment
        first = 44
    if first == 44:
        seg, off, more = fragment(rng, l4(rng, proto, src, dst, max(total - 48, 8)), total - 48)
        ext = struct.pack("!BBHI", proto, 0, off | int(more), rng.getrandbits(32))
    else:
        seg = l4(rng, proto, src, dst, max(total - 40 - len(ext), 8))
    flow = (rng.choice((0, 0, 0x2E, 0xB8)) << 20) | rng.getrandbits(20)
    header = struct.pack("!IHBB16s16s", (6 << 28) | flow, len(ext) + len(seg), first, hops,
                         src, dst)
    return header + ext + seg


# --- choosing addresses ------------------------------------------------------------


def _in(rng: random.Random, net: str) -> str:
    n = ipaddress.ip_network(net)
    return str(n[rng.randrange(n.num_addresses)])


Choices = tuple[tuple[float, Callable[[random.Random], str]], ...]


def weighted(rng: random.Random, table: Choices) -> tuple[str, int]:
    """An address from the table, and the index of the row it came from."""
    x = rng.random() * sum(w for w, _ in table)
    for i, (w, pick) in enumerate(table):
        x -= w
        if x < 0:
            return pick(rng), i
    return table[-1][1](rng), len(table) - 1


def one_of(*items: str) -> Callable[[random.Random], str]:
    return lambda rng: rng.choice(items)


def within(net: str) -> Callable[[random.Random], str]:
    return lambda rng: _in(rng, net)


V4_ROUTED: Choices = (
    (30, within("203.0.113.128/25")),  # via h2, MTU 1400
    (20, within("203.0.113.0/26")),  # via h3
    (4, one_of("203.0.113.128", "203.0.113.255", "203.0.113.0", "203.0.113.63")),  # edges
    (3, within("203.0.113.112/28")),  # blackhole, 203.0.113.127 just outside the /25 among them
    (4, one_of("192.0.2.1", "198.51.100.1", "198.51.100.5")),  # r itself
    (4, one_of("198.51.100.2", "198.51.100.6")),  # h2, h3 themselves
    (3, one_of("192.0.2.3", "198.51.100.3", "198.51.100.7")),  # link broadcast
    (2, one_of(*UNRESOLVED_V4)),  # on-link, nobody's: unresolved
    (3, one_of("192.0.2.2", "192.0.2.70", "198.51.100.130")),  # back to h1's side: a hairpin
    (2, one_of("224.0.0.1", "239.1.2.3", "255.255.255.255")),  # multicast, broadcast
)
# Routes ip_error() answers (no route, unreachable, prohibit). It rate limits its ICMP
# per source address with a token bucket of its own (5 at once, then 1 a second:
# net.ipv4.route.error_burst and error_cost, which exist in the initial namespace
# only). Packets to them take their source from POOL_V4 in turn, so that no source
# draws more than two of those errors in a run: both runs send them all.
V4_IP_ERROR: Choices = (
    (2, one_of("203.0.113.64", "192.0.2.4", "198.51.100.8", "198.51.100.127")),  # just outside
    (2, within("203.0.113.64/28")),  # unrouted
    (1.5, within("203.0.113.96/28")),  # unreachable
    (1.5, within("203.0.113.80/28")),  # prohibit
    (1, one_of("192.0.2.60", "198.51.100.100", "203.0.113.79")),  # unrouted elsewhere
)
V4_DESTINATIONS = V4_ROUTED + V4_IP_ERROR
IP_ERROR_ROWS = len(V4_ROUTED)  # rows from here on are V4_IP_ERROR's
POOL_V4 = [str(a) for net in ("192.0.2.64/26", "192.0.2.128/25", "198.51.100.128/25")
           for a in ipaddress.ip_network(net)]
V4_SOURCES: Choices = (
    (70, one_of("192.0.2.2")),  # h1
    (10, within("192.0.2.64/26")),  # h1's side, routed via h1
    (5, one_of("203.0.113.200", "203.0.113.5", "198.51.100.2")),  # spoofed: r routes elsewhere
    (4, one_of("198.51.100.100", "203.0.113.70")),  # r has no route back
    (3, one_of("192.0.2.1", "198.51.100.1")),  # r's own: martian
    (3, one_of("0.0.0.0", "127.0.0.1", "224.0.0.5", "255.255.255.255", "192.0.2.3")),
)
V6_DESTINATIONS: Choices = (
    (30, within("2001:db8:ff::/48")),  # via h2, MTU 1400
    (20, within("2001:db8:ee::/48")),  # via h3
    (4, one_of("2001:db8:fe:ffff:ffff:ffff:ffff:ffff", "2001:db8:100::", "2001:db8:ef::1",
               "2001:db8:ed:ffff:ffff:ffff:ffff:ffff")),  # just outside
    (3, within("2001:db8:dd::/48")),  # unreachable
    (3, within("2001:db8:cc::/48")),  # blackhole
    (3, within("2001:db8:bb::/48")),  # prohibit
    (3, one_of("2001:db8:99::1", "2001:db8:4::1")),  # unrouted
    (4, one_of("2001:db8:1::1", "2001:db8:2::1", "2001:db8:3::1", "2001:db8:2::")),  # r
    (4, one_of("2001:db8:2::2", "2001:db8:3::2")),  # h2, h3
    (2, one_of(*UNRESOLVED_V6)),  # on-link, nobody's: unresolved
    (3, one_of("2001:db8:1::2", "2001:db8:10::7")),  # back to h1's side: a hairpin
    (2, one_of("ff02::1", "ff0e::1", "ff05::2")),  # multicast
)
V6_SOURCES: Choices = (
    (70, one_of("2001:db8:1::2")),
    (10, within("2001:db8:10::/64")),
    (5, one_of("2001:db8:ff::99", "2001:db8:2::2")),  # spoofed
    (4, one_of("2001:db8:99::1",)),  # unrouted
    (3, one_of("2001:db8:1::1", "2001:db8:3::1")),  # r's own
    (3, one_of("::1", "::", "ff02::1", "::ffff:192.0.2.2")),  # martian
)


# IP packet sizes: small ones, and many around the MTU (1400) of r's link to h2
SIZES = ((28, 300), (300, 1360), (1360, 1501), (1390, 1411))


def random_frames(topo: Topology, rng: random.Random, count: int) -> list[bytes]:
    """``count`` frames from h1 to r's MAC on their link."""
    eth4 = topo.router_mac("h1") + topo.host_mac("h1") + b"\x08\x00"
    eth6 = topo.router_mac("h1") + topo.host_mac("h1") + b"\x86\xdd"
    h1_ll = str(topo.link_local["h1-r"])
    r_ll = str(topo.link_local["r-h1"])
    frames = []
    pooled = 0
    for _ in range(count):
        six = rng.random() < 0.45
        low, high = rng.choice(SIZES)
        size = rng.randrange(max(low, 48 if six else 28), high)
        hops = rng.choice((1, 2, 2, 3, 3, 64))
        if six:
            dst = r_ll if rng.random() < 0.01 else weighted(rng, V6_DESTINATIONS)[0]
            src = h1_ll if rng.random() < 0.03 else weighted(rng, V6_SOURCES)[0]
            proto = rng.choice((17, 17, 17, 6, 6, 58, 58, 59, 50, 132))
            frames.append(eth6 + ipv6(rng, _addr(src), _addr(dst), proto, size, hops))
        else:
            dst, row = weighted(rng, V4_DESTINATIONS)
            if row >= IP_ERROR_ROWS:
                src, pooled = POOL_V4[pooled % len(POOL_V4)], pooled + 1
            else:
                src = weighted(rng, V4_SOURCES)[0]
            proto = rng.choice((17, 17, 17, 6, 6, 1, 1, 47, 50, 132, 253))
            frames.append(eth4 + ipv4(rng, _addr(src), _addr(dst), proto, size, hops))
    return frames


# --- frames a router must refuse ------------------------------------------------------


def _v4_header_fixed(frame: bytes) -> bytes:
    """The frame with its IPv4 header checksum computed again."""
    ihl = (frame[14] & 0x0F) * 4
    header = frame[14:24] + b"\0\0" + frame[26:14 + max(ihl, 20)]
    return frame[:24] + struct.pack("!H", checksum(header)) + frame[26:]


def _bad_checksum(rng: random.Random, f: bytes) -> bytes:
    return f[:24] + bytes([f[24] ^ 0x10]) + f[25:] if f[12:14] == b"\x08\x00" else f


def _foreign_mac(rng: random.Random, f: bytes) -> bytes:
    return bytes.fromhex("00005e005301") + f[6:]  # RFC 7042's documentation unicast MAC


def _broadcast_mac(rng: random.Random, f: bytes) -> bytes:
    return b"\xff" * 6 + f[6:]


def _trailing(rng: random.Random, f: bytes) -> bytes:
    """Bytes after the IP packet: a short frame padded to Ethernet's 60 with zeros, as
    a NIC pads it, or a longer one with a few random bytes behind its IP length."""
    if len(f) < 60:
        return f + bytes(60 - len(f))
    return f + rng.randbytes(rng.randrange(1, 17))


def _truncated(rng: random.Random, f: bytes) -> bytes:
    return f[:max(15, len(f) - rng.randrange(1, 41))]


def _ihl_4(rng: random.Random, f: bytes) -> bytes:
    if f[12:14] != b"\x08\x00":
        return f
    return _v4_header_fixed(f[:14] + bytes([0x44]) + f[15:])


def _version(rng: random.Random, f: bytes) -> bytes:
    return f[:14] + bytes([(0x60 if f[12:14] == b"\x08\x00" else 0x40) | (f[14] & 0x0F)]) + f[15:]


def _hops_0(rng: random.Random, f: bytes) -> bytes:
    if f[12:14] == b"\x08\x00":
        return _v4_header_fixed(f[:22] + b"\0" + f[23:])
    return f[:21] + b"\0" + f[22:]


def _vlan(rng: random.Random, f: bytes) -> bytes:
    return f[:12] + b"\x81\x00\x00\x07" + f[12:]


def _short_length(rng: random.Random, f: bytes) -> bytes:
    """An IP length shorter than the packet: IPv4 total length below its own header, or
    an IPv6 payload length 8 short."""
    if f[12:14] == b"\x08\x00":
        return _v4_header_fixed(f[:16] + struct.pack("!H", 10) + f[18:])
    plen = struct.unpack("!H", f[18:20])[0]
    return f[:18] + struct.pack("!H", max(0, plen - 8)) + f[20:]


MUTATIONS: dict[str, Callable[[random.Random, bytes], bytes]] = {
    "ipv4 header checksum wrong": _bad_checksum,
    "destination MAC not r's": _foreign_mac,
    "destination MAC broadcast": _broadcast_mac,
    "bytes after the IP packet": _trailing,
    "frame shorter than its IP length": _truncated,
    "ipv4 ihl 4": _ihl_4,
    "IP version not the ethertype's": _version,
    "TTL / hop limit 0": _hops_0,
    "802.1Q tagged": _vlan,
    "IP length too short": _short_length,
}


def origin_key(frame: bytes) -> bytes:
    return frame[26:90]


def odd_frames(topo: Topology, rng: random.Random, count: int) -> tuple[list[bytes],
                                                                         dict[bytes, str]]:
    """``count`` random frames, each spoilt by one of MUTATIONS; and the mutation by
    ``origin_key`` (the addresses and first layer-4 bytes, which forwarding keeps)."""
    frames, origin = [], {}
    names = sorted(MUTATIONS)
    for base in random_frames(topo, rng, count):
        frame = base
        # spoilt, and no longer than h1's veth sends (a tag or trailing bytes may not fit)
        while frame == base or len(frame) > 1514:
            name = rng.choice(names)
            frame = MUTATIONS[name](rng, base)
        frames.append(frame)
        origin[origin_key(frame)] = name
    return frames, origin


# --- the tests ---------------------------------------------------------------------

# Kernel state both runs hold (set before the kernel's run; fibsync starts with it in
# place): each makes the fast path check the source or the rules itself, per packet.
CONDITIONS: dict[str, tuple[str, ...]] = {
    "no_condition": (),
    "rp_filter_strict": ("sysctl -qw net.ipv4.conf.r-h1.rp_filter=1",),
    "rp_filter_loose": ("sysctl -qw net.ipv4.conf.all.rp_filter=2",),
    "policy_rules": ("ip rule add from 192.0.2.64/26 lookup 100",
                     "ip -6 rule add from 2001:db8:10::/64 lookup 100"),
}


@pytest.fixture
def topo(unique_prefix: str) -> Iterator[Topology]:
    t = Topology(unique_prefix).up()
    try:
        for key, value in ROUTER_SYSCTLS.items():
            t.r.sysctl(key, value)
        t.permanent_neighbours()
        yield t
    finally:
        t.down()



def seed() -> int:
    value = os.environ.get("FIDELITY_SEED")
    return int(value) if value else random.SystemRandom().randrange(1 << 32)


def source(frame: bytes) -> str:
    """The IP source address of a frame, for a summary of the differences."""
    if frame[12:14] == b"\x08\x00" and len(frame) >= 30:
        return str(ipaddress.IPv4Address(frame[26:30]))
    if frame[12:14] == b"\x86\xdd" and len(frame) >= 38:
        return str(ipaddress.IPv6Address(frame[22:38]))
    return "not IP"


def differential(topo: Topology, router: Router, frames: list[bytes], chosen: int,
                 origin: dict[bytes, str] | None = None) -> dict[str, int]:
    """Both runs of ``frames``; fails naming the first differing frames decoded, their
    origin (``origin``: spoilt frames, whose veth drops belong to the comparison), and
    fibsync's counters. Returns those counters."""
    started = time.monotonic()
    lossless = origin is None
    kernel = exchange(topo, frames, lossless, quiet=QUIET)
    router.start()
    fast_path_carries(topo, router, reasons=FORWARDED)
    before = router.counters()
    fibsync = exchange(topo, frames, lossless, quiet=QUIET)
    counted = counter_delta(before, router.counters())
    want, got = multiset(kernel, topo, RACY), multiset(fibsync, topo, RACY)
    by_host = Counter(host for host, _ in want.elements())
    print(f"kernel run {kernel.seconds:.1f} s ({len(kernel.frames)} frames caught), fibsync "
          f"run {fibsync.seconds:.1f} s ({len(fibsync.frames)}); both with fibsync's start "
          f"{time.monotonic() - started:.1f} s\ncaught per host (kernel run, compared): "
          f"{dict(sorted(by_host.items()))}\nfibsync's reasons: "
          f"{dict(sorted(counted.items(), key=lambda kv: -kv[1]))}")
    answered = answered_unresolved(kernel, RACY), answered_unresolved(fibsync, RACY)
    assert answered[0] == answered[1], (
        f"seed {chosen}: failed resolutions answered, kernel alone {sorted(answered[0])}, "
        f"with fibsync {sorted(answered[1])} (replay: FIDELITY_SEED={chosen})")
    if want != got:
        missing, extra = want - got, got - want
        lines = [f"seed {chosen}: {sum(missing.values())} frames only with the kernel alone, "
                 f"{sum(extra.values())} only with fibsync (replay: FIDELITY_SEED={chosen})",
                 f"fibsync's reason counters over the run: {counted}",
                 f"veth drops: kernel run {kernel.link_drops}, fibsync run {fibsync.link_drops}"]
        for title, diff in (("only with the kernel alone", missing), ("only with fibsync", extra)):
            lines.append(f"{title}:")
            sources = Counter(source(frame) for (_, frame) in diff.elements())
            lines.append(f"  by source address: {dict(sources.most_common(6))}")
            if origin is not None:
                kinds = Counter(origin.get(origin_key(frame), "?")
                                for (_, frame) in diff.elements())
                lines.append(f"  from: {dict(kinds.most_common())}")
            for (host, frame), n in list(diff.items())[:40]:
                lines.append(f"  {n} x at {host}: {describe(frame)}")
        pytest.fail("\n".join(lines))
    # the comparison means something: r's kernel answered (ICMP to h1) in both runs,
    # frames reached both other hosts
    assert by_host["h1"] >= len(frames) // 20 and by_host["h2"] and by_host["h3"], by_host
    return counted


@pytest.mark.parametrize("conditions", CONDITIONS, ids=str)
def test_random_frames_leave_r_as_with_the_kernel_alone(topo: Topology, router: Router,
                                                        conditions: str) -> None:
    chosen = seed()
    print(f"\nfidelity random ({conditions}): FIDELITY_SEED={chosen} FIDELITY_FRAMES={FRAMES}")
    for line in CONDITIONS[conditions]:
        topo.r.run(line)
    frames = random_frames(topo, random.Random(chosen), FRAMES)
    counted = differential(topo, router, frames, chosen)
    # and the fast path carried a good share of them itself
    forwarded = sum(n for reason, n in counted.items() if reason.startswith("FWD_"))
    assert forwarded >= FRAMES // 5, counted


def test_frames_a_router_must_refuse_are_refused_as_by_the_kernel(
        topo: Topology, router: Router) -> None:
    """Malformed frames, frames not for r, frames the kernel trims or drops: r's kernel
    alone and fibsync must leave the same frames (2,000 random frames, each spoilt)."""
    chosen = seed()
    print(f"\nfidelity odd frames: FIDELITY_SEED={chosen}")
    frames, origin = odd_frames(topo, random.Random(chosen), max(FRAMES // 5, 1000))
    differential(topo, router, frames, chosen, origin)
