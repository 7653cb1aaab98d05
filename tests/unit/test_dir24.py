"""The DIR-24-8 table on private memory: lookups against a brute-force
longest-prefix match, the entry format the XDP program reads, and the
ordering rules that keep concurrent readers right (no root needed)."""

from __future__ import annotations

import mmap
import random
from typing import Any

import numpy as np
import pytest

from fibsync.fastpath import abi
from fibsync.fastpath.dir24 import (
    EXT,
    FIB_SLOT_VALUE,
    INDEX,
    TBL8,
    Dir24Table,
    Pool,
    depth_of,
    memory_buffers,
)

Route = tuple[int, int]  # (address, prefix length), host order


def ip(text: str) -> int:
    return int.from_bytes(bytes(int(x) for x in text.split(".")), "big")


def value(nh: int, action: int = abi.FS_ACT_FORWARD) -> bytes:
    return abi.ROUTE.pack(nh, action, 0, 0, 0)


class Reference:
    """The routes as a dict, and the longest-prefix match done the slow way."""

    def __init__(self) -> None:
        self.routes: dict[Route, bytes] = {}

    def cover(self, addr: int, depth: int) -> tuple[int, bytes] | None:
        for length in range(depth - 1, -1, -1):
            key = ((addr >> (32 - length)) << (32 - length) if length else 0, length)
            if key in self.routes:
                return length, self.routes[key]
        return None

    def lookup(self, addr: int) -> bytes | None:
        got = self.cover(addr, 33)
        return got[1] if got else None


class Graces:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def table(ref: Reference, groups: int = 256, slots: int = 64,
          buffers: tuple[object, ...] | None = None,
          nexthops: dict[int, bytes] | None = None, adopt_aside: bool = False) -> Dir24Table:
    return Dir24Table(*(buffers or memory_buffers(groups, slots)), cover=ref.cover,
                      nexthop=None if nexthops is None else nexthops.get, grace=Graces(),
                      adopt_aside=adopt_aside)


def load(t: Dir24Table, routes: dict[Route, bytes], unread: bool = False) -> list[int]:
    items = list(routes.items())
    values = sorted(set(routes.values()))
    failed = t.load(np.array([a for (a, _), _ in items], np.uint32),
                    np.array([n for (_, n), _ in items], np.uint8),
                    np.array([values.index(v) for _, v in items], np.intp), values,
                    unread=unread)
    return failed.tolist()


def add(t: Dir24Table, ref: Reference, routes: dict[Route, bytes]) -> list[int]:
    ref.routes.update(routes)
    ordered = sorted(routes.items(), key=lambda kv: -kv[0][1])
    return t.add([(a, n, v) for (a, n), v in ordered])


def delete(t: Dir24Table, ref: Reference, prefixes: list[Route]) -> None:
    for p in prefixes:
        del ref.routes[p]
    t.delete(prefixes)


def mismatches(t: Dir24Table, ref: Reference, addrs: list[int]) -> list[str]:
    out = []
    for a in addrs:
        want, got = ref.lookup(a), t.lookup(a)
        if want is not None:
            want = want[:7] + b"\0"
        if want != got:
            out.append(f"{a >> 24}.{a >> 16 & 255}.{a >> 8 & 255}.{a & 255}: "
                       f"want {want!r} got {got!r}")
    return out


def probes(ref: Reference, rng: random.Random, n: int = 2000) -> list[int]:
    """Addresses where answers change: both ends of every prefix and their
    neighbours, plus random ones in the busy region."""
    out = []
    for a, length in ref.routes:
        end = a + (1 << (32 - length)) - 1
        out += [a, end, max(a - 1, 0), min(end + 1, 2**32 - 1)]
    out += [(10 << 24) | rng.randrange(1 << 18) for _ in range(n)]
    return out


