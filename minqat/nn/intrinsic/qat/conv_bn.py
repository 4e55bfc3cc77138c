r"""Fused QAT Conv + BatchNorm (+ ReLU): BN folded into the fake-quantized weight during training.

Why fold during training. After training, ``convert`` folds BN into the conv (``minqat.fold``):

.. code-block:: text

    BN(conv(x)) = γ · (W * x + b − μ) / sqrt(σ² + ε) + β  =  (W · γ/σ) * x + (b − μ) · γ/σ + β

so the int8 kernel runs with the weight ``W · γ/σ``, and that — not ``W`` — is the tensor whose
quantization error training must see. QAT therefore fake-quantizes the *scaled* weight
(Jacob et al. 2018 §3.2; Krishnamoorthi 2018, "Quantizing deep convolutional networks for efficient
inference", §3.2.2).

Approximate path (the default, numerics.md §5.2). Training BN normalises with the *batch*
statistics, which exist only after the conv has run; the weight is scaled with the *running*
ones instead, ``f = γ / σ_r`` with ``σ_r = sqrt(σ²_r + ε)``:

.. code-block:: text

    W_hat = weight_fake_quant(W · f)          per output channel c: W[c] · f[c]
    y     = conv(x, W_hat, 0) / f  (+ b)      divide back: without quantization this is conv(x, W) + b
    z     = bn(y)                             the real BatchNorm: batch statistics, running-stat update
    out   = z  (or relu(z))

Dividing by ``f`` undoes the scaling, so ``bn`` sees (up to the quantization error of the folded
weight) the plain conv output and normalises it with the batch statistics exactly as unfused
training would: the running statistics only choose the weight's scale, and BN's own statistics,
momentum (or cumulative average for ``momentum=None``) and ``eps`` are torch's. γ gets its gradient
through ``bn`` as in unfused training; the path through ``f`` cancels (``(W·f)/f``) up to rounding
and the straight-through mask, so γ is not trained twice. Once BN is frozen (running statistics),
``bn(conv(x, W_hat)/f + b) = conv(x, W_hat) + (b − μ_r)·f + β`` is exactly the folded inference
computation. It is one conv per step, but ``f`` is 0 when γ is 0, and the division then gives inf/NaN.

Exact "slow" path (Krishnamoorthi 2018 §3.2.2, numerics.md §5.3; ``slow_path=True``, the attribute
torch names ``_enable_slow_path_for_better_numerical_stability``). With ``y0 = conv(x, W, 0)``,
batch mean ``m_b`` and biased batch std ``σ_b = sqrt(var_b + ε)`` of ``y0``:

.. code-block:: text

    BN(y0 + b) = γ · (y0 − m_b) / σ_b + β                                (the bias cancels)
               = conv(x, W · γ/σ_r) · (σ_r / σ_b)  +  (β − γ · m_b / σ_b)

Training: run the float conv once for the batch statistics (and, under no_grad, the real ``bn``
on ``y0 + b`` only to update its running stats), then the conv with the fake-quantized
``W · γ/σ_r`` (updated σ_r), rescaled by ``σ_r / σ_b``. The weight is quantized at the running
scale -- the one inference folds, and steadier than the per-batch σ_b -- while the output is
normalised with the batch statistics, as training BN must be. Eval / frozen BN: ``σ_b → σ_r``,
``m_b → μ_r − b``, i.e. exactly the folded inference computation. Nothing is divided by γ, so
γ = 0 stays finite; the price is a second conv per step.

``freeze_bn_stats()`` switches ``bn`` to its running statistics (and stops their updates) while the
rest of the model trains; ``model.train()`` then leaves ``bn`` frozen. Every float op is the one
torch.ao runs, in the same order (``F.convNd``, the ``bn`` module, true division by ``f``), so
outputs and gradients are bit-exact with ``torch.ao.nn.intrinsic.qat.ConvBn2d`` etc.; the
``state_dict`` keys are the same (``weight``, ``bias``, ``bn.*``, ``weight_fake_quant.*``).

>>> from minqat.qconfig import get_default_qat_qconfig
>>> m = ConvBnReLU2d(1, 2, 3, qconfig=get_default_qat_qconfig("fbgemm"))
>>> m(torch.randn(4, 1, 5, 5)).shape
torch.Size([4, 2, 3, 3])
>>> _ = m.apply(freeze_bn_stats)
>>> _ = m.train()                      # the module trains on, its BN stays frozen
>>> m.training, m.bn.training
(True, False)
"""
from __future__ import annotations

