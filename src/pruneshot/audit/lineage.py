"""Audit: where a number in ``results.csv`` came from, and whether the artefacts still match.

*Lineage.* A results row names its transfer record; every record's ``provenance.inputs`` names the
files the job read with their sha256, and the workflow's output layout (``workflow/rules/*.smk``)
links a pruned network to its search record and profile, a pretrained checkpoint to its metrics
record. :func:`lineage` walks transfer run -> pruned network -> search -> pretrained backbone ->
source data, and transfer run -> target data, episodes, profile, and gathers for every file each
hash some record (or the results row) holds for it.

*Verification.* :func:`verify` re-hashes every file some record names with a hash (``provenance.inputs``,
``weights_sha256``, ``search_record_sha256``, a manifest's shard ``sha256``, an episodes file's
``pool_sha256``, the results row's checkpoint/pretrain/data hashes) and every output in ``dvc.lock``.
DVC 3 records a file output by the md5 of its bytes and a directory output by ``<md5>.dir``, the md5
of its JSON listing ``[{"md5": ..., "relpath": ...}, ...]``, which DVC keeps in its cache at
``.dvc/cache/files/md5/<2 hex>/<30 hex>.dir``. The listing is read from the cache (or a local remote)
and checked against its own name, so each file of a directory is compared by name; without it the
directory's hash is recomputed from the workspace and compared as a whole. Nothing here runs DVC or
trusts its state database: every hash is computed from the bytes on disk.
"""

from __future__ import annotations

import configparser
import csv
import difflib
import fnmatch
import functools
import hashlib
import json
import re
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

RESULTS_CSV = "results/tables/results.csv"

# The workflow's output layout (workflow/rules/*.smk), as patterns over project-relative paths.
_PATTERNS = {
    "source_manifest": r"results/data/source/manifest\.json",
    "target_manifest": r"results/data/target/(?P<target>[^/]+)/manifest\.json",
    "episodes": r"results/episodes/(?P<target>[^/]+)/(?P<ways>\d+)way_(?P<shots>\d+)shot\.json",
    "pretrain_weights": r"results/pretrain/r(?P<replicate>\d+)/model\.safetensors",
    "pretrain_arch": r"results/pretrain/r(?P<replicate>\d+)/arch\.json",
    "search_weights": r"results/search/(?P<method>[^/]+)/b(?P<budget>[^/]+)/r(?P<replicate>\d+)/model\.safetensors",
    "search_arch": r"results/search/(?P<method>[^/]+)/b(?P<budget>[^/]+)/r(?P<replicate>\d+)/arch\.json",
    "transfer": r"results/transfer/(?P<target>[^/]+)/(?P<method>[^/]+)/b(?P<budget>[^/]+)/(?P<shots>\d+)shot/"
                r"r(?P<replicate>\d+)\.json",
}
PROFILE = "results/profile/{method}/b{budget}/r{replicate}.json"


class AuditError(Exception):
    """A request the audit cannot answer (unknown or ambiguous row id, unreadable results file)."""

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


@dataclass
class Mismatch:
    """A file whose bytes no longer hash to what ``by`` recorded (``actual`` None: the file is missing)."""

    path: str
    algo: str
    expected: str | None
    actual: str | None
    by: list[str]

    def line(self) -> str:
        """One human-readable line."""
        who = "; ".join(self.by)
        if self.actual is None and self.expected is None:
            return f"MISSING  {self.path} (part of {who})"
        if self.actual is None:
            return f"MISSING  {self.path}: {self.algo} {self.expected} recorded by {who}"
        if self.expected is None:
            return f"EXTRA    {self.path}: {self.algo} {self.actual}, not in {who}"
        return f"MISMATCH {self.path}: {self.algo} recorded {self.expected}, actual {self.actual} (recorded by {who})"

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "algo": self.algo, "recorded": self.expected, "actual": self.actual,
                "recorded_by": self.by}


@dataclass
class VerifyResult:
    """Outcome of :func:`verify`: files re-hashed, hashes compared, mismatches, notes."""

    artefacts: int = 0
    claims: int = 0
    mismatches: list[Mismatch] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "artefacts": self.artefacts, "claims": self.claims,
                "mismatches": [m.as_dict() for m in self.mismatches], "notes": self.notes}


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
        d = self.digests(rel)
        return None if d is None else d[0 if algo == "sha256" else 1]

    @property
    def hashed(self) -> int:
        return sum(v is not None for v in self._cache.values())


