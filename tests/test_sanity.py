"""The three sanity gates (pruneshot.report.sanity) on hand-made records: each passes, fails and is
'not evaluated' when it should, and the report and the terminal say so."""

from __future__ import annotations

import copy

import pandas as pd
import pytest

from pruneshot.report.sanity import GATES, equal_by_construction, evaluate, sanity_html, summary_lines


def _eps(values: list[float]) -> list[dict]:
    return [{"episode": i, "accuracy": v} for i, v in enumerate(values)]


def _dense(shots: int, finetune: list[float], reinit: list[float], probe: list[float], pixels: list[float],
           replicate: int = 0) -> dict:
    return {"method": "dense", "status": "ok", "target": "t", "shots": shots, "replicate": replicate,
            "requested_budget": 1.0,
            "arms": {"finetune": {"episodes": _eps(finetune)}, "reinit": {"episodes": _eps(reinit)},
                     "linear_probe": {"episodes": _eps(probe)}},
            "controls": {"pixel_prototype": {"episodes": _eps(pixels)}}}


GOOD = [0.8, 0.7, 0.9, 0.85, 0.75, 0.8, 0.95, 0.7]
BAD = [0.5, 0.45, 0.6, 0.55, 0.4, 0.5, 0.6, 0.45]
CHECKS = [{"replicate": 0, "methods": [{"method": "random", "check": "search at budget 1.0", "equal": True,
                                        "detail": "every tensor equal"}]}]


def test_all_gates_pass_when_pretraining_helps_and_budget_one_is_dense():
    res = evaluate([_dense(1, GOOD, BAD, GOOD, BAD), _dense(5, GOOD, BAD, GOOD, BAD)], CHECKS)
    assert res["passed"] and res["failed"] == [] and res["not_evaluated"] == []
    panel = res["gates"]["pretraining_helps"]["panels"][0]
    assert panel["n"] == 8 and panel["mean_diff"] == pytest.approx(sum(GOOD) / 8 - sum(BAD) / 8)
    assert panel["p_value"] < 0.05 and panel["significant"]
    assert "All three sanity gates pass" in sanity_html(res)


def test_gate_a_fails_when_reinit_beats_the_pretrained_network_and_the_banner_says_what_it_means():
    res = evaluate([_dense(1, BAD, GOOD, GOOD, BAD)], CHECKS)
    assert res["failed"] == ["pretraining_helps"] and not res["passed"]
    html = sanity_html(res)
    assert 'class="banner fail"' in html and GATES["pretraining_helps"][0] in html
    assert GATES["pretraining_helps"][2] in html
    line = next(x for x in summary_lines(res) if "(a)" in x)
    assert "FAILED" in line and "useless prior" in line


def test_gate_b_fails_when_pixels_beat_the_probe_on_features():
    res = evaluate([_dense(1, GOOD, BAD, BAD, GOOD)], CHECKS)
    assert res["failed"] == ["features_beat_pixels"]


def test_a_one_panel_failure_fails_the_gate_and_replicates_are_paired_within_themselves():
    recs = [_dense(1, GOOD, BAD, GOOD, BAD), _dense(5, BAD, GOOD, GOOD, BAD)]
    assert "pretraining_helps" in evaluate(recs, CHECKS)["failed"]
    two = [_dense(1, GOOD, BAD, GOOD, BAD, replicate=0), _dense(1, GOOD, BAD, GOOD, BAD, replicate=1)]
    assert evaluate(two, CHECKS)["gates"]["pretraining_helps"]["panels"][0]["n"] == 16


def test_a_positive_but_insignificant_difference_passes_with_a_note():
    a = [0.5, 0.6, 0.5, 0.6]
    b = [0.6, 0.5, 0.5, 0.55]
    res = evaluate([_dense(1, a, b, GOOD, BAD)], CHECKS)
    gate = res["gates"]["pretraining_helps"]
    assert gate["status"] == "passed" and "not significant" in gate["note"]


def test_gates_without_their_inputs_are_not_evaluated_which_is_not_a_pass():
    rec = _dense(1, GOOD, BAD, GOOD, BAD)
    del rec["arms"]["reinit"], rec["controls"]
    res = evaluate([rec], [])
    assert set(res["not_evaluated"]) == set(GATES) and not res["passed"]
    assert 'class="banner warn"' in sanity_html(res)


def test_gate_c_fails_on_a_network_check_or_on_a_budget_one_cell_that_differs_from_dense():
    bad = copy.deepcopy(CHECKS)
    bad[0]["methods"][0] |= {"equal": False, "detail": "max |difference| 0.001"}
    assert evaluate([_dense(1, GOOD, BAD, GOOD, BAD)], bad)["failed"] == ["budget_one_is_dense"]
    cell = {"method": "slimming", "status": "ok", "target": "t", "shots": 1, "replicate": 0, "requested_budget": 1.0,
            "arms": {"finetune": {"episodes": _eps(GOOD)}}}
    assert evaluate([_dense(1, GOOD, BAD, GOOD, BAD), cell], CHECKS)["passed"]
    cell["arms"]["finetune"]["episodes"][3]["accuracy"] += 0.01
    res = evaluate([_dense(1, GOOD, BAD, GOOD, BAD), cell], CHECKS)
    assert res["failed"] == ["budget_one_is_dense"]
    row = next(r for r in res["gates"]["budget_one_is_dense"]["panels"] if r["method"] == "slimming")
    assert row["detail"] == "7/8 episodes equal"


