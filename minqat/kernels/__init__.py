"""Integer reference kernels on plain tensors: exact int32 accumulation and requantization.

Two requantization recipes: ``requantize`` (fbgemm's float32 recipe, bit-exact with torch's
quantized CPU ops; the default) and ``requantize_fixed_point`` / ``requantize_integer_only``
(the integer-only fixed-point multiplier of Jacob et al. 2018 §2.2, as gemmlowp/TFLite do it).
"""
from .conv import conv1d_int, conv2d_int, conv3d_int, quantized_conv1d, quantized_conv2d, quantized_conv3d
from .linear import linear_int, quantized_linear
from .requantize import (
    quantize_bias,
    quantize_multiplier,
    requantize,
    requantize_fixed_point,
    requantize_integer_only,
)

__all__ = [
    "requantize", "requantize_fixed_point", "requantize_integer_only", "quantize_multiplier", "quantize_bias",
    "conv1d_int", "conv2d_int", "conv3d_int", "quantized_conv1d", "quantized_conv2d", "quantized_conv3d",
    "linear_int", "quantized_linear",
]
