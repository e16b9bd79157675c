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
from typing import Any

import torch
from torch import nn

BACKBONES: dict[str, Callable[[dict[str, Any]], nn.Module]] = {}


def register_backbone(name: str) -> Callable:
    """Class decorator adding a backbone to the registry under ``name``."""

    def wrap(cls: type) -> type:
        BACKBONES[name] = cls.from_spec
        return cls

    return wrap


def build_model(spec: dict[str, Any]) -> nn.Module:
    """Instantiate the backbone described by ``spec``."""
    try:
        factory = BACKBONES[spec["name"]]
    except KeyError:
        raise ValueError(f"unknown backbone {spec.get('name')!r}; allowed: {', '.join(BACKBONES)}") from None
    return factory(spec)


def backbone_spec(backbone: dict[str, Any], in_channels: int, input_size: int, num_classes: int) -> dict[str, Any]:
    """The architecture spec of the configured ``backbone`` section (``name`` plus its options) for
    inputs (in_channels, input_size, input_size) and ``num_classes`` outputs."""
    name = backbone["name"]
    if name == "small_cnn":
        return {"name": name, "in_channels": int(in_channels), "input_size": int(input_size),
                "widths": [int(w) for w in backbone["widths"]], "num_classes": int(num_classes)}
    raise ValueError(f"unknown backbone {name!r}; allowed: {', '.join(BACKBONES)}")


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
              metric: str, bias: bool = False) -> int:
    """Params or FLOPs (torch.utils.flop_counter convention: 2 per multiply-add, bias adds not
    counted) of one k x k conv producing ``out_hw`` output pixels: dense when ``rank`` is None,
    else the ``LowRankConv`` of that rank (both of its convs run at the output resolution)."""
    kh, kw = _pair(kernel)
    macs_per_px = c_out * c_in * kh * kw if rank is None else rank * (c_in * kh * kw + c_out)
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


class ConvBNReLU(nn.Sequential):
    """3x3 conv (no bias) -> BatchNorm -> ReLU; channel masks act on the ReLU output.
    With ``rank`` set, the conv is a ``LowRankConv`` of that rank (same state-dict slot ``0``)."""

    def __init__(self, c_in: int, c_out: int, rank: int | None = None) -> None:
        conv = (nn.Conv2d(c_in, c_out, 3, padding=1, bias=False) if rank is None
                else LowRankConv(c_in, c_out, rank, 3, padding=1, bias=False))
        super().__init__(conv, nn.BatchNorm2d(c_out), nn.ReLU(inplace=False))


def input_conv(conv: nn.Module) -> nn.Module:
    """The module whose input channels are ``conv``'s input channels (``conv`` itself for a plain conv,
    the basis conv of a ``LowRankConv`` or of a basis-scaling layer)."""
    return getattr(conv, "input_conv", conv)


def output_conv(conv: nn.Module) -> nn.Module:
    """The module whose output channels are ``conv``'s output channels (for magnitude criteria)."""
    return getattr(conv, "output_conv", conv)


