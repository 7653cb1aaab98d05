"""NetfilterWatch against a real kernel, in a throwaway namespace (privileged).

The watcher runs on a uvloop loop as in the daemon; nft and iptables-legacy
change the namespace's rules meanwhile. A condition must appear within 1 s
of the command that makes it, and go away within 1 s of the one that undoes
it (iptables-legacy is polled once a second: 1.5 s there).
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from fibsync.lab import Netns
from fibsync.watch import Condition
from fibsync.watch.netfilter import DumpWatch, NetfilterWatch
from tests.conftest import IN_CI

pytestmark = pytest.mark.privileged

AF_INET, AF_INET6 = int(socket.AF_INET), int(socket.AF_INET6)
Check = Callable[[list[Condition]], bool]


class Watching:
    """A watcher running on the test's loop, and the commands that change its namespace."""

    def __init__(self, watch: DumpWatch, ns: Netns) -> None:
        self.watch = watch
        self.ns = ns
        self.changes = asyncio.Event()
        watch.on_change = self.changes.set
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Watching:
        self.task = asyncio.create_task(self.watch.run())
        await asyncio.wait_for(self.watch.ready.wait(), 5)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.task is not None
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)

    async def run(self, *argv: str, stdin: str | None = None) -> None:
        """A command inside the namespace, without blocking the loop."""
        proc = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", self.ns.name, *argv,
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = await proc.communicate(stdin.encode() if stdin is not None else None)
        if proc.returncode != 0:
            pytest.fail(f"{' '.join(argv)}: {err.decode().strip()}")

    async def until(self, check: Check, within: float = 1.0) -> float:
        """Seconds until ``check(conditions)`` holds; fails after ``within``."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        while not check(self.watch.conditions()):
            if loop.time() - start > within:
                pytest.fail(f"not within {within} s: {self.watch.conditions()} "
                            f"(stats {self.watch.stats})")
            await asyncio.sleep(0.005)
        return loop.time() - start

    async def settled(self) -> list[Condition]:
        """The conditions once a dump has run after the last command."""
        dumps = self.watch.stats["dumps"]
        loop = asyncio.get_running_loop()
        end = loop.time() + 1.0
        while self.watch.stats["dumps"] == dumps:
            assert loop.time() < end, f"no dump after the change (stats {self.watch.stats})"
            await asyncio.sleep(0.005)
        return self.watch.conditions()


def on_loop(coro: Coroutine[Any, Any, None]) -> None:
    uvloop.run(coro)  # as the daemon runs


def kinds(conditions: list[Condition]) -> set[tuple[str, int, int]]:
    return {(c.kind, c.family, c.ifindex) for c in conditions}


@pytest.fixture
def ns(netns_factory: Callable[[str], Netns]) -> Netns:
    return netns_factory("nf")


def ifindex(ns: Netns, name: str) -> int:
    (link,) = ns.ip_json("link", "show", "dev", name)
    return int(link["ifindex"])


# nft 1.0.6 (Debian 12) takes a chain's block on lines of its own, and words
# such as fwd or in only quoted as chain names: hence the layout and names.
FORWARD_DROP = """
table inet fw {
  chain forwarding {
    type filter hook forward priority 0; policy drop;
  }
}
"""

COUNTERS_ONLY = """
table inet fw {
  set allowed { type ipv4_addr; elements = { 10.0.0.1, 10.0.0.2 }; }
  chain forwarding {
    type filter hook forward priority 0; policy accept;
    counter
    ip saddr 10.0.0.0/8 meta l4proto tcp counter accept
    ip daddr @allowed counter
    ip6 saddr { 2001:db8::1, 2001:db8::2 } counter continue
  }
  chain early {
    type filter hook prerouting priority -100; policy accept;
    meta mark 0x10 counter return
  }
  chain local {
    type filter hook input priority 0; policy drop;
  }
}
"""


def test_forward_drop_appears_and_goes(ns: Netns) -> None:
    async def scenario() -> None:
        async with Watching(NetfilterWatch(ns.name, lambda: None), ns) as w:
            assert w.watch.conditions() == []
            await w.run("nft", "-f", "-", stdin=FORWARD_DROP)
            took = await w.until(lambda c: kinds(c) == {("netfilter", 0, 0)})
            (cond,) = w.watch.conditions()
            assert cond.detail == "table inet fw, chain forwarding (hook forward): policy drop"
            assert took < 1.0
            await w.run("nft", "delete", "table", "inet", "fw")
            await w.until(lambda c: c == [])
            assert w.watch.stats["errors"] == 0 and w.watch.stats["undecodable"] == 0

    on_loop(scenario())


def test_counters_only_forward_chain_is_no_condition(ns: Netns) -> None:
    async def scenario() -> None:
        async with Watching(NetfilterWatch(ns.name, lambda: None), ns) as w:
            await w.run("nft", "-f", "-", stdin=COUNTERS_ONLY)
            assert await w.settled() == []
            # one acting rule added to the chain: the condition names it
            await w.run("nft", "add", "rule", "inet", "fw", "forwarding", "tcp", "dport", "22",
                        "reject")
            await w.until(lambda c: kinds(c) == {("netfilter", 0, 0)})
            (cond,) = w.watch.conditions()
            assert cond.detail.startswith(
                "table inet fw, chain forwarding (hook forward, policy accept): rule 5 (handle ")
            assert cond.detail.endswith("'reject'")
            handle = cond.detail.split("(handle ")[1].split(")")[0]
            await w.run("nft", "delete", "rule", "inet", "fw", "forwarding", "handle", handle)
            await w.until(lambda c: c == [])

    on_loop(scenario())


# What the kernel's own messages make of rulesets nft writes: (ruleset, expected
# conditions as (kind, family, device or None)).
RULESETS: list[tuple[str, str, set[tuple[str, int, str | None]]]] = [
    ("nat chain with masquerade", """
