"""Fidelity (issue 12): each kernel behaviour below gives the same outcome with fibsync as without.

For every case the same UDP probes leave h1 twice (see tests/netns/fidelity.py
for the topology and how frames are sent and caught):

1. with the kernel alone on r, the change applied: the outcome (who receives
   which probe, with which source address; ICMP errors r sends about them)
   must be what the case expects, so that the comparison means something;
2. with fibsync running on r, the change applied while it runs, the probes
   sent within 1 s: the outcome must equal the kernel's, and fibsync must
   have counted the probes under the case's reason while the change held;
3. the change undone: within 1 s plain traffic crosses r in the fast path
   alone again (r's ForwDatagrams and Ip6OutForwDatagrams flat, every packet
   counted under FWD_FAST).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .fidelity import (
    Case,
    Probe,
    Proof,
    Router,
    Topology,
    counter_delta,
    expected,
    fast_path_carries,
    on_router,
    plain_probes,
    send_probes,
    show,
    udp_only,
    wait_conditions,
)

pytestmark = pytest.mark.privileged

H1, H1_6 = "192.0.2.2", "2001:db8:1::2"
VIA_H2, VIA_H2_6 = "203.0.113.130", "2001:db8:ff::1"  # table 100 sends these via h3
VIA_H3, VIA_H3_6 = "203.0.113.10", "2001:db8:ee::1"


def nft(text: str) -> str:
    return "nft -f -\n" + text


CASES = (
    Case("rule_from_lookup_100",
         on_router(f"ip rule add from {H1} lookup 100", f"ip -6 rule add from {H1_6} lookup 100"),
         on_router(f"ip rule del from {H1} lookup 100", f"ip -6 rule del from {H1_6} lookup 100"),
         (Probe(H1, VIA_H2, expect=(("h3", H1),)),
          Probe(H1_6, VIA_H2_6, expect=(("h3", H1_6),)),
          # a source the rule does not select still follows main
          Probe("192.0.2.70", VIA_H2, expect=(("h2", "192.0.2.70"),))),
         reasons=("FWD_RULES", "PASS_RULES")),
    Case("ipv4_ingress_forwarding_off",
         on_router("sysctl -qw net.ipv4.conf.r-h1.forwarding=0"),
         on_router("sysctl -qw net.ipv4.conf.r-h1.forwarding=1"),
         (Probe(H1, VIA_H2), Probe(H1, VIA_H3),
          Probe(H1_6, VIA_H2_6, expect=(("h2", H1_6),), condition=False)),
         reasons=("PASS_FORWARDING_OFF",)),
    Case("ipv6_all_forwarding_off",
         on_router("sysctl -qw net.ipv6.conf.all.forwarding=0"),
         on_router("sysctl -qw net.ipv6.conf.all.forwarding=1"),
         (Probe(H1_6, VIA_H2_6), Probe(H1_6, VIA_H3_6),
          Probe(H1, VIA_H2, expect=(("h2", H1),), condition=False)),
         reasons=("PASS_FORWARDING_OFF",)),
    Case("rp_filter_strict",
         on_router("sysctl -qw net.ipv4.conf.r-h1.rp_filter=1"),
         on_router("sysctl -qw net.ipv4.conf.r-h1.rp_filter=0"),
         # r routes 203.0.113.200 via h2: from h1's side it is spoofed
         (Probe("203.0.113.200", VIA_H3),
          Probe(H1, VIA_H3, expect=(("h3", H1),), condition=False)),
         reasons=("PASS_RP_FILTER",)),
    Case("rp_filter_loose",
         on_router("sysctl -qw net.ipv4.conf.r-h1.rp_filter=2"),
         on_router("sysctl -qw net.ipv4.conf.r-h1.rp_filter=0"),
         # r has no route for 198.51.100.100; loose accepts a route via any interface
         (Probe("198.51.100.100", VIA_H3),
          Probe("203.0.113.200", VIA_H3, expect=(("h3", "203.0.113.200"),), condition=False)),
         reasons=("PASS_RP_FILTER",)),
    Case("nft_masquerade",
         on_router(nft("""table inet fidelity_nat {
             chain post {
                 type nat hook postrouting priority srcnat;
                 oifname "r-h2" masquerade
             }
         }""")),
         on_router("nft delete table inet fidelity_nat"),
         (Probe(H1, VIA_H2, expect=(("h2", "198.51.100.1"),)),
          Probe(H1_6, VIA_H2_6, expect=(("h2", "2001:db8:2::1"),)),
          Probe(H1, VIA_H3, expect=(("h3", H1),))),
         reasons=("PASS_NETFILTER",)),
    Case("nft_forward_drop_port",
         on_router(nft("""table inet fidelity_filter {
             chain forward {
                 type filter hook forward priority 0;
                 udp dport 5001 drop
             }
         }""")),
         on_router("nft delete table inet fidelity_filter"),
         (Probe(H1, VIA_H2, dport=5001), Probe(H1_6, VIA_H2_6, dport=5001),
          Probe(H1, VIA_H2, dport=5002, expect=(("h2", H1),)),
          Probe(H1_6, VIA_H2_6, dport=5002, expect=(("h2", H1_6),))),
         reasons=("PASS_NETFILTER",)),
    # beyond the five
    Case("nft_forward_counter_only",
         on_router(nft("""table inet fidelity_count {
             chain forward {
                 type filter hook forward priority 0; policy accept;
                 counter
             }
         }""")),
         on_router("nft delete table inet fidelity_count"),
         plain_probes(),
         reasons=("FWD_FAST",),
         note="a rule set that cannot change a forwarding decision keeps the fast path"),
    Case("tbf_qdisc_on_egress",
         on_router("tc qdisc add dev r-h2 root tbf rate 1gbit burst 256kb latency 100ms"),
         on_router("tc qdisc del dev r-h2 root"),
         (Probe(H1, VIA_H2, expect=(("h2", H1),)), Probe(H1_6, VIA_H2_6, expect=(("h2", H1_6),)),
          Probe(H1, VIA_H3, expect=(("h3", H1),), condition=False)),
         reasons=("PASS_EGRESS_QDISC",)),
    Case("xfrm_forward_policy_block",
         on_router("ip xfrm policy add src 0.0.0.0/0 dst 203.0.113.128/25 dir fwd action block",
                   "ip xfrm policy add src ::/0 dst 2001:db8:ff::/48 dir fwd action block"),
         on_router("ip xfrm policy flush"),
         (Probe(H1, VIA_H2), Probe(H1_6, VIA_H2_6),
          Probe(H1, VIA_H3, expect=(("h3", H1),))),
         reasons=("PASS_XFRM",)),
    Case("martian_source_of_the_router",
         on_router(), on_router(),
         # r-h2's own address as the source of a packet arriving from h1
         (Probe("198.51.100.1", VIA_H3),),
         reasons=("PASS_MARTIAN_SOURCE",)),
    Case("route_in_table_default",
         on_router("ip route add 203.0.113.64/27 via 198.51.100.6 table default",
                   "ip -6 route add 2001:db8:aa::/48 via 2001:db8:3::2 table default"),
         on_router("ip route del 203.0.113.64/27 table default",
                   "ip -6 route del 2001:db8:aa::/48 table default"),
         # main has no route for these: the kernel consults table default after it
         # IPv6 has no rule for table default: no route, r answers with an ICMPv6 error
         (Probe(H1, "203.0.113.70", expect=(("h3", H1),)), Probe(H1_6, "2001:db8:aa::1")),
         note="fibsync mirrors main; what it cannot find there it must not answer alone"),
    Case("rule_fwmark",
         on_router("ip rule add fwmark 0x1 lookup 100", "ip -6 rule add fwmark 0x1 lookup 100"),
         on_router("ip rule del fwmark 0x1 lookup 100", "ip -6 rule del fwmark 0x1 lookup 100"),
         (Probe(H1, VIA_H2, expect=(("h2", H1),)), Probe(H1_6, VIA_H2_6, expect=(("h2", H1_6),))),
         reasons=("PASS_RULES",)),
    Case("rule_iif",
         on_router("ip rule add iif r-h1 lookup 100", "ip -6 rule add iif r-h1 lookup 100"),
         on_router("ip rule del iif r-h1 lookup 100", "ip -6 rule del iif r-h1 lookup 100"),
         (Probe(H1, VIA_H2, expect=(("h3", H1),)), Probe(H1_6, VIA_H2_6, expect=(("h3", H1_6),))),
         reasons=("PASS_RULES", "FWD_RULES")),
    Case("tc_ingress_redirect",
         on_router("ip link add r-sink type veth peer name r-sinkp",
                   "ip link set r-sink up", "ip link set r-sinkp up",
                   "tc qdisc add dev r-h1 clsact",
                   "tc filter add dev r-h1 ingress protocol ip u32 match u32 0 0 "
                   "action mirred egress redirect dev r-sink",
                   "tc filter add dev r-h1 ingress protocol ipv6 u32 match u32 0 0 "
                   "action mirred egress redirect dev r-sink"),
         on_router("tc qdisc del dev r-h1 clsact", "ip link del r-sink"),
         # tc ingress runs after XDP and before routing: it takes the packets away
         (Probe(H1, VIA_H2), Probe(H1_6, VIA_H2_6)),
         reasons=("PASS_TC_INGRESS",)),
    Case("veth_peer_checksum_offload",
         lambda t: t.hosts["h1"].run(["ethtool", "-K", "h1-r", "tx", "on"]),
         lambda t: t.hosts["h1"].run(["ethtool", "-K", "h1-r", "tx", "off"]),
         (Probe(H1, VIA_H2, expect=(("h2", H1),)), Probe(H1_6, VIA_H2_6, expect=(("h2", H1_6),))),
         reasons=("PASS_CHECKSUM",),
         note="h1's raw frames carry whole checksums: both deliver; fibsync must hand over"),
)


@pytest.fixture
def topo(unique_prefix: str) -> Iterator[Topology]:
    t = Topology(unique_prefix).up()
    try:
        yield t
    finally:
        t.down()



@pytest.mark.parametrize("case", CASES, ids=str)
def test_fibsync_gives_the_kernels_outcome(topo: Topology, router: Router, case: Case) -> None:
    topo.resolve_neighbours()
    case.apply(topo)
    try:
        kernel = send_probes(topo, case)
    finally:
        case.undo(topo)
    assert udp_only(kernel) == expected(case), \
        f"the kernel alone did not do what {case} expects:\n{show(kernel)}"

    router.start()
    fast_path_carries(topo, router)
    before = router.counters()
    baseline = router.conditions()
    case.apply(topo)
    try:
        waited = wait_conditions(router, baseline, changed=True)
        proof = Proof(topo, router)
        got = send_probes(topo, case)
        (forwarded_v4, forwarded_v6), moved = proof.moved()
        counted = counter_delta(before, router.counters())
    finally:
        case.undo(topo)
    print(f"\n{case}: probes sent {waited:.2f} s after the change; fibsync counted {counted}")
    assert got == kernel, (
        f"{case}: fibsync's outcome differs from the kernel's (probes sent {waited:.2f} s "
        f"after the change){f'; {case.note}' if case.note else ''}\n"
        f"kernel alone:\n{show(kernel)}\nwith fibsync:\n{show(got)}\n"
        f"fibsync counters moved: {counted}")
    under_condition = sum(p.count for p in case.probes if p.condition)
    if case.reasons == ("FWD_FAST",):
        assert (forwarded_v4, forwarded_v6) == (0, 0), \
            f"{case}: r's kernel forwarded {forwarded_v4} IPv4, {forwarded_v6} IPv6 packets " \
            f"the fast path should have carried; fibsync counted {moved}"
        assert moved.get("FWD_FAST", 0) >= under_condition, moved
    elif case.reasons:
        hits = sum(counted.get(r, 0) for r in case.reasons)
        assert hits >= under_condition, \
            f"{case}: {hits} packets counted under {'/'.join(case.reasons)}, " \
            f"{under_condition} probes fell under the condition; counters moved: {counted}"

    wait_conditions(router, baseline, changed=False)
    fast_path_carries(topo, router, timeout=0)
