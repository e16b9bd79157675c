"""Backbones, built from a JSON architecture spec (no pickled modules anywhere).

A spec is a plain dict, e.g. ``{"name": "small_cnn", "in_channels": 1, "input_size": 8,
"widths": [32, 64, 128], "num_classes": 5}``. A physically pruned network is the
same backbone with a spec of smaller widths and, after basis pruning, an optional
``"ranks"`` list (one int or null per block; a block with rank r is a ``LowRankConv``).
Each backbone names its channel groups (units that are kept or removed together),
knows how to slice itself, where each group is consumed, and its cost from the spec alone.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

BACKBONES: dict[str, type] = {}


def register_backbone(name: str) -> Callable:
    """Class decorator adding a backbone class to the registry under ``name``."""

    def wrap(cls: type) -> type:
        BACKBONES[name] = cls
        return cls

    return wrap


def _backbone_class(name: Any) -> type:
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; allowed: {', '.join(BACKBONES)}") from None


def build_model(spec: dict[str, Any]) -> nn.Module:
    """Instantiate the backbone described by ``spec``."""
    return _backbone_class(spec.get("name")).from_spec(spec)


def backbone_spec(backbone: dict[str, Any], in_channels: int, input_size: int, num_classes: int) -> dict[str, Any]:
    """The architecture spec of the configured ``backbone`` section (``name`` plus its options) for
    inputs (in_channels, input_size, input_size) and ``num_classes`` outputs."""
    options = {k: v for k, v in backbone.items() if k != "name"}
    return _backbone_class(backbone["name"]).default_spec(options, in_channels, input_size, num_classes)


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class LowRankConv(nn.Module):
    """A k x k conv factored through ``rank`` channels: ``basis`` (k x k conv C_in -> rank, no bias,
    the original stride/padding/dilation) then ``coef`` (1x1 conv rank -> C_out, bias only if the
    original conv had one). A physically basis-pruned conv; its output channels are ``coef``'s,
    its input channels ``basis``'s."""

    def __init__(self, c_in: int, c_out: int, rank: int, kernel_size: int | tuple[int, int] = 3,
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 1,
                 dilation: int | tuple[int, int] = 1, bias: bool = False) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LowRankConv: rank must be >= 1, got {rank}")
        self.basis = nn.Conv2d(c_in, rank, kernel_size, stride=stride, padding=padding, dilation=dilation,
                               bias=False)
        self.coef = nn.Conv2d(rank, c_out, 1, bias=bias)

    @property
    def in_channels(self) -> int:
        return self.basis.in_channels

    @property
    def out_channels(self) -> int:
        return self.coef.out_channels

    @property
    def rank(self) -> int:
        return self.basis.out_channels

    @property
    def input_conv(self) -> nn.Conv2d:
        """The module whose input channels are this layer's input channels."""
        return self.basis

    @property
    def output_conv(self) -> nn.Conv2d:
        """The module whose output channels are this layer's output channels."""
        return self.coef

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.coef(self.basis(x))


