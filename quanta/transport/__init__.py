"""Moving messages of tensors between processes and hosts without pickle or needless copies.

`Channel` (blocking) and `AsyncChannel` (asyncio, bound side) carry messages
of a msgpack header and named tensors; `frames` has the socket-level helpers
under them for plain ZeroMQ sockets.
"""

from quanta.transport.channel import AsyncChannel, Channel, ChannelConfig, Message, Sent
from quanta.transport.frames import MAX_TENSOR_BYTES, ZERO_COPY_THRESHOLD, pack, recv, send, unpack

__all__ = [
    "AsyncChannel",
    "Channel",
    "ChannelConfig",
    "Message",
    "Sent",
    "MAX_TENSOR_BYTES",
    "ZERO_COPY_THRESHOLD",
    "pack",
    "recv",
    "send",
    "unpack",
]
