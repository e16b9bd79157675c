"""Stage transfer: one network, every saved episode of one (target, shots), every arm of its method.

Read top to bottom: :func:`transfer` prepares what every episode shares, then per episode
:func:`_head` gives the network a new seeded head, :func:`_adapt` lets a target-side method prune
it on the support set (once, shared by the arms), :func:`_arm_start` picks each arm's starting
network and :func:`_score` trains it and scores the query set. Episodes run in chunks of ``transfer.episode_batch``
(:mod:`pruneshot.batching` trains a chunk's networks of one architecture at once); the job checkpoints
after every chunk and a killed job resumes at the next one. :func:`_record` writes the result, each
accuracy keyed by its episode index."""

from __future__ import annotations

import copy
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pruneshot.io import read_json, sha256_file, write_json
from pruneshot.runtime.provenance import process_age_s
from pruneshot.seeds import derive_seed
from pruneshot.stages.job import Job, checkpointer, error_text, inject_failure, run_ids, seeds_for


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


@dataclass
class _Setting:
    """What every episode of the job shares (read once)."""

    method: Any
    arms: list[str]
    ways: int
    shots: int
    target: str
    replicate: int
    budget: float
    metric: str
    options: dict[str, Any]
    tc: dict[str, Any]  # config['transfer']
    device: Any  # torch.device the arms train and score on
    augment: Any  # Augment | None
    fill: float  # crop padding value of a level-0 pixel after normalisation
    spec: dict[str, Any]  # the loaded network's architecture
    adapt_steps: int  # support-set steps of a target-side method's adapt (0: none, or budget >= 1)
    episode_batch: int = 1  # networks fine-tuned at once (transfer.episode_batch resolved; 1: the reference engine)
    #: Per trained arm, its {lr, steps, settings}: chosen on validation (transfer.select) or fixed
    #: (transfer.lr, transfer.steps); an arm not listed uses the fixed ones.
    arm_settings: dict[str, dict[str, Any]] = field(default_factory=dict)

    def lr(self, arm: str) -> float:
        """The learning rate ``arm`` fine-tunes with."""
        return float(self.arm_settings.get(arm, {}).get("lr", self.tc["lr"]))

    def arm_steps(self, arm: str) -> int:
        """Training steps of ``arm`` on the support set: what its support-step total (``transfer.steps``,
        or the steps chosen on validation) leaves after adapt's steps, so every method's arm sees the
        same number of support steps under fixed settings ('prototype': none)."""
        if arm == "prototype":
            return 0
        return int(self.arm_settings.get(arm, {}).get("steps", self.tc["steps"])) - self.adapt_steps

    def support_steps(self, arm: str) -> int:
        """Every support-set step ``arm``'s network took in this cell (adapt's and the arm's)."""
        return self.adapt_steps + self.arm_steps(arm)


@dataclass
class _Episode:
    """One saved episode's CPU tensors (target-side pruning reads them; the arms get device copies)."""

    index: int
    support: tuple[Any, Any]
    query: tuple[Any, Any]

    def on(self, device: Any) -> tuple[Any, Any, Any, Any]:
        """(support x, support y, query x, query y) on ``device``."""
        return tuple(t.to(device) for t in (*self.support, *self.query))


def adapt_steps(config: dict[str, Any], method: Any, budget: float) -> int:
    """Support-set steps ``method``'s per-episode adapt takes at ``budget`` (0: source-side, or budget >= 1,
    where adapt returns the network untouched); checked to fit in ``transfer.steps``."""
    from pruneshot.methods import options_for

    if method.side != "target" or budget >= 1.0:
        return 0
    steps = method.support_steps(options_for(config, method))
    if steps > config["transfer"]["steps"]:
        raise ValueError(f"{method.name} adapts for {steps} support-set steps, more than transfer.steps "
                         f"({config['transfer']['steps']}), the support steps every method's arm gets in all; "
                         f"raise transfer.steps or shorten {method.name}'s schedule")
    return steps


