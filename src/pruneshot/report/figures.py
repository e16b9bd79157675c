"""The report's matplotlib figures, written as deterministic PNG files.

Accuracy against achieved cost (params, FLOPs, measured latency), against shots, requested vs achieved
budget, search cost and the finetune − reinit gap; see :func:`make_figures`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pruneshot.report.formatting import fmt_budget
from pruneshot.report.load import (
    CPU_LATENCY_PREFIX,
    CUDA_LATENCY_RE,
    _aggregate_ok,
    _prepared,
    latency_batch,
    latency_table_columns,
    timed_latency_columns,
)
from pruneshot.report.plotting import (
    dodge,
    empty_figure,
    log_tick_formatter,
    new_figure,
    pareto_front,
    plain,
    save_png,
)
from pruneshot.report.reinit_gap import reinit_gap_data
from pruneshot.report.stats import BASELINES, budget_free_methods
from pruneshot.report.styles import (
    LINESTYLES,
    add_legend,
    fitted_legend,
    legend_order,
    method_side,
    method_styles,
    pruning_methods,
)

#: Figures always written (a figure without data says so in its panel; the HTML report shows a line instead of
#: the reinit gap without a reinit arm and of accuracy vs shots with fewer than two shots values).
FIGURE_NAMES = (
    "acc_vs_params", "acc_vs_flops", "acc_vs_latency", "acc_vs_shots", "budget_achieved", "search_cost",
    "reinit_gap",
)
#: Written only when some row has a CUDA latency.
CUDA_FIGURE = "acc_vs_latency_cuda"
#: Above this many pruning methods spanning several sides, the accuracy-vs-cost figures get one panel per side.
SPLIT_SIDES_ABOVE = 5


def _series_label(row: pd.Series, qualifiers: Sequence[str]) -> str:
    """``method`` or e.g. ``l1_filter [side=target]`` when the method varies in that column."""
    quals = [f"{c}={row[c]}" for c in qualifiers]
    return str(row["method"]) + (f" [{', '.join(quals)}]" if quals else "")


def _layout(agg: pd.DataFrame) -> tuple[list[str], dict[str, list[str]]]:
    """(arms that get their own panel row, per-method qualifier columns for series labels)."""
    arms: list[str] = []
    if "arm" in agg.columns:
        pruned = agg[~agg["method"].isin(budget_free_methods(agg["method"]))]
        arms = sorted(pruned["arm"].astype(str).unique())
        if len(arms) <= 1:
            arms = []
    quals: dict[str, list[str]] = {}
    for method, rows in agg.groupby("method", sort=True):
        quals[str(method)] = [
            col for col in ("side", "arm", "budget_metric", "backbone", "source", "ways")
            if col in rows.columns and not (col == "arm" and arms) and rows[col].nunique(dropna=False) > 1
        ]
    return arms, quals


def _facet_rows(agg: pd.DataFrame, arms: list[str]) -> list[tuple[str | None, str | None]]:
    targets: list[str | None] = sorted(agg["target"].astype(str).unique()) if "target" in agg.columns else []
    targets = targets or [None]
    return [(t, a) for t in targets for a in (arms or [None])]


def _labelled(df: pd.DataFrame, quals: dict[str, list[str]], extra: Sequence[str] = ()) -> pd.DataFrame:
    labels = [_series_label(row, [*quals.get(str(row["method"]), []), *extra]) for _, row in df.iterrows()]
    return df.assign(_label=pd.Series(labels, index=df.index, dtype=object))


def _panel_data(
    agg: pd.DataFrame, target: str | None, arm: str | None, arms: list[str], quals: dict[str, list[str]]
) -> pd.DataFrame:
    """Rows drawn in one panel, with a ``_label`` column naming their series."""
    pool = agg if target is None else agg[agg["target"].astype(str) == target]
    sel = pool
    if arm is not None:
        # Budget-free (reference) runs made only under an arm no pruned method uses are drawn in every panel.
        shared = pool["method"].isin(budget_free_methods(pool["method"])) & ~pool["arm"].astype(str).isin(arms)
        sel = pool[(pool["arm"].astype(str) == arm) | shared]
    sel = _labelled(sel, quals)
    if arm is not None:
        # Dense and the controls (random, scratch) appear in every panel: borrow them from another arm
        # when this one lacks them.
        for method in BASELINES:
            borrowed = pool[pool["method"] == method]
            if not borrowed.empty and not (sel["method"] == method).any():
                sel = pd.concat([sel, _labelled(borrowed, quals, extra=["arm"])])
    return sel


def _facet_title(target: str | None, arm: str | None, shots: int | None = None, side: str | None = None) -> str:
    """E.g. ``5-shot · mnist_5to9 · finetune``; with a side, ``5-shot · source-side`` then the rest below."""
    head = [f"{shots}-shot"] if shots is not None else []
    rest = [p for p in (target, arm) if p is not None]
    if side is None:
        return " · ".join(head + rest)
    return "\n".join(p for p in (" · ".join([*head, f"{side}-side"]), " · ".join(rest)) if p)


def _side_columns(methods: Sequence[str]) -> list[str | None]:
    """The sides that get their own panel column (``[None]``: one panel for all methods)."""
    pruned = pruning_methods(methods)
    sides = list(dict.fromkeys(method_side(m) for m in pruned))
    return sides if len(pruned) > SPLIT_SIDES_ABOVE and len(sides) > 1 else [None]


def _series_style(style: dict[str, Any], variant: int) -> str:
    """The method's line style for its first series, the next ones for further variants (e.g. per side)."""
    if variant == 0:
        return str(style["linestyle"])
    rest = [ls for ls in LINESTYLES if ls != style["linestyle"]]
    return rest[(variant - 1) % len(rest)]


