"""The optimizer: apply a recipe's steps, keeping each change only inside the budget.

    result = optimize(model, "int8", task, max_loss=0.005)
    result.model, result.decisions, result.quality

Every change is judged by the task on held-out data against the original
model, and a precision is chosen per layer by measurement: a layer goes to
int8 only where `torch._int_mm` beats bf16 on the shapes the calibration data
gives it, and only while the whole model stays within the budget.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from quanta import hardware
from quanta.errors import ConfigError, OptimizeError, shorten
from quanta.optimize import measure, quantize
from quanta.optimize.recipe import Recipe, parse_recipe
from quanta.optimize.report import Decision
from quanta.optimize.tasks import Quality

__all__ = ["Optimized", "optimize", "linear_layers"]

logger = logging.getLogger(__name__)


@dataclass
class Optimized:
    """An optimized model, what was decided on the way, and its quality."""

    model: nn.Module
    recipe: Recipe
    max_loss: float
    quality: Quality
    decisions: list[Decision] = field(default_factory=list)
    dtype: torch.dtype = torch.float32


def linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """Every `nn.Linear` of the model by its name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def _activations(model: nn.Module, task: Any, names: list[str]) -> dict[str, tuple[Any, Any]]:
    """Per layer: the absmax of each input channel over the calibration data, and the
    first calibration batch of its input rows (M, K), in the dtype the layer receives:
    what its speed is measured on."""
    stats: dict[str, tuple[Any, Any]] = {}

    def hook(name: str) -> Callable:
        def record(module: nn.Module, args: tuple, output: Any) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            absmax = x.abs().amax(dim=0).float()
            before = stats.get(name)
            if before is None:
                stats[name] = (absmax, x.clone())
                return
            stats[name] = (torch.maximum(before[0], absmax), before[1])

        return record

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        for batch in task.calibration:
            task.forward(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return stats


def optimize(
    model: nn.Module,
    recipe: str | Recipe,
    task: Any,
    *,
    max_loss: float = 0.005,
    time_budget_s: float | None = None,
) -> Optimized:
    """Apply `recipe` to a copy of `model`, keeping changes within `max_loss`.

    Args:
        model: any module whose work is in `nn.Linear` layers; it is not modified.
        recipe: a recipe name (`int8`, `prune+int8`, ...) or a `Recipe`.
        task: an `EmbeddingTask` or `TensorTask` with calibration and evaluation data.
        max_loss: the largest quality drop allowed against the original.
        time_budget_s: seconds a recovery fine-tune after pruning may take; None
            for no recovery.

    Returns:
        An `Optimized` with the new model, every decision and the final quality.

    Raises:
        OptimizeError: the model has no `nn.Linear`, or no change fits the budget.
        ConfigError: an unknown recipe, a negative budget or time budget.
    """
    recipe = parse_recipe(recipe) if isinstance(recipe, str) else recipe
    if not isinstance(max_loss, int | float) or max_loss < 0:
        raise ConfigError(f"max_loss {shorten(max_loss)} must be a number >= 0, e.g. 0.005")
    if time_budget_s is not None and not (
        isinstance(time_budget_s, int | float) and time_budget_s > 0
    ):
        raise ConfigError(
            f"time_budget_s {shorten(time_budget_s)} must be a positive number of seconds"
        )
    if not linear_layers(model):
        raise OptimizeError(
            f"{type(model).__name__} has no nn.Linear layer: quanta optimizes the matrix "
            "products of nn.Linear, so there is nothing to change"
        )

    original = model.eval()
    task.prepare(original)
    candidate = copy.deepcopy(original)
    result = Optimized(candidate, recipe, max_loss, task.evaluate(candidate))
    for step in recipe.steps:
        budget = max_loss * step.share
        logger.info("step %s: budget %.4f", step.kind, budget)
        _STEPS[step.kind](result, task, budget, time_budget_s)
    result.quality = task.evaluate(result.model)
    _check_changed(result)
    return result


def _check_changed(result: Optimized) -> None:
    """A recipe that kept nothing failed the user: say which layers were most sensitive."""
    if any(d.kept for d in result.decisions):
        return
    tried = sorted((d for d in result.decisions if d.loss is not None), key=lambda d: -d.loss)
    worst = ", ".join(f"{d.layer} ({d.change}: loss {d.loss:.4f})" for d in tried[:5])
    best = min((d.loss for d in tried), default=None)
    raise OptimizeError(
        f"no change of recipe {result.recipe.name!r} fits max_loss {result.max_loss}; "
        f"the smallest loss of one change was {best if best is None else round(best, 5)}; "
        f"most sensitive layers: {worst or 'none measured'}. Allow a larger --max-loss "
        "or choose a gentler recipe (bf16)"
    )


# -- precision steps -------------------------------------------------------------


def _bf16(result: Optimized, task: Any, budget: float, _time: float | None) -> bool:
    """The whole model in bf16, where the CPU computes it natively and it fits the budget."""
    if not hardware.detect().native_bf16 and not torch.cuda.is_available():
        result.decisions.append(
            Decision("*", "bf16", False, "this CPU has neither AMX nor AVX512-BF16: bf16 is slow")
        )
        return False
    trial = copy.deepcopy(result.model).to(torch.bfloat16)
    quality = task.evaluate(trial)
    kept = quality.loss <= budget
    reason = f"loss {quality.loss:.5f} {'within' if kept else 'over'} budget {budget:.5f}"
    result.decisions.append(Decision("*", "bf16", kept, reason, quality.loss))
    if kept:
        result.model, result.dtype = trial, torch.bfloat16
    return kept


def _int8(result: Optimized, task: Any, budget: float, _time: float | None) -> None:
    """Int8 where faster than the model's precision and within budget.

    All layers that int8 speeds up are tried together first, which costs one
    evaluation; only when that breaks the budget are they put back one by one,
    the most sensitive first, and then offered again one by one.
    """
    _bf16(result, task, budget, None)
    names = list(linear_layers(result.model))
    stats = _activations(result.model, task, names)
    built: dict[str, tuple[nn.Module, quantize.Int8Linear, str]] = {}
    for name in names:
        linear = result.model.get_submodule(name)
        if name not in stats:
            result.decisions.append(
                Decision(name, "int8", False, "no calibration input reached it")
            )
            continue
        absmax, _ = stats[name]
        smooth = None
        if quantize.has_outliers(absmax):
            smooth = quantize.smooth_scales(linear.weight.float(), absmax)
        layer = quantize.Int8Linear.from_linear(linear, smooth=smooth)
        built[name] = (linear, layer, "int8" + (" smoothed" if smooth is not None else ""))

    # a layer slower in int8 is timed again after all others, so that neither
    # one burst of load nor the allocator's first large blocks decide it
    times = {name: _time_pair(built[name], stats[name][1]) for name in built}
    for _ in range(2):
        slower = [name for name in built if times[name][1] >= times[name][0]]
        times.update({name: _time_pair(built[name], stats[name][1]) for name in slower})
    slower = [name for name in built if times[name][1] >= times[name][0]]
    for name in slower:
        (base_s, int8_s), (linear, layer, change) = times[name], built[name]
        M, K = stats[name][1].shape
        reason = (
            f"int8 {int8_s * 1e3:.2f} ms not faster than {_name(result.dtype)} "
            f"{base_s * 1e3:.2f} ms at {M}x{K}x{layer.out_features} in three trials"
        )
        result.decisions.append(Decision(name, change, False, reason))
    faster = {
        name: (*built[name], _output_error(*built[name][:2], stats[name][1]))
        for name in built
        if name not in slower
    }
    logger.info("int8: %d of %d layers faster than %s", len(faster), len(names), result.dtype)

    for name, (_, layer, _, _) in faster.items():
        result.model.set_submodule(name, layer)
    loss = task.evaluate(result.model).loss if faster else 0.0
    if loss <= budget:
        reason = f"loss {loss:.5f} of all {len(faster)} int8 layers together within {budget:.5f}"
        for name, (_, _, change, _) in faster.items():
            result.decisions.append(Decision(name, change, True, reason, loss))
        return
    _back_off(result, task, budget, faster, loss)


def _back_off(
    result: Optimized,
    task: Any,
    budget: float,
    faster: dict[str, tuple[nn.Module, nn.Module, str, float]],
    loss: float,
) -> None:
    """Put layers back to their precision, most sensitive first, until within budget;
    then offer each one put back again, least sensitive first, except the last."""
    order = sorted(faster, key=lambda name: -faster[name][3])
    reverted: list[str] = []
    for name in order:
        old, _, change, error = faster[name]
        result.model.set_submodule(name, old)
        reverted.append(name)
        loss = task.evaluate(result.model).loss
        logger.debug("int8 back-off: %s (error %.4f) reverted, loss %.5f", name, error, loss)
        if loss <= budget:
            break
    if loss > budget:
        # even without int8 anywhere the budget is broken: bf16 spent it
        for name in order:
            old, _, change, error = faster[name]
            reason = f"loss {loss:.5f} over budget {budget:.5f} even with no int8 layer"
            result.decisions.append(Decision(name, change, False, reason))
        return

    for name in order:
        if name not in reverted:
            change = faster[name][2]
            reason = f"loss {loss:.5f} within {budget:.5f} with the other int8 layers"
            result.decisions.append(Decision(name, change, True, reason, loss))
    last = reverted[-1]
    for name in reversed(reverted[:-1]):
        old, layer, change, error = faster[name]
        _try(result, task, budget, name, old, layer, f"{change} (output error {error:.4f})")
    old, _, change, error = faster[last]
    reason = (
        f"the whole model's loss broke budget {budget:.5f} until this layer, the most "
        f"sensitive left (int8 output error {error:.4f}), went back; allow a larger --max-loss"
    )
    result.decisions.append(Decision(last, change, False, reason))


def _time_pair(built: tuple[nn.Module, nn.Module, str], rows: torch.Tensor) -> tuple[float, float]:
    """Median seconds of the base layer and of its int8 one on real rows, timed in turns."""
    return measure.compare_forward(built[0], built[1], rows, repeat=7)


def _output_error(base: nn.Module, layer: nn.Module, rows: torch.Tensor) -> float:
    """The relative error of int8 on this layer's real rows: its sensitivity, without a
    whole-model evaluation."""
    with torch.inference_mode():
        ref, out = base(rows).float(), layer(rows).float()
    return float((out - ref).norm() / ref.norm().clamp(min=1e-12))


def _int4(result: Optimized, task: Any, budget: float, _time: float | None) -> None:
    """Layer by layer: int4 weights where within budget (for size; not faster)."""
    for name, linear in linear_layers(result.model).items():
        group = next((g for g in (128, 64, 32) if linear.in_features % g == 0), None)
        if group is None:
            reason = f"in_features {linear.in_features} is not a multiple of 32"
            result.decisions.append(Decision(name, "int4", False, reason))
            continue
        layer = quantize.Int4Linear.from_linear(linear, group_size=group)
        _try(result, task, budget, name, linear, layer, f"int4 group {group}")


def _try(
    result: Optimized,
    task: Any,
    budget: float,
    name: str,
    old: nn.Module,
    new: nn.Module,
    change: str,
) -> bool:
    """Put `new` in place of `old`; keep it if the whole model stays within budget."""
    result.model.set_submodule(name, new)
    loss = task.evaluate(result.model).loss
    if loss <= budget:
        result.decisions.append(
            Decision(name, change, True, f"loss {loss:.5f} within {budget:.5f}", loss)
        )
        return True
    result.model.set_submodule(name, old)
    reason = f"loss {loss:.5f} over budget {budget:.5f}"
    result.decisions.append(Decision(name, change, False, reason, loss))
    return False


def _name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float32: "fp32"}.get(dtype, str(dtype))


