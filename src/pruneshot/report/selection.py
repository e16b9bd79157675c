"""The report's section on transfer settings chosen on validation (``transfer.select``): the chosen learning
rate and support steps per method, budget, shots and arm, and the learning-rate sensitivity figure
(validation accuracy against lr per method). Reads ``tables/selection.csv`` (:func:`pruneshot.stages.select.
selection_table`); accuracies are fractions there, % here."""

from __future__ import annotations

import base64
import html
from pathlib import Path

import numpy as np
import pandas as pd

from pruneshot.report.formatting import truthy
from pruneshot.report.load import method_order

#: The figure's file name (below the report's figures folder).
FIGURE = "lr_sensitivity"


def chosen_table(selection: pd.DataFrame) -> pd.DataFrame:
    """One row per (method, budget, shots, arm): the chosen lr and steps (one value per replicate, joined
    with '/' where replicates chose differently) and the chosen pair's validation accuracy (%, mean over
    replicates)."""
    cols = ["method", "budget", "shots", "arm", "lr", "steps", "validation acc %"]
    ok = selection[(selection["status"] == "ok") & truthy(selection["chosen"])] if len(selection) else selection
    if ok.empty:
        return pd.DataFrame(columns=cols)
    rows = []
    for (m, b, s, a), g in ok.groupby(["method", "requested_budget", "shots", "arm"], sort=False):
        g = g.sort_values("replicate")
        rows.append({"method": m, "budget": f"{float(b):g}", "shots": int(s), "arm": a,
                     "lr": "/".join(f"{float(v):g}" for v in g["lr"]),
                     "steps": "/".join(str(int(v)) for v in g["steps"]),
                     "validation acc %": f"{100 * float(g['accuracy'].mean()):.1f}"})
    out = pd.DataFrame(rows, columns=cols)
    order = {m: i for i, m in enumerate(method_order(out["method"]))}
    return out.assign(_o=out["method"].map(order), _b=-out["budget"].astype(float)).sort_values(
        ["_o", "_b", "shots", "arm"], kind="mergesort").drop(columns=["_o", "_b"]).reset_index(drop=True)


def sensitivity(selection: pd.DataFrame) -> pd.DataFrame:
    """Per (method, shots, arm, lr): the validation accuracy (fraction) at the best step count for that lr,
    averaged over budgets and replicates (columns method, shots, arm, lr, accuracy)."""
    ok = selection[selection["status"] == "ok"] if len(selection) else selection
    if ok.empty:
        return pd.DataFrame(columns=["method", "shots", "arm", "lr", "accuracy"])
    best = ok.groupby(["method", "requested_budget", "replicate", "shots", "arm", "lr"])["accuracy"].max()
    return best.groupby(["method", "shots", "arm", "lr"]).mean().reset_index()


def lr_figure(selection: pd.DataFrame, path: Path) -> Path | None:
    """Accuracy against learning rate (log x) on the validation episodes: one panel per (arm, shots), one
    line per method; None when there is nothing to draw."""
    from matplotlib.figure import Figure

    from pruneshot.io import atomic_path
    from pruneshot.report.plotting import FIGURE_DPI
    from pruneshot.report.styles import method_styles

    data = sensitivity(selection)
    if data.empty:
        return None
    arms, shots = sorted(data["arm"].unique()), sorted(data["shots"].astype(int).unique())
    methods = method_order(data["method"])
    styles = method_styles(methods)
    fig = Figure(figsize=(1.0 + 4.0 * len(shots), 0.8 + 3.0 * len(arms)), dpi=FIGURE_DPI, layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(arms), len(shots), sharey=True, squeeze=False))
    for r, arm in enumerate(arms):
        for c, s in enumerate(shots):
            ax = axes[r, c]
            panel = data[(data["arm"] == arm) & (data["shots"].astype(int) == s)]
            for m in methods:
                line = panel[panel["method"] == m].sort_values("lr")
                if not line.empty:
                    ax.plot(line["lr"], 100 * line["accuracy"], marker=styles[m]["marker"], color=styles[m]["color"],
                            label=m)
            ax.set_xscale("log")
            ax.set_title(f"{s}-shot · {arm}", fontsize="medium")
            if c == 0:
                ax.set_ylabel("validation accuracy (%)")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize="small")
    fig.supxlabel("learning rate (best step count per lr; mean over budgets and replicates)", fontsize="medium")
    fig.suptitle("Learning-rate sensitivity on the validation episodes")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def selection_html(selection: pd.DataFrame | None, figure: Path | None) -> str:
    """The report section (empty string when the study used fixed transfer settings)."""
    if selection is None:
        return ""
    from pruneshot.report.html import _html_table

    table = chosen_table(selection)
    failed = selection[selection["status"] != "ok"] if len(selection) else selection
    parts = ['<section id="selection"><h2>Transfer settings chosen on validation</h2>',
             "<p>Every trained arm's learning rate and support steps were chosen per method, budget, replicate "
             "and shots, by the same rule on the same fixed validation episodes, drawn from classes that are "
             "never target classes (<code>transfer.select</code>): the grid point of highest mean validation "
             "accuracy (ties: the smaller lr, then the fewer steps). No target episode was read. A "
             "target-side method's adapt steps count inside the chosen steps.</p>",
             _html_table(table, "selection-table") if not table.empty else '<p id="selection-none">none</p>']
    if len(failed):
        parts.append(f'<p id="selection-failed">{len(failed)} selection(s) failed: '
                     + html.escape("; ".join(sorted({str(e) for e in failed["error"]}))) + "</p>")
    if figure is not None:
        data = base64.b64encode(Path(figure).read_bytes()).decode("ascii")
        parts.append(f'<figure id="fig-{FIGURE}"><img alt="validation accuracy against learning rate per method" '
                     f'src="data:image/png;base64,{data}"><figcaption>Learning-rate sensitivity: validation accuracy '
                     "at the best step count for each learning rate, averaged over budgets and replicates, per "
                     "method. A flat line: the method is robust to the choice; a peak at an end of the grid: the "
                     "grid may be too narrow.</figcaption></figure>")
    parts.append("</section>")
    return "\n".join(parts)
