r"""Requantization: an exact int32 accumulator -> the int8/uint8 output of a quantized conv or linear.

A quantized conv/linear first sums integer products exactly (``minqat.kernels.conv``, ``.linear``)::

    acc[c] = sum_k (x_int[k] - z_x) * (w_int[c, k] - z_w[c])          exact, int32

The real output is ``y[c] = s_x * s_w[c] * acc[c] + b[c]``; requantization maps it onto the output
grid ``y_int = clamp(rint(y / s_y) + z_y, qmin, qmax)``. Two recipes are implemented here.

**fbgemm float32 recipe** (:func:`requantize`, the default; what torch's ``quantized::conv2d`` /
``linear`` compute under the ``fbgemm`` engine, numerics.md §7.1, bit for bit)::

    atw[c]  = fl32(fl32(s_x) * fl32(s_w[c]))          float32 product of the float32 scales
    mult[c] = fl32(atw[c] / fl32(s_y))                float32 division, not s_x * (s_w / s_y)
    raw     = fl32(acc)                               int32 -> float32, ties to even above 2**24
    per-channel weights:  raw = fl32(raw + fl32(b[c] / atw[c]))
    per-tensor weights:   raw = fma32(b[c], fl32(1 / atw), raw)    one rounding (compiled FMA)
    v       = fl32(raw * mult[c])
    y_int   = clamp(rint(v) + z_y, relu ? z_y : qmin, qmax)        rint: ties to even

The zero point is added *after* rounding, ReLU clamps at ``z_y`` in the integer domain and the
output clamp is the dtype's full range (uint8: [0, 255]). fbgemm converts ``v`` with ``cvtps2dq``,
which returns the "integer indefinite" ``-2**31`` for ``|v| >= 2**31`` (and NaN), and adds ``z_y``
in int32 (wrapping): a multiplier so large that ``|v|`` leaves the int32 range gives ``qmin``, not
``qmax``. This is reproduced (measured on torch 2.13: 12,156 outputs of layers with ``s_y`` down to
1e-12, 0 mismatches).

The constants ``atw``, ``mult``, ``b / atw`` depend on the layer and the input scale only:
:class:`FbgemmRequantization` holds them (:func:`fbgemm_requantization`; an int8 module keeps one).
Where they bound ``|v|`` below ``2**30`` for every int32 accumulator (real layers: ``mult`` well below
1/4) those edges cannot occur, and the recipe runs as in-place float32 passes over one buffer.

**Integer-only fixed point** (:func:`requantize_fixed_point`; Jacob et al. 2018, "Quantization and
Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference", §2.2, as implemented
by gemmlowp ``fixedpoint.h`` and TFLite ``quantization_util.cc`` / ``common.h``). The real
multiplier ``M = s_x * s_w / s_y`` is written ``M = M0 * 2**(shift - 31)`` with an int32 ``M0`` in
``[2**30, 2**31)`` (:func:`quantize_multiplier`); the bias is pre-quantized to int32 with scale
``s_x * s_w`` (:func:`quantize_bias`); then, with integer arithmetic only::

    a     = acc + b_int                                     (saturated to int32)
    a     = a * 2**max(shift, 0)                            (saturated to int32)
    h     = SaturatingRoundingDoublingHighMul(a, M0)        = floor(a * M0 / 2**31 + 1/2)
    y_int = clamp(RoundingDivideByPOT(h, max(-shift, 0)) + z_y, relu ? z_y : qmin, qmax)

``SaturatingRoundingDoublingHighMul`` rounds half *up* (toward +inf, like ARM's ``VQRDMULH``) and
``RoundingDivideByPOT`` rounds half *away from zero*. It is not what torch computes, and it rounds
twice: ``h`` is already an integer before the final shift, so when ``a`` has few bits the first
rounding is coarse (``x = 10.3`` with shift -1: ``round(20.6) = 21``, ``21 / 2 = 10.5 -> 11``).
Measured against the exactly rounded float64 ``rint(M * (acc + b / (s_x s_w))) + z_y`` (outputs
spread over 30..250 units, ``M < 1``): never more than 1 unit off; mismatch rate 12 % for
``|acc| ~ 2**8``, 1.2 % for ``2**12``, 0.08 % for ``2**16``, 4e-5 for ``2**20``, 0 for ``2**24``;
0.25 % of the outputs of random test conv layers and 0.12 % of linear ones (the fbgemm recipe:
4e-5 and 0, near-ties only). The int64 tensor arithmetic here reproduces the int32 C++ exactly
(products of two int32 fit in int64).

**ONNX Runtime's recipe** (``minqat.kernels.onnxruntime.requantize_onnxruntime``): an int32 bias added to the
accumulator and one float32 multiplier, ``rint(fl32(fl32(acc + b_int) * fl32(fl32(s_x s_w) / s_y))) + z_y``.

The three recipes are named by :data:`REQUANTIZATION_MODES` (:func:`requantizer`), the ``requantization``
argument of the conv / linear kernels and attribute of the int8 modules.

>>> acc = torch.tensor([[3, -3, 5, 40]], dtype=torch.int32)
>>> requantize(acc, 0.5, 1.0, 1.0, 10, axis=0)          # 1.5 -> 2, -1.5 -> -2, 2.5 -> 2 (to even)
tensor([[12,  8, 12, 30]], dtype=torch.uint8)
>>> M0, shift = quantize_multiplier(0.5)
>>> int(M0), int(shift)
(1073741824, 0)
>>> requantize_fixed_point(acc, M0, shift, 10, axis=0)  # halves round up: -1.5 -> -1, 2.5 -> 3
tensor([[12,  9, 13, 30]], dtype=torch.uint8)
"""
from __future__ import annotations

