"""Differential harness: the same frames through the router's kernel alone, then through fibsync.

Issue 12's promise is that fibsync never forwards worse than Linux. The tests
built on this module prove it the only way that convinces: they send the same
frames across a router twice, once with the kernel alone and once with fibsync
attached, and compare what every host received.

The topology (``Topology``), four namespaces on veth pairs::

      h1  h1-r 192.0.2.2/30      2001:db8:1::2/64         (the sender)
       |  r-h1 192.0.2.1/30      2001:db8:1::1/64
      r   (forwarding on; no FRR: plain kernel routes)
       |  r-h2 198.51.100.1/30   2001:db8:2::1/64   MTU 1400
       |  h2-r 198.51.100.2/30   2001:db8:2::2/64   MTU 1400
      h2
      r
       |  r-h3 198.51.100.5/30   2001:db8:3::1/64
       |  h3-r 198.51.100.6/30   2001:db8:3::2/64
      h3

  r's main table: 203.0.113.128/25 and 2001:db8:ff::/48 via h2,
  203.0.113.0/26 and 2001:db8:ee::/48 via h3, h1's side (192.0.2.64/26,
  192.0.2.128/25, 198.51.100.128/25, 2001:db8:10::/64) via h1, and one
  unreachable, blackhole and prohibit route
  per family; table 100 routes 203.0.113.128/25 and 2001:db8:ff::/48 via h3.
  No ECMP anywhere: the fast path's multipath hash is not the kernel's.

r's ICMP rate limits are off (``ICMP_UNLIMITED``): the ICMP errors it sends about
the frames are part of what is compared, and both runs must send all of them.

Frames are raw Ethernet, sent from an AF_PACKET socket on h1's veth to r's
MAC, and caught by AF_PACKET sockets on every host's veth, opened before the
first frame leaves (``Exchange``). The hosts own no address the probes go to,
and an nftables prerouting chain on each drops every IP packet but neighbour
discovery: hosts never answer, so every frame caught was sent by r.

Sockets are opened from this process by entering a namespace with setns(2)
on the calling thread only (``inside``): a socket stays in the namespace it
was made in, so one thread drives all four hosts without a subprocess.
"""

from __future__ import annotations

import ipaddress
import json
import select
import shutil
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fibsync.config import RUN_DIR
from fibsync.demo import RouterDaemon
from fibsync.lab import RUN_ROOT, LabError, Netns, veth, wait_until
from fibsync.netns import inside
from fibsync.status import query

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_STATISTICS = 6
PACKET_OUTGOING = 4
SO_RCVBUFFORCE = 33
SO_SNDBUFFORCE = 32


# --- the topology -------------------------------------------------------------


@dataclass(frozen=True)
class Link:
    """A veth between r and one host."""

    host: str  # h1, h2, h3
    router_if: str
    host_if: str
    router_v4: ipaddress.IPv4Interface
    host_v4: ipaddress.IPv4Interface
    router_v6: ipaddress.IPv6Interface
    host_v6: ipaddress.IPv6Interface
    mtu: int = 1500


def _link(host: str, net4: str, net6: str, mtu: int = 1500) -> Link:
    """r takes the first address of each link prefix, the host the second."""
    n4, n6 = ipaddress.IPv4Network(net4), ipaddress.IPv6Network(net6)
    return Link(host, f"r-{host}", f"{host}-r",
                ipaddress.IPv4Interface(f"{n4[1]}/{n4.prefixlen}"),
                ipaddress.IPv4Interface(f"{n4[2]}/{n4.prefixlen}"),
                ipaddress.IPv6Interface(f"{n6[1]}/{n6.prefixlen}"),
                ipaddress.IPv6Interface(f"{n6[2]}/{n6.prefixlen}"), mtu)


LINKS = (_link("h1", "192.0.2.0/30", "2001:db8:1::/64"),
         _link("h2", "198.51.100.0/30", "2001:db8:2::/64", mtu=1400),
         _link("h3", "198.51.100.4/30", "2001:db8:3::/64"))
BY_HOST = {link.host: link for link in LINKS}