def fixed_or_selected(config: dict[str, Any], arm: str, selection: dict[str, Any] | None) -> dict[str, Any]:
    """The (lr, steps) ``arm`` transfers with: the selection record's choice, else transfer.lr and
    transfer.steps; with ``settings`` 'selected' or 'fixed'."""
    tc = config["transfer"]
    if selection is None or arm not in selection.get("arms", {}):
        return {"lr": float(tc["lr"]), "steps": int(tc["steps"]), "settings": "fixed"}
    chosen = selection["arms"][arm]["chosen"]
    return {"lr": float(chosen["lr"]), "steps": int(chosen["steps"]), "settings": "selected"}


def _check_arms(method: Any, arms: list[str]) -> None:
    from pruneshot.methods import ARMS

    allowed = method.arms(list(ARMS))
    bad = [a for a in arms if a not in allowed]
    if bad or not arms:
        raise ValueError(f"{method.name} ({method.side}-side) cannot run transfer arm(s) {bad or arms}; "
                         f"allowed: {allowed}")


def _augment(tc: dict[str, Any]) -> tuple[str, Any]:
    """(mode, Augment or None) of ``transfer.augment``."""
    from pruneshot.data.pipeline import Augment

    mode = tc.get("augment", "none")
    if mode not in ("none", "crop_flip"):
        raise ValueError(f"transfer.augment: unknown mode {mode!r}; allowed: none, crop_flip")
    return mode, Augment(crop_padding=int(tc.get("crop_padding", 4)), flip=True) if mode == "crop_flip" else None


def _episodes(eps: dict[str, Any], pool: Any) -> list[_Episode]:
    import torch

    return [_Episode(ep["index"], (pool.x[ep["support"]], torch.tensor(ep["support_labels"])),
                     (pool.x[ep["query"]], torch.tensor(ep["query_labels"]))) for ep in eps["episodes"]]


def _head(network: Any, ways: int, seed: int) -> Any:
    """A copy of ``network`` with a fresh ``ways``-way head drawn under ``seed``."""
    import torch

    model = copy.deepcopy(network)
    model.reset_classifier(ways, torch.Generator().manual_seed(seed))
    return model


def episode_batch(s: _Setting, network: Any, episodes: list[_Episode]) -> int:
    """The chunk size K of the job's episodes: ``transfer.episode_batch`` resolved
    (:func:`pruneshot.batching.resolve_episode_batch`; 'auto' measures ``network`` with a ``ways``-way
    head on the first episode's support set). Transfer and selection (select_transfer) both use it."""
    from pruneshot.batching import resolve_episode_batch

    return resolve_episode_batch(s.tc["episode_batch"], _head(network, s.ways, 0), episodes[0].support[0], s.device,
                                 len(episodes))


@contextmanager
def job_dtype(tc: dict[str, Any]) -> Iterator[Any]:
    """``transfer.dtype`` as torch's default dtype while the job computes (yielded; every network, head
    and scale the job creates has it; the caller converts what it loads), the previous one restored after."""
    import torch

    default_dtype = torch.get_default_dtype()
    try:
        dtype = getattr(torch, tc["dtype"])
        torch.set_default_dtype(dtype)
        yield dtype
    finally:
        torch.set_default_dtype(default_dtype)


