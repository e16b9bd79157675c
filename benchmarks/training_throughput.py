"""Training throughput (images/s) of one backbone on CIFAR-shaped synthetic data, fed two ways:

(a) ``pipeline``: the real input pipeline (``pruneshot.data.pipeline.BatchSource``): uint8 images held on
    the device, per batch a shuffled gather, random crop (padding 4) + flip and normalisation there,
    with the random draws made on the CPU, as ``pretrain`` trains;
(b) ``prestaged``: the same model fed normalised float32 batches already on the device (contiguous
    slices of one pre-normalised tensor: no gather, no augmentation, no conversion).

Both time full training steps (forward, cross-entropy, backward, SGD step) under the same device,
amp and memory format, after ``--warmup`` untimed steps, synchronised at both ends; each starts
from the same initial weights. ``pipeline_only`` times the input pipeline alone. The variants are
timed in ``--rounds`` alternating rounds of ``--steps`` steps; the median round is reported. The
ratio prestaged / pipeline is the pipeline's overhead (1.0: free). One command:

    python benchmarks/training_throughput.py --backbone resnet56 --n 50000 --steps 100   # a GPU
    python benchmarks/training_throughput.py --backbone small_cnn --n 2048 --steps 10    # a CPU

Writes benchmarks/results/training_throughput.json (``--out``) and prints it. Nothing here
asserts a time.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
# CIFAR-10-like per-channel statistics are irrelevant for timing; one scalar pair as in the manifests.
NORMALIZATION = {"mean": 0.47, "std": 0.25}
DEFAULT_WIDTHS = {"small_cnn": [32, 64, 128]}


def build_backbone(name: str, num_classes: int, widths: list[int] | None) -> torch.nn.Module:
    """``models.build_model(models.backbone_spec({'name': name, ...}, 3, 32, num_classes))``."""
    from pruneshot.models.base import backbone_spec, build_model

    section: dict[str, Any] = {"name": name}
    if widths or name in DEFAULT_WIDTHS:
        section["widths"] = widths or DEFAULT_WIDTHS[name]
    return build_model(backbone_spec(section, 3, 32, num_classes))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]


def _warm(step: Callable[[torch.Tensor, torch.Tensor], None], batches: Batches, warmup: int) -> None:
    for _ in range(warmup):
        step(*next(batches))


def _timed_steps(step: Callable[[torch.Tensor, torch.Tensor], None], batches: Batches, steps: int,
                 device: torch.device) -> float:
    """Images/s of ``steps`` calls of ``step`` on consecutive batches, synchronised at both ends."""
    _sync(device)
    t0 = time.perf_counter()
    images = 0
    for _ in range(steps):
        xb, yb = next(batches)
        step(xb, yb)
        images += len(yb)
    _sync(device)
    return images / (time.perf_counter() - t0)


def _train_step(model: torch.nn.Module, device: torch.device, amp: str, lr: float = 0.05
                ) -> Callable[[torch.Tensor, torch.Tensor], None]:
    from pruneshot.data.pipeline import autocast

    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    model.train()

    def step(xb: torch.Tensor, yb: torch.Tensor) -> None:
        with autocast(device, amp):
            loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def run(backbone: str = "resnet56", *, n: int = 50000, num_classes: int = 100, batch_size: int = 128,
        steps: int = 50, warmup: int = 10, rounds: int = 3, device: str = "auto", amp: str = "bf16",
        channels_last: bool = True, crop_padding: int = 4, flip: bool = True, threads: int | None = None, seed: int = 0,
        widths: list[int] | None = None) -> dict[str, Any]:
    """Measure (a) pipeline and (b) pre-staged training throughput; return the result record."""
    from pruneshot.data.pipeline import Augment, BatchSource, resolve_device
    from pruneshot.runtime.provenance import device_name

    if threads:
        torch.set_num_threads(threads)
    if n < batch_size:
        raise ValueError(f"--n {n} must be at least --batch-size {batch_size}")
    dev = resolve_device(device, "--device")
    on_cuda = dev.type == "cuda"
    cl = channels_last and on_cuda
    amp_used = amp if on_cuda else "none"
    if on_cuda:
        torch.backends.cudnn.benchmark = True
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen)
    y = torch.randint(0, num_classes, (n,), generator=gen)
    torch.manual_seed(seed)
    model0 = build_backbone(backbone, num_classes, widths)
    params = sum(p.numel() for p in model0.parameters())
    augment = Augment(crop_padding=crop_padding, flip=flip)

    def fresh_model() -> torch.nn.Module:
        m = copy.deepcopy(model0).to(dev)
        return m.to(memory_format=torch.channels_last) if cl else m

    source = BatchSource(x, y, device=dev, max_value=255, channels_last=cl, **NORMALIZATION)

    def pipeline_batches() -> Batches:
        g = torch.Generator().manual_seed(seed + 1)
        while True:
            yield from source.epoch(batch_size, g, augment)

    # (b) the whole set normalised once, on the device; batches are contiguous slices of it
    staged_x = source.normalise(source.x)
    staged_y = source.y

    def staged_batches() -> Batches:
        while True:
            for i in range(0, n - batch_size + 1, batch_size):
                yield staged_x[i : i + batch_size], staged_y[i : i + batch_size]

    variants = {  # (step, batches); one model and optimiser per training variant, warmed up once
        "prestaged": (_train_step(fresh_model(), dev, amp_used), staged_batches()),
        "pipeline": (_train_step(fresh_model(), dev, amp_used), pipeline_batches()),
        "pipeline_only": (lambda xb, yb: None, pipeline_batches()),
    }
    for step, batches in variants.values():
        _warm(step, batches, warmup)
    # rounds alternate the variants, so drifting machine load hits each alike; median per variant
    per_round: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for name, (step, batches) in variants.items():
            per_round[name].append(_timed_steps(step, batches, steps, dev))
    ips = {k: statistics.median(v) for k, v in per_round.items()}
    prestaged, pipeline = ips["prestaged"], ips["pipeline"]
    return {
        "backbone": backbone, "params": params, "num_classes": num_classes, "input": [3, 32, 32],
        "n_images": n, "batch_size": batch_size, "steps": steps, "warmup": warmup,
        "device": str(dev), "device_name": device_name(str(dev)), "amp": amp_used, "amp_requested": amp,
        "channels_last": cl, "augment": {"crop_padding": crop_padding, "flip": flip},
        "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
        "nproc": os.cpu_count(),
        "rounds": rounds, "images_per_s": {k: round(v, 1) for k, v in ips.items()},
        "images_per_s_rounds": {k: [round(x, 1) for x in v] for k, v in per_round.items()},
        "overhead_ratio_prestaged_over_pipeline": round(prestaged / pipeline, 4),
        "pipeline_overhead_pct": round(100 * (prestaged / pipeline - 1), 2),
        # time of the input pipeline alone per batch, as a share of a pre-staged training step
        "pipeline_alone_pct_of_step": round(100 * prestaged / ips["pipeline_only"], 2),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="resnet56", help="a registered backbone name (default resnet56)")
    ap.add_argument("--widths", type=int, nargs="+", help="widths for small_cnn (default 32 64 128)")
    ap.add_argument("--n", type=int, default=50000, help="synthetic images (CIFAR train size: 50000)")
    ap.add_argument("--num-classes", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=50, help="timed training steps per variant and round")
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps of each variant before timing")
    ap.add_argument("--rounds", type=int, default=3, help="timings per variant, alternating; the median is reported")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--amp", default="bf16", choices=["none", "bf16"], help="bf16 autocast (CUDA only)")
    ap.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                    help="keep NCHW on CUDA (channels_last is on by default there, never on the CPU)")
    ap.add_argument("--crop-padding", type=int, default=4)
    ap.add_argument("--no-flip", dest="flip", action="store_false")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/training_throughput.json"))
    args = ap.parse_args(argv)
    result = run(args.backbone, n=args.n, num_classes=args.num_classes, batch_size=args.batch_size,
                 steps=args.steps, warmup=args.warmup, rounds=args.rounds, device=args.device, amp=args.amp,
                 channels_last=args.channels_last, crop_padding=args.crop_padding, flip=args.flip,
                 threads=args.threads, seed=args.seed, widths=args.widths)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
