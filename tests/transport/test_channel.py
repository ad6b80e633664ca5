"""Channel's API over real ipc:// and tcp:// sockets: round trips, replies, zero copy, config."""

from __future__ import annotations

import gc
import re
import time
import warnings
import weakref

import numpy as np
import pytest
import torch

from quanta.errors import ConfigError, TransportError
from quanta.transport import Channel, ChannelConfig

TIMEOUT_S = 10


@pytest.fixture(params=["ipc", "tcp"])
def link(request, tmp_path):
    """A bound channel and a channel connected to it."""
    address = f"ipc://{tmp_path}/rx.sock" if request.param == "ipc" else "tcp://127.0.0.1:0"
    rx = Channel.bind(address)
    tx = Channel.connect(rx.endpoint)
    yield rx, tx
    tx.close(linger=0)
    rx.close(linger=0)


def _assert_same(got, sent) -> None:
    if isinstance(sent, torch.Tensor) and sent.dtype == torch.bfloat16:
        assert isinstance(got, torch.Tensor)
        assert got.dtype == torch.bfloat16
        assert got.shape == sent.shape
        assert torch.equal(got, sent)
        return
    expected = sent.numpy() if isinstance(sent, torch.Tensor) else sent
    assert isinstance(got, np.ndarray)
    assert got.dtype == expected.dtype
    assert got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


TENSORS = {
    "f32": {"x": np.arange(12, dtype=np.float32).reshape(3, 4) / 7},
    "f16": {"x": np.linspace(-2, 2, 10, dtype=np.float16)},
    "i8": {"x": np.array([[-128, 0], [5, 127]], dtype=np.int8)},
    "i64": {"x": np.array([-(2**62), 0, 2**62], dtype=np.int64)},
    "bool": {"x": np.array([True, False, True])},
    "torch-f32": {"x": torch.linspace(0, 1, 6).reshape(2, 3)},
    "torch-bf16": {"x": torch.linspace(-3, 3, 8, dtype=torch.bfloat16).reshape(2, 2, 2)},
    "empty": {"x": np.zeros((0, 3), dtype=np.float32), "y": torch.empty(0, dtype=torch.bfloat16)},
    "header-only": {},
    "several": {
        "ids": np.arange(5, dtype=np.int64),
        "mask": np.ones((2, 5), dtype=bool),
        # above the size that goes without a copy
        "big": np.random.default_rng(0).standard_normal(100_000).astype(np.float32),
        "w": torch.ones(3, 3, dtype=torch.bfloat16),
    },
}


@pytest.mark.parametrize("tensors", TENSORS.values(), ids=TENSORS.keys())
def test_round_trip_keeps_dtype_shape_and_values(link, tensors):
    rx, tx = link
    header = {"step": 7, "note": "hello", "nested": {"ok": [1, 2.5, None]}}

    tx.send(header, tensors)
    message = rx.recv(timeout=TIMEOUT_S)
    got_header, got = message

    assert got_header == header
    assert list(got) == list(tensors)
    for name, sent in tensors.items():
        _assert_same(got[name], sent)


@pytest.mark.parametrize("tensors", [TENSORS["several"], TENSORS["header-only"]])
def test_bound_side_answers_the_peer_it_heard_from(link, tensors):
    rx, tx = link
    tx.send({"question": 1})
    message = rx.recv(timeout=TIMEOUT_S)
    assert message.peer is not None

    rx.send({"answer": 2}, tensors, peer=message.peer)
    reply = tx.recv(timeout=TIMEOUT_S)

    assert reply.header == {"answer": 2}
    assert reply.peer is None
    for name, sent in tensors.items():
        _assert_same(reply.tensors[name], sent)


def test_two_peers_each_get_their_own_answer(tmp_path):
    with (
        Channel.bind(f"ipc://{tmp_path}/rx.sock") as rx,
        Channel.connect(rx.endpoint, ChannelConfig(identity=b"alice")) as alice,
        Channel.connect(rx.endpoint, ChannelConfig(identity=b"bob")) as bob,
    ):
        alice.send({"from": "alice"})
        bob.send({"from": "bob"})
        for _ in range(2):
            message = rx.recv(timeout=TIMEOUT_S)
            assert message.peer == message.header["from"].encode()
            rx.send({"to": message.header["from"]}, peer=message.peer)

        assert alice.recv(timeout=TIMEOUT_S).header == {"to": "alice"}
        assert bob.recv(timeout=TIMEOUT_S).header == {"to": "bob"}


