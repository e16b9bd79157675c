"""The CIFAR backbones: shapes, hand-counted costs, coupled channel groups, and every method family
(channel, basis) pruning every backbone with the physical network equal to its masked form."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pruneshot.data.splits import Split
from pruneshot.methods import AdaptContext, SearchContext, available, get_method
from pruneshot.models import base as models
from pruneshot.models import cost as metrics
from pruneshot.models import layers, surgery
from pruneshot.models.basis import basis_layers, decompose, fold_network

SIZE, C_IN, N_CLS = 8, 3, 4


def _reduced(name: str) -> models.Backbone:
    """A reduced-width instance (8x8 RGB inputs) with random BN statistics, eval mode."""
    mult = {"small_cnn": None, "vgg16_bn": 0.0625, "resnet20": 0.25, "resnet56": 0.125, "mobilenetv2": 0.125}[name]
    opts = {"name": name, "widths": [4, 6, 8]} if mult is None else {"name": name, "width_mult": mult}
    spec = models.backbone_spec(opts, C_IN, SIZE, N_CLS)
    if name == "mobilenetv2":
        spec["widths"]["head"] = 12  # the paper keeps 1280 below width 1; a reduced test net need not
    torch.manual_seed(0)
    model = models.build_model(spec)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.3)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.3)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return model.eval()


NAMES = ["vgg16_bn", "resnet20", "resnet56", "mobilenetv2"]
X = torch.randn(5, C_IN, SIZE, SIZE, generator=torch.Generator().manual_seed(3))


# ------------------------------------------------------------------ hand counts


def _resnet_hand(depth: int, w: tuple[int, int, int], c_in: int, size: int, n_cls: int) -> tuple[int, int]:
    """Params and FLOPs of a CIFAR ResNet with projection shortcuts, counted layer by layer."""
    n = (depth - 2) // 6
    params = 9 * c_in * w[0] + 2 * w[0]
    flops = 2 * 9 * c_in * w[0] * size * size
    prev = w[0]
    for s in range(3):
        for b in range(n):
            stride = 2 if (s > 0 and b == 0) else 1
            size = (size - 1) // stride + 1
            params += 9 * prev * w[s] + 2 * w[s] + 9 * w[s] * w[s] + 2 * w[s]
            flops += 2 * (9 * prev * w[s] + 9 * w[s] * w[s]) * size * size
            if prev != w[s]:
                params += prev * w[s] + 2 * w[s]
                flops += 2 * prev * w[s] * size * size
            prev = w[s]
    return params + prev * n_cls + n_cls, flops + 2 * prev * n_cls


def _vgg_hand(widths: list[int], c_in: int, size: int, n_cls: int) -> tuple[int, int]:
    params = flops = 0
    pool_after = {1, 3, 6, 9, 12}
    for i, w in enumerate(widths):
        params += 9 * c_in * w + 2 * w
        flops += 2 * 9 * c_in * w * size * size
        if i in pool_after and size >= 2:
            size //= 2
        c_in = w
    return params + c_in * n_cls + n_cls, flops + 2 * c_in * n_cls


def test_resnet_costs_match_a_hand_count_and_the_counters():
    # full size: the paper's 0.27M / 0.85M (option A: 269,722 / 853,018) plus the two projections
    proj = (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)
    for depth, option_a in ((20, 269_722), (56, 853_018)):
        spec = models.backbone_spec({"name": f"resnet{depth}"}, 3, 32, 10)
        assert models.spec_cost(spec, "params") == option_a + proj
        assert (models.spec_cost(spec, "params"), models.spec_cost(spec, "flops")) == _resnet_hand(
            depth, (16, 32, 64), 3, 32, 10)
    # reduced width, odd input size
    spec = models.backbone_spec({"name": "resnet20", "width_mult": 0.25}, 2, 7, 3)
    model = models.build_model(spec)
    hand = _resnet_hand(20, (4, 8, 16), 2, 7, 3)
    assert (metrics.cost(model, "params"), metrics.cost(model, "flops")) == hand
    assert (models.spec_cost(spec, "params"), models.spec_cost(spec, "flops")) == hand
    # hand count on a pruned instance: every stage and inner width changed
    keep = {g: torch.arange(max(1, n // 2)) for g, n in model.channel_groups().items()}
    keep["stage2"] = torch.arange(3)
    pruned = model.pruned(keep)
    w = pruned.spec["widths"]
    assert (w["stage1"], w["stage2"], w["stage3"]) == (2, 3, 8)
    inner_w = {g: v for g, v in w.items() if not g.startswith("stage")}
    assert set(inner_w.values()) == {2, 4, 8}


def test_vgg_costs_match_a_hand_count():
    spec = models.backbone_spec({"name": "vgg16_bn"}, 3, 32, 10)
    assert models.spec_cost(spec, "params") == 14_724_042  # the CIFAR VGG-16-BN of network slimming
    model = _reduced("vgg16_bn")
    widths = list(model.spec["widths"].values())
    assert widths[:4] == [4, 4, 8, 8]
    hand = _vgg_hand(widths, C_IN, SIZE, N_CLS)
    assert (metrics.cost(model, "params"), metrics.cost(model, "flops")) == hand


def test_mobilenetv2_matches_the_published_parameter_count_and_a_hand_count():
    # parameters do not depend on strides: with 1000 classes it is torchvision's mobilenet_v2 (3,504,872)
    assert models.spec_cost(models.backbone_spec({"name": "mobilenetv2"}, 3, 224, 1000), "params") == 3_504_872
    model = _reduced("mobilenetv2")
    w = model.spec["widths"]
    params, flops, size, c = 0, 0, SIZE, w["stem"]
    params += 27 * c + 2 * c
    flops += 2 * 27 * c * size * size
    blocks = [(1, 1, 1), (6, 2, 1), (6, 3, 2), (6, 4, 2), (6, 3, 1), (6, 3, 2), (6, 1, 1)]
    i = 0
    for k, (t, n, s) in enumerate(blocks, start=1):
        for j in range(n):
            stride = s if j == 0 else 1
            h = c if t == 1 else w[f"b{i}_hidden"]
            if t != 1:
                params += c * h + 2 * h
                flops += 2 * c * h * size * size
            size = (size - 1) // stride + 1
            params += 9 * h + 2 * h
            flops += 2 * 9 * h * size * size
            out = w[f"stage{k}"]
            params += h * out + 2 * out
            flops += 2 * h * out * size * size
            c = out
            i += 1
    params += c * w["head"] + 2 * w["head"] + w["head"] * N_CLS + N_CLS
    flops += 2 * c * w["head"] * size * size + 2 * w["head"] * N_CLS
    assert i == 17
    assert (metrics.cost(model, "params"), metrics.cost(model, "flops")) == (params, flops)


@pytest.mark.parametrize("name", NAMES)
def test_forward_and_backward(name):
    model = _reduced(name).train()
    out = model(X)
    assert out.shape == (len(X), N_CLS)
    F.cross_entropy(out, torch.arange(len(X)) % N_CLS).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.forward_features(X).shape == (len(X), model.classifier.in_features)


# ------------------------------------------------------------------ coupled channel groups


def test_resnet_groups_tie_residual_streams():
    model = _reduced("resnet20")
    bns = model.group_bns()
    # stage1: the stem and every block's second conv (identity shortcuts); stage2/3 add a projection
    assert len(bns["stage1"]) == 1 + 3 and len(bns["stage2"]) == 3 + 1 and len(bns["stage3"]) == 3 + 1
    assert len(bns["s2b1"]) == 1
    consumers = model.group_consumers()
    # stage1 is read by the three blocks' first convs, stage2's first conv and its projection
    assert len(consumers["stage1"]) == 3 + 2
    assert consumers["stage3"][-1] is model.classifier


def test_mobilenet_depthwise_follows_its_input_group():
    model = _reduced("mobilenetv2")
    geo = model.layer_geometry()
    assert geo["b0_dw"].depthwise and geo["b0_dw"].in_group == geo["b0_dw"].out_group == "stem"
    assert geo["b3_dw"].in_group == geo["b3_dw"].out_group == "b3_hidden"
    assert len(model.group_bns()["b3_hidden"]) == 2  # expand and depthwise
    assert model.get_conv("b3_dw").groups == model.channel_groups()["b3_hidden"]
    # the depthwise conv is not a consumer: the hidden group is read by the projection only
    assert model.group_consumers()["b3_hidden"] == [model.get_conv("b3_project")]
    # residual blocks inside a stage share the stream group
    assert geo["b2_project"].out_group == geo["b1_project"].out_group == "stage2"


def test_unknown_groups_and_bad_specs_are_rejected():
    model = _reduced("resnet20")
    with pytest.raises(ValueError, match="unknown channel group"):
        model.pruned({"nope": torch.tensor([0])})
    spec = copy.deepcopy(model.spec)
    spec["widths"]["extra"] = 3
    with pytest.raises(ValueError, match="unknown group"):
        models.build_model(spec)
    spec = copy.deepcopy(model.spec)
    del spec["widths"]["s1b0"]
    with pytest.raises(ValueError, match="s1b0"):
        models.build_model(spec)
    with pytest.raises(ValueError, match="depthwise"):
        _reduced("mobilenetv2").spec_with_ranks({"b3_dw": 2})


# ------------------------------------------------------------------ method families on every backbone


def _randomise_all(model: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * fan_in**-0.5)
    return model.eval()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("seed", [0, 1])
def test_channel_family_physical_equals_masked(name, seed):
    model = _randomise_all(_reduced(name), seed)
    gen = torch.Generator().manual_seed(10 + seed)
    keep = {g: torch.randperm(n, generator=gen)[: int(torch.randint(1, n + 1, (1,), generator=gen))]
            for g, n in model.channel_groups().items()}
    pruned = model.pruned(keep).eval()
    with torch.no_grad():
        with surgery.channel_masks(model, surgery.keep_to_masks(model, keep)):
            masked = model(X)
        assert (pruned(X) - masked).abs().max().item() < 1e-5
    for metric in ("params", "flops"):
        assert models.spec_cost(pruned.spec, metric) == metrics.cost(pruned, metric)
    assert pruned.channel_groups() == {g: len(k) for g, k in keep.items()}


@pytest.mark.parametrize("name", NAMES)
def test_basis_family_physical_equals_masked(name):
    model = _randomise_all(_reduced(name), 2)
    masked = decompose(model)
    with torch.no_grad():
        assert (masked(X) - model(X)).abs().max().item() < 1e-4  # s = 1: the same network
    gen = torch.Generator().manual_seed(4)
    for layer in basis_layers(masked).values():
        k = int(torch.randint(0, layer.rank, (1,), generator=gen))
        layer.prune(torch.randperm(layer.rank, generator=gen)[:k])
        with torch.no_grad():
            layer.s.mul_(torch.rand(layer.rank, generator=gen) + 0.5)
    for revert in (True, False):
        physical = fold_network(masked, revert)
        with torch.no_grad():
            assert (physical(X) - masked(X)).abs().max().item() < 1e-4
        for metric in ("params", "flops"):
            assert models.spec_cost(physical.spec, metric) == metrics.cost(physical, metric)
        if not revert:
            assert all(isinstance(physical.get_conv(n), layers.LowRankConv) for n in basis_layers(masked))
    assert not any(ly.depthwise for ly in model.layers() if ly.name in basis_layers(masked))


TINY_OPTIONS = {
    "slimming": {"epochs": 1, "batch_size": 16},
    "taylor": {"batches": 2, "batch_size": 16},
    "dnal": {"arch_epochs": 1, "batch_size": 16, "search_steps": 2},
    "dap": {"steps": 6, "batch_size": 16, "resample_every": 3},
    "basis_scaling": {"rounds": 2, "steps_per_round": 2},
    "channel_scaling": {"rounds": 2, "steps_per_round": 2},
    "double_pruning": {"channel_scaling": {"rounds": 2, "steps_per_round": 2},
                       "basis_scaling": {"rounds": 2, "steps_per_round": 2}},
}


#: A one-epoch pretraining recipe for the methods that train a network anew (scratch).
RECIPE = {"epochs": 1, "batch_size": 16, "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "patience": 1,
          "threads": 1}


def _split(n: int, seed: int) -> Split:
    gen = torch.Generator().manual_seed(seed)
    return Split(x=torch.randn((n, C_IN, SIZE, SIZE), generator=gen), y=torch.randint(0, N_CLS, (n,), generator=gen))


@pytest.mark.parametrize("name", ["vgg16_bn", "resnet20", "mobilenetv2"])  # resnet56: same code as resnet20
@pytest.mark.parametrize("method_name", available())
def test_every_method_prunes_every_backbone(name, method_name):
    """Each registered method on each backbone: a smaller network for a pruning budget, the saved
    (physical) network equal to the method's masked form, forward and backward on it."""
    method = get_method(method_name)
    model = _randomise_all(_reduced(name), 5)
    dense_params = metrics.cost(model, "params")
    opts = TINY_OPTIONS.get(method_name, {})
    if method.side == "target":
        model.reset_classifier(N_CLS, torch.Generator().manual_seed(0))
        support = _split(8, 3)
        res = method.adapt(AdaptContext(model=model, budget=0.5, metric="params", support_x=support.x,
                                        support_y=support.y, seed=4, dense_cost=metrics.cost(model, "params"),
                                        options=opts, log=lambda _m: None))
    else:
        res = method.search(SearchContext(model=model, budget=0.5, metric="params", source_train=_split(32, 1),
                                          source_val=_split(8, 2), seed=7, options=opts, log=lambda _m: None,
                                          recipe=RECIPE))
    physical = res.model.eval()
    achieved = metrics.cost(physical, "params") / dense_params
    if method.budget_free:
        assert achieved == 1.0
    elif method_name == "dnal":  # a lambda search, not a count: it may land off the budget, never at dense
        assert achieved < 1.0
    else:
        assert achieved <= 0.5 + 1e-9
    masked = (res.masked if res.masked is not None else model).eval()
    with torch.no_grad():
        if res.keep is None:
            ref = masked(X)
        else:
            with surgery.channel_masks(masked, surgery.keep_to_masks(masked, res.keep)):
                ref = masked(X)
        assert (physical(X) - ref).abs().max().item() < 1e-4
    physical.train()
    F.cross_entropy(physical(X), torch.arange(len(X)) % N_CLS).backward()
    assert all(p.grad is not None for p in physical.parameters())


@pytest.mark.parametrize(("backbone", "key"), [({"name": "resnet20", "widths": [4, 8]}, "backbone.widths"),
                                               ({"name": "small_cnn", "width_mult": 0.5}, "backbone.width_mult")])
def test_config_rejects_options_of_another_backbone_family(tmp_path, backbone, key):
    import yaml

    from pruneshot.config import ConfigError, load_config

    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "config/config.yaml").read_text())
    cfg["backbone"] = backbone
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(path)


def test_configured_backbone_builds_from_the_source_shape():
    spec = models.backbone_spec({"name": "resnet20", "width_mult": 0.5}, 1, 28, 10)
    assert spec["widths"]["stage1"] == 8 and spec["in_channels"] == 1
    assert models.build_model(spec)(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert models.backbone_spec({"name": "small_cnn"}, 1, 8, 5)["widths"] == [32, 64, 128]
    with pytest.raises(ValueError, match="unknown backbone"):
        models.backbone_spec({"name": "resnet18"}, 3, 32, 10)
