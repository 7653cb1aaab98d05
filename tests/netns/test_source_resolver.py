"""NeighbourResolver against a real kernel (privileged).

Two namespaces joined by a veth pair: the router (forwarding off, as on a
host where only the XDP fast path forwards) and its next hop.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import subprocess
from collections.abc import Coroutine, Iterator
from typing import Any

import pytest
import uvloop

from fibsync.model import AF_INET, AF_INET6
from fibsync.netlink.resolver import NeighbourResolver, Outcome

pytestmark = pytest.mark.privileged


def ip(ns: str, *args: str) -> str:
    return subprocess.run(
        ["ip", "-n", ns, *args], check=True, capture_output=True, text=True
    ).stdout


class Pair:
    def __init__(self, router: str, peer: str) -> None:
        self.router = router
        self.peer = peer
        ip(router, "link", "add", "name", "v0", "type", "veth", "peer", "name", "v1", "netns", peer)
        ip(router, "link", "set", "v0", "up")
        ip(peer, "link", "set", "v1", "up")
        ip(router, "addr", "add", "192.0.2.1/24", "dev", "v0")
        ip(peer, "addr", "add", "192.0.2.2/24", "dev", "v1")
        ip(router, "addr", "add", "2001:db8::1/64", "dev", "v0", "nodad")
        ip(peer, "addr", "add", "2001:db8::2/64", "dev", "v1", "nodad")
        self.ifindex = json.loads(ip(router, "-j", "link", "show", "v0"))[0]["ifindex"]
        self.peer_mac = json.loads(ip(peer, "-j", "link", "show", "v1"))[0]["address"]

    def neighbour(self, address: str) -> dict[str, Any] | None:
        for entry in json.loads(ip(self.router, "-j", "neigh", "show", "dev", "v0")):
            if entry["dst"] == address:
                return entry  # type: ignore[no-any-return]
        return None


@pytest.fixture
def pair(unique_prefix: str) -> Iterator[Pair]:
    names = [f"{unique_prefix}-rt", f"{unique_prefix}-nh"]
    try:
        for name in names:
            subprocess.run(["ip", "netns", "add", name], check=True)
        for name in names:
            forwarding = subprocess.run(
                ["ip", "netns", "exec", name, "sysctl", "-n", "net.ipv4.conf.all.forwarding"],
                capture_output=True,
                text=True,
            )
            assert forwarding.stdout.strip() == "0"
        yield Pair(*names)
    finally:
        for name in names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def run(coro: Coroutine[Any, Any, None]) -> None:
    uvloop.run(coro)


def packed(address: str) -> bytes:
    return ipaddress.ip_address(address).packed


@pytest.mark.parametrize(("family", "address"), [(AF_INET, "192.0.2.2"), (AF_INET6, "2001:db8::2")])
def test_resolve_makes_the_kernel_learn_the_next_hop(pair: Pair, family: int, address: str) -> None:
    assert pair.neighbour(address) is None

    async def scenario() -> None:
        resolver = NeighbourResolver(netns=pair.router, interval=0.5)
        try:
            assert await resolver.resolve(pair.ifindex, family, packed(address)) is Outcome.SENT
            # ask again while unanswered, as the RIB would for a next hop it
            # still cannot use (the first IPv6 probe can go out before the
            # peer's link is ready)
            for _ in range(100):
                entry = pair.neighbour(address)
                if entry and "REACHABLE" in entry.get("state", []):
                    break
                await asyncio.sleep(0.1)
                await resolver.resolve(pair.ifindex, family, packed(address))
            entry = pair.neighbour(address)
            assert entry is not None and "REACHABLE" in entry["state"], entry
            assert entry["lladdr"] == pair.peer_mac
            assert resolver.stats.errors == 0
            assert resolver.stats.requests >= 1
        finally:
            resolver.close()

    run(scenario())


def test_requests_are_rate_limited_per_neighbour(pair: Pair) -> None:
    async def scenario() -> None:
        resolver = NeighbourResolver(netns=pair.router, interval=1.0)
        try:
            first = packed("192.0.2.2")
            assert await resolver.resolve(pair.ifindex, AF_INET, first) is Outcome.SENT
            assert await resolver.resolve(pair.ifindex, AF_INET, first) is Outcome.RATE_LIMITED
            # another neighbour is not held back by the first
            other = packed("192.0.2.3")
            assert await resolver.resolve(pair.ifindex, AF_INET, other) is Outcome.SENT
            assert resolver.stats.rate_limited == 1
        finally:
            resolver.close()

    run(scenario())


def test_static_entries_are_left_alone(pair: Pair) -> None:
    # NTF_USE would strip NUD_PERMANENT from this entry
    ip(pair.router, "neigh", "add", "192.0.2.7", "lladdr", "02:00:00:00:00:07", "dev", "v0",
       "nud", "permanent")  # fmt: skip

    async def scenario() -> None:
        resolver = NeighbourResolver(netns=pair.router)
        try:
            outcome = await resolver.resolve(pair.ifindex, AF_INET, packed("192.0.2.7"))
            assert outcome is Outcome.STATIC
            assert resolver.stats.skipped == 1
        finally:
            resolver.close()

    run(scenario())
    entry = pair.neighbour("192.0.2.7")
    assert entry is not None and entry["state"] == ["PERMANENT"]
    assert entry["lladdr"] == "02:00:00:00:00:07"


def test_kernel_errors_are_counted_not_raised(pair: Pair) -> None:
    async def scenario() -> None:
        resolver = NeighbourResolver(netns=pair.router)
        try:
            missing_ifindex = 4242
            outcome = await resolver.resolve(missing_ifindex, AF_INET, packed("192.0.2.2"))
            assert outcome is Outcome.ERROR
            assert "No such device" in resolver.stats.last_error
            bad_length = await resolver.resolve(pair.ifindex, AF_INET6, packed("192.0.2.2"))
            assert bad_length is Outcome.ERROR
            assert resolver.stats.errors == 2
        finally:
            resolver.close()

    run(scenario())


def test_request_schedules_without_awaiting(pair: Pair) -> None:
    async def scenario() -> None:
        resolver = NeighbourResolver(netns=pair.router)
        try:
            resolver.request(pair.ifindex, AF_INET, packed("192.0.2.2"))
            for _ in range(50):
                if resolver.stats.requests:
                    break
                await asyncio.sleep(0.05)
            assert resolver.stats.requests == 1
        finally:
            resolver.close()

    run(scenario())
