"""fibsync.watch.xfrm: decoding and judgement of synthesised XFRM policy messages (no root)."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
import struct

import pytest

from fibsync.netlink import rtnl as nl
from fibsync.watch import Condition
from fibsync.watch import xfrm as x
from fibsync.watch.xfrm import Undecodable, XfrmWatch, decode_policy, policy_conditions

AF_INET, AF_INET6 = int(socket.AF_INET), int(socket.AF_INET6)
IN, OUT, FWD = x.XFRM_POLICY_IN, x.XFRM_POLICY_OUT, x.XFRM_POLICY_FWD


def policy(direction: int, family: int = AF_INET, src: str = "10.1.0.0/16",
           dst: str = "10.2.0.0/16", *, proto: int = 0, dport: int = 0, action: int = 0,
           priority: int = 0, sub: bool = False) -> bytes:
    """An XFRM_MSG_NEWPOLICY body as the kernel dumps it (copy_to_user_policy)."""
    def addr(text: str) -> tuple[bytes, int]:
        if family not in (AF_INET, AF_INET6):
            return bytes(16), 0
        net = ipaddress.ip_network(text)
        return net.network_address.packed.ljust(16, b"\0"), net.prefixlen

    daddr, plen_d = addr(dst)
    saddr, plen_s = addr(src)
    sel = x.XFRM_SELECTOR.pack(daddr, saddr, struct.pack("!H", dport),
                               b"\xff\xff" if dport else b"\0\0", b"\0\0", b"\0\0",
                               family, plen_d, plen_s, proto, 0, 0)
    body = x.XFRM_USERPOLICY_INFO.pack(sel, bytes(64), bytes(32), priority, 8 + direction,
                                       direction, action, 0, 0)
    tmpl = nl.attr(5, bytes(64))  # XFRMA_TMPL: one struct xfrm_user_tmpl
    ptype = nl.attr(x.XFRMA_POLICY_TYPE, bytes([x.XFRM_POLICY_TYPE_SUB if sub else 0, 0, 0, 0]))
    return body + tmpl + ptype


def test_layouts_match_the_kernel() -> None:
    # sizeof(struct xfrm_selector), sizeof(struct xfrm_userpolicy_info) on x86_64
    assert (x.XFRM_SELECTOR.size, x.XFRM_USERPOLICY_INFO.size) == (56, 168)


CASES: list[tuple[str, bytes, list[tuple[int, str]]]] = [
    ("fwd policy of IPv4",
     policy(FWD, proto=6, dport=80),
     [(AF_INET, "xfrm policy fwd src 10.1.0.0/16 dst 10.2.0.0/16 proto tcp dport 80 "
                "(action allow, priority 0)")]),
    ("out policy of IPv6, blocking, sub policy",
     policy(OUT, AF_INET6, "2001:db8::/32", "::/0", action=x.XFRM_POLICY_BLOCK, priority=7,
            sub=True),
     [(AF_INET6, "xfrm policy out src 2001:db8::/32 dst ::/0 proto any "
                 "(action block, priority 7, sub policy)")]),
    ("in policy: local delivery only", policy(IN), []),
    ("socket policy (XFRM_POLICY_MAX + out)", policy(3 + OUT), []),
    ("selector family AF_UNSPEC: both families",
     policy(OUT, socket.AF_UNSPEC),
     [(0, "xfrm policy out src ? dst ? proto any (action allow, priority 0)")]),
]


@pytest.mark.parametrize("raw,expected", [(r, e) for _, r, e in CASES],
                         ids=[name for name, _, _ in CASES])
def test_policy_conditions(raw: bytes, expected: list[tuple[int, str]]) -> None:
    found, unknown = policy_conditions([decode_policy(raw)], None)
    assert found == sorted(Condition("xfrm", family, 0, detail) for family, detail in expected)
    assert unknown == 0


def test_unknown_selector_family_counts_for_both() -> None:
    found, unknown = policy_conditions([decode_policy(policy(FWD, 99))], None)
    assert [(c.kind, c.family, c.ifindex) for c in found] == [("xfrm", 0, 0)]
    assert unknown == 1


@pytest.mark.parametrize("default,expected", [
    (bytes([2, 2, 2]), []),
    (bytes([1, 2, 2]), []),  # in: local delivery only
    (bytes([2, 1, 2]), ["default xfrm policy for fwd is block"]),
    (bytes([2, 2, 1]), ["default xfrm policy for out is block"]),
    (bytes([1, 1, 1]), ["default xfrm policy for fwd is block",
                        "default xfrm policy for out is block"]),
    (None, []),  # a kernel without default policies
], ids=["accept", "in-block", "fwd-block", "out-block", "all-block", "none"])
def test_default_policies(default: bytes | None, expected: list[str]) -> None:
    found, _ = policy_conditions([], default)
    assert found == [Condition("xfrm", 0, 0, detail) for detail in expected]


def test_truncated_policy_is_undecodable() -> None:
    with pytest.raises(Undecodable):
        decode_policy(policy(OUT)[:100])


def test_expiry_of_an_sa_is_not_relevant_but_of_a_policy_is() -> None:
    watch = XfrmWatch(None, lambda: None)

    def datagram(*kinds: int) -> bytes:
        return b"".join(nl.NLMSGHDR.pack(20, kind, 0, 0, 0) + bytes(4) for kind in kinds)

    with socket.socket() as sock:
        assert not watch._relevant(sock, datagram(x.XFRM_MSG_EXPIRE))
        assert watch._relevant(sock, datagram(x.XFRM_MSG_EXPIRE, x.XFRM_MSG_POLEXPIRE))
        assert watch._relevant(sock, datagram(x.XFRM_MSG_NEWPOLICY))


def test_a_kernel_without_xfrm_is_ready_with_no_conditions(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def no_xfrm(protocol: int, groups: object, rcvbuf: int = 0) -> socket.socket:
        raise OSError(errno.EPROTONOSUPPORT, "Protocol not supported")

    monkeypatch.setattr(x, "subscribe", no_xfrm)

    async def scenario() -> None:
        watch = XfrmWatch(None, lambda: None)
        task = asyncio.create_task(watch.run())
        try:
            await asyncio.wait_for(watch.ready.wait(), 2)
            assert watch.conditions() == []
            assert watch.stats["unsupported"] == 1 and watch.stats["errors"] == 0
            await asyncio.sleep(0.05)
            assert not task.done()  # it waits to be cancelled, as every watcher
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())
