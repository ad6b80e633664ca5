"""Channels: send and receive messages of tensors between processes and hosts.

    rx = Channel.bind("ipc:///tmp/app/x.sock")          # or "tcp://127.0.0.1:0"
    tx = Channel.connect(rx.endpoint)
    tx.send({"step": 7}, {"x": tensor})
    header, tensors = rx.recv(timeout=10)               # a Message; .peer names tx
    rx.send({"ok": True}, peer=message.peer)

A bound channel is a ZeroMQ ROUTER that talks to many peers; a connecting
channel is one or more DEALERs that talk to it. How a tensor travels depends
on the link (see `quanta.transport.protocol` for the wire format):

  - ipc:// (one host): tensors of `shm_threshold` bytes and more go through
    shared memory, copied once by the sender; smaller ones as frames.
  - tcp:// (across hosts): tensors of `shard_size` and more are cut into
    checksummed shards spread over `streams` TCP connections and compressed
    per `codec`; smaller ones as frames.

How long received tensors stay valid: for as long as the caller holds them.
Frame-backed arrays keep their ZeroMQ frame alive and are read-only;
shared-memory arrays keep their segment leased, and the segment goes back to
the sender once every array of the message is garbage, so drop arrays you no
longer need rather than keeping them all; sharded tensors are ordinary
arrays the receiver owns. bf16 tensors arrive as torch tensors.

Sending never copies a frame of 64 KiB or more: `send` returns a `Sent`
whose `done` turns true once ZeroMQ has let go of every such buffer, and
until then the caller must not modify them.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.asyncio

from quanta.errors import ConfigError, TransportError, shorten
from quanta.transport import codecs, frames, security, shm
from quanta.transport.protocol import Engine, Message, Outgoing

__all__ = ["ChannelConfig", "Channel", "AsyncChannel", "Message", "Sent"]

logger = logging.getLogger(__name__)

# How often a blocked call wakes to check stalled transfers.
_TICK_S = 0.05


@dataclass(frozen=True)
class ChannelConfig:
    """Settings of one channel; every size is in bytes.

    Attributes:
        shm_threshold: tensors this large go through shared memory on one host;
            None never uses it.
        shard_size: tensors this large are sharded on tcp:// links.
        streams: TCP connections a connecting channel opens for shards.
        codec: "none", "lz4", "zstd", "blosc2", or "auto" (compress a shard only
            when that makes it arrive sooner); applies to tcp:// links.
        max_in_flight: bytes sent to one peer and not yet reported arrived,
            beyond which `send` waits.
        max_shm_bytes: shared memory one channel may have lent out at once;
            beyond it, tensors travel as frames.
        max_tensor_bytes: the largest tensor this side accepts from a peer.
        link_bytes_per_s: the link's expected throughput, which "auto" starts
            from until it has measured the link (default: assume a fast link).
        timeout_s: how long a transfer may make no progress before it fails.
        identity: a connecting channel's name at its peer (default: random).
        curve_keys: this side's CURVE key pair; required on both sides for CURVE.
        curve_server_key: a connecting channel's view of the bound side's public key.
        curve_allowed: public keys a bound channel admits.
    """

    shm_threshold: int | None = 1 << 20
    shard_size: int = 4 << 20
    streams: int = 4
    codec: str = "auto"
    max_in_flight: int = 64 << 20
    max_shm_bytes: int = 1 << 30
    max_tensor_bytes: int = 64 << 30
    link_bytes_per_s: float | None = None
    timeout_s: float = 10.0
    identity: bytes | None = None
    curve_keys: security.CurveKeys | None = None
    curve_server_key: bytes | None = None
    curve_allowed: frozenset[bytes] | None = None

    def __post_init__(self) -> None:
        codecs.check_codec(self.codec)
        for name in ("shard_size", "streams", "max_in_flight", "max_shm_bytes", "max_tensor_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r}: give a positive whole number")
        if self.shm_threshold is not None and self.shm_threshold < 1:
            raise ConfigError(f"shm_threshold={self.shm_threshold!r}: give bytes >= 1 or None")
        if not self.timeout_s > 0:
            raise ConfigError(f"timeout_s={self.timeout_s!r}: give a positive number of seconds")
        if self.identity is not None and (b"#" in self.identity or not self.identity):
            raise ConfigError(f"identity={self.identity!r}: give non-empty bytes without '#'")


class Sent:
    """What `send` handed to ZeroMQ without a copy; `done` once all of it is sent."""

    def __init__(self, trackers: list[zmq.MessageTracker]):
        self._trackers = trackers

    @property
    def done(self) -> bool:
        return all(t.done for t in self._trackers)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the buffers may be reused; False if `timeout` passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for tracker in self._trackers:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                tracker.wait(left)
            except zmq.NotDone:
                return False
        return True


def _link(endpoint: str) -> tuple[bool, bool]:
    """(same host, crosses hosts) for an endpoint."""
    scheme = endpoint.split("://", 1)[0]
    if scheme == "ipc":
        return True, False
    if scheme == "tcp":
        return False, True
    if scheme == "inproc":
        # inproc:// joins sockets of one ZeroMQ context, and each Channel has its own.
        raise ConfigError(
            f"endpoint {endpoint!r}: inproc:// cannot join two channels; "
            "use ipc://PATH between threads or processes of one host"
        )
    raise ConfigError(f"endpoint {endpoint!r}: use ipc://PATH or tcp://HOST:PORT")


def _bind(socket: zmq.Socket, endpoint: str) -> None:
    try:
        socket.bind(endpoint)
    except zmq.ZMQError as exc:
        raise TransportError(
            f"cannot bind {endpoint!r}: {exc.strerror}; choose another address "
            "(port 0 picks a free one) or stop what holds it"
        ) from exc


class _Base:
    """What both channel kinds share: engine, peers and streams, sending an item."""

    def _setup(self, endpoint: str, config: ChannelConfig | None, bound: bool) -> None:
        self.config = config or ChannelConfig()
        self.bound = bound
        same_host, crosses = _link(endpoint)
        self.engine = Engine(self.config, use_shm=same_host, sharded=crosses)
        self._lanes: dict[bytes, list[bytes]] = {}
        self._auth: security.Authenticator | None = None
        self._inbox: deque[Message | TransportError] = deque()
        shm.reclaim()

    def _secure(self, context: zmq.Context, socket: zmq.Socket, endpoint: str) -> None:
        keys = self.config.curve_keys
        if keys is None:
            if endpoint.startswith("tcp://") and not _is_loopback(endpoint):
                logger.warning(
                    "%s is not a loopback address and has no CURVE keys: anyone who can reach "
                    "it can talk to it",
                    endpoint,
                )
            return
        if self.bound:
            if not self.config.curve_allowed:
                raise ConfigError("a bound channel with curve_keys needs curve_allowed keys")
            if self._auth is None:
                self._auth = security.Authenticator(context, self.config.curve_allowed)
                self._auth.start()
            security.secure_server(socket, keys)
        else:
            if self.config.curve_server_key is None:
                raise ConfigError("a connecting channel with curve_keys needs curve_server_key")
            security.secure_client(socket, keys, self.config.curve_server_key)

    def _peer_of(self, identity: bytes) -> bytes:
        # Extra streams of a connecting channel are named "<identity>#<n>".
        peer = identity.split(b"#", 1)[0]
        lanes = self._lanes.setdefault(peer, [peer])
        if identity not in lanes:
            lanes.append(identity)
        return peer

    def _route(self, item: Outgoing) -> tuple[int, list]:
        """(socket index, frames) for an item, with per-buffer tracking where needed."""
        parts, trackers = [], []
        for part in item.frames:
            if isinstance(part, memoryview) and part.nbytes >= frames.ZERO_COPY_THRESHOLD:
                frame = zmq.Frame(part, track=True)
                trackers.append(frame.tracker)
                parts.append(frame)
            else:
                parts.append(part)
        self._trackers.extend(trackers)
        if self.bound:
            lanes = self._lanes.get(item.peer) or [item.peer]
            return 0, [lanes[item.lane % len(lanes)], *parts]
        return item.lane % len(self._sockets), parts

    def _take(self, identity: bytes | None, parts: list) -> None:
        peer = self._peer_of(identity) if identity is not None else None
        try:
            message = self.engine.receive(peer, parts)
        except TransportError as exc:
            self._inbox.append(exc)
            return
        if message is not None:
            self._inbox.append(message)

    def _expire(self) -> None:
        try:
            self.engine.expire()
        except TransportError as exc:
            self._inbox.append(exc)

    def _gone(self, peer: bytes | None, exc: zmq.ZMQError) -> TransportError:
        self.forget(peer)
        return TransportError(f"peer {peer!r} is gone ({exc.strerror}); the message was not sent")

    def forget(self, peer: bytes | None) -> None:
        """Drop all state for a peer that is gone, shared-memory segments included."""
        self.engine.forget(peer)
        self._lanes.pop(peer, None)

    @property
    def endpoint(self) -> str:
        """The endpoint as bound or connected, with a tcp port 0 resolved."""
        return self._endpoint


def _is_loopback(endpoint: str) -> bool:
    host = endpoint[len("tcp://") :].rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


class Channel(_Base):
    """A blocking channel; make one with `Channel.bind` or `Channel.connect`."""

    def __init__(self, endpoint: str, config: ChannelConfig | None, *, bound: bool):
        self._setup(endpoint, config, bound)
        streams = self.config.streams if endpoint.startswith("tcp://") and not bound else 1
        self._context = zmq.Context(io_threads=max(1, min(self.config.streams, 4)))
        self._trackers: list[zmq.MessageTracker] = []
        self._sockets: list[zmq.Socket] = []
        identity = self.config.identity or secrets.token_hex(8).encode()
        try:
            for lane in range(streams):
                socket = self._context.socket(zmq.ROUTER if bound else zmq.DEALER)
                socket.setsockopt(zmq.LINGER, 1000)
                socket.copy_threshold = frames.ZERO_COPY_THRESHOLD
                self._secure(self._context, socket, endpoint)
                if bound:
                    # A send to a peer that has gone raises instead of vanishing.
                    socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
                    _bind(socket, endpoint)
                else:
                    suffix = b"" if lane == 0 else b"#%d" % lane
                    socket.setsockopt(zmq.ROUTING_ID, identity + suffix)
                    socket.connect(endpoint)
                    if lane:
                        socket.send(frames.encode_header({"k": "l"}))
                self._sockets.append(socket)
        except BaseException:
            # A constructor that fails leaves nothing open behind it.
            if self._auth is not None:
                self._auth.stop()
            self._context.destroy(linger=0)
            raise
        self._endpoint = self._sockets[0].getsockopt_string(zmq.LAST_ENDPOINT) or endpoint
        self._poller = zmq.Poller()
        for socket in self._sockets:
            self._poller.register(socket, zmq.POLLIN)

    @classmethod
    def bind(cls, endpoint: str, config: ChannelConfig | None = None) -> Channel:
        """A channel that many peers connect to."""
        return cls(endpoint, config, bound=True)

    @classmethod
    def connect(cls, endpoint: str, config: ChannelConfig | None = None) -> Channel:
        """A channel to one bound channel."""
        return cls(endpoint, config, bound=False)

    def send(
        self,
        header: Mapping[str, Any],
        tensors: Mapping[str, Any] | None = None,
        *,
        peer: bytes | None = None,
    ) -> Sent:
        """Send one message; waits while the peer has `max_in_flight` bytes outstanding.

        Raises:
            TransportError: a tensor cannot be sent, the peer is gone, or it has
                taken nothing for `timeout_s`.
        """
        if self.bound and peer is None:
            raise ConfigError("a bound channel sends to a peer: pass peer=message.peer")
        self._trackers = []
        # Segments returned since the last call can serve this message; and a
        # release queued here must reach the peer before what it answers.
        self._flush()
        self._pump(0)
        for item in self.engine.encode(peer if self.bound else None, header, tensors or {}):
            self._wait_for_room(item)
            self._send(item)
        self._flush()
        return Sent(self._trackers)

    def _send(self, item: Outgoing) -> None:
        index, parts = self._route(item)
        try:
            self._sockets[index].send_multipart(parts, copy=False)
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                raise self._gone(item.peer, exc) from exc
            raise TransportError(f"send to {item.peer!r} failed: {exc}") from exc
        self.engine.charge(item)

    def _wait_for_room(self, item: Outgoing) -> None:
        limit = self.config.max_in_flight
        waited_since, last = time.monotonic(), self.engine.in_flight(item.peer)
        while item.cost and 0 < self.engine.in_flight(item.peer) > limit - item.cost:
            now, outstanding = time.monotonic(), self.engine.in_flight(item.peer)
            if outstanding < last:  # progress: the timeout counts from here
                waited_since, last = now, outstanding
            if now - waited_since > self.config.timeout_s:
                # A connecting channel's one peer is known by its endpoint, not an identity.
                peer = item.peer if self.bound else self.endpoint
                raise TransportError(
                    f"peer {peer!r} has not taken {outstanding} bytes in "
                    f"{self.config.timeout_s:.1f} s; it is gone or not receiving"
                )
            self._flush()
            self._pump(_TICK_S)

    def _flush(self) -> None:
        self.engine.flush_releases()
        while self.engine.outbox:
            item = self.engine.outbox.popleft()
            try:
                self._send(item)
            except TransportError as exc:
                logger.debug("control message not sent: %s", exc)

    def _pump(self, timeout: float) -> None:
        """Read whatever arrives within `timeout` seconds."""
        for socket, _ in self._poller.poll(int(timeout * 1000)):
            for _ in range(256):  # bounded, so a flood cannot starve the caller
                try:
                    parts = socket.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                if self.bound:
                    self._take(parts[0].bytes, parts[1:])
                else:
                    self._take(None, parts)
        self._expire()
        self._flush()

    def poll(self, timeout: float = 0.0) -> bool:
        """True when `recv` would return (or raise) at once."""
        deadline = time.monotonic() + timeout
        while not self._inbox:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._pump(min(left, _TICK_S))
        return True

    def recv(self, timeout: float | None = None) -> Message:
        """The next message.

        Raises:
            TransportError: nothing arrived within `timeout` seconds, a message
                was malformed, or a transfer stalled.
        """
        if not self.poll(float("inf") if timeout is None else timeout):
            raise TransportError(f"no message arrived within {timeout} s")
        item = self._inbox.popleft()
        if isinstance(item, TransportError):
            raise item
        return item

    def close(self, linger: float = 1.0) -> None:
        """Flush, close the sockets and remove this side's shared-memory segments."""
        self._flush()
        for socket in self._sockets:
            socket.close(linger=int(linger * 1000))
        if self._auth is not None:
            self._auth.stop()
        self.engine.close()
        self._context.term()

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


