"""The micro study against a real `mlflow server` (SQLite backend store, local artifact destination):
every run reads back with MlflowClient, and a server killed mid-run costs the jobs seconds, loses no
metric once `sync_tracking` replays the spool, and leaves the results and the report unchanged.

What is counted ("metric values"): the values of every metric history of a job's run in MLflow
(``get_metric_history`` per key, all steps). A job's expected values are rebuilt from its JSON
record under ``results/<study>/`` (the source of truth), exactly what the stage logs:

* pretrain (``results/pretrain/r{r}/metrics.json``): ``train_loss`` and ``val_acc`` at every epoch of
  ``history``, plus ``best_val_acc`` and ``seconds`` at step 0;
* search (``results/search/.../record.json``): ``search_seconds``, ``achieved_params``,
  ``achieved_flops`` and ``achieved_ratio`` at step 0 (the micro study has no method that logs
  per-step search metrics; dap would);
* transfer (``results/transfer/....json``): ``<arm>/episode_acc`` at every episode, for a
  target-side method ``achieved_ratio`` and ``adapt_seconds`` at every episode, and
  ``<arm>/acc_mean`` and ``<arm>/acc_ci95`` at step 0.

A job's MLflow data is its *effective* run: the replay of its spool record when there is one (a
partial run the job created before the server died is superseded), else its live run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import BIN, ROOT, MlflowServer, _env, copy_worktree, study_dir
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.integration

MICRO = ROOT / "tests/configs/micro.yaml"
TRACKED_RULES = ("pretrain", "search", "transfer", "budget_one")
#: A job's overhead is its benchmark wall time minus its own recorded work: interpreter start, imports
#: (torch, mlflow), data loading and MLflow, about 5-10 s per job on an idle 2-core machine. With the
#: server dead, a job's overhead may exceed the same job's overhead in the uninterrupted run by at most
#: this much (compared with the same job, so that load from other processes on a shared machine
#: cancels out); MLflow's default retries against a dead server would add about 4 minutes.
OVERHEAD_LIMIT_S = 15.0
#: Time a job spent in MLflow calls (its spool record's ``mlflow_seconds``, measured around every
#: call, retries and timeouts included) with the server dead.
MLFLOW_LIMIT_S = 5.0
#: The report sections computed from accuracies only (the cost detail has measured latencies).
REPORT_SECTIONS = ("results", "ranks", "comparisons", "failures")
RESULT_COLUMNS = ["row_id", "method", "requested_budget", "target", "shots", "arm", "replicate", "status",
                  "acc_mean", "acc_ci95", "acc_std", "n_episodes", "achieved_params", "params_ratio", "flops_ratio"]
PATTERNS = {
    "pretrain": re.compile(r"/pretrain/r(?P<replicate>\d+)/metrics\.json$"),
    "search": re.compile(r"/search/(?P<method>\w+)/b(?P<budget>[\d.]+)/r(?P<replicate>\d+)/record\.json$"),
    "transfer": re.compile(r"/transfer/(?P<target>\w+)/(?P<method>\w+)/b(?P<budget>[\d.]+)/"
                           r"(?P<shots>\d+)shot/r(?P<replicate>\d+)\.json$"),
    "budget_one": re.compile(r"/sanity/budget_one_r(?P<replicate>\d+)\.json$"),
}
RECORD_DIRS = {"budget_one": "sanity"}  # where a rule's records lie below the study root (default: the rule)

JobId = tuple[str, tuple[tuple[str, str], ...]]
Values = dict[tuple[str, int], float]


# --------------------------------------------------------------------------- helpers


def _workspace(path: Path, tracking_uri: str) -> Path:
    """A copy of this working tree running the micro study, tracked on ``tracking_uri``."""
    copy_worktree(path)
    cfg = yaml.safe_load(MICRO.read_text())
    assert "dap" not in cfg["methods"], "the expected search metrics below assume no per-step search metrics"
    cfg["mlflow"] = {"tracking_uri": tracking_uri, "live": True}  # live logging is what a dead server tests
    (path / "config/config.yaml").write_text(yaml.safe_dump(cfg))
    return path


def _snakemake(args: list[str]) -> list[str]:
    return [str(BIN / "snakemake"), "--cores", "2", *args]


def _run_env(**extra: str) -> dict[str, str]:
    return {**_env(), **extra}


def _check(proc: subprocess.CompletedProcess | subprocess.Popen, out: str) -> None:
    assert proc.returncode == 0, f"snakemake failed ({proc.returncode}):\n{out[-5000:]}"


def _expected(ws: Path) -> dict[JobId, Values]:
    """Every tracked job's metric values, rebuilt from its JSON record (see the module docstring)."""
    out: dict[JobId, Values] = {}
    for rule, pattern in PATTERNS.items():
        for path in sorted((study_dir(ws) / RECORD_DIRS.get(rule, rule)).rglob("*.json")):
            m = pattern.search(path.as_posix())
            if m is None:
                continue
            rec = json.loads(path.read_text())
            values: Values = {}
            if rule == "pretrain":
                for row in rec["history"]:
                    values[("train_loss", row["epoch"])] = row["train_loss"]
                    values[("val_acc", row["epoch"])] = row["val_acc"]
                values[("best_val_acc", 0)] = rec["best_val_acc"]
                values[("seconds", 0)] = rec["seconds"]
                if rec["bn_recalibration"]["applied"]:
                    values[("val_acc_recalibrated", 0)] = rec["bn_recalibration"]["source_val_acc_after"]
            elif rule == "budget_one":
                values[("budget_one_equal", 0)] = sum(m["equal"] for m in rec["methods"])
                values[("budget_one_checked", 0)] = len(rec["methods"])
            elif rule == "search" and rec["status"] == "ok":
                values[("search_seconds", 0)] = rec["search_seconds"]
                values[("achieved_params", 0)] = rec["achieved_params"]
                values[("achieved_flops", 0)] = rec["achieved_flops"]
                values[("achieved_ratio", 0)] = rec[f"{rec['budget_metric']}_ratio"]
            elif rule == "transfer" and rec["status"] == "ok":
                for arm, res in rec["arms"].items():
                    for e in res["episodes"]:
                        values[(f"{arm}/episode_acc", e["episode"])] = e["accuracy"]
                    values[(f"{arm}/acc_mean", 0)] = res["summary"]["mean"]
                    values[(f"{arm}/acc_ci95", 0)] = res["summary"]["ci95"]
                for name, c in rec.get("controls", {}).items():
                    values[(f"control/{name}/acc_mean", 0)] = c["summary"]["mean"]
                for a in rec.get("adapted", []):
                    values[("achieved_ratio", a["episode"])] = a["achieved_ratio"]
                    values[("adapt_seconds", a["episode"])] = a["adapt_seconds"]
            out[(rule, tuple(sorted(m.groupdict().items())))] = values
    return out


