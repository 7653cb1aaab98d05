"""XFRM (IPsec): which policies may apply to forwarded packets.

A forwarded packet meets the security policy database twice in the kernel:
__xfrm_policy_check looks up the *fwd* policies on the way in (ip_forward,
ip6_forward: xfrm4/6_policy_check with XFRM_POLICY_FWD), and xfrm_lookup the
*out* policies on the way out (ip_route_output / xfrm4_route_forward).
Either may encrypt, require an SA, or block; the fast path does neither, so
every out or fwd policy hands the packets of its selector's family to the
kernel (condition kind ``xfrm``, ifindex 0; a selector of family AF_UNSPEC
means both: family 0). Policies of direction in (local delivery) and
per-socket policies (directions 3 to 5 in a dump: XFRM_POLICY_MAX + dir) do
not see forwarded packets and are ignored. Every such policy counts,
whatever its action and templates: an allow policy without templates still
makes the kernel look the packet up, and matching its selector is not the
fast path's job.

The default policies (XFRM_MSG_GETDEFAULT, Linux 5.15): when the default for
fwd or out is block, a packet no policy matches is dropped, so both families
go to the kernel. A kernel without default policies answers EINVAL: allow.

How: a NETLINK_XFRM socket joined to XFRMNLGRP_POLICY (new, updated, deleted
and flushed policies; a changed default) and XFRMNLGRP_EXPIRE, where a
policy's hard lifetime ends: that deletes it with no message on the policy
group (xfrm_policy_timer, km_policy_expired), so its XFRM_MSG_POLEXPIRE is
the only notice (an SA's XFRM_MSG_EXPIRE there is ignored). Every relevant
notification or an overrun schedules a full dump, debounced, as in
fibsync/watch/netfilter.py's ``DumpWatch``. A kernel without XFRM (the
socket cannot be opened) makes no conditions; ``stats['unsupported']`` says so.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from fibsync.model import AF_INET, AF_INET6
from fibsync.netlink import rtnl as nl
from fibsync.watch import Condition
from fibsync.watch.netfilter import (
    DumpWatch,
    Snapshot,
    Unsupported,
    exchange,
    messages,
    request_socket,
    retried,
    subscribe,
)

# ---------------------------------------------------------------- xfrm.h

NETLINK_XFRM = 6
XFRM_MSG_NEWPOLICY = 0x13
XFRM_MSG_GETPOLICY = 0x15
XFRM_MSG_EXPIRE = 0x18
XFRM_MSG_POLEXPIRE = 0x1B
XFRM_MSG_GETDEFAULT = 0x28
XFRMNLGRP_EXPIRE = 2
XFRMNLGRP_POLICY = 4
XFRM_POLICY_IN = 0
XFRM_POLICY_OUT = 1
XFRM_POLICY_FWD = 2
XFRM_POLICY_ALLOW = 0
XFRM_POLICY_BLOCK = 1
XFRM_USERPOLICY_BLOCK = 1
XFRMA_POLICY_TYPE = 16
XFRM_POLICY_TYPE_SUB = 1

# ---------------------------------------------------------------- layouts

# struct xfrm_selector: daddr, saddr, dport, dport_mask, sport, sport_mask
# (big endian), family, prefixlen_d, prefixlen_s, proto, ifindex, user
XFRM_SELECTOR = struct.Struct("=16s16s2s2s2s2sHBBBxxxiI")
# struct xfrm_userpolicy_info: sel, lft (8 u64), curlft (4 u64), priority,
# index, dir, action, flags, share
XFRM_USERPOLICY_INFO = struct.Struct("=56s64s32sIIBBBBxxxx")
XFRM_USERPOLICY_ID_SIZE = 64  # struct xfrm_userpolicy_id: the dump request's body
XFRM_USERPOLICY_DEFAULT = struct.Struct("=BBB")  # in, fwd, out

DIRECTIONS = {XFRM_POLICY_IN: "in", XFRM_POLICY_OUT: "out", XFRM_POLICY_FWD: "fwd"}
ROUTED_DIRECTIONS = frozenset({XFRM_POLICY_OUT, XFRM_POLICY_FWD})
SELECTOR_AF = {int(AF_INET): int(AF_INET), int(AF_INET6): int(AF_INET6), socket.AF_UNSPEC: 0}
PROTOCOLS = {1: "icmp", 6: "tcp", 17: "udp", 47: "gre", 50: "esp", 51: "ah", 58: "ipv6-icmp",
             132: "sctp"}


class Undecodable(ValueError):
    """A policy message of a shape this module does not know."""


@dataclass(frozen=True, slots=True)
class Policy:
    family: int  # the selector's address family
    dst: str  # prefixes as text; "?" when the family is unknown
    src: str
    proto: int
    dport: int  # 0: any
    sport: int
    ifindex: int
    direction: int
    action: int
    priority: int
    sub: bool  # XFRM_POLICY_TYPE_SUB

    def describe(self) -> str:
        words = [f"xfrm policy {DIRECTIONS.get(self.direction, self.direction)}",
                 f"src {self.src}", f"dst {self.dst}",
                 f"proto {PROTOCOLS.get(self.proto, self.proto) if self.proto else 'any'}"]
        if self.sport:
            words.append(f"sport {self.sport}")
        if self.dport:
            words.append(f"dport {self.dport}")
        if self.ifindex:
            words.append(f"dev {self.ifindex}")
        action = {XFRM_POLICY_ALLOW: "allow", XFRM_POLICY_BLOCK: "block"}.get(
            self.action, str(self.action))
        return " ".join(words) + f" (action {action}, priority {self.priority}" + \
            (", sub policy)" if self.sub else ")")


def _prefix(family: int, raw: bytes, length: int) -> str:
    try:
        if family == AF_INET:
            return str(ipaddress.ip_network((raw[:4], length), strict=False))
        if family == AF_INET6:
            return str(ipaddress.ip_network((raw, length), strict=False))
    except ValueError:
        pass
    return "?"


def decode_policy(payload: bytes) -> Policy:
    """An XFRM_MSG_NEWPOLICY body: struct xfrm_userpolicy_info and attributes."""
    if len(payload) < XFRM_USERPOLICY_INFO.size:
        raise Undecodable(f"a policy message of {len(payload)} bytes")
    sel, _lft, _cur, priority, _index, direction, action, _flags, _share = \
        XFRM_USERPOLICY_INFO.unpack_from(payload)
    daddr, saddr, dport, dport_mask, sport, sport_mask, family, plen_d, plen_s, proto, \
        ifindex, _user = XFRM_SELECTOR.unpack(sel)
    sub = False
    offset = XFRM_USERPOLICY_INFO.size
    while offset + 4 <= len(payload):
        length, kind = struct.unpack_from("=HH", payload, offset)
        if length < 4:
            break
        if kind & 0x3FFF == XFRMA_POLICY_TYPE and length >= 5:
            sub = payload[offset + 4] == XFRM_POLICY_TYPE_SUB
        offset += (length + 3) & ~3

    def port(value: bytes, mask: bytes) -> int:
        return int.from_bytes(value, "big") if int.from_bytes(mask, "big") else 0

    return Policy(family, _prefix(family, daddr, plen_d), _prefix(family, saddr, plen_s), proto,
                  port(dport, dport_mask), port(sport, sport_mask), ifindex, direction, action,
                  priority, sub)


def policy_conditions(policies: Iterable[Policy], default: bytes | None
                      ) -> tuple[list[Condition], int]:
    """The conditions of a policy database and of the default policies (the
    body of the XFRM_MSG_GETDEFAULT answer, None without one); and how many
    policies had a family this module does not know (they count for both)."""
    out: list[Condition] = []
    unknown = 0
    for policy in policies:
        if policy.direction not in ROUTED_DIRECTIONS:
            continue
        family = SELECTOR_AF.get(policy.family)
        if family is None:
            unknown += 1
            family = 0
        out.append(Condition("xfrm", family, 0, policy.describe()))
    if default is not None and len(default) >= XFRM_USERPOLICY_DEFAULT.size:
        _in, fwd, out_default = XFRM_USERPOLICY_DEFAULT.unpack_from(default)
        for name, value in (("fwd", fwd), ("out", out_default)):
            if value == XFRM_USERPOLICY_BLOCK:
                out.append(Condition("xfrm", 0, 0, f"default xfrm policy for {name} is block"))
    return sorted(set(out)), unknown


class XfrmWatch(DumpWatch):
    """The XFRM policies of a namespace as ``xfrm`` conditions."""

    name = "xfrm"
    kind = "xfrm"

    def _open(self) -> list[socket.socket]:
        try:
            return [subscribe(NETLINK_XFRM, [XFRMNLGRP_POLICY, XFRMNLGRP_EXPIRE])]
        except OSError as exc:
            if exc.errno in (errno.EPROTONOSUPPORT, errno.ENOENT):
                raise Unsupported(str(exc)) from None
            raise

    def _relevant(self, sock: socket.socket, data: bytes) -> bool:
        # an SA's expiry shares the group with a policy's
        return any(kind != XFRM_MSG_EXPIRE for kind, _, _, _ in messages(data))

    def _read(self) -> Snapshot:
        with request_socket(NETLINK_XFRM) as sock:
            def take() -> list[list[tuple[int, bytes]]]:
                dump = exchange(sock, XFRM_MSG_GETPOLICY, bytes(XFRM_USERPOLICY_ID_SIZE),
                                nl.NLM_F_DUMP)
                try:
                    default = exchange(sock, XFRM_MSG_GETDEFAULT,
                                       bytes(XFRM_USERPOLICY_DEFAULT.size))
                except OSError as exc:
                    if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                        raise
                    default = []  # before Linux 5.15: no default policies
                return [dump, default]

            (dump, default), retries = retried(take)
        policies = []
        unreadable = []
        for kind, payload in dump:
            if kind != XFRM_MSG_NEWPOLICY:
                continue
            try:
                policies.append(decode_policy(payload))
            except (Undecodable, struct.error) as exc:
                unreadable.append(Condition(
                    "xfrm", 0, 0,
                    f"undecodable xfrm policy message ({exc}): every packet goes to the kernel"))
        found, unknown = policy_conditions(policies, default[0][1] if default else None)
        return Snapshot(found + unreadable, len(unreadable) + unknown, retries)
