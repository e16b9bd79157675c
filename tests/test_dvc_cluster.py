"""DVC on a cluster: DVC never runs inside the (parallel) jobs. Snakemake runs the study with any
executor; afterwards one `dvc commit -f pipeline` records the results in `dvc.lock` without running
anything, `git commit` + `dvc push` publish them, and a fresh clone `dvc pull`s them."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import BIN, run, study_dir

pytestmark = pytest.mark.integration


def _isolate_mlflow(proj: Path) -> None:
    """Point the copy's jobs at the copy's own MLflow database (study.json names the shared project's
    by absolute path), keeping study.json's mtime so that Snakemake sees nothing new."""
    path = study_dir(proj) / "mlflow/study.json"
    st = path.stat()
    study = json.loads(path.read_text())
    study["tracking_uri"] = f"sqlite:///{proj / 'mlflow.db'}"
    path.write_text(json.dumps(study, indent=2, sort_keys=True) + "\n")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(study_dir(root).rglob("*")) if p.is_file()}


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _rules_run(log: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for rule in re.findall(r"^(?:local)?rule (\w+):$", log, flags=re.M):
        counts[rule] = counts.get(rule, 0) + 1
    return counts


def _status(proj: Path) -> dict:
    out = run([str(BIN / "dvc"), "status", "pipeline", "--json"], proj).stdout
    return json.loads(out[out.index("{"):]) if "{" in out else {}


def test_snakemake_then_dvc_commit_push_pull(project: Path, tmp_path: Path) -> None:
    shared_db = (project / "mlflow.db").stat().st_mtime_ns
    proj = tmp_path / "p"
    shutil.copytree(project, proj, symlinks=True)  # the shared project stays untouched
    _isolate_mlflow(proj)
    remote = tmp_path / "remote"
    run([str(BIN / "dvc"), "remote", "add", "--local", "-f", "-d", "cluster", str(remote)], proj)

    # a changed setting: dap searches one step longer (the report then mixes two config hashes)
    cfg = yaml.safe_load((proj / "config/config.yaml").read_text())
    assert "dap" in cfg["methods"]
    cfg["dap"]["steps"] += 1
    cfg["report"] = {**cfg.get("report", {}), "allow_mixed": True}
    (proj / "config/config.yaml").write_text(yaml.safe_dump(cfg))

    # "the cluster run": snakemake itself (any executor), no DVC involved
    smk = run([str(BIN / "snakemake"), "--cores", "2"], proj)
    ran = _rules_run(smk.stdout + smk.stderr)
    assert ran.get("search") == 1 and ran.get("transfer") == len(cfg["episodes"]["shots"]), ran
    assert not {"prepare_source", "pretrain", "make_episodes"} & set(ran), ran

    status = _status(proj)  # DVC sees new params and outputs not yet recorded
    changes = json.dumps(status)
    assert "pipeline" in status and "config/config.yaml" in changes, status
    for out in ("results/tiny/search", "results/tiny/transfer", "results/tiny/tables"):
        assert out in changes, (out, status)

    # one command records the outputs in dvc.lock; it runs nothing
    before = _digests(proj)
    smk_logs = set((proj / ".snakemake/log").iterdir())
    commit = run([str(BIN / "dvc"), "commit", "-f", "pipeline"], proj)
    assert "Running stage" not in commit.stdout + commit.stderr
    assert _digests(proj) == before  # no output was rewritten with new content
    assert set((proj / ".snakemake/log").iterdir()) == smk_logs  # no snakemake run started
    assert _status(proj) == {}
    lock = yaml.safe_load((proj / "dvc.lock").read_text())["stages"]["pipeline"]
    assert lock["params"]["config/config.yaml"]["dap"]["steps"] == cfg["dap"]["steps"]
    outs = {o["path"]: o for o in lock["outs"]}
    assert outs["results/tiny/metrics.json"]["md5"] == _md5(study_dir(proj) / "metrics.json")
    tables = outs["results/tiny/tables"]["md5"]
    listing = json.loads((proj / ".dvc/cache/files/md5" / tables[:2] / tables[2:]).read_text())
    assert {e["relpath"]: e["md5"] for e in listing} == {
        p.name: _md5(p) for p in (study_dir(proj) / "tables").iterdir() if p.is_file()}
    dry = run([str(BIN / "snakemake"), "-n", "--cores", "1"], proj)
    assert "Nothing to be done" in dry.stdout + dry.stderr  # Snakemake's view is unchanged too

    run(["git", "add", "dvc.lock", "config/config.yaml"], proj)
    run(["git", "commit", "-qm", "dap.steps + 1 (cluster run)"], proj)
    run([str(BIN / "dvc"), "push"], proj)

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(proj), str(clone)], tmp_path)
    run([str(BIN / "dvc"), "remote", "add", "--local", "-f", "-d", "cluster", str(remote)], clone)
    run([str(BIN / "dvc"), "pull"], clone)
    for rel in ("results/tiny/tables/results.csv", "results/tiny/tables/episodes.csv", "results/tiny/metrics.json",
                "results/tiny/search/dap/b0.5/r0/record.json"):
        assert (clone / rel).read_bytes() == (proj / rel).read_bytes(), rel
    assert (project / "mlflow.db").stat().st_mtime_ns == shared_db  # the copy's jobs logged to its own
    # the pulled dap search is the rerun one (new config), the others are the originals
    new, old = (json.loads((study_dir(clone) / f"search/{m}/b0.5/r0/record.json").read_text())["provenance"]
                for m in ("dap", "random"))
    assert new["config_sha256"] != old["config_sha256"]