# --- reading the project -------------------------------------------------------------------------

def _rel(root: Path, path: str | Path) -> str:
    """Project-relative posix path (records store paths relative to the project root)."""
    p = Path(path)
    if p.is_absolute():
        try:
            p = p.resolve().relative_to(root.resolve())
        except ValueError:
            return p.as_posix()
    return PurePosixPath(p.as_posix()).as_posix()


def _match(kind: str, rel: str) -> dict[str, str] | None:
    m = re.fullmatch(_PATTERNS[kind], rel)
    return m.groupdict() if m else None


def _read_json(root: Path, rel: str) -> dict[str, Any] | None:
    try:
        with open(root / rel) as f:
            obj = json.load(f)
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _inputs_by_kind(record: dict[str, Any]) -> dict[str, str]:
    """A record's ``provenance.inputs`` keyed by what each input is (see ``_PATTERNS``)."""
    out = {}
    for path in (record.get("provenance") or {}).get("inputs", {}):
        for kind in _PATTERNS:
            if _match(kind, path) is not None:
                out[kind] = path
    return out


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
    rel = _rel(root, record)
    return [r for r in rows if _rel(root, r.get("transfer_record", "")) == rel]


def record_claims(root: Path, rel: str, record: dict[str, Any]) -> list[Claim]:
    """Every sha256 ``record`` (the JSON at project path ``rel``) holds of another file: its
    ``provenance.inputs``, ``weights_sha256`` (its own checkpoint for pretrain/search, the network it
    read for transfer/profile), ``search_record_sha256``, ``pool_sha256`` and a manifest's shards."""
    out: list[Claim] = []

    def claim(path: str | None, expected: Any, by: str) -> None:
        if path and isinstance(expected, str) and expected:
            out.append(Claim(_rel(root, path), "sha256", expected, by))

    prov = record.get("provenance") or {}
    for path, digest in (prov.get("inputs") or {}).items():
        claim(path, digest, f"{rel} (provenance.inputs)")
    kinds = _inputs_by_kind(record)
    if "weights_sha256" in record:
        weights = (str(PurePosixPath(rel).parent / "model.safetensors") if prov.get("rule") in ("pretrain", "search")
                   else kinds.get("search_weights") or kinds.get("pretrain_weights"))
        claim(weights, record["weights_sha256"], f"{rel} (weights_sha256)")
    if "search_record_sha256" in record and "search_weights" in kinds:
        claim(str(PurePosixPath(kinds["search_weights"]).parent / "record.json"), record["search_record_sha256"],
              f"{rel} (search_record_sha256)")
    if "pool_sha256" in record and "target_manifest" in kinds:
        manifest = _read_json(root, kinds["target_manifest"]) or {}
        pool = ((manifest.get("splits") or {}).get("pool") or {}).get("file", "pool.safetensors")
        claim(str(PurePosixPath(kinds["target_manifest"]).parent / pool), record["pool_sha256"],
              f"{rel} (pool_sha256)")
    if isinstance(record.get("splits"), dict):  # a data manifest: its shards
        for split, entry in record["splits"].items():
            if isinstance(entry, dict) and "file" in entry:
                claim(str(PurePosixPath(rel).parent / entry["file"]), entry.get("sha256"),
                      f"{rel} (splits.{split}.sha256)")
    return out


# --- lineage -------------------------------------------------------------------------------------

