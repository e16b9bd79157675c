"""Self-contained HTML report comparing pruning methods on few-shot transfer.

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

Determinism: everything derived from the CSVs (tables, captions) is byte-identical for the
same CSVs; PNGs are written without a ``Software`` tag or timestamps. Only ``generated_utc``
from the provenance dict changes between runs. The tables sit between the HTML comments
``<!-- tables:begin -->`` and ``<!-- tables:end -->``.
"""

from __future__ import annotations

import base64
import datetime
import html
import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pruneshot.io import atomic_path
from pruneshot.report import stats

FIGURE_DPI = 110
#: Figures always written (a figure without data says so in its panel).
FIGURE_NAMES = (
    "acc_vs_params", "acc_vs_flops", "acc_vs_latency", "acc_vs_shots", "budget_achieved", "search_cost",
    "reinit_gap",
)
#: Written only when some row has a CUDA latency.
CUDA_FIGURE = "acc_vs_latency_cuda"
REFERENCE_METHODS = ("dense", "linear_probe")
ALWAYS_SHOWN = ("dense", "random")
BASELINES = ("dense", "random")
ALPHA = 0.05
TABLES_BEGIN = "<!-- tables:begin -->"
TABLES_END = "<!-- tables:end -->"
MISSING = "—"
NONE_RECORDED = "<p>none recorded</p>"
UP, DOWN = "▲", "▼"
#: results.csv columns whose distinct values must agree unless mixing is allowed.
MIXED_KEYS = (("git_commit", "code commits"), ("config_sha256", "config hashes"))

# Columns that identify one evaluated configuration, apart from the replicate.
_KEY_COLUMNS = (
    "method", "side", "backbone", "source", "target", "ways", "shots", "arm", "budget_metric",
    "requested_budget",
)
# Columns averaged over replicates for plotting (plus every latency column present).
_MEAN_COLUMNS = (
    "acc_mean", "acc_ci95", "achieved_params", "achieved_flops", "dense_params", "dense_flops", "params_ratio",
    "flops_ratio", "n_episodes",
)
# Columns read as text whatever they look like (a hex id such as "1e5" must not become a float).
_TEXT_COLUMNS = (
    "row_id", "method", "method_source", "side", "backbone", "source", "target", "arm",
    "budget_metric", "latency_device", "latency_dtype", "latency_cuda_device", "search_device", "git_commit",
    "config_sha256", "data_sha256", "checkpoint_sha256", "mlflow_run_id", "status", "error", "search_scope",
    "pretrain_device", "transfer_device",
)
# mkstemp (behind atomic_path) creates 0600 files; reports are meant to be shared and served.
_FILE_MODE = 0o644
_LATENCY_RE = re.compile(r"^latency_ms_b(\d+)$")
_CUDA_LATENCY_RE = re.compile(r"^latency_cuda_ms_b(\d+)$")
_DEVICE_RE = re.compile(r"^(?:[a-z_]+_)?device$")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")
_LINESTYLES = ("-", "--", ":", "-.")


class MixedResultsError(ValueError):
    """results.csv holds rows from more than one code commit or config hash."""


# --------------------------------------------------------------------------- data helpers


def load_results(results_csv: Path | str) -> pd.DataFrame:
    """Read ``results.csv`` with identifier/hash/error columns kept as text (empty -> "")."""
    header = pd.read_csv(results_csv, nrows=0).columns
    dtypes = {c: str for c in header if c in _TEXT_COLUMNS or _DEVICE_RE.match(str(c))}
    df = pd.read_csv(results_csv, dtype=dtypes)
    for col in dtypes:
        df[col] = df[col].fillna("").astype(object)
    return df


def load_episodes(episodes_csv: Path | str) -> pd.DataFrame:
    """Read ``episodes.csv`` (``row_id, episode, accuracy``) with ``row_id`` as text."""
    df = pd.read_csv(episodes_csv, dtype={"row_id": str})
    df["row_id"] = df["row_id"].fillna("").astype(object)
    return df


def latency_columns(results: pd.DataFrame, pattern: re.Pattern[str] = _LATENCY_RE) -> list[str]:
    """The ``latency_ms_b{N}`` (CPU) columns, or those matching ``pattern`` (e.g. the CUDA ones,
    ``latency_cuda_ms_b{N}``), ordered by batch size N."""
    found = [(int(m.group(1)), c) for c in results.columns if (m := pattern.match(str(c)))]
    return [c for _, c in sorted(found)]


def _timed(results: pd.DataFrame, pattern: re.Pattern[str]) -> list[str]:
    """Latency columns matching ``pattern`` that hold at least one number."""
    return [c for c in latency_columns(results, pattern) if pd.to_numeric(results[c], errors="coerce").notna().any()]


def method_order(methods: Iterable[str]) -> list[str]:
    """dense first, then linear_probe, then every other method by name."""
    unique = sorted({str(m) for m in methods})
    first = [m for m in REFERENCE_METHODS if m in unique]
    return first + [m for m in unique if m not in REFERENCE_METHODS]


def _prepared(results: pd.DataFrame) -> pd.DataFrame:
    """A copy with defaults for optional columns and a boolean ``_ok`` column."""
    df = results.copy()
    if "status" not in df.columns:
        df["status"] = "ok"
    if "error" not in df.columns:
        df["error"] = ""
    for col in _TEXT_COLUMNS:
        if col in df.columns:
            df[col] = df[col].fillna("").astype(str).astype(object)
    acc = pd.to_numeric(df.get("acc_mean"), errors="coerce")
    df["_ok"] = (df["status"] == "ok") & np.isfinite(acc.to_numpy(dtype=float))
    return df


def _sort_rank(df: pd.DataFrame) -> pd.Series:
    order = {m: i for i, m in enumerate(method_order(df["method"]))}
    return df["method"].map(order)


def _sorted(df: pd.DataFrame, extra: Sequence[str] = ()) -> pd.DataFrame:
    """Sort by method order, descending budget, then the ``extra`` columns ascending."""
    out = df.assign(_rank=_sort_rank(df), _budget=-pd.to_numeric(df["requested_budget"], errors="coerce"))
    by = ["_rank", "_budget", *[c for c in extra if c in out.columns]]
    return out.sort_values(by, kind="mergesort").drop(columns=["_rank", "_budget"]).reset_index(drop=True)


def _aggregate_ok(results: pd.DataFrame) -> pd.DataFrame:
    """Successful rows averaged over replicates (one row per configuration); NaN costs stay NaN."""
    df = _prepared(results)
    df = df[df["_ok"]]
    keys = [c for c in _KEY_COLUMNS if c in df.columns]
    means = [c for c in (*_MEAN_COLUMNS, *latency_columns(df), *latency_columns(df, _CUDA_LATENCY_RE))
             if c in df.columns]
    if df.empty:
        return pd.DataFrame(columns=[*keys, *means, "n_replicates"])
    for c in means:
        df[c] = pd.to_numeric(df[c], errors="coerce")
    grouped = df.groupby(keys, dropna=False, sort=True)
    out = grouped[means].mean()
    out["n_replicates"] = grouped.size()
    return out.reset_index()


def _varying(df: pd.DataFrame, col: str) -> bool:
    return col in df.columns and df[col].nunique(dropna=False) > 1