def _plot_vs_cost(agg: pd.DataFrame, cost: str, xlabel: str, title: str, styles: dict[str, dict[str, Any]],
                  fmt: Callable[[float], str] = plain) -> Any:
    """Accuracy against ``cost`` (log x): one panel per shots (columns) and target x arm (rows), and with
    many methods one panel per side of the pruning methods (each with dense, the references and the
    controls); each method a line through its budgets, dense a star with a dashed reference line,
    the Pareto front of all methods (of every side) a wide grey band."""
    if agg.empty or cost not in agg.columns or not np.isfinite(pd.to_numeric(agg[cost], errors="coerce")).any():
        return empty_figure(title, f"no successful run with a {cost} value to plot")
    agg = agg.assign(**{cost: pd.to_numeric(agg[cost], errors="coerce")})
    arms, quals = _layout(agg)
    facets = _facet_rows(agg, arms)
    shots_values = sorted(agg["shots"].astype(int).unique())
    methods = legend_order(agg["method"])
    sides = _side_columns(methods)
    pruned = set(pruning_methods(methods))
    columns = [(shots, side) for shots in shots_values for side in sides]
    fig, axes = new_figure(len(facets), len(columns), width=4.0 if len(columns) <= 2 else 3.4)
    for r, (target, arm) in enumerate(facets):
        for c, (shots, side) in enumerate(columns):
            ax = axes[r, c]
            every = _panel_data(agg[agg["shots"].astype(int) == shots], target, arm, arms, quals)
            every = every[np.isfinite(every[cost].to_numpy(dtype=float)) & (every[cost] > 0)]
            panel = every
            if side is not None:
                panel = every[[m not in pruned or method_side(m) == side for m in every["method"].astype(str)]]
            labels = [
                lab for m in methods for lab in sorted(panel.loc[panel["method"] == m, "_label"].unique())
            ]
            for k, label in enumerate(labels):
                s = panel[panel["_label"] == label].sort_values("requested_budget", kind="mergesort")
                method = str(s["method"].iloc[0])
                style = styles[method]
                x = s[cost].to_numpy(dtype=float) * dodge(k, len(labels))
                y = 100 * s["acc_mean"].to_numpy(dtype=float)
                yerr = 100 * np.nan_to_num(s["acc_ci95"].to_numpy(dtype=float))
                ls = _series_style(style, sorted(panel.loc[panel["method"] == method, "_label"].unique()).index(label))
                ax.errorbar(x, y, yerr=yerr, color=style["color"], marker=style["marker"], linestyle=ls,
                            markersize=9 if method == "dense" else 6, capsize=3, linewidth=1.5, label=label,
                            zorder=3)
                if method == "dense":
                    for yy in y:
                        ax.axhline(yy, color=style["color"], linestyle="--", linewidth=1, alpha=0.6, zorder=1)
            if len(every) > 1:
                px = every[cost].to_numpy(dtype=float)
                fx, fy = pareto_front(px, 100 * every["acc_mean"].to_numpy(dtype=float))
                fx, fy = np.append(fx, px.max()), np.append(fy, fy[-1])  # the best level holds up to the max cost
                ax.step(fx, fy, where="post", color="0.55", linewidth=6, alpha=0.3, zorder=1,
                        solid_capstyle="round", label="Pareto front (all methods)")
            if not panel.empty:
                ax.set_xscale("log")
                ax.xaxis.set_major_formatter(log_tick_formatter(ax, minor=False, fmt=fmt))
                ax.xaxis.set_minor_formatter(log_tick_formatter(ax, minor=True, fmt=fmt))
            ax.set_title(_facet_title(target, arm, shots, side), fontsize="medium")
            if c == 0:
                ax.set_ylabel("accuracy (%)")
            if panel.empty:
                ax.text(0.5, 0.5, "no successful runs", ha="center", va="center", transform=ax.transAxes)
    add_legend(fig, axes, methods, styles)
    fig.supxlabel(xlabel, fontsize="medium")
    fig.suptitle(title)
    return fig


