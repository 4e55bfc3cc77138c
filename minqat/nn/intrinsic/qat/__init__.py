"""Fused QAT modules: conv/linear + ReLU, and conv/linear + BatchNorm (+ ReLU) with BN folding."""
from .conv_relu import ConvReLU1d, ConvReLU2d, ConvReLU3d
from .linear_relu import LinearReLU

__all__ = ["ConvReLU1d", "ConvReLU2d", "ConvReLU3d", "LinearReLU"]
