"""The report's overview parts (issue 15 items 9-11): the accuracy-vs-shots figure only when it says something,
the headline section, and average ranks over the cells every ranked method shares. Synthetic results from
test_report."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
from test_report import make_episodes, make_many_methods_results, make_provenance, make_results

from pruneshot.report.build import build_report
from pruneshot.report.figures import FIGURE_NAMES, _plot_vs_shots
from pruneshot.report.headline import headline_summary, headline_table
from pruneshot.report.load import _aggregate_ok
from pruneshot.report.stats import common_cell_ranks
from pruneshot.report.styles import method_styles
from pruneshot.report.tables import average_rank_table, compute_statistics


def _build(results: pd.DataFrame, tmp_path: Path, episodes: bool = True) -> str:
    tmp_path.mkdir(parents=True, exist_ok=True)
    csv = tmp_path / "results.csv"
    results.to_csv(csv, index=False)
    eps = None
    if episodes:
        eps = tmp_path / "episodes.csv"
        make_episodes(results).to_csv(eps, index=False)
    out = tmp_path / "report" / "index.html"
    build_report(csv, make_provenance(), out, tmp_path / "report" / "figures", eps)
    return out.read_text(encoding="utf-8")


def _section(text: str, section: str) -> str:
    return text.split(f'<section id="{section}">')[1].split("</section>")[0]


# --------------------------------------------------------------------------- item 9: accuracy vs shots


def test_acc_vs_shots_with_one_shots_value_is_one_line_not_a_figure(tmp_path: Path) -> None:
    results = make_results()
    one = results[results["shots"] == 1]
    text = _build(one, tmp_path)
    assert '<figure id="fig-acc_vs_shots"' not in text
    line = text.split('id="fig-acc_vs_shots-none"')[1].split("</p>")[0]
    assert "one shots value (1)" in line and "no figure" in line
    # The PNG is still written (Snakemake's report lists every figure); it says the same and draws no line.
    figures = tmp_path / "report" / "figures"
    assert sorted(p.stem for p in figures.glob("*.png")) == sorted(FIGURE_NAMES)
    fig = _plot_vs_shots(_aggregate_ok(one), "Accuracy vs shots", method_styles(one["method"].tolist()))
    assert all(not ax.containers and not ax.lines for ax in fig.axes)
    assert any("one shots value (1)" in t.get_text() for ax in fig.axes for t in ax.texts)
    # Two shots values: the figure is there.
    both = _build(results, tmp_path / "both")
    assert '<figure id="fig-acc_vs_shots">' in both and 'id="fig-acc_vs_shots-none"' not in both


def test_acc_vs_shots_draws_one_line_per_method_at_the_tightest_budget() -> None:
    results = make_many_methods_results()
    fig = _plot_vs_shots(_aggregate_ok(results), "Accuracy vs shots", method_styles(results["method"].tolist()))
    assert "budget 0.25" in fig._suptitle.get_text()
    titles = [ax.get_title() for ax in fig.axes]
    assert any("source-side" in t for t in titles) and any("target-side" in t for t in titles)
    for ax in fig.axes:
        labels = [str(c.get_label()) for c in ax.containers]
        assert labels and len(labels) == len(set(labels)), ax.get_title()  # one line per method, not per budget
        assert not any("@" in lab for lab in labels)
        by_label = {str(c.get_label()): c.lines[0] for c in ax.containers}
        # dense at its own budget over both shots; random at the tightest budget (47.3 at 1 shot, 73.1 at 5)
        assert list(by_label["dense"].get_ydata()) == pytest.approx([61.2, 87.1])
        assert list(by_label["random"].get_ydata()) == pytest.approx([47.3, 73.1])
    source = next(ax for ax in fig.axes if "source-side" in ax.get_title())
    line = {str(c.get_label()): c.lines[0] for c in source.containers}["l1_filter"]
    assert list(line.get_ydata()) == pytest.approx([55.2])  # l1_filter@0.25 (its 5-shot run failed), not @0.5


# --------------------------------------------------------------------------- item 10: headline


def _two_methods(replicates: int = 1) -> pd.DataFrame:
    """make_results() plus taylor: l1_filter's rows, 1 pp better at 0.5 1-shot and 2 pp worse elsewhere."""
    base = make_results(replicates)
    taylor = base[base["method"] == "l1_filter"].copy()
    better = (taylor["requested_budget"] == 0.5) & (taylor["shots"] == 1)
    taylor["acc_mean"] = taylor["acc_mean"] + better.map({True: 0.01, False: -0.02})
    taylor = taylor.assign(method="taylor", row_id="t" + taylor["row_id"])
    return pd.concat([base, taylor], ignore_index=True)


