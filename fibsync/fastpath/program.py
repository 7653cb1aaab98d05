"""Build, load, pin and attach the XDP fast path.

Everything an instance owns lives under ``/sys/fs/bpf/fibsync/<instance>/``:
one pin file per map (the names of ``abi.MAP_NAMES``) and ``prog``. Maps are
created here, not by bcc, so that a restarted daemon can adopt the pinned
maps the still-attached program reads (a hitless restart), and so that a map
whose type or sizes no longer match is replaced instead of reused; the pin
of a map this version no longer has (``abi.RETIRED_MAPS``) is removed. bcc
then compiles ``bpf/fibsync.c`` against the pinned maps.

XDP is attached through rtnetlink (netlink/rtnl.py), as ``ip link set dev X xdp``
does, so the program keeps forwarding after the daemon exits; ``remove()``
takes it off.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import hashlib
import json
import os
import socket
import struct
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fibsync.config import INSTANCE_RE, PIN_ROOT
from fibsync.errors import ConfigError, FastPathError, InterfaceError, MapError
from fibsync.fastpath import abi, bpfsys
from fibsync.netlink import rtnl as nl

BPFFS = PIN_ROOT.parent
PROG_PIN = "prog"
PROG_NAME = "xdp_fibsync"

Mode = Literal["auto", "native", "generic"]
# created: no pin; adopted: the pinned map reused; replaced: the pinned map's layout
# or size differed; renewed: a map created anew on every start (abi.MapSpec.renew)
MapOrigin = Literal["adopted", "created", "replaced", "renewed"]


@dataclass(frozen=True, slots=True)
class Attachment:
    ifname: str
    ifindex: int
    mode: str  # "native", "generic" or "offload"
    prog_id: int


def bpf_source_dir() -> Path:
    """Where fibsync.c is: $FIBSYNC_BPF_DIR; else the copy an installed package
    carries (the data package ``fibsync.bpf``: fibsync/bpf/ in site-packages);
    else the repository's bpf/ beside the package (a checkout, an editable install)."""
    candidates = []
    if env := os.environ.get("FIBSYNC_BPF_DIR"):
        candidates.append(Path(env))
    package = Path(__file__).resolve().parent.parent
    candidates += [package / "bpf", package.parent / "bpf"]
    for path in candidates:
        if (path / "fibsync.c").is_file():
            return path
    raise FastPathError(
        "cannot find the XDP program's source fibsync.c (looked in "
        + ", ".join(str(p) for p in candidates)
        + "): reinstall fibsync from a wheel or sdist built by `make dist`, "
        "or set FIBSYNC_BPF_DIR"
    )


def pin_dir(instance: str) -> Path:
    if not INSTANCE_RE.fullmatch(instance):
        raise ConfigError(
            "instance",
            f"{instance!r} is not a valid instance name "
            "(up to 32 letters, digits, '_' or '-', starting with a letter or digit)",
        )
    return PIN_ROOT / instance


def ensure_bpffs() -> bool:
    """Mount bpffs at /sys/fs/bpf when nothing is mounted there, as systemd
    does; True when this call mounted it.

    Under `ip netns exec`, /sys is a fresh sysfs of a private mount namespace:
    a bpffs mounted there dies with the process, and with it the pins a
    restart would adopt. Enter namespaces with `nsenter --net=...` instead.
    """
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 2 and fields[1] == str(BPFFS) and fields[2] == "bpf":
                return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"bpf", os.fsencode(BPFFS), b"bpf", 0, None) != 0:
        err = ctypes.get_errno()
        raise FastPathError(
            f"cannot mount bpffs at {BPFFS}: {os.strerror(err)} "
            f"(try `mount -t bpf bpf {BPFFS}` as root)"
        )
    return True


