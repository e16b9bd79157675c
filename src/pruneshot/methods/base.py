"""The method interface: every pruning method is one file with one subclass of PruningMethod."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import nn

from pruneshot.data.prepare import Split

if TYPE_CHECKING:
    from pruneshot.runtime.checkpoint import Checkpointer


@dataclass
class SearchContext:
    """What a source-side search gets: the pretrained model and source data.

    ``model`` is a fresh copy the method may modify; ``budget`` is the fraction of the
    dense network's ``metric`` (params|flops) to keep; ``seed`` is the derived search
    seed (shared by every method for one replicate, so calibration data match).
    ``checkpoint``: the job's checkpointer (None: not checkpointed); a method with a training loop
    saves its loop state there and resumes from it (see :mod:`pruneshot.runtime.checkpoint`), scoping
    its key with its options; others ignore it.
    """

    model: nn.Module
    budget: float
    metric: Literal["params", "flops"]
    source_train: Split
    source_val: Split
    seed: int
    options: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    log: Callable[[str], None] = print
    log_metrics: Callable[[dict[str, float], int | None], None] = lambda metrics, step=None: None
    checkpoint: Checkpointer | None = None


@dataclass
class SearchResult:
    """A physically pruned network and how it was obtained.

    ``keep`` maps channel groups to kept indices of the dense network (None when the
    method keeps everything or its units are not channels); ``info`` holds method-specific
    facts for the record. ``masked`` is the network before physical removal (removed units
    zeroed where the method has its own zeroing, e.g. scales); under ``keep``'s channel masks
    (when ``keep`` is given) its outputs must equal ``model``'s. None means the search's input
    network (``ctx.model`` as the method left it).
    """

    model: nn.Module
    keep: dict[str, list[int]] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    masked: nn.Module | None = None


@dataclass
class AdaptContext:
    """What a target-side method gets for one episode.

    ``model`` is a fresh copy of the pretrained network whose classifier is already a new,
    seeded ``ways``-way head; BatchNorm is in eval mode and must stay so. ``support_x`` is
    (N, C, H, W) normalised images, ``support_y`` (N,) labels in [0, ways). ``budget`` is the
    fraction of ``dense_cost`` (the ``metric`` of ``model`` as given, head included) to keep.
    ``seed`` is the episode's derived seed. The method returns a physically pruned network
    with its trained head; the transfer arm (finetune / linear_probe) then runs on it.
    """

    model: nn.Module
    budget: float
    metric: Literal["params", "flops"]
    support_x: torch.Tensor
    support_y: torch.Tensor
    seed: int
    dense_cost: float
    options: dict[str, Any] = field(default_factory=dict)
    log: Callable[[str], None] = print


class PruningMethod(ABC):
    """One pruning method. Subclasses set the class attributes and implement ``search``.

    name: config name; side: 'source' (searched once on source data, one architecture for
    every episode) or 'target' (prunes while adapting to each episode); provenance: where
    the algorithm comes from ('baseline', 'official code', 'abstract-level', 'reconstruction');
    budget_free: the method ignores the budget (runs at budget 1 only). Source-side methods are
    evaluated with every configured arm, reinit included; see ``TargetMethod`` for the other side.
    """

    name: ClassVar[str]
    side: ClassVar[Literal["source", "target"]] = "source"
    provenance: ClassVar[str] = "baseline"
    reference: ClassVar[str] = ""
    budget_free: ClassVar[bool] = False
    #: Config sections of other methods this one builds on; the pipeline passes them nested in
    #: ``options`` under their names (e.g. double pruning reads channel_scaling and basis_scaling).
    option_sections: ClassVar[tuple[str, ...]] = ()

    def arms(self, configured: list[str]) -> list[str]:
        """Transfer arms this method is evaluated with, given the configured ones."""
        return list(configured)

    @abstractmethod
    def search(self, ctx: SearchContext) -> SearchResult:
        """Return a physically pruned network meeting ``ctx.budget`` as closely as the method can."""

    def adapt(self, ctx: AdaptContext) -> SearchResult:
        """Target-side methods: prune while adapting to one episode's support set."""
        raise NotImplementedError(f"{self.name} is a {self.side}-side method: it has no per-episode adapt()")


class TargetMethod(PruningMethod):
    """A method that prunes per episode on the target support set (side 'target').

    Its source-side ``search`` hands the pretrained network on unchanged (the starting point of
    every episode); the pruning happens in ``adapt``, which at budget >= 1 must return
    ``ctx.model`` unchanged (no training either), so budget 1 equals the dense method exactly.
    Target methods have no ``reinit`` arm: their units are defined by the pretrained weights.
    """

    side: ClassVar[Literal["source", "target"]] = "target"

    def arms(self, configured: list[str]) -> list[str]:
        return [a for a in configured if a != "reinit"]

    def search(self, ctx: SearchContext) -> SearchResult:
        return dense_result(ctx, {"requested_budget": ctx.budget, "metric": ctx.metric},
                            "target-side method: the pretrained network is handed to every episode, "
                            "which prunes it on its support set")

    @abstractmethod
    def adapt(self, ctx: AdaptContext) -> SearchResult:
        """Prune ``ctx.model`` on the support set to ``ctx.budget``; return the physically pruned network."""


def width_ratio(model: nn.Module, widths: dict[str, int], metric: str, dense_cost: float) -> float:
    """cost(model with each group's width replaced by ``widths[g]``) / ``dense_cost``, without copying weights."""
    from pruneshot.models.base import build_model
    from pruneshot.models.cost import cost

    return cost(build_model(model.spec_with_widths(widths)), metric) / dense_cost


def merge_options(method: str, defaults: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """``defaults`` updated by ``options``; an unknown option is an error naming the allowed ones."""
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(f"{method}: unknown option(s) {unknown}; allowed: {sorted(defaults)}")
    return {**defaults, **options}


def dense_result(ctx: SearchContext, info: dict[str, Any], note: str) -> SearchResult:
    """The unpruned network, for a budget of 1 (every channel kept, achieved ratio 1)."""
    keep = {g: list(range(n)) for g, n in ctx.model.channel_groups().items()}
    return SearchResult(model=ctx.model, keep=keep,
                        info={**info, "achieved_ratio": 1.0, "gap": ctx.budget - 1.0, "note": note})


def uniform_widths(model: nn.Module, budget: float, metric: str, iters: int = 24) -> dict[str, int]:
    """Per-group channel counts from one keep ratio r shared by every group (at least 1 channel),
    with r chosen by bisection so that cost(pruned)/cost(dense) is the largest value <= budget
    (or the smallest achievable when even 1 channel per group exceeds it)."""
    from pruneshot.models.cost import cost

    groups = model.channel_groups()
    dense = cost(model, metric)

    def widths(r: float) -> dict[str, int]:
        return {g: max(1, min(n, round(r * n))) for g, n in groups.items()}

    def ratio(r: float) -> float:
        return width_ratio(model, widths(r), metric, dense)

    if budget >= 1.0:
        return dict(groups)
    lo, hi = 0.0, 1.0
    for _ in range(iters):
        mid = (lo + hi) / 2
        if ratio(mid) <= budget:
            lo = mid
        else:
            hi = mid
    return widths(lo)


def keep_top(scores: dict[str, torch.Tensor], widths: dict[str, int]) -> dict[str, list[int]]:
    """Per group, the indices of the ``widths[g]`` largest scores, sorted ascending (stable ties)."""
    keep = {}
    for g, s in scores.items():
        order = torch.argsort(-s, stable=True)[: widths[g]]
        keep[g] = sorted(order.tolist())
    return keep
