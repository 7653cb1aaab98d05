"""The daemon under systemd/fibsync.service's sandbox: it starts, syncs and forwards.

There is no systemd as PID 1 on the machines the suite runs on, so this test
reads the unit file and builds the same sandbox by hand, as far as Linux
allows outside systemd:

- CapabilityBoundingSet, NoNewPrivileges: ``setpriv`` (root keeps exactly the
  bounding set, as under systemd);
- SystemCallFilter (in order, with the groups ``systemd-analyze syscall-filter``
  defines), SystemCallArchitectures=native, RestrictAddressFamilies,
  RestrictNamespaces (``net``: setns and clone into network namespaces only,
  EPERM for other types, as systemd answers): a seccomp filter made with
  libseccomp, which KILLS on anything else (stricter than the unit's EPERM: a
  call the filter misses cannot go unnoticed);
- MemoryDenyWriteExecute: prctl(PR_SET_MDWE);
- ProtectSystem=strict with ReadWritePaths and the RuntimeDirectory,
  ProtectKernelTunables, ProtectControlGroups, ProtectHome, PrivateTmp,
  PrivateDevices, ProtectProc=invisible, UMask, and the inaccessible
  /usr/lib/modules of ProtectKernelModules (should the unit set it): a private
  mount namespace, checked by probes before the daemon starts.

The unit's ExecStartPre (``fibsync check``) runs in the same sandbox first.

Not reproduced (docs/operations.md lists them): IPAddressDeny/Allow (cgroup
BPF), ProtectClock/ProtectHostname/ProtectKernelLogs beyond what the syscall
filter and the private /dev and /proc already take away.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fibsync.config import RUN_DIR
from fibsync.demo import RouterDaemon, fibsync_argv
from fibsync.lab import Lab, wait_until

from .test_operations_restart import Ping, XdpProof, assert_no_loss, warm_up
from .test_operations_status import http_get, metric

pytestmark = pytest.mark.privileged

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "fibsync.service"
FAMILIES = {"AF_UNIX": 1, "AF_INET": 2, "AF_INET6": 10, "AF_NETLINK": 16}


def unit_service() -> dict[str, list[str]]:
    """The [Service] section: key -> values, in order."""
    out: dict[str, list[str]] = {}
    section = ""
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]":
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def syscall_groups() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    current = None
    text = subprocess.run(["systemd-analyze", "syscall-filter"], capture_output=True,
                          text=True, check=True).stdout
    for line in text.splitlines():
        if line.startswith("@"):
            current = out.setdefault(line.strip(), [])
        elif line.strip() and not line.strip().startswith("#") and current is not None:
            current.append(line.strip())
    return out


def allowed_syscalls(filters: list[str]) -> set[str]:
    """SystemCallFilter= lines, applied in order as systemd does (the first is an allow list)."""
    groups = syscall_groups()

    def expand(names: list[str]) -> set[str]:
        out: set[str] = set()
        for name in names:
            out |= expand(groups[name]) if name.startswith("@") else {name}
        return out

    assert not filters[0].startswith("~"), "the unit's first SystemCallFilter must allow"
    allowed: set[str] = set()
    for line in filters:
        if line.startswith("~"):
            allowed -= expand(line[1:].split())
        else:
            allowed |= expand(line.split())
    return allowed


LOADER = r"""
import ctypes, errno, json, os, sys
spec, argv = json.loads(sys.argv[1]), sys.argv[2:]
lib = ctypes.CDLL("libseccomp.so.2")
lib.seccomp_init.restype = ctypes.c_void_p
lib.seccomp_init.argtypes = [ctypes.c_uint32]
lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                       ctypes.c_uint, ctypes.c_void_p]
lib.seccomp_load.argtypes = [ctypes.c_void_p]

class Cmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("a", ctypes.c_uint64),
                ("b", ctypes.c_uint64)]

KILL, ALLOW, EQ, MASKED_EQ = 0x80000000, 0x7FFF0000, 4, 7
NS_FLAGS = 0x7E020000  # CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET
CLONE_NEWNET = 0x40000000
ctx = lib.seccomp_init(KILL)

