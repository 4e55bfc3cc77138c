"""(min, max, range, scheme) -> (scale, zero_point): the one place the observers' qparams are chosen.

Two pure functions, bit-exact with torch.ao.quantization's ``calculate_qmin_qmax`` and
``UniformQuantizationObserverBase._calculate_qparams`` (numerics.md §3.1 and §3.3):

* :func:`calculate_qmin_qmax` turns ``dtype`` / ``reduce_range`` / an optional custom range into the
  integer range ``[quant_min, quant_max]`` the observer quantizes to;
* :func:`calculate_qparams` turns observed ``min_val`` / ``max_val`` (0-d for per-tensor, 1-d for
  per-channel) into ``scale`` and ``zero_point``, one small function per scheme.

Everything is float32 tensor math written with the same torch ops in the same order as torch.ao,
divisors written as Python floats like torch does (numerics.md §11: on CUDA ``t / python_float`` is a
multiplication by the reciprocal, so only the same ops give torch's CUDA numbers too). No value is ever
read back to the host.

>>> calculate_qmin_qmax(None, None, False, torch.uint8, reduce_range=False)
(0, 255)
>>> scale, zero_point = calculate_qparams(torch.tensor(-1.0), torch.tensor(3.0), 0, 255,
...                                      torch.per_tensor_affine, torch.uint8)
>>> scale, zero_point
(tensor([0.0157]), tensor([64], dtype=torch.int32))
"""
from __future__ import annotations

import torch

from ._checks import check_quant_range
from .dtypes import dtype_range, plain_dtype

__all__ = [
    "PER_TENSOR_QSCHEMES",
    "PER_CHANNEL_QSCHEMES",
    "SYMMETRIC_QSCHEMES",
    "FLOAT32_EPS",
    "check_qscheme",
    "calculate_qmin_qmax",
    "calculate_qparams",
]

PER_TENSOR_QSCHEMES = (torch.per_tensor_affine, torch.per_tensor_symmetric)
PER_CHANNEL_QSCHEMES = (
    torch.per_channel_affine,
    torch.per_channel_symmetric,
    torch.per_channel_affine_float_qparams,
)
SYMMETRIC_QSCHEMES = (torch.per_tensor_symmetric, torch.per_channel_symmetric)
FLOAT32_EPS = torch.finfo(torch.float32).eps  # 2**-23, torch.ao's default lower bound of a scale


def check_qscheme(qscheme, allowed=PER_TENSOR_QSCHEMES + PER_CHANNEL_QSCHEMES, name: str = "qscheme"):
    """Raise ``ValueError`` unless ``qscheme`` is one of ``allowed``; returns it."""
    if qscheme not in allowed:
        names = ", ".join(str(q) for q in allowed)
        raise ValueError(f"{name} must be one of {names}, got {qscheme!r}")
    return qscheme


# ---------------------------------------------------------------------------------------------------
# §3.1  the integer range
# ---------------------------------------------------------------------------------------------------


