"""Device-hours of each study config's transfer stage, from measured per-step and per-adapt costs.

For every study config: its transfer cells (methods x budgets x replicates x targets x shots, each
method's arms) and, per cell, episodes x fine-tuning steps of every trained arm (a target-side
method's arms train ``transfer.steps`` less its adapt steps; prototype trains none), plus one
``adapt`` per target-side episode. Costs per unit are measured here on ``--device``:

* one fine-tuning step of the study's backbone at its image size and support batch
  (min(batch_size, ways x shots)), with the study's augmentation, at every budget level (the dense
  network with each channel group cut to one shared keep ratio, ``methods.base.uniform_widths``:
  a pruned network of that size stands for every method's), for the reference engine (one
  network) and the batched engine at ``--k`` networks (per network: chunk seconds / K);
* one ``adapt`` per target-side method from ``benchmarks/results/adapt_seconds.json`` (5-way 5-shot,
  resnet56 and vgg16_bn; other backbones: not measured, left out and said so).

Transfer selection (``transfer.select``'s grid on validation episodes), pretraining, searches and
profiling are not counted: the transfer arms and adapt are the bulk (issue 16's measurement).

    python benchmarks/study_cost.py                       # CPU, 1 thread: extrapolated CPU-hours
    python benchmarks/study_cost.py --device cuda --k 64  # on a GPU: GPU-hours

Writes benchmarks/results/study_cost.json (a CUDA run: study_cost_cuda.json) and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
STUDIES = ["cifar100_fs", "cifar100_to_cifar10", "mnist_to_fashion"]


def cells(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Every transfer cell of ``cfg``: method, side, shots, trained arms' steps per episode, episodes."""
    from pruneshot.methods import get_method
    from pruneshot.stages.transfer import adapt_steps

    tc = cfg["transfer"]
    out = []
    for name in cfg["methods"]:
        m = get_method(name)
        budgets = [1.0] if m.budget_free else [float(b) for b in cfg["budget"]["levels"]]
        for budget in budgets:
            steps = tc["steps"] - adapt_steps(cfg, m, budget)
            arms = [a for a in m.study_arms(tc) if a != "prototype"]
            for _ in range(cfg["study"]["replicates"] * len(cfg["data"]["targets"])):
                for shots in cfg["episodes"]["shots"]:
                    out.append({"method": name, "side": m.side, "budget": budget, "shots": int(shots),
                                "steps": steps * len(arms), "episodes": cfg["episodes"]["count"],
                                "adapts": cfg["episodes"]["count"] if m.side == "target" and budget < 1 else 0})
    return out


def step_seconds(backbone: dict[str, Any], channels: int, size: int, batch: int, augment: bool, k: int,
                 device: torch.device, budget: float, metric: str, steps: int = 3) -> tuple[float, float]:
    """(reference seconds per step of one network, batched seconds per step per network at ``k``), for
    the backbone cut uniformly to ``budget`` of its ``metric``."""
    from pruneshot.batching import finetune_batched
    from pruneshot.data.pipeline import Augment
    from pruneshot.methods.base import uniform_widths
    from pruneshot.models.base import backbone_spec, build_model, build_seeded
    from pruneshot.training import finetune_episode

    spec = backbone_spec(dict(backbone), channels, size, 5)
    dense = build_model(spec)
    if budget < 1:
        spec = dense.spec_with_widths(uniform_widths(dense, budget, metric))
    base = build_seeded(spec, 0).to(device).eval()
    base.reset_classifier(5)
    base.to(device)
    x = torch.randn(batch, channels, size, size).to(device)
    y = (torch.arange(batch) % 5).to(device)
    hp = {"arm": "finetune", "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4, "batch_size": batch,
          "augment": Augment(crop_padding=4, flip=True) if augment else None}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timed(fn: Any) -> float:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    one = lambda: finetune_episode(copy.deepcopy(base), x, y, steps=steps, seed=0, **hp)  # noqa: E731
    many = lambda: finetune_batched([copy.deepcopy(base) for _ in range(k)], [x] * k, [y] * k,  # noqa: E731
                                    seeds=list(range(k)), steps=steps, **hp)
    one()
    ref = statistics.median(timed(one) for _ in range(2)) / steps
    if k == 1:  # the reference engine only
        return ref, ref
    many()
    bat = statistics.median(timed(many) for _ in range(2)) / steps / k
    return ref, bat