def _finite(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _fmt_budget(value: Any) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    return MISSING if math.isnan(v) else f"{v:.3g}"


def _fmt_num(value: Any, spec: str) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return MISSING if value is None or value == "" else str(value)
    return MISSING if math.isnan(v) else format(v, spec)


def _fmt_acc(mean: float, ci: float) -> str:
    """Format fractions as percent text: 0.834, 0.012 -> "83.4 ± 1.2"."""
    ci_txt = MISSING if ci is None or not math.isfinite(ci) else f"{100 * ci:.1f}"
    return f"{100 * mean:.1f} ± {ci_txt}"


def _fmt_p(p: Any) -> str:
    v = _finite(p)
    if v is None:
        return MISSING
    return "<0.0001" if v < 1e-4 else f"{v:.4f}" if v < 0.01 else f"{v:.3f}"


def _budget_key(value: Any) -> float:
    v = _finite(value)
    return round(v, 9) if v is not None else math.nan


def _shots_key(value: Any) -> int | None:
    v = _finite(value)
    return int(v) if v is not None else None


# --------------------------------------------------------------------------- mixed results, provenance


def mixed_values(results: pd.DataFrame) -> dict[str, dict[str, int]]:
    """``{column: {value: rows}}`` for the :data:`MIXED_KEYS` columns with more than one value."""
    out: dict[str, dict[str, int]] = {}
    for col, _ in MIXED_KEYS:
        if col not in results.columns:
            continue
        values = results[col].fillna("").astype(str)
        counts = values[values != ""].value_counts()
        if len(counts) > 1:
            out[col] = {str(k): int(counts[k]) for k in sorted(counts.index)}
    return out


def check_mixed(results: pd.DataFrame, allow_mixed: bool = False) -> dict[str, dict[str, int]]:
    """Raise :class:`MixedResultsError` naming the distinct commits/config hashes in ``results``
    unless ``allow_mixed``; return them (empty when the results agree)."""
    mixed = mixed_values(results)
    if mixed and not allow_mixed:
        parts = []
        for col, label in MIXED_KEYS:
            if col in mixed:
                listed = ", ".join(f"{v} ({n} rows)" for v, n in mixed[col].items())
                parts.append(f"{len(mixed[col])} {label} in column {col}: {listed}")
        raise MixedResultsError(
            "refusing to build a report from results of different runs: results.csv holds "
            + "; ".join(parts)
            + ". Rerun the stale jobs so every row comes from one commit and config (e.g. snakemake "
            "--forcerun transfer), or allow mixing explicitly: set `report: {allow_mixed: true}` in the config, "
            "or run `pruneshot report --allow-mixed`; the report then lists the mixed values in a warning.")
    return mixed


def _manifest_hashes(manifests: dict[str, Path]) -> dict[str, str]:
    """``{"<name>/<split>": sha256}`` from prepared-data manifests (missing files are skipped)."""
    from pruneshot.io import read_json

    out: dict[str, str] = {}
    for name, path in manifests.items():
        if not Path(path).is_file():
            continue
        for split, info in (read_json(path).get("splits") or {}).items():
            if isinstance(info, dict) and info.get("sha256"):
                out[f"{name}/{split}"] = str(info["sha256"])
    return out


def _device_columns(results: pd.DataFrame) -> dict[str, list[str]]:
    """Every ``*_device`` column of results.csv with its distinct non-empty values."""
    out = {}
    for col in results.columns:
        if _DEVICE_RE.match(str(col)):
            values = sorted({str(v) for v in results[col].dropna().astype(str) if v and v != "nan"})
            if values:
                out[str(col)] = values
    return out


def collect_provenance(
    results: pd.DataFrame, *, study: str | None = None, config_sha256: str | None = None,
    study_json: Path | None = None, sync_json: Path | None = None, manifests: dict[str, Path] | None = None,
    git: tuple[str, bool] | None = None,
) -> dict[str, Any]:
    """The provenance dict :func:`render_html` shows: the report's own git state and config hash,
    dataset hashes (from the manifests), package versions, devices (from results.csv's ``*_device``
    columns), the MLflow experiment and parent run (``study_json``, results/mlflow/study.json), the
    replay status (``sync_json``) and the generation time. Missing files are skipped."""
    from pruneshot.io import read_json
    from pruneshot.runtime.provenance import git_state, package_versions

    commit, dirty = git if git is not None else git_state()
    mlflow = read_json(study_json) if study_json is not None and Path(study_json).is_file() else {}
    sync = read_json(sync_json) if sync_json is not None and Path(sync_json).is_file() else {}
    devices = _device_columns(results)
    return {
        "study": study or mlflow.get("experiment_name"),
        "git_commit": commit, "git_dirty": dirty, "config_sha256": config_sha256,
        "result_commits": sorted({str(v) for v in results.get("git_commit", pd.Series(dtype=str)).astype(str)}),
        "data_sha256": _manifest_hashes(manifests or {}),
        "packages": package_versions(),
        "devices": sorted({d for values in devices.values() for d in values}),
        "device_columns": devices,
        "mlflow": mlflow, "mlflow_sync": sync.get("spool", {}),
        "generated_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
    }


def landing_page(workflow_rst: Path, config: dict[str, Any], repo: Path,
                 out: Path = Path(".snakemake/pruneshot/workflow.rst")) -> str:
    """The landing page of Snakemake's native report: ``workflow_rst`` plus the study name, the git
    commit (and dirty flag) of ``repo`` and the config hash, written to ``out`` (rewritten only
    when it changes, atomically). Returns the absolute path for the Snakefile's ``report:``."""
    from pruneshot.config import config_hash
    from pruneshot.runtime.provenance import git_state

    commit, dirty = git_state(repo)
    text = Path(workflow_rst).read_text(encoding="utf-8").rstrip("\n") + (
        "\n\nThis report\n-----------\n\n"
        f"- study: ``{config['study']['name']}``\n"
        f"- git commit: ``{commit}``{' (uncommitted changes)' if dirty else ''}\n"
        f"- config sha256: ``{config_hash(config)}``\n"
        "- every result row records the git commit and config hash of the job that produced it\n"
        "  (results.csv); results/report/index.html refuses results that mix them unless\n"
        "  ``report.allow_mixed`` is set.\n"
    )
    path = Path(out).resolve()
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    return str(path)


# --------------------------------------------------------------------------- statistics


@dataclass
class Statistics:
    """The :mod:`pruneshot.report.stats` tables behind the report's marks and ranks."""

    comparisons: pd.DataFrame  #: stats.paired_comparisons (empty without episodes)
    ranks: pd.DataFrame  #: stats.rank_table
    average_ranks: pd.DataFrame  #: stats.average_ranks
    spread: pd.DataFrame  #: stats.replicate_spread
    have_episodes: bool


def compute_statistics(results: pd.DataFrame, episodes: pd.DataFrame | None) -> Statistics:
    """Paired tests (when ``episodes`` is given), Meta-Dataset ranks and replicate spread."""
    df = _prepared(results)
    ok = df[df["_ok"]].drop(columns=["_ok"])
    if episodes is not None and not ok.empty:
        comparisons = stats.paired_comparisons(ok, episodes, baselines=BASELINES, alpha=ALPHA)
    else:
        comparisons = pd.DataFrame(columns=["method", "requested_budget", "target", "shots", "arm", "replicate",
                                            "baseline", "n", "mean_diff", "effect_size", "statistic", "p_value",
                                            "p_holm", "significant", "test_method", "row_id", "baseline_row_id"])
    ranks = stats.rank_table(ok)
    return Statistics(comparisons=comparisons, ranks=ranks, average_ranks=stats.average_ranks(ranks),
                      spread=stats.replicate_spread(ok), have_episodes=episodes is not None)


# --------------------------------------------------------------------------- tables


def summary_table(results: pd.DataFrame) -> pd.DataFrame:
    """Accuracy as "mean ± CI" in %, one row per (method, requested_budget, target, arm).

    Columns: ``method``, ``requested_budget``, ``target``, ``arm`` (plus ``side`` /
    ``budget_metric`` only when they vary within such a row), then one text column per
    shots value named ``"{shots}-shot"`` in increasing order. Replicates are averaged
    (mean of ``acc_mean`` and of ``acc_ci95``); a cell where every run failed reads
    ``"failed"``, one where only some failed gets a ``" (k/n failed)"`` suffix, and a
    combination never run reads ``"—"``. Rows: dense, linear_probe, then other methods by
    name, each by descending budget.
    """
    df = _prepared(results)
    keys = [c for c in ("method", "requested_budget", "target", "arm") if c in df.columns]
    for extra in ("side", "budget_metric"):
        if extra in df.columns and (df.groupby(keys, dropna=False)[extra].nunique(dropna=False) > 1).any():
            keys.append(extra)
    shots_values = sorted(pd.to_numeric(df["shots"], errors="coerce").dropna().astype(int).unique())
    shot_cols = [f"{s}-shot" for s in shots_values]
    if df.empty:
        return pd.DataFrame(columns=[*keys, *shot_cols])

    df["shots"] = pd.to_numeric(df["shots"], errors="coerce")
    df["acc_mean"] = pd.to_numeric(df["acc_mean"], errors="coerce")
    df["acc_ci95"] = pd.to_numeric(df.get("acc_ci95"), errors="coerce")
    records = []
    for key, group in df.groupby(keys, dropna=False, sort=False):
        record = dict(zip(keys, key, strict=True))
        for s, col in zip(shots_values, shot_cols, strict=True):
            cell = group[group["shots"] == s]
            ok = cell[cell["_ok"]]
            n_bad = len(cell) - len(ok)
            if cell.empty:
                record[col] = MISSING
            elif ok.empty:
                record[col] = "failed"
            else:
                text = _fmt_acc(float(ok["acc_mean"].mean()), float(ok["acc_ci95"].mean()))
                record[col] = text + (f" ({n_bad}/{len(cell)} failed)" if n_bad else "")
        records.append(record)
    table = pd.DataFrame.from_records(records, columns=[*keys, *shot_cols])
    return _sorted(table, extra=[k for k in keys if k not in ("method", "requested_budget")])


def _cell_groups(df: pd.DataFrame) -> list[str]:
    """Columns that identify a cell (method, budget, target, shots, arm; ways when it varies)."""
    keys = [c for c in ("target", "shots", "arm", "method", "requested_budget") if c in df.columns]
    return keys + (["ways"] if _varying(df, "ways") else [])


def _marks(comps: pd.DataFrame) -> str:
    """"+1.2 pp ▲" style text for one cell's comparisons with one baseline (one mark per replicate)."""
    if comps.empty:
        return MISSING
    diffs = [v for v in (_finite(d) for d in comps["mean_diff"]) if v is not None]
    if not diffs:
        return "no shared episodes"
    marks = []
    for sig, d in zip(comps["significant"], comps["mean_diff"], strict=True):
        v = _finite(d)
        marks.append("n.s." if not bool(sig) or v is None else (UP if v > 0 else DOWN))
    if len(marks) > 1:  # one symbol per replicate, · for not significant
        mark_txt = "n.s." if set(marks) == {"n.s."} else "".join(m if m != "n.s." else "·" for m in marks)
    else:
        mark_txt = marks[0]
    return f"{100 * float(np.mean(diffs)):+.1f} pp {mark_txt}"


def _rank_text(entries: list[tuple[float, float, int]]) -> str:
    """``[(cell budget, rank, methods in cell)]`` -> "2 / 9" or "1 / 9 at 0.5, 3 / 9 at 0.25"."""
    entries = [e for e in entries if _finite(e[1]) is not None]
    if not entries:
        return MISSING
    entries.sort(key=lambda e: -e[0])
    if len(entries) == 1:
        return f"{entries[0][1]:g} / {entries[0][2]}"
    return ", ".join(f"{r:g} / {k} at {_fmt_budget(b)}" for b, r, k in entries)


def results_table(results: pd.DataFrame, statistics: Statistics | None = None,
                  episodes: pd.DataFrame | None = None) -> pd.DataFrame:
    """The main table as display text: one row per cell (target, shots, arm, method, budget).

    Columns: ``target``, ``shots``, ``arm``, ``method``, ``budget`` (requested), ``achieved`` (ratio
    on the budget metric), ``accuracy %`` ("mean ± CI (n=episodes)", replicates averaged; "failed"
    when no replicate produced an accuracy, a "k/m failed" note when some did not), ``replicates %``
    ("mean of per-replicate means ± their std (replicates)"; only when some cell has more than one),
    ``vs dense`` and ``vs random`` (mean paired difference in pp and a mark per replicate: ▲/▼
    significantly better/worse after Holm, n.s. or · not significant, — no comparison), ``rank``
    (Meta-Dataset rank / methods in the cell; budget-free methods are ranked in every budget's cell)
    and ``row_id`` (the results.csv rows of the cell). Sorted by target, shots, arm, descending
    budget, then method order; failed cells are kept.
    """
    df = _prepared(results)
    st = statistics if statistics is not None else compute_statistics(results, episodes)
    cols = ["target", "shots", "arm", "method", "budget", "achieved", "accuracy %", "replicates %", "vs dense",
            "vs random", "rank", "row_id"]
    if df.empty:
        return pd.DataFrame(columns=cols)
    keys = _cell_groups(df)
    df["_b"] = df["requested_budget"].map(_budget_key)
    df["_s"] = df["shots"].map(_shots_key)
    comps = st.comparisons.assign(
        _b=st.comparisons["requested_budget"].map(_budget_key), _s=st.comparisons["shots"].map(_shots_key),
        target=st.comparisons["target"].astype(str), arm=st.comparisons["arm"].astype(str),
        method=st.comparisons["method"].astype(str))
    comp_index = {k: g for k, g in comps.groupby(["method", "_b", "target", "_s", "arm"], sort=False)}
    ranks = st.ranks.assign(kcb=st.ranks["requested_budget"].map(_budget_key),
                            kmb=st.ranks["method_budget"].map(_budget_key), ks=st.ranks["shots"].map(_shots_key))
    cell_sizes = ranks.groupby(["target", "ks", "arm", "kcb"])["method"].transform("size") if not ranks.empty \
        else pd.Series(dtype=int)
    rank_index: dict[tuple, list[tuple[float, float, int]]] = {}
    for r, size in zip(ranks.itertuples(), cell_sizes, strict=True):
        rank_index.setdefault((str(r.method), r.kmb, str(r.target), r.ks, str(r.arm)), []).append(
            (r.kcb, float(r.rank), int(size)))
    spread = st.spread.assign(kb=st.spread["requested_budget"].map(_budget_key),
                              ks=st.spread["shots"].map(_shots_key))
    spread_index = {(str(r.method), r.kb, str(r.target), r.ks, str(r.arm)): r for r in spread.itertuples()}
    multi_rep = bool((spread["n_replicates"] > 1).any()) if not spread.empty else False

    records = []
    group_keys = [k if k not in ("requested_budget", "shots") else {"requested_budget": "_b", "shots": "_s"}[k]
                  for k in keys]
    for _, cell in df.groupby(group_keys, dropna=False, sort=False):
        first = cell.iloc[0]
        key = (str(first["method"]), first["_b"], str(first["target"]), first["_s"], str(first["arm"]))
        ok = cell[cell["_ok"]]
        n_bad = len(cell) - len(ok)
        if ok.empty:
            acc = "failed"
        else:
            mean = float(pd.to_numeric(ok["acc_mean"]).mean())
            ci = float(pd.to_numeric(ok["acc_ci95"], errors="coerce").mean())
            n_ep = pd.to_numeric(ok.get("n_episodes"), errors="coerce").dropna()
            n_txt = f"n={round(n_ep.mean())}" if not n_ep.empty else "n=?"
            acc = f"{_fmt_acc(mean, ci)} ({n_txt}" + (f"; {n_bad}/{len(cell)} failed)" if n_bad else ")")
        metric = str(first.get("budget_metric", "params")) or "params"
        ratios = pd.to_numeric(cell.get(f"{metric}_ratio"), errors="coerce").dropna() \
            if f"{metric}_ratio" in cell.columns else pd.Series(dtype=float)
        if ratios.empty:
            achieved = MISSING
        else:
            lo, hi = float(ratios.min()), float(ratios.max())
            achieved = f"{lo:.3f}" if hi - lo < 5e-4 else f"{lo:.3f}–{hi:.3f}"
        sp = spread_index.get(key)
        rep_txt = MISSING
        if sp is not None and int(sp.n_replicates) == 1:
            rep_txt = f"{100 * float(sp.acc_mean):.1f} (1)"
        if sp is not None and int(sp.n_replicates) > 1:
            rep_txt = f"{100 * float(sp.acc_mean):.1f} ± {_fmt_num(100 * float(sp.acc_std_replicates), '.1f')} " \
                      f"({int(sp.n_replicates)})"
        cell_comps = comp_index.get(key, pd.DataFrame(columns=comps.columns))
        vs = {}
        for base in BASELINES:
            if str(first["method"]) == base:
                vs[base] = "baseline"
            elif not st.have_episodes:
                vs[base] = "no episodes"
            else:
                vs[base] = _marks(cell_comps[cell_comps["baseline"] == base])
        records.append({
            "target": str(first["target"]), "shots": _fmt_num(first["shots"], ".0f"), "arm": str(first["arm"]),
            "method": str(first["method"]), "budget": _fmt_budget(first["requested_budget"]),
            "achieved": achieved, "accuracy %": acc, "replicates %": rep_txt, "vs dense": vs["dense"],
            "vs random": vs["random"], "rank": _rank_text(rank_index.get(key, [])),
            "row_id": " ".join(sorted(cell["row_id"].astype(str))) if "row_id" in cell.columns else MISSING,
            "_s": first["_s"] if first["_s"] is not None else -1, "_b": first["_b"],
            "_m": str(first["method"]),
        })
    out = pd.DataFrame.from_records(records)
    order = {m: i for i, m in enumerate(method_order(out["_m"]))}
    out = out.assign(_mo=out["_m"].map(order), _nb=-out["_b"].astype(float))
    out = out.sort_values(["target", "_s", "arm", "_nb", "_mo"], kind="mergesort").reset_index(drop=True)
    if not multi_rep:
        cols.remove("replicates %")
    return out[cols]


def comparisons_table(statistics: Statistics) -> pd.DataFrame:
    """Every paired comparison as display text (differences and effect sizes: method − baseline)."""
    c = statistics.comparisons
    cols = ["row_id", "method", "budget", "target", "shots", "arm", "replicate", "baseline", "baseline row_id",
            "n", "Δ mean (pp)", "effect size r", "W", "p", "p (Holm)", "significant", "test"]
    if c.empty:
        return pd.DataFrame(columns=cols)
    out = pd.DataFrame({
        "row_id": c["row_id"].astype(str), "method": c["method"].astype(str),
        "budget": c["requested_budget"].map(_fmt_budget), "target": c["target"].astype(str),
        "shots": c["shots"].map(lambda v: _fmt_num(v, ".0f")), "arm": c["arm"].astype(str),
        "replicate": c["replicate"].map(lambda v: _fmt_num(v, ".0f")), "baseline": c["baseline"].astype(str),
        "baseline row_id": c["baseline_row_id"].astype(str), "n": c["n"].map(lambda v: _fmt_num(v, ".0f")),
        "Δ mean (pp)": c["mean_diff"].map(lambda v: _fmt_num(100 * v if _finite(v) is not None else v, "+.1f")),
        "effect size r": c["effect_size"].map(lambda v: _fmt_num(v, "+.2f")),
        "W": c["statistic"].map(lambda v: _fmt_num(v, "g")),
        "p": c["p_value"].map(_fmt_p), "p (Holm)": c["p_holm"].map(_fmt_p),
        "significant": [
            (f"yes {UP}" if (_finite(d) or 0) > 0 else f"yes {DOWN}") if bool(s) else "no"
            for s, d in zip(c["significant"], c["mean_diff"], strict=True)
        ],
        "test": c["test_method"].astype(str),
    })
    return out[cols]


def average_rank_table(statistics: Statistics) -> pd.DataFrame:
    """Mean Meta-Dataset rank per method over the cells it is ranked in, best first."""
    a = statistics.average_ranks
    if a.empty:
        return pd.DataFrame(columns=["method", "mean rank", "cells"])
    return pd.DataFrame({"method": a["method"].astype(str), "mean rank": a["mean_rank"].map(lambda v: f"{v:.2f}"),
                         "cells": a["n_cells"].astype(int).astype(str)})


def detail_table(results: pd.DataFrame) -> pd.DataFrame:
    """Per-row cost detail as display text: budget requested vs achieved ratios, latency, search time.

    One row per results row (failed ones included), sorted like :func:`summary_table`
    then by shots and replicate.
    """
    df = _prepared(results)
    lat = latency_columns(df)
    context = [c for c in ("side", "target", "arm", "shots", "replicate", "budget_metric") if c in df.columns]
    if "side" in context and not _varying(df, "side"):
        context.remove("side")
    df = _sorted(df, extra=[c for c in ("target", "arm", "side", "shots", "replicate") if c in df.columns])
    out = pd.DataFrame({"row_id": df["row_id"].astype(str) if "row_id" in df.columns else "",
                        "method": df["method"]})
    for c in context:
        if c in ("shots", "replicate"):
            out[c] = df[c].map(lambda v: _fmt_num(v, ".0f"))
        else:
            out[c] = df[c].astype(str)
    out["requested"] = df["requested_budget"].map(_fmt_budget)
    out["params ratio"] = df.get("params_ratio", pd.Series(np.nan, index=df.index)).map(
        lambda v: _fmt_num(v, ".3f")
    )
    out["flops ratio"] = df.get("flops_ratio", pd.Series(np.nan, index=df.index)).map(
        lambda v: _fmt_num(v, ".3f")
    )
    if "budget_gap" in df.columns:
        out["gap"] = df["budget_gap"].map(lambda v: _fmt_num(v, "+.3f"))
    for c in lat:
        batch = _LATENCY_RE.match(c).group(1)  # type: ignore[union-attr]
        out[f"latency ms (b={batch})"] = df[c].map(lambda v: _fmt_num(v, ".3f"))
    if "latency_device" in df.columns:
        out["latency device"] = df["latency_device"].astype(str)
    # CUDA timings only where some row has them (a CPU-only run leaves these columns empty)
    cuda_lat = _timed(df, _CUDA_LATENCY_RE)
    for c in cuda_lat:
        batch = _CUDA_LATENCY_RE.match(c).group(1)  # type: ignore[union-attr]
        out[f"cuda latency ms (b={batch})"] = df[c].map(lambda v: _fmt_num(v, ".3f"))
    if cuda_lat and "latency_cuda_device" in df.columns:
        out["cuda device"] = df["latency_cuda_device"].astype(str)
    if "search_seconds" in df.columns:
        out["search s"] = df["search_seconds"].map(lambda v: _fmt_num(v, ".2f"))
    if "search_scope" in df.columns:
        out["search scope"] = df["search_scope"].astype(str)
    out["acc %"] = [
        _fmt_num(100 * float(a), ".1f") if ok else "failed"
        for a, ok in zip(pd.to_numeric(df["acc_mean"], errors="coerce"), df["_ok"], strict=True)
    ]
    out["status"] = df["status"].astype(str)
    return out


def methods_table(results: pd.DataFrame) -> pd.DataFrame:
    """One row per method: its side, where the algorithm comes from and, for target-side methods,
    that the search runs per episode. Reconstructions are named as such."""
    df = _prepared(results)
    cols = ["method", "side", "source", "search"]
    if df.empty:
        return pd.DataFrame(columns=cols)
    rows = []
    for method in method_order(df["method"]):
        sub = df[df["method"] == method]
        side = ", ".join(sorted(set(sub["side"].astype(str)))) if "side" in sub.columns else MISSING
        source = ", ".join(sorted(set(sub["method_source"].astype(str)))) if "method_source" in sub.columns \
            else MISSING
        scope = ", ".join(sorted(set(sub["search_scope"].astype(str)))) if "search_scope" in sub.columns \
            else MISSING
        search = {"once": "once on the source data", "per episode": "per episode, on its support set"}.get(
            scope, scope)
        rows.append({"method": method, "side": side or MISSING, "source": source or MISSING, "search": search})
    return pd.DataFrame(rows, columns=cols)


def reinit_gap_data(results: pd.DataFrame, episodes: pd.DataFrame | None = None) -> pd.DataFrame:
    """finetune minus reinit accuracy (fractions) for every (method, budget, target, shots) run under both.

    With ``episodes``, the gap is paired: per episode the finetune minus reinit accuracy (averaged
    over replicates, whose episodes are shared), its mean and 95% CI 1.96 * std / sqrt(n) (sample
    std, ``paired`` True). Without, or when a row has no episodes, it is the difference of the
    replicate-averaged means with the unpaired sqrt(ci_f^2 + ci_r^2) half-width (``paired`` False).
    Columns: method, requested_budget, target, shots, finetune, finetune_ci, reinit, reinit_ci, gap,
    gap_ci, n, paired, row_ids.
    """
    df = _prepared(results)
    cols = ["method", "requested_budget", "target", "shots", "finetune", "finetune_ci", "reinit", "reinit_ci",
            "gap", "gap_ci", "n", "paired", "row_ids"]
    df = df[df["_ok"] & df["arm"].isin(["finetune", "reinit"])] if "arm" in df.columns else df.iloc[0:0]
    if df.empty:
        return pd.DataFrame(columns=cols)
    df = df.assign(_b=df["requested_budget"].map(_budget_key), _s=df["shots"].map(_shots_key),
                   acc_mean=pd.to_numeric(df["acc_mean"]), acc_ci95=pd.to_numeric(df["acc_ci95"], errors="coerce"))
    eps: dict[str, dict[int, float]] = {}
    if episodes is not None:
        for rid, ep, acc in zip(episodes["row_id"].astype(str), episodes["episode"], episodes["accuracy"],
                                strict=True):
            eps.setdefault(rid, {})[int(ep)] = float(acc)
    rows = []
    for (method, b, target, s), g in df.groupby(["method", "_b", "target", "_s"], sort=False):
        ft, ri = g[g["arm"] == "finetune"], g[g["arm"] == "reinit"]
        if ft.empty or ri.empty:
            continue
        rec = {"method": method, "requested_budget": b, "target": target, "shots": s,
               "finetune": float(ft["acc_mean"].mean()), "finetune_ci": float(ft["acc_ci95"].mean()),
               "reinit": float(ri["acc_mean"].mean()), "reinit_ci": float(ri["acc_ci95"].mean()),
               "row_ids": " ".join(sorted([*ft["row_id"].astype(str), *ri["row_id"].astype(str)]))
               if "row_id" in g.columns else ""}
        diffs: dict[int, list[float]] = {}
        reps = sorted(set(ft["replicate"]) & set(ri["replicate"])) if "replicate" in g.columns else []
        for rep in reps:
            f_ids = ft.loc[ft["replicate"] == rep, "row_id"].astype(str)
            r_ids = ri.loc[ri["replicate"] == rep, "row_id"].astype(str)
            f_eps, r_eps = eps.get(next(iter(f_ids), ""), {}), eps.get(next(iter(r_ids), ""), {})
            for e in set(f_eps) & set(r_eps):
                diffs.setdefault(e, []).append(f_eps[e] - r_eps[e])
        if len(diffs) >= 1:
            d = np.array([np.mean(v) for _, v in sorted(diffs.items())])
            std = float(np.std(d, ddof=1)) if len(d) > 1 else 0.0
            rec.update(gap=float(d.mean()), gap_ci=1.96 * std / math.sqrt(len(d)), n=len(d), paired=True)
        else:
            rec.update(gap=rec["finetune"] - rec["reinit"],
                       gap_ci=math.sqrt(rec["finetune_ci"] ** 2 + rec["reinit_ci"] ** 2),
                       n=int(pd.to_numeric(ft.get("n_episodes"), errors="coerce").mean())
                       if "n_episodes" in ft.columns else 0, paired=False)
        rows.append(rec)
    if not rows:
        return pd.DataFrame(columns=cols)
    out = pd.DataFrame(rows)
    order = {m: i for i, m in enumerate(method_order(out["method"]))}
    out = out.assign(_mo=out["method"].map(order), _nb=-out["requested_budget"])
    out = out.sort_values(["_mo", "_nb", "target", "shots"], kind="mergesort").reset_index(drop=True)
    return out[cols]


def reinit_gap_table(results: pd.DataFrame, episodes: pd.DataFrame | None = None) -> pd.DataFrame:
    """finetune minus reinit accuracy (percentage points) for every configuration run under both arms.

    Same architecture, same episodes, same optimiser and steps; only the starting weights differ
    (inherited from the source vs freshly initialised). A positive gap means the inherited weights
    help; DAP claims the architecture alone transfers (gap near 0). With ``episodes`` the ± is the
    paired 95% CI of the per-episode differences; without, the unpaired sqrt(ci_f^2 + ci_r^2)
    half-width (conservative). See :func:`reinit_gap_data`.
    """
    data = reinit_gap_data(results, episodes)
    cols = ["method", "budget", "target", "shots", "finetune %", "reinit %", "gap (pp)", "CI", "row_id"]
    if data.empty:
        return pd.DataFrame(columns=cols)
    return pd.DataFrame({
        "method": data["method"], "budget": data["requested_budget"].map(_fmt_budget), "target": data["target"],
        "shots": data["shots"].map(lambda v: _fmt_num(v, ".0f")),
        "finetune %": [_fmt_acc(m, c) for m, c in zip(data["finetune"], data["finetune_ci"], strict=True)],
        "reinit %": [_fmt_acc(m, c) for m, c in zip(data["reinit"], data["reinit_ci"], strict=True)],
        "gap (pp)": [f"{100 * g:+.1f} ± {_fmt_num(100 * c, '.1f')}" for g, c in
                     zip(data["gap"], data["gap_ci"], strict=True)],
        "CI": [f"paired, n={n}" if p else "unpaired" for n, p in zip(data["n"], data["paired"], strict=True)],
        "row_id": data["row_ids"],
    })[cols]


def failures_table(results: pd.DataFrame) -> pd.DataFrame:
    """Rows that did not produce an accuracy, with their error text."""
    df = _prepared(results)
    bad = df[~df["_ok"]]
    cols = ["row_id", "method", "requested", "target", "shots", "arm", "replicate", "status", "error"]
    if bad.empty:
        return pd.DataFrame(columns=cols)
    bad = _sorted(bad, extra=[c for c in ("target", "shots", "arm", "replicate") if c in bad.columns])
    out = pd.DataFrame({
        "row_id": bad["row_id"].astype(str) if "row_id" in bad.columns else "",
        "method": bad["method"],
        "requested": bad["requested_budget"].map(_fmt_budget),
    })
    for c in ("target", "shots", "arm", "replicate"):
        if c in bad.columns:
            out[c] = bad[c].map(lambda v: _fmt_num(v, ".0f")) if c in ("shots", "replicate") else bad[c].astype(str)
    out["status"] = bad["status"].astype(str)
    out["error"] = [e if e else "(no error message; accuracy missing)" for e in bad["error"].astype(str)]
    return out[[c for c in cols if c in out.columns]]


# --------------------------------------------------------------------------- figures


def _series_label(row: pd.Series, qualifiers: Sequence[str]) -> str:
    """``method`` or e.g. ``l1_filter [side=target]`` when the method varies in that column."""
    quals = [f"{c}={row[c]}" for c in qualifiers]
    return str(row["method"]) + (f" [{', '.join(quals)}]" if quals else "")


def _method_styles(methods: Sequence[str]) -> dict[str, dict[str, Any]]:
    import seaborn as sns

    others = [m for m in methods if m != "dense"]
    palette = sns.color_palette("colorblind", max(len(others), 1))
    styles: dict[str, dict[str, Any]] = {"dense": {"color": (0.15, 0.15, 0.15), "marker": "*"}}
    for i, m in enumerate(others):
        styles[m] = {"color": palette[i % len(palette)], "marker": _MARKERS[i % len(_MARKERS)]}
    return styles


def _layout(agg: pd.DataFrame) -> tuple[list[str], dict[str, list[str]]]:
    """(arms that get their own panel row, per-method qualifier columns for series labels)."""
    arms: list[str] = []
    if "arm" in agg.columns:
        pruned = agg[~agg["method"].isin(REFERENCE_METHODS)]
        arms = sorted(pruned["arm"].astype(str).unique())
        if len(arms) <= 1:
            arms = []
    quals: dict[str, list[str]] = {}
    for method, rows in agg.groupby("method", sort=True):
        quals[str(method)] = [
            col for col in ("side", "arm", "budget_metric", "backbone", "source", "ways")
            if col in rows.columns and not (col == "arm" and arms) and rows[col].nunique(dropna=False) > 1
        ]
    return arms, quals


def _facet_rows(agg: pd.DataFrame, arms: list[str]) -> list[tuple[str | None, str | None]]:
    targets: list[str | None] = sorted(agg["target"].astype(str).unique()) if "target" in agg.columns else []
    targets = targets or [None]
    return [(t, a) for t in targets for a in (arms or [None])]


def _labelled(df: pd.DataFrame, quals: dict[str, list[str]], extra: Sequence[str] = ()) -> pd.DataFrame:
    labels = [_series_label(row, [*quals.get(str(row["method"]), []), *extra]) for _, row in df.iterrows()]
    return df.assign(_label=pd.Series(labels, index=df.index, dtype=object))


def _panel_data(
    agg: pd.DataFrame, target: str | None, arm: str | None, arms: list[str], quals: dict[str, list[str]]
) -> pd.DataFrame:
    """Rows drawn in one panel, with a ``_label`` column naming their series."""
    pool = agg if target is None else agg[agg["target"].astype(str) == target]
    sel = pool
    if arm is not None:
        # Reference runs made only under an arm no pruned method uses are drawn in every panel.
        shared = pool["method"].isin(REFERENCE_METHODS) & ~pool["arm"].astype(str).isin(arms)
        sel = pool[(pool["arm"].astype(str) == arm) | shared]
    sel = _labelled(sel, quals)
    if arm is not None:
        # dense and random appear in every panel: borrow them from another arm when this one lacks them.
        for method in ALWAYS_SHOWN:
            borrowed = pool[pool["method"] == method]
            if not borrowed.empty and not (sel["method"] == method).any():
                sel = pd.concat([sel, _labelled(borrowed, quals, extra=["arm"])])
    return sel


def _dodge(k: int, n: int, span: float = 0.03) -> float:
    """Multiplicative horizontal offset on a log axis so overlapping error bars stay apart; the
    ``n`` series together span at most ``span`` decades (about ±3.5%)."""
    step = min(0.012, span / max(n - 1, 1))
    return float(10 ** (step * (k - (n - 1) / 2)))


def _facet_title(target: str | None, arm: str | None, shots: int | None = None) -> str:
    parts = [f"{shots}-shot"] if shots is not None else []
    parts += [p for p in (target, arm) if p is not None]
    return " · ".join(parts)


def _new_figure(nrows: int, ncols: int, sharey: bool = True, width: float = 4.0,
                height: float = 3.1) -> tuple[Any, np.ndarray]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1.0 + width * ncols, 0.6 + height * nrows), dpi=FIGURE_DPI, layout="constrained")
    axes = fig.subplots(nrows, ncols, sharey=sharey, squeeze=False)
    return fig, axes


