"""Stage select_transfer: transfer settings chosen on validation episodes, never on target ones.

For one network (method, budget, replicate) and one shots value, every trained arm the method runs is
fine-tuned on the fixed validation episodes (``transfer.select.data``: classes that are never target
classes) under every learning rate of the grid, for max(steps) support steps; the query accuracy after
each step count of the grid is read off the same run (:func:`pruneshot.training.finetune_episode`'s
``on_step``: the weights after k steps are those of a k-step run). The (lr, steps) of highest mean
accuracy is chosen per arm (ties: the smaller lr, then the fewer steps) and written for the transfer
job. A learning rate whose loss becomes non-finite is recorded as diverged and is not a candidate.
The episode pipeline (heads, target-side adapt, arm start networks, reinit's BatchNorm treatment) is
the transfer stage's own, with seeds on the axis of the validation episodes, and so are its precision
(``transfer.dtype``) and its chunks: the validation episodes run in chunks of ``transfer.episode_batch``
(resolved as the transfer stage resolves it, recorded as ``device.episode_batch``); per chunk a
target-side method adapts the chunk at once, then per trained arm and learning rate the chunk's networks
of one architecture fine-tune as one channel-stacked network (:func:`pruneshot.batching.finetune_batched`,
whose ``on_step`` scores every network after each step count of the grid). Chunks of one (``episode_batch``
1, 'auto' on the CPU) are the one-network-at-a-time reference loop, and any chunk gives the same
selection record up to the stacked layers' rounding (identical in float64; tests/test_batched_select.py).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from pruneshot.io import read_json, write_json
from pruneshot.stages.job import Job, error_text, seeds_for

#: The seeds' "target" axis value of the validation episodes (never a target: targets are config keys,
#: which cannot contain ':').
SELECT_AXIS = "select:validation"
#: Arms that train (and so have settings to choose).
TRAINED_ARMS = ("finetune", "linear_probe", "reinit")


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def choose(grid: dict[float, dict[int, list[float]]], lrs: list[float], steps: list[int]) -> dict[str, Any] | None:
    """The (lr, steps) of highest mean accuracy (grid[lr][steps]: per-episode accuracies; a missing or
    NaN entry is not a candidate), ties broken by the smaller lr, then the fewer steps. None when no
    candidate is left."""
    best = None
    for lr in sorted(lrs):
        for st in sorted(steps):
            accs = grid.get(lr, {}).get(st)
            if not accs:
                continue
            m = _mean(accs)
            if math.isnan(m):
                continue
            if best is None or m > best["accuracy"]:
                best = {"lr": lr, "steps": st, "accuracy": m}
    return best


def _grid_run(s: Any, arm: str, model: Any, tensors: tuple[Any, Any, Any, Any], lr: float, seed: int,
              wanted: dict[int, int]) -> dict[int, float]:
    """Fine-tune ``model`` under ``arm`` at ``lr`` for the largest arm step count of ``wanted`` (arm steps ->
    grid steps, a target-side method's adapt steps included) and score the query set after each of
    them: {grid steps: accuracy}. Raises FloatingPointError when the loss becomes non-finite."""
    from pruneshot.stages.transfer import _finetune_kwargs, _query_accuracy
    from pruneshot.training import finetune_episode

    scores: dict[int, float] = {}

    def score(k: int) -> None:
        if k in wanted:
            scores[wanted[k]] = _query_accuracy(arm, model, tensors, seed)

    finetune_episode(model, tensors[0], tensors[1], seed=seed, on_step=score,
                     **_finetune_kwargs(s, arm, lr=lr, steps=max(wanted)))
    return scores


def _grid_run_batched(s: Any, arm: str, models: list[Any], tensors: list[tuple[Any, Any, Any, Any]], lr: float,
                      seeds: list[int], wanted: dict[int, int]) -> list[dict[int, float]]:
    """:func:`_grid_run` for several networks of one architecture (:func:`pruneshot.batching.stackable`) at
    once: trained together by :func:`pruneshot.batching.finetune_batched` (network i on ``tensors[i]``'s
    support set under ``seeds[i]``), every one scored after each step count of ``wanted``: per network
    {grid steps: accuracy}. Raises FloatingPointError (``networks``: which) when any loss became non-finite."""
    from pruneshot.batching import finetune_batched
    from pruneshot.stages.transfer import _finetune_kwargs, _query_accuracy

    scores: list[dict[int, float]] = [{} for _ in models]

    def score(k: int) -> None:
        if k in wanted:
            for i, model in enumerate(models):
                scores[i][wanted[k]] = _query_accuracy(arm, model, tensors[i], seeds[i])

    finetune_batched(models, [t[0] for t in tensors], [t[1] for t in tensors], seeds=seeds, on_step=score,
                     **_finetune_kwargs(s, arm, lr=lr, steps=max(wanted)))
    return scores


def _chunk_grid(s: Any, arm: str, network: Any, starts: list[Any], seeds: list[dict[str, Any]],
                tensors: list[tuple[Any, Any, Any, Any]], lr: float,
                wanted: dict[int, int]) -> tuple[list[dict[int, float]], int | None]:
    """Every episode of a chunk under ``arm`` at ``lr``: (per episode {grid steps: accuracy}, the chunk
    position of the first episode whose loss became non-finite, or None). Each episode's network is the
    arm's start (``_arm_start``: its start network, head and seeds). The chunk's networks of one
    architecture train at once (:func:`_grid_run_batched`); a lone network (so every network of a chunk of
    one, as under ``episode_batch`` 1: the reference engine) or one that cannot be channel-stacked goes
    through :func:`_grid_run`. Once an episode diverged, the others' scores are not needed (the
    caller drops the learning rate) and may be missing."""
    from pruneshot.batching import groups_by_architecture, stackable
    from pruneshot.stages.transfer import _arm_start

    n = len(seeds)
    scores: list[dict[int, float]] = [{} for _ in range(n)]
    bad: list[int] = []
    models = [_arm_start(s, arm, network, starts[e], seeds[e]) for e in range(n)]
    for group in groups_by_architecture(models):
        if len(group) == 1 or not stackable(models[group[0]]):
            for e in group:
                try:
                    scores[e] = _grid_run(s, arm, models[e], tensors[e], lr, seeds[e]["finetune"][arm], wanted)
                except FloatingPointError:
                    bad.append(e)
                    break  # the group's later episodes come later in the chunk too: the first stays the first
            continue
        try:
            got = _grid_run_batched(s, arm, [models[e] for e in group], [tensors[e] for e in group], lr,
                                    [seeds[e]["finetune"][arm] for e in group], wanted)
        except FloatingPointError as exc:  # the lr is dropped for the whole chunk (select_transfer says why
            # that is the sequential loop's outcome); the first diverging network orders diverged_lr
            bad.append(min(group[i] for i in getattr(exc, "networks", None) or [0]))
            continue
        for e, sc in zip(group, got, strict=True):
            scores[e] = sc
    return scores, min(bad) if bad else None


def select_transfer(config: dict[str, Any], method_name: str, arms: list[str], shots: int, replicate: int,
                    budget: float, weights: Path, arch: Path, network_record: Path, source_manifest: Path,
                    select_manifest: Path, select_episodes: Path, out: Path, job: Job) -> dict[str, Any]:
    """Choose every trained arm's (lr, steps) of one network and shots value on the validation episodes;
    write the record (the grid's mean accuracies, per episode, the choice) to ``out``."""
    from pruneshot.data import splits
    from pruneshot.data.pipeline import resolve_device, zero_level
    from pruneshot.methods import get_method, options_for
    from pruneshot.models.base import load_model
    from pruneshot.models.cost import cost
    from pruneshot.runtime.provenance import device_name
    from pruneshot.stages.transfer import (
        _adapt,
        _augment,
        _episodes,
        _Setting,
        _verified_inputs,
        adapt_steps,
        episode_batch,
        episode_seeds,
        job_dtype,
    )

    sel = config["transfer"]["select"]
    method = get_method(method_name)
    rec = read_json(network_record)
    # the transfer stage's own checks: network vs its record, the episodes' content hash, their pool
    eps = _verified_inputs(job, rec, network_record, weights, arch, select_manifest, select_episodes)
    tc = config["transfer"]
    device = resolve_device(tc.get("device", "auto"), "transfer.device")
    norm = read_json(source_manifest)["normalization"]
    pool = splits.load_split(select_manifest, "pool", norm)
    _, augment = _augment(tc)
    n_adapt = adapt_steps({**config, "transfer": {**tc, "steps": max(sel["steps"])}}, method, float(budget))
    s = _Setting(method=method, arms=list(arms), ways=eps["ways"], shots=shots, target=SELECT_AXIS,
                 replicate=replicate, budget=float(budget), metric=config["budget"]["metric"],
                 options=options_for(config, method), tc=tc, device=device, augment=augment,
                 fill=zero_level(read_json(select_manifest)["max_value"], norm), spec=read_json(arch),
                 adapt_steps=n_adapt)
    lrs, grid_steps = [float(v) for v in sel["lr"]], [int(v) for v in sel["steps"]]
    candidates = [st for st in grid_steps if st >= n_adapt]
    wanted = {st - n_adapt: st for st in candidates}  # arm steps -> grid steps
    trained = [a for a in arms if a in TRAINED_ARMS]
    seeds = seeds_for(config, replicate)
    inputs = [weights, arch, source_manifest, select_manifest, select_episodes]
    t0 = time.perf_counter()
    grid: dict[str, dict[float, dict[int, list[float]]]] = {a: {lr: {st: [] for st in candidates} for lr in lrs}
                                                           for a in trained}
    diverged: dict[str, list[float]] = {a: [] for a in trained}
    failure = None
    if rec.get("status") == "failed":
        failure = f"search failed: {rec['error']}"
    else:
        try:
            # transfer.dtype as in the transfer job (float64: verification of the batched engine)
            with job_dtype(tc) as dtype:
                pool.x = pool.x.to(dtype)
                network = load_model(str(weights), s.spec).to(dtype)
                dense_cost = None
                if method.side == "target":  # the budget's reference: the dense network with a ways-way head
                    import copy

                    probe = copy.deepcopy(network)
                    probe.reset_classifier(s.ways)
                    dense_cost = cost(probe, s.metric)
                episodes = _episodes(eps, pool)
                s.episode_batch = episode_batch(s, network, episodes)  # the transfer stage's K
                job.log(f"validation episodes in chunks of {s.episode_batch}")
                for c0 in range(0, len(episodes), s.episode_batch):
                    chunk = episodes[c0:c0 + s.episode_batch]
                    es = [episode_seeds(config, replicate, SELECT_AXIS, s.ways, shots, ep.index, trained)
                          for ep in chunk]
                    starts = ([p[0] for p in _adapt(s, network, chunk, es, dense_cost, job.log)]
                              if dense_cost is not None else [None] * len(chunk))
                    tensors = [ep.on(device) for ep in chunk]
                    found: dict[str, list[tuple[int, int, float]]] = {a: [] for a in trained}
                    for arm in trained:
                        for li, lr in enumerate(lrs):
                            if lr in diverged[arm]:
                                continue
                            scores, first_bad = _chunk_grid(s, arm, network, starts, es, tensors, lr, wanted)
                            if first_bad is not None:
                                found[arm].append((first_bad, li, lr))
                                job.log(f"{arm} lr {lr}: the loss became non-finite on episode "
                                        f"{chunk[first_bad].index}: not a candidate")
                                continue
                            for per_episode in scores:
                                for st, acc in per_episode.items():
                                    grid[arm][lr][st].append(acc)
                    # A learning rate diverged on any episode of the chunk is dropped with its grid entries
                    # NaN, whatever the chunk's other episodes gave: exactly what the one-episode-at-a-time
                    # loop ends with (it drops the lr at its first diverging episode, NaNs the entries
                    # accumulated so far and skips it on every later episode). The order of diverged_lr is
                    # that loop's too: by first diverging episode, then by the lr's place in the grid.
                    for arm, bad in found.items():
                        for _e, _li, lr in sorted(bad):
                            diverged[arm].append(lr)
                            for st in candidates:
                                grid[arm][lr][st] = [math.nan]
        except Exception as exc:  # the method failed on a validation episode: the cell fails as in transfer
            failure = error_text(exc)
            job.log(f"FAILED: {failure}")
    arms_out: dict[str, Any] = {}
    if failure is None:
        for arm in trained:
            chosen = choose(grid[arm], lrs, candidates)
            if chosen is None:
                failure = f"{arm}: every learning rate of the grid diverged on the validation episodes"
                break
            arms_out[arm] = {
                "chosen": chosen, "diverged_lr": diverged[arm],
                "mean_accuracy": [{"lr": lr, "steps": st, "accuracy": _mean(grid[arm][lr][st])}
                                  for lr in lrs for st in candidates],
            }
            job.log(f"{method_name} b{budget} {shots}-shot {arm}: lr {chosen['lr']} steps {chosen['steps']} "
                    f"(validation acc {chosen['accuracy']:.4f})")
    record = {
        "method": method_name, "side": method.side, "requested_budget": float(budget), "replicate": replicate,
        "shots": shots, "ways": s.ways, "episodes": len(eps["episodes"]), "grid": {"lr": lrs, "steps": grid_steps},
        "candidate_steps": candidates, "adapt_steps": n_adapt, "status": "failed" if failure else "ok",
        "error": failure or "", "arms": arms_out, "seconds": time.perf_counter() - t0,
        "device": {"device": str(device), "name": device_name(str(device)), "dtype": tc["dtype"],
                   "episode_batch": s.episode_batch},
        "provenance": job.provenance(inputs, seeds, device=str(device)),
    }
    write_json(out, record)
    return record


def selection_table(records: list[Path], out: Path) -> int:
    """Every select record's grid as one tidy CSV (method, requested_budget, replicate, shots, arm, lr,
    steps, accuracy, chosen, status); returns the number of rows."""
    import pandas as pd

    rows = []
    for path in records:
        rec = read_json(path)
        base = {k: rec[k] for k in ("method", "requested_budget", "replicate", "shots")}
        if rec["status"] != "ok":
            rows.append({**base, "arm": "", "lr": math.nan, "steps": math.nan, "accuracy": math.nan,
                         "chosen": False, "status": "failed", "error": rec["error"]})
            continue
        for arm, r in rec["arms"].items():
            for cell in r["mean_accuracy"]:
                rows.append({**base, "arm": arm, "lr": cell["lr"], "steps": cell["steps"],
                             "accuracy": cell["accuracy"],
                             "chosen": (cell["lr"], cell["steps"]) == (r["chosen"]["lr"], r["chosen"]["steps"]),
                             "status": "ok", "error": ""})
    from pruneshot.io import atomic_path

    df = pd.DataFrame(rows, columns=["method", "requested_budget", "replicate", "shots", "arm", "lr", "steps",
                                     "accuracy", "chosen", "status", "error"])
    with atomic_path(out) as tmp:
        df.to_csv(tmp, index=False)
    return len(df)
