"""Every results and log path of a study, written once.

A study writes only below its own roots, ``results/<study.name>/`` and ``logs/<study.name>/``,
so two configs in one checkout never touch each other's outputs. Templates are relative to those
roots and name their wildcards in braces (``{method}``, ``{budget}``, ...), as Snakemake rules do;
the rules, the stages, the audit and the CLI all read them from here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

RESULTS_DIR = "results"
LOGS_DIR = "logs"

# Relative to results/<study>/.
RESULTS: dict[str, str] = {
    "study_json": "mlflow/study.json",
    "sync_json": "mlflow/sync.json",
    # the study's parent run ended: its status, metrics and artifacts (rule finish_tracking)
    "finish_json": "mlflow/finished.json",
    # spool id -> MLflow run id of every record sync_tracking logged, kept across its reruns (a ledger
    # it merges into, not a rule output: Snakemake would delete it before each rerun)
    "mlflow_runs": "mlflow/runs.json",
    "mlflow_store": "mlflow",
    # Snakemake's job metadata (params, code, inputs) of this study's outputs, versioned with them so that
    # a checkout with pulled results reruns what a changed setting touches (pruneshot.runtime.metadata)
    "snakemake_metadata": "snakemake/metadata",
    "source_dir": "data/source",
    "source_manifest": "data/source/manifest.json",
    "source_train": "data/source/train.safetensors",
    "source_val": "data/source/val.safetensors",
    "target_dir": "data/target/{target}",
    "target_manifest": "data/target/{target}/manifest.json",
    "target_pool": "data/target/{target}/pool.safetensors",
    "episodes": "episodes/{target}/{ways}way_{shots}shot.json",
    # transfer.select: validation classes (never a target's), their episodes, and the choice per network
    # and shots (every trained arm's lr and steps), gathered into one table.
    "select_manifest": "data/select/manifest.json",
    "select_pool": "data/select/pool.safetensors",
    "select_episodes": "episodes/select/{shots}shot.json",
    "selection": "select/{method}/b{budget}/{shots}shot/r{replicate}.json",
    "selection_csv": "tables/selection.csv",
    "pretrain_weights": "pretrain/r{replicate}/model.safetensors",
    "pretrain_arch": "pretrain/r{replicate}/arch.json",
    "pretrain_metrics": "pretrain/r{replicate}/metrics.json",
    "search_weights": "search/{method}/b{budget}/r{replicate}/model.safetensors",
    "search_arch": "search/{method}/b{budget}/r{replicate}/arch.json",
    "search_record": "search/{method}/b{budget}/r{replicate}/record.json",
    # One transfer job per (network, target, shots) runs every arm of the method on the same episodes.
    "transfer": "transfer/{target}/{method}/b{budget}/{shots}shot/r{replicate}.json",
    # Source-side: the searched network, once per (method, budget, replicate).
    "profile": "profile/{method}/b{budget}/r{replicate}.json",
    # Target-side: each transfer cell prunes its own per-episode networks, so each is timed on its own.
    "profile_adapted": "profile/{method}/b{budget}/{target}/{shots}shot/r{replicate}.json",
    # Gate (c)'s network checks, per replicate, and the three sanity gates of the study.
    "budget_one": "sanity/budget_one_r{replicate}.json",
    "sanity_json": "sanity/gates.json",
    "results_csv": "tables/results.csv",
    "episodes_csv": "tables/episodes.csv",
    "metrics_json": "metrics.json",
    "report_dir": "report",
    "report_html": "report/index.html",
    "report_figures": "report/figures",
    "checkpoints": "checkpoints",
}

# Relative to logs/<study>/.
LOGS: dict[str, str] = {
    "init_tracking": "init_tracking.log",
    "sync_tracking": "sync_tracking.log",
    "finish_tracking": "finish_tracking.log",
    "prepare_source": "prepare_source.log",
    "prepare_target": "prepare_target/{target}.log",
    "make_episodes": "make_episodes/{target}/{ways}way_{shots}shot.log",
    "prepare_select": "prepare_select.log",
    "make_select_episodes": "make_episodes/select/{shots}shot.log",
    "select_transfer": "select/{method}/b{budget}/{shots}shot/r{replicate}.log",
    "selection_table": "selection_table.log",
    "pretrain": "pretrain/r{replicate}.log",
    "search": "search/{method}/b{budget}/r{replicate}.log",
    "transfer": "transfer/{target}/{method}/b{budget}/{shots}shot/r{replicate}.log",
    "profile": "profile/{method}/b{budget}/r{replicate}.log",
    "profile_adapted": "profile/{method}/b{budget}/{target}/{shots}shot/r{replicate}.log",
    "budget_one": "sanity/budget_one_r{replicate}.log",
    "sanity": "sanity/gates.log",
    "aggregate": "aggregate.log",
    "report": "report.log",
    "mlflow_spool": "mlflow_spool",
    "benchmarks": "benchmarks",
}

_FIELD = re.compile(r"\{(\w+)\}")


def fill(template: str, **wildcards: object) -> str:
    """``template`` with the given wildcards filled in and every other ``{name}`` left as it is."""
    return _FIELD.sub(lambda m: str(wildcards[m.group(1)]) if m.group(1) in wildcards else m.group(0), template)


@dataclass(frozen=True)
class StudyPaths:
    """The results and log paths of one study (``study.name``), relative to the project root."""

    study: str
    base: str = "."

    @property
    def results_root(self) -> str:
        return _join(self.base, RESULTS_DIR, self.study)

    @property
    def logs_root(self) -> str:
        return _join(self.base, LOGS_DIR, self.study)

    def result(self, key: str, **wildcards: object) -> str:
        """The results path ``key`` (see ``RESULTS``), wildcards filled where given."""
        return fill(f"{self.results_root}/{RESULTS[key]}", **wildcards)

    def log(self, key: str, **wildcards: object) -> str:
        """The log path ``key`` (see ``LOGS``), wildcards filled where given."""
        return fill(f"{self.logs_root}/{LOGS[key]}", **wildcards)

    def benchmark(self, rule_key: str, **wildcards: object) -> str:
        """Snakemake ``benchmark:`` file of the rule whose log is ``LOGS[rule_key]``."""
        rel = LOGS[rule_key].removesuffix(".log") + ".tsv"
        return fill(f"{self.logs_root}/{LOGS['benchmarks']}/{rel}", **wildcards)

    def regex(self, key: str) -> re.Pattern[str]:
        """A regex matching the results path ``key`` (relative to ``base``) with a named group per
        wildcard, for reading the wildcards back from a path."""
        parts = _FIELD.split(f"{_join('.', RESULTS_DIR, self.study)}/{RESULTS[key]}")
        out = []
        for i, part in enumerate(parts):
            out.append(re.escape(part) if i % 2 == 0 else f"(?P<{part}>[^/]+)")
        return re.compile("".join(out))


def _join(base: str, *parts: str) -> str:
    return Path(base, *parts).as_posix()


def root_of(path: str | Path, key: str) -> Path:
    """The study root (``results/<study>/``, resolved) that ``path``, a file made from ``RESULTS[key]``, lies under."""
    return Path(path).resolve().parents[len(Path(RESULTS[key]).parts) - 1]


def for_config(config: dict, base: str | Path = ".") -> StudyPaths:
    """The paths of the study ``config`` describes (its ``study.name``)."""
    return StudyPaths(str(config["study"]["name"]), str(base))
