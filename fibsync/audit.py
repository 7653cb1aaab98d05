"""The daemon's self-audit: ``fibsync verify`` in a child process, and what follows from it.

It runs after every resync and every ``audit_interval`` seconds, in a process
of its own at a lower priority (``python -m fibsync.verify``), so that the
loop that writes the maps never waits for it. After a resync whose dump met
changes (the case a dump may have skipped live routes in) it is urgent: it
starts at once and, while it cannot judge everything, runs again with the
backoff below. Any other audit (periodic, or after a dump that met no change)
that could not judge everything runs again only once the kernel is quiet, or
at the next interval: a storm then costs one audit, not a third of a core.
A divergence the child confirms is logged with its prefix, counted (status
``audit.divergences``, Prometheus ``fibsync_audit_divergences_total``) and
repaired by a resync, which rewrites exactly what differs; the resync is
audited in turn.

An audit that could not judge everything (prefixes changing while it read, or
announcements lost) is run again soon: as soon as the kernel has been quiet
for ``QUIET`` seconds, or, while changes go on, after a delay that doubles up
to the interval and no sooner than twice the last child's run time after it
ended, so that audits during churn take at most a third of a core.

Why this is needed, besides catching bugs: a kernel dump taken while the
tables change may skip live routes (fibsync/verify.py says how), and the
dump of a resync after an overrun is taken in exactly such a storm. The
first audit that can judge everything once the storm is over repairs it.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .model import Prefix
from .process import wait_event
from .verify import InFlight, entry_of

QUIET = 0.5  # seconds without a netlink change before a pending re-audit starts
FIRST_RETRY = 1.0
LOGGED = 20  # divergences logged one by one per audit; the rest are counted


@dataclass(slots=True)
class AuditStats:
    runs: int = 0
    divergences: int = 0  # confirmed, since the start
    repairs: int = 0  # resyncs requested by an audit
    failures: int = 0  # audits that could not run (the child failed)
    last_at: float = 0.0  # wall clock of the last audit's end
    last_seconds: float = 0.0
    last_checked: int = 0
    last_in_flight: int = 0
    last_result: str = ""  # equal | diverged | inconclusive | failed


async def run_child(args: dict[str, Any]) -> dict[str, Any]:
    """Run one ``fibsync verify`` pass pair in a child process; its JSON report."""
    # one thread: numpy's OpenBLAS would start one per core, for nothing verify needs
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fibsync.verify", json.dumps(args),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
    try:
        out, err = await proc.communicate()
    except asyncio.CancelledError:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    if proc.returncode != 0:
        tail = err.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"verify child exited with {proc.returncode}: {tail[0]}")
    doc: dict[str, Any] = json.loads(out)
    return doc


async def _nothing_in_flight() -> InFlight:
    return InFlight()


class Auditor:
    def __init__(self, interval: float, args: Callable[[], dict[str, Any]],
                 exclude: Callable[[], Iterable[Prefix]], repair: Callable[[list[Prefix]], None],
                 last_change: Callable[[], float], log: Any,
                 child: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]] = run_child,
                 window: tuple[Callable[[], Any], Callable[[], Awaitable[InFlight]]] = (
                     lambda: None, _nothing_in_flight),
                 clean: Callable[[float], None] = lambda started: None) -> None:
        self.interval = interval
        self._args = args
        self._exclude = exclude
        self._repair = repair
        self._last_change = last_change
        self.log = log
        self._child = child
        # told the start (monotonic) of each audit that found no divergence and lost no
        # announcement (the heartbeat's promise after a resync may wait for one)
        self._clean = clean
        # open and close the daemon's record of what it applied meanwhile: a change it
        # had not applied when the child read the maps is in flight, not a divergence
        self._open, self._close = window
        self._lock = asyncio.Lock()
        self.stats = AuditStats()
        self._wake = asyncio.Event()
        self._retry: float | None = None  # delay of the pending re-audit
        self._ended = 0.0  # monotonic end of the last audit
        self._child_seconds = 0.0  # how long the last audit's child ran
        self._urgent = False  # a resync's dump met changes: judge everything soon

    def request(self, urgent: bool = True) -> None:
        """Audit after a resync: ``urgent`` as soon as the rules allow (its dump met
        changes), else once the kernel is quiet (or at the next interval)."""
        self._urgent = self._urgent or urgent
        self._retry = 0.0 if self._urgent else self.interval
        self._wake.set()

    def set_interval(self, interval: float) -> None:
        self.interval = interval
        self._wake.set()

    async def run(self) -> None:
        while True:
            await self._wait_turn()
            await self.audit_once()

    async def _wait_turn(self) -> None:
        """Until the interval elapses, or a requested or pending audit may start."""
        deadline = time.monotonic() + self.interval
        while True:
            now = time.monotonic()
            if not self.interval:
                pass  # off: only a reload that sets an interval wakes it
            elif self._retry is not None:
                # A quiet kernel starts it at once: the audit then competes with no
                # change, and sees a static kernel. While changes go on, it waits for
                # its retry delay and for twice the last child's run time (a child
                # that ran during a storm, niced behind the daemon and the changes,
                # may have been slow for lack of CPU, not for work).
                quiet = now - self._last_change() >= QUIET
                earliest = self._ended + 2 * self._child_seconds
                due = self._ended + self._retry <= now
                if quiet or (due and now >= earliest):
                    return
            elif now >= deadline:
                return
            self._wake.clear()
            await wait_event(self._wake, 0.1)

    async def audit_once(self) -> dict[str, Any] | None:
        """One audit now (after the one running, if any); its report, None if it failed."""
        async with self._lock:
            return await self._audit()

    async def _audit(self) -> dict[str, Any] | None:
        s = self.stats
        t0 = time.monotonic()
        args = dict(self._args(), exclude=[str(p) for p in self._exclude()])
        self._open()
        try:
            report = await self._child(args)
            self._child_seconds = time.monotonic() - t0
        except (RuntimeError, OSError, ValueError) as exc:
            await self._close()
            s.failures += 1
            s.last_result = "failed"
            self._ended = time.monotonic()
            # urgent (a resync's tables wait for it): again soon, backing off; else at
            # the next interval
            self._retry = self._backoff() if self._urgent else self.interval
            self.log.error("audit.error", error=str(exc))
            return None
        self._judge(report, await self._close())
        s.runs += 1
        s.last_at = time.time()
        s.last_seconds = time.monotonic() - t0
        s.last_checked = report["checked"]
        s.last_in_flight = report["in_flight"]
        self._ended = time.monotonic()
        differences = report["differences"]
        if differences:
            s.divergences += len(differences)
            s.repairs += 1
            s.last_result = "diverged"
            for d in differences[:LOGGED]:
                self.log.warning("audit.divergence", prefix=d["prefix"], kernel=d["kernel"],
                                 maps=d["maps"])
            self.log.warning("audit.repair", divergences=len(differences),
                             note="resyncing: the maps get what the kernel holds")
            self._retry = None  # the resync asks for its own audit
            self._urgent = False
            self._repair([Prefix.parse(d["prefix"]) for d in differences])
        elif report["in_flight"] or report["overrun"]:
            s.last_result = "inconclusive"
            if not report["overrun"]:
                # what it could not judge changed meanwhile, and its changes are applied
                self._clean(t0)
            # urgent: again soon, backing off while the kernel keeps changing; else
            # once the kernel is quiet, or at the next interval
            self._retry = self._backoff() if self._urgent else self.interval
            self.log.debug("audit.inconclusive", in_flight=report["in_flight"],
                           overrun=report["overrun"], retry=self._retry)
        else:
            s.last_result = "equal"
            self._clean(t0)
            self._retry = None
            self._urgent = False
            self.log.info("audit.equal", checked=report["checked"],
                          seconds=round(s.last_seconds, 2))
        return report

    def _backoff(self) -> float:
        """The next retry of an urgent audit: FIRST_RETRY, doubling up to the interval."""
        return min(self.interval, max(FIRST_RETRY, 2 * (self._retry or 0)))

    @staticmethod
    def _judge(report: dict[str, Any], inflight: InFlight) -> None:
        """Leave out the differences the daemon's own changes explain."""
        kept = []
        for d in report["differences"]:
            kernel, maps = (entry_of(d[side]) if d[side] else None for side in ("kernel", "maps"))
            if inflight.judges(Prefix.parse(d["prefix"]), kernel, maps, set(d.get("nhids", ()))):
                kept.append(d)
        report["in_flight"] += len(report["differences"]) - len(kept)
        report["differences"] = kept
        report["equal"] = not kept

    def doc(self) -> dict[str, Any]:
        s = self.stats
        return {"interval": self.interval, "runs": s.runs, "divergences": s.divergences,
                "repairs": s.repairs, "failures": s.failures, "last_result": s.last_result,
                "last_at": s.last_at, "last_seconds": round(s.last_seconds, 3),
                "last_checked": s.last_checked, "last_in_flight": s.last_in_flight,
                "pending": self._retry is not None}


__all__ = ["AuditStats", "Auditor", "run_child"]
