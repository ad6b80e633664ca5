"""Artifacts: an optimized encoder saved and read back exactly; incomplete ones refused."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from quanta.errors import ModelError
from quanta.models.manifest import read_manifest
from quanta.optimize import lowrank, quantize
from quanta.optimize.artifact import load_artifact, save_artifact


@pytest.fixture(scope="module")
def changed(encoder):
    """The built-in encoder with one change of every kind the optimizer makes."""
    model = copy.deepcopy(encoder).to(torch.bfloat16)
    blocks = model.blocks
    fc = lowrank.factorize(encoder.blocks[0].mlp.fc, 64).to(torch.bfloat16)
    fc.down = quantize.Int8Linear.from_linear(fc.down)  # a low-rank layer whose half is int8
    blocks[0].mlp.fc = fc
    blocks[1].attn.qkv = quantize.Int8Linear.from_linear(blocks[1].attn.qkv, smooth=None)
    blocks[2].mlp.proj = quantize.Int4Linear.from_linear(blocks[2].mlp.proj, group_size=64)
    blocks[3].attn.keep_heads_([0, 5, 11])  # pruned: 3 of 12 heads
    return model.eval()


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, changed, minilm_dir):
    out = tmp_path_factory.mktemp("artifact") / "minilm-mixed"
    save_artifact(
        out,
        changed,
        source=minilm_dir,
        dtype=torch.bfloat16,
        recipe={"name": "mixed", "max_loss": 0.01},
        quality={"mean_cosine": 0.99},
    )
    return out


def _embed(model: nn.Module) -> torch.Tensor:
    ids = torch.tensor([[101, 7592, 2088, 102, 0], [101, 2204, 2851, 2000, 102]])
    mask = (ids != 0).long()
    with torch.inference_mode():
        return model(ids, mask).float()


def test_loaded_artifact_computes_exactly_what_was_saved(artifact, changed):
    loaded, manifest = load_artifact(artifact)

    torch.testing.assert_close(_embed(loaded), _embed(changed), rtol=0, atol=0)
    assert manifest["shapes"]["n_head"] == [12, 12, 12, 3, 12, 12]
    assert isinstance(loaded.blocks[0].mlp.fc, lowrank.LowRankLinear)
    assert isinstance(loaded.blocks[0].mlp.fc.down, quantize.Int8Linear)
    assert isinstance(loaded.blocks[2].mlp.proj, quantize.Int4Linear)
    assert loaded.blocks[1].attn.qkv.weight.dtype == torch.int8
    assert loaded.blocks[5].mlp.fc.weight.dtype == torch.bfloat16


def test_artifact_holds_weights_tokenizer_recipe_and_no_pickle(artifact):
    names = {p.name for p in artifact.iterdir()}
    assert {"quanta.json", "model.safetensors", "config.json", "tokenizer.json"} <= names
    assert json.loads((artifact / "recipe.json").read_text())["name"] == "mixed"
    assert not [p for p in artifact.iterdir() if p.suffix in (".pt", ".pth", ".pkl", ".bin")]


def test_missing_file_is_named(artifact, tmp_path):
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        broken = tmp_path / name
        broken.mkdir()
        for path in artifact.iterdir():
            if path.name != name:
                (broken / path.name).write_bytes(path.read_bytes())
        with pytest.raises(ModelError, match=f"{broken / name} is missing"):
            load_artifact(broken)


def test_artifact_of_another_format_names_the_manifest_and_the_version(artifact, tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    for path in artifact.iterdir():
        (old / path.name).write_bytes(path.read_bytes())
    manifest = json.loads((old / "quanta.json").read_text())
    (old / "quanta.json").write_text(
        json.dumps({**manifest, "format": 0, "quanta_version": "0.0.1"})
    )

    with pytest.raises(
        ModelError, match=r"quanta\.json is artifact format 0 \(written by quanta 0\.0\.1\)"
    ):
        read_manifest(old)


def test_weights_that_do_not_fit_the_manifest_name_the_weights_file(artifact, tmp_path, minilm_dir):
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    for path in artifact.iterdir():
        (wrong / path.name).write_bytes(path.read_bytes())
    # the original fp32 weights under the optimized model's manifest
    (wrong / "model.safetensors").write_bytes((minilm_dir / "model.safetensors").read_bytes())

    with pytest.raises(ModelError, match=r"model\.safetensors does not fit .*quanta\.json"):
        load_artifact(wrong)


def test_only_an_encoder_is_saved_as_a_servable_artifact(tmp_path, minilm_dir):
    with pytest.raises(ModelError, match="only a BertEncoder"):
        save_artifact(
            tmp_path, nn.Sequential(nn.Linear(4, 4)), source=minilm_dir,
            dtype=torch.float32, recipe={}, quality={},
        )  # fmt: skip
