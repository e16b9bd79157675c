"""`scratch`: the size-matched network trained from scratch on the source (a control)."""

from __future__ import annotations

import copy

import pytest
import torch

from pruneshot.data.splits import Split
from pruneshot.methods import SearchContext, available, get_method
from pruneshot.methods.base import uniform_widths
from pruneshot.methods.scratch import scratch_seed
from pruneshot.models import cost as metrics
from pruneshot.models.small_cnn import SmallCNN
from pruneshot.report import sanity as gates
from pruneshot.report import stats

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

RECIPE = {"epochs": 4, "batch_size": 16, "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "patience": 4,
          "threads": 1}


def _separable(n: int, seed: int) -> Split:
    """Five classes, each a bright 3x3 square at its own place on an 8x8 image, plus noise: learnable in a
    few epochs from scratch."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 5
    x = 0.3 * torch.randn((n, 1, 8, 8), generator=gen)
    for i, c in enumerate(y.tolist()):
        x[i, 0, c : c + 3, c : c + 3] += 2.0
    return Split(x=x, y=y)


@pytest.fixture(scope="module")
def pretrained() -> SmallCNN:
    torch.manual_seed(0)
    return SmallCNN(in_channels=1, input_size=8, widths=[16, 32, 64], num_classes=5).eval()


def _ctx(model, budget, seed=7, recipe=RECIPE) -> SearchContext:
    return SearchContext(model=copy.deepcopy(model), budget=budget, metric="params",
                         source_train=_separable(200, 1), source_val=_separable(50, 2), seed=seed,
                         log=lambda _m: None, recipe=dict(recipe))


@pytest.fixture(scope="module")
def half(pretrained):
    return get_method("scratch").search(_ctx(pretrained, 0.5))


def test_scratch_has_random_s_uniform_widths_and_meets_the_budget(pretrained, half):
    widths = uniform_widths(pretrained, 0.5, "params")
    assert half.model.channel_groups() == widths == half.info["widths"]
    assert half.info["widths"] != pretrained.channel_groups()
    ratio = metrics.count_params(half.model) / metrics.count_params(pretrained)
    assert 0.45 <= ratio <= 0.5


def test_scratch_trains_a_new_network_on_the_source(pretrained, half):
    """The mechanism: the network learns the source task from its own initialisation (val accuracy far
    above chance), and keeps nothing of the pretrained weights (no kept filter equals a pretrained one)."""
    assert half.info["best_val_acc"] > 0.8
    assert half.info["epochs_run"] >= 1
    val = _separable(50, 2)
    with torch.no_grad():
        acc = (half.model.eval()(val.x).argmax(1) == val.y).float().mean().item()
    assert acc == pytest.approx(half.info["best_val_acc"])
    first = dict(half.model.named_parameters())
    dense = dict(pretrained.named_parameters())
    name = next(k for k in first if first[k].dim() == 4)
    for f in first[name]:
        assert not any(torch.equal(f, d[: f.shape[0]]) for d in dense[name])
    # the physical network is its own masked form (built at its size: nothing to mask)
    assert half.masked is half.model and half.keep is None


def test_scratch_is_deterministic_for_a_seed_and_differs_between_seeds(pretrained, half):
    again = get_method("scratch").search(_ctx(pretrained, 0.5))
    other = get_method("scratch").search(_ctx(pretrained, 0.5, seed=8))
    a, b, c = half.model.state_dict(), again.model.state_dict(), other.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert half.info["init_seed"] == scratch_seed(7) != scratch_seed(8)


def test_scratch_follows_the_recipe(pretrained):
    """The recipe is the study's pretraining recipe: its epochs bound the run; a missing recipe is refused."""
    one = get_method("scratch").search(_ctx(pretrained, 0.25, recipe={**RECIPE, "epochs": 1}))
    assert one.info["epochs_run"] == 1 and one.info["recipe"]["epochs"] == 1
    with pytest.raises(ValueError, match="recipe"):
        get_method("scratch").search(_ctx(pretrained, 0.25, recipe={}))


def test_scratch_at_budget_one_is_another_dense_replicate(pretrained):
    """Full widths, its own weights: not the dense network, which is why the budget-1.0 gate skips it."""
    res = get_method("scratch").search(_ctx(pretrained, 1.0, recipe={**RECIPE, "epochs": 1}))
    assert res.model.spec == pretrained.spec
    sa, sb = res.model.state_dict(), pretrained.state_dict()
    assert not all(torch.equal(sa[k], sb[k]) for k in sa)
    assert get_method("scratch").trains_from_scratch


def test_controls_come_from_the_registry():
    """The report's baselines are dense plus every registered control (written in stats for torch-free
    table reading; must match the registry)."""
    controls = [n for n in available() if get_method(n).control]
    assert controls == ["random", "scratch"]
    assert ("dense", *controls) == stats.BASELINES
    assert stats.trains_from_scratch("scratch") and not stats.trains_from_scratch("random")


def _cell(method: str, arm_accs: dict[str, list[float]], budget: float = 1.0) -> dict:
    return {"status": "ok", "method": method, "target": "t", "shots": 1, "replicate": 0,
            "requested_budget": budget,
            "arms": {arm: {"episodes": [{"episode": i, "accuracy": a} for i, a in enumerate(accs)]}
                     for arm, accs in arm_accs.items()}}


def test_budget_one_gate_ignores_scratch_but_not_other_methods():
    dense = _cell("dense", {"finetune": [0.6, 0.7, 0.8]})
    scratch = _cell("scratch", {"finetune": [0.5, 0.5, 0.5]})
    checks = [{"replicate": 0, "methods": [{"method": "random", "check": "search", "equal": True}]}]
    assert gates.evaluate([dense, scratch], checks)["gates"]["budget_one_is_dense"]["status"] == "passed"
    other = _cell("random", {"finetune": [0.5, 0.5, 0.5]})
    assert gates.evaluate([dense, other], checks)["gates"]["budget_one_is_dense"]["status"] == "failed"
