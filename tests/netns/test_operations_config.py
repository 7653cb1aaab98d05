"""Configuration on a live router: bad files change nothing, SIGHUP applies good ones.

The lab's router forwards as usual (kernel forwarding on), and a packet the XDP
program does not carry is forwarded by its kernel and counted there
(ForwDatagrams, Ip6OutForwDatagrams): a continuous ping that loses nothing while
those counters stay flat, as interfaces and filters change, proves the reload
never interrupted the fast path on the interfaces that stayed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fibsync.config import PIN_ROOT
from fibsync.demo import RouterDaemon, fibsync_argv
from fibsync.lab import Lab, Netns, veth, wait_until

from .test_operations_restart import Ping, XdpProof, assert_no_loss, warm_up

pytestmark = pytest.mark.privileged


def write_config(path: Path, interfaces: list[str], extra: str = "") -> None:
    path.write_text(f"interfaces = {json.dumps(interfaces)}\n{extra}")


@pytest.fixture
def config_file(lab: Lab) -> Path:
    path = lab.rundir / "fibsync.toml"
    write_config(path, lab.router_interfaces)
    return path


@pytest.fixture
def fibsync(lab: Lab, config_file: Path) -> Iterator[RouterDaemon]:
    daemon = RouterDaemon(lab.r, lab.rundir, lab.name, [], ["--config", str(config_file)])
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.stop()
        daemon.cli("detach", "--force", check=False)
        daemon.remove_pins()


def reload(daemon: RouterDaemon, done: int | None = None, rejected: int | None = None
           ) -> dict[str, Any]:
    before = daemon.status()["reloads"]
    assert daemon.pid is not None
    os.kill(daemon.pid, signal.SIGHUP)
    want = {"done": before["done"] + (done or 0), "rejected": before["rejected"] + (rejected or 0)}
    return wait_until(lambda: (doc := daemon.status()) and all(
        doc["reloads"][k] == v for k, v in want.items()) and doc, timeout=10,
        what=f"the reload to be {'rejected' if rejected else 'applied'}")


def xdp_on(ns: Netns) -> set[str]:
    return {link["ifname"] for link in ns.ip_json("link", "show") if "xdp" in link}


@pytest.fixture
def h3(lab: Lab, netns_factory: Callable[[str], Netns]) -> Netns:
    """A third host behind a new router interface r-h3 that fibsync does not know yet."""
    ns = netns_factory("h3")
    veth(lab.r, "r-h3", ns, "h3-r")
    lab.r.ip("addr", "add", "198.18.0.1/30", "dev", "r-h3")
    ns.ip("addr", "add", "198.18.0.2/30", "dev", "h3-r")
    ns.ip("route", "add", "default", "via", "198.18.0.1")
    return ns


def test_sighup_adds_and_removes_an_interface_without_interrupting_the_others(
        lab: Lab, fibsync: RouterDaemon, config_file: Path, h3: Netns) -> None:
    # a continuous ping over IPv6, carried by XDP throughout; h3 is reached over IPv4,
    # by the router's kernel while r-h3 runs no fibsync program, by XDP while it does
    src, dst = str(lab.h1_lan_v6.ip), str(lab.h2_lan_v6.ip)
    src4, h3_addr = str(lab.h1_lan_v4.ip), "198.18.0.2"
    warm_up(lab, src, dst)

    def h3_forwarded_by_kernel() -> int:
        """Ping h3 three times: all answered; how many packets the router's kernel forwarded."""
        before = lab.r.kernel_forwarded()[0]
        r = lab.h1.run(["ping", "-c", "3", "-i", "0.2", "-W", "1", "-I", src4, h3_addr],
                       check=False)
        assert r.returncode == 0, r.stdout
        return lab.r.kernel_forwarded()[0] - before

    assert h3_forwarded_by_kernel() >= 6  # r-h3 runs no XDP: the kernel carries it all
    proof = XdpProof(lab, fibsync)
    ping = Ping(lab, src, dst)
    try:
        write_config(config_file, [*lab.router_interfaces, "r-h3"])
        doc = reload(fibsync, done=1)
        assert "r-h3" in {i["name"] for i in doc["interfaces"]}
        assert "r-h3" in xdp_on(lab.r)
        warm_up(lab, src4, h3_addr)
        assert h3_forwarded_by_kernel() == 0  # now XDP carries it both ways

        write_config(config_file, lab.router_interfaces)
        doc = reload(fibsync, done=1)
        assert "r-h3" not in {i["name"] for i in doc["interfaces"]}
        assert xdp_on(lab.r) == set(lab.router_interfaces)
        assert h3_forwarded_by_kernel() >= 6  # back to the kernel
        time.sleep(0.3)
    finally:
        sent, answered = ping.stop()
        ping.kill()
    assert_no_loss(sent, answered, at_least=50)
    proof.check(crossed=2 * len(answered), families=(6,))
    events = [e["event"] for e in fibsync.logs()]
    assert events.count("config.reload") == 2
    assert "xdp.detach" in events


