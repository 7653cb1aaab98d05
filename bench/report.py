"""What every benchmark does with its results: print them as JSON, keep them
(``--json FILE``), draw them (``--plot PNG``, needs matplotlib) or draw the
results of an earlier run again (``--from-json FILE``, measuring nothing)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

Plot = Callable[[dict[str, Any], str], None]


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


def hbars(ax: Any, rows: dict[str, float], colour: Callable[[str], str], fmt: str,
          title: str) -> None:
    """One horizontal bar per row, the first on top, each with its value."""
    labels = list(rows)[::-1]
    values = [rows[k] for k in labels]
    bars = ax.barh(labels, values, color=[colour(k) for k in labels])
    ax.bar_label(bars, fmt=fmt, padding=3)
    ax.set_title(title, fontsize=9)
    ax.set_xlim(0, max(values) * 1.15)