class OpenMaps:
    """The pinned maps of an instance, created or adopted, before the program.

    The daemon opens them first, so that it can fill them while the program
    compiles (seconds), then calls ``load_program``. ``previous_max_id`` is the
    highest nexthop or group id a previous run left pinned, read before any map
    is replaced: the new run numbers above it, so that the old program's
    entries stay valid while the new ones go in. ``superseded`` holds fds of the
    maps a renewed or replaced pin named before (the previous run's route
    tables): their owner closes them once the first sync is done, so that the
    kernel frees a full table's entries after it, not beside the first write
    (the old program, replaced on the interfaces meanwhile, held them last).
    """

    def __init__(self, instance: str, directory: Path, map_fds: dict[str, int],
                 origin: dict[str, MapOrigin], previous: int | None, mounted: bool,
                 sizes: abi.Sizes, previous_max_id: int = 0,
                 superseded: list[int] | None = None) -> None:
        self.instance = instance
        self.pin_dir = directory
        self.map_fds = map_fds
        self.origin = origin
        self.previous_max_id = previous_max_id
        self._previous = previous
        self._mounted = mounted
        self._sizes = sizes
        self.superseded = superseded if superseded is not None else []

    @classmethod
    def open(cls, instance: str = "default", *, sizes: abi.Sizes | None = None,
             renew: bool = True) -> OpenMaps:
        sizes = sizes or abi.Sizes()
        directory = pin_dir(instance)
        mounted = ensure_bpffs()
        directory.mkdir(parents=True, exist_ok=True)
        previous = _pinned_prog_id(directory)
        previous_max_id = _pinned_max_id(directory)
        for name in abi.RETIRED_MAPS:
            with contextlib.suppress(FileNotFoundError):
                (directory / name).unlink()
        map_fds: dict[str, int] = {}
        origin: dict[str, MapOrigin] = {}
        superseded: list[int] = []
        try:
            for spec in abi.map_specs(sizes):
                if not renew:  # a second program on the running tables (benchmarks)
                    spec = dataclasses.replace(spec, renew=False)
                map_fds[spec.name], origin[spec.name] = _adopt_or_create(directory, spec,
                                                                         superseded)
        except BaseException:
            for fd in [*map_fds.values(), *superseded]:
                os.close(fd)
            raise
        return cls(instance, directory, map_fds, origin, previous, mounted, sizes,
                   previous_max_id, superseded)

    def load_program(self) -> FastPath:
        """Compile and load the program against these maps and pin it; the
        returned ``FastPath`` owns the map fds from then on."""
        try:
            prog_fd, cached = _compile(self.pin_dir, self._sizes, self.map_fds)
        except BaseException:
            self.close()
            raise
        _pin_replace(prog_fd, self.pin_dir / PROG_PIN)
        fp = FastPath(self.instance, self.pin_dir, self.map_fds, self.origin, None, prog_fd,
                      frozenset({self._previous} if self._previous else ()))
        fp.mounted_bpffs = self._mounted
        fp.cached = cached
        self.map_fds = {}
        return fp

    def close(self) -> None:
        for fd in self.map_fds.values():
            os.close(fd)
        self.map_fds = {}
        self.release_superseded()

    def release_superseded(self) -> None:
        for fd in self.superseded:
            os.close(fd)
        self.superseded = []


