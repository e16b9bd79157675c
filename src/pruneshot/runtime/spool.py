"""The offline MLflow spool: records of runs that could not be logged live, and their replay.

A :class:`pruneshot.runtime.tracking.JobRun` that went offline (an MLflow error or a spent time
budget) writes one JSON record per run with :func:`pruneshot.runtime.tracking.write_record`: format
``SPOOL_FORMAT``, the
study, run name and id, status, start/end times, all tags, params and metrics, what was already
sent and the errors. ``sync_spool`` (a rule after all jobs) replays the records.

Replay policy (idempotent, never deletes): each record is logged as a *fresh*
run carrying all params, tags and metrics and the tag ``pruneshot.replay_of``
(the record's spool id). A partial run the job managed to create is kept, set to
FAILED and tagged ``pruneshot.superseded_by=<new run id>``. Before replaying,
``sync_spool`` looks for a terminated run with the same ``pruneshot.replay_of``
tag (a sync that died after logging but before moving the file) and then only
moves the file; a replay left RUNNING is superseded the same way. Replayed files
move to ``<spool_dir>/synced/`` with the id of the run they became (``logged_run_id``),
so a second sync does nothing and :func:`logged_runs` maps spool ids to run ids.

Records replay oldest first, so a job's upstream (pretrain before search before
transfer) is logged before it: a deferred record names its upstream by spool id
(tag ``pruneshot.upstream_spool_id``) and replay adds the upstream's run id
(``pruneshot.upstream_run_id``), the tags a live run gets.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pruneshot.io import read_json, write_json
from pruneshot.runtime import mlflow_client as mc
from pruneshot.runtime.mlflow_client import (
    PARENT_TAG,
    REPLACES_TAG,
    REPLAY_OF_TAG,
    ROLE_TAG,
    SPOOL_ID_TAG,
    SUPERSEDED_TAG,
    UPSTREAM_RUN_TAG,
    UPSTREAM_SPOOL_TAG,
    batches,
    ensure_experiment,
    log_batch,
)
from pruneshot.runtime.tracking import SPOOL_FORMAT

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

_log = logging.getLogger(__name__)

SYNCED_DIR = "synced"

def sync_spool(spool_dir: Path, tracking_uri: str | None = None) -> dict[str, int]:
    """Replay every spool record in ``spool_dir`` (optionally against another ``tracking_uri``).

    Each record becomes a fresh, complete run (see the module docstring for the
    idempotent replay policy); replayed files are moved to ``spool_dir/synced/``.
    A failing record is logged and left in place; the others still sync. Returns
    ``{"records", "synced", "failed", "metrics"}`` (metrics: values logged).
    """
    spool_dir = Path(spool_dir)
    counts = {"records": 0, "synced": 0, "failed": 0, "metrics": 0}
    if not spool_dir.is_dir():
        return counts
    clients: dict[str, MlflowClient] = {}
    runs = logged_runs(spool_dir)
    pending = []
    for path in sorted(spool_dir.glob("*.json")):
        counts["records"] += 1
        try:
            with open(path) as f:
                record = json.load(f)
            if record.get("format") != SPOOL_FORMAT:
                raise ValueError(f"not a spool record (format={record.get('format')!r})")
            pending.append((path, record))
        except Exception as exc:
            counts["failed"] += 1
            _log.warning("could not read MLflow spool record %s: %s: %s", path, type(exc).__name__, exc)
    pending.sort(key=lambda item: (item[1].get("start_time") or 0, item[0].name))  # upstream first
    for path, record in pending:
        try:
            uri = tracking_uri or record["tracking_uri"]
            if uri not in clients:
                clients[uri] = mc.client(uri)
            n_metrics, run_id = _replay(clients[uri], record, runs)
            counts["metrics"] += n_metrics
            runs[record["spool_id"]] = run_id
            (spool_dir / SYNCED_DIR).mkdir(exist_ok=True)
            write_json(spool_dir / SYNCED_DIR / path.name, {**record, "logged_run_id": run_id})
            path.unlink()
            counts["synced"] += 1
        except Exception as exc:
            counts["failed"] += 1
            _log.warning("could not sync MLflow spool record %s: %s: %s", path, type(exc).__name__, exc)
    return counts


def logged_runs(spool_dir: Path) -> dict[str, str]:
    """``{spool id: MLflow run id}`` of every record ``sync_spool`` logged from ``spool_dir``."""
    out = {}
    for path in sorted((Path(spool_dir) / SYNCED_DIR).glob("*.json")):
        try:
            record = read_json(path)
        except Exception as exc:
            _log.warning("unreadable synced MLflow record %s: %s: %s", path, type(exc).__name__, exc)
            continue
        run_id = record.get("logged_run_id") or (record.get("run_id") if record.get("complete") else None)
        if record.get("spool_id") and run_id:
            out[record["spool_id"]] = run_id
    return out


def _get_run_or_none(client: MlflowClient, run_id: str | None) -> Any:
    if not run_id:
        return None
    try:
        return client.get_run(run_id)
    except Exception:
        return None


def _resolve_experiment(client: MlflowClient, record: dict[str, Any]) -> str:
    name = record.get("experiment_name")
    if name:
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            if experiment.lifecycle_stage == "deleted":
                client.restore_experiment(experiment.experiment_id)
            return experiment.experiment_id
    if record.get("experiment_id"):
        try:
            return client.get_experiment(record["experiment_id"]).experiment_id
        except Exception:
            if not name:
                raise
    if not name:
        raise ValueError("record names no experiment")
    return ensure_experiment(client, name, None)


def _find_runs(client: MlflowClient, experiment_id: str, tag: str, value: str) -> list[Any]:
    return list(
        client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{tag}` = '{value}'",
            order_by=["attributes.start_time DESC"],
            max_results=50,
        )
    )


def _supersede(client: MlflowClient, run_id: str, new_run_id: str) -> None:
    client.set_tag(run_id, SUPERSEDED_TAG, new_run_id)
    client.set_terminated(run_id, status="FAILED")


def _replay(client: MlflowClient, record: dict[str, Any], runs: dict[str, str]) -> tuple[int, str]:
    """Log one spool record (``runs``: spool id -> run id of those logged before, for the upstream
    tag); returns the number of metric values logged (0 if already there) and the run's id."""
    partial = _get_run_or_none(client, record.get("run_id"))
    if record.get("complete") and partial is not None:
        return 0, partial.info.run_id  # everything reached this store; the record only reports slowness
    experiment_id = _resolve_experiment(client, record)
    spool_id = record["spool_id"]
    stale = []
    for run in _find_runs(client, experiment_id, REPLAY_OF_TAG, spool_id):
        if run.info.status != "RUNNING":  # an earlier sync logged it all, died before moving the file
            if partial is not None and SUPERSEDED_TAG not in partial.data.tags:
                _supersede(client, partial.info.run_id, run.info.run_id)
            return 0, run.info.run_id
        stale.append(run.info.run_id)

    parent_id = record.get("parent_run_id") or ""
    parent = _get_run_or_none(client, parent_id)
    if parent is None or parent.info.experiment_id != experiment_id:
        studies = _find_runs(client, experiment_id, ROLE_TAG, "study")
        parent_id = studies[0].info.run_id if studies else ""

    tags = dict(record.get("tags") or {})
    tags.pop(PARENT_TAG, None)
    tags.update({SPOOL_ID_TAG: spool_id, REPLAY_OF_TAG: spool_id})
    if not tags.get(UPSTREAM_RUN_TAG) and runs.get(tags.get(UPSTREAM_SPOOL_TAG, "")):
        tags[UPSTREAM_RUN_TAG] = runs[tags[UPSTREAM_SPOOL_TAG]]
    if parent_id:
        tags[PARENT_TAG] = parent_id
    if record.get("run_id"):
        tags[REPLACES_TAG] = record["run_id"]
    run = client.create_run(
        experiment_id, start_time=record.get("start_time"), tags=tags, run_name=record.get("run_name")
    )
    new_id = run.info.run_id
    metrics = record.get("metrics") or []
    for batch_metrics, params, batch_tags in batches(metrics, record.get("params") or {}, {}):
        log_batch(client, new_id, batch_metrics, params, batch_tags)
    client.set_terminated(new_id, status=record.get("status") or "FINISHED", end_time=record.get("end_time"))
    for old_id in [*stale, *([record["run_id"]] if partial is not None else [])]:
        _supersede(client, old_id, new_id)
    return len(metrics), new_id
