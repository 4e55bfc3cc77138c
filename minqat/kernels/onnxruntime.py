r"""What ONNX Runtime's CPU kernels compute, on plain integer tensors: the ``"onnxruntime"`` requantization mode.

A QDQ graph (``minqat.onnx.export_onnx``) runs in ONNX Runtime (ORT) on its integer kernels: ORT's graph
optimizer fuses ``DequantizeLinear -> Conv -> QuantizeLinear`` into ``QLinearConv``, ``... Gemm ...`` into
``QGemm``, ``... MatMul ...`` into ``QLinearMatMul`` and ``... Add ...`` into ``QLinearAdd``. Their arithmetic
is not torch's (``minqat.kernels.requantize``, numerics.md §7.1); this module is ORT's, so that an int8 model in
this mode and ORT compute the same integers. Verified bit for bit against onnxruntime 1.32 (CPU execution
provider, x86-64 with AVX2/AVX-512; ``tests/test_onnx.py``). ``rint`` rounds half to even, ``fl32`` rounds to
float32, ``wrap32`` wraps to int32.

**Conv / linear** (``QLinearConv``, ``QGemm``, ``QLinearMatMul``: MLAS ``MlasRequantizeOutput`` and the fused
``MlasConvSym`` kernels; the output scale is computed once, in float32, as ``x_scale * w_scale / y_scale`` left
to right)::

    s_b[c]  = fl32(s_x * s_w[c])                      the bias scale written into the graph
    b_int[c] = clamp(rint(b[c] / s_b[c]), int32)      bias quantized once, at export (float64 division)
    mult[c] = fl32(s_b[c] / s_y)
    y_int   = clamp(rint(fl32(fl32(wrap32(acc + b_int)) * mult[c])) + z_y, relu ? z_y : qmin, qmax)

The bias is an int32 added to the exact accumulator (ORT ignores the bias's DequantizeLinear scale and adds
the integers), the zero point is added after rounding. torch instead adds the float bias in float32
(``fl32(acc) + fl32(b / s_b)``): the two differ by at most one unit, only near ties (measured on random
layers in ``tests/test_onnx.py``: 1.3e-4 of outputs).

**QuantizeLinear** (``MlasQuantizeLinear``): ``y_int = clamp(rint(fl32(x / s)) + z, qmin, qmax)``, NaN -> qmin.
A true division, and the zero point added after rounding: torch's ``quantize_per_tensor`` multiplies by
``fl32(1 / s)`` and adds the zero point before rounding (numerics.md §1.1), which differs at and near ties.

**QLinearAdd** (``MlasQLinearAddU8KernelAvx2`` / ``S8``, what x86 CPUs with AVX2 run; ARM runs a fixed-point
kernel that is not modelled)::

    r_a   = fl32(s_a / s_y),   r_b = fl32(s_b / s_y)
    fixed = fl32(z_y - fma32(r_a, z_a, fl32(r_b * z_b)))     the compiler contracts one product (measured)
    t     = fma32(a_int, r_a, fma32(b_int, r_b, fixed))
    y_int = saturate(rint(t))                                  |t| >= 2**31 gives qmin (cvtps2dq)

>>> acc = torch.tensor([[7], [-7]], dtype=torch.int32)                 # (N=2, C=1)
>>> requantize_onnxruntime(acc, 0.5, torch.tensor([0.5]), 1.0, 10, torch.tensor([0.125]))
tensor([[12],
        [ 8]], dtype=torch.uint8)
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..dtypes import INT32_MAX, INT32_MIN, dtype_range
from ..functional.float32 import fma32
from ..functional.qparams_args import per_channel_scale, per_tensor_scale, per_tensor_zero_point

__all__ = ["bias_int32", "requantize_onnxruntime", "quantize_linear", "qlinear_add"]

EIGHT_BIT = (torch.uint8, torch.int8)


def _weight_scale(w_scale, channels: int, device) -> Tensor:
    """0-d (per-tensor) or ``(C,)`` (per-channel: a 1-D tensor) float32 weight scale."""
    if isinstance(w_scale, Tensor) and w_scale.dim() == 1:
        return per_channel_scale(w_scale, channels, device, name="w_scale")
    return per_tensor_scale(w_scale, device, name="w_scale")


def bias_int32(bias: Tensor, x_scale, w_scale) -> tuple[Tensor, Tensor]:
    r"""The int32 bias of a QDQ conv / linear and its scale: ``(b_int, s_b)``.

    .. code-block:: text

        s_b[c]   = fl32(s_x * s_w[c])                       float32 product of the float32 scales
        b_int[c] = clamp(rint(b[c] / s_b[c]), INT32_MIN, INT32_MAX)      in float64, ties to even

    This is the convention of ORT's quantization tool (``bias / (input_scale * weight_scale)``, rounded), with
    the division in float64. ``s_b`` is what the exported graph's bias ``DequantizeLinear`` carries; ORT's
    fused kernels add ``b_int`` to the int32 accumulator and never read ``s_b``.

    Args:
        bias: float ``(C,)``.
        x_scale: input scale (float or one-element tensor).
        w_scale: per-tensor (float, 0-d tensor) or per-channel (1-D ``(C,)`` tensor) weight scale.

    >>> b_int, s_b = bias_int32(torch.tensor([0.3, -0.375]), 0.5, 0.5)    # 1.2 -> 1, -1.5 -> -2 (to even)
    >>> b_int, s_b
    (tensor([ 1, -2], dtype=torch.int32), tensor(0.2500))
    """
    if not isinstance(bias, Tensor) or not bias.is_floating_point() or bias.dim() != 1:
        raise ValueError(f"bias must be a 1-D float tensor, got {type(bias).__name__} {getattr(bias, 'dtype', '')} "
                         f"{tuple(getattr(bias, 'shape', ()))}")
    s_x = per_tensor_scale(x_scale, bias.device, name="x_scale")
    s_b = s_x * _weight_scale(w_scale, bias.numel(), bias.device)  # fl32(s_x * s_w)
    b_int = torch.round(bias.detach().double() / s_b.double())
    return b_int.clamp(INT32_MIN, INT32_MAX).to(torch.int32), s_b


def _along(t: Tensor, axis: int, ndim: int) -> Tensor:
    if t.dim() == 0:
        return t
    shape = [1] * ndim
    shape[axis] = -1
    return t.reshape(shape)


def requantize_onnxruntime(acc: Tensor, x_scale, w_scale, y_scale, y_zero_point, bias: Tensor | None = None, *,
                           axis: int = 1, relu: bool = False, dtype: torch.dtype = torch.uint8) -> Tensor:
    r"""ORT's requantization of an int32 conv / linear accumulator (``MlasRequantizeOutput``), bit for bit.

    .. code-block:: text

        b_int, s_b = bias_int32(b, s_x, s_w)           (0 without a bias)
        mult  = fl32(s_b / s_y)
        y_int = clamp(rint(fl32(fl32(wrap32(acc + b_int)) * mult)) + z_y, relu ? z_y : qmin, qmax)

    Same signature as ``minqat.kernels.requantize.requantize`` (the float ``bias`` is quantized here with
    :func:`bias_int32`, exactly as the exporter writes it).

    >>> requantize_onnxruntime(torch.tensor([[5, 3]], dtype=torch.int32), 1.0, 0.5, 1.0, 0, axis=1)  # 2.5, 1.5
    tensor([[2, 2]], dtype=torch.uint8)
    """
    if not isinstance(acc, Tensor) or acc.dtype != torch.int32 or acc.dim() == 0:
        raise ValueError(f"acc must be a torch.int32 tensor with at least one dimension, got "
                         f"{type(acc).__name__} {getattr(acc, 'dtype', '')}")
    if dtype not in EIGHT_BIT:
        raise ValueError(f"dtype must be torch.uint8 or torch.int8, got {dtype!r}")
    if not isinstance(axis, int) or not -acc.dim() <= axis < acc.dim():
        raise ValueError(f"axis must be a dimension of acc (shape {tuple(acc.shape)}), got {axis!r}")
    axis %= acc.dim()
    qmin, qmax = dtype_range(dtype)
    channels, device = acc.size(axis), acc.device
    s_b = per_tensor_scale(x_scale, device, name="x_scale") * _weight_scale(w_scale, channels, device)
    mult = s_b / per_tensor_scale(y_scale, device, name="y_scale")  # fl32(fl32(s_x * s_w) / s_y)
    z_y = per_tensor_zero_point(y_zero_point, qmin, qmax, device, name="y_zero_point")
    a = acc.to(torch.int64)
    if bias is not None:
        if not isinstance(bias, Tensor) or bias.shape != (channels,):
            raise ValueError(f"bias must be None or a 1-D float tensor with one entry per output channel ({channels}), "
                             f"got {type(bias).__name__} {tuple(getattr(bias, 'shape', ()))}")
        a = a + _along(bias_int32(bias.to(device), x_scale, w_scale)[0].to(torch.int64), axis, acc.dim())
    a = (a - INT32_MIN).remainder(2**32) + INT32_MIN  # int32 addition wraps
    v = a.to(torch.float32) * _along(mult, axis, acc.dim())
    low = z_y.to(torch.float32) if relu else torch.tensor(float(qmin), device=device)
    y = torch.clamp(torch.round(v) + z_y.to(torch.float32), min=low, max=float(qmax))  # float clamp: saturates
    return y.to(dtype)


def quantize_linear(x: Tensor, scale, zero_point, dtype: torch.dtype = torch.uint8) -> Tensor:
    r"""ONNX ``QuantizeLinear`` as ORT computes it: ``clamp(rint(fl32(x / s)) + z, qmin, qmax)``; NaN -> qmin.

    >>> quantize_linear(torch.tensor([0.25, 0.75, -9.0, float("nan")]), 0.5, 3)   # 0.5 -> 0, 1.5 -> 2
    tensor([3, 5, 0, 0], dtype=torch.uint8)
    """
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise ValueError(f"x must be a float tensor, got {type(x).__name__} {getattr(x, 'dtype', '')}")
    if dtype not in EIGHT_BIT:
        raise ValueError(f"dtype must be torch.uint8 or torch.int8, got {dtype!r}")
    qmin, qmax = dtype_range(dtype)
    s = per_tensor_scale(scale, x.device)
    z = per_tensor_zero_point(zero_point, qmin, qmax, x.device).to(torch.float32)
    v = torch.round(x.to(torch.float32) / s)  # a true float32 division, then ties to even
    v = torch.where(torch.isnan(v), float(qmin), v + z)  # MINPS/MAXPS turn NaN into the lower bound
    return v.clamp(qmin, qmax).to(dtype)


def qlinear_add(a_int: Tensor, a_scale, a_zero_point, b_int: Tensor, b_scale, b_zero_point, y_scale, y_zero_point,
                *, relu: bool = False) -> Tensor:
    r"""ORT's ``QLinearAdd`` of two same-shape uint8 / int8 tensors (x86 AVX2 kernel), bit for bit.

    .. code-block:: text

        r_a = fl32(s_a / s_y);  r_b = fl32(s_b / s_y)
        fixed = fl32(z_y - fma32(r_a, z_a, fl32(r_b * z_b)))
        y_int = saturate(rint(fma32(a, r_a, fma32(b, r_b, fixed))))      relu: max(y_int, z_y)

    >>> a = torch.tensor([10, 20, 30], dtype=torch.uint8)
    >>> qlinear_add(a, 0.5, 10, a, 0.25, 0, 1.0, 5)     # 2.5 + 5 = 7.5 -> 8, 15, 17.5 + 5 = 22.5 -> 22
    tensor([ 8, 15, 22], dtype=torch.uint8)
    """
    for name, t in (("a_int", a_int), ("b_int", b_int)):
        if not isinstance(t, Tensor) or t.dtype not in EIGHT_BIT:
            raise ValueError(f"{name} must be a torch.uint8 or torch.int8 tensor, got {type(t).__name__} "
                             f"{getattr(t, 'dtype', '')}")
    if a_int.dtype != b_int.dtype or a_int.shape != b_int.shape:
        raise ValueError(f"a_int and b_int must have the same dtype and shape (ORT's broadcasting kernels round "
                         f"differently), got {a_int.dtype} {tuple(a_int.shape)} and {b_int.dtype} {tuple(b_int.shape)}")
    qmin, qmax = dtype_range(a_int.dtype)
    device = a_int.device

    def qparams(scale, zero_point, prefix):
        return (per_tensor_scale(scale, device, name=f"{prefix}_scale"),
                per_tensor_zero_point(zero_point, qmin, qmax, device, name=f"{prefix}_zero_point").to(torch.float32))

    (s_a, z_a), (s_b, z_b), (s_y, z_y) = qparams(a_scale, a_zero_point, "a"), qparams(b_scale, b_zero_point, "b"), \
        qparams(y_scale, y_zero_point, "y")
    r_a, r_b = s_a / s_y, s_b / s_y  # float32 divisions
    fixed = z_y - fma32(r_a, z_a, r_b * z_b)
    a, b = a_int.to(torch.float32), b_int.to(torch.float32)
    t = fma32(a, r_a.expand_as(a), fma32(b, r_b.expand_as(b), fixed.expand_as(b)))
    y = torch.where(t.abs() < 2.0**31, torch.round(t), float(qmin))  # cvtps2dq: "integer indefinite" saturates low
    y = y.clamp(qmin, qmax)
    if relu:
        y = torch.maximum(y, z_y)
    return y.to(a_int.dtype)
