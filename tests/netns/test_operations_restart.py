"""Hitless restart, replaced maps and detach, on the lab.

The router's kernel forwarding stays on: fibsync honours it, and a packet the
XDP program did not carry would be forwarded by the kernel and counted in the
router's ForwDatagrams / Ip6OutForwDatagrams. So a ping that never misses a
sequence number while those counters stay flat proves the fast path kept
forwarding, by itself, while the daemon was dead, restarting and resyncing.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fibsync.config import PIN_ROOT
from fibsync.demo import RouterDaemon
from fibsync.fastpath import bpfsys
from fibsync.lab import Lab, wait_until

from .kernel_view import differences, fibsync_view, kernel_view

pytestmark = pytest.mark.privileged

RINGBUF = 27  # BPF_MAP_TYPE_RINGBUF


@pytest.fixture
def fibsync(lab: Lab) -> Iterator[RouterDaemon]:
    daemon = RouterDaemon.for_lab(lab)
    try:
        yield daemon
    finally:
        daemon.stop()
        daemon.cli("detach", "--force", check=False)
        daemon.remove_pins()


class Ping:
    """``ping -i 0.01`` from h1 across the router; ``stop()`` says which replies came back."""

    def __init__(self, lab: Lab, src: str, dst: str) -> None:
        self.proc = lab.h1.popen(["ping", "-n", "-i", "0.01", "-W", "1", "-I", src, dst],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.started = time.monotonic()

    def stop(self) -> tuple[int, set[int]]:
        """(packets sent, sequence numbers answered)."""
        self.proc.send_signal(signal.SIGINT)
        out, _ = self.proc.communicate(timeout=10)
        sent = re.search(r"(\d+) packets transmitted", out)
        assert sent, out[-500:]
        return int(sent.group(1)), {int(s) for s in re.findall(r"icmp_seq=(\d+) ttl=", out)}

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def assert_no_loss(sent: int, answered: set[int], at_least: int) -> None:
    assert sent >= at_least, f"only {sent} pings sent"
    # the very last echo may still be in flight when ping stops
    missing = set(range(1, sent)) - answered
    assert not missing, f"{len(missing)} of {sent} pings lost: {sorted(missing)[:20]}"


def warm_up(lab: Lab, src: str, dst: str) -> None:
    """The first packets may go to the router's kernel while it resolves its next hops:
    wait until a ping crosses with the kernel's forwarding counters flat (XDP carried it)."""
    def crossed_by_xdp() -> bool:
        before = lab.r.kernel_forwarded()
        answered = lab.h1.run(["ping", "-c", "1", "-W", "1", "-I", src, dst],
                              check=False).returncode == 0
        return answered and lab.r.kernel_forwarded() == before

    wait_until(crossed_by_xdp, timeout=15,
               what=f"{dst} to answer across the router, carried by XDP alone")


class XdpProof:
    """From now on, did XDP carry what crossed the router? ``check()`` says: the router's
    kernel forwarded nothing (its ForwDatagrams and Ip6OutForwDatagrams are flat) and
    fibsync's own FWD_ counters rose by at least the packets that crossed."""

    def __init__(self, lab: Lab, daemon: RouterDaemon) -> None:
        self.lab, self.daemon = lab, daemon
        self.kernel = lab.r.kernel_forwarded()
        self.fibsync = daemon.forwarded()

    def check(self, crossed: int, families: tuple[int, ...] = (4, 6)) -> None:
        kernel = self.lab.r.kernel_forwarded()
        for i, family in enumerate((4, 6)):
            if family in families:
                moved = kernel[i] - self.kernel[i]
                assert not moved, f"the router's kernel forwarded {moved} IPv{family} " \
                    "packets: XDP did not carry them all"
        fibsync = self.daemon.forwarded() - self.fibsync
        assert fibsync >= crossed, f"fibsync counted {fibsync} forwarded packets, " \
            f"{crossed} crossed the router"


def kernel_has(lab: Lab, prefix: str) -> bool:
    family = "-6" if ":" in prefix else "-4"
    return any(r["dst"] == prefix for r in lab.r.ip_json(family, "route", "show"))