def _adapt(s: _Setting, network: Any, chunk: list[_Episode], seeds: list[dict[str, Any]], dense_cost: float,
           log: Any) -> list[tuple[Any, dict[str, Any]]]:
    """Target-side pruning of each episode's headed network on its support set, the chunk at once
    (``method.adapt_batch``; chunks of one under the reference engine): per episode (pruned network,
    entry of the record's ``adapted`` list). ``adapt_seconds``: the chunk's seconds / its size."""
    from pruneshot.methods import AdaptContext
    from pruneshot.models.cost import cost

    contexts = [AdaptContext(model=_head(network, s.ways, es["head"]).eval(), budget=s.budget, metric=s.metric,
                             support_x=ep.support[0], support_y=ep.support[1], seed=es["adapt"],
                             dense_cost=dense_cost, options=s.options, log=log, device=str(s.device))
                for ep, es in zip(chunk, seeds, strict=True)]
    t0 = time.perf_counter()
    results = s.method.adapt_batch(contexts)  # a chunk of one under the reference engine
    seconds = (time.perf_counter() - t0) / len(chunk)
    out = []
    for ep, es, res in zip(chunk, seeds, results, strict=True):
        start = res.model.eval()
        a_cost = {m: cost(start, m) for m in ("params", "flops")}
        out.append((start, {
            "episode": ep.index, "adapt_seed": es["adapt"], "adapt_seconds": seconds,
            "params": a_cost["params"], "flops": a_cost["flops"], "achieved_ratio": a_cost[s.metric] / dense_cost,
            "spec": start.spec, "info": {k: v for k, v in res.info.items() if k not in ("history", "rounds")},
        }))
    return out


def _arm_start(s: _Setting, arm: str, network: Any, adapted: Any, seeds: dict[str, Any]) -> Any:
    """The network ``arm`` trains on this episode, on the arms' device: the target-side pruned one,
    else the loaded network (reinit: its architecture freshly initialised) with the episode's head.
    Built and seeded on the CPU (the global RNG is seeded with the arm's seed first), then moved."""
    import torch

    from pruneshot.models.base import build_seeded

    seed = seeds["finetune"][arm]
    torch.manual_seed(seed)
    if adapted is not None:
        model = copy.deepcopy(adapted)
    else:
        base = build_seeded(s.spec, seed) if arm == "reinit" else network
        model = _head(base, s.ways, seeds["head"])
    return model.to(s.device).eval()


def support_bn_statistics(model: Any, support_x: Any, seed: int) -> None:
    """The end of the reinit arm's BatchNorm treatment. A freshly initialised network's running
    statistics (mean 0 / variance 1) would leave it unnormalised in eval mode, and it has no source
    statistics worth keeping (and may use no source data): it trains with batch statistics (train
    mode, as training from scratch does), then every BatchNorm's running statistics are set to those
    of the episode's support images under the trained weights (one train-mode pass over all of them,
    no gradient) for scoring the query set. Measured on the default (20 episodes, 1 / 5-shot): fresh
    statistics frozen 50.5 / 78.3, support statistics frozen before training 43.8 / 77.2, this
    51.0 / 81.2 (the strongest reinit baseline of the three)."""
    from pruneshot.training import recalibrate_bn

    recalibrate_bn(model, support_x, images=len(support_x), batch_size=len(support_x), seed=seed)


def _score(s: _Setting, arm: str, model: Any, on_device: tuple[Any, Any, Any, Any], seed: int) -> float:
    """Train ``model`` under ``arm`` on the support set; its accuracy on the query set ('prototype':
    no training, nearest support-class centroid of the features)."""
    from pruneshot.training import finetune_episode, prototype_accuracy

    sx, sy, qx, qy = on_device
    if arm == "prototype":
        return prototype_accuracy(model, sx, sy, qx, qy)
    finetune_episode(model, sx, sy, seed=seed, **_finetune_kwargs(s, arm))
    return _query_accuracy(arm, model, on_device, seed)


def _query_accuracy(arm: str, model: Any, on_device: tuple[Any, Any, Any, Any], seed: int) -> float:
    """A trained ``model``'s accuracy on the episode's query set (reinit: its BatchNorm statistics first set
    from the support set, :func:`support_bn_statistics`)."""
    from pruneshot.training import accuracy

    sx, _sy, qx, qy = on_device
    if arm == "reinit":
        support_bn_statistics(model, sx, seed)
    return accuracy(model, qx, qy)


