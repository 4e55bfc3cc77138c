"""QConfig and the named defaults: which observer / fake quant watches activations and weights.

A :class:`QConfig` holds two *factories* (classes or ``.with_args(...)`` partials): ``activation``
builds the module that observes a layer's output, ``weight`` the one that observes its weight.
Preparation calls each factory once per layer. The defaults below carry torch 2.13's exact
settings (numerics.md §3.4, §4.3), validated against torch.ao in ``tests/test_qconfig.py``:

============================  ======================================  =======================================
``get_default_qat_qconfig``   activation                              weight
============================  ======================================  =======================================
x86 / fbgemm, version 1       fused, uint8 affine, [0, 127]           fused, int8 per-channel symmetric
x86 / fbgemm, version 0       FakeQuantize, uint8 affine, [0, 127]    FakeQuantize, int8 per-channel symmetric
qnnpack, version 1 / 0        fused / FakeQuantize, uint8 [0, 255]    fused / FakeQuantize, int8 per-tensor symm.
onednn, version 1 / 0         fused / FakeQuantize, uint8 [0, 255]    fused / FakeQuantize, int8 per-channel symm.
============================  ======================================  =======================================

Every fake quant uses a moving-average min/max observer with ``averaging_constant = 0.01`` --
the weight ones too: torch's docstrings call them "memoryless", but they never pass
``averaging_constant=1`` (§3.4). ``[0, 127]`` is the custom range [0, 255] halved by ``reduce_range``
(fbgemm's int16 accumulation on CPUs without VNNI, §7.2). ``eps = 2**-23`` everywhere except the
``*_range_neg_127_to_127`` and symmetric-qnnpack variants (``2**-12``).

**torch's default (version 1) trains with other qparams than it converts with.** Its fused module
computes the training qparams with fbgemm's formula (``minqat/qparams_fbgemm.py``), while its
``calculate_qparams()`` -- which ``convert`` calls -- uses the Python observer formula
(``minqat/qparams.py``): the int8 model gets different scales than the ones trained with (every
symmetric weight scale differs; one-signed weight channels even train with a non-zero zero point).
minqat reproduces this here exactly, for parity; the convert step adds a consistent mode.

PTQ (``get_default_qconfig``) uses ``HistogramObserver`` for activations and per-channel min/max
observers for weights (per-tensor for qnnpack), as torch does.

>>> qconfig = get_default_qat_qconfig("x86")
>>> act, weight = qconfig.activation(), qconfig.weight()
>>> type(act).__name__, act.quant_min, act.quant_max, weight.qscheme
('FusedMovingAvgObsFakeQuantize', 0, 127, torch.per_channel_symmetric)
"""
from __future__ import annotations

from collections import namedtuple

import torch
from torch import nn

from .fake_quantize import FakeQuantize, FusedMovingAvgObsFakeQuantize
from .histogram import HistogramObserver
from .observers import (
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    PerChannelMinMaxObserver,
)

__all__ = [
    "QConfig",
    "BACKENDS",
    "get_default_qconfig",
    "get_default_qat_qconfig",
    # observers (PTQ)
    "default_observer",
    "default_weight_observer",
    "default_per_channel_weight_observer",
    "default_histogram_observer",
    "weight_observer_range_neg_127_to_127",
    "per_channel_weight_observer_range_neg_127_to_127",
    # fake quants (QAT)
    "default_fake_quant",
    "default_weight_fake_quant",
    "default_per_channel_weight_fake_quant",
    "default_histogram_fake_quant",
    "default_fused_act_fake_quant",
    "default_fused_wt_fake_quant",
    "default_fused_per_channel_wt_fake_quant",
    "fused_wt_fake_quant_range_neg_127_to_127",
    "fused_per_channel_wt_fake_quant_range_neg_127_to_127",
    # qconfigs
    "default_qconfig",
    "default_per_channel_qconfig",
    "default_qat_qconfig",
    "default_qat_qconfig_v2",
    "default_weight_only_qconfig",
    "default_activation_only_qconfig",
    "default_symmetric_qnnpack_qconfig",
    "default_per_channel_symmetric_qnnpack_qconfig",
    "default_symmetric_qnnpack_qat_qconfig",
    "default_per_channel_symmetric_qnnpack_qat_qconfig",
]

BACKENDS = ("x86", "fbgemm", "qnnpack", "onednn")


