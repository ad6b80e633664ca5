"""What the optimizer did and why: one decision per change tried, and the candidates measured."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Decision", "Candidate"]


@dataclass(frozen=True)
class Decision:
    """One change tried on one layer: kept or not, and why.

    Args:
        layer: the module's name in the model, e.g. `blocks.0.mlp.fc`.
        change: what was tried, e.g. `int8`, `prune 25% of neurons`, `rank 96`.
        kept: whether the change stayed in the model.
        reason: why, in words a user can act on.
        loss: the whole model's loss with the change, where it was measured.
    """

    layer: str
    change: str
    kept: bool
    reason: str
    loss: float | None = None


@dataclass(frozen=True)
class Candidate:
    """A whole model the optimizer measured: its quality and latency."""

    label: str
    loss: float
    metrics: dict
    latency_s: dict
    size_bytes: int
