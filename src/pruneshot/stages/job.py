"""One function per pipeline stage. ``scripts/*.py`` unpack Snakemake's objects into plain
paths and values and call these, so every stage can also be run and tested without Snakemake."""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pruneshot.config import budget_label, config_hash
from pruneshot.io import read_json, save_tensors, sha256_file, write_json
from pruneshot.runtime.provenance import git_state, process_age_s, provenance
from pruneshot.seeds import derive_seed

PROJECT_DIR = Path.cwd()
SPOOL_DIR = Path("logs/mlflow_spool")


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
        upstream_run_id: str | None = None,
    ) -> Iterator[Any]:
        """An MLflow run for this job (best effort: never blocks the job; spooled on failure)."""
        import torch

        from pruneshot.runtime import tracking

        torch.set_num_threads(max(1, self.threads))
        commit, dirty = git_state()
        tags = {
            "pruneshot.rule": self.rule,
            "pruneshot.job_key": job_key(self.rule, self.wildcards),
            "pruneshot.git_commit": commit,
            "pruneshot.git_dirty": str(dirty).lower(),
            "pruneshot.config_sha256": self.config_sha256,
            "pruneshot.upstream_run_id": upstream_run_id or "",
            **{f"pruneshot.wildcard.{k}": str(v) for k, v in self.wildcards.items()},
            **{f"pruneshot.seed.{k}": str(v) for k, v in seeds.items()},
            **{f"pruneshot.input_sha256.{p}": h for p, h in self.input_hashes(inputs).items()},
        }
        if self.study_path is None:
            yield _NullRun()
            return
        study = read_json(self.study_path)
        tracking.configure_timeouts()
        with tracking.JobRun(study, job_key(self.rule, self.wildcards), tags=tags, params=params,
                             spool_dir=SPOOL_DIR) as run:
            yield run


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


def _seeds_for(config: dict[str, Any], replicate: int) -> dict[str, int]:
    root = config["study"]["root_seed"]
    return {
        "root": root,
        "pretrain": derive_seed(root, "pretrain", replicate),
        "search": derive_seed(root, "search", replicate),
    }


# --- tracking --------------------------------------------------------------------------------

def init_tracking(config: dict[str, Any], out_study: Path) -> dict[str, str]:
    """Create the MLflow store/experiment and the study's parent run; write study.json."""
    from pruneshot.runtime import tracking

    uri = tracking.resolve_tracking_uri(config.get("mlflow", {}).get("tracking_uri"), PROJECT_DIR)
    commit, dirty = git_state()
    study = tracking.init_study(uri, config["study"]["name"], {
        "pruneshot.git_commit": commit, "pruneshot.git_dirty": str(dirty).lower(),
        "pruneshot.config_sha256": config_hash(config), "pruneshot.rule": "init_tracking",
    })
    write_json(out_study, study)
    return study


def sync_tracking(study_path: Path, out: Path) -> dict[str, Any]:
    """Replay spooled MLflow records (jobs that could not reach MLflow); write a summary."""
    from pruneshot.runtime import tracking

    study = read_json(study_path)
    summary = tracking.sync_spool(SPOOL_DIR, study["tracking_uri"]) if SPOOL_DIR.exists() else {
        "records": 0, "synced": 0, "failed": 0, "metrics": 0}
    write_json(out, {"study": study, "spool": summary})
    return summary


# --- data ------------------------------------------------------------------------------------

def prepare_source(config: dict[str, Any], out_dir: Path, job: Job) -> dict[str, Any]:
    """Source classes -> train/val shards + manifest.

    Downloads (cache ``data.cache_dir``, settings ``data.download``) or reads the source dataset,
    converts it to ``data.image`` and writes ``out_dir`` atomically (nothing on failure)."""
    from pruneshot.data import prepare as data

    src = config["data"]["source"]
    raw = data.load_entry(src, "source", config["data"])
    seed = derive_seed(config["study"]["root_seed"], "data", "source_val")
    manifest = data.prepare_source(raw, src["classes"], src["val_fraction"], seed, out_dir,
                                   image=config["data"].get("image"),
                                   provenance=job.provenance([], {"split_seed": seed}))
    job.log(f"source {src['dataset']} ({manifest['split']}) classes {src['classes']}: "
            f"{manifest['splits']['train']['n']} train / {manifest['splits']['val']['n']} val, "
            f"images {manifest['image_shape']} (native {manifest['native_shape']})")
    return manifest


def prepare_target(config: dict[str, Any], target: str, out_dir: Path, job: Job) -> dict[str, Any]:
    """Target classes -> one pool shard + manifest (data handling as in :func:`prepare_source`)."""
    from pruneshot.data import prepare as data

    tgt = config["data"]["targets"][target]
    raw = data.load_entry(tgt, "target", config["data"])
    manifest = data.prepare_target(raw, tgt["classes"], out_dir, image=config["data"].get("image"),
                                   provenance=job.provenance([], {}))
    job.log(f"target {target}: {tgt['dataset']} ({manifest['split']}), {manifest['splits']['pool']['n']} images, "
            f"classes {tgt['classes']}, images {manifest['image_shape']} (native {manifest['native_shape']})")
    return manifest


