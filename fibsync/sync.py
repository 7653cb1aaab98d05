"""The sync sink: what the netlink source calls, the lag it measures, and the
heartbeat that tells the XDP program the sink is in sync.

The source hands over one ``Snapshot`` per (re)dump (``resync``) and then
batches of changes (``apply``); each goes RIB -> FullMapGuard -> writer before
the call returns, so the maps follow the kernel one batch behind at most.
What a finished resync means for the daemon's life (attach, sweep, READY=1)
is the daemon's business: the sink calls ``on_resync_start`` before reading a
resync (what may run beside the write starts there) and ``on_resync`` after
writing it.

Before the first write, a fresh IPv4 route map is filled while the routes are
still dumped (``before_routes``; fastpath/prefill.py): the RIB guesses each
part's rows, the writer writes them ahead, and the first write makes the map
equal to the RIB's answer.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

from .fastpath.guard import FullMapGuard
from .fastpath.maps import CLOCK_MONOTONIC_COARSE, PinnedMaps
from .model import Change, Prefix, RouteColumns, Snapshot
from .process import SdNotify
from .rib import Rib
from .verify import InFlight


@dataclasses.dataclass
class SyncLag:
    """Time from reading a batch of kernel changes to the maps holding it.

    The cumulative histogram (``buckets``, in seconds) feeds the metrics."""

    BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
    batches: int = 0
    changes: int = 0
    last_seconds: float = 0.0
    max_seconds: float = 0.0
    sum_seconds: float = 0.0
    last_change_at: float = 0.0
    counts: list[int] = dataclasses.field(default_factory=lambda: [0] * len(SyncLag.BUCKETS))

    def observe(self, seconds: float, changes: int) -> None:
        self.batches += 1
        self.changes += changes
        self.last_seconds = seconds
        self.max_seconds = max(self.max_seconds, seconds)
        self.sum_seconds += seconds
        self.last_change_at = time.time()
        for i, bound in enumerate(self.BUCKETS):
            if seconds <= bound:
                self.counts[i] += 1

    def doc(self) -> dict[str, Any]:
        return {"last_seconds": round(self.last_seconds, 6),
                "max_seconds": round(self.max_seconds, 6),
                "mean_seconds": round(self.sum_seconds / self.batches, 6) if self.batches else 0.0,
                "batches": self.batches, "changes": self.changes,
                "last_change_at": self.last_change_at,
                "sum_seconds": self.sum_seconds,
                "buckets": [[b, n] for b, n in zip(self.BUCKETS, self.counts, strict=True)]}


class SyncSink:
    """Kernel state in, map writes out (the source's ``Sink``)."""

    def __init__(self, rib: Rib, guard: FullMapGuard, notify: SdNotify,
                 on_resync: Callable[[float], None],
                 on_resync_start: Callable[[], None] = lambda: None,
                 on_links: Callable[[], None] = lambda: None) -> None:
        self.rib = rib
        self.guard = guard
        self.notify = notify
        self.on_resync = on_resync  # called with the resync's start (monotonic), once written
        self.on_resync_start = on_resync_start  # called before the RIB reads a resync
        self.on_links = on_links  # called once the RIB's links changed (a batch, a resync)
        self.lag = SyncLag()
        self.last_change = 0.0  # monotonic time of the last batch of kernel changes
        self.rewrite: set[Prefix] = set()  # prefixes an audit found wrong: for the next resync
        self.audit_window: InFlight | None = None  # open while an audit reads
        self.resync_quiet = False  # the last resync's dump met no change (Snapshot.quiet)

    def before_routes(self, snapshot: Snapshot) -> Callable[[RouteColumns], None] | None:
        """The dump has everything but its routes: the RIB begins the resync, and
        the writer may take the route dump's parts as they are read."""
        return self.guard.writer.prefill(self.rib.prepare(snapshot))

    def resync(self, snapshot: Snapshot) -> None:
        self.notify.ping(force=True)
        t0 = time.monotonic()
        if self.audit_window is not None:
            self.audit_window.overrun = True  # everything may have changed
        self.resync_quiet = snapshot.quiet
        self.on_resync_start()
        self.rib.resync(snapshot)
        self.on_links()
        # consumed: a full table's columns (~45 MB) are freed before the first write
        snapshot.route_columns = []
        for prefix in self.rewrite:
            self.rib.rewrite(prefix)
        self.rewrite = set()
        # routes written ahead are made right by the first write, whatever its diff
        self.flush(always=self.guard.writer.prefilled)
        self.on_resync(t0)

    def apply(self, changes: list[Change]) -> None:
        t0 = self.last_change = time.monotonic()
        if self.audit_window is not None:
            for change in changes:
                self.audit_window.note(change)
        links = self.rib.link_changes
        self.rib.apply(changes)
        if self.rib.link_changes != links:
            self.on_links()
        self.flush()
        self.lag.observe(time.monotonic() - t0, len(changes))

    def flush(self, always: bool = False) -> None:
        diff = self.rib.take_diff()
        if diff or always:
            self.guard.write(diff)


class Heartbeat:
    """The daemon's two promises to the XDP program (struct fs_heartbeat), each for
    ``stale_after`` from when it is made.

    ``watch``: the daemon is alive and follows the kernel's conditions (`ifaces`:
    the watchers run in its event loop), renewed from the housekeeping loop
    whatever the tables' state. Once it runs out the program trusts nothing it was
    given and hands every packet to the kernel (PASS_NO_DAEMON): a daemon stopped,
    crashed or frozen for longer than stale_after leaves the router as plain Linux,
    which then applies a firewall rule or a sysctl changed meanwhile.

    ``beat``: the tables follow the kernel too, only once every change the kernel
    announced is applied: a daemon that was stopped applies its backlog first, one
    that lost changes resyncs first (no promise while the source is out of sync).
    Without it, while watched, the program forwards by bpf_fib_lookup alone
    (FWD_STALE).

    Nor after a resync whose dump met changes (``await_audit``): such a dump may
    have skipped live routes that no notification will name (verify.py says how),
    and a covering prefix in the tables would catch their traffic. The promise
    waits for an audit begun after that resync's write to find no divergence
    (``audited``).
    """

    EVERY = 1.0  # seconds between beats at most (fewer for a short stale_after)
    WITHHELD = 1  # fresh_until 1 ns after boot: in the past (0 means no promise needed)

    def __init__(self, maps: PinnedMaps, source: Any, stale_after: float) -> None:
        self.maps = maps
        self.source = source
        self.stale_after = stale_after  # a reload may change it
        self.last = 0.0  # monotonic time of the last promise of the tables
        self.watched = 0.0  # monotonic time of the last promise of the conditions
        self.promised = False  # this run's promise stands (withdraw() takes it back)
        # monotonic time of the write of a resync whose dump met changes, until an
        # audit begun after it finds no divergence
        self.unaudited_since: float | None = None
        # a previous run's promises stand until this one renews them (a restart
        # within stale_after stays on its tables)
        self.fresh_until, self.watched_until = maps.heartbeat()

    def _every(self) -> float:
        return min(self.EVERY, self.stale_after / 4)

    def _write(self) -> None:
        self.maps.set_heartbeat(self.fresh_until, self.watched_until)

    def _until(self) -> int:
        return time.clock_gettime_ns(CLOCK_MONOTONIC_COARSE) + int(self.stale_after * 1e9)

    @property
    def withheld(self) -> bool:
        """The tables' promise is withheld: the program reads none of the tables (it
        forwards by bpf_fib_lookup alone, FWD_STALE), whatever state they are in."""
        return self.fresh_until == self.WITHHELD

    def hold(self) -> None:
        """At start: whatever a previous run promised, its tables followed the kernel
        only until it stopped, and this run's follow it only once its first sync is
        written (and what the kernel announced meanwhile applied); until the first beat
        the program forwards by bpf_fib_lookup alone (FWD_STALE). With stale_after = 0
        the tables are always trusted: nothing to withhold."""
        if self.stale_after:
            self.fresh_until = self.WITHHELD
            self._write()

    def due(self, now: float) -> bool:
        return now - self.last >= self._every()

    def watch(self, now: float) -> None:
        """Renew the promise that the daemon follows the kernel's conditions, when due
        (one map write)."""
        if not self.stale_after:  # no promises needed: everything is always trusted
            if self.fresh_until or self.watched_until:
                self.fresh_until = self.watched_until = 0
                self._write()
            return
        if now - self.watched < self._every():
            return
        self.watched = now
        self.watched_until = self._until()
        self._write()

    async def beat(self, now: float) -> None:
        """One beat; it waits while the sink applies a backlog (run it as a task of its
        own, not in a loop that must stay prompt)."""
        self.last = now
        if not self.stale_after:  # watch() writes the zeros: nothing to promise
            self.promised = False
            return
        # the promise runs from now: what the kernel announced up to now is applied then
        until = self._until()
        # in sync still once caught up: changes lost since are the withdrawal's to handle
        if await self.source.caught_up() and self.source.in_sync \
                and self.unaudited_since is None:
            self.fresh_until = until
            self._write()
            self.promised = True

    def await_audit(self) -> None:
        """The tables were just written from a dump that met changes: no promise until
        an audit begun after now finds no divergence; one standing is taken back."""
        self.unaudited_since = time.monotonic()
        if self.promised:
            self.fresh_until = self.WITHHELD
            self._write()
            self.promised = False

    def audited(self, started: float) -> bool:
        """An audit begun at ``started`` (monotonic) found no divergence; True when
        the tables waited for it."""
        if self.unaudited_since is None or started < self.unaudited_since:
            return False
        self.unaudited_since = None
        return True

    def withdraw(self) -> bool:
        """Take the promise back at once when the source is out of sync (announcements
        lost to an overrun, a session that failed): the tables may be behind the kernel
        until the resync is written, and the program would otherwise go on trusting
        them for up to stale_after. It forwards by bpf_fib_lookup alone (FWD_STALE)
        until the next beat, the first after the resync. True when it withdrew."""
        if not self.promised or self.source.in_sync:
            return False
        self.fresh_until = self.WITHHELD
        self._write()
        self.promised = False
        return True

    def doc(self) -> dict[str, Any]:
        now = time.monotonic()
        return {"stale_after": self.stale_after, "age_seconds": round(now - self.last, 3),
                "watched_age_seconds": round(now - self.watched, 3),
                "awaiting_audit": self.unaudited_since is not None}
