"""Measured latency of a network's forward pass (wall time, CPU or synchronised CUDA)."""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn


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
