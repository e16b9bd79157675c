"""`pruneshot audit`: the lineage of a results row, and --verify against the records and dvc.lock.

Two studies: a hand-written one (records in the layout of :mod:`pruneshot.paths`, committed with the
real `dvc commit`; fast, no training) and, marked ``integration``, the session's finished tiny study.
Every test works on a copy (the shared study is never touched)."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import BIN, run

from pruneshot.audit import records, text
from pruneshot.audit.dvc import DvcOutputs
from pruneshot.audit.lineage import lineage
from pruneshot.audit.verify import verify
from pruneshot.cli import main
from pruneshot.paths import StudyPaths
from pruneshot.report.stats import mean_ci

integration = pytest.mark.integration


def rows(root: Path, paths: StudyPaths) -> list[dict[str, str]]:
    with open(root / paths.result("results_csv"), newline="") as f:
        return list(csv.DictReader(f))


def read(root: Path, rel: str) -> dict:
    return json.loads((root / rel).read_text())


def flip_byte(path: Path, pick: str = "last") -> None:
    """XOR one byte with 1: the last byte, or (``pick='digit'``) a digit in the middle, which stays a digit."""
    blob = bytearray(path.read_bytes())
    if pick == "digit":
        i = next(i for i in range(len(blob) // 2, len(blob)) if chr(blob[i]).isdigit())
    else:
        i = len(blob) - 1
    blob[i] ^= 1
    path.write_bytes(bytes(blob))


def pruneshot(root: Path, *args: str) -> Any:
    return run([str(BIN / "pruneshot"), "audit", *args], root, check=False)


def mismatch_lines(stdout: str) -> list[str]:
    return [ln for ln in stdout.splitlines() if ln.startswith(("MISMATCH", "MISSING", "EXTRA", "ERROR"))]


# --- a hand-written study ------------------------------------------------------------------------

U = StudyPaths("unit")
U_CHECKPOINT = U.result("search_weights", method="random", budget="0.5", replicate=0)
U_PRETRAIN = U.result("pretrain_weights", replicate=0)
U_EPISODES = U.result("episodes", target="digits_5to9", ways=5, shots=1)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class _Writer:
    def __init__(self, root: Path) -> None:
        self.root = root

    def blob(self, rel: str, size: int = 64) -> str:
        p = self.root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(hashlib.sha512(rel.encode()).digest() * (size // 64))
        return _sha(p)

    def json(self, rel: str, obj: dict) -> str:
        p = self.root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(obj, indent=1))
        return _sha(p)

    def inputs(self, *rels: str) -> dict[str, str]:
        return {r: _sha(self.root / r) for r in rels}


def _prov(rule: str, inputs: dict[str, str], **seeds: int) -> dict[str, Any]:
    return {"git_commit": "c0ffee", "git_dirty": False, "config_sha256": "cfg", "rule": rule, "wildcards": {},
            "seeds": seeds, "inputs": inputs}


def write_study(root: Path) -> None:
    """Records of a source-side (random, searched) and a target-side (basis_scaling, no search) method,
    as the workflow writes them, and their results rows."""
    w = _Writer(root)
    src = U.result("source_manifest")
    splits = {s: {"file": f"{s}.safetensors", "sha256": w.blob(U.result(f"source_{s}"))} for s in ("train", "val")}
    w.json(src, {"dataset": "digits", "split": "source", "classes": [0, 1], "image_shape": [1, 8, 8],
                 "split_seed": 7, "splits": splits, "provenance": _prov("prepare_source", {})})
    tgt = U.result("target_manifest", target="digits_5to9")
    pool = U.result("target_pool", target="digits_5to9")
    w.json(tgt, {"dataset": "digits", "split": "target", "classes": [5, 6], "image_shape": [1, 8, 8],
                 "splits": {"pool": {"file": "pool.safetensors", "sha256": w.blob(pool)}},
                 "provenance": _prov("prepare_target", {})})
    w.json(U_EPISODES, {"ways": 5, "shots": 1, "queries_per_class": 2, "episodes": [{"index": 0}, {"index": 1}],
                        "pool_sha256": _sha(root / pool), "provenance": _prov("make_episodes", w.inputs(tgt))})
    pre_arch, pre_metrics = U.result("pretrain_arch", replicate=0), U.result("pretrain_metrics", replicate=0)
    w.blob(U_PRETRAIN, 256)
    w.json(pre_arch, {"widths": [8]})
    w.json(pre_metrics, {"weights_sha256": _sha(root / U_PRETRAIN), "mlflow_run_id": "run-pre",
                         "provenance": _prov("pretrain", w.inputs(src), pretrain=1)})
    wc = {"method": "random", "budget": "0.5", "replicate": 0}
    se_rec, se_arch = U.result("search_record", **wc), U.result("search_arch", **wc)
    w.blob(U_CHECKPOINT, 128)
    w.json(se_arch, {"widths": [4]})
    w.json(se_rec, {"method": "random", "side": "source", "method_provenance": "baseline",
                    "weights_sha256": _sha(root / U_CHECKPOINT), "mlflow_run_id": "run-se",
                    "upstream_run_id": "run-pre",
                    "provenance": _prov("search", w.inputs(U_PRETRAIN, pre_arch, src), search=3)})
    results = []
    for method, side in (("random", "source"), ("basis_scaling", "target")):
        tr = U.result("transfer", target="digits_5to9", method=method, budget="0.5", shots=1, replicate=0)
        episodes = [{"episode": i, "accuracy": a, "finetune_seed": 10 + i} for i, a in enumerate((0.5, 0.7))]
        summary = mean_ci([e["accuracy"] for e in episodes])  # as the transfer stage records it
        rec: dict[str, Any] = {"method": method, "side": side, "status": "ok", "mlflow_run_id": f"run-tr-{method}",
                               "arms": {"finetune": {"episodes": episodes, "summary": summary}}}
        if side == "source":
            net = [U_CHECKPOINT, se_arch]
            rec |= {"network_record": se_rec, "network_record_sha256": _sha(root / se_rec),
                    "weights_sha256": _sha(root / U_CHECKPOINT), "upstream_run_id": "run-se"}
            prof = U.result("profile", **wc)
        else:
            net = [U_PRETRAIN, pre_arch, pre_metrics]
            rec |= {"network_record": pre_metrics, "weights_sha256": _sha(root / U_PRETRAIN),
                    "upstream_run_id": "run-pre"}
            prof = U.result("profile_adapted", method=method, budget="0.5", target="digits_5to9", shots=1,
                            replicate=0)
        rec["provenance"] = _prov("transfer", w.inputs(*net, src, tgt, U_EPISODES), search=3)
        w.json(tr, rec)
        prof_inputs = w.inputs(*net[:2], *([tr] if side == "target" else []))
        w.json(prof, {"status": "ok", "network": {"from": "search" if side == "source" else "per-episode"},
                      "weights_sha256": _sha(root / net[0]), "provenance": _prov("profile", prof_inputs)})
        results.append({"row_id": hashlib.sha256(method.encode()).hexdigest()[:10], "method": method, "side": side,
                        "requested_budget": "0.5", "target": "digits_5to9", "ways": "5", "shots": "1",
                        "arm": "finetune", "replicate": "0", "acc_mean": repr(summary["mean"]),
                        "acc_ci95": repr(summary["ci95"]), "n_episodes": "2", "git_commit": "c0ffee",
                        "git_dirty": "False", "config_sha256": "cfg",
                        "checkpoint_sha256": _sha(root / net[0]), "pretrain_sha256": _sha(root / U_PRETRAIN),
                        "data_sha256": _sha(root / tgt), "transfer_record": tr})
    table = root / U.result("results_csv")
    table.parent.mkdir(parents=True, exist_ok=True)
    with open(table, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(results[0]))
        writer.writeheader()
        writer.writerows(results)


@pytest.fixture(scope="module")
def unit_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The hand-written study in a git + DVC project, its outputs committed by `dvc commit`."""
    root = tmp_path_factory.mktemp("audit-unit") / "p"
    (root / "config").mkdir(parents=True)
    (root / "config/config.yaml").write_text("study:\n  name: unit\n")
    write_study(root)
    outs = "".join(f"      - {U.results_root}/{d}:\n          persist: true\n"
                   for d in ("data", "episodes", "pretrain", "search", "transfer", "profile", "tables"))
    (root / "dvc.yaml").write_text(f"stages:\n  pipeline:\n    cmd: 'true'\n    outs:\n{outs}")
    run(["git", "init", "-q"], root)
    run([str(BIN / "dvc"), "init", "-q"], root)
    run([str(BIN / "dvc"), "config", "core.analytics", "false"], root)
    run([str(BIN / "dvc"), "commit", "-f", "-q", "pipeline"], root)
    return root


