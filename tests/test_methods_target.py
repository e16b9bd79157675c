"""Target-side pruning methods: basis_scaling, channel_scaling, double_pruning.

Budgets, physical == masked, cost accounting, determinism, what trains, round trips, options."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from pruneshot.config import load_schema
from pruneshot.io import load_tensors, save_tensors
from pruneshot.methods import AdaptContext, get_method
from pruneshot.methods import basis_scaling as bs_mod
from pruneshot.methods import channel_scaling as cs_mod
from pruneshot.methods import double_pruning as dp_mod
from pruneshot.models import base as models
from pruneshot.models import cost as metrics
from pruneshot.models import layers, surgery
from pruneshot.models.basis import BasisScalingConv, decompose
from pruneshot.models.layers import LowRankConv
from pruneshot.models.small_cnn import SmallCNN

NAMES = ["basis_scaling", "channel_scaling", "double_pruning"]
WIDTHS = [16, 32, 64]
WAYS = 5
N_SUPPORT = 25
BASIS_FIRST = {"order": "basis_first"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _pretrained() -> SmallCNN:
    """A SmallCNN with random O(1) weights and non-trivial BatchNorm statistics (eval mode), with a
    fresh seeded WAYS-way head, as the pipeline hands it to an episode."""
    gen = torch.Generator().manual_seed(0)
    model = SmallCNN(1, 8, WIDTHS, 10)
    with torch.no_grad():
        for b in model.blocks():
            conv, bn = b[0], b[1]
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * conv.weight[0].numel() ** -0.5)
            bn.weight.copy_(torch.rand(bn.weight.shape, generator=gen) * 1.5 + 0.25)
            bn.bias.copy_(torch.randn(bn.bias.shape, generator=gen) * 0.5)
            bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=gen) * 0.5)
            bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=gen) * 2.0 + 0.1)
            bn.num_batches_tracked.fill_(9)
    model.reset_classifier(WAYS, torch.Generator().manual_seed(1))
    return model.eval()


BASE = _pretrained()
SUPPORT_X = torch.randn(N_SUPPORT, 1, 8, 8, generator=torch.Generator().manual_seed(2))
SUPPORT_Y = torch.arange(N_SUPPORT) % WAYS
PROBE_X = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(3))


def _ctx(budget: float, metric: str = "params", options: dict | None = None, seed: int = 7,
         support: tuple[torch.Tensor, torch.Tensor] | None = None) -> AdaptContext:
    model = copy.deepcopy(BASE)
    x, y = support if support is not None else (SUPPORT_X, SUPPORT_Y)
    return AdaptContext(model=model, budget=budget, metric=metric, support_x=x, support_y=y, seed=seed,
                        dense_cost=float(metrics.cost(model, metric)), options=dict(options or {}),
                        log=lambda _m: None)


_CACHE: dict = {}


def _run(name: str, budget: float, metric: str = "params", options: dict | None = None):
    """(ctx, result) for one configuration, computed once per test session."""
    key = (name, budget, metric, json.dumps(options or {}, sort_keys=True))
    if key not in _CACHE:
        ctx = _ctx(budget, metric, options)
        _CACHE[key] = (ctx, get_method(name).adapt(ctx))
    return _CACHE[key]


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# (method, options) covering both orders of double pruning
VARIANTS = [("basis_scaling", {}), ("channel_scaling", {}), ("double_pruning", {}), ("double_pruning", BASIS_FIRST)]
VARIANT_IDS = ["basis", "channel", "double-channel-first", "double-basis-first"]


# ------------------------------------------------------------------ registration and options


def test_defaults_equal_the_schema():
    schema = load_schema()
    assert set(NAMES) <= set(schema["properties"]["methods"]["items"]["enum"])
    for name, cls in (("basis_scaling", bs_mod.BasisScalingOptions), ("channel_scaling", cs_mod.ChannelScalingOptions),
                      ("double_pruning", dp_mod.DoublePruningOptions)):
        assert get_method(name).options_class is cls
        section = schema["properties"][name]
        assert section["additionalProperties"] is False
        defaults = {k: p["default"] for k, p in section["properties"].items()}
        assert defaults == cls.defaults(), name
        assert all(type(cls.defaults()[k]) is type(v) for k, v in defaults.items()), name


@pytest.mark.parametrize("name", NAMES)
def test_registered_as_target_methods(name):
    method = get_method(name)
    assert method.side == "target"
    assert method.provenance == "abstract-level"
    assert "Wong et al. 2021" in method.reference
    assert method.arms(["finetune", "linear_probe", "reinit"]) == ["finetune", "linear_probe"]


@pytest.mark.parametrize("name", NAMES)
def test_unknown_or_bad_option_is_an_error_naming_it(name):
    with pytest.raises(ValueError, match="nope"):
        get_method(name).adapt(_ctx(0.5, options={"nope": 1}))
    bad = {"basis_scaling": {"importance": "magic"}, "channel_scaling": {"ranking": "magic"},
           "double_pruning": {"order": "magic"}}[name]
    with pytest.raises(ValueError, match=next(iter(bad))):
        get_method(name).adapt(_ctx(0.5, options=bad))


def test_double_pruning_nested_stage_options():
    with pytest.raises(ValueError, match="basis_scaling: unknown option"):
        get_method("double_pruning").adapt(_ctx(0.5, options={"basis_scaling": {"nope": 1}}))
    with pytest.raises(ValueError, match="channel_scaling"):
        get_method("double_pruning").adapt(_ctx(0.5, options={"channel_scaling": {"rounds": 0}}))
    opts = {"first_stage_exponent": 0.3, "channel_scaling": {"rounds": 1, "steps_per_round": 2},
            "basis_scaling": {"rounds": 2, "steps_per_round": 3, "importance": "mean_abs"}}
    ctx = _ctx(0.5, options=opts)
    res = get_method("double_pruning").adapt(ctx)
    info = res.info
    assert len(info["first_stage"]["rounds_history"]) == 1
    assert len(info["second_stage"]["rounds_history"]) == 2
    assert info["second_stage"]["importance"] == "mean_abs"
    assert info["basis_scaling_options"]["steps_per_round"] == 3
    assert info["channel_scaling_options"]["l1"] == cs_mod.ChannelScalingOptions.defaults()["l1"]
    assert info["first_stage_target_ratio"] == pytest.approx(0.5**0.3)
    assert info["first_stage_ratio"] <= 0.5**0.3
    assert ctx.options == opts  # the caller's dict is not consumed


# ------------------------------------------------------------------ budget 1


@pytest.mark.parametrize(("name", "options"), VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("metric", ["params", "flops"])
def test_budget_one_returns_the_model_unchanged_without_training(monkeypatch, name, options, metric):
    def no_training(*_a, **_k):
        raise AssertionError("adapt trained at budget 1")

    monkeypatch.setattr(torch.optim, "SGD", no_training)
    ctx = _ctx(1.0, metric, options)
    before = _state(ctx.model)
    res = get_method(name).adapt(ctx)
    assert res.model is ctx.model
    after = res.model.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert not res.model.training
    assert res.info["achieved_ratio"] == 1.0
    assert res.keep == {f"block{i}": list(range(w)) for i, w in enumerate(WIDTHS)}


# ------------------------------------------------------------------ physical network vs masked form


PRUNED_CASES = [
    ("basis_scaling", 0.5, "params", {}),
    ("basis_scaling", 0.25, "params", {}),
    ("basis_scaling", 0.5, "flops", {}),
    ("basis_scaling", 0.25, "flops", {}),
    ("channel_scaling", 0.5, "params", {}),
    ("channel_scaling", 0.25, "params", {}),
    ("channel_scaling", 0.5, "flops", {}),
    ("double_pruning", 0.5, "params", {}),
    ("double_pruning", 0.25, "params", {}),
    ("double_pruning", 0.5, "flops", {}),
    ("double_pruning", 0.5, "params", BASIS_FIRST),
    ("double_pruning", 0.25, "params", BASIS_FIRST),
]
PRUNED_IDS = [f"{n}-{b}-{m}{'-bf' if o else ''}" for n, b, m, o in PRUNED_CASES]


@pytest.mark.parametrize(("name", "budget", "metric", "options"), PRUNED_CASES, ids=PRUNED_IDS)
def test_physical_equals_masked(name, budget, metric, options):
    _, res = _run(name, budget, metric, options)
    assert res.masked is not None
    physical, masked = res.model.eval(), res.masked.eval()
    assert metrics.count_params(physical) < metrics.count_params(BASE)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in physical.modules())
    assert masked.channel_groups() == BASE.channel_groups()  # the masked form has the dense widths
    with torch.no_grad():
        out, ref = physical(PROBE_X), masked(PROBE_X)
        if res.keep is not None:  # the contract: masked under keep's channel masks == physical
            with surgery.channel_masks(masked, surgery.keep_to_masks(masked, res.keep)):
                ref_masks = masked(PROBE_X)
            assert (out - ref_masks).abs().max().item() < 1e-5
    assert out.shape == (16, WAYS)
    assert (out - ref).abs().max().item() < 1e-5  # zero scales alone already remove the units
    assert ref.abs().max().item() > 1e-2  # a real comparison, not two zero tensors
    if name == "basis_scaling":
        assert res.keep is None
    else:
        assert res.model.spec["widths"] == [len(res.keep[g]) for g in ("block0", "block1", "block2")]


@pytest.mark.parametrize(("name", "budget", "metric", "options"), PRUNED_CASES, ids=PRUNED_IDS)
def test_budget_is_met_from_below_within_two_points(name, budget, metric, options):
    ctx, res = _run(name, budget, metric, options)
    achieved = metrics.cost(res.model, metric) / ctx.dense_cost
    assert budget - 0.02 <= achieved <= budget
    assert res.info["achieved_ratio"] == pytest.approx(achieved, abs=1e-12)
    assert res.info["gap"] == pytest.approx(budget - achieved, abs=1e-12)
    assert res.info["requested_budget"] == budget and res.info["metric"] == metric
    # the method's own shape-based accounting is what the counters measure
    assert res.info["accounted_cost"] == metrics.cost(res.model, metric)
    assert res.info["met_from_below"] is True
    json.dumps(res.info)  # the record is plain JSON


@pytest.mark.parametrize(("name", "budget", "metric", "options"), PRUNED_CASES[::3], ids=PRUNED_IDS[::3])
def test_physical_network_round_trips_through_spec_and_safetensors(tmp_path, name, budget, metric, options):
    _, res = _run(name, budget, metric, options)
    spec = json.loads(json.dumps(res.model.spec))
    path = tmp_path / "pruned.safetensors"
    save_tensors(path, models.state_dict_for_save(res.model))
    loaded = models.load_model(str(path), spec).eval()
    assert set(load_tensors(path)) == set(res.model.state_dict())
    assert loaded.spec == res.model.spec
    with torch.no_grad():
        assert torch.equal(loaded(PROBE_X), res.model.eval()(PROBE_X))
    assert metrics.cost(loaded, metric) == metrics.cost(res.model, metric)


def test_basis_scaling_result_shape():
    ctx, res = _run("basis_scaling", 0.25, "params")
    info = res.info
    assert res.keep is None
    assert res.model.spec["widths"] == WIDTHS  # bases, not channels, are removed
    assert info["reconstruction of importance/schedule"] is True and info["importance"] == "taylor"
    assert len(info["rounds_history"]) == bs_mod.BasisScalingOptions.defaults()["rounds"]
    targets = [r["target_cost"] for r in info["rounds_history"]]
    assert targets == pytest.approx([ctx.dense_cost * 0.25 ** (j / 5) for j in range(1, 6)])
    assert all(r["cost"] <= r["target_cost"] for r in info["rounds_history"])
    ranks = res.model.spec.get("ranks", [None] * 3)
    for i, (g, kept) in enumerate(info["kept_ranks"].items()):
        assert 1 <= kept <= info["full_ranks"][g]
        conv = res.model.blocks()[i][0]
        if g in info["reverted_layers"]:
            assert ranks[i] is None and isinstance(conv, nn.Conv2d)
        else:
            assert ranks[i] == kept and isinstance(conv, LowRankConv) and conv.rank == kept
    assert any(isinstance(b[0], LowRankConv) for b in res.model.blocks())


# ------------------------------------------------------------------ what trains


def test_basis_scaling_trains_only_scales_and_head():
    ctx, res = _run("basis_scaling", 0.5, "params")
    assert all(torch.equal(v, BASE.state_dict()[k]) for k, v in ctx.model.state_dict().items())  # input untouched
    fresh = decompose(BASE)
    masked = res.masked
    trained = {k for k, v in masked.state_dict().items() if not torch.equal(v, fresh.state_dict()[k])}
    assert trained, "nothing trained"
    assert all(k.endswith((".s", ".mask")) or k.startswith("classifier.") for k in trained), trained
    assert any(k.startswith("classifier.") for k in trained)
    for b_new in masked.blocks():
        layer = b_new[0]
        assert isinstance(layer, BasisScalingConv)
        assert not (layer.s.detach()[layer.mask > 0] == 1).all()  # scales moved
        assert torch.all(layer.s.detach()[layer.mask == 0] == 0)  # pruned scales are zero
    for b_phys, b_old in zip(res.model.blocks(), BASE.blocks(), strict=True):  # BN untouched
        for k, v in b_old[1].state_dict().items():
            assert torch.equal(b_phys[1].state_dict()[k], v)


def test_channel_scaling_trains_only_scales_and_head():
    _, res = _run("channel_scaling", 0.5, "params")
    masked = res.masked
    base = BASE.state_dict()
    for k, v in masked.net.state_dict().items():
        if not k.startswith("classifier."):
            assert torch.equal(v, base[k]), k
    assert not torch.equal(masked.net.classifier.weight, BASE.classifier.weight)
    keep = {g: torch.tensor(i) for g, i in res.keep.items()}
    for g in keep:
        s = masked.effective(g).detach()
        assert torch.all(s[masked.mask(g) == 0] == 0)
        assert not torch.all(s[keep[g]] == 1)
    # physical = dense weights sliced, scales folded into the consumer's input channels
    prev = None
    for i, (b_phys, b_old) in enumerate(zip(res.model.blocks(), BASE.blocks(), strict=True)):
        out = keep[f"block{i}"]
        w = b_old[0].weight[out]
        if prev is not None:
            w = w[:, prev] * masked.effective(f"block{i - 1}").detach()[prev].view(1, -1, 1, 1)
        assert torch.allclose(b_phys[0].weight, w, atol=0, rtol=1e-6)
        for k, v in b_old[1].state_dict().items():
            expect = v if v.dim() == 0 else v[out]
            assert torch.equal(b_phys[1].state_dict()[k], expect)
        prev = out
    head = masked.net.classifier.weight.detach()[:, prev] * masked.effective("block2").detach()[prev]
    assert torch.allclose(res.model.classifier.weight, head, atol=0, rtol=1e-6)
    assert res.info["removed_by_ranking"] + res.info["removed_by_threshold"] == sum(WIDTHS) - sum(
        len(i) for i in res.keep.values())


@pytest.mark.parametrize("options", [{}, BASIS_FIRST], ids=["channel-first", "basis-first"])
def test_double_pruning_keeps_batchnorm_and_records_stages(options):
    ctx, res = _run("double_pruning", 0.5, "params", options)
    assert all(torch.equal(v, BASE.state_dict()[k]) for k, v in ctx.model.state_dict().items())
    for i, (b_phys, b_old) in enumerate(zip(res.model.blocks(), BASE.blocks(), strict=True)):
        out = torch.tensor(res.keep[f"block{i}"])
        for k, v in b_old[1].state_dict().items():
            assert torch.equal(b_phys[1].state_dict()[k], v if v.dim() == 0 else v[out])
    eq = res.info["stage_equality"]
    assert eq["first_stage_physical_vs_masked"] < 1e-5
    assert eq["second_stage_physical_vs_masked"] < 1e-5
    first, second = res.info["first_stage"], res.info["second_stage"]
    assert "widths" in (first if not options else second)
    assert "kept_ranks" in (second if not options else first)
    assert res.model.spec["widths"] == [len(res.keep[g]) for g in ("block0", "block1", "block2")]
    assert res.model.spec["widths"] != WIDTHS  # channels were removed
    assert res.info["masked_form"].startswith("composed" if options else "embedded")


def test_double_pruning_stage_by_stage_equality():
    """Each stage's physical network equals its own masked form (checked outside the method too)."""
    for order in ("channel_first", "basis_first"):
        ctx = _ctx(0.4, options={"order": order})
        opts = get_method("double_pruning").resolve_options(ctx.options)
        out = dp_mod.double_prune(ctx, opts, ctx.support_x, ctx.support_y, torch.Generator().manual_seed(ctx.seed))
        with torch.no_grad():
            for stage in ("first", "second"):
                st = out[stage]
                diff = (st["physical"].eval()(PROBE_X) - st["masked"].eval()(PROBE_X)).abs().max().item()
                assert diff < 1e-5, (order, stage)
            assert (out["second"]["physical"](PROBE_X) - out["masked"](PROBE_X)).abs().max().item() < 1e-5


