"""What a candidate model is judged on: its outputs against the original's, on held-out data.

A task holds calibration batches (what the optimizer runs to learn a model's
activations) and evaluation batches (what it judges candidates on), and turns
a candidate into a `Quality`: metrics for people, and one `loss` for the
search, the drop against the original that `--max-loss` bounds.

    task = EmbeddingTask(tokenizer, load_corpus())
    task.prepare(original)                 # the reference outputs, once
    task.evaluate(candidate).loss          # 1 - mean cosine to the original

Two kinds: `EmbeddingTask` for a text encoder (mean cosine, minimum cosine and
recall@10 of a retrieval task), `TensorTask` for a module on tensors (accuracy
when labels are given, else the cosine of its outputs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from quanta.errors import ConfigError, shorten
from quanta.optimize.corpus import Corpus

__all__ = ["Quality", "EmbeddingTask", "TensorTask", "recall_at_k"]

Batch = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class Quality:
    """A candidate's metrics and its loss: the drop against the original (0 = as good)."""

    loss: float
    metrics: dict[str, float] = field(default_factory=dict)


def recall_at_k(queries: torch.Tensor, documents: torch.Tensor, k: int = 10) -> float:
    """The share of queries whose own document (same row) is among their k nearest."""
    scores = queries @ documents.T  # (Q, D), rows of unit length give cosines
    top = scores.topk(min(k, documents.shape[0]), dim=1).indices
    hits = (top == torch.arange(queries.shape[0])[:, None]).any(dim=1)
    return float(hits.float().mean())


