"""The study configs under config/studies: valid, at the protocol's study settings, and a
`snakemake -n --configfile` dry run on each lists the full grid."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pruneshot.config import load_config
from pruneshot.methods import get_method

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STUDIES = sorted((ROOT / "config/studies").glob("*.yaml"))
#: The CPU validation of the embedded default (issue 12), not a protocol study.
VALIDATION = ROOT / "config/studies/mnist10k_validation.yaml"
PROTOCOL = [p for p in STUDIES if p != VALIDATION]


def test_the_issue_s_studies_exist():
    assert {"cifar100_fs", "cifar100_to_cifar10", "mnist_to_fashion"} <= {p.stem for p in STUDIES}


def test_the_validation_study_is_the_default_at_full_size():
    """28x28 (native), >= 200 episodes per cell, 3 replicates, every registered method, every arm (the
    gates' controls for dense only, finetune and prototype for every method); else the default's data,
    backbone and training."""
    from pruneshot.methods import ARMS, available

    cfg, default = load_config(VALIDATION), load_config(ROOT / "config/config.yaml")
    assert cfg["data"]["image"]["size"] in (None, 28) and cfg["data"]["source"]["dataset"] == "mnist10k"
    assert cfg["episodes"]["count"] >= 200 and cfg["study"]["replicates"] == 3
    assert set(cfg["episodes"]["shots"]) <= set(default["episodes"]["shots"])
    assert sorted(cfg["methods"]) == available() and sorted(cfg["transfer"]["arms"]) == sorted(ARMS)
    assert sorted(cfg["transfer"]["dense_only_arms"]) == ["linear_probe", "reinit"]
    for method in cfg["methods"]:  # every method is compared on the same two arms
        assert {"finetune", "prototype"} <= set(get_method(method).study_arms(cfg["transfer"])) or \
            get_method(method).budget_free, method
    for key in ("backbone", "pretrain", "budget"):
        assert cfg[key] == default[key], key
    assert {**cfg["transfer"], "dense_only_arms": []} == default["transfer"]
    assert cfg["data"]["source"]["classes"] == default["data"]["source"]["classes"]


@pytest.mark.parametrize("path", PROTOCOL, ids=lambda p: p.stem)
def test_study_uses_the_protocol_settings(path):
    cfg = load_config(path)
    assert cfg["episodes"]["count"] >= 600
    assert len(cfg["budget"]["levels"]) >= 5
    assert cfg["study"]["replicates"] >= 3
    assert {"dense", "random", "scratch"} <= set(cfg["methods"])  # the controls in every panel
    assert cfg["backbone"]["name"] != "small_cnn"
    assert cfg["data"]["source"]["dataset"] != "digits"


def _job_counts(text: str) -> dict[str, int]:
    table = text[text.index("Job stats:"):]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, flags=re.M)}


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.stem)
def test_dry_run_lists_the_full_grid(path, tmp_path):
    shutil.copytree(ROOT / "workflow", tmp_path / "workflow")
    shutil.copytree(ROOT / "config", tmp_path / "config")
    shutil.copytree(ROOT / "scripts", tmp_path / "scripts")
    shutil.copytree(ROOT / "envs", tmp_path / "envs")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run([str(BIN / "snakemake"), "-n", "--cores", "4", "--configfile", str(path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    counts = _job_counts(proc.stdout)
    cfg = load_config(path)
    reps, levels = cfg["study"]["replicates"], len(cfg["budget"]["levels"])
    def networks(side: str) -> int:  # (method, budget, replicate) of the methods of one side
        methods = [get_method(m) for m in cfg["methods"] if get_method(m).side == side]
        return reps * sum(1 if m.budget_free else levels for m in methods)

    n_targets, n_shots = len(cfg["data"]["targets"]), len(cfg["episodes"]["shots"])
    cells = n_targets * n_shots
    assert counts["pretrain"] == reps
    assert counts["search"] == counts["profile"] == networks("source")  # target-side methods: no search
    assert counts["transfer"] == (networks("source") + networks("target")) * cells
    assert counts.get("profile_adapted", 0) == networks("target") * cells
    assert counts["make_episodes"] == n_targets * n_shots
    assert counts["prepare_target"] == n_targets
    assert counts["report"] == counts["sanity"] == 1
    assert counts["budget_one"] == reps
    if cfg["transfer"]["select"]:  # one selection per network and shots, on the validation classes
        assert counts["select_transfer"] == (networks("source") + networks("target")) * n_shots
        assert counts["make_select_episodes"] == n_shots
        assert counts["prepare_select"] == counts["selection_table"] == 1
    else:
        assert not {"select_transfer", "prepare_select", "selection_table"} & set(counts)


@pytest.mark.parametrize("path", PROTOCOL, ids=lambda p: p.stem)
def test_protocol_studies_choose_transfer_settings_on_held_out_classes(path):
    """Issue 13: the protocol studies choose lr and steps on validation classes held out of pretraining."""
    cfg = load_config(path)
    sel = cfg["transfer"]["select"]
    assert sel and sel["data"]["dataset"] == cfg["data"]["source"]["dataset"]
    assert not set(sel["data"]["classes"]) & set(cfg["data"]["source"]["classes"])
