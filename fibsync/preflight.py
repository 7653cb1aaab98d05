"""What the daemon needs from this host, probed without changing anything (``fibsync check``).

Each probe gives one ``Finding``: the kernel release against the minimum, BTF,
the headers bcc compiles against, the ``bpf_fib_lookup`` flags the XDP program
uses (asked of the kernel itself: a flag it does not know makes the helper
return -EINVAL), XDP on each interface's driver (the kernel's own xdp-features,
reported over netdev generic netlink since 6.3), and a metrics listener that
the installed unit's IP filter would cut off. ``check`` runs as the unit's
ExecStartPre, so a start that cannot work stops there, with the reason.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import re
import socket
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .config import Settings, split_listen
from .errors import FibsyncError, MapError
from .netlink import rtnl

Severity = Literal["ok", "warning", "error"]

# The newest kernel feature fibsync relies on is IFLA_XDP_EXPECTED_FD (5.7, the
# hitless program swap); BPF_F_MMAPABLE arrays (DIR-24-8) came in 5.5, DEVMAP_HASH
# in 5.4. 5.10 is the first long-term kernel with all of them. Tested on 6.18 only.
MIN_KERNEL = (5, 10)

# bpf_fib_lookup flags (UAPI BPF_FIB_LOOKUP_*): value and the release that added it
FIB_LOOKUP_FLAGS: dict[str, tuple[int, tuple[int, int]]] = {
    "DIRECT": (1 << 0, (4, 18)),
    "OUTPUT": (1 << 1, (4, 18)),
    "SKIP_NEIGH": (1 << 2, (6, 3)),
    "TBID": (1 << 3, (6, 5)),
    "SRC": (1 << 4, (6, 7)),
    "MARK": (1 << 5, (6, 10)),
}

# NETDEV_XDP_ACT_* (include/uapi/linux/netdev.h)
XDP_BASIC, XDP_REDIRECT, XDP_NDO_XMIT = 1 << 0, 1 << 1, 1 << 2

# systemd's unit search path for system units, most important first
UNIT_PATH = ("/etc/systemd/system", "/run/systemd/system", "/usr/local/lib/systemd/system",
             "/usr/lib/systemd/system", "/lib/systemd/system")
UNIT_NAME = "fibsync.service"


@dataclass(frozen=True)
class Finding:
    what: str  # "kernel", "headers", "xdp r-h1", ...
    severity: Severity
    text: str

    def doc(self) -> dict[str, str]:
        return {"what": self.what, "severity": self.severity, "text": self.text}


def run(settings: Settings) -> list[Finding]:
    from .fastpath.program import bpf_source_dir

    release = os.uname().release
    findings = [kernel(release), btf(), headers(release)]
    try:
        findings.append(fib_lookup_flags(bpf_source_dir()))
    except FibsyncError as e:
        findings.append(Finding("source", "error", str(e)))
    findings += [xdp_driver(name, settings.xdp_mode) for name in settings.interfaces]
    if metrics := metrics_reachable(settings.metrics_listen):
        findings.append(metrics)
    return findings


# ---------------------------------------------------------------- kernel


def kernel_version(release: str) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", release)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def kernel(release: str) -> Finding:
    version = kernel_version(release)
    minimum = ".".join(map(str, MIN_KERNEL))
    if version < MIN_KERNEL:
        return Finding("kernel", "error", f"{release} is older than {minimum}, the oldest "
                       "kernel with every BPF and XDP feature fibsync uses")
    return Finding("kernel", "ok", f"{release} (fibsync needs {minimum} or later)")


def btf(path: Path = Path("/sys/kernel/btf/vmlinux")) -> Finding:
    if path.exists():
        return Finding("btf", "ok", f"{path} present")
    return Finding("btf", "ok", f"{path} absent: not needed, bcc builds the program from "
                   "the kernel headers")


def headers(release: str, modules: Path = Path("/lib/modules"),
            kheaders: Path = Path("/sys/kernel/kheaders.tar.xz")) -> Finding:
    """The headers bcc looks for: the build or source tree of the running kernel, or
    the kernel's own archive (CONFIG_IKHEADERS)."""
    for sub in ("build", "source"):
        tree = modules / release / sub
        if _readable(tree / "include" / "linux" / "kconfig.h"):
            return Finding("headers", "ok", f"{tree} -> {tree.resolve()}")
    if _readable(kheaders):
        return Finding("headers", "ok", f"{kheaders} (the kernel's own archive)")
    return Finding("headers", "error", f"no kernel headers for {release} in "
                   f"{modules / release}/build: bcc cannot compile the XDP program (install "
                   f"linux-headers-{release}, or run `make bootstrap-runtime`; under systemd, "
                   "ProtectKernelModules= hides them)")


