"""FullMapGuard: on a full route map nothing crashes and nothing is misrouted.

The guard (fastpath/guard.py) sits between the RIB and the writer. These tests
drive it with in-memory maps of tiny capacity and read the maps back with the
reader behind ``fibsync routes``: a prefix the map could not take must never
be caught by a written less-specific prefix with a forwarding entry.
"""

from __future__ import annotations

import socket

from hypothesis import given, settings
from hypothesis import strategies as st

from fibsync.fastpath.guard import FullMapGuard
from fibsync.fastpath.writer import MemoryMaps
from fibsync.model import AF_INET, Change, Nexthop, Op, Prefix, Route, RouteType

from .mirror import Mirror, link

NLM_F_REPLACE = 0x100


def route(prefix: str, gw: str) -> Route:
    hop = Nexthop(1, socket.inet_pton(AF_INET, gw), AF_INET, 1)
    return Route(Prefix.parse(prefix), 254, RouteType.UNICAST, 186, 0, 0, 0, (hop,), 0)


class Guarded(Mirror):
    """The unit tests' Mirror behind FullMapGuard, with room for ``capacity`` IPv4 routes."""

    guard: FullMapGuard

    def __init__(self, capacity: int) -> None:
        super().__init__(maps=MemoryMaps(capacity={"routes_v4": capacity}), guard=True)

    def start(self, *routes: Route) -> None:
        self.sync(links=[link(1)], routes=list(routes))

    def change(self, op: Op, r: Route) -> None:
        self.apply(Change(op, r))

    def types(self) -> dict[str, str]:
        return {prefix: e["type"] for prefix, e in self.routes().items()}

    def assert_no_misroute(self) -> None:
        """No forwarding entry in the map covers a prefix the map is missing."""
        written = self.types()
        for missing in (str(p) for p in self.rib.entries if str(p) not in written):
            net = _net(missing)
            for prefix, kind in written.items():
                if kind == "unicast" and net.subnet_of(_net(prefix)):  # type: ignore[arg-type]
                    raise AssertionError(f"{prefix} would forward traffic of missing {missing}")


def _net(text: str):  # type: ignore[no-untyped-def]
    import ipaddress
    return ipaddress.ip_network(text)


def test_a_more_specific_that_does_not_fit_turns_its_cover_into_fib() -> None:
    m = Guarded(capacity=2)
    m.start(route("10.0.0.0/8", "192.0.2.1"), route("172.16.0.0/12", "192.0.2.1"))
    assert m.types() == {"10.0.0.0/8": "unicast", "172.16.0.0/12": "unicast"}

    m.change(Op.ADD, route("10.1.0.0/16", "192.0.2.2"))
    assert m.writer.unwritten == {Prefix.parse("10.1.0.0/16")}
    assert m.types() == {"10.0.0.0/8": "fib", "172.16.0.0/12": "unicast"}
    assert m.guard.demoted == {Prefix.parse("10.0.0.0/8")}
    assert m.guard.episodes == 1
    m.assert_no_misroute()

    # room comes back: the missing prefix goes in and its cover forwards again
    m.change(Op.DEL, route("172.16.0.0/12", "192.0.2.1"))
    assert m.writer.unwritten == set()
    assert m.types() == {"10.0.0.0/8": "unicast", "10.1.0.0/16": "unicast"}
    assert m.guard.demoted == set()


def test_a_route_changed_in_a_batch_that_stopped_at_a_full_map_keeps_no_old_value() -> None:
    # one batch: a new more-specific (written first, longest first) finds no room,
    # and the map's batch stops there; the changed route after it was not written:
    # it must not stay in the map with its old next hop
    m = Guarded(capacity=2)
    m.start(route("10.0.0.0/8", "192.0.2.1"), route("172.16.0.0/12", "192.0.2.1"))
    m.apply(Change(Op.ADD, route("10.1.0.0/16", "192.0.2.2")),
            Change(Op.ADD, route("172.16.0.0/12", "192.0.2.3"), NLM_F_REPLACE))
    held = m.routes()
    changed = held.get("172.16.0.0/12")
    if changed is None:
        assert Prefix.parse("172.16.0.0/12") in m.writer.unwritten
    else:
        assert [h["gateway"] for h in changed["nexthops"]] == ["192.0.2.3"]
    m.assert_no_misroute()


