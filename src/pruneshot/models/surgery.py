"""Physical channel surgery and the equivalent masked forward pass."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


@torch.no_grad()
def slice_conv(old: nn.Conv2d, new: nn.Conv2d, out_idx: torch.Tensor, in_idx: torch.Tensor | None) -> None:
    """Copy ``old``'s weights restricted to output channels ``out_idx`` and input channels ``in_idx``."""
    w = old.weight[out_idx]
    if in_idx is not None and old.groups == 1:
        w = w[:, in_idx]
    new.weight.copy_(w)
    if old.bias is not None:
        new.bias.copy_(old.bias[out_idx])


@torch.no_grad()
def slice_block_conv(old: nn.Module, new: nn.Module, out_idx: torch.Tensor, in_idx: torch.Tensor | None) -> None:
    """``slice_conv`` for a block's conv, plain or ``LowRankConv``: a low-rank conv keeps every basis,
    its output channels slice ``coef`` and its input channels slice ``basis``."""
    from pruneshot.models.layers import LowRankConv

    if isinstance(old, LowRankConv) != isinstance(new, LowRankConv):
        raise ValueError(f"cannot slice a {type(old).__name__} into a {type(new).__name__}")
    if isinstance(old, LowRankConv):
        slice_conv(old.basis, new.basis, torch.arange(old.rank), in_idx)
        slice_conv(old.coef, new.coef, out_idx, None)
    else:
        slice_conv(old, new, out_idx, in_idx)


@torch.no_grad()
def slice_bn(old: nn.BatchNorm2d, new: nn.BatchNorm2d, idx: torch.Tensor) -> None:
    """Copy affine parameters and running statistics of channels ``idx``."""
    new.weight.copy_(old.weight[idx])
    new.bias.copy_(old.bias[idx])
    new.running_mean.copy_(old.running_mean[idx])
    new.running_var.copy_(old.running_var[idx])
    new.num_batches_tracked.copy_(old.num_batches_tracked)


@torch.no_grad()
def slice_linear_in(old: nn.Linear, new: nn.Linear, in_idx: torch.Tensor | None) -> None:
    """Copy a linear layer keeping input features ``in_idx``."""
    w = old.weight if in_idx is None else old.weight[:, in_idx]
    new.weight.copy_(w)
    if old.bias is not None:
        new.bias.copy_(old.bias)


def keep_to_masks(model: nn.Module, keep: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """0/1 float masks (size = group width) from kept indices."""
    masks = {}
    for group, size in model.channel_groups().items():
        m = torch.ones(size)
        if group in keep:
            m.zero_()
            m[torch.as_tensor(keep[group], dtype=torch.long)] = 1.0
        masks[group] = m
    return masks


def _mask_hook(mask: torch.Tensor):
    def hook(_m: nn.Module, _inp: tuple, out: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (out.dim() - 2)  # broadcast over (N, C, ...)
        return out * mask.to(out.device, out.dtype).view(shape)

    return hook


@contextlib.contextmanager
def channel_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> Iterator[nn.Module]:
    """Within the block, ``model`` zeroes each group's masked channels at its mask points."""
    handles = []
    points = model.mask_points()
    for group, mask in masks.items():
        for module in points[group]:
            handles.append(module.register_forward_hook(_mask_hook(mask)))
    try:
        yield model
    finally:
        for h in handles:
            h.remove()
