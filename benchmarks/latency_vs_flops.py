"""Measured latency speed-up of pruned backbones against their FLOPs reduction.

For each backbone (CIFAR shape 3x32x32, 100 classes) the dense network and physically pruned
copies are timed (inference mode, warm-up, median of repeated passes, CUDA synchronised):
- ``channel``: every channel group keeps the same fraction of its channels (the L1-filter
  layout: top-|w| filters), for each ``--keep`` fraction;
- ``basis``: every conv (depthwise excepted) is decomposed and keeps that fraction of its bases
  (largest singular values), folded into low-rank layers where they are smaller.
Speed-up = dense median / pruned median; FLOPs reduction = dense FLOPs / pruned FLOPs (both
theoretical and measured are written; nothing is asserted).

    python benchmarks/latency_vs_flops.py [--device cpu|cuda] [--backbones resnet56 vgg16_bn ...]
        [--batch-sizes 1 256] [--keep 0.75 0.5 0.25] [--repeats 20] [--out benchmarks/results/latency_vs_flops.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from pruneshot.models import base as models  # noqa: E402
from pruneshot.models import cost as metrics  # noqa: E402
from pruneshot.models import latency  # noqa: E402
from pruneshot.models.basis import basis_layers, decompose, fold_network  # noqa: E402
from pruneshot.runtime.provenance import device_name  # noqa: E402


def channel_pruned(model: models.Backbone, keep: float) -> models.Backbone:
    """Every group keeps its ``keep`` fraction (at least one) of channels with the largest filter L1 norm."""
    out = {}
    for g, convs in model.group_convs().items():
        n = model.channel_groups()[g]
        scores = torch.stack([c.weight.detach().abs().flatten(1).sum(1) for c in convs]).sum(0)
        out[g] = torch.argsort(-scores, stable=True)[: max(1, round(keep * n))]
    return model.pruned(out).eval()


def basis_pruned(model: models.Backbone, keep: float) -> models.Backbone:
    """Every decomposed conv keeps its ``keep`` fraction (at least one) of bases, largest singular values first."""
    masked = decompose(model)
    for layer in basis_layers(masked).values():
        k = max(1, round(keep * layer.rank))
        layer.prune(torch.arange(k, layer.rank))  # singular values are sorted descending
    return fold_network(masked, revert_when_larger=True).eval()


def time_model(model: torch.nn.Module, shape: tuple[int, ...], batch_sizes: list[int], device: str,
               warmup: int, repeats: int) -> dict[str, float]:
    return {str(bs): round(latency.measure_latency(model, shape, bs, device=device, warmup=warmup,
                                                   repeats=repeats)["median_ms"], 4) for bs in batch_sizes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backbones", nargs="+", default=["resnet20", "resnet56", "vgg16_bn", "mobilenetv2"])
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=None,
                    help="default: 1 and 256 on CUDA, 1 and 32 on CPU")
    ap.add_argument("--keep", nargs="+", type=float, default=[0.75, 0.5, 0.25])
    ap.add_argument("--families", nargs="+", default=["channel", "basis"])
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/latency_vs_flops.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batch_sizes = args.batch_sizes or ([1, 256] if args.device.startswith("cuda") else [1, 32])
    shape = (3, 32, 32)
    rows = []
    t_start = time.perf_counter()
    for name in args.backbones:
        torch.manual_seed(0)
        dense = models.build_model(models.backbone_spec({"name": name}, 3, 32, 100)).eval()
        d_flops, d_params = metrics.cost(dense, "flops"), metrics.cost(dense, "params")
        d_ms = time_model(dense, shape, batch_sizes, args.device, args.warmup, args.repeats)
        rows.append({"backbone": name, "family": "dense", "keep": 1.0, "params": d_params, "flops": d_flops,
                     "median_ms": d_ms})
        print(f"{name} dense: {d_flops / 1e6:.1f} MFLOPs, {d_ms} ms", flush=True)
        for family in args.families:
            for keep in args.keep:
                pruned = (channel_pruned if family == "channel" else basis_pruned)(dense.cpu(), keep)
                flops = metrics.cost(pruned, "flops")
                ms = time_model(pruned, shape, batch_sizes, args.device, args.warmup, args.repeats)
                row = {"backbone": name, "family": family, "keep": keep, "params": metrics.cost(pruned, "params"),
                       "flops": flops, "median_ms": ms, "flops_reduction": round(d_flops / flops, 3),
                       "speedup": {bs: round(d_ms[bs] / ms[bs], 3) for bs in ms}}
                rows.append(row)
                print(f"{name} {family} keep {keep}: FLOPs x{row['flops_reduction']} speed-up {row['speedup']}",
                      flush=True)
    result = {
        "benchmark": "latency_vs_flops",
        "device": args.device, "device_name": device_name(args.device),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
        "input_shape": list(shape), "num_classes": 100, "batch_sizes": batch_sizes, "warmup": args.warmup,
        "repeats": args.repeats, "dtype": "float32", "seconds": round(time.perf_counter() - t_start, 1),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
