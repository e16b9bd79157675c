"""Long jobs survive interruption: pretraining and the slimming, dnal and dap searches checkpoint as
they train and, interrupted, resume from the last checkpoint to bit-identical results on the CPU --
in process (interrupted by an exception from a logging callback) and through a real Snakemake run
killed with SIGKILL, then rerun with ``--rerun-incomplete``."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import BIN, ROOT, _env, copy_worktree, run, study_dir
from test_training import HP, _digits_in_memory, _tiny_model

from pruneshot.config import load_config
from pruneshot.data.pipeline import Augment, BatchSource
from pruneshot.io import read_json, sha256_file
from pruneshot.runtime.checkpoint import MANIFEST, Checkpointer, checkpoint_location
from pruneshot.stages.data import prepare_source
from pruneshot.stages.job import Job, _NullRun
from pruneshot.stages.pretrain import pretrain as pretrain_stage
from pruneshot.stages.search import search
from pruneshot.training import pretrain


class Interrupted(BaseException):
    """A simulated kill: not an ``Exception``, so no stage records it as a failed cell."""


def _quiet(_message: str) -> None:
    pass


# --- the checkpoint files ------------------------------------------------------------------------

def test_checkpoint_round_trip_is_exact_and_replaces_atomically(tmp_path):
    ck = Checkpointer(tmp_path / "ck", "key")
    gen = torch.Generator().manual_seed(3)
    tensors = {"w": torch.randn(3, 4), "n": torch.tensor(7), "g": gen.get_state(), "s": torch.tensor(0.5)}
    state = {"loss": 0.1 + 0.2, "tiny": 1e-300, "history": [{"epoch": 0, "x": 1 / 3}], "none": None}
    ck.save({k: v * 0 for k, v in tensors.items() if k != "g"}, {"old": True})
    torch.manual_seed(123)
    ck.save(tensors, state)
    after_save = torch.rand(4)
    files = sorted(p.name for p in ck.directory.iterdir())
    assert files == [MANIFEST, "state-000002.safetensors"]  # the previous tensor file is gone
    loaded = ck.load()
    assert loaded is not None and loaded.state == state
    assert loaded.state["loss"] == 0.1 + 0.2  # floats read back bit for bit
    for k, v in tensors.items():
        assert loaded.tensors[k].dtype == v.dtype and torch.equal(loaded.tensors[k], v), k
    loaded.restore_rng()  # the global RNG is back where it was when saved
    assert torch.equal(torch.rand(4), after_save)
    manifest = json.loads((ck.directory / MANIFEST).read_text())
    assert manifest["sha256"] == sha256_file(ck.directory / manifest["tensors"])
    ck.clear()
    assert not ck.directory.exists()


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o002, 0o664)], ids=["umask022", "umask002"])
def test_checkpoint_files_get_the_mode_the_umask_gives(tmp_path, umask, mode):
    """Written through temporary files, but not with mkstemp's 0600 (issue 14)."""
    old = os.umask(umask)
    try:
        ck = Checkpointer(tmp_path / "ck", "key")
        ck.save({"w": torch.ones(3)}, {"step": 1})
    finally:
        os.umask(old)
    files = sorted(ck.directory.iterdir())
    assert [p.name for p in files] == [MANIFEST, "state-000001.safetensors"]
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: oct(mode) for p in files}


@pytest.mark.parametrize("damage", ["other_key", "tensor_bytes", "tensor_missing", "manifest_truncated",
                                    "no_manifest"])
