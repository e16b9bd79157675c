"""basis_scaling's ``adapt_batch``: a chunk's episodes trained together on one shared SVD (batch-folded
scales, masks and heads) against the reference, one ``adapt`` at a time (``TargetMethod.adapt_batch``).

Exactness: every pruning decision (kept ranks per round, physical ranks, reverted layers, pruned and
refilled counts, architecture) identical; in float32 every physical and masked weight within 1e-5 of
the reference (measured: <= 6e-8), in float64 (the stages before the CPU float32 conversion) within
1e-12. Support sets of 10 images (full batch) and of 70 (per-episode random batches of 64)."""

from __future__ import annotations

import copy

import pytest
import torch
from test_batching import RESNET, SMALL, _episodes

from pruneshot.methods import AdaptContext, get_method
from pruneshot.methods import basis_scaling as bs
from pruneshot.methods.base import TargetMethod
from pruneshot.models.basis import basis_layers, batch_decomposed, decompose, unbatch_decomposed
from pruneshot.models.cost import cost

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SPECS = {"small_cnn": SMALL, "resnet20": RESNET}
OPTIONS = {"default": {}, "mean_abs, per_layer": {"importance": "mean_abs", "ranking": "per_layer"}}
K = 3


def _contexts(spec: dict, n: int, dtype: torch.dtype, options: dict, budgets: tuple[float, ...] = (0.5,) * K,
              ) -> list[AdaptContext]:
    """K episodes: one pretrained body, each its own seeded head, support set and seed."""
    models, xs, ys = _episodes(spec, len(budgets), n, dtype)
    return [AdaptContext(model=m, budget=b, metric="params", support_x=x, support_y=y, seed=40 + i,
                         dense_cost=float(cost(m, "params")), options=dict(options), log=lambda _m: None)
            for i, (m, x, y, b) in enumerate(zip(models, xs, ys, budgets, strict=True))]


def _kept(masked: torch.nn.Module) -> dict[str, list[int]]:
    """Which bases each layer kept."""
    return {g: m.kept().tolist() for g, m in basis_layers(masked).items()}


def _decisions(info: dict) -> dict:
    return {"kept": info["kept_ranks"], "physical": info["physical_ranks"], "reverted": info["reverted_layers"],
            "rounds": [(r["pruned"], r["refilled"], r["kept_ranks"], r["cost"]) for r in info["rounds_history"]],
            "accounted": info["accounted_cost"]}


def _max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max(float((sa[k].double() - sb[k].double()).abs().max()) for k in sa if sa[k].numel())


def _reference(contexts: list[AdaptContext]) -> list:
    method = get_method("basis_scaling")
    return TargetMethod.adapt_batch(method, [copy.deepcopy(c) for c in contexts])