# r's routes, as `ip route add` arguments: (family, words)
ROUTES: tuple[tuple[str, str], ...] = (
    ("-4", "203.0.113.128/25 via 198.51.100.2"),
    ("-4", "203.0.113.0/26 via 198.51.100.6"),
    ("-4", "192.0.2.64/26 via 192.0.2.2"),
    ("-4", "192.0.2.128/25 via 192.0.2.2"),
    ("-4", "198.51.100.128/25 via 192.0.2.2"),
    ("-4", "unreachable 203.0.113.96/28"),
    ("-4", "blackhole 203.0.113.112/28"),
    ("-4", "prohibit 203.0.113.80/28"),
    ("-6", "2001:db8:ff::/48 via 2001:db8:2::2"),
    ("-6", "2001:db8:ee::/48 via 2001:db8:3::2"),
    ("-6", "2001:db8:10::/64 via 2001:db8:1::2"),
    ("-6", "unreachable 2001:db8:dd::/48"),
    ("-6", "blackhole 2001:db8:cc::/48"),
    ("-6", "prohibit 2001:db8:bb::/48"),
    ("-4", "203.0.113.128/25 via 198.51.100.6 table 100"),
    ("-6", "2001:db8:ff::/48 via 2001:db8:3::2 table 100"),
)

# Hosts drop every IP packet before their own routing decision, neighbour
# discovery aside (ARP is no inet traffic): they never answer, not even with the
# ICMPv6 "no route" a host sends for a packet not addressed to it, and what they
# catch on their veth (AF_PACKET sees frames before netfilter) is all r's doing.
HOST_FIREWALL = """
table inet fidelity_host {
    chain prerouting {
        type filter hook prerouting priority 0; policy drop;
        icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } accept
    }
}
"""


# r sends every ICMP message it means to, in both runs: its rate limits are off
# (ip_error()'s own bucket for unreachable routes cannot be: see the random test)
ICMP_UNLIMITED: dict[str, int | str] = {
    "net.ipv4.icmp_ratelimit": 0,
    "net.ipv4.icmp_ratemask": 0,
    "net.ipv4.icmp_msgs_per_sec": 1000000,
    "net.ipv4.icmp_msgs_burst": 1000000,
    "net.ipv6.icmp.ratelimit": 0,
    "net.ipv6.icmp.ratemask": "",
}


