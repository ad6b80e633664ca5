"""A closed-loop HTTP load generator with little overhead of its own.

Each of `connections` keep-alive connections sends one request, waits for the
answer, and sends the next, until `count` requests have been answered. It
speaks just enough HTTP/1.1 by hand (fixed Content-Length bodies, no
chunking) that the generator, which shares the machine with the server it
measures, takes as little CPU from it as possible.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["LoadResult", "run_load"]


@dataclass(frozen=True)
class LoadResult:
    """What a load run measured; latencies in seconds."""

    requests: int
    errors: int
    seconds: float
    latencies: np.ndarray

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q))

    def summary(self) -> dict:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "seconds": round(self.seconds, 3),
            "requests_per_s": round(self.rps, 2),
            "p50_ms": round(self.percentile(50) * 1000, 2),
            "p99_ms": round(self.percentile(99) * 1000, 2),
        }


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)
    return status


async def _connection(
    host: str, port: int, requests: list[bytes], next_index, latencies: list, errors: list
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while (i := next_index()) is not None:
            started = time.perf_counter()
            writer.write(requests[i % len(requests)])
            status = await _read_response(reader)
            latencies.append(time.perf_counter() - started)
            if status != 200:
                errors.append(status)
    finally:
        writer.close()


async def _run(host, port, path, bodies, connections, count) -> LoadResult:
    requests = [
        (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        + body
        for body in bodies
    ]
    issued = iter(range(count))

    def next_index():
        return next(issued, None)

    latencies: list[float] = []
    errors: list[int] = []
    started = time.perf_counter()
    await asyncio.gather(
        *(
            _connection(host, port, requests, next_index, latencies, errors)
            for _ in range(connections)
        )
    )
    seconds = time.perf_counter() - started
    return LoadResult(len(latencies), len(errors), seconds, np.array(latencies))


def run_load(
    url: str, path: str, bodies: Sequence[bytes], *, connections: int, count: int
) -> LoadResult:
    """Send `count` POST requests over `connections` connections; bodies are used in turn.

    Args:
        url: "http://host:port" of the server (loopback).
        path: the route, e.g. "/v1/embeddings".
        bodies: JSON bodies, cycled through in order.
        connections: requests in flight at once.
        count: requests to send in all.
    """
    host, _, port = url.removeprefix("http://").rstrip("/").partition(":")
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    return runner(_run(host, int(port), path, list(bodies), connections, count))
