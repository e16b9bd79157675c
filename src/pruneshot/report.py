"""Self-contained HTML report comparing pruning methods on few-shot transfer.

Input is the tidy ``results.csv`` (one row per method x budget x target x shots x arm x
replicate) plus a provenance dict. Output is one HTML file with inline CSS, figures
embedded as base64 PNG ``data:`` URIs and no external resources, so it can be mailed,
archived or attached to a paper as is. The figures are also written as PNG files for
Snakemake's native report.

Determinism: everything derived from the CSV (tables, captions) is byte-identical for the
same CSV; PNGs are written without a ``Software`` tag or timestamps. Only ``generated_utc``
from the provenance dict changes between runs. The tables sit between the HTML comments
``<!-- tables:begin -->`` and ``<!-- tables:end -->``.
"""

from __future__ import annotations

import base64
import html
import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pruneshot.io import atomic_path

FIGURE_DPI = 110
FIGURE_NAMES = ("acc_vs_params", "acc_vs_flops", "acc_vs_shots")
REFERENCE_METHODS = ("dense", "linear_probe")
ALWAYS_SHOWN = ("dense", "random")
TABLES_BEGIN = "<!-- tables:begin -->"
TABLES_END = "<!-- tables:end -->"
MISSING = "—"
NONE_RECORDED = "<p>none recorded</p>"

# Columns that identify one evaluated configuration, apart from the replicate.
_KEY_COLUMNS = (
    "method", "side", "backbone", "source", "target", "ways", "shots", "arm", "budget_metric",
    "requested_budget",
)
# Columns averaged over replicates for plotting.
_MEAN_COLUMNS = (
    "acc_mean", "acc_ci95", "achieved_params", "achieved_flops", "dense_params", "dense_flops",
)
# Columns read as text whatever they look like (a hex id such as "1e5" must not become a float).
_TEXT_COLUMNS = (
    "row_id", "method", "method_source", "side", "backbone", "source", "target", "arm",
    "budget_metric", "latency_device", "latency_dtype", "latency_cuda_device", "search_device", "git_commit",
    "config_sha256", "data_sha256", "checkpoint_sha256", "mlflow_run_id", "status", "error", "search_scope",
)
# mkstemp (behind atomic_path) creates 0600 files; reports are meant to be shared and served.
_FILE_MODE = 0o644
_LATENCY_RE = re.compile(r"^latency_ms_b(\d+)$")
_CUDA_LATENCY_RE = re.compile(r"^latency_cuda_ms_b(\d+)$")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")
_LINESTYLES = ("-", "--", ":", "-.")


# --------------------------------------------------------------------------- data helpers


def load_results(results_csv: Path | str) -> pd.DataFrame:
    """Read ``results.csv`` with identifier/hash/error columns kept as text (empty -> "")."""
    header = pd.read_csv(results_csv, nrows=0).columns
    dtypes = {c: str for c in _TEXT_COLUMNS if c in header}
    df = pd.read_csv(results_csv, dtype=dtypes)
    for col in dtypes:
        df[col] = df[col].fillna("").astype(object)
    return df


def latency_columns(results: pd.DataFrame, pattern: re.Pattern[str] = _LATENCY_RE) -> list[str]:
    """The ``latency_ms_b{N}`` (CPU) columns, or those matching ``pattern`` (e.g. the CUDA ones,
    ``latency_cuda_ms_b{N}``), ordered by batch size N."""
    found = [(int(m.group(1)), c) for c in results.columns if (m := pattern.match(str(c)))]
    return [c for _, c in sorted(found)]


def method_order(methods: Iterable[str]) -> list[str]:
    """dense first, then linear_probe, then every other method by name."""
    unique = sorted({str(m) for m in methods})
    first = [m for m in REFERENCE_METHODS if m in unique]
    return first + [m for m in unique if m not in REFERENCE_METHODS]


def _prepared(results: pd.DataFrame) -> pd.DataFrame:
    """A copy with defaults for optional columns and a boolean ``_ok`` column."""
    df = results.copy()
    if "status" not in df.columns:
        df["status"] = "ok"
    if "error" not in df.columns:
        df["error"] = ""
    for col in _TEXT_COLUMNS:
        if col in df.columns:
            df[col] = df[col].fillna("").astype(str).astype(object)
    acc = pd.to_numeric(df.get("acc_mean"), errors="coerce")
    df["_ok"] = (df["status"] == "ok") & np.isfinite(acc.to_numpy(dtype=float))
    return df


def _sort_rank(df: pd.DataFrame) -> pd.Series:
    order = {m: i for i, m in enumerate(method_order(df["method"]))}
    return df["method"].map(order)


def _sorted(df: pd.DataFrame, extra: Sequence[str] = ()) -> pd.DataFrame:
    """Sort by method order, descending budget, then the ``extra`` columns ascending."""
    out = df.assign(_rank=_sort_rank(df), _budget=-pd.to_numeric(df["requested_budget"], errors="coerce"))
    by = ["_rank", "_budget", *[c for c in extra if c in out.columns]]
    return out.sort_values(by, kind="mergesort").drop(columns=["_rank", "_budget"]).reset_index(drop=True)


