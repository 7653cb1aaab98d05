"""`fibsync check`'s probes of the host: each one can say no, and says why."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from fibsync import preflight
from fibsync.demo import fibsync_argv

ROOT = Path(__file__).resolve().parents[2]
UNIT_DIR = ROOT / "systemd"


@pytest.mark.parametrize("release, severity", [
    ("4.19.0-27-amd64", "error"), ("5.9.16", "error"), ("5.10.0-30-amd64", "ok"),
    ("6.1.0-57-cloud-amd64", "ok"), ("6.18.44-fc-v1045", "ok")])
def test_kernel_minimum(release: str, severity: str) -> None:
    finding = preflight.kernel(release)
    assert finding.severity == severity
    assert release in finding.text and "5.10" in finding.text


def test_headers_are_found_in_the_build_tree_or_named_as_missing(tmp_path: Path) -> None:
    missing = preflight.headers("6.1.0-x", tmp_path, tmp_path / "no-kheaders")
    assert missing.severity == "error"
    assert "linux-headers-6.1.0-x" in missing.text
    tree = tmp_path / "src" / "linux-headers"
    (tree / "include" / "linux").mkdir(parents=True)
    (tree / "include" / "linux" / "kconfig.h").touch()
    (tmp_path / "6.1.0-x").mkdir()
    (tmp_path / "6.1.0-x" / "build").symlink_to(tree)
    found = preflight.headers("6.1.0-x", tmp_path, tmp_path / "no-kheaders")
    assert found.severity == "ok" and str(tree) in found.text


def test_flags_used_are_read_from_the_code_not_the_comments(tmp_path: Path) -> None:
    (tmp_path / "prog.c").write_text(
        "/* BPF_FIB_LOOKUP_MARK would need 6.10 */\n"
        "int f(void *c, void *p) { // BPF_FIB_LOOKUP_SRC too\n"
        "  return bpf_fib_lookup(c, p, 64, BPF_FIB_LOOKUP_TBID | BPF_FIB_LOOKUP_SKIP_NEIGH);\n}\n")
    (tmp_path / "prog.h").write_text("#define FS_FLAGS BPF_FIB_LOOKUP_DIRECT\n")
    assert preflight.flags_used(tmp_path) == {"TBID", "SKIP_NEIGH", "DIRECT"}


def test_a_flag_the_kernel_does_not_know_fails_the_check(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "prog.c").write_text("int x = BPF_FIB_LOOKUP_TBID | BPF_FIB_LOOKUP_DIRECT;\n")
    monkeypatch.setattr(preflight, "kernel_fib_flags", lambda: {"DIRECT", "OUTPUT", "SKIP_NEIGH"})
    finding = preflight.fib_lookup_flags(tmp_path)
    assert finding.severity == "error"
    assert "TBID" in finding.text and "6.5" in finding.text
    monkeypatch.setattr(preflight, "kernel_fib_flags", lambda: set(preflight.FIB_LOOKUP_FLAGS))
    finding = preflight.fib_lookup_flags(tmp_path)
    assert finding.severity == "ok" and "flags used: DIRECT, TBID" in finding.text


@pytest.mark.parametrize("features, mode, severity, needle", [
    (0b111, "auto", "ok", "native XDP with redirect, takes redirected frames;"),
    (0b011, "auto", "ok", "only once XDP runs on it"),
    (0b001, "auto", "warning", "without XDP_REDIRECT"),
    (0b000, "auto", "warning", "generic only"),
    (0b000, "generic", "ok", "generic only"),
    (0b000, "native", "error", "xdp_mode is native"),
])
def test_xdp_features_of_the_driver(features: int, mode: str, severity: str,
                                    needle: str) -> None:
    lo = 1
    finding = preflight.xdp_driver("lo", mode, features={lo: features}, drv="testdrv")
    assert (finding.what, finding.severity) == ("xdp lo", severity)
    assert finding.text.startswith("testdrv: ") and needle in finding.text


def test_xdp_of_a_missing_interface_or_on_an_old_kernel() -> None:
    assert preflight.xdp_driver("nosuchif0", "auto", features={}).severity == "error"
    old = preflight.xdp_driver("lo", "auto", features=None, drv="testdrv")
    assert old.severity == "ok" and "before 6.3" in old.text


def unit_copy(tmp_path: Path, dropin: str | None = None) -> Path:
    shutil.copy(UNIT_DIR / "fibsync.service", tmp_path / "fibsync.service")
    if dropin is not None:
        (tmp_path / "fibsync.service.d").mkdir()
        (tmp_path / "fibsync.service.d" / "prometheus.conf").write_text(dropin)
    return tmp_path


def test_metrics_beyond_localhost_warn_while_the_unit_drops_the_scrapes(tmp_path: Path) -> None:
    unit = preflight.unit_settings(search=[str(unit_copy(tmp_path))])
    assert unit is not None and unit["IPAddressAllow"] == ["localhost"]
    warning = preflight.metrics_reachable("0.0.0.0:9477", unit)
    assert warning is not None and warning.severity == "warning"
    assert "IPAddressAllow=localhost" in warning.text and "systemctl edit fibsync" in warning.text
    assert preflight.metrics_reachable("[::]:9477", unit) is not None
    assert preflight.metrics_reachable("127.0.0.1:9477", unit) is None
    assert preflight.metrics_reachable("", unit) is None
    (tmp_path / "empty").mkdir()
    assert preflight.unit_settings(search=[str(tmp_path / "empty")]) is None


@pytest.mark.parametrize("dropin, warns", [
    ("[Service]\nIPAddressAllow=192.0.2.10\n", False),
    ("[Service]\nIPAddressDeny=\n", False),
    ("[Service]\nIPAddressAllow=\nIPAddressAllow=localhost\n", True),
    ("[Service]\nIPAddressAllow=::1/128 127.0.0.0/8\n", True),
])
def test_a_drop_in_decides_whether_scrapes_get_through(tmp_path: Path, dropin: str,
                                                       warns: bool) -> None:
    unit = preflight.unit_settings(search=[str(unit_copy(tmp_path, dropin))])
    assert (preflight.metrics_reachable("192.0.2.1:9477", unit) is not None) == warns


def test_check_prints_the_metrics_warning_for_the_installed_unit(tmp_path: Path) -> None:
    env = {**os.environ, "SYSTEMD_UNIT_PATH": str(unit_copy(tmp_path))}
    r = subprocess.run([*fibsync_argv(), "check", "-i", "lo", "--metrics", "0.0.0.0:9477"],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    assert "fibsync: warning: metrics: metrics.listen (--metrics): 0.0.0.0:9477" in r.stderr
    r = subprocess.run([*fibsync_argv(), "check", "-i", "lo", "--metrics", "9477"],
                       capture_output=True, text=True, timeout=60, env=env)
    assert "metrics" not in r.stderr


@pytest.mark.privileged
def test_the_kernel_probe_tells_known_from_unknown_flags() -> None:
    import os as _os

    from fibsync.fastpath import bpfsys

    def answer(flags: int) -> int:
        fd = bpfsys.prog_load(6, preflight.fib_probe_program(flags), name="fs_probe")
        try:
            return bpfsys.prog_test_run(fd, bytes(64))[0]
        finally:
            _os.close(fd)

    assert answer(0) == preflight._PROBE_KNOWN_FLAG
    assert answer(1 << 20) == preflight._PROBE_UNKNOWN_FLAG  # no kernel has this flag
    running = preflight.kernel_version(_os.uname().release)
    expected = {f for f, (_v, since) in preflight.FIB_LOOKUP_FLAGS.items() if since <= running}
    assert expected <= preflight.kernel_fib_flags()
