"""`double_pruning`: channel scaling and basis scaling on the same network (Wong et al. 2021).

Source read: the abstracts and claim 1 of the patent, which combine both kinds of unit. The split
of the budget between the stages is a reconstruction: the first stage prunes to
``budget ** first_stage_exponent`` of the dense cost, the second to ``budget`` (both measured
against the dense network the episode started from). ``order`` picks the stages:

- ``channel_first`` (default): channel scaling of the pretrained network, physical removal with
  the scales folded in, then basis scaling (SVD) of that narrower network;
- ``basis_first``: basis scaling, physical removal (low-rank blocks where they pay), then channel
  scaling of the low-rank network (a low-rank block's channels are its ``coef`` outputs; its
  consumer is the next block's ``basis`` conv or the classifier). With the basis section's
  ``revert_when_larger``, a low-rank block that channel removal makes no smaller than a dense conv
  is counted and built as that dense conv.

The head keeps training across both stages. Stage options: this section holds only ``order`` and
``first_stage_exponent``; the pipeline passes the two stages' own sections as the optional nested
keys ``options["channel_scaling"]`` and ``options["basis_scaling"]`` (each validated by that
method's own option check; missing means that method's defaults).

Masked form (``SearchResult.masked``, at the dense widths; under ``keep``'s channel masks its
outputs equal the physical network's): for ``basis_first`` the basis stage's masked network (zeroed
scales s) with the channel stage's scales (zero for removed channels) at the consumer inputs and
the final head. For ``channel_first`` the SVD is of the channel-pruned convs (with the channel
scales folded in), so the basis stage's masked layers are embedded in the dense widths: their
basis filters read only the kept input channels (zero weights elsewhere), their outputs are zero
on removed channels, the head's columns of removed channels are zero. ``info["stage_equality"]``
also records, on a few support images, how far each stage's physical network is from its own
masked form.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pruneshot.methods import basis_scaling as bs
from pruneshot.methods import channel_scaling as cs
from pruneshot.methods import register
from pruneshot.methods.base import AdaptContext, MethodOptions, SearchResult, no_grad, option
from pruneshot.methods.scaling import ScalingMethod, support_on_device

# Imported where the method computes: its metadata is read without torch (see methods/base.py).
if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass(frozen=True)
class DoublePruningOptions(MethodOptions):
    """Double pruning (Wong et al. 2021): channel scaling and basis scaling on the same network, each
    with the options of its own section. The budget split is a reconstruction."""

    order: Literal["channel_first", "basis_first"] = option(
        "channel_first", "Which stage runs first (methods.md default - channel scaling first).")
    first_stage_exponent: float = option(
        0.5, "The first stage prunes to budget ** first_stage_exponent of the dense cost, the second to budget.",
        exclusive_minimum=0, exclusive_maximum=1)


#: Optional nested keys carrying the stages' own option sections (passed by the pipeline).
STAGE_KEYS = ("channel_scaling", "basis_scaling")


@no_grad
def _max_diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    """max |a(x) - b(x)| in eval mode, both networks moved (in place) to ``x``'s device."""
    return float((a.to(x.device).eval()(x) - b.to(x.device).eval()(x)).abs().max().item())


@no_grad
def embed_in_dense(dense: nn.Module, narrow: nn.Module, keep: dict[str, list[int]]) -> nn.Module:
    """A decomposed network at ``dense``'s widths computing, on the kept channels, what ``narrow`` (a
    decomposed network of the channel-pruned widths) computes: each BasisScalingConv embedded with
    zero weights on removed input channels and zero outputs on removed channels, BatchNorm of the kept
    channels from ``narrow``, the head's removed columns zero. Built on ``narrow``'s device (the new head
    is initialised on the CPU, as always, then moved there)."""
    import torch
    from torch import nn

    from pruneshot.methods.base import model_device
    from pruneshot.models.basis import BasisScalingConv

    device = model_device(narrow)
    net = copy.deepcopy(dense).eval().to(device)
    sizes = dense.channel_groups()
    full = {g: torch.as_tensor(keep.get(g, list(range(n))), dtype=torch.long) for g, n in sizes.items()}
    for ly in dense.layers():
        out = full[ly.out_group]
        if ly.in_group is None:
            in_idx, c_in = torch.arange(dense.spec["in_channels"]), dense.spec["in_channels"]
        else:
            in_idx, c_in = full[ly.in_group], sizes[ly.in_group]
        small = narrow.get_conv(ly.name)
        if isinstance(small, BasisScalingConv):
            wide = small.embedded(in_idx, c_in, out, ly.c_out)
        else:  # a depthwise conv (not decomposed): its kept channels' filters, zero elsewhere
            wide = copy.deepcopy(dense.get_conv(ly.name)).to(device)
            wide.weight.zero_()
            wide.weight[out] = small.weight
            wide.weight.requires_grad_(False)
        net.set_conv(ly.name, wide)
        if ly.bn is not None:
            bn_w, bn_n = net.get_submodule(ly.bn), narrow.get_submodule(ly.bn)
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(bn_w, name)[out] = getattr(bn_n, name)
    prev, prev_n = full[dense.head_group(dense.spec)], sizes[dense.head_group(dense.spec)]
    head = nn.Linear(prev_n, narrow.classifier.out_features, bias=narrow.classifier.bias is not None).to(device)
    head.weight.zero_()
    head.weight[:, prev] = narrow.classifier.weight
    if head.bias is not None:
        head.bias.copy_(narrow.classifier.bias)
    head.requires_grad_(False)
    net.classifier = head
    return net


