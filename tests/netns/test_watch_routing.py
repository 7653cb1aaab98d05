"""RoutingWatch against a real kernel (privileged): a fresh namespace with a veth pair.

Each step runs a command inside the namespace while the watch runs on a uvloop
loop, as in the daemon, and asserts that the condition appears within 1 s of
the command and goes when the command is undone. VRFs are not here: this
kernel has no vrf module (tests/unit/test_watch_routing.py covers them with
synthesised messages).
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import AsyncIterator, Callable

import pytest
import uvloop

from fibsync.lab import Netns
from fibsync.model import AF_INET, AF_INET6
from fibsync.watch import routing
from fibsync.watch.routing import RoutingWatch

pytestmark = pytest.mark.privileged

WITHIN = 1.0  # seconds from the command to the condition

Held = set[tuple[str, int, int]]


@pytest.fixture
def router(netns_factory: Callable[[str], Netns]) -> Netns:
    """A namespace with veth pair rwa (10.77.0.1/24) and rwb (no IPv4 address), forwarding
    on for both families and rp_filter off everywhere."""
    ns = netns_factory("rw")
    ns.ip("link", "add", "rwa", "type", "veth", "peer", "name", "rwb")
    for ifname in ("rwa", "rwb"):
        ns.ip("link", "set", ifname, "up")
    ns.ip("addr", "add", "10.77.0.1/24", "dev", "rwa")
    for key in ("ipv4.conf.all.forwarding", "ipv6.conf.all.forwarding"):
        ns.sysctl(f"net.{key}", 1)
    for ifname in ("all", "default", "lo", "rwa", "rwb"):
        ns.sysctl(f"net.ipv4.conf.{ifname}.rp_filter", 0)
    return ns


def ifindex(ns: Netns, ifname: str) -> int:
    return int(ns.ip_json("link", "show", "dev", ifname)[0]["ifindex"])


def held(watch: RoutingWatch) -> Held:
    return {(c.kind, c.family, c.ifindex) for c in watch.conditions()}


@contextlib.asynccontextmanager
async def watching(ns: Netns, changes: list[Held]) -> AsyncIterator[RoutingWatch]:
    watch = RoutingWatch(ns.name, lambda: changes.append(held(watch)))
    task = asyncio.create_task(watch.run())
    try:
        await asyncio.wait_for(watch.ready.wait(), 5)
        yield watch
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def run_in(ns: Netns, command: str) -> None:
    """``command`` inside the namespace, without blocking the loop the watch runs on."""
    proc = await asyncio.create_subprocess_exec(
        *ns.argv(["sh", "-c", command]), stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    assert proc.returncode == 0, f"{command}: {err.decode().strip()}"


async def until(watch: RoutingWatch, check: Callable[[Held], bool], timeout: float,
                since: float | None = None) -> float:
    """Seconds from ``since`` (default: now) until ``check(held conditions)`` holds;
    fails ``timeout`` seconds after ``since``."""
    started = time.monotonic() if since is None else since
    while not check(held(watch)):
        if time.monotonic() - started > timeout:
            pytest.fail(f"after {timeout} s the watch holds {sorted(held(watch))}")
        await asyncio.sleep(0.005)
    return time.monotonic() - started


def test_conditions_follow_the_kernel(router: Netns) -> None:
    ns = router
    a, b, lo = ifindex(ns, "rwa"), ifindex(ns, "rwb"), ifindex(ns, "lo")
    steps: list[tuple[str, str, Held]] = [
        ("ip rule add from 192.0.2.0/24 lookup 100", "ip rule del from 192.0.2.0/24 lookup 100",
         {("rules_lookup", AF_INET, 0)}),
        ("ip rule add fwmark 1 lookup 100", "ip rule del fwmark 1 lookup 100",
         {("rules_kernel", AF_INET, 0)}),
        ("ip -6 rule add from 2001:db8::/32 lookup 100",
         "ip -6 rule del from 2001:db8::/32 lookup 100", {("rules_lookup", AF_INET6, 0)}),
        ("ip -6 rule add iif rwa lookup 100", "ip -6 rule del iif rwa lookup 100",
         {("rules_kernel", AF_INET6, 0)}),
        ("sysctl -qw net.ipv4.conf.rwa.forwarding=0", "sysctl -qw net.ipv4.conf.rwa.forwarding=1",
         {("forwarding", AF_INET, a)}),
        ("sysctl -qw net.ipv6.conf.all.forwarding=0", "sysctl -qw net.ipv6.conf.all.forwarding=1",
         {("forwarding", AF_INET6, 0)}),
        ("sysctl -qw net.ipv6.conf.all.forwarding=0 net.ipv6.conf.rwa.force_forwarding=1",
         "sysctl -qw net.ipv6.conf.all.forwarding=1",
         {("forwarding", AF_INET6, b), ("forwarding", AF_INET6, lo)}),
        ("sysctl -qw net.ipv4.conf.all.rp_filter=1", "sysctl -qw net.ipv4.conf.all.rp_filter=0",
         {("rp_filter_strict", AF_INET, a), ("rp_filter_strict", AF_INET, lo),
          ("rp_filter_kernel", AF_INET, b)}),
        ("sysctl -qw net.ipv4.conf.rwa.rp_filter=2", "sysctl -qw net.ipv4.conf.rwa.rp_filter=0",
         {("rp_filter_loose", AF_INET, a)}),
        ("ip addr del 10.77.0.1/24 dev rwa; sysctl -qw net.ipv4.conf.rwa.rp_filter=2",
         "sysctl -qw net.ipv4.conf.rwa.rp_filter=0; ip addr add 10.77.0.1/24 dev rwa",
         {("rp_filter_kernel", AF_INET, a)}),
    ]

    async def main() -> None:
        changes: list[Held] = []
        async with watching(ns, changes) as watch:
            assert held(watch) == set() and changes == [set()]
            for do, undo, expected in steps:
                told, started = len(changes), time.monotonic()
                await run_in(ns, do)
                seconds = await until(watch, lambda now, e=expected: now == e, WITHIN, started)
                assert changes[-1] == expected and len(changes) > told, do
                started = time.monotonic()
                await run_in(ns, undo)
                back = await until(watch, lambda now: now == set(), WITHIN, started)
                print(f"{do}: {seconds * 1000:.0f} ms, undone {back * 1000:.0f} ms")
            assert watch.stats["undecodable"] == 0 and watch.stats["unknown"] == 0

    uvloop.run(main())


def test_force_forwarding_cleared_silently_is_noticed(router: Netns) -> None:
    """Writing all.forwarding=0 while it is 0 clears every force_forwarding and
    announces nothing (addrconf_forward_change): the watch's poll finds it."""
    ns = router
    a, b, lo = ifindex(ns, "rwa"), ifindex(ns, "rwb"), ifindex(ns, "lo")

    async def main() -> None:
        async with watching(ns, []) as watch:
            await run_in(ns, "sysctl -qw net.ipv6.conf.all.forwarding=0 "
                             "net.ipv6.conf.rwa.force_forwarding=1")
            await until(watch, lambda now: now == {("forwarding", AF_INET6, b),
                                                   ("forwarding", AF_INET6, lo)}, WITHIN)
            await run_in(ns, "sysctl -qw net.ipv6.conf.all.forwarding=0")
            assert ns.read_sysctl("net.ipv6.conf.rwa.force_forwarding") == "0"
            await until(watch, lambda now: now == {("forwarding", AF_INET6, 0)},
                        routing.POLL_SECONDS + WITHIN)
            assert a not in {ifindex for _, _, ifindex in held(watch)}

    uvloop.run(main())


