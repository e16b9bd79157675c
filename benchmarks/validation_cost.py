"""What config/studies/mnist10k_validation.yaml costs on this machine, extrapolated from a finished run of
the embedded default (the same methods, data and backbone at 14x14, 20 episodes, 1 replicate).

    python benchmarks/validation_cost.py [--default-root .] [--out benchmarks/results/validation_cost.json]

Measures one fine-tuning step of small_cnn [32, 64, 128] at 14x14 and 28x28 for a 1-shot (5 images) and
a 5-shot (25 images) support batch (60 steps, median of 3 runs, 1 thread), then scales every transfer
job's own seconds of the default run (logs/<study>/benchmarks/transfer/**.tsv, minus the measured
start-up) by episodes (200 / 20), image size (the step-time ratio of its shots) and replicates (3), and
adds the methods the default leaves out (taylor, fpgm: each costed as l1_filter, a network of the same
widths). Searches and pretraining are scaled by the 5-shot ratio and the replicates. The result is an
estimate (no run of the study itself), in job-seconds and in wall hours on 2 cores (jobs run 2 at a time).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import time
from pathlib import Path

import torch
import yaml

from pruneshot.models.base import backbone_spec, build_model
from pruneshot.training import finetune_episode


def step_seconds(size: int, n: int, steps: int = 60, repeats: int = 3) -> float:
    """Median seconds of one fine-tuning step of small_cnn [32, 64, 128] on n images of size x size."""
    times = []
    for r in range(repeats):
        model = build_model(backbone_spec({"name": "small_cnn", "widths": [32, 64, 128]}, 1, size, 5))
        x, y = torch.randn(n, 1, size, size), torch.arange(n) % 5
        t0 = time.perf_counter()
        finetune_episode(model, x, y, arm="finetune", steps=steps, lr=0.01, momentum=0.9, weight_decay=5e-4,
                         batch_size=25, seed=r)
        times.append((time.perf_counter() - t0) / steps)
    return statistics.median(times)


def job_seconds(root: Path, study: str, rule: str) -> dict[str, float]:
    """{benchmark file (relative): seconds} of one rule's finished jobs."""
    base = root / "logs" / study / "benchmarks" / rule
    out = {}
    for p in sorted(base.rglob("*.tsv")):
        with open(p) as f:
            out[str(p.relative_to(base))] = float(list(csv.DictReader(f, delimiter="\t"))[-1]["s"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--default-root", type=Path, default=Path("."), help="a checkout with a finished default run")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/validation_cost.json"))
    ap.add_argument("--startup", type=float, default=2.8, help="seconds of a transfer job before its first step")
    args = ap.parse_args()
    torch.set_num_threads(1)
    val = yaml.safe_load(Path("config/studies/mnist10k_validation.yaml").read_text())
    default = yaml.safe_load((args.default_root / "config/config.yaml").read_text())
    study = default["study"]["name"]
    steps = {(s, n): step_seconds(s, n) for s in (14, 28) for n in (5, 25)}
    ratio = {1: steps[28, 5] / steps[14, 5], 5: steps[28, 25] / steps[14, 25]}
    episodes = val["episodes"]["count"] / default["episodes"]["count"]
    reps = val["study"]["replicates"] / default["study"]["replicates"]
    transfer = job_seconds(args.default_root, study, "transfer")
    est_transfer, per_method = 0.0, {}
    for rel, s in transfer.items():
        method, shots = rel.split("/")[1], int(rel.split("/")[3].removesuffix("shot"))
        work = max(0.0, s - args.startup) * episodes * ratio[shots] * reps + args.startup * reps
        per_method[method] = per_method.get(method, 0.0) + work
        est_transfer += work
    extra = [m for m in val["methods"] if m not in default["methods"]]
    for m in extra:  # taylor, fpgm: a network of l1_filter's widths, the same transfer work
        per_method[m] = per_method.get("l1_filter", 0.0)
        est_transfer += per_method[m]
    searches = sum(job_seconds(args.default_root, study, "search").values()) * ratio[5] * reps
    pretrain = sum(job_seconds(args.default_root, study, "pretrain").values()) * ratio[5] * reps
    profile = sum(job_seconds(args.default_root, study, "profile").values()) * reps
    total = est_transfer + searches + pretrain + profile
    out = {
        "what": "extrapolated cost of config/studies/mnist10k_validation.yaml from a finished default run",
        "default_run_job_seconds": {r: round(sum(job_seconds(args.default_root, study, r).values()), 1)
                                    for r in ("transfer", "search", "pretrain", "profile")},
        "step_seconds_1thread": {f"{s}x{s}_batch{n}": round(v, 5) for (s, n), v in steps.items()},
        "size_ratio_28_over_14": {f"{k}-shot": round(v, 3) for k, v in ratio.items()},
        "scale": {"episodes": episodes, "replicates": reps, "methods_added": extra},
        "estimate_job_seconds": {"transfer": round(est_transfer), "search": round(searches),
                                 "pretrain": round(pretrain), "profile": round(profile), "total": round(total)},
        "transfer_job_seconds_by_method": {m: round(v) for m, v in sorted(per_method.items(), key=lambda x: -x[1])},
        "estimate_wall_hours_2_cores": round(total / 2 / 3600, 2),
        "torch_threads": torch.get_num_threads(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