def _finetune_kwargs(s: _Setting, arm: str, *, lr: float | None = None, steps: int | None = None) -> dict[str, Any]:
    """``finetune_episode``'s / ``finetune_batched``'s arguments for ``arm`` (lr and steps: the arm's, unless
    given, as transfer selection gives its grid's)."""
    tc = s.tc
    return {"arm": "finetune" if arm == "reinit" else arm, "steps": s.arm_steps(arm) if steps is None else steps,
            "lr": s.lr(arm) if lr is None else lr, "momentum": tc["momentum"], "weight_decay": tc["weight_decay"],
            "batch_size": tc["batch_size"], "augment": s.augment, "fill": s.fill,
            "batch_norm": "batch" if arm == "reinit" else "frozen"}


def _score_chunk(s: _Setting, arm: str, networks: list[Any], chunk: list[_Episode], starts: list[Any],
                 seeds: list[dict[str, Any]], tensors: list[tuple[Any, Any, Any, Any]]) -> list[list[float]]:
    """Every network's query accuracy under ``arm`` on every episode of ``chunk`` (per episode, per
    network): the networks of one architecture train at once (:func:`pruneshot.batching.finetune_batched`,
    each from the start, seed and support set :func:`_score` would give it), then each is scored on its
    own query set. 'prototype' (no training), a lone network, or one that cannot be channel-stacked
    goes through :func:`_score`."""
    from pruneshot.batching import finetune_batched, groups_by_architecture, stackable

    pairs = [(e, net) for e in range(len(chunk)) for net in (networks[:1] if arm == "reinit" else networks)]
    accs: list[float] = [0.0] * len(pairs)
    if arm == "prototype" or s.episode_batch == 1:  # the reference engine: one network at a time
        for j, (e, net) in enumerate(pairs):
            model = _arm_start(s, arm, net, starts[e], seeds[e])
            accs[j] = _score(s, arm, model, tensors[e], seeds[e]["finetune"][arm])
    else:
        models = [_arm_start(s, arm, net, starts[e], seeds[e]) for e, net in pairs]
        for group in groups_by_architecture(models):
            if len(group) == 1 or not stackable(models[group[0]]):
                for j in group:
                    e = pairs[j][0]
                    accs[j] = _score(s, arm, models[j], tensors[e], seeds[e]["finetune"][arm])
                continue
            es = [pairs[j][0] for j in group]
            finetune_batched([models[j] for j in group], [tensors[e][0] for e in es], [tensors[e][1] for e in es],
                             seeds=[seeds[e]["finetune"][arm] for e in es], **_finetune_kwargs(s, arm))
            for j, e in zip(group, es, strict=True):
                accs[j] = _query_accuracy(arm, models[j], tensors[e], seeds[e]["finetune"][arm])
    per_episode: list[list[float]] = [[] for _ in chunk]
    for (e, _net), acc in zip(pairs, accs, strict=True):
        per_episode[e].append(acc)
    return per_episode