class QConfig(namedtuple("QConfig", ["activation", "weight"])):
    """``(activation, weight)`` factories; call them to build a fresh observer / fake quant.

    Unpacks like a tuple (``act, weight = qconfig``). Module *instances* are rejected: every layer
    needs its own observer, so pass the class or ``Observer.with_args(...)``.

    >>> qconfig = QConfig(activation=default_fake_quant, weight=default_weight_fake_quant)
    >>> qconfig.weight().qscheme
    torch.per_tensor_symmetric
    >>> QConfig(activation=FakeQuantize(), weight=None)
    Traceback (most recent call last):
    ...
    ValueError: QConfig's activation must be a class or a .with_args(...) factory, got a FakeQuantize instance
    """

    __slots__ = ()

    def __new__(cls, activation, weight):
        for name, factory in (("activation", activation), ("weight", weight)):
            if isinstance(factory, nn.Module):
                kind = type(factory).__name__
                # every layer needs its own observer, so a shared instance is a mistake
                raise ValueError(
                    f"QConfig's {name} must be a class or a .with_args(...) factory, got a {kind} instance")
            if factory is not None and not callable(factory):
                raise ValueError(f"QConfig's {name} must be callable or None, got {factory!r}")
        return super().__new__(cls, activation, weight)


# --- observers for post-training quantization (torch.ao.quantization.observer) ---------------------
default_observer = MinMaxObserver.with_args(quant_min=0, quant_max=127)
default_weight_observer = MinMaxObserver.with_args(dtype=torch.int8, qscheme=torch.per_tensor_symmetric)
default_per_channel_weight_observer = PerChannelMinMaxObserver.with_args(
    dtype=torch.int8, qscheme=torch.per_channel_symmetric)
default_histogram_observer = HistogramObserver.with_args(quant_min=0, quant_max=127)
weight_observer_range_neg_127_to_127 = MinMaxObserver.with_args(
    dtype=torch.int8, qscheme=torch.per_tensor_symmetric, quant_min=-127, quant_max=127, eps=2**-12)
per_channel_weight_observer_range_neg_127_to_127 = PerChannelMinMaxObserver.with_args(
    dtype=torch.int8, qscheme=torch.per_channel_symmetric, quant_min=-127, quant_max=127, eps=2**-12)

# --- fake quants for QAT (torch.ao.quantization.fake_quantize); averaging_constant is 0.01 in all --
default_fake_quant = FakeQuantize.with_args(
    observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255, dtype=torch.uint8,
    qscheme=torch.per_tensor_affine, reduce_range=True)  # -> [0, 127]
default_weight_fake_quant = FakeQuantize.with_args(
    observer=MovingAverageMinMaxObserver, quant_min=-128, quant_max=127, dtype=torch.int8,
    qscheme=torch.per_tensor_symmetric, reduce_range=False)
default_per_channel_weight_fake_quant = FakeQuantize.with_args(
    observer=MovingAveragePerChannelMinMaxObserver, quant_min=-128, quant_max=127, dtype=torch.int8,
    qscheme=torch.per_channel_symmetric, reduce_range=False, ch_axis=0)
default_histogram_fake_quant = FakeQuantize.with_args(
    observer=HistogramObserver, quant_min=0, quant_max=255, dtype=torch.uint8,
    qscheme=torch.per_tensor_affine, reduce_range=True)
default_fused_act_fake_quant = FusedMovingAvgObsFakeQuantize.with_args(
    observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255, dtype=torch.uint8)
default_fused_wt_fake_quant = FusedMovingAvgObsFakeQuantize.with_args(
    observer=MovingAverageMinMaxObserver, quant_min=-128, quant_max=127, dtype=torch.int8,
    qscheme=torch.per_tensor_symmetric)
default_fused_per_channel_wt_fake_quant = FusedMovingAvgObsFakeQuantize.with_args(
    observer=MovingAveragePerChannelMinMaxObserver, quant_min=-128, quant_max=127, dtype=torch.int8,
    qscheme=torch.per_channel_symmetric)
fused_wt_fake_quant_range_neg_127_to_127 = FusedMovingAvgObsFakeQuantize.with_args(
    observer=MovingAverageMinMaxObserver, quant_min=-127, quant_max=127, dtype=torch.int8,
    qscheme=torch.per_tensor_symmetric, eps=2**-12)
