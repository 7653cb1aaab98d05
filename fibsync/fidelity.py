"""Fidelity: what the kernel would do beyond our tables, and what the fast path does then.

The route tables say where the kernel would send a packet. Other kernel state
decides whether, and how, it forwards at all: policy rules, VRFs, the
forwarding and rp_filter sysctls, netfilter, IPsec, qdiscs and tc, veth
checksum offload. The watchers of fibsync/watch follow that state live and
report it as ``Condition``s; ``Fidelity`` folds them, per interface, into the
``ifaces`` map the XDP program reads (struct fs_iface in bpf/fibsync.h), so
that for each condition the program either does what the kernel does or
hands the packet to the kernel under a reason of its own. There is never a
third answer.

``entries`` is the pure part: conditions in, one fs_iface per interface out.
A condition of every interface (ifindex 0: netfilter, IPsec, rules, IPv6
forwarding) is folded into each interface's entry, so that a packet reads
one entry where it arrives and one where it leaves. A watcher that has not
finished its first dump, or that failed, counts as its most careful
condition (its family's packets go to the kernel) until it reports again.
"""

from __future__ import annotations

import asyncio
import fcntl
import socket
import struct
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from .fastpath import abi
from .fastpath.abi import Reason
from .model import AF_INET, AF_INET6, ARPHRD_ETHER
from .watch import KINDS, Condition

# kind -> (what the ingress entry hands over with, per family); first match wins
PASS_KINDS: tuple[tuple[str, Reason], ...] = (
    ("forwarding", Reason.PASS_FORWARDING_OFF),
    ("vrf", Reason.PASS_VRF),
    ("tc_ingress", Reason.PASS_TC_INGRESS),
    ("netfilter", Reason.PASS_NETFILTER),
    ("xfrm", Reason.PASS_XFRM),
    ("rules_kernel", Reason.PASS_RULES),
    ("rp_filter_kernel", Reason.PASS_RP_FILTER),
)
EGRESS_KINDS: tuple[tuple[str, Reason], ...] = (
    ("egress_qdisc", Reason.PASS_EGRESS_QDISC),
    ("netfilter_egress", Reason.PASS_NETFILTER),
)
# kind -> flag, and the families it applies to
FLAG_KINDS: dict[str, tuple[int, tuple[int, ...]]] = {
    "rules_lookup": (0, (AF_INET, AF_INET6)),  # the flag depends on the family: below
    "rp_filter_loose": (abi.FS_IF_RPF_LOOSE, (AF_INET,)),
    "rp_filter_strict": (abi.FS_IF_RPF_STRICT, (AF_INET,)),
    "checksum": (abi.FS_IF_CHECKSUM, (AF_INET, AF_INET6)),
}
RULES_FLAG = {AF_INET: abi.FS_IF_RULES_V4, AF_INET6: abi.FS_IF_RULES_V6}
# what the fast path does, in words, for the status document and the log
ACTIONS: dict[str, str] = {
    **{kind: f"to the kernel ({reason.name})" for kind, reason in PASS_KINDS},
    **{kind: f"packets routed out of it to the kernel ({reason.name})"
       for kind, reason in EGRESS_KINDS},
    "rules_lookup": "forwarded by bpf_fib_lookup, which applies the rules (FWD_RULES)",
    "rp_filter_loose": "source checked in the fast path's table; unconfirmed to the kernel "
                       "(PASS_RP_FILTER)",
    "rp_filter_strict": "source checked in the fast path's table; unconfirmed to the kernel "
                        "(PASS_RP_FILTER)",
    "checksum": "TCP/UDP from it to the kernel (PASS_CHECKSUM)",
}
ZERO = bytes(abi.IFACE.size)
# NETFILTER kinds that `netfilter = "bypass"` ignores
NETFILTER = frozenset({"netfilter", "netfilter_egress"})
FAMILIES = (AF_INET, AF_INET6)


def entry(conditions: Iterable[Condition], ifindex: int, mac: bytes = bytes(6)) -> bytes:
    """struct fs_iface of one interface, from the conditions that hold on it or on all,
    and its MAC (unicast frames to another go to the kernel)."""
    here = [c for c in conditions if c.ifindex in (0, ifindex)]
    kinds = {(c.kind, fam) for c in here for fam in (FAMILIES if c.family == 0 else (c.family,))}
    passes = []
    for family in FAMILIES:
        reason = next((r for k, r in PASS_KINDS if (k, family) in kinds
                       and not (k == "rp_filter_kernel" and family == AF_INET6)), None)
        passes.append(int(reason) if reason is not None else 0)
    flags = 0
    for kind, family in kinds:
        if kind == "rules_lookup":
            flags |= RULES_FLAG[family]
        elif kind in FLAG_KINDS and family in FLAG_KINDS[kind][1]:
            flags |= FLAG_KINDS[kind][0]
    if flags & abi.FS_IF_RPF_STRICT:
        flags &= ~abi.FS_IF_RPF_LOOSE  # the kernel's max(all, interface)
    egress = next((int(r) for k, r in EGRESS_KINDS if any(c.kind == k for c in here)), 0)
    return abi.IFACE.pack(passes[0], passes[1], flags, egress, mac, 0)


