"""The report's tables as display text (pandas frames of strings), and the statistics behind them.

Accuracies and ratios arrive as fractions; the tables show accuracy and differences in percent /
percentage points. A missing value reads "—", a cell where every run failed "failed".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from pruneshot.config import budget_value
from pruneshot.report import stats
from pruneshot.report.formatting import MISSING, finite, fmt_acc, fmt_budget, fmt_num, fmt_p, shots_key, truthy
from pruneshot.report.load import (
    CUDA_LATENCY_RE,
    _prepared,
    _sorted,
    _varying,
    latency_batch,
    latency_table_columns,
    method_order,
    timed_latency_columns,
)

#: Paired comparisons are made against these methods (:data:`stats.BASELINES`), one column each.
BASELINES = stats.BASELINES
ALPHA = 0.05
UP, DOWN = "▲", "▼"


# --------------------------------------------------------------------------- statistics


@dataclass
class Statistics:
    """The :mod:`pruneshot.report.stats` tables behind the report's marks and ranks."""

    comparisons: pd.DataFrame  #: stats.paired_comparisons (empty without episodes)
    ranks: pd.DataFrame  #: stats.rank_table
    average_ranks: pd.DataFrame  #: stats.common_cell_ranks (over the cells every ranked method is ranked in)
    spread: pd.DataFrame  #: stats.replicate_spread
    have_episodes: bool


def compute_statistics(results: pd.DataFrame, episodes: pd.DataFrame | None) -> Statistics:
    """Paired tests (when ``episodes`` is given), Meta-Dataset ranks and replicate spread."""
    df = _prepared(results)
    ok = df[df["_ok"]].drop(columns=["_ok"])
    if episodes is not None and not ok.empty:
        comparisons = stats.paired_comparisons(ok, episodes, baselines=BASELINES, alpha=ALPHA)
    else:
        comparisons = pd.DataFrame(columns=["method", "requested_budget", "target", "shots", "arm", "replicate",
                                            "baseline", "n", "mean_diff", "effect_size", "statistic", "p_value",
                                            "p_holm", "significant", "test_method", "row_id", "baseline_row_id"])
    ranks = stats.rank_table(ok)
    return Statistics(comparisons=comparisons, ranks=ranks, average_ranks=stats.common_cell_ranks(ranks),
                      spread=stats.replicate_spread(ok), have_episodes=episodes is not None)



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
                text = fmt_acc(float(ok["acc_mean"].mean()), float(ok["acc_ci95"].mean()))
                record[col] = text + (f" ({n_bad}/{len(cell)} failed)" if n_bad else "")
        records.append(record)
    table = pd.DataFrame.from_records(records, columns=[*keys, *shot_cols])
    return _sorted(table, extra=[k for k in keys if k not in ("method", "requested_budget")])


def _cell_groups(df: pd.DataFrame) -> list[str]:
    """Columns that identify a cell (method, budget, target, shots, arm; ways when it varies)."""
    keys = [c for c in ("target", "shots", "arm", "method", "requested_budget") if c in df.columns]
    return keys + (["ways"] if _varying(df, "ways") else [])


def _marks(comps: pd.DataFrame) -> str:
    """"+1.2 pp ▲" style text for one cell's comparisons with one baseline (one mark per replicate)."""
    if comps.empty:
        return MISSING
    diffs = [v for v in (finite(d) for d in comps["mean_diff"]) if v is not None]
    if not diffs:
        return "no shared episodes"
    marks = []
    for sig, d in zip(comps["significant"], comps["mean_diff"], strict=True):
        v = finite(d)
        marks.append("n.s." if not bool(sig) or v is None else (UP if v > 0 else DOWN))
    if len(marks) > 1:  # one symbol per replicate, · for not significant
        mark_txt = "n.s." if set(marks) == {"n.s."} else "".join(m if m != "n.s." else "·" for m in marks)
    else:
        mark_txt = marks[0]
    return f"{100 * float(np.mean(diffs)):+.1f} pp {mark_txt}"


