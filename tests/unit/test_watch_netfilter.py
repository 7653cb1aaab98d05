"""fibsync.watch.netfilter: decoding and judgement of synthesised nftables messages,
the request helpers, and the DumpWatch machinery with a scripted watcher (no root)."""

from __future__ import annotations

import asyncio
import errno
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from fibsync.netlink import rtnl as nl
from fibsync.watch import Condition
from fibsync.watch import netfilter as nf
from fibsync.watch.netfilter import (
    DumpInterrupted,
    DumpWatch,
    Ruleset,
    Snapshot,
    exchange,
    judge_expression,
    legacy_conditions,
    legacy_tables,
    retried,
)

AF_INET, AF_INET6 = int(socket.AF_INET), int(socket.AF_INET6)
LINKS = {"lo": 1, "eth0": 5, "veth0": 7, "veth1": 8}

# ---------------------------------------------------------------- message builders


def be32(value: int) -> bytes:
    return struct.pack("!i" if value < 0 else "!I", value)


def string(text: str) -> bytes:
    return text.encode() + b"\0"


def nest(kind: int, *parts: bytes) -> bytes:
    return nl.attr(kind | nl.NLA_F_NESTED, b"".join(parts))


def message(family: int, *parts: bytes, res_id: int = 1) -> bytes:
    """A payload as the kernel sends it: nfgenmsg, then attributes."""
    return nf.NFGENMSG.pack(family, nf.NFNETLINK_V0, res_id) + b"".join(parts)


def table(family: int, name: str, flags: int = 0) -> bytes:
    return message(family, nl.attr(nf.NFTA_TABLE_NAME, string(name)),
                   nl.attr(nf.NFTA_TABLE_FLAGS, be32(flags)))


def chain(family: int, tname: str, name: str, hook: int | None = None, *,
          policy: int = nf.NF_ACCEPT, ctype: str = "filter", devs: tuple[str, ...] = (),
          prefixes: tuple[str, ...] = (), dev: str | None = None) -> bytes:
    parts = [nl.attr(nf.NFTA_CHAIN_TABLE, string(tname)), nl.attr(nf.NFTA_CHAIN_NAME, string(name))]
    if hook is not None:
        hook_parts = [nl.attr(nf.NFTA_HOOK_HOOKNUM, be32(hook)),
                      nl.attr(nf.NFTA_HOOK_PRIORITY, be32(0))]
        if devs or prefixes:
            hook_parts.append(nest(nf.NFTA_HOOK_DEVS,
                                   *(nl.attr(nf.NFTA_DEVICE_NAME, string(d)) for d in devs),
                                   *(nl.attr(nf.NFTA_DEVICE_PREFIX, string(p)) for p in prefixes)))
        if dev is not None:
            hook_parts.append(nl.attr(nf.NFTA_HOOK_DEV, string(dev)))
        parts += [nest(nf.NFTA_CHAIN_HOOK, *hook_parts),
                  nl.attr(nf.NFTA_CHAIN_POLICY, be32(policy)),
                  nl.attr(nf.NFTA_CHAIN_TYPE, string(ctype))]
    return message(family, *parts)


def expr(name: str, *data: bytes) -> bytes:
    return nest(nf.NFTA_LIST_ELEM, nl.attr(nf.NFTA_EXPR_NAME, string(name)),
                *([nest(nf.NFTA_EXPR_DATA, *data)] if data else []))


def rule(family: int, tname: str, cname: str, handle: int, *exprs: bytes) -> bytes:
    return message(family, nl.attr(nf.NFTA_RULE_TABLE, string(tname)),
                   nl.attr(nf.NFTA_RULE_CHAIN, string(cname)),
                   nl.attr(nf.NFTA_RULE_HANDLE, struct.pack("!Q", handle)),
                   nest(nf.NFTA_RULE_EXPRESSIONS, *exprs))


