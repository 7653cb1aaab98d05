"""TOML file + command-line flags -> one frozen ``Settings``.

``KEYS`` is the one table of settings: TOML key, flag of ``fibsync run``,
Settings field and meaning. docs/operations.md shows the same table, and
tests/unit/test_config.py checks that every key has its flag and every flag
its key. Every bad value raises ``ConfigError`` naming the key and its flag
(``table (--table): ...``), which the CLI prints as one line and exit code 2.
Flags override the file; the file is optional unless named explicitly.
"""

from __future__ import annotations

import grp
import ipaddress
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

DEFAULT_CONFIG = Path("/etc/fibsync/fibsync.toml")
PIN_ROOT = Path("/sys/fs/bpf/fibsync")
RUN_DIR = Path("/run/fibsync")

# route protocol names: the kernel's (rt_protos) and FRR's (rt_protos.d/frr.conf). "static"
# means both the kernel's 4 (`ip route add ... proto static`) and FRR staticd's 196.
PROTOCOLS: dict[str, tuple[int, ...]] = {
    "redirect": (1,), "kernel": (2,), "boot": (3,), "static": (4, 196), "ra": (9,),
    "zebra": (11,), "bird": (12,), "dhcp": (16,), "babel": (42,), "openr": (99,),
    "bgp": (186,), "isis": (187,), "ospf": (188,), "rip": (189,), "ripng": (190,),
    "nhrp": (191,), "eigrp": (192,), "ldp": (193,), "sharp": (194,), "pbr": (195,),
    "openfabric": (197,),
}
TABLES = {"main": 254, "default": 253}
XDP_MODES = ("auto", "native", "generic")
V4_TABLES = ("dir24", "lpm")
V6_TABLES = ("hash", "lpm")
LOG_FORMATS = ("auto", "console", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")
NETFILTER_MODES = ("respect", "bypass")
METRICS_PORT = 9477
# bpffs refuses some characters in pin names (dots among them)
INSTANCE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,31}")
_IFNAME_RE = re.compile(r"^[^\s/:]{1,15}$")
# upper bounds that catch typos (an extra zero) before the kernel is asked for the memory
_MAX_ROUTES = 1 << 26
_MAX_OBJECTS = 1 << 22


@dataclass(frozen=True)
class Settings:
    instance: str = "default"
    interfaces: tuple[str, ...] = ()
    table: int = 254
    protocols: tuple[int, ...] = ()
    xdp_mode: str = "auto"
    replace_xdp: bool = False
    v4_table: str = "dir24"
    v6_table: str = "hash"
    netlink_rcvbuf: int = 64 << 20
    audit_interval: float = 300.0
    stale_after: float = 5.0
    netfilter: str = "respect"
    map_batch: int = 65536
    max_routes_v4: int = 2097152
    max_routes_v6: int = 524288
    max_nexthops: int = 65536
    max_groups: int = 16384
    max_neighbours: int = 65536
    socket_group: str = ""
    metrics_listen: str = ""
    log_level: str = "info"
    log_format: str = "auto"
    config_file: str = field(default="", compare=False)

    @property
    def pin_dir(self) -> Path:
        return PIN_ROOT / self.instance

    @property
    def status_socket(self) -> Path:
        return RUN_DIR / f"{self.instance}.sock"

    @property
    def lock_file(self) -> Path:
        return RUN_DIR / f"{self.instance}.lock"

    @property
    def map_sizes(self) -> dict[str, int]:
        """max_entries of the sized maps, by map name."""
        return {"routes_v4": self.max_routes_v4, "routes_v6": self.max_routes_v6,
                "nexthops": self.max_nexthops, "groups": self.max_groups,
                "neighbours": self.max_neighbours}

    def restart_only_changes(self, new: Settings) -> list[str]:
        """TOML keys whose new value a running daemon cannot take (a restart applies them)."""
        return [k.toml for k in KEYS
                if k.restart and getattr(self, k.field) != getattr(new, k.field)]


@dataclass(frozen=True)
class Key:
    toml: str  # as written in the file: "table", "maps.routes_v4"
    field: str  # the Settings field
    flag: str  # the flag of `fibsync run`
    default: str  # as the docs show it
    help: str
    restart: bool = False  # SIGHUP cannot apply it


