"""Never stale: a daemon that stops writing its heartbeat stops the fast path trusting it.

The router forwards as usual (kernel forwarding on). The daemon is frozen
(SIGSTOP) and the kernel gets a more-specific route for h2's address: the
fast path's tables no longer say what the kernel does, and nothing follows the
kernel's conditions either. Within stale_after the program hands every packet
to the kernel (PASS_NO_DAEMON), which forwards it as Linux alone would; once
the daemon runs again and has applied what it missed, its tables carry the
traffic again. A daemon that lost announcements (an overrun) but still runs
withdraws only the promise of its tables: the program forwards by
bpf_fib_lookup alone (FWD_STALE) until the resync is written.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest

from fibsync.config import PIN_ROOT
from fibsync.demo import RouterDaemon
from fibsync.fastpath.abi import Reason
from fibsync.fastpath.maps import CLOCK_MONOTONIC_COARSE, PinnedMaps
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


def test_a_frozen_daemon_hands_forwarding_to_the_kernel_until_it_catches_up(
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
    # the tables' promise may run out up to a beat before the conditions' one (FWD_STALE
    # meanwhile): from the conditions' end on, nothing of the frozen daemon's is trusted
    watched_until = heartbeat(fibsync.instance)[1]
    wait_until(lambda: time.clock_gettime_ns(CLOCK_MONOTONIC_COARSE) > watched_until,
               timeout=STALE_AFTER, what="the frozen daemon's last watched_until")
    handed = counter(fibsync.instance, Reason.PASS_NO_DAEMON)
    forwarded = lab.r.kernel_forwarded()[1]
    assert answers(lab, *v6)  # IPv6 is forwarded still: by the kernel
    assert counter(fibsync.instance, Reason.PASS_NO_DAEMON) > handed
    assert lab.r.kernel_forwarded()[1] > forwarded

    os.kill(fibsync.pid, signal.SIGCONT)
    lab.r.run(["ip", "route", "del", "unreachable", f"{v4[1]}/32"])
    wait_until(lambda: answers(lab, *v4), timeout=10, what="h2 answers again")
    # caught up: the daemon's tables carry the traffic again
    time.sleep(1.5)
    fast, handed = counter(fibsync.instance, Reason.FWD_FAST), \
        counter(fibsync.instance, Reason.PASS_NO_DAEMON)
    forwarded = lab.r.kernel_forwarded()
    assert answers(lab, *v4) and answers(lab, *v6)
    assert counter(fibsync.instance, Reason.FWD_FAST) > fast
    assert counter(fibsync.instance, Reason.PASS_NO_DAEMON) == handed
    assert lab.r.kernel_forwarded() == forwarded


FORWARD_DROP_V6 = """table inet fs_stale_fw {
    chain forward {
        type filter hook forward priority 0; policy accept;
        ip6 daddr %s drop
    }
}
"""


def test_a_firewall_rule_added_after_the_daemon_stopped_is_obeyed(
        lab: Lab, fibsync: RouterDaemon) -> None:
    """The daemon stops (the program stays attached, as `systemctl stop` leaves it) and
    then the operator adds a forward rule dropping h2's IPv6 traffic. No watcher saw it,
    so no `ifaces` entry says so: once stale_after has run out, the program trusts
    nothing of the daemon's and the kernel, which applies the rule, decides."""
    v6 = (str(lab.h1_lan_v6.ip), str(lab.h2_lan_v6.ip))
    warm_up(lab, *v6)
    fibsync.stop()
    stopped = time.monotonic()
    lab.r.run(["nft", "-f", "-"], input=FORWARD_DROP_V6 % v6[1])
    try:
        wait_until(lambda: not answers(lab, *v6), timeout=STALE_AFTER + 5,
                   what="h2 unanswered over IPv6, as the new forward rule says")
        assert time.monotonic() - stopped <= STALE_AFTER + 1 + 0.5
        handed = counter(fibsync.instance, Reason.PASS_NO_DAEMON)
        assert not answers(lab, *v6)
        assert counter(fibsync.instance, Reason.PASS_NO_DAEMON) > handed
    finally:
        lab.r.run(["nft", "delete", "table", "inet", "fs_stale_fw"], check=False)
    assert answers(lab, *v6)  # the kernel forwards it again, as Linux alone would


def heartbeat(instance: str) -> tuple[int, int]:
    """fs_heartbeat (fresh_until, watched_until), read from the pinned map (0: no
    promise)."""
    maps = PinnedMaps(PIN_ROOT / instance)
    try:
        return maps.heartbeat()
    finally:
        maps.close()


