"""DNAL (architecture stage, lambda_a bisection) and Network Slimming: budgets, gates, equivalence."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from pruneshot.config import load_schema, validate_config
from pruneshot.data.prepare import load_raw
from pruneshot.data.splits import Split
from pruneshot.methods import SearchContext, get_method
from pruneshot.methods import dnal as dnal_mod
from pruneshot.methods import slimming as slim_mod
from pruneshot.models import cost as metrics
from pruneshot.models import surgery
from pruneshot.models.small_cnn import SmallCNN
from pruneshot.training import pretrain

ROOT = Path(__file__).resolve().parents[1]
WIDTHS = [32, 64, 128]
GROUPS = ["block0", "block1", "block2"]
# Small but real: stage A runs 10 epochs of 4 mini-batches per lambda_a trial.
DNAL_DEFAULTS = dnal_mod.DNALOptions.defaults()
FAST_DNAL = {"search_steps": 3, "keep_arch_bn_stats": False}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def digits() -> tuple[Split, Split]:
    """240 training and 60 validation images of digits 0-4, scaled and normalised."""
    raw = load_raw("digits")
    idx = np.flatnonzero(np.isin(raw.y, [0, 1, 2, 3, 4]))
    idx = np.random.default_rng(0).permutation(idx)[:300]
    x = torch.from_numpy(raw.x[idx]).float() / raw.max_value
    y = torch.from_numpy(raw.y[idx])
    x = (x - x[60:].mean()) / x[60:].std()
    return Split(x[60:], y[60:]), Split(x[:60], y[:60])


@pytest.fixture(scope="module")
def dense(digits) -> SmallCNN:
    """A SmallCNN briefly trained on the digits above (eval mode)."""
    torch.manual_seed(0)
    model = SmallCNN(in_channels=1, input_size=8, widths=WIDTHS, num_classes=5)
    train, val = digits
    model, _ = pretrain(model, train, val, epochs=6, batch_size=64, lr=0.05, momentum=0.9, weight_decay=5e-4,
                        patience=6, seed=0, log=lambda _m: None)
    return model.eval()


def _ctx(model, digits, budget, *, metric="params", seed=5, options=None) -> SearchContext:
    train, val = digits
    return SearchContext(model=model, budget=budget, metric=metric, source_train=train, source_val=val, seed=seed,
                         options=dict(options or {}), log=lambda _m: None)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_pruned_equals_masked(pruned: nn.Module, dense_model: nn.Module, keep) -> None:
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with surgery.channel_masks(dense_model, surgery.keep_to_masks(dense_model, keep)):
            masked = dense_model.eval()(x)
        out = pruned.eval()(x)
    assert (out - masked).abs().max().item() < 1e-5


def _check_keep(res, pruned_widths) -> None:
    assert sorted(res.keep) == GROUPS
    for i, g in enumerate(GROUPS):
        idx = res.keep[g]
        assert idx == sorted(set(idx))
        assert all(0 <= j < WIDTHS[i] for j in idx)
        assert len(idx) == pruned_widths[i] >= 1


@pytest.fixture(scope="module")
def dnal_results(dense, digits):
    out = {}
    for budget in (0.5, 0.25):
        model = copy.deepcopy(dense)
        before = _state(model)
        out[budget] = (model, before, get_method("dnal").search(_ctx(model, digits, budget, options=FAST_DNAL)))
    return out


@pytest.fixture(scope="module")
def slim_results(dense, digits):
    out = {}
    for budget, metric in ((0.5, "params"), (0.25, "params"), (0.5, "flops")):
        model = copy.deepcopy(dense)
        out[budget, metric] = (model, get_method("slimming").search(_ctx(model, digits, budget, metric=metric)))
    return out


# ----------------------------------------------------------------------------------- registry, config


@pytest.mark.parametrize("name", ["dnal", "slimming"])
def test_registered_as_source_methods(name):
    method = get_method(name)
    assert method.side == "source"
    assert method.name == name
    assert not method.budget_free
    assert method.provenance == {"dnal": "official code", "slimming": "baseline"}[name]
    assert method.reference


def test_schema_defaults_match_the_code():
    schema = load_schema()
    assert {"dnal", "slimming"} <= set(schema["properties"]["methods"]["items"]["enum"])
    with open(ROOT / "config" / "config.yaml") as f:
        raw = yaml.safe_load(f)
    raw["methods"] = ["dnal", "slimming"]
    raw.pop("dnal", None)
    raw.pop("slimming", None)
    cfg = validate_config(raw, schema)
    assert cfg["dnal"] == dnal_mod.DNALOptions.defaults()
    assert cfg["slimming"] == slim_mod.SlimmingOptions.defaults()
    assert get_method("dnal").options_class is dnal_mod.DNALOptions
    assert get_method("slimming").options_class is slim_mod.SlimmingOptions
    for section in ("dnal", "slimming"):
        sub = schema["properties"][section]
        assert sub["additionalProperties"] is False
        assert all("description" in p and "default" in p for p in sub["properties"].values())


@pytest.mark.parametrize("name", ["dnal", "slimming"])
def test_unknown_option_is_an_error(name, dense, digits):
    with pytest.raises(ValueError, match="unknown option"):
        get_method(name).search(_ctx(copy.deepcopy(dense), digits, 0.5, options={"nope": 1}))


# ----------------------------------------------------------------------------------- DNAL


def test_gate_points_are_the_batchnorms(dense):
    points = dnal_mod.gate_points(dense)
    assert list(points) == GROUPS
    for g, block in zip(GROUPS, dense.blocks(), strict=True):
        assert points[g] == [block[1]]
        assert isinstance(points[g][0], nn.BatchNorm2d)

    other = nn.Linear(2, 2)
    other.spec = {"name": "other_net"}
    with pytest.raises(NotImplementedError, match="other_net"):
        dnal_mod.gate_points(other)


def test_gates_multiply_bn_output_and_detach_cleanly(dense):
    model = copy.deepcopy(dense).eval()
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(x)
        gates = dnal_mod.ChannelGates(model)
        assert all(torch.equal(a, torch.zeros(n)) for a, n in zip(gates.alpha.values(), WIDTHS, strict=True))
        gated = model(x)  # alpha = 0: every gate is 0.5, so the output changes
        assert not torch.allclose(gated, ref)
        # a large positive alpha opens every gate: the network is the plain one again
        for a in gates.alpha.values():
            a.fill_(1.0)
        gates.delta = 1e4
        assert torch.allclose(model(x), ref, atol=1e-6)
        # closing block1's gates equals masking block1 entirely at its mask point
        gates.alpha["block1"].fill_(-1.0)
        closed = model(x)
        gates.remove()
        with surgery.channel_masks(model, {"block1": torch.zeros(WIDTHS[1])}):
            assert torch.allclose(closed, model(x), atol=1e-6)
        assert torch.allclose(model(x), ref)
    assert all(not bn._forward_hooks for bns in dnal_mod.gate_points(model).values() for bn in bns)


def test_delta_schedule_reaches_1e4_in_the_last_epoch():
    for epochs in (1, 3, 10):
        sched = dnal_mod.delta_schedule(epochs)
        assert len(sched) == epochs
        assert sched[-1] == pytest.approx(1e4, rel=1e-12)
        # delta starts at 1 and is multiplied by 10^(4/E) before every epoch
        ratios = np.array(sched) / np.array([1.0, *sched[:-1]])
        assert np.allclose(ratios, 10 ** (4 / epochs))


def test_dnal_info_delta_schedule_and_history(dnal_results):
    _, _, res = dnal_results[0.5]
    info = res.info
    assert len(info["delta_schedule"]) == DNAL_DEFAULTS["arch_epochs"] == 10
    assert info["delta_schedule"][-1] == pytest.approx(1e4)
    assert info["delta_schedule"][0] == pytest.approx(10**0.4)
    assert info["final_delta"] == pytest.approx(1e4)
    assert [row["delta"] for row in info["arch_history"]] == info["delta_schedule"]
    assert info["alpha_init"] == 0.0


def test_stage_a_resets_alpha_to_zero_and_delta_to_one(dense, digits):
    model = copy.deepcopy(dense)
    gates = dnal_mod.ChannelGates(model)
    with torch.no_grad():
        for a in gates.alpha.values():
            a.normal_(generator=torch.Generator().manual_seed(3))
    gates.delta = 123.0
    seen = []

    def on_epoch_start(epoch, g):
        seen.append((epoch, g.delta, torch.cat([a.detach().clone() for a in g.alpha.values()])))
        # during stage A nothing of the network receives gradients (train_fc off), every alpha does
        assert not any(p.requires_grad for p in model.parameters())
        assert all(a.requires_grad for a in g.alpha.values())
        assert model.training  # BN in train mode

    dnal_mod.arch_stage(model, gates, digits[0], lam=1e-3, epochs=4, lr=0.01, momentum=0.9, batch_size=64,
                        generator=torch.Generator().manual_seed(0), on_epoch_start=on_epoch_start)
    assert [s[0] for s in seen] == [0, 1, 2, 3]
    assert seen[0][1] == pytest.approx(10.0)  # 1 * 10^(4/4)
    assert torch.equal(seen[0][2], torch.zeros(sum(WIDTHS)))  # alpha starts at exactly 0
    assert not torch.equal(seen[-1][2], torch.zeros(sum(WIDTHS)))  # and trains
    assert gates.delta == pytest.approx(1e4)
    gates.remove()


@pytest.mark.parametrize("train_fc", [False, True])
def test_stage_a_trains_only_alpha_and_optionally_fc(dense, digits, train_fc):
    model = copy.deepcopy(dense)
    params_before = {k: v.detach().clone() for k, v in model.named_parameters()}
    stats_before = {k: v.detach().clone() for k, v in model.named_buffers() if "running" in k}
    gates = dnal_mod.ChannelGates(model)
    dnal_mod.arch_stage(model, gates, digits[0], lam=1e-3, epochs=3, lr=0.01, momentum=0.9, batch_size=64,
                        generator=torch.Generator().manual_seed(0), train_fc=train_fc)
    gates.remove()
    for name, p in model.named_parameters():
        if name.startswith("classifier."):
            assert torch.equal(p, params_before[name]) is not train_fc, name
        else:  # conv and BN weights/biases are frozen
            assert torch.equal(p, params_before[name]), name
        assert p.requires_grad  # the freeze is undone afterwards
    assert not torch.equal(torch.cat([a.detach() for a in gates.alpha.values()]), torch.zeros(sum(WIDTHS)))
    # BN ran in train mode: its running statistics moved
    assert any(not torch.equal(v, stats_before[k]) for k, v in model.named_buffers() if k in stats_before)


@pytest.mark.parametrize("budget", [0.5, 0.25])
def test_dnal_pruned_equals_masked_dense(dnal_results, dense, budget):
    model, before, res = dnal_results[budget]
    assert isinstance(res.model, SmallCNN)
    _check_keep(res, res.model.spec["widths"])
    # the given model is untouched (gates hooked a copy) and has no hooks left
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(not m._forward_hooks for m in model.modules())
    assert all(not m._forward_hooks for m in res.model.modules())
    # keep_arch_bn_stats=false: the pruned net is exactly the pretrained net with channels removed
    _assert_pruned_equals_masked(res.model, model, res.keep)
    _assert_pruned_equals_masked(res.model, dense, res.keep)


def test_dnal_keep_arch_bn_stats_keeps_stage_a_statistics(dense, digits, dnal_results):
    model = copy.deepcopy(dense)
    opts = {**FAST_DNAL, "keep_arch_bn_stats": True}
    res = get_method("dnal").search(_ctx(model, digits, 0.5, options=opts))
    ref = dense.pruned(res.keep)
    got, want = res.model.state_dict(), ref.state_dict()
    for k in want:
        if "running" in k:
            assert not torch.equal(got[k], want[k]), k
        elif "num_batches" not in k:
            assert torch.equal(got[k], want[k]), k
    # the architecture itself does not depend on the option
    assert res.keep == dnal_results[0.5][2].keep
    assert res.info["bn_stats"].startswith("after stage A")


def test_dnal_train_fc_option_changes_only_the_head(dense, digits, dnal_results):
    res = get_method("dnal").search(
        _ctx(copy.deepcopy(dense), digits, 0.5, options={**FAST_DNAL, "train_fc_in_arch_stage": True}))
    ref = dense.pruned(res.keep)
    got, want = res.model.state_dict(), ref.state_dict()
    for k in want:
        if k.startswith("classifier."):
            assert not torch.equal(got[k], want[k]), k
        else:
            assert torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("budget", [0.5, 0.25])
def test_dnal_reports_requested_and_achieved(dnal_results, dense, budget):
    _, _, res = dnal_results[budget]
    info = res.info
    achieved = metrics.cost(res.model, "params") / metrics.cost(dense, "params")
    assert info["requested_budget"] == budget
    assert info["achieved_ratio"] == pytest.approx(achieved)
    assert info["gap"] == pytest.approx(budget - achieved)
    assert len(info["tried"]) == FAST_DNAL["search_steps"]
    lams = [t["lambda_a"] for t in info["tried"]]
    assert info["lambda_a"] in lams
    assert all(DNAL_DEFAULTS["lambda_min"] < lam < DNAL_DEFAULTS["lambda_max"] for lam in lams)
    assert lams[0] == pytest.approx(10 ** ((np.log10(1e-6) + np.log10(1e-1)) / 2))
    below = [t["achieved_ratio"] for t in info["tried"] if t["achieved_ratio"] <= budget]
    if below:  # the largest ratio not above the budget is the one returned
        assert info["met_from_below"]
        assert achieved == pytest.approx(max(below))
    else:
        assert achieved == pytest.approx(min(t["achieved_ratio"] for t in info["tried"]))
    assert info["widths"] == {g: len(i) for g, i in res.keep.items()}


def test_dnal_bisection_moves_lambda_with_the_achieved_size(dnal_results):
    tried = dnal_results[0.25][2].info["tried"]
    for prev, nxt in itertools.pairwise(tried):
        if prev["achieved_ratio"] > 0.25:
            assert nxt["lambda_a"] > prev["lambda_a"]
        else:
            assert nxt["lambda_a"] < prev["lambda_a"]


def test_dnal_budget_one_returns_dense(dense, digits):
    model = copy.deepcopy(dense)
    res = get_method("dnal").search(_ctx(model, digits, 1.0))
    assert metrics.count_params(res.model) == metrics.count_params(dense)
    shape = metrics.input_shape(dense.spec)
    assert metrics.count_flops(res.model, shape) == metrics.count_flops(dense, shape)
    assert res.info["requested_budget"] == 1.0
    assert res.info["achieved_ratio"] == 1.0


def test_dnal_keeps_at_least_one_channel_per_group(dense, digits):
    # a penalty this large closes every gate; each group keeps its largest-alpha channel
    opts = {"search_steps": 1, "lambda_min": 10.0, "lambda_max": 100.0, "arch_epochs": 3}
    res = get_method("dnal").search(_ctx(copy.deepcopy(dense), digits, 0.25, options=opts))
    assert res.model.spec["widths"] == [1, 1, 1]
    assert sorted(res.info["forced_keep"]) == GROUPS
    assert {g: [i] for g, i in res.info["forced_keep"].items()} == res.keep


def test_gates_keep_threshold_and_forced_top_alpha(dense):
    gates = dnal_mod.ChannelGates(copy.deepcopy(dense))
    gates.delta = 1e4
    with torch.no_grad():
        gates.alpha["block0"].fill_(-1.0)
        gates.alpha["block0"][7] = -0.5  # the largest alpha of a group with no open gate
        gates.alpha["block1"].fill_(-1.0)
        gates.alpha["block1"][[3, 10]] = 1e-3  # sigmoid(10) > 0.9
        gates.alpha["block1"][11] = 1e-4  # sigmoid(1) < 0.9: dropped
        gates.alpha["block2"].fill_(1.0)
    keep, forced = gates.keep(0.9)
    gates.remove()
    assert keep == {"block0": [7], "block1": [3, 10], "block2": list(range(128))}
    assert forced == {"block0": 7}


def test_dnal_is_deterministic_for_a_seed(dense, digits):
    opts = {"search_steps": 2, "arch_epochs": 3}
    a = get_method("dnal").search(_ctx(copy.deepcopy(dense), digits, 0.5, seed=7, options=opts))
    torch.manual_seed(999)  # the global RNG does not matter
    b = get_method("dnal").search(_ctx(copy.deepcopy(dense), digits, 0.5, seed=7, options=opts))
    assert a.keep == b.keep
    assert a.info["tried"] == b.info["tried"]
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items(), strict=True):
        assert ka == kb
        assert torch.equal(va, vb)


# ----------------------------------------------------------------------------------- slimming


@pytest.mark.parametrize("key", [(0.5, "params"), (0.25, "params"), (0.5, "flops")], ids=str)
def test_slimming_meets_budget_within_two_points(slim_results, dense, key):
    budget, metric = key
    _, res = slim_results[key]
    ratio = metrics.cost(res.model, metric) / metrics.cost(dense, metric)
    assert budget - 0.02 <= ratio <= budget + 1e-12, ratio
    assert res.info["achieved_ratio"] == pytest.approx(ratio)
    assert res.info["gap"] == pytest.approx(budget - ratio)
    assert res.info["requested_budget"] == budget
    _check_keep(res, res.model.spec["widths"])


@pytest.mark.parametrize("key", [(0.5, "params"), (0.25, "params")], ids=str)
def test_slimming_pruned_equals_masked_finetuned_dense(slim_results, dense, key):
    finetuned, res = slim_results[key]
    # the pruned network carries the fine-tuned weights, not the pretrained ones
    assert not torch.equal(finetuned.blocks()[0][0].weight, dense.blocks()[0][0].weight)
    _assert_pruned_equals_masked(res.model, finetuned, res.keep)
    idx = torch.tensor(res.keep["block0"])
    assert torch.equal(res.model.blocks()[0][0].weight, finetuned.blocks()[0][0].weight[idx])


@pytest.mark.parametrize("key", [(0.5, "params"), (0.25, "params")], ids=str)
def test_slimming_keeps_globally_largest_gammas(slim_results, key):
    finetuned, res = slim_results[key]
    # the masked form was rescaled with the pruned network (gamma / c per group): undo it for the ranking
    c = res.info["gamma_rescale"]
    gammas = {g: ws[0].detach().abs() * c.get(g, 1.0) for g, ws in slim_mod.bn_gammas(finetuned).items()}
    assert all(torch.allclose(gammas[g], s * c.get(g, 1.0)) for g, s in slim_mod.gamma_scores(finetuned).items())
    top = {g: int(torch.argmax(s)) for g, s in gammas.items()}
    kept, dropped = [], []
    for g, s in gammas.items():
        for c in range(len(s)):
            if c in res.keep[g]:
                if c != top[g]:
                    kept.append(float(s[c]))
            else:
                dropped.append(float(s[c]))
        assert top[g] in res.keep[g]
    # one global threshold: the global_kept-th largest |gamma|; every (non-forced) kept channel is at
    # or above it and every dropped channel at or below it
    thr = res.info["gamma_threshold"]
    ranked = sorted((float(v) for s in gammas.values() for v in s), reverse=True)
    assert thr == pytest.approx(ranked[res.info["global_kept"] - 1])
    assert min(kept) >= thr >= max(dropped)


def test_slimming_l1_shrinks_gammas(dense, digits):
    sums = {}
    for l1 in (0.0, 0.05):
        model = copy.deepcopy(dense)
        slim_mod.sparsity_finetune(model, digits[0], l1=l1, epochs=3, lr=0.01, momentum=0.9, batch_size=64, seed=0)
        sums[l1] = sum(float(w.detach().abs().sum()) for ws in slim_mod.bn_gammas(model).values() for w in ws)
    assert sums[0.05] < sums[0.0] - 1.0


def test_slimming_budget_one_returns_dense_unchanged(dense, digits):
    model = copy.deepcopy(dense)
    res = get_method("slimming").search(_ctx(model, digits, 1.0))
    assert metrics.count_params(res.model) == metrics.count_params(dense)
    shape = metrics.input_shape(dense.spec)
    assert metrics.count_flops(res.model, shape) == metrics.count_flops(dense, shape)
    for k, v in res.model.state_dict().items():  # no fine-tune happened
        assert torch.equal(v, dense.state_dict()[k]), k


def test_slimming_is_deterministic_for_a_seed(dense, digits):
    runs = [get_method("slimming").search(_ctx(copy.deepcopy(dense), digits, 0.5, seed=s)) for s in (3, 3, 4)]
    a, b, c = runs
    assert a.keep == b.keep
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items(), strict=True):
        assert ka == kb
        assert torch.equal(va, vb)
    # another seed changes the mini-batch order, hence the fine-tuned weights
    assert not torch.equal(a.model.classifier.weight, c.model.classifier.weight) or a.keep != c.keep
