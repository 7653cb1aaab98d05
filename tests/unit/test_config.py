"""Settings: one table of keys, a flag for every key, one line naming the key for every error."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from fibsync import cli, config
from fibsync.config import KEYS, Settings
from fibsync.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
# flags of `fibsync run` that are not settings: the file cannot name itself
NOT_SETTINGS = {"--config"}


def run_flags() -> set[str]:
    import typer.main

    command = typer.main.get_command(cli.app).commands["run"]  # type: ignore[attr-defined]
    return {opt for p in command.params for opt in p.opts if opt.startswith("--")}


def test_every_setting_is_a_key_and_every_key_a_setting() -> None:
    names = {f.name for f in dataclasses.fields(Settings)} - {"config_file"}
    assert names == {k.field for k in KEYS}


def test_every_key_has_its_flag_and_every_flag_its_key() -> None:
    flags = run_flags()
    assert {k.flag for k in KEYS} <= flags
    assert flags - {k.flag for k in KEYS} - NOT_SETTINGS == set()


def test_the_operations_guide_has_a_row_for_every_key() -> None:
    text = (ROOT / "docs" / "operations.md").read_text()
    for key in KEYS:
        assert re.search(rf"^\| `{re.escape(key.toml)}` \| `{re.escape(key.flag)}", text, re.M), \
            f"docs/operations.md has no row for {key.toml}"


def test_the_example_config_is_valid_and_names_every_key() -> None:
    path = ROOT / "systemd" / "fibsync.toml"
    settings = config.validate(config.load_file(path))
    assert settings.interfaces
    text = path.read_text()
    for key in KEYS:
        section, _, name = key.toml.rpartition(".")
        assert re.search(rf"^#? ?{name} =", text, re.M), f"{key.toml} missing from the example"
        if section:
            assert f"[{section}]" in text


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "fibsync.toml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("text, key", [
    ('interfaces = "eth0"', "interfaces"),
    ("interfaces = [1]", "interfaces"),
    ('interfaces = ["eth0", "eth0"]', "interfaces"),
    ('interfaces = ["a/b"]', "interfaces"),
    ("table = 0", "table"),
    ("table = 255", "table"),
    ("table = 4294967296", "table"),
    ("table = -1", "table"),
    ('table = "local"', "table"),
    ("table = true", "table"),
    ("table = 1.5", "table"),
    ('protocols = ["bgpp"]', "protocols"),
    ("protocols = [300]", "protocols"),
    ("protocols = 186", "protocols"),
    ('xdp_mode = "turbo"', "xdp_mode"),
    ('replace_xdp = "yes"', "replace_xdp"),
    ('netlink_rcvbuf = "lots"', "netlink_rcvbuf"),
    ("netlink_rcvbuf = 1", "netlink_rcvbuf"),
    ('instance = "a.b"', "instance"),
    ("instance = 3", "instance"),
    ("bogus = 1", "bogus"),
    ("[maps]\nroute_v4 = 5", "maps.route_v4"),
    ('[maps]\nroutes_v4 = "big"', "maps.routes_v4"),
    ("[maps]\nroutes_v4 = 0", "maps.routes_v4"),
    ("[maps]\nnexthops = 100000000000", "maps.nexthops"),
    ("[maps]\nbatch = 0", "maps.batch"),
    ("maps = 3", "maps"),
    ('[status]\nsocket_group = "no-such-group-fibsync"', "status.socket_group"),
    ("[status]\nsocket_group = 0", "status.socket_group"),
    ('[metrics]\nlisten = "example.org:80"', "metrics.listen"),
    ('[metrics]\nlisten = "127.0.0.1:99999"', "metrics.listen"),
    ("[metrics]\nlisten = true", "metrics.listen"),
    ('[log]\nlevel = "loud"', "log.level"),
    ('[log]\nformat = "xml"', "log.format"),
    ('[log]\ncolour = "red"', "log.colour"),
    ("interfaces = [", "config"),
])
def test_a_bad_value_names_its_key(tmp_path: Path, text: str, key: str) -> None:
    path = write(tmp_path, 'interfaces = ["eth0"]\n' + text + "\n"
                 if not text.startswith("interfaces") else text + "\n")
    with pytest.raises(ConfigError) as err:
        config.build(path, {})
    assert str(err.value).startswith(key), str(err.value)
    assert "\n" not in str(err.value)


def test_errors_also_name_the_flag() -> None:
    with pytest.raises(ConfigError, match=r"^maps\.routes_v6 \(--max-routes-v6\): "):
        config.validate({"max_routes_v6": -5})


def test_flags_override_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'interfaces = ["eth0"]\ntable = 100\n[log]\nlevel = "debug"\n')
    s = config.build(path, {"table": "200", "interfaces": ["eth1"]})
    assert (s.table, s.interfaces, s.log_level) == (200, ("eth1",), "debug")
    assert s.config_file == path


def test_a_full_file(tmp_path: Path) -> None:
    path = write(tmp_path, """