def _rank_text(entries: list[tuple[float, float, int]]) -> str:
    """``[(cell budget, rank, methods in cell)]`` -> "2 / 9" or "1 / 9 at 0.5, 3 / 9 at 0.25"."""
    entries = [e for e in entries if finite(e[1]) is not None]
    if not entries:
        return MISSING
    entries.sort(key=lambda e: -e[0])
    if len(entries) == 1:
        return f"{entries[0][1]:g} / {entries[0][2]}"
    return ", ".join(f"{r:g} / {k} at {fmt_budget(b)}" for b, r, k in entries)


def results_table(results: pd.DataFrame, statistics: Statistics | None = None,
                  episodes: pd.DataFrame | None = None) -> pd.DataFrame:
    """The main table as display text: one row per cell (target, shots, arm, method, budget).

    Columns: ``target``, ``shots``, ``arm``, ``method``, ``budget`` (requested), ``achieved`` (ratio
    on the budget metric), ``accuracy %`` ("mean ± CI (n=episodes)", replicates averaged; "failed"
    when no replicate produced an accuracy, a "k/m failed" note when some did not), ``replicates %``
    ("mean of per-replicate means ± their std (replicates)"; only when some cell has more than one),
    ``vs dense`` and one ``vs`` column per control the study ran (random, scratch: mean paired difference
    in pp and a mark per replicate: ▲/▼
    significantly better/worse after Holm, n.s. or · not significant, — no comparison), ``rank``
    (Meta-Dataset rank / methods in the cell; budget-free methods are ranked in every budget's cell)
    and ``row_id`` (the results.csv rows of the cell). Sorted by target, shots, arm, descending
    budget, then method order; failed cells are kept.
    """
    df = _prepared(results)
    st = statistics if statistics is not None else compute_statistics(results, episodes)
    cols = ["target", "shots", "arm", "method", "budget", "achieved", "accuracy %", "replicates %",
            *[f"vs {base}" for base in BASELINES], "rank", "row_id"]
    if df.empty:
        return pd.DataFrame(columns=cols)
    keys = _cell_groups(df)
    df["_b"] = df["requested_budget"].map(budget_value)
    df["_s"] = df["shots"].map(shots_key)
    comps = st.comparisons.assign(
        _b=st.comparisons["requested_budget"].map(budget_value), _s=st.comparisons["shots"].map(shots_key),
        target=st.comparisons["target"].astype(str), arm=st.comparisons["arm"].astype(str),
        method=st.comparisons["method"].astype(str))
    comp_index = {k: g for k, g in comps.groupby(["method", "_b", "target", "_s", "arm"], sort=False)}
    ranks = st.ranks.assign(kcb=st.ranks["requested_budget"].map(budget_value),
                            kmb=st.ranks["method_budget"].map(budget_value), ks=st.ranks["shots"].map(shots_key))
    cell_sizes = ranks.groupby(["target", "ks", "arm", "kcb"])["method"].transform("size") if not ranks.empty \
        else pd.Series(dtype=int)
    rank_index: dict[tuple, list[tuple[float, float, int]]] = {}
    for r, size in zip(ranks.itertuples(), cell_sizes, strict=True):
        rank_index.setdefault((str(r.method), r.kmb, str(r.target), r.ks, str(r.arm)), []).append(
            (r.kcb, float(r.rank), int(size)))
    spread = st.spread.assign(kb=st.spread["requested_budget"].map(budget_value),
                              ks=st.spread["shots"].map(shots_key))
    spread_index = {(str(r.method), r.kb, str(r.target), r.ks, str(r.arm)): r for r in spread.itertuples()}
    multi_rep = bool((spread["n_replicates"] > 1).any()) if not spread.empty else False

    records = []
    group_keys = [k if k not in ("requested_budget", "shots") else {"requested_budget": "_b", "shots": "_s"}[k]
                  for k in keys]
    for _, cell in df.groupby(group_keys, dropna=False, sort=False):
        first = cell.iloc[0]
        key = (str(first["method"]), first["_b"], str(first["target"]), first["_s"], str(first["arm"]))
        ok = cell[cell["_ok"]]
        n_bad = len(cell) - len(ok)
        if ok.empty:
            acc = "failed"
        else:
            mean = float(pd.to_numeric(ok["acc_mean"]).mean())
            ci = float(pd.to_numeric(ok["acc_ci95"], errors="coerce").mean())
            n_ep = pd.to_numeric(ok.get("n_episodes"), errors="coerce").dropna()
            n_txt = f"n={round(n_ep.mean())}" if not n_ep.empty else "n=?"
            acc = f"{fmt_acc(mean, ci)} ({n_txt}" + (f"; {n_bad}/{len(cell)} failed)" if n_bad else ")")
        metric = str(first.get("budget_metric", "params")) or "params"
        ratios = pd.to_numeric(cell.get(f"{metric}_ratio"), errors="coerce").dropna() \
            if f"{metric}_ratio" in cell.columns else pd.Series(dtype=float)
        if ratios.empty:
            achieved = MISSING
        else:
            lo, hi = float(ratios.min()), float(ratios.max())
            achieved = f"{lo:.3f}" if hi - lo < 5e-4 else f"{lo:.3f}–{hi:.3f}"
            if truthy(cell.get("budget_missed")).any():
                achieved += " ⚠ missed"
        sp = spread_index.get(key)
        rep_txt = MISSING
        if sp is not None and int(sp.n_replicates) == 1:
            rep_txt = f"{100 * float(sp.acc_mean):.1f} (1)"
        if sp is not None and int(sp.n_replicates) > 1:
            rep_txt = f"{100 * float(sp.acc_mean):.1f} ± {fmt_num(100 * float(sp.acc_std_replicates), '.1f')} " \
                      f"({int(sp.n_replicates)})"
        cell_comps = comp_index.get(key, pd.DataFrame(columns=comps.columns))
        vs = {}
        for base in BASELINES:
            if str(first["method"]) == base:
                vs[base] = "baseline"
            elif not st.have_episodes:
                vs[base] = "no episodes"
            else:
                vs[base] = _marks(cell_comps[cell_comps["baseline"] == base])
        records.append({
            "target": str(first["target"]), "shots": fmt_num(first["shots"], ".0f"), "arm": str(first["arm"]),
            "method": str(first["method"]), "budget": fmt_budget(first["requested_budget"]),
            "achieved": achieved, "accuracy %": acc, "replicates %": rep_txt,
            **{f"vs {base}": text for base, text in vs.items()}, "rank": _rank_text(rank_index.get(key, [])),
            "row_id": " ".join(sorted(cell["row_id"].astype(str))) if "row_id" in cell.columns else MISSING,
            "_s": first["_s"] if first["_s"] is not None else -1, "_b": first["_b"],
            "_m": str(first["method"]),
        })
    out = pd.DataFrame.from_records(records)
    order = {m: i for i, m in enumerate(method_order(out["_m"]))}
    out = out.assign(_mo=out["_m"].map(order), _nb=-out["_b"].astype(float))
    out = out.sort_values(["target", "_s", "arm", "_nb", "_mo"], kind="mergesort").reset_index(drop=True)
    if not multi_rep:
        cols.remove("replicates %")
    ran = set(df["method"].astype(str))
    cols = [c for c in cols if not (c.startswith("vs ") and c[3:] != "dense" and c[3:] not in ran)]  # absent controls
    return out[cols]


