r"""Integer reference convolutions: exact int32 accumulation, then requantization.

What torch's ``quantized::conv1d/conv2d/conv3d`` (and ``conv2d_relu``) compute under the ``fbgemm``
engine (numerics.md §7.1), on plain integer tensors::

    acc[n, c, o] = sum_{j, t} (x_int[n, j, o*stride + t*dilation - padding] - z_x) * (w_int[c, j, t] - z_w[c])
    y_int        = requantize(acc, s_x, s_w, s_y, z_y, bias)          (minqat.kernels.requantize)

with ``j`` over the input channels of ``c``'s group and ``t`` over the kernel taps. Padding is filled
with the input zero point ``z_x``, so a padded tap contributes exactly 0: that is why the input is
*centred first* (``x_int - z_x``) and then padded with zeros.

Exactness. Three paths compute the same integers:

* **float64** (any groups, any device; the fallback): ``F.conv2d`` on the centred integers in float64.
  Every product is an integer of magnitude at most ``255 * 255 < 2**16`` and a sum of ``K`` of them
  stays below ``K * 2**16``; float64 holds every integer below ``2**53`` exactly, so all partial sums
  are exact, *in any summation order*, for ``K < 2**37`` -- far beyond any layer. No rounding happens.
* **int8 GEMM** (CPU, 2-d, ``groups == 1``): channels-last im2col and ``torch._int_mm`` (int8 x int8
  -> int32, exact). ``_int_mm`` needs int8 operands, so uint8 activations are shifted by 128 and the
  zero points are folded in with exact int32 row/column sums::

      sum_k (x'[k] + d) (w[c,k] - z_w[c]) = sum_k x'[k] w[c,k] - z_w[c] sum_k x'[k]
                                           + d sum_k w[c,k] - d K z_w[c],     x' = x - 128, d = 128 - z_x

  im2col turns the conv into the GEMM of ``minqat.kernels.linear``; like torch's quantized conv, the
  result has channels-last strides. A **grouped** conv (``C_in / groups > 1``) runs as the ``groups=1``
  conv whose weight is block diagonal (:func:`block_diagonal`: ``w - z_w = 0`` off the blocks, so the
  other groups add exactly 0) where the extra multiply-adds pay (:func:`block_diagonal_pays`).
* **depthwise taps** (CPU, 2-d, ``C_in / groups == 1``, any channel multiplier): ``kh * kw`` int32
  multiply-adds, each of a weight tap with the channels-last window it meets
  (:func:`depthwise_acc_int32`): integer arithmetic, exact.

A 1-d conv runs as a 2-d conv over a unit height, so it takes the same paths. fbgemm keeps ``acc`` in
int32 and wraps around on overflow (it needs ``K`` in the tens of thousands at worst-case values); the
integer paths add in int32 too, and additions modulo ``2**32`` give the same bits in any order, which
is what the float64 path's final wrap gives: every path wraps the same way.

>>> x = torch.tensor([[[[3, 5], [7, 9]]]], dtype=torch.uint8)      # (N=1, C=1, 2, 2), z_x = 3
>>> w = torch.tensor([[[[1]]], [[[-2]]]], dtype=torch.int8)         # (C_out=2, 1, 1, 1), z_w = 0
>>> conv2d_int(x, 3, w, 0, padding=1)[0, 0]                          # padding contributes 0
tensor([[0, 0, 0, 0],
        [0, 0, 2, 0],
        [0, 4, 6, 0],
        [0, 0, 0, 0]], dtype=torch.int32)
"""
from __future__ import annotations

import itertools
import numbers

import torch
import torch.nn.functional as F

from ..dtypes import dtype_range
from ..functional.qparams_args import per_tensor_zero_point
from .linear import (PackedWeight, gemm_acc_int8, int8_codes, int8_offset, int_mm_usable, pack_weight,
                     weight_zero_point, wrap_int32)
from .requantize import requantizer

__all__ = [
    "conv1d_int", "conv2d_int", "conv3d_int",
    "quantized_conv1d", "quantized_conv2d", "quantized_conv3d",
]