def conv_cost(c_in: int, c_out: int, kernel: int | tuple[int, int], rank: int | None, out_hw: int,
              metric: str, bias: bool = False, groups: int = 1) -> int:
    """Params or FLOPs (torch.utils.flop_counter convention: 2 per multiply-add, bias adds not
    counted) of one k x k conv producing ``out_hw`` output pixels: dense when ``rank`` is None,
    else the ``LowRankConv`` of that rank (both of its convs run at the output resolution);
    ``groups`` > 1 is a grouped (depthwise: groups = C_in = C_out) dense conv."""
    kh, kw = _pair(kernel)
    if rank is not None and groups != 1:
        raise ValueError("conv_cost: a grouped conv has no low-rank form")
    macs_per_px = c_out * (c_in // groups) * kh * kw if rank is None else rank * (c_in * kh * kw + c_out)
    if metric == "params":
        return macs_per_px + (c_out if bias else 0)
    if metric == "flops":
        return 2 * macs_per_px * out_hw
    raise ValueError(f"unknown budget metric {metric!r}; allowed: params, flops")


def lowrank_pays(c_in: int, c_out: int, kernel: int | tuple[int, int], rank: int) -> bool:
    """True when a rank-``rank`` LowRankConv is strictly smaller (params, and so FLOPs) than the dense
    conv: rank < k^2 C_in C_out / (k^2 C_in + C_out)."""
    kh, kw = _pair(kernel)
    return rank * (kh * kw * c_in + c_out) < kh * kw * c_in * c_out


@dataclass(frozen=True)
class Layer:
    """One conv of a backbone, described from the spec alone.

    ``conv``/``bn``/``mask`` are module paths (``get_submodule``); ``in_group`` is the channel group
    the conv reads (None: the network input), ``out_group`` the group its output channels belong to.
    A depthwise conv (``depthwise``) has one filter per channel of its input group, which is also its
    output group: it follows its input channels and is never a consumer or a basis-scaling layer.
    ``out_hw`` is the number of output pixels; ``rank`` is set when the conv is a ``LowRankConv``."""

    name: str
    conv: str
    bn: str | None
    mask: str
    in_group: str | None
    out_group: str
    c_in: int
    c_out: int
    kernel: int
    stride: int
    padding: int
    out_hw: int
    depthwise: bool = False
    rank: int | None = None

    def cost(self, metric: str, rank: int | None = None, *, dense: bool = False) -> int:
        """Params or FLOPs of this conv (with ``rank`` instead of its own unless ``dense``) and its BatchNorm."""
        r = None if dense else (self.rank if rank is None else rank)
        total = conv_cost(self.c_in, self.c_out, self.kernel, r, self.out_hw, metric,
                          groups=self.c_out if self.depthwise else 1)
        if metric == "params" and self.bn is not None:
            total += 2 * self.c_out
        return total


def make_conv(layer: Layer) -> nn.Module:
    """The module of a layer: a plain, depthwise or low-rank conv (no bias) of its shapes."""
    if layer.depthwise:
        return nn.Conv2d(layer.c_in, layer.c_out, layer.kernel, stride=layer.stride, padding=layer.padding,
                         groups=layer.c_out, bias=False)
    if layer.rank is not None:
        return LowRankConv(layer.c_in, layer.c_out, layer.rank, layer.kernel, stride=layer.stride,
                           padding=layer.padding, bias=False)
    return nn.Conv2d(layer.c_in, layer.c_out, layer.kernel, stride=layer.stride, padding=layer.padding, bias=False)


def conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    """Output side length of a conv (dilation 1)."""
    return (size + 2 * padding - kernel) // stride + 1


def _check_rank(r: Any, where: str) -> None:
    if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 1):
        raise ValueError(f"{where}: each rank must be null or an int >= 1, got {r!r}")


def input_conv(conv: nn.Module) -> nn.Module:
    """The module whose input channels are ``conv``'s input channels (``conv`` itself for a plain conv,
    the basis conv of a ``LowRankConv`` or of a basis-scaling layer)."""
    return getattr(conv, "input_conv", conv)


def output_conv(conv: nn.Module) -> nn.Module:
    """The module whose output channels are ``conv``'s output channels (for magnitude criteria)."""
    return getattr(conv, "output_conv", conv)


