"""The method interface: every pruning method is one file with one subclass of PruningMethod."""

from __future__ import annotations

import dataclasses
import functools
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

# torch only where a method computes: the registry's metadata (names, sides, arms, options) must be
# readable without it, e.g. by Snakemake parsing a study (tests/test_parse_without_torch.py).
if TYPE_CHECKING:
    import torch
    from torch import nn

    from pruneshot.data.splits import Split
    from pruneshot.runtime.checkpoint import Checkpointer


@dataclass
class SearchContext:
    """What a source-side search gets: the pretrained model and source data.

    ``model`` is a fresh copy the method may modify; ``budget`` is the fraction of the
    dense network's ``metric`` (params|flops) to keep; ``seed`` is the derived search
    seed (shared by every method for one replicate, so calibration data match).
    ``checkpoint``: the job's checkpointer (None: not checkpointed); a method with a training loop
    saves its loop state there and resumes from it (see :mod:`pruneshot.runtime.checkpoint`), scoping
    its key with its options; others ignore it. ``recipe``: the study's pretraining recipe (config
    ``pretrain``, defaults filled), for a method that trains a network anew on the source (``scratch``).
    ``device``: where a method with a source loop (``PruningMethod.uses_device``) trains or scores (a torch
    device name; the stage passes the resolved ``pretrain.device``): model and batches go there, every
    random draw stays on the CPU, and the returned networks are on the CPU in the job's dtype (float32).
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
    recipe: dict[str, Any] = field(default_factory=dict)


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
    #: Further networks of the same architecture (e.g. random's other masks): saved with ``model``,
    #: each evaluated on every episode; a cell's episode accuracy is the mean over all of them.
    variants: list[nn.Module] = field(default_factory=list)


@dataclass
class AdaptContext:
    """What a target-side method gets for one episode.

    ``model`` is a fresh copy of the pretrained network whose classifier is already a new,
    seeded ``ways``-way head; BatchNorm is in eval mode and must stay so. ``support_x`` is
    (N, C, H, W) normalised images, ``support_y`` (N,) labels in [0, ways). ``budget`` is the
    fraction of ``dense_cost`` (the ``metric`` of ``model`` as given, head included) to keep.
    ``seed`` is the episode's derived seed. The method returns a physically pruned network
    with its trained head, on the CPU in the job's dtype (``transfer.dtype``; its ``masked`` form too); the transfer arm
    (finetune / linear_probe) then runs on it. ``device``: where the method computes (a torch device
    name, 'auto' = CUDA when available): the model and support tensors are moved there, every random
    draw stays on the CPU, so on the CPU the result does not depend on it.
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
    device: str = "cpu"


