"""What the kernel removes without a word leaves the fast path within a second.

On the lab's router, FRR installs its static routes through nexthop objects;
each test adds objects and routes of its own beside them (ids well above
FRR's), then does what the kernel answers with no RTM_DEL* message: a link
set down, deleted or without carrier, a nexthop object deleted, the last IPv4
address removed. The routes over that link or object must leave the maps
within 1 s, and every other fast-path entry must stay as it was.

The 1 s is timed on the pinned maps read directly (what `fibsync routes
--json` reads, without the start-up of a CLI process); the end state is
checked with `fibsync routes --json` against the kernel.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from fibsync.config import PIN_ROOT
from fibsync.demo import RouterDaemon
from fibsync.fastpath.maps import PinnedMaps
from fibsync.lab import Lab, Netns

from .kernel_view import View, differences, fibsync_view, kernel_view

pytestmark = pytest.mark.privileged

H2A, H2B = "r-h2a", "r-h2b"
GW_A4, GW_B4, GW_A6, GW_B6 = "198.51.100.2", "198.51.100.6", "2001:db8:2::2", "2001:db8:3::2"
OBJ_A, OBJ_B, GROUP_AB, OBJ_A6 = 5001, 5002, 5003, 5011
COUNT = 100


def routes_of_our_own(r: Netns) -> dict[str, list[str]]:
    """Objects and routes beside FRR's: prefix sets by what they run over."""
    lines = [f"nexthop add id {OBJ_A} via {GW_A4} dev {H2A}",
             f"nexthop add id {OBJ_B} via {GW_B4} dev {H2B}",
             f"nexthop add id {GROUP_AB} group {OBJ_A},3/{OBJ_B},1",
             f"nexthop add id {OBJ_A6} via {GW_A6} dev {H2A}"]
    kinds: dict[str, list[str]] = {k: [] for k in
                                   ("obj_a", "group", "inline_a", "inline_b", "multipath",
                                    "obj_a6", "inline_a6", "rfc5549_a")}
    for i in range(COUNT):
        kinds["obj_a"].append(f"198.18.{i}.0/24")
        kinds["group"].append(f"198.18.{100 + i}.0/24")
        kinds["inline_a"].append(f"198.19.{i}.0/24")
        kinds["inline_b"].append(f"198.19.{100 + i}.0/24")
        kinds["obj_a6"].append(f"2001:db8:a{i:03x}::/48")
        kinds["inline_a6"].append(f"2001:db8:b{i:03x}::/48")
    kinds["multipath"] = [f"198.19.{200 + i}.0/24" for i in range(10)]
    kinds["rfc5549_a"] = [f"198.19.{220 + i}.0/24" for i in range(10)]
    lines += [f"route add {p} nhid {OBJ_A}" for p in kinds["obj_a"]]
    lines += [f"route add {p} nhid {GROUP_AB}" for p in kinds["group"]]
    lines += [f"route add {p} via {GW_A4} dev {H2A}" for p in kinds["inline_a"]]
    lines += [f"route add {p} via {GW_B4} dev {H2B}" for p in kinds["inline_b"]]
    lines += [f"route add {p} nhid {OBJ_A6}" for p in kinds["obj_a6"]]
    lines += [f"route add {p} via {GW_A6} dev {H2A}" for p in kinds["inline_a6"]]
    lines += [f"route add {p} nexthop via {GW_A4} dev {H2A} nexthop via {GW_B4} dev {H2B}"
              for p in kinds["multipath"]]
    lines += [f"route add {p} via inet6 {GW_A6} dev {H2A}" for p in kinds["rfc5549_a"]]
    r.run(["ip", "-batch", "-"], input="\n".join(lines) + "\n")
    return kinds


def pinned(daemon: RouterDaemon) -> dict[str, dict[str, Any]]:
    maps = PinnedMaps(PIN_ROOT / daemon.instance)
    try:
        return {e["prefix"]: e for e in maps.routes()}
    finally:
        maps.close()