def _add_legend(fig: Any, axes: np.ndarray, methods: Sequence[str], title: str | None = None) -> None:
    """One legend for the figure, outside the panels, ordered by method then first appearance."""
    handles: dict[str, Any] = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(lab, h)
    rank = {m: i for i, m in enumerate(methods)}
    first_seen = {lab: i for i, lab in enumerate(handles)}
    ordered = sorted(handles, key=lambda lab: (rank.get(lab.split(" ", 1)[0], len(rank)), first_seen[lab]))
    handles = {lab: handles[lab] for lab in ordered}
    if handles:
        fig.legend(list(handles.values()), list(handles.keys()), loc="outside right upper", frameon=False,
                   fontsize="small", title=title, title_fontsize="small")


def _save(fig: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=FIGURE_DPI, metadata={"Software": None})
        os.chmod(tmp, _FILE_MODE)


def _empty_figure(title: str, message: str = "no successful runs to plot") -> Any:
    fig, axes = _new_figure(1, 1, height=1.2)
    ax = axes[0, 0]
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()
    fig.suptitle(title)
    return fig


def _eng(x: float) -> str:
    from matplotlib.ticker import EngFormatter

    return EngFormatter(sep="").format_eng(x)


def _plain(x: float) -> str:
    return f"{x:.3g}"


