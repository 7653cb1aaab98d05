"""fibsync.netlink.columns against decode(), the per-message reference.

The contract (columns.py's docstring): a message RouteDump claims is one decode() would
have turned into the same Route, except that ``nexthops`` is () and ``mtu`` 0; every
other message is handed back as its own bytes, in order, for decode(); and every message
of the dump is accounted for exactly once. The dumps here are built with struct in the
kernel's attribute order (see fixtures/netlink/route_v*_nhid*.hex) and cut into
recv()-like chunks at message boundaries; the random generator is seeded.
"""

from __future__ import annotations

import functools
import itertools
import random
import struct
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from fibsync.errors import DecodeError
from fibsync.model import AF_INET, AF_INET6, Change, Op, Route, RouteColumns
from fibsync.netlink.columns import RouteDump
from fibsync.netlink.decode import decode

FIXTURES = Path(__file__).parent / "fixtures" / "netlink"

SEQ = 0x5EED
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_MULTI = 0x02
NLM_F_DUMP_INTR = 0x10
RTM_NEWROUTE = 24
RTM_DELROUTE = 25
RTM_F_CLONED = 0x200
RTM_F_OFFLOAD = 0x4000
RTNH_F_ONLINK = 0x04
RTNH_F_LINKDOWN = 0x10
NLA_F_NET_BYTEORDER = 0x4000

RTA_DST = 1
RTA_SRC = 2
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
LWTUNNEL_ENCAP_IP = 2

RTN_UNICAST = 1
RTN_LOCAL = 2
RTN_BLACKHOLE = 6
RTN_UNREACHABLE = 7
RT_TABLE_COMPAT = 252
AF_MPLS = 28

ADDR_LEN = {AF_INET: 4, AF_INET6: 16}
FIELDS = ("ordinal", "dst", "dst_len", "tos", "table", "protocol", "scope", "type", "flags",
          "metric", "nhid")
OTHER = {AF_INET: AF_INET6, AF_INET6: AF_INET}
DEFAULT_BATCH = 4 << 20

# -- message builders ----------------------------------------------------------------


def attr(atype: int, payload: bytes, alen: int | None = None) -> bytes:
    """struct nlattr + payload, padded to 4 bytes; ``alen`` overrides the header's length."""
    raw = struct.pack("=HH", 4 + len(payload) if alen is None else alen, atype) + payload
    return raw + bytes(-len(raw) % 4)


def u32(atype: int, value: int) -> bytes:
    return attr(atype, struct.pack("=I", value))


def rtnh(ifindex: int, gateway: bytes | None, flags: int = 0, hops: int = 0) -> bytes:
    """One struct rtnexthop of an RTA_MULTIPATH, with its RTA_GATEWAY."""
    attrs = attr(RTA_GATEWAY, gateway) if gateway is not None else b""
    return struct.pack("=HBBi", 8 + len(attrs), flags, hops, ifindex) + attrs


def nlmsg(mtype: int, body: bytes, flags: int = NLM_F_MULTI, seq: int = SEQ) -> bytes:
    raw = struct.pack("=IHHII", 16 + len(body), mtype, flags, seq, 0x884F4BE5) + body
    return raw + bytes(-len(raw) % 4)


def route_msg(
    family: int,
    dst_len: int,
    attrs: list[bytes],
    *,
    tos: int = 0,
    table: int = 254,
    protocol: int = 3,
    scope: int = 0,
    rtype: int = RTN_UNICAST,
    rflags: int = 0,
    flags: int = NLM_F_MULTI,
    seq: int = SEQ,
    mtype: int = RTM_NEWROUTE,
) -> bytes:
    rtm = struct.pack(
        "=BBBBBBBBI", family, dst_len, 0, tos, table, protocol, scope, rtype, rflags
    )
    return nlmsg(mtype, rtm + b"".join(attrs), flags, seq)


def done(seq: int = SEQ) -> bytes:
    return nlmsg(NLMSG_DONE, struct.pack("=i", 0), seq=seq)


def error(errno_: int, seq: int = SEQ) -> bytes:
    return nlmsg(NLMSG_ERROR, struct.pack("=i", -errno_) + bytes(16), flags=0, seq=seq)


