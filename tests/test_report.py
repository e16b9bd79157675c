"""Tests for the HTML report: real pandas/seaborn/matplotlib and pruneshot.report.stats, synthetic results."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pruneshot.report.build import build_report
from pruneshot.report.figures import CUDA_FIGURE, FIGURE_NAMES, make_figures
from pruneshot.report.html import TABLES_BEGIN, TABLES_END
from pruneshot.report.load import MixedResultsError, load_results
from pruneshot.report.tables import compute_statistics, results_table, summary_table

COMMIT = "0123456789abcdef0123456789abcdef01234567"
ERROR = "RuntimeError: pruning collapsed a layer <script>alert('x')</script> & more"
DENSE_PARAMS = 100_000
DENSE_FLOPS = 5_000_000

# (method, requested_budget, shots) -> (acc_mean, acc_ci95); None marks the failed run.
ACCURACY = {
    ("dense", 1.0, 1): (0.612, 0.031),
    ("dense", 1.0, 5): (0.871, 0.015),
    ("linear_probe", 1.0, 1): (0.598, 0.030),
    ("linear_probe", 1.0, 5): (0.845, 0.017),
    ("random", 0.5, 1): (0.541, 0.033),
    ("random", 0.5, 5): (0.802, 0.019),
    ("random", 0.25, 1): (0.473, 0.035),
    ("random", 0.25, 5): (0.731, 0.022),
    ("l1_filter", 0.5, 1): (0.590, 0.032),
    ("l1_filter", 0.5, 5): (0.834, 0.012),
    ("l1_filter", 0.25, 1): (0.552, 0.034),
    ("l1_filter", 0.25, 5): None,
}
SOURCES = {
    "dense": "baseline", "linear_probe": "baseline", "random": "baseline", "l1_filter": "reconstruction",
}


def make_results(replicates: int = 1) -> pd.DataFrame:
    rows = []
    for rep in range(replicates):
        for i, ((method, budget, shots), acc) in enumerate(ACCURACY.items()):
            failed = acc is None
            params = int(DENSE_PARAMS * (budget if method != "random" else budget * 1.02))
            flops = int(DENSE_FLOPS * budget**1.3)
            rows.append({
                "row_id": f"{i:02d}e{rep}",  # looks like a float to a naive reader
                "method": method,
                "method_source": SOURCES[method],
                "side": "source",
                "backbone": "small_cnn",
                "source": "digits_0to4",
                "target": "digits_5to9",
                "ways": 5,
                "shots": shots,
                "arm": "finetune",
                "budget_metric": "params",
                "requested_budget": budget,
                "achieved_params": params,
                "achieved_flops": flops,
                "dense_params": DENSE_PARAMS,
                "dense_flops": DENSE_FLOPS,
                "params_ratio": params / DENSE_PARAMS,
                "flops_ratio": flops / DENSE_FLOPS,
                "latency_device": "cpu:x86_64",
                "latency_dtype": "float32",
                "latency_ms_b1": 0.5 + budget,
                "latency_ms_b64": 10.0 * budget + 2.0,
                "search_seconds": 0.0 if method in ("dense", "linear_probe") else 3.25,
                "search_device": "cpu",
                "acc_mean": float("nan") if failed else acc[0] + 0.01 * rep,
                "acc_ci95": float("nan") if failed else acc[1],
                "acc_std": float("nan") if failed else acc[1] * 20 ** 0.5 / 1.96,
                "n_episodes": 20,
                "replicate": rep,
                "seed_pretrain": 1,
                "seed_search": 2,
                "seed_episode": 3,
                "seed_finetune": 4,
                "git_commit": COMMIT,
                "git_dirty": False,
                "config_sha256": "c" * 64,
                "data_sha256": "d" * 64,
                "checkpoint_sha256": "e" * 64,
                "mlflow_run_id": f"run{i}",
                "status": "failed" if failed else "ok",
                "error": ERROR if failed else "",
            })
    return pd.DataFrame(rows)


N_EPISODES = 20
# Every row's per-episode accuracies are its mean plus this alternating offset (mean exactly the row's),
# so paired differences between two rows are constant: significant for any nonzero gap at n = 20.
# random@0.25 1-shot gets a large alternating offset instead: its differences change sign (not significant).
NOISY = ("random", 0.25, 1)


def make_episodes(results: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for r in results.itertuples():
        if r.status != "ok":
            continue
        amp = 0.30 if (r.method, r.requested_budget, r.shots) == NOISY else 0.05
        rows += [{"row_id": r.row_id, "episode": i, "accuracy": r.acc_mean + amp * (-1) ** i}
                 for i in range(N_EPISODES)]
    return pd.DataFrame(rows)


def make_provenance() -> dict:
    """What :func:`collect_provenance` gives: nothing about the checkout or the time building the report."""
    return {
        "config_sha256": "f" * 64,
        "study": "digits_default",
        "data_sha256": {"digits": "a" * 64},
        "packages": {"pandas": pd.__version__, "torch": "2.13.0"},
        "devices": ["cpu:x86_64"],
        "mlflow": {
            "tracking_uri": "http://mlflow.example:5000",
            "experiment_name": "pruneshot-digits",
            "experiment_id": "7",
            "parent_run_id": "parentrun123",
        },
    }


def _tables_section(text: str) -> str:
    start, end = text.index(TABLES_BEGIN), text.index(TABLES_END)
    assert start < end
    return text[start:end]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("report")
    csv, episodes = root / "results.csv", root / "episodes.csv"
    make_results().to_csv(csv, index=False)
    make_episodes(make_results()).to_csv(episodes, index=False)
    out_html = root / "out" / "index.html"
    figures_dir = root / "figures"
    build_report(csv, make_provenance(), out_html, figures_dir, episodes)
    return {"root": root, "csv": csv, "episodes": episodes, "html": out_html.read_text(encoding="utf-8"),
            "figures": figures_dir}


def test_report_contains_methods_error_commit_and_provenance(built: dict) -> None:
    text = built["html"]
    for method in ("dense", "linear_probe", "random", "l1_filter"):
        assert f"<td>{method}</td>" in text
    assert COMMIT in text
    assert "digits_default" in text
    assert "a" * 64 in text  # dataset hash
    assert "parentrun123" in text and "pruneshot-digits" in text
    assert "http://mlflow.example:5000" in text  # shown as text ...
    assert 'id="failures-table"' in text and 'id="failures-none"' not in text


def test_report_is_self_contained(built: dict) -> None:
    text = built["html"]
    # Every figure is embedded but the reinit gap, which says one line without a reinit arm (issue 15).
    assert text.count("data:image/png;base64,") == len(FIGURE_NAMES) - 1
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", text)  # ... never as a link
    assert "<script" not in text.lower()
    assert "<link" not in text.lower()
    for name in FIGURE_NAMES:
        png = built["figures"] / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert b"Software" not in png.read_bytes() and b"Creation Time" not in png.read_bytes()
    leftovers = [p.name for p in built["root"].rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def test_error_text_is_escaped(built: dict) -> None:
    text = built["html"]
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; more" in text
    assert "<script>alert" not in text


def test_summary_table_cells_by_hand() -> None:
    table = summary_table(make_results())
    assert list(table.columns) == ["method", "requested_budget", "target", "arm", "1-shot", "5-shot"]
    order = list(zip(table["method"], table["requested_budget"], strict=True))
    assert order == [
        ("dense", 1.0), ("linear_probe", 1.0), ("l1_filter", 0.5), ("l1_filter", 0.25),
        ("random", 0.5), ("random", 0.25),
    ]
    cell = table.set_index(["method", "requested_budget"])
    assert cell.loc[("l1_filter", 0.5), "5-shot"] == "83.4 ± 1.2"
    assert cell.loc[("dense", 1.0), "1-shot"] == "61.2 ± 3.1"
    assert cell.loc[("l1_filter", 0.25), "5-shot"] == "failed"
    assert cell.loc[("l1_filter", 0.25), "1-shot"] == "55.2 ± 3.4"


def test_summary_table_averages_replicates_and_flags_partial_failures() -> None:
    results = make_results(replicates=2)  # replicate 1 adds 0.01 to every accuracy
    mask = (results["method"] == "random") & (results["requested_budget"] == 0.5) & (results["shots"] == 1)
    failed = mask & (results["replicate"] == 1)
    results.loc[failed, ["status", "acc_mean", "error"]] = ["failed", float("nan"), "x"]
    cell = summary_table(results).set_index(["method", "requested_budget"])
    assert cell.loc[("l1_filter", 0.5), "5-shot"] == "83.9 ± 1.2"  # mean of 0.834 and 0.844
    assert cell.loc[("random", 0.5), "1-shot"] == "54.1 ± 3.3 (1/2 failed)"
    assert cell.loc[("l1_filter", 0.25), "5-shot"] == "failed"


def test_same_csv_gives_identical_html_and_figures(built: dict, tmp_path: Path) -> None:
    """Issue 15.2: the report is a DVC-versioned output; rebuilt from the same results (later, in another
    checkout) it is the same bytes, so `dvc status` and `pruneshot audit --verify` stay clean."""
    other_html = tmp_path / "again.html"
    build_report(built["csv"], make_provenance(), other_html, tmp_path / "figs", built["episodes"])
    again = other_html.read_text(encoding="utf-8")
    assert again == built["html"]
    assert "generated" not in again.split('<section id="provenance">')[0] and "built at" not in again
    for name in FIGURE_NAMES:
        png = f"{name}.png"
        assert (tmp_path / "figs" / png).read_bytes() == (built["figures"] / png).read_bytes()


def test_tables_change_when_results_change(built: dict) -> None:
    from pruneshot.report.html import _tables_html
    from pruneshot.report.load import load_episodes

    episodes = load_episodes(built["episodes"])
    same = load_results(built["csv"])
    assert _tables_html(same, compute_statistics(same, episodes), episodes) == _tables_section(built["html"]) \
        + TABLES_END
    changed = same.copy()
    changed.loc[0, "acc_mean"] = 0.5
    assert _tables_html(changed, compute_statistics(changed, episodes), episodes) != \
        _tables_section(built["html"]) + TABLES_END


def test_load_results_keeps_ids_as_text(built: dict) -> None:
    df = load_results(built["csv"])
    assert df["row_id"].tolist()[:2] == ["00e0", "01e0"]
    assert df.loc[df["status"] == "ok", "error"].eq("").all()
    assert '<td class="mono">00e0</td>' in built["html"]


def test_no_failures_reads_none_and_figures_handle_empty(tmp_path: Path) -> None:
    results = make_results()
    ok = results[results["status"] == "ok"]
    csv = tmp_path / "ok.csv"
    ok.to_csv(csv, index=False)
    build_report(csv, make_provenance(), tmp_path / "ok.html", tmp_path / "figs")
    text = (tmp_path / "ok.html").read_text(encoding="utf-8")
    assert '<p id="failures-none">none</p>' in text
    paths = make_figures(results.assign(status="failed"), tmp_path / "empty")
    assert sorted(paths) == sorted(FIGURE_NAMES) and all(p.stat().st_size > 0 for p in paths.values())


def test_a_missed_budget_is_marked_in_the_tables_the_report_and_the_summary(tmp_path: Path, capsys) -> None:
    """Issue 14: a search that ended far from its budget (dnal at 0.5 achieving 1.0) used to read ok."""
    from pruneshot import cli
    from pruneshot.report.tables import budget_missed_table, detail_table

    results = make_results()
    results["budget_tolerance"] = 0.05
    results["budget_gap"] = results["requested_budget"] - results["params_ratio"]
    results["budget_missed"] = results["budget_gap"].abs() > 0.05
    assert not results["budget_missed"].any()
    hit = (results["method"] == "l1_filter") & (results["requested_budget"] == 0.5) & (results["shots"] == 1)
    assert hit.sum() == 1
    results.loc[hit, ["params_ratio", "budget_gap", "budget_missed"]] = [1.0, -0.5, True]
    table = results_table(results)
    assert _row(table, "l1_filter", "0.5", "1")["achieved"] == "1.000 ⚠ missed"
    assert "missed" not in _row(table, "l1_filter", "0.5", "5")["achieved"]
    # Named by what it is (issue 15): achieved − requested, so l1_filter's 1.0 for 0.5 reads +0.500.
    detail = detail_table(results)
    assert "gap" not in detail.columns and (detail["achieved − requested"].str.contains("missed")).sum() == 1
    assert detail.loc[detail["achieved − requested"].str.contains("missed"), "achieved − requested"].tolist() == [
        "+0.500 ⚠ missed"]
    missed = budget_missed_table(results)
    assert missed[["method", "requested", "achieved", "gap"]].values.tolist() == [["l1_filter", "0.5", "1.000",
                                                                                   "-0.500"]]
    csv = tmp_path / "r.csv"
    results.to_csv(csv, index=False)  # the flag survives the CSV round trip
    build_report(csv, make_provenance(), tmp_path / "r.html", tmp_path / "figs")
    text = (tmp_path / "r.html").read_text(encoding="utf-8")
    section = text.split('id="budget-missed"')[1].split("</section>")[0]
    assert "l1_filter" in section and "budget-missed-none" not in section
    assert cli.main(["summary", str(csv)]) == 0
    out = capsys.readouterr().out
    assert "BUDGET MISSED (1 rows" in out and "-0.500" in out
    assert budget_missed_table(results.assign(budget_missed=False)).empty


# --------------------------------------------------------------------------- method labels and arms


def _with_reinit_and_target() -> pd.DataFrame:
    """The synthetic results plus reinit rows for l1_filter@0.5 and a target-side method."""
    base = make_results()
    ft = base[(base["method"] == "l1_filter") & (base["requested_budget"] == 0.5)]
    reinit = ft.assign(arm="reinit", acc_mean=ft["acc_mean"] - 0.10, acc_ci95=0.03,
                       row_id=[f"r{i}" for i in range(len(ft))])
    tgt = base[base["method"] == "random"].assign(
        method="basis_scaling", method_source="abstract-level", side="target", search_scope="per episode",
        params_ratio=[0.49, 0.45, 0.24, 0.22], row_id=[f"t{i}" for i in range(4)])
    out = pd.concat([base.assign(search_scope="once"), reinit, tgt], ignore_index=True)
    return out


def test_methods_table_names_source_and_side():
    from pruneshot.report.tables import methods_table

    table = methods_table(_with_reinit_and_target()).set_index("method")
    assert table.loc["dense", "role"] == "reference" and table.loc["random", "role"] == "control"
    assert set(table["role"]) <= {"reference", "control", "method"}
    assert table.loc["l1_filter", "source"] == "reconstruction"
    assert table.loc["basis_scaling", "side"] == "target"
    assert table.loc["basis_scaling", "search"].startswith("per episode")
    assert table.loc["dense", "search"].startswith("once")
    assert list(table.index[:2]) == ["dense", "linear_probe"]


def test_reinit_gap_table_pairs_the_arms():
    from pruneshot.report.reinit_gap import reinit_gap_table

    gaps = reinit_gap_table(_with_reinit_and_target())
    # only l1_filter@0.5 ran under both arms, at 1 and 5 shots
    assert list(gaps["method"]) == ["l1_filter", "l1_filter"]
    assert list(gaps["shots"]) == ["1", "5"]
    # finetune 59.0 vs reinit 49.0 -> +10.0 pp; ci sqrt(3.2^2 + 3^2) = 4.4
    assert gaps.iloc[0]["gap (pp)"] == "+10.0 ± 4.4"
    assert gaps.iloc[0]["finetune %"] == "59.0 ± 3.2"


def test_report_shows_methods_achieved_and_reinit_sections(tmp_path):
    df = _with_reinit_and_target()
    table = results_table(df)
    achieved = table[(table["method"] == "basis_scaling") & (table["budget"] == "0.5")].set_index("shots")["achieved"]
    assert achieved.to_dict() == {"1": "0.490", "5": "0.450"}  # per-shots costs of a target-side method
    csv = tmp_path / "results.csv"
    df.to_csv(csv, index=False)
    out = tmp_path / "index.html"
    build_report(csv, make_provenance(), out, tmp_path / "figures")
    html = out.read_text()
    assert 'id="methods-table"' in html
    assert 'id="reinit-gap-table"' in html
    assert "+10.0 ± 4.4" in html
    assert "reconstruction" in html.split('id="methods-table"')[1].split("</table>")[0]


def test_report_says_when_no_reinit_arm_ran(built: dict) -> None:
    assert 'id="reinit-gap-none"' in built["html"]


def test_cli_summary_prints_side_source_and_accuracy(tmp_path, capsys):
    from pruneshot.cli import main

    csv = tmp_path / "results.csv"
    _with_reinit_and_target().to_csv(csv, index=False)
    assert main(["summary", str(csv)]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[0].split()
    assert header[:3] == ["method", "side", "source"]
    row = next(line for line in lines if line.split()[0] == "basis_scaling")
    assert row.split()[1:3] == ["target", "abstract-level"]
    assert "59.0 ± 3.2" in "\n".join(lines)  # l1_filter@0.5 1-shot finetune
    assert not any(line.split()[0] == "l1_filter" and "nan" in line for line in lines)  # the failed row is left out


def test_detail_table_shows_cuda_latency_only_where_timed() -> None:
    from pruneshot.report.tables import detail_table

    df = make_results()
    df["latency_cuda_device"] = ""
    df["latency_cuda_ms_b1"] = float("nan")
    df["latency_cuda_ms_b64"] = float("nan")
    cols = list(detail_table(df).columns)
    assert "latency ms (b=1)" in cols and "latency ms (b=64)" in cols
    assert not any(c.startswith("cuda") for c in cols)
    df["latency_cuda_device"] = "cuda:NVIDIA H200"
    df["latency_cuda_ms_b1"] = 0.25
    table = detail_table(df)
    assert "cuda latency ms (b=1)" in table.columns and "cuda latency ms (b=64)" not in table.columns
    assert set(table["cuda device"]) == {"cuda:NVIDIA H200"}
    assert set(table["cuda latency ms (b=1)"]) == {"0.250"}


# --------------------------------------------------------------------------- statistics in the tables


def _row(table: pd.DataFrame, method: str, budget: str, shots: str) -> pd.Series:
    hit = table[(table["method"] == method) & (table["budget"] == budget) & (table["shots"] == shots)]
    assert len(hit) == 1, (method, budget, shots, hit)
    return hit.iloc[0]


def test_results_table_marks_ranks_and_row_ids_by_hand() -> None:
    results = make_results()
    table = results_table(results, episodes=make_episodes(results))
    assert list(table.columns) == ["target", "shots", "arm", "method", "budget", "achieved", "accuracy %",
                                   "vs dense", "vs random", "rank", "row_id"]  # one replicate: no spread column
    l1 = _row(table, "l1_filter", "0.5", "1")
    assert l1["accuracy %"] == "59.0 ± 3.2 (n=20)"
    assert l1["achieved"] == "0.500" and l1["row_id"] == "08e0"
    # constant per-episode differences (n = 20): significant after Holm over the 12 comparisons
    assert l1["vs dense"] == "-2.2 pp ▼" and l1["vs random"] == "+4.9 pp ▲"
    # random@0.25 1-shot's differences alternate in sign: W+ = 155, W- = 55, p = 0.057 > 0.05
    assert _row(table, "l1_filter", "0.25", "1")["vs random"] == "+7.9 pp n.s."
    assert _row(table, "random", "0.25", "1")["vs dense"] == "-13.9 pp n.s."
    dense = _row(table, "dense", "1", "1")
    assert dense["vs dense"] == "baseline" and dense["vs random"] == "—"
    # Meta-Dataset ranks (margin sqrt(ci1^2 + ci2^2) here): 1-shot@0.5 dense, linear_probe, l1_filter tie
    assert l1["rank"] == "1 / 4" and _row(table, "random", "0.5", "1")["rank"] == "4 / 4"
    assert _row(table, "l1_filter", "0.25", "1")["rank"] == "3 / 4"
    assert dense["rank"] == "1 / 4 at 0.5, 1 / 4 at 0.25"  # budget-free: ranked in every budget's cell
    assert _row(table, "l1_filter", "0.5", "5")["rank"] == "2 / 4"  # tied with linear_probe behind dense
    # the failed cell stays in the table, with its row id
    failed = _row(table, "l1_filter", "0.25", "5")
    assert failed["accuracy %"] == "failed" and failed["row_id"] == "11e0" and failed["rank"] == "—"
    # order: per (target, shots, arm), budget descending, dense and linear_probe first
    one_shot = table[table["shots"] == "1"]
    assert list(zip(one_shot["method"], one_shot["budget"], strict=True))[:3] == [
        ("dense", "1"), ("linear_probe", "1"), ("l1_filter", "0.5")]


def test_replicate_spread_column_and_partial_failure() -> None:
    results = make_results(replicates=2)  # replicate 1 adds 0.01 to every accuracy
    mask = (results["method"] == "random") & (results["requested_budget"] == 0.5) & (results["shots"] == 1)
    results.loc[mask & (results["replicate"] == 1), ["status", "acc_mean", "error"]] = ["failed", float("nan"), "x"]
    table = results_table(results, episodes=make_episodes(results))
    assert "replicates %" in table.columns
    l1 = _row(table, "l1_filter", "0.5", "5")
    assert l1["accuracy %"] == "83.9 ± 1.2 (n=20)"
    assert l1["replicates %"] == "83.9 ± 0.7 (2)"  # mean of 83.4 and 84.4, sample std 0.71
    assert l1["row_id"] == "09e0 09e1"
    assert l1["vs dense"] == "-3.7 pp ▼▼"  # one mark per replicate
    partial = _row(table, "random", "0.5", "1")
    assert partial["accuracy %"] == "54.1 ± 3.3 (n=20; 1/2 failed)" and partial["replicates %"] == "54.1 (1)"


def test_statistics_are_stated_and_comparisons_listed(built: dict) -> None:
    text = built["html"]
    statement = text.split('id="stats-statement">')[1].split("</p>")[0]
    for phrase in ("two-sided Wilcoxon signed-rank test on the per-episode accuracies",
                   "Holm-Bonferroni over all 12 comparisons in this report", "Holm-adjusted p &lt; 0.05",
                   "rank-biserial", "Meta-Dataset"):
        assert phrase in statement, phrase
    comparisons = text.split('id="comparisons-table"')[1].split("</table>")[0]
    assert comparisons.count("<tr>") == 1 + 12
    assert 'id="average-ranks-table"' in text
    assert "pruneshot audit ROW_ID" in text


def test_figures_have_alt_text_and_captions(built: dict) -> None:
    text = built["html"]
    figures = re.findall(r"<figure id=\"fig-([a-z_]+)\"><img alt=\"([^\"]*)\" src=[^>]*><figcaption>(.*?)"
                         r"</figcaption></figure>", text)
    # No reinit arm in this study: the reinit-gap figure is one line, not an empty figure (issue 15).
    assert [f[0] for f in figures] == ["acc_vs_params", "acc_vs_flops", "acc_vs_latency", "acc_vs_shots",
                                       "budget_achieved", "search_cost"]
    for name, alt, caption in figures:
        assert alt.startswith("Figure: ") and "dense" in alt, name
        assert caption.startswith("<strong>Figure ") and len(caption) > 80, name


# --------------------------------------------------------------------------- failures, NaN, mixed runs


def _with_nan_failure() -> pd.DataFrame:
    """The synthetic results with random@0.5 5-shot failed the way the pipeline writes it: NaN metrics."""
    results = make_results()
    victim = (results["method"] == "random") & (results["requested_budget"] == 0.5) & (results["shots"] == 5)
    for col in ("acc_mean", "acc_ci95", "acc_std", "n_episodes", "achieved_params", "achieved_flops", "params_ratio",
                "flops_ratio", "latency_ms_b1", "latency_ms_b64", "search_seconds"):
        results.loc[victim, col] = float("nan")
    results.loc[victim, ["status", "error"]] = ["failed", "ValueError: budget unreachable"]
    return results


def test_failed_rows_with_nan_metrics_are_listed_never_dropped(tmp_path: Path) -> None:
    from pruneshot.report.reinit_gap import reinit_gap_table
    from pruneshot.report.tables import detail_table, failures_table

    results = _with_nan_failure()
    episodes = make_episodes(results)
    table = results_table(results, episodes=episodes)
    assert len(table) == len(results)  # one row per cell, failed cells included
    cell = _row(table, "random", "0.5", "5")
    assert (cell["accuracy %"], cell["achieved"], cell["row_id"]) == ("failed", "—", "05e0")
    assert _row(table, "l1_filter", "0.5", "5")["vs random"] == "—"  # no baseline run left to compare with
    failures = failures_table(results)
    assert list(failures["row_id"]) == ["11e0", "05e0"]
    assert "ValueError: budget unreachable" in set(failures["error"])
    assert len(detail_table(results)) == len(results)
    assert reinit_gap_table(results, episodes).empty
    paths = make_figures(results, tmp_path / "figs", episodes)
    assert sorted(paths) == sorted(FIGURE_NAMES)
    csv = tmp_path / "results.csv"
    results.to_csv(csv, index=False)
    build_report(csv, make_provenance(), tmp_path / "index.html", tmp_path / "figs2")
    text = (tmp_path / "index.html").read_text(encoding="utf-8")
    assert "ValueError: budget unreachable" in text.split('id="failures-table"')[1]
    assert "no comparison: episodes.csv was not given" in text


def test_mixed_commits_or_configs_are_refused_unless_allowed(tmp_path: Path) -> None:
    results = make_results()
    other = "fedcba9876543210fedcba9876543210fedcba98"
    results.loc[results.index[:3], "git_commit"] = other
    results.loc[results.index[:2], "config_sha256"] = "b" * 64
    csv = tmp_path / "results.csv"
    results.to_csv(csv, index=False)
    out = tmp_path / "index.html"
    with pytest.raises(MixedResultsError) as err:
        build_report(csv, make_provenance(), out, tmp_path / "figs")
    message = str(err.value)
    assert f"{COMMIT} (9 rows)" in message and f"{other} (3 rows)" in message
    assert "b" * 64 in message and "c" * 64 in message
    assert "allow_mixed" in message and "--allow-mixed" in message
    assert not out.exists() and not (tmp_path / "figs").exists()  # refused before writing anything

    build_report(csv, make_provenance(), out, tmp_path / "figs", allow_mixed=True)
    text = out.read_text(encoding="utf-8")
    banner = text.split('id="mixed-warning"')[1].split("</div>")[0]
    assert other in banner and COMMIT in banner and "b" * 64 in banner
    assert "3 rows" in banner
    assert "2 commits (mixed)" in text  # the header says so too


def test_rows_from_a_dirty_checkout_are_shown_not_refused(built: dict, tmp_path: Path) -> None:
    assert 'id="dirty-note"' not in built["html"]  # no row is dirty; the building checkout is not asked
    results = make_results()
    results.loc[results.index[:3], "git_dirty"] = True
    results.to_csv(tmp_path / "results.csv", index=False)
    build_report(tmp_path / "results.csv", make_provenance(), tmp_path / "index.html", tmp_path / "figs")
    html = (tmp_path / "index.html").read_text()
    assert 'id="dirty-note"' in html and f"3 of {len(results)} result rows" in html
    assert 'id="mixed-warning"' not in html


def test_paired_reinit_gap_uses_the_shared_episodes() -> None:
    from pruneshot.report.reinit_gap import reinit_gap_table

    results = _with_reinit_and_target()
    episodes = make_episodes(results)
    reinit_ids = set(results.loc[results["arm"] == "reinit", "row_id"])
    ft_ids = dict(zip(results.loc[results["arm"] == "reinit", "row_id"],
                      results.loc[(results["arm"] == "finetune") & (results["method"] == "l1_filter")
                                  & (results["requested_budget"] == 0.5), "row_id"], strict=True))
    # reinit episode i = finetune episode i - 0.10 - 0.04 * (-1)^i: differences 0.10 ± 0.04
    ft = episodes.set_index(["row_id", "episode"])["accuracy"]
    mask = episodes["row_id"].isin(reinit_ids)
    episodes.loc[mask, "accuracy"] = [ft[(ft_ids[r], e)] - 0.10 - 0.04 * (-1) ** e
                                      for r, e in zip(episodes.loc[mask, "row_id"], episodes.loc[mask, "episode"],
                                                      strict=True)]
    gaps = reinit_gap_table(results, episodes)
    d = np.array([0.10 + 0.04 * (-1) ** e for e in range(N_EPISODES)])
    half = 1.96 * d.std(ddof=1) / np.sqrt(len(d))
    assert list(gaps["gap (pp)"]) == [f"+10.0 ± {100 * half:.1f}"] * 2 == ["+10.0 ± 1.8"] * 2
    assert list(gaps["CI"]) == ["paired, n=20"] * 2
    assert gaps.iloc[0]["row_id"] == "08e0 r0"


def test_cuda_latency_figure_only_when_timed(tmp_path: Path) -> None:
    results = make_results()
    results["latency_cuda_device"] = ""
    results["latency_cuda_ms_b1"] = float("nan")
    assert CUDA_FIGURE not in make_figures(results, tmp_path / "cpu")
    results["latency_cuda_device"] = "cuda:NVIDIA H200"
    results["latency_cuda_ms_b1"] = results["latency_ms_b1"] / 10
    assert CUDA_FIGURE in make_figures(results, tmp_path / "cuda")


# --------------------------------------------------------------------------- CLI, config, landing page


def test_cli_report_rebuilds_refuses_mixed_and_allows_it(tmp_path: Path, capsys) -> None:
    from pruneshot.cli import main

    tables = tmp_path / "results" / "tables"
    tables.mkdir(parents=True)
    results = make_results()
    results.to_csv(tables / "results.csv", index=False)
    make_episodes(results).to_csv(tables / "episodes.csv", index=False)
    out = tmp_path / "report"
    assert main(["report", "--results", str(tables / "results.csv"), "--out", str(out)]) == 0
    text = (out / "index.html").read_text(encoding="utf-8")
    assert 'id="comparisons-table"' in text  # episodes.csv found beside results.csv
    assert sorted(p.stem for p in (out / "figures").glob("*.png")) == sorted(FIGURE_NAMES)
    assert "not given (built from the tables alone)" in text

    results.loc[0, "git_commit"] = "0" * 40
    results.to_csv(tables / "results.csv", index=False)
    assert main(["report", "--results", str(tables / "results.csv"), "--out", str(tmp_path / "r2")]) == 3
    assert "--allow-mixed" in capsys.readouterr().err
    assert not (tmp_path / "r2" / "index.html").exists()
    assert main(["report", "--results", str(tables / "results.csv"), "--out", str(tmp_path / "r2"),
                 "--allow-mixed"]) == 0
    assert 'id="mixed-warning"' in (tmp_path / "r2" / "index.html").read_text(encoding="utf-8")


def test_config_report_section_defaults_to_refusing_mixed() -> None:
    from pruneshot.config import load_config, load_schema

    report = load_config(Path(__file__).parents[1] / "config/config.yaml")["report"]
    assert report == {"allow_mixed": False, "sanity": "warn"}
    assert load_schema()["properties"]["report"]["properties"]["allow_mixed"]["description"]


def test_landing_page_names_commit_and_config_hash(tmp_path: Path, monkeypatch) -> None:
    from pruneshot.config import config_hash
    from pruneshot.report.landing import landing_page

    monkeypatch.setenv("PRUNESHOT_GIT_COMMIT", "a1b2c3d4e5f60718293a4b5c6d7e8f9012345678")
    monkeypatch.setenv("PRUNESHOT_GIT_DIRTY", "1")
    rst = tmp_path / "workflow.rst"
    rst.write_text("What the workflow does.\n")
    config = {"study": {"name": "s1"}, "report": {"allow_mixed": False}}
    out = tmp_path / "gen" / "workflow.rst"
    path = Path(landing_page(rst, config, tmp_path, out=out))
    text = path.read_text()
    assert path == out.resolve() and text.startswith("What the workflow does.")
    assert "built at git commit ``a1b2c3d4e5f60718293a4b5c6d7e8f9012345678`` (uncommitted changes)" in text
    assert f"``{config_hash(config)[:16]}…``" in text and config_hash(config) not in text and "``s1``" in text
    assert "results: none yet" in text
    before = path.stat().st_mtime_ns
    landing_page(rst, config, tmp_path, out=out)
    assert path.stat().st_mtime_ns == before  # unchanged text is not rewritten
    # Issue 15.17: the commits that produced the results, not the checkout building the page
    csv = tmp_path / "results.csv"
    pd.DataFrame({"git_commit": ["c" * 40] * 3 + ["d" * 40], "git_dirty": [False] * 3 + [True]}).to_csv(csv)
    text = Path(landing_page(rst, config, tmp_path, out=out, results_csv=csv)).read_text()
    assert f"results produced at git commit ``{'c' * 40}``: 3 rows; ``{'d' * 40}`` (uncommitted changes): 1 rows" \
        in text


def test_latency_column_names_are_written_and_read_with_one_definition() -> None:
    from pruneshot.report.load import (
        CUDA_LATENCY_RE,
        latency_batch,
        latency_columns,
        latency_table_columns,
        timed_latency_columns,
    )

    record = {"device": "cpu:x86_64", "dtype": "float32", "batch_sizes": [64, 1],
              "latency": {"1": {"median_ms": 0.5}, "64": {"median_ms": 2.0}},
              "devices": {"cuda": {"present": True, "name": "cuda:H200", "latency": {"1": {"median_ms": 0.1}}}}}
    cols = latency_columns(record)
    assert cols["latency_ms_b1"] == 0.5 and cols["latency_ms_b64"] == 2.0 and cols["latency_cuda_ms_b1"] == 0.1
    assert cols["latency_cuda_device"] == "cuda:H200" and np.isnan(cols["latency_cuda_ms_b64"])
    table = pd.DataFrame([{**cols, "acc_mean": 0.5}])
    # what the aggregate stage writes is what the report reads, ordered by batch size
    assert latency_table_columns(table) == ["latency_ms_b1", "latency_ms_b64"]
    assert latency_table_columns(table, CUDA_LATENCY_RE) == ["latency_cuda_ms_b1", "latency_cuda_ms_b64"]
    assert timed_latency_columns(table.assign(latency_cuda_ms_b1=np.nan), CUDA_LATENCY_RE) == []
    assert [latency_batch(c) for c in ("latency_ms_b64", "latency_cuda_ms_b1")] == ["64", "1"]
    with pytest.raises(ValueError):
        latency_batch("latency_device")


def _gates(failed: bool) -> dict:
    from pruneshot.report.sanity import evaluate

    good, bad = [0.8, 0.7, 0.9, 0.85], [0.5, 0.45, 0.6, 0.55]
    eps = lambda v: [{"episode": i, "accuracy": a} for i, a in enumerate(v)]  # noqa: E731
    dense = {"method": "dense", "status": "ok", "target": "t", "shots": 1, "replicate": 0, "requested_budget": 1.0,
             "arms": {"finetune": {"episodes": eps(bad if failed else good)},
                      "reinit": {"episodes": eps(good if failed else bad)},
                      "linear_probe": {"episodes": eps(good)}},
             "controls": {"pixel_prototype": {"episodes": eps(bad)}}}
    checks = [{"replicate": 0, "methods": [{"method": "random", "check": "c", "equal": True, "detail": "d"}]}]
    return evaluate([dense], checks)


def test_a_failed_sanity_gate_is_a_red_banner_at_the_top_and_passing_ones_are_stated(built: dict,
                                                                                     tmp_path: Path) -> None:
    out = tmp_path / "r" / "index.html"
    build_report(built["csv"], make_provenance(), out, tmp_path / "f", built["episodes"], sanity=_gates(True))
    text = out.read_text(encoding="utf-8")
    assert 'id="sanity-failed"' in text and "(a) pretraining helps" in text
    assert text.index('id="sanity"') < text.index('id="how-to-read"')
    build_report(built["csv"], make_provenance(), out, tmp_path / "f", built["episodes"], sanity=_gates(False))
    text = out.read_text(encoding="utf-8")
    assert 'id="sanity-passed"' in text and 'id="sanity-failed"' not in text
    assert 'id="sanity-missing"' in built["html"]  # built without gates: said so, never silent


def test_report_sanity_error_fails_the_report_rule_after_writing_it(built: dict, tmp_path: Path) -> None:
    import json

    from pruneshot.config import load_config
    from pruneshot.stages.job import Job
    from pruneshot.stages.report import report

    cfg = load_config(Path(__file__).parents[1] / "tests/configs/tiny.yaml")
    gates = tmp_path / "gates.json"
    gates.write_text(json.dumps(_gates(True)))
    out = tmp_path / "r" / "index.html"
    job = Job(rule="report", wildcards={}, config=cfg, log_path=None)
    args = (built["csv"], tmp_path / "none.json", tmp_path / "none2.json", tmp_path / "m.json", {}, out,
            tmp_path / "f", job)
    report(cfg, *args, episodes_csv=built["episodes"], sanity_json=gates)  # warn: built, no error
    assert 'id="sanity-failed"' in out.read_text(encoding="utf-8")
    cfg["report"]["sanity"] = "error"
    out.unlink()
    with pytest.raises(SystemExit, match="pretraining helps"):
        report(cfg, *args, episodes_csv=built["episodes"], sanity_json=gates)
    assert out.is_file()


def test_mechanism_figures_are_tabulated_per_method_and_budget(tmp_path: Path) -> None:
    import json

    from pruneshot.report.sanity import mechanism_html, mechanism_table

    df = make_results()
    df["mechanism"] = "{}"
    sl = df["method"] == "l1_filter"
    df.loc[sl, "mechanism"] = json.dumps({"gamma_sparsity_after": 0.67, "overlap_with_plain_ranking": 0.78})
    table = mechanism_table(df)
    assert set(table["method"]) == {"l1_filter"}
    assert table["gamma_sparsity_after"].tolist() == [0.67] * len(table)
    assert "overlap_with_plain_ranking" in mechanism_html(df)
    df["mechanism"] = "{}"
    assert mechanism_html(df) == ""


def make_many_methods_results() -> pd.DataFrame:
    """make_results() with l1_filter's rows copied to every registered method plus a few unregistered names
    (more pruning methods than the palette has colours), and a scratch control."""
    from pruneshot.methods import available

    base = make_results()
    template = base[base["method"] == "l1_filter"]
    extra = [m for m in available() if m not in set(base["method"])] + [f"custom_{i}" for i in range(6)]
    copies = [template.assign(method=m, method_source="test") for m in extra]
    return pd.concat([base, *copies], ignore_index=True)


def test_every_method_gets_a_unique_colour_and_marker_and_controls_keep_theirs() -> None:
    """Issue 15: dap and basis_scaling were both orange, dnal and l1_filter both pink."""
    from matplotlib.colors import to_rgb

    from pruneshot.report.styles import CONTROL_STYLES, PALETTE, legend_order, method_styles

    methods = sorted(set(make_many_methods_results()["method"]))
    assert len(methods) >= 12
    styles = method_styles(methods)
    assert set(styles) == set(methods)
    pairs = [(to_rgb(s["color"]), s["marker"]) for s in styles.values()]
    assert len(set(pairs)) == len(pairs)
    assert styles["dense"]["marker"] == "*" and to_rgb(styles["dense"]["color"]) == (0.0, 0.0, 0.0)
    reserved_markers = {"*"} | {s["marker"] for s in CONTROL_STYLES.values()}
    for name in ("random", "scratch"):
        assert styles[name] == CONTROL_STYLES[name]
        r, g, b = to_rgb(styles[name]["color"])
        assert r == g == b and styles[name]["linestyle"] == "--"  # a grey, dashed
    pruning = [m for m in methods if styles[m]["group"] in ("source", "target", "other")]
    assert {"dap", "basis_scaling", "dnal", "l1_filter"} <= set(pruning)
    for m in pruning:
        assert styles[m]["marker"] not in reserved_markers and styles[m]["linestyle"] == "-"
        assert styles[m]["color"] in PALETTE
    # The first len(PALETTE) pruning methods differ in colour and in marker both.
    first = [m for m in legend_order(methods) if m in pruning][: len(PALETTE)]
    assert len({styles[m]["color"] for m in first}) == len({styles[m]["marker"] for m in first}) == len(first)
    # Legend: dense, references, controls, then the source-side methods before the target-side ones.
    order = legend_order(methods)
    assert order[:4] == ["dense", "linear_probe", "random", "scratch"]
    groups = [styles[m]["group"] for m in order[4:]]
    assert groups == sorted(groups, key=["source", "target", "other"].index)


def test_accuracy_figures_use_the_method_styles_and_split_many_methods_by_side() -> None:
    from matplotlib.colors import to_rgb

    from pruneshot.report.figures import _plot_vs_cost
    from pruneshot.report.load import _aggregate_ok
    from pruneshot.report.styles import method_styles

    results = make_many_methods_results()
    styles = method_styles(results["method"].tolist())
    agg = _aggregate_ok(results)
    fig = _plot_vs_cost(agg, "params_ratio", "x", "Accuracy vs parameters kept", styles)
    titles = [ax.get_title() for ax in fig.axes]
    assert any("source-side" in t for t in titles) and any("target-side" in t for t in titles)
    seen = set()
    for ax in fig.axes:
        side = ax.get_title().split("\n")[0].split(" · ")[1].removesuffix("-side")
        for container in ax.containers:  # one errorbar container per series
            method, line = str(container.get_label()).split(" ", 1)[0], container.lines[0]
            if method not in styles:
                continue
            seen.add(method)
            assert styles[method]["group"] in ("reference", "control", side), (method, ax.get_title())
            assert to_rgb(line.get_color()) == to_rgb(styles[method]["color"])
            assert line.get_marker() == styles[method]["marker"]
    assert "dense" in seen and "random" in seen and "basis_scaling" in seen and "dap" in seen
    legend_texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend_texts.index("source-side pruning") < legend_texts.index("dap") < legend_texts.index(
        "target-side pruning") < legend_texts.index("basis_scaling")
    # A small study keeps one panel per shots.
    small = _plot_vs_cost(_aggregate_ok(make_results()), "params_ratio", "x", "t", method_styles(
        make_results()["method"].tolist()))
    assert len(small.axes) == 2


def _legend_overlaps(fig) -> list[str]:
    """What each figure legend overlaps: any axes or the figure title, or whether it leaves the figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    if fig.canvas is None or not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer()
    hits = []
    for legend in fig.legends:
        box = legend.get_window_extent(renderer)
        if not (box.y0 >= fig.bbox.y0 - 1 and box.y1 <= fig.bbox.y1 + 1 and box.x1 <= fig.bbox.x1 + 1):
            hits.append("outside the figure")
        hits += [f"axes {ax.get_title()!r}" for ax in fig.axes if box.overlaps(ax.get_window_extent(renderer))]
        if fig._suptitle is not None and box.overlaps(fig._suptitle.get_window_extent(renderer)):
            hits.append(f"title {fig._suptitle.get_text()!r}")
    return hits