class Topology:
    """h1 — r — h2, h3 in namespaces ``<prefix>-{h1,r,h2,h3}``; see the module docstring."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.r = Netns(f"{prefix}-r")
        self.hosts = {name: Netns(f"{prefix}-{name}") for name in ("h1", "h2", "h3")}
        self.rundir = RUN_ROOT / prefix
        self.macs: dict[tuple[str, str], bytes] = {}  # (netns role, ifname) -> MAC
        self.link_local: dict[str, ipaddress.IPv6Address] = {}  # ifname -> fe80::

    @property
    def namespaces(self) -> list[Netns]:
        return [self.hosts["h1"], self.r, self.hosts["h2"], self.hosts["h3"]]

    @property
    def router_interfaces(self) -> list[str]:
        return [link.router_if for link in LINKS]

    def up(self) -> Topology:
        try:
            self._build()
        except BaseException:
            self.down()
            raise
        return self

    def _build(self) -> None:
        self.rundir.mkdir(parents=True, exist_ok=True)
        for ns in self.namespaces:
            ns.create()
            for key in ("all", "default"):
                ns.sysctl(f"net.ipv4.conf.{key}.rp_filter", 0)
        for link in LINKS:
            host = self.hosts[link.host]
            veth(self.r, link.router_if, host, link.host_if)
            for ns, ifname, addrs in ((self.r, link.router_if, (link.router_v4, link.router_v6)),
                                      (host, link.host_if, (link.host_v4, link.host_v6))):
                for addr in addrs:
                    ns.ip("addr", "add", str(addr), "dev", ifname, "nodad")
                if link.mtu != 1500:
                    ns.ip("link", "set", ifname, "mtu", str(link.mtu))
            host.run(["nft", "-f", "-"], input=HOST_FIREWALL)
        for key in ("net.ipv4.conf.all.forwarding", "net.ipv6.conf.all.forwarding"):
            self.r.sysctl(key, 1)
        for key, value in ICMP_UNLIMITED.items():
            self.r.sysctl(key, value)
        for family, words in ROUTES:
            self.r.ip(family, "route", "add", *words.split())
        for link in LINKS:
            host = self.hosts[link.host]
            for ns, ifname in ((self.r, link.router_if), (host, link.host_if)):
                info = ns.ip_json("addr", "show", "dev", ifname)[0]
                self.macs[(self._role(ns), ifname)] = bytes.fromhex(
                    info["address"].replace(":", ""))
                self.link_local[ifname] = wait_until(
                    lambda ns=ns, ifname=ifname: _link_local(ns, ifname), timeout=5,
                    what=f"{ifname}'s link-local address")

    def _role(self, ns: Netns) -> str:
        return ns.name.rsplit("-", 1)[1]

    def down(self) -> None:
        """Delete the namespaces (with whatever still runs inside) and the run directory."""
        errors = []
        for ns in self.namespaces:
            try:
                ns.delete()
            except LabError as exc:
                errors.append(str(exc))
        shutil.rmtree(self.rundir, ignore_errors=True)
        if errors:
            raise LabError("; ".join(errors))

    # -- facts tests need

    def router_mac(self, host: str = "h1") -> bytes:
        """r's MAC on the link to ``host``."""
        return self.macs[("r", BY_HOST[host].router_if)]

    def host_mac(self, host: str) -> bytes:
        return self.macs[(host, BY_HOST[host].host_if)]

    def router_addresses(self) -> set[str]:
        """Every address r owns (what its own packets may carry as source)."""
        found = {str(a) for link in LINKS for a in (link.router_v4.ip, link.router_v6.ip)}
        found |= {str(self.link_local[link.router_if]) for link in LINKS}
        return found

    def permanent_neighbours(self) -> None:
        """r's neighbours as permanent entries: no ARP or ND from r while frames cross.

        The neighbour state machine runs on timers (probes, STALE, DELAY): what
        it sends, and when, differs between two runs of the same frames and is
        not what a differential of forwarding decisions compares.
        """
        for link in LINKS:
            mac = ":".join(f"{b:02x}" for b in self.host_mac(link.host))
            for addr in (link.host_v4.ip, link.host_v6.ip, self.link_local[link.host_if]):
                self.r.ip("neigh", "replace", str(addr), "lladdr", mac, "dev", link.router_if,
                          "nud", "permanent")

    def resolve_neighbours(self) -> None:
        """r resolves each host (v4 and v6) as it would for traffic: the hosts drop the
        pings, but answer ARP and neighbour solicitations."""
        for link in LINKS:
            for addr in (link.host_v4.ip, link.host_v6.ip):
                self.r.run(["ping", "-c", "1", "-W", "0.2", str(addr)], check=False)

    def link_stats(self) -> dict[str, int]:
        """Every drop and error counter of the topology's veths (``ns/if/field``): the
        device's, and the veth's own queues (``ethtool -S``: a full ring for frames
        XDP redirects, ``xdp_xmit_errors``); not ``xdp_drops``, which counts the
        program's verdicts (a blackhole route drops by design)."""
        out: dict[str, int] = {}
        for ns in self.namespaces:
            for link in ns.ip_json("-s", "-s", "link", "show"):
                if link["ifname"] == "lo":
                    continue
                for way in ("rx", "tx"):
                    for key, value in link.get("stats64", {}).get(way, {}).items():
                        if "drop" in key or "error" in key:
                            out[f"{ns.name}/{link['ifname']}/{way}_{key}"] = int(value)
                for line in ns.run(["ethtool", "-S", link["ifname"]]).stdout.splitlines():
                    key, _, value = line.strip().partition(": ")
                    if ("drops" in key or "errors" in key) and "xdp_drops" not in key:
                        out[f"{ns.name}/{link['ifname']}/{key}"] = int(value)
        return out

    def icmp_losses(self) -> dict[str, int]:
        """r's counters of ICMP messages it meant to send and did not: the per-CPU ICMP
        socket's buffer full (OutErrors), or a rate limit (OutRateLimit*)."""
        lines = self.r.run(["cat", "/proc/net/snmp", "/proc/net/snmp6"]).stdout.splitlines()
        out: dict[str, int] = {}
        for names, values in zip(lines, lines[1:], strict=False):
            if names.startswith("Icmp: ") and values.startswith("Icmp: ") and \
                    not names.split()[1].isdigit():
                out.update({f"Icmp{k}": int(v) for k, v in zip(names.split()[1:],
                                                                values.split()[1:], strict=True)})
        out.update({f[0]: int(f[1]) for line in lines  # snmp6: one "name value" a line
                    if len(f := line.split()) == 2 and f[0].startswith("Icmp6")})
        return {k: v for k, v in out.items() if k.startswith(("IcmpOut", "Icmp6Out")) and
                ("Errors" in k or "RateLimit" in k)}


