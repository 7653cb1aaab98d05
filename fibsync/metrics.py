"""Prometheus metrics: ``GET /metrics`` on ``[metrics] listen`` (off by default).

The figures are the daemon's status document, turned into metric families at
scrape time by a custom collector: nothing is counted twice, and the metrics
always agree with ``fibsync status``. The server knows only a function that
returns that document, not the daemon. The HTTP server is a few lines on the
daemon's own event loop, not prometheus_client's thread, so a scrape never
reads the RIB while the loop changes it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.registry import Collector

from .config import split_listen
from .errors import DaemonError

NETLINK_COUNTERS = {
    "messages": "netlink messages received on the event socket",
    "overruns": "ENOBUFS on the event socket (the kernel dropped notifications)",
    "resyncs": "full dumps handed to the RIB (start, overruns, filter changes)",
    "undecodable": "netlink messages fibsync could not decode (skipped)",
    "dump_intr": "dumps the kernel flagged as interrupted",
}
WRITER_COUNTERS = {
    "entries": "map entries written or deleted",
    "batches": "bpf(2) batch calls",
    "errors": "failed map writes",
    "full": "map writes refused because a map was full",
}


AUDIT_COUNTERS = {
    "runs": "self-audits run (the maps against a fresh kernel dump)",
    "divergences": "prefixes a self-audit found different from the kernel (then repaired)",
    "failures": "self-audits that could not run",
}


Status = Callable[[], dict[str, Any]]  # the status document, as `fibsync status --json`


class FibsyncCollector(Collector):
    def __init__(self, status: Status) -> None:
        self.status = status

    def collect(self) -> Iterator[Any]:
        doc = self.status()
        info = InfoMetricFamily("fibsync", "fibsync daemon", labels=["instance", "version"])
        info.add_metric([doc["instance"], doc["version"]], {})
        yield info
        g = GaugeMetricFamily("fibsync_synced", "1 once the first full sync is done")
        g.add_metric([], 1 if doc["state"] == "synced" else 0)
        yield g
        g = GaugeMetricFamily("fibsync_problems", "lines under `problems` in fibsync status")
        g.add_metric([], len(doc["problems"]))
        yield g

        entries = GaugeMetricFamily("fibsync_map_entries", "entries the fast path needs",
                                    labels=["map"])
        capacity = GaugeMetricFamily("fibsync_map_capacity", "max_entries of the map",
                                     labels=["map"])
        for name, m in doc["maps"].items():
            entries.add_metric([name], m["entries"])
            capacity.add_metric([name], m["capacity"])
        yield entries
        yield capacity

        packets = CounterMetricFamily("fibsync_packets", "packets the XDP program handled, "
                                      "by reason", labels=["reason"])
        nbytes = CounterMetricFamily("fibsync_bytes", "bytes the XDP program handled, "
                                     "by reason", labels=["reason"])
        for reason, c in doc["counters"].items():
            packets.add_metric([reason], c["packets"])
            nbytes.add_metric([reason], c["bytes"])
        yield packets
        yield nbytes

        for key, text in NETLINK_COUNTERS.items():
            c = CounterMetricFamily(f"fibsync_netlink_{key}", text)
            c.add_metric([], doc["netlink"].get(key, 0))
            yield c
        g = GaugeMetricFamily("fibsync_resync_duration_seconds", "duration of the last resync")
        g.add_metric([], doc["netlink"].get("last_resync_seconds", 0.0))
        yield g

        for key, text in WRITER_COUNTERS.items():
            c = CounterMetricFamily(f"fibsync_map_writes_{key}", text)
            c.add_metric([], doc["writer"].get(key, 0))
            yield c
        g = GaugeMetricFamily("fibsync_unwritten_prefixes",
                              "prefixes a full map could not take")
        g.add_metric([], doc["writer"]["unwritten"])
        yield g
        g = GaugeMetricFamily("fibsync_demoted_prefixes", "prefixes sent to bpf_fib_lookup "
                              "because a more-specific one did not fit")
        g.add_metric([], doc["writer"]["demoted"])
        yield g

        lag = doc["sync"]
        h = HistogramMetricFamily("fibsync_sync_lag_seconds", "from reading a batch of kernel "
                                  "changes to the maps holding it")
        buckets = [(str(b), n) for b, n in lag["buckets"]]
        h.add_metric([], buckets + [("+Inf", lag["batches"])], lag["sum_seconds"])
        yield h
        c = CounterMetricFamily("fibsync_kernel_changes", "kernel changes applied")
        c.add_metric([], lag["changes"])
        yield c

        g = GaugeMetricFamily("fibsync_interface_attached", "1 where the XDP program runs",
                              labels=["interface", "mode"])
        for i in doc["interfaces"]:
            g.add_metric([i["name"], i["mode"]], 1)
        yield g
        audit = doc["audit"]
        for key, text in AUDIT_COUNTERS.items():
            c = CounterMetricFamily(f"fibsync_audit_{key}", text)
            c.add_metric([], audit[key])
            yield c
        g = GaugeMetricFamily("fibsync_fidelity_conditions", "kernel conditions the fast "
                              "path honours (docs/architecture.md, Fidelity)",
                              labels=["kind", "family", "interface"])
        for cond in doc.get("fidelity", {}).get("conditions", []):
            g.add_metric([cond["kind"], cond["family"], cond["interface"]], 1)
        yield g
        c = CounterMetricFamily("fibsync_reloads", "SIGHUP reloads", labels=["outcome"])
        c.add_metric(["done"], doc["reloads"]["done"])
        c.add_metric(["rejected"], doc["reloads"]["rejected"])
        yield c


class MetricsServer:
    """A minimal HTTP/1.0 server for ``GET /metrics`` on the event loop."""

    def __init__(self, status: Status, listen: str, log: Any) -> None:
        self.listen = listen
        self.host, self.port = split_listen(listen)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(FibsyncCollector(status))
        self.log = log
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(self._handle, self.host, self.port,
                                                      reuse_address=True)
        except OSError as e:
            raise DaemonError(f"metrics.listen: cannot listen on {self.listen}: "
                              f"{e.strerror}") from None

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            method, path, *_ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ") + ["", ""]
            if method not in ("GET", "HEAD"):
                status, ctype, body = "405 Method Not Allowed", "text/plain", b"GET only\n"
            elif path.split("?")[0] == "/metrics":
                status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, generate_latest(self.registry)
            elif path == "/":
                status, ctype, body = "200 OK", "text/plain", b"fibsync: metrics at /metrics\n"
            else:
                status, ctype, body = "404 Not Found", "text/plain", b"not found\n"
            writer.write(f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\n"
                         f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode())
            if method != "HEAD":
                writer.write(body)
            await writer.drain()
        except (TimeoutError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except Exception:
            self.log.exception("metrics.error")
        finally:
            writer.close()
