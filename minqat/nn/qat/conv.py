"""QAT convolutions: ``nn.Conv1d/2d/3d`` whose weight passes through a fake quantizer.

Forward (Jacob et al. 2018 §3; the activation is fake-quantized by whoever produced ``x``, the
output by the ``activation_post_process`` hook that ``prepare_qat`` attaches)::

    W_hat = weight_fake_quant(W)          observer update + fake quant, straight-through backward
    y     = conv(x, W_hat) + b            the float bias is not quantized during training

The module is an ``nn.ConvNd`` (same parameters, same ``state_dict`` keys plus
``weight_fake_quant.*``), so an optimizer, a checkpoint or a torch.ao prepared model's state dict
carries over unchanged. Mirrors ``torch.ao.nn.qat.Conv2d``.

>>> from minqat.qconfig import get_default_qat_qconfig
>>> conv = Conv2d(1, 2, 3, qconfig=get_default_qat_qconfig("fbgemm"))
>>> conv(torch.randn(1, 1, 5, 5)).shape
torch.Size([1, 2, 3, 3])
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..intrinsic.fused import FusedModule

__all__ = ["Conv1d", "Conv2d", "Conv3d"]


def _require_qconfig(qconfig, owner: str):
    if not qconfig:
        raise ValueError(f"qconfig must be provided for the QAT module {owner}, got {qconfig!r}")
    return qconfig


class _QATConvMixin:
    """Weight fake quant, ``from_float`` and ``to_float`` shared by every QAT convolution."""

    _FLOAT_MODULE: ClassVar[type[nn.Module]]  # what from_float accepts
    _FLOAT_CONV_MODULE: ClassVar[type[nn.Module]]  # the plain float conv of the same dimension
    _FLOAT_RELU_MODULE: ClassVar[type[nn.Module] | None] = None  # set by the fused ConvReLU

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, padding_mode="zeros", qconfig=None, device=None, dtype=None):
        factory_kwargs = {"device": device, "dtype": dtype}
        self._FLOAT_CONV_MODULE.__init__(self, in_channels, out_channels, kernel_size, stride, padding,
                                         dilation, groups, bias, padding_mode, **factory_kwargs)
        self.qconfig = _require_qconfig(qconfig, type(self).__name__)
        self.weight_fake_quant = qconfig.weight(factory_kwargs=factory_kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._conv_forward(x, self.weight_fake_quant(self.weight), self.bias)
        return F.relu(y) if self._FLOAT_RELU_MODULE is not None else y

    @classmethod
    def _accepts(cls, mod: nn.Module) -> bool:
        if issubclass(cls._FLOAT_MODULE, FusedModule):
            return cls._FLOAT_MODULE.matches(mod)
        return type(mod) is cls._FLOAT_MODULE

    @classmethod
    def from_float(cls, mod: nn.Module, use_precomputed_fake_quant: bool = False):
        """The QAT twin of a float conv (or conv-relu container), sharing its Parameters."""
        if not cls._accepts(mod):
            raise ValueError(f"{cls.__name__}.from_float expects {cls._FLOAT_MODULE.__name__}, got {type(mod).__name__}")
        qconfig = _require_qconfig(getattr(mod, "qconfig", None), f"{cls.__name__} (from {type(mod).__name__}.qconfig)")
        conv = mod[0] if isinstance(mod, nn.Sequential) else mod
        qat = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                  padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                  bias=conv.bias is not None, padding_mode=conv.padding_mode, qconfig=qconfig)
        qat.weight = conv.weight  # shared, not copied: the optimizer keeps its parameters
        qat.bias = conv.bias
        return qat

    def to_float(self) -> nn.Module:
        """A plain float conv (or conv-relu container) with a detached copy of the weights."""
        conv = self._FLOAT_CONV_MODULE(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                                       self.padding, self.dilation, self.groups, self.bias is not None,
                                       self.padding_mode)
        conv.weight = nn.Parameter(self.weight.detach())
        if self.bias is not None:
            conv.bias = nn.Parameter(self.bias.detach())
        if self._FLOAT_RELU_MODULE is None:
            return conv
        fused = self._FLOAT_MODULE(conv, self._FLOAT_RELU_MODULE())
        fused.train(self.training)
        return fused


class Conv1d(_QATConvMixin, nn.Conv1d):
    _FLOAT_MODULE = nn.Conv1d
    _FLOAT_CONV_MODULE = nn.Conv1d


class Conv2d(_QATConvMixin, nn.Conv2d):
    _FLOAT_MODULE = nn.Conv2d
    _FLOAT_CONV_MODULE = nn.Conv2d


class Conv3d(_QATConvMixin, nn.Conv3d):
    _FLOAT_MODULE = nn.Conv3d
    _FLOAT_CONV_MODULE = nn.Conv3d
