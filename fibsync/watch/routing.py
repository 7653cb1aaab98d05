"""RoutingWatch: policy rules, forwarding and rp_filter sysctls, and VRFs, live (issue 12).

One NETLINK_ROUTE socket joins the rule, netconf, link and IPv4 address
groups and, on the same socket, dumps rules and netconf of both families,
links and IPv4 addresses. One socket keeps the order in which the kernel made
its changes: netconf notifications carry only the value that changed
(inet_netconf_notify_devconf with one NETCONFA_* type), so a dump row and a
notification must be applied in the order the kernel queued them. A dump
collects its table anew ("staging") while notifications keep updating both
the live table and the staging one; at its NLMSG_DONE the staging table
replaces the live one. After an overrun (ENOBUFS) the session starts over on
a fresh socket and dumps every table again; until then the live tables stay
what they were. (A fresh socket, not the old one: under uvloop, the error
poll() reports with ENOBUFS stops the fd's reader for good, as libuv stops a
uv_poll handle on POLLERR.)

``RoutingState`` holds what is known and derives the conditions from it, as
a pure function (unit tests feed it synthesised messages):

- forwarding, IPv4: ip_forward-bound packets are dropped when the ingress
  device's own ``forwarding`` is 0 (ip_route_input_slow: IN_DEV_FORWARD);
  per interface. IPv6: ip6_forward drops unless ``all.forwarding`` or, since
  6.17, the ingress device's ``force_forwarding`` is set; ifindex 0 when no
  interface forces it, per interface otherwise. 6.18 announces a
  force_forwarding change by an RTM_NEWNETCONF that holds only the ifindex
  (inet6_netconf_fill_devconf has no NETCONFA_FORCE_FORWARDING), so the
  watch asks for that link again and reads DEVCONF_FORCE_FORWARDING from its
  IFLA_AF_SPEC/AF_INET6/IFLA_INET6_CONF. Writing all.forwarding=0 clears
  every force_forwarding (addrconf_forward_change), silently when
  all.forwarding was 0 already: while that can bite, the links are polled.
- rp_filter: fib_validate_source uses IN_DEV_RPFILTER, the max of ``all``
  and the interface's value (``all`` is announced for ifindex -1 only, never
  copied). 1 is strict, any other non-zero value loose (__fib_validate_source
  tests ``rpf == 1``). On an interface without an IPv4 address
  __fib_validate_source goes to last_resort and drops whatever the reverse
  route does not send out of that very interface: "rp_filter_kernel".
  A write to ``default.rp_filter`` is copied silently into every interface
  not set on its own (devinet_copy_dflt_conf): the watch dumps netconf anew.
- rules: see rules.py.
- VRF: an interface whose master chain (IFLA_MASTER) reaches a link of kind
  "vrf", or that says it is a VRF port (IFLA_INFO_SLAVE_KIND), is looked up in
  the VRF's table (l3mdev), not in main.

What the watch cannot read (a dump the kernel refused, a message it cannot
decode) makes the most careful condition of its kind hold until a dump of
that table succeeds.

Longer than our ~500-line mark: the one socket keeps four tables (rules,
netconf, links, addresses) in the kernel's order, and splitting their
staging and replay across modules would split that order too; rules.py
already holds the rule parsing.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from fibsync.errors import DecodeError
from fibsync.model import AF_INET, AF_INET6
from fibsync.netlink import rtnl as nl
from fibsync.process import wait_event
from fibsync.watch import Condition
from fibsync.watch.rules import decode_rule, judge

GROUPS = (nl.RTNLGRP_IPV4_RULE, nl.RTNLGRP_IPV6_RULE, nl.RTNLGRP_IPV4_NETCONF,
          nl.RTNLGRP_IPV6_NETCONF, nl.RTNLGRP_LINK, nl.RTNLGRP_IPV4_IFADDR)
TABLES = ("rules4", "rules6", "netconf4", "netconf6", "links", "addrs4")
RCVBUF = 4 << 20  # a link message with IFLA_AF_SPEC is ~3 KiB: room for ~1000 at once
POLL_SECONDS = 1.0
MAX_READS = 64  # recv() calls per wakeup before the loop runs others
PERMANENT_ERRORS = (errno.EAFNOSUPPORT, errno.EOPNOTSUPP)  # e.g. IPv6 disabled at boot
ALL, DEFAULT = nl.NETCONFA_IFINDEX_ALL, nl.NETCONFA_IFINDEX_DEFAULT
FORWARDING, RP_FILTER = nl.NETCONFA_FORWARDING, nl.NETCONFA_RP_FILTER
_S32 = struct.Struct("=i")
_RULE_TABLES = {AF_INET: "rules4", AF_INET6: "rules6"}
_NETCONF_TABLES = {AF_INET: "netconf4", AF_INET6: "netconf6"}


@dataclass(frozen=True, slots=True)
class LinkState:
    name: str
    master: int = 0  # IFLA_MASTER, 0 for none
    kind: str = ""  # IFLA_INFO_KIND
    slave_kind: str = ""  # IFLA_INFO_SLAVE_KIND: the master's kind, as the port reports it
    force_forwarding: int = 0  # DEVCONF_FORCE_FORWARDING (0 where the kernel lacks it)


def _nested(value: bytes) -> dict[int, bytes]:
    return dict(nl.attrs(value))


def decode_netconf(payload: bytes) -> tuple[int, int, dict[int, int]]:
    """(family, ifindex, {NETCONFA_*: value}) of an RTM_NEWNETCONF/DELNETCONF body."""
    if len(payload) < 1:
        raise DecodeError("empty netconf message")
    values = {kind: _S32.unpack(value)[0] for kind, value in nl.attrs(payload, nl.NETCONFMSG.size)
              if len(value) == 4}
    ifindex = values.pop(nl.NETCONFA_IFINDEX, None)
    if ifindex is None:
        raise DecodeError("netconf message without NETCONFA_IFINDEX")
    return payload[0], ifindex, values


def decode_link(payload: bytes) -> tuple[int, int, LinkState]:
    """(family, ifindex, LinkState) of an RTM_NEWLINK/DELLINK body."""
    if len(payload) < nl.IFINFOMSG.size:
        raise DecodeError(f"link message of {len(payload)} bytes")
    family, _type, ifindex, _flags, _change = nl.IFINFOMSG.unpack_from(payload)
    top = dict(nl.attrs(payload, nl.IFINFOMSG.size))
    info = _nested(top.get(nl.IFLA_LINKINFO, b""))
    conf6 = _nested(_nested(top.get(nl.IFLA_AF_SPEC, b"")).get(AF_INET6, b"")).get(
        nl.IFLA_INET6_CONF, b"")
    force = nl.DEVCONF_FORCE_FORWARDING * 4
    master = top.get(nl.IFLA_MASTER, b"")
    return family, ifindex, LinkState(
        name=top.get(nl.IFLA_IFNAME, b"").rstrip(b"\0").decode(errors="replace"),
        master=struct.unpack_from("=I", master)[0] if len(master) >= 4 else 0,
        kind=info.get(nl.IFLA_INFO_KIND, b"").rstrip(b"\0").decode(errors="replace"),
        slave_kind=info.get(nl.IFLA_INFO_SLAVE_KIND, b"").rstrip(b"\0").decode(errors="replace"),
        force_forwarding=_S32.unpack_from(conf6, force)[0] if len(conf6) >= force + 4 else 0,
    )


def decode_address(payload: bytes) -> tuple[int, tuple[int, bytes, int]]:
    """(family, (ifindex, address, prefixlen)) of an RTM_NEWADDR/DELADDR body."""
    if len(payload) < nl.IFADDRMSG.size:
        raise DecodeError(f"address message of {len(payload)} bytes")
    family, prefixlen, _flags, _scope, ifindex = nl.IFADDRMSG.unpack_from(payload)
    found = dict(nl.attrs(payload, nl.IFADDRMSG.size))
    address = found.get(nl.IFA_LOCAL, found.get(nl.IFA_ADDRESS))
    if address is None:
        raise DecodeError("address message without IFA_LOCAL or IFA_ADDRESS")
    return family, (ifindex, address, prefixlen)


class RoutingState:
    """The watched kernel state, and the conditions it makes hold."""

    def __init__(self) -> None:
        self.tables: dict[str, dict[Any, Any]] = {table: {} for table in TABLES}
        self.staging: dict[str, dict[Any, Any]] = {}  # tables being dumped
        self.unsure: dict[str, str] = {}  # table -> why its content cannot be trusted
        self._unsure_staging: dict[str, str] = {}
        self.stats = {"messages": 0, "undecodable": 0, "unknown": 0, "ignored": 0}

    # ---------------------------------------------------------------- dumps

    def begin(self, table: str) -> None:
        self.staging[table] = {}
        self._unsure_staging.pop(table, None)

    def commit(self, table: str) -> None:
        self.tables[table] = self.staging.pop(table, {})
        reason = self._unsure_staging.pop(table, None)
        if reason is None:
            self.unsure.pop(table, None)
        else:
            self.unsure[table] = reason

    def fail(self, table: str, reason: str) -> None:
        self.staging.pop(table, None)
        self.unsure[table] = reason

    # ---------------------------------------------------------------- messages

    def _targets(self, table: str) -> list[dict[Any, Any]]:
        live = self.tables[table]
        staging = self.staging.get(table)
        return [live] if staging is None else [live, staging]

    def _put(self, table: str, key: Any, value: Any, new: bool = True) -> None:
        for target in self._targets(table):
            if new:
                target[key] = value
            else:
                target.pop(key, None)

    def _doubt(self, table: str, reason: str) -> None:
        self.unsure[table] = reason
        if table in self.staging:
            self._unsure_staging[table] = reason

    def apply(self, mtype: int, payload: bytes, notification: bool = True) -> list[str]:
        """Apply one message (its body, after struct nlmsghdr). Returns the requests
        it calls for ("dump TABLE", "link IFINDEX"); a dump's own rows call for none."""
        self.stats["messages"] += 1
        try:
            follow = self._apply(mtype, payload)
        except (DecodeError, struct.error, IndexError) as exc:
            self.stats["undecodable"] += 1
            tables = _TABLES_OF.get(mtype, ())
            for table in tables:
                self._doubt(table, f"undecodable message type {mtype}: {exc}")
            follow = [f"dump {table}" for table in tables]
        return follow if notification else []

    def _apply(self, mtype: int, payload: bytes) -> list[str]:
        if mtype in (nl.RTM_NEWRULE, nl.RTM_DELRULE):
            rule = decode_rule(payload)
            table = _RULE_TABLES.get(rule.family)
            if table is None:  # RTNL_FAMILY_IPMR rules share RTNLGRP_IPV4_RULE
                self.stats["ignored"] += 1
                return []
            self._put(table, rule.key, rule, mtype == nl.RTM_NEWRULE)
            # after a deletion: a twin added without NLM_F_EXCL may still be there
            return [] if mtype == nl.RTM_NEWRULE else [f"dump {table}"]
        if mtype in (nl.RTM_NEWNETCONF, nl.RTM_DELNETCONF):
            family, ifindex, values = decode_netconf(payload)
            table = _NETCONF_TABLES.get(family)
            if table is None:
                self.stats["ignored"] += 1
                return []
            if mtype == nl.RTM_DELNETCONF:
                self._put(table, ifindex, None, False)
                return []
            for target in self._targets(table):
                target.setdefault(ifindex, {}).update(values)
            return _netconf_follow(family, ifindex, values)
        if mtype in (nl.RTM_NEWLINK, nl.RTM_DELLINK):
            family, ifindex, link = decode_link(payload)
            if family != nl.AF_UNSPEC:
                # AF_BRIDGE: a bridge port's own news; its RTM_DELLINK only
                # means "no longer a port"
                self.stats["ignored"] += 1
            else:
                self._put("links", ifindex, link, mtype == nl.RTM_NEWLINK)
            if family == nl.AF_UNSPEC and mtype == nl.RTM_DELLINK:
                for target in self._targets("addrs4"):
                    for key in [key for key in target if key[0] == ifindex]:
                        del target[key]
            return []
        if mtype in (nl.RTM_NEWADDR, nl.RTM_DELADDR):
            family, key = decode_address(payload)
            if family != AF_INET:
                self.stats["ignored"] += 1
            else:
                self._put("addrs4", key, True, mtype == nl.RTM_NEWADDR)
            return []
        self.stats["unknown"] += 1
        return []

    def force_forwarding_at_risk(self) -> bool:
        """True while a silent clear of force_forwarding would change a condition."""
        all6 = self.tables["netconf6"].get(ALL, {}).get(FORWARDING)
        return all6 == 0 and any(link.force_forwarding for link in self.tables["links"].values())

    # ---------------------------------------------------------------- conditions

    def conditions(self) -> list[Condition]:
        links: dict[int, LinkState] = self.tables["links"]

        def name(ifindex: int) -> str:
            link = links.get(ifindex)
            return link.name if link is not None and link.name else f"ifindex {ifindex}"

        out: set[Condition] = set()
        add = out.add
        unsure = self.unsure
        nc4: dict[int, dict[int, int]] = self.tables["netconf4"]
        nc6: dict[int, dict[int, int]] = self.tables["netconf6"]

        # forwarding, IPv4: the ingress device's own value (IN_DEV_FORWARD)
        if "netconf4" in unsure:
            why = unsure["netconf4"]
            add(Condition("forwarding", AF_INET, 0, f"IPv4 forwarding unknown: {why}"))
        for ifindex, values in nc4.items():
            if ifindex > 0 and not values.get(FORWARDING, 0):
                add(Condition("forwarding", AF_INET, ifindex,
                              f"net.ipv4.conf.{name(ifindex)}.forwarding is 0"))
        for ifindex in links:
            if ifindex not in nc4:
                add(Condition("forwarding", AF_INET, ifindex,
                              f"{name(ifindex)} has no IPv4 configuration (no in_device)"))

        # forwarding, IPv6: all.forwarding, or the ingress device's force_forwarding
        all6 = nc6.get(ALL, {}).get(FORWARDING)
        if "netconf6" in unsure or all6 is None:
            why = unsure.get("netconf6", "net.ipv6.conf.all not announced")
            add(Condition("forwarding", AF_INET6, 0, f"IPv6 forwarding unknown: {why}"))
        elif all6 == 0:
            forced = "links" not in unsure and any(link.force_forwarding for link in links.values())
            if not forced:
                add(Condition("forwarding", AF_INET6, 0, "net.ipv6.conf.all.forwarding is 0"))
            else:
                for ifindex, link in links.items():
                    if not link.force_forwarding:
                        add(Condition("forwarding", AF_INET6, ifindex,
                                      "net.ipv6.conf.all.forwarding is 0 and "
                                      f"net.ipv6.conf.{name(ifindex)}.force_forwarding is 0"))

        # rp_filter: IN_DEV_RPFILTER = max(all, interface)
        rp_all = nc4.get(ALL, {}).get(RP_FILTER, 0)
        addressed = set() if "addrs4" in unsure else {key[0] for key in self.tables["addrs4"]}
        for ifindex, values in nc4.items():
            rp_if = values.get(RP_FILTER, 0)
            rpf = max(rp_all, rp_if)
            if ifindex <= 0 or not rpf:
                continue
            what = (f"rp_filter {rpf} (max of net.ipv4.conf.all.rp_filter={rp_all} and "
                    f"net.ipv4.conf.{name(ifindex)}.rp_filter={rp_if})")
            if ifindex not in addressed:
                kind = "rp_filter_kernel"
                what += f" on {name(ifindex)}, which has no IPv4 address"
            else:
                kind = "rp_filter_strict" if rpf == 1 else "rp_filter_loose"
            add(Condition(kind, AF_INET, ifindex, what))

        # policy rules
        for family, table in _RULE_TABLES.items():
            if table in unsure:
                add(Condition("rules_kernel", family, 0, f"rules unknown: {unsure[table]}"))
                continue
            verdict = judge(family, list(self.tables[table].values()))
            if verdict is not None:
                add(Condition(verdict[0], family, 0, verdict[1]))

        # VRF ports, directly or through a bridge or bond under the VRF
        if "links" in unsure:
            add(Condition("vrf", 0, 0, f"links unknown: {unsure['links']}"))
        for ifindex in links:
            vrf = _vrf_above(links, ifindex)
            if vrf is not None:
                add(Condition("vrf", 0, ifindex, f"{name(ifindex)} is enslaved to VRF {vrf}"))
        return sorted(out)