class _Lineage:
    """Builds the lineage tree of one results row; collects every hash the lineage's records hold."""

    def __init__(self, root: Path, hasher: Hasher, dvc: DvcLock) -> None:
        self.root, self.hasher, self.dvc = root, hasher, dvc
        self.claims: list[Claim] = []
        self.seen: set[str] = set()  # nodes shown once; later mentions refer back

    def claims_from_record(self, rel: str, record: dict[str, Any]) -> None:
        self.claims.extend(record_claims(self.root, rel, record))

    def file(self, rel: str) -> dict[str, Any]:
        """A file entry: sha256 now, and (filled in at the end) every recorded hash and dvc.lock's md5."""
        return {"path": rel, "sha256": self.hasher.get(rel), "recorded": []}

    def node(self, level: str, record_rel: str | None, record: dict[str, Any] | None,
             files: list[str], note: str | None = None) -> dict[str, Any]:
        prov = (record or {}).get("provenance") or {}
        node: dict[str, Any] = {
            "level": level, "record": record_rel, "files": [self.file(f) for f in files],
            "rule": prov.get("rule"), "wildcards": prov.get("wildcards"),
            "mlflow_run_id": (record or {}).get("mlflow_run_id"), "mlflow_logged": "mlflow_run_id" in (record or {}),
            "upstream_run_id": (record or {}).get("upstream_run_id"),
            "seeds": prov.get("seeds"), "git_commit": prov.get("git_commit"), "git_dirty": prov.get("git_dirty"),
            "config_sha256": prov.get("config_sha256"), "children": [],
        }
        if note:
            node["note"] = note
        if record is None and record_rel is not None:
            node["note"] = f"record {record_rel} missing or unreadable"
        return node

    def ref(self, level: str, key: str) -> dict[str, Any] | None:
        """A back-reference to a node already shown, or None if ``key`` is new."""
        if key in self.seen:
            return {"level": level, "see_above": key, "children": []}
        self.seen.add(key)
        return None

    # The levels, parents first.

    def transfer(self, rel: str, row: dict[str, str] | None) -> dict[str, Any]:
        rec = _read_json(self.root, rel)
        node = self.node("transfer run", rel, rec, [rel])
        if rec is None:
            return node
        self.claims_from_record(rel, rec)
        kinds = _inputs_by_kind(rec)
        node["method"], node["side"] = rec.get("method"), rec.get("side")
        if row is not None:
            arm = (rec.get("arms") or {}).get(row.get("arm", ""), {})
            node["record_acc_mean"] = (arm.get("summary") or {}).get("mean")
        if "search_weights" in kinds:
            node["children"].append(self.network(kinds["search_weights"], kinds.get("search_arch")))
        if "source_manifest" in kinds:
            node["children"].append(self.source(kinds["source_manifest"]))
        if "target_manifest" in kinds:
            node["children"].append(self.target(kinds["target_manifest"]))
        if "episodes" in kinds:
            node["children"].append(self.episodes(kinds["episodes"]))
        w = _match("search_weights", kinds.get("search_weights", ""))
        if w is not None:
            node["children"].append(self.profile(PROFILE.format(**w)))
        return node

    def network(self, weights: str, arch: str | None) -> dict[str, Any]:
        record_rel = str(PurePosixPath(weights).parent / "record.json")
        rec = _read_json(self.root, record_rel)
        files = [weights] + ([arch] if arch else [])
        note = "written by the search job below, whose record this is"
        if (rec or {}).get("side") == "target":
            note += "; a target-side method prunes a copy of it per episode inside the transfer run"
        node = self.node("pruned network", record_rel, rec, files, note=note)
        node["children"].append(self.search(record_rel, rec))
        return node

    def search(self, rel: str, rec: dict[str, Any] | None) -> dict[str, Any]:
        node = self.node("search", rel, rec, [rel])
        if rec is None:
            return node
        self.claims_from_record(rel, rec)
        node["method"], node["side"] = rec.get("method"), rec.get("side")
        node["method_provenance"] = rec.get("method_provenance")
        kinds = _inputs_by_kind(rec)
        if "pretrain_weights" in kinds:
            node["children"].append(self.pretrain(kinds["pretrain_weights"], kinds.get("pretrain_arch")))
        if "source_manifest" in kinds:
            node["children"].append(self.source(kinds["source_manifest"]))
        return node

    def pretrain(self, weights: str, arch: str | None) -> dict[str, Any]:
        rel = str(PurePosixPath(weights).parent / "metrics.json")
        back = self.ref("pretrained backbone", rel)
        if back:
            return back
        rec = _read_json(self.root, rel)
        files = [weights] + ([arch] if arch else []) + [rel]
        node = self.node("pretrained backbone", rel, rec, files)
        if rec is None:
            return node
        self.claims_from_record(rel, rec)
        kinds = _inputs_by_kind(rec)
        if "source_manifest" in kinds:
            node["children"].append(self.source(kinds["source_manifest"]))
        return node

    def _data(self, level: str, rule: str, rel: str, seed_key: str | None) -> dict[str, Any]:
        back = self.ref(level, rel)
        if back:
            return back
        manifest = _read_json(self.root, rel)
        shards = [str(PurePosixPath(rel).parent / e["file"])
                  for e in ((manifest or {}).get("splits") or {}).values() if isinstance(e, dict) and "file" in e]
        legacy = manifest is not None and "provenance" not in manifest
        node = self.node(level, rel, manifest, [rel, *shards],
                         note=("a data manifest written before manifests carried provenance: commit and config "
                               "are those of the jobs that read it") if legacy else None)
        if manifest is None:
            node["note"] = f"manifest {rel} missing or unreadable"
            return node
        self.claims_from_record(rel, manifest)
        node["rule"] = node["rule"] or rule
        node["seeds"] = node["seeds"] or ({seed_key: manifest[seed_key]} if seed_key and seed_key in manifest else {})
        node["dataset"] = {k: manifest.get(k) for k in ("dataset", "split", "classes", "image_shape")}
        node["source_files"] = manifest.get("source_files")
        return node

    def source(self, rel: str) -> dict[str, Any]:
        return self._data("source data", "prepare_source", rel, "split_seed")

    def target(self, rel: str) -> dict[str, Any]:
        return self._data("target data", "prepare_target", rel, None)

    def episodes(self, rel: str) -> dict[str, Any]:
        rec = _read_json(self.root, rel)
        node = self.node("episodes", rel, rec, [rel])
        if rec is None:
            return node
        self.claims_from_record(rel, rec)
        node["episodes"] = {k: rec.get(k) for k in ("ways", "shots", "queries_per_class")}
        node["episodes"]["count"] = len(rec.get("episodes") or [])
        kinds = _inputs_by_kind(rec)
        if "target_manifest" in kinds:
            node["children"].append(self.target(kinds["target_manifest"]))
        return node

    def profile(self, rel: str) -> dict[str, Any]:
        rec = _read_json(self.root, rel)
        node = self.node("profile", rel, rec, [rel],
                         note=None if rec is not None else f"no profile record at {rel}")
        if rec is not None:
            self.claims_from_record(rel, rec)
            node["network"] = (rec.get("network") or {}).get("from")
        return node

    def finish(self, tree: dict[str, Any]) -> None:
        """Attach to every file entry the hashes recorded for it and its dvc.lock md5, with their status."""
        by_path: dict[str, list[Claim]] = {}
        for c in self.claims:
            by_path.setdefault(c.path, []).append(c)

        def walk(node: dict[str, Any]) -> None:
            for f in node.get("files", []):
                for c in by_path.get(f["path"], []) + self.dvc.claims_for(f["path"]):
                    actual = self.hasher.get(f["path"], c.algo)
                    f["recorded"].append({"by": c.by, "algo": c.algo, "hash": c.expected,
                                          "ok": actual == c.expected})
            for child in node.get("children", []):
                walk(child)

        walk(tree)


