"""End to end: the real workflow (DVC -> Snakemake -> MLflow) on a tiny config in a temporary
copy of this working tree, then a fresh clone that `dvc pull`s and regenerates the report."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import BIN, ROOT, free_port, run, study_dir

from pruneshot.config import budget_label

TINY = ROOT / "tests/configs/tiny.yaml"

TARGET_SIDE = {"basis_scaling", "channel_scaling", "double_pruning"}

pytestmark = pytest.mark.integration


def tiny_config() -> dict:
    return yaml.safe_load(TINY.read_text())


def expected_cells() -> list[dict]:
    cfg = tiny_config()
    cells = []
    for m in cfg["methods"]:
        budgets = [1.0] if m in ("dense", "linear_probe") else cfg["budget"]["levels"]
        arms = ["linear_probe"] if m == "linear_probe" else cfg["transfer"]["arms"]
        if m in TARGET_SIDE:
            arms = [a for a in arms if a != "reinit"]
        for b in budgets:
            for s in cfg["episodes"]["shots"]:
                for a in arms:
                    cells.append({"method": m, "requested_budget": float(b), "shots": s, "arm": a})
    return cells


def test_every_output_exists(project: Path) -> None:
    cfg = tiny_config()
    assert [p.name for p in (project / "results").iterdir()] == ["tiny"]  # one root per study
    for rel in ["report/index.html", "tables/results.csv", "tables/episodes.csv",
                "metrics.json", "mlflow/study.json", "mlflow/sync.json",
                "pretrain/r0/model.safetensors", "pretrain/r0/arch.json",
                "data/source/manifest.json", "data/target/digits_5to9/pool.safetensors"]:
        assert (study_dir(project) / rel).is_file(), rel
    for shots in cfg["episodes"]["shots"]:
        assert (study_dir(project) / f"episodes/digits_5to9/5way_{shots}shot.json").is_file()
    figures = list((study_dir(project) / "report/figures").glob("*.png"))
    assert len(figures) >= 3
    html = (study_dir(project) / "report/index.html").read_text()
    assert html.count("data:image/png;base64,") >= 3
    for method in cfg["methods"]:
        assert method in html


def test_results_table_has_full_grid(project: Path) -> None:
    df = pd.read_csv(study_dir(project) / "tables/results.csv")
    got = sorted((r.method, r.requested_budget, r.shots, r.arm) for r in df.itertuples())
    want = sorted((c["method"], c["requested_budget"], c["shots"], c["arm"]) for c in expected_cells())
    assert got == want
    protocol_columns = {
        "method", "backbone", "source", "target", "ways", "shots", "arm", "budget_metric", "requested_budget",
        "achieved_params", "achieved_flops", "dense_params", "dense_flops", "latency_device", "latency_dtype",
        "latency_ms_b1", "search_seconds", "search_device", "acc_mean", "acc_ci95", "n_episodes",
        "seed_pretrain", "seed_search", "seed_episode", "seed_finetune", "git_commit", "git_dirty",
        "config_sha256", "data_sha256", "checkpoint_sha256", "mlflow_run_id", "row_id",
    }
    assert protocol_columns <= set(df.columns)
    assert df["row_id"].is_unique
    assert (df["n_episodes"] == tiny_config()["episodes"]["count"]).all()
    assert ((df["acc_mean"] >= 0) & (df["acc_mean"] <= 1)).all()
    pruned = df[df["method"].isin(["random", "l1_filter"])]
    assert (pruned["achieved_params"] < pruned["dense_params"]).all()
    commit = run(["git", "rev-parse", "HEAD"], project).stdout.strip()
    assert set(df["git_commit"]) == {commit}
    # Episodes are shared: same episodes file -> same n, and per-episode rows exist for every cell.
    eps = pd.read_csv(study_dir(project) / "tables/episodes.csv")
    assert set(eps["row_id"]) == set(df["row_id"])


def test_source_retention_of_every_source_side_network(project: Path) -> None:
    """Every source-side row carries its network's source validation accuracy and widths; dense's is
    the pretrained network's (after pretraining's recalibration), target-side rows have none."""
    df = pd.read_csv(study_dir(project) / "tables/results.csv")
    pre = json.loads((study_dir(project) / "pretrain/r0/metrics.json").read_text())
    for method, rows in df.groupby("method"):
        if method in TARGET_SIDE:
            assert rows["source_val_acc"].isna().all(), method
            continue
        assert rows["source_val_acc"].between(0, 1).all(), method
        for r in rows.itertuples():
            widths = json.loads(r.widths)
            arch = json.loads((study_dir(project) / f"search/{method}/b{budget_label(r.requested_budget)}/r0/"
                                                     "arch.json").read_text())
            assert [widths[f"block{i}"] for i in range(len(arch["widths"]))] == arch["widths"], method
    dense = df[df["method"] == "dense"]["source_val_acc"]
    assert (dense == pre["bn_recalibration"]["source_val_acc_after"]).all()


def test_every_method_ran_with_its_side_source_and_search_seconds(project: Path) -> None:
    df = pd.read_csv(study_dir(project) / "tables/results.csv")
    assert set(df["method"]) == set(tiny_config()["methods"])
    for method, rows in df.groupby("method"):
        side = "target" if method in TARGET_SIDE else "source"
        assert set(rows["side"]) == {side}, method
        assert set(rows["search_scope"]) == {"per episode" if side == "target" else "once"}, method
        assert rows["method_source"].astype(str).str.len().min() > 0
        if method not in ("dense", "linear_probe"):
            assert (rows["search_seconds"] > 0).all(), method
            # the gap is the requested budget minus the achieved ratio on the budget metric, always shown;
            # methods that can hit a budget exactly do so from below, within 2 points
            assert (rows["budget_gap"] - (rows["requested_budget"] - rows["params_ratio"])).abs().max() < 1e-9
            # dnal is a gate method: its lambda bisection (3 steps in tiny) may fall short. Tiny widths
            # [8, 16] make one channel of block 0 (9 + 2 + 16 * 9 params) 11.4% of the 1357 dense params,
            # so "close" is one such unit here; the 2-point guarantee at realistic widths is tested per
            # method in the unit tests.
            if method != "dnal":
                assert rows["budget_gap"].between(0, 0.12).all(), (method, rows["budget_gap"].tolist())
    assert set(df.loc[df["method"] == "dap", "method_source"]) == {"reconstruction"}
    assert set(df.loc[df["method"] == "dnal", "method_source"]) == {"official code"}
    html = (study_dir(project) / "report/index.html").read_text()
    methods_html = html.split('id="methods-table"')[1].split("</table>")[0]
    for method in tiny_config()["methods"]:
        assert method in methods_html
    gap_html = html.split('id="reinit-gap-table"')[1].split("</table>")[0]
    assert "l1_filter" in gap_html and "basis_scaling" not in gap_html


def test_every_row_flags_a_budget_missed_beyond_the_tolerance(project: Path) -> None:
    df = pd.read_csv(study_dir(project) / "tables/results.csv")
    assert set(df["budget_tolerance"]) == {0.05}  # the schema's default
    want = df["budget_gap"].abs() > df["budget_tolerance"]  # NaN gap (no network): not flagged
    assert df["budget_missed"].astype(bool).tolist() == want.tolist()
    html = (study_dir(project) / "report/index.html").read_text()
    section = html.split('id="budget-missed"')[1].split("</section>")[0]
    for row_id in df.loc[want & (df["status"] == "ok"), "row_id"]:
        assert row_id in section


def test_target_side_methods_have_no_search_and_each_cell_times_its_own_network(project: Path) -> None:
    """A target-side method prunes per episode: no search job (no copy of the pretrained network per
    budget), its transfer starts from the pretrained network, and every cell's profile times the
    median-size network of that cell's own episodes."""
    root = study_dir(project)
    pretrain_sha = json.loads((root / "pretrain/r0/metrics.json").read_text())["weights_sha256"]
    cfg = tiny_config()
    for method in TARGET_SIDE:
        assert not (root / "search" / method).exists()
        assert not (root / f"profile/{method}/b0.5/r0.json").exists()
        for shots in cfg["episodes"]["shots"]:
            rel = f"digits_5to9/{method}/b0.5/{shots}shot/r0.json"
            rec = json.loads((root / "transfer" / rel).read_text())
            assert rec["network_record"] == "results/tiny/pretrain/r0/metrics.json"
            assert rec["weights_sha256"] == pretrain_sha
            prof = json.loads((root / f"profile/{method}/b0.5/digits_5to9/{shots}shot/r0.json").read_text())
            assert prof["network"]["from"].startswith("per-episode")
            assert prof["network"]["transfer_record"] == f"results/tiny/transfer/{rel}"
            assert prof["network"]["params"] in {a["params"] for a in rec["adapted"]}


