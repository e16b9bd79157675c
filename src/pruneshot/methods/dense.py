"""`dense`: no pruning; the pretrained backbone is fine-tuned as it is."""

from __future__ import annotations

from pruneshot.methods import register
from pruneshot.methods.base import PruningMethod, SearchContext, SearchResult


@register
class Dense(PruningMethod):
    name = "dense"
    provenance = "baseline"
    reference = "unpruned pretrained backbone"
    budget_free = True
    controls = ("pixel_prototype",)

    def search(self, ctx: SearchContext) -> SearchResult:
        return SearchResult(model=ctx.model, keep=None)