ACTIVATION_DTYPES = (torch.uint8, torch.int8)
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


# ----------------------------------------------------------------------------------------------
# argument checks
# ----------------------------------------------------------------------------------------------
def _check_int_tensor(t, name: str, allowed: tuple[torch.dtype, ...], ndim: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype not in allowed:
        names = " or ".join(str(d) for d in allowed)
        raise ValueError(f"{name} must be a {names} tensor, got {type(t).__name__} {getattr(t, 'dtype', '')}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-d {layout}, got shape {tuple(t.shape)}")


def _tuple(value, dims: int, name: str, minimum: int) -> tuple[int, ...]:
    items = (value,) * dims if isinstance(value, numbers.Integral) else value
    ok = isinstance(items, (tuple, list)) and len(items) == dims
    ok = ok and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= minimum for v in items)
    if not ok:
        raise ValueError(f"{name} must be an int >= {minimum} or a tuple of {dims} such ints, got {value!r}")
    return tuple(int(v) for v in items)


def _check_groups(groups, c_in: int, w: torch.Tensor) -> int:
    if not isinstance(groups, numbers.Integral) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    if w.size(0) % groups or w.size(1) * groups != c_in:
        raise ValueError(
            f"groups must divide the output channels and match the input channels: w_int of shape "
            f"{tuple(w.shape)} with groups={groups} needs x_int with {w.size(1) * groups} channels and "
            f"{w.size(0)} % groups == 0; x_int has {c_in} channels"
        )
    return int(groups)


def check_output_size(x: torch.Tensor, w: torch.Tensor, stride, padding, dilation) -> None:
    """``ValueError`` unless every dilated kernel extent fits the padded input (shapes only: cheap per call)."""
    for i, (s, p, d) in enumerate(zip(stride, padding, dilation)):
        span = d * (w.size(2 + i) - 1) + 1
        if x.size(2 + i) + 2 * p < span:
            raise ValueError(
                f"x_int is too small: spatial dim {i} has {x.size(2 + i)} + 2*padding {p} < dilated kernel {span}"
            )


# ----------------------------------------------------------------------------------------------
# exact accumulation
# ----------------------------------------------------------------------------------------------
def _conv_acc_float64(x, z_x, w, z_w, stride, padding, dilation, groups) -> torch.Tensor:
    """Exact accumulator via a float64 convolution of centred integers (see the module docstring)."""
    dims = w.dim() - 2
    x_c = x.to(torch.float64) - z_x  # centre first: padding with 0 == padding with z_x
    w_c = w.to(torch.float64) - z_w.reshape(-1, *([1] * (dims + 1)))  # (C_out, C_in/g, *k)
    acc = _CONV[dims](x_c, w_c, None, stride, padding, dilation, groups)  # every partial sum < 2**53
    return wrap_int32(acc.to(torch.int64))


def pack_conv_weight(w: torch.Tensor, z_w: torch.Tensor, transpose: bool) -> PackedWeight:
    """A ``groups=1`` 2-d conv weight ``(C_out, C, kh, kw)`` as the ``(C_out, K)`` GEMM matrix of
    :func:`conv2d_acc_int8`, K in ``(kh, kw, C)`` order (``minqat.kernels.linear.pack_weight``)."""
    w_mat = w.permute(0, 2, 3, 1).reshape(w.size(0), -1)  # (C_out, K), K = kh * kw * C
    return pack_weight(w_mat, z_w, transpose)


