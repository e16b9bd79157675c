"""``pruneshot audit --verify``: the numbers that can be recomputed, recomputed.

A hash only tells that a file changed since someone recorded its hash; without ``dvc.lock`` nobody
recorded the hash of a transfer record or of the results table, so an edited number would pass. These
checks need no recorded hash:

- each transfer record's per-arm ``summary`` (mean, std, ci95, n), its ``network_means`` and each
  control's ``summary``, recomputed from the per-episode accuracies beside them with the function the
  transfer stage uses (:func:`pruneshot.report.stats.mean_ci`);
- each results row's accuracy columns (``acc_mean``, ``acc_ci95``, ``acc_std``, ``n_episodes``,
  ``networks``, ``network_acc_min``/``max``), recomputed from the per-episode accuracies of the
  record and arm it names, and the columns the aggregate stage copies from that record as they are
  (method, target, shots, seeds, commit, config hash, target-side cost, status, ...). Timings
  (``transfer_seconds``, ``search_seconds``) are not compared: a rerun job reproduces its numbers, not
  its seconds.

Numbers agree when equal to a relative 1e-9 (a CSV or JSON round trip keeps them exact); an empty
CSV cell agrees with NaN, None or a missing value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pruneshot.audit.records import arm_accuracies, classify, read_json, read_results, record_paths, rel_path
from pruneshot.paths import StudyPaths

#: Relative tolerance of two numbers that agree.
REL_TOL = 1e-9

#: Results columns the aggregate stage copies from the merged record ``{**record, **arm, "arm": arm}``:
#: column -> key path in it.
COPIED = {
    "method": "method", "target": "target", "ways": "ways", "shots": "shots", "replicate": "replicate",
    "support_steps": "support_steps",
    "git_commit": "provenance.git_commit", "git_dirty": "provenance.git_dirty",
    "config_sha256": "provenance.config_sha256", "seed_pretrain": "provenance.seeds.pretrain",
    "seed_search": "provenance.seeds.search", "seed_episode": "provenance.seeds.episode_root",
}
#: Target-side cells: the cost columns copied from the record's ``achieved`` means.
ACHIEVED = {"achieved_params": "achieved.params", "achieved_flops": "achieved.flops"}


@dataclass
class ValueMismatch:
    """A number (or copied value) in ``path`` whose ``field`` holds ``recorded`` where recomputing it
    from ``source`` gives ``recomputed``."""

    path: str
    field: str
    recorded: Any
    recomputed: Any
    source: str

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (NaN as None)."""
        return {"path": self.path, "field": self.field, "recorded": _jsonable(self.recorded),
                "recomputed": _jsonable(self.recomputed), "recomputed_from": self.source}


@dataclass
class ValueCheck:
    """Outcome of the value checks: how many values were recomputed, the disagreements, and the
    records that could not be read (the check of their rows is incomplete)."""

    compared: int = 0
    mismatches: list[ValueMismatch] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _jsonable(v: Any) -> Any:
    return None if isinstance(v, float) and math.isnan(v) else v


def _missing(v: Any) -> bool:
    return v is None or v == "" or (isinstance(v, float) and math.isnan(v))


