"""The XDP data path with real traffic in the lab.

The router's kernel forwards as it always does (forwarding on, no firewall:
fibsync honours both, so neither can prove anything any more). What proves
that XDP carried the traffic is the router's kernel forwarding counters
(ForwDatagrams, Ip6OutForwDatagrams) staying flat while it crosses, with
fibsync's own counters rising; the kernel still does what only it can for
the packets XDP hands it: time exceeded for TTL 1, frag-needed for DF
packets over the egress MTU.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import time
from collections.abc import Iterator

import pytest

from fibsync.config import PIN_ROOT
from fibsync.demo import RouterDaemon
from fibsync.fastpath import abi, bpfsys
from fibsync.fastpath.maps import PinnedMaps
from fibsync.lab import Lab

pytestmark = pytest.mark.privileged


@pytest.fixture
def router(lab: Lab) -> Iterator[RouterDaemon]:
    daemon = RouterDaemon.for_lab(lab)
    try:
        daemon.start()
        warm_up(lab)
        yield daemon
    finally:
        daemon.stop()
        daemon.remove_pins()


def warm_up(lab: Lab) -> None:
    """First packets resolve the router's next hops: the fast path hands a packet to an
    unresolved next hop to the kernel, which resolves it as it always does. The router
    pings both ECMP gateways too, so that no flow later meets an unresolved one."""
    for link in lab.h2_links:
        for addr in (link.host_v4.ip, link.host_v6.ip):
            lab.r.run(["ping", "-c", "1", "-W", "1", str(addr)], check=False)
    for family in ("v4", "v6"):
        src = str(getattr(lab, f"h1_lan_{family}").ip)
        dst = str(getattr(lab, f"h2_lan_{family}").ip)
        deadline = time.monotonic() + 10
        while lab.h1.run(["ping", "-c", "1", "-W", "1", "-I", src, dst], check=False).returncode:
            assert time.monotonic() < deadline, f"{dst} never answered"


def counters(daemon: RouterDaemon) -> dict[str, int]:
    return {k: v["packets"] for k, v in daemon.status()["counters"].items()}


def kernel_forwarded(lab: Lab) -> tuple[int, int]:
    return lab.r.kernel_forwarded()


def test_without_fibsync_the_routers_kernel_counts_what_it_forwards(lab: Lab) -> None:
    """Control for every proof below: the counters do count the kernel's forwarding."""
    before = kernel_forwarded(lab)
    r = lab.h1.run(["ping", "-c", "2", "-W", "1", "-I", str(lab.h1_lan_v4.ip),
                    str(lab.h2_lan_v4.ip)], check=False)
    assert r.returncode == 0
    assert kernel_forwarded(lab)[0] - before[0] >= 4  # two requests, two replies


def test_tcp_transfer_across_the_router(lab: Lab, router: RouterDaemon) -> None:
    payload = bytes(range(256)) * 8192  # 2 MiB
    dst = str(lab.h2_lan_v4.ip)
    server = lab.h2.popen(["python3", "-c", f"""
import socket, hashlib
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("{dst}", 5201)); s.listen(1)
c, _ = s.accept(); h = hashlib.sha256(); n = 0
while (b := c.recv(65536)):
    h.update(b); n += len(b)
print(n, h.hexdigest(), flush=True)
"""], stdout=subprocess.PIPE, text=True)
    try:
        before = counters(router)["FWD_FAST"]
        kernel = kernel_forwarded(lab)
        time.sleep(0.3)
        client = lab.h1.run(["python3", "-c", f"""
import socket, time
for _ in range(50):
    try:
        s = socket.create_connection(("{dst}", 5201), timeout=2); break
    except OSError:
        time.sleep(0.1)
s.sendall(bytes(range(256)) * 8192); s.close()
"""], timeout=60)
        assert client.returncode == 0
        out, _ = server.communicate(timeout=30)
    finally:
        server.kill()
    assert out.split() == [str(len(payload)), hashlib.sha256(payload).hexdigest()]
    assert counters(router)["FWD_FAST"] - before > len(payload) // 1500
    assert kernel_forwarded(lab)[0] == kernel[0], "the router's kernel forwarded some of it"