def main() -> None:
    from pruneshot.config import load_config
    from pruneshot.data.registry import effective_shape

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--k", type=int, default=16,
                    help="networks per chunk of the batched engine (1: time the reference engine only)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    adapt_file = ROOT / "benchmarks/results/adapt_seconds.json"
    adapt = {(r["backbone"], r["method"]): r["mean_s"] for r in json.loads(adapt_file.read_text())["cpu-1t"]["rows"]} \
        if device.type == "cpu" else {}
    rows = []
    for study in STUDIES:
        cfg = load_config(ROOT / f"config/studies/{study}.yaml")
        bb, tc = cfg["backbone"], cfg["transfer"]
        channels, size, _w = effective_shape(cfg["data"]["source"]["dataset"], cfg["data"]["image"])
        cs = cells(cfg)
        per_cell = {}
        for shots, budget in sorted({(c["shots"], c["budget"]) for c in cs}):
            batch = min(tc["batch_size"], cfg["episodes"]["ways"] * shots)
            per_cell[shots, budget] = step_seconds(bb, channels, size, batch, tc["augment"] == "crop_flip", args.k,
                                                   device, budget, cfg["budget"]["metric"])
            print(f"{study} {bb['name']} {shots}-shot budget {budget:g} batch {batch}: "
                  f"{per_cell[shots, budget][0] * 1e3:.1f} ms/step (batched K={args.k}: "
                  f"{per_cell[shots, budget][1] * 1e3:.1f} ms/step/network)", flush=True)
        ref_h = sum(c["episodes"] * c["steps"] * per_cell[c["shots"], c["budget"]][0] for c in cs) / 3600
        bat_h = sum(c["episodes"] * c["steps"] * per_cell[c["shots"], c["budget"]][1] for c in cs) / 3600
        missing = sorted({c["method"] for c in cs if c["adapts"] and (bb["name"], c["method"]) not in adapt})
        adapt_h = sum(c["adapts"] * adapt.get((bb["name"], c["method"]), 0.0) for c in cs) / 3600
        seconds = [c["episodes"] * c["steps"] * per_cell[c["shots"], c["budget"]][0]
                   + c["adapts"] * adapt.get((bb["name"], c["method"]), 0.0) for c in cs]
        worst_h, worst = max(zip(seconds, cs, strict=True), key=lambda t: t[0])
        worst_h /= 3600
        rows.append({"study": study, "backbone": bb["name"], "image_size": size, "cells": len(cs),
                     "ms_per_step": {f"{s}shot_b{b:g}": round(v[0] * 1e3, 2) for (s, b), v in per_cell.items()},
                     "ms_per_step_batched": {f"{s}shot_b{b:g}": round(v[1] * 1e3, 2)
                                             for (s, b), v in per_cell.items()},
                     "transfer_arms_hours": round(ref_h, 1), "transfer_arms_hours_batched": round(bat_h, 1),
                     "adapt_hours": round(adapt_h, 1), "adapt_not_measured": missing,
                     "largest_job": {k: worst[k] for k in ("method", "budget", "shots")}
                     | {"hours": round(worst_h, 2)}})
        print(json.dumps(rows[-1]), flush=True)
    out = args.out or ROOT / "benchmarks/results" / ("study_cost.json" if device.type == "cpu"
                                                     else f"study_cost_{device.type}.json")
    out.write_text(json.dumps({"what": __doc__.split("\n\n")[0], "device": str(device), "threads": args.threads,
                               "k": args.k, "torch": torch.__version__, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
