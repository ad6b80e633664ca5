"""A product of memmaps four times larger than the memory limit stays under that limit."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np

LIMIT = 32 << 20

# Run in a fresh process, so that the peak resident memory is this product's.
# /proc/self/clear_refs resets the peak after torch and the kernels have
# warmed up: what is measured is what the product itself holds.
_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from quanta.kernels import matmul

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    directory, limit = sys.argv[1], int(sys.argv[2])
    a = np.load(directory + "/a.npy", mmap_mode="r")
    b = np.load(directory + "/b.npy", mmap_mode="r")
    shape = (a.shape[0], b.shape[1])
    out = np.lib.format.open_memmap(directory + "/c.npy", "w+", np.float32, shape)
    # first use: each precision's kernels, and auto's one-time speed probe
    warm = np.random.default_rng(0).standard_normal((512, 512), dtype=np.float32)
    for precision in ("fp32", "bf16", "int8", "auto"):
        matmul(warm, warm, precision=precision)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS")
    matmul(a, b, out=out, memory_limit=limit)
    out.flush()
    print(json.dumps({"before": before, "peak": status("VmHWM")}))
    """
)


def test_memmap_product_stays_under_the_memory_limit(tmp_path):
    rng = np.random.default_rng(0)
    # each operand is four times the limit: 128 MiB
    m, k, n = 2048, 16384, 2048
    for name, shape in (("a", (m, k)), ("b", (k, n))):
        array = np.lib.format.open_memmap(tmp_path / f"{name}.npy", "w+", np.float32, shape)
        for start in range(0, shape[0], 1024):
            array[start : start + 1024] = rng.standard_normal(
                (min(1024, shape[0] - start), shape[1]), dtype=np.float32
            )
        array.flush()
        assert array.nbytes == 4 * LIMIT
        del array

    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(tmp_path), str(LIMIT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    memory = json.loads(done.stdout.splitlines()[-1])
    assert memory["peak"] - memory["before"] < LIMIT, memory

    # and the product is right: check a few rows against numpy
    a = np.load(tmp_path / "a.npy", mmap_mode="r")
    b = np.load(tmp_path / "b.npy", mmap_mode="r")
    c = np.load(tmp_path / "c.npy", mmap_mode="r")
    reference = np.asarray(a[::256], np.float64) @ np.asarray(b, np.float64)
    error = np.linalg.norm(c[::256] - reference) / np.linalg.norm(reference)
    assert error < 1e-2
