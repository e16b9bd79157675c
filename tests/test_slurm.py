"""Slurm: the micro study (tests/configs/micro.yaml) submitted through snakemake-executor-plugin-slurm
with profiles/slurm to a real single-node cluster on 127.0.0.1 (.ci/slurm/start.sh: munged, MariaDB,
slurmdbd, slurmctld, slurmd, two fake GPUs), next to the same study run locally.

Checks: GPU rules were submitted with a GPU request (sacct's ReqTRES), the Slurm run's results equal the
local run's (accuracies per cell and per episode, pretrained and searched checkpoints), and a job that
fails is reported as failed (Snakemake's exit status, its error message, sacct's FAILED), retried with a
runtime that grows with the attempt. The cluster is started once for the module; every daemon it
started is stopped by PID in teardown, also when a test fails.

Needs root and the Slurm packages (.ci/install-slurm.sh; CI runs it): without them the tests fail."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import BIN, ROOT, _env, copy_worktree, study_dir

pytestmark = pytest.mark.integration

START = ROOT / ".ci/slurm/start.sh"
STOP = ROOT / ".ci/slurm/stop.sh"
PROFILE = ROOT / "profiles/slurm/config.yaml"
MICRO = ROOT / "tests/configs/micro.yaml"
PARTITION = "pruneshot"
ACCOUNT = "pruneshot_ci"
SLURM_BINARIES = ("munged", "mariadbd", "mariadb-install-db", "slurmdbd", "slurmctld", "slurmd", "sbatch", "srun",
                  "squeue", "sacct", "sacctmgr", "scontrol")
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
GPU_RULES = {"pretrain", "transfer", "profile", "profile_adapted"}  # profiles/slurm gives these gpu=1
# the micro study's jobs (3 methods at one budget, one target, 1-shot; channel_scaling, target-side, has no
# search and its cell's own profile_adapted); `all` runs in the main process
EXPECTED_JOBS = ["init_tracking", "prepare_source", "prepare_target", "make_episodes", "pretrain", "sync_tracking",
                 "finish_tracking",
                 "aggregate", "budget_one", "sanity", "report", *["search", "profile"] * 2, *["transfer"] * 3,
                 "profile_adapted"]
SUBMITTED = re.compile(r"Job \d+ has been submitted with SLURM jobid (\d+) \(log: ([^)]*)\)")
PR_SET_CHILD_SUBREAPER = 36
FAILING_RETRIES = 1  # fewer than the profile's, to save time: the runtime's growth shows after one retry
FAILING_SNAKEFILE = """\
rule boom:
    output: "never.txt"
    log: "logs/boom.log"
    shell: "echo 'failing on purpose' > {log}; exit 3"
"""


@dataclass
class Cluster:
    state: Path


@dataclass
class Run:
    cwd: Path
    returncode: int
    log: str
    seconds: float


def _set_subreaper(on: bool) -> None:
    """Daemons that start.sh leaves behind become this process's children (not PID 1's), so that their
    exit can be collected here instead of leaving zombies on machines whose PID 1 does not reap."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0)


def _recorded_daemons(state: Path) -> list[tuple[str, int]]:
    pids = state / "daemons.pids"
    if not pids.is_file():
        return []
    return [(name, int(pid)) for name, pid in (line.split() for line in pids.read_text().splitlines() if line)]


def _is_running(pid: int, name: str) -> bool:
    """``pid`` is alive (not a zombie) and still the recorded daemon (not a reused PID)."""
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return comm == name and not re.search(r"^State:\s*Z", status, re.M)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):  # not our child (no subreaper support): PID 1 owns it
        os.waitpid(pid, os.WNOHANG)


