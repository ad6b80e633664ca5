"""Configuration of a server: one frozen dataclass, one field per CLI flag."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from quanta import hardware
from quanta.errors import ConfigError

__all__ = ["ServerConfig", "BUILTIN_SERVICE"]

BUILTIN_SERVICE = "quanta.models.minilm:MiniLMEmbedder"


@dataclass(frozen=True)
class ServerConfig:
    """Everything `quanta serve` and `quanta run` need to start a server.

    Attributes:
        service: the Service class, as `module:Class` or `file.py:Class`.
        options: keyword options for the Service's `__init__`.
        host, port: where the gateway listens.
        workers: worker processes; 0 means one per core (see docs/benchmarks.md).
        threads_per_worker: torch threads in each worker; 0 means cores / workers.
        batches_per_worker: batches a worker holds at once (more than one
            hides the round trip, but closes batches earlier under load).
        max_batch_size, max_wait_ms: replace every endpoint's own limits if set.
        max_inputs: the most inputs one request may carry.
        max_body_bytes: the largest request body accepted.
        max_queue: inputs waiting in the gateway before it answers 503.
        request_timeout_s: a request not answered by then gets a 503.
        api_key: if set, /v1/ routes need `Authorization: Bearer <api_key>`.
        heartbeat_s: how often workers report; one silent for 10 of these is replaced.
    """

    service: str = BUILTIN_SERVICE
    options: dict[str, Any] = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 0
    threads_per_worker: int = 0
    batches_per_worker: int = 1
    max_batch_size: int | None = None
    max_wait_ms: float | None = None
    max_inputs: int = 2048
    max_body_bytes: int = 16 * 1024 * 1024
    max_queue: int = 65536
    request_timeout_s: float = 60.0
    api_key: str | None = None
    heartbeat_s: float = 1.0

    def __post_init__(self) -> None:
        checks = [
            ("port", 0 <= self.port <= 65535, "between 0 and 65535"),
            ("workers", self.workers >= 0, "0 (automatic) or more"),
            ("threads_per_worker", self.threads_per_worker >= 0, "0 (automatic) or more"),
            ("batches_per_worker", self.batches_per_worker >= 1, ">= 1"),
            ("max_batch_size", self.max_batch_size is None or self.max_batch_size >= 1, ">= 1"),
            ("max_wait_ms", self.max_wait_ms is None or self.max_wait_ms >= 0, ">= 0"),
            ("max_inputs", self.max_inputs >= 1, ">= 1"),
            ("max_body_bytes", self.max_body_bytes >= 1024, ">= 1024"),
            ("max_queue", self.max_queue >= 1, ">= 1"),
            ("request_timeout_s", self.request_timeout_s > 0, "> 0"),
            ("heartbeat_s", self.heartbeat_s > 0, "> 0"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ConfigError(f"{name}={getattr(self, name)!r} is invalid: use {expected}")
        if self.api_key == "":
            raise ConfigError("api_key is an empty string: pass a key, or none to turn auth off")

    @property
    def worker_count(self) -> int:
        """The number of worker processes, resolving 0 to one per core.

        A small model makes small matrix products, which a single thread runs
        nearly as fast as several: one single-threaded worker per core serves
        more than fewer workers with more threads each (docs/benchmarks.md).
        """
        return self.workers or hardware.detect().cores

    @property
    def worker_threads(self) -> int:
        """Torch threads per worker, resolving 0 to an even share of the cores."""
        return self.threads_per_worker or max(1, hardware.detect().cores // self.worker_count)