def _vrf_above(links: dict[int, LinkState], ifindex: int) -> str | None:
    """The name of the VRF whose table ``ifindex``'s packets are looked up in, if any."""
    link = links[ifindex]
    if link.slave_kind == "vrf":
        master = links.get(link.master)
        return master.name if master is not None else f"ifindex {link.master}"
    seen = {ifindex}
    while link.master and link.master not in seen:
        seen.add(link.master)
        master = links.get(link.master)
        if master is None:
            return None
        if master.kind == "vrf":
            return master.name
        link = master
    return None


def _netconf_follow(family: int, ifindex: int, values: dict[int, int]) -> list[str]:
    """What a netconf notification leaves unsaid, and which request says it."""
    if family == AF_INET and ifindex == DEFAULT:
        return ["dump netconf4"]  # devinet_copy_dflt_conf: interfaces changed silently
    if family == AF_INET6 and FORWARDING not in values and ifindex > 0:
        return [f"link {ifindex}"]  # force_forwarding: announced without its value
    if family == AF_INET6 and ifindex == ALL and values.get(FORWARDING, 0) == 0:
        return ["dump links"]  # all.forwarding=0 cleared every force_forwarding
    return []


def _link_body(ifindex: int) -> bytes:
    return nl.IFINFOMSG.pack(0, 0, ifindex, 0, 0) + nl.attr_u32(
        nl.IFLA_EXT_MASK, nl.RTEXT_FILTER_SKIP_STATS)


