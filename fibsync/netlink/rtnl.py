"""The rtnetlink core: every NETLINK_ROUTE constant, layout, socket and request of fibsync.

One place for what pyroute2 keeps in its netlink core, so that the source
and the XDP attachment speak to the kernel alike:

- constants: the kernel's UAPI values (include/uapi/linux/netlink.h,
  rtnetlink.h, nexthop.h, neighbour.h, if_link.h, if_addr.h, lwtunnel.h),
  each defined here once;
- layouts: the fixed headers as ``struct.Struct`` (``NLMSGHDR``, ``RTMSG``, ...);
- ``attr`` builds one attribute, ``attrs`` walks a chain of them (decode.py
  keeps its own inlined walk: it is the hot path of a full-table dump);
- ``request`` frames a request message under the process's one sequence;
- ``open_socket``: the non-blocking sockets of the source and the audit,
  in another network namespace if asked;
- ``Rtnl``: a blocking socket that sends one request and yields its answers,
  raising the kernel's error with its extended-ack text (XDP attach and link
  queries in fastpath/program.py, the link kind in preflight.py).
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import os
import socket
import struct
import threading
import time
from collections.abc import Iterable, Iterator

from fibsync.netns import CLONE_NEWNET, NETNS_RUN_DIR

# ---------------------------------------------------------------- netlink.h

NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSG_OVERRUN = 4
NLM_F_REQUEST = 0x01
NLM_F_MULTI = 0x02
NLM_F_ACK = 0x04
NLM_F_DUMP_INTR = 0x10
NLM_F_ROOT = 0x100
NLM_F_MATCH = 0x200
NLM_F_DUMP = NLM_F_ROOT | NLM_F_MATCH
NLM_F_REPLACE = 0x100
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_APPEND = 0x800
NLM_F_ACK_TLVS = 0x200  # on an NLMSG_ERROR: extended-ack attributes follow the request
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF  # clears NLA_F_NESTED and NLA_F_NET_BYTEORDER
NLMSGERR_ATTR_MSG = 1
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11

# ---------------------------------------------------------------- rtnetlink.h

RTM_NEWLINK = 16
RTM_DELLINK = 17
RTM_GETLINK = 18
RTM_SETLINK = 19
RTM_NEWADDR = 20
RTM_DELADDR = 21
RTM_GETADDR = 22
RTM_NEWROUTE = 24
RTM_DELROUTE = 25
RTM_GETROUTE = 26
RTM_NEWNEIGH = 28
RTM_DELNEIGH = 29
RTM_GETNEIGH = 30
RTM_NEWNEXTHOP = 104
RTM_DELNEXTHOP = 105
RTM_GETNEXTHOP = 106

# multicast groups (enum rtnetlink_groups)
RTNLGRP_LINK = 1
RTNLGRP_NEIGH = 3
RTNLGRP_IPV4_IFADDR = 5
RTNLGRP_IPV4_ROUTE = 7
RTNLGRP_IPV6_IFADDR = 9
RTNLGRP_IPV6_ROUTE = 11
RTNLGRP_NEXTHOP = 32

# route attributes (enum rtattr_type_t) and flags
RTA_DST = 1
RTA_OIF = 4
RTA_GATEWAY = 5
RTA_PRIORITY = 6
RTA_PREFSRC = 7
RTA_METRICS = 8
RTA_MULTIPATH = 9
RTA_CACHEINFO = 12
RTA_TABLE = 15
RTA_VIA = 18
RTA_PREF = 20
RTA_ENCAP_TYPE = 21
RTA_EXPIRES = 23
RTA_NH_ID = 30
RTAX_MTU = 2
RTM_F_CLONED = 0x200
RTNH_F_DEAD = 0x1
RTNH_F_MASK = 0xFF  # rtm_flags' low byte carries a single path's RTNH_F_* flags
RTPROT_RA = 9
RTEXT_FILTER_SKIP_STATS = 1 << 3

# ---------------------------------------------------------------- nexthop.h

NHA_ID = 1
NHA_GROUP = 2
NHA_BLACKHOLE = 4
NHA_OIF = 5
NHA_GATEWAY = 6
NHA_ENCAP_TYPE = 7
NHA_FDB = 11

# ---------------------------------------------------------------- neighbour.h

NDA_DST = 1
NDA_LLADDR = 2
NTF_PROXY = 0x08

# ---------------------------------------------------------------- if_link.h, if.h

IFLA_ADDRESS = 1
IFLA_IFNAME = 3
IFLA_MTU = 4
IFLA_LINK = 5
IFLA_LINKINFO = 18
IFLA_EXT_MASK = 29
IFLA_XDP = 43
IFLA_INFO_KIND = 1
IFLA_INFO_DATA = 2
IFLA_VLAN_ID = 1
IFLA_XDP_FD = 1
IFLA_XDP_FLAGS = 3
IFLA_XDP_DRV_PROG_ID = 5
IFLA_XDP_SKB_PROG_ID = 6
IFLA_XDP_HW_PROG_ID = 7
IFLA_XDP_EXPECTED_FD = 8
XDP_FLAGS_UPDATE_IF_NOEXIST = 1
XDP_FLAGS_SKB_MODE = 2
XDP_FLAGS_DRV_MODE = 4
XDP_FLAGS_HW_MODE = 8
XDP_FLAGS_REPLACE = 16
IFF_UP = 0x1
IFF_RUNNING = 0x40
IFF_LOWER_UP = 0x10000

# ---------------------------------------------------------------- if_addr.h

IFA_ADDRESS = 1
IFA_LOCAL = 2

AF_UNSPEC = 0

# ---------------------------------------------------------------- layouts

NLMSGHDR = struct.Struct("=IHHII")  # struct nlmsghdr: length, type, flags, seq, pid
NLATTR = struct.Struct("=HH")  # struct nlattr: length, type
RTMSG = struct.Struct("=BBBBBBBBI")  # struct rtmsg
NHMSG = struct.Struct("=BBBBI")  # struct nhmsg
NDMSG = struct.Struct("=BxxxiHBB")  # struct ndmsg
IFINFOMSG = struct.Struct("=BxHiII")  # struct ifinfomsg
IFADDRMSG = struct.Struct("=BBBBI")  # struct ifaddrmsg
RTNEXTHOP = struct.Struct("=HBBi")  # struct rtnexthop (an RTA_MULTIPATH entry)
NEXTHOP_GRP = struct.Struct("=IBBH")  # struct nexthop_grp (an NHA_GROUP entry)

# A dump skb never exceeds 32 KiB, an event is one message; 1 MiB leaves room
# for the odd huge link message (VF lists) without MSG_TRUNC.
RECV_BUFFER = 1 << 20
SO_RCVBUFFORCE = 33


def attr(kind: int, payload: bytes) -> bytes:
    """One attribute, padded to 4 bytes."""
    raw = NLATTR.pack(4 + len(payload), kind) + payload
    return raw + bytes(-len(raw) % 4)


def attr_u32(kind: int, value: int) -> bytes:
    return attr(kind, struct.pack("=I", value))


def attrs(data: bytes, offset: int = 0) -> Iterator[tuple[int, bytes]]:
    """(type without the NLA_F_* bits, payload) of each attribute from ``offset`` on."""
    while offset + 4 <= len(data):
        length, kind = NLATTR.unpack_from(data, offset)
        if length < 4:
            return
        yield kind & NLA_TYPE_MASK, data[offset + 4:offset + length]
        offset += (length + 3) & ~3


_seq = itertools.count(int(time.time()) & 0xFFFF)


def request(mtype: int, body: bytes, flags: int = NLM_F_REQUEST | NLM_F_DUMP) -> bytes:
    """One request message; its sequence number is its bytes 8..12 (``seq_of``)."""
    seq = next(_seq) & 0xFFFFFFFF
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), mtype, flags, seq, 0) + body


def seq_of(msg: bytes) -> int:
    seq: int = NLMSGHDR.unpack_from(msg)[3]
    return seq


# ---------------------------------------------------------------- sockets


def _enter_netns(netns: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(NETNS_RUN_DIR / netns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {netns}: {os.strerror(err)}")
    finally:
        os.close(fd)


def open_socket(
    *, netns: str | None = None, rcvbuf: int = 0, groups: Iterable[int] = ()
) -> socket.socket:
    """A non-blocking NETLINK_ROUTE socket, in ``netns`` if given, joined to ``groups``.

    A socket belongs to the namespace it was created in for its whole life,
    so for another namespace it is created by a short-lived thread that
    entered it; the rest of the process stays where it is.
    """

    def make() -> socket.socket:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        try:
            if rcvbuf:
                try:
                    # FORCE passes net.core.rmem_max (needs CAP_NET_ADMIN)
                    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
                except PermissionError:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.bind((0, 0))
            for group in groups:
                # ADD_MEMBERSHIP, not bind()'s 32-bit mask: RTNLGRP_NEXTHOP is 32
                sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    if netns is None:
        return make()
    result: list[socket.socket | BaseException] = []

    def in_netns() -> None:
        try:
            _enter_netns(netns)
            result.append(make())
        except BaseException as exc:  # handed to the caller's thread below
            result.append(exc)

    thread = threading.Thread(target=in_netns, name=f"netns-{netns}")
    thread.start()
    thread.join()
    outcome = result[0]
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


class Rtnl:
    """A blocking NETLINK_ROUTE socket of the calling thread's namespace for
    request and answer: ``with Rtnl() as nl: for mtype, payload in nl.ask(...)``."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        try:
            # errors carry the kernel's text, not our request back
            self.sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
            self.sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
            self.sock.bind((0, 0))
        except BaseException:
            self.sock.close()
            raise

    def __enter__(self) -> Rtnl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def ask(self, mtype: int, body: bytes, flags: int = 0) -> Iterator[tuple[int, bytes]]:
        """Send one request (NLM_F_REQUEST is added); yield (type, payload) of the
        answers: every message of a dump (``NLM_F_DUMP``), else the one answer.
        A request with ``NLM_F_ACK`` yields nothing and returns on the kernel's ack.

        Raises OSError with the kernel's errno and extended-ack message on an error.
        """
        msg = request(mtype, body, flags | NLM_F_REQUEST)
        seq = seq_of(msg)
        self.sock.send(msg)
        buf = bytearray(RECV_BUFFER)
        while True:
            n = self.sock.recv_into(buf)
            data = bytes(memoryview(buf)[:n])
            offset = 0
            while offset + NLMSGHDR.size <= len(data):
                length, kind, mflags, mseq, _pid = NLMSGHDR.unpack_from(data, offset)
                if length < NLMSGHDR.size:
                    raise OSError(errno.EBADMSG, f"a netlink message of length {length}")
                payload = data[offset + NLMSGHDR.size:offset + length]
                offset += (length + 3) & ~3
                if mseq != seq:
                    continue
                if kind == NLMSG_DONE:
                    return
                if kind == NLMSG_ERROR:
                    err = -struct.unpack_from("=i", payload)[0]
                    if err == 0:
                        return
                    text = os.strerror(err)
                    if mflags & NLM_F_ACK_TLVS:
                        # with NETLINK_CAP_ACK the error holds only the request's header
                        for akind, aval in attrs(payload, 4 + NLMSGHDR.size):
                            if akind == NLMSGERR_ATTR_MSG:
                                text = aval.rstrip(b"\0").decode(errors="replace")
                    raise OSError(err, text)
                yield kind, payload
                if not flags & NLM_F_DUMP:
                    return