def test_overrun_ends_in_a_dump_that_is_right(router: Netns,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """300 rules added and deleted while the loop is busy overflow a small receive
    buffer: the deletions are lost with the overrun, and only the re-dump says
    that the rule set is the default one again."""
    ns = router
    monkeypatch.setattr(routing, "RCVBUF", 16 << 10)
    rules = [f"from 10.{i // 250}.{i % 250}.0/24 lookup 100" for i in range(300)]
    batch = "".join(f"rule add {r}\n" for r in rules) + "".join(f"rule del {r}\n" for r in rules)

    async def main() -> None:
        async with watching(ns, []) as watch:
            # blocks the loop on purpose: nothing is read while the kernel announces
            subprocess.run(["ip", "-n", ns.name, "-batch", "-"], input=batch, text=True,
                           check=True, capture_output=True)
            await until(watch, lambda now: watch.stats["overruns"] > 0, WITHIN)
            await until(watch, lambda now: now == set(), WITHIN)
            await run_in(ns, "ip rule add fwmark 7 lookup 100")
            await until(watch, lambda now: now == {("rules_kernel", AF_INET, 0)}, WITHIN)
            details = [c.detail for c in watch.conditions()]
            assert details == ["32765: from all fwmark 0x7 lookup 100"]

    uvloop.run(main())
