"""Process plumbing kept out of the daemon's loop: sd_notify, the instance lock,
giving freed memory back.

None of it knows about routes or maps; the daemon calls it at the points of its
lifecycle (lock before anything is touched, READY=1 after the first sync,
WATCHDOG=1 from the housekeeping loop, memory back after each full sync).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import gc
import os
import socket
import time

from .config import Settings
from .errors import DaemonError


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait at most ``timeout`` seconds for ``event``; True if it is set.

    What the daemon's loops wait on between polls. ``asyncio.wait_for`` on Python
    3.11 drops a cancellation that comes in the loop iteration the event is set in
    (it returns the result instead: CPython gh-86296, fixed in 3.12): a watcher or
    the auditor cancelled at that moment ran on, and what awaited it (the daemon's
    stop, a test's teardown) waited forever. ``asyncio.timeout`` keeps it.
    """
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await event.wait()
    return event.is_set()


class SdNotify:
    """Minimal sd_notify(3): one datagram per message to $NOTIFY_SOCKET."""

    def __init__(self) -> None:
        self.addr = os.environ.get("NOTIFY_SOCKET", "")
        if self.addr.startswith("@"):
            self.addr = "\0" + self.addr[1:]
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        enabled = usec.isdigit() and (not pid.isdigit() or int(pid) == os.getpid())
        self.watchdog = int(usec) / 1e6 if enabled else 0.0
        self._last_ping = 0.0
        self._status = ""

    def send(self, message: str) -> None:
        """Never blocks: a receiver that does not read (its queue holds only
        net.unix.max_dgram_qlen datagrams) must not stall the event loop."""
        if not self.addr:
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s, contextlib.suppress(OSError):
            s.setblocking(False)
            s.sendto(message.encode(), self.addr)

    def status(self, text: str) -> None:
        if text != self._status:
            self._status = text
            self.send(f"STATUS={text}")

    def ping(self, force: bool = False) -> None:
        """WATCHDOG=1, at a third of the watchdog interval (or now, when forced)."""
        now = time.monotonic()
        if self.watchdog and (force or now - self._last_ping >= self.watchdog / 3):
            self.send("WATCHDOG=1")
            self._last_ping = now


class InstanceLock:
    """One daemon per instance: an flock on /run/fibsync/<instance>.lock holding its pid."""

    def __init__(self, settings: Settings) -> None:
        self.path = settings.lock_file
        self.instance = settings.instance
        self.fd = -1

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise DaemonError(f"instance {self.instance!r} already runs (pid {pid}); stop "
                                  f"it first, or give this one another --instance") from None
            # a daemon that stopped meanwhile unlinked the file we locked: lock the new one
            try:
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        """Unlink while still holding the lock: whoever opened the file meanwhile sees it
        gone after locking it, and starts over on a new one."""
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                self.path.unlink()
            os.close(self.fd)
            self.fd = -1


# mallopt(3)'s M_MMAP_THRESHOLD
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 128 * 1024


def fix_mmap_threshold() -> None:
    """Keep glibc from raising its mmap threshold: blocks above 128 KiB are mapped
    on their own, and go back to the system when freed.

    By default glibc raises the threshold to the size of each mapped block freed
    (up to 32 MiB). After a full table's sync has freed its big arrays, every
    later array under that size came from the heap and thread arenas, whose
    free pages ``release_memory`` could not all return: the daemon's RSS after
    a full table was 245 MB with the dynamic threshold, 181-185 MB with this one
    (measured; setting it turns the adjustment off).
    """
    with contextlib.suppress(AttributeError, OSError):
        ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)


# young objects the cyclic GC lets accumulate before it collects them (CPython: 700)
GC_YOUNG = 10_000


def relax_gc() -> None:
    """Run the cyclic garbage collector ~14 times less often.

    The daemon's objects are freed by their reference counts; the collector is
    for cycles, which it makes few of. With CPython's default a storm's
    notifications triggered a collection every ~50 messages, and their decoding
    paid for it: 7.7-9.7 against 4.2-4.6 µs a message (bench_apply.py, the same
    recorded burst at the full table). Freezing the table's objects after a sync
    (gc.freeze) was not taken: a resync leaves the old RIB as cycles, which frozen
    objects would keep for good.
    """
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG, older, oldest)


def release_memory() -> None:
    """Give the memory a sync freed back to the system.

    A full table's dump and first write allocate and free ~150 MB of arrays;
    glibc keeps freed memory in its arenas (one per thread that allocated),
    so the daemon's RSS would stay that much higher for good. malloc_trim
    returns it (~30 ms; 430 -> 290 MB measured after a full table).
    """
    with contextlib.suppress(AttributeError, OSError):
        ctypes.CDLL(None).malloc_trim(0)
