"""What the scaling methods (basis_scaling, channel_scaling, double_pruning) share: the round schedule, the
support-set fit, the pruning rankings, and :class:`ScalingMethod`, their ``adapt`` and ``adapt_batch``
written once (a chunk's contexts grouped by :func:`batch_groups`). Defines no method itself."""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from pruneshot.methods.base import AdaptContext, SearchResult, TargetMethod

# Imported where the methods compute: their metadata is read without torch (see methods/base.py).
if TYPE_CHECKING:
    import torch

#: Support sets up to this size are used whole at every step; larger ones are sampled.
BATCH_SIZE = 64


def round_targets(start_cost: float, final_cost: float, rounds: int) -> list[float]:
    """Cost target after each round: start * (final / start) ** (j / rounds), j = 1..rounds (the last
    one is ``final_cost`` exactly)."""
    ratio = final_cost / start_cost
    return [final_cost if j == rounds else start_cost * ratio ** (j / rounds) for j in range(1, rounds + 1)]


def fit_steps(
    forward: Callable[[torch.Tensor], torch.Tensor], opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
    steps: int, gen: torch.Generator, *, penalty: Callable[[], torch.Tensor] | None = None,
    after_backward: Callable[[], None] | None = None, after_step: Callable[[], None] | None = None,
) -> list[float]:
    """``steps`` SGD steps on CE (+ ``penalty()``); full batch when len(y) <= BATCH_SIZE, else a random
    batch of BATCH_SIZE per step drawn from ``gen`` (on the CPU; the indices are moved to ``x``'s device).
    ``after_backward`` sees the gradients before the step (importance accumulation), ``after_step`` runs
    after it (re-zeroing pruned units). Returns the CE of every step."""
    import torch
    import torch.nn.functional as F

    from pruneshot.training import require_finite

    losses = []
    for _ in range(steps):
        if len(y) > BATCH_SIZE:
            idx = torch.randperm(len(y), generator=gen)[:BATCH_SIZE].to(x.device)
            xb, yb = x[idx], y[idx]
        else:
            xb, yb = x, y
        ce = F.cross_entropy(forward(xb), yb)
        loss = ce if penalty is None else ce + penalty()
        require_finite(float(loss.item()), "support-set fit of the scales")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if after_backward is not None:
            after_backward()
        opt.step()
        if after_step is not None:
            after_step()
        losses.append(float(ce.item()))
    return losses


def greedy_prune(
    scores: dict[str, torch.Tensor], alive: dict[str, torch.Tensor], cost_of: Callable[[dict[str, int]], float],
    target: float,
) -> tuple[list[tuple[str, int]], list[tuple[str, int]], float]:
    """Global ranking: remove alive units in ascending score order (stable, ties in group order)
    while the cost exceeds ``target``, never a group's last unit; then re-add the removed units, most
    important first, wherever one fits with the cost still <= ``target`` (budget fill). ``alive``
    (group -> bool tensor) is updated in place. Returns (removed, re-added, final cost)."""
    import torch

    groups = list(scores)
    counts = {g: int(alive[g].sum()) for g in groups}
    flat = torch.cat([scores[g].detach().to(torch.float64) for g in groups])
    owner = [(g, i) for g in groups for i in range(len(scores[g]))]
    cost = cost_of(counts)
    removed: list[tuple[str, int]] = []
    for j in torch.argsort(flat, stable=True).tolist():
        if cost <= target:
            break
        g, i = owner[j]
        if not alive[g][i] or counts[g] <= 1:
            continue
        alive[g][i] = False
        counts[g] -= 1
        removed.append((g, i))
        cost = cost_of(counts)
    readded = []
    for g, i in reversed(removed):
        counts[g] += 1
        trial = cost_of(counts)
        if trial <= target:
            alive[g][i] = True
            cost = trial
            readded.append((g, i))
        else:
            counts[g] -= 1
    back = set(readded)
    return [u for u in removed if u not in back], readded, cost


def per_layer_prune(
    scores: dict[str, torch.Tensor], alive: dict[str, torch.Tensor], sizes: dict[str, int],
    cost_of: Callable[[dict[str, int]], float], target: float, iters: int = 40,
) -> tuple[list[tuple[str, int]], float]:
    """Per-layer ranking: every group keeps the same fraction f of its ``sizes[g]`` units (at least one,
    never more than are alive), f the largest with cost <= ``target`` (bisection; 0 when even one unit
    per group exceeds it); each group drops its lowest-score alive units. Returns (removed, cost)."""
    import torch

    current = {g: int(alive[g].sum()) for g in scores}

    def counts(f: float) -> dict[str, int]:
        return {g: min(current[g], max(1, math.floor(f * sizes[g] + 1e-9))) for g in scores}

    if cost_of(current) <= target:
        return [], cost_of(current)
    lo, hi = 0.0, 1.0
    for _ in range(iters):
        mid = (lo + hi) / 2
        if cost_of(counts(mid)) <= target:
            lo = mid
        else:
            hi = mid
    want = counts(lo)
    removed = []
    for g, s in scores.items():
        idx = torch.nonzero(alive[g]).flatten()
        order = idx[torch.argsort(s.detach()[idx], stable=True)]
        for i in order[: current[g] - want[g]].tolist():
            alive[g][i] = False
            removed.append((g, i))
    return removed, cost_of(want)


def support_on_device(ctx: AdaptContext) -> tuple[torch.Tensor, torch.Tensor]:
    """The episode's support set, images (N, C, H, W) and labels (N,), on ``ctx.device`` (where the
    scaling methods train; not copied when already there)."""
    from pruneshot.methods.base import compute_device

    device = compute_device(ctx.device)
    return ctx.support_x.to(device), ctx.support_y.to(device)


