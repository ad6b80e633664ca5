"""The precisions a product can run in, and the measured choice among them.

    fp32   torch.mm in single precision; the reference.
    bf16   both blocks rounded to bfloat16 (8 bits of mantissa), fp32 sums;
           relative error about 3e-3 on Gaussian data.
    int8   each row of A and each column of B scaled to [-127, 127] and
           rounded, multiplied by `torch._int_mm` into int32, scaled back;
           relative error about 1.2e-2 on Gaussian data, far less on data
           whose rows share a sign or a magnitude.

`auto` takes the fastest precision whose relative error, ||C - C_fp32|| /
||C_fp32|| over a sample of the output, stays under `tol`. Which precision is
fastest is measured once per device on a product of a typical tile size,
because it depends on the hardware: int8 and bf16 are several times fp32 on
AMX, bf16 is about twice fp32 with AVX512-BF16, and neither gains without them.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from quanta.errors import ConfigError

__all__ = ["PRECISIONS", "Choice", "product", "relative_error", "speed_order", "choose"]

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "int8")
# Below this much work (multiply-adds) a product runs in fp32: the sample
# that auto needs would cost more than the fast path could save.
_AUTO_MIN_WORK = 1 << 26
# The sample auto compares: up to this many rows of A and columns of B.
_SAMPLE = 256
# The product timed to rank the precisions of a device, and its rounds.
_PROBE = 512
_PROBE_ROUNDS = 7


def _int8_rows(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes of `x` with one scale per slice along `dim`."""
    # aminmax and an in-place round keep the temporaries to one fp32 copy
    low, high = torch.aminmax(x, dim=dim, keepdim=True)
    scale = torch.maximum(-low, high).clamp_(min=1e-30) / 127
    return x.div(scale).round_().to(torch.int8), scale


def _int8_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    qa, sa = _int8_rows(a, 1)
    qb, sb = _int8_rows(b, 0)
    return torch._int_mm(qa, qb).float().mul_(sa).mul_(sb)


def _bf16_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.mm(a.bfloat16(), b.bfloat16()).float()


_PRODUCTS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "fp32": torch.mm,
    "bf16": _bf16_product,
    "int8": _int8_product,
}


def product(a: torch.Tensor, b: torch.Tensor, precision: str) -> torch.Tensor:
    """The fp32 product of two fp32 blocks, computed in `precision`."""
    if precision == "int8" and a.device.type == "cuda" and not _cuda_int8_fits(a, b):
        # NOTE: CUDA's int8 kernel needs more than 16 rows and sizes that are
        # multiples of 8; other blocks fall back to bf16.
        precision = "bf16"
    return _PRODUCTS[precision](a, b)


def _cuda_int8_fits(a: torch.Tensor, b: torch.Tensor) -> bool:
    m, k = a.shape
    return m > 16 and k % 8 == 0 and b.shape[1] % 8 == 0


def relative_error(candidate: torch.Tensor, reference: torch.Tensor) -> float:
    """||candidate - reference|| / ||reference|| in the Frobenius norm; 0 for a zero reference."""
    norm = float(torch.linalg.vector_norm(reference))
    if norm == 0.0:
        return float(torch.linalg.vector_norm(candidate))
    return float(torch.linalg.vector_norm(candidate - reference)) / norm


@functools.cache
def speed_order(device: str) -> tuple[str, ...]:
    """The precisions from fastest to slowest on `device`, timed on one square product.

    The precisions take turns for several rounds and each keeps its best
    round, so a burst of other load on a shared machine falls on all alike.
    """
    torch_device = torch.device(device)
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(_PROBE, _PROBE, generator=generator).to(torch_device)
    b = torch.randn(_PROBE, _PROBE, generator=generator).to(torch_device)
    for precision in PRECISIONS:
        product(a, b, precision)  # the first call of a kernel pays its setup
    seconds = dict.fromkeys(PRECISIONS, float("inf"))
    for _ in range(_PROBE_ROUNDS):
        for precision in PRECISIONS:
            start = time.perf_counter()
            product(a, b, precision)
            if torch_device.type == "cuda":
                torch.cuda.synchronize()
            seconds[precision] = min(seconds[precision], time.perf_counter() - start)
    order = tuple(sorted(PRECISIONS, key=seconds.__getitem__))
    timings = {p: f"{s * 1e3:.2f} ms" for p, s in seconds.items()}
    logger.debug("precision speed on %s: %s", device, timings)
    return order


@dataclass(frozen=True)
class Choice:
    """The precision a product runs in, and why.

    Attributes:
        precision: the one taken.
        errors: the sampled relative error of each precision tried.
        reason: one line for logs and reports.
    """

    precision: str
    errors: dict[str, float] = field(default_factory=dict)
    reason: str = ""


def choose(
    sample: Callable[[str], torch.Tensor], work: int, *, precision: str, tol: float, device: str
) -> Choice:
    """Resolve `precision` ("auto" or one of PRECISIONS) for a product of `work` multiply-adds.

    Args:
        sample: computes the same sample of the output in a given precision.
        tol: the largest relative error auto accepts.

    Raises:
        ConfigError: an unknown precision, or a tolerance that is not positive.
    """
    if precision in PRECISIONS:
        return Choice(precision, reason=f"{precision}, as asked")
    if precision != "auto":
        raise ConfigError(f"precision={precision!r} is not 'auto' or one of {PRECISIONS}")
    if not tol > 0:
        raise ConfigError(f"tol={tol!r} must be a positive relative error, e.g. 1e-2")
    if work < _AUTO_MIN_WORK:
        return Choice("fp32", reason=f"fp32: {work} multiply-adds are too few to gain")

    reference = sample("fp32")
    errors = {}
    for candidate in speed_order(device):
        if candidate == "fp32":
            break
        errors[candidate] = relative_error(sample(candidate), reference)
        if errors[candidate] <= tol:
            reason = f"{candidate}: sampled relative error {errors[candidate]:.2e} <= tol {tol:g}"
            return Choice(candidate, errors, reason)
    tried = ", ".join(f"{p} {e:.2e}" for p, e in errors.items()) or "none is faster here"
    return Choice("fp32", errors, f"fp32: no faster precision within tol {tol:g} ({tried})")


def sample_rows(count: int) -> int:
    """How many rows (or columns) of `count` the auto sample takes."""
    return min(count, _SAMPLE)
