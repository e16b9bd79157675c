"""The landing page of Snakemake's native report (``snakemake --report``).

Imported by the Snakefile at parse time, so it imports nothing heavy (no pandas, torch or the registry).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def _result_commits(results_csv: Path | None) -> dict[str, int]:
    """Rows per (git_commit, dirty) of ``results_csv`` (the commits that produced the results); {} when absent."""
    import csv

    counts: dict[str, int] = {}
    if results_csv is None or not Path(results_csv).is_file():
        return counts
    with open(results_csv, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            dirty = str(row.get("git_dirty", "")).strip().lower() in ("true", "1")
            key = f"``{row.get('git_commit') or 'unknown'}``" + (" (uncommitted changes)" if dirty else "")
            counts[key] = counts.get(key, 0) + 1
    return counts


def landing_page(workflow_rst: Path, config: dict[str, Any], repo: Path,
                 out: Path = Path(".snakemake/pruneshot/workflow.rst"), results_csv: Path | None = None) -> str:
    """The landing page of Snakemake's native report: ``workflow_rst`` plus the study name, the commits that
    produced the results (read from ``results_csv`` when it exists; Snakemake renders this page with the
    config only), the commit of ``repo`` that builds the page, and the config hash (its first 16 hex digits:
    the full one is in results.csv and would overflow the page beside the DAG), written to ``out``
    (rewritten only when it changes, atomically). Returns the absolute path for the Snakefile's ``report:``."""
    from pruneshot.config import config_hash
    from pruneshot.runtime.provenance import git_state

    commit, dirty = git_state(repo)
    produced = _result_commits(results_csv)
    results_line = ("- results produced at git commit " + "; ".join(
        f"{c}: {n} rows" if len(produced) > 1 else c for c, n in produced.items()) + "\n") if produced else \
        "- results: none yet (the commit that produced each row is in results.csv)\n"
    text = Path(workflow_rst).read_text(encoding="utf-8").rstrip("\n") + (
        "\n\nThis report\n-----------\n\n"
        f"- study: ``{config['study']['name']}``\n"
        + results_line +
        f"- this page built at git commit ``{commit}``{' (uncommitted changes)' if dirty else ''}\n"
        f"- config sha256: ``{config_hash(config)[:16]}…``\n"
        "- every result row records the git commit and config hash of the job that produced it\n"
        "  (results.csv); results/report/index.html refuses results that mix them unless\n"
        "  ``report.allow_mixed`` is set.\n"
    )
    path = Path(out).resolve()
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    return str(path)