def test_sighup_applies_a_new_filter_by_resyncing(lab: Lab, fibsync: RouterDaemon,
                                                  config_file: Path) -> None:
    statics = {str(r.prefix) for r in lab.static_routes}
    assert statics <= {e["prefix"] for e in fibsync.routes()}
    resyncs = fibsync.status()["netlink"]["resyncs"]

    write_config(config_file, lab.router_interfaces, 'protocols = ["bgp"]\n')
    doc = reload(fibsync, done=1)
    assert doc["filter"]["protocols"] == [186]
    wait_until(lambda: not statics & {e["prefix"] for e in fibsync.routes()}, timeout=10,
               what="FRR's static routes to leave the fast path")
    assert fibsync.status()["netlink"]["resyncs"] == resyncs + 1

    write_config(config_file, lab.router_interfaces, 'protocols = ["static"]\n')
    reload(fibsync, done=1)
    wait_until(lambda: statics <= {e["prefix"] for e in fibsync.routes()}, timeout=10,
               what="FRR's static routes to come back")
    # connected routes are protocol "kernel": this filter leaves them to bpf_fib_lookup
    connected = str(lab.h1_link.router_v4.network)
    assert connected not in {e["prefix"] for e in fibsync.routes()}


def test_a_bad_reload_keeps_the_running_configuration(lab: Lab, fibsync: RouterDaemon,
                                                      config_file: Path) -> None:
    before = fibsync.status()
    for text, key in (('interfaces = ["r-h1", "nosuchif9"]\n', "nosuchif9"),
                      ('interfaces = ["r-h1"]\ntable = 0\n', "table"),
                      ('interfaces = ["r-h1"]\nbogus = 1\n', "bogus")):
        config_file.write_text(text)
        doc = reload(fibsync, rejected=1)
        assert key in doc["reloads"]["last_error"]
        assert doc["interfaces"] == before["interfaces"]
    assert xdp_on(lab.r) == set(lab.router_interfaces)
    rejects = [e for e in fibsync.logs() if e["event"] == "config.reject"]
    assert len(rejects) == 3 and all(e["level"] == "error" for e in rejects)


def pinned_state(lab: Lab, instance: str) -> dict[str, Any]:
    """What a failed start must not change: pins, their ids, XDP on every link."""
    pins = PIN_ROOT / instance
    ids = {}
    for path in sorted(pins.iterdir()) if pins.exists() else []:
        out = subprocess.run(["bpftool", "-j", "map" if path.name != "prog" else "prog",
                              "show", "pinned", str(path)], capture_output=True, text=True)
        ids[path.name] = json.loads(out.stdout).get("id") if out.returncode == 0 else None
    links = {link["ifname"]: link.get("xdp", {}).get("prog", {}).get("id")
             for link in lab.r.ip_json("-d", "link", "show")}
    return {"pins": ids, "links": links}


