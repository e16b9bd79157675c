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


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


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
def mnist14() -> dict[str, Split]:
    """The embedded default's data, smaller: mnist10k digits 0-4 at 14x14 (1,600 training and 300
    validation images), normalised with the training statistics."""
    import torch.nn.functional as F

    raw = load_raw("mnist10k")
    src = np.random.default_rng(0).permutation(np.flatnonzero(np.isin(raw.y, [0, 1, 2, 3, 4])))[:1900]
    x = torch.from_numpy(raw.x[src]).float() / raw.max_value
    x = F.interpolate(x, size=(14, 14), mode="bilinear", antialias=True, align_corners=False)
    y = torch.from_numpy(raw.y[src])
    mean, std = x[300:].mean(), x[300:].std()
    x = (x - mean) / std
    return {"train": Split(x[300:], y[300:]), "val": Split(x[:300], y[:300])}


@pytest.fixture(scope="module")
def slimmed(mnist14):
    """(input network, fine-tuned network, result) of slimming at its defaults, budget 0.5 of params, on
    a SmallCNN [32, 64, 128] (the default backbone) briefly pretrained on ``mnist14``."""
    torch.manual_seed(0)
    dense = SmallCNN(in_channels=1, input_size=14, widths=[32, 64, 128], num_classes=5)
    dense, _ = pretrain(dense, mnist14["train"], mnist14["val"], epochs=3, batch_size=64, lr=0.05, momentum=0.9,
                        weight_decay=5e-4, patience=3, seed=0, log=lambda _m: None)
    dense = dense.eval()
    model = copy.deepcopy(dense)
    ctx = SearchContext(model=model, budget=0.5, metric="params", source_train=mnist14["train"],
                        source_val=mnist14["val"], seed=3, log=lambda _m: None)
    return dense, model, get_method("slimming").search(ctx)


def test_slimming_rescales_the_shrunken_gammas_without_changing_the_network(slimmed, mnist14):
    """The L1 leaves the kept gammas small; the pruned network gets them back to mean 1 per group with the
    readers' BN statistics compensated: the same predictions, and the next layers' BN variance far from eps."""
    _, _, res = slimmed
    assert res.info["gamma_rescale"] and all(0 < c < 1 for c in res.info["gamma_rescale"].values())
    plain = copy.deepcopy(res.model)  # the pruned network as it was before the rescaling (exact inverse)
    slim_mod.rescale_gammas(plain, {g: 1 / c for g, c in res.info["gamma_rescale"].items()})
    plain.eval()
    x = mnist14["val"].x
    with torch.no_grad():
        agree = float((plain(x).argmax(1) == res.model.eval()(x).argmax(1)).float().mean())
    assert agree >= 0.98
    for g, bns in res.model.group_bns().items():
        if g in res.info["gamma_rescale"]:
            assert float(torch.cat([bn.weight.abs() for bn in bns]).mean()) == pytest.approx(1.0, rel=1e-4)
    var_plain = min(float(b.min()) for n, b in plain.named_buffers() if n.endswith("running_var"))
    var_scaled = min(float(b.min()) for n, b in res.model.named_buffers() if n.endswith("running_var"))
    assert var_scaled > var_plain


def _sparsity(model) -> float:
    flat = torch.cat(list(slim_mod.gamma_scores(model).values()))
    return float((flat < slim_mod.SPARSE_GAMMA * flat.max()).float().mean())


def test_slimming_shrinks_gamma_and_records_it(slimmed):
    """The L1 fine-tune pulls the gammas towards zero (median |gamma| at least halved; at the old defaults it
    moved by < 1e-3); on the full default data a third of them end below 1% of the largest (README). The
    record's figures are those of the fine-tuned network before the pruned one's rescaling."""
    before_net, _, res = slimmed
    info = res.info
    assert info["gamma_sparsity_before"] == pytest.approx(_sparsity(before_net))
    assert info["gamma_sparsity_after"] >= info["gamma_sparsity_before"]
    mid = info["gamma_quantile_levels"].index(0.5)
    assert info["gamma_quantiles_after"][mid] < 0.5 * info["gamma_quantiles_before"][mid]
    assert info["gamma_moved_max"] > 0.1
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