def _link_local(ns: Netns, ifname: str) -> ipaddress.IPv6Address | None:
    for info in ns.ip_json("-6", "addr", "show", "dev", ifname, "scope", "link"):
        for a in info.get("addr_info", []):
            if a.get("family") == "inet6" and a["local"].startswith("fe80"):
                return ipaddress.IPv6Address(a["local"])
    return None


# --- sending and catching frames ----------------------------------------------


@dataclass
class Caught:
    """What one exchange of frames gave: the frames each host received, and the
    accounting that says none was lost on the way."""

    frames: list[tuple[str, bytes]]  # (receiving host, frame bytes)
    sent: int
    socket_drops: int  # frames the capture sockets themselves lost
    link_drops: dict[str, int]  # drop/error counters of the veths that moved
    icmp_losses: dict[str, int]  # ICMP messages r could not send (counters that moved)
    seconds: float


class Exchange:
    """AF_PACKET capture on every host's veth, and h1's sender, around one batch of frames.

    Frames are sent ``batch`` at a time; between batches the capture sockets are
    drained, which paces the sender to what r and the hosts take (a veth with
    XDP queues 256 frames at most). Frames a host sends itself are not counted.
    """

    def __init__(self, topo: Topology, hosts: Sequence[str] = ("h1", "h2", "h3")) -> None:
        self.topo = topo
        self.socks: dict[str, socket.socket] = {}
        self.frames: list[tuple[str, bytes]] = []
        for host in hosts:
            with inside(topo.hosts[host].path):
                s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)
            s.bind((BY_HOST[host].host_if, ETH_P_ALL))
            s.setblocking(False)
            self.socks[host] = s
        with inside(topo.hosts["h1"].path):
            self.tx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        self.tx.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 8 << 20)
        self.tx.bind((BY_HOST["h1"].host_if, 0))
        self._drain(record=False)  # whatever arrived before this exchange
        for s in self.socks.values():
            _packet_stats(s)  # reading them resets them

    def close(self) -> None:
        for s in (*self.socks.values(), self.tx):
            s.close()

    def __enter__(self) -> Exchange:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _drain(self, record: bool = True) -> int:
        got = 0
        for host, s in self.socks.items():
            while True:
                try:
                    data, addr = s.recvfrom(65535)
                except BlockingIOError:
                    break
                if addr[2] == PACKET_OUTGOING:
                    continue
                got += 1
                if record:
                    self.frames.append((host, data))
        return got

    def run(self, frames: Sequence[bytes], batch: int, pause: float = 0.0005,
            quiet: float = 0.3, timeout: float = 20) -> Caught:
        """Send ``frames`` from h1, catch until nothing arrives for ``quiet`` seconds."""
        links_before = self.topo.link_stats()
        icmp_before = self.topo.icmp_losses()
        started = time.monotonic()
        for i in range(0, len(frames), batch):
            for frame in frames[i:i + batch]:
                self.tx.send(frame)
            time.sleep(pause)
            self._drain()
        deadline = time.monotonic() + timeout
        last = time.monotonic()
        while time.monotonic() - last < quiet and time.monotonic() < deadline:
            select.select(list(self.socks.values()), [], [], quiet)
            if self._drain():
                last = time.monotonic()
        seconds = time.monotonic() - started
        drops = sum(_packet_stats(s)[1] for s in self.socks.values())
        links_after = self.topo.link_stats()
        moved = {k: links_after.get(k, 0) - v for k, v in links_before.items()
                 if links_after.get(k, 0) != v}
        icmp = counter_delta(icmp_before, self.topo.icmp_losses())
        return Caught(list(self.frames), len(frames), drops, moved, icmp, seconds)


