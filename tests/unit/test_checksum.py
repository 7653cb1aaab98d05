"""The TTL decrement's incremental IPv4 checksum update (RFC 1624 eqn. 3)
equals a full recomputation, in a Python mirror of fs_csum_replace2() over
100,000 random headers plus the boundary values. tests/bpf/test_checksum.py
runs the C program itself over headers made here.
"""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st


def full_checksum(header: bytes) -> int:
    """RFC 1071 over the header with its checksum field taken as zero."""
    words = struct.unpack("!10H", header[:10] + b"\0\0" + header[12:20])
    total: int = sum(words)
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def csum_replace2(check: int, old: int, new: int) -> int:
    """Mirror of fs_csum_replace2() in bpf/fibsync.c."""
    c = (~check & 0xFFFF) + (~old & 0xFFFF) + new
    c = (c & 0xFFFF) + (c >> 16)
    c = (c & 0xFFFF) + (c >> 16)
    return ~c & 0xFFFF


def decrement_ttl(header: bytes) -> bytes:
    """Mirror of fs_ipv4_decrement_ttl(): TTL and protocol form one word."""
    old_word = struct.unpack_from("!H", header, 8)[0]
    new_word = old_word - 0x0100
    check = struct.unpack_from("!H", header, 10)[0]
    out = bytearray(header)
    struct.pack_into("!HH", out, 8, new_word, csum_replace2(check, old_word, new_word))
    return bytes(out)


def with_checksum(header: bytes) -> bytes:
    out = bytearray(header)
    struct.pack_into("!H", out, 10, full_checksum(header))
    return bytes(out)


def random_header(rng: random.Random, ttl: int | None = None) -> bytes:
    raw = bytearray(rng.randbytes(20))
    raw[0] = 0x45
    raw[8] = ttl if ttl is not None else rng.randint(1, 255)
    return with_checksum(bytes(raw))


def header_with_checksum(rng: random.Random, target: int, ttl: int) -> bytes:
    """A random header whose correct checksum is ``target`` (found by
    varying the identification field)."""
    base = bytearray(random_header(rng, ttl))
    for ident in range(1 << 16):
        struct.pack_into("!H", base, 4, ident)
        if full_checksum(bytes(base)) == target:
            return with_checksum(bytes(base))
    raise AssertionError(f"no identification gives checksum {target:#06x}")


def test_incremental_update_equals_recomputation_100k() -> None:
    rng = random.Random(1624)
    for _ in range(100_000):
        header = random_header(rng)
        updated = decrement_ttl(header)
        assert struct.unpack_from("!H", updated, 10)[0] == full_checksum(updated), header.hex()


@pytest.mark.parametrize("target", [0x0000, 0x0001, 0x00FF, 0x0100, 0xFEFF, 0xFF00, 0xFFFE])
@pytest.mark.parametrize("ttl", [1, 2, 255])
def test_incremental_update_at_the_boundaries(target: int, ttl: int) -> None:
    header = header_with_checksum(random.Random(target * 256 + ttl), target, ttl)
    updated = decrement_ttl(header)
    assert struct.unpack_from("!H", updated, 10)[0] == full_checksum(updated)


@settings(max_examples=2000, deadline=None)
@given(st.binary(min_size=20, max_size=20), st.integers(min_value=1, max_value=255))
def test_incremental_update_property(raw: bytes, ttl: int) -> None:
    header = with_checksum(bytes([0x45]) + raw[1:8] + bytes([ttl]) + raw[9:])
    updated = decrement_ttl(header)
    assert struct.unpack_from("!H", updated, 10)[0] == full_checksum(updated)