def comparisons_table(statistics: Statistics) -> pd.DataFrame:
    """Every paired comparison as display text (differences and effect sizes: method − baseline)."""
    c = statistics.comparisons
    cols = ["row_id", "method", "budget", "target", "shots", "arm", "replicate", "baseline", "baseline row_id",
            "n", "Δ mean (pp)", "effect size r", "W", "p", "p (Holm)", "significant", "test"]
    if c.empty:
        return pd.DataFrame(columns=cols)
    out = pd.DataFrame({
        "row_id": c["row_id"].astype(str), "method": c["method"].astype(str),
        "budget": c["requested_budget"].map(fmt_budget), "target": c["target"].astype(str),
        "shots": c["shots"].map(lambda v: fmt_num(v, ".0f")), "arm": c["arm"].astype(str),
        "replicate": c["replicate"].map(lambda v: fmt_num(v, ".0f")), "baseline": c["baseline"].astype(str),
        "baseline row_id": c["baseline_row_id"].astype(str), "n": c["n"].map(lambda v: fmt_num(v, ".0f")),
        "Δ mean (pp)": c["mean_diff"].map(lambda v: fmt_num(100 * v if finite(v) is not None else v, "+.1f")),
        "effect size r": c["effect_size"].map(lambda v: fmt_num(v, "+.2f")),
        "W": c["statistic"].map(lambda v: fmt_num(v, "g")),
        "p": c["p_value"].map(fmt_p), "p (Holm)": c["p_holm"].map(fmt_p),
        "significant": [
            (f"yes {UP}" if (finite(d) or 0) > 0 else f"yes {DOWN}") if bool(s) else "no"
            for s, d in zip(c["significant"], c["mean_diff"], strict=True)
        ],
        "test": c["test_method"].astype(str),
    })
    return out[cols]


