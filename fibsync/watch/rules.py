"""Policy rules: decode RTM_NEWRULE/DELRULE and judge which ones the fast path can honour.

The kernel consults the rules of a family in order of preference before any
route table (net/core/fib_rules.c fib_rules_lookup, fib_rule_match). A
namespace starts with the default rules that fib4_rules_init and
fib6_rules_net_init add through fib_default_rule_add: IPv4 {0 local, 32766
main, 32767 default}, IPv6 {0 local, 32766 main}. With exactly those, a
lookup in main (and local) is what the kernel does, and the fast path may
forward from its mirror of main.

Any other rule set changes the lookup, and ``judge`` says how far:

- ``rules_lookup``: every rule selects on what ``bpf_fib_lookup`` hands to
  fib_lookup as well (source and destination prefix, tos/dscp, preference,
  table, suppress_prefixlength); the fast path forwards that family through
  bpf_fib_lookup, which applies the rules itself. A default rule moved or
  deleted is such a change too.
- ``rules_kernel``: some rule selects on what the fast path does not give
  the lookup as the kernel would (fwmark, uid, iif/oif, l3mdev, ports, ip
  proto, tun_id, flow label, suppress_ifgroup, realms) or acts other than
  "look up a table" (goto, nop, blackhole, unreachable, prohibit); that
  family goes to the kernel. So does any attribute, action or flag this
  module does not know.

``format_rule`` writes a rule as `ip rule` prints it, for the condition's detail.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from fibsync.errors import DecodeError
from fibsync.model import AF_INET, AF_INET6, RT_TABLE_LOCAL, RT_TABLE_MAIN
from fibsync.netlink import rtnl as nl

# Rules the kernel starts a namespace with, as (preference, table).
DEFAULT_RULES = {
    AF_INET: frozenset({(0, RT_TABLE_LOCAL), (32766, RT_TABLE_MAIN), (32767, nl.RT_TABLE_DEFAULT)}),
    AF_INET6: frozenset({(0, RT_TABLE_LOCAL), (32766, RT_TABLE_MAIN)}),
}

# Selectors bpf_fib_lookup's flowi carries as the kernel's would (plus what
# only describes the rule); FRA_PAD carries nothing and is dropped.
LOOKUP_ATTRS = frozenset({
    nl.FRA_DST, nl.FRA_SRC, nl.FRA_PRIORITY, nl.FRA_TABLE, nl.FRA_SUPPRESS_PREFIXLEN,
    nl.FRA_PROTOCOL, nl.FRA_DSCP, nl.FRA_DSCP_MASK,
})
# Flags a rule may carry and still be applied by bpf_fib_lookup; the
# *_DETACHED and UNRESOLVED flags are the kernel's view of the moment, set
# on the way out (fib_nl_fill_rule) and not part of what identifies a rule.
LOOKUP_FLAGS = nl.FIB_RULE_INVERT | nl.FIB_RULE_PERMANENT | nl.FIB_RULE_FIND_SADDR
VOLATILE_FLAGS = nl.FIB_RULE_UNRESOLVED | nl.FIB_RULE_IIF_DETACHED | nl.FIB_RULE_OIF_DETACHED

NO_SUPPRESS = 0xFFFFFFFF  # suppress_prefixlength -1: not set
TABLE_NAMES = {RT_TABLE_LOCAL: "local", RT_TABLE_MAIN: "main", nl.RT_TABLE_DEFAULT: "default"}
ACTION_NAMES = {
    nl.FR_ACT_NOP: "nop", nl.FR_ACT_BLACKHOLE: "blackhole",
    nl.FR_ACT_UNREACHABLE: "unreachable", nl.FR_ACT_PROHIBIT: "prohibit",
}
_U32 = struct.Struct("=I")


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule as the kernel announced it; ``key`` tells rules apart as
    fib_nl_delrule matches them (everything but the volatile flags)."""

    family: int
    dst_len: int
    src_len: int
    tos: int
    action: int
    flags: int  # without VOLATILE_FLAGS
    attrs: tuple[tuple[int, bytes], ...]  # sorted by type, FRA_PAD dropped

    @property
    def key(self) -> tuple[object, ...]:
        return (self.family, self.dst_len, self.src_len, self.tos, self.action,
                self.flags, self.attrs)

    def get(self, kind: int) -> bytes | None:
        for akind, value in self.attrs:
            if akind == kind:
                return value
        return None

    def u32(self, kind: int, default: int = 0) -> int:
        value = self.get(kind)
        return _U32.unpack_from(value)[0] if value is not None and len(value) >= 4 else default

    @property
    def pref(self) -> int:
        return self.u32(nl.FRA_PRIORITY)  # absent means 0 (fib_nl_fill_rule)

    @property
    def table(self) -> int:
        return self.u32(nl.FRA_TABLE)

    def is_default(self) -> bool:
        return (
            self.action == nl.FR_ACT_TO_TBL and self.flags == 0
            and not (self.dst_len or self.src_len or self.tos)
            and {k for k, _ in self.attrs} <= {nl.FRA_TABLE, nl.FRA_PRIORITY, nl.FRA_PROTOCOL,
                                                nl.FRA_SUPPRESS_PREFIXLEN}
            and self.u32(nl.FRA_SUPPRESS_PREFIXLEN, NO_SUPPRESS) == NO_SUPPRESS
            and (self.pref, self.table) in DEFAULT_RULES.get(self.family, ())
        )

    def needs_kernel(self) -> bool:
        """Only the kernel can evaluate this rule (see the module docstring)."""
        return (
            self.action != nl.FR_ACT_TO_TBL
            or self.flags & ~LOOKUP_FLAGS != 0
            or any(kind not in LOOKUP_ATTRS for kind, _ in self.attrs)
        )


