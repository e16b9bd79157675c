"""Backbones, built from a JSON architecture spec (no pickled modules anywhere).

A spec is a plain dict, e.g. ``{"name": "small_cnn", "in_channels": 1, "input_size": 8,
"widths": [32, 64, 128], "num_classes": 5}``. A physically pruned network is the
same backbone with a spec of smaller widths and, after basis pruning, an optional
``"ranks"`` list (one int or null per block; a block with rank r is a ``LowRankConv``).
Each backbone names its channel groups (units that are kept or removed together),
knows how to slice itself, where each group is consumed, and its cost from the spec alone.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from pruneshot.models.layers import Layer, check_rank, input_conv, output_conv

BACKBONES: dict[str, type] = {}


def register_backbone(name: str) -> Callable:
    """Class decorator adding a backbone class to the registry under ``name``."""

    def wrap(cls: type) -> type:
        BACKBONES[name] = cls
        return cls

    return wrap


def _backbone_class(name: Any) -> type:
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; allowed: {', '.join(BACKBONES)}") from None


def build_model(spec: dict[str, Any]) -> nn.Module:
    """Instantiate the backbone described by ``spec``."""
    return _backbone_class(spec.get("name")).from_spec(spec)


def build_seeded(spec: dict[str, Any], seed: int) -> nn.Module:
    """The architecture ``spec`` freshly initialised under ``seed``; the global RNG state is left as it was."""
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        return build_model(spec)
    finally:
        torch.random.set_rng_state(state)


def backbone_spec(backbone: dict[str, Any], in_channels: int, input_size: int, num_classes: int) -> dict[str, Any]:
    """The architecture spec of the configured ``backbone`` section (``name`` plus its options) for
    inputs (in_channels, input_size, input_size) and ``num_classes`` outputs."""
    options = {k: v for k, v in backbone.items() if k != "name"}
    return _backbone_class(backbone["name"]).default_spec(options, in_channels, input_size, num_classes)


class Backbone(nn.Module):
    """Base of every backbone: a network described by its spec's layer table (``layer_table``).

    Subclasses build their modules from the table (``make_conv``), and define ``layer_table(spec)``,
    ``head_group(spec)`` (the group the classifier reads), ``with_widths(spec, widths)``,
    ``with_ranks(spec, ranks)``, ``default_spec(options, ...)`` and ``forward_features``. Everything
    pruning needs is derived here from the table: channel groups (channels kept or removed together:
    residual additions tie every conv writing to the same stream into one group, a depthwise conv
    follows its input group), their producers, BatchNorms, mask points and consumers, physical
    slicing and costs from shapes alone."""

    spec: dict[str, Any]
    classifier: nn.Linear

    # --- per backbone -----------------------------------------------------
    @classmethod
    def layer_table(cls, spec: dict[str, Any]) -> list[Layer]:
        raise NotImplementedError

    @classmethod
    def head_group(cls, spec: dict[str, Any]) -> str:
        raise NotImplementedError

    @classmethod
    def with_widths(cls, spec: dict[str, Any], widths: dict[str, int]) -> dict[str, Any]:
        """``spec`` with the named groups' widths replaced (dict-of-groups specs)."""
        out = copy.deepcopy(spec)
        unknown = sorted(set(widths) - set(out["widths"]))
        if unknown:
            raise ValueError(f"{spec['name']}: unknown channel group(s) {unknown}")
        out["widths"].update({g: int(w) for g, w in widths.items()})
        return out

    @classmethod
    def with_ranks(cls, spec: dict[str, Any], ranks: dict[str, int | None]) -> dict[str, Any]:
        """``spec`` with the named layers' ranks replaced (None: plain conv); others keep theirs."""
        out = copy.deepcopy(spec)
        names = [ly.name for ly in cls.layer_table(out) if not ly.depthwise]
        unknown = sorted(set(ranks) - set(names))
        if unknown:
            raise ValueError(f"{spec['name']}: unknown or depthwise layer(s) {unknown}")
        new = dict(out.pop("ranks", None) or {})
        for name, r in ranks.items():
            check_rank(r, spec["name"])
            if r is None:
                new.pop(name, None)
            else:
                new[name] = int(r)
        if new:
            out["ranks"] = {n: new[n] for n in names if n in new}
        return out

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> Backbone:
        raise NotImplementedError

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))

    # --- derived ----------------------------------------------------------
    @classmethod
    def spec_cost(cls, spec: dict[str, Any], metric: str) -> int:
        """Params or FLOPs of the network ``spec`` describes, from shapes alone (no network is built);
        equals ``metrics.cost(build_model(spec), metric)``."""
        if metric not in ("params", "flops"):
            raise ValueError(f"unknown budget metric {metric!r}; allowed: params, flops")
        total = sum(ly.cost(metric) for ly in cls.layer_table(spec))
        c, n = cls.group_sizes(spec)[cls.head_group(spec)], spec["num_classes"]
        return total + (c * n + n if metric == "params" else 2 * c * n)

    @classmethod
    def group_sizes(cls, spec: dict[str, Any]) -> dict[str, int]:
        """Every channel group's width, in order of first appearance."""
        out: dict[str, int] = {}
        for ly in cls.layer_table(spec):
            if out.setdefault(ly.out_group, ly.c_out) != ly.c_out:
                raise ValueError(f"{spec['name']}: group {ly.out_group!r} has inconsistent widths")
        return out

    def layers(self) -> list[Layer]:
        """The layer table of this network's spec."""
        return self.layer_table(self.spec)

    def layer(self, name: str) -> Layer:
        for ly in self.layers():
            if ly.name == name:
                return ly
        raise KeyError(f"{self.spec['name']}: no layer {name!r}")

    def get_conv(self, name: str) -> nn.Module:
        return self.get_submodule(self.layer(name).conv)

    def set_conv(self, name: str, module: nn.Module) -> None:
        """Replace the conv slot of layer ``name`` (e.g. by a basis-scaling layer)."""
        parent, _, attr = self.layer(name).conv.rpartition(".")
        setattr(self.get_submodule(parent) if parent else self, attr, module)

    def layer_geometry(self) -> dict[str, Layer]:
        """Layers by name (shapes, kernel, output pixels)."""
        return {ly.name: ly for ly in self.layers()}

    def channel_groups(self) -> dict[str, int]:
        """Prunable groups and their sizes."""
        return self.group_sizes(self.spec)

    def group_convs(self) -> dict[str, list[nn.Module]]:
        """Per group, the (output) convs of the layers that produce its channels, depthwise ones
        excepted (for magnitude criteria; a group tied by residual additions has several)."""
        out: dict[str, list[nn.Module]] = {g: [] for g in self.channel_groups()}
        for ly in self.layers():
            if not ly.depthwise:
                out[ly.out_group].append(output_conv(self.get_submodule(ly.conv)))
        return out

    def group_bns(self) -> dict[str, list[nn.BatchNorm2d]]:
        """Per group, the BatchNorm of every layer writing its channels (depthwise ones included)."""
        out: dict[str, list[nn.BatchNorm2d]] = {g: [] for g in self.channel_groups()}
        for ly in self.layers():
            if ly.bn is not None:
                out[ly.out_group].append(self.get_submodule(ly.bn))
        return out

    def mask_points(self) -> dict[str, list[nn.Module]]:
        """Modules whose output carries each group's channels; zeroing a channel at every one of its
        group's points == removing it (each is a BatchNorm or an activation after it)."""
        out: dict[str, list[nn.Module]] = {g: [] for g in self.channel_groups()}
        for ly in self.layers():
            out[ly.out_group].append(self.get_submodule(ly.mask))
        return out

    def group_consumers(self) -> dict[str, list[nn.Module]]:
        """Per group, every module whose input channels are the group's channels: the (basis) conv of
        each non-depthwise layer reading it, and the classifier for the head group. Scaling input
        channel c of all of them (``weight[:, c] *= s``) equals scaling the group's channel c where
        it is read (a depthwise conv is not a consumer: its output is still the group)."""
        out: dict[str, list[nn.Module]] = {g: [] for g in self.channel_groups()}
        for ly in self.layers():
            if ly.in_group is not None and not ly.depthwise:
                out[ly.in_group].append(input_conv(self.get_submodule(ly.conv)))
        out[self.head_group(self.spec)].append(self.classifier)
        return out

    def spec_with_widths(self, widths: dict[str, int]) -> dict[str, Any]:
        """Spec of this backbone with each named group's width replaced."""
        return self.with_widths(self.spec, widths)

    def spec_with_ranks(self, ranks: dict[str, int | None]) -> dict[str, Any]:
        """Spec of this backbone with the named layers' ranks replaced (None: plain conv)."""
        return self.with_ranks(self.spec, ranks)

    def pruned(self, keep: dict[str, torch.Tensor]) -> Backbone:
        """Physically pruned copy keeping channel indices ``keep[group]`` (any order; groups not named
        keep all). Low-rank layers keep their rank: outputs slice ``coef``, inputs ``basis``;
        depthwise layers keep the filters of their kept channels."""
        from pruneshot.models.surgery import slice_block_conv, slice_bn, slice_linear_in

        groups = self.channel_groups()
        unknown = sorted(set(keep) - set(groups))
        if unknown:
            raise ValueError(f"unknown channel group(s) {unknown}; this network has {sorted(groups)}")
        keep = {g: torch.as_tensor(sorted(set(map(int, idx))), dtype=torch.long) for g, idx in keep.items()}
        for g, idx in keep.items():
            if len(idx) == 0:
                raise ValueError(f"group {g!r} would keep no channel; keep at least one")
            if idx.min() < 0 or idx.max() >= groups[g]:
                raise ValueError(f"group {g!r}: channel indices must be in [0, {groups[g]})")
        full = {g: keep.get(g, torch.arange(n)) for g, n in groups.items()}
        new = build_model(self.spec_with_widths({g: len(i) for g, i in full.items()}))
        for ly in self.layers():
            in_idx = None if ly.in_group is None else full[ly.in_group]
            slice_block_conv(self.get_submodule(ly.conv), new.get_submodule(ly.conv), full[ly.out_group], in_idx)
            if ly.bn is not None:
                slice_bn(self.get_submodule(ly.bn), new.get_submodule(ly.bn), full[ly.out_group])
        slice_linear_in(self.classifier, new.classifier, full[self.head_group(self.spec)])
        return new

    def reset_classifier(self, num_classes: int, generator: torch.Generator | None = None) -> None:
        """Replace the head with a fresh ``num_classes``-way linear layer (seeded by ``generator``)."""
        head = nn.Linear(self.classifier.in_features, num_classes)
        bound = 1.0 / head.in_features**0.5
        with torch.no_grad():
            head.weight.uniform_(-bound, bound, generator=generator)
            head.bias.uniform_(-bound, bound, generator=generator)
        self.classifier = head
        self.spec["num_classes"] = int(num_classes)


