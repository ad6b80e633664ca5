"""Exact top-k search by inner product: a blocked product fused with a running top-k.

    >>> import numpy as np
    >>> from quanta.kernels import Corpus, topk
    >>> corpus = Corpus(np.eye(4, dtype=np.float32))
    >>> topk(np.array([[0, 0, 1, 0]], np.float32), corpus, 1).indices.tolist()
    [[2]]

The corpus is scored one block of rows at a time, so the scores held at once
are one block whatever the corpus size. Scores in a low precision pick the
candidates and fp32 decides among them:

1. Scores of a block come from int8 (or bf16) codes of the corpus minus its
   mean, which shifts every score of a query alike and so keeps the ranking.
   The int8 codes scale each dimension to [-127, 127]; that scale is folded
   into the query, which is then coded per row, so the int32 sums rank the
   block exactly as the approximate scores do, with no rescaling pass.
2. Each group of `GROUP` rows of a block keeps only its best score, and a
   running top list keeps the `k * candidates` best groups per query. A group
   holding one of the best rows always has a score at least that row's, so
   the best rows by approximate score lie in the kept groups.
3. Every row of the kept groups is scored again in fp32 from the original
   vectors, and the best k of those are the answer.

The answer equals an fp32 brute force unless a row of the true top k scores
so much lower in low precision that its group falls out of the kept list; a
larger `candidates` makes that rarer (docs/benchmarks.md measures recall).
"""

from __future__ import annotations

import functools
import logging
import time
from typing import NamedTuple

import numpy as np
import torch

from quanta.errors import ConfigError
from quanta.kernels import precision as precisions
from quanta.kernels.blocks import check_operand, read_block, release

__all__ = ["Corpus", "TopK", "topk", "fastest_scores", "GROUP"]

logger = logging.getLogger(__name__)

# Rows that share one score in the candidate stage: 8 ran faster than 16 on
# this machine (fewer rows to score again in fp32), at the same recall.
GROUP = 8
# Rows of the corpus scored at once, and queries scored at once: a block of
# int32 scores of 1024 x 2048 is 8 MiB, within this machine's L3 cache, and
# int8 products of these sizes run fastest here (docs/benchmarks.md).
_BLOCK_ROWS = 2048
_QUERY_ROWS = 1024
# Rows coded to int8 at once while a corpus is prepared.
_CODE_ROWS = 65536
# Bytes of candidate vectors gathered at once for the fp32 stage.
_RESCORE_BYTES = 32 << 20


class TopK(NamedTuple):
    """Per query, the k best scores (descending) and the rows they belong to."""

    scores: np.ndarray | torch.Tensor
    indices: np.ndarray | torch.Tensor