def decode_rule(payload: bytes) -> Rule:
    """An RTM_NEWRULE/DELRULE body (struct fib_rule_hdr and FRA_* attributes)."""
    if len(payload) < nl.FIB_RULE_HDR.size:
        raise DecodeError(f"rule message of {len(payload)} bytes")
    family, dst_len, src_len, tos, table, _r1, _r2, action, flags = \
        nl.FIB_RULE_HDR.unpack_from(payload)
    found = {kind: value for kind, value in nl.attrs(payload, nl.FIB_RULE_HDR.size)
             if kind != nl.FRA_PAD}
    if nl.FRA_TABLE not in found:
        found[nl.FRA_TABLE] = _U32.pack(table)  # kernels before FRA_TABLE use the header's
    for kind in (nl.FRA_TABLE, nl.FRA_PRIORITY, nl.FRA_SUPPRESS_PREFIXLEN, nl.FRA_FWMARK,
                 nl.FRA_FWMASK):
        if kind in found and len(found[kind]) < 4:
            raise DecodeError(f"rule attribute {kind} of {len(found[kind])} bytes")
    return Rule(family, dst_len, src_len, tos, action, flags & ~VOLATILE_FLAGS,
                tuple(sorted(found.items())))


def judge(family: int, rules: list[Rule]) -> tuple[str, str] | None:
    """(kind, detail) of the condition a family's rule set makes, None for the defaults."""
    ordered = sorted(rules, key=lambda r: (r.pref, r.key))
    extra = [r for r in ordered if not r.is_default()]
    for rule in extra:
        if rule.needs_kernel():
            return "rules_kernel", format_rule(rule)
    if extra:
        return "rules_lookup", format_rule(extra[0])
    present = {(r.pref, r.table) for r in ordered}
    missing = sorted(DEFAULT_RULES.get(family, frozenset()) - present)
    if missing:
        pref, table = missing[0]
        return "rules_lookup", f"default rule deleted: {pref}: from all lookup {_table(table)}"
    return None


def _table(table: int) -> str:
    return TABLE_NAMES.get(table, str(table))


