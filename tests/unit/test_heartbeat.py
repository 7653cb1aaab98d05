"""The daemon's two promises to the XDP program (struct fs_heartbeat), as written."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from fibsync.fastpath.maps import CLOCK_MONOTONIC_COARSE
from fibsync.sync import Heartbeat

SECOND = 10**9


@dataclass
class Maps:
    written: list[tuple[int, int]] = field(default_factory=list)
    previous: tuple[int, int] = (0, 0)

    def heartbeat(self) -> tuple[int, int]:
        return self.written[-1] if self.written else self.previous

    def set_heartbeat(self, fresh_until: int, watched_until: int) -> None:
        self.written.append((fresh_until, watched_until))


@dataclass
class Source:
    in_sync: bool = True

    async def caught_up(self) -> bool:
        return self.in_sync


def now_ns() -> int:
    return time.clock_gettime_ns(CLOCK_MONOTONIC_COARSE)


def test_the_daemon_promises_its_conditions_before_its_tables_and_whatever_their_state(
) -> None:
    maps, source = Maps(previous=(7, 9)), Source(in_sync=False)
    hb = Heartbeat(maps, source, stale_after=5.0)  # type: ignore[arg-type]
    t = now_ns()
    hb.watch(1.0)
    fresh, watched = maps.written[-1]
    # a previous run's promise of its tables stands until this run renews it
    assert fresh == 7 and t + 4 * SECOND < watched <= now_ns() + 5 * SECOND
    hb.watch(1.5)  # not due: one write per second at most
    assert len(maps.written) == 1
    hb.watch(2.0)
    assert len(maps.written) == 2 and maps.written[-1][1] >= watched

    asyncio.run(hb.beat(2.0))  # out of sync: no promise of the tables
    assert maps.written[-1][0] == 7 and not hb.promised
    source.in_sync = True
    asyncio.run(hb.beat(3.0))
    fresh, watched = maps.written[-1]
    assert fresh > t + 4 * SECOND and watched == hb.watched_until and hb.promised


def test_a_withdrawal_takes_back_the_tables_and_keeps_the_conditions() -> None:
    maps, source = Maps(), Source()
    hb = Heartbeat(maps, source, stale_after=5.0)  # type: ignore[arg-type]
    hb.watch(1.0)
    asyncio.run(hb.beat(1.0))
    watched = maps.written[-1][1]
    source.in_sync = False
    assert hb.withdraw()
    assert maps.written[-1] == (1, watched)  # 1 ns after boot: FWD_STALE, not PASS
    assert not hb.withdraw()  # once


def test_stale_after_zero_needs_no_promise() -> None:
    maps = Maps(previous=(now_ns() + SECOND, now_ns() + SECOND))
    hb = Heartbeat(maps, Source(), stale_after=0.0)  # type: ignore[arg-type]
    hb.watch(1.0)
    assert maps.written == [(0, 0)]
    hb.watch(2.0)
    asyncio.run(hb.beat(2.0))
    assert maps.written == [(0, 0)]  # written once, not every tick


def test_a_start_withholds_a_previous_runs_tables_until_its_own_first_beat() -> None:
    """Routes may have changed while no daemon ran, and this run's tables follow the
    kernel only once its first sync is written: meanwhile the program forwards by
    bpf_fib_lookup alone."""
    later = now_ns() + 4 * SECOND
    maps, source = Maps(previous=(later, later)), Source()
    hb = Heartbeat(maps, source, stale_after=5.0)  # type: ignore[arg-type]
    assert not hb.withheld
    hb.hold()
    assert maps.written == [(1, later)]  # the conditions' promise stands
    assert hb.withheld  # the daemon may attach its program beside the first write
    hb.watch(1.0)
    assert maps.written[-1][0] == 1 and hb.withheld
    asyncio.run(hb.beat(1.0))
    assert maps.written[-1][0] > later and not hb.withheld

    quiet = Maps(previous=(later, later))
    always = Heartbeat(quiet, source, stale_after=0.0)  # type: ignore[arg-type]
    always.hold()
    assert quiet.written == [] and not always.withheld  # always trusted: nothing to withhold


def test_tables_written_from_a_dump_that_met_changes_wait_for_an_audit() -> None:
    # such a dump may have skipped live routes no notification will name, whose
    # traffic a covering prefix in the tables would catch: until an audit begun
    # after the write finds no divergence the program forwards by bpf_fib_lookup
    maps, source = Maps(), Source()
    hb = Heartbeat(maps, source, stale_after=5.0)  # type: ignore[arg-type]
    asyncio.run(hb.beat(1.0))
    assert hb.promised
    before = time.monotonic()
    hb.await_audit()  # a standing promise is taken back at once
    assert maps.written[-1][0] == Heartbeat.WITHHELD and not hb.promised
    assert hb.doc()["awaiting_audit"]
    asyncio.run(hb.beat(2.0))
    assert maps.written[-1][0] == Heartbeat.WITHHELD and not hb.promised
    hb.audited(before - 1.0)  # an audit begun before that write proves nothing about it
    asyncio.run(hb.beat(3.0))
    assert not hb.promised
    hb.audited(time.monotonic())
    asyncio.run(hb.beat(4.0))
    assert hb.promised and maps.written[-1][0] > now_ns() + 4 * SECOND
    assert not hb.doc()["awaiting_audit"]
