r"""Consistent conversion: deploy exactly what the fake-quant model computed in its last eval forward.

torch.ao's ``convert`` (``minqat.convert`` by default, bit for bit) builds the int8 model from
*fresh* numbers, not from the ones training used (numerics.md §6):

* it folds BatchNorm with ``W · γ · rsqrt(σ² + ε)`` where training scaled ``W · γ / sqrt(σ² + ε)``
  (a few ulp apart on ~31 % of weights, enough to move a weight across a rounding boundary);
* it calls the weight fake quant once more on that folded weight: with its observer enabled that is one
  more moving-average step, so the weight scales move;
* it reads every scale from ``calculate_qparams()`` (the Python observer formula), while torch's default
  fused fake quant trained with fbgemm's ``ChooseQuantizationParams`` (``minqat.qparams_fbgemm``):
  different scales and zero points for the same statistics.

So the int8 weight codes are not the codes the network was trained with, and the int8 model can differ
from its own fake-quant model by several LSB per layer (``minqat.report.compare_layers`` measures it).

``convert(model, consistent=True)`` instead reads the state the fake quants **used** -- their ``scale``
and ``zero_point`` buffers, which every forward writes before fake-quantizing -- and never calls an
observer. For each converted layer:

.. code-block:: text

    f        = γ / sqrt(σ²_r + ε)                      as the QAT forward computes it (ConvBn*, LinearBn1d)
    W_dep    = W · f                                   (W itself without BN)
    W_hat    = weight_fake_quant(W_dep)                with its observer paused: the training codes
    w_int    = rint(W_hat / s_w) + z_w                 exact: W_hat = (w_int − z_w) · s_w by construction
    b_dep    = (b − μ_r) · f + β                       (b without BN; b = 0 if the conv has none)
    s_y, z_y = activation_post_process.scale, .zero_point
    y_int    = clamp(y_int, quant_min, quant_max)      the output fake quant's range (``output_range``)

The last line matters with ``reduce_range``: the fake quant trains on [0, 127] while torch.ao's int8 ops
clamp to uint8's [0, 255]; values above the observed range then differ by many LSB (measured: up to 45 on
a small ResNet). The int8 modules apply ``output_range`` after their kernel.

Then ``w_int`` are exactly the weight codes the last forward used, and (checked at conversion) they
dequantize to exactly ``W_hat``. The int8 layer computes ``conv(x, W_hat) + b_dep`` in exact int32 and
one float32 requantization, while the fake-quant layer computed the same real number in float32 with a
different association (and, for ``ConvBn``, ``conv/f + b`` through ``bn``): the two land on different
integers only where the real result sits within float32 rounding of a rounding boundary, i.e. they differ
by at most 1 LSB (tested over generated models in ``tests/test_consistent.py``).

Requirements (each a ``ValueError`` naming the module): the model is in eval mode (BN normalises with
its running statistics, as the int8 model will); every fake quant has its fake quantization enabled and
has observed at least one batch. Post-training-quantization models (observers, no fake quants) have no
training state to be consistent with: their layers convert exactly as with ``consistent=False``.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .fake_quantize import FakeQuantize, FakeQuantizeBase
from .nn.intrinsic.qat.conv_bn import _ConvBnNd
from .nn.intrinsic.qat.linear_bn import LinearBn1d
from .nn.quantized import conv as qconv
from .nn.quantized import linear as qlinear
from .nn.quantized.common import check_weight_dtype, require_statistics
from .nn.quantized.functional import QFunctional
from .nn.quantized.stubs import DeQuantize, Quantize
from .qparams import PER_CHANNEL_QSCHEMES

__all__ = ["consistent_int8_module", "fake_quant_qparams", "deployed_weight_bias"]


def _require_fake_quant_on(fq: nn.Module, what: str) -> None:
    if isinstance(fq, FakeQuantizeBase) and not fq._fake_quant_on:
        raise ValueError(f"{what} ({type(fq).__name__}) has fake quantization disabled: the fake-quant model ran "
                         "this tensor in float, so there are no training qparams to deploy; enable it "
                         "(model.apply(minqat.enable_fake_quant)), run an eval batch, then convert")


def fake_quant_qparams(post_process: nn.Module, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale float32, zero_point int64)`` the fake quant used in its last forward (its buffers).

    A ``LearnableFakeQuantize`` uses ``calculate_qparams()`` (its scale parameter and the rounded, clamped
    zero point, which is what its forward fake-quantizes with); a plain observer (post-training
    quantization) too.
    """
    require_statistics(post_process, what)
    _require_fake_quant_on(post_process, what)
    if isinstance(post_process, FakeQuantize):  # FusedMovingAvgObsFakeQuantize included
        scale, zero_point = post_process.scale, post_process.zero_point
    else:
        scale, zero_point = post_process.calculate_qparams()
    return scale.detach().float().clone(), zero_point.detach().round().long().clone()