import functools
import numbers
from dataclasses import dataclass

import torch

from .._checks import reads_values
from ..dtypes import INT32_MAX, INT32_MIN, dtype_range
from ..functional.float32 import fma32
from ..functional.qparams_args import (
    per_channel_scale,
    per_tensor_scale,
    per_tensor_zero_point,
)
from .onnxruntime import requantize_onnxruntime

__all__ = ["requantize", "FbgemmRequantization", "fbgemm_requantization", "quantize_multiplier", "quantize_bias",
           "requantize_fixed_point", "requantize_integer_only", "REQUANTIZATION_MODES", "requantizer",
           "layer_requantization"]

OUTPUT_DTYPES = (torch.uint8, torch.int8)
# u xor 128 turns a uint8 u into its int8 code u - 128 and back; as a 0-d tensor, half a Python int's call overhead
TOP_BIT = torch.tensor(128, dtype=torch.uint8)


# ----------------------------------------------------------------------------------------------
# argument handling shared by both recipes
# ----------------------------------------------------------------------------------------------
def _check_acc(acc) -> torch.Tensor:
    if not isinstance(acc, torch.Tensor) or acc.dtype != torch.int32 or acc.dim() == 0:
        raise ValueError(
            f"acc must be a torch.int32 tensor with at least one dimension (the exact accumulator), got "
            f"{type(acc).__name__} {getattr(acc, 'dtype', '')} {tuple(getattr(acc, 'shape', ()))}"
        )
    return acc


def _output_range(dtype: torch.dtype) -> tuple[int, int]:
    if dtype not in OUTPUT_DTYPES:
        raise ValueError(f"dtype must be torch.uint8 or torch.int8, got {dtype!r}")
    return dtype_range(dtype)


def _channel_axis(acc: torch.Tensor, axis: int) -> int:
    if not isinstance(axis, int) or not -acc.dim() <= axis < acc.dim():
        raise ValueError(f"axis must be a dimension of acc (shape {tuple(acc.shape)}), got {axis!r}")
    return axis % acc.dim()


def _along(t: torch.Tensor, axis: int, ndim: int) -> torch.Tensor:
    """Reshape a per-channel vector ``(C,)`` to broadcast along ``axis`` (0-d values pass through)."""
    if t.dim() == 0:
        return t
    shape = [1] * ndim
    shape[axis] = -1
    return t.reshape(shape)


def _is_per_channel(w_scale) -> bool:
    """Per-channel weights are given as a 1-D scale tensor (even of length 1); else per tensor."""
    return isinstance(w_scale, torch.Tensor) and w_scale.dim() == 1


