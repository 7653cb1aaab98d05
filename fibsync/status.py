"""The status protocol, both ends, and its rendering.

Protocol: a client (``query``) connects to ``/run/fibsync/<instance>.sock``,
sends one line (``status``, or ``audit`` for a self-audit now), and reads one
JSON document until the daemon (``StatusServer``) closes the connection. When
no daemon answers, ``fibsync status`` builds the same document from the pinned
maps alone (``offline_status``) and says the daemon is down.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import DaemonDown, DaemonError, DaemonSilent

if TYPE_CHECKING:
    import asyncio

TIMEOUT = 5.0
MAP_ORDER = ("routes_v4", "routes_v6", "nexthops", "groups", "neighbours")


def query(sock_path: Path, command: str = "status", timeout: float = TIMEOUT) -> dict[str, Any]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(sock_path))
    except (FileNotFoundError, ConnectionRefusedError) as e:
        raise DaemonDown(f"no daemon answers on {sock_path}") from e
    except PermissionError as e:
        raise DaemonError(f"{sock_path}: permission denied (are you in its group?)") from e
    try:
        stopped = _stopped_peer(s)
        if stopped:
            raise DaemonSilent(f"{sock_path}: the daemon (pid {stopped}) is stopped")
        s.sendall(command.encode() + b"\n")
        chunks = []
        while chunk := s.recv(1 << 16):
            chunks.append(chunk)
    except TimeoutError as e:
        raise DaemonSilent(f"{sock_path}: no answer within {timeout:g} s") from e
    except OSError as e:
        raise DaemonError(f"{sock_path}: {e}") from e
    finally:
        s.close()
    try:
        doc: dict[str, Any] = json.loads(b"".join(chunks))
    except ValueError as e:
        raise DaemonError(f"{sock_path}: the daemon sent no valid JSON") from e
    return doc


def _stopped_peer(s: socket.socket) -> int:
    """The daemon's pid when the kernel holds it stopped (SIGSTOP, a debugger), else
    0: the listening socket's owner, from SO_PEERCRED. A stopped daemon's socket
    still accepts connections; no answer would come before the timeout."""
    try:
        pid, _, _ = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                     struct.calcsize("3i")))
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (OSError, ValueError, IndexError, struct.error):
        return 0
    return pid if state in ("T", "t") else 0


class StatusServer:
    """The daemon's end: one line in, one JSON document out, then the connection closes.

    ``status`` answers the document, ``audit`` awaits ``audit`` (which answers with an
    ``error`` key when it cannot run). The socket is created 0600 and then given to
    ``socket_group`` (0660), so nobody outside may connect in between.
    """

    def __init__(self, path: Path, status: Callable[[], dict[str, Any]],
                 audit: Callable[[], Awaitable[dict[str, Any]]], log: Any) -> None:
        self.path = path
        self.status = status
        self.audit = audit
        self.log = log
        self._server: asyncio.AbstractServer | None = None

    async def start(self, group: str) -> None:
        # here, not at the top: the CLI's client need not pay for asyncio's import
        import asyncio

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        old_umask = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        finally:
            os.umask(old_umask)
        self.set_group(group)

    def set_group(self, group: str) -> None:
        """Who may talk to the daemon: root and ``group`` (none: root alone)."""
        if group:
            try:
                os.chown(self.path, -1, grp.getgrnam(group).gr_gid)
            except (KeyError, OSError) as e:
                self.log.error("status.error", group=group, error=str(e))
                os.chmod(self.path, 0o600)
                return
            os.chmod(self.path, 0o660)
        else:
            os.chown(self.path, -1, os.getegid())
            os.chmod(self.path, 0o600)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        with contextlib.suppress(OSError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        import asyncio

        try:
            line = (await asyncio.wait_for(reader.readline(), 5)).decode().strip()
            if line in ("", "status"):
                doc = self.status()
            elif line == "audit":
                doc = await self.audit()
            else:
                doc = {"error": f"unknown {line!r}"}
            writer.write(dumps(doc).encode())
            await writer.drain()
        except (TimeoutError, OSError, UnicodeDecodeError):
            pass
        except Exception:
            self.log.exception("status.error")
        finally:
            writer.close()


def _fmt_count(n: int) -> str:
    for unit, div in (("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= div * 10:
            return f"{n / div:.1f}{unit}"
    return str(n)


def _offline_heartbeat(fresh: float | None, watched: float | None) -> str:
    """What the XDP program makes of a stopped daemon's last promises (seconds left,
    negative once run out; None: no promise needed)."""
    if watched is not None and watched < 0:
        return (f"none for {_fmt_seconds(-watched)}: XDP hands every packet to the kernel "
                "(PASS_NO_DAEMON)")
    if fresh is not None and fresh < 0:
        return "the tables are stale: XDP forwards by bpf_fib_lookup alone (FWD_STALE)" + (
            f" for {_fmt_seconds(watched)} more" if watched is not None else "")
    left = [x for x in (fresh, watched) if x is not None]
    if not left:
        return "off (stale_after = 0)"
    return f"the tables are trusted {_fmt_seconds(min(left))} more"


def _fmt_seconds(s: float) -> str:
    if s < 1:
        return f"{s * 1000:.1f} ms"
    if s < 120:
        return f"{s:.1f} s"
    m, s = divmod(int(s), 60)
    h, m = divmod(m, 60)
    d, h = divmod(h, 24)
    return f"{d}d{h}h" if d else f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def render(doc: dict[str, Any]) -> str:
    """The human table of ``fibsync status`` (docs/operations.md explains every line)."""
    lines = []
    state = doc.get("state", "unknown")
    if doc.get("daemon") == "up":
        daemon = (f"up, pid {doc.get('pid')}, version {doc.get('version')}, "
                  f"running {_fmt_seconds(doc.get('uptime_seconds', 0))}")
    else:
        daemon = "DOWN (figures read from the pinned maps)"
    lines.append(f"instance   {doc.get('instance', '?')}")
    lines.append(f"daemon     {daemon}")
    lines.append(f"state      {state}")
    for problem in doc.get("problems", []):
        lines.append(f"problem    {problem}")
    fp = doc.get("fastpath", {})
    lines.append(
        f"routes     v4 {fp.get('routes_v4', 0)}  v6 {fp.get('routes_v6', 0)}"
        f"   nexthops {fp.get('nexthops', 0)}  groups {fp.get('groups', 0)}"
        f"  neighbours {fp.get('neighbours', 0)}"
    )
    maps = doc.get("maps")
    if maps:
        parts = []
        origins: dict[str, list[str]] = {}
        for name in MAP_ORDER:
            m = maps.get(name)
            if m is None:
                continue
            cap = m.get("capacity") or 0
            pct = f" ({100 * m.get('entries', 0) / cap:.0f}%)" if cap else ""
            parts.append(f"{name} {m.get('entries', 0)}/{cap}{pct}")
            if m.get("origin"):
                origins.setdefault(m["origin"], []).append(name)
        lines.append("maps       " + "  ".join(parts))
        if len(origins) == 1:
            lines.append(f"           all {next(iter(origins))} at start")
        elif origins:
            lines.append("           " + "; ".join(f"{o}: {', '.join(n)}"
                                                  for o, n in sorted(origins.items())))
    nl = doc.get("netlink")
    if nl:
        lines.append(
            f"netlink    messages {nl.get('messages', 0)}  overruns {nl.get('overruns', 0)}"
            f"  resyncs {nl.get('resyncs', 0)}"
            f"  last resync {_fmt_seconds(nl.get('last_resync_seconds', 0))}"
            f"  undecodable {nl.get('undecodable', 0)}"
        )
    sync = doc.get("sync")
    if sync:
        lines.append(
            f"sync lag   last {_fmt_seconds(sync.get('last_seconds', 0))}"
            f"  max {_fmt_seconds(sync.get('max_seconds', 0))}"
            f"  mean {_fmt_seconds(sync.get('mean_seconds', 0))}"
            f"  ({sync.get('changes', 0)} changes in {sync.get('batches', 0)} batches)"
        )
    wr = doc.get("writer")
    if wr:
        lines.append(
            f"map writes {wr.get('entries', 0)} in {wr.get('batches', 0)} batches"
            f"  errors {wr.get('errors', 0)}  full {wr.get('full', 0)}"
            f"  unwritten {wr.get('unwritten', 0)}  demoted {wr.get('demoted', 0)}"
            + (f"  IPv4 table {wr['v4_table']}" if wr.get("v4_table") else "")
            + (f"  IPv6 table {wr['v6_table']}" if wr.get("v6_table") else "")
        )
    hb = doc.get("heartbeat")
    if hb and "stale_after" in hb:
        if hb.get("awaiting_audit"):
            lines.append("heartbeat  the tables wait for an audit (their dump met changes): "
                         "XDP forwards by bpf_fib_lookup alone (FWD_STALE) until then")
        else:
            lines.append("heartbeat  " + (f"{_fmt_seconds(hb['age_seconds'])} ago, the tables "
                                          f"are trusted for {_fmt_seconds(hb['stale_after'])} "
                                          "after one" if hb["stale_after"]
                                          else "off (stale_after = 0)"))
    elif hb:
        lines.append("heartbeat  " + _offline_heartbeat(hb.get("fresh_for_seconds"),
                                                        hb.get("watched_for_seconds")))
    au = doc.get("audit")
    if au:
        if not au.get("interval"):
            lines.append("audit      off (audit_interval = 0)")
        else:
            last = au.get("last_result") or "not yet"
            lines.append(
                f"audit      every {_fmt_seconds(au['interval'])}, last {last}"
                + (f" ({au.get('last_checked', 0)} prefixes, "
                   f"{_fmt_seconds(au.get('last_seconds', 0))})" if au.get("runs") else "")
                + f"  runs {au.get('runs', 0)}  divergences {au.get('divergences', 0)}"
                f"  repairs {au.get('repairs', 0)}"
                + (f"  failures {au['failures']}" if au.get("failures") else ""))
    fi = doc.get("fidelity")
    if fi:
        conds = fi.get("conditions", [])
        lines.append(f"fidelity   netfilter {fi.get('netfilter', '?')}; "
                     + (f"{len(conds)} kernel condition{'s' if len(conds) != 1 else ''} "
                        "the fast path honours" if conds else
                        "no condition: the fast path forwards everything it can"))
        for c in conds:
            lines.append(f"  {c['kind']:<17} {c['family']:<4} {c['interface']:<12} "
                         f"{c['detail']}  -> {c['action']}")
        for name, w in sorted(fi.get("watchers", {}).items()):
            if not w.get("ready") or w.get("last_error"):
                lines.append(f"  watcher {name}: "
                             + ("not ready" if not w.get("ready") else "restarted")
                             + (f" ({w['last_error']})" if w.get("last_error") else ""))
    rl = doc.get("reloads")
    if rl:
        lines.append(f"reloads    {rl.get('done', 0)} done, {rl.get('rejected', 0)} rejected"
                     + (f" (last: {rl['last_error']})" if rl.get("last_error") else ""))
    ifaces = doc.get("interfaces", [])
    lines.append("interfaces")
    if not ifaces:
        lines.append("  (none attached)")
    for i in ifaces:
        lines.append(f"  {i['name']:<16} ifindex {i['ifindex']:<5} xdp {i.get('mode', '?'):<8}"
                     f" prog {i.get('prog_id', '?')}")
    counters = doc.get("counters", {})
    lines.append("packets")
    shown = {k: v for k, v in counters.items() if v.get("packets")}
    if not shown:
        lines.append("  (none yet)")
    for reason, c in sorted(shown.items(), key=lambda kv: -kv[1]["packets"]):
        lines.append(f"  {reason:<18} {_fmt_count(c['packets']):>8} pkts"
                     f" {_fmt_count(c['bytes']):>9} bytes   {c.get('description', '')}")
    if doc.get("note"):
        lines.append(f"note       {doc['note']}")
    return "\n".join(lines)


def dumps(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, sort_keys=True)