def _effective_runs(client: MlflowClient, study: dict[str, str]) -> dict[JobId, list]:
    """Per job, its effective child runs of the study's parent run (see the module docstring)."""
    runs = client.search_runs([study["experiment_id"]], max_results=5000)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == study["parent_run_id"]]
    by_job: dict[JobId, list] = {}
    for run in children:
        tags = run.data.tags
        wildcards = {k.removeprefix("pruneshot.wildcard."): v for k, v in tags.items()
                     if k.startswith("pruneshot.wildcard.")}
        by_job.setdefault((tags["pruneshot.rule"], tuple(sorted(wildcards.items()))), []).append(run)
    effective = {}
    for job, job_runs in by_job.items():
        replays = [r for r in job_runs if "pruneshot.replay_of" in r.data.tags]
        effective[job] = replays or [r for r in job_runs if "pruneshot.superseded_by" not in r.data.tags]
    return effective


def _logged(client: MlflowClient, run_id: str) -> tuple[Values, int]:
    """A run's metric values by (key, step) and how many values MLflow holds in all."""
    values: Values = {}
    n = 0
    for key in client.get_run(run_id).data.metrics:
        for m in client.get_metric_history(run_id, key):
            values[(m.key, m.step)] = m.value
            n += 1
    return values, n


def _assert_mlflow_matches_files(ws: Path, tracking_uri: str, study_name: str) -> dict[str, int]:
    """Every tracked job has exactly one effective FINISHED run under the study's parent run, holding
    exactly the metric values of its JSON record; returns the value counts (files, MLflow)."""
    study = json.loads((study_dir(ws) / "mlflow/study.json").read_text())
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(study_name)
    assert experiment is not None and experiment.experiment_id == study["experiment_id"]
    parent = client.get_run(study["parent_run_id"])
    assert parent.info.run_name == study_name and parent.data.tags["pruneshot.role"] == "study"
    expected = _expected(ws)
    assert {rule for rule, _ in expected} == set(TRACKED_RULES)
    effective = _effective_runs(client, study)
    assert set(effective) == set(expected), (sorted(effective), sorted(expected))
    n_files = n_mlflow = 0
    for job, values in expected.items():
        assert len(effective[job]) == 1, (job, [r.info.run_id for r in effective[job]])
        run = effective[job][0]
        assert run.info.status == "FINISHED", job
        logged, n = _logged(client, run.info.run_id)
        assert set(logged) == set(values), (job, sorted(set(logged) ^ set(values)))
        for key, value in values.items():
            assert logged[key] == pytest.approx(value, rel=1e-6, abs=1e-9), (job, key)
        n_files += len(values)
        n_mlflow += n
    assert n_mlflow == n_files
    return {"files": n_files, "mlflow": n_mlflow}