def test_metrics_json_carry_provenance(project: Path) -> None:
    record = json.loads(next((study_dir(project) / "transfer").rglob("*.json")).read_text())
    prov = record["provenance"]
    for key in ("git_commit", "git_dirty", "config_sha256", "rule", "wildcards", "seeds", "inputs", "packages",
                "host", "device"):
        assert key in prov, key
    assert prov["rule"] == "transfer"
    assert {"torch", "snakemake", "mlflow", "dvc"} <= set(prov["packages"])
    assert all(len(h) == 64 for h in prov["inputs"].values()) and prov["inputs"]


def test_mlflow_runs_read_back(project: Path) -> None:
    from mlflow.tracking import MlflowClient

    study = json.loads((study_dir(project) / "mlflow/study.json").read_text())
    assert study["tracking_uri"] == f"sqlite:///{project / 'mlflow.db'}"
    client = MlflowClient(study["tracking_uri"])
    runs = client.search_runs([study["experiment_id"]], max_results=1000)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == study["parent_run_id"]]
    # the study's parent run: a training experiment, the config, the summary, the report, the study's status
    finished = json.loads((study_dir(project) / "mlflow/finished.json").read_text())
    parent = client.get_run(study["parent_run_id"])
    assert client.get_experiment(study["experiment_id"]).tags["mlflow.experimentKind"] == "custom_model_development"
    assert parent.data.params["study.name"] == "tiny" and parent.data.params["transfer.steps"] == "8"
    assert "logged" not in finished and parent.info.status == finished["status"]  # it was logged
    assert (finished["status"] == "FAILED") == bool(finished["reasons"])
    assert any(k.startswith("acc.dense.b1.") for k in parent.data.metrics) and "rows_ok" in parent.data.metrics
    assert {a.path for a in client.list_artifacts(study["parent_run_id"])} == {"index.html", "results.csv"}
    by_rule: dict[str, list] = {}
    for r in children:
        by_rule.setdefault(r.data.tags["pruneshot.rule"], []).append(r)
    # one transfer run per (method, budget, shots): its arms are metric prefixes
    assert len(by_rule["transfer"]) == len({(c["method"], c["requested_budget"], c["shots"])
                                            for c in expected_cells()})
    assert len(by_rule["pretrain"]) == 1
    networks = {(c["method"], c["requested_budget"]) for c in expected_cells() if c["method"] not in TARGET_SIDE}
    assert len(by_rule["search"]) == len(networks)  # target-side methods have no search
    df = pd.read_csv(study_dir(project) / "tables/results.csv")
    commit = run(["git", "rev-parse", "HEAD"], project).stdout.strip()
    search_ids = {r.info.run_id for r in by_rule["search"]}
    pretrain_ids = {r.info.run_id for r in by_rule["pretrain"]}
    for r in by_rule["transfer"]:
        tags = r.data.tags
        assert tags["pruneshot.git_commit"] == commit
        assert tags["pruneshot.config_sha256"] == df["config_sha256"].iloc[0]
        upstream = pretrain_ids if tags["pruneshot.wildcard.method"] in TARGET_SIDE else search_ids
        assert tags["pruneshot.upstream_run_id"] in upstream
        assert "pruneshot.wildcard.method" in tags and "pruneshot.seed.search" in tags
        assert any(k.startswith("pruneshot.input_sha256.") for k in tags)
        rows = df[df["mlflow_run_id"] == r.info.run_id]
        assert len(rows) >= 1
        for row in rows.itertuples():
            assert r.data.metrics[f"{row.arm}/acc_mean"] == pytest.approx(row.acc_mean)
    history = client.get_metric_history(by_rule["pretrain"][0].info.run_id, "val_acc")
    assert len(history) >= 1 and sorted(m.step for m in history) == list(range(len(history)))


