"""Per-method plot styles for the report's figures: a distinct (colour, marker) per method, reserved styles for
dense and the controls, the legend order (references, then pruning methods grouped by side) and the figure
legend itself (grouped, fitted to the figure, clear of the title)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import Any

import numpy as np

from pruneshot.report.stats import BASELINES, budget_free_methods

#: Colour-blind-safe qualitative colours (Paul Tol's "muted" scheme), ordered so neighbours contrast.
PALETTE = ("#332288", "#DDCC77", "#117733", "#CC6677", "#88CCEE", "#AA4499", "#44AA99", "#999933", "#882255")
#: Markers for the pruning methods; none of them is a reserved (dense / control / reference) marker.
MARKERS = ("o", "s", "^", "D", "v", "p", "<", ">", "h")
LINESTYLES = ("-", "--", ":", "-.")
DENSE_STYLE: dict[str, Any] = {"color": "#000000", "marker": "*", "linestyle": "-", "group": "reference"}
#: The controls: greys, dashed, their own markers.
CONTROL_STYLES: dict[str, dict[str, Any]] = {
    "random": {"color": "#6E6E6E", "marker": "X", "linestyle": "--", "group": "control"},
    "scratch": {"color": "#A0A0A0", "marker": "P", "linestyle": "--", "group": "control"},
}
#: Other budget-free references (e.g. linear_probe): dark greys, dash-dot.
_REFERENCE_COLORS = ("#404040", "#7F7F7F", "#262626")
_REFERENCE_MARKERS = ("d", "8", "H")
#: Legend order of the pruning methods' sides (unknown sides last).
SIDE_ORDER = ("source", "target")


@cache
def method_side(name: str) -> str:
    """The registered method's side (``source`` / ``target``), or ``other`` for a name the registry does not know."""
    from pruneshot.methods import available, get_method

    return str(get_method(name).side) if name in available() else "other"


def _side_rank(side: str) -> int:
    return SIDE_ORDER.index(side) if side in SIDE_ORDER else len(SIDE_ORDER)


def pruning_methods(methods: Sequence[str]) -> list[str]:
    """The methods that are neither dense, a control nor budget-free, grouped by side then by name."""
    names = {str(m) for m in methods}
    skip = set(BASELINES) | set(budget_free_methods(names))
    return sorted(names - skip, key=lambda m: (_side_rank(method_side(m)), m))


def legend_order(methods: Sequence[str]) -> list[str]:
    """Dense, the other references, the controls, then the pruning methods grouped by side (source first)."""
    names = {str(m) for m in methods}
    refs = [m for m in budget_free_methods(names) if m not in BASELINES]
    head = [m for m in ("dense", *refs, *[c for c in BASELINES if c != "dense"]) if m in names]
    return head + pruning_methods(names)


