"""Network-namespace labs with FRR and BIRD, for the demo and the tests.

Two layers:

* primitives: :class:`Netns`, :func:`veth`, :class:`Frr`, :class:`Bird`, and
  :func:`bgpd_config` to build BGP speakers;
* :class:`Lab`, the demo topology::

      h1 (lan0: 192.0.2.65/26, 2001:db8:10::1/64)
       | h1-r  192.0.2.2/30   2001:db8:1::2/64
       | r-h1  192.0.2.1/30   2001:db8:1::1/64
      r  (FRR zebra + staticd, forwarding on)
       | r-h2a 198.51.100.1/30 2001:db8:2::1/64   | r-h2b 198.51.100.5/30 2001:db8:3::1/64
       | h2-ra 198.51.100.2/30 2001:db8:2::2/64   | h2-rb 198.51.100.6/30 2001:db8:3::2/64
      h2 (lan0: 203.0.113.1/24, 2001:db8:20::1/64)

  r reaches h1's LAN through one gateway and h2's LAN through an ECMP pair, so
  FRR installs one single-nexthop object and one nexthop group per family.

Everything is found again from names alone: a lab's namespaces are
``<name>-h1``, ``<name>-r`` and ``<name>-h2``; daemons write pid files under
``/run/fibsync-lab/<name>/``. Teardown stops daemons by those pid files, then
kills whatever else still runs inside the lab's namespaces (matched through
``/proc/<pid>/ns/net``), so ``down`` works after a crash of anything.

Longer than our ~500-line mark on purpose: the primitives and the topology
are one vocabulary (the demo, the netns tests and the benchmarks build from
the same few names), and splitting them would only spread it over files.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import pwd
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from fibsync.errors import FibsyncError

log = structlog.get_logger(__name__)

RUN_ROOT = Path("/run/fibsync-lab")
FRR_SBIN = Path("/usr/lib/frr")
NETNS_DIR = Path("/run/netns")

Command = Sequence[str] | str


class LabError(FibsyncError):
    """Building, running or tearing down a lab failed."""


# --- processes -------------------------------------------------------------


def run(cmd: Command, *, check: bool = True, timeout: float = 30,
        input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command, capture its output; with ``check`` a failure is a LabError."""
    argv = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                                input=input, check=False)
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"`{shlex.join(argv)}` did not finish within {timeout}s") from exc
    except FileNotFoundError as exc:
        raise LabError(f"`{argv[0]}` not found: is it installed?") from exc
    if check and result.returncode != 0:
        detail = (result.stderr or result.stdout).strip()
        raise LabError(f"`{shlex.join(argv)}` failed ({result.returncode}): {detail}")
    return result