def random_prefix(rng: random.Random) -> Route:
    """Prefixes crowded into 10.0.0.0/14, /0../32, so that they overlap a lot."""
    length = rng.choice([0, 8, 12, 14, 16, 18, 20, 22, 23, 24, 24, 24, 25, 26, 27, 28, 30,
                         31, 32])
    addr = (10 << 24) | rng.randrange(1 << 18)
    return ((addr >> (32 - length)) << (32 - length) if length else 0), length


# ---------------------------------------------------------------- entry format


def test_a_24_is_one_tbl24_entry_with_its_depth_and_slot() -> None:
    ref = Reference()
    t = table(ref)
    assert add(t, ref, {(ip("10.1.2.0"), 24): value(7)}) == []
    e = t._m24[ip("10.1.2.0") >> 8]
    assert depth_of(e) == 24 and not e & EXT
    slot = e & INDEX
    assert bytes(t._slots[slot * 8:slot * 8 + 8]) == value(7)
    assert t._m24[(ip("10.1.2.0") >> 8) + 1] == 0  # the neighbour /24 is a miss
    assert t.lookup(ip("10.1.2.200")) == value(7)


def test_a_16_fills_256_entries_and_a_longer_route_gets_a_group() -> None:
    ref = Reference()
    t = table(ref)
    add(t, ref, {(ip("10.1.0.0"), 16): value(1)})
    row = t._t24[ip("10.1.0.0") >> 8:(ip("10.1.0.0") >> 8) + 256]
    assert len(set(row.tolist())) == 1 and depth_of(int(row[0])) == 16
    add(t, ref, {(ip("10.1.2.128"), 25): value(2)})
    e = t._m24[ip("10.1.2.0") >> 8]
    assert e & EXT
    g = e & INDEX
    group = t._t8[g * TBL8:(g + 1) * TBL8]
    assert [depth_of(int(x)) for x in group[:128]] == [16] * 128  # the /16 behind the /25
    assert [depth_of(int(x)) for x in group[128:]] == [25] * 128
    assert t.lookup(ip("10.1.2.127")) == value(1)
    assert t.lookup(ip("10.1.2.128")) == value(2)


def test_deleting_the_last_longer_route_folds_the_group_back_and_retires_it() -> None:
    ref = Reference()
    t = table(ref)
    add(t, ref, {(ip("10.1.0.0"), 16): value(1), (ip("10.1.2.128"), 25): value(2)})
    group = t._m24[ip("10.1.2.0") >> 8] & INDEX
    delete(t, ref, [(ip("10.1.2.128"), 25)])
    e = t._m24[ip("10.1.2.0") >> 8]
    assert not e & EXT and depth_of(e) == 16
    assert t.groups.in_use == 0
    assert group in t.groups._retired


def test_a_deleted_prefix_falls_back_to_its_covering_route_or_to_a_miss() -> None:
    ref = Reference()
    t = table(ref)
    add(t, ref, {(ip("10.0.0.0"), 8): value(1), (ip("10.1.0.0"), 16): value(2),
                 (ip("10.1.1.0"), 24): value(3)})
    delete(t, ref, [(ip("10.1.0.0"), 16)])
    assert t.lookup(ip("10.1.5.5")) == value(1)
    assert t.lookup(ip("10.1.1.5")) == value(3)
    delete(t, ref, [(ip("10.0.0.0"), 8)])
    assert t.lookup(ip("10.1.5.5")) is None
    assert t.lookup(ip("10.1.1.5")) == value(3)


def test_the_default_route_is_an_entry_not_a_miss() -> None:
    ref = Reference()
    t = table(ref)
    add(t, ref, {(0, 0): value(9)})
    assert t.lookup(ip("192.0.2.1")) == value(9)
    assert depth_of(t._m24[ip("192.0.2.1") >> 8]) == 0
    delete(t, ref, [(0, 0)])
    assert t.lookup(ip("192.0.2.1")) is None
    assert not t._t24.any()


