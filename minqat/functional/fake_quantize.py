r"""Fake quantization with the clipped straight-through estimator, per tensor and per channel.

Fake quantization rounds a float tensor onto the integer grid of an affine quantizer and maps it
straight back to float, so training sees the quantization error (Jacob et al. 2018, "Quantization
and Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference", §3):

.. code-block:: text

    inv    = fl32(1 / scale)                    float32 reciprocal of the float32 scale
    x_int  = rint(fl32(x * inv)) + zero_point   rint = round half to even; zero point added AFTER rounding
    mask   = quant_min <= x_int <= quant_max    decided on the rounded value
    x_q    = clamp(x_int, quant_min, quant_max)
    x_hat  = (x_q - zero_point) * scale

Backward, the clipped straight-through estimator (Bengio et al. 2013; Jacob et al. 2018 §3.1):

.. code-block:: text

    dL/dx = dL/dx_hat * mask        (1 inside the representable range, 0 where the value was clipped)

``scale`` and ``zero_point`` get no gradient here (see ``minqat.functional.learnable`` for LSQ).

Why these exact steps (numerics.md §2.1-§2.4, §9): torch multiplies by the float32 reciprocal
instead of dividing (the two disagree on ~17 % of values near a tie), rounds half to even, and adds
the zero point after rounding. Edge values follow torch: per tensor, NaN maps to ``quant_min`` and
±inf to the clamp edges; per channel, torch casts ``x_int`` to int64 first, so NaN, +inf and values
beyond 2**63 all map to ``quant_min`` (a torch quirk reproduced on purpose); every one of them gets
gradient 0. Quant ranges wider than 2**24 leave float32's exact-integer range: there torch's kernel
keeps ``x_int`` in float32 and clamps in float64, and minqat does the same (the "wide" path).

Backward memory: only the boolean mask is saved (one byte per element); no float copy of ``x``.

>>> x = torch.tensor([-1.0, 0.05, 0.15, 0.25, 0.35, 3.0])
>>> fake_quantize_per_tensor_affine(x, 0.1, 0, 0, 20)       # 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, clamps
tensor([0.0000, 0.0000, 0.2000, 0.2000, 0.4000, 2.0000])
"""
from __future__ import annotations

import torch

from .._checks import check_axis, check_quant_range
from .float32 import fma32
from .qparams_args import per_channel_scale, per_channel_zero_point, per_tensor_scale, per_tensor_zero_point

__all__ = [
    "FakeQuantizePerTensorAffine",
    "fake_quantize_per_tensor_affine",
    "FakeQuantizePerChannelAffine",
    "fake_quantize_per_channel_affine",
]

_EXACT_INT_LIMIT = 2**24  # |integers| up to here are exact in float32


def _is_narrow(quant_min: int, quant_max: int) -> bool:
    """True when every grid integer and zero point is exact in float32 (the fast path)."""
    return max(abs(quant_min), abs(quant_max)) <= _EXACT_INT_LIMIT


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # float64 inputs round in float64 (numerics.md §2.1); float16/bfloat16 are computed in float32.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _per_tensor_forward(x, scale, zero_point, quant_min, quant_max):
    """Return ``(x_hat, mask)`` in x's dtype. ``scale``: 0-d float32, ``zero_point``: 0-d int64."""
    compute = _compute_dtype(x)
    inv = (1.0 / scale).to(compute)  # fl32(1/scale): float32 division, then widened if needed
    zp = zero_point.to(compute)  # added in the compute type: fl32(zp) for float32 input (§2.1)
    x_int = (x.to(compute) * inv).round_().add_(zp)  # rint(x * inv) + zero_point
    if _is_narrow(quant_min, quant_max):
        x_q = x_int.clamp(quant_min, quant_max)  # NaN stays NaN here
        mask = _unclipped(x_int, x_q)  # False where clipped, for ±inf and for NaN
        x_q = x_q.nan_to_num_(nan=quant_min)  # NaN -> quant_min
        x_hat = x_q.sub_(zp).to(torch.float32).mul_(scale)  # (x_q - zp) * scale, exact ints in float32
    else:  # wide range: like torch's kernel, compare in float32, clamp and subtract exactly,
        # round the integer difference to float32, multiply in float32.
        mask = (x_int >= float(quant_min)) & (x_int <= float(quant_max))
        x_q = x_int.double().clamp(quant_min, quant_max).nan_to_num_(nan=quant_min)
        x_hat = (x_q - zero_point).to(torch.float32).mul_(scale)
    return x_hat.to(x.dtype), mask


