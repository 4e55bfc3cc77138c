"""int8 modules of a converted model (torch.ao.nn.quantized / .intrinsic.quantized twins), on plain
integer tensors and ``minqat.QTensor`` activations.


"""
from .conv import Conv1d, Conv2d, Conv3d, ConvReLU1d, ConvReLU2d, ConvReLU3d
from .functional import QFunctional
from .linear import Linear, LinearReLU
from .stubs import DeQuantize, Quantize

__all__ = [
    "Quantize", "DeQuantize",
    "Conv1d", "Conv2d", "Conv3d", "ConvReLU1d", "ConvReLU2d", "ConvReLU3d",
    "Linear", "LinearReLU", "QFunctional",
]
