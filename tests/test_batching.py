"""The batched episode engine (pruneshot.batching, transfer.episode_batch) against the reference engine
(one network at a time), and resumable transfer jobs.

Exactness: in float64 a chunk's trained weights equal one-at-a-time fine-tuning's to 1e-12 (often
bit for bit; small_cnn, resnet20; every arm's training: finetune, linear_probe cached and augmented,
the reinit arm's batch-statistics BatchNorm). In float32 the stacked layers sum in another order, so the
tolerance accepted is: every weight within 1e-5 of the reference after the episode's steps (measured:
about 6e-8 after 60 steps on small_cnn), and on the transfer stage every per-episode accuracy of every
method and arm identical (asserted, on the tiny small_cnn config and a resnet20 variant of it)."""

from __future__ import annotations

import copy

import pytest
import torch
from test_transfer_stage import _transfer_job
from test_transfer_stage import world as world  # the shared fixture

from pruneshot.batching import finetune_batched, groups_by_architecture, stack_networks, stackable
from pruneshot.data.pipeline import Augment
from pruneshot.methods import ARMS, available, get_method
from pruneshot.models.base import build_seeded
from pruneshot.runtime.checkpoint import Checkpointer
from pruneshot.stages.transfer import support_bn_statistics
from pruneshot.training import finetune_episode

SMALL = {"name": "small_cnn", "in_channels": 1, "input_size": 8, "widths": [8, 16], "num_classes": 5}
RESNET = {"name": "resnet20", "in_channels": 3, "input_size": 8, "num_classes": 5,
          "widths": {"stage1": 4, "s1b0": 4, "s1b1": 4, "s1b2": 4, "stage2": 8, "s2b0": 8, "s2b1": 8, "s2b2": 8,
                     "stage3": 8, "s3b0": 8, "s3b1": 8, "s3b2": 8}}