def make_episodes(config: dict[str, Any], target: str, ways: int, shots: int, manifest_path: Path,
                  out: Path, job: Job) -> None:
    """Sample and save the fixed episodes of (target, ways, shots)."""
    from pruneshot.data.episodes import make_episodes as sample
    from pruneshot.io import load_tensors

    manifest = read_json(manifest_path)
    pool_path = Path(manifest_path).parent / manifest["splits"]["pool"]["file"]
    labels = load_tensors(pool_path)["y"].numpy()
    ep_cfg = config["episodes"]
    episodes = sample(labels, ways=ways, shots=shots, count=ep_cfg["count"],
                      queries_per_class=ep_cfg["queries_per_class"],
                      root_seed=config["study"]["root_seed"], target=target)
    write_json(out, {
        "target": target, "ways": ways, "shots": shots, "queries_per_class": ep_cfg["queries_per_class"],
        "pool_sha256": manifest["splits"]["pool"]["sha256"], "episodes": episodes,
        "provenance": job.provenance([manifest_path], {"episode_root": config["study"]["root_seed"]}),
    })
    job.log(f"{len(episodes)} episodes {ways}-way {shots}-shot for {target}")


# --- pretrain --------------------------------------------------------------------------------

def _checkpointer(job: Job, out_dir: Path, *settings: Any, modules: tuple[str, ...]) -> Any:
    """The job's :class:`pruneshot.runtime.checkpoint.Checkpointer` (``results/checkpoints/<out_dir below
    results>``), keyed on ``settings`` (the config settings, seeds and input sha256 the job reads),
    the source of ``modules`` (names in ``pruneshot``) and the torch version: a checkpoint written
    under anything else is removed, never resumed."""
    import torch

    from pruneshot.runtime.checkpoint import Checkpointer, code_sha256, settings_key

    code = code_sha256(*(f"pruneshot.{m}" for m in ("runtime.checkpoint", *modules)))
    key = settings_key(job.rule, *settings, code, torch.__version__)
    return Checkpointer.for_outputs(out_dir, key, log=job.log)


def _load_source(manifest_path: Path):
    from pruneshot.data import prepare as data

    manifest = read_json(manifest_path)
    norm = manifest["normalization"]
    return (manifest, data.load_split(manifest_path, "train", norm),
            data.load_split(manifest_path, "val", norm))


def pretrain(config: dict[str, Any], replicate: int, manifest_path: Path, out_weights: Path,
             out_arch: Path, out_metrics: Path, job: Job) -> dict[str, Any]:
    """Train the backbone on the source classes; keep the best-validation epoch. Runs on
    ``pretrain.device`` (a requested but absent GPU is an error before any work) with the data held
    there as uint8; what was applied (device name, amp, channels_last, augment) goes into the
    record and the MLflow params."""
    from pruneshot.data.pipeline import Augment, BatchSource, load_raw_split, resolve_device
    from pruneshot.models.base import backbone_spec, build_model, state_dict_for_save
    from pruneshot.models.cost import count_flops, count_params, input_shape
    from pruneshot.seeds import seed_everything
    from pruneshot.training import device_description
    from pruneshot.training import pretrain as train

    pc = config["pretrain"]
    device = resolve_device(pc.get("device", "auto"), "pretrain.device")  # a missing GPU fails before any work
    on_cuda = device.type == "cuda"
    channels_last = bool(pc.get("channels_last", True)) and on_cuda
    amp = pc.get("amp", "none")
    augment = Augment.from_config(pc.get("augment"))
    seeds = _seeds_for(config, replicate)
    seed_everything(seeds["pretrain"])
    manifest = read_json(manifest_path)
    # uint8 images held on the training device, normalised (and augmented) there per batch
    train_split, val_split = (BatchSource.from_raw(load_raw_split(manifest_path, split), manifest["normalization"],
                                                   device=device, channels_last=channels_last)
                              for split in ("train", "val"))
    c, h, _ = manifest["image_shape"]
    bb = config["backbone"]
    model = build_model(backbone_spec(bb, c, h, len(manifest["classes"])))
    applied = {"pretrain.device_used": str(device), "pretrain.device_name": device_description(device),
               "pretrain.amp_used": amp if on_cuda else "none", "pretrain.channels_last_used": channels_last}
    params = {**{f"pretrain.{k}": v for k, v in pc.items() if not isinstance(v, dict)},
              **{f"pretrain.augment.{k}": v for k, v in (pc.get("augment") or {}).items()}, **applied,
              "backbone": bb["name"],
              **{f"backbone.{k}": v for k, v in bb.items() if k != "name"}, "replicate": replicate}
    ckpt = _checkpointer(job, out_weights.parent, "pretrain", replicate, pc, bb, seeds, str(device),
                         job.input_hashes([manifest_path]),
                         modules=("training", "data.pipeline", "models.base", "models.cifar"))
    t0 = time.perf_counter()
    with job.tracked([manifest_path], seeds, params) as run:
        import torch

        # A setting, not the job's core reservation: float sums depend on the thread count.
        torch.set_num_threads(pc["threads"])
        overhead = process_age_s()
        job.log(f"process start to first training step: {overhead}s; device {applied['pretrain.device_name']}, "
                f"amp {applied['pretrain.amp_used']}, channels_last {channels_last}, augment {augment}")
        model, info = train(model, train_split, val_split, epochs=pc["epochs"], batch_size=pc["batch_size"],
                            lr=pc["lr"], momentum=pc["momentum"], weight_decay=pc["weight_decay"],
                            patience=pc["patience"], seed=seeds["pretrain"], augment=augment, device=device,
                            amp=amp, channels_last=channels_last, log=job.log,
                            log_metrics=run.log_metrics, checkpoint=ckpt)
        seconds = time.perf_counter() - t0
        run.log_metrics({"best_val_acc": info["best_val_acc"], "seconds": seconds}, None)
        run_id = run.run_id
    save_tensors(out_weights, state_dict_for_save(model))
    write_json(out_arch, model.spec)
    record = {
        "replicate": replicate, "best_epoch": info["best_epoch"], "best_val_acc": info["best_val_acc"],
        "epochs_run": info["epochs_run"], "history": info["history"], "seconds": seconds,
        "resumed_after_epoch": info["resumed_after_epoch"], "seconds_before_resume": info["seconds_before_resume"],
        "overhead_s": overhead, "applied": info["applied"],
        "params": count_params(model), "flops": count_flops(model, input_shape(model.spec)),
        "weights_sha256": sha256_file(out_weights), "mlflow_run_id": run_id,
        "provenance": job.provenance([manifest_path], seeds, device=str(device)),
    }
    write_json(out_metrics, record)
    ckpt.clear()  # the outputs are complete: the checkpoint is no longer needed
    return record


