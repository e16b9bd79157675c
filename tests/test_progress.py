"""`pruneshot progress`: a study's jobs done / running / left and the time left (issue 15.4)."""

from __future__ import annotations

import base64
from pathlib import Path

from pruneshot.paths import StudyPaths
from pruneshot.runtime.progress import benchmark_seconds, estimate, job_counts, running_jobs

DRY_RUN = """Building DAG of jobs...
Job stats:
job                count
---------------  -------
all                    1
pretrain               1
profile               54
transfer              38
total                 94

Reasons:
    (check individual jobs above for details)
"""


def test_job_counts_read_the_job_stats_table():
    assert job_counts(DRY_RUN) == {"pretrain": 1, "profile": 54, "transfer": 38}
    assert job_counts("Nothing to be done (all requested files are present and up to date).") == {}


def _bench(root: Path, rel: str, seconds: float) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"s\th:m:s\tmax_rss\n{seconds}\t0:00:01\t100\n")


def test_benchmark_files_are_assigned_to_their_rule_by_the_path_templates(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    paths = StudyPaths("s")
    bench = Path("logs/s/benchmarks")
    _bench(bench, "profile/l1_filter/b0.5/r0.tsv", 3.0)
    _bench(bench, "profile/dap/b0.5/t/1shot/r0.tsv", 9.0)  # profile_adapted: same folder, deeper path
    _bench(bench, "transfer/t/dense/b1/1shot/r0.tsv", 80.0)
    _bench(bench, "transfer/t/dense/b1/5shot/r0.tsv", 100.0)
    (bench / "transfer/t/dense/b1/5shot/empty.tsv").write_text("s\n")  # header only: skipped
    assert benchmark_seconds(paths) == {"profile": [3.0], "profile_adapted": [9.0], "transfer": [80.0, 100.0]}


def test_running_jobs_are_the_study_s_outputs_marked_incomplete(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    incomplete = Path(".snakemake/incomplete")
    incomplete.mkdir(parents=True)
    for out in ("results/s/transfer/a.json", "results/s/search/b.json", "results/other/c.json"):
        (incomplete / base64.urlsafe_b64encode(out.encode()).decode()).write_text("{}")
    assert running_jobs(StudyPaths("s"), incomplete) == 2


def test_the_estimate_is_median_seconds_times_jobs_left_over_the_cores():
    p = estimate("s", total=100, left_by_rule={"transfer": 10, "profile": 4, "report": 1, "sanity": 1},
                 seconds={"transfer": [60.0, 100.0, 80.0], "profile": [2.0]}, running=2, cores=2,
                 started=1000.0, now=1000.0 + 30 * 60)
    assert p.done == 84 and p.left == 16
    assert p.left_s == (10 * 80.0 + 4 * 2.0) / 2
    line = p.line()
    assert line.startswith("s: 84 of 100 jobs done, 2 running, 16 left; elapsed 30 min; about 7 min left at 2 cores")
    assert "from 4 finished jobs' benchmark times; 2 single job(s) not timed" in line
    assert estimate("s", 5, {}, {}, 0, 2).line() == "s: 5 of 5 jobs done, 0 running, 0 left; nothing left"
    assert "no estimate" in estimate("s", 5, {"transfer": 3}, {}, 1, 2).line()
