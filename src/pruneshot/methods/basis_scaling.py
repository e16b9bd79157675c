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


@register
class BasisScaling(ScalingMethod):
    name = "basis_scaling"
    options_class = BasisScalingOptions
    provenance = "abstract-level"
    reference = ("Wong et al. 2021, basis scaling and double pruning (abstracts, patent claim 1); "
                 "importance and schedule reconstructed")

    def _stage(self, ctx: AdaptContext, opts: dict[str, Any], x: torch.Tensor, y: torch.Tensor,
               gen: torch.Generator) -> dict[str, Any]:
        return basis_scaling_stage(ctx.model, x, y, target_cost=ctx.dense_cost * ctx.budget, metric=ctx.metric,
                                   opts=opts, gen=gen, log=ctx.log)

    def _stages(self, group: list[AdaptContext], opts: dict[str, Any], xs: list[torch.Tensor],
                ys: list[torch.Tensor], gens: list[torch.Generator]) -> list[dict[str, Any]]:
        """``adapt_batch``'s episodes trained together (:func:`basis_scaling_stage_batched`): those below
        budget 1 with one body (:func:`same_body`), the same options, metric, device and support-set shape
        share one SVD and one batch-folded network; the rest (budget >= 1, a lone episode) take :meth:`adapt`
        as the default does. Results equal the default's up to float rounding (tests/test_batched_adapt_basis.py:
        identical decisions, weights within 1e-5 in float32, 1e-12 in float64). On a deep network in float32
        that rounding can flip near-tied importance ranks, as the thread count does for the default (resnet56:
        decisions identical in float64). No result depends on the global RNG (module constructors draw
        weights that are then overwritten)."""
        return basis_scaling_stage_batched([c.model for c in group], xs, ys,
                                           target_costs=[c.dense_cost * c.budget for c in group],
                                           metric=group[0].metric, opts=opts, gens=gens, logs=[c.log for c in group])

    def _may_join(self, ctx: AdaptContext) -> bool:
        """A Backbone without low-rank layers (``spec["ranks"]``): what one shared SVD can serve."""
        from pruneshot.models.base import Backbone

        return isinstance(ctx.model, Backbone) and not ctx.model.spec.get("ranks")

    def _joins(self, first: AdaptContext, ctx: AdaptContext) -> bool:
        """One body (:func:`same_body`): one SVD serves both."""
        return same_body(first.model, ctx.model)

    def _base_info(self, ctx: AdaptContext, opts: dict[str, Any]) -> dict[str, Any]:
        return {"requested_budget": ctx.budget, "metric": ctx.metric, "options": opts,
                "provenance_note": "layer algebra from the abstracts/patent; importance, schedule and "
                                   "thresholds are reconstructions"}

    def _result(self, ctx: AdaptContext, opts: dict[str, Any], out: dict[str, Any]) -> SearchResult:
        """An episode's SearchResult from its stage result (CPU networks in the job's dtype, info, the log line)."""
        from pruneshot.methods.base import to_cpu
        from pruneshot.models.cost import cost

        achieved = cost(out["physical"], ctx.metric) / ctx.dense_cost
        info = {**self._base_info(ctx, opts), **out["info"], "achieved_ratio": achieved, "gap": ctx.budget - achieved}
        ctx.log(f"basis_scaling: {ctx.metric} ratio {achieved:.4f} for requested {ctx.budget:g} "
                f"(gap {info['gap']:+.4f}); kept ranks {list(info['kept_ranks'].values())}, "
                f"reverted {info['reverted_layers']}")
        return SearchResult(model=to_cpu(out["physical"]), keep=None, info=info, masked=to_cpu(out["masked"]))