# ---------------------------------------------------------------- policy rules, netconf
# (fib_rules.h, netconf.h, rtnetlink.h, if_link.h, ipv6.h, rtnetlink.h's rt_class_t:
# what fibsync/watch/routing.py and rules.py read)

RTM_NEWRULE = 32
RTM_DELRULE = 33
RTM_GETRULE = 34
RTM_NEWNETCONF = 80
RTM_DELNETCONF = 81
RTM_GETNETCONF = 82
RTNLGRP_IPV4_RULE = 8
RTNLGRP_IPV6_RULE = 19
RTNLGRP_IPV4_NETCONF = 24
RTNLGRP_IPV6_NETCONF = 25
RTPROT_KERNEL = 2
RT_TABLE_DEFAULT = 253

FIB_RULE_HDR = struct.Struct("=BBBBBBBBI")  # struct fib_rule_hdr
FIB_RULE_PERMANENT = 0x01
FIB_RULE_INVERT = 0x02
FIB_RULE_UNRESOLVED = 0x04
FIB_RULE_IIF_DETACHED = 0x08
FIB_RULE_OIF_DETACHED = 0x10
FIB_RULE_FIND_SADDR = 0x10000
FRA_DST = 1
FRA_SRC = 2
FRA_IIFNAME = 3
FRA_GOTO = 4
FRA_PRIORITY = 6
FRA_FWMARK = 10
FRA_FLOW = 11
FRA_TUN_ID = 12
FRA_SUPPRESS_IFGROUP = 13
FRA_SUPPRESS_PREFIXLEN = 14
FRA_TABLE = 15
FRA_FWMASK = 16
FRA_OIFNAME = 17
FRA_PAD = 18
FRA_L3MDEV = 19
FRA_UID_RANGE = 20
FRA_PROTOCOL = 21
FRA_IP_PROTO = 22
FRA_SPORT_RANGE = 23
FRA_DPORT_RANGE = 24
FRA_DSCP = 25
FRA_FLOWLABEL = 26
FRA_FLOWLABEL_MASK = 27
FRA_SPORT_MASK = 28
FRA_DPORT_MASK = 29
FRA_DSCP_MASK = 30
FR_ACT_TO_TBL = 1
FR_ACT_GOTO = 2
FR_ACT_NOP = 3
FR_ACT_BLACKHOLE = 6
FR_ACT_UNREACHABLE = 7
FR_ACT_PROHIBIT = 8