def _packet_stats(s: socket.socket) -> tuple[int, int]:
    """(packets, drops) of an AF_PACKET socket since the last call."""
    return struct.unpack("II", s.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))


def exchange(topo: Topology, frames: Sequence[bytes], lossless: bool = True,
             batch: int = 32, tries: int = 3, **kw: Any) -> Caught:
    """One Exchange that lost nothing on the way: no capture socket dropped a frame, r
    sent every ICMP message it meant to (its per-CPU ICMP socket has a send buffer of
    its own, which a loaded machine can fill), and with ``lossless`` no veth counted a
    drop or an error. A run that lost something is sent again, in batches half the
    size, ``tries`` times in all. Frames r itself refuses may make a veth count a drop
    (XDP_REDIRECT into a veth drops a frame over its MTU there): ``lossless=False``
    leaves those to the comparison."""
    for _ in range(tries):
        with Exchange(topo) as ex:
            caught = ex.run(frames, batch=batch, **kw)
        lost = {**({"capture sockets": caught.socket_drops} if caught.socket_drops else {}),
                **caught.icmp_losses, **(caught.link_drops if lossless else {})}
        if not lost:
            return caught
        batch = max(1, batch // 2)
    raise AssertionError(f"frames or ICMP messages lost in each of {tries} runs, the last "
                         f"in batches of {batch * 2}: {lost}")


# --- fibsync on r --------------------------------------------------------------


class Router:
    """fibsync on the topology's r, started on demand, stopped by pid at the end."""

    def __init__(self, topo: Topology, extra: list[str] | None = None) -> None:
        self.topo = topo
        self.daemon = RouterDaemon(topo.r, topo.rundir, topo.prefix, topo.router_interfaces,
                                   extra)

    def start(self) -> RouterDaemon:
        self.daemon.start()
        return self.daemon

    def stop(self) -> None:
        self.daemon.stop()
        self.daemon.cli("detach", "--force", check=False)
        self.daemon.remove_pins()

    def status(self) -> dict[str, Any]:
        """The daemon's status document, straight from its socket (the CLI takes 0.3 s)."""
        return query(RUN_DIR / f"{self.daemon.instance}.sock")

    def counters(self) -> dict[str, int]:
        return {k: int(v["packets"]) for k, v in self.status().get("counters", {}).items()}

    def conditions(self) -> str | None:
        """The conditions fibsync's status lists as active, as one comparable text
        (None: the status has no conditions section)."""
        fi = self.status().get("fidelity")
        if fi is None:
            return None
        return json.dumps(sorted(fi.get("conditions", []), key=lambda c: json.dumps(c,
                                 sort_keys=True)), sort_keys=True)


def counter_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}


# --- comparing what arrived ------------------------------------------------------

# What the two runs may legitimately differ in, and is left out of the comparison:
# ARP and the ICMPv6 neighbour discovery and multicast listener messages (types
# 130-137, 143): r's neighbour and MLD state machines run on timers. (Also, where a
# caller names them, the number of answers to failed resolutions: multiset.)
ICMPV6_TIMER_DRIVEN = frozenset({130, 131, 132, 133, 134, 135, 136, 137, 143})


def _icmp6_type(frame: bytes) -> int | None:
    """The ICMPv6 type of an IPv6 frame (past a hop-by-hop header), or None."""
    nh, off = frame[20], 54
    if nh == 0 and len(frame) >= off + 2:
        nh, off = frame[off], off + (frame[off + 1] + 1) * 8
    if nh == 58 and len(frame) > off:
        return frame[off]
    return None


