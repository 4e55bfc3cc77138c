r"""Integer reference linear layer: exact int32 accumulation, then requantization.

What torch's ``quantized::linear`` / ``linear_relu`` compute under the ``fbgemm`` engine
(numerics.md §7.1), on plain integer tensors::

    acc[m, c] = sum_k (x_int[m, k] - z_x) * (w_int[c, k] - z_w[c])         exact int32
    y_int     = requantize(acc, s_x, s_w, s_y, z_y, bias)                  minqat.kernels.requantize

Exactness. Two paths compute the same integers:

* **float64** (any device): a float64 matmul of the centred integers. Each product has magnitude at
  most ``255 * 255 < 2**16``, so every partial sum of ``K`` products is an integer below
  ``K * 2**16``; float64 represents all integers below ``2**53`` exactly, hence no rounding
  happens in any summation order while ``K < 2**37``.
* **int8 GEMM** (CPU, used automatically): ``torch._int_mm`` (int8 x int8 -> int32, exact).
  It needs int8 operands, so uint8 activations are shifted, ``x' = x - 128``, and the zero points
  are folded in with exact int32 row and column sums (``d = 128 - z_x``, or ``d = -z_x`` for int8
  activations, which need no shift)::

      sum_k (x'[k] + d) (w[c,k] - z_w[c]) = sum_k x'[k] w[c,k] - z_w[c] sum_k x'[k]
                                           + d (sum_k w[c,k] - K z_w[c])

  This is also how fbgemm itself handles zero points (row/column offsets, numerics.md §7.1).

  The weight side -- ``w`` laid out as ``_int_mm``'s operand, ``sum_k w - K z_w`` -- depends on the
  weight alone: :func:`pack_weight` computes it (a :class:`PackedWeight`, fbgemm's ``linear_prepack``).
  The functions here pack on every call; the int8 modules pack once and keep it
  (``minqat.nn.quantized.prepared.LayerCache``).

Both wrap around on int32 overflow as fbgemm's accumulator does (it needs ``K`` in the tens of
thousands at worst-case values).

>>> x = torch.tensor([[10, 12]], dtype=torch.uint8)                  # z_x = 10
>>> w = torch.tensor([[1, 2], [3, -4]], dtype=torch.int8)             # z_w = 0
>>> linear_int(x, 10, w, 0)                                           # [0*1 + 2*2, 0*3 + 2*(-4)]
tensor([[ 4, -8]], dtype=torch.int32)
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..dtypes import dtype_range
from ..functional.qparams_args import per_channel_zero_point, per_tensor_zero_point
from .requantize import TOP_BIT, requantizer

__all__ = ["linear_int", "quantized_linear"]

ACTIVATION_DTYPES = (torch.uint8, torch.int8)


def check_linear_operands(x_int, w_int) -> None:
    """``ValueError`` unless ``x_int`` is uint8/int8 ``(..., K)`` and ``w_int`` int8 ``(C, K)``."""
    if not isinstance(x_int, torch.Tensor) or x_int.dtype not in ACTIVATION_DTYPES:
        raise ValueError(
            "x_int must be a torch.uint8 or torch.int8 tensor, "
            f"got {type(x_int).__name__} {getattr(x_int, 'dtype', '')}"
        )
    if not isinstance(w_int, torch.Tensor) or w_int.dtype != torch.int8:
        raise ValueError(f"w_int must be a torch.int8 tensor, got {type(w_int).__name__} {getattr(w_int, 'dtype', '')}")
    if x_int.dim() < 1 or w_int.dim() != 2 or x_int.size(-1) != w_int.size(1):
        raise ValueError(
            f"x_int must be (..., in_features) and w_int (out_features, in_features) with matching "
            f"in_features, got x_int {tuple(x_int.shape)} and w_int {tuple(w_int.shape)}"
        )


def weight_zero_point(w_zero_point, channels: int, device) -> torch.Tensor:
    """0-d (per-tensor) or ``(C_out,)`` (per-channel) int64 weight zero point, in [-128, 127]."""
    qmin, qmax = dtype_range(torch.int8)
    if isinstance(w_zero_point, torch.Tensor) and w_zero_point.dim() == 1:
        if w_zero_point.is_floating_point():
            raise ValueError(f"w_zero_point must be an integer tensor, got dtype {w_zero_point.dtype}")
        return per_channel_zero_point(w_zero_point, channels, qmin, qmax, device, name="w_zero_point")
    return per_tensor_zero_point(w_zero_point, qmin, qmax, device, name="w_zero_point")


def wrap_int32(v: torch.Tensor) -> torch.Tensor:
    """int64 -> int32 with two's-complement wrap-around, like fbgemm's int32 accumulator."""
    return ((v + 2**31).remainder(2**32) - 2**31).to(torch.int32)


def _mm_operand(t: torch.Tensor) -> torch.Tensor:
    """``t`` laid out as ``torch._int_mm`` reads it: canonical row-major, or column-major (a transposed view
    costs no copy). Any other layout is copied to row-major, also a column-major matrix with a size-1
    dimension: ``_int_mm`` misreads e.g. the transpose of an ``(n, 1)`` matrix (measured, torch 2.13)."""
    rows, cols = t.shape
    if t.stride() == (cols, 1) or (rows > 1 and cols > 1 and t.stride() == (1, rows)):
        return t
    return _row_major(t)


def _row_major(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` with canonical row-major strides ``(cols, 1)``, also where a dimension is 1."""
    return torch.empty_like(t, memory_format=torch.contiguous_format).copy_(t)