def spec_cost(spec: dict[str, Any], metric: str) -> int:
    """Params or FLOPs of the network ``spec`` describes, without building it."""
    try:
        cls = BACKBONES[spec["name"]]
    except KeyError:
        raise ValueError(f"unknown backbone {spec.get('name')!r}; allowed: {', '.join(BACKBONES)}") from None
    return cls.spec_cost(spec, metric)


def state_dict_for_save(model: nn.Module) -> dict[str, torch.Tensor]:
    """Tensors to store in safetensors (buffers included, shared storage broken)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


#: Key prefix of the further networks a weights file may hold (``variant<i>/``, i >= 1; ``/`` cannot
#: occur in a module's state-dict key): e.g. random's other masks, all of one architecture.
VARIANT_PREFIX = "variant"


def weights_for_save(model: nn.Module, variants: list[nn.Module] = ()) -> dict[str, torch.Tensor]:
    """The tensors of a weights file: ``model``'s under their keys, each variant's under ``variant<i>/``."""
    out = state_dict_for_save(model)
    for i, v in enumerate(variants, start=1):
        out |= {f"{VARIANT_PREFIX}{i}/{k}": t for k, t in state_dict_for_save(v).items()}
    return out


def load_model(weights_path: str, spec: dict[str, Any], variant: int = 0) -> nn.Module:
    """Build the backbone from ``spec`` and load safetensors weights strictly: the file's main network
    (``variant`` 0) or its ``variant``-th further network (see :data:`VARIANT_PREFIX`)."""
    from pruneshot.io import load_tensors

    tensors = load_tensors(weights_path)
    prefix = f"{VARIANT_PREFIX}{variant}/"
    state = ({k: v for k, v in tensors.items() if "/" not in k} if variant == 0
             else {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)})
    if variant and not state:
        raise ValueError(f"{weights_path}: no network {prefix!r} in this weights file")
    model = build_model(spec)
    model.load_state_dict(state, strict=True)
    return model


def variant_count(weights_path: str) -> int:
    """How many networks a weights file holds (1 + its variants)."""
    from pruneshot.io import load_tensors

    prefixes = {k.split("/", 1)[0] for k in load_tensors(weights_path) if "/" in k}
    return 1 + len(prefixes)

