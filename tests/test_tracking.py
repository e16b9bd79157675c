"""pruneshot.runtime.tracking and .spool against real MLflow: a SQLite store, a dead port and a live `mlflow server`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import free_port
from mlflow.tracking import MlflowClient

from pruneshot.runtime import mlflow_client, tracking
from pruneshot.runtime import spool as spooling
from pruneshot.runtime.mlflow_client import resolve_tracking_uri
from pruneshot.runtime.spool import sync_spool
from pruneshot.runtime.tracking import JobRun, init_study

EPOCHS = 4


def _spool_files(spool_dir: Path) -> list[Path]:
    return sorted(spool_dir.glob("*.json"))


def _metric_count(client: MlflowClient, run_id: str) -> int:
    keys = client.get_run(run_id).data.metrics
    return sum(len(client.get_metric_history(run_id, key)) for key in keys)


def _train(job: JobRun, epochs: int = EPOCHS, offset: float = 0.0) -> None:
    for epoch in range(epochs):
        job.log_metrics({"loss": offset + 1.0 / (epoch + 1), "acc": offset + epoch / 10}, step=epoch)


@pytest.fixture(scope="module")
def sqlite_study(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    project = tmp_path_factory.mktemp("project")
    uri = resolve_tracking_uri(None, project)
    return init_study(uri, "study-sqlite", {"study": "unit", "config_sha256": "abc"})


# --------------------------------------------------------------------------- URI


def test_resolve_tracking_uri_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    default = resolve_tracking_uri(None, tmp_path)
    assert default == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert default.startswith("sqlite:////")  # absolute path
    assert resolve_tracking_uri("", tmp_path) == default

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env-host:5000")
    assert resolve_tracking_uri(None, tmp_path) == "http://env-host:5000"
    assert resolve_tracking_uri("http://config-host:5000", tmp_path) == "http://config-host:5000"
    # a relative SQLite path is anchored at the project directory
    assert resolve_tracking_uri("sqlite:///db/m.db", tmp_path) == f"sqlite:///{tmp_path.resolve()}/db/m.db"


def test_configure_timeouts_bounds_retries_without_overriding(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in mlflow_client.HTTP_ENV_DEFAULTS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    mlflow_client.configure_timeouts()
    assert int(os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]) <= 2
    assert int(os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"]) <= 2
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "3"  # the user's value wins


# --------------------------------------------------------------------------- SQLite


def test_job_runs_are_nested_with_params_tags_and_history(sqlite_study: dict[str, str], tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    client = MlflowClient(sqlite_study["tracking_uri"])
    run_ids = []
    for seed in (0, 1):
        tags = {"rule": "train", "wildcards.method": "magnitude", "seed": str(seed), "upstream_run_id": "up"}
        params = {"lr": 0.01, "seed": seed, "grid": {"sparsity": [0.5, 0.9]}, "long": "x" * 7000}
        with JobRun(
            sqlite_study,
            f"train/magnitude/{seed}",
            tags=tags,
            params=params,
            spool_dir=spool,
            flush_seconds=0,
        ) as job:
            assert job.run_id is not None
            _train(job, offset=seed)
            # flush_seconds=0: metrics are already visible while the job runs
            assert len(client.get_metric_history(job.run_id, "loss")) == EPOCHS
            job.set_tags({"pruneshot.note": "late tag"})
        run_ids.append(job.run_id)

    assert _spool_files(spool) == []  # nothing failed: nothing spooled
    for seed, run_id in enumerate(run_ids):
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert run.info.experiment_id == sqlite_study["experiment_id"]
        assert run.info.run_name == f"train/magnitude/{seed}"
        assert run.data.tags["mlflow.parentRunId"] == sqlite_study["parent_run_id"]
        assert run.data.tags["rule"] == "train"
        assert run.data.tags["seed"] == str(seed)
        assert run.data.tags["upstream_run_id"] == "up"
        assert run.data.tags["pruneshot.note"] == "late tag"
        assert run.data.params["lr"] == "0.01"
        assert json.loads(run.data.params["grid"]) == {"sparsity": [0.5, 0.9]}
        assert run.data.params["long"] == "x" * mlflow_client.MAX_PARAM_VALUE  # truncated, not crashed
        history = sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.step)
        assert [m.step for m in history] == list(range(EPOCHS))
        assert [m.value for m in history] == pytest.approx([seed + 1.0 / (e + 1) for e in range(EPOCHS)])
        acc_steps = sorted(m.step for m in client.get_metric_history(run_id, "acc"))
        assert acc_steps == list(range(EPOCHS))

    parent = client.get_run(sqlite_study["parent_run_id"])
    assert parent.info.run_name == "study-sqlite"
    assert parent.data.tags["config_sha256"] == "abc"
    children = client.search_runs(
        [sqlite_study["experiment_id"]], f"tags.`mlflow.parentRunId` = '{sqlite_study['parent_run_id']}'"
    )
    assert set(run_ids) <= {r.info.run_id for r in children}


def test_buffered_metrics_are_chunked_at_exit(sqlite_study: dict[str, str], tmp_path: Path) -> None:
    client = MlflowClient(sqlite_study["tracking_uri"])
    with JobRun(sqlite_study, "many", tags={}, params={}, spool_dir=tmp_path) as job:
        for step in range(1200):  # 2400 values: more than one log_batch allows
            job.log_metrics({"a": step, "b": -step}, step=step)
        assert client.get_metric_history(job.run_id, "a") == []  # still buffered (flush_seconds=30)
    assert _metric_count(client, job.run_id) == 2400
    assert _spool_files(tmp_path) == []


def test_failing_job_propagates_and_marks_run_failed(sqlite_study: dict[str, str], tmp_path: Path) -> None:
    job = JobRun(sqlite_study, "boom", tags={"rule": "train"}, params={"lr": 1}, spool_dir=tmp_path)
    with pytest.raises(ZeroDivisionError), job:
        job.log_metrics({"loss": 3.0}, step=0)
        _ = 1 / 0
    client = MlflowClient(sqlite_study["tracking_uri"])
    run = client.get_run(job.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["pruneshot.exception"].startswith("ZeroDivisionError")
    assert [m.value for m in client.get_metric_history(job.run_id, "loss")] == [3.0]
    assert _spool_files(tmp_path) == []


def test_over_budget_run_is_spooled_and_replay_supersedes_partial(sqlite_study: dict[str, str], tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    client = MlflowClient(sqlite_study["tracking_uri"])
    with JobRun(sqlite_study, "slow", tags={"rule": "eval"}, params={"k": 5}, spool_dir=spool, flush_seconds=0) as job:
        assert job.run_id is not None and not job.offline
        job.time_budget_s = 0.0  # the store "became slow": the next call spends the budget
        _train(job)
        assert job.offline
    partial_id = job.run_id
    # the first flush went through, then nothing more was sent: the partial run stays RUNNING
    assert client.get_run(partial_id).info.status == "RUNNING"
    assert _metric_count(client, partial_id) == 2
    [spool_file] = _spool_files(spool)
    record = json.loads(spool_file.read_text())
    assert record["run_id"] == partial_id
    assert record["status"] == "FINISHED"
    assert len(record["metrics"]) == 2 * EPOCHS
    assert record["params"] == {"k": "5"}
    assert any("time budget" in e for e in record["errors"])

    counts = sync_spool(spool)
    assert counts == {"records": 1, "synced": 1, "failed": 0, "metrics": 2 * EPOCHS}
    assert _spool_files(spool) == []
    assert (spool / "synced" / spool_file.name).is_file()

    partial = client.get_run(partial_id)
    new_id = partial.data.tags["pruneshot.superseded_by"]
    assert partial.info.status == "FAILED"
    new = client.get_run(new_id)
    assert new.info.status == "FINISHED"
    assert new.info.run_name == "slow"
    assert new.data.tags["mlflow.parentRunId"] == sqlite_study["parent_run_id"]
    assert new.data.tags["pruneshot.replaces_run_id"] == partial_id
    assert new.data.params == {"k": "5"}
    assert _metric_count(client, new_id) == 2 * EPOCHS
    assert sync_spool(spool) == {"records": 0, "synced": 0, "failed": 0, "metrics": 0}


def test_bad_record_does_not_block_others(sqlite_study: dict[str, str], tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    dead = dict(sqlite_study, tracking_uri=f"http://127.0.0.1:{free_port()}")
    with JobRun(dead, "offline", tags={}, params={}, spool_dir=spool) as job:
        _train(job, epochs=2)
    (spool / "corrupt.json").write_text("{not json")
    counts = sync_spool(spool, tracking_uri=sqlite_study["tracking_uri"])
    assert counts == {"records": 2, "synced": 1, "failed": 1, "metrics": 4}
    assert [p.name for p in _spool_files(spool)] == ["corrupt.json"]  # kept for inspection


def test_missing_sqlite_database_is_not_created_by_a_job(tmp_path: Path) -> None:
    db = tmp_path / "absent" / "mlflow.db"
    study = {"tracking_uri": f"sqlite:///{db}", "experiment_name": "x", "experiment_id": "1"}
    with JobRun(study, "j", tags={}, params={"a": 1}, spool_dir=tmp_path / "spool") as job:
        job.log_metrics({"loss": 1.0}, step=0)
    assert job.offline and job.run_id is None
    assert not db.exists()
    [spool_file] = _spool_files(tmp_path / "spool")
    assert json.loads(spool_file.read_text())["metrics"][0]["value"] == 1.0


def test_spool_record_layout_and_unwritable_spool(tmp_path: Path) -> None:
    """An offline run's record carries the spool format; a spool that cannot be written loses
    the record (logged), never the job."""
    study = {"tracking_uri": f"sqlite:///{tmp_path / 'absent.db'}", "experiment_name": "x", "experiment_id": "1"}
    with JobRun(study, "a/b c", tags={}, params={}, spool_dir=tmp_path / "spool") as job:
        job.log_metrics({"loss": 2.0}, step=1)
    assert job.spool_path == tmp_path / "spool" / f"a_b_c-{job.spool_id}.json"
    record = json.loads(job.spool_path.read_text())
    assert record["format"] == spooling.SPOOL_FORMAT
    assert record["spool_id"] == job.spool_id and record["run_name"] == "a/b c"
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    with JobRun(study, "j", tags={}, params={}, spool_dir=blocked) as job:
        pass
    assert job.offline and job.spool_path is None
    assert tracking.write_record(blocked, "j", "id", {}) is None


# --------------------------------------------------------------------------- HTTP server


def test_unreachable_server_spools_then_syncs_to_live_server(mlflow_server: str, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    dead_uri = f"http://127.0.0.1:{free_port()}"
    study = {
        "tracking_uri": dead_uri,
        "experiment_name": "study-http",
        "experiment_id": "1",
        "parent_run_id": "0123456789abcdef0123456789abcdef",
    }
    tags = {"rule": "finetune", "git_commit": "deadbeef", "git_dirty": "0"}
    with JobRun(study, "finetune/a", tags=tags, params={"epochs": EPOCHS}, spool_dir=spool) as job:
        _train(job)
    assert job.run_id is None
    assert job.status == "FINISHED"
    [spool_file] = _spool_files(spool)
    record = json.loads(spool_file.read_text())
    assert record["tracking_uri"] == dead_uri
    assert record["run_id"] is None
    assert record["tags"]["rule"] == "finetune"
    assert len(record["metrics"]) == 2 * EPOCHS
    assert sorted((m["key"], m["step"]) for m in record["metrics"]) == sorted(
        (k, s) for k in ("acc", "loss") for s in range(EPOCHS)
    )
    assert all(isinstance(m["timestamp"], int) for m in record["metrics"])

    live = init_study(mlflow_server, "study-http", {"study": "http"})
    counts = sync_spool(spool, tracking_uri=mlflow_server)
    assert counts == {"records": 1, "synced": 1, "failed": 0, "metrics": len(record["metrics"])}

    client = MlflowClient(mlflow_server)
    [run] = client.search_runs([live["experiment_id"]], "attributes.run_name = 'finetune/a'")
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == live["parent_run_id"]
    assert run.data.tags["git_commit"] == "deadbeef"
    assert run.data.params == {"epochs": str(EPOCHS)}
    assert _metric_count(client, run.info.run_id) == len(record["metrics"])
    loss = sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)
    assert [m.step for m in loss] == list(range(EPOCHS))
    assert [m.timestamp for m in loss] == sorted(m["timestamp"] for m in record["metrics"] if m["key"] == "loss")

    assert sync_spool(spool, tracking_uri=mlflow_server)["synced"] == 0
    assert len(client.search_runs([live["experiment_id"]], "attributes.run_name = 'finetune/a'")) == 1


def test_job_run_against_live_server(mlflow_server: str, tmp_path: Path) -> None:
    study = init_study(mlflow_server, "study-http-live", {})
    with JobRun(study, "live", tags={"rule": "prune"}, params={"p": 0.5}, spool_dir=tmp_path) as job:
        _train(job)
    client = MlflowClient(mlflow_server)
    run = client.get_run(job.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == study["parent_run_id"]
    assert _metric_count(client, job.run_id) == 2 * EPOCHS
    assert _spool_files(tmp_path) == []


# --------------------------------------------------------------------------- deferred (mlflow.live: false)


def test_deferred_run_imports_no_mlflow_and_records_everything(sqlite_study: dict[str, str], tmp_path: Path) -> None:
    """A deferred JobRun in a fresh interpreter: no mlflow module loaded, one complete record."""
    import subprocess
    import sys

    spool = tmp_path / "spool"
    code = f"""
