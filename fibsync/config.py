"""TOML file + command-line flags -> one frozen ``Settings``.

Every bad value raises ``ConfigError`` naming the key (``table: ...``), which
the CLI prints as one line and exit code 2. Flags override the file; the file
is optional unless named explicitly.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field, fields
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
LOG_FORMATS = ("auto", "console", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")
# bpffs refuses some characters in pin names
_INSTANCE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$")
_IFNAME_RE = re.compile(r"^[^\s/:]{1,15}$")


@dataclass(frozen=True)
class Settings:
    instance: str = "default"
    interfaces: tuple[str, ...] = ()
    table: int = 254
    protocols: tuple[int, ...] = ()
    xdp_mode: str = "auto"
    replace_xdp: bool = False
    netlink_rcvbuf: int = 64 << 20
    map_batch: int = 65536
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


# TOML layout: flat keys, plus [status], [metrics] and [log] tables
_SECTIONS = {
    "status": {"socket_group": "socket_group"},
    "metrics": {"listen": "metrics_listen"},
    "log": {"level": "log_level", "format": "log_format"},
}
_TOP = {f.name for f in fields(Settings)} - {"config_file", "socket_group", "metrics_listen",
                                             "log_level", "log_format"}


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
                raise ConfigError(key, "must be a table ([" + key + "])")
            for sub, subval in value.items():
                if sub not in _SECTIONS[key]:
                    known = ", ".join(sorted(_SECTIONS[key]))
                    raise ConfigError(f"{key}.{sub}", f"unknown key (known: {known})")
                out[_SECTIONS[key][sub]] = subval
        elif key in _TOP:
            out[key] = value
        else:
            known = ", ".join(sorted(_TOP | set(_SECTIONS)))
            raise ConfigError(key, f"unknown key (known: {known})")
    return out


def build(file: str | None, overrides: dict[str, Any]) -> Settings:
    """Merge the config file (if any) with flags and validate everything."""
    values: dict[str, Any] = {}
    if file:
        values.update(load_file(Path(file)))
    elif DEFAULT_CONFIG.exists():
        file = str(DEFAULT_CONFIG)
        values.update(load_file(DEFAULT_CONFIG))
    values.update({k: v for k, v in overrides.items() if v not in (None, (), [])})
    return validate(values, file or "")


def validate(values: dict[str, Any], config_file: str = "") -> Settings:
    v = dict(values)
    instance = _str(v, "instance", "default")
    if not _INSTANCE_RE.match(instance):
        raise ConfigError("instance", f"{instance!r}: use up to 32 letters, digits, '_' or '-', "
                          "starting with a letter or digit")
    interfaces = v.get("interfaces", ())
    if isinstance(interfaces, str) or not isinstance(interfaces, list | tuple):
        raise ConfigError("interfaces", "must be a list of interface names")
    for name in interfaces:
        if not isinstance(name, str) or not _IFNAME_RE.match(name):
            raise ConfigError("interfaces", f"{name!r} is not a valid interface name")
    if len(set(interfaces)) != len(interfaces):
        raise ConfigError("interfaces", "an interface is listed twice")
    return Settings(
        instance=instance,
        interfaces=tuple(interfaces),
        table=_table(v.get("table", 254)),
        protocols=tuple(sorted({n for p in _list(v, "protocols") for n in _protocol(p)})),
        xdp_mode=_choice(v, "xdp_mode", XDP_MODES, "auto"),
        replace_xdp=_bool(v, "replace_xdp", False),
        netlink_rcvbuf=_size(v, "netlink_rcvbuf", 64 << 20, 4096, 1 << 31),
        map_batch=_int(v, "map_batch", 65536, 1, 1 << 20),
        socket_group=_str(v, "socket_group", ""),
        metrics_listen=_listen(_str(v, "metrics_listen", "")),
        log_level=_choice(v, "log_level", LOG_LEVELS, "info"),
        log_format=_choice(v, "log_format", LOG_FORMATS, "auto"),
        config_file=config_file,
    )


def _str(v: dict[str, Any], key: str, default: str) -> str:
    value = v.get(key, default)
    if not isinstance(value, str):
        raise ConfigError(key, f"must be a string, not {type(value).__name__}")
    return value


def _bool(v: dict[str, Any], key: str, default: bool) -> bool:
    value = v.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(key, "must be true or false")
    return value


def _int(v: dict[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    value = v.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(key, f"must be a whole number, not {value!r}")
    if not lo <= value <= hi:
        raise ConfigError(key, f"{value} is out of range {lo}..{hi}")
    return value


_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMG]i?B?)?\s*$", re.IGNORECASE)


def _size(v: dict[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    value = v.get(key, default)
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if not m:
            raise ConfigError(key, f"{value!r} is not a size (e.g. 64MiB or 67108864)")
        unit = (m.group(2) or "").upper()[:1]
        value = int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[unit]
    return _int({key: value}, key, default, lo, hi)


def _choice(v: dict[str, Any], key: str, choices: tuple[str, ...], default: str) -> str:
    value = _str(v, key, default)
    if value not in choices:
        raise ConfigError(key, f"{value!r} is not one of {', '.join(choices)}")
    return value


def _list(v: dict[str, Any], key: str) -> list[Any]:
    value = v.get(key, [])
    if isinstance(value, str):
        return [s for s in value.split(",") if s]
    if not isinstance(value, list | tuple):
        raise ConfigError(key, "must be a list")
    return list(value)


def _table(value: Any) -> int:
    if isinstance(value, str):
        if value in TABLES:
            return TABLES[value]
        if not value.isdigit():
            raise ConfigError("table", f"{value!r} is not main, default or a number 1..4294967295")
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError("table", "must be main, default or a number")
    if value in (0, 255):
        raise ConfigError("table", f"{value} cannot be followed: "
                          f"{'0 is unspecified' if value == 0 else '255 is the local table'}")
    if not 1 <= value <= 0xFFFFFFFF:
        raise ConfigError("table", f"{value} is not a table id (1..4294967295)")
    return value


def _protocol(value: Any) -> tuple[int, ...]:
    if isinstance(value, str):
        name = value.strip().lower()
        if name in PROTOCOLS:
            return PROTOCOLS[name]
        if not name.isdigit():
            raise ConfigError("protocols", f"{value!r} is not a routing protocol name "
                              f"({', '.join(sorted(PROTOCOLS))}) or number")
        value = int(name)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 255:
        raise ConfigError("protocols", f"{value!r} is not a protocol number 0..255")
    return (value,)


def _listen(value: str) -> str:
    if not value:
        return ""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError("metrics.listen", f"{value!r} is not HOST:PORT (e.g. 127.0.0.1:9477)")
    return value