def test_kill_9_and_restart_lose_nothing_and_the_maps_follow_the_kernel(
        lab: Lab, fibsync: RouterDaemon) -> None:
    fibsync.start()
    flows = [(str(lab.h1_lan_v4.ip), str(lab.h2_lan_v4.ip)),
             (str(lab.h1_lan_v6.ip), str(lab.h2_lan_v6.ip))]
    for src, dst in flows:
        warm_up(lab, src, dst)
    gw4, gw6 = str(lab.h1_link.host_v4.ip), str(lab.h1_link.host_v6.ip)
    leaving = ("198.51.100.64/27", "2001:db8:98::/48")
    coming = ("198.51.100.128/25", "2001:db8:99::/48")
    lab.frr.vtysh("configure terminal", f"ip route {leaving[0]} {gw4}",
                  f"ipv6 route {leaving[1]} {gw6}")
    wait_until(lambda: {e["prefix"] for e in fibsync.routes()} >= set(leaving), timeout=5,
               what="the routes to be removed while the daemon is down are in the maps")
    before = fibsync.status()

    proof = XdpProof(lab, fibsync)
    pings = [Ping(lab, src, dst) for src, dst in flows]
    try:
        time.sleep(0.5)
        fibsync.kill(signal.SIGKILL)
        down_at = time.monotonic()
        lab.frr.vtysh("configure terminal", f"no ip route {leaving[0]} {gw4}",
                      f"no ipv6 route {leaving[1]} {gw6}", f"ip route {coming[0]} {gw4}",
                      f"ipv6 route {coming[1]} {gw6}")
        wait_until(lambda: all(kernel_has(lab, p) for p in coming)
                   and not any(kernel_has(lab, p) for p in leaving),
                   timeout=10, what="FRR to change the kernel's routes")
        offline = fibsync.status()
        assert offline["daemon"] == "down"
        assert {i["name"] for i in offline["interfaces"]} == set(lab.router_interfaces)
        fibsync.start()
        down_for = time.monotonic() - down_at
        time.sleep(0.5)
    finally:
        results = [p.stop() for p in pings]
        for p in pings:
            p.kill()
    for sent, answered in results:
        # ping runs from before the kill to after the restart; 100 a second asked, fewer
        # sent while bcc compiles on a busy machine
        assert_no_loss(sent, answered, at_least=int(down_for * 20))
    # each echo crosses the router twice (request and reply), all of them carried by XDP
    proof.check(crossed=2 * sum(len(a) for _, a in results))

    after = fibsync.status()
    assert after["pid"] != before["pid"]
    assert {n: m["origin"] for n, m in after["maps"].items() if m["origin"] != "adopted"} \
        == {"routes_v4": "renewed", "routes_v6": "renewed"}
    diff = differences(kernel_view(lab.r.ip_json), fibsync_view(fibsync.routes()))
    assert not diff, "\n".join(diff)
    prefixes = {e["prefix"] for e in fibsync.routes()}
    assert set(coming) <= prefixes and not set(leaving) & prefixes


def test_a_map_of_another_size_is_replaced_not_reused(lab: Lab, fibsync: RouterDaemon) -> None:
    """A restart as after an upgrade: a map's size changed, and the pins hold a map
    this version no longer has (earlier versions' neigh_miss ring buffer)."""
    fibsync.start()
    src, dst = str(lab.h1_lan_v4.ip), str(lab.h2_lan_v4.ip)
    warm_up(lab, src, dst)
    old_id = _map_id(fibsync.instance, "routes_v4")
    proof = XdpProof(lab, fibsync)
    fibsync.stop()
    retired = PIN_ROOT / fibsync.instance / "neigh_miss"
    fd = bpfsys.map_create(RINGBUF, 0, 0, 1 << 16, name="fs1_neigh_miss")
    bpfsys.obj_pin(fd, str(retired))
    os.close(fd)
    ping = Ping(lab, src, dst)
    started = time.monotonic()
    try:
        fibsync.extra = ["--max-routes-v4", "4096"]
        fibsync.start()
        # pings before, during and after the swap: at least a second of them (a start
        # with the program cache can take less than half a second)
        time.sleep(max(0.3, 1.0 - (time.monotonic() - started)))
    finally:
        sent, answered = ping.stop()
        ping.kill()
    assert_no_loss(sent, answered, at_least=50)
    proof.check(crossed=2 * len(answered))
    doc = fibsync.status()
    assert doc["maps"]["routes_v4"] == {"entries": doc["fastpath"]["routes_v4"],
                                        "capacity": 4096, "origin": "replaced"}
    assert doc["maps"]["routes_v6"]["origin"] == "renewed"
    assert {m["origin"] for n, m in doc["maps"].items() if not n.startswith("routes_")} \
        == {"adopted"}
    assert _map_id(fibsync.instance, "routes_v4") != old_id
    assert any(e.get("event") == "map.replace" for e in fibsync.logs())
    assert not retired.exists()
    diff = differences(kernel_view(lab.r.ip_json), fibsync_view(fibsync.routes()))
    assert not diff, "\n".join(diff)


def _map_id(instance: str, name: str) -> int:
    out = subprocess.run(["bpftool", "-j", "map", "show", "pinned",
                          str(PIN_ROOT / instance / name)], capture_output=True, text=True,
                         check=True).stdout
    return int(re.search(r'"id":\s*(\d+)', out).group(1))  # type: ignore[union-attr]


def test_detach_removes_everything(lab: Lab, fibsync: RouterDaemon) -> None:
    fibsync.start()
    r = fibsync.cli("detach", check=False)
    assert r.returncode == 1 and "stop it first" in r.stderr  # the daemon still runs
    fibsync.stop()
    r = fibsync.cli("detach")
    assert "detached from r-h1, r-h2a, r-h2b" in r.stdout, r.stdout
    assert not r.stderr.strip()
    assert not Path(PIN_ROOT / fibsync.instance).exists()
    for link in lab.r.ip_json("link", "show"):
        assert "xdp" not in link, link
    doc = fibsync.status()
    assert doc["state"] == "not running"
    # the kernel forwards on its own again, and counts what it forwards
    before = lab.r.kernel_forwarded()
    r = lab.h1.run(["ping", "-c", "3", "-i", "0.2", "-W", "1", "-I", str(lab.h1_lan_v4.ip),
                    str(lab.h2_lan_v4.ip)], check=False)
    assert r.returncode == 0, r.stdout
    assert lab.r.kernel_forwarded()[0] - before[0] >= 6  # 3 echoes and 3 replies
