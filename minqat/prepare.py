"""Preparation: give every module its qconfig, swap in QAT modules, attach output observers.

``prepare_qat(model)`` is three passes over the module tree, exactly torch.ao's eager-mode flow:

1. ``propagate_qconfig_`` -- every module gets a ``qconfig`` attribute: its own if it has one,
   else ``qconfig_dict[name]``, else ``qconfig_dict[type]``, else its parent's. ``qconfig = None``
   opts a module and (unless they set their own) its children out.
2. swap -- every module with a qconfig whose type is in the mapping
   (``minqat.mappings.QAT_MODULE_MAPPING``) is replaced by ``QATClass.from_float(module)``, which
   shares the Parameters (so an optimizer built before still trains them). Fused containers are
   swapped as one unit.
3. ``prepare`` -- the *output* of each quantized op gets ``activation_post_process =
   qconfig.activation()`` (a fake quant in QAT, an observer in PTQ), called by a forward hook
   registered first in the hook list. Where torch.ao attaches it, and only there:

   * QuantStub and every observed leaf (``minqat.mappings.OBSERVED_LEAF_TYPES``) with a qconfig;
   * each swapped QAT module and fused container, as one unit (after its ReLU);
   * FloatFunctional: its ``activation_post_process`` is replaced, so ``add``/``cat``/... observe;
   * never DeQuantStub (its output is float) nor ``nn.Dropout``.

   The input of a layer is thus fake-quantized by whoever produced it (QuantStub or the previous
   layer's hook) -- Jacob et al. 2018 §3: quantize every tensor the int8 model will hold.

Models written for torch.ao are accepted unchanged: its QuantStub, DeQuantStub, QuantWrapper,
FloatFunctional and fused containers are first replaced by minqat's twins
(``minqat.mappings.torch_ao_equivalents``), keeping qconfig, mode, children and hooks (a root that
is itself a torch.ao class, e.g. a QuantWrapper, comes back as a new object even with
``inplace=True``: use the return value). The ``state_dict`` of a prepared model has the same keys
and shapes as torch.ao's, so checkpoints load either way with ``strict=True``.

Differences from torch.ao: the qconfig objects are propagated as they are (torch.ao wraps each one
to build observers on the module's device; minqat moves the built observer there instead); user
mistakes raise ``ValueError`` (torch.ao: ``AssertionError``); ``nn.LSTM`` / ``MultiheadAttention``
are not swapped for quantizable versions, and training-mode Sigmoid/Tanh/Softmax/Hardsigmoid get no
fixed-qparams fake quant yet (a warning names them).

>>> from minqat.qconfig import get_default_qat_qconfig
>>> from minqat.stubs import QuantWrapper
>>> model = QuantWrapper(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())).train()
>>> model.qconfig = get_default_qat_qconfig("fbgemm")
>>> qat = prepare_qat(model)
>>> type(qat.module[0]).__module__, type(qat.quant.activation_post_process).__name__
('minqat.nn.qat.conv', 'FusedMovingAvgObsFakeQuantize')
"""
from __future__ import annotations

import copy
import warnings
from typing import Iterable

import torch
from torch import nn
from torch.nn.utils.parametrize import is_parametrized, type_before_parametrizations

from .mappings import (
    OBSERVED_LEAF_TYPES,
    QAT_MODULE_MAPPING,
    is_fused_container,
    is_float_functional,
    torch_ao_equivalents,
)
from .nn.intrinsic.fused import FusedModule
from .observers import PerChannelMinMaxObserver
from .stubs import DeQuantStub, QuantWrapper

__all__ = ["propagate_qconfig_", "prepare", "prepare_qat", "swap_module"]

# torch.ao gives these a fixed-qparams fake quant in training; minqat has none yet (see _add_observers)
_FIXED_QPARAMS_TYPES = (nn.Hardsigmoid, nn.Sigmoid, nn.Softmax, nn.Tanh)


# --- 1. qconfig propagation ------------------------------------------------------------------------


def _check_qconfig(qconfig, module: nn.Module, path: str) -> None:
    """torch.ao's one validity check: no per-channel weight observer for transposed convolutions."""
    if qconfig is None or not isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        return
    if qconfig.weight is not None and isinstance(qconfig.weight(), PerChannelMinMaxObserver):
        raise ValueError(f"qconfig of '{path}' ({type(module).__name__}) has a per-channel weight observer, "
                         "which transposed convolutions do not support; use a per-tensor one")