def _aggregate_ok(results: pd.DataFrame) -> pd.DataFrame:
    """Successful rows averaged over replicates (one row per configuration)."""
    df = _prepared(results)
    df = df[df["_ok"]]
    keys = [c for c in _KEY_COLUMNS if c in df.columns]
    means = [c for c in _MEAN_COLUMNS if c in df.columns]
    if df.empty:
        return pd.DataFrame(columns=[*keys, *means, "n_replicates"])
    for c in means:
        df[c] = pd.to_numeric(df[c], errors="coerce")
    grouped = df.groupby(keys, dropna=False, sort=True)
    out = grouped[means].mean()
    out["n_replicates"] = grouped.size()
    return out.reset_index()


def _varying(df: pd.DataFrame, col: str) -> bool:
    return col in df.columns and df[col].nunique(dropna=False) > 1


def _fmt_budget(value: Any) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    return MISSING if math.isnan(v) else f"{v:.3g}"


def _fmt_num(value: Any, spec: str) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return MISSING if value is None or value == "" else str(value)
    return MISSING if math.isnan(v) else format(v, spec)


def _fmt_acc(mean: float, ci: float) -> str:
    """Format fractions as percent text: 0.834, 0.012 -> "83.4 ± 1.2"."""
    ci_txt = MISSING if ci is None or not math.isfinite(ci) else f"{100 * ci:.1f}"
    return f"{100 * mean:.1f} ± {ci_txt}"


# --------------------------------------------------------------------------- tables


def summary_table(results: pd.DataFrame) -> pd.DataFrame:
    """Accuracy as "mean ± CI" in %, one row per (method, requested_budget, target, arm).

    Columns: ``method``, ``requested_budget``, ``target``, ``arm`` (plus ``side`` /
    ``budget_metric`` only when they vary within such a row), then one text column per
    shots value named ``"{shots}-shot"`` in increasing order. Replicates are averaged
    (mean of ``acc_mean`` and of ``acc_ci95``); a cell where every run failed reads
    ``"failed"``, one where only some failed gets a ``" (k/n failed)"`` suffix, and a
    combination never run reads ``"—"``. Rows: dense, linear_probe, then other methods by
    name, each by descending budget.
    """
    df = _prepared(results)
    keys = [c for c in ("method", "requested_budget", "target", "arm") if c in df.columns]
    for extra in ("side", "budget_metric"):
        if extra in df.columns and (df.groupby(keys, dropna=False)[extra].nunique(dropna=False) > 1).any():
            keys.append(extra)
    shots_values = sorted(pd.to_numeric(df["shots"], errors="coerce").dropna().astype(int).unique())
    shot_cols = [f"{s}-shot" for s in shots_values]
    if df.empty:
        return pd.DataFrame(columns=[*keys, *shot_cols])

    df["shots"] = pd.to_numeric(df["shots"], errors="coerce")
    df["acc_mean"] = pd.to_numeric(df["acc_mean"], errors="coerce")
    df["acc_ci95"] = pd.to_numeric(df.get("acc_ci95"), errors="coerce")
    records = []
    for key, group in df.groupby(keys, dropna=False, sort=False):
        record = dict(zip(keys, key, strict=True))
        for s, col in zip(shots_values, shot_cols, strict=True):
            cell = group[group["shots"] == s]
            ok = cell[cell["_ok"]]
            n_bad = len(cell) - len(ok)
            if cell.empty:
                record[col] = MISSING
            elif ok.empty:
                record[col] = "failed"
            else:
                text = _fmt_acc(float(ok["acc_mean"].mean()), float(ok["acc_ci95"].mean()))
                record[col] = text + (f" ({n_bad}/{len(cell)} failed)" if n_bad else "")
        records.append(record)
    table = pd.DataFrame.from_records(records, columns=[*keys, *shot_cols])
    return _sorted(table, extra=[k for k in keys if k not in ("method", "requested_budget")])


