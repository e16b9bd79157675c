"""Sanity gates: three checks every study must pass before its comparisons mean anything.

(a) ``pretraining_helps``: the pretrained dense network fine-tuned beats the same architecture
    freshly initialised (dense finetune vs dense reinit). If not, the source task teaches nothing
    the target can use, and every pruning comparison measures damage to a useless prior.
(b) ``features_beat_pixels``: a probe on the pretrained features (dense linear_probe, else dense
    prototype) beats cosine nearest-centroid on the raw pixels. If not, the features are worse than
    no network at all.
(c) ``budget_one_is_dense``: every method's network at budget 1.0 (but ``scratch``'s, another dense replicate
    by design) is the dense network (same
    architecture, every tensor equal, after the pipeline's own BatchNorm step), and where the study
    ran budget-1.0 cells, their per-episode accuracies equal dense's. If not, a method changes the
    network beyond its pruning and its numbers are not about pruning.

(a) and (b) are paired on the shared episodes, per (target, shots), replicates pooled (pairs within
one replicate): mean difference with its 95% CI (1.96 * sd / sqrt(n)) and the two-sided Wilcoxon
signed-rank p (:func:`pruneshot.report.stats.wilcoxon_signed_rank`). A gate fails when a panel's
mean difference is <= 0; a positive difference with p >= 0.05 passes with a note ("not
significant"). A gate whose inputs the study does not produce (e.g. no reinit arm) is "not
evaluated", which is never a pass. Pure functions on records; the ``sanity`` stage writes the result.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from pruneshot.report.stats import BASELINES, budget_free_methods, trains_from_scratch

#: Gate id -> (title, what it compares, what a failure means), in report order.
GATES: dict[str, tuple[str, str, str]] = {
    "pretraining_helps": (
        "(a) pretraining helps",
        "dense finetune vs dense reinit (same architecture, fresh weights), paired on the shared episodes",
        "pretraining does not help transfer here: pruning comparisons measure damage to a useless prior",
    ),
    "features_beat_pixels": (
        "(b) features beat pixels",
        "a probe on the pretrained features (dense linear_probe, else prototype) vs cosine nearest "
        "centroid on the raw pixels, paired on the shared episodes",
        "the pretrained features are worse than raw pixels: the backbone carries no transferable signal",
    ),
    "budget_one_is_dense": (
        "(c) budget 1.0 is dense",
        "every method's budget-1.0 network vs the dense network (architecture and every tensor), and "
        "budget-1.0 cells' per-episode accuracies vs dense's",
        "a method changes the network beyond pruning: its numbers are not about pruning",
    ),
}
ALPHA = 0.05


def paired(a: Mapping[Any, float], b: Mapping[Any, float]) -> dict[str, Any]:
    """Paired statistics of a - b on their shared keys (e.g. (replicate, episode)): n, mean_a, mean_b,
    mean_diff, ci95 (1.96 sd / sqrt(n)), the two-sided Wilcoxon p and significant (p < ALPHA)."""
    from pruneshot.report.stats import wilcoxon_signed_rank

    keys = sorted(set(a) & set(b))
    x, y = [a[k] for k in keys], [b[k] for k in keys]
    n = len(keys)
    if n == 0:
        return {"n": 0}
    d = [p - q for p, q in zip(x, y, strict=True)]
    mean = sum(d) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in d) / (n - 1)) if n > 1 else 0.0
    test = wilcoxon_signed_rank(x, y)
    return {"n": n, "mean_a": sum(x) / n, "mean_b": sum(y) / n, "mean_diff": mean, "ci95": 1.96 * sd / math.sqrt(n),
            "p_value": test["p_value"], "significant": test["p_value"] < ALPHA}


def _episodes(entries: Iterable[dict[str, Any]], replicate: int) -> dict[tuple[int, int], float]:
    return {(replicate, int(e["episode"])): float(e["accuracy"]) for e in entries}


def _paired_gate(gate: str, panels: dict[tuple[str, int], dict[str, Any]], a_name: str, b_name: str,
                 missing: str) -> dict[str, Any]:
    rows = []
    for (target, shots), sides in sorted(panels.items()):
        if sides.get("a") and sides.get("b"):
            rows.append({"target": target, "shots": shots, "a": sides["a_name"], "b": b_name,
                         **paired(sides["a"], sides["b"])})
    if not rows:
        return {"gate": gate, "status": "not evaluated", "reason": missing, "panels": []}
    failed = [r for r in rows if r["n"] == 0 or r["mean_diff"] <= 0]
    weak = [r for r in rows if r not in failed and not r["significant"]]
    status = "failed" if failed else "passed"
    note = (f"not significant (p >= {ALPHA}) in {len(weak)} of {len(rows)} panels" if weak and not failed else "")
    return {"gate": gate, "status": status, "note": note, "a": a_name, "b": b_name, "panels": rows}


def evaluate(transfers: Iterable[dict[str, Any]], budget_one: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The three gates from transfer records (every dense cell and every budget-1.0 cell of the study)
    and the budget-one network checks (one record per replicate, see :mod:`pruneshot.stages.sanity`).

    Returns {"gates": {id: {"gate", "status": passed|failed|not evaluated, "note", "panels": [...]}},
    "failed": [ids], "not_evaluated": [ids], "passed": bool (every gate passed)}."""
    a_panels: dict[tuple[str, int], dict[str, Any]] = defaultdict(dict)
    b_panels: dict[tuple[str, int], dict[str, Any]] = defaultdict(dict)
    dense_eps: dict[tuple[str, int, str], dict[tuple[int, int], float]] = defaultdict(dict)
    others: list[dict[str, Any]] = []
    for rec in transfers:
        if rec.get("status") != "ok":
            continue
        key, r = (rec["target"], int(rec["shots"])), int(rec["replicate"])
        if rec["method"] != "dense":
            if float(rec["requested_budget"]) >= 1.0 and not trains_from_scratch(rec["method"]):
                others.append(rec)
            continue
        arms = rec["arms"]
        for arm, r_arm in arms.items():
            dense_eps[(*key, arm)] |= _episodes(r_arm["episodes"], r)
        if "finetune" in arms and "reinit" in arms:
            a_panels[key].setdefault("a", {}).update(_episodes(arms["finetune"]["episodes"], r))
            a_panels[key].setdefault("b", {}).update(_episodes(arms["reinit"]["episodes"], r))
            a_panels[key]["a_name"] = "dense/finetune"
        probe = "linear_probe" if "linear_probe" in arms else "prototype" if "prototype" in arms else None
        pixels = (rec.get("controls") or {}).get("pixel_prototype")
        if probe and pixels:
            b_panels[key].setdefault("a", {}).update(_episodes(arms[probe]["episodes"], r))
            b_panels[key].setdefault("b", {}).update(_episodes(pixels["episodes"], r))
            b_panels[key]["a_name"] = f"dense/{probe}"
    gates = {
        "pretraining_helps": _paired_gate("pretraining_helps", a_panels, "dense/finetune", "dense/reinit",
                                          "needs method dense with transfer arms finetune and reinit"),
        "features_beat_pixels": _paired_gate("features_beat_pixels", b_panels, "dense/linear_probe",
                                             "pixels/nearest centroid",
                                             "needs method dense with transfer arm linear_probe or prototype"),
        "budget_one_is_dense": _budget_one_gate(list(budget_one), others, dense_eps),
    }
    failed = [g for g, v in gates.items() if v["status"] == "failed"]
    not_evaluated = [g for g, v in gates.items() if v["status"] == "not evaluated"]
    return {"gates": gates, "failed": failed, "not_evaluated": not_evaluated,
            "passed": not failed and not not_evaluated}


