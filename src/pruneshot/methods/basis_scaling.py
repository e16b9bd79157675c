"""`basis_scaling`: basis scaling (Wong et al. 2021), a target-side method.

Source read: the abstracts of both arXiv versions and claim 1 of the IBM patent. The layer algebra
(``models.basis``) is forced by that description: every conv (depthwise ones excepted) of the pretrained network
is split by SVD into a frozen k x k basis conv and a 1x1 BasisScalingConv whose only trainable
part is the per-basis scale s (init 1); s and the new classifier head train on the support set
(BatchNorm stays in eval mode, every other weight is frozen). Everything else is a
*reconstruction* (the importance formula, the schedule and the thresholds are not in the sources):

- importance of basis i after a round of ``steps_per_round`` SGD steps: ``taylor``
  ``(sum over the round's steps of grad_s_i * s_i)^2`` (one batch per step; full batch when the
  support has <= 64 images, else 64 drawn at random) or ``mean_abs``, the mean of |grad_s_i * s_i|;
- ``rounds`` rounds; after round j the least important bases are pruned (s_i = 0, frozen) until
  the cost of the network as it would be physically built is <= c0 * (target / c0) ** (j / rounds)
  (c0: the starting cost, the dense cost here, so round j's target is dense * budget ** (j/rounds));
  ``global`` ranking across layers, or ``per_layer`` (every layer keeps the same fraction of its
  bases); a layer's last basis is never pruned. With global ranking, the bases pruned in the round
  are then re-added, most important first, wherever one fits under the target (budget fill), so the
  last round meets the budget from below as closely as the unit sizes allow;
- physical network: low-rank layers (``LowRankConv``, s folded in) where that is smaller than the
  dense conv, dense convs of the original shape with the kept bases summed back elsewhere
  (``revert_when_larger``); BatchNorm and the trained head are copied.

``adapt_batch`` (a chunk of ``transfer.episode_batch`` episodes) decomposes the pretrained body once and
trains the chunk's scale sets and heads together (``basis_scaling_stage_batched``); every per-episode
draw, importance sum, pruning decision and result is as in ``basis_scaling_stage`` (equal up to float
rounding, tests/test_batched_adapt_basis.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pruneshot.methods import register
from pruneshot.methods.base import AdaptContext, MethodOptions, SearchResult, TargetMethod, option

# Imported where the method computes: its metadata is read without torch (see methods/base.py).
if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass(frozen=True)
class BasisScalingOptions(MethodOptions):
    """Basis scaling (Wong et al. 2021; abstracts and patent claim read). Each conv is split by SVD into a
    frozen k x k basis conv and a 1x1 BasisScalingConv whose only trainable part is the per-basis
    scale s (init 1); s and the new head train on the support set; the least important bases are
    pruned iteratively until the budget is met. Importance, schedule and thresholds are not in the
    sources: the defaults below are reconstructions."""

    importance: Literal["taylor", "mean_abs"] = option(
        "taylor", "taylor: (sum over batches of grad_s_i * s_i)^2; mean_abs: mean |grad_s_i * s_i|.")
    ranking: Literal["global", "per_layer"] = option(
        "global", "Rank bases across all layers, or prune each layer by the same fraction.")
    rounds: int = option(5, "Pruning rounds; after round j the cost target is budget ** (j / rounds) of the dense "
                            "cost, so the last round meets the budget.", minimum=1)
    steps_per_round: int = option(
        4, "Training steps (E) on the support set before each pruning round. rounds * steps_per_round support "
           "steps count inside transfer.steps (the arm trains for the rest): 20 of 60 by default, so double "
           "pruning (both stages) leaves its arms 10.", minimum=1)
    lr: float = option(0.01, "SGD learning rate of the scales s and the new head (no weight decay).",
                       exclusive_minimum=0)
    momentum: float = option(0.9, "SGD momentum (one optimiser across all rounds).", minimum=0, maximum=1)
    revert_when_larger: bool = option(
        True, "Keep a layer as one k x k conv (with s folded in) where the two-layer decomposition would have "
              "more parameters (kept r' >= k^2 C_in C_out / (k^2 C_in + C_out)).")


#: Support sets up to this size are used whole at every step; larger ones are sampled.
BATCH_SIZE = 64


# --- shared by the scaling methods (channel_scaling, double_pruning) ------------------------


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


# --- the basis scaling stage ---------------------------------------------------------------
# One episode (basis_scaling_stage) or a chunk of episodes trained together (basis_scaling_stage_batched):
# the set-up, each round's pruning decision and the final assembly are shared by both.


def _start(model: nn.Module, device: torch.device, metric: str, opts: dict[str, Any]) -> dict[str, Any]:
    """The decomposition of ``model`` (SVD on its device, then moved to ``device``), its layers, the
    physical cost function, the full ranks and the starting cost."""
    from pruneshot.models.basis import BasisCost, basis_layers, decompose

    masked = decompose(model).to(device)
    layers = basis_layers(masked)
    cost_of = BasisCost(masked, metric, opts["revert_when_larger"])
    full = {g: m.rank for g, m in layers.items()}
    return {"masked": masked, "layers": layers, "cost_of": cost_of, "full": full, "start": cost_of(full)}


def _round_decision(
    j: int, target: float, acc: dict[str, torch.Tensor], alive: dict[str, torch.Tensor], losses: list[float],
    setup: dict[str, Any], opts: dict[str, Any], metric: str, log: Callable[[str], None],
) -> tuple[dict[str, list[int]], dict[str, Any]]:
    """Round ``j``'s pruning decision of one episode from its importance sums ``acc`` (CPU, float64, by
    layer) and its alive bases (CPU bool, updated in place): the bases to prune, by layer, and the
    round's history row (logged)."""
    if opts["importance"] == "taylor":
        importance = {g: a ** 2 for g, a in acc.items()}
    else:
        importance = {g: a / opts["steps_per_round"] for g, a in acc.items()}
    readded: list = []
    if opts["ranking"] == "global":
        removed, readded, cost = greedy_prune(importance, alive, setup["cost_of"], target)
    else:
        removed, cost = per_layer_prune(importance, alive, setup["full"], setup["cost_of"], target)
    prune = {g: [i for gg, i in removed if gg == g] for g in alive}
    kept = {g: int(a.sum()) for g, a in alive.items()}
    row = {"round": j, "target_cost": target, "cost": cost, "pruned": len(removed), "refilled": len(readded),
           "ce_first": losses[0], "ce_last": losses[-1], "kept_ranks": kept}
    log(f"basis_scaling round {j}/{opts['rounds']}: ce {losses[-1]:.4f}, pruned {len(removed)} bases, "
        f"{metric} {cost:.0f} (target {target:.0f}); kept ranks {list(kept.values())}")
    return prune, row