def entries(conditions: Iterable[Condition], links: Mapping[int, bytes]) -> dict[int, bytes]:
    """fs_iface for each interface (ifindex -> MAC; and each one a condition names);
    ifindexes the map cannot hold are left out (the program hands their packets over
    anyway)."""
    conds = list(conditions)
    wanted = set(links) | {c.ifindex for c in conds if c.ifindex}
    return {i: entry(conds, i, links.get(i, bytes(6))) for i in sorted(wanted)
            if 0 < i < abi.FS_MAX_IFACES}


class Watcher(Protocol):
    ready: asyncio.Event
    stats: dict[str, Any]

    async def run(self) -> None: ...

    def conditions(self) -> list[Condition]: ...


# the careful stand-ins for a watcher that cannot say (not ready, failed), by watcher name
CAREFUL: dict[str, list[Condition]] = {
    "netfilter": [Condition("netfilter", 0, 0, "the netfilter watcher has not reported yet"),
                  Condition("netfilter_egress", 0, 0,
                            "the netfilter watcher has not reported yet")],
    "xfrm": [Condition("xfrm", 0, 0, "the IPsec watcher has not reported yet")],
    "routing": [Condition("rules_kernel", 0, 0,
                          "the rules/sysctl watcher has not reported yet")],
    "interfaces": [Condition("tc_ingress", 0, 0, "the tc/qdisc watcher has not reported yet"),
                   Condition("egress_qdisc", 0, 0, "the tc/qdisc watcher has not reported yet")],
}


class Unavailable:
    """A watcher whose module failed to import: never ready, so it stands for its
    careful condition for good (and says why in the status document)."""

    def __init__(self, error: str) -> None:
        self.ready = asyncio.Event()
        self.stats: dict[str, Any] = {"error": error}

    async def run(self) -> None:
        await asyncio.Event().wait()

    def conditions(self) -> list[Condition]:
        return []


WATCHERS = {"netfilter": ("netfilter", "NetfilterWatch"), "xfrm": ("xfrm", "XfrmWatch"),
            "routing": ("routing", "RoutingWatch"), "interfaces": ("interfaces", "InterfaceWatch")}


def default_watchers(on_change: Callable[[], None]) -> dict[str, Watcher]:
    import importlib

    out: dict[str, Watcher] = {}
    for name, (module, cls) in WATCHERS.items():
        try:
            out[name] = getattr(importlib.import_module(f".watch.{module}", __package__),
                                cls)(None, on_change)
        except Exception as e:  # noqa: BLE001 - the careful condition covers it
            out[name] = Unavailable(f"{type(e).__name__}: {e}")
    return out