table ip nat {
  chain post {
    type nat hook postrouting priority 100; policy accept;
    oifname "v0" masquerade
  }
}""", {("netfilter", AF_INET, None)}),
    ("ip6 forward chain rejecting", """
table ip6 f {
  chain forwarding {
    type filter hook forward priority 0;
    meta l4proto tcp reject
  }
}""", {("netfilter", AF_INET6, None)}),
    ("stateful filtering turns conntrack on", """
table ip f {
  chain forwarding {
    type filter hook forward priority 0;
    ct state established,related accept
  }
}""", {("netfilter", AF_INET, None)}),
    ("a verdict map may jump or drop", """
table ip f {
  chain forwarding {
    type filter hook forward priority 0;
    ip daddr vmap { 10.0.0.1 : drop }
  }
}""", {("netfilter", AF_INET, None)}),
    ("mark set mangles", """
table ip f {
  chain early {
    type filter hook prerouting priority 0;
    meta mark set 0x1
  }
}""", {("netfilter", AF_INET, None)}),
    ("netdev ingress and egress on a device", """
table netdev n {
  chain entry {
    type filter hook ingress device "v0" priority 0; policy accept;
    ip saddr 1.2.3.4 drop
  }
  chain exit {
    type filter hook egress device "v1" priority 0; policy drop;
  }
}""", {("netfilter", 0, "v0"), ("netfilter_egress", 0, "v1")}),
    ("inet ingress on a device, harmless chain on the other", """
table inet f {
  chain entry0 {
    type filter hook ingress device "v0" priority 0; policy drop;
  }
  chain entry1 {
    type filter hook ingress device "v1" priority 0;
    counter
  }
}""", {("netfilter", 0, "v0")}),
    ("bridge, arp, input, output and dormant tables never", """
