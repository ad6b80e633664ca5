"""Quantized replacements for `nn.Linear`: int8 with SmoothQuant, int4 weight-only, bf16.

    Int8Linear   int8 weights and activations, the product in `torch._int_mm`; for speed
    Int4Linear   int4 weights in groups along K, dequantized for `F.linear`; for size
    Bf16Linear   bf16 weights and arithmetic; for speed where int8 loses accuracy

Each keeps its tensors as buffers, so `state_dict()` round-trips through
safetensors, and a loader rebuilds it with `LAYERS[spec["kind"]].empty(spec)`.
`smooth_scales` and `has_outliers` decide SmoothQuant smoothing.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from quanta.errors import ConfigError, shorten

__all__ = [
    "Int8Linear",
    "Int4Linear",
    "Bf16Linear",
    "LAYERS",
    "smooth_scales",
    "has_outliers",
    "nbytes",
]

# the floor for a scale, so that an all-zero row or group divides by no zero
_TINY = 1e-12
# Per-token int8 leaves a median channel 127/ratio levels: 16 (4 bits) at 8.
# On all-MiniLM-L6-v2, smoothing (alpha 0.5) halves the int8 error of every
# mlp.fc (ratios 10-20), cuts qkv's (4-7) by ~20% and not attn.proj's (2-3);
# on mlp.proj (5-25, after GELU) it is mixed, so a caller should still measure.
_OUTLIER_RATIO = 8.0


class _QuantLinear(nn.Module):
    """What every layer here shares: shapes, an optional bias, `spec()` and `empty(spec)`."""

    kind: ClassVar[str]

    def __init__(self, in_features: int, out_features: int, bias: bool, bias_dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", torch.empty(out_features, dtype=bias_dtype) if bias else None)

    def _options(self) -> dict[str, Any]:
        bias = self.bias is not None
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": bias}

    def _copy_bias(self, linear: nn.Linear) -> None:
        if linear.bias is not None:
            self.bias.copy_(linear.bias.detach())

    def spec(self) -> dict[str, Any]:
        """Return the JSON-able kind and options that `empty` rebuilds this layer from."""
        return {"kind": self.kind, **self._options()}

    @classmethod
    def empty(cls, spec: dict[str, Any]) -> _QuantLinear:
        """Build a layer of the shapes in `spec` with uninitialized tensors.

        Raises:
            ConfigError: `spec` names another kind, or has options this kind lacks.
        """
        if spec.get("kind") != cls.kind:
            raise ConfigError(
                f"{cls.__name__}.empty got a spec of kind {spec.get('kind')!r}; "
                f"pass a spec whose kind is {cls.kind!r}, or use LAYERS[spec['kind']]"
            )
        try:
            return cls(**{key: value for key, value in spec.items() if key != "kind"})
        except TypeError as exc:
            raise ConfigError(
                f"spec {shorten(spec)} does not fit {cls.__name__} ({exc}); "
                f"pass a spec made by {cls.__name__}.spec()"
            ) from exc

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value}" for key, value in self._options().items())


class Int8Linear(_QuantLinear):
    """W8A8 linear: int8 weights per output channel, int8 activations per token.

    The weight (N, K) is stored symmetric with one scale per row. At run time
    each row of the flattened input gets its own scale absmax/127, the product
    runs in `torch._int_mm` with int32 sums, and the sums are rescaled by the
    token scale times the channel scale. With `smooth` (SmoothQuant, a vector
    s of K factors) the layer stores W * s and divides the input by s.

    NOTE: on CPU (torch 2.13) `torch._int_mm` takes any shape, M <= 16 and K, N
    not multiples of 8 included; on CUDA it needs M > 16 and K, N multiples of 8,
    so this layer is for CPU inference. Inputs with inf or nan give garbage rows.
    """

    kind = "int8"

    def __init__(
        self, in_features: int, out_features: int, *, bias: bool = True, smooth: bool = False
    ):
        super().__init__(in_features, out_features, bias, torch.float32)
        # (N, K) as in nn.Linear: on Zen 4 with 2 threads, `_int_mm` took the same
        # time (within 3%) on its transposed view as on a contiguous (K, N) copy,
        # at 2368 and at 8 rows, for all of MiniLM's four shapes
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.empty(out_features))
        self.register_buffer("smooth", torch.empty(in_features) if smooth else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, smooth: torch.Tensor | None = None) -> Int8Linear:
        """Quantize a float `nn.Linear`, optionally smoothed by SmoothQuant factors.

        Args:
            linear: the layer to replace.
            smooth: K positive factors from `smooth_scales`, or None for none.

        Raises:
            ConfigError: `smooth` has the wrong size or a non-positive entry.

        Example:
            >>> q = Int8Linear.from_linear(nn.Linear(384, 1152))
        """
        K = linear.in_features
        layer = cls(K, linear.out_features, bias=linear.bias is not None, smooth=smooth is not None)
        layer._copy_bias(linear)
        weight = linear.weight.detach().float()
        if smooth is not None:
            smooth = smooth.detach().float().flatten()
            if smooth.numel() != K or not bool(torch.isfinite(smooth).all() & (smooth > 0).all()):
                raise ConfigError(
                    f"smooth must be {K} finite positive factors, got {smooth.numel()}: "
                    f"{shorten(smooth.tolist())}; compute them with smooth_scales()"
                )
            layer.smooth.copy_(smooth)
            weight = weight * smooth  # (N, K): column j scaled by s_j

        # symmetric per output channel: the row's absmax maps to 127
        scale = weight.abs().amax(dim=1).clamp_(min=_TINY) / 127
        layer.weight.copy_(torch.round(weight / scale[:, None]).clamp_(-127, 127))
        layer.weight_scale.copy_(scale)
        return layer

    def _options(self) -> dict[str, Any]:
        return {**super()._options(), "smooth": self.smooth is not None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        rows = x.reshape(-1, self.in_features)  # (M, K)

        # quantize in fp32; a fresh tensor may be scaled in place, the caller's
        # may not. A bf16 input is cast first and then divided by s: a mixed
        # bf16 x fp32 elementwise op ran 20x slower than fp32 x fp32 at K=1536
        owned = rows.dtype != torch.float32
        rows = rows.float()
        if self.smooth is not None:
            rows = rows.div_(self.smooth) if owned else torch.div(rows, self.smooth)
            owned = True

        # per-token absmax from amax and amin: two reads and no |x| temporary
        absmax = torch.maximum(rows.amax(-1, keepdim=True), rows.amin(-1, keepdim=True).neg_())
        factor = 127 / absmax.clamp_(min=_TINY)  # (M, 1)
        scaled = rows.mul_(factor) if owned else rows.mul(factor)
        q = scaled.round_().to(torch.int8)  # |q| <= 127 by construction

        acc = torch._int_mm(q, self.weight.t())  # (M, N) int32
        # convert the sums to fp32 in their own memory: fresh memory costs page
        # faults, which on our VM took longer than the product itself
        out = acc.view(torch.float32).copy_(acc).mul_(self.weight_scale)
        token_scale = absmax.div_(127)
        if self.bias is not None:
            torch.addcmul(self.bias, out, token_scale, out=out)
        else:
            out.mul_(token_scale)
        return out.to(dtype).reshape(*shape[:-1], self.out_features)


class Int4Linear(_QuantLinear):
    """Weight-only int4 linear, for size rather than speed.

    The weight is cut into groups of `group_size` (even, 32 to 128, dividing K)
    along K. Each group has a `scale_dtype` (float16 or bfloat16) scale and, if
    not `symmetric`, a zero point, so that its codes span min..max instead of
    -8..7; the codes are 4 bits, two a byte. Forward dequantizes the weight to
    the input dtype and calls `F.linear`, so it is slower than `nn.Linear`:
    the gain is memory and file size, about 1/7 of fp32 at group size 64.

    NOTE: with fp16 scales a group whose range is under ~1e-3 loses precision
    (fp16 has no normal number below 6.1e-5); use bf16 scales for such weights.
    """

    kind = "int4"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = True,
        group_size: int = 64,
        symmetric: bool = False,
        scale_dtype: torch.dtype | str = torch.float16,
    ):
        dtype = _check_int4(in_features, group_size, scale_dtype)
        super().__init__(in_features, out_features, bias, dtype)
        self.group_size, self.symmetric, self.scale_dtype = group_size, symmetric, dtype
        groups = (out_features, in_features // group_size)
        packed = torch.empty(out_features, in_features // 2, dtype=torch.uint8)
        self.register_buffer("weight", packed)
        self.register_buffer("scales", torch.empty(groups, dtype=dtype))
        self.register_buffer("zeros", None if symmetric else torch.empty(groups, dtype=dtype))

    @classmethod
    def from_linear(cls, linear: nn.Linear, **options: Any) -> Int4Linear:
        """Quantize a float `nn.Linear` to packed int4 groups.

        Args:
            linear: the layer to replace.
            **options: `group_size`, `symmetric`, `scale_dtype`, as for the class.

        Raises:
            ConfigError: a bad group size or scale dtype.

        Example:
            >>> q = Int4Linear.from_linear(nn.Linear(384, 1536), group_size=128)
        """
        N, K = linear.out_features, linear.in_features
        layer = cls(K, N, bias=linear.bias is not None, **options)
        layer._copy_bias(linear)
        w = linear.weight.detach().float().reshape(N, K // layer.group_size, layer.group_size)
        floor = torch.finfo(layer.scale_dtype).tiny

        # quantize with the scales as stored, so that the codes fit them
        if layer.symmetric:
            scale = (w.abs().amax(-1) / 7).clamp_(min=floor).to(layer.scale_dtype)
            zero = torch.full_like(scale, 8, dtype=torch.float32)
        else:
            # the range always holds 0, so that the zero point lies in 0..15
            low, high = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
            scale = ((high - low) / 15).clamp_(min=floor).to(layer.scale_dtype)
            zero = (-low / scale.float()).to(layer.scale_dtype)
            layer.zeros.copy_(zero)
        layer.scales.copy_(scale)
        codes = torch.round(w / scale.float()[..., None] + zero.float()[..., None])
        codes = codes.clamp_(0, 15).to(torch.uint8).reshape(N, K)

        # two codes a byte: even k in the low nibble, odd k in the high one
        layer.weight.copy_(codes[:, 0::2] | (codes[:, 1::2] << 4))
        return layer

    def _options(self) -> dict[str, Any]:
        dtype = str(self.scale_dtype).removeprefix("torch.")
        options = {"group_size": self.group_size, "symmetric": self.symmetric, "scale_dtype": dtype}
        return {**super()._options(), **options}

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Return the (N, K) weight as `dtype`, computed in fp32."""
        N, K, G = self.out_features, self.in_features, self.in_features // self.group_size
        codes = torch.stack((self.weight & 15, self.weight >> 4), dim=-1)  # (N, K/2, 2)
        codes = codes.reshape(N, G, self.group_size).float()
        zero = 8.0 if self.zeros is None else self.zeros.float()[..., None]
        return ((codes - zero) * self.scales.float()[..., None]).reshape(N, K).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize(x.dtype), bias)


