"""``pruneshot audit --verify``: re-hash every file some record names with a hash and every output DVC
recorded, and name each file whose bytes no longer match; recompute every number that can be recomputed
(:mod:`pruneshot.audit.values`: transfer summaries, results rows' accuracy columns) and name each that
disagrees, with or without ``dvc.lock``.

Records hold sha256 (``provenance.inputs``, ``weights_sha256``, ``network_record_sha256``, a manifest's
shard ``sha256``, an episodes file's ``pool_sha256``, the results row's checkpoint/pretrain/data hashes);
``dvc.lock`` holds md5 (:mod:`pruneshot.audit.dvc`; directory outputs file by file through their
``.dir`` listing). Every hash compared is computed here from the bytes on disk.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pruneshot.audit.dvc import DvcOutputs
from pruneshot.audit.lineage import lineage, lineage_files
from pruneshot.audit.records import Claim, Hasher, all_claims, default_study, rel_path
from pruneshot.audit.values import ValueMismatch, check_values
from pruneshot.paths import StudyPaths


@dataclass
class Mismatch:
    """A file whose bytes no longer hash to what ``by`` recorded (``actual`` None: the file is missing;
    ``expected`` None: a file in a DVC output directory that DVC did not list)."""

    path: str
    algo: str
    expected: str | None
    actual: str | None
    by: list[str]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"path": self.path, "algo": self.algo, "recorded": self.expected, "actual": self.actual,
                "recorded_by": self.by}


@dataclass
class VerifyResult:
    """Outcome of :func:`verify`: files re-hashed, hashes compared, hash mismatches, values recomputed and
    those that disagree, errors (DVC state or records that cannot be read: the check is incomplete), notes."""

    artefacts: int = 0
    claims: int = 0
    mismatches: list[Mismatch] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    recomputed: int = 0
    value_mismatches: list[ValueMismatch] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every hash matched, every recomputed value agreed, and everything could be read."""
        return not self.mismatches and not self.value_mismatches and not self.errors

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"ok": self.ok, "artefacts": self.artefacts, "claims": self.claims,
                "mismatches": [m.as_dict() for m in self.mismatches], "recomputed": self.recomputed,
                "value_mismatches": [m.as_dict() for m in self.value_mismatches], "errors": self.errors,
                "notes": self.notes}


def _check(claims: list[Claim], hasher: Hasher, result: VerifyResult) -> None:
    """Compare each claim with the file's bytes; one mismatch per (file, algorithm, recorded hash)."""
    grouped: dict[tuple[str, str, str], list[str]] = {}
    for c in claims:
        grouped.setdefault((c.path, c.algo, c.expected), []).append(c.by)
    result.claims += len(claims)
    for (path, algo, expected), by in grouped.items():
        actual = hasher.get(path, algo)
        if actual != expected:
            result.mismatches.append(Mismatch(path, algo, expected, actual, sorted(set(by))))


def _check_dvc(dvc: DvcOutputs, scope: set[str] | None, result: VerifyResult) -> None:
    """dvc.lock's md5 of every file output and every listed file of a directory output; a directory
    without a listing as a whole; files DVC did not list (only when checking everything)."""
    _check([c for c in dvc.files.values() if scope is None or c.path in scope], dvc.hasher, result)
    for d in dvc.dirs:
        prefix = d.path.rstrip("/") + "/"
        if scope is not None and not any(p.startswith(prefix) for p in scope):
            continue
        if d.listing is None:  # no listing to name files by: the directory as a whole
            result.claims += 1
            actual = dvc.workspace_dir_md5(d)
            if actual != d.md5:
                result.mismatches.append(Mismatch(prefix, "md5", d.md5, actual, [
                    f"{d.by}; its .dir listing is in neither the DVC cache nor a local remote, so the changed "
                    "file cannot be named"]))
        elif scope is None:  # files DVC did not list (added since the lock was written)
            result.mismatches += [Mismatch(prefix + rel, "md5", None, dvc.hasher.get(prefix + rel, "md5"),
                                           [f"{d.by}, {d.md5} listing"])
                                  for rel in d.workspace if rel not in d.listing]


def verify(root: Path | str = ".", study: str | StudyPaths | None = None, results: str | Path | None = None,
           rows: list[dict[str, str]] | None = None, config: Path | None = None) -> VerifyResult:
    """Re-hash every artefact some record of ``study``, its results table or DVC names with a hash, and compare.

    ``study``: a name or its paths (default: ``study.name`` of ``config``, else config/config.yaml).
    ``results``: the results table (default the study's). ``rows``: restrict the check to these rows'
    lineage (the hashes their lineage's records hold, and dvc.lock's md5 of the lineage's files).
    Without ``rows``, files inside a DVC directory output that its listing does not name are reported too.
    Every transfer record's summaries and every results row's accuracy columns (of ``rows`` only, when
    given) are recomputed from the per-episode accuracies and compared (:func:`check_values`)."""
    root = Path(root)
    if not isinstance(study, StudyPaths):
        study = StudyPaths(study if study is not None else default_study(root, config))
    results_rel = rel_path(root, results if results is not None else study.result("results_csv"))
    hasher = Hasher(root)
    dvc = DvcOutputs(root, hasher)
    result = VerifyResult(notes=list(dvc.notes), errors=[dvc.error] if dvc.error else [])
    scope: set[str] | None = None
    if rows is None:
        claims = all_claims(root, study, results_rel)
        if not (root / study.results_root).is_dir():
            result.errors.append(f"no results of study {study.study!r} at {study.results_root}/")
        elif not (root / results_rel).is_file():
            result.notes.append(f"no results table at {results_rel}: only the records' and DVC's hashes compared")
    else:
        claims, scope = [], set()
        for row in rows:
            lin = lineage(root, row, study, results_rel, hasher=hasher, dvc=dvc, config=config)
            claims += [Claim(**c) for c in lin["claims"]]
            files = lineage_files(lin)
            scope.update(files)
            named = {c.path for c in claims} | set(dvc.files)
            result.mismatches += [Mismatch(p, "sha256", None, None, [f"the lineage of row {row['row_id']}"])
                                  for p in files if p not in named and hasher.get(p) is None]
        claims = list(dict.fromkeys(claims))
    _check(claims, hasher, result)
    values = check_values(root, study, results_rel, rows)
    result.recomputed, result.value_mismatches = values.compared, values.mismatches
    result.errors += values.errors
    if dvc.present:
        _check_dvc(dvc, scope, result)
    result.artefacts = hasher.hashed
    result.mismatches.sort(key=lambda m: (m.path, m.algo != "sha256"))
    return result
