"""The episode optimiser, the fine-tuning and pretraining loops, optimiser checkpoints."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from pruneshot.training import SGD, finetune_episode


def _two_mlps() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    b = copy.deepcopy(a)
    for m in (a, b):
        m[0].bias.requires_grad_(False)  # a frozen parameter is skipped by both
    return a, b


@pytest.mark.parametrize("foreach", [False, None])
@pytest.mark.parametrize(("momentum", "wd"), [(0.0, 0.0), (0.9, 0.0), (0.9, 5e-4), (0.0, 1e-2)])
def test_sgd_is_bitwise_torch_optim_sgd(momentum, wd, foreach):
    """Weight decay before the momentum buffer, the buffer a copy of the first decayed gradient:
    the very arithmetic of torch.optim.SGD (dampening 0, no Nesterov, not maximising; per tensor,
    which ``foreach=None`` also picks for CPU tensors)."""
    a, b = _two_mlps()
    ours = SGD(list(a.parameters()), lr=0.05, momentum=momentum, weight_decay=wd)
    ref = torch.optim.SGD([p for p in b.parameters() if p.requires_grad], lr=0.05, momentum=momentum,
                          weight_decay=wd, dampening=0.0, nesterov=False, maximize=False, foreach=foreach)
    gen = torch.Generator().manual_seed(1)
    for _ in range(7):
        x, y = torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)
        for model, opt in ((a, ours), (b, ref)):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), name
    if momentum:
        ref_bufs = [ref.state[p]["momentum_buffer"] for p in b.parameters() if p.requires_grad]
        for buf, rb in zip(ours.buffers, ref_bufs, strict=True):
            assert torch.equal(buf, rb)
    assert not torch.equal(a[2].weight, _two_mlps()[0][2].weight)  # it trained


def test_finetune_episode_is_bitwise_a_torch_optim_loop():
    """finetune_episode (our SGD) ends with the weights of the same loop on torch.optim.SGD."""
    x, y = torch.randn(10, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    hp = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}
    ours = finetune_episode(_tiny_model().eval(), x, y, arm="finetune", steps=5, batch_size=6, seed=3, **hp)
    ref = _tiny_model().eval()
    opt = torch.optim.SGD(ref.parameters(), foreach=False, **hp)
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        idx = torch.randperm(len(y), generator=gen)[:6]
        loss = nn.functional.cross_entropy(ref(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    for (k, a), b in zip(ours.state_dict().items(), ref.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_optimizer_state_round_trips_through_a_checkpoint(tmp_path, kind):
    """A torch.optim optimiser saved with optimizer_state, written and read back by a Checkpointer and
    restored with load_optimizer continues exactly as the uninterrupted one (momentum buffers, Adam
    moments and step counts, param groups)."""
    from pruneshot.runtime.checkpoint import Checkpointer, load_optimizer, optimizer_state, prefixed, sub

    def make(model: nn.Module) -> torch.optim.Optimizer:
        if kind == "sgd":
            return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        return torch.optim.Adam(model.parameters(), lr=1e-2)

    gen = torch.Generator().manual_seed(4)
    batches = [(torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)) for _ in range(6)]

    def train(model: nn.Module, opt: torch.optim.Optimizer, steps: list) -> None:
        for x, y in steps:
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

    full, _ = _two_mlps()
    train(full, opt_full := make(full), batches)
    first, _ = _two_mlps()
    opt = make(first)
    train(first, opt, batches[:3])
    tensors, meta = optimizer_state("opt", opt)
    ck = Checkpointer(tmp_path / "ck", "k")
    ck.save({**prefixed("model", first.state_dict()), **tensors}, {"optimizer": meta})
    loaded = ck.load()
    assert loaded is not None
    resumed, _ = _two_mlps()
    resumed.load_state_dict(sub(loaded.tensors, "model"))
    opt_resumed = make(resumed)
    load_optimizer(opt_resumed, loaded.tensors, loaded.state["optimizer"], "opt")
    train(resumed, opt_resumed, batches[3:])
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    want, got = opt_full.state_dict(), opt_resumed.state_dict()
    # the JSON manifest gives tuples (Adam's betas) back as lists: equal values, which Adam unpacks alike
    assert json.loads(json.dumps(want["param_groups"])) == got["param_groups"]
    assert set(want["state"]) == set(got["state"])
    for idx, state in want["state"].items():
        assert set(state) == set(got["state"][idx])
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(got["state"][idx][key])), (idx, key)


def test_checkpoint_location_is_below_the_study_root(tmp_path):
    """results/<study>/<stage>/... -> results/<study>/checkpoints/<stage>/..., cleaned up to the study root."""
    from pruneshot.paths import RESULTS, StudyPaths
    from pruneshot.runtime.checkpoint import Checkpointer, checkpoint_location

    assert checkpoint_location(Path("results/digits_default/search/dap/b0.5/r0")) == (
        Path("results/digits_default/checkpoints/search/dap/b0.5/r0"), Path("results/digits_default"))
    paths = StudyPaths("s1", str(tmp_path))
    out = Path(paths.result("pretrain_weights", replicate=0)).parent
    assert checkpoint_location(out) == (Path(paths.result("checkpoints"), "pretrain", "r0"), Path(paths.results_root))
    assert RESULTS["checkpoints"] == "checkpoints"
    assert checkpoint_location(tmp_path / "results" / "s1") == (tmp_path / "results/.checkpoints/s1",
                                                              tmp_path / "results")  # the root itself
    assert checkpoint_location(tmp_path / "pre") == (tmp_path / ".checkpoints/pre", tmp_path)
    # clear() removes emptied parents up to the study root and leaves a sibling's checkpoint alone
    a, b = (Checkpointer.for_outputs(Path(paths.result("search_weights", method="dnal", budget=budget,
                                                       replicate=0)).parent, "k") for budget in (0.5, 0.25))
    a.save({"x": torch.zeros(1)}, {})
    b.save({"x": torch.zeros(1)}, {})
    assert a.directory == Path(paths.results_root, "checkpoints/search/dnal/b0.5/r0")
    a.clear()
    assert not a.directory.parent.exists() and b.exists()
    b.clear()
    assert not Path(paths.result("checkpoints")).exists() and Path(paths.results_root).is_dir()


def test_finetune_linear_probe_trains_only_the_head():
    from pruneshot.models.small_cnn import SmallCNN

    torch.manual_seed(0)
    model = SmallCNN(1, 8, [4, 8], 3).eval()
    body = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("classifier")}
    head = model.classifier.weight.clone()
    x, y = torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    finetune_episode(model, x, y, arm="linear_probe", steps=3, lr=0.1, momentum=0.9, weight_decay=0.0,
                     batch_size=25, seed=0)
    for k, v in model.state_dict().items():
        if k in body:
            assert torch.equal(v, body[k]), k
    assert not torch.equal(model.classifier.weight, head)
    with pytest.raises(ValueError, match="unknown transfer arm"):
        finetune_episode(model, x, y, arm="reinit", steps=1, lr=0.1, momentum=0.0, weight_decay=0.0,
                         batch_size=25, seed=0)


# --- pretraining through the device-resident input pipeline -------------------------------------

def _digits_in_memory(n_train: int = 300, n_val: int = 100):
    """uint8 digits (levels 0..16) of classes 0-2, their normalisation, and load_split-style floats."""
    import numpy as np

    from pruneshot.data.prepare import load_raw
    from pruneshot.data.splits import Split

    raw = load_raw("digits")
    keep = np.flatnonzero(raw.y < 3)[: n_train + n_val]
    x, y = torch.from_numpy(raw.x[keep]), torch.from_numpy(raw.y[keep])
    scaled = raw.x[keep[:n_train]].astype(np.float64) / raw.max_value
    norm = {"mean": float(scaled.mean()), "std": float(scaled.std())}

    def floats(sl: slice) -> Split:
        return Split(x=(x[sl].float() / raw.max_value - norm["mean"]) / norm["std"], y=y[sl].long())

    return x, y, raw.max_value, norm, floats(slice(0, n_train)), floats(slice(n_train, None))


def _reference_pretrain(model, train, val, *, epochs, batch_size, lr, momentum, weight_decay, seed):
    """The CPU loop pretrain ran before the input pipeline existed (no early stop in these runs)."""
    import copy

    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    best, history = (-1.0, None), []
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
        model.eval()
        with torch.no_grad():
            correct = sum((model(val.x[i : i + 512]).argmax(1) == val.y[i : i + 512]).sum().item()
                          for i in range(0, len(val), 512))
        val_acc = correct / len(val)
        history.append({"epoch": epoch, "train_loss": total / n, "val_acc": val_acc})
        if val_acc > best[0]:
            best = (val_acc, copy.deepcopy(model.state_dict()))
    model.load_state_dict(best[1])
    return model.eval(), history


HP = {"epochs": 3, "batch_size": 64, "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "seed": 11}


def _tiny_model():
    from pruneshot.models.small_cnn import SmallCNN

    torch.manual_seed(0)
    return SmallCNN(1, 8, [4, 8], 3)


def test_pretrain_without_augmentation_reproduces_the_plain_loop_exactly():
    """Augmentation off: uint8 on the device, normalised per batch, gives the very weights and
    history of the old float loop (and so does handing pretrain the float Splits)."""
    from pruneshot.data.pipeline import Augment, BatchSource
    from pruneshot.training import pretrain

    x, y, max_value, norm, train, val = _digits_in_memory()
    ref_model, ref_hist = _reference_pretrain(_tiny_model(), train, val, **HP)
    sources = (BatchSource(x[:300], y[:300], max_value=max_value, **norm),
               BatchSource(x[300:], y[300:], max_value=max_value, **norm))
    for tr, va, augment in ((*sources, None), (*sources, Augment()), (train, val, None)):
        model, info = pretrain(_tiny_model(), tr, va, patience=10, augment=augment, log=lambda _m: None, **HP)
        assert info["history"] == ref_hist
        for (k, a), b in zip(model.state_dict().items(), ref_model.state_dict().values(), strict=True):
            assert torch.equal(a, b), k
    assert info["applied"] == {"device": "cpu", "device_name": info["applied"]["device_name"], "amp": "none",
                               "channels_last": False, "augment": {"crop_padding": 0, "flip": False}}


def test_pretrain_with_augmentation_is_seeded_and_changes_training():
    from pruneshot.data.pipeline import Augment, BatchSource
    from pruneshot.training import pretrain

    x, y, max_value, norm, _, _ = _digits_in_memory()
    tr = BatchSource(x[:300], y[:300], max_value=max_value, **norm)
    va = BatchSource(x[300:], y[300:], max_value=max_value, **norm)
    aug = Augment(crop_padding=1, flip=True)
    runs = [pretrain(_tiny_model(), tr, va, patience=10, augment=aug, amp="bf16", channels_last=True,
                     log=lambda _m: None, **{**HP, "seed": s}) for s in (11, 11, 12)]
    plain, _ = pretrain(_tiny_model(), tr, va, patience=10, log=lambda _m: None, **HP)
    (a, ia), (b, ib), (c, _) = runs
    w = "features.0.0.weight"
    assert ia["history"] == ib["history"]
    assert torch.equal(a.state_dict()[w], b.state_dict()[w])
    assert not torch.equal(a.state_dict()[w], c.state_dict()[w])
    assert not torch.equal(a.state_dict()[w], plain.state_dict()[w])
    # CPU: float32, no autocast, contiguous weights on the CPU whatever was requested
    assert ia["applied"]["amp"] == "none" and ia["applied"]["channels_last"] is False
    assert ia["applied"]["augment"] == {"crop_padding": 1, "flip": True}
    assert ia["applied"]["device_name"].startswith("cpu:")
    for v in a.state_dict().values():
        assert v.device.type == "cpu" and v.is_contiguous()
        assert not v.is_floating_point() or v.dtype == torch.float32


def test_finetune_with_crop_flip_is_seeded_and_differs_from_none():
    from pruneshot.data.pipeline import Augment

    x, y = torch.randn(10, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])

    def run(augment, seed=0):
        model = _tiny_model().eval()
        finetune_episode(model, x, y, arm="finetune", steps=4, lr=0.1, momentum=0.9, weight_decay=0.0,
                         batch_size=6, seed=seed, augment=augment, fill=-0.5)
        return model.classifier.weight.detach().clone()

    aug = Augment(crop_padding=2, flip=True)
    assert torch.equal(run(aug), run(aug))
    assert not torch.equal(run(aug), run(None))
    assert not torch.equal(run(aug), run(aug, seed=1))
    assert torch.equal(run(Augment()), run(None))  # all off: the old draws exactly


def test_a_non_finite_fine_tuning_loss_fails_instead_of_scoring_a_broken_network():
    import pytest
    import torch

    from pruneshot.models.small_cnn import SmallCNN
    from pruneshot.training import finetune_episode

    torch.manual_seed(0)
    model = SmallCNN(in_channels=1, input_size=8, widths=[4, 8], num_classes=3).eval()
    x, y = torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    finetune_episode(model, x, y, arm="finetune", steps=3, lr=0.01, momentum=0.9, weight_decay=0.0, batch_size=6,
                     seed=0)  # finite: no error
    with pytest.raises(FloatingPointError, match="non-finite"):
        finetune_episode(model, x, y, arm="finetune", steps=20, lr=1e12, momentum=0.9, weight_decay=0.0,
                         batch_size=6, seed=0)


# the arms' combinations: finetune and linear_probe with frozen BatchNorm, reinit (finetune) with batch statistics
@pytest.mark.parametrize(("arm", "batch_norm"), [("finetune", "frozen"), ("linear_probe", "frozen"),
                                                 ("finetune", "batch")])
def test_on_step_sees_exactly_the_weights_of_a_shorter_run(arm, batch_norm):
    """Transfer selection scores several step counts in one run: the network after k steps of a long run
    (read in on_step, with an evaluation in between) is bitwise the network of a k-step run, and the
    long run's end is unchanged by the evaluations."""
    from pruneshot.training import accuracy

    x, y = torch.randn(12, 1, 8, 8), torch.tensor([0, 1, 2] * 4)
    qx, qy = torch.randn(9, 1, 8, 8), torch.tensor([0, 1, 2] * 3)
    kw = dict(arm=arm, lr=0.1, momentum=0.9, weight_decay=5e-4, batch_size=6, seed=3, batch_norm=batch_norm)

    def state(model):
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    seen, accs = {}, {}

    def on_step(k, model=None):
        if k in (0, 3, 7):
            seen[k] = state(long)
            accs[k] = accuracy(long, qx, qy)  # an evaluation in eval mode, as selection does

    long = _tiny_model()
    finetune_episode(long, x, y, steps=10, on_step=on_step, **kw)
    assert sorted(seen) == [0, 3, 7]
    for k in (0, 3, 7):
        short = _tiny_model()
        finetune_episode(short, x, y, steps=k, **kw)
        assert all(torch.equal(seen[k][n], v) for n, v in state(short).items()), k
        assert accs[k] == accuracy(short, qx, qy)
    plain = _tiny_model()
    finetune_episode(plain, x, y, steps=10, **kw)
    assert all(torch.equal(v, state(plain)[n]) for n, v in state(long).items())


def test_a_diverging_pretraining_fails_instead_of_keeping_a_broken_network():
    """Issue 14: only fine-tuning checked its loss; a pretraining (and so a scratch search) whose loss
    became NaN went on, and early stopping kept whichever epoch scored best on validation."""
    from pruneshot.training import pretrain, require_finite

    *_, train, val = _digits_in_memory(120, 40)
    with pytest.raises(FloatingPointError, match=r"pretraining, epoch 1 \(lr 1e\+30\).*non-finite"):
        pretrain(_tiny_model(), train, val, epochs=3, batch_size=32, lr=1e30, momentum=0.9, weight_decay=0.0,
                 patience=3, seed=0, log=lambda _m: None)
    require_finite(0.5, "a finite loss")  # no error
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(FloatingPointError, match="some loop: the loss became non-finite"):
            require_finite(bad, "some loop")
