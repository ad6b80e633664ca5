"""The channel protocol, without sockets: what to send, and what arrived.

`Engine` turns a (header, tensors) message into ZeroMQ frames and turns
frames from a peer back into messages, keeping the state in between: shared
memory leases, shards being assembled, bytes in flight per peer. It does no
I/O, so the blocking `Channel` and the asyncio `AsyncChannel` share it.

Every frame list starts with a msgpack map whose "k" says what it is:

    m  a message      {id, h: header, t: [[name, dtype, shape, place], ...],
                       seg: segment name, ack: bool}, then one frame per inline tensor
       place          ["f"] inline raw, ["f", codec] inline compressed,
                      ["m", offset] in the message's shared-memory segment,
                      ["s", count, size] sent as `count` shard messages
    s  a shard        {id, i: tensor index, j: shard index, c: codec, x: checksum}, payload
    a  progress       {id, w: wire bytes received so far, d: complete}
    r  release        {seg: [names]}: the receiver dropped every array in them
    u  removed        {seg: [names]}: the sender removed them; unmap
    q  ask again      {id, i, j: [shard indices]}
    e  cannot resend  {id, error}
    l  lane hello     from each extra stream of a connecting channel

Flow control: a message of `ACK_MIN_BYTES` or more asks for progress reports.
Its bytes count as in flight to its peer from the moment they are handed to
ZeroMQ until the receiver reports them arrived; a sender waits while a peer
has `max_in_flight` bytes outstanding, so no queue grows without bound.
Smaller messages are bounded by ZeroMQ's own high-water mark instead.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter, deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from quanta.errors import TransportError, shorten
from quanta.transport import codecs, frames, shards, shm
from quanta.transport.auto import AutoCodec

__all__ = ["ACK_MIN_BYTES", "Message", "Outgoing", "Engine"]

# Messages smaller than this need no progress reports: the reports would cost
# more than the bytes they account for.
ACK_MIN_BYTES = 64 * 1024
# Shards already sent whose receiver may report them at once: a report every
# this many bytes keeps the sender's view of the link fresh.
_REPORT_FRACTION = 8
# The shortest span of progress reports that measures the link's throughput.
_LINK_WINDOW_S = 0.1


class Message:
    """A received message; unpacks as `header, tensors`. `peer` names the sender
    on a bound channel (None on a connecting one)."""

    __slots__ = ("header", "tensors", "peer")

    def __init__(self, header: dict, tensors: dict, peer: bytes | None):
        self.header, self.tensors, self.peer = header, tensors, peer

    def __iter__(self):
        return iter((self.header, self.tensors))

    def __repr__(self) -> str:
        tensors = list(self.tensors)
        return f"Message(peer={self.peer!r}, header={shorten(self.header)}, tensors={tensors})"


@dataclass
class Outgoing:
    """Frames for one ZeroMQ message to `peer`, on stream `lane`; `cost` bytes count
    as in flight once sent."""

    peer: bytes | None
    frames: list
    lane: int = 0
    cost: int = 0


@dataclass
class _Sent:
    """A sender's record of a message that asked for progress reports."""

    peer: bytes | None
    names: list[str]
    wire: int = 0
    acked: int = 0
    sources: dict[int, tuple[memoryview, int, int]] = field(default_factory=dict)
    last_report: tuple[float, int] | None = None


@dataclass
class _Incoming:
    """A receiver's record of a message still missing shards."""

    peer: bytes | None
    id: int
    header: dict
    tensors: dict[str, Any]
    assemblies: dict[int, tuple[shards.Assembly, str, list]]
    ack: bool
    wire: int = 0
    reported: int = 0
    progress: float = field(default_factory=time.monotonic)
    asked: int = 0


