"""The basis-scaling layer algebra: SVD decomposition, pruning, folding, break-even, cost accounting."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from pruneshot.methods.scaling import greedy_prune, per_layer_prune, round_targets
from pruneshot.models import basis
from pruneshot.models import cost as metrics
from pruneshot.models.base import build_model
from pruneshot.models.basis import BasisCost, BasisScalingConv, decompose, fold_network, revert_larger_blocks
from pruneshot.models.layers import LowRankConv, conv_cost, lowrank_pays
from pruneshot.models.small_cnn import SmallCNN

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _conv(c_in: int, c_out: int, k: int, stride: int, padding: int, dilation: int, bias: bool, seed: int) -> nn.Conv2d:
    gen = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(c_in, c_out, k, stride=stride, padding=padding, dilation=dilation, bias=bias)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * (c_in * k * k) ** -0.5)
        if bias:
            conv.bias.copy_(torch.randn(c_out, generator=gen))
    return conv


def _randomise(model: SmallCNN, seed: int) -> SmallCNN:
    """Random O(1) weights and non-trivial BatchNorm statistics, eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in model.blocks():
            bn = b[1]
            convs = [b[0].basis, b[0].coef] if isinstance(b[0], LowRankConv) else [b[0]]
            for conv in convs:
                fan_in = conv.weight[0].numel()
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * fan_in**-0.5)
            bn.weight.copy_(torch.rand(bn.weight.shape, generator=gen) * 1.5 + 0.25)
            bn.bias.copy_(torch.randn(bn.bias.shape, generator=gen) * 0.5)
            bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=gen) * 0.5)
            bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=gen) * 2.0 + 0.1)
        fan_in = model.classifier.in_features
        model.classifier.weight.copy_(torch.randn(model.classifier.weight.shape, generator=gen) * fan_in**-0.5)
    return model.eval()


# (C_in, C_out): C_in k^2 = 9 < 12 = C_out, and 36 > 6
SHAPES = [(1, 12), (4, 6)]


@pytest.mark.parametrize(("shape", "stride", "padding", "dilation", "bias"),
                         list(itertools.product(SHAPES, [1, 2], [0, 1, 2], [1, 2], [False, True])))