def wait_until(predicate: Callable[[], Any], *, timeout: float, what: str,
               interval: float = 0.1) -> Any:
    """Poll ``predicate`` until it returns something true; LabError naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise LabError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie counts as gone (nobody may reap it here)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X")


def _pid_comm(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None


def _pid_netns_inode(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


def read_pid_file(path: Path, comm: str | None = None) -> int | None:
    """The live pid in ``path``, or None; with ``comm`` the process must be that program.

    Checking the program name keeps a stale pid file (after a crash and pid
    reuse) from pointing us at an unrelated process.
    """
    try:
        pid = int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    if pid <= 1 or not pid_alive(pid):
        return None
    if comm is not None and _pid_comm(pid) != comm[:15]:
        return None
    return pid


def terminate(pids: Iterable[int], *, grace: float = 5.0) -> None:
    """SIGTERM the pids, wait up to ``grace`` seconds, SIGKILL the rest and wait."""
    pending = {p for p in pids if p > 1 and p != os.getpid()}
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        for pid in pending:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while pending and time.monotonic() < deadline:
            pending = {p for p in pending if pid_alive(p)}
            if pending:
                time.sleep(0.05)
        if not pending:
            return
        log.warning("lab.kill", pids=sorted(pending), signal=sig.name)
    if pending:
        raise LabError(f"processes {sorted(pending)} survived SIGKILL")


# --- namespaces and links --------------------------------------------------


class Netns:
    """A named network namespace (``ip netns``)."""

    def __init__(self, name: str) -> None:
        if not name or "/" in name or len(name) > 64:
            raise LabError(f"bad namespace name {name!r}")
        self.name = name

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"Netns({self.name!r})"

    @property
    def path(self) -> Path:
        return NETNS_DIR / self.name

    def exists(self) -> bool:
        return self.path.exists()

    def inode(self) -> int | None:
        try:
            return self.path.stat().st_ino
        except OSError:
            return None

    def create(self) -> Netns:
        """Create the namespace with loopback up and IPv6 DAD off (no tentative waits)."""
        run(["ip", "netns", "add", self.name])
        try:
            self.ip("link", "set", "lo", "up")
            for family in ("all", "default"):
                self.sysctl(f"net.ipv6.conf.{family}.accept_dad", 0)
        except LabError:
            self.delete()
            raise
        return self

    def delete(self) -> None:
        """Kill every process inside, then delete the namespace; fine if it is gone."""
        if not self.exists():
            return
        # A dying process may have started another one inside: look again.
        for _ in range(3):
            pids = self.pids()
            if not pids:
                break
            terminate(pids)
        run(["ip", "netns", "del", self.name], check=False)
        if self.exists():
            raise LabError(f"could not delete namespace {self.name}")

    def pids(self) -> list[int]:
        """Processes whose network namespace is this one."""
        inode = self.inode()
        if inode is None:
            return []
        root = {_pid_netns_inode(1), _pid_netns_inode(os.getpid())}
        if inode in root:
            # A name bound to the host's namespace: never kill the host.
            return []
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit() and _pid_netns_inode(int(entry)) == inode and pid_alive(int(entry)):
                found.append(int(entry))
        return found

    def argv(self, cmd: Command) -> list[str]:
        """``cmd`` prefixed to run inside the namespace."""
        args = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
        return ["ip", "netns", "exec", self.name, *args]

    def run(self, cmd: Command, check: bool = True, timeout: float = 30,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        return run(self.argv(cmd), check=check, timeout=timeout, input=input)

    def popen(self, cmd: Command, **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a long-running command inside the namespace (caller owns it)."""
        return subprocess.Popen(self.argv(cmd), **kwargs)

    def ip(self, *args: str, check: bool = True) -> str:
        return run(["ip", "-n", self.name, *args], check=check).stdout

    def ip_json(self, *args: str) -> list[dict[str, Any]]:
        """``ip -j ARGS`` in the namespace, parsed (empty output -> [])."""
        out = run(["ip", "-n", self.name, "-j", *args]).stdout.strip()
        return json.loads(out) if out else []

    def sysctl(self, key: str, value: str | int) -> None:
        self.run(["sysctl", "-q", "-w", f"{key}={value}"])

    def read_sysctl(self, key: str) -> str:
        return self.run(["sysctl", "-n", key]).stdout.strip()

    def kernel_forwarded(self) -> tuple[int, int]:
        """Packets this namespace's kernel forwarded: (ForwDatagrams, Ip6OutForwDatagrams).

        Read inside the namespace (/proc/net/snmp and /proc/net/snmp6 are per
        namespace). A frame an XDP program redirects never reaches the stack and
        is not counted, so counters that stay flat while traffic crosses the
        namespace prove that XDP carried all of it.
        """
        text = self.run(["cat", "/proc/net/snmp", "/proc/net/snmp6"]).stdout
        rows = [line.split() for line in text.splitlines() if line.startswith("Ip: ")]
        six = {f[0]: f[1] for line in text.splitlines() if len(f := line.split()) == 2}
        try:
            names, values = rows[0], rows[1]
            return int(values[names.index("ForwDatagrams")]), int(six["Ip6OutForwDatagrams"])
        except (IndexError, KeyError, ValueError):
            raise LabError(f"{self}: no forwarding counters in /proc/net/snmp{{,6}}") from None


