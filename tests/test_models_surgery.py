"""Physical channel surgery vs masking, spec round trips, and hand-computed costs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pruneshot.io import load_tensors, save_tensors
from pruneshot.models import base as models
from pruneshot.models import cost as metrics
from pruneshot.models import layers, surgery
from pruneshot.models.small_cnn import SmallCNN


def _randomise(model: SmallCNN, seed: int) -> SmallCNN:
    """Random weights and BN affine/running statistics (so BN is far from identity), eval mode.

    Weights are scaled by 1/sqrt(fan_in) so activations stay O(1) and an absolute 1e-5
    tolerance measures the surgery rather than float32 rounding of huge logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in model.blocks():
            conv, bn = b[0], b[1]
            fan_in = conv.weight[0].numel()
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * fan_in**-0.5)
            bn.weight.copy_(torch.rand(bn.weight.shape, generator=gen) * 1.5 + 0.25)
            bn.bias.copy_(torch.randn(bn.bias.shape, generator=gen) * 0.5)
            bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=gen))
            bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=gen) * 2.0 + 0.1)
            bn.num_batches_tracked.fill_(17)
        fan_in = model.classifier.in_features
        model.classifier.weight.copy_(torch.randn(model.classifier.weight.shape, generator=gen) * fan_in**-0.5)
        model.classifier.bias.copy_(torch.randn(model.classifier.bias.shape, generator=gen))
    return model.eval()


def _random_keep(model: SmallCNN, gen: torch.Generator, one_in: str | None = None) -> dict[str, torch.Tensor]:
    keep = {}
    for g, n in model.channel_groups().items():
        k = 1 if g == one_in else int(torch.randint(1, n + 1, (1,), generator=gen))
        keep[g] = torch.randperm(n, generator=gen)[:k]  # unsorted on purpose
    return keep


CASES = [
    # (seed, in_channels, input_size, widths, num_classes, group forced to keep 1 channel)
    (0, 1, 8, [32, 64, 128], 5, None),
    (1, 1, 8, [32, 64, 128], 5, "block1"),
    (2, 3, 16, [8, 12, 16, 20], 7, "block0"),
    (3, 2, 5, [4, 6], 3, "block1"),
    (4, 1, 8, [1, 5, 3], 2, "block2"),
    (5, 3, 12, [16, 16], 10, "block0"),
]


@pytest.mark.parametrize(("seed", "c_in", "size", "widths", "n_cls", "one_in"), CASES)
def test_pruned_equals_masked(seed, c_in, size, widths, n_cls, one_in):
    torch.manual_seed(seed)
    model = _randomise(SmallCNN(c_in, size, widths, n_cls), seed)
    gen = torch.Generator().manual_seed(1000 + seed)
    keep = _random_keep(model, gen, one_in)
    if one_in is not None:
        assert len(keep[one_in]) == 1
    x = torch.randn((6, c_in, size, size), generator=gen)

    pruned = model.pruned(keep).eval()
    with torch.no_grad():
        dense_out = model(x)
        with surgery.channel_masks(model, surgery.keep_to_masks(model, keep)):
            masked_out = model(x)
        pruned_out = pruned(x)
        after_out = model(x)

    assert pruned_out.shape == (6, n_cls)
    assert (pruned_out - masked_out).abs().max().item() < 1e-5
    # the hooks are gone after the block, and masking actually changed something
    assert torch.equal(after_out, dense_out)
    if any(len(k) < n for k, n in zip(keep.values(), widths, strict=True)):
        assert (dense_out - masked_out).abs().max().item() > 1e-4

    # the spec of the pruned network records the kept widths
    assert pruned.spec["widths"] == [len(keep[f"block{i}"]) for i in range(len(widths))]
    assert [b[0].out_channels for b in pruned.blocks()] == pruned.spec["widths"]
    assert {k: v for k, v in pruned.spec.items() if k != "widths"} == {
        k: v for k, v in model.spec.items() if k != "widths"
    }
    # the dense model is untouched by surgery
    assert model.spec["widths"] == widths


