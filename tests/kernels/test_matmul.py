"""matmul against torch fp32: odd shapes, every precision, memmaps, out=, and bad input."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from quanta.errors import ConfigError
from quanta.kernels import matmul, plan
from quanta.kernels.precision import relative_error

# The documented error of each precision on Gaussian data, with room to spare.
TOLERANCE = {"fp32": 1e-5, "bf16": 1e-2, "int8": 3e-2}
SHAPES = [(1, 1, 1), (7, 13, 5), (97, 101, 103), (1009, 97, 3), (3, 1013, 7), (20011, 5, 2)]


def gaussian(*shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def error(c, a, b) -> float:
    reference = torch.from_numpy(a).double() @ torch.from_numpy(b).double()
    return relative_error(torch.as_tensor(np.asarray(c)).double(), reference)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize(("m", "k", "n"), SHAPES)
def test_every_precision_matches_fp32_within_its_tolerance(precision, m, k, n):
    a, b = gaussian(m, k, seed=1), gaussian(k, n, seed=2)
    c = matmul(a, b, precision=precision)
    assert isinstance(c, np.ndarray) and c.shape == (m, n) and c.dtype == np.float32
    assert error(c, a, b) <= TOLERANCE[precision]


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_tiles_that_cut_every_dimension_give_the_same_product(precision):
    a, b = gaussian(301, 517, seed=3), gaussian(517, 263, seed=4)
    whole = matmul(a, b, precision=precision)
    tiled = matmul(a, b, precision=precision, block=64)
    assert error(tiled, a, b) <= TOLERANCE[precision]
    if precision == "fp32":
        np.testing.assert_allclose(tiled, whole, rtol=1e-4, atol=1e-4)


def test_auto_keeps_tol_and_says_what_it_took(caplog):
    a, b = gaussian(1024, 1024, seed=5), gaussian(1024, 1024, seed=6)
    for tol in (1e-2, 1e-4):
        choice = plan(a, b, tol=tol).choice
        with caplog.at_level(logging.INFO, logger="quanta.kernels.matrix"):
            c = matmul(a, b, tol=tol)
        assert error(c, a, b) <= tol
        assert choice.precision in caplog.records[-1].getMessage()
    # no faster precision keeps 1e-4 on Gaussian data: auto falls back to fp32
    assert plan(a, b, tol=1e-4).choice.precision == "fp32"


def test_auto_runs_a_tiny_product_in_fp32_without_sampling():
    choice = plan(gaussian(8, 8), gaussian(8, 8)).choice
    assert choice.precision == "fp32" and not choice.errors


def test_tensors_in_give_a_tensor_out():
    a, b = torch.from_numpy(gaussian(33, 44)), torch.from_numpy(gaussian(44, 55))
    c = matmul(a, b, precision="fp32")
    assert isinstance(c, torch.Tensor)
    torch.testing.assert_close(c, a @ b, rtol=1e-5, atol=1e-5)


def test_inputs_are_left_unchanged():
    a, b = gaussian(300, 200), gaussian(200, 100)
    before = a.copy(), b.copy()
    for precision in ("fp32", "bf16", "int8"):
        matmul(a, b, precision=precision, block=64)
    np.testing.assert_array_equal(a, before[0])
    np.testing.assert_array_equal(b, before[1])


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_out_receives_the_product(kind):
    a, b = gaussian(129, 65), gaussian(65, 257)
    out = (
        np.full((129, 257), np.nan, np.float32) if kind == "numpy" else torch.full((129, 257), 7.0)
    )
    result = matmul(a, b, out=out, precision="fp32", block=64)
    assert result is out
    np.testing.assert_allclose(np.asarray(out), a @ b, rtol=1e-4, atol=1e-4)


def test_memmaps_in_and_out(tmp_path):
    a_data, b_data = gaussian(700, 300, seed=7), gaussian(300, 500, seed=8)
    a = np.lib.format.open_memmap(
        tmp_path / "a.npy", mode="w+", dtype=np.float32, shape=a_data.shape
    )
    a[:] = a_data
    b = np.memmap(tmp_path / "b.f32", mode="w+", dtype=np.float32, shape=b_data.shape)
    b[:] = b_data
    a.flush(), b.flush()
    a_read = np.load(tmp_path / "a.npy", mmap_mode="r")
    out = np.memmap(tmp_path / "c.f32", mode="w+", dtype=np.float32, shape=(700, 500))
    matmul(a_read, b, out=out, precision="fp32", block=128)
    out.flush()
    written = np.fromfile(tmp_path / "c.f32", dtype=np.float32).reshape(700, 500)
    np.testing.assert_allclose(written, a_data @ b_data, rtol=1e-4, atol=1e-4)


def test_a_zero_shared_dimension_gives_zeros():
    c = matmul(np.zeros((3, 0), np.float32), np.zeros((0, 4), np.float32))
    np.testing.assert_array_equal(c, np.zeros((3, 4)))


@pytest.mark.parametrize(
    ("a", "b", "kwargs", "message"),
    [
        (np.ones((3, 4)), np.ones((5, 6)), {}, "a's columns must equal b's rows"),
        (np.ones((2, 3, 4)), np.ones((4, 2)), {}, "pass a 2-D matrix"),
        ([[1.0]], np.ones((1, 1)), {}, "pass a numpy array"),
        (np.ones((2, 2)), np.ones((2, 2)), {"precision": "fp8"}, "'fp8' is not 'auto'"),
        (np.ones((2, 2)), np.ones((2, 2)), {"out": np.ones((3, 3))}, "out has shape (3, 3)"),
        (np.ones((256, 256)), np.ones((256, 256)), {"memory_limit": 1000}, "raise it to"),
        (np.ones((2, 2)), np.ones((2, 2)), {"block": 0}, "block=0"),
        (np.ones((512, 512)), np.ones((512, 512)), {"tol": 0}, "tol=0"),
    ],
)
def test_bad_input_is_refused_with_the_value_and_the_fix(a, b, kwargs, message):
    with pytest.raises(ConfigError) as caught:
        matmul(a, b, **kwargs)
    assert message in str(caught.value)
