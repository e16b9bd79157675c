"""`random`: uniformly random channels at the per-layer ratio the budget requires (the control)."""

from __future__ import annotations

import torch

from pruneshot.methods import register
from pruneshot.methods.base import PruningMethod, SearchContext, SearchResult, uniform_widths


@register
class RandomChannels(PruningMethod):
    name = "random"
    provenance = "baseline"
    reference = "random channel pruning control (Blalock et al. 2020)"

    def search(self, ctx: SearchContext) -> SearchResult:
        widths = uniform_widths(ctx.model, ctx.budget, ctx.metric)
        gen = torch.Generator().manual_seed(ctx.seed)
        keep = {
            g: sorted(torch.randperm(n, generator=gen)[: widths[g]].tolist())
            for g, n in ctx.model.channel_groups().items()
        }
        return SearchResult(model=ctx.model.pruned(keep), keep=keep, info={"widths": widths})