@register_backbone("small_cnn")
class SmallCNN(nn.Module):
    """Conv-BN-ReLU blocks, 2x2 max-pool after each block while the map is >= 2 px,
    global average pool, linear classifier. Input (N, in_channels, S, S) -> logits (N, num_classes).

    Spec keys: ``in_channels``, ``input_size``, ``widths`` (output channels per block),
    ``num_classes`` and, optionally, ``ranks`` (same length as ``widths``; per block an int r, the
    block's 3x3 conv being a ``LowRankConv`` of rank r, or null for a plain conv). A spec without
    ``ranks`` (or with only nulls, which is normalised away) builds plain convs with the same
    state-dict keys as always. Channel group ``block{i}`` is block i's output channels; its
    consumer is block i+1's (basis) conv or, for the last block, the classifier."""

    def __init__(self, in_channels: int, input_size: int, widths: list[int], num_classes: int,
                 ranks: list[int | None] | None = None) -> None:
        super().__init__()
        if ranks is not None:
            if len(ranks) != len(widths):
                raise ValueError(f"small_cnn: 'ranks' has {len(ranks)} entries for {len(widths)} widths")
            for r in ranks:
                if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 1):
                    raise ValueError(f"small_cnn: each rank must be null or an int >= 1, got {r!r}")
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

    @staticmethod
    def spec_cost(spec: dict[str, Any], metric: str) -> int:
        """Params or FLOPs of the network ``spec`` describes, from shapes alone (no network is built);
        equals ``metrics.cost(build_model(spec), metric)``."""
        widths, n_cls = spec["widths"], spec["num_classes"]
        ranks = spec.get("ranks") or [None] * len(widths)
        total = 0
        c_in, size = spec["in_channels"], spec["input_size"]
        for w, r in zip(widths, ranks, strict=True):
            total += conv_cost(c_in, w, 3, r, size * size, metric)
            if metric == "params":
                total += 2 * w  # BatchNorm weight and bias
            if size >= 2:
                size //= 2
            c_in = w
        total += c_in * n_cls + n_cls if metric == "params" else 2 * c_in * n_cls
        return total

    def block_geometry(self) -> list[dict[str, int]]:
        """Per block: input channels, output channels, kernel size and output pixels of its conv."""
        out, size, c_in = [], self.spec["input_size"], self.spec["in_channels"]
        for w in self.spec["widths"]:
            out.append({"c_in": c_in, "c_out": w, "kernel": 3, "out_hw": size * size})
            if size >= 2:
                size //= 2
            c_in = w
        return out

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, S, S) -> pooled features (N, widths[-1])."""
        return torch.flatten(self.pool(self.features(x)), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))

    def blocks(self) -> list[ConvBNReLU]:
        return [m for m in self.features if isinstance(m, ConvBNReLU)]

    # --- channel groups -------------------------------------------------
    def channel_groups(self) -> dict[str, int]:
        """Prunable groups and their sizes: one group per block (its output channels)."""
        return {f"block{i}": b[0].out_channels for i, b in enumerate(self.blocks())}

    def group_convs(self) -> dict[str, list[nn.Conv2d]]:
        """The convs whose output channels form each group (for magnitude criteria); for a
        low-rank block that is its ``coef`` conv."""
        return {f"block{i}": [output_conv(b[0])] for i, b in enumerate(self.blocks())}

    def group_consumers(self) -> dict[str, nn.Module]:
        """The module whose input channels are each group's channels: the next block's conv (its
        ``basis`` conv when low-rank) or, for the last group, the classifier. Scaling input channel c
        of the consumer (``weight[:, c] *= scale``) equals scaling the group's channel c after its
        activation and pooling."""
        blocks = self.blocks()
        out: dict[str, nn.Module] = {}
        for i in range(len(blocks)):
            out[f"block{i}"] = input_conv(blocks[i + 1][0]) if i + 1 < len(blocks) else self.classifier
        return out

    def mask_points(self) -> dict[str, list[nn.Module]]:
        """Modules whose output carries each group's channels; masking there == removing them."""
        return {f"block{i}": [b[2]] for i, b in enumerate(self.blocks())}

    def spec_with_widths(self, widths: dict[str, int]) -> dict[str, Any]:
        """Spec of this backbone with each group's width replaced."""
        spec = copy.deepcopy(self.spec)
        spec["widths"] = [int(widths.get(f"block{i}", w)) for i, w in enumerate(spec["widths"])]
        return spec

    def spec_with_ranks(self, ranks: dict[str, int | None]) -> dict[str, Any]:
        """Spec of this backbone with block ranks replaced (None: plain conv); blocks not named keep theirs."""
        spec = copy.deepcopy(self.spec)
        old = spec.pop("ranks", None) or [None] * len(spec["widths"])
        new = [ranks.get(f"block{i}", r) for i, r in enumerate(old)]
        if any(r is not None for r in new):
            spec["ranks"] = [None if r is None else int(r) for r in new]
        return spec

    def pruned(self, keep: dict[str, torch.Tensor]) -> SmallCNN:
        """Physically pruned copy keeping channel indices ``keep[group]`` (sorted LongTensors).
        Low-rank blocks keep their rank: output channels slice ``coef``, input channels ``basis``."""
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
        new = SmallCNN.from_spec(self.spec_with_widths({g: len(i) for g, i in full.items()}))
        prev = None
        for i, (old_b, new_b) in enumerate(zip(self.blocks(), new.blocks(), strict=True)):
            out_idx = full[f"block{i}"]
            slice_block_conv(old_b[0], new_b[0], out_idx, prev)
            slice_bn(old_b[1], new_b[1], out_idx)
            prev = out_idx
        slice_linear_in(self.classifier, new.classifier, prev)
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


def state_dict_for_save(model: nn.Module) -> dict[str, torch.Tensor]:
    """Tensors to store in safetensors (buffers included, shared storage broken)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def load_model(weights_path: str, spec: dict[str, Any]) -> nn.Module:
    """Build the backbone from ``spec`` and load safetensors weights strictly."""
    from pruneshot.io import load_tensors

    model = build_model(spec)
    model.load_state_dict(load_tensors(weights_path), strict=True)
    return model
