"""The small conv net of the digits/MNIST defaults."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from pruneshot.models.base import Backbone, register_backbone
from pruneshot.models.layers import Layer, LowRankConv, check_rank


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
                check_rank(r, "small_cnn")
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