def _shots_reason(agg: pd.DataFrame) -> str | None:
    """Why accuracy vs shots has nothing to say (fewer than 2 shots values with a result), or None."""
    shots = sorted({int(v) for v in pd.to_numeric(agg["shots"], errors="coerce").dropna()}) \
        if not agg.empty and "shots" in agg.columns else []
    if len(shots) >= 2:
        return None
    return f"one shots value ({shots[0]})" if shots else "no successful runs"


def shots_figure_note(results: pd.DataFrame) -> str | None:
    """The report's one line instead of the accuracy-vs-shots figure when the study's successful rows have
    fewer than two shots values (a line through one point says nothing), else None."""
    reason = _shots_reason(_aggregate_ok(results))
    if reason is None:
        return None
    return f"Accuracy vs shots: no figure, {'the study has ' if reason.startswith('one') else ''}{reason}."


def tightest_budget(agg: pd.DataFrame) -> float | None:
    """The smallest requested budget of the pruning methods (of the controls when no pruning method ran), or
    None when only budget-free methods ran."""
    names = agg["method"].astype(str)
    for pool in (pruning_methods(names), [c for c in BASELINES if c != "dense"]):
        budgets = pd.to_numeric(agg.loc[names.isin(pool), "requested_budget"], errors="coerce").dropna()
        if not budgets.empty:
            return float(budgets.min())
    return None


def _plot_vs_shots(agg: pd.DataFrame, title: str, styles: dict[str, dict[str, Any]]) -> Any:
    """Accuracy against shots at the tightest budget: dense and the references at their own budget, the controls
    and the pruning methods at the study's smallest budget, one line per method (no per-budget spaghetti). One
    panel per target and arm (rows) and, with many methods, per side (columns). Fewer than 2 shots values: a
    panel that says so."""
    reason = _shots_reason(agg)
    if reason is not None:
        return empty_figure(title, f"{reason}: no accuracy-vs-shots figure")
    budget = tightest_budget(agg)
    free = agg["method"].isin(budget_free_methods(agg["method"]))
    at_budget = np.isclose(pd.to_numeric(agg["requested_budget"], errors="coerce"), budget) \
        if budget is not None else np.zeros(len(agg), dtype=bool)
    shown = agg[free | at_budget]
    arms, quals = _layout(shown)
    facets = _facet_rows(shown, arms)
    methods = legend_order(shown["method"])
    shots_values = sorted(shown["shots"].astype(int).unique())
    sides = _side_columns(methods)  # with many methods: one column of panels per side
    pruned = set(pruning_methods(methods))
    fig, axes = new_figure(len(facets), len(sides))
    for r, c in np.ndindex(len(facets), len(sides)):
        (target, arm), side, ax = facets[r], sides[c], axes[r, c]
        panel = _panel_data(shown, target, arm, arms, quals)
        if side is not None:
            panel = panel[[m not in pruned or method_side(m) == side for m in panel["method"].astype(str)]]
        labels = [lab for m in methods for lab in sorted(panel.loc[panel["method"] == m, "_label"].unique())]
        for k, label in enumerate(labels):
            s = panel[panel["_label"] == label].sort_values("shots", kind="mergesort")
            method = str(s["method"].iloc[0])
            style = styles[method]
            variants = sorted(panel.loc[panel["method"] == method, "_label"].unique())
            x = s["shots"].to_numpy(dtype=float) * dodge(k, len(labels), span=0.05)
            ax.errorbar(x, 100 * s["acc_mean"].to_numpy(dtype=float),
                        yerr=100 * np.nan_to_num(s["acc_ci95"].to_numpy(dtype=float)), color=style["color"],
                        marker=style["marker"], markersize=9 if method == "dense" else 6, capsize=3,
                        linestyle=_series_style(style, variants.index(label)), linewidth=1.5, label=label, zorder=3)
        ax.set_xscale("log")
        ax.set_xticks(shots_values, [str(v) for v in shots_values])
        ax.minorticks_off()
        ax.set_xlabel("shots per class")
        if c == 0:
            ax.set_ylabel("accuracy (%)")
        ax.set_title(_facet_title(target, arm, side=side), fontsize="medium")
        if panel.empty:
            ax.text(0.5, 0.5, "no successful runs", ha="center", va="center", transform=ax.transAxes)
    add_legend(fig, axes, methods, styles)
    fig.suptitle(f"{title} at budget {fmt_budget(budget)}" if budget is not None else title)
    return fig