def test_ttl_1_gets_time_exceeded_from_the_router(lab: Lab, router: RouterDaemon) -> None:
    r = lab.h1.run(["ping", "-c", "1", "-W", "1", "-t", "1", "-I", str(lab.h1_lan_v4.ip),
                    str(lab.h2_lan_v4.ip)], check=False)
    assert re.search(rf"From {re.escape(str(lab.h1_link.router_v4.ip))}.*Time to live exceeded",
                     r.stdout), r.stdout
    assert counters(router)["PASS_TTL"] >= 1


def test_hop_limit_1_gets_time_exceeded_ipv6(lab: Lab, router: RouterDaemon) -> None:
    r = lab.h1.run(["ping", "-6", "-c", "1", "-W", "1", "-t", "1", "-I",
                    str(lab.h1_lan_v6.ip), str(lab.h2_lan_v6.ip)], check=False)
    assert "Time exceeded" in r.stdout or "Hop limit" in r.stdout, r.stdout


def test_df_packet_over_egress_mtu_gets_frag_needed(lab: Lab, router: RouterDaemon) -> None:
    for link in lab.h2_links:
        lab.r.ip("link", "set", link.router_if, "mtu", "1400")
    time.sleep(0.3)  # the MTU change reaches the nexthops through RTM_NEWLINK
    r = lab.h1.run(["ping", "-c", "2", "-W", "1", "-M", "do", "-s", "1450", "-I",
                    str(lab.h1_lan_v4.ip), str(lab.h2_lan_v4.ip)], check=False)
    assert re.search(r"(Frag needed|mtu ?= ?1400)", r.stdout + r.stderr), r.stdout + r.stderr
    assert counters(router)["PASS_MTU"] >= 1
    # smaller packets still cross in the fast path
    ok = lab.h1.run(["ping", "-c", "2", "-W", "1", "-M", "do", "-s", "1300", "-I",
                     str(lab.h1_lan_v4.ip), str(lab.h2_lan_v4.ip)], check=False)
    assert ok.returncode == 0, ok.stdout


def _rx_packets(lab: Lab) -> list[int]:
    out = []
    for link in lab.h2_links:
        stats = lab.h2.ip_json("-s", "link", "show", link.host_if)[0]["stats64"]["rx"]
        out.append(stats["packets"])
    return out


def _udp_flows(lab: Lab, flows: int) -> None:
    dst = str(lab.h2_lan_v4.ip)
    lab.h1.run(["python3", "-c", f"""
import socket
for port in range(20000, 20000 + {flows}):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("{lab.h1_lan_v4.ip}", port))
    for _ in range(4):
        s.sendto(b"x" * 64, ("{dst}", 9))
    s.close()
"""])


@pytest.mark.parametrize("policy, spread", [(0, False), (1, True)])
def test_ecmp_follows_the_kernel_hash_policy(lab: Lab, router: RouterDaemon, policy: int,
                                             spread: bool) -> None:
    lab.r.sysctl("net.ipv4.fib_multipath_hash_policy", policy)
    time.sleep(3)  # the daemon reads the policy sysctls every 2 s
    maps = PinnedMaps(PIN_ROOT / router.instance)
    try:
        # the policy reached the program, and writing it kept the IPv4 table the writer chose
        assert maps.config()[0] == policy
        assert maps.config()[3] == abi.FS_V4_DIR24
    finally:
        maps.close()
    before = _rx_packets(lab)
    kernel = kernel_forwarded(lab)
    _udp_flows(lab, 64)
    time.sleep(0.2)
    got = [a - b for a, b in zip(_rx_packets(lab), before, strict=True)]
    assert kernel_forwarded(lab)[0] == kernel[0], "the router's kernel forwarded some flows"
    assert sum(got) >= 64 * 4
    if spread:
        # 64 flows over two equal next hops: both carry a fair share
        assert min(got) >= sum(got) // 5, got
    else:
        # L3 hash: one source/destination pair, one next hop
        assert min(got) <= 2, got