def _episodes(spec: dict, k: int, n: int, dtype: torch.dtype) -> tuple[list, list, list]:
    """K headed copies of one seeded network (heads drawn per episode) and K support sets of n images."""
    base = build_seeded(spec, 0).to(dtype).eval()
    g = torch.Generator().manual_seed(1)
    c, s = spec["in_channels"], spec["input_size"]
    models = []
    for i in range(k):
        m = copy.deepcopy(base)
        m.reset_classifier(5, torch.Generator().manual_seed(100 + i))
        models.append(m.to(dtype).eval())
    xs = [torch.randn(n, c, s, s, generator=g, dtype=dtype) for _ in range(k)]
    ys = [torch.arange(5).repeat(n // 5) for _ in range(k)]
    return models, xs, ys


def _both(spec: dict, dtype: torch.dtype, k: int = 3, n: int = 10, **kw) -> tuple[list, list]:
    """(reference networks, batched networks) after the same fine-tuning."""
    models, xs, ys = _episodes(spec, k, n, dtype)
    ref = [copy.deepcopy(m) for m in models]
    for i, m in enumerate(ref):
        finetune_episode(m, xs[i], ys[i], seed=1000 + i, **kw)
    bat = [copy.deepcopy(m) for m in models]
    finetune_batched(bat, xs, ys, seeds=[1000 + i for i in range(k)], **kw)
    for a, b in zip(models, bat, strict=True):  # the training moved the weights
        assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    return ref, bat


CASES = {
    "finetune, subsampled": dict(arm="finetune", batch_size=5),
    "finetune, crop_flip": dict(arm="finetune", batch_size=10, augment=Augment(crop_padding=2, flip=True), fill=-0.5),
    "linear_probe, cached features": dict(arm="linear_probe", batch_size=5),
    "linear_probe, crop_flip": dict(arm="linear_probe", batch_size=10, augment=Augment(crop_padding=1, flip=True)),
    "reinit (batch statistics)": dict(arm="finetune", batch_size=5, batch_norm="batch",
                                      augment=Augment(crop_padding=1, flip=True)),
}


@pytest.mark.parametrize("spec", [SMALL, RESNET], ids=["small_cnn", "resnet20"])
@pytest.mark.parametrize("case", list(CASES))
def test_float64_chunks_train_like_one_network_at_a_time_to_rounding(spec, case):
    kw = {"steps": 6, "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, **CASES[case]}
    ref, bat = _both(spec, torch.float64, **kw)
    for a, b in zip(ref, bat, strict=True):
        for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            if name.endswith(("running_mean", "running_var", "num_batches_tracked")) and kw.get("batch_norm"):
                continue  # the reinit arm's running statistics are set from the support set afterwards
            torch.testing.assert_close(p, q, rtol=0, atol=1e-12, msg=f"{case}: {name} differs")


@pytest.mark.parametrize("spec", [SMALL, RESNET], ids=["small_cnn", "resnet20"])
def test_float32_chunks_stay_within_the_stated_tolerance(spec):
    kw = {"arm": "finetune", "steps": 30, "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "batch_size": 5}
    ref, bat = _both(spec, torch.float32, k=4, **kw)
    worst = max(float((p - q).abs().max()) for a, b in zip(ref, bat, strict=True)
                for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert worst < 1e-5


def test_the_reinit_arm_scores_with_support_statistics_after_a_batched_chunk():
    """After training with batch statistics, each network's running statistics come from its own
    support set (support_bn_statistics), so the scored networks equal the reference ones."""
    kw = {"arm": "finetune", "steps": 4, "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0, "batch_size": 5,
          "batch_norm": "batch"}
    models, xs, ys = _episodes(SMALL, 2, 10, torch.float64)
    ref, bat = [copy.deepcopy(m) for m in models], [copy.deepcopy(m) for m in models]
    for i, m in enumerate(ref):
        finetune_episode(m, xs[i], ys[i], seed=7 + i, **kw)
        support_bn_statistics(m, xs[i], 7 + i)
    finetune_batched(bat, xs, ys, seeds=[7, 8], **kw)
    for i, m in enumerate(bat):
        support_bn_statistics(m, xs[i], 7 + i)
    for a, b in zip(ref, bat, strict=True):
        for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
            assert torch.equal(p, q)


def test_stacked_network_computes_each_network_on_its_own_channels():
    models, xs, _ys = _episodes(RESNET, 3, 5, torch.float64)
    net = stack_networks(models).eval()
    out = net(torch.stack(xs).transpose(0, 1).reshape(5, -1, 8, 8))  # (B, K, ways)
    for i, m in enumerate(models):
        torch.testing.assert_close(out[:, i], m(xs[i]), rtol=0, atol=1e-12)


def test_grouping_refuses_what_cannot_be_stacked():
    a, b = build_seeded(SMALL, 0), build_seeded({**SMALL, "widths": [8, 12]}, 0)
    assert groups_by_architecture([a, b, copy.deepcopy(a)]) == [[0, 2], [1]]
    assert stackable(a)
    odd = copy.deepcopy(a)
    odd.features[1] = torch.nn.Dropout()  # not channel-wise: refused
    assert not stackable(odd)
    with pytest.raises(ValueError, match="architecture"):
        finetune_batched([a, b], [torch.zeros(5, 1, 8, 8)] * 2, [torch.arange(5)] * 2, seeds=[0, 1], arm="finetune",
                         steps=1, lr=0.1, momentum=0.0, weight_decay=0.0, batch_size=5)


def test_a_non_finite_loss_in_a_chunk_fails_it_naming_the_network():
    models, xs, ys = _episodes(SMALL, 2, 10, torch.float32)
    xs[1] = xs[1] * float("nan")
    with pytest.raises(FloatingPointError, match=r"network\(s\) \[1\]"):
        finetune_batched(models, xs, ys, seeds=[0, 1], arm="finetune", steps=2, lr=0.1, momentum=0.9,
                         weight_decay=0.0, batch_size=5)


# --- the transfer stage: every method and arm, chunks vs one episode at a time --------------------------

def _with(world: dict, **transfer: object) -> dict:
    cfg = copy.deepcopy(world["cfg"])
    cfg["transfer"].update(transfer)
    return cfg


def _per_episode(rec: dict) -> dict:
    return {arm: [(e["episode"], e["accuracy"], e.get("network_accuracies")) for e in r["episodes"]]
            for arm, r in rec["arms"].items()}


@pytest.fixture(scope="module")
def resnet_world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny config's data and episodes with a resnet20 backbone (width x 0.25), pretrained."""
    from test_transfer_stage import ROOT, _job

    from pruneshot.config import load_config
    from pruneshot.stages.data import make_episodes, prepare_source, prepare_target
    from pruneshot.stages.pretrain import pretrain

    tmp = tmp_path_factory.mktemp("resnet")
    cfg = load_config(ROOT / "tests/configs/tiny.yaml")
    cfg["backbone"] = {"name": "resnet20", "width_mult": 0.25}
    cfg["episodes"]["count"] = 3
    cfg["transfer"]["steps"] = 8
    cfg["data"]["cache_dir"] = str(tmp / "cache")
    src, tgt, pre = tmp / "source", tmp / "target", tmp / "pretrain"
    prepare_source(cfg, src, _job("prepare_source"))
    prepare_target(cfg, "digits_5to9", tgt, _job("prepare_target"))
    make_episodes(cfg, "digits_5to9", 5, 2, tgt / "manifest.json", tmp / "episodes.json", _job("make_episodes"))
    pretrain(cfg, 0, src / "manifest.json", pre / "model.safetensors", pre / "arch.json", pre / "metrics.json",
             _job("pretrain"))
    return {"cfg": cfg, "tmp": tmp, "src": src, "tgt": tgt, "episodes": tmp / "episodes.json", "pre": pre}


@pytest.mark.parametrize("backbone", ["small_cnn", "resnet20"])
@pytest.mark.parametrize("method", available())
def test_transfer_in_chunks_gives_every_episode_the_reference_accuracy(request, monkeypatch, backbone, method):
    """Every method and arm, chunks of 2 against one episode at a time: identical per-episode accuracies
    (and per-network ones for random's masks), with the batched engine really training the chunks."""
    import pruneshot.batching

    world = request.getfixturevalue("world" if backbone == "small_cnn" else "resnet_world")
    calls: list[int] = []
    batched = pruneshot.batching.finetune_batched
    monkeypatch.setattr(pruneshot.batching, "finetune_batched",
                        lambda models, *a, **k: calls.append(len(models)) or batched(models, *a, **k))
    m = get_method(method)
    arms = m.arms(list(ARMS))
    budget = 1.0 if m.budget_free else 0.5
    tag = world["tmp"] / "chunks"
    ref = _transfer_job(world, method, budget, arms, _with(world, episode_batch=1), out=tag / f"{method}_1.json")
    got = _transfer_job(world, method, budget, arms, _with(world, episode_batch=2), out=tag / f"{method}_2.json")
    assert ref["status"] == got["status"] == "ok"
    assert ref["device"]["episode_batch"] == 1 and got["device"]["episode_batch"] == 2
    assert len(ref["episode_seeds"]) == 3  # chunks of 2: one full, one partial
    assert _per_episode(got) == _per_episode(ref)
    trained = [a for a in arms if a != "prototype"]
    if trained and (m.side == "source" or m.budget_free):  # one architecture per cell: every chunk is stacked
        assert calls and max(calls) >= 2, calls
    assert got.get("adapted", []) == [] or [a["spec"] for a in got["adapted"]] == [a["spec"] for a in ref["adapted"]]


def test_auto_is_the_reference_engine_on_the_cpu(world):
    rec = _transfer_job(world, "dense", 1.0, ["finetune"], _with(world, episode_batch="auto"),
                        out=world["tmp"] / "chunks" / "auto.json")
    assert rec["device"] == {**rec["device"], "device": "cpu", "episode_batch": 1}


# --- resumable transfer ----------------------------------------------------------------------------------

class Interrupted(BaseException):
    """A simulated kill (not an Exception, so the stage does not record a failed cell)."""


@pytest.mark.parametrize("method", ["random", "basis_scaling"])
def test_a_killed_transfer_job_resumes_at_the_next_chunk_bit_identically(world, monkeypatch, method):
    arms = ["finetune", "prototype"]
    cfg = _with(world, episode_batch=1)
    out = world["tmp"] / "resume" / f"{method}.json"
    ref = _transfer_job(world, method, 0.5, arms, cfg, out=world["tmp"] / "resume" / f"{method}_ref.json")
    saves: list[int] = []
    original = Checkpointer.save

    def save_then_die(self, tensors, state):
        original(self, tensors, state)
        saves.append(state["done"])
        if len(saves) == 2:
            raise Interrupted("killed after the second chunk")

    with monkeypatch.context() as m:
        m.setattr(Checkpointer, "save", save_then_die)
        with pytest.raises(Interrupted):
            _transfer_job(world, method, 0.5, arms, cfg, out=out)
    assert saves == [1, 2] and not out.exists()
    ck_dirs = list((world["tmp"] / "resume" / ".checkpoints").iterdir())
    assert [d.name for d in ck_dirs] == [method]  # the job's checkpoint survived the kill
    got = _transfer_job(world, method, 0.5, arms, cfg, out=out)
    assert got["resumed"]["after_episode"] == 2 and ref["resumed"] is None
    assert _per_episode(got) == _per_episode(ref)
    def timeless(rec: dict) -> list[dict]:
        return [{k: v for k, v in a.items() if k != "adapt_seconds"} for a in rec.get("adapted", [])]

    assert timeless(got) == timeless(ref)  # the same per-episode pruned networks (seconds aside)
    assert not (world["tmp"] / "resume" / ".checkpoints" / method).exists()  # cleared once the record is written


def test_a_checkpoint_of_other_settings_is_not_resumed(world, monkeypatch):
    out = world["tmp"] / "resume2" / "dense.json"

    original = Checkpointer.save

    def save_then_die(self, tensors, state):
        original(self, tensors, state)
        raise Interrupted("killed after the first chunk")

    with monkeypatch.context() as m:
        m.setattr(Checkpointer, "save", save_then_die)
        with pytest.raises(Interrupted):
            _transfer_job(world, "dense", 1.0, ["finetune"], _with(world, episode_batch=1), out=out)
    rec = _transfer_job(world, "dense", 1.0, ["finetune"], _with(world, episode_batch=1, lr=0.02), out=out)
    assert rec["resumed"] is None and len(rec["arms"]["finetune"]["episodes"]) == 3


@pytest.mark.parametrize("method", ["l1_filter", "channel_scaling", "basis_scaling", "double_pruning"])
def test_float64_transfer_records_its_precision_and_leaves_the_default_dtype(world, method):
    """Every side runs in float64 (a target-side adapt once handed its network back in float32, so every
    target-side cell failed under float64 and a comparison of two failed runs looked identical)."""
    rec = _transfer_job(world, method, 0.5, ["finetune"], _with(world, dtype="float64", episode_batch=2),
                        out=world["tmp"] / "chunks" / f"f64_{method}.json")
    assert rec["status"] == "ok", rec["error"]
    assert rec["device"]["dtype"] == "float64"
    assert torch.get_default_dtype() == torch.float32
    ref = _transfer_job(world, method, 0.5, ["finetune"], _with(world, dtype="float64", episode_batch=1),
                        out=world["tmp"] / "chunks" / f"f64_ref_{method}.json")
    assert ref["status"] == "ok", ref["error"]
    assert len(_per_episode(ref)["finetune"]) == world["cfg"]["episodes"]["count"]
    assert _per_episode(rec) == _per_episode(ref)
