"""veth peers that leave TCP/UDP checksums to "hardware": find them and say where (issue 12).

Why. A veth whose peer has transmit checksum offload on ("tx-checksum-*"
active, the default) receives TCP/UDP with the checksum only started
(CHECKSUM_PARTIAL: the pseudo-header sum, the rest left to a NIC that does
not exist). The kernel's own forwarding keeps that skb state, so the next hop
still accepts the packet; XDP_REDIRECT turns the frame into an xdp_frame and
the state is lost. Seen on 6.18 (h1 --veth-- r --veth-- h2, an XDP
bpf_fib_lookup + bpf_redirect program on r's end facing h1): with h1's end
`tx on`, the three UDP datagrams h1 sent arrived at h2 with wrong checksums
(h2's Udp InCsumErrors 3, nothing delivered) and a TCP connect timed out
(its SYN dropped the same way); with `tx off`, or without XDP, all arrived.
Such an interface gets the ``checksum`` condition: its TCP/UDP goes to the
kernel (PASS_CHECKSUM).

How. For each veth of the watched namespace (IFLA_LINKINFO kind "veth"),
IFLA_LINK is the peer's ifindex and IFLA_LINK_NETNSID the peer's namespace
as an id seen from ours (absent: the same namespace). Ids are all the kernel
gives, so the namespace is found by asking RTM_GETNSID (NETNSA_FD) for each
candidate: /run/netns/* and /proc/*/ns/net, deduplicated by inode; a found
path is kept while it still leads to the same namespace. The peer's features
are read with ethtool netlink (generic netlink family "ethtool",
ETHTOOL_MSG_FEATURES_GET) from a socket made inside the peer's namespace by a
short-lived thread (a socket belongs to the namespace it was made in; holding
none open between checks keeps no namespace alive). A peer that cannot be
found or read gets the condition too: the careful answer.

``PeerProbe`` blocks (netlink requests, one thread per peer namespace): it runs
on the interface watcher's worker thread, which lives in the watched namespace.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from fibsync.errors import DecodeError
from fibsync.netlink import rtnl as nl
from fibsync.netns import NETNS_RUN_DIR

from . import Condition

# genetlink.h, ethtool_netlink.h (not rtnetlink: they stay with their one user)
NETLINK_GENERIC = 16
GENL_ID_CTRL = 16
GENLMSGHDR = struct.Struct("=BBxx")  # struct genlmsghdr: cmd, version, reserved
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID = 1
CTRL_ATTR_FAMILY_NAME = 2
ETHTOOL_GENL_NAME = b"ethtool"
ETHTOOL_GENL_VERSION = 1
ETHTOOL_MSG_FEATURES_GET = 11
ETHTOOL_A_FEATURES_HEADER = 1
ETHTOOL_A_FEATURES_ACTIVE = 4
ETHTOOL_A_HEADER_DEV_INDEX = 1
ETHTOOL_A_HEADER_DEV_NAME = 2
ETHTOOL_A_BITSET_NOMASK = 1
ETHTOOL_A_BITSET_BITS = 3
ETHTOOL_A_BITSET_VALUE = 4
ETHTOOL_A_BITSET_BITS_BIT = 1
ETHTOOL_A_BITSET_BIT_NAME = 2
ETHTOOL_A_BITSET_BIT_VALUE = 3

# netdev_features_strings of NETIF_F_IP_CSUM, NETIF_F_HW_CSUM, NETIF_F_IPV6_CSUM
TX_CHECKSUM = frozenset({"tx-checksum-ipv4", "tx-checksum-ip-generic", "tx-checksum-ipv6"})

_S32 = struct.Struct("=i")
_U32 = struct.Struct("=I")


@dataclass(frozen=True, slots=True)
class Link:
    """What the watchers need of an RTM_NEWLINK: name, kind and, for a veth, its peer."""

    ifindex: int
    name: str
    kind: str  # IFLA_INFO_KIND, "" without one
    peer: int = 0  # IFLA_LINK: for a veth, the peer's ifindex in the peer's namespace
    peer_nsid: int | None = None  # IFLA_LINK_NETNSID; None: the peer is in our namespace

    @property
    def veth(self) -> bool:
        return self.kind == "veth"


def parse_link(payload: bytes) -> Link:
    if len(payload) < nl.IFINFOMSG.size:
        raise DecodeError(f"link message of {len(payload)} bytes")
    ifindex = nl.IFINFOMSG.unpack_from(payload)[2]
    name, kind, peer, nsid = "", "", 0, None
    for kind_, value in nl.attrs(payload, nl.IFINFOMSG.size):
        if kind_ == nl.IFLA_IFNAME:
            name = value.rstrip(b"\0").decode(errors="replace")
        elif kind_ == nl.IFLA_LINK and len(value) >= 4:
            peer = _U32.unpack_from(value)[0]
        elif kind_ == nl.IFLA_LINK_NETNSID and len(value) >= 4:
            nsid = _S32.unpack_from(value)[0]
        elif kind_ == nl.IFLA_LINKINFO:
            for info, data in nl.attrs(value):
                if info == nl.IFLA_INFO_KIND:
                    kind = data.rstrip(b"\0").decode(errors="replace")
    return Link(ifindex, name or f"#{ifindex}", kind, peer, nsid)


@dataclass(frozen=True, slots=True)
class Peer:
    """What a check found of one veth's peer: its name, where it is, and either the
    checksum features it has on or the reason it could not be checked."""

    name: str
    netns: str
    tx_on: frozenset[str] = frozenset()
    problem: str = ""


def checksum_conditions(links: Iterable[Link], peers: Mapping[int, Peer]) -> list[Condition]:
    """``checksum`` for each veth whose peer has tx checksumming on, or is unchecked."""
    out = []
    for link in links:
        if not link.veth:
            continue
        peer = peers.get(link.ifindex)
        if peer is None:
            detail = f"veth peer of {link.name} not checked yet: its TCP/UDP goes to the kernel"
        elif peer.problem:
            detail = f"veth peer of {link.name}: {peer.problem}, so its TCP/UDP goes to the kernel"
        elif peer.tx_on:
            detail = (f"veth peer {peer.name} (netns {peer.netns}) has tx checksumming on: run "
                      f"`ethtool -K {peer.name} tx off` there, or its TCP/UDP goes to the kernel")
        else:
            continue
        out.append(Condition("checksum", 0, link.ifindex, detail))
    return out


def active_features(payload: bytes) -> tuple[str, frozenset[str]]:
    """(device name, names of the active features) of an ETHTOOL_MSG_FEATURES_GET reply
    in the kernel's default (named, not compact) bitset form."""
    name, active, found = "", set(), False
    for kind, value in nl.attrs(payload, GENLMSGHDR.size):
        if kind == ETHTOOL_A_FEATURES_HEADER:
            for hkind, hvalue in nl.attrs(value):
                if hkind == ETHTOOL_A_HEADER_DEV_NAME:
                    name = hvalue.rstrip(b"\0").decode(errors="replace")
        elif kind == ETHTOOL_A_FEATURES_ACTIVE:
            found = True
            parts = list(nl.attrs(value))
            if any(k == ETHTOOL_A_BITSET_VALUE for k, _ in parts):
                raise DecodeError("features reply in the compact bitset form")
            nomask = any(k == ETHTOOL_A_BITSET_NOMASK for k, _ in parts)
            for bits in (v for k, v in parts if k == ETHTOOL_A_BITSET_BITS):
                for bkind, bit in nl.attrs(bits):
                    fields = dict(nl.attrs(bit))
                    if bkind == ETHTOOL_A_BITSET_BITS_BIT and \
                            (nomask or ETHTOOL_A_BITSET_BIT_VALUE in fields):
                        active.add(fields.get(ETHTOOL_A_BITSET_BIT_NAME, b"").rstrip(b"\0")
                                   .decode(errors="replace"))
    if not found:
        raise DecodeError("features reply without the active set")
    return name, frozenset(active)