def test_gate_c_s_checks_are_folded_when_all_exact_and_open_when_one_differs():
    passed = sanity_html(evaluate([_dense(1, GOOD, BAD, GOOD, BAD)], CHECKS))
    assert "<details><summary>the 1 checks, all exact (show them)</summary><table" in passed
    bad = copy.deepcopy(CHECKS)
    bad[0]["methods"][0] |= {"equal": False, "detail": "max |difference| 0.001"}
    failed = sanity_html(evaluate([_dense(1, GOOD, BAD, GOOD, BAD)], bad))
    assert "all exact" not in failed and "DIFFERS" in failed


def test_failed_cells_are_not_read_as_evidence():
    rec = _dense(1, GOOD, BAD, GOOD, BAD) | {"status": "failed"}
    assert evaluate([rec], CHECKS)["gates"]["pretraining_helps"]["status"] == "not evaluated"


def test_the_report_says_what_every_comparison_shared():
    rows = []
    for method, arm, steps, bn in [("dense", "finetune", 60, "pretrained, recalibrated"),
                                   ("random", "finetune", 60, "recalibrated after search"),
                                   ("channel_scaling", "finetune", 60, "pretrained, recalibrated"),
                                   ("dense", "prototype", 0, "pretrained, recalibrated"),
                                   ("random", "prototype", 0, "recalibrated after search")]:
        rows.append({"method": method, "arm": arm, "target": "t", "shots": 1, "status": "ok", "n_episodes": 20,
                     "seed_episode": 0, "support_steps": steps, "bn_statistics": bn,
                     "networks": 3 if method == "random" else 1,
                     "network_acc_min": 0.6 if method == "random" else float("nan"),
                     "network_acc_max": 0.65 if method == "random" else float("nan")})
    text = " ".join(equal_by_construction(pd.DataFrame(rows)))
    assert "finetune 60" in text and "prototype none" in text and "DIFFERS" not in text
    # a target-side method's prototype arm only adapts: said as such, not as a difference between methods
    with_adapt = [*rows, {**rows[2], "arm": "prototype", "support_steps": 30}]
    text = " ".join(equal_by_construction(pd.DataFrame(with_adapt)))
    assert "prototype none (target-side adapt: 30)" in text and "DIFFERS" not in text
    assert "Control dense is in every panel" in text and "3 masks" in text and "5.0 points" in text
    rows[2]["support_steps"] = 110
    assert "DIFFERS" in " ".join(equal_by_construction(pd.DataFrame(rows)))


def test_arms_run_for_dense_only_are_named_and_need_no_controls():
    base = {"target": "t", "shots": 1, "status": "ok", "n_episodes": 20, "seed_episode": 0}
    rows = [{**base, "method": m, "arm": a} for m, a in [("dense", "finetune"), ("random", "finetune"),
                                                          ("scratch", "finetune"), ("dense", "reinit"),
                                                          ("dense", "linear_probe"), ("linear_probe", "linear_probe")]]
    text = " ".join(equal_by_construction(pd.DataFrame(rows)))
    assert "only (the sanity gates' controls, no comparison between methods): linear_probe, reinit" in text
    assert "Control random is in every panel" in text and "Control scratch is in every panel" in text
    rows.append({**base, "method": "l1_filter", "arm": "reinit"})  # a compared panel without its controls
    text = " ".join(equal_by_construction(pd.DataFrame(rows)))
    assert "Control random is missing from: t 1-shot reinit" in text and "only (the sanity gates' controls, no " \
        "comparison between methods): linear_probe." in text


def test_retention_table_averages_replicates_and_skips_target_side():
    import json

    import pandas as pd

    from pruneshot.report.sanity import retention_html, retention_table

    rows = []
    for rep, acc in ((0, 0.90), (1, 0.80)):
        for arm in ("finetune", "prototype"):  # one network per (method, budget, replicate), several arms
            rows.append({"method": "l1_filter", "requested_budget": 0.5, "replicate": rep, "arm": arm, "status": "ok",
                         "source_val_acc": acc, "widths": json.dumps({"block0": 16, "block1": 32})})
    rows.append({"method": "channel_scaling", "requested_budget": 0.5, "replicate": 0, "arm": "finetune",
                 "status": "ok", "source_val_acc": float("nan"), "widths": "{}"})
    rows.append({"method": "random", "requested_budget": 0.5, "replicate": 0, "arm": "finetune",
                 "status": "failed", "source_val_acc": 0.1, "widths": "{}"})
    table = retention_table(pd.DataFrame(rows))
    assert table.to_dict("records") == [{"method": "l1_filter", "budget": 0.5, "source val acc %": 85.0,
                                         "replicates": 2, "widths": "16 32"}]
    html = retention_html(pd.DataFrame(rows))
    assert 'id="retention"' in html and "85.0" in html and "channel_scaling" not in html
    assert retention_html(pd.DataFrame([{"method": "x", "status": "ok"}])) == ""