def over(entry: dict[str, Any], ifindex: int) -> bool:
    return any(h.get("ifindex") == ifindex for h in entry["nexthops"])


def wait_for(predicate: Callable[[], bool], timeout: float) -> float:
    """Seconds until ``predicate`` held; inf if it did not within ``timeout``."""
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            return float("inf")
        time.sleep(0.01)
    return time.monotonic() - t0


def mirrored(daemon: RouterDaemon, r: Netns, timeout: float = 10) -> list[str]:
    """Wait until `fibsync routes --json` equals the kernel; the differences left."""
    deadline = time.monotonic() + timeout
    while True:
        diff = differences(kernel_view(r.ip_json), fibsync_view(daemon.routes()))
        if not diff or time.monotonic() > deadline:
            return diff
        time.sleep(0.3)


def ready(daemon: RouterDaemon, lab: Lab) -> tuple[dict[str, list[str]], View]:
    kinds = routes_of_our_own(lab.r)
    diff = mirrored(daemon, lab.r)
    assert not diff, "\n".join(diff)
    return kinds, fibsync_view(daemon.routes())


def unchanged_except(before: View, after: View, gone: set[str], ifindex: int) -> list[str]:
    """Routes that changed although they neither left nor ran over ``ifindex``.

    Only forwarding entries count: the link's own addresses (local table)
    come and go with notifications of their own.
    """
    touched = {p for p, (_, paths) in before.items() if any(h[1] == ifindex for h in paths)}
    return [p for p, (kind, _) in before.items()
            if kind == "unicast" and p not in gone | touched and after.get(p) != before[p]]


def ifindex_of(r: Netns, name: str) -> int:
    return int(next(x["ifindex"] for x in r.ip_json("link", "show", "dev", name)))


def test_link_down_takes_every_route_over_it_within_1s(lab: Lab, fibsync: RouterDaemon) -> None:
    kinds, before = ready(fibsync, lab)
    a = ifindex_of(lab.r, H2A)
    gone = set(kinds["obj_a"] + kinds["inline_a"] + kinds["obj_a6"] + kinds["inline_a6"]
               + kinds["rfc5549_a"])
    lab.r.ip("link", "set", H2A, "down")
    elapsed = wait_for(lambda: not any(over(e, a) for e in pinned(fibsync).values()), 5)
    assert elapsed <= 1.0, f"routes over {H2A} still in the fast path after {elapsed:.2f}s"
    now = pinned(fibsync)
    assert not gone & set(now)
    # the group and the multipath routes lost the path, nothing else
    for p in kinds["group"] + kinds["multipath"]:
        assert [h["gateway"] for h in now[p]["nexthops"]] == [GW_B4]
    diff = mirrored(fibsync, lab.r)
    assert not diff, "\n".join(diff)
    after = fibsync_view(fibsync.routes())
    assert not unchanged_except(before, after, gone, a)

    # back up: the kernel gives back the connected routes and the dead paths,
    # not the flushed objects and their routes. (FRR 8.4 reinstalls its ECMP
    # route through its old group id, which the kernel shrank to one member:
    # `show ip route` says two paths, the kernel has one; the mirror follows
    # the kernel.)
    lab.r.ip("link", "set", H2A, "up")
    diff = mirrored(fibsync, lab.r)
    assert not diff, "\n".join(diff)
    now = pinned(fibsync)
    assert not gone & set(now)
    assert {h["gateway"] for h in now[kinds["multipath"][0]]["nexthops"]} == {GW_A4, GW_B4}


