"""Codecs for the shards on the wire, and the choice of whether one pays.

A codec turns the raw bytes of a shard (a few MiB of one tensor) into fewer
bytes on the wire, and back on the other side:

    none     the bytes as they are, without a copy
    lz4      LZ4 block, default (fast) mode; shrinks repeats, not float noise
    zstd     Zstandard level 1, with a content checksum
    blosc2   byte shuffle (typesize = the tensor's itemsize), then Zstandard
             level 1, on all cores

Float weights barely repeat, but the byte holding a float's sign and exponent
takes few values. Shuffling puts those bytes side by side, where an entropy
coder shrinks them, so blosc2 uses shuffle then Zstandard: on the built-in
model's weights it left bf16 at 0.69 of its size and float32 at 0.83, where
shuffle then LZ4 left 0.89 and 0.94, for half to two thirds of LZ4's speed.
Wherever compressing pays, the link is the slowest stage (below), so the
smaller ratio wins; 0.94 would never beat sending as is by the 10% asked.

Whether a codec pays on a given link is `quanta.transport.auto`'s job.

All three libraries release the GIL while they work (blosc2 once told to;
see `_blosc2`), so a pipeline's threads can compress, send and decompress
at once.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from typing import Any

import lz4.block
import zstandard

from quanta.errors import ConfigError, TransportError, shorten

__all__ = [
    "CODECS",
    "BytesLike",
    "as_bytes",
    "check_codec",
    "check_itemsize",
    "compress",
    "decompress_into",
]

logger = logging.getLogger(__name__)

CODECS = ("none", "lz4", "zstd", "blosc2")

# LZ4 takes at most this many bytes at once (blosc2 a little more).
_MAX_CHUNK_BYTES = 0x7E000000
# blosc2 splits a shard into blocks and spreads them over threads; beyond
# eight, a shard of a few MiB has too few blocks to keep more threads busy.
_THREADS = min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)


# Each thread keeps its own Zstandard contexts, since one must not be shared.
_local = threading.local()

BytesLike = bytes | bytearray | memoryview  # or anything else with the buffer protocol


def check_codec(name: str) -> str:
    """Return `name` if it names a codec or "auto".

    Raises:
        ConfigError: it does not; the message lists the choices.

    Example:
        >>> check_codec("zstd")
        'zstd'
    """
    if isinstance(name, str) and (name in CODECS or name == "auto"):
        return name
    raise ConfigError(
        f"codec {shorten(name)} is not known; choose one of auto, {', '.join(CODECS)}"
    )


def compress(name: str, data: BytesLike, itemsize: int) -> bytes | memoryview:
    """Compress the C-contiguous bytes of one shard.

    Args:
        name: a codec from `CODECS` ("auto" is not one: ask `AutoCodec`).
        data: the shard's bytes; "none" returns this very object, uncopied.
        itemsize: bytes per element of the tensor the shard comes from;
            blosc2 shuffles the bytes of each element apart by it.

    Returns:
        The bytes to put on the wire.

    Raises:
        ConfigError: an unknown codec, an itemsize below 1, or a shard too
            large for the codec.

    Example:
        >>> packed = compress("zstd", bytes(4096), itemsize=4)
    """
    if check_codec(name) == "auto":
        raise ConfigError("codec 'auto' picks a codec per shard; pass AutoCodec.choose's answer")
    check_itemsize(itemsize)
    if name == "none":
        return data
    view = as_bytes(data)
    if name != "zstd" and len(view) > _MAX_CHUNK_BYTES:
        raise ConfigError(
            f"a shard of {len(view)} bytes is too large for {name}; "
            f"split tensors into shards of at most {_MAX_CHUNK_BYTES} bytes"
        )

    if name == "lz4":
        # No size prefix: the receiver knows the size and must not trust one.
        return lz4.block.compress(view, store_size=False)
    if name == "zstd":
        return _zstd_compressor().compress(view)
    return _blosc2().compress2(view, cparams=_blosc2_params(itemsize))


def decompress_into(name: str, data: BytesLike, out: memoryview) -> None:
    """Decompress one shard into `out`, whose length is the exact raw size.

    Whatever `data` claims, no more than `len(out)` bytes are allocated (twice
    that for lz4, briefly): sizes in headers are checked against `len(out)`
    before anything is decompressed.

    Args:
        name: the codec the sender used, as it said on the wire.
        data: the compressed bytes, as received.
        out: a writable, C-contiguous buffer.

    Raises:
        TransportError: the codec is unknown, or the data is corrupt or does
            not decompress to exactly `len(out)` bytes.

    NOTE: only zstd carries a checksum. Damaged lz4 or blosc2 data is often
    caught by its structure, but may also decode into wrong bytes of the right
    size; where that matters, hash the shards above this layer.

    Example:
        >>> out = bytearray(4096)
        >>> decompress_into("zstd", compress("zstd", bytes(4096), 4), memoryview(out))
    """
    if not isinstance(name, str) or name not in CODECS:
        raise TransportError(
            f"the sender used codec {shorten(name)}, which this end does not know "
            f"({', '.join(CODECS)}); run the same quanta version on both ends"
        )
    src = as_bytes(data)
    dst = memoryview(out).cast("B")
    try:
        _DECOMPRESS[name](src, dst)
    except TransportError:
        raise
    except (lz4.block.LZ4BlockError, zstandard.ZstdError, RuntimeError, ValueError) as exc:
        raise TransportError(
            f"{name} data of {len(src)} bytes for a shard of {len(dst)} bytes is corrupt: {exc}"
        ) from exc


def check_itemsize(itemsize: int) -> None:
    if not isinstance(itemsize, int) or itemsize < 1:
        raise ConfigError(
            f"itemsize {shorten(itemsize)} is not a positive int; pass dtype.itemsize"
        )


def as_bytes(data: BytesLike) -> memoryview:
    """A flat byte view; TypeError if the buffer is not C-contiguous."""
    view = memoryview(data)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _size_error(name: str, src: memoryview, size: int, dst: memoryview) -> TransportError:
    return TransportError(
        f"{name} data of {len(src)} bytes holds {size} bytes, but the shard has "
        f"{len(dst)}: the data is corrupt or was cut short on the way"
    )


def _none_into(src: memoryview, dst: memoryview) -> None:
    if len(src) != len(dst):
        raise _size_error("none", src, len(src), dst)
    dst[:] = src


def _lz4_into(src: memoryview, dst: memoryview) -> None:
    # The block carries no size; LZ4 stops at `len(dst)` bytes and fails on more.
    # NOTE: python-lz4 cannot decompress into `dst`: it fills a buffer of its
    # own and copies that into a bytes, so for a moment the shard is held twice.
    raw = lz4.block.decompress(src, uncompressed_size=len(dst))
    if len(raw) != len(dst):
        raise _size_error("lz4", src, len(raw), dst)
    dst[:] = raw


def _zstd_into(src: memoryview, dst: memoryview) -> None:
    # python-zstandard allocates what the frame header claims, so check first.
    size = zstandard.frame_content_size(src)
    if size < 0:
        raise TransportError(f"zstd frame of {len(src)} bytes does not state its size")
    if size != len(dst):
        raise _size_error("zstd", src, size, dst)
    raw = _zstd_decompressor().decompress(src, allow_extra_data=False)
    if len(raw) != len(dst):
        raise _size_error("zstd", src, len(raw), dst)
    dst[:] = raw


def _blosc2_into(src: memoryview, dst: memoryview) -> None:
    blosc2 = _blosc2()
    if len(src) < blosc2.MIN_HEADER_LENGTH:
        raise _size_error("blosc2", src, 0, dst)
    size, total, _ = blosc2.get_cbuffer_sizes(src)
    if total != len(src):
        raise TransportError(
            f"blosc2 header says {total} compressed bytes, but {len(src)} came: "
            "the data is corrupt or was cut short on the way"
        )
    if size != len(dst):
        raise _size_error("blosc2", src, size, dst)
    if size:  # blosc2 refuses an empty destination
        blosc2.decompress2(src, dst=dst, nthreads=_THREADS)


_DECOMPRESS = {"none": _none_into, "lz4": _lz4_into, "zstd": _zstd_into, "blosc2": _blosc2_into}


def _zstd_compressor() -> zstandard.ZstdCompressor:
    if not hasattr(_local, "compressor"):
        # The checksum (4 bytes, xxhash) makes corrupt data fail, not decode.
        _local.compressor = zstandard.ZstdCompressor(level=1, write_checksum=True)
    return _local.compressor


def _zstd_decompressor() -> zstandard.ZstdDecompressor:
    if not hasattr(_local, "decompressor"):
        _local.decompressor = zstandard.ZstdDecompressor()
    return _local.decompressor


@functools.cache
def _blosc2() -> Any:
    """blosc2, imported on first use: it takes a third of a second to import.

    NOTE: this turns on blosc2's process-wide "release the GIL" switch, which
    it leaves off by default. Without it blosc2 holds the GIL for the whole
    shard and stalls every other thread; with it, a tiny buffer pays a little.
    """
    import blosc2

    blosc2.set_releasegil(True)
    return blosc2


@functools.cache
def _blosc2_params(itemsize: int) -> Any:
    blosc2 = _blosc2()
    return blosc2.CParams(
        codec=blosc2.Codec.ZSTD,
        clevel=1,
        typesize=itemsize,
        nthreads=_THREADS,
        filters=[blosc2.Filter.SHUFFLE],
        filters_meta=[0],
    )
