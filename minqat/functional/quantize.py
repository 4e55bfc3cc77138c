r"""Real quantization: float32 tensor -> plain integer tensor, and back.

This is what ``torch.quantize_per_tensor`` / ``torch.quantize_per_channel`` and ``.dequantize()``
compute, written with plain tensors: the result of a quantize is an ordinary ``torch.uint8``,
``torch.int8`` or ``torch.int32`` tensor (what torch calls ``int_repr()``), and the scale and zero
point travel next to it. Affine quantization (Jacob et al. 2018, §2.1) maps a real ``x`` to

.. code-block:: text

    s32   = fl32(scale)                  the scale, narrowed to float32
    inv   = fl32(1 / s32)                multiply by the float32 reciprocal, never divide
    x_int = clamp(rint(x * inv + zero_point), qmin, qmax)       rint = round half to even
    x_hat = (x_int - zero_point) * scale

``[qmin, qmax]`` is the full range of the integer dtype (uint8 0..255, int8 -128..127, int32); an
observer's narrower ``quant_min/quant_max`` play no role here (numerics.md §1.1).

Unlike fake quantization (``minqat.functional.fake_quantize``, zero point added *after* rounding),
real quantization adds the zero point *before* rounding, and exactly how decides ties
(numerics.md §1.1, §1.2, §9 item 3):

* per tensor, uint8/int8: ``rint(fma32(x, inv, fl32(zp)))`` -- one fused multiply-add, a *single*
  float32 rounding (fbgemm's AVX2 kernel; CPUs without AVX2+FMA use the int32 formula below);
* per tensor, int32: ``rint(fl32(fl32(x * inv) + fl32(zp)))`` -- two roundings (fbgemm's scalar
  loop; measured on torch 2.13, 0 mismatches);
* per channel, all dtypes: ``rint(fl32(fl32(x * inv_c) + fl32(zp_c)))`` -- two roundings, and a
  float64 scale is narrowed to float32 first.

Edge values follow torch as measured: +inf -> qmax, -inf -> qmin. NaN -> qmax for per-tensor
uint8/int8 (the AVX2 kernel clamps first); in the scalar loops (per-tensor int32, every per-channel
quantize) NaN survives the clamp and x86 converts it to the int32 0x80000000, whose low bits give
-2**31 for int32 and 0 for uint8 *and* int8.

Example: ``x = 0.5``, ``scale = 1``, ``zero_point = 1``. Real quantization rounds ``0.5 + 1 = 1.5``
to 2; fake quantization rounds ``0.5`` to 0 and then adds 1.

>>> quantize_per_tensor(torch.tensor([0.5, 1.5, -1.0, 300.0]), 1.0, 1, torch.uint8)
tensor([  2,   2,   0, 255], dtype=torch.uint8)
>>> dequantize(torch.tensor([2, 0, 255], dtype=torch.uint8), 0.5, 1)
tensor([  0.5000,  -0.5000, 127.0000])
"""
from __future__ import annotations

import torch

from .._checks import check_axis
from ..dtypes import dtype_range, plain_dtype
from .float32 import fma32
from .qparams_args import per_channel_scale, per_channel_zero_point, per_tensor_scale, per_tensor_zero_point

__all__ = ["quantize_per_tensor", "quantize_per_channel", "dequantize"]

QUANTIZED_DTYPES = (torch.uint8, torch.int8, torch.int32)  # those torch has quantized twins of


def _quantized_dtype(dtype: torch.dtype) -> torch.dtype:
    """The plain integer dtype for ``dtype`` (legacy quint8/qint8/qint32 translated)."""
    allowed = "torch.uint8, torch.int8, torch.int32 (or torch.quint8, torch.qint8, torch.qint32)"
    try:
        plain = plain_dtype(dtype)
    except ValueError:
        plain = None
    if plain not in QUANTIZED_DTYPES:
        raise ValueError(f"dtype must be one of {allowed}, got {dtype!r}")
    return plain