class FastPath:
    """The loaded program of one instance and the fds of its maps."""

    def __init__(self, instance: str, directory: Path, map_fds: dict[str, int],
                 map_origin: dict[str, MapOrigin], bpf: Any, prog_fd: int,
                 previous_prog_ids: frozenset[int]) -> None:
        self.instance = instance
        self.pin_dir = directory
        self.map_origin = map_origin
        self.mounted_bpffs = False  # True: this load mounted /sys/fs/bpf (worth a log line)
        self.cached = False  # True: the program came from the cache, not from bcc
        self._map_fds = map_fds
        self._bpf = bpf
        self.prog_fd = prog_fd
        self.prog_id = bpfsys.prog_info(prog_fd).id
        # Programs this instance pinned before this load are still "ours"
        # when they run on an interface: a restart replaces them silently.
        self._own_prog_ids = previous_prog_ids | {self.prog_id}
        self._own_map_ids = frozenset(bpfsys.map_info(fd).id for fd in map_fds.values())
        # redirect targets: the ports allowed (interfaces running the program), and those
        # held back because their egress has conditions (Fidelity says which)
        self._allowed: set[int] = set()
        self._held: frozenset[int] = frozenset()

    @classmethod
    def load(cls, instance: str = "default", *, sizes: abi.Sizes | None = None,
             renew: bool = True) -> FastPath:
        """Create or adopt the pinned maps, compile and load the program, pin it.
        ``renew=False`` adopts the route tables too (abi.MapSpec.renew), for a
        second program that reads the tables a first one's writer filled.

        Nothing is attached: ``attach()`` does that, per interface.
        """
        maps = OpenMaps.open(instance, sizes=sizes, renew=renew)
        fp = maps.load_program()
        maps.release_superseded()  # nothing is written here
        return fp

    def map_fd(self, name: str) -> int:
        """The fd of one of ``abi.MAP_NAMES`` (owned by this object)."""
        try:
            return self._map_fds[name]
        except KeyError:
            raise FastPathError(f"no map named {name!r}") from None

    def attach(self, ifname: str, mode: Mode = "auto", replace: bool = False) -> Attachment:
        """Run the program on ifname and allow redirects to it (tx_ports).

        ``auto`` tries native XDP, then generic; where this instance's program
        already runs it keeps that mode, so a restart swaps programs without
        losing a packet. Another program on the interface is replaced only
        with ``replace=True``.
        """
        if mode not in ("auto", "native", "generic"):
            raise ConfigError("xdp-mode", f"{mode!r} is not one of auto, native, generic")
        ifindex = _ifindex(ifname)
        current = _xdp_progs(ifindex)
        for cur_mode, prog_id in current.items():
            if not replace and not self._is_ours(prog_id):
                name = _prog_name(prog_id)
                raise InterfaceError(
                    f"{ifname} already runs another XDP program (id {prog_id}"
                    f"{', ' + name if name else ''}, {cur_mode}); remove it with "
                    f"`ip link set dev {ifname} xdp off` or let fibsync replace it "
                    "(--replace-xdp)"
                )
        if mode == "auto":
            order = list(current) + [m for m in ("native", "generic") if m not in current]
            order = [m for m in order if m in ("native", "generic")]
        else:
            order = [mode]

        self.allow_port(ifindex)
        errors = []
        for want in order:
            try:
                self._attach_mode(ifindex, want, current)
            except InterfaceError as exc:
                errors.append(f"{want}: {exc}")
                current = _xdp_progs(ifindex)
                continue
            return Attachment(ifname, ifindex, want, self.prog_id)
        self.forbid_port(ifindex)
        raise InterfaceError(f"cannot attach XDP to {ifname}: " + "; ".join(errors))

    def _attach_mode(self, ifindex: int, want: str, current: dict[str, int]) -> None:
        # The kernel refuses native and generic programs side by side.
        for other, prog_id in current.items():
            if other != want:
                _xdp_set(ifindex, -1, _MODE_FLAGS[other], expected_id=prog_id)
        old = current.get(want)
        if old == self.prog_id:
            return
        _xdp_set(ifindex, self.prog_fd, _MODE_FLAGS[want], expected_id=old)

    def detach(self, ifname: str) -> None:
        """Take our program off ifname (another program there stays) and stop
        redirecting to it."""
        ifindex = _ifindex(ifname)
        for mode, prog_id in _xdp_progs(ifindex).items():
            if self._is_ours(prog_id):
                _xdp_set(ifindex, -1, _MODE_FLAGS[mode], expected_id=prog_id)
        self.forbid_port(ifindex)

    def allow_port(self, ifindex: int) -> None:
        """Let the program redirect to ifindex (tx_ports, and tx_direct where it fits),
        unless its egress is held (``hold_ports``) or its conditions cannot be known
        (an ifindex past `ifaces`, FS_MAX_IFACES: PASS_IFACE_UNKNOWN)."""
        self._allowed.add(ifindex)
        if ifindex not in self._held:
            self._write_port(ifindex, True)

    def forbid_port(self, ifindex: int) -> None:
        self._allowed.discard(ifindex)
        self._write_port(ifindex, False)

    def hold_ports(self, held: Iterable[int]) -> None:
        """Keep these interfaces out of tx_ports whether allowed or not: their egress has
        conditions (a qdisc, tc, netfilter), which the kernel applies to what it sends
        and a redirect would skip. The program then hands their packets to the kernel,
        counted under the condition's reason (``ifaces``.egress), at no cost to the
        packets it forwards. A port released goes back in if it is allowed."""
        new = frozenset(held)
        old, self._held = self._held, new
        for ifindex in new - old:
            self._write_port(ifindex, False)
        for ifindex in (old - new) & self._allowed:
            self._write_port(ifindex, True)

    @property
    def held_ports(self) -> frozenset[int]:
        return self._held

    def _write_port(self, ifindex: int, present: bool) -> None:
        if present and ifindex >= abi.FS_MAX_IFACES:
            return  # its conditions cannot be known: never a redirect target
        key = abi.U32.pack(ifindex)
        maps = ["tx_ports", "tx_direct"] if ifindex < abi.FS_TX_DIRECT else ["tx_ports"]
        if present:
            for name in maps:
                try:
                    bpfsys.update(self.map_fd(name), key, key)
                except MapError as exc:
                    # a devmap takes only a device that exists (dev_get_by_index): one
                    # deleted since it was looked up (a link deleted under a storm) is
                    # no redirect target, and the kernel took its entries with it
                    if exc.errno == errno.EINVAL and not _link_exists(ifindex):
                        return
                    raise
        else:
            for name in reversed(maps):
                bpfsys.delete(self.map_fd(name), key)  # False when it was not there

    def ports(self) -> set[int]:
        """The ifindexes the program may redirect to."""
        return {abi.U32.unpack(k)[0] for k, _ in bpfsys.iterate(self.map_fd("tx_ports"))}

    def attached(self, names: Iterable[str] | None = None) -> list[Attachment]:
        """Interfaces of this network namespace that run this instance's program; with
        ``names``, only among those (one query each instead of a dump of every link:
        the periodic check on a router with thousands of interfaces)."""
        found = _all_xdp() if names is None else _named_xdp(names)
        return [a for a in found if self._is_ours(a.prog_id)]

    def _is_ours(self, prog_id: int) -> bool:
        return prog_id in self._own_prog_ids or _uses_maps(prog_id, self._own_map_ids)

    def close(self) -> None:
        """Release fds and the bcc module; pins and attachments stay."""
        for fd in self._map_fds.values():
            os.close(fd)
        self._map_fds = {}
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None

    def __enter__(self) -> FastPath:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def attached(instance: str = "default") -> list[Attachment]:
    """Which interfaces run the instance's pinned program, read from the kernel
    and the pins alone (no compiling: the CLI's view)."""
    prog_ids, map_ids = _pinned_ids(pin_dir(instance))
    if not prog_ids and not map_ids:
        return []
    return [a for a in _all_xdp() if a.prog_id in prog_ids or _uses_maps(a.prog_id, map_ids)]


