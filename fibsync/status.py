"""The status protocol and its rendering.

Protocol: a client connects to ``/run/fibsync/<instance>.sock``, sends one
line (``status``), and reads one JSON document until the daemon closes the
connection. When no daemon answers, ``fibsync status`` builds the same
document from the pinned maps alone (``offline_status``) and says the daemon
is down.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from .errors import DaemonDown, DaemonError

TIMEOUT = 5.0


def query(sock_path: Path, command: str = "status") -> dict[str, Any]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(TIMEOUT)
    try:
        s.connect(str(sock_path))
    except (FileNotFoundError, ConnectionRefusedError) as e:
        raise DaemonDown(f"no daemon answers on {sock_path}") from e
    except PermissionError as e:
        raise DaemonError(f"{sock_path}: permission denied (are you in its group?)") from e
    try:
        s.sendall(command.encode() + b"\n")
        chunks = []
        while chunk := s.recv(1 << 16):
            chunks.append(chunk)
    except OSError as e:
        raise DaemonError(f"{sock_path}: {e}") from e
    finally:
        s.close()
    try:
        doc: dict[str, Any] = json.loads(b"".join(chunks))
    except ValueError as e:
        raise DaemonError(f"{sock_path}: the daemon sent no valid JSON") from e
    return doc


def _fmt_count(n: int) -> str:
    for unit, div in (("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= div * 10:
            return f"{n / div:.1f}{unit}"
    return str(n)


def render(doc: dict[str, Any]) -> str:
    """The human table of ``fibsync status``."""
    lines = []
    state = doc.get("state", "unknown")
    daemon = "up" if doc.get("daemon") == "up" else "DOWN (figures read from the pinned maps)"
    lines.append(f"instance   {doc.get('instance', '?')}")
    lines.append(f"daemon     {daemon}" + (f", pid {doc['pid']}" if doc.get("pid") else ""))
    lines.append(f"state      {state}")
    fp = doc.get("fastpath", {})
    lines.append(
        f"routes     v4 {fp.get('routes_v4', 0)}  v6 {fp.get('routes_v6', 0)}"
        f"   nexthops {fp.get('nexthops', 0)}  groups {fp.get('groups', 0)}"
        f"  neighbours {fp.get('neighbours', 0)}"
    )
    nl = doc.get("netlink")
    if nl:
        lines.append(
            f"netlink    messages {nl.get('messages', 0)}  overruns {nl.get('overruns', 0)}"
            f"  resyncs {nl.get('resyncs', 0)}  last resync {nl.get('last_resync_seconds', 0):.3f}s"
            f"  undecodable {nl.get('undecodable', 0)}"
        )
    wr = doc.get("writer")
    if wr:
        lines.append(
            f"maps       writes {wr.get('entries', 0)} in {wr.get('batches', 0)} batches"
            f"  errors {wr.get('errors', 0)}  full {wr.get('full', 0)}"
            + (f"  unwritten {wr['unwritten']}" if wr.get("unwritten") else "")
        )
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
    return "\n".join(lines)


def dumps(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, sort_keys=True)
