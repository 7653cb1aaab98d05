"""What pyproject.toml promises about the package: its dependencies and its files."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# import name -> distribution name, where they differ
DISTRIBUTION = {"prometheus_client": "prometheus-client"}
# imported at run time, installed by Debian: python3-bpfcc (see pyproject.toml)
SYSTEM = {"bcc"}


def imported_top_level(package: Path) -> set[str]:
    names: set[str] = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"fibsync", "__future__"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_runtime_dependencies_are_exactly_what_fibsync_imports() -> None:
    declared = {canonical(re.split(r"[<>=!~ \[;]", d)[0])
                for d in PYPROJECT["project"]["dependencies"]}
    imported = {canonical(DISTRIBUTION.get(n, n)) for n in imported_top_level(ROOT / "fibsync")}
    assert imported - {canonical(s) for s in SYSTEM} == declared


def test_every_subpackage_is_listed() -> None:
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts)
             for p in (ROOT / "fibsync").rglob("__init__.py")}
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages"
    assert PYPROJECT["tool"]["setuptools"]["package-dir"]["fibsync.bpf"] == "bpf"
    assert (ROOT / "bpf" / "fibsync.c").is_file()
