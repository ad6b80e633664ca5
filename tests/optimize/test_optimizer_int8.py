"""The optimizer's int8 step: all layers at once, back-off by sensitivity, and timing in turns.

The speed of a layer and the loss of a model are replaced by fakes here, so
that each test decides one path of the search regardless of the machine's load.
"""

from __future__ import annotations

import pytest
import torch

from quanta.optimize import measure, optimizer
from quanta.optimize.quantize import Int8Linear
from quanta.optimize.tasks import Quality, TensorTask


class LossByLayer:
    """A digits task whose loss is the sum of `costs[name]` over the layers in int8."""

    def __init__(self, task: TensorTask, costs: dict[str, float]):
        self.task, self.costs, self.evaluations = task, costs, 0
        self.calibration = task.calibration

    def forward(self, model, batch):
        return self.task.forward(model, batch)

    def prepare(self, original):
        self.task.prepare(original)

    def evaluate(self, model) -> Quality:
        self.evaluations += 1
        int8 = [name for name, m in model.named_modules() if isinstance(m, Int8Linear)]
        return Quality(loss=sum(self.costs.get(name, 0.0) for name in int8))


@pytest.fixture()
def digits_task(digits):
    x, _, x_test, _ = digits
    return TensorTask(x[:256], evaluation=x_test[:128])


@pytest.fixture()
def int8_faster(monkeypatch):
    monkeypatch.setattr(measure, "compare_forward", lambda base, new, x, **_: (2e-3, 1e-3))


def by_layer(result):
    return {d.layer: d for d in result.decisions if d.layer != "*"}


def test_int8_all_layers_kept_with_one_evaluation_when_within_budget(
    digits_mlp, digits_task, int8_faster
):
    task = LossByLayer(digits_task, {"0": 0.001, "2": 0.001, "4": 0.001})
    result = optimizer.optimize(digits_mlp, "int8", task, max_loss=0.005)

    decisions = by_layer(result)
    assert set(decisions) == {"0", "2", "4"} and all(d.kept for d in decisions.values())
    assert all(isinstance(result.model.get_submodule(n), Int8Linear) for n in decisions)
    # the unchanged copy, bf16, all int8 together, and the final quality
    assert task.evaluations == 4


def test_int8_backs_off_only_the_layer_that_breaks_the_budget(digits_mlp, digits_task, int8_faster):
    task = LossByLayer(digits_task, {"0": 0.001, "2": 0.01, "4": 0.001})
    result = optimizer.optimize(digits_mlp, "int8", task, max_loss=0.005)

    decisions = by_layer(result)
    assert set(decisions) == {"0", "2", "4"}
    assert decisions["0"].kept and decisions["4"].kept and not decisions["2"].kept
    assert "max-loss" in decisions["2"].reason or "over budget" in decisions["2"].reason
    assert isinstance(result.model.get_submodule("0"), Int8Linear)
    assert not isinstance(result.model.get_submodule("2"), Int8Linear)
    assert result.quality.loss <= 0.005


def test_int8_rejected_for_speed_only_after_three_slower_trials(
    digits_mlp, digits_task, monkeypatch
):
    calls: dict[int, int] = {}

    def compare(base, new, x, **_):
        # the first layer loses once and then wins; the last always loses
        calls[new.in_features] = calls.get(new.in_features, 0) + 1
        if new.out_features == 10 or calls[new.in_features] == 1 and new.in_features == 64:
            return 1e-3, 2e-3
        return 2e-3, 1e-3

    monkeypatch.setattr(measure, "compare_forward", compare)
    task = LossByLayer(digits_task, {})
    result = optimizer.optimize(digits_mlp, "int8", task, max_loss=0.005)

    decisions = by_layer(result)
    assert decisions["0"].kept and decisions["2"].kept
    assert not decisions["4"].kept and "three trials" in decisions["4"].reason
    assert calls[64] == 2


@torch.inference_mode()
def test_int8_step_times_layers_on_their_real_input_dtype(digits_mlp, digits_task, monkeypatch):
    seen = []

    def compare(base, new, x, **_):
        seen.append((x.dtype, x.shape[0]))
        return 2e-3, 1e-3

    monkeypatch.setattr(measure, "compare_forward", compare)
    result = optimizer.optimize(digits_mlp, "int8", LossByLayer(digits_task, {}), max_loss=0.005)
    # the whole model went to bf16 first, so each layer is timed on bf16 calibration rows
    assert result.dtype == torch.bfloat16
    assert seen == [(torch.bfloat16, digits_task.calibration[0][0].shape[0])] * 3
