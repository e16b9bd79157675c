"""Training loops: source pretraining with early stopping, episode fine-tuning and evaluation."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pruneshot.data import Split

LogFn = Callable[[str], None]
MetricsFn = Callable[[dict[str, float], int | None], None]


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy (fraction) of ``model`` in eval mode on (x, y)."""
    model.eval()
    correct = 0
    for i in range(0, len(y), batch_size):
        correct += (model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum().item()
    return correct / max(1, len(y))


def pretrain(
    model: nn.Module, train: Split, val: Split, *, epochs: int, batch_size: int, lr: float,
    momentum: float, weight_decay: float, patience: int, seed: int,
    log: LogFn = print, log_metrics: MetricsFn | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """SGD with cosine learning rate on the source classes; the returned model is the epoch
    with the best validation accuracy (early stopping after ``patience`` epochs without gain)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    best = {"val_acc": -1.0, "epoch": -1, "state": None}
    t_start = time.perf_counter()
    history = []
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(train), generator=gen)
        total, n = 0.0, 0
        for i in range(0, len(perm), batch_size):
            idx = perm[i : i + batch_size]
            loss = F.cross_entropy(model(train.x[idx]), train.y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            n += len(idx)
        sched.step()
        val_acc = accuracy(model, val.x, val.y)
        train_loss = total / n
        history.append({"epoch": epoch, "train_loss": train_loss, "val_acc": val_acc})
        if log_metrics:
            log_metrics({"train_loss": train_loss, "val_acc": val_acc}, epoch)
        elapsed = time.perf_counter() - t_start
        left = elapsed / (epoch + 1) * (epochs - epoch - 1)
        log(f"epoch {epoch + 1}/{epochs} loss {train_loss:.4f} val_acc {val_acc:.4f} "
            f"elapsed {elapsed:.1f}s left<={left:.1f}s")
        if val_acc > best["val_acc"]:
            best = {"val_acc": val_acc, "epoch": epoch, "state": copy.deepcopy(model.state_dict())}
        elif epoch - best["epoch"] >= patience:
            log(f"early stop at epoch {epoch + 1}: no gain for {patience} epochs")
            break
    model.load_state_dict(best["state"])
    model.eval()
    return model, {"best_epoch": best["epoch"], "best_val_acc": best["val_acc"],
                   "epochs_run": len(history), "history": history}


class SGD:
    """Plain SGD with momentum and L2 weight decay, the same update as ``torch.optim.SGD``
    (dampening 0, no Nesterov): g = grad + wd * p; b = g on the first step, else m * b + g;
    p -= lr * b. Written out because ``torch.optim`` imports ``torch._dynamo`` on its first
    step (~2 s per process), which every short transfer job would pay."""

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
) -> nn.Module:
    """Adapt ``model`` (whose head is already ``ways``-way) to one support set.

    arm 'finetune': all kept weights train; 'linear_probe': only the head trains.
    BatchNorm statistics stay frozen (eval mode) in both arms: with 1-25 support images,
    batch statistics would be noise. Full-batch when the support fits in ``batch_size``.
    """
    gen = torch.Generator().manual_seed(seed)
    if arm == "linear_probe":
        for p in model.parameters():
            p.requires_grad_(False)
        for p in model.classifier.parameters():
            p.requires_grad_(True)
    elif arm != "finetune":
        raise ValueError(f"unknown transfer arm {arm!r}; allowed: finetune, linear_probe")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    model.eval()
    for _ in range(steps):
        if len(support_y) > batch_size:
            idx = torch.randperm(len(support_y), generator=gen)[:batch_size]
            xb, yb = support_x[idx], support_y[idx]
        else:
            xb, yb = support_x, support_y
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model
