"""Per-episode ``adapt`` seconds of the target-side methods (issue 16): basis_scaling, channel_scaling and
double_pruning on resnet56 and vgg16_bn.

Each episode: a seeded backbone (32x32 inputs, 10 source classes; BatchNorm statistics of random images),
a new seeded 5-way head, a 5-way 5-shot support set of random normalised images (25 images, drawn from
the episode's seed) and the method's default options at ``--budget`` of ``--metric``, exactly as the
transfer stage calls ``adapt`` (one ``AdaptContext`` per episode, on ``--device``). Wall seconds of
``adapt`` alone (the result comes back on the CPU, so a CUDA run is synchronised), per episode; the
backbone's construction and the head are not timed. An untimed warm-up (torch.optim's lazy import; on
CUDA one forward/backward) comes first. One command:

    python benchmarks/adapt_seconds.py                  # CPU, 1 thread, 2 episodes (about 5 min)
    python benchmarks/adapt_seconds.py --device cuda    # a GPU node

Writes benchmarks/results/adapt_seconds.json (``--out``; a run on another device is written under its
own key, earlier keys kept) and prints the table. Nothing here asserts a time.
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
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
BACKBONES = ("resnet56", "vgg16_bn")
METHODS = ("basis_scaling", "channel_scaling", "double_pruning")
WAYS, SHOTS, SIZE, SOURCE_CLASSES = 5, 5, 32, 10


def _backbone(name: str) -> torch.nn.Module:
    """A seeded ``name`` (eval mode) whose BatchNorm statistics are those of 256 random images."""
    from pruneshot.models.base import backbone_spec, build_seeded
    from pruneshot.training import recalibrate_bn

    model = build_seeded(backbone_spec({"name": name}, 3, SIZE, SOURCE_CLASSES), 0)
    x = torch.randn((256, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(99))
    recalibrate_bn(model, x, images=256, batch_size=64, seed=0)
    return model.eval()


def _warm_up(device: torch.device, model: torch.nn.Module) -> None:
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)  # imports torch._dynamo (~2 s), untimed
    if device.type == "cuda":
        m = copy.deepcopy(model).to(device)
        F.cross_entropy(m(torch.randn(WAYS * SHOTS, 3, SIZE, SIZE, device=device)),
                        torch.zeros(WAYS * SHOTS, dtype=torch.long, device=device)).backward()
        torch.cuda.synchronize(device)


def measure(device_name: str, episodes: int, budget: float, metric: str, log: Any = print) -> dict[str, Any]:
    """Seconds per episode of each (backbone, method): {"rows": [...]} (see the module docstring)."""
    from pruneshot.methods import AdaptContext, get_method
    from pruneshot.models.cost import cost

    device = torch.device(device_name)
    rows = []
    for bb in BACKBONES:
        dense = _backbone(bb)
        _warm_up(device, dense)
        for name in METHODS:
            seconds, ratios = [], []
            for ep in range(episodes):
                model = copy.deepcopy(dense)
                model.reset_classifier(WAYS, torch.Generator().manual_seed(1000 + ep))
                model.eval()
                gen = torch.Generator().manual_seed(2000 + ep)
                x = torch.randn((WAYS * SHOTS, 3, SIZE, SIZE), generator=gen)
                y = torch.arange(WAYS * SHOTS) % WAYS
                dense_cost = float(cost(model, metric))
                ctx = AdaptContext(model=model, budget=budget, metric=metric, support_x=x, support_y=y,
                                   seed=3000 + ep, dense_cost=dense_cost, device=device_name, log=lambda _m: None)
                torch.manual_seed(3000 + ep)
                t0 = time.perf_counter()
                res = get_method(name).adapt(ctx)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds.append(time.perf_counter() - t0)
                ratios.append(cost(res.model, metric) / dense_cost)
            rows.append({"backbone": bb, "method": name, "episodes": episodes, "seconds": seconds,
                         "mean_s": statistics.fmean(seconds), "achieved_ratio": ratios})
            each = ", ".join(f"{s:.2f}" for s in seconds)
            log(f"{bb:9s} {name:16s} {statistics.fmean(seconds):7.2f} s/episode  ({each})")
    return {"rows": rows}


def main() -> int:
    from pruneshot.training import device_description

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (the pipeline's transfer default is 1)")
    ap.add_argument("--episodes", type=int, default=2)
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--metric", default="params", choices=["params", "flops"])
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/adapt_seconds.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    result = measure(args.device, args.episodes, args.budget, args.metric)
    device = torch.device(args.device)
    result.update({"device": str(device), "device_name": device_description(device), "cpu_name": platform.processor(),
                   "threads": args.threads, "torch": torch.__version__, "budget": args.budget, "metric": args.metric,
                   "ways": WAYS, "shots": SHOTS, "input_size": SIZE, "options": "each method's defaults",
                   "total_seconds": time.perf_counter() - t0})
    out = Path(args.out)
    runs = json.loads(out.read_text()) if out.exists() else {}
    runs[f"{device.type}-{args.threads}t" if device.type == "cpu" else str(device)] = result
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(runs, indent=2) + "\n")
    print(f"wrote {out} ({result['total_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
