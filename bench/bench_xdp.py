"""Per-packet cost of the XDP program over a full table, side by side (BPF_PROG_TEST_RUN).

    .venv/bin/python bench/bench_xdp.py [--v4 1000000] [--v6 250000] [--samples 256]
        [--rounds 3] [--copies 1] [--only WORDS] [--each-check] [--json FILE] [--plot FILE.png]

One namespace holds the full table (nexthop objects, as FRR installs it).
fibsync's own pipeline (netlink dump -> RIB -> MapWriter) writes it into the
maps of one instance, which then holds every table complete (both IPv4
tables, both IPv6 tables); the program reads the ones ``fs_config.v4_table``
and ``v6_table`` select. Programs measured, each on the same frames:

- ``empty``: an XDP program that returns XDP_PASS (the cost of a test run itself);
- ``LPM trie`` / ``DIR-24-8`` / ``hash``: fibsync's program on the full maps,
  IPv4 routes read from the LPM trie or from the DIR-24-8 table, IPv6 routes
  from the LPM trie or from the hash per prefix length (reason FWD_FAST);
- ``DIR-24-8, choice fixed at build`` (IPv4): the same program built with the
  table choice compiled in, adopting the same maps: the cost of reading
  fs_config to choose;
- ``bpf_fib_lookup``: fibsync's program of a second instance with empty route
  maps (DIR-24-8 selected), so every packet is forwarded by its
  bpf_fib_lookup fallback over the kernel's FIB (reason FWD_FIB);
- ``bpf_fib_lookup forwarder``: a minimal forwarder in the style of the
  kernel's samples/bpf/xdp_fwd_kern.c (parse, bpf_fib_lookup, rewrite,
  redirect through a devmap, nothing else): what users would otherwise run.

- ``no fidelity checks`` (``--each-check``: without each one in turn): the
  program built without issue 12's checks, on the same maps: what they cost a hit.

``--copies N`` loads each of fibsync's programs N times and reports the median
over the copies: where the kernel puts a JIT image moves a figure by a few ns,
as much as what the fidelity checks cost.

Sources are hosts behind other routes of the table (transit traffic).
Destinations are a random sample of the installed prefixes; each frame runs
with ``repeat`` well below its TTL (test runs reuse the buffer), three times,
keeping the fastest, the programs taking turns frame by frame, each timed run
after an untimed one; the table shows the median over destinations. The map
writes are timed too: all routes with the DIR-24-8 table and the IPv6 hash,
and into a third instance with the LPM tries alone.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import ipaddress
import os
import platform
import random
import shutil
import socket
import statistics
import struct
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import report  # noqa: E402
from fulltable import install, v4_prefixes, v6_prefixes  # noqa: E402
from profile_sync import dump, rss_mb  # noqa: E402

from fibsync import fidelity, netns  # noqa: E402
from fibsync.fastpath import abi, bpfsys  # noqa: E402
from fibsync.fastpath.abi import CONFIG, U32  # noqa: E402
from fibsync.fastpath.maps import CLOCK_MONOTONIC_COARSE, PinnedMaps  # noqa: E402
from fibsync.fastpath.program import FastPath, bpf_source_dir, remove  # noqa: E402
from fibsync.fastpath.writer import MapWriter  # noqa: E402
from fibsync.lab import Netns  # noqa: E402
from fibsync.rib import Rib  # noqa: E402

REPEAT = 100
ROUNDS = 3
XDP_ACTIONS = {1: "DROP", 2: "PASS", 3: "TX", 4: "REDIRECT"}


INGRESS_MAC = "02:00:00:00:00:01"


def frame(dst: str, src: str) -> bytes:
    ip = ipaddress.ip_address(dst)
    eth = bytes.fromhex(INGRESS_MAC.replace(":", "")) + b"\x02\x00\x00\x00\x00\x02"
    payload = struct.pack("!HHHH", 1234, 5678, 8 + 18, 0) + bytes(18)
    if ip.version == 4:
        hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0, 255, 17, 0,
                          ipaddress.ip_address(src).packed, ip.packed)
        csum = sum(struct.unpack("!10H", hdr))
        csum = (csum & 0xFFFF) + (csum >> 16)
        csum = ~((csum & 0xFFFF) + (csum >> 16)) & 0xFFFF
        hdr = hdr[:10] + struct.pack("!H", csum) + hdr[12:]
        return eth + b"\x08\x00" + hdr + payload
    hdr = struct.pack("!IHBB16s16s", 6 << 28, len(payload), 17, 255,
                      ipaddress.ip_address(src).packed, ip.packed)
    return eth + b"\x86\xdd" + hdr + payload


def host_in(prefix: str, rng: random.Random) -> str:
    net = ipaddress.ip_network(prefix)
    return str(net.network_address + rng.randrange(min(net.num_addresses, 1 << 16)))


def set_tables(fp: FastPath, v4: int | None = None, v6: int | None = None) -> None:
    """fs_config's table choices (None: as it is)."""
    fd, key = fp.map_fd("config"), U32.pack(0)
    raw = bpfsys.lookup(fd, key)
    assert isinstance(raw, bytes)
    h4, h6, flags, v4_table, v6_table = CONFIG.unpack(raw)
    bpfsys.update(fd, key, CONFIG.pack(h4, h6, flags, v4_table if v4 is None else v4,
                                       v6_table if v6 is None else v6))


