"""Two studies' results side by side (``pruneshot compare A B``).

Cells are matched on :data:`KEYS` (method, requested_budget, target, ways, shots, arm, replicate).
Accuracies are fractions in [0, 1] in every table here (as in ``results.csv``); only the text of
:func:`format_comparison` shows percent and percentage points (pp).

Pairing rule: two matched cells are compared episode by episode only when both rows are ``ok``,
have the same ``seed_episode`` and ``n_episodes``, the episodes files of their (target, ways, shots)
in the two studies (``results/<study>/episodes/<target>/<ways>way_<shots>shot.json``) have the same
content hash (:func:`pruneshot.data.episodes.content_sha256`: the target pool's sha256,
queries_per_class and every episode's classes and support/query indices, so it stands for the
configs' data and episodes settings), and ``episodes.csv`` holds exactly episodes 0..n_episodes-1 for
both rows. Such a cell gets a two-sided Wilcoxon signed-rank test of B vs A on the per-episode
accuracies, Holm-adjusted over all paired cells; any other matched cell gets the difference of the
means only, and a note saying why it is not paired.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pruneshot.config import budget_value
from pruneshot.report.formatting import MISSING, fmt_budget, fmt_p
from pruneshot.report.stats import holm, wilcoxon_signed_rank

#: The columns that identify a cell in both studies.
KEYS = ("method", "requested_budget", "target", "ways", "shots", "arm", "replicate")
#: (target, ways, shots): the episodes a cell is evaluated on.
EpisodeKey = tuple[str, int, int]
#: Columns of :func:`compare_results`' table.
COLUMNS = (
    "present", *KEYS, "acc_a", "acc_b", "diff", "paired", "n_pairs", "p_value", "p_holm", "significant",
    "effect_size", "test_method", "note", "status_a", "status_b", "n_episodes_a", "n_episodes_b",
    "seed_episode_a", "seed_episode_b", "row_id_a", "row_id_b",
)
_INT_KEYS = ("ways", "shots", "replicate")


class CompareError(ValueError):
    """A study or table that cannot be compared (not a study, unreadable, malformed)."""


@dataclass(frozen=True)
class Study:
    """One side of a comparison: its results, per-episode accuracies and episode identities."""

    label: str
    results: pd.DataFrame
    episodes: pd.DataFrame | None = None
    #: (target, ways, shots) -> content hash of the study's episodes file; None where unknown.
    episode_ids: Mapping[EpisodeKey, str | None] = field(default_factory=dict)


# --------------------------------------------------------------------------- reading a study


def resolve_results(path: str | Path) -> Path:
    """The ``results.csv`` of ``path``: a study results directory (``results/<name>``), a results.csv file,
    or a bare study name with results under ``results/<name>``. Raises :class:`CompareError` otherwise."""
    from pruneshot.paths import RESULTS, RESULTS_DIR

    p = Path(path)
    if not p.exists() and len(p.parts) == 1 and (Path(RESULTS_DIR) / p).is_dir():
        p = Path(RESULTS_DIR) / p
    if p.is_dir():
        csv = p / RESULTS["results_csv"]
        if not csv.is_file():
            raise CompareError(f"{path} is not a finished study: no {RESULTS['results_csv']} in it")
        return csv
    if p.is_file():
        return p
    raise CompareError(f"{path} is neither a study results directory (results/<name>) nor a results.csv file")


def episode_identity(study_root: Path, target: str, ways: int, shots: int) -> str | None:
    """Content hash of the study's episodes file of (target, ways, shots); None when the file is missing,
    unreadable, or its recorded hash does not match its content."""
    from pruneshot.data.episodes import content_sha256
    from pruneshot.paths import RESULTS, fill

    path = study_root / fill(RESULTS["episodes"], target=target, ways=ways, shots=shots)
    try:
        payload = json.loads(path.read_text())
        digest = content_sha256(payload)
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    recorded = payload.get("content_sha256")
    return None if recorded is not None and recorded != digest else digest


def load_study(path: str | Path) -> Study:
    """Read the study at ``path`` (see :func:`resolve_results`): results.csv, the episodes.csv beside it
    (None when absent) and the identity of each (target, ways, shots)'s episodes file under the study root
    (``results.csv``'s grandparent). Raises :class:`CompareError` when a table is missing or unreadable."""
    from pruneshot.report.load import load_episodes, load_results

    csv = resolve_results(path)
    try:
        results = load_results(csv)
    except (OSError, ValueError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise CompareError(f"cannot read results table {csv}: {err}") from err
    _check_columns(results, (*KEYS, "row_id", "acc_mean"), str(csv))
    episodes_csv = csv.with_name("episodes.csv")
    episodes = None
    if episodes_csv.is_file():
        try:
            episodes = load_episodes(episodes_csv)
        except (OSError, ValueError, pd.errors.ParserError, UnicodeDecodeError) as err:
            raise CompareError(f"cannot read episodes table {episodes_csv}: {err}") from err
        _check_columns(episodes, ("row_id", "episode", "accuracy"), str(episodes_csv))
    root = csv.resolve().parent.parent
    cells = {(str(t), _int(w), _int(s)) for t, w, s in zip(results["target"], results["ways"], results["shots"],
                                                            strict=True)}
    ids = {k: episode_identity(root, *k) for k in cells if k[1] is not None and k[2] is not None}
    return Study(str(path), results, episodes, ids)


def _check_columns(df: pd.DataFrame, required: Sequence[str], name: str) -> None:
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise CompareError(f"{name} is not a results table of this project: no column(s) {', '.join(missing)}")


# --------------------------------------------------------------------------- comparing


def filter_rows(results: pd.DataFrame, methods: Sequence[str] | None = None,
                arms: Sequence[str] | None = None) -> pd.DataFrame:
    """The rows of ``results`` whose method is in ``methods`` and arm in ``arms`` (None: any)."""
    keep = pd.Series(True, index=results.index)
    if methods:
        keep &= results["method"].astype(str).isin(list(methods))
    if arms:
        keep &= results["arm"].astype(str).isin(list(arms))
    return results[keep]


def compare_results(results_a: pd.DataFrame, results_b: pd.DataFrame,
                    episodes_a: pd.DataFrame | None = None, episodes_b: pd.DataFrame | None = None,
                    episode_ids_a: Mapping[EpisodeKey, str | None] | None = None,
                    episode_ids_b: Mapping[EpisodeKey, str | None] | None = None,
                    *, alpha: float = 0.05) -> pd.DataFrame:
    """Every cell of A and B, matched on :data:`KEYS`, with B - A and, where pairable, a Wilcoxon test.

    ``results_*`` are results.csv tables, ``episodes_*`` episodes.csv tables (``row_id, episode,
    accuracy``; None: no per-episode accuracies), ``episode_ids_*`` map (target, ways, shots) to the
    content hash of that study's episodes file (missing or None: unknown, so never paired). The pairing
    rule is the module's. A paired cell's test is
    ``wilcoxon_signed_rank(acc B, acc A)`` over the episodes in index order; ``p_holm`` is Holm-adjusted
    over all paired cells, ``significant`` is ``p_holm < alpha``.

    Columns (:data:`COLUMNS`): ``present`` ("both", "A only", "B only"), the keys, ``acc_a``, ``acc_b``
    (``acc_mean``, fraction; NaN for a failed or absent row), ``diff`` (acc_b - acc_a, fraction),
    ``paired``, ``n_pairs`` (episodes), ``p_value``, ``p_holm``, ``significant``, ``effect_size``
    (rank-biserial r, positive when B is better), ``test_method``, ``note`` ("paired", or why not),
    the rows' ``status``, ``n_episodes``, ``seed_episode`` and ``row_id``. Sorted by presence, method,
    budget (descending), target, ways, shots, arm and replicate. Raises :class:`CompareError` when a table
    has two rows for one cell.
    """
    a, b = _cells(results_a, "A"), _cells(results_b, "B")
    merged = a.merge(b, on=list(KEYS), how="outer", suffixes=("_a", "_b"), indicator=True)
    eps_a, eps_b = _episode_map(episodes_a), _episode_map(episodes_b)
    ids_a, ids_b = episode_ids_a or {}, episode_ids_b or {}
    records = []
    for row in merged.to_dict("records"):
        rec: dict[str, Any] = {c: row.get(c) for c in COLUMNS if c in row}
        rec.update(present={"both": "both", "left_only": "A only", "right_only": "B only"}[str(row["_merge"])],
                   paired=False, n_pairs=0, p_value=math.nan, effect_size=math.nan, test_method="none")
        rec["acc_a"] = row["acc_mean_a"] if rec["status_a"] == "ok" else math.nan
        rec["acc_b"] = row["acc_mean_b"] if rec["status_b"] == "ok" else math.nan
        rec["diff"] = rec["acc_b"] - rec["acc_a"]
        if rec["present"] != "both":
            rec["note"] = f"only in {rec['present'][0]}"
            records.append(rec)
            continue
        episode_key = (str(row["target"]), int(row["ways"]), int(row["shots"]))
        ids = ids_a.get(episode_key), ids_b.get(episode_key)
        reason, pairs = _pairing(row, ids, eps_a.get(str(row["row_id_a"])), eps_b.get(str(row["row_id_b"])))
        if pairs is None:
            rec["note"] = reason
        else:
            res = wilcoxon_signed_rank(pairs[1], pairs[0])
            rec.update(paired=True, n_pairs=res["n"], p_value=res["p_value"], effect_size=res["effect_size"],
                       test_method=res["method"], note="paired")
        records.append(rec)
    out = pd.DataFrame.from_records(records, columns=list(COLUMNS))
    out["p_holm"] = holm(out["p_value"].astype(float).tolist()) if len(out) else []
    out["significant"] = (out["p_holm"] < alpha).fillna(False).astype(bool)
    order = {"both": 0, "A only": 1, "B only": 2}
    out = out.assign(_p=out["present"].map(order), _b=-out["requested_budget"].astype(float))
    out = out.sort_values(["_p", "method", "_b", "target", "ways", "shots", "arm", "replicate"], kind="mergesort")
    return out.drop(columns=["_p", "_b"]).reset_index(drop=True)


def _int(value: Any) -> int | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return int(v) if math.isfinite(v) and v == int(v) else None


def _cells(results: pd.DataFrame, side: str) -> pd.DataFrame:
    """One row per cell of ``results``: normalised keys, status, acc_mean, n_episodes, seed_episode, row_id."""
    _check_columns(results, (*KEYS, "row_id", "acc_mean"), f"results table {side}")
    df = pd.DataFrame({
        "method": results["method"].astype(str),
        "requested_budget": results["requested_budget"].map(budget_value),
        "target": results["target"].astype(str),
        "arm": results["arm"].astype(str),
        **{c: results[c].map(_int) for c in _INT_KEYS},
        "status": results["status"].fillna("").astype(str) if "status" in results.columns else "ok",
        "acc_mean": pd.to_numeric(results["acc_mean"], errors="coerce"),
        "n_episodes": results["n_episodes"].map(_int) if "n_episodes" in results.columns else None,
        "seed_episode": results["seed_episode"].map(_int) if "seed_episode" in results.columns else None,
        "row_id": results["row_id"].astype(str),
    })
    bad = df[df[list(_INT_KEYS)].isna().any(axis=1) | df["requested_budget"].isna()]
    if not bad.empty:
        raise CompareError(f"results table {side}: row {bad['row_id'].iloc[0]} has a non-numeric budget, ways, "
                           "shots or replicate")
    dup = df[df.duplicated(list(KEYS), keep=False)]
    if not dup.empty:
        raise CompareError(f"results table {side} has {len(dup)} rows for {dup[list(KEYS)].drop_duplicates().shape[0]}"
                           f" cell(s) (rows {', '.join(dup['row_id'].head(4))}): one row per cell is needed")
    for c in _INT_KEYS:
        df[c] = df[c].astype(int)
    return df


def _episode_map(episodes: pd.DataFrame | None) -> dict[str, dict[int, float]]:
    """row_id -> {episode index -> accuracy (fraction)}."""
    out: dict[str, dict[int, float]] = {}
    if episodes is None:
        return out
    for rid, ep, acc in zip(episodes["row_id"].astype(str), episodes["episode"], episodes["accuracy"], strict=True):
        out.setdefault(rid, {})[int(ep)] = float(acc)
    return out


def _pairing(row: Mapping[str, Any], ids: tuple[str | None, str | None], eps_a: dict[int, float] | None,
             eps_b: dict[int, float] | None) -> tuple[str, tuple[list[float], list[float]] | None]:
    """Why the matched cell ``row`` is not paired, or ("paired", (accuracies A, accuracies B))."""
    failed = [s for s in ("A", "B") if row[f"status_{s.lower()}"] != "ok"]
    if failed:
        return f"failed in {' and '.join(failed)}", None
    for col, what in (("seed_episode", "seed_episode"), ("n_episodes", "n_episodes")):
        va, vb = row[f"{col}_a"], row[f"{col}_b"]
        if _missing(va) or _missing(vb):
            return f"unpaired: {what} unknown", None
        if int(va) != int(vb):
            return f"unpaired: {what} differs ({int(va)} vs {int(vb)})", None
    unknown = [s for s, i in zip(("A", "B"), ids, strict=True) if i is None]
    if unknown:
        return f"unpaired: episodes file of {' and '.join(unknown)} unknown", None
    if ids[0] != ids[1]:
        return "unpaired: episodes files differ", None
    missing = [s for s, e in zip(("A", "B"), (eps_a, eps_b), strict=True) if not e]
    if missing or eps_a is None or eps_b is None:
        return f"unpaired: no per-episode accuracies in {' and '.join(missing)}", None
    expected = set(range(int(row["n_episodes_a"])))
    if set(eps_a) != expected or set(eps_b) != expected:
        return "unpaired: episode indices differ", None
    order = sorted(expected)
    return "paired", ([eps_a[e] for e in order], [eps_b[e] for e in order])


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


# --------------------------------------------------------------------------- text


def format_comparison(table: pd.DataFrame, label_a: str, label_b: str, *, max_listed: int = 10) -> str:
    """The comparison as text: a header, the matched cells (accuracies in %, B − A in pp, p and Holm p of
    paired cells, the pairing note) and a brief list of the cells only in A or only in B."""
    both = table[table["present"] == "both"]
    n_paired = int(both["paired"].sum())
    lines = [f"A: {label_a}", f"B: {label_b}",
             f"{len(both)} matched cell(s): {n_paired} paired (two-sided Wilcoxon signed-rank of B vs A on the "
             f"shared episodes, Holm over {n_paired}), {len(both) - n_paired} not paired (difference only)"]
    if not both.empty:
        cols = ["method", "budget", "target", "shots", "arm"]
        view = pd.DataFrame({"method": both["method"], "budget": both["requested_budget"].map(fmt_budget),
                             "target": both["target"], "ways": both["ways"], "shots": both["shots"],
                             "arm": both["arm"], "rep": both["replicate"]})
        for col, after in (("ways", "target"), ("rep", "arm")):
            if view[col].nunique() > 1:
                cols.insert(cols.index(after) + 1, col)
        view = view[cols].assign(**{
            "acc A (%)": both["acc_a"].map(lambda v: _pct(v, "")),
            "acc B (%)": both["acc_b"].map(lambda v: _pct(v, "")),
            "B − A (pp)": both["diff"].map(lambda v: _pct(v, "+")),
            "p": both["p_value"].map(fmt_p), "p Holm": both["p_holm"].map(fmt_p),
            "note": both["note"],
        })
        lines.append(view.to_string(index=False))
    for present in ("A only", "B only"):
        only = table[table["present"] == present]
        if only.empty:
            continue
        lines.append(f"{len(only)} cell(s) only in {present[0]}:")
        for r in only.head(max_listed).itertuples():
            lines.append(f"  {r.method} b{fmt_budget(r.requested_budget)} {r.target} {r.ways}-way {r.shots}-shot "
                         f"{r.arm} r{r.replicate}")
        if len(only) > max_listed:
            lines.append(f"  ... and {len(only) - max_listed} more")
    return "\n".join(lines)


def _pct(value: Any, sign: str) -> str:
    v = float(value) if value is not None else math.nan
    return MISSING if not np.isfinite(v) else format(round(100 * v, 1) + 0.0, f"{sign}.1f")  # no "-0.0"