@pytest.fixture()
def unit(unit_study: Path, tmp_path: Path) -> Path:
    """A throw-away copy of the hand-written study to damage."""
    dst = tmp_path / "p"
    shutil.copytree(unit_study, dst, symlinks=True)
    return dst


def unit_row(root: Path, method: str) -> dict[str, str]:
    return next(r for r in rows(root, U) if r["method"] == method)


def test_lineage_of_a_source_side_row_follows_network_record(unit_study: Path) -> None:
    lin = lineage(unit_study, unit_row(unit_study, "random"), U)
    tree = lin["tree"]
    assert [c["level"] for c in tree["children"]] == ["pruned network", "source data", "target data", "episodes",
                                                      "profile"]
    network = tree["children"][0]
    search = network["children"][0]
    backbone = search["children"][0]
    assert network["record"] == search["record"] == U.result("search_record", method="random", budget="0.5",
                                                             replicate=0)
    assert backbone["level"] == "pretrained backbone" and backbone["record"] == U.result("pretrain_metrics",
                                                                                         replicate=0)
    assert tree["children"][-1]["record"] == U.result("profile", method="random", budget="0.5", replicate=0)
    assert tree["record_episodes"] == 2  # the per-arm `episodes` list
    every = [r for f in [*network["files"], *backbone["files"]] for r in f["recorded"]]
    assert every and all(r["ok"] for r in every) and {r["algo"] for r in every} == {"sha256", "md5"}
    checkpoint = next(f for f in network["files"] if f["path"] == U_CHECKPOINT)
    bys = {r["by"] for r in checkpoint["recorded"]}
    assert any("(weights_sha256)" in b for b in bys) and any("checkpoint_sha256" in b for b in bys)
    assert any(b.startswith("dvc.lock (stage pipeline, out results/unit/search)") for b in bys)