def test_headline_names_the_best_pruning_method_and_its_significance_by_hand() -> None:
    results = _two_methods()
    statistics = compute_statistics(results, make_episodes(results))
    table = headline_table(results, statistics)
    assert list(table.columns) == ["target", "shots", "arm", "budget", "best pruning method", "accuracy %",
                                   "vs dense", "vs random"]  # no scratch in this study: no column
    rows = table.set_index(["shots", "budget"])
    assert list(rows.index) == [("1", "0.5"), ("1", "0.25"), ("5", "0.5"), ("5", "0.25")]
    # 1-shot@0.5: taylor 60.0 beats l1_filter 59.0; constant per-episode differences: significant after Holm
    assert rows.loc[("1", "0.5")].tolist()[2:] == ["taylor", "60.0 ± 3.2", "-1.2 pp ▼ worse", "+5.9 pp ▲ better"]
    # random@0.25 1-shot's per-episode differences alternate in sign: not significant
    assert rows.loc[("1", "0.25")].tolist()[2:] == ["l1_filter", "55.2 ± 3.4", "-6.0 pp ▼ worse", "+7.9 pp n.s."]
    assert rows.loc[("5", "0.5"), "best pruning method"] == "l1_filter"
    assert rows.loc[("5", "0.25")].tolist()[2:] == ["—", "all failed", "—", "—"]  # both methods failed there
    assert headline_summary(results, statistics) == [
        "No pruning method beats dense significantly at any budget (0 of 3 cells).",
        "Some pruning method beats random significantly in 2 of 3 cells (l1_filter in 2, taylor in 2).",
    ]


def test_headline_counts_replicates_and_says_plainly_when_no_method_beats_a_control() -> None:
    results = _two_methods(replicates=3)
    # Replicate 2 of taylor at 0.5 1-shot equals random: every paired difference 0, not significant.
    hit = (results["method"] == "taylor") & (results["requested_budget"] == 0.5) & (results["shots"] == 1) \
        & (results["replicate"] == 2)
    random = (results["method"] == "random") & (results["requested_budget"] == 0.5) & (results["shots"] == 1) \
        & (results["replicate"] == 2)
    results.loc[hit, "acc_mean"] = results.loc[random, "acc_mean"].item()
    # scratch: random + 10 pp, better than every pruning method, so none beats it
    scratch = results[results["method"] == "random"].assign(method="scratch")
    scratch = scratch.assign(acc_mean=scratch["acc_mean"] + 0.1, row_id="s" + scratch["row_id"])
    results = pd.concat([results, scratch], ignore_index=True)
    statistics = compute_statistics(results, make_episodes(results))
    rows = headline_table(results, statistics).set_index(["shots", "budget"])
    first = rows.loc[("1", "0.5")]
    # taylor: (60.0 + 61.0 + 56.1) / 3 = 59.0 < l1_filter's 60.0: l1_filter is best, in all 3 replicates
    assert first["best pruning method"] == "l1_filter" and first["accuracy %"] == "60.0 ± 3.2 (3 replicates)"
    assert first["vs random"] == "+4.9 pp ▲ better in 3/3 replicates"
    assert first["vs dense"] == "-2.2 pp ▼ worse in 3/3 replicates"
    assert first["vs scratch"] == "-5.1 pp ▼ worse in 3/3 replicates"
    assert rows.loc[("1", "0.25"), "vs random"] == "+7.9 pp n.s. in all 3 replicates"
    assert headline_summary(results, statistics) == [
        "No pruning method beats dense or scratch significantly at any budget (0 of 3 cells).",
        "Some pruning method beats random significantly in 2 of 3 cells in every replicate (l1_filter in 2, "
        "taylor in 1).",
    ]
    # taylor alone: better than random in 2 of 3 replicates at 0.5 1-shot
    alone = results[results["method"] != "l1_filter"]
    statistics = compute_statistics(alone, make_episodes(alone))
    assert headline_table(alone, statistics).set_index(["shots", "budget"]).loc[("1", "0.5"), "vs random"] == \
        "+3.9 pp ▲ better in 2/3 replicates"  # (5.9 + 5.9 + 0) / 3
    assert ("Some pruning method beats random significantly in 1 of 3 cells in every replicate (taylor in 1); "
            "in 1 more only in some replicates.") in headline_summary(alone, statistics)


def test_headline_section_sits_after_the_sanity_gates_escaped_and_in_the_contents(tmp_path: Path) -> None:
    results = _two_methods().assign(target="digits<5to9>&")
    text = _build(results, tmp_path)
    assert text.index('id="sanity"') < text.index('<section id="headline">') < text.index('id="how-to-read"')
    nav = text.split("<nav>")[1].split("</nav>")[0]
    assert nav.index('href="#sanity"') < nav.index('href="#headline">Headline<') < nav.index('href="#how-to-read"')
    section = _section(text, "headline")
    assert 'id="headline-table"' in section and "digits&lt;5to9&gt;&amp;" in section and "digits<5to9>" not in text
    assert "No pruning method beats dense significantly at any budget" in section
    # without episodes: the best method by mean only, said so
    plain = _section(_build(results, tmp_path / "plain", episodes=False), "headline")
    assert "No paired tests (episodes.csv was not given)" in plain and "no episodes" in plain
    # without a pruning method: one line
    refs = results[results["method"].isin(["dense", "linear_probe", "random"])]
    assert 'id="headline-none"' in _section(_build(refs, tmp_path / "refs"), "headline")


