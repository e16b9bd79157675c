"""Fixed few-shot episodes: saved once as index lists, shared by every method."""

from __future__ import annotations

from typing import Any

import numpy as np

from pruneshot.seeds import derive_seed


def make_episodes(
    labels: np.ndarray, *, ways: int, shots: int, count: int, queries_per_class: int,
    root_seed: int, target: str,
) -> list[dict[str, Any]]:
    """Sample ``count`` episodes from a target pool with labels ``labels`` (N,).

    Each episode draws ``ways`` classes, then per class a shuffled permutation of its
    images: the first ``shots`` are support, the next (up to ``queries_per_class``) are
    query. Indices refer to the pool; episode labels are 0..ways-1 in class order.
    The seed of episode i is derive_seed(root, "episode", target, ways, shots, i).
    """
    labels = np.asarray(labels)
    classes = np.unique(labels)
    if len(classes) < ways:
        raise ValueError(f"{ways}-way episodes need {ways} classes; the pool has {len(classes)}")
    by_class = {int(c): np.flatnonzero(labels == c) for c in classes}
    smallest = min(len(v) for v in by_class.values())
    if shots + 1 > smallest:
        raise ValueError(f"{shots} shots leave no query image: the smallest class has {smallest} images")
    episodes = []
    for i in range(count):
        seed = derive_seed(root_seed, "episode", target, ways, shots, i)
        rng = np.random.default_rng(seed)
        chosen = sorted(rng.choice(classes, size=ways, replace=False).tolist())
        support, support_y, query, query_y = [], [], [], []
        for label, c in enumerate(chosen):
            perm = rng.permutation(by_class[int(c)])
            n_query = min(queries_per_class, len(perm) - shots)
            support += perm[:shots].tolist()
            support_y += [label] * shots
            query += perm[shots : shots + n_query].tolist()
            query_y += [label] * n_query
        episodes.append({
            "index": i, "seed": seed, "classes": [int(c) for c in chosen],
            "support": support, "support_labels": support_y,
            "query": query, "query_labels": query_y,
        })
    return episodes
