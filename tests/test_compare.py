"""Tests for pruneshot.report.compare and `pruneshot compare`: matching cells of two studies, the pairing
rule (same seed_episode, n_episodes, episodes file content and episode indices), the Wilcoxon p-values and
their Holm adjustment, and the CLI's outputs and errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pruneshot.cli import main
from pruneshot.data.episodes import content_sha256
from pruneshot.report.compare import CompareError, compare_results, format_comparison, load_study
from pruneshot.report.stats import holm, wilcoxon_signed_rank

ROOT = Path(__file__).resolve().parents[1]
EPISODE_KEY = ("t", 5, 1)
#: Per-episode accuracies of A, and B - A per episode (no zero, no tied |d|: the exact test).
ACC_A = [0.40, 0.52, 0.36, 0.60, 0.44, 0.48, 0.56, 0.32]
DELTA = [0.04, 0.08, -0.02, 0.12, 0.06, 0.10, 0.14, 0.16]


def _row(row_id: str, accs: list[float] | None, *, method: str = "m", budget: object = 0.5, arm: str = "finetune",
         shots: object = 1, replicate: int = 0, seed: int = 3, n: int | None = None, status: str = "ok") -> dict:
    return {"row_id": row_id, "method": method, "requested_budget": budget, "target": "t", "ways": 5,
            "shots": shots, "arm": arm, "replicate": replicate, "status": status, "seed_episode": seed,
            "acc_mean": float(np.mean(accs)) if accs and status == "ok" else math.nan,
            "n_episodes": n if n is not None else (len(accs) if accs else math.nan)}


def _tables(rows: list[tuple[dict, list[float] | None]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    results = pd.DataFrame([r for r, _ in rows])
    episodes = pd.DataFrame([{"row_id": r["row_id"], "episode": i, "accuracy": a}
                             for r, accs in rows for i, a in enumerate(accs or [])],
                            columns=["row_id", "episode", "accuracy"])
    return results, episodes


def _compare(rows_a, rows_b, ids_a=None, ids_b=None, **kw) -> pd.DataFrame:
    ra, ea = _tables(rows_a)
    rb, eb = _tables(rows_b)
    ids_a = {EPISODE_KEY: "same"} if ids_a is None else ids_a
    ids_b = {EPISODE_KEY: "same"} if ids_b is None else ids_b
    return compare_results(ra, rb, ea, eb, ids_a, ids_b, **kw)


ACC_B = [a + d for a, d in zip(ACC_A, DELTA, strict=True)]


def test_known_difference_gives_pp_and_the_wilcoxon_p_value() -> None:
    other_a = [0.3, 0.5, 0.4, 0.6, 0.2, 0.7, 0.35, 0.45]
    other_b = [v - 0.01 * (i + 1) for i, v in enumerate(other_a)]
    table = _compare([(_row("a1", ACC_A), ACC_A), (_row("a2", other_a, arm="prototype"), other_a)],
                     [(_row("b1", ACC_B), ACC_B), (_row("b2", other_b, arm="prototype"), other_b)])
    assert list(table["present"]) == ["both", "both"]
    assert table["paired"].all() and list(table["n_pairs"]) == [8, 8]
    ft = table.set_index("arm").loc["finetune"]
    assert ft["diff"] == pytest.approx(np.mean(DELTA))
    assert ft["acc_a"] == pytest.approx(np.mean(ACC_A)) and ft["acc_b"] == pytest.approx(np.mean(ACC_B))
    expected = [wilcoxon_signed_rank(ACC_B, ACC_A)["p_value"], wilcoxon_signed_rank(other_b, other_a)["p_value"]]
    assert list(table["p_value"]) == pytest.approx(expected)
    assert ft["p_value"] < 0.05 and ft["effect_size"] > 0  # B better on 7 of 8 episodes
    assert list(table["p_holm"]) == pytest.approx(holm(expected))
    assert table.set_index("arm").loc["prototype", "diff"] == pytest.approx(-0.045)
    text = format_comparison(table, "A", "B")
    assert "+8.5" in text and "-4.5" in text  # pp
    assert f"{100 * np.mean(ACC_A):.1f}" in text  # percent


def test_holm_family_is_all_paired_cells_only() -> None:
    unpaired_a, unpaired_b = _row("a2", ACC_A, arm="prototype"), _row("b2", ACC_B, arm="prototype", seed=4)
    table = _compare([(_row("a1", ACC_A), ACC_A), (unpaired_a, ACC_A)], [(_row("b1", ACC_B), ACC_B),
                                                                          (unpaired_b, ACC_B)])
    p = wilcoxon_signed_rank(ACC_B, ACC_A)["p_value"]
    ft, proto = table.set_index("arm").loc["finetune"], table.set_index("arm").loc["prototype"]
    assert ft["p_holm"] == pytest.approx(p)  # a family of one: the unpaired cell does not count
    assert math.isnan(proto["p_value"]) and math.isnan(proto["p_holm"]) and not proto["significant"]


@pytest.mark.parametrize(("row_b", "ids_b", "accs_b", "note"), [
    ({"seed": 7}, None, ACC_B, "seed_episode differs (3 vs 7)"),
    ({"n": 9}, None, ACC_B, "n_episodes differs (8 vs 9)"),
    ({}, {EPISODE_KEY: "other"}, ACC_B, "episodes files differ"),
    ({}, {}, ACC_B, "episodes file of B unknown"),
    ({}, {EPISODE_KEY: None}, ACC_B, "episodes file of B unknown"),
    ({}, None, None, "no per-episode accuracies in B"),
    ({"n": 8}, None, ACC_B[:7], "episode indices differ"),
])
def test_mismatched_episodes_are_not_paired(row_b, ids_b, accs_b, note) -> None:
    rb = _row("b1", ACC_B, **row_b)
    table = _compare([(_row("a1", ACC_A), ACC_A)], [(rb, accs_b)], ids_b=ids_b)
    (row,) = table.to_dict("records")
    assert not row["paired"] and row["n_pairs"] == 0 and row["test_method"] == "none"
    assert math.isnan(row["p_value"]) and math.isnan(row["p_holm"])
    assert row["diff"] == pytest.approx(np.mean(DELTA))  # the difference is still given
    assert row["note"] == f"unpaired: {note}"
    assert "unpaired" in format_comparison(table, "A", "B")


def test_failed_rows_have_no_difference() -> None:
    table = _compare([(_row("a1", ACC_A), ACC_A)], [(_row("b1", None, status="failed"), None)])
    (row,) = table.to_dict("records")
    assert row["present"] == "both" and row["note"] == "failed in B"
    assert math.isnan(row["acc_b"]) and math.isnan(row["diff"]) and math.isnan(row["p_value"])


def test_cells_only_in_one_study_are_counted_and_listed() -> None:
    shared = (_row("a1", ACC_A), ACC_A)
    table = _compare([shared, (_row("a2", ACC_A, method="l1"), ACC_A), (_row("a3", ACC_A, replicate=1), ACC_A)],
                     [(_row("b1", ACC_B), ACC_B), (_row("b4", ACC_B, shots=5), ACC_B)])
    assert table["present"].value_counts().to_dict() == {"both": 1, "A only": 2, "B only": 1}
    only_b = table[table["present"] == "B only"].iloc[0]
    assert only_b["shots"] == 5 and math.isnan(only_b["acc_a"]) and only_b["note"] == "only in B"
    text = format_comparison(table, "A", "B")
    assert "2 cell(s) only in A:" in text and "1 cell(s) only in B:" in text
    assert "l1 b0.5 t 5-way 1-shot finetune r0" in text and "m b0.5 t 5-way 5-shot finetune r0" in text


def test_keys_match_across_number_formats() -> None:
    table = _compare([(_row("a1", ACC_A, budget="1.0", shots="1"), ACC_A)], [(_row("b1", ACC_B, budget=1), ACC_B)])
    assert list(table["present"]) == ["both"] and table["paired"].all()


def test_two_rows_for_one_cell_is_an_error() -> None:
    with pytest.raises(CompareError, match="2 rows for 1 cell"):
        _compare([(_row("a1", ACC_A), ACC_A), (_row("a2", ACC_A), ACC_A)], [(_row("b1", ACC_B), ACC_B)])


# --------------------------------------------------------------------------- study directories and the CLI


def _write_study(root: Path, rows: list[tuple[dict, list[float] | None]], *, queries: int = 5) -> Path:
    """A study directory: tables/results.csv, tables/episodes.csv and the episodes file of (t, 5, 1)."""
    results, episodes = _tables(rows)
    (root / "tables").mkdir(parents=True)
    results.to_csv(root / "tables/results.csv", index=False)
    episodes.to_csv(root / "tables/episodes.csv", index=False)
    payload = {"target": "t", "ways": 5, "shots": 1, "queries_per_class": queries, "pool_sha256": "p" * 64,
               "episodes": [{"index": i, "seed": i, "classes": [0, 1, 2, 3, 4], "support": [i], "query": [i + 1]}
                            for i in range(8)]}
    (root / "episodes/t").mkdir(parents=True)
    (root / "episodes/t/5way_1shot.json").write_text(json.dumps({**payload,
                                                                  "content_sha256": content_sha256(payload)}))
    return root


def test_cli_compares_study_dirs_and_writes_csv(tmp_path: Path, capsys) -> None:
    a = _write_study(tmp_path / "A", [(_row("a1", ACC_A), ACC_A), (_row("a2", ACC_A, method="l1"), ACC_A)])
    b = _write_study(tmp_path / "B", [(_row("b1", ACC_B), ACC_B)])
    out = tmp_path / "cmp.csv"
    assert main(["compare", str(a), str(b / "tables/results.csv"), "--csv", str(out)]) == 0
    text = capsys.readouterr().out
    assert "1 matched cell(s): 1 paired" in text and "+8.5" in text and "1 cell(s) only in A:" in text
    table = pd.read_csv(out)
    row = table[table["present"] == "both"].iloc[0]
    assert row["p_value"] == pytest.approx(wilcoxon_signed_rank(ACC_B, ACC_A)["p_value"])
    assert row["diff"] == pytest.approx(np.mean(DELTA))  # a fraction in the CSV
    assert main(["compare", str(a), str(b), "--method", "l1"]) == 0
    assert "0 matched cell(s)" in capsys.readouterr().out


def test_cli_does_not_pair_studies_whose_episodes_files_differ(tmp_path: Path, capsys) -> None:
    a = _write_study(tmp_path / "A", [(_row("a1", ACC_A), ACC_A)])
    b = _write_study(tmp_path / "B", [(_row("b1", ACC_B), ACC_B)], queries=6)
    assert main(["compare", str(a), str(b), "--csv", str(tmp_path / "c.csv")]) == 0
    assert "unpaired: episodes files differ" in capsys.readouterr().out
    assert pd.read_csv(tmp_path / "c.csv")["p_value"].isna().all()
    (b / "episodes/t/5way_1shot.json").unlink()  # the identity of B's episodes is then unknown
    assert load_study(b).episode_ids == {EPISODE_KEY: None}
    assert main(["compare", str(a), str(b)]) == 0
    assert "episodes file of B unknown" in capsys.readouterr().out


def test_cli_errors_name_the_problem(tmp_path: Path, capsys) -> None:
    good = _write_study(tmp_path / "A", [(_row("a1", ACC_A), ACC_A)])
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    (tmp_path / "binary.csv").write_bytes(b"\xff\xfe\x00\x81")
    for path, message in ((tmp_path / "missing", "neither a study results directory"),
                          (tmp_path / "empty", "not a finished study"),
                          (tmp_path / "bad.csv", "no column(s) method"),
                          (tmp_path / "binary.csv", "cannot read results table")):
        assert main(["compare", str(good), str(path)]) == 2
        err = capsys.readouterr().err
        assert message in err and str(path) in err
