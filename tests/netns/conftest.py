"""Fixtures for tests that build namespaces and run FRR or BIRD in them.

Every fixture cleans up after itself even when the test fails: namespaces are
deleted with everything still running inside them, daemons are stopped by
their pid files, run directories are removed.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fibsync.demo import RouterDaemon
from fibsync.lab import RUN_ROOT, Bird, Frr, Lab, Netns


@pytest.fixture
def lab(unique_prefix: str) -> Iterator[Lab]:
    """The demo topology, up, under a name no other test uses.

    The name differs from ``unique_prefix`` so that namespaces the test makes
    with ``netns_factory`` never collide with the lab's own.
    """
    topology = Lab(f"{unique_prefix}-lab")
    try:
        topology.up()
        yield topology
    finally:
        topology.down()


@pytest.fixture
def fibsync(lab: Lab) -> Iterator[RouterDaemon]:
    """fibsync running on the lab's router, synced; stopped and its pins removed after."""
    daemon = RouterDaemon.for_lab(lab)
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.stop()
        daemon.remove_pins()


@pytest.fixture
def lab_rundir(unique_prefix: str) -> Iterator[Path]:
    """A run directory for this test's daemons (under /run: FRR must reach it)."""
    path = RUN_ROOT / unique_prefix
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def netns_factory(unique_prefix: str) -> Iterator[Callable[[str], Netns]]:
    """``make(suffix)`` creates namespace ``<unique_prefix>-<suffix>``."""
    made: list[Netns] = []

    def make(suffix: str) -> Netns:
        ns = Netns(f"{unique_prefix}-{suffix}")
        made.append(ns)
        return ns.create()

    try:
        yield make
    finally:
        for ns in reversed(made):
            ns.delete()


@pytest.fixture
def frr_factory(lab_rundir: Path) -> Iterator[Callable[[Netns], Frr]]:
    """``make(ns)`` returns an (unstarted) Frr for ``ns``; stopped at the end."""
    made: list[Frr] = []

    def make(ns: Netns) -> Frr:
        frr = Frr(ns, lab_rundir / f"frr-{ns.name}")
        made.append(frr)
        return frr

    try:
        yield make
    finally:
        for frr in made:
            frr.stop()


@pytest.fixture
def bird_factory(lab_rundir: Path) -> Iterator[Callable[[Netns], Bird]]:
    """``make(ns)`` returns an (unstarted) Bird for ``ns``; stopped at the end."""
    made: list[Bird] = []

    def make(ns: Netns) -> Bird:
        bird = Bird(ns, lab_rundir / f"bird-{ns.name}")
        made.append(bird)
        return bird

    try:
        yield make
    finally:
        for bird in made:
            bird.stop()


@pytest.fixture
def router(topo: Any) -> Iterator[Any]:
    """The fidelity tests' fibsync on r (tests/netns/fidelity.py's Router, started by
    the test): stopped and its pins removed afterwards. Each of those modules has its
    own ``topo`` fixture, the topology it needs; modules with a ``router`` of their
    own (test_datapath) keep theirs."""
    from tests.netns.fidelity import Router

    r = Router(topo)
    try:
        yield r
    finally:
        r.stop()
