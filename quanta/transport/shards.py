"""Shards: a large tensor crossing hosts, cut into pieces that travel on their own.

The sender cuts a tensor's bytes into shards of `size` bytes, each sent as
its own message with a checksum (xxh3-64 of the raw bytes) and the codec it
was compressed with. Shards are spread over several streams (TCP
connections), and each is decompressed or copied straight into its place in
a buffer the receiver allocates once, from the tensor's size in the header.

A shard that fails its checksum or does not decompress is asked for again at
once; shards that never arrive are asked for when the message makes no
progress for a while (see `quanta.transport.protocol`).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import xxhash

from quanta.errors import TransportError, shorten
from quanta.transport import codecs

__all__ = ["checksum", "cut", "Assembly"]


def checksum(data) -> int:
    """xxh3-64 of a bytes-like: fast enough (tens of GB/s) to check every shard."""
    return xxhash.xxh3_64_intdigest(data)


def cut(nbytes: int, size: int) -> Iterator[tuple[int, int, int]]:
    """(index, start, stop) of each shard of a `nbytes` buffer."""
    for index, start in enumerate(range(0, nbytes, size)):
        yield index, start, min(start + size, nbytes)


class Assembly:
    """One sharded tensor being received: its buffer and which shards are in."""

    def __init__(self, name: str, nbytes: int, size: int, count: int):
        whole = type(size) is int and type(count) is int and size > 0 and count > 0
        if not whole or count != -(-nbytes // size):
            raise TransportError(
                f"tensor {name!r} of {nbytes} bytes cannot have {shorten(count)} shards of "
                f"{shorten(size)} bytes"
            )
        self.name = name
        self.size = size
        self.count = count
        try:
            self.buffer = np.empty(nbytes, dtype=np.uint8)
        except MemoryError as exc:
            raise TransportError(
                f"tensor {name!r} of {nbytes} bytes does not fit in memory"
            ) from exc
        self.missing = set(range(count))

    @property
    def complete(self) -> bool:
        return not self.missing

    def place(self, index: int, codec: str, digest: int, payload) -> bool:
        """Write one shard into place; False when it is corrupt and must be asked for again.

        Raises:
            TransportError: the shard index or codec is not one this tensor can have.
        """
        if not isinstance(index, int) or not 0 <= index < self.count:
            raise TransportError(f"tensor {self.name!r} has no shard {shorten(index)}")
        if codec not in codecs.CODECS:
            raise TransportError(f"shard {index} of {self.name!r} has unknown codec {codec!r}")
        if index not in self.missing:
            return True  # a duplicate of a shard asked for again
        start = index * self.size
        target = memoryview(self.buffer[start : start + self.size])
        try:
            codecs.decompress_into(codec, payload, target)
        except TransportError:
            return False
        if checksum(target) != digest:
            return False
        self.missing.discard(index)
        return True
