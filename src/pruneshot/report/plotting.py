"""Matplotlib plumbing of the report's figures: a constrained-layout figure, deterministic PNG files (no
``Software`` tag, no timestamps, written atomically), log-axis tick labels, error-bar dodging and the
Pareto front. No report semantics here: those are in :mod:`pruneshot.report.figures`."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pruneshot.io import atomic_path
from pruneshot.report.load import FILE_MODE
from pruneshot.report.styles import tidy_legend

FIGURE_DPI = 110


def dodge(k: int, n: int, span: float = 0.03) -> float:
    """Multiplicative horizontal offset on a log axis so overlapping error bars stay apart; the
    ``n`` series together span at most ``span`` decades (about ±3.5%)."""
    step = min(0.012, span / max(n - 1, 1))
    return float(10 ** (step * (k - (n - 1) / 2)))


def new_figure(nrows: int, ncols: int, sharey: bool = True, width: float = 4.0,
               height: float = 3.1) -> tuple[Any, np.ndarray]:
    """A constrained-layout figure of ``nrows`` x ``ncols`` panels, each about ``width`` x ``height`` inches."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1.0 + width * ncols, 0.6 + height * nrows), dpi=FIGURE_DPI, layout="constrained")
    axes = fig.subplots(nrows, ncols, sharey=sharey, squeeze=False)
    return fig, axes


def save_png(fig: Any, path: Path) -> None:
    """Write ``fig`` to ``path`` as a deterministic PNG (legend tidied; atomically)."""
    tidy_legend(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=FIGURE_DPI, metadata={"Software": None})
        os.chmod(tmp, FILE_MODE)


def empty_figure(title: str, message: str = "no successful runs to plot") -> Any:
    """A one-panel figure that says ``message`` under ``title``."""
    fig, axes = new_figure(1, 1, height=1.2)
    ax = axes[0, 0]
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()
    fig.suptitle(title)
    return fig


def eng(x: float) -> str:
    from matplotlib.ticker import EngFormatter

    return EngFormatter(sep="").format_eng(x)


def plain(x: float) -> str:
    return f"{x:.3g}"


def log_tick_formatter(ax: Any, minor: bool, fmt: Callable[[float], str] = eng) -> Any:
    """Tick labels via ``fmt``; minor ticks labelled at 2x, 3x, 5x only on narrow ranges."""
    from matplotlib.ticker import FuncFormatter

    def label(x: float, _pos: Any) -> str:
        if x <= 0:
            return ""
        if minor:
            lo, hi = ax.get_xlim()
            mantissa = round(x / 10 ** math.floor(math.log10(x)), 6)
            if lo <= 0 or math.log10(hi / lo) > 1.5 or mantissa not in (2.0, 3.0, 5.0):
                return ""
        return fmt(x)

    return FuncFormatter(label)


def pareto_front(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The non-dominated points (lower cost, higher accuracy), by increasing cost."""
    order = np.lexsort((-y, x))
    fx, fy, best = [], [], -math.inf
    for i in order:
        if y[i] > best:
            fx.append(x[i])
            fy.append(y[i])
            best = y[i]
    return np.asarray(fx), np.asarray(fy)