def _finish(masked: nn.Module, setup: dict[str, Any], target_cost: float, opts: dict[str, Any],
            history: list[dict[str, Any]]) -> dict[str, Any]:
    """A trained decomposed network's stage result: {"physical", "masked", "info", "cost"}."""
    from pruneshot.models.basis import basis_layers, fold_network, physical_ranks

    masked.requires_grad_(False)
    kept = {g: m.n_kept() for g, m in basis_layers(masked).items()}
    physical = fold_network(masked, opts["revert_when_larger"])
    ranks = physical_ranks(masked, kept, opts["revert_when_larger"])
    final_cost = setup["cost_of"](kept)
    info = {
        "importance": opts["importance"],
        "ranking": opts["ranking"],
        "reconstruction of importance/schedule": True,
        "full_ranks": setup["full"],
        "kept_ranks": kept,
        "reverted_layers": [g for g, r in ranks.items() if r is None],
        "physical_ranks": ranks,
        "start_cost": setup["start"],
        "target_cost": target_cost,
        "accounted_cost": final_cost,
        "met_from_below": final_cost <= target_cost,
        "rounds_history": history,
    }
    return {"physical": physical, "masked": masked, "info": info, "cost": final_cost}


def _accumulate_into(acc: torch.Tensor, s: torch.Tensor, importance: str) -> None:
    """Add one step's grad_s * s (float64; its absolute value for ``mean_abs``) to ``acc``."""
    import torch

    gs = (s.grad * s).detach().to(torch.float64)
    acc += gs if importance == "taylor" else gs.abs()


