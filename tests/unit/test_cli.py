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
    from fibsync.errors import DaemonError
    from fibsync.process import InstanceLock

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


def run_main(argv: list[str], setup: str = "", env: dict[str, str] | None = None
             ) -> subprocess.CompletedProcess[str]:
    """``fibsync ARGV`` after ``setup`` ran in the same interpreter (to fake a missing
    default config file, or a bug)."""
    import os
    import sys

    argv = ["fibsync", *argv]
    code = f"import sys\n{setup}\nfrom fibsync.cli import main\nsys.argv = {argv!r}\nmain()"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})})


def test_version_is_the_packages() -> None:
    from importlib.metadata import version

    import fibsync

    r = run_fibsync("--version")
    assert (r.returncode, r.stdout, r.stderr) == (0, f"fibsync {fibsync.__version__}\n", "")
    assert version("fibsync") == fibsync.__version__


def test_bare_fibsync_prints_help_and_no_error() -> None:
    r = run_fibsync()
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert r.stdout.startswith("Usage: fibsync [OPTIONS] COMMAND")
    assert "\n  check " in r.stdout and "\n  run " in r.stdout


def help_of(*command: str) -> str:
    r = run_fibsync(*command, "--help")
    assert r.returncode == 0, r.stderr
    return r.stdout


def option_entries(text: str) -> list[str]:
    """The options of a help text, one string each (continuation lines joined)."""
    import re

    entries: list[str] = []
    for line in text.splitlines():
        if re.match(r"^  (-\w, )?--", line):
            entries.append(line.strip())
        elif entries and line.startswith("    ") and line.strip():
            entries[-1] += " " + line.strip()
    return entries


COMMANDS = [[], ["run"], ["check"], ["status"], ["routes"], ["lookup"], ["detach"], ["lab"],
            ["lab", "up"], ["lab", "status"]]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "fibsync")
def test_help_shows_plain_placeholders(command: list[str]) -> None:
    import re

    text = help_of(*command)
    assert not re.search(r"<\w+(\[\w+\])?>", text), text  # typer's <str>, <list[str]>, <bool>


@pytest.mark.parametrize("command", ["run", "check"])
def test_help_shows_the_default_of_every_setting(command: str) -> None:
    from fibsync.config import KEYS

    lines = option_entries(help_of(command))
    shown = {"--interface": "none", "--table": "main", "--protocol": "all", "--xdp-mode": "auto",
             "--replace-xdp": "false", "--metrics": "off", "--socket-group": "none",
             "--max-routes-v4": "2097152", "--log-format": "auto", "--instance": "default"}
    for key in KEYS:
        line = next((ln for ln in lines if f"{key.flag} " in ln or f"{key.flag}/" in ln), None)
        assert line is not None, f"{key.flag} missing from `fibsync {command} --help`"
        assert "[default: " in line, line
        if key.flag in shown:
            assert f"[default: {shown[key.flag]}]" in line, line
    assert "--max-routes-v4 N " in "\n".join(lines)


def test_check_takes_every_flag_of_run() -> None:
    import re

    def options(text: str) -> set[str]:
        return {re.sub(r"^(-\w, )?", "", e).split()[0].split("/")[0]
                for e in option_entries(text)} - {"--help", "--json"}

    from fibsync.config import KEYS

    assert options(help_of("check")) == options(help_of("run"))
    assert {k.flag for k in KEYS} <= options(help_of("check"))
    r = run_fibsync("check", "-i", "lo", "--table", "100", "--xdp-mode", "generic",
                    "--max-routes-v4", "1000")
    assert r.returncode == 0, r.stderr
    assert '  table                  100' in r.stdout
    assert '  maps.routes_v4         1000' in r.stdout
    r = run_fibsync("check", "-i", "lo", "--max-routes-v4", "big")
    assert r.returncode == 2
    assert "--max-routes-v4" in one_error_line(r)