table bridge b {
  chain forwarding {
    type filter hook forward priority 0; policy drop;
  }
}
table arp a {
  chain local {
    type filter hook input priority 0; policy drop;
  }
}
table ip l {
  chain local {
    type filter hook input priority 0; policy drop;
  }
  chain sent {
    type route hook output priority 0;
    meta mark set 1
  }
}
table ip d {
  flags dormant
  chain forwarding {
    type filter hook forward priority 0; policy drop;
  }
}
""", set()),
]


@pytest.mark.parametrize("ruleset,expected", [(r, e) for _, r, e in RULESETS],
                         ids=[name for name, _, _ in RULESETS])
def test_rulesets(ns: Netns, ruleset: str, expected: set[tuple[str, int, str | None]]) -> None:
    ns.ip("link", "add", "v0", "type", "veth", "peer", "name", "v1")
    want = {(kind, family, ifindex(ns, dev) if dev else 0) for kind, family, dev in expected}

    async def scenario() -> None:
        async with Watching(NetfilterWatch(ns.name, lambda: None), ns) as w:
            await w.run("nft", "-f", "-", stdin=ruleset)
            found = await w.settled()
            if kinds(found) != want:
                found = await w.settled()  # a second dump, should the first have raced
            assert kinds(found) == want, found
            assert w.watch.stats["undecodable"] == 0

    on_loop(scenario())


def test_device_chains_follow_their_devices(ns: Netns) -> None:
    """A netdev chain on a device that is not there yet (Linux 6.16) binds it when it
    appears: no nftables message then, the link notification re-resolves the names."""
    async def scenario() -> None:
        async with Watching(NetfilterWatch(ns.name, lambda: None), ns) as w:
            try:
                await w.run("nft", "-f", "-", stdin="""
table netdev n {
  chain entry {
    type filter hook ingress device "late0" priority 0; policy drop;
  }
}""")
            except pytest.fail.Exception as exc:
                if "No such file or directory" in str(exc):
                    pytest.skip("this kernel binds netdev chains to existing devices only")
                raise
            assert await w.settled() == []
            await w.run("ip", "link", "add", "late0", "type", "veth", "peer", "name", "late1")
            index = ifindex(ns, "late0")
            await w.until(lambda c: kinds(c) == {("netfilter", 0, index)})
            await w.run("ip", "link", "set", "late0", "name", "other0")
            await w.until(lambda c: c == [])
            await w.run("ip", "link", "set", "other0", "name", "late0")
            await w.until(lambda c: kinds(c) == {("netfilter", 0, index)})
            await w.run("ip", "link", "del", "late0")
            await w.until(lambda c: c == [])

    on_loop(scenario())


def test_owned_table_released_without_a_message(ns: Netns) -> None:
    """A table with the owner flag goes when nft -i, its owner, exits; the kernel
    sends no notification, the watcher's poll of owned tables notices."""
    async def scenario() -> None:
        async with Watching(NetfilterWatch(ns.name, lambda: None), ns) as w:
            owner = await asyncio.create_subprocess_exec(
                "ip", "netns", "exec", ns.name, "nft", "-i", stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                assert owner.stdin is not None
                owner.stdin.write(b"add table ip o { flags owner; }\n"
                                  b"add chain ip o f { type filter hook forward priority 0; "
                                  b"policy drop; }\n")
                await owner.stdin.drain()
                await w.until(lambda c: kinds(c) == {("netfilter", AF_INET, 0)})
                notifications = w.watch.stats["notifications"]
                owner.stdin.close()
                await owner.wait()
            finally:
                if owner.returncode is None:
                    owner.kill()
                    await owner.wait()
            await w.until(lambda c: c == [], within=1.5)
            assert w.watch.stats["notifications"] == notifications

    on_loop(scenario())


@pytest.fixture
def iptables_legacy() -> None:
    missing = [tool for tool in ("iptables-legacy", "ip6tables-legacy") if not shutil.which(tool)]
    if missing:
        message = f"needs {', '.join(missing)} (package iptables; run `make bootstrap`)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


@pytest.mark.usefixtures("iptables_legacy")
def test_iptables_legacy_tables(ns: Netns) -> None:
    async def scenario() -> None:
        async with Watching(NetfilterWatch(ns.name, lambda: None), ns) as w:
            assert w.watch.conditions() == []
            await w.run("iptables-legacy", "-A", "FORWARD", "-j", "ACCEPT")
            await w.until(lambda c: kinds(c) == {("netfilter", AF_INET, 0)}, within=1.5)
            assert [c.detail for c in w.watch.conditions()] == [
                "iptables-legacy table filter is loaded; its rules cannot be watched"]
            await w.run("ip6tables-legacy", "-t", "mangle", "-L")
            await w.until(lambda c: kinds(c) == {("netfilter", AF_INET, 0),
                                                 ("netfilter", AF_INET6, 0)}, within=1.5)

    on_loop(scenario())
