"""Benchmark moving a tensor between two processes: quanta's Channel against the usual ways.

Tensors of each size and dtype go from this process to a receiver process,
`repeat` times each, by every method:

    quanta-shm    quanta Channel over ipc:// (shared memory on one host)
    quanta-tcp    quanta Channel over tcp://127.0.0.1, default config
    pyzmq-copy    a pyzmq PAIR socket over tcp://127.0.0.1, copy=True, np.frombuffer
    pickle-pipe   conn.send(array) / conn.recv() over a multiprocessing Pipe
    raw-socket    sendall of the bytes, recv_into a preallocated buffer (the link's limit)
    memcpy        np.copyto into a preallocated array, in one process (the host's limit)
    ray           ray.put here, ray.get in an actor, in a loopback-only namespace

One run: start the clock, send, the receiver takes the tensor, reads one byte
of every page of it (so a lazily mapped receive cannot look free) and sends a
tiny ack; the clock stops at the ack. Each receiver is started once per
method, and the first run of each case is cold and kept. The slow-link
section then sends 256 MiB of real bf16 model weights across a link shaped to
1 Gbit/s, with codec "auto" and "none".

    python -m quanta.bench transport [--sizes 1,64,256] [--repeat 6] [--out bench-results]
    python -m quanta.bench transport --sizes 1,64 --repeat 2 --methods quanta-shm,memcpy
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from quanta import hardware
from quanta.bench.slow_link import measure_slow_link
from quanta.bench.transport_peers import (
    START_S,
    TIMEOUT_S,
    Child,
    MiB,
    PipePeer,
    QuantaPeer,
    SocketPeer,
    ZmqPeer,
    make_tensors,
    prefix,
    raw,
    ray_runs,
    receive,
    sample,
    time_runs,
    touch,
)

__all__ = ["main"]

METHODS = ("quanta-shm", "quanta-tcp", "pyzmq-copy", "pickle-pipe", "raw-socket", "memcpy", "ray")
DTYPES = ("float32", "bf16", "int8")
# (numerator, denominator, target): ratios of median GB/s the project aims for.
TARGETS = (
    ("quanta-shm", "pickle-pipe", 10.0),
    ("quanta-shm", "memcpy", 0.5),
    ("quanta-tcp", "raw-socket", 0.9),
)
BF16_NOTE = (
    "bf16 goes to quanta as torch.bfloat16 and to every other method as its raw "
    "2-byte data (an int16 view), since numpy has no bf16"
)


# -- measuring -----------------------------------------------------------------


def _start_peer(method: str, max_bytes: int, workdir: str) -> tuple[Child, Any]:
    """Start the receiver process for `method` and connect this process to it."""
    if method == "pickle-pipe":
        from multiprocessing import Pipe

        ours, theirs = Pipe()
        child = Child(receive, {"kind": method, "fd": theirs.fileno()}, pass_fds=[theirs.fileno()])
        theirs.close()
        child.report(START_S)
        return child, PipePeer(ours)

    if method.startswith("quanta"):
        # ipc:// lets the Channel hand large tensors over in shared memory;
        # tcp:// to loopback is the same code path a second host would get.
        where = f"ipc://{workdir}/rx.sock" if method == "quanta-shm" else "tcp://127.0.0.1:0"
        child = Child(receive, {"kind": "quanta", "endpoint": where})
        return child, QuantaPeer(child.report(START_S)["endpoint"])

    spec = {"kind": method, "host": "127.0.0.1", "max_bytes": max_bytes}
    child = Child(receive, spec)
    port = child.report(START_S)["port"]
    peer = ZmqPeer if method == "pyzmq-copy" else SocketPeer
    return child, peer("127.0.0.1", port)


def _measure(method: str, tensors: dict, sizes: list[int], repeat: int, workdir: str) -> list:
    """Every size and dtype by one method, against one receiver process."""
    child, peer = _start_peer(method, max(sizes) * MiB, workdir)
    samples = []
    try:
        for dtype, tensor in tensors.items():
            for size in sizes:
                payload = prefix(tensor, size * MiB)
                if not method.startswith("quanta"):
                    payload = raw(payload)
                seconds = time_runs(partial(peer.roundtrip, payload), repeat)
                samples.append(sample(method, dtype, size, seconds))
        peer.close()
        child.stop(grace=5)
    finally:
        child.stop()
    return samples


def _copy(target: np.ndarray, source: np.ndarray) -> None:
    np.copyto(target, source)
    touch(target)


def _measure_memcpy(tensors: dict, sizes: list[int], repeat: int) -> list:
    """The host's limit: one copy of the same bytes, and the same page touch."""
    buffer = np.empty(max(sizes) * MiB, np.uint8)
    # Fault the target in now, as the raw-socket receiver does with its buffer.
    buffer[:] = 0
    samples = []
    for dtype, tensor in tensors.items():
        for size in sizes:
            source = raw(prefix(tensor, size * MiB)).view(np.uint8)
            copy = partial(_copy, buffer[: source.nbytes], source)
            samples.append(sample("memcpy", dtype, size, time_runs(copy, repeat)))
    return samples


