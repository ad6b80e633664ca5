"""The worker pool: starts worker processes, hands them batches, replaces the dead.

The gateway binds a ROUTER socket on an ipc:// path in a private directory;
each worker connects a DEALER to it (see `quanta.serving.worker`). The pool
keeps, for every worker, its process, its state and the batches it is
running. A worker takes `batches_per_worker` batches at a time (one by
default), so under load a batch waits in the gateway, where it can still
grow, until some worker has room.

A worker that dies (its process exits, or it is silent for ten heartbeats and
is killed) fails its batch over to another worker once; a second loss of the
same batch answers its requests with `WorkerLostError`. A replacement starts
at once, or after a growing pause when workers keep dying during setup.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from quanta.errors import BatchFailedError, TransportError, WorkerLostError
from quanta.serving.config import ServerConfig
from quanta.serving.metrics import Metrics
from quanta.serving.worker import unpack_outputs
from quanta.transport import AsyncChannel

__all__ = ["WorkerPool", "WorkerHandle"]

logger = logging.getLogger(__name__)

# How often the pool looks for exited workers.
_MONITOR_INTERVAL_S = 0.05
# A worker silent for this many heartbeat periods is taken as hung and killed.
_SILENT_HEARTBEATS = 10
# Before its first heartbeat a worker is importing torch, which on a cold disk
# can take far longer than ten heartbeats; it gets this long instead.
_FIRST_HEARTBEAT_S = 120.0
# Pauses before restarting a worker that died during setup, doubling up to this.
_MAX_RESTART_DELAY_S = 30.0


@dataclass(eq=False)
class WorkerHandle:
    """The gateway's view of one worker process."""

    id: str
    process: subprocess.Popen
    started: float
    state: str = "starting"  # starting -> ready (-> unreachable) -> dead
    last_seen: float = field(default_factory=time.monotonic)
    heard_from: bool = False
    items: int = 0
    reserved: int = 0
    error: str = ""
    batches: dict[int, asyncio.Future] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.process.pid

    def has_room(self, capacity: int) -> bool:
        return self.state == "ready" and self.reserved + len(self.batches) < capacity