def _budget_one_gate(checks: list[dict[str, Any]], cells: list[dict[str, Any]],
                     dense_eps: dict[tuple[str, int, str], dict[tuple[int, int], float]]) -> dict[str, Any]:
    rows = []
    for rec in checks:
        for m in rec.get("methods", []):
            rows.append({"method": m["method"], "replicate": rec["replicate"], "check": m["check"],
                         "equal": bool(m["equal"]), "detail": m.get("detail", "")})
    for rec in cells:
        for arm, r_arm in rec["arms"].items():
            dense = dense_eps.get((rec["target"], int(rec["shots"]), arm))
            if not dense:
                continue
            ours = _episodes(r_arm["episodes"], int(rec["replicate"]))
            shared = sorted(set(ours) & set(dense))
            diff = [k for k in shared if ours[k] != dense[k]]
            rows.append({"method": rec["method"], "replicate": rec["replicate"],
                         "check": f"{rec['target']} {rec['shots']}-shot {arm}: per-episode accuracy",
                         "equal": bool(shared) and not diff,
                         "detail": f"{len(shared) - len(diff)}/{len(shared)} episodes equal"})
    if not rows:
        return {"gate": "budget_one_is_dense", "status": "not evaluated", "panels": [],
                "reason": "no budget-1.0 network check ran (rule budget_one)"}
    bad = [r for r in rows if not r["equal"]]
    return {"gate": "budget_one_is_dense", "status": "failed" if bad else "passed", "panels": rows,
            "note": f"{len(rows) - len(bad)} of {len(rows)} checks exact"}


