"""The gateway process stays light: the model and torch live in the workers."""

from __future__ import annotations

import subprocess
import sys


def test_building_the_gateway_imports_no_torch():
    code = (
        "import sys\n"
        "from quanta.serving import ServerConfig, create_app\n"
        "config = ServerConfig()\n"
        "create_app(config)\n"
        "assert config.worker_count >= 1\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip() == "[]"