def _ns(ns: Netns | str) -> Netns:
    return ns if isinstance(ns, Netns) else Netns(ns)


def veth(ns_a: Netns | str, if_a: str, ns_b: Netns | str, if_b: str, *,
         gro: bool = True, up: bool = True) -> None:
    """A veth pair between two namespaces, created directly inside them.

    GRO goes on at both ends by default: XDP_REDIRECT into a veth only delivers
    when the receiving peer runs XDP or has GRO on. It is switched on once both
    ends are up: set on a veth that is down, GRO shows "on" but the veth's NAPI,
    which XDP_REDIRECT needs, stays off (seen on 6.18: every redirect dropped).

    Transmit checksum offload goes off too: a veth hands its peer TCP/UDP
    packets whose checksum is left for "hardware" (CHECKSUM_PARTIAL), and a
    frame redirected by XDP into another veth arrives with that checksum never
    filled in, so the receiver drops it (ICMP, checksummed in software, still
    passes). Real NICs fill it in on the wire; a lab of veths must not offload.
    """
    a, b = _ns(ns_a), _ns(ns_b)
    for ifname in (if_a, if_b):
        if len(ifname) > 15:
            raise LabError(f"interface name {ifname!r} is longer than 15 characters")
    run(["ip", "link", "add", if_a, "netns", a.name, "type", "veth",
         "peer", "name", if_b, "netns", b.name])
    ends = ((a, if_a), (b, if_b))
    if up:
        for ns, ifname in ends:
            ns.ip("link", "set", ifname, "up")
    for ns, ifname in ends:
        ns.run(["ethtool", "-K", ifname, "tx", "off", *(["gro", "on"] if gro else [])])


# --- FRR -------------------------------------------------------------------


def _add_stub_interface(ns: Netns, ifname: str) -> None:
    """An interface that only holds addresses: dummy, or ifb where the kernel has no dummy.

    Some kernels (these VMs) are built without CONFIG_DUMMY; an ifb device with
    nothing redirected to it behaves the same for local addresses.
    """
    result = run(["ip", "-n", ns.name, "link", "add", ifname, "type", "dummy"], check=False)
    if result.returncode != 0:
        if "Unknown device type" not in result.stderr:
            raise LabError(f"cannot add dummy {ifname} in {ns}: {result.stderr.strip()}")
        ns.ip("link", "add", ifname, "type", "ifb")


