"""Server configuration: invalid fields and the automatic worker count."""

from __future__ import annotations

import pytest

from quanta import hardware
from quanta.errors import ConfigError
from quanta.serving.config import ServerConfig


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