def test_non_ip_and_local_traffic_go_to_the_kernel(lab: Lab, router: RouterDaemon) -> None:
    before = counters(router)
    r = lab.h1.run(["ping", "-c", "2", "-W", "1", str(lab.h1_link.router_v4.ip)], check=False)
    assert r.returncode == 0
    after = counters(router)
    # the router itself answered: packets for it are handed to the kernel, counted
    assert after["PASS_LOCAL"] - before["PASS_LOCAL"] >= 2


def assert_pings_cross_in_xdp(lab: Lab, daemon: RouterDaemon) -> None:
    """Five IPv4 pings h1 -> h2: request and reply each cross the router in the fast
    path (FWD_FAST), none through its kernel (ForwDatagrams flat)."""
    before, kernel = counters(daemon)["FWD_FAST"], kernel_forwarded(lab)
    src, dst = str(lab.h1_lan_v4.ip), str(lab.h2_lan_v4.ip)
    r = lab.h1.run(["ping", "-c", "5", "-i", "0.05", "-W", "1", "-I", src, dst], check=False)
    assert r.returncode == 0, r.stdout
    assert kernel_forwarded(lab)[0] == kernel[0]
    assert counters(daemon)["FWD_FAST"] - before >= 10


def ingress_mac(daemon: RouterDaemon, ifindex: int) -> bytes:
    """The MAC the program compares a frame's destination with on that interface."""
    maps = PinnedMaps(PIN_ROOT / daemon.instance)
    try:
        raw = bpfsys.lookup(maps.fd("ifaces"), abi.U32.pack(ifindex))
    finally:
        maps.close()
    assert isinstance(raw, bytes)
    return abi.IFACE.unpack(raw)[4]


def test_a_mac_change_reaches_the_fast_path_at_once(lab: Lab, router: RouterDaemon) -> None:
    """The router's interface toward h1 takes another MAC. The kernel drops a frame
    to the old one (PACKET_OTHERHOST) and forwards one to the new one: the program's
    `ifaces` entry follows the link as the daemon mirrors it, not at its next
    interface check (every 2 s), and h1's traffic crosses in XDP at once."""
    rif = lab.h1_link.router_if
    ifindex = int(lab.r.run(["cat", f"/sys/class/net/{rif}/ifindex"]).stdout)
    old = lab.r.run(["cat", f"/sys/class/net/{rif}/address"]).stdout.strip()
    new = "02:aa:00:00:00:0d"
    assert ingress_mac(router, ifindex) == bytes.fromhex(old.replace(":", ""))
    try:
        lab.r.run(["ip", "link", "set", "dev", rif, "address", new])
        changed = time.monotonic()
        while ingress_mac(router, ifindex) != bytes.fromhex(new.replace(":", "")):
            assert time.monotonic() - changed < 0.5, "`ifaces` kept the old MAC"
            time.sleep(0.01)
        # h1 learns the new MAC; the router's kernel flushed its neighbours on that
        # link with the change (NETDEV_CHANGEADDR), and resolves them again itself
        lab.h1.run(["ip", "neigh", "flush", "dev", lab.h1_link.host_if])
        warm_up(lab)
        assert_pings_cross_in_xdp(lab, router)
    finally:
        lab.r.run(["ip", "link", "set", "dev", rif, "address", old])
        lab.h1.run(["ip", "neigh", "flush", "dev", lab.h1_link.host_if])


@pytest.mark.parametrize("table, code", [("lpm", abi.FS_V4_LPM), ("dir24", abi.FS_V4_DIR24)])
def test_the_ipv4_table_is_the_operators_choice(lab: Lab, table: str, code: int) -> None:
    daemon = RouterDaemon.for_lab(lab, extra=["--v4-table", table])
    try:
        daemon.start()
        warm_up(lab)
        doc = daemon.status()
        assert doc["writer"]["v4_table"] == table
        maps = PinnedMaps(PIN_ROOT / daemon.instance)
        try:
            assert maps.config()[3] == code  # what the program reads
        finally:
            maps.close()
        assert_pings_cross_in_xdp(lab, daemon)
    finally:
        daemon.stop()
        daemon.remove_pins()
