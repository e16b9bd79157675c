"""Seed derivation (pruneshot.seeds) and fixed few-shot episodes (pruneshot.data.episodes)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from pruneshot.data.episodes import make_episodes
from pruneshot.seeds import AXES, derive_seed

# ----------------------------------------------------------------------------- seeds


def test_derive_seed_is_deterministic():
    for axis in AXES:
        assert derive_seed(7, axis, "t", 5, 1, 3) == derive_seed(7, axis, "t", 5, 1, 3)


def test_derive_seed_range_and_type():
    seeds = [
        derive_seed(root, axis, *values)
        for root in (0, 1, 2**40)
        for axis in AXES
        for values in [(), ("x",), ("digits_5to9", 5, 1, 19), (3,)]
    ]
    for s in seeds:
        assert isinstance(s, int)
        assert 0 <= s < 2**31
    # 72 inputs in a 2**31 space: a collision would mean the inputs are being ignored.
    assert len(set(seeds)) == len(seeds)


def test_derive_seed_differs_across_axes_values_and_roots():
    by_axis = {axis: derive_seed(0, axis, 1) for axis in AXES}
    assert len(set(by_axis.values())) == len(AXES)
    episode_seeds = {derive_seed(0, "episode", "t", 5, 1, i) for i in range(100)}
    assert len(episode_seeds) == 100
    assert derive_seed(0, "pretrain", 0) != derive_seed(1, "pretrain", 0)
    assert derive_seed(0, "episode", "a", 5, 1, 0) != derive_seed(0, "episode", "b", 5, 1, 0)
    assert derive_seed(0, "episode", "t", 5, 1, 0) != derive_seed(0, "episode", "t", 5, 5, 0)


def test_changing_one_axis_value_leaves_other_axes_alone():
    # The seed of the pretraining replicate must not depend on which episode/target
    # or how many shots are requested, and vice versa.
    pretrain_before = derive_seed(3, "pretrain", 0)
    search_before = derive_seed(3, "search", 0)
    episode_seeds = [
        derive_seed(3, "episode", t, w, s, i) for t, w, s, i in itertools.product(["a", "b"], [2, 5], [1, 5], range(3))
    ]
    assert len(set(episode_seeds)) == len(episode_seeds)
    assert derive_seed(3, "pretrain", 0) == pretrain_before
    assert derive_seed(3, "search", 0) == search_before
    # ...and a different pretraining replicate does not move the episode seeds.
    assert derive_seed(3, "pretrain", 1) != pretrain_before
    assert [
        derive_seed(3, "episode", t, w, s, i) for t, w, s, i in itertools.product(["a", "b"], [2, 5], [1, 5], range(3))
    ] == episode_seeds


@pytest.mark.parametrize("axis", ["Episode", "episodes", "", "model"])
def test_unknown_axis_raises_naming_allowed_axes(axis):
    with pytest.raises(ValueError) as err:
        derive_seed(0, axis, 1)
    msg = str(err.value)
    assert repr(axis) in msg
    for allowed in AXES:
        assert allowed in msg


# -------------------------------------------------------------------------- episodes

# A pool with unequal classes: class c (of 7) has SIZES[c] images, interleaved.
SIZES = {0: 12, 1: 20, 2: 9, 3: 30, 4: 16, 5: 25, 6: 11}


def _pool() -> np.ndarray:
    labels = np.concatenate([np.full(n, c) for c, n in SIZES.items()])
    return np.random.default_rng(123).permutation(labels)


def _make(labels, **overrides):
    kw = {"ways": 4, "shots": 3, "count": 10, "queries_per_class": 7, "root_seed": 0, "target": "pool"}
    kw.update(overrides)
    return make_episodes(labels, **kw)


@pytest.mark.parametrize(("ways", "shots", "qpc"), [(4, 3, 7), (5, 1, 15), (7, 8, 100), (2, 5, 1)])
def test_episode_structure(ways, shots, qpc):
    labels = _pool()
    episodes = _make(labels, ways=ways, shots=shots, queries_per_class=qpc, count=12)
    assert len(episodes) == 12
    for i, ep in enumerate(episodes):
        assert ep["index"] == i
        assert ep["seed"] == derive_seed(0, "episode", "pool", ways, shots, i)
        chosen = ep["classes"]
        assert len(chosen) == ways
        assert len(set(chosen)) == ways
        assert chosen == sorted(chosen)
        assert set(chosen) <= set(SIZES)
        support, query = ep["support"], ep["query"]
        # no index repeated inside support or query, and the two are disjoint
        assert len(set(support)) == len(support)
        assert len(set(query)) == len(query)
        assert not set(support) & set(query)
        assert len(ep["support_labels"]) == len(support)
        assert len(ep["query_labels"]) == len(query)
        # every index belongs to one of the chosen classes, with label = position in `chosen`
        for idx, lab in zip(support + query, ep["support_labels"] + ep["query_labels"], strict=True):
            assert 0 <= idx < len(labels)
            assert int(labels[idx]) == chosen[lab]
        for lab, c in enumerate(chosen):
            assert ep["support_labels"].count(lab) == shots
            assert ep["query_labels"].count(lab) == min(qpc, SIZES[c] - shots)


def test_queries_capped_by_available_images():
    # shots 8 and 100 queries: class 2 (9 images) has exactly 1 query; every class is used
    # (7-way over 7 classes), so the cap must hit every class.
    (ep,) = _make(_pool(), ways=7, shots=8, queries_per_class=100, count=1)
    assert ep["classes"] == list(range(7))
    for lab, c in enumerate(ep["classes"]):
        assert ep["query_labels"].count(lab) == SIZES[c] - 8
    # the support and query of a class together use all of its images
    assert len(ep["support"]) + len(ep["query"]) == sum(SIZES.values())


def test_episodes_deterministic_for_a_seed():
    labels = _pool()
    assert _make(labels) == _make(labels)
    assert _make(labels, root_seed=5) == _make(labels.copy(), root_seed=5)


def test_episodes_differ_across_roots_and_targets():
    labels = _pool()
    base = _make(labels)
    other_root = _make(labels, root_seed=1)
    other_target = _make(labels, target="other")
    for other in (other_root, other_target):
        # every single episode differs (same ordering of fields, different draws)
        for a, b in zip(base, other, strict=True):
            assert (a["classes"], a["support"], a["query"]) != (b["classes"], b["support"], b["query"])
    # and episodes within one call differ from each other
    assert len({tuple(ep["support"]) for ep in base}) == len(base)


def test_episode_i_independent_of_count():
    labels = _pool()
    five = _make(labels, count=5)
    ten = _make(labels, count=10)
    assert five == ten[:5]
    assert _make(labels, count=1) == ten[:1]


def test_episode_indices_are_plain_ints():
    (ep,) = _make(_pool(), count=1)
    for key in ("classes", "support", "support_labels", "query", "query_labels"):
        assert all(type(v) is int for v in ep[key]), key


def test_too_many_shots_raises():
    labels = _pool()
    smallest = min(SIZES.values())  # 9: at most 8 shots leave one query image
    _make(labels, shots=smallest - 1, count=1)
    with pytest.raises(ValueError, match="shots"):
        _make(labels, shots=smallest, count=1)
    with pytest.raises(ValueError, match="shots"):
        _make(labels, shots=100, count=1)


def test_too_many_ways_raises():
    labels = _pool()
    _make(labels, ways=len(SIZES), count=1)
    with pytest.raises(ValueError, match="8-way"):
        _make(labels, ways=len(SIZES) + 1, count=1)
