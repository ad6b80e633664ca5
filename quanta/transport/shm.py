"""Shared-memory segments: how large tensors cross processes on one host.

A sender copies a message's large tensors into one segment, a file in
/dev/shm, and sends only its name and the tensors' offsets. The receiver maps
the file and views the tensors in place, so the bytes are copied once in all,
by the sender. Both sides keep their mappings: when the receiver has dropped
every array of a message, it tells the sender, which reuses the segment for a
later message. A reused segment costs a plain memcpy; a fresh one also pays a
page fault per 4 KiB on both sides, which on this class of machine is several
times slower than the copy itself.

Who removes a segment:
  - the sender, when it no longer needs it (`SegmentPool.discard`, `close`),
    when its peer is gone (`Channel.forget`), and at exit;
  - anyone, for segments whose creating process is dead (`reclaim`): names
    carry the creator's pid, so a crashed sender's files are found and removed
    the next time a channel starts on the host.

A receiver that dies needs no cleanup of its own: its mappings end with it,
and the sender removes the files once it learns the peer is gone.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import mmap
import os
import re
import secrets
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from quanta.errors import TransportError, shorten

__all__ = ["SHM_DIR", "Segment", "SegmentPool", "SegmentCache", "reclaim", "our_segments"]

logger = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
# quanta-<creator pid>-<random token>-<counter>: the pid lets `reclaim` find
# orphans; the token keeps two channels in one process apart.
_NAME = re.compile(r"quanta-(\d{1,10})-([0-9a-f]{8})-(\d{1,12})")
# Segments are sized in whole MiB so that one can be reused for a message of a
# slightly different size.
_GRAIN = 1 << 20
# Tensors inside a segment start on cache-line boundaries.
_ALIGN = 64


def align(offset: int) -> int:
    """Round up to the alignment of a tensor inside a segment."""
    return -(-offset // _ALIGN) * _ALIGN


@dataclass(eq=False)
class Segment:
    """One mapped file in /dev/shm."""

    name: str
    size: int
    map: mmap.mmap

    @property
    def path(self) -> str:
        return os.path.join(SHM_DIR, self.name)

    def array(self, offset: int, nbytes: int) -> np.ndarray:
        """A uint8 view of `nbytes` at `offset`."""
        return np.frombuffer(self.map, dtype=np.uint8, count=nbytes, offset=offset)

    def close(self) -> bool:
        """Unmap; False while arrays still view the mapping."""
        try:
            self.map.close()
        except BufferError:
            return False
        return True


def _map(fd: int, size: int) -> mmap.mmap:
    return mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)


class SegmentPool:
    """A sender's segments: handed out for messages, returned by receivers, reused.

    `max_free_bytes` bounds the memory kept for reuse; segments past it are removed.
    """

    def __init__(self, max_free_bytes: int):
        self.max_free_bytes = max_free_bytes
        self._prefix = f"quanta-{os.getpid()}-{secrets.token_hex(4)}-"
        self._counter = itertools.count()
        self._free: list[Segment] = []
        self._busy: dict[str, Segment] = {}

    @property
    def busy_bytes(self) -> int:
        return sum(s.size for s in self._busy.values())

    @property
    def names(self) -> list[str]:
        return [s.name for s in (*self._free, *self._busy.values())]

    def acquire(self, nbytes: int) -> Segment:
        """A segment of at least `nbytes`: a free one that is not more than twice too big,
        or a new one."""
        fits = [s for s in self._free if nbytes <= s.size <= 2 * max(nbytes, _GRAIN)]
        if fits:
            segment = min(fits, key=lambda s: s.size)
            self._free.remove(segment)
        else:
            segment = self._create(-(-max(nbytes, 1) // _GRAIN) * _GRAIN)
        self._busy[segment.name] = segment
        return segment

    def _create(self, size: int) -> Segment:
        name = f"{self._prefix}{next(self._counter)}"
        path = os.path.join(SHM_DIR, name)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, size)
            return Segment(name, size, _map(fd, size))
        except OSError as exc:
            os.unlink(path)
            raise TransportError(
                f"cannot make a {size}-byte shared-memory segment in {SHM_DIR}: {exc}; "
                "free space there or lower the channel's shm_threshold"
            ) from exc
        finally:
            os.close(fd)

    def release(self, name: str) -> list[str]:
        """A receiver is done with a segment: keep it for reuse.

        Returns the names removed to stay within `max_free_bytes`.
        """
        segment = self._busy.pop(name, None)
        if segment is None:
            return []
        self._free.append(segment)
        removed = []
        while sum(s.size for s in self._free) > self.max_free_bytes:
            oldest = self._free.pop(0)
            self._remove(oldest)
            removed.append(oldest.name)
        return removed

    def discard(self, name: str) -> None:
        """Remove a busy segment whose receiver will never return it."""
        segment = self._busy.pop(name, None)
        if segment is not None:
            self._remove(segment)

    def _remove(self, segment: Segment) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(segment.path)
        if not segment.close():
            # A message still being sent from it; the mapping ends with the last view.
            logger.debug("segment %s removed while still mapped", segment.name)

    def close(self) -> None:
        """Remove every segment, free or busy."""
        for segment in [*self._free, *self._busy.values()]:
            self._remove(segment)
        self._free.clear()
        self._busy.clear()


class SegmentCache:
    """A receiver's mappings of its peers' segments, and the leases on them.

    A lease covers the arrays of one message in one segment. It ends when the
    last of them is garbage; `on_release(name)` is then called, from whatever
    thread dropped the array, so it must only record the name.
    """

    def __init__(self, on_release: Callable[[str], None], max_mapped: int = 64):
        self.on_release = on_release
        self.max_mapped = max_mapped
        self._maps: dict[str, Segment] = {}
        self._leased: dict[str, int] = {}

    def view(self, name: str, nbytes: int) -> np.ndarray:
        """Lease a segment and return a writable uint8 array over its first `nbytes`.

        Raises:
            TransportError: the name is not a quanta segment, the segment is gone,
                or it is smaller than `nbytes`.
        """
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise TransportError(f"{shorten(name)} is not the name of a quanta segment")
        segment = self._maps.get(name) or self._open(name)
        if nbytes > segment.size:
            raise TransportError(
                f"message claims {nbytes} bytes of segment {name}, which has {segment.size}"
            )
        owner = segment.array(0, nbytes)
        self._leased[name] = self._leased.get(name, 0) + 1
        # Every view of `owner` keeps it alive (numpy's base), so its death
        # means the receiver holds nothing of the message any more.
        weakref.finalize(owner, self._returned, name)
        return owner

    def _open(self, name: str) -> Segment:
        try:
            fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR)
        except OSError as exc:
            raise TransportError(
                f"shared-memory segment {name} cannot be opened ({exc.strerror}); its sender "
                "is gone or removed it"
            ) from exc
        try:
            size = os.fstat(fd).st_size
            segment = Segment(name, size, _map(fd, size))
        finally:
            os.close(fd)
        self._maps[name] = segment
        self._trim()
        return segment

    def _returned(self, name: str) -> None:
        self._leased[name] -= 1
        if not self._leased[name]:
            del self._leased[name]
        self.on_release(name)

    def forget(self, names: list[str]) -> None:
        """The sender removed these segments: unmap those no array views."""
        for name in names:
            segment = self._maps.get(name)
            if segment is not None and name not in self._leased and segment.close():
                del self._maps[name]

    def _trim(self) -> None:
        # Mappings of segments the sender kept but no longer uses would pin
        # their memory; beyond `max_mapped`, drop the unleased ones.
        for name in list(self._maps):
            if len(self._maps) <= self.max_mapped:
                break
            if name not in self._leased and self._maps[name].close():
                del self._maps[name]

    def close(self) -> None:
        for segment in self._maps.values():
            segment.close()
        self._maps.clear()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def our_segments() -> list[str]:
    """Names of every quanta segment in /dev/shm, whoever made it."""
    try:
        return sorted(n for n in os.listdir(SHM_DIR) if _NAME.fullmatch(n))
    except FileNotFoundError:
        return []


def reclaim() -> list[str]:
    """Remove the segments of processes that are no longer running.

    NOTE: a recycled pid makes a dead creator look alive; its segments then wait
    for the next call after that process ends.
    """
    removed = []
    for name in our_segments():
        pid = int(_NAME.fullmatch(name).group(1))
        if not _alive(pid):
            try:
                os.unlink(os.path.join(SHM_DIR, name))
                removed.append(name)
            except FileNotFoundError:
                pass
    if removed:
        logger.info("removed %d shared-memory segments of dead processes", len(removed))
    return removed
