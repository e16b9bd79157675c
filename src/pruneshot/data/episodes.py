"""Fixed few-shot episodes: saved once as index lists, shared by every method."""

from __future__ import annotations

import hashlib
import json
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


#: Keys of an episodes file that its content hash does not cover (written after, or about the job).
_UNHASHED = ("provenance", "content_sha256")


def content_sha256(payload: dict[str, Any]) -> str:
    """sha256 of an episodes file's content (every key but provenance and the hash itself, as canonical
    JSON): make_episodes records it in the file, every reader checks it."""
    body = {k: v for k, v in payload.items() if k not in _UNHASHED}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def verified(payload: dict[str, Any], path: str) -> dict[str, Any]:
    """``payload`` (the JSON of episodes file ``path``) after checking its recorded content hash; a file
    without one (an older version) is returned as it is."""
    recorded = payload.get("content_sha256")
    if recorded is not None and content_sha256(payload) != recorded:
        raise ValueError(f"episodes file {path}: its content hash {content_sha256(payload)} is not the "
                         f"{recorded} make_episodes recorded in it: the file was edited or corrupted after it "
                         "was written; rerun make_episodes (snakemake --forcerun make_episodes)")
    return payload
