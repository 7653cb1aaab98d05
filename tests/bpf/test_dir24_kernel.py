"""Both IPv4 tables answer like the kernel FIB (differential, privileged).

A namespace gets a few thousand random IPv4 routes of every length from /8
to /32, crowded into 10.0.0.0/10 so that they overlap: unicast through
nexthop objects and inline gateways, blackhole, unreachable and prohibit.
fibsync's own pipeline (netlink dump -> RIB -> MapWriter on the pinned maps)
loads them, then the kernel table changes (deletes, re-adds with other next
hops or types, new prefixes) and a second dump's diff is written change by
change. Then ``ip -batch`` asks the kernel about 12,000 destinations
(``route get ADDR fibmatch``) and BPF_PROG_TEST_RUN asks the program, once
with the LPM trie and once with DIR-24-8: every answer (next hop, or route
type) must agree, and every unicast answer must come from the fast path's own
table, never from its bpf_fib_lookup fallback.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import re
import socket
import struct
import subprocess
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator

import pytest

from fibsync.fastpath.abi import Reason
from fibsync.fastpath.maps import PinnedMaps
from fibsync.fastpath.program import FastPath
from fibsync.fastpath.writer import MapWriter
from fibsync.model import Snapshot
from fibsync.netlink.source import NetlinkSource
from fibsync.rib import Rib
from tests.bpf.harness import XDP_DROP, XDP_PASS, XDP_REDIRECT, Dir24Memory, Lab, netns, sh

pytestmark = pytest.mark.privileged

GATEWAYS = {f"172.16.{i}.2": f"02:00:00:00:0{i}:02" for i in range(4)}
NHIDS = {9001 + i: f"172.16.{i}.2" for i in range(4)}  # high ids: FRR takes the low ones
IN_MAC = "02:00:00:00:00:0a"
SAMPLES = 12_000

# what `ip route get` says when it finds no unicast route
KERNEL_ERRORS = {"Invalid argument": "blackhole", "No route to host": "unreachable",
                 "Permission denied": "prohibit", "Network is unreachable": "none"}


def router_lines(in_mac: str, in_addr: str, gateways: dict[str, str], nhids: dict[int, str],
                 own: Callable[[str], str]) -> list[str]:
    """`ip -batch` lines of the router under test (either family): in0 where frames
    arrive (address ``in_addr``), and veth vI to the I-th gateway, its own address
    ``own(gateway)``, the gateway's neighbour entry and nexthop object."""
    lines = [f"link add in0 address {in_mac} type veth peer name in1",
             "link set in0 up", "link set in1 up", f"addr add {in_addr} dev in0"]
    for i, ((gw, mac), nhid) in enumerate(zip(gateways.items(), nhids, strict=True)):
        lines += [f"link add v{i} type veth peer name p{i}", f"link set v{i} up",
                  f"link set p{i} up", f"addr add {own(gw)} dev v{i}",
                  f"neigh replace {gw} lladdr {mac} dev v{i} nud permanent",
                  f"nexthop add id {nhid} via {gw} dev v{i}"]
    return lines


@pytest.fixture
def kernel_ns(unique_prefix: str) -> Iterator[str]:
    with netns(f"{unique_prefix}kfib") as ns:
        ip_batch(ns, router_lines(IN_MAC, "172.16.100.1/24", GATEWAYS, NHIDS,
                                  lambda gw: gw[:-1] + "1/24"))
        # bpf_fib_lookup answers as the kernel forwards
        sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.conf.all.forwarding=1")
        yield ns