# --- search ----------------------------------------------------------------------------------

def search(config: dict[str, Any], method_name: str, budget: float, replicate: int, manifest_path: Path,
           pretrained_weights: Path, pretrained_arch: Path, pretrained_metrics: Path,
           out_weights: Path, out_arch: Path, out_record: Path, job: Job) -> dict[str, Any]:
    """Run one method's search at one budget; save the physically pruned network and its record."""
    from pruneshot.methods import SearchContext, get_method
    from pruneshot.models.base import load_model, state_dict_for_save
    from pruneshot.models.cost import cost, count_flops, count_params, input_shape
    from pruneshot.seeds import seed_everything

    method = get_method(method_name)
    seeds = _seeds_for(config, replicate)
    seed_everything(seeds["search"])
    _, train_split, val_split = _load_source(manifest_path)
    spec = read_json(pretrained_arch)
    model = load_model(str(pretrained_weights), spec)
    dense_params = count_params(model)
    dense_flops = count_flops(model, input_shape(spec))
    metric = config["budget"]["metric"]
    inputs = [manifest_path, pretrained_weights, pretrained_arch]
    upstream = read_json(pretrained_metrics).get("mlflow_run_id")
    params = {"method": method_name, "budget": budget, "budget_metric": metric, "replicate": replicate,
              "side": method.side}
    options = method_options(config, method)
    code = (type(method).__module__.removeprefix("pruneshot."), "methods.base", "models.base", "models.cifar",
            "models.surgery")
    ckpt = _checkpointer(job, out_weights.parent, method_name, budget, metric, replicate, options, seeds,
                         job.input_hashes(inputs), modules=code)
    with job.tracked(inputs, seeds, params, upstream_run_id=upstream) as run:
        import torch._dynamo  # noqa: F401  (torch.optim imports it lazily, ~2 s: keep it out of search_seconds)

        t0 = time.perf_counter()
        try:
            inject_failure("search", method_name)
            result = method.search(SearchContext(
                model=model, budget=budget, metric=metric, source_train=train_split, source_val=val_split,
                seed=seeds["search"], options=options,
                log=job.log, log_metrics=run.log_metrics, checkpoint=ckpt))
        except Exception as exc:  # the method failed on this cell: a failed row, not a failed DAG
            failure = error_text(exc)
            job.log(f"FAILED: {failure}\n{traceback.format_exc()}")
            run.set_tags({"pruneshot.status": "failed", "pruneshot.error": failure[:500]})
            run_id = run.run_id
        else:
            failure = None
            seconds = time.perf_counter() - t0
            pruned = result.model.eval()
            achieved = {"params": count_params(pruned), "flops": count_flops(pruned, input_shape(pruned.spec))}
            run.log_metrics({"search_seconds": seconds, "achieved_params": achieved["params"],
                             "achieved_flops": achieved["flops"],
                             "achieved_ratio": cost(pruned, metric) / (dense_params if metric == "params"
                                                                      else dense_flops)}, None)
            run_id = run.run_id
    if failure is not None:
        # Snakemake needs every output: an empty weights file and the failure in arch and record.
        save_tensors(out_weights, {})
        write_json(out_arch, {"failed": True, "error": failure})
        record = {
            "method": method_name, "side": method.side, "method_provenance": method.provenance,
            "reference": method.reference, "replicate": replicate, "budget_metric": metric,
            "requested_budget": budget, "status": "failed", "error": failure,
            "dense_params": dense_params, "dense_flops": dense_flops, "search_device": "cpu",
            "search_seconds": time.perf_counter() - t0, "weights_sha256": sha256_file(out_weights),
            "mlflow_run_id": run_id, "upstream_run_id": upstream, "provenance": job.provenance(inputs, seeds),
        }
        write_json(out_record, record)
        ckpt.clear()
        job.log(f"{method_name} budget {budget_label(budget)}: FAILED ({failure}); recorded as a failed cell")
        return record
    save_tensors(out_weights, state_dict_for_save(pruned))
    write_json(out_arch, pruned.spec)
    record = {
        "method": method_name, "side": method.side, "method_provenance": method.provenance,
        "reference": method.reference, "replicate": replicate,
        "budget_metric": metric, "requested_budget": budget, "status": "ok", "error": "",
        "achieved_params": achieved["params"], "achieved_flops": achieved["flops"],
        "dense_params": dense_params, "dense_flops": dense_flops,
        "params_ratio": achieved["params"] / dense_params, "flops_ratio": achieved["flops"] / dense_flops,
        "search_seconds": seconds, "search_device": "cpu", "keep": result.keep, "info": result.info,
        "weights_sha256": sha256_file(out_weights), "mlflow_run_id": run_id,
        "upstream_run_id": upstream, "provenance": job.provenance(inputs, seeds),
    }
    write_json(out_record, record)
    ckpt.clear()  # the outputs are complete: the checkpoint is no longer needed
    job.log(f"{method_name} budget {budget_label(budget)} ({metric}): params {achieved['params']}/"
            f"{dense_params} flops {achieved['flops']}/{dense_flops} in {seconds:.2f}s")
    return record


