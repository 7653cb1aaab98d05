"""A synthetic full Internet table, installed as FRR installs it: nexthop objects.

The prefix-length mix follows today's global table (IPv4: ~60% /24, the rest
mostly /16-/23; IPv6: ~45% /48, then /32-/47 and a few /29-/31). Prefixes are
drawn without overlap surprises from a seeded generator, so every run installs
the same table. Routes point at a handful of nexthop objects and ECMP groups,
like a router with a few BGP peers.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from fibsync.demo import RouterDaemon
from fibsync.lab import Netns

V4_MIX = [(24, 0.60), (23, 0.07), (22, 0.12), (21, 0.05), (20, 0.05), (19, 0.03), (18, 0.02),
          (17, 0.01), (16, 0.05)]
V6_MIX = [(48, 0.45), (44, 0.08), (40, 0.05), (36, 0.04), (32, 0.25), (46, 0.04), (47, 0.03),
          (29, 0.03), (64, 0.03)]


def _lengths(mix: list[tuple[int, float]], count: int, rng: random.Random) -> list[int]:
    lengths = [length for length, _ in mix]
    weights = [w for _, w in mix]
    return rng.choices(lengths, weights, k=count)


def v4_prefixes(count: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    seen: set[tuple[int, int]] = set()
    out = []
    for length in _lengths(V4_MIX, count * 2, rng):
        if len(out) == count:
            break
        # unicast space 1.0.0.0 - 223.255.255.255, outside 10/8, 127/8 and 192.0.2.0/24
        addr = rng.randrange(0x01000000, 0xE0000000) >> (32 - length) << (32 - length)
        if addr >> 24 in (10, 127) or (addr >> 8) == 0xC00002:
            continue
        if (addr, length) in seen:
            continue
        seen.add((addr, length))
        out.append(f"{addr >> 24}.{addr >> 16 & 255}.{addr >> 8 & 255}.{addr & 255}/{length}")
    return out


def v6_prefixes(count: int, seed: int = 2) -> list[str]:
    rng = random.Random(seed)
    seen: set[tuple[int, int]] = set()
    out = []
    for length in _lengths(V6_MIX, count * 2, rng):
        if len(out) == count:
            break
        # 2000::/4 .. 2c00::, global unicast
        addr = (rng.randrange(0x2000 << 112, 0x2C00 << 112)) >> (128 - length) << (128 - length)
        if (addr, length) in seen:
            continue
        seen.add((addr, length))
        groups = [(addr >> (112 - 16 * i)) & 0xFFFF for i in range(8)]
        out.append(":".join(f"{g:x}" for g in groups) + f"/{length}")
    return out


def install(ns: str, v4: int, v6: int, peers: int = 4) -> dict[str, float]:
    """Build links, nexthop objects and the table in namespace ``ns``; return timings."""
    lines = ["link set lo up"]
    for i in range(peers):
        lines += [f"link add b{i} type veth peer name q{i}", f"link set b{i} up",
                  f"link set q{i} up", f"addr add 198.18.{i}.1/24 dev b{i}",
                  f"addr add 2001:db8:ff{i:02x}::1/64 dev b{i} nodad",
                  f"neigh replace 198.18.{i}.2 lladdr 02:00:00:00:00:{i:02x} dev b{i} "
                  "nud permanent",
                  f"neigh replace 2001:db8:ff{i:02x}::2 lladdr 02:00:00:00:01:{i:02x} dev b{i} "
                  "nud permanent",
                  f"nexthop add id {10 + i} via 198.18.{i}.2 dev b{i}",
                  f"nexthop add id {20 + i} via 2001:db8:ff{i:02x}::2 dev b{i}"]
    lines += ["nexthop add id 30 group 10/11", "nexthop add id 31 group 12/13",
              "nexthop add id 40 group 20/21", "nexthop add id 41 group 22/23"]
    v4_nh = [10, 11, 12, 13, 30, 31]
    v6_nh = [20, 21, 22, 23, 40, 41]
    route_lines = [f"route add {p} nhid {v4_nh[i % len(v4_nh)]} proto bgp"
                   for i, p in enumerate(v4_prefixes(v4))]
    # no "-6": `ip -batch` lines take no options, the prefix's family is enough
    route_lines += [f"route add {p} nhid {v6_nh[i % len(v6_nh)]} proto bgp"
                    for i, p in enumerate(v6_prefixes(v6))]
    with tempfile.NamedTemporaryFile("w", suffix=".batch", delete=False) as f:
        f.write("\n".join(lines) + "\n")
        setup = f.name
    with tempfile.NamedTemporaryFile("w", suffix=".batch", delete=False) as f:
        f.write("\n".join(route_lines) + "\n")
        routes = f.name
    try:
        subprocess.run(["ip", "-n", ns, "-batch", setup], check=True, capture_output=True)
        t0 = time.monotonic()
        r = subprocess.run(["ip", "-n", ns, "-force", "-batch", routes], capture_output=True,
                           text=True)
        # a few random prefixes collide with the peer subnets: -force goes on past them
        return {"ip_batch_install": time.monotonic() - t0,
                "install_errors": r.stderr.count("Command failed")}
    finally:
        Path(setup).unlink()
        Path(routes).unlink()


def time_ip_show(ns: str) -> float:
    """`ip route show table all` for both families, output discarded: the reference."""
    t0 = time.monotonic()
    for fam in ("-4", "-6"):
        subprocess.run(["ip", "-n", ns, fam, "route", "show", "table", "all"], check=True,
                       stdout=subprocess.DEVNULL)
    return time.monotonic() - t0


@contextlib.contextmanager
def router(tag: str) -> Iterator[tuple[str, RouterDaemon]]:
    """A throwaway namespace and an (unstarted) fibsync for it on b0..b3; all removed after."""
    name = f"{tag}{uuid.uuid4().hex[:6]}"
    ns = Netns(name).create()
    rundir = Path("/run/fibsync-lab") / name
    daemon = RouterDaemon(ns, rundir, name, [f"b{i}" for i in range(4)])
    try:
        yield name, daemon
    finally:
        daemon.stop()
        daemon.remove_pins()
        ns.delete()
        shutil.rmtree(rundir, ignore_errors=True)


def start_until_ready(daemon: RouterDaemon, timeout: float = 600) -> float:
    """Start the daemon and wait for its READY=1 as systemd does (a NOTIFY_SOCKET), not
    by polling `fibsync status`: each poll is a process of ~0.3 s of CPU, which on a
    2-core machine takes a core from the start it measures. Seconds from the spawn to
    READY=1; the daemon is then synced (its status says so)."""
    path = daemon.rundir / "notify"
    daemon.rundir.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(1.0)
        daemon.env["NOTIFY_SOCKET"] = str(path)
        try:
            t0 = time.monotonic()
            daemon.spawn()
            while True:
                try:
                    message = sock.recv(4096).decode()
                except TimeoutError:
                    message = ""
                if "READY=1" in message.split("\n"):
                    ready = time.monotonic() - t0
                    break
                if daemon.proc is not None and daemon.proc.poll() is not None:
                    raise RuntimeError(f"fibsync exited: {daemon.log_tail()}")
                if time.monotonic() - t0 > timeout:
                    raise RuntimeError(f"no READY=1 after {timeout} s")
        finally:
            del daemon.env["NOTIFY_SOCKET"]
            path.unlink(missing_ok=True)
    daemon.wait_synced(timeout)
    return ready