def test_lineage_of_a_target_side_row_has_no_search(unit_study: Path) -> None:
    row = unit_row(unit_study, "basis_scaling")
    lin = lineage(unit_study, row, U)
    tree = lin["tree"]
    assert [c["level"] for c in tree["children"]] == ["pretrained backbone", "source data", "target data",
                                                      "episodes", "profile"]
    assert tree["children"][0]["record"] == U.result("pretrain_metrics", replicate=0)
    assert tree["children"][-1]["record"] == U.result("profile_adapted", method="basis_scaling", budget="0.5",
                                                      target="digits_5to9", shots=1, replicate=0)
    assert "note" not in tree["children"][-1]  # found
    weights = next(f for f in tree["children"][0]["files"] if f["path"] == U_PRETRAIN)
    assert {r["by"].split(" (")[0] for r in weights["recorded"] if r["algo"] == "sha256"} >= {
        row["transfer_record"], U.result("pretrain_metrics", replicate=0), U.result("results_csv")}
    assert all(r["ok"] for r in weights["recorded"])
    out = text.format_lineage(lin)
    assert "- pretrained backbone: results/unit/pretrain/r0/metrics.json" in out and "- search" not in out


def test_verify_passes_and_reproduces_dvc_directory_hashes(unit_study: Path) -> None:
    result = verify(unit_study)  # the study of config/config.yaml
    assert result.ok and not result.notes and not result.errors, text.format_verify(result)
    assert result.recomputed > 0 and not result.value_mismatches
    dvc = DvcOutputs(unit_study, records.Hasher(unit_study))
    assert dvc.present and len(dvc.dirs) == 7 and all(d.listing is not None for d in dvc.dirs)
    for d in dvc.dirs:  # the directory hashes DVC wrote, reproduced from the files
        assert dvc.workspace_dir_md5(d) == d.md5, d.path
    assert result.artefacts >= sum(len(d.workspace) for d in dvc.dirs)