import math
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn import init
from torch.nn.modules.utils import _pair, _single, _triple

from ....fold import fuse_conv_bn_weights
from .. import fused

__all__ = [
    "ConvBn1d", "ConvBn2d", "ConvBn3d",
    "ConvBnReLU1d", "ConvBnReLU2d", "ConvBnReLU3d",
    "freeze_bn_stats", "update_bn_stats",
]


def _require_qconfig(qconfig, owner: str):
    if not qconfig:
        raise ValueError(f"qconfig must be provided for the QAT module {owner}, got {qconfig!r}")
    if not callable(getattr(qconfig, "weight", None)):
        raise ValueError(f"qconfig must have a weight() factory (a QConfig) for {owner}, got {qconfig!r}")
    return qconfig


def _check_foldable_bn(bn: nn.Module, out_channels: int, owner: str, what: str = "the conv's out_channels") -> None:
    """The float BN must be foldable: affine, tracking running stats, one feature per output channel."""
    if bn.num_features != out_channels:
        raise ValueError(f"{owner}: mod[1].num_features must equal {what} ({out_channels}), got {bn.num_features}")
    if not bn.affine:
        raise ValueError(f"{owner}: mod[1] must have affine=True (γ and β are folded into the conv), "
                         "got affine=False")
    if not bn.track_running_stats:
        raise ValueError(f"{owner}: mod[1] must have track_running_stats=True (the running statistics "
                         "are folded into the weights), got track_running_stats=False")


