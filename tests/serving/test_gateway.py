"""The gateway process stays light: the model and torch live in the workers."""

from __future__ import annotations

import subprocess
import sys


def heavy_imports_after(code: str) -> str:
    """Run `code` in a fresh interpreter; print which of torch and transformers it imported."""
    report = "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    result = subprocess.run(
        [sys.executable, "-c", "import sys\n" + code + report],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return result.stdout.strip()


def test_building_the_gateway_imports_no_torch():
    code = (
        "from quanta.serving import ServerConfig, create_app\n"
        "config = ServerConfig()\n"
        "create_app(config)\n"
        "assert config.worker_count >= 1\n"
    )
    assert heavy_imports_after(code) == "[]"


def test_the_search_gateway_imports_no_torch(tmp_path):
    # The gateway reads the collection and its cache record, never the vectors:
    # a record and vectors of the right shape are enough to build it.
    import numpy as np

    from quanta.models.collection import VectorCache, read_collection
    from quanta.models.index import model_key

    index = tmp_path / "notes.txt"
    index.write_text("one text\nanother text\n")
    collection = read_collection(index)
    cache = VectorCache.beside(index)
    np.save(cache.vectors, np.zeros((2, 384), np.float32))
    cache.write_record(collection, model_key("builtin:minilm", "auto"), 384)
    code = (
        "from quanta.serving import ServerConfig, create_app\n"
        "config = ServerConfig(service='quanta.models.search:MiniLMSearch', "
        f"options={{'index': {str(index)!r}}})\n"
        "app = create_app(config)\n"
        "assert any(route.path == '/v1/search' for route in app.routes)\n"
    )
    assert heavy_imports_after(code) == "[]"
