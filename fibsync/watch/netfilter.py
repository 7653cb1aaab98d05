"""Netfilter: which nftables chains (and iptables-legacy tables) may act on forwarded packets.

Netfilter runs after XDP: a packet the fast path forwards never meets a chain.
So wherever a chain could change what happens to a forwarded packet, the
fast path hands that traffic to the kernel (condition kind ``netfilter``,
or ``netfilter_egress`` for packets routed out of a device with a netdev
egress chain), and only provably harmless chains are left alone.

What sees forwarded packets (``hook_place``):

- families ip (AF_INET), ip6 (AF_INET6), inet (both: family 0) at the hooks
  prerouting, forward and postrouting: every interface (ifindex 0);
- inet's ingress hook and netdev's ingress hook: the devices the chain is
  bound to (family 0); netdev's egress hook: ``netfilter_egress`` on its
  devices;
- flowtables (ip, ip6, inet): an ingress hook on their devices that forwards,
  and NATs, the flows a rule offloaded to it;
- not input and output (local traffic only), and never the bridge and arp
  families: bridged frames and ARP are not routed, so the fast path never
  takes them from the kernel.

Devices come by name (NFTA_HOOK_DEV, NFTA_HOOK_DEVS with NFTA_DEVICE_NAME,
and since Linux 6.17 NFTA_DEVICE_PREFIX for a wildcard such as ``eth*``;
since 6.16 a hook may name a device that does not exist yet and binds it
when it appears). Names are resolved in the watched namespace on every dump;
a name that matches no device is skipped (a missing device has no traffic),
and since a device can appear, vanish or be renamed without any nftables
message, link notifications re-dump too while a chain names a device.

A chain may act unless all of these hold:

- its type is ``filter`` (``nat`` and ``route`` chains always may act);
- its policy is accept;
- every expression of every rule is harmless (``judge_expression``):
  ``counter``, ``cmp``, ``bitwise``, ``byteorder`` and ``range`` (they only
  compare or compute registers; a failed compare ends the rule); ``payload``
  and ``meta`` as loads (a source register makes them a *set*, which
  mangles); ``immediate`` loading data into a register, or with the verdict
  accept, continue, return or break (return in a base chain applies its
  accept policy); ``lookup`` into a set or a data map (a lookup whose
  destination is the verdict register is a verdict map, which may drop or
  jump). The verdict register is the only way a register becomes a verdict:
  the kernel refuses data stores into it.

Everything else may act: drop, reject, queue, jump and goto (the target
chain is not followed), nat, masq, redir, log, limit, quota, notrack,
dynset, objref, match/target (iptables-nft's xtables), and ``ct``: even a
plain load such as ``ct state established`` turns connection tracking on for
the family (nft_ct_get_init takes nf_ct_netns_get), and with it
defragmentation and the drops of a full conntrack table, which the fast path
would bypass. Counters in chains left to the fast path do not count the
packets it forwards.

A dormant table's chains are not registered and are skipped. A message
this module cannot decode makes the most careful condition (every packet of
every interface to the kernel), an expression it cannot read makes its chain
act; both count in ``stats['undecodable']``.

A table with the owner flag (NFT_TABLE_F_OWNER) goes when its owner's
netlink socket closes, and the kernel says nothing (nft_rcv_nl_event releases
it without a notification): while such a table makes a condition, the
once-a-second poll below also lists the tables, and re-dumps when it is gone.

iptables-legacy: its x_tables rules are invisible to nfnetlink. Every table
listed in /proc/net/ip_tables_names (ip6_tables_names) of the watched
namespace makes a ``netfilter`` condition for AF_INET (AF_INET6), read on
every dump and polled once a second; /proc/net follows the namespace of the
process's main thread, so the worker reads /proc/thread-self/net instead.

How: a NETLINK_NETFILTER socket joined to NFNLGRP_NFTABLES (and a
NETLINK_ROUTE socket joined to RTNLGRP_LINK); every notification or overrun
schedules a full dump, debounced (``DumpWatch``): tables, chains and
flowtables, then the rules of the candidate chains only (filter chains with
policy accept at a hook that sees forwarded packets; the kernel filters a
rule dump by table and chain), read up to each chain's first rule that may
act. A dump interrupted (NLM_F_DUMP_INTR, EBUSY) or spread over two ruleset
generations (nfgenmsg res_id) is taken again. Measured on this kernel, from
a change to its condition: 0.1 s with 2000 harmless rules in a forward
chain, 0.5 s with 20000 (the kernel's dump of them alone takes 0.25 s).

``DumpWatch``, the notification / debounce / dump machinery, serves
fibsync/watch/xfrm.py as well.

Longer than our ~500-line mark: nftables' constants, decoding and judgement
are one vocabulary (some 600 lines, most of them the kernel's numbers and
the table of what is harmless); the rest is ``DumpWatch`` and its blocking
request helpers, which xfrm.py imports from here and which can move to a
module of their own (watch/dump.py) without change.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import math
import os
import socket
import struct
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, TypeVar

import structlog

from fibsync.model import AF_INET, AF_INET6
from fibsync.netlink import rtnl as nl
from fibsync.process import wait_event
from fibsync.watch import Condition

log = structlog.get_logger(__name__)

# ---------------------------------------------------------------- netlink.h, netfilter.h

NETLINK_NETFILTER = 12
NF_DROP = 0
NF_ACCEPT = 1
NF_STOLEN = 2
NF_QUEUE = 3
NF_REPEAT = 4
NF_STOP = 5

# enum nf_inet_hooks, enum nf_dev_hooks
NF_INET_PRE_ROUTING = 0
NF_INET_LOCAL_IN = 1
NF_INET_FORWARD = 2
NF_INET_LOCAL_OUT = 3
NF_INET_POST_ROUTING = 4
NF_INET_INGRESS = 5
NF_NETDEV_INGRESS = 0
NF_NETDEV_EGRESS = 1

# enum nfproto: a table's family as nfgenmsg carries it
NFPROTO_UNSPEC = 0
NFPROTO_INET = 1
NFPROTO_IPV4 = 2
NFPROTO_ARP = 3
NFPROTO_NETDEV = 5
NFPROTO_BRIDGE = 7
NFPROTO_IPV6 = 10

# ---------------------------------------------------------------- nfnetlink.h

NFNLGRP_NFTABLES = 7
NFNL_SUBSYS_NFTABLES = 10
NFNETLINK_V0 = 0

# ---------------------------------------------------------------- nf_tables.h

NFT_MSG_GETTABLE = 1
NFT_MSG_GETCHAIN = 4
NFT_MSG_GETRULE = 7
NFT_MSG_GETFLOWTABLE = 23

NFT_REG_VERDICT = 0
NFT_CONTINUE = -1
NFT_BREAK = -2
NFT_JUMP = -3
NFT_GOTO = -4
NFT_RETURN = -5

NFTA_LIST_ELEM = 1
NFTA_HOOK_HOOKNUM = 1
NFTA_HOOK_PRIORITY = 2
NFTA_HOOK_DEV = 3
NFTA_HOOK_DEVS = 4
NFTA_DEVICE_NAME = 1
NFTA_DEVICE_PREFIX = 2
NFT_TABLE_F_DORMANT = 0x1
NFT_TABLE_F_OWNER = 0x2
NFTA_TABLE_NAME = 1
NFTA_TABLE_FLAGS = 2
NFTA_CHAIN_TABLE = 1
NFTA_CHAIN_NAME = 3
NFTA_CHAIN_HOOK = 4
NFTA_CHAIN_POLICY = 5
NFTA_CHAIN_TYPE = 7
NFTA_RULE_TABLE = 1
NFTA_RULE_CHAIN = 2
NFTA_RULE_HANDLE = 3
NFTA_RULE_EXPRESSIONS = 4
NFTA_EXPR_NAME = 1
NFTA_EXPR_DATA = 2
NFTA_DATA_VALUE = 1
NFTA_DATA_VERDICT = 2
NFTA_VERDICT_CODE = 1
NFTA_VERDICT_CHAIN = 2
NFTA_IMMEDIATE_DREG = 1
NFTA_IMMEDIATE_DATA = 2
NFTA_PAYLOAD_SREG = 5
NFTA_META_SREG = 3
NFTA_CT_SREG = 4
NFTA_LOOKUP_SET = 1
NFTA_LOOKUP_DREG = 3
NFTA_FLOWTABLE_TABLE = 1
NFTA_FLOWTABLE_NAME = 2
NFTA_FLOWTABLE_HOOK = 3
NFTA_FLOWTABLE_HOOK_DEVS = 3

# ---------------------------------------------------------------- layouts

NFGENMSG = struct.Struct("!BBH")  # struct nfgenmsg: family, version, res_id (big endian)
BE32 = struct.Struct("!I")
BE32S = struct.Struct("!i")
BE64 = struct.Struct("!Q")
I32 = struct.Struct("=i")

FAMILY_NAMES = {
    NFPROTO_INET: "inet", NFPROTO_IPV4: "ip", NFPROTO_ARP: "arp", NFPROTO_NETDEV: "netdev",
    NFPROTO_BRIDGE: "bridge", NFPROTO_IPV6: "ip6",
}
INET_HOOKS = {
    NF_INET_PRE_ROUTING: "prerouting", NF_INET_LOCAL_IN: "input", NF_INET_FORWARD: "forward",
    NF_INET_LOCAL_OUT: "output", NF_INET_POST_ROUTING: "postrouting",
    NF_INET_INGRESS: "ingress",
}
NETDEV_HOOKS = {NF_NETDEV_INGRESS: "ingress", NF_NETDEV_EGRESS: "egress"}
VERDICT_NAMES = {
    NF_DROP: "drop", NF_ACCEPT: "accept", NF_STOLEN: "stolen", NF_QUEUE: "queue",
    NF_REPEAT: "repeat", NF_STOP: "stop", NFT_CONTINUE: "continue", NFT_BREAK: "break",
    NFT_JUMP: "jump", NFT_GOTO: "goto", NFT_RETURN: "return",
}
# The address family of the packets a table of each family sees (0: both).
TABLE_AF = {NFPROTO_IPV4: int(AF_INET), NFPROTO_IPV6: int(AF_INET6), NFPROTO_INET: 0,
            NFPROTO_NETDEV: 0}
ROUTED_HOOKS = frozenset({NF_INET_PRE_ROUTING, NF_INET_FORWARD, NF_INET_POST_ROUTING})
LOCAL_HOOKS = frozenset({NF_INET_LOCAL_IN, NF_INET_LOCAL_OUT})
# Expressions that only compute or compare registers (see the module docstring).
PURE_EXPRESSIONS = frozenset({"counter", "cmp", "bitwise", "byteorder", "range"})
HARMLESS_VERDICTS = frozenset({NF_ACCEPT, NFT_CONTINUE, NFT_RETURN, NFT_BREAK})

LEGACY_FILES = {int(AF_INET): "ip_tables_names", int(AF_INET6): "ip6_tables_names"}
LEGACY_INTERVAL = 1.0  # s between two reads of the iptables-legacy table lists


class Undecodable(ValueError):
    """A message or attribute of a shape this module does not know."""


# ---------------------------------------------------------------- decoding


def _string(payload: bytes) -> str:
    # surrogateescape: a name goes back to the kernel exactly (a rule dump
    # filtered by table and chain); _text makes it printable for a detail
    return payload.split(b"\0", 1)[0].decode(errors="surrogateescape")


def _name(text: str) -> bytes:
    return text.encode(errors="surrogateescape") + b"\0"


def _text(text: str) -> str:
    return text.encode(errors="surrogateescape").decode(errors="replace")


def _be32(payload: bytes | None) -> int:
    if payload is None or len(payload) < 4:
        raise Undecodable(f"a 32-bit attribute of {0 if payload is None else len(payload)} bytes")
    value: int = BE32.unpack_from(payload)[0]
    return value


def _family(payload: bytes) -> tuple[int, int]:
    """(nfgen_family, res_id) of a message payload."""
    if len(payload) < NFGENMSG.size:
        raise Undecodable(f"an nftables message of {len(payload)} bytes")
    family, _version, res_id = NFGENMSG.unpack_from(payload)
    return family, res_id


def _found(payload: bytes, offset: int = 0) -> dict[int, bytes]:
    return dict(nl.attrs(payload, offset))


@dataclass(frozen=True, slots=True)
class Table:
    family: int
    name: str
    dormant: bool
    owned: bool = False  # released with its owner's socket, with no message


@dataclass(frozen=True, slots=True)
class Hook:
    """Where a base chain or flowtable is registered; ``devices`` and ``prefixes``
    only for device-bound hooks."""

    number: int
    devices: tuple[str, ...] = ()
    prefixes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Chain:
    family: int
    table: str
    name: str
    hook: Hook | None  # None: a regular chain, entered only by jump or goto
    policy: int = NF_ACCEPT
    type: str = "filter"


@dataclass(frozen=True, slots=True)
class Rule:
    family: int
    table: str
    chain: str
    handle: int
    acts: str | None  # what the first expression that may act does; None: harmless
    undecodable: bool = False  # an expression could not be read (and so may act)


@dataclass(frozen=True, slots=True)
class Flowtable:
    family: int
    table: str
    name: str
    hook: Hook


def _hook(payload: bytes, dev_attr: int | None, devs_attr: int) -> Hook:
    """A chain's NFTA_CHAIN_HOOK or a flowtable's NFTA_FLOWTABLE_HOOK (both number
    the hook 1; a chain names a single device in NFTA_HOOK_DEV as well)."""
    found = _found(payload)
    devices: list[str] = []
    prefixes: list[str] = []
    if dev_attr is not None and dev_attr in found:
        devices.append(_string(found[dev_attr]))
    if devs_attr in found:
        for kind, value in nl.attrs(found[devs_attr]):
            if kind == NFTA_DEVICE_NAME:
                devices.append(_string(value))
            elif kind == NFTA_DEVICE_PREFIX:
                prefixes.append(_string(value))
            else:
                raise Undecodable(f"device attribute {kind}")
    return Hook(_be32(found.get(NFTA_HOOK_HOOKNUM)), tuple(dict.fromkeys(devices)),
                tuple(dict.fromkeys(prefixes)))


def decode_table(payload: bytes) -> Table:
    family, _ = _family(payload)
    found = _found(payload, NFGENMSG.size)
    if NFTA_TABLE_NAME not in found:
        raise Undecodable("a table without a name")
    flags = _be32(found[NFTA_TABLE_FLAGS]) if NFTA_TABLE_FLAGS in found else 0
    return Table(family, _string(found[NFTA_TABLE_NAME]), bool(flags & NFT_TABLE_F_DORMANT),
                 bool(flags & NFT_TABLE_F_OWNER))


def decode_chain(payload: bytes) -> Chain:
    family, _ = _family(payload)
    found = _found(payload, NFGENMSG.size)
    if NFTA_CHAIN_TABLE not in found or NFTA_CHAIN_NAME not in found:
        raise Undecodable("a chain without table or name")
    table, name = _string(found[NFTA_CHAIN_TABLE]), _string(found[NFTA_CHAIN_NAME])
    if NFTA_CHAIN_HOOK not in found:
        return Chain(family, table, name, None)
    # nf_tables_fill_chain_info sends both for every base chain: a chain
    # without them is not one to call harmless
    if NFTA_CHAIN_POLICY not in found or NFTA_CHAIN_TYPE not in found:
        raise Undecodable(f"base chain {name} without policy or type")
    return Chain(family, table, name, _hook(found[NFTA_CHAIN_HOOK], NFTA_HOOK_DEV, NFTA_HOOK_DEVS),
                 _be32(found[NFTA_CHAIN_POLICY]), _string(found[NFTA_CHAIN_TYPE]))


def decode_flowtable(payload: bytes) -> Flowtable:
    family, _ = _family(payload)
    found = _found(payload, NFGENMSG.size)
    if not {NFTA_FLOWTABLE_TABLE, NFTA_FLOWTABLE_NAME, NFTA_FLOWTABLE_HOOK} <= found.keys():
        raise Undecodable("a flowtable without table, name or hook")
    hook = _hook(found[NFTA_FLOWTABLE_HOOK], None, NFTA_FLOWTABLE_HOOK_DEVS)
    return Flowtable(family, _string(found[NFTA_FLOWTABLE_TABLE]),
                     _string(found[NFTA_FLOWTABLE_NAME]), hook)


def verdict_name(code: int, chain: str = "") -> str:
    if code >= 0 and code & 0xFF in VERDICT_NAMES and code not in VERDICT_NAMES:
        return f"{VERDICT_NAMES[code & 0xFF]} ({code:#x})"  # NF_QUEUE with a queue number
    name = VERDICT_NAMES.get(code, f"verdict {code}")
    return f"{name} {chain}" if chain else name


def _attr(data: bytes, wanted: int) -> bytes | None:
    """The payload of the first attribute of type ``wanted`` (walked inline: the
    judgement of a big rule dump reads tens of thousands of expressions)."""
    offset, end = 0, len(data)
    while offset + 4 <= end:
        length, kind = nl.NLATTR.unpack_from(data, offset)
        if length < 4:
            raise Undecodable(f"an attribute of length {length}")
        if kind & nl.NLA_TYPE_MASK == wanted:
            return data[offset + 4:offset + length]
        offset += (length + 3) & ~3
    return None


def judge_expression(name: str, data: bytes) -> str | None:
    """None when the expression cannot change a forwarding decision, else what
    it does in words ("'reject'", "verdict drop"). Raises Undecodable when an
    attribute the judgement needs is missing or malformed."""
    if name in PURE_EXPRESSIONS:
        return None
    if name == "immediate":
        if _be32(_attr(data, NFTA_IMMEDIATE_DREG)) != NFT_REG_VERDICT:
            return None  # a data load into a register
        value = _attr(data, NFTA_IMMEDIATE_DATA)
        verdict = _attr(value, NFTA_DATA_VERDICT) if value is not None else None
        if verdict is None:
            raise Undecodable("an immediate into the verdict register without a verdict")
        code: int = BE32S.unpack(BE32.pack(_be32(_attr(verdict, NFTA_VERDICT_CODE))))[0]
        if code in HARMLESS_VERDICTS:
            return None
        target = _attr(verdict, NFTA_VERDICT_CHAIN)
        return f"verdict {verdict_name(code, _string(target) if target else '')}"
    if name == "payload":
        return "'payload' set" if _attr(data, NFTA_PAYLOAD_SREG) is not None else None
    if name == "meta":
        return "'meta' set" if _attr(data, NFTA_META_SREG) is not None else None
    if name == "lookup":
        dreg = _attr(data, NFTA_LOOKUP_DREG)
        if dreg is not None and _be32(dreg) == NFT_REG_VERDICT:
            return f"'lookup' in verdict map @{_string(_attr(data, NFTA_LOOKUP_SET) or b'?')}"
        return None
    if name == "ct":
        return "'ct' set" if _attr(data, NFTA_CT_SREG) is not None \
            else "'ct' (turns on connection tracking)"
    return f"'{name}'"


def expressions(payload: bytes) -> Iterator[tuple[str, bytes]]:
    """(name, data) of each expression of an NFTA_RULE_EXPRESSIONS list."""
    offset, end = 0, len(payload)
    while offset + 4 <= end:
        length, kind = nl.NLATTR.unpack_from(payload, offset)
        if length < 4:
            raise Undecodable(f"an attribute of length {length}")
        if kind & nl.NLA_TYPE_MASK != NFTA_LIST_ELEM:
            raise Undecodable(f"rule expression list attribute {kind & nl.NLA_TYPE_MASK}")
        elem = payload[offset + 4:offset + length]
        name = _attr(elem, NFTA_EXPR_NAME)
        if name is None:
            raise Undecodable("an expression without a name")
        yield _string(name), _attr(elem, NFTA_EXPR_DATA) or b""
        offset += (length + 3) & ~3


def judge_rule(payload: bytes) -> tuple[str | None, bool]:
    """What the first expression of an NFTA_RULE_EXPRESSIONS list that may act
    does (None: none may), and whether one could not be read (it may act)."""
    name = "?"
    try:
        for name, data in expressions(payload):
            acts = judge_expression(name, data)
            if acts is not None:
                return acts, False
            name = "?"  # an expression list broken after it is not this one's fault
    except (Undecodable, struct.error) as exc:
        return f"'{name}' undecodable ({exc})", True
    return None, False


def rule_head(payload: bytes) -> tuple[int, str, str, int, bytes]:
    """(family, table, chain, handle, expression list) of a rule message."""
    family, _ = _family(payload)
    table = chain = None
    handle = 0
    exprs = b""
    offset, end = NFGENMSG.size, len(payload)
    while offset + 4 <= end:
        length, kind = nl.NLATTR.unpack_from(payload, offset)
        if length < 4:
            break
        kind &= nl.NLA_TYPE_MASK
        if kind == NFTA_RULE_TABLE:
            table = payload[offset + 4:offset + length]
        elif kind == NFTA_RULE_CHAIN:
            chain = payload[offset + 4:offset + length]
        elif kind == NFTA_RULE_HANDLE and length == 4 + BE64.size:
            handle = BE64.unpack_from(payload, offset + 4)[0]
        elif kind == NFTA_RULE_EXPRESSIONS:
            exprs = payload[offset + 4:offset + length]
        offset += (length + 3) & ~3
    if table is None or chain is None:
        raise Undecodable("a rule without table or chain")
    return family, _string(table), _string(chain), handle, exprs


# ---------------------------------------------------------------- judgement


@dataclass(frozen=True, slots=True)
class Place:
    """Where a hook meets forwarded packets: the condition's kind and family, and
    whether it holds on the hook's devices (else on every interface)."""

    kind: str
    family: int
    on_devices: bool