class _ConvBnNd(nn.modules.conv._ConvNd):
    """Conv + BN (+ ReLU) for QAT; the subclasses only fix the dimension and the float classes."""

    _FLOAT_MODULE: ClassVar[type[fused.FusedModule]]  # what from_float accepts
    _FLOAT_CONV_MODULE: ClassVar[type[nn.Module]]
    _FLOAT_BN_MODULE: ClassVar[type[nn.Module]]
    _FLOAT_RELU_MODULE: ClassVar[type[nn.Module] | None] = None  # nn.ReLU in ConvBnReLU*
    _FUSED_FLOAT_MODULE: ClassVar[type[fused.FusedModule] | None] = None  # to_float's conv-relu
    _ntuple: ClassVar[Callable]  # _single / _pair / _triple

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool | None = None, padding_mode: str = "zeros",
                 eps: float = 1e-05, momentum: float | None = 0.1, freeze_bn: bool = False,
                 qconfig=None, *, slow_path: bool = False):
        n = type(self)._ntuple
        # Same construction order as torch.ao (so the same seed gives the same initial values):
        # conv weight (kaiming), bn, weight fake quant, conv bias, then γ ~ U(0, 1) and the bias.
        nn.modules.conv._ConvNd.__init__(self, in_channels, out_channels, n(kernel_size), n(stride),
                                         n(padding), n(dilation), False, n(0), groups, False, padding_mode)
        self.qconfig = _require_qconfig(qconfig, type(self).__name__)
        self.freeze_bn = freeze_bn
        self.bn = self._FLOAT_BN_MODULE(out_channels, eps, momentum, True, True)  # affine, running stats
        self.weight_fake_quant = self.qconfig.weight()
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels))
        else:
            self.register_parameter("bias", None)
        self.reset_bn_parameters()
        if freeze_bn:
            self.freeze_bn_stats()
        else:
            self.update_bn_stats()
        self._enable_slow_path_for_better_numerical_stability = bool(slow_path)

    @property
    def slow_path(self) -> bool:
        """Use the exact batch-statistics path (finite for γ = 0, two convs per training step)."""
        return self._enable_slow_path_for_better_numerical_stability

    @slow_path.setter
    def slow_path(self, value: bool) -> None:
        self._enable_slow_path_for_better_numerical_stability = bool(value)

    def reset_running_stats(self) -> None:
        self.bn.reset_running_stats()

    def reset_bn_parameters(self) -> None:
        """Running stats to (0, 1), γ ~ U(0, 1), β = 0, and the conv bias ~ U(±1/sqrt(fan_in))."""
        self.bn.reset_running_stats()
        init.uniform_(self.bn.weight)
        init.zeros_(self.bn.bias)
        if self.bias is not None:  # the conv's bias, initialised like nn.ConvNd's
            fan_in, _ = init._calculate_fan_in_and_fan_out(self.weight)
            bound = 1 / math.sqrt(fan_in)
            init.uniform_(self.bias, -bound, bound)

    def update_bn_stats(self) -> _ConvBnNd:
        """BN normalises with batch statistics and updates its running stats (training default)."""
        self.freeze_bn = False
        self.bn.training = True
        return self

    def freeze_bn_stats(self) -> _ConvBnNd:
        """BN normalises with its running statistics and stops updating them."""
        self.freeze_bn = True
        self.bn.training = False
        return self

    def train(self, mode: bool = True) -> _ConvBnNd:
        """Set training mode; while BN is frozen its children (bn, weight_fake_quant) keep their mode."""
        self.training = mode
        if not self.freeze_bn:
            for module in self.children():
                module.train(mode)
        return self

    # --- forward -----------------------------------------------------------------------------

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self._enable_slow_path_for_better_numerical_stability:
            y = self._forward_slow(input)
        else:
            y = self._forward_approximate(input)
        return F.relu(y) if self._FLOAT_RELU_MODULE is not None else y

    def _shapes(self) -> tuple[list[int], list[int]]:
        """Broadcast shapes of a per-channel factor: on the weight (C,1,1,1), on the output (1,C,1,1)."""
        ones = [1] * self.weight.dim()
        return [-1] + ones[1:], [1, -1] + ones[2:]

    def _conv_scaled_weight(self, input: torch.Tensor, zero_bias: torch.Tensor):
        """``conv(x, weight_fake_quant(W · γ/σ_r), 0)`` with the current running variance."""
        weight_shape, _ = self._shapes()
        running_std = torch.sqrt(self.bn.running_var + self.bn.eps)  # sqrt then divide: numerics §5.2
        scale_factor = self.bn.weight / running_std  # f = γ / σ_r
        scaled_weight = self.weight_fake_quant(self.weight * scale_factor.reshape(weight_shape))
        return self._conv_forward(input, scaled_weight, zero_bias), running_std, scale_factor

    def _zero_bias(self, input: torch.Tensor) -> torch.Tensor:
        # an explicit zero bias, as torch.ao passes (the conv bias is added back later)
        return torch.zeros(self.out_channels, device=self.weight.device, dtype=input.dtype)

    def _forward_approximate(self, input: torch.Tensor) -> torch.Tensor:
        """``bn(conv(x, fq(W·f), 0) / f + b)`` with ``f = γ/σ_r`` from the running stats (§5.2)."""
        _, bias_shape = self._shapes()
        conv, _, scale_factor = self._conv_scaled_weight(input, self._zero_bias(input))
        conv_orig = conv / scale_factor.reshape(bias_shape)  # true division, not * (1/f): numerics §5.2
        if self.bias is not None:
            conv_orig = conv_orig + self.bias.reshape(bias_shape)
        return self.bn(conv_orig)

    def _forward_slow(self, input: torch.Tensor) -> torch.Tensor:
        """Krishnamoorthi 2018 §3.2.2: batch statistics of the float conv, no division by γ (§5.3)."""
        _, bias_shape = self._shapes()
        zero_bias = self._zero_bias(input)
        if self.bn.training:
            conv_out = self._conv_forward(input, self.weight, zero_bias)  # y0 = W * x, (N, C, *spatial)
            with torch.no_grad():  # only to update bn's running stats, before they scale the weight
                self.bn(conv_out if self.bias is None else conv_out + self.bias.reshape(bias_shape))
            conv_bn, running_std, _ = self._conv_scaled_weight(input, zero_bias)
            avg_dims = [0] + list(range(2, self.weight.dim()))
            batch_mean = conv_out.mean(avg_dims)  # m_b, (C,)
            batch_var = torch.square(conv_out - batch_mean.reshape(bias_shape)).mean(avg_dims)  # biased
            batch_std = torch.sqrt(batch_var + self.bn.eps)  # σ_b
            conv_bn *= (running_std / batch_std).reshape(bias_shape)  # W·γ/σ_r -> W·γ/σ_b
            fused_mean, fused_std = batch_mean, batch_std
        else:
            conv_bn, running_std, _ = self._conv_scaled_weight(input, zero_bias)
            fused_mean = self.bn.running_mean if self.bias is None else self.bn.running_mean - self.bias
            fused_std = running_std
        fused_bias = self.bn.bias - self.bn.weight * fused_mean / fused_std  # β − (γ·m)/σ
        conv_bn += fused_bias.reshape(bias_shape)
        if self.bias is not None:  # b − b = 0 keeps the conv bias in the graph (torch.ao, for DDP)
            conv_bn += (self.bias - self.bias).reshape(bias_shape)
        return conv_bn

    # --- conversion --------------------------------------------------------------------------

    @classmethod
    def from_float(cls, mod: nn.Module, use_precomputed_fake_quant: bool = False) -> _ConvBnNd:
        """The QAT module for a float ``conv -> bn (-> relu)`` container, **sharing** its state.

        ``mod`` is minqat's fused container (``minqat.nn.intrinsic.ConvBn2d`` ...) or any
        ``nn.Sequential`` of exactly the same part types -- torch.ao.nn.intrinsic's containers
        included, recognised without importing torch.ao. Its Parameters and BN buffers become this
        module's (an optimizer built on the float model keeps working); BN ``eps`` and ``momentum``
        are copied as they are; ``mod.qconfig`` is required. ``use_precomputed_fake_quant`` is
        accepted for torch.ao's signature and ignored, as there.
        """
        owner = f"{cls.__name__}.from_float"
        if not cls._FLOAT_MODULE.matches(mod):
            want = ", ".join(t.__name__ for t in cls._FLOAT_MODULE.parts)
            raise ValueError(f"{owner} expects a {cls._FLOAT_MODULE.__name__} ({want}), got {type(mod).__name__}")
        qconfig = _require_qconfig(getattr(mod, "qconfig", None), f"{cls.__name__} (from mod.qconfig)")
        conv, bn = mod[0], mod[1]
        _check_foldable_bn(bn, conv.out_channels, owner)
        qat = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                  conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode, bn.eps,
                  bn.momentum, False, qconfig)
        qat.weight, qat.bias = conv.weight, conv.bias  # shared, not copied
        qat.bn.weight, qat.bn.bias = bn.weight, bn.bias
        qat.bn.running_mean, qat.bn.running_var = bn.running_mean, bn.running_var
        qat.bn.num_batches_tracked = bn.num_batches_tracked
        return qat

    def to_float(self) -> nn.Module:
        """A float conv (or conv-relu container) with BN folded in from its running statistics.

        The weights are ``minqat.fold.fuse_conv_bn_weights`` of detached copies (numerics §5.4):
        ``W * (γ * rsqrt(σ²_r + ε))`` -- not bitwise the ``W * (γ / σ_r)`` fake-quantized in training.
        """
        conv = self._FLOAT_CONV_MODULE(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                                       self.padding, self.dilation, self.groups, self.bias is not None,
                                       self.padding_mode)
        conv.weight = nn.Parameter(self.weight.detach())
        if self.bias is not None:
            conv.bias = nn.Parameter(self.bias.detach())
        bn = self.bn
        conv.weight, conv.bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var,
                                                      bn.eps, bn.weight, bn.bias)
        if self._FUSED_FLOAT_MODULE is None:
            conv.train(self.training)
            return conv
        conv_relu = self._FUSED_FLOAT_MODULE(conv, nn.ReLU())
        conv_relu.train(self.training)
        return conv_relu