def average_rank_table(statistics: Statistics) -> pd.DataFrame:
    """Mean Meta-Dataset rank per method over the common cells (the cells every ranked method is ranked in,
    :func:`stats.common_cell_ranks`), best first. ``cells``: the common cells the mean averages over;
    ``ranked in``: every cell the method is ranked in. A method set aside (it shares no cell with the
    others) reads "—" with 0 cells; the table is empty when there is no common cell at all."""
    a = statistics.average_ranks
    cols = ["method", "mean rank", "cells", "ranked in"]
    if a.empty or not a["common"].astype(bool).any():
        return pd.DataFrame(columns=cols)
    return pd.DataFrame({
        "method": a["method"].astype(str),
        "mean rank": a["mean_rank"].map(lambda v: fmt_num(v, ".2f")),
        "cells": a["n_cells"].astype(int).astype(str),
        "ranked in": a["n_ranked"].astype(int).astype(str),
    }, columns=cols).reset_index(drop=True)


def detail_table(results: pd.DataFrame) -> pd.DataFrame:
    """Per-row cost detail as display text: budget requested vs achieved ratios, latency, search time.

    One row per results row (failed ones included), sorted like :func:`summary_table`
    then by shots and replicate.
    """
    df = _prepared(results)
    lat = latency_table_columns(df)
    context = [c for c in ("side", "target", "arm", "shots", "replicate", "budget_metric") if c in df.columns]
    if "side" in context and not _varying(df, "side"):
        context.remove("side")
    df = _sorted(df, extra=[c for c in ("target", "arm", "side", "shots", "replicate") if c in df.columns])
    out = pd.DataFrame({"row_id": df["row_id"].astype(str) if "row_id" in df.columns else "",
                        "method": df["method"]})
    for c in context:
        if c in ("shots", "replicate"):
            out[c] = df[c].map(lambda v: fmt_num(v, ".0f"))
        else:
            out[c] = df[c].astype(str)
    out["requested"] = df["requested_budget"].map(fmt_budget)
    out["params ratio"] = df.get("params_ratio", pd.Series(np.nan, index=df.index)).map(
        lambda v: fmt_num(v, ".3f")
    )
    out["flops ratio"] = df.get("flops_ratio", pd.Series(np.nan, index=df.index)).map(
        lambda v: fmt_num(v, ".3f")
    )
    if "budget_gap" in df.columns:  # results.csv's budget_gap is requested − achieved: shown the other way round
        col = "achieved − requested"
        out[col] = pd.to_numeric(df["budget_gap"], errors="coerce").map(lambda v: fmt_num(0.0 - v, "+.3f"))
        if "budget_missed" in df.columns:
            out.loc[truthy(df["budget_missed"]).to_numpy(), col] += " ⚠ missed"
    for c in lat:
        batch = latency_batch(c)
        out[f"latency ms (b={batch})"] = df[c].map(lambda v: fmt_num(v, ".3f"))
    if "latency_device" in df.columns:
        out["latency device"] = df["latency_device"].astype(str)
    # CUDA timings only where some row has them (a CPU-only run leaves these columns empty)
    cuda_lat = timed_latency_columns(df, CUDA_LATENCY_RE)
    for c in cuda_lat:
        batch = latency_batch(c)
        out[f"cuda latency ms (b={batch})"] = df[c].map(lambda v: fmt_num(v, ".3f"))
    if cuda_lat and "latency_cuda_device" in df.columns:
        out["cuda device"] = df["latency_cuda_device"].astype(str)
    if "search_seconds" in df.columns:
        out["search s"] = df["search_seconds"].map(lambda v: fmt_num(v, ".2f"))
    if "search_scope" in df.columns:
        out["search scope"] = df["search_scope"].astype(str)
    out["acc %"] = [
        fmt_num(100 * float(a), ".1f") if ok else "failed"
        for a, ok in zip(pd.to_numeric(df["acc_mean"], errors="coerce"), df["_ok"], strict=True)
    ]
    out["status"] = df["status"].astype(str)
    return out