def no_grad(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``@torch.no_grad()`` for a method module's functions without importing torch at definition time:
    the call runs under ``torch.no_grad()``, exactly as the torch decorator does."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import torch

        with torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper


# --- method options: one typed dataclass per method, the single definition of its config section ---------------

#: Metadata keys of an option field that become JSON-schema bounds (config/schema.yaml), in schema order.
BOUNDS = ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum")
_BOUND_TEXT = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<"}
_BOUND_OK: dict[str, Callable[[Any, Any], bool]] = {
    "minimum": lambda v, b: v >= b, "exclusiveMinimum": lambda v, b: v > b,
    "maximum": lambda v, b: v <= b, "exclusiveMaximum": lambda v, b: v < b,
}


def option(default: Any, help: str, *, key: str | None = None, minimum: float | None = None,
           exclusive_minimum: float | None = None, maximum: float | None = None,
           exclusive_maximum: float | None = None) -> Any:
    """A field of a ``MethodOptions`` dataclass: its default, one-line description and bounds.

    The field's annotation gives the type: ``int``, ``float`` (any number), ``bool``, ``str`` or a
    ``Literal`` of strings (an enum). ``key``: the config key when it is not a Python name (``lambda``).
    """
    meta: dict[str, Any] = {"help": help}
    if key is not None:
        meta["key"] = key
    for name, value in zip(BOUNDS, (minimum, exclusive_minimum, maximum, exclusive_maximum), strict=True):
        if value is not None:
            meta[name] = value
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class OptionSpec:
    """One option as the config sees it: key, JSON-schema type, default, description, enum and bounds."""

    key: str
    attr: str
    type: str
    default: Any
    help: str
    enum: tuple[str, ...] | None = None
    bounds: tuple[tuple[str, Any], ...] = ()

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is not allowed for this option (None when it is)."""
        kind = {"integer": "an integer", "number": "a number", "boolean": "true or false",
                "string": "a string"}[self.type]
        if self.type == "boolean":
            ok = isinstance(value, bool)
        elif self.type == "integer":
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif self.type == "number":
            ok = isinstance(value, int | float) and not isinstance(value, bool)
        else:
            ok = isinstance(value, str)
        if self.enum is not None:
            kind = f"one of {', '.join(self.enum)}"
            ok = ok and value in self.enum
        if ok and self.bounds:
            ok = all(_BOUND_OK[name](value, bound) for name, bound in self.bounds)
        if ok:
            return None
        limits = " and ".join(f"{_BOUND_TEXT[name]} {bound}" for name, bound in self.bounds)
        return f"must be {kind}{' ' + limits if limits else ''}, got {value!r}"


_JSON_TYPES: dict[Any, str] = {bool: "boolean", int: "integer", float: "number", str: "string"}


class MethodOptions:
    """Base of a method's options dataclass (``PruningMethod.options_class``).

    Subclasses are ``@dataclass(frozen=True)`` with a docstring (the config section's description) and
    one ``option(...)`` field per config key, in config order. ``check`` holds rules across options.
    """

    @classmethod
    def specs(cls) -> tuple[OptionSpec, ...]:
        """The options, in field order."""
        hints = typing.get_type_hints(cls)
        out = []
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if "help" not in f.metadata or f.default is dataclasses.MISSING:
                raise TypeError(f"{cls.__name__}.{f.name}: declare options with option(default, help, ...)")
            hint = hints[f.name]
            if typing.get_origin(hint) is Literal:
                enum = typing.get_args(hint)
                if not all(isinstance(v, str) for v in enum):
                    raise TypeError(f"{cls.__name__}.{f.name}: a Literal option must list strings")
                kind = "string"
            elif hint in _JSON_TYPES:
                enum, kind = None, _JSON_TYPES[hint]
            else:
                raise TypeError(f"{cls.__name__}.{f.name}: unsupported option type {hint!r}")
            out.append(OptionSpec(key=f.metadata.get("key", f.name), attr=f.name, type=kind, default=f.default,
                                  help=f.metadata["help"], enum=enum,
                                  bounds=tuple((b, f.metadata[b]) for b in BOUNDS if b in f.metadata)))
        return tuple(out)

    @classmethod
    def description(cls) -> str:
        """The config section's description: the class docstring on one line."""
        return " ".join((cls.__doc__ or "").split())

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Config key -> default, in config order."""
        return {s.key: s.default for s in cls.specs()}

    @classmethod
    def resolve(cls, method: str, options: Mapping[str, Any]) -> dict[str, Any]:
        """``options`` completed with the defaults and validated (unknown keys, types, enums, bounds, ``check``).

        Returns a new dict in config order holding the given values themselves (no conversion)."""
        specs = cls.specs()
        unknown = sorted(set(options) - {s.key for s in specs})
        if unknown:
            raise ValueError(f"{method}: unknown option(s) {unknown}; allowed: {sorted(s.key for s in specs)}")
        merged = {s.key: options.get(s.key, s.default) for s in specs}
        for s in specs:
            problem = s.problem(merged[s.key])
            if problem:
                raise ValueError(f"{method}: option '{s.key}' {problem}")
        cls(**{s.attr: merged[s.key] for s in specs}).check(method)
        return merged

    def check(self, method: str) -> None:
        """Rules across options (raise ValueError naming ``method`` and the options); none by default."""


@dataclass(frozen=True)
class NoOptions(MethodOptions):
    """The options of a method without any."""


#: Every transfer arm, in the order the pipeline runs them ('finetune': all kept weights train,
#: 'linear_probe': only the new head, 'reinit': the architecture freshly initialised, then as finetune,
#: 'prototype': nearest class centroid of the network's features, cosine, no training).
#: config/schema.yaml's ``transfer.arms`` enum is checked against it by a test.
ARMS: tuple[str, ...] = ("finetune", "linear_probe", "reinit", "prototype")


class PruningMethod(ABC):
    """One pruning method. Subclasses set the class attributes and implement ``search`` (source side)
    or ``adapt`` (target side, see ``TargetMethod``).

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
    #: (method, arm) whose numbers this method's rows repeat exactly (same network, same seeds); the
    #: report ranks them once, as that method. None: the method's numbers are its own.
    repeats: ClassVar[tuple[str, str] | None] = None
    #: Keys of ``SearchResult.info`` (dotted for nested dicts) that show the method's mechanism acting,
    #: e.g. slimming's gamma sparsity; results.csv's ``mechanism`` column and the report's mechanism table
    #: carry them (target-side: the mean over a cell's episodes).
    mechanism: ClassVar[tuple[str, ...]] = ()
    #: Network-free controls the transfer stage scores on this method's episodes (recorded under
    #: ``controls``; 'pixel_prototype': cosine nearest centroid on the raw normalised pixels, sanity gate b).
    controls: ClassVar[tuple[str, ...]] = ()
    #: Config sections of other methods this one builds on; the pipeline passes them nested in
    #: ``options`` under their names (e.g. double pruning reads channel_scaling and basis_scaling).
    option_sections: ClassVar[tuple[str, ...]] = ()
    #: The method's options (its config section); ``NoOptions`` for a method without any.
    options_class: ClassVar[type[MethodOptions]] = NoOptions
    #: A control (random channels, the size-matched scratch network): every other method is tested
    #: against it, and it is drawn in every panel of the report, beside dense.
    control: ClassVar[bool] = False
    #: The method trains its network anew on the source (``scratch``): at budget 1.0 it is another dense
    #: replicate, not the dense network, so the budget-1.0 sanity gate does not apply to it.
    trains_from_scratch: ClassVar[bool] = False
    #: The source-side search computes on ``SearchContext.device`` (it has a training or scoring loop over
    #: source batches). False: a data-free search (weights only, milliseconds), run on the CPU whatever the
    #: device; the search record's ``search_device`` is then 'cpu'. Target-side ``adapt`` always uses
    #: ``AdaptContext.device``.
    uses_device: ClassVar[bool] = False

    def resolve_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """``options`` (as the pipeline passes them, see ``options_for``) validated and completed with defaults.

        The sections of ``option_sections`` are resolved by their own methods and stay nested under their
        names (missing or null: that method's defaults), after the method's own options."""
        from pruneshot.methods import get_method

        own = {k: v for k, v in options.items() if k not in self.option_sections}
        resolved = self.options_class.resolve(self.name, own)
        for section in self.option_sections:
            sub = options.get(section) or {}
            if not isinstance(sub, Mapping):
                raise ValueError(f"{self.name}: option '{section}' must be a mapping of {section} options, "
                                 f"got {type(sub).__name__}")
            resolved[section] = get_method(section).resolve_options(sub)
        return resolved

    def arms(self, configured: list[str]) -> list[str]:
        """Transfer arms this method is evaluated with, given the configured ones."""
        return list(configured)

    def study_arms(self, transfer: Mapping[str, Any]) -> list[str]:
        """The arms this method runs in a study with config section ``transfer``: ``arms`` of the
        configured ones, less ``transfer.dense_only_arms`` unless the method evaluates the dense
        network (a budget-free method: dense, linear_probe). The one place a study's arms are decided."""
        arms = self.arms(list(transfer.get("arms") or ["finetune"]))
        if self.budget_free:
            return arms
        dense_only = set(transfer.get("dense_only_arms") or ())
        return [a for a in arms if a not in dense_only]

    def networks_per_cell(self, options: Mapping[str, Any]) -> int:
        """At most how many networks of one architecture a cell of this method transfers (the search's
        network and its ``variants``), for resolved ``options``: each trains under every arm but reinit,
        which trains the shared architecture once. 1 unless a method draws several (random's masks)."""
        return 1

    def search(self, ctx: SearchContext) -> SearchResult:
        """Source-side methods: a physically pruned network meeting ``ctx.budget`` as closely as the method can."""
        raise NotImplementedError(f"{self.name} is a {self.side}-side method: it has no source-side search()")

    def adapt(self, ctx: AdaptContext) -> SearchResult:
        """Target-side methods: prune while adapting to one episode's support set."""
        raise NotImplementedError(f"{self.name} is a {self.side}-side method: it has no per-episode adapt()")


class TargetMethod(PruningMethod):
    """A method that prunes per episode on the target support set (side 'target').

    It has no source-side search: every episode starts from the pretrained network, and the pruning
    happens in ``adapt``, which at budget >= 1 must return
    ``ctx.model`` unchanged (no training either), so budget 1 equals the dense method exactly.
    Target methods have no ``reinit`` arm: their units are defined by the pretrained weights.
    """

    side: ClassVar[Literal["source", "target"]] = "target"

    def arms(self, configured: list[str]) -> list[str]:
        return [a for a in configured if a != "reinit"]

    def support_steps(self, options: Mapping[str, Any]) -> int:
        """Support-set SGD steps ``adapt`` takes below budget 1, for ``options`` as the pipeline passes
        them (see ``options_for``). They count inside ``transfer.steps``: each arm then trains for the
        rest, so every method's arm sees the same number of support-set steps. The default is the
        round schedule of the methods here, ``rounds * steps_per_round``; a method building on others'
        sections (``option_sections``) takes the sum of theirs."""
        from pruneshot.methods import get_method

        resolved = self.resolve_options(options)
        if self.option_sections:
            return sum(get_method(s).support_steps(resolved[s]) for s in self.option_sections)
        return int(resolved["rounds"]) * int(resolved["steps_per_round"])

    @abstractmethod
    def adapt(self, ctx: AdaptContext) -> SearchResult:
        """Prune ``ctx.model`` on the support set to ``ctx.budget``; return the physically pruned network."""

    def adapt_batch(self, contexts: list[AdaptContext]) -> list[SearchResult]:
        """:meth:`adapt` of several episodes (a chunk of ``transfer.episode_batch``), in order. This default
        adapts them one at a time, the global torch RNG seeded with each episode's ``seed`` first (the
        reference). A method may train the chunk's masked networks together instead; its results must
        equal this default's up to float rounding (tests/test_batching.py), drawing every random number
        per episode from that episode's seed."""
        import torch

        results = []
        for ctx in contexts:
            torch.manual_seed(ctx.seed)
            results.append(self.adapt(ctx))
        return results


def width_ratio(model: nn.Module, widths: dict[str, int], metric: str, dense_cost: float) -> float:
    """cost(model with each group's width replaced by ``widths[g]``) / ``dense_cost``, without copying weights."""
    from pruneshot.models.base import build_model
    from pruneshot.models.cost import cost

    return cost(build_model(model.spec_with_widths(widths)), metric) / dense_cost


def options_for(config: Mapping[str, Any], method: PruningMethod | type[PruningMethod] | str) -> dict[str, Any]:
    """The options the pipeline passes to ``method`` for ``config``: its config section, plus the sections
    of the methods it builds on (``method.option_sections``), nested under their names (copies)."""
    if isinstance(method, str):
        from pruneshot.methods import get_method

        method = get_method(method)
    own = config.get(method.name)
    options = dict(own) if isinstance(own, dict) else {}
    for section in method.option_sections:
        options[section] = dict(config.get(section) or {})
    return options


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
    import torch

    keep = {}
    for g, s in scores.items():
        order = torch.argsort(-s, stable=True)[: widths[g]]
        keep[g] = sorted(order.tolist())
    return keep


def global_keep(
    model: nn.Module, scores: dict[str, torch.Tensor], budget: float, metric: str,
) -> tuple[dict[str, list[int]], int]:
    """Keep the top-1 score of every group plus the ``n`` globally largest scores, with ``n`` the
    largest count whose cost ratio is <= ``budget`` (0 when even one channel per group exceeds it).
    Cost only grows with ``n``, so ``n`` is found by bisection. Returns (keep, n)."""
    import torch

    from pruneshot.models.cost import cost

    groups = list(scores)
    flat = torch.cat([scores[g] for g in groups])
    owner = [(g, c) for g in groups for c in range(len(scores[g]))]
    order = torch.argsort(-flat, stable=True).tolist()
    forced = {(g, int(torch.argsort(-scores[g], stable=True)[0])) for g in groups}
    dense = cost(model, metric)

    def keep_for(n: int) -> dict[str, list[int]]:
        chosen = set(forced) | {owner[j] for j in order[:n]}
        return {g: sorted(c for gg, c in chosen if gg == g) for g in groups}

    def ratio(n: int) -> float:
        return width_ratio(model, {g: len(i) for g, i in keep_for(n).items()}, metric, dense)

    lo, hi = 0, len(order)  # invariant: ratio(lo) <= budget or lo == 0; ratio(hi + 1) > budget
    if ratio(hi) <= budget:
        return keep_for(hi), hi
    hi -= 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ratio(mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return keep_for(lo), lo


# --- devices: where a search or adapt computes ------------------------------------------------------------------


def compute_device(name: Any) -> torch.device:
    """The torch device a method computes on: ``name`` a device or its name ('cpu', 'cuda', 'cuda:1';
    'auto' = CUDA when available, else the CPU, as ``pretrain.device`` resolves)."""
    import torch

    if isinstance(name, str) and name == "auto":
        from pruneshot.data.pipeline import resolve_device

        return resolve_device("auto")
    return torch.device(name)


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (or buffer); the CPU for a module holding neither."""
    import torch

    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def device_source(data: Any, device: Any) -> Any:
    """Source data as a :class:`pruneshot.data.pipeline.BatchSource` held on ``device`` (what pretraining
    uses): a ``Split`` (x (N, C, H, W) normalised float32, y (N,) int64) is moved there (not copied when
    already there); a BatchSource must already be there. ``source.batch(idx)`` with CPU-drawn indices
    then gives ``(x[idx], y[idx])`` on ``device``, bit for bit the rows of the split."""
    from pruneshot.data.pipeline import BatchSource

    device = compute_device(device)
    if isinstance(data, BatchSource):
        if data.device != device:
            raise ValueError(f"source data are on {data.device}, the computation on {device}")
        return data
    return BatchSource.from_split(data, device=device)


def to_cpu(model: Any) -> Any:
    """``model`` (an nn.Module, or None) moved in place to the CPU, its dtype kept (the job's: float32, or
    float64 under ``transfer.dtype: float64``): what a search or adapt returns, whatever device it
    computed on. A no-op for a CPU model."""
    return None if model is None else model.to("cpu")
