"""`l1_filter`: keep the filters with the largest L1 norm, uniform ratio per layer (Li et al. 2017)."""

from __future__ import annotations

from pruneshot.methods import register
from pruneshot.methods.base import PruningMethod, SearchContext, SearchResult, keep_top, uniform_widths


@register
class L1Filter(PruningMethod):
    name = "l1_filter"
    provenance = "baseline"
    reference = "Li et al. 2017, Pruning Filters for Efficient ConvNets"

    def search(self, ctx: SearchContext) -> SearchResult:
        import torch

        widths = uniform_widths(ctx.model, ctx.budget, ctx.metric)
        scores = {
            g: torch.stack([c.weight.detach().abs().flatten(1).sum(1) for c in convs]).sum(0)
            for g, convs in ctx.model.group_convs().items()
        }
        keep = keep_top(scores, widths)
        return SearchResult(model=ctx.model.pruned(keep), keep=keep, info={"widths": widths})