def _plot_budget(results: pd.DataFrame, title: str, styles: dict[str, dict[str, Any]]) -> Any:
    """Requested budget (x) against the achieved params and FLOPs ratios (one panel each), y = x dashed."""
    df = _prepared(results)
    metrics = [m for m in ("params", "flops") if f"{m}_ratio" in df.columns]
    pts = {m: df.assign(_x=pd.to_numeric(df["requested_budget"], errors="coerce"),
                        _y=pd.to_numeric(df[f"{m}_ratio"], errors="coerce")) for m in metrics}
    pts = {m: p[np.isfinite(p["_x"]) & np.isfinite(p["_y"])] for m, p in pts.items()}
    if not metrics or all(p.empty for p in pts.values()):
        return empty_figure(title, "no achieved params or FLOPs recorded")
    methods = legend_order(df["method"])
    budget_metrics = set(df["budget_metric"].astype(str)) if "budget_metric" in df.columns else set()
    fig, axes = new_figure(1, len(metrics), sharey=False, width=4.4, height=3.6)
    for c, metric in enumerate(metrics):
        ax = axes[0, c]
        p = pts[metric]
        ax.plot([0, 1.05], [0, 1.05], color="0.5", linestyle="--", linewidth=1, label="achieved = requested",
                zorder=1)
        for k, m in enumerate(methods):
            s = p[p["method"] == m][["_x", "_y"]].drop_duplicates()
            if s.empty:
                continue
            dx = 0.006 * (k - (len(methods) - 1) / 2)
            ax.scatter(s["_x"] + dx, s["_y"], color=[styles[m]["color"]], marker=styles[m]["marker"],
                       s=60 if m == "dense" else 30, label=m, zorder=3, edgecolors="white", linewidths=0.4)
        ax.set_xlim(0, 1.05)
        ax.set_ylim(0, 1.05)
        ax.set_aspect("equal")
        ax.set_xlabel("requested budget (fraction of dense)")
        suffix = " — the budget metric" if metric in budget_metrics else ""
        ax.set_ylabel(f"achieved {metric} ratio")
        ax.set_title(f"{metric}{suffix}", fontsize="medium")
    add_legend(fig, axes, methods, styles)
    fig.suptitle(title)
    return fig