def _weight_scale(w_scale, channels: int, device) -> torch.Tensor:
    if _is_per_channel(w_scale):
        return per_channel_scale(w_scale, channels, device, name="w_scale")
    return per_tensor_scale(w_scale, device, name="w_scale")


def _bias(bias, channels: int, device) -> torch.Tensor | None:
    if bias is None:
        return None
    if not isinstance(bias, torch.Tensor) or not bias.is_floating_point() or bias.shape != (channels,):
        raise ValueError(
            f"bias must be None or a 1-D float tensor with one entry per output channel ({channels}), "
            f"got {type(bias).__name__} {getattr(bias, 'dtype', '')} {tuple(getattr(bias, 'shape', ()))}"
        )
    return bias.detach().to(device=device, dtype=torch.float32)


def _clamp_output(y: torch.Tensor, zero_point: torch.Tensor, relu: bool, dtype: torch.dtype) -> torch.Tensor:
    """``clamp(y, relu ? z_y : qmin, qmax)`` for an int64 ``y``, cast to ``dtype``."""
    qmin, qmax = dtype_range(dtype)
    low = zero_point if relu else torch.tensor(qmin, device=y.device)
    return torch.maximum(y, low).clamp(max=qmax).to(dtype)


def _wrap_int32(v: torch.Tensor) -> torch.Tensor:
    """Two's-complement wrap of int64 values into the int32 range (C++ int32 overflow)."""
    return (v - INT32_MIN).remainder(2**32) + INT32_MIN


