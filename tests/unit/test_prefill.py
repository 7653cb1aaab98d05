"""The fresh IPv4 route map filled while the routes are dumped (fastpath/prefill.py).

What a user would see: after the first write the maps are exactly what they
would have been without the prefill — whatever the guess got wrong (a prefix
with several routes, a table not followed, a lost dump's parts, a write that
failed part way) — and, with a full map, every prefix the map lacks is one the
writer knows it could not store.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import structlog

from fibsync.errors import MapError
from fibsync.fastpath.guard import FullMapGuard
from fibsync.fastpath.prefill import order_keys, route_keys
from fibsync.fastpath.writer import MapWriter, MemoryMaps, route_key
from fibsync.model import AF_INET, RouteColumns, Snapshot
from fibsync.rib import Rib
from fibsync.sync import SyncSink

from .test_rib_compact import kernel_state, split

MAPS = ("routes_v4", "routes_v6", "nexthops", "groups", "neighbours", "local_v4", "config")


def maps() -> MemoryMaps:
    return MemoryMaps(dir24=True, tbl8_groups=4096)


def state(seed: int, routes: int) -> Snapshot:
    """A kernel's state, its routes over objects as columns (a resync consumes them:
    a fresh one for each mirror)."""
    return split(kernel_state(random.Random(seed), routes))


class Notify:
    def ping(self, force: bool = False) -> None:
        pass


def sink_over(maps: MemoryMaps) -> SyncSink:
    rib = Rib()
    writer = MapWriter(maps, fresh=MAPS)
    return SyncSink(rib, FullMapGuard(rib, writer, structlog.get_logger()), Notify(),  # type: ignore[arg-type]
                    on_resync=lambda t0: None)


def parts(snapshot: Snapshot, rows: int) -> list[RouteColumns]:
    """The snapshot's IPv4 columns cut as the dump hands them over."""
    cols = next((c for c in snapshot.route_columns if c.family == AF_INET),
                RouteColumns.empty(AF_INET))
    return [RouteColumns(AF_INET, *(getattr(cols, f)[lo:lo + rows] for f in RouteColumns.FIELDS))
            for lo in range(0, len(cols), rows)]


def first_sync(sink: SyncSink, snapshot: Snapshot, lost: Snapshot | None = None,
               part_rows: int = 97) -> None:
    """The source's order: the dump's objects, the RIB begun and the route parts taken
    as they are read (after a dump that was lost, if any), then the resync."""
    if lost is not None:
        take = sink.before_routes(lost)
        assert take is not None
        for part in parts(lost, part_rows)[:5]:
            take(part)
    take = sink.before_routes(snapshot)
    assert take is not None
    for part in parts(snapshot, part_rows):
        take(part)
    sink.resync(snapshot)


def without_prefill(snapshot: Snapshot, maps: MemoryMaps) -> SyncSink:
    sink = sink_over(maps)
    sink.resync(snapshot)
    return sink


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_first_write_leaves_the_maps_as_without_the_prefill(seed: int) -> None:
    want = maps()
    without_prefill(state(seed, 3000), want)
    got = maps()
    sink = sink_over(got)
    first_sync(sink, state(seed, 3000))
    assert got.maps == want.maps
    assert bytes(got.buffers["v4_tbl24"]) == bytes(want.buffers["v4_tbl24"])
    writer = sink.guard.writer
    # most of the table went in ahead; the guess was wrong for some (kernel_state has
    # prefixes with two routes and routes of tables not followed)
    assert writer.stats.ahead > 0.5 * len(want.maps["routes_v4"])
    assert not writer.prefilled


def test_the_parts_of_a_lost_dump_are_made_right_too() -> None:
    # a dump lost half way (an overrun) wrote another state's routes ahead
    want = maps()
    without_prefill(state(11, 2000), want)
    got = maps()
    first_sync(sink_over(got), state(11, 2000), lost=state(10, 3000))
    assert got.maps == want.maps


def test_routes_written_ahead_of_a_dump_that_ends_with_none_are_deleted() -> None:
    lost = state(12, 500)
    empty = Snapshot(links=lost.links, addresses=lost.addresses, neighbours=lost.neighbours,
                     nexthops=lost.nexthops)
    got = maps()
    first_sync(sink_over(got), empty, lost=lost)
    assert not got.maps.get("routes_v4")


class FailingMaps(MemoryMaps):
    """Fails one update of routes_v4 half way, as a bpf() call that fails mid-batch."""

    fail_at: int = 3

    def update(self, name: str, items: list[tuple[bytes, bytes]]) -> None:
        if name == "routes_v4":
            self.fail_at -= 1
            if self.fail_at == 0:
                super().update(name, items[:len(items) // 2])
                raise MapError("routes_v4: batch update failed (EIO)")
        super().update(name, items)


def test_a_write_that_failed_ahead_is_done_again() -> None:
    want = maps()
    without_prefill(state(4, 3000), want)
    got = FailingMaps(dir24=True, tbl8_groups=4096)
    sink = sink_over(got)
    sink.guard.writer.batch = 50
    first_sync(sink, state(4, 3000))
    assert got.maps == want.maps
    assert sink.guard.writer.stats.ahead  # it wrote until it failed


def test_with_a_full_map_every_prefix_missing_is_known_as_unwritten() -> None:
    # the guard shields what covers an unwritten prefix on the premise that an
    # unwritten prefix is absent from the map: a row written ahead with another
    # value that the first write could not replace must not stay
    room = 700
    got = MemoryMaps(capacity={"routes_v4": room}, dir24=True, tbl8_groups=4096)
    sink = sink_over(got)
    first_sync(sink, state(5, 3000), part_rows=150)
    want = maps()
    without_prefill(state(5, 3000), want)
    v4 = {p for p in sink.rib.entries if p.family == AF_INET}
    for _ in ("first write", "the daemon's retry once synced"):
        held = got.maps["routes_v4"]
        # what is held is what the kernel has (a covering prefix may be demoted to FIB
        # by the guard: its value then differs, its key does not)
        assert set(held) <= set(want.maps["routes_v4"])
        stored = {p for p in v4 if route_key(p) in held}
        assert sink.guard.writer.unwritten == v4 - stored
        sink.guard.retry()


def test_route_keys_round_trip_in_the_first_writes_order() -> None:
    # by address, then longest first: the order of RouteBatch(by_address=True)
    rng = np.random.default_rng(1)
    keys = np.zeros(1000, [("plen", "<u4"), ("addr", "u1", 4)])
    keys["plen"] = rng.integers(0, 33, 1000)
    keys["addr"] = rng.integers(0, 256, (1000, 4))
    keys["addr"][:10] = 0  # the same address at several lengths, /0 among them
    keys["plen"][0] = 0
    raw = keys.view(np.uint8)
    ordered = order_keys(raw)
    assert bytes(route_keys(ordered)) == bytes(raw)
    first_write = sorted(range(1000), key=lambda i: (bytes(keys["addr"][i]), -int(keys["plen"][i])))
    assert np.argsort(ordered, kind="stable").tolist() == first_write
