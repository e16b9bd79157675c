"""Device-resident input pipeline: a split held on the training device, batched, normalised and
augmented there, with every random draw made on the CPU.

A :class:`BatchSource` holds the images as stored (uint8 pixel levels, N x C x H x W; or already
normalised float32) and the labels (int64, N) on one device, CPU or CUDA. One training batch is:
gather the batch's images by index, augment them (random crop with zero padding, horizontal flip,
per image, vectorised: no Python loop over images), convert to float32, scale by ``1 / max_value``
and normalise with (mean, std) -- the same operations, in the same order, as
:func:`pruneshot.data.splits.load_split`, so a batch equals the matching rows of ``load_split``'s tensor
bit for bit. There are no DataLoader workers: on CUDA the whole dataset (50 000 CIFAR images are
150 MB as uint8) lives in GPU memory and a batch never crosses the PCIe bus.

Augmentation (:func:`crop_flip`): the image is padded by ``pad`` pixels on every side with the value
of a zero pixel (level 0 before normalisation, i.e. ``(0 - mean) / std`` after it; the crop is done
on the uint8 levels, so the padding *is* level 0), then the H x W window at offset (dy, dx) is
kept, dy and dx independent and uniform on {0, ..., 2 * pad}; then, with probability 0.5, the crop
is mirrored left-right. Offset (pad, pad) without flip is the identity. This is the usual CIFAR
recipe (``RandomCrop(H, padding=pad)`` then ``RandomHorizontalFlip()``).

Randomness: the epoch's permutation, crop offsets and flips are drawn from one ``torch.Generator``
on the CPU (seeded from the job seed), in that order, once per epoch, and then copied to the
device. So a seed fixes the batches and their augmentation whatever the device: CPU and CUDA
runs see the same images in the same order with the same crops and flips (the arithmetic after
that is the device's own). With augmentation off nothing but the permutation is drawn, exactly
as the previous CPU loop did.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

DEVICES = ("auto", "cpu", "cuda")
AMP_MODES = ("none", "bf16")


@dataclass(frozen=True)
class Augment:
    """Training-time augmentation: ``crop_padding`` pixels of zero padding for the random crop
    (0: no crop) and a random horizontal flip with p = 0.5 (``flip``)."""

    crop_padding: int = 0
    flip: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.crop_padding, int) or self.crop_padding < 0:
            raise ValueError(f"crop_padding must be an integer >= 0, got {self.crop_padding!r}")

    @property
    def active(self) -> bool:
        return self.crop_padding > 0 or self.flip

    @classmethod
    def from_config(cls, section: dict[str, Any] | None) -> Augment:
        """From a config section ``{crop_padding: int, flip: bool}`` (missing keys: off)."""
        section = section or {}
        return cls(crop_padding=int(section.get("crop_padding", 0)), flip=bool(section.get("flip", False)))


# --- devices -------------------------------------------------------------------------------------

def resolve_device(requested: str, what: str = "device") -> torch.device:
    """'auto' -> CUDA if available, else CPU; 'cpu'; 'cuda' (ValueError at once when no GPU is
    usable, naming the setting ``what``, so a job fails before loading data or training)."""
    if requested not in DEVICES:
        raise ValueError(f"{what}: unknown device {requested!r}; allowed: {', '.join(DEVICES)}")
    if requested == "cpu":
        return torch.device("cpu")
    available = torch.cuda.is_available()
    if requested == "cuda" and not available:
        raise ValueError(f"{what} is 'cuda' but no CUDA device is usable here ({cuda_absence_reason()}); "
                         f"set it to 'auto' or 'cpu'")
    return torch.device("cuda") if available else torch.device("cpu")


def cuda_absence_reason() -> str:
    """Why ``torch.cuda.is_available()`` is False, in words (empty string when it is True)."""
    if torch.cuda.is_available():
        return ""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU"


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when ``amp`` is 'bf16'; a no-op otherwise (CPU always runs float32)."""
    if amp not in AMP_MODES:
        raise ValueError(f"unknown amp mode {amp!r}; allowed: {', '.join(AMP_MODES)}")
    if amp == "bf16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --- augmentation --------------------------------------------------------------------------------