def flowtable(family: int, tname: str, name: str, devs: tuple[str, ...]) -> bytes:
    return message(family, nl.attr(nf.NFTA_FLOWTABLE_TABLE, string(tname)),
                   nl.attr(nf.NFTA_FLOWTABLE_NAME, string(name)),
                   nest(nf.NFTA_FLOWTABLE_HOOK, nl.attr(nf.NFTA_HOOK_HOOKNUM, be32(0)),
                        nl.attr(nf.NFTA_HOOK_PRIORITY, be32(0)),
                        nest(nf.NFTA_FLOWTABLE_HOOK_DEVS,
                             *(nl.attr(nf.NFTA_DEVICE_NAME, string(d)) for d in devs))))


# what nft(8) emits for common statements
def counter() -> bytes:
    return expr("counter", nl.attr(1, struct.pack("!Q", 0)), nl.attr(2, struct.pack("!Q", 0)))


def verdict(code: int, target: str | None = None) -> bytes:
    inner = [nl.attr(nf.NFTA_VERDICT_CODE, be32(code))]
    if target is not None:
        inner.append(nl.attr(nf.NFTA_VERDICT_CHAIN, string(target)))
    return expr("immediate", nl.attr(nf.NFTA_IMMEDIATE_DREG, be32(nf.NFT_REG_VERDICT)),
                nest(nf.NFTA_IMMEDIATE_DATA, nest(nf.NFTA_DATA_VERDICT, *inner)))


def immediate_data(reg: int, value: bytes) -> bytes:
    return expr("immediate", nl.attr(nf.NFTA_IMMEDIATE_DREG, be32(reg)),
                nest(nf.NFTA_IMMEDIATE_DATA, nl.attr(nf.NFTA_DATA_VALUE, value)))


def payload_load() -> bytes:  # ip saddr -> reg 1
    return expr("payload", nl.attr(1, be32(1)), nl.attr(2, be32(1)), nl.attr(3, be32(12)),
                nl.attr(4, be32(4)))


def payload_set() -> bytes:  # ip ttl set from reg 1
    return expr("payload", nl.attr(nf.NFTA_PAYLOAD_SREG, be32(1)), nl.attr(2, be32(1)),
                nl.attr(3, be32(8)), nl.attr(4, be32(1)))


def meta_load(key: int = 3) -> bytes:
    return expr("meta", nl.attr(2, be32(key)), nl.attr(1, be32(1)))


def meta_set(key: int = 3) -> bytes:
    return expr("meta", nl.attr(2, be32(key)), nl.attr(nf.NFTA_META_SREG, be32(1)))


def cmp(value: bytes = b"\x0a\x00\x00\x00") -> bytes:
    return expr("cmp", nl.attr(1, be32(1)), nl.attr(2, be32(0)),
                nest(3, nl.attr(nf.NFTA_DATA_VALUE, value)))


def lookup(set_name: str, dreg: int | None = None) -> bytes:
    parts = [nl.attr(nf.NFTA_LOOKUP_SET, string(set_name)), nl.attr(2, be32(1))]
    if dreg is not None:
        parts.append(nl.attr(nf.NFTA_LOOKUP_DREG, be32(dreg)))
    return expr("lookup", *parts)


def ct_load() -> bytes:  # ct state -> reg 1
    return expr("ct", nl.attr(2, be32(0)), nl.attr(1, be32(1)))


def plain(name: str) -> bytes:
    return expr(name, nl.attr(1, be32(0)))


def ruleset(*, tables: tuple[bytes, ...] = (), chains: tuple[bytes, ...] = (),
            rules: tuple[bytes, ...] = (), flowtables: tuple[bytes, ...] = ()) -> Ruleset:
    return Ruleset.decode(tables, chains, rules, flowtables)


def kinds_of(conditions: list[Condition]) -> set[tuple[str, int, int]]:
    return {(c.kind, c.family, c.ifindex) for c in conditions}


