"""The validation study's headline (issue 13): every method at every budget, finetune and prototype
accuracy against the controls `scratch` and `random`, paired on the shared episodes, Holm-adjusted
over the whole family; and which methods beat `scratch` significantly.

Pairs: per episode, a method's accuracy averaged over the study's replicates (each replicate has its
own pretrained network and searches, the episodes are shared) against the control's, so n = the
episodes per cell and a replicate is not counted as independent evidence. The table also gives how
many replicates' own means point the same way. Reads results.csv and episodes.csv of a finished study.

    python benchmarks/validation_headline.py [results/mnist10k_validation] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pandas as pd

from pruneshot.report.sanity import paired  # the gates' paired statistics: mean diff, CI, Wilcoxon p
from pruneshot.report.stats import holm

CONTROLS = ("scratch", "random")
ARMS = ("finetune", "prototype")
ALPHA = 0.05


def per_episode(results: pd.DataFrame, episodes: pd.DataFrame) -> dict[tuple, dict[int, dict[int, float]]]:
    """(method, budget, target, shots, arm) -> replicate -> episode -> accuracy (ok rows only)."""
    ok = results[results["status"] == "ok"]
    eps = episodes.groupby("row_id")
    out: dict[tuple, dict[int, dict[int, float]]] = {}
    for row in ok.itertuples():
        key = (row.method, float(row.requested_budget), row.target, int(row.shots), row.arm)
        g = eps.get_group(str(row.row_id))
        out.setdefault(key, {})[int(row.replicate)] = dict(zip(g["episode"].astype(int), g["accuracy"], strict=True))
    return out


def _mean_over_replicates(reps: dict[int, dict[int, float]], keep: set[int]) -> dict[int, float]:
    common = set.intersection(*(set(v) for v in reps.values()))
    return {e: sum(reps[r][e] for r in keep) / len(keep) for e in common}


def headline(results: pd.DataFrame, episodes: pd.DataFrame) -> pd.DataFrame:
    """One row per (method, budget, target, shots, arm, control) with the paired statistics."""
    episodes = episodes.assign(row_id=episodes["row_id"].astype(str))
    cells = per_episode(results, episodes)
    rows: list[dict[str, Any]] = []
    for (method, budget, target, shots, arm), reps in sorted(cells.items()):
        if arm not in ARMS or method in CONTROLS or budget >= 1.0:
            continue
        for control in CONTROLS:
            other = cells.get((control, budget, target, shots, arm))
            if not other:
                continue
            keep = set(reps) & set(other)
            test = paired(_mean_over_replicates(reps, keep), _mean_over_replicates(other, keep))
            rep_means = [sum(reps[r].values()) / len(reps[r]) - sum(other[r].values()) / len(other[r])
                         for r in sorted(keep)]
            rows.append({"method": method, "budget": budget, "target": target, "shots": shots, "arm": arm,
                         "control": control, "acc": 100 * test["mean_a"], "control_acc": 100 * test["mean_b"],
                         "diff_pp": 100 * test["mean_diff"], "ci95_pp": 100 * test["ci95"], "n": test["n"],
                         "replicates": len(keep), "replicates_up": sum(v > 0 for v in rep_means),
                         "p": test["p_value"]})
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    table["p_holm"] = holm(table["p"].tolist())
    table["significant"] = table["p_holm"] < ALPHA
    return table


def markdown(table: pd.DataFrame) -> str:
    """The table as the note and README show it: one row per (method, budget, arm), both controls."""
    lines = ["| method | budget | arm | acc % | vs scratch (pp, 95% CI) | p Holm | vs random (pp, 95% CI) | p Holm |",
             "|---|---|---|---|---|---|---|---|"]
    for (method, budget, arm), g in table.groupby(["method", "budget", "arm"], sort=False):
        cells = []
        for control in CONTROLS:
            r = g[g["control"] == control]
            if r.empty:
                cells += ["—", "—"]
                continue
            r = r.iloc[0]
            mark = " **sig**" if r["significant"] else ""
            cells += [f"{r['diff_pp']:+.1f} ± {r['ci95_pp']:.1f} ({r['replicates_up']}/{r['replicates']} up){mark}",
                      f"{r['p_holm']:.2g}"]
        lines.append(f"| {method} | {budget:g} | {arm} | {g.iloc[0]['acc']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="?", default="results/mnist10k_validation", type=Path)
    ap.add_argument("--out", default=Path("benchmarks/results"), type=Path)
    args = ap.parse_args()
    results = pd.read_csv(args.results / "tables/results.csv", dtype={"row_id": str})
    episodes = pd.read_csv(args.results / "tables/episodes.csv", dtype={"row_id": str})
    table = headline(results, episodes)
    controls = results[results["method"].isin(CONTROLS) & (results["status"] == "ok")]
    beat_scratch = table[(table["control"] == "scratch") & table["significant"] & (table["diff_pp"] > 0)]
    below_scratch = table[(table["control"] == "scratch") & table["significant"] & (table["diff_pp"] < 0)]
    summary = {
        "study": args.results.name,
        "family": len(table), "alpha": ALPHA,
        "pairs": "per episode, accuracy averaged over replicates",
        "control_acc": {f"{m}@{b:g}/{a}": round(100 * g["acc_mean"].mean(), 2)
                        for (m, b, a), g in controls.groupby(["method", "requested_budget", "arm"])},
        "beat_scratch": sorted({f"{r.method}@{r.budget:g}/{r.arm}" for r in beat_scratch.itertuples()}),
        "below_scratch": sorted({f"{r.method}@{r.budget:g}/{r.arm}" for r in below_scratch.itertuples()}),
        "rows": table.to_dict("records"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{args.results.name}_headline"
    stem.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(table))
    print(markdown(table))
    print("beat scratch significantly:", summary["beat_scratch"] or "none")
    print("significantly below scratch:", summary["below_scratch"] or "none")
    print(f"written: {stem}.json, {stem}.md")


if __name__ == "__main__":
    main()
