"""Compare two results tables cell by cell: the same cells, and in every given column the same value.

    python benchmarks/compare_results.py BEFORE.csv AFTER.csv [--out FILE]

Cells are matched on (method, requested_budget, target, shots, arm, replicate). Floats must be equal
exactly (CPU runs are bitwise deterministic). Prints one line per column (equal cells / cells) and
every difference; exit status 1 when anything differs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

KEY = ["method", "requested_budget", "target", "shots", "arm", "replicate"]
COLUMNS = ["acc_mean", "acc_ci95", "acc_std", "n_episodes", "params_ratio", "flops_ratio", "budget_gap",
           "achieved_params", "achieved_flops", "dense_params", "dense_flops", "checkpoint_sha256",
           "pretrain_sha256", "data_sha256", "seed_pretrain", "seed_search", "seed_episode", "seed_finetune",
           "side", "method_source", "search_scope", "status"]


def compare(before: Path, after: Path) -> tuple[list[str], bool]:
    a, b = (pd.read_csv(p, dtype={"seed_finetune": str, "row_id": str}).set_index(KEY).sort_index()
            for p in (before, after))
    lines = [f"before: {before} ({len(a)} rows)", f"after:  {after} ({len(b)} rows)"]
    same = set(a.index) == set(b.index)
    lines.append(f"cells: {'the same' if same else 'DIFFERENT'} ({len(set(a.index) & set(b.index))} in both)")
    for cell in sorted(set(a.index) ^ set(b.index)):
        lines.append(f"  only in {'before' if cell in a.index else 'after'}: {cell}")
    common = sorted(set(a.index) & set(b.index))
    ok = same
    for col in COLUMNS:
        x, y = a.loc[common, col], b.loc[common, col]
        equal = (x == y) | (x.isna() & y.isna())
        lines.append(f"{col}: {int(equal.sum())}/{len(common)} equal")
        for cell in equal.index[~equal]:
            lines.append(f"  {cell}: {x[cell]!r} -> {y[cell]!r}")
        ok &= bool(equal.all())
    ok &= _episodes(before, after, a, b, lines)
    lines.append("RESULT: " + ("identical in every compared column" if ok else "DIFFERENCES (see above)"))
    return lines, ok


def _episodes(before: Path, after: Path, a: pd.DataFrame, b: pd.DataFrame, lines: list[str]) -> bool:
    """Per-episode accuracies (episodes.csv beside each table), matched by cell and episode index."""
    paths = [p.with_name("episodes.csv") for p in (before, after)]
    if not all(p.is_file() for p in paths):
        lines.append("episodes: no episodes.csv beside both tables; not compared")
        return True
    keyed = []
    for path, table in zip(paths, (a, b), strict=True):
        cells = {rid: cell for cell, rid in table["row_id"].items()}
        eps = pd.read_csv(path, dtype={"row_id": str})
        keyed.append({(cells[r], int(e)): acc for r, e, acc in zip(eps["row_id"], eps["episode"], eps["accuracy"],
                                                                   strict=True)})
    x, y = keyed
    equal = sum(1 for k in x if k in y and x[k] == y[k])
    lines.append(f"episode accuracies: {equal}/{len(x)} equal ({len(y)} after)")
    return equal == len(x) == len(y)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="also write the comparison to this file")
    args = ap.parse_args()
    lines, ok = compare(args.before, args.after)
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