def _frr_owned_dir(path: Path) -> None:
    try:
        frr = pwd.getpwnam("frr")
    except KeyError as exc:
        raise LabError("user frr does not exist: is FRR installed?") from exc
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, frr.pw_uid, frr.pw_gid)


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class Frr:
    """FRR daemons inside one namespace, all sockets and pid files in ``rundir``.

    Daemons start with an empty config; ``start`` then feeds the config through
    vtysh, which hands each line to the daemon that owns it.
    """

    def __init__(self, ns: Netns | str, rundir: Path | str) -> None:
        self.ns = _ns(ns)
        self.rundir = Path(rundir)

    def __repr__(self) -> str:
        return f"Frr({self.ns.name!r}, {str(self.rundir)!r})"

    def pid_file(self, daemon: str) -> Path:
        return self.rundir / f"{daemon}.pid"

    def log_file(self, daemon: str) -> Path:
        return self.rundir / f"{daemon}.log"

    def pids(self) -> dict[str, int]:
        """Running daemons by name, from their pid files."""
        found = {}
        for pid_file in sorted(self.rundir.glob("*.pid")):
            pid = read_pid_file(pid_file, comm=pid_file.stem)
            if pid is not None:
                found[pid_file.stem] = pid
        return found

    def start(self, daemons: Sequence[str] = ("zebra", "staticd"), config: str = "") -> None:
        if "zebra" not in daemons:
            raise LabError("FRR needs zebra among the daemons")
        if self.pids():
            raise LabError(f"FRR already runs in {self.ns} (pids {self.pids()})")
        _frr_owned_dir(self.rundir)
        empty = self.rundir / "empty.conf"
        empty.touch()
        ordered = ["zebra", *(d for d in daemons if d != "zebra")]
        try:
            for daemon in ordered:
                self._start_daemon(daemon, empty)
            if config.strip():
                self.apply(config)
        except LabError:
            self.stop()
            raise
        log.info("frr.start", netns=self.ns.name, daemons=ordered)

    def _start_daemon(self, daemon: str, config_file: Path) -> None:
        binary = FRR_SBIN / daemon
        if not binary.exists():
            raise LabError(f"{binary} not found: is FRR installed?")
        d = self.rundir
        vty = d / f"{daemon}.vty"
        vty.unlink(missing_ok=True)
        result = self.ns.run(
            [str(binary), "-d", "-N", self.ns.name, "--vty_socket", str(d),
             "-z", str(d / "zserv.api"), "-i", str(self.pid_file(daemon)),
             "-f", str(config_file), "--log", f"file:{self.log_file(daemon)}"],
            check=False)
        if result.returncode != 0:
            raise LabError(f"{daemon} in {self.ns} failed to start: "
                           f"{result.stderr.strip()} {_tail(self.log_file(daemon))}")
        ready = [vty] + ([d / "zserv.api"] if daemon == "zebra" else [])
        try:
            wait_until(lambda: read_pid_file(self.pid_file(daemon), daemon)
                       and all(p.exists() for p in ready),
                       timeout=15, what=f"{daemon} in {self.ns} to start")
        except LabError as exc:
            raise LabError(f"{exc}; log: {_tail(self.log_file(daemon))}") from None

    def apply(self, config: str) -> None:
        """Feed configuration lines to the running daemons (``vtysh -f``).

        A rejected line raises LabError naming it; lines before it stay applied.
        """
        conf = self.rundir / "frr.conf"
        conf.write_text(config if config.endswith("\n") else config + "\n")
        result = run(["vtysh", "--vty_socket", str(self.rundir), "-f", str(conf)],
                     check=False, timeout=120)
        if result.returncode != 0:
            raise LabError(f"FRR in {self.ns} rejected its config: "
                           f"{(result.stdout + result.stderr).strip()}")

    def vtysh(self, *commands: str) -> str:
        """Run vtysh commands in one session (``configure`` works); return stdout."""
        argv = ["vtysh", "--vty_socket", str(self.rundir)]
        for command in commands:
            argv += ["-c", command]
        result = run(argv, check=False)
        if result.returncode != 0:
            raise LabError(f"vtysh {list(commands)} in {self.ns} failed: "
                           f"{(result.stdout + result.stderr).strip()}")
        return result.stdout

    def vtysh_json(self, command: str) -> Any:
        """A ``show … json`` command, parsed."""
        return json.loads(self.vtysh(command))

    def stop(self) -> None:
        """Stop every daemon named by a pid file here; fine when none runs."""
        pids = self.pids()
        if pids:
            terminate(pids.values())
            log.info("frr.stop", netns=self.ns.name, daemons=sorted(pids))
        for pid_file in self.rundir.glob("*.pid"):
            pid_file.unlink(missing_ok=True)


@dataclass(frozen=True)
class BgpNeighbor:
    address: str
    remote_as: int


def subnets(base: str, count: int, prefixlen: int) -> list[str]:
    """The first ``count`` subnets of ``base`` with length ``prefixlen``."""
    network = ipaddress.ip_network(base)
    available = 2 ** (prefixlen - network.prefixlen)
    if prefixlen < network.prefixlen or count > available:
        raise LabError(f"{base} holds {available} /{prefixlen}s, not {count}")
    result = []
    for subnet in network.subnets(new_prefix=prefixlen):
        if len(result) == count:
            break
        result.append(str(subnet))
    return result