def test_dvc_lock_records_hashes_and_params(project: Path) -> None:
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    stage = lock["stages"]["pipeline"]
    outs = {o["path"]: o for o in stage["outs"]}
    for path in ("results/tiny/pretrain", "results/tiny/search", "results/tiny/transfer", "results/tiny/data",
                 "results/tiny/metrics.json"):
        assert path in outs and len(outs[path]["md5"].split(".")[0]) == 32, path
    assert stage["params"]["config/config.yaml"]["study"]["name"] == "tiny"
    status = run([str(BIN / "dvc"), "status", "pipeline"], project).stdout
    assert "up to date" in status.lower() or status.strip() in ("", "{}")


def test_immediate_rerun_does_nothing(project: Path) -> None:
    out = run([str(BIN / "snakemake"), "-n", "--cores", "1"], project)
    assert "Nothing to be done" in out.stdout + out.stderr


def test_progress_of_a_finished_study_says_nothing_is_left(project: Path) -> None:
    out = run([str(BIN / "pruneshot"), "progress", "--cores", "2", "--by-rule"], project).stdout
    first = out.splitlines()[0]
    assert re.fullmatch(r"tiny: (\d+) of \1 jobs done, 0 running, 0 left; nothing left", first), out


def test_transfer_is_deterministic(project: Path) -> None:
    rel = "results/tiny/transfer/digits_5to9/random/b0.5/5shot/r0.json"
    before = json.loads((project / rel).read_text())
    (project / rel).unlink()
    run([str(BIN / "snakemake"), "--cores", "1", rel], project)
    after = json.loads((project / rel).read_text())
    assert set(after["arms"]) == set(tiny_config()["transfer"]["arms"])
    for arm, res in before["arms"].items():
        assert after["arms"][arm]["episodes"] == res["episodes"]
        assert [e["episode"] for e in res["episodes"]] == list(range(tiny_config()["episodes"]["count"]))