def test_pruned_slices_the_right_channels():
    model = _randomise(SmallCNN(1, 8, [6, 5], 3), 0)
    keep = {"block0": torch.tensor([4, 0, 2]), "block1": torch.tensor([3])}
    pruned = model.pruned(keep)
    k0, k1 = torch.tensor([0, 2, 4]), torch.tensor([3])
    conv0, bn0 = model.blocks()[0][0], model.blocks()[0][1]
    conv1, bn1 = model.blocks()[1][0], model.blocks()[1][1]
    p0, pbn0 = pruned.blocks()[0][0], pruned.blocks()[0][1]
    p1, pbn1 = pruned.blocks()[1][0], pruned.blocks()[1][1]
    assert torch.equal(p0.weight, conv0.weight[k0])
    assert torch.equal(p1.weight, conv1.weight[k1][:, k0])
    for new, old, idx in ((pbn0, bn0, k0), (pbn1, bn1, k1)):
        assert torch.equal(new.weight, old.weight[idx])
        assert torch.equal(new.bias, old.bias[idx])
        assert torch.equal(new.running_mean, old.running_mean[idx])
        assert torch.equal(new.running_var, old.running_var[idx])
        assert int(new.num_batches_tracked) == 17
    assert torch.equal(pruned.classifier.weight, model.classifier.weight[:, k1])
    assert torch.equal(pruned.classifier.bias, model.classifier.bias)


def test_groups_missing_from_keep_are_kept_whole():
    model = _randomise(SmallCNN(1, 8, [4, 6, 8], 3), 1)
    keep = {"block1": torch.tensor([1, 5])}
    pruned = model.pruned(keep).eval()
    assert pruned.spec["widths"] == [4, 2, 8]
    masks = surgery.keep_to_masks(model, keep)
    assert torch.equal(masks["block0"], torch.ones(4))
    assert torch.equal(masks["block1"], torch.tensor([0.0, 1, 0, 0, 0, 1]))
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad(), surgery.channel_masks(model, masks):
        masked = model(x)
    with torch.no_grad():
        assert (pruned(x) - masked).abs().max().item() < 1e-5


@pytest.mark.parametrize("seed", [0, 1])
def test_pruned_spec_round_trip_through_safetensors(tmp_path, seed):
    model = _randomise(SmallCNN(1, 8, [32, 64, 128], 5), seed)
    gen = torch.Generator().manual_seed(seed)
    keep = _random_keep(model, gen, "block2")
    pruned = model.pruned(keep).eval()

    # in-memory round trip
    rebuilt = models.build_model(pruned.spec)
    rebuilt.load_state_dict(pruned.state_dict(), strict=True)

    # on-disk round trip with the project's own I/O
    path = tmp_path / "pruned.safetensors"
    save_tensors(path, models.state_dict_for_save(pruned))
    tensors = load_tensors(path)
    assert set(tensors) == set(pruned.state_dict())
    for k, v in pruned.state_dict().items():
        assert torch.equal(tensors[k], v), k
    loaded = models.load_model(str(path), pruned.spec).eval()
    assert loaded.spec == pruned.spec

    x = torch.randn((4, 1, 8, 8), generator=gen)
    with torch.no_grad():
        ref = pruned(x)
        assert torch.equal(rebuilt.eval()(x), ref)
        assert torch.equal(loaded(x), ref)


def test_load_model_rejects_wrong_spec(tmp_path):
    pruned = SmallCNN(1, 8, [32, 64, 128], 5).pruned({"block0": torch.arange(10)})
    path = tmp_path / "w.safetensors"
    save_tensors(path, models.state_dict_for_save(pruned))
    with pytest.raises(RuntimeError):
        models.load_model(str(path), SmallCNN(1, 8, [32, 64, 128], 5).spec)


def test_build_model_unknown_backbone():
    with pytest.raises(ValueError, match="small_cnn"):
        models.build_model({"name": "resnet9000"})


# ------------------------------------------------------------------------ costs


