"""channel_scaling and double_pruning adapt a chunk of episodes together (``adapt_batch``: one channel-stacked
frozen body, per-episode scales, masks, heads, batches and pruning decisions) exactly as one at a time.

Exactness: in float64 (the default dtype float64, so every network the stages build is float64) the
pruning decisions are identical and every float of the record (per-round CE, kept scales) agrees to
1e-12; the returned float32 networks are bit-identical. In float32 the stacked layers sum in another
order: the decisions are identical and every weight of the physical and masked networks is within
1e-5 of the reference (measured: <= 1e-7 for channel_scaling, <= 2.1e-6 for double_pruning, whose basis
stage's SVD amplifies the channel stage's rounding)."""

from __future__ import annotations

import copy

import pytest
import torch

from pruneshot.methods import AdaptContext, available, get_method
from pruneshot.methods import channel_scaling as cs
from pruneshot.methods.base import SearchResult, TargetMethod
from pruneshot.methods.scaling import ScalingMethod, batch_groups
from pruneshot.models.base import build_seeded
from pruneshot.models.cost import cost

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SMALL = {"name": "small_cnn", "in_channels": 1, "input_size": 8, "widths": [8, 16], "num_classes": 5}
RESNET = {"name": "resnet20", "in_channels": 3, "input_size": 8, "num_classes": 5,
          "widths": {"stage1": 4, "s1b0": 4, "s1b1": 4, "s1b2": 4, "stage2": 8, "s2b0": 8, "s2b1": 8, "s2b2": 8,
                     "stage3": 8, "s3b0": 8, "s3b1": 8, "s3b2": 8}}
SPECS = {"small_cnn": SMALL, "resnet20": RESNET}
CASES = {  # (method, options, support images: > 64 exercises the per-episode batch draws)
    "channel_scaling": ("channel_scaling", {}, 10),
    "channel_scaling, drawn batches": ("channel_scaling", {}, 70),
    "channel_scaling, per_layer": ("channel_scaling", {"ranking": "per_layer"}, 10),
    "double_pruning, channel_first": ("double_pruning", {}, 10),
    "double_pruning, basis_first": ("double_pruning", {"order": "basis_first"}, 70),
}


@pytest.fixture
def default_dtype(request: pytest.FixtureRequest):
    """The torch default dtype set for the test (float64: every network a stage builds is float64), restored."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(request.param)
    yield request.param
    torch.set_default_dtype(before)


def _contexts(spec: dict, dtype: torch.dtype, n: int, options: dict, k: int = 3, budget: float = 0.5,
              ) -> list[AdaptContext]:
    """K episodes as the transfer stage builds them: one pretrained body, each its own seeded head,
    support set and seed."""
    base = build_seeded(spec, 0).to(dtype).eval()
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(k):
        m = copy.deepcopy(base)
        m.reset_classifier(5, torch.Generator().manual_seed(100 + i))
        m = m.to(dtype).eval()
        x = torch.randn(n, spec["in_channels"], 8, 8, generator=g, dtype=dtype)
        out.append(AdaptContext(model=m, budget=budget, metric="params", support_x=x, support_y=torch.arange(n) % 5,
                                seed=50 + i, dense_cost=float(cost(m, "params")), options=copy.deepcopy(options),
                                log=lambda _m: None))
    return out


def _histories(info: dict) -> list[list[dict]]:
    """Every channel-scaling (and basis-scaling) round record of a result's info."""
    return [s["rounds_history"] for s in (info, info.get("first_stage"), info.get("second_stage"))
            if s and "rounds_history" in s]


def _decisions(res: SearchResult) -> tuple:
    hist = [[{k: v for k, v in row.items() if not k.startswith(("ce_", "scale_"))} for row in h]
            for h in _histories(res.info)]
    return res.keep, res.model.spec, hist


def _floats(res: SearchResult) -> list[float]:
    return [row[k] for h in _histories(res.info) for row in h for k in ("ce_first", "ce_last", "scale_min", "scale_max")
            if k in row]


def _max_weight_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max((float((sa[k].double() - sb[k].double()).abs().max()) for k in sa if sa[k].numel()), default=0.0)


def _both(monkeypatch: pytest.MonkeyPatch, contexts: list[AdaptContext], name: str) -> tuple[list, list, list[int]]:
    """(the default one-at-a-time results, adapt_batch's, the sizes of the chunks trained together)."""
    method = get_method(name)
    ref = TargetMethod.adapt_batch(method, copy.deepcopy(contexts))
    together: list[int] = []
    real = cs._stages_together
    monkeypatch.setattr(cs, "_stages_together", lambda models, *a: together.append(len(models)) or real(models, *a))
    got = method.adapt_batch(copy.deepcopy(contexts))
    assert len(got) == len(ref) == len(contexts)
    return ref, got, together


