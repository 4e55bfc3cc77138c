"""Conversion: a prepared (trained or calibrated) model -> an int8 model of ``minqat.nn.quantized`` modules.

``convert(model)`` is torch.ao's eager-mode ``convert``, pass for pass:

1. swap, bottom-up -- every module with a qconfig whose type is in the mapping (``CONVERT_MODULE_MAPPING``
   unless ``mapping=`` is given) is replaced by ``Int8Class.from_float(module)``; fused containers
   are swapped as one unit. ``from_float`` folds BatchNorm into the conv (in place, with the running
   statistics), calls the weight fake quant once more on the folded weight, quantizes the weight
   from its qparams and takes the output qparams from the module's ``activation_post_process``
   (numerics.md §6). The replacement keeps the module's other forward hooks.
2. clean up (``remove_qconfig=True``) -- every ``qconfig`` attribute, observer / fake-quant
   ``activation_post_process`` child and observer hook is removed.

Modules without an int8 twin stay float and receive ``QTensor`` s: ``nn.ReLU``, pooling,
``nn.Flatten``, ``nn.Dropout``, ``nn.Identity`` ... run on them through ``QTensor.__torch_function__``
with the integer semantics of torch's quantized ops (an unsupported op raises, naming it).

Deliberate differences from torch.ao (each a ``ValueError`` naming the module path, where torch.ao
silently builds a wrong int8 model or fails later with an unrelated message):

* an observer that never saw a batch (``min_val = +inf``, or empty per-channel buffers) -- torch.ao
  warns and uses ``scale = 1, zero_point = 0``;
* a model that was never prepared (no observer or fake quant anywhere) -- torch.ao returns it unchanged;
* an observed module (it has an ``activation_post_process``) that minqat has no int8 module for,
  e.g. an unfused ``BatchNorm2d`` or a ``Hardswish`` -- torch.ao would swap in its own int8 module.
  Set such a module's ``qconfig = None`` before preparing to keep it float (behind a DeQuantStub).

The mapping also covers minqat's QAT ``Conv1d`` / ``ConvReLU1d`` (which torch.ao's QAT mapping leaves
out, see ``minqat.mappings``) and the float modules of a model prepared for post-training
quantization with ``minqat.prepare``.

>>> import torch, minqat
>>> from torch import nn
>>> model = minqat.QuantWrapper(nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU())).train()
>>> model.qconfig = minqat.get_default_qat_qconfig("fbgemm")
>>> model = minqat.prepare_qat(model)
>>> _ = model(torch.randn(4, 1, 3, 3))                      # train (here: one observing forward)
>>> int8 = convert(model.eval())
>>> type(int8.module[0]).__name__, type(int8.quant).__name__
('Conv2d', 'Quantize')
>>> int8(torch.randn(1, 1, 3, 3)).dtype                    # float in, float out; int8 inside
torch.float32
"""
from __future__ import annotations

import copy

from torch import nn
from torch.nn.utils.parametrize import type_before_parametrizations

from .fake_quantize import FakeQuantizeBase
from .mappings import is_fused_container
from .nn import qat as nnqat
from .nn.intrinsic import fused
from .nn.intrinsic.qat import conv_bn as qat_conv_bn
from .nn.intrinsic.qat import conv_relu as qat_conv_relu
from .nn.intrinsic.qat.linear_bn import LinearBn1d as QATLinearBn1d
from .nn.intrinsic.qat.linear_relu import LinearReLU as QATLinearReLU
from .nn.quantized import conv as qconv
from .nn.quantized import linear as qlinear
from .nn.quantized.functional import QFunctional
from .nn.quantized.stubs import DeQuantize, Quantize
from .observers import ObserverBase
from .consistent import consistent_int8_module
from .prepare import _copy_hooks, _observer_forward_hook, _observer_forward_pre_hook, _single_device, swap_module
from .stubs import DeQuantStub, FloatFunctional, QuantStub

__all__ = ["CONVERT_MODULE_MAPPING", "get_convert_module_mapping", "convert"]

