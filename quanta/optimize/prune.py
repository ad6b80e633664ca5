"""Pruning: remove whole heads and neurons to make dense layers smaller, then recover.

Structured pruning is what makes a model on a CPU faster: a feed-forward layer
with half its neurons is two Linear layers of half the size, and an attention
layer with fewer heads computes fewer products. Each unit (a hidden neuron, an
attention head) is ranked by what it contributes on calibration inputs, and
the search keeps the largest cut whose quality loss stays within the budget.

Unstructured magnitude pruning is here too, for size only: zeros in a dense
weight matrix do not make a dense matmul any faster.

    model, decisions = prune_structured(model, batches, loss, 0.02, forward=embed)
    model = distill(model, teacher, batches, forward=embed, time_budget_s=30)
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from quanta.errors import ConfigError, OptimizeError, shorten
from quanta.models.bert import BertEncoder
from quanta.optimize.report import Decision

__all__ = [
    "Decision",
    "prune_structured",
    "prune_fraction",
    "prune_magnitude_",
    "distill",
    "parameter_count",
]

logger = logging.getLogger(__name__)

Forward = Callable[[nn.Module, tuple], torch.Tensor]

# The fractions of each layer's units the search tries to remove, in order.
DEFAULT_STEPS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)

# Ridge damping of the regression that compensates removed units, relative to
# the mean input variance; 0.3 to 1 did best on MiniLM with 64 to 192 sentences.
_DAMPING = 0.5

# Modules that act on each feature alone, so a neuron can be cut through them.
_ELEMENTWISE = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.Mish,
    nn.Hardswish, nn.Hardtanh, nn.Softplus, nn.Identity, nn.Dropout,
)  # fmt: skip


@dataclass
class _Units:
    """The prunable units of one layer: the heads of an attention or the neurons of a pair.

    `writer` makes the units (rows of a Linear, or an attention's heads) and
    `reader` consumes them (columns of its Linear, `size` columns per unit).
    """

    name: str
    kind: str  # "heads" or "neurons"
    writer: str
    reader: str
    size: int
    scores: torch.Tensor  # (n,) importance of each unit
    mean: torch.Tensor | None = None  # (n * size,) mean of the reader's input
    cov: torch.Tensor | None = None  # (n * size, n * size) covariance of the reader's input

    def removed(self, fraction: float) -> int:
        # always keep one unit, so that every layer still computes something
        return min(len(self.scores) - 1, int(fraction * len(self.scores) + 1e-9))

    def keep(self, fraction: float) -> torch.Tensor:
        kept = len(self.scores) - self.removed(fraction)
        return self.scores.topk(kept).indices.sort().values

    def columns(self, units: torch.Tensor) -> torch.Tensor:
        return (units[:, None] * self.size + torch.arange(self.size)).flatten()


def prune_structured(
    model: nn.Module,
    batches: Sequence[tuple],
    loss: Callable[[nn.Module], float],
    max_loss: float,
    *,
    forward: Forward,
    time_budget_s: float | None = None,
    steps: Sequence[float] = DEFAULT_STEPS,
) -> tuple[nn.Module, list[Decision]]:
    """Remove the most heads and neurons that keep `loss` within `max_loss`.

    Units are ranked once on the calibration batches. The search first removes
    the same fraction of every layer, step by step, while the loss stays within
    budget; then, since layers differ in how much they tolerate, it pushes each
    layer one step further in turn and keeps every step that still fits.

    Args:
        model: a `BertEncoder` (or a module holding one), or any module with
            `Linear -> elementwise activation -> Linear` inside an `nn.Sequential`.
            It is not modified.
        batches: calibration inputs, each passed to `forward` as is.
        loss: the quality drop of a candidate against `model` on held-out data,
            0 for none, larger for worse.
        max_loss: the largest loss a kept candidate may have.
        forward: runs a model on one batch, `forward(model, batch) -> Tensor`.
        time_budget_s: stop trying candidates once this much time is spent.
        steps: the increasing fractions of units per layer to try removing.

    Returns:
        The pruned model (a new module, in eval mode) and every decision taken.

    Raises:
        ConfigError: `max_loss`, `steps` or `time_budget_s` is out of range.
        OptimizeError: the model has nothing this function knows how to prune.

    Example:
        >>> pruned, decisions = prune_structured(mlp, batches, accuracy_drop, 0.01,
        ...                                      forward=lambda m, b: m(*b))
    """
    if not isinstance(max_loss, int | float) or not max_loss >= 0:
        raise ConfigError(f"max_loss {shorten(max_loss)} must be a number >= 0")
    if not steps or any(not 0 <= a < b < 1 for a, b in zip((0, *steps), steps, strict=False)):
        raise ConfigError(f"steps {shorten(steps)} must be increasing fractions in (0, 1)")
    _check_time(time_budget_s, required=False)
    deadline = math.inf if time_budget_s is None else time.monotonic() + time_budget_s

    base = copy.deepcopy(model).eval()
    units = _score(base, batches, forward)
    fractions = (0.0, *steps)
    levels = {u.name: 0 for u in units}
    best, decisions = base, []

    def attempt(trial: dict[str, int], layer: str, change: str) -> bool:
        nonlocal best, levels
        candidate = _remove(base, units, {name: fractions[i] for name, i in trial.items()})
        value = float(loss(candidate))
        kept = value <= max_loss
        verdict = "within" if kept else "over"
        reason = f"loss {value:.4g} {verdict} the budget {max_loss:.4g}"
        decisions.append(Decision(layer, change, kept, reason, value))
        logger.debug("%s: %s: %s", layer, change, reason)
        if kept:
            best, levels = candidate, trial
        return kept

    # one fraction for every layer, growing until the loss leaves the budget
    for i, fraction in enumerate(steps, start=1):
        if time.monotonic() > deadline:
            break
        change = f"remove {fraction:.0%} of the heads and neurons of every layer"
        if not attempt(dict.fromkeys(levels, i), "all", change):
            break

    # then each layer alone, round by round, so that no layer takes the whole budget
    open_units = [u for u in units if levels[u.name] + 1 < len(fractions)]
    while open_units and time.monotonic() < deadline:
        for u in list(open_units):
            # skip steps that would remove no more units than the current one
            now, i = u.removed(fractions[levels[u.name]]), levels[u.name] + 1
            while i + 1 < len(fractions) and u.removed(fractions[i]) == now:
                i += 1
            n = u.removed(fractions[i])
            change = f"remove {n} of {len(u.scores)} {u.kind}"
            last = i + 1 == len(fractions)
            if n == now or not attempt({**levels, u.name: i}, u.name, change) or last:
                open_units.remove(u)
            if time.monotonic() > deadline:
                break
    if time.monotonic() > deadline:
        reason = f"time budget of {time_budget_s}s spent after {len(decisions)} candidates"
        decisions.append(Decision("all", "stop the search", False, reason))

    before, after = parameter_count(model), parameter_count(best)
    logger.info("pruned %d -> %d parameters in %d candidates", before, after, len(decisions))
    return best, decisions


def prune_fraction(
    model: nn.Module, batches: Sequence[tuple], fraction: float, *, forward: Forward
) -> nn.Module:
    """Remove the least important `fraction` of heads and neurons in every layer.

    Raises:
        ConfigError: `fraction` is outside [0, 1).
        OptimizeError: the model has nothing this function knows how to prune.

    Example:
        >>> half = prune_fraction(encoder, batches, 0.5, forward=embed)
    """
    if not isinstance(fraction, int | float) or not 0 <= fraction < 1:
        raise ConfigError(f"fraction {shorten(fraction)} must be in [0, 1), e.g. 0.3")
    base = copy.deepcopy(model).eval()
    units = _score(base, batches, forward)
    return _remove(base, units, {u.name: fraction for u in units})


@torch.no_grad()
def prune_magnitude_(model: nn.Module, sparsity: float) -> Decision:
    """Zero the smallest weights of every Linear layer, in place: for size only.

    Zeros do not make dense matmul faster; this pays off only where the
    weights are stored compressed or run by a sparse kernel.

    Args:
        model: the model to change; the share `sparsity` of each Linear's
            weights, smallest magnitude first, becomes zero. Biases stay.
        sparsity: the fraction of weights to zero, in [0, 1).

    Returns:
        The decision, to add to an optimization report.

    Raises:
        ConfigError: `sparsity` is outside [0, 1).
        OptimizeError: the model has no nn.Linear.

    Example:
        >>> prune_magnitude_(model, 0.5)
    """
    if isinstance(sparsity, bool) or not isinstance(sparsity, int | float):
        raise ConfigError(f"sparsity {shorten(sparsity)} must be a number in [0, 1), e.g. 0.5")
    if not 0 <= sparsity < 1:
        raise ConfigError(f"sparsity {sparsity!r} must be in [0, 1), e.g. 0.5")
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise OptimizeError(_no_linear(model))

    for linear in linears:
        weight = linear.weight
        # round up, so that every layer reaches at least the sparsity asked
        k = math.ceil(sparsity * weight.numel())
        if k:
            smallest = weight.abs().flatten().topk(k, largest=False).indices
            keep = torch.ones(weight.numel(), dtype=torch.bool, device=weight.device)
            keep[smallest] = False
            weight.mul_(keep.view_as(weight))
    change = f"zero the {sparsity:.0%} smallest weights of {len(linears)} Linear layers"
    reason = "for size only: zeros do not make dense matmul faster"
    return Decision("all Linear layers", change, True, reason)


def distill(
    student: nn.Module,
    teacher: nn.Module,
    batches: Sequence[tuple],
    *,
    forward: Forward,
    time_budget_s: float,
    lr: float = 2e-5,
) -> nn.Module:
    """Fine-tune `student` to give the outputs of `teacher`, for `time_budget_s` seconds.

    The loss is the mean squared error between `forward` outputs; for unit
    vectors, such as sentence embeddings, that is 2 * (1 - cosine). Embedding
    tables are left as they are: the batches touch only a few of their rows,
    and moving those alone would set the calibration text apart from the rest.

    Args:
        student: the model to train, in place (a pruned copy of `teacher`).
        teacher: the reference model; only its outputs are used.
        batches: the inputs to train on, cycled until the time is spent.
        forward: as for `prune_structured`; it must leave autograd on.
        time_budget_s: the training time, in seconds.
        lr: the Adam learning rate.

    Returns:
        `student`, in eval mode.

    Raises:
        ConfigError: `batches` is empty, or `time_budget_s` or `lr` is not positive.

    Example:
        >>> pruned = distill(pruned, original, batches, forward=embed, time_budget_s=30)
    """
    if not batches:
        raise ConfigError("batches is empty; pass at least one batch of inputs to train on")
    _check_time(time_budget_s, required=True)
    if not isinstance(lr, int | float) or not lr > 0:
        raise ConfigError(f"lr {shorten(lr)} must be a positive number, e.g. 2e-5")

    # the teacher's answers do not change, so compute them once
    training = teacher.training
    with torch.no_grad():
        targets = [forward(teacher.eval(), batch).detach().float() for batch in batches]
    teacher.train(training)

    # embeddings get no gradient at all: the wide token table is most of a
    # backward pass's memory traffic, and the batches would move few of its rows
    frozen = [
        p
        for m in student.modules()
        if isinstance(m, nn.Embedding)
        for p in m.parameters()
        if p.requires_grad
    ]
    for p in frozen:
        p.requires_grad_(False)
    optimizer = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=lr)
    student.train()
    deadline, step, losses = time.monotonic() + time_budget_s, 0, []
    try:
        while time.monotonic() < deadline:
            i = step % len(batches)
            value = F.mse_loss(forward(student, batches[i]).float(), targets[i])
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            losses.append(value.item())
            step += 1
    finally:
        for p in frozen:
            p.requires_grad_(True)
    if losses:
        logger.info("distilled %d steps in %.1fs: mse %.3g -> %.3g", step, time_budget_s,
                    losses[0], losses[-1])  # fmt: skip
    return student.eval()


def _check_time(time_budget_s: float | None, *, required: bool) -> None:
    if time_budget_s is None and not required:
        return
    if not isinstance(time_budget_s, int | float) or not time_budget_s > 0:
        raise ConfigError(f"time_budget_s {shorten(time_budget_s)} must be a positive number")


def parameter_count(model: nn.Module) -> int:
    """The number of parameters of `model`: what structured pruning shrinks."""
    return sum(p.numel() for p in model.parameters())


def _no_linear(model: nn.Module) -> str:
    return (
        f"{type(model).__name__} has no nn.Linear layer; pruning removes rows and columns "
        "of Linear weights, so there is nothing to prune"
    )


def _find_units(model: nn.Module) -> list[_Units]:
    """The heads and neurons this module knows how to remove, not yet scored."""
    if not any(isinstance(m, nn.Linear) for m in model.modules()):
        raise OptimizeError(_no_linear(model))
    found = []
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, BertEncoder):
            for i, block in enumerate(module.blocks):
                at = f"{prefix}blocks.{i}"
                found.append(_Units(f"{at}.attn", "heads", f"{at}.attn", f"{at}.attn.proj",
                                    block.attn.head_size, torch.empty(0)))  # fmt: skip
                found.append(_Units(f"{at}.mlp", "neurons", f"{at}.mlp.fc", f"{at}.mlp.proj",
                                    1, torch.empty(0)))  # fmt: skip
        elif isinstance(module, nn.Sequential):
            children = list(module.named_children())
            for i, (writer, layer) in enumerate(children):
                j = i + 1
                while j < len(children) and isinstance(children[j][1], _ELEMENTWISE):
                    j += 1
                if isinstance(layer, nn.Linear) and j < len(children):
                    reader, after = children[j]
                    if isinstance(after, nn.Linear):
                        w, r = prefix + writer, prefix + reader
                        found.append(_Units(w, "neurons", w, r, 1, torch.empty(0)))
    if not found:
        raise OptimizeError(
            f"{type(model).__name__} has Linear layers but nothing to prune: pruning needs a "
            "BertEncoder or Linear -> elementwise activation -> Linear inside an nn.Sequential"
        )
    return found


@torch.no_grad()
def _score(model: nn.Module, batches: Sequence[tuple], forward: Forward) -> list[_Units]:
    """Rank every unit by the error its removal adds to the output of its layer.

    Removing a unit takes away exactly its contribution to the reader's output:
    a_j * w_j for neuron j (w_j its column in the reader), W_h y_h for head h.
    `_remove` moves the unit's mean contribution into the reader's bias, so the
    error left is its variance: Var(a_j) |w_j|^2, or E|W_h (y_h - E y_h)|^2.
    Unlike weight magnitude this sees how strongly a unit fires on real
    inputs, and it scores heads and neurons in the same units. Averages count
    real tokens only, never padding.

    NOTE: scores are measured once, on the unpruned model, one unit at a time;
    they miss how removed units interact and how later layers amplify the
    error, which is why every candidate is checked against the caller's loss.
    """
    if not batches:
        raise ConfigError("batches is empty; pass at least one batch of calibration inputs")
    units = _find_units(model)
    stats = {u.name: [0.0, 0.0, 0.0] for u in units}  # tokens, sum of x, sum of x x^T
    mask: dict[str, torch.Tensor | None] = {"now": None}

    def capture_mask(module, args, kwargs):
        mask["now"] = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)

    def hook_for(name: str):
        def hook(module, args):
            x = args[0].detach().float()
            now = mask["now"]
            if now is not None and x.dim() == 3 and tuple(now.shape) == tuple(x.shape[:2]):
                weights = now.reshape(-1).float()
            else:
                weights = x.new_ones(x.shape[:-1].numel())
            x = x.reshape(-1, x.shape[-1])  # (N, F)
            acc = stats[name]
            acc[0] += weights.sum()
            acc[1] += weights @ x
            acc[2] += (x * weights[:, None]).T @ x

        return hook

    handles = [
        m.register_forward_pre_hook(capture_mask, with_kwargs=True)
        for m in model.modules()
        if isinstance(m, BertEncoder)
    ]
    for u in units:
        reader = model.get_submodule(u.reader)
        handles.append(reader.register_forward_pre_hook(hook_for(u.name)))
    try:
        for batch in batches:
            forward(model, batch)
    finally:
        for handle in handles:
            handle.remove()

    for u in units:
        tokens, sum_x, sum_xx = stats[u.name]
        if not tokens:
            raise OptimizeError(
                f"layer {u.reader!r} saw no input while forward ran the calibration batches; "
                "check that forward(model, batch) calls the model it is given"
            )
        reader = model.get_submodule(u.reader)
        # without a bias there is nowhere to move a mean to, so score the raw energy
        u.mean = sum_x / tokens if reader.bias is not None else torch.zeros_like(sum_x)
        u.cov = sum_xx / tokens - torch.outer(u.mean, u.mean)
        n = reader.in_features // u.size
        w = reader.weight.float().view(reader.out_features, n, u.size)  # (C, n, size)
        gram = torch.einsum("cnd,cne->nde", w, w)  # (n, size, size)
        blocks = u.cov.view(n, u.size, n, u.size).diagonal(dim1=0, dim2=2)  # (size, size, n)
        u.scores = torch.einsum("nde,edn->n", gram, blocks)  # trace(W_n^T W_n C_nn)
    return units


@torch.no_grad()
def _remove(base: nn.Module, units: list[_Units], fractions: dict[str, float]) -> nn.Module:
    """A copy of `base` without the lowest-scored `fractions[name]` of each layer's units.

    The reader's kept columns and bias take over what they can of the removed
    units: the removed inputs are regressed on the kept ones over the
    calibration tokens (ridge-damped, so that a few hundred sentences do not
    overfit), which on MiniLM removes about 40% of the loss that moving only
    the mean into the bias leaves.
    """
    model = copy.deepcopy(base)
    for u in units:
        keep = u.keep(fractions.get(u.name, 0.0))
        if len(keep) == len(u.scores):
            continue
        dropped = torch.ones(len(u.scores), dtype=torch.bool)
        dropped[keep] = False
        k, d = u.columns(keep), u.columns(dropped.nonzero().flatten())

        # x_d ~ mean_d + B^T (x_k - mean_k), with B = (C_kk + damping)^-1 C_kd
        c_kk = u.cov[k][:, k]
        c_kk += _DAMPING * c_kk.diagonal().mean() * torch.eye(len(k))
        b = torch.linalg.solve(c_kk, u.cov[k][:, d])  # (k, d)
        reader = model.get_submodule(u.reader)
        w_d = reader.weight[:, d].float()
        reader.weight[:, k] += (w_d @ b.T).to(reader.weight.dtype)
        if reader.bias is not None:
            shift = w_d @ (u.mean[d] - b.T @ u.mean[k])
            reader.bias += shift.to(reader.bias.dtype)

        if u.kind == "heads":
            model.get_submodule(u.writer).keep_heads_(keep.tolist())
        else:
            _keep_(model.get_submodule(u.writer), rows=keep)
            _keep_(reader, cols=keep)
    return model


def _keep_(linear: nn.Linear, *, rows=None, cols=None) -> None:
    """Keep the given output rows or input columns of `linear`, in place.

    In place rather than a new module, so that a Linear that reads one pair's
    neurons and writes the next pair's can be cut on both sides.
    """
    if rows is not None:
        linear.weight = nn.Parameter(linear.weight[rows].clone())
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias[rows].clone())
        linear.out_features = len(rows)
    if cols is not None:
        linear.weight = nn.Parameter(linear.weight[:, cols].clone())
        linear.in_features = len(cols)
