"""Integer reference kernels on plain tensors: exact int32 accumulation and requantization.

Two requantization recipes: ``requantize`` (fbgemm's float32 recipe, bit-exact with torch's
quantized CPU ops; the default) and ``requantize_fixed_point`` / ``requantize_integer_only``
(the integer-only fixed-point multiplier of Jacob et al. 2018 §2.2, as gemmlowp/TFLite do it), and
``requantize_onnxruntime`` (ONNX Runtime's QLinearConv / QGemm: int32 bias, float32 multiplier), with
ORT's ``QuantizeLinear`` and ``QLinearAdd`` in ``minqat.kernels.onnxruntime``.
"""
from .conv import conv1d_int, conv2d_int, conv3d_int, quantized_conv1d, quantized_conv2d, quantized_conv3d
from .elementwise import add, add_relu, add_scalar, cat, matmul, mul, mul_scalar
from .linear import linear_int, quantized_linear
from .pooling import adaptive_avg_pool2d, avg_pool2d, clamp, max_pool2d, mean, quantize_scalar, relu, relu6
from .onnxruntime import bias_int32, qlinear_add, quantize_linear, requantize_onnxruntime
from .requantize import (
    REQUANTIZATION_MODES,
    requantizer,
    quantize_bias,
    quantize_multiplier,
    requantize,
    requantize_fixed_point,
    requantize_integer_only,
)

__all__ = [
    "REQUANTIZATION_MODES", "requantizer", "requantize_onnxruntime", "bias_int32", "quantize_linear", "qlinear_add",
    "requantize", "requantize_fixed_point", "requantize_integer_only", "quantize_multiplier", "quantize_bias",
    "conv1d_int", "conv2d_int", "conv3d_int", "quantized_conv1d", "quantized_conv2d", "quantized_conv3d",
    "linear_int", "quantized_linear",
    "add", "add_relu", "add_scalar", "mul", "mul_scalar", "cat", "matmul",
    "relu", "relu6", "clamp", "quantize_scalar", "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "mean",
]