def summary_lines(result: Mapping[str, Any]) -> list[str]:
    """One line per gate for the terminal (``pruneshot summary``, the end of ``make run``)."""
    out = []
    for gate, v in result["gates"].items():
        title, _, meaning = GATES[gate]
        line = f"sanity {title}: {v['status'].upper()}"
        panels = [p for p in v.get("panels", []) if "mean_diff" in p]
        if panels:
            line += "; " + ", ".join(f"{p['target']} {p['shots']}-shot {100 * p['mean_a']:.1f} vs "
                                     f"{100 * p['mean_b']:.1f} (diff {100 * p['mean_diff']:+.1f}, p={p['p_value']:.2g})"
                                     for p in panels)
        elif v.get("note"):
            line += f"; {v['note']}"
        if v["status"] == "failed":
            line += f" -> {meaning}"
        elif v["status"] == "not evaluated":
            line += f" ({v.get('reason', '')})"
        out.append(line)
    return out


def _pct(v: Any) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def sanity_html(result: Mapping[str, Any] | None, results: Any = None) -> str:
    """The report's top section: a red banner naming each failed gate and what it means (an amber
    one for a gate not evaluated), then one table per gate with its paired statistics."""
    from pruneshot.report.html import _esc

    if result is None:
        result = {"gates": {}, "failed": [], "not_evaluated": [], "missing": True}
    parts = []
    if result.get("missing"):
        parts.append('<div class="banner warn" id="sanity-missing"><strong>Sanity gates not computed.</strong> '
                     "This report was built without the sanity rule's output (results/&lt;study&gt;/sanity/"
                     "gates.json).</div>")
    failed, missing = result.get("failed", []), result.get("not_evaluated", [])
    if failed:
        items = "".join(f"<li><strong>{_esc(GATES[g][0])}</strong> failed: {_esc(GATES[g][2])}.</li>" for g in failed)
        parts.append(f'<div class="banner fail" id="sanity-failed"><strong>Sanity gate failed.</strong> Do not '
                     f"read the comparisons below as evidence about pruning until this is resolved.<ul>{items}</ul>"
                     "</div>")
    if missing:
        items = "".join(f"<li>{_esc(GATES[g][0])}: {_esc(result['gates'][g].get('reason', ''))}</li>"
                        for g in missing)
        parts.append(f'<div class="banner warn" id="sanity-not-evaluated"><strong>Sanity gate not evaluated.'
                     f"</strong><ul>{items}</ul></div>")
    if not failed and not missing and not result.get("missing"):
        parts.append('<div class="banner pass" id="sanity-passed"><strong>All three sanity gates pass.</strong> '
                     + _esc("; ".join(GATES[g][0] for g in GATES)) + ".</div>")
    for gate, v in result["gates"].items():
        title, compares, _ = GATES[gate]
        note = f" · {v['note']}" if v.get("note") else ""
        parts.append(f'<h3 id="gate-{gate}">{_esc(title)}: {_esc(v["status"])}</h3>'
                     f"<p>{_esc(compares)}{_esc(note)}.</p>")
        rows = v.get("panels", [])
        if rows and "mean_diff" in rows[0]:
            body = "".join(
                f"<tr><td>{_esc(r['target'])}</td><td>{r['shots']}</td><td>{_esc(r['a'])}</td>"
                f"<td>{_pct(r['mean_a'])}</td><td>{_esc(r['b'])}</td><td>{_pct(r['mean_b'])}</td>"
                f"<td>{100 * r['mean_diff']:+.1f} ± {100 * r['ci95']:.1f}</td><td>{r['p_value']:.3g}</td>"
                f"<td>{r['n']}</td></tr>" for r in rows if r.get("n"))
            parts.append('<table class="sanity"><thead><tr><th>target</th><th>shots</th><th>a</th><th>acc a (%)</th>'
                         "<th>b</th><th>acc b (%)</th><th>a − b (pp, 95% CI)</th><th>Wilcoxon p</th>"
                         f"<th>paired episodes</th></tr></thead><tbody>{body}</tbody></table>")
        elif rows:
            body = "".join(f"<tr><td>{_esc(r['method'])}</td><td>{r['replicate']}</td><td>{_esc(r['check'])}</td>"
                           f"<td>{'equal' if r['equal'] else 'DIFFERS'}</td><td>{_esc(r['detail'])}</td></tr>"
                           for r in rows)
            table = ('<table class="sanity"><thead><tr><th>method</th><th>replicate</th><th>check</th>'
                     f"<th>result</th><th>detail</th></tr></thead><tbody>{body}</tbody></table>")
            # every check exact: folded, so the other gates stay in view; a difference is shown open
            parts.append(table if not all(r["equal"] for r in rows) else
                         f"<details><summary>the {len(rows)} checks, all exact (show them)</summary>{table}</details>")
    if results is not None:
        equal = equal_by_construction(results)
        if equal:
            parts.append('<h3 id="equal">What every comparison shared</h3><ul id="equal-list">'
                         + "".join(f"<li>{_esc(t)}</li>" for t in equal) + "</ul>")
    return '<section id="sanity"><h2>Sanity gates</h2>' + "\n".join(parts) + "</section>"


