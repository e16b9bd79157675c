"""`taylor`: first-order Taylor channel importance (Molchanov et al. 2019), a source-side baseline.

The importance of channel c is the squared first-order change of the source loss when the channel
is removed, estimated per mini-batch as ``(sum over n, h, w of activation x gradient)^2`` at the
output of the BatchNorm that writes the channel, and accumulated (summed) over ``batches``
mini-batches of the source training split. A group tied by residual additions has several
BatchNorms writing it: their importances are summed (group-summed, as Molchanov et al. do for
tied channels). One global ranking of the importances then keeps the largest ones, with the cut
chosen so that the pruned network's cost ratio is the largest value <= the budget (at least one
channel per group). Reconstruction choices, labelled so: the network is in eval mode (BatchNorm
uses its running statistics, so scoring changes no buffer) and no weight is updated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pruneshot.methods import register
from pruneshot.methods.base import (
    MethodOptions,
    PruningMethod,
    SearchContext,
    SearchResult,
    dense_result,
    global_keep,
    option,
)

# Imported where the method computes: its metadata is read without torch (see methods/base.py).
if TYPE_CHECKING:
    import torch
    from torch import nn

    from pruneshot.data.splits import Split


@dataclass(frozen=True)
class TaylorOptions(MethodOptions):
    """First-order Taylor importance (Molchanov et al. 2019): (sum of activation x gradient)^2 per
    channel and mini-batch, summed over source mini-batches; one global ranking to the budget."""

    batches: int = option(16, "Source training mini-batches the importance is accumulated over (fewer if the "
                              "split holds fewer).", minimum=1)
    batch_size: int = option(64, "Mini-batch size of the importance estimate.", minimum=1)


def taylor_importance(model: nn.Module, train: Split, *, batches: int, batch_size: int,
                      seed: int) -> dict[str, torch.Tensor]:
    """Per channel group, the importance of each of its channels, shape (channels,), float64:
    ``sum over batches of (sum_{n,h,w} a * dL/da)^2`` with a the (N, C, H, W) output of every
    BatchNorm writing the group (summed over them) and L the mean cross-entropy of the batch on the
    source classifier. Batches: a permutation of the split from a generator seeded with ``seed``.
    The model is scored in eval mode; its parameters' ``.grad`` are left as they were. Runs on the
    model's device (``train`` held there, sums in float64 there); the scores are returned on the CPU."""
    import torch
    import torch.nn.functional as F

    from pruneshot.methods.base import device_source, model_device
    from pruneshot.models.base import Backbone

    if not isinstance(model, Backbone):
        name = getattr(model, "spec", {}).get("name", type(model).__name__)
        raise NotImplementedError(f"taylor: no channel groups defined for {name!r} (not a pruneshot Backbone)")
    device = model_device(model)
    source = device_source(train, device)
    owners = [(g, bn) for g, bns in model.group_bns().items() for bn in bns]
    scores = {g: torch.zeros(n, dtype=torch.float64, device=device) for g, n in model.channel_groups().items()}
    outputs: dict[int, torch.Tensor] = {}

    def keep_output(index: int):
        def hook(_module: nn.Module, _inputs: Any, out: torch.Tensor) -> None:
            out.retain_grad()
            outputs[index] = out
        return hook

    handles = [bn.register_forward_hook(keep_output(i)) for i, (_, bn) in enumerate(owners)]
    was_training = model.training
    saved = [p.grad for p in model.parameters()]
    model.eval()
    try:
        perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
        for b in range(min(batches, -(-len(train) // batch_size))):
            idx = perm[b * batch_size:(b + 1) * batch_size]
            outputs.clear()
            model.zero_grad(set_to_none=True)
            xb, yb = source.batch(idx)
            F.cross_entropy(model(xb), yb).backward()
            for i, (g, _) in enumerate(owners):
                out = outputs[i]
                per_channel = (out.detach() * out.grad).sum(dim=(0, 2, 3)).double()
                scores[g] += per_channel.square()
    finally:
        for h in handles:
            h.remove()
        for p, grad in zip(model.parameters(), saved, strict=True):
            p.grad = grad
        model.train(was_training)
    return {g: s.cpu() for g, s in scores.items()}


@register
class Taylor(PruningMethod):
    name = "taylor"
    options_class = TaylorOptions
    side = "source"
    provenance = "baseline"
    reference = "Molchanov et al. 2019, Importance Estimation for Neural Network Pruning"
    uses_device = True

    def search(self, ctx: SearchContext) -> SearchResult:
        import torch

        from pruneshot.methods.base import compute_device, to_cpu

        opts = self.resolve_options(ctx.options)
        if ctx.budget >= 1.0:
            return dense_result(ctx, {"batches": opts["batches"]}, "budget >= 1: nothing pruned")
        device = compute_device(ctx.device)
        try:  # scored on the device; the ranking, cut and surgery on the CPU
            scores = taylor_importance(ctx.model.to(device), ctx.source_train, batches=opts["batches"],
                                       batch_size=opts["batch_size"], seed=ctx.seed)
        finally:
            to_cpu(ctx.model)
        keep, n_global = global_keep(ctx.model, scores, ctx.budget, ctx.metric)
        widths = {g: len(k) for g, k in keep.items()}
        flat = torch.cat(list(scores.values()))
        return SearchResult(model=ctx.model.pruned(keep), keep=keep,
                            info={"widths": widths, "globally_kept": n_global,
                                  "importance_zero_share": float((flat == 0).double().mean()),
                                  "importance_max": float(flat.max())})