def hook_place(table_family: int, hook: int) -> Place | None:
    """Where a hook of a table of ``table_family`` meets forwarded packets;
    None where it never does (local hooks, bridge and arp). An unknown family
    or hook gets the most careful place: every packet of every interface."""
    if table_family in (NFPROTO_ARP, NFPROTO_BRIDGE):
        return None
    if table_family in (NFPROTO_IPV4, NFPROTO_IPV6, NFPROTO_INET):
        family = TABLE_AF[table_family]
        if hook in ROUTED_HOOKS:
            return Place("netfilter", family, False)
        if hook in LOCAL_HOOKS:
            return None
        if hook == NF_INET_INGRESS:
            return Place("netfilter", 0, True)
    elif table_family == NFPROTO_NETDEV:
        if hook == NF_NETDEV_INGRESS:
            return Place("netfilter", 0, True)
        if hook == NF_NETDEV_EGRESS:
            return Place("netfilter_egress", 0, True)
    return Place("netfilter", TABLE_AF.get(table_family, 0), False)


def hook_name(table_family: int, hook: int) -> str:
    names = NETDEV_HOOKS if table_family == NFPROTO_NETDEV else INET_HOOKS
    return names.get(hook, f"hook {hook}")


def _devices(hook: Hook, links: Mapping[str, int]) -> list[tuple[str, int]]:
    """(name, ifindex) of the devices in the namespace a hook binds."""
    bound = {name: links[name] for name in hook.devices if name in links}
    for prefix in hook.prefixes:
        bound.update((name, index) for name, index in links.items() if name.startswith(prefix))
    return sorted(bound.items(), key=lambda item: item[1])