instance = "edge1"
interfaces = ["eth0", "eth1"]
table = "default"
protocols = ["bgp", "static", 42]
xdp_mode = "generic"
replace_xdp = true
netlink_rcvbuf = "128MiB"
[maps]
batch = 1000
routes_v4 = 1000000
routes_v6 = 200000
nexthops = 1000
groups = 100
neighbours = 5000
[status]
socket_group = "root"
[metrics]
listen = "[::1]:9100"
[log]
level = "warning"
format = "json"
""")
    s = config.build(path, {})
    assert s == Settings(instance="edge1", interfaces=("eth0", "eth1"), table=253,
                         protocols=(4, 42, 186, 196), xdp_mode="generic", replace_xdp=True,
                         netlink_rcvbuf=128 << 20, map_batch=1000, max_routes_v4=1000000,
                         max_routes_v6=200000, max_nexthops=1000, max_groups=100,
                         max_neighbours=5000, socket_group="root", metrics_listen="[::1]:9100",
                         log_level="warning", log_format="json")
    assert s.map_sizes["routes_v4"] == 1000000
    assert str(s.status_socket) == "/run/fibsync/edge1.sock"


@pytest.mark.parametrize("given, expected", [
    ("9477", "127.0.0.1:9477"),
    (":9477", "127.0.0.1:9477"),
    ("localhost:9100", "127.0.0.1:9100"),
    ("0.0.0.0:9100", "0.0.0.0:9100"),
    ("[::1]:9100", "[::1]:9100"),
    ("", ""),
])
def test_metrics_listen_defaults_to_loopback(given: str, expected: str) -> None:
    assert config.validate({"metrics_listen": given}).metrics_listen == expected


def test_metrics_are_off_by_default() -> None:
    assert config.validate({}).metrics_listen == ""


def test_instance_for_read_only_commands(tmp_path: Path) -> None:
    path = write(tmp_path, 'instance = "edge2"\ninterfaces = ["x"]\n')
    assert config.instance_for(None, path).instance == "edge2"
    assert config.instance_for("other", path).instance == "other"
    assert config.instance_for(None, None).instance in ("default",
                                                        _default_file_instance())
    broken = write(tmp_path, "instance = [")
    with pytest.raises(ConfigError):
        config.instance_for(None, broken)


def _default_file_instance() -> str:
    try:
        return str(config.load_file(config.DEFAULT_CONFIG).get("instance", "default"))
    except ConfigError:
        return "default"


def test_restart_only_changes() -> None:
    old = config.validate({"interfaces": ["a"], "max_routes_v4": 10})
    new = config.validate({"interfaces": ["a", "b"], "max_routes_v4": 20, "table": 7,
                           "log_format": "json"})
    assert old.restart_only_changes(new) == ["maps.routes_v4", "log.format"]
    assert old.restart_only_changes(old) == []
