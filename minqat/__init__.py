"""minqat: quantization-aware training for PyTorch, from scratch on plain tensors.

Public names, in the order of the flow: qparams -> fake quant math -> observers -> fake-quant
modules -> qconfigs -> stubs -> BN folding -> fusion -> prepare_qat. Each mirrors its ``torch.ao.quantization`` namesake, so code written for
torch.ao's eager mode runs by swapping the import.

>>> import torch, minqat
>>> minqat.fake_quantize_per_tensor_affine(torch.tensor([0.26]), 0.1, 0, 0, 255)
tensor([0.3000])
"""
from __future__ import annotations

from .qparams import calculate_qmin_qmax, calculate_qparams
from .qparams_fbgemm import choose_qparams_fbgemm
from .functional import (
    dequantize,
    fake_quantize_learnable_per_channel_affine,
    fake_quantize_learnable_per_tensor_affine,
    fake_quantize_per_channel_affine,
    fake_quantize_per_tensor_affine,
    quantize_per_channel,
    quantize_per_tensor,
)
from .observers import (
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    ObserverBase,
    PerChannelMinMaxObserver,
)
from .histogram import HistogramObserver
from .fake_quantize import (
    FakeQuantize,
    FakeQuantizeBase,
    FusedMovingAvgObsFakeQuantize,
    LearnableFakeQuantize,
    disable_fake_quant,
    disable_observer,
    enable_fake_quant,
    enable_observer,
)
from .qconfig import (
    QConfig,
    default_fake_quant,
    default_fused_act_fake_quant,
    default_fused_per_channel_wt_fake_quant,
    default_fused_wt_fake_quant,
    default_per_channel_qconfig,
    default_per_channel_weight_fake_quant,
    default_qat_qconfig,
    default_qat_qconfig_v2,
    default_qconfig,
    default_weight_fake_quant,
    get_default_qat_qconfig,
    get_default_qconfig,
)

from .stubs import DeQuantStub, FloatFunctional, QuantStub, QuantWrapper
from .nn.intrinsic.qat import freeze_bn_stats, update_bn_stats
from .fold import fuse_conv_bn_weights, fuse_linear_bn_weights
from .fuse import fuse_modules, fuse_modules_qat
from .mappings import get_qat_module_mapping
from .prepare import prepare, prepare_qat, propagate_qconfig_, swap_module

from .qtensor import QTensor
from .convert import convert, get_convert_module_mapping
from .report import LayerReport, compare_layers
from .onnx import export_onnx, set_requantization

__version__ = "0.1.0"

__all__ = [
    "calculate_qmin_qmax", "calculate_qparams", "choose_qparams_fbgemm",
    "fake_quantize_per_tensor_affine", "fake_quantize_per_channel_affine",
    "fake_quantize_learnable_per_tensor_affine", "fake_quantize_learnable_per_channel_affine",
    "quantize_per_tensor", "quantize_per_channel", "dequantize",
    "ObserverBase", "MinMaxObserver", "MovingAverageMinMaxObserver", "PerChannelMinMaxObserver",
    "MovingAveragePerChannelMinMaxObserver", "HistogramObserver",
    "FakeQuantizeBase", "FakeQuantize", "FusedMovingAvgObsFakeQuantize", "LearnableFakeQuantize",
    "enable_observer", "disable_observer", "enable_fake_quant", "disable_fake_quant",
    "QConfig", "get_default_qat_qconfig", "get_default_qconfig",
    "default_fake_quant", "default_weight_fake_quant", "default_per_channel_weight_fake_quant",
    "default_fused_act_fake_quant", "default_fused_wt_fake_quant", "default_fused_per_channel_wt_fake_quant",
    "default_qconfig", "default_per_channel_qconfig", "default_qat_qconfig", "default_qat_qconfig_v2",
    "QuantStub", "DeQuantStub", "QuantWrapper", "FloatFunctional",
    "freeze_bn_stats", "update_bn_stats", "fuse_conv_bn_weights", "fuse_linear_bn_weights",
    "fuse_modules", "fuse_modules_qat", "get_qat_module_mapping",
    "propagate_qconfig_", "prepare", "prepare_qat", "swap_module",
    "QTensor", "convert", "get_convert_module_mapping", "compare_layers", "LayerReport",
    "export_onnx", "set_requantization",
]
