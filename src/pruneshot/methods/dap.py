"""`dap`: Differentiable Architecture Pruning for transfer (Colombo & Gao 2021) -- a RECONSTRUCTION.

Only the paper's abstract was read and no code is public; every choice below is ours. Each
channel c of every channel group has a logit theta_c (``theta_init``). A forward hook at the
group's mask point (the ReLU output) multiplies the channel by the gate
``sigmoid((theta_c + n_c) / tau_gate)``, with ``n_c`` logistic noise ``log(u) - log(1 - u)``,
u ~ U(0, 1) drawn once per step and channel from a generator seeded with the search seed
(option ``noise``). theta trains with Adam on source mini-batches against
``CE + lambda * sum_c cost_c * sigmoid(theta_c / tau_penalty)``, where cost_c is the share of
the dense network's ``metric`` (params|flops) that removing one channel of its group saves
(uniform within a group). Both temperatures anneal geometrically from start to end over the
``steps`` steps (the abstract's two-temperature relaxation).

The abstract trains the architecture "independently of the weights": ``weights: frozen``
(default) keeps every weight and BN statistic at its pretrained value (eval mode, no weight
gradients); ``alternate`` follows every theta step by one plain SGD step (no momentum) of the
weights on the same mini-batch and noise (train mode); ``resample`` does the same but
re-initialises every weight (seeded) every ``resample_every`` steps, so theta cannot co-adapt
to one weight vector. Whatever the mode, the extracted network inherits the PRETRAINED
weights and BN statistics of its kept channels. Extraction ``topk``: one global ranking of
theta, cut so the cost ratio is the largest value <= the budget (at least one channel per
group, its top theta); ``threshold``: keep ``sigmoid(theta / tau_gate_end) > 0.5`` and report
the gap to the budget.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pruneshot.methods import register
from pruneshot.methods.base import (
    MethodOptions,
    PruningMethod,
    SearchContext,
    SearchResult,
    dense_result,
    no_grad,
    option,
    width_ratio,
)

# Imported where the method computes: its metadata is read without torch (see methods/base.py).
if TYPE_CHECKING:
    import torch
    from torch import nn

    from pruneshot.data.splits import Split
    from pruneshot.runtime.checkpoint import Checkpointer


@dataclass(frozen=True)
class DAPOptions(MethodOptions):
    """RECONSTRUCTION of differentiable architecture pruning for transfer (Colombo & Gao 2021;
    only the abstract was read, no public code). Per-channel logits theta; forward gate
    sigmoid((theta + logistic noise) / tau_gate); penalty lambda * sum_c cost_c *
    sigmoid(theta_c / tau_penalty) with cost_c the channel's share of budget.metric; both
    temperatures anneal geometrically. Every default below is a reconstruction."""

    lambda_: float = option(
        1.0, "Weight of the cost penalty. cost_c = cost removed with channel c alone / dense cost; the shares sum "
             "to about 2 over all channels (weights between two groups count in both).", key="lambda", minimum=0)
    steps: int = option(300, "Architecture (theta) optimisation steps on source mini-batches.", minimum=1)
    batch_size: int = option(64, "Source mini-batch size of the theta steps.", minimum=2)
    lr: float = option(0.05, "Adam learning rate of theta.", exclusive_minimum=0)
    theta_init: float = option(0.0, "Initial value of every logit theta_c.")
    tau_gate_start: float = option(1.0, "Forward temperature at the first step.", exclusive_minimum=0)
    tau_gate_end: float = option(
        0.01, "Forward temperature, annealed geometrically from start to end over the steps.", exclusive_minimum=0)
    tau_penalty_start: float = option(1.0, "Penalty temperature at the first step.", exclusive_minimum=0)
    tau_penalty_end: float = option(
        0.01, "Penalty temperature, annealed geometrically from start to end over the steps.", exclusive_minimum=0)
    noise: bool = option(True, "Add logistic noise log(u) - log(1 - u) to theta in the forward gate.")
    weights: Literal["frozen", "alternate", "resample"] = option(
        "frozen", "frozen: weights (and BN statistics) stay at the pretrained values while theta trains; "
                  "alternate: one SGD weight step per theta step; resample: weights re-initialised every "
                  "resample_every steps so theta cannot co-adapt to one weight vector. The extracted network "
                  "always inherits the pretrained weights of its kept channels.")
    weight_lr: float = option(0.01, "SGD learning rate of the weights (alternate and resample only).",
                              exclusive_minimum=0)
    resample_every: int = option(50, "Steps between weight re-initialisations (resample only).", minimum=1)
    extraction: Literal["topk", "threshold"] = option(
        "topk", "topk: keep the highest-theta channels (global ranking) while cost <= budget; threshold: keep "
                "sigmoid(theta / tau_gate_end) > 0.5 (the gap to the budget is reported).")


_ENUMS = {s.key: s.enum for s in DAPOptions.specs()}
WEIGHT_MODES: tuple[str, ...] = _ENUMS["weights"]
EXTRACTIONS: tuple[str, ...] = _ENUMS["extraction"]

# Gates below this are exactly 0 in the forward pass: at small tau_gate, sigmoid underflows into
# denormal floats, on which CPU arithmetic is several times slower; such a gate passes nothing anyway.
GATE_FLOOR = 1e-12


def geometric_schedule(start: float, end: float, steps: int) -> list[float]:
    """tau(t) = start * (end / start) ** (t / (steps - 1)) for t = 0..steps-1 (just [start] when steps == 1)."""
    if steps == 1:
        return [float(start)]
    return [float(start * (end / start) ** (t / (steps - 1))) for t in range(steps)]


def cost_shares(model: nn.Module, metric: str) -> dict[str, float]:
    """Per group, the fraction of ``model``'s ``metric`` saved by removing one of its channels:
    (cost(dense) - cost(group one channel narrower)) / cost(dense). A group of width 1 cannot lose
    its channel, so its share is 0."""
    from pruneshot.models.cost import cost

    groups = model.channel_groups()
    dense = cost(model, metric)
    return {g: 0.0 if n <= 1 else 1.0 - width_ratio(model, {g: n - 1}, metric, dense) for g, n in groups.items()}


def logistic_noise(n: int, generator: torch.Generator) -> torch.Tensor:
    """(n,) samples of log(u) - log(1 - u), u ~ U(0, 1) (clamped away from 0 and 1)."""
    import torch

    u = torch.rand(n, generator=generator).clamp_(1e-6, 1.0 - 1e-6)
    return torch.log(u) - torch.log1p(-u)


class ArchitectureGates:
    """Gates ``x_c * sigmoid((theta_c + noise_c) / tau_gate)`` attached by forward hooks on the model's
    mask points (each layer's BatchNorm or activation output); gates below ``GATE_FLOOR`` are exactly 0. theta lives
    here (on the model's device; the noise is drawn on the CPU and moved there), not in the model, so the
    model's state dict is untouched; ``remove()`` detaches the hooks and leaves the model as it was."""

    def __init__(self, model: nn.Module, theta_init: float = 0.0) -> None:
        import torch
        from torch import nn

        points = model.mask_points()
        sizes = model.channel_groups()
        if set(points) != set(sizes):
            raise ValueError(f"dap: mask points {sorted(points)} do not match channel groups {sorted(sizes)}")
        from pruneshot.methods.base import model_device

        device = model_device(model)
        self.theta = {g: nn.Parameter(torch.full((n,), float(theta_init), device=device)) for g, n in sizes.items()}
        self.noise: dict[str, torch.Tensor] = {g: torch.zeros(n, device=device) for g, n in sizes.items()}
        self.tau_gate = 1.0
        self._handles = [m.register_forward_hook(self._hook(g)) for g in sizes for m in points[g]]

    def _hook(self, group: str) -> Callable:
        import torch

        def hook(_m: nn.Module, _inp: tuple, out: torch.Tensor) -> torch.Tensor:
            gate = torch.sigmoid((self.theta[group] + self.noise[group]) / self.tau_gate)
            gate = gate.masked_fill(gate < GATE_FLOOR, 0.0)  # no denormal floats (5x slower on CPU)
            return out * gate.to(out.dtype).view((1, -1) + (1,) * (out.dim() - 2))

        return hook

    def parameters(self) -> list[nn.Parameter]:
        return list(self.theta.values())

    def resample_noise(self, generator: torch.Generator | None) -> None:
        """New logistic noise per channel (shared by the mini-batch); ``None`` switches the noise off."""
        import torch

        for g, t in self.theta.items():
            noise = torch.zeros(len(t)) if generator is None else logistic_noise(len(t), generator)
            self.noise[g] = noise.to(t.device)

    def penalty(self, costs: dict[str, float], tau_penalty: float) -> torch.Tensor:
        """sum_c cost_c * sigmoid(theta_c / tau_penalty) (no noise)."""
        import torch

        return sum(costs[g] * torch.sigmoid(t / tau_penalty).sum() for g, t in self.theta.items())

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


@no_grad
def reinitialise(model: nn.Module, seed: int) -> None:
    """Fresh initialisation of every module with ``reset_parameters`` (BN statistics too), seeded by
    ``seed`` without touching the global CPU RNG. The draws are made on the CPU whatever the model's
    device (a model elsewhere is re-initialised as a CPU copy whose values are then copied in)."""
    import torch

    from pruneshot.methods.base import model_device

    if model_device(model).type != "cpu":
        fresh = copy.deepcopy(model).to("cpu")
        reinitialise(fresh, seed)
        model.load_state_dict(fresh.state_dict())
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in model.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()


def architecture_search(
    model: nn.Module, gates: ArchitectureGates, train: Split, costs: dict[str, float], opts: dict[str, Any], *,
    seed: int, on_backward: Callable[[int, ArchitectureGates, nn.Module], None] | None = None,
    log_metrics: Callable[[dict[str, float], int | None], None] | None = None,
    checkpoint: Checkpointer | None = None, log: Callable[[str], None] | None = None,
) -> tuple[list[dict[str, float]], list[int]]:
    """Train theta (Adam) for ``opts['steps']`` mini-batches on ``model`` (gates attached).

    ``weights`` frozen: no model parameter requires grad during the search (flags restored after)
    and the model is in eval mode; alternate/resample: after each theta step one SGD step (lr
    ``weight_lr``, no momentum) of every weight on CE with the updated gates, same batch and
    noise, model in train mode; resample also re-initialises the weights at steps k *
    ``resample_every`` (k >= 1; the first stretch starts from the pretrained weights).
    ``on_backward(step, gates, model)`` runs after the theta loss's backward, before the update.
    ``checkpoint``: saved after every pass over the source data (``len(train) // batch_size``
    steps: the model, theta, both optimisers, the batch and noise generators, the current
    permutation and position, history); a matching one is resumed, ending bit-identical to an
    uninterrupted run. Returns (per-step history, steps at which weights were re-initialised).
    Runs on the model's device (``train`` held there); every random draw is made on the CPU.
    """
    import torch
    import torch.nn.functional as F

    from pruneshot.methods.base import device_source, model_device
    from pruneshot.runtime.checkpoint import load_optimizer, optimizer_state, prefixed, sub
    from pruneshot.training import require_finite

    source = device_source(train, model_device(model))
    mode = opts["weights"]
    gen = torch.Generator().manual_seed(seed)
    batch_seed, noise_seed, reinit_seed = (int(s) for s in torch.randint(0, 2**62, (3,), generator=gen))
    batch_gen = torch.Generator().manual_seed(batch_seed)
    noise_gen = torch.Generator().manual_seed(noise_seed) if opts["noise"] else None
    taus_g = geometric_schedule(opts["tau_gate_start"], opts["tau_gate_end"], opts["steps"])
    taus_p = geometric_schedule(opts["tau_penalty_start"], opts["tau_penalty_end"], opts["steps"])
    bs = min(opts["batch_size"], len(train))
    if bs < 1 or (mode != "frozen" and bs < 2):
        raise ValueError(f"dap: {len(train)} source training images are too few for batch_size {opts['batch_size']}")

    was_training = {m: m.training for m in model.modules()}
    was_requires = {id(p): p.requires_grad for p in model.parameters()}
    theta_opt = torch.optim.Adam(gates.parameters(), lr=opts["lr"])
    weight_opt = None
    if mode == "frozen":
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
    else:
        weight_opt = torch.optim.SGD(model.parameters(), lr=opts["weight_lr"], momentum=0.0, weight_decay=0.0)
        model.train()

    perm, pos = torch.randperm(len(train), generator=batch_gen), 0
    history: list[dict[str, float]] = []
    resampled: list[int] = []
    every = max(1, len(train) // bs)
    if checkpoint is not None:
        checkpoint = checkpoint.scoped("dap", opts, seed, costs)
        ck = checkpoint.load()
        if ck is not None:
            model.load_state_dict(sub(ck.tensors, "model"))
            with torch.no_grad():
                for g, t in gates.theta.items():
                    t.copy_(ck.tensors[f"theta.{g}"])
            load_optimizer(theta_opt, ck.tensors, ck.state["theta_opt"], "theta_opt")
            if weight_opt is not None:
                load_optimizer(weight_opt, ck.tensors, ck.state["weight_opt"], "weight_opt")
            batch_gen.set_state(ck.tensors["batch_gen"])
            if noise_gen is not None:
                noise_gen.set_state(ck.tensors["noise_gen"])
            perm, pos = ck.tensors["perm"], ck.state["pos"]
            history, resampled = ck.state["history"], ck.state["resampled"]
            ck.restore_rng()
            if log is not None:
                log(f"dap: resumed from checkpoint after step {len(history)}/{opts['steps']} ({checkpoint.directory})")

    def save() -> None:
        tensors = {**prefixed("model", model.state_dict()), **prefixed("theta", dict(gates.theta)),
                   "batch_gen": batch_gen.get_state(), "perm": perm}
        theta_t, theta_meta = optimizer_state("theta_opt", theta_opt)
        state = {"pos": pos, "history": history, "resampled": resampled, "theta_opt": theta_meta}
        if weight_opt is not None:
            weight_t, state["weight_opt"] = optimizer_state("weight_opt", weight_opt)
            tensors.update(weight_t)
        if noise_gen is not None:
            tensors["noise_gen"] = noise_gen.get_state()
        checkpoint.save({**tensors, **theta_t}, state)

    try:
        for step in range(len(history), opts["steps"]):
            if pos + bs > len(perm):  # drop the incomplete remainder: every batch has bs images
                perm, pos = torch.randperm(len(train), generator=batch_gen), 0
            idx = perm[pos : pos + bs]
            pos += bs
            if mode == "resample" and step > 0 and step % opts["resample_every"] == 0:
                reinitialise(model, reinit_seed + step)
                resampled.append(step)
            x, y = source.batch(idx)
            gates.tau_gate = taus_g[step]
            gates.resample_noise(noise_gen)

            ce = F.cross_entropy(model(x), y)
            pen = gates.penalty(costs, taus_p[step])
            theta_opt.zero_grad(set_to_none=True)
            if weight_opt is not None:
                weight_opt.zero_grad(set_to_none=True)
            (ce + opts["lambda"] * pen).backward()
            if on_backward is not None:
                on_backward(step, gates, model)
            theta_opt.step()

            if weight_opt is not None:
                weight_opt.zero_grad(set_to_none=True)
                for t in gates.parameters():
                    t.grad = None
                F.cross_entropy(model(x), y).backward()
                weight_opt.step()
                for t in gates.parameters():  # the weight step's theta gradients are not used
                    t.grad = None

            require_finite(float(ce.item()) + float(pen.item()), f"dap gate search, step {step}")
            with torch.no_grad():
                thetas = torch.cat([t.detach() for t in gates.parameters()])
            row = {"step": step, "tau_gate": taus_g[step], "tau_penalty": taus_p[step], "ce": ce.item(),
                   "penalty": pen.item(), "theta_mean": float(thetas.mean()),
                   "theta_open": int((thetas > 0).sum())}
            history.append(row)
            if checkpoint is not None and (step + 1) % every == 0 and step + 1 < opts["steps"]:
                save()
            if log_metrics is not None:
                log_metrics({f"dap_{k}": float(v) for k, v in row.items() if k != "step"}, step)
    finally:
        for p in model.parameters():
            p.requires_grad_(was_requires[id(p)])
            p.grad = None
        for m, training in was_training.items():
            m.training = training
    return history, resampled


def topk_keep(
    model: nn.Module, theta: dict[str, torch.Tensor], budget: float, metric: str,
) -> tuple[dict[str, list[int]], int, float]:
    """Every group's top-theta channel plus the first ``n`` channels of the global theta ranking
    (descending, stable ties), ``n`` the largest count whose cost ratio is <= ``budget`` (0 when the
    forced channels alone exceed it). The ratio never decreases with ``n``: bisection.
    Returns (keep, n, ratio)."""
    import torch

    from pruneshot.models.cost import cost

    groups = list(theta)
    owner = [(g, c) for g in groups for c in range(len(theta[g]))]
    order = torch.argsort(-torch.cat([theta[g] for g in groups]), stable=True).tolist()
    forced = {(g, int(torch.argsort(-theta[g], stable=True)[0])) for g in groups}
    dense = cost(model, metric)

    def keep_for(n: int) -> dict[str, list[int]]:
        chosen = forced | {owner[j] for j in order[:n]}
        return {g: sorted(c for gg, c in chosen if gg == g) for g in groups}

    def ratio(n: int) -> float:
        return width_ratio(model, {g: len(i) for g, i in keep_for(n).items()}, metric, dense)

    lo, hi = 0, len(order)  # find the largest n in [0, hi] with ratio(n) <= budget (or 0)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ratio(mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return keep_for(lo), lo, ratio(lo)


def threshold_keep(theta: dict[str, torch.Tensor], tau: float) -> tuple[dict[str, list[int]], dict[str, int]]:
    """Channels with sigmoid(theta / tau) > 0.5 per group; a group with none keeps its top-theta
    channel (second dict: group -> forced index)."""
    import torch

    keep, forced = {}, {}
    for g, t in theta.items():
        idx = torch.nonzero(torch.sigmoid(t / tau) > 0.5).flatten().tolist()
        if not idx:
            top = int(torch.argsort(-t, stable=True)[0])
            idx, forced[g] = [top], top
        keep[g] = sorted(idx)
    return keep, forced


@register
class DAP(PruningMethod):
    name = "dap"
    options_class = DAPOptions
    side = "source"
    provenance = "reconstruction"
    reference = "Colombo & Gao 2021, Differentiable architecture pruning for transfer learning (abstract only; " \
                "reconstruction)"
    uses_device = True

    def search(self, ctx: SearchContext) -> SearchResult:
        import torch

        from pruneshot.methods.base import compute_device, device_source, to_cpu
        from pruneshot.models.cost import cost

        opts = self.resolve_options(ctx.options)
        base_info = {"requested_budget": ctx.budget, "metric": ctx.metric, "options": opts, "reconstruction": True}
        if ctx.budget >= 1.0:
            return dense_result(ctx, base_info, "budget >= 1: dense network returned unchanged, no theta training")

        # ctx.model is the working copy (its weights move unless frozen); the pruned net is cut from `pretrained`.
        device = compute_device(ctx.device)  # the theta search and the evaluation run there
        pretrained = copy.deepcopy(ctx.model)
        work = ctx.model.to(device)
        costs = cost_shares(pretrained, ctx.metric)
        gates = ArchitectureGates(work, opts["theta_init"])
        try:
            history, resampled = architecture_search(work, gates, device_source(ctx.source_train, device), costs,
                                                     opts, seed=ctx.seed,
                                                     log_metrics=ctx.log_metrics, checkpoint=ctx.checkpoint,
                                                     log=ctx.log)
        finally:
            gates.remove()
        theta = {g: t.detach().to("cpu", copy=True) for g, t in gates.theta.items()}

        forced: dict[str, int] = {}
        n_global = None
        if opts["extraction"] == "topk":
            keep, n_global, _ = topk_keep(pretrained, theta, ctx.budget, ctx.metric)
        else:
            keep, forced = threshold_keep(theta, opts["tau_gate_end"])
        pruned = pretrained.pruned(keep)
        achieved = cost(pruned, ctx.metric) / cost(pretrained, ctx.metric)
        has_val = len(ctx.source_val) > 0
        all_theta = torch.cat(list(theta.values()))
        info = {
            **base_info,
            "achieved_ratio": achieved,
            "gap": ctx.budget - achieved,
            "met_from_below": achieved <= ctx.budget,
            "extraction": opts["extraction"],
            "widths": {g: len(i) for g, i in keep.items()},
            "global_kept": n_global,
            "forced_keep": forced,
            "forced_keep_note": "every group keeps at least its top-theta channel",
            "cost_shares": costs,
            "cost_shares_sum": sum(costs[g] * len(t) for g, t in theta.items()),
            "tau_gate_schedule": [r["tau_gate"] for r in history],
            "tau_penalty_schedule": [r["tau_penalty"] for r in history],
            "tau_gate_end": history[-1]["tau_gate"],
            "tau_penalty_end": history[-1]["tau_penalty"],
            "theta_stats": {
                "mean": float(all_theta.mean()), "std": float(all_theta.std()) if len(all_theta) > 1 else 0.0,
                "min": float(all_theta.min()), "max": float(all_theta.max()), "open": int((all_theta > 0).sum()),
                "per_group": {g: {"mean": float(t.mean()), "min": float(t.min()), "max": float(t.max()),
                                  "open": int((t > 0).sum())} for g, t in theta.items()},
            },
            "theta": {g: t.tolist() for g, t in theta.items()},
            "history": [{k: r[k] for k in ("step", "ce", "penalty", "theta_mean", "theta_open")} for r in history],
            "weights_mode": opts["weights"],
            "weights_resampled_at": resampled,
            "weights_note": "the pruned network holds the pretrained weights and BN statistics of its kept channels",
            "source_val_acc_pruned": _val_accuracy(pruned, ctx.source_val, device) if has_val else float("nan"),
        }
        ctx.log(f"dap ({opts['weights']} weights, {opts['extraction']}): {ctx.metric} ratio {achieved:.4f} for "
                f"requested {ctx.budget:g} (gap {info['gap']:+.4f}); widths {list(info['widths'].values())}; "
                f"source val acc of the pruned net {info['source_val_acc_pruned']:.4f}")
        return SearchResult(model=to_cpu(pruned), keep=keep, info=info)


def _val_accuracy(model: nn.Module, val: Split, device: torch.device) -> float:
    """Source validation accuracy (fraction) of ``model`` evaluated on ``device`` (the model is moved
    there and back to the CPU)."""
    from pruneshot.methods.base import device_source, to_cpu
    from pruneshot.training import accuracy

    source = device_source(val, device)
    try:
        return accuracy(model.to(device), source.x, source.y)
    finally:
        to_cpu(model)
