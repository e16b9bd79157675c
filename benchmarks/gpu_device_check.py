"""Searches and adapts on a device vs the CPU (issue 16): same seeds, same results up to float rounding?

For every source-side method with a loop over source batches (slimming, dnal, dap, taylor, scratch) and
every target-side method (basis_scaling, channel_scaling, double_pruning in both orders), on a resnet20
with random seeded weights and random normalised images, runs the search / adapt once with
``device="cpu"`` and once with ``--device`` from the same seeds (every random draw is made on the CPU,
so only the device's arithmetic differs), and writes per method:

- ``seconds``: wall seconds of the search / adapt on each device (the device run after an untimed
  warm-up of the device; synchronised, as the result is returned on the CPU);
- ``kept_agreement``: the share of the CPU run's kept units the device run also keeps (channels per
  group; basis_scaling: bases, as min(kept rank) per layer); 1.0 = the same architecture;
- ``same_architecture``: the two returned networks have the same spec;
- ``eval``: accuracy (fraction) and mean cross-entropy of each returned network on held-out images (the
  source validation images for a search, the episode's query images for an adapt) and their differences;
  ``max_logit_diff``: max |logit difference| on them when the architectures are equal.

With ``--device cpu`` the second run is on the CPU again: every agreement must then be exact (a
determinism check). Imports only torch and pruneshot's methods, models and data modules (no Snakemake,
MLflow or DVC). One command:

    python benchmarks/gpu_device_check.py --device cuda            # on a GPU node (resnet20, 32x32)
    python benchmarks/gpu_device_check.py --device cpu --small     # anywhere, < 1 min (resnet20, 8x8)

Writes benchmarks/results/gpu_device_check.json (``--out``) and prints a summary. Nothing here asserts.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]

SOURCE = ("slimming", "dnal", "dap", "taylor", "scratch")
TARGET = (("basis_scaling", {}), ("channel_scaling", {}), ("double_pruning", {}),
          ("double_pruning", {"order": "basis_first"}))


def _settings(small: bool) -> dict[str, Any]:
    """Sizes and the source methods' options: short schedules (a check, not a study)."""
    if small:
        return {"size": 8, "n_source": 96, "n_val": 32, "classes": 5, "ways": 5, "shots": 5, "queries": 5,
                "source_options": {"slimming": {"epochs": 1, "min_steps": 4, "batch_size": 32},
                                   "dnal": {"arch_epochs": 2, "search_steps": 2, "batch_size": 32},
                                   "dap": {"steps": 6, "batch_size": 32}, "taylor": {"batches": 2, "batch_size": 32},
                                   "scratch": {}},
                "recipe": {"epochs": 1, "batch_size": 32, "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4,
                           "patience": 1},
                "target_options": {"basis_scaling": {"rounds": 2, "steps_per_round": 2},
                                   "channel_scaling": {"rounds": 2, "steps_per_round": 3}}}
    return {"size": 32, "n_source": 1024, "n_val": 256, "classes": 10, "ways": 5, "shots": 5, "queries": 15,
            "source_options": {"slimming": {"epochs": 1, "min_steps": 60},
                               "dnal": {"arch_epochs": 3, "search_steps": 2}, "dap": {"steps": 60}, "taylor": {},
                               "scratch": {}},
            "recipe": {"epochs": 2, "batch_size": 128, "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4,
                       "patience": 2},
            "target_options": {}}


def _images(n: int, size: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n random normalised images (n, 3, size, size) float32 and labels (n,) in [0, classes), on the CPU."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((n, 3, size, size), generator=gen), torch.arange(n) % classes


def _pretrained(size: int, classes: int) -> torch.nn.Module:
    """A seeded resnet20 (eval mode) whose BatchNorm statistics are those of random images (not the init's)."""
    from pruneshot.models.base import backbone_spec, build_seeded
    from pruneshot.training import recalibrate_bn

    model = build_seeded(backbone_spec({"name": "resnet20"}, 3, size, classes), 0)
    recalibrate_bn(model, _images(256, size, classes, 99)[0], images=256, batch_size=64, seed=0)
    return model.eval()


@torch.no_grad()
def _evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float, torch.Tensor]:
    """(accuracy, mean cross-entropy, logits) of ``model`` (eval mode, CPU) on (x, y)."""
    logits = model.eval()(x)
    return float((logits.argmax(1) == y).float().mean()), float(F.cross_entropy(logits, y)), logits


def _agreement(ref: Any, other: Any) -> float | None:
    """Share of ``ref``'s kept units also kept in ``other`` (keep dicts of channel indices, or rank dicts)."""
    if not ref or not other:
        return None
    if all(isinstance(v, int) for v in ref.values()):  # kept ranks per layer
        return sum(min(ref[g], other.get(g, 0)) for g in ref) / max(1, sum(ref.values()))
    return sum(len(set(ref[g]) & set(other.get(g, []))) for g in ref) / max(1, sum(len(v) for v in ref.values()))


