"""Module fusion: replace ``conv -> bn -> relu`` (and friends) by one module before quantization.

An int8 backend runs conv + BN + ReLU as one kernel with one output quantization, so the float
model must be reshaped the same way before observers are attached: otherwise the observer would
sit after the conv, where the int8 model has no tensor at all.

* ``fuse_modules`` (**eval** mode, for PTQ or inference): BatchNorm is *folded* into the weights
  with its running statistics (``minqat.fold``, bit-exact with ``torch.nn.utils.fusion``)::

      W_f = W * (γ * rsqrt(σ² + ε))       b_f = ((b − μ) * rsqrt(σ² + ε)) * γ + β

  ``conv, bn`` becomes a plain conv with ``(W_f, b_f)``; ``conv, bn, relu`` a ``ConvReLU2d``
  container around that conv.
* ``fuse_modules_qat`` (**train** mode, for QAT): nothing is folded yet -- BN still has to learn.
  The modules are grouped in a float container (``minqat.nn.intrinsic.ConvBnReLU2d`` ...) that
  computes exactly what the sequence did; ``prepare_qat`` swaps it for the QAT module that folds BN
  during training (``minqat.nn.intrinsic.qat``).

The first name of each group receives the fused module, the others become ``nn.Identity`` (the
model's ``forward`` keeps calling them). Forward pre-hooks of the first module and forward hooks
of the last one move to the fused module, as in torch.ao. Mirrors
``torch.ao.quantization.fuse_modules`` / ``fuse_modules_qat``; user mistakes raise ``ValueError``
naming the paths (torch.ao raises ``AttributeError`` / ``AssertionError``). Other differences: a new
fused container takes its modules' train/eval mode (torch.ao's is always in train mode); in eval
fusion the conv's pre-hooks run once (torch.ao's deep copy of the conv keeps them too, so they run
twice); BN folding into a grouped ConvTranspose is refused (torch.ao builds a wrongly shaped weight).

>>> m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU()).train()
>>> qat = fuse_modules_qat(m, ["0", "1", "2"])
>>> [type(x).__name__ for x in qat], [type(x).__name__ for x in qat[0]]
(['ConvBnReLU2d', 'Identity', 'Identity'], ['Conv2d', 'BatchNorm2d', 'ReLU'])
>>> fuse_modules(m.eval(), ["0", "1"])[0]                  # BN folded into the conv
Conv2d(1, 2, kernel_size=(3, 3), stride=(1, 1))
"""
from __future__ import annotations

import copy
from typing import Callable, Sequence

from torch import nn
from torch.nn.utils.parametrize import type_before_parametrizations

from .fold import fuse_conv_bn_weights, fuse_linear_bn_weights
from .nn.intrinsic import fused

__all__ = ["fuse_modules", "fuse_modules_qat", "fuse_known_modules", "FUSION_PATTERNS"]

Fuser = Callable[..., nn.Module]  # fuser(is_qat, *modules) -> fused module (torch.ao's signature)

_CONV_BN_QAT = {nn.Conv1d: fused.ConvBn1d, nn.Conv2d: fused.ConvBn2d, nn.Conv3d: fused.ConvBn3d}
_CONV_BN_RELU_QAT = {nn.Conv1d: fused.ConvBnReLU1d, nn.Conv2d: fused.ConvBnReLU2d, nn.Conv3d: fused.ConvBnReLU3d}
_CONV_RELU = {nn.Conv1d: fused.ConvReLU1d, nn.Conv2d: fused.ConvReLU2d, nn.Conv3d: fused.ConvReLU3d}


def _check_same_mode(*mods: nn.Module) -> None:
    if len({m.training for m in mods}) > 1:
        modes = ", ".join(f"{type(m).__name__} {'train' if m.training else 'eval'}" for m in mods)
        raise ValueError(f"the modules must all be in train mode or all in eval mode, got {modes}")


def _check_foldable_bn(bn: nn.Module, out_channels: int, need_affine: bool) -> None:
    """BN must match the layer's outputs and carry what folding reads (running stats; γ, β)."""
    name = type(bn).__name__
    if bn.num_features != out_channels:
        raise ValueError(f"{name}.num_features must equal the layer's {out_channels} output channels, "
                         f"got {bn.num_features}")
    if need_affine and not bn.affine:
        raise ValueError(f"{name} must have affine=True (γ and β are folded into the weights), "
                         "got affine=False")
    if not bn.track_running_stats or bn.running_mean is None:
        raise ValueError(f"{name} must have track_running_stats=True (its running statistics are folded "
                         "into the weights), got track_running_stats=False")


