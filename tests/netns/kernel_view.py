"""What the fast path must hold, computed from the kernel with iproute2's JSON output,
and the same view of what ``fibsync routes --json`` says the pinned maps hold.

Both views map a prefix to ``(type, paths)``: ``type`` is the fast-path behaviour
(unicast, blackhole, kernel, fib) and ``paths`` a frozenset of
``(gateway, ifindex, weight)``; non-unicast entries carry no paths.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable
from typing import Any

View = dict[str, tuple[str, frozenset[tuple[str | None, int, int]]]]

KERNEL_TYPES = {"unreachable": "kernel", "prohibit": "kernel", "local": "kernel",
                "broadcast": "kernel", "anycast": "kernel", "multicast": "kernel",
                "blackhole": "blackhole", "throw": "fib", "unicast": "unicast"}
LOCAL_TYPES = {"local", "broadcast", "anycast", "multicast"}


def _prefix(dst: str, family: int) -> str:
    if dst == "default":
        return "0.0.0.0/0" if family == 4 else "::/0"
    return str(ipaddress.ip_network(dst, strict=False))


def kernel_view(ip_json: Callable[..., Any], table: int | str = "main") -> View:
    """``ip_json(*args)`` runs ``ip -j ARGS`` in the namespace and parses it."""
    ifindex = {link["ifname"]: link["ifindex"] for link in ip_json("link", "show")}
    objects = {nh["id"]: nh for nh in ip_json("nexthop", "show")}

    def object_paths(nhid: int) -> tuple[str, set[tuple[str | None, int, int]]]:
        obj = objects[nhid]
        if "blackhole" in obj:
            return "blackhole", set()
        if "group" in obj:
            paths: set[tuple[str | None, int, int]] = set()
            for member in obj["group"]:
                m = objects[member["id"]]
                paths.add((m.get("gateway"), ifindex[m["dev"]], member.get("weight", 1)))
            return "unicast", paths
        return "unicast", {(obj.get("gateway"), ifindex[obj["dev"]], 1)}

    Paths = set[tuple[str | None, int, int]]
    chosen: dict[str, tuple[tuple[int, int], dict[str, Any], Paths]] = {}
    for family in (4, 6):
        for rank, tbl in ((0, "local"), (1, table)):
            for r in ip_json(f"-{family}", "route", "show", "table", str(tbl)):
                if tbl == "local" and r.get("type", "unicast") not in LOCAL_TYPES:
                    continue
                prefix = _prefix(r["dst"], family)
                key = (rank, r.get("metric", 0))
                best = chosen.get(prefix)
                if best is not None and best[0] < key:
                    continue
                paths = _paths(r, ifindex)
                if best is not None and best[0] == key and family == 6:
                    # IPv6 keeps same-metric routes on several devices apart;
                    # fibsync, like an ECMP route, takes them together
                    paths |= best[2]
                chosen[prefix] = (key, r, paths)

    view: View = {}
    for prefix, (_, r, paths) in chosen.items():
        rtype = KERNEL_TYPES.get(r.get("type", "unicast"), "fib")
        if rtype == "unicast" and "nhid" in r:
            rtype, paths = object_paths(r["nhid"])
        elif rtype != "unicast":
            paths = set()
        view[prefix] = (rtype, frozenset(paths))
    return view


def _paths(r: dict[str, Any], ifindex: dict[str, int]) -> set[tuple[str | None, int, int]]:
    hops = r.get("nexthops") or [r]
    out = set()
    for h in hops:
        if "dead" in h.get("flags", []) or "dev" not in h:
            continue
        out.add((h.get("gateway"), ifindex[h["dev"]], h.get("weight", 1)))
    return out


def fibsync_view(routes_json: list[dict[str, Any]]) -> View:
    view: View = {}
    for e in routes_json:
        paths = frozenset((h["gateway"], h["ifindex"], h["weight"]) for h in e["nexthops"])
        view[e["prefix"]] = (e["type"], paths if e["type"] == "unicast" else frozenset())
    return view


def differences(kernel: View, ours: View, limit: int = 20) -> list[str]:
    out = []
    for prefix in sorted(set(kernel) | set(ours)):
        k, o = kernel.get(prefix), ours.get(prefix)
        if k != o:
            out.append(f"{prefix}: kernel {k} fibsync {o}")
    return out[:limit] + ([f"... {len(out) - limit} more"] if len(out) > limit else [])


def load_json(text: str) -> Any:
    return json.loads(text) if text.strip() else []
