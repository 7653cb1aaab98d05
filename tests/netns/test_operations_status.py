"""What an operator sees: status up and down, lookup, the socket's group, metrics,
sd_notify, and a map too small for the table."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fibsync.demo import RouterDaemon, fibsync_argv
from fibsync.lab import Lab, wait_until

from .kernel_view import differences, fibsync_view, kernel_view
from .test_operations_restart import warm_up

pytestmark = pytest.mark.privileged


@pytest.fixture
def daemons(lab: Lab) -> Iterator[list[RouterDaemon]]:
    """Append the daemons a test starts; they are stopped and their pins removed."""
    made: list[RouterDaemon] = []
    try:
        yield made
    finally:
        for d in made:
            d.stop()
            d.cli("detach", "--force", check=False)
            d.remove_pins()


def test_status_up_then_down_and_lookup(lab: Lab, daemons: list[RouterDaemon]) -> None:
    d = RouterDaemon.for_lab(lab)
    daemons.append(d)
    d.start()
    warm_up(lab, str(lab.h1_lan_v4.ip), str(lab.h2_lan_v4.ip))  # carried by XDP
    lab.r.ip("route", "add", "blackhole", "198.51.100.200/29")
    lab.r.ip("route", "add", "unreachable", "198.51.100.208/29")
    wait_until(lambda: "198.51.100.208/29" in {e["prefix"] for e in d.routes()}, timeout=5,
               what="the blackhole and unreachable routes in the maps")

    doc = d.status()
    assert doc["daemon"] == "up" and doc["state"] == "synced" and doc["problems"] == []
    kernel = kernel_view(lab.r.ip_json)
    assert doc["fastpath"]["routes_v4"] == sum(1 for p in kernel if ":" not in p)
    assert doc["fastpath"]["routes_v6"] == sum(1 for p in kernel if ":" in p)
    assert doc["fastpath"]["nexthops"] >= 3 and doc["fastpath"]["neighbours"] >= 3
    assert doc["netlink"]["resyncs"] == 1 and doc["netlink"]["overruns"] == 0
    assert doc["sync"]["batches"] >= 1 and 0 < doc["sync"]["max_seconds"] < 1
    assert doc["counters"]["FWD_FAST"]["packets"] > 0
    assert doc["counters"]["FWD_FAST"]["bytes"] >= 84 * doc["counters"]["FWD_FAST"]["packets"]
    assert {(i["name"], i["mode"]) for i in doc["interfaces"]} == \
        {(n, "native") for n in lab.router_interfaces}
    text = d.cli("status").stdout
    for needle in ("state      synced", "sync lag", "overruns 0", "r-h2b", "xdp native",
                   "FWD_FAST", "routes_v4 "):
        assert needle in text, text

    def lookup(addr: str) -> str:
        return d.cli("lookup", addr).stdout

    assert "forwarded by the fast path" in lookup(str(lab.h2_lan_v4.ip))
    assert "203.0.113.0/24 via 198.51.100.2 dev r-h2a, 198.51.100.6 dev r-h2b" in \
        lookup("203.0.113.77")
    assert "blackhole: dropped in XDP" in lookup("198.51.100.201")
    assert "handed to the kernel (PASS_UNREACHABLE)" in lookup("198.51.100.209")
    assert "handed to the kernel (PASS_LOCAL)" in lookup(str(lab.h1_link.router_v4.ip))
    assert "no fast-path prefix" in lookup("8.8.8.8")
    as_json = json.loads(d.cli("lookup", "2001:db8:20::5", "--json").stdout)
    assert as_json["prefix"] == "2001:db8:20::/64" and len(as_json["nexthops"]) == 2
    bad = d.cli("lookup", "not-an-address", check=False)
    assert bad.returncode == 2 and "not-an-address" in bad.stderr

    d.stop()
    down = d.cli("status", "--json", check=False)
    assert down.returncode == 1
    offline = json.loads(down.stdout)
    assert offline["daemon"] == "down"
    assert offline["fastpath"]["routes_v4"] == doc["fastpath"]["routes_v4"] + 0
    assert {i["name"] for i in offline["interfaces"]} == set(lab.router_interfaces)
    assert offline["counters"]["FWD_FAST"]["packets"] >= doc["counters"]["FWD_FAST"]["packets"]
    assert offline["maps"]["routes_v4"]["capacity"] == 2097152
    text = d.cli("status", check=False).stdout
    assert "DOWN (figures read from the pinned maps)" in text
    # the program still forwards without its daemon: pings cross, the router's kernel
    # forwards none of them
    warm_up(lab, str(lab.h1_lan_v4.ip), str(lab.h2_lan_v4.ip))


@pytest.fixture
def accounts(unique_prefix: str) -> Iterator[tuple[str, str, str]]:
    """A throwaway group, a user in it and a user outside it; removed afterwards."""
    group, member, outsider = f"{unique_prefix}g", f"{unique_prefix}m", f"{unique_prefix}o"
    try:
        subprocess.run(["groupadd", group], check=True)
        for user, extra in ((member, ["-G", group]), (outsider, [])):
            subprocess.run(["useradd", "-M", "-N", "-s", "/usr/sbin/nologin", *extra, user],
                           check=True)
        yield group, member, outsider
    finally:
        for user in (member, outsider):
            subprocess.run(["userdel", user], capture_output=True)
        subprocess.run(["groupdel", group], capture_output=True)


def test_only_the_socket_group_may_use_the_status_socket(
        lab: Lab, daemons: list[RouterDaemon], accounts: tuple[str, str, str]) -> None:
    group, member, outsider = accounts
    d = RouterDaemon.for_lab(lab, ["--socket-group", group])
    daemons.append(d)
    d.start()
    sock = Path(f"/run/fibsync/{d.instance}.sock")
    st = sock.stat()
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert st.st_gid == int(subprocess.run(["getent", "group", group], capture_output=True,
                                           text=True).stdout.split(":")[2])

    def status_as(user: str) -> subprocess.CompletedProcess[str]:
        # no --netns: an unprivileged user cannot enter namespaces, and needs not to
        return subprocess.run(["setpriv", "--reuid", user, "--regid", "nogroup", "--init-groups",
                               "--", *fibsync_argv(), "status", "--json", "--instance",
                               d.instance], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})

    inside = status_as(member)
    assert inside.returncode == 0, inside.stderr
    assert json.loads(inside.stdout)["daemon"] == "up"
    outside = status_as(outsider)
    assert outside.returncode == 1
    assert outside.stderr.strip().splitlines() == [
        f"fibsync: error: {sock}: permission denied (are you in its group?)"]


def http_get(lab: Lab, url: str) -> str:
    """GET from inside the router's namespace (the metrics listen on its loopback)."""
    code = ("import urllib.request; "
            f"print(urllib.request.urlopen({url!r}, timeout=5).read().decode())")
    return lab.r.run([sys.executable, "-c", code]).stdout


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no {name} in the scrape")