class ConvBn1d(_ConvBnNd, nn.Conv1d):
    """Conv1d + BatchNorm1d for QAT (input ``(N, C, L)``); see the module docstring."""

    _FLOAT_MODULE = fused.ConvBn1d
    _FLOAT_CONV_MODULE = nn.Conv1d
    _FLOAT_BN_MODULE = nn.BatchNorm1d
    _ntuple = staticmethod(_single)


class ConvBn2d(_ConvBnNd, nn.Conv2d):
    """Conv2d + BatchNorm2d for QAT (input ``(N, C, H, W)``); see the module docstring."""

    _FLOAT_MODULE = fused.ConvBn2d
    _FLOAT_CONV_MODULE = nn.Conv2d
    _FLOAT_BN_MODULE = nn.BatchNorm2d
    _ntuple = staticmethod(_pair)


class ConvBn3d(_ConvBnNd, nn.Conv3d):
    """Conv3d + BatchNorm3d for QAT (input ``(N, C, D, H, W)``); see the module docstring."""

    _FLOAT_MODULE = fused.ConvBn3d
    _FLOAT_CONV_MODULE = nn.Conv3d
    _FLOAT_BN_MODULE = nn.BatchNorm3d
    _ntuple = staticmethod(_triple)


class ConvBnReLU1d(ConvBn1d):
    """``relu(ConvBn1d(x))``; ``to_float`` gives ``minqat.nn.intrinsic.ConvReLU1d``."""

    _FLOAT_MODULE = fused.ConvBnReLU1d
    _FLOAT_RELU_MODULE = nn.ReLU
    _FUSED_FLOAT_MODULE = fused.ConvReLU1d


