"""Per-episode ``adapt`` seconds of the target-side methods (issue 16): basis_scaling, channel_scaling and
double_pruning on resnet56 and vgg16_bn (resnet20 on request).

Each episode: a seeded backbone (``--size`` x ``--size`` inputs, 10 source classes; BatchNorm statistics of
random images), a new seeded 5-way head, a 5-way 5-shot support set of random normalised images (25
images, drawn from the episode's seed) and the method's default options at ``--budget`` of ``--metric``,
exactly as the transfer stage calls ``adapt`` (one ``AdaptContext`` per episode, on ``--device``). Wall
seconds of ``adapt`` alone (the result comes back on the CPU, so a CUDA run is synchronised), per episode;
the backbone's construction and the head are not timed. An untimed warm-up (torch.optim's lazy import; on
CUDA one forward/backward) comes first. ``--ks``: each (backbone, method) is timed at every chunk size K
in turn, on the same episodes, in one run: K = 1 is the reference path (``adapt`` of one episode, what
the transfer stage runs at ``transfer.episode_batch: 1``), K > 1 adapts chunks of K through
``method.adapt_batch``; per-episode seconds = a chunk's seconds / its size. One command:

    python benchmarks/adapt_seconds.py --ks 1 8 --episodes 8            # CPU, 1 thread (about 10 min)
    python benchmarks/adapt_seconds.py --ks 1 8 --episodes 8 --backbones resnet20 --size 28
    python benchmarks/adapt_seconds.py --device cuda --ks 1 16 --episodes 16   # a GPU node

Writes benchmarks/results/adapt_seconds.json (``--out``; one key per device, threads and size, earlier
keys kept; every row carries its ``k``) and prints the table. Nothing here asserts a time.
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
OTHER_BACKBONES = ("resnet20",)
METHODS = ("basis_scaling", "channel_scaling", "double_pruning")
WAYS, SHOTS, SOURCE_CLASSES = 5, 5, 10


def _backbone(name: str, size: int) -> torch.nn.Module:
    """A seeded ``name`` at ``size`` x ``size`` inputs (eval mode), BatchNorm statistics of 256 random images."""
    from pruneshot.models.base import backbone_spec, build_seeded
    from pruneshot.training import recalibrate_bn

    model = build_seeded(backbone_spec({"name": name}, 3, size, SOURCE_CLASSES), 0)
    x = torch.randn((256, 3, size, size), generator=torch.Generator().manual_seed(99))
    recalibrate_bn(model, x, images=256, batch_size=64, seed=0)
    return model.eval()


def _warm_up(device: torch.device, model: torch.nn.Module, size: int) -> None:
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)  # imports torch._dynamo (~2 s), untimed
    if device.type == "cuda":
        m = copy.deepcopy(model).to(device)
        F.cross_entropy(m(torch.randn(WAYS * SHOTS, 3, size, size, device=device)),
                        torch.zeros(WAYS * SHOTS, dtype=torch.long, device=device)).backward()
        torch.cuda.synchronize(device)


def _context(dense: torch.nn.Module, ep: int, budget: float, metric: str, device_name: str, size: int) -> Any:
    """Episode ``ep``'s AdaptContext: its own head, support set and seed (untimed)."""
    from pruneshot.methods import AdaptContext
    from pruneshot.models.cost import cost

    model = copy.deepcopy(dense)
    model.reset_classifier(WAYS, torch.Generator().manual_seed(1000 + ep))
    model.eval()
    gen = torch.Generator().manual_seed(2000 + ep)
    x = torch.randn((WAYS * SHOTS, 3, size, size), generator=gen)
    y = torch.arange(WAYS * SHOTS) % WAYS
    return AdaptContext(model=model, budget=budget, metric=metric, support_x=x, support_y=y, seed=3000 + ep,
                        dense_cost=float(cost(model, metric)), device=device_name, log=lambda _m: None)


