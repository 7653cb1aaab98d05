"""fibsync running on the lab's router: used by `make demo` and the end-to-end tests.

``RouterDaemon`` starts ``fibsync run`` inside the lab's router namespace as
its own process (pid file, log file in the lab's run directory), waits until
it reports ``synced``, and stops it by pid. ``demo`` is what `make demo` shows.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .config import PIN_ROOT, RUN_DIR
from .errors import FibsyncError
from .fastpath.abi import Reason
from .lab import Lab, Netns, pid_alive, read_pid_file, run, terminate, wait_until

# the reasons under which the XDP program forwards a packet itself
FORWARDED = tuple(r.name for r in Reason if r.name.startswith("FWD_"))


def fibsync_argv() -> list[str]:
    """The fibsync of this checkout (the venv's entry point), whatever is on PATH."""
    exe = Path(sys.executable).with_name("fibsync")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "fibsync"]


class RouterDaemon:
    """``fibsync run`` as its own process inside a namespace (a lab's router by default).

    ``env`` adds to the daemon's environment (NOTIFY_SOCKET, ...). ``wrap`` is an
    argv prefix that starts the daemon another way: it must enter the namespace
    itself (``nsenter --net=/run/netns/NS ...``), as ``--netns`` is then left out.
    ``command`` is the fibsync to run (default: this checkout's), for the daemon
    and for ``cli()`` alike.
    """

    def __init__(self, ns: Netns, rundir: Path, instance: str, interfaces: list[str],
                 extra: list[str] | None = None, env: dict[str, str] | None = None,
                 wrap: list[str] | None = None, command: list[str] | None = None) -> None:
        self.command = command or fibsync_argv()
        self.ns = ns
        self.instance = instance
        self.interfaces = interfaces
        self.extra = extra or []
        self.env = env or {}
        self.wrap = wrap
        self.rundir = rundir
        self.pid_file = self.rundir / f"fibsync-{self.instance}.pid"
        self.log_file = self.rundir / f"fibsync-{self.instance}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def for_lab(cls, lab: Lab, extra: list[str] | None = None, **kw: Any) -> RouterDaemon:
        """On the lab's router, on every interface facing a host, instance named after the lab."""
        return cls(lab.r, lab.rundir, lab.name, lab.router_interfaces, extra, **kw)

    @property
    def pid(self) -> int | None:
        pid = read_pid_file(self.pid_file)
        return pid if pid is not None and pid_alive(pid) else None

    def start(self, timeout: float = 60) -> None:
        if self.pid is not None:
            return
        self.spawn()
        self.wait_synced(timeout)

    def spawn(self) -> None:
        """Start the daemon and return at once (``start`` waits until it says synced)."""
        self.rundir.mkdir(parents=True, exist_ok=True)
        where = [*self.wrap, *self.command] if self.wrap else \
            [*self.command, "--netns", self.ns.name]
        argv = [*where, "run", "--instance", self.instance, "--log-format", "json",
                *[a for i in self.interfaces for a in ("-i", i)], *self.extra]
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         env={**os.environ, **self.env})
        self.pid_file.write_text(f"{self.proc.pid}\n")

    def wait_synced(self, timeout: float = 60) -> dict[str, Any]:
        def synced() -> dict[str, Any] | None:
            if self.proc is not None and self.proc.poll() is not None:
                raise FibsyncError(f"fibsync exited with {self.proc.returncode}: "
                                   f"{self.log_tail()}")
            doc = self.status()
            return doc if doc.get("state") == "synced" else None
        return wait_until(synced, timeout=timeout, what=f"fibsync {self.instance} synced")

    def status(self) -> dict[str, Any]:
        r = self.cli("status", "--json", check=False)
        try:
            return json.loads(r.stdout)  # type: ignore[no-any-return]
        except ValueError:
            return {}

    def forwarded(self, reasons: Iterable[str] = FORWARDED) -> int:
        """Packets the XDP program forwarded, by its own counters (read from the pinned
        maps when the daemon is down): every FWD_ reason, or the ones named."""
        counters = self.status().get("counters")
        if not counters:
            raise FibsyncError(f"fibsync {self.instance}: no counters in its status")
        return sum(int(counters[r]["packets"]) for r in reasons)

    def routes(self) -> list[dict[str, Any]]:
        return json.loads(self.cli("routes", "--json").stdout)  # type: ignore[no-any-return]

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a fibsync command inside the router namespace, for this instance."""
        return run([*self.command, "--netns", self.ns.name, *args, "--instance", self.instance],
                   check=check)

    def logs(self) -> list[dict[str, Any]]:
        """The daemon's JSON log lines, parsed (other lines skipped)."""
        return _json_lines(self._log_lines())

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self._log_lines()[-lines:])

    def _log_lines(self) -> list[str]:
        try:
            return self.log_file.read_text().splitlines()
        except OSError:
            return []

    def postmortem(self, events: int = 10) -> str:
        """What a failing test should say about the daemon: alive or how it ended, what
        its status socket answers (an offline document when it does not), its last
        warnings and errors, and any output that is not a log line (a traceback)."""
        if (pid := self.pid) is not None:
            life = f"alive (pid {pid})"
        elif self.proc is not None and self.proc.poll() is not None:
            life = f"exited with {self.proc.returncode}"
        else:
            life = "gone"
        doc = self.status()
        lines = self._log_lines()
        said = [{k: v for k, v in e.items() if k != "instance"} for e in _json_lines(lines)
                if e.get("level") in ("warning", "error", "critical")][-events:]
        other = [line for line in lines if not line.startswith("{")][-events:]
        return json.dumps({"daemon": life,
                           "status": {k: doc.get(k) for k in ("daemon", "state", "netlink",
                                                               "sync", "audit", "note")},
                           "last warnings and errors": said, "other output": other},
                          indent=1, default=str)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        pid = self.pid
        if pid is not None:
            os.kill(pid, sig)
            wait_until(lambda: not pid_alive(pid) or _reap(self.proc), timeout=10,
                       what=f"fibsync pid {pid} gone")

    def stop(self) -> None:
        pid = self.pid
        if pid is not None:
            terminate([pid])
        if self.proc is not None:
            _reap(self.proc)
        self.pid_file.unlink(missing_ok=True)

    def remove_pins(self) -> None:
        """Pins, socket and lock file of the instance (call once the daemon is stopped)."""
        shutil.rmtree(PIN_ROOT / self.instance, ignore_errors=True)
        for suffix in ("sock", "lock"):
            (RUN_DIR / f"{self.instance}.{suffix}").unlink(missing_ok=True)