# -- structural steps ------------------------------------------------------------


def _prune(result: Optimized, task: Any, budget: float, time_budget_s: float | None) -> None:
    """The largest structured cut within budget; with a time budget, also a deeper cut
    recovered by distillation, kept if it comes back within budget."""
    from quanta.optimize.prune import prune_structured

    loss = lambda m: task.evaluate(m).loss  # noqa: E731
    model, decisions = prune_structured(
        result.model, task.calibration, loss, budget, forward=task.forward
    )
    result.decisions += decisions
    if time_budget_s is not None:
        model = _recover(result.model, model, task, budget, time_budget_s, result.decisions)
    result.model = model


def _recover(
    original: nn.Module,
    pruned: nn.Module,
    task: Any,
    budget: float,
    time_budget_s: float,
    decisions: list[Decision],
) -> nn.Module:
    """Cut up to `_RECOVERY_STRETCH` x the budget, distill it from the original for
    `time_budget_s`, and keep it only if it is within budget and smaller than `pruned`."""
    from quanta.optimize.prune import distill, parameter_count, prune_structured

    loss = lambda m: task.evaluate(m).loss  # noqa: E731
    deeper, _ = prune_structured(
        original, task.calibration, loss, budget * _RECOVERY_STRETCH, forward=task.forward
    )
    size, deeper_size = parameter_count(pruned), parameter_count(deeper)
    change = f"distill a deeper cut ({deeper_size:,} parameters) for {time_budget_s:g} s"
    if deeper_size >= size:
        decisions.append(Decision("all", change, False, "no deeper cut than the one kept"))
        return pruned
    distill(deeper, original, task.calibration, forward=task.train_forward,
            time_budget_s=time_budget_s)  # fmt: skip
    value = loss(deeper)
    kept = value <= budget
    verdict = "within" if kept else "over"
    reason = f"after distillation loss {value:.4g} {verdict} the budget {budget:.4g}"
    decisions.append(Decision("all", change, kept, reason, value))
    logger.info("recovery: %s: %s", change, reason)
    return deeper if kept else pruned


def _lowrank(result: Optimized, task: Any, budget: float, _time: float | None) -> None:
    from quanta.optimize.lowrank import lowrank

    loss = lambda m: task.evaluate(m).loss  # noqa: E731
    model, decisions = lowrank(result.model, task.calibration, loss, budget, forward=task.forward)
    result.model = model
    result.decisions += decisions


# A cut recovered by distillation may start this many times over the budget.
_RECOVERY_STRETCH = 2.0

_STEPS = {"bf16": _bf16, "int8": _int8, "int4": _int4, "prune": _prune, "lowrank": _lowrank}
