"""program.py: pinned maps adopted or replaced, XDP attach/detach/replace over
rtnetlink, what ``attached()`` reports, ``remove()``, and that the program
keeps running after the process that attached it is gone."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fibsync.errors import InterfaceError, MapError
from fibsync.fastpath import abi, bpfsys, program
from fibsync.model import Prefix
from fibsync.netns import inside
from tests.bpf.harness import TEST_SIZES, netns, sh

pytestmark = pytest.mark.privileged

RINGBUF = 27  # BPF_MAP_TYPE_RINGBUF: what earlier versions pinned as neigh_miss


@pytest.fixture
def instance(unique_prefix: str) -> Iterator[str]:
    yield unique_prefix
    # teardown must not depend on the test's namespace still existing
    program.remove(unique_prefix)


@pytest.fixture
def veth_ns(unique_prefix: str) -> Iterator[str]:
    with netns(f"{unique_prefix}att") as ns:
        sh("ip", "-n", ns, "link", "add", "a0", "type", "veth", "peer", "name", "b0")
        sh("ip", "-n", ns, "link", "set", "a0", "up")
        sh("ip", "-n", ns, "link", "set", "b0", "up")
        yield ns


def xdp_of(ns: str, ifname: str) -> str:
    return sh("ip", "-n", ns, "-d", "link", "show", ifname)


def tx_ports(fp: program.FastPath) -> set[int]:
    return {struct.unpack("=I", k)[0] for k, _ in bpfsys.iterate(fp.map_fd("tx_ports"))}


def other_xdp_program() -> int:
    """Load and pin a trivial XDP program that is not fibsync's; returns its fd."""
    from bcc import BPF

    bpf = BPF(text=b"int other_xdp(struct xdp_md *ctx) { return XDP_PASS; }")
    fn = bpf.load_func(b"other_xdp", BPF.XDP)
    return os.dup(fn.fd)


RENEWED = {spec.name for spec in abi.map_specs(abi.Sizes()) if spec.renew}


def origins(fp: program.FastPath) -> dict[str, set[str]]:
    """Map origins of a load: of the route tries, and of the others."""
    return {"routes": {o for n, o in fp.map_origin.items() if n in RENEWED},
            "others": {o for n, o in fp.map_origin.items() if n not in RENEWED}}


def test_second_load_adopts_maps_and_keeps_their_contents(instance: str) -> None:
    """Every map but the route tries: those are renewed (written whole on every start
    anyway), while the old program keeps its own until it is replaced."""
    with program.FastPath.load(instance, sizes=TEST_SIZES) as first:
        assert set(first.map_origin.values()) == {"created"}
        key = bytes(abi.route_key(Prefix.parse("10.0.0.0/8")))
        bpfsys.update(first.map_fd("routes_v4"), key, bytes(abi.FsRoute(7, 0, 0, 0, 0)))
        nh = abi.U32.pack(5)
        bpfsys.update(first.map_fd("nexthops"), nh, bytes(abi.FsNexthop(3)))
        old_routes = bpfsys.map_info(first.map_fd("routes_v4")).id
        first_prog = first.prog_id
        with program.FastPath.load(instance, sizes=TEST_SIZES) as second:
            assert origins(second) == {"routes": {"renewed"}, "others": {"adopted"}}
            assert bpfsys.lookup(second.map_fd("nexthops"), nh) == bytes(abi.FsNexthop(3))
            assert bpfsys.lookup(second.map_fd("routes_v4"), key) is None
            assert bpfsys.map_info(second.map_fd("routes_v4")).id != old_routes
            # the first program's trie is still whole (it forwards until replaced)
            assert bpfsys.lookup(first.map_fd("routes_v4"), key) == bytes(
                abi.FsRoute(7, 0, 0, 0, 0))
            assert second.prog_id != first_prog
        pinned = bpfsys.obj_get(str(program.pin_dir(instance) / "prog"))
        try:
            assert bpfsys.prog_info(pinned).id == second.prog_id
        finally:
            os.close(pinned)


def _map_alive(map_id: int) -> bool:
    try:
        os.close(bpfsys.map_fd_by_id(map_id))
    except MapError:
        return False
    return True


def test_a_restart_frees_the_previous_route_tables_only_once_it_releases_them(
        instance: str) -> None:
    """The kernel frees a renewed map's entries when its last holder lets go (the
    previous program, replaced on the interfaces while the first sync is written):
    the daemon holds them until it is synced, so that the kernel's work of freeing
    a full table's entries does not compete with its first write."""
    with program.FastPath.load(instance, sizes=TEST_SIZES) as first:
        old = {name: bpfsys.map_info(first.map_fd(name)).id for name in RENEWED}
    os.close(first.prog_fd)  # as the previous run's process, gone: its pin holds it
    maps = program.OpenMaps.open(instance, sizes=TEST_SIZES)
    fp = maps.load_program()  # the new program's pin: nothing else holds the old tables
    try:
        assert sorted(bpfsys.map_info(fd).id for fd in maps.superseded) == sorted(old.values())
        assert all(_map_alive(i) for i in old.values())
        maps.release_superseded()
        deadline = time.monotonic() + 10  # the kernel frees a map in a work item
        while any(_map_alive(i) for i in old.values()):
            assert time.monotonic() < deadline, "the previous route tables stayed"
            time.sleep(0.05)
    finally:
        fp.close()