def test_identical_values_share_one_slot_and_plen_does_not_split_them() -> None:
    ref = Reference()
    t = table(ref)
    add(t, ref, {(ip("10.1.0.0"), 16): value(5), (ip("10.2.0.0"), 24): value(5)})
    t.add([(ip("10.3.0.0"), 24, abi.ROUTE.pack(5, 0, 0, 0, 24))])
    slots = {t._m24[ip(a) >> 8] & INDEX for a in ("10.1.0.0", "10.2.0.0", "10.3.0.0")}
    assert len(slots) == 1
    assert t.slots.in_use == 1


# ---------------------------------------------------------------- against the reference


@pytest.mark.parametrize("seed", range(4))
def test_random_changes_match_longest_prefix_match(seed: int) -> None:
    rng = random.Random(seed)
    ref = Reference()
    t = table(ref, groups=1024)
    initial = {random_prefix(rng): value(rng.randrange(1, 6)) for _ in range(300)}
    ref.routes.update(initial)
    assert load(t, initial) == []
    assert mismatches(t, ref, probes(ref, rng)) == []
    for _ in range(25):
        adds = {random_prefix(rng): value(rng.randrange(1, 6)) for _ in range(15)}
        gone = [p for p in ref.routes if p not in adds and rng.random() < 0.06]
        assert add(t, ref, adds) == []
        delete(t, ref, gone)
        assert mismatches(t, ref, probes(ref, rng, 300)) == []
    # nothing leaks: every group in use is named by a tbl24 entry
    named = {e & INDEX for e in t._t24[(t._t24 & EXT) != 0].tolist()}
    assert len(named) == t.groups.in_use


@pytest.mark.parametrize("unread", [False, True], ids=["published", "in place"])
def test_load_and_one_by_one_build_the_same_table(unread: bool) -> None:
    """A load builds in private memory and publishes, or (arrays no program reads
    yet) in place: either way the table one change at a time would have built."""
    rng = random.Random(7)
    routes = {random_prefix(rng): value(rng.randrange(1, 9)) for _ in range(400)}
    a_ref, b_ref = Reference(), Reference()
    a, b = table(a_ref, groups=1024), table(b_ref, groups=1024)
    a_ref.routes.update(routes)
    load(a, routes, unread=unread)
    add(b, b_ref, routes)
    region = np.arange(10 << 24, (10 << 24) + (1 << 18), dtype=np.uint32)
    assert [a.lookup(x) for x in region[::7].tolist()] == \
        [b.lookup(x) for x in region[::7].tolist()]
    assert mismatches(a, a_ref, probes(a_ref, rng)) == []


def test_a_load_over_a_previous_table_answers_as_the_new_routes_everywhere() -> None:
    """A restart's load builds and publishes one range of tbl24 at a time: routes
    shorter than a range (a /0, a /1, a /3) and longer ones, all over the address
    space, must answer as a brute-force match, at each range's edges too, and
    what only the previous table held must be gone."""
    rng = random.Random(11)

    def anywhere(length: int) -> Route:
        addr = rng.randrange(1 << 32)
        return ((addr >> (32 - length)) << (32 - length) if length else 0), length

    buffers = memory_buffers(1024, 256)
    old_ref = Reference()
    old = table(old_ref, buffers=buffers)
    old_routes = {anywhere(rng.choice([2, 9, 16, 24, 26, 32])): value(rng.randrange(1, 9))
                  for _ in range(300)}
    old_ref.routes.update(old_routes)
    load(old, old_routes)

    ref = Reference()
    new = table(ref, buffers=buffers)
    routes = {anywhere(n): value(rng.randrange(1, 9)) for n in range(33) for _ in range(12)}
    routes[(0, 0)] = value(9)
    # /24s on both sides of each range's edge (a range is 1 << 18 entries, or a multiple)
    routes.update({(((k << 18) + d) << 8, 24): value(k % 8 + 1)
                   for k in range(1, 64) for d in (-1, 0)})
    ref.routes.update(routes)
    assert load(new, routes) == []
    edges = [(lo << 8) + d for lo in range(0, 1 << 24, 1 << 18) for d in (-1, 0, 1)]
    checked = probes(ref, rng) + probes(old_ref, rng) + [e % (1 << 32) for e in edges]
    assert mismatches(new, ref, checked) == []
    in_place = table(Reference())
    load(in_place, routes, unread=True)
    assert [in_place.lookup(a) for a in checked] == [new.lookup(a) for a in checked]


