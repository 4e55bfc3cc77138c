r"""Learned step size quantization (LSQ): fake quantization whose scale and zero point learn.

Esser et al. 2020, "Learned Step Size Quantization" (ICLR), train the quantizer's step size ``s``
(and, in torch's affine variant, the zero point ``z``) by gradient descent alongside the weights.
The forward is ordinary fake quantization with the zero point rounded to the integer grid:

.. code-block:: text

    z      = clamp(rint(zero_point), quant_min, quant_max)       rint = round half to even
    x_hat  = fake_quantize(x, scale, z, quant_min, quant_max)    minqat.functional.fake_quantize

The backward is the straight-through estimator for ``rint`` (d rint(v)/dv := 1) applied to
``x_hat = (clamp(rint(x/s) + z, quant_min, quant_max) - z) * s``. With the in-range test decided on
``x_int = rint(x/s + z)``:

.. code-block:: text

                   inside (quant_min <= x_int <= quant_max)   below (x_int < quant_min)   above
    dL/dx       =  dy                                          0                           0
    dL/ds       =  dy * (x_fq - x) / s * g                     dy * (quant_min - z) * g    dy * (quant_max - z) * g
    dL/dz       =  0                                           -dy * s * g                 -dy * s * g

    x_fq = (x_int - z) * s,  g = grad_factor;  dL/ds and dL/dz are summed over the elements
    (per channel: over every dim except ``axis``). Inside, d/ds [rint(x/s) * s] with the STE is
    rint(x/s) - x/s = (x_fq - x) / s; outside, x_hat = (q_bound - z) * s is differentiated exactly.

``grad_factor`` scales the qparam gradients only; the paper recommends ``g = 1 / sqrt(N * Q_P)``,
N the number of elements the step size covers and Q_P = quant_max, so that the step size learns at
the pace of the weights (torch's ``_LearnableFakeQuantize(use_grad_scaling=True)`` does that).

Reproduced from torch 2.13's CPU kernels, bit for bit (numerics.md §2.5; operation order in
numerics.md §0 notation):

* forward: exactly ``minqat.functional.fake_quantize`` with the rounded, clamped zero point;
* backward zero point, per tensor only: ``z' = trunc(clamp(fl32(zero_point + 0.5), quant_min,
  quant_max))`` -- round half *up* for ``zero_point >= -0.5`` (2.5 -> 3 while the forward uses 2),
  and one above the nearest integer for negative integer zero points (-3.0 -> -2, a torch quirk,
  kept on purpose). Per channel the backward uses the forward's ``z``;
* backward in-range test ``x_int = rint(fma32(x, inv, z'))``: zero point added before rounding, in a
  fused multiply-add (not the forward's mask); ``inv = fl32(1 / s)``; NaN, +inf and values from
  2**63 on count as *below* the range (torch casts ``x_int`` to int64, which gives INT64_MIN);
* ``x_fq - x = fma32(x_q - z', s, -x)``; every product evaluated left to right in float32, e.g.
  ``fl32(fl32(fl32(dy * (x_fq - x)) * inv) * g)``; ``g = fl32(grad_factor)``;
  ``dx = dy * inside`` (so ``-0.0`` for negative ``dy`` outside, like torch);
* the sums use ``torch.sum`` over a buffer laid out like ``x`` -- the same reduction order.

Where minqat differs from torch, on purpose: inputs torch's backward refuses work here (ranges
without 0, a 1-D input per channel: torch's backward crashes on both); an empty input gets zero
qparam gradients (torch returns the scale and zero point themselves as their gradients); ``scale``
may be any one-element tensor per tensor (torch needs ``scale[0]``); a negative ``axis`` counts
from the end. On CUDA minqat evaluates the same CPU formulas (torch's CUDA sums differ from its CPU
sums by up to 2e-6 relative, numerics.md §11; torch's CUDA kernel was not compared element-wise).

Arguments: ``x``, ``scale`` and ``zero_point`` must be float32 tensors on one device (torch's
backward checks float32; a Python number cannot learn, so none is accepted). Quant ranges are
limited to ``|quant_min|, |quant_max| <= 2**24``, where every grid integer is exact in float32
(torch mixes int64 and float32 beyond that). Saved for backward: ``x``, ``scale``, ``zero_point``
(no copies); everything else is recomputed. No host synchronisation except value checks on CPU.

>>> x = torch.tensor([-0.26, 0.04, 0.14, 1.0])
>>> scale, zero_point = torch.tensor([0.1], requires_grad=True), torch.tensor([0.0], requires_grad=True)
>>> y = fake_quantize_learnable_per_tensor_affine(x, scale, zero_point, -4, 4)
>>> y.detach()
tensor([-0.3000,  0.0000,  0.1000,  0.4000])
>>> y.sum().backward()
>>> zero_point.grad                                        # only x = 1.0 is clipped: -dy * s
tensor([-0.1000])
"""
from __future__ import annotations