class Corpus:
    """Vectors prepared for repeated top-k search: low-precision codes beside the originals.

    Args:
        vectors: n x d, a numpy array, memmap or torch tensor; kept by reference
            for the fp32 stage, so a memmap stays on disk.
        precision: the candidate stage's precision: "int8", "bf16", "fp32", or
            "auto", the fastest here (`fastest_scores`); fp32 decides in every case.
        offset: the index of the first row, for a shard of a larger corpus.

    Raises:
        ConfigError: vectors that are not a 2-D array of numbers, or an unknown precision.
    """

    def __init__(self, vectors, *, precision: str = "auto", offset: int = 0):
        n, d = check_operand(vectors, "corpus")
        if precision == "auto":
            precision = fastest_scores()
        if precision not in precisions.PRECISIONS:
            raise ConfigError(
                f"precision={precision!r} is not 'auto' or one of {precisions.PRECISIONS}"
            )
        self.vectors, self.size, self.dim = vectors, n, d
        self.precision, self.offset = precision, offset
        self.scale = torch.ones(d)
        center = self._mean() if precision != "fp32" else torch.zeros(d)
        if precision == "int8":
            self.codes = self._int8_codes(center)
        else:
            dtype = torch.bfloat16 if precision == "bf16" else torch.float32
            self.codes = torch.empty(n, d, dtype=dtype)
            for rows in self._blocks():
                self.codes[rows] = self._centered(rows, center)
        logger.debug("corpus of %d x %d prepared in %s", n, d, precision)

    def _blocks(self) -> list[slice]:
        return _row_slices(self.size, _CODE_ROWS)

    def _centered(self, rows: slice, center: torch.Tensor) -> torch.Tensor:
        # Codes hold each row minus the corpus mean: that shifts all of a
        # query's scores by the same q . mean, so the ranking is unchanged, and
        # the low precision spends its range on what tells rows apart. Without
        # it, embeddings that share a direction lose their order to rounding.
        return read_block(self.vectors, rows, slice(None), torch.device("cpu")) - center

    def _mean(self) -> torch.Tensor:
        total = torch.zeros(self.dim, dtype=torch.float64)
        for rows in self._blocks():
            total += read_block(self.vectors, rows, slice(None), torch.device("cpu")).sum(0)
        return (total / max(1, self.size)).float()

    def _int8_codes(self, center: torch.Tensor) -> torch.Tensor:
        # Passes of bounded memory: the largest magnitude of each dimension,
        # then the codes.
        peak = torch.zeros(self.dim)
        for rows in self._blocks():
            torch.maximum(peak, self._centered(rows, center).abs_().amax(0), out=peak)
        self.scale = peak.clamp_(min=1e-30) / 127
        codes = torch.empty(self.size, self.dim, dtype=torch.int8)
        for rows in self._blocks():
            codes[rows] = self._centered(rows, center).div_(self.scale).round_()
        return codes

    def shard(self, index: int, count: int) -> Corpus:
        """The `index`-th of `count` near-equal slices of rows, sharing this corpus's codes."""
        if not 0 <= index < count:
            raise ConfigError(f"shard {index} of {count} does not exist: use 0 to {count - 1}")
        bounds = np.linspace(0, self.size, count + 1).astype(int)
        lo, hi = int(bounds[index]), int(bounds[index + 1])
        part = object.__new__(Corpus)
        part.vectors, part.size, part.dim = self.vectors[lo:hi], hi - lo, self.dim
        part.precision, part.offset, part.scale = self.precision, self.offset + lo, self.scale
        part.codes = self.codes[lo:hi]
        return part

    def code_queries(self, queries: torch.Tensor) -> torch.Tensor:
        """Queries in the codes' precision, scaled so that their products rank like fp32's."""
        if self.precision == "int8":
            folded = queries * self.scale
            step = folded.abs().amax(1, keepdim=True).clamp_(min=1e-30) / 127
            return torch.round(folded / step).to(torch.int8)
        return queries.to(self.codes.dtype)


