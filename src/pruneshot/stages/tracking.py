"""Stages init_tracking and sync_tracking: the study's MLflow experiment and parent run, and the
replay of records spooled by jobs that could not reach MLflow."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pruneshot.config import config_hash
from pruneshot.io import read_json, write_json
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
    """Replay the study's spooled MLflow records (jobs that could not reach MLflow); write a summary."""
    from pruneshot.runtime import spool

    study = read_json(study_path)
    spooled = spool_dir(config)
    summary = spool.sync_spool(spooled, study["tracking_uri"]) if spooled.exists() else {
        "records": 0, "synced": 0, "failed": 0, "metrics": 0}
    write_json(out, {"study": study, "spool": summary})
    return summary
