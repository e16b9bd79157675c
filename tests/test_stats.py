"""Tests for pruneshot.report.stats: Wilcoxon against a reference implementation, scipy and by hand, Holm,
Meta-Dataset ranks, tables."""

from __future__ import annotations

import math
from functools import cache
from typing import Any

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from pruneshot.config import budget_label, budget_value
from pruneshot.report.load import method_order
from pruneshot.report.stats import (
    EXACT_MAX_N,
    average_ranks,
    budget_free_methods,
    ci_ranks,
    holm,
    paired_comparisons,
    rank_table,
    replicate_spread,
    wilcoxon_signed_rank,
)


def scipy_wilcoxon(a, b, method: str):
    """scipy with the settings that match our definition (scipy's defaults do not: correction=False,
    and method="auto" runs a permutation test when there are zeros or ties and n <= 13)."""
    return sps.wilcoxon(a, b, zero_method="wilcox", correction=True, alternative="two-sided", method=method)


# --------------------------------------------------------------------------- reference Wilcoxon
# The product calls scipy.stats.wilcoxon; this is the independent implementation it replaced, kept as
# the reference the scipy-based results are compared against.


@cache
def _rank_sum_counts(n: int) -> tuple[int, ...]:
    """counts[s] = number of subsets of the ranks {1..n} whose sum is s (s = 0..n(n+1)/2).

    Under H0 each of the 2**n sign assignments is equally likely, so W+ = s with probability
    counts[s] / 2**n. Built by dynamic programming: adding rank k shifts a copy of the counts by k.
    """
    counts = [1]
    for k in range(1, n + 1):
        new = counts + [0] * k
        for s, c in enumerate(counts):
            new[s + k] += c
        counts = new
    return tuple(counts)