def _run_episodes(s: _Setting, networks: list[Any], episodes: list[_Episode], config: dict[str, Any], run: Any,
                  job: Job, checkpoint: Any = None) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]],
                                                         list[dict[str, Any]], dict[str, dict[str, Any]],
                                                         dict[str, Any] | None]:
    """Every episode under every arm: (per-arm results, per-episode seeds, target-side ``adapted`` entries,
    the method's network-free ``controls`` per episode, and when a checkpoint was resumed
    ``{after_episode, seconds_before}``, else None).

    ``networks``: the loaded network and its variants (same architecture, e.g. random's masks); each
    arm runs every one of them on the episode (same head, same seeds) and the episode's accuracy is
    their mean, each kept in ``network_accuracies`` (reinit: one run, the architecture is shared).
    Episodes run in chunks of ``s.episode_batch``; after each chunk everything so far is saved to
    ``checkpoint`` (a :class:`pruneshot.runtime.checkpoint.Checkpointer`, or None), and a checkpoint
    found at the start is resumed after its last chunk, its episodes' metrics logged again. Every
    episode draws only from its own seeds, so a resumed CPU run is bit-identical to an uninterrupted one."""
    network = networks[0]
    from pruneshot.models.cost import cost

    state: dict[str, Any] = {
        "done": 0, "seconds": 0.0, "seeds_rows": [], "adapted": [], "controls": {},
        "per_arm": {a: {"episodes": [], "seconds": 0.0, "support_steps": s.support_steps(a), **_settings_entry(s, a)}
                    for a in s.arms}}
    resumed = None
    if checkpoint is not None and (ck := checkpoint.load()) is not None:
        state, resumed = ck.state, {"after_episode": ck.state["done"], "seconds_before": ck.state["seconds"]}
        job.log(f"resumed from checkpoint after episode {state['done']}/{len(episodes)} ({checkpoint.directory})")
        for row in state["adapted"]:
            run.log_metrics({"achieved_ratio": row["achieved_ratio"], "adapt_seconds": row["adapt_seconds"]},
                            row["episode"])
        for arm, r in state["per_arm"].items():
            for e in r["episodes"]:
                run.log_metrics({f"{arm}/episode_acc": e["accuracy"]}, e["episode"])
    per_arm, controls = state["per_arm"], state["controls"]
    seeds_rows, adapted = state["seeds_rows"], state["adapted"]
    dense_cost = None
    if s.method.side == "target":  # the budget's reference: the dense network with a ways-way head
        probe = copy.deepcopy(network)
        probe.reset_classifier(s.ways)
        dense_cost = cost(probe, s.metric)
    t0 = time.perf_counter()
    k = max(1, s.episode_batch)
    for c0 in range(state["done"], len(episodes), k):
        chunk = episodes[c0:c0 + k]
        es = [episode_seeds(config, s.replicate, s.target, s.ways, s.shots, ep.index, s.arms) for ep in chunk]
        tensors = [ep.on(s.device) for ep in chunk]  # one chunk on the arms' device at a time
        starts: list[Any] = [None] * len(chunk)
        if dense_cost is not None:
            pruned = _adapt(s, network, chunk, es, dense_cost, job.log)
            starts = [p[0] for p in pruned]
            for ep, (_start, entry) in zip(chunk, pruned, strict=True):
                adapted.append(entry)
                run.log_metrics({"achieved_ratio": entry["achieved_ratio"], "adapt_seconds": entry["adapt_seconds"]},
                                ep.index)
        for i, ep in enumerate(chunk):
            seeds_rows.append({"episode": ep.index, "head": es[i]["head"]})
            for name in s.method.controls:
                controls.setdefault(name, {"episodes": []})["episodes"].append(
                    {"episode": ep.index, "accuracy": _control(name, tensors[i])})
        for arm in s.arms:
            ta = time.perf_counter()
            accs_per_episode = _score_chunk(s, arm, networks, chunk, starts, es, tensors)
            for ep, e_seeds, accs in zip(chunk, es, accs_per_episode, strict=True):
                acc = accs[0] if len(accs) == 1 else sum(accs) / len(accs)
                per_arm[arm]["episodes"].append({"episode": ep.index, "accuracy": acc,
                                                 "finetune_seed": e_seeds["finetune"][arm],
                                                 **({"network_accuracies": accs} if len(accs) > 1 else {})})
                run.log_metrics({f"{arm}/episode_acc": acc}, ep.index)
            per_arm[arm]["seconds"] += time.perf_counter() - ta
        done = state["done"] = c0 + len(chunk)
        if checkpoint is not None and done < len(episodes):
            checkpoint.save({}, {**state, "seconds": state["seconds"] + time.perf_counter() - t0})
        if done // 10 != c0 // 10 or done == len(episodes):
            el = time.perf_counter() - t0
            means = ", ".join(f"{a} {sum(e['accuracy'] for e in r['episodes']) / len(r['episodes']):.4f}"
                              for a, r in per_arm.items())
            job.log(f"episode {done}/{len(episodes)} mean acc {means} elapsed {el:.1f}s "
                    f"left~{el / (done - (resumed or {}).get('after_episode', 0)) * (len(episodes) - done):.1f}s")
    return per_arm, seeds_rows, adapted, controls, resumed


