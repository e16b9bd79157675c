"""The lineage of one results row, as a tree of the jobs and files it came from.

A row names its transfer record. Every record's inputs (``provenance.inputs``: path -> sha256) and its
``network_record`` name the files its job read; each path's kind and wildcards are read back with
:meth:`pruneshot.paths.StudyPaths.regex`. The walk follows them: transfer run -> pruned network ->
search -> pretrained backbone -> source data (a source-side method), or transfer run -> pretrained
backbone (a target-side method, which prunes per episode and has no search); and transfer run ->
source data, target data, episodes, profile. Every file shows its sha256 now and each hash some
record, the results row or ``dvc.lock`` holds for it.
"""

from __future__ import annotations

import functools
import subprocess
from dataclasses import asdict
from pathlib import Path, PurePosixPath
from typing import Any

from pruneshot.audit.dvc import DvcOutputs
from pruneshot.audit.records import (
    Claim,
    Hasher,
    arm_accuracies,
    classify,
    inputs_by_kind,
    network_of,
    read_json,
    record_claims,
    rel_path,
    row_claims,
)
from pruneshot.paths import StudyPaths


class _Lineage:
    """Builds the lineage tree of one results row; collects every hash the lineage's records hold."""

    def __init__(self, root: Path, paths: StudyPaths, hasher: Hasher, dvc: DvcOutputs) -> None:
        self.root, self.paths, self.hasher, self.dvc = root, paths, hasher, dvc
        self.claims: list[Claim] = []
        self.seen: set[str] = set()  # nodes shown once; later mentions refer back
        # MLflow runs logged by sync_tracking after their job (mlflow.live: false), by spool id
        self.runs: dict[str, str] = (read_json(root, paths.result("sync_json")) or {}).get("runs") or {}

    def _record(self, rel: str) -> dict[str, Any] | None:
        rec = read_json(self.root, rel)
        if rec is not None:
            self.claims.extend(record_claims(self.root, self.paths, rel, rec))
        return rec

    def file(self, rel: str) -> dict[str, Any]:
        """A file entry: sha256 now, and (filled in at the end) every recorded hash and dvc.lock's md5."""
        return {"path": rel, "sha256": self.hasher.get(rel), "recorded": []}

    def node(self, level: str, record_rel: str | None, record: dict[str, Any] | None,
             files: list[str], note: str | None = None) -> dict[str, Any]:
        prov = (record or {}).get("provenance") or {}
        node: dict[str, Any] = {
            "level": level, "record": record_rel, "files": [self.file(f) for f in files],
            "rule": prov.get("rule"), "wildcards": prov.get("wildcards"),
            "mlflow_run_id": self._run(record, "mlflow"), "mlflow_logged": "mlflow_run_id" in (record or {}),
            "upstream_run_id": self._run(record, "upstream"),
            "seeds": prov.get("seeds"), "git_commit": prov.get("git_commit"), "git_dirty": prov.get("git_dirty"),
            "config_sha256": prov.get("config_sha256"), "children": [],
        }
        if note:
            node["note"] = note
        if record is None and record_rel is not None:
            node["note"] = f"record {record_rel} missing or unreadable"
        return node

    def _run(self, record: dict[str, Any] | None, which: str) -> str | None:
        """``record``'s own (``mlflow``) or upstream MLflow run id: as recorded, else by its spool id."""
        rec = record or {}
        prefix = "mlflow" if which == "mlflow" else "upstream"
        return rec.get(f"{prefix}_run_id") or self.runs.get(rec.get(f"{prefix}_spool_id") or "")

    def ref(self, level: str, key: str) -> dict[str, Any] | None:
        """A back-reference to a node already shown, or None if ``key`` is new."""
        if key in self.seen:
            return {"level": level, "see_above": key, "children": []}
        self.seen.add(key)
        return None

    def _wildcards(self, rel: str) -> dict[str, str]:
        hit = classify(self.paths, rel)
        return hit[1] if hit else {}

    # The levels, parents first.

    def transfer(self, rel: str, row: dict[str, str] | None) -> dict[str, Any]:
        rec = self._record(rel)
        node = self.node("transfer run", rel, rec, [rel])
        if rec is None:
            return node
        kinds = inputs_by_kind(self.paths, rec)
        node["method"], node["side"] = rec.get("method"), rec.get("side") or _side(rec.get("method"))
        if row is not None:
            arm = (rec.get("arms") or {}).get(row.get("arm", ""), {})
            node["record_acc_mean"] = (arm.get("summary") or {}).get("mean")
            node["record_episodes"] = len(arm_accuracies(arm))
        net = network_of(self.paths, rec)
        if net is not None and net[0] == "search_record":
            node["children"].append(self.network(net[1]))
        elif net is not None:
            node["children"].append(self.pretrain(net[1], note="the pretrained network, which this target-side "
                                                                "method prunes per episode inside the transfer run"))
        if "source_manifest" in kinds:
            node["children"].append(self.source(kinds["source_manifest"]))
        if "target_manifest" in kinds:
            node["children"].append(self.target(kinds["target_manifest"]))
        if "episodes" in kinds:
            node["children"].append(self.episodes(kinds["episodes"]))
        node["children"].append(self.profile(rel, node["side"]))
        return node

    def network(self, record_rel: str) -> dict[str, Any]:
        wc = self._wildcards(record_rel)
        rec = read_json(self.root, record_rel)
        files = [self.paths.result("search_weights", **wc), self.paths.result("search_arch", **wc)]
        note = "written by the search job below, whose record this is"
        if (rec or {}).get("side") == "target":
            note += "; a target-side method prunes a copy of it per episode inside the transfer run"
        node = self.node("pruned network", record_rel, rec, files, note=note)
        node["children"].append(self.search(record_rel))
        return node

    def search(self, rel: str) -> dict[str, Any]:
        rec = self._record(rel)
        node = self.node("search", rel, rec, [rel])
        if rec is None:
            return node
        node["method"], node["side"] = rec.get("method"), rec.get("side")
        node["method_provenance"] = rec.get("method_provenance")
        kinds = inputs_by_kind(self.paths, rec)
        if "pretrain_weights" in kinds:
            node["children"].append(self.pretrain(
                self.paths.result("pretrain_metrics", **self._wildcards(kinds["pretrain_weights"]))))
        if "source_manifest" in kinds:
            node["children"].append(self.source(kinds["source_manifest"]))
        return node

    def pretrain(self, rel: str, note: str | None = None) -> dict[str, Any]:
        back = self.ref("pretrained backbone", rel)
        if back:
            return back
        rec = self._record(rel)
        wc = self._wildcards(rel)
        files = [self.paths.result("pretrain_weights", **wc), self.paths.result("pretrain_arch", **wc), rel]
        node = self.node("pretrained backbone", rel, rec, files, note=note)
        if rec is None:
            return node
        kinds = inputs_by_kind(self.paths, rec)
        if "source_manifest" in kinds:
            node["children"].append(self.source(kinds["source_manifest"]))
        return node

    def _data(self, level: str, rule: str, rel: str, seed_key: str | None) -> dict[str, Any]:
        back = self.ref(level, rel)
        if back:
            return back
        manifest = self._record(rel)
        shards = [str(PurePosixPath(rel).parent / e["file"])
                  for e in ((manifest or {}).get("splits") or {}).values() if isinstance(e, dict) and "file" in e]
        legacy = manifest is not None and "provenance" not in manifest
        node = self.node(level, rel, manifest, [rel, *shards],
                         note=("a data manifest written before manifests carried provenance: commit and config "
                               "are those of the jobs that read it") if legacy else None)
        if manifest is None:
            node["note"] = f"manifest {rel} missing or unreadable"
            return node
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
        rec = self._record(rel)
        node = self.node("episodes", rel, rec, [rel])
        if rec is None:
            return node
        node["episodes"] = {k: rec.get(k) for k in ("ways", "shots", "queries_per_class")}
        node["episodes"]["count"] = len(rec.get("episodes") or [])
        kinds = inputs_by_kind(self.paths, rec)
        if "target_manifest" in kinds:
            node["children"].append(self.target(kinds["target_manifest"]))
        return node

    def profile(self, transfer_rel: str, side: str | None) -> dict[str, Any]:
        """The latency record of the transfer's network: per cell (``profile_adapted``) for a target-side
        method, per searched network (``profile``) otherwise; the first of them that exists."""
        wc = self._wildcards(transfer_rel)
        keys = ["profile_adapted", "profile"] if side == "target" else ["profile"]
        candidates = [self.paths.result(k, **wc) for k in keys]
        rel = next((c for c in candidates if (self.root / c).is_file()), candidates[0])
        rec = self._record(rel)
        node = self.node("profile", rel, rec, [rel], note=None if rec is not None else f"no profile record at {rel}")
        if rec is not None:
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


