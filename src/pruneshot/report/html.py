"""HTML/CSS assembly helpers: escaped tables, banners, figure captions, the provenance section and the
tables section, which is byte-identical for identical CSVs (between :data:`TABLES_BEGIN` and
:data:`TABLES_END`)."""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from pruneshot.report.figures import CUDA_FIGURE, _facet_title, shots_figure_note
from pruneshot.report.load import MIXED_KEYS, _device_columns, _prepared, method_order
from pruneshot.report.reinit_gap import reinit_gap_data, reinit_gap_table
from pruneshot.report.stats import BASELINES
from pruneshot.report.tables import (
    ALPHA,
    DOWN,
    UP,
    Statistics,
    average_rank_table,
    budget_missed_table,
    comparisons_table,
    detail_table,
    failures_table,
    methods_table,
    results_table,
)

TABLES_BEGIN = "<!-- tables:begin -->"
TABLES_END = "<!-- tables:end -->"
NONE_RECORDED = "<p>none recorded</p>"

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2rem auto;
       max-width: 1200px; padding: 0 1rem; color: #1b1b1b; line-height: 1.45; }
h1 { margin-bottom: 0.2rem; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2rem; margin-top: 2rem; }
h3 { margin-bottom: 0.3rem; }
.meta { color: #555; margin-top: 0; }
nav ul { columns: 3; font-size: 0.9rem; padding-left: 1.2rem; }
.banner { border: 2px solid; border-radius: 4px; padding: 0.6rem 0.9rem; margin: 1rem 0; }
.banner.warn { border-color: #b26a00; background: #fff4e0; }
.banner.note { border-color: #6b7fa8; background: #eef2fa; }
.banner.fail { border-color: #b00020; background: #fde7ea; color: #5c0010; }
.banner.pass { border-color: #2e7d32; background: #e8f5e9; }
.banner ul { margin: 0.3rem 0 0; }
figure { margin: 1rem 0 2rem; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #444; font-size: 0.9rem; max-width: 80ch; }
.scroll { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; font-size: 0.85rem; margin: 0.5rem 0 1rem; max-width: 100%; }
table.wide { font-size: 0.66rem; } table.wide th, table.wide td { padding: 0.15rem 0.25rem; }
th, td { border: 1px solid #d6d6d6; padding: 0.25rem 0.5rem; text-align: left; vertical-align: top;
         overflow-wrap: break-word; }
td.mono, td pre.error { overflow-wrap: anywhere; }
th { background: #f3f3f3; } tbody tr:nth-child(even) { background: #fafafa; }
tr.group td { border-top: 2px solid #8a8a8a; }
details > summary { cursor: pointer; margin: 0.4rem 0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
@media (max-width: 1100px) { th, td { overflow-wrap: anywhere; } table.wide { font-size: 0.65rem; } }
@media print {
  body { max-width: none; margin: 0; padding: 0; }
  th, td { overflow-wrap: anywhere; }
  .scroll { overflow: visible; }
  table { font-size: 0.7rem; } table.wide { font-size: 0.6rem; }
  th, td { padding: 0.15rem 0.25rem; }
  figure, tr { break-inside: avoid; }
}
td.failed { color: #a40000; font-weight: 600; }
.up { color: #0b6e2f; font-weight: 700; } .down { color: #a40000; font-weight: 700; }
.legend, .note { font-size: 0.85rem; color: #333; }
code, .mono { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; font-size: 0.85em; }
pre.error { white-space: pre-wrap; margin: 0; max-width: 60ch; }
"""

_NUMERIC_RE = re.compile(
    r"^[-+]?\d[\d.,eE+-]*( ± [\d.]+| ± —)?( \(n=\d+(; \d+/\d+ failed)?\)| \(\d+/\d+ failed\)| \(\d+\))?$"
)
_MARK_COLUMNS = (*(f"vs {base}" for base in BASELINES), "significant")
_MONO_COLUMNS = ("row_id", "baseline row_id", "mlflow_run_id", "git commit", "config sha256")


def _esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _cell(value: Any, column: str) -> str:
    text = str(value)
    if column == "error":
        return f'<td><pre class="error">{_esc(text)}</pre></td>'
    if text == "failed" or text.startswith("failed "):
        return f'<td class="failed">{_esc(text)}</td>'
    if column == "accuracy %" and text.endswith(" failed)"):  # some replicates failed
        return f'<td class="num failed">{_esc(text)}</td>'
    if column in _MONO_COLUMNS or column.endswith("sha256"):
        return f'<td class="mono">{_esc(text)}</td>'
    if column in _MARK_COLUMNS:
        marked = _esc(text).replace(UP, f'<span class="up">{UP}</span>')
        marked = marked.replace(DOWN, f'<span class="down">{DOWN}</span>')
        return f'<td class="num">{marked}</td>'
    if _NUMERIC_RE.match(text) or column in ("rank", "accuracy %", "replicates %"):
        return f'<td class="num">{_esc(text)}</td>'
    return f"<td>{_esc(text)}</td>"


#: Tables with more columns than this are set in a smaller font.
WIDE_COLUMNS = 10


def _html_table(df: pd.DataFrame, table_id: str, css_class: str = "", group_by: str | None = None) -> str:
    """``df`` as an HTML table; with ``group_by``, a row whose value in that column differs from the
    previous row's starts a visual group."""
    # Headers may break after an underscore (budget_metric) rather than overflow.
    head = "".join(f"<th>{_esc(c).replace('_', '_<wbr>')}</th>" for c in df.columns)
    body = []
    previous: Any = None
    for i, row in enumerate(df.itertuples(index=False)):
        cells = "".join(_cell(v, str(c)) for v, c in zip(row, df.columns, strict=True))
        value = df[group_by].iloc[i] if group_by else None
        start = group_by is not None and i > 0 and value != previous
        previous = value
        body.append(f'<tr class="group">{cells}</tr>' if start else f"<tr>{cells}</tr>")
    # Tables with many columns get a smaller font (``wide``); every cell may wrap, so each table fits the page.
    css_class = " ".join(c for c in (css_class, "wide" if len(df.columns) > WIDE_COLUMNS else "") if c)
    cls = f' class="{_esc(css_class)}"' if css_class else ""
    return (f'<div class="scroll"><table id="{_esc(table_id)}"{cls}>\n<thead><tr>{head}</tr></thead>\n<tbody>\n'
            + "\n".join(body) + "\n</tbody></table></div>")


def _kv_table(items: Iterable[tuple[str, Any]], table_id: str, mono_values: bool = False) -> str:
    cls = ' class="mono"' if mono_values else ""
    rows = "\n".join(f"<tr><th>{_esc(k)}</th><td{cls}>{_esc(v)}</td></tr>" for k, v in items)
    return f'<div class="scroll"><table id="{_esc(table_id)}">\n<tbody>\n{rows}\n</tbody></table></div>'


def _stats_statement(statistics: Statistics) -> str:
    n = int(statistics.comparisons["p_value"].notna().sum()) if not statistics.comparisons.empty else 0
    return (
        "Significance: two-sided Wilcoxon signed-rank test on the per-episode accuracies of the episodes a method "
        "and its baseline share (zero differences dropped; exact null distribution up to 50 pairs without ties, "
        "else the normal approximation with tie and continuity correction), one test per replicate; effect size "
        "is the matched-pairs rank-biserial correlation r (positive: the method is better). Multiple comparisons: "
        f"Holm-Bonferroni over all {n} comparisons in this report; significant means Holm-adjusted p &lt; "
        f"{ALPHA:g}. Ranks follow Meta-Dataset: within a cell (target, shots, arm, budget; dense and linear_probe "
        "join every budget's cell, and linear_probe, which repeats dense's linear_probe arm, is ranked once, as "
        "dense) methods whose mean is within 1.96·√(s₁²/n₁ + s₂²/n₂) of the best remaining one "
        "share its rank; average ranks are over the common cells, those every ranked method is ranked in, so "
        "every method's average covers the same cells."
    )


def _how_to_read(results: pd.DataFrame, statistics: Statistics) -> str:
    df = _prepared(results)
    episodes = sorted({int(v) for v in pd.to_numeric(df.get("n_episodes"), errors="coerce").dropna()})
    ep_txt = "/".join(str(e) for e in episodes) if episodes else "the"
    metrics = sorted(df["budget_metric"].astype(str).unique()) if "budget_metric" in df.columns else []
    metric_txt = f" Budgets in this study were set on {_esc(' and '.join(metrics))}." if metrics else ""
    reps = sorted({int(v) for v in pd.to_numeric(df.get("replicate"), errors="coerce").dropna()})
    rep_txt = (f" Each cell was run with {len(reps)} replicates (pretraining and search seeds); the "
               "<em>replicates</em> column gives the mean of the per-replicate means ± their standard deviation."
               if len(reps) > 1 else "")
    return (
        "<p>Accuracy is the mean query accuracy over the "
        f"{_esc(ep_txt)} few-shot episodes that every method shares (same support and query sets), "
        "shown in %. The 95% confidence interval is the half-width 1.96&nbsp;·&nbsp;std&nbsp;/&nbsp;√n over "
        "those n episodes and is drawn as vertical error bars. A budget is the fraction of the dense "
        "network's parameters (or FLOPs) that pruning was asked to keep; the achieved ratio can differ "
        "and is shown beside it, in a figure and in the detail table."
        f"{metric_txt} <em>dense</em> is the unpruned network (budget 1, dashed reference line) and "
        "the controls are <em>random</em>, which keeps random channels at the same per-layer ratio, and "
        "<em>scratch</em>, a network of that size (random's widths) trained from scratch on the source with the "
        "pretraining recipe (Liu et al. 2019); dense and every control the study ran are in every figure panel "
        "and every significance column. <em>linear_probe</em> trains only a new head on the "
        f"frozen dense backbone.{rep_txt} Speed: params and FLOPs are theoretical counts on the physically pruned "
        "network; latency is measured (median of repeated timed forward passes after warm-up). The statistics "
        "(tests, multiple-comparison correction, ranks) are stated above the results tables.</p>"
    )


_FIGURE_TEXT = {
    "acc_vs_params": ("accuracy (%) against achieved parameter ratio",
                      "Accuracy against the achieved fraction of the dense network's parameters (log scale); one "
                      "panel per shots value (columns) and target and arm (rows), and with many methods per side "
                      "(source- and target-side methods apart; dense, the references and the controls (random, "
                      "scratch: dashed greys) in every panel). Each method has its own colour and marker; its "
                      "points are connected in budget order, so its accuracy-cost trade-off (its Pareto front) "
                      "reads as a line; the grey band is the Pareto front of all methods together."),
    "acc_vs_flops": ("accuracy (%) against achieved FLOPs ratio",
                     "Accuracy against the achieved fraction of the dense network's FLOPs (theoretical, batch 1, "
                     "log scale); panels and lines as in the parameters figure."),
    "acc_vs_latency": ("accuracy (%) against measured CPU latency",
                       "Accuracy against measured CPU latency of the physically pruned network (median ms per "
                       "forward pass at the smallest profiled batch size, log scale); panels and lines as above."),
    CUDA_FIGURE: ("accuracy (%) against measured CUDA latency",
                  "Accuracy against measured CUDA latency (median ms per forward pass, synchronised, smallest "
                  "profiled batch size, log scale); panels and lines as above."),
    "acc_vs_shots": ("accuracy (%) against shots per class at the tightest budget",
                     "Accuracy against shots per class at the study's tightest budget (named in the title; the "
                     "other budgets are in the cost figures and the tables): one line per method, dense and the "
                     "references at their own budget, the controls (random, scratch: dashed greys) and the pruning "
                     "methods at the tightest one; one panel per target and arm, and with many methods one column "
                     "of panels per side."),
    "budget_achieved": ("achieved params and FLOPs ratio against the requested budget",
                        "Requested budget against the achieved params and FLOPs ratios of every network (target-"
                        "side methods: averaged over each cell's episodes); the dashed diagonal is achieved = "
                        "requested. Points below it kept less than asked."),
    "search_cost": ("search time in seconds per method, log scale",
                    "Time spent searching for the pruned network, per method (log scale); one point per searched "
                    "network, coloured by budget. Methods marked (per episode) prune every episode's network on "
                    "its support set: their point is the mean time per episode. dense and linear_probe do not "
                    "search."),
    "reinit_gap": ("finetune minus reinit accuracy gap per method and budget",
                   "Accuracy with inherited weights (finetune) minus accuracy of the same architecture from a "
                   "fresh initialisation (reinit), in percentage points with its 95% CI (paired over the shared "
                   "episodes when episodes.csv is available). Right of the dashed zero line, the inherited "
                   "weights help."),
}


def _alt_text(name: str, results: pd.DataFrame) -> str:
    df = _prepared(results)
    ok = df[df["_ok"]]
    methods = method_order(ok["method"]) if not ok.empty else []
    shots = sorted({int(s) for s in pd.to_numeric(ok.get("shots"), errors="coerce").dropna()})
    arms = sorted(set(ok["arm"].astype(str))) if "arm" in ok.columns else []
    what = _FIGURE_TEXT.get(name, (name, ""))[0]
    return (f"Figure: {what}; {len(methods)} methods ({', '.join(methods)}); shots {', '.join(map(str, shots))}; "
            f"arms {', '.join(arms)}.")


#: Figures that may have nothing to say for a study: (results, episodes) -> the line shown instead, or None.
_FIGURE_NONE: dict[str, Callable[[pd.DataFrame, pd.DataFrame | None], str | None]] = {
    "reinit_gap": lambda results, episodes: (
        "Inherited weights vs fresh initialisation: no figure, no configuration ran under both the finetune and "
        "reinit arms." if reinit_gap_data(results, episodes).empty else None),
    "acc_vs_shots": lambda results, _episodes: shots_figure_note(results),
}


def _figures_html(figures: dict[str, Path], results: pd.DataFrame, episodes: pd.DataFrame | None = None) -> str:
    """The figures as numbered ``<figure>`` elements; one with nothing to show for this study (the reinit
    gap without a reinit arm, accuracy vs shots with one shots value) becomes a one-line
    ``<p id="fig-NAME-none">`` instead."""
    parts = []
    i = 0
    for name, path in figures.items():
        none = _FIGURE_NONE[name](results, episodes) if name in _FIGURE_NONE else None
        if none is not None:
            parts.append(f'<p id="fig-{_esc(name)}-none" class="figure-none">{_esc(none)}</p>')
            continue
        i += 1
        data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
        caption = _FIGURE_TEXT.get(name, (name, name))[1]
        if name.startswith("acc_vs"):
            caption += " Error bars: 95% CI over episodes; points are offset slightly sideways for legibility."
        parts.append(
            f'<figure id="fig-{_esc(name)}"><img alt="{_esc(_alt_text(name, results))}" '
            f'src="data:image/png;base64,{data}">'
            f"<figcaption><strong>Figure {i}.</strong> {_esc(caption)}</figcaption></figure>"
        )
    return "\n".join(parts)


def _mixed_banner(mixed: dict[str, dict[str, int]]) -> str:
    if not mixed:
        return ""
    items = []
    for col, label in MIXED_KEYS:
        for value, n in (mixed.get(col) or {}).items():
            items.append(f"<li>{_esc(label[:-1])} <code>{_esc(value)}</code>: {n} rows</li>")
    return ('<div class="banner warn" id="mixed-warning"><strong>Warning: mixed results.</strong> These results '
            "come from more than one code commit or config hash; building the report was explicitly allowed "
            "(<code>--allow-mixed</code> / <code>report.allow_mixed</code>). Rows from different runs may not be "
            f"comparable.<ul>{''.join(items)}</ul></div>")


def _dirty_banner(results: pd.DataFrame, provenance: dict[str, Any]) -> str:
    notes = []
    if "git_dirty" in results.columns:
        dirty = results["git_dirty"].astype(str).str.lower().isin(["true", "1", "yes"])
        if dirty.any():
            notes.append(f"{int(dirty.sum())} of {len(results)} result rows were produced from a checkout with "
                         "uncommitted changes")
    if not notes:
        return ""
    return f'<div class="banner note" id="dirty-note"><strong>Note:</strong> {_esc("; ".join(notes))}.</div>'


def _provenance_html(prov: dict[str, Any], results: pd.DataFrame) -> str:
    def get(key: str) -> Any:
        value = prov.get(key)
        return "unknown" if value is None or value == "" else value

    mlflow = prov.get("mlflow") or {}
    general = [
        ("study", get("study")),
        ("config sha256 (report)", prov.get("config_sha256") or "not given (built from the tables alone)"),
        ("this report's build", "commit and time in the report job's log, not here: the same results rebuild "
                                "to the same bytes (a DVC-versioned output)"),
        ("MLflow tracking URI", mlflow.get("tracking_uri") or "unknown"),
        ("MLflow experiment",
         f"{mlflow.get('experiment_name') or 'unknown'} (id {mlflow.get('experiment_id') or 'unknown'})"),
        ("MLflow parent run", mlflow.get("parent_run_id") or "unknown"),
    ]
    sync = prov.get("mlflow_sync") or {}
    if sync:
        general.append(("MLflow records logged by sync_tracking (spool)",
                        ", ".join(f"{k} {v}" for k, v in sorted(sync.items()))))
    keys = [c for c in ("git_commit", "git_dirty", "config_sha256") if c in results.columns]
    if keys:
        runs = results.assign(**{k: results[k].astype(str) for k in keys}).groupby(keys, sort=True).size()
        runs = runs.reset_index(name="rows").rename(columns={"git_commit": "git commit", "git_dirty": "dirty",
                                                             "config_sha256": "config sha256"})
        runs["rows"] = runs["rows"].astype(str)
        results_html = _html_table(runs, "provenance-results")
    else:
        results_html = NONE_RECORDED
    data_hashes = sorted((prov.get("data_sha256") or {}).items())
    if "data_sha256" in results.columns and "target" in results.columns:
        manifest = results.groupby(["target", "data_sha256"], sort=True).size().reset_index()
        data_hashes += [(f"{t} manifest (results.csv)", h) for t, h, _ in manifest.itertuples(index=False)]
    packages = sorted((prov.get("packages") or {}).items())
    device_cols = prov.get("device_columns") or _device_columns(results)
    devices = [(col, ", ".join(values)) for col, values in sorted(device_cols.items())]
    if not devices and prov.get("devices"):
        devices = [("devices", ", ".join(prov["devices"]))]
    return (
        _kv_table(general, "provenance-general")
        + "\n<h3>Results: commits and configs</h3>\n<p class=\"note\">The git commit, dirty flag and config "
        "hash each results row records (from the job that produced it), with row counts.</p>\n" + results_html
        + "\n<h3>Dataset hashes (sha256)</h3>\n"
        + (_kv_table(data_hashes, "provenance-data", mono_values=True) if data_hashes else NONE_RECORDED)
        + "\n<h3>Packages</h3>\n"
        + (_kv_table(packages, "provenance-packages") if packages else NONE_RECORDED)
        + "\n<h3>Devices</h3>\n"
        + (_kv_table(devices, "provenance-devices") if devices else NONE_RECORDED)
    )


_AUDIT_NOTE = (
    '<p class="note">Every <code>row_id</code> is the id of a row of <code>results/tables/results.csv</code>; '
    "<code>pruneshot audit ROW_ID</code> resolves it to that row, the records and files behind it and its MLflow "
    "run. A cell with several replicates lists all its rows.</p>"
)


def _panel_tables(table: pd.DataFrame) -> str:
    """The main results table split into one table per (target, shots, arm)."""
    if table.empty:
        return '<p id="results-none">no results</p>'
    multi_target = table["target"].nunique() > 1
    parts = []
    for (target, shots, arm), g in table.groupby(["target", "shots", "arm"], sort=False):
        title = _facet_title(target if multi_target else None, arm, int(shots) if shots.isdigit() else None)
        slug = re.sub(r"[^A-Za-z0-9_-]+", "-", f"results-{target}-{shots}shot-{arm}")
        parts.append(f"<h3>{_esc(title)}</h3>")
        parts.append(_html_table(g.drop(columns=["target", "shots", "arm"]), slug, css_class="results-table",
                                 group_by="budget"))
    return "\n".join(parts)


def _average_ranks_html(statistics: Statistics) -> str:
    """The average-rank table over the common cells, the sentence that says what it averages, the methods set
    aside (sharing no cell with the others) and, when there is no common cell, a line that says so."""
    a = statistics.average_ranks
    if a.empty:
        return '<p id="average-ranks-none">none: no method was ranked</p>'
    if not a["common"].astype(bool).any():
        return ('<p id="average-ranks-none">No common cells: no cell (target, shots, arm, budget) has every ranked '
                "method, so no average rank compares like with like; the per-cell ranks are in the results "
                "tables.</p>")
    n = int(a.loc[a["common"].astype(bool), "n_cells"].iloc[0])
    aside = a.loc[~a["common"].astype(bool), "method"].astype(str).tolist()
    text = (f"<p>Mean Meta-Dataset rank (lower is better) over the {n} common cell(s): the cells (target, shots, "
            "arm, budget) every ranked method is ranked in, so each mean averages the same cells. <em>cells</em>: "
            "the cells the mean averages over; <em>ranked in</em>: every cell the method is ranked in (its other "
            "ranks are in the results tables).")
    if aside:
        text += (f" Set aside, without a mean rank: {_esc(', '.join(aside))}; with them no cell would have "
                 "every ranked method.")
    return text + "</p>\n" + _html_table(average_rank_table(statistics), "average-ranks-table")


def _tables_html(results: pd.DataFrame, statistics: Statistics, episodes: pd.DataFrame | None) -> str:
    """Everything derived from the CSVs alone; byte-identical for identical input."""
    main = results_table(results, statistics)
    detail = detail_table(results)
    failures = failures_table(results)
    missed = budget_missed_table(results)
    prepared = _prepared(results)
    n_ok = int(prepared["_ok"].sum())
    n_bad = len(prepared) - n_ok
    fail_html = (
        _html_table(failures, "failures-table") if not failures.empty else '<p id="failures-none">none</p>'
    )
    methods = methods_table(results)
    gaps = reinit_gap_table(results, episodes)
    gap_html = _html_table(gaps, "reinit-gap-table") if not gaps.empty else \
        '<p id="reinit-gap-none">no configuration ran under both the finetune and reinit arms</p>'
    comps = comparisons_table(statistics)
    n_sig = int(statistics.comparisons["significant"].astype(bool).sum()) if not statistics.comparisons.empty else 0
    comps_html = (f"<details><summary>{len(comps)} comparisons, {n_sig} significant (show the table)</summary>"
                  + _html_table(comps, "comparisons-table") + "</details>") if not comps.empty else (
        '<p id="comparisons-none">' + ("no comparison: episodes.csv was not given" if not statistics.have_episodes
                                       else "no method shares episodes with dense or a control") + "</p>")
    avg_html = _average_ranks_html(statistics)
    return "\n".join([
        TABLES_BEGIN,
        '<section id="methods"><h2>Methods</h2>',
        "<p>Where each method comes from: <em>official code</em> follows the authors' released code, "
        "<em>abstract-level</em> follows what the paper's abstract (or patent) forces with the unstated "
        "choices filled in as documented options, <em>reconstruction</em> is our reconstruction from the "
        "abstract alone (no code exists): read those rows as such. Source-side methods search once on the "
        "source data and hand one architecture to every episode; target-side methods prune each episode's "
        "network on its support set.</p>",
        _html_table(methods, "methods-table"),
        "</section>",
        '<section id="results"><h2>Results: accuracy (%) per cell</h2>',
        "<p><em>accuracy %</em>: mean ± 95% CI half-width over the n shared episodes (replicates averaged). "
        "<em>budget</em>: requested fraction of the dense network's cost; <em>achieved</em>: the fraction the "
        "physically pruned network has on the budget metric (a range where rows differ, e.g. per-episode "
        "pruning). <em>vs dense</em> / <em>vs random</em> / <em>vs scratch</em>: mean paired difference in "
        f"percentage points and one mark per replicate: <span class=\"up\">{UP}</span> significantly better, "
        f"<span class=\"down\">{DOWN}</span> significantly worse, n.s. (or ·) not significant, — no comparison "
        "(no baseline run at that budget and arm). <em>rank</em>: Meta-Dataset rank / methods in the cell "
        "(1 = best; tied methods share a rank); dense and linear_probe are ranked in every budget's cell "
        "(linear_probe once, as dense, where dense's linear_probe arm ran).</p>",
        f'<p class="legend" id="stats-statement">{_stats_statement(statistics)} {n_sig} comparison(s) '
        "significant.</p>",
        _panel_tables(main),
        _AUDIT_NOTE,
        "</section>",
        '<section id="ranks"><h2>Average rank</h2>',
        avg_html,
        "</section>",
        '<section id="comparisons"><h2>Paired comparisons</h2>',
        "<p>Every method against dense and against each control (random, scratch) at the same budget, target, "
        "shots, arm and replicate, "
        "on the episodes both share: Δ mean = method − baseline (pp), r = matched-pairs rank-biserial effect "
        "size, W = min(W⁺, W⁻), two-sided p and Holm-adjusted p.</p>",
        comps_html,
        "</section>",
        '<section id="reinit-gap"><h2>Inherited weights vs fresh initialisation</h2>',
        "<p>Source-side methods, same architecture and episodes: <em>finetune</em> starts from the source "
        "weights of the kept channels, <em>reinit</em> from a fresh seeded initialisation. Gap = finetune − "
        "reinit in percentage points ± its 95% CI: paired over the shared episodes (replicates averaged per "
        "episode) when episodes.csv is available, else the unpaired combined half-width.</p>",
        gap_html,
        "</section>",
        '<section id="details"><h2>Detail: cost of each run</h2>',
        "<p>Requested budget against the achieved fraction of dense parameters and FLOPs, median latency "
        "per batch (ms, batch size b; on the CPU and, where one was present, on CUDA), time spent searching "
        "for the pruned network, one row per results.csv row.</p>",
        _html_table(detail, "detail-table"),
        "</section>",
        f'<section id="failures"><h2>Failures</h2><p>{n_ok} run(s) ok, {n_bad} failed. A failed row is a '
        "method that errored on a cell; its error is listed here and its cell reads <em>failed</em> above. "
        "<code>pruneshot rerun-failed</code> (with <code>--config FILE</code> for a study other than "
        "config/config.yaml's) reruns exactly the failed cells and what depends on them.</p>",
        fail_html,
        "</section>",
        '<section id="budget-missed"><h2>Budgets missed</h2><p>Rows whose achieved budget ratio is further '
        "than <code>budget.tolerance</code> from the requested one (column <code>budget_missed</code>); their "
        "accuracy is real but belongs to the cost the network actually has, and their cells read "
        "<em>⚠ missed</em> above.</p>",
        _html_table(missed, "budget-missed-table") if not missed.empty else '<p id="budget-missed-none">none</p>',
        "</section>",
        TABLES_END,
    ])

