"""Hostile frames at a receiving Engine and a bound Channel: errors, never crashes."""

from __future__ import annotations

import gc
import resource
import time
import tracemalloc
import weakref

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from quanta.errors import TransportError
from quanta.transport import Channel, ChannelConfig, frames, shards, shm
from quanta.transport.protocol import Engine, Message

PEER = b"peer"
# Small enough that no example can make the receiver allocate much.
CONFIG = ChannelConfig(max_tensor_bytes=1 << 22, max_in_flight=1 << 22, timeout_s=1.0)
EXAMPLES = settings(max_examples=200, deadline=None)

# Any value msgpack can carry: what a hostile peer can put anywhere in a header.
junk = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=12)
    | st.binary(max_size=12),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=4), children, max_size=4)
    ),
    max_leaves=8,
)
sizes = st.integers(-4, 64) | st.integers(-(2**63), 2**64 - 1) | junk
dtypes = st.sampled_from(["<f4", "<f2", "|i1", "|b1", "<i8", "bf16", "<f9", "float32", ""]) | junk
shapes = st.lists(sizes, max_size=4) | st.lists(st.integers(0, 1 << 61), max_size=3) | junk
codec_names = st.sampled_from(["none", "lz4", "zstd", "blosc2", "auto", "gzip"]) | junk
segment_names = (
    st.sampled_from(
        [
            "../../etc/passwd",
            "/dev/shm/../../etc/passwd",
            "quanta-1-zz-1",
            "quanta-1-deadbeef-1",
            "quanta-99999999-0123abcd-7",
            "",
        ]
    )
    | junk
)
places = (
    st.tuples(st.just("f")).map(list)
    | st.tuples(st.just("f"), codec_names).map(list)
    | st.tuples(st.just("m"), sizes).map(list)
    | st.tuples(st.just("s"), sizes, sizes).map(list)
    | st.lists(junk, max_size=4)
    | junk
)
descriptors = (
    st.tuples(st.text(max_size=6) | junk, dtypes, shapes, places).map(list)
    # well-formed but for the place, so that the place is what gets checked
    | st.tuples(
        st.text(max_size=6),
        st.sampled_from(["<f4", "|u1", "bf16"]),
        st.lists(st.integers(0, 8), max_size=2),
        places,
    ).map(list)
    | st.tuples(st.text(max_size=6), dtypes, shapes).map(list)
    | junk
)
message_heads = st.fixed_dictionaries(
    {"k": st.just("m")},
    optional={
        "id": st.integers(0, 3) | junk,
        "h": st.dictionaries(st.text(max_size=4), junk, max_size=3) | junk,
        "t": st.lists(descriptors, max_size=4) | junk,
        "ack": junk,
        "seg": segment_names,
    },
)
shard_heads = st.fixed_dictionaries(
    {"k": st.just("s")},
    optional={
        "id": st.integers(0, 3) | junk,
        "i": st.integers(-1, 3) | junk,
        "j": st.integers(-1, 5) | junk,
        "c": codec_names,
        "x": st.integers(0, 2**64 - 1) | junk,
    },
)
control_heads = st.fixed_dictionaries(
    {"k": st.sampled_from(["a", "r", "u", "q", "e", "l", "z", ""]) | junk},
    optional={
        "id": st.integers(0, 3) | junk,
        "w": st.integers(-(2**63), 2**64 - 1) | junk,
        "d": junk,
        "seg": st.lists(segment_names, max_size=3) | junk,
        "i": st.integers(-1, 3) | junk,
        "j": st.lists(st.integers(-2, 8) | junk, max_size=4) | junk,
        "error": junk,
    },
)
payloads = st.lists(st.binary(max_size=96), max_size=3)


def _receive(engine: Engine, parts: list) -> Message | None:
    """What the property allows: a Message, None, or a TransportError."""
    try:
        result = engine.receive(PEER, parts)
    except TransportError:
        return None
    assert result is None or isinstance(result, Message)
    return result


def _expire_all(engine: Engine) -> None:
    """Let every stalled transfer time out, as a long wait would."""
    later = time.monotonic() + 3600
    for _ in range(64):
        try:
            engine.expire(later)
            return
        except TransportError:
            continue


# Past the size that asks for progress reports; 5 shards of 16 KiB.
SHARDED = np.arange(20_000, dtype=np.float32)


