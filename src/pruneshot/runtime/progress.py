"""A study's progress in one line: jobs done, running and left, elapsed time and an estimate of the
time left, from the ``benchmark:`` files of the study's finished jobs (``pruneshot progress``).

Jobs left per rule come from a Snakemake dry run of the study's config (which works beside a running
workflow); jobs done are the rest of the full DAG (a ``--forceall`` dry run); running jobs are the
study's outputs Snakemake has marked incomplete. The estimate assumes the jobs left of a rule take
that rule's median benchmarked wall time and that ``cores`` of them run at once (each job on one
core; a lower bound when the DAG's order keeps cores idle). Rules without a finished, benchmarked
job are named, not guessed.
"""

from __future__ import annotations

import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pruneshot.paths import LOGS, StudyPaths
from pruneshot.runtime.metadata import records

_JOB_LINE = re.compile(r"^(\w+)\s+(\d+)$", flags=re.M)


@dataclass
class Progress:
    """Counts are jobs; seconds are wall-clock."""

    study: str
    total: int
    left: int
    running: int
    elapsed_s: float | None
    left_s: float | None
    cores: int
    left_by_rule: dict[str, int] = field(default_factory=dict)
    median_s: dict[str, float] = field(default_factory=dict)
    timed_jobs: int = 0
    untimed: list[str] = field(default_factory=list)

    @property
    def done(self) -> int:
        return self.total - self.left

    def line(self) -> str:
        """``study: D of T jobs done, R running, L left; elapsed ...; about ... left at N cores (...)``."""
        parts = [f"{self.study}: {self.done} of {self.total} jobs done, {self.running} running, {self.left} left"]
        if self.elapsed_s is not None:
            parts.append(f"elapsed {_duration(self.elapsed_s)}")
        if self.left == 0:
            parts.append("nothing left")
        elif self.left_s is not None:
            text = f"about {_duration(self.left_s)} left at {self.cores} core{'s' * (self.cores != 1)}"
            text += f" (from {self.timed_jobs} finished jobs' benchmark times"
            many = [r for r in self.untimed if self.left_by_rule.get(r, 0) > 1]
            single = len(self.untimed) - len(many)
            text += f"; not yet timed: {', '.join(many)}" if many else ""
            text += f"; {single} single job(s) not timed" if single else ""
            text += ")"
            parts.append(text)
        else:
            parts.append("no finished job timed yet: no estimate")
        return "; ".join(parts)


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 120 else f"{minutes // 60} h {minutes % 60:02d} min"


def job_counts(dry_run_output: str) -> dict[str, int]:
    """Jobs per rule from the ``Job stats:`` table of ``snakemake -n`` (``all`` and ``total`` dropped)."""
    if "Job stats:" not in dry_run_output:
        return {}
    table = dry_run_output[dry_run_output.index("Job stats:"):]
    table = table.split("\n\n", 1)[0]
    return {rule: int(n) for rule, n in _JOB_LINE.findall(table) if rule not in ("all", "total", "job")}


def _dry_run(config: Path, *extra: str) -> dict[str, int]:
    snakemake = Path(sys.executable).parent / "snakemake"
    proc = subprocess.run([str(snakemake), "-n", "--quiet", "rules", "--cores", "1", "--configfile", str(config),
                           *extra], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"snakemake -n failed for {config}:\n{proc.stderr[-2000:]}")
    return job_counts(proc.stdout + proc.stderr)


def benchmark_seconds(paths: StudyPaths) -> dict[str, list[float]]:
    """Rule -> wall seconds (the ``s`` column) of every benchmark file below the study's logs."""
    root = Path(paths.logs_root) / LOGS["benchmarks"]
    patterns = {}
    for rule, template in LOGS.items():
        if template.endswith(".log"):
            rel = re.escape(template.removesuffix(".log") + ".tsv")
            patterns[rule] = re.compile("^" + re.sub(r"\\\{\w+\\\}", "[^/]+", rel) + "$")
    out: dict[str, list[float]] = {}
    for path in sorted(root.rglob("*.tsv")) if root.is_dir() else []:
        rel = path.relative_to(root).as_posix()
        rule = next((r for r, p in patterns.items() if p.match(rel)), None)
        lines = path.read_text().splitlines()
        if rule is None or len(lines) < 2:
            continue
        try:
            out.setdefault(rule, []).append(float(lines[-1].split("\t")[0]))
        except ValueError:
            continue
    return out


def running_jobs(paths: StudyPaths, incomplete: Path = Path(".snakemake/incomplete")) -> int:
    """Outputs of the study that Snakemake has marked incomplete (jobs running, or killed mid-run); the
    markers are named like its metadata records (:func:`pruneshot.runtime.metadata.records`)."""
    prefix = paths.results_root.rstrip("/") + "/"
    return sum(output.startswith(prefix) for _, output in records(incomplete))


def _run_started(logdir: Path = Path(".snakemake/log")) -> float | None:
    """Start time (epoch s) of the newest Snakemake run in this checkout (its log file's name)."""
    logs = sorted(logdir.glob("*.snakemake.log")) if logdir.is_dir() else []
    if not logs:
        return None
    stamp = logs[-1].name.split(".snakemake.log")[0]
    try:
        return time.mktime(time.strptime(stamp.split(".")[0], "%Y-%m-%dT%H%M%S"))
    except ValueError:
        return None


def estimate(study: str, total: int, left_by_rule: dict[str, int], seconds: dict[str, list[float]], running: int,
             cores: int, started: float | None = None, now: float | None = None) -> Progress:
    """The progress of a study from its dry-run counts and benchmark seconds (see the module docstring)."""
    medians = {rule: statistics.median(v) for rule, v in seconds.items() if v}
    left = sum(left_by_rule.values())
    untimed = sorted(r for r, n in left_by_rule.items() if n and r not in medians)
    timed = [(n, medians[r]) for r, n in left_by_rule.items() if n and r in medians]
    left_s = sum(n * s for n, s in timed) / max(1, cores) if timed else None
    elapsed = None if started is None else max(0.0, (now if now is not None else time.time()) - started)
    return Progress(study=study, total=total, left=left, running=running, elapsed_s=elapsed, left_s=left_s,
                    cores=cores, left_by_rule=dict(left_by_rule), median_s=medians,
                    timed_jobs=sum(len(v) for v in seconds.values()), untimed=untimed)


def study_progress(config: Path, cores: int) -> Progress:
    """:func:`estimate` for the study of ``config``, run from the project root."""
    from pruneshot.config import load_config
    from pruneshot.paths import for_config

    cfg = load_config(config)
    paths = for_config(cfg)
    left = _dry_run(config)
    total = sum(_dry_run(config, "--forceall").values())
    return estimate(cfg["study"]["name"], total, left, benchmark_seconds(paths), running_jobs(paths), cores,
                    started=_run_started() if left else None)