INET, IP, IP6, NETDEV, BRIDGE, ARP = (nf.NFPROTO_INET, nf.NFPROTO_IPV4, nf.NFPROTO_IPV6,
                                      nf.NFPROTO_NETDEV, nf.NFPROTO_BRIDGE, nf.NFPROTO_ARP)
FWD, PRE, POST, INPUT, OUTPUT = (nf.NF_INET_FORWARD, nf.NF_INET_PRE_ROUTING,
                                 nf.NF_INET_POST_ROUTING, nf.NF_INET_LOCAL_IN,
                                 nf.NF_INET_LOCAL_OUT)

# ---------------------------------------------------------------- judgement, table-driven

CASES: list[tuple[str, dict[str, tuple[bytes, ...]], list[tuple[str, int, int, str]]]] = [
    ("counters-only forward chain is harmless",
     {"tables": (table(INET, "fw"),), "chains": (chain(INET, "fw", "fwd", FWD),),
      "rules": (rule(INET, "fw", "fwd", 2, counter()),
                rule(INET, "fw", "fwd", 3, payload_load(), cmp(), counter(), verdict(nf.NF_ACCEPT)),
                rule(INET, "fw", "fwd", 4, meta_load(), cmp(), counter(),
                     verdict(nf.NFT_CONTINUE)),
                rule(INET, "fw", "fwd", 5, lookup("__set0"), counter(), verdict(nf.NFT_RETURN)))},
     []),
    ("policy drop",
     {"chains": (chain(IP, "fw", "fwd", FWD, policy=nf.NF_DROP),)},
     [("netfilter", AF_INET, 0, "table ip fw, chain fwd (hook forward): policy drop")]),
    ("nat chain, even empty",
     {"chains": (chain(IP, "nat", "post", POST, ctype="nat"),)},
     [("netfilter", AF_INET, 0,
       "table ip nat, chain post (hook postrouting, policy accept): type nat")]),
    ("masquerade in a filter chain",
     {"chains": (chain(IP6, "t", "post", POST),),
      "rules": (rule(IP6, "t", "post", 9, meta_load(), cmp(), plain("masq")),)},
     [("netfilter", AF_INET6, 0,
       "table ip6 t, chain post (hook postrouting, policy accept): rule 1 (handle 9) 'masq'")]),
    ("reject rule names its position",
     {"chains": (chain(INET, "fw", "fwd", FWD),),
      "rules": (rule(INET, "fw", "fwd", 2, counter()),
                rule(INET, "fw", "fwd", 3, counter()),
                rule(INET, "fw", "fwd", 7, meta_load(16), cmp(b"\x06"), plain("reject")))},
     [("netfilter", 0, 0,
       "table inet fw, chain fwd (hook forward, policy accept): rule 3 (handle 7) 'reject'")]),
    ("netdev ingress chain on a device",
     {"chains": (chain(NETDEV, "n", "in", nf.NF_NETDEV_INGRESS, devs=("eth0",), dev="eth0"),),
      "rules": (rule(NETDEV, "n", "in", 4, verdict(nf.NF_DROP)),)},
     [("netfilter", 0, 5,
       "table netdev n, chain in (hook ingress on eth0, policy accept): "
       "rule 1 (handle 4) verdict drop")]),
    ("netdev egress chain: netfilter_egress on its devices",
     {"chains": (chain(NETDEV, "n", "out", nf.NF_NETDEV_EGRESS, devs=("eth0", "veth1"),
                       policy=nf.NF_DROP),)},
     [("netfilter_egress", 0, 5, "table netdev n, chain out (hook egress on eth0): policy drop"),
      ("netfilter_egress", 0, 8, "table netdev n, chain out (hook egress on veth1): policy drop")]),
    ("a device that does not exist has no traffic",
     {"chains": (chain(NETDEV, "n", "in", nf.NF_NETDEV_INGRESS, devs=("nosuch",),
                       policy=nf.NF_DROP),)},
     []),
    ("a wildcard binds every device of its prefix",
     {"chains": (chain(NETDEV, "n", "in", nf.NF_NETDEV_INGRESS, prefixes=("veth",),
                       policy=nf.NF_DROP),)},
     [("netfilter", 0, 7, "table netdev n, chain in (hook ingress on veth0): policy drop"),
      ("netfilter", 0, 8, "table netdev n, chain in (hook ingress on veth1): policy drop")]),
    ("an old kernel names the one device in NFTA_HOOK_DEV only",
     {"chains": (chain(NETDEV, "n", "in", nf.NF_NETDEV_INGRESS, dev="veth0",
                       policy=nf.NF_DROP),)},
     [("netfilter", 0, 7, "table netdev n, chain in (hook ingress on veth0): policy drop")]),
    ("inet ingress: both families on the device",
     {"chains": (chain(INET, "fw", "ing", nf.NF_INET_INGRESS, devs=("eth0",),
                       policy=nf.NF_DROP),)},
     [("netfilter", 0, 5, "table inet fw, chain ing (hook ingress on eth0): policy drop")]),
    ("ip, ip6 and inet families; prerouting too",
     {"chains": (chain(IP, "a", "c", PRE, policy=nf.NF_DROP),
                 chain(IP6, "a", "c", PRE, policy=nf.NF_DROP),
                 chain(INET, "a", "c", PRE, policy=nf.NF_DROP))},
     [("netfilter", 0, 0, "table inet a, chain c (hook prerouting): policy drop"),
      ("netfilter", AF_INET, 0, "table ip a, chain c (hook prerouting): policy drop"),
      ("netfilter", AF_INET6, 0, "table ip6 a, chain c (hook prerouting): policy drop")]),
    ("bridge and arp never see routed packets",
     {"chains": (chain(BRIDGE, "b", "f", FWD, policy=nf.NF_DROP),
                 chain(ARP, "a", "i", 0, policy=nf.NF_DROP))},
     []),
    ("input and output see local traffic only",
     {"chains": (chain(INET, "fw", "in", INPUT, policy=nf.NF_DROP),
                 chain(IP, "fw", "out", OUTPUT, ctype="route"))},
     []),
    ("a dormant table is not registered",
     {"tables": (table(IP, "off", nf.NFT_TABLE_F_DORMANT), table(IP, "on")),
      "chains": (chain(IP, "off", "f", FWD, policy=nf.NF_DROP),)},
     []),
    ("a regular chain is only entered by a jump, which acts itself",
     {"chains": (chain(IP, "t", "base", FWD), chain(IP, "t", "sub")),
      "rules": (rule(IP, "t", "sub", 3, verdict(nf.NF_DROP)),
                rule(IP, "t", "base", 4, verdict(nf.NFT_JUMP, "sub")))},
     [("netfilter", AF_INET, 0,
       "table ip t, chain base (hook forward, policy accept): "
       "rule 1 (handle 4) verdict jump sub")]),
    ("rules are matched to their chain by family, table and name",
     {"chains": (chain(IP, "t", "f", FWD), chain(IP6, "t", "f", FWD)),
      "rules": (rule(IP6, "t", "f", 5, plain("log")),)},
     [("netfilter", AF_INET6, 0,
       "table ip6 t, chain f (hook forward, policy accept): rule 1 (handle 5) 'log'")]),
    ("conntrack: even a ct load may act",
     {"chains": (chain(IP, "t", "f", FWD),),
      "rules": (rule(IP, "t", "f", 2, ct_load(), cmp(b"\x02\x00\x00\x00"),
                     verdict(nf.NF_ACCEPT)),)},
     [("netfilter", AF_INET, 0, "table ip t, chain f (hook forward, policy accept): "
       "rule 1 (handle 2) 'ct' (turns on connection tracking)")]),
    ("a flowtable forwards on its devices",
     {"flowtables": (flowtable(INET, "fw", "ft", ("eth0", "gone")),)},
     [("netfilter", 0, 5, "table inet fw, flowtable ft (hook ingress on eth0): "
       "flows offloaded to it are forwarded by netfilter")]),
    ("an unknown hook of a known family: every packet",
     {"chains": (chain(IP, "t", "x", 9, policy=nf.NF_DROP),)},
     [("netfilter", AF_INET, 0, "table ip t, chain x (hook hook 9): policy drop")]),
    ("an unknown table family: both families, every interface",
     {"chains": (chain(99, "t", "x", 0, policy=nf.NF_DROP),)},
     [("netfilter", 0, 0, "table 99 t, chain x (hook prerouting): policy drop")]),
]