def timer_driven(frame: bytes) -> bool:
    ethertype = frame[12:14]
    if ethertype == b"\x08\x06":
        return True
    return ethertype == b"\x86\xdd" and len(frame) > 54 and \
        _icmp6_type(frame) in ICMPV6_TIMER_DRIVEN


def normalise(frame: bytes, router_v4: set[bytes], router_v6: set[bytes]) -> bytes:
    """The frame as compared.

    Fields the kernel draws afresh for each packet it originates are zeroed: the
    IPv4 identification and header checksum of r's own packets (ICMP errors, echo
    replies, RSTs; ip_select_ident() hashes a per-namespace counter), and the
    identification of the IPv6 fragments r cuts from its own packets (an echo reply
    larger than the path's MTU; ipv6_select_ident() draws it the same way).
    Forwarded packets, and the IPv4 fragments r cuts from them (which keep the
    original's identification), are compared byte for byte. IPv6 flow labels need
    nothing: r's are a hash of the flow.

    A frame shorter than Ethernet's minimum is padded with zeros to 60 bytes, as
    on a wire: a veth delivers it short, the kernel trims a padded frame to its IP
    length, XDP forwards it as it came. Other bytes after the IP packet count.
    """
    if len(frame) < 60:
        frame += bytes(60 - len(frame))
    if frame[12:14] == b"\x08\x00" and frame[26:30] in router_v4:
        return frame[:18] + b"\0\0" + frame[20:24] + b"\0\0" + frame[26:]
    if frame[12:14] == b"\x86\xdd" and frame[20] == 44 and len(frame) >= 62 and \
            frame[22:38] in router_v6:
        return frame[:58] + bytes(4) + frame[62:]
    return frame


def failed_resolution(frame: bytes) -> bytes | None:
    """For r's answer to a packet whose next hop did not resolve (ICMP host
    unreachable, ICMPv6 address unreachable), the quoted packet's destination;
    None for any other frame. IPv4 host unreachable also answers unreachable
    routes: the caller knows which destinations are on-link and nobody's."""
    if frame[12:14] == b"\x08\x00" and len(frame) >= 34 and frame[23] == 1:
        icmp = 14 + (frame[14] & 0x0F) * 4
        if frame[icmp:icmp + 2] == b"\x03\x01" and len(frame) >= icmp + 28:
            return frame[icmp + 24:icmp + 28]
    elif frame[12:14] == b"\x86\xdd" and len(frame) >= 102 and frame[20] == 58 and \
            frame[54:56] == b"\x01\x03":
        return frame[86:102]
    return None


def multiset(caught: Caught, topo: Topology,
             racy: frozenset[bytes] = frozenset()) -> Counter[tuple[str, bytes]]:
    """The frames compared, normalised; without those ``racy`` leaves out: the answers
    to failed resolutions of these destinations (see ``answered_unresolved``)."""
    own = [ipaddress.ip_address(a).packed for a in topo.router_addresses()]
    v4, v6 = {a for a in own if len(a) == 4}, {a for a in own if len(a) == 16}
    return Counter((host, normalise(frame, v4, v6)) for host, frame in caught.frames
                   if not timer_driven(frame) and failed_resolution(frame) not in racy)


def answered_unresolved(caught: Caught, racy: frozenset[bytes]) -> set[str]:
    """Which of the ``racy`` destinations r answered as unresolved at least once.

    How many of the packets queued behind a failed resolution get their ICMP
    answer is a race in the kernel itself: neigh_invalidate() answers the queue
    one packet at a time, dropping the neighbour's lock for each, and stops (the
    rest of the queue purged silently) as soon as a new packet for the same
    address has put the entry back into INCOMPLETE on the other CPU. The first
    packet of each failure is always answered, so that each destination was
    answered at all is what two runs can compare."""
    return {str(ipaddress.ip_address(d)) for _, frame in caught.frames
            if (d := failed_resolution(frame)) in racy}


