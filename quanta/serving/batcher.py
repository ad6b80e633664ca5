"""The batcher: collects inputs from many requests into batches for the workers.

Each endpoint has one batcher. Inputs wait in buckets of similar size (for
text, token count), so a batch pads little. A bucket's batch is ready at
`max_batch_size` inputs, or `max_wait_ms` after its oldest input arrived,
whichever comes first. A ready batch is sent when a worker has room; while
every worker is busy it keeps filling up to `max_batch_size`, which is how
batches grow with the load. Of the ready buckets, the one ready longest goes
first, so no bucket waits behind a stream of full batches from another.

A request may carry more inputs than one batch holds: each input is queued
on its own and has its own future, and the request gathers them in order.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from quanta.errors import BatchFailedError, ServingError
from quanta.service import EndpointSpec
from quanta.serving.metrics import Metrics
from quanta.serving.pool import WorkerPool

__all__ = ["Batcher", "QueueFullError", "SIZE_BOUNDS"]

logger = logging.getLogger(__name__)

# Upper bounds of the size buckets. Powers of two keep the padding of a
# batch under half its work whatever the mix of sizes; sizes up to 16 share
# one bucket, since short texts cost little padding and gain from larger
# batches (docs/benchmarks.md compares the bounds).
SIZE_BOUNDS = (16, 32, 64, 128, 256, 512)


class QueueFullError(ServingError):
    """The gateway already holds `max_queue` inputs; the request is refused."""


@dataclass(eq=False)
class _Item:
    value: Any
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)


class Batcher:
    """Queues inputs for one endpoint and sends them to the pool in batches."""

    def __init__(self, spec: EndpointSpec, pool: WorkerPool, metrics: Metrics, *, max_queue: int):
        self.spec = spec
        self.pool = pool
        self.metrics = metrics
        self.max_queue = max_queue
        self._buckets = [deque() for _ in range(len(SIZE_BOUNDS) + 1)]
        self._queued = 0
        self._arrival = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._running: set[asyncio.Task] = set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=f"batcher-{self.spec.name}")

    async def stop(self) -> None:
        for task in [self._task, *self._running]:
            if task is not None:
                task.cancel()
        await asyncio.gather(
            *[t for t in [self._task, *self._running] if t], return_exceptions=True
        )

    def submit(self, values: list, sizes: list[int] | None = None) -> list[asyncio.Future]:
        """Queue inputs; return one future per input, resolved with its output.

        Raises:
            QueueFullError: accepting them would exceed `max_queue`.
        """
        if self._queued + len(values) > self.max_queue:
            raise QueueFullError(
                f"{self._queued} inputs are already waiting for {self.spec.path}; "
                "retry later or add workers"
            )
        loop = asyncio.get_running_loop()
        futures = []
        for i, value in enumerate(values):
            item = _Item(value, loop.create_future())
            bucket = bisect.bisect_left(SIZE_BOUNDS, sizes[i]) if sizes else 0
            self._buckets[bucket].append(item)
            futures.append(item.future)
        self._queued += len(values)
        self.metrics.queue_depth.labels(self.spec.path).set(self._queued)
        self._arrival.set()
        return futures

    def _ready_bucket(self) -> tuple[deque | None, float]:
        """The bucket to send from now, or None and the seconds until one is due."""
        now = time.monotonic()
        wait_s = self.spec.max_wait_ms / 1000
        best, best_due = None, float("inf")
        for bucket in self._buckets:
            # inputs whose request has gone (timed out, disconnected) are dropped here
            while bucket and bucket[0].future.done():
                bucket.popleft()
                self._queued -= 1
            if not bucket:
                continue
            # A full bucket is due since its oldest input came, a partial one
            # max_wait after that: ranking buckets by this keeps a steady stream
            # of full batches from starving a bucket whose wait has run out.
            full = len(bucket) >= self.spec.max_batch_size
            due = bucket[0].arrived if full else bucket[0].arrived + wait_s
            if due < best_due:
                best, best_due = bucket, due
        if best is None:
            return None, float("inf")
        return (best, 0.0) if best_due <= now else (None, best_due - now)

    async def _next_ready(self) -> None:
        while True:
            bucket, wait_s = self._ready_bucket()
            if bucket is not None:
                return
            self._arrival.clear()
            timeout = None if wait_s == float("inf") else wait_s
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrival.wait(), timeout)

    async def _loop(self) -> None:
        while True:
            await self._next_ready()
            worker = await self.pool.acquire()

            # Choose the bucket again: it may have grown while we waited for a worker.
            bucket, _ = self._ready_bucket()
            if bucket is None:
                bucket = max(self._buckets, key=len)
            items = []
            while bucket and len(items) < self.spec.max_batch_size:
                item = bucket.popleft()
                self._queued -= 1
                if not item.future.done():
                    items.append(item)
            self.metrics.queue_depth.labels(self.spec.path).set(self._queued)
            if not items:
                await self.pool.release(worker)
                continue

            task = asyncio.create_task(self._run(worker, items))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run(self, worker, items: list[_Item]) -> None:
        self.metrics.batch_size.labels(self.spec.path).observe(len(items))
        logger.debug("batch of %d for %s on worker %s", len(items), self.spec.path, worker.id)
        try:
            outputs = await self.pool.run(worker, self.spec.name, [i.value for i in items])
        except Exception as exc:
            if not isinstance(exc, ServingError):
                logger.exception("batch for %s failed in the gateway", self.spec.path)
                exc = BatchFailedError(f"batch for {self.spec.path} failed: {exc!r}")
            for item in items:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        for item, output in zip(items, outputs, strict=True):
            if not item.future.done():
                item.future.set_result(output)