class Backbone(nn.Module):
    """Base of every backbone: a network described by its spec's layer table (``layer_table``).

    Subclasses build their modules from the table (``make_conv``), and define ``layer_table(spec)``,
    ``head_group(spec)`` (the group the classifier reads), ``with_widths(spec, widths)``,
    ``with_ranks(spec, ranks)``, ``default_spec(options, ...)`` and ``forward_features``. Everything
    pruning needs is derived here from the table: channel groups (channels kept or removed together:
    residual additions tie every conv writing to the same stream into one group, a depthwise conv
    follows its input group), their producers, BatchNorms, mask points and consumers, physical
    slicing and costs from shapes alone."""

    spec: dict[str, Any]
    classifier: nn.Linear

    # --- per backbone -----------------------------------------------------
    @classmethod
    def layer_table(cls, spec: dict[str, Any]) -> list[Layer]:
        raise NotImplementedError

    @classmethod
    def head_group(cls, spec: dict[str, Any]) -> str:
        raise NotImplementedError

    @classmethod
    def with_widths(cls, spec: dict[str, Any], widths: dict[str, int]) -> dict[str, Any]:
        """``spec`` with the named groups' widths replaced (dict-of-groups specs)."""
        out = copy.deepcopy(spec)
        unknown = sorted(set(widths) - set(out["widths"]))
        if unknown:
            raise ValueError(f"{spec['name']}: unknown channel group(s) {unknown}")
        out["widths"].update({g: int(w) for g, w in widths.items()})
        return out

    @classmethod
    def with_ranks(cls, spec: dict[str, Any], ranks: dict[str, int | None]) -> dict[str, Any]:
        """``spec`` with the named layers' ranks replaced (None: plain conv); others keep theirs."""
        out = copy.deepcopy(spec)
        names = [ly.name for ly in cls.layer_table(out) if not ly.depthwise]
        unknown = sorted(set(ranks) - set(names))
        if unknown:
            raise ValueError(f"{spec['name']}: unknown or depthwise layer(s) {unknown}")
        new = dict(out.pop("ranks", None) or {})
        for name, r in ranks.items():
            _check_rank(r, spec["name"])
            if r is None:
                new.pop(name, None)
            else:
                new[name] = int(r)
        if new:
            out["ranks"] = {n: new[n] for n in names if n in new}
        return out

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> Backbone:
        raise NotImplementedError

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))

    # --- derived ----------------------------------------------------------
    @classmethod
    def spec_cost(cls, spec: dict[str, Any], metric: str) -> int:
        """Params or FLOPs of the network ``spec`` describes, from shapes alone (no network is built);
        equals ``metrics.cost(build_model(spec), metric)``."""
        if metric not in ("params", "flops"):
            raise ValueError(f"unknown budget metric {metric!r}; allowed: params, flops")
        total = sum(ly.cost(metric) for ly in cls.layer_table(spec))
        c, n = cls.group_sizes(spec)[cls.head_group(spec)], spec["num_classes"]
        return total + (c * n + n if metric == "params" else 2 * c * n)

    @classmethod
    def group_sizes(cls, spec: dict[str, Any]) -> dict[str, int]:
        """Every channel group's width, in order of first appearance."""
        out: dict[str, int] = {}
        for ly in cls.layer_table(spec):
            if out.setdefault(ly.out_group, ly.c_out) != ly.c_out:
                raise ValueError(f"{spec['name']}: group {ly.out_group!r} has inconsistent widths")
        return out

    def layers(self) -> list[Layer]:
        """The layer table of this network's spec."""
        return self.layer_table(self.spec)

    def layer(self, name: str) -> Layer:
        for ly in self.layers():
            if ly.name == name:
                return ly
        raise KeyError(f"{self.spec['name']}: no layer {name!r}")

    def get_conv(self, name: str) -> nn.Module:
        return self.get_submodule(self.layer(name).conv)

    def set_conv(self, name: str, module: nn.Module) -> None:
        """Replace the conv slot of layer ``name`` (e.g. by a basis-scaling layer)."""
        parent, _, attr = self.layer(name).conv.rpartition(".")
        setattr(self.get_submodule(parent) if parent else self, attr, module)

    def layer_geometry(self) -> dict[str, Layer]:
        """Layers by name (shapes, kernel, output pixels)."""
        return {ly.name: ly for ly in self.layers()}

    def channel_groups(self) -> dict[str, int]:
        """Prunable groups and their sizes."""
        return self.group_sizes(self.spec)

    def group_convs(self) -> dict[str, list[nn.Module]]:
        """Per group, the (output) convs of the layers that produce its channels, depthwise ones
        excepted (for magnitude criteria; a group tied by residual additions has several)."""
        out: dict[str, list[nn.Module]] = {g: [] for g in self.channel_groups()}
        for ly in self.layers():
            if not ly.depthwise:
                out[ly.out_group].append(output_conv(self.get_submodule(ly.conv)))
        return out

    def group_bns(self) -> dict[str, list[nn.BatchNorm2d]]:
        """Per group, the BatchNorm of every layer writing its channels (depthwise ones included)."""
        out: dict[str, list[nn.BatchNorm2d]] = {g: [] for g in self.channel_groups()}
        for ly in self.layers():
            if ly.bn is not None:
                out[ly.out_group].append(self.get_submodule(ly.bn))
        return out

    def mask_points(self) -> dict[str, list[nn.Module]]:
        """Modules whose output carries each group's channels; zeroing a channel at every one of its
        group's points == removing it (each is a BatchNorm or an activation after it)."""
        out: dict[str, list[nn.Module]] = {g: [] for g in self.channel_groups()}
        for ly in self.layers():
            out[ly.out_group].append(self.get_submodule(ly.mask))
        return out

    def group_consumers(self) -> dict[str, list[nn.Module]]:
        """Per group, every module whose input channels are the group's channels: the (basis) conv of
        each non-depthwise layer reading it, and the classifier for the head group. Scaling input
        channel c of all of them (``weight[:, c] *= s``) equals scaling the group's channel c where
        it is read (a depthwise conv is not a consumer: its output is still the group)."""
        out: dict[str, list[nn.Module]] = {g: [] for g in self.channel_groups()}
        for ly in self.layers():
            if ly.in_group is not None and not ly.depthwise:
                out[ly.in_group].append(input_conv(self.get_submodule(ly.conv)))
        out[self.head_group(self.spec)].append(self.classifier)
        return out

    def spec_with_widths(self, widths: dict[str, int]) -> dict[str, Any]:
        """Spec of this backbone with each named group's width replaced."""
        return self.with_widths(self.spec, widths)

    def spec_with_ranks(self, ranks: dict[str, int | None]) -> dict[str, Any]:
        """Spec of this backbone with the named layers' ranks replaced (None: plain conv)."""
        return self.with_ranks(self.spec, ranks)

    def pruned(self, keep: dict[str, torch.Tensor]) -> Backbone:
        """Physically pruned copy keeping channel indices ``keep[group]`` (any order; groups not named
        keep all). Low-rank layers keep their rank: outputs slice ``coef``, inputs ``basis``;
        depthwise layers keep the filters of their kept channels."""
        from pruneshot.surgery import slice_block_conv, slice_bn, slice_linear_in

        groups = self.channel_groups()
        unknown = sorted(set(keep) - set(groups))
        if unknown:
            raise ValueError(f"unknown channel group(s) {unknown}; this network has {sorted(groups)}")
        keep = {g: torch.as_tensor(sorted(set(map(int, idx))), dtype=torch.long) for g, idx in keep.items()}
        for g, idx in keep.items():
            if len(idx) == 0:
                raise ValueError(f"group {g!r} would keep no channel; keep at least one")
            if idx.min() < 0 or idx.max() >= groups[g]:
                raise ValueError(f"group {g!r}: channel indices must be in [0, {groups[g]})")
        full = {g: keep.get(g, torch.arange(n)) for g, n in groups.items()}
        new = build_model(self.spec_with_widths({g: len(i) for g, i in full.items()}))
        for ly in self.layers():
            in_idx = None if ly.in_group is None else full[ly.in_group]
            slice_block_conv(self.get_submodule(ly.conv), new.get_submodule(ly.conv), full[ly.out_group], in_idx)
            if ly.bn is not None:
                slice_bn(self.get_submodule(ly.bn), new.get_submodule(ly.bn), full[ly.out_group])
        slice_linear_in(self.classifier, new.classifier, full[self.head_group(self.spec)])
        return new

    def reset_classifier(self, num_classes: int, generator: torch.Generator | None = None) -> None:
        """Replace the head with a fresh ``num_classes``-way linear layer (seeded by ``generator``)."""
        head = nn.Linear(self.classifier.in_features, num_classes)
        bound = 1.0 / head.in_features**0.5
        with torch.no_grad():
            head.weight.uniform_(-bound, bound, generator=generator)
            head.bias.uniform_(-bound, bound, generator=generator)
        self.classifier = head
        self.spec["num_classes"] = int(num_classes)