def measure(programs: dict[str, tuple[int, Any]], frames: list[bytes],
            ingress: int, rounds: int = ROUNDS) -> dict[str, dict[str, Any]]:
    """label -> median ns/packet and the XDP actions seen. ``programs`` maps a
    label to (prog fd, a function run before each of its runs, e.g. a table
    switch). Programs take turns frame by frame, so that whatever else the
    machine does weighs on all of them alike."""
    best: dict[str, list[float]] = {label: [float("inf")] * len(frames) for label in programs}
    actions: dict[str, dict[str, int]] = {label: {} for label in programs}
    for round_ in range(rounds):
        for i, f in enumerate(frames):
            ctx = bpfsys.xdp_md(len(f), ingress)
            for label, (prog_fd, prepare) in programs.items():
                if prepare:
                    prepare()
                # untimed: a table switch just wrote fs_config, and another program
                # ran last: caches start warm for every program alike
                bpfsys.prog_test_run(prog_fd, f, 1, ctx=ctx)
                ret, _, ns = bpfsys.prog_test_run(prog_fd, f, REPEAT, ctx=ctx)
                best[label][i] = min(best[label][i], ns)
                if round_ == 0:
                    name = XDP_ACTIONS.get(ret, str(ret))
                    actions[label][name] = actions[label].get(name, 0) + 1
    return {label: {"ns_per_packet": round(statistics.median(best[label]), 1),
                    "actions": actions[label]} for label in programs}


def measure_copies(programs: dict[str, tuple[list[int], Any]], frames: list[bytes],
                   ingress: int, rounds: int) -> dict[str, dict[str, Any]]:
    """``measure`` for programs loaded more than once: each copy takes its turn, and a
    program's figure is the median over its copies (each copy's under "copies_ns")."""
    flat = {f"{label}#{k}": (fd, prepare) for label, (fds, prepare) in programs.items()
            for k, fd in enumerate(fds)}
    rows = measure(flat, frames, ingress, rounds)
    out = {}
    for label, (fds, _) in programs.items():
        copies = [rows[f"{label}#{k}"] for k in range(len(fds))]
        ns = [row["ns_per_packet"] for row in copies]
        actions = sum((Counter(row["actions"]) for row in copies), Counter())
        out[label] = {"ns_per_packet": round(statistics.median(ns), 1),
                      "actions": dict(actions)}
        if len(ns) > 1:
            out[label]["copies_ns"] = ns
    return out