def test_a_second_program_on_the_running_tables_adopts_the_route_tables(instance: str) -> None:
    """renew=False (a benchmark's variant of the program): it reads what the first
    program's writer wrote, route tables included."""
    with program.FastPath.load(instance, sizes=TEST_SIZES) as first:
        key = bytes(abi.route_key(Prefix.parse("2001:db8::/32")))
        bpfsys.update(first.map_fd("v6_hash"), key, bytes(abi.FsRoute(7, 0, 0, 0, 32)))
        with program.FastPath.load(instance, sizes=TEST_SIZES, renew=False) as second:
            assert set(second.map_origin.values()) == {"adopted"}
            assert bpfsys.lookup(second.map_fd("v6_hash"), key) == bytes(
                abi.FsRoute(7, 0, 0, 0, 32))


def test_a_map_of_another_shape_is_replaced_not_reused(instance: str) -> None:
    with program.FastPath.load(instance, sizes=TEST_SIZES) as first:
        old_id = bpfsys.map_info(first.map_fd("routes_v4")).id
    bigger = abi.Sizes(**{**{f: getattr(TEST_SIZES, f) for f in TEST_SIZES.__slots__},
                          "routes_v4": TEST_SIZES.routes_v4 * 2})
    with program.FastPath.load(instance, sizes=bigger) as second:
        assert second.map_origin["routes_v4"] == "replaced"
        assert second.map_origin["routes_v6"] == "renewed"
        assert origins(second)["others"] == {"adopted"}
        info = bpfsys.map_info(second.map_fd("routes_v4"))
        assert info.id != old_id
        assert info.max_entries == bigger.routes_v4


