"""One loop of the stress harness of issue 10: an exact mirror under overruns.

A loop builds the churn world in a namespace with tens of thousands of IPv4
and IPv6 routes (``StressChurn.prefill``), starts fibsync there with a given
netlink receive buffer (small ones force ENOBUFS and so resyncs: re-dumps of
the kernel while it changes), applies a long seeded stream of mixed changes
with ``ip -force -batch`` in the given ``nexthop_compat_mode``, and then
compares everything fibsync's maps hold with what the kernel holds (routes,
next hops, weights, MACs, MTUs: ``kernel_view``) until they are equal or a
deadline passes. It reports the differences (by family: prefixes fibsync
lacks, holds in excess, holds wrong), how long equality took, and the
daemon's overrun and resync counts.

Every loop is replayable from its seed: with the compat mode and the buffer,
the seed decides the prefixes, the prefill, the changes and their pacing
(bursts with ``ip -force -batch``, lulls fed to ``ip -force -batch -`` at a
set rate); whether a dump meets a change is still a race, so a replay makes
the same storm, not always the same loss. ``run_loop`` prints the seed
before anything else.

Why it exists: the kernel's IPv6 route dump resumes after a change to the
tree by skipping as many nodes as it had already dumped
(net/ipv6/ip6_fib.c, fib6_dump_table: ``w->skip = w->count``). A route
deleted before the dump's cursor, with any add between two recv() calls,
makes the dump silently skip a live route; a mirror that trusts such a dump
after an overrun misses routes for good. Only many IPv6 adds *and* deletes
during dumps that take many recv() calls show it, hence the scale.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fibsync.demo import RouterDaemon
from fibsync.lab import RUN_ROOT, Netns

from .churn import MARKER, MARKER_TABLE, StressChurn, World
from .kernel_view import View, differences, fibsync_view, kernel_view
from .test_mirror import batch

DEFAULT_CHANGES = 200_000
SETTLE_TIMEOUT = 60.0  # seconds the differences stay the same before they are final
MAX_SETTLE = 300.0  # seconds after the last change, whatever the differences do
SMALL_RCVBUFS = (4096, 16384, 65536)
DEFAULT_RCVBUF = 64 << 20  # the daemon's (fibsync/config.py)
# what the kernel charges a receive buffer for one route notification (measured: a
# buffer of N bytes, doubled by the kernel, holds 2N / 1280 of them)
NOTIFICATION_BYTES = 1280
RESYNC_SECONDS = 4.0  # a resync of the prefilled table blocks the daemon about this long
LAST_LULL_MAX = 45.0  # seconds the last lull may go on waiting for the daemon's resync
LAST_LULL_RATE = 300.0  # changes per second in the last lull at most


@dataclass(frozen=True)
class Segment:
    """A run of consecutive changes: ``rate`` lines per second, or None: at full speed."""

    lines: int
    rate: float | None = None


def lull_rate(rcvbuf: int | None) -> float:
    """Changes per second that a receive buffer carries through a resync.

    The daemon reads no events while it hands a snapshot to the RIB: what
    arrives meanwhile must fit the buffer, or the session overruns again.
    """
    capacity = 2 * (rcvbuf or DEFAULT_RCVBUF) / NOTIFICATION_BYTES
    return min(2000.0, max(1.0, capacity / RESYNC_SECONDS))


def schedule(seed: int, changes: int, rcvbuf: int | None, lull_seconds: float = 3.0,
             last_lull_seconds: float = 12.0) -> list[Segment]:
    """Bursts at full speed with lulls between them, ending in a longer lull.

    A burst overruns small receive buffers (and, with nexthop_compat_mode 1,
    larger ones); the daemon then resyncs. The resync whose dump the mirror
    keeps is one that runs while the kernel still changes, slowly enough for
    the buffer to carry the session through (``lull_rate``): the lulls go at
    a quarter to twice that rate. The last lull, at a rate the buffer carries
    with room to spare, lasts at least ``last_lull_seconds`` and, while the
    loop runs, goes on until the daemon has completed a resync after its last
    overrun (``ResyncWatch``): the resync the mirror ends with is then one
    whose dump ran while the kernel changed.
    """
    rng = random.Random(seed * 31 + 7)
    base = lull_rate(rcvbuf)
    lulls = []
    for _ in range(rng.randint(3, 5)):
        rate = base * rng.choice((0.25, 0.5, 1.0, 2.0))
        lulls.append(Segment(max(1, int(rate * lull_seconds)), rate))
    # mostly IPv6 deletes (StressChurn.tree_step): at most 300/s, so that the pool lasts
    rate = min(LAST_LULL_RATE, base * rng.choice((0.5, 0.75)))
    last = Segment(max(1, int(rate * last_lull_seconds)), rate)
    left = changes - sum(s.lines for s in [*lulls, last])
    if left <= len(lulls):
        return [Segment(changes)]
    cuts = sorted(rng.sample(range(1, left), len(lulls)))
    bursts = [Segment(b - a) for a, b in zip([0, *cuts], [*cuts, left], strict=True)]
    out = []
    for burst, lull in zip(bursts, [*lulls, last], strict=True):
        out += [burst, lull]
    return out


def paced(ns: Netns, lines: list[str], rundir: Path, rate: float,
          more: Callable[[], list[str]] | None = None,
          until: Callable[[], bool] | None = None) -> int:
    """Apply ``lines`` at about ``rate`` per second through one ``ip -force -batch -``.

    With ``more`` and ``until``: once the lines run out, ``until()`` says whether
    to stop, and if not, ``more()`` gives the next lines. Ends with churn's
    marker and recovers from iproute2 exiting mid-stream the way test_mirror's
    ``batch()`` does: from just after the last line it reported failing; a
    stream that never reaches its marker fails the test. Returns the number
    of lines streamed (the marker and lines sent again not counted).
    """
    err_path = rundir / "paced.err"
    ns.run(["ip", "route", "flush", "table", str(MARKER_TABLE)], check=False)
    marker = f"route replace {MARKER} dev lo table {MARKER_TABLE}"
    todo = list(lines)
    total = len(todo)
    stderr = ""
    for _ in range(20):
        with open(err_path, "w") as err:
            proc = ns.popen(["ip", "-force", "-batch", "-"], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=err, text=True)
        assert proc.stdin is not None
        start = time.monotonic()
        sent = 0
        try:
            while True:
                if sent == len(todo):
                    if more is None or until is None or until():
                        break
                    extra = more()
                    todo += extra
                    total += len(extra)
                proc.stdin.write(todo[sent] + "\n")
                proc.stdin.flush()
                sent += 1
                ahead = start + sent / rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
            proc.stdin.write(marker + "\n")
            proc.stdin.close()
        except BrokenPipeError:
            pass
        proc.wait(timeout=120)
        stderr = err_path.read_text()
        if has_marker(ns):
            return total
        failed = [int(n) for n in re.findall(r"Command failed -:(\d+)", stderr)]
        todo = todo[max(failed, default=0):]
    raise AssertionError(f"the paced stream never reached its end: {stderr[-500:]}")


class ResyncWatch:
    """Whether the daemon, since the watch began, completed a resync after its last
    overrun and kept that session ``hold`` seconds (``fibsync status --json``)."""

    def __init__(self, daemon: RouterDaemon, hold: float = 3.0) -> None:
        self.daemon = daemon
        self.hold = hold
        self.counts = self._counts()
        self.overrun_at: float | None = None
        self.resync_at: float | None = None

    def _counts(self) -> tuple[int, int] | None:
        netlink = self.daemon.status().get("netlink") or {}
        if "overruns" not in netlink:
            return None  # too busy to answer
        return netlink["overruns"], netlink["resyncs"]

    def settled(self) -> bool:
        counts, now = self._counts(), time.monotonic()
        if counts is not None:
            if self.counts is not None and counts[0] > self.counts[0]:
                self.overrun_at = now
            if self.counts is not None and counts[1] > self.counts[1]:
                self.resync_at = now
            self.counts = counts
        if self.overrun_at is None:
            return True
        return (self.resync_at is not None and self.resync_at >= self.overrun_at
                and now - self.resync_at >= self.hold)


def last_lull(ns: Netns, rundir: Path, churn: StressChurn, lines: list[str], rate: float,
              watch: ResyncWatch) -> int:
    """``lines`` paced, then more, until the resync the mirror ends with has run in the
    lull (or ``LAST_LULL_MAX`` seconds); returns the number of lines."""
    start = time.monotonic()

    def more() -> list[str]:
        return churn.steps(max(1, int(2 * rate)), tree=True)

    def until() -> bool:
        return time.monotonic() - start >= LAST_LULL_MAX or watch.settled()

    return paced(ns, lines, rundir, rate, more, until)


def has_marker(ns: Netns) -> bool:
    r = ns.run(["ip", "-j", "route", "show", "table", str(MARKER_TABLE)], check=False)
    return r.returncode == 0 and any(m["dst"] == MARKER.split("/")[0]
                                     for m in json.loads(r.stdout or "[]"))


@dataclass(frozen=True)
class Loop:
    """What decides a loop: replay one with the same four values."""

    seed: int
    compat: int  # net.ipv4.nexthop_compat_mode
    rcvbuf: int | None  # --netlink-rcvbuf in bytes; None: the daemon's default
    changes: int = DEFAULT_CHANGES

    def __str__(self) -> str:
        rcvbuf = "default" if self.rcvbuf is None else str(self.rcvbuf)
        return (f"seed={self.seed} compat={self.compat} rcvbuf={rcvbuf} "
                f"changes={self.changes}")


@dataclass
class Outcome:
    loop: Loop
    lines: int = 0  # lines applied after the prefill (changes and the closing repairs)
    routes: dict[str, int] = field(default_factory=dict)  # family -> kernel view's prefixes
    overruns: int = 0
    resyncs: int = 0
    dump_intr: int = 0
    # family -> count: prefixes the kernel has and fibsync lacks, fibsync holds and the
    # kernel does not, both hold with different types or next hops
    missing: dict[str, int] = field(default_factory=dict)
    extra: dict[str, int] = field(default_factory=dict)
    wrong: dict[str, int] = field(default_factory=dict)
    differences: list[str] = field(default_factory=list)  # listed, at most ``limit``
    seconds_to_equal: float | None = None  # from the batch's end; None: never equal
    batch_seconds: float = 0.0  # applying the changes, bursts and lulls
    segments: list[Segment] = field(default_factory=list)
    last_lull_seconds: float = 0.0  # how long the last lull waited for the daemon's resync
    setup_seconds: float = 0.0
    state: str = ""  # the daemon's state at the end
    audit: dict[str, Any] = field(default_factory=dict)  # status "audit", where the daemon has it
    # changes queued while the last resync's dump ran (the daemon's resync.done log line):
    # how much the kernel changed under the dump the mirror kept
    last_resync_queued: int | None = None
    log_tail: list[str] = field(default_factory=list)  # the daemon's last lines, on failure
    problem: str = ""  # the daemon died, or its status did not answer

    @property
    def ok(self) -> bool:
        return self.seconds_to_equal is not None and not self.problem

    def summary(self) -> str:
        def fam(d: dict[str, int]) -> str:
            return f"{d.get('ipv4', 0)}/{d.get('ipv6', 0)}"

        equal = ("never" if self.seconds_to_equal is None
                 else f"{self.seconds_to_equal:.1f}s")
        return (f"{self.loop} lines={self.lines} routes(v4/v6)={fam(self.routes)} "
                f"overruns={self.overruns} resyncs={self.resyncs} dump_intr={self.dump_intr} "
                f"missing(v4/v6)={fam(self.missing)} extra={fam(self.extra)} "
                f"wrong={fam(self.wrong)} equal_after={equal} batch={self.batch_seconds:.1f}s "
                f"last_lull={self.last_lull_seconds:.1f}s"
                + (f" last_resync_queued={self.last_resync_queued}"
                   if self.last_resync_queued is not None else "")
                + (f" audit(runs={self.audit.get('runs')} divergences="
                   f"{self.audit.get('divergences')} repairs={self.audit.get('repairs')} "
                   f"last={self.audit.get('last_result') or '-'}"
                   f"{' pending' if self.audit.get('pending') else ''})"
                   if self.audit else "")
                + (f" PROBLEM: {self.problem}" if self.problem else ""))

    def report(self) -> str:
        """The summary, the differences left and how to replay the loop."""
        tail = ["daemon log, last lines:", *self.log_tail] if self.log_tail else []
        return "\n".join([self.summary(), *self.differences, *tail, replay_hint(self.loop)])


def replay_hint(loop: Loop) -> str:
    rcvbuf = f" --rcvbuf {loop.rcvbuf}" if loop.rcvbuf else " --rcvbuf default"
    return (f"replay: .venv/bin/python bench/stress_mirror.py --seed {loop.seed} "
            f"--compat {loop.compat}{rcvbuf} --changes {loop.changes}")


def family(prefix: str) -> str:
    return "ipv6" if ":" in prefix else "ipv4"


def compare(kernel: View, ours: View, outcome: Outcome, limit: int = 40) -> bool:
    """Fill ``outcome``'s difference counts and listing; True when the views are equal."""
    outcome.missing, outcome.extra, outcome.wrong = {}, {}, {}
    outcome.routes = {}
    for prefix in kernel:
        outcome.routes[family(prefix)] = outcome.routes.get(family(prefix), 0) + 1
    for prefix in set(kernel) | set(ours):
        k, o = kernel.get(prefix), ours.get(prefix)
        if k == o:
            continue
        bucket = outcome.missing if o is None else outcome.extra if k is None else outcome.wrong
        bucket[family(prefix)] = bucket.get(family(prefix), 0) + 1
    outcome.differences = differences(kernel, ours, limit=limit)
    return not outcome.differences