@pytest.mark.parametrize("study", ["small", "many_methods"])
def test_no_figure_legend_overlaps_its_panels_or_title(study: str, tmp_path: Path, monkeypatch) -> None:
    """Issue 15: in small studies the legend was drawn over the figure title."""
    from pruneshot.report import figures as figures_module

    results = make_results() if study == "small" else make_many_methods_results()
    saved = figures_module.save_png
    overlaps: dict[str, list[str]] = {}

    def checked_save(fig, path: Path) -> None:
        saved(fig, path)
        overlaps[path.stem] = _legend_overlaps(fig)

    monkeypatch.setattr(figures_module, "save_png", checked_save)
    make_figures(results, tmp_path / "figs", make_episodes(results) if study == "small" else None)
    assert sorted(overlaps) == sorted(FIGURE_NAMES)
    assert {name: hits for name, hits in overlaps.items() if hits} == {}


def test_reinit_gap_without_a_reinit_arm_is_one_line_and_a_figure_with_one(built: dict, tmp_path: Path) -> None:
    text = built["html"]
    assert 'id="fig-reinit_gap-none"' in text and 'id="fig-reinit_gap"' not in text
    line = text.split('id="fig-reinit_gap-none"')[1].split("</p>")[0]
    assert "no configuration ran under both the finetune and reinit arms" in line
    results = make_results()
    reinit = results[results["method"].isin(["dense", "l1_filter"])].assign(arm="reinit")
    reinit["row_id"] = reinit["row_id"] + "r"
    both = pd.concat([results, reinit.assign(acc_mean=reinit["acc_mean"] - 0.05)], ignore_index=True)
    csv = tmp_path / "both.csv"
    both.to_csv(csv, index=False)
    build_report(csv, make_provenance(), tmp_path / "both.html", tmp_path / "figs")
    text = (tmp_path / "both.html").read_text(encoding="utf-8")
    assert '<figure id="fig-reinit_gap">' in text and 'id="fig-reinit_gap-none"' not in text