def _readable(path: Path) -> bool:
    try:
        return path.exists() and os.access(path, os.R_OK)
    except OSError:  # EACCES on a directory on the way
        return False


# ---------------------------------------------------------------- bpf_fib_lookup

_BPF_PROG_TYPE_XDP = 6
_FN_FIB_LOOKUP = 69
_EINVAL = 22
_PROBE_UNKNOWN_FLAG, _PROBE_KNOWN_FLAG = 1, 2  # XDP_DROP, XDP_PASS


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def fib_probe_program(flags: int) -> bytes:
    """An XDP program that calls bpf_fib_lookup(ctx, zeroed params, 64, flags) and
    returns XDP_DROP when the helper answered -EINVAL (an unknown flag; it checks
    flags before anything else), XDP_PASS otherwise (family 0: -EAFNOSUPPORT)."""
    code = [_insn(0xBF, 6, 1), _insn(0xB7, 1, imm=0)]  # r6 = ctx; r1 = 0
    code += [_insn(0x7B, 10, 1, off=-8 * i) for i in range(1, 9)]  # 64 zero bytes of stack
    code += [
        _insn(0xBF, 2, 10), _insn(0x07, 2, imm=-64),  # r2 = params
        _insn(0xBF, 1, 6), _insn(0xB7, 3, imm=64), _insn(0xB7, 4, imm=flags),
        _insn(0x85, imm=_FN_FIB_LOOKUP),
        _insn(0x15, 0, off=2, imm=-_EINVAL),  # if r0 == -EINVAL goto unknown
        _insn(0xB7, 0, imm=_PROBE_KNOWN_FLAG), _insn(0x95),
        _insn(0xB7, 0, imm=_PROBE_UNKNOWN_FLAG), _insn(0x95),
    ]
    return b"".join(code)


def kernel_fib_flags() -> set[str]:
    """The bpf_fib_lookup flags this kernel accepts, asked of the kernel."""
    from .fastpath import bpfsys

    supported = set()
    packet = bytes(64)
    for name, (value, _since) in {"none": (0, (0, 0)), **FIB_LOOKUP_FLAGS}.items():
        fd = bpfsys.prog_load(_BPF_PROG_TYPE_XDP, fib_probe_program(value), name="fs_probe")
        try:
            retval, _out, _ns = bpfsys.prog_test_run(fd, packet)
        finally:
            os.close(fd)
        if retval == _PROBE_KNOWN_FLAG:
            supported.add(name)
    if "none" not in supported:
        raise FibsyncError("bpf_fib_lookup refused flags 0: the probe itself is broken")
    return supported - {"none"}


def flags_used(bpf_dir: Path) -> set[str]:
    """BPF_FIB_LOOKUP_* named in the program's code (comments left out)."""
    used: set[str] = set()
    for source in sorted(bpf_dir.glob("*.[ch]")):
        text = re.sub(r"/\*.*?\*/|//[^\n]*", "", source.read_text(), flags=re.S)
        used |= set(re.findall(r"\bBPF_FIB_LOOKUP_([A-Z_]+)\b", text))
    return used & set(FIB_LOOKUP_FLAGS)