# ----------------------------------------------------------------------------------------------
# fbgemm float32 recipe (numerics.md §7.1)
# ----------------------------------------------------------------------------------------------
def requantize(acc: torch.Tensor, x_scale, w_scale, y_scale, y_zero_point, bias: torch.Tensor | None = None,
               *, axis: int = 1, relu: bool = False, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    r"""fbgemm's float32 requantization of an int32 accumulator (numerics.md §7.1), bit for bit.

    .. code-block:: text

        atw  = fl32(s_x * s_w[c]);   mult = fl32(atw / s_y);   raw = fl32(acc)
        raw  = fl32(raw + fl32(b[c] / atw[c]))          per-channel weights
        raw  = fma32(b[c], fl32(1 / atw), raw)          per-tensor weights (reciprocal in double)
        y_int = clamp(rint(fl32(raw * mult)) + z_y, relu ? z_y : qmin, qmax)

    The per-layer constants come from :func:`fbgemm_requantization` (what an int8 module computes
    once and keeps); this function builds them and applies them to ``acc``.

    Args:
        acc: int32 accumulator, output channels along ``axis``.
        x_scale: input scale (float or one-element tensor; narrowed to float32 like torch).
        w_scale: weight scale. A float or 0-d/one-element tensor means *per-tensor* weights; a 1-D
            tensor means *per-channel* weights (one per output channel, even if of length 1). The
            two granularities add the bias differently, as fbgemm does.
        y_scale, y_zero_point: output qparams; the zero point must lie in ``dtype``'s range.
        bias: ``None`` or float tensor ``(C,)``, added in the real domain (never quantized).
        axis: the output-channel dimension of ``acc`` (1 for NCHW convs, -1 for linear).
        relu: clamp below at ``y_zero_point`` (``conv2d_relu`` / ``linear_relu``).
        dtype: ``torch.uint8`` (torch's quint8 output) or ``torch.int8``.

    >>> acc = torch.tensor([[5], [-5]], dtype=torch.int32)   # (N=2, C=1)
    >>> requantize(acc, 0.5, torch.tensor([1.0]), 1.0, 3, torch.tensor([0.25]), axis=1)
    tensor([[6],
            [1]], dtype=torch.uint8)
    """
    acc = _check_acc(acc)
    _output_range(dtype)
    axis = _channel_axis(acc, axis)
    recipe = fbgemm_requantization(x_scale, w_scale, y_scale, y_zero_point, bias, acc.size(axis), acc.device,
                                   relu=relu, dtype=dtype)
    return recipe(acc.movedim(axis, -1)).movedim(-1, axis)  # channels last: the constants broadcast as (C,)


@dataclass(frozen=True)
class FbgemmRequantization:
    """fbgemm's requantization of one layer at one input scale: the constants of :func:`requantize`,
    computed once (:func:`fbgemm_requantization`), applied to accumulators with the channels **last**.

    Calling it on an int32 ``acc (..., C)`` returns ``y_int (..., C)``; the float32 passes after the
    first conversion run in place on one buffer.
    """

    mult: torch.Tensor  # () or (C,) float32: fl32(fl32(s_x * s_w) / s_y)
    bias_over_atw: torch.Tensor | None  # (C,) float32 fl32(b / atw): per-channel weights with a bias
    bias: torch.Tensor | None  # (C,) float32: per-tensor weights with a bias, added by FMA with ``rcp``
    rcp: torch.Tensor | None  # () float32 fl32(1 / atw), the reciprocal taken in double
    zero_point: torch.Tensor  # () int64 z_y
    code_zero_point: torch.Tensor  # () float32 z_y - 128 for uint8 outputs (made as int8 codes), z_y for int8
    relu: bool
    dtype: torch.dtype
    below_2_30: bool  # |v| < 2**30 is guaranteed: fbgemm's int32 edge cases cannot occur (_bounded_below_2_30)

    def __call__(self, acc: torch.Tensor) -> torch.Tensor:
        raw = acc.float()  # fl32(acc): rounds to nearest even beyond 2**24
        if self.bias_over_atw is not None:
            raw.add_(self.bias_over_atw)  # fl32(raw + fl32(b / atw))
        elif self.bias is not None:
            raw = fma32(self.bias, self.rcp, raw)  # one rounding: fbgemm's compiled FMA
        v = raw.mul_(self.mult)  # fl32(raw * mult)
        if not self.below_2_30:
            return _round_add_zero_point(v, self.zero_point, self.relu, self.dtype)
        return self._round_in_range(v)

    def _round_in_range(self, v: torch.Tensor) -> torch.Tensor:
        """``clamp(rint(v) + z_y, low, qmax)`` where no int32 edge case can occur, in place on ``v``.

        uint8 results are made as int8 codes ``y - 128`` and their top bit flipped back (the shift of the
        GEMM's inputs, reversed): torch converts float32 to int8 with vector instructions but to uint8 one
        element at a time (3-5x slower from 25k elements on, measured, torch 2.13).
        """
        shift = 128 if self.dtype == torch.uint8 else 0
        qmin, qmax = dtype_range(self.dtype)
        low = self.code_zero_point if self.relu else float(qmin - shift)
        y_code = v.round_().add_(self.code_zero_point).clamp_(min=low, max=float(qmax - shift)).to(torch.int8)
        return y_code if shift == 0 else torch.bitwise_xor(y_code.view(torch.uint8), TOP_BIT)  # z_y after rint


def fbgemm_requantization(x_scale, w_scale, y_scale, y_zero_point, bias: torch.Tensor | None, channels: int,
                          device, *, relu: bool = False, dtype: torch.dtype = torch.uint8) -> FbgemmRequantization:
    """Validate the arguments of :func:`requantize` and compute its constants for ``channels`` outputs.

    >>> recipe = fbgemm_requantization(0.5, torch.tensor([1.0, 2.0]), 1.0, 3, None, 2, "cpu")
    >>> recipe.mult                                                    # fl32(fl32(s_x s_w) / s_y)
    tensor([0.5000, 1.0000])
    >>> recipe(torch.tensor([[5, 5]], dtype=torch.int32))              # 2.5 -> 2 (to even), 5
    tensor([[5, 8]], dtype=torch.uint8)
    """
    qmin, qmax = _output_range(dtype)
    s_x = per_tensor_scale(x_scale, device, name="x_scale")
    s_w = _weight_scale(w_scale, channels, device)
    s_y = per_tensor_scale(y_scale, device, name="y_scale")
    z_y = per_tensor_zero_point(y_zero_point, qmin, qmax, device, name="y_zero_point")
    b = _bias(bias, channels, device)
    atw = s_x * s_w  # fl32(s_x * s_w), float32 product
    mult = atw / s_y  # fl32(atw / s_y): the division order is what torch does (§7.1)
    bias_over_atw = rcp = None
    if b is not None and _is_per_channel(w_scale):
        bias_over_atw = b / atw  # fl32(b / atw)
        bias_bound = bias_over_atw.abs()
    elif b is not None:
        rcp = (1.0 / atw.double()).to(torch.float32)  # reciprocal in double, narrowed
        bias_bound = b.abs() * rcp.double()
    else:
        bias_bound = torch.zeros(1, device=device)
    code_zero_point = (z_y - (128 if dtype == torch.uint8 else 0)).to(torch.float32)
    return FbgemmRequantization(mult, bias_over_atw, None if rcp is None else b, rcp, z_y, code_zero_point, relu, dtype,
                                _bounded_below_2_30(mult, bias_bound))


def _bounded_below_2_30(mult: torch.Tensor, bias_bound: torch.Tensor) -> bool:
    """Whether ``|v| < 2**30`` for *every* int32 accumulator, read from the constants alone (CPU only).

    ``|fl32(acc)| <= 2**31``, the bias adds at most ``B = max |bias term|`` and ``v`` multiplies by at
    most ``M = max mult``; each float32 rounding grows a bound by at most a factor ``1 + 2**-24``, so
    ``(2**31 + B) * M <= 2**29`` gives ``|v| < 2**30``. Real layers have ``M`` far below 1/4. Then no
    ``v`` reaches fbgemm's int32 edges (nor is NaN) and the rounding needs no edge handling. On an
    accelerator the values are not read (no host synchronisation): the general path runs.
    """
    if not reads_values(mult) or mult.numel() == 0 or bias_bound.numel() == 0:
        return False
    bound = (2.0**31 + float(bias_bound.max())) * float(mult.max())
    return bound <= 2.0**29  # False for NaN / inf


def _round_add_zero_point(v: torch.Tensor, z_y: torch.Tensor, relu: bool, dtype: torch.dtype) -> torch.Tensor:
    """``clamp(rint(v) + z_y, low, qmax)`` exactly as fbgemm computes it in int32.

    fbgemm converts with ``cvtps2dq`` (``-2**31`` for ``|v| >= 2**31`` and NaN), adds ``z_y`` in int32
    (wrapping around) and saturates. Away from the int32 edges that is the plain float32 clamp below
    (exact: results inside ``[qmin, qmax]`` are small integers). At the edges the result is fixed by
    the zero point alone, so those ``v`` are replaced by a stand-in with the same result:

    * ``v >= 2**31`` or ``v <= -2**31`` or NaN: ``-2**31 + z_y`` wraps to a huge positive value when
      ``z_y < 0`` (-> ``qmax``), else stays very negative (-> ``low``);
    * ``v == 2**31 - 128`` (the largest float32 below ``2**31``) with ``z_y >= 128``: the sum wraps
      to a negative value (-> ``low``).
    """
    qmin, qmax = dtype_range(dtype)
    z = z_y.to(torch.float32)
    low = z if relu else torch.tensor(float(qmin), device=v.device)
    top = torch.where(z_y >= 128, 2.0**31 - 128, 2.0**31)  # int32(v) + z_y < 2**31 below this
    stand_in = torch.where(z_y < 0, 2.0**30, -(2.0**30))  # same result as the wrapped int32 sum
    v = torch.where((v < top) & (v > -(2.0**31)), v, stand_in)  # NaN fails both tests
    return torch.clamp(torch.round(v) + z, min=low, max=float(qmax)).to(dtype)  # rint: ties to even; z_y after


# ----------------------------------------------------------------------------------------------
# integer-only fixed point (Jacob et al. 2018 §2.2; gemmlowp / TFLite)
# ----------------------------------------------------------------------------------------------
def quantize_multiplier(real_multiplier) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Write ``M`` as ``M0 * 2**(shift - 31)`` with an int32 ``M0`` in ``[2**30, 2**31)``.

    TFLite's ``QuantizeMultiplier`` (``tensorflow/lite/kernels/internal/quantization_util.cc``),
    elementwise on tensors:

    .. code-block:: text

        M = q * 2**shift, q in [0.5, 1)                  frexp
        M0 = round_half_away(q * 2**31)                  if M0 == 2**31: M0 = 2**30, shift += 1
        shift < -31 (M < ~2**-32):  M0 = 0, shift = 0    (flushed to zero)
        M == 0:                     M0 = 0, shift = 0

    Args:
        real_multiplier: non-negative finite float or float tensor (per-channel multipliers); it is
            used in float64 (TFLite computes it in double).

    Returns:
        ``(M0, shift)``: an int32 tensor and an int64 tensor of the input's shape.

    >>> M0, shift = quantize_multiplier(torch.tensor([0.75, 3.0, 1e-12]))
    >>> M0.tolist(), shift.tolist()
    ([1610612736, 1610612736, 0], [0, 2, 0])
    """
    m = torch.as_tensor(real_multiplier, dtype=torch.float64)
    if reads_values(m) and not bool(((m >= 0) & torch.isfinite(m)).all()):
        raise ValueError(f"real_multiplier must be non-negative and finite, got {real_multiplier!r}")
    q, shift = torch.frexp(m)  # m = q * 2**shift, 0.5 <= q < 1 (q = 0 for m = 0)
    m0 = torch.floor(q * 2.0**31 + 0.5).to(torch.int64)  # std::round for q >= 0; exact in double
    carry = m0 == 2**31
    m0 = torch.where(carry, m0 // 2, m0)
    shift = shift.to(torch.int64) + carry.to(torch.int64)
    flushed = shift < -31
    m0 = torch.where(flushed, 0, m0)
    shift = torch.where(flushed, 0, shift)
    return m0.to(torch.int32), shift


def quantize_bias(bias: torch.Tensor, x_scale, w_scale) -> torch.Tensor:
    r"""int32 bias for the integer-only recipe: ``b_int = rint(b / (s_x * s_w))``, saturated to int32.

    The bias scale is ``s_x * s_w[c]`` (Jacob et al. 2018 §2.4, TFLite's bias convention), computed
    in float64 from the float32 scales; ``rint`` rounds half to even.

    >>> quantize_bias(torch.tensor([0.3, -0.25]), 0.5, 0.5)    # 1.2 -> 1, -1.0 -> -1
    tensor([ 1, -1], dtype=torch.int32)
    """
    if not isinstance(bias, torch.Tensor) or not bias.is_floating_point() or bias.dim() != 1:
        raise ValueError(f"bias must be a 1-D float tensor, got {type(bias).__name__} {getattr(bias, 'dtype', '')}")
    s_x = per_tensor_scale(x_scale, bias.device, name="x_scale").double()
    s_w = _weight_scale(w_scale, bias.numel(), bias.device).double()
    b_int = torch.round(bias.detach().double() / (s_x * s_w))
    return b_int.clamp(INT32_MIN, INT32_MAX).to(torch.int32)


def _saturating_rounding_doubling_high_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """gemmlowp ``SaturatingRoundingDoublingHighMul``: ``(a*b + nudge) / 2**31`` truncated toward
    zero, with nudge ``2**30`` (``1 - 2**30`` for negative products), which equals
    ``floor(a*b / 2**31 + 1/2)`` (ties up, ARM ``VQRDMULH``); the only overflow, ``a = b = -2**31``,
    saturates to ``2**31 - 1``."""
    ab = a * b  # int64: exact for int32 operands
    nudge = torch.where(ab >= 0, 2**30, 1 - 2**30)
    high = torch.div(ab + nudge, 2**31, rounding_mode="trunc")
    overflow = (a == INT32_MIN) & (b == INT32_MIN)
    return torch.where(overflow, INT32_MAX, high)


def _rounding_divide_by_pot(x: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    """gemmlowp ``RoundingDivideByPOT``: ``x / 2**exponent`` rounded half away from zero."""
    mask = torch.bitwise_left_shift(torch.ones_like(exponent), exponent) - 1
    remainder = torch.bitwise_and(x, mask)
    threshold = torch.bitwise_right_shift(mask, 1) + (x < 0).to(torch.int64)
    return torch.bitwise_right_shift(x, exponent) + (remainder > threshold).to(torch.int64)


def requantize_fixed_point(acc: torch.Tensor, multiplier, shift, y_zero_point, bias_int: torch.Tensor | None = None,
                           *, axis: int = 1, relu: bool = False, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    r"""Integer-only requantization (Jacob et al. 2018 §2.2; TFLite ``MultiplyByQuantizedMultiplier``).

    .. code-block:: text

        a     = sat32(acc + b_int[c])
        a     = sat32(a * 2**max(shift[c], 0))
        h     = SaturatingRoundingDoublingHighMul(a, M0[c])     = floor(a * M0 / 2**31 + 1/2)
        y_int = clamp(RoundingDivideByPOT(h, max(-shift[c], 0)) + z_y, relu ? z_y : qmin, qmax)

    so ``y_int ~ rint(M * (acc + b_int)) + z_y`` with ``M = M0 * 2**(shift - 31)``. Only integer
    operations are used (int64 tensors emulate the int32/int64 C++ exactly). TFLite's left shift and
    bias add overflow int32 without a check; here they saturate.

    Args:
        acc: int32 accumulator, output channels along ``axis``.
        multiplier, shift: from :func:`quantize_multiplier` (0-d for per-tensor, ``(C,)`` per channel).
        y_zero_point: output zero point, inside ``dtype``'s range.
        bias_int: ``None`` or int32 bias ``(C,)`` from :func:`quantize_bias`.
        axis, relu, dtype: as for :func:`requantize`.

    >>> m0, sh = quantize_multiplier(torch.tensor([0.25, 2.0]))
    >>> acc = torch.tensor([[10, 10], [-6, -6]], dtype=torch.int32)
    >>> requantize_fixed_point(acc, m0, sh, 0, axis=1, dtype=torch.int8)   # 2.5 -> 3, -1.5 -> -2
    tensor([[  3,  20],
            [ -2, -12]], dtype=torch.int8)
    """
    acc = _check_acc(acc)
    qmin, qmax = _output_range(dtype)
    axis = _channel_axis(acc, axis)
    channels = acc.size(axis)
    m0, shift = _fixed_point_params(multiplier, shift, channels, acc.device)
    z_y = per_tensor_zero_point(y_zero_point, qmin, qmax, acc.device, name="y_zero_point")
    a = acc.to(torch.int64)
    if bias_int is not None:
        a = a + _along(_int32_bias(bias_int, channels, acc.device), axis, acc.dim())
    a = a.clamp(INT32_MIN, INT32_MAX)
    m0, shift = _along(m0, axis, acc.dim()), _along(shift, axis, acc.dim())
    a = (a * torch.bitwise_left_shift(torch.ones_like(shift), shift.clamp(min=0))).clamp(INT32_MIN, INT32_MAX)
    h = _saturating_rounding_doubling_high_mul(a, m0)
    y = _rounding_divide_by_pot(h, (-shift).clamp(min=0)) + z_y
    return _clamp_output(y, z_y, relu, dtype)


def _fixed_point_params(multiplier, shift, channels: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated int64 ``(M0, shift)``: 0-d, or 1-D with one entry per channel."""
    out = []
    for name, value, low, high in (("multiplier", multiplier, 0, INT32_MAX), ("shift", shift, -31, 31)):
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            value = torch.tensor(int(value))
        if not isinstance(value, torch.Tensor) or value.is_floating_point() or value.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer or an integer tensor (see quantize_multiplier), got {value!r}")
        if value.dim() > 1 or (value.dim() == 1 and value.numel() != channels):
            raise ValueError(
                f"{name} must be 0-d or 1-D with one entry per channel ({channels}), got shape {tuple(value.shape)}"
            )
        value = value.to(device=device, dtype=torch.int64)
        if reads_values(value) and not bool(((value >= low) & (value <= high)).all()):
            raise ValueError(f"{name} must lie in [{low}, {high}], got {value.tolist()}")
        out.append(value)
    return out[0], out[1]


def _int32_bias(bias_int, channels: int, device) -> torch.Tensor:
    if not isinstance(bias_int, torch.Tensor) or bias_int.dtype != torch.int32 or bias_int.shape != (channels,):
        raise ValueError(
            f"bias_int must be None or an int32 tensor with one entry per output channel ({channels}) "
            f"(see quantize_bias), got {type(bias_int).__name__} {getattr(bias_int, 'dtype', '')}"
        )
    return bias_int.to(device=device, dtype=torch.int64)



def requantize_integer_only(acc: torch.Tensor, x_scale, w_scale, y_scale, y_zero_point,
                            bias: torch.Tensor | None = None, *, axis: int = 1, relu: bool = False,
                            dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    r"""The integer-only recipe from scales, with the signature of :func:`requantize`.

    Prepares the integer parameters as TFLite does, then calls :func:`requantize_fixed_point`:

    .. code-block:: text

        M[c]      = s_x * s_w[c] / s_y         in float64 from the float32 scales
        M0, shift = quantize_multiplier(M)
        b_int[c]  = rint(b[c] / (s_x * s_w[c]))   (quantize_bias)

    Within one unit of the exactly rounded real result ``rint(M * (acc + b / (s_x s_w))) + z_y``
    (the tests measure how often it differs).

    >>> acc = torch.tensor([[5], [-5]], dtype=torch.int32)
    >>> requantize_integer_only(acc, 0.5, torch.tensor([1.0]), 1.0, 3, torch.tensor([0.25]), axis=1)
    tensor([[6],
            [1]], dtype=torch.uint8)
    """
    acc = _check_acc(acc)
    axis = _channel_axis(acc, axis)
    channels = acc.size(axis)
    s_x = per_tensor_scale(x_scale, acc.device, name="x_scale").double()
    s_w = _weight_scale(w_scale, channels, acc.device).double()
    s_y = per_tensor_scale(y_scale, acc.device, name="y_scale").double()
    m0, shift = quantize_multiplier(s_x * s_w / s_y)
    b_int = None
    if bias is not None:
        b_int = quantize_bias(_bias(bias, channels, acc.device), x_scale, w_scale)
    return requantize_fixed_point(acc, m0, shift, y_zero_point, b_int, axis=axis, relu=relu, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# the recipes by name
# ----------------------------------------------------------------------------------------------
REQUANTIZATION_MODES = ("fbgemm", "fixed_point", "onnxruntime")


def requantizer(requantization: str = "fbgemm"):
    """The recipe named ``requantization``, all with :func:`requantize`'s signature.

    ``"fbgemm"`` (default): :func:`requantize`, torch's, bit-exact; ``"fixed_point"``:
    :func:`requantize_integer_only` (Jacob et al. 2018); ``"onnxruntime"``: ORT's
    (``minqat.kernels.onnxruntime.requantize_onnxruntime``).

    >>> requantizer("onnxruntime").__name__
    'requantize_onnxruntime'
    """
    if requantization not in REQUANTIZATION_MODES:
        raise ValueError(f"requantization must be one of {REQUANTIZATION_MODES}, got {requantization!r}")
    return {"fbgemm": requantize, "fixed_point": requantize_integer_only,
            "onnxruntime": requantize_onnxruntime}[requantization]


def layer_requantization(requantization: str, x_scale, w_scale, y_scale, y_zero_point, bias: torch.Tensor | None,
                         channels: int, device, *, relu: bool, dtype: torch.dtype):
    """The recipe named ``requantization`` bound to one layer's qparams: a function of a channels-last
    accumulator ``acc (..., C)`` alone. ``"fbgemm"``'s constants are computed here, once
    (:class:`FbgemmRequantization`); the other recipes compute theirs on each call.

    >>> recipe = layer_requantization("onnxruntime", 1.0, 0.5, 1.0, 0, None, 2, "cpu", relu=False, dtype=torch.uint8)
    >>> recipe(torch.tensor([[5, 3]], dtype=torch.int32))                # 2.5 -> 2, 1.5 -> 2 (ties to even)
    tensor([[2, 2]], dtype=torch.uint8)
    """
    recipe = requantizer(requantization)
    if recipe is requantize:
        return fbgemm_requantization(x_scale, w_scale, y_scale, y_zero_point, bias, channels, device, relu=relu,
                                     dtype=dtype)
    qmin, qmax = _output_range(dtype)  # the output qparams are checked here too, as fbgemm_requantization does
    per_tensor_scale(y_scale, device, name="y_scale")
    per_tensor_zero_point(y_zero_point, qmin, qmax, device, name="y_zero_point")
    return functools.partial(recipe, x_scale=x_scale, w_scale=w_scale, y_scale=y_scale, y_zero_point=y_zero_point,
                             bias=bias, axis=-1, relu=relu, dtype=dtype)
