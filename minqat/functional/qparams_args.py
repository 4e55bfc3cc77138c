"""Turn user-given ``scale`` / ``zero_point`` (Python numbers or tensors) into canonical tensors.

The fake-quant and quantize functions accept qparams the way torch does: Python numbers, or tensors
of any float dtype for the scale and any integer (or float) dtype for the zero point. This module
validates them once, at the public boundary, and hands the math plain tensors on the input's device:

* ``scale`` becomes float32 (torch's kernels narrow a double scale to float32, numerics.md §1, §2),
* an integer ``zero_point`` becomes int64; a float zero point tensor is truncated toward zero for
  per-tensor fake quant, exactly as torch's tensor-qparams overload does (numerics.md §2.1).

Checks that read values (scale positive and finite, zero point inside ``[quant_min, quant_max]``)
run only on CPU tensors (see ``minqat._checks``), so an accelerator forward never synchronises.
"""
from __future__ import annotations

import math
import numbers

import torch

from .._checks import reads_values

__all__ = ["per_tensor_scale", "per_tensor_zero_point", "per_channel_scale", "per_channel_zero_point"]

def _check_scale_values(scale32: torch.Tensor, name: str, given) -> None:
    if reads_values(scale32) and not bool(((scale32 > 0) & torch.isfinite(scale32)).all()):
        raise ValueError(f"{name} must be positive and finite (as float32), got {given!r}")


def per_tensor_scale(scale, device: torch.device, name: str = "scale") -> torch.Tensor:
    """A 0-d float32 scale on ``device``."""
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise ValueError(f"{name} must hold exactly one element for per-tensor quantization, got shape {tuple(scale.shape)}")
        if not scale.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {scale.dtype}")
        scale32 = scale.detach().reshape(()).to(device=device, dtype=torch.float32)
    elif isinstance(scale, numbers.Real) and not isinstance(scale, bool):
        scale32 = torch.tensor(float(scale), dtype=torch.float32)  # narrowed like torch's kernels
        if not (math.isfinite(float(scale32)) and float(scale32) > 0):
            raise ValueError(f"{name} must be positive and finite (as float32), got {scale!r}")
        return scale32.to(device)
    else:
        raise ValueError(f"{name} must be a positive float or a one-element float tensor, got {scale!r}")
    _check_scale_values(scale32, name, scale)
    return scale32


def _check_zero_point_values(zp: torch.Tensor, quant_min: int, quant_max: int, name: str, given) -> None:
    if reads_values(zp) and not bool(((zp >= quant_min) & (zp <= quant_max)).all()):
        raise ValueError(f"{name} must lie in [quant_min, quant_max] = [{quant_min}, {quant_max}], got {given!r}")


def per_tensor_zero_point(zero_point, quant_min: int, quant_max: int, device: torch.device,
                          name: str = "zero_point") -> torch.Tensor:
    """A 0-d int64 zero point on ``device`` (a float tensor is truncated toward zero, like torch)."""
    if isinstance(zero_point, torch.Tensor):
        if zero_point.numel() != 1:
            raise ValueError(f"{name} must hold exactly one element for per-tensor quantization, got shape {tuple(zero_point.shape)}")
        zp = zero_point.detach().reshape(()).to(device)
        if zp.is_floating_point():
            zp = torch.trunc(zp)  # torch's tensor-qparams overload truncates (numerics.md §2.1)
        elif zp.dtype == torch.bool or zp.is_complex():
            raise ValueError(f"{name} must be an integer or float tensor, got dtype {zp.dtype}")
        zp = zp.to(torch.int64)
    elif isinstance(zero_point, numbers.Integral) and not isinstance(zero_point, bool):
        zp = torch.tensor(int(zero_point), dtype=torch.int64, device=device)
    else:
        raise ValueError(f"{name} must be an integer or a one-element tensor, got {zero_point!r}")
    _check_zero_point_values(zp, quant_min, quant_max, name, zero_point)
    return zp


def per_channel_scale(scale, channels: int, device: torch.device, name: str = "scale") -> torch.Tensor:
    """A 1-D float32 tensor of ``channels`` scales on ``device``."""
    if not isinstance(scale, torch.Tensor):
        scale = torch.as_tensor(scale)
    if scale.dim() != 1 or scale.numel() != channels:
        raise ValueError(f"{name} must be a 1-D tensor with one entry per channel ({channels}), got shape {tuple(scale.shape)}")
    if not scale.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {scale.dtype}")
    scale32 = scale.detach().to(device=device, dtype=torch.float32)
    _check_scale_values(scale32, name, scale)
    return scale32


def per_channel_zero_point(zero_point, channels: int, quant_min: int, quant_max: int,
                           device: torch.device, name: str = "zero_point") -> torch.Tensor:
    """A 1-D zero-point tensor on ``device``: int64 for integer input, float32 for float input."""
    if not isinstance(zero_point, torch.Tensor):
        zero_point = torch.as_tensor(zero_point)
    if zero_point.dim() != 1 or zero_point.numel() != channels:
        raise ValueError(f"{name} must be a 1-D tensor with one entry per channel ({channels}), got shape {tuple(zero_point.shape)}")
    if zero_point.dtype == torch.bool or zero_point.is_complex():
        raise ValueError(f"{name} must be an integer or float tensor, got dtype {zero_point.dtype}")
    target = torch.float32 if zero_point.is_floating_point() else torch.int64
    zp = zero_point.detach().to(device=device, dtype=target)
    _check_zero_point_values(zp, quant_min, quant_max, name, zero_point)
    return zp
