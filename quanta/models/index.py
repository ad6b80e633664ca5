"""Embedding a collection for search, once, with a progress bar.

    python -m quanta.models.index notes.jsonl [--model builtin:minilm] [--precision auto]

`quanta serve --index FILE` runs this in a child process before the server
starts, so that the gateway process never loads torch. It writes the vectors
to the collection's cache (see `quanta.models.collection`) unless the cache is
already current. Texts are embedded longest first in batches, which keeps the
padding of each batch small, and written to a memory-mapped file as they come,
so a large collection never needs its vectors in memory at once.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import numpy as np

from quanta.errors import ConfigError, QuantaError
from quanta.models.collection import Collection, VectorCache, read_collection
from quanta.models.minilm import MiniLMEmbedder

__all__ = ["build_vectors", "model_key", "main"]

logger = logging.getLogger(__name__)

# Texts per forward pass: large enough to fill the cores, small enough that
# a batch of long texts fits comfortably in memory.
_BATCH = 64


def model_key(model: str, precision: str) -> str:
    """What the cached vectors depend on besides the file: the model and its precision."""
    return f"{model} precision={precision}"


def build_vectors(
    collection: Collection, cache: VectorCache, *, model: str, precision: str, progress=None
) -> bool:
    """Embed `collection` into `cache` unless the cache is current; True if it embedded.

    Args:
        progress: a callable taking the number of texts just embedded, or None.

    Raises:
        ConfigError: the model or precision is invalid, or the cache cannot be written.
    """
    key = model_key(model, precision)
    if cache.is_current(collection, key):
        return False
    embedder = MiniLMEmbedder(model=model, precision=precision)
    embedder.setup()
    partial = cache.vectors.with_name(cache.vectors.name + ".partial")
    try:
        vectors = np.lib.format.open_memmap(
            partial, mode="w+", dtype=np.float32, shape=(len(collection), embedder.dimensions)
        )
    except OSError as exc:
        raise ConfigError(
            f"cannot write the vectors of {collection.path} to {partial.parent}: {exc.strerror}; "
            "pass --index-cache DIR with a writable directory"
        ) from None
    # Longest first: the batches that take longest run while the bar is young,
    # and texts of a batch have similar lengths.
    order = sorted(range(len(collection)), key=lambda i: -len(collection.texts[i]))
    for start in range(0, len(order), _BATCH):
        rows = order[start : start + _BATCH]
        vectors[rows] = embedder.embed([collection.texts[i] for i in rows])
        if progress is not None:
            progress(len(rows))
    vectors.flush()
    del vectors
    partial.replace(cache.vectors)
    cache.write_record(collection, key, embedder.dimensions)
    return True


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    parser = argparse.ArgumentParser(prog="python -m quanta.models.index", description=__doc__)
    parser.add_argument("index", help="the collection: .txt (one text a line) or .jsonl")
    parser.add_argument("--model", default="builtin:minilm")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--cache-dir", default=None, help="where to cache (default: beside it)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        collection = read_collection(args.index)
        cache = VectorCache.beside(collection.path, args.cache_dir)
        started = time.perf_counter()
        with Progress(
            "embedding {task.fields[name]}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
        ) as bar:
            task = bar.add_task("embed", total=len(collection), name=collection.path.name)
            built = build_vectors(
                collection,
                cache,
                model=args.model,
                precision=args.precision,
                progress=lambda count: bar.advance(task, count),
            )
            if not built:
                bar.update(task, completed=len(collection))
        verb = "embedded" if built else "found current vectors of"
        print(
            f"{verb} {len(collection)} texts of {collection.path} in "
            f"{time.perf_counter() - started:.1f} s: {cache.vectors}",
            file=sys.stderr,
        )
    except QuantaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