# ------------------------------------------------------------------ channel scaling of low-rank networks


FAST_BASIS = get_method("basis_scaling").resolve_options({"rounds": 2, "steps_per_round": 3})
FAST_CHANNEL = get_method("channel_scaling").resolve_options({"rounds": 2, "steps_per_round": 3})


@pytest.mark.parametrize("revert", [False, True])
def test_channel_scaling_of_a_low_rank_network(revert):
    gen = torch.Generator().manual_seed(5)
    stage1 = bs_mod.basis_scaling_stage(BASE, SUPPORT_X, SUPPORT_Y, target_cost=0.6 * metrics.count_params(BASE),
                                        metric="params", opts=FAST_BASIS,
                                        gen=gen, log=lambda _m: None)
    lowrank = stage1["physical"]
    assert any(isinstance(b[0], LowRankConv) for b in lowrank.blocks())
    for metric in ("params", "flops"):
        target = 0.35 * metrics.cost(BASE, metric)
        out = cs_mod.channel_scaling_stage(lowrank, SUPPORT_X, SUPPORT_Y, target_cost=target, metric=metric,
                                           opts=FAST_CHANNEL, gen=gen,
                                           log=lambda _m: None, revert_larger=revert)
        physical, masked = out["physical"], out["masked"]
        assert out["cost"] == metrics.cost(physical, metric) <= target
        with torch.no_grad():
            assert (physical(PROBE_X) - masked(PROBE_X)).abs().max().item() < 1e-5
        # consumers of a low-rank block's channels: the next block's basis conv
        consumers = masked.net.group_consumers()
        for i in range(2):
            nxt = masked.net.blocks()[i + 1][0]
            assert consumers[f"block{i}"] == [nxt.basis if isinstance(nxt, LowRankConv) else nxt]
        if not revert:
            assert physical.spec.get("ranks") == lowrank.spec.get("ranks")
        else:
            for w, r, c_in in zip(physical.spec["widths"], physical.spec.get("ranks", [None] * 3),
                                  [1, *physical.spec["widths"][:-1]], strict=True):
                assert r is None or layers.lowrank_pays(c_in, w, 3, r)