# --- transfer --------------------------------------------------------------------------------

def method_options(config: dict[str, Any], method: Any) -> dict[str, Any]:
    """The method's config section, plus the sections of other methods it builds on
    (``method.option_sections``), nested under their names."""
    own = config.get(method.name)
    options = dict(own) if isinstance(own, dict) else {}
    for section in getattr(method, "option_sections", ()):
        options[section] = dict(config.get(section) or {})
    return options


def episode_seeds(config: dict[str, Any], replicate: int, target: str, ways: int, shots: int, episode: int,
                  arms: list[str]) -> dict[str, Any]:
    """Seeds of one episode's transfer. ``head`` (new classifier) and ``adapt`` (target-side pruning)
    are shared by every method and arm, so arms and methods are paired; ``finetune[arm]`` (mini-batch
    order, and the fresh weights of the reinit arm) is per arm."""
    root = config["study"]["root_seed"]
    axis = (replicate, target, ways, shots, episode)
    return {
        "head": derive_seed(root, "finetune", *axis, "head"),
        "adapt": derive_seed(root, "adapt", *axis),
        "finetune": {arm: derive_seed(root, "finetune", *axis, arm) for arm in arms},
    }


def _fresh_weights(spec: dict[str, Any], seed: int):
    """The architecture ``spec`` with a fresh initialisation drawn under ``seed`` (reinit arm)."""
    import torch

    from pruneshot.models.base import build_model

    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        return build_model(spec)
    finally:
        torch.random.set_rng_state(state)