@functools.cache
def fastest_scores() -> str:
    """The precision whose scores of coded vectors come fastest here, timed on one block.

    Unlike a general product, the corpus is coded once, so only the product of
    codes counts: int8 wins wherever the CPU multiplies int8 in hardware (VNNI,
    AMX), even where quantizing both operands on every call would not pay.
    """
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(_QUERY_ROWS // 2, 384, generator=generator)
    corpus = torch.randn(_BLOCK_ROWS, 384, generator=generator)
    operands = {}
    for precision in precisions.PRECISIONS:
        if precision == "int8":
            pair = [x.mul(30).round_().clamp_(-127, 127).to(torch.int8) for x in (queries, corpus)]
        else:
            dtype = torch.bfloat16 if precision == "bf16" else torch.float32
            pair = [queries.to(dtype), corpus.to(dtype)]
        _scores(*pair)  # the first call of a kernel pays its setup
        operands[precision] = pair
    # in turns, keeping each one's best, so a burst of other load falls on all alike
    seconds = dict.fromkeys(operands, float("inf"))
    for _ in range(7):
        for precision, pair in operands.items():
            start = time.perf_counter()
            _scores(*pair)
            seconds[precision] = min(seconds[precision], time.perf_counter() - start)
    logger.debug("score speed: %s", {p: f"{s * 1e3:.2f} ms" for p, s in seconds.items()})
    return min(seconds, key=seconds.__getitem__)


def _row_slices(n: int, rows: int) -> list[slice]:
    return [slice(i, min(i + rows, n)) for i in range(0, n, rows)]


def _scores(codes_q: torch.Tensor, codes_c: torch.Tensor, out=None) -> torch.Tensor:
    if codes_q.dtype == torch.int8:
        return torch._int_mm(codes_q, codes_c.T, out=out)
    return torch.mm(codes_q, codes_c.T, out=out)


def _block_width(corpus: Corpus) -> int:
    """Rows scored at once: `_BLOCK_ROWS`, or the whole corpus in groups if that is less."""
    return min(_BLOCK_ROWS, -(-corpus.size // GROUP) * GROUP)


def _best_groups(codes_q: torch.Tensor, corpus: Corpus, keep: int) -> tuple[torch.Tensor, int]:
    """The `keep` best groups of rows per query by approximate score, and the block width.

    Groups are numbered as `_group_rows` reads them.

    A block of `width` rows forms width / GROUP groups, each taking every
    (width / GROUP)-th row: the best of a group is then an elementwise maximum
    of GROUP contiguous slices of the scores, which the vector units do at
    full speed, where a maximum over GROUP adjacent scores would not be.
    """
    q, width = codes_q.shape[0], _block_width(corpus)
    per_block = width // GROUP
    blocks = -(-corpus.size // width)
    keep = min(keep, per_block * blocks)
    # Columns [0, keep) hold the best groups so far, the rest the new block's.
    values = torch.empty(q, keep + per_block, dtype=_score_dtype(codes_q))
    values[:, :keep] = _lowest(values.dtype)
    # Until real groups replace them, the kept slots name a group past the
    # end, whose rows the fp32 stage skips.
    ids = torch.full((q, keep), blocks * per_block, dtype=torch.long)
    # One buffer for every block's scores: it stays in the cache, where a new
    # tensor per block would be fresh memory each time.
    scores = torch.empty(q, width, dtype=values.dtype)
    for block, rows in enumerate(_row_slices(corpus.size, width)):
        if rows.stop - rows.start == width:
            _scores(codes_q, corpus.codes[rows], out=scores)
        else:
            # the last block: fill up with a score that never wins
            scores.fill_(_lowest(scores.dtype))
            scores[:, : rows.stop - rows.start] = _scores(codes_q, corpus.codes[rows])
        torch.amax(scores.view(q, GROUP, per_block), 1, out=values[:, keep:])
        _merge(values, ids, keep, first_new=block * per_block)
    return ids, width


def _merge(values: torch.Tensor, ids: torch.Tensor, keep: int, first_new: int) -> None:
    """Fold the new block's groups (columns keep:, numbered from `first_new`) into the kept."""
    # After the first blocks, most queries' new groups all score below their
    # worst kept one; only the other queries need the top-k.
    rising = values[:, keep:].amax(1) > values[:, :keep].amin(1)
    rows = rising.nonzero().squeeze(1)
    if rows.numel() == 0:
        return
    whole = rows.numel() >= values.shape[0] // 2
    part_values = values if whole else values[rows]
    part_ids = ids if whole else ids[rows]
    top = part_values.topk(keep, dim=1, sorted=False)
    # a position below keep is a kept group; one above is new group first_new + (pos - keep)
    position = top.indices
    kept = part_ids.gather(1, position.clamp(max=keep - 1))
    new_ids = torch.where(position < keep, kept, position + (first_new - keep))
    if whole:
        values[:, :keep] = top.values
        ids.copy_(new_ids)
    else:
        values[rows, :keep] = top.values
        ids[rows] = new_ids


def _score_dtype(codes_q: torch.Tensor) -> torch.dtype:
    return torch.int32 if codes_q.dtype == torch.int8 else codes_q.dtype


def _lowest(dtype: torch.dtype):
    return torch.iinfo(dtype).min if not dtype.is_floating_point else float("-inf")


def _group_rows(groups: torch.Tensor, width: int) -> torch.Tensor:
    """The corpus rows of each group number, as `_best_groups` forms them."""
    per_block = width // GROUP
    first = groups // per_block * width + groups % per_block
    return (first.unsqueeze(-1) + torch.arange(GROUP) * per_block).flatten(1)


def _rescore(queries: torch.Tensor, corpus: Corpus, rows: torch.Tensor, k: int) -> TopK:
    """Score the candidate rows (q x c) in fp32 and keep the best k per query."""
    # The candidates' vectors are gathered a few queries at a time, to hold
    # about _RESCORE_BYTES of them at once.
    chunk = max(1, _RESCORE_BYTES // (rows.shape[1] * corpus.dim * 4))
    scores = torch.empty(rows.shape)
    for part in _row_slices(rows.shape[0], chunk):
        flat = rows[part].clamp(max=corpus.size - 1).flatten()
        vectors = corpus.vectors
        if isinstance(vectors, torch.Tensor):
            candidates = vectors[flat].float()
        else:
            candidates = torch.from_numpy(np.asarray(vectors[flat.numpy()], dtype=np.float32))
            release(vectors)
        candidates = candidates.view(-1, rows.shape[1], corpus.dim)
        torch.bmm(candidates, queries[part].unsqueeze(-1), out=scores[part].unsqueeze(-1))
    scores.masked_fill_(rows >= corpus.size, float("-inf"))
    best = scores.topk(k, dim=1)
    return TopK(best.values, rows.gather(1, best.indices) + corpus.offset)


def topk(queries, corpus, k: int, *, precision: str = "auto", candidates: int = 2) -> TopK:
    """The k rows of `corpus` with the largest inner product with each query.

    Args:
        queries: q x d (or one d-vector), a numpy array or torch tensor.
        corpus: a `Corpus`, or n x d vectors, which are prepared on each call
            (prepare a `Corpus` once to search it many times).
        k: how many rows per query, 1 to n.
        precision: the candidate stage's precision when `corpus` is not prepared.
        candidates: groups kept per result row in the candidate stage.

    Returns:
        `TopK` of q x k scores (descending) and row indices; numpy arrays for
        numpy queries, tensors for tensor queries; 1-D for a single query.

    Raises:
        ConfigError: shapes that do not match, k out of range, candidates < 1.
    """
    if not isinstance(corpus, Corpus):
        corpus = Corpus(corpus, precision=precision)
    elif precision not in ("auto", corpus.precision):
        raise ConfigError(
            f"precision={precision!r} cannot apply to a Corpus prepared in "
            f"{corpus.precision!r}; prepare it with Corpus(vectors, precision={precision!r})"
        )
    single = getattr(queries, "ndim", 0) == 1
    as_numpy = isinstance(queries, np.ndarray)
    queries = queries[None, :] if single else queries
    q, d = check_operand(queries, "queries")
    if d != corpus.dim:
        raise ConfigError(
            f"queries have {d} dimensions and the corpus {corpus.dim}; embed both alike"
        )
    if not 1 <= k <= corpus.size:
        raise ConfigError(f"k={k} is out of range: use 1 to the corpus size, {corpus.size}")
    if candidates < 1:
        raise ConfigError(f"candidates={candidates} must be at least 1")

    keep = k * candidates
    parts = []
    for rows in _row_slices(q, _QUERY_ROWS):
        block = read_block(queries, rows, slice(None), torch.device("cpu"))
        groups, width = _best_groups(corpus.code_queries(block), corpus, keep)
        parts.append(_rescore(block, corpus, _group_rows(groups, width), k))
    result = TopK(torch.cat([p.scores for p in parts]), torch.cat([p.indices for p in parts]))
    if single:
        result = TopK(result.scores[0], result.indices[0])
    if as_numpy:
        result = TopK(result.scores.numpy(), result.indices.numpy())
    return result