def row_claims(root: Path, row: dict[str, str], results_rel: str) -> list[Claim]:
    """The hashes one results row holds: checkpoint, pretrained checkpoint and target manifest,
    located through the row's transfer record (and the search record it names)."""
    out = []
    tr_rel = _rel(root, row.get("transfer_record", ""))
    tr = _read_json(root, tr_rel) or {}
    kinds = _inputs_by_kind(tr)
    by = f"{results_rel} (row {row['row_id']}"
    if kinds.get("search_weights") and row.get("checkpoint_sha256"):
        out.append(Claim(kinds["search_weights"], "sha256", row["checkpoint_sha256"], f"{by} checkpoint_sha256)"))
        se = _read_json(root, str(PurePosixPath(kinds["search_weights"]).parent / "record.json")) or {}
        pre = _inputs_by_kind(se).get("pretrain_weights")
        if pre and row.get("pretrain_sha256"):
            out.append(Claim(pre, "sha256", row["pretrain_sha256"], f"{by} pretrain_sha256)"))
    if kinds.get("target_manifest") and row.get("data_sha256"):
        out.append(Claim(kinds["target_manifest"], "sha256", row["data_sha256"], f"{by} data_sha256)"))
    return out


def lineage(root: Path | str, row: dict[str, str], results: Path | str = RESULTS_CSV,
            hasher: Hasher | None = None, dvc: DvcLock | None = None) -> dict[str, Any]:
    """The lineage of one results row as a JSON-ready dict: the row, then a tree of nodes
    (level, record, files with sha256 now and every recorded hash, rule, wildcards, MLflow run ids,
    seeds, git commit/dirty, config sha256, children). ``claims`` lists every recorded hash; ``project``
    the checkout's HEAD and config hash now, to compare with those that produced the row."""
    root = Path(root)
    hasher = hasher or Hasher(root)
    dvc = dvc or DvcLock(root, hasher)
    results_rel = _rel(root, results)
    lin = _Lineage(root, hasher, dvc)
    tr_rel = _rel(root, row.get("transfer_record", ""))
    tree = lin.transfer(tr_rel, row)
    lin.claims.extend(row_claims(root, row, results_rel))
    lin.finish(tree)
    results_file = {"path": results_rel, "sha256": hasher.get(results_rel), "recorded": []}
    for c in dvc.claims_for(results_rel):
        results_file["recorded"].append({"by": c.by, "algo": c.algo, "hash": c.expected,
                                         "ok": hasher.get(results_rel, c.algo) == c.expected})
    project = {"git_head": _git_head(root.resolve()), "config_sha256": _config_now(root.resolve())}
    return {"row": dict(row), "project": project, "results_file": results_file, "tree": tree,
            "claims": [asdict(c) for c in lin.claims]}