def fib_lookup_flags(bpf_dir: Path) -> Finding:
    used = flags_used(bpf_dir)
    try:
        supported = kernel_fib_flags()
    except MapError as e:
        # without the privileges the daemon has, check can still validate a config
        severity: Severity = "warning" if e.errno == errno.EPERM else "error"
        return Finding("bpf_fib_lookup", severity, f"cannot probe the kernel ({e}): the "
                       "daemon needs root, or CAP_BPF and CAP_SYS_ADMIN, and a kernel with BPF")
    missing = sorted(used - supported, key=list(FIB_LOOKUP_FLAGS).index)
    if missing:
        need = max(FIB_LOOKUP_FLAGS[f][1] for f in missing)
        return Finding("bpf_fib_lookup", "error", f"the XDP program uses flags "
                       f"{', '.join(missing)}, which this kernel does not know "
                       f"(they need {'.'.join(map(str, need))} or later)")
    known = ", ".join(f for f in FIB_LOOKUP_FLAGS if f in supported)
    uses = ", ".join(f for f in FIB_LOOKUP_FLAGS if f in used) or "none"
    return Finding("bpf_fib_lookup", "ok", f"flags used: {uses}; the kernel knows {known}")


# ---------------------------------------------------------------- XDP per interface


def driver(ifname: str) -> str:
    """The NIC's driver (sysfs), or the kind of a virtual link (veth, bond, ...)."""
    link = Path("/sys/class/net", ifname, "device", "driver")
    if link.exists():
        return os.path.basename(os.readlink(link))
    return _link_kind(ifname) or "virtual device"


def _link_kind(ifname: str) -> str:
    """IFLA_INFO_KIND of the link ("" when it has none, or is gone)."""
    try:
        body = rtnl.IFINFOMSG.pack(rtnl.AF_UNSPEC, 0, socket.if_nametoindex(ifname), 0, 0)
        with rtnl.Rtnl() as nl:
            for _mtype, payload in nl.ask(rtnl.RTM_GETLINK, body):
                for kind, value in rtnl.attrs(payload, rtnl.IFINFOMSG.size):
                    if kind == rtnl.IFLA_LINKINFO:
                        info = dict(rtnl.attrs(value))
                        return info.get(rtnl.IFLA_INFO_KIND, b"").rstrip(b"\0").decode()
    except OSError:
        pass
    return ""


def xdp_features() -> dict[int, int] | None:
    """ifindex -> NETDEV_XDP_ACT_* bits of every device in this namespace, or None
    where the kernel has no netdev family (before 6.3)."""
    from pyroute2.netlink import NLM_F_DUMP, NLM_F_REQUEST, genlmsg
    from pyroute2.netlink.exceptions import NetlinkError
    from pyroute2.netlink.generic import GenericNetlinkSocket

    class netdevmsg(genlmsg):  # type: ignore[misc]  # pyroute2 is untyped; its naming
        nla_map = (("NETDEV_A_DEV_UNSPEC", "none"), ("NETDEV_A_DEV_IFINDEX", "uint32"),
                   ("NETDEV_A_DEV_PAD", "none"), ("NETDEV_A_DEV_XDP_FEATURES", "uint64"))

    sock = GenericNetlinkSocket()
    try:
        try:
            sock.bind("netdev", netdevmsg)
        except NetlinkError:
            return None
        msg = netdevmsg()
        msg["cmd"] = 1  # NETDEV_CMD_DEV_GET
        msg["version"] = 1
        replies = sock.nlm_request(msg, msg_type=sock.prid,
                                   msg_flags=NLM_F_REQUEST | NLM_F_DUMP)
        return {r.get_attr("NETDEV_A_DEV_IFINDEX"): r.get_attr("NETDEV_A_DEV_XDP_FEATURES") or 0
                for r in replies}
    finally:
        sock.close()