def test_metrics_on_loopback(lab: Lab, daemons: list[RouterDaemon]) -> None:
    d = RouterDaemon.for_lab(lab, ["--metrics", "9477"])
    daemons.append(d)
    d.start()
    warm_up(lab, str(lab.h1_lan_v4.ip), str(lab.h2_lan_v4.ip))  # carried by XDP
    text = http_get(lab, "http://127.0.0.1:9477/metrics")
    doc = d.status()
    assert metric(text, "fibsync_synced") == 1
    assert metric(text, 'fibsync_map_entries{map="routes_v4"}') == doc["fastpath"]["routes_v4"]
    assert metric(text, 'fibsync_packets_total{reason="FWD_FAST"}') > 0
    assert metric(text, "fibsync_netlink_resyncs_total") == 1
    assert metric(text, "fibsync_netlink_overruns_total") == 0
    assert metric(text, 'fibsync_sync_lag_seconds_bucket{le="+Inf"}') >= 1
    assert 'fibsync_interface_attached{interface="r-h1",mode="native"} 1.0' in text
    listening = lab.r.run(["ss", "-Hltn", "sport", "= :9477"]).stdout
    assert [line.split()[3] for line in listening.splitlines()] == ["127.0.0.1:9477"]
    # nobody outside the router reaches it
    r = lab.h1.run([sys.executable, "-c", "import socket; socket.create_connection("
                    f"({str(lab.h1_link.router_v4.ip)!r}, 9477), timeout=1)"], check=False)
    assert r.returncode != 0


