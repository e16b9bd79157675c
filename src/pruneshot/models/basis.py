"""Basis scaling: the layer algebra of Wong et al. 2021 (abstracts and patent claim 1).

A conv W (C_out x C_in x k x k, bias b) is reshaped to M = W.reshape(C_out, -1).T, a
(C_in k^2) x C_out matrix, with thin SVD M = U S V^T and r = min(C_in k^2, C_out). Layer A is a
frozen k x k conv C_in -> r whose filters are the columns of U (original stride, padding and
dilation, no bias); layer B is a 1x1 conv r -> C_out with weight diag(s) S V^T and the original
bias, whose only trainable part is the per-basis scale s (init 1). With s = 1 the pair is the
original conv. Pruning basis i zeroes s_i (masked form); physically, filter i of A and input
channel i of B are dropped and s is folded into B (a ``LowRankConv``), or, where the low-rank form
would not be smaller (kept r' >= k^2 C_in C_out / (k^2 C_in + C_out)), the kept bases are summed
back into one conv of the original shape: W_eff = sum over kept i of s_i S_i V[:, i] U[:, i]^T.

Several episodes of one pretrained network share its decomposition: ``batch_decomposed`` runs K of
them as one network on batch-folded input (one basis conv over all K*B images, per-episode s, masks
and heads), ``unbatch_decomposed`` takes episode k's decomposed network back out.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pruneshot.models.base import BACKBONES, Backbone, build_model, spec_cost
from pruneshot.models.layers import LowRankConv, conv_cost, lowrank_pays


class BasisScalingConv(nn.Module):
    """A conv decomposed into a frozen basis conv ``A`` and a per-basis scaled 1x1 layer B.

    Only ``s`` (shape (r,), init 1) is trainable; ``A``'s weight (the columns of U) has
    ``requires_grad`` False, S, V, the bias and the basis mask are buffers. ``mask`` marks the
    bases still kept; a pruned basis has s_i = 0 and mask_i = 0 (the forward uses s * mask, so a
    pruned basis stays off whatever its optimiser does)."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"BasisScalingConv decomposes an nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(f"BasisScalingConv: only groups == 1 convs can be decomposed (got groups={conv.groups})")
        if conv.padding_mode != "zeros":
            raise ValueError(f"BasisScalingConv: only padding_mode 'zeros' is supported (got {conv.padding_mode!r})")
        w = conv.weight.detach()
        c_out, c_in, kh, kw = w.shape
        m = w.to(torch.float64).reshape(c_out, -1).T  # (C_in k^2, C_out)
        u, sv, vh = torch.linalg.svd(m, full_matrices=False)  # u (C_in k^2, r), sv (r,), vh (r, C_out)
        r = sv.numel()
        self.A = nn.Conv2d(c_in, r, (kh, kw), stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                           bias=False, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            self.A.weight.copy_(u.T.reshape(r, c_in, kh, kw).to(w.dtype))
        self.A.weight.requires_grad_(False)
        self.register_buffer("sv", sv.to(w.dtype))
        self.register_buffer("v", vh.T.contiguous().to(w.dtype))  # (C_out, r)
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().clone())
        self.register_buffer("mask", torch.ones(r, dtype=w.dtype, device=w.device))
        self.s = nn.Parameter(torch.ones(r, dtype=w.dtype, device=w.device))

    # --- shapes ---------------------------------------------------------
    @property
    def in_channels(self) -> int:
        return self.A.in_channels

    @property
    def out_channels(self) -> int:
        return self.v.shape[0]

    @property
    def rank(self) -> int:
        """Number of bases of the full decomposition, r = min(C_in k^2, C_out)."""
        return self.sv.numel()

    @property
    def kernel_size(self) -> tuple[int, int]:
        return tuple(self.A.kernel_size)

    @property
    def input_conv(self) -> nn.Conv2d:
        """The module whose input channels are this layer's input channels (layer A)."""
        return self.A

    def kept(self) -> torch.Tensor:
        """Indices of the bases not pruned, ascending."""
        return torch.nonzero(self.mask > 0).flatten()

    def n_kept(self) -> int:
        return int((self.mask > 0).sum().item())

    def scale(self) -> torch.Tensor:
        """The effective per-basis scale s * mask."""
        return self.s * self.mask

    # --- forward --------------------------------------------------------
    def coef_weight(self) -> torch.Tensor:
        """Layer B's weight diag(s) S V^T as a (C_out, r, 1, 1) 1x1 conv kernel (pruned bases zero)."""
        return (self.v * (self.sv * self.scale())).reshape(self.out_channels, self.rank, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.A(x), self.coef_weight(), self.bias)

    # --- pruning and folding ---------------------------------------------
    @torch.no_grad()
    def prune(self, idx: torch.Tensor | list[int]) -> None:
        """Remove bases ``idx``: s_i = 0 and mask_i = 0 (the masked form)."""
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.mask.device)
        self.mask[idx] = 0.0
        self.s[idx] = 0.0

    @torch.no_grad()
    def rezero(self) -> None:
        """Set s_i = 0 again for pruned bases (after an optimiser step moved them)."""
        self.s.mul_(self.mask)

    def pays(self, rank: int | None = None) -> bool:
        """Whether a LowRankConv keeping ``rank`` bases (default: the kept ones) is smaller than the dense conv."""
        return lowrank_pays(self.in_channels, self.out_channels, self.kernel_size,
                            self.n_kept() if rank is None else rank)

    @torch.no_grad()
    def to_low_rank(self) -> LowRankConv:
        """The physical LowRankConv of the kept bases, s folded into ``coef``."""
        keep = self.kept()
        if keep.numel() == 0:
            raise ValueError("BasisScalingConv: every basis is pruned; keep at least one")
        kh, kw = self.kernel_size
        out = LowRankConv(self.in_channels, self.out_channels, keep.numel(), (kh, kw), stride=self.A.stride,
                          padding=self.A.padding, dilation=self.A.dilation, bias=self.bias is not None)
        out.basis.weight.copy_(self.A.weight[keep])
        out.coef.weight.copy_(self.coef_weight()[:, keep])
        if self.bias is not None:
            out.coef.bias.copy_(self.bias)
        return out

    @torch.no_grad()
    def effective_weight(self) -> torch.Tensor:
        """W_eff = sum over kept i of s_i S_i V[:, i] U[:, i]^T, shaped (C_out, C_in, k, k) (summed in float64)."""
        keep = self.kept()
        u = self.A.weight[keep].to(torch.float64).reshape(keep.numel(), -1)  # (r', C_in k^2): rows are U[:, i]^T
        coef = (self.v * (self.sv * self.scale()))[:, keep].to(torch.float64)  # (C_out, r')
        kh, kw = self.kernel_size
        return (coef @ u).reshape(self.out_channels, self.in_channels, kh, kw).to(self.v.dtype)

    @torch.no_grad()
    def to_dense(self) -> nn.Conv2d:
        """One conv of the original shape with the kept, scaled bases summed back in."""
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, stride=self.A.stride,
                         padding=self.A.padding, dilation=self.A.dilation, bias=self.bias is not None)
        conv.weight.copy_(self.effective_weight())
        if self.bias is not None:
            conv.bias.copy_(self.bias)
        return conv

    @torch.no_grad()
    def embedded(self, in_idx: torch.Tensor, c_in: int, out_idx: torch.Tensor, c_out: int) -> BasisScalingConv:
        """This layer (the decomposition of a channel-sliced conv) placed in a wider one with ``c_in``
        inputs and ``c_out`` outputs: its input channels become ``in_idx``, its outputs ``out_idx``,
        every other input is ignored (zero basis weights) and every other output is zero (zero V rows,
        zero bias). Same bases, S, s and mask: on the kept channels it computes what this layer does."""
        in_idx = torch.as_tensor(in_idx, dtype=torch.long, device=self.v.device)
        out_idx = torch.as_tensor(out_idx, dtype=torch.long, device=self.v.device)
        if len(in_idx) != self.in_channels or len(out_idx) != self.out_channels:
            raise ValueError("embedded: index lists must match this layer's input/output channels")
        new = copy.deepcopy(self)
        a = nn.Conv2d(c_in, self.rank, self.kernel_size, stride=self.A.stride, padding=self.A.padding,
                      dilation=self.A.dilation, bias=False, device=self.v.device, dtype=self.v.dtype)
        a.weight.zero_()
        a.weight[:, in_idx] = self.A.weight
        a.weight.requires_grad_(False)
        new.A = a
        new.v = torch.zeros(c_out, self.rank, dtype=self.v.dtype, device=self.v.device)
        new.v[out_idx] = self.v
        if self.bias is not None:
            new.bias = torch.zeros(c_out, dtype=self.bias.dtype, device=self.bias.device)
            new.bias[out_idx] = self.bias
        return new

    def fold(self, revert_when_larger: bool = True) -> nn.Module:
        """The physical layer: a LowRankConv of the kept bases, or (``revert_when_larger`` and the
        low-rank form not smaller) a dense conv of the original shape."""
        if revert_when_larger and not self.pays():
            return self.to_dense()
        return self.to_low_rank()



