"""What a workflow run prints when it ends (workflow/Snakefile's ``onsuccess:`` and ``onerror:`` handlers).

A successful run that built the results table prints what ``pruneshot summary --config FILE`` prints (the
table, the sanity gates, the report's path, failed rows with the ``pruneshot rerun-failed`` command); a
failed run lists the jobs that failed and the one command that reruns them, and names ``pruneshot
rerun-failed`` where the study also has recorded failed cells. Snakemake calls neither handler for a dry
run (``-n``), ``--lint``, ``--report`` or a run with nothing to do; ``--touch`` runs print nothing either.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pruneshot.paths import StudyPaths

#: Set (to anything but "" or "0") to keep a successful run from printing the summary: `make run` prints
#: it itself after `dvc repro`, which skips snakemake altogether when the study is up to date.
QUIET_ENV = "PRUNESHOT_NO_SUMMARY"
DEFAULT_CONFIG = Path("config/config.yaml")
# Options whose effect a rerun must not repeat: forcing already rebuilt what it forced.
_FORCE_FLAGS = {"-F", "--forceall", "-f", "--force"}
_FORCE_LISTS = {"-R", "--forcerun"}


def study_config(configfiles: Sequence[str | os.PathLike[str]], workdir: Path | str = ".") -> Path | None:
    """The config file to name in ``--config FILE`` hints (relative to ``workdir`` when under it), or None
    for the embedded default config/config.yaml. Of several --configfile files, the last."""
    if not configfiles:
        return None
    workdir = Path(workdir).resolve()
    path = Path(configfiles[-1])
    absolute = path if path.is_absolute() else workdir / path
    if absolute.resolve() == (workdir / DEFAULT_CONFIG).resolve():
        return None
    try:
        return absolute.resolve().relative_to(workdir)
    except ValueError:
        return path


def rerun_argv(argv: Sequence[str]) -> list[str]:
    """The snakemake command line ``argv`` (sys.argv) without its forcing options (-F, -f, -R/--forcerun
    and their targets): rerun as it is, it runs the failed jobs (whose outputs Snakemake removed) and
    what they hold up, and nothing that finished."""
    out = ["snakemake"]
    skipping = False
    for arg in argv[1:]:
        if skipping and not arg.startswith("-"):
            continue
        skipping = False
        if arg in _FORCE_FLAGS or arg.startswith(("--forcerun=", "--forceall=")):
            continue
        if arg in _FORCE_LISTS:
            skipping = True
            continue
        out.append(arg)
    return out


def job_line(rule: str, jobid: Any, wildcards: dict[str, Any], log: Iterable[str]) -> str:
    """One failed job as Snakemake names it: rule, jobid, wildcards and where its log is."""
    text = f"rule {rule}, jobid: {jobid}"
    if wildcards:
        text += ", wildcards: " + ", ".join(f"{k}={v}" for k, v in wildcards.items())
    logs = list(log)
    if logs:
        text += f" (log: {', '.join(logs)})"
    return text


def error_lines(jobs: Sequence[str], rerun: Sequence[str], failed_cells: int, config: Path | None) -> list[str]:
    """What a failed run prints: the failed ``jobs`` (:func:`job_line`), the ``rerun`` command, and, when
    the study has ``failed_cells`` recorded failed cells, the ``pruneshot rerun-failed`` command."""
    from pruneshot.runtime.rerun import COMMAND

    lines = [f"pruneshot: {len(jobs)} job(s) failed:", *(f"  {job}" for job in jobs),
             "rerun them (what finished is kept) with:", f"  {shlex.join(rerun)}"]
    if failed_cells:
        option = f" --config {config}" if config is not None else ""
        lines += [f"the study also has {failed_cells} failed cell(s) (recorded method errors, which a plain rerun "
                  "leaves as they are); rerun those with:", f"  {COMMAND}{option}"]
    return lines


def print_summary(results_csv: Path | str, config: Path | None) -> int:
    """Print what ``pruneshot summary --config config`` prints for the results table ``results_csv``."""
    from pruneshot.cli import _summary

    sys.stdout.flush()
    code = _summary(argparse.Namespace(results=Path(results_csv), config=config, study=None))
    sys.stdout.flush()
    return code


def _built(workflow: Any, target: str) -> bool:
    """Whether a job of this run (not one skipped as up to date) wrote ``target``."""
    target = os.path.normpath(target)
    return any(os.path.normpath(str(f)) == target for job in workflow.dag.finished_jobs for f in job.output)


def save_metadata(workflow: Any, paths: StudyPaths) -> None:
    """Carry the run's Snakemake job records into the study's results (:mod:`pruneshot.runtime.metadata`);
    a problem is reported, never a failed run."""
    from pruneshot.runtime.metadata import save

    if workflow.dryrun:
        return
    try:
        save(paths.results_root, paths.result("snakemake_metadata"))
    except OSError as err:
        print(f"pruneshot: Snakemake's job records not copied into the results ({err})", file=sys.stderr)


def on_success(workflow: Any, paths: StudyPaths) -> None:
    """The ``onsuccess:`` handler: carry the job records into the results; print the summary when this run
    built the study's results table."""
    save_metadata(workflow, paths)
    if workflow.touch or workflow.dryrun or os.environ.get(QUIET_ENV, "") not in ("", "0"):
        return
    results_csv = paths.result("results_csv")
    if not _built(workflow, results_csv):
        return
    try:
        print_summary(results_csv, study_config(workflow.configfiles))
    except Exception as err:  # the run itself succeeded: a summary that cannot be printed must not fail it
        print(f"pruneshot: no summary ({type(err).__name__}: {err}); try `pruneshot summary {results_csv}`",
              file=sys.stderr)


def on_error(workflow: Any, paths: StudyPaths) -> None:
    """The ``onerror:`` handler: carry the finished jobs' records into the results; list the failed jobs
    and the commands that rerun them (on stderr)."""
    from pruneshot.runtime.rerun import failed_outputs

    save_metadata(workflow, paths)

    jobs = []
    for job in getattr(workflow.scheduler, "failed", ()):
        for j in (job if job.is_group() else [job]):
            jobs.append(job_line(j.rule.name, workflow.dag.jobid(j), dict(j.wildcards_dict), map(str, j.log)))
    try:
        failed_cells = len(failed_outputs(paths))
    except (OSError, ValueError):  # a record cut off mid-write: name no cells rather than fail the handler
        failed_cells = 0
    lines = error_lines(sorted(jobs), rerun_argv(sys.argv), failed_cells, study_config(workflow.configfiles))
    print("\n".join(lines), file=sys.stderr, flush=True)
