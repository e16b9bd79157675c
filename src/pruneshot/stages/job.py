"""The runtime every stage shares: the :class:`Job` (log, input hashes, provenance, MLflow run),
failure helpers, seeds and resumable checkpoints. The stages themselves live one per module
beside this one (``stages.pretrain``, ``stages.transfer``, ...); ``scripts/*.py`` unpack
Snakemake's objects into plain paths and values and call them, so every stage also runs and is
tested without Snakemake."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pruneshot.config import config_hash
from pruneshot.io import read_json, sha256_file
from pruneshot.paths import for_config
from pruneshot.runtime.provenance import git_state, provenance
from pruneshot.seeds import derive_seed

PROJECT_DIR = Path.cwd()


def spool_dir(config: dict[str, Any]) -> Path:
    """Where a study's jobs spool MLflow records they could not deliver (``logs/<study>/mlflow_spool``)."""
    return Path(for_config(config).log("mlflow_spool"))


class InputChangedError(ValueError):
    """An input file's sha256 differs from the one its producer recorded."""


@dataclass
class Job:
    """What a stage needs to know about the Snakemake job running it."""

    rule: str
    wildcards: dict[str, str]
    config: dict[str, Any]
    log_path: Path | None = None
    study_path: Path | None = None
    threads: int = 1
    _logger: logging.Logger | None = field(default=None, repr=False)
    _hashes: dict[str, str] = field(default_factory=dict, repr=False)

    def input_hashes(self, inputs: list[Path]) -> dict[str, str]:
        """sha256 of each existing input file, computed once per job."""
        for p in inputs:
            key = Path(p).as_posix()
            if key not in self._hashes and Path(p).is_file():
                self._hashes[key] = sha256_file(p)
        return {Path(p).as_posix(): self._hashes[Path(p).as_posix()] for p in inputs
                if Path(p).as_posix() in self._hashes}

    def check_recorded(self, path: Path, recorded: str | None, recorded_in: Path | str) -> None:
        """Refuse an input whose sha256 is not the one its producer recorded (``recorded``, read from
        ``recorded_in``): a file corrupted or edited after the job that wrote it must never be used.
        Nothing recorded (None: results of an older version) is nothing to check."""
        if recorded is None:
            return
        actual = self.input_hashes([Path(path)]).get(Path(path).as_posix())
        if actual is None:
            raise FileNotFoundError(f"input {path} is missing (its producer recorded it in {recorded_in})")
        if actual != recorded:
            raise InputChangedError(f"input {path} has sha256 {actual}, but {recorded_in} recorded {recorded} for it: "
                               "the file changed after the job that wrote it (corrupted or edited). Rerun that "
                               "job (snakemake --forcerun <its rule>) instead of using it.")

    @property
    def logger(self) -> logging.Logger:
        if self._logger is None:
            name = f"pruneshot.{self.rule}.{'.'.join(self.wildcards.values())}"
            logger = logging.getLogger(name)
            logger.setLevel(logging.INFO)
            logger.propagate = False
            handler: logging.Handler
            if self.log_path is not None:
                Path(self.log_path).parent.mkdir(parents=True, exist_ok=True)
                handler = logging.FileHandler(self.log_path, mode="w")
            else:
                handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            logger.handlers[:] = [handler]
            self._logger = logger
        return self._logger

    def log(self, message: str) -> None:
        self.logger.info(message)

    @property
    def config_sha256(self) -> str:
        return config_hash(self.config)

    def provenance(self, inputs: list[Path], seeds: dict[str, int], device: str = "cpu") -> dict[str, Any]:
        return provenance(rule=self.rule, wildcards=self.wildcards, config_sha256=self.config_sha256,
                          input_sha256=self.input_hashes(inputs), seeds=seeds, device=device)

    @contextlib.contextmanager
    def tracked(
        self, inputs: list[Path], seeds: dict[str, int], params: dict[str, Any],
        upstream: dict[str, Any] | None = None,
    ) -> Iterator[Any]:
        """An MLflow run for this job (best effort: never blocks the job; spooled on failure), live or
        deferred to sync_tracking as ``mlflow.live`` says. ``upstream``: the record of the job whose
        output this one reads (its ``mlflow_run_id``/``mlflow_spool_id`` become tags)."""
        import torch

        from pruneshot.runtime import mlflow_client, tracking

        torch.set_num_threads(max(1, self.threads))
        commit, dirty = git_state()
        tags = {
            "pruneshot.rule": self.rule,
            "pruneshot.job_key": job_key(self.rule, self.wildcards),
            "pruneshot.git_commit": commit,
            "pruneshot.git_dirty": str(dirty).lower(),
            "pruneshot.config_sha256": self.config_sha256,
            mlflow_client.UPSTREAM_RUN_TAG: (upstream or {}).get("mlflow_run_id") or "",
            mlflow_client.UPSTREAM_SPOOL_TAG: (upstream or {}).get("mlflow_spool_id") or "",
            **{f"pruneshot.wildcard.{k}": str(v) for k, v in self.wildcards.items()},
            **{f"pruneshot.seed.{k}": str(v) for k, v in seeds.items()},
            **{f"pruneshot.input_sha256.{p}": h for p, h in self.input_hashes(inputs).items()},
        }
        if self.study_path is None:
            yield _NullRun()
            return
        study = read_json(self.study_path)
        mlflow_client.configure_timeouts()
        live = bool((self.config.get("mlflow") or {}).get("live", False))
        with tracking.JobRun(study, job_key(self.rule, self.wildcards), tags=tags, params=params,
                             spool_dir=spool_dir(self.config), live=live) as run:
            yield run