FIB_FORWARDER = r"""
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>

BPF_DEVMAP(tx_port, 256);

static __always_inline int forward(struct xdp_md *ctx, struct bpf_fib_lookup *fib,
                                   struct ethhdr *eth, void *l3)
{
    int rc = bpf_fib_lookup(ctx, fib, sizeof(*fib), 0);

    if (rc != BPF_FIB_LKUP_RET_SUCCESS)
        return XDP_PASS;
    if (fib->family == 2) {
        struct iphdr *iph = l3;
        u32 check = iph->check;

        check += bpf_htons(0x0100);
        iph->check = (u16)(check + (check >= 0xFFFF));
        iph->ttl--;
    } else {
        ((struct ipv6hdr *)l3)->hop_limit--;
    }
    __builtin_memcpy(eth->h_dest, fib->dmac, ETH_ALEN);
    __builtin_memcpy(eth->h_source, fib->smac, ETH_ALEN);
    return tx_port.redirect_map(fib->ifindex, 0);
}

int xdp_fib_forwarder(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    struct bpf_fib_lookup fib = {};

    if ((void *)(eth + 1) > end)
        return XDP_PASS;
    if (eth->h_proto == bpf_htons(ETH_P_IP)) {
        struct iphdr *iph = (void *)(eth + 1);

        if ((void *)(iph + 1) > end || iph->ttl <= 1)
            return XDP_PASS;
        fib.family = 2;
        fib.tos = iph->tos;
        fib.l4_protocol = iph->protocol;
        fib.tot_len = bpf_ntohs(iph->tot_len);
        fib.ipv4_src = iph->saddr;
        fib.ipv4_dst = iph->daddr;
        fib.ifindex = ctx->ingress_ifindex;
        return forward(ctx, &fib, eth, iph);
    }
    if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
        struct ipv6hdr *ip6h = (void *)(eth + 1);

        if ((void *)(ip6h + 1) > end || ip6h->hop_limit <= 1)
            return XDP_PASS;
        fib.family = 10;
        fib.l4_protocol = ip6h->nexthdr;
        fib.tot_len = bpf_ntohs(ip6h->payload_len);
        __builtin_memcpy(fib.ipv6_src, &ip6h->saddr, 16);
        __builtin_memcpy(fib.ipv6_dst, &ip6h->daddr, 16);
        fib.ifindex = ctx->ingress_ifindex;
        return forward(ctx, &fib, eth, ip6h);
    }
    return XDP_PASS;
}
"""


def fib_forwarder(ifindexes: list[int]) -> tuple[Any, int]:
    """The minimal bpf_fib_lookup forwarder, allowed to redirect to ``ifindexes``
    (of the calling thread's namespace); returns (bcc module, program fd)."""
    from bcc import BPF  # noqa: PLC0415

    bpf = BPF(text=FIB_FORWARDER.encode())
    tx = bpf[b"tx_port"]
    for idx in ifindexes:
        tx[tx.Key(idx)] = tx.Leaf(idx)
    return bpf, bpf.load_func(b"xdp_fib_forwarder", BPF.XDP).fd


def empty_program() -> tuple[Any, int]:
    from bcc import BPF  # noqa: PLC0415

    bpf = BPF(text=b"int xdp_empty(struct xdp_md *ctx) { return XDP_PASS; }")
    return bpf, bpf.load_func(b"xdp_empty", BPF.XDP).fd


def patched_program(instance: str, patches: dict[str, str]) -> FastPath:
    """fibsync's program with bpf/fibsync.c's text patched (each ``old`` must occur),
    adopting the maps of ``instance``."""
    src = bpf_source_dir()
    tmp = Path(tempfile.mkdtemp(prefix="fsbench"))
    for path in src.iterdir():
        if path.suffix in (".c", ".h"):
            shutil.copy(path, tmp / path.name)
    main = tmp / "fibsync.c"
    text = main.read_text()
    for old, new in patches.items():
        assert old in text, f"{old!r} moved: update bench_xdp.py"
        text = text.replace(old, new)
    main.write_text(text)
    os.environ["FIBSYNC_BPF_DIR"] = str(tmp)
    try:
        return FastPath.load(instance, renew=False)
    finally:
        del os.environ["FIBSYNC_BPF_DIR"]
        shutil.rmtree(tmp)