def _propagate(module: nn.Module, qconfig_dict: dict, parent_qconfig, prefix: str) -> None:
    qconfig = qconfig_dict.get(type_before_parametrizations(module), parent_qconfig)
    qconfig = qconfig_dict.get(prefix, qconfig)
    qconfig = getattr(module, "qconfig", qconfig)  # the module's own wins, None included
    _check_qconfig(qconfig, module, prefix or "the model")
    module.qconfig = qconfig
    for name, child in module.named_children():
        _propagate(child, qconfig_dict, qconfig, f"{prefix}.{name}" if prefix else name)


def propagate_qconfig_(module: nn.Module, qconfig_dict: dict | None = None) -> None:
    """Set ``qconfig`` on every submodule, in place (torch.ao's ``propagate_qconfig_``).

    Precedence, strongest first: the module's own ``qconfig`` attribute (``None`` = opt out),
    ``qconfig_dict[dotted_name]``, ``qconfig_dict[module_type]``, the parent's qconfig.

    >>> from minqat.qconfig import default_qat_qconfig
    >>> m = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.ReLU()))
    >>> m[1].qconfig = None
    >>> propagate_qconfig_(m, {"": default_qat_qconfig})
    >>> m[0].qconfig is default_qat_qconfig, m[1][0].qconfig
    (True, None)
    """
    qconfig_dict = {} if qconfig_dict is None else qconfig_dict
    if not isinstance(qconfig_dict, dict):
        raise ValueError(f"qconfig_dict must be a dict from module names or types to qconfigs, got {qconfig_dict!r}")
    for key, value in qconfig_dict.items():
        if not isinstance(key, (str, type)):
            raise ValueError(f"qconfig_dict keys must be module names (str) or module types, got {key!r}")
        if value is not None and not (hasattr(value, "activation") and hasattr(value, "weight")):
            raise ValueError(f"qconfig_dict[{key!r}] must be a QConfig or None, got {value!r}")
    _propagate(module, qconfig_dict, None, "")


def _has_qconfig(model: nn.Module) -> bool:
    return any(getattr(m, "qconfig", None) for m in model.modules())


def _warn_no_qconfig(model: nn.Module) -> None:
    warnings.warn(f"None of the submodule got qconfig applied: no module of the {type(model).__name__} model "
                  "has a qconfig, so nothing will be observed or quantized. Make sure you set the `.qconfig` "
                  "attribute on the model or its submodules (e.g. model.qconfig = "
                  "minqat.get_default_qat_qconfig('x86')) or passed a qconfig_dict", UserWarning, stacklevel=3)


# --- torch.ao twins ----------------------------------------------------------------------------------


def _copy_hooks(src: nn.Module, dst: nn.Module, skip=()) -> None:
    """Register ``src``'s forward pre-hooks and forward hooks on ``dst`` (``skip``: hooks to leave)."""
    for handle_id, hook in src._forward_pre_hooks.items():
        if hook not in skip:
            dst.register_forward_pre_hook(hook, with_kwargs=handle_id in src._forward_pre_hooks_with_kwargs)
    for handle_id, hook in src._forward_hooks.items():
        if hook not in skip:
            dst.register_forward_hook(hook, with_kwargs=handle_id in src._forward_hooks_with_kwargs,
                                      always_call=handle_id in src._forward_hooks_always_called)


def _twin(mod: nn.Module, cls: type[nn.Module]) -> nn.Module:
    """minqat's ``cls`` in place of its torch.ao twin ``mod``: same children, qconfig, mode, hooks."""
    if issubclass(cls, FusedModule):
        new = cls(*mod)
    elif cls is QuantWrapper:
        new = cls(nn.Identity())  # placeholder: its constructor would reset the wrapped module's mode
    else:
        new = cls()
    for name, child in mod.named_children():
        new._modules[name] = child
    if hasattr(mod, "qconfig"):
        new.qconfig = mod.qconfig
    new.training = mod.training
    _copy_hooks(mod, new)
    return new


def _adopt_torch_ao_modules(module: nn.Module, twins: dict) -> nn.Module:
    """Replace torch.ao's stubs / FloatFunctional / fused containers by minqat's, children in place.

    Returns ``module``, or its twin when the root itself is a torch.ao class (e.g. a QuantWrapper).
    """
    for name, child in module.named_children():
        module._modules[name] = _adopt_torch_ao_modules(child, twins)
    return _twin(module, twins[type(module)]) if type(module) in twins else module


# --- 2. module swap --------------------------------------------------------------------------------


def _single_device(module: nn.Module, what: str) -> torch.device | None:
    devices = {t.device for t in [*module.parameters(), *module.buffers()] if t.device.type != "meta"}
    if len(devices) > 1:
        raise ValueError(f"{what} needs a module on a single device, got {sorted(map(str, devices))}")
    return next(iter(devices), None)


