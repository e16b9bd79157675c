"""What the audit reads from a study: its results rows and records, the kind of each path (by the
templates in :mod:`pruneshot.paths`), and every sha256 a record or row holds of another file."""

from __future__ import annotations

import csv
import difflib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from pruneshot.paths import RESULTS, RESULTS_DIR, StudyPaths

# The templates a record's input or ``network_record`` can be (files, not directories).
KINDS = ("source_manifest", "target_manifest", "target_pool", "episodes", "pretrain_weights", "pretrain_arch",
         "pretrain_metrics", "search_weights", "search_arch", "search_record", "transfer", "profile",
         "profile_adapted")


class AuditError(Exception):
    """A request the audit cannot answer (unknown or ambiguous row id, unreadable results file, no study)."""

    def __init__(self, message: str, candidates: list[str] | None = None, label: str = "close matches") -> None:
        super().__init__(message)
        self.candidates = candidates or []
        self.label = label


@dataclass(frozen=True)
class Claim:
    """One recorded hash of one file: ``algo`` is 'sha256' (records) or 'md5' (dvc.lock)."""

    path: str
    algo: str
    expected: str
    by: str


class Hasher:
    """sha256 and md5 of project files, each file read once."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._cache: dict[str, tuple[str, str] | None] = {}

    def digests(self, rel: str) -> tuple[str, str] | None:
        """(sha256, md5) of ``rel`` (project-relative), None if it is not a file."""
        if rel not in self._cache:
            path = self.root / rel
            if not path.is_file():
                self._cache[rel] = None
            else:
                sha, md5 = hashlib.sha256(), hashlib.md5()
                with open(path, "rb") as f:
                    while block := f.read(1 << 20):
                        sha.update(block)
                        md5.update(block)
                self._cache[rel] = (sha.hexdigest(), md5.hexdigest())
        return self._cache[rel]

    def get(self, rel: str, algo: str = "sha256") -> str | None:
        """The ``algo`` ('sha256' or 'md5') hex digest of ``rel``, None if it is not a file."""
        d = self.digests(rel)
        return None if d is None else d[0 if algo == "sha256" else 1]

    @property
    def hashed(self) -> int:
        """How many distinct files were read."""
        return sum(v is not None for v in self._cache.values())


# --- the study -----------------------------------------------------------------------------------

def default_study(root: Path, config: Path | None = None) -> str:
    """``study.name`` of ``config`` (default: the project's config/config.yaml), read without validation
    so that results of an older schema can still be audited."""
    import yaml

    path = config if config is not None else root / "config/config.yaml"
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise AuditError(f"cannot read the study name from {path}: {err}") from None
    name = (data.get("study") or {}).get("name") if isinstance(data, dict) else None
    if not name:
        raise AuditError(f"{path} has no study.name: name the study with --study")
    return str(name)


def studies(root: Path) -> list[str]:
    """The studies with a results table in the project."""
    base = root / RESULTS_DIR
    return [d.name for d in sorted(base.iterdir()) if (root / StudyPaths(d.name).result("results_csv")).is_file()] \
        if base.is_dir() else []


def study_of_path(root: Path, path: str | Path, key: str) -> str | None:
    """The study whose ``key`` template ``path`` is (e.g. a results table given on the command line)."""
    rel = rel_path(root, path)
    base = root / RESULTS_DIR
    for d in sorted(base.iterdir()) if base.is_dir() else []:
        if d.is_dir() and StudyPaths(d.name).regex(key).fullmatch(rel):
            return d.name
    return None


def rel_path(root: Path, path: str | Path) -> str:
    """Project-relative posix path (records store paths relative to the project root)."""
    p = Path(path)
    if p.is_absolute():
        try:
            p = p.resolve().relative_to(root.resolve())
        except ValueError:
            return p.as_posix()
    return PurePosixPath(p.as_posix()).as_posix()


def classify(paths: StudyPaths, rel: str) -> tuple[str, dict[str, str]] | None:
    """(template key, wildcards) of the project path ``rel``, None if it is none of ``KINDS``."""
    for kind in KINDS:
        m = paths.regex(kind).fullmatch(rel)
        if m:
            return kind, m.groupdict()
    return None


def read_json(root: Path, rel: str) -> dict[str, Any] | None:
    """The JSON object at project path ``rel``; None if missing, unreadable or not an object."""
    try:
        with open(root / rel) as f:
            obj = json.load(f)
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def record_inputs(record: dict[str, Any]) -> dict[str, str]:
    """A record's input hashes, path -> sha256 (``provenance.inputs``; ``input_sha256`` also read)."""
    prov = record.get("provenance") or {}
    inputs = prov.get("inputs", prov.get("input_sha256")) or {}
    return {str(k): v for k, v in inputs.items()} if isinstance(inputs, dict) else {}


def inputs_by_kind(paths: StudyPaths, record: dict[str, Any]) -> dict[str, str]:
    """A record's inputs keyed by template (see ``KINDS``); the first path of each kind."""
    out: dict[str, str] = {}
    for path in record_inputs(record):
        hit = classify(paths, path)
        if hit is not None:
            out.setdefault(hit[0], path)
    return out


def network_of(paths: StudyPaths, record: dict[str, Any]) -> tuple[str, str] | None:
    """(kind, path) of the record of the network a transfer or profile job read: its ``network_record``
    (a search record, or a pretrain metrics record for target-side methods), else the record beside
    the weights among its inputs."""
    named = record.get("network_record")
    if isinstance(named, str) and named:
        hit = classify(paths, named)
        if hit is not None and hit[0] in ("search_record", "pretrain_metrics"):
            return hit[0], named
    kinds = inputs_by_kind(paths, record)
    for weights, rec in (("search_weights", "search_record"), ("pretrain_weights", "pretrain_metrics")):
        hit = classify(paths, kinds[weights]) if weights in kinds else None
        if hit is not None:
            return rec, paths.result(rec, **hit[1])
    return None


def network_weights(paths: StudyPaths, record: dict[str, Any]) -> str | None:
    """The weights file a transfer or profile job read (searched or pretrained)."""
    kinds = inputs_by_kind(paths, record)
    if "search_weights" in kinds or "pretrain_weights" in kinds:
        return kinds.get("search_weights") or kinds["pretrain_weights"]
    net = network_of(paths, record)
    hit = classify(paths, net[1]) if net is not None else None
    if net is None or hit is None:
        return None
    return paths.result("search_weights" if net[0] == "search_record" else "pretrain_weights", **hit[1])


def arm_accuracies(arm: dict[str, Any]) -> list[float]:
    """Per-episode accuracies of one arm of a transfer record: ``episodes`` ([{episode, accuracy,
    finetune_seed}]) or the older parallel list ``episode_accuracies``."""
    if isinstance(arm.get("episodes"), list):
        return [float(e["accuracy"]) for e in arm["episodes"] if isinstance(e, dict) and "accuracy" in e]
    return [float(a) for a in arm.get("episode_accuracies") or []]


# --- results rows --------------------------------------------------------------------------------

def read_results(path: Path) -> list[dict[str, str]]:
    """Rows of a results table (strings, as written)."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as err:
        raise AuditError(f"cannot read results file {path}: {err.strerror}") from None
    if rows and "row_id" not in rows[0]:
        raise AuditError(f"{path} has no row_id column: not a pruneshot results table")
    return rows


def find_rows(rows: list[dict[str, str]], key: str) -> list[dict[str, str]]:
    """The row whose ``row_id`` is ``key`` or starts with it; AuditError (with close ids) otherwise."""
    exact = [r for r in rows if r["row_id"] == key]
    if exact:
        return exact
    prefixed = [r for r in rows if r["row_id"].startswith(key)]
    if len(prefixed) == 1:
        return prefixed
    if prefixed:
        raise AuditError(f"row id {key!r} is ambiguous: {len(prefixed)} rows start with it",
                         sorted(r["row_id"] for r in prefixed), label="rows starting with it")
    ids = [r["row_id"] for r in rows]
    close = difflib.get_close_matches(key, ids, n=5, cutoff=0.3)
    raise AuditError(f"no row {key!r} in the results table ({len(ids)} rows)", close)


def rows_for_transfer_record(rows: list[dict[str, str]], root: Path, record: Path) -> list[dict[str, str]]:
    """The rows whose ``transfer_record`` is ``record``."""
    rel = rel_path(root, record)
    return [r for r in rows if rel_path(root, r.get("transfer_record", "")) == rel]


# --- recorded hashes -----------------------------------------------------------------------------

def record_claims(root: Path, paths: StudyPaths, rel: str, record: dict[str, Any]) -> list[Claim]:
    """Every sha256 ``record`` (the JSON at project path ``rel``) holds of another file: its inputs,
    ``weights_sha256`` (its own checkpoint for pretrain/search, the network it read for transfer/profile),
    ``network_record_sha256`` (the search record or pretrain metrics it read), ``pool_sha256`` and a
    manifest's shards."""
    out: list[Claim] = []

    def claim(path: str | None, expected: Any, by: str) -> None:
        if path and isinstance(expected, str) and expected:
            out.append(Claim(rel_path(root, path), "sha256", expected, by))

    for path, digest in record_inputs(record).items():
        claim(path, digest, f"{rel} (provenance.inputs)")
    own = classify(paths, rel)
    kinds = inputs_by_kind(paths, record)
    if "weights_sha256" in record:
        if own is not None and own[0] == "search_record":
            weights = paths.result("search_weights", **own[1])
        elif own is not None and own[0] == "pretrain_metrics":
            weights = paths.result("pretrain_weights", **own[1])
        else:
            weights = network_weights(paths, record)
        claim(weights, record["weights_sha256"], f"{rel} (weights_sha256)")
    for key in ("network_record_sha256", "search_record_sha256"):  # the latter: records before target-side
        if key in record:                                            # methods lost their search
            net = network_of(paths, record)
            if net is not None:
                claim(net[1], record[key], f"{rel} ({key})")
    if "pool_sha256" in record and "target_manifest" in kinds:
        claim(pool_file(root, paths, kinds["target_manifest"]), record["pool_sha256"], f"{rel} (pool_sha256)")
    if isinstance(record.get("splits"), dict):  # a data manifest: its shards, beside it
        for split, entry in record["splits"].items():
            if isinstance(entry, dict) and "file" in entry:
                claim(str(PurePosixPath(rel).parent / entry["file"]), entry.get("sha256"),
                      f"{rel} (splits.{split}.sha256)")
    return out


def pool_file(root: Path, paths: StudyPaths, manifest_rel: str) -> str:
    """The pool shard a target manifest names (its ``splits.pool.file``, else the ``target_pool`` template)."""
    manifest = read_json(root, manifest_rel) or {}
    name = ((manifest.get("splits") or {}).get("pool") or {}).get("file")
    if name:
        return str(PurePosixPath(manifest_rel).parent / name)
    hit = classify(paths, manifest_rel)
    return paths.result("target_pool", **(hit[1] if hit else {}))


def row_claims(root: Path, paths: StudyPaths, row: dict[str, str], results_rel: str) -> list[Claim]:
    """The hashes one results row holds: the network it transferred (``checkpoint_sha256``), the
    pretrained checkpoint (``pretrain_sha256``) and the target manifest (``data_sha256``), located
    through the row's transfer record (and the search record it names, for source-side methods)."""
    out = []
    tr = read_json(root, rel_path(root, row.get("transfer_record", ""))) or {}
    by = f"{results_rel} (row {row['row_id']}"
    weights = network_weights(paths, tr)
    if weights and row.get("checkpoint_sha256"):
        out.append(Claim(weights, "sha256", row["checkpoint_sha256"], f"{by} checkpoint_sha256)"))
    pretrain = inputs_by_kind(paths, tr).get("pretrain_weights")
    net = network_of(paths, tr)
    if pretrain is None and net is not None and net[0] == "search_record":
        pretrain = inputs_by_kind(paths, read_json(root, net[1]) or {}).get("pretrain_weights")
    if pretrain and row.get("pretrain_sha256"):
        out.append(Claim(pretrain, "sha256", row["pretrain_sha256"], f"{by} pretrain_sha256)"))
    target = inputs_by_kind(paths, tr).get("target_manifest")
    if target and row.get("data_sha256"):
        out.append(Claim(target, "sha256", row["data_sha256"], f"{by} data_sha256)"))
    return out


def record_paths(root: Path, paths: StudyPaths) -> list[str]:
    """Every file of the study that is a record by its template (the JSON ones among ``RESULTS``)."""
    base = root / paths.results_root
    keys = [k for k, t in RESULTS.items() if t.endswith(".json")]
    regexes = [paths.regex(k) for k in keys]
    out = []
    for p in sorted(base.rglob("*.json")) if base.is_dir() else []:
        rel = rel_path(root, p)
        if any(r.fullmatch(rel) for r in regexes):
            out.append(rel)
    return out


def all_claims(root: Path, paths: StudyPaths, results: str) -> list[Claim]:
    """Every sha256 recorded anywhere in the study: each record's, each manifest's, each results row's."""
    claims: list[Claim] = []
    for rel in record_paths(root, paths):
        rec = read_json(root, rel)
        if rec is not None and ("provenance" in rec or "splits" in rec):
            claims += record_claims(root, paths, rel, rec)
    if (root / results).is_file():
        for row in read_results(root / results):
            claims += row_claims(root, paths, row, results)
    return claims