def _side(method: str | None) -> str | None:
    """'source' or 'target' for a registered method (records written before they carried ``side``)."""
    if not method:
        return None
    try:
        from pruneshot.methods import get_method

        return get_method(method).side
    except Exception:  # an unknown or since-removed method: side unknown
        return None


def lineage(root: Path | str, row: dict[str, str], paths: StudyPaths, results: str | None = None,
            hasher: Hasher | None = None, dvc: DvcOutputs | None = None, config: Path | None = None) -> dict[str, Any]:
    """The lineage of one results row as a JSON-ready dict: the row, then a tree of nodes
    (level, record, files with sha256 now and every recorded hash, rule, wildcards, MLflow run ids,
    seeds, git commit/dirty, config sha256, children). ``claims`` lists every recorded hash; ``project``
    the checkout's HEAD and the hash of ``config`` (default config/config.yaml) now, to compare with
    those that produced the row. ``results``: the project path of the results table (default the study's)."""
    root = Path(root)
    hasher = hasher or Hasher(root)
    dvc = dvc or DvcOutputs(root, hasher)
    results_rel = rel_path(root, results or paths.result("results_csv"))
    lin = _Lineage(root, paths, hasher, dvc)
    tree = lin.transfer(rel_path(root, row.get("transfer_record", "")), row)
    lin.claims.extend(row_claims(root, paths, row, results_rel))
    lin.finish(tree)
    results_file = {"path": results_rel, "sha256": hasher.get(results_rel), "recorded": []}
    for c in dvc.claims_for(results_rel):
        results_file["recorded"].append({"by": c.by, "algo": c.algo, "hash": c.expected,
                                         "ok": hasher.get(results_rel, c.algo) == c.expected})
    config_path = (config if config is not None else root / "config/config.yaml").resolve()
    project = {"git_head": _git_head(root.resolve()), "config": rel_path(root, config_path),
               "config_sha256": _config_now(config_path)}
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


@functools.lru_cache(maxsize=8)
def _git_head(root: Path) -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


@functools.lru_cache(maxsize=8)
def _config_now(config: Path) -> str | None:
    """sha256 of ``config`` as this checkout validates it (defaults filled)."""
    from pruneshot.config import config_hash, load_config

    try:
        return config_hash(load_config(config))
    except Exception:  # no config, or one this checkout's schema rejects: nothing to compare
        return None