class Engine:
    """Protocol state for one channel; see the module docstring.

    Args:
        config: the channel's `ChannelConfig`.
        use_shm: large tensors may go through shared memory (the peers share a host).
        sharded: large tensors are cut into shards (the link crosses hosts).
    """

    def __init__(self, config: Any, *, use_shm: bool, sharded: bool):
        self.config = config
        self.use_shm = use_shm and config.shm_threshold is not None
        self.sharded = sharded
        self.outbox: deque[Outgoing] = deque()
        self.releases: deque[tuple[bytes | None, str]] = deque()
        # "auto" chooses per shard; any other codec is used as it is.
        self.codec = None
        if config.codec == "auto":
            self.codec = AutoCodec(link_bytes_per_s=config.link_bytes_per_s)
        # What went out and came in, by kind: for tests, logs and benchmarks.
        self.stats: Counter[str] = Counter()
        self._ids = itertools.count(1)
        self._sent: dict[tuple[bytes | None, int], _Sent] = {}
        self._in_flight: dict[bytes | None, int] = {}
        self._incoming: dict[tuple[bytes | None, int], _Incoming] = {}
        self._early: dict[tuple[bytes | None, int], list] = {}
        self._early_at: dict[tuple[bytes | None, int], float] = {}
        self._early_bytes = 0
        self._pool = shm.SegmentPool(max_free_bytes=config.max_shm_bytes)
        self._segment_peer: dict[str, bytes | None] = {}
        self._cache = shm.SegmentCache(self._on_release)
        self._lease_peer: dict[str, bytes | None] = {}

    # -- sending -------------------------------------------------------------

    def in_flight(self, peer: bytes | None) -> int:
        return self._in_flight.get(peer, 0)

    def charge(self, item: Outgoing) -> None:
        """Count a sent item's bytes as in flight."""
        if item.cost:
            self._in_flight[item.peer] = self._in_flight.get(item.peer, 0) + item.cost

    def encode(
        self, peer: bytes | None, header: Mapping[str, Any], tensors: Mapping[str, Any]
    ) -> Iterator[Outgoing]:
        """The frames of one message: the message itself, then its shards.

        A generator, so that each shard is compressed only when the caller is
        ready to send it, while the previous one is on the wire.
        """
        message_id = next(self._ids)
        described = [(name, *frames.describe(name, t)) for name, t in tensors.items()]
        total = sum(buffer.nbytes for *_, buffer in described)
        segment = self._segment_for(peer, described)
        record = _Sent(peer, [name for name, *_ in described])

        descriptors, inline, pending_shards, offset = [], [], [], 0
        for index, (name, dtype_name, shape, buffer) in enumerate(described):
            place, nbytes = self._place(buffer, segment)
            self.stats[f"tensors_{place}"] += 1
            if place == "m":
                offset = shm.align(offset)
                segment.array(offset, nbytes)[:] = np.frombuffer(buffer, dtype=np.uint8)
                descriptors.append([name, dtype_name, shape, ["m", offset]])
                offset += nbytes
            elif place == "s":
                size = self.config.shard_size
                count = -(-nbytes // size)
                descriptors.append([name, dtype_name, shape, ["s", count, size]])
                record.sources[index] = (buffer, frames.itemsize(dtype_name), count)
                pending_shards.append(index)
            else:
                codec, payload = self._compress(buffer, frames.itemsize(dtype_name), inline=True)
                descriptors.append([name, dtype_name, shape, ["f", codec]])
                inline.append(payload)

        ack = total >= ACK_MIN_BYTES
        head = {"k": "m", "id": message_id, "h": dict(header), "t": descriptors, "ack": ack}
        if segment is not None:
            head["seg"] = segment.name
        inline_bytes = sum(memoryview(p).nbytes for p in inline)
        first_cost = inline_bytes + (offset if segment is not None else 0)
        if ack:
            record.wire = first_cost
            self._sent[(peer, message_id)] = record
        yield Outgoing(peer, [frames.encode_header(head), *inline], 0, first_cost if ack else 0)

        for index in pending_shards:
            buffer, itemsize, count = record.sources[index]
            for j, start, stop in shards.cut(buffer.nbytes, self.config.shard_size):
                item = self._shard(peer, message_id, index, j, buffer[start:stop], itemsize)
                record.wire += item.cost
                yield item

    def _segment_for(self, peer: bytes | None, described: list) -> shm.Segment | None:
        if not self.use_shm:
            return None
        wanted = sum(
            shm.align(b.nbytes) for *_, b in described if b.nbytes >= self.config.shm_threshold
        )
        # A receiver that keeps every array it gets would otherwise make the
        # sender fill /dev/shm; past the cap, large tensors go inline instead.
        if not wanted or self._pool.busy_bytes + wanted > self.config.max_shm_bytes:
            return None
        segment = self._pool.acquire(wanted)
        self._segment_peer[segment.name] = peer
        return segment

    def _place(self, buffer: memoryview, segment: shm.Segment | None) -> tuple[str, int]:
        nbytes = buffer.nbytes
        if segment is not None and nbytes >= self.config.shm_threshold:
            return "m", nbytes
        if self.sharded and nbytes >= self.config.shard_size:
            return "s", nbytes
        return "f", nbytes

    def _compress(self, data: memoryview, itemsize: int, *, inline: bool = False):
        name = self.config.codec
        # Compression pays only where bytes cross a link; inline frames under
        # the zero-copy threshold are too small for it to matter.
        if not self.sharded or name == "none" or (inline and data.nbytes < ACK_MIN_BYTES):
            return "none", data
        if self.codec is not None:
            name = self.codec.choose(data, itemsize)
            if name == "none":
                return name, data
        started = time.perf_counter()
        payload = codecs.compress(name, data, itemsize)
        if self.codec is not None:
            size = memoryview(payload).nbytes
            self.codec.observe(name, data.nbytes, size, time.perf_counter() - started)
        return name, payload

    def _shard(self, peer, message_id: int, index: int, j: int, data, itemsize: int) -> Outgoing:
        codec, payload = self._compress(data, itemsize)
        self.stats[f"shards_{codec}"] += 1
        self.stats["shard_bytes_raw"] += data.nbytes
        self.stats["shard_bytes_wire"] += memoryview(payload).nbytes
        head = {"k": "s", "id": message_id, "i": index, "j": j, "c": codec}
        head["x"] = shards.checksum(data)
        cost = memoryview(payload).nbytes
        return Outgoing(peer, [frames.encode_header(head), payload], lane=j, cost=cost)

    # -- receiving -----------------------------------------------------------

    def receive(self, peer: bytes | None, parts: list) -> Message | None:
        """Take one ZeroMQ message from `peer`; return a complete Message, if any.

        Raises:
            TransportError: the frames are malformed or name something unknown.
        """
        if not parts:
            raise TransportError("empty message: expected a header frame")
        head = frames.decode_header(parts[0])
        kind = head.get("k")
        # Ids and kinds key dicts: a list or map from a peer must not reach them.
        if not isinstance(kind, str) or not isinstance(head.get("id", 0), int):
            raise TransportError(f"message kind or id is malformed: {shorten(head)}")
        if kind == "m":
            return self._message(peer, head, parts[1:])
        if kind == "s":
            return self._shard_arrived(peer, head, parts[1:])
        if len(parts) != 1:
            raise TransportError(
                f"control message {shorten(kind)} has {len(parts) - 1} extra frames"
            )
        handler = _CONTROL.get(kind)
        if handler is None:
            raise TransportError(f"unknown message kind {shorten(kind)}")
        handler(self, peer, head)
        return None

    def _message(self, peer, head: dict, payloads: list) -> Message | None:
        message_id, header, descriptors = head.get("id"), head.get("h"), head.get("t")
        if not (isinstance(message_id, int) and isinstance(header, dict)):
            raise TransportError(f"message header is malformed: {shorten(head)}")
        if not isinstance(descriptors, list):
            raise TransportError(f"message has no tensor list: {shorten(descriptors)}")
        inline = iter(payloads)
        tensors, assemblies, owner = {}, {}, None
        for index, descriptor in enumerate(descriptors):
            name, dtype_name, shape, nbytes = frames.check_descriptor(
                descriptor, self.config.max_tensor_bytes
            )
            place = descriptor[3] if len(descriptor) > 3 else ["f"]
            kind = place[0] if isinstance(place, list) and place else None
            if kind == "f":
                tensors[name] = self._inline(name, dtype_name, shape, nbytes, place, inline)
            elif kind == "m":
                if self.sharded:
                    # A peer on another host cannot share our memory: naming a
                    # segment here would map whatever of ours has that name.
                    raise TransportError(f"tensor {name!r} names shared memory across hosts")
                if owner is None:
                    owner = self._lease(peer, head.get("seg"), descriptors)
                offset = place[1] if len(place) > 1 and isinstance(place[1], int) else -1
                if not 0 <= offset <= owner.nbytes - nbytes:
                    raise TransportError(f"tensor {name!r} lies outside its segment")
                raw = owner[offset : offset + nbytes]
                tensors[name] = frames.as_tensor(dtype_name, shape, raw)
            elif kind == "s" and len(place) == 3:
                assembly = shards.Assembly(name, nbytes, place[2], place[1])
                assemblies[index] = (assembly, dtype_name, shape)
                tensors[name] = None
            else:
                raise TransportError(f"tensor {name!r} has an unknown place {shorten(place)}")
        if next(inline, None) is not None:
            raise TransportError(f"message has more frames than its {len(descriptors)} tensors")

        incoming = _Incoming(peer, message_id, header, tensors, assemblies, bool(head.get("ack")))
        incoming.wire = _nbytes(payloads)
        if owner is not None:
            incoming.wire += owner.nbytes
        if not assemblies:
            return self._complete(incoming)
        self._incoming[(peer, message_id)] = incoming
        self._early_at.pop((peer, message_id), None)
        held = self._early.pop((peer, message_id), [])
        self._early_bytes -= sum(_nbytes(early[1]) for early in held)
        for early in held:
            done = self._shard_arrived(peer, *early)
            if done is not None:
                return done
        return None

    def _inline(self, name, dtype_name, shape, nbytes, place, inline) -> Any:
        frame = next(inline, None)
        if frame is None:
            raise TransportError(f"tensor {name!r} has no frame")
        buffer = frame.buffer if hasattr(frame, "buffer") else memoryview(frame)
        codec = place[1] if len(place) > 1 else "none"
        if codec == "none":
            if buffer.nbytes != nbytes:
                raise TransportError(
                    f"tensor {name!r} claims shape {shorten(shape)} of {dtype_name} "
                    f"({nbytes} bytes) but its frame holds {buffer.nbytes} bytes"
                )
            # pyzmq's frame buffers are writable; received arrays are documented read-only.
            return frames.as_tensor(dtype_name, shape, buffer.toreadonly())
        if codec not in codecs.CODECS:
            raise TransportError(f"tensor {name!r} has unknown codec {shorten(codec)}")
        try:
            out = np.empty(nbytes, dtype=np.uint8)
        except MemoryError as exc:
            raise TransportError(
                f"tensor {name!r} of {nbytes} bytes does not fit in memory"
            ) from exc
        codecs.decompress_into(codec, buffer, memoryview(out))
        return frames.as_tensor(dtype_name, shape, out)

    def _lease(self, peer, name, descriptors) -> np.ndarray:
        # The segment holds the message's shared tensors back to back; its
        # used length is the end of the last one.
        end = 0
        for descriptor in descriptors:
            # Not yet checked: those after the first shared one come later.
            place = descriptor[3] if isinstance(descriptor, list) and len(descriptor) > 3 else None
            if isinstance(place, list) and place[:1] == ["m"] and len(place) == 2:
                nbytes = frames.check_descriptor(descriptor, self.config.max_tensor_bytes)[3]
                if isinstance(place[1], int) and place[1] >= 0:
                    end = max(end, place[1] + nbytes)
        owner = self._cache.view(name, end)
        self._lease_peer[name] = peer
        return owner

    def _shard_arrived(self, peer, head: dict, payloads: list) -> Message | None:
        key = (peer, head.get("id"))
        incoming = self._incoming.get(key)
        if incoming is None:
            # Shards travel on other streams than their message and can overtake
            # it; hold up to max_in_flight bytes of them (what an honest sender
            # can have outstanding) until it arrives. Stray ones are dropped
            # and, if they belonged to something, asked for again later.
            size = _nbytes(payloads)
            if self._early_bytes + size <= self.config.max_in_flight:
                self._early.setdefault(key, []).append((head, payloads))
                self._early_at.setdefault(key, time.monotonic())
                self._early_bytes += size
            return None
        if len(payloads) != 1 or not isinstance(head.get("i"), int):
            raise TransportError(f"malformed shard {shorten(head)}")
        entry = incoming.assemblies.get(head["i"])
        if entry is None:
            raise TransportError(f"shard for tensor {shorten(head['i'])}, which is not sharded")
        assembly = entry[0]
        payload = payloads[0].buffer if hasattr(payloads[0], "buffer") else payloads[0]
        digest = head.get("x")
        if assembly.place(head.get("j"), head.get("c"), digest, payload):
            incoming.progress = time.monotonic()
            incoming.wire += memoryview(payload).nbytes
        else:
            self._ask_again(incoming, head["i"], [head.get("j")])
        if all(a.complete for a, *_ in incoming.assemblies.values()):
            del self._incoming[key]
            for assembly, dtype_name, shape in incoming.assemblies.values():
                value = frames.as_tensor(dtype_name, shape, assembly.buffer)
                incoming.tensors[assembly.name] = value
            return self._complete(incoming)
        self._report(incoming, done=False)
        return None

    def _complete(self, incoming: _Incoming) -> Message:
        self._report(incoming, done=True)
        return Message(incoming.header, incoming.tensors, incoming.peer)

    def _report(self, incoming: _Incoming, *, done: bool) -> None:
        if not incoming.ack:
            return
        every = self.config.max_in_flight // _REPORT_FRACTION
        if done or incoming.wire - incoming.reported >= every:
            incoming.reported = incoming.wire
            head = {"k": "a", "id": incoming.id, "w": incoming.wire, "d": done}
            self.outbox.append(Outgoing(incoming.peer, [frames.encode_header(head)]))

    def _ask_again(self, incoming: _Incoming, index: int, missing: list) -> None:
        self.stats["shards_asked_again"] += len(missing)
        head = {"k": "q", "id": incoming.id, "i": index, "j": missing[:4096]}
        self.outbox.append(Outgoing(incoming.peer, [frames.encode_header(head)]))

    def expire(self, now: float | None = None) -> None:
        """Ask again for shards of stalled messages; give up on long-stalled ones.

        Raises:
            TransportError: a message made no progress for `timeout_s`; names the
                peer and the tensor.
        """
        now = time.monotonic() if now is None else now
        retry = max(self.config.timeout_s / 10, 0.05)
        for key, incoming in list(self._incoming.items()):
            silent = now - incoming.progress
            if silent > self.config.timeout_s:
                del self._incoming[key]
                assembly = next(a for a, *_ in incoming.assemblies.values() if not a.complete)
                raise TransportError(
                    f"peer {incoming.peer!r} stopped sending tensor {assembly.name!r}: "
                    f"{len(assembly.missing)} of {assembly.count} shards missing after "
                    f"{silent:.1f} s without progress and {incoming.asked} requests"
                )
            if silent > retry * (incoming.asked + 1):
                incoming.asked += 1
                for index, (assembly, *_) in incoming.assemblies.items():
                    if assembly.missing:
                        self._ask_again(incoming, index, sorted(assembly.missing))
        # Shards whose message has not come within timeout_s are strays.
        for key in [k for k, at in self._early_at.items() if now - at > self.config.timeout_s]:
            self._early_bytes -= sum(_nbytes(early[1]) for early in self._early.pop(key, []))
            del self._early_at[key]

    # -- control messages ----------------------------------------------------

    def _on_progress(self, peer, head: dict) -> None:
        key = (peer, head.get("id"))
        record = self._sent.get(key)
        wire = head.get("w")
        if record is None or not isinstance(wire, int):
            return
        now = time.monotonic()
        if record.last_report is None:
            record.last_report = (now, wire)
        elif now - record.last_report[0] >= _LINK_WINDOW_S:
            # Reports come in bursts (the receiver drains several shards at
            # once), so the link is measured over windows, not between reports.
            seconds, before = now - record.last_report[0], record.last_report[1]
            if self.codec is not None and wire > before:
                self.codec.observe_link(wire - before, seconds)
            record.last_report = (now, wire)
        newly = max(0, min(wire, record.wire) - record.acked)
        record.acked += newly
        self._in_flight[peer] = max(0, self._in_flight.get(peer, 0) - newly)
        if head.get("d"):
            self._in_flight[peer] = max(
                0, self._in_flight.get(peer, 0) - (record.wire - record.acked)
            )
            del self._sent[key]

    def _on_release(self, name: str) -> None:
        # Called from a finalizer: record only; `flush_releases` sends.
        self.releases.append((self._lease_peer.get(name), name))

    def flush_releases(self) -> None:
        """Tell senders which of their segments this side no longer uses."""
        by_peer: dict[bytes | None, list[str]] = {}
        while self.releases:
            peer, name = self.releases.popleft()
            by_peer.setdefault(peer, []).append(name)
        for peer, names in by_peer.items():
            self.outbox.append(Outgoing(peer, [frames.encode_header({"k": "r", "seg": names})]))

    def _on_returned(self, peer, head: dict) -> None:
        removed = []
        for name in _names(head):
            if self._segment_peer.get(name, object()) == peer:
                removed += self._pool.release(name)
        if removed:
            self.outbox.append(Outgoing(peer, [frames.encode_header({"k": "u", "seg": removed})]))

    def _on_removed(self, peer, head: dict) -> None:
        self._cache.forget(_names(head))

    def _on_ask(self, peer, head: dict) -> None:
        record = self._sent.get((peer, head.get("id")))
        index, wanted = head.get("i"), head.get("j")
        known = record is not None and isinstance(index, int) and index in record.sources
        if not known or not isinstance(wanted, list):
            error = "the sender no longer holds this message"
            reply = {"k": "e", "id": head.get("id"), "error": error}
            self.outbox.append(Outgoing(peer, [frames.encode_header(reply)]))
            return
        buffer, itemsize, count = record.sources[index]
        size = self.config.shard_size
        for j in wanted:
            if isinstance(j, int) and 0 <= j < count:
                part = buffer[j * size : (j + 1) * size]
                self.outbox.append(self._shard(peer, head["id"], index, j, part, itemsize))

    def _on_cannot(self, peer, head: dict) -> None:
        incoming = self._incoming.pop((peer, head.get("id")), None)
        if incoming is not None:
            names = [a.name for a, *_ in incoming.assemblies.values() if not a.complete]
            raise TransportError(
                f"peer {peer!r} cannot resend tensor {names[0]!r}: {shorten(head.get('error'))}"
            )

    def forget(self, peer: bytes | None) -> None:
        """The peer is gone: drop what is in flight to or from it and remove the
        shared-memory segments it was sent."""
        self._in_flight.pop(peer, None)
        for key in [k for k in self._sent if k[0] == peer]:
            del self._sent[key]
        for key in [k for k in self._incoming if k[0] == peer]:
            del self._incoming[key]
        for name, owner in list(self._segment_peer.items()):
            if owner == peer:
                self._pool.discard(name)
                del self._segment_peer[name]

    def close(self) -> None:
        self._pool.close()
        self._cache.close()


def _names(head: dict) -> list[str]:
    names = head.get("seg")
    return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []


_CONTROL = {
    "a": Engine._on_progress,
    "r": Engine._on_returned,
    "u": Engine._on_removed,
    "q": Engine._on_ask,
    "e": Engine._on_cannot,
    "l": lambda self, peer, head: None,
}


def _nbytes(payloads: list) -> int:
    return sum(len(p) if isinstance(p, bytes) else memoryview(p).nbytes for p in payloads)