def _json_lines(lines: list[str]) -> list[dict[str, Any]]:
    out = []
    for line in lines:
        with contextlib.suppress(ValueError):
            doc = json.loads(line)
            if isinstance(doc, dict):
                out.append(doc)
    return out


def _reap(proc: subprocess.Popen[bytes] | None) -> bool:
    if proc is None:
        return False
    try:
        proc.wait(timeout=0.1)
    except subprocess.TimeoutExpired:
        return False
    return True


def demo(name: str = "lab") -> None:
    lab = Lab(name)
    print(f"==> building the lab {name!r}: h1 -- r (FRR) == h2 in network namespaces")
    lab.up()
    daemon = RouterDaemon.for_lab(lab)
    print(f"==> starting fibsync on {lab.r} (XDP on {', '.join(lab.router_interfaces)})")
    daemon.start()
    print(f"==> kernel forwarding stays ON in {lab.r}: fibsync honours it (with it off, "
          "nothing is forwarded)")
    flows = [(str(lab.h1_lan_v4.ip), str(lab.h2_lan_v4.ip)),
             (str(lab.h1_lan_v6.ip), str(lab.h2_lan_v6.ip))]
    for src, dst in flows:
        _warm_up(lab, src, dst)
    # XDP forwards from its own tables (FWD_FAST) or by bpf_fib_lookup (FWD_FIB: e.g. an
    # ECMP member whose neighbour the kernel has not resolved yet): both are XDP
    kernel_before, fast_before = lab.r.kernel_forwarded(), daemon.forwarded()
    crossed = 0
    for src, dst in flows:
        print(f"==> ping {dst} from {src} (h1 -> r -> h2 and back)")
        r = lab.h1.run(["ping", "-c", "5", "-i", "0.2", "-W", "1", "-I", src, dst], check=False)
        print("\n".join("    " + line for line in r.stdout.strip().splitlines()[-2:]))
        m = re.search(r"(\d+) received", r.stdout)
        crossed += 2 * int(m.group(1)) if m else 0  # each echo crosses r twice: there, back
    kernel_after, fast_after = lab.r.kernel_forwarded(), daemon.forwarded()
    print(f"==> who carried them across {lab.r}: its kernel's forwarding counters, and fibsync's")
    rows = [("kernel  ForwDatagrams (IPv4)", kernel_before[0], kernel_after[0]),
            ("kernel  Ip6OutForwDatagrams (IPv6)", kernel_before[1], kernel_after[1]),
            ("fibsync FWD_* (XDP)", fast_before, fast_after)]
    for label, before, after in rows:
        print(f"    {label:<36} {before:>8} -> {after:<8} (+{after - before})")
    by_kernel = sum(kernel_after) - sum(kernel_before)
    if by_kernel == 0 and crossed and fast_after - fast_before >= crossed:
        print(f"    {crossed} packets crossed the router, and its kernel forwarded none of them: "
              "XDP carried them all.\n"
              "    This is the proof: a frame XDP redirects never reaches the kernel's stack, "
              "while a packet\n    XDP hands to the kernel is forwarded there, and counted.")
    else:
        print(f"    {crossed} packets crossed the router; its kernel forwarded {by_kernel} of "
              f"them: the fast path did not carry them all (see fibsync status)")
    print("==> fibsync status (in the router namespace)")
    print(daemon.cli("status", check=False).stdout)
    print("==> fibsync routes")
    print(daemon.cli("routes", check=False).stdout)
    src4, dst4 = flows[0]
    exe = os.path.relpath(daemon.command[0]) if len(daemon.command) == 1 else "fibsync"
    print(f"""==> the lab stays up. Explore it:
    {exe} --netns {lab.r} status --instance {name}
    {exe} --netns {lab.r} routes --instance {name}
    {exe} --netns {lab.r} lookup {dst4} --instance {name}
    ip netns exec {lab.h1} ping -I {src4} {dst4}
    ip netns exec {lab.r} nstat -asz IpForwDatagrams Ip6OutForwDatagrams  (kernel-forwarded)
    ip netns exec {lab.r} vtysh --vty_socket {lab.rundir}/frr  (FRR's shell)
    daemon log: {daemon.log_file}
  Remove it: {exe} lab down{f" --name {name}" if name != "lab" else ""}""")


def _warm_up(lab: Lab, src: str, dst: str, timeout: float = 10) -> None:
    """The first packets may go to the router's kernel while it resolves its next hops:
    ping until one crosses with the kernel's forwarding counters flat (best effort)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = lab.r.kernel_forwarded()
        r = lab.h1.run(["ping", "-c", "1", "-W", "1", "-I", src, dst], check=False)
        if r.returncode == 0 and lab.r.kernel_forwarded() == before:
            return
        time.sleep(0.1)


def down(name: str = "lab") -> None:
    lab = Lab(name)
    daemon = RouterDaemon.for_lab(lab)
    daemon.stop()
    lab.down()
    daemon.remove_pins()