def _check_eval(*mods: nn.Module) -> None:
    if any(m.training for m in mods):
        raise ValueError("fuse_modules folds BatchNorm with its running statistics, so it needs a model in "
                         "eval mode (call model.eval() first), or use fuse_modules_qat for training")


def _fold_conv(conv: nn.Module, bn: nn.Module, transpose: bool = False) -> nn.Module:
    """A copy of ``conv`` with ``bn`` folded in (torch.nn.utils.fusion.fuse_conv_bn_eval)."""
    folded = copy.deepcopy(conv)
    folded._forward_pre_hooks.clear()  # they move to the fused module (torch.ao would run them twice)
    folded.weight, folded.bias = fuse_conv_bn_weights(folded.weight, folded.bias, bn.running_mean,
                                                      bn.running_var, bn.eps, bn.weight, bn.bias, transpose)
    return folded


def fuse_conv_bn(is_qat: bool, conv: nn.Module, bn: nn.Module) -> nn.Module:
    """QAT: ``ConvBnNd(conv, bn)``; eval: a copy of ``conv`` with ``bn`` folded into its weights."""
    _check_same_mode(conv, bn)
    _check_foldable_bn(bn, conv.out_channels, need_affine=is_qat)
    if is_qat:
        return _CONV_BN_QAT[type_before_parametrizations(conv)](conv, bn)
    _check_eval(conv, bn)
    return _fold_conv(conv, bn)


def fuse_conv_bn_relu(is_qat: bool, conv: nn.Module, bn: nn.Module, relu: nn.Module) -> nn.Module:
    """QAT: ``ConvBnReLUNd(conv, bn, relu)``; eval: ``ConvReLUNd(conv with bn folded, relu)``."""
    _check_same_mode(conv, bn, relu)
    _check_foldable_bn(bn, conv.out_channels, need_affine=is_qat)
    conv_type = type_before_parametrizations(conv)
    if is_qat:
        return _CONV_BN_RELU_QAT[conv_type](conv, bn, relu)
    _check_eval(conv, bn)
    return _CONV_RELU[conv_type](_fold_conv(conv, bn), relu)


def fuse_linear_bn(is_qat: bool, linear: nn.Module, bn: nn.Module) -> nn.Module:
    """QAT: ``LinearBn1d(linear, bn)``; eval: a copy of ``linear`` with ``bn`` folded in.

    Eval folding also accepts a BN with 1 feature (broadcast), as torch does.
    """
    _check_same_mode(linear, bn)
    broadcast = not is_qat and bn.num_features == 1  # eval folding broadcasts a 1-feature BN
    _check_foldable_bn(bn, 1 if broadcast else linear.out_features, need_affine=True)
    if is_qat:
        return fused.LinearBn1d(linear, bn)
    _check_eval(linear, bn)
    folded = copy.deepcopy(linear)
    folded._forward_pre_hooks.clear()
    folded.weight, folded.bias = fuse_linear_bn_weights(folded.weight, folded.bias, bn.running_mean,
                                                        bn.running_var, bn.eps, bn.weight, bn.bias)
    return folded


def fuse_conv_transpose_bn(is_qat: bool, conv: nn.Module, bn: nn.Module) -> nn.Module:
    """Eval only: a copy of the transposed conv with ``bn`` folded into dim 1 of its weight."""
    _check_same_mode(conv, bn)
    if is_qat:
        raise ValueError("ConvTranspose + BatchNorm cannot be fused for QAT (torch.ao has no QAT module "
                         "for it); fuse it with fuse_modules after training, or leave it unfused")
    if conv.groups != 1:  # torch.ao broadcasts γ/σ into a wrongly shaped weight here
        raise ValueError(f"folding BatchNorm into a grouped {type(conv).__name__} is not supported, "
                         f"got groups={conv.groups}")
    _check_foldable_bn(bn, conv.out_channels, need_affine=is_qat)
    _check_eval(conv, bn)
    return _fold_conv(conv, bn, transpose=True)


def _container(cls: type[fused.FusedModule]) -> Fuser:
    """A fuser that groups the modules in ``cls``, in train and eval mode alike (nothing to fold)."""

    def fuser(is_qat: bool, *mods: nn.Module) -> nn.Module:
        return cls(*mods)

    fuser.__name__ = f"fuse_{cls.__name__}"
    return fuser