def _number(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int | float):
        return float(v)
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def same(recorded: Any, expected: Any) -> bool:
    """Whether ``recorded`` (a JSON value or a CSV string) agrees with ``expected``: numbers to a
    relative ``REL_TOL`` (NaN with NaN), booleans by name, missing with missing, else as text."""
    if _missing(recorded) or _missing(expected):
        return _missing(recorded) and _missing(expected)
    if isinstance(expected, bool) or isinstance(recorded, bool):
        return str(recorded).lower() == str(expected).lower()
    a, b = _number(recorded), _number(expected)
    if a is not None and b is not None and isinstance(expected, int | float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return math.isclose(a, b, rel_tol=REL_TOL, abs_tol=0.0)
    return str(recorded) == str(expected)


def _dig(obj: Any, key: str) -> tuple[bool, Any]:
    """(found, value) of the dotted ``key`` in ``obj``."""
    for part in key.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return False, None
        obj = obj[part]
    return True, obj


def summary_of(accuracies: list[float]) -> dict[str, float]:
    """The summary the transfer stage records for per-episode ``accuracies`` (fractions): mean, sample
    std, ci95 = 1.96*std/sqrt(n), n; NaN and n 0 where there are none (a failed cell, as aggregate reads it)."""
    from pruneshot.report.stats import mean_ci

    if not accuracies:
        nan = float("nan")
        return {"mean": nan, "std": nan, "ci95": nan, "n": 0}
    return mean_ci(accuracies)


def network_means(arm: dict[str, Any]) -> list[float] | None:
    """Per-network mean accuracy over the arm's episodes (cells that score several networks per episode,
    ``network_accuracies``), as the transfer stage computes it; None when the arm scored one network."""
    from pruneshot.report.stats import mean_ci

    eps = arm.get("episodes")
    if not isinstance(eps, list) or not eps or not isinstance(eps[0], dict) or "network_accuracies" not in eps[0]:
        return None
    count = len(eps[0]["network_accuracies"])
    return [mean_ci([e["network_accuracies"][i] for e in eps])["mean"] for i in range(count)]


class _Checker:
    def __init__(self) -> None:
        self.out = ValueCheck()

    def compare(self, path: str, name: str, recorded: Any, recomputed: Any, source: str) -> None:
        self.out.compared += 1
        if not same(recorded, recomputed):
            self.out.mismatches.append(ValueMismatch(path, name, recorded, recomputed, source))

    def record(self, rel: str, rec: dict[str, Any]) -> None:
        """A transfer record's summaries against its per-episode accuracies."""
        for name, arm in (rec.get("arms") or {}).items():
            if not isinstance(arm, dict):
                continue
            accs = arm_accuracies(arm)
            self._summary(rel, f"arms.{name}", arm, accs)
            means = network_means(arm)
            if "network_means" in arm or means is not None:
                recorded = arm.get("network_means") or []
                source = f"mean_ci over the episodes of each of arms.{name}.episodes[*].network_accuracies"
                if len(recorded) != len(means or []):
                    self.compare(rel, f"arms.{name}.network_means", recorded, means, source)
                for i, (r, m) in enumerate(zip(recorded, means or [], strict=False)):
                    self.compare(rel, f"arms.{name}.network_means[{i}]", r, m, source)
        for name, control in (rec.get("controls") or {}).items():
            if isinstance(control, dict):
                accs = [float(e["accuracy"]) for e in control.get("episodes") or [] if "accuracy" in e]
                self._summary(rel, f"controls.{name}", control, accs)

    def _summary(self, rel: str, where: str, arm: dict[str, Any], accs: list[float]) -> None:
        summary = arm.get("summary")
        source = f"mean_ci of the {len(accs)} per-episode accuracies in {where}.episodes"
        if summary is None and not accs:  # a failed cell: no episodes, no summary
            return
        if not isinstance(summary, dict):
            self.compare(rel, f"{where}.summary", summary, summary_of(accs), source)
            return
        expected = summary_of(accs)
        for key in ("mean", "ci95", "std", "n"):
            if key in summary:
                self.compare(rel, f"{where}.summary.{key}", summary[key], expected[key], source)

    def row(self, results_rel: str, row: dict[str, str], root: Path, paths: StudyPaths) -> None:
        """A results row against the transfer record and arm it names."""
        tr_rel = rel_path(root, row.get("transfer_record", ""))
        arm_name = row.get("arm", "")
        where = f"row {row.get('row_id')}"
        rec = read_json(root, tr_rel) if tr_rel else None
        if rec is None:
            self.out.errors.append(f"{results_rel} {where}: its transfer record {tr_rel or '(none named)'} is missing "
                                   "or unreadable, so its accuracy columns cannot be recomputed")
            return
        arm = (rec.get("arms") or {}).get(arm_name)
        if not isinstance(arm, dict):
            self.out.errors.append(f"{results_rel} {where}: {tr_rel} has no arm {arm_name!r}, so its accuracy "
                                   "columns cannot be recomputed")
            return
        accs = arm_accuracies(arm)
        expected = summary_of(accs)
        source = f"mean_ci of the {len(accs)} per-episode accuracies of {tr_rel} arms.{arm_name}"
        for column, key in (("acc_mean", "mean"), ("acc_ci95", "ci95"), ("acc_std", "std"), ("n_episodes", "n")):
            if column in row:
                self.compare(results_rel, f"{where} {column}", row[column], expected[key], source)
        means = network_means(arm)
        nan = float("nan")
        for column, value in (("networks", len(means) if means else 1),
                              ("network_acc_min", min(means) if means else nan),
                              ("network_acc_max", max(means) if means else nan)):
            if column in row:
                self.compare(results_rel, f"{where} {column}", row[column], value,
                             f"per-network means over the episodes of {tr_rel} arms.{arm_name}")
        merged = {**rec, **arm, "arm": arm_name}
        copied = dict(COPIED)
        if isinstance(merged.get("achieved"), dict):
            copied |= ACHIEVED
        for column, key in copied.items():
            found, value = _dig(merged, key)
            if column in row and found:
                self.compare(results_rel, f"{where} {column}", row[column], value, f"{tr_rel} ({key})")
        eps = arm.get("episodes")
        if "seed_finetune" in row and isinstance(eps, list):
            first = eps[0].get("finetune_seed", "") if eps and isinstance(eps[0], dict) else ""
            self.compare(results_rel, f"{where} seed_finetune", row["seed_finetune"], first,
                         f"{tr_rel} (arms.{arm_name}.episodes[0].finetune_seed)")
        if "status" in row:
            self.compare(results_rel, f"{where} status", row["status"],
                         "failed" if rec.get("status") == "failed" else "ok", f"{tr_rel} (status)")


def check_values(root: Path, paths: StudyPaths, results_rel: str,
                 rows: list[dict[str, str]] | None = None) -> ValueCheck:
    """Recompute every number of ``paths``' transfer records and of the results table ``results_rel``
    (project-relative) that can be recomputed, and compare. ``rows``: only these rows and the transfer
    records they name (default: every transfer record of the study and every row of the table)."""
    checker = _Checker()
    if rows is None:
        transfers = [rel for rel in record_paths(root, paths) if (classify(paths, rel) or ("",))[0] == "transfer"]
        table = root / results_rel
        rows = read_results(table) if table.is_file() else []
    else:
        transfers = list(dict.fromkeys(rel_path(root, r.get("transfer_record", "")) for r in rows))
    for rel in transfers:
        rec = read_json(root, rel)
        if rec is not None:
            checker.record(rel, rec)
    for row in rows:
        checker.row(results_rel, row, root, paths)
    return checker.out
