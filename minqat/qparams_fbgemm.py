"""fbgemm's ``ChooseQuantizationParams``: the qparams of torch's *fused* observer + fake quant.

``torch.fused_moving_avg_obs_fake_quant`` (behind ``FusedMovingAvgObsFakeQuantize``, the module of
torch's default QAT qconfig) does not use the Python observer formula of ``minqat/qparams.py``. On
CPU it calls fbgemm's ``ChooseQuantizationParams`` on every forward. This file reproduces that
function with tensor ops, element-wise over channels (numerics.md §4.2, measured bit-exact on
torch 2.13 CPU). With ``qrange = quant_max - quant_min``:

1. Symmetric widening, only when ``preserve_sparsity and min < 0 < max``::

       sq_min = -(qrange // 2 + 1),  sq_max = qrange // 2             # -128, 127 for 8 bits
       m      = max(|fl32(min / sq_min)|, |fl32(max / sq_max)|)         # float32 divisions
       min, max = fl32(m * sq_min), fl32(m * sq_max)

2. Include zero: ``min = min(min, 0)``, ``max = max(max, 0)``.
3. ``scale = fl32((double(max) - double(min)) / qrange)``; a zero scale, or one whose float32
   reciprocal is infinite, becomes ``fl32(0.1)``.
4. Small-scale cut-off at ``t = fl32(6.1e-5)`` (the smallest normal float16): if ``scale < t`` then
   ``scale = t`` and the range is stretched to match: ``max = fl32(t * qrange)`` if ``min == 0``,
   else ``min = -fl32(t * qrange)`` if ``max == 0``, else both times ``fl32(t / old_scale)``.
5. Zero point, in float64 with the float32 scale::

       z_min = quant_min - min / scale,  error_min = |quant_min| + |min / scale|
       z_max = quant_max - max / scale,  error_max = |quant_max| + |max / scale|
       z     = z_min if error_min < error_max else z_max
       z     = (quant_min + quant_max) / 2        if preserve_sparsity and min < 0 < max
       zero_point = quant_min if z < quant_min, quant_max if z > quant_max, else rint(z)  (ties even)

How this differs from ``minqat.qparams.calculate_qparams`` (the Python observers' formula, §3.3),
for the same running min/max:

* Symmetric scale: fbgemm takes ``max(|min| / 128, max / 127)``; the Python formula takes
  ``max(|min|, max) / 127.5``. They differ on essentially every range.
* One-signed ranges in symmetric mode: step 1 needs ``min < 0 < max``, so an all-positive or
  all-negative range is quantized *affinely* with a non-zero zero point (a constant -3 channel gives
  scale 3/255 and zero point ``quant_max``); the Python formula keeps the zero point fixed (0 or 128).
* Tiny ranges: fbgemm's floor is 6.1e-5 (step 4); the Python floor is ``eps`` (2^-23 by default).
  An all-zero range gives scale 0.1 here and ``eps`` there.
* Affine ranges: the scales differ by one float32 ulp on ~11 % of random ranges (fbgemm subtracts
  ``max - min`` exactly in float64 and rounds once; the Python formula rounds the float32
  difference, then divides); the zero points rarely (1e-5 in our measurement: the choice between
  ``z_min`` and ``z_max`` in float64 vs ``quant_min - rint(min / scale)`` in float32).

No host synchronisation: every branch is a ``torch.where``. One deliberate deviation: for the full
int32 range ``[-2**31, 2**31 - 1]`` torch's C++ ``quant_max - quant_min`` overflows (giving garbage
qparams); minqat computes the intended values there.

>>> scale, zero_point = choose_qparams_fbgemm(torch.tensor([-1.0]), torch.tensor([3.0]), 0, 255, False)
>>> scale.item() == torch.tensor(4.0 / 255).item(), zero_point.tolist()
(True, [64])
>>> choose_qparams_fbgemm(torch.tensor(-3.0), torch.tensor(-3.0), -128, 127, True)[1]  # one-signed
tensor(127, dtype=torch.int32)
"""
from __future__ import annotations

import torch

from ._checks import check_quant_range

__all__ = ["choose_qparams_fbgemm", "SMALL_SCALE_THRESHOLD"]

SMALL_SCALE_THRESHOLD = 6.1e-5
"""fbgemm's smallest scale (the smallest normal float16); compared and stored as float32."""