def describe(frame: bytes) -> str:
    """One line for a frame, decoded by scapy."""
    import scapy.layers.inet
    import scapy.layers.inet6  # noqa: F401 - binds IPv4 and IPv6 under Ether
    from scapy.layers.l2 import Ether

    pkt = Ether(frame)
    l3 = pkt.payload
    fields = f" ttl/hlim {getattr(l3, 'ttl', getattr(l3, 'hlim', '?'))}" \
        f" id {getattr(l3, 'id', '-')} len {getattr(l3, 'len', getattr(l3, 'plen', '?'))}"
    icmp = l3.payload
    if hasattr(icmp, "type") and hasattr(icmp, "code"):
        fields += f" icmp {icmp.type}/{icmp.code}"
    quoted = pkt.getlayer("IPerror6") or pkt.getlayer("IPerror")
    if quoted is not None:
        fields += f" about {quoted.src} > {quoted.dst}"
    return f"{pkt.summary()} [{fields.strip()}] ({len(frame)} bytes)"


# --- the data-plane cases ----------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """``count`` UDP packets from h1 (source ``src``, possibly spoofed) to ``dst``:``dport``.

    ``expect``: who receives them with the kernel alone, as (host, source address
    seen); empty: nobody. ``condition``: the packets fall under the case's
    condition, so fibsync must count them under one of the case's reasons.
    """

    src: str
    dst: str
    dport: int = 5000
    expect: tuple[tuple[str, str], ...] = ()
    condition: bool = True
    count: int = 10

    @property
    def family(self) -> int:
        return 6 if ":" in self.dst else 4


Action = Callable[[Topology], None]


@dataclass(frozen=True)
class Case:
    """One kernel behaviour: how to switch it on and off, the probes, and the reasons
    fibsync counts the probes under while it holds (empty: no reason is asserted;
    FWD_FAST alone: the fast path must keep forwarding, the kernel forwarding none)."""

    name: str
    apply: Action
    undo: Action
    probes: tuple[Probe, ...]
    reasons: tuple[str, ...] = ()
    note: str = ""

    def __str__(self) -> str:
        return self.name


_MARK = b"fidelity-probe"


def probe_frames(topo: Topology, case: Case) -> list[bytes]:
    """The case's probes as frames from h1 to r; each carries its probe's index."""
    from scapy.layers.inet import IP, UDP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Ether
    from scapy.packet import Raw

    eth = Ether(src=topo.host_mac("h1"), dst=topo.router_mac("h1"))
    frames = []
    for i, p in enumerate(case.probes):
        for n in range(p.count):
            l3 = IP(src=p.src, dst=p.dst, id=1000 + 50 * i + n, ttl=64) if p.family == 4 \
                else IPv6(src=p.src, dst=p.dst, hlim=64)
            payload = _MARK + struct.pack("!HH", i, n)
            frames.append(bytes(eth / l3 / UDP(sport=40000 + i, dport=p.dport) / Raw(payload)))
    return frames


@dataclass(frozen=True, order=True)
class Seen:
    """One probe packet (or an ICMP error about one) as a host received it."""

    probe: int
    host: str
    what: str  # "udp", or "icmp <type>/<code>"
    src: str
    dst: str


def outcome(caught: Caught) -> Counter[Seen]:
    """The probes' fate: who received what, from which source (or ICMP about them)."""
    from scapy.layers.inet import IP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Ether

    seen: Counter[Seen] = Counter()
    for host, frame in caught.frames:
        at = frame.find(_MARK)
        if at < 0 or timer_driven(frame):
            continue
        index = struct.unpack("!H", frame[at + len(_MARK):at + len(_MARK) + 2])[0]
        pkt = Ether(frame)
        l3 = pkt[IP] if IP in pkt else pkt.getlayer(IPv6)
        if l3 is None:
            continue
        proto = l3.proto if isinstance(l3, IP) else l3.nh
        if proto in (1, 58):
            what = f"icmp {l3.payload.type}/{l3.payload.code}"
        elif proto == 17:
            what = "udp"
        else:
            what = f"proto {proto}"
        seen[Seen(index, host, what, str(l3.src), str(l3.dst))] += 1
    return seen


