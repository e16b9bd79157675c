"""Refuse to submit Slurm jobs whose resources still hold the profile's ``YOUR_...`` placeholders.

profiles/slurm/config.yaml ships with ``slurm_partition: YOUR_PARTITION`` and ``slurm_account:
YOUR_ACCOUNT``; sbatch would get them as they are and every job would be rejected (or, with retries, be
rejected again). workflow/Snakefile's ``onstart:`` handler calls :func:`check_slurm_resources`, which
Snakemake runs after building the DAG and before it submits the first job (never for a dry run).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

PLACEHOLDER = re.compile(r"\bYOUR_[A-Z0-9_]*")
HOW_TO_FIND = {
    "slurm_partition": "`sinfo -s` lists the partitions",
    "slurm_account": "`sacctmgr show assoc user=$USER format=account` lists your accounts",
}


class PlaceholderError(Exception):
    """A job would be submitted with a placeholder resource."""


def placeholders(jobs: Iterable[tuple[str, Mapping[str, Any]]]) -> dict[tuple[str, str], list[str]]:
    """``(resource, value) -> sorted rule names`` of every resource value of ``jobs`` (rule name,
    resources) that still holds a ``YOUR_...`` placeholder."""
    found: dict[tuple[str, str], set[str]] = {}
    for rule, resources in jobs:
        for name, value in resources.items():
            if isinstance(value, str) and PLACEHOLDER.search(value):
                found.setdefault((name, value), set()).add(rule)
    return {key: sorted(rules) for key, rules in sorted(found.items())}


def placeholder_message(found: Mapping[tuple[str, str], list[str]], rules: Iterable[str] = ()) -> str:
    """What to tell the user: each placeholder, the rules that carry it (``every rule`` when that is all of
    ``rules``, the rules to be submitted), and how to find the real value."""
    every = sorted(set(rules))
    lines = ["Slurm resources still hold the profile's placeholders; nothing was submitted. Replace them in the "
             "profile's default-resources / set-resources (profiles/slurm/config.yaml, or the --profile you "
             "use) with your cluster's values:"]
    for (name, value), carriers in found.items():
        hint = HOW_TO_FIND.get(name, "")
        which = "every rule" if carriers == every else "rules: " + ", ".join(carriers)
        lines.append(f"  {name}: {value}  ({which})" + (f"; {hint}" if hint else ""))
    return "\n".join(lines)


def check_slurm_resources(workflow: Any) -> None:
    """Raise :class:`PlaceholderError` when ``workflow`` (Snakemake's, at ``onstart``) runs with the Slurm
    executor and a job it is about to submit has a resource holding a ``YOUR_...`` placeholder."""
    plugin = getattr(workflow, "executor_plugin", None)
    if plugin is None or getattr(plugin, "name", None) != "slurm":
        return
    jobs = [(job.rule.name, dict(job.resources)) for job in workflow.dag.needrun_jobs() if not job.is_local]
    found = placeholders(jobs)
    if found:
        raise PlaceholderError(placeholder_message(found, (rule for rule, _ in jobs)))