def _report_sections(ws: Path) -> dict[str, str]:
    html = (study_dir(ws) / "report/index.html").read_text()
    out = {}
    for sid in REPORT_SECTIONS:
        m = re.search(rf'<section id="{sid}">.*?</section>', html, flags=re.S)
        assert m, f"report has no section {sid}"
        out[sid] = m.group(0)
    return out


def _benchmark_wall_s(ws: Path, rule: str, path: Path) -> float:
    rel = path.relative_to(study_dir(ws) / rule).with_suffix("")
    if rule != "transfer":
        rel = rel.parent  # results/<study>/pretrain/r0/metrics.json -> logs/<study>/benchmarks/pretrain/r0.tsv
    tsv = study_dir(ws, "logs") / "benchmarks" / rule / f"{rel}.tsv"
    return float(pd.read_csv(tsv, sep="\t")["s"].iloc[0])


def _own_work_s(rule: str, rec: dict) -> float:
    """The job's own work as it recorded it (pretrain: training, from just before its MLflow run
    opens; search: the method's search; transfer: every arm's training plus per-episode pruning)."""
    if rule == "pretrain":
        return rec["seconds"]
    if rule == "search":
        return rec["search_seconds"]
    return sum(a["seconds"] for a in rec["arms"].values()) + sum(a["adapt_seconds"] for a in rec.get("adapted", []))


