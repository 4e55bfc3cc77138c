"""Fused float containers (``minqat.nn.intrinsic.ConvBnReLU2d`` ...), as ``torch.ao.nn.intrinsic``."""
from .fused import *  # noqa: F401,F403
from .fused import __all__  # noqa: F401
