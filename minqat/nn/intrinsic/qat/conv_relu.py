"""Fused QAT conv + ReLU: ``y = relu(conv(x, weight_fake_quant(W)) + b)``.

The ReLU sits before the output fake quant (attached by ``prepare_qat``), so the observer sees
only non-negative values and the int8 kernel can clamp at the output zero point. Mirrors
``torch.ao.nn.intrinsic.qat.ConvReLU1d/2d/3d``.
"""
from __future__ import annotations

from torch import nn

from ... import qat
from .. import fused

__all__ = ["ConvReLU1d", "ConvReLU2d", "ConvReLU3d"]


class ConvReLU1d(qat.Conv1d):
    _FLOAT_MODULE = fused.ConvReLU1d
    _FLOAT_RELU_MODULE = nn.ReLU


class ConvReLU2d(qat.Conv2d):
    _FLOAT_MODULE = fused.ConvReLU2d
    _FLOAT_RELU_MODULE = nn.ReLU


class ConvReLU3d(qat.Conv3d):
    _FLOAT_MODULE = fused.ConvReLU3d
    _FLOAT_RELU_MODULE = nn.ReLU