# --------------------------------------------------------------------------- item 11: average ranks


def _ranks(entries: dict[str, dict[str, float]]) -> pd.DataFrame:
    """A rank_table-shaped frame: {method: {cell: rank}}, a cell named "arm/budget" (target t, 1 shot)."""
    rows = []
    for method, cells in entries.items():
        for cell, rank in cells.items():
            arm, budget = cell.split("/")
            rows.append({"target": "t", "shots": 1, "arm": arm, "requested_budget": float(budget), "method": method,
                         "method_budget": float(budget), "mean": 0.5, "std": 0.1, "n": 20, "n_replicates": 1,
                         "rank": rank})
    return pd.DataFrame(rows)


def test_average_ranks_are_over_the_cells_every_method_is_ranked_in() -> None:
    # dense in 3 cells, a source-side method in 2 (no linear_probe arm), a target-side one in 1 (no reinit arm)
    ranks = _ranks({"dense": {"finetune/0.5": 1, "reinit/0.5": 2, "linear_probe/1.0": 1},
                    "src": {"finetune/0.5": 2, "reinit/0.5": 1},
                    "tgt": {"finetune/0.5": 3}})
    out = common_cell_ranks(ranks)
    # over the one common cell (finetune@0.5), not dense's 4/3, src's 1.5 and tgt's 3
    assert out["method"].tolist() == ["dense", "src", "tgt"]
    assert out["mean_rank"].tolist() == [1.0, 2.0, 3.0]
    assert out["n_cells"].tolist() == [1, 1, 1] and out["n_ranked"].tolist() == [3, 2, 1]
    # linear_probe ranked only in its own arm's cell: set aside, the rest compared over their 2 shared cells
    ranks = _ranks({"dense": {"finetune/0.5": 1, "reinit/0.5": 2, "linear_probe/1.0": 1},
                    "src": {"finetune/0.5": 2, "reinit/0.5": 1}, "linear_probe": {"linear_probe/1.0": 2}})
    out = common_cell_ranks(ranks).set_index("method")
    assert out.loc["dense", "mean_rank"] == 1.5 and out.loc["src", "mean_rank"] == 1.5
    assert out["n_cells"].to_dict() == {"dense": 2, "src": 2, "linear_probe": 0}
    assert math.isnan(out.loc["linear_probe", "mean_rank"]) and not out.loc["linear_probe", "common"]
    # no two methods share a cell: no common cell at all
    none = common_cell_ranks(_ranks({"a": {"finetune/0.5": 1}, "b": {"reinit/0.5": 1}}))
    assert not none["common"].any() and none["n_cells"].tolist() == [0, 0]


def test_the_average_rank_table_shows_the_cells_it_averages_and_says_when_there_are_none(tmp_path: Path) -> None:
    results = make_results()
    statistics = compute_statistics(results, make_episodes(results))
    table = average_rank_table(statistics)
    assert list(table.columns) == ["method", "mean rank", "cells", "ranked in"]
    # l1_filter failed at 0.25 5-shot: the common cells are the other 3, where dense is ranked too
    rows = table.set_index("method")
    assert set(rows["cells"]) == {"3"} and rows.loc["dense", "ranked in"] == "4"
    assert rows.loc["l1_filter", "ranked in"] == "3" and rows.loc["dense", "mean rank"] == "1.00"
    text = _build(results, tmp_path)
    section = _section(text, "ranks")
    assert "over the 3 common cell(s)" in section and 'id="average-ranks-table"' in section
    assert "average ranks are over the common cells" in text.split('id="stats-statement">')[1].split("</p>")[0]
    # linear_probe run only under its own arm (dense has no linear_probe arm here): ranked alone there, set aside
    own_arm = make_results()
    own_arm.loc[own_arm["method"] == "linear_probe", "arm"] = "linear_probe"
    statistics = compute_statistics(own_arm, make_episodes(own_arm))
    rows = average_rank_table(statistics).set_index("method")
    assert rows.loc["linear_probe"].tolist() == ["—", "0", "2"] and rows.loc["l1_filter", "cells"] == "3"
    assert rows.index[-1] == "linear_probe"
    section = _section(_build(own_arm, tmp_path / "own_arm"), "ranks")
    assert "Set aside, without a mean rank: linear_probe" in section
    # two methods that never share a cell (one per arm): said so, no table
    apart = make_results()
    apart = apart[apart["method"].isin(["dense", "l1_filter"])]
    apart.loc[apart["method"] == "l1_filter", "arm"] = "prototype"
    section = _section(_build(apart, tmp_path / "apart"), "ranks")
    assert 'id="average-ranks-none"' in section and "No common cells" in section
    assert 'id="average-ranks-table"' not in section