# fs_v4_route with the table choice compiled in (DIR-24-8): the cost of reading fs_config
FIXED_CHOICE = {"if (cfg->v4_table == FS_V4_DIR24)": "if (1)"}
# The fidelity checks (issue 12), each as the patch that removes it: the ingress
# interface's `ifaces` entry and the MAC compare (fs_pkt.ifc points to a zeroed entry
# on the stack instead: the compiler drops what reads it), the IPv4 header checksum,
# the source check (the `local_v4` bitmap, and the table walk where it cannot rule the
# source out). The egress interface's conditions cost a forwarded packet nothing: an
# interface with any is kept out of tx_ports (fs_egress_refused reads `ifaces` only
# once the redirect failed).
FIDELITY_CHECKS = {
    "ingress entry": {
        "\tifc = ifaces.lookup(&ingress);\n\tif (!ifc)\n\t\treturn FS_PASS(PASS_IFACE_UNKNOWN);\n"
        "\tif (!fs_mac_equal(p.eth->h_dest, ifc->mac))\n\t\treturn FS_PASS(PASS_OTHERHOST);\n"
        "\tp.ifc = ifc;\n": "\tstruct fs_iface none = {};\n\tp.ifc = &none;\n"},
    "checksum": {"\tif (!fs_ipv4_checksum_ok(iph))\n\t\treturn false;\n": ""},
    "source check": {
        "\t\tif (!fs_ipv4_source(p, iph, &reason))\n\t\t\treturn fs_pass(reason);\n": ""},
}
# the program without any of them
NO_FIDELITY = {old: new for patch in FIDELITY_CHECKS.values() for old, new in patch.items()}


def timed_write(fp: FastPath, diff: Any, v4_table: str, v6_table: str) -> dict[str, Any]:
    gc.collect()
    rss0 = rss_mb()
    t0 = time.monotonic()
    writer = MapWriter(PinnedMaps(fp.pin_dir), v4_table=v4_table,  # type: ignore[arg-type]
                       v6_table=v6_table)  # type: ignore[arg-type]
    writer.write(diff)
    seconds = time.monotonic() - t0
    out = {"seconds": round(seconds, 2), "rss_growth_mb": round(rss_mb() - rss0, 1),
           "errors": writer.stats.errors}
    if writer.dir24 is not None:
        out["dir24"] = writer.dir24.memory()
    return out


