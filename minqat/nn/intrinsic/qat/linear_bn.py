r"""Fused QAT Linear + BatchNorm1d: BN folded into the fake-quantized weight during training.

The same folding as the conv version (``minqat.nn.intrinsic.qat.conv_bn``, numerics.md §5.2 and
§5.4 last paragraph; Krishnamoorthi 2018 §3.2.2), with ``F.linear`` and per-feature factors:

.. code-block:: text

    f     = γ / sqrt(σ²_r + ε)                   running stats of the previous steps, (out,)
    W_hat = weight_fake_quant(W · f[:, None])    the folded weight that convert will quantize
    y     = linear(x, W_hat, 0) / f  (+ b)       divide back: without quantization = linear(x, W) + b
    z     = bn(y)                                batch statistics in training, running ones when frozen

Dividing by ``f`` hands ``bn`` the plain linear output, so BN trains as it would unfused (its own
statistics, momentum and eps), while the weight's quantization error is the folded weight's. γ = 0
makes ``f`` zero and the division inf/NaN (torch.ao has no slow path for LinearBn1d either).
``to_float()`` folds BN with ``minqat.fold.fuse_linear_bn_weights`` into a plain ``nn.Linear``.

Bit-exact with ``torch.ao.nn.intrinsic.qat.LinearBn1d`` (same ops, same order), same ``state_dict``
keys. Two deliberate differences, neither visible in float32 training from the same state: torch.ao
replaces the initialised linear bias with an *uninitialised* one (``torch.empty``) in its constructor,
minqat keeps nn.Linear's initialised bias (the random draws are the same); and without a linear bias
torch.ao's zero bias is always float32, so its module fails on float64 inputs, while minqat's takes the
input's dtype (same values).

>>> from minqat.qconfig import get_default_qat_qconfig
>>> m = LinearBn1d(3, 2, qconfig=get_default_qat_qconfig("fbgemm"))
>>> m(torch.randn(4, 3)).shape
torch.Size([4, 2])
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import init

from ....fold import fuse_linear_bn_weights
from .. import fused
from .conv_bn import _check_foldable_bn, _require_qconfig

__all__ = ["LinearBn1d"]


class LinearBn1d(nn.Linear):
    """Linear + BatchNorm1d for QAT (input ``(N, in_features)``); see the module docstring."""

    _FLOAT_MODULE = fused.LinearBn1d

    def __init__(self, in_features: int, out_features: int, bias: bool = True, eps: float = 1e-05,
                 momentum: float | None = 0.1, freeze_bn: bool = False, qconfig=None):
        # torch.ao's construction order (the same seed draws the same weight and γ): nn.Linear's
        # init of weight and bias, bn, weight fake quant, then γ ~ U(0, 1).
        nn.Linear.__init__(self, in_features, out_features, bias)
        self.qconfig = _require_qconfig(qconfig, type(self).__name__)
        self.freeze_bn = freeze_bn
        self.bn = nn.BatchNorm1d(out_features, eps, momentum, True, True)  # affine, running stats
        self.weight_fake_quant = self.qconfig.weight()
        self.reset_bn_parameters()
        if freeze_bn:
            self.freeze_bn_stats()
        else:
            self.update_bn_stats()

    def reset_running_stats(self) -> None:
        self.bn.reset_running_stats()

    def reset_bn_parameters(self) -> None:
        """Running stats to (0, 1), γ ~ U(0, 1), β = 0."""
        self.bn.reset_running_stats()
        init.uniform_(self.bn.weight)
        init.zeros_(self.bn.bias)

    def update_bn_stats(self) -> LinearBn1d:
        """BN normalises with batch statistics and updates its running stats (training default)."""
        self.freeze_bn = False
        self.bn.training = True
        return self

    def freeze_bn_stats(self) -> LinearBn1d:
        """BN normalises with its running statistics and stops updating them."""
        self.freeze_bn = True
        self.bn.training = False
        return self

    def train(self, mode: bool = True) -> LinearBn1d:
        """Set training mode; while BN is frozen its children (bn, weight_fake_quant) keep their mode."""
        self.training = mode
        if not self.freeze_bn:
            for module in self.children():
                module.train(mode)
        return self

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """``bn(linear(x, fq(W·f), 0) / f + b)`` with ``f = γ/σ_r`` from the running stats."""
        running_std = torch.sqrt(self.bn.running_var + self.bn.eps)  # sqrt then divide: numerics §5.2
        scale_factor = self.bn.weight / running_std  # f, (out,)
        scaled_weight = self.weight_fake_quant(self.weight * scale_factor.reshape(-1, 1))  # (out, in)
        zero_bias = torch.zeros(self.out_features, device=self.weight.device, dtype=input.dtype)
        linear_out = nn.functional.linear(input, scaled_weight, zero_bias)  # (N, out)
        linear_out_orig = linear_out / scale_factor.reshape(1, -1)  # true division: numerics §5.2
        if self.bias is not None:
            linear_out_orig = linear_out_orig + self.bias.reshape(1, -1)
        return self.bn(linear_out_orig)

    @classmethod
    def from_float(cls, mod: nn.Module, use_precomputed_fake_quant: bool = False) -> LinearBn1d:
        """The QAT module for a float ``linear -> bn`` container, **sharing** its state.

        ``mod`` is ``minqat.nn.intrinsic.LinearBn1d`` or any ``nn.Sequential(nn.Linear, nn.BatchNorm1d)``
        (torch.ao.nn.intrinsic's container included); ``mod.qconfig`` is required; BN eps and momentum
        are copied as they are.
        """
        owner = f"{cls.__name__}.from_float"
        if not cls._FLOAT_MODULE.matches(mod):
            raise ValueError(f"{owner} expects a LinearBn1d (Linear, BatchNorm1d), got {type(mod).__name__}")
        qconfig = _require_qconfig(getattr(mod, "qconfig", None), f"{cls.__name__} (from mod.qconfig)")
        linear, bn = mod[0], mod[1]
        _check_foldable_bn(bn, linear.out_features, owner, "the linear's out_features")
        qat = cls(linear.in_features, linear.out_features, linear.bias is not None, bn.eps, bn.momentum,
                  False, qconfig)
        qat.weight, qat.bias = linear.weight, linear.bias  # shared, not copied
        qat.bn.weight, qat.bn.bias = bn.weight, bn.bias
        qat.bn.running_mean, qat.bn.running_var = bn.running_mean, bn.running_var
        qat.bn.num_batches_tracked = bn.num_batches_tracked
        return qat

    def to_float(self) -> nn.Linear:
        """A float ``nn.Linear`` with BN folded in (``fuse_linear_bn_weights``, running statistics)."""
        linear = nn.Linear(self.in_features, self.out_features)
        bn = self.bn
        linear.weight, linear.bias = fuse_linear_bn_weights(self.weight, self.bias, bn.running_mean,
                                                            bn.running_var, bn.eps, bn.weight, bn.bias)
        return linear
