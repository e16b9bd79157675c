"""Episodes per second of the batched episode engine (pruneshot.batching) against one episode at a time.

Both fine-tune the same K headed copies of one backbone on K 5-way support sets (random normalised
images, 32x32x3 or the backbone's ``--size``; 1- or 5-shot) under the transfer defaults (SGD lr 0.01,
momentum 0.9, weight decay 5e-4, batch 25, frozen BatchNorm): the reference calls
``training.finetune_episode`` once per episode, the engine ``batching.finetune_batched`` once per
chunk of K. Each is timed over ``--steps`` steps (the per-step cost is what the engine changes; the
stacking is paid once per chunk), after one untimed warm-up, synchronised on CUDA; episodes/s is
K / seconds x steps / 60 (60 steps = one default episode). Alternating rounds, median of ``--rounds``.

    python benchmarks/episode_batching.py                         # CPU: small_cnn, resnet20 at K 1, 4, 16, 64
    python benchmarks/episode_batching.py --device cuda --backbones resnet56 vgg16_bn --shots 5 --ks 1 16 64 128

Writes benchmarks/results/episode_batching.json (``--out``; a CUDA run writes ..._cuda.json) and
prints one line per (backbone, shots, K). Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
HP = {"lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4, "batch_size": 25}


def _setup(backbone: str, k: int, shots: int, size: int, device: torch.device) -> tuple[list, list, list]:
    from pruneshot.models.base import backbone_spec, build_seeded

    section: dict[str, Any] = {"name": backbone}
    if backbone == "small_cnn":
        section["widths"] = [32, 64, 128]
    spec = backbone_spec(section, 1 if backbone == "small_cnn" else 3, size, 5)
    base = build_seeded(spec, 0).eval()
    g = torch.Generator().manual_seed(1)
    models, xs, ys = [], [], []
    for i in range(k):
        m = copy.deepcopy(base)
        m.reset_classifier(5, torch.Generator().manual_seed(i))
        models.append(m.to(device).eval())
        xs.append(torch.randn(5 * shots, spec["in_channels"], size, size, generator=g).to(device))
        ys.append(torch.arange(5).repeat(shots).to(device))
    return models, xs, ys


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Any, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def measure(backbone: str, k: int, shots: int, size: int, steps: int, rounds: int, device: torch.device) -> dict:
    """Seconds of ``steps`` fine-tuning steps of K episodes, each engine; episodes/s at 60 steps."""
    from pruneshot.batching import finetune_batched
    from pruneshot.training import finetune_episode

    models, xs, ys = _setup(backbone, k, shots, size, device)

    def sequential() -> None:
        for i, m in enumerate(copy.deepcopy(models)):
            finetune_episode(m, xs[i], ys[i], arm="finetune", steps=steps, seed=i, **HP)

    def batched() -> None:
        finetune_batched(copy.deepcopy(models), xs, ys, seeds=list(range(k)), arm="finetune", steps=steps, **HP)

    _time(sequential, device) if k <= 4 else None  # warm-up (allocator, cuDNN plans)
    _time(batched, device)
    seq, bat = [], []
    for _ in range(rounds):
        seq.append(_time(sequential, device))
        bat.append(_time(batched, device))
    s, b = statistics.median(seq), statistics.median(bat)
    return {"backbone": backbone, "shots": shots, "k": k, "steps": steps, "sequential_s": round(s, 4),
            "batched_s": round(b, 4), "sequential_episodes_per_s": round(k / s * steps / 60, 3),
            "batched_episodes_per_s": round(k / b * steps / 60, 3), "speedup": round(s / b, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backbones", nargs="+", default=["small_cnn", "resnet20"])
    ap.add_argument("--ks", nargs="+", type=int, default=[1, 4, 16, 64])
    ap.add_argument("--shots", nargs="+", type=int, default=[5])
    ap.add_argument("--size", type=int, default=None, help="image size (default: 14 for small_cnn, else 32)")
    ap.add_argument("--steps", type=int, default=None,
                    help="steps timed per episode (default: 60, one default episode, for small_cnn; 20 otherwise)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    for backbone in args.backbones:
        size = args.size or (14 if backbone == "small_cnn" else 32)
        for shots in args.shots:
            for k in args.ks:
                steps = args.steps or (60 if backbone == "small_cnn" else 20)
                row = measure(backbone, k, shots, size, steps, args.rounds, device) | {"size": size}
                rows.append(row)
                print(json.dumps(row), flush=True)
    out = args.out or ROOT / "benchmarks/results" / (
        "episode_batching.json" if device.type == "cpu" else f"episode_batching_{device.type}.json")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    out.write_text(json.dumps({"what": __doc__.split("\n\n")[0], "command": "python benchmarks/episode_batching.py "
                               + " ".join(f"--{k} " + (" ".join(map(str, v)) if isinstance(v, list) else str(v))
                                        for k, v in vars(args).items() if k != "out" and v is not None),
                               "device": str(device), "device_name": name, "torch": torch.__version__,
                               "threads": args.threads, "hyperparameters": HP, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
