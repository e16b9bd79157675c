"""`linear_probe`: the dense backbone frozen, only a linear head trained on the target."""

from __future__ import annotations

from pruneshot.methods import register
from pruneshot.methods.base import PruningMethod, SearchContext, SearchResult


@register
class LinearProbe(PruningMethod):
    name = "linear_probe"
    provenance = "baseline"
    reference = "frozen pretrained backbone, linear head"
    budget_free = True
    repeats = ("dense", "linear_probe")  # the dense network, head-only training, the same seeds

    def arms(self, configured: list[str]) -> list[str]:
        # The method *is* the linear-probe protocol, whatever arms the study compares.
        return ["linear_probe"]

    def search(self, ctx: SearchContext) -> SearchResult:
        return SearchResult(model=ctx.model, keep=None)
