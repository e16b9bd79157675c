"""The report's headline: per (target, shots, arm) and budget, the best pruning method and whether it beats
dense and each control (random, scratch) significantly on the shared episodes (issue 15.10)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from pruneshot.config import budget_value
from pruneshot.report.formatting import MISSING, finite, fmt_acc, fmt_budget, fmt_num, shots_key
from pruneshot.report.html import _esc, _html_table
from pruneshot.report.load import _prepared
from pruneshot.report.styles import pruning_methods
from pruneshot.report.tables import BASELINES, DOWN, UP, Statistics


def _headline_cells(results: pd.DataFrame) -> pd.DataFrame:
    """The pruning methods' rows (neither dense, a reference nor a control) with cell keys ``_s`` / ``_b``."""
    df = _prepared(results)
    if df.empty:
        return df.assign(_s=pd.Series(dtype=object), _b=pd.Series(dtype=float))
    df = df[df["method"].astype(str).isin(pruning_methods(df["method"].astype(str)))]
    return df.assign(_s=df["shots"].map(shots_key), _b=df["requested_budget"].map(budget_value),
                     target=df["target"].astype(str), arm=df["arm"].astype(str), method=df["method"].astype(str))


def _comparison_index(statistics: Statistics) -> dict[tuple, pd.DataFrame]:
    """(method, budget, target, shots, arm, baseline) -> that cell's comparison rows (one per replicate)."""
    c = statistics.comparisons
    if c.empty:
        return {}
    c = c.assign(_b=c["requested_budget"].map(budget_value), _s=c["shots"].map(shots_key),
                 target=c["target"].astype(str), arm=c["arm"].astype(str), method=c["method"].astype(str),
                 baseline=c["baseline"].astype(str))
    return {k: g for k, g in c.groupby(["method", "_b", "target", "_s", "arm", "baseline"], sort=False)}


def _verdict(comps: pd.DataFrame) -> str:
    """"+2.1 pp ▲ better" (one replicate) or "+2.1 pp ▲ better in 2/3 replicates": the mean paired difference
    and how many replicates' Holm-adjusted tests find the method significantly better (or worse)."""
    if comps.empty:
        return MISSING
    diffs = [v for v in (finite(d) for d in comps["mean_diff"]) if v is not None]
    if not diffs:
        return "no shared episodes"
    sig = comps["significant"].astype(bool).to_numpy()
    d = pd.to_numeric(comps["mean_diff"], errors="coerce").to_numpy(dtype=float)
    n, better, worse = len(comps), int((sig & (d > 0)).sum()), int((sig & (d < 0)).sum())
    head = f"{100 * float(np.mean(diffs)):+.1f} pp"
    if n == 1:
        return f"{head} {UP} better" if better else f"{head} {DOWN} worse" if worse else f"{head} n.s."
    parts = ([f"{UP} better in {better}/{n} replicates"] if better else []) + (
        [f"{DOWN} worse in {worse}/{n} replicates"] if worse else [])
    return f"{head} " + ("; ".join(parts) if parts else f"n.s. in all {n} replicates")


def _present_baselines(results: pd.DataFrame) -> list[str]:
    """dense, then the controls the study ran."""
    ran = set(results["method"].astype(str)) if "method" in results.columns else set()
    return [b for b in BASELINES if b == BASELINES[0] or b in ran]


def headline_table(results: pd.DataFrame, statistics: Statistics) -> pd.DataFrame:
    """The report's headline as display text: per (target, shots, arm) and budget, the pruning method with the
    highest mean accuracy (replicates averaged; dense, the budget-free references and the controls excluded),
    its accuracy and, against dense and each control the study ran, its mean paired difference with how many
    replicates' Holm-adjusted Wilcoxon tests find it significantly better or worse (:func:`_verdict`).

    A cell whose pruning runs all failed reads "all failed". Sorted by target, shots, arm, budget descending.
    """
    bases = _present_baselines(results)
    cols = ["target", "shots", "arm", "budget", "best pruning method", "accuracy %", *[f"vs {b}" for b in bases]]
    df = _headline_cells(results)
    if df.empty:
        return pd.DataFrame(columns=cols)
    index = _comparison_index(statistics)
    records = []
    for (target, s, arm, b), cell in df.groupby(["target", "_s", "arm", "_b"], sort=True, dropna=False):
        ok = cell[cell["_ok"]]
        record: dict[str, object] = {"target": target, "shots": fmt_num(s, ".0f"), "arm": arm,
                                     "budget": fmt_budget(b), "_s": -1 if s is None else s, "_b": b}
        if ok.empty:
            records.append({**record, "best pruning method": MISSING, "accuracy %": "all failed",
                            **{f"vs {base}": MISSING for base in bases}})
            continue
        per = ok.assign(acc_mean=pd.to_numeric(ok["acc_mean"], errors="coerce"),
                        acc_ci95=pd.to_numeric(ok["acc_ci95"], errors="coerce")).groupby("method", sort=True).agg(
            mean=("acc_mean", "mean"), ci=("acc_ci95", "mean"), reps=("acc_mean", "size"))
        best = str(per.sort_values("mean", ascending=False, kind="mergesort").index[0])
        tied = int((per["mean"] == per.loc[best, "mean"]).sum()) - 1  # the same mean: named first by name
        acc = fmt_acc(float(per.loc[best, "mean"]), float(per.loc[best, "ci"]))
        reps = int(per.loc[best, "reps"])
        record.update({"best pruning method": best + (f" (tied with {tied} more)" if tied else ""),
                       "accuracy %": acc + (f" ({reps} replicates)" if reps > 1 else "")})
        for base in bases:
            comps = index.get((best, b, target, s, arm, base))
            record[f"vs {base}"] = "no episodes" if not statistics.have_episodes else _verdict(
                comps if comps is not None else pd.DataFrame(columns=["mean_diff", "significant"]))
        records.append(record)
    out = pd.DataFrame.from_records(records)
    out = out.assign(_nb=-out["_b"].astype(float)).sort_values(["target", "_s", "arm", "_nb"], kind="mergesort")
    return out[cols].reset_index(drop=True)


