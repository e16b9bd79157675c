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
    """Create the MLflow store/experiment and the study's parent run; write study.json."""
    from pruneshot.runtime import tracking

    uri = tracking.resolve_tracking_uri(config.get("mlflow", {}).get("tracking_uri"), PROJECT_DIR)
    commit, dirty = git_state()
    study = tracking.init_study(uri, config["study"]["name"], {
        "pruneshot.git_commit": commit, "pruneshot.git_dirty": str(dirty).lower(),
        "pruneshot.config_sha256": config_hash(config), "pruneshot.rule": "init_tracking",
    })
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