T = TypeVar("T")


def _decode_all(payloads: Iterable[bytes], decoder: Callable[[bytes], T], what: str,
                unreadable: list[str]) -> list[T]:
    out = []
    for payload in payloads:
        try:
            out.append(decoder(payload))
        except (Undecodable, struct.error) as exc:
            unreadable.append(f"undecodable {what} message ({exc})")
    return out


ChainKey = tuple[int, str, str]  # (table family, table, chain)


@dataclass
class Ruleset:
    """One dump of nftables, judged (see the module docstring)."""

    tables: list[Table] = field(default_factory=list)
    chains: list[Chain] = field(default_factory=list)
    flowtables: list[Flowtable] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)  # messages that could not be placed
    # of each candidate chain: its first rule that may act, and that rule's position
    first_acting: dict[ChainKey, tuple[int, Rule]] = field(default_factory=dict)
    undecodable_rules: int = 0

    @classmethod
    def decode(cls, tables: Iterable[bytes], chains: Iterable[bytes], rules: Iterable[bytes],
               flowtables: Iterable[bytes] = ()) -> Ruleset:
        """From the payloads (nfgenmsg on) of NFT_MSG_NEW{TABLE,CHAIN,RULE,FLOWTABLE};
        only the rules of ``candidates()`` are read, up to the first that may act."""
        unreadable: list[str] = []
        out = cls(_decode_all(tables, decode_table, "table", unreadable),
                  _decode_all(chains, decode_chain, "chain", unreadable),
                  _decode_all(flowtables, decode_flowtable, "flowtable", unreadable),
                  unreadable)
        candidates = out.candidates()
        positions: dict[ChainKey, int] = {}
        for payload in rules:
            try:
                family, table, chain, handle, exprs = rule_head(payload)
            except (Undecodable, struct.error) as exc:
                unreadable.append(f"undecodable rule message ({exc})")
                continue
            key = (family, table, chain)
            if key not in candidates or key in out.first_acting:
                continue
            positions[key] = position = positions.get(key, 0) + 1
            acts, undecodable = judge_rule(exprs)
            out.undecodable_rules += undecodable
            if acts is not None:
                out.first_acting[key] = (position,
                                         Rule(family, table, chain, handle, acts, undecodable))
        return out

    def candidates(self) -> set[ChainKey]:
        """The base chains of live tables that meet forwarded packets and whose
        rules decide whether they may act: filter chains with policy accept."""
        dormant = {(t.family, t.name) for t in self.tables if t.dormant}
        return {
            (c.family, c.table, c.name) for c in self.chains
            if c.hook is not None and (c.family, c.table) not in dormant
            and c.type == "filter" and c.policy == NF_ACCEPT
            and hook_place(c.family, c.hook.number) is not None
        }

    @property
    def undecodable(self) -> int:
        """Messages and expressions this module could not read."""
        return len(self.unreadable) + self.undecodable_rules

    def why(self, chain: Chain) -> str | None:
        """Why a base chain may act; None when it cannot."""
        if chain.type != "filter":
            return f"type {chain.type}"
        if chain.policy != NF_ACCEPT:
            return f"policy {verdict_name(chain.policy)}"
        found = self.first_acting.get((chain.family, chain.table, chain.name))
        if found is None:
            return None
        position, rule = found
        return f"rule {position} (handle {rule.handle}) {rule.acts}"

    def acting(self) -> list[tuple[Chain | Flowtable, Place, str]]:
        """The base chains and flowtables of live tables that may act on forwarded
        packets, where they meet them, and why they may act."""
        dormant = {(t.family, t.name) for t in self.tables if t.dormant}
        out: list[tuple[Chain | Flowtable, Place, str]] = []
        for flowtable in self.flowtables:
            if (flowtable.family, flowtable.table) not in dormant:
                # always the ingress hook of its devices, whatever the table's family
                out.append((flowtable, Place("netfilter", TABLE_AF.get(flowtable.family, 0), True),
                            "flows offloaded to it are forwarded by netfilter"))
        for chain in self.chains:
            if chain.hook is None or (chain.family, chain.table) in dormant:
                continue
            place = hook_place(chain.family, chain.hook.number)
            if place is not None and (why := self.why(chain)) is not None:
                out.append((chain, place, why))
        return out

    def owned_tables(self) -> frozenset[tuple[int, str]]:
        """(family, name) of the owned tables whose chains or flowtables may act."""
        owned = {(t.family, t.name) for t in self.tables if t.owned}
        return frozenset((item.family, item.table) for item, _, _ in self.acting()) & owned

    def names_devices(self) -> bool:
        """Whether a chain or flowtable that may act is bound to devices by name."""
        return any(place.on_devices for _, place, _ in self.acting())

    def conditions(self, links: Mapping[str, int]) -> list[Condition]:
        """The conditions of this ruleset; ``links``: name -> ifindex in the namespace."""
        out = [Condition("netfilter", 0, 0, f"{what}: every packet goes to the kernel")
               for what in self.unreadable]
        for item, place, why in self.acting():
            assert item.hook is not None
            family = FAMILY_NAMES.get(item.family, str(item.family))
            where = f"table {family} {item.table}, " + \
                (f"flowtable {item.name}" if isinstance(item, Flowtable) else f"chain {item.name}")
            hook = "ingress" if isinstance(item, Flowtable) else \
                hook_name(item.family, item.hook.number)
            # the policy is named where it is not what the condition is about
            extra = ", policy accept" if isinstance(item, Chain) and item.policy == NF_ACCEPT \
                else ""
            if not place.on_devices:
                out.append(Condition(place.kind, place.family, 0,
                                     f"{where} (hook {hook}{extra}): {why}"))
                continue
            out.extend(
                Condition(place.kind, place.family, ifindex,
                          f"{where} (hook {hook} on {name}{extra}): {why}")
                for name, ifindex in _devices(item.hook, links)
            )
        return sorted({Condition(c.kind, c.family, c.ifindex, _text(c.detail)) for c in out})