def _ask(sock: socket.socket, mtype: int, body: bytes) -> bytes:
    """One generic netlink request; the payload of its one answer (OSError on an error)."""
    msg = nl.request(mtype, body, nl.NLM_F_REQUEST)
    seq = nl.seq_of(msg)
    sock.send(msg)
    while True:
        data = sock.recv(1 << 16)
        offset = 0
        while offset + nl.NLMSGHDR.size <= len(data):
            length, kind, _flags, mseq, _pid = nl.NLMSGHDR.unpack_from(data, offset)
            if length < nl.NLMSGHDR.size:
                raise OSError(errno.EBADMSG, f"a netlink message of length {length}")
            payload = data[offset + nl.NLMSGHDR.size:offset + length]
            offset += (length + 3) & ~3
            if mseq != seq:
                continue
            if kind == nl.NLMSG_ERROR:
                err = -_S32.unpack_from(payload)[0]
                raise OSError(err or errno.EBADMSG, os.strerror(err))
            return payload


def _genl_socket(path: str | None) -> socket.socket:
    """A generic netlink socket of the calling thread's namespace, or of the one at ``path``."""

    def make() -> socket.socket:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC)
        sock.settimeout(2.0)
        sock.bind((0, 0))
        return sock

    if path is None:
        return make()
    result: list[socket.socket | BaseException] = []

    def inside() -> None:
        try:
            nl._enter_netns(path)  # an absolute path replaces /run/netns/
            result.append(make())
        except BaseException as exc:  # handed to the caller below
            result.append(exc)

    thread = threading.Thread(target=inside, name="veth-peer-netns")
    thread.start()
    thread.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


def _candidates() -> Iterator[str]:
    """Paths of network namespaces, named ones first (their names label the peers)."""
    named: list[str] = []
    with contextlib.suppress(OSError):
        named = sorted(str(p) for p in NETNS_RUN_DIR.iterdir())
    yield from named
    for pid in sorted((p for p in os.listdir("/proc") if p.isdigit()), key=int):
        yield f"/proc/{pid}/ns/net"


def _label(path: str, nsid: int) -> str:
    if path.startswith("/proc/"):
        return f"nsid {nsid}, `nsenter -n -t {path.split('/')[2]}`"
    return Path(path).name


