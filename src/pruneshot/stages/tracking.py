"""Stages init_tracking and sync_tracking: the study's MLflow experiment and parent run, and the
replay of records spooled by jobs that could not reach MLflow."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pruneshot.config import config_hash
from pruneshot.io import read_json, write_json
from pruneshot.paths import RESULTS
from pruneshot.runtime.provenance import git_state
from pruneshot.stages.job import PROJECT_DIR, spool_dir


def init_tracking(config: dict[str, Any], out_study: Path) -> dict[str, str]:
    """Create the MLflow store/experiment and the study's parent run (RUNNING, the flattened config as its
    params; :func:`finish_tracking` ends it); write study.json."""
    from pruneshot.runtime import tracking
    from pruneshot.runtime.mlflow_client import resolve_tracking_uri

    uri = resolve_tracking_uri(config.get("mlflow", {}).get("tracking_uri"), PROJECT_DIR)
    commit, dirty = git_state()
    study = tracking.init_study(uri, config["study"]["name"], {
        "pruneshot.git_commit": commit, "pruneshot.git_dirty": str(dirty).lower(),
        "pruneshot.config_sha256": config_hash(config), "pruneshot.rule": "init_tracking",
    }, params=tracking.flatten(config))
    write_json(out_study, study)
    return study


def sync_tracking(config: dict[str, Any], study_path: Path, out: Path) -> dict[str, Any]:
    """Log the study's spooled MLflow records (every job's run when ``mlflow.live`` is false, else
    those of jobs that could not reach MLflow); write the counts and ``runs`` (spool id -> run id,
    merged into the ledger ``mlflow/runs.json`` beside ``out``, so a rerun in a checkout without the
    earlier spool, e.g. a ``dvc pull``ed clone, keeps the ids logged before)."""
    from pruneshot.runtime import spool

    study = read_json(study_path)
    spooled = spool_dir(config)
    summary = spool.sync_spool(spooled, study["tracking_uri"]) if spooled.exists() else {
        "records": 0, "synced": 0, "failed": 0, "metrics": 0}
    ledger = Path(out).parent / Path(RESULTS["mlflow_runs"]).name
    runs = {**(read_json(ledger) if ledger.is_file() else {}), **spool.logged_runs(spooled)}
    write_json(ledger, runs)
    write_json(out, {"study": study, "spool": summary, "runs": runs})
    return summary


def mlflow_run_id(record: dict[str, Any], runs: dict[str, str]) -> str:
    """The MLflow run of a stage's record: its own ``mlflow_run_id`` (logged live) or the one
    sync_tracking logged for its ``mlflow_spool_id`` (``runs`` from sync.json); "" if neither."""
    return record.get("mlflow_run_id") or runs.get(record.get("mlflow_spool_id") or "", "")


def study_metrics(results_csv: Path, sanity_json: Path | None) -> tuple[dict[str, float], str, list[str]]:
    """The study's summary for its parent run: per (method, budget, shots, arm) the mean accuracy over
    replicates (``acc.<method>.b<budget>.<shots>shot.<arm>``, a fraction), the row counts and each sanity
    gate (1 passed, 0 failed, -1 not evaluated); the run's status (FAILED when a row failed or a gate did
    not pass, else FINISHED) and why."""
    import pandas as pd

    from pruneshot.config import budget_label

    df = pd.read_csv(results_csv)
    ok = df[df["status"] == "ok"]
    metrics: dict[str, float] = {"rows_ok": float(len(ok)), "rows_failed": float(len(df) - len(ok))}
    if "budget_missed" in df:
        metrics["rows_budget_missed"] = float(df["budget_missed"].astype(str).str.lower().eq("true").sum())
    means = ok.groupby(["method", "requested_budget", "shots", "arm"])["acc_mean"].mean()
    for (method, budget, shots, arm), acc in means.items():
        metrics[f"acc.{method}.b{budget_label(budget)}.{int(shots)}shot.{arm}"] = float(acc)
    reasons = [f"{int(metrics['rows_failed'])} failed row(s)"] if metrics["rows_failed"] else []
    if sanity_json is not None and Path(sanity_json).is_file():
        gates = read_json(sanity_json)
        for gate, result in gates["gates"].items():
            metrics[f"gate.{gate}"] = {"passed": 1.0, "failed": 0.0}.get(result["status"], -1.0)
        bad = gates["failed"] + gates["not_evaluated"]
        reasons += [f"sanity gate {g} did not pass" for g in bad]
    return metrics, "FAILED" if reasons else "FINISHED", reasons


def finish_tracking(config: dict[str, Any], study_path: Path, results_csv: Path, sanity_json: Path | None,
                    artifacts: list[Path], out: Path) -> dict[str, Any]:
    """End the study's parent run with the study's summary metrics, the report and results table as
    artifacts, the final commit and config hash as tags, and a status that reflects the study. Best
    effort: the study's files are its results, so an unreachable store is logged, not a failed workflow.

    ``out`` (a DVC-versioned output) holds only what the study's files determine (parent run, status,
    reasons, metric count, artifacts), so a colleague who pulled the results and rebuilds the report
    rewrites the same bytes; whether MLflow took it (``logged``, ``error``) is returned for the job's
    log. A SQLite store that is not on this machine (results pulled from another checkout) is left
    alone rather than created."""
    import logging

    from pruneshot.runtime import tracking
    from pruneshot.runtime.mlflow_client import sqlite_path

    study = read_json(study_path)
    metrics, status, reasons = study_metrics(results_csv, sanity_json)
    commit, dirty = git_state()
    record: dict[str, Any] = {"parent_run_id": study["parent_run_id"], "status": status, "reasons": reasons,
                              "metrics": len(metrics), "artifacts": [Path(a).as_posix() for a in artifacts]}
    db = sqlite_path(study["tracking_uri"])
    try:
        if db is not None and not db.is_file():
            raise FileNotFoundError(f"the study's MLflow store {db} is not on this machine (results pulled from "
                                    "another checkout?); its parent run is left as it was")
        tracking.finish_study(study, metrics, artifacts, status, tags={
            "pruneshot.final_git_commit": commit, "pruneshot.final_git_dirty": str(dirty).lower(),
            "pruneshot.final_config_sha256": config_hash(config), "pruneshot.study_status": "; ".join(reasons) or "ok"})
        outcome: dict[str, Any] = {"logged": True}
    except Exception as exc:  # the store is down or refuses: the files stand, the run stays open
        logging.getLogger(__name__).warning("could not finish the MLflow parent run: %s", exc)
        outcome = {"logged": False, "error": f"{type(exc).__name__}: {exc}"}
    write_json(out, record)
    return {**record, **outcome}