def remove(instance: str = "default") -> list[Attachment]:
    """Detach the instance's program from every interface and delete its pins.

    Returns what was detached. Routes in the maps vanish with the last
    reference to them: the kernel forwards everything again.
    """
    directory = pin_dir(instance)
    detached = attached(instance)
    for a in detached:
        _xdp_set(a.ifindex, -1, _MODE_FLAGS[a.mode], expected_id=a.prog_id)
    if directory.is_dir():
        for entry in directory.iterdir():
            entry.unlink()
        directory.rmdir()
    return detached


# ---------------------------------------------------------------- maps and pins


def _adopt_or_create(directory: Path, spec: abi.MapSpec,
                     superseded: list[int]) -> tuple[int, MapOrigin]:
    path = directory / spec.name
    origin: MapOrigin = "created"
    if path.exists():
        try:
            fd = bpfsys.obj_get(str(path))
        except MapError:
            fd = -1
        if fd >= 0:
            info = bpfsys.map_info(fd)
            flags = info.flags & ~abi.BPF_F_RDONLY_PROG
            same = (info.type, info.key_size, info.value_size, info.max_entries, flags,
                    info.name) == (spec.type, spec.key_size, spec.value_size,
                                   spec.max_entries, spec.flags, spec.kernel_name)
            if same and not spec.renew:
                return fd, "adopted"
            superseded.append(fd)  # released by OpenMaps' owner
            origin = "renewed" if same else "replaced"
        else:
            origin = "replaced"
        # A different layout (or meaning: abi.LAYOUT) would be misread by the new
        # program, and a renewed map is filled anew: start afresh (the old program
        # keeps its map until it is replaced).
        path.unlink()
    fd = bpfsys.map_create(spec.type, spec.key_size, spec.value_size, spec.max_entries,
                           flags=spec.flags, name=spec.kernel_name)
    try:
        bpfsys.obj_pin(fd, str(path))
    except MapError:
        os.close(fd)
        raise
    return fd, origin