def test_the_transfer_settings_section_lists_the_choices_and_draws_the_lr_figure(tmp_path: Path) -> None:
    """transfer.select's report section (report/selection.py) from a selection table: the chosen pair per
    method, budget, shots and arm (replicates joined), and the learning-rate sensitivity figure."""
    from pruneshot.report.selection import chosen_table, lr_figure, selection_html, sensitivity

    rows = []
    for method in ("dense", "random", "l1_filter"):
        for rep in (0, 1):
            for lr in (0.01, 0.1):
                for steps in (30, 60):
                    acc = 0.5 + (0.1 if (lr, steps) == (0.01, 60) else 0.0) + 0.01 * rep
                    rows.append({"method": method, "requested_budget": 1.0 if method == "dense" else 0.5,
                                 "replicate": rep, "shots": 1, "arm": "finetune", "lr": lr, "steps": steps,
                                 "accuracy": acc, "chosen": (lr, steps) == (0.01, 60), "status": "ok", "error": ""})
    selection = pd.DataFrame(rows)
    table = chosen_table(selection)
    assert table["method"].tolist()[0] == "dense" and sorted(table["method"]) == ["dense", "l1_filter", "random"]
    assert table.loc[0, ["lr", "steps", "validation acc %"]].tolist() == ["0.01/0.01", "60/60", "60.5"]
    best = sensitivity(selection)
    assert best[(best["method"] == "dense") & (best["lr"] == 0.01)]["accuracy"].item() == pytest.approx(0.605)
    path = lr_figure(selection, tmp_path / "lr.png")
    assert path is not None and path.stat().st_size > 0
    html = selection_html(selection, path)
    assert 'id="selection-table"' in html and 'id="fig-lr_sensitivity"' in html and "never target classes" in html
    assert selection_html(None, None) == ""
