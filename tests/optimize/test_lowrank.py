"""Low-rank factorization: exact where it can be, activation-aware, and within budget."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from quanta.errors import ConfigError, OptimizeError
from quanta.optimize.lowrank import (
    LowRankLinear,
    break_even_rank,
    factorize,
    input_statistics,
    lowrank,
)


def _linear_with_weight(weight: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        linear.weight.copy_(weight)
    return linear


def _macs(model: nn.Module) -> int:
    """Multiply-adds per row of every linear layer, counting a factorized one once."""
    total, inner = 0, set()
    for module in model.modules():
        if isinstance(module, LowRankLinear):
            total += module.macs
            inner.update(id(child) for child in module.children())
        elif isinstance(module, nn.Linear) and id(module) not in inner:
            total += module.in_features * module.out_features
    return total


def _mlp_with_low_rank_middle() -> nn.Sequential:
    """64 -> 256 -> 256 -> 10, the middle weight of rank 8 plus a little noise."""
    torch.manual_seed(0)
    middle = torch.randn(256, 8) @ torch.randn(8, 256) / 16 + 1e-4 * torch.randn(256, 256)
    return nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), _linear_with_weight(middle), nn.ReLU(), nn.Linear(256, 10)
    ).eval()


def _relative_error(reference: nn.Module, inputs: torch.Tensor):
    """A loss: squared output error of a candidate relative to the reference's outputs."""
    with torch.no_grad():
        expected = reference(inputs)

    def loss(candidate: nn.Module) -> float:
        with torch.no_grad():
            got = candidate(inputs)
        return float((got - expected).square().sum() / expected.square().sum())

    return loss


def test_factorize_reproduces_a_weight_of_exactly_that_rank():
    torch.manual_seed(0)
    linear = _linear_with_weight(torch.randn(96, 6) @ torch.randn(6, 64))
    x = torch.randn(32, 64)

    for scale in (None, torch.rand(64) + 0.1):
        layer = factorize(linear, 6, scale)
        assert isinstance(layer, LowRankLinear) and layer.rank == 6
        torch.testing.assert_close(layer(x), linear(x), rtol=1e-4, atol=1e-4)


def test_forward_takes_any_leading_shape_and_float_dtype():
    torch.manual_seed(0)
    linear = nn.Linear(32, 48)
    layer = factorize(linear, 32)
    x = torch.randn(2, 5, 32)

    torch.testing.assert_close(layer(x), linear(x), rtol=1e-4, atol=1e-4)
    assert layer(x.bfloat16()).dtype == torch.bfloat16
    assert layer.to(torch.bfloat16)(x).dtype == torch.float32


def test_activation_aware_beats_plain_svd_when_a_few_channels_are_large():
    torch.manual_seed(0)
    linear = _linear_with_weight(torch.randn(128, 128) / 11)
    x = torch.randn(4000, 128)
    x[:, :4] *= 30  # a few outlier channels, as in transformer activations
    stats = input_statistics(nn.Sequential(linear), [(x[:2000],)])
    held_out = x[2000:]

    def error(layer: nn.Module) -> float:
        with torch.no_grad():
            return float((layer(held_out) - linear(held_out)).norm())

    plain, aware = factorize(linear, 32), factorize(linear, 32, stats["0"])
    assert error(aware) < 0.5 * error(plain)


def test_input_statistics_are_root_mean_square_per_channel():
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1))
    batches = [(torch.tensor([[1.0, 0.0, 3.0]]),), (torch.tensor([[-1.0, 0.0, 4.0]]),)]

    stats = input_statistics(model, batches)

    assert set(stats) == {"0", "2"}
    torch.testing.assert_close(stats["0"], torch.tensor([1.0, 0.0, 12.5**0.5]))
    assert stats["2"].shape == (2,)


def test_break_even_rank_is_the_largest_rank_that_saves_work():
    assert break_even_rank(nn.Linear(384, 1152)) == 287  # 384*1152 / 1536 = 288 exactly
    assert break_even_rank(nn.Linear(384, 384)) == 191
    assert break_even_rank(nn.Linear(384, 1536)) == 307
    assert break_even_rank(nn.Linear(1536, 384)) == 307
    assert break_even_rank(nn.Linear(10, 1)) == 0
    for n, k in [(7, 13), (64, 64), (100, 3), (1536, 384)]:
        r = break_even_rank(nn.Linear(k, n))
        assert r * (n + k) < n * k <= (r + 1) * (n + k)


def test_loose_budget_factorizes_below_break_even_with_fewer_macs():
    model = _mlp_with_low_rank_middle()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = torch.randn(512, 64)
    loss = _relative_error(model, inputs[256:])

    smaller, decisions = lowrank(model, [(inputs[:256],)], loss, 0.01, rank_multiple=4)

    assert [d.layer for d in decisions] == ["0", "2", "4"]
    middle = smaller[2]
    assert decisions[1].kept and isinstance(middle, LowRankLinear)
    assert middle.rank <= 12 < break_even_rank(model[2])
    assert _macs(smaller) < _macs(model)
    assert loss(smaller) <= 0.01
    assert all(d.loss is None or d.loss <= 0.01 for d in decisions if d.kept)
    # the input model is left as it was
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert type(model[2]) is nn.Linear