def bgpd_config(*, asn: int, router_id: str,
                neighbors: Iterable[BgpNeighbor] | Mapping[str, int],
                announce: Iterable[str] = ()) -> str:
    """An FRR config for bgpd announcing ``announce`` (IPv4 and IPv6 prefixes).

    Prefixes go out through ``network`` statements with the import check off,
    so they need no route in the RIB. IPv4 neighbours carry IPv4 unicast, IPv6
    neighbours IPv6 unicast. Timers are short so sessions come up in seconds;
    ``ebgp-requires-policy`` is off, as FRR 8 would otherwise announce nothing
    over eBGP without a route-map.
    """
    peers = ([BgpNeighbor(a, asn_) for a, asn_ in neighbors.items()]
             if isinstance(neighbors, Mapping) else list(neighbors))
    prefixes = [ipaddress.ip_network(p) for p in announce]
    lines = [
        "frr defaults traditional",
        f"router bgp {asn}",
        f" bgp router-id {router_id}",
        " no bgp ebgp-requires-policy",
        " no bgp default ipv4-unicast",
        " no bgp network import-check",
        " timers bgp 3 9",
    ]
    for peer in peers:
        lines += [f" neighbor {peer.address} remote-as {peer.remote_as}",
                  f" neighbor {peer.address} timers connect 1",
                  f" neighbor {peer.address} advertisement-interval 0"]
    for version, afi in ((4, "ipv4"), (6, "ipv6")):
        lines.append(f" address-family {afi} unicast")
        lines += [f"  network {p}" for p in prefixes if p.version == version]
        lines += [f"  neighbor {peer.address} activate" for peer in peers
                  if ipaddress.ip_address(peer.address).version == version]
        lines.append(" exit-address-family")
    return "\n".join(lines) + "\n"


# --- BIRD ------------------------------------------------------------------


class Bird:
    """A BIRD 2 daemon inside one namespace; socket, pid file and log in ``rundir``."""

    def __init__(self, ns: Netns | str, rundir: Path | str) -> None:
        self.ns = _ns(ns)
        self.rundir = Path(rundir)

    def __repr__(self) -> str:
        return f"Bird({self.ns.name!r}, {str(self.rundir)!r})"

    @property
    def socket(self) -> Path:
        return self.rundir / "bird.ctl"

    @property
    def pid_file(self) -> Path:
        return self.rundir / "bird.pid"

    @property
    def log_file(self) -> Path:
        return self.rundir / "bird.log"

    def pid(self) -> int | None:
        return read_pid_file(self.pid_file, comm="bird")

    def start(self, config: str) -> None:
        """Start BIRD with ``config``; a config without ``log`` logs to ``log_file``."""
        if self.pid() is not None:
            raise LabError(f"BIRD already runs in {self.ns} (pid {self.pid()})")
        self.rundir.mkdir(parents=True, exist_ok=True)
        if not any(line.strip().startswith("log ") for line in config.splitlines()):
            config = f'log "{self.log_file}" all;\n{config}'
        conf = self.rundir / "bird.conf"
        conf.write_text(config)
        result = self.ns.run(["bird", "-c", str(conf), "-s", str(self.socket),
                              "-P", str(self.pid_file)], check=False)
        if result.returncode != 0:
            raise LabError(f"BIRD in {self.ns} failed to start: "
                           f"{(result.stderr + result.stdout).strip()}")
        try:
            wait_until(lambda: self.pid() and self.socket.exists(), timeout=15,
                       what=f"BIRD in {self.ns} to start")
        except LabError as exc:
            self.stop()
            raise LabError(f"{exc}; log: {_tail(self.log_file)}") from None
        log.info("bird.start", netns=self.ns.name, pid=self.pid())

    def birdc(self, command: str) -> str:
        """One birdc command; returns its output without the banner line."""
        result = run(["birdc", "-s", str(self.socket), *shlex.split(command)], check=False)
        if result.returncode != 0:
            raise LabError(f"birdc {command!r} in {self.ns} failed: "
                           f"{(result.stderr + result.stdout).strip()}")
        lines = result.stdout.splitlines()
        if lines and lines[0].startswith("BIRD ") and lines[0].endswith("ready."):
            lines = lines[1:]
        return "\n".join(lines)

    def stop(self) -> None:
        pid = self.pid()
        if pid is not None:
            terminate([pid])
            log.info("bird.stop", netns=self.ns.name, pid=pid)
        self.pid_file.unlink(missing_ok=True)