@pytest.fixture
def batched_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the chunks ``basis_scaling_stage_batched`` trains, one entry per call (a spy on it)."""
    calls: list[int] = []
    batched = bs.basis_scaling_stage_batched
    monkeypatch.setattr(bs, "basis_scaling_stage_batched", lambda models, *a, **k: calls.append(len(models))
                        or batched(models, *a, **k))
    return calls


@pytest.mark.parametrize("n", [10, 70], ids=["full batch", "sampled batches"])
@pytest.mark.parametrize("options", list(OPTIONS))
@pytest.mark.parametrize("spec", list(SPECS))
def test_adapt_batch_equals_one_episode_at_a_time_float32(batched_calls, spec, options, n):
    contexts = _contexts(SPECS[spec], n, torch.float32, OPTIONS[options])
    ref = _reference(contexts)
    got = get_method("basis_scaling").adapt_batch(contexts)
    assert batched_calls == [K]  # one batched stage for the whole chunk
    assert len({str(_kept(r.masked)) for r in ref}) == K  # the episodes really differ
    for r, g in zip(ref, got, strict=True):
        assert _decisions(g.info) == _decisions(r.info) and _kept(g.masked) == _kept(r.masked)
        assert g.model.spec == r.model.spec and g.info["achieved_ratio"] == r.info["achieved_ratio"]
        assert g.model.training == r.model.training and g.model.classifier.weight.dtype == torch.float32
        assert _max_diff(g.model, r.model) < 1e-5
        assert _max_diff(g.masked, r.masked) < 1e-5
        for a, b in zip(r.info["rounds_history"], g.info["rounds_history"], strict=True):
            assert a["ce_first"] == pytest.approx(b["ce_first"], abs=1e-5)
            assert a["ce_last"] == pytest.approx(b["ce_last"], abs=1e-5)
        assert {k: v for k, v in g.info.items() if k != "rounds_history"} == {
            k: v for k, v in r.info.items() if k != "rounds_history"}


@pytest.mark.parametrize("n", [10, 70], ids=["full batch", "sampled batches"])
@pytest.mark.parametrize("spec", list(SPECS))
def test_batched_stage_equals_sequential_stages_float64(spec, n):
    contexts = _contexts(SPECS[spec], n, torch.float64, {})
    opts = get_method("basis_scaling").resolve_options({})
    targets = [c.dense_cost * (0.4 + 0.1 * i) for i, c in enumerate(contexts)]  # per-episode targets
    ref = [bs.basis_scaling_stage(c.model, c.support_x, c.support_y, target_cost=t, metric="params", opts=opts,
                                  gen=torch.Generator().manual_seed(c.seed), log=lambda _m: None)
           for c, t in zip(contexts, targets, strict=True)]
    got = bs.basis_scaling_stage_batched(
        [c.model for c in contexts], [c.support_x for c in contexts], [c.support_y for c in contexts],
        target_costs=targets, metric="params", opts=opts,
        gens=[torch.Generator().manual_seed(c.seed) for c in contexts], logs=[lambda _m: None] * K)
    for r, g in zip(ref, got, strict=True):
        assert _decisions(g["info"]) == _decisions(r["info"]) and g["cost"] == r["cost"]
        assert _kept(g["masked"]) == _kept(r["masked"])
        assert g["physical"].spec == r["physical"].spec
        assert g["masked"].classifier.weight.dtype == torch.float64
        assert _max_diff(g["physical"], r["physical"]) < 1e-12
        assert _max_diff(g["masked"], r["masked"]) < 1e-12
        assert not any(p.requires_grad for p in g["masked"].parameters())
        for a, b in zip(r["info"]["rounds_history"], g["info"]["rounds_history"], strict=True):
            assert abs(a["ce_last"] - b["ce_last"]) < 1e-12


def test_batch_folded_network_computes_each_episode_s_decomposed_network():
    """Different scales, masks and heads per episode: episode k's rows are its own network's outputs."""
    models, xs, _ys = _episodes(RESNET, K, 5, torch.float64)
    masked = decompose(models[0])
    episodes = []
    gen = torch.Generator().manual_seed(5)
    for m in models:
        ep = copy.deepcopy(masked)
        ep.classifier = copy.deepcopy(m.classifier)
        for layer in basis_layers(ep).values():
            with torch.no_grad():
                layer.s.copy_(torch.rand(layer.rank, generator=gen, dtype=torch.float64) + 0.5)
            layer.prune(torch.randperm(layer.rank, generator=gen)[: layer.rank // 2])
        episodes.append(ep)
    net = batch_decomposed(masked, [m.classifier for m in models])
    for g in basis_layers(masked):
        with torch.no_grad():
            net.get_conv(g).s.copy_(torch.stack([basis_layers(ep)[g].s for ep in episodes]))
            net.get_conv(g).mask.copy_(torch.stack([basis_layers(ep)[g].mask for ep in episodes]))
    out = net(torch.cat(xs))  # (K, B, ways)
    for k, ep in enumerate(episodes):
        torch.testing.assert_close(out[k], ep(xs[k]), rtol=0, atol=1e-12)
        back = unbatch_decomposed(net, masked, k)
        assert all(torch.equal(p, q) for p, q in zip(back.state_dict().values(), ep.state_dict().values(),
                                                     strict=True))


def test_a_mixed_chunk_batches_only_what_shares_one_body_and_setting(batched_calls):
    """Budget 1, another body or other options: those episodes take adapt one at a time; results in order."""
    contexts = _contexts(SMALL, 10, torch.float32, {}, budgets=(0.5, 1.0, 0.5, 0.5, 0.5))
    other = _episodes({**SMALL, "widths": [8, 16]}, 1, 10, torch.float32)[0][0]
    with torch.no_grad():
        other.features[0][0].weight.mul_(1.5)  # same architecture, another body
    contexts[3] = AdaptContext(**{**contexts[3].__dict__, "model": other})
    contexts[4] = AdaptContext(**{**contexts[4].__dict__, "options": {"rounds": 2}})
    ref = _reference(contexts)
    got = get_method("basis_scaling").adapt_batch(contexts)
    assert batched_calls == [2]  # episodes 0 and 2
    assert got[1].model is contexts[1].model and "budget >= 1" in got[1].info["note"]
    for r, g in zip(ref, got, strict=True):
        if "kept_ranks" in r.info:
            assert _decisions(g.info) == _decisions(r.info) and _max_diff(g.model, r.model) < 1e-5
    assert got[4].info["options"]["rounds"] == 2


def test_a_non_finite_loss_fails_the_chunk_as_one_episode_would():
    contexts = _contexts(SMALL, 10, torch.float32, {})
    contexts[1].support_x = contexts[1].support_x * float("nan")
    with pytest.raises(FloatingPointError, match="support-set fit of the scales: the loss became non-finite"):
        _reference(contexts)
    with pytest.raises(FloatingPointError, match="support-set fit of the scales: the loss became non-finite"):
        get_method("basis_scaling").adapt_batch(contexts)
