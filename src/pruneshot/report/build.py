"""Building the self-contained HTML report comparing pruning methods on few-shot transfer
(:func:`build_report`; the parts live in ``load``, ``tables``, ``figures`` and ``html``).

Inputs are the tidy ``results.csv`` (one row per method x budget x target x shots x arm x
replicate), optionally ``episodes.csv`` (``row_id, episode, accuracy``: the paired per-episode
accuracies behind the significance tests and the paired reinit gap) and a provenance dict.
Output is one HTML file with inline CSS, figures embedded as base64 PNG ``data:`` URIs, no
scripts and no external resources, so it can be mailed, archived or attached to a paper as
is. The figures are also written as PNG files for Snakemake's native report.

Statistics come from :mod:`pruneshot.report.stats`: per cell the mean over the shared episodes with
its 95% CI and n, the spread across replicates, paired Wilcoxon signed-rank tests of every
method against dense and random (Holm-Bonferroni over all comparisons of the report) and
Meta-Dataset ranks. Failed rows (``status != "ok"``) are listed with their error and shown as
"failed" in the tables; they are never dropped silently.

The report refuses results that mix code commits or config hashes (:class:`MixedResultsError`)
unless ``allow_mixed`` is set; then a warning banner lists the mixed values.

Determinism: the HTML and the PNGs are byte-identical for the same CSVs, provenance and code
(PNGs are written without a ``Software`` tag or timestamps; the report names the commits that
produced its rows, not the checkout or the time that built it), so a colleague's ``make report``
after ``dvc pull`` leaves ``dvc status`` and ``pruneshot audit --verify`` clean. The tables sit
between the HTML comments ``<!-- tables:begin -->`` and ``<!-- tables:end -->``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd

from pruneshot.io import atomic_path
from pruneshot.report.figures import make_figures
from pruneshot.report.headline import headline_html
from pruneshot.report.html import (
    _CSS,
    _dirty_banner,
    _esc,
    _figures_html,
    _how_to_read,
    _mixed_banner,
    _provenance_html,
    _tables_html,
)
from pruneshot.report.load import FILE_MODE, check_mixed, load_episodes, load_results
from pruneshot.report.sanity import mechanism_html, retention_html, sanity_html
from pruneshot.report.selection import FIGURE as SELECTION_FIGURE
from pruneshot.report.selection import lr_figure, selection_html
from pruneshot.report.tables import compute_statistics

_TOC = (("sanity", "Sanity gates"), ("headline", "Headline"), ("mechanism", "Mechanisms"),
        ("retention", "Source retention"), ("selection", "Transfer settings"),
        ("how-to-read", "How to read"),
        ("figures", "Figures"), ("methods", "Methods"),
        ("results", "Results per cell"), ("ranks", "Average rank"), ("comparisons", "Paired comparisons"),
        ("reinit-gap", "Reinit gap"), ("details", "Cost detail"), ("failures", "Failures"),
        ("provenance", "Provenance"))


def render_html(results: pd.DataFrame, provenance: dict[str, Any], figures: dict[str, Path],
                episodes: pd.DataFrame | None = None, mixed: dict[str, dict[str, int]] | None = None,
                sanity: dict[str, Any] | None = None, selection: pd.DataFrame | None = None) -> str:
    """The report as an HTML string (see :func:`build_report`)."""
    study = provenance.get("study") or "unnamed study"

    def short(col: str, label: str) -> str:
        values = sorted({str(v) for v in results.get(col, pd.Series(dtype=str)).astype(str) if v and v != "nan"})
        return f"<code>{_esc(values[0][:12])}</code>" if len(values) == 1 else f"{len(values)} {label} (mixed)" \
            if values else "unknown"
    statistics = compute_statistics(results, episodes)
    toc = "".join(f'<li><a href="#{a}">{_esc(t)}</a></li>' for a, t in _TOC
                  if a != "selection" or selection is not None)
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>pruneshot report: {_esc(study)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        f"<h1>pruneshot report: {_esc(study)}</h1>",
        f'<p class="meta">Pruning methods compared on few-shot transfer · results from commit '
        f"{short('git_commit', 'commits')}, config {short('config_sha256', 'configs')}</p>",
        _mixed_banner(mixed or {}),
        _dirty_banner(results, provenance),
        f"<nav><ul>{toc}</ul></nav>",
        sanity_html(sanity, results),
        headline_html(results, statistics),
        mechanism_html(results),
        retention_html(results),
        selection_html(selection, figures.get(SELECTION_FIGURE)),
        '<section id="how-to-read"><h2>How to read this report</h2>',
        _how_to_read(results, statistics),
        "</section>",
        '<section id="figures"><h2>Figures</h2>',
        _figures_html({k: v for k, v in figures.items() if k != SELECTION_FIGURE}, results, episodes),
        "</section>",
        _tables_html(results, statistics, episodes),
        '<section id="provenance"><h2>Provenance</h2>',
        _provenance_html(provenance, results),
        "</section>",
        "</body>",
        "</html>",
        "",
    ])


def build_report(results_csv: Path, provenance: dict, out_html: Path, figures_dir: Path,
                 episodes_csv: Path | None = None, allow_mixed: bool = False,
                 sanity: dict[str, Any] | None = None, selection_csv: Path | None = None) -> dict[str, Path]:
    """Write a self-contained HTML report for ``results_csv`` to ``out_html`` (atomically).

    ``episodes_csv`` (results/tables/episodes.csv) enables the paired tests and the paired reinit
    gap. Results from several code commits or config hashes raise :class:`MixedResultsError`
    before anything is written, unless ``allow_mixed`` (then a warning banner lists them).
    Figures are written to ``figures_dir`` (``{name}.png``, for Snakemake's report) and
    embedded as base64 ``data:`` URIs; CSS is inline; no scripts or external resources.
    All text is HTML-escaped. ``sanity``: the sanity gates (``results/<study>/sanity/gates.json``),
    shown at the top (a red banner for a failed gate). ``selection_csv`` (transfer.select): the chosen
    transfer settings and the learning-rate sensitivity figure. Returns the figure paths.
    """
    results = load_results(results_csv)
    mixed = check_mixed(results, allow_mixed)
    episodes = load_episodes(episodes_csv) if episodes_csv is not None else None
    figures = make_figures(results, Path(figures_dir), episodes)
    selection = pd.read_csv(selection_csv) if selection_csv is not None else None
    lr_fig = lr_figure(selection, Path(figures_dir) / f"{SELECTION_FIGURE}.png") if selection is not None else None
    if lr_fig is not None:
        os.chmod(lr_fig, FILE_MODE)
        figures = {**figures, SELECTION_FIGURE: lr_fig}
    text = render_html(results, provenance, figures, episodes, mixed, sanity, selection)
    with atomic_path(out_html) as tmp:
        tmp.write_text(text, encoding="utf-8")
        os.chmod(tmp, FILE_MODE)
    return figures
