"""Machine detection: sysfs cache sizes, memory limits, CPU flags, CUDA, and `quanta info`."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from quanta import hardware
from tests.helpers import ROOT

SYSFS_CACHE = Path("/sys/devices/system/cpu/cpu0/cache")
HAS_SYSFS_CACHE = any(SYSFS_CACHE.glob("index*/size"))


def _quanta(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "quanta.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=120)


def _fake_cache(root: Path, entries: list[tuple[str, str, str]]) -> Path:
    for i, (level, kind, size) in enumerate(entries):
        index = root / f"index{i}"
        index.mkdir(parents=True)
        (index / "level").write_text(f"{level}\n")
        (index / "type").write_text(f"{kind}\n")
        (index / "size").write_text(f"{size}\n")
    return root


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("32K", 32 * 1024),
        ("1024K", 1024 * 1024),
        ("32768K", 32 * 1024 * 1024),
        ("1M", 1024 * 1024),
        ("2G", 2 * 1024**3),
        ("512", 512),
        ("48K\n", 48 * 1024),
        ("", 0),
        ("K", 0),
        ("unknown", 0),
    ],
)
def test_parse_size_reads_sysfs_units(text, expected):
    assert hardware._parse_size(text) == expected


def test_cache_sizes_take_data_and_unified_levels(tmp_path):
    root = _fake_cache(
        tmp_path,
        [
            ("1", "Data", "48K"),
            ("1", "Instruction", "32K"),
            ("2", "Unified", "2048K"),
            ("3", "Unified", "107520K"),
        ],
    )
    assert hardware._cache_sizes(root) == {
        "l1d_bytes": 48 * 1024,
        "l2_bytes": 2 * 1024**2,
        "l3_bytes": 105 * 1024**2,
    }


def test_cache_sizes_are_zero_without_sysfs(tmp_path):
    assert hardware._cache_sizes(tmp_path / "absent") == {
        "l1d_bytes": 0,
        "l2_bytes": 0,
        "l3_bytes": 0,
    }


@pytest.mark.parametrize(
    ("limit", "expected"),
    [
        ("4294967296\n", 4 * 1024**3),  # a cgroup limit below the machine's RAM wins
        ("max\n", 16 * 1024**3),  # cgroup v2: no limit
        ("9223372036854771712\n", 16 * 1024**3),  # cgroup v1: no limit
        ("68719476736\n", 16 * 1024**3),  # a limit above the RAM changes nothing
        (None, 16 * 1024**3),  # no cgroup file at all
    ],
)
def test_memory_bytes_respects_a_smaller_cgroup_limit(tmp_path, limit, expected):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(f"MemTotal:       {16 * 1024**2} kB\nMemFree:        1024 kB\n")
    limit_file = tmp_path / "memory.max"
    if limit is not None:
        limit_file.write_text(limit)
    assert hardware._memory_bytes(meminfo, (limit_file,)) == expected


@pytest.mark.skipif(not HAS_SYSFS_CACHE, reason="this kernel exposes no CPU cache sizes in sysfs")
def test_detect_reads_caches_and_memory_of_this_machine():
    info = hardware.detect()
    with open("/proc/meminfo") as f:
        total_kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
    assert info.cores >= 1
    assert info.l1d_bytes > 0
    assert info.l2_bytes > 0
    assert 0 < info.memory_bytes <= total_kib * 1024
    assert hardware.detect() is info  # cached


def test_detect_flags_agree_with_proc_cpuinfo():
    with open("/proc/cpuinfo") as f:
        flags = set(next(line for line in f if line.startswith("flags")).split(":")[1].split())
    info = hardware.detect()
    for name in ("avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8"):
        assert getattr(info, name) == (name in flags), name
    assert ("AVX512-BF16" in info.fast_paths) == ("avx512_bf16" in flags)
    assert ("VNNI" in info.fast_paths) == ("avx512_vnni" in flags)


def test_fast_paths_name_amx_units_present():
    amx = hardware.Hardware(8, "x", True, True, True, True, True, True)
    assert amx.fast_paths == ("AMX bf16/int8", "AVX512-BF16", "VNNI")
    plain = hardware.Hardware(8, "x", False, False, False, False, False, False)
    assert plain.fast_paths == ()


def test_cuda_properties_describe_each_device(monkeypatch):
    props = types.SimpleNamespace(name="NVIDIA A100", total_memory=40 * 1024**3, major=8, minor=0)
    cuda = types.SimpleNamespace(
        is_available=lambda: True,
        device_count=lambda: 2,
        get_device_properties=lambda i: props,
    )
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=cuda))
    device = {"name": "NVIDIA A100", "memory_bytes": 40 * 1024**3, "capability": "8.0"}
    assert hardware._cuda_properties() == [device, device]


def test_cuda_properties_are_empty_without_torch(monkeypatch):
    # None in sys.modules makes `import torch` raise ImportError
    monkeypatch.setitem(sys.modules, "torch", None)
    assert hardware._cuda_properties() == []


def test_info_returns_a_fresh_copy_each_call():
    first = hardware.info()
    first["cores"] = -1
    first["cuda"].append({"name": "fake"})
    second = hardware.info()
    assert second["cores"] == hardware.detect().cores
    assert {"name": "fake"} not in second["cuda"]


def test_info_cuda_matches_cuda_devices():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    devices = hardware.info()["cuda"]
    assert [d["name"] for d in devices] == list(hardware.cuda_devices())
    assert all(d["memory_bytes"] > 0 and "." in d["capability"] for d in devices)


def test_quanta_info_json_prints_every_field():
    result = _quanta("info", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    expected = {
        "cores",
        "cpu_model",
        "avx512f",
        "avx512_bf16",
        "avx512_vnni",
        "amx_tile",
        "amx_bf16",
        "amx_int8",
        "l1d_bytes",
        "l2_bytes",
        "l3_bytes",
        "memory_bytes",
        "fast_paths",
        "cuda",
    }
    assert expected <= report.keys()
    assert report["cores"] == hardware.detect().cores
    assert report["l2_bytes"] == hardware.detect().l2_bytes
    assert isinstance(report["cuda"], list)


def test_quanta_info_table_shows_human_units():
    result = _quanta("info")
    assert result.returncode == 0, result.stderr
    assert f"{hardware.detect().cores} cores" in result.stdout
    for label in ("L1d cache", "L2 cache", "L3 cache", "memory", "fast paths", "CUDA"):
        assert label in result.stdout
    assert any(unit in result.stdout for unit in ("KiB", "MiB", "GiB"))


def test_import_hardware_leaves_torch_unimported():
    code = "import quanta.hardware, sys; assert 'torch' not in sys.modules, 'torch was imported'"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert result.returncode == 0, result.stderr