def equal_by_construction(results: Any) -> list[str]:
    """Sentences stating what every compared row shared, read from results.csv (``results``: its
    DataFrame), so a reader can check the comparison was fair: episodes, support steps per arm, the
    BatchNorm treatment, the controls in every panel and random's masks."""
    import pandas as pd

    ok = results[results.get("status", "ok") == "ok"] if "status" in results else results
    if ok.empty:
        return []
    out = []
    n = sorted({int(v) for v in pd.to_numeric(ok.get("n_episodes"), errors="coerce").dropna()})
    seeds = sorted({str(v) for v in ok.get("seed_episode", pd.Series(dtype=str)).astype(str)})
    out.append(f"Episodes: every row of a (target, shots) panel is scored on the same saved episodes "
               f"({', '.join(map(str, n))} per cell; episode root seed {', '.join(seeds)}), with the same "
               "per-episode head seed, so every comparison below is paired.")
    selected = "transfer_settings" in ok and (ok["transfer_settings"].astype(str) == "selected").any()
    if selected:
        out.append("Transfer settings: every trained arm's learning rate and support steps were chosen for each "
                   "method, budget, replicate and shots by the same procedure, on the same validation episodes "
                   "from classes that are never target classes, over the same grid (section Transfer settings); "
                   "steps and learning rates therefore differ between rows by design, and each row records its own "
                   "(transfer_lr, support_steps).")
    elif "support_steps" in ok:
        parts = []
        for arm, g in ok.groupby("arm"):
            vals = sorted({int(v) for v in pd.to_numeric(g["support_steps"], errors="coerce").dropna()})
            if arm == "prototype":  # no training: only a target-side method's adapt touches the support set
                adapt = [v for v in vals if v]
                parts.append("prototype none" + (f" (target-side adapt: {'/'.join(map(str, adapt))})" if adapt
                                                 else ""))
                continue
            parts.append(f"{arm} {'/'.join(map(str, vals)) if vals else 'not recorded'}"
                         + (" (DIFFERS between methods)" if len(vals) > 1 else ""))
        out.append("Support-set steps per arm, every method (a target-side method's adapt steps counted inside): "
                   + "; ".join(parts) + ".")
    if "bn_statistics" in ok:
        kinds = ok.groupby("bn_statistics")["method"].unique()
        out.append("BatchNorm statistics: " + "; ".join(f"{k}: {', '.join(sorted(v))}" for k, v in kinds.items())
                   + " (searched networks re-estimated on the same source images; reinit arm: support images).")
    panels = ok.groupby(["target", "shots", "arm"])["method"].apply(set)
    dense_only = sorted({a for (_, _, a), m in panels.items() if m <= set(budget_free_methods(m))})
    if dense_only:  # no comparison between methods there: the gates' controls (transfer.dense_only_arms)
        out.append(f"Arms run for the dense network only (the sanity gates' controls, no comparison between "
                   f"methods): {', '.join(dense_only)}.")
    for control in BASELINES:
        if any(control in m for m in panels):
            missing = [f"{t} {s}-shot {a}" for (t, s, a), m in panels.items()
                       if control not in m and (control == "dense" or a not in dense_only)]
            out.append(f"Control {control} is in every panel" if not missing
                       else f"Control {control} is missing from: {', '.join(missing)}")
    if "networks" in ok and (ok["method"] == "random").any():
        r = ok[(ok["method"] == "random") & (ok["arm"] != "reinit")]  # reinit: one architecture, one network
        k = sorted({int(v) for v in pd.to_numeric(r["networks"], errors="coerce").dropna()})
        lo, hi = pd.to_numeric(r.get("network_acc_min"), errors="coerce"), pd.to_numeric(r.get("network_acc_max"),
                                                                                         errors="coerce")
        spread = (hi - lo).dropna()
        text = f"random: {'/'.join(map(str, k))} masks per network, each evaluated on every episode; its rows are " \
               "their per-episode mean (reinit: the masks share one architecture, so one network)"
        if len(spread):
            text += f"; the masks' cell means differ by up to {100 * spread.max():.1f} points (median " \
                    f"{100 * spread.median():.1f})"
        out.append(text + ".")
    return out