def calculate_qmin_qmax(
    quant_min: int | None,
    quant_max: int | None,
    has_customized_qrange: bool,
    dtype: torch.dtype,
    reduce_range: bool,
) -> tuple[int, int]:
    """The integer range ``[quant_min, quant_max]`` an observer quantizes to (numerics.md §3.1).

    Without a custom range it is the dtype's full range, except that ``reduce_range`` drops one bit
    of the 8-bit ones (uint8 -> [0, 127], int8 -> [-64, 63]; ignored for 16/32-bit dtypes). A custom
    range must contain 0, have ``quant_min < quant_max`` and no more levels than the dtype holds;
    ``reduce_range`` then halves it with floor division: [0, 255] -> [0, 127], [-8, 7] -> [-4, 3].

    Unlike torch.ao (which checks the level count for int8/int32 only and asserts), every violation
    is a ``ValueError``, and a reduced range that collapses ([0, 1] -> [0, 0]) is rejected.

    >>> calculate_qmin_qmax(None, None, False, torch.int8, reduce_range=True)
    (-64, 63)
    >>> calculate_qmin_qmax(-8, 7, True, torch.int8, reduce_range=True)
    (-4, 3)
    >>> calculate_qmin_qmax(1, 255, True, torch.uint8, reduce_range=False)
    Traceback (most recent call last):
    ...
    ValueError: a custom quantization range must contain 0 (quant_min <= 0 <= quant_max), got quant_min=1, quant_max=255
    """
    dtype = plain_dtype(dtype)
    if not has_customized_qrange:
        if dtype == torch.uint8 and reduce_range:
            return 0, 127
        if dtype == torch.int8 and reduce_range:
            return -64, 63
        return dtype_range(dtype)
    quant_min, quant_max = _check_custom_qrange(quant_min, quant_max, dtype)
    if reduce_range:
        reduced_min, reduced_max = quant_min // 2, quant_max // 2  # floor division, like torch
        if reduced_min >= reduced_max:
            raise ValueError(
                f"reduce_range halves the custom range [{quant_min}, {quant_max}] to "
                f"[{reduced_min}, {reduced_max}], which leaves a single level; widen the range or "
                "pass reduce_range=False"
            )
        return reduced_min, reduced_max
    return quant_min, quant_max


def _check_custom_qrange(quant_min, quant_max, dtype: torch.dtype) -> tuple[int, int]:
    quant_min, quant_max = check_quant_range(quant_min, quant_max)
    if not quant_min <= 0 <= quant_max:
        raise ValueError(
            "a custom quantization range must contain 0 (quant_min <= 0 <= quant_max), "
            f"got quant_min={quant_min}, quant_max={quant_max}"
        )
    lo, hi = dtype_range(dtype)
    if quant_max - quant_min > hi - lo:
        raise ValueError(
            f"the custom range [{quant_min}, {quant_max}] has {quant_max - quant_min + 1} levels, "
            f"more than {dtype} holds ({hi - lo + 1})"
        )
    return quant_min, quant_max


# ---------------------------------------------------------------------------------------------------
# §3.3  scale and zero point, one function per scheme
# ---------------------------------------------------------------------------------------------------


