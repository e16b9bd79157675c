"""Rerunning a study's failed cells: a method error is recorded as a failed cell (a row, not a failed
DAG), so a plain rerun has nothing to do. ``pruneshot rerun-failed`` forces exactly the jobs whose
records say ``failed`` (a failed search, else a failed transfer) and Snakemake reruns what depends on
them (profile, aggregate, report), nothing else."""

from __future__ import annotations

from pathlib import Path

from pruneshot.io import read_json
from pruneshot.paths import StudyPaths


def failed_outputs(paths: StudyPaths, base: Path | str = ".") -> list[str]:
    """The record paths (relative to ``base``, as the rules name them) of the study's failed jobs: every
    failed search record, and every failed transfer record whose network's search did not fail (that
    transfer reruns anyway once its search does). Sorted; empty when nothing failed."""
    base = Path(base)
    root = base / paths.results_root
    searches = sorted((root / "search").glob("*/b*/r*/record.json"))
    failed_search = {p for p in searches if read_json(p).get("status") == "failed"}
    out = [p for p in failed_search]
    for p in sorted((root / "transfer").glob("*/*/b*/*shot/r*.json")):
        rec = read_json(p)
        if rec.get("status") != "failed":
            continue
        network = base / rec.get("network_record", "")
        if network in failed_search:
            continue
        out.append(p)
    return sorted(p.relative_to(base).as_posix() for p in out)


def rerun_command(outputs: list[str], config: Path | str | None = None, cores: str = "all") -> list[str]:
    """The snakemake command that reruns ``outputs`` (``--forcerun``) and everything that depends on them;
    ``config``: the study's config file when it is not the embedded default."""
    cmd = ["snakemake", "--cores", str(cores)]
    if config is not None:
        cmd += ["--configfile", str(config)]
    return [*cmd, "--forcerun", *outputs]


#: What users are told to run (README, the report's Failures section, the run summary).
COMMAND = "pruneshot rerun-failed"
