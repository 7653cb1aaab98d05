"""Per-packet cost of the XDP program over a full table, side by side (BPF_PROG_TEST_RUN).

    .venv/bin/python bench/bench_xdp.py [--v4 1000000] [--v6 250000] [--samples 256]

One namespace holds the full table (nexthop objects, as FRR installs it). Two
instances of the same XDP program are loaded there:

- ``fast``: maps written by fibsync from the kernel table: packets hit the
  fast path's own tables (reason FWD_FAST);
- ``fib``: empty route maps, so every packet goes to ``bpf_fib_lookup`` over
  the kernel's FIB (reason FWD_FIB) — what a plain bpf_fib_lookup forwarder costs.

Destinations are a random sample of the installed prefixes; each is run with a
``repeat`` well below the TTL (test runs reuse the buffer). Prints ns/packet
for each path and the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import platform
import random
import socket
import statistics
import struct
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fulltable import install, v4_prefixes, v6_prefixes  # noqa: E402
from profile_sync import dump  # noqa: E402

from fibsync import netns  # noqa: E402
from fibsync.fastpath import bpfsys  # noqa: E402
from fibsync.fastpath.maps import PinnedMaps  # noqa: E402
from fibsync.fastpath.program import FastPath, remove  # noqa: E402
from fibsync.fastpath.writer import MapWriter  # noqa: E402
from fibsync.lab import Netns  # noqa: E402
from fibsync.rib import Rib  # noqa: E402

REPEAT = 100


def frame(dst: str, src: str) -> bytes:
    ip = ipaddress.ip_address(dst)
    eth = b"\x02\x00\x00\x00\x00\x01" + b"\x02\x00\x00\x00\x00\x02"
    payload = struct.pack("!HHHH", 1234, 5678, 8 + 18, 0) + bytes(18)
    if ip.version == 4:
        hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0, 255, 17, 0,
                          ipaddress.ip_address(src).packed, ip.packed)
        csum = sum(struct.unpack("!10H", hdr))
        csum = (csum & 0xFFFF) + (csum >> 16)
        csum = ~((csum & 0xFFFF) + (csum >> 16)) & 0xFFFF
        hdr = hdr[:10] + struct.pack("!H", csum) + hdr[12:]
        return eth + b"\x08\x00" + hdr + payload
    hdr = struct.pack("!IHBB16s16s", 6 << 28, len(payload), 17, 255,
                      ipaddress.ip_address(src).packed, ip.packed)
    return eth + b"\x86\xdd" + hdr + payload


def host_in(prefix: str, rng: random.Random) -> str:
    net = ipaddress.ip_network(prefix)
    return str(net.network_address + rng.randrange(min(net.num_addresses, 1 << 16)))


def measure(fp: FastPath, frames: list[bytes], ingress: int) -> tuple[float, dict[int, int]]:
    costs, actions = [], {}
    for f in frames:
        ret, _, ns = bpfsys.prog_test_run(fp.prog_fd, f, REPEAT,
                                          ctx=bpfsys.xdp_md(len(f), ingress))
        costs.append(ns)
        actions[ret] = actions.get(ret, 0) + 1
    return statistics.median(costs), actions


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--v4", type=int, default=1_000_000)
    ap.add_argument("--v6", type=int, default=250_000)
    ap.add_argument("--samples", type=int, default=256)
    args = ap.parse_args()
    name = f"fsx{uuid.uuid4().hex[:6]}"
    ns = Netns(name).create()
    fast = fib = None
    try:
        install(name, args.v4, args.v6)
        # bpf_fib_lookup honours the forwarding sysctls, as the kernel does
        ns.sysctl("net.ipv4.conf.all.forwarding", 1)
        ns.sysctl("net.ipv6.conf.all.forwarding", 1)
        netns.enter(name)
        ifindex = {f"b{i}": socket.if_nametoindex(f"b{i}") for i in range(4)}
        fast = FastPath.load(f"{name}f")
        fib = FastPath.load(f"{name}b")
        rib = Rib()
        rib.resync(asyncio.run(dump()))
        MapWriter(PinnedMaps(fast.pin_dir)).write(rib.take_diff())
        for fp in (fast, fib):
            for idx in ifindex.values():
                key = struct.pack("=I", idx)
                bpfsys.update(fp.map_fd("tx_ports"), key, key)
        rng = random.Random(5)
        results = {}
        for family, prefixes, src in (("IPv4", v4_prefixes(args.v4), "198.18.0.2"),
                                      ("IPv6", v6_prefixes(args.v6), "2001:db8:ff00::2")):
            sample = rng.sample(prefixes, min(args.samples, len(prefixes)))
            frames = [frame(host_in(p, rng), src) for p in sample]
            row = {}
            for label, fp in (("fast path (LPM trie)", fast), ("bpf_fib_lookup", fib)):
                cost, actions = measure(fp, frames, ifindex["b0"])
                row[label] = {"ns_per_packet": round(cost, 1), "actions": actions}
            row["ratio_fast_to_fib"] = round(row["fast path (LPM trie)"]["ns_per_packet"]
                                             / row["bpf_fib_lookup"]["ns_per_packet"], 2)
            results[family] = row
        print(json.dumps({
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.node()} {os.cpu_count()} cores, {platform.release()}",
            "table": f"{args.v4} IPv4 + {args.v6} IPv6 via nexthop objects",
            "repeat": REPEAT, "samples": args.samples, "results": results}, indent=2))
    finally:
        for fp, suffix in ((fast, "f"), (fib, "b")):
            if fp is not None:
                fp.close()
            remove(f"{name}{suffix}")
        ns.delete()


if __name__ == "__main__":
    main()