def transfer(config: dict[str, Any], method_name: str, arms: list[str], shots: int, target: str, replicate: int,
             weights: Path, arch: Path, search_record: Path, source_manifest: Path, target_manifest: Path,
             episodes_path: Path, out: Path, job: Job) -> dict[str, Any]:
    """Transfer one searched network to every saved episode under each of ``arms``; score each query set.

    Per episode: the network gets a new seeded ``ways``-way head; a target-side method then prunes
    it on the support set (``method.adapt``, once per episode, shared by the arms); each arm trains
    its own copy ('finetune': all kept weights, 'linear_probe': the head only, 'reinit': the same
    architecture freshly initialised, then as finetune). A target-side method's achieved cost and
    seconds are recorded per episode. One MLflow run per job; metrics are prefixed by the arm.

    The arms train and score on ``transfer.device`` (the model and the episode's support and query
    tensors are moved there; every random draw stays on the CPU, so the seeds mean the same on any
    device). Target-side pruning (``method.adapt``) and all cost counting stay on the CPU."""
    import torch

    from pruneshot.data import prepare as data
    from pruneshot.data.pipeline import Augment, resolve_device, zero_level
    from pruneshot.methods import AdaptContext, get_method
    from pruneshot.models.base import load_model
    from pruneshot.models.cost import cost
    from pruneshot.report.stats import mean_ci
    from pruneshot.runtime.provenance import device_name
    from pruneshot.training import accuracy, finetune_episode

    method = get_method(method_name)
    allowed = method.arms(["finetune", "linear_probe", "reinit"])
    bad = [a for a in arms if a not in allowed]
    if bad or not arms:
        raise ValueError(f"{method_name} ({method.side}-side) cannot run transfer arm(s) {bad or arms}; "
                         f"allowed: {allowed}")
    tc = config["transfer"]
    device = resolve_device(tc.get("device", "auto"), "transfer.device")  # a missing GPU fails before any work
    seeds = _seeds_for(config, replicate)
    rec = read_json(search_record)
    spec = read_json(arch)
    # Target images are normalised with the source statistics the backbone was trained on.
    norm = read_json(source_manifest)["normalization"]
    pool = data.load_split(target_manifest, "pool", norm)
    eps = read_json(episodes_path)
    augment_mode = tc.get("augment", "none")
    if augment_mode not in ("none", "crop_flip"):
        raise ValueError(f"transfer.augment: unknown mode {augment_mode!r}; allowed: none, crop_flip")
    augment = Augment(crop_padding=int(tc.get("crop_padding", 4)), flip=True) if augment_mode == "crop_flip" else None
    # crop padding of normalised images: the value a level-0 pixel has after normalisation
    fill = zero_level(read_json(target_manifest)["max_value"], norm)
    ways = eps["ways"]
    metric = config["budget"]["metric"]
    budget = float(rec["requested_budget"])
    options = method_options(config, method)
    inputs = [weights, arch, source_manifest, target_manifest, episodes_path]
    params = {"method": method_name, "arms": ",".join(arms), "shots": shots, "ways": ways, "target": target,
              "budget": rec["requested_budget"], "replicate": replicate, "side": method.side,
              **{f"transfer.{k}": v for k, v in tc.items()}, "transfer.device_used": str(device)}
    per_arm: dict[str, dict[str, Any]] = {a: {"episode_accuracies": [], "finetune_seeds": [], "seconds": 0.0}
                                          for a in arms}
    head_seeds: list[int] = []
    adapt_seeds: list[int] = []
    adapted: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    n_eps = len(eps["episodes"])
    failure = f"search failed: {rec['error']}" if rec.get("status") == "failed" else None
    with job.tracked(inputs, seeds, params, upstream_run_id=rec.get("mlflow_run_id")) as run:
        overhead = process_age_s()
        if failure is None:
            try:
                inject_failure("transfer", method_name)
                pruned = load_model(str(weights), spec)
                job.log(f"process start to first training step: {overhead}s; arms {arms}")
                if method.side == "target":  # the budget's reference: the dense network with a ways-way head
                    probe = copy.deepcopy(pruned)
                    probe.reset_classifier(ways)
                    dense_cost = cost(probe, metric)
                for ep in eps["episodes"]:
                    i = ep["index"]
                    sx, sy = pool.x[ep["support"]], torch.tensor(ep["support_labels"])
                    qx, qy = pool.x[ep["query"]], torch.tensor(ep["query_labels"])
                    sxd, syd, qxd, qyd = (t.to(device) for t in (sx, sy, qx, qy))  # the arms' copies
                    es = episode_seeds(config, replicate, target, ways, shots, i, arms)
                    head_seeds.append(es["head"])
                    start = None
                    if method.side == "target":
                        model = copy.deepcopy(pruned)
                        model.reset_classifier(ways, torch.Generator().manual_seed(es["head"]))
                        model.eval()
                        ta = time.perf_counter()
                        torch.manual_seed(es["adapt"])
                        res = method.adapt(AdaptContext(model=model, budget=budget, metric=metric, support_x=sx,
                                                        support_y=sy, seed=es["adapt"], dense_cost=dense_cost,
                                                        options=options, log=job.log))
                        start = res.model.eval()
                        a_cost = {m: cost(start, m) for m in ("params", "flops")}
                        ratio = a_cost[metric] / dense_cost
                        adapt_seeds.append(es["adapt"])
                        adapted.append({
                            "episode": i, "adapt_seconds": time.perf_counter() - ta,
                            "params": a_cost["params"], "flops": a_cost["flops"], "achieved_ratio": ratio,
                            "spec": start.spec,
                            "info": {k: v for k, v in res.info.items() if k not in ("history", "rounds")},
                        })
                        run.log_metrics({"achieved_ratio": ratio, "adapt_seconds": adapted[-1]["adapt_seconds"]}, i)
                    for arm in arms:
                        ta = time.perf_counter()
                        seed = es["finetune"][arm]
                        torch.manual_seed(seed)
                        if start is not None:
                            model = copy.deepcopy(start)
                        else:
                            model = _fresh_weights(spec, seed) if arm == "reinit" else copy.deepcopy(pruned)
                            model.reset_classifier(ways, torch.Generator().manual_seed(es["head"]))
                        model = model.to(device).eval()  # built and seeded on the CPU, then moved
                        finetune_episode(model, sxd, syd, arm="finetune" if arm == "reinit" else arm, steps=tc["steps"],
                                         lr=tc["lr"], momentum=tc["momentum"], weight_decay=tc["weight_decay"],
                                         batch_size=tc["batch_size"], seed=seed, augment=augment, fill=fill)
                        acc = accuracy(model, qxd, qyd)
                        per_arm[arm]["episode_accuracies"].append(acc)
                        per_arm[arm]["finetune_seeds"].append(seed)
                        per_arm[arm]["seconds"] += time.perf_counter() - ta
                        run.log_metrics({f"{arm}/episode_acc": acc}, i)
                    if (i + 1) % 10 == 0 or i + 1 == n_eps:
                        el = time.perf_counter() - t0
                        means = ", ".join(f"{a} {sum(r['episode_accuracies']) / len(r['episode_accuracies']):.4f}"
                                          for a, r in per_arm.items())
                        job.log(f"episode {i + 1}/{n_eps} mean acc {means} elapsed {el:.1f}s "
                                f"left~{el / (i + 1) * (n_eps - i - 1):.1f}s")
            except Exception as exc:  # the method failed on this cell: a failed row, not a failed DAG
                failure = error_text(exc)
                job.log(f"FAILED: {failure}\n{traceback.format_exc()}")
                run.set_tags({"pruneshot.status": "failed", "pruneshot.error": failure[:500]})
        if failure is None:
            for arm, r in per_arm.items():
                r["summary"] = mean_ci(r["episode_accuracies"])
                run.log_metrics({f"{arm}/acc_mean": r["summary"]["mean"], f"{arm}/acc_ci95": r["summary"]["ci95"]},
                                None)
        run_id = run.run_id
    if failure is not None:
        per_arm = {a: {"episode_accuracies": [], "finetune_seeds": [], "seconds": 0.0, "summary": None}
                   for a in arms}
    record = {
        "method": method_name, "side": method.side, "shots": shots, "ways": ways,
        "target": target, "replicate": replicate, "requested_budget": rec["requested_budget"],
        "status": "ok" if failure is None else "failed", "error": failure or "",
        "arms": per_arm, "head_seeds": head_seeds,
        "device": {"device": str(device), "name": device_name(str(device)), "dtype": "float32",
                   "augment": augment_mode},
        "seconds": time.perf_counter() - t0, "overhead_s": overhead, "search_record_sha256": sha256_file(search_record),
        "weights_sha256": sha256_file(weights), "mlflow_run_id": run_id,
        "upstream_run_id": rec.get("mlflow_run_id"),
        "provenance": job.provenance(inputs, {**seeds, "episode_root": config["study"]["root_seed"]},
                                     device=str(device)),
    }
    if failure is not None:
        write_json(out, record)
        job.log(f"{method_name} {shots}-shot: FAILED ({failure}); recorded as a failed cell")
        return record
    if method.side == "target":
        record["adapt_seeds"] = adapt_seeds
        record["adapted"] = adapted
        record["achieved"] = {
            key: sum(a[key] for a in adapted) / len(adapted) for key in ("params", "flops", "achieved_ratio")
        } | {"adapt_seconds_mean": sum(a["adapt_seconds"] for a in adapted) / len(adapted),
             "ratio_min": min(a["achieved_ratio"] for a in adapted),
             "ratio_max": max(a["achieved_ratio"] for a in adapted)}
    write_json(out, record)
    for arm, r in per_arm.items():
        job.log(f"{method_name}/{arm} {shots}-shot: {r['summary']['mean']:.4f} +- {r['summary']['ci95']:.4f} "
                f"over {r['summary']['n']} episodes")
    return record


