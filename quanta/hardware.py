"""What this machine offers for matrix work: cores, caches, memory, vector extensions, GPUs.

The answer is read once from the operating system and cached. quanta uses it to
pick a precision (bf16 only where the CPU computes it natively) and to size
thread pools. The CPU is read from /proc and /sys without importing torch, so
that the gateway, which sizes the worker pool, stays free of it; GPUs are asked
of torch separately, by `cuda_devices()` and `info()`.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Hardware", "cuda_devices", "detect", "info"]

logger = logging.getLogger(__name__)

# CPU flags as /proc/cpuinfo spells them, under the names quanta reports.
_FLAGS = {
    "avx512f": "avx512f",
    "avx512_bf16": "avx512_bf16",
    "avx512_vnni": "avx512_vnni",
    "amx_tile": "amx_tile",
    "amx_bf16": "amx_bf16",
    "amx_int8": "amx_int8",
}

_CACHE_DIR = Path("/sys/devices/system/cpu/cpu0/cache")
_MEMINFO = Path("/proc/meminfo")
# cgroup v2 as a container sees its own limit, then cgroup v1 in the same place.
# NOTE: only the cgroup root is read; a process placed in a child cgroup without
# its own cgroup namespace is reported with its parent's (or the machine's) memory.
_CGROUP_LIMITS = (
    Path("/sys/fs/cgroup/memory.max"),
    Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"),
)
# cgroup v1 writes "no limit" as a number near 2**63; anything this large means that
_NO_LIMIT = 2**62
_SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}


@dataclass(frozen=True)
class Hardware:
    """A snapshot of the machine's compute resources.

    Cache sizes are those cpu0 sees, 0 when the kernel does not say: L1d and
    L2 are usually one core's, L3 the share of the socket (or core complex).
    `memory_bytes` is the RAM this process may use: the cgroup limit where it
    is below the machine's total.
    """

    cores: int
    cpu_model: str
    avx512f: bool
    avx512_bf16: bool
    avx512_vnni: bool
    amx_tile: bool
    amx_bf16: bool
    amx_int8: bool
    l1d_bytes: int = 0
    l2_bytes: int = 0
    l3_bytes: int = 0
    memory_bytes: int = 0

    @property
    def amx(self) -> bool:
        """Whether the CPU has AMX tiles with bf16 and int8 units."""
        return self.amx_tile and self.amx_bf16 and self.amx_int8

    @property
    def native_bf16(self) -> bool:
        """Whether bf16 matrix work runs in hardware (AMX or AVX512-BF16)."""
        return self.amx_bf16 or self.avx512_bf16

    @property
    def fast_paths(self) -> tuple[str, ...]:
        """The matrix units present, by the names vendors use, fastest first.

        Example:
            >>> Hardware(2, "x", True, True, True, False, False, False).fast_paths
            ('AVX512-BF16', 'VNNI')
        """
        paths = []
        amx = [kind for kind in ("bf16", "int8") if self.amx_tile and getattr(self, f"amx_{kind}")]
        if amx:
            paths.append("AMX " + "/".join(amx))
        if self.avx512_bf16:
            paths.append("AVX512-BF16")
        if self.avx512_vnni:
            paths.append("VNNI")
        return tuple(paths)

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


def _parse_size(text: str) -> int:
    """Bytes in a sysfs size such as "32K", "1M" or "512"; 0 when it is none."""
    text = text.strip().upper()
    unit = text[-1:] if text[-1:] in _SIZE_UNITS else ""
    number = text[: len(text) - len(unit)]
    if not number.isdigit():
        return 0
    return int(number) * _SIZE_UNITS[unit]


def _cache_sizes(root: Path = _CACHE_DIR) -> dict[str, int]:
    sizes = {"l1d_bytes": 0, "l2_bytes": 0, "l3_bytes": 0}
    for index in sorted(root.glob("index*")):
        try:
            level = (index / "level").read_text().strip()
            kind = (index / "type").read_text().strip()
            size = _parse_size((index / "size").read_text())
        except OSError:
            continue
        # level 1 comes twice, as Data and Instruction; matrix work lives in the data one
        if level == "1" and kind == "Data":
            sizes["l1d_bytes"] = size
        elif level in ("2", "3") and kind != "Instruction":
            sizes[f"l{level}_bytes"] = size
    if not any(sizes.values()):
        logger.debug("no CPU cache sizes under %s; reporting them as 0", root)
    return sizes


def _memory_bytes(meminfo: Path = _MEMINFO, limits: tuple[Path, ...] = _CGROUP_LIMITS) -> int:
    total = 0
    try:
        for line in meminfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key == "MemTotal":
                # the kernel writes "kB" but means KiB
                total = int(value.split()[0]) * 1024
                break
    except (OSError, ValueError, IndexError):
        logger.debug("no MemTotal in %s", meminfo)

    # "max" (v2) or a number near 2**63 (v1) means no limit; either is ignored
    for path in limits:
        try:
            limit = int(path.read_text().strip())
        except (OSError, ValueError):
            continue
        if 0 < limit < _NO_LIMIT and (not total or limit < total):
            total = limit
    return total


def _cuda_properties() -> list[dict]:
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    devices = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        devices.append(
            {
                "name": props.name,
                "memory_bytes": int(props.total_memory),
                "capability": f"{props.major}.{props.minor}",
            }
        )
    return devices


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
    """Describe this machine's CPU and memory; the result is computed once and cached.

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
        **_cache_sizes(),
        memory_bytes=_memory_bytes(),
    )


@functools.cache
def _info() -> dict:
    report = dataclasses.asdict(detect())
    report["fast_paths"] = list(detect().fast_paths)
    report["cuda"] = _cuda_properties()
    return report


def info() -> dict:
    """Everything `detect()` knows, plus the CUDA devices, as a JSON-ready dict.

    The first call imports torch to ask for GPUs, which takes a second or
    two; later calls reuse the answer. Each call returns its own copy, so a
    caller may change it freely.

    Returns:
        The `Hardware` fields by name, `fast_paths` (a list of names such as
        "AVX512-BF16"), and `cuda`: a list of `{"name", "memory_bytes",
        "capability"}` dicts, capability as "8.0"; empty without torch or
        without a CUDA device.

    Example:
        >>> from quanta import hardware
        >>> hardware.info()["cores"] >= 1
        True
    """
    return copy.deepcopy(_info())
