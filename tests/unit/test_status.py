"""The status table, the status protocol and the metrics made from the same document."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import structlog
from prometheus_client import CollectorRegistry, generate_latest

from fibsync import status as st
from fibsync.errors import DaemonDown, DaemonError
from fibsync.metrics import FibsyncCollector
from fibsync.sync import SyncLag


def doc_up() -> dict[str, Any]:
    return {
        "instance": "edge1", "daemon": "up", "pid": 4242, "version": "0.1.0",
        "state": "synced", "uptime_seconds": 4000.0, "synced_at": 1.0,
        "problems": ["routes_v4 is full: 12 entries wanted, room for 10"],
        "fastpath": {"routes_v4": 12, "routes_v6": 3, "nexthops": 4, "groups": 1,
                     "neighbours": 5},
        "maps": {"routes_v4": {"entries": 12, "capacity": 10, "origin": "adopted"},
                 "routes_v6": {"entries": 3, "capacity": 100, "origin": "replaced"}},
        "netlink": {"messages": 10, "overruns": 2, "resyncs": 3, "last_resync_seconds": 0.25,
                    "undecodable": 0, "dump_intr": 1},
        "sync": {"last_seconds": 0.0004, "max_seconds": 0.02, "mean_seconds": 0.001,
                 "batches": 7, "changes": 30, "last_change_at": 2.0, "sum_seconds": 0.007,
                 "buckets": [[b, 7 if b >= 0.001 else 0] for b in SyncLag.BUCKETS]},
        "writer": {"entries": 100, "batches": 9, "errors": 1, "full": 1, "unwritten": 2,
                   "demoted": 1},
        "reloads": {"done": 1, "rejected": 1, "last_error": "table: bad"},
        "audit": {"interval": 300.0, "runs": 4, "divergences": 3, "repairs": 1, "failures": 0,
                  "last_result": "equal", "last_at": 0.0, "last_seconds": 0.5,
                  "last_checked": 15, "last_in_flight": 0, "pending": False},
        "heartbeat": {"stale_after": 5.0, "age_seconds": 0.4},
        "interfaces": [{"name": "eth0", "ifindex": 2, "mode": "native", "prog_id": 77}],
        "counters": {"FWD_FAST": {"packets": 123456, "bytes": 9999999, "description": "fast"},
                     "PASS_TTL": {"packets": 0, "bytes": 0, "description": "ttl"}},
    }


def test_render_up() -> None:
    text = st.render(doc_up())
    assert "heartbeat  400.0 ms ago, the tables are trusted for 5.0 s after one" in text
    assert "audit      every 5m00s, last equal (15 prefixes, 500.0 ms)  runs 4  divergences 3" \
        in text
    assert "daemon     up, pid 4242, version 0.1.0, running 1h06m" in text
    assert "state      synced" in text
    assert "problem    routes_v4 is full" in text
    assert "routes     v4 12  v6 3   nexthops 4  groups 1  neighbours 5" in text
    assert "routes_v4 12/10 (120%)" in text
    assert "adopted: routes_v4; replaced: routes_v6" in text
    assert "overruns 2  resyncs 3" in text
    assert "sync lag   last 0.4 ms  max 20.0 ms" in text
    assert "unwritten 2  demoted 1" in text
    assert "reloads    1 done, 1 rejected (last: table: bad)" in text
    assert "eth0" in text and "xdp native" in text
    assert "FWD_FAST" in text and "123.5k pkts" in text and "PASS_TTL" not in text


def test_render_down() -> None:
    doc = {"instance": "edge1", "daemon": "down", "state": "down",
           "fastpath": {"routes_v4": 5}, "maps": {"routes_v4": {"entries": 5, "capacity": 8}},
           "interfaces": [], "counters": {}, "note": "the daemon is down"}
    text = st.render(doc)
    assert "DOWN (figures read from the pinned maps)" in text
    assert "state      down" in text
    assert "routes_v4 5/8 (62%)" in text
    assert "(none attached)" in text
    assert "note       the daemon is down" in text


@pytest.mark.parametrize(("fresh", "watched", "says"), [
    (3.0, 3.5, "heartbeat  the tables are trusted 3.0 s more"),
    (-1.0, 2.0, "heartbeat  the tables are stale: XDP forwards by bpf_fib_lookup alone "
                "(FWD_STALE) for 2.0 s more"),
    (-8.0, -7.5, "heartbeat  none for 7.5 s: XDP hands every packet to the kernel "
                 "(PASS_NO_DAEMON)"),
    (None, -2.0, "heartbeat  none for 2.0 s: XDP hands every packet to the kernel"),
])
def test_render_down_says_what_the_program_makes_of_the_last_heartbeat(
        fresh: float | None, watched: float | None, says: str) -> None:
    doc = {"instance": "edge1", "daemon": "down", "state": "down", "interfaces": [],
           "counters": {}, "heartbeat": {"fresh_for_seconds": fresh,
                                         "watched_for_seconds": watched}}
    assert says in st.render(doc)


def test_query_talks_the_protocol(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"

    async def serve() -> None:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            assert (await r.readline()) == b"status\n"
            w.write(json.dumps({"daemon": "up"}).encode())
            await w.drain()
            w.close()

        server = await asyncio.start_unix_server(handle, path=str(path))
        async with server:
            doc = await asyncio.to_thread(st.query, path)
        assert doc == {"daemon": "up"}

    asyncio.run(serve())


def test_the_server_answers_status_audit_and_nothing_else(tmp_path: Path) -> None:
    path = tmp_path / "run" / "edge1.sock"
    audits = []

    async def audit() -> dict[str, Any]:
        audits.append(1)
        return {"result": "equal"}

    async def serve() -> None:
        server = st.StatusServer(path, lambda: {"daemon": "up"}, audit, structlog.get_logger())
        await server.start(group="")
        assert path.stat().st_mode & 0o777 == 0o600
        try:
            assert await asyncio.to_thread(st.query, path) == {"daemon": "up"}
            assert await asyncio.to_thread(st.query, path, "audit") == {"result": "equal"}
            assert await asyncio.to_thread(st.query, path, "flush") == {"error": "unknown 'flush'"}
        finally:
            server.close()
        assert not path.exists()

    asyncio.run(serve())
    assert audits == [1]


def test_query_says_down_or_denied(tmp_path: Path) -> None:
    with pytest.raises(DaemonDown):
        st.query(tmp_path / "nothing.sock")
    path = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()  # a socket file nobody listens on: what a crashed daemon leaves
    with pytest.raises(DaemonDown):
        st.query(path)
    if os.geteuid() != 0:
        path.chmod(0)
        with pytest.raises(DaemonError, match="permission denied"):
            st.query(path)


def scrape(doc: dict[str, Any]) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FibsyncCollector(lambda: doc))
    return generate_latest(registry).decode()


def test_metrics_come_from_the_status_document() -> None:
    lag = SyncLag()
    lag.observe(0.0003, 4)
    lag.observe(0.2, 10)
    doc = doc_up()
    doc["sync"] = lag.doc()
    text = scrape(doc)
    assert 'fibsync_info{instance="edge1",version="0.1.0"} 1.0' in text
    assert "fibsync_synced 1.0" in text
    assert 'fibsync_packets_total{reason="FWD_FAST"} 123456.0' in text
    assert 'fibsync_bytes_total{reason="FWD_FAST"} 9.999999e+06' in text
    assert 'fibsync_map_capacity{map="routes_v4"} 10.0' in text
    assert "fibsync_netlink_overruns_total 2.0" in text
    assert "fibsync_netlink_resyncs_total 3.0" in text
    assert "fibsync_unwritten_prefixes 2.0" in text
    assert 'fibsync_sync_lag_seconds_bucket{le="0.0005"} 1.0' in text
    assert 'fibsync_sync_lag_seconds_bucket{le="0.1"} 1.0' in text
    assert 'fibsync_sync_lag_seconds_bucket{le="0.25"} 2.0' in text
    assert 'fibsync_sync_lag_seconds_bucket{le="+Inf"} 2.0' in text
    assert "fibsync_sync_lag_seconds_sum 0.2003" in text
    assert "fibsync_kernel_changes_total 14.0" in text
    assert 'fibsync_interface_attached{interface="eth0",mode="native"} 1.0' in text
    assert 'fibsync_reloads_total{outcome="rejected"} 1.0' in text
    assert "fibsync_audit_divergences_total 3.0" in text
    assert "fibsync_audit_runs_total 4.0" in text


def test_metrics_before_the_first_sync() -> None:
    doc = doc_up()
    doc["state"] = "starting"
    assert "fibsync_synced 0.0" in scrape(doc)
