"""Pure quantization math with autograd, on plain tensors: fake quant with the straight-through
estimator, learnable fake quant (LSQ), and real quantize/dequantize to integer tensors."""
from .fake_quantize import fake_quantize_per_channel_affine, fake_quantize_per_tensor_affine
from .learnable import fake_quantize_learnable_per_channel_affine, fake_quantize_learnable_per_tensor_affine
from .quantize import dequantize, quantize_per_channel, quantize_per_tensor

__all__ = [
    "fake_quantize_per_tensor_affine",
    "fake_quantize_per_channel_affine",
    "fake_quantize_learnable_per_tensor_affine",
    "fake_quantize_learnable_per_channel_affine",
    "quantize_per_tensor",
    "quantize_per_channel",
    "dequantize",
]