def test_unscaled_decomposition_reproduces_the_conv(shape, stride, padding, dilation, bias):
    c_in, c_out = shape
    conv = _conv(c_in, c_out, 3, stride, padding, dilation, bias, seed=stride * 100 + padding * 10 + dilation)
    layer = BasisScalingConv(conv)
    assert layer.rank == min(c_in * 9, c_out)
    assert layer.A.out_channels == layer.rank
    assert (layer.A.stride, layer.A.padding, layer.A.dilation) == (conv.stride, conv.padding, conv.dilation)
    x = torch.randn(3, c_in, 11, 11, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref, out = conv(x), layer(x)
    assert out.shape == ref.shape
    assert out.dtype == torch.float32
    assert (out - ref).abs().max().item() < 1e-5


def test_other_kernel_sizes_and_rectangular_kernels():
    for k in [1, 5, (3, 1)]:
        conv = nn.Conv2d(3, 7, k, padding=1, bias=True)
        x = torch.randn(2, 3, 9, 9)
        with torch.no_grad():
            assert (BasisScalingConv(conv)(x) - conv(x)).abs().max().item() < 1e-5


def test_basis_filters_are_orthonormal_and_only_s_trains():
    conv = _conv(4, 6, 3, 1, 1, 1, True, seed=0)
    layer = BasisScalingConv(conv)
    u = layer.A.weight.detach().reshape(layer.rank, -1).double()
    assert torch.allclose(u @ u.T, torch.eye(layer.rank, dtype=torch.float64), atol=1e-6)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["s"]
    assert torch.equal(layer.s.detach(), torch.ones(layer.rank))
    assert torch.all(layer.sv[:-1] >= layer.sv[1:])  # singular values descending
    assert torch.equal(layer.bias, conv.bias.detach())
    # B's weight is diag(s) S V^T
    with torch.no_grad():
        layer.s.copy_(torch.arange(1.0, layer.rank + 1))
    expected = layer.v * (layer.sv * torch.arange(1.0, layer.rank + 1))
    assert torch.allclose(layer.coef_weight().reshape(6, layer.rank), expected)


def test_grouped_or_circular_conv_is_rejected():
    with pytest.raises(ValueError, match="groups"):
        BasisScalingConv(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="padding_mode"):
        BasisScalingConv(nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular"))
    with pytest.raises(TypeError):
        BasisScalingConv(nn.Linear(3, 3))


@pytest.mark.parametrize(("shape", "stride", "padding", "dilation", "bias"),
                         [((4, 6), 1, 1, 1, False), ((1, 12), 2, 2, 1, True), ((4, 6), 2, 0, 2, True),
                          ((3, 16), 1, 1, 2, False)])
def test_prune_then_fold_equals_zeroed_scales(shape, stride, padding, dilation, bias):
    c_in, c_out = shape
    conv = _conv(c_in, c_out, 3, stride, padding, dilation, bias, seed=3)
    layer = BasisScalingConv(conv)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        layer.s.copy_(torch.rand(layer.rank, generator=gen) * 2 - 0.5)  # trained, some negative
    x = torch.randn(4, c_in, 10, 10, generator=gen)
    with torch.no_grad():
        before = layer(x)
    drop = torch.randperm(layer.rank, generator=gen)[: layer.rank // 2]
    # zeroing s by hand is the masked form
    zeroed = BasisScalingConv(conv)
    with torch.no_grad():
        zeroed.s.copy_(layer.s)
        zeroed.s[drop] = 0.0
    layer.prune(drop)
    assert layer.n_kept() == layer.rank - len(drop)
    assert torch.all(layer.s.detach()[drop] == 0)
    low, dense = layer.to_low_rank(), layer.to_dense()
    assert isinstance(low, LowRankConv) and low.rank == layer.n_kept()
    assert dense.weight.shape == conv.weight.shape
    assert (dense.bias is None) == (not bias)
    with torch.no_grad():
        masked = layer(x)
        assert (masked - zeroed(x)).abs().max().item() < 1e-6
        assert (masked - before).abs().max().item() > 1e-3  # pruning did something
        assert (low(x) - masked).abs().max().item() < 1e-5
        assert (dense(x) - masked).abs().max().item() < 1e-5
    # W_eff = sum over kept i of s_i S_i V[:, i] U[:, i]^T
    w_eff = torch.zeros(c_out, c_in * 9, dtype=torch.float64)
    for i in layer.kept().tolist():
        u_i = layer.A.weight[i].reshape(-1).double()
        w_eff += float(layer.s.detach()[i] * layer.sv[i]) * torch.outer(layer.v[:, i].double(), u_i)
    assert torch.allclose(layer.effective_weight().reshape(c_out, -1).double(), w_eff, atol=1e-6)


def test_embedded_layer_computes_the_same_on_kept_channels():
    conv = _conv(6, 10, 3, 1, 1, 1, True, seed=5)
    in_idx, out_idx = torch.tensor([0, 2, 5]), torch.tensor([1, 4, 6, 9])
    narrow = nn.Conv2d(3, 4, 3, padding=1, bias=True)
    with torch.no_grad():
        narrow.weight.copy_(conv.weight[out_idx][:, in_idx])
        narrow.bias.copy_(conv.bias[out_idx])
    layer = BasisScalingConv(narrow)
    with torch.no_grad():
        layer.s.copy_(torch.linspace(0.5, 1.5, layer.rank))
    layer.prune([1])
    wide = layer.embedded(in_idx, 6, out_idx, 10)
    assert wide.in_channels == 6 and wide.out_channels == 10 and wide.rank == layer.rank
    assert [n for n, p in wide.named_parameters() if p.requires_grad] == ["s"]
    x = torch.randn(2, 6, 7, 7)
    with torch.no_grad():
        out = wide(x)
        assert (out[:, out_idx] - layer(x[:, in_idx])).abs().max().item() < 1e-6
        removed = [c for c in range(10) if c not in out_idx.tolist()]
        assert torch.all(out[:, removed] == 0)
    with pytest.raises(ValueError, match="index"):
        layer.embedded(in_idx[:2], 6, out_idx, 10)


def test_pruned_scale_stays_zero_after_optimiser_steps():
    layer = BasisScalingConv(_conv(2, 5, 3, 1, 1, 1, False, seed=1))
    opt = torch.optim.SGD([layer.s], lr=0.1, momentum=0.9)
    x = torch.randn(3, 2, 6, 6)
    for step in range(4):
        loss = layer(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        layer.rezero()
        if step == 1:
            layer.prune([0, 3])
    assert layer.s[0].item() == 0.0 and layer.s[3].item() == 0.0
    assert (layer.s.detach()[[1, 2, 4]] != 1.0).all()


def test_break_even_and_revert_when_larger():
    # k^2 C_in = 18, C_out = 18: break-even r' = 18 * 18 / 36 = 9 exactly
    assert lowrank_pays(2, 18, 3, 8)
    assert not lowrank_pays(2, 18, 3, 9)
    conv = _conv(2, 18, 3, 1, 1, 1, False, seed=2)
    dense_params = metrics.count_params(conv)
    for kept, reverted in [(9, True), (8, False), (1, False), (18, True)]:
        layer = BasisScalingConv(conv)
        layer.prune(list(range(kept, layer.rank)))
        assert layer.n_kept() == kept
        folded = layer.fold(revert_when_larger=True)
        assert isinstance(folded, nn.Conv2d) is reverted
        low = layer.fold(revert_when_larger=False)
        assert isinstance(low, LowRankConv)
        assert metrics.count_params(low) == kept * (18 + 18)
        assert metrics.count_params(folded) == (dense_params if reverted else kept * 36)
        assert metrics.count_params(folded) <= dense_params
        x = torch.randn(2, 2, 7, 7)
        with torch.no_grad():
            assert (folded(x) - layer(x)).abs().max().item() < 1e-5
            assert (low(x) - layer(x)).abs().max().item() < 1e-5


@pytest.mark.parametrize(("c_in", "c_out", "rank", "stride", "padding", "size"),
                         [(3, 8, None, 1, 1, 8), (3, 8, 4, 1, 1, 8), (5, 2, 1, 2, 0, 9), (4, 16, 7, 1, 2, 6)])
def test_conv_cost_matches_the_counters(c_in, c_out, rank, stride, padding, size):
    layer = (nn.Conv2d(c_in, c_out, 3, stride=stride, padding=padding, bias=False) if rank is None
             else LowRankConv(c_in, c_out, rank, 3, stride=stride, padding=padding))
    out_size = (size + 2 * padding - 3) // stride + 1
    assert conv_cost(c_in, c_out, 3, rank, out_size**2, "params") == metrics.count_params(layer)
    assert conv_cost(c_in, c_out, 3, rank, out_size**2, "flops") == metrics.count_flops(layer, (c_in, size, size))


@pytest.mark.parametrize("metric", ["params", "flops"])
@pytest.mark.parametrize("revert", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fold_network_is_exact_and_cost_accounting_matches_metrics(metric, revert, seed):
    model = _randomise(SmallCNN(2, 8, [8, 16, 12], 4), seed)
    masked = decompose(model)
    layers = basis.basis_layers(masked)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 2, 8, 8, generator=gen)
    with torch.no_grad():
        assert (masked(x) - model(x)).abs().max().item() < 1e-5  # s = 1: the dense network
        for m in layers.values():
            m.s.copy_(torch.rand(m.rank, generator=gen) + 0.5)
    for m in layers.values():
        n = int(torch.randint(1, m.rank + 1, (1,), generator=gen))
        m.prune(torch.randperm(m.rank, generator=gen)[: m.rank - n])
    physical = fold_network(masked, revert)
    kept = {g: m.n_kept() for g, m in layers.items()}
    ranks = basis.physical_ranks(masked, kept, revert)
    assert physical.spec.get("ranks", [None] * 3) == list(ranks.values())
    assert physical.spec["widths"] == model.spec["widths"]
    assert BasisCost(masked, metric, revert)(kept) == metrics.cost(physical, metric)
    assert SmallCNN.spec_cost(physical.spec, metric) == metrics.cost(physical, metric)
    with torch.no_grad():
        assert (physical(x) - masked(x)).abs().max().item() < 1e-5
    # BN and head are copied, not changed
    for old_b, new_b in zip(model.blocks(), physical.blocks(), strict=True):
        for k, v in old_b[1].state_dict().items():
            assert torch.equal(new_b[1].state_dict()[k], v)
    assert torch.equal(physical.classifier.weight, model.classifier.weight)


def test_full_rank_cost_is_the_dense_cost_when_reverting():
    model = SmallCNN(1, 8, [8, 16, 32], 5)
    masked = decompose(model)
    full = {g: m.rank for g, m in basis.basis_layers(masked).items()}
    for metric in ("params", "flops"):
        assert BasisCost(masked, metric, True)(full) == metrics.cost(model, metric)
        assert BasisCost(masked, metric, False)(full) > metrics.cost(model, metric)


def test_decompose_rejects_low_rank_networks():
    lowrank = build_model({**SmallCNN(1, 8, [4, 4], 2).spec, "ranks": [2, None]})
    with pytest.raises(NotImplementedError, match="low-rank"):
        decompose(lowrank)


def test_revert_larger_blocks_is_exact():
    # block1: 8 -> 3 channels at rank 5: low-rank 5 * (72 + 3) = 375 >= dense 216, so it reverts
    model = _randomise(build_model({"name": "small_cnn", "in_channels": 1, "input_size": 8, "widths": [8, 3, 6],
                                    "num_classes": 3, "ranks": [2, 5, 1]}), 4)
    assert basis.reverted_spec(model.spec)["ranks"] == [2, None, 1]
    new = revert_larger_blocks(model)
    assert new.spec["ranks"] == [2, None, 1]
    assert isinstance(new.blocks()[1][0], nn.Conv2d)
    assert metrics.count_params(new) < metrics.count_params(model)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert (new(x) - model(x)).abs().max().item() < 1e-5
    plain = SmallCNN(1, 8, [4, 4], 2)
    assert revert_larger_blocks(plain) is plain


# ------------------------------------------------------------ unit selection


def _linear_cost(weights: dict[str, int]):
    return lambda counts: sum(weights[g] * n for g, n in counts.items())


def test_greedy_prune_meets_target_keeps_one_and_refills():
    scores = {"a": torch.tensor([0.1, 0.2, 5.0]), "b": torch.tensor([0.05, 3.0, 0.3, 0.4])}
    alive = {g: torch.ones(len(s), dtype=torch.bool) for g, s in scores.items()}
    cost = _linear_cost({"a": 10, "b": 3})  # 30 + 12 = 42
    removed, readded, c = greedy_prune(scores, alive, cost, target=26)
    # ascending: b0 (.05) -> 39, a0 (.1) -> 29, a1 (.2) -> 19 <= 26; refill: a1 does not fit (29), a0 neither,
    # b0 does (22)
    assert c == 22 == cost({g: int(a.sum()) for g, a in alive.items()})
    assert set(removed) == {("a", 0), ("a", 1)}
    assert readded == [("b", 0)]
    assert alive["a"].tolist() == [False, False, True]
    # a group's last unit is never removed, even when the target is unreachable
    removed, _, c = greedy_prune(scores, alive, cost, target=0)
    assert [int(a.sum()) for a in alive.values()] == [1, 1]
    assert alive["b"][1] and alive["a"][2]
    assert c == 13


def test_per_layer_prune_same_fraction():
    scores = {"a": torch.arange(10.0), "b": torch.arange(20.0).flip(0)}
    alive = {g: torch.ones(len(s), dtype=torch.bool) for g, s in scores.items()}
    cost = _linear_cost({"a": 1, "b": 1})
    removed, c = per_layer_prune(scores, alive, {"a": 10, "b": 20}, cost, target=15)
    assert c == 15 and int(alive["a"].sum()) == 5 and int(alive["b"].sum()) == 10
    assert alive["a"].tolist() == [False] * 5 + [True] * 5  # the largest scores stay
    assert alive["b"].tolist() == [True] * 10 + [False] * 10
    assert len(removed) == 15


def test_round_targets_geometric():
    t = round_targets(100.0, 25.0, 4)
    assert t[-1] == 25.0
    assert t == pytest.approx([100 * 0.25 ** (j / 4) for j in range(1, 5)])