class AsyncChannel(_Base):
    """A bound channel for asyncio code; a reader task takes every arrival.

    NOTE: only the bound side exists in asyncio form; peers connect with `Channel`.
    """

    def __init__(self, endpoint: str, config: ChannelConfig | None = None):
        self._setup(endpoint, config, bound=True)
        self._context = zmq.asyncio.Context()
        self._trackers: list[zmq.MessageTracker] = []
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._socket.copy_threshold = frames.ZERO_COPY_THRESHOLD
        try:
            self._secure(self._context, self._socket, endpoint)
            _bind(self._socket, endpoint)
        except BaseException:
            if self._auth is not None:
                self._auth.stop()
            self._context.destroy(linger=0)
            raise
        self._endpoint = self._socket.getsockopt_string(zmq.LAST_ENDPOINT) or endpoint
        self._arrived = asyncio.Event()
        self._progress = asyncio.Event()
        self._reader: asyncio.Task | None = None

    def start(self) -> None:
        """Start the reader task; call from inside the event loop."""
        self._reader = asyncio.create_task(self._read(), name="channel-reader")

    async def _read(self) -> None:
        while True:
            if await self._socket.poll(_TICK_S * 1000):
                parts = await self._socket.recv_multipart(copy=False)
                self._take(parts[0].bytes, parts[1:])
            self._expire()
            await self._flush()
            self._progress.set()
            if self._inbox:
                self._arrived.set()

    async def recv(self) -> Message:
        """The next message; raises TransportError for a malformed one."""
        while not self._inbox:
            self._arrived.clear()
            await self._arrived.wait()
        item = self._inbox.popleft()
        if isinstance(item, TransportError):
            raise item
        return item

    async def send(
        self, header: Mapping[str, Any], tensors: Mapping[str, Any] | None = None, *, peer: bytes
    ) -> Sent:
        """Send one message to `peer`; see `Channel.send`."""
        self._trackers = []
        for item in self.engine.encode(peer, header, tensors or {}):
            waited_since = time.monotonic()
            while (
                item.cost
                and 0 < self.engine.in_flight(peer) > self.config.max_in_flight - item.cost
            ):
                if time.monotonic() - waited_since > self.config.timeout_s:
                    raise TransportError(f"peer {peer!r} has not taken what it was sent")
                self._progress.clear()
                await self._progress.wait()
            await self._send(item)
        await self._flush()
        return Sent(self._trackers)

    async def _send(self, item: Outgoing) -> None:
        _, parts = self._route(item)
        try:
            await self._socket.send_multipart(parts, copy=False)
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                raise self._gone(item.peer, exc) from exc
            raise TransportError(f"send to {shorten(item.peer)} failed: {exc}") from exc
        self.engine.charge(item)

    async def _flush(self) -> None:
        self.engine.flush_releases()
        while self.engine.outbox:
            item = self.engine.outbox.popleft()
            try:
                await self._send(item)
            except TransportError as exc:
                logger.debug("control message not sent: %s", exc)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        self._socket.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
        self.engine.close()
        self._context.term()
