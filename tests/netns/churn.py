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

import ipaddress
import random
import re
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
        if r < 0.58:
            return self._route(r, v6, prefix)
        if r < 0.65:
            return self._object()
        if r < 0.70:
            return self._group()
        if r < 0.73:
            return self._object_del()
        if r < 0.90:
            return self._neigh(v6)
        return self._link_event()

    def _route(self, r: float, v6: bool, prefix: str) -> list[str]:
        """A route change of kind ``r`` (0 <= r < 0.58) on ``prefix``."""
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
        return self._ecmp6()

    def _object(self) -> list[str]:
        nid = self._nh_single()
        if self.rng.random() < 0.1:
            return [f"nexthop replace id {nid} blackhole"]
        addr, dev = (self._gw6 if self.rng.random() < 0.3 else self._gw4)()
        return [f"nexthop replace id {nid} via {addr} dev {dev}"]

    def _group(self) -> list[str]:
        members = self.rng.sample(range(1000, 1032), self.rng.randint(1, 4))
        spec = "/".join(f"{m},{self.rng.randint(1, 8)}" for m in members)
        return [f"nexthop replace id {self._nh_group()} group {spec}"]

    def _object_del(self) -> list[str]:
        return [f"nexthop del id {self.rng.choice([self._nh_single(), self._nh_group()])}"]

    def _neigh(self, v6: bool) -> list[str]:
        addr, dev = (self._gw6 if v6 else self._gw4)()
        if self.rng.random() < 0.2:
            return [f"neigh flush to {addr} dev {dev} nud all"]
        mac = "02:00:00:" + ":".join(f"{self.rng.randrange(256):02x}" for _ in range(3))
        state = self.rng.choice(["permanent", "reachable", "stale", "noarp"])
        return [f"neigh replace {addr} lladdr {mac} dev {dev} nud {state}"]

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
        return out + self.closing()

    def closing(self) -> list[str]:
        """Leave the world as a router would be after the storm: every link up
        with its addresses; then the marker."""
        out: list[str] = []
        s = self.state
        for link in sorted(s.down | s.peer_down | s.no_v4):
            name = self.world.links[link]
            out += [f"link set {name} up", f"link set p{link} up",
                    *self.world.addresses(link)]
        self.state = _State()
        out.append(f"route replace {MARKER} dev lo table {MARKER_TABLE}")
        return out


# ------------------------------------------------------------------ at scale

# Where the stress generator's prefixes live: inside the benchmark range churn
# already uses for IPv4, and in the documentation range, clear of the links'
# subnets (2001:db8:eN::/64), for IPv6.
STRESS_V4_SPACE = (0xC6120000, 15)  # 198.18.0.0/15
STRESS_V6_SPACE = (0x20010DB8_8000 << 80, 33)  # 2001:db8:8000::/33
_V4_LENGTHS = ((32, 40), (24, 25), (28, 10), (30, 7), (26, 5), (22, 8), (20, 5))
_V6_LENGTHS = ((48, 30), (64, 25), (56, 15), (128, 15), (40, 5), (44, 5), (60, 5))


def prefix_pool(rng: random.Random, family: int, count: int,
                exclude: frozenset[str] = frozenset()) -> list[str]:
    """``count`` distinct prefixes of mixed lengths (nested ones included) in the stress space."""
    base, space = STRESS_V4_SPACE if family == 4 else STRESS_V6_SPACE
    bits = 32 if family == 4 else 128
    lengths, weights = zip(*(_V4_LENGTHS if family == 4 else _V6_LENGTHS), strict=True)
    out: dict[str, None] = {}
    while len(out) < count:
        length = rng.choices(lengths, weights)[0]
        host = rng.getrandbits(bits - space)
        addr = (base | host) >> (bits - length) << (bits - length)
        if family == 4:
            text = ".".join(str(addr >> s & 0xFF) for s in (24, 16, 8, 0)) + f"/{length}"
        else:
            text = f"{ipaddress.IPv6Address(addr)}/{length}"
        if text not in exclude:
            out[text] = None
    return list(out)


class _Bag:
    """A set with O(1) add, discard and random choice."""

    def __init__(self, items: list[str] | None = None) -> None:
        self.items: list[str] = list(items or [])
        self.index = {x: i for i, x in enumerate(self.items)}

    def __len__(self) -> int:
        return len(self.items)

    def __contains__(self, x: str) -> bool:
        return x in self.index

    def add(self, x: str) -> None:
        if x not in self.index:
            self.index[x] = len(self.items)
            self.items.append(x)

    def discard(self, x: str) -> None:
        i = self.index.pop(x, None)
        if i is None:
            return
        last = self.items.pop()
        if i < len(self.items):
            self.items[i] = last
            self.index[last] = i

    def choice(self, rng: random.Random) -> str:
        return self.items[rng.randrange(len(self.items))]