def _overheads(ws: Path) -> dict[str, float]:
    """Per tracked job (its record, relative to ``ws``): benchmark wall time minus its own work."""
    out = {}
    for rule, pattern in PATTERNS.items():
        for path in (study_dir(ws) / rule).rglob("*.json"):
            if pattern.search(path.as_posix()):
                rec = json.loads(path.read_text())
                out[path.relative_to(ws).as_posix()] = _benchmark_wall_s(ws, rule, path) - _own_work_s(rule, rec)
    return out


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def reference(server: MlflowServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The micro study, uninterrupted, tracked on the live server. Its GPU jobs (pretrain, transfer,
    asked for through --set-resources) lease one of two faked devices."""
    if server.proc is None or server.proc.poll() is not None:
        server.start()
    base = tmp_path_factory.mktemp("reference")
    ws = _workspace(base / "ws", server.url)
    env = _run_env(PRUNESHOT_FAKE_GPU_COUNT="2", PRUNESHOT_GPU_LOCK_DIR=str(base / "gpu-locks"))
    args = ["--resources", "gpu=2", "--set-resources", "pretrain:gpu=1", "transfer:gpu=1"]
    proc = subprocess.run(_snakemake(args), cwd=ws, env=env, capture_output=True, text=True, timeout=900)
    _check(proc, proc.stdout + proc.stderr)
    return ws


# --------------------------------------------------------------------------- tests


def test_runs_read_back_from_server(reference: Path, server: MlflowServer) -> None:
    study = json.loads((study_dir(reference) / "mlflow/study.json").read_text())
    assert study["tracking_uri"] == server.url
    assert not list((study_dir(reference, "logs") / "mlflow_spool").glob("*.json"))  # nothing had to be spooled
    counts = _assert_mlflow_matches_files(reference, server.url, "micro")
    assert counts["files"] > 0
    # the GPU jobs leased a (fake) device and said which in their logs
    assert "leased GPU" in (study_dir(reference, "logs") / "pretrain/r0.log").read_text()
    for log in (study_dir(reference, "logs") / "transfer").rglob("*.log"):
        assert re.search(r"leased GPU [01] of 2 \(CUDA_VISIBLE_DEVICES=[01]", log.read_text()), log
    for log in (study_dir(reference, "logs") / "search").rglob("*.log"):
        assert "leased GPU" not in log.read_text()  # no GPU requested: nothing leased


def test_server_killed_mid_run(reference: Path, server: MlflowServer, tmp_path: Path) -> None:
    if server.proc is None or server.proc.poll() is not None:
        server.start()
    ws = _workspace(tmp_path / "ws", server.url)
    out_path = tmp_path / "snakemake.out"
    with open(out_path, "w") as out:
        proc = subprocess.Popen(_snakemake([]), cwd=ws, env=_run_env(), stdout=out, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
    try:
        # the pretrain job writes its log once its MLflow run is open and training starts
        deadline = time.monotonic() + 600
        while not (study_dir(ws, "logs") / "pretrain/r0.log").exists():
            assert proc.poll() is None, out_path.read_text()[-5000:]
            assert time.monotonic() < deadline, "pretrain never started"
            time.sleep(0.05)
        server.kill()
        with pytest.raises(OSError):
            urllib.request.urlopen(f"{server.url}/health", timeout=2)
        proc.wait(timeout=900)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
    _check(proc, out_path.read_text())

    # every search and transfer job started after the kill: each went offline and spooled its run
    spool = study_dir(ws, "logs") / "mlflow_spool"
    records = [json.loads(p.read_text()) for p in sorted(spool.glob("*.json"))]
    by_rule: dict[str, int] = {}
    for rec in records:
        rule = rec["tags"]["pruneshot.rule"]
        by_rule[rule] = by_rule.get(rule, 0) + 1
        assert rec["mlflow_seconds"] < MLFLOW_LIMIT_S, (rec["run_name"], rec["mlflow_seconds"])
    expected = _expected(ws)
    for rule in ("search", "transfer"):
        assert by_rule.get(rule) == sum(r == rule for r, _ in expected), by_rule
    sync_during = json.loads((study_dir(ws) / "mlflow/sync.json").read_text())["spool"]
    assert sync_during["synced"] == 0 and sync_during["failed"] == len(records)  # the server was still dead

    # jobs finished within seconds of their own work: no slower than in the uninterrupted run
    overheads, reference_overheads = _overheads(ws), _overheads(reference)
    timed = [job for job in expected if job[0] != "budget_one"]  # budget_one (a few seconds) has no benchmark
    assert len(overheads) == len(timed) and set(overheads) == set(reference_overheads)
    extra = {job: round(overheads[job] - reference_overheads[job], 1) for job in overheads}
    print(f"overhead per job (s), server dead: {overheads}; extra vs. uninterrupted: {extra}")
    slow = {job: s for job, s in extra.items() if s > OVERHEAD_LIMIT_S}
    assert not slow, f"jobs took more than {OVERHEAD_LIMIT_S} s longer beyond their own work: {slow}"

    # the server comes back on the same store and port; sync_tracking replays the spool
    server.start()
    sync = subprocess.run(_snakemake(["--forcerun", "sync_tracking"]), cwd=ws, env=_run_env(),
                          capture_output=True, text=True, timeout=900)
    _check(sync, sync.stdout + sync.stderr)
    assert "rule transfer:" not in sync.stdout + sync.stderr  # nothing recomputed
    summary = json.loads((study_dir(ws) / "mlflow/sync.json").read_text())["spool"]
    assert summary["synced"] == len(records) and summary["failed"] == 0, summary
    assert not list(spool.glob("*.json")) and len(list((spool / "synced").glob("*.json"))) == len(records)
    counts = _assert_mlflow_matches_files(ws, server.url, "micro")  # nothing lost
    assert summary["metrics"] <= counts["mlflow"]

    # the results and the report equal those of the uninterrupted run
    got = pd.read_csv(study_dir(ws) / "tables/results.csv")[RESULT_COLUMNS]
    want = pd.read_csv(study_dir(reference) / "tables/results.csv")[RESULT_COLUMNS]
    pd.testing.assert_frame_equal(got, want)
    assert _report_sections(ws) == _report_sections(reference)