def _settings_entry(s: _Setting, arm: str) -> dict[str, Any]:
    """What a record says of ``arm``'s transfer settings: its learning rate and whether it was chosen on
    validation ('selected') or is transfer.lr / transfer.steps ('fixed'); prototype has none."""
    if arm == "prototype":
        return {"lr": None, "settings": "none"}
    return {"lr": s.lr(arm), "settings": s.arm_settings.get(arm, {}).get("settings", "fixed")}


def _control(name: str, on_device: tuple[Any, Any, Any, Any]) -> float:
    """A network-free control's accuracy on one episode (``PruningMethod.controls``)."""
    from pruneshot.training import pixel_prototype_accuracy

    if name != "pixel_prototype":
        raise ValueError(f"unknown control {name!r}; allowed: pixel_prototype")
    return pixel_prototype_accuracy(*on_device)


def _verified_inputs(job: Job, rec: dict[str, Any], network_record: Path, weights: Path, arch: Path,
                     target_manifest: Path, episodes_path: Path) -> dict[str, Any]:
    """The episodes file's content, after checking every input against the hash its producer recorded:
    the network's weights and architecture (search record or pretrain metrics), the episodes' own
    content hash, and that the episodes were drawn from this target pool. Raises before any work."""
    from pruneshot.data.episodes import verified

    job.check_recorded(weights, rec.get("weights_sha256"), network_record)
    job.check_recorded(arch, rec.get("arch_sha256"), network_record)
    eps = verified(read_json(episodes_path), str(episodes_path))
    pool_sha = read_json(target_manifest)["splits"]["pool"]["sha256"]
    if eps.get("pool_sha256", pool_sha) != pool_sha:
        raise ValueError(f"episodes file {episodes_path} was drawn from a pool with sha256 {eps['pool_sha256']}, "
                         f"but {target_manifest} records {pool_sha}: rerun make_episodes")
    return eps


