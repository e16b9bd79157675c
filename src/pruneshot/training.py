"""Training loops: source pretraining with early stopping, episode fine-tuning and evaluation."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pruneshot.data.pipeline import Augment, BatchSource, autocast, crop_flip, draw_augmentation
from pruneshot.data.splits import Split
from pruneshot.runtime.checkpoint import Checkpointer, load_optimizer, optimizer_state, prefixed, sub

LogFn = Callable[[str], None]
MetricsFn = Callable[[dict[str, float], int | None], None]


def require_finite(value: float, what: str) -> None:
    """Raise FloatingPointError naming the loop ``what`` when its loss ``value`` is NaN or infinite: a
    diverged training loop fails its job (pretraining) or its cell (a search, an adapt, a transfer arm),
    it never hands on a broken network."""
    if not math.isfinite(value):
        raise FloatingPointError(f"{what}: the loss became non-finite ({value}); not using the diverged network")


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy (fraction) of ``model`` in eval mode on (x, y), all on the model's device."""
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=y.device)
    for i in range(0, len(y), batch_size):
        correct += (model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum()
    return int(correct.item()) / max(1, len(y))


@torch.no_grad()
def nearest_centroid_accuracy(features: Callable[[torch.Tensor], torch.Tensor], support_x: torch.Tensor,
                              support_y: torch.Tensor, query_x: torch.Tensor, query_y: torch.Tensor,
                              batch_size: int = 512) -> float:
    """Top-1 accuracy (fraction) of cosine nearest-centroid classification: ``features`` maps a batch
    (B, C, H, W) to (B, ...) vectors, flattened and L2-normalised; each class's prototype is the
    normalised mean of its support features (labels 0..ways-1); a query goes to the prototype of
    highest cosine similarity."""

    def feats(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.normalize(features(x[i : i + batch_size]).flatten(1), dim=1)
                          for i in range(0, len(x), batch_size)])

    fs = feats(support_x)
    ways = int(support_y.max().item()) + 1
    protos = F.normalize(torch.stack([fs[support_y == c].mean(0) for c in range(ways)]), dim=1)
    pred = (feats(query_x) @ protos.T).argmax(1)
    return int((pred == query_y).sum().item()) / max(1, len(query_y))


def prototype_accuracy(model: nn.Module, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor,
                       query_y: torch.Tensor, batch_size: int = 512) -> float:
    """The 'prototype' arm (no training): :func:`nearest_centroid_accuracy` on ``model.forward_features``
    in eval mode. Support (N, C, H, W) and query on the model's device."""
    model.eval()
    return nearest_centroid_accuracy(model.forward_features, support_x, support_y, query_x, query_y, batch_size)


def pixel_prototype_accuracy(support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor,
                             query_y: torch.Tensor) -> float:
    """The raw-pixel control of sanity gate (b): :func:`nearest_centroid_accuracy` on the normalised
    pixels themselves (no network)."""
    return nearest_centroid_accuracy(lambda x: x, support_x, support_y, query_x, query_y)


@torch.no_grad()
def source_accuracy(model: nn.Module, source: BatchSource, batch_size: int = 512, amp: str = "none") -> float:
    """Top-1 accuracy (fraction) of ``model`` in eval mode on a device-resident split, in order,
    never augmented; under ``amp`` (bf16 autocast on CUDA only). One host sync at the end."""
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=source.device)
    with autocast(source.device, amp):
        for xb, yb in source.epoch(batch_size):
            correct += (model(xb).argmax(1) == yb).sum()
    return int(correct.item()) / max(1, len(source))


