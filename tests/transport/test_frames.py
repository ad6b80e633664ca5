"""Messages of tensors through real ZeroMQ sockets, and malformed frames."""

from __future__ import annotations

import contextlib

import msgpack
import numpy as np
import pytest
import torch
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from quanta import transport
from quanta.errors import TransportError


@pytest.fixture()
def pair():
    context = zmq.Context()
    a, b = context.socket(zmq.PAIR), context.socket(zmq.PAIR)
    a.bind("inproc://frames-test")
    b.connect("inproc://frames-test")
    yield a, b
    a.close(linger=0)
    b.close(linger=0)
    context.term()


@pytest.mark.parametrize(
    "array",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.array([1, -2, 3], dtype=np.int8),
        np.array([True, False]),
        np.zeros((2, 0, 3), dtype=np.float16),
        np.arange(6, dtype=">i4"),  # big-endian arrives as little-endian, same values
        np.arange(20, dtype=np.float64)[::2],  # not contiguous
    ],
    ids=["f32", "i8", "bool", "empty", "big-endian", "strided"],
)
def test_numpy_arrays_round_trip_with_dtype_and_shape(pair, array):
    sender, receiver = pair
    transport.send(sender, {"id": 7, "note": "x"}, {"a": array})
    _, header, tensors = transport.recv(receiver)

    assert header == {"id": 7, "note": "x"}
    np.testing.assert_array_equal(tensors["a"], array)
    assert tensors["a"].shape == array.shape
    assert tensors["a"].dtype == array.dtype.newbyteorder("=")


def test_torch_tensors_round_trip_including_bf16(pair):
    sender, receiver = pair
    bf16 = torch.randn(4, 5).to(torch.bfloat16)
    transport.send(sender, {}, {"b": bf16, "f": torch.arange(3.0)})
    _, _, tensors = transport.recv(receiver)

    assert tensors["b"].dtype == torch.bfloat16
    assert torch.equal(tensors["b"], bf16)
    np.testing.assert_array_equal(tensors["f"], [0.0, 1.0, 2.0])


def test_large_frames_arrive_without_a_copy(pair):
    sender, receiver = pair
    big = np.ones(transport.ZERO_COPY_THRESHOLD, dtype=np.float32)
    transport.send(sender, {}, {"big": big})
    frames = receiver.recv_multipart(copy=False)
    _, tensors = transport.unpack(frames)

    # the array views the ZeroMQ frame's own memory
    assert not tensors["big"].flags.owndata
    assert np.shares_memory(tensors["big"], np.frombuffer(frames[1].buffer, dtype=np.float32))


def test_values_that_cannot_travel_are_refused():
    with pytest.raises(TransportError, match="put other values in the header"):
        transport.pack({}, {"x": [1, 2, 3]})
    with pytest.raises(TransportError, match="msgpack"):
        transport.pack({"x": object()})
    with pytest.raises(TransportError, match="cannot be sent"):
        transport.pack({}, {"x": np.array(["text"])})


def _frames(descriptors, *payloads):
    return [msgpack.packb({"h": {}, "t": descriptors}), *payloads]


@pytest.mark.parametrize(
    ("frames", "message"),
    [
        ([], "empty message"),
        ([b"\xc1not msgpack"], "not valid msgpack"),
        ([msgpack.packb([1, 2])], "not a map"),
        (_frames([["x", "<f4", [2]]]), "tensors but 0 frames"),
        (_frames([["x", "<f4", [4]]], b"\x00" * 8), "frame holds 8 bytes"),
        (_frames([["x", "complex", [1]]], b"\x00" * 8), "unknown dtype"),
        (_frames([["x", "<f4", [2**40, 2**40]]], b""), "claims shape"),
        (_frames([["x", "<f4", [-1]]], b""), "invalid shape"),
        (_frames([["x", "<f4"]], b""), "malformed tensor descriptor"),
    ],
    ids=["none", "garbage", "no-dict", "missing-frame", "short", "dtype", "huge", "neg", "desc"],
)
def test_malformed_frames_raise_transport_error(frames, message):
    with pytest.raises(TransportError, match=message):
        transport.unpack(frames)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=64), min_size=1, max_size=4))
def test_arbitrary_bytes_never_crash_the_receiver(frames):
    with contextlib.suppress(TransportError):
        transport.unpack(frames)