def conv2d_acc_int8(x: torch.Tensor, d: int, packed: PackedWeight, offset: torch.Tensor, kernel_size: tuple[int, int],
                    stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int]) -> torch.Tensor:
    """Exact accumulator of a ``groups=1`` 2-d conv: channels-last im2col + the int8 GEMM of linear.

    ``x (N, C, H, W)`` (channels-last strides read without a copy) is shifted to its int8 codes ``x'``
    first (``x - z_x = x' + d``, ``d = int8_offset(x.dtype, z_x)``, ``offset = packed.offset(d)``), then
    padded with ``-d`` (a padded tap contributes ``x' + d = 0``) and unfolded into the ``(M, K)`` im2col
    matrix. A 1x1 kernel without padding needs no im2col: its matrix is ``x'`` at the strided positions,
    a view for stride 1. Returns ``(N, C_out, Ho, Wo)`` with channels-last strides.
    """
    n = x.size(0)
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    x_nhwc = x.permute(0, 2, 3, 1)  # (N, H, W, C)
    if (kh, kw, ph, pw) == (1, 1, 0, 0):
        x_s = int8_codes(x_nhwc[:, ::sh, ::sw])  # (N, Ho, Wo, C): only the positions the kernel reads
        h_out, w_out = x_s.shape[1:3]
        cols = x_s.reshape(-1, x_s.size(3))  # (M, K = C)
    else:
        x_s = F.pad(int8_codes(x_nhwc), (0, 0, pw, pw, ph, ph), value=-d)  # (N, Hp, Wp, C), pad x' = -d
        cols = x_s.unfold(1, dh * (kh - 1) + 1, sh).unfold(2, dw * (kw - 1) + 1, sw)[..., ::dh, ::dw]
        h_out, w_out = cols.shape[1], cols.shape[2]  # cols: (N, Ho, Wo, C, kh, kw)
        cols = cols.permute(0, 1, 2, 4, 5, 3).reshape(n * h_out * w_out, -1)  # (M, K), K in (kh, kw, C) order
    acc = gemm_acc_int8(cols, packed, offset)  # (M, C_out), exact int32
    return acc.reshape(n, h_out, w_out, -1).permute(0, 3, 1, 2)  # (N, C_out, Ho, Wo)