def lineage_files(lin: dict[str, Any]) -> list[str]:
    """Every file a lineage shows (results table included)."""
    out = [lin["results_file"]["path"]]

    def walk(node: dict[str, Any]) -> None:
        out.extend(f["path"] for f in node.get("files", []))
        for child in node.get("children", []):
            walk(child)

    walk(lin["tree"])
    return list(dict.fromkeys(out))


# --- dvc.lock ------------------------------------------------------------------------------------

class DvcLock:
    """The outputs ``dvc.lock`` records, as per-file md5 claims (directories through their ``.dir`` listing)."""

    def __init__(self, root: Path, hasher: Hasher) -> None:
        self.root, self.hasher = root, hasher
        self.present = (root / "dvc.lock").is_file()
        self.files: dict[str, Claim] = {}  # path -> claim (files, and the files of directory listings)
        self.dirs: list[dict[str, Any]] = []  # {path, md5, listing (None if not found), by}
        self.notes: list[str] = []
        if self.present:
            self._load()

    def _load(self) -> None:
        import yaml

        lock = yaml.safe_load((self.root / "dvc.lock").read_text()) or {}
        for stage_name, stage in (lock.get("stages") or {}).items():
            for out in stage.get("outs") or []:
                path, md5 = out.get("path"), out.get("md5")
                if not path or not md5:
                    continue
                by = f"dvc.lock (stage {stage_name}, out {path})"
                if out.get("hash") != "md5":
                    self.notes.append(f"dvc.lock out {path}: legacy (DVC 2) md5, not verified")
                    continue
                if md5.endswith(".dir"):
                    listing = self._listing(md5)
                    self.dirs.append({"path": path, "md5": md5, "listing": listing, "by": by})
                    for entry in listing or []:
                        rel = f"{path}/{entry['relpath']}"
                        self.files[rel] = Claim(rel, "md5", entry["md5"], f"{by}, {md5} listing")
                else:
                    self.files[path] = Claim(path, "md5", md5, by)

    def _cache_dirs(self) -> list[Path]:
        """The project's DVC cache and any local-directory remotes (``.dvc/config``, ``.dvc/config.local``)."""
        dvc_dir = self.root / ".dvc"
        dirs, cache = [], dvc_dir / "cache"
        parser = configparser.ConfigParser(interpolation=None)
        try:
            parser.read([dvc_dir / "config", dvc_dir / "config.local"])
        except configparser.Error:
            parser = configparser.ConfigParser(interpolation=None)
        if parser.has_option("cache", "dir"):
            cache = dvc_dir / parser.get("cache", "dir")
        dirs.append(cache)
        for section in parser.sections():
            if section.startswith("'remote ") or section.startswith("remote "):
                url = parser.get(section, "url", fallback="")
                if url and "://" not in url:
                    dirs.append(dvc_dir / Path(url).expanduser())
                elif url.startswith("file://"):
                    dirs.append(Path(url[len("file://"):]))
        return dirs

    def _listing(self, md5: str) -> list[dict[str, str]] | None:
        """The ``.dir`` listing named ``md5``, checked against its name; None if not found intact."""
        name = md5[:-len(".dir")]
        for base in self._cache_dirs():
            path = base / "files" / "md5" / name[:2] / (name[2:] + ".dir")
            if not path.is_file():
                continue
            blob = path.read_bytes()
            if hashlib.md5(blob).hexdigest() != name:
                self.notes.append(f"{path}: corrupt .dir listing (its md5 differs from its name), not used")
                continue
            try:
                listing = json.loads(blob)
            except ValueError:
                continue
            return [{"md5": e["md5"], "relpath": e["relpath"]} for e in listing]
        return None

    def claims_for(self, rel: str) -> list[Claim]:
        c = self.files.get(rel)
        return [c] if c else []