def test_bad_config_fails_before_touching_results(project: Path, tmp_path: Path) -> None:
    cfg = tiny_config()
    cfg["methods"] = ["dense", "magic"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    listing = sorted((p, p.stat().st_mtime_ns) for p in (study_dir(project)).rglob("*"))
    proc = run([str(BIN / "snakemake"), "--cores", "1", "--configfile", str(bad)], project, check=False)
    assert proc.returncode != 0
    assert "methods[1]" in proc.stderr + proc.stdout and "l1_filter" in proc.stderr + proc.stdout
    assert sorted((p, p.stat().st_mtime_ns) for p in (study_dir(project)).rglob("*")) == listing


def test_a_second_study_in_the_same_checkout_leaves_the_first_untouched(project: Path, tmp_path: Path) -> None:
    """Each study writes below results/<study.name>/ and logs/<study.name>/: running another config's jobs
    (here its data and episodes, then a failing bad source) touches no file of the first study."""
    first = study_dir(project)
    listing = sorted((p, p.stat().st_mtime_ns) for p in first.rglob("*"))
    other = tiny_config()
    other["study"]["name"] = "tiny_other"
    path = tmp_path / "other.yaml"
    path.write_text(yaml.safe_dump(other))
    targets = ["results/tiny_other/data/source/manifest.json",
               "results/tiny_other/episodes/digits_5to9/5way_1shot.json"]
    run([str(BIN / "snakemake"), *targets, "--cores", "1", "--configfile", str(path)], project)
    assert all((project / t).is_file() for t in targets)
    assert (project / "logs/tiny_other/prepare_source.log").is_file()
    # a config that validates, then fails in prepare_source (its mirror is a closed port on 127.0.0.1) must
    # not remove the first study's prepared data, as one shared results/ once did
    broken = {**other, "study": {**other["study"], "name": "tiny_broken"},
              "data": {**other["data"], "cache_dir": str(tmp_path / "cache"),
                       "image": {**(other["data"].get("image") or {}), "size": 8},  # mnist 28x28 as digits' 8x8
                       "download": {"mirrors": {"mnist": f"http://127.0.0.1:{free_port()}/"}, "attempts": 1,
                                    "timeout_s": 5},
                       "source": {**other["data"]["source"], "dataset": "mnist"}}}
    path.write_text(yaml.safe_dump(broken))
    proc = run([str(BIN / "snakemake"), "results/tiny_broken/data/source/manifest.json", "--cores", "1",
                "--configfile", str(path)], project, check=False)
    assert proc.returncode != 0 and "prepare_source" in proc.stdout + proc.stderr
    assert sorted((p, p.stat().st_mtime_ns) for p in first.rglob("*")) == listing
    # and Snakemake plans nothing upstream for the first study (earlier tests may have left its
    # aggregate/report to redo, after rerunning a transfer job)
    counts = _dry_run_counts(project, tiny_config(), tmp_path)
    assert not {"prepare_source", "prepare_target", "make_episodes", "pretrain", "search"} & set(counts), counts


def test_fresh_clone_pulls_and_regenerates_report_without_training(project: Path, tmp_path: Path) -> None:
    remote = tmp_path / "remote"
    run([str(BIN / "dvc"), "remote", "add", "--local", "-f", "-d", "tmpremote", str(remote)], project)
    run(["git", "add", "dvc.lock"], project)
    run(["git", "commit", "-qm", "results"], project)
    run([str(BIN / "dvc"), "push"], project)
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(project), str(clone)], tmp_path)
    run([str(BIN / "dvc"), "remote", "add", "--local", "-f", "-d", "tmpremote", str(remote)], clone)
    run([str(BIN / "dvc"), "pull"], clone)
    assert (study_dir(clone) / "pretrain/r0/model.safetensors").is_file()
    run([str(BIN / "snakemake"), "--cores", "1", "--touch"], clone)
    dry = run([str(BIN / "snakemake"), "-n", "--cores", "1"], clone)
    assert "Nothing to be done" in dry.stdout + dry.stderr
    # Issue 15.1: a changed setting reruns the same jobs in the pulled checkout as in the original (the
    # job records travel with the results: pruneshot.runtime.metadata)
    cfg = tiny_config()
    steps = {**cfg, "transfer": {**cfg["transfer"], "steps": cfg["transfer"]["steps"] + 1}}
    in_clone = _dry_run_counts(clone, steps, tmp_path)
    assert in_clone.get("transfer", 0) > 0 and in_clone == _dry_run_counts(project, steps, tmp_path), in_clone
    original = (study_dir(project) / "tables/results.csv").read_bytes()
    original_html = (study_dir(project) / "report/index.html").read_text()
    regen = run([str(BIN / "snakemake"), "--cores", "1", "--forcerun", "aggregate", "report"], clone)
    log = regen.stdout + regen.stderr
    for rule in ("pretrain", "search", "transfer", "profile", "budget_one", "sync_tracking"):
        assert f"rule {rule}:" not in log, f"{rule} ran in a regenerate-only run"
    assert (study_dir(clone) / "tables/results.csv").read_bytes() == original

    def tables_only(html: str) -> list[str]:
        """Every <table> of the report outside the provenance section (which names the checkout
        that built it, e.g. its dirty flag and the generation time)."""
        body = html.split('<section id="provenance">')[0]
        return re.findall(r"<table.*?</table>", body, flags=re.S)

    regenerated_html = (study_dir(clone) / "report/index.html").read_text()
    assert len(tables_only(regenerated_html)) >= 5
    assert tables_only(regenerated_html) == tables_only(original_html)
    # Issue 15.2: the colleague's path ends clean: the rebuilt report is the same bytes (it names the
    # results' commits, not the checkout or time that built it), finished.json too, so DVC and the audit
    # see nothing changed
    assert regenerated_html == original_html
    assert (study_dir(clone) / "mlflow/finished.json").read_bytes() == \
        (study_dir(project) / "mlflow/finished.json").read_bytes()
    status = run([str(BIN / "dvc"), "status"], clone).stdout
    assert "up to date" in status and "modified" not in status, status
    run([str(BIN / "pruneshot"), "audit", "--verify"], clone)  # exit 0


