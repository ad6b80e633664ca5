"""topk against a brute-force fp32 top-k, shards merged, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quanta.errors import ConfigError
from quanta.kernels import Corpus, merge_topk, topk
from quanta.kernels.search import GROUP


def unit_rows(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(queries: np.ndarray, corpus: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = queries.astype(np.float64) @ corpus.T.astype(np.float64)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), order


@pytest.mark.parametrize("precision", ["int8", "bf16", "fp32"])
@pytest.mark.parametrize(("n", "k"), [(1, 1), (5, 5), (GROUP + 3, 7), (10007, 10), (20011, 100)])
def test_topk_equals_brute_force(precision, n, k):
    corpus, queries = unit_rows(n, 64, seed=1), unit_rows(37, 64, seed=2)
    found = topk(queries, Corpus(corpus, precision=precision), k)
    scores, indices = brute_force(queries, corpus, k)
    np.testing.assert_array_equal(found.indices, indices)
    np.testing.assert_allclose(found.scores, scores, atol=1e-5)
    assert found.scores.dtype == np.float32 and found.indices.shape == (37, k)


def test_a_corpus_with_negative_scores_and_a_partial_last_block():
    # every score negative: padding of the last block must never be picked
    corpus = -np.abs(unit_rows(4099, 16, seed=3))
    queries = np.abs(unit_rows(5, 16, seed=4))
    found = topk(queries, corpus, 4099)
    assert sorted(found.indices[0].tolist()) == list(range(4099))
    np.testing.assert_allclose(found.scores, brute_force(queries, corpus, 4099)[0], atol=1e-6)


def test_vectors_sharing_one_direction_keep_recall_at_10():
    # Embeddings share a common direction; here it dominates every row
    # (rows have a cosine of about 0.8 to each other), so the approximate
    # scores of the best rows differ by far less than int8's step on them.
    rng = np.random.default_rng(5)
    common = rng.standard_normal(384).astype(np.float32)
    corpus = unit_rows(50000, 384, seed=6) + 2 * common / np.linalg.norm(common)
    corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
    queries = corpus[rng.choice(50000, 200, replace=False)] + 0.05 * unit_rows(200, 384, seed=7)
    found = topk(queries, Corpus(corpus), 10)
    exact = brute_force(queries, corpus, 10)[1]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found.indices, exact, strict=True)])
    assert recall >= 0.999


def test_one_query_and_tensors():
    corpus = unit_rows(300, 8, seed=8)
    single = topk(corpus[17], corpus, 3)
    assert single.indices.shape == (3,) and single.indices[0] == 17
    tensors = topk(torch.from_numpy(corpus[:4]), Corpus(torch.from_numpy(corpus)), 1)
    assert isinstance(tensors.indices, torch.Tensor)
    assert tensors.indices[:, 0].tolist() == [0, 1, 2, 3]


def test_corpus_is_left_unchanged():
    corpus = unit_rows(1000, 32, seed=9)
    before = corpus.copy()
    topk(unit_rows(3, 32, seed=10), Corpus(corpus, precision="int8"), 5)
    np.testing.assert_array_equal(corpus, before)


def test_shards_merged_equal_the_whole(tmp_path):
    vectors = unit_rows(9001, 48, seed=11)
    path = tmp_path / "vectors.npy"
    np.save(path, vectors)
    mapped = np.load(path, mmap_mode="r")
    corpus = Corpus(mapped)
    queries = unit_rows(20, 48, seed=12)
    parts = [topk(queries, corpus.shard(i, 3), 10) for i in range(3)]
    scores, indices = merge_topk([(p.scores, p.indices) for p in parts], 10)
    np.testing.assert_array_equal(indices, brute_force(queries, vectors, 10)[1])
    np.testing.assert_array_equal(indices, topk(queries, corpus, 10).indices)
    assert np.all(np.diff(scores, axis=1) <= 0)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda c: topk(unit_rows(2, 8, 0), c, 0), "k=0 is out of range: use 1 to"),
        (lambda c: topk(unit_rows(2, 8, 0), c, 101), "k=101 is out of range"),
        (lambda c: topk(unit_rows(2, 9, 0), c, 1), "queries have 9 dimensions and the corpus 8"),
        (lambda c: topk(unit_rows(2, 8, 0), c, 1, candidates=0), "candidates=0"),
        (lambda c: Corpus(np.ones(5)), "pass a 2-D matrix"),
        (lambda c: Corpus(np.ones((5, 2)), precision="int4"), "'int4' is not 'auto'"),
        (lambda c: c.shard(3, 3), "shard 3 of 3 does not exist"),
        (
            lambda c: topk(
                unit_rows(2, 8, 0), Corpus(c.vectors, precision="int8"), 1, precision="bf16"
            ),
            "cannot apply to a Corpus prepared in 'int8'",
        ),
    ],
)
def test_bad_input_is_refused(call, message):
    with pytest.raises(ConfigError) as caught:
        call(Corpus(unit_rows(100, 8, seed=13)))
    assert message in str(caught.value)
