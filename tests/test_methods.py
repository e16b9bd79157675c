"""Pruning methods: registry, budgets, and what each baseline keeps."""

from __future__ import annotations

import copy

import pytest
import torch

from pruneshot import methods
from pruneshot.data.prepare import Split
from pruneshot.methods import SearchContext, available, get_method
from pruneshot.methods.base import PruningMethod, keep_top, uniform_widths
from pruneshot.models import cost as metrics
from pruneshot.models import surgery
from pruneshot.models.small_cnn import SmallCNN

WIDTHS = [32, 64, 128]


def _dense(seed: int = 0) -> SmallCNN:
    torch.manual_seed(seed)
    return SmallCNN(in_channels=1, input_size=8, widths=WIDTHS, num_classes=5).eval()


def _split(n: int, seed: int) -> Split:
    gen = torch.Generator().manual_seed(seed)
    return Split(x=torch.randn((n, 1, 8, 8), generator=gen), y=torch.randint(0, 5, (n,), generator=gen))


def _ctx(model, budget, metric="params", seed=11) -> SearchContext:
    return SearchContext(
        model=model,
        budget=budget,
        metric=metric,
        source_train=_split(20, 1),
        source_val=_split(10, 2),
        seed=seed,
        log=lambda _msg: None,
    )


@pytest.fixture(scope="module")
def dense():
    return _dense()


@pytest.fixture(scope="module")
def results(dense):
    """One search per (method, budget, metric), shared by the tests below (FLOP searches are slow)."""
    out = {}
    for metric in ("params", "flops"):
        for budget in (0.5, 0.25):
            for name in ("random", "l1_filter"):
                model = copy.deepcopy(dense)
                out[name, budget, metric] = (model, get_method(name).search(_ctx(model, budget, metric)))
    return out


KEYS = [(n, b, m) for m in ("params", "flops") for b in (0.5, 0.25) for n in ("random", "l1_filter")]


@pytest.mark.parametrize("key", KEYS, ids=lambda k: "-".join(map(str, k)))
def test_budget_is_met_within_two_points(results, dense, key):
    name, budget, metric = key
    _, res = results[key]
    ratio = metrics.cost(res.model, metric) / metrics.cost(dense, metric)
    assert budget - 0.02 <= ratio <= budget + 0.02, (name, budget, metric, ratio)
    # uniform_widths picks the largest achievable ratio not above the budget
    assert ratio <= budget + 1e-12


@pytest.mark.parametrize("key", KEYS, ids=lambda k: "-".join(map(str, k)))
def test_result_is_physically_smaller(results, dense, key):
    model, res = results[key]
    pruned = res.model
    assert isinstance(pruned, SmallCNN)
    assert pruned is not model
    assert metrics.count_params(pruned) < metrics.count_params(dense)
    assert all(p < d for p, d in zip(pruned.spec["widths"], WIDTHS, strict=True))
    assert [b[0].out_channels for b in pruned.blocks()] == pruned.spec["widths"]
    # keep is consistent with the network and lists valid, sorted, unique dense indices
    assert sorted(res.keep) == ["block0", "block1", "block2"]
    for i, (g, idx) in enumerate(sorted(res.keep.items())):
        assert idx == sorted(set(idx))
        assert all(0 <= j < WIDTHS[i] for j in idx)
        assert len(idx) == pruned.spec["widths"][i]
        assert res.info["widths"][g] == len(idx)
    # the dense model given to the method is left as it was
    assert model.spec["widths"] == WIDTHS
    # the output is that of the masked dense network
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with surgery.channel_masks(model, surgery.keep_to_masks(model, res.keep)):
            masked = model.eval()(x)
        assert (pruned.eval()(x) - masked).abs().max().item() < 1e-5