def test_params_of_tiny_network_by_hand():
    model = SmallCNN(in_channels=1, input_size=4, widths=[2, 3], num_classes=2)
    conv0 = 2 * 1 * 9  # 18   (c_out*c_in*3*3, no bias)
    bn0 = 2 * 2  # 4           (weight + bias per channel; running stats are buffers)
    conv1 = 3 * 2 * 9  # 54
    bn1 = 2 * 3  # 6
    linear = 3 * 2 + 2  # 8    (in*out + out)
    assert conv0 + bn0 + conv1 + bn1 + linear == 90
    assert metrics.count_params(model) == 90
    assert metrics.cost(model, "params") == 90


def test_flops_of_tiny_network_by_hand():
    model = SmallCNN(in_channels=1, input_size=4, widths=[2, 3], num_classes=2)
    conv0 = 2 * 2 * 1 * 9 * 4 * 4  # 576: conv at 4x4; then maxpool 4 -> 2
    conv1 = 2 * 3 * 2 * 9 * 2 * 2  # 432: conv at 2x2; then maxpool 2 -> 1
    linear = 2 * 3 * 2  # 12: matmul only, the bias add is not counted
    assert conv0 + conv1 + linear == 1020
    assert metrics.count_flops(model, (1, 4, 4)) == 1020
    assert metrics.cost(model, "flops") == 1020


def test_flops_without_pooling_once_map_is_one_pixel():
    # third block runs at 1x1 (no pooling below 2 px): 2*4*3*9*1*1 = 216
    model = SmallCNN(in_channels=2, input_size=4, widths=[2, 3, 4], num_classes=5)
    conv0 = 2 * 2 * 2 * 9 * 16  # 1152 at 4x4
    conv1 = 2 * 3 * 2 * 9 * 4  # 432 at 2x2
    conv2 = 2 * 4 * 3 * 9 * 1  # 216 at 1x1
    linear = 2 * 4 * 5  # 40
    assert metrics.count_flops(model, (2, 4, 4)) == conv0 + conv1 + conv2 + linear == 1840
    # params: 36+4 + 54+6 + 108+8 + 25 = 241
    assert metrics.count_params(model) == 36 + 4 + 54 + 6 + 108 + 8 + 4 * 5 + 5 == 241


def test_flop_counter_ignores_linear_bias():
    with_bias = nn.Linear(7, 3)
    without = nn.Linear(7, 3, bias=False)
    assert metrics.count_flops(with_bias, (7,)) == 2 * 7 * 3 == 42
    assert metrics.count_flops(without, (7,)) == 42


def test_count_flops_restores_training_mode():
    model = SmallCNN(1, 4, [2, 3], 2).train()
    metrics.count_flops(model, (1, 4, 4))
    assert model.training
    model.eval()
    metrics.count_flops(model, (1, 4, 4))
    assert not model.training


def test_cost_unknown_metric():
    with pytest.raises(ValueError, match="params, flops"):
        metrics.cost(SmallCNN(1, 4, [2], 2), "latency")


def test_randomised_model_has_nontrivial_bn():
    # guard for the equivalence tests: BN really transforms, and outputs are O(1)
    model = _randomise(SmallCNN(1, 8, [32, 64, 128], 5), 0)
    bn = model.blocks()[0][1]
    assert (bn.running_mean.abs() > 1e-3).any()
    assert ((bn.running_var - 1).abs() > 1e-2).any()
    assert ((bn.weight - 1).abs() > 1e-2).any()
    with torch.no_grad():
        out = model(torch.randn(6, 1, 8, 8))
    assert 1e-2 < out.abs().max().item() < 100


# ------------------------------------------------------------ low-rank blocks (basis-pruned networks)


