"""Semantic search over a text collection: all-MiniLM-L6-v2 plus exact top-k.

`quanta serve --index FILE` serves this class. It answers /v1/embeddings like
the plain embedder, and /v1/search:

    POST /v1/search {"query": "how do I open a file", "k": 3}
    -> {"object": "list", "model": ..., "data": [{"index": 0, "query": ...,
        "results": [{"id": ..., "text": ..., "score": 0.71}, ...]}]}

A search takes two hops through the workers. The gateway first embeds the
queries on the embeddings endpoint, then asks each shard of the collection
for its top k: the collection's rows are cut into as many shards as there
are workers, and shards queue separately, so one query's shards run on
different workers at once. The gateway merges the shards' lists.

Each worker memory-maps the cached vectors (the pages are shared by all
workers through the page cache) and keeps their int8 codes for the
candidate stage of `quanta.kernels.topk`.
"""

from __future__ import annotations

import functools
import logging

import numpy as np

from quanta.errors import ConfigError
from quanta.models.collection import Collection, VectorCache, read_collection
from quanta.models.index import model_key
from quanta.models.minilm import MiniLMEmbedder
from quanta.service import endpoint

__all__ = ["MiniLMSearch"]

logger = logging.getLogger(__name__)


class MiniLMSearch(MiniLMEmbedder):
    """The built-in embedder with `/v1/search` over a collection file.

    Args:
        index: the collection, `.txt` (one text a line) or `.jsonl` (id, text).
        cache_dir: where its vectors are cached; beside the file by default.
        model, precision: as for `MiniLMEmbedder`.

    Raises:
        ConfigError: when `collection` is first read (the gateway reads it as it
            starts): the collection is unreadable or malformed, or its vectors
            are not cached yet (`python -m quanta.models.index FILE` makes them).
    """

    def __init__(
        self,
        *,
        index: str,
        cache_dir: str | None = None,
        model: str = "builtin:minilm",
        precision: str = "auto",
    ):
        super().__init__(model=model, precision=precision)
        self.index, self.model, self.model_key = index, model, model_key(model, precision)
        self.cache = VectorCache.beside(index, cache_dir)
        self._shards: dict[tuple[int, int], object] = {}

    @functools.cached_property
    def collection(self) -> Collection:
        """The ids and texts, read on first use: by the gateway, which answers with them.

        Workers never read it (a large file would cost each one its reading,
        hashing and memory); they need only the cached vectors.
        """
        collection = read_collection(self.index)
        if not self.cache.is_current(collection, self.model_key):
            raise ConfigError(
                f"the vectors of {self.index} are missing or out of date in "
                f"{self.cache.vectors}; make them with: "
                f"python -m quanta.models.index {self.index} --model {self.model}"
            )
        return collection

    def setup(self) -> None:
        super().setup()
        from quanta.kernels import Corpus

        # The gateway checked the cache against the file before any worker
        # started; the record's count guards against a cache replaced since.
        vectors = np.load(self.cache.vectors, mmap_mode="r")
        count = self.cache.read_record().get("count")
        if vectors.shape != (count, self.dimensions):
            raise ConfigError(
                f"{self.cache.vectors} holds {vectors.shape} vectors where its record says "
                f"{count}; delete it to embed the collection again"
            )
        self.corpus = Corpus(vectors)
        logger.info(
            "search over %d vectors of %s (%s candidates)",
            count,
            self.cache.vectors.name,
            self.corpus.precision,
        )

    def _shard(self, index: int, count: int):
        key = (index, count)
        if key not in self._shards:
            self._shards[key] = self.corpus.shard(index, count)
        return self._shards[key]

    @endpoint("/v1/search", max_batch_size=64, max_wait_ms=2, api="search")
    def search(self, items: list[dict]) -> list[dict]:
        """Top k of one shard for each item {"vector", "k", "shard", "shards"}.

        Returns, per item, {"scores": [...], "indices": [...]} with indices
        into the whole collection, best first.
        """
        from quanta.kernels import topk

        outputs: list[dict | None] = [None] * len(items)
        by_shard: dict[tuple[int, int], list[int]] = {}
        for position, item in enumerate(items):
            by_shard.setdefault((int(item["shard"]), int(item["shards"])), []).append(position)
        for key, positions in by_shard.items():
            shard = self._shard(*key)
            if shard.size == 0:
                for position in positions:
                    outputs[position] = {"scores": [], "indices": []}
                continue
            k = min(max(int(items[p]["k"]) for p in positions), shard.size)
            queries = np.asarray([items[p]["vector"] for p in positions], dtype=np.float32)
            found = topk(queries, shard, k)
            for row, position in enumerate(positions):
                wanted = min(int(items[position]["k"]), k)
                outputs[position] = {
                    "scores": found.scores[row, :wanted].tolist(),
                    "indices": found.indices[row, :wanted].tolist(),
                }
        return outputs