# ---------------------------------------------------------------- iptables-legacy


def legacy_tables(proc_net: str = "/proc/thread-self/net") -> dict[int, list[str]]:
    """The x_tables tables loaded in the calling thread's namespace, by address family."""
    out: dict[int, list[str]] = {}
    for family, name in LEGACY_FILES.items():
        try:
            with open(os.path.join(proc_net, name)) as f:
                tables = sorted(line.strip() for line in f if line.strip())
        except FileNotFoundError:  # a kernel without ip(6)_tables
            continue
        if tables:
            out[family] = tables
    return out


def legacy_conditions(tables: Mapping[int, Sequence[str]]) -> list[Condition]:
    return [
        Condition("netfilter", family, 0,
                  f"iptables-legacy table {name} is loaded; its rules cannot be watched")
        for family, names in sorted(tables.items()) for name in names
    ]


# ---------------------------------------------------------------- blocking requests


class DumpInterrupted(Exception):
    """The kernel answered a dump with NLM_F_DUMP_INTR or EBUSY: take it again."""


def messages(data: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    """(type, flags, seq, payload) of each netlink message in a datagram."""
    offset = 0
    while offset + nl.NLMSGHDR.size <= len(data):
        length, kind, flags, seq, _pid = nl.NLMSGHDR.unpack_from(data, offset)
        if length < nl.NLMSGHDR.size:
            return
        yield kind, flags, seq, data[offset + nl.NLMSGHDR.size:offset + length]
        offset += (length + 3) & ~3


REQUEST_TIMEOUT = 5.0  # s: a kernel that does not answer a request is an error


def request_socket(protocol: int) -> socket.socket:
    """A blocking netlink socket of the calling thread's namespace, for requests."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, protocol)
    try:
        sock.setsockopt(nl.SOL_NETLINK, nl.NETLINK_CAP_ACK, 1)
        sock.bind((0, 0))
        sock.settimeout(REQUEST_TIMEOUT)
    except BaseException:
        sock.close()
        raise
    return sock


def subscribe(protocol: int, groups: Iterable[int], rcvbuf: int = 1 << 20) -> socket.socket:
    """A non-blocking netlink socket of the calling thread's namespace joined to ``groups``."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, protocol)
    try:
        try:
            sock.setsockopt(socket.SOL_SOCKET, nl.SO_RCVBUFFORCE, rcvbuf)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.bind((0, 0))
        for group in groups:
            sock.setsockopt(nl.SOL_NETLINK, nl.NETLINK_ADD_MEMBERSHIP, group)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def exchange(sock: socket.socket, mtype: int, body: bytes, flags: int = 0
             ) -> list[tuple[int, bytes]]:
    """Send one request; (type, payload) of its answers: every message of a
    dump (``NLM_F_DUMP``), else the one answer (nothing for an ack).

    Raises DumpInterrupted for NLM_F_DUMP_INTR or EBUSY, OSError for any other error.
    """
    msg = nl.request(mtype, body, flags | nl.NLM_F_REQUEST)
    seq = nl.seq_of(msg)
    sock.send(msg)
    out: list[tuple[int, bytes]] = []
    interrupted = False
    buf = bytearray(nl.RECV_BUFFER)
    while True:
        n = sock.recv_into(buf)
        for kind, mflags, mseq, payload in messages(bytes(memoryview(buf)[:n])):
            if mseq != seq:
                continue
            interrupted |= bool(mflags & nl.NLM_F_DUMP_INTR)
            if kind in (nl.NLMSG_DONE, nl.NLMSG_ERROR):
                err = -I32.unpack_from(payload)[0] if len(payload) >= 4 else 0
                if err == errno.EBUSY or interrupted:
                    raise DumpInterrupted(os.strerror(err) if err else "NLM_F_DUMP_INTR")
                if err:
                    raise OSError(err, os.strerror(err))
                return out
            out.append((kind, payload))
            if not flags & nl.NLM_F_DUMP:
                return out


DUMP_ATTEMPTS = 20


def retried(take: Callable[[], list[list[tuple[int, bytes]]]]
            ) -> tuple[list[list[tuple[int, bytes]]], int]:
    """``take()`` again while it is interrupted; (its answers, the retries)."""
    for attempt in range(DUMP_ATTEMPTS):
        try:
            return take(), attempt
        except DumpInterrupted:
            time.sleep(0.002 * (attempt + 1))
    raise OSError(errno.EBUSY, f"the dump was interrupted {DUMP_ATTEMPTS} times in a row")


# ---------------------------------------------------------------- the watcher machinery


class Unsupported(Exception):
    """The kernel lacks what the watcher watches: no conditions, ever."""


@dataclass
class Snapshot:
    """What one dump (or poll) found."""

    conditions: list[Condition]
    undecodable: int = 0
    retries: int = 0
    dumped: bool = True  # False: a poll that took no dump


class DumpWatch:
    """Notifications schedule a full dump; the dump is the state (fibsync/watch contract).

    Everything that blocks or must happen inside the watched namespace (opening
    sockets, dumps, /proc reads) runs on one worker thread that entered the
    namespace once; the event loop only drains the subscription sockets. A
    notification or an overrun marks the state stale: the dump runs ``DEBOUNCE``
    after the last notification, or ``MAX_DELAY`` after the first one of a burst
    that does not let up. A failure (the namespace gone, a socket error) reports
    the most careful condition, and everything starts again after a pause.
    """

    name: ClassVar[str]
    kind: ClassVar[str]  # the careful condition's kind
    poll_interval: ClassVar[float | None] = None  # see _poll_delay
    DEBOUNCE: ClassVar[float] = 0.03
    MAX_DELAY: ClassVar[float] = 0.2
    RETRY_PAUSE: ClassVar[float] = 1.0
    RETRY_PAUSE_MAX: ClassVar[float] = 30.0

    def __init__(self, netns: str | None, on_change: Callable[[], None]) -> None:
        self.netns = netns
        self.on_change = on_change
        self.ready = asyncio.Event()
        self.stats: dict[str, int] = {
            "dumps": 0, "notifications": 0, "overruns": 0, "undecodable": 0, "retries": 0,
            "errors": 0,
        }
        self._conditions: list[Condition] = []
        self._wake = asyncio.Event()
        self._stale_since = -math.inf
        self._last_notice = -math.inf
        self._failure: OSError | None = None

    def conditions(self) -> list[Condition]:
        return list(self._conditions)

    # -- what a watcher defines (all but ``_relevant`` run on the worker thread)

    def _open(self) -> list[socket.socket]:
        raise NotImplementedError

    def _read(self) -> Snapshot:
        raise NotImplementedError

    def _poll_delay(self) -> float | None:
        """Seconds until ``_poll`` is due (event loop); None: never."""
        return self.poll_interval

    def _poll(self) -> Snapshot | None:
        """Runs when due while nothing is stale; None: nothing changed."""
        return None

    def _relevant(self, sock: socket.socket, data: bytes) -> bool:
        """Whether a datagram of notifications makes the state stale (event loop)."""
        return True

    # -- the machinery

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        pause = self.RETRY_PAUSE
        while True:
            try:
                await self._session(loop)
            except Unsupported:
                self.stats["unsupported"] = 1
                self._apply(Snapshot([], dumped=False))
                await asyncio.Event().wait()
            except Exception as exc:  # the namespace gone, a socket error, a bug: be careful
                self.stats["errors"] += 1
                log.warning("watch.fail", watcher=self.name, netns=self.netns, error=repr(exc),
                            retry_in=pause, exc_info=not isinstance(exc, OSError))
                self._apply(Snapshot([Condition(
                    self.kind, 0, 0,
                    f"{self.name} state unknown ({exc}): every packet goes to the kernel")],
                    dumped=False))
                await asyncio.sleep(pause)
                pause = min(pause * 2, self.RETRY_PAUSE_MAX)
                continue
            pause = self.RETRY_PAUSE

    def _enter_and_open(self) -> list[socket.socket]:
        # the worker's only thread stays in the namespace until the session ends
        if self.netns is not None:
            nl._enter_netns(self.netns)
        return self._open()

    async def _session(self, loop: asyncio.AbstractEventLoop) -> None:
        worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"watch-{self.name}")
        socks: list[socket.socket] = []
        try:
            socks = await loop.run_in_executor(worker, self._enter_and_open)
            for sock in socks:
                loop.add_reader(sock.fileno(), self._readable, sock)
            self._failure = None
            self._stale_since = loop.time()  # the first dump runs at once
            self._last_notice = -math.inf
            self._wake.set()
            while True:
                if not await wait_event(self._wake, self._poll_delay()):
                    polled = await loop.run_in_executor(worker, self._poll)
                    if polled is not None:
                        self._apply(polled)
                    continue
                while True:  # debounce
                    due = min(self._last_notice + self.DEBOUNCE, self._stale_since + self.MAX_DELAY)
                    if due <= loop.time():
                        break
                    await asyncio.sleep(due - loop.time())
                self._wake.clear()
                if self._failure is not None:
                    raise self._failure
                self._apply(await loop.run_in_executor(worker, self._read))
        finally:
            for sock in socks:
                loop.remove_reader(sock.fileno())
                sock.close()
            worker.shutdown(wait=False, cancel_futures=True)

    def _readable(self, sock: socket.socket) -> None:
        stale = False
        while True:
            try:
                data = sock.recv(nl.RECV_BUFFER)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self.stats["overruns"] += 1
                    stale = True
                    continue
                self._failure = exc
                stale = True
                break
            if self._relevant(sock, data):
                self.stats["notifications"] += sum(1 for _ in messages(data))
                stale = True
        if stale:
            now = asyncio.get_running_loop().time()
            if not self._wake.is_set():
                self._stale_since = now
            self._last_notice = now
            self._wake.set()

    def _apply(self, snapshot: Snapshot) -> None:
        self.stats["dumps"] += snapshot.dumped
        self.stats["undecodable"] += snapshot.undecodable
        self.stats["retries"] += snapshot.retries
        new = sorted(set(snapshot.conditions))
        changed = new != self._conditions
        self._conditions = new
        self.ready.set()
        if changed:
            try:
                self.on_change()
            except Exception:
                log.exception("watch.on_change_failed", watcher=self.name)


