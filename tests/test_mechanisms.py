"""The mechanisms behind slimming and channel_scaling act at their default options.

Slimming: the L1 fine-tune makes gamma sparse and changes which channels a global |gamma| ranking
keeps (a ranking of the pretrained |gamma| is not slimming). Channel scaling: the L1 penalty drives
scales below the threshold, so some channels are removed by the threshold and not only by the
ranking fallback. Small real data: scikit-learn's digits (source 0-4, target 5-9), a briefly
pretrained SmallCNN, 5-way 1- and 5-shot episodes."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from pruneshot.data.prepare import load_raw
from pruneshot.data.splits import Split
from pruneshot.methods import AdaptContext, SearchContext, get_method
from pruneshot.methods import slimming as slim_mod
from pruneshot.models import cost as metrics
from pruneshot.models.small_cnn import SmallCNN
from pruneshot.training import pretrain

WAYS = 5


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These tiny networks run fastest on one thread (and the test machine's cores are shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data() -> dict[str, Split]:
    """Digits 0-4: 240 training and 60 validation images; digits 5-9: the target pool. All
    normalised with the source training statistics, as the pipeline does."""
    raw = load_raw("digits")
    x_all = torch.from_numpy(raw.x).float() / raw.max_value
    y_all = torch.from_numpy(raw.y)
    src = np.random.default_rng(0).permutation(np.flatnonzero(np.isin(raw.y, [0, 1, 2, 3, 4])))[:300]
    tgt = np.flatnonzero(np.isin(raw.y, [5, 6, 7, 8, 9]))
    mean, std = x_all[src[60:]].mean(), x_all[src[60:]].std()
    x_all = (x_all - mean) / std
    return {"train": Split(x_all[src[60:]], y_all[src[60:]]), "val": Split(x_all[src[:60]], y_all[src[:60]]),
            "pool": Split(x_all[tgt], y_all[tgt] - 5)}


@pytest.fixture(scope="module")
def dense(data) -> SmallCNN:
    """A SmallCNN briefly trained on the source digits (eval mode)."""
    torch.manual_seed(0)
    model = SmallCNN(in_channels=1, input_size=8, widths=[32, 64, 128], num_classes=5)
    model, _ = pretrain(model, data["train"], data["val"], epochs=6, batch_size=64, lr=0.05, momentum=0.9,
                        weight_decay=5e-4, patience=6, seed=0, log=lambda _m: None)
    return model.eval()


# ----------------------------------------------------------------------------------- slimming


@pytest.fixture(scope="module")
def slimmed(dense, data):
    """(input network, fine-tuned network, result) of slimming at its defaults, budget 0.5 of params."""
    model = copy.deepcopy(dense)
    ctx = SearchContext(model=model, budget=0.5, metric="params", source_train=data["train"],
                        source_val=data["val"], seed=3, log=lambda _m: None)
    return dense, model, get_method("slimming").search(ctx)


def _sparsity(model) -> float:
    flat = torch.cat(list(slim_mod.gamma_scores(model).values()))
    return float((flat < slim_mod.SPARSE_GAMMA * flat.max()).float().mean())


def test_slimming_makes_gamma_sparse(slimmed):
    before_net, after_net, res = slimmed
    before, after = _sparsity(before_net), _sparsity(after_net)
    assert after >= before + 0.2, (before, after)
    info = res.info
    assert info["gamma_sparsity_before"] == pytest.approx(before)
    assert info["gamma_sparsity_after"] == pytest.approx(after)
    moved = max(float((a.detach() - b.detach()).abs().max())
                for ws_a, ws_b in zip(slim_mod.bn_gammas(after_net).values(), slim_mod.bn_gammas(before_net).values(),
                                      strict=True) for a, b in zip(ws_a, ws_b, strict=True))
    assert info["gamma_moved_max"] == pytest.approx(moved) and moved > 0.1
    assert len(info["gamma_quantiles_after"]) == len(info["gamma_quantile_levels"])
    json.dumps(info)  # the record is plain JSON


def test_slimming_keeps_other_channels_than_a_plain_gamma_ranking(slimmed):
    before_net, _, res = slimmed
    plain, _ = slim_mod.global_keep(before_net, slim_mod.gamma_scores(before_net), 0.5, "params")
    assert res.keep != plain
    shared = sum(len(set(res.keep[g]) & set(plain[g])) for g in plain)
    overlap = shared / sum(len(i) for i in res.keep.values())
    assert res.info["overlap_with_plain_ranking"] == pytest.approx(overlap)
    assert overlap < 0.95


# ----------------------------------------------------------------------------------- channel scaling


def _episode(pool: Split, shots: int, seed: int, queries: int = 10) -> tuple[torch.Tensor, ...]:
    """(support x, support y, query x, query y) of one 5-way episode of the target pool."""
    rng = np.random.default_rng(seed)
    sup, qry = [], []
    for c in range(WAYS):
        idx = rng.permutation(np.flatnonzero(pool.y.numpy() == c))
        sup.append(idx[:shots])
        qry.append(idx[shots:shots + queries])
    s, q = np.concatenate(sup), np.concatenate(qry)
    return pool.x[s], pool.y[s], pool.x[q], pool.y[q]


@pytest.mark.parametrize("shots", [1, 5])
@pytest.mark.parametrize("budget", [0.5, 0.25])
def test_channel_scaling_threshold_removes_channels_at_the_defaults(dense, data, shots, budget):
    sx, sy, _, _ = _episode(data["pool"], shots, seed=shots)
    model = copy.deepcopy(dense)
    model.reset_classifier(WAYS, torch.Generator().manual_seed(1))
    model.eval()
    dense_cost = float(metrics.cost(model, "params"))
    res = get_method("channel_scaling").adapt(AdaptContext(
        model=model, budget=budget, metric="params", support_x=sx, support_y=sy, seed=11, dense_cost=dense_cost,
        log=lambda _m: None))
    info = res.info
    assert info["removed_by_threshold"] > 0
    removed = sum(model.channel_groups().values()) - sum(len(i) for i in res.keep.values())
    assert info["removed_by_threshold"] + info["removed_by_ranking"] == removed
    assert info["threshold_share"] == pytest.approx(info["removed_by_threshold"] / removed)
    assert 0 < info["scale_kept_min"] <= info["scale_kept_median"] <= info["scale_kept_max"]
    # the threshold never prunes past the budget: still met from below within two points
    assert budget - 0.02 <= metrics.cost(res.model, "params") / dense_cost <= budget
    json.dumps(info)