@pytest.mark.parametrize("parts,expected", [(p, e) for _, p, e in CASES],
                         ids=[name for name, _, _ in CASES])
def test_ruleset_conditions(parts: dict[str, tuple[bytes, ...]],
                            expected: list[tuple[str, int, int, str]]) -> None:
    found = ruleset(**parts)
    assert found.conditions(LINKS) == sorted(Condition(*c) for c in expected)
    assert found.undecodable == 0


EXPRESSIONS: list[tuple[str, bytes, str | None]] = [
    ("counter", counter(), None),
    ("cmp", cmp(), None),
    ("bitwise", expr("bitwise", nl.attr(1, be32(1)), nl.attr(2, be32(1))), None),
    ("byteorder", expr("byteorder", nl.attr(1, be32(1)), nl.attr(2, be32(1))), None),
    ("range", expr("range", nl.attr(1, be32(1))), None),
    ("accept", verdict(nf.NF_ACCEPT), None),
    ("continue", verdict(nf.NFT_CONTINUE), None),
    ("return", verdict(nf.NFT_RETURN), None),
    ("break", verdict(nf.NFT_BREAK), None),
    ("immediate loading data", immediate_data(1, b"\x01\x00\x00\x00"), None),
    ("payload load", payload_load(), None),
    ("meta load", meta_load(), None),
    ("lookup in a set", lookup("allowed"), None),
    ("lookup in a data map", lookup("marks", dreg=1), None),
    ("drop", verdict(nf.NF_DROP), "verdict drop"),
    ("queue 3", verdict(3 << 16 | nf.NF_QUEUE), "verdict queue (0x30003)"),
    ("goto", verdict(nf.NFT_GOTO, "other"), "verdict goto other"),
    ("payload set", payload_set(), "'payload' set"),
    ("meta set", meta_set(), "'meta' set"),
    ("ct set", expr("ct", nl.attr(2, be32(3)), nl.attr(nf.NFTA_CT_SREG, be32(1))), "'ct' set"),
    ("verdict map", lookup("vm", dreg=nf.NFT_REG_VERDICT), "'lookup' in verdict map @vm"),
    ("nat", plain("nat"), "'nat'"),
    ("limit", plain("limit"), "'limit'"),
    ("quota", plain("quota"), "'quota'"),
    ("notrack", expr("notrack"), "'notrack'"),
    ("dynset", plain("dynset"), "'dynset'"),
    ("objref", plain("objref"), "'objref'"),
    ("xtables target", plain("target"), "'target'"),
    ("unknown", plain("frobnicate"), "'frobnicate'"),
]