def _pin_replace(fd: int, path: Path) -> None:
    """Pin so that the path always names a program, even mid-replacement."""
    tmp = path.with_name(path.name + "_new")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    bpfsys.obj_pin(fd, str(tmp))
    os.replace(tmp, path)


def _pinned_max_id(directory: Path) -> int:
    """The highest key of the pinned nexthops and groups maps (0 if none)."""
    ids = [0]
    for name in ("nexthops", "groups"):
        try:
            fd = bpfsys.obj_get(str(directory / name))
        except (MapError, FileNotFoundError):
            continue
        try:
            ids += [abi.U32.unpack(k)[0] for k, _ in bpfsys.iterate(fd)]
        except MapError:
            pass
        finally:
            os.close(fd)
    return max(ids)


def _pinned_prog_id(directory: Path) -> int:
    try:
        fd = bpfsys.obj_get(str(directory / PROG_PIN))
    except MapError:
        return 0
    try:
        return bpfsys.prog_info(fd).id
    finally:
        os.close(fd)


def _pinned_ids(directory: Path) -> tuple[frozenset[int], frozenset[int]]:
    prog = _pinned_prog_id(directory)
    maps = set()
    for name in abi.MAP_NAMES:
        path = directory / name
        if not path.exists():
            continue
        try:
            fd = bpfsys.obj_get(str(path))
        except MapError:
            continue
        try:
            maps.add(bpfsys.map_info(fd).id)
        finally:
            os.close(fd)
    return frozenset({prog} if prog else ()), frozenset(maps)


def _uses_maps(prog_id: int, map_ids: frozenset[int]) -> bool:
    try:
        fd = bpfsys.prog_fd_by_id(prog_id)
    except MapError:
        return False
    try:
        return not map_ids.isdisjoint(bpfsys.prog_info(fd).map_ids)
    finally:
        os.close(fd)


def _prog_name(prog_id: int) -> str:
    try:
        fd = bpfsys.prog_fd_by_id(prog_id)
    except MapError:
        return ""
    try:
        return bpfsys.prog_info(fd).name
    finally:
        os.close(fd)


def _compile(directory: Path, sizes: abi.Sizes, map_fds: dict[str, int]) -> tuple[int, bool]:
    """Compile and load the program in a child process; return (its fd, from the cache).

    bcc's LLVM stays resident once used (~170 MB measured here) and the daemon
    never needs it again: the child compiles against the pinned maps, loads the
    program, pins it under a temporary name and exits; the daemon takes the
    program from that pin. The child also leaves the instructions in the
    program cache (``cache_dir()``), and a later start with the same source,
    build flags and kernel loads them directly: ~10 ms against ~0.6 s of
    compiling on a core the initial sync needs.
    """
    src = bpf_source_dir()
    cflags = [f"-I{src}", f'-DFS_PIN_DIR="{directory}"', *sizes.cflags()]
    cache = _cache_path(src, cflags)
    if cache is not None:
        fd = _load_cached(cache, map_fds)
        if fd is not None:
            return fd, True
    tmp = directory / "prog_build"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    child = subprocess.run(
        [sys.executable, "-c",
         "import sys; from fibsync.fastpath.program import _build; _build(sys.argv[1:])",
         str(src / "fibsync.c"), str(tmp), str(cache or ""), *cflags],
        capture_output=True, text=True, check=False)
    if child.returncode != 0:
        lines = [ln for ln in child.stderr.splitlines()
                 if ln.strip() and "modprobe: not found" not in ln]
        raise FastPathError(lines[-1] if lines else f"the build exited with {child.returncode}")
    fd = bpfsys.obj_get(str(tmp))
    tmp.unlink()
    return fd, False


def _build(argv: list[str]) -> None:
    """The child of ``_compile``: build with bcc, load, pin at argv[1], leave the
    instructions in the cache file argv[2] (if any); errors on stderr."""
    source, pin, cache, cflags = argv[0], argv[1], argv[2], argv[3:]
    try:
        from bcc import BPF  # noqa: PLC0415 - bcc is slow to import and only needed here
    except ImportError as exc:
        sys.exit(f"bcc is not importable ({exc}): install python3-bpfcc and use a venv "
                 "made with --system-site-packages")
    try:
        bpf = BPF(src_file=source.encode(), cflags=cflags)
    except Exception as exc:
        sys.exit(f"cannot compile {source}: {exc} (kernel headers for bcc: see `make bootstrap`)")
    try:
        fn = bpf.load_func(PROG_NAME.encode(), BPF.XDP)
    except Exception as exc:
        sys.exit(f"the kernel refused the XDP program: {exc}")
    bpfsys.obj_pin(fn.fd, pin)
    if cache:
        with contextlib.suppress(OSError, MapError):
            _save_cached(Path(cache), bytes(bpf.dump_func(PROG_NAME.encode())),
                         Path(pin).parent)


