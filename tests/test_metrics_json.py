"""metrics.json is a summary `dvc metrics show` prints readably: dvc renders one table row per metrics file
and one column per leaf, so the summary has one column per (method, shots) and a few counts, however many
budgets, arms, targets and replicates the study has. Rendered here with dvc's own table code."""

from __future__ import annotations

import itertools
import json

import pytest
from dvc.compare import show_metrics

from pruneshot.stages.aggregate import metrics_summary

ARMS = ["finetune", "linear_probe", "reinit", "prototype"]


def _rows(budgets: list[float], targets: list[str], replicates: int) -> list[dict]:
    """A results table's rows: dense at budget 1, random (source side, every arm) and basis_scaling (target
    side, no reinit) at ``budgets``, 1 and 5 shots; accuracy encodes the cell; one random cell failed."""
    rows = []
    grid = [("dense", [1.0], ARMS), ("random", budgets, ARMS), ("basis_scaling", budgets, ARMS[:2] + ARMS[3:])]
    for method, bs, arms in grid:
        for b, target, shots, arm, rep in itertools.product(bs, targets, (1, 5), arms, range(replicates)):
            acc = 0.5 + 0.01 * shots + 0.1 * b + 0.001 * ARMS.index(arm) + 0.0001 * rep
            acc += 0.00001 * targets.index(target)
            rows.append({"method": method, "requested_budget": b, "target": target, "shots": shots, "arm": arm,
                         "replicate": rep, "status": "ok", "acc_mean": acc})
    rows[-1] |= {"method": "random", "status": "failed", "acc_mean": float("nan")}
    rows.append({"method": "l1_filter", "requested_budget": budgets[0], "target": targets[0], "shots": 1,
                 "arm": "finetune", "replicate": 0, "status": "failed", "acc_mean": float("nan")})
    return rows


def _render(metrics: dict, capsys: pytest.CaptureFixture[str]) -> list[str]:
    """`dvc metrics show metrics.json`'s lines (its rendering function, on metrics.json's JSON text)."""
    data = json.loads(json.dumps(metrics, allow_nan=False))
    show_metrics({"workspace": {"data": {"metrics.json": {"data": data}}}}, precision=5, round_digits=True)
    return capsys.readouterr().out.splitlines()


def test_metrics_json_has_one_column_per_method_and_shots_and_the_counts(capsys):
    rows = _rows([0.5, 0.25], ["t0", "t1"], 3)
    m = metrics_summary(rows, ARMS)
    assert m["rows"] == {"ok": len(rows) - 2, "failed": 2}
    assert m["failed"] == {"l1_filter": 1, "random": 1}
    assert m["headline"] == {"arm": "finetune", "budget": 0.25}
    # the tightest budget, the first configured arm, averaged over targets and replicates
    mean = sum(0.5 + 0.05 + 0.025 + 0.0001 * r + 0.00001 * t for r in range(3) for t in range(2)) / 6
    assert m["random"]["5shot"] == pytest.approx(mean, abs=1e-4)
    assert m["dense"] == {"1shot": pytest.approx(0.61, abs=1e-3), "5shot": pytest.approx(0.65, abs=1e-3),
                          "budget": 1.0}
    assert set(m["basis_scaling"]) == {"1shot", "5shot"} and "l1_filter" not in m  # no ok row: only counted
    lines = _render(m, capsys)
    headers = lines[0].split()[1:]
    assert len(lines) == 2 and len(headers) == 2 + 2 + 3 * 2 + 1 + 2  # rows, headline, acc, dense.budget, failed
    # each column is as wide as its header (the values are shorter) plus dvc's two-space gap
    assert max(map(len, lines)) <= len("metrics.json  ") + sum(len(h) + 4 for h in headers) <= 260


def test_metrics_json_width_does_not_grow_with_budgets_targets_arms_or_replicates(capsys):
    small = _render(metrics_summary(_rows([0.5], ["t0"], 1), ARMS[:1] + ARMS[1:]), capsys)
    big = _render(metrics_summary(_rows([0.75, 0.5, 0.25, 0.1], ["t0", "t1", "t2"], 5), ARMS), capsys)
    assert len(small) == len(big) == 2
    assert small[0].split() == big[0].split()
    assert max(map(len, big)) == max(map(len, small)) < 260


def test_a_method_without_the_first_arm_names_the_arm_it_reports():
    rows = [{"method": "linear_probe", "requested_budget": 1.0, "target": "t", "shots": 1, "arm": "linear_probe",
             "replicate": 0, "status": "ok", "acc_mean": 0.7},
            {"method": "random", "requested_budget": 0.5, "target": "t", "shots": 1, "arm": "finetune",
             "replicate": 0, "status": "ok", "acc_mean": 0.6}]
    m = metrics_summary(rows, ARMS)
    assert m["linear_probe"] == {"1shot": 0.7, "arm": "linear_probe", "budget": 1.0}
    assert m["random"] == {"1shot": 0.6} and "failed" not in m
