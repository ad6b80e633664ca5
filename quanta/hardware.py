"""What this machine offers for matrix work: cores, vector extensions, GPUs.

The answer is read once from the operating system and cached. quanta uses it to
pick a precision (bf16 only where the CPU computes it natively) and to size
thread pools. The CPU is read from /proc without importing torch, so that the
gateway, which sizes the worker pool, stays free of it; GPUs are asked of torch
separately, by `cuda_devices()`.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

__all__ = ["Hardware", "cuda_devices", "detect"]

# CPU flags as /proc/cpuinfo spells them, under the names quanta reports.
_FLAGS = {
    "avx512f": "avx512f",
    "avx512_bf16": "avx512_bf16",
    "avx512_vnni": "avx512_vnni",
    "amx_tile": "amx_tile",
    "amx_bf16": "amx_bf16",
    "amx_int8": "amx_int8",
}


@dataclass(frozen=True)
class Hardware:
    """A snapshot of the machine's compute resources."""

    cores: int
    cpu_model: str
    avx512f: bool
    avx512_bf16: bool
    avx512_vnni: bool
    amx_tile: bool
    amx_bf16: bool
    amx_int8: bool

    @property
    def amx(self) -> bool:
        """Whether the CPU has AMX tiles with bf16 and int8 units."""
        return self.amx_tile and self.amx_bf16 and self.amx_int8

    @property
    def native_bf16(self) -> bool:
        """Whether bf16 matrix work runs in hardware (AMX or AVX512-BF16)."""
        return self.amx_bf16 or self.avx512_bf16

    def describe(self) -> str:
        """One line: the model, the cores, the fast paths present, and any GPU."""
        paths = [name for name in _FLAGS if getattr(self, name)]
        gpus = cuda_devices()
        gpus = f", CUDA: {', '.join(gpus)}" if gpus else ", no CUDA device"
        return f"{self.cpu_model}, {self.cores} cores, {' '.join(paths) or 'no AVX-512'}{gpus}"


def _usable_cores() -> int:
    # The affinity mask, not os.cpu_count(): containers often pin a process to
    # fewer cores than the host has.
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _cpuinfo() -> tuple[str, set[str]]:
    model, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    model = value.strip()
                elif key == "flags":
                    flags = set(value.split())
                if flags and model != "unknown CPU":
                    break
    except OSError:
        pass
    return model, flags


@functools.cache
def cuda_devices() -> tuple[str, ...]:
    """The names of the CUDA devices torch can use; empty without any."""
    try:
        import torch
    except ImportError:
        return ()
    if not torch.cuda.is_available():
        return ()
    return tuple(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))


@functools.cache
def detect() -> Hardware:
    """Describe this machine; the result is computed once and cached.

    Returns:
        A `Hardware` snapshot.

    Example:
        >>> from quanta import hardware
        >>> hardware.detect().cores >= 1
        True
    """
    model, flags = _cpuinfo()
    return Hardware(
        cores=_usable_cores(),
        cpu_model=model,
        **{name: flag in flags for name, flag in _FLAGS.items()},
    )
