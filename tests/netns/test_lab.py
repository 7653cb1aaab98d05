"""The lab itself: topology, FRR and BIRD in namespaces, teardown after crashes."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable

import pytest

from fibsync.lab import (
    BgpNeighbor,
    Bird,
    Frr,
    Lab,
    Netns,
    bgpd_config,
    pid_alive,
    subnets,
    veth,
    wait_until,
)

pytestmark = pytest.mark.privileged


def ping(ns: Netns, source: object, destination: object) -> bool:
    result = ns.run(["ping", "-c", "1", "-W", "1", "-I", str(source), str(destination)],
                    check=False)
    return result.returncode == 0


def lab_pids(lab: Lab) -> list[int]:
    return [pid for ns in lab.namespaces for pid in ns.pids()] + list(lab.frr.pids().values())


def assert_gone(lab: Lab, pids: list[int]) -> None:
    assert [ns.name for ns in lab.namespaces if ns.exists()] == []
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"{lab.name}-" not in listed
    assert [pid for pid in pids if pid_alive(pid)] == []
    assert not lab.rundir.exists()
    assert lab.status()["up"] is False


def test_hosts_reach_each_other_across_the_router(lab: Lab) -> None:
    pairs = [(lab.h1, lab.h1_lan_v4, lab.h2_lan_v4), (lab.h1, lab.h1_lan_v6, lab.h2_lan_v6),
             (lab.h2, lab.h2_lan_v4, lab.h1_lan_v4), (lab.h2, lab.h2_lan_v6, lab.h1_lan_v6)]
    for ns, source, destination in pairs:
        assert ping(ns, source.ip, destination.ip), f"{source} -> {destination} from {ns}"


def test_the_router_counts_what_it_forwards_and_the_toggle_stops_it(lab: Lab) -> None:
    """kernel_forwarded() is what tests read to prove XDP carried traffic: it must see
    every packet the router's kernel forwards, and nothing when it forwards nothing."""
    flows = ((lab.h1_lan_v4.ip, lab.h2_lan_v4.ip, 0), (lab.h1_lan_v6.ip, lab.h2_lan_v6.ip, 1))
    for source, destination, index in flows:
        before = lab.r.kernel_forwarded()
        assert ping(lab.h1, source, destination)
        after = lab.r.kernel_forwarded()
        assert after[index] - before[index] == 2, (before, after)  # the echo and its reply
        assert after[1 - index] == before[1 - index]
    lab.set_forwarding(False)
    assert lab.status()["forwarding"] == {"ipv4": False, "ipv6": False}
    before = lab.r.kernel_forwarded()
    for source, destination, _ in flows:
        assert not ping(lab.h1, source, destination)
    assert lab.r.kernel_forwarded() == before
    lab.set_forwarding(True)
    for source, destination, _ in flows:
        assert ping(lab.h1, source, destination)


def test_frr_installs_static_routes_through_nexthop_objects(lab: Lab) -> None:
    nexthops = {nh["id"]: nh for nh in lab.r.ip_json("nexthop", "show")}
    routes = {rt["dst"]: rt for family in ("-4", "-6")
              for rt in lab.r.ip_json(family, "route", "show")}
    assert len(lab.static_routes) == 4
    for static in lab.static_routes:
        route = routes[str(static.prefix)]
        assert "nhid" in route, route
        nexthop = nexthops[route["nhid"]]
        members = [nexthops[m["id"]] for m in nexthop["group"]] if static.ecmp else [nexthop]
        assert sorted(m["gateway"] for m in members) == sorted(str(g) for g in static.gateways)
    assert any(static.ecmp for static in lab.static_routes)


def test_every_veth_end_has_gro_on(lab: Lab) -> None:
    ends = [(lab.r, link.router_if) for link in lab.links]
    ends += [(lab.h1, lab.h1_link.host_if)] + [(lab.h2, link.host_if) for link in lab.h2_links]
    for ns, ifname in ends:
        features = ns.run(["ethtool", "-k", ifname]).stdout
        assert "generic-receive-offload: on" in features, f"{ns} {ifname}"


def test_status_names_what_tests_need(lab: Lab) -> None:
    status = lab.status()
    assert status["up"] is True, status["problems"]
    assert status["router"] == lab.r.name
    assert status["router_interfaces"] == lab.router_interfaces == ["r-h1", "r-h2a", "r-h2b"]
    assert set(status["daemons"]) == {"zebra", "staticd"}
    links = {link["ifname"] for link in lab.r.ip_json("link", "show")}
    assert set(lab.router_interfaces) <= links


def test_second_up_changes_nothing(lab: Lab) -> None:
    before = (lab.frr.pids(), [ns.inode() for ns in lab.namespaces])
    lab.up()
    assert (lab.frr.pids(), [ns.inode() for ns in lab.namespaces]) == before
    assert lab.status()["up"] is True


def test_down_leaves_no_namespace_and_no_process(unique_prefix: str) -> None:
    lab = Lab(unique_prefix)
    try:
        lab.up()
        stray = lab.r.popen(["sleep", "300"])
        # `ip netns exec` enters the namespace a moment after it starts
        wait_until(lambda: stray.pid in lab_pids(lab), timeout=5, what="sleep in the namespace")
        pids = lab_pids(lab)
        assert len(lab.frr.pids()) == 2
        lab.down()
        stray.wait(timeout=5)
        assert_gone(lab, pids)
        lab.down()
    finally:
        lab.down()


def simulate_crash(lab: Lab) -> None:
    """zebra dies hard and a veth disappears, as if a test crashed halfway."""
    os.kill(lab.frr.pids()["zebra"], signal.SIGKILL)
    wait_until(lambda: "zebra" not in lab.frr.pids(), timeout=5, what="zebra to die")
    lab.r.ip("link", "del", lab.h2_links[0].router_if)