# --- profile ---------------------------------------------------------------------------------

def profile(config: dict[str, Any], weights: Path, arch: Path, out: Path, job: Job,
            adapted: Path | None = None) -> dict[str, Any]:
    """Measured latency of the pruned network at each configured batch size on each of
    ``profile.devices``: the CPU (``profile.threads`` threads) and, when present, CUDA (synchronised
    around every timed pass). Both time float32 forward passes in contiguous memory format. A
    configured CUDA that is absent is recorded as not present with the reason, never an error.
    The top-level ``device``/``dtype``/``threads``/``latency`` keys describe the CPU timing (None/{}
    when the CPU is not among the devices); ``devices`` has one entry per configured device.

    ``adapted``: for a target-side method, a transfer record whose per-episode networks differ;
    the one with the median parameter count is timed (its architecture, with seeded weights:
    the timing of dense float32 layers does not depend on the weight values)."""
    import torch

    from pruneshot.data.pipeline import cuda_absence_reason
    from pruneshot.models.base import load_model
    from pruneshot.models.cost import input_shape
    from pruneshot.models.latency import measure_latency
    from pruneshot.runtime.provenance import device_name

    pc = config["profile"]
    torch.set_num_threads(pc["threads"])
    inputs = [weights, arch]
    network: dict[str, Any] = {"from": "search"}
    arch_rec = read_json(arch)
    failure = f"search failed: {arch_rec['error']}" if arch_rec.get("failed") else None
    if failure is None and adapted is not None and read_json(adapted).get("status") == "failed":
        failure = f"transfer failed: {read_json(adapted)['error']}"
    if failure is not None:  # nothing to time: the cell is a failed row
        record = {"status": "failed", "error": failure, "device": None, "dtype": "float32", "threads": None,
                  "latency": {}, "batch_sizes": [int(b) for b in pc["batch_sizes"]], "devices": {},
                  "network": None, "weights_sha256": sha256_file(weights),
                  "provenance": job.provenance(inputs + ([adapted] if adapted else []), {})}
        write_json(out, record)
        job.log(f"not timed: {failure}")
        return record
    if adapted is None:
        spec = read_json(arch)
        model = load_model(str(weights), spec)
    else:
        eps = sorted(read_json(adapted)["adapted"], key=lambda a: (a["params"], a["episode"]))
        chosen = eps[(len(eps) - 1) // 2]
        spec = chosen["spec"]
        model = _fresh_weights(spec, derive_seed(config["study"]["root_seed"], "profile", chosen["episode"]))
        network = {"from": "per-episode target-side pruning (median params)", "transfer_record": str(adapted),
                    "episode": chosen["episode"], "params": chosen["params"], "flops": chosen["flops"],
                    "weights": "seeded initialisation"}
        inputs.append(adapted)
        job.log(f"timing the median-size episode network (episode {chosen['episode']}, {chosen['params']} params)")
    model.eval()
    batch_sizes = [int(b) for b in pc["batch_sizes"]]
    devices: dict[str, dict[str, Any]] = {}
    for dev in pc.get("devices", ["cpu", "cuda"]):
        if dev not in ("cpu", "cuda"):
            raise ValueError(f"profile.devices: unknown device {dev!r}; allowed: cpu, cuda")
        if dev == "cuda" and not torch.cuda.is_available():
            devices[dev] = {"present": False, "reason": cuda_absence_reason()}
            job.log(f"cuda: not present ({devices[dev]['reason']}); not timed")
            continue
        timed = model if dev == "cpu" else copy.deepcopy(model)  # measure_latency moves the model
        results = {}
        for bs in batch_sizes:
            results[str(bs)] = measure_latency(timed, input_shape(spec), bs, device=dev, warmup=pc["warmup"],
                                               repeats=pc["repeats"])
            job.log(f"{dev} batch {bs}: median {results[str(bs)]['median_ms']:.3f} ms")
        devices[dev] = {"present": True, "name": device_name(dev), "dtype": "float32", "latency": results,
                        **({"threads": torch.get_num_threads()} if dev == "cpu" else {})}
        if dev == "cuda":
            del timed
            torch.cuda.empty_cache()
    cpu = devices.get("cpu", {})
    record = {"status": "ok", "device": cpu.get("name"), "dtype": "float32", "threads": cpu.get("threads"),
              "latency": cpu.get("latency", {}), "batch_sizes": batch_sizes, "devices": devices,
              "network": network, "weights_sha256": sha256_file(weights),
              "provenance": job.provenance(inputs, {})}
    write_json(out, record)
    return record


# --- aggregate and report --------------------------------------------------------------------

def _row_id(*parts: object) -> str:
    import hashlib

    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:10]