@pytest.mark.parametrize("raw,acts", [(r, a) for _, r, a in EXPRESSIONS],
                         ids=[name for name, _, _ in EXPRESSIONS])
def test_judge_expression(raw: bytes, acts: str | None) -> None:
    ((name, data),) = nf.expressions(nl.attr(nf.NFTA_RULE_EXPRESSIONS, raw)[4:])
    assert judge_expression(name, data) == acts


def test_undecodable_expression_may_act_and_is_counted() -> None:
    broken = expr("immediate", nest(nf.NFTA_IMMEDIATE_DATA))  # no destination register
    found = ruleset(chains=(chain(IP, "t", "f", FWD),),
                    rules=(rule(IP, "t", "f", 6, counter(), broken),))
    assert found.undecodable == 1
    (cond,) = found.conditions(LINKS)
    assert (cond.kind, cond.family, cond.ifindex) == ("netfilter", AF_INET, 0)
    assert "rule 1 (handle 6) 'immediate' undecodable" in cond.detail


def test_undecodable_message_is_the_most_careful_condition() -> None:
    found = ruleset(chains=(nf.NFGENMSG.pack(IP, 0, 1)[:2],
                            message(IP, nl.attr(nf.NFTA_CHAIN_TABLE, string("t")))))
    assert found.undecodable == 2
    assert kinds_of(found.conditions(LINKS)) == {("netfilter", 0, 0)}


