"""The router install, walked through as docs/operations.md tells it, in a namespace lab.

`make install` builds a wheel of this checkout and installs it into a fresh venv
(made with --system-site-packages, for bcc); that copy's fibsync, not the
checkout's, compiles the XDP program from the sources the wheel carries and
forwards pings across the lab's router, which the router's kernel does not
forward (its ForwDatagrams stay flat). Then an upgrade, a refused uninstall
while the daemon runs, and an uninstall that leaves nothing of the install.

Only the paths differ from a real install (temporary PREFIX, BINDIR, UNITDIR,
CONFDIR, CACHEDIR), and pip runs without an index and without dependencies:
those come from the project's venv through a .pth file, so the test downloads
nothing. tests/unit/test_packaging.py checks that the dependencies are declared.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sysconfig
import tarfile
import time
from pathlib import Path

import pytest

from fibsync import __version__
from fibsync.config import PIN_ROOT
from fibsync.demo import RouterDaemon, fibsync_argv
from fibsync.lab import Lab

from .test_operations_restart import XdpProof, warm_up

pytestmark = pytest.mark.privileged

ROOT = Path(__file__).resolve().parents[2]


def make(target: str, paths: dict[str, Path]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **{k: str(v) for k, v in paths.items()},
           "PIP_NO_INDEX": "1", "PIP_NO_DEPS": "1"}
    return subprocess.run(["make", "-s", target], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def ping(lab: Lab, src: str, dst: str, count: int) -> str:
    r = lab.h1.run(["ping", "-c", str(count), "-i", "0.05", "-W", "1", "-I", src, dst],
                   check=False)
    return r.stdout


def test_sdist_and_wheel_carry_the_bpf_sources(tmp_path: Path) -> None:
    code = ("from setuptools import build_meta as b; import sys; "
            "print(b.build_sdist(sys.argv[1]))")
    r = subprocess.run([str(ROOT / ".venv/bin/python"), "-c", code, str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    sdist = tmp_path / r.stdout.strip().splitlines()[-1]
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    sources = {f"bpf/{p.name}" for p in (ROOT / "bpf").glob("*.[ch]")}
    assert sources and sources <= names
    # a wheel built from the sdist, as pip does from an index
    r = subprocess.run([str(ROOT / ".venv/bin/python"), "-m", "pip", "wheel", "-q", "--no-deps",
                        "--no-build-isolation", "-w", str(tmp_path), str(sdist)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    import zipfile

    (wheel,) = tmp_path.glob("fibsync-*.whl")
    members = set(zipfile.ZipFile(wheel).namelist())
    assert {f"fibsync/bpf/{Path(s).name}" for s in sources} <= members


def test_make_install_forwards_from_the_wheel_and_uninstall_removes_it(
        lab: Lab, tmp_path: Path) -> None:
    paths = {"PREFIX": tmp_path / "opt" / "fibsync", "BINDIR": tmp_path / "bin",
             "UNITDIR": tmp_path / "systemd", "CONFDIR": tmp_path / "etc" / "fibsync",
             "CACHEDIR": tmp_path / "cache"}
    prefix, conf = paths["PREFIX"], paths["CONFDIR"] / "fibsync.toml"
    unit_file = paths["UNITDIR"] / "fibsync.service"
    installed = paths["BINDIR"] / "fibsync"
    t0 = time.monotonic()
    r = make("install", paths)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"installed fibsync {__version__} in {prefix}" in r.stdout
    install_seconds = time.monotonic() - t0

    # what install put where
    assert os.readlink(installed) == str(prefix / "bin" / "fibsync")
    assert conf.read_text() == (ROOT / "systemd" / "fibsync.toml").read_text()
    unit = unit_file.read_text()
    execs = re.findall(r"^Exec(?:StartPre|Start|Reload)=(\S+) (\w+) --config (\S+)$", unit, re.M)
    assert [e[1] for e in execs] == ["check", "run", "check"]
    assert {(e[0], e[2]) for e in execs} == {(str(prefix / "bin" / "fibsync"), str(conf))}
    for doc in re.findall(r"^Documentation=file://(\S+)$", unit, re.M):
        assert Path(doc).is_file(), doc
    r = subprocess.run(["systemd-analyze", "verify", str(unit_file)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr

    # the dependencies, from the project's venv (pip was told not to fetch them)
    site = Path(subprocess.run([str(prefix / "bin" / "python"), "-c",
                                "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "zz-test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    where = subprocess.run(
        [str(prefix / "bin" / "python"), "-c", "import fibsync, fibsync.fastpath.program as p; "
         "print(fibsync.__file__); print(p.bpf_source_dir())"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert where.returncode == 0, where.stderr
    module, sources = where.stdout.split()
    assert module.startswith(str(site)) and sources == str(site / "fibsync" / "bpf")
    r = subprocess.run([str(installed), "--version"], capture_output=True, text=True)
    assert r.stdout == f"fibsync {__version__}\n"

    # configure, check, run: the unit's commands, in the lab's router
    conf.write_text(f"instance = {json.dumps(lab.name)}\n"
                    f"interfaces = {json.dumps(lab.router_interfaces)}\n")
    r = subprocess.run([str(installed), "--netns", lab.r.name, "check", "--config", str(conf)],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"fibsync: {conf}: OK" in r.stdout and "xdp r-h1" in r.stdout
    daemon = RouterDaemon(lab.r, lab.rundir, lab.name, [], ["--config", str(conf)],
                          env={"FIBSYNC_CACHE_DIR": str(paths["CACHEDIR"])},
                          command=[str(installed)])
    try:
        daemon.start()
        # compiled here, from the wheel's sources: the program cache was empty
        assert list(paths["CACHEDIR"].glob("xdp-*.prog")), daemon.log_tail()
        src4, dst4 = str(lab.h1_lan_v4.ip), str(lab.h2_lan_v4.ip)
        src6, dst6 = str(lab.h1_lan_v6.ip), str(lab.h2_lan_v6.ip)
        warm_up(lab, src4, dst4)
        warm_up(lab, src6, dst6)
        proof = XdpProof(lab, daemon)
        for src, dst in ((src4, dst4), (src6, dst6)):
            assert "10 received" in ping(lab, src, dst, 10)
        # the router's kernel forwarded none of them; fibsync counted them all
        proof.check(crossed=40)  # 2 families x (10 echoes + 10 replies)

        # upgrade in place: the config stays as the operator wrote it
        written = conf.read_text()
        r = make("install", paths)
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"upgraded {prefix} to fibsync {__version__}" in r.stdout
        assert conf.read_text() == written

        # a per-namespace unit, as docs/operations.md shows it; uninstall follows its --netns
        unit_file.write_text(unit.replace("fibsync run --config",
                                          f"fibsync --netns {lab.r.name} run --config"))
        r = make("uninstall", paths)
        assert r.returncode != 0
        assert "stop the daemon first" in r.stderr and prefix.exists()
    finally:
        daemon.stop()

    r = make("uninstall", paths)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not prefix.exists() and not installed.exists() and not unit_file.exists()
    assert not paths["CACHEDIR"].exists()
    assert f"kept {conf} (changed since install" in r.stdout and conf.exists()
    assert not (PIN_ROOT / lab.name).exists()
    for ifname in lab.router_interfaces:
        (link,) = lab.r.ip_json("link", "show", ifname)
        assert "xdp" not in link, link
    # the daemon left no pins behind for the lab fixture to trip over
    subprocess.run([*fibsync_argv(), "--netns", lab.r.name, "detach", "--force", "--instance",
                    lab.name], capture_output=True, timeout=60)
    assert install_seconds < 120, f"make install took {install_seconds:.0f} s"
