"""Corpus, recipes and tasks: what candidates are judged on, with the real encoder."""

from __future__ import annotations

import copy

import pytest
import torch

from quanta.errors import ConfigError
from quanta.models.minilm import _tokenizer
from quanta.optimize.corpus import load_corpus
from quanta.optimize.measure import latency_p50, size_on_disk
from quanta.optimize.recipe import parse_recipe
from quanta.optimize.tasks import EmbeddingTask, TensorTask, recall_at_k


def test_corpus_holds_out_its_retrieval_pairs_from_calibration():
    corpus = load_corpus(calibration=200, pairs=200)
    assert len(corpus.calibration) == 200 and len(corpus.queries) == 200
    held_out = {q + " " + d for q, d in zip(corpus.queries, corpus.documents, strict=True)}
    assert not held_out & set(corpus.calibration)
    pairs = zip(corpus.queries, corpus.documents, strict=True)
    assert all(q.endswith(".") and len(d) >= 40 for q, d in pairs)


def test_recall_at_k_counts_a_query_whose_document_is_near():
    documents = torch.eye(4)
    queries = torch.tensor([[1.0, 0, 0, 0], [0, 0, 1.0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
    assert recall_at_k(queries, documents, k=1) == 0.75
    assert recall_at_k(queries, documents, k=4) == 1.0


@pytest.mark.parametrize(
    ("name", "kinds"),
    [("int8", ["int8"]), ("prune+int8", ["prune", "int8"]), ("lowrank", ["lowrank"])],
)
def test_recipes_parse_into_steps(name, kinds):
    recipe = parse_recipe(name)
    assert [s.kind for s in recipe.steps] == kinds
    assert recipe.steps[-1].share == 1.0


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("int9", "unknown step 'int9'"),
        ("int8+int4", "2 precisions"),
        ("int8+prune", "precision comes last"),
        ("", "is empty"),
        ("prune+prune", "twice"),
    ],
)
def test_bad_recipes_are_config_errors_naming_the_fault(name, shown):
    with pytest.raises(ConfigError, match=shown):
        parse_recipe(name)


def test_embedding_task_scores_the_original_perfectly_and_bf16_closely(
    minilm_dir, encoder, small_corpus
):
    task = EmbeddingTask(_tokenizer(minilm_dir, pad=True), small_corpus)
    task.prepare(encoder)

    same = task.evaluate(encoder)
    assert same.loss == pytest.approx(0.0, abs=1e-6)
    # a real retrieval task: the encoder finds most documents from their first sentence
    assert same.metrics["recall_at_10"] > 0.6

    bf16 = task.evaluate(copy.deepcopy(encoder).to(torch.bfloat16))
    assert 0 < bf16.loss < 1e-3
    assert bf16.metrics["min_cosine"] > 0.99


def test_tensor_task_loss_is_the_accuracy_drop(digits, digits_mlp):
    _, _, x_test, y_test = digits
    task = TensorTask(x_test[:200], evaluation=x_test[200:], labels=y_test[200:])
    task.prepare(digits_mlp)
    assert task.evaluate(digits_mlp).metrics["accuracy"] > 0.9

    # Zeroing the last layer's weights leaves only its bias: accuracy collapses.
    broken = copy.deepcopy(digits_mlp)
    broken[-1].weight.data.zero_()
    quality = task.evaluate(broken)
    assert quality.loss == pytest.approx(quality.metrics["accuracy_drop"]) and quality.loss > 0.5


def test_tensor_task_rejects_labels_that_do_not_match(digits):
    _, _, x_test, y_test = digits
    with pytest.raises(ConfigError, match="labels has 10 rows but evaluation has"):
        TensorTask(x_test, evaluation=x_test, labels=y_test[:10])


def test_bf16_weights_take_half_the_disk_and_time_is_measured(minilm_dir, encoder, small_corpus):
    task = EmbeddingTask(_tokenizer(minilm_dir, pad=True), small_corpus)
    half = copy.deepcopy(encoder).to(torch.bfloat16)
    assert size_on_disk(half) == pytest.approx(size_on_disk(encoder) / 2, rel=0.01)
    assert latency_p50(encoder, task, 1, repeat=3) > 0
    with pytest.raises(ConfigError, match="batch_size 33"):
        task.example(33)