def _addr(rule: Rule, kind: int, length: int) -> str:
    raw = rule.get(kind)
    if not length:
        return "all"
    try:
        return f"{ipaddress.ip_address(raw or b'')}/{length}"
    except ValueError:
        return f"?/{length}"


def _ranges(value: bytes, fmt: str) -> str:
    size = struct.calcsize(fmt)
    if len(value) < size:
        return "?"
    start, end = struct.unpack_from(fmt, value)
    return str(start) if start == end else f"{start}-{end}"


def _text(value: bytes) -> str:
    return value.rstrip(b"\0").decode(errors="replace")


def _fwmark(mark: int, mask: int) -> str:
    return f"fwmark {mark:#x}" + ("" if mask == 0xFFFFFFFF else f"/{mask:#x}")


def format_rule(rule: Rule) -> str:
    """The rule as `ip rule show` writes it (iproute2 ip/iprule.c print_rule)."""
    out = [f"{rule.pref}:"]
    if rule.flags & nl.FIB_RULE_INVERT:
        out.append("not")
    out.append(f"from {_addr(rule, nl.FRA_SRC, rule.src_len)}")
    if rule.dst_len:
        out.append(f"to {_addr(rule, nl.FRA_DST, rule.dst_len)}")
    if rule.tos:
        out.append(f"tos {rule.tos:#x}")
    words = {
        nl.FRA_DSCP: lambda v: f"dscp {v[0]}",
        nl.FRA_FWMASK: lambda v: _fwmark(rule.u32(nl.FRA_FWMARK), _U32.unpack_from(v)[0]),
        nl.FRA_IIFNAME: lambda v: f"iif {_text(v)}",
        nl.FRA_OIFNAME: lambda v: f"oif {_text(v)}",
        nl.FRA_L3MDEV: lambda v: "lookup [l3mdev-table]",
        nl.FRA_UID_RANGE: lambda v: f"uidrange {_ranges(v, '=II')}",
        nl.FRA_IP_PROTO: lambda v: f"ipproto {v[0]}",
        nl.FRA_SPORT_RANGE: lambda v: f"sport {_ranges(v, '=HH')}",
        nl.FRA_DPORT_RANGE: lambda v: f"dport {_ranges(v, '=HH')}",
        nl.FRA_TUN_ID: lambda v: f"tun_id {int.from_bytes(v, 'big')}",
        nl.FRA_FLOWLABEL: lambda v: f"flowlabel {int.from_bytes(v, 'big'):#x}",
        nl.FRA_FLOW: lambda v: f"realms {_U32.unpack_from(v)[0]}",
        nl.FRA_SUPPRESS_IFGROUP: lambda v: f"suppress_ifgroup {_U32.unpack_from(v)[0]}",
        nl.FRA_GOTO: lambda v: f"goto {_U32.unpack_from(v)[0]}",
    }
    known = set(words) | LOOKUP_ATTRS | {nl.FRA_FWMARK, nl.FRA_FLOWLABEL_MASK, nl.FRA_SPORT_MASK,
                                         nl.FRA_DPORT_MASK}
    for kind, value in rule.attrs:
        if kind in words:
            try:
                out.append(words[kind](value))
            except (IndexError, struct.error):
                out.append(f"attribute {kind} (malformed)")
        elif kind not in known:
            out.append(f"attribute {kind} (unknown)")
    if rule.action == nl.FR_ACT_TO_TBL and nl.FRA_L3MDEV not in dict(rule.attrs):
        out.append(f"lookup {_table(rule.table)}")
        prefixlen = rule.u32(nl.FRA_SUPPRESS_PREFIXLEN, NO_SUPPRESS)
        if prefixlen != NO_SUPPRESS:
            out.append(f"suppress_prefixlength {prefixlen}")
    elif rule.action in ACTION_NAMES:
        out.append(ACTION_NAMES[rule.action])
    elif rule.action not in (nl.FR_ACT_GOTO, nl.FR_ACT_TO_TBL):
        out.append(f"action {rule.action}")
    return " ".join(out)
