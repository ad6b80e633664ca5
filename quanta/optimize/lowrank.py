"""Low-rank factorization of `nn.Linear` layers, weighted by the activations they see.

A dense layer y = x W^T + b with W (N, K) costs N*K multiply-adds per row; as
two thin products W ≈ U V, U (N, r) and V (r, K), it costs r*(N + K), which is
less only below the break-even rank N*K / (N + K).

Plain truncated SVD keeps the directions of W with the most energy, as if every
input channel mattered equally. They do not: the layer's output error is
(W - W') x, so an error in a column of W that meets large activations costs far
more than one in a column whose inputs are near zero. Activation-aware SVD
(ASVD) scales each column by its channel's root mean square input s_j,
factorizes W S = U Σ V^T, truncates, and undoes the scaling:

    W ≈ U_r Σ_r (V_r^T S^-1)

Were the channels uncorrelated, ||(W - W') S|| would be exactly the expected
output error, which truncated SVD minimizes; for real activations it is a cheap
and good proxy.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from quanta.errors import ConfigError, OptimizeError, shorten
from quanta.optimize.report import Decision

__all__ = [
    "Decision",
    "LowRankLinear",
    "break_even_rank",
    "factorize",
    "input_statistics",
    "lowrank",
]

logger = logging.getLogger(__name__)

Forward = Callable[[nn.Module, tuple], Any]
Loss = Callable[[nn.Module], float]


class LowRankLinear(nn.Module):
    """y = (x V^T) U^T + b: a linear layer as two thin products through `rank` channels.

    Args:
        in_features: K, the size of each input row.
        out_features: N, the size of each output row.
        rank: r, the width of the product in between.
        bias: whether the layer adds a bias of N values.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True):
        super().__init__()
        _check_rank(rank, out_features, in_features)
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False)  # V: (r, K)
        self.up = nn.Linear(rank, out_features, bias=bias)  # U: (N, r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # an input of another float type is computed in the weights' type and
        # handed back in its own, as a drop-in replacement must accept it; a
        # half quantized later (int8 codes) takes any float input as it is
        h = self.down(_as_input_of(self.down, x))  # (..., K) -> (..., r)
        return self.up(_as_input_of(self.up, h)).to(x.dtype)  # (..., r) -> (..., N)

    @property
    def macs(self) -> int:
        """Multiply-adds per input row: r * (K + N)."""
        return self.rank * (self.in_features + self.out_features)

    @property
    def bias(self) -> torch.Tensor | None:
        """The bias, added after the second product, as in `nn.Linear`."""
        return self.up.bias

    def spec(self) -> dict[str, Any]:
        """The shapes as plain JSON, enough for `empty()` to rebuild this module."""
        return _spec(self, self.rank)

    @classmethod
    def empty(
        cls, spec: dict[str, Any], *, device: torch.device | str | None = None
    ) -> LowRankLinear:
        """An uninitialized layer with the shapes of `spec`, ready for `load_state_dict`.

        Raises:
            ConfigError: `spec` is not one that `spec()` writes.

        Example:
            >>> layer = LowRankLinear.empty(factorized.spec())
            >>> layer.load_state_dict(factorized.state_dict())
        """
        fields = ("in_features", "out_features", "rank", "bias")
        if not isinstance(spec, dict) or spec.get("kind") != "lowrank" or set(fields) - set(spec):
            message = f"spec {shorten(spec)} is not a low-rank spec with {fields}"
            raise ConfigError(f"{message}; pass what layer.spec() returns")
        # parameters on the meta device cost nothing to build; to_empty allocates
        # them without the random initialization a load would overwrite anyway
        with torch.device("meta"):
            module = cls(*(spec[name] for name in fields))
        return module.to_empty(device=device or "cpu")