def _dvcignore(root: Path) -> list[str]:
    try:
        lines = (root / ".dvcignore").read_text().splitlines()
    except OSError:
        return []
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def _ignored(rel_parts: tuple[str, ...], patterns: list[str]) -> bool:
    """Whether a file is ignored by simple ``.dvcignore`` patterns (name globs; 'dir/' for directories)."""
    for pat in patterns:
        if pat.endswith("/"):
            if any(fnmatch.fnmatch(p, pat.rstrip("/")) for p in rel_parts[:-1]):
                return True
        elif "/" not in pat.strip("/"):
            if any(fnmatch.fnmatch(p, pat) for p in rel_parts):
                return True
        elif fnmatch.fnmatch("/".join(rel_parts), pat.lstrip("/")):
            return True
    return False


def _workspace_listing(root: Path, out: str, hasher: Hasher) -> list[dict[str, str]]:
    """``[{"md5", "relpath"}]`` of the files under ``out`` now, as DVC lists a directory."""
    base = root / out
    patterns = _dvcignore(root)
    rows = []
    if base.is_dir():
        for p in sorted(base.rglob("*")):
            if p.is_file():
                parts = p.relative_to(base).parts
                if not _ignored(parts, patterns):
                    rows.append({"md5": hasher.get(f"{out}/{'/'.join(parts)}", "md5") or "",
                                 "relpath": "/".join(parts)})
    return sorted(rows, key=lambda r: r["relpath"])


def dir_md5(listing: list[dict[str, str]]) -> str:
    """DVC 3's hash of a directory listing: md5 of its sorted-key JSON, plus '.dir'."""
    blob = json.dumps(sorted(listing, key=lambda r: r["relpath"]), sort_keys=True).encode()
    return hashlib.md5(blob).hexdigest() + ".dir"


# --- verify --------------------------------------------------------------------------------------

def _record_paths(root: Path) -> list[str]:
    """Every JSON file under results/ (outside hidden, temporary directories)."""
    base = root / "results"
    out = []
    for p in sorted(base.rglob("*.json")) if base.is_dir() else []:
        rel = p.relative_to(root)
        if not any(part.startswith(".") for part in rel.parts):
            out.append(rel.as_posix())
    return out


def all_claims(root: Path, results: Path | str = RESULTS_CSV) -> list[Claim]:
    """Every sha256 recorded anywhere under results/: each record's, each manifest's, each results row's."""
    claims: list[Claim] = []
    for rel in _record_paths(root):
        rec = _read_json(root, rel)
        if rec is not None and ("provenance" in rec or "splits" in rec):
            claims += record_claims(root, rel, rec)
    results_path = _results_path(root, results)
    if results_path.is_file():
        for row in read_results(results_path):
            claims += row_claims(root, row, _rel(root, results))
    return claims


def _results_path(root: Path, results: Path | str) -> Path:
    return Path(results) if Path(results).is_absolute() else root / results


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