class Fidelity:
    """Runs the watchers and keeps ``ifaces`` equal to what their conditions say."""

    READY_TIMEOUT = 10.0  # seconds the first attach waits for the watchers' first dumps
    RETRY_SECONDS = 1.0  # after a watcher failed

    def __init__(self, update: Callable[[list[tuple[bytes, bytes]]], None], log: Any,
                 netfilter: str = "respect",
                 watchers: Callable[[Callable[[], None]], dict[str, Watcher]] = default_watchers,
                 links: Callable[[], Mapping[int, bytes]] | None = None,
                 hold: Callable[[frozenset[int]], None] = lambda held: None) -> None:
        self.update = update  # writes (key, value) pairs into `ifaces`
        # told which interfaces have egress conditions: they are no redirect target
        self.hold = hold
        self.held: frozenset[int] | None = None
        self.log = log
        self.netfilter = netfilter
        self.watchers = watchers(self.changed)
        self.links = links or kernel_links
        self.failed: dict[str, str] = {}
        self.written: dict[int, bytes] = {}
        self.active: list[Condition] = []
        self.writes = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._scheduled = False
        # no write before every watcher had its chance to dump: on a restart the entries
        # the previous run left stay in force until then (a careful stand-in written
        # meanwhile would hand traffic to the kernel for nothing)
        self._started = False

    def adopt(self, existing: Iterable[tuple[bytes, bytes]]) -> None:
        """The entries a previous run left (pinned maps adopted): the first write clears
        those no condition asks for any more."""
        self.written = {abi.U32.unpack(k)[0]: v for k, v in existing if v != ZERO}

    async def start(self) -> None:
        """Start the watchers; return once each has dumped (or READY_TIMEOUT passed:
        those not ready yet count as their careful condition) with ``ifaces`` written."""
        self._tasks = [asyncio.create_task(self._supervise(name, w), name=f"watch-{name}")
                       for name, w in self.watchers.items()]
        waits = [asyncio.create_task(w.ready.wait()) for w in self.watchers.values()]
        _, pending = await asyncio.wait(waits, timeout=self.READY_TIMEOUT)
        for t in pending:
            t.cancel()
        late = [n for n, w in self.watchers.items() if not w.ready.is_set()]
        if late:
            self.log.error("fidelity.not_ready", watchers=late,
                           note="their families go to the kernel until they report")
        self._started = True
        self.write()

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    @property
    def tasks(self) -> list[asyncio.Task[None]]:
        return self._tasks

    async def _supervise(self, name: str, watcher: Watcher) -> None:
        """A watcher that fails is logged, stands for its careful condition until it has
        dumped again, and starts again."""
        while True:
            waiter = asyncio.create_task(self._rewrite_when_ready(watcher))
            try:
                await watcher.run()
                return
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - a watcher's bug must not stop the daemon
                self.failed[name] = f"{type(e).__name__}: {e}"
                self.log.error("fidelity.watcher_failed", watcher=name, error=self.failed[name],
                               note="its family's packets go to the kernel until it recovers")
                watcher.ready.clear()
                self.changed()
                await asyncio.sleep(self.RETRY_SECONDS)
            finally:
                waiter.cancel()

    async def _rewrite_when_ready(self, watcher: Watcher) -> None:
        await watcher.ready.wait()
        self.changed()

    def changed(self) -> None:
        """A watcher's conditions changed: rewrite `ifaces` once this loop turn is over."""
        if self._scheduled or not self._started:
            return
        self._scheduled = True
        asyncio.get_running_loop().call_soon(self._write_scheduled)

    def _write_scheduled(self) -> None:
        self._scheduled = False
        self.write()

    def conditions(self) -> list[Condition]:
        out: list[Condition] = []
        for name, w in self.watchers.items():
            out.extend(w.conditions() if w.ready.is_set() else CAREFUL[name])
        if self.netfilter == "bypass":
            out = [c for c in out if c.kind not in NETFILTER]
        return sorted(set(out))

    def write(self) -> None:
        """Make `ifaces` say what the conditions say now (only entries that change)."""
        conds = self.conditions()
        want = entries(conds, self.links())
        items = [(abi.U32.pack(i), v) for i, v in want.items() if self.written.get(i) != v]
        items += [(abi.U32.pack(i), ZERO) for i in self.written if i not in want]
        if items:
            self.update(items)
            self.writes += 1
        # after `ifaces` (it names the reason a held port's packets count under)
        held = frozenset(i for i, v in want.items() if abi.IFACE.unpack(v)[3])
        if held != self.held:
            self.held = held
            self.hold(held)
        self.written = {i: v for i, v in want.items() if v != ZERO}
        self._log_changes(conds)

    def _log_changes(self, conds: list[Condition]) -> None:
        old, new = set(self.active), set(conds)
        for c in sorted(new - old):
            self.log.info("fidelity.condition", kind=c.kind, family=_family(c.family),
                          interface=_ifname(c.ifindex), detail=c.detail, action=ACTIONS[c.kind])
        for c in sorted(old - new):
            self.log.info("fidelity.condition_gone", kind=c.kind, family=_family(c.family),
                          interface=_ifname(c.ifindex), detail=c.detail,
                          note="back to the fast path")
        self.active = conds

    def set_netfilter(self, mode: str) -> None:
        if mode != self.netfilter:
            self.netfilter = mode
            self.write()

    def doc(self) -> dict[str, Any]:
        return {
            "netfilter": self.netfilter,
            "conditions": [{"kind": c.kind, "family": _family(c.family),
                            "interface": _ifname(c.ifindex), "detail": c.detail,
                            "action": ACTIONS[c.kind], "means": KINDS[c.kind]}
                           for c in self.active],
            "watchers": {name: {"ready": w.ready.is_set(), "last_error": self.failed.get(name, ""),
                                **{k: v for k, v in w.stats.items()
                                   if isinstance(v, int | float | str)}}
                         for name, w in self.watchers.items()},
            "entries": len(self.written),
            "writes": self.writes,
        }


SIOCGIFHWADDR = 0x8927


def kernel_links() -> dict[int, bytes]:
    """ifindex -> Ethernet address of every interface of this network namespace (all
    zeros for one that has none: lo, tunnels)."""
    out = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for ifindex, name in socket.if_nameindex():
            try:
                ifr = fcntl.ioctl(s, SIOCGIFHWADDR, struct.pack("16s16x", name.encode()))
            except OSError:
                continue  # gone since the list was read
            family, = struct.unpack_from("H", ifr, 16)
            out[ifindex] = ifr[18:24] if family == ARPHRD_ETHER else bytes(6)
    return out


def _family(family: int) -> str:
    return {AF_INET: "ipv4", AF_INET6: "ipv6"}.get(family, "all")


def _ifname(ifindex: int) -> str:
    if not ifindex:
        return "all"
    try:
        return socket.if_indextoname(ifindex)
    except OSError:
        return f"#{ifindex}"
