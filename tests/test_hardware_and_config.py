"""Machine detection and server configuration checks."""

from __future__ import annotations

import subprocess
import sys

import pytest

from quanta import hardware
from quanta.errors import ConfigError
from quanta.serving.config import ServerConfig


def test_detect_reads_this_machine():
    info = hardware.detect()
    with open("/proc/cpuinfo") as f:
        flags = f.read()
    assert info.cores >= 1
    assert info.avx512_bf16 == ("avx512_bf16" in flags)
    assert info.amx == ("amx_tile" in flags and "amx_bf16" in flags and "amx_int8" in flags)
    assert hardware.detect() is info  # cached


def test_quanta_info_prints_the_description():
    out = subprocess.run(
        [sys.executable, "-m", "quanta.cli", "info"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert f"{hardware.detect().cores} cores" in out


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("port", 70000),
        ("workers", -1),
        ("max_inputs", 0),
        ("request_timeout_s", 0),
        ("max_batch_size", 0),
        ("api_key", ""),
    ],
)
def test_invalid_config_names_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        ServerConfig(**{field: value})


def test_automatic_workers_take_one_core_each():
    config = ServerConfig()
    assert config.worker_count == hardware.detect().cores
    assert config.worker_threads == 1
    assert ServerConfig(workers=1).worker_threads == hardware.detect().cores