def detail_table(results: pd.DataFrame) -> pd.DataFrame:
    """Per-row cost detail as display text: budget requested vs achieved ratios, latency, search time.

    One row per results row (failed ones included), sorted like :func:`summary_table`
    then by shots and replicate.
    """
    df = _prepared(results)
    lat = latency_columns(df)
    context = [c for c in ("side", "target", "arm", "shots", "replicate", "budget_metric") if c in df.columns]
    if "side" in context and not _varying(df, "side"):
        context.remove("side")
    df = _sorted(df, extra=[c for c in ("target", "arm", "side", "shots", "replicate") if c in df.columns])
    out = pd.DataFrame({"method": df["method"]})
    for c in context:
        if c in ("shots", "replicate"):
            out[c] = df[c].map(lambda v: _fmt_num(v, ".0f"))
        else:
            out[c] = df[c].astype(str)
    out["requested"] = df["requested_budget"].map(_fmt_budget)
    out["params ratio"] = df.get("params_ratio", pd.Series(np.nan, index=df.index)).map(
        lambda v: _fmt_num(v, ".3f")
    )
    out["flops ratio"] = df.get("flops_ratio", pd.Series(np.nan, index=df.index)).map(
        lambda v: _fmt_num(v, ".3f")
    )
    if "budget_gap" in df.columns:
        out["gap"] = df["budget_gap"].map(lambda v: _fmt_num(v, "+.3f"))
    for c in lat:
        batch = _LATENCY_RE.match(c).group(1)  # type: ignore[union-attr]
        out[f"latency ms (b={batch})"] = df[c].map(lambda v: _fmt_num(v, ".3f"))
    if "latency_device" in df.columns:
        out["latency device"] = df["latency_device"].astype(str)
    # CUDA timings only where some row has them (a CPU-only run leaves these columns empty)
    cuda_lat = [c for c in latency_columns(df, _CUDA_LATENCY_RE) if pd.to_numeric(df[c], errors="coerce").notna().any()]
    for c in cuda_lat:
        batch = _CUDA_LATENCY_RE.match(c).group(1)  # type: ignore[union-attr]
        out[f"cuda latency ms (b={batch})"] = df[c].map(lambda v: _fmt_num(v, ".3f"))
    if cuda_lat and "latency_cuda_device" in df.columns:
        out["cuda device"] = df["latency_cuda_device"].astype(str)
    if "search_seconds" in df.columns:
        out["search s"] = df["search_seconds"].map(lambda v: _fmt_num(v, ".2f"))
    if "search_scope" in df.columns:
        out["search scope"] = df["search_scope"].astype(str)
    out["acc %"] = [
        _fmt_num(100 * float(a), ".1f") if ok else "failed"
        for a, ok in zip(pd.to_numeric(df["acc_mean"], errors="coerce"), df["_ok"], strict=True)
    ]
    out["status"] = df["status"].astype(str)
    out["row_id"] = df["row_id"].astype(str) if "row_id" in df.columns else ""
    return out


def methods_table(results: pd.DataFrame) -> pd.DataFrame:
    """One row per method: its side, where the algorithm comes from and, for target-side methods,
    that the search runs per episode. Reconstructions are named as such."""
    df = _prepared(results)
    cols = ["method", "side", "source", "search"]
    if df.empty:
        return pd.DataFrame(columns=cols)
    rows = []
    for method in method_order(df["method"]):
        sub = df[df["method"] == method]
        side = ", ".join(sorted(set(sub["side"].astype(str)))) if "side" in sub.columns else MISSING
        source = ", ".join(sorted(set(sub["method_source"].astype(str)))) if "method_source" in sub.columns \
            else MISSING
        scope = ", ".join(sorted(set(sub["search_scope"].astype(str)))) if "search_scope" in sub.columns \
            else MISSING
        search = {"once": "once on the source data", "per episode": "per episode, on its support set"}.get(
            scope, scope)
        rows.append({"method": method, "side": side or MISSING, "source": source or MISSING, "search": search})
    return pd.DataFrame(rows, columns=cols)


def reinit_gap_table(results: pd.DataFrame) -> pd.DataFrame:
    """finetune minus reinit accuracy (percentage points) for every configuration run under both arms.

    Same architecture, same episodes, same optimiser and steps; only the starting weights differ
    (inherited from the source vs freshly initialised). A positive gap means the inherited weights
    help; DAP claims the architecture alone transfers (gap near 0). The ± is the unpaired
    sqrt(ci_f^2 + ci_r^2) half-width (conservative; the per-episode pairing is in episodes.csv).
    """
    agg = _aggregate_ok(results)
    cols = ["method", "budget", "target", "shots", "finetune %", "reinit %", "gap (pp)"]
    if agg.empty or "arm" not in agg.columns:
        return pd.DataFrame(columns=cols)
    keys = [c for c in ("method", "requested_budget", "target", "shots", "replicate") if c in agg.columns]
    ft = agg[agg["arm"] == "finetune"].set_index(keys)
    ri = agg[agg["arm"] == "reinit"].set_index(keys)
    both = ft.index.intersection(ri.index)
    rows = []
    for key in both:
        f, r = ft.loc[key], ri.loc[key]
        rec = dict(zip(keys, key if isinstance(key, tuple) else (key,), strict=True))
        gap = float(f["acc_mean"]) - float(r["acc_mean"])
        ci = math.sqrt(float(f["acc_ci95"]) ** 2 + float(r["acc_ci95"]) ** 2)
        rows.append({
            "method": rec["method"], "requested_budget": rec["requested_budget"], "target": rec.get("target", ""),
            "shots": _fmt_num(rec.get("shots"), ".0f"),
            "finetune %": _fmt_acc(float(f["acc_mean"]), float(f["acc_ci95"])),
            "reinit %": _fmt_acc(float(r["acc_mean"]), float(r["acc_ci95"])),
            "gap (pp)": f"{100 * gap:+.1f} ± {100 * ci:.1f}",
        })
    if not rows:
        return pd.DataFrame(columns=cols)
    out = _sorted(pd.DataFrame(rows), extra=["target", "shots"])
    out["requested_budget"] = out["requested_budget"].map(_fmt_budget)
    return out.rename(columns={"requested_budget": "budget"})[cols]


