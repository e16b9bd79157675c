"""Stage report: the self-contained HTML report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pruneshot.config import config_hash
from pruneshot.runtime.provenance import git_state
from pruneshot.stages.job import Job


def report(config: dict[str, Any], results_csv: Path, study_path: Path, sync_path: Path,
           source_manifest: Path, target_manifests: dict[str, Path], out_html: Path, figures_dir: Path,
           job: Job, episodes_csv: Path | None = None, sanity_json: Path | None = None,
           selection_csv: Path | None = None) -> None:
    """Render the self-contained HTML report with figures, tables, statistics and a provenance section.

    Refuses results from several code commits or config hashes unless ``report.allow_mixed``. The
    sanity gates (``sanity_json``) head the report; with ``report.sanity: error`` a failed or
    unevaluated gate fails the rule after the report is written (so it can still be read).
    ``selection_csv``: the transfer settings chosen on validation (``transfer.select``), when set.
    """
    from pruneshot.io import read_json
    from pruneshot.report.build import build_report
    from pruneshot.report.load import collect_provenance, load_results

    prov = collect_provenance(
        load_results(results_csv), study=config["study"]["name"], config_sha256=config_hash(config),
        study_json=study_path, sync_json=sync_path, manifests={"source": source_manifest, **target_manifests})
    commit, dirty = git_state()
    job.log(f"report built at commit {commit}{' (uncommitted changes)' if dirty else ''} (not in the HTML: "
            "rebuilding from the same results gives the same bytes)")
    allow_mixed = bool(config.get("report", {}).get("allow_mixed", False))
    gates = read_json(sanity_json) if sanity_json is not None else None
    build_report(results_csv, prov, out_html, figures_dir, episodes_csv, allow_mixed=allow_mixed, sanity=gates,
                 selection_csv=selection_csv)
    job.log(f"report written to {out_html}")
    if gates is not None:
        from pruneshot.report.sanity import GATES, summary_lines

        for line in summary_lines(gates):
            job.log(line)
        bad = gates["failed"] + gates["not_evaluated"]
        if bad and config["report"]["sanity"] == "error":
            raise SystemExit(f"report.sanity is error and sanity gate(s) did not pass: "
                             f"{', '.join(GATES[g][0] for g in bad)} (see {out_html}, section Sanity gates)")
