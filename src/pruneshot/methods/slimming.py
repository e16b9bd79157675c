"""`slimming`: Network Slimming (Liu et al. 2017) as a source-side baseline.

A fine-tune of the whole pretrained network on the source data with an L1 penalty on every
BatchNorm scale (gamma) of the prunable groups, long and strong enough that many gammas go to
about zero (Liu et al. sparsity-train from the start; a ranking of the pretrained |gamma| is not
slimming), then one global ranking of |gamma|: the largest ones are kept, with the global cut
chosen so that the pruned network's cost ratio is the largest value <= the budget (at least one
channel per group, its largest |gamma|). The pruned network keeps the fine-tuned weights and BN
statistics. The record holds the |gamma| distribution before and after the fine-tune and the
share of kept channels that a plain |gamma| ranking of the input network would also keep.
"""

from __future__ import annotations

from collections.abc import Callable
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
    no_grad,
    option,
)

# Imported where the method computes: its metadata is read without torch (see methods/base.py).
if TYPE_CHECKING:
    import torch
    from torch import nn

    from pruneshot.data.splits import Split
    from pruneshot.runtime.checkpoint import Checkpointer


@dataclass(frozen=True)
class SlimmingOptions(MethodOptions):
    """Network Slimming (Liu et al. 2017): L1 on BatchNorm gammas during a source fine-tune of the
    whole network, long and strong enough that gamma becomes sparse, then keep the globally largest
    |gamma| for the budget."""

    l1: float = option(
        0.02, "Weight of the L1 penalty on the BatchNorm scales. Liu et al. use 1e-4 over ~160 CIFAR epochs at lr "
              "0.1; a fine-tune of a few hundred steps needs a larger weight for the same effect: an unneeded gamma "
              "drifts by about lr * l1 / (1 - momentum) per step (2e-3 here, 1e-4 in the paper), so 1e-4 over 3 "
              "epochs moved no gamma by more than 5e-4 and kept the pretrained ranking. Measured on the default "
              "(budget 0.5; 5-shot accuracy of 8 episodes): 0.01 leaves no sparse gamma (kept set 98% the plain "
              "ranking's), 0.02 makes 34% sparse (overlap 83%, 83.3%), 0.03 66% (overlap 77%) but its features "
              "transfer worse (64.8%).", minimum=0)
    epochs: int = option(
        7, "Epochs of the sparsity fine-tune on the source training split (mnist10k, 4,106 images: 455 steps, "
           "~11 s on one core; 67% of the gammas end below 1e-2 of the largest).", minimum=0)
    min_steps: int = option(
        450, "At least this many SGD steps (more epochs on a small split): the drift to zero takes a number of "
             "updates, about 1 / (lr * l1 / (1 - momentum)) = 330 for a gamma of 1, whatever the split size; "
             "fewer shrink every gamma alike without making any sparse. 0: exactly ``epochs``.", minimum=0)
    lr: float = option(0.01, "SGD learning rate of the sparsity fine-tune (no weight decay).", exclusive_minimum=0)
    momentum: float = option(0.9, "SGD momentum of the sparsity fine-tune.", minimum=0, maximum=1)
    batch_size: int = option(64, "Mini-batch size of the sparsity fine-tune.", minimum=1)
    rescale: bool = option(
        True, "After pruning, divide each group's kept BatchNorm (gamma, beta) by their mean |gamma| and compensate "
              "in the readers' BN statistics (same function up to eps): the L1 leaves gammas ~0.05, which makes "
              "a fine-tune at the shared transfer lr diverge.")


#: A channel counts as sparse when its |gamma| is below this fraction of the network's largest |gamma|.
SPARSE_GAMMA = 1e-2
#: Quantiles of the |gamma| distribution recorded before and after the fine-tune.
GAMMA_QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)