def test_owned_tables_only_those_that_act() -> None:
    found = ruleset(tables=(table(IP, "own", nf.NFT_TABLE_F_OWNER),
                            table(IP, "quiet", nf.NFT_TABLE_F_OWNER), table(IP, "plain")),
                    chains=(chain(IP, "own", "f", FWD, policy=nf.NF_DROP),
                            chain(IP, "quiet", "f", FWD),
                            chain(IP, "plain", "f", FWD, policy=nf.NF_DROP)))
    assert found.owned_tables() == {(IP, "own")}


def test_names_devices_only_for_chains_that_act() -> None:
    harmless = chain(NETDEV, "n", "in", nf.NF_NETDEV_INGRESS, devs=("eth0",))
    assert not ruleset(chains=(harmless,)).names_devices()
    dropping = chain(NETDEV, "n", "in", nf.NF_NETDEV_INGRESS, devs=("eth0",), policy=nf.NF_DROP)
    assert ruleset(chains=(dropping,)).names_devices()
    assert not ruleset(chains=(chain(IP, "t", "f", FWD, policy=nf.NF_DROP),)).names_devices()


# ---------------------------------------------------------------- iptables-legacy


def test_legacy_tables(tmp_path: Path) -> None:
    assert legacy_tables(str(tmp_path)) == {}
    (tmp_path / "ip_tables_names").write_text("nat\nfilter\n")
    (tmp_path / "ip6_tables_names").write_text("")
    assert legacy_tables(str(tmp_path)) == {AF_INET: ["filter", "nat"]}
    assert legacy_conditions(legacy_tables(str(tmp_path))) == [
        Condition("netfilter", AF_INET, 0,
                  "iptables-legacy table filter is loaded; its rules cannot be watched"),
        Condition("netfilter", AF_INET, 0,
                  "iptables-legacy table nat is loaded; its rules cannot be watched"),
    ]


# ---------------------------------------------------------------- requests


class FakeSocket:
    """Answers a request with the datagrams the test scripts, under its sequence."""

    def __init__(self, *answers: list[tuple[int, int, bytes]]) -> None:
        self.answers = list(answers)
        self.datagrams: list[bytes] = []

    def send(self, msg: bytes) -> int:
        seq = nl.seq_of(msg)
        answer = self.answers.pop(0)
        self.datagrams = [
            nl.NLMSGHDR.pack(nl.NLMSGHDR.size + len(p), kind, flags, seq, 0) + p
            for kind, flags, p in answer
        ]
        return len(msg)

    def recv_into(self, buf: bytearray) -> int:
        data = self.datagrams.pop(0)
        buf[:len(data)] = data
        return len(data)


DONE = (nl.NLMSG_DONE, nl.NLM_F_MULTI, struct.pack("=i", 0))


def error(code: int) -> tuple[int, int, bytes]:
    return (nl.NLMSG_ERROR, 0, struct.pack("=i", -code) + bytes(16))


def test_exchange_dump() -> None:
    sock = FakeSocket([(100, nl.NLM_F_MULTI, b"a\0\0\0"), (100, nl.NLM_F_MULTI, b"b\0\0\0"), DONE])
    assert exchange(sock, 1, b"", nl.NLM_F_DUMP) == [(100, b"a\0\0\0"), (100, b"b\0\0\0")]  # type: ignore[arg-type]