def failures_table(results: pd.DataFrame) -> pd.DataFrame:
    """Rows that did not produce an accuracy, with their error text."""
    df = _prepared(results)
    bad = df[~df["_ok"]]
    if bad.empty:
        return pd.DataFrame(columns=["row_id", "method", "requested", "target", "arm", "shots", "error"])
    bad = _sorted(bad, extra=[c for c in ("target", "arm", "shots", "replicate") if c in bad.columns])
    out = pd.DataFrame({
        "row_id": bad["row_id"].astype(str) if "row_id" in bad.columns else "",
        "method": bad["method"],
        "requested": bad["requested_budget"].map(_fmt_budget),
    })
    for c in ("target", "arm", "shots", "replicate"):
        if c in bad.columns:
            out[c] = bad[c].astype(str)
    out["status"] = bad["status"].astype(str)
    out["error"] = [e if e else "(no error message; accuracy missing)" for e in bad["error"].astype(str)]
    return out


# --------------------------------------------------------------------------- figures


def _series_label(row: pd.Series, qualifiers: Sequence[str]) -> str:
    """``method`` or e.g. ``l1_filter [side=target]`` when the method varies in that column."""
    quals = [f"{c}={row[c]}" for c in qualifiers]
    return str(row["method"]) + (f" [{', '.join(quals)}]" if quals else "")


def _method_styles(methods: Sequence[str]) -> dict[str, dict[str, Any]]:
    import seaborn as sns

    others = [m for m in methods if m != "dense"]
    palette = sns.color_palette("colorblind", max(len(others), 1))
    styles: dict[str, dict[str, Any]] = {"dense": {"color": (0.15, 0.15, 0.15), "marker": "*"}}
    for i, m in enumerate(others):
        styles[m] = {"color": palette[i % len(palette)], "marker": _MARKERS[i % len(_MARKERS)]}
    return styles


def _layout(agg: pd.DataFrame) -> tuple[list[str], dict[str, list[str]]]:
    """(arms that get their own panel row, per-method qualifier columns for series labels)."""
    arms: list[str] = []
    if "arm" in agg.columns:
        pruned = agg[~agg["method"].isin(REFERENCE_METHODS)]
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
        # Reference runs made only under an arm no pruned method uses are drawn in every panel.
        shared = pool["method"].isin(REFERENCE_METHODS) & ~pool["arm"].astype(str).isin(arms)
        sel = pool[(pool["arm"].astype(str) == arm) | shared]
    sel = _labelled(sel, quals)
    if arm is not None:
        # dense and random appear in every panel: borrow them from another arm when this one lacks them.
        for method in ALWAYS_SHOWN:
            borrowed = pool[pool["method"] == method]
            if not borrowed.empty and not (sel["method"] == method).any():
                sel = pd.concat([sel, _labelled(borrowed, quals, extra=["arm"])])
    return sel


def _dodge(k: int, n: int, step: float = 0.012) -> float:
    """Multiplicative horizontal offset on a log axis so overlapping error bars stay apart."""
    return float(10 ** (step * (k - (n - 1) / 2)))


def _facet_title(target: str | None, arm: str | None, shots: int | None = None) -> str:
    parts = [f"{shots}-shot"] if shots is not None else []
    parts += [p for p in (target, arm) if p is not None]
    return " · ".join(parts)


def _new_figure(nrows: int, ncols: int) -> tuple[Any, np.ndarray]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1.0 + 4.0 * ncols, 0.6 + 3.1 * nrows), dpi=FIGURE_DPI, layout="constrained")
    axes = fig.subplots(nrows, ncols, sharey=True, squeeze=False)
    return fig, axes


def _add_legend(fig: Any, axes: np.ndarray, methods: Sequence[str]) -> None:
    """One legend for the figure, outside the panels, ordered by method then first appearance."""
    handles: dict[str, Any] = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(lab, h)
    rank = {m: i for i, m in enumerate(methods)}
    first_seen = {lab: i for i, lab in enumerate(handles)}
    ordered = sorted(handles, key=lambda lab: (rank.get(lab.split(" ", 1)[0], len(rank)), first_seen[lab]))
    handles = {lab: handles[lab] for lab in ordered}
    if handles:
        fig.legend(list(handles.values()), list(handles.keys()), loc="outside right upper", frameon=False,
                   fontsize="small")


def _save(fig: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=FIGURE_DPI, metadata={"Software": None})
        os.chmod(tmp, _FILE_MODE)


