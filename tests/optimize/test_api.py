"""`quanta.optimize(model, recipe, calibration=...)`: the call users make, and its refusals."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import quanta
from quanta.errors import ConfigError, OptimizeError
from quanta.optimize.corpus import docstring_paragraphs
from quanta.optimize.prune import parameter_count


def test_digits_classifier_keeps_its_accuracy_within_the_budget(digits, digits_mlp):
    x, _, x_test, y_test = digits
    result = quanta.optimize(
        digits_mlp, "int8", calibration=x, evaluation=x_test, labels=y_test, max_loss=0.01
    )

    assert result.quality.metrics["accuracy_drop"] <= 0.01
    assert result.quality.metrics["accuracy"] > 0.9
    # every Linear got a decision, kept or not, with a reason
    decided = {d.layer for d in result.decisions}
    assert {"0", "2", "4"} <= decided or "*" in decided
    assert all(d.reason for d in result.decisions)
    assert isinstance(digits_mlp[0], nn.Linear), "the caller's model must not change"


def test_text_calibration_optimizes_the_encoder_judged_on_held_out_docstrings(encoder):
    texts = docstring_paragraphs()[:16]
    result = quanta.optimize(encoder, "bf16", calibration=texts, max_loss=0.001, pairs=48)

    assert result.dtype == torch.bfloat16
    assert result.quality.metrics["mean_cosine"] >= 0.999
    assert result.quality.metrics["recall_at_10_drop"] <= 0.01
    assert next(encoder.parameters()).dtype == torch.float32


def test_a_model_without_linear_layers_is_refused_with_the_reason():
    model = nn.Sequential(nn.Conv1d(1, 1, 3), nn.ReLU())
    with pytest.raises(OptimizeError, match="Sequential has no nn.Linear layer"):
        quanta.optimize(model, "int8", calibration=torch.randn(8, 1, 16))


def test_a_budget_no_change_meets_lists_the_most_sensitive_layers(digits, digits_mlp):
    x, _, _, _ = digits
    # the cosine of the outputs: every factorization moves it, so nothing fits 1e-9
    with pytest.raises(OptimizeError) as caught:
        quanta.optimize(digits_mlp, "lowrank", calibration=x, max_loss=1e-9)

    message = str(caught.value)
    assert "no change of recipe 'lowrank' fits max_loss 1e-09" in message
    assert "most sensitive layers: " in message and "loss " in message
    assert "the smallest loss of one change was " in message


@pytest.mark.parametrize(
    ("calibration", "shown"),
    [([], "[]"), (["text", 3], "['text', 3]"), ("one text", "'one text'")],
)
def test_calibration_that_is_neither_texts_nor_a_tensor_is_a_config_error(calibration, shown):
    with pytest.raises(ConfigError, match=re.escape(f"calibration {shown}")):
        quanta.optimize(nn.Linear(2, 2), "int8", calibration=calibration)


def test_unknown_recipe_and_negative_budget_are_config_errors(digits_mlp):
    x = torch.rand(16, 64)
    with pytest.raises(ConfigError, match="unknown step 'int3'"):
        quanta.optimize(digits_mlp, "int3", calibration=x)
    with pytest.raises(ConfigError, match="max_loss -1"):
        quanta.optimize(digits_mlp, "int8", calibration=x, max_loss=-1)


def test_pruning_with_a_time_budget_keeps_a_deeper_cut_recovered_by_distillation(digits):
    x, y, x_test, _ = digits
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    optimizer = torch.optim.Adam(mlp.parameters(), lr=3e-3)
    for _ in range(200):
        optimizer.zero_grad()
        nn.functional.cross_entropy(mlp(x), y).backward()
        optimizer.step()
    mlp.eval()

    # judged by the cosine of the outputs, which a deeper cut moves and distillation restores
    options = dict(calibration=x, evaluation=x_test, max_loss=0.002)
    plain = quanta.optimize(mlp, "prune", **options)
    recovered = quanta.optimize(mlp, "prune", time_budget_s=3, **options)

    recovery = [d for d in recovered.decisions if d.change.startswith("distill a deeper cut")]
    assert len(recovery) == 1 and recovery[0].kept, recovered.decisions[-3:]
    assert recovered.quality.loss <= 0.002
    assert parameter_count(recovered.model) < parameter_count(plain.model)


def test_a_time_budget_that_is_not_positive_is_a_config_error(digits_mlp):
    with pytest.raises(ConfigError, match="time_budget_s 0 must be a positive number"):
        quanta.optimize(digits_mlp, "prune", calibration=torch.rand(16, 64), time_budget_s=0)
