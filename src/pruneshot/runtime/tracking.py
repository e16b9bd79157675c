"""MLflow tracking that never stalls or kills a job.

Layout of a study in MLflow:

* ``init_study`` runs once, in one rule before the fan-out: it creates the tracking
  database (SQLite) or reaches the server, creates the experiment if missing and
  one *parent run* for the study. It may raise: failing loudly there is right.
* Every job opens a ``JobRun``: one MLflow run nested under the parent
  (tag ``mlflow.parentRunId``) with params, tags and buffered per-epoch metrics.
  *Live* (``mlflow.live: true``), every MLflow call is wrapped: an exception or a
  spent time budget switches the job to *offline* mode (no further MLflow calls)
  and, at exit, one JSON spool record with everything needed to replay the whole
  run is written atomically. *Deferred* (the default), the job never imports
  MLflow and always writes that record (``"deferred": true``).
* :func:`pruneshot.runtime.spool.sync_spool` (a rule after all jobs) replays spool
  records; the spool format and the replay policy are described there.

HTTP retries and timeouts are bounded by ``configure_timeouts`` (environment
variables read by MLflow on every request); a "database is locked" SQLite
statement gives up after pysqlite's 5 s busy timeout, and every job's total time
in MLflow is capped by ``time_budget_s``. Metrics files remain the source of truth.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from pruneshot.io import write_json
from pruneshot.runtime import mlflow_client as mc
from pruneshot.runtime.mlflow_client import (
    EXCEPTION_TAG,
    MAX_TAG_VALUE,
    PARENT_TAG,
    ROLE_TAG,
    SPOOL_ID_TAG,
    configure_timeouts,
)

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

_log = logging.getLogger(__name__)
_T = TypeVar("_T")

SPOOL_FORMAT = "pruneshot.mlflow-spool/1"
_BAD_FILE_CHARS = re.compile(r"[^A-Za-z0-9_.-]+")


# --------------------------------------------------------------------------- study


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, object]:
    """A nested config as dotted keys (``transfer.select.lr``); lists and scalars are the leaves."""
    out: dict[str, object] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def init_study(tracking_uri: str, experiment_name: str, tags: dict[str, str],
               params: Mapping[str, object] | None = None) -> dict[str, str]:
    """Create the store/experiment if missing (a model-training experiment for the UI) and the study's
    parent run named ``experiment_name``, RUNNING until :func:`finish_study` ends it, holding ``params``
    (the study's flattened config) and ``tags`` (commit, config hash).

    Runs once, before the fan-out; errors propagate. Returns ``tracking_uri``,
    ``experiment_name``, ``experiment_id`` and ``parent_run_id`` (all strings), the
    ``study`` dict every ``JobRun`` takes.
    """
    db_path = mc.sqlite_path(tracking_uri)
    artifact_location = None
    if db_path is not None:
        db_path.parent.mkdir(parents=True, exist_ok=True)
        artifact_location = (db_path.parent.resolve() / "mlartifacts").as_uri()
    client = mc.client(tracking_uri)
    experiment_id = mc.ensure_experiment(client, experiment_name, artifact_location)
    run_tags = mc.clean_tags({**tags, ROLE_TAG: "study"})
    run = client.create_run(experiment_id, tags=run_tags, run_name=experiment_name)
    for chunk in mc.chunk_pairs(mc.clean_params(params or {})):
        mc.log_batch(client, run.info.run_id, [], chunk, [])
    return {
        "tracking_uri": tracking_uri,
        "experiment_name": experiment_name,
        "experiment_id": str(experiment_id),
        "parent_run_id": run.info.run_id,
    }


def finish_study(study: Mapping[str, str], metrics: Mapping[str, float], artifacts: Sequence[Path],
                 status: str, tags: Mapping[str, str] | None = None) -> None:
    """End the study's parent run: set ``tags`` (e.g. the final commit), log the study's summary ``metrics``
    and ``artifacts`` (files, e.g. the report and the results table) and set its ``status`` (FINISHED, or
    FAILED when cells failed or a sanity gate did not pass). Errors propagate."""
    client = mc.client(study["tracking_uri"])
    run_id = study["parent_run_id"]
    for chunk in mc.chunk_pairs(mc.clean_tags(tags or {})):
        mc.log_batch(client, run_id, [], [], chunk)
    now = mc.now_ms()
    rows = [{"key": mc.clean_key(k), "value": float(v), "timestamp": now, "step": 0} for k, v in metrics.items()]
    for i in range(0, len(rows), 1000):
        mc.log_batch(client, run_id, rows[i : i + 1000], [], [])
    for path in artifacts:
        client.log_artifact(run_id, str(path))
    client.set_terminated(run_id, status=status)


# --------------------------------------------------------------------------- job run


class JobRun:
    """One job's MLflow run; a context manager that never lets MLflow stall or fail the job.

    On enter it creates the run (nested under ``study["parent_run_id"]``) and logs
    params and tags. Metrics are buffered and sent with ``log_batch`` once
    ``flush_seconds`` have passed since the last flush, on ``set_tags`` and at exit.
    Any MLflow exception, or more than ``time_budget_s`` spent in MLflow calls,
    switches to offline mode (no further MLflow calls); at exit one spool record is
    then written to ``spool_dir`` for ``sync_spool``. With ``live=False`` nothing is sent and the
    record is always written (``spool_id`` is then the run's only handle until ``sync_spool``).
    The job's own exception always propagates; the run ends FINISHED, FAILED (exception) or KILLED (KeyboardInterrupt).
    """

    def __init__(
        self,
        study: dict[str, str],
        run_name: str,
        *,
        tags: dict[str, str],
        params: dict[str, object],
        spool_dir: Path,
        flush_seconds: float = 30.0,
        time_budget_s: float = 20.0,
        live: bool = True,
    ) -> None:
        self.study = dict(study)
        self.live = live
        self.run_name = run_name
        self.spool_dir = Path(spool_dir)
        self.flush_seconds = flush_seconds
        self.time_budget_s = time_budget_s
        self.spool_id = uuid.uuid4().hex
        self.spool_path: Path | None = None
        self.errors: list[str] = []
        self.mlflow_seconds = 0.0
        self.status: str | None = None
        self._tags = mc.clean_tags({**tags, ROLE_TAG: "job"})
        self._tags.pop(PARENT_TAG, None)  # the parent comes from the study
        self._params = mc.clean_params(params)
        self._metrics: list[dict[str, Any]] = []
        self._n_sent = 0  # metrics[:_n_sent] are in MLflow
        self._unsent_tags: dict[str, str] = {}
        self._client: MlflowClient | None = None
        self._run_id: str | None = None
        self._offline = False
        self._over_budget = False
        self._complete = False
        self._start_ms = mc.now_ms()
        self._last_flush = time.monotonic()

    @property
    def run_id(self) -> str | None:
        """The MLflow run id, or None if the run could not be created."""
        return self._run_id

    @property
    def deferred(self) -> bool:
        """True when the run is only recorded (``live=False``), for ``sync_spool`` to log."""
        return not self.live

    @property
    def offline(self) -> bool:
        """True once MLflow failed or the time budget ran out: nothing more is sent."""
        return self._offline

    # ------------------------------------------------------------------ context manager

    def __enter__(self) -> JobRun:
        self._start_ms = mc.now_ms()
        self._last_flush = time.monotonic()
        if not self.live:  # recorded only: no MLflow import, no call; the record is written at exit
            return self
        experiment_id = self.study.get("experiment_id") or ""
        tracking_uri = self.study.get("tracking_uri") or ""
        db_path = mc.sqlite_path(tracking_uri)
        if not experiment_id or not tracking_uri:
            self._fail("study has no tracking_uri/experiment_id (init_study did not run?)")
            return self
        if db_path is not None and not db_path.is_file():
            # never let many jobs race to create a fresh SQLite database
            self._fail(f"SQLite database {db_path} does not exist; init_study must create it first")
            return self
        try:  # importing mlflow is CPU work, not a stall: it does not count against the budget
            configure_timeouts()
            from mlflow.tracking import MlflowClient
        except Exception as exc:
            self._fail(f"import mlflow: {type(exc).__name__}: {exc}")
            return self
        self._client = self._call("client", lambda: MlflowClient(tracking_uri=tracking_uri))
        if self._client is None:
            return self
        create_tags = {**self._tags, SPOOL_ID_TAG: self.spool_id}
        if self.study.get("parent_run_id"):
            create_tags[PARENT_TAG] = self.study["parent_run_id"]
        run = self._call(
            "create_run",
            lambda: self._client.create_run(
                experiment_id, start_time=self._start_ms, tags=create_tags, run_name=self.run_name
            ),
        )
        if run is None:
            return self
        self._run_id = run.info.run_id
        for metrics, params, tags in mc.batches([], self._params, {}):
            if self._call("log_batch(params)", self._batch_sender(metrics, params, tags)) is None:
                break
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc_type is None:
                self.status = "FINISHED"
            elif issubclass(exc_type, KeyboardInterrupt):
                self.status = "KILLED"
            else:
                self.status = "FAILED"
            if exc is not None:
                self._tags[EXCEPTION_TAG] = f"{exc_type.__name__}: {exc}"[:MAX_TAG_VALUE]
                self._unsent_tags[EXCEPTION_TAG] = self._tags[EXCEPTION_TAG]
            self._flush()
            end_ms = mc.now_ms()
            if self._can_call():
                status = self.status
                done = self._call(
                    "set_terminated",
                    lambda: self._client.set_terminated(self._run_id, status=status, end_time=end_ms) or True,
                )
                self._complete = bool(done)  # all data reached MLflow, maybe over budget
            if not self.live or not self._complete or self.errors:
                self._write_spool(end_ms)
        except Exception:  # never let tracking replace or cause the job's outcome
            _log.exception("pruneshot.runtime.tracking: unexpected error while closing run %r", self.run_name)
        return None  # the job's exception, if any, propagates

    # ------------------------------------------------------------------ logging

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Buffer metric values (one timestamp, ``step`` or 0); flush if ``flush_seconds`` have passed."""
        timestamp = mc.now_ms()
        step_value = 0 if step is None else int(step)
        for key, value in metrics.items():
            try:
                number = float(value)
            except (TypeError, ValueError):
                _log.warning("MLflow metric %r=%r is not a number; not logged", key, value)
                continue
            self._metrics.append({"key": mc.clean_key(key), "value": number, "timestamp": timestamp,
                                  "step": step_value})
        if time.monotonic() - self._last_flush >= self.flush_seconds:
            self._flush()

    def set_tags(self, tags: dict[str, str]) -> None:
        """Add or overwrite tags; sent at once together with any buffered metrics."""
        cleaned = mc.clean_tags(tags)
        cleaned.pop(PARENT_TAG, None)
        self._tags.update(cleaned)
        self._unsent_tags.update(cleaned)
        self._flush()

    # ------------------------------------------------------------------ internals

    def _can_call(self) -> bool:
        return not self._offline and self._client is not None and self._run_id is not None

    def _fail(self, message: str) -> None:
        self.errors.append(message[:2000])
        if not self._offline:
            _log.warning(
                "MLflow unavailable for run %r (%s); continuing offline, data will be spooled to %s",
                self.run_name,
                message[:500],
                self.spool_dir,
            )
        self._offline = True

    def _call(self, what: str, fn: Callable[[], _T]) -> _T | None:
        """Run one MLflow operation; None on failure (then offline). Time counts against the budget."""
        if self._offline:
            return None
        start = time.monotonic()
        try:
            result = fn()
        except Exception as exc:
            self._fail(f"{what}: {type(exc).__name__}: {exc}")
            result = None
        finally:
            self.mlflow_seconds += time.monotonic() - start
        if self.mlflow_seconds > self.time_budget_s and not self._over_budget:
            self._over_budget = True
            self._fail(f"time budget exceeded: {self.mlflow_seconds:.1f} s in MLflow > {self.time_budget_s} s")
        return result

    def _batch_sender(
        self, metrics: list[dict[str, Any]], params: list[tuple[str, str]], tags: list[tuple[str, str]]
    ) -> Callable[[], bool]:
        client, run_id = self._client, self._run_id

        def send() -> bool:
            mc.log_batch(client, run_id, metrics, params, tags)
            return True

        return send

    def _flush(self) -> None:
        self._last_flush = time.monotonic()
        if not self._can_call():
            return
        pending = self._metrics[self._n_sent :]
        tags = dict(self._unsent_tags)
        for metrics, params, tag_items in mc.batches(pending, {}, tags):
            if self._call("log_batch", self._batch_sender(metrics, params, tag_items)) is None:
                return
            self._n_sent += len(metrics)
            for key, _ in tag_items:
                self._unsent_tags.pop(key, None)

    def _record(self, end_ms: int) -> dict[str, Any]:
        """Everything needed to replay this run (the spool record, less its format tag)."""
        return {
            "spool_id": self.spool_id,
            "tracking_uri": self.study.get("tracking_uri", ""),
            "experiment_name": self.study.get("experiment_name", ""),
            "experiment_id": self.study.get("experiment_id", ""),
            "parent_run_id": self.study.get("parent_run_id", ""),
            "run_name": self.run_name,
            "run_id": self._run_id,
            "status": self.status,
            "start_time": self._start_ms,
            "end_time": end_ms,
            "tags": self._tags,
            "params": self._params,
            "metrics": self._metrics,
            "complete": self._complete,
            "metrics_sent": self._n_sent,
            "errors": self.errors,
            "mlflow_seconds": round(self.mlflow_seconds, 3),
            "deferred": not self.live,
        }

    def _write_spool(self, end_ms: int) -> None:
        self.spool_path = write_record(self.spool_dir, self.run_name, self.spool_id, self._record(end_ms),
                                       quiet=not self.live)


def write_record(spool_dir: Path, run_name: str, spool_id: str, record: dict[str, Any],
                 quiet: bool = False) -> Path | None:
    """Write ``{"format": SPOOL_FORMAT, **record}`` atomically to ``<spool_dir>/<run name>-<spool id>.json``.

    Returns the path, or None (the record is logged instead) when it cannot be written: never raises
    for an unwritable spool.
    """
    record = {"format": SPOOL_FORMAT, **record}
    stem = _BAD_FILE_CHARS.sub("_", run_name).strip("._")[:80] or "run"
    path = Path(spool_dir) / f"{stem}-{spool_id}.json"
    try:
        write_json(path, record)  # temp file beside it + os.replace
    except Exception:
        _log.exception("could not write MLflow spool %s; record follows:\n%s", path, json.dumps(record))
        return None
    (_log.info if quiet else _log.warning)("MLflow data for run %r spooled to %s", run_name, path)
    return path
