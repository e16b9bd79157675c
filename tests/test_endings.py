"""What a workflow run prints when it ends (pruneshot.runtime.endings, the Snakefile's onsuccess/onerror),
without Snakemake: a stand-in workflow object carries what the handlers read."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from pruneshot.paths import StudyPaths
from pruneshot.runtime import endings


class Job:
    def __init__(self, rule: str, output: list[str], wildcards: dict | None = None, log: list[str] | None = None):
        self.rule = SimpleNamespace(name=rule)
        self.output = output
        self.wildcards_dict = wildcards or {}
        self.log = log or []

    def is_group(self) -> bool:
        return False


def fake_workflow(finished: list[Job] = (), failed: list[Job] = (), touch: bool = False,
                  configfiles: list[str] = ()) -> SimpleNamespace:
    ids = {id(j): i for i, j in enumerate([*finished, *failed], start=1)}
    dag = SimpleNamespace(finished_jobs=list(finished), jobid=lambda j: ids[id(j)])
    return SimpleNamespace(dag=dag, scheduler=SimpleNamespace(failed=set(failed)), touch=touch, dryrun=False,
                           configfiles=list(configfiles))


def test_study_config_names_only_a_config_that_is_not_the_default(tmp_path: Path) -> None:
    assert endings.study_config([], tmp_path) is None
    assert endings.study_config(["config/config.yaml"], tmp_path) is None
    assert endings.study_config([tmp_path / "config/config.yaml"], tmp_path) is None
    assert endings.study_config(["config/micro.yaml"], tmp_path) == Path("config/micro.yaml")
    assert endings.study_config([tmp_path / "config/studies/a.yaml"], tmp_path) == Path("config/studies/a.yaml")
    assert endings.study_config(["/elsewhere/b.yaml"], tmp_path) == Path("/elsewhere/b.yaml")


def test_rerun_argv_drops_the_forcing_options_and_keeps_the_rest() -> None:
    argv = ["/venv/bin/snakemake", "--cores", "2", "--configfile", "c.yaml", "--forcerun", "a.json", "b.json",
            "--keep-going", "-F", "t.csv"]
    assert endings.rerun_argv(argv) == ["snakemake", "--cores", "2", "--configfile", "c.yaml", "--keep-going",
                                        "t.csv"]
    assert endings.rerun_argv(["snakemake", "--profile", "profiles/slurm", "-R", "x"]) == \
        ["snakemake", "--profile", "profiles/slurm"]


def test_error_lines_name_rerun_failed_only_when_the_study_has_failed_cells() -> None:
    job = endings.job_line("transfer", 7, {"method": "dap", "budget": "0.5"}, ["logs/s/transfer.log"])
    assert job == "rule transfer, jobid: 7, wildcards: method=dap, budget=0.5 (log: logs/s/transfer.log)"
    lines = endings.error_lines([job], ["snakemake", "--cores", "4"], 0, None)
    assert lines == ["pruneshot: 1 job(s) failed:", f"  {job}", "rerun them (what finished is kept) with:",
                     "  snakemake --cores 4"]
    lines = endings.error_lines([job], ["snakemake", "--cores", "4"], 2, None)
    assert lines[-1] == "  pruneshot rerun-failed" and "2 failed cell(s)" in lines[-2]
    lines = endings.error_lines([job], ["snakemake"], 1, Path("config/studies/x.yaml"))
    assert lines[-1] == "  pruneshot rerun-failed --config config/studies/x.yaml"


@pytest.fixture
def printed(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    calls: list[tuple] = []
    monkeypatch.setattr(endings, "print_summary", lambda csv, config: calls.append((csv, config)))
    monkeypatch.delenv(endings.QUIET_ENV, raising=False)
    return calls


def test_on_success_prints_the_summary_only_after_a_run_that_built_the_results_table(
        printed: list[tuple], monkeypatch: pytest.MonkeyPatch) -> None:
    paths = StudyPaths("s")
    table = Job("aggregate", ["results/s/tables/results.csv", "results/s/tables/episodes.csv"])
    episodes = Job("make_episodes", ["results/s/episodes/t/5way_1shot.json"])
    endings.on_success(fake_workflow([episodes]), paths)  # e.g. --until make_episodes
    endings.on_success(fake_workflow([episodes, table], touch=True), paths)  # --touch
    assert printed == []
    endings.on_success(fake_workflow([episodes, table], configfiles=["config/micro.yaml"]), paths)
    assert printed == [("results/s/tables/results.csv", Path("config/micro.yaml"))]
    monkeypatch.setenv(endings.QUIET_ENV, "1")  # make run prints it itself
    endings.on_success(fake_workflow([table]), paths)
    assert len(printed) == 1


def test_on_error_lists_failed_jobs_the_rerun_command_and_rerun_failed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["/v/bin/snakemake", "--cores", "2", "--configfile", "config/x.yaml"])
    paths = StudyPaths("s")
    job = Job("profile", ["results/s/profile/dense/b1/r0.json"], {"method": "dense", "budget": "1",
                                                                  "replicate": "0"}, ["logs/s/profile/dense.log"])
    wf = fake_workflow([Job("pretrain", ["p"])], [job], configfiles=[str(tmp_path / "config/x.yaml")])
    endings.on_error(wf, paths)
    err = capsys.readouterr().err.splitlines()
    assert err == ["pruneshot: 1 job(s) failed:",
                   "  rule profile, jobid: 2, wildcards: method=dense, budget=1, replicate=0 "
                   "(log: logs/s/profile/dense.log)",
                   "rerun them (what finished is kept) with:",
                   "  snakemake --cores 2 --configfile config/x.yaml"]
    record = tmp_path / "results/s/search/dap/b0.5/r0/record.json"
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps({"status": "failed", "error": "boom"}))
    endings.on_error(wf, paths)
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == "  pruneshot rerun-failed --config config/x.yaml"
    assert "1 failed cell(s)" in err[-2]


def test_a_summary_that_cannot_be_printed_does_not_fail_the_run(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    def broken(csv: str, config: Path | None) -> None:
        raise KeyError("acc_mean")

    monkeypatch.setattr(endings, "print_summary", broken)
    monkeypatch.delenv(endings.QUIET_ENV, raising=False)
    endings.on_success(fake_workflow([Job("aggregate", ["results/s/tables/results.csv"])]), StudyPaths("s"))
    assert "pruneshot: no summary (KeyError" in capsys.readouterr().err
