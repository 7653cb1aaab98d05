"""The ``fibsync`` command: run, check, status, routes, lookup, verify, detach, lab.

Exit codes: 0 ok, 1 runtime failure, 2 usage or config error — always with one
line on stderr that names what is wrong and how to fix it, also for what was not
foreseen (the traceback goes to the log at debug level: ``fibsync --debug``).
"""

from __future__ import annotations

import inspect
import json
import os
import re
import sys
from typing import Annotated, Any

import typer

from . import config
from .errors import ConfigError, DaemonDown, DaemonError, DaemonSilent, FibsyncError, UsageError

# plain help (click's layout): rich's panels print typer's <str> and <bool> for every option
app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Mirror the kernel FIB into eBPF maps for an XDP fast path.",
)
lab_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                      help="A network-namespace lab with FRR (demo, tests).")
app.add_typer(lab_app, name="lab")
_debug = False  # --debug: log at debug level, tracebacks of unexpected errors included


def _version(value: bool) -> None:
    if value:
        from . import __version__

        print(f"fibsync {__version__}")
        raise typer.Exit()


@app.callback()
def _global(
    netns: Annotated[str | None, typer.Option(
        "--netns", help="Run in this network namespace (/run/netns/NAME); mounts stay the host's.",
        metavar="NAME")] = None,
    debug: Annotated[bool, typer.Option(
        "--debug", help="Log at debug level, with the traceback of an unexpected error.")
    ] = False,
    version: Annotated[bool, typer.Option(
        "--version", help="Print the version and exit.", callback=_version, is_eager=True)
    ] = False,
) -> None:
    from . import log
    from . import netns as ns

    global _debug
    if debug:
        _debug = True
        log.configure("debug")
    if netns:
        ns.enter(netns)
    else:
        ns.refuse_private_sysfs()


Instance = Annotated[str | None, typer.Option(
    "--instance", help="Daemon instance name (default: the config file's, else 'default').",
    metavar="NAME")]
ConfigFile = Annotated[str | None, typer.Option(
    "--config", "-c", help="TOML config file (default /etc/fibsync/fibsync.toml).",
    metavar="FILE")]
AsJson = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
AUDIT_TIMEOUT = 600  # seconds: two dumps and two reads of a full table, on a busy router


def fail(err: FibsyncError | str) -> None:
    from .log import priority_prefix

    print(f"{priority_prefix('error')}fibsync: error: {err}", file=sys.stderr)


def warn(text: str) -> None:
    from .log import priority_prefix

    print(f"{priority_prefix('warning')}fibsync: warning: {text}", file=sys.stderr)