def _ray_unavailable() -> str | None:
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        return "ray is not installed (pip install 'quanta[ray]')"
    if os.geteuid() != 0:
        return "ray listens on every interface, so it runs only in a private namespace, as root"
    return None


def _measure_ray(dtypes: list[str], sizes: list[int], repeat: int) -> list:
    """Ray in a namespace of its own: its servers listen on every interface."""
    spec = {"dtypes": dtypes, "sizes": sizes, "repeat": repeat}
    child = Child(ray_runs, spec, prefix=["unshare", "--net", "--"])
    try:
        return child.report(START_S + 10 * TIMEOUT_S)["samples"]
    finally:
        child.stop()


# -- the report ------------------------------------------------------------------


def _quanta_unavailable() -> str | None:
    try:
        from quanta.transport import Channel, ChannelConfig  # noqa: F401
    except ImportError as exc:
        return f"quanta.transport.Channel cannot be imported ({exc})"
    return None


def _ratios(samples: list[dict]) -> list[dict]:
    """The targeted ratios of median GB/s, per dtype, at the largest size measured."""
    median = {(s["method"], s["dtype"], s["size_mib"]): s["median_gbps"] for s in samples}
    size = max(s["size_mib"] for s in samples)
    dtypes = dict.fromkeys(s["dtype"] for s in samples)
    ratios = []
    for top, bottom, target in TARGETS:
        for dtype in dtypes:
            if (top, dtype, size) in median and (bottom, dtype, size) in median:
                value = median[top, dtype, size] / median[bottom, dtype, size]
                ratios.append(
                    {
                        "ratio": f"{top} / {bottom}",
                        "dtype": dtype,
                        "size_mib": size,
                        "value": value,
                        "target": target,
                        "met": value >= target,
                    }
                )
    return ratios