def method_styles(methods: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``{method: {color, marker, linestyle, group}}``: no two methods share both colour and marker.

    Dense is a black star, the controls (random, scratch) dashed greys with X / P markers, other budget-free
    references dark greys; each pruning method (in :func:`legend_order`) takes the next palette colour and a
    marker that changes with every pass through the palette, so (colour, marker) pairs stay unique up to
    ``len(PALETTE) * len(MARKERS)`` methods. ``group`` is ``reference``, ``control`` or the method's side.
    """
    names = {str(m) for m in methods}
    styles: dict[str, dict[str, Any]] = {}
    if "dense" in names:
        styles["dense"] = dict(DENSE_STYLE)
    for name, style in CONTROL_STYLES.items():
        if name in names:
            styles[name] = dict(style)
    refs = [m for m in budget_free_methods(names) if m not in BASELINES]
    for i, m in enumerate(refs):
        styles[m] = {"color": _REFERENCE_COLORS[i % len(_REFERENCE_COLORS)],
                     "marker": _REFERENCE_MARKERS[(i + i // len(_REFERENCE_COLORS)) % len(_REFERENCE_MARKERS)],
                     "linestyle": "-.", "group": "reference"}
    n = len(PALETTE)
    for i, m in enumerate(pruning_methods(names)):
        styles[m] = {"color": PALETTE[i % n], "marker": MARKERS[(i % n + i // n) % len(MARKERS)],
                     "linestyle": "-", "group": method_side(m)}
    return styles


_GROUP_HEADINGS = {"reference": "references", "control": "controls", "source": "source-side pruning",
                   "target": "target-side pruning", "other": "other methods"}


def add_legend(fig: Any, axes: np.ndarray, methods: Sequence[str], styles: dict[str, dict[str, Any]] | None = None,
                title: str | None = None) -> None:
    """One legend for the figure, outside the panels, ordered by ``methods`` then first appearance; with
    ``styles``, each group of methods (references, controls, each side) under its own heading."""
    from matplotlib.lines import Line2D

    handles: dict[str, Any] = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(lab, h)
    rank = {m: i for i, m in enumerate(methods)}
    first_seen = {lab: i for i, lab in enumerate(handles)}
    ordered = sorted(handles, key=lambda lab: (rank.get(lab.split(" ", 1)[0], len(rank)), first_seen[lab]))
    entries: list[tuple[Any, str]] = []
    headings: set[str] = set()
    group = None
    for lab in ordered:
        method = lab.split(" ", 1)[0]
        if styles is not None and method in styles and styles[method]["group"] != group:
            group = styles[method]["group"]
            headings.add(_GROUP_HEADINGS.get(group, str(group)))
            entries.append((Line2D([], [], linestyle="", marker=""), _GROUP_HEADINGS.get(group, str(group))))
        elif styles is not None and method not in styles and group is not None:
            group = None
            entries.append((Line2D([], [], linestyle="", marker=""), ""))
        entries.append((handles[lab], lab))
    if entries:
        legend = fitted_legend(fig, [h for h, _ in entries], [lab for _, lab in entries], title=title)
        for text in legend.get_texts():
            if text.get_text() in headings and text.get_text() not in handles:
                text.set_fontweight("bold")


def tidy_legend(fig: Any) -> None:
    """Keep the figure title off the legend at the right: centre it over the panels, and wrap it if it still
    reaches the legend (small studies: a narrow figure whose legend starts at the top)."""
    import textwrap

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    if not fig.legends or not fig.axes:
        return
    FigureCanvasAgg(fig)
    fig.draw_without_rendering()
    title = fig._suptitle
    if title is None:
        return
    left = min(ax.get_position().x0 for ax in fig.axes)
    right = max(ax.get_position().x1 for ax in fig.axes)
    title.set_x((left + right) / 2)
    text = title.get_text()
    for width in (len(text) * 2 // 3, len(text) // 2, len(text) // 3):
        fig.draw_without_rendering()
        renderer = fig.canvas.get_renderer()
        box = title.get_window_extent(renderer)
        if not any(box.overlaps(leg.get_window_extent(renderer)) for leg in fig.legends):
            return
        title.set_text("\n".join(textwrap.wrap(text, max(width, 12))))


def fitted_legend(fig: Any, handles: list[Any], labels: list[str], **kwargs: Any) -> Any:
    """A figure legend outside the panels at the right, in as many columns (up to 4) as it needs to fit the
    figure's height (many methods x budgets make a long one); the figure grows by the extra columns."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()
    for ncols in range(1, 5):
        legend = fig.legend(handles, labels, loc="outside right upper", frameon=False, fontsize="small",
                            title_fontsize="small", ncols=ncols, **kwargs)
        box = legend.get_window_extent(renderer)
        if ncols == 4 or box.height <= 0.95 * fig.bbox.height:
            # widen the figure by the extra columns so the panels keep their width
            fig.set_figwidth(fig.get_figwidth() + box.width / fig.dpi * (ncols - 1) / ncols)
            return legend
        legend.remove()
    raise AssertionError("unreachable")
