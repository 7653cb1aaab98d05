"""The daemon: wires netlink source -> sync sink (RIB -> guard -> writer), and lives.

The parts are elsewhere: the sink in sync.py, the full-map write policy in
fastpath/guard.py, attachments in fastpath/attach.py, the status socket in
status.py, sd_notify and the instance lock in process.py. Here are the order
they start in, the signals, the reload, the housekeeping loop (heartbeat,
interface checks, the ECMP sysctls) and the self-audit's wiring.

Start-up order matters for correctness:
1. take the instance lock and check the interfaces exist (a typo, or a second
   daemon for the same instance, must not touch anything);
2. load the XDP program and create or adopt the pinned maps (a map whose
   layout changed is replaced, never reused: program.py);
3. subscribe, dump, build the RIB, write every map (ids above those a previous
   run left, so the old entries stay valid while the new ones go in);
4. attach XDP (on a restart the new program replaces the old one atomically):
   beside the first write while the tables' promise is withheld (step 2's
   Heartbeat.hold: the program reads none of the tables being written, it
   forwards by bpf_fib_lookup alone), after it otherwise (stale_after = 0:
   the program trusts whatever tables it finds, so it must never see a
   half-filled one); then sweep what the previous run left and the kernel no
   longer has;
5. report ``synced`` and READY=1.
Stopping leaves the program attached and the maps pinned: traffic keeps flowing
while the daemon restarts (``fibsync detach`` removes everything).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import os
import signal
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from . import __version__, config
from . import log as logging
from .audit import Auditor
from .config import Settings
from .errors import (
    ConfigError,
    DaemonError,
    FibsyncError,
    InterfaceError,
    UsageError,
)
from .fastpath.attach import Attachments, check_interfaces
from .fastpath.guard import FullMapGuard
from .fastpath.maps import PinnedMaps
from .fastpath.writer import MapWriter
from .fidelity import Fidelity, kernel_links
from .model import Prefix
from .process import InstanceLock, SdNotify, fix_mmap_threshold, relax_gc, release_memory
from .rib import Filter, Rib
from .status import StatusServer
from .sync import Heartbeat, SyncSink
from .verify import InFlight
from .watch import paced

# how often the housekeeping loop checks that every configured interface runs our program
INTERFACE_CHECK_SECONDS = 2.0


class Daemon:
    def __init__(self, settings: Settings, overrides: dict[str, Any] | None = None) -> None:
        self.settings = settings
        # flags stay in force over every reload: a SIGHUP re-reads the file only
        self.overrides = dict(overrides or {})
        self.log = logging.get().bind(instance=settings.instance)
        self.state = "starting"
        self.started = time.time()
        self.synced_at = 0.0
        self.notify = SdNotify()
        self.lock = InstanceLock(settings)
        self.status_server = StatusServer(settings.status_socket, self.status, self._audit_now,
                                          self.log)
        self.fastpath: Any = None
        self.xdp: Attachments | None = None  # once the program is loaded
        self.maps: PinnedMaps | None = None
        self.rib: Rib | None = None
        self.writer: MapWriter | None = None
        self.guard: FullMapGuard | None = None
        self.sync: SyncSink | None = None
        self.heartbeat: Heartbeat | None = None
        self._beating: asyncio.Task[None] | None = None
        self.source: Any = None
        self.metrics: Any = None
        self.reloads = {"done": 0, "rejected": 0, "last_error": ""}
        self._stop = asyncio.Event()
        self._reload = False
        self._netlink_task: asyncio.Task[None] | None = None
        self._pending_sync: float | None = None
        self._attaching: concurrent.futures.Future[None] | None = None  # beside the first write
        self._opened: Any = None  # OpenMaps: the superseded maps, released once synced
        self._first_id = 1
        self._last_interface_check = 0.0
        self._interface_check_every = INTERFACE_CHECK_SECONDS
        self._hash_policy: tuple[int, ...] = ()
        self._reclaim: asyncio.Task[None] | None = None
        self.auditor: Auditor | None = None
        self.fidelity: Fidelity | None = None

    # ----------------------------------------------------------- lifecycle

    async def run(self) -> None:
        from .fastpath import abi
        from .fastpath.program import OpenMaps
        from .netlink.source import NetlinkSource

        s = self.settings
        self.lock.acquire()
        try:
            check_interfaces(s.interfaces)
            self.log.info("daemon.start", version=__version__, interfaces=list(s.interfaces),
                          config=s.config_file or None)
            self.notify.status("starting: compiling and loading the XDP program")
            t0 = time.monotonic()
            maps = self._opened = OpenMaps.open(s.instance, sizes=abi.Sizes(**s.map_sizes))
            self._first_id = maps.previous_max_id + 1
            # the program builds in a child process on one core while the kernel's
            # tables are dumped, mirrored and written to the maps on the other; only
            # attaching waits for it
            load = asyncio.get_running_loop().run_in_executor(None, maps.load_program)
            # the same maps, not a second open by path; copies of the fds, so that the
            # writer's stay valid whatever becomes of OpenMaps' (a failed build closes them)
            self.maps = PinnedMaps(s.pin_dir, fds={name: os.dup(fd)
                                                   for name, fd in maps.map_fds.items()})
            self.writer = MapWriter(self.maps, batch=s.map_batch,
                                    v4_table=s.v4_table,  # type: ignore[arg-type]
                                    v6_table=s.v6_table,  # type: ignore[arg-type]
                                    fresh=[n for n, o in maps.origin.items() if o != "adopted"])
            self.rib = Rib(self._filter(s), first_id=self._first_id)
            self.rib.set_multipath_use_neigh(_read_use_neigh())
            self.guard = FullMapGuard(self.rib, self.writer, self.log)
            sync = self.sync = SyncSink(self.rib, self.guard, self.notify, self._on_resync,
                                         self._on_resync_start, self._on_links)
            self.source = NetlinkSource(rcvbuf=s.netlink_rcvbuf, log=self.log)
            self.heartbeat = Heartbeat(self.maps, self.source, s.stale_after)
            # routes may have changed while no daemon ran: a previous run's tables are
            # trusted no longer, and this run's only once its first sync is written
            self.heartbeat.hold()
            self.auditor = Auditor(s.audit_interval, self._audit_args, self._audit_exclude,
                                   self._repair, lambda: sync.last_change, self.log,
                                   window=(self._open_audit_window, self._close_audit_window),
                                   clean=self._tables_audited)
            self._netlink_task = asyncio.create_task(self.source.run(sync), name="netlink")
            self.notify.status("syncing: dumping the kernel's tables")
            # what the kernel does beyond its routes (rules, sysctls, netfilter, IPsec,
            # qdiscs): known and in `ifaces` before the program is first attached
            maps_ = self.maps
            self.fidelity = Fidelity(lambda items: maps_.update("ifaces", items), self.log,
                                     s.netfilter, links=self._link_macs,
                                     hold=self._hold_egress)
            keys, values = self.maps.read_all("ifaces")
            size = abi.IFACE.size
            self.fidelity.adopt(zip([keys[i:i + 4] for i in range(0, len(keys), 4)],
                                    [values[i:i + size] for i in range(0, len(values), size)],
                                    strict=True))
            await self.fidelity.start()
            # the conditions are this run's now: the promise to watch them can start
            self.heartbeat.watch(time.monotonic())
            try:
                self.fastpath = await load
            except BaseException:
                self._netlink_task.cancel()
                await asyncio.gather(self._netlink_task, return_exceptions=True)
                await self.fidelity.stop()
                raise
            self.fastpath.hold_ports(self.fidelity.held or ())
            self.xdp = Attachments(self.fastpath, s, self.log)
            self._log_load(time.monotonic() - t0)
            if self._pending_sync is not None:
                self._finish_sync(self._pending_sync)
            await self._serve()
        finally:
            self.lock.release()

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._request_reload)

        await self.status_server.start(self.settings.socket_group)
        await self._start_metrics()
        housekeeping = asyncio.create_task(self._housekeeping(), name="housekeeping")
        assert self.auditor is not None
        audit = asyncio.create_task(self.auditor.run(), name="audit")
        stop = asyncio.create_task(self._stop.wait())
        try:
            while True:
                netlink = self._netlink_task
                done, _ = await asyncio.wait([stop, housekeeping, audit, netlink],
                                             return_when=asyncio.FIRST_COMPLETED)
                if stop in done:
                    break
                if done == {netlink} and netlink is not self._netlink_task:
                    continue  # a reload restarted the source: wait on the new task
                for t in done:
                    if not t.cancelled() and t.exception() is not None:
                        raise t.exception()  # type: ignore[misc]
                raise DaemonError(f"{next(iter(done)).get_name()} task ended unexpectedly")
        finally:
            self.state = "stopping"
            self.notify.send("STOPPING=1")
            tasks = [stop, housekeeping, audit, self._netlink_task,
                     *filter(None, [self._reclaim, self._beating])]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self.fidelity is not None:
                await self.fidelity.stop()
            self.status_server.close()
            if self.metrics is not None:
                await self.metrics.stop()
            self.log.info("daemon.stop", note="XDP stays attached; `fibsync detach` removes it")

    def _hold_egress(self, held: frozenset[int]) -> None:
        """Fidelity: interfaces with egress conditions are no redirect target (before the
        program is loaded, FastPath takes Fidelity.held when it is)."""
        if self.fastpath is not None:
            self.fastpath.hold_ports(held)

    def _log_load(self, seconds: float) -> None:
        fp = self.fastpath
        by_origin: dict[str, list[str]] = {}
        for name, origin in fp.map_origin.items():
            by_origin.setdefault(origin, []).append(name)
        self.log.info("fastpath.load", seconds=round(seconds, 2), prog_id=fp.prog_id,
                      cached=fp.cached,
                      **{k: sorted(v) for k, v in by_origin.items()})
        if by_origin.get("replaced"):
            self.log.warning("map.replace", maps=sorted(by_origin["replaced"]),
                             note="the pinned map's layout or size differs from this build: "
                                  "a new map is filled before the program is swapped")
        if fp.mounted_bpffs:
            self.log.info("bpffs.mount", path="/sys/fs/bpf")

    @staticmethod
    def _filter(s: Settings) -> Filter:
        return Filter(s.table, frozenset(s.protocols) or None)

    # ---------------------------------------------------- netlink -> maps

    def _on_resync_start(self) -> None:
        """Attach the program beside the first write when that is safe. At a full table
        the write takes seconds, and attaching ~0.1 s an interface (under RTNL; more
        where a driver rebuilds its rings for XDP). While the tables' promise is
        withheld the program reads none of the tables and forwards by bpf_fib_lookup
        alone, so the attach need not wait for them; its syscalls release the GIL, so
        a thread runs it beside the write's. Without a promise to withhold
        (stale_after = 0) it waits for the write: the program trusts what it finds."""
        if self.state == "synced" or self.xdp is None or self._attaching is not None:
            return
        if self.heartbeat is None or not self.heartbeat.withheld:
            return
        pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="attach")
        self._attaching = pool.submit(self.xdp.attach_all)
        pool.shutdown(wait=False)  # the thread ends with its one task

    def _attach_all(self) -> None:
        assert self.xdp is not None
        attaching, self._attaching = self._attaching, None
        if attaching is None:
            self.xdp.attach_all()
        else:
            attaching.result()  # its failure is the daemon's, as in the loop

    def _link_macs(self) -> Mapping[int, bytes]:
        """The interfaces' Ethernet addresses, for `ifaces`: as the RIB follows them
        (RTM_NEWLINK) once its first sync is in, else asked of the kernel. Not asked
        at every write: the interface list is a link dump, under the RTNL lock, which a
        routing storm holds for tenths of a second at each nexthop replace, and the
        watchers' changes come often in such a storm (the event loop waited)."""
        if self.rib is None or not self.rib.stats["resyncs"]:
            return kernel_links()
        return self.rib.link_macs()

    def _on_links(self) -> None:
        """The RIB's links changed: `ifaces` follows (a new interface gets its entry,
        a changed MAC is compared from the next packet on)."""
        if self.fidelity is not None:
            self.fidelity.changed()

    def _on_resync(self, t0: float) -> None:
        if self.fastpath is None:
            # the program is still being built: the maps are filled, attach it once loaded
            self._pending_sync = t0
            return
        self._finish_sync(t0)

    def _finish_sync(self, t0: float) -> None:
        assert self.rib is not None and self.writer is not None and self.guard is not None
        assert self.xdp is not None
        self._pending_sync = None
        if self.state != "synced":
            self._attach_all()
            # what a previous run left in the pinned maps and the kernel no longer has; the
            # new program runs already, so the old one never meets a half-swept table
            swept = self.writer.sweep(self.rib.holds_prefix, *self.rib.fast_path_keys())
            self.guard.retry()
            self.xdp.prune_tx_ports()
            self.state = "synced"
            self.synced_at = time.time()
            counts = self.rib.counts()
            self.log.info("sync.done", seconds=round(time.monotonic() - t0, 3), stale=swept,
                          **counts)
            self.notify.send("READY=1")
            if self._opened is not None:
                # the previous run's route tables: the kernel frees them now, not
                # beside the first write (~1.25M entries of a full table)
                self._opened.release_superseded()
        self._update_status_line()
        self.notify.ping(force=True)
        assert self.auditor is not None and self.heartbeat is not None
        # a resync's dump taken while the kernel changed may have skipped live routes
        # (verify.py says how): prove it at once, and again soon while it cannot judge
        # everything, and promise its tables only then; one that met no change is
        # audited too, once the kernel is quiet
        if not self.sync.resync_quiet and self.auditor.interval:
            self.heartbeat.await_audit()
            self.log.info("heartbeat.awaiting_audit",
                          note="the dump met changes and may have skipped live routes: XDP "
                               "forwards by bpf_fib_lookup alone until the audit finds none")
        self.auditor.request(urgent=not self.sync.resync_quiet)
        # once the source has let go of the snapshot (before it next waits)
        asyncio.get_running_loop().call_soon(release_memory)

    # -------------------------------------------------------------- reload

    def _request_reload(self) -> None:
        self._reload = True

    def _do_reload(self) -> None:
        self._reload = False
        old = self.settings
        try:
            new = config.build(old.config_file or None, self.overrides)
            if not new.interfaces:
                raise UsageError("interfaces: the new configuration names no interface")
            check_interfaces(new.interfaces)
        except (ConfigError, UsageError, InterfaceError) as e:
            self.reloads["rejected"] += 1
            self.reloads["last_error"] = str(e)
            self.log.error("config.reject", error=str(e), note="the running configuration stays")
            return
        ignored = old.restart_only_changes(new)
        if ignored:
            self.log.warning("config.restart_needed", keys=ignored,
                             note="these take effect when the daemon restarts")
            new = dataclasses.replace(new, **{k.field: getattr(old, k.field)
                                              for k in config.KEYS if k.toml in ignored})
        self.settings = new
        logging.set_level(new.log_level)
        assert self.writer is not None and self.rib is not None
        self.writer.batch = new.map_batch
        self.source.rcvbuf = new.netlink_rcvbuf
        assert self.heartbeat is not None
        self.heartbeat.stale_after = new.stale_after
        if self.auditor is not None and new.audit_interval != old.audit_interval:
            self.auditor.set_interval(new.audit_interval)
            if not new.audit_interval:
                self.heartbeat.unaudited_since = None  # no audit will come
        assert self.fidelity is not None
        self.fidelity.set_netfilter(new.netfilter)
        if new.socket_group != old.socket_group:
            self.status_server.set_group(new.socket_group)
        assert self.xdp is not None
        added, removed = self.xdp.reload(new)
        resync = self._filter(new) != self.rib.filter
        if resync:
            self.rib.filter = self._filter(new)
            self._restart_netlink()
        self.reloads["done"] += 1
        self.log.info("config.reload", interfaces=list(new.interfaces), added=added,
                      removed=removed, table=new.table, protocols=list(new.protocols),
                      resync=resync)
        if new.metrics_listen != old.metrics_listen:
            asyncio.get_running_loop().create_task(self._restart_metrics())
        self._update_status_line()

    def _restart_netlink(self) -> None:
        """A filter changed: dump again; the RIB's mark and sweep applies the difference."""
        assert self._netlink_task is not None
        self._netlink_task.cancel()
        self._netlink_task = asyncio.create_task(self.source.run(self.sync), name="netlink")

    # ------------------------------------------------------------ audit

    def _audit_args(self) -> dict[str, Any]:
        s = self.settings
        return {"pin_dir": str(s.pin_dir), "table": s.table, "protocols": list(s.protocols)}

    def _audit_exclude(self) -> set[Prefix]:
        """What the maps lack or hold differently on purpose: a full map's casualties."""
        assert self.writer is not None and self.guard is not None
        return self.writer.unwritten | self.guard.demoted

    def _open_audit_window(self) -> None:
        assert self.sync is not None
        self.sync.audit_window = InFlight()

    async def _close_audit_window(self) -> InFlight:
        """What this daemon applied since the window opened, its backlog included."""
        assert self.rib is not None and self.source is not None and self.sync is not None
        if not await self.source.caught_up():
            assert self.sync.audit_window is not None
            self.sync.audit_window.overrun = True  # a resync: anything may have changed
        window, self.sync.audit_window = self.sync.audit_window or InFlight(), None
        window.nhids = self.rib.objects_using(window.nhids)
        return window

    def _tables_audited(self, started: float) -> None:
        """An audit begun at ``started`` found no divergence (the Auditor's ``clean``)."""
        assert self.heartbeat is not None
        if self.heartbeat.audited(started):
            self.log.info("heartbeat.audited", note="the tables are promised at the next beat")

    def _repair(self, prefixes: list[Prefix]) -> None:
        """Dump again, and write these prefixes whatever the RIB believes the maps hold:
        the mark and sweep mends what the RIB got wrong, the rewrite what the maps did."""
        assert self.sync is not None
        self.sync.rewrite |= set(prefixes)
        self.log.info("resync.request", reason=f"audit: {len(prefixes)} divergences")
        self._restart_netlink()

    async def _audit_now(self) -> dict[str, Any]:
        """``audit`` on the status socket: a self-audit now, and its report."""
        if self.state != "synced":
            return {"error": "not synced yet"}
        assert self.auditor is not None
        return await self.auditor.audit_once() or {"error": "the audit could not run "
                                                           "(see the log: audit.error)"}

    # ------------------------------------------------- housekeeping loop

    async def _housekeeping(self) -> None:
        interval = min(0.05, self.notify.watchdog / 4) if self.notify.watchdog else 0.05
        while True:
            await asyncio.sleep(interval)
            self.notify.ping()
            assert self.heartbeat is not None
            # alive and following the kernel's conditions, synced or not (this loop
            # stalls with the watchers: then the program hands everything to the kernel)
            self.heartbeat.watch(time.monotonic())
            if self.state != "synced":
                continue
            if self._reload:
                self._do_reload()
            if self._reclaim is None and self.writer is not None \
                    and self.writer.dir24 is not None:
                reclaim = self.writer.dir24.begin_reclaim()
                if reclaim:
                    self._reclaim = asyncio.create_task(self._wait_grace(reclaim))
            now = time.monotonic()
            if self.heartbeat.withdraw():
                self.log.warning("heartbeat.withdrawn", reason="netlink out of sync",
                                 note="the program forwards by bpf_fib_lookup alone until "
                                      "the resync is written")
            if self.heartbeat.due(now) and (self._beating is None or self._beating.done()):
                self._beating = asyncio.create_task(self.heartbeat.beat(now), name="heartbeat")
            if now - self._last_interface_check >= self._interface_check_every:
                self._last_interface_check = now
                cpu_before = time.thread_time()
                assert self.xdp is not None
                self.xdp.check()
                self._sync_hash_policy()
                self._sync_use_neigh()
                assert self.fidelity is not None
                # `ifaces` follows the RIB's links as they change (_on_links); this
                # write, without a syscall, only makes sure of it
                self.fidelity.write()
                self._update_status_line()
                # the XDP check is a link dump: under the RTNL lock, on which a
                # routing storm makes it spin (watch.paced)
                self._interface_check_every = paced(INTERFACE_CHECK_SECONDS,
                                                    time.thread_time() - cpu_before)

    async def _wait_grace(self, reclaim: Any) -> None:
        """Wait for an RCU grace period in a thread, for the DIR-24-8 slots and groups
        retired since the last one, so that no route change has to wait for it."""
        from .fastpath import dir24

        try:
            await asyncio.get_running_loop().run_in_executor(None, dir24.rcu_grace)
            reclaim.done()
        finally:
            self._reclaim = None

    def _sync_hash_policy(self) -> None:
        """ECMP follows the kernel's multipath hash policy; no netlink event announces a
        sysctl change, so it is read again on every interface check."""
        assert self.maps is not None
        policy = tuple(_read_sysctl(f"net/{fam}/fib_multipath_hash_policy")
                       for fam in ("ipv4", "ipv6"))
        if policy != self._hash_policy:
            self.maps.set_hash_policy(*policy)
            self._hash_policy = policy
            self.log.info("ecmp.hash_policy", ipv4=policy[0], ipv6=policy[1])

    def _sync_use_neigh(self) -> None:
        """Under fib_multipath_use_neigh the kernel's ECMP skips a path whose neighbour
        failed, and the fast path must then leave such a route's choice to the kernel
        (Rib.set_multipath_use_neigh); no netlink event announces the sysctl either."""
        assert self.rib is not None and self.sync is not None
        use_neigh = _read_use_neigh()
        if self.rib.set_multipath_use_neigh(use_neigh):
            self.log.info("ecmp.use_neigh", ipv4=int(use_neigh))
            self.sync.flush()

    def _update_status_line(self) -> None:
        if self.state != "synced" or self.rib is None or self.xdp is None:
            return
        c = self.rib.counts()
        text = (f"synced: {c['routes_v4']} IPv4 and {c['routes_v6']} IPv6 prefixes, "
                f"{len(self.xdp.current)}/{len(self.settings.interfaces)} interfaces")
        problems = self.problems()
        self.notify.status(text + (f"; {problems[0]}" if problems else ""))

    # -------------------------------------------------------------- metrics

    async def _start_metrics(self) -> None:
        if not self.settings.metrics_listen:
            return
        from .metrics import MetricsServer

        metrics = MetricsServer(self.status, self.settings.metrics_listen, self.log)
        await metrics.start()
        self.metrics = metrics
        self.log.info("metrics.listen", address=self.settings.metrics_listen)

    async def _restart_metrics(self) -> None:
        if self.metrics is not None:
            await self.metrics.stop()
            self.metrics = None
        try:
            await self._start_metrics()
        except DaemonError as e:
            self.log.error("metrics.error", error=str(e))

    # ------------------------------------------------------------ status

    def problems(self) -> list[str]:
        """What an operator must look at, one line each (status, STATUS=, metrics)."""
        if self.rib is None or self.writer is None or self.xdp is None:
            return []
        out = []
        counts = self.rib.counts()
        for name, capacity in self.settings.map_sizes.items():
            if counts.get(name, 0) > capacity:
                out.append(f"{name} is full: {counts[name]} entries wanted, room for {capacity} "
                           f"(raise maps.{name} and restart)")
        if self.writer.unwritten:
            n = len(self.writer.unwritten)
            m = len(self.guard.demoted) if self.guard else 0
            out.append(f"{n} prefix{'es are' if n != 1 else ' is'} not in the fast path; "
                       f"{m} covering prefix{'es use' if m != 1 else ' uses'} "
                       f"bpf_fib_lookup instead")
        for name in self.xdp.missing():
            out.append(f"interface {name} runs no fibsync program (missing?)")
        return out

    def status(self) -> dict[str, Any]:
        assert self.rib is not None and self.writer is not None and self.maps is not None
        assert self.sync is not None and self.xdp is not None and self.heartbeat is not None
        counts = self.rib.counts()
        s = self.settings
        origins = self.fastpath.map_origin if self.fastpath is not None else {}
        return {
            "instance": s.instance,
            "daemon": "up",
            "pid": os.getpid(),
            "version": __version__,
            "state": self.state,
            "problems": self.problems(),
            "uptime_seconds": round(time.time() - self.started, 1),
            "synced_at": self.synced_at,
            "fastpath": counts,
            "maps": {name: {"entries": counts.get(name, 0), "capacity": cap,
                            "origin": origins.get(name, "")}
                     for name, cap in s.map_sizes.items()},
            "netlink": _public(self.source.stats),
            "sync": self.sync.lag.doc(),
            "writer": {**_public(self.writer.stats), "v4_table": self.writer.v4_table,
                       "v6_table": self.writer.v6_table,
                       "unwritten": len(self.writer.unwritten),
                       "demoted": len(self.guard.demoted) if self.guard else 0,
                       "full_episodes": self.guard.episodes if self.guard else 0,
                       **({"dir24": _public(self.writer.dir24.stats)}
                          if self.writer.dir24 is not None else {})},
            "rib": dict(self.rib.stats),
            "reloads": dict(self.reloads),
            "audit": self.auditor.doc() if self.auditor is not None else {},
            "heartbeat": self.heartbeat.doc(),
            "fidelity": self.fidelity.doc() if self.fidelity is not None else {},
            "interfaces": self.xdp.doc(),
            "counters": self.maps.counters(),
            "filter": {"table": s.table, "protocols": list(s.protocols)},
            "config": {"file": s.config_file, "metrics": s.metrics_listen,
                       "socket_group": s.socket_group, "xdp_mode": s.xdp_mode},
        }


def _read_sysctl(name: str) -> int:
    try:
        return int(Path("/proc/sys", name).read_text())
    except (OSError, ValueError):
        return 0


def _read_use_neigh() -> bool:
    # IPv4's sysctl; IPv6 has none (Rib.set_multipath_use_neigh says where it applies)
    return bool(_read_sysctl("net/ipv4/fib_multipath_use_neigh"))


def _public(obj: Any) -> dict[str, Any]:
    if isinstance(obj, dict):
        return dict(obj)
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)  # type: ignore[arg-type]
    return {k: v for k, v in vars(obj).items() if not k.startswith("_")}


def main(settings: Settings, overrides: dict[str, Any],
         on_error: Callable[[FibsyncError], None]) -> int:
    import uvloop

    logging.configure(settings.log_level, settings.log_format)
    fix_mmap_threshold()  # before the sync's first big array
    relax_gc()
    daemon = Daemon(settings, overrides)
    try:
        uvloop.run(daemon.run())
    except FibsyncError as e:
        on_error(e)
        return e.exit_code
    return 0


__all__ = ["Daemon", "main"]
