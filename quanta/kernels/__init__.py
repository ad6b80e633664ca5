"""Kernels: the blocked matrix product and top-k search that quanta's hot paths run on.

    matmul(a, b, precision="auto")   a @ b in tiles, in the fastest precision within tol
    Corpus(vectors)                  vectors prepared for repeated search
    topk(queries, corpus, k)         exact top-k by inner product
    merge_topk(parts, k)             the best k of several shards' results (numpy only)

`merge_topk` is imported without torch, for the gateway; the rest load torch
on first use.
"""

from __future__ import annotations

import importlib

from quanta.kernels.merge import merge_topk

__all__ = ["Corpus", "Plan", "TopK", "matmul", "merge_topk", "plan", "topk"]

_LAZY = {
    "matmul": "quanta.kernels.matrix",
    "plan": "quanta.kernels.matrix",
    "Plan": "quanta.kernels.matrix",
    "Corpus": "quanta.kernels.search",
    "TopK": "quanta.kernels.search",
    "topk": "quanta.kernels.search",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'quanta.kernels' has no attribute {name!r}")