def _float32_input(x) -> torch.Tensor:
    """``x`` detached as float32 (float16/bfloat16 widen exactly; float64 is narrowed first)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {type(x).__name__} {getattr(x, 'dtype', '')}")
    return x.detach().to(torch.float32)


def _round_and_clamp(v: torch.Tensor, qmin: int, qmax: int, nan_to: int, dtype: torch.dtype) -> torch.Tensor:
    """``clamp(rint(v), qmin, qmax)`` with NaN -> ``nan_to``, cast to ``dtype``.

    The clamp runs in float64, where the int32 bounds are exact (fbgemm clamps in double too).
    """
    v_int = torch.round(v).double().clamp(qmin, qmax)  # round half to even, in float32
    return torch.nan_to_num(v_int, nan=float(nan_to)).to(dtype)


def _scalar_loop_nan(dtype: torch.dtype) -> int:
    """What NaN becomes in fbgemm's scalar loop: x86 turns it into the int32 0x80000000 and the
    cast to the dtype keeps the low bits (-2**31 for int32, 0 for uint8 and int8)."""
    return dtype_range(torch.int32)[0] if dtype == torch.int32 else 0


def _channel_view(t: torch.Tensor, axis: int, ndim: int) -> torch.Tensor:
    """Reshape a per-channel vector ``(C,)`` to broadcast along ``axis`` of an ``ndim``-d tensor."""
    shape = [1] * ndim
    shape[axis] = -1
    return t.reshape(shape)


def quantize_per_tensor(x: torch.Tensor, scale, zero_point, dtype: torch.dtype) -> torch.Tensor:
    r"""Quantize ``x`` with one scale and zero point; equals
    ``torch.quantize_per_tensor(x, scale, zero_point, dtype).int_repr()`` bit for bit.

    .. code-block:: text

        uint8/int8:  x_int = clamp(rint(fma32(x, inv, fl32(zp))), qmin, qmax)     one rounding
        int32:       x_int = clamp(rint(fl32(fl32(x * inv) + fl32(zp))), qmin, qmax)

    with ``inv = fl32(1 / fl32(scale))`` and ``[qmin, qmax]`` the dtype's full range (numerics.md
    §1.1). The zero point is added *before* rounding; for uint8/int8 inside a fused multiply-add, so
    ``x * inv`` is not rounded on its own: that moves about 4 in a million random values across a
    rounding tie compared with the two-rounding formula.

    Args:
        x: floating-point tensor (computed in float32, like torch, which accepts only float32).
        scale: positive float or one-element float tensor.
        zero_point: int or one-element tensor inside the dtype's range.
        dtype: ``torch.uint8``, ``torch.int8``, ``torch.int32`` or their legacy ``quint8``,
            ``qint8``, ``qint32`` twins; the result is the plain dtype.

    NaN maps to qmax (uint8/int8) or -2**31 (int32), ±inf to qmax/qmin, as torch does.

    >>> quantize_per_tensor(torch.tensor([-0.25, 0.25, 0.75, float("nan")]), 0.5, 0, torch.int8)
    tensor([  0,   0,   2, 127], dtype=torch.int8)
    """
    dtype = _quantized_dtype(dtype)
    qmin, qmax = dtype_range(dtype)
    x = _float32_input(x)
    scale = per_tensor_scale(scale, x.device)
    zero_point = per_tensor_zero_point(zero_point, qmin, qmax, x.device)
    inv = 1.0 / scale  # fl32(1 / s32), a float32 division (numerics.md §9 item 2)
    zp = zero_point.to(torch.float32)  # fl32(zp): rounds int32 zero points beyond 2**24
    if dtype == torch.int32:
        return _round_and_clamp(x * inv + zp, qmin, qmax, _scalar_loop_nan(dtype), dtype)  # two roundings
    return _round_and_clamp(fma32(x, inv, zp), qmin, qmax, qmax, dtype)  # one rounding (FMA)


def quantize_per_channel(x: torch.Tensor, scales, zero_points, axis: int, dtype: torch.dtype) -> torch.Tensor:
    r"""Quantize ``x`` with one scale and zero point per index ``c`` along ``axis``; equals
    ``torch.quantize_per_channel(x, scales, zero_points, axis, dtype).int_repr()`` bit for bit.

    .. code-block:: text

        inv_c = fl32(1 / fl32(scale_c))
        x_int = clamp(rint(fl32(fl32(x * inv_c) + fl32(zp_c))), qmin, qmax)

    Two roundings, no FMA (numerics.md §1.2): the zero point is added in float32 before rounding.
    ``[qmin, qmax]`` is the dtype's full range. ±inf map to qmax/qmin; NaN maps to 0 for uint8 and
    int8 and to -2**31 for int32 (x86's NaN -> int32 conversion, see the module docstring).

    Args:
        x: floating-point tensor with at least one dimension.
        scales: 1-D float tensor of length ``x.size(axis)`` (float64 is narrowed to float32).
        zero_points: 1-D integer tensor of the same length, inside the dtype's range.
        axis: the channel dimension of ``x``.
        dtype: as for :func:`quantize_per_tensor`.

    >>> x = torch.tensor([[0.5, 1.0], [0.5, 1.0]])
    >>> quantize_per_channel(x, torch.tensor([1.0, 0.5]), torch.tensor([0, 10]), 0, torch.uint8)
    tensor([[ 0,  1],
            [11, 12]], dtype=torch.uint8)
    """
    dtype = _quantized_dtype(dtype)
    qmin, qmax = dtype_range(dtype)
    x = _float32_input(x)
    axis = check_axis(axis, x.dim())
    channels = x.size(axis)
    scale = per_channel_scale(scales, channels, x.device, name="scales")
    zero_point = _integer_zero_points(zero_points, channels, qmin, qmax, x.device)
    inv = _channel_view(1.0 / scale, axis, x.dim())  # fl32(1 / s32_c)
    zp = _channel_view(zero_point.to(torch.float32), axis, x.dim())  # fl32(zp_c)
    return _round_and_clamp(x * inv + zp, qmin, qmax, _scalar_loop_nan(dtype), dtype)  # no FMA


def _integer_zero_points(zero_points, channels: int, qmin: int, qmax: int, device,
                         name: str = "zero_points") -> torch.Tensor:
    """Validated 1-D int64 per-channel zero points (float zero points are a different scheme)."""
    if isinstance(zero_points, torch.Tensor) and zero_points.is_floating_point():
        raise ValueError(
            f"{name} must be an integer tensor, got dtype {zero_points.dtype} "
            "(float zero points belong to the float-qparams scheme, not supported here)"
        )
    return per_channel_zero_point(zero_points, channels, qmin, qmax, device, name=name)


def _wrap_int32(v: torch.Tensor) -> torch.Tensor:
    """Reduce int64 values modulo 2**32 into the int32 range (two's-complement wrap-around)."""
    return (v + 2**31).remainder(2**32) - 2**31


def dequantize(x_int: torch.Tensor, scale, zero_point, axis: int | None = None) -> torch.Tensor:
    r"""Map integers back to float32; equals ``.dequantize()`` of torch's quantized tensor.

    .. code-block:: text

        per tensor  (axis=None):  x_hat = fl32(s32 * fl32(x_int - zp))          float32 product
        per channel (axis=c):     x_hat = fl32((fl32(x_int) - fl32(zp_c)) * scale_c)
                                  the subtraction in float32, the product in float64 with the
                                  unrounded (double) scale, narrowed once

    For uint8/int8 the differences are small integers, exact in float32 (numerics.md §1.3). For int32
    torch's per-tensor kernel subtracts in int32 (wrapping around on overflow, reproduced here) and
    its per-channel kernel subtracts in float32 (rounding beyond 2**24) -- measured on torch 2.13.

    Args:
        x_int: ``torch.uint8``, ``torch.int8`` or ``torch.int32`` tensor.
        scale: per tensor, a positive float or one-element float tensor; per channel, a 1-D float
            tensor of length ``x_int.size(axis)`` (kept in float64 for the product, like torch).
        zero_point: int or one-element integer tensor; per channel a 1-D integer tensor. Must lie in
            the range of ``x_int``'s dtype.
        axis: ``None`` for per-tensor, else the channel dimension.

    >>> dequantize(torch.tensor([[0, 255], [0, 255]], dtype=torch.uint8),
    ...            torch.tensor([0.5, 0.25]), torch.tensor([0, 128]), axis=0)
    tensor([[  0.0000, 127.5000],
            [-32.0000,  31.7500]])
    """
    if not isinstance(x_int, torch.Tensor) or x_int.dtype not in QUANTIZED_DTYPES:
        raise ValueError(
            "x_int must be a torch.uint8, torch.int8 or torch.int32 tensor, "
            f"got {type(x_int).__name__} {getattr(x_int, 'dtype', '')}"
        )
    qmin, qmax = dtype_range(x_int.dtype)
    if axis is None:
        scale = per_tensor_scale(scale, x_int.device)
        zero_point = per_tensor_zero_point(zero_point, qmin, qmax, x_int.device)
        return _wrap_int32(x_int.long() - zero_point).to(torch.float32) * scale
    axis = check_axis(axis, x_int.dim())
    channels = x_int.size(axis)
    if not isinstance(scale, torch.Tensor):
        scale = torch.as_tensor(scale, dtype=torch.float64)  # keep Python floats' double precision
    per_channel_scale(scale, channels, x_int.device, name="scale")  # validation only
    scale64 = _channel_view(scale.detach().to(x_int.device, torch.float64), axis, x_int.dim())
    zero_point = _integer_zero_points(zero_point, channels, qmin, qmax, x_int.device, "zero_point")
    zp = _channel_view(zero_point.to(torch.float32), axis, x_int.dim())
    return ((x_int.to(torch.float32) - zp).double() * scale64).to(torch.float32)
