"""`channel_scaling`: channel scaling (Wong et al.; abstract and patent abstract read), target-side.

Every pretrained conv and BatchNorm stays frozen (BN in eval mode); a trainable per-channel scale
(init 1) multiplies each channel group's channels where the group's consumer reads them (the next
block's conv, its basis conv when low-rank, or the classifier). The sources put the scale after
the activation; putting it at the consumer input is the same thing after pooling for positive
scales (max-pool commutes with a positive per-channel factor, average pooling with any) and makes
folding exact for every scale: consumer ``weight[:, c] *= scale_c``. The scales and the new head
train on ``CE + l1 * sum |scale|``. Each of ``rounds`` rounds trains ``steps_per_round`` SGD steps,
then removes the channels with |scale| < ``threshold``, and, if the round's cost target
c0 * (target / c0) ** (j / rounds) (dense * budget ** (j / rounds) here) is not met, the smallest
|scale| channels until it is (``global`` ranking with a budget fill that re-adds the largest
removed ones that still fit, or ``per_layer``: every group keeps the same fraction); every group
keeps at least one channel. The threshold removes smallest |scale| first and stops at the stage's
final cost target (it may run ahead of the round schedule, never below the budget); the record
counts removals by threshold and by ranking. Removed channels get scale 0 (masked form). The
physical network is ``pruned(keep)`` with the scales folded into the consumers. The l1 weight,
threshold, schedule and ranking are reconstructions (the sources give none of them).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pruneshot.methods import register
from pruneshot.methods.base import AdaptContext, MethodOptions, SearchResult, TargetMethod, option
from pruneshot.methods.basis_scaling import budget_one_result, fit_steps, greedy_prune, per_layer_prune, round_targets

# Imported where the method computes: its metadata is read without torch (see methods/base.py).
if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass(frozen=True)
class ChannelScalingOptions(MethodOptions):
    """Channel scaling (Wong et al.; abstract and patent abstract read): frozen convs, a trainable
    per-channel scale after each block's activation with an L1 penalty; channels whose |scale| is
    below the threshold are removed, iterated until the budget is met; scales are folded into the
    next layer. Defaults are reconstructions."""

    l1: float = option(
        0.035, "Weight of the L1 penalty on the channel scales. Calibrated with lr on mnist10k (14x14, small_cnn "
               "[32, 64, 128], 5-way 1/5-shot, budgets 0.5/0.25) so that within the 30 steps the penalty drives "
               "some scales from 1 below the threshold (0.35-0.5 of the removals): 1e-3 at lr 0.01 moved none "
               "below 0.99; the effect needs lr * l1 >~ 0.005 (0.02 at lr 0.2 left episodes with none).", minimum=0)
    threshold: float = option(
        0.1, "Channels with |scale| below this are removed after each round, smallest first, never past the "
             "stage's cost target; when that does not reach the round's cost target, the smallest |scale| "
             "channels are removed until it does. SGD on the L1 subgradient leaves a small scale oscillating "
             "about 0 by about lr * l1 / (1 - momentum) (0.05 here): a threshold near 0 catches none.",
        minimum=0)
    ranking: Literal["global", "per_layer"] = option(
        "global", "Rank |scale| across all groups, or remove the same fraction of every group.")
    rounds: int = option(2, "Pruning rounds; the cost target after round j is budget ** (j / rounds). "
                            "rounds * steps_per_round counts inside transfer.steps (30 of 60 here); 2 rounds of 15 "
                            "give the scales time to fall below the threshold before the first ranking removal.",
                         minimum=1)
    steps_per_round: int = option(15, "Training steps on the support set before each pruning round.", minimum=1)
    lr: float = option(0.15, "SGD learning rate of the channel scales and the new head (no weight decay); with "
                             "momentum 0.9, 0.2 diverged on a random network and 0.5 on 1-shot mnist episodes.",
                       exclusive_minimum=0)
    momentum: float = option(0.9, "SGD momentum (one optimiser across all rounds).", minimum=0, maximum=1)


def threshold_prune(
    mags: dict[str, torch.Tensor], alive: dict[str, torch.Tensor], threshold: float,
    cost_of: Callable[[dict[str, int]], float], floor: float, min_widths: dict[str, int] | None = None,
) -> tuple[list[tuple[str, int]], int, float]:
    """Remove the alive channels with |scale| < ``threshold``, smallest |scale| first, never a group's
    last channel, and stop once the cost is <= ``floor`` (the stage's final target: the threshold may
    run ahead of the round schedule but never prunes past the budget); then re-add the removed ones,
    largest |scale| first, that still fit under ``floor``. ``min_widths``: no group below this many
    channels (per-layer ranking: the widths its same-fraction cut gives at ``floor``; default 1).
    ``alive`` is updated in place. Returns (removed, how many below-threshold channels stay alive
    because the floor was reached or a group is at its minimum, cost)."""
    import torch

    counts = {g: int(a.sum()) for g, a in alive.items()}
    below = sorted((float(mags[g][i]), k, g, i) for k, g in enumerate(mags)
                   for i in torch.nonzero(alive[g] & (mags[g] < threshold)).flatten().tolist())
    cost = cost_of(counts)
    removed: list[tuple[str, int]] = []
    for _, _, g, i in below:
        if cost <= floor:
            break
        if counts[g] <= (1 if min_widths is None else max(1, min_widths[g])):
            continue
        alive[g][i] = False
        counts[g] -= 1
        removed.append((g, i))
        cost = cost_of(counts)
    for g, i in reversed(removed):  # budget fill: one removal may overshoot the floor by a large channel
        counts[g] += 1
        trial = cost_of(counts)
        if trial <= floor:
            alive[g][i] = True
            cost = trial
        else:
            counts[g] -= 1
    removed = [(g, i) for g, i in removed if not alive[g][i]]
    spared = sum(1 for _, _, g, i in below if alive[g][i])
    return removed, spared, cost


def channel_scaling_stage(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, target_cost: float, metric: str, opts: dict[str, Any],
    gen: torch.Generator, log: Callable[[str], None] = print, revert_larger: bool = False,
) -> dict[str, Any]:
    """Channel-scale a copy of ``model`` (any backbone, plain or with low-rank layers) on (x, y) until its
    physical cost is <= ``target_cost``. With ``revert_larger`` a low-rank block whose channels shrink
    so far that it is no longer smaller than a dense conv is counted, and built, as that dense conv.
    Returns {"physical", "masked", "keep", "info", "cost"}; ``model`` is untouched. The training runs on
    ``x``'s device (a copy of ``model`` is moved there); "physical" is on the CPU, "masked" on ``x``'s device."""
    import torch

    from pruneshot.models.base import spec_cost
    from pruneshot.models.basis import revert_larger_blocks, reverted_spec
    from pruneshot.models.scaled import ChannelScaled

    net = copy.deepcopy(model).eval().to(x.device)
    scaled = ChannelScaled(net)
    sizes = net.channel_groups()

    def cost_of(counts: dict[str, int]) -> int:
        spec = net.spec_with_widths(counts)
        return spec_cost(reverted_spec(spec) if revert_larger else spec, metric)

    start = cost_of(sizes)
    min_widths = None
    if opts["ranking"] == "per_layer":  # the threshold keeps to the same-fraction widths of the final target
        full = {g: torch.ones(n, dtype=torch.bool) for g, n in sizes.items()}
        cut, _ = per_layer_prune({g: torch.zeros(n) for g, n in sizes.items()}, full, sizes, cost_of, target_cost)
        min_widths = {g: n - sum(1 for gg, _ in cut if gg == g) for g, n in sizes.items()}
    scales = list(scaled.scales.values())
    head = list(net.classifier.parameters())
    for p in scaled.parameters():
        p.requires_grad_(False)
    for p in scales + head:
        p.requires_grad_(True)
    opt = torch.optim.SGD(scales + head, lr=opts["lr"], momentum=opts["momentum"], weight_decay=0.0)

    def penalty() -> torch.Tensor:
        return opts["l1"] * sum(scaled.effective(g).abs().sum() for g in sizes)

    history = []
    by_threshold = by_ranking = spared_total = 0
    for j, target in enumerate(round_targets(start, target_cost, opts["rounds"]), start=1):
        losses = fit_steps(scaled, opt, x, y, opts["steps_per_round"], gen, penalty=penalty, after_step=scaled.rezero)
        mags = {g: scaled.effective(g).detach().abs().cpu() for g in sizes}
        alive = {g: (scaled.mask(g) > 0).cpu() for g in sizes}
        thr, spared, cost = threshold_prune(mags, alive, opts["threshold"], cost_of, target_cost, min_widths)
        ranked: list[tuple[str, int]] = []
        if cost > target:
            if opts["ranking"] == "global":
                ranked, _, cost = greedy_prune(mags, alive, cost_of, target)
            else:
                ranked, cost = per_layer_prune(mags, alive, sizes, cost_of, target)
        for g in sizes:
            idx = [i for gg, i in thr + ranked if gg == g]
            if idx:
                scaled.remove(g, idx)
        by_threshold += len(thr)
        by_ranking += len(ranked)
        spared_total += spared
        widths = {g: len(i) for g, i in scaled.keep().items()}
        row = {"round": j, "target_cost": target, "cost": cost, "removed_by_threshold": len(thr),
               "removed_by_ranking": len(ranked), "below_threshold_kept_at_budget": spared,
               "ce_first": losses[0], "ce_last": losses[-1], "widths": widths,
               "scale_min": min(float(m[a].min()) for m, a in zip(mags.values(), alive.values(), strict=True)),
               "scale_max": max(float(m.max()) for m in mags.values())}
        history.append(row)
        log(f"channel_scaling round {j}/{opts['rounds']}: ce {losses[-1]:.4f}, removed {len(thr)} by threshold, "
            f"{len(ranked)} by ranking; {metric} {cost:.0f} (target {target:.0f}); widths {list(widths.values())}")

    for p in scales + head:
        p.requires_grad_(False)
    physical, keep = scaled.fold()
    if revert_larger:
        physical = revert_larger_blocks(physical)
    widths = {g: len(i) for g, i in keep.items()}
    final_cost = cost_of(widths)
    kept_mags = torch.cat([scaled.effective(g).detach().abs().cpu()[torch.as_tensor(i, dtype=torch.long)]
                           for g, i in keep.items()])
    removed = by_threshold + by_ranking
    info = {
        "ranking": opts["ranking"],
        "reconstruction of l1/threshold/schedule": True,
        "widths": widths,
        "removed_by_threshold": by_threshold,
        "removed_by_ranking": by_ranking,
        "threshold_share": by_threshold / removed if removed else 0.0,
        "below_threshold_kept_at_budget": spared_total,
        "scale_kept_min": float(kept_mags.min()),
        "scale_kept_median": float(kept_mags.median()),
        "scale_kept_max": float(kept_mags.max()),
        "start_cost": start,
        "target_cost": target_cost,
        "accounted_cost": final_cost,
        "met_from_below": final_cost <= target_cost,
        "rounds_history": history,
        "scale_placement": "input of every consumer of the group (after activation and pooling); folded into "
                           "the consumers' weights",
    }
    return {"physical": physical, "masked": scaled.eval(), "keep": keep, "info": info, "cost": final_cost}


@register
class ChannelScaling(TargetMethod):
    name = "channel_scaling"
    options_class = ChannelScalingOptions
    provenance = "abstract-level"
    reference = ("Wong et al. 2021, channel scaling (abstract, patent abstract); l1, threshold and schedule "
                 "reconstructed")
    mechanism = ("removed_by_threshold", "removed_by_ranking", "threshold_share", "scale_kept_min",
                 "scale_kept_median", "scale_kept_max")

    def adapt(self, ctx: AdaptContext) -> SearchResult:
        import torch

        from pruneshot.methods.base import to_cpu
        from pruneshot.methods.basis_scaling import support_on_device
        from pruneshot.models.cost import cost

        opts = self.resolve_options(ctx.options)
        base_info = {"requested_budget": ctx.budget, "metric": ctx.metric, "options": opts,
                     "provenance_note": "scales, L1 and threshold removal from the abstracts; l1 weight, "
                                        "threshold, schedule and ranking are reconstructions"}
        if ctx.budget >= 1.0:
            return budget_one_result(ctx, base_info)
        gen = torch.Generator().manual_seed(ctx.seed)
        x, y = support_on_device(ctx)
        out = channel_scaling_stage(ctx.model, x, y, target_cost=ctx.dense_cost * ctx.budget, metric=ctx.metric,
                                    opts=opts, gen=gen, log=ctx.log)
        achieved = cost(out["physical"], ctx.metric) / ctx.dense_cost
        info = {**base_info, **out["info"], "achieved_ratio": achieved, "gap": ctx.budget - achieved}
        ctx.log(f"channel_scaling: {ctx.metric} ratio {achieved:.4f} for requested {ctx.budget:g} "
                f"(gap {info['gap']:+.4f}); widths {list(info['widths'].values())}; removed "
                f"{info['removed_by_threshold']} by threshold, {info['removed_by_ranking']} by ranking")
        return SearchResult(model=to_cpu(out["physical"]), keep=out["keep"], info=info, masked=to_cpu(out["masked"]))