_DUMPS = {  # table -> (request type, body)
    "rules4": (nl.RTM_GETRULE, nl.FIB_RULE_HDR.pack(AF_INET, *[0] * 8)),
    "rules6": (nl.RTM_GETRULE, nl.FIB_RULE_HDR.pack(AF_INET6, *[0] * 8)),
    "netconf4": (nl.RTM_GETNETCONF, nl.NETCONFMSG.pack(AF_INET)),
    "netconf6": (nl.RTM_GETNETCONF, nl.NETCONFMSG.pack(AF_INET6)),
    "links": (nl.RTM_GETLINK, _link_body(0)),
    "addrs4": (nl.RTM_GETADDR, nl.IFADDRMSG.pack(AF_INET, 0, 0, 0, 0)),  # AF_INET: not IPv6's
}
_TABLES_OF = {  # message type -> the tables its messages fill
    nl.RTM_NEWRULE: ("rules4", "rules6"), nl.RTM_DELRULE: ("rules4", "rules6"),
    nl.RTM_NEWNETCONF: ("netconf4", "netconf6"), nl.RTM_DELNETCONF: ("netconf4", "netconf6"),
    nl.RTM_NEWLINK: ("links",), nl.RTM_DELLINK: ("links",),
    nl.RTM_NEWADDR: ("addrs4",), nl.RTM_DELADDR: ("addrs4",),
}


