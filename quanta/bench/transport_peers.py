"""The two ends of each transport benchmark method, and the processes they run in.

A receiver runs in a child process started by `Child` on a JSON spec; it
announces what the sender needs (a port, an endpoint) in a marked stdout line,
then takes tensors, reads every page of each and acks with one byte until told
to stop. The matching sender (`QuantaPeer`, `ZmqPeer`, `PipePeer`,
`SocketPeer`) lives in the measuring process, and its `roundtrip` is what the
benchmark times.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import numpy as np

MiB = 1 << 20
# Every wait is bounded, so a dead peer fails the benchmark instead of hanging it.
START_S = 60
TIMEOUT_S = 120
ANNOUNCE = "QB "


# -- tensors -------------------------------------------------------------------


def make_tensors(dtypes: list[str], nbytes: int) -> dict[str, Any]:
    """One 1-D tensor of `nbytes` per dtype; each size sent is a prefix of it."""
    import torch

    torch.manual_seed(0)
    make = {
        "float32": lambda n: torch.randn(n // 4),
        "bf16": lambda n: torch.randn(n // 2).to(torch.bfloat16),
        "int8": lambda n: torch.randint(-128, 128, (n,), dtype=torch.int8),
    }
    return {dtype: make[dtype](nbytes) for dtype in dtypes}


def prefix(tensor: Any, nbytes: int) -> Any:
    return tensor[: nbytes // tensor.element_size()]


def raw(tensor: Any) -> np.ndarray:
    """The tensor as a numpy array sharing its memory; bf16 as int16."""
    import torch

    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy()
    return tensor.numpy()


def touch(tensor: Any) -> int:
    """Read one byte of every page, so each page is really mapped in."""
    array = tensor if isinstance(tensor, np.ndarray) else raw(tensor)
    return int(array.reshape(-1).view(np.uint8)[::4096].sum())


def time_runs(roundtrip: Callable[[], None], repeat: int) -> list[float]:
    seconds = []
    for _ in range(repeat):
        start = time.perf_counter()
        roundtrip()
        seconds.append(time.perf_counter() - start)
    return seconds


def sample(method: str, dtype: str, size_mib: int, seconds: list[float]) -> dict:
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


def announce(info: dict) -> None:
    print(ANNOUNCE + json.dumps(info), flush=True)


def receive(spec_json: str) -> None:
    """A receiver process: take tensors, touch them, ack, until told to stop."""
    # Turn SIGTERM into an exit, so sockets and shared memory are closed on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    spec = json.loads(spec_json)
    quiet_curve_warning()
    receivers = {
        "quanta": _receive_quanta,
        "pyzmq-copy": _receive_zmq,
        "pickle-pipe": _receive_pipe,
        "raw-socket": _receive_socket,
    }
    receivers[spec["kind"]](spec)


def quiet_curve_warning() -> None:
    # The Channel warns about tcp:// without CURVE keys off loopback; the slow
    # link's namespaces hold nothing but the two peers, so nobody else can connect.
    logging.getLogger("quanta.transport.channel").setLevel(logging.ERROR)


def _receive_quanta(spec: dict) -> None:
    # torch now, not on the first bf16 arrival: that run would time an import.
    import torch  # noqa: F401

    from quanta.transport import Channel

    rx = Channel.bind(spec["endpoint"])
    announce({"endpoint": rx.endpoint})
    try:
        while True:
            message = rx.recv(timeout=TIMEOUT_S)
            header, tensors = message
            if header.get("stop"):
                return
            touch(tensors["x"])
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
    sock.rcvtimeo, sock.linger = TIMEOUT_S * 1000, 0
    announce({"port": sock.bind_to_random_port(f"tcp://{spec['host']}")})
    try:
        while len(frames := sock.recv_multipart()) == 2:
            touch(np.frombuffer(frames[1], dtype=frames[0].decode()))
            del frames
            sock.send(b"k")
    finally:
        sock.close()
        context.term()


def _receive_pipe(spec: dict) -> None:
    from multiprocessing.connection import Connection

    conn = Connection(spec["fd"])
    announce({})
    while conn.poll(TIMEOUT_S):
        array = conn.recv()
        if array is None:
            return
        touch(array)
        del array
        conn.send_bytes(b"k")
    raise TimeoutError(f"pickle-pipe receiver: nothing arrived in {TIMEOUT_S} s")


def _receive_socket(spec: dict) -> None:
    buffer = np.empty(spec["max_bytes"], np.uint8)
    # Fault the buffer in now, so no run pays for first-touch page faults.
    buffer[:] = 0
    view, size = memoryview(buffer), bytearray(8)
    with socket.create_server((spec["host"], 0)) as server:
        server.settimeout(TIMEOUT_S)
        announce({"port": server.getsockname()[1]})
        conn, _ = server.accept()
    with conn:
        conn.settimeout(TIMEOUT_S)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while _recv_exactly(conn, memoryview(size)):
            (nbytes,) = struct.unpack("<Q", size)
            if not nbytes or not _recv_exactly(conn, view[:nbytes]):
                return
            touch(buffer[:nbytes])
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


class QuantaPeer:
    def __init__(self, endpoint: str, config: Any = None) -> None:
        from quanta.transport import Channel

        self._tx, self._i = Channel.connect(endpoint, config=config), 0

    def roundtrip(self, tensor: Any) -> None:
        self._i += 1
        self._tx.send({"i": self._i}, {"x": tensor})
        self._tx.recv(timeout=TIMEOUT_S)

    def close(self, *, stop: bool = True) -> None:
        if stop:
            self._tx.send({"stop": True}, {})
        self._tx.close()


class ZmqPeer:
    def __init__(self, host: str, port: int) -> None:
        import zmq

        self._context = zmq.Context()
        self._sock = self._context.socket(zmq.PAIR)
        self._sock.rcvtimeo = self._sock.sndtimeo = TIMEOUT_S * 1000
        self._sock.linger = 1000
        self._sock.connect(f"tcp://{host}:{port}")

    def roundtrip(self, array: np.ndarray) -> None:
        self._sock.send_multipart([array.dtype.str.encode(), array], copy=True)
        self._sock.recv()

    def close(self) -> None:
        self._sock.send(b"stop")
        self._sock.close()
        self._context.term()


class PipePeer:
    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def roundtrip(self, array: np.ndarray) -> None:
        self._conn.send(array)
        if not self._conn.poll(TIMEOUT_S):
            raise TimeoutError(f"pickle-pipe: no ack in {TIMEOUT_S} s")
        self._conn.recv_bytes()

    def close(self) -> None:
        self._conn.send(None)
        self._conn.close()


class SocketPeer:
    def __init__(self, host: str, port: int) -> None:
        self._sock = socket.create_connection((host, port), timeout=TIMEOUT_S)
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


class Child:
    """A peer process, started on a JSON spec; it reports back in announced stdout lines."""

    def __init__(
        self,
        entry: Callable[[str], None],
        spec: dict,
        *,
        prefix: Sequence[str] = (),
        pass_fds: Sequence[int] = (),
    ) -> None:
        self.name = spec.get("kind", entry.__name__)
        module, name = entry.__module__, entry.__name__
        code = f"import sys; from {module} import {name}; {name}(sys.argv[1])"
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
            if line.startswith(ANNOUNCE.encode()):
                self._lines.put(json.loads(line[len(ANNOUNCE) :]))
        self._lines.put(None)

    def report(self, timeout: float) -> dict:
        """The child's next announcement; raises if it exits or stays silent."""
        try:
            info = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"{self.name}: no answer from its process in {timeout} s") from None
        if info is None:
            code = self.process.wait(START_S)
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


def ray_runs(spec_json: str) -> None:
    """Runs inside `unshare --net`: bring loopback up, then time put/get pairs."""
    spec = json.loads(spec_json)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True, timeout=30)
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)

    @ray.remote
    class Receiver:
        def take(self, refs: list) -> int:
            # The ref inside a list arrives unresolved: the get is this process's.
            return touch(ray.get(refs[0]))

    receiver = Receiver.remote()
    ray.get(receiver.take.remote([ray.put(np.zeros(1))]), timeout=START_S)
    tensors = make_tensors(spec["dtypes"], max(spec["sizes"]) * MiB)
    samples = []
    for dtype, tensor in tensors.items():
        for size in spec["sizes"]:
            array = raw(prefix(tensor, size * MiB))
            roundtrip = partial(_ray_roundtrip, ray, receiver, array)
            samples.append(sample("ray", dtype, size, time_runs(roundtrip, spec["repeat"])))
    ray.shutdown()
    announce({"samples": samples})


def _ray_roundtrip(ray: Any, receiver: Any, array: np.ndarray) -> None:
    ray.get(receiver.take.remote([ray.put(array)]), timeout=TIMEOUT_S)