# ---------------------------------------------------------------- program cache
#
# A cache file is one JSON line (where the map references are) and the
# program's instructions as bcc produced them. bcc writes each map's fd into
# a BPF_LD_IMM64 with src_reg BPF_PSEUDO_MAP_FD; the file names the map of
# each instead, and a load puts the loading process's fds back in.

CACHE_ENV = "FIBSYNC_CACHE_DIR"
DEFAULT_CACHE_DIR = Path("/var/cache/fibsync")
_CACHE_FORMAT = 1
_BPF_PROG_TYPE_XDP = 6
_LD_IMM64 = 0x18
_PSEUDO_MAP_FD = 1
_INSN = struct.Struct("=BBhi")


def cache_dir() -> Path:
    """$FIBSYNC_CACHE_DIR, else /var/cache/fibsync (the unit's CacheDirectory=)."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR)


def _cache_path(src: Path, cflags: list[str]) -> Path | None:
    """The cache file for this source, these flags and this kernel (None: unreadable source)."""
    h = hashlib.sha256(f"fibsync program cache {_CACHE_FORMAT} {os.uname().release}\n".encode())
    try:
        for f in sorted(src.iterdir()):
            if f.suffix in (".c", ".h"):
                h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    except OSError:
        return None
    for flag in cflags:
        if not flag.startswith("-DFS_PIN_DIR="):  # the maps are relocated, not compiled in
            h.update(flag.encode() + b"\0")
    return cache_dir() / f"xdp-{h.hexdigest()[:32]}.prog"


def _save_cached(path: Path, insns: bytes, pin_dir: Path) -> None:
    ids = {}
    for name in abi.MAP_NAMES:
        fd = bpfsys.obj_get(str(pin_dir / name))
        try:
            ids[bpfsys.map_info(fd).id] = name
        finally:
            os.close(fd)
    relocations = []
    for i in range(len(insns) // 8):
        code, regs, _off, imm = _INSN.unpack_from(insns, i * 8)
        if code == _LD_IMM64 and regs >> 4 == _PSEUDO_MAP_FD:
            relocations.append((i, ids[bpfsys.map_info(imm).id]))
    head = json.dumps({"format": _CACHE_FORMAT, "license": "GPL", "relocations": relocations})
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_bytes(head.encode() + b"\n" + insns)
    tmp.chmod(0o600)
    tmp.replace(path)


def _load_cached(path: Path, map_fds: dict[str, int]) -> int | None:
    """Load the cached program against these maps; None when there is none that fits."""
    try:
        st = path.stat()
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            return None  # only a file as private as the bpf() calls it feeds
        head, _, insns = path.read_bytes().partition(b"\n")
        meta = json.loads(head)
        if meta.get("format") != _CACHE_FORMAT or not insns or len(insns) % 8:
            return None
        code = bytearray(insns)
        for index, name in meta["relocations"]:
            op, regs, off, _imm = _INSN.unpack_from(code, index * 8)
            if op != _LD_IMM64 or regs >> 4 != _PSEUDO_MAP_FD:
                return None
            _INSN.pack_into(code, index * 8, op, regs, off, map_fds[name])
        return bpfsys.prog_load(_BPF_PROG_TYPE_XDP, bytes(code), license=meta["license"],
                                name=PROG_NAME)
    except (OSError, ValueError, KeyError, TypeError, MapError):
        return None  # compile instead (and rewrite the file)


# ---------------------------------------------------------------- XDP over rtnetlink

_MODE_FLAGS = {"generic": nl.XDP_FLAGS_SKB_MODE, "native": nl.XDP_FLAGS_DRV_MODE,
               "offload": nl.XDP_FLAGS_HW_MODE}
_PROG_ID_ATTR = {nl.IFLA_XDP_DRV_PROG_ID: "native", nl.IFLA_XDP_SKB_PROG_ID: "generic",
                 nl.IFLA_XDP_HW_PROG_ID: "offload"}


def _link_exists(ifindex: int) -> bool:
    """An interface of this thread's network namespace has this index."""
    try:
        socket.if_indextoname(ifindex)
    except OSError:
        return False
    return True


