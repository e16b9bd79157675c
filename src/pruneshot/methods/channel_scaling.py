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

``adapt_batch`` (a chunk of ``transfer.episode_batch`` episodes) trains the chunk's scale sets and heads
together on the channel-stacked frozen body (:func:`channel_scaling_stages`); each episode's batches,
loss, decisions and result are its own, as one at a time (tests/test_batched_adapt_channel.py).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pruneshot.methods import register
from pruneshot.methods.base import AdaptContext, MethodOptions, SearchResult, option
from pruneshot.methods.scaling import BATCH_SIZE, ScalingMethod, fit_steps, greedy_prune, per_layer_prune, round_targets

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


class _Schedule:
    """One network's channel-scaling schedule, shared by the sequential stage and the batched one: its cost
    accounting, round targets, the pruning decision after every round (threshold, then ranking) and the
    stage's final assembly (fold, keep, info). Holds the record: rounds_history and removal counts."""

    def __init__(self, net: nn.Module, target_cost: float, metric: str, opts: dict[str, Any],
                 revert_larger: bool, log: Callable[[str], None]) -> None:
        import torch

        self.net, self.target_cost, self.metric, self.opts = net, target_cost, metric, opts
        self.revert_larger, self.log = revert_larger, log
        from pruneshot.models.base import spec_cost
        from pruneshot.models.basis import reverted_spec

        self._spec_cost, self._reverted_spec = spec_cost, reverted_spec
        self.sizes = net.channel_groups()
        self.start = self.cost_of(self.sizes)
        self.targets = round_targets(self.start, target_cost, opts["rounds"])
        self.min_widths = None
        if opts["ranking"] == "per_layer":  # the threshold keeps to the same-fraction widths of the final target
            full = {g: torch.ones(n, dtype=torch.bool) for g, n in self.sizes.items()}
            cut, _ = per_layer_prune({g: torch.zeros(n) for g, n in self.sizes.items()}, full, self.sizes,
                                     self.cost_of, target_cost)
            self.min_widths = {g: n - sum(1 for gg, _ in cut if gg == g) for g, n in self.sizes.items()}
        self.history: list[dict[str, Any]] = []
        self.by_threshold = self.by_ranking = self.spared = 0

    def cost_of(self, counts: dict[str, int]) -> int:
        spec = self.net.spec_with_widths(counts)
        return self._spec_cost(self._reverted_spec(spec) if self.revert_larger else spec, self.metric)

    def decide(self, j: int, mags: dict[str, torch.Tensor], alive: dict[str, torch.Tensor],
               losses: list[float]) -> dict[str, list[int]]:
        """Round ``j``'s removals (group -> channel indices) from the CPU |effective scale| ``mags`` and
        ``alive`` (bool) masks after the round's steps (CE per step ``losses``); recorded and logged."""
        opts, target = self.opts, self.targets[j - 1]
        thr, spared, cost = threshold_prune(mags, alive, opts["threshold"], self.cost_of, self.target_cost,
                                            self.min_widths)
        ranked: list[tuple[str, int]] = []
        if cost > target:
            if opts["ranking"] == "global":
                ranked, _, cost = greedy_prune(mags, alive, self.cost_of, target)
            else:
                ranked, cost = per_layer_prune(mags, alive, self.sizes, self.cost_of, target)
        removals = {g: idx for g in self.sizes if (idx := [i for gg, i in thr + ranked if gg == g])}
        self.by_threshold += len(thr)
        self.by_ranking += len(ranked)
        self.spared += spared
        widths = {g: int(a.sum()) for g, a in alive.items()}  # alive is updated in place: the kept channels
        self.history.append({
            "round": j, "target_cost": target, "cost": cost, "removed_by_threshold": len(thr),
            "removed_by_ranking": len(ranked), "below_threshold_kept_at_budget": spared,
            "ce_first": losses[0], "ce_last": losses[-1], "widths": widths,
            "scale_min": min(float(m[a].min()) for m, a in zip(mags.values(), alive.values(), strict=True)),
            "scale_max": max(float(m.max()) for m in mags.values())})
        self.log(f"channel_scaling round {j}/{opts['rounds']}: ce {losses[-1]:.4f}, removed {len(thr)} by "
                 f"threshold, {len(ranked)} by ranking; {self.metric} {cost:.0f} (target {target:.0f}); "
                 f"widths {list(widths.values())}")
        return removals

    def result(self, scaled: nn.Module) -> dict[str, Any]:
        """The stage's output from the trained, frozen ChannelScaled network: {"physical", "masked",
        "keep", "info", "cost"}."""
        import torch

        from pruneshot.models.basis import revert_larger_blocks

        physical, keep = scaled.fold()
        if self.revert_larger:
            physical = revert_larger_blocks(physical)
        widths = {g: len(i) for g, i in keep.items()}
        final_cost = self.cost_of(widths)
        kept_mags = torch.cat([scaled.effective(g).detach().abs().cpu()[torch.as_tensor(i, dtype=torch.long)]
                               for g, i in keep.items()])
        removed = self.by_threshold + self.by_ranking
        info = {
            "ranking": self.opts["ranking"],
            "reconstruction of l1/threshold/schedule": True,
            "widths": widths,
            "removed_by_threshold": self.by_threshold,
            "removed_by_ranking": self.by_ranking,
            "threshold_share": self.by_threshold / removed if removed else 0.0,
            "below_threshold_kept_at_budget": self.spared,
            "scale_kept_min": float(kept_mags.min()),
            "scale_kept_median": float(kept_mags.median()),
            "scale_kept_max": float(kept_mags.max()),
            "start_cost": self.start,
            "target_cost": self.target_cost,
            "accounted_cost": final_cost,
            "met_from_below": final_cost <= self.target_cost,
            "rounds_history": self.history,
            "scale_placement": "input of every consumer of the group (after activation and pooling); folded into "
                               "the consumers' weights",
        }
        return {"physical": physical, "masked": scaled.eval(), "keep": keep, "info": info, "cost": final_cost}


