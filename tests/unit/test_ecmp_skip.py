"""An ECMP group whose path the kernel may skip leaves the choice to the kernel.

The kernel's multipath selection passes over a path whose gateway's neighbour
failed (nexthop-object groups always, a route's own paths under
net.ipv4.fib_multipath_use_neigh) and over a link without carrier (under
ignore_routes_with_linkdown). The fast path's buckets do not imitate that: such
a group is written without buckets, and every packet asks bpf_fib_lookup.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from fibsync.fastpath import abi
from fibsync.model import (
    NUD_DELAY,
    NUD_FAILED,
    NUD_INCOMPLETE,
    NUD_NOARP,
    NUD_PERMANENT,
    NUD_PROBE,
    NUD_REACHABLE,
    NUD_STALE,
    Change,
    Op,
    Snapshot,
)
from fibsync.rib.choice import kernel_picks_path, path_state

from .mirror import DOWN, MAC1, MAC2, NO_CARRIER, UP, Mirror, link, neigh, nh_obj, route

NUD_NONE = 0x00
NO_ENTRY = -1  # no neighbour entry at all


@dataclass(frozen=True)
class Path:
    state: int = NUD_REACHABLE  # of the gateway's neighbour entry, or NO_ENTRY
    flags: int | None = UP  # of the link; None: a link the RIB does not know
    gateway: bool = True


@dataclass(frozen=True)
class Case:
    description: str
    paths: tuple[Path, ...]
    object_group: bool
    use_neigh: bool
    by_kernel: bool


GOOD = Path()
CASES = [
    Case("all neighbours reachable", (GOOD, GOOD), False, True, False),
    Case("route paths, a failed neighbour, use_neigh", (GOOD, Path(NUD_FAILED)), False, True,
         True),
    Case("route paths, a failed neighbour, no use_neigh", (GOOD, Path(NUD_FAILED)), False,
         False, False),
    Case("route paths, an incomplete neighbour, use_neigh", (Path(NUD_INCOMPLETE), GOOD),
         False, True, True),
    Case("route paths, an entry in state NONE, use_neigh", (GOOD, Path(NUD_NONE)), False,
         True, True),
    Case("object group, a failed neighbour, whatever the sysctl", (GOOD, Path(NUD_FAILED)),
         True, False, True),
    Case("object group, an incomplete neighbour", (GOOD, Path(NUD_INCOMPLETE)), True, False,
         True),
    Case("no neighbour entry counts as good", (GOOD, Path(NO_ENTRY)), True, True, False),
    *[Case(f"valid state {hex(s)}", (GOOD, Path(s)), True, True, False)
      for s in (NUD_STALE, NUD_DELAY, NUD_PROBE, NUD_PERMANENT, NUD_NOARP)],
    Case("a connected path has no neighbour to judge",
         (GOOD, Path(NO_ENTRY, gateway=False)), True, True, False),
    Case("a link without carrier, whatever the sysctls", (GOOD, Path(flags=NO_CARRIER)),
         False, False, True),
    Case("a link down", (GOOD, Path(flags=DOWN)), False, False, True),
    Case("a link the RIB does not know", (GOOD, Path(flags=None)), False, False, True),
    Case("one path: nothing to choose", (Path(NUD_FAILED),), True, True, False),
    Case("one path without carrier: nothing to choose", (Path(flags=NO_CARRIER),), False,
         False, False),
]


@pytest.mark.parametrize("case", CASES, ids=[c.description for c in CASES])
def test_kernel_picks_path(case: Case) -> None:
    paths = [(None if p.flags is None else link(i + 1, p.flags),
              None if p.state == NO_ENTRY else neigh(i + 1, f"192.0.2.{i + 1}", state=p.state),
              p.gateway) for i, p in enumerate(case.paths)]
    states = [path_state(*p) for p in paths]
    assert kernel_picks_path(states, case.object_group, case.use_neigh) is case.by_kernel


# --- through the RIB and the writer, the way the daemon runs them

GW1, GW2 = "198.51.100.2", "198.51.100.6"
PATHS = ((GW1, 2, 1), (GW2, 3, 1))
PREFIX = "203.0.113.0/24"


@pytest.fixture
def m() -> Mirror:
    mirror = Mirror()
    mirror.sync(links=[link(1), link(2), link(3)],
                neighbours=[neigh(2, GW1), neigh(3, GW2, MAC2)])
    return mirror


def buckets(m: Mirror) -> set[str]:
    """The gateways the only group's buckets spread over (empty: the kernel picks)."""
    ((_, value),) = m.maps.maps["groups"].items()
    n = abi.group_buckets(value)
    ids = abi.GROUP.unpack(value[:abi.GROUP.size])[1:1 + n]
    gateways = {}
    for key, nh in m.maps.maps["nexthops"].items():
        fields = abi.NEXTHOP.unpack(nh[:abi.NEXTHOP.size])
        gateways[abi.U32.unpack(key)[0]] = ".".join(str(b) for b in fields[6][:4])
    return {gateways[i] for i in ids}


