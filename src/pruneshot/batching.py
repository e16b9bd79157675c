"""Batched episodes: K networks' fine-tuning as one stacked network.

Fine-tuning one 5-way episode at batch 5-25 is launch-bound on a GPU: every step is hundreds of
tiny kernels plus a per-parameter optimiser update. :func:`finetune_batched` trains K networks of one
architecture (K episodes, or an episode's several networks) as one *channel-stacked* network: network
k's channels are channels [k*C, (k+1)*C) of every layer, so a conv becomes one grouped conv
(``groups`` x K, weights concatenated), a BatchNorm one BatchNorm over K*C channels, ReLU, pooling and
residual additions act channel-wise as they are, and the classifier is a batched matrix product
(K, ways, C). One forward, one backward and one SGD update per stacked parameter move all K networks.

What stays per network, exactly as :func:`pruneshot.training.finetune_episode` does it for one: its
own generator (seeded with its own seed, on the CPU) draws its mini-batches and augmentation in the
same order; its own loss (mean over its own batch; the stacked loss is their sum, so each network's
gradient is its own loss's); its own momentum buffers; BatchNorm frozen (eval) or normalising with
its own batch statistics (train mode: per channel, hence per network). The update arithmetic is
elementwise and identical, so the only difference from training the networks one by one is how the
stacked layers sum (grouped conv, batched matmul): in float64 the weights agree to rounding and every
accuracy is identical (tests/test_batching.py); in float32 the tolerance accepted is stated there.

Why not ``torch.func.vmap``: a vmapped ``grad_and_value`` over stacked parameters gives the same
numbers, but its batching rules for max-pooling and eval-mode BatchNorm (per-network statistics)
made it 0.5-0.65x the speed of one network at a time on the CPU (small_cnn, K = 4-16); the grouped
conv itself costs the same as K plain convs. ``transfer.episode_batch: 1`` never calls this module:
the sequential engine stays the reference.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pruneshot.data.pipeline import Augment, crop_flip, draw_augmentation

#: episode_batch 'auto' on a GPU: at most this many networks per chunk, and at most this share of
#: the device's free memory for one chunk's estimated working set.
AUTO_MAX = 64
AUTO_MEMORY_SHARE = 0.5
#: Leaf modules a stacked network may contain besides Conv2d, BatchNorm2d and the classifier: they act
#: on each channel alone (or on nothing), so K networks' channels side by side stay independent.
CHANNELWISE = (nn.ReLU, nn.ReLU6, nn.Identity, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten)


def architecture(model: nn.Module) -> tuple[tuple[str, tuple[int, ...], torch.dtype], ...]:
    """What must agree for two networks to be stacked: every parameter's and buffer's name, shape, dtype."""
    return tuple((k, tuple(v.shape), v.dtype) for k, v in model.state_dict().items())


def groups_by_architecture(models: Sequence[nn.Module]) -> list[list[int]]:
    """Indices of ``models`` grouped by identical architecture (state-dict names and shapes), in
    first-seen order; each group can be trained by one :func:`finetune_batched` call."""
    groups: dict[Any, list[int]] = {}
    for i, m in enumerate(models):
        groups.setdefault(architecture(m), []).append(i)
    return list(groups.values())


def stackable(model: nn.Module) -> bool:
    """Whether ``model`` can be channel-stacked: its only leaf modules are Conv2d (no padding mode other
    than zeros), BatchNorm2d, channel-wise ones (:data:`CHANNELWISE`) and a Linear ``classifier``."""
    classifier = getattr(model, "classifier", None)
    if not isinstance(classifier, nn.Linear):
        return False
    for m in model.modules():
        if list(m.children()) or m is classifier:
            continue
        if isinstance(m, nn.Conv2d) and m.padding_mode == "zeros":
            continue
        if not isinstance(m, (nn.BatchNorm2d, *CHANNELWISE)):
            return False
    return True


class _StackedLinear(nn.Module):
    """K linear heads side by side: (B, K*C) -> (B, K, ways); weight (K, ways, C), bias (K, ways)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = None if bias is None else nn.Parameter(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, _ways, c = self.weight.shape
        out = torch.bmm(x.reshape(x.shape[0], k, c).transpose(0, 1), self.weight.transpose(1, 2)).transpose(0, 1)
        return out if self.bias is None else out + self.bias


def stack_networks(models: Sequence[nn.Module]) -> nn.Module:
    """One network computing all of ``models`` (one architecture, :func:`stackable`) side by side on
    channel-stacked input (B, K*C_in, H, W) -> logits (B, K, ways). Parameters and buffers are new
    tensors (concatenated along the output channels; the classifier stacked)."""
    k = len(models)
    net = copy.deepcopy(models[0])
    states = [dict(m.named_parameters()) | dict(m.named_buffers()) for m in models]
    for name, mod in net.named_modules():
        prefix = f"{name}." if name else ""
        if mod is net.classifier:
            continue
        if isinstance(mod, nn.Conv2d):
            mod.in_channels, mod.out_channels, mod.groups = mod.in_channels * k, mod.out_channels * k, mod.groups * k
        elif isinstance(mod, nn.BatchNorm2d):
            mod.num_features *= k
        for pname, p in list(mod._parameters.items()):
            if p is not None:
                mod._parameters[pname] = nn.Parameter(torch.cat([s[prefix + pname].detach() for s in states]),
                                                      requires_grad=p.requires_grad)
        for bname, b in list(mod._buffers.items()):
            if b is not None and b.dim() > 0:  # num_batches_tracked (a scalar) stays as it is
                mod._buffers[bname] = torch.cat([s[prefix + bname] for s in states]).clone()
    head = [m.classifier for m in models]
    net.classifier = _StackedLinear(torch.stack([h.weight.detach() for h in head]),
                                    None if head[0].bias is None else torch.stack([h.bias.detach() for h in head]))
    net.classifier.requires_grad_(head[0].weight.requires_grad)
    return net


def _unstack(net: nn.Module, models: Sequence[nn.Module]) -> None:
    """Copy the stacked network's parameters back into each of ``models`` (in place)."""
    stacked = dict(net.named_parameters())
    with torch.no_grad():
        for i, m in enumerate(models):
            for name, p in m.named_parameters():
                s = stacked[name]
                p.copy_(s[i] if name.startswith("classifier.") else s[i * len(p):(i + 1) * len(p)])


def channel_stack(x: torch.Tensor) -> torch.Tensor:
    """(K, B, C, H, W) -> (B, K*C, H, W): network k's input in channels [k*C, (k+1)*C)."""
    k, b, c, h, w = x.shape
    return x.transpose(0, 1).reshape(b, k * c, h, w)


def draw_batches(x_all: torch.Tensor, y_all: torch.Tensor, gens: Sequence[torch.Generator],
                 batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One step's mini-batch of each of K networks: ``x_all`` (K, N, ...) and ``y_all`` (K, N) -> (K, B, ...)
    and (K, B). When N > ``batch_size``, network k's B = ``batch_size`` rows are the first of a permutation
    drawn from its own generator ``gens[k]`` on the CPU (then moved), exactly the draw a one-network loop
    makes; otherwise every row (no draw)."""
    n = y_all.shape[1]
    if n <= batch_size:
        return x_all, y_all
    idx = torch.stack([torch.randperm(n, generator=g)[:batch_size] for g in gens]).to(x_all.device)
    return x_all[torch.arange(len(gens), device=x_all.device)[:, None], idx], torch.gather(y_all, 1, idx)


def finetune_batched(
    models: Sequence[nn.Module], support_x: Sequence[torch.Tensor], support_y: Sequence[torch.Tensor], *,
    seeds: Sequence[int], arm: str, steps: int, lr: float, momentum: float, weight_decay: float, batch_size: int,
    augment: Augment | None = None, fill: float = 0.0, batch_norm: str = "frozen",
    on_step: Callable[[int], None] | None = None,
) -> list[nn.Module]:
    """Fine-tune each of ``models`` on its own support set, all at once; the same arguments and result
    as calling :func:`pruneshot.training.finetune_episode` once per network (``seeds[i]`` for network i),
    up to the summation order of the stacked layers (module docstring).

    ``models``: K networks of one architecture (``groups_by_architecture``), each :func:`stackable`,
    heads already ``ways``-way, on one device; trained in place and returned. ``support_x[i]``
    (N, C, H, W) and ``support_y[i]`` (N,) on that device, N the same for all. Raises
    FloatingPointError when any network's loss became non-finite (the cell fails, as it would one
    network at a time); its ``networks`` attribute lists the indices of those networks.

    ``on_step(k)``: finetune_episode's contract for all K networks at once: called before the first
    step (k = 0) and after every step k, when each of ``models`` holds exactly the weights its own
    k-step run would (:func:`_write_back`, only when ``on_step`` is given: without it the networks are
    written once, at the end); it may evaluate them, whose train/eval mode is restored after it, and
    must not draw from the global RNG or change weights (the training goes on from the stacked copy,
    so a change to a network's parameters would be overwritten, not trained on)."""
    if not models:
        return []
    if arm not in ("finetune", "linear_probe"):
        raise ValueError(f"unknown transfer arm {arm!r}; allowed: finetune, linear_probe")
    if batch_norm not in ("frozen", "batch"):
        raise ValueError(f"unknown batch_norm {batch_norm!r}; allowed: frozen, batch")
    if len({architecture(m) for m in models}) != 1 or not stackable(models[0]):
        raise ValueError("finetune_batched: the networks differ in architecture or cannot be channel-stacked")
    if not (len(models) == len(support_x) == len(support_y) == len(seeds)):
        raise ValueError("finetune_batched: models, support sets and seeds differ in number")
    n = len(support_y[0])
    if any(len(y) != n for y in support_y):
        raise ValueError("finetune_batched: the support sets differ in size")
    k = len(models)
    device = support_x[0].device
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    augmenting = augment is not None and augment.active
    # linear_probe without augmentation: the frozen body maps each support image to the same features
    # at every step; computed once per network and only the heads train (finetune_episode's cache).
    cached = arm == "linear_probe" and not augmenting and steps > 0 and batch_norm == "frozen"
    if cached:
        with torch.no_grad():
            x_all = torch.stack([m.eval().forward_features(x) for m, x in zip(models, support_x, strict=True)])
        head = [m.classifier for m in models]
        net: nn.Module = _StackedLinear(torch.stack([h.weight.detach() for h in head]).clone(),
                                        None if head[0].bias is None else torch.stack([h.bias.detach() for h in head]))
    else:
        x_all = torch.stack(list(support_x))  # (K, N, C, H, W)
        net = stack_networks(models)
        if arm == "linear_probe":
            net.requires_grad_(False)
            net.classifier.requires_grad_(True)
    y_all = torch.stack(list(support_y))  # (K, N)
    net.train(batch_norm == "batch")
    params = [p for p in net.parameters() if p.requires_grad]
    buffers: list[torch.Tensor | None] = [None] * len(params)
    finite = torch.ones(k, dtype=torch.bool, device=device)

    def notify(step: int) -> None:  # finetune_episode's notify, for K networks
        if on_step is not None:
            _write_back(net, models, cached, batch_norm)
            on_step(step)
            for m in models:
                m.train(batch_norm == "batch")

    notify(0)
    for step in range(steps):
        xb, yb = draw_batches(x_all, y_all, gens, batch_size)
        b = yb.shape[1]
        if augmenting:
            draws = [draw_augmentation(b, augment, g) for g in gens]
            offsets = torch.cat([d[0] for d in draws]) if draws[0][0] is not None else None
            flips = torch.cat([d[1] for d in draws]) if draws[0][1] is not None else None
            xb = crop_flip(xb.flatten(0, 1), offsets, flips, augment.crop_padding, fill=fill).view(xb.shape)
        logits = net(xb.transpose(0, 1).reshape(b, -1) if cached else channel_stack(xb))  # (B, K, ways)
        losses = F.cross_entropy(logits.transpose(0, 1).reshape(k * b, -1), yb.reshape(k * b),
                                 reduction="none").view(k, b).mean(1)
        finite &= torch.isfinite(losses.detach())
        for p in params:
            p.grad = None
        losses.sum().backward()
        with torch.no_grad():  # pruneshot.training.SGD, elementwise on the stacked tensors
            for i, p in enumerate(params):
                g = p.grad.add(p, alpha=weight_decay) if weight_decay else p.grad
                if momentum:
                    if buffers[i] is None:
                        buffers[i] = g.detach().clone()
                    else:
                        buffers[i].mul_(momentum).add_(g)
                    g = buffers[i]
                p.add_(g, alpha=-lr)
        notify(step + 1)
    if not bool(finite.all()):
        bad = [i for i, ok in enumerate(finite.tolist()) if not ok]
        err = FloatingPointError(f"{arm}: the fine-tuning loss became non-finite within {steps} steps (lr {lr}) "
                                 f"for network(s) {bad} of the chunk; the cell is recorded as failed")
        err.networks = bad
        raise err
    _write_back(net, models, cached, batch_norm)
    return list(models)


def _write_back(net: nn.Module, models: Sequence[nn.Module], cached: bool, batch_norm: str) -> None:
    """Each network's current weights from :func:`finetune_batched`'s stacked ``net`` into ``models`` (in
    place): every parameter (:func:`_unstack`), or with ``cached`` features (``net`` the stacked heads
    only) each head; then each network in the mode finetune_episode leaves it in (train mode only for
    ``batch_norm`` 'batch'). Buffers are not copied: frozen BatchNorm's never change, and the reinit
    arm's running statistics are set from the support set by the caller (support_bn_statistics)."""
    if cached:
        with torch.no_grad():
            for i, m in enumerate(models):
                m.classifier.weight.copy_(net.weight[i])
                if m.classifier.bias is not None:
                    m.classifier.bias.copy_(net.bias[i])
    else:
        _unstack(net, models)
    for m in models:
        m.train(batch_norm == "batch")


def auto_episode_batch(model: nn.Module, support_x: torch.Tensor, device: torch.device, episodes: int) -> int:
    """``transfer.episode_batch: auto``: 1 on the CPU (compute-bound already, and the sequential engine
    stays the bit-for-bit reference); on CUDA the most networks (at most :data:`AUTO_MAX` and
    ``episodes``) whose estimated working set (parameters x 4: weights, gradients, momentum, the
    stack's copy; plus activations x 3 of one forward of ``support_x`` (N, C, H, W), measured by
    forward hooks) fits :data:`AUTO_MEMORY_SHARE` of the device's free memory."""
    if device.type != "cuda":
        return 1
    sizes: list[int] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: sizes.append(out.numel() * out.element_size()))
             for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model.to(device).eval()(support_x.to(device))
    finally:
        for h in hooks:
            h.remove()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    per_network = 4 * params + 3 * sum(sizes)
    free, _total = torch.cuda.mem_get_info(device)
    return max(1, min(AUTO_MAX, episodes, math.floor(AUTO_MEMORY_SHARE * free / max(1, per_network))))


def resolve_episode_batch(setting: int | str, model: nn.Module, support_x: torch.Tensor, device: torch.device,
                          episodes: int) -> int:
    """The chunk size K of ``transfer.episode_batch`` (an int >= 1, or 'auto': :func:`auto_episode_batch`)."""
    if setting == "auto":
        return auto_episode_batch(model, support_x, device, episodes)
    k = int(setting)
    if k < 1:
        raise ValueError(f"transfer.episode_batch must be >= 1 or 'auto', got {setting!r}")
    return k
