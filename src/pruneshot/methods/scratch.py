"""`scratch`: the size-matched dense control (Liu et al. 2019, "Rethinking the value of network pruning").

A network of the pruned size, with the uniform per-layer widths ``random`` uses for the budget, freshly
initialised and pretrained on the source classes from scratch with the study's pretraining recipe
(config ``pretrain``: epochs, batch size, lr, momentum, weight decay, patience, augmentation; best
epoch chosen on source validation; the search rule gives its job ``pretrain.threads`` threads, as
float sums depend on the thread count), then transferred like any source-side network. It keeps
nothing of the pretrained network, so it asks whether a pruning method's choice of weights is worth
more than the architecture size alone. At budget 1.0 it is a second dense replicate (another
initialisation and batch order), not the dense network: the budget-1.0 gate does not apply to it.
"""

from __future__ import annotations

from pruneshot.methods import register
from pruneshot.methods.base import PruningMethod, SearchContext, SearchResult, uniform_widths
from pruneshot.seeds import derive_seed


def scratch_seed(search_seed: int) -> int:
    """The initialisation and batch-order seed of the scratch network, derived from the replicate's
    search seed (so replicates differ, budgets of one replicate share it, and it is never the dense
    network's pretraining seed)."""
    return derive_seed(search_seed, "pretrain", "scratch")


@register
class Scratch(PruningMethod):
    name = "scratch"
    provenance = "baseline"
    reference = "size-matched network trained from scratch (Liu et al. 2019; Blalock et al. 2020)"
    control = True
    trains_from_scratch = True
    mechanism = ("best_val_acc", "epochs_run")
    uses_device = True

    def search(self, ctx: SearchContext) -> SearchResult:
        from pruneshot.data.pipeline import Augment
        from pruneshot.methods.base import compute_device
        from pruneshot.models.base import build_seeded
        from pruneshot.training import pretrain

        recipe = ctx.recipe
        if not recipe:
            raise ValueError("scratch: the search context carries no pretraining recipe (SearchContext.recipe)")
        widths = uniform_widths(ctx.model, ctx.budget, ctx.metric)
        spec = ctx.model.spec_with_widths(widths)
        seed = scratch_seed(ctx.seed)
        model = build_seeded(spec, seed)
        ctx.log(f"scratch: widths {widths}, trained from scratch on the source (seed {seed}, "
                f"{recipe['epochs']} epochs at most)")
        model, info = pretrain(
            model, ctx.source_train, ctx.source_val, epochs=recipe["epochs"], batch_size=recipe["batch_size"],
            lr=recipe["lr"], momentum=recipe["momentum"], weight_decay=recipe["weight_decay"],
            patience=recipe["patience"], seed=seed, augment=Augment.from_config(recipe.get("augment")),
            device=compute_device(ctx.device), amp=recipe.get("amp", "none"),
            channels_last=bool(recipe.get("channels_last", True)), log=ctx.log, log_metrics=ctx.log_metrics,
            checkpoint=ctx.checkpoint)
        # Built at its size: nothing is masked, so the masked form is the network itself.
        return SearchResult(model=model.eval(), keep=None, masked=model, info={
            "widths": widths, "init_seed": seed, "best_epoch": info["best_epoch"],
            "best_val_acc": info["best_val_acc"], "epochs_run": info["epochs_run"],
            "recipe": {k: v for k, v in recipe.items() if not isinstance(v, dict)},
        })
