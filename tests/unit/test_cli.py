"""Bad input to the command line: exit code 2 and one line naming what is wrong."""

from __future__ import annotations

import subprocess

import pytest

from fibsync.demo import fibsync_argv


def run_fibsync(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*fibsync_argv(), *args], capture_output=True, text=True, timeout=60)


def one_error_line(r: subprocess.CompletedProcess[str]) -> str:
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("fibsync: error: ")
    return lines[0]


@pytest.mark.parametrize("args, needle", [
    (["run", "-i", "nosuchif0"], "nosuchif0"),
    (["run", "-i", "lo", "--config", "/nonexistent/fibsync.toml"], "does not exist"),
    (["run", "-i", "lo", "--config", "/"], "directory"),
    (["run", "-i", "lo", "--bogus"], "--bogus"),
    (["run"], "interface"),
    (["run", "-i", "lo", "--table", "local"], "table"),
    (["run", "-i", "lo", "--xdp-mode", "turbo"], "xdp_mode"),
])
def test_run_refuses_bad_input_with_exit_2_and_one_line(args: list[str], needle: str) -> None:
    r = run_fibsync(*args)
    assert r.returncode == 2, r.stderr
    assert needle in one_error_line(r)


def test_bad_toml_names_the_key(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cfg = tmp_path / "fibsync.toml"
    cfg.write_text('interfaces = ["lo"]\ntable = "mian"\n')
    r = run_fibsync("run", "--config", str(cfg))
    assert r.returncode == 2
    assert "table" in one_error_line(r)
    cfg.write_text('interfaces = ["lo"]\nbogus_key = 1\n')
    r = run_fibsync("run", "--config", str(cfg))
    assert r.returncode == 2
    assert "bogus_key" in one_error_line(r)


def test_check_validates_without_touching_anything(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cfg = tmp_path / "fibsync.toml"
    cfg.write_text('interfaces = ["lo"]\ntable = 100\n[metrics]\nlisten = "9100"\n')
    r = run_fibsync("check", "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    assert f"{cfg}: OK" in r.stdout
    assert 'metrics.listen         "127.0.0.1:9100"' in r.stdout
    cfg.write_text('interfaces = ["lo", "nosuchif0"]\n')
    r = run_fibsync("check", "--config", str(cfg))
    assert r.returncode == 2
    assert "nosuchif0" in one_error_line(r)


@pytest.mark.parametrize("args, needle", [
    (["lookup", "not-an-address"], "not-an-address"),
    (["status", "--instance", "a.b"], "instance"),
    (["routes", "--config", "/nonexistent/fibsync.toml"], "does not exist"),
])
def test_read_only_commands_refuse_bad_input(args: list[str], needle: str) -> None:
    r = run_fibsync(*args)
    assert r.returncode == 2, r.stderr
    assert needle in one_error_line(r)


def test_logs_are_json_lines_when_stderr_is_not_a_terminal() -> None:
    import json
    import sys

    code = ("from fibsync import log; log.configure('info'); l = log.get().bind(instance='x'); "
            "l.debug('route.add', prefix='10.0.0.0/8'); l.info('resync.start', reason='start'); "
            "log.set_level('debug'); l.debug('route.add', prefix='10.0.0.0/8')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    lines = [json.loads(line) for line in r.stderr.splitlines()]
    assert [(e["event"], e["level"]) for e in lines] == [("resync.start", "info"),
                                                         ("route.add", "debug")]
    assert all(e["instance"] == "x" and "timestamp" in e for e in lines)


def test_one_daemon_per_instance(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import os

    from fibsync.config import validate
    from fibsync.daemon import InstanceLock
    from fibsync.errors import DaemonError

    locks = [InstanceLock(validate({"instance": "edge1"})) for _ in range(3)]
    for lock in locks:
        lock.path = tmp_path / "edge1.lock"
    locks[0].acquire()
    assert (tmp_path / "edge1.lock").read_text() == f"{os.getpid()}\n"
    with pytest.raises(DaemonError, match=rf"'edge1' already runs \(pid {os.getpid()}\)"):
        locks[1].acquire()
    locks[0].release()
    assert not (tmp_path / "edge1.lock").exists()
    locks[2].acquire()
    locks[2].release()