def test_snakemake_lint_and_ruff_clean() -> None:
    lint = run([str(BIN / "snakemake"), "--lint"], ROOT, check=False)
    text = lint.stdout + lint.stderr
    assert "Lints for" not in text, text[-3000:]
    ruff = run([str(BIN / "ruff"), "check", "."], ROOT, check=False)
    assert ruff.returncode == 0, ruff.stdout


def test_native_snakemake_report_with_captions(project: Path) -> None:
    import zipfile

    run([str(BIN / "snakemake"), "--report", "results/tiny/report.zip"], project)
    with zipfile.ZipFile(study_dir(project) / "report.zip") as zf:
        names = zf.namelist()
        html = zf.read(next(n for n in names if n.endswith("report.html"))).decode()
    assert any(n.endswith("index.html") for n in names) and any(n.endswith(".png") for n in names)
    assert "One row per (method" in html  # caption of results.csv (workflow/report/results.rst)
    assert "bars = 95% CI" in html  # caption of the figures (workflow/report/figures.rst)
    assert any(n.endswith("results.csv") for n in names)


def _dry_run_counts(project: Path, cfg: dict, tmp_path: Path) -> dict[str, int]:
    """Job count per rule that `snakemake -n` plans for ``cfg`` (given as --configfile)."""
    path = tmp_path / "changed.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = run([str(BIN / "snakemake"), "-n", "--cores", "1", "--configfile", str(path)], project).stdout
    counts: dict[str, int] = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and parts[0].isidentifier() and parts[0] not in ("total", "job"):
            counts[parts[0]] = int(parts[1])
    return counts