def mechanism_table(results: Any) -> Any:
    """One row per (method, budget, target, shots) with its recorded mechanism figures (results.csv's
    ``mechanism`` JSON, e.g. slimming's gamma sparsity, channel scaling's share removed by threshold),
    replicates averaged; one arm's row per cell (the figures describe the network, not the arm)."""
    import json

    import pandas as pd

    if "mechanism" not in results:
        return pd.DataFrame()
    rows = []
    ok = results[results["status"] == "ok"] if "status" in results else results
    for _, r in ok.iterrows():
        try:
            figs = json.loads(r["mechanism"]) if isinstance(r["mechanism"], str) else {}
        except ValueError:
            figs = {}
        if figs:
            rows.append({"method": r["method"], "budget": r["requested_budget"], "target": r["target"],
                         "shots": r["shots"], "arm": r["arm"], **figs})
    if not rows:
        return pd.DataFrame()
    df = pd.DataFrame(rows)
    first_arm = df.groupby(["method", "budget", "target", "shots"])["arm"].transform("first")
    df = df[df["arm"] == first_arm].drop(columns="arm")
    return df.groupby(["method", "budget", "target", "shots"], as_index=False).mean(numeric_only=True).round(4)


def mechanism_html(results: Any) -> str:
    """The report's mechanism section (empty when no method records mechanism figures)."""
    from pruneshot.report.html import _esc

    table = mechanism_table(results)
    if table.empty:
        return ""
    parts = []
    for method, g in table.groupby("method"):
        g = g.dropna(axis=1, how="all")
        head = "".join(f"<th>{_esc(c)}</th>" for c in g.columns if c != "method")
        body = "".join("<tr>" + "".join(f"<td>{_esc(v)}</td>" for c, v in row.items() if c != "method") + "</tr>"
                       for _, row in g.iterrows())
        parts.append(f"<h3>{_esc(method)}</h3><table class=\"mechanism\"><thead><tr>{head}</tr></thead>"
                     f"<tbody>{body}</tbody></table>")
    return ('<section id="mechanism"><h2>Mechanisms</h2><p>What each method\'s own mechanism did, as its search '
            "recorded it (target-side: mean over the cell's episodes): e.g. slimming's share of near-zero BatchNorm "
            "scales and the overlap of its kept channels with a plain |gamma| ranking of the pretrained network "
            "(1.0: the sparsity training changed nothing), channel scaling's channels removed by its threshold "
            "rather than by ranking.</p>" + "".join(parts) + "</section>")


def retention_table(results: Any) -> Any:
    """Per source-side (method, budget): the source validation accuracy (%) of the network handed to
    transfer (after the shared BN recalibration), replicates averaged, and its per-group widths
    (channels; replicate 0's network, ``widths`` JSON). Target-side methods prune per episode on the
    target: no row."""
    import json

    import pandas as pd

    if "source_val_acc" not in results:
        return pd.DataFrame()
    ok = results[(results["status"] == "ok") if "status" in results else slice(None)]
    ok = ok[pd.to_numeric(ok["source_val_acc"], errors="coerce").notna()]
    if ok.empty:
        return pd.DataFrame()
    rows = []
    for (method, budget), g in ok.groupby(["method", "requested_budget"], sort=False):
        per_rep = g.drop_duplicates("replicate")
        widths = json.loads(per_rep["widths"].iloc[0]) if isinstance(per_rep["widths"].iloc[0], str) else {}
        rows.append({"method": method, "budget": budget,
                     "source val acc %": round(100 * float(pd.to_numeric(per_rep["source_val_acc"]).mean()), 2),
                     "replicates": len(per_rep), "widths": " ".join(str(widths[k]) for k in sorted(widths))})
    return pd.DataFrame(rows)


def retention_html(results: Any) -> str:
    """The report's source-retention section (empty without ``source_val_acc``)."""
    from pruneshot.report.html import _esc

    table = retention_table(results)
    if table.empty:
        return ""
    head = "".join(f"<th>{_esc(c)}</th>" for c in table.columns)
    body = "".join("<tr>" + "".join(f"<td>{_esc(v)}</td>" for v in row) + "</tr>"
                   for row in table.itertuples(index=False))
    return ('<section id="retention"><h2>Source retention</h2><p>What each transferred network keeps of the '
            "source task before any target data: its accuracy on the source validation split (after the same "
            "BatchNorm recalibration for every method) and its channels per layer. A method that destroys the "
            "source task and still transfers well is a finding.</p>"
            f'<table class="retention"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></section>')