@app.command()
def run(
    interface: Annotated[list[str] | None, typer.Option(
        "--interface", "-i", help="Attach XDP to IF (repeatable).", metavar="IF")] = None,
    instance: Annotated[str | None, typer.Option(
        "--instance", help="Instance name (pins, socket).")] = None,
    config_file: ConfigFile = None,
    table: Annotated[str | None, typer.Option(
        "--table", help="Kernel table to mirror: main, default or a number.")] = None,
    protocol: Annotated[list[str] | None, typer.Option(
        "--protocol", help="Only routes of this protocol (bgp, static, ...; repeatable).")] = None,
    xdp_mode: Annotated[str | None, typer.Option(
        "--xdp-mode", help="auto, native or generic.")] = None,
    replace_xdp: Annotated[bool | None, typer.Option(
        "--replace-xdp/--no-replace-xdp", help="Replace another XDP program on the interfaces.")
    ] = None,
    v4_table: Annotated[str | None, typer.Option(
        "--v4-table", help="IPv4 table the XDP program reads: dir24 or lpm.")] = None,
    v6_table: Annotated[str | None, typer.Option(
        "--v6-table", help="IPv6 table the XDP program reads: hash or lpm.")] = None,
    netlink_rcvbuf: Annotated[str | None, typer.Option(
        "--netlink-rcvbuf", help="Netlink receive buffer, e.g. 64MiB.")] = None,
    audit_interval: Annotated[str | None, typer.Option(
        "--audit-interval", help="Seconds between self-audits; 0 turns them off.",
        metavar="SECONDS")] = None,
    stale_after: Annotated[str | None, typer.Option(
        "--stale-after", help="Seconds without a heartbeat after which XDP hands "
        "every packet to the kernel; 0 never.", metavar="SECONDS")] = None,
    netfilter: Annotated[str | None, typer.Option(
        "--netfilter", help="respect (netfilter rules send their family to the kernel) "
        "or bypass.")] = None,
    map_batch: Annotated[int | None, typer.Option(
        "--map-batch", help="Entries per bpf(2) batch call.")] = None,
    max_routes_v4: Annotated[int | None, typer.Option(
        "--max-routes-v4", help="Capacity of the IPv4 prefix map.")] = None,
    max_routes_v6: Annotated[int | None, typer.Option(
        "--max-routes-v6", help="Capacity of the IPv6 prefix map.")] = None,
    max_nexthops: Annotated[int | None, typer.Option(
        "--max-nexthops", help="Capacity of the nexthop map.")] = None,
    max_groups: Annotated[int | None, typer.Option(
        "--max-groups", help="Capacity of the ECMP group map.")] = None,
    max_neighbours: Annotated[int | None, typer.Option(
        "--max-neighbours", help="Capacity of the neighbour map.")] = None,
    socket_group: Annotated[str | None, typer.Option(
        "--socket-group", help="Group allowed to use the status socket.")] = None,
    metrics_listen: Annotated[str | None, typer.Option(
        "--metrics", help="Serve Prometheus metrics on HOST:PORT (off by default).",
        metavar="HOST:PORT")] = None,
    log_level: Annotated[str | None, typer.Option(
        "--log-level", help="debug, info, warning or error.")] = None,
    log_format: Annotated[str | None, typer.Option(
        "--log-format", help="auto, console or json.")] = None,
) -> None:
    """Run the daemon in the foreground in this network namespace."""
    from . import daemon

    overrides: dict[str, Any] = {
        "instance": instance, "interfaces": interface, "table": table, "protocols": protocol,
        "xdp_mode": xdp_mode, "replace_xdp": replace_xdp, "v4_table": v4_table,
        "v6_table": v6_table,
        "netlink_rcvbuf": netlink_rcvbuf, "audit_interval": audit_interval,
        "stale_after": stale_after, "netfilter": netfilter,
        "map_batch": map_batch, "max_routes_v4": max_routes_v4, "max_routes_v6": max_routes_v6,
        "max_nexthops": max_nexthops, "max_groups": max_groups, "max_neighbours": max_neighbours,
        "socket_group": socket_group, "metrics_listen": metrics_listen,
        "log_level": log_level, "log_format": log_format,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    settings = _checked(config.build(config_file, overrides))
    raise typer.Exit(daemon.main(settings, overrides, fail))


def _checked(settings: config.Settings) -> config.Settings:
    import dataclasses

    from .fastpath.attach import check_interfaces

    if not settings.interfaces and not settings.config_file:
        raise UsageError(f"config: {config.DEFAULT_CONFIG} does not exist and no -i IF was "
                         "given: nothing to attach to (give --config FILE, or -i IF, repeatable)")
    if not settings.interfaces:
        raise UsageError("interfaces: no interface to attach to: give -i IF (repeatable) "
                         "or `interfaces = [...]` in the config file")
    check_interfaces(settings.interfaces)
    if settings.metrics_listen:
        try:
            import prometheus_client  # noqa: F401
        except ImportError:
            raise ConfigError("metrics.listen (--metrics)", "needs the prometheus_client "
                              "package (pip install prometheus-client)") from None
    if _debug:
        settings = dataclasses.replace(settings, log_level="debug")
    return settings


# run's parameters that are not named after the Settings field they set
_FIELD_OF_PARAM = {"interface": "interfaces", "protocol": "protocols"}


def _overrides(flags: dict[str, Any]) -> dict[str, Any]:
    """run's flags (parameter name -> value, None when not given) as Settings overrides."""
    return {_FIELD_OF_PARAM.get(k, k): v for k, v in flags.items()
            if k != "config_file" and v is not None}


def _with_run_flags(command: Any) -> Any:
    """Give ``command`` (which takes ``**flags``) every option of ``run`` before its own,
    so that a flag added to run is accepted by it too."""
    own = [p for p in inspect.signature(command, eval_str=True).parameters.values()
           if p.kind is not p.VAR_KEYWORD]
    flags = inspect.signature(run, eval_str=True).parameters.values()
    command.__signature__ = inspect.Signature([*flags, *own])
    return command


@app.command()
@_with_run_flags
def check(as_json: AsJson = False, **flags: Any) -> None:
    """Check the config and this host for `run`, changing nothing.

    Validates the config file and flags as `run` takes them, and probes what the daemon
    needs from this host (kernel, headers, bpf_fib_lookup, XDP drivers). Exit 0: `run`
    would start (warnings on stderr); 1: a probe failed; 2: a config error."""
    from . import preflight

    settings = _checked(config.build(flags.get("config_file"), _overrides(flags)))
    findings = preflight.run(settings)
    doc = {k.toml: (list(v) if isinstance(v := getattr(settings, k.field), tuple) else v)
           for k in config.KEYS}
    if as_json:
        print(json.dumps({"config_file": settings.config_file, "settings": doc,
                          "checks": [f.doc() for f in findings]}, indent=2))
    else:
        source = settings.config_file or \
            f"no config file ({config.DEFAULT_CONFIG} does not exist), flags only"
        print(f"fibsync: {source}: OK")
        for key, value in doc.items():
            print(f"  {key:<22} {json.dumps(value)}")
        print("this host:")
        for f in findings:
            print(f"  {f.severity:<8} {f.what:<16} {f.text}")
    for f in findings:
        if f.severity == "warning":
            warn(f"{f.what}: {f.text}")
    errors = [f for f in findings if f.severity == "error"]
    if errors:
        more = f" (and {len(errors) - 1} more above)" if len(errors) > 1 else ""
        fail(f"{errors[0].what}: {errors[0].text}{more}")
        raise typer.Exit(1)


@app.command()
def status(instance: Instance = None, config_file: ConfigFile = None,
           as_json: AsJson = False) -> None:
    """Show the daemon's state, or what the pinned maps hold when it is down."""
    from . import status as st

    settings = config.instance_for(instance, config_file)
    try:
        doc = st.query(settings.status_socket)
    except DaemonDown:
        # the pinned maps, read here (numpy and the map layouts: only for this)
        from .fastpath.maps import offline_status

        doc = offline_status(settings)
    print(st.dumps(doc) if as_json else st.render(doc))
    if doc.get("daemon") != "up":
        raise typer.Exit(1)


@app.command()
def routes(instance: Instance = None, config_file: ConfigFile = None,
           as_json: AsJson = False) -> None:
    """List the fast-path prefixes, read from the pinned maps themselves."""
    from .fastpath.maps import PinnedMaps, render_routes

    settings = config.instance_for(instance, config_file)
    entries = PinnedMaps(settings.pin_dir).routes()
    print(json.dumps(entries, indent=2) if as_json else render_routes(entries))


@app.command()
def lookup(address: str, instance: Instance = None, config_file: ConfigFile = None,
           as_json: AsJson = False) -> None:
    """Say which path a destination takes in the fast path, and why."""
    import ipaddress

    from .fastpath.maps import PinnedMaps, render_lookup

    try:
        ipaddress.ip_address(address)
    except ValueError:
        raise UsageError(f"{address!r} is not an IPv4 or IPv6 address") from None
    settings = config.instance_for(instance, config_file)
    result = PinnedMaps(settings.pin_dir).lookup(address)
    print(json.dumps(result, indent=2) if as_json else render_lookup(result))


@app.command()
def verify(instance: Instance = None, config_file: ConfigFile = None,
           as_json: AsJson = False) -> None:
    """Compare the pinned maps with a fresh kernel dump: exit 0 equal, 1 different."""
    from . import status as st
    from . import verify as vf
    from .rib import Filter

    settings = config.instance_for(instance, config_file)
    try:
        st.query(settings.status_socket)  # answering at all? (a stopped one is not)
        # it knows which changes it has not applied yet: it runs the comparison
        doc = st.query(settings.status_socket, "audit", timeout=AUDIT_TIMEOUT)
        if "error" in doc:
            raise DaemonError(f"the daemon could not verify: {doc['error']}")
    except (DaemonDown, DaemonSilent) as e:
        # nobody writes the maps (or nobody answers): compare them here, with the
        # config file's filter, and say so: a silent daemon may still be writing
        # changes it has read, and those show as differences
        silent = isinstance(e, DaemonSilent)
        print(f"fibsync: {e}: compared without the daemon"
              + ("; changes it has read and not yet written show as differences"
                 if silent else ""), file=sys.stderr)
        report = vf.run_pinned(settings.pin_dir, Filter(
            settings.table, frozenset(settings.protocols) or None))
        doc = {**report.doc(), "compared_by": "verify (daemon silent)" if silent
               else "verify (no daemon)"}
    else:
        doc["compared_by"] = "daemon"
    print(json.dumps(doc, indent=2) if as_json else vf.render(doc))
    if not doc["equal"]:
        raise typer.Exit(1)


@app.command()
def detach(instance: Instance = None, config_file: ConfigFile = None,
           force: Annotated[bool, typer.Option(
               "--force", help="Even while the daemon runs (it would keep running blind).")
           ] = False) -> None:
    """Detach the XDP program from every interface and remove the pinned maps."""
    from . import status as st
    from .fastpath.program import remove

    settings = config.instance_for(instance, config_file)
    try:
        doc = st.query(settings.status_socket)
    except DaemonDown:
        doc = {}
    if doc.get("daemon") == "up" and not force:
        raise DaemonError(f"the daemon of instance {settings.instance} runs (pid {doc.get('pid')})"
                          f": stop it first (systemctl stop fibsync), or use --force")
    prog_id = _pinned_prog_id(settings)
    removed = remove(settings.instance)
    names = ", ".join(a.ifname for a in removed) or "no interface"
    print(f"fibsync: instance {settings.instance}: detached from {names}; pins removed")
    if prog_id and _prog_alive(prog_id):
        print(f"fibsync: warning: program {prog_id} still runs elsewhere, probably on "
              f"interfaces of another network namespace: detach there with "
              f"`fibsync --netns NAME detach` or `ip link set dev IF xdp off`", file=sys.stderr)


def _pinned_prog_id(settings: config.Settings) -> int:
    from .errors import MapError
    from .fastpath import bpfsys

    try:
        fd = bpfsys.obj_get(str(settings.pin_dir / "prog"))
    except MapError:
        return 0
    try:
        return bpfsys.prog_info(fd).id
    finally:
        os.close(fd)


def _prog_alive(prog_id: int) -> bool:
    """Whether something (an attachment, a daemon) still holds the program."""
    import time

    from .errors import MapError
    from .fastpath import bpfsys

    # the kernel frees a program after an RCU grace period once its last user is gone
    for _ in range(20):
        try:
            os.close(bpfsys.prog_fd_by_id(prog_id))
        except MapError:
            return False
        time.sleep(0.05)
    return True


@lab_app.command("up")
def lab_up(name: Annotated[str, typer.Option("--name")] = "lab") -> None:
    """Build the lab (idempotent)."""
    from .lab import Lab

    lab = Lab(name)
    lab.up()
    print(f"lab {name} is up: namespaces {lab.h1}, {lab.r}, {lab.h2}; "
          f"router interfaces {' '.join(lab.router_interfaces)}")


@lab_app.command("down")
def lab_down(name: Annotated[str, typer.Option("--name")] = "lab") -> None:
    """Remove the lab, the fibsync running in it and its pins."""
    from .demo import down

    down(name)
    print(f"lab {name} removed")


@lab_app.command("demo")
def lab_demo(name: Annotated[str, typer.Option("--name")] = "lab") -> None:
    """Build the lab, run fibsync on its router and show XDP forwarding (`make demo`)."""
    from .demo import demo

    demo(name)


@lab_app.command("status")
def lab_status(name: Annotated[str, typer.Option("--name")] = "lab",
               as_json: AsJson = False) -> None:
    """Show whether the lab is up."""
    from .lab import Lab

    doc = Lab(name).status()
    if as_json:
        print(json.dumps(doc, indent=2, default=str))
    else:
        print(f"lab {name}: {'up' if doc.get('up') else 'down'}")
        for problem in doc.get("problems", []):
            print(f"  problem: {problem}")
    if not doc.get("up"):
        raise typer.Exit(1)


def _shown_default(key: config.Key) -> str:
    """A KEYS default as help shows it: '"main"' -> main, '"" (off)' -> off, '[]' -> none."""
    text = key.default
    if "(" in text:
        return text[text.index("(") + 1:text.rindex(")")]
    text = text.strip('"')
    return text if text not in ("", "[]") else "none"


_METAVARS = {"int": "N", "integer": "N", "float": "NUMBER", "str": "TEXT", "text": "TEXT",
             "list[str]": "TEXT"}


def _type_name(param: Any) -> str:
    """typer >= 0.2x describes a parameter's type itself (bare_type); older ones, click."""
    if hasattr(param, "bare_type"):
        return str(param.bare_type())
    return str(getattr(param.type, "name", ""))


def _plain_help(command: Any) -> None:
    """Help as an operator reads it: plain placeholders (N, TEXT) where typer would print
    <int> or <list[str]>, and the default of every setting's flag from config.KEYS."""
    defaults = {k.flag: _shown_default(k) for k in config.KEYS}
    for param in command.params:
        if getattr(param, "param_type_name", "") == "argument":
            # typer >= 0.2x prints the annotation beside the name (ADDRESS <str>)
            setattr(param, "display_type_rich", lambda ctx: None)  # noqa: B010
            param.metavar = param.metavar or param.name.upper()
        if getattr(param, "param_type_name", "") != "option":
            continue
        if not param.is_flag and param.metavar is None:
            param.metavar = _METAVARS.get(_type_name(param), "VALUE")
        flag = next((o for o in param.opts if o in defaults), None)
        if flag and not re.search(r"[(\[]default", param.help or ""):
            param.help = f"{param.help or ''}  [default: {defaults[flag]}]".strip()
    for sub in getattr(command, "commands", {}).values():
        _plain_help(sub)


def main() -> None:
    """Entry point: turn every failure into one line and an exit code."""
    from . import log

    log.configure("info")
    try:
        command = typer.main.get_command(app)
        _plain_help(command)
        rc = command.main(prog_name="fibsync", standalone_mode=False)
    except FibsyncError as e:
        fail(e)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        # the reader went away (`fibsync routes | head`): nothing left to say to it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
    except Exception as e:  # click's usage errors, raised because standalone_mode is off
        if type(e).__name__ == "NoArgsIsHelpError":  # a bare `fibsync`: its help, no error
            print(e.ctx.get_help())  # type: ignore[attr-defined]
            sys.exit(0)
        if hasattr(e, "format_message") and hasattr(e, "exit_code"):
            cmd = getattr(getattr(e, "ctx", None), "command_path", "fibsync")
            fail(f"{e.format_message()} (see `{cmd} --help`)")
            sys.exit(e.exit_code)
        if type(e).__name__ == "Abort":
            sys.exit(130)
        log.get().debug("cli.unexpected", exc_info=e)
        how = "its traceback is in the log above" if _debug else \
            "run it again with `fibsync --debug ...` for the traceback"
        fail(f"unexpected {type(e).__name__}: {e} (a bug in fibsync: {how}; please report it)")
        sys.exit(1)
    sys.exit(rc if isinstance(rc, int) else 0)
