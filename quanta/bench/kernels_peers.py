"""The peers of `python -m quanta.bench kernels`: numpy and torch brute force, faiss, recall.

Each brute force is written as a user of that library would write it for a
corpus too large to score at once: a block of scores, then a running top k.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["PEER_BLOCK", "faiss_unavailable", "numpy_topk", "recall", "torch_topk", "unit_rows"]

# Corpus rows the numpy and torch peers score at once: 1,000 queries by 16,384
# rows is 64 MiB of scores, where the whole corpus at once would be gigabytes.
PEER_BLOCK = 16384


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """n Gaussian rows scaled to unit length, normalized in place a block at a time."""
    x = rng.standard_normal((n, d), dtype=np.float32)
    for start in range(0, n, PEER_BLOCK):
        block = x[start : start + PEER_BLOCK]
        block /= np.linalg.norm(block, axis=1, keepdims=True)
    return x


def numpy_topk(queries: np.ndarray, corpus: np.ndarray, k: int) -> np.ndarray:
    """Brute force as a numpy user writes it: score a block, keep a running top k."""
    best_s = np.full((len(queries), k), -np.inf, np.float32)
    best_i = np.zeros((len(queries), k), np.int64)
    for start in range(0, len(corpus), PEER_BLOCK):
        scores = queries @ corpus[start : start + PEER_BLOCK].T
        width = min(k, scores.shape[1])  # the last block may hold fewer than k rows
        part = np.argpartition(scores, -width, axis=1)[:, -width:]
        s = np.concatenate([best_s, np.take_along_axis(scores, part, 1)], axis=1)
        i = np.concatenate([best_i, part + start], axis=1)
        keep = np.argpartition(s, -k, axis=1)[:, -k:]
        best_s, best_i = np.take_along_axis(s, keep, 1), np.take_along_axis(i, keep, 1)
    order = np.argsort(-best_s, axis=1)
    return np.take_along_axis(best_i, order, 1)


def torch_topk(queries: np.ndarray, corpus: np.ndarray, k: int) -> np.ndarray:
    """The same in torch: a block's scores, torch.topk, merged with the running top k."""
    q, c = torch.from_numpy(queries), torch.from_numpy(corpus)
    best_s = torch.full((len(q), k), float("-inf"))
    best_i = torch.zeros((len(q), k), dtype=torch.long)
    for start in range(0, len(c), PEER_BLOCK):
        top = (q @ c[start : start + PEER_BLOCK].T).topk(min(k, len(c) - start), dim=1)
        s = torch.cat([best_s, top.values], dim=1)
        i = torch.cat([best_i, top.indices + start], dim=1)
        keep = s.topk(k, dim=1)
        best_s, best_i = keep.values, i.gather(1, keep.indices)
    return best_i.numpy()


def faiss_unavailable() -> str | None:
    try:
        import faiss  # noqa: F401
    except ImportError as exc:
        return f"faiss is not installed ({exc}); pip install 'quanta[bench]'"
    return None


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    """The share of the exact top k that a row found, over all queries."""
    hits = (found[:, :, None] == exact[:, None, :]).any(axis=2)
    return float(hits.mean())