def spec_cost(spec: dict[str, Any], metric: str) -> int:
    """Params or FLOPs of the network ``spec`` describes, without building it."""
    try:
        cls = BACKBONES[spec["name"]]
    except KeyError:
        raise ValueError(f"unknown backbone {spec.get('name')!r}; allowed: {', '.join(BACKBONES)}") from None
    return cls.spec_cost(spec, metric)


class ConvBNReLU(nn.Sequential):
    """3x3 conv (no bias) -> BatchNorm -> ReLU; channel masks act on the ReLU output.
    With ``rank`` set, the conv is a ``LowRankConv`` of that rank (same state-dict slot ``0``)."""

    def __init__(self, c_in: int, c_out: int, rank: int | None = None) -> None:
        conv = (nn.Conv2d(c_in, c_out, 3, padding=1, bias=False) if rank is None
                else LowRankConv(c_in, c_out, rank, 3, padding=1, bias=False))
        super().__init__(conv, nn.BatchNorm2d(c_out), nn.ReLU(inplace=False))


@register_backbone("small_cnn")
class SmallCNN(Backbone):
    """Conv-BN-ReLU blocks, 2x2 max-pool after each block while the map is >= 2 px,
    global average pool, linear classifier. Input (N, in_channels, S, S) -> logits (N, num_classes).

    Spec keys: ``in_channels``, ``input_size``, ``widths`` (output channels per block),
    ``num_classes`` and, optionally, ``ranks`` (same length as ``widths``; per block an int r, the
    block's 3x3 conv being a ``LowRankConv`` of rank r, or null for a plain conv). A spec without
    ``ranks`` (or with only nulls, which is normalised away) builds plain convs with the same
    state-dict keys as always. Channel group and layer ``block{i}`` is block i's conv and output
    channels; its consumer is block i+1's (basis) conv or, for the last block, the classifier."""

    def __init__(self, in_channels: int, input_size: int, widths: list[int], num_classes: int,
                 ranks: list[int | None] | None = None) -> None:
        super().__init__()
        if ranks is not None:
            if len(ranks) != len(widths):
                raise ValueError(f"small_cnn: 'ranks' has {len(ranks)} entries for {len(widths)} widths")
            for r in ranks:
                _check_rank(r, "small_cnn")
            if all(r is None for r in ranks):
                ranks = None
        self.spec = {
            "name": "small_cnn",
            "in_channels": int(in_channels),
            "input_size": int(input_size),
            "widths": [int(w) for w in widths],
            "num_classes": int(num_classes),
        }
        if ranks is not None:
            self.spec["ranks"] = [None if r is None else int(r) for r in ranks]
        layers: list[nn.Module] = []
        c_in, size = in_channels, input_size
        for i, w in enumerate(widths):
            layers.append(ConvBNReLU(c_in, w, None if ranks is None else ranks[i]))
            if size >= 2:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            c_in = w
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_in, num_classes)

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> SmallCNN:
        return cls(spec["in_channels"], spec["input_size"], spec["widths"], spec["num_classes"], spec.get("ranks"))

    @classmethod
    def default_spec(cls, options: dict[str, Any], in_channels: int, input_size: int,
                     num_classes: int) -> dict[str, Any]:
        """Spec from the config's backbone section (``widths``)."""
        return {"name": "small_cnn", "in_channels": int(in_channels), "input_size": int(input_size),
                "widths": [int(w) for w in options.get("widths", [32, 64, 128])], "num_classes": int(num_classes)}

    @classmethod
    def layer_table(cls, spec: dict[str, Any]) -> list[Layer]:
        ranks = spec.get("ranks") or [None] * len(spec["widths"])
        out, size, c_in, idx = [], spec["input_size"], spec["in_channels"], 0
        for i, (w, r) in enumerate(zip(spec["widths"], ranks, strict=True)):
            out.append(Layer(f"block{i}", f"features.{idx}.0", f"features.{idx}.1", f"features.{idx}.2",
                             None if i == 0 else f"block{i - 1}", f"block{i}", c_in, w, 3, 1, 1, size * size,
                             rank=r))
            idx += 1
            if size >= 2:
                size //= 2
                idx += 1
            c_in = w
        return out

    @classmethod
    def head_group(cls, spec: dict[str, Any]) -> str:
        return f"block{len(spec['widths']) - 1}"

    @classmethod
    def with_widths(cls, spec: dict[str, Any], widths: dict[str, int]) -> dict[str, Any]:
        out = copy.deepcopy(spec)
        out["widths"] = [int(widths.get(f"block{i}", w)) for i, w in enumerate(out["widths"])]
        return out

    @classmethod
    def with_ranks(cls, spec: dict[str, Any], ranks: dict[str, int | None]) -> dict[str, Any]:
        out = copy.deepcopy(spec)
        old = out.pop("ranks", None) or [None] * len(out["widths"])
        new = [ranks.get(f"block{i}", r) for i, r in enumerate(old)]
        if any(r is not None for r in new):
            out["ranks"] = [None if r is None else int(r) for r in new]
        return out

    def block_geometry(self) -> list[dict[str, int]]:
        """Per block: input channels, output channels, kernel size and output pixels of its conv."""
        return [{"c_in": ly.c_in, "c_out": ly.c_out, "kernel": ly.kernel, "out_hw": ly.out_hw}
                for ly in self.layers()]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, S, S) -> pooled features (N, widths[-1])."""
        return torch.flatten(self.pool(self.features(x)), 1)

    def blocks(self) -> list[ConvBNReLU]:
        return [m for m in self.features if isinstance(m, ConvBNReLU)]


def state_dict_for_save(model: nn.Module) -> dict[str, torch.Tensor]:
    """Tensors to store in safetensors (buffers included, shared storage broken)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def load_model(weights_path: str, spec: dict[str, Any]) -> nn.Module:
    """Build the backbone from ``spec`` and load safetensors weights strictly."""
    from pruneshot.io import load_tensors

    model = build_model(spec)
    model.load_state_dict(load_tensors(weights_path), strict=True)
    return model


from pruneshot import cifar_backbones as _cifar_backbones  # noqa: E402,F401  (registers the CIFAR backbones)
