"""`auto`: compress a shard only when that makes it arrive sooner.

Whether compressing pays depends on the link. Transfers are pipelined: while
shard k is on the wire, the sender compresses k+1 and the receiver
decompresses k-1, so a shard of n bytes costs about its slowest stage:

    t(codec) = max(n / compress_speed, n * ratio / link, n / decompress_speed)
    t(none)  = n / link

`AutoCodec` keeps running averages (exponentially weighted) of the link's
throughput, fed by `observe_link`, and of each codec's ratio and speeds, fed
by samples and by `observe`. For each shard it compresses a sample taken from
16 places across the shard with the codecs whose numbers are stale, and picks
the codec with the smallest t, but only if it beats none by 10%. A sample
that shrinks to no less than 0.95 of its size goes as none at once.

Sampling is cheap but not free, so it spends at most 5% of the estimated
transfer time of the shards so far. Most rounds time one codec (the probe: the
last choice, else the one that shrank best); all of them are timed every 16th
round, or when the probe's ratio moves by more than 0.05, which means the
data changed and the old averages are dropped. Until the link has been
measured (and no speed was given), every shard goes as none: a link of
unknown speed is taken to be fast, so an unmeasured link never pays for
compression it may not need.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from quanta.errors import ConfigError, shorten
from quanta.transport.codecs import (
    BytesLike,
    as_bytes,
    check_codec,
    check_itemsize,
    compress,
    decompress_into,
)

__all__ = ["AutoCodec"]

logger = logging.getLogger(__name__)

# The choice, as described in the module docstring.
_WEIGHT = 0.3  # of a new measure in a running average
_MARGIN = 0.10  # a codec must beat none by this share of the time
_INCOMPRESSIBLE = 0.95  # a ratio above this never pays
_RATIO_MOVED = 0.05  # a ratio change that means the data changed
_SAMPLING_SHARE = 0.05  # of the transfer time that sampling may spend
_FULL_ROUND_EVERY = 16  # sampling rounds between timings of every codec
_SAMPLE_PIECES = 16


@dataclass
class _Estimate:
    """Running averages for one codec; speeds in raw bytes per second."""

    ratio: float
    compress_speed: float
    decompress_speed: float
    measures: int = 1

    def update(self, ratio: float, compress_speed: float, decompress_speed: float) -> None:
        self.ratio += _WEIGHT * (ratio - self.ratio)
        self.compress_speed += _WEIGHT * (compress_speed - self.compress_speed)
        self.decompress_speed += _WEIGHT * (decompress_speed - self.decompress_speed)
        self.measures += 1

    def seconds(self, n: int, link: float) -> float:
        """Time for a shard of n bytes through the three pipelined stages."""
        return max(n / self.compress_speed, n * self.ratio / link, n / self.decompress_speed)


class AutoCodec:
    """Chooses, per shard, the codec that makes the transfer fastest.

    Safe to share between threads: a sender calls `choose` and `observe`, a
    thread that sees acknowledgements calls `observe_link`.

    Args:
        candidates: the codecs to weigh against none.
        sample_bytes: how much of each shard a sampling round compresses.
        link_bytes_per_s: the link's speed if known; `observe_link` refines it.
        clock: seconds, for timing samples (tests pass a fake one).

    Raises:
        ConfigError: an unknown candidate, or a size or speed not above 0.

    NOTE: decompression speed is measured here, on the sender; a receiver
    on slower cores decompresses slower than the choice assumed. And a
    sample is too small to spread over blosc2's threads, so samples rate
    blosc2 at one core's speed until `observe` reports whole shards.

    Example:
        >>> auto = AutoCodec(link_bytes_per_s=125e6)  # 1 Gbit/s
        >>> name = auto.choose(shard, itemsize=2)
        >>> packed = compress(name, shard, itemsize=2)
    """

    def __init__(
        self,
        candidates: tuple[str, ...] = ("lz4", "zstd", "blosc2"),
        *,
        sample_bytes: int = 64 * 1024,
        link_bytes_per_s: float | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ):
        for name in candidates:
            if check_codec(name) == "auto":
                raise ConfigError("'auto' cannot be its own candidate; list concrete codecs")
        if not isinstance(sample_bytes, int) or sample_bytes < _SAMPLE_PIECES:
            raise ConfigError(
                f"sample_bytes {shorten(sample_bytes)} is too small; pass at least "
                f"{_SAMPLE_PIECES} (64 KiB is the default)"
            )
        if link_bytes_per_s is not None and not link_bytes_per_s > 0:
            raise ConfigError(
                f"link_bytes_per_s {shorten(link_bytes_per_s)} is not above 0; pass the "
                "link's bytes per second, or None to measure it"
            )
        self.candidates = tuple(dict.fromkeys(c for c in candidates if c != "none"))
        self.sample_bytes = sample_bytes
        self._link = link_bytes_per_s
        self._clock = clock
        self._estimates: dict[str, _Estimate] = {}
        self._budget = 0.0  # seconds sampling may still spend
        self._sampling_s = 0.0
        self._rounds_since_full = 0
        self._shards = 0
        self._last = "none"
        self._lock = threading.Lock()

    @property
    def link_bytes_per_s(self) -> float | None:
        """The link's throughput as averaged so far; None before any measure."""
        return self._link

    def choose(self, data: BytesLike, itemsize: int) -> str:
        """Return the codec to send this shard with: a name from `CODECS`.

        Args:
            data: the shard's bytes.
            itemsize: bytes per element of its tensor.

        Raises:
            ConfigError: itemsize is not a positive int.
        """
        check_itemsize(itemsize)
        view = as_bytes(data)
        n = len(view)
        with self._lock:
            link = self._link
            if n == 0 or link is None or not self.candidates:
                return "none"
            self._shards += 1
            if self._budget > 0 or len(self._estimates) < len(self.candidates):
                self._sample(view, itemsize)

            choice, seconds = "none", n / link
            best, best_seconds = self._fastest(n, link)
            if best_seconds < seconds * (1 - _MARGIN):
                choice, seconds = best, best_seconds

            self._budget += _SAMPLING_SHARE * seconds
            self._last = choice
        logger.debug(
            "auto: %s for %d bytes, %.2f ms at %.0f MB/s", choice, n, seconds * 1e3, link / 1e6
        )
        return choice

    def observe_link(self, nbytes: int, seconds: float) -> None:
        """Record that the link delivered `nbytes` wire bytes in `seconds`.

        Pass the time the bytes were on the wire, not time spent waiting for
        the compressor, or the link looks as slow as the compressor.
        """
        if nbytes <= 0 or seconds <= 0:
            return  # nothing sent, or too fast for the clock: nothing learnt
        speed = nbytes / seconds
        with self._lock:
            self._link = (
                speed if self._link is None else self._link + _WEIGHT * (speed - self._link)
            )

    def observe(self, name: str, raw: int, compressed: int, seconds: float) -> None:
        """Record a real compression: `raw` bytes became `compressed` in `seconds`.

        Whole shards are a better measure than samples, blosc2's threads above all.
        """
        with self._lock:
            estimate = self._estimates.get(name)
            if estimate is None or raw <= 0 or seconds <= 0:
                return  # a codec never sampled has no decompression speed to go with it
            estimate.update(compressed / raw, raw / seconds, estimate.decompress_speed)

    def describe(self) -> dict:
        """The current estimates, for logs and benchmark reports."""
        with self._lock:
            return {
                "link_bytes_per_s": self._link,
                "shards": self._shards,
                "last_choice": self._last,
                "sampling_seconds": self._sampling_s,
                "codecs": {
                    name: {
                        "ratio": e.ratio,
                        "compress_bytes_per_s": e.compress_speed,
                        "decompress_bytes_per_s": e.decompress_speed,
                        "measures": e.measures,
                    }
                    for name, e in self._estimates.items()
                },
            }

    def _sample(self, view: memoryview, itemsize: int) -> None:
        """Time the probe on a sample, and every candidate when due or needed."""
        sample = _take_sample(view, itemsize, self.sample_bytes)
        names = list(self.candidates)
        full = len(self._estimates) < len(names) or self._rounds_since_full >= _FULL_ROUND_EVERY
        moved = False
        if not full:
            probe = self._last if self._last in self._estimates else self._best_ratio()
            moved = self._time(probe, sample, itemsize)
            names.remove(probe)
        if full or moved:
            # New data (the probe's ratio moved) makes every average stale.
            for name in names:
                self._time(name, sample, itemsize, reset=moved)
            self._rounds_since_full = 0
            logger.debug("auto: timed every codec (%s)", "data changed" if moved else "due")
        else:
            self._rounds_since_full += 1

    def _time(self, name: str, sample: BytesLike, itemsize: int, *, reset: bool = False) -> bool:
        """Compress and decompress the sample; return whether the ratio moved."""
        scratch = memoryview(bytearray(len(sample)))
        if name not in self._estimates:
            # A codec's first call pays for its import, contexts and cold caches.
            decompress_into(name, compress(name, sample, itemsize), scratch)
        start = self._clock()
        packed = compress(name, sample, itemsize)
        packed_at = self._clock()
        decompress_into(name, packed, scratch)
        end = self._clock()

        self._budget -= end - start
        self._sampling_s += end - start
        # A clock coarser than the work reads 0 s; count it as 1 us.
        measure = (
            len(packed) / max(len(sample), 1),
            len(sample) / max(packed_at - start, 1e-6),
            len(sample) / max(end - packed_at, 1e-6),
        )
        old = self._estimates.get(name)
        moved = old is not None and abs(measure[0] - old.ratio) > _RATIO_MOVED
        if old is None or reset or moved:
            self._estimates[name] = _Estimate(*measure)
        else:
            old.update(*measure)
        return moved

    def _fastest(self, n: int, link: float) -> tuple[str, float]:
        """The codec with the shortest time for n bytes, skipping ones that barely shrink."""
        times = {
            name: estimate.seconds(n, link)
            for name, estimate in self._estimates.items()
            if estimate.ratio <= _INCOMPRESSIBLE
        }
        best = min(times, key=times.get, default="none")
        return best, times.get(best, float("inf"))

    def _best_ratio(self) -> str:
        return min(self._estimates, key=lambda name: self._estimates[name].ratio)


def _take_sample(view: memoryview, itemsize: int, limit: int) -> bytes | memoryview:
    """Up to `limit` bytes in equal pieces from across the shard, element-aligned.

    Pieces from across the shard, not just its start, so that a shard which
    opens with padding or zeros is not taken for a compressible one.
    """
    piece = limit // _SAMPLE_PIECES // itemsize * itemsize
    if len(view) <= limit or piece == 0:
        return view[:limit]
    last = (len(view) - piece) // itemsize
    starts = [last * i // (_SAMPLE_PIECES - 1) * itemsize for i in range(_SAMPLE_PIECES)]
    return b"".join(view[s : s + piece] for s in starts)