def test_a_cover_added_later_is_written_as_fib() -> None:
    m = Guarded(capacity=2)
    m.start(route("10.1.2.0/24", "192.0.2.1"), route("10.9.0.0/16", "192.0.2.1"))
    m.change(Op.ADD, route("10.1.2.128/25", "192.0.2.2"))  # does not fit
    # a cover appears while the /25 is missing: it must not forward the /25's traffic
    m.change(Op.DEL, route("10.9.0.0/16", "192.0.2.1"))  # room for one: the /25 wins
    m.change(Op.ADD, route("10.1.0.0/16", "192.0.2.3"))
    m.assert_no_misroute()
    assert "10.1.2.128/25" in m.types()


def test_a_deleted_cover_exposes_the_next_one_which_is_fib_already() -> None:
    m = Guarded(capacity=3)
    m.start(route("10.0.0.0/8", "192.0.2.1"), route("10.1.0.0/16", "192.0.2.1"),
           route("10.1.1.0/24", "192.0.2.1"))
    m.change(Op.ADD, route("10.1.1.1/32", "192.0.2.2"))
    assert m.types() == {"10.0.0.0/8": "fib", "10.1.0.0/16": "fib", "10.1.1.0/24": "fib"}
    m.change(Op.DEL, route("10.1.1.0/24", "192.0.2.1"))  # room again: the /32 goes in
    assert m.writer.unwritten == set()
    assert m.types() == {"10.0.0.0/8": "unicast", "10.1.0.0/16": "unicast",
                         "10.1.1.1/32": "unicast"}


def test_unrelated_prefixes_keep_the_fast_path() -> None:
    m = Guarded(capacity=3)
    m.start(route("10.0.0.0/8", "192.0.2.1"), route("192.168.0.0/16", "192.0.2.1"),
           route("0.0.0.0/0", "192.0.2.1"))
    m.change(Op.ADD, route("10.2.0.0/16", "192.0.2.2"))
    types = m.types()
    assert types["192.168.0.0/16"] == "unicast"
    assert types["10.0.0.0/8"] == "fib" and types["0.0.0.0/0"] == "fib"
    m.assert_no_misroute()


def test_a_full_table_sync_into_a_small_map_never_misroutes() -> None:
    routes = [route(f"10.{a}.{b}.0/24", "192.0.2.1") for a in range(4) for b in range(8)]
    routes += [route(f"10.{a}.0.0/16", "192.0.2.2") for a in range(4)]
    routes += [route("10.0.0.0/8", "192.0.2.3"), route("0.0.0.0/0", "192.0.2.4")]
    m = Guarded(capacity=20)
    m.start(*routes)
    assert len(m.maps.maps["routes_v4"]) == 20
    assert m.writer.unwritten
    m.assert_no_misroute()
    for r in routes[:18]:
        m.change(Op.DEL, r)
        m.assert_no_misroute()
    assert m.writer.unwritten == set()
    assert m.guard.demoted == set()
    assert set(m.types().values()) == {"unicast"}


PREFIXES = ["0.0.0.0/0", "10.0.0.0/8", "10.1.0.0/16", "10.1.1.0/24", "10.1.1.128/25",
            "10.1.2.0/24", "10.2.0.0/16", "10.1.1.1/32", "192.168.0.0/16", "192.168.1.0/24"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.sampled_from(PREFIXES), st.integers(1, 3)),
                max_size=40),
       st.integers(1, 6))
def test_any_churn_on_a_small_map_never_misroutes(ops: list[tuple[bool, str, int]],
                                                  capacity: int) -> None:
    m = Guarded(capacity=capacity)
    m.start()
    for add, prefix, gw in ops:
        m.change(Op.ADD if add else Op.DEL, route(prefix, f"192.0.2.{gw}"))
        m.assert_no_misroute()
        # everything the map holds is what the RIB wants, or FIB in its place
        for p, kind in m.types().items():
            assert Prefix.parse(p) in m.rib.entries
            assert kind in ("unicast", "fib")
