"""Stage report: the self-contained HTML report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pruneshot.config import config_hash
from pruneshot.runtime.provenance import git_state
from pruneshot.stages.job import Job


def report(config: dict[str, Any], results_csv: Path, study_path: Path, sync_path: Path,
           source_manifest: Path, target_manifests: dict[str, Path], out_html: Path, figures_dir: Path,
           job: Job, episodes_csv: Path | None = None) -> None:
    """Render the self-contained HTML report with figures, tables, statistics and a provenance section.

    Refuses results from several code commits or config hashes unless ``report.allow_mixed``.
    """
    from pruneshot.report.build import build_report
    from pruneshot.report.load import collect_provenance, load_results

    prov = collect_provenance(
        load_results(results_csv), study=config["study"]["name"], config_sha256=config_hash(config),
        study_json=study_path, sync_json=sync_path, manifests={"source": source_manifest, **target_manifests},
        git=git_state())
    allow_mixed = bool(config.get("report", {}).get("allow_mixed", False))
    build_report(results_csv, prov, out_html, figures_dir, episodes_csv, allow_mixed=allow_mixed)
    job.log(f"report written to {out_html}")
