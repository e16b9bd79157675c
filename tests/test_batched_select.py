"""Selection (select_transfer) in chunks of transfer.episode_batch against one validation episode at a time,
and pruneshot.batching.finetune_batched's on_step hook.

Exactness: in float64 the selection records at episode_batch 2 and 3 equal the reference's (episode_batch 1)
in every per-(arm, lr, steps) mean accuracy, chosen (lr, steps) and diverged learning rate. In float32 the
stacked layers sum in another order (weights within about 1e-7 relative, tests/test_batching.py), which
could flip a query on a decision boundary; the tolerance accepted on these tiny sets is none: every mean
accuracy identical (asserted, as it is observed), like the transfer stage's per-episode accuracies."""

from __future__ import annotations

import copy

import pytest
import torch
from test_batching import SMALL
from test_batching import _episodes as _nets
from test_transfer_stage import SHOTS, _job, _network, _select_cfg
from test_transfer_stage import world as world  # the shared fixture

from pruneshot.batching import finetune_batched
from pruneshot.data.pipeline import Augment
from pruneshot.methods import get_method
from pruneshot.training import finetune_episode


@pytest.fixture(scope="module")
def validation3(world: dict) -> dict:
    """Three 3-way validation episodes (chunks of 2: one full, one partial) and a grid whose step counts
    a target-side method's 4 adapt steps leave 0, 2 and 4 arm steps of (k = 0 is scored too)."""
    from pruneshot.config import select_ways
    from pruneshot.stages.data import make_episodes, prepare_select
    from pruneshot.stages.select import SELECT_AXIS

    cfg = _select_cfg(world)
    cfg["transfer"]["select"].update(lr=[0.01, 0.1], steps=[4, 6, 8], episodes=3)
    out = world["tmp"] / "select3"
    prepare_select(cfg, out / "data", _job("prepare_select"))
    make_episodes(cfg, SELECT_AXIS, select_ways(cfg), SHOTS, out / "data/manifest.json", out / "episodes.json",
                  _job("make_select_episodes"), count=3)
    return {"cfg": cfg, "manifest": out / "data/manifest.json", "episodes": out / "episodes.json", "dir": out}


def _select(world: dict, validation: dict, method: str, budget: float, name: str, **transfer: object) -> dict:
    from pruneshot.stages.select import select_transfer

    cfg = copy.deepcopy(validation["cfg"])
    cfg["transfer"].update(transfer)
    weights, arch, record = _network(world, method, budget)
    arms = get_method(method).arms(["finetune", "linear_probe", "reinit", "prototype"])
    return select_transfer(cfg, method, arms, SHOTS, 0, budget, weights, arch, record, world["src"] / "manifest.json",
                           validation["manifest"], validation["episodes"], validation["dir"] / f"{method}_{name}.json",
                           _job("select_transfer"))


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, bool]]:
    """(networks, on_step given) of every finetune_batched call."""
    import pruneshot.batching

    calls: list[tuple[int, bool]] = []
    batched = pruneshot.batching.finetune_batched

    def spying(models, *a, **k):
        calls.append((len(models), k.get("on_step") is not None))
        return batched(models, *a, **k)

    monkeypatch.setattr(pruneshot.batching, "finetune_batched", spying)
    return calls


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize(("method", "budget"), [("l1_filter", 0.5), ("random", 0.5), ("channel_scaling", 0.5),
                                                ("dense", 1.0)])
def test_selection_in_chunks_equals_the_reference(world, validation3, spy, method, budget, dtype):
    """Every trained arm the method runs (source-side and dense: finetune, linear_probe, reinit; target-side:
    finetune, linear_probe): identical mean accuracy per (arm, lr, steps), choice and diverged lrs."""
    ref = _select(world, validation3, method, budget, f"{dtype}_1", dtype=dtype, episode_batch=1)
    assert ref["status"] == "ok", ref["error"]
    assert spy == []  # the reference engine never stacks
    trained = {"finetune", "linear_probe"} | ({"reinit"} if get_method(method).side == "source" else set())
    assert set(ref["arms"]) == trained and ref["device"] == {**ref["device"], "dtype": dtype, "episode_batch": 1}
    for k in (2, 3):  # 3 episodes: a full chunk and a lone episode; one chunk of all three
        spy.clear()
        got = _select(world, validation3, method, budget, f"{dtype}_{k}", dtype=dtype, episode_batch=k)
        assert got["status"] == "ok", got["error"]
        assert got["device"] == {**ref["device"], "episode_batch": k}
        assert got["candidate_steps"] == ref["candidate_steps"]
        assert got["arms"] == ref["arms"], k  # every mean accuracy, the chosen (lr, steps), diverged_lr
        assert all(on_step for _n, on_step in spy)
        if get_method(method).side == "source":  # one architecture: per trained arm and lr the chunk of k stacked
            assert spy == [(k, True)] * (len(trained) * 2), spy
    # target-side: the adapted widths differ per episode, so a chunk mixes stacked groups and lone networks
    assert spy and max(n for n, _ in spy) >= 2, spy