def _time_chunks(method: Any, dense: torch.nn.Module, episodes: int, k: int, budget: float, metric: str,
                 device: torch.device, size: int) -> tuple[list[float], list[float]]:
    """Each episode's seconds (its share of its chunk of ``k``) and achieved cost ratio."""
    from pruneshot.models.cost import cost

    seconds, ratios = [], []
    for start in range(0, episodes, k):
        chunk = [_context(dense, ep, budget, metric, str(device), size)
                 for ep in range(start, min(episodes, start + k))]
        t0 = time.perf_counter()
        if k == 1:  # the reference path, as the transfer stage runs it at episode_batch 1
            torch.manual_seed(chunk[0].seed)
            results = [method.adapt(chunk[0])]
        else:
            results = method.adapt_batch(chunk)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        share = (time.perf_counter() - t0) / len(chunk)
        seconds += [share] * len(chunk)
        ratios += [cost(r.model, metric) / c.dense_cost for r, c in zip(results, chunk, strict=True)]
    return seconds, ratios


def measure(device_name: str, episodes: int, budget: float, metric: str, ks: tuple[int, ...] = (1,),
            backbones: tuple[str, ...] = BACKBONES, methods: tuple[str, ...] = METHODS, size: int = 32,
            log: Any = print) -> dict[str, Any]:
    """Seconds per episode of each (backbone, method) at each chunk size of ``ks`` (timed one after the
    other on the same episodes): {"rows": [...]} (``seconds`` lists each episode's share of its chunk;
    ``speedup``: the K = 1 row's mean over this row's, where ``ks`` has 1)."""
    from pruneshot.methods import get_method

    device = torch.device(device_name)
    rows = []
    for bb in backbones:
        dense = _backbone(bb, size)
        _warm_up(device, dense, size)
        for name in methods:
            method = get_method(name)
            reference = None
            for k in ks:
                seconds, ratios = _time_chunks(method, dense, episodes, k, budget, metric, device, size)
                mean = statistics.fmean(seconds)
                reference = mean if k == 1 else reference
                rows.append({"backbone": bb, "method": name, "k": k, "episodes": episodes, "input_size": size,
                             "seconds": seconds, "mean_s": mean, "achieved_ratio": ratios}
                            | ({"speedup": reference / mean} if reference is not None else {}))
                each = ", ".join(f"{s:.2f}" for s in seconds[::k])
                log(f"{bb:9s} {name:16s} k={k:<3d} {mean:7.2f} s/episode  (per chunk: {each})")
    return {"rows": rows}


def main() -> int:
    from pruneshot.training import device_description

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (the pipeline's transfer default is 1)")
    ap.add_argument("--episodes", type=int, default=2)
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--metric", default="params", choices=["params", "flops"])
    ap.add_argument("--ks", nargs="+", type=int, default=[1],
                    help="episodes per adapt_batch chunk, each timed in turn (1: adapt, the reference)")
    ap.add_argument("--size", type=int, default=32, help="input height and width")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=BACKBONES + OTHER_BACKBONES)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/adapt_seconds.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if min(args.ks) < 1:
        ap.error("--ks must be >= 1")
    result = measure(args.device, args.episodes, args.budget, args.metric, tuple(args.ks), tuple(args.backbones),
                     tuple(args.methods), args.size)
    device = torch.device(args.device)
    result.update({"device": str(device), "device_name": device_description(device), "cpu_name": platform.processor(),
                   "threads": args.threads, "torch": torch.__version__, "budget": args.budget, "metric": args.metric,
                   "ks": args.ks, "ways": WAYS, "shots": SHOTS, "input_size": args.size,
                   "options": "each method's defaults",
                   "total_seconds": time.perf_counter() - t0})
    out = Path(args.out)
    runs = json.loads(out.read_text()) if out.exists() else {}
    key = (f"{device.type}-{args.threads}t" if device.type == "cpu" else str(device)) + f"-{args.size}px"
    if set(args.methods) != set(METHODS) or set(args.backbones) != set(BACKBONES):
        key += "-" + "+".join(args.backbones) + "-" + "+".join(args.methods)
    runs[key] = result
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(runs, indent=2) + "\n")
    print(f"wrote {out} ({result['total_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
