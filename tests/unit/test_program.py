"""program.py without root: what it checks before it touches bpffs or the kernel."""

from __future__ import annotations

from pathlib import Path

import pytest

from fibsync.config import PIN_ROOT
from fibsync.errors import ConfigError
from fibsync.fastpath import program


def test_instance_names_are_checked() -> None:
    with pytest.raises(ConfigError, match="instance"):
        program.pin_dir("../etc")
    with pytest.raises(ConfigError):
        program.pin_dir("a.b")  # bpffs refuses dots
    with pytest.raises(ConfigError):
        program.pin_dir("lab\n")


def test_pins_live_where_the_design_says() -> None:
    """/sys/fs/bpf/fibsync/<instance>/, for the daemon (program.py) and the CLI (config.py)."""
    assert program.pin_dir("lab") == Path("/sys/fs/bpf/fibsync/lab")
    assert program.pin_dir("lab") == PIN_ROOT / "lab"
