"""benchmarks/episode_batch_equivalence.py: a cell that failed in a run is never counted identical.

The float64 comparison of the two engines once reported every target-side cell "identical" because
both runs had failed them (no episodes, equal empty lists). These records are written by hand in the
transfer record's shape (status, arms -> episodes)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("episode_batch_equivalence",
                                                  ROOT / "benchmarks/episode_batch_equivalence.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _record(path: Path, status: str, accs: list[float], batch: int, error: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    episodes = [{"episode": i, "accuracy": a} for i, a in enumerate(accs)]
    path.write_text(json.dumps({"method": "m", "side": "target", "status": status, "error": error,
                                "device": {"episode_batch": batch}, "arms": {"finetune": {"episodes": episodes}}}))


def test_failed_cells_are_not_compared(tmp_path: Path) -> None:
    ref, new = tmp_path / "ref", tmp_path / "new"
    _record(ref / "a.json", "ok", [0.5, 0.75], 1)
    _record(new / "a.json", "ok", [0.5, 0.75], 4)
    _record(ref / "b.json", "failed", [], 1, "expected scalar type Double")
    _record(new / "b.json", "failed", [], 4, "expected scalar type Double")
    _record(ref / "c.json", "ok", [0.5, 0.75], 1)
    _record(new / "c.json", "ok", [0.5, 0.70], 4)
    result = _module().compare(ref, new)
    assert (result["cells"], result["compared"], result["identical"]) == (3, 2, 1)
    assert [r["record"] for r in result["differing"]] == ["c.json"]
    assert result["not_compared"] == [{"record": "b.json", "arm": "finetune", "status": ["failed", "failed"],
                                       "error": ["expected scalar type Double", "expected scalar type Double"]}]
    row = next(r for r in result["rows"] if r["record"] == "a.json")
    assert row["identical"] and row["episode_batch"] == [1, 4]
