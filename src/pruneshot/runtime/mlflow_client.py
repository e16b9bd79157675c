"""The MLflow client as pruneshot uses it: bounded HTTP timeouts, the tracking URI, MLflow's limits on
keys, values and batch sizes, pruneshot's run tags, batched logging and the study's experiment (a
model-training experiment for the UI). Shared by a job's run (:mod:`pruneshot.runtime.tracking`) and
the spool replay (:mod:`pruneshot.runtime.spool`); importing it never imports MLflow."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

_log = logging.getLogger(__name__)

#: Bounded HTTP behaviour (set with ``os.environ.setdefault``, so a user's values win).
#: With 1 retry a refused connection fails in milliseconds; a server that accepts
#: but never answers costs 2 x 5 s.
HTTP_ENV_DEFAULTS: dict[str, str] = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
}

# MLflow 3.x limits (mlflow.utils.validation).
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
MAX_KEY = 250
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_TAGS_PER_BATCH = 100
_MAX_BATCH_CHARS = 500_000  # stays well below MLflow's 1 MB request limit

PARENT_TAG = "mlflow.parentRunId"
ROLE_TAG = "pruneshot.role"
SPOOL_ID_TAG = "pruneshot.spool_id"
REPLAY_OF_TAG = "pruneshot.replay_of"
UPSTREAM_RUN_TAG = "pruneshot.upstream_run_id"
UPSTREAM_SPOOL_TAG = "pruneshot.upstream_spool_id"
REPLACES_TAG = "pruneshot.replaces_run_id"
SUPERSEDED_TAG = "pruneshot.superseded_by"
EXCEPTION_TAG = "pruneshot.exception"

_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")


# --------------------------------------------------------------------------- configuration


def resolve_tracking_uri(configured: str | None, project_dir: Path) -> str:
    """Tracking URI: ``configured`` > ``MLFLOW_TRACKING_URI`` > ``sqlite:///<abs project_dir>/mlflow.db``.

    A relative SQLite path (``sqlite:///mlflow.db``) is made absolute against
    ``project_dir`` so every job, whatever its working directory, uses one file.
    """
    project_dir = Path(project_dir).resolve()
    for candidate in (configured, os.environ.get("MLFLOW_TRACKING_URI")):
        if candidate and candidate.strip():
            uri = candidate.strip()
            path = sqlite_path(uri)
            if path is not None and not path.is_absolute() and str(path) != ":memory:":
                uri = f"sqlite:///{project_dir / path}"
            return uri
    return f"sqlite:///{project_dir}/mlflow.db"


def configure_timeouts() -> None:
    """Bound MLflow's HTTP retries and timeouts to seconds (``os.environ.setdefault``)."""
    for name, value in HTTP_ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)


def sqlite_path(uri: str) -> Path | None:
    """Filesystem path of a ``sqlite:///`` URI (absolute when written ``sqlite:////abs``), else None."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///").split("?", 1)[0])


def client(tracking_uri: str) -> MlflowClient:
    configure_timeouts()
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


# --------------------------------------------------------------------------- value hygiene


def clean_key(key: object) -> str:
    """A key MLflow accepts: allowed characters only, no leading slash, at most 250 chars."""
    text = _BAD_KEY_CHARS.sub("_", str(key)).lstrip("/") or "_"
    return text[:MAX_KEY]


def _stringify(value: object) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping | list | tuple):
        try:
            return json.dumps(value, sort_keys=True, default=str)
        except (TypeError, ValueError):  # e.g. non-string dict keys
            pass
    return str(value)


def clean_params(params: Mapping[str, object]) -> dict[str, str]:
    out = {}
    for key, value in params.items():
        text = _stringify(value)
        if len(text) > MAX_PARAM_VALUE:
            _log.warning("MLflow param %r truncated from %d to %d chars", key, len(text), MAX_PARAM_VALUE)
            text = text[:MAX_PARAM_VALUE]
        out[clean_key(key)] = text
    return out


def clean_tags(tags: Mapping[str, object]) -> dict[str, str]:
    return {clean_key(k): _stringify(v)[:MAX_TAG_VALUE] for k, v in tags.items()}


def now_ms() -> int:
    return int(time.time() * 1000)


def chunk_pairs(items: Mapping[str, str]) -> Iterator[list[tuple[str, str]]]:
    """Key/value pairs in chunks of at most 100 items and about 500 kB."""
    chunk: list[tuple[str, str]] = []
    size = 0
    for item in items.items():
        item_size = len(item[0]) + len(item[1]) + 16
        if chunk and (len(chunk) >= MAX_PARAMS_TAGS_PER_BATCH or size + item_size > _MAX_BATCH_CHARS):
            yield chunk
            chunk, size = [], 0
        chunk.append(item)
        size += item_size
    if chunk:
        yield chunk


def batches(
    metrics: Sequence[dict[str, Any]], params: Mapping[str, str], tags: Mapping[str, str]
) -> Iterator[tuple[list[dict[str, Any]], list[tuple[str, str]], list[tuple[str, str]]]]:
    """(metrics, params, tags) arguments for log_batch calls within MLflow's limits."""
    for chunk in chunk_pairs(params):
        yield [], chunk, []
    for chunk in chunk_pairs(tags):
        yield [], [], chunk
    for start in range(0, len(metrics), MAX_METRICS_PER_BATCH):
        yield list(metrics[start : start + MAX_METRICS_PER_BATCH]), [], []


def log_batch(
    client: MlflowClient,
    run_id: str,
    metrics: Sequence[dict[str, Any]],
    params: Sequence[tuple[str, str]],
    tags: Sequence[tuple[str, str]],
) -> None:
    from mlflow.entities import Metric, Param, RunTag

    client.log_batch(
        run_id,
        metrics=[Metric(m["key"], m["value"], m["timestamp"], m["step"]) for m in metrics],
        params=[Param(k, v) for k, v in params],
        tags=[RunTag(k, v) for k, v in tags],
        synchronous=True,
    )


#: Experiment tag the MLflow 3 UI reads to choose its view: without it an experiment opens on the GenAI
#: overview (traces, token usage); this kind opens it on its runs, as a model-training experiment.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def ensure_experiment(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location,
                                            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except Exception:
            experiment = client.get_experiment_by_name(name)  # created concurrently?
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        _log.warning("MLflow experiment %r was deleted; restoring it", name)
        client.restore_experiment(experiment.experiment_id)
    if EXPERIMENT_KIND_TAG not in experiment.tags:  # a kind someone chose in the UI is kept
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment.experiment_id


def ui_hint(study: Mapping[str, str]) -> str:
    """Where a person sees the study's runs: the MLflow UI's runs page of its experiment (``study``: the
    ``study.json`` that :func:`pruneshot.runtime.tracking.init_study` wrote). The experiment carries
    :data:`EXPERIMENT_KIND`, yet MLflow 3.17's UI opens an experiment on the GenAI overview whatever its
    kind (its sidebar toggle lives in the browser's storage, mlflow/mlflow#24498): the runs page URL
    goes straight to the study's parent run and its nested job runs."""
    uri, exp = str(study.get("tracking_uri", "")), study.get("experiment_id", "?")
    page = f"#/experiments/{exp}/runs"
    if uri.startswith(("http://", "https://")):
        return f"mlflow: experiment {study.get('experiment_name')!r}: {uri.rstrip('/')}/{page}"
    return (f"mlflow: experiment {study.get('experiment_name')!r}: mlflow ui --backend-store-uri {uri} --port 5000, "
            f"then http://127.0.0.1:5000/{page}")

