"""The daemon's audit loop, with a fake verify child: what it counts, repairs and retries."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import structlog

from fibsync.audit import Auditor
from fibsync.model import Change, Op, Prefix, Route
from fibsync.verify import InFlight


def report(differences: tuple[str, ...] = (), in_flight: int = 0, overrun: bool = False
           ) -> dict[str, Any]:
    return {"equal": not differences, "checked": 10, "in_flight": in_flight, "overrun": overrun,
            "changes_during": 0, "seconds": 0.01,
            "differences": [{"prefix": p, "kernel": None,
                             "maps": {"prefix": p, "type": "blackhole", "nexthops": []}}
                            for p in differences]}


class Fake:
    def __init__(self, *reports: dict[str, Any]) -> None:
        self.reports = list(reports)
        self.args: list[dict[str, Any]] = []
        self.repaired: list[list[Prefix]] = []
        self.clean: list[float] = []  # the starts of the audits that found no divergence

    async def child(self, args: dict[str, Any]) -> dict[str, Any]:
        self.args.append(args)
        return self.reports.pop(0)

    def auditor(self, interval: float = 300) -> Auditor:
        return Auditor(interval, lambda: {"pin_dir": "/x", "table": 254, "protocols": []},
                       lambda: {Prefix.parse("192.0.2.0/24")}, self.repaired.append,
                       lambda: 0.0, structlog.get_logger(), child=self.child,
                       clean=self.clean.append)


def retries(auditor: Auditor, audits: int) -> list[float | None]:
    """The retry delay after each of ``audits`` audits in a row (None: none pending)."""
    async def go() -> list[float | None]:
        delays = []
        for _ in range(audits):
            await auditor.audit_once()
            delays.append(auditor._retry)
        return delays

    return asyncio.run(go())


def test_a_divergence_is_counted_and_repaired() -> None:
    fake = Fake(report(("198.51.100.0/24", "2001:db8::/48")))
    auditor = fake.auditor()
    asyncio.run(auditor.audit_once())
    assert auditor.stats.divergences == 2 and auditor.stats.repairs == 1
    assert fake.repaired == [[Prefix.parse("198.51.100.0/24"), Prefix.parse("2001:db8::/48")]]
    assert fake.args[0]["exclude"] == ["192.0.2.0/24"]  # a full map's casualties
    assert auditor.doc()["last_result"] == "diverged"


def test_equal_needs_no_repair() -> None:
    fake = Fake(report())
    auditor = fake.auditor()
    asyncio.run(auditor.audit_once())
    assert (auditor.stats.runs, auditor.stats.divergences, fake.repaired) == (1, 0, [])
    assert not auditor.doc()["pending"]


def test_an_urgent_audit_that_could_not_judge_runs_again_soon_and_backs_off() -> None:
    """After a resync whose dump met changes: the dump may have skipped live routes."""
    fake = Fake(report(in_flight=3), report(in_flight=1), report())
    auditor = fake.auditor()
    auditor.request(urgent=True)
    assert retries(auditor, 3) == [1.0, 2.0, None]


def test_any_other_audit_that_could_not_judge_waits_for_a_quiet_kernel() -> None:
    """A periodic audit, or one after a dump that met no change, is not run again at a
    third of a core while a storm goes on: once the kernel is quiet, or at the interval."""
    fake = Fake(report(in_flight=3), report())
    changing = [True]

    def last_change() -> float:
        return time.monotonic() if changing[0] else 0.0

    auditor = Auditor(300, lambda: {}, set, fake.repaired.append, last_change,
                      structlog.get_logger(), child=fake.child)
    auditor.request(urgent=False)

    async def go() -> tuple[int, int]:
        task = asyncio.create_task(auditor.run())
        for _ in range(50):  # the first one starts at once: nothing ran before
            await asyncio.sleep(0.02)
            if auditor.stats.runs:
                break
        await asyncio.sleep(1.5)  # the urgent backoff would have run it again by now
        during_storm = auditor.stats.runs
        changing[0] = False
        for _ in range(50):
            await asyncio.sleep(0.02)
            if auditor.stats.runs > during_storm:
                break
        task.cancel()
        return during_storm, auditor.stats.runs

    assert asyncio.run(go()) == (1, 2)
    assert auditor.doc()["last_result"] == "equal" and not auditor.doc()["pending"]


def test_the_loop_runs_a_requested_audit_at_once_when_the_kernel_is_quiet() -> None:
    fake = Fake(report(), report())
    auditor = fake.auditor(interval=300)

    async def go() -> int:
        task = asyncio.create_task(auditor.run())
        auditor.request()
        for _ in range(50):
            await asyncio.sleep(0.02)
            if auditor.stats.runs:
                break
        task.cancel()
        return auditor.stats.runs

    assert asyncio.run(go()) == 1


def test_interval_zero_turns_the_audit_off() -> None:
    fake = Fake(report())
    auditor = fake.auditor(interval=0)

    async def go() -> int:
        task = asyncio.create_task(auditor.run())
        auditor.request()
        await asyncio.sleep(0.3)
        task.cancel()
        return auditor.stats.runs

    assert asyncio.run(go()) == 0


def test_a_failed_child_is_counted_not_fatal() -> None:
    async def broken(_args: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError("verify child exited with 1: boom")

    auditor = Auditor(300, dict, set, lambda _p: None, lambda: 0.0, structlog.get_logger(),
                      child=broken)
    assert asyncio.run(auditor.audit_once()) is None
    assert auditor.stats.failures == 1 and auditor.doc()["last_result"] == "failed"


def test_what_the_daemon_applied_meanwhile_is_in_flight() -> None:
    """A difference the daemon's own backlog explains (it had not applied the delete
    when the child read the maps) is left out, not called a divergence."""
    fake = Fake(report(("198.51.100.0/24", "203.0.113.0/24")))
    window = InFlight()

    async def close() -> InFlight:
        window.note(Change(Op.DEL, Route(Prefix.parse("198.51.100.0/24"))))
        return window

    auditor = Auditor(300, dict, set, fake.repaired.append, lambda: 0.0,
                      structlog.get_logger(), child=fake.child, window=(lambda: None, close))
    doc = asyncio.run(auditor.audit_once())
    assert doc is not None and doc["in_flight"] == 1
    assert [d["prefix"] for d in doc["differences"]] == ["203.0.113.0/24"]
    assert fake.repaired == [[Prefix.parse("203.0.113.0/24")]]


def test_waiting_for_the_daemons_backlog_does_not_hold_the_next_audit_off() -> None:
    """An audit whose window closes only after the daemon applied a storm's backlog lasted
    minutes, and the next one waited twice that: the duty cycle counts the child alone."""
    fake = Fake(report(in_flight=1), report())

    async def slow_close() -> InFlight:
        await asyncio.sleep(0.6)  # the daemon's backlog being applied
        return InFlight()

    auditor = Auditor(300, dict, set, fake.repaired.append, lambda: 0.0,
                      structlog.get_logger(), child=fake.child, window=(lambda: None, slow_close))

    async def go() -> float:
        await auditor.audit_once()  # inconclusive: another one is due soon
        started = time.monotonic()
        task = asyncio.create_task(auditor.run())
        while auditor.stats.runs < 2:
            await asyncio.sleep(0.02)
        task.cancel()
        return time.monotonic() - started

    assert asyncio.run(go()) < 1.2  # its own 0.6 s, not 2 x 0.6 s of waiting first


def test_an_audit_that_found_no_divergence_says_when_it_began() -> None:
    # the heartbeat's promise after a resync whose dump met changes waits for one:
    # equal, or unable to judge only what changed meanwhile (those changes are
    # applied); not one that diverged, nor one that lost announcements
    fake = Fake(report(), report(in_flight=2), report(("198.51.100.0/24",)),
                report(overrun=True))
    auditor = fake.auditor()
    starts = []
    for _ in range(4):
        starts.append(time.monotonic())
        asyncio.run(auditor.audit_once())
    assert len(fake.clean) == 2
    assert starts[0] <= fake.clean[0] <= starts[1] <= fake.clean[1] <= starts[2]


def test_an_urgent_audit_whose_child_failed_runs_again_soon() -> None:
    # after a resync whose dump met changes the tables wait for an audit: a child that
    # failed (killed, out of memory) is tried again soon, backing off, not only at the
    # next interval
    async def broken(_args: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError("verify child exited with -9: killed")

    auditor = Auditor(300, dict, set, lambda _p: None, lambda: 0.0, structlog.get_logger(),
                      child=broken)
    auditor.request(urgent=True)
    assert retries(auditor, 3) == [1.0, 2.0, 4.0]
    calm = Auditor(300, dict, set, lambda _p: None, lambda: 0.0, structlog.get_logger(),
                   child=broken)
    asyncio.run(calm.audit_once())
    assert calm._retry == 300  # a periodic audit: at the next interval