def _randomise_lowrank(model: SmallCNN, seed: int) -> SmallCNN:
    """``_randomise`` for networks with LowRankConv blocks (basis and coef both random)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in model.blocks():
            convs = [b[0].basis, b[0].coef] if isinstance(b[0], layers.LowRankConv) else [b[0]]
            for conv in convs:
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * conv.weight[0].numel() ** -0.5)
            bn = b[1]
            bn.weight.copy_(torch.rand(bn.weight.shape, generator=gen) * 1.5 + 0.25)
            bn.bias.copy_(torch.randn(bn.bias.shape, generator=gen) * 0.5)
            bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=gen))
            bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=gen) * 2.0 + 0.1)
        model.classifier.weight.copy_(torch.randn(model.classifier.weight.shape, generator=gen) * 0.3)
    return model.eval()


LOWRANK_SPEC = {"name": "small_cnn", "in_channels": 2, "input_size": 8, "widths": [6, 10, 8], "num_classes": 4,
                "ranks": [3, None, 5]}


def test_spec_without_ranks_builds_the_same_network_as_before():
    spec = {"name": "small_cnn", "in_channels": 1, "input_size": 8, "widths": [4, 6], "num_classes": 3}
    model = models.build_model(spec)
    assert model.spec == spec and "ranks" not in model.spec
    assert list(model.state_dict()) == [
        "features.0.0.weight", "features.0.1.weight", "features.0.1.bias", "features.0.1.running_mean",
        "features.0.1.running_var", "features.0.1.num_batches_tracked",
        "features.2.0.weight", "features.2.1.weight", "features.2.1.bias", "features.2.1.running_mean",
        "features.2.1.running_var", "features.2.1.num_batches_tracked",
        "classifier.weight", "classifier.bias"]
    assert all(type(b[0]) is nn.Conv2d for b in model.blocks())
    # all-null ranks are the same as no ranks
    same = models.build_model({**spec, "ranks": [None, None]})
    assert same.spec == spec
    assert list(same.state_dict()) == list(model.state_dict())


def test_low_rank_spec_builds_low_rank_blocks():
    model = models.build_model(LOWRANK_SPEC)
    assert model.spec == LOWRANK_SPEC
    b0, b1, b2 = (b[0] for b in model.blocks())
    assert isinstance(b0, layers.LowRankConv) and isinstance(b2, layers.LowRankConv)
    assert type(b1) is nn.Conv2d
    assert (b0.in_channels, b0.rank, b0.out_channels) == (2, 3, 6)
    assert b0.basis.kernel_size == (3, 3) and b0.basis.padding == (1, 1) and b0.basis.bias is None
    assert b0.coef.kernel_size == (1, 1) and b0.coef.bias is None
    assert {"features.0.0.basis.weight", "features.0.0.coef.weight", "features.2.0.weight",
            "features.4.0.basis.weight"} <= set(model.state_dict())
    assert model.channel_groups() == {"block0": 6, "block1": 10, "block2": 8}
    assert model.group_convs()["block0"] == [b0.coef]
    assert model.group_convs()["block1"] == [b1]
    assert model.group_consumers() == {"block0": [b1], "block1": [b2.basis], "block2": [model.classifier]}
    assert model.spec_with_widths({"block1": 4})["ranks"] == [3, None, 5]
    assert model.spec_with_ranks({"block0": None, "block2": None}).get("ranks") is None
    assert model.spec_with_ranks({"block1": 2})["ranks"] == [3, 2, 5]


@pytest.mark.parametrize(("widths", "ranks"), [([4], [1, 2]), ([4, 6], [0, None]), ([4, 6], [None]),
                                               ([4, 6], ["3", None]), ([4, 6], [True, None])])
def test_bad_ranks_are_rejected(widths, ranks):
    with pytest.raises(ValueError, match="rank"):
        models.build_model({"name": "small_cnn", "in_channels": 1, "input_size": 8, "widths": widths,
                            "num_classes": 3, "ranks": ranks})


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_low_rank_pruned_equals_masked(seed):
    model = _randomise_lowrank(models.build_model(LOWRANK_SPEC), seed)
    gen = torch.Generator().manual_seed(seed)
    keep = _random_keep(model, gen, "block2" if seed == 1 else None)
    pruned = model.pruned(keep).eval()
    x = torch.randn((5, 2, 8, 8), generator=gen)
    with torch.no_grad():
        with surgery.channel_masks(model, surgery.keep_to_masks(model, keep)):
            masked = model(x)
        assert (pruned(x) - masked).abs().max().item() < 1e-5
    assert pruned.spec["ranks"] == LOWRANK_SPEC["ranks"]
    assert pruned.spec["widths"] == [len(keep[g]) for g in ("block0", "block1", "block2")]
    k0, k1 = (torch.as_tensor(sorted(keep[g].tolist())) for g in ("block0", "block1"))
    old0, new0 = model.blocks()[0][0], pruned.blocks()[0][0]
    assert torch.equal(new0.basis.weight, old0.basis.weight)  # input is the image: nothing to slice
    assert torch.equal(new0.coef.weight, old0.coef.weight[k0])
    old2, new2 = model.blocks()[2][0], pruned.blocks()[2][0]
    k2 = torch.as_tensor(sorted(keep["block2"].tolist()))
    assert torch.equal(new2.basis.weight, old2.basis.weight[:, k1])
    assert torch.equal(new2.coef.weight, old2.coef.weight[k2])
    assert torch.equal(pruned.blocks()[1][0].weight, model.blocks()[1][0].weight[k1][:, k0])


def test_low_rank_round_trip_through_safetensors(tmp_path):
    import json

    model = _randomise_lowrank(models.build_model(LOWRANK_SPEC), 3)
    pruned = model.pruned({"block1": torch.tensor([0, 3, 7])}).eval()
    path = tmp_path / "lowrank.safetensors"
    save_tensors(path, models.state_dict_for_save(pruned))
    spec = json.loads(json.dumps(pruned.spec))
    loaded = models.load_model(str(path), spec).eval()
    assert loaded.spec == pruned.spec
    x = torch.randn(3, 2, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))
    with pytest.raises(RuntimeError):  # the plain spec does not fit low-rank weights
        models.load_model(str(path), {k: v for k, v in spec.items() if k != "ranks"})


def test_scaling_at_the_consumer_equals_scaling_after_the_activation():
    """A positive per-channel scale after ReLU commutes with max-pooling: putting it on the
    consumer's input (or folding it into the consumer's weights) gives the same network."""
    model = _randomise_lowrank(models.build_model(LOWRANK_SPEC), 5)
    gen = torch.Generator().manual_seed(5)
    scales = {g: torch.rand(n, generator=gen) + 0.1 for g, n in model.channel_groups().items()}
    x = torch.randn(4, 2, 8, 8, generator=gen)
    points, consumers = model.mask_points(), model.group_consumers()

    def post(s):
        return lambda _m, _i, out: out * s.view(1, -1, 1, 1)

    def pre(s):
        return lambda _m, args: (args[0] * s.view((1, -1) + (1,) * (args[0].dim() - 2)),)

    with torch.no_grad():
        hs = [points[g][0].register_forward_hook(post(s)) for g, s in scales.items()]
        ref = model(x)
        for h in hs:
            h.remove()
        hs = [m.register_forward_pre_hook(pre(s)) for g, s in scales.items() for m in consumers[g]]
        at_consumer = model(x)
        for h in hs:
            h.remove()
        for g, s in scales.items():
            for m in consumers[g]:
                m.weight.mul_(s.view((1, -1) + (1,) * (m.weight.dim() - 2)))
        folded = model(x)
    assert (at_consumer - ref).abs().max().item() < 1e-5
    assert (folded - ref).abs().max().item() < 1e-5


SPEC_COST_CASES = [
    {"name": "small_cnn", "in_channels": 1, "input_size": 8, "widths": [32, 64, 128], "num_classes": 5},
    {"name": "small_cnn", "in_channels": 3, "input_size": 5, "widths": [4, 6, 2, 3], "num_classes": 7},
    LOWRANK_SPEC,
    {"name": "small_cnn", "in_channels": 1, "input_size": 16, "widths": [8, 16], "num_classes": 2, "ranks": [1, 40]},
]


@pytest.mark.parametrize("spec", SPEC_COST_CASES)
@pytest.mark.parametrize("metric", ["params", "flops"])
def test_spec_cost_equals_the_counters(spec, metric):
    assert SmallCNN.spec_cost(spec, metric) == metrics.cost(models.build_model(spec), metric)