def test_down_after_a_crash_from_the_name_alone(unique_prefix: str) -> None:
    lab = Lab(unique_prefix)
    try:
        lab.up()
        stray = lab.h1.popen(["sleep", "300"])
        simulate_crash(lab)
        pids = lab_pids(lab)
        assert "staticd" in lab.frr.pids() and stray.pid in pids
        problems = lab.status()["problems"]
        assert "zebra not running" in problems and f"{lab.r}: r-h2a missing" in problems

        Lab(unique_prefix).down()
        stray.wait(timeout=5)
        assert_gone(lab, pids)
    finally:
        lab.down()


def test_up_rebuilds_a_half_built_lab(lab: Lab) -> None:
    simulate_crash(lab)
    assert lab.status()["up"] is False
    lab.up()
    assert lab.status()["up"] is True
    assert ping(lab.h1, lab.h1_lan_v4.ip, lab.h2_lan_v4.ip)


def test_bgp_peers_exchange_ipv4_and_ipv6_prefixes(
        netns_factory: Callable[[str], Netns], frr_factory: Callable[[Netns], Frr]) -> None:
    a, b = netns_factory("a"), netns_factory("b")
    veth(a, "a-b", b, "b-a")
    addresses = {a: ("192.0.2.1/30", "2001:db8:1::1/64"), b: ("192.0.2.2/30", "2001:db8:1::2/64")}
    for ns, ifname in ((a, "a-b"), (b, "b-a")):
        for address in addresses[ns]:
            ns.ip("addr", "add", address, "dev", ifname, "nodad")
    announce = {
        a: subnets("198.51.100.0/24", 4, 28) + subnets("2001:db8:a::/48", 4, 64),
        b: subnets("203.0.113.0/24", 2, 28) + subnets("2001:db8:b::/48", 2, 64),
    }
    peers = {a: [BgpNeighbor("192.0.2.2", 65002), BgpNeighbor("2001:db8:1::2", 65002)],
             b: [BgpNeighbor("192.0.2.1", 65001), BgpNeighbor("2001:db8:1::1", 65001)]}
    frr = {}
    for ns, asn, router_id in ((a, 65001, "192.0.2.1"), (b, 65002, "192.0.2.2")):
        frr[ns] = frr_factory(ns)
        frr[ns].start(("zebra", "bgpd"), bgpd_config(
            asn=asn, router_id=router_id, neighbors=peers[ns], announce=announce[ns]))

    def bgp_routes(ns: Netns) -> dict[str, dict[str, object]]:
        return {rt["dst"]: rt for family in ("-4", "-6")
                for rt in ns.ip_json(family, "route", "show", "proto", "bgp")}

    for receiver, sender in ((b, a), (a, b)):
        expected = set(announce[sender])
        routes = wait_until(lambda r=receiver, e=expected: e <= set(bgp_routes(r))
                            and bgp_routes(r), timeout=60,
                            what=f"{receiver} to learn {sorted(expected)} over BGP")
        assert set(routes) == expected
        for prefix, route in routes.items():
            assert "nhid" in route, route
            if ":" not in prefix:
                assert route["gateway"] == addresses[sender][0].split("/")[0]
    summary = frr[b].vtysh_json("show bgp summary json")
    for afi, peer in (("ipv4Unicast", "192.0.2.1"), ("ipv6Unicast", "2001:db8:1::1")):
        assert summary[afi]["peers"][peer]["state"] == "Established"
        assert summary[afi]["peers"][peer]["pfxRcd"] == 4


def test_bird_exports_a_static_route_into_kernel_tables(
        netns_factory: Callable[[str], Netns], bird_factory: Callable[[Netns], Bird]) -> None:
    ns = netns_factory("bird")
    veth(ns, "b0", ns, "b1")
    ns.ip("addr", "add", "192.0.2.1/24", "dev", "b0")
    ns.ip("addr", "add", "2001:db8::1/64", "dev", "b0", "nodad")
    bird = bird_factory(ns)
    bird.start("""
router id 192.0.2.1;
ipv4 table alt4;
ipv6 table alt6;
protocol device { scan time 1; }
protocol static main_static4 { ipv4; route 203.0.113.0/24 via 192.0.2.2; }
protocol static alt_static4 { ipv4 { table alt4; }; route 198.51.100.0/24 via 192.0.2.2; }
protocol static alt_static6 { ipv6 { table alt6; }; route 2001:db8:20::/64 via 2001:db8::2; }
protocol kernel main4 { ipv4 { export all; import none; }; }
protocol kernel table4 { ipv4 { table alt4; export all; import none; }; kernel table 100; }
protocol kernel table6 { ipv6 { table alt6; export all; import none; }; kernel table 100; }
""")

    def exported(family: str, table: str, prefix: str) -> dict[str, object] | None:
        routes = ns.ip_json(family, "route", "show", "table", table)
        return next((rt for rt in routes if rt["dst"] == prefix), None)

    wanted = [("-4", "main", "203.0.113.0/24", "192.0.2.2"),
              ("-4", "100", "198.51.100.0/24", "192.0.2.2"),
              ("-6", "100", "2001:db8:20::/64", "2001:db8::2")]
    for family, table, prefix, gateway in wanted:
        route = wait_until(lambda f=family, t=table, p=prefix: exported(f, t, p), timeout=15,
                           what=f"BIRD to export {prefix} into table {table}")
        assert route["protocol"] == "bird" and route["gateway"] == gateway, route
    assert exported("-4", "100", "203.0.113.0/24") is None
    assert exported("-4", "main", "198.51.100.0/24") is None
    assert exported("-6", "main", "2001:db8:20::/64") is None
    assert "198.51.100.0/24" in bird.birdc("show route table alt4")
