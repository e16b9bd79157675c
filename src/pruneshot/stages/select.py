"""Stage select_transfer: transfer settings chosen on validation episodes, never on target ones.

For one network (method, budget, replicate) and one shots value, every trained arm the method runs is
fine-tuned on the fixed validation episodes (``transfer.select.data``: classes that are never target
classes) under every learning rate of the grid, for max(steps) support steps; the query accuracy after
each step count of the grid is read off the same run (:func:`pruneshot.training.finetune_episode`'s
``on_step``: the weights after k steps are those of a k-step run). The (lr, steps) of highest mean
accuracy is chosen per arm (ties: the smaller lr, then the fewer steps) and written for the transfer
job. A learning rate whose loss becomes non-finite is recorded as diverged and is not a candidate.
The episode pipeline (heads, target-side adapt, arm start networks, reinit's BatchNorm treatment) is
the transfer stage's own, with seeds on the axis of the validation episodes.
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
    from pruneshot.stages.transfer import support_bn_statistics
    from pruneshot.training import accuracy, finetune_episode

    sx, sy, qx, qy = tensors
    scores: dict[int, float] = {}

    def score(k: int) -> None:
        if k in wanted:
            if arm == "reinit":  # its BatchNorm treatment, as at the end of a k-step run
                support_bn_statistics(model, sx, seed)
            scores[wanted[k]] = accuracy(model, qx, qy)

    tc = s.tc
    finetune_episode(model, sx, sy, arm="finetune" if arm == "reinit" else arm, steps=max(wanted), lr=lr,
                     momentum=tc["momentum"], weight_decay=tc["weight_decay"], batch_size=tc["batch_size"],
                     seed=seed, augment=s.augment, fill=s.fill, batch_norm="batch" if arm == "reinit" else "frozen",
                     on_step=score)
    return scores


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
    from pruneshot.stages.transfer import (
        _adapt,
        _arm_start,
        _augment,
        _episodes,
        _Setting,
        _verified_inputs,
        adapt_steps,
        episode_seeds,
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
            network = load_model(str(weights), s.spec)
            dense_cost = None
            if method.side == "target":  # the budget's reference: the dense network with a ways-way head
                import copy

                probe = copy.deepcopy(network)
                probe.reset_classifier(s.ways)
                dense_cost = cost(probe, s.metric)
            for ep in _episodes(eps, pool):
                es = episode_seeds(config, replicate, SELECT_AXIS, s.ways, shots, ep.index, trained)
                start = _adapt(s, network, [ep], [es], dense_cost, job.log)[0][0] if dense_cost is not None else None
                sx, sy, qx, qy = ep.on(device)
                for arm in trained:
                    for lr in lrs:
                        if lr in diverged[arm]:
                            continue
                        model = _arm_start(s, arm, network, start, es)
                        try:
                            scores = _grid_run(s, arm, model, (sx, sy, qx, qy), lr, es["finetune"][arm],
                                               {st - n_adapt: st for st in candidates})
                        except FloatingPointError:
                            diverged[arm].append(lr)
                            for st in candidates:
                                grid[arm][lr][st] = [math.nan]
                            job.log(f"{arm} lr {lr}: the loss became non-finite on episode {ep.index}: not a candidate")
                            continue
                        for st, acc in scores.items():
                            grid[arm][lr][st].append(acc)
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
