"""Seeded random kernel changes, as `ip -batch` lines, over a small fixed world.

The world: links e0..e3 (veth ends whose peers p0..p3 stay in the same
namespace), each with an IPv4 /26 and an IPv6 /64, gateways on each, kernel
nexthop objects and groups, routes in the main table and in tables 100 and
200. The generator mixes:

- route replaces and deletes: unicast via a gateway, via a link, via a
  nexthop object, multipath with weights, IPv4 via an IPv6 next hop
  (RFC 5549, alone and inside multipath), blackhole, unreachable, prohibit,
  throw, several metrics; IPv4 aliases appended and prepended;
- IPv6 ECMP built by appending siblings and deleting them one by one (on
  prefixes of their own: appending a sibling beside a route of another kind
  makes the kernel keep both side by side, which no routing daemon does);
- nexthop objects (IPv4 and IPv6 gateways, blackholes) and weighted groups;
- neighbours: replaced in every state, flushed;
- what the kernel follows with silent removals: links set down and up, peers
  set down and up (carrier loss), a link's IPv4 addresses removed (the last
  one goes: every IPv4 path over the link dies) and added back, links deleted
  and created again; and link MTU and MAC changes.

Many lines fail on purpose (deleting what is not there, a group with a
missing member): `ip -force -batch` goes on, as a busy router's control plane
would. No line may make iproute2 exit (``neigh del`` of a missing entry does,
so neighbours go with ``neigh flush``): ``lines()`` ends with a marker the
test checks, so a batch cut short cannot pass unnoticed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

LINKS = 4
MARKER = "10.255.255.254/32"
MARKER_TABLE = 250


@dataclass(frozen=True)
class World:
    links: tuple[str, ...] = tuple(f"e{i}" for i in range(LINKS))

    def v4_addr(self, link: int, host: int) -> str:
        return f"192.0.2.{link * 64 + host}"

    def v6_addr(self, link: int, host: int) -> str:
        return f"2001:db8:e{link}::{host:x}"

    def addresses(self, link: int) -> list[str]:
        name = self.links[link]
        return [f"addr replace {self.v4_addr(link, 1)}/26 dev {name}",
                f"addr replace {self.v6_addr(link, 1)}/64 dev {name} nodad"]

    def create(self, link: int) -> list[str]:
        name = self.links[link]
        return [f"link add {name} type veth peer name p{link}", f"link set {name} up",
                f"link set p{link} up", *self.addresses(link)]

    def setup(self) -> list[str]:
        lines = ["link set lo up"]
        for i in range(LINKS):
            lines += self.create(i)
        return lines


@dataclass
class _State:
    """What the generator changed and must put back at the end."""

    down: set[int] = field(default_factory=set)
    peer_down: set[int] = field(default_factory=set)
    no_v4: set[int] = field(default_factory=set)


class Churn:
    def __init__(self, seed: int, world: World | None = None,
                 tables: tuple[str, ...] = ("main", "100", "200")) -> None:
        self.rng = random.Random(seed)
        self.world = world or World()
        self.tables = tables
        self.state = _State()
        self.v4_prefixes = [f"198.18.{i}.0/24" for i in range(64)] + \
            [f"198.19.{i * 16}.0/20" for i in range(8)] + [f"198.18.200.{i}/32" for i in range(8)]
        self.v6_prefixes = [f"2001:db8:{0x1000 + i:x}::/48" for i in range(48)] + \
            [f"2001:db8:2000::{i:x}/128" for i in range(8)]
        # IPv6 ECMP built sibling by sibling, only ever with gateway routes
        self.v6_ecmp_prefixes = [f"2001:db8:{0x3000 + i:x}::/48" for i in range(12)]

    # ------------------------------------------------------------ pieces

    def _link(self) -> int:
        return self.rng.randrange(LINKS)

    def _gw4(self, link: int | None = None) -> tuple[str, str]:
        link = self._link() if link is None else link
        return self.world.v4_addr(link, self.rng.randint(2, 9)), self.world.links[link]

    def _gw6(self, link: int | None = None) -> tuple[str, str]:
        link = self._link() if link is None else link
        return self.world.v6_addr(link, self.rng.randint(2, 9)), self.world.links[link]

    def _table(self) -> str:
        t = self.rng.choice(self.tables)
        return "" if t == "main" else f" table {t}"

    def _metric(self, v6: bool) -> str:
        return self.rng.choice(["", "", "", " metric 10", " metric 20"]) if not v6 else \
            self.rng.choice(["", "", " metric 10", " metric 20"])

    def _nh_single(self) -> int:
        return self.rng.randrange(1000, 1032)

    def _nh_group(self) -> int:
        return self.rng.randrange(1100, 1112)

    def _hop(self, v6: bool) -> str:
        if not v6 and self.rng.random() < 0.15:
            addr, dev = self._gw6()
            return f"nexthop via inet6 {addr} dev {dev} weight {self.rng.randint(1, 4)}"
        addr, dev = (self._gw6 if v6 else self._gw4)()
        return f"nexthop via {addr} dev {dev} weight {self.rng.randint(1, 4)}"

    def _target(self, v6: bool) -> str:
        gw = self._gw6 if v6 else self._gw4
        kind = self.rng.random()
        if kind < 0.30:
            addr, dev = gw()
            return f"via {addr} dev {dev}"
        if kind < 0.55:
            return f"nhid {self.rng.choice([self._nh_single(), self._nh_group()])}"
        if kind < 0.75:
            return " ".join(self._hop(v6) for _ in range(self.rng.randint(2, 3)))
        if kind < 0.82 and not v6:
            # RFC 5549: an IPv4 route via an IPv6 next hop
            addr, dev = self._gw6()
            return f"via inet6 {addr} dev {dev}"
        if kind < 0.88:
            return f"dev {self.world.links[self._link()]}"
        addr, dev = gw()
        return f"via {addr} dev {dev}"

    # ------------------------------------------------------------ changes

    def step(self) -> list[str]:
        r = self.rng.random()
        v6 = self.rng.random() < 0.4
        # `ip -batch` lines take no options (a "-6" would fail the line): the prefix's
        # family selects IPv6
        prefixes = self.v6_prefixes if v6 else self.v4_prefixes
        prefix = self.rng.choice(prefixes)
        if r < 0.36:
            return [f"route replace {prefix}{self._table()}{self._metric(v6)} "
                    f"{self._target(v6)}"]
        if r < 0.42:
            kind = self.rng.choice(["blackhole", "unreachable", "prohibit", "throw"])
            return [f"route replace {kind} {prefix}{self._table()}{self._metric(v6)}"]
        if r < 0.52:
            return [f"route del {prefix}{self._table()}{self._metric(v6)}"]
        if r < 0.54 and not v6:
            # a second IPv4 alias under the same key, after or before the first
            verb = self.rng.choice(["append", "prepend"])
            return [f"route {verb} {prefix}{self._table()}{self._metric(v6)} "
                    f"{self._target(v6)}"]
        if r < 0.58:
            return self._ecmp6()
        if r < 0.65:
            nid = self._nh_single()
            if self.rng.random() < 0.1:
                return [f"nexthop replace id {nid} blackhole"]
            addr, dev = (self._gw6 if self.rng.random() < 0.3 else self._gw4)()
            return [f"nexthop replace id {nid} via {addr} dev {dev}"]
        if r < 0.70:
            members = self.rng.sample(range(1000, 1032), self.rng.randint(1, 4))
            spec = "/".join(f"{m},{self.rng.randint(1, 8)}" for m in members)
            return [f"nexthop replace id {self._nh_group()} group {spec}"]
        if r < 0.73:
            return [f"nexthop del id {self.rng.choice([self._nh_single(), self._nh_group()])}"]
        if r < 0.90:
            addr, dev = (self._gw6 if v6 else self._gw4)()
            if self.rng.random() < 0.2:
                return [f"neigh flush to {addr} dev {dev} nud all"]
            mac = "02:00:00:" + ":".join(f"{self.rng.randrange(256):02x}" for _ in range(3))
            state = self.rng.choice(["permanent", "reachable", "stale", "noarp"])
            return [f"neigh replace {addr} lladdr {mac} dev {dev} nud {state}"]
        return self._link_event()

    def _ecmp6(self) -> list[str]:
        prefix = self.rng.choice(self.v6_ecmp_prefixes)
        metric = self.rng.choice(["", " metric 10"])
        addr, dev = self._gw6()
        kind = self.rng.random()
        if kind < 0.45:
            return [f"route append {prefix}{metric} via {addr} dev {dev}"]
        if kind < 0.75:
            return [f"route del {prefix}{metric} via {addr} dev {dev}"]
        if kind < 0.9:
            hops = " ".join(self._hop(True) for _ in range(self.rng.randint(2, 3)))
            return [f"route replace {prefix}{metric} {hops}"]
        return [f"route del {prefix}{metric}"]

    def _link_event(self) -> list[str]:
        s = self.state
        impaired = sorted([("down", i) for i in s.down] + [("peer", i) for i in s.peer_down]
                          + [("v4", i) for i in s.no_v4])
        if impaired and self.rng.random() < 0.6:
            # repair more often than not: most of the time a router's links work
            kind, link = self.rng.choice(impaired)
            return self._repair(kind, link)
        link = self._link()
        name = self.world.links[link]
        kind = self.rng.random()
        if kind < 0.35 and link not in s.down:
            s.down.add(link)
            return [f"link set {name} down"]
        if kind < 0.55 and link not in s.peer_down:
            s.peer_down.add(link)
            return [f"link set p{link} down"]
        if kind < 0.75 and link not in s.no_v4:
            s.no_v4.add(link)
            # a secondary goes with the primary (promote_secondaries is off)
            return [f"addr add {self.world.v4_addr(link, 40)}/26 dev {name}",
                    f"addr del {self.world.v4_addr(link, 1)}/26 dev {name}"]
        if kind < 0.85:
            mtu = self.rng.choice([1400, 1500, 9000])
            mac = f"02:aa:00:00:{link:02x}:{self.rng.randrange(256):02x}"
            return [f"link set {name} mtu {mtu}", f"link set {name} address {mac}"]
        if kind < 0.93:
            # RTM_DELLINK: both veth ends go; the link comes back with a new ifindex
            s.down.discard(link)
            s.peer_down.discard(link)
            s.no_v4.discard(link)
            return [f"link del {name}", *self.world.create(link)]
        addr = self.world.v6_addr(link, 1)
        return [f"addr del {addr}/64 dev {name}", self.world.addresses(link)[1]]

    def _repair(self, kind: str, link: int) -> list[str]:
        s = self.state
        name = self.world.links[link]
        if kind == "down":
            s.down.discard(link)
            # a link that was down has lost its IPv6 addresses: put them back
            return [f"link set {name} up", self.world.addresses(link)[1]]
        if kind == "peer":
            s.peer_down.discard(link)
            return [f"link set p{link} up"]
        s.no_v4.discard(link)
        return [self.world.addresses(link)[0]]

    def lines(self, count: int) -> list[str]:
        out: list[str] = []
        while len(out) < count:
            out += self.step()
        # leave the world as a router would be after the storm: every link up
        # with its addresses; then the marker
        s = self.state
        for link in sorted(s.down | s.peer_down | s.no_v4):
            name = self.world.links[link]
            out += [f"link set {name} up", f"link set p{link} up",
                    *self.world.addresses(link)]
        self.state = _State()
        out.append(f"route replace {MARKER} dev lo table {MARKER_TABLE}")
        return out
