"""rtnetlink bytes -> model objects, for the hot path.

pyroute2 builds a dict per message and an object per attribute, and it does
not know nexthop objects; a FIB dump of 200k routes is dominated by that. This
decoder walks the receive buffer with ``struct.unpack_from``, reads only the
attributes fibsync uses and builds the frozen model objects directly.

``decode(buf)`` yields one ``(type, flags, seq, payload)`` tuple per netlink
message:

- RTM_{NEW,DEL}{ROUTE,NEXTHOP,NEIGH,LINK,ADDR}: payload is a ``Change``, or
  None where the message is deliberately skipped (cloned routes, bridge FDB
  entries, proxy neighbours, non-IP families);
- NLMSG_ERROR and NLMSG_DONE: payload is the positive errno (0 for an ack or
  a clean end of dump);
- anything else: payload None. ``type in HANDLED_TYPES`` tells the caller
  whether a None was a deliberate skip or a type we do not know.

Malformed input raises ``DecodeError`` and nothing else. A broken netlink
header ends the buffer (the next header cannot be found); a broken message
body is raised too, unless ``on_error`` is given, in which case it is handed
the error and decoding continues with the next message.

Constants and header layouts come from rtnl.py, the one rtnetlink core.

Longer than our ~500-line mark on purpose: one inlined attribute walk per
message type is what makes a full-table dump fast (a shared generic walker
costs a function call per attribute), and those walks belong together.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator

from fibsync.errors import DecodeError
from fibsync.model import (
    ADDR_LEN,
    AF_INET,
    AF_INET6,
    ROUTE_TYPES,
    Address,
    Change,
    Link,
    Neighbour,
    Nexthop,
    NexthopObject,
    Op,
    Prefix,
    Route,
    RouteType,
)
from fibsync.netlink.rtnl import (
    AF_UNSPEC,
    IFA_ADDRESS,
    IFA_LOCAL,
    IFADDRMSG,
    IFINFOMSG,
    IFLA_ADDRESS,
    IFLA_IFNAME,
    IFLA_INFO_DATA,
    IFLA_INFO_KIND,
    IFLA_LINK,
    IFLA_LINKINFO,
    IFLA_MTU,
    IFLA_VLAN_ID,
    NDA_DST,
    NDA_LLADDR,
    NDMSG,
    NEXTHOP_GRP,
    NHA_BLACKHOLE,
    NHA_ENCAP_TYPE,
    NHA_FDB,
    NHA_GATEWAY,
    NHA_GROUP,
    NHA_ID,
    NHA_OIF,
    NHMSG,
    NLA_TYPE_MASK,
    NLATTR,
    NLMSG_DONE,
    NLMSG_ERROR,
    NLMSGHDR,
    NTF_PROXY,
    RTA_ENCAP_TYPE,
    RTA_GATEWAY,
    RTA_VIA,
    RTAX_MTU,
    RTM_DELADDR,
    RTM_DELLINK,
    RTM_DELNEIGH,
    RTM_DELNEXTHOP,
    RTM_DELROUTE,
    RTM_F_CLONED,
    RTM_NEWADDR,
    RTM_NEWLINK,
    RTM_NEWNEIGH,
    RTM_NEWNEXTHOP,
    RTM_NEWROUTE,
    RTMSG,
    RTNEXTHOP,
    RTNH_F_MASK,
)

HANDLED_TYPES = frozenset(
    {
        RTM_NEWLINK,
        RTM_DELLINK,
        RTM_NEWADDR,
        RTM_DELADDR,
        RTM_NEWROUTE,
        RTM_DELROUTE,
        RTM_NEWNEIGH,
        RTM_DELNEIGH,
        RTM_NEWNEXTHOP,
        RTM_DELNEXTHOP,
    }
)

_ATTR_U32 = struct.Struct("=HHI")  # struct nlattr and a u32 payload
_U32 = struct.Struct("=I")
_U16 = struct.Struct("=H")
_I32 = struct.Struct("=i")

_ZERO: dict[int, bytes] = {AF_INET: bytes(4), AF_INET6: bytes(16)}

Message = tuple[int, int, int, "Change | int | None"]

# Routes share their paths: a full table holds a handful of distinct
# (ifindex, gateway, flags) combinations, so equal single-path tuples are
# built once and reused. The model objects are frozen, so sharing is safe.
_single_paths: dict[tuple[int, bytes | None, int, int], tuple[Nexthop, ...]] = {}
_SINGLE_PATHS_MAX = 65536


def decode(
    buf: bytes | bytearray | memoryview,
    on_error: Callable[[DecodeError], None] | None = None,
) -> Iterator[Message]:
    """Yield ``(type, flags, seq, payload)`` for each netlink message in ``buf``."""
    if not isinstance(buf, bytes):
        buf = bytes(buf)
    size = len(buf)
    pos = 0
    unpack_hdr = NLMSGHDR.unpack_from
    while pos < size:
        if size - pos < 16:
            raise DecodeError(f"{size - pos} trailing bytes are too short for a netlink header")
        length, mtype, flags, seq, _pid = unpack_hdr(buf, pos)
        if length < 16 or pos + length > size:
            raise DecodeError(
                f"netlink message at offset {pos} claims {length} bytes, {size - pos} remain"
            )
        end = pos + length
        body = pos + 16
        payload: Change | int | None
        try:
            if mtype in (RTM_NEWROUTE, RTM_DELROUTE):
                payload = _route(buf, body, end, mtype, flags)
            elif mtype in (RTM_NEWNEXTHOP, RTM_DELNEXTHOP):
                payload = _nexthop(buf, body, end, mtype, flags)
            elif mtype in (RTM_NEWNEIGH, RTM_DELNEIGH):
                payload = _neighbour(buf, body, end, mtype, flags)
            elif mtype in (RTM_NEWLINK, RTM_DELLINK):
                payload = _link(buf, body, end, mtype, flags)
            elif mtype in (RTM_NEWADDR, RTM_DELADDR):
                payload = _address(buf, body, end, mtype, flags)
            elif mtype in (NLMSG_ERROR, NLMSG_DONE):
                payload = _errno(buf, body, end, mtype)
            else:
                payload = None
        except DecodeError as exc:
            if on_error is None:
                raise
            on_error(exc)
        except (struct.error, IndexError, ValueError, UnicodeDecodeError) as exc:
            # the explicit length checks should make this unreachable; if they
            # miss a case, the caller still sees only DecodeError
            error = DecodeError(f"message type {mtype} at offset {pos}: {exc}")
            error.__cause__ = exc
            if on_error is None:
                raise error from exc
            on_error(error)
        else:
            yield (mtype, flags, seq, payload)
        pos += (length + 3) & ~3


def _errno(buf: bytes, pos: int, end: int, mtype: int) -> int:
    if end - pos < 4:
        if mtype == NLMSG_DONE:
            return 0  # some kernels end a dump with an empty NLMSG_DONE
        raise DecodeError("NLMSG_ERROR shorter than its error code")
    value: int = _I32.unpack_from(buf, pos)[0]
    return -value


def _bad_attr(pos: int, alen: int, end: int) -> DecodeError:
    return DecodeError(f"attribute at offset {pos} has length {alen}, {end - pos} bytes remain")


def _route(buf: bytes, pos: int, end: int, mtype: int, nlflags: int) -> Change | None:
    if end - pos < 12:
        raise DecodeError("route message shorter than struct rtmsg")
    family, dst_len, _src_len, tos, table, protocol, scope, rtype, rflags = RTMSG.unpack_from(
        buf, pos
    )
    if rflags & RTM_F_CLONED:
        return None
    if family == AF_INET:
        addr_len = 4
    elif family == AF_INET6:
        addr_len = 16
    else:
        return None  # MPLS, multicast routing tables: not ours
    if dst_len > addr_len * 8:
        raise DecodeError(f"route prefix length {dst_len} exceeds the address family")
    unpack_attr = NLATTR.unpack_from
    unpack_attr_u32 = _ATTR_U32.unpack_from
    dst = None
    oif = 0
    gateway = None
    gateway_family = 0
    metric = 0
    nhid = 0
    mtu = 0
    encap = 0
    multipath: tuple[Nexthop, ...] | None = None
    pos += 12
    # The attribute walk is the hot loop of a FIB dump: literals instead of
    # named constants, and header and u32 value read in one unpack.
    while pos + 8 <= end:
        alen, atype, u32 = unpack_attr_u32(buf, pos)
        if alen < 4 or pos + alen > end:
            raise _bad_attr(pos, alen, end)
        if atype > 0x3FFF:
            atype &= 0x3FFF  # NLA_TYPE_MASK
        if atype == 15:  # RTA_TABLE
            if alen < 8:
                raise DecodeError("RTA_TABLE too short")
            table = u32
        elif atype == 1:  # RTA_DST
            if alen - 4 != addr_len:
                raise DecodeError(f"RTA_DST of {alen - 4} bytes in a family {family} route")
            dst = buf[pos + 4 : pos + alen]
        elif atype == 5:  # RTA_GATEWAY
            if alen - 4 != addr_len:
                raise DecodeError(f"RTA_GATEWAY of {alen - 4} bytes in a family {family} route")
            gateway = buf[pos + 4 : pos + alen]
            gateway_family = family
        elif atype == 4:  # RTA_OIF
            if alen < 8:
                raise DecodeError("RTA_OIF too short")
            oif = u32
        elif atype == 6:  # RTA_PRIORITY
            if alen < 8:
                raise DecodeError("RTA_PRIORITY too short")
            metric = u32
        elif atype == 30:  # RTA_NH_ID
            if alen < 8:
                raise DecodeError("RTA_NH_ID too short")
            nhid = u32
        elif atype == 9:  # RTA_MULTIPATH
            multipath = _multipath(buf, pos + 4, pos + alen, family)
        elif atype == 18:  # RTA_VIA
            gateway_family, gateway = _via(buf, pos + 4, pos + alen)
        elif atype == 8:  # RTA_METRICS
            mtu = _mtu(buf, pos + 4, pos + alen)
        elif atype == 21:  # RTA_ENCAP_TYPE
            if alen < 6:
                raise DecodeError("RTA_ENCAP_TYPE too short")
            encap = u32 & 0xFFFF
        pos += (alen + 3) & ~3
    if pos + 4 <= end:
        # a last attribute shorter than 8 bytes: only a flag or padding can be,
        # and no route attribute we read is either
        alen, atype = unpack_attr(buf, pos)
        if alen < 4 or pos + alen > end:
            raise _bad_attr(pos, alen, end)

    if nhid:
        # the object decides (nexthop_compat_mode=1 copies its paths here too, read
        # above only to be checked): a route announced again over a replaced object
        # is then the route already held
        nexthops = ()
    elif multipath is not None:
        nexthops = multipath
    elif oif or gateway is not None:
        key = (oif, gateway, rflags & RTNH_F_MASK, encap)
        cached = _single_paths.get(key)
        if cached is None:
            if len(_single_paths) >= _SINGLE_PATHS_MAX:
                _single_paths.clear()
            cached = (Nexthop(oif, gateway, gateway_family, 1, rflags & RTNH_F_MASK, encap),)
            _single_paths[key] = cached
        nexthops = cached
    else:
        nexthops = ()
    route = Route(
        Prefix(family, dst if dst is not None else _ZERO[family], dst_len),
        table,
        ROUTE_TYPES[rtype] if rtype < len(ROUTE_TYPES) else RouteType.UNSPEC,
        protocol,
        scope,
        metric,
        tos,
        nexthops,
        nhid,
        mtu,
        rflags,
    )
    return Change(Op.ADD if mtype == RTM_NEWROUTE else Op.DEL, route, nlflags)


def _via(buf: bytes, pos: int, end: int) -> tuple[int, bytes]:
    # struct rtvia: a 16-bit address family, then the address
    if end - pos < 2:
        raise DecodeError("RTA_VIA too short")
    family = _U16.unpack_from(buf, pos)[0]
    addr_len = ADDR_LEN.get(family)
    if addr_len is None or end - pos - 2 != addr_len:
        raise DecodeError(f"RTA_VIA family {family} with {end - pos - 2} address bytes")
    return family, buf[pos + 2 : end]


def _mtu(buf: bytes, pos: int, end: int) -> int:
    mtu = 0
    while pos + 4 <= end:
        alen, atype = NLATTR.unpack_from(buf, pos)
        if alen < 4 or pos + alen > end:
            raise _bad_attr(pos, alen, end)
        if atype & NLA_TYPE_MASK == RTAX_MTU:
            if alen < 8:
                raise DecodeError("RTAX_MTU too short")
            mtu = _U32.unpack_from(buf, pos + 4)[0]
        pos += (alen + 3) & ~3
    return mtu


def _multipath(buf: bytes, pos: int, end: int, family: int) -> tuple[Nexthop, ...]:
    addr_len = ADDR_LEN[family]
    paths = []
    while pos + 8 <= end:
        rtnh_len, rtnh_flags, hops, ifindex = RTNEXTHOP.unpack_from(buf, pos)
        if rtnh_len < 8 or pos + rtnh_len > end:
            raise DecodeError(f"rtnexthop of length {rtnh_len}, {end - pos} bytes remain")
        gateway = None
        gateway_family = 0
        encap = 0
        apos = pos + 8
        nh_end = pos + rtnh_len
        while apos + 4 <= nh_end:
            alen, atype = NLATTR.unpack_from(buf, apos)
            if alen < 4 or apos + alen > nh_end:
                raise _bad_attr(apos, alen, nh_end)
            atype &= NLA_TYPE_MASK
            if atype == RTA_GATEWAY:
                if alen - 4 != addr_len:
                    raise DecodeError(f"RTA_GATEWAY of {alen - 4} bytes in a multipath entry")
                gateway = buf[apos + 4 : apos + alen]
                gateway_family = family
            elif atype == RTA_VIA:
                gateway_family, gateway = _via(buf, apos + 4, apos + alen)
            elif atype == RTA_ENCAP_TYPE:
                if alen < 6:
                    raise DecodeError("RTA_ENCAP_TYPE too short")
                encap = _U16.unpack_from(buf, apos + 4)[0]
            apos += (alen + 3) & ~3
        paths.append(Nexthop(ifindex, gateway, gateway_family, hops + 1, rtnh_flags, encap))
        pos += (rtnh_len + 3) & ~3
    return tuple(paths)


def _nexthop(buf: bytes, pos: int, end: int, mtype: int, nlflags: int) -> Change | None:
    if end - pos < 8:
        raise DecodeError("nexthop message shorter than struct nhmsg")
    family, _scope, protocol, _resvd, nh_flags = NHMSG.unpack_from(buf, pos)
    nh_id = 0
    ifindex = 0
    gateway = None
    blackhole = False
    encap = 0
    group: tuple[tuple[int, int], ...] = ()
    pos += 8
    while pos + 4 <= end:
        alen, atype = NLATTR.unpack_from(buf, pos)
        if alen < 4 or pos + alen > end:
            raise _bad_attr(pos, alen, end)
        atype &= NLA_TYPE_MASK
        data = pos + 4
        if atype == NHA_ID:
            if alen < 8:
                raise DecodeError("NHA_ID too short")
            nh_id = _U32.unpack_from(buf, data)[0]
        elif atype == NHA_GROUP:
            if (alen - 4) % 8:
                raise DecodeError(f"NHA_GROUP of {alen - 4} bytes is no array of nexthop_grp")
            group = tuple(
                (member, ((high << 8) | low) + 1)
                for member, low, high, _ in NEXTHOP_GRP.iter_unpack(buf[data : pos + alen])
            )
        elif atype == NHA_OIF:
            if alen < 8:
                raise DecodeError("NHA_OIF too short")
            ifindex = _U32.unpack_from(buf, data)[0]
        elif atype == NHA_GATEWAY:
            if alen - 4 not in (4, 16):
                raise DecodeError(f"NHA_GATEWAY of {alen - 4} bytes")
            gateway = buf[data : pos + alen]
        elif atype == NHA_BLACKHOLE:
            blackhole = True
        elif atype == NHA_ENCAP_TYPE:
            if alen < 6:
                raise DecodeError("NHA_ENCAP_TYPE too short")
            encap = _U16.unpack_from(buf, data)[0]
        elif atype == NHA_FDB:
            return None  # a VXLAN FDB nexthop: bridging, never an IP route's path
        pos += (alen + 3) & ~3
    if not nh_id:
        raise DecodeError("nexthop message without NHA_ID")
    if gateway is not None and len(gateway) != ADDR_LEN.get(family):
        raise DecodeError(f"NHA_GATEWAY of {len(gateway)} bytes in a family {family} nexthop")
    obj = NexthopObject(
        nh_id, family, ifindex, gateway, blackhole, group, nh_flags, protocol, encap
    )
    return Change(Op.ADD if mtype == RTM_NEWNEXTHOP else Op.DEL, obj, nlflags)


def _neighbour(buf: bytes, pos: int, end: int, mtype: int, nlflags: int) -> Change | None:
    if end - pos < 12:
        raise DecodeError("neighbour message shorter than struct ndmsg")
    family, ifindex, state, flags, _ntype = NDMSG.unpack_from(buf, pos)
    addr_len = ADDR_LEN.get(family)
    if addr_len is None or flags & NTF_PROXY:
        return None  # bridge FDB entries and proxy-ARP/NDP entries are no next hops
    dst = None
    lladdr = None
    pos += 12
    while pos + 4 <= end:
        alen, atype = NLATTR.unpack_from(buf, pos)
        if alen < 4 or pos + alen > end:
            raise _bad_attr(pos, alen, end)
        atype &= NLA_TYPE_MASK
        if atype == NDA_DST:
            if alen - 4 != addr_len:
                raise DecodeError(f"NDA_DST of {alen - 4} bytes in a family {family} neighbour")
            dst = buf[pos + 4 : pos + alen]
        elif atype == NDA_LLADDR:
            lladdr = buf[pos + 4 : pos + alen]
        pos += (alen + 3) & ~3
    if dst is None:
        raise DecodeError("neighbour message without NDA_DST")
    obj = Neighbour(family, ifindex, dst, lladdr, state, flags)
    return Change(Op.ADD if mtype == RTM_NEWNEIGH else Op.DEL, obj, nlflags)


def _cstring(buf: bytes, pos: int, end: int) -> str:
    raw = buf[pos:end]
    nul = raw.find(b"\0")
    return (raw if nul < 0 else raw[:nul]).decode("utf-8", "replace")


def _link(buf: bytes, pos: int, end: int, mtype: int, nlflags: int) -> Change | None:
    if end - pos < 16:
        raise DecodeError("link message shorter than struct ifinfomsg")
    family, arphrd, ifindex, flags, _change = IFINFOMSG.unpack_from(buf, pos)
    if family != AF_UNSPEC:
        # AF_BRIDGE messages describe bridge ports (a DELLINK there only
        # removes the port), AF_INET6 ones IPv6 per-device state
        return None
    name = ""
    mac = None
    mtu = 0
    link = 0
    kind = ""
    vlan_id = 0
    pos += 16
    while pos + 4 <= end:
        alen, atype = NLATTR.unpack_from(buf, pos)
        if alen < 4 or pos + alen > end:
            raise _bad_attr(pos, alen, end)
        atype &= NLA_TYPE_MASK
        data = pos + 4
        if atype == IFLA_IFNAME:
            name = _cstring(buf, data, pos + alen)
        elif atype == IFLA_ADDRESS:
            mac = buf[data : pos + alen]
        elif atype == IFLA_MTU:
            if alen < 8:
                raise DecodeError("IFLA_MTU too short")
            mtu = _U32.unpack_from(buf, data)[0]
        elif atype == IFLA_LINK:
            if alen < 8:
                raise DecodeError("IFLA_LINK too short")
            link = _U32.unpack_from(buf, data)[0]
        elif atype == IFLA_LINKINFO:
            kind, vlan_id = _linkinfo(buf, data, pos + alen)
        pos += (alen + 3) & ~3
    obj = Link(ifindex, name, mac, mtu, flags, kind, link, vlan_id, arphrd)
    return Change(Op.ADD if mtype == RTM_NEWLINK else Op.DEL, obj, nlflags)


def _linkinfo(buf: bytes, pos: int, end: int) -> tuple[str, int]:
    kind = ""
    data_pos = data_end = 0
    while pos + 4 <= end:
        alen, atype = NLATTR.unpack_from(buf, pos)
        if alen < 4 or pos + alen > end:
            raise _bad_attr(pos, alen, end)
        atype &= NLA_TYPE_MASK
        if atype == IFLA_INFO_KIND:
            kind = _cstring(buf, pos + 4, pos + alen)
        elif atype == IFLA_INFO_DATA:
            data_pos, data_end = pos + 4, pos + alen
        pos += (alen + 3) & ~3
    vlan_id = 0
    if kind == "vlan":
        # IFLA_INFO_DATA's layout belongs to the link kind: read it only for vlan
        pos = data_pos
        while pos + 4 <= data_end:
            alen, atype = NLATTR.unpack_from(buf, pos)
            if alen < 4 or pos + alen > data_end:
                raise _bad_attr(pos, alen, data_end)
            if atype & NLA_TYPE_MASK == IFLA_VLAN_ID:
                if alen < 6:
                    raise DecodeError("IFLA_VLAN_ID too short")
                vlan_id = _U16.unpack_from(buf, pos + 4)[0]
            pos += (alen + 3) & ~3
    return kind, vlan_id


def _address(buf: bytes, pos: int, end: int, mtype: int, nlflags: int) -> Change | None:
    if end - pos < 8:
        raise DecodeError("address message shorter than struct ifaddrmsg")
    family, prefixlen, _flags, _scope, ifindex = IFADDRMSG.unpack_from(buf, pos)
    addr_len = ADDR_LEN.get(family)
    if addr_len is None:
        return None
    if prefixlen > addr_len * 8:
        raise DecodeError(f"address prefix length {prefixlen} exceeds the address family")
    local = None
    address = None
    pos += 8
    while pos + 4 <= end:
        alen, atype = NLATTR.unpack_from(buf, pos)
        if alen < 4 or pos + alen > end:
            raise _bad_attr(pos, alen, end)
        atype &= NLA_TYPE_MASK
        if atype in (IFA_LOCAL, IFA_ADDRESS):
            if alen - 4 != addr_len:
                raise DecodeError(f"address attribute of {alen - 4} bytes in family {family}")
            if atype == IFA_LOCAL:
                local = buf[pos + 4 : pos + alen]
            else:
                address = buf[pos + 4 : pos + alen]
        pos += (alen + 3) & ~3
    # on point-to-point links IFA_ADDRESS is the peer and IFA_LOCAL our own
    mine = local if local is not None else address
    if mine is None:
        raise DecodeError("address message without IFA_LOCAL or IFA_ADDRESS")
    obj = Address(family, ifindex, mine, prefixlen)
    return Change(Op.ADD if mtype == RTM_NEWADDR else Op.DEL, obj, nlflags)
