"""Flow control and gone peers over real sockets: a sender waits, then fails, never floods."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest

from quanta.errors import TransportError
from quanta.transport import Channel, ChannelConfig
from tests.helpers import ROOT

MESSAGE = 1 << 20
LIMIT = 4 << 20
TIMEOUT_S = 10


@pytest.fixture()
def slow_pair():
    """A bound channel that will not read for a while, and a sender limited to 4 MiB in flight."""
    config = ChannelConfig(max_in_flight=LIMIT, timeout_s=1.0)
    rx = Channel.bind("tcp://127.0.0.1:0", config)
    tx = Channel.connect(rx.endpoint, ChannelConfig(max_in_flight=LIMIT, timeout_s=1.0))
    yield rx, tx
    tx.close(linger=0)
    rx.close(linger=0)


def _fill(tx: Channel, peer: bytes | None = None) -> tuple[int, TransportError, float]:
    """Send 1 MiB messages until `send` gives up; (messages sent, the error, seconds blocked)."""
    payload = np.ones(MESSAGE // 4, dtype=np.float32)
    highest = 0
    for n in range(64):
        started = time.monotonic()
        try:
            tx.send({"n": n}, {"x": payload}, peer=peer)
        except TransportError as exc:
            return n, exc, time.monotonic() - started
        highest = max(highest, tx.engine.in_flight(peer))
        assert highest <= LIMIT + MESSAGE, f"{highest} bytes in flight after message {n}"
    pytest.fail("64 MiB went to a receiver that takes nothing, and send never waited")


def test_sender_waits_then_fails_for_a_receiver_that_does_not_read(slow_pair):
    rx, tx = slow_pair

    sent, error, blocked = _fill(tx)

    assert sent == LIMIT // MESSAGE
    assert f"peer {rx.endpoint!r} has not taken {LIMIT} bytes" in str(error)
    assert 0.9 < blocked < 5.0
    assert tx.engine.in_flight(None) <= LIMIT


def test_everything_sent_arrives_once_the_receiver_reads(slow_pair):
    rx, tx = slow_pair
    sent, _, _ = _fill(tx)

    got = []
    while len(got) < sent:
        header, tensors = rx.recv(timeout=TIMEOUT_S)
        assert tensors["x"].nbytes == MESSAGE
        got.append(header["n"])
    assert got == list(range(sent))
    # the message refused by send never went out
    with pytest.raises(TransportError, match="no message arrived"):
        rx.recv(timeout=0.3)

    # The receiver's reports free the sender: it can send its limit again.
    for n in range(sent):
        tx.send({"again": n}, {"x": np.zeros(MESSAGE // 4, dtype=np.float32)})
        assert rx.recv(timeout=TIMEOUT_S).header == {"again": n}
    assert tx.engine.in_flight(None) <= LIMIT


def test_bound_sender_names_the_peer_that_does_not_read():
    config = ChannelConfig(max_in_flight=LIMIT, timeout_s=1.0)
    with (
        Channel.bind("tcp://127.0.0.1:0", config) as rx,
        Channel.connect(rx.endpoint, ChannelConfig(identity=b"slow-reader")) as tx,
    ):
        tx.send({"hello": True})
        peer = rx.recv(timeout=TIMEOUT_S).peer

        sent, error, _ = _fill(rx, peer)

        assert sent == LIMIT // MESSAGE
        assert "slow-reader" in str(error) and "has not taken" in str(error)


def test_send_to_a_peer_that_never_connected_says_it_is_gone(tmp_path):
    with Channel.bind(f"ipc://{tmp_path}/rx.sock") as rx:
        with pytest.raises(TransportError, match=r"peer b'nobody' is gone"):
            rx.send({"hello": True}, peer=b"nobody")
        with pytest.raises(TransportError, match=r"is gone"):
            rx.send({}, {"x": np.ones(1 << 20, dtype=np.float32)}, peer=b"nobody")


CHILD = """
import sys, time
from quanta.transport import Channel, ChannelConfig
tx = Channel.connect(sys.argv[1], ChannelConfig(identity=b"child"))
tx.send({"pid": 1})
time.sleep(120)
"""


@pytest.mark.parametrize("scheme", ["ipc", "tcp"])
def test_send_to_a_peer_whose_process_was_killed_says_it_is_gone(tmp_path, scheme):
    address = f"ipc://{tmp_path}/rx.sock" if scheme == "ipc" else "tcp://127.0.0.1:0"
    with Channel.bind(address) as rx:
        child = subprocess.Popen([sys.executable, "-c", CHILD, rx.endpoint], cwd=ROOT)
        try:
            message = rx.recv(timeout=60)
            assert message.peer == b"child"
            rx.send({"still": "there"}, peer=message.peer)
        finally:
            child.kill()
            child.wait(TIMEOUT_S)

        # ZeroMQ notices the closed connection a moment after the kill.
        deadline = time.monotonic() + TIMEOUT_S
        with pytest.raises(TransportError, match=r"peer b'child' is gone"):
            while time.monotonic() < deadline:
                rx.send({"ping": True}, peer=message.peer)
                time.sleep(0.05)