def bn_gammas(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The BatchNorm scales (gamma) of each channel group: one per layer writing the group (several
    where residual additions tie layers into one group)."""
    from pruneshot.models.base import Backbone

    if isinstance(model, Backbone):
        return {g: [bn.weight for bn in bns] for g, bns in model.group_bns().items()}
    name = getattr(model, "spec", {}).get("name", type(model).__name__)
    raise NotImplementedError(f"slimming: no BatchNorm scales defined for {name!r} (not a pruneshot Backbone)")


def gamma_scores(model: nn.Module) -> dict[str, torch.Tensor]:
    """Per group, the channel score |gamma| (CPU, shape (channels,)), averaged over the group's BatchNorms
    (a group written by one layer: that layer's |gamma|; averaging keeps tied groups on the same scale in
    the global ranking; an extension: the paper prunes single-BN channels only)."""
    import torch

    return {g: torch.stack([w.detach().abs() for w in ws]).mean(0).to("cpu", copy=True)
            for g, ws in bn_gammas(model).items()}


def sparsity_finetune(
    model: nn.Module, train: Split, *, l1: float, epochs: int, lr: float, momentum: float, batch_size: int,
    seed: int, log_metrics: Callable[[dict[str, float], int | None], None] | None = None,
    checkpoint: Checkpointer | None = None, log: Callable[[str], None] | None = None,
) -> list[dict[str, float]]:
    """Fine-tune every weight of ``model`` in place (BN in train mode) on ``CE + l1 * sum |gamma|``
    with SGD (no weight decay); mini-batch order from a generator seeded with ``seed`` (CPU). Runs on the
    model's device: ``train`` (a ``Split``, or a BatchSource there) is held there, batches gathered there.

    ``checkpoint``: saved after every epoch (weights and BN buffers, momentum, generator, history);
    a matching one is resumed after its last epoch, ending bit-identical to an uninterrupted run."""
    import torch
    import torch.nn.functional as F

    from pruneshot.methods.base import device_source, model_device
    from pruneshot.runtime.checkpoint import load_optimizer, optimizer_state, prefixed, sub
    from pruneshot.training import require_finite

    source = device_source(train, model_device(model))
    gammas = [w for ws in bn_gammas(model).values() for w in ws]
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=0.0)
    history: list[dict[str, float]] = []
    if checkpoint is not None:
        checkpoint = checkpoint.scoped("slimming", {"l1": l1, "epochs": epochs, "lr": lr, "momentum": momentum,
                                                    "batch_size": batch_size, "seed": seed})
        ck = checkpoint.load()
        if ck is not None:
            model.load_state_dict(sub(ck.tensors, "model"))
            load_optimizer(opt, ck.tensors, ck.state["optimizer"], "opt")
            gen.set_state(ck.tensors["generator"])
            ck.restore_rng()
            history = ck.state["history"]
            if log is not None:
                log(f"slimming: resumed from checkpoint after epoch {len(history)}/{epochs} ({checkpoint.directory})")
    model.train()
    for epoch in range(len(history), epochs):
        perm = torch.randperm(len(train), generator=gen)
        tot_ce = tot_l1 = 0.0
        n = 0
        for i in range(0, len(perm), batch_size):
            idx = perm[i : i + batch_size]
            if len(idx) < 2:  # BatchNorm in train mode needs more than one sample
                continue
            xb, yb = source.batch(idx)
            ce = F.cross_entropy(model(xb), yb)
            sparsity = sum(g.abs().sum() for g in gammas)
            loss = ce + l1 * sparsity
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot_ce += ce.item() * len(idx)
            tot_l1 += sparsity.item() * len(idx)
            n += len(idx)
        row = {"epoch": epoch, "ce": tot_ce / max(1, n), "gamma_l1": tot_l1 / max(1, n)}
        require_finite(row["ce"] + row["gamma_l1"], f"slimming sparsity fine-tune, epoch {epoch + 1}")
        history.append(row)
        if checkpoint is not None:
            opt_tensors, opt_meta = optimizer_state("opt", opt)
            checkpoint.save({**prefixed("model", model.state_dict()), **opt_tensors, "generator": gen.get_state()},
                            {"history": history, "optimizer": opt_meta})
        if log_metrics is not None:
            log_metrics({"slim_ce": row["ce"], "slim_gamma_l1": row["gamma_l1"]}, epoch)
    model.eval()
    return history


def batches_per_epoch(n_train: int, batch_size: int) -> int:
    """SGD steps of one ``sparsity_finetune`` epoch (it skips a last batch of one sample)."""
    return n_train // batch_size + (n_train % batch_size >= 2)


def finetune_epochs(n_train: int, batch_size: int, epochs: int, min_steps: int) -> int:
    """Epochs of the sparsity fine-tune: ``epochs``, or more when they hold fewer than ``min_steps``
    SGD steps."""
    per_epoch = batches_per_epoch(n_train, batch_size)
    if min_steps <= 0 or per_epoch == 0:
        return epochs
    return max(epochs, -(-min_steps // per_epoch))


def gamma_summary(scores: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The |gamma| distribution of per-channel ``scores`` (``gamma_scores``): the share below
    ``SPARSE_GAMMA`` of the largest, that absolute cut, and the ``GAMMA_QUANTILES``."""
    import torch

    flat = torch.cat([v.detach().float() for v in scores.values()])
    cut = SPARSE_GAMMA * float(flat.max())
    return {"sparsity": float((flat < cut).float().mean()), "cut": cut,
            "quantiles": [float(v) for v in torch.quantile(flat, torch.tensor(GAMMA_QUANTILES))]}


@no_grad
def rescale_gammas(net: nn.Module, factors: dict[str, float] | None = None) -> dict[str, float]:
    """Undo the L1's shrinkage of the kept BatchNorm scales without changing what the network computes
    (up to BatchNorm's eps): per channel group, every BN writing it has its (gamma, beta) divided by
    c = the mean |gamma| of the group's kept channels, so the group's activations grow by 1/c (ReLU and
    pooling commute with a positive factor, residual sums of one group scale together); every layer
    reading the group has its BN's running mean and variance scaled by 1/c and 1/c^2, and the
    classifier reading the head group has its weights scaled by c. Why: with gammas ~0.05, the next
    layers' pre-BN activations have variance ~1e-4 (near eps), BN divides by ~0.01 and a fine-tune at
    the shared transfer lr diverges (measured on the default: 8 of 8 5-shot episodes to NaN at l1 0.03,
    none after rescaling). A group read by a layer without BatchNorm is left as it is. ``factors``: the
    c of each group to apply (e.g. those of the pruned network, applied to its masked dense form) instead of
    computing them. Returns c per rescaled group."""
    import torch

    from pruneshot.models.base import Backbone

    if not isinstance(net, Backbone):
        return {}
    readers: dict[str, list[Any]] = {g: [] for g in net.channel_groups()}
    for ly in net.layers():
        if ly.in_group is not None:
            readers[ly.in_group].append(ly)
    given, factors = factors, {}
    for g, bns in net.group_bns().items():
        if given is not None:
            if g not in given:
                continue
            c = given[g]
        else:
            c = float(torch.cat([bn.weight.abs() for bn in bns]).mean()) if bns else 0.0
            if not c > 0 or any(ly.bn is None for ly in readers[g]):
                continue
        factors[g] = c
        for bn in bns:
            bn.weight.div_(c)
            bn.bias.div_(c)
    for g, c in factors.items():
        for ly in readers[g]:
            bn = net.get_submodule(ly.bn)
            bn.running_mean.div_(c)
            bn.running_var.div_(c * c)
    head = net.head_group(net.spec)
    if head in factors:
        net.classifier.weight.mul_(factors[head])
    return factors


@register
class Slimming(PruningMethod):
    name = "slimming"
    options_class = SlimmingOptions
    side = "source"
    provenance = "baseline"
    reference = "Liu et al. 2017, Network Slimming"
    mechanism = ("gamma_sparsity_before", "gamma_sparsity_after", "gamma_moved_max", "overlap_with_plain_ranking")
    uses_device = True

    def search(self, ctx: SearchContext) -> SearchResult:
        import torch

        from pruneshot.methods.base import compute_device, device_source, to_cpu
        from pruneshot.models.cost import cost
        from pruneshot.training import accuracy

        opts = self.resolve_options(ctx.options)
        model = ctx.model
        groups = model.channel_groups()
        base_info = {"requested_budget": ctx.budget, "metric": ctx.metric, "options": opts}
        if ctx.budget >= 1.0:
            return dense_result(ctx, base_info, "budget >= 1: dense network returned unchanged, no fine-tune")

        device = compute_device(ctx.device)  # the fine-tune, scoring and evaluation run there
        model = model.to(device)
        val = device_source(ctx.source_val, device)
        # what a plain |gamma| ranking of the input network would keep: the fine-tune must change it
        before = gamma_scores(model)
        raw_before = [w.detach().clone() for ws in bn_gammas(model).values() for w in ws]
        plain_keep, _ = global_keep(model, before, ctx.budget, ctx.metric)
        epochs = finetune_epochs(len(ctx.source_train), opts["batch_size"], opts["epochs"], opts["min_steps"])
        # ctx.model is ours to modify: it becomes the fine-tuned dense network the channels are cut from.
        history = sparsity_finetune(
            model, ctx.source_train, l1=opts["l1"], epochs=epochs, lr=opts["lr"],
            momentum=opts["momentum"], batch_size=opts["batch_size"], seed=ctx.seed, log_metrics=ctx.log_metrics,
            checkpoint=ctx.checkpoint, log=ctx.log)
        scores = gamma_scores(model)
        keep, n_global = global_keep(model, scores, ctx.budget, ctx.metric)
        dist_before, dist_after = gamma_summary(before), gamma_summary(scores)
        moved = max(float((w.detach() - w0).abs().max())
                    for w, w0 in zip((w for ws in bn_gammas(model).values() for w in ws), raw_before, strict=True))
        n_kept = sum(len(i) for i in keep.values())
        overlap = sum(len(set(keep[g]) & set(plain_keep[g])) for g in keep) / n_kept
        pruned = model.pruned(keep).to(device)
        acc_unscaled = accuracy(pruned, val.x, val.y) if len(val) else float("nan")
        rescaled = rescale_gammas(pruned) if opts["rescale"] else {}
        rescale_gammas(model, rescaled)  # the masked form (the fine-tuned dense network) gets the same factors
        achieved = cost(pruned, ctx.metric) / cost(model, ctx.metric)
        ranked = torch.sort(torch.cat([scores[g] for g in groups]), descending=True).values
        has_val = len(ctx.source_val) > 0
        info = {
            **base_info,
            "achieved_ratio": achieved,
            "gap": ctx.budget - achieved,
            "widths": {g: len(i) for g, i in keep.items()},
            "global_kept": n_global,
            "gamma_threshold": float(ranked[n_global - 1]) if n_global > 0 else None,
            "forced_keep_note": "every group keeps at least its largest-|gamma| channel",
            "finetune_epochs": epochs,
            "finetune_steps": epochs * batches_per_epoch(len(ctx.source_train), opts["batch_size"]),
            "gamma_sparsity_rule": "share of channels with |gamma| < gamma_sparsity_threshold * the network's "
                                   "largest |gamma| (per-channel score, as ranked)",
            "gamma_sparsity_threshold": SPARSE_GAMMA,
            "gamma_sparsity_before": dist_before["sparsity"],
            "gamma_sparsity_after": dist_after["sparsity"],
            "gamma_sparse_cut_before": dist_before["cut"],
            "gamma_sparse_cut_after": dist_after["cut"],
            "gamma_quantile_levels": list(GAMMA_QUANTILES),
            "gamma_quantiles_before": dist_before["quantiles"],
            "gamma_quantiles_after": dist_after["quantiles"],
            "gamma_moved_max": moved,
            "overlap_with_plain_ranking": overlap,
            "finetune_history": history,
            "source_val_acc_finetuned_dense": accuracy(model, val.x, val.y) if has_val else float("nan"),
            "source_val_acc_pruned_before_rescale": acc_unscaled,
            "source_val_acc_pruned": accuracy(pruned, val.x, val.y) if has_val else float("nan"),
            "gamma_rescale": rescaled,
        }
        ctx.log(f"slimming: {ctx.metric} ratio {achieved:.4f} for requested {ctx.budget:g} "
                f"(gap {info['gap']:+.4f}); widths {list(info['widths'].values())}; "
                f"global |gamma| cut after {n_global} channels; sparse gammas {dist_before['sparsity']:.2f} -> "
                f"{dist_after['sparsity']:.2f}, overlap with the plain ranking {overlap:.2f}")
        return SearchResult(model=to_cpu(pruned), keep=keep, info=info, masked=to_cpu(model))