def basis_scaling_stage(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, target_cost: float, metric: str, opts: dict[str, Any],
    gen: torch.Generator, log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Basis-scale a copy of ``model`` (any backbone without low-rank layers, BN in eval mode) on (x, y)
    until its physical cost is <= ``target_cost``. Returns {"physical", "masked", "info", "cost"};
    ``model`` is untouched. The SVD is taken on ``model``'s device, the training runs on ``x``'s (the
    decomposed copy is moved there); "physical" is on the CPU, "masked" on ``x``'s device."""
    import torch

    setup = _start(model, x.device, metric, opts)
    masked, layers = setup["masked"], setup["layers"]
    scales = [m.s for m in layers.values()]
    head = list(masked.classifier.parameters())
    masked.requires_grad_(False)
    for p in scales + head:
        p.requires_grad_(True)
    opt = torch.optim.SGD(scales + head, lr=opts["lr"], momentum=opts["momentum"], weight_decay=0.0)
    masked.eval()

    history = []
    for j, target in enumerate(round_targets(setup["start"], target_cost, opts["rounds"]), start=1):
        acc = {g: torch.zeros(m.rank, dtype=torch.float64, device=m.s.device) for g, m in layers.items()}

        def accumulate(acc: dict[str, torch.Tensor] = acc) -> None:
            for g, m in layers.items():
                _accumulate_into(acc[g], m.s, opts["importance"])

        def rezero() -> None:
            for m in layers.values():
                m.rezero()

        losses = fit_steps(masked, opt, x, y, opts["steps_per_round"], gen, after_backward=accumulate,
                           after_step=rezero)
        alive = {g: (m.mask > 0).cpu() for g, m in layers.items()}
        prune, row = _round_decision(j, target, {g: a.cpu() for g, a in acc.items()}, alive, losses, setup, opts,
                                     metric, log)
        for g, idx in prune.items():
            if idx:
                layers[g].prune(idx)
        history.append(row)
    return _finish(masked, setup, target_cost, opts, history)


def basis_scaling_stage_batched(
    models: Sequence[nn.Module], xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], *,
    target_costs: Sequence[float], metric: str, opts: dict[str, Any], gens: Sequence[torch.Generator],
    logs: Sequence[Callable[[str], None]],
) -> list[dict[str, Any]]:
    """:func:`basis_scaling_stage` of K episodes at once; ``models`` share one body (parameters and
    buffers equal, see :func:`same_body`), only their heads differ. The SVD of ``models[0]`` is taken
    once and shared; the K scale sets, masks and heads train together on batch-folded support sets
    (``models.basis.batch_decomposed``): one forward and backward per step, each episode's CE the mean
    over its own batch and the loss their sum (so each episode's gradient is its own), one SGD over the
    stacked scales and heads (elementwise, hence K independent optimisers). Per episode as in the
    sequential stage: batches drawn from ``gens[k]`` (on the CPU, only when the support exceeds
    BATCH_SIZE), importance accumulated in float64, the non-finite check (FloatingPointError, the
    cell fails), each round's pruning decision and the result. ``xs[k]`` (N, C, H, W) and ``ys[k]``
    on one device, N the same for all. Equal to K sequential stages up to float rounding."""
    import torch
    import torch.nn.functional as F

    from pruneshot.batching import draw_batches
    from pruneshot.models.basis import batch_decomposed, batched_layers, unbatch_decomposed
    from pruneshot.training import require_finite

    k = len(models)
    if not (k == len(xs) == len(ys) == len(target_costs) == len(gens) == len(logs)) or k == 0:
        raise ValueError("basis_scaling_stage_batched: models, support sets, targets, generators and logs "
                         "differ in number (or are empty)")
    if not all(same_body(models[0], m) for m in models[1:]):
        raise ValueError("basis_scaling_stage_batched: the networks differ outside their heads; one SVD cannot "
                         "serve them all")
    device = xs[0].device
    setup = _start(models[0], device, metric, opts)
    net = batch_decomposed(setup["masked"], [m.classifier for m in models]).to(device)
    layers = batched_layers(net)
    net.requires_grad_(False)
    params = [m.s for m in layers.values()] + list(net.classifier.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=opts["lr"], momentum=opts["momentum"], weight_decay=0.0)

    x_all, y_all = torch.stack(list(xs)), torch.stack(list(ys))  # (K, N, C, H, W), (K, N)
    schedules = [round_targets(setup["start"], t, opts["rounds"]) for t in target_costs]
    histories: list[list[dict[str, Any]]] = [[] for _ in range(k)]
    for j in range(1, opts["rounds"] + 1):
        acc = {g: torch.zeros(k, m.rank, dtype=torch.float64, device=device) for g, m in layers.items()}
        losses: list[list[float]] = [[] for _ in range(k)]
        for _ in range(opts["steps_per_round"]):
            xb, yb = draw_batches(x_all, y_all, gens, BATCH_SIZE)  # fit_steps' draw, per episode
            logits = net(xb.flatten(0, 1))  # (K, B, ways)
            ce = F.cross_entropy(logits.flatten(0, 1), yb.flatten(), reduction="none").view(k, -1).mean(1)
            values = ce.detach().cpu().tolist()
            for v in values:
                require_finite(v, "support-set fit of the scales")
            opt.zero_grad(set_to_none=True)
            ce.sum().backward()
            for g, m in layers.items():
                _accumulate_into(acc[g], m.s, opts["importance"])
            opt.step()
            for m in layers.values():
                m.rezero()
            for e, v in enumerate(values):
                losses[e].append(v)
        acc_cpu = {g: a.cpu() for g, a in acc.items()}
        masks = {g: (m.mask > 0).cpu() for g, m in layers.items()}
        for e in range(k):
            alive = {g: mk[e].clone() for g, mk in masks.items()}
            prune, row = _round_decision(j, schedules[e][j - 1], {g: a[e] for g, a in acc_cpu.items()}, alive,
                                         losses[e], setup, opts, metric, logs[e])
            for g, idx in prune.items():
                if idx:
                    layers[g].prune(e, idx)
            histories[e].append(row)
    return [_finish(unbatch_decomposed(net, setup["masked"], e), setup, target_costs[e], opts, histories[e])
            for e in range(k)]