def latency_columns(record: dict[str, Any]) -> dict[str, Any]:
    """The results-table latency columns of one profile record (median ms per batch size N).

    CPU: ``latency_device``, ``latency_dtype``, ``latency_ms_b{N}`` (the names they had before CUDA
    was timed). CUDA: ``latency_cuda_device`` and ``latency_cuda_ms_b{N}``, present for every batch
    size even when CUDA was not timed (then '' and NaN), so tables from machines with and without a
    GPU have the same columns. Reads records written before ``devices`` existed too."""
    nan = float("nan")
    cpu_lat = record.get("latency") or {}
    sizes = record.get("batch_sizes") or sorted(int(b) for b in cpu_lat)
    cuda = (record.get("devices") or {}).get("cuda") or {}
    cuda_lat = cuda.get("latency", {}) if cuda.get("present") else {}
    return {
        "latency_device": record.get("device") or "", "latency_dtype": record.get("dtype") or "float32",
        **{f"latency_ms_b{bs}": cpu_lat[str(bs)]["median_ms"] if str(bs) in cpu_lat else nan for bs in sizes},
        "latency_cuda_device": cuda.get("name", "") if cuda.get("present") else "",
        **{f"latency_cuda_ms_b{bs}": cuda_lat[str(bs)]["median_ms"] if str(bs) in cuda_lat else nan
           for bs in sizes},
    }