def xdp_driver(ifname: str, mode: str,
               features: dict[int, int] | None | Literal["probe"] = "probe",
               drv: str | None = None) -> Finding:
    """``features``: ifindex -> NETDEV_XDP_ACT_* bits, None where the kernel cannot say,
    "probe" to ask the kernel."""
    what = f"xdp {ifname}"
    try:
        ifindex = socket.if_nametoindex(ifname)
    except OSError:
        return Finding(what, "error", f"{ifname} does not exist in this network namespace")
    drv = drv or driver(ifname)
    if isinstance(features, str):
        features = xdp_features()
    if features is None:
        return Finding(what, "ok", f"{drv}: this kernel (before 6.3) does not say whether "
                       f"the driver does native XDP; xdp_mode {mode} decides at attach")
    bits = features.get(ifindex, 0)
    if not bits & XDP_BASIC:
        text = f"{drv}: no native XDP in this driver, generic only"
        if mode == "native":
            return Finding(what, "error", f"{text}, and xdp_mode is native (use auto or generic)")
        return Finding(what, "warning" if mode == "auto" else "ok",
                       f"{text} (slower: it runs after the kernel built an skb)")
    if not bits & XDP_REDIRECT:
        return Finding(what, "warning", f"{drv}: native XDP without XDP_REDIRECT: frames "
                       "arriving here go to the kernel")
    target = ("takes redirected frames" if bits & XDP_NDO_XMIT else
              "takes redirected frames only once XDP runs on it (veth: or GRO on its peer)")
    used = "native" if mode in ("auto", "native") else "generic (xdp_mode)"
    return Finding(what, "ok", f"{drv}: native XDP with redirect, {target}; fibsync uses {used}")


# ---------------------------------------------------------------- metrics and the unit


def unit_settings(name: str = UNIT_NAME, search: Sequence[str] | None = None
                  ) -> dict[str, list[str]] | None:
    """[Service] assignments of the installed unit and its drop-ins, in systemd's
    order (an empty assignment resets a list); None when no unit is installed.
    ``$SYSTEMD_UNIT_PATH`` replaces the search path, as it does for systemd."""
    if search is None:
        env = os.environ.get("SYSTEMD_UNIT_PATH")
        search = env.split(":") if env else UNIT_PATH
    main = next((Path(d) / name for d in search if (Path(d) / name).is_file()), None)
    if main is None:
        return None
    dropins: dict[str, Path] = {}
    for d in reversed(search):  # earlier directories win for the same file name
        for conf in sorted((Path(d) / f"{name}.d").glob("*.conf")):
            dropins[conf.name] = conf
    out: dict[str, list[str]] = {}
    for path in [main, *(dropins[k] for k in sorted(dropins))]:
        section = ""
        for line in path.read_text().splitlines():
            line = line.strip()
            if not line or line[0] in "#;":
                continue
            if line.startswith("["):
                section = line
            elif section == "[Service]" and "=" in line:
                key, _, value = line.partition("=")
                values = out.setdefault(key.strip(), [])
                if value.strip():
                    values += value.split()
                else:
                    values.clear()
    return {**out, "_path": [str(main)]}


_LOCAL = ("localhost", "127.0.0.0/8", "::1/128", "::1", "127.0.0.1")


def metrics_reachable(listen: str, unit: dict[str, list[str]] | None = None) -> Finding | None:
    """A warning when metrics listen beyond loopback but the unit lets IP traffic in
    from localhost only (IPAddressDeny=any, IPAddressAllow=localhost): scrapes from
    other hosts would be dropped without a trace."""
    if not listen:
        return None
    host, _port = split_listen(listen)
    if ipaddress.ip_address(host).is_loopback:
        return None
    unit = unit if unit is not None else unit_settings()
    if unit is None:
        return None
    deny, allow = unit.get("IPAddressDeny", []), unit.get("IPAddressAllow", [])
    if "any" not in deny or not _only_local(allow):
        return None
    return Finding("metrics", "warning", f"metrics.listen (--metrics): {listen} listens beyond "
                   f"localhost, but {unit['_path'][0]} allows IP traffic with localhost only "
                   f"(IPAddressAllow={' '.join(allow) or 'nothing'}): scrapes from other hosts "
                   "are dropped; allow your Prometheus with `systemctl edit fibsync`: "
                   "[Service] IPAddressAllow=ADDRESS")


def _only_local(allow: Iterable[str]) -> bool:
    for entry in allow:
        if entry in _LOCAL:
            continue
        try:
            if not ipaddress.ip_network(entry, strict=False).is_loopback:
                return False
        except ValueError:
            return False
    return True