def verify(root: Path | str = ".", results: Path | str = RESULTS_CSV,
           rows: list[dict[str, str]] | None = None) -> VerifyResult:
    """Re-hash every artefact some record, the results table or ``dvc.lock`` names with a hash, and compare.

    ``rows``: restrict the check to these results rows' lineage (the hashes their lineage's records
    hold, and dvc.lock's md5 of the lineage's files). Without ``rows``, files inside a ``dvc.lock``
    directory output that its listing does not name are reported too."""
    root = Path(root)
    hasher = Hasher(root)
    dvc = DvcLock(root, hasher)
    result = VerifyResult(notes=list(dvc.notes))
    scope: set[str] | None = None
    if rows is None:
        claims = all_claims(root, results)
        if not _results_path(root, results).is_file():
            result.notes.append(f"no results table at {results}: only the records' and dvc.lock's hashes compared")
    else:
        claims, scope = [], set()
        for row in rows:
            lin = lineage(root, row, results, hasher=hasher, dvc=dvc)
            claims += [Claim(**c) for c in lin["claims"]]
            files = lineage_files(lin)
            scope.update(files)
            named = {c.path for c in claims} | set(dvc.files)
            result.mismatches += [Mismatch(p, "sha256", None, None, [f"the lineage of row {row['row_id']}"])
                                  for p in files if p not in named and hasher.get(p) is None]
        claims = list(dict.fromkeys(claims))
    _check(claims, hasher, result)
    if not dvc.present:
        result.notes.append("no dvc.lock: only the hashes in records were compared")
    else:
        _check([c for c in dvc.files.values() if scope is None or c.path in scope], hasher, result)
        for d in dvc.dirs:
            prefix = d["path"].rstrip("/") + "/"
            if scope is not None and not any(p.startswith(prefix) for p in scope):
                continue
            if d["listing"] is None:  # no listing to name files by: the directory as a whole
                result.claims += 1
                actual = dir_md5(_workspace_listing(root, d["path"], hasher))
                if actual != d["md5"]:
                    result.mismatches.append(Mismatch(prefix, "md5", d["md5"], actual, [
                        f"{d['by']}; its .dir listing is not in the DVC cache, so the changed file cannot be named"]))
            elif scope is None:  # files DVC did not list (added since the lock was written)
                listed = {e["relpath"] for e in d["listing"]}
                result.mismatches += [Mismatch(prefix + e["relpath"], "md5", None, e["md5"],
                                               [f"{d['by']}, {d['md5']} listing"])
                                      for e in _workspace_listing(root, d["path"], hasher)
                                      if e["relpath"] not in listed]
    result.artefacts = hasher.hashed
    result.mismatches.sort(key=lambda m: (m.path, m.algo != "sha256"))
    return result


# --- text ----------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def _git_head(root: Path) -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


@functools.lru_cache(maxsize=8)
def _config_now(root: Path) -> str | None:
    """sha256 of the project's config/config.yaml as this checkout validates it (defaults filled)."""
    from pruneshot.config import config_hash, load_config

    try:
        return config_hash(load_config(root / "config/config.yaml"))
    except Exception:  # no config, or one this checkout's schema rejects: nothing to compare
        return None


def _num(value: str | None, scale: float = 1.0, fmt: str = ".3f") -> str:
    try:
        return format(scale * float(value), fmt)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "?"


def _pct(value: str | None) -> str:
    return _num(value, 100.0, ".1f")


def format_lineage(lin: dict[str, Any]) -> str:
    """The lineage as an indented tree of text."""
    row = lin["row"]
    lines = [
        f"row {row['row_id']}: {row.get('method')} at budget {row.get('requested_budget')} "
        f"({row.get('budget_metric', 'params')}), target {row.get('target')}, {row.get('ways')}-way "
        f"{row.get('shots')}-shot, arm {row.get('arm')}, replicate {row.get('replicate')}",
        f"  accuracy {_pct(row.get('acc_mean'))} ± {_pct(row.get('acc_ci95'))} % (mean ± 95% CI over "
        f"{row.get('n_episodes')} episodes); params ratio {_num(row.get('params_ratio'))}, flops ratio "
        f"{_num(row.get('flops_ratio'))}",
    ]
    commit, config_sha = row.get("git_commit"), row.get("config_sha256")
    dirty = " (dirty)" if str(row.get("git_dirty")).lower() == "true" else ""
    lines.append(f"  produced at commit {commit}{dirty} with config sha256 {config_sha}")
    head, now = lin["project"]["git_head"], lin["project"]["config_sha256"]
    if head:
        lines.append(f"  project HEAD now {head} ({'same' if head == commit else 'a different'} commit)")
    if now:
        lines.append(f"  config/config.yaml now hashes to {now} "
                     + ("(same)" if now == config_sha else "(differs: a setting or the schema's defaults changed)"))
    lines += _format_files([lin["results_file"]], "  ")
    lines.append("")
    _format_node(lin["tree"], 0, lines, row.get("acc_mean"))
    return "\n".join(lines)


