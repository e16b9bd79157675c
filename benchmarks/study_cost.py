"""Device-hours of each study config's transfer and selection stages, from measured per-step and per-adapt costs.

For every study config: its transfer cells (methods x budgets x replicates x targets x shots, each
method's arms) and its selection cells (``transfer.select``: methods x budgets x replicates x shots),
and per cell, episodes x fine-tuning steps of every trained arm, plus one ``adapt`` per target-side
episode. A transfer arm trains ``transfer.steps`` less the method's adapt steps (prototype trains none)
for each of the cell's networks (``networks_per_cell``: random's masks; reinit trains one);
with ``transfer.select`` each arm trains the selected steps instead, one of the grid's, so the
transfer hours are also given at the grid's largest step count (the upper bound). A selection cell
trains every trained arm under every learning rate of the grid for the largest grid step count, on
``transfer.select.episodes`` validation episodes. Costs per unit are measured here on ``--device``:

* one fine-tuning step of the study's backbone at its image size and support batch
  (min(batch_size, ways x shots); the validation episodes' ways for selection), with the study's
  augmentation, at every budget level (the dense network with each channel group cut to one shared
  keep ratio, ``methods.base.uniform_widths``: a pruned network of that size stands for every
  method's), for the reference engine (one network) and, with ``--k`` > 1, the batched engine at
  K networks (per network: chunk seconds / K);
* one ``adapt`` per target-side method from ``benchmarks/results/adapt_seconds.json`` (5-way 5-shot, the
  reference path, K = 1, at the study's image size, on this device type; a backbone or size not
  measured there is left out and named).

Pretraining, searches and profiling are not counted.

    python benchmarks/study_cost.py --k 1                 # CPU, 1 thread: extrapolated CPU-hours
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
    """Every transfer and selection cell of ``cfg``: stage, method, side, budget, shots, support batch,
    trained steps per episode (all arms; ``steps_max``: at the selection grid's largest step count),
    episodes, adapts."""
    from pruneshot.config import select_ways
    from pruneshot.methods import get_method, options_for
    from pruneshot.stages.select import TRAINED_ARMS
    from pruneshot.stages.transfer import adapt_steps

    tc, ec = cfg["transfer"], cfg["episodes"]
    sel = tc.get("select")
    out = []
    for name in cfg["methods"]:
        m = get_method(name)
        budgets = [1.0] if m.budget_free else [float(b) for b in cfg["budget"]["levels"]]
        for budget in budgets:
            n_adapt = adapt_steps(cfg, m, budget)
            adapts = m.side == "target" and budget < 1
            networks = m.networks_per_cell(m.resolve_options(options_for(cfg, m)))
            # every network trains under each arm but reinit (one run of the shared architecture)
            runs = sum(1 if a == "reinit" else networks for a in m.study_arms(tc) if a != "prototype")
            top = max(sel["steps"]) if sel else tc["steps"]
            for shots in ec["shots"]:
                common = {"method": name, "side": m.side, "budget": budget, "shots": int(shots)}
                for _ in range(cfg["study"]["replicates"] * len(cfg["data"]["targets"])):
                    out.append(common | {"stage": "transfer", "batch": min(tc["batch_size"], ec["ways"] * shots),
                                         "steps": (tc["steps"] - n_adapt) * runs,
                                         "steps_max": (top - n_adapt) * runs, "episodes": ec["count"],
                                         "adapts": ec["count"] if adapts else 0})
                if not sel:
                    continue
                trained = [a for a in m.study_arms(tc) if a in TRAINED_ARMS]  # selection: the first network only
                for _ in range(cfg["study"]["replicates"]):
                    steps = (top - n_adapt) * len(trained) * len(sel["lr"])
                    out.append(common | {"stage": "select", "batch": min(tc["batch_size"], select_ways(cfg) * shots),
                                         "steps": steps, "steps_max": steps, "episodes": sel["episodes"],
                                         "adapts": sel["episodes"] if adapts else 0})
    return out


def adapt_costs(path: Path, device: torch.device) -> dict[tuple[str, str, int], float]:
    """Seconds of one reference ``adapt`` per (backbone, method, input size), from ``path``'s runs on
    ``device``'s type."""
    costs = {}
    for run in json.loads(path.read_text()).values():
        if torch.device(run["device"]).type != device.type:
            continue
        for r in run["rows"]:
            if r["k"] == 1:
                costs[r["backbone"], r["method"], r.get("input_size", run["input_size"])] = r["mean_s"]
    return costs


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


def study_row(study: str, k: int, device: torch.device, adapt: dict[tuple[str, str, int], float]) -> dict[str, Any]:
    """One study config's costs (module docstring): per-step milliseconds, and per stage its cells, hours
    (arms, adapt, both; at the selection grid's largest steps) and largest job."""
    from pruneshot.config import load_config
    from pruneshot.data.registry import effective_shape

    cfg = load_config(ROOT / f"config/studies/{study}.yaml")
    bb, tc = cfg["backbone"], cfg["transfer"]
    channels, size, _w = effective_shape(cfg["data"]["source"]["dataset"], cfg["data"]["image"])
    cs = cells(cfg)
    per_unit = {}
    for batch, budget in sorted({(c["batch"], c["budget"]) for c in cs}):
        per_unit[batch, budget] = step_seconds(bb, channels, size, batch, tc["augment"] == "crop_flip", k,
                                               device, budget, cfg["budget"]["metric"])
        print(f"{study} {bb['name']} batch {batch} budget {budget:g}: {per_unit[batch, budget][0] * 1e3:.1f} "
              f"ms/step (batched K={k}: {per_unit[batch, budget][1] * 1e3:.1f} ms/step/network)", flush=True)

    def adapt_hours(c: dict[str, Any]) -> float:
        return c["adapts"] * adapt.get((bb["name"], c["method"], size), 0.0) / 3600

    def hours(c: dict[str, Any], steps: str = "steps", engine: int = 0) -> float:
        """One cell's hours: its arms' steps and its adapts."""
        return c["episodes"] * c[steps] * per_unit[c["batch"], c["budget"]][engine] / 3600 + adapt_hours(c)

    row: dict[str, Any] = {"study": study, "backbone": bb["name"], "image_size": size,
                           "ms_per_step": {f"batch{n}_b{b:g}": round(v[0] * 1e3, 2) for (n, b), v in per_unit.items()}}
    if k > 1:
        row["ms_per_step_batched"] = {f"batch{n}_b{b:g}": round(v[1] * 1e3, 2) for (n, b), v in per_unit.items()}
    row["adapt_not_measured"] = sorted({c["method"] for c in cs
                                        if c["adapts"] and (bb["name"], c["method"], size) not in adapt})
    for stage in ("transfer", "select"):
        sc = [c for c in cs if c["stage"] == stage]
        if not sc:
            continue
        worst = max(sc, key=lambda c: hours(c, "steps_max"))
        row[stage] = {"cells": len(sc),
                      "arms_hours": round(sum(hours(c) - adapt_hours(c) for c in sc), 1),
                      "adapt_hours": round(sum(adapt_hours(c) for c in sc), 1),
                      "hours": round(sum(hours(c) for c in sc), 1),
                      "hours_at_max_steps": round(sum(hours(c, "steps_max") for c in sc), 1),
                      "largest_job": {key: worst[key] for key in ("method", "budget", "shots")}
                      | {"hours": round(hours(worst), 2), "hours_at_max_steps": round(hours(worst, "steps_max"), 2)}}
        if k > 1:
            row[stage]["hours_batched"] = round(sum(hours(c, engine=1) for c in sc), 1)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--k", type=int, default=16,
                    help="networks per chunk of the batched engine (1: time the reference engine only)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    adapt = adapt_costs(ROOT / "benchmarks/results/adapt_seconds.json", device)
    rows = []
    for study in STUDIES:
        rows.append(study_row(study, args.k, device, adapt))
        print(json.dumps(rows[-1]), flush=True)
    out = args.out or ROOT / "benchmarks/results" / ("study_cost.json" if device.type == "cpu"
                                                     else f"study_cost_{device.type}.json")
    out.write_text(json.dumps({"what": __doc__.split("\n\n")[0], "command": "python benchmarks/study_cost.py "
                               f"--device {args.device} --k {args.k} --threads {args.threads}",
                               "device": str(device), "threads": args.threads,
                               "k": args.k, "torch": torch.__version__, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