@pytest.mark.parametrize("answer", [
    [(100, nl.NLM_F_MULTI | nl.NLM_F_DUMP_INTR, b"a\0\0\0"), DONE],
    [error(errno.EBUSY)],
], ids=["NLM_F_DUMP_INTR", "EBUSY"])
def test_exchange_interrupted(answer: list[tuple[int, int, bytes]]) -> None:
    with pytest.raises(DumpInterrupted):
        exchange(FakeSocket(answer), 1, b"", nl.NLM_F_DUMP)  # type: ignore[arg-type]


def test_exchange_error_and_single_answer() -> None:
    with pytest.raises(OSError) as caught:
        exchange(FakeSocket([error(errno.EPERM)]), 1, b"", nl.NLM_F_DUMP)  # type: ignore[arg-type]
    assert caught.value.errno == errno.EPERM
    sock = FakeSocket([(40, 0, b"\x01\x02\x01\0")])
    assert exchange(sock, 40, b"\0\0\0\0") == [(40, b"\x01\x02\x01\0")]  # type: ignore[arg-type]


def test_retried_takes_again_until_consistent() -> None:
    steps: list[Exception | list[list[tuple[int, bytes]]]] = [
        DumpInterrupted(), DumpInterrupted(), [[(1, b"x")]]]
    attempts = iter(steps)

    def take() -> list[list[tuple[int, bytes]]]:
        step = next(attempts)
        if isinstance(step, Exception):
            raise step
        return step

    assert retried(take) == ([[(1, b"x")]], 2)

    def never() -> list[list[tuple[int, bytes]]]:
        raise DumpInterrupted()

    with pytest.raises(OSError) as caught:
        retried(never)
    assert caught.value.errno == errno.EBUSY


# ---------------------------------------------------------------- DumpWatch, scripted


class Scripted(DumpWatch):
    """Notifications come over a socketpair; each dump returns the next script entry."""

    name = "scripted"
    kind = "netfilter"
    DEBOUNCE = 0.05
    MAX_DELAY = 0.3

    def __init__(self, script: Iterator[Snapshot | Exception]) -> None:
        self.changes = 0
        super().__init__(None, self._changed)
        self.script = script
        self.peer: socket.socket | None = None

    def _changed(self) -> None:
        self.changes += 1

    def _open(self) -> list[socket.socket]:
        ours, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        ours.setblocking(False)
        return [ours]

    def _read(self) -> Snapshot:
        step = next(self.script)
        if isinstance(step, Exception):
            raise step
        return step

    def notify(self) -> None:
        assert self.peer is not None
        self.peer.send(nl.NLMSGHDR.pack(16, 100, 0, 0, 0))


A = Condition("netfilter", AF_INET, 0, "a")
B = Condition("netfilter", 0, 3, "b")


async def _until(check: object, timeout: float = 2.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not check():  # type: ignore[operator]
        assert loop.time() < end, "timed out"
        await asyncio.sleep(0.005)


def test_dumpwatch_debounces_and_reports_changes() -> None:
    async def scenario() -> None:
        watch = Scripted(iter([Snapshot([A]), Snapshot([A, B], undecodable=1, retries=2),
                               Snapshot([B, A])]))
        task = asyncio.create_task(watch.run())
        try:
            await asyncio.wait_for(watch.ready.wait(), 2)
            assert watch.conditions() == [A] and watch.changes == 1
            for _ in range(5):  # a burst is one dump
                watch.notify()
                await asyncio.sleep(0.01)
            await _until(lambda: watch.stats["dumps"] == 2)
            await asyncio.sleep(0.15)
            assert watch.stats["dumps"] == 2
            assert watch.stats["notifications"] == 5
            assert watch.conditions() == sorted([A, B]) and watch.changes == 2
            assert (watch.stats["undecodable"], watch.stats["retries"]) == (1, 2)
            watch.notify()  # the same conditions again: no on_change
            await _until(lambda: watch.stats["dumps"] == 3)
            assert watch.changes == 2
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())


