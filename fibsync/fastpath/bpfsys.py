"""A thin ctypes layer over the bpf(2) syscall: pinned objects, map I/O, test runs.

No bcc here, so the CLI can read pinned maps without compiling anything.
File descriptors are plain ints owned by the caller (close them with
``os.close``). Keys and values are bytes; per-CPU map values are lists with
one entry per possible CPU. Every failure raises ``MapError`` (or
``MapFullError`` when the map has no room) carrying the kernel's ``errno``,
except the lookups that answer "absent" (None / False).
"""

from __future__ import annotations

import ctypes
import errno as E
import os
import platform
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache

from fibsync.errors import MapError, MapFullError

_SYS_BPF = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "riscv64": 280, "ppc64le": 361,
            "s390x": 351}

# enum bpf_cmd
BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_LOAD = 5
BPF_PROG_TEST_RUN = 10
BPF_PROG_GET_FD_BY_ID = 13
BPF_MAP_GET_FD_BY_ID = 14
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_MAP_LOOKUP_BATCH = 24
BPF_MAP_UPDATE_BATCH = 26
BPF_MAP_DELETE_BATCH = 27

# update flags
BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2

_PERCPU_TYPES = frozenset({5, 6, 10, 21})  # PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH, ..
_ENOTSUPP = 524  # the kernel's internal "operation not supported" for map ops
_FULL_ERRNOS = frozenset({E.E2BIG, E.ENOSPC, E.ENOMEM})

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _MapCreateAttr(ctypes.Structure):
    _fields_ = [
        ("map_type", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("inner_map_fd", ctypes.c_uint32),
        ("numa_node", ctypes.c_uint32),
        ("map_name", ctypes.c_char * 16),
    ]


class _MapElemAttr(ctypes.Structure):
    _fields_ = [
        ("map_fd", ctypes.c_uint32),
        ("key", ctypes.c_uint64),
        ("value", ctypes.c_uint64),  # also next_key
        ("flags", ctypes.c_uint64),
    ]


class _MapBatchAttr(ctypes.Structure):
    _fields_ = [
        ("in_batch", ctypes.c_uint64),
        ("out_batch", ctypes.c_uint64),
        ("keys", ctypes.c_uint64),
        ("values", ctypes.c_uint64),
        ("count", ctypes.c_uint32),
        ("map_fd", ctypes.c_uint32),
        ("elem_flags", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
    ]


class _ProgLoadAttr(ctypes.Structure):
    _fields_ = [
        ("prog_type", ctypes.c_uint32),
        ("insn_cnt", ctypes.c_uint32),
        ("insns", ctypes.c_uint64),
        ("license", ctypes.c_uint64),
        ("log_level", ctypes.c_uint32),
        ("log_size", ctypes.c_uint32),
        ("log_buf", ctypes.c_uint64),
        ("kern_version", ctypes.c_uint32),
        ("prog_flags", ctypes.c_uint32),
        ("prog_name", ctypes.c_char * 16),
        ("prog_ifindex", ctypes.c_uint32),
        ("expected_attach_type", ctypes.c_uint32),
    ]


class _ObjAttr(ctypes.Structure):
    _fields_ = [
        ("pathname", ctypes.c_uint64),
        ("bpf_fd", ctypes.c_uint32),
        ("file_flags", ctypes.c_uint32),
    ]


class _GetIdAttr(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint32), ("next_id", ctypes.c_uint32),
                ("open_flags", ctypes.c_uint32)]


class _InfoAttr(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32),
                ("info", ctypes.c_uint64)]