def prepare(ns: Netns, rundir: Path, churn: StressChurn, compat: int) -> None:
    """The churn world and the prefilled table in ``ns`` (no daemon yet)."""
    ns.sysctl("net.ipv4.nexthop_compat_mode", compat)
    batch(ns, World().setup() + churn.prefill(), rundir)


def router_daemon(ns: Netns, rundir: Path, instance: str, rcvbuf: int | None,
                  *extra: str) -> RouterDaemon:
    """fibsync (not started yet) on the world's links, with ``rcvbuf`` if given."""
    args = ["--netlink-rcvbuf", str(rcvbuf)] if rcvbuf else []
    return RouterDaemon(ns, rundir, instance, list(World().links), [*args, *extra])


def churn_and_compare(ns: Netns, daemon: RouterDaemon, rundir: Path, churn: StressChurn,
                      outcome: Outcome, timeout: float = SETTLE_TIMEOUT) -> Outcome:
    """Apply ``outcome.loop.changes`` of ``churn`` while ``daemon`` runs, then compare.

    Polls until fibsync's view equals the kernel's, or until the differences left
    have not changed for ``timeout`` seconds while the daemon answered its status
    (while they change, or it is too busy to answer, it is still working through
    a backlog: a storm can leave it minutes behind), ``MAX_SETTLE`` at most. The
    kernel is quiet by then (the batch is over), so what is left at the deadline
    is what the mirror got wrong.
    """
    segments = outcome.segments = schedule(outcome.loop.seed, outcome.loop.changes,
                                           outcome.loop.rcvbuf)
    # the last lull only deletes and adds IPv6 prefixes: every notification the
    # buffer must carry through the resync is a change to the tree the dump walks
    chunks = [churn.steps(seg.lines, lull=seg.rate is not None, tree=i == len(segments) - 1)
              for i, seg in enumerate(segments)]
    outcome.lines = 0
    watch: ResyncWatch | None = None
    started = time.monotonic()
    for i, (seg, chunk) in enumerate(zip(segments, chunks, strict=True)):
        if i == len(segments) - 2:
            watch = ResyncWatch(daemon)  # from the last burst on
        if seg.rate is None:
            batch(ns, chunk, rundir)
            outcome.lines += len(chunk)
        elif i < len(segments) - 1 or watch is None:
            outcome.lines += paced(ns, chunk, rundir, seg.rate)
        else:
            t = time.monotonic()
            outcome.lines += last_lull(ns, rundir, churn, chunk, seg.rate, watch)
            outcome.last_lull_seconds = time.monotonic() - t
    closing = churn.closing()  # every link up with its addresses, then the marker
    batch(ns, closing, rundir)
    outcome.lines += len(closing)
    done = time.monotonic()
    outcome.batch_seconds = done - started
    deadline = done + timeout
    progress: tuple[Any, ...] = ()
    while True:
        if daemon.pid is None:
            outcome.problem = f"fibsync is gone: {daemon.log_tail(5)}"
            break
        equal = compare(kernel_view(ns.ip_json), fibsync_view(daemon.routes()), outcome)
        now = time.monotonic()
        if equal:
            outcome.seconds_to_equal = now - done
            break
        seen = (sorted(outcome.missing.items()), sorted(outcome.extra.items()),
                sorted(outcome.wrong.items()))
        # a daemon too busy to answer its status socket is still working through
        # the storm (minutes, after some compat-1 storms)
        busy = not daemon.status()
        if seen != progress or busy:
            progress = seen
            deadline = min(max(deadline, now + timeout), done + MAX_SETTLE)
        if now > deadline:
            break
        time.sleep(1.0)
    status = daemon.status()
    netlink: dict[str, Any] = status.get("netlink", {})
    outcome.overruns = netlink.get("overruns", 0)
    outcome.resyncs = netlink.get("resyncs", 0)
    outcome.dump_intr = netlink.get("dump_intr", 0)
    outcome.state = status.get("state", "")
    outcome.audit = status.get("audit") or {}
    queued = [e.get("queued") for e in daemon.logs() if e.get("event") == "resync.done"]
    outcome.last_resync_queued = queued[-1] if queued else None
    if not status and not outcome.problem:
        outcome.problem = "fibsync status did not answer"
    elif outcome.state != "synced" and not outcome.problem:
        outcome.problem = f"fibsync state {outcome.state!r}"
    return outcome