import math
import numbers

import torch
from torch.autograd.function import once_differentiable

from .._checks import check_axis, check_quant_range, reads_values
from .fake_quantize import fake_quantize_per_channel_affine, fake_quantize_per_tensor_affine
from .float32 import fma32

__all__ = [
    "FakeQuantizeLearnablePerTensorAffine",
    "fake_quantize_learnable_per_tensor_affine",
    "FakeQuantizeLearnablePerChannelAffine",
    "fake_quantize_learnable_per_channel_affine",
]

_EXACT_INT_LIMIT = 2**24  # integers up to here are exact in float32
_INT64_OVERFLOW = 2.0**63  # float -> int64 casts from here on (and NaN, inf) give INT64_MIN on x86


def _forward_zero_point(zero_point: torch.Tensor, quant_min: int, quant_max: int) -> torch.Tensor:
    """``clamp(rint(zero_point), quant_min, quant_max)``: half to even (forward; per-channel backward)."""
    return torch.round(zero_point).clamp(quant_min, quant_max)


def _backward_zero_point_per_tensor(zero_point: torch.Tensor, quant_min: int, quant_max: int) -> torch.Tensor:
    """``trunc(clamp(zero_point + 0.5))``: torch's per-tensor backward rounds half up (§2.5)."""
    return torch.trunc((zero_point + 0.5).clamp(quant_min, quant_max))


def _lsq_gradients(dy, x, scale, zero_point, quant_min, quant_max, grad_factor):
    """Element-wise ``(dx, ds, dz)`` of the module docstring, ``ds`` and ``dz`` laid out like ``x``.

    ``scale`` and ``zero_point`` (float32, integer-valued) broadcast against ``x``.
    """
    inv = 1.0 / scale  # fl32(1 / s)
    x_int = torch.round(fma32(x, inv, zero_point))  # zero point BEFORE rounding, one FMA (§2.5)
    overflow = ~(x_int < _INT64_OVERFLOW)  # NaN, +inf, >= 2**63: INT64_MIN in torch's int64 cast
    below = (x_int < quant_min) | overflow
    above = (x_int > quant_max) & ~overflow
    inside = ~(below | above)

    dx = dy * inside  # dy * 1.0 or dy * 0.0 (-0.0 for negative dy), as torch
    x_q = x_int.clamp(quant_min, quant_max)
    ds_inside = dy * fma32(x_q - zero_point, scale, -x) * inv * grad_factor  # (x_fq - x) / s, left to right
    bound = torch.where(below, quant_min - zero_point, quant_max - zero_point)  # (q_bound - z), exact
    ds_outside = dy * bound * grad_factor
    dz_outside = -dy * scale * grad_factor  # dy * (-1) * s * g

    # torch sums buffers made by empty_like(x): write into the same layout for the same sum order.
    ds = torch.where(inside, ds_inside, ds_outside, out=torch.empty_like(x))
    dz = torch.where(inside, x.new_zeros(()), dz_outside, out=torch.empty_like(x))
    return dx, ds, dz


