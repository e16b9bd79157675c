"""Layers every backbone is built from: the layer table's ``Layer`` row, plain and low-rank convs
(``LowRankConv``) and their costs from shapes alone."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


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


def check_rank(r: Any, where: str) -> None:
    if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 1):
        raise ValueError(f"{where}: each rank must be null or an int >= 1, got {r!r}")


def input_conv(conv: nn.Module) -> nn.Module:
    """The module whose input channels are ``conv``'s input channels (``conv`` itself for a plain conv,
    the basis conv of a ``LowRankConv`` or of a basis-scaling layer)."""
    return getattr(conv, "input_conv", conv)


def output_conv(conv: nn.Module) -> nn.Module:
    """The module whose output channels are ``conv``'s output channels (for magnitude criteria)."""
    return getattr(conv, "output_conv", conv)
