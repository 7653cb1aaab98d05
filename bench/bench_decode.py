"""Route dump decode speed: fibsync.netlink.decode against pyroute2, same bytes.

Needs root. Installs N IPv4 routes (default 200k, /24s via one gateway) with
`ip -batch` in a throwaway namespace, dumps them raw with the source's dump
code, then times:

  - decode():  fibsync's struct-based decoder over the raw buffers
  - pyroute2:  MarshalRtnl().parse() (what IPRoute.get_routes() runs) over the same buffers
  - end-to-end: NetlinkSource's whole snapshot (socket reads + decode) of the namespace,
    and pyroute2's IPRoute(netns=...).route("dump") of the same routes

Usage: .venv/bin/python bench/bench_decode.py [--routes 200000] [--repeat 3] [--v6]
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import subprocess
import sys
import time
import uuid
from typing import Any

import structlog
from pyroute2 import IPRoute
from pyroute2.netlink.rtnl.marshal import MarshalRtnl

from fibsync.model import AF_INET, AF_INET6, Change, Route
from fibsync.netlink import rtnl as nl
from fibsync.netlink.decode import decode
from fibsync.netlink.rtnl import open_socket, request
from fibsync.netlink.source import NetlinkSource, dump_raw


def sh(*args: str, stdin: str | None = None) -> None:
    subprocess.run(args, input=stdin, text=True, check=True)


def populate(ns: str, count: int, v6: bool) -> None:
    sh("ip", "netns", "add", ns)
    # veth, not dummy: these kernels have no dummy module
    sh("ip", "-n", ns, "link", "add", "name", "bench0", "type", "veth", "peer", "name", "bench1")
    sh("ip", "-n", ns, "link", "set", "bench0", "up")
    sh("ip", "-n", ns, "link", "set", "bench1", "up")
    sh("ip", "-n", ns, "addr", "add", "192.0.2.1/24", "dev", "bench0")
    sh("ip", "-n", ns, "addr", "add", "2001:db8::1/64", "dev", "bench0", "nodad")
    if v6:
        base = int(ipaddress.IPv6Address("2001:db8:1000::"))
        lines = (
            f"route add {ipaddress.IPv6Address(base + (i << 80))}/48 via 2001:db8::2"
            for i in range(count)
        )
    else:
        base = int(ipaddress.IPv4Address("16.0.0.0"))
        lines = (
            f"route add {ipaddress.IPv4Address(base + (i << 8))}/24 via 192.0.2.2"
            for i in range(count)
        )
    sh("ip", "-n", ns, "-batch", "-", stdin="\n".join(lines) + "\n")


async def raw_route_dump(ns: str, family: int) -> list[bytes]:
    sock = open_socket(netns=ns, rcvbuf=4 << 20)
    chunks: list[bytes] = []
    req = request(nl.RTM_GETROUTE, bytes([family]) + bytes(11))

    def keep(chunk: bytes) -> bool:
        chunks.append(chunk)
        return any(m[0] in (nl.NLMSG_DONE, nl.NLMSG_ERROR) for m in decode(chunk))

    try:
        await dump_raw(sock, req, keep)
    finally:
        sock.close()
    return chunks


def time_fibsync(chunks: list[bytes], repeat: int) -> tuple[float, int]:
    best = float("inf")
    routes = 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        routes = 0
        for chunk in chunks:
            for _type, _flags, _seq, payload in decode(chunk):
                if payload.__class__ is Change and payload.obj.__class__ is Route:
                    routes += 1
        best = min(best, time.perf_counter() - t0)
    return best, routes


def time_pyroute2(chunks: list[bytes]) -> tuple[float, int]:
    marshal = MarshalRtnl()
    t0 = time.perf_counter()
    routes = 0
    for chunk in chunks:
        for msg in marshal.parse(chunk):
            if msg["header"]["type"] == nl.RTM_NEWROUTE:
                msg.get_attr("RTA_DST")  # what a consumer reads at least
                routes += 1
    return time.perf_counter() - t0, routes


def time_pyroute2_dump(ns: str, family: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    with IPRoute(netns=ns) as ipr:
        routes = sum(1 for _ in ipr.route("dump", family=family))
    return time.perf_counter() - t0, routes


async def time_end_to_end(ns: str) -> tuple[float, int]:
    source = NetlinkSource(netns=ns, log=_quiet())
    t0 = time.perf_counter()
    snapshot = await source.dump()
    return time.perf_counter() - t0, len(snapshot.routes)


def _quiet() -> Any:
    return structlog.wrap_logger(structlog.ReturnLogger())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--routes", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--v6", action="store_true", help="IPv6 /48s instead of IPv4 /24s")
    parser.add_argument("--skip-pyroute2", action="store_true")
    args = parser.parse_args()

    ns = f"fsbench{uuid.uuid4().hex[:6]}"
    try:
        t0 = time.perf_counter()
        populate(ns, args.routes, args.v6)
        print(f"installed {args.routes} routes with ip -batch in {time.perf_counter() - t0:.1f} s")
        family = AF_INET6 if args.v6 else AF_INET
        t0 = time.perf_counter()
        chunks = asyncio.run(raw_route_dump(ns, family))
        size = sum(map(len, chunks))
        print(
            f"raw dump: {len(chunks)} buffers, {size / 1e6:.1f} MB "
            f"in {time.perf_counter() - t0:.2f} s"
        )

        seconds, routes = time_fibsync(chunks, args.repeat)
        print(
            f"fibsync decode : {routes:>8} routes {seconds:7.3f} s "
            f"{routes / seconds:>12,.0f} routes/s"
        )
        if not args.skip_pyroute2:
            p_seconds, p_routes = time_pyroute2(chunks)
            print(
                f"pyroute2 parse : {p_routes:>8} routes {p_seconds:7.3f} s "
                f"{p_routes / p_seconds:>12,.0f} routes/s   ({p_seconds / seconds:.1f}x slower)"
            )
        e_seconds, e_routes = asyncio.run(time_end_to_end(ns))
        print(
            f"full snapshot  : {e_routes:>8} routes {e_seconds:7.3f} s "
            f"{e_routes / e_seconds:>12,.0f} routes/s   (all dumps, socket reads + decode)"
        )
        if not args.skip_pyroute2:
            d_seconds, d_routes = time_pyroute2_dump(ns, family)
            print(
                f"pyroute2 dump  : {d_routes:>8} routes {d_seconds:7.3f} s "
                f"{d_routes / d_seconds:>12,.0f} routes/s   (IPRoute.route('dump'), one family)"
            )
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