@functools.lru_cache(maxsize=None)
def _int_mm_works_on_cpu() -> bool:
    """Probe once whether this torch has a correct CPU ``torch._int_mm`` (older releases lack it)."""
    try:
        a = torch.tensor([[1, -2, 3], [4, 5, -128]], dtype=torch.int8)
        b = torch.tensor([[7, 8], [-9, 10], [11, 127]], dtype=torch.int8)
        return torch.equal(torch._int_mm(a, b), (a.int() @ b.int()))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def int_mm_usable(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether the exact int8 GEMM path applies (CPU, non-empty operands, a working ``_int_mm``)."""
    return x.device.type == "cpu" and x.numel() > 0 and w.numel() > 0 and _int_mm_works_on_cpu()


def int8_codes(x: torch.Tensor) -> torch.Tensor:
    """``x`` as int8 GEMM operand: int8 as is, uint8 shifted to ``x - 128`` (flip the top bit, two's complement)."""
    return x if x.dtype == torch.int8 else torch.bitwise_xor(x, TOP_BIT).view(torch.int8)


def int8_offset(dtype: torch.dtype, z_x: torch.Tensor) -> torch.Tensor:
    """``d`` with ``x - z_x = int8_codes(x) + d``: ``128 - z_x`` for uint8, ``-z_x`` for int8 (0-d int32)."""
    return (-z_x if dtype == torch.int8 else 128 - z_x).to(torch.int32)


def shift_to_int8(x: torch.Tensor, z_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x', d)`` with ``x' = x - offset`` int8 and ``x - z_x = x' + d`` (offset 128 for uint8, else 0)."""
    return int8_codes(x), int8_offset(x.dtype, z_x)


@dataclass(frozen=True)
class PackedWeight:
    r"""An int8 weight matrix laid out for ``torch._int_mm``, with the terms of its zero point (:func:`pack_weight`).

    fbgemm packs a layer's weight once (``linear_prepack`` / ``conv_prepack``); the int8 modules keep a
    ``PackedWeight`` the same way, the kernel functions pack on every call. For ``w (C, K)``::

        W'         = w^T  (K, C), or [w^T, 1...1] (K, C + 1) when some z_w != 0 (the ones give sum_k x')
        column_sum = sum_k w[c, k] - K z_w[c]                                      exact int32

    CPU ``_int_mm`` is fastest with ``W'`` column-major for a one-row product and row-major for longer
    ones (measured, torch 2.13): the column-major form is a view of ``w``, the row-major one a copy.
    """

    column_major: torch.Tensor  # (K, C') W' as a view of the row-major (C', K) [w; ones]
    row_major: torch.Tensor | None  # (K, C') W' copied row-major, or None where the copy would not pay
    zero_point: torch.Tensor  # () or (C,) int32 z_w
    column_sum: torch.Tensor  # (C,) int32 sum_k w[c, k] - K z_w[c]

    def operand(self, m: int) -> torch.Tensor:
        """``W'`` for a product with an ``(m, K)`` left operand."""
        return self.row_major if self.row_major is not None and m > 1 else self.column_major

    def offset(self, d) -> torch.Tensor:
        """``d (sum_k w - K z_w)``, the ``(C,)`` int32 term of an input offset ``d`` (module docstring)."""
        return d * self.column_sum


def pack_weight(w: torch.Tensor, z_w: torch.Tensor, transpose: bool) -> PackedWeight:
    """Pack ``w (C, K)`` int8 with its validated zero point (0-d or ``(C,)``); ``transpose``: also copy ``W'``
    row-major.

    Whether the weights are asymmetric (need the ones column) is read from ``z_w``: the int8 GEMM runs on CPU
    only, where reading values costs no synchronisation.

    >>> packed = pack_weight(torch.tensor([[1, 2], [3, -4]], dtype=torch.int8), torch.tensor(0), transpose=False)
    >>> packed.column_sum, packed.column_major.shape                   # symmetric: no ones column
    (tensor([ 3, -1], dtype=torch.int32), torch.Size([2, 2]))
    """
    c, k = w.shape
    ones = torch.ones(1, k, dtype=torch.int8, device=w.device)
    symmetric = not bool(z_w.ne(0).any())
    rows = w.contiguous() if symmetric else torch.cat([w, ones])  # (C', K)
    z_w = z_w.to(torch.int32)
    w_sum = torch._int_mm(_mm_operand(ones), _mm_operand(w.t()))[0]  # sum_k w[c, k]
    row_major = _row_major(rows.t()) if transpose else None
    return PackedWeight(_mm_operand(rows.t()), row_major, z_w, w_sum - k * z_w)


def gemm_acc_int8(x_s: torch.Tensor, packed: PackedWeight, offset: torch.Tensor) -> torch.Tensor:
    """Exact ``sum_k (x_s[m, k] + d) * (w[c, k] - z_w[c])`` in int32 for int8 ``x_s (M, K)``: ``(M, C)``,
    with ``offset = packed.offset(d)``.

    One ``_int_mm`` gives ``sum_k x' w`` (and ``sum_k x'`` from the ones column, for asymmetric weights);
    the zero-point terms are added in int32 (module docstring).
    """
    p = torch._int_mm(_mm_operand(x_s), packed.operand(x_s.size(0)))  # (M, C')
    c = packed.column_sum.size(0)
    if p.size(1) == c:  # symmetric weights: z_w = 0
        return p.add_(offset)
    xw, x_sum = p[:, :c], p[:, c:]  # [sum_k x' w,  sum_k x']
    return (xw - packed.zero_point * x_sum).add_(offset)


def linear_int(x_int: torch.Tensor, x_zero_point, w_int: torch.Tensor, w_zero_point) -> torch.Tensor:
    r"""Exact int32 accumulator ``acc[..., c] = sum_k (x_int[..., k] - z_x) (w_int[c, k] - z_w[c])``.

    Args:
        x_int: ``(..., in_features)`` uint8 (torch's quint8 activations) or int8 tensor.
        x_zero_point: int or one-element tensor in ``x_int``'s dtype range.
        w_int: ``(out_features, in_features)`` int8 tensor.
        w_zero_point: int or 0-d tensor (per-tensor weights) or ``(out_features,)`` integer tensor
            (per-channel weights), in [-128, 127]; asymmetric weights are exact too.

    Returns:
        ``(..., out_features)`` int32 accumulator (wrapping on int32 overflow like fbgemm).

    >>> linear_int(torch.tensor([0, 255], dtype=torch.uint8), 0, torch.tensor([[127, -128]], dtype=torch.int8),
    ...            torch.tensor([-1]))                                # 0*128 + 255*(-127)
    tensor([-32385], dtype=torch.int32)
    """
    check_linear_operands(x_int, w_int)
    qmin, qmax = dtype_range(x_int.dtype)
    z_x = per_tensor_zero_point(x_zero_point, qmin, qmax, x_int.device, name="x_zero_point")
    z_w = weight_zero_point(w_zero_point, w_int.size(0), x_int.device)
    x2d = x_int.reshape(-1, x_int.size(-1))  # (M, K)
    if int_mm_usable(x2d, w_int):
        packed = pack_weight(w_int, z_w, transpose=x2d.size(0) >= w_int.size(0))  # the copy pays for long x
        x_s, d = shift_to_int8(x2d, z_x)
        acc = gemm_acc_int8(x_s, packed, packed.offset(d))
    else:
        x_c = x2d.to(torch.float64) - z_x
        w_c = w_int.to(torch.float64) - z_w.reshape(-1, 1)
        acc = wrap_int32((x_c @ w_c.t()).to(torch.int64))  # exact: every partial sum < 2**53
    return acc.reshape(*x_int.shape[:-1], w_int.size(0))


def quantized_linear(x_int: torch.Tensor, x_scale, x_zero_point, w_int: torch.Tensor, w_scale, w_zero_point,
                     bias: torch.Tensor | None = None, *, y_scale, y_zero_point, relu: bool = False,
                     dtype: torch.dtype = torch.uint8,
                     requantization: str = "fbgemm") -> torch.Tensor:
    r"""A quantized linear layer: ``torch.ops.quantized.linear`` (``linear_relu`` with ``relu=True``)
    under the fbgemm engine, bit for bit, on plain integer tensors.

    .. code-block:: text

        acc   = linear_int(x_int, z_x, w_int, z_w)                        exact int32
        y_int = requantize(acc, s_x, s_w, s_y, z_y, bias, relu)           numerics.md §7.1

    Args:
        x_int, x_zero_point, w_int, w_zero_point: as for :func:`linear_int`; ``x_scale``: input scale.
        w_scale: float / 0-d tensor for per-tensor weights, ``(out_features,)`` tensor for
            per-channel weights (this decides how fbgemm adds the bias, see ``requantize``).
        bias: ``None`` or float ``(out_features,)``, added in the real domain like torch.
        y_scale, y_zero_point: output qparams.
        relu: fused ReLU (clamp below at ``y_zero_point``).
        dtype: ``torch.uint8`` (torch's quint8) or ``torch.int8``.
        requantization: ``"fbgemm"`` (default: torch's recipe, bit-exact), ``"fixed_point"`` (Jacob et
            al. 2018 §2.2, ``requantize_integer_only``: within one unit of the real-valued result) or
            ``"onnxruntime"`` (ONNX Runtime's ``QGemm`` / ``QLinearMatMul``: int32 bias).

    >>> x = torch.tensor([[11, 13]], dtype=torch.uint8)                   # z_x = 10: centred [1, 3]
    >>> w = torch.tensor([[1, 0], [0, 1]], dtype=torch.int8)
    >>> quantized_linear(x, 0.5, 10, w, 1.0, 0, y_scale=1.0, y_zero_point=0)   # 0.5 -> 0, 1.5 -> 2
    tensor([[0, 2]], dtype=torch.uint8)
    """
    recipe = requantizer(requantization)
    acc = linear_int(x_int, x_zero_point, w_int, w_zero_point)
    return recipe(acc, x_scale, w_scale, y_scale, y_zero_point, bias, axis=-1, relu=relu, dtype=dtype)