@pytest.mark.parametrize("budget", [0.5, 0.25])
@pytest.mark.parametrize("metric", ["params", "flops"])
def test_l1_filter_keeps_top_l1_filters(results, dense, budget, metric):
    _, res = results["l1_filter", budget, metric]
    for i, block in enumerate(dense.blocks()):
        g = f"block{i}"
        w = block[0].weight.detach()
        l1 = w.abs().sum(dim=(1, 2, 3))
        k = len(res.keep[g])
        expected = sorted(torch.topk(l1, k).indices.tolist())
        assert res.keep[g] == expected
        # every kept filter has a larger L1 norm than every dropped one
        dropped = sorted(set(range(WIDTHS[i])) - set(expected))
        assert l1[expected].min() > l1[dropped].max()
    # the pruned convs carry exactly those filters (input channels sliced by the previous group)
    prev = None
    for i, (old, new) in enumerate(zip(dense.blocks(), res.model.blocks(), strict=True)):
        idx = torch.tensor(res.keep[f"block{i}"])
        w = old[0].weight[idx] if prev is None else old[0].weight[idx][:, prev]
        assert torch.equal(new[0].weight, w)
        prev = idx


@pytest.mark.parametrize("budget", [0.5, 0.25])
@pytest.mark.parametrize("metric", ["params", "flops"])
def test_random_and_l1_share_widths(results, budget, metric):
    r = results["random", budget, metric][1]
    l1 = results["l1_filter", budget, metric][1]
    assert r.model.spec["widths"] == l1.model.spec["widths"]
    assert r.info["widths"] == l1.info["widths"]
    # and the channels they keep differ (random is not magnitude-based)
    assert r.keep != l1.keep


def test_uniform_widths_uses_one_ratio(dense):
    for budget in (0.5, 0.25, 0.1):
        widths = uniform_widths(dense, budget, "params")
        # one ratio r with widths[g] = round(r * n_g): r lies in [(w - 0.5)/n, (w + 0.5)/n] for every group
        lo = max((w - 0.5) / n for w, n in zip(widths.values(), WIDTHS, strict=True))
        hi = min((w + 0.5) / n for w, n in zip(widths.values(), WIDTHS, strict=True))
        assert lo <= hi, widths
    assert uniform_widths(dense, 1.0, "params") == dict(zip(["block0", "block1", "block2"], WIDTHS, strict=True))


def test_uniform_widths_floor_of_one_channel(dense):
    # a budget below what one channel per group costs yields one channel per group
    assert uniform_widths(dense, 1e-6, "params") == {"block0": 1, "block1": 1, "block2": 1}


def test_random_is_deterministic_for_a_seed(dense):
    method = get_method("random")
    a = method.search(_ctx(copy.deepcopy(dense), 0.5, seed=3))
    b = method.search(_ctx(copy.deepcopy(dense), 0.5, seed=3))
    c = method.search(_ctx(copy.deepcopy(dense), 0.5, seed=4))
    assert a.keep == b.keep
    for pa, pb in zip(a.model.state_dict().values(), b.model.state_dict().values(), strict=True):
        assert torch.equal(pa, pb)
    assert a.keep != c.keep
    assert a.model.spec == c.model.spec


def test_random_does_not_depend_on_global_rng(dense):
    method = get_method("random")
    torch.manual_seed(0)
    a = method.search(_ctx(copy.deepcopy(dense), 0.25, seed=9))
    torch.manual_seed(12345)
    torch.rand(100)
    b = method.search(_ctx(copy.deepcopy(dense), 0.25, seed=9))
    assert a.keep == b.keep


@pytest.mark.parametrize("name", ["dense", "linear_probe"])
def test_budget_free_methods_return_the_model_unchanged(dense, name):
    model = copy.deepcopy(dense)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = get_method(name).search(_ctx(model, 0.25))
    assert res.model is model
    assert res.keep is None
    assert res.model.spec == dense.spec
    for k, v in res.model.state_dict().items():
        assert torch.equal(v, before[k])
    assert get_method(name).budget_free


def test_linear_probe_arm_and_default_arms():
    assert get_method("linear_probe").arms(["finetune"]) == ["linear_probe"]
    assert get_method("l1_filter").arms(["finetune", "linear_probe"]) == ["finetune", "linear_probe"]