# The one pattern table: exact module types, in forward order -> fuser(is_qat, *modules).
FUSION_PATTERNS: dict[tuple[type[nn.Module], ...], Fuser] = {
    (nn.Conv1d, nn.BatchNorm1d): fuse_conv_bn,
    (nn.Conv2d, nn.BatchNorm2d): fuse_conv_bn,
    (nn.Conv3d, nn.BatchNorm3d): fuse_conv_bn,
    (nn.Conv1d, nn.BatchNorm1d, nn.ReLU): fuse_conv_bn_relu,
    (nn.Conv2d, nn.BatchNorm2d, nn.ReLU): fuse_conv_bn_relu,
    (nn.Conv3d, nn.BatchNorm3d, nn.ReLU): fuse_conv_bn_relu,
    (nn.Conv1d, nn.ReLU): _container(fused.ConvReLU1d),
    (nn.Conv2d, nn.ReLU): _container(fused.ConvReLU2d),
    (nn.Conv3d, nn.ReLU): _container(fused.ConvReLU3d),
    (nn.Linear, nn.BatchNorm1d): fuse_linear_bn,
    (nn.Linear, nn.ReLU): _container(fused.LinearReLU),
    (nn.BatchNorm2d, nn.ReLU): _container(fused.BNReLU2d),
    (nn.BatchNorm3d, nn.ReLU): _container(fused.BNReLU3d),
    (nn.ConvTranspose1d, nn.BatchNorm1d): fuse_conv_transpose_bn,
    (nn.ConvTranspose2d, nn.BatchNorm2d): fuse_conv_transpose_bn,
    (nn.ConvTranspose3d, nn.BatchNorm3d): fuse_conv_transpose_bn,
}


def _pattern_list() -> str:
    return "; ".join("(" + ", ".join(t.__name__ for t in types) + ")" for types in FUSION_PATTERNS)


def _move_hooks(src: nn.Module, dst: nn.Module, pre: bool) -> None:
    """Move ``src``'s forward (pre-)hooks to ``dst``, keeping their ``with_kwargs`` flavour."""
    hooks = src._forward_pre_hooks if pre else src._forward_hooks
    with_kwargs = src._forward_pre_hooks_with_kwargs if pre else src._forward_hooks_with_kwargs
    for handle_id, hook in hooks.items():
        if pre:
            dst.register_forward_pre_hook(hook, with_kwargs=handle_id in with_kwargs)
        else:
            always = handle_id in src._forward_hooks_always_called
            dst.register_forward_hook(hook, with_kwargs=handle_id in with_kwargs, always_call=always)
    hooks.clear()
    with_kwargs.clear()


def fuse_known_modules(mod_list: Sequence[nn.Module], is_qat: bool,
                       additional_fuser_method_mapping: dict | None = None) -> list[nn.Module]:
    """Fuse one group: ``[fused, Identity, ...]`` of the same length as ``mod_list``.

    The fuser is looked up by the exact types of the modules (``FUSION_PATTERNS``, then
    ``additional_fuser_method_mapping``, which wins). Pre-hooks of the first module and forward
    hooks of the last one move to the fused module; each ``Identity`` takes the first module's mode.

    >>> out = fuse_known_modules([nn.Linear(2, 3), nn.ReLU()], is_qat=True)
    >>> [type(m).__name__ for m in out]
    ['LinearReLU', 'Identity']
    """
    types = tuple(type_before_parametrizations(m) for m in mod_list)
    fuser = {**FUSION_PATTERNS, **(additional_fuser_method_mapping or {})}.get(types)
    if fuser is None:
        got = ", ".join(t.__name__ for t in types)
        raise ValueError(f"no fusion pattern for ({got}); supported patterns: {_pattern_list()}")
    fused_mod = fuser(is_qat, *mod_list)
    if isinstance(fused_mod, fused.FusedModule):
        fused_mod.training = mod_list[0].training  # torch.ao leaves a new container in train mode
    if fused_mod is not mod_list[0]:
        _move_hooks(mod_list[0], fused_mod, pre=True)
    if fused_mod is not mod_list[-1]:
        _move_hooks(mod_list[-1], fused_mod, pre=False)
    identities = [nn.Identity().train(mod_list[0].training) for _ in mod_list[1:]]
    return [fused_mod, *identities]