def _as_input_of(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    weight = layer.weight
    return x.to(weight.dtype) if weight.is_floating_point() else x


def break_even_rank(linear: nn.Linear) -> int:
    """The largest rank whose two products cost strictly less than the dense layer.

    r*(N + K) < N*K, so r = floor((N*K - 1) / (N + K)); 0 when no rank saves work.

    Example:
        >>> break_even_rank(nn.Linear(384, 1152))  # 384*1152 / 1536 = 288
        287
    """
    n, k = linear.out_features, linear.in_features
    return (n * k - 1) // (n + k)


def input_statistics(
    model: nn.Module, batches: Iterable[tuple], *, forward: Forward | None = None
) -> dict[str, torch.Tensor]:
    """The root mean square of every input channel of every `nn.Linear`, over the batches.

    Args:
        model: the model to run; it is not changed.
        batches: calibration batches, each a tuple of positional arguments.
        forward: `forward(model, batch)` runs the model; by default `model(*batch)`.

    Returns:
        For each layer name from `model.named_modules()` that saw input, a float32
        tensor of shape (in_features,).

    Raises:
        OptimizeError: the model has no `nn.Linear`.
        ConfigError: no batch ran through a linear layer.

    NOTE: one number per channel ignores how channels correlate; whitening with
    the full (K, K) input covariance (as SVD-LLM does) bounds the output error
    exactly, at the cost of a K*K matrix per layer. Every row a layer sees
    counts, the padding positions of a padded batch too: batches sorted by
    length keep them few.
    """
    layers = _linears(model)
    forward = forward or (lambda model, batch: model(*batch))
    squares: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}

    def record(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            x = args[0].detach().reshape(-1, module.in_features)  # (rows, K)
            total = x.double().square().sum(dim=0)
            squares[name] = squares[name] + total if name in squares else total
            rows[name] = rows.get(name, 0) + x.shape[0]

        return hook

    handles = [layer.register_forward_hook(record(name)) for name, layer in layers.items()]
    try:
        with torch.no_grad():
            for batch in batches:
                forward(model, batch if isinstance(batch, tuple | list) else (batch,))
    finally:
        for handle in handles:
            handle.remove()
    if not rows:
        raise ConfigError("no calibration batch ran through a linear layer; pass at least one")
    return {name: (squares[name] / rows[name]).sqrt().float() for name in squares}


def factorize(linear: nn.Linear, rank: int, scale: torch.Tensor | None = None) -> LowRankLinear:
    """Factorize a layer at `rank`, activation-aware when given each input channel's scale.

    Args:
        linear: the dense layer; it is not changed.
        rank: r, from 1 to min(out_features, in_features).
        scale: (in_features,) non-negative weights of the input channels, such as
            `input_statistics()` returns; None gives plain truncated SVD.

    Returns:
        A `LowRankLinear` with the layer's device, dtype and bias.

    Raises:
        OptimizeError: `linear` is not an `nn.Linear`.
        ConfigError: the rank or the scale does not fit the layer.

    Example:
        >>> stats = input_statistics(model, batches)
        >>> model.fc = factorize(model.fc, 64, stats["fc"])
    """
    return _Spectrum(linear, scale).truncate(rank)


class _Spectrum:
    """The SVD of one layer's scaled weight, computed once and truncated at any rank."""

    def __init__(self, linear: nn.Linear, scale: torch.Tensor | None):
        if not isinstance(linear, nn.Linear):
            raise OptimizeError(f"cannot factorize {type(linear).__name__}; pass an nn.Linear")
        self.linear = linear
        weight = linear.weight.detach().double()  # (N, K)
        s = _check_scale(scale, linear)

        # W S = U Σ V^T; each factor takes sqrt(Σ) so both keep moderate values
        u, sigma, vh = torch.linalg.svd(weight * s, full_matrices=False)  # (N, R), (R,), (R, K)
        root = sigma.sqrt()
        self.up = u * root  # (N, R)
        # undo the scaling on the input side: V^T S^-1
        self.down = root[:, None] * vh / s  # (R, K)

    def truncate(self, rank: int) -> LowRankLinear:
        linear, weight = self.linear, self.linear.weight
        _check_rank(rank, linear.out_features, linear.in_features)
        layer = LowRankLinear.empty(_spec(linear, rank), device=weight.device).to(weight.dtype)
        with torch.no_grad():
            layer.down.weight.copy_(self.down[:rank])
            layer.up.weight.copy_(self.up[:, :rank])
            if linear.bias is not None:
                layer.up.bias.copy_(linear.bias)
        return layer


def lowrank(
    model: nn.Module,
    batches: Iterable[tuple],
    loss: Loss,
    max_loss: float,
    *,
    forward: Forward | None = None,
    rank_multiple: int = 8,
) -> tuple[nn.Module, list[Decision]]:
    """Factorize each `nn.Linear` at the smallest rank the loss budget allows.

    Layers are visited in order. Layer i may bring the whole model's loss up to
    its cumulative share of `max_loss`, shares in proportion to the layers'
    dense cost, so big layers get more and what one layer leaves unused passes
    on to the next; the model stays within `max_loss` after every layer. A layer
    is tried first at the largest rank that still saves work (one evaluation;
    most layers that cannot be factorized stop there), then the smallest rank
    that fits is found by bisection over multiples of `rank_multiple`.

    Args:
        model: the model to optimize; it is not changed.
        batches: calibration batches, each a tuple of positional arguments.
        loss: `loss(candidate)`, the quality drop of a candidate against the
            original on held-out data: 0 for none, bigger is worse.
        max_loss: the budget for the whole model, 0 or more.
        forward: `forward(model, batch)` runs the model; by default `model(*batch)`.
        rank_multiple: candidate ranks are multiples of this (hardware likes
            multiples of 8); layers too small for one try every rank.

    Returns:
        A new model, and one `Decision` per `nn.Linear` in `named_modules()` order.

    Raises:
        OptimizeError: the model has no `nn.Linear`.
        ConfigError: `max_loss` or `rank_multiple` is out of range.

    NOTE: the input statistics are the original model's; once earlier layers are
    factorized, later layers see slightly different inputs, and recollecting
    would cost a calibration pass per layer. Budget that the last layers leave
    unused is not offered back to earlier ones. With a discrete loss, such as an
    accuracy drop, a budget of 0 still admits changes that leave it at 0.

    Example:
        >>> smaller, decisions = lowrank(model, batches, accuracy_drop, 0.01)
        >>> [d.change for d in decisions if d.kept]
    """
    if not (isinstance(max_loss, int | float) and 0 <= max_loss < math.inf):
        raise ConfigError(f"max_loss {shorten(max_loss)} must be a finite number, 0 or more")
    if not (isinstance(rank_multiple, int) and rank_multiple >= 1):
        raise ConfigError(f"rank_multiple {shorten(rank_multiple)} must be an integer, 1 or more")
    if isinstance(model, nn.Linear):
        raise OptimizeError("lowrank() replaces layers in a model; call factorize() on a layer")
    stats = input_statistics(model, batches, forward=forward)
    # the copy's own layers, so that a layer left dense is never shared with `model`
    work = copy.deepcopy(model)
    layers = _linears(work)

    total = sum(layer.out_features * layer.in_features for layer in layers.values())
    spent = 0
    decisions = []
    for name, layer in layers.items():
        spent += layer.out_features * layer.in_features
        allowance = max_loss * spent / total
        if name in stats:
            spectrum = _Spectrum(layer, stats[name])
            decision = _choose_rank(work, name, spectrum, loss, allowance, rank_multiple)
        else:
            # never called: unused, or read by weight (nn.MultiheadAttention's
            # out_proj), where a LowRankLinear in its place would break the model
            reason = "no calibration input reached it"
            decision = Decision(name, "lowrank", False, reason)
        decisions.append(decision)
        done = decision.change if decision.kept else "kept dense"
        logger.info("%s: %s (%s)", name, done, decision.reason)
    return work, decisions


def _choose_rank(
    work: nn.Module, name: str, spectrum: _Spectrum, loss: Loss, allowance: float, multiple: int
) -> Decision:
    """Find the smallest rank of one layer within `allowance`; leave it in `work` if any."""
    layer = spectrum.linear
    n, k = layer.out_features, layer.in_features
    limit = break_even_rank(layer)
    change = f"lowrank below break-even rank {limit} of {min(n, k)}"
    if limit < 1:
        return Decision(name, change, False, f"no rank of a {n}x{k} layer saves work")
    ranks = list(range(multiple, limit + 1, multiple)) or list(range(1, limit + 1))

    def measure(rank: int) -> float:
        work.set_submodule(name, spectrum.truncate(rank))
        value = float(loss(work))
        logger.debug("%s at rank %d: loss %.6g (allowance %.6g)", name, rank, value, allowance)
        return value

    # the largest rank that saves work is the most accurate; if even it fails,
    # no smaller one is worth trying (loss grows as rank falls)
    top = measure(ranks[-1])
    if not top <= allowance:
        work.set_submodule(name, layer)
        reason = f"rank {ranks[-1]} already gives loss {top:.4g} > allowance {allowance:.4g}"
        return Decision(name, change, False, reason, top)

    # bisection: ranks[hi] fits and ranks[lo] does not
    # NOTE: this assumes the loss falls as the rank rises; where it does not, the
    # rank found fits but may not be the smallest that does
    lo, hi, best = -1, len(ranks) - 1, top
    while hi - lo > 1:
        mid = (lo + hi) // 2
        value = measure(ranks[mid])
        if value <= allowance:
            hi, best = mid, value
        else:
            lo = mid
    rank = ranks[hi]
    work.set_submodule(name, spectrum.truncate(rank))
    change = f"lowrank rank {rank} of {min(n, k)}: {n * k} -> {rank * (n + k)} MACs per row"
    reason = f"the smallest rank with loss {best:.4g} <= allowance {allowance:.4g}"
    return Decision(name, change, True, reason, best)


def _linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every `nn.Linear` by name, except the halves of layers already factorized."""
    factorized = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    inner = {id(half) for module in factorized for half in (module.down, module.up)}
    named = model.named_modules()
    layers = {name: m for name, m in named if isinstance(m, nn.Linear) and id(m) not in inner}
    if not layers:
        raise OptimizeError(
            f"{type(model).__name__} has no nn.Linear layer to factorize; "
            "low-rank factorization only applies to models built from nn.Linear"
        )
    return layers


def _check_rank(rank: int, n: int, k: int) -> None:
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= min(n, k):
        raise ConfigError(
            f"rank {shorten(rank)} does not fit a {n}x{k} layer; "
            f"choose an integer from 1 to {min(n, k)}"
        )


def _spec(layer: nn.Linear | LowRankLinear, rank: int) -> dict[str, Any]:
    k, n, bias = layer.in_features, layer.out_features, layer.bias is not None
    return {"kind": "lowrank", "in_features": k, "out_features": n, "rank": rank, "bias": bias}


def _check_scale(scale: torch.Tensor | None, linear: nn.Linear) -> torch.Tensor:
    """The column scale in float64, with channels that never fire lifted off zero."""
    device = linear.weight.device
    if scale is None:
        return torch.ones(linear.in_features, dtype=torch.float64, device=device)
    s = torch.as_tensor(scale).detach().to(device=device, dtype=torch.float64)
    if s.shape != (linear.in_features,) or not bool(torch.isfinite(s).all() and (s >= 0).all()):
        raise ConfigError(
            f"scale of shape {tuple(s.shape)} must hold {linear.in_features} finite "
            "values, 0 or more; pass input_statistics()[name]"
        )
    if float(s.max()) == 0.0:
        return torch.ones_like(s)
    # a column of W S near zero still comes back as W's own column projected
    # onto the kept subspace, so a tiny floor is exact enough and avoids 1/0
    return s.clamp(min=float(s.max()) * 1e-8)