def fresh_until(instance: str) -> int:
    return heartbeat(instance)[0]


def test_lost_announcements_withdraw_the_promise_at_once(lab: Lab) -> None:
    """An overrun means the tables may be behind the kernel (the announcements it
    dropped may be the last of a nexthop replace: the object's new gateway). The
    daemon does not wait for stale_after (60 s here) to run out: it withdraws its
    promise as soon as its source is out of sync, and beats again once the resync
    is written."""
    daemon = RouterDaemon.for_lab(lab, ["--stale-after", "60", "--netlink-rcvbuf", "4096"])
    try:
        daemon.start()
        coarse = CLOCK_MONOTONIC_COARSE
        wait_until(lambda: fresh_until(daemon.instance) > time.clock_gettime_ns(coarse),
                   timeout=10, what="the first promise")
        lab.r.run(["ip", "-batch", "-"], input="".join(
            f"route add blackhole 198.18.{i >> 8}.{i & 255}/32\n" for i in range(3000)))
        events = wait_until(lambda: [e["event"] for e in daemon.logs()
                                     if e.get("event") in ("netlink.overrun",
                                                           "heartbeat.withdrawn")] or None,
                            timeout=10, what="an overrun")
        assert daemon.status()["netlink"]["overruns"] > 0
        assert events[0] == "netlink.overrun"
        wait_until(lambda: "heartbeat.withdrawn" in [e.get("event") for e in daemon.logs()],
                   timeout=5, what="the promise withdrawn")
        # back in sync, the daemon promises again (the program trusts its tables again)
        wait_until(lambda: fresh_until(daemon.instance) > time.clock_gettime_ns(coarse) + 30e9,
                   timeout=30, what="a promise after the resync")
        assert daemon.status()["netlink"]["resyncs"] >= 2
    finally:
        daemon.stop()
        daemon.remove_pins()


def test_tables_whose_dump_met_changes_wait_for_an_audit(lab: Lab) -> None:
    """A dump taken while routes change may skip live routes that no notification will
    name (fibsync/verify.py), and a covering prefix in the tables would catch their
    traffic. The daemon starts while routes change on the router: its first sync's
    tables are not promised (XDP forwards by bpf_fib_lookup alone) until the audit that
    follows finds no divergence, which it can while the changes go on (what it could
    not judge changed meanwhile, and those changes are applied)."""
    # enough routes that the dump takes a while, and changes that never pause
    lab.r.run(["ip", "-batch", "-"], input="".join(
        f"route add blackhole 198.18.{i >> 8}.{i & 255}/32\n" for i in range(20000)))
    stop = threading.Event()

    def churn() -> None:
        ip = lab.r.popen(["ip", "-force", "-batch", "-"], stdin=subprocess.PIPE, text=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert ip.stdin is not None
        i = 0
        try:
            while not stop.is_set():
                # each round changes every prefix's type: a replace that changes nothing
                # is not announced
                kind = ("blackhole", "unreachable")[(i // 250) % 2]
                ip.stdin.write("".join(f"route replace {kind} 198.19.{(i + j) % 250}.0/24\n"
                                       for j in range(50)))
                ip.stdin.flush()
                i += 50
                # ~10k changes a second: without a pause `ip` outran the daemon's
                # event socket, and its overruns' resyncs kept the tables waiting
                time.sleep(0.005)
        finally:
            ip.stdin.close()
            ip.wait()

    daemon = RouterDaemon.for_lab(lab, ["--stale-after", "60"])
    changing = threading.Thread(target=churn, daemon=True)
    changing.start()
    try:
        daemon.start()
        coarse = CLOCK_MONOTONIC_COARSE
        wait_until(lambda: fresh_until(daemon.instance) > time.clock_gettime_ns(coarse) + 30e9,
                   timeout=60, what="the tables promised, routes still changing")
        assert changing.is_alive()
        events = [e.get("event") for e in daemon.logs()]
        assert "heartbeat.awaiting_audit" in events, daemon.log_tail()
        assert events.index("heartbeat.awaiting_audit") < events.index("heartbeat.audited")
        assert daemon.status()["audit"]["runs"] >= 1
        assert not daemon.status()["heartbeat"]["awaiting_audit"]
    finally:
        stop.set()
        changing.join()
        daemon.stop()
        daemon.remove_pins()
