"""Fused QAT modules: conv/linear + ReLU, and conv/linear + BatchNorm (+ ReLU) with BN folding."""
from .conv_bn import (
    ConvBn1d,
    ConvBn2d,
    ConvBn3d,
    ConvBnReLU1d,
    ConvBnReLU2d,
    ConvBnReLU3d,
    freeze_bn_stats,
    update_bn_stats,
)
from .conv_relu import ConvReLU1d, ConvReLU2d, ConvReLU3d
from .linear_bn import LinearBn1d
from .linear_relu import LinearReLU

__all__ = [
    "ConvBn1d", "ConvBn2d", "ConvBn3d", "ConvBnReLU1d", "ConvBnReLU2d", "ConvBnReLU3d",
    "ConvReLU1d", "ConvReLU2d", "ConvReLU3d", "LinearBn1d", "LinearReLU",
    "freeze_bn_stats", "update_bn_stats",
]
