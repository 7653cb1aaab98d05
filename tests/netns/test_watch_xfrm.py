"""XfrmWatch against a real kernel, in a throwaway namespace (privileged).

`ip xfrm policy` changes the namespace's policies while the watcher runs on
a uvloop loop; a condition must appear within 1 s of the command that makes
it and go away within 1 s of the one that undoes it.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

import pytest

from fibsync.lab import Netns
from fibsync.watch.xfrm import XfrmWatch
from tests.netns.test_watch_netfilter import Watching, kinds, on_loop

pytestmark = pytest.mark.privileged

AF_INET, AF_INET6 = int(socket.AF_INET), int(socket.AF_INET6)


@pytest.fixture
def ns(netns_factory: Callable[[str], Netns]) -> Netns:
    return netns_factory("xf")


def test_fwd_and_out_policies_appear_and_go(ns: Netns) -> None:
    async def scenario() -> None:
        async with Watching(XfrmWatch(ns.name, lambda: None), ns) as w:
            assert w.watch.conditions() == [] and "unsupported" not in w.watch.stats
            await w.run("ip", "xfrm", "policy", "add", "src", "10.1.0.0/16", "dst", "10.2.0.0/16",
                        "proto", "tcp", "dir", "fwd", "action", "allow")
            took = await w.until(lambda c: kinds(c) == {("xfrm", AF_INET, 0)})
            assert took < 1.0
            assert [c.detail for c in w.watch.conditions()] == [
                "xfrm policy fwd src 10.1.0.0/16 dst 10.2.0.0/16 proto tcp "
                "(action allow, priority 0)"]
            await w.run("ip", "xfrm", "policy", "add", "src", "2001:db8:1::/48",
                        "dst", "2001:db8:2::/48", "dir", "out", "tmpl", "src", "2001:db8::1",
                        "dst", "2001:db8::2", "proto", "esp", "mode", "tunnel")
            await w.until(lambda c: kinds(c) == {("xfrm", AF_INET, 0), ("xfrm", AF_INET6, 0)})
            await w.run("ip", "xfrm", "policy", "delete", "src", "10.1.0.0/16",
                        "dst", "10.2.0.0/16", "proto", "tcp", "dir", "fwd")
            await w.until(lambda c: kinds(c) == {("xfrm", AF_INET6, 0)})
            await w.run("ip", "xfrm", "policy", "flush")
            await w.until(lambda c: c == [])
            assert w.watch.stats["errors"] == 0 and w.watch.stats["undecodable"] == 0

    on_loop(scenario())


def test_in_policy_is_no_condition(ns: Netns) -> None:
    async def scenario() -> None:
        async with Watching(XfrmWatch(ns.name, lambda: None), ns) as w:
            await w.run("ip", "xfrm", "policy", "add", "src", "10.1.0.0/16", "dst", "10.2.0.0/16",
                        "dir", "in", "action", "block")
            assert await w.settled() == []

    on_loop(scenario())


def test_default_block(ns: Netns) -> None:
    async def scenario() -> None:
        async with Watching(XfrmWatch(ns.name, lambda: None), ns) as w:
            await w.run("ip", "xfrm", "policy", "setdefault", "in", "block")
            assert await w.settled() == []
            await w.run("ip", "xfrm", "policy", "setdefault", "fwd", "block")
            await w.until(lambda c: [x.detail for x in c] ==
                          ["default xfrm policy for fwd is block"])
            assert kinds(w.watch.conditions()) == {("xfrm", 0, 0)}
            await w.run("ip", "xfrm", "policy", "setdefault", "fwd", "accept", "out", "block")
            await w.until(lambda c: [x.detail for x in c] ==
                          ["default xfrm policy for out is block"])
            await w.run("ip", "xfrm", "policy", "setdefault", "out", "accept")
            await w.until(lambda c: c == [])

    on_loop(scenario())


def test_hard_expired_policy_goes(ns: Netns) -> None:
    """The kernel deletes a policy whose hard lifetime ends with a message on
    XFRMNLGRP_EXPIRE only (XFRM_MSG_POLEXPIRE), none on the policy group."""
    async def scenario() -> None:
        async with Watching(XfrmWatch(ns.name, lambda: None), ns) as w:
            await w.run("ip", "xfrm", "policy", "add", "src", "10.1.0.0/16", "dst", "10.2.0.0/16",
                        "dir", "out", "limit", "time-hard", "1")
            await w.until(lambda c: kinds(c) == {("xfrm", AF_INET, 0)})
            await asyncio.sleep(0.8)
            await w.until(lambda c: c == [], within=1.5)

    on_loop(scenario())