def test_sd_notify_ready_after_the_first_sync_and_watchdog(
        lab: Lab, daemons: list[RouterDaemon], tmp_path: Path) -> None:
    path = tmp_path / "notify"
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind(str(path))
    sink.settimeout(30)
    d = RouterDaemon.for_lab(lab, env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "600000"})
    daemons.append(d)
    statics = {str(r.prefix) for r in lab.static_routes}
    try:
        messages: list[str] = []
        starter = threading.Thread(target=d.start)
        starter.start()
        while "READY=1" not in messages:
            messages += sink.recv(4096).decode().splitlines()
        # READY=1 comes after the first full sync: the maps hold the table already
        assert statics <= {e["prefix"] for e in d.routes()}
        starter.join()
        t0 = time.monotonic()
        while time.monotonic() - t0 < 1.5:
            messages += sink.recv(4096).decode().splitlines()
        assert messages.index("READY=1") > messages.index(
            "STATUS=syncing: dumping the kernel's tables")
        assert messages[0].startswith("STATUS=starting")
        assert any(m.startswith("STATUS=synced: ") and "3/3 interfaces" in m for m in messages)
        after_ready = messages[messages.index("READY=1"):]
        assert after_ready.count("WATCHDOG=1") >= 4  # every 0.2 s for a 0.6 s watchdog
        assert d.pid is not None
        os.kill(d.pid, signal.SIGTERM)
        while "STOPPING=1" not in messages:
            messages += sink.recv(4096).decode().splitlines()
    finally:
        sink.close()


def test_a_map_too_small_never_misroutes_and_says_so(lab: Lab, daemons: list[RouterDaemon]
                                                     ) -> None:
    kernel = kernel_view(lab.r.ip_json)
    capacity = sum(1 for p in kernel if ":" not in p) + 1
    d = RouterDaemon.for_lab(lab, ["--max-routes-v4", str(capacity)])
    daemons.append(d)
    d.start()
    gw1, gw2a = str(lab.h1_link.host_v4.ip), str(lab.h2_links[0].host_v4.ip)
    lab.frr.vtysh("configure terminal", f"ip route 198.51.100.192/26 {gw1}")
    wait_until(lambda: "198.51.100.192/26" in {e["prefix"] for e in d.routes()}, timeout=5,
               what="the route that fills routes_v4")
    assert d.status()["writer"]["unwritten"] == 0
    # one more-specific too many: it cannot go in, and the /24 would catch its traffic
    lab.frr.vtysh("configure terminal", f"ip route 203.0.113.128/25 {gw2a}")
    doc = wait_until(lambda: (s := d.status())["writer"]["unwritten"] and s, timeout=5,
                     what="the daemon to notice the full map")
    assert doc["daemon"] == "up" and doc["state"] == "synced"
    assert doc["writer"]["unwritten"] == 1 and doc["writer"]["demoted"] == 1
    assert f"routes_v4 is full: {capacity + 1} entries wanted, room for {capacity} " \
        "(raise maps.routes_v4 and restart)" in doc["problems"]
    assert "1 prefix is not in the fast path; 1 covering prefix uses bpf_fib_lookup instead" \
        in doc["problems"]
    entries = {e["prefix"]: e for e in d.routes()}
    assert "203.0.113.128/25" not in entries
    assert entries["203.0.113.0/24"]["type"] == "fib"
    assert "bpf_fib_lookup" in d.cli("lookup", "203.0.113.200").stdout
    assert [e["event"] for e in d.logs()].count("map.full") == 1

    # the kernel's FIB answers for the demoted prefix: forwarded in XDP, by bpf_fib_lookup
    before = doc["counters"]["FWD_FIB"]["packets"]
    warm_up(lab, str(lab.h1_lan_v4.ip), str(lab.h2_lan_v4.ip))
    assert d.status()["counters"]["FWD_FIB"]["packets"] > before

    # room again: the /25 goes in, the /24 forwards on its own, the maps equal the kernel
    lab.frr.vtysh("configure terminal", f"no ip route 198.51.100.192/26 {gw1}")
    wait_until(lambda: d.status()["writer"]["unwritten"] == 0, timeout=5,
               what="the unwritten prefix to go in")
    entries = {e["prefix"]: e for e in d.routes()}
    assert entries["203.0.113.0/24"]["type"] == "unicast"
    assert entries["203.0.113.128/25"]["type"] == "unicast"
    assert "map.recovered" in [e["event"] for e in d.logs()]
    diff = differences(kernel_view(lab.r.ip_json), fibsync_view(d.routes()))
    assert not diff, "\n".join(diff)
