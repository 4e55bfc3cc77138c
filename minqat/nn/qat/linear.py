"""QAT linear layer: ``nn.Linear`` whose weight passes through a fake quantizer.

Forward (Jacob et al. 2018 §3)::

    W_hat = weight_fake_quant(W)          observer update + fake quant, straight-through backward
    y     = x @ W_hat.T + b

Mirrors ``torch.ao.nn.qat.Linear``; same ``state_dict`` keys (``weight``, ``bias``,
``weight_fake_quant.*``).

>>> from minqat.qconfig import get_default_qat_qconfig
>>> Linear(4, 2, qconfig=get_default_qat_qconfig("fbgemm"))(torch.randn(3, 4)).shape
torch.Size([3, 2])
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..intrinsic.fused import FusedModule
from .conv import _require_qconfig

__all__ = ["Linear"]


class Linear(nn.Linear):
    _FLOAT_MODULE: ClassVar[type[nn.Module]] = nn.Linear
    _FLOAT_RELU_MODULE: ClassVar[type[nn.Module] | None] = None  # set by the fused LinearReLU

    def __init__(self, in_features: int, out_features: int, bias: bool = True, qconfig=None, device=None,
                 dtype=None) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__(in_features, out_features, bias, **factory_kwargs)
        self.qconfig = _require_qconfig(qconfig, type(self).__name__)
        self.weight_fake_quant = qconfig.weight(factory_kwargs=factory_kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight_fake_quant(self.weight), self.bias)
        return F.relu(y) if self._FLOAT_RELU_MODULE is not None else y

    @classmethod
    def from_float(cls, mod: nn.Module, use_precomputed_fake_quant: bool = False):
        """The QAT twin of a float linear (or linear-relu container), sharing its Parameters."""
        float_type = cls._FLOAT_MODULE
        ok = float_type.matches(mod) if issubclass(float_type, FusedModule) else type(mod) is float_type
        if not ok:
            raise ValueError(f"{cls.__name__}.from_float expects {float_type.__name__}, got {type(mod).__name__}")
        qconfig = _require_qconfig(getattr(mod, "qconfig", None), f"{cls.__name__} (from {type(mod).__name__}.qconfig)")
        linear = mod[0] if isinstance(mod, nn.Sequential) else mod
        qat = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, qconfig=qconfig)
        qat.weight = linear.weight  # shared, not copied
        qat.bias = linear.bias
        return qat

    def to_float(self) -> nn.Module:
        """A plain float linear (or linear-relu container) with a detached copy of the weights."""
        linear = nn.Linear(self.in_features, self.out_features, self.bias is not None)
        linear.weight = nn.Parameter(self.weight.detach())
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach())
        linear.train(self.training)
        if self._FLOAT_RELU_MODULE is None:
            return linear
        return self._FLOAT_MODULE(linear, self._FLOAT_RELU_MODULE())
