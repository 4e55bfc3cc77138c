"""float32 arithmetic that torch's kernels do and plain torch ops don't: the fused multiply-add.

Several of torch's quantization kernels compute ``a * b + c`` with one FMA instruction, i.e. with a
*single* rounding to float32 (numerics.md §0, §1.1, §2.4, §2.5, §7.1). Plain torch float32 ops round
twice (after the product and after the sum), which moves values that sit near a rounding tie. This
module emulates the single rounding exactly with float64 tensor ops, on any device:

1. ``p = a * b`` in float64 is exact: two 24-bit significands give at most 48 bits.
2. ``s = p + c`` in float64 rounds; TwoSum (Knuth, TAOCP vol. 2 §4.2.2) recovers the exact error
   ``e`` with ``p + c = s + e``.
3. Rounding ``s`` to float32 is a *double rounding* that can go wrong only when ``s`` lands exactly
   on a float32 tie. "Round to odd" (Boldo & Melquiond 2008) removes that: when ``e != 0`` and the
   last bit of ``s`` is even, step ``s`` one float64 ulp towards the exact value. A float64 value
   rounded to odd has 53 >= 24 + 2 bits, so its rounding to float32 equals the correctly rounded
   ``fl32(a*b + c)``.

>>> a, b, c = torch.tensor([1 + 2**-23]), torch.tensor([1 - 2**-23]), torch.tensor([-1.0])
>>> fma32(a, b, c).item() == -(2**-46)        # the two-rounding result would be 0.0
True
"""
from __future__ import annotations

import torch

__all__ = ["fma32"]


def fma32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``fl32(a * b + c)`` with a single rounding, for float32 ``a``, ``b``, ``c`` (broadcast)."""
    a64, b64, c64 = a.double(), b.double(), c.double()
    p = a64 * b64  # exact
    s = p + c64
    # TwoSum: the exact rounding error of s = p + c.
    b_virtual = s - p
    a_virtual = s - b_virtual
    err = (p - a_virtual) + (c64 - b_virtual)
    # Round to odd: an inexact sum with an even last bit moves one ulp towards the exact value.
    bits = s.view(torch.int64)
    inexact_even = (err != 0) & ((bits & 1) == 0) & torch.isfinite(s)
    towards_larger_magnitude = (err > 0) == (s > 0)
    step = torch.where(towards_larger_magnitude, 1, -1)
    bits = torch.where(inexact_even, bits + step, bits)
    return bits.view(torch.float64).float()