def _format_files(files: list[dict[str, Any]], pad: str) -> list[str]:
    out = []
    for f in files:
        out.append(f"{pad}file {f['path']}")
        out.append(f"{pad}    sha256 {f['sha256'] or 'MISSING'}")
        for r in f["recorded"]:
            status = "ok      " if r["ok"] else "MISMATCH"
            out.append(f"{pad}    {status} {r['algo']} {r['hash']}  recorded by {r['by']}")
    return out


def _format_node(node: dict[str, Any], depth: int, lines: list[str], row_acc: str | None = None) -> None:
    pad = "    " * depth
    if "see_above" in node:
        lines.append(f"{pad}- {node['level']}: {node['see_above']} (shown above)")
        return
    title = f"{pad}- {node['level']}"
    if node.get("record"):
        title += f": {node['record']}"
    lines.append(title)
    sub = pad + "    "
    if node.get("rule"):
        wc = node.get("wildcards") or {}
        lines.append(f"{sub}rule {node['rule']}" + (f" ({', '.join(f'{k}={v}' for k, v in wc.items())})"
                                                    if wc else ""))
    if node.get("method"):
        extra = f", {node['method_provenance']}" if node.get("method_provenance") else ""
        lines.append(f"{sub}method {node['method']} ({node.get('side')}-side{extra})")
    if node.get("dataset"):
        ds = node["dataset"]
        lines.append(f"{sub}dataset {ds.get('dataset')} split {ds.get('split')} classes {ds.get('classes')} "
                     f"images {ds.get('image_shape')}")
    if node.get("episodes"):
        e = node["episodes"]
        lines.append(f"{sub}{e['count']} episodes, {e['ways']}-way {e['shots']}-shot, "
                     f"{e['queries_per_class']} queries per class")
    if node.get("network"):
        lines.append(f"{sub}timed network: {node['network']}")
    if "record_acc_mean" in node:
        same = _num(node["record_acc_mean"], fmt=".12g") == _num(row_acc, fmt=".12g")
        lines.append(f"{sub}accuracy in the record: {node['record_acc_mean']} "
                     + ("(as in the results row)" if same else f"(DIFFERS from the results row's {row_acc})"))
    if node.get("mlflow_logged"):
        run = node.get("mlflow_run_id") or "none recorded (not logged live; replayed by sync_tracking)"
        text = f"{sub}mlflow run {run}"
        if node.get("upstream_run_id"):
            text += f", upstream run {node['upstream_run_id']}"
        lines.append(text)
    elif node.get("rule"):
        lines.append(f"{sub}mlflow run none (rule {node['rule']} logs no MLflow run)")
    if node.get("seeds") is not None:
        lines.append(f"{sub}seeds " + (", ".join(f"{k}={v}" for k, v in node["seeds"].items()) or "none"))
    if node.get("git_commit"):
        lines.append(f"{sub}commit {node['git_commit']}" + (" (dirty)" if node.get("git_dirty") else " (clean)")
                     + f", config sha256 {node.get('config_sha256')}")
    if node.get("note"):
        lines.append(f"{sub}({node['note']})")
    for sf in node.get("source_files") or []:
        lines.append(f"{sub}raw {sf.get('file')} sha256 {sf.get('sha256')}")
    lines += _format_files(node.get("files", []), sub)
    for child in node.get("children", []):
        _format_node(child, depth + 1, lines, row_acc)


def format_verify(result: VerifyResult, scope: str = "every artefact") -> str:
    """Mismatch lines, then a one-line summary."""
    lines = [m.line() for m in result.mismatches]
    lines += [f"note: {n}" for n in result.notes]
    if result.ok:
        lines.append(f"verified {result.artefacts} artefacts ({scope}) against {result.claims} recorded hashes: "
                     "all match")
    else:
        lines.append(f"{len(result.mismatches)} mismatch(es) among {result.artefacts} artefacts ({scope}), "
                     f"{result.claims} recorded hashes compared")
    return "\n".join(lines)
