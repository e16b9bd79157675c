"""Snakemake's job metadata carried inside a study's results, so that DVC versions it.

Snakemake decides that a changed setting reruns a job by comparing the job's ``params`` (and code,
inputs, software environment) with what it recorded for the job's outputs in
``.snakemake/metadata/``, one JSON record per output file. Nobody versions that folder: a checkout
that got its results from ``dvc pull`` (or marked them current with ``snakemake --touch``) has no
records, and Snakemake then reruns nothing when a setting changes ("missing provenance/metadata").

So every run, successful or not, copies the records of the study's outputs into
``results/<study>/`` (:data:`pruneshot.paths.RESULTS` ``snakemake_metadata``, a DVC output), with
the fields that change from run to run dropped (start and end times, the job's in-process hash),
so that a rebuild writes the same bytes; and every Snakemake start copies back the records a
checkout lacks. A record already in ``.snakemake/metadata/`` is never replaced: it is this
checkout's own, newer truth. Snakemake's file backend names a record by the urlsafe base64 of the
output's path (split into ``@``-prefixed folders when longer than a file name may be).
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: Snakemake's file-backend metadata folder, relative to the working directory.
SNAKEMAKE_METADATA = Path(".snakemake/metadata")
#: Record fields that differ between two runs of the same job (or mean nothing in another checkout).
VOLATILE = ("starttime", "endtime", "job_hash", "incomplete", "external_jobid")


def output_path(record: Path, root: Path) -> str:
    """The output path a record below ``root`` belongs to (decoded from its file name)."""
    parts = record.relative_to(root).parts
    return base64.urlsafe_b64decode("".join(p.removeprefix("@") for p in parts)).decode()


def records(root: Path) -> Iterator[tuple[Path, str]]:
    """(file, output path) of every record below ``root`` (Snakemake's metadata or incomplete folder)."""
    if not root.is_dir():
        return
    for path in sorted(root.rglob("*")):
        if path.is_file():
            try:
                yield path, output_path(path, root)
            except (ValueError, UnicodeDecodeError):
                continue  # not a record (e.g. a temporary file)


def _write(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, sort_keys=True) + "\n")
    os.replace(tmp, path)


def save(results_root: Path | str, mirror: Path | str, metadata: Path | str = SNAKEMAKE_METADATA) -> int:
    """Copy the records of the existing outputs below ``results_root`` into ``mirror`` (volatile fields
    dropped; a file is rewritten only when its content changes) and drop mirrored records whose output
    is gone. Returns the number of records written."""
    results_root, mirror, metadata = Path(results_root), Path(mirror), Path(metadata)
    prefix = results_root.as_posix().rstrip("/") + "/"
    wanted: set[Path] = set()
    written = 0
    for path, output in records(metadata):
        if not output.startswith(prefix) or not Path(output).exists():
            continue
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # being written by a concurrent run: the next run copies it
        if record.get("incomplete"):
            continue
        target = mirror / path.relative_to(metadata)
        wanted.add(target)
        text = json.dumps({k: v for k, v in record.items() if k not in VOLATILE}, sort_keys=True) + "\n"
        if not target.is_file() or target.read_text() != text:
            _write(target, json.loads(text))
            written += 1
    for path, output in list(records(mirror)):
        if path not in wanted and not Path(output).exists():
            path.unlink()
    return written


def restore(mirror: Path | str, metadata: Path | str = SNAKEMAKE_METADATA) -> int:
    """Copy into ``metadata`` every mirrored record whose output exists and that ``metadata`` lacks
    (start and end time: the output's modification time). Returns the number restored."""
    mirror, metadata = Path(mirror), Path(metadata)
    restored = 0
    for path, output in records(mirror):
        target = metadata / path.relative_to(mirror)
        if target.exists() or not Path(output).exists():
            continue
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        mtime = Path(output).stat().st_mtime
        _write(target, {**record, "starttime": mtime, "endtime": mtime, "incomplete": False})
        restored += 1
    return restored
