"""Fixtures for the XDP program tests: one loaded program per session,
empty maps per test, throwaway namespaces."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from fibsync.fastpath import program
from tests.bpf.harness import TEST_SIZES, Dir24Memory, Lab, netns
from tests.conftest import require_privileges


@pytest.fixture(scope="session")
def fastpath() -> Iterator[program.FastPath]:
    # Session fixtures run before the per-test privilege gate: check here too.
    require_privileges()
    instance = f"fst{uuid.uuid4().hex[:5]}"
    fp = program.FastPath.load(instance, sizes=TEST_SIZES)
    try:
        yield fp
    finally:
        fp.close()
        program.remove(instance)


@pytest.fixture(scope="session")
def table_ns(fastpath: program.FastPath) -> Iterator[str]:
    """A bare namespace (lo only, forwarding off) for the table-driven runs."""
    with netns(f"fst{uuid.uuid4().hex[:5]}tbl") as name:
        yield name


@pytest.fixture(scope="session")
def dir24_memory(fastpath: program.FastPath) -> Dir24Memory:
    return Dir24Memory(fastpath)


@pytest.fixture
def lab(fastpath: program.FastPath, table_ns: str, dir24_memory: Dir24Memory) -> Lab:
    lab = Lab(fastpath, table_ns, dir24_memory)
    lab.clear()
    return lab
