"""Backbones, built from a JSON architecture spec (no pickled modules anywhere).

A spec is a plain dict, e.g. ``{"name": "small_cnn", "in_channels": 1, "input_size": 8,
"widths": [32, 64, 128], "num_classes": 5}``. A physically pruned network is the
same backbone with a spec of smaller widths. Each backbone names its channel
groups (units that are kept or removed together) and knows how to slice itself.
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


class ConvBNReLU(nn.Sequential):
    """3x3 conv (no bias) -> BatchNorm -> ReLU; channel masks act on the ReLU output."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=False),
        )


@register_backbone("small_cnn")
class SmallCNN(nn.Module):
    """Conv-BN-ReLU blocks, 2x2 max-pool after each block while the map is >= 2 px,
    global average pool, linear classifier. Input (N, in_channels, S, S) -> logits (N, num_classes)."""

    def __init__(self, in_channels: int, input_size: int, widths: list[int], num_classes: int) -> None:
        super().__init__()
        self.spec = {
            "name": "small_cnn",
            "in_channels": int(in_channels),
            "input_size": int(input_size),
            "widths": [int(w) for w in widths],
            "num_classes": int(num_classes),
        }
        layers: list[nn.Module] = []
        c_in, size = in_channels, input_size
        for i, w in enumerate(widths):
            layers.append(ConvBNReLU(c_in, w))
            if size >= 2:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            c_in = w
            del i
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_in, num_classes)

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> SmallCNN:
        return cls(spec["in_channels"], spec["input_size"], spec["widths"], spec["num_classes"])

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
        """The convs whose output channels form each group (for magnitude criteria)."""
        return {f"block{i}": [b[0]] for i, b in enumerate(self.blocks())}

    def mask_points(self) -> dict[str, list[nn.Module]]:
        """Modules whose output carries each group's channels; masking there == removing them."""
        return {f"block{i}": [b[2]] for i, b in enumerate(self.blocks())}

    def spec_with_widths(self, widths: dict[str, int]) -> dict[str, Any]:
        """Spec of this backbone with each group's width replaced."""
        spec = copy.deepcopy(self.spec)
        spec["widths"] = [int(widths.get(f"block{i}", w)) for i, w in enumerate(spec["widths"])]
        return spec

    def pruned(self, keep: dict[str, torch.Tensor]) -> SmallCNN:
        """Physically pruned copy keeping channel indices ``keep[group]`` (sorted LongTensors)."""
        from pruneshot.surgery import slice_bn, slice_conv, slice_linear_in

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
            slice_conv(old_b[0], new_b[0], out_idx, prev)
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