#: The headline sentences name at most this many methods (then "and N more").
_NAMED = 4


def headline_summary(results: pd.DataFrame, statistics: Statistics) -> list[str]:
    """The headline in plain-text sentences: first, plainly, the baselines (dense and the controls the study ran)
    no pruning method beats significantly at any budget; then, per other baseline, in how many cells (target,
    shots, arm, budget) some pruning method beats it significantly (Holm) in every replicate compared, which
    methods do, and in how many more cells only some replicates do."""
    df = _headline_cells(results)
    if df.empty:
        return []
    if not statistics.have_episodes:
        return ["No paired tests (episodes.csv was not given): the best method is by mean accuracy alone."]
    index = _comparison_index(statistics)
    pruned = set(df["method"])
    sentences = []
    unbeaten: list[tuple[str, int]] = []  # (baseline, cells compared) no pruning method beats anywhere
    for base in _present_baselines(results):
        every: set[tuple] = set()
        some: set[tuple] = set()
        cells: set[tuple] = set()
        winners: dict[str, int] = {}
        multi = False
        for (method, b, target, s, arm, baseline), g in index.items():
            if baseline != base or method not in pruned:
                continue
            cell = (b, target, s, arm)
            cells.add(cell)
            d = pd.to_numeric(g["mean_diff"], errors="coerce").to_numpy(dtype=float)
            better = int((g["significant"].astype(bool).to_numpy() & (d > 0)).sum())
            multi = multi or len(g) > 1
            if better == len(g):
                every.add(cell)
                winners[method] = winners.get(method, 0) + 1
            elif better:
                some.add(cell)
        if not cells:
            continue
        n = len(cells)
        if not every and not some:
            unbeaten.append((base, n))
            continue
        text = f"Some pruning method beats {base} significantly in {len(every)} of {n} cells"
        text += " in every replicate" if multi else ""
        if winners:
            ranked = [f"{m} in {k}" for m, k in sorted(winners.items(), key=lambda t: (-t[1], t[0]))]
            more = f" and {len(ranked) - _NAMED} more methods" if len(ranked) > _NAMED + 1 else ""
            text += f" ({', '.join(ranked if not more else ranked[:_NAMED])}{more})"
        some -= every
        if some:
            text += f"; in {len(some)} more only in some replicates"
        sentences.append(text + ".")
    if unbeaten:
        if len({n for _, n in unbeaten}) == 1:
            names, counts = _or_list([b for b, _ in unbeaten]), f" (0 of {unbeaten[0][1]} cells)"
        else:
            names, counts = _or_list([f"{b} (0 of {n} cells)" for b, n in unbeaten]), ""
        sentences.insert(0, f"No pruning method beats {names} significantly at any budget{counts}.")
    return sentences


def _or_list(items: list[str]) -> str:
    """"a", "a or b", "a, b or c"."""
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} or {items[-1]}"


def headline_html(results: pd.DataFrame, statistics: Statistics) -> str:
    """The headline section: per (target, shots, arm) and budget, the best pruning method and whether it beats
    dense and each control significantly, with one sentence per baseline."""
    table = headline_table(results, statistics)
    head = '<section id="headline"><h2>Headline</h2>'
    if table.empty:
        return head + '<p id="headline-none">No pruning method ran: nothing to compare with dense or a control.</p>' \
            "</section>"
    intro = ("<p>Per target, shots, arm and budget (a <em>cell</em>): the pruning method with the highest mean "
             "accuracy (dense, linear_probe and the controls random and scratch excluded), its accuracy (mean ± 95% "
             "CI) and, against dense and each control, the mean paired difference in percentage points with "
             f"<span class=\"up\">{UP}</span> better / <span class=\"down\">{DOWN}</span> worse where the "
             "two-sided Wilcoxon test on the shared episodes is significant after Holm's correction over all the "
             "report's comparisons (one test per replicate: with several replicates, in how many).</p>")
    summary = " ".join(_esc(t) for t in headline_summary(results, statistics))
    return "\n".join([
        head, intro, f'<p id="headline-summary"><strong>{summary}</strong></p>' if summary else "",
        _html_table(table, "headline-table"), "</section>",
    ])