class Bf16Linear(_QuantLinear):
    """Linear with bf16 weight and bias; the input is cast to bf16 and the output back."""

    kind = "bf16"

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True):
        super().__init__(in_features, out_features, bias, torch.bfloat16)
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.bfloat16))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Bf16Linear:
        """Copy a float `nn.Linear` into bf16.

        Example:
            >>> q = Bf16Linear.from_linear(nn.Linear(384, 384))
        """
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        layer.weight.copy_(linear.weight.detach())
        layer._copy_bias(linear)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(torch.bfloat16), self.weight, self.bias).to(x.dtype)


LAYERS: dict[str, type[_QuantLinear]] = {"int8": Int8Linear, "int4": Int4Linear, "bf16": Bf16Linear}


def _check_int4(in_features: int, group_size: int, scale_dtype: torch.dtype | str) -> torch.dtype:
    """Return the scale dtype, once the group size and the dtype are known to be usable."""
    ok = isinstance(group_size, int) and 32 <= group_size <= 128 and group_size % 2 == 0
    if not ok or in_features % group_size:
        fits = [g for g in (32, 64, 128) if in_features % g == 0]
        raise ConfigError(
            f"group_size={group_size!r} must be an even number from 32 to 128 that divides "
            f"in_features={in_features}; use one of {fits or 'none: keep this layer in bf16'}"
        )
    dtype = getattr(torch, scale_dtype, None) if isinstance(scale_dtype, str) else scale_dtype
    if dtype not in (torch.float16, torch.bfloat16):
        raise ConfigError(f"scale_dtype={scale_dtype!r} is not supported; use float16 or bfloat16")
    return dtype


