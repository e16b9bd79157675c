"""Prepared splits read back: verified against their manifest's sha256, as stored or normalised.

The shards and manifests are written by :mod:`pruneshot.data.prepare`; training code sees a split
either as a :class:`Split` of normalised float tensors (:func:`load_split`) or, through
:mod:`pruneshot.data.pipeline`, as the stored uint8 tensors (:func:`load_verified`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pruneshot.io import load_tensors, read_json, sha256_file


@dataclass
class Split:
    """A prepared split as float tensors: x (N, C, H, W) normalised, y (N,) int64."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


def load_verified(manifest_path: Path | str, split: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(manifest, tensors as stored) of a split named in a manifest, after verifying its sha256."""
    manifest_path = Path(manifest_path)
    manifest = read_json(manifest_path)
    entry = manifest["splits"][split]
    path = manifest_path.parent / entry["file"]
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        raise ValueError(f"{path}: sha256 {digest} does not match the manifest ({entry['sha256']})")
    return manifest, load_tensors(path)


def load_split(manifest_path: Path | str, split: str, normalization: dict[str, float]) -> Split:
    """Load a split named in a manifest, verify its sha256, scale to [0, 1] and normalise."""
    manifest, t = load_verified(manifest_path, split)
    x = t["x"].float() / manifest["max_value"]
    x = (x - normalization["mean"]) / normalization["std"]
    return Split(x=x, y=t["y"].long())