def _empty_figure(title: str) -> Any:
    fig, axes = _new_figure(1, 1)
    ax = axes[0, 0]
    ax.text(0.5, 0.5, "no successful runs to plot", ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()
    fig.suptitle(title)
    return fig


def _log_tick_formatter(ax: Any, minor: bool) -> Any:
    """Plain "30k"/"1.2M" tick labels; minor ticks labelled at 2x, 3x, 5x only on narrow ranges."""
    from matplotlib.ticker import EngFormatter, FuncFormatter

    eng = EngFormatter(sep="")

    def fmt(x: float, _pos: Any) -> str:
        if x <= 0:
            return ""
        if minor:
            lo, hi = ax.get_xlim()
            mantissa = round(x / 10 ** math.floor(math.log10(x)), 6)
            if lo <= 0 or math.log10(hi / lo) > 1.5 or mantissa not in (2.0, 3.0, 5.0):
                return ""
        return eng.format_eng(x)

    return FuncFormatter(fmt)


def _plot_vs_cost(agg: pd.DataFrame, cost: str, xlabel: str, title: str) -> Any:
    if agg.empty or cost not in agg.columns:
        return _empty_figure(title)
    arms, quals = _layout(agg)
    facets = _facet_rows(agg, arms)
    shots_values = sorted(agg["shots"].astype(int).unique())
    methods = method_order(agg["method"])
    styles = _method_styles(methods)
    fig, axes = _new_figure(len(facets), len(shots_values))
    for r, (target, arm) in enumerate(facets):
        for c, shots in enumerate(shots_values):
            ax = axes[r, c]
            panel = _panel_data(agg[agg["shots"].astype(int) == shots], target, arm, arms, quals)
            labels = [
                lab for m in methods for lab in sorted(panel.loc[panel["method"] == m, "_label"].unique())
            ]
            for k, label in enumerate(labels):
                s = panel[panel["_label"] == label].sort_values("requested_budget", kind="mergesort")
                method = str(s["method"].iloc[0])
                style = styles[method]
                x = s[cost].to_numpy(dtype=float) * _dodge(k, len(labels))
                y = 100 * s["acc_mean"].to_numpy(dtype=float)
                yerr = 100 * s["acc_ci95"].to_numpy(dtype=float)
                ls = _LINESTYLES[sorted(panel.loc[panel["method"] == method, "_label"].unique()).index(label)
                                 % len(_LINESTYLES)]
                ax.errorbar(x, y, yerr=yerr, color=style["color"], marker=style["marker"], linestyle=ls,
                            markersize=9 if method == "dense" else 6, capsize=3, linewidth=1.5, label=label,
                            zorder=3)
                if method == "dense":
                    for yy in y:
                        ax.axhline(yy, color=style["color"], linestyle="--", linewidth=1, alpha=0.6, zorder=1)
            if (panel[cost] > 0).all() and not panel.empty:
                ax.set_xscale("log")
                ax.xaxis.set_major_formatter(_log_tick_formatter(ax, minor=False))
                ax.xaxis.set_minor_formatter(_log_tick_formatter(ax, minor=True))
            ax.set_title(_facet_title(target, arm, shots), fontsize="medium")
            ax.set_xlabel(xlabel)
            if c == 0:
                ax.set_ylabel("accuracy (%)")
            if panel.empty:
                ax.text(0.5, 0.5, "no successful runs", ha="center", va="center", transform=ax.transAxes)
    _add_legend(fig, axes, methods)
    fig.suptitle(title)
    return fig


def _plot_vs_shots(agg: pd.DataFrame, title: str) -> Any:
    if agg.empty:
        return _empty_figure(title)
    import seaborn as sns

    arms, quals = _layout(agg)
    facets = _facet_rows(agg, arms)
    methods = method_order(agg["method"])
    styles = _method_styles(methods)
    shots_values = sorted(agg["shots"].astype(int).unique())
    fig, axes = _new_figure(1, len(facets))
    for c, (target, arm) in enumerate(facets):
        ax = axes[0, c]
        panel = _panel_data(agg, target, arm, arms, quals)
        series: list[tuple[str, float, str]] = []
        for m in methods:
            sub = panel[panel["method"] == m]
            pairs = sub[["requested_budget", "_label"]].drop_duplicates()
            pairs = pairs.sort_values(
                ["requested_budget", "_label"], ascending=[False, True], kind="mergesort"
            )
            series += [(m, float(b), lab) for b, lab in pairs.itertuples(index=False)]
        for k, (m, budget, label) in enumerate(series):
            s = panel[(panel["_label"] == label) & (panel["requested_budget"] == budget)].sort_values("shots")
            n_budgets = sum(1 for mm, _, ll in series if mm == m and ll == label)
            rank = sum(1 for mm, bb, ll in series if mm == m and ll == label and bb > budget)
            # Larger budgets darker, smaller budgets lighter shades of the method's colour.
            shades = sns.light_palette(styles[m]["color"], n_colors=n_budgets + 2, reverse=True)
            variants = sorted({ll for mm, _, ll in series if mm == m})
            x = s["shots"].to_numpy(dtype=float) * _dodge(k, len(series), step=0.01)
            ax.errorbar(x, 100 * s["acc_mean"].to_numpy(dtype=float),
                        yerr=100 * s["acc_ci95"].to_numpy(dtype=float), color=shades[rank],
                        marker=styles[m]["marker"], markersize=9 if m == "dense" else 6, capsize=3,
                        linestyle=_LINESTYLES[variants.index(label) % len(_LINESTYLES)],
                        linewidth=1.5, label=f"{label} @ {_fmt_budget(budget)}", zorder=3)
        ax.set_xscale("log")
        ax.set_xticks(shots_values, [str(s) for s in shots_values])
        ax.minorticks_off()
        ax.set_xlabel("shots per class")
        if c == 0:
            ax.set_ylabel("accuracy (%)")
        ax.set_title(_facet_title(target, arm), fontsize="medium")
    _add_legend(fig, axes, methods)
    fig.suptitle(title)
    return fig


def make_figures(results: pd.DataFrame, out_dir: Path) -> dict[str, Path]:
    """Write the comparison figures as ``{out_dir}/{name}.png`` and return ``{name: path}``.

    Names: ``acc_vs_params``, ``acc_vs_flops`` (one panel per shots, and per arm when pruned
    methods ran under several arms or per target when several), ``acc_vs_shots``. Only
    ``status == "ok"`` rows with an accuracy are drawn, averaged over replicates. Points of
    different series are offset horizontally by about 3% at most so error bars do not hide
    each other. Rendering uses the Agg canvas directly (pyplot's global state is untouched)
    and PNGs carry no software tag or timestamp, so identical data gives identical bytes.
    """
    import matplotlib
    import seaborn as sns

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    agg = _aggregate_ok(results)
    if not agg.empty:
        agg["shots"] = agg["shots"].astype(int)
    builders = {
        "acc_vs_params": lambda: _plot_vs_cost(agg, "achieved_params", "achieved parameters (log scale)",
                                               "Accuracy vs parameters kept"),
        "acc_vs_flops": lambda: _plot_vs_cost(agg, "achieved_flops", "achieved FLOPs (log scale)",
                                              "Accuracy vs FLOPs kept"),
        "acc_vs_shots": lambda: _plot_vs_shots(agg, "Accuracy vs shots"),
    }
    paths: dict[str, Path] = {}
    style = {**sns.axes_style("whitegrid"), **sns.plotting_context("notebook", font_scale=0.85)}
    with matplotlib.rc_context({**style, "svg.hashsalt": "pruneshot", "path.simplify": True}):
        for name, build in builders.items():
            fig = build()
            path = out_dir / f"{name}.png"
            _save(fig, path)
            paths[name] = path
    return paths


# --------------------------------------------------------------------------- HTML

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2rem auto;
       max-width: 1200px; padding: 0 1rem; color: #1b1b1b; line-height: 1.45; }
h1 { margin-bottom: 0.2rem; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2rem; margin-top: 2rem; }
.meta { color: #555; margin-top: 0; }
figure { margin: 1rem 0 2rem; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #444; font-size: 0.9rem; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 0.85rem; margin: 0.5rem 0 1rem; }
th, td { border: 1px solid #d6d6d6; padding: 0.25rem 0.5rem; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } tbody tr:nth-child(even) { background: #fafafa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.failed { color: #a40000; font-weight: 600; }
code, .mono { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; font-size: 0.85em; }
pre.error { white-space: pre-wrap; margin: 0; max-width: 60ch; }
"""

_NUMERIC_RE = re.compile(r"^[-+]?\d[\d.,eE+-]*( ± [\d.]+| ± —)?( \(\d+/\d+ failed\))?$")


def _esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _cell(value: Any, column: str) -> str:
    text = str(value)
    if column == "error":
        return f'<td><pre class="error">{_esc(text)}</pre></td>'
    if text == "failed":
        return '<td class="failed">failed</td>'
    if column in ("row_id", "mlflow_run_id") or column.endswith("sha256"):
        return f'<td class="mono">{_esc(text)}</td>'
    if _NUMERIC_RE.match(text):
        return f'<td class="num">{_esc(text)}</td>'
    return f"<td>{_esc(text)}</td>"


def _html_table(df: pd.DataFrame, table_id: str) -> str:
    head = "".join(f"<th>{_esc(c)}</th>" for c in df.columns)
    body = []
    for row in df.itertuples(index=False):
        cells = "".join(_cell(v, str(c)) for v, c in zip(row, df.columns, strict=True))
        body.append(f"<tr>{cells}</tr>")
    return (f'<div class="scroll"><table id="{_esc(table_id)}">\n<thead><tr>{head}</tr></thead>\n<tbody>\n'
            + "\n".join(body) + "\n</tbody></table></div>")


def _kv_table(items: Iterable[tuple[str, Any]], table_id: str, mono_values: bool = False) -> str:
    cls = ' class="mono"' if mono_values else ""
    rows = "\n".join(f"<tr><th>{_esc(k)}</th><td{cls}>{_esc(v)}</td></tr>" for k, v in items)
    return f'<div class="scroll"><table id="{_esc(table_id)}">\n<tbody>\n{rows}\n</tbody></table></div>'


def _achieved_text(results: pd.DataFrame) -> dict[tuple[str, str], str]:
    """(method, formatted budget) -> achieved ratio on the budget metric (mean over rows; a range
    when rows differ, as for target-side methods whose cost differs per shots)."""
    df = _prepared(results)
    out: dict[tuple[str, str], str] = {}
    if "budget_metric" not in df.columns:
        return out
    for (method, budget), g in df.groupby(["method", "requested_budget"], sort=False):
        vals = [float(r[f"{r['budget_metric']}_ratio"]) for _, r in g.iterrows()
                if f"{r['budget_metric']}_ratio" in g.columns]
        vals = [v for v in vals if math.isfinite(v)]
        if not vals:
            continue
        lo, hi = min(vals), max(vals)
        out[str(method), _fmt_budget(budget)] = f"{lo:.3f}" if hi - lo < 5e-4 else f"{lo:.3f}–{hi:.3f}"
    return out


def _summary_for_html(results: pd.DataFrame) -> pd.DataFrame:
    table = summary_table(results)
    table = table.assign(requested_budget=table["requested_budget"].map(_fmt_budget)).rename(
        columns={"requested_budget": "budget"}
    )
    achieved = _achieved_text(results)
    if achieved:
        table.insert(table.columns.get_loc("budget") + 1, "achieved",
                     [achieved.get((m, b), MISSING) for m, b in zip(table["method"], table["budget"], strict=True)])
    meta = methods_table(results).set_index("method")
    if not meta.empty:
        table.insert(1, "source", table["method"].map(meta["source"]).fillna(MISSING))
        if "side" not in table.columns:
            table.insert(2, "side", table["method"].map(meta["side"]).fillna(MISSING))
    return table


def _how_to_read(results: pd.DataFrame) -> str:
    df = _prepared(results)
    episodes = sorted({int(v) for v in pd.to_numeric(df.get("n_episodes"), errors="coerce").dropna()})
    ep_txt = "/".join(str(e) for e in episodes) if episodes else "the"
    metrics = sorted(df["budget_metric"].astype(str).unique()) if "budget_metric" in df.columns else []
    metric_txt = f" Budgets in this study were set on {_esc(' and '.join(metrics))}." if metrics else ""
    return (
        "<p>Accuracy is the mean query accuracy over the "
        f"{_esc(ep_txt)} few-shot episodes that every method shares (same support and query sets), "
        "shown in %. The 95% confidence interval is the half-width 1.96&nbsp;·&nbsp;std&nbsp;/&nbsp;√n over "
        "those n episodes and is drawn as vertical error bars. A budget is the fraction of the dense "
        "network's parameters (or FLOPs) that pruning was asked to keep; the achieved ratio can differ "
        "slightly and is listed in the detail table."
        f"{metric_txt} <em>dense</em> is the unpruned network (budget 1, dashed reference line) and "
        "<em>linear_probe</em> trains only a new head on the frozen dense backbone. When a run was "
        "replicated, plotted and tabulated values are means over replicates.</p>"
    )


def _figures_html(figures: dict[str, Path]) -> str:
    captions = {
        "acc_vs_params": "Accuracy against achieved parameter count (log scale); one panel per shots "
                         "value, target and (where pruned methods ran under several) arm.",
        "acc_vs_flops": "Accuracy against achieved FLOPs (log scale); one panel per shots value, target "
                        "and (where pruned methods ran under several) arm.",
        "acc_vs_shots": "Accuracy against shots per class; one line per method and budget "
                        "(darker = larger budget).",
    }
    parts = []
    for name, path in figures.items():
        data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
        caption = captions.get(name, name) + " Error bars: 95% CI; points are offset slightly sideways for "\
            "legibility."
        parts.append(
            f'<figure id="fig-{_esc(name)}"><img alt="{_esc(name)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{_esc(caption)}</figcaption></figure>"
        )
    return "\n".join(parts)


def _provenance_html(prov: dict[str, Any]) -> str:
    def get(key: str) -> Any:
        value = prov.get(key)
        return "unknown" if value is None or value == "" else value

    dirty = prov.get("git_dirty")
    dirty_txt = "unknown" if dirty is None else ("yes (uncommitted changes)" if dirty else "no")
    mlflow = prov.get("mlflow") or {}
    general = [
        ("study", get("study")),
        ("git commit", get("git_commit")),
        ("working tree dirty", dirty_txt),
        ("config sha256", get("config_sha256")),
        ("generated (UTC)", get("generated_utc")),
        ("MLflow tracking URI", mlflow.get("tracking_uri") or "unknown"),
        ("MLflow experiment",
         f"{mlflow.get('experiment_name') or 'unknown'} (id {mlflow.get('experiment_id') or 'unknown'})"),
        ("MLflow parent run", mlflow.get("parent_run_id") or "unknown"),
    ]
    data_hashes = sorted((prov.get("data_sha256") or {}).items())
    packages = sorted((prov.get("packages") or {}).items())
    devices = prov.get("devices") or []
    device_list = "".join(f"<li>{_esc(d)}</li>" for d in devices) or "<li>unknown</li>"
    return (
        _kv_table(general, "provenance-general")
        + "\n<h3>Dataset hashes (sha256)</h3>\n"
        + (_kv_table(data_hashes, "provenance-data", mono_values=True) if data_hashes else NONE_RECORDED)
        + "\n<h3>Packages</h3>\n"
        + (_kv_table(packages, "provenance-packages") if packages else NONE_RECORDED)
        + f"\n<h3>Devices</h3>\n<ul>{device_list}</ul>"
    )


def _tables_html(results: pd.DataFrame) -> str:
    """Everything derived from the CSV alone; byte-identical for identical input."""
    summary = _summary_for_html(results)
    detail = detail_table(results)
    failures = failures_table(results)
    prepared = _prepared(results)
    n_ok = int(prepared["_ok"].sum())
    n_bad = len(prepared) - n_ok
    fail_html = (
        _html_table(failures, "failures-table") if not failures.empty else '<p id="failures-none">none</p>'
    )
    methods = methods_table(results)
    gaps = reinit_gap_table(results)
    gap_html = _html_table(gaps, "reinit-gap-table") if not gaps.empty else \
        '<p id="reinit-gap-none">no configuration ran under both the finetune and reinit arms</p>'
    return "\n".join([
        TABLES_BEGIN,
        '<section id="methods"><h2>Methods</h2>',
        "<p>Where each method comes from: <em>official code</em> follows the authors' released code, "
        "<em>abstract-level</em> follows what the paper's abstract (or patent) forces with the unstated "
        "choices filled in as documented options, <em>reconstruction</em> is our reconstruction from the "
        "abstract alone (no code exists): read those rows as such. Source-side methods search once on the "
        "source data and hand one architecture to every episode; target-side methods prune each episode's "
        "network on its support set.</p>",
        _html_table(methods, "methods-table"),
        "</section>",
        '<section id="summary"><h2>Summary: accuracy (%) by shots</h2>',
        "<p>Mean ± 95% CI half-width, in percentage points. <em>budget</em> is the requested fraction of the "
        "dense network's cost, <em>achieved</em> the fraction the physically pruned network has (a range "
        "where rows differ, e.g. per-episode pruning).</p>",
        _html_table(summary, "summary-table"),
        "</section>",
        '<section id="reinit-gap"><h2>Inherited weights vs fresh initialisation</h2>',
        "<p>Source-side methods, same architecture and episodes: <em>finetune</em> starts from the source "
        "weights of the kept channels, <em>reinit</em> from a fresh seeded initialisation. Gap = finetune − "
        "reinit in percentage points ± the unpaired combined 95% CI half-width.</p>",
        gap_html,
        "</section>",
        '<section id="details"><h2>Detail: cost of each run</h2>',
        "<p>Requested budget against the achieved fraction of dense parameters and FLOPs, median latency "
        "per batch (ms, batch size b; on the CPU and, where one was present, on CUDA), time spent searching "
        "for the pruned network, and the row_id that "
        "identifies the row in results.csv.</p>",
        _html_table(detail, "detail-table"),
        "</section>",
        f'<section id="failures"><h2>Failures</h2><p>{n_ok} run(s) ok, {n_bad} failed.</p>',
        fail_html,
        "</section>",
        TABLES_END,
    ])


def render_html(results: pd.DataFrame, provenance: dict[str, Any], figures: dict[str, Path]) -> str:
    """The report as an HTML string (see :func:`build_report`)."""
    study = provenance.get("study") or "unnamed study"
    commit = str(provenance.get("git_commit") or "unknown")
    dirty = " (dirty)" if provenance.get("git_dirty") else ""
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>pruneshot report: {_esc(study)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        f"<h1>pruneshot report: {_esc(study)}</h1>",
        f'<p class="meta">Pruning methods compared on few-shot transfer · commit <code>{_esc(commit[:12])}'
        f"</code>{_esc(dirty)} · generated (UTC) {_esc(provenance.get('generated_utc') or 'unknown')}</p>",
        '<section id="how-to-read"><h2>How to read this report</h2>',
        _how_to_read(results),
        "</section>",
        '<section id="figures"><h2>Figures</h2>',
        _figures_html(figures),
        "</section>",
        _tables_html(results),
        '<section id="provenance"><h2>Provenance</h2>',
        _provenance_html(provenance),
        "</section>",
        "</body>",
        "</html>",
        "",
    ])


def build_report(results_csv: Path, provenance: dict, out_html: Path, figures_dir: Path) -> None:
    """Write a self-contained HTML report for ``results_csv`` to ``out_html`` (atomically).

    Figures are written to ``figures_dir`` (``{name}.png``, for Snakemake's report) and
    embedded as base64 ``data:`` URIs; CSS is inline; no scripts or external resources.
    All text is HTML-escaped. Sections: how to read, figures, summary table, detail table,
    failures, provenance (git commit and dirty flag, config hash, dataset hashes, packages,
    devices, MLflow tracking URI / experiment / parent run).
    """
    results = load_results(results_csv)
    figures = make_figures(results, Path(figures_dir))
    text = render_html(results, provenance, figures)
    with atomic_path(out_html) as tmp:
        tmp.write_text(text, encoding="utf-8")
        os.chmod(tmp, _FILE_MODE)