def smooth_scales(
    weight: torch.Tensor, act_absmax: torch.Tensor, alpha: float = 0.5
) -> torch.Tensor:
    """Return SmoothQuant factors s_j = max|X_j|^alpha / max|W_j|^(1 - alpha).

    Dividing the input by s and multiplying the weight by s keeps the product
    but moves the range of outlier input channels into the weight.

    Args:
        weight: the (N, K) weight of the layer.
        act_absmax: the K per-channel absolute maxima of its input, from calibration.
        alpha: how much of the range to move, 0 (none) to 1 (all); 0.5 is the paper's.

    Returns:
        K finite positive factors, clamped to 1e-5..1e5.

    Raises:
        ConfigError: a shape mismatch, alpha outside 0..1, or a bad maximum.

    Example:
        >>> s = smooth_scales(linear.weight, x.abs().amax(dim=0))
    """
    K = weight.shape[-1]
    if act_absmax.shape != (K,):
        raise ConfigError(
            f"act_absmax has shape {tuple(act_absmax.shape)}, the weight has K={K}; "
            "pass one absolute maximum per input channel"
        )
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha={alpha!r} is outside 0..1; 0.5 suits most layers")
    if not bool(torch.isfinite(act_absmax).all() & (act_absmax >= 0).all()):
        raise ConfigError(
            f"act_absmax must be finite and non-negative, got {shorten(act_absmax.tolist())}; "
            "calibrate on inputs without inf or nan"
        )

    # a dead channel (max 0) would give s = 0, an inf once the input is divided
    x_max = act_absmax.detach().float().clamp(min=1e-5)
    w_max = weight.detach().float().abs().amax(dim=0).clamp_(min=1e-5)
    return (x_max.pow(alpha) / w_max.pow(1 - alpha)).clamp_(1e-5, 1e5)


def has_outliers(act_absmax: torch.Tensor, ratio: float = _OUTLIER_RATIO) -> bool:
    """Say whether a layer's input has outlier channels worth smoothing.

    True when the largest per-channel absmax is over `ratio` times the median
    one, so that per-token int8 leaves the typical channel few levels.

    Example:
        >>> has_outliers(torch.tensor([1.0] * 383 + [50.0]))
        True
    """
    absmax = act_absmax.detach().float()
    return bool(absmax.max() > ratio * absmax.median().clamp(min=_TINY))


def nbytes(layer: nn.Module) -> int:
    """Return the bytes of a layer's state: every tensor in `state_dict()`."""
    return sum(t.numel() * t.element_size() for t in layer.state_dict().values())