def _resolve(model: nn.Module, path: str) -> tuple[nn.Module, str, nn.Module]:
    """``(parent, last name, module)`` for a dotted path such as ``'layer1.0.conv1'``."""
    if not isinstance(path, str) or not path:
        raise ValueError(f"modules_to_fuse must hold dotted submodule names such as 'layer1.0.conv1', got {path!r}")
    parent, parent_path = model, ""
    tokens = path.split(".")
    for i, token in enumerate(tokens):
        child = parent._modules.get(token)
        if child is None:
            where = f"'{parent_path}'" if parent_path else "the model"
            children = ", ".join(repr(n) for n in parent._modules) or "none"
            raise ValueError(f"modules_to_fuse names '{path}', but {where} ({type(parent).__name__}) has no "
                             f"submodule {token!r}; its children are: {children}")
        if i < len(tokens) - 1:
            parent, parent_path = child, ".".join(tokens[: i + 1])
    return parent, tokens[-1], child


def _fuse_group(model: nn.Module, paths: Sequence[str], is_qat: bool, fuser_func, custom: dict) -> None:
    if len(paths) == 0:
        raise ValueError("modules_to_fuse must not contain an empty group")
    located = [_resolve(model, p) for p in paths]
    mods = [mod for _, _, mod in located]
    described = ", ".join(f"'{p}' ({type(m).__name__})" for p, m in zip(paths, mods))
    try:
        new_mods = fuser_func(mods, is_qat, custom.get("additional_fuser_method_mapping", {}))
    except ValueError as err:
        raise ValueError(f"cannot fuse {described}: {err}") from err
    if len(new_mods) != len(mods):
        raise ValueError(f"fuser_func must return one module per input module ({len(mods)}), got {len(new_mods)}")
    for (parent, name, _), new in zip(located, new_mods):
        setattr(parent, name, new)


def _fuse(model, modules_to_fuse, is_qat, inplace, fuser_func, fuse_custom_config_dict) -> nn.Module:
    if isinstance(modules_to_fuse, str) or not isinstance(modules_to_fuse, Sequence) or not modules_to_fuse:
        raise ValueError("modules_to_fuse must be a non-empty list of names or a list of lists of names, "
                         f"e.g. [['conv', 'bn', 'relu']], got {modules_to_fuse!r}")
    if not inplace:
        model = copy.deepcopy(model)
    fuser_func = fuse_known_modules if fuser_func is None else fuser_func
    custom = fuse_custom_config_dict or {}
    groups = [modules_to_fuse] if all(isinstance(p, str) for p in modules_to_fuse) else modules_to_fuse
    for group in groups:
        if isinstance(group, str) or not isinstance(group, Sequence):
            raise ValueError(f"modules_to_fuse: every group must be a list of names, got {group!r}")
        _fuse_group(model, group, is_qat, fuser_func, custom)
    return model


def fuse_modules(model: nn.Module, modules_to_fuse, inplace: bool = False, fuser_func=None,
                 fuse_custom_config_dict: dict | None = None) -> nn.Module:
    """Fuse groups of an **eval**-mode model, folding BatchNorm into the conv/linear weights.

    Args:
        model: the model; copied unless ``inplace``.
        modules_to_fuse: ``['conv', 'bn', 'relu']`` or a list of such lists; dotted names
            (``'layer1.0.conv1'``) reach nested modules. Patterns: ``FUSION_PATTERNS``.
        inplace: modify ``model`` itself.
        fuser_func: ``fuser_func(mod_list, is_qat, additional_fuser_method_mapping)`` returning the
            replacement list; default ``fuse_known_modules``.
        fuse_custom_config_dict: ``{"additional_fuser_method_mapping": {(types...): fuser}}`` with
            fusers ``fuser(is_qat, *modules)``.

    >>> m = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).eval()
    >>> [type(x).__name__ for x in fuse_modules(m, [["0", "1"]])]
    ['Linear', 'Identity']
    """
    return _fuse(model, modules_to_fuse, False, inplace, fuser_func, fuse_custom_config_dict)


def fuse_modules_qat(model: nn.Module, modules_to_fuse, inplace: bool = False, fuser_func=None,
                     fuse_custom_config_dict: dict | None = None) -> nn.Module:
    """Group modules of a **train**-mode model into float fused containers for ``prepare_qat``.

    Same arguments as ``fuse_modules``. Nothing is folded: ``conv, bn, relu`` becomes
    ``minqat.nn.intrinsic.ConvBnReLU2d(conv, bn, relu)`` holding the very same modules. Like
    torch.ao it also accepts an eval-mode model (``prepare_qat`` then asks for train mode).
    """
    return _fuse(model, modules_to_fuse, True, inplace, fuser_func, fuse_custom_config_dict)
