"""The landing page of Snakemake's native report (``snakemake --report``).

Imported by the Snakefile at parse time, so it imports nothing heavy (no pandas, torch or the registry).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def landing_page(workflow_rst: Path, config: dict[str, Any], repo: Path,
                 out: Path = Path(".snakemake/pruneshot/workflow.rst")) -> str:
    """The landing page of Snakemake's native report: ``workflow_rst`` plus the study name, the git
    commit (and dirty flag) of ``repo`` and the config hash, written to ``out`` (rewritten only
    when it changes, atomically). Returns the absolute path for the Snakefile's ``report:``."""
    from pruneshot.config import config_hash
    from pruneshot.runtime.provenance import git_state

    commit, dirty = git_state(repo)
    text = Path(workflow_rst).read_text(encoding="utf-8").rstrip("\n") + (
        "\n\nThis report\n-----------\n\n"
        f"- study: ``{config['study']['name']}``\n"
        f"- git commit: ``{commit}``{' (uncommitted changes)' if dirty else ''}\n"
        f"- config sha256: ``{config_hash(config)}``\n"
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

