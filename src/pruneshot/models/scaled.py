"""The network wrapper of channel scaling (:mod:`pruneshot.methods.channel_scaling`): a trainable scale on
every channel group, applied where the group's consumers read it; a torch module, so it lives here with
the other layers rather than in the method's module (the method registry is read without torch).
:class:`StackedChannelScaled` is K of them trained at once (a chunk of episodes, ``adapt_batch``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn


class ChannelScaled(nn.Module):
    """``net`` with a per-channel scale on every channel group, applied to the input of the group's
    consumer (``net.group_consumers()``). The effective scale is ``scales[g] * mask_g``; a removed
    channel has mask 0 and scale 0. The hooks exist only during ``forward``, so the wrapped network
    and copies of this module stay plain."""

    def __init__(self, net: nn.Module, scales: dict[str, torch.Tensor] | None = None,
                 masks: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        self.net = net
        sizes = net.channel_groups()
        first = next(net.parameters())
        dev, dtype = first.device, first.dtype  # float32 networks: float32 scales, as always
        self.scales = nn.ParameterDict({
            g: nn.Parameter(torch.ones(n, device=dev, dtype=dtype) if scales is None
                            else scales[g].detach().clone().to(dev, dtype))
            for g, n in sizes.items()})
        for g, n in sizes.items():
            self.register_buffer(f"mask_{g}", torch.ones(n, device=dev, dtype=dtype) if masks is None
                                 else masks[g].detach().clone().to(dev, dtype))

    @property
    def spec(self) -> dict[str, Any]:
        return self.net.spec

    @property
    def classifier(self) -> nn.Module:
        return self.net.classifier

    def channel_groups(self) -> dict[str, int]:
        return self.net.channel_groups()

    def mask_points(self) -> dict[str, list[nn.Module]]:
        """The wrapped network's mask points (channel masks there are redundant with zero scales)."""
        return self.net.mask_points()

    def mask(self, group: str) -> torch.Tensor:
        return getattr(self, f"mask_{group}")

    def effective(self, group: str) -> torch.Tensor:
        return self.scales[group] * self.mask(group)

    @torch.no_grad()
    def remove(self, group: str, idx: list[int]) -> None:
        """Remove channels ``idx`` of ``group``: mask 0 and scale 0."""
        t = torch.as_tensor(idx, dtype=torch.long)
        self.mask(group)[t] = 0.0
        self.scales[group][t] = 0.0

    @torch.no_grad()
    def rezero(self) -> None:
        for g in self.scales:
            self.scales[g].mul_(self.mask(g))

    def _hook(self, group: str) -> Callable:
        return _scale_hook(lambda: self.effective(group))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        consumers = self.net.group_consumers()
        handles = [m.register_forward_pre_hook(self._hook(g)) for g in self.scales for m in consumers[g]]
        try:
            return self.net(x)
        finally:
            for h in handles:
                h.remove()

    def keep(self) -> dict[str, list[int]]:
        return {g: torch.nonzero(self.mask(g) > 0).flatten().tolist() for g in self.scales}

    @torch.no_grad()
    def fold(self) -> tuple[nn.Module, dict[str, list[int]]]:
        """The physically pruned network (``net.pruned(keep)``, each kept channel's scale multiplied
        into its consumer's input weights) and the kept channel indices."""
        keep = self.keep()
        physical = self.net.pruned({g: torch.tensor(i, dtype=torch.long) for g, i in keep.items()})
        consumers = physical.group_consumers()
        for g, idx in keep.items():
            for consumer in consumers[g]:
                w = consumer.weight
                scale = self.effective(g).detach()[torch.tensor(idx, dtype=torch.long)].to(w.device, w.dtype)
                w.mul_(scale.view((1, -1) + (1,) * (w.dim() - 2)))
        return physical.eval(), keep


def _scale_hook(effective: Callable[[], torch.Tensor]) -> Callable:
    """A forward pre-hook multiplying its module's input channels (dim 1) by ``effective()`` (flattened)."""

    def hook(_m: nn.Module, args: tuple) -> tuple:
        x = args[0]
        scale = effective().reshape(-1).to(x.dtype)
        return (x * scale.view((1, -1) + (1,) * (x.dim() - 2)), *args[1:])

    return hook


class StackedChannelScaled(nn.Module):
    """K :class:`ChannelScaled` networks of one architecture as one channel-stacked network
    (:func:`pruneshot.batching.stack_networks`: network k owns channels [k*C, (k+1)*C) of every layer, its head
    is slice k of a batched head). The stacked body is frozen; ``scales[g]`` and the masks are (K, C_g),
    row k network k's, and each consumer of group g reads its K*C_g input channels multiplied by the
    rows side by side: elementwise what K separate ChannelScaled networks compute. Input
    (B, K*C_in, H, W) channel-stacked (``batching.channel_stack``), output logits (B, K, ways)."""

    def __init__(self, nets: Sequence[nn.Module]) -> None:
        from pruneshot.batching import stack_networks

        super().__init__()
        self.k = len(nets)
        self.net = stack_networks(nets).requires_grad_(False)
        sizes = nets[0].channel_groups()
        first = next(self.net.parameters())
        dev, dtype = first.device, first.dtype
        self.scales = nn.ParameterDict({g: nn.Parameter(torch.ones(self.k, n, device=dev, dtype=dtype))
                                        for g, n in sizes.items()})
        for g, n in sizes.items():
            self.register_buffer(f"mask_{g}", torch.ones(self.k, n, device=dev, dtype=dtype))

    def head_parameters(self) -> list[nn.Parameter]:
        """The K heads, stacked: weight (K, ways, C) and bias (K, ways)."""
        return list(self.net.classifier.parameters())

    def mask(self, group: str) -> torch.Tensor:
        return getattr(self, f"mask_{group}")

    def effective(self, group: str) -> torch.Tensor:
        """(K, C_g): every network's scales times its mask."""
        return self.scales[group] * self.mask(group)

    @torch.no_grad()
    def remove(self, k: int, group: str, idx: list[int]) -> None:
        """Remove channels ``idx`` of ``group`` in network ``k``: mask 0 and scale 0."""
        t = torch.as_tensor(idx, dtype=torch.long)
        self.mask(group)[k, t] = 0.0
        self.scales[group][k, t] = 0.0

    @torch.no_grad()
    def rezero(self) -> None:
        for g in self.scales:
            self.scales[g].mul_(self.mask(g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        consumers = self.net.group_consumers()
        handles = [m.register_forward_pre_hook(_scale_hook(lambda g=g: self.effective(g)))
                   for g in self.scales for m in consumers[g]]
        try:
            return self.net(x)
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def episode(self, k: int, net: nn.Module) -> ChannelScaled:
        """Network ``k`` as its own frozen :class:`ChannelScaled`: ``net`` (that network's body, as stacked)
        gets head ``k`` in place, wrapped with row ``k`` of the scales and masks."""
        head = self.net.classifier
        net.classifier.weight.copy_(head.weight[k])
        if net.classifier.bias is not None:
            net.classifier.bias.copy_(head.bias[k])
        scaled = ChannelScaled(net, scales={g: s[k] for g, s in self.scales.items()},
                               masks={g: self.mask(g)[k] for g in self.scales})
        return scaled.requires_grad_(False).eval()
