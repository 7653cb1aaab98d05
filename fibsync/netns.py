"""Entering a named network namespace, and noticing `ip netns exec`.

fibsync's pins must live in the host's bpffs: a restarted daemon adopts them
and the CLI reads them. `ip netns exec` gives the command a private mount
namespace with a fresh /sys, where /sys/fs/bpf is no bpffs and anything
mounted there dies with the process. ``--netns NAME`` switches the network
namespace only (like ``nsenter --net``), so the host's bpffs stays in view.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator
from pathlib import Path

from .errors import UsageError

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = Path("/run/netns")


def enter(name: str) -> None:
    path = NETNS_RUN_DIR / name if "/" not in name else Path(name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise UsageError(f"network namespace {name!r} does not exist (see `ip netns list`)") \
            from None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise UsageError(f"cannot enter network namespace {name!r}: {os.strerror(err)}")
    finally:
        os.close(fd)


@contextlib.contextmanager
def inside(name: str | Path) -> Iterator[None]:
    """The body runs with this thread (only) in network namespace ``name`` (a name
    under /run/netns, or a path); sockets made there stay there. For tests and
    benchmarks; the daemon enters its namespace once, with ``enter``."""
    path = NETNS_RUN_DIR / name if isinstance(name, str) and "/" not in name else Path(name)
    libc = ctypes.CDLL(None, use_errno=True)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(path, os.O_RDONLY)
        try:
            if libc.setns(target, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns into {path}")
            try:
                yield
            finally:
                if libc.setns(home, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns back home")
        finally:
            os.close(target)
    finally:
        os.close(home)


def private_sysfs() -> str | None:
    """The namespace name when running under `ip netns exec` (its /sys is that netns' sysfs,
    and no bpffs is mounted below it); None otherwise."""
    sys_source = None
    bpffs = False
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) < 3:
                continue
            if fields[1] == "/sys" and fields[2] == "sysfs":
                sys_source = fields[0]
            elif fields[1] == "/sys/fs/bpf" and fields[2] == "bpf":
                bpffs = True
    if sys_source and sys_source != "sysfs" and not bpffs and \
            (NETNS_RUN_DIR / sys_source).exists():
        return sys_source
    return None


def refuse_private_sysfs() -> None:
    name = private_sysfs()
    if name:
        raise UsageError(
            f"running under `ip netns exec {name}`, which hides the host's bpffs (pins would "
            f"die with this process): use `fibsync --netns {name} …` or "
            f"`nsenter --net=/run/netns/{name} fibsync …`")