def _stage_inputs(ctx: AdaptContext, opts: dict[str, Any], x: torch.Tensor, y: torch.Tensor,
                  gen: torch.Generator) -> dict[str, Any]:
    """One episode's generator (every draw of both stages), support set on its device and stage targets."""
    return {"gen": gen, "x": x, "y": y,
            "first_target": ctx.dense_cost * ctx.budget ** opts["first_stage_exponent"],
            "final_target": ctx.dense_cost * ctx.budget}


def _after_channel_stage(ctx: AdaptContext, inputs: dict[str, Any], first: dict[str, Any],
                         b_opts: dict[str, Any]) -> dict[str, Any]:
    """``channel_first``: the basis stage of the channel stage's network ``first``, embedded in the dense widths."""
    second = bs.basis_scaling_stage(first["physical"], inputs["x"], inputs["y"], target_cost=inputs["final_target"],
                                    opts=b_opts, metric=ctx.metric, gen=inputs["gen"], log=ctx.log)
    return {"first": first, "second": second, "masked": embed_in_dense(ctx.model, second["masked"], first["keep"]),
            "keep": first["keep"],
            "masked_form": "embedded: the basis stage's masked layers placed in the dense widths"}


def _composed(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """``basis_first``: the basis stage's masked network, the channel stage's head, its scales at the consumers."""
    from pruneshot.models.scaled import ChannelScaled

    net = copy.deepcopy(first["masked"])
    net.classifier.load_state_dict(second["masked"].net.classifier.state_dict(), strict=True)
    chan = second["masked"]
    masked = ChannelScaled(net, scales={g: chan.scales[g] for g in chan.scales},
                           masks={g: chan.mask(g) for g in chan.scales}).eval()
    return {"first": first, "second": second, "masked": masked, "keep": second["keep"],
            "masked_form": "composed: basis-scaled dense network with zeroed bases and channel scales"}


def double_prune(ctx: AdaptContext, opts: dict[str, Any], x: torch.Tensor, y: torch.Tensor,
                 gen: torch.Generator) -> dict[str, Any]:
    """Both stages on a copy of ``ctx.model`` (``opts``: resolved, the stages' sections nested), on the support
    set (x, y) with every draw from ``gen``: {"first", "second" (stage results), "masked", "keep"}."""
    c_opts, b_opts = opts["channel_scaling"], opts["basis_scaling"]
    inputs = _stage_inputs(ctx, opts, x, y, gen)
    common = {"metric": ctx.metric, "gen": gen, "log": ctx.log}
    if opts["order"] == "channel_first":
        first = cs.channel_scaling_stage(ctx.model, x, y, target_cost=inputs["first_target"], opts=c_opts, **common)
        return _after_channel_stage(ctx, inputs, first, b_opts)
    first = bs.basis_scaling_stage(ctx.model, x, y, target_cost=inputs["first_target"], opts=b_opts, **common)
    second = cs.channel_scaling_stage(first["physical"], x, y, target_cost=inputs["final_target"], opts=c_opts,
                                      revert_larger=b_opts["revert_when_larger"], **common)
    return _composed(first, second)


def double_prune_together(contexts: list[AdaptContext], opts: dict[str, Any], xs: list[torch.Tensor],
                          ys: list[torch.Tensor], gens: list[torch.Generator]) -> list[dict[str, Any]]:
    """:func:`double_prune` of several episodes (one metric), their channel-scaling stages trained together
    (:func:`channel_scaling.channel_scaling_stages`; ``basis_first``: the networks whose basis stages left
    one architecture), their basis stages one episode at a time; each episode's generator carries its
    draws from one stage to the next exactly as in :func:`double_prune`. The global RNG (nothing drawn
    from it reaches a result) is seeded with the episode's seed before each of its per-episode parts."""
    import torch

    c_opts, b_opts = opts["channel_scaling"], opts["basis_scaling"]
    inputs = [_stage_inputs(ctx, opts, x, y, gen) for ctx, x, y, gen in zip(contexts, xs, ys, gens, strict=True)]
    metric = contexts[0].metric
    seeds = [ctx.seed for ctx in contexts]

    def channel_stages(models: list[nn.Module], target: str, revert_larger: bool) -> list[dict[str, Any]]:
        return cs.channel_scaling_stages(
            models, [i["x"] for i in inputs], [i["y"] for i in inputs], target_costs=[i[target] for i in inputs],
            metric=metric, opts=c_opts, gens=[i["gen"] for i in inputs], logs=[c.log for c in contexts],
            revert_larger=revert_larger, seeds=seeds)

    out = []
    if opts["order"] == "channel_first":
        firsts = channel_stages([ctx.model for ctx in contexts], "first_target", False)
        for ctx, inp, first in zip(contexts, inputs, firsts, strict=True):
            torch.manual_seed(ctx.seed)
            out.append(_after_channel_stage(ctx, inp, first, b_opts))
        return out
    firsts = []
    for ctx, inp in zip(contexts, inputs, strict=True):
        torch.manual_seed(ctx.seed)
        firsts.append(bs.basis_scaling_stage(ctx.model, inp["x"], inp["y"], target_cost=inp["first_target"],
                                             opts=b_opts, metric=metric, gen=inp["gen"], log=ctx.log))
    seconds = channel_stages([f["physical"] for f in firsts], "final_target", b_opts["revert_when_larger"])
    return [_composed(f, s) for f, s in zip(firsts, seconds, strict=True)]


@register
class DoublePruning(ScalingMethod):
    name = "double_pruning"
    option_sections = STAGE_KEYS
    options_class = DoublePruningOptions
    mechanism = ("first_stage.threshold_share", "second_stage.threshold_share", "first_stage.removed_by_threshold",
                 "second_stage.removed_by_threshold")
    provenance = "abstract-level"
    reference = ("Wong et al. 2021, basis scaling and double pruning (abstracts, patent claim 1); "
                 "budget split between the stages reconstructed")

    def _base_info(self, ctx: AdaptContext, opts: dict[str, Any]) -> dict[str, Any]:
        return {"requested_budget": ctx.budget, "metric": ctx.metric,
                "options": {k: v for k, v in opts.items() if k not in STAGE_KEYS},
                "channel_scaling_options": opts["channel_scaling"], "basis_scaling_options": opts["basis_scaling"],
                "provenance_note": "both unit kinds from the abstracts/patent; the budget split, the "
                                   "importance and the schedules are reconstructions"}

    def _stage(self, ctx: AdaptContext, opts: dict[str, Any], x: torch.Tensor, y: torch.Tensor,
               gen: torch.Generator) -> dict[str, Any]:
        return double_prune(ctx, opts, x, y, gen)

    def _stages(self, group: list[AdaptContext], opts: dict[str, Any], xs: list[torch.Tensor],
                ys: list[torch.Tensor], gens: list[torch.Generator]) -> list[dict[str, Any]]:
        """``adapt_batch``'s episodes with their channel-scaling stages trained together
        (:func:`double_prune_together`), the basis stages per episode; equal to adapting them one at a
        time up to the summation order of the stacked layers. A context that cannot join others
        (``scaling.batch_groups``) is adapted alone, as the default does."""
        return double_prune_together(group, opts, xs, ys, gens)

    def _result(self, ctx: AdaptContext, opts: dict[str, Any], out: dict[str, Any]) -> SearchResult:
        """The episode's SearchResult from :func:`double_prune`'s output (both paths)."""
        from pruneshot.methods.base import to_cpu
        from pruneshot.models.cost import cost

        first, second = out["first"], out["second"]
        physical = second["physical"]
        achieved = cost(physical, ctx.metric) / ctx.dense_cost
        x = support_on_device(ctx)[0][:8]
        stage_equality = {"first_stage_physical_vs_masked": _max_diff(first["physical"], first["masked"], x),
                          "second_stage_physical_vs_masked": _max_diff(physical, second["masked"], x)}
        info = {
            **self._base_info(ctx, opts),
            "achieved_ratio": achieved,
            "gap": ctx.budget - achieved,
            "first_stage_target_ratio": ctx.budget ** opts["first_stage_exponent"],
            "first_stage_ratio": first["cost"] / ctx.dense_cost,
            "accounted_cost": second["cost"],
            "met_from_below": second["cost"] <= ctx.dense_cost * ctx.budget,
            "first_stage": first["info"],
            "second_stage": second["info"],
            "masked_form": out["masked_form"],
            "stage_equality": stage_equality,
        }
        ctx.log(f"double_pruning ({opts['order']}): {ctx.metric} ratio {achieved:.4f} for requested "
                f"{ctx.budget:g} (gap {info['gap']:+.4f}); first stage ratio {info['first_stage_ratio']:.4f}")
        return SearchResult(model=to_cpu(physical), keep={g: list(i) for g, i in out["keep"].items()}, info=info,
                            masked=to_cpu(out["masked"]))