import json, sys
from pathlib import Path
from pruneshot.runtime.tracking import JobRun
study = json.loads({json.dumps(json.dumps(sqlite_study))})
with JobRun(study, "pretrain-r0", tags={{"pruneshot.rule": "pretrain"}}, params={{"lr": 0.05}},
            spool_dir=Path({str(spool)!r}), live=False) as job:
    for epoch in range(3):
        job.log_metrics({{"val_acc": epoch / 10}}, step=epoch)
    job.set_tags({{"pruneshot.status": "ok"}})
assert job.run_id is None and job.deferred and not job.offline
print(sorted(m for m in sys.modules if m == "mlflow" or m.startswith("mlflow.")))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    [path] = _spool_files(spool)
    record = json.loads(path.read_text())
    assert record["deferred"] is True and record["run_id"] is None and record["errors"] == []
    assert record["status"] == "FINISHED" and record["params"] == {"lr": "0.05"}
    assert [m["value"] for m in record["metrics"]] == [0.0, 0.1, 0.2]
    assert record["tags"]["pruneshot.status"] == "ok"


def test_sync_logs_deferred_runs_upstream_first_with_upstream_run_ids(sqlite_study: dict[str, str],
                                                                     tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    with JobRun(sqlite_study, "pretrain", tags={}, params={"epochs": 3}, spool_dir=spool, live=False) as pre:
        _train(pre, epochs=3)
    up = {mlflow_client.UPSTREAM_SPOOL_TAG: pre.spool_id, mlflow_client.UPSTREAM_RUN_TAG: ""}
    children = []
    for name in ("search-b", "search-a"):  # file names sort before "pretrain": start time decides
        with JobRun(sqlite_study, name, tags=up, params={}, spool_dir=spool, live=False) as job:
            _train(job, epochs=2)
        children.append(job)
    # the upstream record's file sorts last; replay must still log it first
    assert sorted(p.name.split("-")[0] for p in _spool_files(spool)) == ["pretrain", "search", "search"]

    counts = sync_spool(spool)
    assert counts == {"records": 3, "synced": 3, "failed": 0, "metrics": 2 * (3 + 2 + 2)}
    runs = spooling.logged_runs(spool)
    assert set(runs) == {pre.spool_id, *(c.spool_id for c in children)}
    client = MlflowClient(sqlite_study["tracking_uri"])
    pre_run = client.get_run(runs[pre.spool_id])
    assert pre_run.info.status == "FINISHED" and pre_run.data.params == {"epochs": "3"}
    assert pre_run.data.tags["mlflow.parentRunId"] == sqlite_study["parent_run_id"]
    assert _metric_count(client, pre_run.info.run_id) == 6
    for child in children:
        run = client.get_run(runs[child.spool_id])
        assert run.data.tags[mlflow_client.UPSTREAM_RUN_TAG] == pre_run.info.run_id
        assert run.data.tags[mlflow_client.SPOOL_ID_TAG] == child.spool_id
    # idempotent: nothing left, the mapping unchanged
    assert sync_spool(spool) == {"records": 0, "synced": 0, "failed": 0, "metrics": 0}
    assert spooling.logged_runs(spool) == runs


# --------------------------------------------------------------------------- the study's parent run


def test_the_study_opens_as_a_training_experiment_with_its_config_and_ends_with_its_results(tmp_path: Path) -> None:
    """Issue 15: the UI opened on MLflow 3's GenAI overview, and the parent run was empty and closed at
    once. Now: a model-training experiment; the parent run holds the flattened config while the study
    runs, then its summary metrics, the report as an artifact and a status that reflects the study."""
    from pruneshot.runtime.mlflow_client import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG
    from pruneshot.runtime.tracking import finish_study, flatten

    uri = resolve_tracking_uri(None, tmp_path)
    config = {"study": {"name": "s", "replicates": 3}, "transfer": {"lr": 0.01, "arms": ["finetune", "reinit"],
                                                                     "select": None}}
    assert flatten(config) == {"study.name": "s", "study.replicates": 3, "transfer.lr": 0.01,
                               "transfer.arms": ["finetune", "reinit"], "transfer.select": None}
    study = init_study(uri, "parent-test", {"pruneshot.config_sha256": "abc"}, params=flatten(config))
    client = MlflowClient(uri)
    assert client.get_experiment(study["experiment_id"]).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    parent = client.get_run(study["parent_run_id"])
    assert parent.info.status == "RUNNING"
    assert parent.data.params["transfer.lr"] == "0.01" and parent.data.params["study.replicates"] == "3"
    assert parent.data.tags["pruneshot.config_sha256"] == "abc"
    report = tmp_path / "index.html"
    report.write_text("<html>report</html>")
    finish_study(study, {"acc.dense.b1.1shot.finetune": 0.65, "rows_failed": 0.0}, [report], "FINISHED")
    parent = client.get_run(study["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.metrics["acc.dense.b1.1shot.finetune"] == 0.65
    assert [a.path for a in client.list_artifacts(study["parent_run_id"])] == ["index.html"]
    # a second study in the same store keeps a kind someone chose in the UI
    client.set_experiment_tag(study["experiment_id"], EXPERIMENT_KIND_TAG, "finetuning")
    init_study(uri, "parent-test", {})
    assert client.get_experiment(study["experiment_id"]).tags[EXPERIMENT_KIND_TAG] == "finetuning"


def test_study_status_reflects_failed_rows_and_gates(tmp_path: Path) -> None:
    import json

    import pandas as pd

    from pruneshot.stages.tracking import study_metrics

    rows = [{"method": "dense", "requested_budget": 1.0, "shots": 1, "arm": "finetune", "acc_mean": 0.6,
             "status": "ok", "budget_missed": False},
            {"method": "dense", "requested_budget": 1.0, "shots": 1, "arm": "finetune", "acc_mean": 0.7,
             "status": "ok", "budget_missed": False}]
    csv = tmp_path / "results.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    gates = tmp_path / "gates.json"
    gates.write_text(json.dumps({"gates": {"pretraining_helps": {"status": "passed"}}, "failed": [],
                                 "not_evaluated": []}))
    metrics, status, reasons = study_metrics(csv, gates)
    assert status == "FINISHED" and not reasons
    assert metrics["acc.dense.b1.1shot.finetune"] == pytest.approx(0.65)  # mean over replicates
    assert metrics["gate.pretraining_helps"] == 1.0 and metrics["rows_failed"] == 0.0
    pd.DataFrame([*rows, {**rows[0], "method": "random", "status": "failed", "acc_mean": float("nan")}]).to_csv(
        csv, index=False)
    gates.write_text(json.dumps({"gates": {"pretraining_helps": {"status": "failed"}}, "failed": ["pretraining_helps"],
                                 "not_evaluated": []}))
    metrics, status, reasons = study_metrics(csv, gates)
    assert status == "FAILED" and reasons == ["1 failed row(s)", "sanity gate pretraining_helps did not pass"]
    assert metrics["gate.pretraining_helps"] == 0.0 and metrics["rows_failed"] == 1.0


def test_ui_hint_points_at_the_runs_page_of_the_study_s_experiment():
    from pruneshot.runtime.mlflow_client import ui_hint

    local = ui_hint({"tracking_uri": "sqlite:////p/mlflow.db", "experiment_name": "s", "experiment_id": "7"})
    assert local == ("mlflow: experiment 's': mlflow ui --backend-store-uri sqlite:////p/mlflow.db --port 5000, "
                     "then http://127.0.0.1:5000/#/experiments/7/runs")
    server = ui_hint({"tracking_uri": "http://127.0.0.1:5001/", "experiment_name": "s", "experiment_id": "7"})
    assert server == "mlflow: experiment 's': http://127.0.0.1:5001/#/experiments/7/runs"