def test_a_map_of_another_layout_version_is_replaced_even_of_the_same_shape(
        instance: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with program.FastPath.load(instance, sizes=TEST_SIZES) as first:
        old_id = bpfsys.map_info(first.map_fd("nexthops")).id
        assert bpfsys.map_info(first.map_fd("nexthops")).name == f"fs{abi.LAYOUT}_nexthops"
    # a later version that reads the same bytes differently bumps abi.LAYOUT
    monkeypatch.setattr(abi, "LAYOUT", abi.LAYOUT + 1)
    with program.FastPath.load(instance, sizes=TEST_SIZES) as second:
        assert set(second.map_origin.values()) == {"replaced"}
        assert bpfsys.map_info(second.map_fd("nexthops")).id != old_id


def test_a_foreign_pinned_object_is_replaced(instance: str) -> None:
    directory = program.pin_dir(instance)
    directory.mkdir(parents=True)
    fd = bpfsys.map_create(abi.MAP_HASH, 4, 4, 16, name="impostor")
    bpfsys.obj_pin(fd, str(directory / "nexthops"))
    os.close(fd)
    with program.FastPath.load(instance, sizes=TEST_SIZES) as fp:
        assert fp.map_origin["nexthops"] == "replaced"
        assert bpfsys.map_info(fp.map_fd("nexthops")).value_size == 36


def test_the_pin_of_a_retired_map_is_removed(instance: str) -> None:
    """Pins an earlier version left (its neigh_miss ring buffer) do not stop a start."""
    with program.FastPath.load(instance, sizes=TEST_SIZES):
        pass
    directory = program.pin_dir(instance)
    fd = bpfsys.map_create(RINGBUF, 0, 0, 1 << 16, name="fs1_neigh_miss")
    bpfsys.obj_pin(fd, str(directory / "neigh_miss"))
    os.close(fd)
    with program.FastPath.load(instance, sizes=TEST_SIZES) as fp:
        assert origins(fp) == {"routes": {"renewed"}, "others": {"adopted"}}
        assert not (directory / "neigh_miss").exists()
    assert {p.name for p in directory.iterdir()} == {*abi.MAP_NAMES, "prog"}


def test_attach_detach(instance: str, veth_ns: str) -> None:
    with program.FastPath.load(instance, sizes=TEST_SIZES) as fp, inside(veth_ns):
        att = fp.attach("a0")
        assert (att.ifname, att.mode, att.prog_id) == ("a0", "native", fp.prog_id)
        assert f"prog/xdp id {fp.prog_id}" in xdp_of(veth_ns, "a0")
        assert fp.attached() == [att]
        # the daemon's periodic check asks for its interfaces by name
        assert fp.attached(["a0", "no-such-if"]) == [att]
        assert fp.attached(["no-such-if"]) == []
        assert program.attached(instance) == [att]
        assert tx_ports(fp) == {att.ifindex}

        assert fp.attach("a0") == att  # idempotent
        fp.detach("a0")
        assert "prog/xdp" not in xdp_of(veth_ns, "a0")
        assert fp.attached() == [] and fp.attached(["a0"]) == []
        assert tx_ports(fp) == set()


def test_attach_generic_then_switch_to_native(instance: str, veth_ns: str) -> None:
    with program.FastPath.load(instance, sizes=TEST_SIZES) as fp, inside(veth_ns):
        assert fp.attach("a0", mode="generic").mode == "generic"
        assert "xdpgeneric" in xdp_of(veth_ns, "a0")
        assert fp.attach("a0", mode="native").mode == "native"
        assert [a.mode for a in fp.attached()] == ["native"]


def test_missing_interface_is_one_clear_line(instance: str, veth_ns: str) -> None:
    with program.FastPath.load(instance, sizes=TEST_SIZES) as fp, inside(veth_ns):
        with pytest.raises(InterfaceError) as err:
            fp.attach("nosuch0")
        assert str(err.value) == "interface 'nosuch0' does not exist"
        assert err.value.exit_code == 2


def test_foreign_program_is_not_replaced_unless_asked(instance: str, veth_ns: str) -> None:
    other = other_xdp_program()
    try:
        with program.FastPath.load(instance, sizes=TEST_SIZES) as fp, inside(veth_ns):
            program._xdp_set(program._ifindex("a0"), other, 4, expected_id=None)
            other_id = bpfsys.prog_info(other).id
            with pytest.raises(InterfaceError) as err:
                fp.attach("a0")
            message = str(err.value)
            assert "\n" not in message
            assert f"already runs another XDP program (id {other_id}" in message
            assert "ip link set dev a0 xdp off" in message
            assert "--replace-xdp" in message
            assert tx_ports(fp) == set()
            assert program.attached(instance) == []

            att = fp.attach("a0", replace=True)
            assert att.prog_id == fp.prog_id
    finally:
        os.close(other)


def test_detach_leaves_a_foreign_program_alone(instance: str, veth_ns: str) -> None:
    other = other_xdp_program()
    try:
        with program.FastPath.load(instance, sizes=TEST_SIZES) as fp, inside(veth_ns):
            program._xdp_set(program._ifindex("a0"), other, 4, expected_id=None)
            fp.detach("a0")
            assert f"prog/xdp id {bpfsys.prog_info(other).id}" in xdp_of(veth_ns, "a0")
    finally:
        os.close(other)


def test_restart_replaces_its_own_program_in_place(instance: str, veth_ns: str) -> None:
    with inside(veth_ns):
        with program.FastPath.load(instance, sizes=TEST_SIZES) as first:
            first.attach("a0", mode="generic")
        with program.FastPath.load(instance, sizes=TEST_SIZES) as second:
            att = second.attach("a0")  # no replace needed: the old program was ours
            assert (att.mode, att.prog_id) == ("generic", second.prog_id)
            assert second.attached() == [att]


def test_program_stays_attached_after_the_process_exits(instance: str, veth_ns: str) -> None:
    script = (
        "from fibsync.fastpath import program; from tests.bpf.harness import TEST_SIZES;"
        f"fp = program.FastPath.load({instance!r}, sizes=TEST_SIZES); fp.attach('a0')"
    )
    root = Path(__file__).resolve().parents[2]
    # nsenter, not `ip netns exec`: that one mounts a fresh /sys, so a bpffs
    # mounted there would be private to the child and its pins lost with it
    subprocess.run(["nsenter", f"--net=/run/netns/{veth_ns}", sys.executable, "-c", script],
                   check=True, cwd=root, capture_output=True)
    with inside(veth_ns):
        (att,) = program.attached(instance)
        assert att.ifname == "a0"

        removed = program.remove(instance)
        assert removed == [att]
        assert program.attached(instance) == []
    assert "prog/xdp" not in xdp_of(veth_ns, "a0")
    assert not program.pin_dir(instance).exists()


def test_no_map_lookup_is_left_to_a_generic_call(fastpath: program.FastPath) -> None:
    """Two lookups in different maps that clang merges into one call, the map chosen at
    run time, reach the verifier as a generic bpf_map_lookup_elem: never inlined, and
    an indirect call more on each packet that takes it. The DIR-24-8 hit's nexthop
    read was one (128.8 against 109.8 ns, docs/benchmarks.md); every map the program
    reads must be known at its call site."""
    out = subprocess.run(["bpftool", "prog", "dump", "xlated", "id", str(fastpath.prog_id)],
                         capture_output=True, text=True, check=True).stdout
    assert "call bpf_xdp_fib_lookup" in out and "call __htab_map_lookup_elem" in out
    generic = [line for line in out.splitlines() if "call bpf_map_lookup_elem" in line]
    assert not generic, generic