def _sharded_sender() -> tuple[Engine, list[list[bytes]]]:
    """A sender with one sharded message in flight to PEER, and that message's frames."""
    config = ChannelConfig(shard_size=16 << 10, codec="none", max_tensor_bytes=1 << 22)
    sender = Engine(config, use_shm=False, sharded=True)
    items = list(sender.encode(PEER, {"n": 1}, {"w": SHARDED[:16], "v": SHARDED}))
    return sender, [[bytes(p) for p in item.frames] for item in items]


def _sharded_message() -> list[list[bytes]]:
    sender, messages = _sharded_sender()
    sender.close()
    return messages


@EXAMPLES
@given(parts=st.lists(st.binary(max_size=64), max_size=4))
def test_random_bytes_raise_transport_error_or_nothing(parts):
    engine = Engine(CONFIG, use_shm=True, sharded=False)
    try:
        _receive(engine, parts)
        _expire_all(engine)
    finally:
        engine.close()


@EXAMPLES
@given(data=st.data())
def test_truncated_or_resized_frames_raise_transport_error(data):
    messages = _sharded_message()
    parts = list(data.draw(st.sampled_from(messages)))
    which = data.draw(st.integers(0, len(parts) - 1))
    cut = data.draw(st.integers(0, max(len(parts[which]) - 1, 0)))
    extra = data.draw(st.binary(max_size=8))
    parts[which] = parts[which][:cut] + extra
    if data.draw(st.booleans()):
        parts = parts[: data.draw(st.integers(0, len(parts)))] + data.draw(payloads)

    engine = Engine(CONFIG, use_shm=False, sharded=True)
    try:
        _receive(engine, messages[0])
        _receive(engine, parts)
        _expire_all(engine)
    finally:
        engine.close()


@pytest.mark.parametrize("sharded", [False, True], ids=["ipc", "tcp"])
@EXAMPLES
@given(head=message_heads, parts=payloads)
def test_malformed_messages_raise_transport_error(sharded, head, parts):
    engine = Engine(CONFIG, use_shm=not sharded, sharded=sharded)
    try:
        _receive(engine, [msgpack.packb(head), *parts])
        _expire_all(engine)
    finally:
        engine.close()


@EXAMPLES
@given(heads=st.lists(st.tuples(shard_heads, payloads), min_size=1, max_size=6))
def test_junk_shards_raise_transport_error_and_spoil_nothing(heads):
    messages = _sharded_message()
    engine = Engine(CONFIG, use_shm=False, sharded=True)
    try:
        # A real message whose shards are outstanding, so some junk hits its assemblies.
        assert _receive(engine, messages[0]) is None
        for head, parts in heads:
            _receive(engine, [msgpack.packb(head), *parts])

        # The real shards still make the message whole, bit for bit.
        results = [_receive(engine, parts) for parts in messages[1:]]
        assert results[:-1] == [None] * (len(results) - 1)
        assert results[-1] is not None
        np.testing.assert_array_equal(results[-1].tensors["v"], SHARDED)
        _expire_all(engine)
    finally:
        engine.close()


@EXAMPLES
@given(heads=st.lists(control_heads, min_size=1, max_size=6), parts=payloads)
def test_control_messages_with_junk_raise_transport_error(heads, parts):
    # The sender still holds its message, so asks and reports can reach it.
    sender, _ = _sharded_sender()
    try:
        for head in heads:
            _receive(sender, [msgpack.packb(head), *parts[:1]])
            _receive(sender, [msgpack.packb(head)])
        for item in sender.outbox:
            assert item.peer == PEER
            frames.decode_header(item.frames[0])
    finally:
        sender.close()


