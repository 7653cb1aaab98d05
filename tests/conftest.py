"""Shared test policy.

Tests marked ``privileged`` need root, network namespaces and BPF. Where they
cannot run they skip on a developer's machine, and fail in CI (``CI=true``):
a privileged test that silently skips in CI would let the fast path break
unnoticed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _privilege_problem() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("ip", "bpftool"):
        if shutil.which(tool) is None:
            return f"needs {tool} on PATH (run `make bootstrap`)"
    name = f"fsprobe{uuid.uuid4().hex[:6]}"
    probe = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot create a network namespace: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


_problem: str | None | bool = False


def require_privileges() -> None:
    """Skip (or, in CI, fail) the calling test when it cannot run here."""
    global _problem
    if _problem is False:
        _problem = _privilege_problem()
    if _problem:
        if IN_CI:
            pytest.fail(f"privileged test cannot run in CI: {_problem}")
        pytest.skip(_problem)


@pytest.fixture(autouse=True)
def _privileged_gate(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("privileged"):
        require_privileges()


@pytest.fixture
def unique_prefix() -> str:
    """A short prefix for namespaces, pins and processes that no other test uses."""
    return f"fst{uuid.uuid4().hex[:5]}"