def test_dumpwatch_failure_is_the_careful_condition_then_recovers() -> None:
    async def scenario() -> None:
        watch = Scripted(iter([OSError(errno.EPERM, "Operation not permitted"),
                               Snapshot([A])]))
        watch.RETRY_PAUSE = 0.05  # type: ignore[misc]
        task = asyncio.create_task(watch.run())
        try:
            await asyncio.wait_for(watch.ready.wait(), 2)
            (careful,) = watch.conditions()
            assert (careful.kind, careful.family, careful.ifindex) == ("netfilter", 0, 0)
            assert "Operation not permitted" in careful.detail
            assert watch.stats["errors"] == 1
            await _until(lambda: watch.conditions() == [A])
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())


def test_without_nfnetlink_iptables_legacy_is_still_watched(
        monkeypatch: pytest.MonkeyPatch) -> None:
    real = nf.subscribe

    def no_nfnetlink(protocol: int, groups: object, rcvbuf: int = 1 << 20) -> socket.socket:
        if protocol == nf.NETLINK_NETFILTER:
            raise OSError(errno.EPROTONOSUPPORT, "Protocol not supported")
        return real(protocol, groups, rcvbuf)  # type: ignore[arg-type]

    monkeypatch.setattr(nf, "subscribe", no_nfnetlink)
    monkeypatch.setattr(nf, "legacy_tables", lambda: {AF_INET: ["filter"]})

    async def scenario() -> None:
        watch = nf.NetfilterWatch(None, lambda: None)
        task = asyncio.create_task(watch.run())
        try:
            await asyncio.wait_for(watch.ready.wait(), 2)
            assert watch.conditions() == legacy_conditions({AF_INET: ["filter"]})
            assert watch.stats["errors"] == 0
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())


def test_a_base_chain_without_policy_or_type_is_not_harmless() -> None:
    hook = nest(nf.NFTA_CHAIN_HOOK, nl.attr(nf.NFTA_HOOK_HOOKNUM, be32(FWD)))
    found = ruleset(chains=(message(IP, nl.attr(nf.NFTA_CHAIN_TABLE, string("t")),
                                    nl.attr(nf.NFTA_CHAIN_NAME, string("f")), hook),))
    assert found.undecodable == 1
    assert kinds_of(found.conditions(LINKS)) == {("netfilter", 0, 0)}



def test_names_that_are_not_utf8_go_back_to_the_kernel_exactly() -> None:
    raw = b"t\xff"
    name = nf._string(raw + b"\0")
    assert nf._name(name) == raw + b"\0"
    found = ruleset(chains=(message(IP, nl.attr(nf.NFTA_CHAIN_TABLE, raw + b"\0"),
                                    nl.attr(nf.NFTA_CHAIN_NAME, string("f")),
                                    nest(nf.NFTA_CHAIN_HOOK, nl.attr(nf.NFTA_HOOK_HOOKNUM,
                                                                     be32(FWD))),
                                    nl.attr(nf.NFTA_CHAIN_POLICY, be32(nf.NF_ACCEPT)),
                                    nl.attr(nf.NFTA_CHAIN_TYPE, string("filter"))),),
                    rules=(message(IP, nl.attr(nf.NFTA_RULE_TABLE, raw + b"\0"),
                                   nl.attr(nf.NFTA_RULE_CHAIN, string("f")),
                                   nest(nf.NFTA_RULE_EXPRESSIONS, plain("reject"))),))
    assert found.candidates() == {(IP, name, "f")}
    (cond,) = found.conditions(LINKS)
    assert cond.detail == "table ip t\ufffd, chain f (hook forward, policy accept): " \
                          "rule 1 (handle 0) 'reject'"