# ---------------------------------------------------------------- concurrency rules


@pytest.mark.parametrize("aside", [False, True], ids=["adopted", "adopted-aside"])
def test_load_over_a_previous_table_uses_other_groups_and_slots_and_retires_old_ones(
        aside: bool) -> None:
    """A restarted daemon adopts the maps while the program reads them: the
    new table must not write into what the old one still names (learnt in a
    thread while the daemon dumps, the load waits for it)."""
    rng = random.Random(3)
    buffers = memory_buffers(64, 64)
    old_ref = Reference()
    old = table(old_ref, buffers=buffers)
    old_routes = {(ip("10.0.0.0"), 8): value(1), (ip("10.1.2.128"), 25): value(2),
                  (ip("10.1.3.0"), 26): value(3)}
    old_ref.routes.update(old_routes)
    load(old, old_routes)
    old_groups = {old._m24[ip(a) >> 8] & INDEX for a in ("10.1.2.0", "10.1.3.0")}
    old_slots = {1, 2, 3}
    tbl8_before = bytes(buffers[1])
    slots_before = bytes(buffers[2])

    ref = Reference()
    new = table(ref, buffers=buffers, adopt_aside=aside)
    new.memory()  # waits for the adoption, as everything that takes or frees does
    assert set(new.groups._skip) == old_groups and set(new.slots._skip) == old_slots
    routes = {(ip("10.0.0.0"), 8): value(11), (ip("10.1.2.128"), 25): value(12),
              (ip("10.9.9.0"), 27): value(13)}
    ref.routes.update(routes)
    load(new, routes)
    assert mismatches(new, ref, probes(ref, rng)) == []
    # the old groups and slots were not written, and come back only after a grace period
    for g in old_groups:
        assert bytes(buffers[1])[g * 1024:(g + 1) * 1024] == tbl8_before[g * 1024:(g + 1) * 1024]
    for s in old_slots:
        assert bytes(buffers[2])[s * 8:s * 8 + 8] == slots_before[s * 8:s * 8 + 8]
    assert sorted(new.groups._retired) == sorted(old_groups)
    assert sorted(new.slots._retired) == sorted(old_slots)


def test_a_retired_group_is_reused_only_after_a_grace_period() -> None:
    ref = Reference()
    t = table(ref, groups=3)  # groups 1 and 2
    graces = t.groups._grace
    assert isinstance(graces, Graces)
    add(t, ref, {(ip("10.0.1.0"), 25): value(1), (ip("10.0.2.0"), 25): value(1)})
    delete(t, ref, [(ip("10.0.1.0"), 25)])
    assert graces.count == 0
    add(t, ref, {(ip("10.0.3.0"), 25): value(1)})  # needs the retired group
    assert graces.count == 1
    assert t.lookup(ip("10.0.3.1")) == value(1)
    assert t.lookup(ip("10.0.1.1")) is None


def test_pool_hands_out_fresh_numbers_before_retired_ones() -> None:
    graces = Graces()
    pool = Pool(4, graces)
    assert [pool.take(), pool.take()] == [1, 2]
    pool.retire(1)
    assert pool.take() == 3 and graces.count == 0
    assert pool.take() == 1 and graces.count == 1
    assert pool.take() is None


