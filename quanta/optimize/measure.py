"""What a candidate costs: latency at a batch size, one layer against another, size on disk.

Baseline and candidate are timed alike: same thread count, eager mode, the
same inputs, under `torch.inference_mode()`, after warm-up runs; the median of
several runs is reported because the machine is shared and noisy.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from quanta.errors import ConfigError

__all__ = ["latency_p50", "compare_forward", "size_on_disk", "state_for_disk"]


def latency_p50(model: nn.Module, task: Any, batch_size: int, *, repeat: int = 15) -> float:
    """Median seconds of one forward pass of `task.example(batch_size)`.

    Args:
        model: the module to time, in eval mode.
        task: an `EmbeddingTask` or `TensorTask` (anything with `example` and `forward`).
        batch_size: inputs per forward pass.
        repeat: timed runs, after three untimed ones.
    """
    batch = task.example(batch_size)
    for _ in range(3):
        task.forward(model, batch)
    seconds = []
    for _ in range(repeat):
        start = time.perf_counter()
        task.forward(model, batch)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def state_for_disk(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state as safetensors stores it: contiguous, with shared tensors once."""
    state, seen = {}, set()
    for name, tensor in model.state_dict().items():
        # Tied weights are one storage under two names; safetensors refuses the duplicate.
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape)
        if key in seen:
            continue
        seen.add(key)
        state[name] = tensor.detach().contiguous()
    return state


def size_on_disk(model: nn.Module) -> int:
    """Bytes of the model's weights written as a safetensors file."""
    with tempfile.TemporaryDirectory(prefix="quanta-size-") as directory:
        path = Path(directory) / "model.safetensors"
        save_file(state_for_disk(model), str(path))
        return path.stat().st_size


def compare_forward(
    base: nn.Module, candidate: nn.Module, x: torch.Tensor, *, repeat: int = 15
) -> tuple[float, float]:
    """Return the median seconds of `base(x)` and of `candidate(x)`, timed in turns.

    The two alternate call by call, so that a burst of load on a shared
    machine slows both alike rather than one of them.

    Raises:
        ConfigError: `repeat` below 1.

    Example:
        >>> base_s, int8_s = compare_forward(linear, Int8Linear.from_linear(linear), x)
    """
    if repeat < 1:
        raise ConfigError(f"repeat={repeat!r} must be at least 1")
    times: tuple[list[float], list[float]] = ([], [])
    with torch.inference_mode():
        for _ in range(3):
            base(x), candidate(x)
        for _ in range(repeat):
            for layer, seconds in zip((base, candidate), times, strict=True):
                start = time.perf_counter()
                layer(x)
                seconds.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])