_DEV = re.compile(r"dev e(\d)")
_NHID = re.compile(r"nhid (\d+)")
_OBJ_VIA = re.compile(r"^nexthop replace id (\d+) via (\S+) dev e(\d)$")
_OBJ_BLACKHOLE = re.compile(r"^nexthop replace id (\d+) blackhole$")
_OBJ_GROUP = re.compile(r"^nexthop replace id (\d+) group (\S+)$")
_OBJ_DEL = re.compile(r"^nexthop del id (\d+)$")
_LINK_GONE = re.compile(r"^link (?:set e(\d) down|del e(\d))$")
_V4_GONE = re.compile(r"^addr del 192\.0\.2\.\d+/26 dev e(\d)$")


class StressChurn(Churn):
    """Churn at scale: tens of thousands of prefixes alive at once, a stream of any length.

    Beside everything ``Churn`` does on its small prefix sets, most changes go
    to two large pools of prefixes (``v4`` and ``v6`` of them, mixed lengths,
    nested): routes added, replaced and deleted in equal measure for both
    families, over every kind of target ``Churn`` knows (gateways, links,
    nexthop objects and groups, multipath with weights, RFC 5549), blackhole,
    unreachable, prohibit, throw, in the main table and table 100. Nexthop
    objects and groups are replaced and deleted under the routes; links go
    down and up, lose their IPv4 address, are deleted and created again, about
    ``link_events`` times per 100k changes.

    The generator keeps a model of which of its prefixes the kernel holds
    (what it added, minus what it deleted and what a link or object going away
    took along), so that an add is nearly always a real insertion into the
    kernel's tree and a delete a real removal: an IPv6 dump that resumes while
    the tree changes (the kernel skips a count of nodes) needs both. It keeps
    about ``alive`` of each pool installed; ``prefill()`` installs that share
    and the objects to begin with. The model is a guide, not the reference:
    the tests compare with what the kernel holds.
    """

    def __init__(self, seed: int, world: World | None = None, *, v4: int = 24_000,
                 v6: int = 24_000, alive: float = 0.75, link_events: float = 8) -> None:
        super().__init__(seed, world)
        pools = random.Random(seed * 7919 + 1)
        small = frozenset(self.v4_prefixes + self.v6_prefixes + self.v6_ecmp_prefixes)
        self.pool = {4: prefix_pool(pools, 4, v4, small), 6: prefix_pool(pools, 6, v6, small)}
        self.alive_share = alive
        self.link_rate = link_events / 100_000
        self.live = {4: _Bag(), 6: _Bag()}
        self.dead = {f: _Bag(p) for f, p in self.pool.items()}
        self.key: dict[str, str] = {}  # installed prefix -> its " table T metric M"
        self.deps: dict[str, frozenset[str]] = {}  # installed prefix -> what it runs over
        self.needed: dict[tuple[int, str], set[str]] = {}  # (family, "L1"/"N1005") -> prefixes
        # nexthop object id -> (link, family), link None for a blackhole
        self.objects: dict[int, tuple[int | None, int]] = {}
        self.groups: dict[int, list[int]] = {}
        self.count = 0  # steps taken
        self.repair_due = 0  # step at which the next impaired link is repaired
        self.link_kinds: list[str] = []

    # ------------------------------------------------------------ the model

    def _usable(self, family: int, deps: frozenset[str]) -> bool:
        s = self.state
        for dep in deps:
            n = int(dep[1:])
            if dep[0] == "L":
                if n in s.down or (family == 4 and n in s.no_v4):
                    return False
            elif n in self.groups:
                members = [self.objects.get(m) for m in self.groups[n]]
                if family == 6 and any(m is None or m[1] != 6 for m in members):
                    return False
            elif n not in self.objects or (family == 6 and self.objects[n][1] != 6):
                return False
        return True

    def _forget(self, family: int, prefix: str) -> None:
        if prefix in self.key:
            del self.key[prefix]
            for dep in self.deps.pop(prefix):
                self.needed[(family, dep)].discard(prefix)
        self.live[family].discard(prefix)
        self.dead[family].add(prefix)

    def _remember(self, family: int, prefix: str, key: str, deps: frozenset[str]) -> None:
        self._forget(family, prefix)
        if not self._usable(family, deps):
            return
        self.key[prefix] = key
        self.deps[prefix] = deps
        for dep in deps:
            self.needed.setdefault((family, dep), set()).add(prefix)
        self.dead[family].discard(prefix)
        self.live[family].add(prefix)

    def _kill(self, dep: str, families: tuple[int, ...] = (4, 6)) -> None:
        for family in families:
            for prefix in list(self.needed.get((family, dep), ())):
                self._forget(family, prefix)

    def _object_gone(self, nid: int) -> None:
        self.objects.pop(nid, None)
        self.groups.pop(nid, None)
        self._kill(f"N{nid}")
        for gid, members in list(self.groups.items()):
            if nid in members:
                members.remove(nid)
                if not members:
                    self._object_gone(gid)

    def follow(self, lines: list[str]) -> list[str]:
        """Update the model with what ``lines`` do to objects and links; return them."""
        for line in lines:
            if m := _OBJ_VIA.match(line):
                link = int(m[3])
                if link not in self.state.down:
                    self.objects[int(m[1])] = (link, 6 if ":" in m[2] else 4)
            elif m := _OBJ_BLACKHOLE.match(line):
                if not any(int(m[1]) in g for g in self.groups.values()):
                    self.objects[int(m[1])] = (None, 4)
            elif m := _OBJ_GROUP.match(line):
                members = [int(x.split(",")[0]) for x in m[2].split("/")]
                found = [self.objects.get(x) for x in members]
                if all(f is not None and f[0] is not None for f in found) and \
                        len({f[1] for f in found if f is not None}) == 1:
                    self.groups[int(m[1])] = members
            elif m := _OBJ_DEL.match(line):
                self._object_gone(int(m[1]))
            elif m := _LINK_GONE.match(line):
                link = int(m[1] or m[2])
                self._kill(f"L{link}")
                for nid, (obj_link, _) in list(self.objects.items()):
                    if obj_link == link:
                        self._object_gone(nid)
            elif m := _V4_GONE.match(line):
                self._kill(f"L{m[1]}", (4,))
        return lines

    # ------------------------------------------------------------ changes

    def _install(self, family: int, prefix: str, key: str) -> str:
        v6 = family == 6
        if self.rng.random() < 0.07:
            kind = self.rng.choice(["blackhole", "unreachable", "prohibit", "throw"])
            self._remember(family, prefix, key, frozenset())
            return f"route replace {kind} {prefix}{key}"
        for _ in range(3):
            # an IPv6 route over an IPv4 object fails: draw again (a few still fail)
            target = self._target(v6)
            deps = frozenset([f"L{x}" for x in _DEV.findall(target)] +
                             [f"N{x}" for x in _NHID.findall(target)])
            if self._usable(family, deps):
                break
        self._remember(family, prefix, key, deps)
        return f"route replace {prefix}{key} {target}"

    def _bulk(self, family: int) -> list[str]:
        """Add, replace or delete one prefix of the large pools, keeping about ``alive`` in."""
        live, dead = self.live[family], self.dead[family]
        share = len(live) / len(self.pool[family])
        p_add = min(0.9, max(0.1, 0.4 + 2 * (self.alive_share - share)))
        if dead and (not live or self.rng.random() < p_add):
            table = " table 100" if self.rng.random() < 0.15 else ""
            metric = " metric 10" if self.rng.random() < 0.1 else ""
            return [self._install(family, dead.choice(self.rng), table + metric)]
        prefix = live.choice(self.rng)
        key = self.key[prefix]
        if self.rng.random() < 0.45:
            return [self._install(family, prefix, key)]
        self._forget(family, prefix)
        return [f"route del {prefix}{key}"]

    def step(self) -> list[str]:
        self.count += 1
        s = self.state
        impaired = sorted([("down", i) for i in s.down] + [("peer", i) for i in s.peer_down]
                          + [("v4", i) for i in s.no_v4])
        if impaired and self.count >= self.repair_due:
            # a link stays impaired for a moment, not for the rest of the stream
            self.repair_due = self.count + self.rng.randint(200, 2000)
            return self.follow(self._repair(*self.rng.choice(impaired)))
        r = self.rng.random()
        if r < 0.82:
            return self._bulk(6 if self.rng.random() < 0.5 else 4)
        if r < 0.84:
            return self._ecmp6()
        # an object replace re-announces every route over it (nexthop_compat_mode 1)
        # and costs the kernel milliseconds: a few of them go a long way
        if r < 0.846:
            return self.follow(self._object())
        if r < 0.85:
            return self.follow(self._group())
        if r < 0.8505:
            return self.follow(self._object_del())
        if r < 0.93:
            return self._neigh(self.rng.random() < 0.5)
        if r < 0.93 + self.link_rate:
            if not impaired:
                self.repair_due = self.count + self.rng.randint(200, 2000)
            return self.follow(self._impair())
        v6 = self.rng.random() < 0.5
        prefix = self.rng.choice(self.v6_prefixes if v6 else self.v4_prefixes)
        return self._route(self.rng.random() * 0.58, v6, prefix)

    def _impair(self) -> list[str]:
        """A link event; every kind comes once in each round of six, in a seeded order."""
        if not self.link_kinds:
            self.link_kinds = ["down", "peer", "v4", "mtu", "del", "v6"]
            self.rng.shuffle(self.link_kinds)
        kind = self.link_kinds.pop()
        s = self.state
        link = self._link()
        name = self.world.links[link]
        if kind == "down" and link not in s.down:
            s.down.add(link)
            return [f"link set {name} down"]
        if kind == "peer" and link not in s.peer_down:
            s.peer_down.add(link)
            return [f"link set p{link} down"]
        if kind == "v4" and link not in s.no_v4:
            s.no_v4.add(link)
            return [f"addr add {self.world.v4_addr(link, 40)}/26 dev {name}",
                    f"addr del {self.world.v4_addr(link, 1)}/26 dev {name}"]
        if kind == "mtu":
            mtu = self.rng.choice([1400, 1500, 9000])
            mac = f"02:aa:00:00:{link:02x}:{self.rng.randrange(256):02x}"
            return [f"link set {name} mtu {mtu}", f"link set {name} address {mac}"]
        if kind == "del":
            s.down.discard(link)
            s.peer_down.discard(link)
            s.no_v4.discard(link)
            return [f"link del {name}", *self.world.create(link)]
        if kind == "v6":
            addr = self.world.v6_addr(link, 1)
            return [f"addr del {addr}/64 dev {name}", self.world.addresses(link)[1]]
        return []  # that link is impaired that way already

    def lull_step(self) -> list[str]:
        """A change of a lull: mostly IPv6 prefixes added and deleted, some IPv4, neighbours."""
        r = self.rng.random()
        if r < 0.85:
            return self._bulk(6 if self.rng.random() < 0.7 else 4)
        if r < 0.95:
            return self._neigh(self.rng.random() < 0.5)
        return self.follow(self._object())

    def tree_step(self) -> list[str]:
        """An IPv6 prefix of the large pool deleted (three times in four) or added: a
        change to the tree an IPv6 dump walks, nothing else.

        The kernel's IPv6 dump resumes after a change by skipping as many nodes as
        it had dumped: each node deleted before its cursor makes it skip a live
        one, each one added there makes it repeat one; deletes outnumber adds so
        that skips do not cancel out, and the adds keep the tree changing."""
        live, dead = self.live[6], self.dead[6]
        if dead and (not live or self.rng.random() < 0.25):
            return [self._install(6, dead.choice(self.rng), "")]
        prefix = live.choice(self.rng)
        key = self.key[prefix]
        self._forget(6, prefix)
        return [f"route del {prefix}{key}"]

    def steps(self, count: int, lull: bool = False, tree: bool = False) -> list[str]:
        """About ``count`` lines of changes (without ``closing()``); ``lull``: of a lull;
        ``tree``: only IPv6 adds and deletes (``tree_step``)."""
        step = self.tree_step if tree else self.lull_step if lull else self.step
        out: list[str] = []
        while len(out) < count:
            out += step()
        return out

    def prefill(self) -> list[str]:
        """Objects, groups and ``alive`` of each pool: the table the stream starts from."""
        lines = []
        for i in range(32):
            link = i % LINKS
            addr, dev = (self._gw6 if i >= 24 else self._gw4)(link)
            lines.append(f"nexthop replace id {1000 + i} via {addr} dev {dev}")
        for gid in range(1100, 1112):
            choices = range(1024, 1032) if gid >= 1108 else range(1000, 1024)
            members = self.rng.sample(choices, self.rng.randint(2, 4))
            spec = "/".join(f"{m},{self.rng.randint(1, 8)}" for m in members)
            lines.append(f"nexthop replace id {gid} group {spec}")
        self.follow(lines)
        for family in (4, 6):
            while len(self.live[family]) < self.alive_share * len(self.pool[family]):
                table = " table 100" if self.rng.random() < 0.15 else ""
                lines.append(self._install(family, self.dead[family].choice(self.rng), table))
        return lines