@pytest.mark.parametrize("default_dtype", [torch.float64], indirect=True)
@pytest.mark.parametrize("spec", list(SPECS))
@pytest.mark.parametrize("case", list(CASES))
def test_float64_chunk_equals_one_episode_at_a_time(monkeypatch, default_dtype, spec, case):
    name, options, n = CASES[case]
    ref, got, together = _both(monkeypatch, _contexts(SPECS[spec], default_dtype, n, options), name)
    if not (spec == "resnet20" and "basis_first" in case):  # there the basis stages leave different architectures
        assert together == [3]
    for a, b in zip(ref, got, strict=True):
        assert _decisions(a) == _decisions(b)
        torch.testing.assert_close(_floats(a), _floats(b), rtol=0, atol=1e-12)
        for x, y in ((a.model, b.model), (a.masked, b.masked)):  # float32 networks back: bit for bit
            assert all(torch.equal(p, q) for p, q in zip(x.state_dict().values(), y.state_dict().values(), strict=True))
    assert len({str(r.keep) for r in got}) > 1 or len({str(_floats(r)) for r in got}) == len(got)  # episodes differ


@pytest.mark.parametrize("spec", list(SPECS))
@pytest.mark.parametrize("case", list(CASES))
def test_float32_chunk_makes_the_same_decisions_within_the_stated_tolerance(monkeypatch, spec, case):
    name, options, n = CASES[case]
    ref, got, _ = _both(monkeypatch, _contexts(SPECS[spec], torch.float32, n, options), name)
    for a, b in zip(ref, got, strict=True):
        assert _decisions(a) == _decisions(b)
        assert a.info["achieved_ratio"] == b.info["achieved_ratio"]
        assert _max_weight_diff(a.model, b.model) < 1e-5
        assert _max_weight_diff(a.masked, b.masked) < 1e-5


def test_contexts_that_cannot_join_are_adapted_alone(monkeypatch):
    """Budget 1 (no training), other options: alone, as the default adapts them; the rest together."""
    ctxs = _contexts(SMALL, torch.float32, 10, {}, k=4)
    ctxs[1].budget = 1.0
    ctxs[3].options = {"rounds": 1}
    ref, got, together = _both(monkeypatch, ctxs, "channel_scaling")
    assert together == [2]
    assert got[1].model is not None and got[1].info["achieved_ratio"] == 1.0 and got[1].masked is None
    for a, b in zip(ref, got, strict=True):
        assert _decisions(a) == _decisions(b)
        assert _max_weight_diff(a.model, b.model) < 1e-5


@pytest.mark.parametrize("name", ["channel_scaling", "double_pruning"])
def test_a_diverged_episode_fails_the_chunk_with_the_sequential_error(name):
    ctxs = _contexts(SMALL, torch.float32, 10, {})
    ctxs[1].support_x = ctxs[1].support_x * float("nan")
    with pytest.raises(FloatingPointError, match="support-set fit of the scales: the loss became non-finite"):
        TargetMethod.adapt_batch(get_method(name), copy.deepcopy(ctxs))
    with pytest.raises(FloatingPointError, match="support-set fit of the scales: the loss became non-finite"):
        get_method(name).adapt_batch(ctxs)


def test_the_scaling_methods_share_one_grouping():
    """``scaling.batch_groups``: groups in first-seen order, budget >= 1 alone, other options or another
    support-set shape a group of their own; basis_scaling's hook adds one body (``same_body``)."""
    ctxs = _contexts(SMALL, torch.float32, 10, {}, k=6)
    ctxs[1].budget = 1.0
    ctxs[2].options = ctxs[5].options = {"rounds": 1}
    ctxs[4].support_x, ctxs[4].support_y = ctxs[4].support_x[:5], ctxs[4].support_y[:5]
    assert batch_groups(get_method("channel_scaling"), ctxs) == [[0, 3], [1], [2, 5], [4]]
    with torch.no_grad():
        ctxs[3].model.features[0][0].weight.mul_(1.5)  # another body: basis_scaling cannot share one SVD
    assert batch_groups(get_method("basis_scaling"), ctxs) == [[0], [1], [2, 5], [3], [4]]
    assert all(isinstance(get_method(n), ScalingMethod) for n in ("basis_scaling", "channel_scaling", "double_pruning"))
    assert ScalingMethod not in map(type, (get_method(n) for n in available()))  # the base is not registered
