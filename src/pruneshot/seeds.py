"""Seed derivation (protocol.md): one root seed, one derived seed per axis.

A seed is a pure function of the root seed, an axis name and the axis values,
so every method sees the same episodes and calibration data while replicates
differ. Changing one axis never shifts another axis's seeds.
"""

from __future__ import annotations

import hashlib
import random

import numpy as np

AXES = ("data", "pretrain", "search", "episode", "finetune", "adapt", "profile")


def derive_seed(root_seed: int, axis: str, *values: object) -> int:
    """Seed in [0, 2**31) for ``axis`` and its values, e.g. derive_seed(0, "episode", "t", 5, 1, 3)."""
    if axis not in AXES:
        raise ValueError(f"unknown seed axis {axis!r}; allowed: {', '.join(AXES)}")
    if isinstance(root_seed, bool) or int(root_seed) != root_seed:
        raise ValueError(f"root seed must be an integer, got {root_seed!r}")
    # Length-prefixed parts: ("a|b",) and ("a", "b") must not collide. Values are compared as
    # text so a wildcard "1" and an int 1 give the same seed.
    parts = [str(int(root_seed)), axis, *map(str, values)]
    text = "".join(f"{len(p)}:{p};" for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") % (2**31)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch, and make torch deterministic on CPU."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