def _stop_cluster(state: Path) -> list[str]:
    """stop.sh, then make sure: every recorded daemon that is still running gets SIGKILL. Returns what
    had to be killed here (empty when stop.sh did its job)."""
    subprocess.run(["bash", str(STOP), str(state)], capture_output=True, text=True, timeout=300)
    leftovers = []
    for name, pid in _recorded_daemons(state):
        if _is_running(pid, name):
            leftovers.append(f"{name} ({pid})")
            os.kill(pid, signal.SIGKILL)
            for _ in range(50):
                if not _is_running(pid, name):
                    break
                time.sleep(0.1)
        _reap(pid)
    return leftovers


def _logs_tail(state: Path, lines: int = 15) -> str:
    out = []
    for log in sorted((state / "log").glob("*")):
        text = log.read_text(errors="replace").splitlines()[-lines:]
        out.append(f"--- {log.name}\n" + "\n".join(text))
    return "\n".join(out)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    missing = [b for b in SLURM_BINARIES if shutil.which(b, path=SBIN_PATH) is None]
    if missing:
        pytest.fail(f"Slurm is not installed ({', '.join(missing)} missing): run .ci/install-slurm.sh "
                    "(as root; CI does) before this test", pytrace=False)
    if os.geteuid() != 0:
        pytest.fail("tests/test_slurm.py starts Slurm daemons and must run as root", pytrace=False)
    # munged and MariaDB run as their own users: the state directory must be reachable by them,
    # which pytest's private temporary directories are not
    state = Path(tempfile.mkdtemp(prefix="pruneshot-slurm-", dir="/tmp"))
    _set_subreaper(True)
    try:
        # WAIT_S: another session's test cluster on this machine is waited for, not clobbered
        proc = subprocess.run(["bash", str(START), str(state)], capture_output=True, text=True, timeout=1200,
                              env={**os.environ, "SLURM_PARTITION": PARTITION, "SLURM_ACCOUNT": ACCOUNT,
                                   "WAIT_S": "900"})
        if proc.returncode != 0:
            pytest.fail(f"the test cluster did not start ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}\n"
                        f"{_logs_tail(state)}", pytrace=False)
        yield Cluster(state)
    finally:
        leftovers = _stop_cluster(state)
        _set_subreaper(False)
        shutil.rmtree(state, ignore_errors=True)
        assert not leftovers, f"stop.sh left these daemons running (killed now): {leftovers}"


