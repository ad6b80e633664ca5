"""Prometheus metrics of one gateway, in a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["Metrics"]

_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    """The gateway's counters, histograms and gauges.

    A registry per gateway (not the process-wide default) keeps two servers
    in one process, as in tests, from counting into each other.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "quanta_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.latency = Histogram(
            "quanta_request_latency_seconds",
            "HTTP request latency by route",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "quanta_batch_size",
            "Inputs per batch sent to a worker",
            ["endpoint"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "quanta_queue_depth",
            "Inputs waiting in the gateway for a batch",
            ["endpoint"],
            registry=r,
        )
        self.ready_workers = Gauge("quanta_ready_workers", "Workers ready for batches", registry=r)
        self.retries = Counter(
            "quanta_batch_retries", "Batches sent again after their worker died", registry=r
        )

    def render(self) -> bytes:
        """The text exposition format, for GET /metrics."""
        return generate_latest(self.registry)