def budget_one_result(ctx: AdaptContext, info: dict[str, Any]) -> SearchResult:
    """``ctx.model`` unchanged (no training), every channel kept: what budget >= 1 returns."""
    keep = {g: list(range(n)) for g, n in ctx.model.channel_groups().items()}
    return SearchResult(model=ctx.model, keep=keep, masked=None,
                        info={**info, "achieved_ratio": 1.0, "gap": ctx.budget - 1.0,
                              "note": "budget >= 1: the network is returned unchanged, no training"})


def batch_groups(method: ScalingMethod, contexts: Sequence[AdaptContext]) -> list[list[int]]:
    """Indices of ``contexts`` that ``adapt_batch`` trains together, groups in first-seen order (a group of
    one: adapted alone). A context joins the first group with the same resolved options, metric, compute
    device, support-set shapes and dtype whose first context ``method._joins``; it is alone at budget >= 1
    (no training) or when ``method._may_join`` refuses it."""
    from pruneshot.methods.base import compute_device

    groups: list[tuple[Any, list[int]]] = []
    for i, ctx in enumerate(contexts):
        opts = method.resolve_options(ctx.options)  # invalid options fail here, before any training
        if ctx.budget >= 1.0 or not method._may_join(ctx):
            groups.append((None, [i]))
            continue
        key = (opts, ctx.metric, compute_device(ctx.device), tuple(ctx.support_x.shape), ctx.support_x.dtype,
               tuple(ctx.support_y.shape))
        for other, members in groups:
            if other == key and method._joins(contexts[members[0]], ctx):
                members.append(i)
                break
        else:
            groups.append((key, [i]))
    return [members for _key, members in groups]


class ScalingMethod(TargetMethod):
    """A scaling method: :meth:`adapt` and :meth:`adapt_batch` written once. A subclass supplies one
    episode's stage (:meth:`_stage`), a group's stages trained together (:meth:`_stages`), the info every
    result starts with (:meth:`_base_info`) and an episode's result from its stage output (:meth:`_result`);
    it may keep contexts out of groups (:meth:`_may_join`, :meth:`_joins`). Not registered: no method itself."""

    def adapt(self, ctx: AdaptContext) -> SearchResult:
        """Budget >= 1: ``ctx.model`` unchanged (:func:`budget_one_result`); else the stage on the support
        set on ``ctx.device``, every draw from a generator seeded with ``ctx.seed``."""
        import torch

        opts = self.resolve_options(ctx.options)
        if ctx.budget >= 1.0:
            return budget_one_result(ctx, self._base_info(ctx, opts))
        gen = torch.Generator().manual_seed(ctx.seed)
        x, y = support_on_device(ctx)
        return self._result(ctx, opts, self._stage(ctx, opts, x, y, gen))

    def adapt_batch(self, contexts: list[AdaptContext]) -> list[SearchResult]:
        """The chunk by the groups of :func:`batch_groups`, in their order: a group of two or more trained
        together (:meth:`_stages`), a lone context through :meth:`adapt` with the global torch RNG seeded
        with its seed first, as the default ``adapt_batch`` does. Results in the contexts' order."""
        import torch

        results: dict[int, SearchResult] = {}
        for idx in batch_groups(self, contexts):
            if len(idx) == 1:
                torch.manual_seed(contexts[idx[0]].seed)
                results[idx[0]] = self.adapt(contexts[idx[0]])
                continue
            results.update(zip(idx, self._together([contexts[i] for i in idx]), strict=True))
        return [results[i] for i in range(len(contexts))]

    def _together(self, group: list[AdaptContext]) -> list[SearchResult]:
        """A group of :func:`batch_groups` (one resolved option set) trained together, results in its order;
        each episode's support set on its device and its generator seeded with its seed, as in :meth:`adapt`."""
        import torch

        opts = self.resolve_options(group[0].options)
        support = [support_on_device(c) for c in group]
        gens = [torch.Generator().manual_seed(c.seed) for c in group]
        outs = self._stages(group, opts, [x for x, _ in support], [y for _, y in support], gens)
        return [self._result(c, opts, out) for c, out in zip(group, outs, strict=True)]

    def _may_join(self, ctx: AdaptContext) -> bool:
        """Whether ``ctx`` (budget < 1) may be trained with others at all (default: yes)."""
        return True

    def _joins(self, first: AdaptContext, ctx: AdaptContext) -> bool:
        """Whether ``ctx`` may join the group begun by ``first`` (same key already; default: yes)."""
        return True

    @abstractmethod
    def _stage(self, ctx: AdaptContext, opts: dict[str, Any], x: torch.Tensor, y: torch.Tensor,
               gen: torch.Generator) -> dict[str, Any]:
        """One episode's stage output from its resolved options, support set (on its device) and generator."""

    @abstractmethod
    def _stages(self, group: list[AdaptContext], opts: dict[str, Any], xs: list[torch.Tensor],
                ys: list[torch.Tensor], gens: list[torch.Generator]) -> list[dict[str, Any]]:
        """The stage outputs of a group of episodes (one option set) trained together, in its order."""

    @abstractmethod
    def _base_info(self, ctx: AdaptContext, opts: dict[str, Any]) -> dict[str, Any]:
        """What every result's info starts with (the budget-1 result's too)."""

    @abstractmethod
    def _result(self, ctx: AdaptContext, opts: dict[str, Any], out: dict[str, Any]) -> SearchResult:
        """The episode's SearchResult (CPU networks in the job's dtype) from its stage output."""
