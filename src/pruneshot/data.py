"""Datasets prepared as a few safetensors shards plus a JSON manifest.

A prepared split holds ``x`` (uint8, N x C x H x W, raw pixel levels) and ``y``
(int64, N, labels re-indexed to 0..K-1 in the order of the configured classes),
plus ``orig_y`` (the dataset's own labels). The manifest records the class list,
counts, pixel scale, normalisation statistics and the sha256 of every shard.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pruneshot.io import load_tensors, read_json, save_tensors, sha256_file, write_json


@dataclass(frozen=True)
class RawDataset:
    """A whole dataset in memory: images uint8 (N, C, H, W), labels int64 (N,), max pixel level."""

    x: np.ndarray
    y: np.ndarray
    max_value: int
    name: str


def load_raw(name: str, cache_dir: Path | None = None) -> RawDataset:
    """Load a dataset by name. ``digits`` is scikit-learn's bundled copy (no download)."""
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x = d.images.astype(np.uint8)[:, None, :, :]  # levels 0..16
        return RawDataset(x=x, y=d.target.astype(np.int64), max_value=16, name=name)
    raise ValueError(f"unknown dataset {name!r}; allowed: digits")


def _select(raw: RawDataset, classes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    idx = np.flatnonzero(np.isin(raw.y, classes))
    return raw.x[idx], raw.y[idx]


def _relabel(y: np.ndarray, classes: list[int]) -> np.ndarray:
    lookup = {c: i for i, c in enumerate(classes)}
    return np.array([lookup[int(v)] for v in y], dtype=np.int64)


def _save_split(path: Path, x: np.ndarray, y: np.ndarray, classes: list[int]) -> dict[str, Any]:
    save_tensors(
        path,
        {"x": torch.from_numpy(np.ascontiguousarray(x)), "y": torch.from_numpy(_relabel(y, classes)),
         "orig_y": torch.from_numpy(y.copy())},
    )
    return {"file": path.name, "n": len(y), "sha256": sha256_file(path)}


def prepare_source(raw: RawDataset, classes: list[int], val_fraction: float, seed: int, out_dir: Path) -> dict:
    """Write train/val shards of the source classes (stratified hold-out) and manifest.json."""
    x, y = _select(raw, classes)
    rng = np.random.default_rng(seed)
    val_idx = []
    for c in classes:
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        val_idx.extend(idx[: max(1, round(val_fraction * len(idx)))].tolist())
    val_mask = np.zeros(len(y), dtype=bool)
    val_mask[val_idx] = True
    out_dir.mkdir(parents=True, exist_ok=True)
    train = _save_split(out_dir / "train.safetensors", x[~val_mask], y[~val_mask], classes)
    val = _save_split(out_dir / "val.safetensors", x[val_mask], y[val_mask], classes)
    scaled = x[~val_mask].astype(np.float64) / raw.max_value
    manifest = {
        "dataset": raw.name,
        "role": "source",
        "classes": classes,
        "image_shape": list(x.shape[1:]),
        "max_value": raw.max_value,
        "normalization": {"mean": float(scaled.mean()), "std": float(scaled.std())},
        "val_fraction": val_fraction,
        "split_seed": seed,
        "splits": {"train": train, "val": val},
    }
    write_json(out_dir / "manifest.json", manifest)
    return manifest


def prepare_target(raw: RawDataset, classes: list[int], out_dir: Path) -> dict:
    """Write the target pool shard (all images of the target classes) and manifest.json."""
    x, y = _select(raw, classes)
    out_dir.mkdir(parents=True, exist_ok=True)
    pool = _save_split(out_dir / "pool.safetensors", x, y, classes)
    manifest = {
        "dataset": raw.name,
        "role": "target",
        "classes": classes,
        "image_shape": list(x.shape[1:]),
        "max_value": raw.max_value,
        "class_counts": {str(c): int((y == c).sum()) for c in classes},
        "splits": {"pool": pool},
    }
    write_json(out_dir / "manifest.json", manifest)
    return manifest


@dataclass
class Split:
    """A prepared split as float tensors: x (N, C, H, W) normalised, y (N,) int64."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


def load_split(manifest_path: Path | str, split: str, normalization: dict[str, float]) -> Split:
    """Load a split named in a manifest, verify its sha256, scale to [0, 1] and normalise."""
    manifest_path = Path(manifest_path)
    manifest = read_json(manifest_path)
    entry = manifest["splits"][split]
    path = manifest_path.parent / entry["file"]
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        raise ValueError(f"{path}: sha256 {digest} does not match the manifest ({entry['sha256']})")
    t = load_tensors(path)
    x = t["x"].float() / manifest["max_value"]
    x = (x - normalization["mean"]) / normalization["std"]
    return Split(x=x, y=t["y"].long())