def expected(case: Case) -> Counter[Seen]:
    """What the kernel alone must deliver, by the probes' ``expect`` (UDP only)."""
    want: Counter[Seen] = Counter()
    for i, p in enumerate(case.probes):
        for host, src in p.expect:
            want[Seen(i, host, "udp", src, p.dst)] += p.count
    return want


def udp_only(seen: Counter[Seen]) -> Counter[Seen]:
    return Counter({s: n for s, n in seen.items() if s.what == "udp"})


def show(seen: Counter[Seen]) -> str:
    return "\n".join(f"  {n:>3} x {s}" for s, n in sorted(seen.items())) or "  (nothing)"


@dataclass
class Proof:
    """From now on, did XDP carry what crossed r? r's kernel forwarding counters
    (ForwDatagrams, Ip6OutForwDatagrams) flat, fibsync's FWD_FAST up."""

    topo: Topology
    router: Router
    kernel: tuple[int, int] = field(init=False)
    counters: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.kernel = self.topo.r.kernel_forwarded()
        self.counters = self.router.counters()

    def moved(self) -> tuple[tuple[int, int], dict[str, int]]:
        k = self.topo.r.kernel_forwarded()
        return ((k[0] - self.kernel[0], k[1] - self.kernel[1]),
                counter_delta(self.counters, self.router.counters()))


def plain_probes() -> tuple[Probe, ...]:
    """Traffic no condition touches: h1 to h2's prefixes, both families."""
    return (Probe("192.0.2.2", "203.0.113.130", expect=(("h2", "192.0.2.2"),), condition=False),
            Probe("2001:db8:1::2", "2001:db8:ff::1", expect=(("h2", "2001:db8:1::2"),),
                  condition=False))


PLAIN = Case("plain", lambda t: None, lambda t: None, plain_probes())


def send_probes(topo: Topology, case: Case) -> Counter[Seen]:
    return outcome(exchange(topo, probe_frames(topo, case), quiet=0.3))


def fast_path_carries(topo: Topology, router: Router, timeout: float = 15,
                      reasons: Sequence[str] = ("FWD_FAST",)) -> None:
    """Plain traffic crosses r in the fast path alone: it arrives, r's kernel forwards
    none of it, and fibsync counts every packet under ``reasons``. Waits up to ``timeout``
    for a first clean round (the first packets resolve neighbours through the kernel);
    0: one round, which must be clean."""
    frames = probe_frames(topo, PLAIN)
    want = expected(PLAIN)
    last: str = ""
    deadline = time.monotonic() + timeout
    while True:
        proof = Proof(topo, router)
        got = udp_only(outcome(exchange(topo, frames)))
        kernel, counters = proof.moved()
        carried = sum(counters.get(r, 0) for r in reasons)
        if got == want and kernel == (0, 0) and carried >= len(frames):
            return
        last = (f"received:\n{show(got)}\nkernel forwarded (v4, v6) {kernel}, "
                f"fibsync counters moved {counters}")
        if time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    raise AssertionError(f"plain traffic is not carried by the fast path alone: {last}")


def wait_conditions(router: Router, baseline: str | None, changed: bool,
                    timeout: float = 1.0) -> float:
    """Wait, ``timeout`` at most, until the conditions fibsync's status lists differ from
    ``baseline`` (``changed``) or are ``baseline`` again; returns the seconds waited. A
    change fibsync does not list waits out the timeout: the probes then show whether
    it honoured the change all the same."""
    started = time.monotonic()
    while time.monotonic() - started < timeout - 0.05:
        now = router.conditions()
        if now is not None and (now != baseline) == changed:
            break
        time.sleep(0.02)
    return time.monotonic() - started


def on_router(*commands: str) -> Action:
    """An Action running command lines in r (``nft -f -`` reads the text after a newline)."""
    def act(topo: Topology) -> None:
        for line in commands:
            if line.startswith("nft -f -\n"):
                topo.r.run(["nft", "-f", "-"], input=line.split("\n", 1)[1])
            else:
                topo.r.run(line)
    return act
