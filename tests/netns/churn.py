"""Seeded random kernel changes, as `ip -batch` lines, over a small fixed world.

The world: links e0..e3 (veth ends whose peers p0..p3 stay in the same
namespace), each with an IPv4 /26 and an IPv6 /64, gateways on each, kernel
nexthop objects and groups, routes in the main table and in table 100. The
generator mixes route replaces and deletes (unicast via a gateway, via a
nexthop object, multipath with weights, blackhole, unreachable, prohibit,
several metrics), IPv6 appends and single-sibling deletes, nexthop object and
group changes, neighbour changes and link flaps. Many lines fail on purpose
(deleting what is not there, a group with a missing member): `ip -force -batch`
goes on, as a busy router's control plane would.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

LINKS = 4


@dataclass(frozen=True)
class World:
    links: tuple[str, ...] = tuple(f"e{i}" for i in range(LINKS))

    def v4_addr(self, link: int, host: int) -> str:
        return f"192.0.2.{link * 64 + host}"

    def v6_addr(self, link: int, host: int) -> str:
        return f"2001:db8:e{link}::{host:x}"

    def setup(self) -> list[str]:
        lines = ["link set lo up"]
        for i, name in enumerate(self.links):
            lines += [f"link add {name} type veth peer name p{i}", f"link set {name} up",
                      f"link set p{i} up", f"addr add {self.v4_addr(i, 1)}/26 dev {name}",
                      f"addr add {self.v6_addr(i, 1)}/64 dev {name} nodad"]
        return lines


class Churn:
    def __init__(self, seed: int, world: World | None = None, tables: tuple[str, ...] = ("main",
                 "100")) -> None:
        self.rng = random.Random(seed)
        self.world = world or World()
        self.tables = tables
        self.down: set[int] = set()
        self.v4_prefixes = [f"198.18.{i}.0/24" for i in range(64)] + \
            [f"198.19.{i * 16}.0/20" for i in range(8)] + [f"198.18.200.{i}/32" for i in range(8)]
        self.v6_prefixes = [f"2001:db8:{0x1000 + i:x}::/48" for i in range(48)] + \
            [f"2001:db8:2000::{i:x}/128" for i in range(8)]

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

    def _target(self, v6: bool) -> str:
        gw = self._gw6 if v6 else self._gw4
        kind = self.rng.random()
        if kind < 0.35:
            addr, dev = gw()
            return f"via {addr} dev {dev}"
        if kind < 0.6:
            return f"nhid {self.rng.choice([self._nh_single(), self._nh_group()])}"
        if kind < 0.8:
            hops = []
            for _ in range(self.rng.randint(2, 3)):
                addr, dev = gw()
                hops.append(f"nexthop via {addr} dev {dev} weight {self.rng.randint(1, 4)}")
            return " ".join(hops)
        if kind < 0.85 and not v6:
            # RFC 5549: an IPv4 route via an IPv6 next hop
            addr, dev = self._gw6()
            return f"via inet6 {addr} dev {dev}"
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
        if r < 0.40:
            return [f"route replace {prefix}{self._table()}{self._metric(v6)} "
                    f"{self._target(v6)}"]
        if r < 0.47:
            kind = self.rng.choice(["blackhole", "unreachable", "prohibit"])
            return [f"route replace {kind} {prefix}{self._table()}{self._metric(v6)}"]
        if r < 0.60:
            return [f"route del {prefix}{self._table()}{self._metric(v6)}"]
        if r < 0.64 and v6:
            addr, dev = self._gw6()
            return [f"route append {prefix}{self._metric(v6)} via {addr} dev {dev}"]
        if r < 0.66 and v6:
            addr, dev = self._gw6()
            return [f"route del {prefix}{self._metric(v6)} via {addr} dev {dev}"]
        if r < 0.74:
            nid = self._nh_single()
            if self.rng.random() < 0.1:
                return [f"nexthop replace id {nid} blackhole"]
            addr, dev = (self._gw6 if self.rng.random() < 0.3 else self._gw4)()
            return [f"nexthop replace id {nid} via {addr} dev {dev}"]
        if r < 0.80:
            members = self.rng.sample(range(1000, 1032), self.rng.randint(1, 4))
            spec = "/".join(f"{m},{self.rng.randint(1, 8)}" for m in members)
            return [f"nexthop replace id {self._nh_group()} group {spec}"]
        if r < 0.84:
            return [f"nexthop del id {self.rng.choice([self._nh_single(), self._nh_group()])}"]
        if r < 0.95:
            addr, dev = (self._gw6 if v6 else self._gw4)()
            if self.rng.random() < 0.2:
                return [f"neigh del {addr} dev {dev}"]
            mac = "02:00:00:%02x:%02x:%02x" % tuple(self.rng.randrange(256) for _ in range(3))
            state = self.rng.choice(["permanent", "reachable", "stale", "noarp"])
            return [f"neigh replace {addr} lladdr {mac} dev {dev} nud {state}"]
        link = self._link()
        if link in self.down:
            self.down.discard(link)
            return [f"link set {self.world.links[link]} up"]
        self.down.add(link)
        return [f"link set {self.world.links[link]} down"]

    def lines(self, count: int) -> list[str]:
        out: list[str] = []
        while len(out) < count:
            out += self.step()
        # leave every link up at the end, as a router would be after the storm
        out += [f"link set {self.world.links[i]} up" for i in sorted(self.down)]
        self.down.clear()
        return out
