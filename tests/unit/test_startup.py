"""The first sync's attach: beside the write while the tables' promise is withheld (the
program then reads none of the tables being written), after it otherwise."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import pytest

from fibsync.config import Settings
from fibsync.daemon import Daemon
from fibsync.errors import InterfaceError


class Attachments:
    def __init__(self, fail: Exception | None = None) -> None:
        self.release = threading.Event()
        self.threads: list[int] = []
        self.fail = fail

    def attach_all(self) -> None:
        self.threads.append(threading.get_ident())
        assert self.release.wait(10), "never released"
        if self.fail is not None:
            raise self.fail


def daemon(withheld: bool, fail: Exception | None = None) -> Daemon:
    d = Daemon(Settings(instance="t", interfaces=("x0",)))
    d.heartbeat = SimpleNamespace(withheld=withheld)  # type: ignore[assignment]
    d.xdp = Attachments(fail)  # type: ignore[assignment]
    return d


def test_while_the_tables_are_withheld_the_program_is_attached_beside_the_first_write(
) -> None:
    d = daemon(withheld=True)
    xdp: Attachments = d.xdp  # type: ignore[assignment]
    d._on_resync_start()  # returns while the attach still runs (it waits for release)
    xdp.release.set()
    d._attach_all()  # the write is done: wait for the attach
    assert len(xdp.threads) == 1 and xdp.threads[0] != threading.get_ident()


def test_an_attach_beside_the_write_fails_the_first_sync_as_one_after_it_would() -> None:
    d = daemon(withheld=True, fail=InterfaceError("cannot attach XDP to x0"))
    d._on_resync_start()
    d.xdp.release.set()  # type: ignore[union-attr]
    with pytest.raises(InterfaceError, match="cannot attach XDP to x0"):
        d._attach_all()


def test_with_no_promise_to_withhold_the_program_is_attached_after_the_write() -> None:
    # stale_after = 0: the program trusts whatever tables it finds
    d = daemon(withheld=False)
    xdp: Attachments = d.xdp  # type: ignore[assignment]
    xdp.release.set()
    d._on_resync_start()
    assert not xdp.threads
    d._attach_all()
    assert xdp.threads == [threading.get_ident()]


def test_a_resync_once_synced_attaches_nothing() -> None:
    d = daemon(withheld=True)
    d.state = "synced"
    d._on_resync_start()
    assert not d.xdp.threads  # type: ignore[union-attr]


def test_the_daemon_collects_cycles_less_often_than_python_does(monkeypatch: pytest.MonkeyPatch
                                                                 ) -> None:
    """daemon.main relaxes the cyclic GC before the first sync (process.relax_gc)."""
    import gc

    import uvloop

    from fibsync import daemon as daemon_module
    from fibsync import process

    seen = []

    def run(coro: object) -> None:
        seen.append(gc.get_threshold())
        coro.close()  # type: ignore[attr-defined]

    monkeypatch.setattr(uvloop, "run", run)
    monkeypatch.setattr(daemon_module.logging, "configure", lambda *a: None)
    monkeypatch.setattr(daemon_module, "fix_mmap_threshold", lambda: None)
    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        assert daemon_module.main(Settings(instance="t", interfaces=("x0",)), {},
                                  lambda e: None) == 0
    finally:
        gc.set_threshold(*before)
    assert seen == [(process.GC_YOUNG, 10, 10)] and process.GC_YOUNG > 700


def test_a_wait_between_polls_keeps_a_cancellation_that_comes_with_its_event() -> None:
    # asyncio.wait_for on Python 3.11 returned instead (gh-86296): an interfaces watcher
    # stopped as a notification woke it ran on, and its test's teardown waited forever
    import uvloop

    from fibsync.process import wait_event

    async def stopped_as_woken() -> bool:
        event = asyncio.Event()
        task = asyncio.create_task(wait_event(event, 10))
        await asyncio.sleep(0)
        event.set()
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            return True
        return False

    assert uvloop.run(stopped_as_woken())

    async def times_out() -> bool:
        return await wait_event(asyncio.Event(), 0.01)

    assert uvloop.run(times_out()) is False