def methods_table(results: pd.DataFrame) -> pd.DataFrame:
    """One row per method: its role (the dense reference, a control every method is tested against, or a
    pruning method), its side, where the algorithm comes from and, for target-side methods, that the
    search runs per episode. Reconstructions are named as such."""
    df = _prepared(results)
    cols = ["method", "role", "side", "source", "search"]
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
        role = "reference" if method == BASELINES[0] else "control" if method in BASELINES else "method"
        rows.append({"method": method, "role": role, "side": side or MISSING, "source": source or MISSING,
                     "search": search})
    return pd.DataFrame(rows, columns=cols)


def failures_table(results: pd.DataFrame) -> pd.DataFrame:
    """Rows that did not produce an accuracy, with their error text."""
    df = _prepared(results)
    bad = df[~df["_ok"]]
    cols = ["row_id", "method", "requested", "target", "shots", "arm", "replicate", "status", "error"]
    if bad.empty:
        return pd.DataFrame(columns=cols)
    bad = _sorted(bad, extra=[c for c in ("target", "shots", "arm", "replicate") if c in bad.columns])
    out = pd.DataFrame({
        "row_id": bad["row_id"].astype(str) if "row_id" in bad.columns else "",
        "method": bad["method"],
        "requested": bad["requested_budget"].map(fmt_budget),
    })
    for c in ("target", "shots", "arm", "replicate"):
        if c in bad.columns:
            out[c] = bad[c].map(lambda v: fmt_num(v, ".0f")) if c in ("shots", "replicate") else bad[c].astype(str)
    out["status"] = bad["status"].astype(str)
    out["error"] = [e if e else "(no error message; accuracy missing)" for e in bad["error"].astype(str)]
    return out[[c for c in cols if c in out.columns]]


def budget_missed_table(results: pd.DataFrame) -> pd.DataFrame:
    """The ok rows whose achieved budget misses the requested one by more than ``budget.tolerance``
    (results.csv's ``budget_missed``): row_id, method, requested, achieved ratio, gap, tolerance."""
    cols = ["row_id", "method", "requested", "achieved", "gap", "tolerance"]
    if "budget_missed" not in results.columns:
        return pd.DataFrame(columns=cols)
    df = results[truthy(results["budget_missed"])]
    if "status" in df.columns:
        df = df[df["status"] == "ok"]
    if df.empty:
        return pd.DataFrame(columns=cols)
    metric = df["budget_metric"].astype(str)
    achieved = [row[f"{m}_ratio"] for m, (_, row) in zip(metric, df.iterrows(), strict=True)]
    return pd.DataFrame({
        "row_id": df["row_id"].astype(str), "method": df["method"].astype(str),
        "requested": df["requested_budget"].map(fmt_budget), "achieved": [fmt_num(a, ".3f") for a in achieved],
        "gap": df["budget_gap"].map(lambda v: fmt_num(v, "+.3f")),
        "tolerance": df.get("budget_tolerance", pd.Series("", index=df.index)).astype(str),
    }, columns=cols)
