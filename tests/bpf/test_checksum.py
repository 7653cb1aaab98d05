"""The TTL decrement's incremental IPv4 checksum update in the C program
itself: a few hundred headers run through BPF_PROG_TEST_RUN come out as the
Python mirror (tests/unit/test_checksum.py) and a full recomputation say.
"""

from __future__ import annotations

import random
import struct

import pytest

from tests.bpf.harness import XDP_REDIRECT, Lab
from tests.unit.test_checksum import (
    decrement_ttl,
    full_checksum,
    header_with_checksum,
    random_header,
    with_checksum,
)


def _unicast(rng: random.Random) -> bytes:
    """An address the program treats as ordinary unicast (not 0/8, 127/8, 224/3)."""
    first = rng.choice([n for n in range(1, 224) if n != 127])
    return bytes([first]) + rng.randbytes(3)


@pytest.mark.privileged
def test_c_program_checksum_on_random_headers(lab: Lab) -> None:
    lab.tx_port(1)
    lab.nexthop(1, 1, "02:00:00:00:00:02", "02:00:00:00:00:03")
    lab.route("0.0.0.0/0", 1)
    rng = random.Random(1071)
    cases = [random_header(rng, rng.randint(2, 255)) for _ in range(300)]
    cases += [header_with_checksum(rng, t, ttl) for t in (0x0000, 0xFEFF, 0xFF00, 0xFFFE)
              for ttl in (2, 255)]
    payload = b"\0" * 8
    for header in cases:
        ip = bytearray(header)
        struct.pack_into("!H", ip, 2, 20 + len(payload))
        ip[6] &= 0x3F  # keep fragment bits within what the flags field allows
        ip[12:16], ip[16:20] = _unicast(rng), _unicast(rng)
        ip = bytearray(with_checksum(bytes(ip)))
        frame = bytes.fromhex("020000000001" "0200000000aa" "0800") + bytes(ip) + payload
        retval, out = lab.run(frame)
        assert retval == XDP_REDIRECT, ip.hex()
        got = out[14:34]
        assert got == decrement_ttl(bytes(ip)), ip.hex()
        assert struct.unpack_from("!H", got, 10)[0] == full_checksum(got), ip.hex()