# ---------------------------------------------------------------- NetfilterWatch


def _nfnl_type(msg: int) -> int:
    return NFNL_SUBSYS_NFTABLES << 8 | msg


class NetfilterWatch(DumpWatch):
    """nftables and iptables-legacy of a namespace as ``netfilter`` conditions."""

    name = "netfilter"
    kind = "netfilter"

    def __init__(self, netns: str | None, on_change: Callable[[], None]) -> None:
        super().__init__(netns, on_change)
        # the worker thread's
        self._nftables = True
        self._link_sock: socket.socket | None = None
        self._ruleset_conditions: list[Condition] = []
        self._owned: frozenset[tuple[int, str]] = frozenset()
        self._legacy: dict[int, list[str]] = {}
        self._legacy_read = -math.inf
        # written by the worker, read by the event loop
        self._names_devices = False

    def _open(self) -> list[socket.socket]:
        socks = []
        try:
            socks.append(subscribe(NETLINK_NETFILTER, [NFNLGRP_NFTABLES]))
        except OSError as exc:
            if exc.errno != errno.EPROTONOSUPPORT:
                raise
            self._nftables = False  # no nfnetlink: no nftables, but x_tables may be there
        self._link_sock = subscribe(socket.NETLINK_ROUTE, [nl.RTNLGRP_LINK])
        socks.append(self._link_sock)
        return socks

    def _relevant(self, sock: socket.socket, data: bytes) -> bool:
        return sock is not self._link_sock or self._names_devices

    def _dump_ruleset(self) -> tuple[Ruleset, int]:
        """Tables, chains and flowtables, then the rules of the candidate chains
        only (a rule dump filtered by table and chain): the rules of chains that
        act whatever their rules say, or never meet forwarded packets, are not
        worth their share of the dump. All answers must carry one generation."""
        everything = NFGENMSG.pack(NFPROTO_UNSPEC, NFNETLINK_V0, 0)
        with request_socket(NETLINK_NETFILTER) as sock:
            def take() -> list[list[tuple[int, bytes]]]:
                parts = [exchange(sock, _nfnl_type(m), everything, nl.NLM_F_DUMP)
                         for m in (NFT_MSG_GETTABLE, NFT_MSG_GETCHAIN, NFT_MSG_GETFLOWTABLE)]
                skeleton = Ruleset.decode([p for _, p in parts[0]], [p for _, p in parts[1]], ())
                rules: list[tuple[int, bytes]] = []
                for family, table, chain in sorted(skeleton.candidates()):
                    only = NFGENMSG.pack(family, NFNETLINK_V0, 0) + \
                        nl.attr(NFTA_RULE_TABLE, _name(table)) + \
                        nl.attr(NFTA_RULE_CHAIN, _name(chain))
                    rules += exchange(sock, _nfnl_type(NFT_MSG_GETRULE), only, nl.NLM_F_DUMP)
                parts.append(rules)
                generations = {payload[2:4] for part in parts for _, payload in part
                               if len(payload) >= NFGENMSG.size}
                if len(generations) > 1:
                    raise DumpInterrupted("the ruleset changed between the dumps")
                return parts

            (tables, chains, flowtables, rules), retries = retried(take)
        return Ruleset.decode([p for _, p in tables], [p for _, p in chains],
                              [p for _, p in rules], [p for _, p in flowtables]), retries

    def _poll_delay(self) -> float | None:
        return max(0.0, self._legacy_read + LEGACY_INTERVAL - time.monotonic())

    def _legacy_tables(self) -> dict[int, list[str]]:
        now = time.monotonic()
        if now - self._legacy_read >= LEGACY_INTERVAL - 0.01:
            self._legacy = legacy_tables()
            self._legacy_read = now
        return self._legacy

    def _read(self) -> Snapshot:
        undecodable = retries = 0
        if self._nftables:
            ruleset, retries = self._dump_ruleset()
            self._names_devices = ruleset.names_devices()
            links = {name: index for index, name in socket.if_nameindex()} \
                if self._names_devices else {}
            self._ruleset_conditions = ruleset.conditions(links)
            self._owned = ruleset.owned_tables()
            undecodable = ruleset.undecodable
        return Snapshot(self._ruleset_conditions + legacy_conditions(self._legacy_tables()),
                        undecodable, retries)

    def _tables(self) -> set[tuple[int, str]]:
        body = NFGENMSG.pack(NFPROTO_UNSPEC, NFNETLINK_V0, 0)
        with request_socket(NETLINK_NETFILTER) as sock:
            (answer,), _ = retried(lambda: [exchange(sock, _nfnl_type(NFT_MSG_GETTABLE), body,
                                                     nl.NLM_F_DUMP)])
        return {(t.family, t.name) for t in
                _decode_all((payload for _, payload in answer), decode_table, "table", [])}

    def _poll(self) -> Snapshot | None:
        """The iptables-legacy tables; and whether an owned table that made a
        condition is gone (the kernel releases it with its owner's socket and
        says nothing): then a full dump."""
        if self._owned and not self._owned <= self._tables():
            return self._read()
        before = self._legacy
        if self._legacy_tables() == before:
            return None
        return Snapshot(self._ruleset_conditions + legacy_conditions(self._legacy), dumped=False)