NETCONFMSG = struct.Struct("=Bxxx")  # struct netconfmsg, padded to NLMSG_ALIGNTO
NETCONFA_IFINDEX = 1
NETCONFA_FORWARDING = 2
NETCONFA_RP_FILTER = 3
NETCONFA_FORCE_FORWARDING = 9  # announced with no value (6.18 fills only the ifindex)
NETCONFA_IFINDEX_ALL = -1
NETCONFA_IFINDEX_DEFAULT = -2

IFLA_MASTER = 10
IFLA_AF_SPEC = 26
IFLA_INFO_SLAVE_KIND = 4
IFLA_INET6_CONF = 2  # in IFLA_AF_SPEC/AF_INET6: s32[DEVCONF_MAX], index DEVCONF_*
DEVCONF_FORCE_FORWARDING = 59  # 6.17+; older kernels send a shorter array


# ---------------------------------------------------------------- tc, netns ids
# (rtnetlink.h tcmsg, pkt_sched.h, net_namespace.h, if_link.h: what
# fibsync/watch/interfaces.py and veth.py read)

RTM_GETQDISC = 38
RTM_GETTFILTER = 46
RTM_GETNSID = 90
RTNLGRP_TC = 4

TCMSG = struct.Struct("=BxxxiIII")  # struct tcmsg: family, ifindex, handle, parent, info
TCA_KIND = 1
TC_H_ROOT = 0xFFFFFFFF
TC_H_INGRESS = 0xFFFFFFF1  # also TC_H_CLSACT: the parent of the ingress/clsact qdisc
TC_H_MIN_INGRESS = 0xFFF2
TC_H_MIN_EGRESS = 0xFFF3

RTGENMSG = struct.Struct("=Bxxx")  # struct rtgenmsg, padded to NLMSG_ALIGNTO
NETNSA_NSID = 1
NETNSA_FD = 3
IFLA_LINK_NETNSID = 37