def test_verify_catches_a_flipped_byte_in_a_checkpoint(unit: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recorded = read(unit, U.result("search_record", method="random", budget="0.5", replicate=0))["weights_sha256"]
    flip_byte(unit / U_CHECKPOINT)
    result = verify(unit, "unit")
    assert not result.ok
    assert {m.path for m in result.mismatches} == {U_CHECKPOINT}
    sha = next(m for m in result.mismatches if m.algo == "sha256")
    assert sha.expected == recorded and sha.actual == _sha(unit / U_CHECKPOINT)
    assert any(b.endswith("record.json (weights_sha256)") for b in sha.by)
    assert any("(provenance.inputs)" in b and "/transfer/" in b for b in sha.by)
    md5 = next(m for m in result.mismatches if m.algo == "md5")
    assert md5.by[0].startswith("dvc.lock (stage pipeline, out results/unit/search)")
    # only the lineages that hold the checkpoint fail
    assert main(["audit", "--root", str(unit), "--verify", unit_row(unit, "random")["row_id"]]) == 1
    assert main(["audit", "--root", str(unit), "--verify", unit_row(unit, "basis_scaling")["row_id"]]) == 0
    capsys.readouterr()
    assert main(["audit", "--root", str(unit), "--verify"]) == 1
    assert all(ln.startswith(f"MISMATCH {U_CHECKPOINT}:") for ln in mismatch_lines(capsys.readouterr().out))


def test_unit_verify_catches_a_flipped_byte_in_an_episodes_file(unit: Path, capsys: pytest.CaptureFixture[str]) -> None:
    flip_byte(unit / U_EPISODES, pick="digit")
    json.loads((unit / U_EPISODES).read_text())  # still valid JSON: only the hash tells
    assert main(["audit", "--root", str(unit), "--study", "unit", "--verify", "--json"]) == 1
    got = json.loads(capsys.readouterr().out)
    assert {m["path"] for m in got["mismatches"]} == {U_EPISODES}
    assert {m["algo"] for m in got["mismatches"]} == {"sha256", "md5"}


def test_unit_verify_without_the_dvc_cache_and_with_an_extra_file(unit: Path) -> None:
    extra = U.result("search_record", method="random", budget="0.5", replicate=0).replace("record.json", "notes.txt")
    (unit / extra).write_text("added after the run\n")
    result = verify(unit)
    assert [(m.path, m.expected) for m in result.mismatches] == [(extra, None)]
    assert text.mismatch_line(result.mismatches[0]).startswith("EXTRA")
    (unit / extra).unlink()
    shutil.rmtree(unit / ".dvc/cache")
    flip_byte(unit / U_PRETRAIN)
    result = verify(unit)
    paths = {m.path: m for m in result.mismatches}
    assert set(paths) == {f"{U.results_root}/pretrain/", U_PRETRAIN}
    assert "cannot be named" in text.mismatch_line(paths[f"{U.results_root}/pretrain/"])
    assert any("(weights_sha256)" in b for b in paths[U_PRETRAIN].by)


def test_a_local_remote_supplies_the_listings(unit: Path) -> None:
    """Without the cache, the .dir listings of a remote on this machine still name the changed file."""
    remote = unit.parent / "remote"
    run([str(BIN / "dvc"), "remote", "add", "-q", "store", str(remote)], unit)
    run([str(BIN / "dvc"), "push", "-q", "-r", "store"], unit)
    shutil.rmtree(unit / ".dvc/cache")
    flip_byte(unit / U_PRETRAIN)
    result = verify(unit)
    assert {(m.path, m.algo) for m in result.mismatches} == {(U_PRETRAIN, "sha256"), (U_PRETRAIN, "md5")}
    assert not (unit / ".dvc/cache").exists()  # read in place, never pulled


def test_a_corrupt_dir_listing_is_not_used(unit: Path) -> None:
    dvc = DvcOutputs(unit, records.Hasher(unit))
    d = next(d for d in dvc.dirs if d.path.endswith("/episodes"))
    name = d.md5.removesuffix(".dir")
    listing = unit / ".dvc/cache/files/md5" / name[:2] / f"{name[2:]}.dir"
    listing.chmod(0o644)
    listing.write_text(json.dumps([{"md5": "0" * 32, "relpath": "digits_5to9/5way_1shot.json"}]))
    dvc = DvcOutputs(unit, records.Hasher(unit))
    assert next(d for d in dvc.dirs if d.path.endswith("/episodes")).listing is None
    assert any("corrupt .dir listing" in n for n in dvc.notes)
    assert verify(unit).ok  # compared as a whole, which still holds


def test_unreadable_dvc_lock_fails_the_verification(unit: Path) -> None:
    (unit / "dvc.lock").write_text("stages: [not, a, mapping\n")
    result = verify(unit)
    assert not result.ok and result.errors and "DVC cannot read" in result.errors[0]


def test_study_selection(unit: Path, capsys: pytest.CaptureFixture[str]) -> None:
    row = unit_row(unit, "random")
    assert main(["audit", "--root", str(unit), "--json", row["row_id"]]) == 0  # study.name of config/config.yaml
    assert json.loads(capsys.readouterr().out)["study"] == "unit"
    other = unit / "other.yaml"
    other.write_text("study:\n  name: nowhere\n")
    assert main(["audit", "--root", str(unit), "--config", str(other), row["row_id"]]) == 2
    err = capsys.readouterr().err
    assert "no results of study 'nowhere'" in err and "studies with results here: unit" in err
    assert main(["audit", "--root", str(unit), "--study", "nowhere", "--verify"]) == 2
    capsys.readouterr()
    # a results table or a transfer record names its study
    (unit / "config/config.yaml").write_text("study:\n  name: nowhere\n")
    assert main(["audit", "--root", str(unit), "--json", str(unit / U.result("results_csv"))]) == 0
    assert len(json.loads(capsys.readouterr().out)["rows"]) == 2
    assert main(["audit", "--root", str(unit), "--json", str(unit / row["transfer_record"])]) == 0
    assert [r["row"]["row_id"] for r in json.loads(capsys.readouterr().out)["rows"]] == [row["row_id"]]


def test_unknown_and_ambiguous_row_ids_exit_2(unit_study: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ids = [r["row_id"] for r in rows(unit_study, U)]
    assert main(["audit", "--root", str(unit_study), "not-a-row"]) == 2
    assert "no row 'not-a-row'" in capsys.readouterr().err
    near = ids[0][:-1] + ("0" if ids[0][-1] != "0" else "1")  # one character off
    assert main(["audit", "--root", str(unit_study), near]) == 2
    err = capsys.readouterr().err
    assert "close matches" in err and ids[0] in err
    assert main(["audit", "--root", str(unit_study), ""]) == 2  # a prefix of every row
    assert "ambiguous" in capsys.readouterr().err
    proc = pruneshot(unit_study, "not-a-row")  # the console entry point
    assert proc.returncode == 2 and "no row" in proc.stderr


def test_arm_accuracies_reads_both_forms() -> None:
    assert records.arm_accuracies({"episodes": [{"episode": 0, "accuracy": 0.5, "finetune_seed": 1}]}) == [0.5]
    assert records.arm_accuracies({"episode_accuracies": [0.25, 0.75], "finetune_seeds": [1, 2]}) == [0.25, 0.75]


def _edit_row(root: Path, method: str, **values: str) -> dict[str, str]:
    """Set columns of ``method``'s row in the unit study's results table; the row as it was."""
    table = root / U.result("results_csv")
    old = rows(root, U)
    before = next(r for r in old if r["method"] == method)
    with open(table, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(old[0]))
        writer.writeheader()
        writer.writerows([{**r, **values} if r["method"] == method else r for r in old])
    return before


U_TRANSFER = U.result("transfer", target="digits_5to9", method="random", budget="0.5", shots=1, replicate=0)


@pytest.mark.parametrize(("key", "column", "edited"), [("mean", "acc_mean", 0.907), ("ci95", "acc_ci95", 0.05),
                                                      ("n", "n_episodes", 3)])
def test_verify_recomputes_an_edited_transfer_summary_without_dvc_lock(
        unit: Path, capsys: pytest.CaptureFixture[str], key: str, column: str, edited: float) -> None:
    """An edited summary in a transfer record (its per-episode accuracies untouched), copied into the
    results row as the aggregate stage would: no hash covers either file without dvc.lock, the
    recomputation names both."""
    (unit / "dvc.lock").unlink()
    rec = read(unit, U_TRANSFER)
    recomputed = rec["arms"]["finetune"]["summary"][key]
    rec["arms"]["finetune"]["summary"][key] = edited
    (unit / U_TRANSFER).write_text(json.dumps(rec, indent=1))
    row = _edit_row(unit, "random", **{column: str(edited)})
    result = verify(unit)
    assert not result.mismatches  # no recorded hash of either file: hashing alone would pass
    assert [(m.path, m.field, m.recorded, m.recomputed) for m in result.value_mismatches] == [
        (U_TRANSFER, f"arms.finetune.summary.{key}", edited, recomputed),
        (U.result("results_csv"), f"row {row['row_id']} {column}", str(edited), recomputed)]
    assert main(["audit", "--root", str(unit), "--verify"]) == 1
    out = capsys.readouterr().out
    assert mismatch_lines(out) == [
        f"MISMATCH {U_TRANSFER}: arms.finetune.summary.{key} recorded {edited}, recomputed {recomputed} "
        "(from mean_ci of the 2 per-episode accuracies in arms.finetune.episodes)",
        f"MISMATCH {U.result('results_csv')}: row {row['row_id']} {column} recorded {edited}, recomputed "
        f"{recomputed} (from mean_ci of the 2 per-episode accuracies of {U_TRANSFER} arms.finetune)"]
    assert "no dvc.lock" in out and "2 mismatch(es)" in out
    # the row's lineage fails, the other row's holds
    assert main(["audit", "--root", str(unit), "--verify", row["row_id"]]) == 1
    assert main(["audit", "--root", str(unit), "--verify", unit_row(unit, "basis_scaling")["row_id"]]) == 0


def test_verify_recomputes_an_edited_results_row_without_dvc_lock(unit: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    (unit / "dvc.lock").unlink()
    row = _edit_row(unit, "basis_scaling", acc_mean="0.907")
    recomputed = mean_ci([0.5, 0.7])["mean"]
    assert main(["audit", "--root", str(unit), "--verify", "--json"]) == 1
    got = json.loads(capsys.readouterr().out)
    assert not got["ok"] and not got["mismatches"]
    assert got["value_mismatches"] == [{
        "path": U.result("results_csv"), "field": f"row {row['row_id']} acc_mean", "recorded": "0.907",
        "recomputed": recomputed, "recomputed_from": f"mean_ci of the 2 per-episode accuracies of "
                                                     f"{row['transfer_record']} arms.finetune"}]
    assert main(["audit", "--root", str(unit), "--verify"]) == 1
    assert mismatch_lines(capsys.readouterr().out) == [
        f"MISMATCH {U.result('results_csv')}: row {row['row_id']} acc_mean recorded 0.907, recomputed {recomputed} "
        f"(from mean_ci of the 2 per-episode accuracies of {row['transfer_record']} arms.finetune)"]
    # a column the aggregate stage copies from the record as it is
    _edit_row(unit, "basis_scaling", acc_mean=row["acc_mean"], git_commit="deadbeef")
    result = verify(unit)
    assert [(m.field, m.recorded, m.recomputed) for m in result.value_mismatches] == [
        (f"row {row['row_id']} git_commit", "deadbeef", "c0ffee")]


def test_verify_of_an_unedited_study_recomputes_and_passes_without_dvc_lock(
        unit: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (unit / "dvc.lock").unlink()
    result = verify(unit)
    assert result.ok and not result.value_mismatches and not result.errors, text.format_verify(result)
    assert result.recomputed >= 2 * 4 + 2 * 4  # each record's summary, each row's accuracy columns
    assert any("no dvc.lock" in n for n in result.notes)
    assert main(["audit", "--root", str(unit), "--verify"]) == 0
    out = capsys.readouterr().out
    assert f"{result.recomputed} recomputed values: all match" in out and not mismatch_lines(out)


def test_a_row_whose_transfer_record_is_missing_is_an_error(unit: Path) -> None:
    (unit / U_TRANSFER).unlink()
    result = verify(unit)
    assert not result.ok
    assert any(f"its transfer record {U_TRANSFER} is missing" in e for e in result.errors)


def _hex64(out: str) -> list[str]:
    import re

    return re.findall(r"\b[0-9a-f]{64}\b", out)


def test_several_rows_are_short_by_default_one_line_per_level(unit_study: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "--root", str(unit_study)]) == 0  # every row
    out = capsys.readouterr().out
    lines = out.splitlines()
    heads = [ln for ln in lines if ln.startswith("row ")]
    assert len(heads) == 2 and all("60.0 ± 19.6 %" in h and "commit c0ffee" in h for h in heads)
    levels = [ln.strip().split(":")[0] for ln in lines if ln.startswith(" ")]
    source_side = ["transfer run", "pruned network", "search", "pretrained backbone", "source data", "target data",
                   "episodes", "profile"]
    target_side = ["transfer run", "pretrained backbone", "source data", "target data", "episodes", "profile"]
    assert levels == source_side + target_side  # random, then basis_scaling; no level repeated
    assert len(lines) == 2 + len(source_side) + len(target_side)
    assert not _hex64(out) and "MISMATCH" not in out and "hashes ok" in out
    rec = next(ln for ln in lines if ln.strip().startswith("pretrained backbone:"))
    assert "results/unit/pretrain/r0/metrics.json: rule pretrain, mlflow run-pre," in rec
    # --long: today's whole tree, every hash
    assert main(["audit", "--root", str(unit_study), "--long"]) == 0
    long = capsys.readouterr().out
    assert len(long.splitlines()) > 4 * len(lines) and "recorded by" in long and _hex64(long)
    with pytest.raises(SystemExit):
        main(["audit", "--root", str(unit_study), "--short", "--long"])
    capsys.readouterr()


def test_one_row_is_long_by_default_and_short_on_request(unit_study: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    row = unit_row(unit_study, "random")
    assert main(["audit", "--root", str(unit_study), row["row_id"]]) == 0
    long = capsys.readouterr().out
    assert long.rstrip("\n") == text.format_lineage(lineage(unit_study, row, U))
    assert main(["audit", "--root", str(unit_study), "--short", row["row_id"]]) == 0
    short = capsys.readouterr().out.splitlines()
    assert short[0].startswith(f"row {row['row_id']}: random b0.5 digits_5to9 5-way 1-shot finetune r0: 60.0")
    assert len(short) == 9 and not _hex64("\n".join(short))


def test_short_names_every_mismatch(unit: Path, capsys: pytest.CaptureFixture[str]) -> None:
    flip_byte(unit / U_CHECKPOINT)
    tr = read(unit, U_TRANSFER)
    tr["arms"]["finetune"]["summary"]["mean"] = 0.9  # the record no longer says what the row says
    (unit / U_TRANSFER).write_text(json.dumps(tr))
    assert main(["audit", "--root", str(unit), "--short", unit_row(unit, "random")["row_id"]]) == 0
    lines = capsys.readouterr().out.splitlines()
    bad = [ln for ln in lines if "MISMATCH" in ln or "DIFFERS" in ln]
    assert [ln.strip().split(":")[0] for ln in bad] == ["transfer run", "pruned network"]
    assert "record accuracy 0.9 DIFFERS" in bad[0]
    assert f"{U_CHECKPOINT} sha256 MISMATCH; {U_CHECKPOINT} md5 MISMATCH" in bad[1]


# --- the session's finished tiny study (needs the whole pipeline: tests/conftest.py `project`) ------

P = StudyPaths("tiny")
CHECKPOINT = P.result("search_weights", method="random", budget="0.5", replicate=0)
EPISODES = P.result("episodes", target="digits_5to9", ways=5, shots=1)


@pytest.fixture(scope="module")
def study(project: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the finished study. Another module may have rerun a job in the shared project
    (a rewritten transfer record), so the copy's dvc.lock is first brought up to date with its outputs."""
    dst = tmp_path_factory.mktemp("audit") / "p"
    shutil.copytree(project, dst, symlinks=True)
    run([str(BIN / "dvc"), "commit", "-f", "-q", "pipeline"], dst)
    return dst


@pytest.fixture()
def damaged(study: Path, tmp_path: Path) -> Path:
    """A throw-away copy of the study to flip bytes in."""
    dst = tmp_path / "p"
    shutil.copytree(study, dst, symlinks=True)
    return dst


def row_of(root: Path, method: str = "random", shots: str = "5", arm: str = "finetune") -> dict[str, str]:
    return next(r for r in rows(root, P) if (r["method"], r["shots"], r["arm"]) == (method, shots, arm))


@integration
def test_lineage_of_a_row_shows_every_level_with_its_hashes(study: Path) -> None:
    row = row_of(study)
    proc = pruneshot(study, row["row_id"])  # the console entry point, the study of config/config.yaml
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    tr_rel = row["transfer_record"]
    tr = read(study, tr_rel)
    search_rel = P.result("search_record", method="random", budget="0.5", replicate=0)
    se = read(study, search_rel)
    pre_rel = P.result("pretrain_metrics", replicate=0)
    pre = read(study, pre_rel)
    tgt_rel, src_rel = P.result("target_manifest", target="digits_5to9"), P.result("source_manifest")
    target, source = read(study, tgt_rel), read(study, src_rel)
    eps_rel = P.result("episodes", target="digits_5to9", ways=5, shots=5)
    inputs = tr["provenance"]["inputs"]
    # the row, with its number
    assert f"row {row['row_id']}: random at budget 0.5" in out
    assert f"accuracy {100 * float(row['acc_mean']):.1f} ± {100 * float(row['acc_ci95']):.1f} %" in out
    # every level, in order, with its record
    order = [f"- transfer run: {tr_rel}", f"- pruned network: {search_rel}", f"- search: {search_rel}",
             f"- pretrained backbone: {pre_rel}", f"- source data: {src_rel}", f"- target data: {tgt_rel}",
             f"- episodes: {eps_rel}", f"- profile: {P.result('profile', method='random', budget='0.5', replicate=0)}"]
    positions = [out.index(line) for line in order]
    assert positions == sorted(positions)
    # paths with their hashes as the records hold them
    for path, sha in [(CHECKPOINT, se["weights_sha256"]), (CHECKPOINT, tr["weights_sha256"]),
                      (search_rel, tr["network_record_sha256"]),
                      (P.result("pretrain_weights", replicate=0), pre["weights_sha256"]),
                      (src_rel, inputs[src_rel]),
                      (P.result("target_pool", target="digits_5to9"), target["splits"]["pool"]["sha256"]),
                      (P.result("source_train"), source["splits"]["train"]["sha256"]),
                      (eps_rel, inputs[eps_rel])]:
        assert f"file {path}\n" in out
        block = out.split(f"file {path}\n", 1)[1].split("file ", 1)[0]
        assert f"sha256 {sha}" in block, path
    # MLflow runs (logged by sync_tracking after the jobs: the ids come from mlflow/sync.json by the
    # records' spool ids), seeds, rules, commit and config of each job
    runs = json.loads((study / P.result("sync_json")).read_text())["runs"]
    ids = {}
    for name, rec in (("transfer", tr), ("search", se), ("pretrain", pre)):
        assert rec["mlflow_run_id"] is None and rec["mlflow_spool_id"] in runs  # deferred (mlflow.live: false)
        ids[name] = runs[rec["mlflow_spool_id"]]
        assert f"mlflow run {ids[name]}" in out
        assert f"rule {rec['provenance']['rule']} " in out
    assert f"upstream run {ids['search']}" in out and f"upstream run {ids['pretrain']}" in out
    assert f"search={tr['provenance']['seeds']['search']}" in out
    assert f"split_seed={source['split_seed']}" in out
    assert f"commit {tr['provenance']['git_commit']} (clean), config sha256 {tr['provenance']['config_sha256']}" in out
    assert "rule make_episodes" in out and "rule prepare_source" in out and "rule prepare_target" in out
    assert "MISMATCH" not in out and "MISSING" not in out
    assert "(same commit)" in out and "config/config.yaml now hashes to" in out  # compared with the run's
    # dvc.lock's md5 of each file is shown and holds
    assert "md5" in out and "recorded by dvc.lock" in out


@integration
def test_lineage_tree_of_a_target_side_row(study: Path) -> None:
    row = row_of(study, method="basis_scaling", shots="1")  # target-side: prunes per episode, no search
    tree = lineage(study, row, P)["tree"]
    assert tree["level"] == "transfer run" and tree["record"] == row["transfer_record"]
    assert [c["level"] for c in tree["children"]] == ["pretrained backbone", "source data", "target data",
                                                      "episodes", "profile"]
    backbone = tree["children"][0]
    assert backbone["record"] == P.result("pretrain_metrics", replicate=0)
    assert backbone["children"][0]["level"] == "source data"
    cell = P.regex("transfer").fullmatch(row["transfer_record"])
    assert cell is not None
    assert tree["children"][-1]["record"] == P.result("profile_adapted", **cell.groupdict())
    for node in (tree, backbone):
        assert node["git_commit"] == row["git_commit"] and node["config_sha256"] == row["config_sha256"]
    every = [r for f in backbone["files"] for r in f["recorded"]]
    assert every and all(r["ok"] for r in every)
    assert {r["algo"] for r in every} == {"sha256", "md5"}


@integration
def test_prefix_transfer_record_results_file_and_json(study: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ids = [r["row_id"] for r in rows(study, P)]
    row = row_of(study)
    prefix = next(row["row_id"][:n] for n in range(1, 11) if sum(i.startswith(row["row_id"][:n]) for i in ids) == 1)
    assert main(["audit", "--root", str(study), prefix, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["study"] == "tiny" and [r["row"]["row_id"] for r in got["rows"]] == [row["row_id"]]
    assert got["rows"][0]["tree"]["record"] == row["transfer_record"]
    # a transfer record: the rows it produced (one per arm)
    assert main(["audit", "--root", str(study), "--json", row["transfer_record"]]) == 0
    got = json.loads(capsys.readouterr().out)
    arms = yaml.safe_load((study / "config/config.yaml").read_text())["transfer"]["arms"]
    assert sorted(r["row"]["arm"] for r in got["rows"]) == sorted(arms)
    # a results file: every row
    assert main(["audit", "--root", str(study), "--json", str(study / P.result("results_csv"))]) == 0
    got = json.loads(capsys.readouterr().out)
    assert sorted(r["row"]["row_id"] for r in got["rows"]) == sorted(ids)


@integration
def test_verify_passes_on_the_untouched_study(study: Path) -> None:
    proc = pruneshot(study, "--verify")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "all match" in proc.stdout
    result = verify(study, "tiny")
    assert result.ok and not result.notes
    dvc = DvcOutputs(study, records.Hasher(study))
    assert dvc.present and dvc.dirs and all(d.listing is not None for d in dvc.dirs)
    assert result.artefacts >= len(dvc.files)
    for d in dvc.dirs:  # the directory hashes DVC wrote, reproduced from the files
        assert dvc.workspace_dir_md5(d) == d.md5, d.path
    proc = pruneshot(study, "--verify", row_of(study)["row_id"])
    assert proc.returncode == 0 and "lineage of 1 row(s)" in proc.stdout


@integration
def test_verify_catches_a_flipped_byte_in_a_search_checkpoint(study: Path, damaged: Path) -> None:
    search_rel = P.result("search_record", method="random", budget="0.5", replicate=0)
    recorded = read(study, search_rel)["weights_sha256"]
    flip_byte(damaged / CHECKPOINT)
    actual = records.Hasher(damaged).get(CHECKPOINT)
    assert actual != recorded
    proc = pruneshot(damaged, "--verify")
    assert proc.returncode == 1, proc.stdout
    lines = mismatch_lines(proc.stdout)
    mine = [ln for ln in lines if ln.startswith(f"MISMATCH {CHECKPOINT}:")]
    assert lines == mine and mine  # nothing else is reported
    by_record = next(ln for ln in mine if " sha256 " in ln)
    assert f"recorded {recorded}, actual {actual}" in by_record
    assert f"{search_rel} (weights_sha256)" in by_record
    tr_rel = P.result("transfer", target="digits_5to9", method="random", budget="0.5", shots=5, replicate=0)
    assert f"{tr_rel} (provenance.inputs)" in by_record
    assert f"{P.result('results_csv')} (row" in by_record
    by_lock = next(ln for ln in mine if " md5 " in ln)
    assert "dvc.lock (stage pipeline" in by_lock
    # only the lineages that hold the checkpoint fail
    assert pruneshot(damaged, "--verify", row_of(damaged)["row_id"]).returncode == 1
    assert pruneshot(damaged, "--verify", row_of(damaged, method="dense")["row_id"]).returncode == 0
    # the lineage view marks it
    assert "MISMATCH sha256" in pruneshot(damaged, row_of(damaged)["row_id"]).stdout


@integration
def test_verify_catches_a_flipped_byte_in_an_episodes_file(damaged: Path) -> None:
    flip_byte(damaged / EPISODES, pick="digit")
    json.loads((damaged / EPISODES).read_text())  # still valid JSON: only the hash tells
    result = verify(damaged, "tiny")
    assert not result.ok
    assert {m.path for m in result.mismatches} == {EPISODES}
    assert {m.algo for m in result.mismatches} == {"sha256", "md5"}
    sha = next(m for m in result.mismatches if m.algo == "sha256")
    assert any(b.startswith(f"{P.results_root}/transfer/digits_5to9/") and b.endswith("(provenance.inputs)")
               for b in sha.by)
    md5 = next(m for m in result.mismatches if m.algo == "md5")
    assert md5.by[0].startswith("dvc.lock (stage pipeline")
    proc = pruneshot(damaged, "--verify", "--json")
    assert proc.returncode == 1
    assert {m["path"] for m in json.loads(proc.stdout)["mismatches"]} == {EPISODES}


@integration
def test_verify_without_the_dvc_cache_and_with_an_extra_file(damaged: Path) -> None:
    """No .dir listing in the cache: the directory is compared as a whole (the records still name the
    file); a file added to an output directory is reported against dvc.lock's listing."""
    extra = CHECKPOINT.replace("model.safetensors", "notes.txt")
    (damaged / extra).write_text("added after the run\n")
    result = verify(damaged, "tiny")
    added = [m for m in result.mismatches if m.expected is None]
    assert [m.path for m in added] == [extra] and len(result.mismatches) == 1
    assert "EXTRA" in text.mismatch_line(added[0])
    (damaged / extra).unlink()
    shutil.rmtree(damaged / ".dvc/cache")
    (damaged / ".dvc/config.local").unlink(missing_ok=True)  # a remote another module may have added
    pretrain = P.result("pretrain_weights", replicate=0)
    flip_byte(damaged / pretrain)
    result = verify(damaged, "tiny")
    paths = {m.path: m for m in result.mismatches}
    whole = [p for p in paths if p.endswith("/")]
    assert len(whole) == 1 and pretrain.startswith(whole[0]) and set(paths) == {whole[0], pretrain}
    assert "cannot be named" in text.mismatch_line(paths[whole[0]])
    assert any("(weights_sha256)" in b for b in paths[pretrain].by)
