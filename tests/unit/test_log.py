"""Logs as journald and an operator see them: JSON lines, priorities, one format for all."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

PROGRAM = """
import logging, warnings
from fibsync import log
log.configure("info", "json")
l = log.get().bind(instance="x")
l.debug("route.add")
l.info("resync.start", reason="start")
l.warning("map.full", map="routes_v4")
try:
    1 / 0
except ZeroDivisionError:
    l.error("netlink.error", exc_info=True)
    logging.getLogger("asyncio").error("Task exception was never retrieved", exc_info=True)
logging.getLogger("asyncio").debug("too chatty")
logging.getLogger("pyroute2").warning("socket %s closed", 7)
warnings.warn("deprecated call")
"""


def run_logging(tmp_path: Path, journald: bool) -> list[str]:
    """PROGRAM's stderr, written to a file that is (or is not) named by $JOURNAL_STREAM."""
    err = tmp_path / "stderr"
    with open(err, "w") as f:
        st = os.fstat(f.fileno())
        env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
        if journald:
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        subprocess.run([sys.executable, "-c", PROGRAM], stderr=f, env=env, timeout=60,
                       check=True)
    return err.read_text().splitlines()


def test_every_line_is_one_json_object_stdlib_and_warnings_included(tmp_path: Path) -> None:
    lines = run_logging(tmp_path, journald=False)
    events = [json.loads(line) for line in lines]  # fails on any line that is not JSON
    assert [(e["event"], e["level"]) for e in events] == [
        ("resync.start", "info"), ("map.full", "warning"), ("netlink.error", "error"),
        ("Task exception was never retrieved", "error"), ("socket 7 closed", "warning"),
        (events[-1]["event"], "warning")]
    assert events[3]["logger"] == "asyncio" and "ZeroDivisionError" in events[3]["exception"]
    assert events[4]["logger"] == "pyroute2"
    assert events[5]["logger"] == "py.warnings" and "deprecated call" in events[5]["event"]
    assert all("timestamp" in e for e in events)


def test_under_journald_each_line_starts_with_its_syslog_priority(tmp_path: Path) -> None:
    lines = run_logging(tmp_path, journald=True)
    priorities = [line[:3] for line in lines]
    assert priorities == ["<6>", "<4>", "<3>", "<3>", "<4>", "<4>"], lines
    # what journald keeps after stripping the prefix is the same JSON
    assert json.loads(lines[2][3:])["event"] == "netlink.error"


def test_a_journal_stream_that_is_not_stderr_adds_no_prefix(tmp_path: Path) -> None:
    # $JOURNAL_STREAM inherited by a child whose stderr goes elsewhere (a file, a pipe)
    err = tmp_path / "stderr"
    with open(err, "w") as f:
        env = {**os.environ, "JOURNAL_STREAM": "1:2"}
        subprocess.run([sys.executable, "-c", PROGRAM], stderr=f, env=env, timeout=60,
                       check=True)
    assert all(line.startswith("{") for line in err.read_text().splitlines())