def transfer(config: dict[str, Any], method_name: str, arms: list[str], shots: int, target: str, replicate: int,
             budget: float, weights: Path, arch: Path, network_record: Path, source_manifest: Path,
             target_manifest: Path, episodes_path: Path, out: Path, job: Job,
             selection: Path | None = None) -> dict[str, Any]:
    """Transfer one network to every saved episode under each of ``arms``; score each query set.

    The network (``weights``, ``arch``) is a source-side method's searched network at ``budget``
    (``network_record``: its search record) or, for a target-side method, the pretrained backbone
    (``network_record``: its pretrain metrics), which each episode prunes to ``budget`` on its support
    set (``method.adapt``, once per episode, shared by the arms). Per episode the network gets a new
    seeded ``ways``-way head; each arm trains its own copy ('finetune': all kept weights,
    'linear_probe': the head only, 'reinit': the same architecture freshly initialised, then as
    finetune; 'prototype': no training, nearest class centroid of the features). A target-side
    method's achieved cost and seconds are recorded per episode. One MLflow
    run per job; metrics are prefixed by the arm.

    The arms and a target-side method's adapt run on ``transfer.device`` (model and episode tensors
    are moved there; every random draw stays on the CPU, so the seeds mean the same on any device).
    Cost counting stays on the CPU."""
    from pruneshot.data import splits
    from pruneshot.data.pipeline import resolve_device, zero_level
    from pruneshot.methods import get_method, options_for
    from pruneshot.models.base import load_model, variant_count
    from pruneshot.models.cost import count_flops, count_params, input_shape

    method = get_method(method_name)
    _check_arms(method, arms)
    tc = config["transfer"]
    device = resolve_device(tc.get("device", "auto"), "transfer.device")  # a missing GPU fails before any work
    rec = read_json(network_record)
    eps = _verified_inputs(job, rec, network_record, weights, arch, target_manifest, episodes_path)
    # Target images are normalised with the source statistics the backbone was trained on.
    norm = read_json(source_manifest)["normalization"]
    pool = splits.load_split(target_manifest, "pool", norm)
    augment_mode, augment = _augment(tc)
    chosen = read_json(selection) if selection is not None else None
    s = _Setting(method=method, arms=list(arms), ways=eps["ways"], shots=shots, target=target, replicate=replicate,
                 budget=float(budget), metric=config["budget"]["metric"], options=options_for(config, method), tc=tc,
                 device=device, augment=augment, fill=zero_level(read_json(target_manifest)["max_value"], norm),
                 spec=read_json(arch), adapt_steps=adapt_steps(config, method, float(budget)),
                 arm_settings={a: fixed_or_selected(config, a, chosen) for a in arms if a != "prototype"})
    seeds = seeds_for(config, replicate)
    inputs = [weights, arch, source_manifest, target_manifest, episodes_path]
    params = {"method": method_name, "arms": ",".join(arms), "shots": shots, "ways": s.ways, "target": target,
              "budget": s.budget, "replicate": replicate, "side": method.side,
              **{f"transfer.{k}": v for k, v in tc.items()}, "transfer.device_used": str(device)}
    # what a failed cell records (a successful one replaces it)
    per_arm: dict[str, dict[str, Any]] = {a: {"episodes": [], "seconds": 0.0, "support_steps": s.support_steps(a),
                                              **_settings_entry(s, a), "summary": None} for a in arms}
    seeds_rows: list[dict[str, Any]] = []
    adapted: list[dict[str, Any]] = []
    controls: dict[str, dict[str, Any]] = {}
    dense: dict[str, int] = {}
    resumed = None
    t0 = time.perf_counter()
    failure = f"search failed: {rec['error']}" if rec.get("status") == "failed" else None
    if failure is None and chosen is not None and chosen.get("status") != "ok":
        failure = f"transfer selection failed: {chosen.get('error')}"
    if selection is not None:
        inputs.append(selection)
    # A killed job resumes after its last finished chunk; a checkpoint written under other settings,
    # inputs or code is removed, never resumed.
    ckpt = checkpointer(job, out.with_suffix(""), method_name, arms, shots, target, replicate, s.budget, tc,
                        s.options, s.arm_settings, str(device), job.input_hashes(inputs),
                        modules=("stages.transfer", "training", "batching", "data.pipeline", "models.base",
                                 method.__module__.removeprefix("pruneshot.")))
    with job.tracked(inputs, seeds, params, upstream=rec) as run:
        overhead = process_age_s()
        if failure is None:
            try:
                # float64 (verification): every network, head and scale the job creates is float64 too.
                with job_dtype(tc) as dtype:
                    pool.x = pool.x.to(dtype)
                    networks = [load_model(str(weights), s.spec, v).to(dtype)
                                for v in range(variant_count(str(weights)))]
                    network = networks[0]
                    dense = ({"dense_params": count_params(network),
                              "dense_flops": count_flops(network, input_shape(s.spec))}
                             if method.side == "target" else {})
                    inject_failure("transfer", method_name)
                    episodes = _episodes(eps, pool)
                    s.episode_batch = episode_batch(s, network, episodes)
                    job.log(f"process start to first training step: {overhead}s; arms {arms}; "
                            f"episodes in chunks of {s.episode_batch}")
                    per_arm, seeds_rows, adapted, controls, resumed = _run_episodes(
                        s, networks, episodes, config, run, job, ckpt.scoped(s.episode_batch))
            except Exception as exc:  # the method failed on this cell: a failed row, not a failed DAG
                failure = error_text(exc)
                job.log(f"FAILED: {failure}\n{traceback.format_exc()}")
                run.set_tags({"pruneshot.status": "failed", "pruneshot.error": failure[:500]})
        if failure is None:
            from pruneshot.report.stats import mean_ci

            for arm, r in per_arm.items():
                r["summary"] = mean_ci([e["accuracy"] for e in r["episodes"]])
                if r["episodes"] and "network_accuracies" in r["episodes"][0]:  # per network, over episodes
                    r["network_means"] = [mean_ci([e["network_accuracies"][i] for e in r["episodes"]])["mean"]
                                          for i in range(len(r["episodes"][0]["network_accuracies"]))]
                run.log_metrics({f"{arm}/acc_mean": r["summary"]["mean"], f"{arm}/acc_ci95": r["summary"]["ci95"]},
                                None)
            for name, c in controls.items():
                c["summary"] = mean_ci([e["accuracy"] for e in c["episodes"]])
                run.log_metrics({f"control/{name}/acc_mean": c["summary"]["mean"]}, None)
        ids = run_ids(run)
    record = _record(s, config, failure, per_arm, seeds_rows, adapted, dense, device, augment_mode,
                     time.perf_counter() - t0, overhead, network_record, weights, ids, rec, job, inputs, seeds)
    if failure is None and controls:
        record["controls"] = controls
    record["resumed"] = resumed
    write_json(out, record)
    ckpt.clear()  # the record is written: the checkpoint is no longer needed
    if failure is not None:
        job.log(f"{method_name} {shots}-shot: FAILED ({failure}); recorded as a failed cell")
    for arm, r in per_arm.items():
        if r["summary"] is not None:
            job.log(f"{method_name}/{arm} {shots}-shot: {r['summary']['mean']:.4f} +- {r['summary']['ci95']:.4f} "
                    f"over {r['summary']['n']} episodes")
    return record