# prepared module type -> int8 module type: torch.ao's DEFAULT_STATIC_QUANT_MODULE_MAPPINGS, restricted
# to the modules minqat has int8 kernels for, plus the QAT Conv1d / ConvReLU1d minqat's QAT mapping adds.
CONVERT_MODULE_MAPPING: dict[type[nn.Module], type[nn.Module]] = {
    QuantStub: Quantize,
    DeQuantStub: DeQuantize,
    FloatFunctional: QFunctional,
    # QAT modules (prepare_qat)
    nnqat.Conv1d: qconv.Conv1d,
    nnqat.Conv2d: qconv.Conv2d,
    nnqat.Conv3d: qconv.Conv3d,
    nnqat.Linear: qlinear.Linear,
    qat_conv_bn.ConvBn1d: qconv.Conv1d,
    qat_conv_bn.ConvBn2d: qconv.Conv2d,
    qat_conv_bn.ConvBn3d: qconv.Conv3d,
    qat_conv_bn.ConvBnReLU1d: qconv.ConvReLU1d,
    qat_conv_bn.ConvBnReLU2d: qconv.ConvReLU2d,
    qat_conv_bn.ConvBnReLU3d: qconv.ConvReLU3d,
    qat_conv_relu.ConvReLU1d: qconv.ConvReLU1d,
    qat_conv_relu.ConvReLU2d: qconv.ConvReLU2d,
    qat_conv_relu.ConvReLU3d: qconv.ConvReLU3d,
    QATLinearReLU: qlinear.LinearReLU,
    QATLinearBn1d: qlinear.Linear,
    # observed float modules (post-training quantization: prepare + calibration)
    nn.Conv1d: qconv.Conv1d,
    nn.Conv2d: qconv.Conv2d,
    nn.Conv3d: qconv.Conv3d,
    nn.Linear: qlinear.Linear,
    nn.modules.linear.NonDynamicallyQuantizableLinear: qlinear.Linear,
    fused.ConvReLU1d: qconv.ConvReLU1d,
    fused.ConvReLU2d: qconv.ConvReLU2d,
    fused.ConvReLU3d: qconv.ConvReLU3d,
    fused.LinearReLU: qlinear.LinearReLU,
}

# Observed module types that may stay float: torch.ao's int8 twin ignores the observer (ReLU6 keeps its
# input's qparams) or is the identity at inference (Dropout), so the float module on a QTensor is the same.
_KEPT_FLOAT: tuple[type[nn.Module], ...] = (nn.ReLU6, nn.Dropout)


def get_convert_module_mapping() -> dict[type[nn.Module], type[nn.Module]]:
    """A copy of ``CONVERT_MODULE_MAPPING``, safe to edit and pass as ``convert(mapping=...)``."""
    return dict(CONVERT_MODULE_MAPPING)


def _is_post_process(module: nn.Module | None) -> bool:
    return isinstance(module, (ObserverBase, FakeQuantizeBase))


def _check_prepared(model: nn.Module) -> None:
    if not any(_is_post_process(m) for m in model.modules()):
        raise ValueError(
            f"convert needs a prepared model, but {type(model).__name__} holds no minqat observer or fake quant: "
            "set model.qconfig, call minqat.prepare_qat (or minqat.prepare), train (or calibrate), then convert "
            "(a model prepared by torch.ao.quantization is converted by torch.ao's own convert)")


def _observed_by_prepare(module: nn.Module) -> bool:
    """``prepare`` attached an output observer to ``module`` (its hook runs ``activation_post_process``)."""
    return (any(h is _observer_forward_hook for h in module._forward_hooks.values())
            or any(h is _observer_forward_pre_hook for h in module._forward_pre_hooks.values()))


def _swap_consistent(child: nn.Module, mapping: dict, path: str) -> nn.Module:
    """``swap_module`` for ``consistent=True``: the int8 module is built by ``minqat.consistent``."""
    new = consistent_int8_module(child, mapping[type_before_parametrizations(child)], f"'{path}'")
    _copy_hooks(child, new, skip=(_observer_forward_hook, _observer_forward_pre_hook))
    device = _single_device(child, "convert")
    return new if device is None else new.to(device)


