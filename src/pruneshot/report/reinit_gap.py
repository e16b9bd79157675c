"""Inherited weights vs fresh initialisation: finetune minus reinit accuracy for every configuration run
under both arms (same architecture, episodes, optimiser and steps; only the starting weights differ)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from pruneshot.config import budget_value
from pruneshot.report.formatting import fmt_acc, fmt_budget, fmt_num, shots_key
from pruneshot.report.load import _prepared, method_order


def reinit_gap_data(results: pd.DataFrame, episodes: pd.DataFrame | None = None) -> pd.DataFrame:
    """finetune minus reinit accuracy (fractions) for every (method, budget, target, shots) run under both.

    With ``episodes``, the gap is paired: per episode the finetune minus reinit accuracy (averaged
    over replicates, whose episodes are shared), its mean and 95% CI 1.96 * std / sqrt(n) (sample
    std, ``paired`` True). Without, or when a row has no episodes, it is the difference of the
    replicate-averaged means with the unpaired sqrt(ci_f^2 + ci_r^2) half-width (``paired`` False).
    Columns: method, requested_budget, target, shots, finetune, finetune_ci, reinit, reinit_ci, gap,
    gap_ci, n, paired, row_ids.
    """
    df = _prepared(results)
    cols = ["method", "requested_budget", "target", "shots", "finetune", "finetune_ci", "reinit", "reinit_ci",
            "gap", "gap_ci", "n", "paired", "row_ids"]
    df = df[df["_ok"] & df["arm"].isin(["finetune", "reinit"])] if "arm" in df.columns else df.iloc[0:0]
    if df.empty:
        return pd.DataFrame(columns=cols)
    df = df.assign(_b=df["requested_budget"].map(budget_value), _s=df["shots"].map(shots_key),
                   acc_mean=pd.to_numeric(df["acc_mean"]), acc_ci95=pd.to_numeric(df["acc_ci95"], errors="coerce"))
    eps: dict[str, dict[int, float]] = {}
    if episodes is not None:
        for rid, ep, acc in zip(episodes["row_id"].astype(str), episodes["episode"], episodes["accuracy"],
                                strict=True):
            eps.setdefault(rid, {})[int(ep)] = float(acc)
    rows = []
    for (method, b, target, s), g in df.groupby(["method", "_b", "target", "_s"], sort=False):
        ft, ri = g[g["arm"] == "finetune"], g[g["arm"] == "reinit"]
        if ft.empty or ri.empty:
            continue
        rec = {"method": method, "requested_budget": b, "target": target, "shots": s,
               "finetune": float(ft["acc_mean"].mean()), "finetune_ci": float(ft["acc_ci95"].mean()),
               "reinit": float(ri["acc_mean"].mean()), "reinit_ci": float(ri["acc_ci95"].mean()),
               "row_ids": " ".join(sorted([*ft["row_id"].astype(str), *ri["row_id"].astype(str)]))
               if "row_id" in g.columns else ""}
        diffs: dict[int, list[float]] = {}
        reps = sorted(set(ft["replicate"]) & set(ri["replicate"])) if "replicate" in g.columns else []
        for rep in reps:
            f_ids = ft.loc[ft["replicate"] == rep, "row_id"].astype(str)
            r_ids = ri.loc[ri["replicate"] == rep, "row_id"].astype(str)
            f_eps, r_eps = eps.get(next(iter(f_ids), ""), {}), eps.get(next(iter(r_ids), ""), {})
            for e in set(f_eps) & set(r_eps):
                diffs.setdefault(e, []).append(f_eps[e] - r_eps[e])
        if len(diffs) >= 1:
            d = np.array([np.mean(v) for _, v in sorted(diffs.items())])
            std = float(np.std(d, ddof=1)) if len(d) > 1 else 0.0
            rec.update(gap=float(d.mean()), gap_ci=1.96 * std / math.sqrt(len(d)), n=len(d), paired=True)
        else:
            rec.update(gap=rec["finetune"] - rec["reinit"],
                       gap_ci=math.sqrt(rec["finetune_ci"] ** 2 + rec["reinit_ci"] ** 2),
                       n=int(pd.to_numeric(ft.get("n_episodes"), errors="coerce").mean())
                       if "n_episodes" in ft.columns else 0, paired=False)
        rows.append(rec)
    if not rows:
        return pd.DataFrame(columns=cols)
    out = pd.DataFrame(rows)
    order = {m: i for i, m in enumerate(method_order(out["method"]))}
    out = out.assign(_mo=out["method"].map(order), _nb=-out["requested_budget"])
    out = out.sort_values(["_mo", "_nb", "target", "shots"], kind="mergesort").reset_index(drop=True)
    return out[cols]


def reinit_gap_table(results: pd.DataFrame, episodes: pd.DataFrame | None = None) -> pd.DataFrame:
    """finetune minus reinit accuracy (percentage points) for every configuration run under both arms.

    Same architecture, same episodes, same optimiser and steps; only the starting weights differ
    (inherited from the source vs freshly initialised). A positive gap means the inherited weights
    help; DAP claims the architecture alone transfers (gap near 0). With ``episodes`` the ± is the
    paired 95% CI of the per-episode differences; without, the unpaired sqrt(ci_f^2 + ci_r^2)
    half-width (conservative). See :func:`reinit_gap_data`.
    """
    data = reinit_gap_data(results, episodes)
    cols = ["method", "budget", "target", "shots", "finetune %", "reinit %", "gap (pp)", "CI", "row_id"]
    if data.empty:
        return pd.DataFrame(columns=cols)
    return pd.DataFrame({
        "method": data["method"], "budget": data["requested_budget"].map(fmt_budget), "target": data["target"],
        "shots": data["shots"].map(lambda v: fmt_num(v, ".0f")),
        "finetune %": [fmt_acc(m, c) for m, c in zip(data["finetune"], data["finetune_ci"], strict=True)],
        "reinit %": [fmt_acc(m, c) for m, c in zip(data["reinit"], data["reinit_ci"], strict=True)],
        "gap (pp)": [f"{100 * g:+.1f} ± {fmt_num(100 * c, '.1f')}" for g, c in
                     zip(data["gap"], data["gap_ci"], strict=True)],
        "CI": [f"paired, n={n}" if p else "unpaired" for n, p in zip(data["n"], data["paired"], strict=True)],
        "row_id": data["row_ids"],
    })[cols]
