"""Per-episode accuracies of two runs of one study's transfer jobs, e.g. the reference engine
(``transfer.episode_batch: 1``) against chunks (``transfer.episode_batch: 20``), compared cell by cell.

    python benchmarks/episode_batch_equivalence.py REF_TRANSFER_DIR NEW_TRANSFER_DIR [--out FILE]

The default's float64 comparison (README), in a clean worktree of the commit (about 30 minutes on one core):

    printf 'transfer:\n  dtype: float64\n  episode_batch: 1\n' > /tmp/k1.yaml
    printf 'transfer:\n  dtype: float64\n  episode_batch: 20\n' > /tmp/k20.yaml
    snakemake --cores 1 --configfile config/config.yaml /tmp/k1.yaml
    cp -r results/mnist10k_default/transfer /tmp/ref_transfer
    snakemake --cores 1 --configfile config/config.yaml /tmp/k20.yaml   # reruns transfer and what reads it
    python benchmarks/episode_batch_equivalence.py /tmp/ref_transfer results/mnist10k_default/transfer \
        --out benchmarks/results/episode_batch_equivalence_float64.json

Each directory is a study's ``results/<study>/transfer`` (a copy of the first run's, since the second
run rewrites it). For every transfer record in both: per arm, whether every episode's accuracy (and
every network's, for random's several masks) is identical, the largest difference, and the chunk
size each used. A cell that failed (or ran no episode) in either run compares nothing: it is counted
as ``not_compared`` with its status and error, never as identical. Writes
benchmarks/results/episode_batch_equivalence.json (``--out``) and prints a summary; exits 1 when any
accuracy differs, a record is missing or a cell was not compared.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def compare(ref_dir: Path, new_dir: Path) -> dict:
    """Per (record, arm): identical or not, the largest per-episode difference, the chunk sizes used."""
    rows, missing = [], []
    for ref_path in sorted(ref_dir.rglob("*.json")):
        rel = ref_path.relative_to(ref_dir)
        new_path = new_dir / rel
        if not new_path.exists():
            missing.append(rel.as_posix())
            continue
        ref, new = json.loads(ref_path.read_text()), json.loads(new_path.read_text())
        for arm, r in ref["arms"].items():
            a = [(e["episode"], e["accuracy"], e.get("network_accuracies")) for e in r["episodes"]]
            b = [(e["episode"], e["accuracy"], e.get("network_accuracies")) for e in new["arms"][arm]["episodes"]]
            diff = max((abs(x[1] - y[1]) for x, y in zip(a, b, strict=True)), default=0.0) if len(a) == len(b) else None
            compared = ref["status"] == new["status"] == "ok" and len(a) > 0
            rows.append({"record": rel.as_posix(), "method": ref["method"], "side": ref["side"], "arm": arm,
                         "status": [ref["status"], new["status"]],
                         "error": [ref.get("error", ""), new.get("error", "")], "episodes": len(a),
                         "compared": compared, "identical": compared and a == b,
                         "max_abs_diff": diff, "episode_batch": [ref["device"].get("episode_batch", 1),
                                                                 new["device"].get("episode_batch", 1)]})
    return {"cells": len(rows), "compared": sum(r["compared"] for r in rows),
            "identical": sum(r["identical"] for r in rows),
            "differing": [r for r in rows if r["compared"] and not r["identical"]],
            "not_compared": [{k: r[k] for k in ("record", "arm", "status", "error")}
                             for r in rows if not r["compared"]],
            "missing": missing, "rows": rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ref", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/episode_batch_equivalence.json")
    args = ap.parse_args()
    result = compare(args.ref, args.new)
    args.out.write_text(json.dumps({"what": __doc__.split("\n\n")[0], **result}, indent=1) + "\n")
    print(f"{result['identical']} of {result['compared']} compared (record, arm) cells identical episode by "
          f"episode; {len(result['differing'])} differ; {len(result['not_compared'])} of {result['cells']} not "
          f"compared (failed or empty in a run); {len(result['missing'])} records missing in the second run; "
          f"wrote {args.out}")
    return 0 if not (result["differing"] or result["missing"] or result["not_compared"]) else 1


if __name__ == "__main__":
    sys.exit(main())