def aggregate(config: dict[str, Any], cells: list[dict[str, Any]], source_manifest: Path,
              target_manifests: dict[str, Path], out_csv: Path, out_episodes_csv: Path,
              out_metrics: Path, job: Job) -> list[dict[str, Any]]:
    """Collect every transfer cell into one tidy table (one row per method, budget, target, shots,
    arm, replicate), a long per-episode table, and metrics.json for ``dvc metrics show``.

    ``cells`` items: {"transfer": path, "search": path, "profile": path, "pretrain": path}.
    """
    import pandas as pd

    data_sha = {"source": sha256_file(source_manifest),
                **{t: sha256_file(p) for t, p in target_manifests.items()}}
    rows, episode_rows = [], []
    cache: dict[str, dict[str, Any]] = {}

    def load(path: Any) -> dict[str, Any]:
        if str(path) not in cache:
            cache[str(path)] = read_json(path)
        return cache[str(path)]

    for cell in cells:
        job_rec, se, pr = load(cell["transfer"]), load(cell["search"]), load(cell["profile"])
        pre = load(cell["pretrain"])
        arm = cell["arm"]
        failed = job_rec.get("status") == "failed"
        tr = {**job_rec, **job_rec["arms"][arm], "arm": arm}
        prov = tr["provenance"]
        seeds = prov["seeds"]
        row_id = _row_id(tr["method"], budget_label(tr["requested_budget"]), tr["target"], tr["ways"],
                         tr["shots"], arm, tr["replicate"], prov["config_sha256"], prov["git_commit"])
        nan = float("nan")
        if se.get("status") == "failed":  # no network: no cost either
            cost_cols = {k: nan for k in ("achieved_params", "achieved_flops", "params_ratio", "flops_ratio")}
            cost_cols |= {"search_seconds": se["search_seconds"], "search_scope": "once"}
        elif "achieved" in tr:  # target-side: pruned per episode, cost averaged over this cell's episodes
            ach = tr["achieved"]
            cost_cols = {
                "achieved_params": ach["params"], "achieved_flops": ach["flops"],
                "params_ratio": ach["params"] / se["dense_params"], "flops_ratio": ach["flops"] / se["dense_flops"],
                "search_seconds": ach["adapt_seconds_mean"], "search_scope": "per episode",
            }
        elif failed and se["side"] == "target":  # per-episode pruning never finished
            cost_cols = {k: nan for k in ("achieved_params", "achieved_flops", "params_ratio", "flops_ratio")}
            cost_cols |= {"search_seconds": nan, "search_scope": "per episode"}
        else:
            cost_cols = {
                "achieved_params": se["achieved_params"], "achieved_flops": se["achieved_flops"],
                "params_ratio": se["params_ratio"], "flops_ratio": se["flops_ratio"],
                "search_seconds": se["search_seconds"], "search_scope": "once",
            }
        cost_cols["budget_gap"] = se["requested_budget"] - cost_cols[f"{se['budget_metric']}_ratio"]
        summary = tr.get("summary") or {"mean": nan, "ci95": nan, "std": nan, "n": 0}
        row = {
            "row_id": row_id, "method": tr["method"], "method_source": se["method_provenance"],
            "side": se["side"], "backbone": config["backbone"]["name"],
            "source": config["data"]["source"]["dataset"], "target": tr["target"], "ways": tr["ways"],
            "shots": tr["shots"], "arm": tr["arm"], "budget_metric": se["budget_metric"],
            "requested_budget": se["requested_budget"], "achieved_params": cost_cols["achieved_params"],
            "achieved_flops": cost_cols["achieved_flops"], "dense_params": se["dense_params"],
            "dense_flops": se["dense_flops"], "params_ratio": cost_cols["params_ratio"],
            "flops_ratio": cost_cols["flops_ratio"], "budget_gap": cost_cols["budget_gap"],
            **latency_columns(pr),
            "search_seconds": cost_cols["search_seconds"], "search_scope": cost_cols["search_scope"],
            "search_device": se["search_device"],
            "acc_mean": summary["mean"], "acc_ci95": summary["ci95"],
            "acc_std": summary["std"], "n_episodes": summary["n"],
            "replicate": tr["replicate"], "seed_pretrain": seeds["pretrain"], "seed_search": seeds["search"],
            "seed_episode": seeds["episode_root"],
            "seed_finetune": tr["finetune_seeds"][0] if tr["finetune_seeds"] else "",
            "git_commit": prov["git_commit"], "git_dirty": prov["git_dirty"],
            "config_sha256": prov["config_sha256"], "data_sha256": data_sha[tr["target"]],
            "checkpoint_sha256": se["weights_sha256"], "pretrain_sha256": pre["weights_sha256"],
            "mlflow_run_id": tr["mlflow_run_id"] or "", "status": "failed" if failed else "ok",
            "error": tr.get("error", "") if failed else "",
            "transfer_record": str(cell["transfer"]),
            "transfer_seconds": tr["seconds"],
        }
        rows.append(row)
        episode_rows += [{"row_id": row_id, "episode": i, "accuracy": a}
                         for i, a in enumerate(tr["episode_accuracies"])]
    order = ["method", "requested_budget", "target", "shots", "arm", "replicate"]
    table = pd.DataFrame(rows).sort_values(order, ascending=[True, False, True, True, True, True])
    from pruneshot.io import atomic_path

    with atomic_path(out_csv) as tmp:
        table.to_csv(tmp, index=False)
    with atomic_path(out_episodes_csv) as tmp:
        pd.DataFrame(episode_rows).to_csv(tmp, index=False)
    metrics = {
        f"{r['method']}/b{budget_label(r['requested_budget'])}/{r['target']}/{r['shots']}shot/{r['arm']}"
        f"/r{r['replicate']}": {"acc_mean": round(r["acc_mean"], 6), "acc_ci95": round(r["acc_ci95"], 6),
                                "params_ratio": round(r["params_ratio"], 6),
                                "flops_ratio": round(r["flops_ratio"], 6)}
        for r in rows if r["status"] == "ok"
    }
    metrics["failed_cells"] = sum(r["status"] != "ok" for r in rows)
    write_json(out_metrics, metrics)
    job.log(f"aggregated {len(rows)} cells, {len(episode_rows)} episode results")
    return rows


def report(config: dict[str, Any], results_csv: Path, study_path: Path, sync_path: Path,
           source_manifest: Path, target_manifests: dict[str, Path], out_html: Path, figures_dir: Path,
           job: Job, episodes_csv: Path | None = None) -> None:
    """Render the self-contained HTML report with figures, tables, statistics and a provenance section.

    Refuses results from several code commits or config hashes unless ``report.allow_mixed``.
    """
    from pruneshot.report.build import build_report, collect_provenance, load_results

    prov = collect_provenance(
        load_results(results_csv), study=config["study"]["name"], config_sha256=config_hash(config),
        study_json=study_path, sync_json=sync_path, manifests={"source": source_manifest, **target_manifests},
        git=git_state())
    allow_mixed = bool(config.get("report", {}).get("allow_mixed", False))
    build_report(results_csv, prov, out_html, figures_dir, episodes_csv, allow_mixed=allow_mixed)
    job.log(f"report written to {out_html}")