def test_a_grace_period_waited_for_elsewhere_frees_retired_numbers_for_the_write_path() -> None:
    graces = Graces()
    pool = Pool(3, graces)
    assert [pool.take(), pool.take()] == [1, 2]
    pool.retire(1)
    token = pool.begin_reclaim()
    assert token == [1] and pool.begin_reclaim() is None  # one at a time
    pool.retire(2)  # after the grace began: not covered by it
    pool.end_reclaim(token)
    assert pool.take() == 1 and graces.count == 0  # no wait on the write path
    assert pool.take() == 2 and graces.count == 1  # 2 needed a grace of its own


def test_a_take_that_cannot_wait_for_the_reclaim_waits_itself_once() -> None:
    graces = Graces()
    pool = Pool(2, graces)
    assert pool.take() == 1
    pool.retire(1)
    token = pool.begin_reclaim()
    assert token is not None
    assert pool.take() == 1 and graces.count == 1  # nothing else: it waits
    pool.end_reclaim(token)  # late: must not hand 1 out a second time
    assert pool.take() is None


def test_slots_no_entry_names_are_collected_and_reused() -> None:
    ref = Reference()
    t = table(ref, slots=4)  # slots 1..3 serve nine values, one at a time
    for nh in range(1, 10):
        assert add(t, ref, {(ip("10.0.0.0"), 24): value(nh)}) == []
        assert t.lookup(ip("10.0.0.1")) == value(nh)
    assert t.stats.slot_gcs >= 3
    assert t.slots._grace.count >= 3  # type: ignore[attr-defined]


# ---------------------------------------------------------------- nexthop copies


def nexthop(n: int) -> bytes:
    return abi.NEXTHOP.pack(n, 1500, abi.FS_NH_RESOLVED, 2, bytes([2, 0, 0, 0, 0, n]),
                            bytes([2, 0, 0, 0, 1, n]), bytes(16))


def test_a_forward_slot_names_a_copy_of_its_nexthop() -> None:
    ref = Reference()
    nexthops = {1: nexthop(1)}
    t = table(ref, nexthops=nexthops)
    add(t, ref, {(ip("10.0.0.0"), 8): value(1), (ip("10.1.0.0"), 16): value(2),
                 (ip("10.2.0.0"), 16): abi.ROUTE.pack(1, abi.FS_ACT_FORWARD, abi.FS_ROUTE_GROUP,
                                                      0, 0)})
    slot = t._m24[ip("10.0.0.0") >> 8] & INDEX
    nh_id, _, flags, _, _ = abi.ROUTE.unpack(bytes(t._slots[slot * 8:slot * 8 + 8]))
    assert flags == abi.FS_ROUTE_NH_COPY and nh_id == 2 * slot
    assert t.nexthop_copy(ip("10.0.0.1")) == nexthop(1)
    assert t.lookup(ip("10.0.0.1")) == value(1)  # the value as the writer gave it
    # nexthop 2 is unknown, a group is no single nexthop: both go through `nexthops`
    assert t.nexthop_copy(ip("10.1.0.1")) is None
    assert t.nexthop_copy(ip("10.2.0.1")) is None


def copy_at(t: Dir24Table, index: int) -> bytes:
    return bytes(t._nh[index * 40:index * 40 + 36])


def test_a_changed_nexthop_switches_copies_after_writing_the_other() -> None:
    ref = Reference()
    nexthops = {1: nexthop(1)}
    t = table(ref, nexthops=nexthops)
    add(t, ref, {(ip("10.0.0.0"), 8): value(1)})
    slot = t._m24[ip("10.0.0.0") >> 8] & INDEX
    nexthops[1] = nexthop(7)
    t.nexthops_changed({1: nexthops[1]})
    assert t.nexthop_copy(ip("10.0.0.1")) == nexthop(7)
    assert t._slot_words[2 * slot] == 2 * slot + 1
    # the copy a reader may still hold is untouched
    assert copy_at(t, 2 * slot) == nexthop(1)
    graces = t._grace
    assert isinstance(graces, Graces) and graces.count == 0
    # again before a grace period: neither own copy may be written, a free number's
    # pair is borrowed, and nothing waits
    t.nexthops_changed({1: nexthop(8)})
    lent = t._slot_words[2 * slot] // 2
    assert lent not in (0, slot) and graces.count == 0
    assert t.nexthop_copy(ip("10.0.0.1")) == nexthop(8)
    assert (copy_at(t, 2 * slot), copy_at(t, 2 * slot + 1)) == (nexthop(1), nexthop(7))
    assert (t.stats.copy_switches, t.stats.copy_borrows, t.stats.copy_waits) == (2, 1, 0)
    t.nexthops_changed({3: nexthop(3)})  # no slot names nexthop 3: nothing to do
    assert graces.count == 0


