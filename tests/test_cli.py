"""The `quanta` command line: flags, QUANTA_* environment defaults, options."""

from __future__ import annotations

import pytest

from quanta.cli import _parse_options, _parser
from quanta.errors import QuantaError


def test_environment_sets_defaults_with_the_flag_types(monkeypatch):
    monkeypatch.setenv("QUANTA_PORT", "9001")
    monkeypatch.setenv("QUANTA_MAX_WAIT_MS", "2.5")
    monkeypatch.setenv("QUANTA_API_KEY", "from-env")
    args = _parser().parse_args(["serve"])
    assert (args.port, args.max_wait_ms, args.api_key) == (9001, 2.5, "from-env")
    assert args.max_batch_size is None and args.model == "builtin:minilm"


def test_flags_override_the_environment(monkeypatch):
    monkeypatch.setenv("QUANTA_PORT", "9001")
    assert _parser().parse_args(["serve", "--port", "7000"]).port == 7000


def test_options_parse_json_values_and_keep_other_text_as_strings():
    options = _parse_options(["delay=0.5", "flag=true", "name=hello", "path=/tmp/x"])
    assert options == {"delay": 0.5, "flag": True, "name": "hello", "path": "/tmp/x"}
    with pytest.raises(QuantaError, match="'novalue'"):
        _parse_options(["novalue"])
