"""Statistics for the report: paired Wilcoxon tests, Holm correction, Meta-Dataset ranks.

Plain functions on numbers and on the tidy tables the ``aggregate`` stage writes
(``results.csv``: one row per method x budget x target x shots x arm x replicate;
``episodes.csv``: ``row_id, episode, accuracy``). Accuracies are fractions in [0, 1]
throughout; nothing here reads or writes files or draws anything.

Conventions (see each function):

- Wilcoxon signed-rank test: ``scipy.stats.wilcoxon(d, zero_method="wilcox", correction=True,
  method=...)`` (zero differences dropped, average ranks for tied |d|, statistic min(W+, W-))
  with our own choice of ``method``: "exact" (the exact null distribution) when there are no
  ties and at most 50 non-zero differences, else "asymptotic" (the normal approximation with
  tie and 0.5 continuity correction). scipy's default ``method="auto"`` differs when there are
  zeros or ties (it then runs a permutation test for n <= 13).
- Multiple comparisons: Holm-Bonferroni over the whole family passed in.
- Ranks: Meta-Dataset's rule (Triantafillou et al. 2020): methods within the 95% margin
  1.96 * sqrt(s1^2/n1 + s2^2/n2) of the best remaining one share its rank.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from functools import cache
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps

from pruneshot.config import budget_value

#: The methods every other one is tested against and that every panel shows: the unpruned network, then
#: the registry's controls (``PruningMethod.control``: random channels, the size-matched scratch network).
#: Written here so that reading tables needs no torch; a test checks it against the registry.
BASELINES = ("dense", "random", "scratch")
#: Largest number of non-zero differences for which the exact null distribution is used.
EXACT_MAX_N = 50
#: Identifying columns added to the grouping keys when present and not constant.
_IMPLICIT_KEYS = ("ways",)
_Z95 = 1.96

# --------------------------------------------------------------------------- methods


def budget_free_methods(methods: Iterable[str]) -> list[str]:
    """The names among ``methods`` whose registered method ignores the budget (``budget_free``: run at
    budget 1.0 only, so they belong to every budget's comparison), sorted by name."""
    return sorted({str(m) for m in methods if _is_budget_free(str(m))})


@cache
def _is_budget_free(name: str) -> bool:
    # Imported here: the registry imports torch, which reading tables does not need otherwise.
    from pruneshot.methods import available, get_method

    # A name the registry does not know (a method since renamed or removed, a hand-made table) counts
    # as budget-dependent: it is compared and ranked at its own budget only.
    return name in available() and get_method(name).budget_free


@cache
def _repeats(name: str) -> tuple[str, str] | None:
    """The (method, arm) whose numbers method ``name``'s rows repeat (the registry's ``repeats``), or None."""
    from pruneshot.methods import available, get_method

    return get_method(name).repeats if name in available() else None


@cache
def trains_from_scratch(name: str) -> bool:
    """Whether method ``name`` trains its network anew on the source (the registry's ``trains_from_scratch``):
    its budget-1.0 network is another dense replicate, not the dense network."""
    from pruneshot.methods import available, get_method

    return name in available() and get_method(name).trains_from_scratch


def repeated_in(methods: Iterable[str], arm: str) -> set[str]:
    """The methods among ``methods`` whose rows in a cell of ``arm`` repeat another method's arm that is
    also in the cell (e.g. linear_probe = dense's linear_probe arm): counted once, as that method."""
    present = {str(m) for m in methods}
    return {m for m in present if (rep := _repeats(m)) is not None and rep[1] == arm and rep[0] in present}


# --------------------------------------------------------------------------- Wilcoxon


def wilcoxon_signed_rank(a: Sequence[float], b: Sequence[float], *, decimals: int | None = 12) -> dict[str, Any]:
    """Two-sided Wilcoxon signed-rank test of paired samples ``a`` vs ``b`` (same episodes, same order).

    d = a - b. Zero differences are dropped (Wilcoxon's method, scipy ``zero_method="wilcox"``);
    the remaining n' = ``n_nonzero`` |d| get average ranks where tied; W+ (W-) is the rank sum of the
    positive (negative) d, and ``statistic`` = min(W+, W-). Zero and tie detection is done on d
    rounded to ``decimals`` places (default 12; None: exact floats), so 0.68 - 0.64 and 0.44 - 0.40
    count as the same difference although their floats differ in the 17th digit.

    p-value (two-sided):

    - ``method="exact"`` when n' <= 50 and no |d| are tied: p = min(1, 2 * P(W <= statistic)) under
      the exact null distribution of W+ (all 2**n' sign patterns equally likely); scipy
      ``method="exact"``.
    - ``method="normal"`` otherwise: mu = n'(n'+1)/4, sigma^2 = n'(n'+1)(2n'+1)/24 - sum(t^3 - t)/48
      over tie groups of size t; z = (W+ - mu - 0.5 * sign(W+ - mu)) / sigma (0.5 continuity
      correction towards the mean); p = 2 * (1 - Phi(|z|)), capped at 1; scipy ``method="asymptotic"``
      with ``correction=True``.

    The test itself is ``scipy.stats.wilcoxon`` on the rounded non-zero d with ``zero_method="wilcox"``.

    All differences zero (or empty input): statistic 0, p 1.0, effect size 0, ``method="exact"``.

    Returns ``n`` (pairs), ``n_nonzero``, ``w_plus``, ``w_minus``, ``statistic``, ``p_value``,
    ``method``, ``effect_size`` (matched-pairs rank-biserial r = (W+ - W-) / (W+ + W-) in [-1, 1],
    positive when ``a`` tends to be larger), ``mean_diff`` and ``median_diff`` (of a - b over all n
    pairs, zeros included, rounded to ``decimals``; NaN when n = 0), in the units of the inputs.
    """
    x = np.asarray(a, dtype=float)
    y = np.asarray(b, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired samples must be 1-d and of equal length, got {x.shape} and {y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("paired samples must be finite")
    d = x - y
    n = len(d)
    d_cmp = np.round(d, decimals) if decimals is not None else d
    mean_diff = float(np.mean(d_cmp)) if n else math.nan
    median_diff = float(np.median(d_cmp)) if n else math.nan
    if decimals is not None and n:
        mean_diff, median_diff = round(mean_diff, decimals), round(median_diff, decimals)
    nonzero = d_cmp[d_cmp != 0]
    m = len(nonzero)
    result: dict[str, Any] = {"n": n, "n_nonzero": m, "mean_diff": mean_diff, "median_diff": median_diff}
    if m == 0:
        return {**result, "w_plus": 0.0, "w_minus": 0.0, "statistic": 0.0, "p_value": 1.0,
                "method": "exact", "effect_size": 0.0}
    magnitude = np.abs(nonzero)
    ranks = sps.rankdata(magnitude)  # average ranks where |d| ties
    w_plus = float(ranks[nonzero > 0].sum())
    w_minus = float(ranks[nonzero < 0].sum())
    # scipy's method="auto" would switch to a permutation test with zeros or ties; the regime is ours.
    exact = m <= EXACT_MAX_N and len(np.unique(magnitude)) == m
    res = sps.wilcoxon(nonzero, zero_method="wilcox", correction=True, alternative="two-sided",
                       method="exact" if exact else "asymptotic")
    return {**result, "w_plus": w_plus, "w_minus": w_minus, "statistic": float(res.statistic),
            "p_value": min(1.0, float(res.pvalue)), "method": "exact" if exact else "normal",
            "effect_size": (w_plus - w_minus) / (w_plus + w_minus)}


# --------------------------------------------------------------------------- Holm


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in input order.

    With the m finite p-values sorted ascending p(1) <= ... <= p(m):
    adj(i) = max over j <= i of min(1, (m - j + 1) * p(j)) (step-down, monotone, capped at 1).
    NaN entries stay NaN and do not count in m. Reject at level alpha where adj < alpha.
    """
    p = [float(v) for v in p_values]
    valid = sorted((v, i) for i, v in enumerate(p) if not math.isnan(v))
    m = len(valid)
    out = [math.nan] * len(p)
    running = 0.0
    for j, (v, i) in enumerate(valid):
        running = max(running, min(1.0, (m - j) * v))
        out[i] = running
    return out


# --------------------------------------------------------------------------- ranks


def ci_ranks(cells: Mapping[str, tuple[float, float, int]], *, z: float = _Z95) -> dict[str, float]:
    """Meta-Dataset ranks of the methods of one cell: ``method -> (mean, std, n)`` -> ``method -> rank``.

    Sort by mean, descending (ties broken by name). The best remaining method r and every remaining
    method m with mean_r - mean_m <= z * sqrt(s_r^2/n_r + s_m^2/n_m) (z = 1.96: the two 95% CIs'
    combined half-width) form a tied group; all of them get rank 1 + (number of methods ranked
    before), i.e. competition ranking (1, 1, 3, ...). Remove the group and repeat. Ties are judged
    against r only (a method tied with a tied method but not with r starts the next group).
    A NaN std counts as 0 (one episode); a method with a NaN (non-finite) mean gets rank NaN.
    """
    stats: list[tuple[str, float, float, int]] = []
    out: dict[str, float] = {}
    for method, (mean, std, n) in cells.items():
        if mean is None or not math.isfinite(float(mean)):
            out[method] = math.nan
            continue
        if n is None or int(n) < 1:
            raise ValueError(f"{method}: n must be >= 1, got {n!r}")
        s = 0.0 if std is None or math.isnan(float(std)) else float(std)
        stats.append((method, float(mean), s, int(n)))
    remaining = sorted(stats, key=lambda t: (-t[1], t[0]))
    ranked = 0
    while remaining:
        _, mean_r, s_r, n_r = remaining[0]
        group = [remaining[0]] + [t for t in remaining[1:]
                                  if mean_r - t[1] <= z * math.sqrt(s_r**2 / n_r + t[2] ** 2 / t[3])]
        for t in group:
            out[t[0]] = float(ranked + 1)
        ranked += len(group)
        names = {t[0] for t in group}
        remaining = [t for t in remaining if t[0] not in names]
    return {method: out[method] for method in cells}


# --------------------------------------------------------------------------- table helpers


def _ok(results: pd.DataFrame) -> pd.DataFrame:
    """Rows with status "ok" (all rows if there is no status column) and a finite ``acc_mean``."""
    df = results.copy()
    if "status" in df.columns:
        df = df[df["status"].fillna("").astype(str) == "ok"]
    acc = pd.to_numeric(df["acc_mean"], errors="coerce")
    df = df[np.isfinite(acc.to_numpy(dtype=float))].copy()
    df["acc_mean"] = pd.to_numeric(df["acc_mean"], errors="coerce")
    return df


def _with_implicit(keys: Sequence[str], df: pd.DataFrame) -> list[str]:
    """``keys`` plus identifying columns (``ways``) that vary in ``df`` but are not in ``keys``."""
    out = list(keys)
    for col in _IMPLICIT_KEYS:
        if col not in out and col in df.columns and df[col].nunique(dropna=False) > 1:
            out.append(col)
    return out


def _norm(col: str, value: Any) -> Any:
    """Comparable form of an identifying value read from a CSV (1 == 1.0, '5' == 5)."""
    if col == "requested_budget":
        return budget_value(value)
    if col in ("shots", "replicate", "ways"):
        return int(float(value))
    return str(value)


def replicate_spread(results: pd.DataFrame,
                     keys: Sequence[str] = ("method", "requested_budget", "target", "shots", "arm")) -> pd.DataFrame:
    """Spread across replicates per cell: the mean of per-replicate means and their sample std.

    Only rows with status "ok" and a finite ``acc_mean`` count. ``ways`` is added to ``keys`` when
    it varies in ``results``. Columns: ``keys``, ``acc_mean`` (mean over replicates of ``acc_mean``,
    fraction), ``acc_std_replicates`` (their sample std, ddof 1; NaN with one replicate),
    ``n_replicates``. Sorted by ``keys``.
    """
    df = _ok(results)
    keys = _with_implicit(keys, df)
    if df.empty:
        return pd.DataFrame(columns=[*keys, "acc_mean", "acc_std_replicates", "n_replicates"])
    grouped = df.groupby(keys, dropna=False, sort=True)["acc_mean"]
    out = grouped.agg(acc_mean="mean", acc_std_replicates=lambda s: s.std(ddof=1) if len(s) > 1 else math.nan,
                      n_replicates="size")
    out["n_replicates"] = out["n_replicates"].astype(int)
    return out.reset_index()


# --------------------------------------------------------------------------- paired comparisons

_PAIRED_COLUMNS = (
    "method", "requested_budget", "target", "shots", "arm", "replicate", "baseline", "n", "mean_diff",
    "effect_size", "statistic", "p_value", "p_holm", "significant", "test_method",
    "n_nonzero", "median_diff", "row_id", "baseline_row_id",
)


def _episode_map(episodes: pd.DataFrame) -> dict[str, dict[int, float]]:
    """row_id -> {episode index -> accuracy}."""
    out: dict[str, dict[int, float]] = {}
    for rid, ep, acc in zip(episodes["row_id"].astype(str), episodes["episode"], episodes["accuracy"], strict=True):
        out.setdefault(rid, {})[int(ep)] = float(acc)
    return out


def paired_comparisons(results: pd.DataFrame, episodes: pd.DataFrame, baselines: Sequence[str] = BASELINES,
                       alpha: float = 0.05, *, budget_free: Sequence[str] | None = None) -> pd.DataFrame:
    """Wilcoxon signed-rank test of every method row against each baseline on the shared episodes.

    ``results`` is results.csv, ``episodes`` is episodes.csv (``row_id, episode, accuracy``; read
    ``row_id`` as text). For each row (status "ok") of a method other than the baseline, the
    baseline row is the ok row with the same target, shots, arm, replicate (and ways when present)
    and, unless the baseline is budget-free (``budget_free``; default: the registry's budget-free
    methods, :func:`budget_free_methods`, e.g. dense: one budget-1.0 row, the largest budget is taken
    if there are several), the same requested_budget. Rows without such a
    baseline row are skipped (e.g. random not in the study, the reinit arm of a target-side method).
    Per-episode accuracies are paired by episode index over the intersection of the two rows'
    episodes; ``n`` is its size (0: no test, NaN statistics). One output row per replicate.

    Multiple comparisons: the family is the whole table (every method, budget, target, shots, arm,
    replicate and baseline together); ``p_holm`` is Holm-adjusted over all its finite p-values, and
    ``significant`` is ``p_holm < alpha``.

    Columns: method, requested_budget, target, shots, arm, replicate, baseline, n, mean_diff
    (mean of method - baseline accuracy, fraction), effect_size (rank-biserial r, positive when the
    method is better), statistic (min(W+, W-)), p_value (two-sided), p_holm, significant,
    test_method ("exact" | "normal" | "none"), n_nonzero, median_diff, row_id, baseline_row_id,
    plus ways when ``results`` has it. Sorted by method, budget (descending), target, shots, arm,
    replicate and baseline in the order given.
    """
    extra = ["ways"] if "ways" in results.columns else []
    columns = [*_PAIRED_COLUMNS, *extra]
    df = results.copy()
    if "status" in df.columns:
        df = df[df["status"].fillna("").astype(str) == "ok"]
    budget_free = budget_free_methods(df["method"]) if budget_free is None else budget_free
    match_cols = ["target", "shots", "arm", "replicate", *extra]
    eps = _episode_map(episodes)
    records = []
    for base in baselines:
        base_rows = df[df["method"].astype(str) == base]
        index: dict[tuple, list[tuple[float, Any]]] = {}
        for _, row in base_rows.iterrows():
            key = tuple(_norm(c, row[c]) for c in match_cols)
            if base not in budget_free:
                key = (*key, budget_value(row["requested_budget"]))
            index.setdefault(key, []).append((budget_value(row["requested_budget"]), row))
        for _, row in df[df["method"].astype(str) != base].iterrows():
            key = tuple(_norm(c, row[c]) for c in match_cols)
            if base not in budget_free:
                key = (*key, budget_value(row["requested_budget"]))
            if key not in index:
                continue
            base_row = max(index[key], key=lambda t: t[0])[1]
            ours, theirs = eps.get(str(row["row_id"]), {}), eps.get(str(base_row["row_id"]), {})
            shared = sorted(set(ours) & set(theirs))
            record = {c: row[c] for c in ("method", "requested_budget", "target", "shots", "arm", "replicate",
                                          *extra)}
            record.update(baseline=base, n=len(shared), row_id=str(row["row_id"]),
                          baseline_row_id=str(base_row["row_id"]))
            if shared:
                res = wilcoxon_signed_rank([ours[e] for e in shared], [theirs[e] for e in shared])
                record.update(mean_diff=res["mean_diff"], median_diff=res["median_diff"],
                              effect_size=res["effect_size"], statistic=res["statistic"], p_value=res["p_value"],
                              n_nonzero=res["n_nonzero"], test_method=res["method"])
            else:
                record.update(mean_diff=math.nan, median_diff=math.nan, effect_size=math.nan, statistic=math.nan,
                              p_value=math.nan, n_nonzero=0, test_method="none")
            records.append(record)
    if not records:
        return pd.DataFrame(columns=columns)
    out = pd.DataFrame.from_records(records)
    out["p_holm"] = holm(out["p_value"].tolist())
    out["significant"] = (out["p_holm"] < alpha).fillna(False).astype(bool)
    base_order = {b: i for i, b in enumerate(baselines)}
    out = out.assign(_b=-pd.to_numeric(out["requested_budget"], errors="coerce"), _o=out["baseline"].map(base_order))
    out = out.sort_values(["method", "_b", "target", "shots", "arm", "replicate", "_o"], kind="mergesort")
    return out[columns].reset_index(drop=True)


# --------------------------------------------------------------------------- rank table


def rank_table(results: pd.DataFrame, keys: Sequence[str] = ("target", "shots", "arm", "requested_budget"),
               *, budget_free: Sequence[str] | None = None, z: float = _Z95) -> pd.DataFrame:
    """Meta-Dataset ranks (:func:`ci_ranks`) of the methods in every cell.

    A cell is one value of ``keys`` (``ways`` added when it varies): the methods run at that
    requested_budget plus the budget-free methods (``budget_free``; default: the registry's,
    :func:`budget_free_methods`, e.g. dense, linear_probe; their budget-1.0 row, the largest budget if
    several) of the same target/shots/arm, which thus appear in every budget's
    cell. Where only budget-free methods ran, their own budget is the cell. Only ok rows count. A method
    whose rows repeat another method's arm in the same cell (the registry's ``repeats``: linear_probe is
    dense's linear_probe arm) is left out of that cell, so the same numbers are not ranked twice.

    Per (cell, method), replicates are combined: ``mean`` = mean of ``acc_mean`` over replicates,
    ``std`` = sqrt(mean of ``acc_std``^2) (pooled per-episode std), ``n`` = mean of ``n_episodes``
    (the episodes are shared by every replicate, so replicates do not add independent episodes).
    Columns: ``keys`` (the cell; ``requested_budget`` is the cell's budget), ``method``,
    ``method_budget`` (the method's own requested budget), ``mean``, ``std``, ``n`` (fractions;
    episodes), ``n_replicates``, ``rank`` (1 = best, shared when tied). Sorted by cell (budget
    descending), then rank and mean (descending).
    """
    columns_out = ["method", "method_budget", "mean", "std", "n", "n_replicates", "rank"]
    df = _ok(results)
    keys = _with_implicit(keys, df)
    budget_col = "requested_budget"
    if budget_col not in keys:
        raise ValueError(f"rank_table keys must include {budget_col!r}, got {keys}")
    group_keys = [k for k in keys if k != budget_col]
    if df.empty:
        return pd.DataFrame(columns=[*keys, *columns_out])
    df["acc_std"] = pd.to_numeric(df["acc_std"], errors="coerce").fillna(0.0)
    df["n_episodes"] = pd.to_numeric(df["n_episodes"], errors="coerce")
    df["_budget"] = df[budget_col].map(budget_value)
    per = df.groupby([*group_keys, "_budget", "method"], dropna=False, sort=True).agg(
        method_budget=(budget_col, "first"), mean=("acc_mean", "mean"), std=("acc_std", lambda s: (s**2).mean()),
        n=("n_episodes", "mean"), n_replicates=("acc_mean", "size"),
    ).reset_index()
    per["std"] = np.sqrt(per["std"])
    budget_free = budget_free_methods(per["method"]) if budget_free is None else budget_free
    free = per["method"].astype(str).isin(list(budget_free))
    records = []
    for gkey, group in per.groupby(group_keys, dropna=False, sort=True) if group_keys else [((), per)]:
        gkey = gkey if isinstance(gkey, tuple) else (gkey,)
        g_free = group[free.loc[group.index]]
        g_free = g_free.sort_values("_budget", kind="mergesort").drop_duplicates("method", keep="last")
        g_pruned = group[~free.loc[group.index]]
        budgets = sorted(set(g_pruned["_budget"]), reverse=True) or sorted(set(g_free["_budget"]), reverse=True)
        for budget in budgets:
            cell = pd.concat([g_pruned[g_pruned["_budget"] == budget], g_free])
            if "arm" in group_keys:  # a method that repeats another's numbers is ranked once, as that one
                arm = str(gkey[group_keys.index("arm")])
                cell = cell[~cell["method"].astype(str).isin(repeated_in(cell["method"], arm))]
            ranks = ci_ranks({str(r.method): (r.mean, r.std, r.n) for r in cell.itertuples()}, z=z)
            base = dict(zip(group_keys, gkey, strict=True))
            cell_budget = next(iter(cell.loc[cell["_budget"] == budget, "method_budget"]), budget)
            for r in cell.itertuples():
                records.append({**base, budget_col: cell_budget, "method": str(r.method),
                                "method_budget": r.method_budget, "mean": r.mean, "std": r.std, "n": r.n,
                                "n_replicates": int(r.n_replicates), "rank": ranks[str(r.method)]})
    out = pd.DataFrame.from_records(records, columns=[*keys, *columns_out])
    out = out.assign(_b=-pd.to_numeric(out[budget_col], errors="coerce"))
    out = out.assign(_m=-pd.to_numeric(out["mean"], errors="coerce"))
    out = out.sort_values([*group_keys, "_b", "rank", "_m", "method"], kind="mergesort").drop(columns=["_b", "_m"])
    return out.reset_index(drop=True)


def average_ranks(rank_df: pd.DataFrame) -> pd.DataFrame:
    """Mean rank per method over the cells of :func:`rank_table` (NaN ranks ignored).

    Columns: ``method``, ``mean_rank``, ``n_cells`` (cells the method is ranked in: budget-free
    methods sit in every budget's cell, linear_probe only in linear_probe-arm cells). Sorted by
    mean_rank, then method.
    """
    if rank_df.empty:
        return pd.DataFrame(columns=["method", "mean_rank", "n_cells"])
    df = rank_df[pd.to_numeric(rank_df["rank"], errors="coerce").notna()]
    out = df.groupby("method", sort=True)["rank"].agg(mean_rank="mean", n_cells="size").reset_index()
    out["n_cells"] = out["n_cells"].astype(int)
    return out.sort_values(["mean_rank", "method"], kind="mergesort").reset_index(drop=True)


_RANK_VALUE_COLUMNS = ("method", "method_budget", "mean", "std", "n", "n_replicates", "rank")


def _cell_key(row: Any, keys: Sequence[str]) -> tuple:
    return tuple(budget_value(getattr(row, k)) if k == "requested_budget" else str(getattr(row, k)) for k in keys)


def common_cell_ranks(rank_df: pd.DataFrame) -> pd.DataFrame:
    """Mean rank per method over the *common cells*: the cells of :func:`rank_table` every ranked method
    is ranked in, so every mean averages the same cells (like with like).

    When the ranked methods share no cell, methods are set aside one at a time until the rest share one:
    each time the method whose removal leaves the most common cells (ties: the method ranked in fewer
    cells, then by name). A set-aside method gets no mean rank. When no two methods share a cell there is
    no common cell: every method is set aside.

    Columns: ``method``, ``mean_rank`` (over the common cells; NaN when set aside), ``n_cells`` (the
    common cells it averages over; 0 when set aside), ``n_ranked`` (every cell it is ranked in),
    ``common`` (whether it is in the comparison). Sorted by mean_rank (set-aside methods last), then method.
    """
    columns = ["method", "mean_rank", "n_cells", "n_ranked", "common"]
    if rank_df.empty:
        return pd.DataFrame(columns=columns)
    df = rank_df[pd.to_numeric(rank_df["rank"], errors="coerce").notna()]
    keys = [c for c in df.columns if c not in _RANK_VALUE_COLUMNS]
    cells: dict[str, dict[tuple, float]] = {}
    for row in df.itertuples(index=False):
        cells.setdefault(str(row.method), {})[_cell_key(row, keys)] = float(row.rank)
    if not cells:
        return pd.DataFrame(columns=columns)

    def shared(names: Iterable[str]) -> set[tuple]:
        return set.intersection(*(set(cells[m]) for m in names))

    kept = sorted(cells)
    while len(kept) > 1 and not shared(kept):
        kept.remove(min(kept, key=lambda m: (-len(shared([k for k in kept if k != m])), len(cells[m]), m)))
    common = shared(kept) if len(cells) == 1 or len(kept) > 1 else set()
    records = []
    for method, ranks in sorted(cells.items()):
        inside = method in kept and bool(common)
        mean = float(np.mean([ranks[c] for c in common])) if inside else math.nan
        records.append({"method": method, "mean_rank": mean, "n_cells": len(common) if inside else 0,
                        "n_ranked": len(ranks), "common": inside})
    out = pd.DataFrame.from_records(records, columns=columns)
    out = out.assign(_set_aside=~out["common"]).sort_values(["_set_aside", "mean_rank", "method"], kind="mergesort")
    return out.drop(columns="_set_aside").reset_index(drop=True)


def mean_ci(values: list[float]) -> dict[str, float]:
    """Mean, sample std, 95% CI half-width 1.96*std/sqrt(n), and n of per-episode accuracies."""
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = sum(values) / n
    std = statistics.stdev(values) if n > 1 else 0.0
    return {"mean": mean, "std": std, "ci95": 1.96 * std / math.sqrt(n), "n": n}