fused_per_channel_wt_fake_quant_range_neg_127_to_127 = FusedMovingAvgObsFakeQuantize.with_args(
    observer=MovingAveragePerChannelMinMaxObserver, quant_min=-127, quant_max=127, dtype=torch.int8,
    qscheme=torch.per_channel_symmetric, eps=2**-12)

# --- qconfigs ------------------------------------------------------------------------------------
default_qconfig = QConfig(activation=default_observer, weight=default_weight_observer)
default_per_channel_qconfig = QConfig(activation=default_observer, weight=default_per_channel_weight_observer)
default_qat_qconfig = QConfig(activation=default_fake_quant, weight=default_weight_fake_quant)
default_qat_qconfig_v2 = QConfig(activation=default_fused_act_fake_quant, weight=default_fused_wt_fake_quant)
default_weight_only_qconfig = QConfig(activation=nn.Identity, weight=default_weight_fake_quant)
default_activation_only_qconfig = QConfig(activation=default_fake_quant, weight=nn.Identity)

_symmetric_int8_histogram = HistogramObserver.with_args(dtype=torch.int8, reduce_range=False, eps=2**-12)
default_symmetric_qnnpack_qconfig = QConfig(
    activation=_symmetric_int8_histogram, weight=weight_observer_range_neg_127_to_127)
default_per_channel_symmetric_qnnpack_qconfig = QConfig(
    activation=_symmetric_int8_histogram, weight=per_channel_weight_observer_range_neg_127_to_127)
_symmetric_int8_fused_act = FusedMovingAvgObsFakeQuantize.with_args(
    observer=MovingAverageMinMaxObserver, quant_min=-128, quant_max=127, dtype=torch.int8, reduce_range=False,
    eps=2**-12)
default_symmetric_qnnpack_qat_qconfig = QConfig(
    activation=_symmetric_int8_fused_act, weight=fused_wt_fake_quant_range_neg_127_to_127)
default_per_channel_symmetric_qnnpack_qat_qconfig = QConfig(
    activation=_symmetric_int8_fused_act, weight=fused_per_channel_wt_fake_quant_range_neg_127_to_127)


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(repr(b) for b in BACKENDS)}, got {backend!r}")
    return backend


def get_default_qconfig(backend: str = "x86", version: int = 0) -> QConfig:
    """torch's default post-training qconfig for ``backend`` (only ``version=0`` exists).

    Activations: ``HistogramObserver`` on uint8, ``reduce_range`` for x86/fbgemm (-> [0, 127]).
    Weights: per-channel symmetric int8 min/max, per-tensor for qnnpack.

    >>> get_default_qconfig("qnnpack").weight().qscheme
    torch.per_tensor_symmetric
    """
    _check_backend(backend)
    if version != 0:
        raise ValueError(f"version must be 0 for get_default_qconfig, got {version!r}")
    reduce_range = backend in ("x86", "fbgemm")
    weight = default_weight_observer if backend == "qnnpack" else default_per_channel_weight_observer
    return QConfig(activation=HistogramObserver.with_args(reduce_range=reduce_range), weight=weight)


def get_default_qat_qconfig(backend: str = "x86", version: int = 1) -> QConfig:
    """torch's default QAT qconfig for ``backend``; ``version=1`` (the default) uses the fused modules.

    Activations: uint8 affine on the custom range [0, 255], halved to [0, 127] by ``reduce_range``
    for x86/fbgemm. Weights: int8 symmetric, per channel (per tensor for qnnpack). See the module
    docstring for why version 1 trains and converts with different qparams.

    >>> qconfig = get_default_qat_qconfig("qnnpack", version=0)
    >>> type(qconfig.activation()).__name__, qconfig.activation().quant_max
    ('FakeQuantize', 255)
    """
    _check_backend(backend)
    if version not in (0, 1):
        raise ValueError(f"version must be 0 or 1 for get_default_qat_qconfig, got {version!r}")
    module = FusedMovingAvgObsFakeQuantize if version == 1 else FakeQuantize
    activation = module.with_args(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255,
                                  reduce_range=backend in ("x86", "fbgemm"))
    if backend == "qnnpack":
        weight = default_fused_wt_fake_quant if version == 1 else default_weight_fake_quant
    else:
        weight = default_fused_per_channel_wt_fake_quant if version == 1 else default_per_channel_weight_fake_quant
    return QConfig(activation=activation, weight=weight)