def run_ids(run: Any) -> dict[str, str | None]:
    """What a stage's record keeps of its MLflow run: ``mlflow_run_id`` (None until sync_tracking when
    deferred, or offline) and ``mlflow_spool_id`` (the run's tag ``pruneshot.spool_id`` or
    ``pruneshot.replay_of``; sync_tracking maps it to the run id)."""
    return {"mlflow_run_id": run.run_id, "mlflow_spool_id": run.spool_id}


def job_from_snakemake(smk: Any) -> Job:
    """A Job from the ``snakemake`` object Snakemake injects into scripts."""
    study = getattr(smk.input, "study", None) if hasattr(smk, "input") else None
    return Job(
        rule=smk.rule, wildcards={k: str(v) for k, v in smk.wildcards.items()}, config=smk.config,
        log_path=Path(smk.log[0]) if len(smk.log) else None,
        study_path=Path(study) if study else None, threads=int(smk.threads),
    )


class _NullRun:
    run_id = None
    spool_id = None

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass


def error_text(exc: BaseException) -> str:
    """One line naming a failure: exception type and message."""
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:2000]


def inject_failure(stage: str, method: str) -> None:
    """Raise if ``PRUNESHOT_INJECT_FAILURE`` names this (stage, method), e.g. ``search:dap`` or
    ``transfer:random`` (comma-separated): a testing hook to exercise failed cells end to end."""
    wanted = {w.strip() for w in os.environ.get("PRUNESHOT_INJECT_FAILURE", "").split(",") if w.strip()}
    if f"{stage}:{method}" in wanted:
        raise RuntimeError(f"injected failure ({stage}:{method}, PRUNESHOT_INJECT_FAILURE)")


def job_key(rule: str, wildcards: dict[str, str]) -> str:
    """Readable unique name of a job, e.g. 'transfer/method=random,budget=0.5,...'."""
    return rule + ("/" + ",".join(f"{k}={v}" for k, v in wildcards.items()) if wildcards else "")


def seeds_for(config: dict[str, Any], replicate: int) -> dict[str, int]:
    """The study's root seed and the pretrain and search seeds of ``replicate`` (protocol.md)."""
    root = config["study"]["root_seed"]
    return {
        "root": root,
        "pretrain": derive_seed(root, "pretrain", replicate),
        "search": derive_seed(root, "search", replicate),
    }


def checkpointer(job: Job, out_dir: Path, *settings: Any, modules: tuple[str, ...]) -> Any:
    """The job's :class:`pruneshot.runtime.checkpoint.Checkpointer` (``results/<study>/checkpoints/<out_dir below the
    study root>``), keyed on ``settings`` (the config settings, seeds and input sha256 the job reads),
    the source of ``modules`` (names in ``pruneshot``) and the torch version: a checkpoint written
    under anything else is removed, never resumed."""
    import torch

    from pruneshot.runtime.checkpoint import Checkpointer, code_sha256, settings_key

    code = code_sha256(*(f"pruneshot.{m}" for m in ("runtime.checkpoint", *modules)))
    key = settings_key(job.rule, *settings, code, torch.__version__)
    return Checkpointer.for_outputs(out_dir, key, log=job.log)