class PeerProbe:
    """Checks veth peers (blocking): use it from a thread of the watched namespace."""

    def __init__(self, here: str) -> None:
        self.here = here  # how details name the watched namespace
        self._where: dict[int, tuple[str, int]] = {}  # nsid -> (path, inode)
        self._family = 0  # the ethtool family's id (global across namespaces)

    def probe(self, veths: Iterable[Link]) -> dict[int, Peer]:
        """A ``Peer`` for each veth given."""
        found: dict[int, Peer] = {}
        by_place: dict[str | None, list[tuple[Link, str]]] = {}
        wanted = [v for v in veths if v.veth]
        missing = {v.peer_nsid for v in wanted if v.peer_nsid is not None} - self._valid()
        if missing:
            self._scan(missing)
        for veth in wanted:
            if veth.peer_nsid is None:
                by_place.setdefault(None, []).append((veth, self.here))
            elif veth.peer_nsid in self._where:
                path = self._where[veth.peer_nsid][0]
                by_place.setdefault(path, []).append((veth, _label(path, veth.peer_nsid)))
            else:
                found[veth.ifindex] = Peer("", f"nsid {veth.peer_nsid}", problem=(
                    f"its namespace (nsid {veth.peer_nsid}) is neither under /run/netns nor "
                    "any process's, so its tx checksumming is unknown"))
        for path, group in by_place.items():
            found.update(self._features(path, group))
        return found

    def _valid(self) -> set[int]:
        """The nsids whose remembered path still leads to the same namespace."""
        for nsid, (path, inode) in list(self._where.items()):
            try:
                if os.stat(path).st_ino == inode:
                    continue
            except OSError:
                pass
            del self._where[nsid]
        return set(self._where)

    def _scan(self, missing: set[int]) -> None:
        seen = {os.stat("/proc/thread-self/ns/net").st_ino}
        with nl.Rtnl() as rtnl:
            for path in _candidates():
                try:
                    inode = os.stat(path).st_ino
                    if inode in seen:
                        continue
                    seen.add(inode)
                    nsid = _nsid(rtnl, path)
                except OSError:
                    continue  # gone meanwhile, or not a namespace we may open
                if nsid in missing:
                    self._where[nsid] = (path, inode)
                    missing.discard(nsid)
                    if not missing:
                        return

    def _features(self, path: str | None, group: list[tuple[Link, str]]) -> dict[int, Peer]:
        out = {}
        try:
            sock = _genl_socket(path)
        except OSError as exc:
            return {v.ifindex: Peer("", label, problem=f"cannot enter its namespace: {exc}")
                    for v, label in group}
        with sock:
            for veth, label in group:
                out[veth.ifindex] = self._peer(sock, veth, label)
        return out

    def _peer(self, sock: socket.socket, veth: Link, label: str) -> Peer:
        where = f"ifindex {veth.peer} in netns {label}"
        try:
            if not self._family:
                self._family = _ethtool_family(sock)
            header = nl.attr(ETHTOOL_A_FEATURES_HEADER | nl.NLA_F_NESTED,
                             nl.attr_u32(ETHTOOL_A_HEADER_DEV_INDEX, veth.peer))
            reply = _ask(sock, self._family, GENLMSGHDR.pack(ETHTOOL_MSG_FEATURES_GET,
                                                             ETHTOOL_GENL_VERSION) + header)
            name, active = active_features(reply)
        except OSError as exc:
            if exc.errno == errno.ENODEV:
                return Peer("", label, problem=f"its peer ({where}) is not there")
            return Peer("", label, problem=f"its peer's features ({where}) cannot be read: {exc}")
        except DecodeError as exc:
            return Peer("", label, problem=f"its peer's features ({where}) are unreadable: {exc}")
        return Peer(name or f"#{veth.peer}", label, active & TX_CHECKSUM)


def _nsid(rtnl: nl.Rtnl, path: str) -> int:
    """The id the watched namespace knows the namespace at ``path`` by (-1: none)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        body = nl.RTGENMSG.pack(nl.AF_UNSPEC) + nl.attr_u32(nl.NETNSA_FD, fd)
        for _kind, payload in rtnl.ask(nl.RTM_GETNSID, body):
            for kind, value in nl.attrs(payload, nl.RTGENMSG.size):
                if kind == nl.NETNSA_NSID and len(value) >= 4:
                    return int(_S32.unpack_from(value)[0])
    finally:
        os.close(fd)
    return -1


def _ethtool_family(sock: socket.socket) -> int:
    reply = _ask(sock, GENL_ID_CTRL, GENLMSGHDR.pack(CTRL_CMD_GETFAMILY, 1)
                 + nl.attr(CTRL_ATTR_FAMILY_NAME, ETHTOOL_GENL_NAME + b"\0"))
    for kind, value in nl.attrs(reply, GENLMSGHDR.size):
        if kind == CTRL_ATTR_FAMILY_ID and len(value) >= 2:
            return int(struct.unpack_from("=H", value)[0])
    raise OSError(errno.ENOENT, "no ethtool generic netlink family")