def test_chunks_of_three_and_a_diverging_learning_rate(world, validation3, spy):
    """One chunk of all three episodes; a learning rate whose loss becomes non-finite in the stacked run is
    recorded exactly as the reference loop records it (diverged, not a candidate, NaN grid entries)."""
    lrs = [0.01, 1e30, 0.1]
    grid = {**validation3, "cfg": copy.deepcopy(validation3["cfg"])}
    grid["cfg"]["transfer"]["select"]["lr"] = lrs
    ref = _select(world, grid, "l1_filter", 0.5, "div_1", episode_batch=1)
    got = _select(world, grid, "l1_filter", 0.5, "div_3", episode_batch=3)
    assert ref["status"] == got["status"] == "ok"
    assert got["device"]["episode_batch"] == 3
    for arm, r in ref["arms"].items():
        assert r["diverged_lr"] == [1e30], arm
        assert r["chosen"]["lr"] != 1e30
    assert repr(got["arms"]) == repr(ref["arms"])  # NaN entries included (NaN != NaN in ==)
    assert spy and all(n == 3 and on_step for n, on_step in spy), spy


def test_learning_rates_diverging_on_different_episodes_keep_the_reference_order(world, validation3, monkeypatch):
    """diverged_lr lists the learning rates in the order the one-episode-at-a-time loop finds them (by first
    diverging episode, then grid order), also when one stacked chunk finds them all at once. The divergence
    is simulated (lr 0.1 on the first episode, lr 0.01 on the second; every arm) at the training calls."""
    import pruneshot.stages.select as select
    from pruneshot.io import read_json
    from pruneshot.stages.transfer import episode_seeds

    cfg = validation3["cfg"]
    trained = ["finetune", "linear_probe", "reinit"]
    indices = [e["index"] for e in read_json(validation3["episodes"])["episodes"]]
    position = {episode_seeds(cfg, 0, select.SELECT_AXIS, 3, SHOTS, ix, trained)["finetune"][arm]: pos
                for pos, ix in enumerate(indices) for arm in trained}
    bad = {(0, 0.1), (1, 0.01)}
    grid_run, grid_run_batched = select._grid_run, select._grid_run_batched

    def diverging(s, arm, model, tensors, lr, seed, wanted):
        if (position[seed], lr) in bad:
            raise FloatingPointError("simulated")
        return grid_run(s, arm, model, tensors, lr, seed, wanted)

    def diverging_batched(s, arm, models, tensors, lr, seeds, wanted):
        if hit := [i for i, seed in enumerate(seeds) if (position[seed], lr) in bad]:
            err = FloatingPointError("simulated")
            err.networks = hit
            raise err
        return grid_run_batched(s, arm, models, tensors, lr, seeds, wanted)

    monkeypatch.setattr(select, "_grid_run", diverging)
    monkeypatch.setattr(select, "_grid_run_batched", diverging_batched)
    three = {**validation3, "cfg": copy.deepcopy(cfg)}
    three["cfg"]["transfer"]["select"]["lr"] = [0.01, 0.1, 0.05]
    ref = _select(world, three, "l1_filter", 0.5, "order_1", episode_batch=1)
    got = _select(world, three, "l1_filter", 0.5, "order_3", episode_batch=3)
    assert ref["status"] == got["status"] == "ok"
    for arm in trained:
        assert ref["arms"][arm]["diverged_lr"] == [0.1, 0.01], arm
    assert repr(got["arms"]) == repr(ref["arms"])


# --- finetune_batched's on_step ------------------------------------------------------------------------

ON_STEP_CASES = {
    "finetune": dict(arm="finetune", batch_size=5),
    "linear_probe, cached features": dict(arm="linear_probe", batch_size=5),
    "reinit (batch statistics), crop_flip": dict(arm="finetune", batch_size=5, batch_norm="batch",
                                                 augment=Augment(crop_padding=1, flip=True)),
}


@pytest.mark.parametrize("case", list(ON_STEP_CASES))
def test_on_step_sees_each_network_s_k_step_weights(case):
    """float64: at on_step(k) every network's parameters equal a k-step finetune_episode run's (to 1e-12,
    the stacked layers' rounding), its mode is finetune_episode's; scoring there (eval mode) leaves the
    training as it is without on_step, bit for bit."""
    steps, k_nets = 4, 3
    kw = {"steps": steps, "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, **ON_STEP_CASES[case]}
    train_mode = kw.get("batch_norm") == "batch"
    models, xs, ys = _nets(SMALL, k_nets, 10, torch.float64)
    seeds = [11 + i for i in range(k_nets)]
    seen: dict[int, list[list[torch.Tensor]]] = {}
    bat = [copy.deepcopy(m) for m in models]

    def on_step(k: int) -> None:
        assert all(m.training == train_mode for m in bat)
        seen[k] = [[p.detach().clone() for p in m.parameters()] for m in bat]
        for m in bat:
            m.eval()  # as scoring does: finetune_batched restores the mode

    finetune_batched(bat, xs, ys, seeds=seeds, on_step=on_step, **kw)
    assert sorted(seen) == list(range(steps + 1))
    assert all(m.training == train_mode for m in bat)
    for k in range(steps + 1):
        for i, m in enumerate(models):
            ref = copy.deepcopy(m)
            finetune_episode(ref, xs[i], ys[i], seed=seeds[i], **{**kw, "steps": k})
            for p, q in zip(ref.parameters(), seen[k][i], strict=True):
                torch.testing.assert_close(q, p.detach(), rtol=0, atol=1e-12, msg=f"{case}: step {k}, network {i}")
    plain = [copy.deepcopy(m) for m in models]
    finetune_batched(plain, xs, ys, seeds=seeds, **kw)
    for a, b in zip(plain, bat, strict=True):
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