def draw_augmentation(n: int, augment: Augment, generator: torch.Generator
                      ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Crop offsets (n, 2) int64 (dy, dx), each uniform on {0, ..., 2 * crop_padding}, and flips
    (n,) bool with p = 0.5, drawn in that order from ``generator`` (CPU); None for what is off."""
    offsets = flips = None
    if augment.crop_padding > 0:
        offsets = torch.randint(0, 2 * augment.crop_padding + 1, (n, 2), generator=generator)
    if augment.flip:
        flips = torch.randint(0, 2, (n,), generator=generator).bool()
    return offsets, flips


def crop_flip(x: torch.Tensor, offsets: torch.Tensor | None, flips: torch.Tensor | None, pad: int,
              fill: float = 0.0) -> torch.Tensor:
    """Per-image random crop and flip of a batch ``x`` (B, C, H, W), any dtype, vectorised.

    Image i is padded by ``pad`` pixels of value ``fill`` on every side, its H x W window at
    ``offsets[i] = (dy, dx)`` (in padded coordinates, 0 <= dy, dx <= 2 * pad) is kept, and it is
    mirrored left-right when ``flips[i]``. ``offsets``/``flips`` None: no crop / no flip. Both are
    moved to ``x``'s device. Returns a new contiguous (B, C, H, W) tensor of ``x``'s dtype."""
    if offsets is None and flips is None:
        return x
    b, c, h, w = x.shape
    dev = x.device
    rows = torch.arange(h, device=dev).expand(b, h)
    cols = torch.arange(w, device=dev).expand(b, w)
    if offsets is not None:
        if pad <= 0:
            raise ValueError("crop offsets given with pad <= 0")
        offsets = offsets.to(dev, non_blocking=True)
        x = F.pad(x, (pad, pad, pad, pad), value=fill)
        rows = rows + offsets[:, :1]
        cols = cols + offsets[:, 1:]
    if flips is not None:
        cols = torch.where(flips.to(dev, non_blocking=True)[:, None], cols.flip(1), cols)
    # One gather over the flattened (padded) plane: index (rows * padded width + cols) per image,
    # shared by the channels (about 3x faster than 4-D advanced indexing on the CPU).
    lin = (rows[:, :, None] * x.shape[3] + cols[:, None, :]).reshape(b, 1, h * w).expand(b, c, h * w)
    return x.reshape(b, c, -1).gather(2, lin).reshape(b, c, h, w)


# --- data on the device --------------------------------------------------------------------------

@dataclass
class RawSplit:
    """A prepared split as stored: x uint8 (N, C, H, W) pixel levels 0..max_value, y int64 (N,)."""

    x: torch.Tensor
    y: torch.Tensor
    max_value: int

    def __len__(self) -> int:
        return len(self.y)


def load_raw_split(manifest_path: Path | str, split: str) -> RawSplit:
    """Load a split named in a manifest as stored (uint8 levels), after verifying its sha256."""
    from pruneshot.data.splits import load_verified

    manifest, t = load_verified(manifest_path, split)
    return RawSplit(x=t["x"], y=t["y"].long(), max_value=int(manifest["max_value"]))


class BatchSource:
    """One split resident on ``device``: batches, normalisation and augmentation happen there.

    ``x`` uint8 (N, C, H, W) levels with ``max_value``, normalised per batch as
    ``(x.float() / max_value - mean) / std`` (the arithmetic of ``splits.load_split``), or float
    images already normalised (``max_value`` None; then ``fill`` is the normalised value of a
    zero pixel, used as crop padding). ``y`` int64 (N,). ``channels_last``: batches come out in
    channels-last memory format (for a channels-last model on CUDA)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, *, device: torch.device | str = "cpu",
                 max_value: int | None = None, mean: float = 0.0, std: float = 1.0, fill: float = 0.0,
                 channels_last: bool = False) -> None:
        if x.dim() != 4 or len(x) != len(y):
            raise ValueError(f"x must be (N, C, H, W) with N = len(y); got {tuple(x.shape)} and {len(y)} labels")
        if (max_value is None) == (x.dtype == torch.uint8):
            raise ValueError("uint8 images need max_value; float images are used as given (max_value None)")
        self.device = torch.device(device)
        self.x = x.to(self.device)
        self.y = y.long().to(self.device)
        self.max_value, self.mean, self.std = max_value, mean, std
        self.fill = 0 if max_value is not None else fill
        self.channels_last = channels_last

    @classmethod
    def from_raw(cls, raw: RawSplit, normalization: dict[str, float], *, device: torch.device | str = "cpu",
                 channels_last: bool = False) -> BatchSource:
        """A stored split with the manifest's normalisation ({'mean', 'std'})."""
        return cls(raw.x, raw.y, device=device, max_value=raw.max_value, mean=normalization["mean"],
                   std=normalization["std"], channels_last=channels_last)

    @classmethod
    def from_split(cls, split: Any, *, device: torch.device | str = "cpu", fill: float = 0.0,
                   channels_last: bool = False) -> BatchSource:
        """A ``splits.Split`` (float images already normalised; ``fill``: a zero pixel's value)."""
        return cls(split.x, split.y, device=device, fill=fill, channels_last=channels_last)

    def __len__(self) -> int:
        return len(self.y)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """Stored images (a batch of ``self.x``) -> float32 normalised, in the output memory format."""
        if self.max_value is not None:
            x = x.float() / self.max_value
            x = (x - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def batch(self, idx: torch.Tensor, offsets: torch.Tensor | None = None, flips: torch.Tensor | None = None,
              pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``idx`` (int64 indices, any device) cropped/flipped then normalised, and their labels."""
        idx = idx.to(self.device, non_blocking=True)
        x = crop_flip(self.x[idx], offsets, flips, pad, fill=self.fill)
        return self.normalise(x), self.y[idx]

    def epoch(self, batch_size: int, generator: torch.Generator | None = None,
              augment: Augment | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One pass in mini-batches of ``batch_size`` (the last may be smaller). With a
        ``generator``: shuffled and augmented (permutation, then offsets, then flips, all drawn on
        the CPU at the start of the epoch); without: in order and never augmented (evaluation)."""
        n = len(self)
        if generator is None:
            order = torch.arange(n, device=self.device)
            offsets = flips = None
        else:
            order = torch.randperm(n, generator=generator).to(self.device, non_blocking=True)
            offsets, flips = draw_augmentation(n, augment or Augment(), generator)
            offsets = None if offsets is None else offsets.to(self.device, non_blocking=True)
            flips = None if flips is None else flips.to(self.device, non_blocking=True)
        pad = augment.crop_padding if augment is not None else 0
        for i in range(0, n, batch_size):
            sl = slice(i, i + batch_size)
            yield self.batch(order[sl], None if offsets is None else offsets[sl],
                             None if flips is None else flips[sl], pad)


def zero_level(max_value: int, normalization: dict[str, float]) -> float:
    """The normalised value of a zero pixel, computed with ``load_split``'s float32 arithmetic
    (so it equals, bit for bit, what a level-0 pixel becomes): the crop padding of float images."""
    z = torch.zeros((), dtype=torch.float32) / max_value
    return float((z - normalization["mean"]) / normalization["std"])