def test_carrier_loss_takes_nexthop_objects_within_1s(lab: Lab, fibsync: RouterDaemon) -> None:
    kinds, before = ready(fibsync, lab)
    a = ifindex_of(lab.r, H2A)
    # the far end goes down: the router's link stays up, without carrier
    lab.h2.ip("link", "set", "h2-ra", "down")
    gone = set(kinds["obj_a"] + kinds["obj_a6"])
    elapsed = wait_for(lambda: not gone & set(pinned(fibsync)), 5)
    assert elapsed <= 1.0, f"routes over objects on {H2A} still there after {elapsed:.2f}s"
    now = pinned(fibsync)
    assert {h["gateway"] for e in kinds["group"] for h in now[e]["nexthops"]} == {GW_B4}
    # inline routes stay with the kernel (flagged linkdown), unresolved in the fast path
    assert all(not h["resolved"] for p in kinds["inline_a"] for h in now[p]["nexthops"])
    diff = mirrored(fibsync, lab.r)
    assert not diff, "\n".join(diff)
    assert not unchanged_except(before, fibsync_view(fibsync.routes()), gone, a)


def test_deleted_link_takes_its_routes_within_1s(lab: Lab, fibsync: RouterDaemon) -> None:
    kinds, before = ready(fibsync, lab)
    b = ifindex_of(lab.r, H2B)
    lab.r.ip("link", "del", H2B)
    elapsed = wait_for(lambda: not any(over(e, b) for e in pinned(fibsync).values()), 5)
    assert elapsed <= 1.0, f"routes over {H2B} still in the fast path after {elapsed:.2f}s"
    now = pinned(fibsync)
    # IPv4 multipath routes with a path over a deleted link go whole
    gone = set(kinds["inline_b"] + kinds["multipath"])
    assert not gone & set(now)
    assert {h["gateway"] for p in kinds["group"] for h in now[p]["nexthops"]} == {GW_A4}
    diff = mirrored(fibsync, lab.r)
    assert not diff, "\n".join(diff)
    assert not unchanged_except(before, fibsync_view(fibsync.routes()), gone, b)


def test_deleted_nexthop_object_takes_its_routes_within_1s(lab: Lab,
                                                          fibsync: RouterDaemon) -> None:
    kinds, before = ready(fibsync, lab)
    lab.r.ip("nexthop", "del", "id", str(OBJ_A))
    gone = set(kinds["obj_a"])
    elapsed = wait_for(lambda: not gone & set(pinned(fibsync)), 5)
    assert elapsed <= 1.0, f"routes over object {OBJ_A} still there after {elapsed:.2f}s"
    # zebra has learned the objects and puts the deleted one back (weights
    # rewritten); the routes over it are gone for good, and the rest follows
    # the kernel
    diff = mirrored(fibsync, lab.r)
    assert not diff, "\n".join(diff)
    after = fibsync_view(fibsync.routes())
    assert not gone & set(after)
    changed = [p for p in before if p not in gone | set(kinds["group"]) and after[p] != before[p]]
    assert not changed


def test_last_ipv4_address_takes_ipv4_routes_over_the_link_within_1s(
        lab: Lab, fibsync: RouterDaemon) -> None:
    kinds, before = ready(fibsync, lab)
    address = str(lab.h2_links[0].router_v4)
    lab.r.ip("addr", "del", address, "dev", H2A)
    # IPv4 paths over the link die, RFC 5549 ones too; nexthop objects and IPv6 stay
    gone = set(kinds["inline_a"] + kinds["rfc5549_a"])
    elapsed = wait_for(lambda: not gone & set(pinned(fibsync)), 5)
    assert elapsed <= 1.0, f"IPv4 routes over {H2A} still there after {elapsed:.2f}s"
    now = pinned(fibsync)
    assert set(kinds["obj_a"] + kinds["obj_a6"] + kinds["inline_a6"]) <= set(now)
    assert {h["gateway"] for p in kinds["multipath"] for h in now[p]["nexthops"]} == {GW_B4}
    diff = mirrored(fibsync, lab.r)
    assert not diff, "\n".join(diff)
    # the address back: the dead paths live again
    lab.r.ip("addr", "add", address, "dev", H2A)
    diff = mirrored(fibsync, lab.r)
    assert not diff, "\n".join(diff)
    now = pinned(fibsync)
    assert {h["gateway"] for h in now[kinds["multipath"][0]]["nexthops"]} == {GW_A4, GW_B4}
