r"""The int8 ops of ``FloatFunctional`` / ``QFunctional``: add, add_relu, mul, add_scalar, mul_scalar, cat, matmul.

Each function takes plain ``torch.uint8`` / ``torch.int8`` tensors with their per-tensor scale and zero point and
returns the integer result of ``torch.ops.quantized.<op>`` bit for bit (fbgemm/x86 engines, x86 CPU with AVX2 or
AVX-512, torch 2.13; measured on tie-heavy inputs, 0 mismatches -- see ``tests/test_kernels_elementwise.py``).

**Two loops, two roundings.** torch's kernels dequantize to float32, apply the op and quantize back, but the
vectorised loop and the scalar loop that finishes a tensor round differently (``rint`` = ties to even,
``inv = fl32(1 / fl32(y_scale))``, ``fl32`` = round to float32)::

    vector loop:  x_hat = fma32(s, x_int, fl32(s * -z))        scale * zero point premultiplied, one FMA
                  y_int = rint(fl32(v * inv)) + z_y           zero point added after rounding
    scalar loop:  x_hat = fl32(s * (x_int - z))
                  y_int = rint(fl32(fl32(v * inv) + z_y))     zero point added before rounding, no FMA

Which elements take which loop is a fixed function of the shape, the memory layout and the thread count, so it
is reproduced exactly: ``add`` runs its vector loop over whole blocks of 64 elements in memory order
(``minqat.kernels.lanes``), ``cat`` over whole blocks of 8 channels. ``mul``,
``add_scalar`` and ``mul_scalar`` requantize the exact integer product/sum with one float32 multiplier, the same
in both loops. The general ``cat`` path and ``matmul`` dequantize, compute in float32 and quantize with
``quantize_per_tensor`` (the FMA recipe of numerics.md §1.1).

The three rounding recipes are public (:func:`rint_then_add_zp`, :func:`add_zp_then_rint`, :func:`fma_zp_then_rint`):
``minqat.kernels.pooling`` uses them too. A CPU without AVX2 runs other loops that are not modelled here.

>>> a = torch.tensor([10, 20, 30], dtype=torch.uint8)
>>> add(a, 0.5, 10, a, 0.25, 0, 1.0, 5)   # v = 0.5*(a-10) + 0.25*a = 2.5, 10, 17.5; scalar loop: rint(v + 5)
tensor([ 8, 15, 22], dtype=torch.uint8)
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..dtypes import dtype_range
from ..functional.float32 import fma32
from ..functional.qparams_args import per_tensor_scale, per_tensor_zero_point
from ..functional.quantize import dequantize, quantize_per_tensor
from .lanes import all_vector_lanes, channel_lane_mask, float_lanes, suggest_memory_format, vector_lane_mask

__all__ = [
    "add", "add_relu", "mul", "add_scalar", "mul_scalar", "cat", "matmul",
    "rint_then_add_zp", "add_zp_then_rint", "fma_zp_then_rint",
    "dequantize_fma", "vector_lane_mask", "all_vector_lanes", "channel_lane_mask", "float_lanes",
]

EIGHT_BIT = (torch.uint8, torch.int8)
CAT_LANES = 8  # channels per vector step of the NHWC qcat kernel (measured)


# ---------------------------------------------------------------------------------------------------------------
# torch's three rounding recipes: v (float32) * multiplier -> integer grid, clamped to [qmin, qmax] (int64 result)
# ---------------------------------------------------------------------------------------------------------------
def rint_then_add_zp(v: Tensor, multiplier: Tensor, zero_point, qmin: int, qmax: int) -> Tensor:
    """``clamp(rint(fl32(v * m)) + z)``: the AVX loops (``QuantizeAvx2/512``, ``requantize_from_int``)."""
    return (torch.round(v * multiplier).long() + zero_point).clamp(qmin, qmax)


def add_zp_then_rint(v: Tensor, multiplier: Tensor, zero_point, qmin: int, qmax: int) -> Tensor:
    """``clamp(rint(fl32(fl32(v * m) + z)))``: torch's scalar ``quantize_val`` (fbgemm legacy, no FMA)."""
    return torch.round(v * multiplier + _as_float32(zero_point)).long().clamp(qmin, qmax)


def fma_zp_then_rint(v: Tensor, multiplier: Tensor, zero_point, qmin: int, qmax: int) -> Tensor:
    """``clamp(rint(fma32(v, m, z)))``: one rounding, as ``quantize_per_tensor`` (numerics.md §1.1)."""
    m = torch.as_tensor(multiplier, device=v.device).expand_as(v)
    z = _as_float32(zero_point, v.device).expand_as(v)
    return torch.round(fma32(v, m, z)).long().clamp(qmin, qmax)