class ConvBnReLU2d(ConvBn2d):
    """``relu(ConvBn2d(x))``; ``to_float`` gives ``minqat.nn.intrinsic.ConvReLU2d``."""

    _FLOAT_MODULE = fused.ConvBnReLU2d
    _FLOAT_RELU_MODULE = nn.ReLU
    _FUSED_FLOAT_MODULE = fused.ConvReLU2d


class ConvBnReLU3d(ConvBn3d):
    """``relu(ConvBn3d(x))``; ``to_float`` gives ``minqat.nn.intrinsic.ConvReLU3d``."""

    _FLOAT_MODULE = fused.ConvBnReLU3d
    _FLOAT_RELU_MODULE = nn.ReLU
    _FUSED_FLOAT_MODULE = fused.ConvReLU3d


# --- helpers for model.apply -------------------------------------------------------------------


def freeze_bn_stats(mod: nn.Module) -> None:
    """``model.apply(freeze_bn_stats)``: every fused conv-BN switches BN to its running statistics.

    Like torch.ao's helper it acts on the conv-BN modules only; call ``LinearBn1d.freeze_bn_stats()``
    directly.
    """
    if isinstance(mod, _ConvBnNd):
        mod.freeze_bn_stats()


def update_bn_stats(mod: nn.Module) -> None:
    """``model.apply(update_bn_stats)``: every fused conv-BN goes back to batch statistics."""
    if isinstance(mod, _ConvBnNd):
        mod.update_bn_stats()