def _const(value: float, like: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A 0-d tensor operand: ``tensor / tensor`` divides truly on every device, whereas CUDA turns
    ``tensor / python_number`` into a multiplication by the reciprocal (numerics.md §11). Made by
    ``torch.full`` (a fill on the device): ``torch.tensor(value, device=...)`` would copy from the host."""
    return torch.full((), value, dtype=dtype, device=like.device)


def _symmetric_range(mn, mx, quant_min: int, quant_max: int):
    """Step 1: widen ``[mn, mx]`` to the signed grid ``[sq_min, sq_max] * m`` (float32)."""
    sq_min = _const(-((quant_max - quant_min) // 2 + 1), mn)
    sq_max = _const((quant_max - quant_min) // 2, mn)
    m = torch.maximum((mn / sq_min).abs(), (mx / sq_max).abs())
    return m * sq_min, m * sq_max


def _scale(mn, mx, quant_min: int, quant_max: int):
    """Steps 3-4: float32 scale from the double range, with the 0.1 guard and the 6.1e-5 cut-off."""
    qrange = quant_max - quant_min
    scale = ((mx.double() - mn.double()) / _const(qrange, mn, torch.float64)).float()
    bad = (scale == 0) | torch.isinf(torch.reciprocal(scale))
    scale = torch.where(bad, torch.full_like(scale, 0.1), scale)
    small = scale < SMALL_SCALE_THRESHOLD
    threshold = torch.full_like(scale, SMALL_SCALE_THRESHOLD)
    amplifier = threshold / scale
    stretched = threshold * float(qrange)
    mn_small = torch.where(mn == 0, mn, torch.where(mx == 0, -stretched, mn * amplifier))
    mx_small = torch.where(mn == 0, stretched, torch.where(mx == 0, mx, mx * amplifier))
    mn = torch.where(small, mn_small, mn)
    mx = torch.where(small, mx_small, mx)
    return torch.where(small, threshold, scale), mn, mx


def _zero_point(mn, mx, scale, quant_min: int, quant_max: int, symmetric):
    """Step 5: the zero point from the end with the smaller rounding error (float64)."""
    mn_q = mn.double() / scale.double()
    mx_q = mx.double() / scale.double()
    z_from_min = quant_min - mn_q
    z_from_max = quant_max - mx_q
    error_min = abs(quant_min) + mn_q.abs()
    error_max = abs(quant_max) + mx_q.abs()
    z = torch.where(error_min < error_max, z_from_min, z_from_max)
    z = torch.where(symmetric, torch.full_like(z, (quant_min + quant_max) / 2), z)
    z = torch.where(z < quant_min, quant_min, torch.where(z > quant_max, quant_max, torch.round(z)))
    return z.to(torch.int32)


def choose_qparams_fbgemm(
    min_val: torch.Tensor,
    max_val: torch.Tensor,
    quant_min: int,
    quant_max: int,
    preserve_sparsity: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """fbgemm's ``ChooseQuantizationParams`` element-wise: ``(scale float32, zero_point int32)``.

    ``min_val``/``max_val`` are float32 tensors of the same shape (0-d for per-tensor, ``[C]`` for
    per-channel); ``preserve_sparsity`` is True for the symmetric qschemes. The outputs have the
    shape of ``min_val``. The formula is in the module docstring (numerics.md §4.2).

    >>> s, z = choose_qparams_fbgemm(torch.tensor([0.0, -1e-3]), torch.tensor([0.0, 1e-3]), 0, 255, True)
    >>> s.tolist() == [torch.tensor(0.1).item(), torch.tensor(6.1e-5).item()], z.tolist()
    (True, [0, 128])
    """
    quant_min, quant_max = check_quant_range(quant_min, quant_max)
    if min_val.shape != max_val.shape:
        raise ValueError(
            f"min_val and max_val must have the same shape, got {tuple(min_val.shape)} and {tuple(max_val.shape)}"
        )
    mn, mx = min_val.float(), max_val.float()
    if preserve_sparsity:  # step 1, only for ranges that straddle zero
        straddles = (mn < 0) & (mx > 0)
        sym_mn, sym_mx = _symmetric_range(mn, mx, quant_min, quant_max)
        mn, mx = torch.where(straddles, sym_mn, mn), torch.where(straddles, sym_mx, mx)
    mn = torch.clamp_max(mn, 0.0)  # step 2: the range contains 0
    mx = torch.clamp_min(mx, 0.0)
    scale, mn, mx = _scale(mn, mx, quant_min, quant_max)
    symmetric = (mn < 0) & (mx > 0) if preserve_sparsity else torch.zeros_like(mn, dtype=torch.bool)
    zero_point = _zero_point(mn, mx, scale, quant_min, quant_max, symmetric)
    return scale, zero_point
