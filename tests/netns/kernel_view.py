"""What the fast path must hold, computed from the kernel with iproute2's JSON output,
and the same view of what ``fibsync routes --json`` says the pinned maps hold.

Both views map a prefix to ``(type, paths)``: ``type`` is the fast-path behaviour
(unicast, blackhole, kernel, fib) and ``paths`` a frozenset of
``(gateway, ifindex, weight, mac, mtu)``; non-unicast entries carry no paths.
``mac`` is the gateway's link-layer address when the kernel holds a valid
neighbour for it on a link that is up with carrier (else None: the fast path
hands such packets to the kernel), ``mtu`` the link's. A lone path weighs 1:
a weight only means something beside another path.

Where the kernel itself does not say which of several routes it would use,
the fast path asks it (``fib``): IPv6 keeps same-metric routes that cannot be
ECMP siblings (device routes, nexthop objects, blackholes) side by side and
picks one per lookup.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable
from typing import Any

Path = tuple[str | None, int, int, str | None, int]
View = dict[str, tuple[str, frozenset[Path]]]

KERNEL_TYPES = {"unreachable": "kernel", "prohibit": "kernel", "local": "kernel",
                "broadcast": "kernel", "anycast": "kernel", "multicast": "kernel",
                "blackhole": "blackhole", "throw": "fib", "unicast": "unicast"}
LOCAL_TYPES = {"local", "broadcast", "anycast", "multicast"}
VALID_NUD = {"REACHABLE", "STALE", "DELAY", "PROBE", "PERMANENT", "NOARP"}


def _prefix(dst: str, family: int) -> str:
    if dst == "default":
        return "0.0.0.0/0" if family == 4 else "::/0"
    return str(ipaddress.ip_network(dst, strict=False))


class _Kernel:
    """Links, neighbours and nexthop objects of a namespace, read once."""

    def __init__(self, ip_json: Callable[..., Any]) -> None:
        links = ip_json("link", "show")
        self.ifindex = {link["ifname"]: link["ifindex"] for link in links}
        self.mtu = {link["ifindex"]: link["mtu"] for link in links}
        self.carrier = {link["ifindex"] for link in links
                        if {"UP", "LOWER_UP"} <= set(link.get("flags", []))}
        self.macs: dict[tuple[int, str], str] = {}
        for n in ip_json("neigh", "show", "nud", "all"):
            if n.get("lladdr") and VALID_NUD & set(n.get("state", [])):
                self.macs[(self.ifindex[n["dev"]], str(ipaddress.ip_address(n["dst"])))] = \
                    n["lladdr"]
        self.objects = {nh["id"]: nh for nh in ip_json("nexthop", "show")}

    def path(self, hop: dict[str, Any], weight: int) -> Path:
        gateway = _gateway(hop)
        ifindex = self.ifindex[hop["dev"]]
        mac = None
        if gateway is not None and ifindex in self.carrier:
            mac = self.macs.get((ifindex, gateway))
        return (gateway, ifindex, weight, mac, self.mtu[ifindex])

    def object_paths(self, nhid: int) -> tuple[str, set[Path]]:
        obj = self.objects[nhid]
        if "blackhole" in obj:
            return "blackhole", set()
        if "group" in obj:
            members = [(self.objects[m["id"]], m.get("weight", 1)) for m in obj["group"]]
            if all("blackhole" in m for m, _ in members):
                return "blackhole", set()
            return "unicast", {self.path(m, w) for m, w in members}
        return "unicast", {self.path(obj, 1)}

    def route_paths(self, r: dict[str, Any]) -> set[Path]:
        out = set()
        for h in r.get("nexthops") or [r]:
            if "dead" in h.get("flags", []) or "dev" not in h:
                continue
            out.add(self.path(h, h.get("weight", 1)))
        return out


def kernel_view(ip_json: Callable[..., Any], table: int | str = "main") -> View:
    """``ip_json(*args)`` runs ``ip -j ARGS`` in the namespace and parses it."""
    k = _Kernel(ip_json)
    # per prefix: the best (table rank, metric) and every route there
    chosen: dict[str, tuple[tuple[int, int], list[dict[str, Any]]]] = {}
    for family in (4, 6):
        for rank, tbl in ((0, "local"), (1, table)):
            for r in ip_json(f"-{family}", "route", "show", "table", str(tbl)):
                if tbl == "local" and r.get("type", "unicast") not in LOCAL_TYPES:
                    continue
                prefix = _prefix(r["dst"], family)
                key = (rank, r.get("metric", 0))
                best = chosen.get(prefix)
                if best is None or key < best[0]:
                    chosen[prefix] = (key, [r])
                elif key == best[0]:
                    best[1].append(r)

    view: View = {}
    for prefix, (_, routes) in chosen.items():
        r = routes[0]
        rtype = KERNEL_TYPES.get(r.get("type", "unicast"), "fib")
        paths: set[Path] = set()
        if len(routes) > 1:
            kinds = {KERNEL_TYPES.get(x.get("type", "unicast"), "fib") for x in routes}
            # e.g. IPv6 multicast ff00::/8, once per link: one behaviour whichever is used
            rtype = kinds.pop() if len(kinds) == 1 and rtype not in ("unicast", "fib") else "fib"
        elif rtype == "unicast" and "nhid" in r:
            rtype, paths = k.object_paths(r["nhid"])
        elif rtype == "unicast":
            paths = k.route_paths(r)
            if not paths:
                # IPv6 keeps a route whose last live sibling was deleted, every path dead
                rtype = "fib"
        view[prefix] = (rtype, _one_weight(paths))
    return view


def _gateway(hop: dict[str, Any]) -> str | None:
    """RTA_GATEWAY prints as "gateway", RTA_VIA (IPv4 via IPv6, RFC 5549) as "via"."""
    via = hop.get("via")
    gateway = hop.get("gateway") or (via["host"] if via else None)
    return str(ipaddress.ip_address(gateway)) if gateway else None


def _one_weight(paths: set[Path]) -> frozenset[Path]:
    if len(paths) == 1:
        return frozenset((gw, ifindex, 1, mac, mtu) for gw, ifindex, _, mac, mtu in paths)
    return frozenset(paths)


def fibsync_view(routes_json: list[dict[str, Any]]) -> View:
    view: View = {}
    for e in routes_json:
        # a member the maps lack shows as such: the XDP program would follow a dangling id
        paths = {(h["gateway"], h["ifindex"], h["weight"], h["mac"], h["mtu"])
                 if not h.get("missing") else (f"missing nexthop {h['id']}", 0, 0, None, 0)
                 for h in e["nexthops"]}
        view[e["prefix"]] = (e["type"], _one_weight(paths) if e["type"] == "unicast"
                             else frozenset())
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
