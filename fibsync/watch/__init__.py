"""Watchers of the kernel behaviour that the route tables do not hold (issue 12).

The route tables say where the kernel would send a packet; other kernel state
can change whether and how it forwards it at all: policy rules, VRFs,
forwarding and rp_filter sysctls, netfilter, IPsec, qdiscs and tc programs,
checksum offload on veth peers. Each watcher in this package follows one
kind of that state live (a dump, then notifications; a new dump after an
overrun) and reports what holds as ``Condition``s. ``fibsync/fidelity.py``
folds them into the fast path's ``ifaces`` map, the status document and the
log; it is the only reader of the conditions.

The contract every watcher keeps:

- ``__init__(self, netns: str | None, on_change: Callable[[], None])``:
  ``netns`` is a name under /run/netns, or None for the daemon's own;
- ``async def run(self) -> None``: runs until cancelled; never raises for
  kernel input it does not understand (it counts it in ``stats`` and reports
  the most careful condition it can instead);
- ``conditions(self) -> list[Condition]``: what holds now;
- ``ready``: an ``asyncio.Event`` set once the first dump is in, so that the
  daemon never attaches the fast path before it knows the conditions;
- ``stats``: a dict of counters for the status document;
- ``on_change()`` is called (from the event loop) after every change of
  ``conditions()``, at most once per batch of notifications.
"""

from __future__ import annotations

from dataclasses import dataclass

# What a condition makes the fast path do, by kind (fidelity.py maps each to a
# reason code of bpf/fibsync.h and to a field of struct fs_iface).
KINDS = {
    # hand the family's packets arriving on ``ifindex`` (0: any) to the kernel
    "forwarding": "forwarding is off",                       # PASS_FORWARDING_OFF
    "vrf": "the interface is enslaved to a VRF",             # PASS_VRF
    "rules_kernel": "policy rules only the kernel evaluates",  # PASS_RULES
    "rp_filter_kernel": "rp_filter the fast path cannot check",  # PASS_RP_FILTER
    "netfilter": "netfilter rules may act",                  # PASS_NETFILTER
    "xfrm": "IPsec policies may apply",                      # PASS_XFRM
    "tc_ingress": "tc or tcx ingress on the interface",      # PASS_TC_INGRESS
    # checked per packet
    "rules_lookup": "policy rules bpf_fib_lookup applies",   # FS_IF_RULES_V4/V6: FWD_RULES
    "rp_filter_loose": "rp_filter 2 (loose)",                # FS_IF_RPF_LOOSE
    "rp_filter_strict": "rp_filter 1 (strict)",              # FS_IF_RPF_STRICT
    "checksum": "veth peer leaves TCP/UDP checksums to offload",  # FS_IF_CHECKSUM
    # packets routed out of ``ifindex`` go to the kernel
    "egress_qdisc": "own qdisc or tc/tcx egress on the interface",  # PASS_EGRESS_QDISC
    "netfilter_egress": "netfilter egress hook on the interface",  # PASS_NETFILTER
}


@dataclass(frozen=True, slots=True, order=True)
class Condition:
    """One piece of kernel state the fast path must honour.

    ``family``: AF_INET, AF_INET6, or 0 for both; ``ifindex``: the interface it
    holds on, 0 for every interface; ``detail``: what holds, in words an
    operator can act on ("table inet fw, chain fwd (hook forward): 3 rules").
    """

    kind: str
    family: int
    ifindex: int
    detail: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown condition kind {self.kind!r}")


# Periodic kernel queries that take the RTNL lock (BPF_PROG_QUERY of tcx, link,
# qdisc and filter dumps, ethtool requests) spend at most this share of a core
# spinning on it, and pause at most RTNL_PAUSE_MAX seconds for that (an uncontended
# query spends ~1-5 ms: the interval stays as it is).
RTNL_DUTY = 0.02
RTNL_PAUSE_MAX = 15.0


def paced(interval: float, spent: float) -> float:
    """Seconds from the start of a periodic kernel query to the start of the next:
    ``interval``, or ``spent / RTNL_DUTY`` when the last one took ``spent`` seconds
    of CPU (at most RTNL_PAUSE_MAX).

    Such a query waits for the RTNL lock. While `ip` or a routing daemon holds it
    for a change that walks the whole FIB (a nexthop object replaced under a full
    table: 0.1-0.4 s each), the kernel's mutex lets the waiter spin as long as the
    holder runs: 0.2-0.4 s of CPU a query, against 0.1 ms when the lock is free
    (measured during a storm of such replaces: 12 s of CPU in 44 s for a query
    every 10 ms; the interfaces watcher's polls, 12.5 s in 45 s). Paced by the CPU
    it spent (not by how long it took: a query that merely waited for a busy core
    costs nothing), the polls took 3.0 s in that storm, and what they watch is
    known up to RTNL_PAUSE_MAX late during a storm only.
    """
    return max(interval, min(spent / RTNL_DUTY, RTNL_PAUSE_MAX))
