"""Cost and accuracy metrics: params, FLOPs, measured latency, CI of episode accuracies."""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

import torch
from torch import nn


def count_params(model: nn.Module) -> int:
    """Number of parameters (buffers such as BN running stats excluded)."""
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """FLOPs of one forward pass at batch 1 (torch.utils.flop_counter: 2 per multiply-add
    in convs and matmuls; BN, ReLU and pooling are not counted). ``input_shape`` is (C, H, W)."""
    from torch.utils.flop_counter import FlopCounterMode

    modes = {m: m.training for m in model.modules()}
    model.eval()
    x = torch.zeros((1, *input_shape))
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


@torch.inference_mode()
def measure_latency(
    model: nn.Module, shape: tuple[int, ...], batch_size: int, *, device: str = "cpu",
    warmup: int = 5, repeats: int = 30,
) -> dict[str, float]:
    """Median/p10/p90 wall time (ms) of one forward pass on a ``(batch_size, *shape)`` batch,
    after ``warmup`` untimed passes; CUDA is synchronised around each timing."""
    model = model.to(device).eval()
    x = torch.randn((batch_size, *shape), device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        model(x)
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(x)
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))]  # noqa: E731
    return {"median_ms": statistics.median(times), "p10_ms": q(0.1), "p90_ms": q(0.9), "repeats": repeats}


def mean_ci(values: list[float]) -> dict[str, float]:
    """Mean, sample std, 95% CI half-width 1.96*std/sqrt(n), and n of per-episode accuracies."""
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = sum(values) / n
    std = statistics.stdev(values) if n > 1 else 0.0
    return {"mean": mean, "std": std, "ci95": 1.96 * std / math.sqrt(n), "n": n}