class BatchedBasisScalingConv(nn.Module):
    """K episodes' copies of one BasisScalingConv, computed at once on batch-folded input.

    Input (K*B, C_in, H, W), episode k's B images in rows [k*B, (k+1)*B). The frozen basis conv ``A``,
    S, V and the bias are the decomposition's and shared by every episode (one conv over all K*B
    images); only the scales ``s`` (K, r) and the masks (K, r) are per episode, and layer B is a batched
    1x1 product with episode k's weight diag(s_k * mask_k) S V^T. On episode k's rows it computes what
    the BasisScalingConv with s = s[k] and mask = mask[k] computes (up to the summation order)."""

    def __init__(self, layer: BasisScalingConv, k: int) -> None:
        super().__init__()
        self.k = k
        self.A = layer.A
        self.register_buffer("sv", layer.sv)
        self.register_buffer("v", layer.v)
        self.register_buffer("bias", layer.bias)
        self.register_buffer("mask", layer.mask.detach().expand(k, -1).clone())
        self.s = nn.Parameter(layer.s.detach().expand(k, -1).clone())

    @property
    def rank(self) -> int:
        return self.sv.numel()

    def coef(self) -> torch.Tensor:
        """Every episode's layer-B weight diag(s_k * mask_k) S V^T, shaped (K, C_out, r)."""
        return self.v * (self.sv * (self.s * self.mask))[:, None, :]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.A(x)
        kb, r, h, w = z.shape
        out = torch.matmul(self.coef()[:, None], z.reshape(self.k, kb // self.k, r, h * w))  # (K, B, C_out, h*w)
        out = out.view(kb, -1, h, w)
        return out if self.bias is None else out + self.bias.view(1, -1, 1, 1)

    @torch.no_grad()
    def prune(self, episode: int, idx: torch.Tensor | list[int]) -> None:
        """Remove bases ``idx`` of ``episode``: its s_i = 0 and mask_i = 0 (``BasisScalingConv.prune``)."""
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.mask.device)
        self.mask[episode, idx] = 0.0
        self.s[episode, idx] = 0.0

    @torch.no_grad()
    def rezero(self) -> None:
        """Set s_i = 0 again for every episode's pruned bases (after an optimiser step moved them)."""
        self.s.mul_(self.mask)

    @torch.no_grad()
    def load_into(self, layer: BasisScalingConv, episode: int) -> None:
        """Copy ``episode``'s scales and mask into ``layer`` (a copy of the decomposed layer)."""
        layer.s.copy_(self.s[episode])
        layer.mask.copy_(self.mask[episode])


class BatchedLinear(nn.Module):
    """K episodes' linear heads on batch-folded features: (K*B, C) -> logits (K, B, ways), episode k's
    rows through head k; weight (K, ways, C), bias (K, ways)."""

    def __init__(self, heads: list[nn.Linear]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.stack([h.weight.detach() for h in heads]))
        self.bias = None if heads[0].bias is None else nn.Parameter(torch.stack([h.bias.detach() for h in heads]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, _ways, c = self.weight.shape
        out = torch.bmm(x.reshape(k, -1, c), self.weight.transpose(1, 2))
        return out if self.bias is None else out + self.bias[:, None]

    @torch.no_grad()
    def load_into(self, head: nn.Linear, episode: int) -> None:
        """Copy head ``episode`` into ``head`` (an nn.Linear of the same shape)."""
        head.weight.copy_(self.weight[episode])
        if head.bias is not None:
            head.bias.copy_(self.bias[episode])

# --- networks ---------------------------------------------------------------


def basis_layer_names(model: nn.Module) -> list[str]:
    """The layers basis scaling decomposes: every conv except depthwise ones, in table order."""
    return [ly.name for ly in model.layers() if not ly.depthwise]


def decompose(model: Backbone) -> Backbone:
    """A copy of ``model`` whose convs (depthwise ones excepted) are BasisScalingConv layers (s = 1)."""
    if not isinstance(model, Backbone):
        raise NotImplementedError(f"basis scaling: no decomposition defined for {type(model).__name__}")
    if model.spec.get("ranks"):
        raise NotImplementedError("basis scaling: the network already has low-rank layers; decompose a plain one")
    out = copy.deepcopy(model)
    for name in basis_layer_names(out):
        out.set_conv(name, BasisScalingConv(out.get_conv(name)))
    return out.eval()


def basis_layers(model: nn.Module) -> dict[str, BasisScalingConv]:
    """The BasisScalingConv of each decomposed layer, by layer name."""
    layers = {name: model.get_conv(name) for name in basis_layer_names(model)}
    bad = [g for g, m in layers.items() if not isinstance(m, BasisScalingConv)]
    if bad:
        raise ValueError(f"layers {bad} are not decomposed (use basis.decompose)")
    return layers



def batch_decomposed(masked: Backbone, heads: list[nn.Linear]) -> Backbone:
    """K = len(``heads``) episodes of the decomposed network ``masked`` (eval mode; its classifier is
    replaced) as one network on batch-folded input: (K*B, C, H, W), episode k's images in rows
    [k*B, (k+1)*B), -> logits (K, B, ways). Each BasisScalingConv becomes a BatchedBasisScalingConv
    (its s and mask repeated per episode), the classifier a BatchedLinear of ``heads``; every other
    module (frozen, BatchNorm in eval mode) acts on each image alone and is shared as it is."""
    net = copy.deepcopy(masked)
    for g, layer in basis_layers(net).items():
        net.set_conv(g, BatchedBasisScalingConv(layer, len(heads)))
    net.classifier = BatchedLinear(heads)
    return net.eval()


def batched_layers(net: nn.Module) -> dict[str, BatchedBasisScalingConv]:
    """The BatchedBasisScalingConv of each decomposed layer of a ``batch_decomposed`` network, by layer name."""
    return {name: net.get_conv(name) for name in basis_layer_names(net)}


def unbatch_decomposed(net: nn.Module, masked: Backbone, episode: int) -> Backbone:
    """Episode ``episode`` of the ``batch_decomposed`` network ``net``: a copy of ``masked`` (what it was
    built from) with that episode's scales, masks and head."""
    out = copy.deepcopy(masked)
    for g, layer in basis_layers(out).items():
        net.get_conv(g).load_into(layer, episode)
    net.classifier.load_into(out.classifier, episode)
    return out


def physical_ranks(model: nn.Module, kept: dict[str, int], revert_when_larger: bool) -> dict[str, int | None]:
    """Per layer, the physical rank for ``kept`` bases, or None where the layer reverts to a dense conv."""
    geo = model.layer_geometry()
    out: dict[str, int | None] = {}
    for g, r in kept.items():
        pays = lowrank_pays(geo[g].c_in, geo[g].c_out, geo[g].kernel, r)
        out[g] = None if revert_when_larger and not pays else int(r)
    return out


class BasisCost:
    """Params/FLOPs of a network as it would be physically built after basis pruning, from shapes:
    the fixed part (BN, classifier, depthwise convs) plus, per decomposed layer, ``conv_cost`` of its
    conv with the kept rank, or at its dense cost where it reverts (``revert_when_larger``)."""

    def __init__(self, model: nn.Module, metric: str, revert_when_larger: bool) -> None:
        self.metric, self.revert = metric, revert_when_larger
        self.geo = {n: model.layer_geometry()[n] for n in basis_layer_names(model)}
        dense_spec = copy.deepcopy(model.spec)
        dense_spec.pop("ranks", None)
        self.rest = spec_cost(dense_spec, metric) - sum(self.layer(g, None) for g in self.geo)

    def layer(self, name: str, rank: int | None) -> int:
        g = self.geo[name]
        if rank is not None and self.revert and not lowrank_pays(g.c_in, g.c_out, g.kernel, rank):
            rank = None
        return conv_cost(g.c_in, g.c_out, g.kernel, rank, g.out_hw, self.metric)

    def __call__(self, kept: dict[str, int]) -> int:
        return self.rest + sum(self.layer(g, kept[g]) for g in self.geo)


@torch.no_grad()
def fold_network(masked: Backbone, revert_when_larger: bool = True) -> Backbone:
    """The physically pruned network of a decomposed one: low-rank layers where they pay (or always,
    without ``revert_when_larger``), dense convs of the original shape elsewhere; everything else
    copied. Its spec records the ranks."""
    layers = basis_layers(masked)
    ranks = physical_ranks(masked, {g: m.n_kept() for g, m in layers.items()}, revert_when_larger)
    folded = copy.deepcopy(masked)
    for g, layer in layers.items():
        folded.set_conv(g, layer.to_dense() if ranks[g] is None else layer.to_low_rank())
    new = build_model(masked.spec_with_ranks(ranks))
    new.load_state_dict(folded.state_dict(), strict=True)
    return new.eval()


def reverted_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """``spec`` with every low-rank layer that is not smaller than its dense conv made dense."""
    if not spec.get("ranks"):
        return spec
    cls = BACKBONES[spec["name"]]
    revert = {ly.name: None for ly in cls.layer_table(spec)
              if ly.rank is not None and not lowrank_pays(ly.c_in, ly.c_out, ly.kernel, ly.rank)}
    return cls.with_ranks(spec, revert) if revert else spec


@torch.no_grad()
def revert_larger_blocks(model: Backbone) -> Backbone:
    """``model`` with each LowRankConv layer that is not smaller than its dense conv replaced by that
    dense conv (weight = coef @ basis, exact up to rounding); returns ``model`` itself when none is."""
    spec = reverted_spec(model.spec)
    if spec == model.spec:
        return model
    tmp = copy.deepcopy(model)
    new = build_model(spec)
    for ly in model.layers():
        old, conv = model.get_conv(ly.name), new.get_conv(ly.name)
        if isinstance(old, LowRankConv) and not isinstance(conv, LowRankConv):
            coef = old.coef.weight.to(torch.float64).flatten(1)  # (C_out, r)
            basis = old.basis.weight.to(torch.float64).flatten(1)  # (r, C_in k^2)
            conv.weight.copy_((coef @ basis).reshape(conv.weight.shape).to(conv.weight.dtype))
            if old.coef.bias is not None:
                conv.bias.copy_(old.coef.bias)
            tmp.set_conv(ly.name, conv)
    new.load_state_dict(tmp.state_dict(), strict=True)
    return new.eval()
