"""Messages as ZeroMQ frames: a msgpack header, then one frame per tensor.

A message is a header (any msgpack-able dict) and named tensors (numpy arrays
or CPU torch tensors). On the wire it is a multipart message:

    frame 0      msgpack({"h": header, "t": [[name, dtype, shape], ...]})
    frame 1..n   the raw bytes of each tensor, C-contiguous, in the order of "t"

Nothing is pickled, so a peer can send nothing but bytes and numbers. Frames of
`ZERO_COPY_THRESHOLD` bytes and more are handed to ZeroMQ without a copy; a
smaller frame is cheaper to copy than to track.

Received tensors are numpy arrays that view the received frame's memory. They
stay valid for as long as the array (or anything viewing it) is alive: the
array holds a reference to the frame. bf16 arrives as a torch tensor, since
numpy has no bf16.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import msgpack
import numpy as np
import zmq

from quanta.errors import TransportError, shorten

__all__ = [
    "ZERO_COPY_THRESHOLD",
    "MAX_TENSOR_BYTES",
    "BF16",
    "describe",
    "itemsize",
    "check_descriptor",
    "as_tensor",
    "encode_header",
    "decode_header",
    "pack",
    "unpack",
    "send",
    "recv",
]

ZERO_COPY_THRESHOLD = 64 * 1024
# A header cannot make the receiver allocate or view more than this per tensor.
MAX_TENSOR_BYTES = 1 << 40

# Wire names for dtypes: numpy's little-endian codes, plus bf16 which numpy lacks.
BF16 = "bf16"
_NUMPY_DTYPES = {
    np.dtype(t).str: np.dtype(t)
    for t in (
        "<f2",
        "<f4",
        "<f8",
        "|i1",
        "<i2",
        "<i4",
        "<i8",
        "|u1",
        "<u2",
        "<u4",
        "<u8",
        "|b1",
    )
}


def describe(name: str, tensor: Any) -> tuple[str, list[int], memoryview]:
    """Return a tensor's wire dtype, shape and a contiguous byte view of its data.

    No copy is made when the tensor is already C-contiguous and little-endian.

    Raises:
        TransportError: the value is not a CPU tensor of a dtype that can be sent.
    """
    if not isinstance(tensor, np.ndarray):
        # Imported lazily: a process that sends only numpy needs no torch.
        import torch

        if not isinstance(tensor, torch.Tensor):
            raise TransportError(
                f"tensor {name!r} is a {type(tensor).__name__}; send numpy arrays or torch "
                "tensors, and put other values in the header"
            )
        if tensor.device.type != "cpu":
            raise TransportError(f"tensor {name!r} is on {tensor.device}; move it to the CPU")
        tensor = tensor.detach().contiguous()
        if tensor.dtype == torch.bfloat16:
            raw = tensor.view(torch.int16).numpy()
            return BF16, list(tensor.shape), memoryview(raw.reshape(-1)).cast("B")
        tensor = tensor.numpy()
    array = np.ascontiguousarray(tensor)
    dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
    if dtype.str not in _NUMPY_DTYPES:
        raise TransportError(f"tensor {name!r} has dtype {array.dtype}, which cannot be sent")
    array = array.astype(dtype, copy=False)
    return dtype.str, list(array.shape), memoryview(array.reshape(-1)).cast("B")


def itemsize(dtype_name: str) -> int:
    """Bytes per element of a wire dtype name."""
    return 2 if dtype_name == BF16 else _NUMPY_DTYPES[dtype_name].itemsize


def check_descriptor(descriptor: Any, limit: int = MAX_TENSOR_BYTES) -> tuple[str, str, list, int]:
    """Validate `[name, dtype, shape, ...]` from a peer; return (name, dtype, shape, nbytes).

    Raises:
        TransportError: the descriptor is malformed or claims more than `limit` bytes.
    """
    if not (isinstance(descriptor, Sequence) and len(descriptor) >= 3):
        raise TransportError(f"malformed tensor descriptor {shorten(descriptor)}")
    name, dtype_name, shape = descriptor[:3]
    if not isinstance(name, str) or not isinstance(shape, Sequence) or len(shape) > 64:
        raise TransportError(f"malformed tensor descriptor {shorten(descriptor)}")
    if not all(type(n) is int and 0 <= n < 1 << 62 for n in shape):
        raise TransportError(f"tensor {name!r} has an invalid shape {shorten(shape)}")
    if not isinstance(dtype_name, str) or (dtype_name != BF16 and dtype_name not in _NUMPY_DTYPES):
        raise TransportError(f"tensor {name!r} has an unknown dtype {shorten(dtype_name)}")
    nbytes = math.prod(shape) * itemsize(dtype_name)
    if nbytes > limit:
        raise TransportError(
            f"tensor {name!r} claims shape {shorten(shape)} of {dtype_name} ({nbytes} bytes), "
            f"more than the {limit} bytes a tensor may have"
        )
    return name, dtype_name, list(shape), nbytes


def as_tensor(dtype_name: str, shape: Sequence[int], buffer: Any) -> Any:
    """View `buffer` (exactly the tensor's bytes) as an array; bf16 becomes a torch tensor."""
    if dtype_name == BF16:
        import torch

        raw = np.frombuffer(buffer, dtype=np.int16).reshape(shape)
        with warnings.catch_warnings():
            # A read-only frame makes a read-only tensor; torch warns that it
            # cannot mark it so. Received tensors are documented as read-only.
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(raw).view(torch.bfloat16)
    return np.frombuffer(buffer, dtype=_NUMPY_DTYPES[dtype_name]).reshape(shape)


def pack(header: Mapping[str, Any], tensors: Mapping[str, Any] | None = None) -> list:
    """Encode a header and named tensors as a list of frames.

    Args:
        header: msgpack-able values (dicts, lists, str, bytes, numbers, None).
        tensors: name -> numpy array or CPU torch tensor.

    Returns:
        Frames for `zmq.Socket.send_multipart`: bytes for the header, memoryviews
        over the tensors' own memory for the rest (no copy is made here).

    Raises:
        TransportError: a value cannot be encoded.
    """
    descriptors, buffers = [], []
    for name, tensor in (tensors or {}).items():
        dtype_name, shape, buffer = describe(name, tensor)
        descriptors.append([name, dtype_name, shape])
        buffers.append(buffer)
    return [encode_header({"h": dict(header), "t": descriptors}), *buffers]


def encode_header(message: Mapping[str, Any]) -> bytes:
    """msgpack a header frame.

    Raises:
        TransportError: a value cannot be encoded.
    """
    try:
        return msgpack.packb(message, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise TransportError(f"header cannot be encoded with msgpack: {exc}") from exc


def decode_header(frame: Any) -> dict:
    """Decode a header frame into a dict.

    Raises:
        TransportError: the frame is not msgpack or not a map.
    """
    raw = frame.bytes if isinstance(frame, zmq.Frame) else bytes(frame)
    try:
        message = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise TransportError(f"header frame is not valid msgpack: {exc}") from exc
    if not isinstance(message, dict):
        raise TransportError(f"header frame is not a map: {shorten(message)}")
    return message


def _tensor_from(descriptor: Any, frame: Any) -> tuple[str, Any]:
    name, dtype_name, shape, nbytes = check_descriptor(descriptor)
    # Check the claimed size against the bytes that actually arrived before
    # making anything of them: a header must not be able to claim memory.
    buffer = frame.buffer if isinstance(frame, zmq.Frame) else memoryview(frame)
    if nbytes != buffer.nbytes:
        raise TransportError(
            f"tensor {name!r} claims shape {shorten(shape)} of {dtype_name} "
            f"({nbytes} bytes) but its frame holds {buffer.nbytes} bytes"
        )
    return name, as_tensor(dtype_name, shape, buffer)


def unpack(frames: Sequence[Any]) -> tuple[dict, dict[str, Any]]:
    """Decode frames made by `pack` into (header, tensors).

    Raises:
        TransportError: the frames are malformed; nothing is allocated for them.
    """
    if not frames:
        raise TransportError("empty message: expected a header frame")
    message = decode_header(frames[0])
    if not isinstance(message.get("h"), dict):
        raise TransportError(f"header frame has no header dict: {shorten(message)}")
    descriptors = message.get("t")
    if not isinstance(descriptors, list) or len(descriptors) != len(frames) - 1:
        raise TransportError(
            f"header lists {shorten(descriptors)} tensors but {len(frames) - 1} frames followed"
        )
    tensors = dict(_tensor_from(d, f) for d, f in zip(descriptors, frames[1:], strict=True))
    return message["h"], tensors


def send(
    socket: zmq.Socket,
    header: Mapping[str, Any],
    tensors: Mapping[str, Any] | None = None,
    *,
    route: Sequence[bytes] = (),
) -> None:
    """Send one message; `route` frames (a ROUTER's peer identity) go first."""
    # pyzmq copies frames under `copy_threshold` even with copy=False, which is
    # exactly the small-frame rule: pin it so it cannot drift with pyzmq's default.
    socket.copy_threshold = ZERO_COPY_THRESHOLD
    socket.send_multipart([*route, *pack(header, tensors)], copy=False)


def recv(socket: zmq.Socket, *, routed: bool = False) -> tuple[bytes | None, dict, dict]:
    """Receive one message: (peer identity or None, header, tensors)."""
    frames = socket.recv_multipart(copy=False)
    peer = None
    if routed:
        peer, frames = frames[0].bytes, frames[1:]
    header, tensors = unpack(frames)
    return peer, header, tensors
