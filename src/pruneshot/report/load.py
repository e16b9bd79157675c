"""Reading the report's inputs: ``results.csv`` and ``episodes.csv``, the mixed-run check and provenance.

Also the one definition of the latency column names: the aggregate stage writes them from a profile
record (:func:`latency_columns`), the report finds them in a table (:func:`latency_table_columns`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pruneshot.report.stats import budget_free_methods

#: results.csv columns whose distinct values must agree unless mixing is allowed.
MIXED_KEYS = (("git_commit", "code commits"), ("config_sha256", "config hashes"))
#: Median latency per batch size N (ms) on the CPU: ``latency_ms_b{N}``; on CUDA: ``latency_cuda_ms_b{N}``.
CPU_LATENCY_PREFIX = "latency_ms_b"
CUDA_LATENCY_PREFIX = "latency_cuda_ms_b"
CPU_LATENCY_RE = re.compile(rf"^{CPU_LATENCY_PREFIX}(\d+)$")
CUDA_LATENCY_RE = re.compile(rf"^{CUDA_LATENCY_PREFIX}(\d+)$")
#: Text columns that go with the latency columns (device names, dtype).
LATENCY_TEXT_COLUMNS = ("latency_device", "latency_dtype", "latency_cuda_device")
# mkstemp (behind atomic_path) creates 0600 files; reports are meant to be shared and served.
FILE_MODE = 0o644

# Columns that identify one evaluated configuration, apart from the replicate.
_KEY_COLUMNS = (
    "method", "side", "backbone", "source", "target", "ways", "shots", "arm", "budget_metric",
    "requested_budget",
)
# Columns averaged over replicates for plotting (plus every latency column present).
_MEAN_COLUMNS = (
    "acc_mean", "acc_ci95", "achieved_params", "achieved_flops", "dense_params", "dense_flops", "params_ratio",
    "flops_ratio", "n_episodes", "support_steps", "source_val_acc",
)
# Columns read as text whatever they look like (a hex id such as "1e5" must not become a float).
_TEXT_COLUMNS = (
    "row_id", "method", "method_source", "side", "backbone", "source", "target", "arm",
    "budget_metric", *LATENCY_TEXT_COLUMNS, "search_device", "git_commit",
    "config_sha256", "data_sha256", "checkpoint_sha256", "mlflow_run_id", "status", "error", "search_scope",
    "pretrain_device", "transfer_device", "bn_statistics", "mechanism", "widths",
)
_DEVICE_RE = re.compile(r"^(?:[a-z_]+_)?device$")


class MixedResultsError(ValueError):
    """results.csv holds rows from more than one code commit or config hash."""


# --------------------------------------------------------------------------- latency columns


def latency_columns(record: dict[str, Any]) -> dict[str, Any]:
    """The results-table latency columns of one profile record (median ms per batch size N).

    CPU: ``latency_device``, ``latency_dtype``, ``latency_ms_b{N}`` (the names they had before CUDA
    was timed). CUDA: ``latency_cuda_device`` and ``latency_cuda_ms_b{N}``, present for every batch
    size even when CUDA was not timed (then '' and NaN), so tables from machines with and without a
    GPU have the same columns. Reads records written before ``devices`` existed too."""
    nan = float("nan")
    cpu_lat = record.get("latency") or {}
    sizes = record.get("batch_sizes") or sorted(int(b) for b in cpu_lat)
    cuda = (record.get("devices") or {}).get("cuda") or {}
    cuda_lat = cuda.get("latency", {}) if cuda.get("present") else {}
    return {
        "latency_device": record.get("device") or "", "latency_dtype": record.get("dtype") or "float32",
        **{f"{CPU_LATENCY_PREFIX}{bs}": cpu_lat[str(bs)]["median_ms"] if str(bs) in cpu_lat else nan
           for bs in sizes},
        "latency_cuda_device": cuda.get("name", "") if cuda.get("present") else "",
        **{f"{CUDA_LATENCY_PREFIX}{bs}": cuda_lat[str(bs)]["median_ms"] if str(bs) in cuda_lat else nan
           for bs in sizes},
    }


def latency_table_columns(results: pd.DataFrame, pattern: re.Pattern[str] = CPU_LATENCY_RE) -> list[str]:
    """The ``latency_ms_b{N}`` (CPU) columns of ``results``, or those matching ``pattern`` (e.g.
    :data:`CUDA_LATENCY_RE`, ``latency_cuda_ms_b{N}``), ordered by batch size N."""
    found = [(int(m.group(1)), c) for c in results.columns if (m := pattern.match(str(c)))]
    return [c for _, c in sorted(found)]


def timed_latency_columns(results: pd.DataFrame, pattern: re.Pattern[str]) -> list[str]:
    """Latency columns matching ``pattern`` that hold at least one number."""
    return [c for c in latency_table_columns(results, pattern)
            if pd.to_numeric(results[c], errors="coerce").notna().any()]


def latency_batch(column: str) -> str:
    """The batch size N of a latency column name (CPU or CUDA), as text: 'latency_ms_b64' -> '64'."""
    m = CPU_LATENCY_RE.match(column) or CUDA_LATENCY_RE.match(column)
    if m is None:
        raise ValueError(f"not a latency column: {column!r}")
    return m.group(1)


# --------------------------------------------------------------------------- reading and preparing results


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


def method_order(methods: Iterable[str]) -> list[str]:
    """The budget-free methods (the references, e.g. dense, linear_probe) first, then every other method,
    each group by name."""
    unique = sorted({str(m) for m in methods})
    first = budget_free_methods(unique)
    return first + [m for m in unique if m not in first]


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
    means = [c for c in (*_MEAN_COLUMNS, *latency_table_columns(df), *latency_table_columns(df, CUDA_LATENCY_RE))
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
) -> dict[str, Any]:
    """The provenance dict :func:`render_html` shows: the study's config hash, the commits of its rows,
    dataset hashes (from the manifests), package versions, devices (from results.csv's ``*_device``
    columns), the MLflow experiment and parent run (``study_json``, results/mlflow/study.json) and the
    replay status (``sync_json``). Missing files are skipped. Nothing about the checkout or the time
    that builds the report: the report is a versioned output (DVC), so rebuilding it from the same
    results and code gives the same bytes; the build's commit and time are in the report job's log."""
    from pruneshot.io import read_json
    from pruneshot.runtime.provenance import package_versions

    mlflow = read_json(study_json) if study_json is not None and Path(study_json).is_file() else {}
    sync = read_json(sync_json) if sync_json is not None and Path(sync_json).is_file() else {}
    devices = _device_columns(results)
    return {
        "study": study or mlflow.get("experiment_name"),
        "config_sha256": config_sha256,
        "result_commits": sorted({str(v) for v in results.get("git_commit", pd.Series(dtype=str)).astype(str)}),
        "data_sha256": _manifest_hashes(manifests or {}),
        "packages": package_versions(),
        "devices": sorted({d for values in devices.values() for d in values}),
        "device_columns": devices,
        "mlflow": mlflow, "mlflow_sync": sync.get("spool", {}),
    }