def request_for(label: str) -> bytes:
    """The request a label of the queue stands for: "dump TABLE", or "link IFINDEX"
    (RTM_GETLINK for one link; NLM_F_ACK marks the end of the answer)."""
    what, _, arg = label.partition(" ")
    if what == "dump":
        return nl.request(*_DUMPS[arg])
    return nl.request(nl.RTM_GETLINK, _link_body(int(arg)), nl.NLM_F_REQUEST | nl.NLM_F_ACK)


class RoutingWatch:
    """Follows rules, netconf, links and IPv4 addresses; see the module docstring."""

    def __init__(self, netns: str | None, on_change: Callable[[], None], *,
                 log: Any = None) -> None:
        self.netns = netns
        self.on_change = on_change
        self.log = log if log is not None else structlog.get_logger("fibsync.watch.routing")
        self.state = RoutingState()
        self.stats = self.state.stats
        self.stats.update(dumps=0, dump_errors=0, dump_intr=0, overruns=0, requests=0,
                          sessions=0)
        self.ready = asyncio.Event()
        self._sock: socket.socket | None = None
        self._portid = 0
        self._queue: dict[str, None] = {}  # requests still to send, in order, once each
        self._inflight: tuple[str, int] | None = None  # (request, sequence number)
        self._interrupted = False
        self._retry: set[str] = set()  # dumps that failed and are asked again each poll
        self._unsynced = set(TABLES)  # tables this session has not dumped yet
        self._conditions: list[Condition] = []
        self._failure: str | None = None
        self._wake = asyncio.Event()
        self._buf = bytearray(nl.RECV_BUFFER)

    def conditions(self) -> list[Condition]:
        return list(self._conditions)

    async def run(self) -> None:
        """Watch until cancelled; a failed socket is replaced and everything dumped again."""
        failures = 0  # sessions in a row that ended before their dumps were in
        while True:
            try:
                await self._session()
            except OSError as exc:
                self._failure = f"socket: {exc}"
            failures = failures + 1 if self._unsynced else 0
            self.log.warning("routing_watch.resync", reason=self._failure)
            if failures:
                await asyncio.sleep(min(0.05 * 2 ** failures, 5.0))

    async def _session(self) -> None:
        loop = asyncio.get_running_loop()
        sock = await loop.run_in_executor(None, functools.partial(
            nl.open_socket, netns=self.netns, rcvbuf=RCVBUF, groups=GROUPS))
        self._sock, self._portid = sock, sock.getsockname()[0]
        self._failure, self._inflight, self._interrupted = None, None, False
        self._unsynced = set(TABLES)
        self.state.staging.clear()
        self._queue = dict.fromkeys(f"dump {table}" for table in TABLES)
        self.stats["sessions"] += 1
        loop.add_reader(sock.fileno(), self._readable)
        try:
            self._send_next()
            while self._failure is None:
                self._wake.clear()
                if not await wait_event(self._wake, POLL_SECONDS):
                    self._poll()
        finally:
            loop.remove_reader(sock.fileno())
            sock.close()
            self._sock = None

    def _poll(self) -> None:
        for label in self._retry:
            self._queue.setdefault(label)
        self._retry.clear()
        if self.state.force_forwarding_at_risk():
            self._queue.setdefault("dump links")
        self._send_next()

    def _lose(self, reason: str) -> None:
        self._failure = reason
        self._wake.set()

    def _readable(self) -> None:
        sock = self._sock
        if sock is None or self._failure is not None:
            return
        view = memoryview(self._buf)
        for _ in range(MAX_READS):
            try:
                n = sock.recv_into(self._buf, 0, socket.MSG_TRUNC)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self.stats["overruns"] += 1
                    self._lose("ENOBUFS: the kernel dropped notifications")
                else:
                    self._lose(f"recv: {exc}")
                return
            if n > len(self._buf):
                self.stats["undecodable"] += 1
                self._lose(f"a {n}-byte message did not fit the receive buffer")
                return
            self.feed(bytes(view[:n]))
        self._send_next()
        self._publish()

    def feed(self, data: bytes) -> None:
        """Apply one received buffer of netlink messages (notifications and replies)."""
        offset = 0
        while offset + nl.NLMSGHDR.size <= len(data):
            length, mtype, flags, seq, pid = nl.NLMSGHDR.unpack_from(data, offset)
            if length < nl.NLMSGHDR.size:
                self.stats["undecodable"] += 1
                self._lose(f"netlink message of length {length}")
                return
            payload = data[offset + nl.NLMSGHDR.size:offset + length]
            offset += (length + 3) & ~3
            reply = pid == self._portid and pid != 0
            if mtype in (nl.NLMSG_DONE, nl.NLMSG_ERROR):
                if reply and self._inflight is not None and seq == self._inflight[1]:
                    self._finish(payload)
                continue
            if mtype in (nl.NLMSG_NOOP, nl.NLMSG_OVERRUN):
                continue
            if reply and flags & nl.NLM_F_DUMP_INTR:
                self._interrupted = True
            for request in self.state.apply(mtype, payload, notification=not reply):
                self._queue.setdefault(request)

    def _finish(self, payload: bytes) -> None:
        """The end of the request in flight (NLMSG_DONE, or NLMSG_ERROR: 0 is an ack)."""
        assert self._inflight is not None
        label = self._inflight[0]
        self._inflight = None
        err = -_S32.unpack_from(payload)[0] if len(payload) >= 4 else 0
        what, _, table = label.partition(" ")
        interrupted, self._interrupted = self._interrupted, False
        if what != "dump":
            return  # a link's answer is applied; ENODEV: its RTM_DELLINK says the rest
        if err:
            self.stats["dump_errors"] += 1
            reason = f"dump failed: {os.strerror(err)}"
            self.log.warning("routing_watch.dump_failed", table=table, error=os.strerror(err))
            self.state.fail(table, reason)
            if err not in PERMANENT_ERRORS:
                self._retry.add(label)
        elif interrupted:
            self.stats["dump_intr"] += 1
            self._queue.setdefault(label)
            return
        else:
            self.stats["dumps"] += 1
            self.state.commit(table)
        self._unsynced.discard(table)

    def _send_next(self) -> None:
        if self._inflight is not None or not self._queue or self._sock is None \
                or self._failure is not None:
            return
        label = next(iter(self._queue))
        del self._queue[label]
        what, _, table = label.partition(" ")
        if what == "dump":
            self.state.begin(table)
        msg = request_for(label)
        try:
            self._sock.send(msg)
        except OSError as exc:
            self._lose(f"send: {exc}")
            return
        self._inflight = (label, nl.seq_of(msg))
        self.stats["requests"] += 1

    def _publish(self) -> None:
        """Recompute the conditions once the first sync is in; tell on a change."""
        if self._unsynced and not self.ready.is_set():
            return
        conditions = self.state.conditions()
        first = not self.ready.is_set()
        if conditions == self._conditions and not first:
            return
        self._conditions = conditions
        self.ready.set()
        self.on_change()