def _swap(child: nn.Module, mapping: dict, path: str, model_training: bool, consistent: bool) -> nn.Module:
    child_type = type_before_parametrizations(child)
    if getattr(child, "qconfig", None) is None:
        return child
    if child_type in mapping:
        if consistent:
            return _swap_consistent(child, mapping, path)
        try:
            return swap_module(child, mapping)
        except ValueError as err:
            unobserved = "never observed" in str(err) and model_training
            mode = " (the model is still in training mode: was it trained or calibrated?)" if unobserved else ""
            raise ValueError(f"cannot convert '{path}' ({child_type.__name__}){mode}: {err}") from err
    if _observed_by_prepare(child) and child_type not in _KEPT_FLOAT:
        raise ValueError(f"cannot convert '{path}' ({child_type.__name__}): it is observed but minqat has no int8 "
                         "module for it; set its qconfig to None before preparing to keep it float (put a "
                         "DeQuantStub before it), or pass a mapping with an entry for it")
    return child


def _convert_children(module: nn.Module, mapping: dict, prefix: str, model_training: bool, consistent: bool) -> None:
    """torch.ao's ``_convert``: children first (fused units whole), then swap each child."""
    for name, child in list(module.named_children()):
        path = f"{prefix}.{name}" if prefix else name
        if _is_post_process(child):  # an observer or fake quant: nothing inside to convert
            continue
        if not is_fused_container(child):
            _convert_children(child, mapping, path, model_training, consistent)
        module._modules[name] = _swap(child, mapping, path, model_training, consistent)


def _remove_qconfig(module: nn.Module) -> None:
    """torch.ao's ``_remove_qconfig``: drop qconfigs, observer children and observer hooks, everywhere."""
    for child in module.children():
        _remove_qconfig(child)
    if hasattr(module, "qconfig"):
        del module.qconfig
    if _is_post_process(getattr(module, "activation_post_process", None)):
        del module.activation_post_process
    for hooks, observer_hook in ((module._forward_pre_hooks, _observer_forward_pre_hook),
                                 (module._forward_hooks, _observer_forward_hook)):
        for handle_id in [i for i, hook in hooks.items() if hook is observer_hook]:
            del hooks[handle_id]


def convert(module: nn.Module, mapping: dict | None = None, inplace: bool = False,
            remove_qconfig: bool = True, consistent: bool = False) -> nn.Module:
    """Swap a prepared, trained (or calibrated) model's modules for int8 ones, torch.ao's ``convert``.

    Call ``model.eval()`` first (convert does not need it, but the int8 model is for inference);
    consider ``model.apply(minqat.disable_observer)`` to keep the last training qparams (otherwise
    the weight observers take one more step on the folded weights, as in torch.ao).

    Args:
        module: the prepared model; copied unless ``inplace`` (with ``inplace=True`` the prepared
            QAT modules are modified: their BatchNorm is folded into the weights, like torch.ao).
        mapping: prepared module type -> int8 module type; default ``CONVERT_MODULE_MAPPING``.
        inplace: convert ``module`` itself.
        remove_qconfig: remove ``qconfig`` attributes, observers and observer hooks afterwards.
        consistent: ``False`` (default) reproduces torch.ao's convert bit for bit: BN folded with
            ``rsqrt``, one more weight-observer step, qparams from ``calculate_qparams()``. ``True``
            deploys exactly what the fake quants used in the last eval forward (``minqat.consistent``):
            the trained weight codes and qparams, no observer step; each layer's int8 output is then
            within 1 LSB of its fake-quant layer. Needs the model in eval mode.

    Returns:
        The int8 model: float tensors in at each ``Quantize``, ``QTensor`` s between int8 modules,
        float tensors out of each ``DeQuantize``.

    Raises:
        ValueError: ``module`` was never prepared; an observer of a module to convert never saw a
            batch; an observed module has no int8 twin (see the module docstring). The message
            names the module's path.
    """
    mapping = CONVERT_MODULE_MAPPING if mapping is None else mapping
    if not isinstance(mapping, dict):
        raise ValueError(f"mapping must be a dict from prepared module types to int8 module types, got {mapping!r}")
    _check_prepared(module)
    if not inplace:
        module = copy.deepcopy(module)
    if consistent and module.training:
        raise ValueError("convert(..., consistent=True) needs the model in eval mode (model.eval()): it deploys "
                         "what the last eval forward computed, with BN on its running statistics")
    _convert_children(module, mapping, "", module.training, consistent)
    if remove_qconfig:
        _remove_qconfig(module)
    return module