def _unclipped(x_int, x_q):
    """``x_int == x_q`` as a bool mask; CONSUMES ``x_int`` (left holding ``x_int - x_q``).

    Same values as ``==`` (a - b == 0 exactly when a == b; NaN and ±inf give a non-zero difference),
    but torch's CPU float->bool cast is vectorized and its ``==`` to bool is not (~6x faster).
    """
    return x_int.sub_(x_q).to(torch.bool).logical_not_()


def _ste(grad_x_hat, mask):
    """``grad_x_hat * mask``, bit for bit (-0.0 and NaN included): the bool mask is read as uint8
    and widened first, because torch's CPU kernels multiply float by bool ~4x slower."""
    return mask.view(torch.uint8).to(grad_x_hat.dtype).mul_(grad_x_hat)


class FakeQuantizePerTensorAffine(torch.autograd.Function):
    r"""Per-tensor fake quantization; forward ``x_hat`` as in the module docstring, backward
    ``dx = dy * mask`` (clipped STE). ``scale`` (0-d float32) and ``zero_point`` (0-d int64) are
    canonical tensors here and get no gradient."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, quant_min: int, quant_max: int):
        x_hat, mask = _per_tensor_forward(x, scale, zero_point, quant_min, quant_max)
        ctx.save_for_backward(mask)
        return x_hat

    @staticmethod
    def backward(ctx, grad_x_hat):
        (mask,) = ctx.saved_tensors
        return _ste(grad_x_hat, mask), None, None, None, None


def fake_quantize_per_tensor_affine(x: torch.Tensor, scale, zero_point, quant_min: int,
                                    quant_max: int) -> torch.Tensor:
    """Fake-quantize ``x`` with one ``scale`` and ``zero_point``; bit-exact with
    ``torch.fake_quantize_per_tensor_affine`` (forward and input gradient).

    ``scale``: positive float or one-element float tensor (narrowed to float32, like torch).
    ``zero_point``: int or one-element tensor inside ``[quant_min, quant_max]`` (a float tensor is
    truncated toward zero, like torch's tensor overload). Unlike torch, the zero point's range is
    also checked for tensors (on CPU), because torch silently returns garbage for it.

    >>> fake_quantize_per_tensor_affine(torch.tensor([0.26, -0.26]), 0.1, 3, 0, 255)
    tensor([ 0.3000, -0.3000])
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {type(x).__name__} {getattr(x, 'dtype', '')}")
    quant_min, quant_max = check_quant_range(quant_min, quant_max)
    scale = per_tensor_scale(scale, x.device)
    zero_point = per_tensor_zero_point(zero_point, quant_min, quant_max, x.device)
    return FakeQuantizePerTensorAffine.apply(x, scale, zero_point, quant_min, quant_max)


def _channel_view(t: torch.Tensor, axis: int, ndim: int) -> torch.Tensor:
    """Reshape a per-channel vector ``(C,)`` to broadcast along ``axis`` of an ``ndim``-d tensor."""
    shape = [1] * ndim
    shape[axis] = -1
    return t.reshape(shape)


def _int64_cast_overflow_(x_int):
    """In place: NaN, +inf and values >= 2**63 become -inf, as torch's cast of ``x_int`` to int64
    makes them INT64_MIN (numerics.md §2.3). ``k * 2**63`` is the first power of two beyond the float
    type's range, so ``x_int * k`` overflows to +inf exactly where ``x_int >= 2**63``; multiplying
    by a power of two and back is exact everywhere else. (Three cheap in-place passes instead of
    ``torch.where(x_int < 2**63, ...)``, whose comparison to bool is slow on CPU.)"""
    k = 2.0**65 if x_int.dtype == torch.float32 else 2.0**961  # k * 2**63 = 2**128 or 2**1024
    inf = float("inf")
    return x_int.mul_(k).nan_to_num_(nan=-inf, posinf=-inf, neginf=-inf).mul_(1.0 / k)


def _per_channel_forward(x, scale, zero_point, axis, quant_min, quant_max):
    """Return ``(x_hat, mask)``; ``scale``: (C,) float32, ``zero_point``: (C,) int64 or float32."""
    compute = _compute_dtype(x)
    scale = _channel_view(scale, axis, x.dim())
    inv = 1.0 / scale  # fl32(1/scale_c)
    zp = _channel_view(zero_point, axis, x.dim())
    if zero_point.is_floating_point():
        # Float zero point (numerics.md §2.4): added BEFORE rounding, rounded to float32 once (an
        # FMA for float32 input); "+ 0.0" turns rint's -0.0 into the +0 of torch's integer.
        if compute == torch.float64:
            x_int = torch.round((x * inv.double() + zp.double()).float()) + 0.0
        else:
            x_int = torch.round(fma32(x.float(), inv, zp)) + 0.0
    else:  # rint(x * inv) + zp, the zero point added in the compute type (fl32(zp) for float32)
        x_int = (x.to(compute) * inv.to(compute)).round_().add_(zp.to(compute))
    # torch casts x_int to int64: NaN, +inf and values >= 2**63 become INT64_MIN -> quant_min.
    x_int = _int64_cast_overflow_(x_int)
    # float32 x_q - zp is exact only while |x_q - zp| <= quant_max - quant_min <= 2**24
    narrow = _is_narrow(quant_min, quant_max) and quant_max - quant_min <= _EXACT_INT_LIMIT
    if compute == torch.float32 and not zero_point.is_floating_point() and narrow:
        x_q = x_int.clamp(quant_min, quant_max)
        mask = _unclipped(x_int, x_q)
        x_hat = x_q.sub_(zp).mul_(scale)  # exact ints: the float32 product equals torch's double one
    else:  # torch computes (x_q - zp) * scale in float64 and narrows only to x's dtype
        x_int = x_int.double()
        x_q = x_int.clamp(quant_min, quant_max)
        mask = _unclipped(x_int, x_q)
        x_hat = (x_q - zp.double()) * scale.double()
    return x_hat.to(x.dtype), mask


class FakeQuantizePerChannelAffine(torch.autograd.Function):
    r"""Per-channel fake quantization along ``axis``: the per-tensor formula with
    ``scale_c``/``zero_point_c`` of the element's channel; backward ``dx = dy * mask`` (clipped STE).
    ``scale`` and ``zero_point`` are canonical 1-D tensors here and get no gradient."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, axis: int, quant_min: int, quant_max: int):
        x_hat, mask = _per_channel_forward(x, scale, zero_point, axis, quant_min, quant_max)
        ctx.save_for_backward(mask)
        return x_hat

    @staticmethod
    def backward(ctx, grad_x_hat):
        (mask,) = ctx.saved_tensors
        return _ste(grad_x_hat, mask), None, None, None, None, None


def fake_quantize_per_channel_affine(x: torch.Tensor, scale, zero_point, axis: int, quant_min: int,
                                     quant_max: int) -> torch.Tensor:
    """Fake-quantize ``x`` with one scale and zero point per index along ``axis``; bit-exact with
    ``torch.fake_quantize_per_channel_affine`` (forward and input gradient).

    ``scale``: 1-D float tensor of length ``x.size(axis)`` (narrowed to float32; torch accepts only
    float32). ``zero_point``: 1-D integer tensor (int32 as torch wants, or int64) or float tensor
    (then torch's float-zero-point formula applies: zero point added before rounding, in an FMA).

    >>> x = torch.tensor([[0.25, 0.25], [0.25, 0.25]])
    >>> fake_quantize_per_channel_affine(x, torch.tensor([0.1, 0.2]), torch.tensor([0, 0]), 0, -8, 7)
    tensor([[0.2000, 0.2000],
            [0.2000, 0.2000]])
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {type(x).__name__} {getattr(x, 'dtype', '')}")
    quant_min, quant_max = check_quant_range(quant_min, quant_max)
    axis = check_axis(axis, x.dim())
    channels = x.size(axis)
    scale = per_channel_scale(scale, channels, x.device)
    zero_point = per_channel_zero_point(zero_point, channels, quant_min, quant_max, x.device)
    return FakeQuantizePerChannelAffine.apply(x, scale, zero_point, axis, quant_min, quant_max)