def _record(s: _Setting, config: dict[str, Any], failure: str | None, per_arm: dict[str, Any],
            seeds_rows: list[dict[str, Any]], adapted: list[dict[str, Any]], dense: dict[str, int], device: Any,
            augment_mode: str, seconds: float, overhead: float, network_record: Path, weights: Path,
            ids: dict[str, str | None], rec: dict[str, Any], job: Job, inputs: list[Path],
            seeds: dict[str, int]) -> dict[str, Any]:
    """The transfer record: per arm its episodes ({episode, accuracy, finetune_seed}), seconds and
    summary; per episode its head seed; for a target-side method the per-episode ``adapted``
    networks, their mean cost (``achieved``) and the dense cost the ratios refer to."""
    from pruneshot.runtime.provenance import device_name

    record = {
        "method": s.method.name, "side": s.method.side, "shots": s.shots, "ways": s.ways,
        "target": s.target, "replicate": s.replicate, "requested_budget": s.budget,
        "status": "ok" if failure is None else "failed", "error": failure or "",
        "arms": per_arm, "episode_seeds": seeds_rows,
        "device": {"device": str(device), "name": device_name(str(device)), "dtype": s.tc["dtype"],
                   "augment": augment_mode, "episode_batch": s.episode_batch},
        "seconds": seconds, "overhead_s": overhead,
        "network_record": Path(network_record).as_posix(), "network_record_sha256": sha256_file(network_record),
        "weights_sha256": sha256_file(weights), **ids,
        "upstream_run_id": rec.get("mlflow_run_id"), "upstream_spool_id": rec.get("mlflow_spool_id"),
        "provenance": job.provenance(inputs, {**seeds, "episode_root": config["study"]["root_seed"]},
                                     device=str(device)),
    }
    if s.method.side == "target":
        record.update(dense)
        record["adapt_device"] = str(device)  # method.adapt runs on the arms' device (its draws on the CPU)
    if failure is None and adapted:
        record["adapted"] = adapted
        record["achieved"] = {
            key: sum(a[key] for a in adapted) / len(adapted) for key in ("params", "flops", "achieved_ratio")
        } | {"adapt_seconds_mean": sum(a["adapt_seconds"] for a in adapted) / len(adapted),
             "ratio_min": min(a["achieved_ratio"] for a in adapted),
             "ratio_max": max(a["achieved_ratio"] for a in adapted)}
    return record
