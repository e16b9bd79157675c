"""`random`: uniformly random channels at the per-layer ratio the budget requires (the control).

One random mask is one draw: at 1-shot, masks of one budget can differ by several accuracy points,
so a single mask may land at either end. ``masks`` draws several per replicate (all at the same
widths, hence one architecture and one cost); the transfer stage evaluates every one of them on
every episode, a cell's episode accuracy is their mean, and the report shows their spread.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pruneshot.methods import register
from pruneshot.methods.base import MethodOptions, PruningMethod, SearchContext, SearchResult, option, uniform_widths

# Imported where the method computes: its metadata is read without torch (see methods/base.py).
if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class RandomOptions(MethodOptions):
    """Random channel pruning (the control): uniformly random channels of every group at the per-layer
    ratio the budget requires; several masks per replicate, evaluated on the same episodes."""

    masks: int = option(3, "Random masks drawn per replicate (same widths); a cell's episode accuracy is their "
                           "mean, their spread is reported.", minimum=1)


def random_keep(model: torch.nn.Module, widths: dict[str, int], gen: torch.Generator) -> dict[str, list[int]]:
    """Per channel group, ``widths[g]`` channel indices drawn uniformly without replacement, sorted."""
    import torch

    return {g: sorted(torch.randperm(n, generator=gen)[: widths[g]].tolist())
            for g, n in model.channel_groups().items()}


@register
class RandomChannels(PruningMethod):
    name = "random"
    provenance = "baseline"
    reference = "random channel pruning control (Blalock et al. 2020)"
    options_class = RandomOptions
    control = True

    def networks_per_cell(self, options: Mapping[str, Any]) -> int:
        return int(options["masks"])  # distinct masks: at most this many (at budget 1 all are one)

    def search(self, ctx: SearchContext) -> SearchResult:
        import torch

        opts = self.resolve_options(ctx.options)
        widths = uniform_widths(ctx.model, ctx.budget, ctx.metric)
        gen = torch.Generator().manual_seed(ctx.seed)  # mask 0 is the single mask of earlier versions
        drawn = [random_keep(ctx.model, widths, gen) for _ in range(opts["masks"])]
        keeps: list[dict[str, list[int]]] = []  # distinct masks, in draw order (at budget 1 all are the same)
        for k in drawn:
            if k not in keeps:
                keeps.append(k)
        return SearchResult(model=ctx.model.pruned(keeps[0]), keep=keeps[0],
                            info={"widths": widths, "masks": opts["masks"], "distinct_masks": len(keeps),
                                  "mask_keeps": keeps},
                            variants=[ctx.model.pruned(k) for k in keeps[1:]])
