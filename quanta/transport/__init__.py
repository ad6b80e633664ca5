"""Moving messages of tensors between processes without pickle or needless copies."""

from quanta.transport.frames import MAX_TENSOR_BYTES, ZERO_COPY_THRESHOLD, pack, recv, send, unpack

__all__ = ["MAX_TENSOR_BYTES", "ZERO_COPY_THRESHOLD", "pack", "recv", "send", "unpack"]
