"""Which float module becomes which QAT module, and which modules get an output observer.

Three explicit tables, no registries:

* ``QAT_MODULE_MAPPING`` -- the one float -> QAT swap table that ``prepare_qat`` uses (pass your own
  ``mapping=`` to change it). Every QAT class builds itself from the float module with
  ``from_float(mod)``, reading ``mod.qconfig``.
* ``OBSERVED_LEAF_TYPES`` -- the leaf module types that ``prepare`` gives an output
  ``activation_post_process`` when they have a qconfig (torch.ao's "qconfig propagation list").
* ``torch_ao_equivalents()`` -- torch.ao's own ``QuantStub``, ``DeQuantStub``, ``QuantWrapper``,
  ``FloatFunctional`` and fused float containers -> minqat's twins, so models written for torch.ao
  prepare with minqat unchanged and come out holding minqat classes only.

minqat never imports ``torch.ao`` (it is deprecated upstream and is only the tests' oracle). Its
classes are therefore looked up in ``sys.modules``: if the user's code (or torch itself, which
torch 2.x does on ``import torch``) has imported them, the user's model may contain them and they
are found; if not, the model cannot contain them and nothing is needed.

Deliberate difference from torch 2.13's ``get_default_qat_module_mappings()``: minqat also maps
``nn.Conv1d`` -> ``Conv1d`` and ``ConvReLU1d`` -> its QAT twin. torch.ao has these QAT classes but
leaves them out of its default table, so its QAT trains 1-d convolutions with float weights (only
``convert`` quantizes them). Pass ``mapping=`` without these two entries to reproduce torch.ao.

>>> QAT_MODULE_MAPPING[nn.Conv2d].__module__
'minqat.nn.qat.conv'
>>> QAT_MODULE_MAPPING[fused.ConvBnReLU2d].__name__
'ConvBnReLU2d'
"""
from __future__ import annotations

import sys

from torch import nn

from . import stubs
from .nn import qat as nnqat
from .nn.intrinsic import fused
from .nn.intrinsic.qat.conv_bn import ConvBn1d, ConvBn2d, ConvBn3d, ConvBnReLU1d, ConvBnReLU2d, ConvBnReLU3d
from .nn.intrinsic.qat.conv_relu import ConvReLU1d, ConvReLU2d, ConvReLU3d
from .nn.intrinsic.qat.linear_bn import LinearBn1d
from .nn.intrinsic.qat.linear_relu import LinearReLU
from .stubs import DeQuantStub, FloatFunctional, QuantStub

__all__ = [
    "QAT_MODULE_MAPPING",
    "OBSERVED_LEAF_TYPES",
    "get_qat_module_mapping",
    "torch_ao_equivalents",
    "is_fused_container",
    "is_float_functional",
]

# float module type -> QAT module type (torch.ao's DEFAULT_QAT_MODULE_MAPPINGS + Conv1d, ConvReLU1d)
QAT_MODULE_MAPPING: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv1d: nnqat.Conv1d,
    nn.Conv2d: nnqat.Conv2d,
    nn.Conv3d: nnqat.Conv3d,
    nn.Linear: nnqat.Linear,
    nn.modules.linear.NonDynamicallyQuantizableLinear: nnqat.Linear,  # MultiheadAttention.out_proj
    # fused float containers (made by fuse_modules_qat) -> fused QAT modules
    fused.ConvBn1d: ConvBn1d,
    fused.ConvBn2d: ConvBn2d,
    fused.ConvBn3d: ConvBn3d,
    fused.ConvBnReLU1d: ConvBnReLU1d,
    fused.ConvBnReLU2d: ConvBnReLU2d,
    fused.ConvBnReLU3d: ConvBnReLU3d,
    fused.ConvReLU1d: ConvReLU1d,
    fused.ConvReLU2d: ConvReLU2d,
    fused.ConvReLU3d: ConvReLU3d,
    fused.LinearReLU: LinearReLU,
    fused.LinearBn1d: LinearBn1d,
}

# Leaves whose output ``prepare`` observes: torch.ao's get_default_qconfig_propagation_list() (the
# keys of its static, QAT and dynamic mappings), its torch.ao classes replaced by minqat's. nn.LSTM
# is left out: torch.ao swaps it for its own quantizable LSTM (which observes itself) instead.
OBSERVED_LEAF_TYPES: frozenset[type[nn.Module]] = frozenset({
    QuantStub, DeQuantStub, FloatFunctional, nn.Sequential,
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear,
    nn.BatchNorm2d, nn.BatchNorm3d, nn.Dropout, nn.ELU, nn.Embedding, nn.EmbeddingBag, nn.GroupNorm,
    nn.Hardswish, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LayerNorm, nn.LeakyReLU,
    nn.ReLU6, nn.PReLU, nn.GRUCell, nn.LSTMCell, nn.RNNCell, nn.GRU,
    *QAT_MODULE_MAPPING, *QAT_MODULE_MAPPING.values(),
})


def get_qat_module_mapping() -> dict[type[nn.Module], type[nn.Module]]:
    """A copy of ``QAT_MODULE_MAPPING``, safe to edit and pass as ``prepare_qat(mapping=...)``."""
    return dict(QAT_MODULE_MAPPING)


# torch.ao module (where its classes live) -> the names minqat has twins of, in which minqat module
_TORCH_AO_TWINS: tuple[tuple[str, object, tuple[str, ...]], ...] = (
    ("torch.ao.quantization.stubs", stubs, ("QuantStub", "DeQuantStub", "QuantWrapper")),
    ("torch.ao.nn.quantized.modules.functional_modules", stubs, ("FloatFunctional",)),
    ("torch.ao.nn.intrinsic.modules.fused", fused, tuple(n for n in fused.__all__ if n != "FusedModule")),
)


def torch_ao_equivalents() -> dict[type[nn.Module], type[nn.Module]]:
    """torch.ao class -> minqat class, for the torch.ao modules already imported (none imported here).

    >>> {ours.__module__ for ours in torch_ao_equivalents().values()} <= {"minqat.stubs", "minqat.nn.intrinsic.fused"}
    True
    """
    table: dict[type[nn.Module], type[nn.Module]] = {}
    for module_name, ours, names in _TORCH_AO_TWINS:
        theirs = sys.modules.get(module_name)
        if theirs is None:
            continue
        for name in names:
            cls = getattr(theirs, name, None)
            if isinstance(cls, type):
                table[cls] = getattr(ours, name)
    return table


def _torch_ao_class(module_name: str, name: str) -> type | None:
    cls = getattr(sys.modules.get(module_name), name, None)
    return cls if isinstance(cls, type) else None


def is_fused_container(mod: nn.Module) -> bool:
    """A float fused container (minqat's or torch.ao's): observed and swapped as one unit."""
    theirs = _torch_ao_class("torch.ao.nn.intrinsic.modules.fused", "_FusedModule")
    return isinstance(mod, fused.FusedModule) or (theirs is not None and isinstance(mod, theirs))


def is_float_functional(mod: nn.Module) -> bool:
    """minqat's or torch.ao's ``FloatFunctional`` (or a subclass): its ops are observed, not its output."""
    theirs = _torch_ao_class("torch.ao.nn.quantized.modules.functional_modules", "FloatFunctional")
    return isinstance(mod, FloatFunctional) or (theirs is not None and isinstance(mod, theirs))
