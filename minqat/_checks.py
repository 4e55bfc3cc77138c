"""Validation of user arguments at the public boundary.

Every check raises ``ValueError`` naming the argument and the allowed values. Checks that must read a
tensor's *values* (is the scale positive? is the zero point inside the range?) run only for CPU
tensors: on an accelerator they would force a host synchronisation on every call, which minqat's
forwards never do. Shape and dtype checks read metadata only and run everywhere.
"""
from __future__ import annotations

import numbers

import torch

from .dtypes import INT32_MAX, INT32_MIN

__all__ = [
    "check_quant_range",
    "check_axis",
    "reads_values",
]


def reads_values(t: torch.Tensor) -> bool:
    """Whether a value check on ``t`` is free of host synchronisation (CPU tensors, not traced)."""
    return t.device.type == "cpu" and not torch.jit.is_tracing()


def _as_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
            return int(value)
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


def check_quant_range(quant_min, quant_max) -> tuple[int, int]:
    """Validate an integer range: ``quant_min < quant_max``, both inside int32. Returns Python ints.

    >>> check_quant_range(0, 255)
    (0, 255)
    >>> check_quant_range(3, 3)
    Traceback (most recent call last):
    ...
    ValueError: quant_min must be less than quant_max, got quant_min=3, quant_max=3
    """
    quant_min = _as_int(quant_min, "quant_min")
    quant_max = _as_int(quant_max, "quant_max")
    for name, v in (("quant_min", quant_min), ("quant_max", quant_max)):
        if not INT32_MIN <= v <= INT32_MAX:
            raise ValueError(f"{name} must lie in the int32 range [{INT32_MIN}, {INT32_MAX}], got {v}")
    if quant_min >= quant_max:
        raise ValueError(
            f"quant_min must be less than quant_max, got quant_min={quant_min}, quant_max={quant_max}"
        )
    return quant_min, quant_max


def check_axis(axis, ndim: int, name: str = "axis") -> int:
    """Validate a dimension index for a tensor of ``ndim`` dims; returns it non-negative.

    >>> check_axis(-1, 4)
    3
    """
    axis = _as_int(axis, name)
    if ndim == 0 or not -ndim <= axis < ndim:
        allowed = f"[{-ndim}, {ndim - 1}]" if ndim else "none (the input is 0-d)"
        raise ValueError(f"{name} must lie in {allowed} for a {ndim}-d input, got {axis}")
    return axis % ndim