def calculate_qparams(
    min_val: torch.Tensor,
    max_val: torch.Tensor,
    quant_min: int,
    quant_max: int,
    qscheme: torch.qscheme,
    dtype: torch.dtype,
    eps: float | torch.Tensor = FLOAT32_EPS,
    has_customized_qrange: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero_point)`` for observed ``min_val`` / ``max_val`` (numerics.md §3.3 steps 2-6).

    ``quant_min`` / ``quant_max`` are the range *after* :func:`calculate_qmin_qmax`; ``eps`` is the
    smallest scale allowed (a Python float or the observer's ``eps`` buffer of shape [1]).
    With ``mn = min(min_val, 0)`` and ``mx = max(max_val, 0)``, all in float32:

    * symmetric: ``scale = max(max(-mn, mx) / ((quant_max - quant_min) / 2), eps)``; the zero point is
      0, except uint8: 128 (or ``(quant_min + quant_max) // 2`` with a custom range) and
      uint16: 2**15. int64.
    * affine: ``scale = max((mx - mn) / (quant_max - quant_min), eps)``,
      ``zero_point = clamp(quant_min - rint(mn / scale), quant_min, quant_max)``
      (rint: half to even). int32.
    * ``per_channel_affine_float_qparams`` (no zero inclusion):
      ``scale = (max_val - min_val) / (quant_max - quant_min)``, replaced by 1.0 where ``<= eps``;
      ``zero_point = -min_val / scale`` as a float.

    0-d results become shape [1]. NaN propagates, never raises. The "never observed" defaults
    (scale 1, zero point 0) are the observer's business, not this function's.

    >>> calculate_qparams(torch.tensor([0.0, -2.0]), torch.tensor([0.0, 1.0]), -128, 127,
    ...                   torch.per_channel_symmetric, torch.int8)
    (tensor([1.1921e-07, 1.5686e-02]), tensor([0, 0]))
    """
    check_qscheme(qscheme)
    dtype = plain_dtype(dtype)
    if min_val.shape != max_val.shape:
        raise ValueError(
            f"min_val and max_val must have the same shape, got {tuple(min_val.shape)} and {tuple(max_val.shape)}"
        )
    if not isinstance(eps, torch.Tensor):
        eps = torch.full((1,), float(eps), dtype=torch.float32, device=min_val.device)
    if qscheme == torch.per_channel_affine_float_qparams:
        scale, zero_point = _float_qparams(min_val, max_val, quant_min, quant_max, eps)
    else:
        # Step 2: the represented range always contains 0, so 0.0 is exactly representable.
        min_val_neg = torch.min(min_val, torch.zeros_like(min_val))
        max_val_pos = torch.max(max_val, torch.zeros_like(max_val))
        if qscheme in SYMMETRIC_QSCHEMES:
            zero_point_value = _symmetric_zero_point(quant_min, quant_max, dtype, has_customized_qrange)
            scale, zero_point = _symmetric_qparams(min_val_neg, max_val_pos, quant_min, quant_max, eps,
                                                   zero_point_value)
        else:
            scale, zero_point = _affine_qparams(min_val_neg, max_val_pos, quant_min, quant_max, eps)
    # Step 6: per-tensor results have shape [1], like FakeQuantize's buffers.
    if scale.dim() == 0:
        scale = scale.reshape(1)
    if zero_point.dim() == 0:
        zero_point = zero_point.reshape(1)
    return scale, zero_point


def _symmetric_zero_point(quant_min: int, quant_max: int, dtype: torch.dtype, has_customized_qrange: bool) -> int:
    """The fixed zero point of symmetric quantization: the middle of an unsigned range, else 0."""
    if dtype == torch.uint8:
        # torch.ao: 128 for the default range, the floor midpoint (127 for [0, 255]) for a custom one.
        return (quant_min + quant_max) // 2 if has_customized_qrange else 128
    if dtype == torch.uint16:
        return 2**15
    return 0


def _symmetric_qparams(min_val_neg, max_val_pos, quant_min, quant_max, eps, zero_point_value):
    """Step 3: ``scale = max(max(-mn, mx) / ((qmax - qmin) / 2), eps)``; constant int64 zero point."""
    max_abs = torch.max(-min_val_neg, max_val_pos)
    scale = max_abs / (float(quant_max - quant_min) / 2)  # a Python float divisor, like torch (§11)
    scale = torch.max(scale, eps)
    zero_point = torch.full(min_val_neg.size(), zero_point_value, dtype=torch.int64, device=min_val_neg.device)
    return scale, zero_point


def _affine_qparams(min_val_neg, max_val_pos, quant_min, quant_max, eps):
    """Step 4: ``scale = max((mx - mn) / (qmax - qmin), eps)``, ``zp = clamp(qmin - rint(mn / scale))``."""
    scale = (max_val_pos - min_val_neg) / float(quant_max - quant_min)  # true float32 division on CPU
    scale = torch.max(scale, eps)
    # mn / scale is a true division here (not a reciprocal multiply); torch.round is half-to-even.
    zero_point = quant_min - torch.round(min_val_neg / scale).to(torch.int)
    zero_point = torch.clamp(zero_point, quant_min, quant_max)  # int32
    return scale, zero_point


def _float_qparams(min_val, max_val, quant_min, quant_max, eps):
    """Step 5: raw min/max (no zero inclusion); scale 1.0 where it would be <= eps; float zero point."""
    if min_val.dim() == 0:
        raise ValueError(
            "qscheme torch.per_channel_affine_float_qparams needs 1-d (per-channel) min_val/max_val, "
            "got 0-d tensors"
        )
    scale = (max_val - min_val) / float(quant_max - quant_min)
    scale = torch.where(scale > eps, scale, torch.ones_like(scale))
    # x_q = rint(x / scale + zero_point) with zero_point = -min / scale maps min_val to 0.
    zero_point = -1 * min_val / scale
    return scale, zero_point