def dequantize_fma(x_int: Tensor, scale: Tensor, zero_point) -> Tensor:
    """``fma32(s, x, fl32(s * -z))``: the vectorised dequantize of torch's quantized types.

    Computed as ``fl32(s·x + c)`` in float64, which is the FMA's single rounding without emulating it:
    ``s·x`` (24-bit ``s`` times an 8-bit integer) and ``c = fl32(s·−z)`` are both whole multiples of
    ``ulp(s)``, and their sum stays below ``2^33`` such units, so the float64 sum is exact and only the
    narrowing to float32 rounds (``minqat.functional.float32.fma32`` handles general operands).
    """
    if x_int.is_floating_point() or x_int.dtype not in (torch.uint8, torch.int8):
        x = x_int.float()
        return fma32(scale.expand_as(x), x, (scale * -_as_float32(zero_point, x.device)).expand_as(x))
    c = scale * -_as_float32(zero_point, x_int.device)  # fl32(s * -z)
    return (x_int.double() * scale.double() + c.double()).float()


def _as_float32(value, device=None) -> Tensor:
    return torch.as_tensor(value, device=device).to(torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------------------------------
def _check_int8(x, name: str) -> Tensor:
    if not isinstance(x, Tensor) or x.dtype not in EIGHT_BIT:
        raise ValueError(f"{name} must be a torch.uint8 or torch.int8 tensor, "
                         f"got {type(x).__name__} {getattr(x, 'dtype', '')}")
    return x


def _qparams(x: Tensor, scale, zero_point, prefix: str) -> tuple[Tensor, Tensor]:
    """float32 scale and int64 zero point (0-d, on ``x``'s device), validated against ``x``'s dtype."""
    qmin, qmax = dtype_range(x.dtype)
    return (per_tensor_scale(scale, x.device, name=f"{prefix}scale"),
            per_tensor_zero_point(zero_point, qmin, qmax, x.device, name=f"{prefix}zero_point"))


def _same_dtype(a: Tensor, b: Tensor) -> None:
    if a.dtype != b.dtype:
        raise ValueError(f"a_int and b_int must have the same dtype (torch: 'operands should have same data type'), "
                         f"got {a.dtype} and {b.dtype}")


# ---------------------------------------------------------------------------------------------------------------
# the ops
# ---------------------------------------------------------------------------------------------------------------
def add(a_int: Tensor, a_scale, a_zero_point, b_int: Tensor, b_scale, b_zero_point, y_scale, y_zero_point,
        *, relu: bool = False, num_threads: int | None = None) -> Tensor:
    r"""``torch.ops.quantized.add`` (``relu=True``: ``add_relu``) on integers, same shape and dtype.

    .. code-block:: text

        v     = x_hat_a + x_hat_b                  float32; relu: v = max(v, 0)
        y_int = rint(fl32(v * inv)) + z_y          vector loop (x_hat by FMA with premultiplied s*z)
        y_int = rint(fl32(fl32(v * inv) + z_y))    scalar loop (x_hat = fl32(s * (x - z)))

    The two loops disagree on about 1.6e-4 of random pairs; :func:`vector_lane_mask` says which one torch uses
    (``num_threads`` defaults to ``torch.get_num_threads()``, which decides the chunks above 32768 elements).
    The result has ``a_int``'s memory format.

    >>> x = torch.tensor([1, 3, 5], dtype=torch.uint8)
    >>> add(x, 0.5, 0, x, 0.5, 0, 2.0, 1)          # v = x, v / 2 = 0.5, 1.5, 2.5 -> +1 before rounding
    tensor([2, 2, 4], dtype=torch.uint8)
    """
    a_int, b_int = _check_int8(a_int, "a_int"), _check_int8(b_int, "b_int")
    _same_dtype(a_int, b_int)
    if a_int.shape != b_int.shape:
        raise ValueError(f"a_int and b_int must have the same shape, got {tuple(a_int.shape)} and {tuple(b_int.shape)}")
    qmin, qmax = dtype_range(a_int.dtype)
    s_a, z_a = _qparams(a_int, a_scale, a_zero_point, "a_")
    s_b, z_b = _qparams(b_int, b_scale, b_zero_point, "b_")
    s_y, z_y = _qparams(a_int, y_scale, y_zero_point, "y_")
    inv = 1.0 / s_y  # fl32(1 / s_y)
    v_vector = dequantize_fma(a_int, s_a, z_a) + dequantize_fma(b_int, s_b, z_b)
    if all_vector_lanes(a_int, b_int, num_threads):  # the common case: no scalar-loop element at all
        v_vector = v_vector.clamp_min(0) if relu else v_vector
        y = rint_then_add_zp(v_vector, inv, z_y, qmin, qmax)
        return y.to(a_int.dtype).contiguous(memory_format=suggest_memory_format(a_int))
    v_scalar = dequantize(a_int, s_a, z_a) + dequantize(b_int, s_b, z_b)  # fl32(s * (x - z))
    if relu:
        v_vector, v_scalar = v_vector.clamp_min(0), v_scalar.clamp_min(0)
    y = torch.where(vector_lane_mask(a_int, b_int, num_threads),
                    rint_then_add_zp(v_vector, inv, z_y, qmin, qmax),
                    add_zp_then_rint(v_scalar, inv, z_y, qmin, qmax))
    return y.to(a_int.dtype).contiguous(memory_format=suggest_memory_format(a_int))


def add_relu(a_int: Tensor, a_scale, a_zero_point, b_int: Tensor, b_scale, b_zero_point, y_scale, y_zero_point,
             *, num_threads: int | None = None) -> Tensor:
    """``torch.ops.quantized.add_relu``: :func:`add` with ``max(v, 0)`` before quantizing."""
    return add(a_int, a_scale, a_zero_point, b_int, b_scale, b_zero_point, y_scale, y_zero_point,
               relu=True, num_threads=num_threads)


def mul(a_int: Tensor, a_scale, a_zero_point, b_int: Tensor, b_scale, b_zero_point, y_scale, y_zero_point,
        *, relu: bool = False) -> Tensor:
    r"""``torch.ops.quantized.mul`` (``relu=True``: ``mul_relu``); ``b_int`` broadcasts against ``a_int``.

    .. code-block:: text

        m     = fl32(fl32(s_a * s_b) * fl32(1 / s_y))        one float32 multiplier
        y_int = clamp(rint(fl32(fl32((a - z_a) * (b - z_b)) * m)) + z_y)      relu: max(y_int, z_y)

    The product of centred integers is exact (|.| <= 255**2), so both of torch's loops agree.

    >>> mul(torch.tensor([3, 5], dtype=torch.uint8), 1.0, 1, torch.tensor([2], dtype=torch.uint8), 0.5, 0, 1.0, 0)
    tensor([2, 4], dtype=torch.uint8)
    """
    a_int, b_int = _check_int8(a_int, "a_int"), _check_int8(b_int, "b_int")
    _same_dtype(a_int, b_int)
    qmin, qmax = dtype_range(a_int.dtype)
    s_a, z_a = _qparams(a_int, a_scale, a_zero_point, "a_")
    s_b, z_b = _qparams(b_int, b_scale, b_zero_point, "b_")
    s_y, z_y = _qparams(a_int, y_scale, y_zero_point, "y_")
    multiplier = (s_a * s_b) * (1.0 / s_y)
    product = (a_int.long() - z_a) * (b_int.long() - z_b)  # exact; broadcasts like torch's TensorIterator
    y = rint_then_add_zp(product.float(), multiplier, z_y, qmin, qmax)
    if relu:
        y = torch.maximum(y, z_y)
    return y.to(a_int.dtype).contiguous(memory_format=suggest_memory_format(a_int) if y.dim() == a_int.dim()
                                        else torch.contiguous_format)


def _python_qparams(x: Tensor, scale, zero_point) -> tuple[float, int]:
    """Per-tensor qparams as Python numbers (validated). Tensors are read on the host, as torch's kernel does."""
    s, z = _qparams(x, scale, zero_point, "")
    return (float(scale) if not isinstance(scale, Tensor) else float(s)), int(z)


def add_scalar(x_int: Tensor, scale, zero_point, other: float, *, relu: bool = False) -> tuple[Tensor, float, int]:
    r"""``torch.ops.quantized.add_scalar``: ``x + other`` with *new* output qparams; returns ``(y_int, s', z')``.

    In double precision, ``c_q = rint(other / s)``; if ``z - c_q`` is a valid zero point the integers are kept and
    ``z' = z - c_q``, ``s' = s``. Otherwise the range is stretched (``z' = qmin`` or ``qmax``)::

        z - c_q < qmin:  s' = (qmax - (z - c_q)) / (qmax - qmin) * s,   z' = qmin
        z - c_q > qmax:  s' = ((z - c_q) - qmin) / (qmax - qmin) * s,   z' = qmax
        y_int = clamp(rint(fl32(fl32(x - z + c_q) * fl32(fl32(s) * fl32(1 / fl32(s'))))) + z')

    ``relu=True`` (``add_scalar_relu``) clamps at ``z'``. Tensor qparams are read on the host.

    >>> add_scalar(torch.tensor([0, 10], dtype=torch.uint8), 0.5, 10, 2.0)     # c_q = 4: only z moves
    (tensor([ 0, 10], dtype=torch.uint8), 0.5, 6)
    """
    x_int = _check_int8(x_int, "x_int")
    qmin, qmax = dtype_range(x_int.dtype)
    s, z = _python_qparams(x_int, scale, zero_point)
    c_q = round(float(other) / s)  # Python's round is half-to-even, like nearbyint
    if qmin <= z - c_q <= qmax:
        y = x_int.clamp_min(z - c_q) if relu else x_int.clone()
        return y, s, z - c_q
    if z - c_q < qmin:
        s_y, z_y = (float(qmax) - (z - c_q)) / (float(qmax) - qmin) * s, qmin
    else:
        s_y, z_y = (float(z - c_q) - qmin) / (float(qmax) - qmin) * s, qmax
    s32 = torch.tensor(s, dtype=torch.float32, device=x_int.device)
    multiplier = s32 * (1.0 / torch.tensor(s_y, dtype=torch.float32, device=x_int.device))
    y = rint_then_add_zp((x_int.long() - z + c_q).float(), multiplier, z_y, qmin, qmax)
    if relu:
        y = y.clamp_min(z_y)
    return y.to(x_int.dtype), s_y, z_y


def mul_scalar(x_int: Tensor, scale, zero_point, other: float, *, relu: bool = False) -> tuple[Tensor, float, int]:
    r"""``torch.ops.quantized.mul_scalar``: only the qparams change; returns ``(y_int, s', z')``.

    ``other > 0``: ``y = x``, ``s' = other * s``, ``z' = z``. ``other == 0``: ``y = 0``, ``s' = 1``, ``z' = 0``.
    ``other < 0``: the grid is mirrored, ``y = qmax + qmin - x``, ``z' = qmax - (z - qmin)``, ``s' = |other| * s``.
    ``relu=True`` (``mul_scalar_relu``) clamps at ``z'``. Tensor qparams are read on the host.

    >>> mul_scalar(torch.tensor([0, 200], dtype=torch.uint8), 0.5, 10, -2.0)
    (tensor([255,  55], dtype=torch.uint8), 1.0, 245)
    """
    x_int = _check_int8(x_int, "x_int")
    qmin, qmax = dtype_range(x_int.dtype)
    s, z = _python_qparams(x_int, scale, zero_point)
    other = float(other)
    if other > 0.0:
        y, s_y, z_y = x_int.clone(), other * s, z
    elif other == 0.0:
        y, s_y, z_y = torch.zeros_like(x_int), 1.0, 0
    else:
        y, s_y, z_y = (qmax + qmin - x_int.long()).to(x_int.dtype), abs(other) * s, qmax - (z - qmin)
    return (y.clamp_min(z_y) if relu else y), s_y, z_y


def _requantize_nhwc(x_int: Tensor, scale, zero_point, y_scale, y_zero_point, relu: bool) -> Tensor:
    """One input of the NHWC ``qcat`` kernel: copied when its qparams are the output's, else requantized."""
    qmin, qmax = dtype_range(x_int.dtype)
    s, z = _qparams(x_int, scale, zero_point, "")
    s_y, z_y = _qparams(x_int, y_scale, y_zero_point, "y_")
    inv_vector = (1.0 / torch.as_tensor(y_scale, dtype=torch.float64, device=x_int.device)).float()  # fl32(1 / double)
    v_vector, v_scalar = dequantize_fma(x_int, s, z), dequantize(x_int, s, z)
    if relu:
        v_vector, v_scalar = v_vector.clamp_min(0), v_scalar.clamp_min(0)
    y = torch.where(channel_lane_mask(x_int.shape[1], CAT_LANES, x_int.device),
                    rint_then_add_zp(v_vector, inv_vector, z_y, qmin, qmax),
                    add_zp_then_rint(v_scalar, 1.0 / s_y, z_y, qmin, qmax)).to(x_int.dtype)
    if relu:
        return y
    same = (torch.as_tensor(scale, dtype=torch.float64) == torch.as_tensor(y_scale, dtype=torch.float64)) & (z == z_y)
    return torch.where(same.to(x_int.device), x_int, y)


def _dequantize_like_torch(x_int: Tensor, scale, zero_point) -> Tensor:
    """``.dequantize()`` of torch's quantized tensor: float32, laid out in ``x_int``'s suggested memory format."""
    return dequantize(x_int, scale, zero_point).contiguous(memory_format=suggest_memory_format(x_int))


def cat(tensors: Sequence[Tensor], scales: Sequence, zero_points: Sequence, dim: int, y_scale, y_zero_point,
        *, relu: bool = False) -> Tensor:
    r"""``torch.ops.quantized.cat`` (``relu=True``: ``cat_relu``): concatenate, requantize to the output qparams.

    *NHWC path* -- ``dim == 1`` and every input 4-D channels-last contiguous (as torch checks; an NCHW tensor with
    ``H = W = 1`` qualifies): inputs whose qparams equal the output's are copied (unless ``relu``); the others are
    requantized per element, channels ``c < C // 8 * 8`` by the vector recipe with ``inv = fl32(1 / y_scale)``
    computed in double, the rest by the scalar recipe (module docstring). Output channels-last.

    *General path*: ``quantize_per_tensor(torch.cat([dequantize(x_i)], dim))`` (FMA recipe), ``relu``: ``max(y, z_y)``.

    >>> x = torch.tensor([[1, 2]], dtype=torch.uint8)
    >>> cat([x, x], [1.0, 0.5], [0, 0], 0, 1.0, 0)
    tensor([[1, 2],
            [0, 1]], dtype=torch.uint8)
    """
    if not isinstance(tensors, (list, tuple)) or len(tensors) == 0:
        raise ValueError(f"tensors must be a non-empty list of integer tensors, got {tensors!r}")
    if len(scales) != len(tensors) or len(zero_points) != len(tensors):
        raise ValueError(f"scales and zero_points must have one entry per tensor ({len(tensors)}), "
                         f"got {len(scales)} and {len(zero_points)}")
    tensors = [_check_int8(t, f"tensors[{i}]") for i, t in enumerate(tensors)]
    for i, t in enumerate(tensors[1:], 1):
        if t.dtype != tensors[0].dtype:
            raise ValueError(f"all tensors must have the same dtype, got {tensors[0].dtype} and {t.dtype} at index {i}")
    if dim == 1 and all(t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) for t in tensors):
        parts = [_requantize_nhwc(t, s, z, y_scale, y_zero_point, relu)
                 for t, s, z in zip(tensors, scales, zero_points)]
        return torch.cat(parts, 1).contiguous(memory_format=torch.channels_last)
    x_hat = torch.cat([_dequantize_like_torch(t, s, z) for t, s, z in zip(tensors, scales, zero_points)], dim)
    y = quantize_per_tensor(x_hat, y_scale, y_zero_point, tensors[0].dtype)
    if relu:
        y = torch.maximum(y, _qparams(y, y_scale, y_zero_point, "y_")[1].to(y.dtype))
    return y


def matmul(a_int: Tensor, a_scale, a_zero_point, b_int: Tensor, b_scale, b_zero_point, y_scale, y_zero_point) -> Tensor:
    r"""``torch.ops.quantized.matmul`` as x86 builds of torch compute it (no ruy): in float32,

    ``y_int = quantize_per_tensor(torch.matmul(x_hat_a, x_hat_b), y_scale, y_zero_point)`` (FMA recipe).

    >>> a = torch.tensor([[2, 4]], dtype=torch.uint8)
    >>> matmul(a, 0.5, 0, a.T.contiguous(), 0.5, 0, 1.0, 0)        # 1*1 + 2*2
    tensor([[5]], dtype=torch.uint8)
    """
    a_int, b_int = _check_int8(a_int, "a_int"), _check_int8(b_int, "b_int")
    _same_dtype(a_int, b_int)
    _qparams(a_int, a_scale, a_zero_point, "a_")
    _qparams(b_int, b_scale, b_zero_point, "b_")
    product = torch.matmul(_dequantize_like_torch(a_int, a_scale, a_zero_point),
                           _dequantize_like_torch(b_int, b_scale, b_zero_point))
    return quantize_per_tensor(product, y_scale, y_zero_point, a_int.dtype)