def rule(action, name, *cmps):
    nr = lib.seccomp_syscall_resolve_name(name.encode())
    if nr < 0:
        return  # not a system call of this architecture
    arr = (Cmp * len(cmps))(*cmps) if cmps else None
    rc = lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), arr)
    if rc < 0:
        sys.exit(f"seccomp: cannot add {name}: {os.strerror(-rc)}")

special = {"socket", "clone", "clone3", "setns", "unshare"}
for name in spec["allow"]:
    if name not in special:
        rule(ALLOW, name)
if "socket" in spec["allow"]:
    for family in spec["families"]:
        rule(ALLOW, "socket", Cmp(0, EQ, family, 0))
if spec["restrict_namespaces"] is not None:
    # RestrictNamespaces=: the namespace types listed may be entered or made, others EPERM
    net = "net" in spec["restrict_namespaces"]
    others = NS_FLAGS & ~CLONE_NEWNET if net else NS_FLAGS
    rule(ALLOW, "clone", Cmp(0, MASKED_EQ, others, 0))
    rule(0x00050000 | errno.ENOSYS, "clone3")  # what systemd answers: glibc falls back to clone
    if net:
        rule(ALLOW, "setns", Cmp(1, EQ, CLONE_NEWNET, 0))
        rule(ALLOW, "unshare", Cmp(0, EQ, CLONE_NEWNET, 0))
    for name in ("setns", "unshare"):
        if not net:
            rule(0x00050000 | errno.EPERM, name)
else:
    for name in special - {"socket"}:
        if name in spec["allow"]:
            rule(ALLOW, name)
if spec["mdwe"]:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
        sys.exit(f"PR_SET_MDWE: {os.strerror(ctypes.get_errno())}")
if lib.seccomp_load(ctx) != 0:
    sys.exit("seccomp_load failed")