def test_zero_budget_changes_nothing():
    model = _mlp_with_low_rank_middle()
    inputs = torch.randn(256, 64)

    same, decisions = lowrank(model, [(inputs,)], _relative_error(model, inputs), 0.0)

    assert len(decisions) == 3 and not any(d.kept for d in decisions)
    assert all(d.reason for d in decisions)
    assert all(type(m) is nn.Linear for m in same if isinstance(m, nn.Linear | LowRankLinear))
    assert torch.equal(same(inputs), model(inputs))


class _SpareAndTiny(nn.Module):
    """A used layer, a tiny one no rank can shrink, and one that forward never calls."""

    def __init__(self):
        super().__init__()
        self.used, self.tiny, self.spare = nn.Linear(64, 64), nn.Linear(64, 1), nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tiny(self.used(x))


def test_layers_that_cannot_be_factorized_are_left_dense_with_a_reason():
    torch.manual_seed(0)
    model = _SpareAndTiny().eval()
    inputs = torch.randn(128, 64)

    smaller, decisions = lowrank(model, [(inputs,)], _relative_error(model, inputs), 10.0)

    by_layer = {d.layer: d for d in decisions}
    assert by_layer["used"].kept and isinstance(smaller.used, LowRankLinear)
    assert not by_layer["tiny"].kept and "saves work" in by_layer["tiny"].reason
    assert not by_layer["spare"].kept and "no calibration input" in by_layer["spare"].reason
    assert type(smaller.tiny) is nn.Linear and type(smaller.spare) is nn.Linear


def test_spec_and_state_dict_round_trip_through_safetensors(tmp_path):
    model = _mlp_with_low_rank_middle()
    inputs = torch.randn(256, 64)
    smaller, _ = lowrank(model, [(inputs,)], _relative_error(model, inputs), 0.01)
    specs = {n: m.spec() for n, m in smaller.named_modules() if isinstance(m, LowRankLinear)}
    assert specs
    save_file(smaller.state_dict(), tmp_path / "model.safetensors")
    (tmp_path / "specs.json").write_text(json.dumps(specs))

    # a loader rebuilds the module tree from the specs, then loads the weights
    rebuilt = _mlp_with_low_rank_middle()
    for name, spec in json.loads((tmp_path / "specs.json").read_text()).items():
        rebuilt[int(name)] = LowRankLinear.empty(spec)
    rebuilt.load_state_dict(load_file(tmp_path / "model.safetensors"))

    with torch.no_grad():
        assert torch.equal(rebuilt(inputs), smaller(inputs))


def test_empty_refuses_a_spec_it_did_not_write():
    with pytest.raises(ConfigError, match="not a low-rank spec"):
        LowRankLinear.empty({"kind": "int8", "in_features": 4})
    with pytest.raises(ConfigError, match="'out_features', 'rank', 'bias'"):
        LowRankLinear.empty({"kind": "lowrank", "in_features": 4, "rank": 2})


def test_digits_classifier_stays_within_its_accuracy_budget(digits, digits_mlp):
    x_train, _, x_test, y_test = digits
    before = {k: v.clone() for k, v in digits_mlp.state_dict().items()}

    def accuracy(candidate: nn.Module) -> float:
        with torch.no_grad():
            return float((candidate(x_test).argmax(dim=1) == y_test).float().mean())

    baseline = accuracy(digits_mlp)
    assert baseline > 0.9
    batches = [(x,) for x in x_train.split(256)]

    smaller, decisions = lowrank(digits_mlp, batches, lambda m: baseline - accuracy(m), 0.02)

    assert baseline - accuracy(smaller) <= 0.02
    assert any(d.kept for d in decisions)
    assert _macs(smaller) < _macs(digits_mlp)
    assert all(torch.equal(before[k], v) for k, v in digits_mlp.state_dict().items())


def test_model_without_linear_layers_is_refused():
    model = nn.Sequential(nn.ReLU(), nn.Conv1d(2, 2, 1))
    with pytest.raises(OptimizeError, match="no nn.Linear"):
        lowrank(model, [(torch.randn(1, 2, 4),)], lambda m: 0.0, 0.1)
    with pytest.raises(OptimizeError, match="no nn.Linear"):
        input_statistics(model, [(torch.randn(1, 2, 4),)])


@pytest.mark.parametrize("rank", [0, -1, 17, 2.5])
def test_rank_outside_one_to_min_dimension_is_refused(rank):
    with pytest.raises(ConfigError, match=r"choose an integer from 1 to 16"):
        factorize(nn.Linear(16, 40), rank)


def test_bad_budget_and_scale_are_refused():
    model = nn.Sequential(nn.Linear(4, 4))
    batches = [(torch.randn(2, 4),)]
    with pytest.raises(ConfigError, match="max_loss"):
        lowrank(model, batches, lambda m: 0.0, -0.1)
    with pytest.raises(ConfigError, match="scale"):
        factorize(nn.Linear(4, 4), 2, torch.tensor([1.0, -1.0, 1.0, 1.0]))
