"""`matmul`: a blocked, parallel matrix product that picks its precision by measured error.

    >>> import numpy as np
    >>> from quanta.kernels import matmul
    >>> a, b = np.ones((300, 200), np.float32), np.ones((200, 100), np.float32)
    >>> float(matmul(a, b)[0, 0])
    200.0

The product is cut into tiles (see `quanta.kernels.blocks`) so that its extra
memory stays under a limit whatever the operand sizes, which lets operands be
memmaps larger than RAM. When there are several tiles, small enough that
torch's threads inside one tile may not fill the cores, a pool of one thread
per core runs them, if a timing of that tile size says the pool is faster.
The precision comes from `quanta.kernels.precision`.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import time
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

from quanta import hardware
from quanta.errors import ConfigError
from quanta.kernels import precision as precisions
from quanta.kernels.blocks import (
    Tiling,
    check_operand,
    default_memory_limit,
    plan_tiling,
    read_block,
    release,
)

__all__ = ["Plan", "matmul", "plan"]

logger = logging.getLogger(__name__)

# Tiles smaller than this much work (multiply-adds) run one after another: a
# pool's hand-off costs more than it saves on them (docs/benchmarks.md).
_POOL_MIN_TILE_WORK = 1 << 24
# Memory a thread of the pool holds beyond its tiles: its own allocator arena
# and the BLAS threads it starts. Measured: a pool of two on a fresh process
# peaked about 20 MiB above the same tiles run in one thread.
_THREAD_RESERVE_BYTES = 16 << 20


def _device(*operands) -> torch.device:
    for x in operands:
        if isinstance(x, torch.Tensor) and x.device.type != "cpu":
            return x.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Plan(NamedTuple):
    """How a product runs: its precision (and why), its tiles, and the threads running them."""

    choice: precisions.Choice
    tiling: Tiling
    threads: int


def plan(
    a,
    b,
    *,
    precision: str = "auto",
    tol: float = 1e-2,
    block: int | None = None,
    memory_limit: int | None = None,
    threads: int | None = None,
) -> Plan:
    """Decide how `matmul(a, b)` would run, without computing it.

    Takes the same arguments as `matmul`; see there.
    """
    (m, k), (k2, n) = check_operand(a, "a"), check_operand(b, "b")
    if k != k2:
        raise ConfigError(
            f"a is {m}x{k} and b is {k2}x{n}: a's columns must equal b's rows; "
            "transpose one of them"
        )
    memory_limit = default_memory_limit() if memory_limit is None else memory_limit
    if memory_limit < 1:
        raise ConfigError(f"memory_limit={memory_limit} must be a positive number of bytes")
    if threads is not None and threads < 1:
        raise ConfigError(f"threads={threads} must be at least 1, or None to choose")
    tiling = plan_tiling(m, n, k, memory_limit=memory_limit, block=block)
    workers = _workers(tiling, m, n, memory_limit) if threads is None else threads
    if workers > 1 and block is None:
        # Every thread holds its own tile step and its own working memory, so
        # each gets a share of what the limit leaves after those.
        share = max(1, (memory_limit - workers * _THREAD_RESERVE_BYTES) // workers)
        tiling = plan_tiling(m, n, k, memory_limit=share)
    workers = min(workers, len(tiling.tiles(m, n)))
    device = _device(a, b)

    step = max(1, m // precisions.sample_rows(m))
    rows = slice(0, step * precisions.sample_rows(m), step)
    start = (n - precisions.sample_rows(n)) // 2
    cols = slice(start, start + precisions.sample_rows(n))

    def sample(p: str) -> torch.Tensor:
        sa, sb = a[rows, :], b[:, cols]
        out = torch.empty(sa.shape[0], sb.shape[1], device=device)
        _run(sa, sb, p, tiling, device, _tensor_writer(out), workers=1)
        return out

    choice = precisions.choose(sample, m * n * k, precision=precision, tol=tol, device=str(device))
    return Plan(choice, tiling, max(1, workers))


def matmul(
    a,
    b,
    *,
    precision: str = "auto",
    tol: float = 1e-2,
    block: int | None = None,
    out=None,
    memory_limit: int | None = None,
    threads: int | None = None,
):
    """The product a @ b, in blocks, in the fastest precision that keeps `tol`.

    Args:
        a: m x k, a numpy array, a numpy memmap (any size) or a torch tensor.
        b: k x n, the same kinds.
        precision: "fp32", "bf16", "int8", or "auto": the fastest of them whose
            relative error on a sample of the output stays under `tol`. The
            choice is logged at INFO; `plan()` returns it without computing.
        tol: the largest relative error auto accepts (Frobenius norm).
        block: square tiles of this size instead of sizing them from memory.
        out: an m x n array, memmap or tensor to write the result into.
        memory_limit: bytes of extra memory the product may hold at once;
            an eighth of the machine's memory by default.
        threads: tiles computed at once. By default one per core when there
            are several tiles of at least 256^3 multiply-adds and the limit
            has room for each thread; otherwise one, and torch's own threads
            work inside each tile.

    Returns:
        `out` if given; else a torch tensor if either operand is one (on its
        device), else a float32 numpy array.

    Raises:
        ConfigError: operands of other kinds, ranks or mismatched shapes; an
            `out` of the wrong shape; an unknown precision; a limit too small.
    """
    how = plan(
        a,
        b,
        precision=precision,
        tol=tol,
        block=block,
        memory_limit=memory_limit,
        threads=threads,
    )
    m, n = a.shape[0], b.shape[1]
    device = _device(a, b)
    result, write = _output(out, m, n, a, b, device)
    logger.info(
        "matmul %dx%dx%d: %s, tiles %s on %d threads",
        m,
        a.shape[1],
        n,
        how.choice.reason,
        how.tiling,
        how.threads,
    )
    _run(a, b, how.choice.precision, how.tiling, device, write, workers=how.threads)
    return result


def _workers(tiling: Tiling, m: int, n: int, memory_limit: int) -> int:
    tiles = len(tiling.tiles(m, n))
    if tiles < 2 or tiling.bm * tiling.bn * tiling.bk < _POOL_MIN_TILE_WORK:
        return 1
    workers = min(tiles, hardware.detect().cores)
    if workers < 2 or memory_limit < 4 * workers * _THREAD_RESERVE_BYTES:
        return 1
    return workers if _pool_pays(tiling.bm, tiling.bn, tiling.bk, workers) else 1


@functools.cache
def _pool_pays(bm: int, bn: int, bk: int, workers: int) -> bool:
    """Whether `workers` threads run tiles of this size faster than torch's threads alone.

    Measured once per tile size, since it depends on the machine: on 2 cores
    the two were within a tenth of each other at every size tried
    (docs/benchmarks.md), so either answer costs little there.
    """
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(bm, bk, generator=generator)
    b = torch.randn(bk, bn, generator=generator)
    # enough products for about 2^31 multiply-adds per timing, so that the
    # timing is not noise on small tiles
    count = max(2 * workers, (1 << 31) // (bm * bn * bk) // workers * workers)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda _: torch.mm(a, b), range(workers)))  # start the threads
        best = {"in order": float("inf"), "pool": float("inf")}
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(count):
                torch.mm(a, b)
            best["in order"] = min(best["in order"], time.perf_counter() - start)
            start = time.perf_counter()
            list(pool.map(lambda _: torch.mm(a, b), range(count)))
            best["pool"] = min(best["pool"], time.perf_counter() - start)
    logger.debug("tiles %dx%dx%d: %s", bm, bn, bk, best)
    # the pool must win clearly: its threads cost memory, and a tie is noise
    return best["pool"] < 0.9 * best["in order"]


def _output(out, m: int, n: int, a, b, device: torch.device):
    """The object to return and a function that writes one tile of it."""
    if out is None:
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            out = torch.empty(m, n, device=device)
        else:
            out = np.empty((m, n), dtype=np.float32)
    if not isinstance(out, np.ndarray | torch.Tensor):
        raise ConfigError(f"out is a {type(out).__name__}; pass a numpy array, memmap or tensor")
    if tuple(out.shape) != (m, n):
        raise ConfigError(f"out has shape {tuple(out.shape)}; the product is {m}x{n}")
    if isinstance(out, torch.Tensor):
        return out, _tensor_writer(out)

    def write(rows: slice, cols: slice, tile: torch.Tensor) -> None:
        out[rows, cols] = tile.cpu().numpy()
        release(out)

    return out, write


def _tensor_writer(out: torch.Tensor) -> Callable[[slice, slice, torch.Tensor], None]:
    def write(rows: slice, cols: slice, tile: torch.Tensor) -> None:
        out[rows, cols].copy_(tile)

    return write


def _run(a, b, precision: str, tiling: Tiling, device, write, *, workers: int) -> None:
    """Compute every tile of a @ b and hand each to `write`."""
    m, k = a.shape
    n = b.shape[1]
    slices = tiling.slices(k)

    def tile(rows: slice, cols: slice) -> None:
        total = None
        for shared in slices:
            part = precisions.product(
                read_block(a, rows, shared, device), read_block(b, shared, cols, device), precision
            )
            total = part if total is None else total.add_(part)
        if total is None:  # a shared dimension of zero: the product is all zeros
            total = torch.zeros(rows.stop - rows.start, cols.stop - cols.start, device=device)
        write(rows, cols, total)

    tiles = tiling.tiles(m, n)
    if workers == 1:
        for rows, cols in tiles:
            tile(rows, cols)
        return
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="matmul") as pool:
        for done in [pool.submit(tile, rows, cols) for rows, cols in tiles]:
            done.result()