def test_foreign_or_damaged_checkpoints_are_removed_never_resumed(tmp_path, damage):
    logs: list[str] = []
    ck = Checkpointer(tmp_path / "ck", "key", log=logs.append)
    ck.save({"w": torch.ones(5)}, {"epoch": 1})
    manifest = json.loads((ck.directory / MANIFEST).read_text())
    tensor_file = ck.directory / manifest["tensors"]
    if damage == "other_key":
        ck = Checkpointer(ck.directory, "another key", log=logs.append)
    elif damage == "tensor_bytes":
        blob = bytearray(tensor_file.read_bytes())
        blob[-1] ^= 0xFF
        tensor_file.write_bytes(bytes(blob))
    elif damage == "tensor_missing":
        tensor_file.unlink()
    elif damage == "manifest_truncated":
        text = (ck.directory / MANIFEST).read_text()
        (ck.directory / MANIFEST).write_text(text[: len(text) // 2])
    else:  # killed while writing the first checkpoint: a tensor file and a temporary file, no manifest
        (ck.directory / MANIFEST).unlink()
        (ck.directory / ".tmp-abc").write_bytes(b"half")
    assert ck.load() is None
    assert not ck.directory.exists()
    assert logs and "removed" in logs[-1]


def test_checkpoint_location_is_beside_the_outputs_not_among_them(tmp_path):
    assert checkpoint_location(Path("results/tiny/pretrain/r0")) == (Path("results/tiny/checkpoints/pretrain/r0"),
                                                                     Path("results/tiny"))
    assert checkpoint_location(Path("/x/results/s1/search/dnal/b0.5/r1"))[0] == Path(
        "/x/results/s1/checkpoints/search/dnal/b0.5/r1")
    assert checkpoint_location(tmp_path / "pre") == (tmp_path / ".checkpoints/pre", tmp_path)
    # clear() removes emptied parents up to the study root, and leaves a sibling's checkpoint alone
    a = Checkpointer.for_outputs(tmp_path / "results/s1/search/dnal/b0.5/r0", "k")
    b = Checkpointer.for_outputs(tmp_path / "results/s1/search/dnal/b0.25/r0", "k")
    a.save({"x": torch.zeros(1)}, {})
    b.save({"x": torch.zeros(1)}, {})
    a.clear()
    assert not (tmp_path / "results/s1/checkpoints/search/dnal/b0.5").exists() and b.exists()
    b.clear()
    assert not (tmp_path / "results/s1/checkpoints").exists() and (tmp_path / "results/s1").is_dir()
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    outs = [next(iter(o)) for o in dvc["stages"]["pipeline"]["outs"]]
    assert outs and all(o.startswith("results/${study.name}/") for o in outs)
    assert not any(o.removeprefix("results/${study.name}/").startswith("checkpoints") for o in outs)


# --- pretraining -----------------------------------------------------------------------------------

def _sources():
    x, y, max_value, norm, _, _ = _digits_in_memory()
    return (BatchSource(x[:300], y[:300], max_value=max_value, **norm),
            BatchSource(x[300:], y[300:], max_value=max_value, **norm))


def _stop_at(prefix: str, sink: list[str] | None = None):
    def log(message: str) -> None:
        if sink is not None:
            sink.append(message)
        if message.startswith(prefix):
            raise Interrupted(message)

    return log


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("augment", [None, Augment(crop_padding=1, flip=True)], ids=["plain", "crop_flip"])
def test_pretrain_interrupted_after_epoch_k_resumes_bit_identically(tmp_path, augment):
    tr, va = _sources()
    hp = {**HP, "epochs": 5}
    metrics_ref: list[tuple] = []
    ref, ref_info = pretrain(_tiny_model(), tr, va, patience=10, augment=augment, log=_quiet,
                             log_metrics=lambda m, s: metrics_ref.append((m, s)), **hp)
    ck = Checkpointer(tmp_path / "ck", "job settings")
    with pytest.raises(Interrupted):  # dies while logging epoch 3: epochs 1-2 are in the checkpoint
        pretrain(_tiny_model(), tr, va, patience=10, augment=augment, log=_stop_at("epoch 3/"), checkpoint=ck, **hp)
    assert len(json.loads((ck.directory / MANIFEST).read_text())["state"]["history"]) == 2
    torch.manual_seed(999)  # whatever the global RNG did in between
    logs: list[str] = []
    metrics: list[tuple] = []
    model, info = pretrain(_tiny_model(), tr, va, patience=10, augment=augment, log=logs.append,
                           log_metrics=lambda m, s: metrics.append((m, s)), checkpoint=ck, **hp)
    assert logs[0].startswith("resumed from checkpoint after epoch 2/5")
    assert next(m for m in logs if m.startswith("epoch ")).startswith("epoch 3/5")
    assert info["resumed_after_epoch"] == 2 and ref_info["resumed_after_epoch"] is None
    assert info["history"] == ref_info["history"]
    assert (info["best_epoch"], info["best_val_acc"]) == (ref_info["best_epoch"], ref_info["best_val_acc"])
    assert metrics == metrics_ref  # the MLflow run of the resumed job gets every epoch's metrics
    _assert_same_weights(model, ref)


def test_pretrain_checkpoint_of_a_finished_run_resumes_without_training(tmp_path):
    tr, va = _sources()
    ck = Checkpointer(tmp_path / "ck", "job settings")
    ref, ref_info = pretrain(_tiny_model(), tr, va, patience=1, log=_quiet, checkpoint=ck, **HP)
    saved = json.loads((ck.directory / MANIFEST).read_text())["state"]
    assert len(saved["history"]) == ref_info["epochs_run"]  # the last epoch run (here an early stop) is saved
    assert saved["stopped"] == (ref_info["epochs_run"] < HP["epochs"])
    logs: list[str] = []
    model, info = pretrain(_tiny_model(), tr, va, patience=1, log=logs.append, checkpoint=ck, **HP)
    assert logs[0].startswith(f"resumed from checkpoint after epoch {ref_info['epochs_run']}/")
    assert not any(m.startswith("epoch ") for m in logs)
    assert info["history"] == ref_info["history"]
    _assert_same_weights(model, ref)


def test_pretrain_does_not_resume_a_checkpoint_of_other_settings(tmp_path):
    tr, va = _sources()
    logs: list[str] = []
    ck = Checkpointer(tmp_path / "ck", "job settings", log=logs.append)
    with pytest.raises(Interrupted):
        pretrain(_tiny_model(), tr, va, patience=10, log=_stop_at("epoch 2/"), checkpoint=ck, **HP)
    _, info = pretrain(_tiny_model(), tr, va, patience=10, log=logs.append, checkpoint=ck, **{**HP, "lr": 0.04})
    assert info["resumed_after_epoch"] is None and len(info["history"]) == HP["epochs"]
    assert "ignored and removed: its settings key differs" in logs[0]
    with pytest.raises(Interrupted):  # and a different job key (other config or inputs) is not resumed either
        pretrain(_tiny_model(), tr, va, patience=10, log=_stop_at("epoch 2/"), checkpoint=ck, **HP)
    _, info = pretrain(_tiny_model(), tr, va, patience=10, log=_quiet,
                       checkpoint=Checkpointer(ck.directory, "other job settings"), **HP)
    assert info["resumed_after_epoch"] is None


# --- the stages: pretrain and the source-side searches ---------------------------------------------

def _job(tmp: Path, rule: str, **wildcards: str) -> Job:
    name = "_".join([rule, *wildcards.values()])
    return Job(rule=rule, wildcards=wildcards, config={}, log_path=tmp / "logs" / f"{name}.log")


@pytest.fixture(scope="module")
def stage_world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Source data and an uninterrupted pretrained backbone, made by the real stage functions."""
    tmp = tmp_path_factory.mktemp("resume")
    cfg = load_config(ROOT / "tests/configs/tiny.yaml")
    cfg["data"]["cache_dir"] = str(tmp / "cache")
    cfg["slimming"]["epochs"] = 3
    cfg["slimming"]["min_steps"] = 0  # exactly 3 epochs on the small split
    src = tmp / "source"
    prepare_source(cfg, src, _job(tmp, "prepare_source"))
    pre = tmp / "pretrain_ref"
    record = pretrain_stage(cfg, 0, src / "manifest.json", pre / "model.safetensors", pre / "arch.json",
                             pre / "metrics.json", _job(tmp, "pretrain", replicate="ref"))
    return {"cfg": cfg, "tmp": tmp, "src": src, "pre": pre, "pre_record": record}


def _interrupt_metrics(monkeypatch: pytest.MonkeyPatch, key: str, step: int) -> None:
    """Make the (untracked) job's MLflow stand-in raise when ``key`` is logged at ``step``."""

    def log_metrics(self, metrics: dict[str, float], step_: int | None = None) -> None:
        if key in metrics and step_ == step:
            raise Interrupted(f"{key} at step {step}")

    monkeypatch.setattr(_NullRun, "log_metrics", log_metrics)


def _record_metrics(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Every (metrics, step) the job logs from now on (the per-epoch/step training curves)."""
    logged: list[tuple] = []
    monkeypatch.setattr(_NullRun, "log_metrics", lambda self, metrics, step=None: logged.append(
        (metrics, step)))
    return logged


def test_stage_pretrain_resumes_and_removes_its_checkpoint(stage_world, monkeypatch):
    w = stage_world
    out = w["tmp"] / "pretrain_resumed"
    args = (w["cfg"], 0, w["src"] / "manifest.json", out / "model.safetensors", out / "arch.json",
            out / "metrics.json")
    ck_dir, _ = checkpoint_location(out)
    with monkeypatch.context() as m:
        _interrupt_metrics(m, "val_acc", 1)  # dies logging epoch 2: epoch 1 is in the checkpoint
        with pytest.raises(Interrupted):
            pretrain_stage(*args, _job(w["tmp"], "pretrain", replicate="killed"))
    assert (ck_dir / MANIFEST).is_file() and not (out / "metrics.json").exists()
    job = _job(w["tmp"], "pretrain", replicate="resumed")
    record = pretrain_stage(*args, job)
    assert "resumed from checkpoint after epoch 1/3" in job.log_path.read_text()
    ref = w["pre_record"]
    assert record["resumed_after_epoch"] == 1 and ref["resumed_after_epoch"] is None
    assert record["weights_sha256"] == ref["weights_sha256"]
    assert record["history"] == ref["history"] and record["best_epoch"] == ref["best_epoch"]
    assert not ck_dir.exists() and not ck_dir.parent.exists()  # removed once the outputs are written


SEARCHES = [  # method, option overrides, metric that interrupts, its step, what the checkpoint then holds
    ("slimming", {}, "slim_ce", 1, "after epoch 2/3"),
    ("dnal", {}, "arch_ce", 4, "after 1 trial(s) and 2 epoch(s) of trial 2"),
    ("dnal", {}, "arch_ce", 2, "after 0 trial(s) and 3 epoch(s) of trial 1"),  # a trial's last epoch
    ("dap", {}, "dap_ce", 20, "after step "),
    ("dap", {"weights": "resample", "resample_every": 7}, "dap_ce", 25, "after step "),
]


def _search(w: dict, cfg: dict, method: str, name: str, job: Job) -> tuple[dict, Path]:
    out = w["tmp"] / "search" / name
    pre = w["pre"]
    record = search(cfg, method, 0.5, 0, w["src"] / "manifest.json", pre / "model.safetensors",
                           pre / "arch.json", pre / "metrics.json", out / "model.safetensors", out / "arch.json",
                           out / "record.json", job)
    return record, out


@pytest.mark.parametrize(("method", "overrides", "key", "step", "resumed"), SEARCHES,
                         ids=[f"{s[0]}-{s[1].get('weights', 'default')}-step{s[3]}" for s in SEARCHES])
def test_search_interrupted_mid_training_resumes_bit_identically(stage_world, monkeypatch, method, overrides, key,
                                                                 step, resumed):
    w = stage_world
    cfg = copy.deepcopy(w["cfg"])
    cfg[method].update(overrides)
    tag = f"{method}-{overrides.get('weights', 'default')}-{step}"
    with monkeypatch.context() as m:
        ref_curves = _record_metrics(m)
        ref, ref_out = _search(w, cfg, method, f"{tag}-ref", _job(w["tmp"], "search", method=tag, r="ref"))
    with monkeypatch.context() as m:
        _interrupt_metrics(m, key, step)
        with pytest.raises(Interrupted):
            _search(w, cfg, method, tag, _job(w["tmp"], "search", method=tag, r="killed"))
    ck_dir, _ = checkpoint_location(w["tmp"] / "search" / tag)
    assert (ck_dir / MANIFEST).is_file()
    job = _job(w["tmp"], "search", method=tag, r="resumed")
    with monkeypatch.context() as m:
        curves = _record_metrics(m)
        rec, out = _search(w, cfg, method, tag, job)
    assert re.search(rf"{method}: resumed from checkpoint {re.escape(resumed)}", job.log_path.read_text())
    # every epoch (step) trained after the resume logs exactly the values of the uninterrupted run
    training = [c for c in curves if c[1] is not None]
    assert training and training == [c for c in ref_curves if c[1] is not None][-len(training):]
    assert rec["status"] == ref["status"] == "ok"
    assert sha256_file(out / "model.safetensors") == sha256_file(ref_out / "model.safetensors")
    assert read_json(out / "arch.json") == read_json(ref_out / "arch.json")
    a, b = read_json(out / "record.json"), read_json(ref_out / "record.json")
    assert a["info"] == b["info"] and a["keep"] == b["keep"]
    assert (a["achieved_params"], a["achieved_flops"]) == (b["achieved_params"], b["achieved_flops"])
    assert not ck_dir.exists()


# --- a real Snakemake job, killed with SIGKILL ----------------------------------------------------

PRETRAIN_OUT = "results/tiny/pretrain/r0/model.safetensors"
EPOCHS = 6


def _resume_project(dst: Path) -> Path:
    """A copy of this working tree whose default config is a one-target tiny study: digits,
    small_cnn [8, 16], 6 epochs of batch 8 (tens of milliseconds each, unloaded)."""
    dst.mkdir(parents=True)
    copy_worktree(dst)
    cfg = yaml.safe_load((ROOT / "tests/configs/tiny.yaml").read_text())
    cfg["methods"] = ["dense"]
    cfg["pretrain"] = {"epochs": EPOCHS, "patience": EPOCHS, "batch_size": 8, "threads": 1, "device": "cpu"}
    (dst / "config/config.yaml").write_text(yaml.safe_dump(cfg))
    return dst


def _snakemake(proj: Path, *args: str, **popen: object) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "snakemake"), "--cores", "1", *args], cwd=proj, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc: parent pid is the 4th field of /proc/<pid>/stat)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _wait(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


@pytest.mark.integration
@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc to find the job's processes")
def test_snakemake_job_killed_with_sigkill_resumes_to_identical_weights(tmp_path):
    """`kill -9` of Snakemake and its job mid-training, then `snakemake --rerun-incomplete`: the job
    resumes after the last checkpointed epoch and writes the very weights of an uninterrupted run."""
    whole, killed = _resume_project(tmp_path / "whole"), _resume_project(tmp_path / "killed")
    reference = _snakemake(whole, PRETRAIN_OUT)
    victim = _snakemake(killed, PRETRAIN_OUT, start_new_session=True)
    manifest = study_dir(killed) / "checkpoints/pretrain/r0" / MANIFEST
    deadline = time.monotonic() + 300
    while True:  # kill as soon as the checkpoint holds two epochs, while later epochs are training
        try:
            if len(json.loads(manifest.read_text())["state"]["history"]) >= 2:
                break
        except (OSError, ValueError, KeyError):
            pass
        assert victim.poll() is None, f"snakemake ended before a checkpoint:\n{victim.communicate()[0][-4000:]}"
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.005)
    procs = _descendants(victim.pid)
    os.killpg(victim.pid, signal.SIGKILL)  # Snakemake and everything in its process group...
    for pid in procs:  # ...and the job, wherever Snakemake put it
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    victim.communicate(timeout=60)
    assert victim.returncode == -signal.SIGKILL
    assert not (study_dir(killed) / "pretrain/r0/metrics.json").exists(), "the job finished before it was killed"
    done = len(json.loads(manifest.read_text())["state"]["history"])
    assert done >= 2

    run([str(BIN / "snakemake"), "--unlock"], killed)  # the killed Snakemake left its lock behind
    _wait(_snakemake(killed, "--rerun-incomplete", PRETRAIN_OUT))
    log = (study_dir(killed, "logs") / "pretrain/r0.log").read_text()
    assert f"resumed from checkpoint after epoch {done}/{EPOCHS}" in log
    assert f"epoch {done}/{EPOCHS} loss" not in log and (done == EPOCHS or f"epoch {done + 1}/{EPOCHS}" in log)
    _wait(reference)

    a, b = (read_json(study_dir(p) / "pretrain/r0/metrics.json") for p in (killed, whole))
    assert sha256_file(killed / PRETRAIN_OUT) == sha256_file(whole / PRETRAIN_OUT) == a["weights_sha256"]
    assert a["history"] == b["history"] and a["best_epoch"] == b["best_epoch"]
    assert a["resumed_after_epoch"] == done and b["resumed_after_epoch"] is None
    for proj in (whole, killed):  # the checkpoint is gone once the outputs are written
        assert not (study_dir(proj) / "checkpoints").exists()