class _TestRunAttr(ctypes.Structure):
    _fields_ = [
        ("prog_fd", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("data_in", ctypes.c_uint64),
        ("data_out", ctypes.c_uint64),
        ("repeat", ctypes.c_uint32),
        ("duration", ctypes.c_uint32),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_uint64),
        ("ctx_out", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
    ]


class _MapInfo(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
        ("ifindex", ctypes.c_uint32),
        ("btf_vmlinux_value_type_id", ctypes.c_uint32),
        ("netns_dev", ctypes.c_uint64),
        ("netns_ino", ctypes.c_uint64),
        ("btf_id", ctypes.c_uint32),
        ("btf_key_type_id", ctypes.c_uint32),
        ("btf_value_type_id", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("map_extra", ctypes.c_uint64),
    ]


class _ProgInfo(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * 16),
    ]


def _sys_bpf_nr() -> int:
    try:
        return _SYS_BPF[platform.machine()]
    except KeyError:
        raise MapError(f"bpf(2) syscall number unknown on {platform.machine()}") from None


_NR_BPF = _sys_bpf_nr()


def _bpf(cmd: int, attr: ctypes.Structure) -> int:
    """One bpf(2) call; returns the result or -errno (never raises)."""
    ret = _libc.syscall(_NR_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    if ret < 0:
        return -ctypes.get_errno()
    return int(ret)


def _error(what: str, err: int, done: int = 0) -> MapError:
    cls = MapFullError if err in _FULL_ERRNOS else MapError
    exc = cls(f"{what}: {os.strerror(err)} (errno {err})")
    exc.errno = err
    exc.done = done
    exc.__cause__ = OSError(err, os.strerror(err))
    return exc


def _check(what: str, ret: int) -> int:
    if ret < 0:
        raise _error(what, -ret)
    return ret


def _addr(buf: bytes | bytearray | memoryview | ctypes.Array[ctypes.c_char]) -> tuple[int, object]:
    """Address of a buffer's bytes, and the object that keeps them alive.

    bytes are read in place (the kernel only reads keys and values we pass);
    writable buffers are shared, not copied.
    """
    if isinstance(buf, bytes):
        p = ctypes.c_char_p(buf)
        return ctypes.cast(p, ctypes.c_void_p).value or 0, p
    if isinstance(buf, ctypes.Array):
        return ctypes.addressof(buf), buf
    view = memoryview(buf)
    if view.readonly:
        copy = ctypes.create_string_buffer(view.tobytes(), len(view))
        return ctypes.addressof(copy), copy
    if not view.nbytes:
        return 0, view
    # the first byte as a c_char: an array type per size ((c_char * n), which
    # ctypes does not keep) made ~10 reference cycles per write for the GC
    first = ctypes.c_char.from_buffer(view)
    return ctypes.addressof(first), first


@cache
def possible_cpus() -> int:
    """How many values a per-CPU map holds per key (possible, not online, CPUs)."""
    with open("/sys/devices/system/cpu/possible") as f:
        text = f.read().strip()
    count = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        count += (int(hi) if hi else int(lo)) - int(lo) + 1
    return count


def _round8(n: int) -> int:
    return (n + 7) & ~7


# ---------------------------------------------------------------- objects


def obj_get(path: str) -> int:
    """Open a pinned map or program; returns a new fd."""
    raw = os.fsencode(path)
    attr = _ObjAttr(pathname=ctypes.cast(ctypes.c_char_p(raw), ctypes.c_void_p).value or 0)
    ret = _bpf(BPF_OBJ_GET, attr)
    if ret < 0:
        raise _error(f"open pinned {path}", -ret)
    return ret


def prog_load(prog_type: int, insns: bytes, *, license: str = "GPL", name: str = "") -> int:
    """Load a program from its instructions (map fds already in place); returns its fd.

    On a refusal the verifier's log ends the error message.
    """
    code = ctypes.create_string_buffer(bytes(insns), len(insns))
    lic = ctypes.create_string_buffer(license.encode())
    log = ctypes.create_string_buffer(1 << 16)
    attr = _ProgLoadAttr(prog_type=prog_type, insn_cnt=len(insns) // 8,
                         insns=ctypes.addressof(code), license=ctypes.addressof(lic),
                         prog_name=name.encode()[:15])
    ret = _bpf(BPF_PROG_LOAD, attr)
    if ret < 0:
        # again with the verifier's log, only to say why
        attr.log_level, attr.log_size, attr.log_buf = 1, len(log), ctypes.addressof(log)
        again = _bpf(BPF_PROG_LOAD, attr)
        if again >= 0:
            return again
        tail = log.value.decode(errors="replace").strip().splitlines()[-3:]
        raise _error("load program" + (": " + " / ".join(tail) if tail else ""), -ret)
    return ret


def obj_pin(fd: int, path: str) -> None:
    """Pin a map or program fd at path (a file on bpffs; must not exist yet)."""
    raw = os.fsencode(path)
    attr = _ObjAttr(pathname=ctypes.cast(ctypes.c_char_p(raw), ctypes.c_void_p).value or 0,
                    bpf_fd=fd)
    _check(f"pin {path}", _bpf(BPF_OBJ_PIN, attr))


@dataclass(frozen=True, slots=True)
class MapInfo:
    type: int
    key_size: int
    value_size: int
    max_entries: int
    name: str
    id: int
    flags: int = 0

    @property
    def percpu(self) -> bool:
        return self.type in _PERCPU_TYPES

    @property
    def value_bytes(self) -> int:
        """Bytes one lookup returns (all CPUs, 8-byte stride, for per-CPU maps)."""
        if self.percpu:
            return _round8(self.value_size) * possible_cpus()
        return self.value_size


@dataclass(frozen=True, slots=True)
class ProgInfo:
    type: int
    id: int
    name: str
    tag: bytes
    map_ids: tuple[int, ...]


def map_info(fd: int) -> MapInfo:
    info = _MapInfo()
    attr = _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info))
    _check("map info", _bpf(BPF_OBJ_GET_INFO_BY_FD, attr))
    return MapInfo(info.type, info.key_size, info.value_size, info.max_entries,
                   info.name.decode(errors="replace"), info.id, info.map_flags)


