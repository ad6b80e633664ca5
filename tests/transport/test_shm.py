"""Shared memory between processes on one host: used, reused, and never left behind."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from quanta.errors import TransportError
from quanta.transport import Channel, ChannelConfig, shm

MiB = 1 << 20


def segments_of(pid: int) -> list[str]:
    return [name for name in shm.our_segments() if name.startswith(f"quanta-{pid}-")]


@pytest.fixture()
def pair(tmp_path):
    rx = Channel.bind(f"ipc://{tmp_path}/rx.sock")
    tx = Channel.connect(rx.endpoint)
    yield tx, rx
    tx.close(linger=0)
    rx.close(linger=0)


def test_large_tensors_travel_through_a_writable_segment(pair):
    tx, rx = pair
    big = np.random.default_rng(0).random(MiB // 2)  # 4 MiB of float64
    small = np.arange(10, dtype=np.int32)
    tx.send({"n": 1}, {"big": big, "small": small})
    header, tensors = rx.recv(timeout=10)

    np.testing.assert_array_equal(tensors["big"], big)
    np.testing.assert_array_equal(tensors["small"], small)
    assert tx.engine.stats["tensors_m"] == 1 and tx.engine.stats["tensors_f"] == 1
    assert len(segments_of(os.getpid())) == 1
    # The receiver owns the segment until it lets go, so it may work in place.
    tensors["big"] *= 2
    np.testing.assert_array_equal(tensors["big"], big * 2)


def test_a_segment_comes_back_and_is_reused_once_the_receiver_drops_it(pair):
    tx, rx = pair
    data = np.ones(2 * MiB, dtype=np.uint8)
    for round_trip in range(5):
        data[0] = round_trip
        tx.send({"n": round_trip}, {"x": data})
        message = rx.recv(timeout=10)
        assert message.tensors["x"][0] == round_trip
        del message
        gc.collect()
        rx.send({"ok": True}, peer=rx_peer(rx))
        tx.recv(timeout=10)
    assert len(segments_of(os.getpid())) == 1


def rx_peer(rx: Channel) -> bytes:
    (peer,) = rx._lanes
    return peer


def test_a_receiver_that_keeps_everything_cannot_fill_dev_shm(tmp_path):
    rx = Channel.bind(f"ipc://{tmp_path}/rx.sock")
    tx = Channel.connect(rx.endpoint, ChannelConfig(max_shm_bytes=4 * MiB))
    kept = []
    for n in range(5):
        tx.send({"n": n}, {"x": np.full(2 * MiB, n, dtype=np.uint8)})
        kept.append(rx.recv(timeout=10))
    # Past the cap, tensors go as frames: nothing is lost, /dev/shm stays bounded.
    assert [int(m.tensors["x"][-1]) for m in kept] == list(range(5))
    assert tx.engine.stats["tensors_m"] == 2 and tx.engine.stats["tensors_f"] == 3
    kept.clear()
    tx.close(linger=0)
    rx.close(linger=0)
    assert segments_of(os.getpid()) == []


RECEIVER = textwrap.dedent(
    """
    import sys, time
    from quanta.transport import Channel
    channel = Channel.connect(sys.argv[1])
    channel.send({"hello": True})
    held = channel.recv(timeout=30)
    print("holding", flush=True)
    time.sleep(60)
    """
)


def test_segments_are_removed_when_a_receiver_is_killed(tmp_path):
    tx = Channel.bind(f"ipc://{tmp_path}/tx.sock")
    child = subprocess.Popen(
        [sys.executable, "-c", RECEIVER, tx.endpoint], stdout=subprocess.PIPE, text=True
    )
    try:
        peer = tx.recv(timeout=60).peer
        for n in range(3):  # one it holds, two it never takes
            tx.send({"n": n}, {"x": np.full(2 * MiB, n, dtype=np.uint8)}, peer=peer)
        assert child.stdout.readline().strip() == "holding"
        assert len(segments_of(os.getpid())) == 3
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)

        # The next send finds the peer gone and takes back what it was lent.
        deadline = time.monotonic() + 10
        with pytest.raises(TransportError, match="is gone"):
            while time.monotonic() < deadline:
                tx.send({"ping": True}, peer=peer)
                time.sleep(0.05)
        assert segments_of(os.getpid()) == []
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
        tx.close(linger=0)
    assert segments_of(os.getpid()) == []


SENDER = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from quanta.transport import Channel
    channel = Channel.connect(sys.argv[1])
    for n in range(3):
        channel.send({"n": n}, {"x": np.full(2 << 20, n, dtype=np.uint8)})
    print("sent", flush=True)
    time.sleep(60)
    """
)


def test_segments_of_a_killed_sender_are_reclaimed(tmp_path):
    rx = Channel.bind(f"ipc://{tmp_path}/rx.sock")
    child = subprocess.Popen(
        [sys.executable, "-c", SENDER, rx.endpoint], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "sent"
        assert len(segments_of(child.pid)) == 3
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        assert len(segments_of(child.pid)) == 3  # nobody removed them yet

        # Any channel started on the host removes a dead process's segments.
        Channel.connect(rx.endpoint).close(linger=0)
        assert segments_of(child.pid) == []
        # A message whose segment is gone fails clearly instead of hanging.
        with pytest.raises(TransportError, match="cannot be opened"):
            rx.recv(timeout=10)
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
        rx.close(linger=0)