BAD_CONFIGS = [
    ('interfaces = "r-h1"\n', "interfaces"),  # wrong type
    ('interfaces = ["r-h1"]\ntable = "mian"\n', "table"),
    ('interfaces = ["r-h1"]\ntable = 4294967296\n', "table"),  # impossible table id
    ('interfaces = ["r-h1"]\ntable = 255\n', "table"),
    ('interfaces = ["r-h1"]\nbogus_key = 1\n', "bogus_key"),  # unknown key
    ('interfaces = ["r-h1"]\n[maps]\nroutes_v4 = "many"\n', "maps.routes_v4"),
    ('interfaces = ["r-h1"]\n[log]\nlevel = 3\n', "log.level"),
    ('interfaces = ["r-h1", "nosuchif9"]\n', "nosuchif9"),  # missing interface
    ('interfaces = ["r-h1"]\nxdp_mode = "turbo"\n', "xdp_mode"),
    ("interfaces = [\n", "config"),  # not TOML
]


def test_bad_configs_exit_2_and_change_nothing(lab: Lab, fibsync: RouterDaemon,
                                               tmp_path: Path) -> None:
    src, dst = str(lab.h1_lan_v4.ip), str(lab.h2_lan_v4.ip)
    warm_up(lab, src, dst)
    fresh = f"{lab.name}-x"[-32:]
    before = pinned_state(lab, fibsync.instance)
    proof = XdpProof(lab, fibsync)
    ping = Ping(lab, src, dst)
    try:
        for i, (text, key) in enumerate(BAD_CONFIGS):
            cfg = tmp_path / "bad.toml"
            cfg.write_text(text)
            # the running instance for every file, a fresh one (no pins yet) for a few
            for instance in (fibsync.instance, fresh)[:1 + (i % 3 == 0)]:
                r = subprocess.run([*fibsync_argv(), "--netns", lab.r.name, "run", "--instance",
                                    instance, "--config", str(cfg)],
                                   capture_output=True, text=True, timeout=60)
                lines = r.stderr.strip().splitlines()
                assert r.returncode == 2, (text, r.stderr)
                assert len(lines) == 1 and lines[0].startswith("fibsync: error: "), r.stderr
                assert key in lines[0], (key, lines[0])
        # a good config for the instance that runs already: refused, nothing touched
        r = subprocess.run([*fibsync_argv(), "--netns", lab.r.name, "run", "--instance",
                            fibsync.instance, "-i", "r-h1"], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 1 and "already runs" in r.stderr, r.stderr
    finally:
        sent, answered = ping.stop()
        ping.kill()
    assert pinned_state(lab, fibsync.instance) == before
    assert not (PIN_ROOT / fresh).exists()
    assert fibsync.status()["daemon"] == "up"
    assert_no_loss(sent, answered, at_least=20)
    proof.check(crossed=2 * len(answered))


def test_a_configured_interface_that_comes_back_gets_the_program_again(
        lab: Lab, fibsync: RouterDaemon, config_file: Path, h3: Netns) -> None:
    write_config(config_file, [*lab.router_interfaces, "r-h3"])
    reload(fibsync, done=1)
    assert "r-h3" in xdp_on(lab.r)
    lab.r.ip("link", "del", "r-h3")  # the kernel takes the program with the interface
    wait_until(lambda: "interface r-h3 runs no fibsync program (missing?)"
               in fibsync.status()["problems"], timeout=10, what="status to miss r-h3")
    veth(lab.r, "r-h3", h3, "h3-r")
    doc = wait_until(lambda: (s := fibsync.status())["problems"] == [] and s, timeout=10,
                     what="the program back on r-h3")
    assert "r-h3" in {i["name"] for i in doc["interfaces"]}
    assert "r-h3" in xdp_on(lab.r)
    events = [e["event"] for e in fibsync.logs()]
    assert "interface.gone" in events and events.count("xdp.attach") == 5