def prog_info(fd: int) -> ProgInfo:
    """A program's identity and the ids of the maps it uses."""
    info = _ProgInfo()
    attr = _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info))
    _check("program info", _bpf(BPF_OBJ_GET_INFO_BY_FD, attr))
    ids = (ctypes.c_uint32 * info.nr_map_ids)()
    if info.nr_map_ids:
        again = _ProgInfo(nr_map_ids=info.nr_map_ids, map_ids=ctypes.addressof(ids))
        attr = _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(again),
                         info=ctypes.addressof(again))
        _check("program info", _bpf(BPF_OBJ_GET_INFO_BY_FD, attr))
    return ProgInfo(info.type, info.id, info.name.decode(errors="replace"), bytes(info.tag),
                    tuple(ids))


def prog_fd_by_id(prog_id: int) -> int:
    return _check(f"open program id {prog_id}",
                  _bpf(BPF_PROG_GET_FD_BY_ID, _GetIdAttr(id=prog_id)))


def map_fd_by_id(map_id: int) -> int:
    return _check(f"open map id {map_id}", _bpf(BPF_MAP_GET_FD_BY_ID, _GetIdAttr(id=map_id)))


def map_create(map_type: int, key_size: int, value_size: int, max_entries: int, *,
               flags: int = 0, name: str = "") -> int:
    """Create a map; returns its fd. ``name`` is cut to the kernel's 15 characters."""
    attr = _MapCreateAttr(map_type=map_type, key_size=key_size, value_size=value_size,
                          max_entries=max_entries, map_flags=flags,
                          map_name=name.encode()[:15])
    return _check(f"create map {name or map_type}", _bpf(BPF_MAP_CREATE, attr))


# ---------------------------------------------------------------- map I/O


def _split_percpu(raw: bytes, info: MapInfo) -> list[bytes]:
    stride = _round8(info.value_size)
    return [raw[i * stride:i * stride + info.value_size] for i in range(possible_cpus())]


def _pack_value(values: Sequence[bytes], info: MapInfo) -> bytes:
    if not info.percpu:
        raise MapError(f"map {info.name!r} is not per-CPU: give one value, not a list")
    stride = _round8(info.value_size)
    return b"".join(bytes(v).ljust(stride, b"\0") for v in values)


def lookup(fd: int, key: bytes, *, info: MapInfo | None = None) -> bytes | list[bytes] | None:
    """The value of key, or None when absent. Per-CPU maps give one value per CPU."""
    info = info or map_info(fd)
    raw = _lookup_raw(fd, key, info)
    if raw is None:
        return None
    return _split_percpu(raw, info) if info.percpu else raw


def _lookup_raw(fd: int, key: bytes, info: MapInfo) -> bytes | None:
    """The value of key as the kernel returns it (all CPUs' for a per-CPU map)."""
    kaddr, _k = _addr(key)
    out = ctypes.create_string_buffer(max(info.value_bytes, 1))
    ret = _bpf(BPF_MAP_LOOKUP_ELEM, _MapElemAttr(map_fd=fd, key=kaddr,
                                                 value=ctypes.addressof(out)))
    if ret == -E.ENOENT:
        return None
    _check(f"lookup in {info.name}", ret)
    return out.raw[:info.value_bytes]


