r"""int8 ``Linear`` and ``LinearReLU``, torch.ao.nn.quantized(.intrinsic)'s twins on plain integer tensors.

A converted linear layer holds an ``int8`` weight ``(out_features, in_features)`` with its float32
scale and int64 zero point (per channel ``(out_features,)`` or per tensor ``()``), a float32 bias
and its output qparams; its forward maps a ``QTensor`` ``(..., in_features)`` to a ``QTensor``
``(..., out_features)`` through ``minqat.kernels.quantized_linear`` (numerics.md §7.1), with the recipe its
``requantization`` attribute names (``"fbgemm"``, torch's, by default; ``"fixed_point"``; ``"onnxruntime"``).

**Kept constants.** What depends only on the layer -- the packed weight, the input offset's term, the
requantization constants, the checked output qparams (a ``PreparedLayer``, ``prepared.py``) -- is computed on
the first CPU call and kept, as fbgemm keeps its packed weight; a ``LayerCache`` computes it again
whenever a weight buffer, a qparam (the input's too) or ``requantization`` changes, whether by
assignment, ``set_weight_bias``, ``load_state_dict``, ``.to()`` or an in-place write. The integers are
always ``quantized_linear``'s, which checks and packs on every call (and serves other devices and
empty inputs). ``Conv2d`` (``conv.py``) keeps the same.

``from_float`` is torch.ao's (numerics.md §6): a ``LinearBn1d`` QAT module gets its BatchNorm folded
in place (``minqat.fold.fuse_linear_bn_weights``); the weight fake quant is called once on the
weight **unless** ``use_precomputed_fake_quant=True`` (for linear layers torch.ao honours that flag);
weight qparams from ``weight_fake_quant.calculate_qparams()``; output qparams from the output
observer.

>>> from minqat.qtensor import QTensor
>>> lin = Linear(2, 1)
>>> lin.set_weight_bias(torch.tensor([[1, -1]], dtype=torch.int8), torch.tensor(0.5), torch.tensor(0),
...                     torch.tensor([0.25]))
>>> lin.scale, lin.zero_point = 0.25, 64
>>> x = QTensor.quantize(torch.tensor([[3.0, 1.0]]), 1.0, 0, torch.uint8)
>>> lin(x).int_repr()                                      # (3 - 1) * 0.5 + 0.25 = 1.25 -> 5 + 64
tensor([[69]], dtype=torch.uint8)
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ...dtypes import plain_dtype
from ...fold import fuse_linear_bn_weights
from ...kernels import quantized_linear
from ...kernels.linear import check_linear_operands, gemm_acc_int8, int8_codes, int_mm_usable, pack_weight, weight_zero_point
from ...kernels.requantize import layer_requantization
from ...nn.intrinsic import fused
from ...nn.intrinsic.qat.linear_bn import LinearBn1d
from ...qtensor import QTensor
from .prepared import LayerCache, PreparedLayer
from .common import (Int8WeightLayer, clamp_to_output_range, fold_bn_in_place, observe_weight, output_qparams,
                     quantize_weight, require_qtensor, require_statistics)

__all__ = ["Linear", "LinearReLU"]


class Linear(Int8WeightLayer, nn.Module):
    """int8 ``Linear``: ``(..., in_features)`` QTensor in, ``(..., out_features)`` QTensor out."""

    _RELU: ClassVar[bool] = False
    _FLOAT_MODULES: ClassVar[tuple[type[nn.Module], ...]] = (
        nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear)

    _SCHEME_BUFFERS = ("weight_scale", "weight_zero_point", "bias_float")  # a linear may gain or lose its bias
    requantization: str = "fbgemm"  # or "fixed_point", "onnxruntime": minqat.kernels.requantize.requantizer
    weight_int: torch.Tensor  # (out_features, in_features) int8
    weight_scale: torch.Tensor  # () or (out_features,) float32
    weight_zero_point: torch.Tensor  # () or (out_features,) int64
    bias_float: torch.Tensor | None  # (out_features,) float32

    def __init__(self, in_features: int, out_features: int, bias_: bool = True, dtype: torch.dtype = torch.int8,
                 device=None):
        super().__init__()
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"in_features and out_features must be positive, got {in_features}, {out_features}")
        if plain_dtype(dtype, "dtype") != torch.int8:  # torch.qint8 is accepted as its plain twin
            raise ValueError(f"dtype must be torch.int8 (int8 weights), got {dtype}")
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.tensor(1.0, device=device))
        self.register_buffer("weight_zero_point", torch.tensor(0, device=device))
        self.register_buffer("bias_float", torch.zeros(out_features, device=device) if bias_ else None)
        self.scale: float = 1.0  # output qparams (Python numbers, like torch.ao)
        self.zero_point: int = 0
        self.output_range: tuple[int, int] | None = None  # convert(consistent=True): the fake quant's range
        self._prepared = LayerCache()  # PreparedLayer of the int8 GEMM path, see forward

    def set_weight_bias(self, w_int: torch.Tensor, w_scale: torch.Tensor, w_zero_point: torch.Tensor,
                        bias: torch.Tensor | None) -> None:
        """Install an int8 weight, its qparams (0-d: per tensor; ``(out,)``: per channel) and a float bias.

        Unlike a conv, a linear layer may gain or lose its bias here (torch.ao's ``set_weight_bias``).
        """
        if w_int.dtype != torch.int8 or tuple(w_int.shape) != (self.out_features, self.in_features):
            raise ValueError(f"w_int must be an int8 tensor of shape {(self.out_features, self.in_features)}, "
                             f"got {w_int.dtype} {tuple(w_int.shape)}")
        if w_scale.dim() not in (0, 1) or w_scale.shape != w_zero_point.shape:
            raise ValueError(f"w_scale and w_zero_point must both be 0-d or ({self.out_features},), "
                             f"got {tuple(w_scale.shape)} and {tuple(w_zero_point.shape)}")
        self._install_weight_bias(w_int, w_scale, w_zero_point, bias)


    def forward(self, x: QTensor) -> QTensor:
        """``quantized_linear`` on ``x``; on CPU through the int8 GEMM with the weight packed once.

        The packed weight, ``d`` and the requantization constants depend only on the weight buffers, the
        qparams and ``requantization``: they are computed (and checked) on the first call and again
        whenever one of those changes (``prepared.LayerCache``), then reused -- the same integers as the
        kernel function, which packs and checks on every call.
        """
        x = require_qtensor(x, self._get_name())
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"{self._get_name()} expects an input of shape (..., {self.in_features}), "
                             f"got {tuple(x.shape)}")
        x_int = x.int_repr()
        if not int_mm_usable(x_int, self.weight_int):  # any device: the kernel function (float64 off CPU)
            y_int = quantized_linear(x_int, x.scale, x.zero_point, self.weight_int, self.weight_scale,
                                     self.weight_zero_point, self.bias_float, y_scale=self.scale,
                                     y_zero_point=self.zero_point, relu=self._RELU, dtype=x_int.dtype,
                                     requantization=self.requantization)
            return QTensor(clamp_to_output_range(y_int, self.output_range), self.scale, self.zero_point)
        sources = (*self._buffers.values(), x.scale, x.zero_point, x_int.dtype, x_int.device, self.scale,
                   self.zero_point, self.requantization)  # the weight buffers, every qparam, the mode
        layer = self._prepared.get(sources, lambda: self._prepare(x, x_int))
        acc = gemm_acc_int8(int8_codes(x_int.reshape(-1, self.in_features)), layer.packed, layer.offset)  # (M, C)
        y_int = layer.requantize(acc)
        if x_int.dim() != 2:
            y_int = y_int.reshape(*x_int.shape[:-1], self.out_features)
        return QTensor._make(clamp_to_output_range(y_int, self.output_range), *layer.output_qparams)

    def _prepare(self, x: QTensor, x_int: torch.Tensor) -> PreparedLayer:
        """Check the operands as ``quantized_linear`` does, then pack the weight and bind the requantization."""
        check_linear_operands(x_int, self.weight_int)
        z_w = weight_zero_point(self.weight_zero_point, self.out_features, x_int.device)
        requantize = layer_requantization(self.requantization, x.scale, self.weight_scale, self.scale,
                                          self.zero_point, self.bias_float, self.out_features, x_int.device,
                                          relu=self._RELU, dtype=x_int.dtype)
        return PreparedLayer.build(pack_weight(self.weight_int, z_w, transpose=True), x_int, x.zero_point, requantize,
                                   self.scale, self.zero_point)

    def _get_name(self) -> str:
        return "Quantized" + type(self).__name__

    def extra_repr(self) -> str:
        scheme = "per_channel" if self.weight_scale.dim() == 1 else "per_tensor"
        return (f"in_features={self.in_features}, out_features={self.out_features}, scale={self.scale}, "
                f"zero_point={self.zero_point}, weights={scheme}")

    @classmethod
    def from_float(cls, mod: nn.Module, use_precomputed_fake_quant: bool = False) -> Linear:
        """The int8 layer of a QAT linear (BN folded in place first) or of an observed float linear.

        ``use_precomputed_fake_quant=True`` skips the extra weight observer step (torch.ao's flag).
        """
        activation_post_process = getattr(mod, "activation_post_process", None)
        if activation_post_process is None:
            raise ValueError(f"{cls.__name__}.from_float needs a {type(mod).__name__} with an output observer "
                             "(activation_post_process): prepare the model (minqat.prepare_qat / minqat.prepare) first")
        require_statistics(activation_post_process, "its output observer (activation_post_process)")
        if hasattr(mod, "weight_fake_quant"):  # a QAT module
            if isinstance(mod, LinearBn1d):
                fold_bn_in_place(mod, fuse_linear_bn_weights)
            weight_post_process = mod.weight_fake_quant
        else:  # a float module prepared for post-training quantization
            if type(mod) not in cls._FLOAT_MODULES:
                names = ", ".join(t.__name__ for t in cls._FLOAT_MODULES)
                raise ValueError(f"{cls.__name__}.from_float expects a QAT linear or one of {names}, "
                                 f"got {type(mod).__name__}")
            if getattr(mod, "qconfig", None) is None:
                raise ValueError(f"{cls.__name__}.from_float needs a {type(mod).__name__} with a qconfig "
                                 "(prepare it first)")
            if isinstance(mod, fused.FusedModule):
                mod = mod[0]
            weight_post_process = mod.qconfig.weight().to(mod.weight.device)
        if use_precomputed_fake_quant:
            require_statistics(weight_post_process, "its weight fake quant")
        else:
            observe_weight(weight_post_process, mod.weight)  # one more observer step (numerics.md §6.2)
        w_int, w_scale, w_zero_point = quantize_weight(mod.weight, weight_post_process)
        qlinear = cls(mod.in_features, mod.out_features, mod.bias is not None, device=mod.weight.device)
        qlinear.set_weight_bias(w_int, w_scale, w_zero_point, mod.bias)
        qlinear.scale, qlinear.zero_point = output_qparams(activation_post_process)
        return qlinear


class LinearReLU(Linear):
    """int8 ``Linear`` + ReLU fused: the output is clamped below at its zero point."""

    _RELU = True
    _FLOAT_MODULES = (fused.LinearReLU,)
