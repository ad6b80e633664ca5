"""Operands in blocks: sizing tiles from the cache and a memory limit, reading and writing them.

A matrix product C = A @ B is cut into tiles of C (bm x bn), each summed over
slices of the shared dimension (bk). Every tile step holds one block of A,
one of B and one tile of C, each in fp32 and in the low-precision copy the
kernel makes, so the extra memory of a product is bounded by the tile sizes
and not by the operands.

Operands may be numpy arrays, torch tensors, or numpy memmaps larger than
RAM. A memmap's pages count towards the process's resident memory once
touched, so after each block the mapping is told the pages are no longer
needed (`madvise(MADV_DONTNEED)`): the data stays in the page cache and in the
file, and the process's footprint stays at one block.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass

import numpy as np
import torch

from quanta import hardware
from quanta.errors import ConfigError

__all__ = [
    "Tiling",
    "plan_tiling",
    "read_block",
    "release",
    "check_operand",
    "default_memory_limit",
]

# Bytes held per element of a tile step: the fp32 block as read, the fp32
# temporary and int8 codes of quantizing it (bf16 needs less), and for the
# output tile the product, its fp32 form and the running sum. Doubled for the
# allocator's slack and the pages of a memmap being copied.
_BYTES_PER_INPUT_ELEMENT = 2 * (4 + 4 + 1)
_BYTES_PER_OUTPUT_ELEMENT = 2 * (4 + 4 + 4)
# Tiles are multiples of this, which suits the vector units and the int8 kernel.
_ALIGN = 64
# Bytes of a memmap's rows made resident at once while a block is copied out.
_MAPPED_CHUNK_BYTES = 4 << 20
# A dimension this short is never cut: slicing it would only add calls.
_MIN_CUT = 256


@dataclass(frozen=True)
class Tiling:
    """How a product of m x k by k x n is cut: tiles of bm x bn, summed over bk."""

    bm: int
    bn: int
    bk: int

    def tiles(self, m: int, n: int) -> list[tuple[slice, slice]]:
        return [
            (slice(i, min(i + self.bm, m)), slice(j, min(j + self.bn, n)))
            for i in range(0, m, self.bm)
            for j in range(0, n, self.bn)
        ]

    def slices(self, k: int) -> list[slice]:
        return [slice(p, min(p + self.bk, k)) for p in range(0, k, self.bk)]

    def peak_bytes(self) -> int:
        """The extra memory one tile step may hold, by the accounting above."""
        inputs = (self.bm + self.bn) * self.bk * _BYTES_PER_INPUT_ELEMENT
        return inputs + self.bm * self.bn * _BYTES_PER_OUTPUT_ELEMENT


def default_memory_limit() -> int:
    """An eighth of the machine's memory: room for a product beside a serving process."""
    total = hardware.detect().memory_bytes or 8 << 30
    return total // 8


def plan_tiling(m: int, n: int, k: int, *, memory_limit: int, block: int | None = None) -> Tiling:
    """Choose tile sizes for an m x k by k x n product within `memory_limit` bytes.

    Dimensions that fit are not cut: one call into torch's own threaded kernel
    is the fastest way to do a product that fits. When something must be cut,
    the shared dimension is cut first down to a tile of about the L2 cache
    (it only adds fp32 sums), then the output, keeping tiles square-ish.

    Args:
        block: force square tiles of this size (rounded to the dimensions).

    Raises:
        ConfigError: the limit cannot hold even the smallest tile.
    """
    if block is not None:
        if block < 1:
            raise ConfigError(f"block={block} must be at least 1, or None to size it from memory")
        return Tiling(max(1, min(block, m)), max(1, min(block, n)), max(1, min(block, k)))
    tiling = Tiling(max(1, m), max(1, n), max(1, k))
    l2_side = _floor_align(int((hardware.detect().l2_bytes or 1 << 20) ** 0.5))
    while tiling.peak_bytes() > memory_limit:
        bm, bn, bk = tiling.bm, tiling.bn, tiling.bk
        if bk > max(_MIN_CUT, l2_side) and bk >= max(bm, bn) // 2:
            tiling = Tiling(bm, bn, _floor_align(bk // 2))
        elif bm >= bn and bm > _ALIGN:
            tiling = Tiling(_floor_align(bm // 2), bn, bk)
        elif bn > _ALIGN:
            tiling = Tiling(bm, _floor_align(bn // 2), bk)
        elif bk > _ALIGN:
            tiling = Tiling(bm, bn, _floor_align(bk // 2))
        else:
            raise ConfigError(
                f"memory_limit={memory_limit} bytes cannot hold one {_ALIGN}x{_ALIGN} tile "
                f"({tiling.peak_bytes()} bytes); raise it to at least 1 MiB"
            )
    return tiling


def _floor_align(value: int) -> int:
    return max(_ALIGN, value // _ALIGN * _ALIGN)


def check_operand(x, name: str) -> tuple[int, int]:
    """Return the shape of a 2-D numpy array, memmap or torch tensor of numbers.

    Raises:
        ConfigError: `x` is none of those, is not 2-D, or holds no numbers.
    """
    if isinstance(x, np.ndarray):
        numeric = np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)
    elif isinstance(x, torch.Tensor):
        numeric = not (x.is_complex() or x.dtype == torch.bool)
    else:
        raise ConfigError(
            f"{name} is a {type(x).__name__}; pass a numpy array, a numpy memmap or a torch tensor"
        )
    if x.ndim != 2:
        raise ConfigError(f"{name} has shape {tuple(x.shape)}; pass a 2-D matrix")
    if not numeric:
        raise ConfigError(f"{name} has dtype {x.dtype}; pass real numbers")
    return int(x.shape[0]), int(x.shape[1])


def read_block(x, rows: slice, cols: slice, device: torch.device) -> torch.Tensor:
    """x[rows, cols] as a contiguous fp32 tensor on `device`, for reading only.

    A block that is already contiguous fp32 on the device comes back as a view
    of `x`, so callers must not write to it. A memmap is copied out and its
    pages released at once, so reading a block never leaves more than the
    block resident.
    """
    if isinstance(x, np.memmap):
        block = torch.from_numpy(_read_mapped(x, rows, cols))
    else:
        block = x[rows, cols]
        if isinstance(block, np.ndarray):
            # a read-only array (np.load, a frozen buffer) is copied: torch wants to own writes
            copy = not block.flags.writeable or block.dtype != np.float32
            block = torch.from_numpy(np.array(block, np.float32) if copy else block)
        block = block.to(dtype=torch.float32)
    return block.to(device).contiguous()


def _read_mapped(x: np.memmap, rows: slice, cols: slice) -> np.ndarray:
    # A few rows at a time: a narrow block touches a whole page of every row,
    # so copying it at once could make more resident than the block's size.
    picked = range(*rows.indices(x.shape[0]))
    out = np.empty((len(picked), len(range(*cols.indices(x.shape[1])))), dtype=np.float32)
    step = max(1, _MAPPED_CHUNK_BYTES // max(1, x.strides[0]))
    for start in range(0, len(picked), step):
        chunk = picked[start : start + step]
        out[start : start + len(chunk)] = x[chunk.start : chunk.stop : chunk.step, cols]
        release(x)
    return out


def release(x) -> None:
    """Drop the resident pages of a numpy memmap; a no-op for anything else."""
    backing = getattr(x, "_mmap", None)
    if isinstance(backing, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
        backing.madvise(mmap.MADV_DONTNEED)
