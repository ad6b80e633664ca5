"""A small service for serving tests: two endpoints, and knobs to misbehave."""

from __future__ import annotations

import os
import time

import numpy as np

import quanta


class Toy(quanta.Service):
    name = "toy"

    def __init__(self, *, delay: float = 0.0, gate: str = "", fail_setup: bool = False):
        self.delay = delay
        self.gate = gate
        self.fail_setup = fail_setup

    def setup(self) -> None:
        if self.fail_setup:
            raise RuntimeError("setup failed on purpose")
        # hold the worker in setup until the test creates the gate file
        while self.gate and not os.path.exists(self.gate):
            time.sleep(0.02)

    @quanta.endpoint("/double", max_batch_size=8, max_wait_ms=2)
    def double(self, xs: list) -> list:
        time.sleep(self.delay)
        return [x * 2 for x in xs]

    @double.sizer
    def size(self, xs: list) -> list[int]:
        return [len(str(x)) for x in xs]

    @quanta.endpoint("/batch-sizes", max_batch_size=6, max_wait_ms=100)
    def batch_sizes(self, words: list[str]) -> list[list[int]]:
        """Tell each input the sizes of all the inputs it was batched with."""
        time.sleep(self.delay)
        sizes = sorted(len(w) for w in words)
        return [sizes for _ in words]

    @batch_sizes.sizer
    def word_size(self, words: list[str]) -> list[int]:
        return [len(w) for w in words]

    @quanta.endpoint("/stats", max_batch_size=4, max_wait_ms=1)
    def stats(self, rows: list[list[float]]) -> np.ndarray:
        return np.array([[len(r), sum(r)] for r in rows], dtype=np.float64)
