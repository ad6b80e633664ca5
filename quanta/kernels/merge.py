"""Merging top-k lists from shards of a corpus; numpy only, so the gateway can use it."""

from __future__ import annotations

import numpy as np

__all__ = ["merge_topk"]


def merge_topk(parts: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The best k of several shards' (scores, indices), each q x k_i or a k_i-vector.

    Indices must already be global (a shard adds its offset). Scores come back
    in descending order; between equal scores the lower index comes first, so
    the merge does not depend on the order of the parts.
    """
    if not parts:
        raise ValueError("merge_topk needs at least one shard's result")
    scores = np.concatenate([np.asarray(s, dtype=np.float32) for s, _ in parts], axis=-1)
    indices = np.concatenate([np.asarray(i, dtype=np.int64) for _, i in parts], axis=-1)
    # lexsort sorts by its last key first: score descending, then index ascending
    order = np.lexsort((indices, -scores), axis=-1)[..., :k]
    return np.take_along_axis(scores, order, -1), np.take_along_axis(indices, order, -1)