def ip_batch(ns: str, lines: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    with tempfile.NamedTemporaryFile("w", suffix=".batch") as f:
        f.write("\n".join(lines) + "\n")
        f.flush()
        done = subprocess.run(["ip", "-n", ns, "-force", "-batch", f.name], capture_output=True,
                              text=True)
    if check and done.returncode != 0:
        raise RuntimeError(done.stderr)
    return done


# ---------------------------------------------------------------- the routes


def prefix(rng: random.Random) -> str:
    length = rng.choices(range(8, 33), weights=[1, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 6, 7, 8, 9,
                                                20, 4, 3, 3, 3, 2, 2, 2, 2, 3])[0]
    n = ((10 << 24) | rng.randrange(1 << 22)) >> (32 - length) << (32 - length)
    return f"{socket.inet_ntoa(n.to_bytes(4, 'big'))}/{length}"


def route_line(rng: random.Random, p: str, nhids: dict[int, str] = NHIDS,
               gateways: dict[str, str] = GATEWAYS) -> str:
    """A random route for p (either family): over a nexthop object, an inline
    gateway (veth vI leads to the I-th gateway), or of another type."""
    kind = rng.choices(["nhid", "via", "blackhole", "unreachable", "prohibit"],
                       weights=[70, 10, 7, 7, 6])[0]
    if kind == "nhid":
        return f"route replace {p} nhid {rng.choice(list(nhids))}"
    if kind == "via":
        i = rng.randrange(len(gateways))
        return f"route replace {p} via {list(gateways)[i]} dev v{i}"
    return f"route replace {kind} {p}"


def destinations(rng: random.Random, prefixes: list[str],
                 random_address: Callable[[random.Random], int] = lambda rng: (
                     10 << 24) | rng.randrange(1 << 22)) -> list[str]:
    """Ends of prefixes, hosts inside them (deleted ones too), random addresses
    (either family: that of the prefixes)."""
    address = type(ipaddress.ip_network(prefixes[0]).network_address)
    out = []
    for p in rng.sample(prefixes, min(len(prefixes), SAMPLES // 4)):
        net = ipaddress.ip_network(p)
        first = int(net.network_address)
        out += [first, first + net.num_addresses - 1, first + rng.randrange(net.num_addresses)]
    while len(out) < SAMPLES:
        out.append(random_address(rng))
    return [str(address(n)) for n in out]


# ---------------------------------------------------------------- the two sides


def kernel_answers(ns: str, dsts: list[str]) -> list[str]:
    """Per destination: the gateway of its route, or its type (or "none")."""
    done = ip_batch(ns, [f"route get {d} fibmatch" for d in dsts], check=False)
    failed: dict[int, str] = {}
    message = ""
    for line in done.stderr.splitlines():
        if line.startswith("RTNETLINK answers: "):
            message = line.removeprefix("RTNETLINK answers: ")
        elif m := re.match(r"Command failed .*:(\d+)$", line):
            failed[int(m.group(1))] = KERNEL_ERRORS[message]
    found = iter(done.stdout.splitlines())
    out = []
    for number in range(1, len(dsts) + 1):
        if number in failed:
            out.append(failed[number])
        else:
            out.append(re.search(r" via (\S+) ", next(found) + " ").group(1))  # type: ignore[union-attr]
    return out


def frame(dst: str) -> bytes:
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + 8, 0, 0, 64, 17, 0,
                      socket.inet_aton("172.16.100.2"), socket.inet_aton(dst))
    words = sum(struct.unpack("!10H", hdr))
    words = (words & 0xFFFF) + (words >> 16)
    csum = ~((words & 0xFFFF) + (words >> 16)) & 0xFFFF
    hdr = hdr[:10] + struct.pack("!H", csum) + hdr[12:]
    eth = bytes.fromhex(IN_MAC.replace(":", "")) + bytes.fromhex("0200000000aa") + b"\x08\x00"
    return eth + hdr + struct.pack("!HHHH", 1234, 53, 8, 0)


def program_answers(lab: Lab, ingress: int, dsts: list[str],
                    frame: Callable[[str], bytes] = frame,
                    gateways: dict[str, str] = GATEWAYS) -> list[str]:
    by_mac = {bytes.fromhex(mac.replace(":", "")): gw for gw, mac in gateways.items()}
    out = []
    for d in dsts:
        retval, data = lab.run(frame(d), ingress=ingress)
        if retval == XDP_REDIRECT:
            out.append(by_mac.get(data[:6], data[:6].hex()))
        elif retval == XDP_DROP:
            out.append("blackhole")
        elif retval == XDP_PASS:
            out.append("pass")
        else:
            out.append(f"action {retval}")
    return out


def dump(ns: str) -> Snapshot:
    class Capture:
        snapshot: Snapshot | None = None

        def __init__(self) -> None:
            self.done = asyncio.Event()

        def before_routes(self, snapshot: Snapshot) -> None:
            return None

        def resync(self, snapshot: Snapshot) -> None:
            self.snapshot = snapshot
            self.done.set()

        def apply(self, changes: list) -> None:  # type: ignore[type-arg]
            pass

    async def run() -> Snapshot:
        sink = Capture()
        task = asyncio.create_task(NetlinkSource(netns=ns).run(sink))
        await sink.done.wait()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert sink.snapshot is not None
        return sink.snapshot

    return asyncio.run(run())


# ---------------------------------------------------------------- the test


def test_lpm_and_dir24_answer_like_the_kernel(fastpath: FastPath, dir24_memory: Dir24Memory,
                                              kernel_ns: str) -> None:
    rng = random.Random(2024)
    lab = Lab(fastpath, kernel_ns, dir24_memory)
    lab.clear()
    dir24_memory.dirty = True  # the writer below fills the table through its own mapping
    for i in range(len(GATEWAYS)):
        lab.tx_port(lab.ifindex(f"v{i}"))
    ingress = lab.ifindex("in0")
    lab.iface(ingress, IN_MAC)

    routes = {prefix(rng): "" for _ in range(3000)}
    lines = {p: route_line(rng, p) for p in routes}
    ip_batch(kernel_ns, list(lines.values()))
    rib = Rib()
    rib.resync(dump(kernel_ns))
    maps = PinnedMaps(fastpath.pin_dir)
    writer = MapWriter(maps)
    writer.write(rib.take_diff())
    assert writer.dir24 is not None and writer.dir24.stats.loads == 1

    # change the kernel table, then write the difference change by change
    gone = rng.sample(sorted(lines), len(lines) // 4)
    changes = [f"route del {p}" for p in gone]
    changes += [route_line(rng, p) for p in rng.sample(sorted(set(lines) - set(gone)),
                                                       len(lines) // 7)]
    changes += [route_line(rng, p) for p in gone[::2]]
    new = [p for p in (prefix(rng) for _ in range(600)) if p not in lines]
    changes += [route_line(rng, p) for p in new]
    ip_batch(kernel_ns, changes)
    rib.resync(dump(kernel_ns))
    diff = rib.take_diff()
    assert sum(e is None for e in diff.routes.values()) > 300
    writer.write(diff)
    assert writer.dir24.stats.deletes > 300 and writer.dir24.stats.adds > 500
    assert writer.unwritten == set() and writer.stats.errors == 0

    dsts = destinations(rng, sorted(lines) + new)

    def use(table: str) -> None:
        lab.v4_table = table
        lab.config()

    answer_like_the_kernel(lab, kernel_ns, ingress, dsts, {t: use for t in ("lpm", "dir24")})


def answer_like_the_kernel(lab: Lab, ns: str, ingress: int, dsts: list[str],
                           tables: dict[str, Callable[[str], None]],
                           frame: Callable[[str], bytes] = frame,
                           gateways: dict[str, str] = GATEWAYS) -> None:
    """The kernel's answer for each destination (`ip route get`), then the program's
    with each table (``tables``: name -> what selects it): every answer the same,
    every unicast one from the fast path's own table."""
    kernel = kernel_answers(ns, dsts)
    kinds = Counter("unicast" if k in gateways else k for k in kernel)
    assert min(kinds.values()) > 200, kinds  # every kind of answer is well represented
    expected = ["pass" if k in ("unreachable", "prohibit", "none") else k for k in kernel]
    for table, select in tables.items():
        select(table)
        lab.clear_counters()
        got = program_answers(lab, ingress, dsts, frame, gateways)
        wrong = [f"{d}: kernel {k}, {table} {g}" for d, k, e, g in
                 zip(dsts, kernel, expected, got, strict=True) if e != g]
        assert wrong == [], f"{len(wrong)} wrong answers, e.g. {wrong[:5]}"
        counted = {reason: packets for reason, (packets, _) in lab.counters().items()}
        assert counted == {k: v for k, v in {
            Reason.FWD_FAST: kinds["unicast"], Reason.DROP_BLACKHOLE: kinds["blackhole"],
            Reason.PASS_UNREACHABLE: kinds["unreachable"] + kinds["prohibit"],
            Reason.PASS_NO_ROUTE: kinds["none"]}.items() if v}, table