class WorkerPool:
    """Worker processes behind one ROUTER socket; see the module docstring."""

    def __init__(self, config: ServerConfig, metrics: Metrics):
        self.config = config
        self.metrics = metrics
        self.workers: dict[str, WorkerHandle] = {}
        self._ids = itertools.count(1)
        self._batch_ids = itertools.count(1)
        self._changed = asyncio.Condition()
        self._tasks: list[asyncio.Task] = []
        self._failed_starts = 0
        self._stopping = False
        self._directory = tempfile.mkdtemp(prefix="quanta-")
        self.address = f"ipc://{self._directory}/gateway.sock"
        self._channel: AsyncChannel | None = None

    @property
    def ready_count(self) -> int:
        return sum(w.state == "ready" for w in self.workers.values())

    async def start(self) -> None:
        """Bind the socket and start the workers; returns before they are ready."""
        # A send to a worker that has gone raises instead of vanishing silently.
        self._channel = AsyncChannel(self.address)
        self._channel.start()
        self._tasks = [
            asyncio.create_task(self._receive(), name="pool-receive"),
            asyncio.create_task(self._monitor(), name="pool-monitor"),
        ]
        for _ in range(self.config.worker_count):
            self._spawn()
        logger.info(
            "starting %d workers, %d torch threads each, socket %s",
            self.config.worker_count,
            self.config.worker_threads,
            self.address,
        )

    def _spawn(self) -> WorkerHandle:
        worker_id = f"w{next(self._ids)}"
        threads = self.config.worker_threads
        flags = {
            "--address": self.address,
            "--worker-id": worker_id,
            "--service": self.config.service,
            "--options": json.dumps(self.config.options),
            "--threads": str(threads),
            "--heartbeat-s": str(self.config.heartbeat_s),
            "--log-level": logging.getLevelName(logging.getLogger("quanta").getEffectiveLevel()),
        }
        command = [sys.executable, "-m", "quanta.cli", "worker", *itertools.chain(*flags.items())]
        # OpenMP and MKL read their pool sizes at load time, before torch can set them.
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        # A session of its own keeps a terminal's Ctrl-C (sent to the whole
        # foreground group) away from the workers: the gateway stops them in order.
        process = subprocess.Popen(
            command, env=env, stdin=subprocess.DEVNULL, start_new_session=True
        )
        handle = WorkerHandle(worker_id, process, started=time.monotonic())
        self.workers[worker_id] = handle
        return handle

    async def acquire(self) -> WorkerHandle:
        """Wait for a ready worker with room for a batch and reserve that room.

        Of the workers with room, the one with the fewest items in flight wins.
        """
        capacity = self.config.batches_per_worker
        async with self._changed:
            while True:
                free = [w for w in self.workers.values() if w.has_room(capacity)]
                if free:
                    worker = min(free, key=lambda w: (w.items, w.reserved))
                    worker.reserved += 1
                    return worker
                await self._changed.wait()

    async def release(self, worker: WorkerHandle) -> None:
        """Give back a reservation from `acquire` that will not be used."""
        worker.reserved -= 1
        await self._notify()

    async def run(self, worker: WorkerHandle, endpoint: str, inputs: list) -> list:
        """Run a batch on a reserved worker, failing over once if it dies.

        Raises:
            WorkerLostError: the batch lost its worker twice.
            BatchFailedError: the endpoint raised an exception.
        """
        for attempt in (1, 2):
            try:
                return await self._run_once(worker, endpoint, inputs)
            except WorkerLostError:
                if attempt == 2:
                    raise
                self.metrics.retries.inc()
                logger.warning(
                    "worker %s lost a batch of %d; retrying it on another worker",
                    worker.id,
                    len(inputs),
                )
                worker = await self.acquire()
        raise AssertionError("unreachable")

    async def _run_once(self, worker: WorkerHandle, endpoint: str, inputs: list) -> list:
        worker.reserved -= 1
        batch_id = next(self._batch_ids)
        reply = worker.batches[batch_id] = asyncio.get_running_loop().create_future()
        worker.items += len(inputs)
        try:
            if worker.state != "ready":
                raise WorkerLostError(f"worker {worker.id} died before the batch was sent")
            header = {"type": "batch", "batch": batch_id, "endpoint": endpoint, "inputs": inputs}
            try:
                await self._channel.send(header, peer=worker.id.encode())
            except TransportError as exc:
                # Its socket is gone before the monitor has seen the process
                # exit: take it out of rotation now, or the retry would pick it
                # again, and make sure the process ends so it is replaced.
                worker.state = "unreachable"
                worker.process.kill()
                raise WorkerLostError(f"worker {worker.id} is unreachable: {exc}") from exc
            header, tensors = await reply
        finally:
            worker.batches.pop(batch_id, None)
            worker.items -= len(inputs)
            await self._notify()
        if header["type"] == "error":
            raise BatchFailedError(f"endpoint {endpoint!r} failed: {header.get('error')}")
        return unpack_outputs(header, tensors)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()
        self.metrics.ready_workers.set(self.ready_count)

    async def _receive(self) -> None:
        while True:
            try:
                message = await self._channel.recv()
            except TransportError as exc:
                logger.warning("dropped a malformed message: %s", exc)
                continue
            header, tensors = message
            identity = message.peer.decode(errors="replace")
            worker = self.workers.get(identity.removesuffix(".hb"))
            if worker is None:
                continue
            worker.last_seen = time.monotonic()
            worker.heard_from = True
            await self._handle(worker, header, tensors)

    async def _handle(self, worker: WorkerHandle, header: dict, tensors: dict) -> None:
        kind = header.get("type")
        if kind == "ready" and worker.state == "starting":
            worker.state = "ready"
            self._failed_starts = 0
            logger.info(
                "worker %s (pid %d) ready after %.1f s; %d of %d ready",
                worker.id,
                worker.pid,
                time.monotonic() - worker.started,
                self.ready_count,
                self.config.worker_count,
            )
            await self._notify()
        elif kind in ("result", "error"):
            future = worker.batches.get(header.get("batch"))
            if future is not None and not future.done():
                future.set_result((header, tensors))
        elif kind == "fatal":
            worker.error = str(header.get("error"))

    async def _monitor(self) -> None:
        while True:
            await asyncio.sleep(_MONITOR_INTERVAL_S)
            now = time.monotonic()
            silent_limit = _SILENT_HEARTBEATS * self.config.heartbeat_s
            for worker in list(self.workers.values()):
                code = worker.process.poll()
                limit = silent_limit if worker.heard_from else _FIRST_HEARTBEAT_S
                if code is not None:
                    await self._bury(worker, code)
                elif now - worker.last_seen > limit:
                    logger.error(
                        "worker %s (pid %d) silent for %.0f s; killing it",
                        worker.id,
                        worker.pid,
                        now - worker.last_seen,
                    )
                    worker.process.kill()

    async def _bury(self, worker: WorkerHandle, code: int) -> None:
        """Take a dead worker out, fail its batches over, and start a replacement."""
        was_ready = worker.state in ("ready", "unreachable")
        worker.state = "dead"
        del self.workers[worker.id]
        # Shared memory it was lent, and anything half-sent to it, goes now.
        for identity in (worker.id, f"{worker.id}.hb"):
            self._channel.forget(identity.encode())
        for future in worker.batches.values():
            if not future.done():
                future.set_exception(WorkerLostError(f"worker {worker.id} exited ({code})"))
        await self._notify()
        if self._stopping:
            return
        logger.error(
            "worker %s (pid %d) exited with %s%s; starting a replacement",
            worker.id,
            worker.pid,
            _describe_exit(code),
            f" ({worker.error})" if worker.error else "",
        )
        self._failed_starts = 0 if was_ready else self._failed_starts + 1
        if self._failed_starts:
            delay = min(2.0 ** (self._failed_starts - 1), _MAX_RESTART_DELAY_S)
            logger.error(
                "worker died during setup %d times in a row; next start in %.0f s",
                self._failed_starts,
                delay,
            )
            self._tasks.append(asyncio.create_task(self._spawn_later(delay)))
        else:
            self._spawn()

    async def _spawn_later(self, delay: float) -> None:
        await asyncio.sleep(delay)
        if not self._stopping:
            self._spawn()

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Stop every worker, kill those that do not stop in time, remove the socket."""
        self._stopping = True
        for worker in self.workers.values():
            try:
                if worker.state != "ready":
                    raise TransportError(f"worker {worker.id} is not ready")
                await self._channel.send({"type": "stop"}, peer=worker.id.encode())
            except TransportError:
                # Still in setup, or its socket is gone: it cannot read a stop message.
                worker.process.terminate()
        deadline = time.monotonic() + timeout_s
        while any(w.process.poll() is None for w in self.workers.values()):
            if time.monotonic() > deadline:
                for worker in self.workers.values():
                    if worker.process.poll() is None:
                        logger.warning("worker %s did not stop in time; killing it", worker.id)
                        worker.process.kill()
                        worker.process.wait()
                break
            await asyncio.sleep(0.05)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for worker in self.workers.values():
            for future in worker.batches.values():
                if not future.done():
                    future.set_exception(WorkerLostError("the server is shutting down"))
        await self._channel.close()
        shutil.rmtree(self._directory, ignore_errors=True)
        logger.info("all workers stopped")

    def describe(self) -> list[dict[str, Any]]:
        """One dict per worker, for the health endpoint."""
        return [
            {"id": w.id, "pid": w.pid, "state": w.state, "items_in_flight": w.items}
            for w in self.workers.values()
        ]


def _describe_exit(code: int) -> str:
    if code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"code {code}"
