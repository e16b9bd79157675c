"""`fpgm`: filter pruning via geometric median (He et al. 2019), a source-side baseline.

Per layer, the filters nearest the geometric median of the layer's filters are the most
replaceable (the others can represent them), so they are removed: a filter's score is the sum of
its Euclidean distances to every filter of its layer (the geometric median minimises that sum,
so the filters with the smallest sums lie nearest it), and each channel group keeps its filters
with the largest sums, at the uniform per-layer ratio the budget requires (the same width rule as
`l1_filter` and `random`). A group tied by residual additions has several convs writing it: their
distance sums are added (an extension: the paper prunes single-conv layers). Data-free: the
pretrained weights only, no source batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pruneshot.methods import register
from pruneshot.methods.base import PruningMethod, SearchContext, SearchResult, keep_top, uniform_widths

# Imported where the method computes: its metadata is read without torch (see methods/base.py).
if TYPE_CHECKING:
    import torch


def distance_sums(weight: torch.Tensor) -> torch.Tensor:
    """For a conv weight (out, in, kh, kw), float64 per filter: the sum of its Euclidean distances to
    every filter of the layer, shape (out,). The smallest sums are nearest the geometric median."""
    import torch

    flat = weight.detach().flatten(1).double()
    return torch.cdist(flat, flat).sum(1)


def fpgm_scores(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Per channel group, the summed ``distance_sums`` of the convs writing it (depthwise excepted)."""
    import torch

    return {g: torch.stack([distance_sums(c.weight) for c in convs]).sum(0)
            for g, convs in model.group_convs().items()}


@register
class FPGM(PruningMethod):
    name = "fpgm"
    provenance = "baseline"
    reference = "He et al. 2019, Filter Pruning via Geometric Median"

    def search(self, ctx: SearchContext) -> SearchResult:
        widths = uniform_widths(ctx.model, ctx.budget, ctx.metric)
        keep = keep_top(fpgm_scores(ctx.model), widths)
        return SearchResult(model=ctx.model.pruned(keep), keep=keep, info={"widths": widths})