@torch.no_grad()
def recalibrate_bn(model: nn.Module, x: torch.Tensor, *, images: int, batch_size: int, seed: int) -> dict[str, Any]:
    """Re-estimate every BatchNorm's running mean and variance of ``model`` in place: statistics
    reset, then the cumulative (``momentum=None``) average of the batch statistics of train-mode
    forward passes over ``images`` images of ``x`` (N, C, H, W; normalised, on the model's device),
    drawn without replacement by a permutation under ``seed``, in ceil(images / ``batch_size``)
    batches of near-equal size (so the mean is the images' mean up to the size differences of at most
    one image); no gradient, no other
    state changes; the model is left in eval mode. The same ``x``, ``images`` and ``seed`` give every
    network the same batches. Returns what was done (for the record)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    n = min(int(images), len(x))
    if bns and n:
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n].to(x.device)
        momenta = [bn.momentum for bn in bns]
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None
        model.train()
        for idx in torch.tensor_split(order, -(-n // batch_size)):  # ceil(n / batch_size) near-equal batches
            model(x[idx])
        for bn, m in zip(bns, momenta, strict=True):
            bn.momentum = m
    model.eval()
    return {"images": n, "batch_size": int(batch_size), "seed": int(seed), "batchnorms": len(bns)}


def device_description(device: torch.device | str) -> str:
    """Name of the compute device (GPU name or CPU model), for records and MLflow params."""
    from pruneshot.runtime.provenance import device_name

    return device_name(str(torch.device(device)))


def pretrain(
    model: nn.Module, train: Split | BatchSource, val: Split | BatchSource, *, epochs: int, batch_size: int,
    lr: float, momentum: float, weight_decay: float, patience: int, seed: int,
    augment: Augment | None = None, device: torch.device | str = "cpu", amp: str = "none",
    channels_last: bool = False, log: LogFn = print, log_metrics: MetricsFn | None = None,
    checkpoint: Checkpointer | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """SGD with cosine learning rate on the source classes; the returned model is the epoch
    with the best validation accuracy (early stopping after ``patience`` epochs without gain).

    ``train``/``val``: device-resident sources (:class:`pruneshot.data.pipeline.BatchSource`, uint8 images
    normalised per batch) or ``data.splits.Split`` float tensors (moved to ``device`` as they are).
    ``augment``: crop/flip of training batches (None or all off: none, and then the random draws,
    hence the weights on CPU, are exactly those of the plain loop: one permutation per epoch).
    ``device``: where the model, data and evaluation live. ``amp`` 'bf16': bf16 autocast of
    forward and loss on CUDA (no loss scaling needed for bf16); ignored on CPU, which trains in
    float32. ``channels_last``: model and batches in channels-last memory format, on CUDA only.
    On CUDA, cuDNN autotuning is on. The returned model is on the CPU, float32, contiguous;
    ``info['applied']`` says what was actually used.

    ``checkpoint``: saved at the end of every epoch (model and BN buffers, SGD momentum, scheduler
    position, best-so-far weights and epoch, history, the batch generator's and the global RNG
    states); a matching checkpoint found at the start is resumed after its last epoch, its history
    replayed to ``log_metrics``. On the CPU a resumed run ends bit-identical to an uninterrupted
    one. ``info['resumed_after_epoch']``: the epochs the checkpoint held (None: fresh start);
    ``info['seconds_before_resume']``: training seconds spent before it."""
    device = torch.device(device)
    on_cuda = device.type == "cuda"
    cl = channels_last and on_cuda
    amp_used = amp if on_cuda else "none"
    autocast(device, amp)  # validates amp
    if isinstance(train, Split):
        train = BatchSource.from_split(train, device=device, channels_last=cl)
    if isinstance(val, Split):
        val = BatchSource.from_split(val, device=device, channels_last=cl)
    for name, src in (("train", train), ("val", val)):
        if src.device != device or src.channels_last != cl:
            raise ValueError(f"{name} source is on {src.device} (channels_last={src.channels_last}); "
                             f"expected {device} (channels_last={cl})")
    if on_cuda:
        torch.backends.cudnn.benchmark = True
    model = model.to(device)
    if cl:
        model = model.to(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    best: dict[str, Any] = {"val_acc": -1.0, "epoch": -1, "state": None}
    history: list[dict[str, Any]] = []
    start, stopped, seconds_before, resumed_after = 0, False, 0.0, None
    if checkpoint is not None:
        checkpoint = checkpoint.scoped("pretrain", {
            "epochs": epochs, "batch_size": batch_size, "lr": lr, "momentum": momentum,
            "weight_decay": weight_decay, "patience": patience, "seed": seed, "amp": amp_used, "channels_last": cl,
            "augment": [augment.crop_padding, augment.flip] if augment is not None else None})
        ck = checkpoint.load()
        if ck is not None:
            st = ck.state
            model.load_state_dict(sub(ck.tensors, "model"))
            load_optimizer(opt, ck.tensors, st["optimizer"], "opt")
            sched.load_state_dict(st["scheduler"])
            gen.set_state(ck.tensors["generator"])
            ck.restore_rng()
            best = {"val_acc": st["best_val_acc"], "epoch": st["best_epoch"],
                    "state": {k: v.to(device) for k, v in sub(ck.tensors, "best").items()}}
            history, stopped, seconds_before = st["history"], st["stopped"], st["seconds"]
            start = resumed_after = len(history)
            log(f"resumed from checkpoint after epoch {start}/{epochs} (best epoch {best['epoch'] + 1}, "
                f"val_acc {best['val_acc']:.4f}; {checkpoint.directory})")
            if log_metrics:
                for row in history:
                    log_metrics({"train_loss": row["train_loss"], "val_acc": row["val_acc"]}, row["epoch"])
    t_start = time.perf_counter()
    for epoch in range(start, start if stopped else epochs):
        model.train()
        # Summed on the device in float64 (no host sync per step); the same sum as adding
        # loss.item() * len(batch) in Python.
        total = torch.zeros((), dtype=torch.float64, device=device)
        n = 0
        for xb, yb in train.epoch(batch_size, gen, augment):
            with autocast(device, amp_used):
                loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach().double() * len(yb)
            n += len(yb)
        sched.step()
        val_acc = source_accuracy(model, val, amp=amp_used)
        train_loss = float(total.item()) / n
        require_finite(train_loss, f"pretraining, epoch {epoch + 1} (lr {lr})")
        history.append({"epoch": epoch, "train_loss": train_loss, "val_acc": val_acc})
        if log_metrics:
            log_metrics({"train_loss": train_loss, "val_acc": val_acc}, epoch)
        elapsed = time.perf_counter() - t_start
        left = elapsed / (epoch + 1 - start) * (epochs - epoch - 1)
        log(f"epoch {epoch + 1}/{epochs} loss {train_loss:.4f} val_acc {val_acc:.4f} "
            f"elapsed {elapsed:.1f}s left<={left:.1f}s")
        if val_acc > best["val_acc"]:
            best = {"val_acc": val_acc, "epoch": epoch, "state": copy.deepcopy(model.state_dict())}
        elif epoch - best["epoch"] >= patience:
            log(f"early stop at epoch {epoch + 1}: no gain for {patience} epochs")
            stopped = True
        if checkpoint is not None:
            opt_tensors, opt_meta = optimizer_state("opt", opt)
            checkpoint.save(
                {**prefixed("model", model.state_dict()), **prefixed("best", best["state"]), **opt_tensors,
                 "generator": gen.get_state()},
                {"history": history, "stopped": stopped, "best_epoch": best["epoch"], "best_val_acc": best["val_acc"],
                 "optimizer": opt_meta, "scheduler": sched.state_dict(),
                 "seconds": seconds_before + time.perf_counter() - t_start})
        if stopped:
            break
    model.load_state_dict(best["state"])
    model = model.to("cpu", torch.float32).to(memory_format=torch.contiguous_format)
    model.eval()
    applied = {"device": str(device), "device_name": device_description(device), "amp": amp_used,
               "channels_last": cl, "augment": {"crop_padding": augment.crop_padding if augment else 0,
                                                "flip": bool(augment and augment.flip)}}
    return model, {"best_epoch": best["epoch"], "best_val_acc": best["val_acc"],
                   "epochs_run": len(history), "history": history, "applied": applied,
                   "resumed_after_epoch": resumed_after, "seconds_before_resume": seconds_before}


class SGD:
    """Plain SGD with momentum and L2 weight decay, bit for bit the update of ``torch.optim.SGD``
    (dampening 0, no Nesterov, not maximising; tests/test_training.py): g = grad + wd * p; b = g on
    the first step, else m * b + g; p -= lr * b. Written out because constructing a
    ``torch.optim.SGD`` (``Optimizer.add_param_group``) imports ``torch._dynamo``: about 2.3 s per
    process on torch 2.13 CPU, which each transfer job would pay (it never loads dynamo otherwise)."""

    def __init__(self, params: list[torch.Tensor], lr: float, momentum: float = 0.0,
                 weight_decay: float = 0.0) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.buffers: list[torch.Tensor | None] = [None] * len(self.params)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            g = p.grad.add(p, alpha=self.weight_decay) if self.weight_decay else p.grad
            if self.momentum:
                buf = self.buffers[i]
                if buf is None:
                    buf = self.buffers[i] = g.detach().clone()
                else:
                    buf.mul_(self.momentum).add_(g)
                g = buf
            p.add_(g, alpha=-self.lr)


def finetune_episode(
    model: nn.Module, support_x: torch.Tensor, support_y: torch.Tensor, *, arm: str, steps: int,
    lr: float, momentum: float, weight_decay: float, batch_size: int, seed: int,
    augment: Augment | None = None, fill: float = 0.0, batch_norm: str = "frozen",
    on_step: Callable[[int], None] | None = None,
) -> nn.Module:
    """Adapt ``model`` (whose head is already ``ways``-way) to one support set.

    arm 'finetune': all kept weights train; 'linear_probe': only the head trains (on support features
    computed once when there is no augmentation).
    ``batch_norm`` 'frozen' (pretrained networks): BatchNorm statistics stay frozen (eval mode), since
    with 1-25 support images batch statistics would replace good source statistics with noise;
    'batch' (a freshly initialised network, the reinit arm, which has no statistics worth keeping):
    train mode, each step normalises with its batch's statistics, as training from scratch does (the
    caller then sets the running statistics from the support images).
    Full-batch when the support fits in ``batch_size``.
    Runs on the device of ``model`` and the support tensors (all three on one device); the
    random draws are made on the CPU from ``seed``, so they do not depend on the device.
    ``augment``: every step's batch is randomly cropped (padding value ``fill``: the normalised
    value of a zero pixel) and flipped, with offsets/flips drawn after the step's subsample.
    ``on_step(k)``: called before the first step (k = 0) and after every step k (the model is then
    exactly what a ``k``-step run returns: transfer selection scores several step counts in one run);
    it may evaluate the model, whose train/eval mode is restored after it, and must not draw from the
    global RNG or change weights.
    """
    gen = torch.Generator().manual_seed(seed)
    if arm == "linear_probe":
        for p in model.parameters():
            p.requires_grad_(False)
        for p in model.classifier.parameters():
            p.requires_grad_(True)
    elif arm != "finetune":
        raise ValueError(f"unknown transfer arm {arm!r}; allowed: finetune, linear_probe")
    if batch_norm not in ("frozen", "batch"):
        raise ValueError(f"unknown batch_norm {batch_norm!r}; allowed: frozen, batch")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    model.train(batch_norm == "batch")
    augmenting = augment is not None and augment.active
    # linear_probe without augmentation: the frozen body (eval mode) maps each support image to the same
    # features at every step, so they are computed once and the head trains on them (the same loss and
    # gradients as running the body every step, at a fraction of the cost).
    cached = None
    if arm == "linear_probe" and not augmenting and steps > 0 and batch_norm == "frozen":
        with torch.no_grad():
            cached = model.forward_features(support_x)
    finite = torch.ones((), dtype=torch.bool, device=support_x.device)  # checked once at the end (no sync per step)

    def notify(k: int) -> None:
        if on_step is not None:
            on_step(k)
            model.train(batch_norm == "batch")

    notify(0)
    for step in range(steps):
        if len(support_y) > batch_size:
            idx = torch.randperm(len(support_y), generator=gen)[:batch_size].to(support_x.device)
            xb, yb = (support_x if cached is None else cached)[idx], support_y[idx]
        else:
            xb, yb = (support_x if cached is None else cached), support_y
        if augmenting:
            offsets, flips = draw_augmentation(len(yb), augment, gen)
            xb = crop_flip(xb, offsets, flips, augment.crop_padding, fill=fill)
        loss = F.cross_entropy(model(xb) if cached is None else model.classifier(xb), yb)
        finite = finite & torch.isfinite(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
        notify(step + 1)
    if not bool(finite):
        raise FloatingPointError(f"{arm}: the fine-tuning loss became non-finite within {steps} steps (lr {lr}); "
                                 "the cell is recorded as failed")
    return model
