"""Benchmark the whole pipeline: wall time of a cold run and of a no-op rerun, per-job
overhead (process start to first training step), and the per-method results of the cold run
(accuracy, achieved params/FLOPs, search seconds), on a clean copy of this working tree.

    python benchmarks/pipeline.py [--config config/config.yaml] [--cores 2] [--out benchmarks/results/pipeline.json]

Writes a JSON file with the numbers (and prints it). Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pruneshot.config import load_config
from pruneshot.paths import for_config

ROOT = Path(__file__).resolve().parents[1]


def copy_tree(dst: Path) -> None:
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for f in filter(None, files):
        src = ROOT / f
        if src.is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f)


def timed(cmd: list[str], cwd: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def method_rows(results_csv: Path) -> list[dict]:
    """One entry per results row: method, side, source, budget, shots, arm, accuracy (%), cost ratios."""
    import csv

    out = []
    with open(results_csv, newline="") as f:
        for r in csv.DictReader(f):
            out.append({
                "method": r["method"], "side": r["side"], "source": r["method_source"],
                "budget": float(r["requested_budget"]), "shots": int(r["shots"]), "arm": r["arm"],
                "acc_pct": round(100 * float(r["acc_mean"]), 2), "ci95_pct": round(100 * float(r["acc_ci95"]), 2),
                "params_ratio": round(float(r["params_ratio"]), 4), "flops_ratio": round(float(r["flops_ratio"]), 4),
                "achieved_params": round(float(r["achieved_params"])),
                "achieved_flops": round(float(r["achieved_flops"])),
                "search_seconds": round(float(r["search_seconds"]), 3), "search_scope": r["search_scope"],
                "latency_ms_b1": float(r["latency_ms_b1"]) if r.get("latency_ms_b1") else None,
            })
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="config/config.yaml")
    ap.add_argument("--cores", default=str(os.cpu_count()))
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/pipeline.json"))
    args = ap.parse_args()
    snakemake = str(Path(sys.executable).parent / "snakemake")
    with tempfile.TemporaryDirectory(prefix="pruneshot-bench-") as tmp:
        work = Path(tmp)
        copy_tree(work)
        shutil.copy(ROOT / args.config, work / "config/config.yaml")
        subprocess.run(["git", "init", "-q"], cwd=work, check=True)
        cmd = [snakemake, "--cores", args.cores]
        cold = timed(cmd, work)
        rerun = timed(cmd, work)
        dry = timed([*cmd, "-n"], work)
        overheads = {}
        paths = for_config(load_config(work / "config/config.yaml"))
        res, logs = work / paths.results_root, work / paths.logs_root
        records = sorted((res / "transfer").glob("**/*.json")) + sorted((res / "pretrain").glob("*/metrics.json"))
        for path in records:
            rec = json.loads(path.read_text())
            if rec.get("overhead_s") is not None:
                overheads[str(path.relative_to(work))] = rec["overhead_s"]
        jobs = {}
        for tsv in (logs / "benchmarks").glob("**/*.tsv"):
            lines = tsv.read_text().splitlines()
            header, values = lines[0].split("\t"), lines[-1].split("\t")
            jobs[str(tsv.relative_to(logs / "benchmarks"))] = dict(zip(header, values, strict=False))
        n_jobs = len(jobs)
        methods = method_rows(work / paths.result("results_csv"))
    ov = list(overheads.values())
    result = {
        "config": args.config, "cores": args.cores, "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(), "nproc": os.cpu_count(),
        "cold_run_s": round(cold, 2), "noop_rerun_s": round(rerun, 2), "dry_run_s": round(dry, 2),
        "heavy_jobs_benchmarked": n_jobs,
        "overhead_process_start_to_first_step_s": {
            "median": round(statistics.median(ov), 2) if ov else None,
            "max": round(max(ov), 2) if ov else None, "n": len(ov)},
        "methods": methods,
        "job_wall_s": {k: float(v["s"]) for k, v in sorted(jobs.items())},
        "job_max_rss_mb": {k: float(v["max_rss"]) for k, v in sorted(jobs.items()) if v.get("max_rss") not in
                           (None, "-", "NA")},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if not k.startswith("job_")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