def test_a_changed_setting_reruns_exactly_the_rules_that_read_it(project: Path, tmp_path: Path) -> None:
    cfg = tiny_config()
    # same settings: no computing rule reruns (earlier tests may have left aggregate/report to redo)
    upstream = {"prepare_source", "prepare_target", "make_episodes", "pretrain", "search", "transfer", "profile",
                "profile_adapted"}
    assert not upstream & set(_dry_run_counts(project, cfg, tmp_path))

    steps = {**cfg, "transfer": {**cfg["transfer"], "steps": cfg["transfer"]["steps"] + 1}}
    counts = _dry_run_counts(project, steps, tmp_path)
    n_transfer = len({(c["method"], c["requested_budget"], c["shots"]) for c in expected_cells()})
    assert counts.get("transfer") == n_transfer
    assert not {"prepare_source", "pretrain", "search", "make_episodes"} & set(counts), counts

    dap = {**cfg, "dap": {**cfg["dap"], "steps": cfg["dap"]["steps"] + 1}}
    counts = _dry_run_counts(project, dap, tmp_path)
    assert counts.get("search") == len(cfg["budget"]["levels"]), counts  # dap's searches only
    assert "pretrain" not in counts

    seed = {**cfg, "study": {**cfg["study"], "root_seed": cfg["study"]["root_seed"] + 1}}
    counts = _dry_run_counts(project, seed, tmp_path)
    assert counts.get("prepare_source") == 1 and counts.get("pretrain") == 1, counts
    assert counts.get("make_episodes") == len(cfg["episodes"]["shots"])