def failed(ifindex: int, gw: str) -> Change:
    return Change(Op.ADD, neigh(ifindex, gw, state=NUD_FAILED))


def test_a_failed_path_under_use_neigh_hands_the_group_to_the_kernel(m: Mirror) -> None:
    assert m.rib.set_multipath_use_neigh(True)
    m.add(route(PREFIX, *PATHS))
    assert buckets(m) == {GW1, GW2}
    entry = m.maps.maps["routes_v4"].copy()
    m.rib.apply([failed(3, GW2)])
    diff = m.rib.take_diff()
    # one group write, whatever the number of prefixes over it
    assert list(diff.groups) and not diff.routes and not diff.bulk
    m.writer.write(diff)
    assert buckets(m) == set()
    assert m.maps.maps["routes_v4"] == entry
    doc = m.routes()[PREFIX]
    assert doc["ecmp"] == "kernel" and len(doc["nexthops"]) == 2
    assert m.rib.counts()["groups_by_kernel"] == 1
    m.add(neigh(3, GW2, MAC2))  # resolved again (by the kernel, from its own traffic)
    assert buckets(m) == {GW1, GW2}
    assert "ecmp" not in m.routes()[PREFIX]
    assert m.rib.counts()["groups_by_kernel"] == 0


def test_use_neigh_decides_for_a_routes_own_paths(m: Mirror) -> None:
    m.add(route(PREFIX, *PATHS))
    m.apply(failed(3, GW2))
    # the kernel sends to GW2 too: its buckets ask bpf_fib_lookup, which hands the
    # packets the kernel sends there to the kernel, that resolves GW2 as it would
    assert buckets(m) == {GW1, GW2}
    assert m.rib.set_multipath_use_neigh(True)
    assert not m.rib.set_multipath_use_neigh(True)
    m.apply()
    assert buckets(m) == set()
    assert m.rib.set_multipath_use_neigh(False)
    m.apply()
    assert buckets(m) == {GW1, GW2}


def test_an_object_group_skips_failed_neighbours_whatever_the_sysctl(m: Mirror) -> None:
    m.add(nh_obj(10, GW1, 2), nh_obj(11, GW2, 3), nh_obj(12, group=((10, 1), (11, 1))))
    m.add(route(PREFIX, nhid=12))
    assert buckets(m) == {GW1, GW2}
    m.apply(Change(Op.ADD, neigh(3, GW2, state=NUD_INCOMPLETE)))
    assert buckets(m) == set()
    assert m.rib.set_multipath_use_neigh(True)  # changes nothing for object groups
    m.apply()
    assert buckets(m) == set()
    m.add(neigh(3, GW2, MAC2))
    assert buckets(m) == {GW1, GW2}


