"""`taylor` and `fpgm`: each importance checked by an independent computation on a tiny network, the
mechanism acting (a dead channel is Taylor's first to go; the filter nearest the geometric median is
FPGM's), budgets met, determinism. Budget 1 == dense and physical == masked run for every method in
tests/test_methods.py; every backbone in tests/test_backbones.py."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from pruneshot.data.splits import Split
from pruneshot.methods import SearchContext, get_method
from pruneshot.methods.base import uniform_widths
from pruneshot.methods.fpgm import distance_sums, fpgm_scores
from pruneshot.methods.taylor import taylor_importance
from pruneshot.models import cost as metrics
from pruneshot.models.small_cnn import SmallCNN

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _net(seed: int = 0, widths=(6, 8)) -> SmallCNN:
    torch.manual_seed(seed)
    net = SmallCNN(in_channels=1, input_size=8, widths=list(widths), num_classes=3).eval()
    with torch.no_grad():  # non-trivial BN statistics and affine parameters
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return net


def _split(n: int, seed: int) -> Split:
    gen = torch.Generator().manual_seed(seed)
    return Split(x=torch.randn((n, 1, 8, 8), generator=gen), y=torch.randint(0, 3, (n,), generator=gen))


def _ctx(model, budget, split, metric="params", seed=3, options=None) -> SearchContext:
    return SearchContext(model=model, budget=budget, metric=metric, source_train=split, source_val=_split(6, 9),
                         seed=seed, options=options or {}, log=lambda _m: None)


# ------------------------------------------------------------------ taylor


def _taylor_by_gates(net: SmallCNN, split: Split, batches: int, batch_size: int, seed: int) -> dict[str, torch.Tensor]:
    """The same importance by a different route: a gate m = 1 multiplies every BN output and
    dL/dm_c = sum over n, h, w of a * dL/da (the Taylor term); squared per batch, summed."""
    net = copy.deepcopy(net).eval()
    groups = net.group_bns()
    gates = {g: [torch.ones(bn.num_features, dtype=torch.float64, requires_grad=True) for bn in bns]
             for g, bns in groups.items()}
    handles = []
    for g, bns in groups.items():
        for bn, gate in zip(bns, gates[g], strict=True):
            handles.append(bn.register_forward_hook(
                lambda _m, _i, out, gate=gate: out * gate.float().view(1, -1, 1, 1)))
    perm = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))
    out = {g: torch.zeros(len(v[0]), dtype=torch.float64) for g, v in gates.items()}
    for b in range(batches):
        idx = perm[b * batch_size:(b + 1) * batch_size]
        flat = [gt for v in gates.values() for gt in v]
        grads = torch.autograd.grad(F.cross_entropy(net(split.x[idx]), split.y[idx]), flat)
        k = 0
        for g, v in gates.items():
            for _ in v:
                out[g] += grads[k].double().square()
                k += 1
    for h in handles:
        h.remove()
    return out


def test_taylor_importance_equals_the_gate_gradient_by_hand():
    net, split = _net(1), _split(24, 1)
    got = taylor_importance(net, split, batches=3, batch_size=8, seed=5)
    want = _taylor_by_gates(net, split, 3, 8, 5)
    assert set(got) == set(want) == set(net.channel_groups())
    for g in got:
        assert got[g].shape == (net.channel_groups()[g],)
        assert torch.allclose(got[g], want[g], rtol=1e-4, atol=1e-12), g
        assert (got[g] > 0).all()
    # scoring leaves the network as it was: same weights, BN buffers, mode and no gradients
    ref = _net(1)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), ref.state_dict().values(), strict=True))
    assert not net.training and all(p.grad is None for p in net.parameters())


def test_taylor_removes_a_dead_channel_first_and_meets_the_budget():
    net, split = _net(2, widths=(32, 48)), _split(40, 2)
    with torch.no_grad():  # channel 4 of block0 outputs exactly 0: removing it changes nothing
        bn = net.group_bns()["block0"][0]
        bn.weight[4] = 0.0
        bn.bias[4] = 0.0
    scores = taylor_importance(net, split, batches=4, batch_size=10, seed=3)  # _ctx's seed
    assert scores["block0"][4] == 0 and (scores["block0"][torch.arange(32) != 4] > 0).all()
    method = get_method("taylor")
    for metric in ("params", "flops"):
        res = method.search(_ctx(copy.deepcopy(net), 0.5, split, metric, options={"batches": 4, "batch_size": 10}))
        achieved = metrics.cost(res.model, metric) / metrics.cost(net, metric)
        assert 0.5 - 0.02 <= achieved <= 0.5 + 1e-9, (metric, achieved)
        assert 4 not in res.keep["block0"]
        # one global ranking: every kept channel outscores every removed one (beyond each group's top-1)
        kept = torch.cat([scores[g][res.keep[g]] for g in scores])
        gone = torch.cat([scores[g][[c for c in range(len(scores[g])) if c not in res.keep[g]]] for g in scores])
        forced = torch.stack([scores[g].max() for g in scores])
        assert gone.max() <= kept[~torch.isin(kept, forced)].min() if len(kept) > len(forced) else True
    # the ranking is not l1_filter's: importance is a property of data, not of weight magnitude
    l1 = get_method("l1_filter").search(_ctx(copy.deepcopy(net), 0.5, split))
    taylor = method.search(_ctx(copy.deepcopy(net), 0.5, split, options={"batches": 4, "batch_size": 10}))
    assert taylor.keep != l1.keep


def test_taylor_is_deterministic_for_a_seed_and_depends_on_it():
    net, split = _net(3), _split(64, 3)
    a = taylor_importance(net, split, batches=2, batch_size=16, seed=1)
    b = taylor_importance(net, split, batches=2, batch_size=16, seed=1)
    c = taylor_importance(net, split, batches=2, batch_size=16, seed=2)
    assert all(torch.equal(a[g], b[g]) for g in a)
    assert any(not torch.equal(a[g], c[g]) for g in a)


# ------------------------------------------------------------------ fpgm


def test_distance_sums_equal_a_brute_force_loop():
    w = torch.randn(5, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    got = distance_sums(w)
    for i in range(5):
        brute = sum(math.sqrt(sum((float(a) - float(b)) ** 2 for a, b in zip(w[i].flatten(), w[j].flatten(),
                                                                                strict=True)))
                    for j in range(5))
        assert got[i].item() == pytest.approx(brute, rel=1e-9)


def test_fpgm_removes_the_filters_nearest_the_geometric_median():
    """Filters +-u, +-v and their centre 0 (the geometric median of the five): the centre has the
    smallest distance sum and is the first filter removed; the removed set is the brute-force
    smallest-sum set at the uniform width."""
    net = _net(4, widths=(6, 24))
    conv = net.group_convs()["block0"][0]
    gen = torch.Generator().manual_seed(1)
    u, v = torch.randn(1, 3, 3, generator=gen), torch.randn(1, 3, 3, generator=gen)
    with torch.no_grad():
        conv.weight.copy_(torch.stack([u, -u, v, -v, torch.zeros_like(u), 3 * u + v]))
    sums = fpgm_scores(net)["block0"]
    assert int(sums.argmin()) == 4
    # brute force: the point of the layer minimising the summed distance to all filters is filter 4
    flat = conv.weight.detach().flatten(1).double()
    assert min(range(6), key=lambda i: sum(float((flat[i] - flat[j]).norm()) for j in range(6))) == 4
    res = get_method("fpgm").search(_ctx(copy.deepcopy(net), 0.5, _split(8, 0)))
    assert metrics.count_params(res.model) / metrics.count_params(net) <= 0.5 + 1e-9
    assert {g: len(k) for g, k in res.keep.items()} == uniform_widths(net, 0.5, "params")
    for g, keep in res.keep.items():
        s = fpgm_scores(net)[g]
        removed = [c for c in range(len(s)) if c not in keep]
        want = sorted(range(len(s)), key=lambda c: (float(s[c]), c))[:len(removed)]
        assert sorted(removed) == sorted(want), g
    assert 4 not in res.keep["block0"]


def test_fpgm_differs_from_l1_and_is_data_free():
    net = _net(5, widths=(32, 48))
    a = get_method("fpgm").search(_ctx(copy.deepcopy(net), 0.5, _split(8, 0)))
    achieved = metrics.count_params(a.model) / metrics.count_params(net)
    assert 0.5 - 0.02 <= achieved <= 0.5 + 1e-9
    b = get_method("fpgm").search(_ctx(copy.deepcopy(net), 0.5, _split(8, 1), seed=99))
    assert a.keep == b.keep  # no data, no seed
    l1 = get_method("l1_filter").search(_ctx(copy.deepcopy(net), 0.5, _split(8, 0)))
    assert {g: len(k) for g, k in a.keep.items()} == {g: len(k) for g, k in l1.keep.items()}  # same width rule
    assert any(itertools.starmap(lambda x, y: x != y, zip(a.keep.values(), l1.keep.values(), strict=True)))
