"""Never stale: a daemon that stops writing its heartbeat stops the fast path trusting its tables.

The router forwards as usual (kernel forwarding on). The daemon is frozen
(SIGSTOP) and the kernel gets a more-specific route for h2's address: the
fast path's tables no longer say what the kernel does. Within stale_after the
program stops using them and asks bpf_fib_lookup, which follows the kernel;
once the daemon runs again and has applied what it missed, its tables carry
the traffic again.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import time
from collections.abc import Iterator

import pytest

from fibsync.config import PIN_ROOT
from fibsync.demo import RouterDaemon
from fibsync.fastpath.abi import Reason
from fibsync.lab import Lab, wait_until

from .test_operations_restart import warm_up

pytestmark = pytest.mark.privileged

STALE_AFTER = 2.0


@pytest.fixture
def fibsync(lab: Lab) -> Iterator[RouterDaemon]:
    daemon = RouterDaemon.for_lab(lab, ["--stale-after", str(STALE_AFTER)])
    try:
        daemon.start()
        yield daemon
    finally:
        if daemon.pid:
            os.kill(daemon.pid, signal.SIGCONT)
        daemon.stop()
        daemon.remove_pins()


def answers(lab: Lab, src: str, dst: str) -> bool:
    return lab.h1.run(["ping", "-n", "-c", "1", "-W", "0.3", "-I", src, dst],
                      check=False).returncode == 0


def counter(instance: str, reason: int) -> int:
    """Packets of one reason, summed over CPUs, read from the pinned map (the daemon
    may be stopped)."""
    out = subprocess.run(["bpftool", "-j", "map", "lookup", "pinned",
                          str(PIN_ROOT / instance / "counters"), "key",
                          *[str(b) for b in struct.pack("=I", reason)]],
                         capture_output=True, text=True, check=True).stdout
    values = json.loads(out)["values"]
    return sum(int.from_bytes(bytes(int(b, 16) for b in v["value"][:8]), "little")
               for v in values)


def test_a_frozen_daemon_hands_forwarding_to_the_kernel_fib_until_it_catches_up(
        lab: Lab, fibsync: RouterDaemon) -> None:
    v4 = (str(lab.h1_lan_v4.ip), str(lab.h2_lan_v4.ip))
    v6 = (str(lab.h1_lan_v6.ip), str(lab.h2_lan_v6.ip))
    for src, dst in (v4, v6):
        warm_up(lab, src, dst)
    fast = counter(fibsync.instance, Reason.FWD_FAST)
    assert answers(lab, *v6) and counter(fibsync.instance, Reason.FWD_FAST) > fast

    assert fibsync.pid is not None
    os.kill(fibsync.pid, signal.SIGSTOP)
    lab.r.run(["ip", "route", "add", "unreachable", f"{v4[1]}/32"])
    changed = time.monotonic()
    # the fast path still holds the /24 towards h2: until stale_after, it forwards
    wait_until(lambda: not answers(lab, *v4), timeout=STALE_AFTER + 5,
               what="h2 unreachable, as the kernel's new route says")
    assert time.monotonic() - changed <= STALE_AFTER + 1 + 0.5  # + one ping's timeout
    stale = counter(fibsync.instance, Reason.FWD_STALE)
    assert answers(lab, *v6)  # IPv6 is forwarded still: by bpf_fib_lookup alone
    assert counter(fibsync.instance, Reason.FWD_STALE) > stale

    os.kill(fibsync.pid, signal.SIGCONT)
    lab.r.run(["ip", "route", "del", "unreachable", f"{v4[1]}/32"])
    wait_until(lambda: answers(lab, *v4), timeout=10, what="h2 answers again")
    # caught up: the daemon's tables carry the traffic again
    time.sleep(1.5)
    fast, stale = counter(fibsync.instance, Reason.FWD_FAST), \
        counter(fibsync.instance, Reason.FWD_STALE)
    assert answers(lab, *v4) and answers(lab, *v6)
    assert counter(fibsync.instance, Reason.FWD_FAST) > fast
    assert counter(fibsync.instance, Reason.FWD_STALE) == stale
