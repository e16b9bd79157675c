"""`dnal`: Differentiable Neural Architecture Learning (Guo et al. 2021), architecture stage only.

Scaled-sigmoid channel gates ``sigmoid(delta * alpha_c)`` sit after each prunable conv's
BatchNorm (before the activation). Stage A freezes every conv and BN parameter (BN stays in
train mode), resets alpha to 0 and delta to 1, and for each of ``arch_epochs`` epochs first
multiplies delta by ``10 ** (4 / arch_epochs)`` (delta is 1e4 in the last epoch) and then trains
alpha with SGD on ``CE + lambda_a * sum_c sigmoid(alpha_c)``. Channels with
``sigmoid(delta_final * alpha_c) > threshold`` are kept. The paper has no budget: lambda_a sets
the size, so here lambda_a is found by bisection on a log scale and the remaining gap between the
requested and the achieved budget is reported in ``info``. Stage W is our pretraining; stage F
(fine-tuning the kept weights) happens on the target, per episode.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pruneshot.methods import register
from pruneshot.methods.base import (
    MethodOptions,
    PruningMethod,
    SearchContext,
    SearchResult,
    dense_result,
    no_grad,
    option,
    width_ratio,
)

# Imported where the method computes: its metadata is read without torch (see methods/base.py).
if TYPE_CHECKING:
    import torch
    from torch import nn

    from pruneshot.data.splits import Split


@dataclass(frozen=True)
class DNALOptions(MethodOptions):
    """DNAL (Guo et al. 2021; official code QingbeiGuo/DNAL), architecture stage only:
    sigmoid(delta * alpha) channel gates after each prunable conv's BatchNorm,
    conv/BN parameters frozen, lambda_a found by bisection for the budget."""

    arch_epochs: int = option(
        10, "Epochs E_a of architecture stage A (paper: 10). delta starts at 1 and is multiplied by 10^(4/E_a) "
            "before every epoch, so it is 1e4 in the last one.", minimum=1)
    lr: float = option(0.01, "SGD learning rate of the gate parameters alpha in stage A (official code 0.01).",
                       exclusive_minimum=0)
    momentum: float = option(0.9, "SGD momentum in stage A (official code 0.9; weight decay is 0).",
                             minimum=0, maximum=1)
    batch_size: int = option(64, "Mini-batch size of stage A on the source training split.", minimum=1)
    threshold: float = option(
        0.9, "Keep channel c when sigmoid(delta_final * alpha_c) exceeds this (official code 0.9). A group with "
             "no channel above it keeps its largest-alpha channel (recorded in the search info).",
        exclusive_minimum=0, exclusive_maximum=1)
    lambda_min: float = option(1e-6, "Lower end of the log-scale bisection range of the size penalty weight "
                                     "lambda_a.", exclusive_minimum=0)
    lambda_max: float = option(1e-1, "Upper end of the log-scale bisection range of lambda_a.", exclusive_minimum=0)
    search_steps: int = option(
        6, "Stage-A runs of the lambda_a bisection (one run per step). The run whose cost ratio is the largest "
           "<= budget is kept (else the smallest); every tried (lambda_a, ratio) is recorded.", minimum=1)
    train_fc_in_arch_stage: bool = option(
        False, "Also train the Linear classifier in stage A (a quirk of the official code, which does not freeze "
               "Linear layers). Off: only alpha trains.")
    keep_arch_bn_stats: bool = option(
        True, "BN runs in train mode in stage A, so its running statistics change. false: the extracted network "
              "gets the pretrained running statistics back; true: it keeps those of the stage-A run (statistics "
              "of the gated network, as in the official code).")

    def check(self, method: str) -> None:
        if not self.lambda_min < self.lambda_max:
            raise ValueError(f"{method}: need 0 < lambda_min < lambda_max, got lambda_min={self.lambda_min!r}, "
                             f"lambda_max={self.lambda_max!r}")


def gate_points(model: nn.Module) -> dict[str, list[nn.Module]]:
    """Per channel group, the BatchNorm of every layer writing it, whose output the group's gate
    multiplies (before the activation; a group tied by residual additions is gated at each of them,
    with the same gate, which equals gating the sum)."""
    from pruneshot.models.base import Backbone

    if isinstance(model, Backbone):
        return model.group_bns()
    name = getattr(model, "spec", {}).get("name", type(model).__name__)
    raise NotImplementedError(f"dnal: no gate points defined for {name!r} (not a pruneshot Backbone)")


class ChannelGates:
    """Soft gates ``x_c * sigmoid(delta * alpha_c)`` attached by forward hooks on the gate points.

    The alphas live here (on the model's device), not in the model, so the model's state dict is
    untouched; ``remove()`` detaches the hooks and leaves the model exactly as it was.
    """

    def __init__(self, model: nn.Module) -> None:
        import torch
        from torch import nn

        points = gate_points(model)
        sizes = model.channel_groups()
        if set(points) != set(sizes):
            raise ValueError(f"dnal: gate points {sorted(points)} do not match channel groups {sorted(sizes)}")
        from pruneshot.methods.base import model_device

        device = model_device(model)
        self.alpha = {g: nn.Parameter(torch.zeros(sizes[g], device=device)) for g in sizes}
        self.delta = 1.0
        self._handles = [m.register_forward_hook(self._hook(g)) for g in sizes for m in points[g]]

    def _hook(self, group: str) -> Callable:
        import torch

        def hook(_m: nn.Module, _inp: tuple, out: torch.Tensor) -> torch.Tensor:
            gate = torch.sigmoid(self.delta * self.alpha[group])
            return out * gate.view((1, -1) + (1,) * (out.dim() - 2))

        return hook

    def parameters(self) -> list[nn.Parameter]:
        return list(self.alpha.values())

    @no_grad
    def reset(self) -> None:
        """alpha = 0, delta = 1 (the start of stage A)."""
        for a in self.alpha.values():
            a.zero_()
        self.delta = 1.0

    def penalty(self) -> torch.Tensor:
        """sum_c sigmoid(alpha_c) over every gate (no delta: counts channels uniformly)."""
        import torch

        return sum(torch.sigmoid(a).sum() for a in self.alpha.values())

    @no_grad
    def keep(self, threshold: float) -> tuple[dict[str, list[int]], dict[str, int]]:
        """Channels with sigmoid(delta * alpha) > threshold, per group; a group with none keeps its
        top-alpha channel (returned in the second dict, group -> forced index)."""
        import torch

        keep, forced = {}, {}
        for g, a in self.alpha.items():
            idx = torch.nonzero(torch.sigmoid(self.delta * a) > threshold).flatten().tolist()
            if not idx:
                top = int(torch.argmax(a).item())  # first index among ties
                idx, forced[g] = [top], top
            keep[g] = sorted(idx)
        return keep, forced

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def delta_schedule(epochs: int) -> list[float]:
    """delta used in each architecture epoch: 1 multiplied by 10**(4/E) before every epoch, so 1e4 last."""
    return [10.0 ** (4.0 * (e + 1) / epochs) for e in range(epochs)]


def arch_stage(
    model: nn.Module, gates: ChannelGates, train: Split, *, lam: float, epochs: int, lr: float, momentum: float,
    batch_size: int, generator: torch.Generator, train_fc: bool = False,
    on_epoch_start: Callable[[int, ChannelGates], None] | None = None,
    log_metrics: Callable[[dict[str, float], int | None], None] | None = None, step_offset: int = 0,
    resume: dict[str, Any] | None = None,
    on_epoch_end: Callable[[int, torch.optim.Optimizer, list[dict[str, float]]], None] | None = None,
) -> list[dict[str, float]]:
    """DNAL stage A on ``model`` (gates attached). Conv and BN parameters are frozen, BN runs in
    train mode (its running statistics do update); only alpha trains, plus the classifier when
    ``train_fc`` (the official code's Linear layers are not frozen). Returns per-epoch history.

    ``resume`` ({'epochs_done', 'history', 'optimizer': (tensors, meta) of
    :func:`pruneshot.runtime.checkpoint.optimizer_state` under 'opt'}): continue after ``epochs_done``
    epochs; the caller has restored alpha, the model's state and ``generator`` (gates are not
    reset). ``on_epoch_end(epoch, optimizer, history)`` runs after every epoch (to checkpoint).
    Runs on the model's device (``train`` held there; the permutations are drawn on the CPU)."""
    import torch
    import torch.nn.functional as F

    from pruneshot.methods.base import device_source, model_device
    from pruneshot.runtime.checkpoint import load_optimizer
    from pruneshot.training import require_finite

    source = device_source(train, model_device(model))
    was_requires = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    fc_params = list(model.classifier.parameters()) if train_fc else []
    for p in fc_params:
        p.requires_grad_(True)
    schedule = delta_schedule(epochs)
    opt = torch.optim.SGD(gates.parameters() + fc_params, lr=lr, momentum=momentum, weight_decay=0.0)
    history: list[dict[str, float]] = []
    if resume is None:
        gates.reset()
    else:
        load_optimizer(opt, *resume["optimizer"], "opt")
        history = list(resume["history"])
        gates.delta = schedule[len(history) - 1] if history else 1.0
    model.train()
    try:
        for epoch, delta in enumerate(schedule):
            if epoch < len(history):
                continue
            gates.delta = delta
            if on_epoch_start is not None:
                on_epoch_start(epoch, gates)
            perm = torch.randperm(len(train), generator=generator)
            tot_ce = tot_pen = 0.0
            n = 0
            for i in range(0, len(perm), batch_size):
                idx = perm[i : i + batch_size]
                if len(idx) < 2:  # BatchNorm in train mode needs more than one sample
                    continue
                xb, yb = source.batch(idx)
                ce = F.cross_entropy(model(xb), yb)
                pen = gates.penalty()
                loss = ce + lam * pen
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                tot_ce += ce.item() * len(idx)
                tot_pen += pen.item() * len(idx)
                n += len(idx)
            with torch.no_grad():
                alphas = torch.cat([a.detach() for a in gates.alpha.values()])
                open_ = int((torch.sigmoid(delta * alphas) > 0.5).sum().item())
            require_finite(tot_ce + tot_pen, f"dnal architecture stage, epoch {epoch + 1}")
            row = {"epoch": epoch, "delta": delta, "ce": tot_ce / max(1, n), "penalty": tot_pen / max(1, n),
                   "alpha_mean": float(alphas.mean()), "alpha_min": float(alphas.min()),
                   "alpha_max": float(alphas.max()), "gates_open": open_}
            history.append(row)
            if on_epoch_end is not None:
                on_epoch_end(epoch, opt, history)
            if log_metrics is not None:
                log_metrics({f"arch_{k}": float(v) for k, v in row.items() if k != "epoch"}, step_offset + epoch)
    finally:
        for p in model.parameters():
            p.requires_grad_(was_requires[id(p)])
    return history


def best_trial(trials: list[dict[str, Any]], budget: float) -> int:
    """Index of the trial kept: the largest ratio <= ``budget``, else the smallest ratio (first on ties)."""
    below = [i for i, r in enumerate(trials) if r["ratio"] <= budget]
    if below:
        return max(below, key=lambda i: trials[i]["ratio"])
    return min(range(len(trials)), key=lambda i: trials[i]["ratio"])


@register
class DNAL(PruningMethod):
    name = "dnal"
    options_class = DNALOptions
    side = "source"
    provenance = "official code"
    reference = "Guo et al. 2021, DNAL; QingbeiGuo/DNAL"
    uses_device = True

    def search(self, ctx: SearchContext) -> SearchResult:
        import torch

        from pruneshot.methods.base import compute_device, device_source, to_cpu
        from pruneshot.models.cost import cost
        from pruneshot.runtime.checkpoint import optimizer_state, prefixed, sub
        from pruneshot.training import accuracy

        opts = self.resolve_options(ctx.options)
        dense = ctx.model
        groups = dense.channel_groups()
        base_info = {"requested_budget": ctx.budget, "metric": ctx.metric, "options": opts}
        if ctx.budget >= 1.0:
            return dense_result(ctx, base_info, "budget >= 1: dense network returned unchanged, no architecture stage")

        device = compute_device(ctx.device)  # every trial's stage A and the evaluation run there
        dense = dense.to(device)
        train, val = device_source(ctx.source_train, device), device_source(ctx.source_val, device)
        dense_cost = cost(dense, ctx.metric)
        pretrained_buffers = {k: v.detach().clone() for k, v in dense.named_buffers()}
        ckpt = ctx.checkpoint.scoped("dnal", opts, ctx.seed, ctx.budget, ctx.metric) if ctx.checkpoint else None
        lo, hi = math.log10(opts["lambda_min"]), math.log10(opts["lambda_max"])
        trials: list[dict[str, Any]] = []
        partial: dict[str, Any] | None = None  # the interrupted trial's state, from a checkpoint
        ck = ckpt.load() if ckpt is not None else None
        if ck is not None:
            # Completed trials come back without their networks, except the one kept so far: a later
            # best is always a later trial (see best_trial), so the others are never needed.
            lo, hi = ck.state["lo"], ck.state["hi"]
            trials = [{**r, "model": None} for r in ck.state["trials"]]
            if ck.state["best"] is not None:
                trials[ck.state["best"]]["model"] = copy.deepcopy(dense)
                trials[ck.state["best"]]["model"].load_state_dict(sub(ck.tensors, "best"))
            partial = ck.state["partial"]
            ck.restore_rng()
            ctx.log(f"dnal: resumed from checkpoint after {len(trials)} trial(s)"
                    + (f" and {len(partial['history'])} epoch(s) of trial {len(trials) + 1}" if partial else "")
                    + f" ({ckpt.directory})")

        def save(current: dict[str, Any] | None, tensors: dict[str, torch.Tensor]) -> None:
            if ckpt is None:
                return
            best_i = best_trial(trials, ctx.budget) if trials else None
            if best_i is not None:
                tensors = {**tensors, **prefixed("best", trials[best_i]["model"].state_dict())}
            ckpt.save(tensors, {"lo": lo, "hi": hi, "best": best_i, "partial": current,
                                "trials": [{k: v for k, v in r.items() if k != "model"} for r in trials]})

        def trial(t: int, lam: float) -> dict[str, Any]:
            work = copy.deepcopy(dense)
            gates = ChannelGates(work)
            gen = torch.Generator().manual_seed(ctx.seed)
            resume = None
            if partial is not None:
                work.load_state_dict(sub(ck.tensors, "work"))
                with torch.no_grad():
                    for g, a in gates.alpha.items():
                        a.copy_(ck.tensors[f"alpha.{g}"])
                gen.set_state(ck.tensors["generator"])
                resume = {"history": partial["history"], "optimizer": (ck.tensors, partial["optimizer"])}

            def on_epoch_end(epoch: int, opt: torch.optim.Optimizer, history: list[dict[str, float]]) -> None:
                opt_tensors, opt_meta = optimizer_state("opt", opt)
                save({"history": history, "optimizer": opt_meta},
                     {**prefixed("work", work.state_dict()), **prefixed("alpha", dict(gates.alpha)), **opt_tensors,
                      "generator": gen.get_state()})

            history = arch_stage(
                work, gates, train, lam=lam, epochs=opts["arch_epochs"], lr=opts["lr"],
                momentum=opts["momentum"], batch_size=opts["batch_size"], generator=gen,
                train_fc=opts["train_fc_in_arch_stage"], log_metrics=ctx.log_metrics,
                step_offset=t * opts["arch_epochs"], resume=resume, on_epoch_end=on_epoch_end)
            keep, forced = gates.keep(opts["threshold"])
            gates.remove()
            if not opts["keep_arch_bn_stats"]:
                with torch.no_grad():
                    for k, v in work.named_buffers():
                        v.copy_(pretrained_buffers[k])
            ratio = width_ratio(work, {g: len(i) for g, i in keep.items()}, ctx.metric, dense_cost)
            ctx.log(f"dnal trial {t + 1}/{opts['search_steps']}: lambda_a {lam:.3g} -> {ctx.metric} ratio "
                    f"{ratio:.4f} (requested {ctx.budget:g}); widths {[len(keep[g]) for g in groups]}")
            ctx.log_metrics({"lambda_a": lam, "achieved_ratio": ratio}, t)
            return {"lambda_a": lam, "ratio": ratio, "keep": keep, "forced": forced, "model": work,
                    "history": history, "final_delta": gates.delta}

        for t in range(len(trials), opts["search_steps"]):
            mid = (lo + hi) / 2
            res = trial(t, 10.0**mid)
            partial = None
            trials.append(res)
            if res["ratio"] > ctx.budget:
                lo = mid  # too large: penalise harder
            else:
                hi = mid
            save(None, {})
        best = trials[best_trial(trials, ctx.budget)]
        keep = best["keep"]
        pruned = best["model"].pruned(keep).to(device)
        val_acc = accuracy(pruned, val.x, val.y) if len(val) else float("nan")
        info = {
            **base_info,
            "achieved_ratio": best["ratio"],
            "gap": ctx.budget - best["ratio"],
            "met_from_below": best["ratio"] <= ctx.budget,
            "lambda_a": best["lambda_a"],
            "tried": [{"lambda_a": r["lambda_a"], "achieved_ratio": r["ratio"],
                       "widths": {g: len(i) for g, i in r["keep"].items()}} for r in trials],
            "final_delta": best["final_delta"],
            "delta_schedule": delta_schedule(opts["arch_epochs"]),
            "alpha_init": 0.0,
            "threshold": opts["threshold"],
            "widths": {g: len(i) for g, i in keep.items()},
            "forced_keep": best["forced"],
            "forced_keep_note": "a group with no gate above the threshold keeps its top-alpha channel",
            "arch_history": best["history"],
            "bn_stats": "after stage A" if opts["keep_arch_bn_stats"] else "pretrained (restored after stage A)",
            "source_val_acc_pruned": val_acc,
        }
        ctx.log(f"dnal: lambda_a {best['lambda_a']:.3g}, {ctx.metric} ratio {best['ratio']:.4f} for requested "
                f"{ctx.budget:g} (gap {info['gap']:+.4f}); source val acc of the pruned net {val_acc:.4f}")
        return SearchResult(model=to_cpu(pruned), keep=keep, info=info, masked=to_cpu(best["model"]))
