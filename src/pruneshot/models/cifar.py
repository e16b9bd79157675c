"""CIFAR-style backbones written in the package (torchvision is not used): ``vgg16_bn``,
``resnet20``, ``resnet56`` and ``mobilenetv2``, each built from a JSON spec whose ``widths`` map
every channel group to its width (and optional ``ranks`` map layers to a low-rank rank).

Channel groups (see ``models.Backbone``):
- VGG: one group per conv (``conv0`` ... ``conv12``).
- ResNet (He et al. 2016, CIFAR: 3 stages of n basic blocks, 16/32/64 channels, depth 6n+2): each
  stage's residual stream is one group (``stage1``..``stage3``: the stem, every block's second conv and
  the stage's projection shortcut write to it, so they are pruned together) and each block's inner
  channels are one group (``s{stage}b{block}``). Where the shape changes the shortcut is a 1x1
  conv + BatchNorm (option B; the paper's CIFAR nets pad with zeros, option A, which cannot be
  pruned channel-wise without changing the function).
- MobileNetV2 (Sandler et al. 2018, CIFAR variant: stride 1 in the stem and the second stage):
  ``stem``, each stage's output stream ``stage{k}`` (tied by the stride-1 residuals inside the stage),
  each block's expanded channels ``b{i}_hidden`` (its expand 1x1 conv and its depthwise conv, which
  follows its input channels) and the last 1x1 conv ``head``. A block without expansion (t = 1) has
  no hidden group: its depthwise conv belongs to its input group.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pruneshot.models.base import Backbone, register_backbone
from pruneshot.models.layers import Layer, check_rank, conv_out, make_conv


def _scaled(c: int, mult: float) -> int:
    return max(1, round(c * mult))


def _ranks(spec: dict[str, Any]) -> dict[str, int]:
    ranks = spec.get("ranks") or {}
    if not isinstance(ranks, dict):
        raise ValueError(f"{spec['name']}: 'ranks' must map layer names to ints")
    for r in ranks.values():
        check_rank(r, spec["name"])
    return ranks


def _checked(spec: dict[str, Any], table: list[Layer]) -> list[Layer]:
    """Validate the spec's ranks against the table's layers."""
    names = {ly.name for ly in table if not ly.depthwise}
    unknown = sorted(set(_ranks(spec)) - names)
    if unknown:
        raise ValueError(f"{spec['name']}: ranks name unknown or depthwise layer(s) {unknown}")
    return table


def _width(spec: dict[str, Any], group: str) -> int:
    try:
        w = spec["widths"][group]
    except KeyError:
        raise ValueError(f"{spec['name']}: spec 'widths' lacks group {group!r}") from None
    if isinstance(w, bool) or not isinstance(w, int) or w < 1:
        raise ValueError(f"{spec['name']}: width of {group!r} must be an int >= 1, got {w!r}")
    return w


def _conv_bn(layer: Layer, act: nn.Module | None) -> nn.Sequential:
    mods = [make_conv(layer), nn.BatchNorm2d(layer.c_out)]
    if act is not None:
        mods.append(act)
    return nn.Sequential(*mods)


class _DictSpecBackbone(Backbone):
    """Shared construction for the dict-of-groups specs below."""

    def _init_spec(self, spec: dict[str, Any]) -> None:
        unknown = sorted(set(spec["widths"]) - set(self.group_sizes_unchecked(spec)))
        if unknown:
            raise ValueError(f"{spec['name']}: spec 'widths' names unknown group(s) {unknown}")
        self.spec = {"name": spec["name"], "in_channels": int(spec["in_channels"]),
                     "input_size": int(spec["input_size"]),
                     "widths": {g: int(w) for g, w in spec["widths"].items()},
                     "num_classes": int(spec["num_classes"])}
        if spec.get("ranks"):
            self.spec["ranks"] = {k: int(v) for k, v in spec["ranks"].items()}

    @classmethod
    def group_sizes_unchecked(cls, spec: dict[str, Any]) -> dict[str, int]:
        return {ly.out_group: ly.c_out for ly in cls.layer_table(spec)}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> Backbone:
        return cls(spec)


# --- VGG ---------------------------------------------------------------------------------------

VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


@register_backbone("vgg16_bn")
class VGG16BN(_DictSpecBackbone):
    """VGG-16 with BatchNorm, CIFAR variant: 13 conv-BN-ReLU (3x3), 2x2 max-pool after convs 2, 4,
    7, 10, 13 while the map is >= 2 px, global average pool, one linear classifier."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        self._init_spec(spec)
        table = self.layer_table(self.spec)
        mods: list[nn.Module] = []
        pools = self._pools(self.spec["input_size"])
        for i, ly in enumerate(table):
            mods.append(_conv_bn(ly, nn.ReLU()))
            if pools[i]:
                mods.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*mods)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(table[-1].c_out, self.spec["num_classes"])

    @staticmethod
    def _pools(size: int) -> list[bool]:
        out, i = [], -1
        after = set()
        for c in VGG16:
            if c == "M":
                after.add(i)
            else:
                i += 1
        for j in range(i + 1):
            pool = j in after and size >= 2
            out.append(pool)
            if pool:
                size //= 2
        return out

    @classmethod
    def default_spec(cls, options: dict[str, Any], in_channels: int, input_size: int,
                     num_classes: int) -> dict[str, Any]:
        mult = float(options.get("width_mult", 1.0))
        convs = [c for c in VGG16 if c != "M"]
        return {"name": "vgg16_bn", "in_channels": int(in_channels), "input_size": int(input_size),
                "widths": {f"conv{i}": _scaled(c, mult) for i, c in enumerate(convs)}, "num_classes": int(num_classes)}

    @classmethod
    def layer_table(cls, spec: dict[str, Any]) -> list[Layer]:
        ranks, pools = _ranks(spec), cls._pools(spec["input_size"])
        out, size, c_in, idx = [], spec["input_size"], spec["in_channels"], 0
        for i in range(len(pools)):
            g = f"conv{i}"
            w = _width(spec, g)
            out.append(Layer(g, f"features.{idx}.0", f"features.{idx}.1", f"features.{idx}.2",
                             None if i == 0 else f"conv{i - 1}", g, c_in, w, 3, 1, 1, size * size, rank=ranks.get(g)))
            idx += 1
            if pools[i]:
                size //= 2
                idx += 1
            c_in = w
        return _checked(spec, out)

    @classmethod
    def head_group(cls, spec: dict[str, Any]) -> str:
        return "conv12"

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, S, S) -> pooled features (N, width of conv12)."""
        return torch.flatten(self.pool(self.features(x)), 1)


# --- ResNet ------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the identity or a 1x1 conv-BN projection, then ReLU."""

    def __init__(self, conv1: Layer, conv2: Layer, shortcut: Layer | None) -> None:
        super().__init__()
        self.conv1, self.bn1 = make_conv(conv1), nn.BatchNorm2d(conv1.c_out)
        self.conv2, self.bn2 = make_conv(conv2), nn.BatchNorm2d(conv2.c_out)
        self.shortcut = None if shortcut is None else _conv_bn(shortcut, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class _CifarResNet(_DictSpecBackbone):
    """CIFAR ResNet of depth 6n + 2: 3x3 stem, three stages of n basic blocks (strides 1, 2, 2),
    global average pool, linear classifier."""

    depth: int = 0

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        self._init_spec(spec)
        table = {ly.name: ly for ly in self.layer_table(self.spec)}
        self.stem = _conv_bn(table["stem"], nn.ReLU())
        n = (self.depth - 2) // 6
        self.stages = nn.Sequential(*[
            nn.Sequential(*[BasicBlock(table[f"s{s}b{b}_conv1"], table[f"s{s}b{b}_conv2"],
                                       table.get(f"s{s}b{b}_shortcut")) for b in range(n)])
            for s in (1, 2, 3)])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(table["s3b0_conv2"].c_out, self.spec["num_classes"])

    @classmethod
    def default_spec(cls, options: dict[str, Any], in_channels: int, input_size: int,
                     num_classes: int) -> dict[str, Any]:
        mult = float(options.get("width_mult", 1.0))
        n = (cls.depth - 2) // 6
        widths: dict[str, int] = {}
        for s, base in zip((1, 2, 3), (16, 32, 64), strict=True):
            widths[f"stage{s}"] = _scaled(base, mult)
            for b in range(n):
                widths[f"s{s}b{b}"] = _scaled(base, mult)
        return {"name": f"resnet{cls.depth}", "in_channels": int(in_channels), "input_size": int(input_size),
                "widths": widths, "num_classes": int(num_classes)}

    @classmethod
    def layer_table(cls, spec: dict[str, Any]) -> list[Layer]:
        ranks, n = _ranks(spec), (cls.depth - 2) // 6
        size = spec["input_size"]
        w1 = _width(spec, "stage1")
        out = [Layer("stem", "stem.0", "stem.1", "stem.1", None, "stage1", spec["in_channels"], w1, 3, 1, 1,
                     size * size, rank=ranks.get("stem"))]
        in_group, c_in = "stage1", w1
        for s in (1, 2, 3):
            stream, ws = f"stage{s}", _width(spec, f"stage{s}")
            for b in range(n):
                st = (1 if s == 1 else 2) if b == 0 else 1
                o = conv_out(size, 3, st, 1)
                p, inner = f"stages.{s - 1}.{b}", f"s{s}b{b}"
                wi = _width(spec, inner)
                out.append(Layer(f"{inner}_conv1", f"{p}.conv1", f"{p}.bn1", f"{p}.bn1", in_group, inner, c_in, wi,
                                 3, st, 1, o * o, rank=ranks.get(f"{inner}_conv1")))
                out.append(Layer(f"{inner}_conv2", f"{p}.conv2", f"{p}.bn2", f"{p}.bn2", inner, stream, wi, ws,
                                 3, 1, 1, o * o, rank=ranks.get(f"{inner}_conv2")))
                if in_group != stream:
                    out.append(Layer(f"{inner}_shortcut", f"{p}.shortcut.0", f"{p}.shortcut.1", f"{p}.shortcut.1",
                                     in_group, stream, c_in, ws, 1, st, 0, o * o, rank=ranks.get(f"{inner}_shortcut")))
                in_group, c_in, size = stream, ws, o
        return _checked(spec, out)

    @classmethod
    def head_group(cls, spec: dict[str, Any]) -> str:
        return "stage3"

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, S, S) -> pooled features (N, width of stage3)."""
        return torch.flatten(self.pool(self.stages(self.stem(x))), 1)


@register_backbone("resnet20")
class ResNet20(_CifarResNet):
    depth = 20


@register_backbone("resnet56")
class ResNet56(_CifarResNet):
    depth = 56


# --- MobileNetV2 -------------------------------------------------------------------------------

# (expansion t, output channels c, blocks n, first stride s); CIFAR variant: strides 1 in stages 1-2.
MBV2 = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


class InvertedResidual(nn.Module):
    """[1x1 expand-BN-ReLU6] -> 3x3 depthwise-BN-ReLU6 -> 1x1 project-BN (linear), + input when the
    block keeps the stream (stride 1, same group)."""

    def __init__(self, expand: Layer | None, dw: Layer, project: Layer, residual: bool) -> None:
        super().__init__()
        self.expand = None if expand is None else _conv_bn(expand, nn.ReLU6())
        self.dw = _conv_bn(dw, nn.ReLU6())
        self.project = _conv_bn(project, None)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if self.expand is None else self.expand(x)
        h = self.project(self.dw(h))
        return h + x if self.residual else h


@register_backbone("mobilenetv2")
class MobileNetV2(_DictSpecBackbone):
    """MobileNetV2 (CIFAR variant): 3x3 stem (32), 17 inverted-residual blocks, 1x1 conv to 1280,
    global average pool, linear classifier."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        self._init_spec(spec)
        table = {ly.name: ly for ly in self.layer_table(self.spec)}
        self.stem = _conv_bn(table["stem"], nn.ReLU6())
        blocks = []
        for i, (_, first) in enumerate(self._plan()):
            blocks.append(InvertedResidual(table.get(f"b{i}_expand"), table[f"b{i}_dw"], table[f"b{i}_project"],
                                           residual=not first))
        self.blocks = nn.Sequential(*blocks)
        self.head = _conv_bn(table["head"], nn.ReLU6())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(table["head"].c_out, self.spec["num_classes"])

    @staticmethod
    def _plan() -> list[tuple[tuple[int, int, int], bool]]:
        """Per block: ((t, stage index k (1-based), stride), is the stage's first block)."""
        out = []
        for k, (t, _c, n, s) in enumerate(MBV2, start=1):
            for j in range(n):
                out.append(((t, k, s if j == 0 else 1), j == 0))
        return out

    @classmethod
    def default_spec(cls, options: dict[str, Any], in_channels: int, input_size: int,
                     num_classes: int) -> dict[str, Any]:
        mult = float(options.get("width_mult", 1.0))
        widths = {"stem": _scaled(32, mult)}
        c_in = widths["stem"]
        for i, ((t, k, _s), _first) in enumerate(cls._plan()):
            c = _scaled(MBV2[k - 1][1], mult)
            if t != 1:
                widths[f"b{i}_hidden"] = c_in * t
            widths[f"stage{k}"] = c
            c_in = c
        widths["head"] = 1280 if mult <= 1 else _scaled(1280, mult)
        return {"name": "mobilenetv2", "in_channels": int(in_channels), "input_size": int(input_size),
                "widths": widths, "num_classes": int(num_classes)}

    @classmethod
    def layer_table(cls, spec: dict[str, Any]) -> list[Layer]:
        ranks, size = _ranks(spec), spec["input_size"]
        w = _width(spec, "stem")
        out = [Layer("stem", "stem.0", "stem.1", "stem.1", None, "stem", spec["in_channels"], w, 3, 1, 1,
                     size * size, rank=ranks.get("stem"))]
        group, c_in = "stem", w
        for i, ((t, k, s), _first) in enumerate(cls._plan()):
            p = f"blocks.{i}"
            h_group, h = group, c_in
            if t != 1:
                h_group, h = f"b{i}_hidden", _width(spec, f"b{i}_hidden")
                out.append(Layer(f"b{i}_expand", f"{p}.expand.0", f"{p}.expand.1", f"{p}.expand.1", group, h_group,
                                 c_in, h, 1, 1, 0, size * size, rank=ranks.get(f"b{i}_expand")))
            o = conv_out(size, 3, s, 1)
            out.append(Layer(f"b{i}_dw", f"{p}.dw.0", f"{p}.dw.1", f"{p}.dw.1", h_group, h_group, h, h, 3, s, 1,
                             o * o, depthwise=True))
            stream, wc = f"stage{k}", _width(spec, f"stage{k}")
            out.append(Layer(f"b{i}_project", f"{p}.project.0", f"{p}.project.1", f"{p}.project.1", h_group, stream,
                             h, wc, 1, 1, 0, o * o, rank=ranks.get(f"b{i}_project")))
            group, c_in, size = stream, wc, o
        out.append(Layer("head", "head.0", "head.1", "head.1", group, "head", c_in, _width(spec, "head"), 1, 1, 0,
                         size * size, rank=ranks.get("head")))
        return _checked(spec, out)

    @classmethod
    def head_group(cls, spec: dict[str, Any]) -> str:
        return "head"

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, S, S) -> pooled features (N, width of head)."""
        return torch.flatten(self.pool(self.head(self.blocks(self.stem(x)))), 1)