def swap_module(mod: nn.Module, mapping: dict, custom_module_class_mapping: dict | None = None) -> nn.Module:
    """``mapping[type(mod)].from_float(mod)`` if ``mod`` has a qconfig and a mapped type, else ``mod``.

    The replacement keeps ``mod``'s forward pre-hooks and forward hooks (not the observer hook) and
    its device; like torch.ao, it starts in train mode. ``custom_module_class_mapping`` classes are
    built with ``from_observed`` (for convert).

    >>> from minqat.qconfig import default_qat_qconfig
    >>> lin = nn.Linear(2, 2); lin.qconfig = default_qat_qconfig
    >>> type(swap_module(lin, QAT_MODULE_MAPPING)).__module__
    'minqat.nn.qat.linear'
    """
    if getattr(mod, "qconfig", None) is None:
        return mod
    mod_type = type_before_parametrizations(mod)
    custom = custom_module_class_mapping or {}
    if mod_type in custom:
        new = custom[mod_type].from_observed(mod)
    elif mod_type in mapping:
        new = mapping[mod_type].from_float(mod)
    else:
        return mod
    _copy_hooks(mod, new, skip=(_observer_forward_hook, _observer_forward_pre_hook))
    device = _single_device(mod, "swap_module")
    if device is not None:
        new.to(device)
    return new


def _swap_all(module: nn.Module, mapping: dict, prefix: str = "") -> None:
    """torch.ao's ``convert(..., remove_qconfig=False)``: swap children bottom-up, fused units whole."""
    for name, child in module.named_children():
        path = f"{prefix}.{name}" if prefix else name
        if not is_fused_container(child):
            _swap_all(child, mapping, path)
        try:
            module._modules[name] = swap_module(child, mapping)
        except ValueError as err:
            raise ValueError(f"cannot swap '{path}' ({type(child).__name__}) for its QAT module: {err}") from err


# --- 3. observers ----------------------------------------------------------------------------------


def _observer_forward_hook(self: nn.Module, input, output):
    """Forward hook: the module's output goes through its ``activation_post_process``."""
    return self.activation_post_process(output)


def _observer_forward_pre_hook(self: nn.Module, input):
    """Forward pre-hook (memoryless observers): the module's first input goes through it."""
    return self.activation_post_process(input[0])


def _is_memoryless(post_process: nn.Module) -> bool:
    """torch.ao observes *inputs* when the activation observer keeps no history (averaging constant 1)."""
    observer = getattr(post_process, "activation_post_process", post_process)
    return getattr(observer, "averaging_constant", None) == 1


def _attach(module: nn.Module, device: torch.device | None) -> None:
    """``activation_post_process = qconfig.activation()`` plus its hook, first in the hook list."""
    if getattr(module, "qconfig", None) is None or isinstance(module, DeQuantStub):
        return
    post_process = module.qconfig.activation()
    if device is not None:
        post_process.to(device)
    module.add_module("activation_post_process", post_process)
    if _is_memoryless(post_process):
        module.register_forward_pre_hook(_observer_forward_pre_hook, prepend=True)
    else:
        module.register_forward_hook(_observer_forward_hook, prepend=True)


def _is_leaf(module: nn.Module) -> bool:
    if is_parametrized(module):
        return set(module._modules) == {"parametrizations"}
    return len(module._modules) == 0


def _add_observers(module, observed_types, non_leaf_types, custom_mapping, device, prefix, unsupported) -> None:
    """torch.ao's ``_add_observer_``, branch for branch."""
    for name, child in list(module.named_children()):
        path = f"{prefix}.{name}" if prefix else name
        child_type = type_before_parametrizations(child)
        has_qconfig = getattr(child, "qconfig", None) is not None
        if child_type is nn.Dropout:
            continue
        elif is_float_functional(child):
            if has_qconfig:
                post_process = child.qconfig.activation()
                child.activation_post_process = post_process.to(device) if device is not None else post_process
        elif is_fused_container(child) or child_type in non_leaf_types:
            _attach(child, device)
        elif has_qconfig and child.training and child_type in _FIXED_QPARAMS_TYPES:
            unsupported.append(f"'{path}' ({child_type.__name__})")
        elif has_qconfig and child_type in custom_mapping:
            observed = custom_mapping[child_type].from_float(child)
            setattr(module, name, observed)
            _attach(observed, device)
        else:
            _add_observers(child, observed_types, non_leaf_types, custom_mapping, device, path, unsupported)
    observed_leaf = _is_leaf(module) and not isinstance(module, nn.Sequential)
    weight_fake_quant = hasattr(module, "weight_fake_quant") and not isinstance(module, nn.Sequential)
    if (observed_leaf or weight_fake_quant) and type_before_parametrizations(module) in observed_types:
        _attach(module, device)