@pytest.mark.parametrize(
    ("tensors", "parts", "message"),
    [
        ([["a", "<f4", [1], ["m", 0]], 5], [], "malformed tensor descriptor|segment"),
        ([["a", "<f4", [1], ["m", 0]], {"0": 1, "3": 4}], [], "malformed|segment"),
        ([["a", "<f4", [1], ["s", 1, "a"]]], [], "cannot have 1 shards"),
        ([["a", "<f4", [2], ["s", 2.0, 4.0]]], [], "cannot have 2.0 shards"),
        ([["a", "<f4", [0], ["s", 0, 1]]], [], "cannot have 0 shards"),
        ([["a", "<f4", [True], ["f"]]], [b"\x00" * 4], "invalid shape"),
        ([["a", ["<f4"], [1], ["f"]]], [b"\x00" * 4], "unknown dtype"),
        ([["a", "<f4", [1], ["f", []]]], [b"\x00" * 4], "unknown codec"),
        ([["a", "<f4", [1], ["f"]]], [b"\x00" * 4, b""], "more frames"),
        ([["a", "<f4", [1], ["m", -8]]], [], "segment|outside"),
        ([["a", "<f4", [1], ["x"]]], [], "unknown place"),
    ],
    ids=[
        "junk-after-shm",
        "map-after-shm",
        "shard-size-str",
        "shard-count-float",
        "zero-shards",
        "bool-shape",
        "list-dtype",
        "list-codec",
        "extra-frame",
        "negative-offset",
        "unknown-place",
    ],
)
def test_malformed_places_raise_transport_error(tensors, parts, message):
    engine = Engine(CONFIG, use_shm=True, sharded=False)
    head = {"k": "m", "id": 1, "h": {}, "t": tensors, "seg": "quanta-1-deadbeef-1"}
    try:
        with pytest.raises(TransportError, match=message):
            engine.receive(PEER, [frames.encode_header(head), *parts])
        _expire_all(engine)
    finally:
        engine.close()


@pytest.mark.parametrize(
    "head",
    [
        {"k": []},
        {"k": "s", "id": []},
        {"k": "a", "id": {"x": 1}, "w": 5},
        {"k": "q", "id": [1], "i": 0, "j": [0]},
        {"k": "e", "id": [1]},
    ],
    ids=["list-kind", "list-shard-id", "map-report-id", "list-ask-id", "list-error-id"],
)
def test_unhashable_kinds_and_ids_raise_transport_error(head):
    sender, _ = _sharded_sender()
    try:
        with pytest.raises(TransportError, match="malformed"):
            sender.receive(PEER, [frames.encode_header(head), b""][: 2 if head["k"] == "s" else 1])
    finally:
        sender.close()


def test_stray_shards_are_let_go_after_the_timeout():
    engine = Engine(CONFIG, use_shm=False, sharded=True)
    held = []
    try:
        for message_id in range(8):
            payload = np.ones(1 << 16, dtype=np.uint8)
            held.append(weakref.ref(payload))
            head = {"k": "s", "id": message_id, "i": 0, "j": 0, "c": "none", "x": 0}
            # no message 0..7 ever comes: these shards belong to nothing
            assert engine.receive(PEER, [frames.encode_header(head), payload]) is None
            del payload
        engine.expire(time.monotonic())
        assert any(ref() is not None for ref in held), "shards may overtake their message"

        engine.expire(time.monotonic() + CONFIG.timeout_s + 1)
        gc.collect()
        assert all(ref() is None for ref in held)
    finally:
        engine.close()


def test_segment_named_across_hosts_is_refused_and_left_alone():
    # The receiver's own live segment: a peer on another host must not reach it.
    pool = shm.SegmentPool(max_free_bytes=0)
    segment = pool.acquire(1 << 12)
    engine = Engine(CONFIG, use_shm=False, sharded=True)
    try:
        head = {
            "k": "m",
            "id": 1,
            "h": {},
            "seg": segment.name,
            "t": [["x", "|u1", [16], ["m", 0]]],
        }
        with pytest.raises(TransportError, match="shared memory across hosts"):
            engine.receive(PEER, [frames.encode_header(head)])
        assert segment.name not in engine._cache._maps
    finally:
        engine.close()
        pool.close()