class FakeQuantizeLearnablePerTensorAffine(torch.autograd.Function):
    r"""LSQ per tensor: forward ``x_hat`` and backward ``(dx, ds, dz)`` of the module docstring.

    ``scale`` and ``zero_point``: one-element float32 tensors; their gradients are the element
    sums, shaped like them. ``quant_min``, ``quant_max`` and ``grad_factor`` get no gradient.
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, quant_min: int, quant_max: int, grad_factor: float):
        ctx.save_for_backward(x, scale, zero_point)
        ctx.qparams = (quant_min, quant_max, grad_factor)
        z = _forward_zero_point(zero_point.reshape(()), quant_min, quant_max).to(torch.int64)
        return fake_quantize_per_tensor_affine(x, scale.reshape(()), z, quant_min, quant_max)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, scale, zero_point = ctx.saved_tensors
        quant_min, quant_max, grad_factor = ctx.qparams
        s = scale.reshape(())
        z = _backward_zero_point_per_tensor(zero_point.reshape(()), quant_min, quant_max)  # half up
        dx, ds, dz = _lsq_gradients(dy, x, s, z, quant_min, quant_max, grad_factor)
        return dx, ds.sum().reshape(scale.shape), dz.sum().reshape(zero_point.shape), None, None, None


def fake_quantize_learnable_per_tensor_affine(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                                              quant_min: int, quant_max: int,
                                              grad_factor: float = 1.0) -> torch.Tensor:
    """LSQ fake quantization with one learnable ``scale`` and ``zero_point``; bit-exact with
    ``torch._fake_quantize_learnable_per_tensor_affine`` (forward and all three gradients).

    ``x``: float32 tensor. ``scale``, ``zero_point``: one-element float32 tensors (any shape) on
    ``x``'s device; ``scale`` positive and finite, ``zero_point`` not NaN (checked on CPU).
    ``grad_factor``: multiplies the scale and zero-point gradients (paper: ``1/sqrt(numel * quant_max)``).

    >>> x = torch.tensor([0.25, 0.35, 9.0])
    >>> s, z = torch.tensor([0.1], requires_grad=True), torch.tensor([2.5], requires_grad=True)
    >>> y = fake_quantize_learnable_per_tensor_affine(x, s, z, 0, 15)   # forward zero point: 2
    >>> y.detach()
    tensor([0.2000, 0.4000, 1.3000])
    >>> y.backward(torch.ones(3)); z.grad                               # x = 9.0 is above the range
    tensor([-0.1000])
    """
    quant_min, quant_max = _check_range(quant_min, quant_max)
    _check_input(x)
    _check_qparam(scale, "scale", x, shape=None)
    _check_qparam(zero_point, "zero_point", x, shape=None)
    _check_values(scale, zero_point)
    grad_factor = _check_grad_factor(grad_factor)
    return FakeQuantizeLearnablePerTensorAffine.apply(x, scale, zero_point, quant_min, quant_max, grad_factor)


def _along(t: torch.Tensor, axis: int, ndim: int) -> torch.Tensor:
    """View a per-channel vector ``(C,)`` so it broadcasts along ``axis`` of an ``ndim``-d tensor."""
    shape = [1] * ndim
    shape[axis] = -1
    return t.reshape(shape)


class FakeQuantizeLearnablePerChannelAffine(torch.autograd.Function):
    r"""LSQ per channel: the per-tensor formulas with ``scale_c`` / ``zero_point_c`` of the element's
    channel along ``axis``; the backward zero point is the forward's ``clamp(rint(zero_point_c))``.
    Gradients of ``scale`` and ``zero_point`` are summed over every dim except ``axis``: shape (C,).
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, axis: int, quant_min: int, quant_max: int, grad_factor: float):
        ctx.save_for_backward(x, scale, zero_point)
        ctx.qparams = (axis, quant_min, quant_max, grad_factor)
        z = _forward_zero_point(zero_point, quant_min, quant_max).to(torch.int32)  # (C,)
        return fake_quantize_per_channel_affine(x, scale, z, axis, quant_min, quant_max)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, scale, zero_point = ctx.saved_tensors
        axis, quant_min, quant_max, grad_factor = ctx.qparams
        s = _along(scale, axis, x.dim())  # (1, .., C, .., 1)
        z = _along(_forward_zero_point(zero_point, quant_min, quant_max), axis, x.dim())
        dx, ds, dz = _lsq_gradients(dy, x, s, z, quant_min, quant_max, grad_factor)
        others = [d for d in range(x.dim()) if d != axis]
        if others:  # a 1-D x has nothing to sum (and sum(dim=[]) would sum everything)
            ds, dz = ds.sum(others), dz.sum(others)
        return dx, ds, dz, None, None, None, None


