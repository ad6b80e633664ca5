"""Optimized models on disk: a directory that `quanta serve --model DIR` loads.

    DIR/
      quanta.json         the manifest: format, dtype, block widths, every replaced layer
      model.safetensors   the weights, int8/int4 codes and scales included
      config.json         the original architecture
      tokenizer.json ...  the original tokenizer files, copied
      recipe.json         the recipe and budget the model was made with
      report.md, report.png

Nothing is pickled: the manifest says how to build empty modules of the right
kinds and shapes, and the weights are loaded into them by name. A layer is
rebuilt from its `spec()` (`Int8Linear`, `Int4Linear`, `Bf16Linear`,
`LowRankLinear`), outer layers before the layers inside them, so a low-rank
layer whose halves went to int8 comes back as it was saved.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from quanta import __version__
from quanta.errors import ModelError
from quanta.models.bert import BertConfig, BertEncoder
from quanta.models.manifest import (
    DTYPES,
    FORMAT,
    MANIFEST,
    WEIGHTS,
    is_artifact,
    read_manifest,
)
from quanta.optimize.lowrank import LowRankLinear
from quanta.optimize.measure import state_for_disk
from quanta.optimize.quantize import LAYERS

__all__ = ["is_artifact", "read_manifest", "save_artifact", "load_artifact", "layer_specs"]

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
)
_BUILDERS = {**{kind: cls.empty for kind, cls in LAYERS.items()}, "lowrank": LowRankLinear.empty}
_REPLACED = (*LAYERS.values(), LowRankLinear)


def layer_specs(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The spec of every replaced layer by module name, outer layers first."""
    return {
        name: module.spec()
        for name, module in model.named_modules()
        if isinstance(module, _REPLACED)
    }


def save_artifact(
    out: str | Path,
    model: BertEncoder,
    *,
    source: str | Path,
    dtype: torch.dtype,
    recipe: dict[str, Any],
    quality: dict[str, Any],
) -> Path:
    """Write an optimized encoder as a directory that `load_artifact` reads back.

    Args:
        out: the directory to write; made if missing, files in it replaced.
        model: the optimized `BertEncoder`.
        source: the original model's directory, for its config and tokenizer files.
        dtype: the dtype of the layers that stayed dense (float32 or bfloat16).
        recipe: the recipe and budget, as JSON, kept in recipe.json and the manifest.
        quality: the final metrics, kept in the manifest.

    Returns:
        The directory written.

    Raises:
        ModelError: the model is no `BertEncoder`, or the source lacks its config.
    """
    if not isinstance(model, BertEncoder):
        raise ModelError(
            f"only a BertEncoder is saved as a servable artifact, not {type(model).__name__}; "
            "save another module's state_dict() with safetensors yourself"
        )
    dtype_name = str(dtype).removeprefix("torch.")
    if dtype_name not in DTYPES:
        raise ModelError(f"dtype {dtype} cannot be saved; the dense layers must be one of {DTYPES}")
    source, out = Path(source), Path(out)
    if not (source / "config.json").is_file():
        raise ModelError(f"{source / 'config.json'} is missing: the source model has no config")
    out.mkdir(parents=True, exist_ok=True)

    for name in ("config.json", *TOKENIZER_FILES):
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
    save_file(state_for_disk(model), str(out / WEIGHTS))
    manifest = {
        "format": FORMAT,
        "quanta_version": __version__,
        "architecture": "bert",
        "dtype": dtype_name,
        "shapes": model.shapes(),
        "layers": layer_specs(model),
        "recipe": recipe,
        "quality": quality,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    (out / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
    return out


def load_artifact(directory: str | Path) -> tuple[BertEncoder, dict[str, Any]]:
    """Rebuild an optimized encoder from its directory, in eval mode.

    Returns:
        The encoder and its manifest.

    Raises:
        ModelError: a file is missing or from another format, or the weights do
            not fit the manifest (the message names the file).

    Example:
        >>> encoder, manifest = load_artifact("artifacts/minilm-int8")
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    weights = directory / WEIGHTS
    try:
        # empty modules on the meta device cost nothing; the load assigns real tensors
        with torch.device("meta"):
            config = BertConfig.from_json(directory / "config.json")
            model = BertEncoder(config, shapes=manifest["shapes"]).to(
                getattr(torch, manifest["dtype"])
            )
            for name, spec in manifest["layers"].items():
                model.set_submodule(name, _BUILDERS[spec["kind"]](spec))
        model.load_state_dict(load_file(str(weights)), strict=True, assign=True)
    except (KeyError, TypeError, ValueError, RuntimeError, OSError) as exc:
        raise ModelError(f"{weights} does not fit {directory / MANIFEST}: {exc}") from exc
    left = [name for name, t in model.state_dict().items() if t.is_meta]
    if left:
        raise ModelError(f"{weights} lacks {left[:5]}, which {directory / MANIFEST} needs")
    return model.eval(), manifest