def same_body(a: nn.Module, b: nn.Module) -> bool:
    """Whether ``a`` and ``b`` are one network up to their heads: the same spec and every parameter and
    buffer outside ``classifier`` equal (dtype, device and values), so one decomposition serves both."""
    import torch

    if getattr(a, "spec", None) != getattr(b, "spec", None):
        return False
    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys():
        return False
    return all(sa[key].dtype == sb[key].dtype and sa[key].device == sb[key].device
               and sa[key].shape == sb[key].shape and torch.equal(sa[key], sb[key])
               for key in sa if not key.startswith("classifier."))


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


@register
class BasisScaling(TargetMethod):
    name = "basis_scaling"
    options_class = BasisScalingOptions
    provenance = "abstract-level"
    reference = ("Wong et al. 2021, basis scaling and double pruning (abstracts, patent claim 1); "
                 "importance and schedule reconstructed")

    def adapt(self, ctx: AdaptContext) -> SearchResult:
        import torch

        opts = self.resolve_options(ctx.options)
        if ctx.budget >= 1.0:
            return budget_one_result(ctx, self._base_info(ctx, opts))
        gen = torch.Generator().manual_seed(ctx.seed)
        x, y = support_on_device(ctx)
        out = basis_scaling_stage(ctx.model, x, y,
                                  target_cost=ctx.dense_cost * ctx.budget, metric=ctx.metric, opts=opts, gen=gen,
                                  log=ctx.log)
        return self._result(ctx, opts, out)

    def adapt_batch(self, contexts: list[AdaptContext]) -> list[SearchResult]:
        """The chunk's episodes trained together (:func:`basis_scaling_stage_batched`): those below budget 1
        with one body (:func:`same_body`), the same options, metric, device and support-set shape share one
        SVD and one batch-folded network; the rest (budget >= 1, a lone episode) take :meth:`adapt` as the
        default does. Results equal the default's up to float rounding (tests/test_batched_adapt_basis.py:
        identical decisions, weights within 1e-5 in float32, 1e-12 in float64). On a deep network in float32
        that rounding can flip near-tied importance ranks, as the thread count does for the default (resnet56:
        decisions identical in float64). No result depends on the global RNG (module constructors draw
        weights that are then overwritten)."""
        import torch

        results: list[SearchResult | None] = [None] * len(contexts)
        for group in self._groups(contexts):
            chunk = [contexts[i] for i in group]
            if len(chunk) == 1:
                torch.manual_seed(chunk[0].seed)
                results[group[0]] = self.adapt(chunk[0])
                continue
            opts = self.resolve_options(chunk[0].options)
            support = [support_on_device(c) for c in chunk]
            outs = basis_scaling_stage_batched(
                [c.model for c in chunk], [x for x, _ in support], [y for _, y in support],
                target_costs=[c.dense_cost * c.budget for c in chunk], metric=chunk[0].metric, opts=opts,
                gens=[torch.Generator().manual_seed(c.seed) for c in chunk], logs=[c.log for c in chunk])
            for i, c, out in zip(group, chunk, outs, strict=True):
                results[i] = self._result(c, opts, out)
        return results  # type: ignore[return-value]

    def _groups(self, contexts: list[AdaptContext]) -> list[list[int]]:
        """Indices of ``contexts`` adapted together, in first-seen order (singletons: one at a time)."""
        from pruneshot.methods.base import compute_device
        from pruneshot.models.base import Backbone

        groups: list[tuple[Any, list[int]]] = []
        for i, ctx in enumerate(contexts):
            opts = self.resolve_options(ctx.options)
            if ctx.budget >= 1.0 or not isinstance(ctx.model, Backbone) or ctx.model.spec.get("ranks"):
                groups.append((None, [i]))
                continue
            key = (opts, ctx.metric, compute_device(ctx.device), tuple(ctx.support_x.shape), ctx.support_x.dtype,
                   tuple(ctx.support_y.shape))
            for other, members in groups:
                if other == key and same_body(contexts[members[0]].model, ctx.model):
                    members.append(i)
                    break
            else:
                groups.append((key, [i]))
        return [members for _key, members in groups]

    @staticmethod
    def _base_info(ctx: AdaptContext, opts: dict[str, Any]) -> dict[str, Any]:
        return {"requested_budget": ctx.budget, "metric": ctx.metric, "options": opts,
                "provenance_note": "layer algebra from the abstracts/patent; importance, schedule and "
                                   "thresholds are reconstructions"}

    def _result(self, ctx: AdaptContext, opts: dict[str, Any], out: dict[str, Any]) -> SearchResult:
        """An episode's SearchResult from its stage result (CPU float32 networks, info, the log line)."""
        from pruneshot.methods.base import to_cpu
        from pruneshot.models.cost import cost

        achieved = cost(out["physical"], ctx.metric) / ctx.dense_cost
        info = {**self._base_info(ctx, opts), **out["info"], "achieved_ratio": achieved, "gap": ctx.budget - achieved}
        ctx.log(f"basis_scaling: {ctx.metric} ratio {achieved:.4f} for requested {ctx.budget:g} "
                f"(gap {info['gap']:+.4f}); kept ranks {list(info['kept_ranks'].values())}, "
                f"reverted {info['reverted_layers']}")
        return SearchResult(model=to_cpu(out["physical"]), keep=None, info=info, masked=to_cpu(out["masked"]))