def _plot_search_cost(results: pd.DataFrame, title: str) -> Any:
    """Search seconds per method (log x); one point per searched network (per budget and
    replicate; per shots for per-episode methods, whose value is the mean per episode)."""
    import seaborn as sns

    df = _prepared(results)
    if "search_seconds" not in df.columns:
        return empty_figure(title, "no search time recorded")
    df = df.assign(_sec=pd.to_numeric(df["search_seconds"], errors="coerce"),
                   _b=pd.to_numeric(df["requested_budget"], errors="coerce"))
    if "search_scope" not in df.columns:
        df["search_scope"] = "once"
    keep = [c for c in ("method", "_b", "replicate", "search_scope", "_sec") if c in df.columns]
    df = df[np.isfinite(df["_sec"])][keep].drop_duplicates()
    if df.empty:
        return empty_figure(title, "no search time recorded")
    methods = legend_order(df["method"])
    budgets = sorted(df["_b"].dropna().unique(), reverse=True)
    palette = dict(zip(budgets, sns.color_palette("crest", max(len(budgets), 1)), strict=False))
    fig, axes = new_figure(1, 1, width=7.0, height=0.28 * len(methods) + 0.9)
    ax = axes[0, 0]
    positive = df[df["_sec"] > 0]
    labels = []
    for i, m in enumerate(methods):
        sub = df[df["method"] == m]
        per_episode = (sub["search_scope"].astype(str) == "per episode").any()
        labels.append(f"{m} (per episode)" if per_episode else m)
        y = len(methods) - 1 - i
        pos = sub[sub["_sec"] > 0]
        for b, g in pos.groupby("_b", sort=True):
            ax.scatter(g["_sec"], np.full(len(g), y), color=[palette.get(b, "0.3")],
                       marker="^" if per_episode else "o", s=36, zorder=3, edgecolors="white", linewidths=0.4,
                       label=f"budget {fmt_budget(b)}")
        if pos.empty:
            ax.annotate("no search (0 s)", xy=(0.01, y), xycoords=("axes fraction", "data"), va="center",
                        fontsize="small", color="0.35")
    if not positive.empty:
        ax.set_xscale("log")
        lo, hi = float(positive["_sec"].min()), float(positive["_sec"].max())
        ax.set_xlim(lo / 6, hi * 2)
    ax.set_yticks(range(len(methods)), list(reversed(labels)))
    ax.set_ylim(-0.7, len(methods) - 0.3)
    ax.set_xlabel("search time (s, log scale; per-episode methods: mean per episode)")
    from matplotlib.lines import Line2D

    found = dict(zip(*reversed(ax.get_legend_handles_labels()), strict=True))
    handles = {f"budget {fmt_budget(b)}": found[f"budget {fmt_budget(b)}"] for b in budgets
               if f"budget {fmt_budget(b)}" in found}
    handles["searched once"] = Line2D([], [], color="0.4", marker="o", linestyle="")
    handles["per episode (mean)"] = Line2D([], [], color="0.4", marker="^", linestyle="")
    fitted_legend(fig, list(handles.values()), list(handles.keys()))
    fig.suptitle(title)
    return fig


def _plot_reinit_gap(gaps: pd.DataFrame, title: str, styles: dict[str, dict[str, Any]]) -> Any:
    """finetune − reinit gap (pp) with its 95% CI, one panel per (target, shots), one row per method@budget."""
    if gaps.empty:
        return empty_figure(title, "no configuration ran under both the finetune and reinit arms")
    facets = sorted({(str(t), int(s)) for t, s in zip(gaps["target"], gaps["shots"], strict=True)})
    multi_target = len({t for t, _ in facets}) > 1
    rows = []
    for m in legend_order(gaps["method"]):
        for b in sorted(gaps.loc[gaps["method"] == m, "requested_budget"].unique(), reverse=True):
            rows.append((m, float(b)))
    fig, axes = new_figure(1, len(facets), width=3.6, height=0.3 * len(rows) + 0.9)
    for c, (target, shots) in enumerate(facets):
        ax = axes[0, c]
        ax.axvline(0, color="0.4", linewidth=1, linestyle="--", zorder=1)
        sub = gaps[(gaps["target"].astype(str) == target) & (gaps["shots"].astype(int) == shots)]
        for i, (m, b) in enumerate(rows):
            hit = sub[(sub["method"] == m) & (np.isclose(sub["requested_budget"].astype(float), b))]
            if hit.empty:
                continue
            y = len(rows) - 1 - i
            ax.errorbar(100 * hit["gap"].to_numpy(dtype=float), [y],
                        xerr=100 * np.nan_to_num(hit["gap_ci"].to_numpy(dtype=float)),
                        color=styles[m]["color"], marker=styles[m]["marker"], capsize=3, linestyle="", zorder=3)
        ax.set_yticks(range(len(rows)), [f"{m} @ {fmt_budget(b)}" for m, b in reversed(rows)])
        ax.set_ylim(-0.7, len(rows) - 0.3)
        ax.set_xlabel("finetune − reinit (pp)")
        ax.set_title(_facet_title(target if multi_target else None, None, shots), fontsize="medium")
    fig.suptitle(title)
    return fig


