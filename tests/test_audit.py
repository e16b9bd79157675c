"""`pruneshot audit`: the lineage of a results row, and --verify against the records and dvc.lock, on the
session's finished tiny study. Every test works on a copy of the study (the shared one is never touched)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import BIN, run

from pruneshot.audit import lineage as audit
from pruneshot.cli import main

pytestmark = pytest.mark.integration

CHECKPOINT = "results/search/random/b0.5/r0/model.safetensors"
EPISODES = "results/episodes/digits_5to9/5way_1shot.json"


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


def rows(root: Path) -> list[dict[str, str]]:
    with open(root / "results/tables/results.csv", newline="") as f:
        return list(csv.DictReader(f))


def row_of(root: Path, method: str = "random", shots: str = "5", arm: str = "finetune") -> dict[str, str]:
    return next(r for r in rows(root) if (r["method"], r["shots"], r["arm"]) == (method, shots, arm))


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


def pruneshot(root: Path, *args: str) -> object:
    return run([str(BIN / "pruneshot"), "audit", *args], root, check=False)


def test_lineage_of_a_row_shows_every_level_with_its_hashes(study: Path) -> None:
    row = row_of(study)
    proc = pruneshot(study, row["row_id"])  # the console entry point
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    tr_rel = row["transfer_record"]
    tr = read(study, tr_rel)
    search_rel = "results/search/random/b0.5/r0/record.json"
    se = read(study, search_rel)
    pre = read(study, "results/pretrain/r0/metrics.json")
    target = read(study, "results/data/target/digits_5to9/manifest.json")
    source = read(study, "results/data/source/manifest.json")
    eps_rel = "results/episodes/digits_5to9/5way_5shot.json"
    inputs = tr["provenance"]["inputs"]
    # the row, with its number
    assert f"row {row['row_id']}: random at budget 0.5" in out
    assert f"accuracy {100 * float(row['acc_mean']):.1f} ± {100 * float(row['acc_ci95']):.1f} %" in out
    # every level, in order, with its record
    order = [f"- transfer run: {tr_rel}", f"- pruned network: {search_rel}", f"- search: {search_rel}",
             "- pretrained backbone: results/pretrain/r0/metrics.json",
             "- source data: results/data/source/manifest.json",
             "- target data: results/data/target/digits_5to9/manifest.json", f"- episodes: {eps_rel}",
             "- profile: results/profile/random/b0.5/r0.json"]
    positions = [out.index(line) for line in order]
    assert positions == sorted(positions)
    # paths with their hashes as the records hold them
    for path, sha in [(CHECKPOINT, se["weights_sha256"]), (CHECKPOINT, tr["weights_sha256"]),
                      (search_rel, tr["search_record_sha256"]),
                      ("results/pretrain/r0/model.safetensors", pre["weights_sha256"]),
                      ("results/data/source/manifest.json", inputs["results/data/source/manifest.json"]),
                      ("results/data/target/digits_5to9/pool.safetensors", target["splits"]["pool"]["sha256"]),
                      ("results/data/source/train.safetensors", source["splits"]["train"]["sha256"]),
                      (eps_rel, inputs[eps_rel])]:
        assert f"file {path}\n" in out
        block = out.split(f"file {path}\n", 1)[1].split("file ", 1)[0]
        assert f"sha256 {sha}" in block, path
    # MLflow runs, seeds, rules, commit and config of each job
    for rec in (tr, se, pre):
        assert f"mlflow run {rec['mlflow_run_id']}" in out
        assert f"rule {rec['provenance']['rule']} " in out
    assert f"upstream run {se['mlflow_run_id']}" in out and f"upstream run {pre['mlflow_run_id']}" in out
    assert f"search={tr['provenance']['seeds']['search']}" in out
    assert f"split_seed={source['split_seed']}" in out
    assert f"commit {tr['provenance']['git_commit']} (clean), config sha256 {tr['provenance']['config_sha256']}" in out
    assert "rule make_episodes" in out and "rule prepare_source" in out and "rule prepare_target" in out
    assert "MISMATCH" not in out and "MISSING" not in out
    assert "(same commit)" in out and "config/config.yaml now hashes to" in out  # compared with the run's
    # dvc.lock's md5 of each file is shown and holds
    assert "md5" in out and "recorded by dvc.lock" in out


def test_lineage_tree_structure(study: Path) -> None:
    row = row_of(study, method="basis_scaling", shots="1")  # target-side: prunes per episode
    lin = audit.lineage(study, row)
    tree = lin["tree"]
    assert tree["level"] == "transfer run" and tree["record"] == row["transfer_record"]
    assert [c["level"] for c in tree["children"]] == ["pruned network", "source data", "target data", "episodes",
                                                      "profile"]
    network = tree["children"][0]
    search = network["children"][0]
    backbone = search["children"][0]
    assert search["level"] == "search" and backbone["level"] == "pretrained backbone"
    assert backbone["children"][0]["level"] == "source data"
    assert search["mlflow_run_id"] == tree["upstream_run_id"]
    assert backbone["mlflow_run_id"] == search["upstream_run_id"]
    for node in (tree, search, backbone):
        assert node["git_commit"] == row["git_commit"] and node["config_sha256"] == row["config_sha256"]
    every = [r for f in [*network["files"], *backbone["files"]] for r in f["recorded"]]
    assert every and all(r["ok"] for r in every)
    assert {r["algo"] for r in every} == {"sha256", "md5"}


def test_unknown_and_ambiguous_row_ids_exit_2(study: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ids = [r["row_id"] for r in rows(study)]
    assert main(["audit", "--root", str(study), "not-a-row"]) == 2
    assert "no row 'not-a-row'" in capsys.readouterr().err
    near = ids[0][:-1] + ("0" if ids[0][-1] != "0" else "1")  # one character off
    assert near not in ids
    assert main(["audit", "--root", str(study), near]) == 2
    err = capsys.readouterr().err
    assert "close matches" in err and ids[0] in err
    shared = next((p for p in "0123456789abcdef" if sum(i.startswith(p) for i in ids) > 1), None)
    if shared is not None:
        assert main(["audit", "--root", str(study), shared]) == 2
        assert "ambiguous" in capsys.readouterr().err
    proc = pruneshot(study, "not-a-row")
    assert proc.returncode == 2 and "no row" in proc.stderr


def test_prefix_transfer_record_results_file_and_json(study: Path, capsys: pytest.CaptureFixture[str]) -> None:
    all_rows = rows(study)
    ids = [r["row_id"] for r in all_rows]
    row = row_of(study)
    prefix = next(row["row_id"][:n] for n in range(1, 11) if sum(i.startswith(row["row_id"][:n]) for i in ids) == 1)
    assert main(["audit", "--root", str(study), prefix, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert [r["row"]["row_id"] for r in got["rows"]] == [row["row_id"]]
    assert got["rows"][0]["tree"]["record"] == row["transfer_record"]
    # a transfer record: the rows it produced (one per arm)
    assert main(["audit", "--root", str(study), "--json", row["transfer_record"]]) == 0
    got = json.loads(capsys.readouterr().out)
    assert sorted(r["row"]["arm"] for r in got["rows"]) == ["finetune", "reinit"]
    # a results file: every row
    assert main(["audit", "--root", str(study), "--json", str(study / "results/tables/results.csv")]) == 0
    got = json.loads(capsys.readouterr().out)
    assert sorted(r["row"]["row_id"] for r in got["rows"]) == sorted(ids)


def test_verify_passes_on_the_untouched_study(study: Path) -> None:
    proc = pruneshot(study, "--verify")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "all match" in proc.stdout
    result = audit.verify(study)
    assert result.ok and not result.notes
    lock = yaml.safe_load((study / "dvc.lock").read_text())
    outs = [study / out["path"] for out in lock["stages"]["pipeline"]["outs"]]
    assert result.artefacts >= sum(1 for o in outs for p in ([o] if o.is_file() else o.rglob("*")) if p.is_file())
    # the directory hashes DVC wrote are reproduced from the files (DVC 3: md5 of the JSON listing)
    for out in lock["stages"]["pipeline"]["outs"]:
        if out["md5"].endswith(".dir"):
            listing = audit._workspace_listing(study, out["path"], audit.Hasher(study))
            assert audit.dir_md5(listing) == out["md5"], out["path"]
    row = row_of(study)
    proc = pruneshot(study, "--verify", row["row_id"])
    assert proc.returncode == 0 and "lineage of 1 row(s)" in proc.stdout


def test_verify_catches_a_flipped_byte_in_a_search_checkpoint(study: Path, damaged: Path) -> None:
    recorded = read(study, "results/search/random/b0.5/r0/record.json")["weights_sha256"]
    flip_byte(damaged / CHECKPOINT)
    actual = audit.Hasher(damaged).get(CHECKPOINT)
    assert actual != recorded
    proc = pruneshot(damaged, "--verify")
    assert proc.returncode == 1, proc.stdout
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("MISMATCH")]
    mine = [ln for ln in lines if ln.startswith(f"MISMATCH {CHECKPOINT}:")]
    assert lines == mine  # nothing else is reported
    by_record = next(ln for ln in mine if " sha256 " in ln)
    assert f"recorded {recorded}, actual {actual}" in by_record
    assert "results/search/random/b0.5/r0/record.json (weights_sha256)" in by_record
    assert "results/transfer/digits_5to9/random/b0.5/5shot/r0.json (provenance.inputs)" in by_record
    assert "results/tables/results.csv (row" in by_record
    by_lock = next(ln for ln in mine if " md5 " in ln)
    assert "dvc.lock (stage pipeline, out results/search)" in by_lock
    # only the lineages that hold the checkpoint fail
    assert pruneshot(damaged, "--verify", row_of(damaged)["row_id"]).returncode == 1
    assert pruneshot(damaged, "--verify", row_of(damaged, method="dense")["row_id"]).returncode == 0
    # the lineage view marks it
    assert "MISMATCH sha256" in pruneshot(damaged, row_of(damaged)["row_id"]).stdout


def test_verify_catches_a_flipped_byte_in_an_episodes_file(damaged: Path) -> None:
    flip_byte(damaged / EPISODES, pick="digit")
    json.loads((damaged / EPISODES).read_text())  # still valid JSON: only the hash tells
    result = audit.verify(damaged)
    assert not result.ok
    assert {m.path for m in result.mismatches} == {EPISODES}
    assert {m.algo for m in result.mismatches} == {"sha256", "md5"}
    sha = next(m for m in result.mismatches if m.algo == "sha256")
    assert any(b.startswith("results/transfer/digits_5to9/") and b.endswith("(provenance.inputs)") for b in sha.by)
    md5 = next(m for m in result.mismatches if m.algo == "md5")
    assert md5.by[0].startswith("dvc.lock (stage pipeline, out results/episodes)")
    proc = pruneshot(damaged, "--verify", "--json")
    assert proc.returncode == 1
    assert {m["path"] for m in json.loads(proc.stdout)["mismatches"]} == {EPISODES}


def test_verify_without_the_dvc_cache_and_with_an_extra_file(damaged: Path) -> None:
    """No .dir listing in the cache: the directory is compared as a whole (the records still name the
    file); a file added to an output directory is reported against dvc.lock's listing."""
    (damaged / "results/search/random/b0.5/r0/notes.txt").write_text("added after the run\n")
    result = audit.verify(damaged)
    extra = [m for m in result.mismatches if m.expected is None]
    assert [m.path for m in extra] == ["results/search/random/b0.5/r0/notes.txt"] and len(result.mismatches) == 1
    assert "EXTRA" in extra[0].line()
    (damaged / "results/search/random/b0.5/r0/notes.txt").unlink()
    shutil.rmtree(damaged / ".dvc/cache")
    (damaged / ".dvc/config.local").unlink(missing_ok=True)  # a remote another module may have added
    flip_byte(damaged / "results/pretrain/r0/model.safetensors")
    result = audit.verify(damaged)
    paths = {m.path: m for m in result.mismatches}
    assert set(paths) == {"results/pretrain/", "results/pretrain/r0/model.safetensors"}
    assert "cannot be named" in paths["results/pretrain/"].line()
    assert any("(weights_sha256)" in b for b in paths["results/pretrain/r0/model.safetensors"].by)