def _log_tick_formatter(ax: Any, minor: bool, fmt: Callable[[float], str] = _eng) -> Any:
    """Tick labels via ``fmt``; minor ticks labelled at 2x, 3x, 5x only on narrow ranges."""
    from matplotlib.ticker import FuncFormatter

    def label(x: float, _pos: Any) -> str:
        if x <= 0:
            return ""
        if minor:
            lo, hi = ax.get_xlim()
            mantissa = round(x / 10 ** math.floor(math.log10(x)), 6)
            if lo <= 0 or math.log10(hi / lo) > 1.5 or mantissa not in (2.0, 3.0, 5.0):
                return ""
        return fmt(x)

    return FuncFormatter(label)


def _pareto_front(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The non-dominated points (lower cost, higher accuracy), by increasing cost."""
    order = np.lexsort((-y, x))
    fx, fy, best = [], [], -math.inf
    for i in order:
        if y[i] > best:
            fx.append(x[i])
            fy.append(y[i])
            best = y[i]
    return np.asarray(fx), np.asarray(fy)


def _plot_vs_cost(agg: pd.DataFrame, cost: str, xlabel: str, title: str, styles: dict[str, dict[str, Any]],
                  fmt: Callable[[float], str] = _plain) -> Any:
    """Accuracy against ``cost`` (log x): one panel per shots (columns) and target x arm (rows);
    each method a line through its budgets, dense a star with a dashed reference line, random a
    series, the all-method Pareto front dotted grey."""
    if agg.empty or cost not in agg.columns or not np.isfinite(pd.to_numeric(agg[cost], errors="coerce")).any():
        return _empty_figure(title, f"no successful run with a {cost} value to plot")
    agg = agg.assign(**{cost: pd.to_numeric(agg[cost], errors="coerce")})
    arms, quals = _layout(agg)
    facets = _facet_rows(agg, arms)
    shots_values = sorted(agg["shots"].astype(int).unique())
    methods = method_order(agg["method"])
    fig, axes = _new_figure(len(facets), len(shots_values))
    for r, (target, arm) in enumerate(facets):
        for c, shots in enumerate(shots_values):
            ax = axes[r, c]
            panel = _panel_data(agg[agg["shots"].astype(int) == shots], target, arm, arms, quals)
            panel = panel[np.isfinite(panel[cost].to_numpy(dtype=float)) & (panel[cost] > 0)]
            labels = [
                lab for m in methods for lab in sorted(panel.loc[panel["method"] == m, "_label"].unique())
            ]
            for k, label in enumerate(labels):
                s = panel[panel["_label"] == label].sort_values("requested_budget", kind="mergesort")
                method = str(s["method"].iloc[0])
                style = styles[method]
                x = s[cost].to_numpy(dtype=float) * _dodge(k, len(labels))
                y = 100 * s["acc_mean"].to_numpy(dtype=float)
                yerr = 100 * np.nan_to_num(s["acc_ci95"].to_numpy(dtype=float))
                ls = _LINESTYLES[sorted(panel.loc[panel["method"] == method, "_label"].unique()).index(label)
                                 % len(_LINESTYLES)]
                ax.errorbar(x, y, yerr=yerr, color=style["color"], marker=style["marker"], linestyle=ls,
                            markersize=9 if method == "dense" else 6, capsize=3, linewidth=1.5, label=label,
                            zorder=3)
                if method == "dense":
                    for yy in y:
                        ax.axhline(yy, color=style["color"], linestyle="--", linewidth=1, alpha=0.6, zorder=1)
            if len(panel) > 1:
                px = panel[cost].to_numpy(dtype=float)
                fx, fy = _pareto_front(px, 100 * panel["acc_mean"].to_numpy(dtype=float))
                fx, fy = np.append(fx, px.max()), np.append(fy, fy[-1])  # the best level holds up to the max cost
                ax.step(fx, fy, where="post", color="0.55", linewidth=6, alpha=0.3, zorder=1,
                        solid_capstyle="round", label="Pareto front (all methods)")
            if not panel.empty:
                ax.set_xscale("log")
                ax.xaxis.set_major_formatter(_log_tick_formatter(ax, minor=False, fmt=fmt))
                ax.xaxis.set_minor_formatter(_log_tick_formatter(ax, minor=True, fmt=fmt))
            ax.set_title(_facet_title(target, arm, shots), fontsize="medium")
            if c == 0:
                ax.set_ylabel("accuracy (%)")
            if panel.empty:
                ax.text(0.5, 0.5, "no successful runs", ha="center", va="center", transform=ax.transAxes)
    _add_legend(fig, axes, methods)
    fig.supxlabel(xlabel, fontsize="medium")
    fig.suptitle(title)
    return fig


def _plot_vs_shots(agg: pd.DataFrame, title: str, styles: dict[str, dict[str, Any]]) -> Any:
    if agg.empty:
        return _empty_figure(title)
    import seaborn as sns

    arms, quals = _layout(agg)
    facets = _facet_rows(agg, arms)
    methods = method_order(agg["method"])
    shots_values = sorted(agg["shots"].astype(int).unique())
    fig, axes = _new_figure(1, len(facets))
    for c, (target, arm) in enumerate(facets):
        ax = axes[0, c]
        panel = _panel_data(agg, target, arm, arms, quals)
        series: list[tuple[str, float, str]] = []
        for m in methods:
            sub = panel[panel["method"] == m]
            pairs = sub[["requested_budget", "_label"]].drop_duplicates()
            pairs = pairs.sort_values(
                ["requested_budget", "_label"], ascending=[False, True], kind="mergesort"
            )
            series += [(m, float(b), lab) for b, lab in pairs.itertuples(index=False)]
        for k, (m, budget, label) in enumerate(series):
            s = panel[(panel["_label"] == label) & (panel["requested_budget"] == budget)].sort_values("shots")
            n_budgets = sum(1 for mm, _, ll in series if mm == m and ll == label)
            rank = sum(1 for mm, bb, ll in series if mm == m and ll == label and bb > budget)
            # Larger budgets darker, smaller budgets lighter shades of the method's colour.
            shades = sns.light_palette(styles[m]["color"], n_colors=n_budgets + 2, reverse=True)
            variants = sorted({ll for mm, _, ll in series if mm == m})
            x = s["shots"].to_numpy(dtype=float) * _dodge(k, len(series), span=0.05)
            ax.errorbar(x, 100 * s["acc_mean"].to_numpy(dtype=float),
                        yerr=100 * np.nan_to_num(s["acc_ci95"].to_numpy(dtype=float)), color=shades[rank],
                        marker=styles[m]["marker"], markersize=9 if m == "dense" else 6, capsize=3,
                        linestyle=_LINESTYLES[variants.index(label) % len(_LINESTYLES)],
                        linewidth=1.5, label=f"{label} @ {_fmt_budget(budget)}", zorder=3)
        ax.set_xscale("log")
        ax.set_xticks(shots_values, [str(s) for s in shots_values])
        ax.minorticks_off()
        ax.set_xlabel("shots per class")
        if c == 0:
            ax.set_ylabel("accuracy (%)")
        ax.set_title(_facet_title(target, arm), fontsize="medium")
    _add_legend(fig, axes, methods)
    fig.suptitle(title)
    return fig


def _plot_budget(results: pd.DataFrame, title: str, styles: dict[str, dict[str, Any]]) -> Any:
    """Requested budget (x) against the achieved params and FLOPs ratios (one panel each), y = x dashed."""
    df = _prepared(results)
    metrics = [m for m in ("params", "flops") if f"{m}_ratio" in df.columns]
    pts = {m: df.assign(_x=pd.to_numeric(df["requested_budget"], errors="coerce"),
                        _y=pd.to_numeric(df[f"{m}_ratio"], errors="coerce")) for m in metrics}
    pts = {m: p[np.isfinite(p["_x"]) & np.isfinite(p["_y"])] for m, p in pts.items()}
    if not metrics or all(p.empty for p in pts.values()):
        return _empty_figure(title, "no achieved params or FLOPs recorded")
    methods = method_order(df["method"])
    budget_metrics = set(df["budget_metric"].astype(str)) if "budget_metric" in df.columns else set()
    fig, axes = _new_figure(1, len(metrics), sharey=False, width=4.4, height=3.6)
    for c, metric in enumerate(metrics):
        ax = axes[0, c]
        p = pts[metric]
        ax.plot([0, 1.05], [0, 1.05], color="0.5", linestyle="--", linewidth=1, label="achieved = requested",
                zorder=1)
        for k, m in enumerate(methods):
            s = p[p["method"] == m][["_x", "_y"]].drop_duplicates()
            if s.empty:
                continue
            dx = 0.006 * (k - (len(methods) - 1) / 2)
            ax.scatter(s["_x"] + dx, s["_y"], color=[styles[m]["color"]], marker=styles[m]["marker"],
                       s=60 if m == "dense" else 30, label=m, zorder=3, edgecolors="white", linewidths=0.4)
        ax.set_xlim(0, 1.05)
        ax.set_ylim(0, 1.05)
        ax.set_aspect("equal")
        ax.set_xlabel("requested budget (fraction of dense)")
        suffix = " — the budget metric" if metric in budget_metrics else ""
        ax.set_ylabel(f"achieved {metric} ratio")
        ax.set_title(f"{metric}{suffix}", fontsize="medium")
    _add_legend(fig, axes, methods)
    fig.suptitle(title)
    return fig


def _plot_search_cost(results: pd.DataFrame, title: str) -> Any:
    """Search seconds per method (log x); one point per searched network (per budget and
    replicate; per shots for per-episode methods, whose value is the mean per episode)."""
    import seaborn as sns

    df = _prepared(results)
    if "search_seconds" not in df.columns:
        return _empty_figure(title, "no search time recorded")
    df = df.assign(_sec=pd.to_numeric(df["search_seconds"], errors="coerce"),
                   _b=pd.to_numeric(df["requested_budget"], errors="coerce"))
    if "search_scope" not in df.columns:
        df["search_scope"] = "once"
    keep = [c for c in ("method", "_b", "replicate", "search_scope", "_sec") if c in df.columns]
    df = df[np.isfinite(df["_sec"])][keep].drop_duplicates()
    if df.empty:
        return _empty_figure(title, "no search time recorded")
    methods = method_order(df["method"])
    budgets = sorted(df["_b"].dropna().unique(), reverse=True)
    palette = dict(zip(budgets, sns.color_palette("crest", max(len(budgets), 1)), strict=False))
    fig, axes = _new_figure(1, 1, width=7.0, height=0.28 * len(methods) + 0.9)
    ax = axes[0, 0]
    positive = df[df["_sec"] > 0]
    labels = []
    for i, m in enumerate(methods):
        sub = df[df["method"] == m]
        per_episode = (sub["search_scope"].astype(str) == "per episode").any()
        labels.append(f"{m} (per episode)" if per_episode else m)
        y = len(methods) - 1 - i
        pos = sub[sub["_sec"] > 0]
        for b, g in pos.groupby("_b", sort=True):
            ax.scatter(g["_sec"], np.full(len(g), y), color=[palette.get(b, "0.3")],
                       marker="^" if per_episode else "o", s=36, zorder=3, edgecolors="white", linewidths=0.4,
                       label=f"budget {_fmt_budget(b)}")
        if pos.empty:
            ax.annotate("no search (0 s)", xy=(0.01, y), xycoords=("axes fraction", "data"), va="center",
                        fontsize="small", color="0.35")
    if not positive.empty:
        ax.set_xscale("log")
        lo, hi = float(positive["_sec"].min()), float(positive["_sec"].max())
        ax.set_xlim(lo / 6, hi * 2)
    ax.set_yticks(range(len(methods)), list(reversed(labels)))
    ax.set_ylim(-0.7, len(methods) - 0.3)
    ax.set_xlabel("search time (s, log scale; per-episode methods: mean per episode)")
    from matplotlib.lines import Line2D

    found = dict(zip(*reversed(ax.get_legend_handles_labels()), strict=True))
    handles = {f"budget {_fmt_budget(b)}": found[f"budget {_fmt_budget(b)}"] for b in budgets
               if f"budget {_fmt_budget(b)}" in found}
    handles["searched once"] = Line2D([], [], color="0.4", marker="o", linestyle="")
    handles["per episode (mean)"] = Line2D([], [], color="0.4", marker="^", linestyle="")
    fig.legend(list(handles.values()), list(handles.keys()), loc="outside right upper", frameon=False,
               fontsize="small")
    fig.suptitle(title)
    return fig


def _plot_reinit_gap(gaps: pd.DataFrame, title: str, styles: dict[str, dict[str, Any]]) -> Any:
    """finetune − reinit gap (pp) with its 95% CI, one panel per (target, shots), one row per method@budget."""
    if gaps.empty:
        return _empty_figure(title, "no configuration ran under both the finetune and reinit arms")
    facets = sorted({(str(t), int(s)) for t, s in zip(gaps["target"], gaps["shots"], strict=True)})
    multi_target = len({t for t, _ in facets}) > 1
    rows = []
    for m in method_order(gaps["method"]):
        for b in sorted(gaps.loc[gaps["method"] == m, "requested_budget"].unique(), reverse=True):
            rows.append((m, float(b)))
    fig, axes = _new_figure(1, len(facets), width=3.6, height=0.3 * len(rows) + 0.9)
    for c, (target, shots) in enumerate(facets):
        ax = axes[0, c]
        ax.axvline(0, color="0.4", linewidth=1, linestyle="--", zorder=1)
        sub = gaps[(gaps["target"].astype(str) == target) & (gaps["shots"].astype(int) == shots)]
        for i, (m, b) in enumerate(rows):
            hit = sub[(sub["method"] == m) & (np.isclose(sub["requested_budget"].astype(float), b))]
            if hit.empty:
                continue
            y = len(rows) - 1 - i
            ax.errorbar(100 * hit["gap"].to_numpy(dtype=float), [y],
                        xerr=100 * np.nan_to_num(hit["gap_ci"].to_numpy(dtype=float)),
                        color=styles[m]["color"], marker=styles[m]["marker"], capsize=3, linestyle="", zorder=3)
        ax.set_yticks(range(len(rows)), [f"{m} @ {_fmt_budget(b)}" for m, b in reversed(rows)])
        ax.set_ylim(-0.7, len(rows) - 0.3)
        ax.set_xlabel("finetune − reinit (pp)")
        ax.set_title(_facet_title(target if multi_target else None, None, shots), fontsize="medium")
    fig.suptitle(title)
    return fig


def make_figures(results: pd.DataFrame, out_dir: Path, episodes: pd.DataFrame | None = None) -> dict[str, Path]:
    """Write the comparison figures as ``{out_dir}/{name}.png`` and return ``{name: path}``.

    Names (:data:`FIGURE_NAMES`, plus :data:`CUDA_FIGURE` when some row has a CUDA latency):
    accuracy against the achieved params ratio, FLOPs ratio and measured CPU latency at batch 1
    (one panel per shots, and per arm when pruned methods ran under several or per target when
    several; dense and random in every panel; the Pareto front of all methods dotted),
    accuracy against shots, requested vs achieved budget, search seconds per method and the
    finetune − reinit gap (paired over ``episodes`` when given). Only ``status == "ok"`` rows
    with an accuracy are drawn, averaged over replicates; failed rows and missing (NaN) costs
    are left out of the plots (the tables list them). Points of different series are offset
    horizontally by about 3.5% at most so error bars do not hide each other. Rendering uses the
    Agg canvas directly (pyplot's global state is untouched) and PNGs carry no software tag or
    timestamp, so identical data gives identical bytes.
    """
    import matplotlib
    import seaborn as sns

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    agg = _aggregate_ok(results)
    if not agg.empty:
        agg["shots"] = agg["shots"].astype(int)
    styles = _method_styles(method_order(results["method"].astype(str)) if "method" in results.columns else [])
    cpu = latency_columns(agg)
    cpu_col = cpu[0] if cpu else "latency_ms_b1"
    cpu_batch = _LATENCY_RE.match(cpu_col).group(1) if cpu else "1"  # type: ignore[union-attr]
    builders: dict[str, Callable[[], Any]] = {
        "acc_vs_params": lambda: _plot_vs_cost(agg, "params_ratio", "achieved params / dense params (log scale)",
                                               "Accuracy vs parameters kept", styles),
        "acc_vs_flops": lambda: _plot_vs_cost(agg, "flops_ratio", "achieved FLOPs / dense FLOPs (log scale)",
                                              "Accuracy vs FLOPs kept", styles),
        "acc_vs_latency": lambda: _plot_vs_cost(agg, cpu_col, f"CPU latency, batch {cpu_batch} (ms, log scale)",
                                                "Accuracy vs measured CPU latency", styles),
    }
    cuda = _timed(agg, _CUDA_LATENCY_RE) if not agg.empty else []
    if cuda:
        batch = _CUDA_LATENCY_RE.match(cuda[0]).group(1)  # type: ignore[union-attr]
        builders[CUDA_FIGURE] = lambda: _plot_vs_cost(agg, cuda[0], f"CUDA latency, batch {batch} (ms, log scale)",
                                                      "Accuracy vs measured CUDA latency", styles)
    builders.update({
        "acc_vs_shots": lambda: _plot_vs_shots(agg, "Accuracy vs shots", styles),
        "budget_achieved": lambda: _plot_budget(results, "Requested vs achieved budget", styles),
        "search_cost": lambda: _plot_search_cost(results, "Search cost per method"),
        "reinit_gap": lambda: _plot_reinit_gap(reinit_gap_data(results, episodes),
                                               "Inherited weights vs fresh initialisation (finetune − reinit)",
                                               styles),
    })
    paths: dict[str, Path] = {}
    style = {**sns.axes_style("whitegrid"), **sns.plotting_context("notebook", font_scale=0.85)}
    with matplotlib.rc_context({**style, "svg.hashsalt": "pruneshot", "path.simplify": True}):
        for name, build in builders.items():
            fig = build()
            path = out_dir / f"{name}.png"
            _save(fig, path)
            paths[name] = path
    return paths


# --------------------------------------------------------------------------- HTML

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
.banner ul { margin: 0.3rem 0 0; }
figure { margin: 1rem 0 2rem; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #444; font-size: 0.9rem; max-width: 80ch; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 0.85rem; margin: 0.5rem 0 1rem; }
th, td { border: 1px solid #d6d6d6; padding: 0.25rem 0.5rem; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } tbody tr:nth-child(even) { background: #fafafa; }
tr.group td { border-top: 2px solid #8a8a8a; }
#detail-table td, #comparisons-table td, .results-table td { white-space: nowrap; }
details > summary { cursor: pointer; margin: 0.4rem 0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.failed { color: #a40000; font-weight: 600; }
.up { color: #0b6e2f; font-weight: 700; } .down { color: #a40000; font-weight: 700; }
.legend, .note { font-size: 0.85rem; color: #333; }
code, .mono { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; font-size: 0.85em; }
pre.error { white-space: pre-wrap; margin: 0; max-width: 60ch; }
"""

_NUMERIC_RE = re.compile(
    r"^[-+]?\d[\d.,eE+-]*( ± [\d.]+| ± —)?( \(n=\d+(; \d+/\d+ failed)?\)| \(\d+/\d+ failed\)| \(\d+\))?$"
)
_MARK_COLUMNS = ("vs dense", "vs random", "significant")
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


def _html_table(df: pd.DataFrame, table_id: str, css_class: str = "", group_by: str | None = None) -> str:
    """``df`` as an HTML table; with ``group_by``, a row whose value in that column differs from the
    previous row's starts a visual group."""
    head = "".join(f"<th>{_esc(c)}</th>" for c in df.columns)
    body = []
    previous: Any = None
    for i, row in enumerate(df.itertuples(index=False)):
        cells = "".join(_cell(v, str(c)) for v, c in zip(row, df.columns, strict=True))
        value = df[group_by].iloc[i] if group_by else None
        start = group_by is not None and i > 0 and value != previous
        previous = value
        body.append(f'<tr class="group">{cells}</tr>' if start else f"<tr>{cells}</tr>")
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
        "join every budget's cell) methods whose mean is within 1.96·√(s₁²/n₁ + s₂²/n₂) of the best remaining one "
        "share its rank; average ranks are over the cells a method is ranked in."
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
        "<em>random</em> keeps random channels at the same per-layer ratio (the control); both are in every "
        "figure panel and every significance column. <em>linear_probe</em> trains only a new head on the "
        f"frozen dense backbone.{rep_txt} Speed: params and FLOPs are theoretical counts on the physically pruned "
        "network; latency is measured (median of repeated timed forward passes after warm-up). The statistics "
        "(tests, multiple-comparison correction, ranks) are stated above the results tables.</p>"
    )


_FIGURE_TEXT = {
    "acc_vs_params": ("accuracy (%) against achieved parameter ratio",
                      "Accuracy against the achieved fraction of the dense network's parameters (log scale); one "
                      "panel per shots value (columns) and target and arm (rows). Each method's points are "
                      "connected in budget order, so its accuracy-cost trade-off (its Pareto front) reads as a "
                      "line; the grey band is the Pareto front of all methods together."),
    "acc_vs_flops": ("accuracy (%) against achieved FLOPs ratio",
                     "Accuracy against the achieved fraction of the dense network's FLOPs (theoretical, batch 1, "
                     "log scale); panels and lines as in the parameters figure."),
    "acc_vs_latency": ("accuracy (%) against measured CPU latency",
                       "Accuracy against measured CPU latency of the physically pruned network (median ms per "
                       "forward pass at the smallest profiled batch size, log scale); panels and lines as above."),
    CUDA_FIGURE: ("accuracy (%) against measured CUDA latency",
                  "Accuracy against measured CUDA latency (median ms per forward pass, synchronised, smallest "
                  "profiled batch size, log scale); panels and lines as above."),
    "acc_vs_shots": ("accuracy (%) against shots per class",
                     "Accuracy against shots per class; one line per method and budget (darker = larger budget)."),
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


def _figures_html(figures: dict[str, Path], results: pd.DataFrame) -> str:
    parts = []
    for i, (name, path) in enumerate(figures.items(), start=1):
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
    if provenance.get("git_dirty"):
        notes.append("the report was built from a checkout with uncommitted changes")
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

    dirty = prov.get("git_dirty")
    dirty_txt = "unknown" if dirty is None else ("yes (uncommitted changes)" if dirty else "no")
    mlflow = prov.get("mlflow") or {}
    general = [
        ("study", get("study")),
        ("report built at git commit", get("git_commit")),
        ("working tree dirty", dirty_txt),
        ("config sha256 (report)", prov.get("config_sha256") or "not given (built from the tables alone)"),
        ("generated (UTC)", get("generated_utc")),
        ("MLflow tracking URI", mlflow.get("tracking_uri") or "unknown"),
        ("MLflow experiment",
         f"{mlflow.get('experiment_name') or 'unknown'} (id {mlflow.get('experiment_id') or 'unknown'})"),
        ("MLflow parent run", mlflow.get("parent_run_id") or "unknown"),
    ]
    sync = prov.get("mlflow_sync") or {}
    if sync:
        general.append(("MLflow records replayed from spool", ", ".join(f"{k} {v}" for k, v in sorted(sync.items()))))
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


def _tables_html(results: pd.DataFrame, statistics: Statistics, episodes: pd.DataFrame | None) -> str:
    """Everything derived from the CSVs alone; byte-identical for identical input."""
    main = results_table(results, statistics)
    detail = detail_table(results)
    failures = failures_table(results)
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
                                       else "no method shares episodes with dense or random") + "</p>")
    avg = average_rank_table(statistics)
    avg_html = _html_table(avg, "average-ranks-table") if not avg.empty else '<p id="average-ranks-none">none</p>'
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
        "pruning). <em>vs dense</em> / <em>vs random</em>: mean paired difference in percentage points and "
        f"one mark per replicate: <span class=\"up\">{UP}</span> significantly better, "
        f"<span class=\"down\">{DOWN}</span> significantly worse, n.s. (or ·) not significant, — no comparison "
        "(no baseline run at that budget and arm). <em>rank</em>: Meta-Dataset rank / methods in the cell "
        "(1 = best; tied methods share a rank); dense and linear_probe are ranked in every budget's cell.</p>",
        f'<p class="legend" id="stats-statement">{_stats_statement(statistics)} {n_sig} comparison(s) '
        "significant.</p>",
        _panel_tables(main),
        _AUDIT_NOTE,
        "</section>",
        '<section id="ranks"><h2>Average rank</h2>',
        "<p>Mean Meta-Dataset rank over the cells each method is ranked in (lower is better).</p>",
        avg_html,
        "</section>",
        '<section id="comparisons"><h2>Paired comparisons</h2>',
        "<p>Every method against dense and against random at the same budget, target, shots, arm and replicate, "
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
        "method that errored on a cell; its error is listed here and its cell reads <em>failed</em> above.</p>",
        fail_html,
        "</section>",
        TABLES_END,
    ])