def _conv2d_acc_int_mm(x, z_x, w, z_w, stride, padding, dilation) -> torch.Tensor:
    """:func:`conv2d_acc_int8` with the weight packed for this call (``W'`` copied row-major when ``M >= C_out``)."""
    h_out, w_out = (
        (x.size(2 + i) + 2 * padding[i] - dilation[i] * (w.size(2 + i) - 1) - 1) // stride[i] + 1 for i in range(2))
    packed = pack_conv_weight(w, z_w, transpose=x.size(0) * h_out * w_out >= w.size(0))  # the copy pays for M >= C
    d = int8_offset(x.dtype, z_x)
    return conv2d_acc_int8(x, int(d), packed, packed.offset(d), tuple(w.shape[2:]), stride, padding, dilation)


def depthwise_weight(w: torch.Tensor, z_w: torch.Tensor, channels: int) -> torch.Tensor:
    """A depthwise conv weight ``(C * m, 1, kh, kw)`` over ``channels = C`` inputs (channel multiplier ``m``),
    centred (``w - z_w``), as the ``(kh, kw, C, m)`` int32 taps of :func:`depthwise_acc_int32`."""
    kh, kw = w.shape[2:]
    w_c = w.to(torch.int32) - z_w.to(torch.int32).reshape(-1, 1, 1, 1)  # (C * m, 1, kh, kw)
    return w_c.reshape(channels, -1, kh, kw).permute(2, 3, 0, 1).contiguous()  # (kh, kw, C, m)


def depthwise_acc_int32(x: torch.Tensor, z_x, w_taps: torch.Tensor, stride: tuple[int, int],
                        padding: tuple[int, int], dilation: tuple[int, int]) -> torch.Tensor:
    r"""Exact accumulator of a depthwise 2-d conv (``C_in / groups == 1``; channel multiplier ``m``)::

        acc[n, i, j, c, k] = sum_{a, b} x_c[n, i*sh + a*dh, j*sw + b*dw, c] * w_c[a, b, c, k]

    with ``x_c = x - z_x`` zero-padded, channels last, and ``w_taps = w_c`` (:func:`depthwise_weight`): one
    int32 multiply-add per tap ``(a, b)`` over the ``(N, Ho, Wo, C)`` window that tap meets (a strided view,
    no im2col). Exact: the operands are integers, ``|x_c w_c| <= 255 * 255``, and int32 additions wrap
    modulo ``2**32`` like fbgemm's accumulator (none wraps below 33,000 taps). A few images at a time, so
    that the padded int32 copy of the input stays within 4 MiB and in cache (measured at batch 8: up to
    1.5x faster than the whole batch at once, 4.7x where the copy passes 32 MiB and pays fresh pages on
    every call). Returns ``(N, C * m, Ho, Wo)`` with channels-last strides.
    """
    n, c, h, w_in = x.shape
    kh, kw, _, m = w_taps.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    h_pad, w_pad = h + 2 * ph, w_in + 2 * pw
    h_out, w_out = (h_pad - dh * (kh - 1) - 1) // sh + 1, (w_pad - dw * (kw - 1) - 1) // sw + 1
    acc = torch.empty(n, h_out, w_out, c, m, dtype=torch.int32, device=x.device)
    step = max(1, 2**20 // (h_pad * w_pad * c))  # images per pass
    for i in range(0, n, step):
        x_c = torch.zeros(min(step, n - i), h_pad, w_pad, c, 1, dtype=torch.int32, device=x.device)  # padding: 0
        x_c[:, ph:ph + h, pw:pw + w_in, :, 0].copy_(x[i:i + step].permute(0, 2, 3, 1)).sub_(z_x)  # (n', Hp, Wp, C, 1)
        for t, (a, b) in enumerate(itertools.product(range(kh), range(kw))):
            window = x_c[:, a * dh:a * dh + sh * (h_out - 1) + 1:sh, b * dw:b * dw + sw * (w_out - 1) + 1:sw]
            if t == 0:  # (n', Ho, Wo, C, 1) * (C, m)
                torch.mul(window, w_taps[a, b], out=acc[i:i + step])
            else:
                acc[i:i + step].addcmul_(window, w_taps[a, b])
    return acc.reshape(n, h_out, w_out, c * m).permute(0, 3, 1, 2)


def block_diagonal(w: torch.Tensor, z_w: torch.Tensor, groups: int) -> torch.Tensor:
    """A grouped conv's weight ``(C_out, C_in / groups, kh, kw)`` as the ``groups=1`` weight ``(C_out, C_in, kh, kw)``
    of the same conv: group ``g``'s block on the diagonal, ``z_w[c]`` elsewhere, so ``w - z_w = 0`` and the
    other groups' input channels add exactly 0.

    >>> block_diagonal(torch.tensor([[[[1]]], [[[2]]]], dtype=torch.int8), torch.tensor([0, -3]), 2)[..., 0, 0]
    tensor([[ 1,  0],
            [-3,  2]], dtype=torch.int8)
    """
    c_out, c_group = w.shape[:2]
    z_w = z_w.to(torch.int8).expand(c_out).reshape(c_out, 1, 1, 1)
    dense = z_w.expand(c_out, c_group * groups, *w.shape[2:]).clone()  # (C_out, C_in, kh, kw)
    blocks = dense.view(groups, c_out // groups, groups, c_group, *w.shape[2:]).diagonal(dim1=0, dim2=2)
    blocks.copy_(w.reshape(groups, c_out // groups, c_group, *w.shape[2:]).movedim(0, -1))  # (C_out/g, C/g, kh, kw, g)
    return dense


def block_diagonal_pays(w: torch.Tensor, groups: int) -> bool:
    """Whether a grouped conv (``C_in / groups > 1``) runs faster as the block-diagonal int8 GEMM than as the
    float64 conv. The GEMM does ``groups`` times the multiply-adds, which its speed repays up to 8 groups, or
    while the dense int8 weight stays within 1 MiB: measured at batch 1 on 3x3 convs (ResNeXt's 32 groups
    at 128-256 channels, 2-64 groups at 64-256 channels), 1.4-5.7x faster than float64; at 32 groups of
    512-1024 channels it would be 1.3-3.2x slower."""
    return groups <= 8 or w.numel() * groups <= 2**20


def check_conv_arguments(x_int, x_zero_point, w_int, w_zero_point, stride, padding, dilation, groups, dims: int):
    """Validate a conv's arguments; returns ``(z_x, z_w, stride, padding, dilation, groups)`` normalised:
    0-d int64 ``z_x``, 0-d or ``(C_out,)`` int64 ``z_w``, tuples of ``dims`` ints and an int."""
    layout = {1: "(N, C, L)", 2: "(N, C, H, W)", 3: "(N, C, D, H, W)"}[dims]
    _check_int_tensor(x_int, "x_int", ACTIVATION_DTYPES, dims + 2, layout)
    _check_int_tensor(w_int, "w_int", (torch.int8,), dims + 2, "(C_out, C_in / groups, *kernel)")
    qmin, qmax = dtype_range(x_int.dtype)
    z_x = per_tensor_zero_point(x_zero_point, qmin, qmax, x_int.device, name="x_zero_point")
    z_w = weight_zero_point(w_zero_point, w_int.size(0), x_int.device)
    stride = _tuple(stride, dims, "stride", 1)
    padding = _tuple(padding, dims, "padding", 0)
    dilation = _tuple(dilation, dims, "dilation", 1)
    groups = _check_groups(groups, x_int.size(1), w_int)
    check_output_size(x_int, w_int, stride, padding, dilation)
    return z_x, z_w, stride, padding, dilation, groups


def _conv_int(x_int, x_zero_point, w_int, w_zero_point, stride, padding, dilation, groups, dims: int):
    """Validate, then accumulate exactly (shared by the 1-d, 2-d and 3-d entry points)."""
    z_x, z_w, stride, padding, dilation, groups = check_conv_arguments(
        x_int, x_zero_point, w_int, w_zero_point, stride, padding, dilation, groups, dims)
    if dims == 1:  # a 1-d conv is a 2-d conv over a unit height
        acc = _conv_int(x_int.unsqueeze(2), z_x, w_int.unsqueeze(2), z_w, (1,) + stride, (0,) + padding,
                        (1,) + dilation, groups, 2)
        return acc.squeeze(2)
    depthwise = groups > 1 and w_int.size(1) == 1  # C_in / groups == 1, any channel multiplier
    if dims == 2 and depthwise and x_int.device.type == "cpu" and x_int.numel() > 0:
        return depthwise_acc_int32(x_int, z_x, depthwise_weight(w_int, z_w, groups), stride, padding, dilation)
    if dims == 2 and int_mm_usable(x_int, w_int) and block_diagonal_pays(w_int, groups):
        w_dense = w_int if groups == 1 else block_diagonal(w_int, z_w, groups)
        return _conv2d_acc_int_mm(x_int, z_x, w_dense, z_w, stride, padding, dilation)
    return _conv_acc_float64(x_int, z_x, w_int, z_w, stride, padding, dilation, groups)


# ----------------------------------------------------------------------------------------------
# public entry points
# ----------------------------------------------------------------------------------------------
def conv2d_int(x_int: torch.Tensor, x_zero_point, w_int: torch.Tensor, w_zero_point,
               stride=1, padding=0, dilation=1, groups: int = 1) -> torch.Tensor:
    r"""Exact int32 accumulator of a 2-d convolution of zero-point-centred integers.

    .. code-block:: text

        acc[n, c, i, j] = sum_{ci, a, b} (x_pad[n, ci, i*sh + a*dh, j*sw + b*dw] - z_x) * (w[c, ci, a, b] - z_w[c])

    where ``x_pad`` is ``x_int`` padded with ``z_x`` and ``ci`` runs over ``c``'s group.

    Args:
        x_int: ``(N, C_in, H, W)`` uint8 (torch's quint8 activations) or int8 tensor.
        x_zero_point: int or one-element tensor in ``x_int``'s dtype range.
        w_int: ``(C_out, C_in / groups, kH, kW)`` int8 tensor.
        w_zero_point: int or 0-d tensor (per-tensor weights), or ``(C_out,)`` integer tensor
            (per-channel weights); values in [-128, 127] (asymmetric weights are exact too).
        stride, padding, dilation: int or pair, like ``torch.nn.functional.conv2d``.
        groups: divides ``C_out``; ``C_in == w_int.size(1) * groups`` (depthwise: ``groups == C_in``).

    Returns:
        ``(N, C_out, H_out, W_out)`` int32 accumulator (wrapping on int32 overflow like fbgemm).

    >>> x = torch.full((1, 1, 3, 3), 5, dtype=torch.uint8)
    >>> conv2d_int(x, 2, torch.ones(1, 1, 3, 3, dtype=torch.int8), 0, padding=1)[0, 0]
    tensor([[12, 18, 12],
            [18, 27, 18],
            [12, 18, 12]], dtype=torch.int32)
    """
    return _conv_int(x_int, x_zero_point, w_int, w_zero_point, stride, padding, dilation, groups, 2)


def conv1d_int(x_int: torch.Tensor, x_zero_point, w_int: torch.Tensor, w_zero_point,
               stride=1, padding=0, dilation=1, groups: int = 1) -> torch.Tensor:
    """:func:`conv2d_int` for ``(N, C_in, L)`` inputs and ``(C_out, C_in / groups, k)`` weights
    (computed as a 2-d conv over a unit height, as fbgemm does).

    >>> conv1d_int(torch.tensor([[[1, 2, 3]]], dtype=torch.uint8), 1, torch.tensor([[[1, 1]]], dtype=torch.int8), 0)
    tensor([[[1, 3]]], dtype=torch.int32)
    """
    return _conv_int(x_int, x_zero_point, w_int, w_zero_point, stride, padding, dilation, groups, 1)


def conv3d_int(x_int: torch.Tensor, x_zero_point, w_int: torch.Tensor, w_zero_point,
               stride=1, padding=0, dilation=1, groups: int = 1) -> torch.Tensor:
    """:func:`conv2d_int` for ``(N, C_in, D, H, W)`` inputs (float64 path).

    >>> conv3d_int(torch.full((1, 1, 2, 2, 2), 3, dtype=torch.uint8), 1, torch.ones(1, 1, 2, 2, 2, dtype=torch.int8), 0)
    tensor([[[[[16]]]]], dtype=torch.int32)
    """
    return _conv_int(x_int, x_zero_point, w_int, w_zero_point, stride, padding, dilation, groups, 3)


def _quantized_conv(conv_int, x_int, x_scale, x_zero_point, w_int, w_scale, w_zero_point, bias, y_scale,
                    y_zero_point, stride, padding, dilation, groups, relu, dtype, requantization):
    recipe = requantizer(requantization)
    acc = conv_int(x_int, x_zero_point, w_int, w_zero_point, stride, padding, dilation, groups)
    return recipe(acc, x_scale, w_scale, y_scale, y_zero_point, bias, axis=1, relu=relu, dtype=dtype)


def quantized_conv2d(x_int: torch.Tensor, x_scale, x_zero_point, w_int: torch.Tensor, w_scale, w_zero_point,
                     bias: torch.Tensor | None = None, *, y_scale, y_zero_point, stride=1, padding=0,
                     dilation=1, groups: int = 1, relu: bool = False, dtype: torch.dtype = torch.uint8,
                     requantization: str = "fbgemm") -> torch.Tensor:
    r"""A quantized 2-d convolution: ``torch.ops.quantized.conv2d`` (``conv2d_relu`` with
    ``relu=True``) under the fbgemm engine, bit for bit, on plain integer tensors.

    .. code-block:: text

        acc   = conv2d_int(x_int, z_x, w_int, z_w, stride, padding, dilation, groups)   exact int32
        y_int = requantize(acc, s_x, s_w, s_y, z_y, bias, relu)                          numerics.md §7.1

    Args:
        x_int, x_zero_point, w_int, w_zero_point, stride, padding, dilation, groups: as for
            :func:`conv2d_int`. ``x_scale``: input scale.
        w_scale: float / 0-d tensor for per-tensor weights, ``(C_out,)`` tensor for per-channel
            weights (this decides how fbgemm adds the bias, see ``requantize``).
        bias: ``None`` or float ``(C_out,)``, added in the real domain like torch (never int32).
        y_scale, y_zero_point: output qparams.
        relu: fused ReLU (clamp below at ``y_zero_point``).
        dtype: output dtype, ``torch.uint8`` (torch's quint8) or ``torch.int8``.
        requantization: ``"fbgemm"`` (default: torch's float32 recipe, bit-exact), ``"fixed_point"``
            (the integer-only recipe of Jacob et al. 2018 §2.2, ``requantize_integer_only``: within one
            unit of the real-valued result, not bit-exact with torch) or ``"onnxruntime"`` (ONNX Runtime's
            ``QLinearConv``: int32 bias, ``minqat.kernels.onnxruntime``).

    >>> x = torch.tensor([[[[4, 6]]]], dtype=torch.uint8)                 # (1, 1, 1, 2), z_x = 2
    >>> w = torch.tensor([[[[3]]]], dtype=torch.int8)                      # 1x1 kernel, z_w = 0
    >>> quantized_conv2d(x, 0.5, 2, w, 0.25, 0, y_scale=1.0, y_zero_point=10)   # 0.75 -> 1, 1.5 -> 2
    tensor([[[[11, 12]]]], dtype=torch.uint8)
    """
    return _quantized_conv(conv2d_int, x_int, x_scale, x_zero_point, w_int, w_scale, w_zero_point, bias,
                           y_scale, y_zero_point, stride, padding, dilation, groups, relu, dtype,
                           requantization)


def quantized_conv1d(x_int: torch.Tensor, x_scale, x_zero_point, w_int: torch.Tensor, w_scale, w_zero_point,
                     bias: torch.Tensor | None = None, *, y_scale, y_zero_point, stride=1, padding=0,
                     dilation=1, groups: int = 1, relu: bool = False, dtype: torch.dtype = torch.uint8,
                     requantization: str = "fbgemm") -> torch.Tensor:
    """:func:`quantized_conv2d` for 1-d inputs ``(N, C_in, L)`` (``torch.ops.quantized.conv1d``).

    >>> x = torch.tensor([[[4, 6]]], dtype=torch.uint8)
    >>> quantized_conv1d(x, 0.5, 2, torch.tensor([[[3]]], dtype=torch.int8), 0.25, 0, y_scale=1.0, y_zero_point=10)
    tensor([[[11, 12]]], dtype=torch.uint8)
    """
    return _quantized_conv(conv1d_int, x_int, x_scale, x_zero_point, w_int, w_scale, w_zero_point, bias,
                           y_scale, y_zero_point, stride, padding, dilation, groups, relu, dtype,
                           requantization)


def quantized_conv3d(x_int: torch.Tensor, x_scale, x_zero_point, w_int: torch.Tensor, w_scale, w_zero_point,
                     bias: torch.Tensor | None = None, *, y_scale, y_zero_point, stride=1, padding=0,
                     dilation=1, groups: int = 1, relu: bool = False, dtype: torch.dtype = torch.uint8,
                     requantization: str = "fbgemm") -> torch.Tensor:
    """:func:`quantized_conv2d` for 3-d inputs ``(N, C_in, D, H, W)`` (``torch.ops.quantized.conv3d``).

    >>> x = torch.tensor([[[[[4, 6]]]]], dtype=torch.uint8)
    >>> quantized_conv3d(x, 0.5, 2, torch.tensor([[[[[3]]]]], dtype=torch.int8), 0.25, 0, y_scale=1.0, y_zero_point=10)
    tensor([[[[[11, 12]]]]], dtype=torch.uint8)
    """
    return _quantized_conv(conv3d_int, x_int, x_scale, x_zero_point, w_int, w_scale, w_zero_point, bias,
                           y_scale, y_zero_point, stride, padding, dilation, groups, relu, dtype,
                           requantization)