def test_l1_filter_at_budget_one_keeps_everything(dense):
    res = get_method("l1_filter").search(_ctx(copy.deepcopy(dense), 1.0))
    assert res.model.spec["widths"] == WIDTHS
    assert res.keep == {f"block{i}": list(range(n)) for i, n in enumerate(WIDTHS)}


def test_get_method_unknown_lists_allowed():
    with pytest.raises(ValueError) as err:
        get_method("nope")
    msg = str(err.value)
    assert "'nope'" in msg
    for name in ("dense", "linear_probe", "random", "l1_filter"):
        assert name in msg


def test_registry_contents_and_attributes():
    names = available()
    assert {"dense", "linear_probe", "random", "l1_filter"} <= set(names)
    assert names == sorted(names)
    for name in names:
        method = get_method(name)
        assert isinstance(method, PruningMethod)
        cls = methods.REGISTRY[name]
        assert cls.name == name
        assert method.side in {"source", "target"}
        assert isinstance(method.provenance, str)
        assert method.provenance
        assert isinstance(method.budget_free, bool)


def test_registering_a_name_twice_fails():
    class Impostor(PruningMethod):
        name = "random"

        def search(self, ctx):  # pragma: no cover - never called
            raise AssertionError

    available()  # make sure discovery already ran
    with pytest.raises(ValueError, match="twice"):
        methods.register(Impostor)
    assert methods.REGISTRY["random"] is not Impostor


def test_keep_top_is_stable_and_sorted():
    scores = {"g": torch.tensor([0.5, 2.0, 2.0, 0.1, 3.0])}
    # top-3: 4 (3.0), then the tie 1 and 2 (stable: lower index first)
    assert keep_top(scores, {"g": 3}) == {"g": [1, 2, 4]}
    assert keep_top(scores, {"g": 2}) == {"g": [1, 4]}


@pytest.mark.parametrize("name", available())
@pytest.mark.parametrize("metric", ["params", "flops"])
def test_every_method_at_budget_one_is_the_dense_network(dense, name, metric):
    """Budget 1 means nothing removed, whatever the method: dense params and FLOPs, same outputs."""
    model = copy.deepcopy(dense).eval()
    res = get_method(name).search(_ctx(model, 1.0, metric=metric))
    pruned = res.model.eval()
    shape = metrics.input_shape(dense.spec)
    assert metrics.count_params(pruned) == metrics.count_params(dense)
    assert metrics.count_flops(pruned, shape) == metrics.count_flops(dense, shape)
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(pruned(x), dense.eval()(x), atol=1e-6)


def _masked_output(res, fallback, x):
    masked = (res.masked if res.masked is not None else fallback).eval()
    with torch.no_grad():
        if res.keep is None:
            return masked(x)
        with surgery.channel_masks(masked, surgery.keep_to_masks(masked, res.keep)):
            return masked(x)


@pytest.mark.parametrize("name", available())
def test_every_method_physical_network_equals_its_masked_form(dense, name):
    """What is saved (smaller tensors, no masks) computes exactly what the masked network computes."""
    from pruneshot.methods import AdaptContext

    method = get_method(name)
    model = copy.deepcopy(dense).eval()
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    if method.side == "target":
        model.reset_classifier(5, torch.Generator().manual_seed(0))
        support = _split(10, 3)
        res = method.adapt(AdaptContext(model=model, budget=0.5, metric="params", support_x=support.x,
                                        support_y=support.y, seed=4, dense_cost=metrics.count_params(model),
                                        options={}, log=lambda _m: None))
    else:
        res = method.search(_ctx(model, 0.5))
    physical = res.model.eval()
    if not method.budget_free:
        assert metrics.count_params(physical) < metrics.count_params(dense)
    # no masks remain: no hooks on any module of the saved network
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in physical.modules())
    with torch.no_grad():
        out = physical(x)
    assert torch.allclose(out, _masked_output(res, model, x), atol=1e-5)
