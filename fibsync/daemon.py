"""The daemon: netlink source -> RIB -> map writer, plus status, signals and sd_notify.

Start-up order matters for correctness:
1. check the interfaces exist (a typo must not touch anything);
2. load the XDP program and create or adopt the pinned maps;
3. subscribe, dump, build the RIB, write every map (ids above those a previous
   run left, so the old entries stay valid while the new ones go in);
4. sweep what the previous run left and the kernel no longer has;
5. only then attach XDP (on a cold start the fast path never sees a half-filled
   table), report ``synced`` and READY=1.
Stopping leaves the program attached and the maps pinned: traffic keeps flowing
while the daemon restarts (``fibsync detach`` removes everything).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import grp
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import __version__, config
from . import log as logging
from .config import Settings
from .errors import ConfigError, FibsyncError, InterfaceError
from .fastpath.maps import PinnedMaps
from .fastpath.misses import MissReader
from .fastpath.writer import MapWriter
from .model import Change, Snapshot
from .rib import Filter, Rib


def check_interfaces(names: tuple[str, ...]) -> list[int]:
    out = []
    for name in names:
        try:
            out.append(socket.if_nametoindex(name))
        except OSError:
            raise InterfaceError(
                f"interface {name!r} does not exist in this network namespace "
                f"(see `ip link`; run fibsync inside the router's namespace)") from None
    return out


class SdNotify:
    """Minimal sd_notify(3): one datagram per message to $NOTIFY_SOCKET."""

    def __init__(self) -> None:
        self.addr = os.environ.get("NOTIFY_SOCKET", "")
        if self.addr.startswith("@"):
            self.addr = "\0" + self.addr[1:]
        usec = os.environ.get("WATCHDOG_USEC", "")
        self.watchdog = int(usec) / 1e6 if usec.isdigit() else 0.0

    def send(self, message: str) -> None:
        if not self.addr:
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s, contextlib.suppress(OSError):
            s.sendto(message.encode(), self.addr)


class Daemon:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.log = logging.get().bind(instance=settings.instance)
        self.state = "starting"
        self.started = time.time()
        self.synced_at = 0.0
        self.notify = SdNotify()
        self.attachments: dict[str, Any] = {}
        self.fastpath: Any = None
        self.maps: PinnedMaps | None = None
        self.rib: Rib | None = None
        self.writer: MapWriter | None = None
        self.misses: MissReader | None = None
        self.source: Any = None
        self.resolver: Any = None
        self.last_change = 0.0
        self.last_write = 0.0
        self._stop = asyncio.Event()
        self._reload = False

    # ----------------------------------------------------------- lifecycle

    async def run(self) -> None:
        from .fastpath.program import FastPath
        from .netlink.resolver import NeighbourResolver
        from .netlink.source import NetlinkSource

        s = self.settings
        check_interfaces(s.interfaces)
        self.log.info("daemon.start", version=__version__, interfaces=list(s.interfaces))
        self.fastpath = FastPath.load(s.instance)
        self.maps = PinnedMaps(s.pin_dir)
        self.rib = Rib(Filter(s.table, frozenset(s.protocols) or None),
                       first_id=self.maps.max_nexthop_id() + 1)
        self.writer = MapWriter(self.maps, batch=s.map_batch)
        self.misses = MissReader(self.maps.fd("neigh_miss"))
        self.resolver = NeighbourResolver()
        self.source = NetlinkSource(rcvbuf=s.netlink_rcvbuf)

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._request_reload)

        server = await self._start_status_server()
        tasks = [asyncio.create_task(self.source.run(self), name="netlink")]
        tasks.append(asyncio.create_task(self._housekeeping(), name="housekeeping"))
        stop = asyncio.create_task(self._stop.wait())
        try:
            done, _ = await asyncio.wait([stop, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t is not stop and t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
        finally:
            self.notify.send("STOPPING=1")
            for t in [stop, *tasks]:
                t.cancel()
            await asyncio.gather(*tasks, stop, return_exceptions=True)
            server.close()
            with contextlib.suppress(OSError):
                s.status_socket.unlink()
            self.log.info("daemon.stop", note="XDP stays attached; `fibsync detach` removes it")

    # ---------------------------------------------------- netlink -> maps

    def resync(self, snapshot: Snapshot) -> None:
        assert self.rib is not None and self.writer is not None
        t0 = time.monotonic()
        self.rib.resync(snapshot)
        self._flush()
        if self.state != "synced":
            # what a previous run left in the pinned maps and the kernel no longer has
            swept = self.writer.sweep(self.rib)
            self._attach_all()
            self.state = "synced"
            self.synced_at = time.time()
            counts = self.rib.counts()
            self.log.info("sync.done", seconds=round(time.monotonic() - t0, 3), stale=swept,
                          **counts)
            self.notify.send(f"READY=1\nSTATUS=synced: {counts['routes_v4']} IPv4 and "
                             f"{counts['routes_v6']} IPv6 prefixes")

    def apply(self, changes: list[Change]) -> None:
        assert self.rib is not None
        self.last_change = time.time()
        self.rib.apply(changes)
        self._flush()

    def _flush(self) -> None:
        assert self.rib is not None and self.writer is not None
        diff = self.rib.take_diff()
        if diff:
            self.writer.write(diff)
            self.last_write = time.time()
        for ifindex, family, addr in diff.resolve:
            self.resolver.request(ifindex, family, addr)

    # ---------------------------------------------------------- interfaces

    def _attach_all(self) -> None:
        for name in self.settings.interfaces:
            self._attach(name)

    def _attach(self, name: str) -> None:
        att = self.fastpath.attach(name, mode=self.settings.xdp_mode,
                                   replace=self.settings.replace_xdp)
        self.attachments[name] = att
        self.log.info("xdp.attach", interface=name, mode=att.mode, prog_id=att.prog_id)

    def _request_reload(self) -> None:
        self._reload = True

    def _do_reload(self) -> None:
        self._reload = False
        try:
            new = config.build(self.settings.config_file or None, {
                "instance": self.settings.instance})
        except ConfigError as e:
            self.log.error("config.reload_failed", error=str(e))
            return
        if new.instance != self.settings.instance:
            self.log.error("config.reload_failed", error="instance cannot change on reload")
            return
        try:
            check_interfaces(new.interfaces)
        except InterfaceError as e:
            self.log.error("config.reload_failed", error=str(e))
            return
        old = set(self.settings.interfaces)
        self.settings = new
        for name in [n for n in new.interfaces if n not in old]:
            self._attach(name)
        for name in [n for n in old if n not in new.interfaces]:
            self.fastpath.detach(name)
            self.attachments.pop(name, None)
            self.log.info("xdp.detach", interface=name)
        self.log.info("config.reload", interfaces=list(new.interfaces))

    # ------------------------------------------------- housekeeping loop

    async def _housekeeping(self) -> None:
        interval = min(0.05, self.notify.watchdog / 2) if self.notify.watchdog else 0.05
        last_ping = 0.0
        while True:
            await asyncio.sleep(interval)
            if self._reload and self.state == "synced":
                self._do_reload()
            assert self.misses is not None
            for miss in set(self.misses.drain()):
                self.resolver.request(miss.ifindex, miss.family, miss.addr)
            now = time.monotonic()
            if self.notify.watchdog and now - last_ping >= self.notify.watchdog / 3:
                self.notify.send("WATCHDOG=1")
                last_ping = now

    # ------------------------------------------------------------ status

    async def _start_status_server(self) -> asyncio.AbstractServer:
        path = self.settings.status_socket
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        server = await asyncio.start_unix_server(self._serve_status, path=str(path))
        mode = 0o660 if self.settings.socket_group else 0o600
        if self.settings.socket_group:
            try:
                os.chown(path, -1, grp.getgrnam(self.settings.socket_group).gr_gid)
            except KeyError:
                self.log.error("status.group_missing", group=self.settings.socket_group)
        os.chmod(path, mode)
        return server

    async def _serve_status(self, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> None:
        from .status import dumps
        try:
            line = (await asyncio.wait_for(reader.readline(), 5)).decode().strip()
            doc = self.status() if line in ("", "status") else {"error": f"unknown {line!r}"}
            writer.write(dumps(doc).encode())
            await writer.drain()
        except (TimeoutError, OSError):
            pass
        except Exception:
            self.log.exception("status.failed")
        finally:
            writer.close()

    def status(self) -> dict[str, Any]:
        assert self.rib is not None and self.writer is not None and self.maps is not None
        src = self.source.stats
        doc: dict[str, Any] = {
            "instance": self.settings.instance,
            "daemon": "up",
            "pid": os.getpid(),
            "version": __version__,
            "state": self.state,
            "uptime_seconds": round(time.time() - self.started, 1),
            "synced_at": self.synced_at,
            "fastpath": self.rib.counts(),
            "netlink": _public(src),
            "writer": {**_public(self.writer.stats), "unwritten": len(self.writer.unwritten)},
            "rib": dict(self.rib.stats),
            "interfaces": [
                {"name": n, "ifindex": a.ifindex, "mode": a.mode, "prog_id": a.prog_id}
                for n, a in self.attachments.items()
            ],
            "counters": self.maps.counters(),
            "filter": {"table": self.settings.table, "protocols": list(self.settings.protocols)},
        }
        return doc


def _public(obj: Any) -> dict[str, Any]:
    if isinstance(obj, dict):
        return dict(obj)
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)  # type: ignore[arg-type]
    return {k: v for k, v in vars(obj).items() if not k.startswith("_")}


def main(settings: Settings, on_error: Callable[[FibsyncError], None]) -> int:
    import uvloop

    logging.configure(settings.log_level, settings.log_format)
    daemon = Daemon(settings)
    try:
        uvloop.run(daemon.run())
    except FibsyncError as e:
        on_error(e)
        return e.exit_code
    return 0


__all__ = ["Daemon", "check_interfaces", "main", "Path"]
