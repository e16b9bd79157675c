"""Why training.SGD exists: the first ``torch.optim.SGD`` of a process imports ``torch._dynamo``.

Times, in fresh processes (``--repeats`` each), constructing the first optimiser and taking one step
with ``torch.optim.SGD`` and with ``pruneshot.training.SGD``, and the two updates' equality. Writes
``benchmarks/results/sgd_import.json``; the ratio is the extra seconds per transfer job."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results" / "sgd_import.json"
PROBE = """
import time, json, torch
from pruneshot.training import SGD
w = torch.nn.Parameter(torch.ones(4))
t0 = time.perf_counter()
opt = torch.optim.SGD([w], lr=0.1, momentum=0.9) if "{kind}" == "torch" else SGD([w], lr=0.1, momentum=0.9)
(w * w).sum().backward()
opt.step()
print(json.dumps({{"seconds": time.perf_counter() - t0, "dynamo": "torch._dynamo" in __import__("sys").modules,
                  "w": w.detach().tolist()}}))
"""


def probe(kind: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE.format(kind=kind)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    runs = {kind: [probe(kind) for _ in range(args.repeats)] for kind in ("torch", "pruneshot")}
    med = {k: statistics.median(r["seconds"] for r in v) for k, v in runs.items()}
    result = {
        "repeats": args.repeats, "torch_version": __import__("torch").__version__,
        "first_step_seconds_median": med,
        "extra_seconds_torch_optim": med["torch"] - med["pruneshot"],
        "ratio_torch_over_pruneshot": med["torch"] / med["pruneshot"],
        "imports_dynamo": {k: v[0]["dynamo"] for k, v in runs.items()},
        "same_update": runs["torch"][0]["w"] == runs["pruneshot"][0]["w"],
    }
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