def test_an_unresolved_path_without_entry_keeps_its_buckets(m: Mirror) -> None:
    """No entry counts as good: the kernel sends there, so the fast path's buckets
    for it ask bpf_fib_lookup (nothing else would ever resolve it)."""
    m.rib.set_multipath_use_neigh(True)
    m.delete(neigh(3, GW2, MAC2))
    m.add(route(PREFIX, *PATHS))
    assert buckets(m) == {GW1, GW2}
    assert m.paths(PREFIX) == {(GW1, 2, 1, True), (GW2, 3, 1, False)}


def test_a_path_without_carrier_hands_the_group_to_the_kernel(m: Mirror) -> None:
    m.add(route(PREFIX, *PATHS))
    m.add(link(3, NO_CARRIER))
    assert buckets(m) == set()
    m.add(link(3, UP))
    assert buckets(m) == {GW1, GW2}


def test_a_resync_keeps_following_the_sysctl(m: Mirror) -> None:
    m.rib.set_multipath_use_neigh(True)
    m.add(route(PREFIX, *PATHS))
    m.sync(links=[link(1), link(2), link(3)],
           neighbours=[neigh(2, GW1), neigh(3, GW2, MAC2, NUD_FAILED)],
           routes=[route(PREFIX, *PATHS)])
    assert buckets(m) == set()
    assert m.rib.table.use_neigh
    m.rib.resync(Snapshot(links=[link(1), link(2), link(3)],
                          neighbours=[neigh(2, GW1), neigh(3, GW2, MAC2)],
                          routes=[route(PREFIX, *PATHS)]))
    m.writer.write(m.rib.take_diff())
    assert buckets(m) == {GW1, GW2}


# --- what a neighbour change costs: groups are rendered again only when what they
# read of a path changed (a storm of MAC changes once re-rendered thousands of
# groups per batch: minutes of lag)

def renders(m: Mirror, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The groups the RIB renders from now on (the cost a neighbour storm multiplies)."""
    seen: list[int] = []
    render = m.rib.table._render_group

    def counted(gid: int) -> None:
        seen.append(gid)
        render(gid)
    monkeypatch.setattr(m.rib.table, "_render_group", counted)
    return seen


def test_a_state_change_the_fast_path_does_not_read_writes_nothing(
        m: Mirror, monkeypatch: pytest.MonkeyPatch) -> None:
    m.add(route(PREFIX, *PATHS))
    seen = renders(m, monkeypatch)
    m.rib.apply([Change(Op.ADD, neigh(3, GW2, MAC2, NUD_STALE))])  # REACHABLE -> STALE
    diff = m.rib.take_diff()
    assert not diff.nexthops and not diff.groups and not diff.neighbours and not diff.routes
    assert seen == []


def test_a_mac_change_writes_the_nexthop_and_no_group(
        m: Mirror, monkeypatch: pytest.MonkeyPatch) -> None:
    m.add(route(PREFIX, *PATHS))
    seen = renders(m, monkeypatch)
    m.rib.apply([Change(Op.ADD, neigh(3, GW2, MAC1))] * 3)
    diff = m.rib.take_diff()
    assert len(diff.nexthops) == 1 and not diff.groups and not diff.routes
    assert seen == []
    m.writer.write(diff)
    assert buckets(m) == {GW1, GW2}
    assert m.paths(PREFIX) == {(GW1, 2, 1, True), (GW2, 3, 1, True)}


def test_a_batch_that_fails_and_revives_a_path_leaves_the_group_as_it_was(
        m: Mirror, monkeypatch: pytest.MonkeyPatch) -> None:
    m.rib.set_multipath_use_neigh(True)
    m.add(route(PREFIX, *PATHS))
    seen = renders(m, monkeypatch)
    m.rib.apply([failed(3, GW2), Change(Op.ADD, neigh(3, GW2, MAC2))] * 2)
    diff = m.rib.take_diff()
    assert not diff.groups
    assert len(seen) == 1  # once for the batch, not once per change
    m.rib.apply([failed(3, GW2)])
    m.writer.write(m.rib.take_diff())
    assert buckets(m) == set()
