"""End to end with real routing daemons: what they install, fibsync mirrors.

FRR: a BGP speaker in one namespace announces a few thousand IPv4 and IPv6
prefixes to a router in another, over two sessions on two veths, so the
router installs them as ECMP through nexthop objects. fibsync runs on the
router from before the first route: the mirror must equal the kernel after
the initial storm, after half the prefixes are withdrawn, and once the
speaker's bgpd is gone.

BIRD: BIRD 2 in the router namespace exports static and BGP-learned routes
to the kernel with its `kernel` protocol, once into the main table and once
into table 100, which fibsync follows with `--table 100`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fibsync.demo import RouterDaemon
from fibsync.lab import (
    BgpNeighbor,
    Bird,
    Frr,
    LabError,
    Netns,
    bgpd_config,
    subnets,
    terminate,
    veth,
    wait_until,
)

from .kernel_view import differences, fibsync_view, kernel_view

pytestmark = pytest.mark.privileged

V4 = subnets("198.18.0.0/15", 2000, 26)
V6 = subnets("2001:db8::/32", 1000, 48)
# the two veths between router and speaker: (router if, speaker if, v4 net, v6 net)
LINKS = (("r0", "s0", "10.0.0", "fd00:0"), ("r1", "s1", "10.0.1", "fd00:1"))


def settle(daemon: RouterDaemon, ns: Netns, table: str = "main", timeout: float = 30) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        diff = differences(kernel_view(ns.ip_json, table), fibsync_view(daemon.routes()))
        if not diff or time.monotonic() > deadline:
            return diff
        time.sleep(0.5)


def kernel_prefixes(ns: Netns, table: str = "main", proto: str | None = None) -> set[str]:
    """Prefixes in a kernel table, written as `subnets()` writes them."""
    filt = ["proto", proto] if proto else []
    out = set()
    for family, host in (("-4", "/32"), ("-6", "/128")):
        try:
            routes = ns.ip_json(family, "route", "show", "table", table, *filt)
        except LabError as e:
            if "FIB table does not exist" not in str(e):
                raise
            routes = []  # the daemon has not installed its first route there yet
        for r in routes:
            out.add(r["dst"] if "/" in r["dst"] else r["dst"] + host)
    return out


def fast_path(daemon: RouterDaemon) -> dict[str, dict[str, object]]:
    return {e["prefix"]: e for e in daemon.routes()}


@pytest.fixture
def daemons() -> Iterator[list[RouterDaemon]]:
    started: list[RouterDaemon] = []
    yield started
    for d in started:
        d.stop()
        d.remove_pins()


@pytest.fixture
def pair(netns_factory: Callable[[str], Netns]) -> tuple[Netns, Netns]:
    """A router and a speaker joined by two veths, IPv4 and IPv6 on each."""
    r, s = netns_factory("r"), netns_factory("s")
    for r_if, s_if, v4, v6 in LINKS:
        veth(r, r_if, s, s_if)
        r.ip("addr", "add", f"{v4}.1/30", "dev", r_if)
        r.ip("addr", "add", f"{v6}::1/64", "dev", r_if, "nodad")
        s.ip("addr", "add", f"{v4}.2/30", "dev", s_if)
        s.ip("addr", "add", f"{v6}::2/64", "dev", s_if, "nodad")
    for key in ("net.ipv4.conf.all.forwarding", "net.ipv6.conf.all.forwarding"):
        r.sysctl(key, 1)
    return r, s


def multipath(config: str, paths: int = 2) -> str:
    """``bgpd_config`` with eBGP multipath in both address families."""
    return config.replace(" exit-address-family", f"  maximum-paths {paths}\n exit-address-family")


def withdraw(prefixes: list[str], asn: int) -> str:
    lines = [f"router bgp {asn}"]
    for afi, v6 in (("ipv4", False), ("ipv6", True)):
        lines.append(f" address-family {afi} unicast")
        lines += [f"  no network {p}" for p in prefixes if (":" in p) == v6]
        lines.append(" exit-address-family")
    return "\n".join(lines) + "\n"


def test_frr_bgp_ecmp_storm_withdraw_and_session_loss(
        pair: tuple[Netns, Netns], frr_factory: Callable[[Netns], Frr], lab_rundir: Path,
        unique_prefix: str, daemons: list[RouterDaemon]) -> None:
    r, s = pair
    daemon = RouterDaemon(r, lab_rundir, f"{unique_prefix}frr", [ln[0] for ln in LINKS])
    daemon.start()
    daemons.append(daemon)

    speaker_peers = [BgpNeighbor(f"{v4}.1", 65001) for _, _, v4, _ in LINKS] + \
        [BgpNeighbor(f"{v6}::1", 65001) for _, _, _, v6 in LINKS]
    router_peers = [BgpNeighbor(f"{v4}.2", 65002) for _, _, v4, _ in LINKS] + \
        [BgpNeighbor(f"{v6}::2", 65002) for _, _, _, v6 in LINKS]
    speaker = frr_factory(s)
    speaker.start(("zebra", "bgpd"), bgpd_config(asn=65002, router_id="192.0.2.2",
                                                 neighbors=speaker_peers, announce=V4 + V6))
    router = frr_factory(r)
    router.start(("zebra", "bgpd"), multipath(bgpd_config(
        asn=65001, router_id="192.0.2.1", neighbors=router_peers)))

    announced = set(V4 + V6)
    wait_until(lambda: announced <= kernel_prefixes(r, proto="bgp"), timeout=120,
               what="the router to install every announced prefix", interval=1)
    diff = settle(daemon, r)
    assert not diff, "\n".join(diff)
    fp = fast_path(daemon)
    assert announced <= set(fp)
    # over both sessions: ECMP in the fast path, for both families
    for prefix in (V4[0], V4[-1], V6[0], V6[-1]):
        assert fp[prefix]["type"] == "unicast"
        assert {h["ifname"] for h in fp[prefix]["nexthops"]} == {"r0", "r1"}, fp[prefix]

    # withdraw half: reconfigure the speaker
    gone = set(V4[::2] + V6[::2])
    speaker.apply(withdraw(sorted(gone), 65002))
    wait_until(lambda: not gone & kernel_prefixes(r, proto="bgp"), timeout=60,
               what="the router to remove the withdrawn prefixes", interval=1)
    diff = settle(daemon, r)
    assert not diff, "\n".join(diff)
    fp = fast_path(daemon)
    assert not gone & set(fp)
    assert announced - gone <= set(fp)

    # the speaker's bgpd goes: the sessions drop and every learned route leaves
    terminate([speaker.pids()["bgpd"]])
    wait_until(lambda: not announced & set(fast_path(daemon)), timeout=30,
               what="the learned routes to leave the fast path", interval=0.5)
    assert not announced & kernel_prefixes(r)
    diff = settle(daemon, r)
    assert not diff, "\n".join(diff)


BIRD_V4 = subnets("198.18.0.0/15", 300, 26)
BIRD_V6 = subnets("2001:db8::/32", 150, 48)
BIRD_STATIC = {
    "203.0.113.0/24": "unicast", "203.0.112.0/24": "unicast", "198.51.100.0/25": "blackhole",
    "198.51.100.128/25": "kernel", "192.0.2.128/26": "kernel",
    "2001:db8:ffff::/48": "unicast", "2001:db8:fffe::/48": "unicast",
    "2001:db8:fffd::/48": "blackhole",
}


def bird_config(kernel_table: str) -> str:
    """Static and BGP-learned routes, exported to ``kernel_table`` with ECMP merged."""
    table = "" if kernel_table == "main" else f"kernel table {kernel_table};"
    sessions = "\n".join(
        f"protocol bgp s{i}v4 from peer4 {{ neighbor {v4}.2 as 65002; }}\n"
        f"protocol bgp s{i}v6 from peer6 {{ neighbor {v6}::2 as 65002; }}"
        for i, (_, _, v4, v6) in enumerate(LINKS))
    return f"""
