"""Cost of a network: params and FLOPs, counted on the physically pruned network."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def count_params(model: nn.Module) -> int:
    """Number of parameters (buffers such as BN running stats excluded)."""
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """FLOPs of one forward pass at batch 1 (torch.utils.flop_counter: 2 per multiply-add
    in convs and matmuls; BN, ReLU and pooling are not counted). ``input_shape`` is (C, H, W). The
    pass runs on the model's device (its first parameter's; the CPU for a model without any)."""
    from torch.utils.flop_counter import FlopCounterMode

    modes = {m: m.training for m in model.modules()}
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    x = torch.zeros((1, *input_shape), device=device)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    for m, mode in modes.items():
        m.training = mode
    return int(counter.get_total_flops())


def input_shape(spec: dict[str, Any]) -> tuple[int, int, int]:
    """(C, H, W) the backbone expects."""
    return (spec["in_channels"], spec["input_size"], spec["input_size"])


def cost(model: nn.Module, metric: str) -> int:
    """Params or FLOPs of ``model`` (``metric`` in {'params', 'flops'})."""
    if metric == "params":
        return count_params(model)
    if metric == "flops":
        return count_flops(model, input_shape(model.spec))
    raise ValueError(f"unknown budget metric {metric!r}; allowed: params, flops")