KEYS: tuple[Key, ...] = (
    Key("instance", "instance", "--instance", '"default"',
        "names the pins (/sys/fs/bpf/fibsync/NAME/) and the socket (/run/fibsync/NAME.sock)",
        restart=True),
    Key("interfaces", "interfaces", "--interface", "[]",
        "interfaces the XDP program runs on and may redirect to (flag repeatable: -i IF)"),
    Key("table", "table", "--table", '"main"',
        "kernel routing table to mirror: main, default or a number"),
    Key("protocols", "protocols", "--protocol", "[] (all)",
        "only routes of these protocols (bgp, static, ospf, ... or numbers; flag repeatable)"),
    Key("xdp_mode", "xdp_mode", "--xdp-mode", '"auto"',
        "auto (native, else generic), native or generic"),
    Key("replace_xdp", "replace_xdp", "--replace-xdp", "false",
        "replace an XDP program that is not fibsync's on the interfaces"),
    Key("v4_table", "v4_table", "--v4-table", '"dir24"',
        "the IPv4 table the XDP program reads: dir24 (DIR-24-8: one read up to /24, two "
        "beyond) or lpm (the LPM trie)", restart=True),
    Key("v6_table", "v6_table", "--v6-table", '"hash"',
        "the IPv6 table the XDP program reads: hash (a hash per prefix length, probed "
        "longest first over the lengths in use) or lpm (the LPM trie)", restart=True),
    Key("netlink_rcvbuf", "netlink_rcvbuf", "--netlink-rcvbuf", '"64MiB"',
        "netlink receive buffer (a size: 64MiB, 1GiB, or bytes); applies at the next resync"),
    Key("audit_interval", "audit_interval", "--audit-interval", "300",
        "seconds between self-audits (the maps against a fresh kernel dump, also run after "
        "every resync); 0 turns the audit off"),
    Key("stale_after", "stale_after", "--stale-after", "5",
        "seconds without the daemon's heartbeat after which the XDP program hands every "
        "packet to the kernel (tables behind while the daemon runs: bpf_fib_lookup "
        "alone); 0: never"),
    Key("netfilter", "netfilter", "--netfilter", '"respect"',
        "respect: while a netfilter rule may act on a family's forwarded traffic, that "
        "family goes to the kernel; bypass: forward past netfilter (its rules then miss "
        "what the fast path forwards: docs/operations.md)"),
    Key("maps.batch", "map_batch", "--map-batch", "65536",
        "entries per bpf(2) batch call"),
    Key("maps.routes_v4", "max_routes_v4", "--max-routes-v4", "2097152",
        "capacity of routes_v4 (IPv4 prefixes)", restart=True),
    Key("maps.routes_v6", "max_routes_v6", "--max-routes-v6", "524288",
        "capacity of routes_v6 (IPv6 prefixes)", restart=True),
    Key("maps.nexthops", "max_nexthops", "--max-nexthops", "65536",
        "capacity of nexthops", restart=True),
    Key("maps.groups", "max_groups", "--max-groups", "16384",
        "capacity of groups (ECMP)", restart=True),
    Key("maps.neighbours", "max_neighbours", "--max-neighbours", "65536",
        "capacity of neighbours (hosts on connected subnets)", restart=True),
    Key("status.socket_group", "socket_group", "--socket-group", '""',
        "group allowed to use the status socket (mode 0660); empty: root only (0600)"),
    Key("metrics.listen", "metrics_listen", "--metrics", '"" (off)',
        "serve Prometheus metrics on HOST:PORT (PORT alone: 127.0.0.1:PORT)"),
    Key("log.level", "log_level", "--log-level", '"info"', "debug, info, warning or error"),
    Key("log.format", "log_format", "--log-format", '"auto"',
        "auto (console on a TTY, JSON otherwise), console or json", restart=True),
)
_BY_FIELD = {k.field: k for k in KEYS}
_BY_TOML = {k.toml: k for k in KEYS}
_SECTIONS = sorted({k.toml.split(".")[0] for k in KEYS if "." in k.toml})


def _err(name: str, message: str) -> ConfigError:
    """A ConfigError naming the key as the file spells it, and its flag."""
    key = _BY_FIELD.get(name)
    return ConfigError(f"{key.toml} ({key.flag})" if key else name, message)


