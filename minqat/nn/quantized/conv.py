r"""int8 convolutions: ``Conv1d/2d/3d`` and ``ConvReLU1d/2d/3d``, torch.ao.nn.quantized(.intrinsic)'s
twins on plain integer tensors.

A converted conv holds an ``int8`` weight with its float32 scale and int64 zero point (per channel
``(C_out,)`` or per tensor ``()``), a **float32** bias (torch never quantizes it on fbgemm/x86) and
its output qparams ``scale`` / ``zero_point``. Its forward takes a ``QTensor`` and calls the
integer reference kernel (``minqat.kernels.quantized_conv2d``, numerics.md §7.1)::

    acc   = sum (x_int - z_x) * (w_int - z_w[c])             exact int32, padding = z_x
    y_int = clamp(rint(fl32(fl32(acc) + fl32(b / atw)) * mult) + z_y, relu ? z_y : 0, 255)

The ``requantization`` attribute picks the recipe (``minqat.kernels.requantize.requantizer``):
``"fbgemm"`` (default, the line above, torch's), ``"fixed_point"`` or ``"onnxruntime"`` (ONNX Runtime's
``QLinearConv``, with an int32 bias: ``minqat.kernels.onnxruntime``); ``minqat.onnx.set_requantization``
sets it on a whole model.

A 2-d conv on CPU keeps its prepared weight (packed for the int8 GEMM, block diagonal for a grouped
conv; a depthwise conv's centred int32 taps) and requantization constants between calls, recomputed
whenever a buffer, a qparam or the mode changes (``prepared.LayerCache``, ``linear.py``); other convs
(1-d, 3-d, CUDA, grouped ones the GEMM does not pay for) call the kernel function, which checks and
prepares on every call.

``from_float(qat_module)`` is torch.ao's convert step for one layer (numerics.md §6):

1. a ``ConvBn*`` / ``ConvBnReLU*`` QAT module gets its BatchNorm folded **in place** with the
   running statistics (``minqat.fold.fuse_conv_bn_weights``), whatever ``freeze_bn`` says;
2. the weight fake quant is called **once** on the (folded) weight: if its observer is enabled,
   that is one more moving-average step, so the converted scales differ from the last training
   scales (disable the observers before convert to keep them);
3. weight qparams from ``weight_fake_quant.calculate_qparams()`` (the Python observer formula, also
   for the fused fake quant), weights quantized per channel (or per tensor) and clamped to the
   observer's range (``common.quantize_weight``);
4. output qparams from ``activation_post_process.calculate_qparams()``.

A model prepared for post-training quantization (``minqat.prepare``) converts too: then
``from_float`` takes the float ``nn.Conv2d`` (or fused ``ConvReLU2d`` container) and builds the
weight observer from its qconfig, as torch.ao does.

>>> from minqat.qtensor import QTensor
>>> conv = Conv2d(1, 1, 1, bias=False)
>>> conv.set_weight_bias(torch.tensor([[[[2]]]], dtype=torch.int8), torch.tensor(0.5), torch.tensor(0), None)
>>> conv.scale, conv.zero_point = 1.0, 10
>>> x = QTensor.quantize(torch.tensor([[[[1.0, 3.0]]]]), 0.5, 0, torch.uint8)   # x_int = [2, 6]
>>> conv(x).int_repr()                                     # 2*2*0.25 = 1, 6*2*0.25 = 3
tensor([[[[11, 13]]]], dtype=torch.uint8)
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _ntuple

from ...fold import fuse_conv_bn_weights
from ...kernels import quantized_conv1d, quantized_conv2d, quantized_conv3d
from ...kernels.conv import (block_diagonal, block_diagonal_pays, check_conv_arguments, check_output_size,
                              conv2d_acc_int8, depthwise_acc_int32, depthwise_weight, pack_conv_weight)
from ...kernels.linear import int_mm_usable
from ...kernels.requantize import layer_requantization
from ...nn.intrinsic import fused
from ...nn.intrinsic.qat.conv_bn import _ConvBnNd
from ...qtensor import QTensor
from .common import (Int8WeightLayer, clamp_to_output_range, fold_bn_in_place, observe_weight, output_qparams,
                     quantize_weight, require_qtensor, require_statistics)
from .prepared import LayerCache, PreparedLayer

__all__ = ["Conv1d", "Conv2d", "Conv3d", "ConvReLU1d", "ConvReLU2d", "ConvReLU3d"]

_LAYOUTS = {1: "(N, C, L)", 2: "(N, C, H, W)", 3: "(N, C, D, H, W)"}
_CHANNELS_LAST = {2: torch.channels_last, 3: torch.channels_last_3d}
_PADDING_MODES = ("zeros", "reflect")  # torch.ao's quantized convs support these two


def _channels_last(y: torch.Tensor, dims: int) -> torch.Tensor:
    """``y`` with the strides of torch's quantized conv outputs: channels last (1-d: ``(C*L, 1, C)``).

    The layout is part of the result: torch's pooling, add and cat kernels round differently on
    channels-last and contiguous integers (``minqat.kernels.pooling``), so it must match torch's.
    """
    if dims == 1:
        return _channels_last(y.unsqueeze(2), 2).squeeze(2)
    if y.stride() == _channels_last_strides(y.shape):
        return y
    return torch.empty_like(y, memory_format=_CHANNELS_LAST[dims]).copy_(y)


def _channels_last_strides(shape: torch.Size) -> tuple[int, ...]:
    """The strides ``empty_like(memory_format=channels_last[_3d])`` gives ``(N, C, *spatial)``: C fastest."""
    strides, step = [0] * len(shape), shape[1]
    strides[1] = 1
    for i in reversed([0, *range(2, len(shape))]):
        strides[i] = step
        step *= shape[i]
    return tuple(strides)


def _geometry(value, dims: int, name: str) -> tuple[int, ...]:
    if isinstance(value, str):
        raise ValueError(f"{name}={value!r} is not supported by the int8 convolution; give explicit integers")
    return tuple(int(v) for v in _ntuple(dims)(value))


class _ConvNd(Int8WeightLayer, nn.Module):
    """Shared by the 1-d/2-d/3-d convs and their fused-ReLU twins (class attributes pick the variant)."""

    _DIMS: ClassVar[int]
    _KERNEL: ClassVar = None  # minqat.kernels.quantized_conv{1,2,3}d
    _RELU: ClassVar[bool] = False
    _FLOAT_MODULE: ClassVar[type[nn.Module]]  # the float module a PTQ-prepared model holds

    requantization: str = "fbgemm"  # or "fixed_point", "onnxruntime": minqat.kernels.requantize.requantizer
    weight_int: torch.Tensor  # (C_out, C_in / groups, *kernel) int8
    weight_scale: torch.Tensor  # () or (C_out,) float32
    weight_zero_point: torch.Tensor  # () or (C_out,) int64
    bias_float: torch.Tensor | None  # (C_out,) float32

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None):
        super().__init__()
        dims = self._DIMS
        if out_channels <= 0 or in_channels <= 0:
            raise ValueError(f"in_channels and out_channels must be positive, got {in_channels}, {out_channels}")
        if groups <= 0 or in_channels % groups or out_channels % groups:
            raise ValueError(f"groups must divide in_channels ({in_channels}) and out_channels ({out_channels}), "
                             f"got {groups}")
        if padding_mode not in _PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {_PADDING_MODES} for an int8 conv, got {padding_mode!r}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = _geometry(kernel_size, dims, "kernel_size")
        self.stride = _geometry(stride, dims, "stride")
        self.padding = _geometry(padding, dims, "padding")
        self.dilation = _geometry(dilation, dims, "dilation")
        self.padding_mode = padding_mode
        shape = (out_channels, in_channels // groups, *self.kernel_size)
        self.register_buffer("weight_int", torch.zeros(shape, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.tensor(1.0, device=device))
        self.register_buffer("weight_zero_point", torch.tensor(0, device=device))
        self.register_buffer("bias_float", torch.zeros(out_channels, device=device) if bias else None)
        self.scale: float = 1.0  # output qparams (Python numbers, like torch.ao)
        self.zero_point: int = 0
        self.output_range: tuple[int, int] | None = None  # convert(consistent=True): the fake quant's range
        self._prepared = LayerCache()  # PreparedLayer of the int8 GEMM / depthwise path (2-d, CPU), see forward

    # --- parameters -------------------------------------------------------------------------------

    def set_weight_bias(self, w_int: torch.Tensor, w_scale: torch.Tensor, w_zero_point: torch.Tensor,
                        bias: torch.Tensor | None) -> None:
        """Install an int8 weight, its qparams (0-d: per tensor; ``(C_out,)``: per channel) and a float bias."""
        if w_int.dtype != torch.int8 or tuple(w_int.shape) != tuple(self.weight_int.shape):
            raise ValueError(f"w_int must be an int8 tensor of shape {tuple(self.weight_int.shape)}, "
                             f"got {w_int.dtype} {tuple(w_int.shape)}")
        if w_scale.dim() not in (0, 1) or w_scale.shape != w_zero_point.shape:
            raise ValueError(f"w_scale and w_zero_point must both be 0-d or ({self.out_channels},), "
                             f"got {tuple(w_scale.shape)} and {tuple(w_zero_point.shape)}")
        if (bias is None) != (self.bias_float is None):
            raise ValueError(f"bias must be {'None' if self.bias_float is None else 'a tensor'} for this module")
        self._install_weight_bias(w_int, w_scale, w_zero_point, bias)


    # --- forward --------------------------------------------------------------------------------

    def forward(self, x: QTensor) -> QTensor:
        """The conv kernel on ``x``; 2-d convs on CPU through the kernels' integer paths (the int8 GEMM, the
        depthwise int32 taps) with the weight prepared once (checked and computed again whenever a weight
        buffer, qparam or mode changes, as ``Linear.forward``); the same integers as the kernel function."""
        x = require_qtensor(x, self._get_name())
        if x.dim() != self._DIMS + 2:
            raise ValueError(f"{self._get_name()} expects an input of shape {_LAYOUTS[self._DIMS]}, "
                             f"got {tuple(x.shape)}")
        x_int, padding = x.int_repr(), self.padding
        if self.padding_mode == "reflect":  # pad the integers themselves, then convolve unpadded (as torch.ao)
            pad = [p for p in reversed(self.padding) for _ in range(2)]
            x_int = F.pad(x_int.float(), pad, mode="reflect").to(x_int.dtype)  # exact: small integers
            padding = (0,) * self._DIMS
        depthwise = self.groups > 1 and self.weight_int.size(1) == 1  # C_in / groups == 1
        if self._DIMS == 2 and depthwise and x_int.device.type == "cpu" and x_int.numel() > 0:
            return self._forward_cached(x, x_int, padding, self._depthwise)
        if (self._DIMS == 2 and not depthwise and int_mm_usable(x_int, self.weight_int)
                and block_diagonal_pays(self.weight_int, self.groups)):
            return self._forward_cached(x, x_int, padding, self._int8_gemm)
        y_int = self._KERNEL(  # any device, groups, dims: the kernel function (float64 where no int8 GEMM applies)
            x_int, x.scale, x.zero_point, self.weight_int, self.weight_scale, self.weight_zero_point,
            self.bias_float, y_scale=self.scale, y_zero_point=self.zero_point, stride=self.stride,
            padding=padding, dilation=self.dilation, groups=self.groups, relu=self._RELU, dtype=x_int.dtype,
            requantization=self.requantization)
        y_int = clamp_to_output_range(y_int, self.output_range)
        return QTensor(_channels_last(y_int, self._DIMS), self.scale, self.zero_point)

    def _forward_cached(self, x: QTensor, x_int: torch.Tensor, padding: tuple[int, ...], accumulate) -> QTensor:
        sources = (*self._buffers.values(), x.scale, x.zero_point, x_int.dtype, x_int.device, x_int.size(1),
                   self.scale, self.zero_point, self.requantization, self.stride, padding, self.dilation)  # + geometry
        layer = self._prepared.get(sources, lambda: self._prepare(x, x_int, padding))
        check_output_size(x_int, self.weight_int, self.stride, padding, self.dilation)  # shapes: every call
        acc = accumulate(x_int, layer, padding)  # (N, C_out, Ho, Wo), channels-last strides
        y_int = layer.requantize(acc.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # requantized channels last
        return QTensor._make(_channels_last(clamp_to_output_range(y_int, self.output_range), 2), *layer.output_qparams)

    def _int8_gemm(self, x_int: torch.Tensor, layer: PreparedLayer, padding: tuple[int, ...]) -> torch.Tensor:
        return conv2d_acc_int8(x_int, layer.d, layer.packed, layer.offset, self.kernel_size, self.stride, padding,
                               self.dilation)

    def _depthwise(self, x_int: torch.Tensor, layer: PreparedLayer, padding: tuple[int, ...]) -> torch.Tensor:
        return depthwise_acc_int32(x_int, layer.z_x, layer.packed, self.stride, padding, self.dilation)

    def _prepare(self, x: QTensor, x_int: torch.Tensor, padding: tuple[int, ...]) -> PreparedLayer:
        """Check the arguments as ``quantized_conv2d`` does, then prepare the weight (depthwise: its centred int32
        taps; else packed for the int8 GEMM, block diagonal for a grouped conv) and bind the requantization."""
        _, z_w, *_ = check_conv_arguments(x_int, x.zero_point, self.weight_int, self.weight_zero_point, self.stride,
                                          padding, self.dilation, self.groups, 2)
        requantize = layer_requantization(self.requantization, x.scale, self.weight_scale, self.scale,
                                          self.zero_point, self.bias_float, self.out_channels, x_int.device,
                                          relu=self._RELU, dtype=x_int.dtype)
        if self.weight_int.size(1) == 1 and self.groups > 1:
            weight = depthwise_weight(self.weight_int, z_w, self.groups)
        else:
            w = self.weight_int if self.groups == 1 else block_diagonal(self.weight_int, z_w, self.groups)
            weight = pack_conv_weight(w, z_w, transpose=True)
        return PreparedLayer.build(weight, x_int, x.zero_point, requantize, self.scale, self.zero_point)

    def _get_name(self) -> str:
        return "Quantized" + type(self).__name__

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"scale={self.scale}, zero_point={self.zero_point}")
        if any(self.padding):
            s += f", padding={self.padding}"
        if any(d != 1 for d in self.dilation):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias_float is None:
            s += ", bias=False"
        return s

    # --- convert ------------------------------------------------------------------------------------

    @classmethod
    def from_float(cls, mod: nn.Module, use_precomputed_fake_quant: bool = False) -> _ConvNd:
        """The int8 conv of a QAT conv (BN folded in place first) or of an observed float conv.

        ``use_precomputed_fake_quant`` is accepted for torch.ao's signature and, as in torch.ao,
        ignored by convolutions: the weight fake quant is always called once more.
        """
        if hasattr(mod, "weight_fake_quant"):  # a QAT module (minqat.nn.qat / nn.intrinsic.qat)
            activation_post_process = _output_post_process(mod, cls)
            if isinstance(mod, _ConvBnNd):
                fold_bn_in_place(mod, fuse_conv_bn_weights)
            weight_post_process = mod.weight_fake_quant
        else:  # a float module prepared for post-training quantization
            if type(mod) is not cls._FLOAT_MODULE:
                raise ValueError(f"{cls.__name__}.from_float expects a QAT conv or a {cls._FLOAT_MODULE.__name__}, "
                                 f"got {type(mod).__name__}")
            if getattr(mod, "qconfig", None) is None:
                raise ValueError(f"{cls.__name__}.from_float needs a {type(mod).__name__} with a qconfig "
                                 "(prepare it first)")
            activation_post_process = _output_post_process(mod, cls)
            if isinstance(mod, fused.FusedModule):
                mod = mod[0]
            weight_post_process = mod.qconfig.weight().to(mod.weight.device)
        return cls._from_parts(mod, activation_post_process, weight_post_process)

    @classmethod
    def _from_parts(cls, mod: nn.Module, activation_post_process: nn.Module, weight_post_process: nn.Module):
        """torch.ao's ``get_qconv``: observe the weight once, quantize it, read the output qparams."""
        observe_weight(weight_post_process, mod.weight)  # one more observer step (numerics.md §6.2)
        w_int, w_scale, w_zero_point = quantize_weight(mod.weight, weight_post_process)
        qconv = cls(mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod.padding, mod.dilation,
                    mod.groups, mod.bias is not None, mod.padding_mode, device=mod.weight.device)
        qconv.set_weight_bias(w_int, w_scale, w_zero_point, mod.bias)
        qconv.scale, qconv.zero_point = output_qparams(activation_post_process)
        return qconv