def fake_quantize_learnable_per_channel_affine(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                                               axis: int, quant_min: int, quant_max: int,
                                               grad_factor: float = 1.0) -> torch.Tensor:
    """LSQ fake quantization with a learnable ``scale_c`` / ``zero_point_c`` per index along ``axis``;
    bit-exact with ``torch._fake_quantize_learnable_per_channel_affine`` (forward, all gradients).

    ``x``: float32 tensor with at least one dim. ``scale``, ``zero_point``: 1-D float32 tensors of
    length ``x.size(axis)`` on ``x``'s device (values checked on CPU as per tensor).

    >>> x = torch.tensor([[0.25, 0.25], [0.25, 0.25]])
    >>> s, z = torch.tensor([0.1, 0.2], requires_grad=True), torch.tensor([0.0, 0.0], requires_grad=True)
    >>> y = fake_quantize_learnable_per_channel_affine(x, s, z, 1, -8, 7)
    >>> y.detach()
    tensor([[0.2000, 0.2000],
            [0.2000, 0.2000]])
    >>> y.sum().backward(); s.grad                   # 2 * (x_fq - x) / s = 2 * (-0.05 / 0.1), 2 * (-0.25)
    tensor([-1.0000, -0.5000])
    """
    quant_min, quant_max = _check_range(quant_min, quant_max)
    _check_input(x)
    axis = check_axis(axis, x.dim())
    _check_qparam(scale, "scale", x, shape=(x.size(axis),))
    _check_qparam(zero_point, "zero_point", x, shape=(x.size(axis),))
    _check_values(scale, zero_point)
    grad_factor = _check_grad_factor(grad_factor)
    return FakeQuantizeLearnablePerChannelAffine.apply(x, scale, zero_point, axis, quant_min, quant_max,
                                                       grad_factor)


# ----- argument checks (ValueError naming the argument) -----

def _check_range(quant_min, quant_max) -> tuple[int, int]:
    quant_min, quant_max = check_quant_range(quant_min, quant_max)
    if max(abs(quant_min), abs(quant_max)) > _EXACT_INT_LIMIT:
        raise ValueError(
            "quant_min and quant_max must lie in [-2**24, 2**24] for learnable fake quantization "
            f"(integers exact in float32), got quant_min={quant_min}, quant_max={quant_max}"
        )
    return quant_min, quant_max


def _check_input(x) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32:
        raise ValueError(f"x must be a float32 tensor, got {type(x).__name__} {getattr(x, 'dtype', '')}")


def _check_qparam(t, name: str, x: torch.Tensor, shape: tuple[int, ...] | None) -> None:
    """A float32 tensor on x's device: one element (``shape=None``) or exactly ``shape``."""
    if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
        raise ValueError(f"{name} must be a float32 tensor, got {type(t).__name__} {getattr(t, 'dtype', '')}")
    if shape is None and t.numel() != 1:
        raise ValueError(f"{name} must hold exactly one element for per-tensor quantization, "
                         f"got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != shape:
        raise ValueError(f"{name} must be a 1-D tensor with one entry per channel, shape {shape}, "
                         f"got shape {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name} must be on x's device ({x.device}), got {t.device}")


def _check_values(scale: torch.Tensor, zero_point: torch.Tensor) -> None:
    if reads_values(scale) and not bool(((scale > 0) & torch.isfinite(scale)).all()):
        raise ValueError(f"scale must be positive and finite, got {scale.detach()}")
    if reads_values(zero_point) and bool(torch.isnan(zero_point).any()):
        raise ValueError(f"zero_point must not be NaN, got {zero_point.detach()}")


def _check_grad_factor(grad_factor) -> float:
    if isinstance(grad_factor, bool) or not isinstance(grad_factor, numbers.Real) \
            or not math.isfinite(float(grad_factor)):
        raise ValueError(f"grad_factor must be a finite real number, got {grad_factor!r}")
    return float(grad_factor)