def test_every_flag_of_run_sets_a_setting() -> None:
    import inspect

    from fibsync import cli
    from fibsync.config import Settings

    fields = set(Settings.__dataclass_fields__)
    params = set(inspect.signature(cli.run).parameters) - {"config_file"}
    assert set(cli._overrides({p: 0 for p in params})) <= fields


def test_check_says_the_default_config_file_is_missing(tmp_path) -> None:  # type: ignore[no-untyped-def]
    absent = tmp_path / "fibsync.toml"
    setup = f"import pathlib, fibsync.config as c\nc.DEFAULT_CONFIG = pathlib.Path({str(absent)!r})"
    for command in (["check"], ["run"]):
        r = run_main(command, setup)
        assert r.returncode == 2, r.stderr
        line = one_error_line(r)
        assert f"{absent} does not exist" in line and "--config FILE" in line, line
    r = run_main(["check", "-i", "lo"], setup)
    assert r.returncode == 0, r.stderr
    assert f"no config file ({absent} does not exist), flags only: OK" in r.stdout


def test_check_probes_the_host(tmp_path) -> None:  # type: ignore[no-untyped-def]
    r = run_fibsync("check", "-i", "lo", "--json")
    assert r.returncode == 0, r.stderr
    import json

    doc = json.loads(r.stdout)
    checks = {c["what"]: c for c in doc["checks"]}
    assert {"kernel", "btf", "headers", "bpf_fib_lookup", "xdp lo"} <= set(checks)
    assert checks["xdp lo"]["severity"] == "warning"  # loopback: generic XDP only
    assert "fibsync: warning: xdp lo: " in r.stderr
    r = run_fibsync("check", "-i", "lo", "--xdp-mode", "native")
    assert r.returncode == 1
    assert "xdp_mode is native" in r.stderr.strip().splitlines()[-1]


def test_an_unexpected_error_is_one_line_and_its_traceback_is_logged() -> None:
    import json

    setup = ("import fibsync.preflight as p\n"
             "def boom(settings): raise RuntimeError('probe exploded')\n"
             "p.run = boom")
    r = run_main(["check", "-i", "lo"], setup)
    assert r.returncode == 1
    assert r.stderr.startswith("fibsync: error: unexpected RuntimeError: probe exploded")
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "--debug" in r.stderr

    r = run_main(["--debug", "check", "-i", "lo"], setup)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("fibsync: error: unexpected RuntimeError: probe exploded")
    logged = [json.loads(line) for line in lines[:-1] if line.startswith("{")]
    crash = [e for e in logged if e["event"] == "cli.unexpected"]
    assert crash and crash[0]["level"] == "debug"
    assert "Traceback" in crash[0]["exception"] and "probe exploded" in crash[0]["exception"]


def test_an_error_under_journald_carries_its_priority(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import os
    import sys

    err = tmp_path / "stderr"
    with open(err, "w") as f:
        st = os.fstat(f.fileno())
        subprocess.run([*fibsync_argv(), "check", "-i", "nosuchif0"], stderr=f, timeout=60,
                       env={**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    assert err.read_text().startswith("<3>fibsync: error: ")
    del sys


def test_status_of_a_running_daemon_asks_its_socket_without_loading_the_map_layouts() -> None:
    """`fibsync status` is run often, by hand and by scripts: against a running daemon it
    is one socket query; numpy and the map layouts are for the offline status only (the
    daemon down: the pinned maps read), and took half of its CPU (0.37 -> 0.19 s)."""
    setup = ("import atexit, fibsync.status as st\n"
             "st.query = lambda path: {'daemon': 'up', 'state': 'synced'}\n"
             "atexit.register(lambda: print('numpy loaded:', 'numpy' in sys.modules))")
    r = run_main(["status", "--json", "--instance", "edge1"], setup)
    assert r.returncode == 0, r.stderr
    assert '"state": "synced"' in r.stdout
    assert "numpy loaded: False" in r.stdout