def plot(results: dict[str, Any], path: str) -> None:
    report.panels(path, results["table"], [
        (f"{family}: ns per packet, BPF_PROG_TEST_RUN (median of {results['samples']} "
         "destinations)",
         {k: v["ns_per_packet"] for k, v in results[family]["programs"].items()})
        for family in ("IPv4", "IPv6")], reference="empty", fmt="%.0f", figsize=(8, 6),
        height_ratios=[6, 4])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--v4", type=int, default=1_000_000)
    ap.add_argument("--v6", type=int, default=250_000)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=ROUNDS,
                    help="runs of each frame and program, the fastest kept")
    ap.add_argument("--only", default="",
                    help="measure only the programs whose label contains one of these "
                         "comma-separated words (the empty program always), e.g. "
                         "'DIR-24-8,fidelity' for the cost of the fidelity checks")
    ap.add_argument("--copies", type=int, default=1,
                    help="load each variant of fibsync's program this many times and "
                         "report the median over the copies")
    ap.add_argument("--each-check", action="store_true",
                    help="also measure the program without each fidelity check in turn")
    report.add_arguments(ap)
    args = ap.parse_args()
    if report.replotted(args, plot):
        return
    name = f"fsx{uuid.uuid4().hex[:6]}"
    ns = Netns(name).create()
    loaded: list[tuple[FastPath, str]] = []
    modules: list[Any] = []
    empty = None
    try:
        installed = install(name, args.v4, args.v6)
        # bpf_fib_lookup honours the forwarding sysctls, as the kernel does
        ns.sysctl("net.ipv4.conf.all.forwarding", 1)
        ns.sysctl("net.ipv6.conf.all.forwarding", 1)
        # frames arrive on an interface no route leaves by (else: hairpins, PASS_HAIRPIN)
        ns.run(["ip", "link", "add", "bin0", "address", INGRESS_MAC, "type", "veth", "peer",
                "name", "bin1"])
        ns.run(["ip", "link", "set", "bin0", "up"])
        # every gateway answers at the ingress's MAC: a test run repeats the frame it
        # rewrote, which must stay addressed to the router (else PASS_OTHERHOST)
        for i in range(4):
            ns.run(["ip", "neigh", "replace", f"198.18.{i}.2", "lladdr", INGRESS_MAC, "dev",
                    f"b{i}", "nud", "permanent"])
            ns.run(["ip", "neigh", "replace", f"2001:db8:ff{i:02x}::2", "lladdr", INGRESS_MAC,
                    "dev", f"b{i}", "nud", "permanent"])
        netns.enter(name)
        ifindex = {f"b{i}": socket.if_nametoindex(f"b{i}") for i in range(4)}
        ingress = socket.if_nametoindex("bin0")
        fast = FastPath.load(f"{name}f")
        loaded.append((fast, f"{name}f"))
        fib = FastPath.load(f"{name}b")
        loaded.append((fib, f"{name}b"))
        lpm_only = FastPath.load(f"{name}l")
        loaded.append((lpm_only, f"{name}l"))
        rib = Rib()
        rib.resync(asyncio.run(dump()))
        diff = rib.take_diff()
        writes = {"IPv4 LPM trie + DIR-24-8, IPv6 hash": timed_write(fast, diff, "dir24", "hash"),
                  "LPM tries only": timed_write(lpm_only, diff, "lpm", "lpm")}
        # the IPv6 trie too, so that `fast` holds every table the program can read
        MapWriter(PinnedMaps(fast.pin_dir), v4_table="lpm", v6_table="lpm").write(diff)
        del diff, rib

        def build(patch: dict[str, str]) -> list[int]:
            """--copies loads of fibsync's program with ``patch``: their fds."""
            fds = []
            for _ in range(args.copies):
                fp = patched_program(f"{name}f", patch)
                loaded.append((fp, ""))
                fds.append(fp.prog_fd)
            return fds

        # the program under test loaded --copies times in all (where the kernel puts a
        # JIT image moves a figure by a few ns: a copy shows how much)
        same = [fast.prog_fd, *build({})[1:]]
        fixed = build(FIXED_CHOICE)
        unchecked = build(NO_FIDELITY)
        without = {check: build(patch)
                   for check, patch in (FIDELITY_CHECKS.items() if args.each_check else ())}
        bcc_empty, empty_fd = empty_program()
        empty = bcc_empty
        forwarder, forwarder_fd = fib_forwarder(list(ifindex.values()))
        modules.append(forwarder)
        set_tables(fib, v4=abi.FS_V4_DIR24, v6=abi.FS_V6_HASH)
        # the daemon's two promises, as it renews them: the never-stale check (the
        # clock read against fs_heartbeat) is in the measured path
        until = time.clock_gettime_ns(CLOCK_MONOTONIC_COARSE) + 3600 * 10**9
        for fp in (fast, fib):
            PinnedMaps(fp.pin_dir).set_heartbeat(until, until)
            for idx in ifindex.values():
                fp.allow_port(idx)
            # what the daemon's Fidelity writes for an interface without conditions
            bpfsys.update(fp.map_fd("ifaces"), U32.pack(ingress), fidelity.entry(
                [], ingress, bytes.fromhex(INGRESS_MAC.replace(":", ""))))

        rng = random.Random(5)
        results: dict[str, Any] = {}
        for family, prefixes in (("IPv4", v4_prefixes(args.v4)),
                                 ("IPv6", v6_prefixes(args.v6))):
            sample = rng.sample(prefixes, min(args.samples, len(prefixes)))
            # transit traffic: each frame from a host behind another route of the table
            # (not from the router's own subnets, whose /24s the `local_v4` bitmap marks)
            frames = [frame(host_in(p, rng), host_in(rng.choice(prefixes), rng))
                      for p in sample]
            programs: dict[str, tuple[list[int], Any]] = {
                "empty XDP program": ([empty_fd], None)}
            dir24 = lambda: set_tables(fast, v4=abi.FS_V4_DIR24)  # noqa: E731
            hashed = lambda: set_tables(fast, v6=abi.FS_V6_HASH)  # noqa: E731
            if family == "IPv4":
                programs["fast path, LPM trie"] = (
                    same, lambda: set_tables(fast, v4=abi.FS_V4_LPM))
                programs["fast path, DIR-24-8"] = (same, dir24)
                programs["DIR-24-8, choice fixed at build"] = (fixed, None)
                programs["DIR-24-8, no fidelity checks"] = (unchecked, dir24)
                for check, fds in without.items():
                    programs[f"DIR-24-8, no {check}"] = (fds, dir24)
            else:
                programs["fast path, LPM trie"] = (
                    same, lambda: set_tables(fast, v6=abi.FS_V6_LPM))
                programs["fast path, hash"] = (same, hashed)
                programs["hash, no fidelity checks"] = (unchecked, hashed)
                if "ingress entry" in without:  # IPv6 has no checksum and no source check
                    programs["hash, no ingress entry"] = (without["ingress entry"], hashed)
            programs["bpf_fib_lookup"] = ([fib.prog_fd], None)
            programs["bpf_fib_lookup forwarder"] = ([forwarder_fd], None)
            if args.only:
                words = args.only.split(",")
                programs = {k: v for k, v in programs.items()
                            if k == "empty XDP program" or any(w in k for w in words)}
            rows = measure_copies(programs, frames, ingress, args.rounds)
            for label, row in rows.items():
                # a forwarding program that did not forward measured another path
                if label != "empty XDP program" and set(row["actions"]) != {"REDIRECT"}:
                    raise SystemExit(f"{family} {label}: {row['actions']}, not every frame "
                                     "redirected: the measurement would be of another path")
            floor = rows["empty XDP program"]["ns_per_packet"]
            ratios = {}
            for ref in ("bpf_fib_lookup", "bpf_fib_lookup forwarder"):
                if ref not in rows:
                    continue
                ref_ns = rows[ref]["ns_per_packet"]
                for k, v in rows.items():
                    if k.startswith("fast path"):
                        cost = v["ns_per_packet"]
                        ratios[f"{k} / {ref}"] = {
                            "raw": round(cost / ref_ns, 2),
                            "above_empty_program": round((cost - floor) / (ref_ns - floor), 2)}
            results[family] = {"programs": rows, "ratios": ratios}
        results["writes"] = writes
        doc = {
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.node()} {os.cpu_count()} cores, {platform.release()}, "
                       f"{platform.processor() or platform.machine()}",
            "table": f"{args.v4} IPv4 + {args.v6} IPv6 via nexthop objects",
            "ip_batch_install_s": round(installed["ip_batch_install"], 1),
            "repeat": REPEAT, "rounds": args.rounds, "samples": args.samples, **results}
        report.publish(doc, args, plot)
    finally:
        if empty is not None:
            empty.cleanup()
        for module in modules:
            module.cleanup()
        for fp, instance in loaded:
            fp.close()
            if instance:
                remove(instance)
        ns.delete()


if __name__ == "__main__":
    main()