def ci_profile(dst: Path) -> Path:
    """profiles/slurm adapted to the test cluster, nothing else: its partition and account placeholders
    replaced, memory and CPUs per GPU shrunk to what a CI runner has, and faster status polling."""
    profile = yaml.safe_load(PROFILE.read_text())
    defaults = profile["default-resources"]
    assert defaults["slurm_partition"].startswith("YOUR_") and defaults["slurm_account"].startswith("YOUR_")
    defaults.update(slurm_partition=PARTITION, slurm_account=ACCOUNT)
    for resources in [defaults, *profile["set-resources"].values()]:
        if "mem_mb" in resources:
            resources["mem_mb"] = "800*attempt"
        if "cpus_per_gpu" in resources:
            resources["cpus_per_gpu"] = 1
    profile.update({"slurm-init-seconds-before-status-checks": 2, "latency-wait": 5,
                    "slurm-keep-successful-logs": True})
    dst.mkdir(parents=True)
    (dst / "config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    return dst


def _start(cmd: list[str], cwd: Path) -> tuple[subprocess.Popen, Path, float]:
    log = cwd.parent / f"{cwd.name}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    return proc, log, time.monotonic()


def _finish(proc: subprocess.Popen, log: Path, t0: float, cwd: Path, deadline: float) -> Run:
    try:
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # snakemake ignores SIGTERM while jobs run
        proc.wait()
    return Run(cwd, proc.returncode, log.read_text(errors="replace"), time.monotonic() - t0)


@pytest.fixture(scope="module")
def runs(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    """Three snakemake runs at once (the Slurm ones mostly wait on polling): the micro study locally and
    through Slurm, each in its own copy of this working tree, and a one-rule workflow that fails."""
    base = tmp_path_factory.mktemp("slurm")
    profile = ci_profile(base / "profile-ci")
    dirs = {name: base / name for name in ("local", "slurm", "failing")}
    for name in ("local", "slurm"):
        copy_worktree(dirs[name])
        shutil.copy(MICRO, dirs[name] / "config/config.yaml")
    dirs["failing"].mkdir()
    (dirs["failing"] / "Snakefile").write_text(FAILING_SNAKEFILE)
    snakemake = str(BIN / "snakemake")
    commands = {
        "local": [snakemake, "--cores", "2"],
        "slurm": [snakemake, "--profile", str(profile)],
        "failing": [snakemake, "--profile", str(profile), "--retries", str(FAILING_RETRIES)],
    }
    started: dict[str, tuple[subprocess.Popen, Path, float]] = {}
    try:
        for name, cmd in commands.items():
            started[name] = _start(cmd, dirs[name])
        deadline = time.monotonic() + 900  # about 5 minutes on 2 busy cores
        return {name: _finish(*started[name], dirs[name], deadline) for name in commands}
    finally:
        for proc, _, _ in started.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def submission_logs(run: Run) -> list[Path]:
    return [Path(log) for _, log in SUBMITTED.findall(run.log)]


def submitted_jobs(run: Run) -> dict[str, str]:
    """Slurm job id -> rule, from the executor's submission messages (its log folder is rule_<name>)."""
    jobs = {}
    for jobid, log in SUBMITTED.findall(run.log):
        rule = re.search(r"/rule_([A-Za-z_]+?)(?:/|$)", log)
        assert rule, log
        jobs[jobid] = rule.group(1)
    return jobs


def sacct(jobids: list[str]) -> pd.DataFrame:
    fields = ["JobID", "Comment", "Partition", "Account", "ReqTRES", "State", "ExitCode", "TimelimitRaw"]
    out = subprocess.run(["sacct", "-X", "-P", "-n", "-j", ",".join(jobids), "--format=" + ",".join(fields)],
                         capture_output=True, text=True, check=True, env={**os.environ, "PATH": SBIN_PATH})
    rows = [line.split("|") for line in out.stdout.splitlines() if line.strip()]
    return pd.DataFrame(rows, columns=fields).set_index("JobID")


def minutes(expression: str | int, attempt: int) -> int:
    """A profile's runtime at one attempt, evaluated as Snakemake does (a Python expression of attempt)."""
    return int(eval(str(expression), {"__builtins__": {}}, {"attempt": attempt}))


def _ok(run: Run) -> None:
    assert run.returncode == 0, f"snakemake in {run.cwd} failed ({run.returncode}):\n{run.log[-6000:]}"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_cluster_started(cluster: Cluster) -> None:
    names = [name for name, _ in _recorded_daemons(cluster.state)]
    assert names == ["munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd"]


def test_every_rule_ran_as_a_slurm_job_and_gpu_rules_requested_a_gpu(runs: dict[str, Run]) -> None:
    run = runs["slurm"]
    _ok(run)
    jobs = submitted_jobs(run)
    assert sorted(jobs.values()) == sorted(EXPECTED_JOBS), sorted(jobs.values())
    acct = sacct(list(jobs))
    assert set(acct.index) == set(jobs)
    for jobid, rule in jobs.items():
        row = acct.loc[jobid]
        assert row["State"] == "COMPLETED", (rule, dict(row))
        assert row["Comment"].startswith(f"rule_{rule}"), (rule, dict(row))  # the executor's tag
        assert (row["Partition"], row["Account"]) == (PARTITION, ACCOUNT)
        asked_gpu = "gres/gpu=1" in row["ReqTRES"]
        assert asked_gpu == (rule in GPU_RULES), (rule, row["ReqTRES"])
    # runtime comes from the profile (minutes, first attempt)
    profile = yaml.safe_load(PROFILE.read_text())
    pretrain = next(j for j, r in jobs.items() if r == "pretrain")
    assert int(acct.loc[pretrain, "TimelimitRaw"]) == minutes(profile["set-resources"]["pretrain"]["runtime"], 1)


def test_slurm_results_equal_local_results(runs: dict[str, Run]) -> None:
    local, slurm = runs["local"], runs["slurm"]
    _ok(local)
    _ok(slurm)
    key = ["method", "requested_budget", "target", "shots", "arm"]
    same = ["row_id", "acc_mean", "acc_ci95", "acc_std", "n_episodes", "achieved_params", "achieved_flops",
            "checkpoint_sha256", "pretrain_sha256", "data_sha256", "status"]
    tables = [pd.read_csv(study_dir(r.cwd) / "tables/results.csv").sort_values(key).reset_index(drop=True)
              for r in (local, slurm)]
    assert len(tables[0]) == 3  # dense, random, channel_scaling; one budget, 1-shot, finetune
    pd.testing.assert_frame_equal(tables[0][key + same], tables[1][key + same])
    episodes = [pd.read_csv(study_dir(r.cwd) / "tables/episodes.csv").sort_values(["row_id", "episode"])
                .reset_index(drop=True) for r in (local, slurm)]
    assert len(episodes[0]) == 3 * 2
    pd.testing.assert_frame_equal(episodes[0], episodes[1])
    checkpoints = sorted(p.relative_to(local.cwd) for stage in ("pretrain", "search")
                         for p in (study_dir(local.cwd) / stage).rglob("*")
                         if p.name in ("model.safetensors", "arch.json"))
    # weights and architecture: the pretrained and 2 searched networks (channel_scaling, target-side, has none)
    assert len(checkpoints) == 2 * (1 + 2)
    for rel in checkpoints:
        assert _sha256(local.cwd / rel) == _sha256(slurm.cwd / rel), rel


def test_a_failing_job_is_reported_failed_and_retried_with_more_time(runs: dict[str, Run]) -> None:
    run = runs["failing"]
    assert run.returncode != 0, run.log[-3000:]
    assert "Error in rule boom" in run.log, run.log[-3000:]
    assert "SLURM status is: 'FAILED'" in run.log, run.log[-3000:]
    jobs = submitted_jobs(run)
    assert list(jobs.values()) == ["boom"] * (1 + FAILING_RETRIES)  # the first try and every retry
    acct = sacct(list(jobs))
    assert set(acct["State"]) == {"FAILED"}, acct
    assert "0:0" not in set(acct["ExitCode"]), acct
    for log in submission_logs(run):  # the job's own log has the rule's exit status
        assert "returned non-zero exit status 3" in log.read_text(), log
    # each retry was submitted with the profile's runtime at its attempt: the limit grows
    runtime = yaml.safe_load(PROFILE.read_text())["default-resources"]["runtime"]
    limits = [int(acct.loc[j, "TimelimitRaw"]) for j in sorted(jobs, key=int)]
    assert limits == [minutes(runtime, attempt) for attempt in range(1, len(limits) + 1)]
    assert limits == sorted(set(limits))


def test_profile_keeps_placeholders_and_gpu_requests() -> None:
    """What users edit stays marked as such; GPU rules and retries stay in the shipped profile."""
    profile = yaml.safe_load(PROFILE.read_text())
    assert profile["executor"] == "slurm"
    assert profile["retries"] >= 1
    assert profile["default-resources"]["slurm_partition"] == "YOUR_PARTITION"
    assert profile["default-resources"]["slurm_account"] == "YOUR_ACCOUNT"
    for rule in GPU_RULES:
        resources = profile["set-resources"][rule]
        assert resources["gpu"] == 1, rule
        assert "attempt" in str(resources["runtime"]) and "attempt" in str(resources["mem_mb"]), rule
    assert "attempt" in str(profile["default-resources"]["runtime"])
