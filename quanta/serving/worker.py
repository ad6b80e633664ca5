"""A worker process: runs one Service and answers batches from the gateway.

The worker connects a DEALER socket to the gateway's ROUTER, runs the
service's `setup()`, says it is ready, and then runs each batch it receives.
A second socket, owned by a heartbeat thread, tells the gateway the process
is alive while a long batch holds the main thread. The worker exits when the
gateway says stop or when the gateway process is gone, so it never outlives it.

Messages (all through a `quanta.transport.Channel`, never pickle):

    worker -> gateway   ready {pid, threads}   heartbeat   fatal {error}
                        result {batch, items | layout}   error {batch, error}
    gateway -> worker   batch {batch, endpoint, inputs}   stop
"""

from __future__ import annotations

import logging
import os
import threading
import time
import traceback
from typing import Any

import numpy as np

from quanta.errors import TransportError, shorten
from quanta.service import Service, endpoints, instantiate, load_service
from quanta.transport import Channel, ChannelConfig

__all__ = ["Worker", "pack_outputs", "unpack_outputs"]

logger = logging.getLogger(__name__)


def _is_tensor(value: Any) -> bool:
    return isinstance(value, np.ndarray) or type(value).__module__.startswith("torch")


def pack_outputs(outputs: Any, count: int) -> tuple[dict, dict]:
    """Turn an endpoint's outputs into a header part and tensors.

    An array with one row per input travels as one tensor; a list travels
    item by item, each array as its own tensor and everything else in msgpack.

    Raises:
        TypeError: the outputs are not a list or array of `count` items.
    """
    if _is_tensor(outputs):
        if len(outputs.shape) == 0 or outputs.shape[0] != count:
            raise TypeError(
                f"endpoint returned an array of shape {tuple(outputs.shape)} for {count} "
                "inputs; its first axis must be the batch"
            )
        return {"layout": "rows"}, {"rows": outputs}
    if not isinstance(outputs, list | tuple):
        raise TypeError(f"endpoint returned {shorten(outputs)}; return a list, one per input")
    if len(outputs) != count:
        raise TypeError(f"endpoint returned {len(outputs)} outputs for {count} inputs")
    items, tensors = [], {}
    for i, value in enumerate(outputs):
        if _is_tensor(value):
            tensors[str(i)] = value
            items.append(None)
        else:
            items.append(value)
    return {"layout": "items", "items": items}, tensors


def unpack_outputs(header: dict, tensors: dict) -> list:
    """Invert `pack_outputs`: a list with one output per input."""
    if header.get("layout") == "rows":
        return list(tensors["rows"])
    items = header.get("items")
    if not isinstance(items, list):
        raise TransportError(f"result has no list of items: {shorten(header)}")
    for key, value in tensors.items():
        items[int(key)] = value
    return items


class Worker:
    """One worker process's loop; `run()` returns when the gateway says stop."""

    def __init__(self, *, address: str, worker_id: str, service: Service, heartbeat_s: float):
        self.address = address
        self.worker_id = worker_id
        self.service = service
        self.heartbeat_s = heartbeat_s
        self.endpoint_names = set(endpoints(type(service)))
        self.stopping = threading.Event()

    def _channel(self, identity: str) -> Channel:
        return Channel.connect(self.address, ChannelConfig(identity=identity.encode()))

    def _heartbeat(self) -> None:
        channel = self._channel(f"{self.worker_id}.hb")
        parent = os.getppid()
        while not self.stopping.wait(self.heartbeat_s):
            # A gateway killed with SIGKILL cannot say stop: notice the
            # re-parenting instead, and leave no orphan behind.
            if os.getppid() != parent:
                logger.error("worker %s: gateway process is gone, exiting", self.worker_id)
                os._exit(1)
            channel.send({"type": "heartbeat"})
        channel.close(linger=0)

    def run(self) -> None:
        channel = self._channel(self.worker_id)
        heartbeat = threading.Thread(target=self._heartbeat, daemon=True, name="heartbeat")
        heartbeat.start()
        started = time.perf_counter()
        try:
            self.service.setup()
        except Exception as exc:
            logger.exception("worker %s: setup() failed", self.worker_id)
            channel.send({"type": "fatal", "error": f"setup() failed: {exc!r}"})
            channel.close()
            # logged once above; the gateway reports the exit and restarts
            raise SystemExit(1) from None
        channel.send({"type": "ready", "pid": os.getpid()})
        # the gateway logs the worker's readiness at INFO, as a lifecycle event
        logger.debug(
            "worker %s (pid %d) set up in %.1f s",
            self.worker_id,
            os.getpid(),
            time.perf_counter() - started,
        )

        while True:
            try:
                header, _ = channel.recv()
            except TransportError as exc:
                logger.warning("worker %s: dropped a malformed message: %s", self.worker_id, exc)
                continue
            if header.get("type") == "stop":
                break
            if header.get("type") == "batch":
                self._run_batch(channel, header)
        self.stopping.set()
        heartbeat.join()
        channel.close()
        logger.debug("worker %s stopped", self.worker_id)

    def _run_batch(self, channel: Channel, header: dict) -> None:
        batch, name, inputs = header.get("batch"), header.get("endpoint"), header.get("inputs")
        if name not in self.endpoint_names or not isinstance(inputs, list):
            error = f"malformed batch for endpoint {shorten(name)}"
            channel.send({"type": "error", "batch": batch, "error": error})
            return
        try:
            outputs = getattr(self.service, name)(inputs)
            part, tensors = pack_outputs(outputs, len(inputs))
            channel.send({"type": "result", "batch": batch, **part}, tensors)
        except Exception as exc:
            # The endpoint's own failure: report it for this batch and keep serving.
            logger.error(
                "worker %s: endpoint %s failed on a batch of %d:\n%s",
                self.worker_id,
                name,
                len(inputs),
                traceback.format_exc(),
            )
            error = f"{type(exc).__name__}: {exc}"
            channel.send({"type": "error", "batch": batch, "error": error})


def serve_worker(
    *, address: str, worker_id: str, service: str, options: dict, threads: int, heartbeat_s: float
) -> None:
    """Entry point of a worker process (see `quanta.cli`)."""
    import torch

    torch.set_num_threads(threads)
    instance = instantiate(load_service(service), options)
    Worker(address=address, worker_id=worker_id, service=instance, heartbeat_s=heartbeat_s).run()