def test_bound_channel_sending_without_a_peer_is_a_config_error(link):
    rx, _ = link
    with pytest.raises(ConfigError, match="peer=message.peer"):
        rx.send({"to": "nobody"})


def test_recv_with_nothing_sent_times_out(link):
    rx, _ = link
    with pytest.raises(TransportError, match="no message arrived within 0.2 s"):
        rx.recv(timeout=0.2)


def test_big_frame_is_sent_without_a_copy(tmp_path):
    address = f"ipc://{tmp_path}/rx.sock"
    config = ChannelConfig(shm_threshold=None)
    # Connected before anything is bound: ZeroMQ must hold the frame until then.
    tx = Channel.connect(address, config)
    rx = None
    try:
        array = np.random.default_rng(1).standard_normal(1 << 20).astype(np.float32)  # 4 MiB
        expected = array.copy()
        alive = weakref.ref(array)

        sent = tx.send({"n": 1}, {"x": array})
        del array
        gc.collect()
        # Only ZeroMQ refers to the sender's array now: it went out uncopied.
        assert alive() is not None
        assert not sent.done
        # Memory freed by a copy would be handed out again; fill some.
        scratch = [np.full(1 << 20, 7.0, dtype=np.float32) for _ in range(4)]

        rx = Channel.bind(address, config)
        header, tensors = rx.recv(timeout=TIMEOUT_S)

        assert sent.wait(5)
        assert sent.done
        assert header == {"n": 1}
        np.testing.assert_array_equal(tensors["x"], expected)
        del scratch
        # pyzmq drops its reference on a thread of its own, a moment after `done`.
        deadline = time.monotonic() + 5
        while alive() is not None and time.monotonic() < deadline:
            gc.collect()
            time.sleep(0.01)
        assert alive() is None, "ZeroMQ let go of the frame, so the array should be freed"
    finally:
        tx.close(linger=0)
        if rx is not None:
            rx.close(linger=0)


def test_small_frames_are_copied_and_done_at_once(link):
    rx, tx = link
    sent = tx.send({}, {"x": np.arange(10, dtype=np.int64)})
    assert sent.done
    assert sent.wait(0)
    rx.recv(timeout=TIMEOUT_S)


@pytest.mark.parametrize("size", [16, 100_000], ids=["copied", "zero-copy"])
def test_received_frame_backed_array_is_read_only(link, size):
    rx, tx = link
    tx.send({}, {"x": np.arange(size, dtype=np.float32)})
    _, tensors = rx.recv(timeout=TIMEOUT_S)

    assert not tensors["x"].flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        tensors["x"][0] = 1.0
    # a copy is the caller's to change
    mine = tensors["x"].copy()
    mine[0] = 1.0
    assert mine[0] == 1.0


def test_values_that_cannot_be_sent_raise_transport_error(link):
    _, tx = link
    with pytest.raises(TransportError, match="put other values in the header"):
        tx.send({}, {"x": [1, 2, 3]})
    with pytest.raises(TransportError, match="msgpack"):
        tx.send({"x": object()})


BAD_CONFIG = [
    ({"codec": "bogus"}, "'bogus'"),
    ({"streams": 0}, "streams=0"),
    ({"shard_size": 0}, "shard_size=0"),
    ({"max_in_flight": -1}, "max_in_flight=-1"),
    ({"shm_threshold": 0}, "shm_threshold=0"),
    ({"timeout_s": 0}, "timeout_s=0"),
    ({"identity": b"a#b"}, "identity=b'a#b'"),
    ({"identity": b""}, "identity=b''"),
]


@pytest.mark.parametrize(
    ("options", "shown"), [pytest.param(*case, id=case[1]) for case in BAD_CONFIG]
)
def test_bad_config_values_are_named_in_a_config_error(options, shown):
    with pytest.raises(ConfigError, match=re.escape(shown)):
        ChannelConfig(**options)


def test_unknown_endpoint_scheme_is_a_config_error():
    with pytest.raises(ConfigError, match="udp://127.0.0.1:5"):
        Channel.bind("udp://127.0.0.1:5")


def test_inproc_is_refused_with_the_endpoint_to_use_instead():
    with pytest.raises(ConfigError, match="inproc://x.*use ipc://PATH"):
        Channel.bind("inproc://x")


def test_channel_that_fails_to_bind_leaves_no_socket_open():
    with Channel.bind("tcp://127.0.0.1:0") as taken, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(TransportError, match=f"cannot bind '{taken.endpoint}'.*in use"):
            Channel.bind(taken.endpoint)
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]