@contextmanager
def _observer_paused(fq: nn.Module):
    """Run ``fq`` without an observer step, then restore its observer flag."""
    was_on = getattr(fq, "_observer_on", False)
    if isinstance(fq, FakeQuantizeBase):
        fq.enable_observer(False)
    try:
        yield fq
    finally:
        if isinstance(fq, FakeQuantizeBase):
            fq.enable_observer(was_on)


def _bn_factor(mod: nn.Module) -> torch.Tensor:
    """``f = γ / sqrt(σ²_r + ε)``, computed as the QAT forward computes it (sqrt, then true division)."""
    bn = mod.bn
    return bn.weight / torch.sqrt(bn.running_var + bn.eps)


def deployed_weight_bias(mod: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The float weight the QAT module fake-quantizes in eval and the bias its eval output carries.

    Without BN: ``(W, b)``. ``ConvBn*`` / ``LinearBn1d``: ``(W · f, (b − μ_r) · f + β)`` with ``f`` as in
    training (see the module docstring).
    """
    if not isinstance(mod, (_ConvBnNd, LinearBn1d)):
        return mod.weight.detach(), None if mod.bias is None else mod.bias.detach()
    with torch.no_grad():
        f = _bn_factor(mod)  # (C_out,)
        weight = mod.weight * f.reshape([-1] + [1] * (mod.weight.dim() - 1))
        bias = mod.bias if mod.bias is not None else torch.zeros_like(mod.bn.running_mean)
        bias = (bias - mod.bn.running_mean) * f + mod.bn.bias
    return weight, bias


def _weight_codes(weight: torch.Tensor, fq: nn.Module, owner: str) -> tuple[torch.Tensor, ...]:
    """``(w_int int8, s_w, z_w)``: the codes ``fq`` gives ``weight`` with its current qparams."""
    what = f"the weight fake quant of {owner}"
    check_weight_dtype(fq)
    if getattr(fq, "ch_axis", 0) != 0 and fq.scale.numel() > 1:
        raise ValueError(f"{what} must quantize along the output channels (ch_axis=0), got ch_axis={fq.ch_axis}")
    with torch.no_grad(), _observer_paused(fq):
        w_hat = fq(weight)  # the training forward's fake-quantized weight, no statistics step
    scale, zero_point = fake_quant_qparams(fq, what)
    per_channel = fq.qscheme in PER_CHANNEL_QSCHEMES
    shape = [-1] + [1] * (weight.dim() - 1) if per_channel else []
    s, z = scale.reshape(shape), zero_point.reshape(shape)
    w_int = torch.round(w_hat / s) + z  # exact: w_hat = (w_int - z) * s (checked below)
    if not torch.equal((w_int - z) * s, w_hat):  # convert time: reading values is fine
        raise ValueError(f"{what}: its fake-quantized weight is not on its own grid (scale={scale}, "
                         f"zero_point={zero_point}); cannot deploy it consistently")
    lo, hi = -128, 127
    if w_int.min() < lo or w_int.max() > hi:
        raise ValueError(f"{what}: weight codes must fit int8 [{lo}, {hi}], got [{int(w_int.min())}, {int(w_int.max())}]")
    if per_channel:
        return w_int.to(torch.int8), scale.reshape(-1), zero_point.reshape(-1)
    return w_int.to(torch.int8), scale.reshape(()), zero_point.reshape(())


def _output_qparams(mod: nn.Module, owner: str) -> tuple[float, int, tuple[int, int]]:
    """``(scale, zero_point, (quant_min, quant_max))`` of the module's output fake quant (one per tensor)."""
    post_process = mod.activation_post_process
    what = f"the output fake quant of {owner}"
    scale, zero_point = fake_quant_qparams(post_process, what)
    if scale.numel() != 1:
        raise ValueError(f"{what} must quantize per tensor (int8 activations have one scale), got {scale.numel()} "
                         "scales")
    return float(scale), int(zero_point), (int(post_process.quant_min), int(post_process.quant_max))


def _conv(cls: type, mod: nn.Module, owner: str) -> nn.Module:
    weight, bias = deployed_weight_bias(mod)
    w_int, w_scale, w_zero_point = _weight_codes(weight, mod.weight_fake_quant, owner)
    new = cls(mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod.padding, mod.dilation,
              mod.groups, bias is not None, mod.padding_mode, device=mod.weight.device)
    new.set_weight_bias(w_int, w_scale, w_zero_point, bias)
    new.scale, new.zero_point, new.output_range = _output_qparams(mod, owner)
    return new


def _linear(cls: type, mod: nn.Module, owner: str) -> nn.Module:
    weight, bias = deployed_weight_bias(mod)
    w_int, w_scale, w_zero_point = _weight_codes(weight, mod.weight_fake_quant, owner)
    new = cls(mod.in_features, mod.out_features, bias is not None, device=mod.weight.device)
    new.set_weight_bias(w_int, w_scale, w_zero_point, bias)
    new.scale, new.zero_point, new.output_range = _output_qparams(mod, owner)
    return new


def _quantize(mod: nn.Module, owner: str) -> Quantize:
    scale, zero_point, output_range = _output_qparams(mod, owner)
    new = Quantize(scale, zero_point, mod.activation_post_process.dtype,
                   device=mod.activation_post_process.scale.device)
    new.output_range = output_range
    return new


def _functional(mod: nn.Module, owner: str) -> QFunctional:
    new = QFunctional.from_float(mod)
    if new.observed:
        new.scale, new.zero_point, new.output_range = _output_qparams(mod, owner)
    return new


def consistent_int8_module(mod: nn.Module, int8_cls: type, owner: str) -> nn.Module:
    """The int8 twin of one prepared module, deploying the state its fake quants used (module docstring).

    ``int8_cls`` is the mapping's target for ``type(mod)``; ``owner`` names the module in errors. A module
    whose output is observed rather than fake-quantized (post-training quantization: nothing was trained) is
    converted by ``int8_cls.from_float``, exactly as in the default mode.
    """
    if issubclass(int8_cls, DeQuantize):
        return DeQuantize()
    if not isinstance(getattr(mod, "activation_post_process", None), FakeQuantizeBase):
        return int8_cls.from_float(mod)
    if mod.training:
        raise ValueError(f"{owner} is in training mode: call model.eval() (BN must use its running statistics, as "
                         "the int8 model will) and run an eval batch before convert(..., consistent=True)")
    if issubclass(int8_cls, Quantize):
        return _quantize(mod, owner)
    if issubclass(int8_cls, QFunctional):
        return _functional(mod, owner)
    if hasattr(mod, "weight_fake_quant") and issubclass(int8_cls, qconv._ConvNd):
        return _conv(int8_cls, mod, owner)
    if hasattr(mod, "weight_fake_quant") and issubclass(int8_cls, qlinear.Linear):
        return _linear(int8_cls, mod, owner)
    raise ValueError(f"convert(..., consistent=True) does not know how to build {int8_cls.__name__} for {owner}; "
                     "use the default mode or map the module to a minqat int8 conv or linear")