_TOC = (("how-to-read", "How to read"), ("figures", "Figures"), ("methods", "Methods"),
        ("results", "Results per cell"), ("ranks", "Average rank"), ("comparisons", "Paired comparisons"),
        ("reinit-gap", "Reinit gap"), ("details", "Cost detail"), ("failures", "Failures"),
        ("provenance", "Provenance"))


def render_html(results: pd.DataFrame, provenance: dict[str, Any], figures: dict[str, Path],
                episodes: pd.DataFrame | None = None, mixed: dict[str, dict[str, int]] | None = None) -> str:
    """The report as an HTML string (see :func:`build_report`)."""
    study = provenance.get("study") or "unnamed study"
    commit = str(provenance.get("git_commit") or "unknown")
    dirty = " (dirty)" if provenance.get("git_dirty") else ""

    def short(col: str, label: str) -> str:
        values = sorted({str(v) for v in results.get(col, pd.Series(dtype=str)).astype(str) if v and v != "nan"})
        return f"<code>{_esc(values[0][:12])}</code>" if len(values) == 1 else f"{len(values)} {label} (mixed)" \
            if values else "unknown"
    statistics = compute_statistics(results, episodes)
    toc = "".join(f'<li><a href="#{a}">{_esc(t)}</a></li>' for a, t in _TOC)
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
        f"{short('git_commit', 'commits')}, config {short('config_sha256', 'configs')} · report built at "
        f"commit <code>{_esc(commit[:12])}</code>{_esc(dirty)} · generated "
        f"{_esc(provenance.get('generated_utc') or 'unknown')}</p>",
        _mixed_banner(mixed or {}),
        _dirty_banner(results, provenance),
        f"<nav><ul>{toc}</ul></nav>",
        '<section id="how-to-read"><h2>How to read this report</h2>',
        _how_to_read(results, statistics),
        "</section>",
        '<section id="figures"><h2>Figures</h2>',
        _figures_html(figures, results),
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
                 episodes_csv: Path | None = None, allow_mixed: bool = False) -> dict[str, Path]:
    """Write a self-contained HTML report for ``results_csv`` to ``out_html`` (atomically).

    ``episodes_csv`` (results/tables/episodes.csv) enables the paired tests and the paired reinit
    gap. Results from several code commits or config hashes raise :class:`MixedResultsError`
    before anything is written, unless ``allow_mixed`` (then a warning banner lists them).
    Figures are written to ``figures_dir`` (``{name}.png``, for Snakemake's report) and
    embedded as base64 ``data:`` URIs; CSS is inline; no scripts or external resources.
    All text is HTML-escaped. Returns the figure paths.
    """
    results = load_results(results_csv)
    mixed = check_mixed(results, allow_mixed)
    episodes = load_episodes(episodes_csv) if episodes_csv is not None else None
    figures = make_figures(results, Path(figures_dir), episodes)
    text = render_html(results, provenance, figures, episodes, mixed)
    with atomic_path(out_html) as tmp:
        tmp.write_text(text, encoding="utf-8")
        os.chmod(tmp, _FILE_MODE)
    return figures