def _round_state(effective: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One group's (|effective scale|, alive) on the CPU, what a round's decision reads."""
    return effective.detach().abs().cpu(), (mask > 0).cpu()


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

    from pruneshot.models.scaled import ChannelScaled

    net = copy.deepcopy(model).eval().to(x.device)
    scaled = ChannelScaled(net)
    plan = _Schedule(net, target_cost, metric, opts, revert_larger, log)
    scales = list(scaled.scales.values())
    head = list(net.classifier.parameters())
    for p in scaled.parameters():
        p.requires_grad_(False)
    for p in scales + head:
        p.requires_grad_(True)
    opt = torch.optim.SGD(scales + head, lr=opts["lr"], momentum=opts["momentum"], weight_decay=0.0)

    def penalty() -> torch.Tensor:
        return opts["l1"] * sum(scaled.effective(g).abs().sum() for g in plan.sizes)

    for j in range(1, opts["rounds"] + 1):
        losses = fit_steps(scaled, opt, x, y, opts["steps_per_round"], gen, penalty=penalty, after_step=scaled.rezero)
        state = {g: _round_state(scaled.effective(g), scaled.mask(g)) for g in plan.sizes}
        removals = plan.decide(j, {g: m for g, (m, _) in state.items()}, {g: a for g, (_, a) in state.items()},
                               losses)
        for g, idx in removals.items():
            scaled.remove(g, idx)
    for p in scales + head:
        p.requires_grad_(False)
    return plan.result(scaled)


def channel_scaling_stages(
    models: Sequence[nn.Module], xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], *,
    target_costs: Sequence[float], metric: str, opts: dict[str, Any], gens: Sequence[torch.Generator],
    logs: Sequence[Callable[[str], None]], revert_larger: bool = False, seeds: Sequence[int] | None = None,
) -> list[dict[str, Any]]:
    """:func:`channel_scaling_stage` of every (model, x, y, target cost, generator, log), in order, with
    the networks that can be channel-stacked together (one architecture, :func:`pruneshot.batching.stackable`,
    support sets of one shape on one device) trained at once (:func:`_stages_together`); any other
    network, and a group of one, by :func:`channel_scaling_stage` itself. ``seeds``: the global torch RNG is
    seeded with ``seeds[i]`` before network i's stage (alone) or its result's assembly (together)."""
    import torch

    from pruneshot.batching import architecture, stackable

    groups: dict[Any, list[int]] = {}
    for i, (m, x) in enumerate(zip(models, xs, strict=True)):
        key = (architecture(m), tuple(x.shape), str(x.device), x.dtype) if stackable(m) else ("alone", i)
        groups.setdefault(key, []).append(i)
    out: list[dict[str, Any]] = [{} for _ in models]
    for idx in groups.values():
        if len(idx) == 1:
            i = idx[0]
            if seeds is not None:
                torch.manual_seed(seeds[i])
            out[i] = channel_scaling_stage(models[i], xs[i], ys[i], target_cost=target_costs[i], metric=metric,
                                           opts=opts, gen=gens[i], log=logs[i], revert_larger=revert_larger)
            continue
        together = _stages_together([models[i] for i in idx], [xs[i] for i in idx], [ys[i] for i in idx],
                                    [target_costs[i] for i in idx], metric, opts, [gens[i] for i in idx],
                                    [logs[i] for i in idx], revert_larger,
                                    None if seeds is None else [seeds[i] for i in idx])
        for i, res in zip(idx, together, strict=True):
            out[i] = res
    return out


def _stages_together(
    models: list[nn.Module], xs: list[torch.Tensor], ys: list[torch.Tensor], target_costs: list[float], metric: str,
    opts: dict[str, Any], gens: list[torch.Generator], logs: list[Callable[[str], None]], revert_larger: bool,
    seeds: list[int] | None,
) -> list[dict[str, Any]]:
    """K stackable networks of one architecture channel-scaled at once, each as
    :func:`channel_scaling_stage` would (module docstring of :mod:`pruneshot.models.scaled`): the frozen
    bodies channel-stacked, the K scale sets and heads in one SGD (elementwise K separate ones), each
    network's loss its own CE (mean over its own batch) plus its own L1 term, the stacked loss their sum;
    its batches drawn from its own generator exactly as ``fit_steps`` does; a non-finite loss of any
    network fails the chunk with ``fit_steps``' error; after every round each network's decision by
    its own :class:`_Schedule`, then each network's result assembled as the sequential stage does."""
    import torch
    import torch.nn.functional as F

    from pruneshot.batching import channel_stack, draw_batches
    from pruneshot.models.scaled import StackedChannelScaled
    from pruneshot.training import require_finite

    device = xs[0].device
    nets = [copy.deepcopy(m).eval().to(device) for m in models]
    plans = [_Schedule(net, t, metric, opts, revert_larger, log)
             for net, t, log in zip(nets, target_costs, logs, strict=True)]
    stacked = StackedChannelScaled(nets).eval()
    params = [*stacked.scales.values(), *stacked.head_parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=opts["lr"], momentum=opts["momentum"], weight_decay=0.0)
    groups = list(plans[0].sizes)
    k = len(nets)
    x_all, y_all = torch.stack(list(xs)), torch.stack(list(ys))  # (K, N, C, H, W), (K, N)
    for j in range(1, opts["rounds"] + 1):
        ces, totals = [], []
        for _ in range(opts["steps_per_round"]):
            xb, yb = draw_batches(x_all, y_all, gens, BATCH_SIZE)  # fit_steps' draw, per network
            b = yb.shape[1]
            logits = stacked(channel_stack(xb))  # (B, K, ways)
            ce = F.cross_entropy(logits.transpose(0, 1).reshape(k * b, -1), yb.reshape(k * b),
                                 reduction="none").view(k, b).mean(1)
            loss = ce + opts["l1"] * sum(stacked.effective(g).abs().sum(1) for g in groups)
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()
            opt.step()
            stacked.rezero()
            ces.append(ce.detach())
            totals.append(loss.detach())
        ce_rows, total_rows = torch.stack(ces, 1).tolist(), torch.stack(totals, 1).tolist()  # (K, steps)
        for values in total_rows:  # the first network (in order) whose loss diverged fails the chunk
            for v in values:
                require_finite(v, "support-set fit of the scales")
        state = {g: _round_state(stacked.effective(g), stacked.mask(g)) for g in groups}  # (K, C_g) each, one copy
        for i, plan in enumerate(plans):
            removals = plan.decide(j, {g: m[i] for g, (m, _) in state.items()},
                                   {g: a[i].clone() for g, (_, a) in state.items()}, ce_rows[i])
            for g, idx_g in removals.items():
                stacked.remove(i, g, idx_g)
    for p in params:
        p.requires_grad_(False)
    results = []
    for i, (plan, net) in enumerate(zip(plans, nets, strict=True)):
        if seeds is not None:
            torch.manual_seed(seeds[i])
        results.append(plan.result(stacked.episode(i, net)))
    return results


@register
class ChannelScaling(ScalingMethod):
    name = "channel_scaling"
    options_class = ChannelScalingOptions
    provenance = "abstract-level"
    reference = ("Wong et al. 2021, channel scaling (abstract, patent abstract); l1, threshold and schedule "
                 "reconstructed")
    mechanism = ("removed_by_threshold", "removed_by_ranking", "threshold_share", "scale_kept_min",
                 "scale_kept_median", "scale_kept_max")

    def _base_info(self, ctx: AdaptContext, opts: dict[str, Any]) -> dict[str, Any]:
        return {"requested_budget": ctx.budget, "metric": ctx.metric, "options": opts,
                "provenance_note": "scales, L1 and threshold removal from the abstracts; l1 weight, "
                                   "threshold, schedule and ranking are reconstructions"}

    def _result(self, ctx: AdaptContext, opts: dict[str, Any], out: dict[str, Any]) -> SearchResult:
        """The episode's SearchResult from its stage output (both paths)."""
        from pruneshot.methods.base import to_cpu
        from pruneshot.models.cost import cost

        achieved = cost(out["physical"], ctx.metric) / ctx.dense_cost
        info = {**self._base_info(ctx, opts), **out["info"], "achieved_ratio": achieved, "gap": ctx.budget - achieved}
        ctx.log(f"channel_scaling: {ctx.metric} ratio {achieved:.4f} for requested {ctx.budget:g} "
                f"(gap {info['gap']:+.4f}); widths {list(info['widths'].values())}; removed "
                f"{info['removed_by_threshold']} by threshold, {info['removed_by_ranking']} by ranking")
        return SearchResult(model=to_cpu(out["physical"]), keep=out["keep"], info=info, masked=to_cpu(out["masked"]))

    def _stage(self, ctx: AdaptContext, opts: dict[str, Any], x: torch.Tensor, y: torch.Tensor,
               gen: torch.Generator) -> dict[str, Any]:
        return channel_scaling_stage(ctx.model, x, y, target_cost=ctx.dense_cost * ctx.budget, metric=ctx.metric,
                                     opts=opts, gen=gen, log=ctx.log)

    def _stages(self, group: list[AdaptContext], opts: dict[str, Any], xs: list[torch.Tensor],
                ys: list[torch.Tensor], gens: list[torch.Generator]) -> list[dict[str, Any]]:
        """``adapt_batch``'s episodes channel-scaled together (:func:`channel_scaling_stages`: one stacked body,
        per-episode scales, heads, batches and decisions); equal to adapting them one at a time up to the
        summation order of the stacked layers. A context that cannot join others (``scaling.batch_groups``:
        budget >= 1, other options) is adapted alone, as the default does. The global RNG draws nothing
        that reaches a result here (new modules in the fold are overwritten); it is seeded with each
        episode's seed before its result is assembled, as the default seeds it before each ``adapt``."""
        return channel_scaling_stages(
            [c.model for c in group], xs, ys, target_costs=[c.dense_cost * c.budget for c in group],
            metric=group[0].metric, opts=opts, gens=gens, logs=[c.log for c in group], seeds=[c.seed for c in group])