def load_file(path: Path) -> dict[str, Any]:
    """Read a config file into Settings keyword arguments (still unvalidated)."""
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError("config", f"{path} does not exist") from None
    except PermissionError:
        raise ConfigError("config", f"{path} is not readable (permission denied)") from None
    except IsADirectoryError:
        raise ConfigError("config", f"{path} is a directory, not a TOML file") from None
    except UnicodeDecodeError:
        raise ConfigError("config", f"{path} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("config", f"{path} is not valid TOML: {e}") from None
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(key, f"must be a table ([{key}])")
            for sub, subval in value.items():
                name = f"{key}.{sub}"
                if name not in _BY_TOML:
                    known = ", ".join(k.toml.split(".")[1] for k in KEYS
                                      if k.toml.startswith(key + "."))
                    raise ConfigError(name, f"unknown key in [{key}] (known: {known})")
                out[_BY_TOML[name].field] = subval
        elif key in _BY_TOML:
            out[_BY_TOML[key].field] = value
        else:
            known = ", ".join([k.toml for k in KEYS if "." not in k.toml]
                              + [f"[{s}]" for s in _SECTIONS])
            raise ConfigError(key, f"unknown key (known: {known})")
    return out


def config_path(file: str | None) -> Path | None:
    """The file to read: the one named, else the default one if it exists."""
    if file:
        return Path(file)
    return DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None


def build(file: str | None, overrides: dict[str, Any]) -> Settings:
    """Merge the config file (if any) with flags and validate everything."""
    values: dict[str, Any] = {}
    path = config_path(file)
    if path is not None:
        values.update(load_file(path))
    values.update({k: v for k, v in overrides.items() if v not in (None, (), [])})
    return validate(values, str(path) if path else "")


def instance_for(flag: str | None, file: str | None = None) -> Settings:
    """Settings naming an instance for the commands that only read (status, routes, ...):
    the flag, else the config file's ``instance``, else ``default``. A config file that
    cannot be read does not stop them; only its instance key matters here."""
    if flag is None:
        try:
            path = config_path(file)
            flag = load_file(path).get("instance") if path else None
        except ConfigError:
            if file:
                raise
            flag = None
    return validate({"instance": flag if isinstance(flag, str) else "default"})


def validate(values: dict[str, Any], config_file: str = "") -> Settings:
    v = dict(values)
    instance = _str(v, "instance", "default")
    if not INSTANCE_RE.fullmatch(instance):
        raise _err("instance", f"{instance!r}: use up to 32 letters, digits, '_' or '-', "
                   "starting with a letter or digit")
    return Settings(
        instance=instance,
        interfaces=_interfaces(v.get("interfaces", ())),
        table=_table(v.get("table", 254)),
        protocols=tuple(sorted({n for p in _list(v, "protocols") for n in _protocol(p)})),
        xdp_mode=_choice(v, "xdp_mode", XDP_MODES, "auto"),
        replace_xdp=_bool(v, "replace_xdp", False),
        v4_table=_choice(v, "v4_table", V4_TABLES, "dir24"),
        v6_table=_choice(v, "v6_table", V6_TABLES, "hash"),
        netlink_rcvbuf=_size(v, "netlink_rcvbuf", 64 << 20, 4096, 1 << 31),
        audit_interval=_seconds(v, "audit_interval", 300.0),
        stale_after=_seconds(v, "stale_after", 5.0),
        netfilter=_choice(v, "netfilter", NETFILTER_MODES, "respect"),
        map_batch=_int(v, "map_batch", 65536, 1, 1 << 20),
        max_routes_v4=_int(v, "max_routes_v4", 2097152, 1, _MAX_ROUTES),
        max_routes_v6=_int(v, "max_routes_v6", 524288, 1, _MAX_ROUTES),
        max_nexthops=_int(v, "max_nexthops", 65536, 1, _MAX_OBJECTS),
        max_groups=_int(v, "max_groups", 16384, 1, _MAX_OBJECTS),
        max_neighbours=_int(v, "max_neighbours", 65536, 1, _MAX_OBJECTS),
        socket_group=_group(_str(v, "socket_group", "")),
        metrics_listen=_listen(v.get("metrics_listen", "")),
        log_level=_choice(v, "log_level", LOG_LEVELS, "info"),
        log_format=_choice(v, "log_format", LOG_FORMATS, "auto"),
        config_file=config_file,
    )


def _str(v: dict[str, Any], key: str, default: str) -> str:
    value = v.get(key, default)
    if not isinstance(value, str):
        raise _err(key, f"must be a string, not {_kind(value)}")
    return value


def _kind(value: Any) -> str:
    return {bool: "true/false", int: "a number", float: "a number", list: "a list",
            dict: "a table"}.get(type(value), type(value).__name__)


def _bool(v: dict[str, Any], key: str, default: bool) -> bool:
    value = v.get(key, default)
    if not isinstance(value, bool):
        raise _err(key, f"must be true or false, not {value!r}")
    return value


def _int(v: dict[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    value = v.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _err(key, f"must be a whole number, not {value!r}")
    if not lo <= value <= hi:
        raise _err(key, f"{value} is out of range {lo}..{hi}")
    return value


def _seconds(v: dict[str, Any], key: str, default: float) -> float:
    """A duration in seconds: a number, or a string of one (flags arrive as strings)."""
    value = v.get(key, default)
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise _err(key, f"{value!r} is not a number of seconds") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _err(key, f"must be a number of seconds, not {value!r}")
    if not 0 <= value <= 86400:
        raise _err(key, f"{value} is out of range 0..86400 seconds")
    return float(value)


_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMG]i?B?)?\s*$", re.IGNORECASE)


def _size(v: dict[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    value = v.get(key, default)
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if not m:
            raise _err(key, f"{value!r} is not a size (e.g. 64MiB or 67108864)")
        unit = (m.group(2) or "").upper()[:1]
        value = int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[unit]
    return _int({key: value}, key, default, lo, hi)


def _choice(v: dict[str, Any], key: str, choices: tuple[str, ...], default: str) -> str:
    value = _str(v, key, default)
    if value not in choices:
        raise _err(key, f"{value!r} is not one of {', '.join(choices)}")
    return value


def _list(v: dict[str, Any], key: str) -> list[Any]:
    value = v.get(key, [])
    if isinstance(value, str):
        return [s for s in value.split(",") if s]
    if not isinstance(value, list | tuple):
        raise _err(key, f"must be a list, not {_kind(value)}")
    return list(value)


def _interfaces(value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise _err("interfaces", f"must be a list of interface names, not {_kind(value)}")
    for name in value:
        if not isinstance(name, str) or not _IFNAME_RE.match(name):
            raise _err("interfaces", f"{name!r} is not a valid interface name")
    if len(set(value)) != len(value):
        twice = sorted({n for n in value if value.count(n) > 1})
        raise _err("interfaces", f"{', '.join(twice)} listed twice")
    return tuple(value)


def _table(value: Any) -> int:
    if isinstance(value, str):
        if value in TABLES:
            return TABLES[value]
        if not value.isdigit():
            raise _err("table", f"{value!r} is not main, default or a number 1..4294967295")
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _err("table", f"must be main, default or a table number, not {value!r}")
    if value in (0, 255):
        raise _err("table", f"{value} cannot be followed: "
                   f"{'0 is unspecified' if value == 0 else '255 is the local table'}")
    if not 1 <= value <= 0xFFFFFFFF:
        raise _err("table", f"{value} is not a table id (1..4294967295)")
    return value


def _protocol(value: Any) -> tuple[int, ...]:
    if isinstance(value, str):
        name = value.strip().lower()
        if name in PROTOCOLS:
            return PROTOCOLS[name]
        if not name.isdigit():
            raise _err("protocols", f"{value!r} is not a routing protocol name "
                       f"({', '.join(sorted(PROTOCOLS))}) or number")
        value = int(name)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 255:
        raise _err("protocols", f"{value!r} is not a protocol number 0..255")
    return (value,)


def _group(name: str) -> str:
    if name:
        try:
            grp.getgrnam(name)
        except KeyError:
            raise _err("socket_group", f"group {name!r} does not exist (see getent group)") \
                from None
    return name


def _listen(value: Any) -> str:
    """``HOST:PORT``, ``[V6]:PORT``, ``:PORT`` or ``PORT`` -> ``HOST:PORT`` (loopback default)."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise _err("metrics_listen", f"must be a string like \"127.0.0.1:{METRICS_PORT}\"")
    if not value:
        return ""
    host, sep, port = value.rpartition(":")
    if not sep:
        host, port = "", value
    host = host.strip("[]") or "127.0.0.1"
    if host == "localhost":
        host = "127.0.0.1"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is None or not port.isdigit() or not 0 < int(port) < 65536:
        raise _err("metrics_listen", f"{value!r} is not HOST:PORT with an IP address "
                   f"(e.g. 127.0.0.1:{METRICS_PORT} or [::1]:{METRICS_PORT})")
    return f"[{host}]:{port}" if ip.version == 6 else f"{host}:{port}"


def split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)
