"""Integer dtypes and their ranges: the one source of truth for quantization bounds.

minqat stores quantized values in plain integer tensors (``torch.uint8``, ``torch.int8``,
``torch.int16``, ``torch.uint16``, ``torch.int32``). torch.ao's legacy quantized dtypes
(``torch.quint8``, ``torch.qint8``, ``torch.qint32``) are accepted wherever a dtype is an argument,
while torch still has them, and are translated to their plain twin here; they are looked up with
``getattr`` so minqat keeps working once torch removes them.

>>> dtype_range(torch.uint8)
(0, 255)
>>> dtype_range(torch.int8)
(-128, 127)
>>> plain_dtype(torch.int8)
torch.int8
"""
from __future__ import annotations

import torch

__all__ = ["plain_dtype", "dtype_range", "is_signed", "INT32_MIN", "INT32_MAX"]

INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1

_RANGES: dict[torch.dtype, tuple[int, int]] = {
    torch.uint8: (0, 255),
    torch.int8: (-128, 127),
    torch.int16: (-(2**15), 2**15 - 1),
    torch.uint16: (0, 2**16 - 1),
    torch.int32: (INT32_MIN, INT32_MAX),
}

# Legacy quantized dtype name -> plain dtype (only those this torch still has).
_LEGACY: dict[torch.dtype, torch.dtype] = {
    getattr(torch, name): plain
    for name, plain in (("quint8", torch.uint8), ("qint8", torch.int8), ("qint32", torch.int32))
    if hasattr(torch, name)
}


def plain_dtype(dtype: torch.dtype, name: str = "dtype") -> torch.dtype:
    """Return the plain integer dtype for ``dtype`` (legacy quantized dtypes are translated)."""
    dtype = _LEGACY.get(dtype, dtype)
    if dtype not in _RANGES:
        allowed = ", ".join(str(d) for d in list(_RANGES) + list(_LEGACY))
        raise ValueError(f"{name} must be one of {allowed}, got {dtype!r}")
    return dtype


def dtype_range(dtype: torch.dtype) -> tuple[int, int]:
    """``(min, max)`` of the integer values a (plain or legacy) quantized dtype can hold."""
    return _RANGES[plain_dtype(dtype)]


def is_signed(dtype: torch.dtype) -> bool:
    """True for int8/int16/int32 (and qint8/qint32)."""
    return dtype_range(dtype)[0] < 0