def _output_post_process(mod: nn.Module, cls: type) -> nn.Module:
    post_process = getattr(mod, "activation_post_process", None)
    if post_process is None:
        raise ValueError(f"{cls.__name__}.from_float needs a {type(mod).__name__} with an output observer "
                         "(activation_post_process): prepare the model (minqat.prepare_qat / minqat.prepare) first")
    require_statistics(post_process, "its output observer (activation_post_process)")
    return post_process


class Conv1d(_ConvNd):
    """int8 ``Conv1d``: ``(N, C, L)`` QTensor in, QTensor out."""

    _DIMS, _KERNEL, _FLOAT_MODULE = 1, staticmethod(quantized_conv1d), nn.Conv1d


class Conv2d(_ConvNd):
    """int8 ``Conv2d``: ``(N, C, H, W)`` QTensor in, QTensor out."""

    _DIMS, _KERNEL, _FLOAT_MODULE = 2, staticmethod(quantized_conv2d), nn.Conv2d


class Conv3d(_ConvNd):
    """int8 ``Conv3d``: ``(N, C, D, H, W)`` QTensor in, QTensor out."""

    _DIMS, _KERNEL, _FLOAT_MODULE = 3, staticmethod(quantized_conv3d), nn.Conv3d


class ConvReLU1d(Conv1d):
    """int8 ``Conv1d`` + ReLU fused: the output is clamped below at its zero point."""

    _RELU, _FLOAT_MODULE = True, fused.ConvReLU1d


class ConvReLU2d(Conv2d):
    """int8 ``Conv2d`` + ReLU fused: the output is clamped below at its zero point."""

    _RELU, _FLOAT_MODULE = True, fused.ConvReLU2d


class ConvReLU3d(Conv3d):
    """int8 ``Conv3d`` + ReLU fused: the output is clamped below at its zero point."""

    _RELU, _FLOAT_MODULE = True, fused.ConvReLU3d