def _report(record: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    samples = record["samples"]
    median = {(s["method"], s["dtype"], s["size_mib"]): s["median_gbps"] for s in samples}
    methods, dtypes, sizes = (
        list(dict.fromkeys(s[key] for s in samples)) for key in ("method", "dtype", "size_mib")
    )
    table = Table(title=f"transport: median GB/s of {record['repeat']} runs (the 1st cold)")
    for column in ("size", "method", *dtypes):
        table.add_column(column, justify="left" if column == "method" else "right")
    # One section per size, so the methods compare down a column.
    for size in sizes:
        for method in methods:
            cells = [median.get((method, dtype, size)) for dtype in dtypes]
            table.add_row(f"{size} MiB", method, *("-" if c is None else f"{c:.2f}" for c in cells))
        table.add_section()
    console = Console()
    console.print(table)
    console.print(f"NOTE: {BF16_NOTE}.")
    for reason in record["skipped"].values():
        console.print(f"skipped: {reason}", markup=False)
    for method, reason in record["failed"].items():
        console.print(f"FAILED {method}: {reason}", markup=False)
    for r in record["ratios"]:
        verdict = "met" if r["met"] else "MISSED"
        console.print(
            f"{r['size_mib']} MiB {r['dtype']:>7}  {r['ratio']:<26} {r['value']:6.2f}x  "
            f"(target >= {r['target']}x, {verdict})"
        )
    slow = record.get("slow_link") or {}
    for outcome in ("skipped", "failed"):
        if outcome in slow:
            console.print(f"slow link {outcome}: {slow[outcome]}", markup=False)
    if "link_gbit_per_s" in slow:
        console.print(
            f"slow link ({slow['qdisc']}): raw socket {slow['link_gbit_per_s']:.3f} Gbit/s "
            f"({_seconds(slow['raw_seconds'])} for {slow['tensor']})"
        )
    if "speedup_auto_over_none" in slow:
        console.print(
            f"slow link, quanta-tcp: codec auto {_seconds(slow['auto_seconds'])}, "
            f"none {_seconds(slow['none_seconds'])}; auto is "
            f"{slow['speedup_auto_over_none']:.2f}x faster (target >= {slow['target_speedup']}x)"
        )
        console.print(
            f"slow link, quanta-tcp with codec none carries {slow['none_share_of_raw']:.2f}x "
            "the raw socket's rate"
        )


def _seconds(values: list[float]) -> str:
    return "/".join(f"{v:.2f}" for v in values) + " s"


def _plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = record["samples"]
    methods = list(dict.fromkeys(s["method"] for s in samples))
    dtypes = list(dict.fromkeys(s["dtype"] for s in samples))
    sizes = list(dict.fromkeys(s["size_mib"] for s in samples))
    median = {(s["method"], s["dtype"], s["size_mib"]): s["median_gbps"] for s in samples}
    fig, axes = plt.subplots(1, len(dtypes), figsize=(5 * len(dtypes), 4.2), squeeze=False)
    width = 0.8 / len(methods)
    for axis, dtype in zip(axes[0], dtypes, strict=True):
        for i, method in enumerate(methods):
            xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(sizes))]
            ys = [median.get((method, dtype, size), 0) for size in sizes]
            axis.bar(xs, ys, width, label=method)
        axis.set_xticks(range(len(sizes)), [f"{size} MiB" for size in sizes])
        axis.set_yscale("log")
        axis.set_title(dtype)
        axis.set_ylabel("GB/s, median (higher is better)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("one tensor from one process to another, received and every page read")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m quanta.bench transport", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--sizes", default="1,64,256", help="tensor sizes in MiB, e.g. 1,64")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help=f"from {','.join(DTYPES)}")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"from {','.join(METHODS)}")
    parser.add_argument("--repeat", type=int, default=6, help="runs per case, the 1st cold")
    parser.add_argument(
        "--slow-link",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also send model weights across a link shaped to 1 Gbit/s (needs root)",
    )
    parser.add_argument(
        "--slow-link-codecs",
        default="auto,none",
        help="codecs compared on the slow link; auto and none give the targeted speed-up",
    )
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args(argv)

    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.slow_link_codecs = args.slow_link_codecs.split(",")
    for codec in args.slow_link_codecs:
        if codec not in ("auto", "none", "lz4", "zstd", "blosc2"):
            parser.error(f"unknown codec {codec!r}; choose from auto,none,lz4,zstd,blosc2")
    if not {"auto", "none"} <= set(args.slow_link_codecs):
        parser.error("--slow-link-codecs must include auto and none")
    args.dtypes, args.methods = args.dtypes.split(","), args.methods.split(",")
    for name, chosen, allowed in (
        ("dtype", args.dtypes, DTYPES),
        ("method", args.methods, METHODS),
    ):
        unknown = sorted(set(chosen) - set(allowed))
        if unknown:
            parser.error(f"unknown {name} {unknown[0]!r}; choose from {','.join(allowed)}")
    if args.repeat < 1 or min(args.sizes) < 1:
        parser.error("--repeat and every size must be at least 1")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; print the table and write transport.json and .png to --out."""
    args = _parse(argv)
    # SIGTERM unwinds like Ctrl-C, so children and namespaces are removed on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    skipped = {}
    if reason := _quanta_unavailable():
        skipped["quanta"] = reason
    if "ray" in args.methods and (reason := _ray_unavailable()):
        skipped["ray"] = reason
    methods = [m for m in args.methods if m.split("-")[0] not in skipped]
    for reason in skipped.values():
        print(f"skipped: {reason}", flush=True)

    # Built once, outside every timing; each size is a prefix of the largest.
    tensors = make_tensors(args.dtypes, max(args.sizes) * MiB)
    samples, failed = [], {}
    with tempfile.TemporaryDirectory(prefix="quanta-bench-") as workdir:
        for method in methods:
            print(f"{method}: {len(args.sizes) * len(tensors)} cases x {args.repeat}", flush=True)
            try:
                samples += _measure_any(method, tensors, args, workdir)
            except Exception as exc:  # one broken method must not cost the others' results
                print(f"{method}: failed, {type(exc).__name__}: {exc}", flush=True)
                failed[method] = f"{type(exc).__name__}: {exc}"
    del tensors

    record = {
        "benchmark": "transport",
        "command": "python -m quanta.bench transport " + " ".join(argv or sys.argv[2:]),
        "machine": {
            "cpu": hardware.detect().describe(),
            "python": platform.python_version(),
            "kernel": platform.release(),
        },
        "repeat": args.repeat,
        "protocol": "clock from send to a 1-byte ack sent after the receiver read every page",
        "bf16": BF16_NOTE,
        "quanta_config": _quanta_config(),
        "skipped": skipped,
        "failed": failed,
        "samples": samples,
        "ratios": _ratios(samples) if samples else [],
    }
    if args.slow_link:
        record["slow_link"] = measure_slow_link(
            quanta="quanta" not in skipped, codecs=args.slow_link_codecs
        )
    _report(record)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "transport.json").write_text(json.dumps(record, indent=2))
    print(f"wrote {args.out / 'transport.json'}")
    if samples:
        _plot(record, args.out / "transport.png")
        print(f"wrote {args.out / 'transport.png'}")
    return record


def _measure_any(method: str, tensors: dict, args: argparse.Namespace, workdir: str) -> list:
    if method == "memcpy":
        return _measure_memcpy(tensors, args.sizes, args.repeat)
    if method == "ray":
        return _measure_ray(args.dtypes, args.sizes, args.repeat)
    return _measure(method, tensors, args.sizes, args.repeat, workdir)


def _quanta_config() -> dict | None:
    """The Channel's defaults, which quanta-shm and quanta-tcp run with."""
    try:
        from quanta.transport import ChannelConfig
    except ImportError:
        return None
    config = ChannelConfig()
    fields = ("shm_threshold", "shard_size", "streams", "codec", "max_in_flight", "timeout_s")
    return {name: getattr(config, name) for name in fields}
