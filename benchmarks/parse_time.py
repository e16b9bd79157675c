"""Wall time of `snakemake -n` (the parse and DAG of a study) before and after the registry stopped importing
torch (issue 16).

Each tree is a fresh copy: ``before`` is the git revision ``--base`` (``git archive``), ``after`` this
working tree (tracked and untracked-but-not-ignored files). Each runs ``snakemake -n --quiet --cores 1``
on each config, one warm-up then ``--repeats`` timed runs, interleaved, with the tree's own ``src`` first
on PYTHONPATH; whether the dry run imported torch is recorded from a guard that logs it. Also times a bare
``import torch``. Writes ``benchmarks/results/parse_without_torch.json``.

    python benchmarks/parse_time.py [--base REV] [--repeats 3]
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

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "parse_without_torch.json"
BIN = Path(sys.executable).parent
#: The commit issue 16's parse work started from (the method modules imported torch at the top).
BASE = "991680e"
CONFIGS = {"default": None, "cifar100_fs": "config/studies/cifar100_fs.yaml"}

# sitecustomize.py of a guard directory: appends "torch" to $PARSE_TIME_TORCH_LOG when a process imports it.
GUARD = '''
import atexit, os, sys
def _note():
    if "torch" in sys.modules and os.environ.get("PARSE_TIME_TORCH_LOG"):
        with open(os.environ["PARSE_TIME_TORCH_LOG"], "a") as f:
            f.write("torch\\n")
atexit.register(_note)
'''


def export_revision(rev: str, dst: Path) -> None:
    """The tree of git revision ``rev`` under ``dst``."""
    dst.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", rev], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dst)], input=archive, check=True)


def export_worktree(dst: Path) -> None:
    """This checkout's tracked and untracked-but-not-ignored files under ``dst``."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                         capture_output=True, check=True).stdout.decode()
    for rel in filter(None, out.split("\0")):
        if (ROOT / rel).is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dst / rel)


def dry_run(tree: Path, config: str | None, guard: Path, torch_log: Path) -> float:
    """Seconds of one `snakemake -n --quiet --cores 1` in ``tree`` (raises when it fails)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PRUNESHOT_", "MLFLOW_"))}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", PYTHONPATH=f"{tree / 'src'}{os.pathsep}{guard}",
               PARSE_TIME_TORCH_LOG=str(torch_log))
    cmd = [str(BIN / "snakemake"), "-n", "--quiet", "--cores", "1"]
    if config:
        cmd += ["--configfile", config]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} in {tree} failed:\n{proc.stderr[-3000:]}")
    return seconds


def import_torch_seconds(repeats: int) -> list[float]:
    """Seconds of `import torch` in fresh interpreters."""
    code = "import time; t = time.perf_counter(); import torch; print(time.perf_counter() - t)"
    return [float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
            for _ in range(repeats)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=BASE, help="git revision of the 'before' tree (default %(default)s)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="parse-time-") as tmp:
        work = Path(tmp)
        guard = work / "guard"
        guard.mkdir()
        (guard / "sitecustomize.py").write_text(GUARD)
        trees = {"before": work / "before", "after": work / "after"}
        export_revision(args.base, trees["before"])
        export_worktree(trees["after"])
        results: dict[str, dict] = {}
        for name, config in CONFIGS.items():
            times: dict[str, list[float]] = {label: [] for label in trees}
            torch_imported: dict[str, bool] = {}
            for label, tree in trees.items():  # warm-up (file cache, .snakemake/), torch noted
                log = work / f"torch-{label}-{name}.log"
                dry_run(tree, config, guard, log)
                torch_imported[label] = log.exists()
            for _ in range(args.repeats):  # interleaved, so load on the machine hits both alike
                for label, tree in trees.items():
                    times[label].append(dry_run(tree, config, guard, work / "torch-timed.log"))
            med = {label: statistics.median(t) for label, t in times.items()}
            results[name] = {
                "config": config or "config/config.yaml",
                "seconds": {label: [round(t, 3) for t in ts] for label, ts in times.items()},
                "median_s": {label: round(m, 3) for label, m in med.items()},
                "saved_s": round(med["before"] - med["after"], 3),
                "saved_fraction": round(1 - med["after"] / med["before"], 3),
                "torch_imported": torch_imported,
            }
            print(f"{name}: before {med['before']:.2f} s, after {med['after']:.2f} s "
                  f"(torch imported: {torch_imported})", flush=True)
    torch_s = import_torch_seconds(args.repeats)
    out = {
        "what": "wall seconds of `snakemake -n --quiet --cores 1`, fresh process each, before/after the method "
                "registry stopped importing torch",
        "command": "python benchmarks/parse_time.py " + " ".join(sys.argv[1:]),
        "base_revision": subprocess.run(["git", "rev-parse", args.base], cwd=ROOT, capture_output=True, text=True,
                                        check=True).stdout.strip(),
        "repeats": args.repeats,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "import_torch_s": {"seconds": [round(t, 3) for t in torch_s], "median_s": round(statistics.median(torch_s), 3)},
        "configs": results,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
