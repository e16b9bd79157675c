"""How much of the source task each source-side method's pruned network keeps, before any fine-tuning.

A sanity check for "method X transfers worse than the random control": if X keeps more source
validation accuracy than random at the same budget, its channel selection works as intended and
the transfer result is a property of the task, not a bug.

    python benchmarks/source_retention.py [--config config/config.yaml] [--out benchmarks/results/source_retention.json]

Pretrains the backbone with the config's settings (the pipeline's stage functions, in a temporary
directory), runs every source-side method at every budget, and writes the source validation
accuracy of each physically pruned network (no fine-tuning, no BN recalibration).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    from pruneshot.config import load_config
    from pruneshot.data.splits import load_split
    from pruneshot.io import read_json
    from pruneshot.methods import get_method
    from pruneshot.models.base import load_model
    from pruneshot.stages.data import prepare_source
    from pruneshot.stages.job import Job
    from pruneshot.stages.pretrain import pretrain
    from pruneshot.stages.search import search
    from pruneshot.training import accuracy

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default=str(ROOT / "config/config.yaml"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/source_retention.json"))
    args = ap.parse_args()
    cfg = load_config(args.config)
    out: dict = {"config": args.config, "rows": []}
    with tempfile.TemporaryDirectory(prefix="pruneshot-retention-") as tmp:
        t = Path(tmp)

        def job(rule: str) -> Job:
            return Job(rule=rule, wildcards={}, config={}, log_path=t / f"{rule}.log")

        cfg["data"]["cache_dir"] = str(t / "cache")
        prepare_source(cfg, t / "src", job("prepare_source"))
        pre = t / "pretrain"
        pretrain(cfg, 0, t / "src/manifest.json", pre / "model.safetensors", pre / "arch.json",
                        pre / "metrics.json", job("pretrain"))
        norm = read_json(t / "src/manifest.json")["normalization"]
        val = load_split(t / "src/manifest.json", "val", norm)
        dense = load_model(str(pre / "model.safetensors"), read_json(pre / "arch.json"))
        out["dense_source_val_acc"] = accuracy(dense, val.x, val.y)
        for name in cfg["methods"]:
            method = get_method(name)
            if method.side != "source" or method.budget_free:
                continue
            for budget in cfg["budget"]["levels"]:
                d = t / "search" / name / str(budget)
                t0 = time.perf_counter()
                rec = search(cfg, name, float(budget), 0, t / "src/manifest.json", pre / "model.safetensors",
                                    pre / "arch.json", pre / "metrics.json", d / "model.safetensors", d / "arch.json",
                                    d / "record.json", job(f"search_{name}_{budget}"))
                pruned = load_model(str(d / "model.safetensors"), read_json(d / "arch.json"))
                row = {"method": name, "budget": budget, "params_ratio": round(rec["params_ratio"], 4),
                       "source_val_acc": round(accuracy(pruned, val.x, val.y), 4),
                       "seconds": round(time.perf_counter() - t0, 2)}
                out["rows"].append(row)
                print(json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"dense source val acc {out['dense_source_val_acc']:.4f}; written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
