"""Issue 15.2: profiles/slurm's YOUR_PARTITION / YOUR_ACCOUNT placeholders were submitted as they are.
A run with the Slurm executor now stops before submitting anything (the Snakefile's onstart handler,
pruneshot.runtime.placeholders) and says what to put there. No Slurm cluster needed: the check comes
before the first sbatch (SLURM_CONF points nowhere, so nothing could reach a cluster anyway)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import BIN, ROOT, _env, copy_worktree

from pruneshot.runtime.placeholders import PlaceholderError, check_slurm_resources, placeholders


class Job:
    def __init__(self, rule: str, resources: dict, is_local: bool = False) -> None:
        self.rule = SimpleNamespace(name=rule)
        self.resources = resources
        self.is_local = is_local


def workflow(executor: str, jobs: list[Job]) -> SimpleNamespace:
    return SimpleNamespace(executor_plugin=SimpleNamespace(name=executor),
                           dag=SimpleNamespace(needrun_jobs=lambda: iter(jobs)))


def test_placeholders_found_per_resource_with_the_rules_that_carry_them() -> None:
    jobs = [("pretrain", {"slurm_partition": "YOUR_GPU_PARTITION", "slurm_account": "lab", "mem_mb": 16000}),
            ("search", {"slurm_partition": "cpu", "slurm_account": "lab"}),
            ("transfer", {"slurm_partition": "YOUR_GPU_PARTITION", "slurm_extra": "--qos=YOUR_QOS"})]
    assert placeholders(jobs) == {("slurm_extra", "--qos=YOUR_QOS"): ["transfer"],
                                  ("slurm_partition", "YOUR_GPU_PARTITION"): ["pretrain", "transfer"]}
    assert placeholders([("a", {"slurm_partition": "gpu", "slurm_account": "your_lab", "runtime": 30})]) == {}


def test_only_slurm_jobs_to_be_submitted_are_checked() -> None:
    held = {"slurm_partition": "YOUR_PARTITION", "slurm_account": "YOUR_ACCOUNT"}
    check_slurm_resources(workflow("local", [Job("pretrain", held)]))
    check_slurm_resources(workflow("slurm", [Job("all", held, is_local=True)]))
    check_slurm_resources(workflow("slurm", [Job("pretrain", {"slurm_partition": "gpu", "slurm_account": "a"})]))
    check_slurm_resources(SimpleNamespace(executor_plugin=None))  # e.g. a report
    with pytest.raises(PlaceholderError) as err:
        check_slurm_resources(workflow("slurm", [Job("pretrain", held),
                                                 Job("search", {**held, "slurm_partition": "c"})]))
    lines = str(err.value).splitlines()
    assert "nothing was submitted" in lines[0]
    assert lines[1:] == [
        "  slurm_account: YOUR_ACCOUNT  (every rule); `sacctmgr show assoc user=$USER format=account` lists your "
        "accounts",
        "  slurm_partition: YOUR_PARTITION  (rules: pretrain); `sinfo -s` lists the partitions"]


@pytest.mark.integration
def test_a_slurm_run_with_the_shipped_profile_stops_before_submitting(tmp_path: Path) -> None:
    """The shipped profile as it is, on the micro study in a copy of this working tree: the run fails with
    the placeholders and how to find their values, submits nothing and writes no result; a dry run with
    the same profile still previews the jobs."""
    proj = tmp_path / "proj"
    copy_worktree(proj)
    shutil.copy(ROOT / "tests/configs/micro.yaml", proj / "config/micro.yaml")
    env = dict(_env(), SLURM_CONF=str(tmp_path / "no-cluster.conf"))
    cmd = [str(BIN / "snakemake"), "--profile", "profiles/slurm", "--configfile", "config/micro.yaml"]
    # about 40 s; before issue 15 it went on submitting (each sbatch rejected) until killed here
    run = subprocess.run(cmd, cwd=proj, env=env, capture_output=True, text=True, timeout=240)
    out = run.stdout + run.stderr
    assert run.returncode != 0
    assert "Slurm resources still hold the profile's placeholders; nothing was submitted" in out, out[-3000:]
    assert "  slurm_partition: YOUR_PARTITION  (every rule); `sinfo -s` lists the partitions" in out
    assert ("  slurm_account: YOUR_ACCOUNT  (every rule); `sacctmgr show assoc user=$USER format=account` lists "
            "your accounts") in out
    assert not (proj / ".snakemake/slurm_logs").exists() and "Submitted" not in out
    assert not (proj / "results/micro").exists()
    dry = subprocess.run([*cmd, "-n"], cwd=proj, env=env, capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0 and "pretrain" in dry.stdout, dry.stderr[-3000:]