def test_with_no_number_free_a_second_switch_waits_for_a_grace_period() -> None:
    ref = Reference()
    t = table(ref, slots=2, nexthops={1: nexthop(1)})  # one slot number in all
    add(t, ref, {(ip("10.0.0.0"), 8): value(1)})
    slot = t._m24[ip("10.0.0.0") >> 8] & INDEX
    t.nexthops_changed({1: nexthop(7)})
    t.nexthops_changed({1: nexthop(8)})
    graces = t._grace
    assert isinstance(graces, Graces) and graces.count == 1 and t.stats.copy_waits == 1
    assert t._slot_words[2 * slot] == 2 * slot  # back to its first copy, after the wait
    assert t.nexthop_copy(ip("10.0.0.1")) == nexthop(8)


def test_a_nexthop_announced_again_unchanged_switches_nothing() -> None:
    # a route deleted and added again re-announces its nexthop with the same bytes:
    # it must not cost a switch, let alone a grace period on the write path
    ref = Reference()
    nexthops = {1: nexthop(1)}
    t = table(ref, nexthops=nexthops)
    add(t, ref, {(ip("10.0.0.0"), 8): value(1)})
    slot = t._m24[ip("10.0.0.0") >> 8] & INDEX
    for _ in range(3):
        t.nexthops_changed({1: nexthop(1)})
    graces = t._grace
    assert isinstance(graces, Graces) and graces.count == 0
    assert t._slot_words[2 * slot] == 2 * slot  # still the first copy
    assert not t.begin_reclaim()  # nothing switched: no grace period to run either


def test_a_number_whose_pair_the_copies_lack_is_not_borrowed() -> None:
    ref = Reference()
    tbl24, tbl8, slots, nh = memory_buffers(64, 8)
    short = mmap.mmap(-1, 4 * 40)  # copies for slot numbers 0 and 1 only
    t = Dir24Table(tbl24, tbl8, slots, short, cover=ref.cover,
                   nexthop={1: nexthop(1)}.get, grace=Graces())
    add(t, ref, {(ip("10.0.0.0"), 8): value(1)})
    t.nexthops_changed({1: nexthop(7)})
    t.nexthops_changed({1: nexthop(8)})  # number 2 is free, but its pair is not there
    assert t.stats.copy_waits == 1 and t.nexthop_copy(ip("10.0.0.1")) == nexthop(8)