def _ifindex(ifname: str) -> int:
    try:
        return socket.if_nametoindex(ifname)
    except OSError:
        raise InterfaceError(f"interface {ifname!r} does not exist") from None


def _link_xdp(payload: bytes) -> tuple[int, str, dict[str, int]]:
    _family, _type, index, _flags, _change = nl.IFINFOMSG.unpack_from(payload)
    name = ""
    progs: dict[str, int] = {}
    for kind, value in nl.attrs(payload, nl.IFINFOMSG.size):
        if kind == nl.IFLA_IFNAME:
            name = value.rstrip(b"\0").decode(errors="replace")
        elif kind == nl.IFLA_XDP:
            for xkind, xval in nl.attrs(value):
                if xkind in _PROG_ID_ATTR:
                    progs[_PROG_ID_ATTR[xkind]] = struct.unpack("=I", xval[:4])[0]
    return index, name, progs


def _xdp_progs(ifindex: int) -> dict[str, int]:
    """mode -> program id of what runs on the interface now."""
    body = nl.IFINFOMSG.pack(socket.AF_UNSPEC, 0, ifindex, 0, 0)
    try:
        with nl.Rtnl() as rtnl:
            for mtype, payload in rtnl.ask(nl.RTM_GETLINK, body):
                if mtype == nl.RTM_NEWLINK:
                    return _link_xdp(payload)[2]
    except OSError as exc:
        raise InterfaceError(f"cannot read interface {ifindex}: {exc.strerror}") from exc
    return {}


def _all_xdp() -> list[Attachment]:
    found = []
    body = nl.IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
    with nl.Rtnl() as rtnl:
        for mtype, payload in rtnl.ask(nl.RTM_GETLINK, body, nl.NLM_F_DUMP):
            if mtype != nl.RTM_NEWLINK:
                continue
            index, name, progs = _link_xdp(payload)
            found += [Attachment(name, index, mode, pid) for mode, pid in progs.items()]
    return found


def _named_xdp(names: Iterable[str]) -> list[Attachment]:
    found = []
    for name in names:
        try:
            index = socket.if_nametoindex(name)
            progs = _xdp_progs(index)
        except (OSError, InterfaceError):
            continue  # no such interface (now): nothing runs there
        found += [Attachment(name, index, mode, pid) for mode, pid in progs.items()]
    return found


def _xdp_set(ifindex: int, prog_fd: int, mode_flags: int, *, expected_id: int | None) -> None:
    """Attach (prog_fd >= 0) or detach (-1) in one mode, atomically against
    ``expected_id``: the program we saw there, or None for "nothing yet"."""
    expected_fd = -1
    if expected_id:
        try:
            expected_fd = bpfsys.prog_fd_by_id(expected_id)
        except MapError:
            expected_fd = -1
    try:
        flags = mode_flags
        xdp = nl.attr(nl.IFLA_XDP_FD, struct.pack("=i", prog_fd))
        if expected_fd >= 0:
            flags |= nl.XDP_FLAGS_REPLACE
            xdp += nl.attr(nl.IFLA_XDP_EXPECTED_FD, struct.pack("=i", expected_fd))
        elif prog_fd >= 0:
            flags |= nl.XDP_FLAGS_UPDATE_IF_NOEXIST
        xdp += nl.attr_u32(nl.IFLA_XDP_FLAGS, flags)
        body = nl.IFINFOMSG.pack(socket.AF_UNSPEC, 0, ifindex, 0, 0) + nl.attr(
            nl.IFLA_XDP | nl.NLA_F_NESTED, xdp)
        try:
            with nl.Rtnl() as rtnl:
                for _ in rtnl.ask(nl.RTM_SETLINK, body, nl.NLM_F_ACK):
                    pass
        except OSError as exc:
            what = "attach" if prog_fd >= 0 else "detach"
            raise InterfaceError(f"XDP {what} on ifindex {ifindex} failed: {exc.strerror}") \
                from exc
    finally:
        if expected_fd >= 0:
            os.close(expected_fd)