def _kept(res: Any) -> Any:
    if res.keep is not None:
        return res.keep
    return res.info.get("kept_ranks") or res.info.get("widths")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _warm_up(device: torch.device, size: int) -> None:
    """One forward/backward of a resnet20 on ``device`` (CUDA context, cuDNN and allocator set up) and
    torch.optim's lazy import of torch._dynamo (~2 s), untimed."""
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    if device.type == "cpu":
        return
    from pruneshot.models.base import backbone_spec, build_seeded

    model = build_seeded(backbone_spec({"name": "resnet20"}, 3, size, 10), 1).to(device)
    x = torch.randn(32, 3, size, size, device=device)
    F.cross_entropy(model(x), torch.zeros(32, dtype=torch.long, device=device)).backward()
    _sync(device)


def _compare(name: str, runs: dict[str, tuple[Any, float]], x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    (ref, t_ref), (dev, t_dev) = runs["cpu"], runs["device"]
    acc_r, loss_r, log_r = _evaluate(ref.model, x, y)
    acc_d, loss_d, log_d = _evaluate(dev.model, x, y)
    same = ref.model.spec == dev.model.spec
    return {"method": name, "seconds": {"cpu": t_ref, "device": t_dev},
            "kept_agreement": _agreement(_kept(ref), _kept(dev)), "same_architecture": same,
            "eval": {"cpu": {"acc": acc_r, "loss": loss_r}, "device": {"acc": acc_d, "loss": loss_d},
                     "acc_diff": acc_d - acc_r, "loss_diff": loss_d - loss_r,
                     "max_logit_diff": float((log_d - log_r).abs().max()) if same else None}}


def _summary(row: dict[str, Any]) -> str:
    """One printed line of a row: seconds, kept agreement, accuracy and loss differences."""
    return (f"{row['method']}: {row['seconds']}, kept agreement {row['kept_agreement']}, "
            f"acc diff {row['eval']['acc_diff']:+.4f}, loss diff {row['eval']['loss_diff']:+.2e}")


def check(device_name: str, small: bool, threads: int, log: Any = print) -> dict[str, Any]:
    """Run every method on the CPU and on ``device_name``; the rows described in the module docstring."""
    from pruneshot.data.splits import Split
    from pruneshot.methods import AdaptContext, SearchContext, get_method
    from pruneshot.models.cost import cost

    torch.set_num_threads(threads)
    st = _settings(small)
    device = torch.device(device_name)
    size = st["size"]
    dense = _pretrained(size, st["classes"])
    train = Split(*_images(st["n_source"], size, st["classes"], 1))
    val = Split(*_images(st["n_val"], size, st["classes"], 2))
    _warm_up(device, size)
    rows = []
    for name in SOURCE:
        runs = {}
        for which, dev in (("cpu", "cpu"), ("device", device_name)):
            ctx = SearchContext(model=copy.deepcopy(dense), budget=0.5, metric="flops", source_train=train,
                                source_val=val, seed=11, options=dict(st["source_options"][name]),
                                recipe={**st["recipe"], "threads": threads}, device=dev, log=lambda _m: None)
            torch.manual_seed(123)
            t0 = time.perf_counter()
            res = get_method(name).search(ctx)
            _sync(device)
            runs[which] = (res, time.perf_counter() - t0)
        rows.append({"side": "source", **_compare(name, runs, val.x, val.y)})
        log(_summary(rows[-1]))
    ways, shots, queries = st["ways"], st["shots"], st["queries"]
    support = _images(ways * shots, size, ways, 3)
    query = _images(ways * queries, size, ways, 4)
    for name, extra in TARGET:
        label = name + ("" if not extra else "-" + "-".join(str(v) for v in extra.values()))
        options = {**extra, **st["target_options"].get(name, {})}
        if name == "double_pruning":
            options.update({k: dict(v) for k, v in st["target_options"].items()})
        runs = {}
        for which, dev in (("cpu", "cpu"), ("device", device_name)):
            model = copy.deepcopy(dense)
            model.reset_classifier(ways, torch.Generator().manual_seed(5))
            model.eval()
            ctx = AdaptContext(model=model, budget=0.5, metric="flops", support_x=support[0], support_y=support[1],
                               seed=7, dense_cost=float(cost(model, "flops")), options=options, device=dev,
                               log=lambda _m: None)
            torch.manual_seed(77)
            t0 = time.perf_counter()
            res = get_method(name).adapt(ctx)
            _sync(device)
            runs[which] = (res, time.perf_counter() - t0)
        rows.append({"side": "target", **_compare(label, runs, *query)})
        log(_summary(rows[-1]))
    from pruneshot.training import device_description

    return {"device": str(device), "device_name": device_description(device), "cpu_name": platform.processor(),
            "torch": torch.__version__, "threads": threads, "small": small, "backbone": "resnet20",
            "input_size": size, "settings": st, "rows": rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="the device compared with the CPU (default: cuda when available)")
    ap.add_argument("--small", action="store_true", help="8x8 inputs, tiny schedules (a CPU smoke run)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (the pipeline's default is 1)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/gpu_device_check.json"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    result = check(args.device, args.small, args.threads)
    result["total_seconds"] = time.perf_counter() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out} ({result['total_seconds']:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
