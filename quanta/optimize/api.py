"""The optimizer as users call it: a model, a recipe, calibration data; and the built-in model.

    import quanta
    result = quanta.optimize(mlp, "int8", calibration=x_train, evaluation=x_test, labels=y_test)
    result = quanta.optimize(encoder, "prune+int8", calibration=texts)

    result = optimize_builtin("builtin:minilm", "int8", out="artifacts/minilm-int8")

`optimize` picks the task from the calibration data: texts make an embedding
task for a text encoder (judged on held-out standard library docstrings), a
tensor makes a tensor task (accuracy when labels are given). `optimize_builtin`
is what `quanta optimize` runs: it optimizes an encoder from its directory,
measures the result against the original and writes a servable artifact.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quanta.errors import ConfigError, shorten
from quanta.optimize.corpus import Corpus, load_corpus
from quanta.optimize.optimizer import Optimized
from quanta.optimize.optimizer import optimize as _search
from quanta.optimize.recipe import Recipe
from quanta.optimize.report import Observed, write_report
from quanta.optimize.tasks import EmbeddingTask, TensorTask

__all__ = ["optimize", "optimize_builtin", "embedding_task"]

logger = logging.getLogger(__name__)

# Held-out retrieval pairs that judge an encoder: enough for recall@10 to move
# in steps of a third of a point.
DEFAULT_PAIRS = 300
DEFAULT_CALIBRATION = 128


def embedding_task(
    directory: str | Path, texts: list[str] | None = None, *, pairs: int = DEFAULT_PAIRS
) -> EmbeddingTask:
    """An embedding task with the tokenizer of the model in `directory`.

    Args:
        directory: a model directory with tokenizer.json.
        texts: calibration texts; by default standard library docstrings.
        pairs: held-out query/document pairs to judge with.

    Raises:
        ConfigError: fewer than 10 pairs, too few for recall@10 to mean anything.
    """
    from tokenizers import Tokenizer

    from quanta.models.minilm import MAX_TOKENS

    if not isinstance(pairs, int) or pairs < 10:
        raise ConfigError(f"pairs {shorten(pairs)} must be an integer of 10 or more: recall@10")
    tokenizer = Tokenizer.from_file(str(Path(directory) / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=MAX_TOKENS)
    corpus = load_corpus(calibration=DEFAULT_CALIBRATION, pairs=pairs)
    if texts is not None:
        corpus = Corpus(list(texts), corpus.queries, corpus.documents)
    return EmbeddingTask(tokenizer, corpus)


def optimize(
    model: nn.Module,
    recipe: str | Recipe,
    *,
    calibration: list[str] | torch.Tensor,
    max_loss: float = 0.005,
    evaluation: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    tokenizer_dir: str | Path | None = None,
    pairs: int = DEFAULT_PAIRS,
    time_budget_s: float | None = None,
    progress: bool = False,
) -> Optimized:
    """Make `model` cheaper with `recipe`, keeping its quality drop within `max_loss`.

    Args:
        model: any module whose work is in `nn.Linear` layers; it is not modified.
        recipe: `bf16`, `int8`, `int4`, `prune`, `lowrank` or steps joined by "+".
        calibration: texts, for a text encoder `(ids, mask) -> (B, T, C)` such as
            the built-in one; or a tensor of inputs for any other module.
        max_loss: the allowed drop: 1 - mean cosine for an encoder, the accuracy
            drop with `labels`, else 1 - mean cosine of the outputs.
        evaluation: held-out inputs for a tensor model (default: half of `calibration`).
        labels: class labels of `evaluation`, to judge by accuracy.
        tokenizer_dir: where tokenizer.json is, for texts (default: the built-in model).
        pairs: for texts, how many held-out docstring retrieval pairs judge the encoder.
        time_budget_s: seconds a recovery fine-tune after pruning may take.
        progress: show progress bars.

    Returns:
        An `Optimized`: the new model, every decision with its reason, the quality.

    Raises:
        OptimizeError: no nn.Linear, or no change fits the budget (the message
            lists the most sensitive layers and the best loss reached).
        ConfigError: a bad recipe, budget or calibration value.

    Example:
        >>> result = quanta.optimize(mlp, "int8", calibration=x, labels=y, evaluation=x_test)
        >>> result.quality.metrics["accuracy"]
    """
    if isinstance(calibration, torch.Tensor):
        task = TensorTask(calibration, evaluation=evaluation, labels=labels)
    elif isinstance(calibration, list | tuple) and calibration and _all_text(calibration):
        if evaluation is not None or labels is not None:
            raise ConfigError(
                "evaluation and labels are for tensor inputs; texts are judged on held-out "
                "docstring retrieval pairs, so pass calibration texts alone"
            )
        task = embedding_task(tokenizer_dir or _builtin_dir(), list(calibration), pairs=pairs)
    else:
        raise ConfigError(
            f"calibration {shorten(calibration)} must be a non-empty list of texts or a tensor "
            "of inputs"
        )
    with Observed(task, progress=progress, time_candidates=False) as observed:
        return _search(model, recipe, observed, max_loss=max_loss, time_budget_s=time_budget_s)


def optimize_builtin(
    model: str,
    recipe: str,
    *,
    out: str | Path,
    max_loss: float = 0.005,
    time_budget_s: float | None = None,
    texts: list[str] | None = None,
    pairs: int = DEFAULT_PAIRS,
    progress: bool = False,
) -> tuple[Optimized, dict[str, dict[str, Any]]]:
    """Optimize an encoder given as `builtin:minilm` or a directory; write an artifact.

    Args:
        model: `builtin:minilm` or a model directory.
        recipe: as for `optimize`.
        out: the directory to write the artifact to.
        max_loss: the allowed drop in mean cosine to the original.
        time_budget_s: seconds a recovery fine-tune after pruning may take.
        texts: calibration texts (default: standard library docstrings).
        pairs: held-out docstring retrieval pairs that judge candidates.
        progress: show progress bars.

    Returns:
        The optimizer's result, and the summary (original and optimized: quality,
        latency at batch 1 and 32, size on disk) that report.md shows.

    Raises:
        ConfigError, ModelError, OptimizeError: as `optimize`, and for a bad model.
    """
    from quanta.models.bert import load_bert
    from quanta.models.minilm import resolve_model
    from quanta.optimize.artifact import is_artifact, save_artifact

    directory = resolve_model(model)
    if is_artifact(directory):
        raise ConfigError(
            f"model {model!r} is already an optimized artifact; optimize the original "
            "(e.g. builtin:minilm) with the combined recipe instead"
        )
    original = load_bert(directory)
    task = embedding_task(directory, texts, pairs=pairs)
    with Observed(task, progress=progress) as observed:
        result = _search(original, recipe, observed, max_loss=max_loss, time_budget_s=time_budget_s)
    summary = {
        "original": _summary(original, task, task.evaluate(original).metrics),
        "optimized": _summary(result.model, task, result.quality.metrics),
    }
    for batch in (1, task.batch_size):
        key = f"p50_ms_batch_{batch}"
        summary["optimized"][f"speedup_batch_{batch}"] = round(
            summary["original"][key] / summary["optimized"][key], 2
        )
    recipe_json = {**result.recipe.to_json(), "max_loss": max_loss, "time_budget_s": time_budget_s}
    save_artifact(
        out,
        result.model,
        source=directory,
        dtype=result.dtype,
        recipe=recipe_json,
        quality=result.quality.metrics,
    )
    write_report(out, result, observed.candidates, summary)
    logger.info("wrote %s: %s", out, summary["optimized"])
    return result, summary


def _summary(model: nn.Module, task: EmbeddingTask, metrics: dict) -> dict[str, Any]:
    from quanta.optimize.measure import latency_p50, size_on_disk

    row: dict[str, Any] = {k: round(v, 5) for k, v in metrics.items()}
    for batch in (1, task.batch_size):
        row[f"p50_ms_batch_{batch}"] = round(latency_p50(model, task, batch) * 1e3, 2)
    row["size_mb"] = round(size_on_disk(model) / 2**20, 2)
    return row


def _all_text(values: Any) -> bool:
    return all(isinstance(v, str) and v.strip() for v in values)


def _builtin_dir() -> Path:
    from quanta.models.minilm import resolve_model

    return resolve_model("builtin:minilm")