def test_transfer_settings_chosen_on_validation_never_read_target_data(tmp_path: Path) -> None:
    """Issue 13: transfer.select on the micro study (source digits 0-2, validation classes 3-4 held out of
    pretraining, targets 5-9). Every results row carries the chosen settings; the report shows them and
    the lr sensitivity figure; and the choice never reads target data: with the target pool replaced by
    noise, the select jobs are not even scheduled, and forced they choose exactly the same."""
    import shutil

    import torch
    from conftest import copy_worktree

    from pruneshot.io import load_tensors, read_json, save_tensors

    proj = tmp_path / "proj"
    copy_worktree(proj)
    cfg = yaml.safe_load((ROOT / "tests/configs/micro.yaml").read_text())
    cfg["data"]["source"]["classes"] = [0, 1, 2]
    cfg["transfer"]["select"] = {"lr": [0.01, 0.1], "steps": [6, 10], "episodes": 3,
                                 "data": {"dataset": "digits", "classes": [3, 4]}}
    (proj / "config/select.yaml").write_text(yaml.safe_dump(cfg))
    snake = [str(BIN / "snakemake"), "--cores", "2", "--configfile", "config/select.yaml"]
    run(snake, proj)
    root = proj / "results/micro"
    df = pd.read_csv(root / "tables/results.csv")
    sel = pd.read_csv(root / "tables/selection.csv")
    assert (df["status"] == "ok").all()
    assert set(df["transfer_settings"]) == {"selected"}
    for row in df.itertuples():
        chosen = sel[(sel["method"] == row.method) & (sel["requested_budget"] == row.requested_budget)
                     & (sel["shots"] == row.shots) & (sel["arm"] == row.arm) & sel["chosen"]]
        assert len(chosen) == 1, row
        assert (row.transfer_lr, row.support_steps) == (chosen["lr"].iloc[0], chosen["steps"].iloc[0])
    # channel_scaling adapts for 6 of its steps: both grid points are candidates; every lr x steps scored
    assert len(sel[(sel["method"] == "dense")]) == 2 * 2
    html = (root / "report/index.html").read_text()
    assert 'id="selection-table"' in html and 'id="fig-lr_sensitivity"' in html
    assert (root / "report/figures/lr_sensitivity.png").stat().st_size > 0
    records = sorted((root / "select").rglob("*.json"))
    before = {p: read_json(p)["arms"] for p in records}
    # poison the target: every image noise, every label shuffled
    pool = root / "data/target/digits_5to9/pool.safetensors"
    tensors = load_tensors(pool)
    gen = torch.Generator().manual_seed(0)
    tensors["x"] = torch.randint(0, 256, tensors["x"].shape, generator=gen).to(tensors["x"].dtype)
    tensors["y"] = tensors["y"][torch.randperm(len(tensors["y"]), generator=gen)]
    save_tensors(pool, tensors)
    dry = run([*snake, "-n", "--rerun-triggers", "mtime", "input", "params"], proj).stdout
    assert "select_transfer" not in dry and "transfer" in dry  # the target's dependants are stale, select is not
    shutil.rmtree(root / "select")
    run([*snake, "--until", "select_transfer"], proj)
    assert {p: read_json(p)["arms"] for p in records} == before


