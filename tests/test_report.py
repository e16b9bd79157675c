"""Tests for the HTML report: real pandas/seaborn/matplotlib, synthetic results."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

from pruneshot.report import (
    FIGURE_NAMES,
    TABLES_BEGIN,
    TABLES_END,
    build_report,
    load_results,
    make_figures,
    summary_table,
)

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


def make_provenance(generated: str = "2024-01-01T00:00:00Z") -> dict:
    return {
        "git_commit": COMMIT,
        "git_dirty": True,
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
        "generated_utc": generated,
    }


def _tables_section(text: str) -> str:
    start, end = text.index(TABLES_BEGIN), text.index(TABLES_END)
    assert start < end
    return text[start:end]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("report")
    csv = root / "results.csv"
    make_results().to_csv(csv, index=False)
    out_html = root / "out" / "index.html"
    figures_dir = root / "figures"
    build_report(csv, make_provenance(), out_html, figures_dir)
    return {"root": root, "csv": csv, "html": out_html.read_text(encoding="utf-8"), "figures": figures_dir}


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
    assert text.count("data:image/png;base64,") == len(FIGURE_NAMES)
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


def test_same_csv_gives_identical_tables_and_figures(built: dict, tmp_path: Path) -> None:
    other_html = tmp_path / "again.html"
    build_report(built["csv"], make_provenance("2030-12-31T23:59:59Z"), other_html, tmp_path / "figs")
    again = other_html.read_text(encoding="utf-8")
    assert _tables_section(again) == _tables_section(built["html"])
    assert "2030-12-31T23:59:59Z" in again
    for name in FIGURE_NAMES:
        png = f"{name}.png"
        assert (tmp_path / "figs" / png).read_bytes() == (built["figures"] / png).read_bytes()


def test_tables_change_when_results_change(built: dict, tmp_path: Path) -> None:
    results = make_results()
    results.loc[0, "acc_mean"] = 0.5
    csv = tmp_path / "changed.csv"
    results.to_csv(csv, index=False)
    build_report(csv, make_provenance(), tmp_path / "r.html", tmp_path / "figs")
    changed = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert _tables_section(changed) != _tables_section(built["html"])


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
    from pruneshot.report import methods_table

    table = methods_table(_with_reinit_and_target()).set_index("method")
    assert table.loc["l1_filter", "source"] == "reconstruction"
    assert table.loc["basis_scaling", "side"] == "target"
    assert table.loc["basis_scaling", "search"].startswith("per episode")
    assert table.loc["dense", "search"].startswith("once")
    assert list(table.index[:2]) == ["dense", "linear_probe"]


def test_reinit_gap_table_pairs_the_arms():
    from pruneshot.report import reinit_gap_table

    gaps = reinit_gap_table(_with_reinit_and_target())
    # only l1_filter@0.5 ran under both arms, at 1 and 5 shots
    assert list(gaps["method"]) == ["l1_filter", "l1_filter"]
    assert list(gaps["shots"]) == ["1", "5"]
    # finetune 59.0 vs reinit 49.0 -> +10.0 pp; ci sqrt(3.2^2 + 3^2) = 4.4
    assert gaps.iloc[0]["gap (pp)"] == "+10.0 ± 4.4"
    assert gaps.iloc[0]["finetune %"] == "59.0 ± 3.2"


def test_report_shows_methods_achieved_and_reinit_sections(tmp_path):
    from pruneshot.report import _summary_for_html

    df = _with_reinit_and_target()
    summary = _summary_for_html(df)
    row = summary[(summary["method"] == "basis_scaling") & (summary["budget"] == "0.5")].iloc[0]
    assert row["achieved"] == "0.450–0.490"  # per-shots costs differ: shown as a range
    assert row["source"] == "abstract-level"
    assert row["side"] == "target"
    csv = tmp_path / "results.csv"
    df.to_csv(csv, index=False)
    out = tmp_path / "index.html"
    build_report(csv, make_provenance(), out, tmp_path / "figures")
    html = out.read_text()
    assert 'id="methods-table"' in html
    assert 'id="reinit-gap-table"' in html
    assert "+10.0 ± 4.4" in html
    assert "reconstruction" in html.split('id="methods-table"')[1].split("</table>")[0]


def test_report_says_when_no_reinit_arm_ran(tmp_path):
    csv = tmp_path / "results.csv"
    make_results().to_csv(csv, index=False)
    out = tmp_path / "index.html"
    build_report(csv, make_provenance(), out, tmp_path / "figures")
    assert 'id="reinit-gap-none"' in out.read_text()


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
    from pruneshot.report import detail_table

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