def masked(rng: random.Random, family: int, length: int) -> bytes:
    bits = ADDR_LEN[family] * 8
    n = rng.getrandbits(bits) & (((1 << bits) - 1) ^ ((1 << (bits - length)) - 1))
    return n.to_bytes(bits // 8, "big")


def addr(rng: random.Random, family: int) -> bytes:
    return rng.randbytes(ADDR_LEN[family])


PREFIX_LENS = {
    AF_INET: [24] * 8 + [16, 22, 23] * 2 + list(range(1, 33)),
    AF_INET6: [48, 64] * 6 + [32, 56] * 2 + list(range(1, 129)),
}
TABLES = [254] * 8 + [255, 1000, 1001, 100, 4096, 0xFFFFFFFF]
PROTOCOLS = [2, 3, 3, 186, 188, 188, 196, 196, 196, 11, 12]
NHIDS = [1, 1001, 1002, 1010, 65535, 70000, 0x7FFFFFFF, 0xFFFFFFFF]
COMPAT = [None] * 6 + ["gw"] * 2 + ["oif", "mp2", "mp3"]


def route(
    rng: random.Random,
    family: int,
    *,
    dst: bool = True,
    table_attr: bool = True,
    nhid: int | None = -1,
    compat: str | None = None,
    extra: tuple[bytes, ...] = (),
    rtype: int = RTN_UNICAST,
    rflags: int | None = None,
    flags: int = NLM_F_MULTI,
    seq: int = SEQ,
    mtype: int = RTM_NEWROUTE,
) -> bytes:
    """A route message as the kernel writes it (attribute order of route_v*_nhid*.hex).

    ``nhid``: -1 for a random object id, None for no RTA_NH_ID; ``compat``: the inline
    paths nexthop_compat_mode=1 adds (gw: RTA_GATEWAY+RTA_OIF, oif: RTA_OIF only,
    mp2/mp3: RTA_MULTIPATH of 2/3 paths).
    """
    dst_len = rng.choice(PREFIX_LENS[family]) if dst else 0
    table = rng.choice(TABLES)
    metric = rng.choice([0, 0, 20, 100, 1024, 0xFFFFFFFF])
    if family == AF_INET6 and rng.random() < 0.7:
        metric = 1024
    attrs = [u32(RTA_TABLE, table)] if table_attr else []
    if dst:
        attrs.append(attr(RTA_DST, masked(rng, family, dst_len)))
    if family == AF_INET6 or metric or rng.random() < 0.1:
        attrs.append(u32(RTA_PRIORITY, metric))
    if family == AF_INET and rng.random() < 0.15:
        attrs.append(attr(RTA_PREFSRC, addr(rng, family)))
    if nhid is not None:
        attrs.append(u32(RTA_NH_ID, rng.choice(NHIDS) if nhid == -1 else nhid))
    if compat in ("gw", "oif"):
        if compat == "gw":
            attrs.append(attr(RTA_GATEWAY, addr(rng, family)))
        attrs.append(u32(RTA_OIF, rng.randrange(1, 5000)))
    elif compat in ("mp2", "mp3"):
        paths = [
            rtnh(rng.randrange(1, 5000), addr(rng, family), rng.choice([0, 0, RTNH_F_ONLINK]),
                 rng.randrange(0, 4))
            for _ in range(int(compat[2]))
        ]
        attrs.append(attr(RTA_MULTIPATH, b"".join(paths)))
    if family == AF_INET6:
        if rng.random() < 0.3:
            attrs.append(attr(RTA_CACHEINFO, rng.randbytes(32)))
        attrs.append(attr(RTA_PREF, bytes([rng.choice([0, 0, 1, 3])])))
    attrs.extend(extra)
    if rflags is None:
        rflags = rng.choice([0] * 6 + [RTNH_F_LINKDOWN, RTM_F_OFFLOAD, RTNH_F_ONLINK])
    return route_msg(
        family,
        dst_len,
        attrs,
        tos=rng.choice([0] * 9 + [0x10]) if family == AF_INET else 0,
        table=table if table < 256 else RT_TABLE_COMPAT,
        protocol=rng.choice(PROTOCOLS),
        scope=rng.choice([0] * 9 + [253]),
        rtype=rtype,
        rflags=rflags,
        flags=flags,
        seq=seq,
        mtype=mtype,
    )


# -- the mixed dump ----------------------------------------------------------------------

COMMON = "common"  # the form RouteDump is for: it must claim (most of) these
NEVER = "never"  # it must hand these back
ANY = "any"  # either is fine, as long as a claim matches decode()


def _metrics(rng: random.Random) -> bytes:
    return attr(RTA_METRICS, u32(RTAX_MTU, rng.choice([1280, 1400, 9000])))


def _encap(rng: random.Random) -> bytes:
    return attr(RTA_ENCAP_TYPE, struct.pack("=H", LWTUNNEL_ENCAP_IP))


def _unpadded(msg: bytes) -> bytes:
    """nlmsg_len without the padding of the last attribute (an RTA_PREF of 5 bytes)."""
    return struct.pack("=I", len(msg) - 3) + msg[4:]


def _family(msg: bytes, family: int) -> bytes:
    """The same bytes with another rtm_family: decode() skips non-IP families."""
    return msg[:16] + bytes([family]) + msg[17:]


Maker = Callable[[random.Random, int], bytes]
KINDS: dict[str, tuple[str, int, Maker]] = {
    # name: (class, weight, maker)
    "nhid": (COMMON, 60, lambda r, f: route(r, f)),
    "nhid_compat": (COMMON, 25, lambda r, f: route(r, f, compat=r.choice(COMPAT[6:]))),
    "nhid_default": (COMMON, 2, lambda r, f: route(r, f, dst=False, compat=r.choice(COMPAT))),
    "nhid_blackhole": (COMMON, 2, lambda r, f: route(r, f, rtype=RTN_BLACKHOLE)),
    "nhid_local": (COMMON, 2, lambda r, f: route(r, f, rtype=RTN_LOCAL)),
    "nhid_unknown_type": (COMMON, 1, lambda r, f: route(r, f, rtype=200)),
    "inline_only": (NEVER, 6, lambda r, f: route(r, f, nhid=None, compat=r.choice(COMPAT[6:]))),
    "inline_unreachable": (NEVER, 1, lambda r, f: route(r, f, nhid=None, rtype=RTN_UNREACHABLE)),
    "nhid_zero": (NEVER, 1, lambda r, f: route(r, f, nhid=0, compat="gw")),
    "cloned": (NEVER, 2, lambda r, f: route(r, f, rflags=RTM_F_CLONED, compat=r.choice(COMPAT))),
    "wrong_seq": (NEVER, 2, lambda r, f: route(r, f, seq=SEQ + 1)),
    "dump_intr": (NEVER, 1, lambda r, f: route(r, f, flags=NLM_F_MULTI | NLM_F_DUMP_INTR)),
    "metrics": (NEVER, 3, lambda r, f: route(r, f, extra=(_metrics(r),))),
    "encap": (NEVER, 2, lambda r, f: route(r, f, compat="gw", extra=(_encap(r),))),
    "delroute": (NEVER, 1, lambda r, f: route(r, f, mtype=RTM_DELROUTE)),
    "type_0x118": (NEVER, 1, lambda r, f: route(r, f, mtype=RTM_NEWROUTE | 0x100)),
    "mpls_same_layout": (NEVER, 2, lambda r, f: _family(route(r, f, rflags=0), AF_MPLS)),
    "other_type": (NEVER, 1, lambda r, f: nlmsg(48, r.randbytes(r.randrange(12, 60)))),
    "mpls": (NEVER, 1, lambda r, f: route_msg(AF_MPLS, 20, [attr(RTA_DST, r.randbytes(4))])),
    "no_rta_table": (ANY, 1, lambda r, f: route(r, f, table_attr=False)),
    "unpadded_end": (ANY, 1, lambda r, f: _unpadded(route(r, f, extra=(attr(RTA_PREF, b"\1"),)))),
    "two_nh_ids": (ANY, 1, lambda r, f: route(r, f, extra=(u32(RTA_NH_ID, 77),))),
    "two_dsts": (ANY, 1, lambda r, f: route(r, f, extra=(attr(RTA_DST, addr(r, f)),))),
    "nh_id_then_zero": (NEVER, 1, lambda r, f: route(r, f, extra=(u32(RTA_NH_ID, 0),))),
    "src_specific": (ANY, 1, lambda r, f: route(r, f, extra=(attr(RTA_SRC, addr(r, f)),))),
    "expires": (ANY, 1, lambda r, f: route(r, f, extra=(u32(RTA_EXPIRES, 300),))),
    "flagged_nh_id": (ANY, 1, lambda r, f: route(
        r, f, nhid=None, extra=(u32(RTA_NH_ID | NLA_F_NET_BYTEORDER, 7),))),
    "via": (ANY, 1, lambda r, f: route(r, f, extra=(
        attr(RTA_VIA, struct.pack("=H", AF_INET6) + addr(r, AF_INET6)),))),
}


@functools.cache
def mixed_dump(family: int, n: int = 3000) -> tuple[tuple[bytes, ...], tuple[str, ...]]:
    """``n`` route messages of every kind (each at least twice), then NLMSG_DONE."""
    rng = random.Random(family * 7919)
    names = list(KINDS) * 2
    names += rng.choices(list(KINDS), [w for _, w, _ in KINDS.values()], k=n - len(names))
    rng.shuffle(names)
    msgs = [KINDS[name][2](rng, family) for name in names]
    return (*msgs, done()), (*names, "done")


def kind_class(name: str) -> str:
    return NEVER if name == "done" else KINDS[name][0]


@functools.cache
def common_dump(family: int, n: int = 1500) -> tuple[bytes, ...]:
    """Only the claimed form (a full table over nexthop objects), no NLMSG_DONE."""
    rng = random.Random(family * 104729)
    names = ["nhid"] * 6 + ["nhid_compat"] * 3 + ["nhid_default", "nhid_blackhole", "nhid_local"]
    return tuple(KINDS[rng.choice(names)][2](rng, family) for _ in range(n))


def grouped(rng: random.Random, msgs: tuple[bytes, ...] | list[bytes]) -> list[list[bytes]]:
    """Messages as recv() would return them: whole messages, up to 32 KiB a chunk."""
    groups: list[list[bytes]] = []
    size = target = 0
    for msg in msgs:
        if not groups or size + len(msg) > target:
            groups.append([])
            size = 0
            target = rng.choice([rng.randrange(1, 2048), rng.randrange(2048, 32768)])
        groups[-1].append(msg)
        size += len(msg)
    return groups


def chunked(rng: random.Random, msgs: tuple[bytes, ...] | list[bytes]) -> list[bytes]:
    return [b"".join(group) for group in grouped(rng, msgs)]


# -- the differential check --------------------------------------------------------------

Outcome = tuple[list[tuple[int, int, int, object]], list[str], str | None]


def outcome(buf: bytes) -> Outcome:
    """What decode() makes of ``buf``: messages, errors it reports, the error it raises."""
    items: list[tuple[int, int, int, object]] = []
    errors: list[str] = []
    raised = None
    try:
        for item in decode(buf, lambda exc: errors.append(str(exc))):
            items.append(item)
    except DecodeError as exc:
        raised = str(exc)
    return items, errors, raised


def decoded_route(msg: bytes) -> Route:
    """The Route decode() makes of one message, as a claimed row must give it."""
    items, errors, raised = outcome(msg)
    assert not errors and raised is None, (errors, raised)
    [(mtype, _flags, _seq, change)] = items
    assert mtype == RTM_NEWROUTE and isinstance(change, Change) and change.op == Op.ADD
    assert isinstance(change.obj, Route)
    return replace(change.obj, nexthops=(), mtu=0)


def run(
    chunks: list[bytes], *, batch: int, first: int = 0, seq: int = SEQ
) -> tuple[RouteDump, list[tuple[int, bytes]]]:
    """Feed ``chunks``, then flush; check the order of what comes back and the dump's end.

    Whenever an NLMSG_DONE/ERROR comes back, every message before it must already be
    accounted for: claimed (in the columns) or handed back before it.
    """
    dump = RouteDump(seq, first_ordinal=first, batch=batch)
    unclaimed: list[tuple[int, bytes]] = []
    for chunk in chunks:
        out = dump.feed(chunk)
        assert all(isinstance(m, bytes) for _, m in out)
        for ordinal, message in out:
            if len(message) >= 16 and struct.unpack_from("=H", message, 4)[0] in (
                NLMSG_DONE,
                NLMSG_ERROR,
            ):
                seen = {o for o, _ in unclaimed} | set(claimed_ordinals(dump))
                assert seen >= set(range(first, ordinal)), f"end at {ordinal} came early"
            unclaimed.append((ordinal, message))
    unclaimed += dump.flush()
    assert dump.flush() == []
    ordinals = [o for o, _ in unclaimed]
    assert ordinals == sorted(set(ordinals)), "unclaimed messages out of order or repeated"
    return dump, unclaimed


def claimed_ordinals(dump: RouteDump) -> list[int]:
    return [o for f in (AF_INET, AF_INET6) for o in dump.columns(f).ordinal.tolist()]


def check(
    dump: RouteDump,
    unclaimed: list[tuple[int, bytes]],
    msgs: tuple[bytes, ...] | list[bytes],
    family: int,
    first: int = 0,
) -> set[int]:
    """The contract, message by message; returns the indices (into ``msgs``) claimed."""
    cols = dump.columns(family)
    assert len(dump.columns(OTHER[family])) == 0
    assert dump.claimed == len(cols)
    assert dump.next_ordinal == first + len(msgs)
    assert cols.family == family
    assert cols.dst.shape == (len(cols), ADDR_LEN[family])
    assert cols.ordinal.dtype == np.int64
    for name in FIELDS:
        assert len(getattr(cols, name)) == len(cols), name
    claimed = cols.ordinal.tolist()
    everything = sorted(claimed + [o for o, _ in unclaimed])
    assert everything == list(range(first, first + len(msgs))), "messages lost or repeated"
    for i, ordinal in enumerate(claimed):
        msg = msgs[ordinal - first]
        _, errors, raised = outcome(msg)
        assert not errors and raised is None, (
            f"claimed message {ordinal}, which decode() rejects ({errors or raised}): {msg.hex()}"
        )
        assert cols.route(i) == decoded_route(msg), f"message {ordinal}: {msg.hex()}"
    for ordinal, message in unclaimed:
        original = msgs[ordinal - first]
        assert message == original, f"message {ordinal} not handed back as its own bytes"
        assert outcome(message) == outcome(original)
    return {o - first for o in claimed}


# -- 1. mixed dumps ----------------------------------------------------------------------


@pytest.mark.parametrize("batch", [2048, DEFAULT_BATCH], ids=["batch2k", "default"])
@pytest.mark.parametrize("family", [AF_INET, AF_INET6], ids=["v4", "v6"])
def test_mixed_dump_matches_decode(family: int, batch: int) -> None:
    msgs, names = mixed_dump(family)
    rng = random.Random(batch + family)
    dump, unclaimed = run(chunked(rng, msgs), batch=batch)
    claimed = check(dump, unclaimed, msgs, family)

    wrongly = sorted({names[i] for i in claimed if kind_class(names[i]) == NEVER})
    assert not wrongly, f"claimed what it must hand back: {wrongly}"
    assert unclaimed[-1] == (len(msgs) - 1, done())
    common = [i for i, name in enumerate(names) if kind_class(name) == COMMON]
    got = {names[i] for i in claimed}
    # the bulk of the common form, and every variant of it, goes to the columns
    assert len(claimed) >= 0.8 * len(common), (len(claimed), len(common))
    assert got >= {"nhid", "nhid_compat", "nhid_default", "nhid_blackhole", "nhid_local"}


@pytest.mark.parametrize("batch", [2048, DEFAULT_BATCH], ids=["batch2k", "default"])
@pytest.mark.parametrize("family", [AF_INET, AF_INET6], ids=["v4", "v6"])
def test_common_form_is_all_claimed(family: int, batch: int) -> None:
    msgs = (*common_dump(family), done())
    dump, unclaimed = run(chunked(random.Random(family), msgs), batch=batch)
    check(dump, unclaimed, msgs, family)
    assert unclaimed == [(len(msgs) - 1, done())]


def test_one_message_chunks() -> None:
    """recv() returning one message at a time, with a batch smaller than a message."""
    msgs, _ = mixed_dump(AF_INET6)
    msgs = msgs[:250] + msgs[-1:]
    for batch in (1, 2048):
        dump, unclaimed = run(list(msgs), batch=batch)
        assert check(dump, unclaimed, msgs, AF_INET6)


@pytest.mark.parametrize(
    "name", ["route_v4_nhid", "route_v6_nhid", "route_v4_nhid_group_compat",
             "route_v6_nhid_compat"],
)
def test_kernel_messages_are_claimed(name: str) -> None:
    """The layouts a real kernel sent (fixtures/netlink), twice in one chunk."""
    text = "".join(
        line for line in (FIXTURES / f"{name}.hex").read_text().splitlines()
        if line and not line.startswith("#")
    )
    msg = bytes.fromhex(text)
    seq = struct.unpack_from("=I", msg, 8)[0]
    msgs = [msg, msg, done(seq)]
    family = msg[16]
    dump, unclaimed = run([b"".join(msgs)], batch=DEFAULT_BATCH, seq=seq)
    assert check(dump, unclaimed, msgs, family) == {0, 1}


def test_many_layouts_of_one_length() -> None:
    """More layouts of one message length than RouteDump tries per batch: none is lost."""
    rng = random.Random(8)
    msgs: list[bytes] = []
    orders = list(itertools.permutations(range(5)))
    for i in range(120):
        attrs = [u32(RTA_TABLE, 254), attr(RTA_DST, masked(rng, AF_INET, 24)),
                 u32(RTA_PRIORITY, 20), u32(RTA_NH_ID, rng.choice(NHIDS)),
                 attr(RTA_SRC if i % 7 == 0 else RTA_PREFSRC, addr(rng, AF_INET))]
        order = orders[i * 37 % len(orders)]
        cloned = RTM_F_CLONED if i % 11 == 0 else 0
        msgs.append(route_msg(AF_INET, 24, [attrs[j] for j in order], rflags=cloned))
    msgs.append(done())
    for batch in (1, 1024, DEFAULT_BATCH):
        dump, unclaimed = run(chunked(rng, msgs), batch=batch)
        assert check(dump, unclaimed, msgs, AF_INET)


def test_batches_before_the_end() -> None:
    """Chunks are held back until ``batch`` bytes have come, then processed at once."""
    msgs = mixed_dump(AF_INET6)[0][:1000]  # no NLMSG_DONE
    batch = 4096
    dump = RouteDump(SEQ, batch=batch)
    unclaimed: list[tuple[int, bytes]] = []
    fed = held = 0
    for group in grouped(random.Random(12), msgs):
        claimed = dump.claimed
        out = dump.feed(b"".join(group))
        fed += len(group)
        held += sum(map(len, group))
        if held >= batch:
            assert len(unclaimed) + len(out) + dump.claimed == fed, "held back past the batch"
            held = 0
        else:
            assert out == [] and dump.claimed == claimed, "processed before the batch filled"
        unclaimed += out
    unclaimed += dump.flush()
    assert check(dump, unclaimed, msgs, AF_INET6)


# -- 2. malformed input ------------------------------------------------------------------


def _patch(msg: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(msg)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def _attr_at(msg: bytes, atype: int) -> int:
    """Offset of the first top-level attribute of type ``atype``."""
    pos = 28
    while pos + 4 <= len(msg):
        alen, t = struct.unpack_from("=HH", msg, pos)
        if t == atype:
            return pos
        pos += (alen + 3) & ~3
    raise AssertionError(f"no attribute {atype}")


def _last_attr(msg: bytes) -> int:
    pos, last = 28, 28
    while pos + 4 <= len(msg):
        last = pos
        pos += (struct.unpack_from("=H", msg, pos)[0] + 3) & ~3
    return last


def _v4(compat: str | None = None) -> bytes:
    """A fixed IPv4 route of the common form: TABLE, DST, PRIORITY, NH_ID (+ compat)."""
    return route(random.Random(1), AF_INET, compat=compat, rflags=0)


def _v6(compat: str | None = None) -> bytes:
    msg = route_msg(
        AF_INET6, 48,
        [u32(RTA_TABLE, 254), attr(RTA_DST, bytes.fromhex("20010db8030000000000000000000000")),
         u32(RTA_PRIORITY, 1024), u32(RTA_NH_ID, 1003)]
        + ([attr(RTA_GATEWAY, bytes(15) + b"\x02"), u32(RTA_OIF, 3)] if compat == "gw" else [])
        + ([attr(RTA_MULTIPATH, rtnh(3, bytes(15) + b"\x02") + rtnh(3, bytes(15) + b"\x03"))]
           if compat == "mp2" else [])
        + [attr(RTA_PREF, b"\x00")],
    )
    return msg


def _truncate_last(msg: bytes) -> bytes:
    """The last attribute's header says 2 bytes: less than the header itself."""
    return _patch(msg, _last_attr(msg), "=H", 2)


def _overflow_last(msg: bytes) -> bytes:
    """The last attribute's length runs past the end of the message."""
    pos = _last_attr(msg)
    return _patch(msg, pos, "=H", len(msg) - pos + 4)


def _dst_len_field(msg: bytes, delta: int) -> bytes:
    """RTA_DST's header claims ``delta`` more (or fewer) bytes than the family's address."""
    pos = _attr_at(msg, RTA_DST)
    return _patch(msg, pos, "=H", struct.unpack_from("=H", msg, pos)[0] + delta)


def _wrong_dst(family: int) -> bytes:
    """An RTA_DST of the other family's length, the message framed accordingly."""
    rng = random.Random(5)
    return route_msg(family, 8, [u32(RTA_TABLE, 254), attr(RTA_DST, addr(rng, OTHER[family])),
                                 u32(RTA_PRIORITY, 20), u32(RTA_NH_ID, 1001)])


def _multipath_inner(msg: bytes, offset: int, fmt: str, value: int) -> bytes:
    """Patch the RTA_MULTIPATH payload at ``offset``: the top-level layout stays the same."""
    return _patch(msg, _attr_at(msg, RTA_MULTIPATH) + 4 + offset, fmt, value)


MALFORMED: dict[str, Callable[[], bytes]] = {
    "v4 truncated attribute": lambda: _truncate_last(_v4()),
    "v6 truncated attribute": lambda: _truncate_last(_v6()),
    "v4 attribute overflows the message": lambda: _overflow_last(_v4()),
    "v6 attribute overflows the message": lambda: _overflow_last(_v6("gw")),
    "v4 RTA_DST of 5 bytes": lambda: _dst_len_field(_v4(), 1),
    "v6 RTA_DST of 15 bytes": lambda: _dst_len_field(_v6(), -1),
    "v4 RTA_DST of 16 bytes": lambda: _wrong_dst(AF_INET),
    "v6 RTA_DST of 4 bytes": lambda: _wrong_dst(AF_INET6),
    "v4 prefix length 33": lambda: _patch(_v4(), 17, "=B", 33),
    "v6 prefix length 129": lambda: _patch(_v6(), 17, "=B", 129),
    "v4 RTA_NH_ID of 2 bytes": lambda: _patch(_v4(), _attr_at(_v4(), RTA_NH_ID), "=H", 6),
    "v4 RTA_TABLE of 2 bytes": lambda: _patch(_v4(), _attr_at(_v4(), RTA_TABLE), "=H", 6),
    "v4 RTA_GATEWAY of 3 bytes": lambda: _patch(
        _v4("gw"), _attr_at(_v4("gw"), RTA_GATEWAY), "=H", 7),
    "v6 shorter than rtmsg": lambda: nlmsg(RTM_NEWROUTE, _v6()[16:24]),
}

# Malformed inside RTA_MULTIPATH, which RouteDump does not read (the top-level layout
# is that of a well-formed compat route): decode() raises on these.
MALFORMED_MULTIPATH: dict[str, Callable[[], bytes]] = {
    "v4 rtnexthop of length 4": lambda: _multipath_inner(_v4("mp2"), 0, "=H", 4),
    "v4 rtnexthop overflows RTA_MULTIPATH": lambda: _multipath_inner(_v4("mp2"), 16, "=H", 64),
    "v4 multipath RTA_GATEWAY of 3 bytes": lambda: _multipath_inner(_v4("mp2"), 8, "=H", 7),
    "v6 multipath RTA_GATEWAY of 4 bytes": lambda: _multipath_inner(_v6("mp2"), 8, "=H", 8),
}

def _check_malformed(bad: bytes, family: int) -> None:
    _, errors, raised = outcome(bad)
    assert errors or raised, "the test's message is not malformed"
    make = _v4 if family == AF_INET else _v6
    # the well-formed routes the malformed ones were made from: the same layouts
    twins = [make(), make("gw"), make("mp2")]
    for msgs in (
        [bad, *twins, done()],  # the malformed message leads its length group
        [*twins, bad, *twins, done()],  # it follows its well-formed twin
        [*twins, bad, bad, done()],
    ):
        for batch in (1, DEFAULT_BATCH):
            dump, unclaimed = run([b"".join(msgs)], batch=batch)
            claimed = check(dump, unclaimed, msgs, family)
            assert not {i for i in claimed if msgs[i] == bad}, "claimed a malformed message"
            assert {i for i, m in enumerate(msgs) if m in twins} <= claimed


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_message_is_handed_back(name: str) -> None:
    bad = MALFORMED[name]()
    _check_malformed(bad, AF_INET6 if name.startswith("v6") else AF_INET)


@pytest.mark.parametrize("name", list(MALFORMED_MULTIPATH))
def test_malformed_multipath_is_handed_back(name: str) -> None:
    bad = MALFORMED_MULTIPATH[name]()
    _check_malformed(bad, AF_INET6 if name.startswith("v6") else AF_INET)


def test_same_length_malformed_follows_good() -> None:
    """Same length and same top-level layout as the claimed route before it; prefix too long."""
    good = _v4()
    bad = _patch(good, 17, "=B", 40)
    msgs = [good, bad, good, done()]
    dump, unclaimed = run([b"".join(msgs)], batch=DEFAULT_BATCH)
    assert check(dump, unclaimed, msgs, AF_INET) == {0, 2}
    [(ordinal, back)] = unclaimed[:-1]
    assert ordinal == 1 and back == bad
    assert outcome(back)[1], "decode() reports it"


GARBAGE: dict[str, bytes] = {
    "3 trailing bytes": b"\x01\x02\x03",
    "15 trailing bytes": bytes(range(15)),
    "length past the chunk": struct.pack("=IHHII", 4096, RTM_NEWROUTE, NLM_F_MULTI, SEQ, 0)
    + bytes(20),
    "length 0, then a route": struct.pack("=IHHII", 0, RTM_NEWROUTE, NLM_F_MULTI, SEQ, 0)
    + _v4(),
    "length 8, then done": struct.pack("=IHHII", 8, RTM_NEWROUTE, NLM_F_MULTI, SEQ, 0) + done(),
}


@pytest.mark.parametrize("batch", [2048, DEFAULT_BATCH], ids=["batch2k", "default"])
@pytest.mark.parametrize("name", list(GARBAGE))
def test_broken_framing_keeps_earlier_rows(name: str, batch: int) -> None:
    garbage = GARBAGE[name]
    msgs = list(common_dump(AF_INET)[:300])
    chunks = chunked(random.Random(3), msgs)
    broken = chunks[-1] + garbage
    chunks[-1] = broken
    with pytest.raises(DecodeError):
        list(decode(broken))

    dump, unclaimed = run(chunks, batch=batch)
    # the garbage comes back as one piece, last, and decode() raises on it
    assert unclaimed[-1] == (len(msgs), garbage)
    with pytest.raises(DecodeError):
        list(decode(garbage))
    # everything before it is claimed, exactly as decode() reads it
    cols = in_order(dump.columns(AF_INET))
    assert cols.ordinal.tolist() == list(range(len(msgs)))
    assert [cols.route(i) for i in range(len(cols))] == [decoded_route(m) for m in msgs]
    assert dump.next_ordinal == len(msgs) + 1


def test_broken_framing_in_first_chunk() -> None:
    """Messages after a broken header in the same chunk are part of the unreadable rest."""
    good = list(common_dump(AF_INET6)[:20])
    rest = struct.pack("=IHHII", 12, RTM_NEWROUTE, 0, SEQ, 0) + b"".join(good[10:])
    dump, unclaimed = run([b"".join(good[:10]) + rest, done()], batch=DEFAULT_BATCH)
    assert sorted(dump.columns(AF_INET6).ordinal.tolist()) == list(range(10))
    assert unclaimed == [(10, rest), (11, done())]


# -- 3. the end of the dump --------------------------------------------------------------


@pytest.mark.parametrize("batch", [2048, DEFAULT_BATCH], ids=["batch2k", "default"])
@pytest.mark.parametrize("end", ["done", "error"])
def test_end_of_dump_comes_after_every_route(batch: int, end: str) -> None:
    msgs, _ = mixed_dump(AF_INET)
    last = done() if end == "done" else error(4)  # EINTR
    msgs = (*msgs[:1200], last)
    chunks = chunked(random.Random(9), msgs[:-1])
    dump = RouteDump(SEQ, batch=batch)
    unclaimed: list[tuple[int, bytes]] = []
    for chunk in chunks[:-1]:
        out = dump.feed(chunk)
        if batch == DEFAULT_BATCH:
            assert out == [], "handed back before the batch filled or the dump ended"
        unclaimed += out
    out = dump.feed(chunks[-1] + last)
    assert out[-1] == (len(msgs) - 1, last)
    unclaimed += out
    # at this point the columns hold every route claimed before the end
    cols = dump.columns(AF_INET)
    assert sorted(cols.ordinal.tolist() + [o for o, _ in unclaimed]) == list(range(len(msgs)))
    assert dump.flush() == []
    check(dump, unclaimed, msgs, AF_INET)


def test_end_in_its_own_chunk() -> None:
    msgs = common_dump(AF_INET6)[:200]
    dump = RouteDump(SEQ)
    assert all(dump.feed(c) == [] for c in chunked(random.Random(2), msgs))
    assert len(dump.columns(AF_INET6)) == 0  # held back: nothing processed yet
    assert dump.feed(done()) == [(200, done())]
    assert len(dump.columns(AF_INET6)) == 200


def test_flush_without_end() -> None:
    msgs = common_dump(AF_INET)[:100]
    dump = RouteDump(SEQ)
    for chunk in chunked(random.Random(4), msgs):
        assert dump.feed(chunk) == []
    assert dump.flush() == []
    assert sorted(dump.columns(AF_INET).ordinal.tolist()) == list(range(100))
    assert dump.flush() == []
    assert RouteDump(SEQ).flush() == []
    empty = RouteDump(SEQ)
    assert empty.feed(b"") == []
    assert empty.flush() == []
    assert len(empty.columns(AF_INET)) == 0


# -- 4. ordinals and concatenation -------------------------------------------------------


def in_order(cols: RouteColumns) -> RouteColumns:
    """The rows sorted by ordinal (RouteDump groups the rows of a batch by layout)."""
    order = np.argsort(cols.ordinal, kind="stable")
    return RouteColumns(cols.family, *(getattr(cols, name)[order] for name in FIELDS))


def _same(a: RouteColumns, b: RouteColumns) -> None:
    assert a.family == b.family
    for name in FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert np.array_equal(x, y), name


@pytest.mark.parametrize("family", [AF_INET, AF_INET6], ids=["v4", "v6"])
def test_first_ordinal_and_concat(family: int) -> None:
    msgs = common_dump(family)
    rng = random.Random(family + 1)
    whole, _ = run(chunked(rng, msgs), batch=DEFAULT_BATCH)
    one = in_order(whole.columns(family))
    assert one.ordinal.tolist() == list(range(len(msgs)))

    # in small batches: the dump's columns are the concatenation of many parts
    small, _ = run(chunked(rng, msgs), batch=2048)
    _same(in_order(small.columns(family)), one)

    # three dumps in a row, each starting where the previous one ended
    parts, first = [], 0
    for lo, hi in ((0, 400), (400, 401), (401, len(msgs))):
        dump, unclaimed = run(chunked(rng, msgs[lo:hi]), batch=DEFAULT_BATCH, first=first)
        assert unclaimed == []
        check(dump, unclaimed, msgs[lo:hi], family, first=first)
        assert dump.next_ordinal == hi
        parts.append(dump.columns(family))
        first = dump.next_ordinal
    joined = RouteColumns.concat(family, parts)
    _same(in_order(joined), one)
    assert RouteColumns.concat(family, parts[:1]) is parts[0]
    # the parts follow each other: rows of a later part come after those of an earlier one
    assert [int(p.ordinal.min()) for p in parts] == [0, 400, 401]
    assert np.array_equal(joined.ordinal[:len(parts[0])], parts[0].ordinal)


def test_first_ordinal_offsets_unclaimed_too() -> None:
    msgs, _ = mixed_dump(AF_INET)
    msgs = msgs[:500] + msgs[-1:]
    base = 1_000_000
    dump, unclaimed = run(chunked(random.Random(6), msgs), batch=2048, first=base)
    check(dump, unclaimed, msgs, AF_INET, first=base)
    assert unclaimed[-1] == (base + len(msgs) - 1, done())


@pytest.mark.parametrize("family", [AF_INET, AF_INET6])
def test_concat_of_nothing(family: int) -> None:
    empty = RouteColumns.concat(family, [])
    assert len(empty) == 0
    assert empty.family == family
    assert empty.dst.shape == (0, ADDR_LEN[family])
    _same(RouteDump(SEQ).columns(family), empty)


# -- layouts of other forms do not use up the layouts tried ----------------------------


def test_unclaimable_leads_do_not_starve_the_common_form() -> None:
    rng = random.Random(10)
    connected = [
        route_msg(AF_INET, 24, [u32(RTA_TABLE, 254), attr(RTA_DST, masked(rng, AF_INET, 24)),
                                attr(RTA_PREFSRC, addr(rng, AF_INET)), u32(RTA_OIF, 2)],
                  protocol=2, scope=253)
        for _ in range(8)
    ]
    over_objects = [
        route_msg(AF_INET, 24, [u32(RTA_TABLE, 254), attr(RTA_DST, masked(rng, AF_INET, 24)),
                                u32(RTA_PRIORITY, 20), u32(RTA_NH_ID, 1001)], protocol=186)
        for _ in range(200)
    ]
    assert {len(m) for m in connected} == {len(m) for m in over_objects}
    msgs = [*connected, *over_objects, done()]
    dump, unclaimed = run([b"".join(msgs)], batch=DEFAULT_BATCH)
    claimed = check(dump, unclaimed, msgs, AF_INET)
    assert claimed == set(range(8, 208))


def test_rows_are_grouped_by_layout_and_carry_their_ordinal() -> None:
    msgs = [_v4("gw"), _v4(), _v4("gw"), done()]  # two lengths in one batch
    dump, unclaimed = run([b"".join(msgs)], batch=DEFAULT_BATCH)
    assert check(dump, unclaimed, msgs, AF_INET) == {0, 1, 2}
    assert sorted(dump.columns(AF_INET).ordinal.tolist()) == [0, 1, 2]


def test_a_batch_and_its_arrays_stay_under_the_daemons_mmap_threshold() -> None:
    # a batch closes once it holds BATCH bytes, so it may hold one more received
    # buffer (the kernel's dump buffers are 32 KiB at most)
    from fibsync import process
    from fibsync.netlink import columns

    assert columns.BATCH + (32 << 10) <= process.MMAP_THRESHOLD


@pytest.mark.parametrize("family", [AF_INET, AF_INET6], ids=["v4", "v6"])
def test_the_columns_of_many_batches_are_joined_in_dump_order(
        family: int, monkeypatch: pytest.MonkeyPatch) -> None:
    from fibsync.netlink import columns

    monkeypatch.setattr(columns, "MERGE", 3)  # a full table's dump joins every 64 batches
    msgs, _ = mixed_dump(family)
    dump, unclaimed = run(chunked(random.Random(7), msgs), batch=512)
    check(dump, unclaimed, msgs, family)
    assert len(dump._merged[family]) >= 2  # joined more than once, the rest still apart
