"""What every benchmark does with its results: print them as JSON, keep them
(``--json FILE``), draw them (``--plot PNG``, needs matplotlib) or draw the
results of an earlier run again (``--from-json FILE``, measuring nothing)."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

Plot = Callable[[dict[str, Any], str], None]


def add_tree_argument(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--fibsync-tree", type=Path, default=None,
                    help="run the daemon and the CLI from this checkout (e.g. `git archive` "
                         "of an older commit), for before/after figures")


def use_tree(args: argparse.Namespace) -> None:
    """Daemons and CLIs started from now on import fibsync from ``--fibsync-tree``
    (this process keeps its own: the harness is this checkout's)."""
    if args.fibsync_tree is not None:
        os.environ["PYTHONPATH"] = str(args.fibsync_tree.resolve())


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--plot", help="draw the results into this PNG (needs matplotlib)")
    ap.add_argument("--from-json", help="measure nothing: plot the results of an earlier --json")


def replotted(args: argparse.Namespace, plot: Plot) -> bool:
    """With --from-json: draw those results and say so (the caller measures nothing)."""
    if not args.from_json:
        return False
    plot(json.loads(Path(args.from_json).read_text()), args.plot)
    return True


def publish(doc: dict[str, Any], args: argparse.Namespace, plot: Plot) -> None:
    text = json.dumps(doc, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    if args.plot:
        plot(doc, args.plot)


def pyplot() -> Any:
    import matplotlib  # noqa: PLC0415 - bench extra only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def panels(path: str, suptitle: str, rows: list[tuple[str, dict[str, float]]], *,
           reference: str, fmt: str, figsize: tuple[float, float],
           height_ratios: list[int]) -> None:
    """One panel of horizontal bars per (title, {label: value}), the first row on
    top, each bar with its value: grey for labels naming ``reference``, red for
    the bpf_fib_lookup ones, blue for the rest."""
    fig, axes = pyplot().subplots(len(rows), 1, figsize=figsize, height_ratios=height_ratios)
    for ax, (title, values_of) in zip(axes, rows, strict=True):
        labels = list(values_of)[::-1]
        values = [values_of[k] for k in labels]
        bars = ax.barh(labels, values, color=[
            "#999999" if reference in k else "#d62728" if "fib" in k else "#1f77b4"
            for k in labels])
        ax.bar_label(bars, fmt=fmt, padding=3)
        ax.set_title(title, fontsize=9)
        ax.set_xlim(0, max(values) * 1.15)
    fig.suptitle(suptitle, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