def update(fd: int, key: bytes, value: bytes | Sequence[bytes], flags: int = BPF_ANY) -> None:
    """Write one entry. A per-CPU map's value is a list (one per CPU) or the
    already packed bytes of all CPUs."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        packed = bytes(value)
    else:
        packed = _pack_value(value, map_info(fd))
    kaddr, _k = _addr(key)
    vaddr, _v = _addr(packed)
    _check("update", _bpf(BPF_MAP_UPDATE_ELEM, _MapElemAttr(map_fd=fd, key=kaddr, value=vaddr,
                                                            flags=flags)))


class Lookup:
    """Repeated lookups in one map, without a map_info call or fresh buffers
    each time: about 1 µs each (``lookup()`` costs ~7 µs). Not per-CPU maps."""

    def __init__(self, fd: int, key_size: int, value_size: int) -> None:
        self._key = ctypes.create_string_buffer(max(key_size, 1))
        self._value = ctypes.create_string_buffer(max(value_size, 1))
        self._size = value_size
        self._attr = _MapElemAttr(map_fd=fd, key=ctypes.addressof(self._key),
                                  value=ctypes.addressof(self._value))

    def __call__(self, key: bytes) -> bytes | None:
        ctypes.memmove(self._key, key, len(key))
        ret = _bpf(BPF_MAP_LOOKUP_ELEM, self._attr)
        if ret == -E.ENOENT:
            return None
        _check("lookup", ret)
        return self._value.raw[:self._size]


def delete(fd: int, key: bytes) -> bool:
    """Remove key; False when it was not there."""
    kaddr, _k = _addr(key)
    ret = _bpf(BPF_MAP_DELETE_ELEM, _MapElemAttr(map_fd=fd, key=kaddr))
    if ret == -E.ENOENT:
        return False
    _check("delete", ret)
    return True


def next_key(fd: int, key: bytes | None, key_size: int) -> bytes | None:
    """The key after ``key`` (the first key when None); None at the end."""
    out = ctypes.create_string_buffer(max(key_size, 1))
    kaddr, _k = _addr(key) if key is not None else (0, None)
    ret = _bpf(BPF_MAP_GET_NEXT_KEY, _MapElemAttr(map_fd=fd, key=kaddr,
                                                  value=ctypes.addressof(out)))
    if ret == -E.ENOENT:
        return None
    _check("get next key", ret)
    return out.raw[:key_size]


def update_batch(fd: int, keys: bytes | bytearray | memoryview,
                 values: bytes | bytearray | memoryview, count: int,
                 flags: int = BPF_ANY) -> None:
    """Write ``count`` entries in one syscall: keys and values laid end to end.

    Per-CPU values must already be packed (``possible_cpus()`` values of
    8-byte stride each). Map types without batch support are written one by
    one. On failure the exception's ``done`` says how many entries went in
    (the first ``done``, in order).
    """
    if count <= 0:
        return
    kaddr, _k = _addr(keys)
    vaddr, _v = _addr(values)
    attr = _MapBatchAttr(keys=kaddr, values=vaddr, count=count, map_fd=fd, elem_flags=flags)
    ret = _bpf(BPF_MAP_UPDATE_BATCH, attr)
    if ret >= 0:
        return
    if -ret in (_ENOTSUPP, E.EOPNOTSUPP):
        _update_one_by_one(fd, keys, values, count, flags)
        return
    raise _error(f"batch update ({attr.count} of {count} written)", -ret, attr.count)


def _update_one_by_one(fd: int, keys: bytes | bytearray | memoryview,
                       values: bytes | bytearray | memoryview, count: int, flags: int) -> None:
    info = map_info(fd)
    ks, vs = info.key_size, info.value_bytes
    kview, vview = memoryview(keys), memoryview(values)
    for i in range(count):
        key = kview[i * ks:(i + 1) * ks].tobytes()
        value = vview[i * vs:(i + 1) * vs].tobytes()
        kaddr, _k = _addr(key)
        vaddr, _v = _addr(value)
        ret = _bpf(BPF_MAP_UPDATE_ELEM, _MapElemAttr(map_fd=fd, key=kaddr, value=vaddr,
                                                     flags=flags))
        if ret < 0:
            raise _error(f"update ({i} of {count} written)", -ret, i)


def delete_batch(fd: int, keys: bytes | bytearray | memoryview, count: int) -> int:
    """Delete ``count`` keys laid end to end; returns how many existed.

    The kernel's batch delete stops at the first absent key, so the rest are
    deleted one by one from there: an absent key is not an error.
    """
    if count <= 0:
        return 0
    kaddr, _k = _addr(keys)
    attr = _MapBatchAttr(keys=kaddr, count=count, map_fd=fd)
    ret = _bpf(BPF_MAP_DELETE_BATCH, attr)
    if ret >= 0:
        return count
    if -ret not in (_ENOTSUPP, E.EOPNOTSUPP, E.ENOENT):
        raise _error(f"batch delete ({attr.count} of {count} deleted)", -ret)
    done = attr.count if -ret == E.ENOENT else 0
    ks = map_info(fd).key_size
    view = memoryview(keys)
    deleted = done
    for i in range(done, count):
        if delete(fd, view[i * ks:(i + 1) * ks].tobytes()):
            deleted += 1
    return deleted


def iterate(fd: int, *, batch: int = 4096) -> Iterator[tuple[bytes, bytes | list[bytes]]]:
    """Every (key, value) of the map. Per-CPU values are lists, one per CPU.

    Uses BPF_MAP_LOOKUP_BATCH where the map type has it, else walks keys with
    GET_NEXT_KEY (an entry deleted meanwhile is skipped, not an error).
    """
    info = map_info(fd)
    ks, vs = info.key_size, info.value_bytes
    for keys, values, count in _runs(fd, info, batch):
        for i in range(count):
            value = values[i * vs:(i + 1) * vs]
            yield keys[i * ks:(i + 1) * ks], (_split_percpu(value, info) if info.percpu
                                              else value)


def read_all(fd: int, *, batch: int = 65536) -> tuple[bytes, bytes, int]:
    """Every entry of the map as (keys, values, count), each laid end to end as
    ``update_batch`` takes them: a whole map read without an object per entry.

    Read as ``iterate`` reads (what an LPM trie's walk does when its current
    key is deleted meanwhile: it starts again from the first key), so a key
    may come more than once; the later copy is the fresher.
    """
    info = map_info(fd)
    keys, values, total = [], [], 0
    for k, v, count in _runs(fd, info, batch):
        keys.append(k)
        values.append(v)
        total += count
    return b"".join(keys), b"".join(values), total


# HASH, ARRAY, PERCPU_HASH, PERCPU_ARRAY, LRU_HASH, LRU_PERCPU_HASH, LPM_TRIE
_BATCH_LOOKUP_TYPES = frozenset({1, 2, 5, 6, 9, 10, 11})


def _runs(fd: int, info: MapInfo, batch: int) -> Iterator[tuple[bytes, bytes, int]]:
    """The map's entries as runs (keys, values, count): one batch lookup each, or one
    entry each where the kernel has no batch lookup for the map."""
    if info.type in _BATCH_LOOKUP_TYPES:
        try:
            yield from _batches(fd, info, batch)
            return
        except _NoBatch:
            pass
    key: bytes | None = None
    while True:
        key = next_key(fd, key, info.key_size)
        if key is None:
            return
        value = _lookup_raw(fd, key, info)
        if value is not None:
            yield key, value, 1


class _NoBatch(Exception):
    """The kernel has no batch lookup for this map (raised before any yield)."""


def _batches(fd: int, info: MapInfo, batch: int) -> Iterator[tuple[bytes, bytes, int]]:
    ks, vs = info.key_size, info.value_bytes
    token_in = ctypes.create_string_buffer(max(ks, 8))
    token_out = ctypes.create_string_buffer(max(ks, 8))
    first = True
    while True:
        keys = ctypes.create_string_buffer(ks * batch)
        values = ctypes.create_string_buffer(max(vs * batch, 1))
        attr = _MapBatchAttr(in_batch=0 if first else ctypes.addressof(token_in),
                             out_batch=ctypes.addressof(token_out),
                             keys=ctypes.addressof(keys), values=ctypes.addressof(values),
                             count=batch, map_fd=fd)
        ret = _bpf(BPF_MAP_LOOKUP_BATCH, attr)
        if first and ret < 0 and -ret in (_ENOTSUPP, E.EOPNOTSUPP):
            raise _NoBatch
        if ret < 0 and -ret == E.ENOSPC and attr.count == 0:
            batch *= 2  # one hash bucket holds more entries than fit
            continue
        if ret < 0 and -ret != E.ENOENT:
            raise _error(f"batch lookup in {info.name}", -ret)
        n = attr.count
        # only the filled part: the last batch of a big map is mostly empty
        yield ctypes.string_at(keys, n * ks), ctypes.string_at(values, n * vs), n
        if ret < 0:  # ENOENT: that was the last batch
            return
        ctypes.memmove(token_in, token_out, len(token_out))
        first = False


# ---------------------------------------------------------------- programs


def xdp_md(data_len: int, ingress_ifindex: int = 0, rx_queue_index: int = 0) -> bytes:
    """A ``struct xdp_md`` context for prog_test_run of ``data_len`` bytes of
    packet (the kernel wants data_end to say so), on an ingress device."""
    return struct.pack("=6I", 0, data_len, 0, ingress_ifindex, rx_queue_index, 0)


def prog_test_run(prog_fd: int, data: bytes, repeat: int = 1, *,
                  ctx: bytes | None = None) -> tuple[int, bytes, int]:
    """BPF_PROG_TEST_RUN: (retval, data_out, duration_ns per run).

    The program runs ``repeat`` times on the same buffer, so rewrites (TTL)
    accumulate. For XDP, ``ctx=xdp_md(len(data), ifindex)`` sets the ingress device,
    which must exist in the calling thread's network namespace.
    """
    out = ctypes.create_string_buffer(len(data) + 4096)  # room for head/tail growth
    din = ctypes.create_string_buffer(data, len(data))
    attr = _TestRunAttr(prog_fd=prog_fd, data_size_in=len(data), data_size_out=len(out),
                        data_in=ctypes.addressof(din), data_out=ctypes.addressof(out),
                        repeat=repeat)
    if ctx is not None:
        cbuf = ctypes.create_string_buffer(ctx, len(ctx))
        attr.ctx_in = ctypes.addressof(cbuf)
        attr.ctx_size_in = len(ctx)
    _check("program test run", _bpf(BPF_PROG_TEST_RUN, attr))
    return attr.retval, out.raw[:attr.data_size_out], attr.duration


BPF_F_TEST_XDP_LIVE_FRAMES = 1 << 1


def prog_test_run_live(prog_fd: int, data: bytes, count: int, *, ctx: bytes,
                       batch_size: int = 0) -> int:
    """Run an XDP program on ``count`` copies of a frame in live-frames mode:
    XDP_TX, XDP_REDIRECT and XDP_PASS really transmit, redirect or hand the
    frame to the stack of ``ctx``'s ingress device (in the calling thread's
    network namespace). Returns the kernel's average ns per frame.

    Frames come from a page pool initialised with ``data`` once: what a
    program writes into a frame is still there when its page comes back.
    """
    din = ctypes.create_string_buffer(data, len(data))
    cbuf = ctypes.create_string_buffer(ctx, len(ctx))
    attr = _TestRunAttr(prog_fd=prog_fd, data_size_in=len(data), data_in=ctypes.addressof(din),
                        repeat=count, ctx_in=ctypes.addressof(cbuf), ctx_size_in=len(ctx),
                        flags=BPF_F_TEST_XDP_LIVE_FRAMES, batch_size=batch_size)
    _check("live-frames test run", _bpf(BPF_PROG_TEST_RUN, attr))
    return attr.duration


# ---------------------------------------------------------------- attachments

BPF_PROG_QUERY = 16
BPF_TCX_INGRESS = 46  # enum bpf_attach_type (6.6+)
BPF_TCX_EGRESS = 47
_MPROG_MAX = 64  # bpf_mprog_max(): programs one tcx hook holds at most


class _QueryAttr(ctypes.Structure):
    _fields_ = [
        ("target", ctypes.c_uint32),  # target_fd, or target_ifindex for tcx
        ("attach_type", ctypes.c_uint32),
        ("query_flags", ctypes.c_uint32),
        ("attach_flags", ctypes.c_uint32),
        ("prog_ids", ctypes.c_uint64),
        ("count", ctypes.c_uint32),  # prog_cnt: room in, programs out
        ("pad", ctypes.c_uint32),
        ("prog_attach_flags", ctypes.c_uint64),
        ("link_ids", ctypes.c_uint64),
        ("link_attach_flags", ctypes.c_uint64),
        ("revision", ctypes.c_uint64),
    ]


def prog_query(target: int, attach_type: int) -> list[int]:
    """The ids of the programs attached at ``attach_type`` of ``target``.

    For tcx (BPF_TCX_INGRESS/EGRESS) ``target`` is an ifindex, which the
    kernel looks up in the calling thread's network namespace. A hook with
    nothing attached answers [] (6.6 said ENOENT then; later kernels, count 0).
    A kernel that does not know the attach type raises MapError with EINVAL.
    """
    ids = (ctypes.c_uint32 * _MPROG_MAX)()
    attr = _QueryAttr(target=target, attach_type=attach_type, prog_ids=ctypes.addressof(ids),
                      count=_MPROG_MAX)
    ret = _bpf(BPF_PROG_QUERY, attr)
    if ret == -E.ENOENT:
        return []
    _check(f"query attach type {attach_type} of {target}", ret)
    return list(ids[:min(attr.count, _MPROG_MAX)])