def test_a_run_ends_with_its_summary_and_rerun_failed_reruns_exactly_the_failed_cells(tmp_path: Path) -> None:
    """Issues 14 and 15.1, on one micro study (not the default config) with one failed search (random) and
    one failed transfer (channel_scaling), recorded as failed cells:
    - the successful run prints the summary, the gates, the report's path and `pruneshot rerun-failed
      --config`; a dry run, a --touch run, a run with nothing to do and --lint print no summary;
    - a run whose job fails lists it, the command that reruns it and the study's failed cells;
    - `pruneshot rerun-failed --config` forces exactly the failed cells and what depends on them (a plain
      rerun has nothing to do: a method error is a recorded result); what succeeded is untouched."""
    import os
    import shutil
    import subprocess

    from conftest import _env, copy_worktree

    proj = tmp_path / "proj"
    copy_worktree(proj)
    shutil.copy(ROOT / "tests/configs/micro.yaml", proj / "config/micro.yaml")
    env = dict(_env(), PRUNESHOT_INJECT_FAILURE="search:random,transfer:channel_scaling")
    smk = [str(BIN / "snakemake"), "--cores", "2", "--configfile", "config/micro.yaml"]

    def snakemake(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*smk, *args], cwd=proj, env=env, capture_output=True, text=True)

    first = snakemake()
    assert first.returncode == 0, first.stderr[-3000:]
    root = proj / "results/micro"
    df = pd.read_csv(root / "tables/results.csv")
    assert set(df.loc[df["status"] == "failed", "method"]) == {"random", "channel_scaling"}
    n_failed = int((df["status"] == "failed").sum())
    # the run's ending: what `pruneshot summary` prints, the gates, the report, how to rerun the failed cells
    expected = run([str(BIN / "pruneshot"), "summary", "--config", "config/micro.yaml"], proj).stdout
    assert expected.strip() and expected in first.stdout, first.stdout
    assert "rerun exactly those cells and what depends on them with: pruneshot rerun-failed --config " \
           "config/micro.yaml" in expected
    assert "\nsanity " in first.stdout and "pruneshot rerun-failed --config config/micro.yaml" in first.stdout
    assert re.search(r"\nreport: \S*results/micro/report/index\.html\n", first.stdout)
    assert "pruneshot rerun-failed" in (root / "report/index.html").read_text()
    for args in (["-n"], ["--touch"], [], ["--lint"]):
        quiet = snakemake(*args)
        assert quiet.returncode == 0, quiet.stderr[-3000:]
        assert "\nreport: " not in quiet.stdout + quiet.stderr and "\nsanity " not in quiet.stdout, args
    # A job that fails: the dense network no longer matches the hash its search recorded.
    weights = root / "search/dense/b1/r0/model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:-8] + b"corrupt!")
    failed = snakemake("--forcerun", "results/micro/transfer/digits_5to9/dense/b1/1shot/r0.json")
    assert failed.returncode != 0
    assert "\nreport: " not in failed.stdout + failed.stderr
    err = failed.stderr
    assert re.search(r"pruneshot: \d job\(s\) failed:\n  rule (transfer|profile), jobid: \d+, wildcards: .*"
                     r"method=dense", err), err[-3000:]
    assert "logs/micro/" in err.split("pruneshot:")[-1]
    assert "rerun them (what finished is kept) with:\n  snakemake " + " ".join(smk[1:]) + "\n" in err
    assert "--forcerun" not in err.split("rerun them")[-1]
    assert f"the study also has {n_failed} failed cell(s)" in err
    assert "  pruneshot rerun-failed --config config/micro.yaml" in err
    weights.write_bytes(good)
    # rerun-failed: the failed search (its transfer follows it), the failed transfer; nothing that succeeded
    listed = run([str(BIN / "pruneshot"), "rerun-failed", "--config", "config/micro.yaml", "--print"], proj).stdout
    assert "results/micro/search/random/b0.5/r0/record.json" in listed
    assert "results/micro/transfer/digits_5to9/channel_scaling/b0.5/1shot/r0.json" in listed
    assert "transfer/digits_5to9/random" not in listed and "dense" not in listed
    assert "--forcerun" in listed
    ok = {p: p.stat().st_mtime_ns for p in [root / "search/dense/b1/r0/record.json", root / "pretrain/r0/metrics.json",
                                             root / "episodes/digits_5to9/5way_1shot.json"]}
    rerun = run([str(BIN / "pruneshot"), "rerun-failed", "--config", "config/micro.yaml", "--cores", "2"], proj)
    assert rerun.returncode == 0
    df = pd.read_csv(root / "tables/results.csv")
    assert (df["status"] == "ok").all(), df[["method", "status", "error"]]
    assert {p: p.stat().st_mtime_ns for p in ok} == ok  # what had succeeded was not rerun
    assert "no failed cells" in run([str(BIN / "pruneshot"), "rerun-failed", "--config", "config/micro.yaml"],
                                    proj).stdout
    assert not os.environ.get("PRUNESHOT_INJECT_FAILURE")