def test_a_grace_period_run_elsewhere_frees_the_own_pair_and_the_borrowed_one() -> None:
    ref = Reference()
    t = table(ref, nexthops={1: nexthop(1)})
    add(t, ref, {(ip("10.0.0.0"), 8): value(1)})
    slot = t._m24[ip("10.0.0.0") >> 8] & INDEX
    graces = t._grace
    assert isinstance(graces, Graces)
    t.nexthops_changed({1: nexthop(7)})
    first = t.begin_reclaim()  # the daemon's thread: a grace period begins after the switch
    assert first
    t.nexthops_changed({1: nexthop(8)})  # before it ended: a borrowed pair
    lent = t._slot_words[2 * slot] // 2
    assert lent != slot
    second = t.begin_reclaim()
    first.done()
    second.done()
    # both switches are past a grace period: back to its own pair, and the borrowed
    # number is retired (free again after a grace period of its own)
    t.nexthops_changed({1: nexthop(9)})
    assert t._slot_words[2 * slot] == 2 * slot and graces.count == 0
    assert t.nexthop_copy(ip("10.0.0.1")) == nexthop(9)
    assert lent in t.slots._retired and slot not in t._borrowed
    # a grace period that began before a switch does not free that switch's copy
    t.begin_reclaim().done()
    early = t.begin_reclaim()
    t.nexthops_changed({1: nexthop(10)})
    early.done()
    t.nexthops_changed({1: nexthop(11)})
    # borrowed again (the number given back before is free again by now)
    assert t._slot_words[2 * slot] // 2 != slot
    assert copy_at(t, 2 * slot + 1) == nexthop(10)  # the copy just left, untouched
    assert graces.count == 0 and t.nexthop_copy(ip("10.0.0.1")) == nexthop(11)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_no_copy_a_reader_may_hold_is_ever_written(seed: int) -> None:
    """Readers take the copy their slot names and hold it until a grace period that
    began after them has ended (the daemon's, run elsewhere, or one waited for
    here). Random switches, grace periods and readers: no write ever lands on a
    copy a reader holds, and every slot always names its nexthop's contents."""
    rng = random.Random(seed)
    readers: list[tuple[int, int]] = []  # (copy index, when the reader started)
    clock = [0]

    def waited() -> None:  # a grace period waited for here: every reader is done
        readers.clear()

    ref = Reference()
    contents = {n: nexthop(n) for n in range(1, 4)}
    t = Dir24Table(*memory_buffers(64, 8), cover=ref.cover, nexthop=contents.get,
                   grace=waited)
    add(t, ref, {(ip(f"10.{n}.0.0"), 16): value(n) for n in range(1, 4)})
    running: list[tuple[Any, int]] = []  # grace periods begun elsewhere, and when
    for _ in range(3000):
        clock[0] += 1
        op = rng.random()
        if op < 0.4:
            for n in range(1, 4):
                slot = t._m24[ip(f"10.{n}.0.0") >> 8] & INDEX
                readers.append((t._slot_words[2 * slot], clock[0]))
        elif op < 0.75:
            n = rng.randrange(1, 4)
            contents[n] = nexthop(rng.randrange(1, 200))
            before = bytes(t._nh)
            t.nexthops_changed({n: contents[n]})
            after = bytes(t._nh)
            written = {i // 40 for i in range(len(after)) if before[i] != after[i]}
            assert not written & {i for i, _ in readers}
        elif op < 0.9:
            running.append((t.begin_reclaim(), clock[0]))
        elif running:
            reclaim, began = running.pop(0)
            reclaim.done()
            readers[:] = [(i, at) for i, at in readers if at > began]
        for n in range(1, 4):
            assert t.nexthop_copy(ip(f"10.{n}.0.1")) == contents[n]


def test_a_slot_collected_gives_back_the_pair_it_borrowed() -> None:
    ref = Reference()
    t = table(ref, nexthops={1: nexthop(1), 2: nexthop(2)})
    add(t, ref, {(ip("10.0.0.0"), 24): value(1)})
    t.nexthops_changed({1: nexthop(7)})
    t.nexthops_changed({1: nexthop(8)})
    slot = t._m24[ip("10.0.0.0") >> 8] & INDEX
    lent = t._borrowed[slot]
    add(t, ref, {(ip("10.0.0.0"), 24): value(2)})  # the slot of value(1) is named no more
    t._collect_slots()
    assert slot not in t._copy and slot not in t._borrowed
    assert {slot, lent} <= set(t.slots._retired)


def test_adopting_a_table_keeps_the_pairs_its_slots_borrowed() -> None:
    buffers = memory_buffers(64, 64)
    old_ref = Reference()
    old = table(old_ref, buffers=buffers, nexthops={1: nexthop(1)})
    add(old, old_ref, {(ip("10.0.0.0"), 8): value(1)})
    old.nexthops_changed({1: nexthop(7)})
    old.nexthops_changed({1: nexthop(8)})
    slot = old._m24[ip("10.0.0.0") >> 8] & INDEX
    lent = old._borrowed[slot]
    new = table(Reference(), buffers=buffers, nexthops={1: nexthop(1)})
    # neither the slot the old table names nor the pair it reads is handed out
    taken = {new.slots.take(wait=False) for _ in range(60)}
    assert not {slot, lent} & taken


def test_slots_collected_forget_their_copies() -> None:
    ref = Reference()
    nexthops = {n: nexthop(n) for n in range(1, 10)}
    t = table(ref, slots=4, nexthops=nexthops)
    for n in range(1, 10):
        add(t, ref, {(ip("10.0.0.0"), 24): value(n)})
        assert t.nexthop_copy(ip("10.0.0.1")) == nexthop(n)
    assert sum(len(s) for s in t._slots_of_nh.values()) <= 3


# ---------------------------------------------------------------- running out


def test_without_a_free_group_the_24_is_pinned_to_bpf_fib_lookup() -> None:
    ref = Reference()
    t = table(ref, groups=2)  # one group: 1
    add(t, ref, {(ip("10.0.0.0"), 8): value(1)})
    assert add(t, ref, {(ip("10.0.1.0"), 25): value(2)}) == []
    assert add(t, ref, {(ip("10.0.2.0"), 25): value(3)}) == [0]
    # the /8 must not answer for 10.0.2.0/25: the kernel does, for the whole /24
    assert t.lookup(ip("10.0.2.1")) == FIB_SLOT_VALUE
    assert t.lookup(ip("10.0.2.200")) == FIB_SLOT_VALUE
    assert t.stats.pinned == 1
    # routes covering the pinned /24 change around it, never over it
    add(t, ref, {(ip("10.0.2.0"), 24): value(5)})
    assert t.lookup(ip("10.0.2.200")) == FIB_SLOT_VALUE
    add(t, ref, {(ip("10.0.0.0"), 16): value(4)})
    delete(t, ref, [(ip("10.0.0.0"), 8)])
    assert t.lookup(ip("10.0.2.200")) == FIB_SLOT_VALUE
    assert t.lookup(ip("10.0.3.1")) == value(4)


def test_load_pins_what_does_not_fit_and_reports_it() -> None:
    ref = Reference()
    t = table(ref, groups=2)
    routes = {(ip("10.0.0.0"), 8): value(1), (ip("10.0.1.0"), 25): value(2),
              (ip("10.0.2.0"), 25): value(3)}
    failed = load(t, routes)
    assert len(failed) == 1
    lost = list(routes)[failed[0]]
    assert t.lookup(lost[0]) == FIB_SLOT_VALUE
    kept = (ip("10.0.1.0"), 25) if lost != (ip("10.0.1.0"), 25) else (ip("10.0.2.0"), 25)
    assert t.lookup(kept[0]) == routes[kept]


def test_a_table_loads_only_once() -> None:
    t = table(Reference())
    load(t, {})
    with pytest.raises(RuntimeError):
        load(t, {})


def test_entry_constants_agree_with_the_header() -> None:
    assert EXT == 1 << 31 and INDEX == (1 << 24) - 1
    assert abi.FS_DIR_PINNED > 32 and abi.FS_DIR_PINNED <= abi.FS_DIR_DEPTH_MASK
    assert abi.ROUTE.size == 8


def test_a_table_that_cannot_be_learnt_aside_fails_where_it_is_next_used(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: Dir24Table) -> None:
        raise ValueError("unreadable table")

    monkeypatch.setattr(Dir24Table, "_referenced", broken)
    t = table(Reference(), adopt_aside=True)
    with pytest.raises(ValueError, match="unreadable table"):
        load(t, {(ip("10.0.0.0"), 8): value(1)})