def test_early_shards_are_held_only_up_to_max_in_flight_bytes():
    engine = Engine(CONFIG, use_shm=False, sharded=True)
    held = []
    try:
        # Twice max_in_flight in shards of messages that never come.
        for message_id in range(2 * CONFIG.max_in_flight // (1 << 18)):
            payload = np.ones(1 << 18, dtype=np.uint8)
            held.append(weakref.ref(payload))
            head = {"k": "s", "id": message_id, "i": 0, "j": 0, "c": "none", "x": 0}
            engine.receive(PEER, [frames.encode_header(head), payload])
            del payload
        gc.collect()
        kept = sum(ref() is not None for ref in held)
        assert kept * (1 << 18) == CONFIG.max_in_flight
    finally:
        engine.close()


def test_huge_claims_raise_transport_error_without_allocating():
    engine = Engine(ChannelConfig(), use_shm=False, sharded=True)
    claims = [
        # 4 TiB inline, with a frame of 4 bytes
        ([["x", "<f4", [1 << 40], ["f"]]], [b"\x00" * 4]),
        # 1 TiB compressed inline: the size the codec would have to fill
        ([["x", "|u1", [1 << 40], ["f", "zstd"]]], [b"\x00" * 16]),
        # 1 TiB in 4 MiB shards
        ([["x", "|u1", [1 << 40], ["s", 1 << 18, 1 << 22]]], []),
        # 1 TiB of bf16 in one shard
        ([["x", "bf16", [1 << 39], ["s", 1, 1 << 40]]], []),
    ]
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tracemalloc.start()
    try:
        for index, (tensors, parts) in enumerate(claims):
            head = {"k": "m", "id": index, "h": {}, "t": tensors, "ack": False}
            with pytest.raises(TransportError, match="claims shape"):
                engine.receive(PEER, [frames.encode_header(head), *parts])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    # Just under the limit and likely more than this host has: compressed
    # inline, so the receiver must make room before the codec can say no.
    head = {"k": "m", "id": 9, "h": {}, "t": [["x", "|u1", [63 << 30], ["f", "zstd"]]]}
    try:
        with pytest.raises(TransportError):
            engine.receive(PEER, [frames.encode_header(head), b"\x00" * 16])
    finally:
        engine.close()
    rss_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before

    assert peak < 50 << 20
    assert rss_growth < 50 << 20


def test_shard_claiming_more_than_its_tensor_is_asked_again():
    engine = Engine(CONFIG, use_shm=False, sharded=True)
    head = {"k": "m", "id": 1, "h": {}, "t": [["w", "|u1", [100], ["s", 2, 64]]], "ack": False}
    try:
        assert engine.receive(PEER, [frames.encode_header(head)]) is None
        # shard 1 holds the last 36 bytes; 64 bytes cannot go there
        big = b"\x01" * 64
        shard = {"k": "s", "id": 1, "i": 0, "j": 1, "c": "none", "x": shards.checksum(big)}
        assert engine.receive(PEER, [frames.encode_header(shard), big]) is None

        asked = [frames.decode_header(item.frames[0]) for item in engine.outbox]
        assert {"k": "q", "id": 1, "i": 0, "j": [1]} in asked
        assert engine.stats["shards_asked_again"] == 1
    finally:
        engine.close()


def _sentinel(n: int) -> list[bytes]:
    head = {"k": "m", "id": 1 << 40 | n, "h": {"sentinel": n}, "t": [], "ack": False}
    return [frames.encode_header(head)]


def test_bound_channel_survives_junk_from_a_real_socket(tmp_path):
    rx = Channel.bind(f"ipc://{tmp_path}/rx.sock", CONFIG)
    context = zmq.Context()
    raw = context.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.setsockopt(zmq.SNDTIMEO, 5000)
    raw.setsockopt(zmq.ROUTING_ID, b"hostile")
    raw.connect(rx.endpoint)
    counter = iter(range(1 << 30))
    junk_frames = st.one_of(
        st.lists(st.binary(max_size=64), min_size=1, max_size=3),
        st.tuples(message_heads | shard_heads | control_heads, payloads).map(
            lambda t: [msgpack.packb(t[0]), *t[1]]
        ),
    )

    @settings(max_examples=100, deadline=None)
    @given(parts=junk_frames)
    def throw(parts):
        n = next(counter)
        raw.send_multipart(parts)
        # A well-formed message behind the junk, on the same connection.
        raw.send_multipart(_sentinel(n))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                message = rx.recv(timeout=max(deadline - time.monotonic(), 0.01))
            except TransportError:
                continue
            assert message.peer == b"hostile"
            if message.header == {"sentinel": n}:
                return
        pytest.fail(f"the message after {parts!r} never arrived")

    try:
        throw()
        # Still a working channel for a well-behaved peer.
        with Channel.connect(rx.endpoint, CONFIG) as tx:
            tx.send({"after": True}, {"x": np.arange(5, dtype=np.int64)})
            for _ in range(64):
                try:
                    header, tensors = rx.recv(timeout=5)
                except TransportError:
                    continue
                if header == {"after": True}:
                    break
            np.testing.assert_array_equal(tensors["x"], np.arange(5))
    finally:
        raw.close()
        context.term()
        rx.close(linger=0)