# --- the demo topology -----------------------------------------------------

Interface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class LabLink:
    """One veth between r and a host, with both ends' addresses."""

    router_if: str
    host_if: str
    router_v4: ipaddress.IPv4Interface
    host_v4: ipaddress.IPv4Interface
    router_v6: ipaddress.IPv6Interface
    host_v6: ipaddress.IPv6Interface


@dataclass(frozen=True)
class StaticRoute:
    """A static route r gets from FRR: one gateway, or several for ECMP."""

    prefix: Network
    gateways: tuple[Address, ...]

    @property
    def ecmp(self) -> bool:
        return len(self.gateways) > 1


def _link(router_if: str, host_if: str, v4: str, v6: str) -> LabLink:
    net4, net6 = ipaddress.IPv4Network(v4), ipaddress.IPv6Network(v6)
    return LabLink(router_if, host_if,
                   ipaddress.IPv4Interface(f"{net4[1]}/{net4.prefixlen}"),
                   ipaddress.IPv4Interface(f"{net4[2]}/{net4.prefixlen}"),
                   ipaddress.IPv6Interface(f"{net6[1]}/{net6.prefixlen}"),
                   ipaddress.IPv6Interface(f"{net6[2]}/{net6.prefixlen}"))


class Lab:
    """h1 — r — h2 with FRR on r; see the module docstring for the picture.

    ``up()`` is idempotent and rebuilds a half-built lab; ``down()`` needs only
    the name. Attributes name every namespace, interface and address so tests
    need not hardcode them.
    """

    ROLES = ("h1", "r", "h2")
    LAN_IF = "lan0"
    DAEMONS = ("zebra", "staticd")

    h1_link = _link("r-h1", "h1-r", "192.0.2.0/30", "2001:db8:1::/64")
    h2_links = (_link("r-h2a", "h2-ra", "198.51.100.0/30", "2001:db8:2::/64"),
                _link("r-h2b", "h2-rb", "198.51.100.4/30", "2001:db8:3::/64"))
    h1_lan_v4 = ipaddress.IPv4Interface("192.0.2.65/26")
    h1_lan_v6 = ipaddress.IPv6Interface("2001:db8:10::1/64")
    h2_lan_v4 = ipaddress.IPv4Interface("203.0.113.1/24")
    h2_lan_v6 = ipaddress.IPv6Interface("2001:db8:20::1/64")

    def __init__(self, name: str = "lab", run_root: Path | str = RUN_ROOT) -> None:
        if not name or len(name) > 40 or not all(c.isalnum() or c in "-_" for c in name):
            raise LabError(f"bad lab name {name!r}: use up to 40 letters, digits, - or _")
        self.name = name
        self.rundir = Path(run_root) / name
        self.h1 = Netns(f"{name}-h1")
        self.r = Netns(f"{name}-r")
        self.h2 = Netns(f"{name}-h2")
        self.frr = Frr(self.r, self.rundir / "r")
        self.static_routes = (
            StaticRoute(self.h1_lan_v4.network, (self.h1_link.host_v4.ip,)),
            StaticRoute(self.h1_lan_v6.network, (self.h1_link.host_v6.ip,)),
            StaticRoute(self.h2_lan_v4.network, tuple(ln.host_v4.ip for ln in self.h2_links)),
            StaticRoute(self.h2_lan_v6.network, tuple(ln.host_v6.ip for ln in self.h2_links)),
        )

    def __repr__(self) -> str:
        return f"Lab({self.name!r})"

    @property
    def namespaces(self) -> tuple[Netns, Netns, Netns]:
        return (self.h1, self.r, self.h2)

    @property
    def links(self) -> tuple[LabLink, ...]:
        return (self.h1_link, *self.h2_links)

    @property
    def router_interfaces(self) -> list[str]:
        """r's interfaces facing the hosts (for ``fibsync run -i …``)."""
        return [link.router_if for link in self.links]

    def frr_config(self) -> str:
        lines = ["frr defaults traditional"]
        for route in self.static_routes:
            keyword = "ip" if route.prefix.version == 4 else "ipv6"
            lines += [f"{keyword} route {route.prefix} {gw}" for gw in route.gateways]
        return "\n".join(lines) + "\n"

    # -- lifecycle

    def up(self, timeout: float = 30) -> None:
        """Build the lab; nothing to do when it already works; rebuild a broken one."""
        if self.healthy():
            log.info("lab.up", lab=self.name, already=True)
            return
        if self.exists():
            log.warning("lab.rebuild", lab=self.name, problems=self._problems())
            self.down()
        try:
            self._build(timeout)
        except BaseException:
            self.down()
            raise
        log.info("lab.up", lab=self.name, router_interfaces=self.router_interfaces)

    def _build(self, timeout: float) -> None:
        self.rundir.mkdir(parents=True, exist_ok=True)
        for ns in self.namespaces:
            ns.create()
            ns.sysctl("net.ipv4.conf.all.rp_filter", 0)
            ns.sysctl("net.ipv4.conf.default.rp_filter", 0)
        hosts = ((self.h1_link, self.h1), (self.h2_links[0], self.h2), (self.h2_links[1], self.h2))
        for link, host in hosts:
            veth(self.r, link.router_if, host, link.host_if)
            for ns, ifname, addrs in ((self.r, link.router_if, (link.router_v4, link.router_v6)),
                                      (host, link.host_if, (link.host_v4, link.host_v6))):
                for addr in addrs:
                    ns.ip("addr", "add", str(addr), "dev", ifname, "nodad")
        for host, lan in ((self.h1, (self.h1_lan_v4, self.h1_lan_v6)),
                          (self.h2, (self.h2_lan_v4, self.h2_lan_v6))):
            _add_stub_interface(host, self.LAN_IF)
            for addr in lan:
                host.ip("addr", "add", str(addr), "dev", self.LAN_IF, "nodad")
            host.ip("link", "set", self.LAN_IF, "up")
        self.h1.ip("route", "add", "default", "via", str(self.h1_link.router_v4.ip))
        self.h1.ip("-6", "route", "add", "default", "via", str(self.h1_link.router_v6.ip))
        # h2 answers over both links, so return traffic is ECMP too.
        for family, attr in (("-4", "router_v4"), ("-6", "router_v6")):
            hops: list[str] = []
            for link in self.h2_links:
                hops += ["nexthop", "via", str(getattr(link, attr).ip), "dev", link.host_if]
            self.h2.ip(family, "route", "add", "default", *hops)
        self.set_forwarding(True)
        self.frr.start(self.DAEMONS, self.frr_config())
        try:
            wait_until(lambda: not self._missing_routes(), timeout=timeout,
                       what=f"FRR to install the static routes in {self.r}", interval=0.2)
        except LabError as exc:
            raise LabError(f"{exc}; still missing: {', '.join(self._missing_routes())}; "
                           f"zebra log: {_tail(self.frr.log_file('zebra'))}") from None

    def down(self) -> None:
        """Remove everything the lab made; works from the name alone, after any crash.

        Each step runs even when an earlier one failed, so one stuck process
        does not leave the rest of the lab behind; the failures are raised
        together at the end.
        """
        errors = []
        for step in (self.frr.stop, *(ns.delete for ns in self.namespaces)):
            try:
                step()
            except LabError as exc:
                errors.append(str(exc))
        shutil.rmtree(self.rundir, ignore_errors=True)
        if errors:
            raise LabError(f"lab {self.name} not fully removed: {'; '.join(errors)}")
        log.info("lab.down", lab=self.name)

    def set_forwarding(self, on: bool) -> None:
        """Turn IPv4 and IPv6 forwarding in r on or off (``all`` and so every interface).

        fibsync honours these sysctls: with forwarding off the router forwards
        nothing, XDP or not. To show that XDP carried traffic, keep forwarding
        on and watch ``self.r.kernel_forwarded()`` stay flat.
        """
        for key in ("net.ipv4.conf.all.forwarding", "net.ipv6.conf.all.forwarding"):
            self.r.sysctl(key, int(on))

    # -- inspection

    def exists(self) -> bool:
        """Anything of the lab is left: a namespace, a daemon or its run directory."""
        return (any(ns.exists() for ns in self.namespaces) or bool(self.frr.pids())
                or self.rundir.exists())

    def healthy(self) -> bool:
        return not self._problems()

    def _problems(self) -> list[str]:
        problems = [f"namespace {ns} missing" for ns in self.namespaces if not ns.exists()]
        if problems:
            return problems
        expected = {self.r: [*self.router_interfaces],
                    self.h1: [self.h1_link.host_if, self.LAN_IF],
                    self.h2: [ln.host_if for ln in self.h2_links] + [self.LAN_IF]}
        for ns, ifnames in expected.items():
            links = {link["ifname"]: link for link in ns.ip_json("link", "show")}
            for ifname in ifnames:
                if ifname not in links:
                    problems.append(f"{ns}: {ifname} missing")
                elif "UP" not in links[ifname].get("flags", []):
                    problems.append(f"{ns}: {ifname} down")
        pids = self.frr.pids()
        problems += [f"{d} not running" for d in self.DAEMONS if d not in pids]
        if not problems:
            problems += [f"route {p} not installed" for p in self._missing_routes()]
        return problems

    def _missing_routes(self) -> list[str]:
        """Static routes not (yet) in r's kernel as FRR installs them: via nhid.

        Routes are matched by prefix, not by ``proto static``: FRR's staticd uses
        protocol 196, which FRR's rt_protos.d also names "static", so iproute2
        resolves the filter to RTPROT_STATIC (4) and finds nothing.
        """
        nexthops = {nh["id"]: nh for nh in self.r.ip_json("nexthop", "show")}
        installed = {}
        for family in ("-4", "-6"):
            for route in self.r.ip_json(family, "route", "show"):
                installed[route["dst"]] = route
        missing = []
        for route in self.static_routes:
            nhid = installed.get(str(route.prefix), {}).get("nhid")
            nexthop = nexthops.get(nhid) if nhid is not None else None
            if nexthop is None or len(nexthop.get("group", [nexthop])) != len(route.gateways):
                missing.append(str(route.prefix))
        return missing

    def status(self) -> dict[str, Any]:
        """The lab's state as plain data (JSON-ready)."""
        namespaces = {ns.name: ns.exists() for ns in self.namespaces}
        problems = self._problems() if any(namespaces.values()) else ["lab is down"]
        forwarding = None
        if self.r.exists():
            forwarding = {key: self.r.read_sysctl(f"net.{key}.conf.all.forwarding") == "1"
                          for key in ("ipv4", "ipv6")}
        return {
            "name": self.name,
            "up": not problems,
            "problems": problems,
            "namespaces": namespaces,
            "daemons": self.frr.pids(),
            "forwarding": forwarding,
            "router": self.r.name,
            "router_interfaces": self.router_interfaces,
            "rundir": str(self.rundir),
            "static_routes": [{"prefix": str(rt.prefix), "gateways": [str(g) for g in rt.gateways]}
                              for rt in self.static_routes],
        }