def _prepare(model, allow_list, non_leaf_types, prepare_custom_config_dict) -> None:
    custom = (prepare_custom_config_dict or {}).get("float_to_observed_custom_module_class", {})
    observed_types = OBSERVED_LEAF_TYPES if allow_list is None else set(allow_list)
    device = _single_device(model, "prepare")
    unsupported: list[str] = []
    _add_observers(model, observed_types, set(non_leaf_types or ()), custom, device, "", unsupported)
    if unsupported:
        warnings.warn(f"torch.ao attaches a fixed-qparams fake quant (scale 1/256 or 2/256) to the output of "
                      f"Sigmoid/Softmax/Hardsigmoid/Tanh in training; minqat has none yet, so these outputs are "
                      f"left unobserved: {', '.join(unsupported)}", UserWarning, stacklevel=3)


def prepare(model: nn.Module, inplace: bool = False, allow_list: Iterable[type] | None = None,
            observer_non_leaf_module_list: Iterable[type] | None = None,
            prepare_custom_config_dict: dict | None = None) -> nn.Module:
    """Attach observers for post-training calibration (or fake quants for QAT), torch.ao's ``prepare``.

    Propagates the qconfigs, then gives each module that torch.ao observes an
    ``activation_post_process`` (see the module docstring). Warns when no module has a qconfig.

    Args:
        model: the float model; copied unless ``inplace``.
        allow_list: leaf types to observe; default ``minqat.mappings.OBSERVED_LEAF_TYPES``.
        observer_non_leaf_module_list: module types observed as one unit though they have children
            (``prepare_qat`` passes the QAT module types).
        prepare_custom_config_dict: ``{"float_to_observed_custom_module_class": {Float: Observed}}``;
            ``Observed.from_float(module)`` replaces the module, which is then observed.

    >>> from minqat.qconfig import default_qconfig
    >>> m = nn.Sequential(nn.Linear(2, 2), nn.ReLU()); m.qconfig = default_qconfig
    >>> type(prepare(m)[0].activation_post_process).__name__
    'MinMaxObserver'
    """
    if not inplace:
        model = copy.deepcopy(model)
    model = _adopt_torch_ao_modules(model, torch_ao_equivalents())
    propagate_qconfig_(model)
    if not _has_qconfig(model):
        _warn_no_qconfig(model)
    _prepare(model, allow_list, observer_non_leaf_module_list, prepare_custom_config_dict)
    return model


def prepare_qat(model: nn.Module, mapping: dict | None = None, inplace: bool = False) -> nn.Module:
    """Prepare a **train**-mode model for quantization-aware training, torch.ao's ``prepare_qat``.

    Propagates the qconfigs, swaps every module with a qconfig through ``mapping`` (default
    ``minqat.mappings.QAT_MODULE_MAPPING``; QAT modules share the float Parameters) and attaches the
    output fake quants (``prepare`` with ``observer_non_leaf_module_list = set(mapping.values())``).
    Fuse first (``fuse_modules_qat``) so conv-BN-ReLU becomes one QAT module.

    >>> from minqat.qconfig import get_default_qat_qconfig
    >>> m = nn.Sequential(nn.Linear(2, 2)).eval(); m.qconfig = get_default_qat_qconfig()
    >>> prepare_qat(m)
    Traceback (most recent call last):
    ...
    ValueError: prepare_qat needs a model in training mode, got Sequential with training=False; call model.train() first
    """
    if not model.training:
        raise ValueError(f"prepare_qat needs a model in training mode, got {type(model).__name__} with "
                         "training=False; call model.train() first")
    mapping = QAT_MODULE_MAPPING if mapping is None else mapping
    if not isinstance(mapping, dict):
        raise ValueError(f"mapping must be a dict from float module types to QAT module types, got {mapping!r}")
    if not inplace:
        model = copy.deepcopy(model)
    model = _adopt_torch_ao_modules(model, torch_ao_equivalents())
    propagate_qconfig_(model)
    if not _has_qconfig(model):
        _warn_no_qconfig(model)
    _swap_all(model, mapping)
    propagate_qconfig_(model)  # as torch.ao's inner prepare: reaches the new QAT modules' children
    _prepare(model, None, set(mapping.values()), None)
    return model