def make_figures(results: pd.DataFrame, out_dir: Path, episodes: pd.DataFrame | None = None) -> dict[str, Path]:
    """Write the comparison figures as ``{out_dir}/{name}.png`` and return ``{name: path}``.

    Names (:data:`FIGURE_NAMES`, plus :data:`CUDA_FIGURE` when some row has a CUDA latency):
    accuracy against the achieved params ratio, FLOPs ratio and measured CPU latency at batch 1
    (one panel per shots, and per arm when pruned methods ran under several or per target when
    several, and per side with many methods; dense and the controls in every panel; the Pareto front
    of all methods a grey band; styles from :mod:`pruneshot.report.styles`),
    accuracy against shots (at the tightest budget, :func:`_plot_vs_shots`; with fewer than two shots
    values a panel that says so, and the report a line instead), requested vs achieved budget, search
    seconds per method and the finetune − reinit gap (paired over ``episodes`` when given). Only ``status == "ok"`` rows
    with an accuracy are drawn, averaged over replicates; failed rows and missing (NaN) costs
    are left out of the plots (the tables list them). Points of different series are offset
    horizontally by about 3.5% at most so error bars do not hide each other. Rendering uses the
    Agg canvas directly (pyplot's global state is untouched) and PNGs carry no software tag or
    timestamp, so identical data gives identical bytes.
    """
    import matplotlib
    import seaborn as sns

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    agg = _aggregate_ok(results)
    if not agg.empty:
        agg["shots"] = agg["shots"].astype(int)
    styles = method_styles(results["method"].astype(str).tolist() if "method" in results.columns else [])
    cpu = latency_table_columns(agg)
    cpu_col = cpu[0] if cpu else f"{CPU_LATENCY_PREFIX}1"
    cpu_batch = latency_batch(cpu_col)
    builders: dict[str, Callable[[], Any]] = {
        "acc_vs_params": lambda: _plot_vs_cost(agg, "params_ratio", "achieved params / dense params (log scale)",
                                               "Accuracy vs parameters kept", styles),
        "acc_vs_flops": lambda: _plot_vs_cost(agg, "flops_ratio", "achieved FLOPs / dense FLOPs (log scale)",
                                              "Accuracy vs FLOPs kept", styles),
        "acc_vs_latency": lambda: _plot_vs_cost(agg, cpu_col, f"CPU latency, batch {cpu_batch} (ms, log scale)",
                                                "Accuracy vs measured CPU latency", styles),
    }
    cuda = timed_latency_columns(agg, CUDA_LATENCY_RE) if not agg.empty else []
    if cuda:
        batch = latency_batch(cuda[0])
        builders[CUDA_FIGURE] = lambda: _plot_vs_cost(agg, cuda[0], f"CUDA latency, batch {batch} (ms, log scale)",
                                                      "Accuracy vs measured CUDA latency", styles)
    builders.update({
        "acc_vs_shots": lambda: _plot_vs_shots(agg, "Accuracy vs shots", styles),
        "budget_achieved": lambda: _plot_budget(results, "Requested vs achieved budget", styles),
        "search_cost": lambda: _plot_search_cost(results, "Search cost per method"),
        "reinit_gap": lambda: _plot_reinit_gap(reinit_gap_data(results, episodes),
                                               "Inherited weights vs fresh initialisation (finetune − reinit)",
                                               styles),
    })
    paths: dict[str, Path] = {}
    style = {**sns.axes_style("whitegrid"), **sns.plotting_context("notebook", font_scale=0.85)}
    with matplotlib.rc_context({**style, "svg.hashsalt": "pruneshot", "path.simplify": True}):
        for name, build in builders.items():
            fig = build()
            path = out_dir / f"{name}.png"
            save_png(fig, path)
            paths[name] = path
    return paths

