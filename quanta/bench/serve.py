"""Benchmark `quanta serve` against a plain FastAPI + sentence-transformers server.

Both servers run on this machine in turn, on loopback, and get the same
closed-loop load: one sentence per request from standard library docstrings,
`connections` requests in flight, `warmup` requests unmeasured, then `count`
measured. The plain server runs in both of FastAPI's usual shapes (a sync
route in the thread pool, an async route on the event loop); quanta is
compared with the better of the two on each measure.

    python -m quanta.bench serve [--count 2000] [--connections 32] [--out bench-results]
    python -m quanta.bench serve --skip-plain --quanta-args "--workers 1"   (settings)
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import httpx

from quanta import hardware
from quanta.bench.corpus import sentences
from quanta.bench.load import LoadResult, run_load
from quanta.bench.record import write_record

__all__ = ["main"]

MODEL = "all-MiniLM-L6-v2"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _measure(name: str, command: list[str], bodies: list[bytes], args) -> LoadResult:
    """Start a server, wait until it is ready, load it, stop it."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([*command, "--port", str(port)], stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start (exit code {process.poll()})")
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        run_load(url, "/v1/embeddings", bodies, connections=args.connections, count=args.warmup)
        result = run_load(
            url, "/v1/embeddings", bodies, connections=args.connections, count=args.count
        )
    finally:
        process.terminate()
        process.wait(30)
    print(f"{name}: {result.summary()}", flush=True)
    return result


def _plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.bar(names, [results[n]["requests_per_s"] for n in names], color="#3b7dd8")
    left.set_ylabel("requests / s (higher is better)")
    width = 0.38
    xs = range(len(names))
    right.bar(
        [x - width / 2 for x in xs], [results[n]["p50_ms"] for n in names], width, label="p50"
    )
    right.bar(
        [x + width / 2 for x in xs], [results[n]["p99_ms"] for n in names], width, label="p99"
    )
    right.set_xticks(list(xs), names)
    right.set_ylabel("latency, ms (lower is better)")
    right.legend()
    for axis in (left, right):
        axis.tick_params(axis="x", labelsize=8)
    fig.suptitle("one sentence per request, 32 connections, all-MiniLM-L6-v2")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m quanta.bench serve", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--count", type=int, default=2000, help="measured requests per server")
    parser.add_argument("--warmup", type=int, default=100, help="unmeasured requests first")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument(
        "--quanta-args", default="", help="extra flags for `quanta serve`, e.g. '--workers 1'"
    )
    parser.add_argument(
        "--skip-plain",
        action="store_true",
        help="measure quanta alone, to compare its own settings",
    )
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args(argv)

    corpus = sentences(2000)
    bodies = [json.dumps({"model": MODEL, "input": text}).encode() for text in corpus]
    python = sys.executable
    serve = [python, "-m", "quanta.cli", "serve", "--log-level", "warning"]
    runs = {"quanta": [*serve, *shlex.split(args.quanta_args)]}
    if not args.skip_plain:
        plain_server = [python, "-m", "quanta.bench.plain_server", "--mode"]
        runs["plain (sync route)"] = [*plain_server, "sync"]
        runs["plain (async route)"] = [*plain_server, "async"]
    results = {name: _measure(name, cmd, bodies, args).summary() for name, cmd in runs.items()}

    quanta, plain = results["quanta"], [v for k, v in results.items() if k != "quanta"]
    record = {
        "benchmark": "serve",
        "command": "python -m quanta.bench serve " + " ".join(argv or sys.argv[2:]),
        "machine": {"cpu": hardware.detect().describe(), "python": platform.python_version()},
        "corpus_sentences": len(corpus),
        "connections": args.connections,
        "count": args.count,
        "results": results,
    }
    if plain:
        best_rps = max(p["requests_per_s"] for p in plain)
        record["throughput_ratio"] = round(quanta["requests_per_s"] / best_rps, 2)
        record["p99_ratio"] = round(quanta["p99_ms"] / min(p["p99_ms"] for p in plain), 2)
    _report(record)
    write_record(args.out, "serve", record, lambda path: _plot(results, path))
    return record


def _report(record: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"serve: {record['count']} requests, {record['connections']} connections")
    for column in ("server", "requests/s", "p50 ms", "p99 ms", "errors"):
        table.add_column(column, justify="right" if column != "server" else "left")
    for name, r in record["results"].items():
        table.add_row(
            name,
            f"{r['requests_per_s']:.1f}",
            f"{r['p50_ms']:.1f}",
            f"{r['p99_ms']:.1f}",
            str(r["errors"]),
        )
    console = Console()
    console.print(table)
    if "throughput_ratio" not in record:
        return
    console.print(
        f"quanta / best plain: {record['throughput_ratio']:.2f}x requests/s, "
        f"p99 {record['p99_ratio']:.2f}x"
    )