def _cosines(reference: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(reference.float(), outputs.float(), dim=-1)


class EmbeddingTask:
    """A sentence encoder `(ids, mask) -> (B, T, C)`, judged by its pooled embeddings.

    Args:
        tokenizer: a `tokenizers.Tokenizer` with truncation set; padding is set here.
        corpus: calibration texts, and held-out queries and documents.
        batch_size: texts per batch, for calibration and evaluation alike.
    """

    def __init__(self, tokenizer: Any, corpus: Corpus, *, batch_size: int = 32):
        tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.calibration = self.encode(corpus.calibration)
        self._queries = len(corpus.queries)
        self.evaluation = self.encode(corpus.queries + corpus.documents)
        self._reference: torch.Tensor | None = None
        self._reference_recall = 0.0

    def encode(self, texts: list[str]) -> list[Batch]:
        """Texts as (ids, mask) batches, each padded only to its longest text."""
        batches = []
        for start in range(0, len(texts), self.batch_size):
            encodings = self.tokenizer.encode_batch(texts[start : start + self.batch_size])
            ids = torch.tensor(np.array([e.ids for e in encodings], dtype=np.int64))
            mask = torch.tensor(np.array([e.attention_mask for e in encodings], dtype=np.int64))
            batches.append((ids, mask))
        return batches

    def forward(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Unit-length sentence embeddings (B, C) in float32: mean over real tokens."""
        ids, mask = batch
        with torch.inference_mode():
            hidden = model(ids, mask).float()  # (B, T, C)
            weights = mask.unsqueeze(-1).float()
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
            return torch.nn.functional.normalize(pooled, dim=-1)

    def train_forward(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Every real token's hidden state, with autograd on: the target a pruned
        encoder is distilled towards (richer than one embedding per text)."""
        ids, mask = batch
        return model(ids, mask) * mask.unsqueeze(-1)

    def outputs(self, model: nn.Module) -> torch.Tensor:
        return torch.cat([self.forward(model, batch) for batch in self.evaluation])

    def prepare(self, original: nn.Module) -> None:
        """Compute the original's embeddings, which every candidate is compared with."""
        self._reference = self.outputs(original)
        self._reference_recall = self._recall(self._reference)

    def _recall(self, embeddings: torch.Tensor) -> float:
        q = self._queries
        return recall_at_k(embeddings[:q], embeddings[q:], k=10)

    def evaluate(self, model: nn.Module) -> Quality:
        """Mean and minimum cosine to the original, recall@10; loss is 1 - mean cosine."""
        if self._reference is None:
            raise RuntimeError("EmbeddingTask.prepare(original) must run before evaluate()")
        embeddings = self.outputs(model)
        cosines = _cosines(self._reference, embeddings)
        recall = self._recall(embeddings)
        metrics = {
            "mean_cosine": float(cosines.mean()),
            "min_cosine": float(cosines.min()),
            "recall_at_10": recall,
            "recall_at_10_drop": self._reference_recall - recall,
        }
        return Quality(loss=1.0 - metrics["mean_cosine"], metrics=metrics)

    def example(self, batch_size: int) -> Batch:
        """The first `batch_size` held-out queries, padded to their longest, for timing."""
        if not 1 <= batch_size <= self.batch_size:
            raise ConfigError(
                f"batch_size {batch_size} for timing must be between 1 and the task's "
                f"batch size {self.batch_size}"
            )
        ids, mask = (t[:batch_size] for t in self.evaluation[0])
        width = int(mask.sum(dim=1).max())
        return ids[:, :width].contiguous(), mask[:, :width].contiguous()


class TensorTask:
    """A module on tensors: judged by accuracy when labels are given, else output cosine.

    Args:
        calibration: inputs (N, ...) to learn activations from.
        evaluation: held-out inputs; by default the second half of `calibration`
            (and then only the first half calibrates).
        labels: class labels for `evaluation`: the loss is then the accuracy drop.
        batch_size: rows per batch.
    """

    def __init__(
        self,
        calibration: torch.Tensor,
        *,
        evaluation: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        batch_size: int = 32,
    ):
        if not isinstance(calibration, torch.Tensor) or calibration.ndim < 1:
            raise ConfigError(f"calibration must be a tensor of inputs, not {shorten(calibration)}")
        if evaluation is None:
            half = calibration.shape[0] // 2
            calibration, evaluation = calibration[:half], calibration[half:]
        if labels is not None and labels.shape[0] != evaluation.shape[0]:
            raise ConfigError(
                f"labels has {labels.shape[0]} rows but evaluation has {evaluation.shape[0]}; "
                "give one label per evaluation input"
            )
        self.batch_size = batch_size
        self.calibration = [(b,) for b in calibration.split(batch_size)]
        self.evaluation = [(b,) for b in evaluation.split(batch_size)]
        self.labels = labels
        self._reference: torch.Tensor | None = None
        self._reference_accuracy = 0.0

    def forward(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The model's outputs in float32; float inputs go in the model's own float type,
        as they would from a caller of a model converted to bf16."""
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
        inputs = [t.to(dtype) if dtype and t.is_floating_point() else t for t in batch]
        with torch.inference_mode():
            return model(*inputs).float()

    def train_forward(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The model's outputs with autograd on, for distillation."""
        return model(*batch)

    def outputs(self, model: nn.Module) -> torch.Tensor:
        return torch.cat([self.forward(model, batch) for batch in self.evaluation])

    def prepare(self, original: nn.Module) -> None:
        self._reference = self.outputs(original)
        if self.labels is not None:
            self._reference_accuracy = self._accuracy(self._reference)

    def _accuracy(self, outputs: torch.Tensor) -> float:
        return float((outputs.argmax(dim=-1) == self.labels).float().mean())

    def evaluate(self, model: nn.Module) -> Quality:
        """Accuracy and its drop (the loss) with labels, else 1 - mean output cosine."""
        if self._reference is None:
            raise RuntimeError("TensorTask.prepare(original) must run before evaluate()")
        outputs = self.outputs(model)
        cosines = _cosines(self._reference.flatten(1), outputs.flatten(1))
        metrics = {"mean_cosine": float(cosines.mean()), "min_cosine": float(cosines.min())}
        if self.labels is None:
            return Quality(loss=1.0 - metrics["mean_cosine"], metrics=metrics)
        metrics["accuracy"] = self._accuracy(outputs)
        metrics["accuracy_drop"] = self._reference_accuracy - metrics["accuracy"]
        return Quality(loss=metrics["accuracy_drop"], metrics=metrics)

    def example(self, batch_size: int) -> Batch:
        rows = torch.cat([b[0] for b in self.evaluation])
        reps = -(-batch_size // rows.shape[0])
        return (rows.repeat(reps, *([1] * (rows.ndim - 1)))[:batch_size],)