def run_loop(ns: Netns, rundir: Path, instance: str, loop: Loop,
             timeout: float = SETTLE_TIMEOUT, keep_log: Path | None = None,
             **scale: Any) -> Outcome:
    """One loop in ``ns``, a fresh namespace: world, prefill, fibsync, churn, comparison.

    fibsync runs as ``instance``; it is stopped and its pins removed at the end,
    whatever happens; its log is copied to ``keep_log`` when the loop failed.
    ``scale`` goes to ``StressChurn`` (``v4``, ``v6``, ...).
    """
    print(f"stress loop: {loop}  ({replay_hint(loop)})", flush=True)
    outcome = Outcome(loop)
    t0 = time.monotonic()
    churn = StressChurn(loop.seed, **scale)
    prepare(ns, rundir, churn, loop.compat)
    daemon = router_daemon(ns, rundir, instance, loop.rcvbuf)
    try:
        daemon.start(timeout=120)
        outcome.setup_seconds = time.monotonic() - t0
        return churn_and_compare(ns, daemon, rundir, churn, outcome, timeout)
    finally:
        daemon.stop()
        daemon.remove_pins()
        if keep_log is not None and not outcome.ok and daemon.log_file.exists():
            keep_log.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(daemon.log_file, keep_log)


@contextlib.contextmanager
def scratch(name: str) -> Iterator[tuple[Netns, Path]]:
    """A namespace and a run directory named ``name``, both gone afterwards (for bench/)."""
    ns = Netns(name)
    rundir = RUN_ROOT / name
    rundir.mkdir(parents=True, exist_ok=True)
    try:
        ns.create()
        yield ns, rundir
    finally:
        ns.delete()
        shutil.rmtree(rundir, ignore_errors=True)