router id 192.0.2.1;
protocol device {{ scan time 1; }}
protocol kernel kernel4 {{ {table} merge paths on; ipv4 {{ import none; export all; }}; }}
protocol kernel kernel6 {{ {table} merge paths on; ipv6 {{ import none; export all; }}; }}
protocol static static4 {{
  ipv4;
  route 203.0.113.0/24 via 10.0.0.2;
  route 203.0.112.0/24 via 10.0.0.2 via 10.0.1.2;
  route 198.51.100.0/25 blackhole;
  route 198.51.100.128/25 unreachable;
  route 192.0.2.128/26 prohibit;
}}
protocol static static6 {{
  ipv6;
  route 2001:db8:ffff::/48 via fd00:0::2;
  route 2001:db8:fffe::/48 via fd00:0::2 via fd00:1::2;
  route 2001:db8:fffd::/48 blackhole;
}}
template bgp peer4 {{ local as 65001; ipv4 {{ import all; export none; }}; }}
template bgp peer6 {{ local as 65001; ipv6 {{ import all; export none; }}; }}
{sessions}
"""


@pytest.mark.parametrize("table", ["main", "100"])
def test_bird_static_and_bgp_routes_are_mirrored(
        pair: tuple[Netns, Netns], frr_factory: Callable[[Netns], Frr],
        bird_factory: Callable[[Netns], Bird], lab_rundir: Path, unique_prefix: str,
        daemons: list[RouterDaemon], table: str) -> None:
    r, s = pair
    extra = [] if table == "main" else ["--table", table]
    daemon = RouterDaemon(r, lab_rundir, f"{unique_prefix}b{table}", [ln[0] for ln in LINKS],
                          extra)
    daemon.start()
    daemons.append(daemon)
    speaker_peers = [BgpNeighbor(f"{v4}.1", 65001) for _, _, v4, _ in LINKS] + \
        [BgpNeighbor(f"{v6}::1", 65001) for _, _, _, v6 in LINKS]
    frr_factory(s).start(("zebra", "bgpd"), bgpd_config(
        asn=65002, router_id="192.0.2.2", neighbors=speaker_peers, announce=BIRD_V4 + BIRD_V6))
    bird_factory(r).start(bird_config(table))

    expected = set(BIRD_V4 + BIRD_V6) | set(BIRD_STATIC)
    wait_until(lambda: expected <= kernel_prefixes(r, table, proto="bird"), timeout=120,
               what=f"BIRD to export its routes into table {table}", interval=1)
    diff = settle(daemon, r, table)
    assert not diff, "\n".join(diff)
    fp = fast_path(daemon)
    for prefix, kind in BIRD_STATIC.items():
        assert fp[prefix]["type"] == kind, fp[prefix]
    for prefix in ("203.0.112.0/24", "2001:db8:fffe::/48", BIRD_V4[0], BIRD_V6[-1]):
        assert {h["ifname"] for h in fp[prefix]["nexthops"]} == {"r0", "r1"}, fp[prefix]
    if table != "main":
        # the main table holds none of BIRD's routes, the fast path all of them
        assert not expected & kernel_prefixes(r, "main")
        assert expected <= set(fp)