os.execv(argv[0], argv)
"""

# The file-system view of ProtectSystem=strict & co. Every probe must behave before the
# daemon starts, so that a sandbox this script failed to build cannot pass for the unit's.
SANDBOX = r"""
set -euo pipefail
netns=$1 rw_paths=$2 runtime=$3 caps=$4 umask_value=$5 protect_modules=$6
shift 6
# ProtectSystem=strict, ProtectKernelTunables, ProtectControlGroups: everything read-only
for mp in $(awk '{print $5}' /proc/self/mountinfo | sort -u); do
  case "$mp" in /proc|/proc/*|/dev|/dev/*) continue ;; esac
  mount -o remount,bind,ro "$mp" 2>/dev/null || true
done
# ProtectProc=invisible; ProtectKernelTunables: /proc/sys read-only
mount -t proc -o hidepid=invisible proc /proc
mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys
# PrivateTmp
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /var/tmp
# PrivateDevices: only the pseudo devices
mkdir /tmp/.dev && mount --rbind /dev /tmp/.dev
mount -t tmpfs -o mode=755,nosuid tmpfs /dev
for d in null zero full random urandom tty; do
  touch /dev/$d && mount --bind /tmp/.dev/$d /dev/$d
done
mkdir /dev/shm /dev/pts && mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm
ln -s /proc/self/fd /dev/fd
umount -l /tmp/.dev && rmdir /tmp/.dev
# ProtectHome
for home in /home /root /run/user; do
  [ -d "$home" ] && mount -t tmpfs -o ro,mode=755 tmpfs "$home"
done
# ProtectKernelModules: /usr/lib/modules (and with it the headers under .../build) is gone
if [ "$protect_modules" = yes ]; then
  mount -t tmpfs -o ro,mode=000 tmpfs /usr/lib/modules
fi
# ReadWritePaths and RuntimeDirectory
for path in $rw_paths $runtime; do
  mount --bind "$path" "$path" && mount -o remount,bind,rw "$path"
done
umask "$umask_value"
# the probes (bpffs holds directories and pins, no files, no dots in names)
mkdir /sys/fs/bpf/fibsync-probe
rmdir /sys/fs/bpf/fibsync-probe
touch "$runtime/.probe"
rm "$runtime/.probe"
for path in /etc/fsprobe /usr/fsprobe /var/fsprobe /sys/class/fsprobe "$PWD/fsprobe"; do
  if touch "$path" 2>/dev/null; then
    rm -f "$path"; echo "sandbox: $path is writable" >&2; exit 97
  fi
done
[ -w /proc/sys/net/ipv4/ip_forward ] && { echo "sandbox: /proc/sys is writable" >&2; exit 97; }
[ -e /dev/kmsg ] && { echo "sandbox: /dev is not private" >&2; exit 97; }
exec nsenter --net=/run/netns/"$netns" -- \
  setpriv --bounding-set "$caps" --inh-caps -all --no-new-privs -- "$@"
"""


def _namespaces(value: str) -> list[str] | None:
    """RestrictNamespaces=: the namespace types allowed, None when unrestricted."""
    if value == "no":
        return None
    if value == "yes":
        return []
    assert not value.startswith("~"), "a deny list: teach the sandbox"
    return value.split()


def sandbox(unit: dict[str, list[str]], netns: str) -> list[str]:
    """An argv prefix that runs a command as the unit would, in ``netns``."""
    caps = unit["CapabilityBoundingSet"][0].split()
    setpriv_caps = "-all," + ",".join("+" + c.removeprefix("CAP_").lower() for c in caps)
    assert unit["NoNewPrivileges"] == ["yes"] and unit["ProtectSystem"] == ["strict"]
    assert unit["ProtectHome"] == ["yes"] and unit["PrivateTmp"] == ["yes"]
    assert unit["PrivateDevices"] == ["yes"] and unit["ProtectKernelTunables"] == ["yes"]
    assert unit["SystemCallArchitectures"] == ["native"]
    spec = {
        "allow": sorted(allowed_syscalls(unit["SystemCallFilter"])),
        "families": [FAMILIES[f] for f in unit["RestrictAddressFamilies"][0].split()],
        "restrict_namespaces": _namespaces(unit.get("RestrictNamespaces", ["no"])[0]),
        "mdwe": unit.get("MemoryDenyWriteExecute") == ["yes"],
    }
    rw_paths = " ".join(p for line in unit.get("ReadWritePaths", []) for p in line.split())
    runtime = " ".join(str(Path("/run") / d) for d in unit["RuntimeDirectory"][0].split())
    return ["unshare", "--mount", "--propagation", "private", "--", "bash", "-c", SANDBOX,
            "sandbox", netns, rw_paths, runtime, setpriv_caps, unit.get("UMask", ["0022"])[0],
            unit.get("ProtectKernelModules", ["no"])[0],
            sys.executable, "-c", LOADER, json.dumps(spec)]


@pytest.fixture
def notify(lab: Lab) -> Iterator[socket.socket]:
    """A NOTIFY_SOCKET the sandbox can reach (not under /tmp: PrivateTmp hides it)."""
    path = lab.rundir / "notify"
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind(str(path))
    sink.settimeout(0.2)
    try:
        yield sink
    finally:
        sink.close()
        path.unlink(missing_ok=True)


def received(sink: socket.socket) -> list[str]:
    out = []
    while True:
        try:
            out += sink.recv(4096).decode().splitlines()
        except TimeoutError:
            return out


def test_the_daemon_syncs_and_forwards_inside_the_units_sandbox(
        lab: Lab, notify: socket.socket) -> None:
    unit = unit_service()
    assert unit["Type"] == ["notify"] and unit["WatchdogSec"]
    config = lab.rundir / "fibsync.toml"
    config.write_text(f"interfaces = {json.dumps(lab.router_interfaces)}\n"
                      '[status]\nsocket_group = "nogroup"\n[metrics]\nlisten = "9477"\n')
    os.chmod(config, 0o644)
    os.chmod(lab.rundir, 0o755)
    d = RouterDaemon(lab.r, lab.rundir, lab.name, [], ["--config", str(config)],
                     env={"NOTIFY_SOCKET": str(lab.rundir / "notify"),
                          "WATCHDOG_USEC": "1000000"},
                     wrap=sandbox(unit, lab.r.name))
    # ExecStartPre first: the probes (headers, bpf_fib_lookup, XDP) under the same sandbox
    (pre,) = unit["ExecStartPre"]
    assert pre.split()[1:] == ["check", "--config", "/etc/fibsync/fibsync.toml"]
    r = subprocess.run([*sandbox(unit, lab.r.name), *fibsync_argv(), "check", "--config",
                        str(config)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "  ok       headers" in r.stdout and "  ok       bpf_fib_lookup" in r.stdout
    try:
        start(d)
        messages = received(notify)
        assert "READY=1" in messages and "WATCHDOG=1" in messages, (messages, d.log_tail())
        caps = _capabilities(d.pid)
        assert caps == {c.removeprefix("CAP_").lower()
                        for c in unit["CapabilityBoundingSet"][0].split()}
        sock = RUN_DIR / f"{d.instance}.sock"
        assert stat.S_IMODE(sock.stat().st_mode) == 0o660
        assert sock.stat().st_gid == int(subprocess.run(
            ["getent", "group", "nogroup"], capture_output=True, text=True).stdout.split(":")[2])

        # the router's kernel forwarding stays on; warm_up waits for pings it does not
        # count as forwarded: the XDP program carried them
        src, dst = str(lab.h1_lan_v4.ip), str(lab.h2_lan_v4.ip)
        warm_up(lab, src, dst)
        warm_up(lab, str(lab.h1_lan_v6.ip), str(lab.h2_lan_v6.ip))
        assert d.status()["counters"]["FWD_FAST"]["packets"] > 0
        assert metric(http_get(lab, "http://127.0.0.1:9477/metrics"), "fibsync_synced") == 1

        # a SIGHUP that resyncs, and a stop and a start that adopts the maps, all inside
        # the sandbox, under a ping that must not lose a packet nor leave XDP
        proof = XdpProof(lab, d)
        ping = Ping(lab, src, dst)
        try:
            config.write_text('protocols = ["static", "kernel"]\n' + config.read_text())
            assert d.pid is not None
            os.kill(d.pid, signal.SIGHUP)
            wait_until(lambda: d.status()["netlink"]["resyncs"] == 2, timeout=10,
                       what="the reload to resync with the new filter")
            d.stop()
            assert d.proc is not None and d.proc.returncode == 0, d.log_tail()
            start(d)
            time.sleep(0.3)
        finally:
            sent, answered = ping.stop()
            ping.kill()
        assert_no_loss(sent, answered, at_least=30)
        proof.check(crossed=2 * len(answered))
        doc = d.status()
        assert "maps" in doc, (doc, d.log_tail())
        assert {n: m["origin"] for n, m in doc["maps"].items() if m["origin"] != "adopted"} \
            == {"routes_v4": "renewed", "routes_v6": "renewed"}
        assert doc["problems"] == []
        errors = [e for e in d.logs() if e.get("level") == "error"]
        assert not errors, errors
    finally:
        d.stop()
        d.cli("detach", "--force", check=False)
        d.remove_pins()


def start(d: RouterDaemon) -> None:
    try:
        d.start()
    except Exception as e:
        raise AssertionError(f"{e}\n{d.log_tail()}") from None


def _capabilities(pid: int | None) -> set[str]:
    """The effective capabilities of a process, by name (capsh decodes the mask)."""
    assert pid is not None
    status = Path(f"/proc/{pid}/status").read_text()
    mask = re.search(r"^CapEff:\s*([0-9a-f]+)", status, re.M).group(1)  # type: ignore[union-attr]
    text = subprocess.run(["capsh", f"--decode={mask}"], capture_output=True, text=True,
                          check=True).stdout
    return {c.removeprefix("cap_") for c in text.strip().split("=")[-1].split(",") if c}


def test_the_unit_file_is_valid_and_its_exposure_is_documented(tmp_path: Path) -> None:
    # verify wants the commands to exist: the installed copy's become this checkout's
    # (tests/netns/test_install.py verifies the unit `make install` writes)
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/opt/fibsync/bin/fibsync", fibsync_argv()[0]))
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager",
                        str(unit)], capture_output=True, text=True)
    m = re.search(r"Overall exposure level for fibsync.service: (\d+\.\d)", r.stdout)
    assert m, r.stdout[-500:]
    docs = (UNIT.parents[1] / "docs" / "operations.md").read_text()
    assert f"exposure level {m.group(1)}" in docs, \
        f"docs/operations.md must state the unit's exposure ({m.group(1)})"
