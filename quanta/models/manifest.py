"""The manifest of an optimized model directory, read without torch.

`quanta optimize --out DIR` writes `DIR/quanta.json` next to the weights; it
says how the model was changed (dtype, block widths, every replaced layer)
so that a loader can rebuild it without pickle. The gateway checks a
directory with `read_manifest` before any worker starts, so a bad artifact
fails at start-up with the name of the file at fault.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from quanta import __version__
from quanta.errors import ModelError

__all__ = ["FORMAT", "MANIFEST", "WEIGHTS", "DTYPES", "is_artifact", "read_manifest"]

# Bumped whenever a saved artifact would load wrongly into the code that reads it.
FORMAT = 1
MANIFEST = "quanta.json"
WEIGHTS = "model.safetensors"
# The files a directory must hold before anything in it is read.
REQUIRED = (MANIFEST, WEIGHTS, "config.json", "tokenizer.json")
DTYPES = ("float32", "bfloat16")


def is_artifact(directory: str | Path) -> bool:
    """Whether `directory` holds a quanta manifest (it may still be incomplete)."""
    return (Path(directory) / MANIFEST).is_file()


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The checked manifest of an artifact, before any weight is read.

    Raises:
        ModelError: a required file is missing, the manifest is unreadable, or it
            was written in another format than this quanta reads.

    Example:
        >>> read_manifest("artifacts/minilm-int8")["recipe"]["name"]
        'int8'
    """
    directory = Path(directory)
    for name in REQUIRED:
        if not (directory / name).is_file():
            raise ModelError(
                f"{directory / name} is missing: the artifact is incomplete; "
                "write it again with `quanta optimize --out`"
            )
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path} is not readable JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        version = manifest.get("quanta_version") if isinstance(manifest, dict) else None
        raise ModelError(
            f"{path} is artifact format {found!r} (written by quanta {version}); this quanta "
            f"{__version__} reads format {FORMAT}: optimize the model again with this version"
        )
    if manifest.get("architecture") != "bert" or manifest.get("dtype") not in DTYPES:
        raise ModelError(
            f"{path} describes architecture {manifest.get('architecture')!r} in dtype "
            f"{manifest.get('dtype')!r}; this quanta serves bert in {DTYPES}"
        )
    for key in ("shapes", "layers"):
        if not isinstance(manifest.get(key), dict):
            raise ModelError(f"{path} has no {key!r} map; write the artifact again")
    return manifest
