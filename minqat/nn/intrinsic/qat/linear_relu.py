"""Fused QAT linear + ReLU: ``y = relu(x @ weight_fake_quant(W).T + b)``. Mirrors
``torch.ao.nn.intrinsic.qat.LinearReLU``."""
from __future__ import annotations

from torch import nn

from ... import qat
from .. import fused

__all__ = ["LinearReLU"]


class LinearReLU(qat.Linear):
    _FLOAT_MODULE = fused.LinearReLU
    _FLOAT_RELU_MODULE = nn.ReLU