# ------------------------------------------------------------------ determinism and variants


@pytest.mark.parametrize(("name", "options"), VARIANTS[:3], ids=VARIANT_IDS[:3])
def test_deterministic_for_a_seed(name, options):
    _, res_a = _run(name, 0.5, "params", options)
    res_b = get_method(name).adapt(_ctx(0.5, "params", options))
    assert res_a.model.spec == res_b.model.spec
    sa, sb = res_a.model.state_dict(), res_b.model.state_dict()
    assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert res_a.keep == res_b.keep


def test_large_support_sampled_batches_are_deterministic():
    gen = torch.Generator().manual_seed(9)
    support = (torch.randn(70, 1, 8, 8, generator=gen), torch.arange(70) % WAYS)
    opts = {"rounds": 2, "steps_per_round": 3}
    runs = [get_method("basis_scaling").adapt(_ctx(0.5, options=opts, support=support, seed=s)) for s in (1, 1, 2)]
    a, b, c = (r.model.state_dict() for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)  # another seed draws other batches


@pytest.mark.parametrize(("name", "options"), [
    ("basis_scaling", {"ranking": "per_layer"}),
    ("basis_scaling", {"importance": "mean_abs", "revert_when_larger": False}),
    ("channel_scaling", {"ranking": "per_layer"}),
])
def test_variants_meet_the_budget_from_below(name, options):
    ctx, res = _run(name, 0.4, "params", options)
    achieved = metrics.count_params(res.model) / ctx.dense_cost
    assert achieved <= 0.4
    assert res.info["accounted_cost"] == metrics.count_params(res.model)
    with torch.no_grad():
        assert (res.model(PROBE_X) - res.masked(PROBE_X)).abs().max().item() < 1e-5
    if options.get("revert_when_larger") is False:
        assert res.model.spec["ranks"] == list(res.info["kept_ranks"].values())
        assert res.info["reverted_layers"] == []
    if name == "channel_scaling":  # same fraction per layer: widths proportional (floor, at least 1)
        fracs = [w / n for w, n in zip(res.info["widths"].values(), WIDTHS, strict=True)]
        assert max(fracs) - min(fracs) < 1 / 16 + 1e-9


def test_channel_scaling_threshold_removes_channels():
    opts = {"l1": 2.0, "threshold": 0.95, "lr": 0.05, "rounds": 2}
    ctx, res = _run("channel_scaling", 0.9, "params", opts)
    info = res.info
    assert info["removed_by_threshold"] > 0
    assert info["removed_by_threshold"] == sum(r["removed_by_threshold"] for r in info["rounds_history"])
    assert all(len(i) >= 1 for i in res.keep.values())
    assert info["accounted_cost"] <= 0.9 * ctx.dense_cost
    with torch.no_grad():
        assert (res.model(PROBE_X) - res.masked(PROBE_X)).abs().max().item() < 1e-5


def test_unreachable_budget_keeps_one_unit_per_layer_and_reports_the_gap():
    _, res = _run("basis_scaling", 0.01, "params")
    assert list(res.info["kept_ranks"].values()) == [1, 1, 1]
    assert res.info["met_from_below"] is False
    assert res.info["gap"] < 0