def _average_ranks(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ranks 1..n of ``values`` (ties get the mean of their positions) and the sizes of tie groups."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=float)
    sizes = []
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1  # positions i..j (0-based) -> mean rank
        sizes.append(j - i + 1)
        i = j + 1
    return ranks, np.asarray(sizes, dtype=float)


def reference_wilcoxon(a, b, *, decimals: int | None = 12) -> dict[str, Any]:
    """Two-sided Wilcoxon signed-rank test by hand, same definition and fields as ``wilcoxon_signed_rank``:
    exact null distribution (integer counts) when n' <= 50 without tied |d|, else the normal
    approximation with tie and 0.5 continuity correction."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
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
    ranks, tie_sizes = _average_ranks(np.abs(nonzero))
    w_plus = float(ranks[nonzero > 0].sum())
    w_minus = float(ranks[nonzero < 0].sum())
    statistic = min(w_plus, w_minus)
    if m <= EXACT_MAX_N and not (tie_sizes > 1).any():
        counts = _rank_sum_counts(m)
        lower = sum(counts[: round(statistic) + 1])  # P(W <= statistic) * 2**m
        p_value = min(1.0, 2 * lower / 2**m)
        method = "exact"
    else:
        mu = m * (m + 1) / 4
        var = m * (m + 1) * (2 * m + 1) / 24 - float((tie_sizes**3 - tie_sizes).sum()) / 48
        dev = w_plus - mu
        z = (dev - 0.5 * math.copysign(1.0, dev)) / math.sqrt(var) if dev != 0 else 0.0
        p_value = min(1.0, math.erfc(abs(z) / math.sqrt(2)))  # 2 * (1 - Phi(|z|))
        method = "normal"
    return {**result, "w_plus": w_plus, "w_minus": w_minus, "statistic": statistic, "p_value": p_value,
            "method": method, "effect_size": (w_plus - w_minus) / (w_plus + w_minus)}


def assert_matches_reference(a, b) -> dict[str, Any]:
    """``wilcoxon_signed_rank(a, b)`` equals the reference: p to 1e-12 (relative), everything else exactly."""
    res, ref = wilcoxon_signed_rank(a, b), reference_wilcoxon(a, b)
    assert set(res) == set(ref)
    assert res["p_value"] == pytest.approx(ref["p_value"], rel=1e-12, abs=1e-300)
    for key in ref.keys() - {"p_value"}:
        assert res[key] == ref[key] or (math.isnan(res[key]) and math.isnan(ref[key])), key
    return res


# --------------------------------------------------------------------------- Wilcoxon


@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 8, 13, 14, 20, 49, 50, 51, 60, 120])
@pytest.mark.parametrize("kind", ["continuous", "grid", "with_zeros"])
def test_wilcoxon_matches_reference(n, kind):
    rng = np.random.default_rng(1000 * n + len(kind))
    if kind == "continuous":  # no ties: exact up to 50 differences
        a, b = rng.normal(0.6, 0.1, n), rng.normal(0.55, 0.1, n)
    else:  # accuracies on 25 query images: ties, and zeros for "with_zeros"
        a = rng.integers(10, 25, n) / 25
        b = a.copy() if kind == "with_zeros" else rng.integers(10, 25, n) / 25
        if kind == "with_zeros":
            changed = rng.random(n) < 0.6
            b[changed] = rng.integers(10, 25, int(changed.sum())) / 25
    res = assert_matches_reference(a, b)
    if kind == "continuous":
        assert res["method"] == ("exact" if n <= EXACT_MAX_N else "normal")


def test_wilcoxon_matches_reference_on_extreme_samples():
    # all positive (the smallest exact p, 2 / 2**50), one sign flip, a tiny shift of tied values
    for n in (10, 50):
        assert_matches_reference(np.arange(1, n + 1) / 100 + 0.5, np.full(n, 0.5))
        a = np.arange(1, n + 1) / 100 + 0.5
        a[0] = 0.49
        assert_matches_reference(a, np.full(n, 0.5))
    assert_matches_reference([0.68, 0.44, 0.9, 0.3], [0.64, 0.40, 0.7, 0.3])
    assert_matches_reference(np.full(80, 0.7), np.full(80, 0.6))  # 80 tied differences: normal


def test_wilcoxon_hand_exact_with_zero():
    a = [1.0, 0.8, 0.5, 0.6, 0.9]
    b = [0.9, 0.5, 0.7, 0.6, 0.5]
    # d = [0.1, 0.3, -0.2, 0.0, 0.4]; the zero is dropped -> n' = 4.
    # |d| = 0.1, 0.3, 0.2, 0.4 -> ranks 1, 3, 2, 4; W+ = 1 + 3 + 4 = 8, W- = 2; statistic = 2.
    # Null distribution of W+ for n' = 4 (subsets of {1,2,3,4} by sum, 16 in all):
    # sum 0:1 1:1 2:1 3:2 4:2 5:2 6:2 7:2 8:1 9:1 10:1 -> P(W <= 2) = 3/16, p = 2 * 3/16 = 0.375.
    # r = (8 - 2) / (8 + 2) = 0.6; mean d = 0.6 / 5 = 0.12; median of (-0.2, 0, 0.1, 0.3, 0.4) = 0.1.
    res = wilcoxon_signed_rank(a, b)
    assert res["n"] == 5 and res["n_nonzero"] == 4
    assert res["w_plus"] == 8.0 and res["w_minus"] == 2.0 and res["statistic"] == 2.0
    assert res["method"] == "exact"
    assert res["p_value"] == pytest.approx(0.375, abs=1e-15)
    assert res["effect_size"] == pytest.approx(0.6)
    assert res["mean_diff"] == pytest.approx(0.12, abs=1e-12)
    assert res["median_diff"] == pytest.approx(0.1, abs=1e-12)
    ref = scipy_wilcoxon(a, b, "exact")
    assert res["statistic"] == ref.statistic and res["p_value"] == pytest.approx(ref.pvalue, rel=1e-12)


def test_wilcoxon_hand_normal_with_ties():
    d = [1, 1, -1, 2, 3, 3]
    # |d| = 1,1,1,2,3,3 -> ranks 2,2,2 (mean of 1..3), 4, 5.5,5.5 (mean of 5,6).
    # W+ = 2 + 2 + 4 + 5.5 + 5.5 = 19, W- = 2, statistic 2; ties -> normal approximation.
    # mu = 6*7/4 = 10.5; sigma^2 = 6*7*13/24 - ((3^3-3) + (2^3-2))/48 = 22.75 - 30/48 = 22.125.
    # z = (19 - 10.5 - 0.5) / sqrt(22.125) = 8 / 4.70372 = 1.700781; p = 2 * (1 - Phi(z)) = 0.0889842.
    res = wilcoxon_signed_rank(d, [0] * 6)
    assert (res["w_plus"], res["w_minus"], res["statistic"]) == (19.0, 2.0, 2.0)
    assert res["method"] == "normal"
    assert res["p_value"] == pytest.approx(0.08898415384687433, rel=1e-12)
    assert res["effect_size"] == pytest.approx(17 / 21)
    assert res["p_value"] == pytest.approx(scipy_wilcoxon(d, [0] * 6, "asymptotic").pvalue, rel=1e-12)
    # scipy's defaults give another number here: no continuity correction and a permutation test.
    assert sps.wilcoxon(d, [0] * 6).pvalue == pytest.approx(0.125)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 7, 8, 12, 20, 50])
def test_wilcoxon_matches_scipy_exact(n):
    rng = np.random.default_rng(100 + n)
    a, b = rng.normal(0.6, 0.1, n), rng.normal(0.55, 0.1, n)
    res = wilcoxon_signed_rank(a, b)
    ref = scipy_wilcoxon(a, b, "exact")
    assert res["method"] == "exact" and res["n_nonzero"] == n
    assert res["statistic"] == ref.statistic
    assert res["p_value"] == pytest.approx(ref.pvalue, rel=1e-12, abs=1e-300)
    assert res["w_plus"] + res["w_minus"] == n * (n + 1) / 2


def test_wilcoxon_n1_and_n2_exact_values():
    # n' = 1: W+ in {0, 1} each with prob 1/2 -> p = min(1, 2 * 1/2) = 1.
    assert wilcoxon_signed_rank([0.7], [0.5])["p_value"] == 1.0
    # n' = 3, all positive: W- = 0, P(W <= 0) = 1/8 -> p = 0.25.
    assert wilcoxon_signed_rank([0.9, 0.8, 0.75], [0.5, 0.6, 0.7])["p_value"] == 0.25


def test_wilcoxon_matches_scipy_large_sample_normal():
    rng = np.random.default_rng(7)
    a, b = rng.normal(0.6, 0.1, 60), rng.normal(0.57, 0.1, 60)
    res = wilcoxon_signed_rank(a, b)
    ref = scipy_wilcoxon(a, b, "asymptotic")
    assert res["method"] == "normal" and res["n_nonzero"] == 60
    assert res["statistic"] == ref.statistic
    assert res["p_value"] == pytest.approx(ref.pvalue, rel=1e-10)


@pytest.mark.parametrize("n", [5, 8, 10, 20, 60])
def test_wilcoxon_matches_scipy_with_ties_and_zeros(n):
    rng = np.random.default_rng(n)
    # Episode accuracies on 25 query images: multiples of 0.04, so ties and zeros are common.
    a = rng.integers(10, 25, n) / 25
    b = rng.integers(10, 25, n) / 25
    ai, bi = (a * 25).round(), (b * 25).round()  # the same data as exact integers for scipy
    res = wilcoxon_signed_rank(a, b)
    ref = scipy_wilcoxon(ai, bi, "asymptotic")
    assert res["method"] == "normal"
    assert res["n_nonzero"] == int(np.count_nonzero(ai != bi))
    assert res["statistic"] == ref.statistic
    assert res["p_value"] == pytest.approx(ref.pvalue, rel=1e-10)


def test_wilcoxon_zeros_without_ties_is_exact_like_scipy_exact():
    a = [0.5, 0.61, 0.72, 0.4, 0.9, 0.33, 0.8]
    b = [0.5, 0.60, 0.69, 0.4, 0.86, 0.38, 0.7]  # d: 0, .01, .03, 0, .04, -.05, .1 -> n' = 5, no ties
    # ranks of |d| = .01 .03 .04 .05 .1 -> 1 2 3 4 5; W- = 4, W+ = 11. Subsets of {1..5} with sum <= 4:
    # {}, {1}, {2}, {3}, {1,2}, {4}, {1,3} -> P(W <= 4) = 7/32 -> p = 14/32 = 0.4375.
    res = wilcoxon_signed_rank(a, b)
    assert res["method"] == "exact" and res["n_nonzero"] == 5
    assert (res["w_plus"], res["w_minus"]) == (11.0, 4.0)
    assert res["p_value"] == pytest.approx(0.4375, abs=1e-15)
    assert res["p_value"] == pytest.approx(scipy_wilcoxon(a, b, "exact").pvalue, rel=1e-12)


def test_wilcoxon_float_noise_is_a_tie():
    # 0.68 - 0.64 and 0.44 - 0.40 differ in the 17th digit but are the same accuracy difference.
    res = wilcoxon_signed_rank([0.68, 0.44, 0.9], [0.64, 0.40, 0.7])
    assert res["method"] == "normal"
    assert res["w_plus"] == 6.0 and res["statistic"] == 0.0  # ranks 1.5, 1.5, 3


def test_wilcoxon_all_zero_and_symmetry():
    res = wilcoxon_signed_rank([0.5, 0.6], [0.5, 0.6])
    assert res["p_value"] == 1.0 and res["statistic"] == 0.0 and res["effect_size"] == 0.0
    assert res["n"] == 2 and res["n_nonzero"] == 0 and res["mean_diff"] == 0.0
    a, b = [0.9, 0.7, 0.65, 0.8], [0.6, 0.75, 0.6, 0.5]
    fwd, back = wilcoxon_signed_rank(a, b), wilcoxon_signed_rank(b, a)
    assert fwd["p_value"] == back["p_value"] and fwd["effect_size"] == -back["effect_size"]
    with pytest.raises(ValueError):
        wilcoxon_signed_rank([0.1, 0.2], [0.1])


# --------------------------------------------------------------------------- Holm


def test_holm_by_hand():
    # Finite p: m = 4. Sorted: 0.005 (x4), 0.01 (x3), 0.03 (x2), 0.04 (x1)
    # -> 0.02, 0.03, 0.06, max(0.06, 0.04) = 0.06. The NaN stays NaN and is not counted.
    out = holm([0.01, 0.04, math.nan, 0.03, 0.005])
    assert out[0] == pytest.approx(0.03) and out[1] == pytest.approx(0.06)
    assert math.isnan(out[2])
    assert out[3] == pytest.approx(0.06) and out[4] == pytest.approx(0.02)
    # Capped at 1: 2 * 0.5 = 1.0, then max(1.0, 0.6) = 1.0.
    assert holm([0.5, 0.6]) == [1.0, 1.0]
    # Monotone: sorted 0.2 -> 3 * 0.2 = 0.6, 0.3 -> max(0.6, 2 * 0.3) = 0.6, 0.9 -> 0.9.
    assert holm([0.3, 0.2, 0.9]) == pytest.approx([0.6, 0.6, 0.9])
    assert holm([0.01, 0.01]) == pytest.approx([0.02, 0.02])
    assert holm([]) == []


# --------------------------------------------------------------------------- ranks


def test_ci_ranks_ties_by_hand():
    cells = {"A": (0.80, 0.10, 100), "B": (0.78, 0.10, 100), "C": (0.70, 0.10, 100), "D": (0.69, 0.05, 100)}
    # A best; margin A-B = 1.96 * sqrt(0.01/100 + 0.01/100) = 0.02772 >= 0.02 -> tied; A-C, A-D: 0.10, 0.11 > 0.0277.
    # Group {A, B}: rank 1. Remaining C, D: margin = 1.96 * sqrt(0.0001 + 0.000025) = 0.02191 >= 0.01 -> rank 3.
    assert ci_ranks(cells) == {"A": 1.0, "B": 1.0, "C": 3.0, "D": 3.0}


def test_ci_ranks_no_ties_single_and_non_transitive():
    # margins 1.96 * sqrt(2e-6) = 0.00277 < 0.1 -> strict order
    assert ci_ranks({"x": (0.7, 0.01, 100), "y": (0.9, 0.01, 100), "z": (0.8, 0.01, 100)}) == {
        "x": 3.0, "y": 1.0, "z": 2.0}
    assert ci_ranks({"only": (0.5, 0.2, 10)}) == {"only": 1.0}
    # A-B diff 0.02 <= 0.0277 tied; A-C diff 0.04 > 0.0277 not; B-C would tie but groups are judged
    # against the best remaining method only, so C starts the next group: rank 1 + 2 = 3.
    assert ci_ranks({"A": (0.80, 0.1, 100), "B": (0.78, 0.1, 100), "C": (0.76, 0.1, 100)}) == {
        "A": 1.0, "B": 1.0, "C": 3.0}
    # equal means always tie, even with zero std
    assert ci_ranks({"p": (0.5, 0.0, 10), "q": (0.5, 0.0, 10)}) == {"p": 1.0, "q": 1.0}


def test_ci_ranks_nan_std_counts_as_zero():
    # margin = 1.96 * sqrt(0 + 0.02^2/4) = 1.96 * 0.01 = 0.0196
    assert ci_ranks({"A": (0.80, math.nan, 1), "B": (0.79, 0.02, 4)}) == {"A": 1.0, "B": 1.0}  # 0.01 <= 0.0196
    assert ci_ranks({"A": (0.80, math.nan, 1), "B": (0.77, 0.02, 4)}) == {"A": 1.0, "B": 2.0}  # 0.03 > 0.0196
    out = ci_ranks({"A": (0.8, 0.1, 10), "B": (math.nan, 0.1, 10)})
    assert out["A"] == 1.0 and math.isnan(out["B"])


# --------------------------------------------------------------------------- tables

def _row(method, budget, arm, replicate, acc, std=0.1, n=100, status="ok", shots=1, row_id=None):
    return {"row_id": row_id or f"{method}-{budget}-{arm}-{replicate}", "method": method,
            "requested_budget": budget, "target": "digits_5to9", "ways": 5, "shots": shots, "arm": arm,
            "replicate": replicate, "status": status, "acc_mean": acc, "acc_std": std, "n_episodes": n}


def test_replicate_spread_by_hand():
    results = pd.DataFrame([
        _row("dense", 1.0, "finetune", 0, 0.80), _row("dense", 1.0, "finetune", 1, 0.84),
        _row("dense", 1.0, "finetune", 2, 0.86),
        _row("random", 0.5, "finetune", 0, 0.70),
        _row("random", 0.5, "finetune", 1, math.nan, status="failed"),
    ])
    out = replicate_spread(results).set_index("method")
    # dense: mean (0.80 + 0.84 + 0.86)/3 = 0.833333; deviations -0.03333, 0.00667, 0.02667;
    # squares 0.0011111 + 0.0000444 + 0.0007111 = 0.0018667; / (3 - 1) = 0.00093333; sqrt = 0.0305505.
    assert out.loc["dense", "acc_mean"] == pytest.approx(0.8333333333)
    assert out.loc["dense", "acc_std_replicates"] == pytest.approx(0.0305505046)
    assert out.loc["dense", "n_replicates"] == 3
    # random: the failed replicate does not count -> one replicate, std NaN
    assert out.loc["random", "acc_mean"] == pytest.approx(0.70)
    assert math.isnan(out.loc["random", "acc_std_replicates"])
    assert out.loc["random", "n_replicates"] == 1
    assert list(out.reset_index().columns) == ["method", "requested_budget", "target", "shots", "arm",
                                               "acc_mean", "acc_std_replicates", "n_replicates"]


def _paired_fixture():
    """results + episodes: 8 shared episodes; which comparisons exist is known by construction."""
    rng = np.random.default_rng(3)
    base = rng.normal(0.6, 0.1, 8)
    rows, eps = [], {}

    def add(method, budget, arm, replicate, acc, status="ok", row_id=None):
        row = _row(method, budget, arm, replicate, float(np.mean(acc)) if acc is not None else math.nan,
                   n=8, status=status, row_id=row_id)
        rows.append(row)
        if acc is not None:
            eps[row["row_id"]] = acc

    add("dense", 1.0, "finetune", 0, base, row_id="1e5")  # looks like a float to a naive reader
    add("dense", 1.0, "linear_probe", 0, base - 0.1)
    add("dense", 1.0, "finetune", 1, base + 0.01)
    add("random", 0.5, "finetune", 0, base + rng.normal(-0.02, 0.05, 8))
    add("l1_filter", 0.5, "finetune", 0, base + rng.normal(0.01, 0.05, 8))
    add("l1_filter", 0.5, "finetune", 1, base + rng.normal(0.0, 0.05, 8))
    add("l1_filter", 0.25, "finetune", 0, base + 0.1 + np.arange(8) * 0.001)  # always better: p = 2/256
    # linear_probe ties with dense on every episode but two: d = +0.04, -0.04, then 0 x6
    lp = base - 0.1
    lp[0] += 0.04
    lp[1] -= 0.04
    add("linear_probe", 1.0, "linear_probe", 0, lp)
    add("slimming", 0.5, "finetune", 0, None, status="failed")
    episodes = pd.DataFrame([{"row_id": rid, "episode": i, "accuracy": float(a)}
                             for rid, acc in eps.items() for i, a in enumerate(acc)])
    # l1_filter 0.5 r1 lost episode 7 and dense r1 episode 0: paired on the 6 shared episodes 1..6
    episodes = episodes[~((episodes["row_id"] == "l1_filter-0.5-finetune-1") & (episodes["episode"] == 7))
                        & ~((episodes["row_id"] == "dense-1.0-finetune-1") & (episodes["episode"] == 0))]
    return pd.DataFrame(rows), episodes, eps


def test_paired_comparisons_pairs_and_pvalues():
    results, episodes, eps = _paired_fixture()
    out = paired_comparisons(results, episodes)
    got = {(r.method, r.requested_budget, r.arm, r.replicate, r.baseline): r for r in out.itertuples()}
    # Exist: l1 0.5 r0 vs dense and random; l1 0.5 r1 vs dense (no random r1); l1 0.25 vs dense (no random
    # at 0.25); random vs dense; linear_probe vs dense on its linear_probe arm. Not: self pairs, dense or
    # linear_probe vs random (no random at budget 1.0), the failed slimming row.
    all8 = list(range(8))
    expected = {
        ("l1_filter", 0.5, "finetune", 0, "dense"): ("l1_filter-0.5-finetune-0", "1e5", all8),
        ("l1_filter", 0.5, "finetune", 0, "random"): ("l1_filter-0.5-finetune-0", "random-0.5-finetune-0", all8),
        ("l1_filter", 0.5, "finetune", 1, "dense"): ("l1_filter-0.5-finetune-1", "dense-1.0-finetune-1",
                                                     [1, 2, 3, 4, 5, 6]),
        ("l1_filter", 0.25, "finetune", 0, "dense"): ("l1_filter-0.25-finetune-0", "1e5", all8),
        ("random", 0.5, "finetune", 0, "dense"): ("random-0.5-finetune-0", "1e5", all8),
        ("linear_probe", 1.0, "linear_probe", 0, "dense"): ("linear_probe-1.0-linear_probe-0",
                                                          "dense-1.0-linear_probe-0", all8),
    }
    assert set(got) == set(expected)
    for key, (rid, bid, shared) in expected.items():
        r = got[key]
        n = len(shared)
        assert (r.row_id, r.baseline_row_id, r.n) == (rid, bid, n)
        a, b = np.asarray(eps[rid])[shared], np.asarray(eps[bid])[shared]
        # differences rounded to 12 decimals as ours are (linear_probe's +-0.04 differ in the 17th digit)
        d = np.round(a - b, 12)
        ref = scipy_wilcoxon(d, np.zeros(n), "exact" if r.test_method == "exact" else "asymptotic")
        assert r.statistic == pytest.approx(ref.statistic)
        assert r.p_value == pytest.approx(ref.pvalue, rel=1e-10)
        assert r.mean_diff == pytest.approx(float(np.mean(a - b)), abs=1e-12)
    # l1 0.25 is better on all 8 episodes (distinct gaps): W- = 0, p = 2 * 1/256 = 0.0078125, r = 1
    best = got["l1_filter", 0.25, "finetune", 0, "dense"]
    assert best.test_method == "exact" and best.p_value == pytest.approx(0.0078125) and best.effect_size == 1.0
    # linear_probe vs dense: n' = 2 tied |d| -> normal; W+ = W- = 1.5 -> z = 0, p = 1
    lp = got["linear_probe", 1.0, "linear_probe", 0, "dense"]
    assert lp.test_method == "normal" and lp.p_value == 1.0 and lp.n_nonzero == 2
    # Holm over the whole table (6 tests), significance at 0.05
    assert out["p_holm"].tolist() == pytest.approx(holm(out["p_value"].tolist()))
    assert out["significant"].tolist() == [p < 0.05 for p in out["p_holm"]]
    assert list(out.columns[:15]) == ["method", "requested_budget", "target", "shots", "arm", "replicate",
                                      "baseline", "n", "mean_diff", "effect_size", "statistic", "p_value",
                                      "p_holm", "significant", "test_method"]


def test_paired_comparisons_holm_smallest_p_by_hand():
    results, episodes, _ = _paired_fixture()
    out = paired_comparisons(results, episodes)
    p = sorted(out["p_value"])
    # the smallest p is 0.0078125 (l1 0.25 vs dense; 2/256 is the smallest exact p for n' = 8)
    # and its Holm value is 6 * 0.0078125 = 0.046875 < 0.05 -> significant
    assert p[0] == pytest.approx(0.0078125)
    row = out[(out["method"] == "l1_filter") & (out["requested_budget"] == 0.25)].iloc[0]
    assert row["p_holm"] == pytest.approx(0.046875) and bool(row["significant"]) is True
    assert not out[out["method"] == "linear_probe"]["significant"].any()


def test_paired_comparisons_empty_without_baselines():
    results, episodes, _ = _paired_fixture()
    out = paired_comparisons(results[results["method"] == "l1_filter"], episodes)
    assert out.empty and "p_holm" in out.columns


def test_rank_table_and_average_ranks_by_hand():
    results = pd.DataFrame([
        # dense finetune over two replicates: mean (0.79 + 0.81)/2 = 0.80, std sqrt((0.08^2 + 0.1^2)/2) = 0.090554
        _row("dense", 1.0, "finetune", 0, 0.79, std=0.08), _row("dense", 1.0, "finetune", 1, 0.81, std=0.10),
        _row("l1_filter", 0.5, "finetune", 0, 0.78), _row("random", 0.5, "finetune", 0, 0.70),
        _row("l1_filter", 0.25, "finetune", 0, 0.60), _row("random", 0.25, "finetune", 0, 0.75),
        _row("slimming", 0.25, "finetune", 0, math.nan, status="failed"),
        _row("dense", 1.0, "linear_probe", 0, 0.55), _row("linear_probe", 1.0, "linear_probe", 0, 0.50),
    ])
    ranks = rank_table(results)
    cell = {(r.arm, r.requested_budget, r.method): r.rank for r in ranks.itertuples()}
    # budget 0.5 cell: dense 0.80, l1 0.78, random 0.70.
    #   dense-l1: 1.96 * sqrt(0.0082/100 + 0.01/100) = 0.02644 >= 0.02 -> tied (rank 1); random: 0.10 -> rank 3.
    # budget 0.25 cell: dense 0.80, random 0.75 (0.05 > 0.0264 -> rank 2), l1 0.60 (0.15 from random -> 3).
    # linear_probe arm: no pruned method -> the budget-1.0 cell: dense 0.55 alone; the linear_probe
    #   method repeats dense's linear_probe arm (registry: repeats) and is ranked once, as dense.
    assert cell == {
        ("finetune", 0.5, "dense"): 1.0, ("finetune", 0.5, "l1_filter"): 1.0, ("finetune", 0.5, "random"): 3.0,
        ("finetune", 0.25, "dense"): 1.0, ("finetune", 0.25, "random"): 2.0, ("finetune", 0.25, "l1_filter"): 3.0,
        ("linear_probe", 1.0, "dense"): 1.0,
    }
    dense = ranks[(ranks["method"] == "dense") & (ranks["arm"] == "finetune")].iloc[0]
    assert dense["mean"] == pytest.approx(0.80) and dense["std"] == pytest.approx(0.0905538514)
    assert dense["n"] == 100 and dense["n_replicates"] == 2 and dense["method_budget"] == 1.0
    avg = average_ranks(ranks)
    # dense (1, 1, 1) = 1.0 over 3 cells; l1 (1, 3) = 2.0; random (3, 2) = 2.5
    assert avg["method"].tolist() == ["dense", "l1_filter", "random"]
    assert avg["mean_rank"].tolist() == pytest.approx([1.0, 2.0, 2.5])
    assert avg["n_cells"].tolist() == [3, 2, 2]
    # without dense's linear_probe arm in the study, the linear_probe method is ranked as itself
    alone = rank_table(results[~((results["method"] == "dense") & (results["arm"] == "linear_probe"))])
    assert alone[alone["arm"] == "linear_probe"]["method"].tolist() == ["linear_probe"]


# --------------------------------------------------------------------------- budgets and the method registry


def test_budget_value_reads_labels_and_numbers():
    assert budget_value("0.5") == budget_value(0.5) == budget_value(budget_label(0.5)) == 0.5
    assert budget_value("1") == budget_value(1) == 1.0
    assert budget_value(0.25 + 1e-12) == 0.25  # rounded to 9 decimals
    assert budget_value(np.float64(0.1)) == 0.1
    for bad in ("", "dense", None, math.nan, math.inf):
        assert math.isnan(budget_value(bad))


def test_budget_free_methods_come_from_the_registry():
    names = ["random", "linear_probe", "l1_filter", "dense", "dense", "not_a_registered_method"]
    assert budget_free_methods(names) == ["dense", "linear_probe"]
    # budget-free first, then the rest, each by name; an unknown name is budget-dependent
    assert method_order(names) == ["dense", "linear_probe", "l1_filter", "not_a_registered_method", "random"]
    assert method_order(["slimming", "dap", "dense"]) == ["dense", "dap", "slimming"]


def test_paired_comparisons_unregistered_method_is_budget_dependent():
    results, episodes, _ = _paired_fixture()
    renamed = results.assign(method=results["method"].replace({"dense": "old_dense"}))
    # "old_dense" is not registered: matched at its own budget (1.0) only, so no pruned row pairs with it
    out = paired_comparisons(renamed, episodes, baselines=("old_dense",))
    assert set(out["method"]) == {"linear_probe"}
    # told explicitly that it is budget-free, it pairs like dense does
    out = paired_comparisons(renamed, episodes, baselines=("old_dense",), budget_free=("old_dense",))
    assert set(out["method"]) == {"l1_filter", "random", "linear_probe"}
