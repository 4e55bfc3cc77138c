r"""Layer-by-layer comparison of a prepared (fake-quant) model and its int8 model, in LSB.

``compare_layers(prepared, int8_model, x)`` runs both models on the batch ``x`` and, for every layer
whose output training fake-quantized (``Quantize``, the int8 convs and linears, ``QFunctional``'s
add / add_relu / mul / cat / matmul; not add_scalar / mul_scalar, which are not observed), compares
the fake-quant layer's output ``y_fq`` (a float tensor on its fake quant's grid) with the int8 layer's
``QTensor`` ``q`` in units of the int8 output scale:

.. code-block:: text

    lsb = |y_fq − (q_int − z_q) · s_q| / s_q          per element, in float64, rounded to 0.001 LSB (both
                                                      sides are float32 products); a row keeps the max and
                                                      the fraction of elements more than 0.5 LSB apart

With ``isolated=True`` (the default) the int8 model runs as deployed, and each fake-quant layer is fed the
int8 layer's own input, dequantized (exactly representable), so a row measures that layer alone -- not the
error accumulated upstream, nor the rounding of float-only steps such as average pooling, which the
fake-quant model does not round. ``isolated=False`` runs the two models end to end side by side and shows
how differences accumulate. ``prepared`` must be a QAT model (fake quants) in eval mode: a model prepared
for post-training quantization has observers only, whose outputs are float, on no grid.
``LayerReport.first_over(threshold)`` names the first layer whose max difference exceeds ``threshold``.

What to expect -- measured on the small ResNet of ``tests/test_consistent.py`` (seed 5, five SGD steps
with ``get_default_qat_qconfig("fbgemm")``, eval batch of 2x3x8x8, ``isolated=True``):

.. code-block:: text

                          convert(prepared)       convert(prepared, consistent=True)
    layer        type      max LSB  mismatch       max LSB  mismatch
    quant        Quantize    11.00    0.0026          0.00    0.0000
    conv1        ConvReLU2d   1.00    0.0547          0.00    0.0000
    layer1.conv1 ConvReLU2d   1.00    0.0820          0.00    0.0000
    layer1.conv2 Conv2d       1.00    0.0234          0.00    0.0000
    layer1.skip  QFunctional  0.00    0.0000          0.00    0.0000
    layer2.conv1 ConvReLU2d  45.00    0.1016          0.00    0.0000
    layer2.conv2 Conv2d       1.00    0.0312          0.00    0.0000
    layer2.down… Conv2d       1.00    0.0859          0.00    0.0000
    layer2.skip  QFunctional  0.00    0.0000          0.00    0.0000
    fc           Linear      25.00    0.0500          0.00    0.0000

torch.ao's convert (minqat's default) re-folds and re-observes the weights (the 1-LSB rows: 2-10 % of
outputs move) and clamps outputs to uint8's [0, 255] where the fake quants clamp to ``reduce_range``'s
[0, 127] (the 11-, 45- and 25-LSB rows). ``consistent=True`` deploys the trained codes, qparams and range:
here every output is identical; the tested bound is 1 LSB per layer.

>>> import torch, minqat
>>> from torch import nn
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> float_model = minqat.QuantWrapper(nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))
>>> float_model.qconfig = minqat.get_default_qat_qconfig("fbgemm")
>>> prepared = minqat.prepare_qat(minqat.fuse_modules_qat(float_model.train(), [["module.0", "module.1", "module.2"]]))
>>> for _ in range(3):
...     _ = prepared(torch.randn(8, 2, 6, 6))
>>> x = torch.randn(4, 2, 6, 6)
>>> _ = prepared.eval()(x)                                      # the last eval forward
>>> report = compare_layers(prepared, minqat.convert(prepared, consistent=True), x)
>>> report.max_lsb <= 1.0, report.first_over(1.0)
(True, None)
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from .fake_quantize import FakeQuantizeBase, disable_observer
from .nn.quantized.functional import OBSERVED_OPS, QFunctional
from .observers import ObserverBase
from .qtensor import QTensor

__all__ = ["LayerDiff", "LayerReport", "compare_layers"]


@dataclass(frozen=True)
class LayerDiff:
    """One layer: its path, int8 type, output qparams, max LSB difference and fraction of differing codes."""

    name: str
    kind: str
    scale: float
    zero_point: int
    max_lsb: float
    mismatch: float
    numel: int


@dataclass(frozen=True)
class LayerReport:
    """The rows of ``compare_layers``, in the order the int8 model ran the layers."""

    layers: tuple[LayerDiff, ...]

    @property
    def max_lsb(self) -> float:
        return max((row.max_lsb for row in self.layers), default=0.0)

    def first_over(self, threshold: float) -> LayerDiff | None:
        """The first layer (in execution order) whose max LSB difference exceeds ``threshold``, or None."""
        return next((row for row in self.layers if row.max_lsb > threshold), None)

    def __str__(self) -> str:
        width = max([len(r.name) for r in self.layers] + [5])
        lines = [f"{'layer':<{width}}  {'type':<12} {'scale':>10} {'zp':>4} {'max LSB':>8} {'mismatch':>9}"]
        lines += [f"{r.name:<{width}}  {r.kind:<12} {r.scale:>10.3g} {r.zero_point:>4} {r.max_lsb:>8.2f} "
                  f"{r.mismatch:>9.4f}" for r in self.layers]
        return "\n".join(lines)


def _is_post_process(module: nn.Module) -> bool:
    return isinstance(module, (ObserverBase, FakeQuantizeBase))


def _fake_quant_outputs(prepared: nn.Module) -> dict[str, str]:
    """int8-model path -> path of the prepared module whose output fake quant gives that layer's output."""
    paths = {}
    for name, module in prepared.named_modules():
        post_process = getattr(module, "activation_post_process", None)
        if name and not _is_post_process(module) and _is_post_process(post_process):
            paths[name] = f"{name}.activation_post_process"
    return paths


def _diff(name: str, kind: str, y_fq: torch.Tensor, q: QTensor) -> LayerDiff:
    scale, zero_point = float(q.scale), int(q.zero_point)
    y_int8 = q.dequantize().double()
    lsb = (y_fq.detach().double() - y_int8).abs() / scale
    lsb = torch.round(lsb * 1000) / 1000  # both sides are float32 products: keep 0.001 LSB, drop their rounding
    return LayerDiff(name, kind, scale, zero_point, float(lsb.max()) if lsb.numel() else 0.0,
                     float((lsb > 0.5).double().mean()) if lsb.numel() else 0.0, lsb.numel())


def _check_models(prepared: nn.Module, int8_model: nn.Module) -> None:
    if not any(isinstance(m, FakeQuantizeBase) for m in prepared.modules()):
        kind = "observers only (post-training quantization: its outputs are float, on no grid)" if any(
            _is_post_process(m) for m in prepared.modules()) else "no fake quant"
        raise ValueError(f"prepared must be a model prepared for QAT (prepare_qat: fake quants), got "
                         f"{type(prepared).__name__} with {kind}")
    if prepared.training:
        raise ValueError("prepared must be in eval mode (prepared.eval()): in training mode BN normalises with "
                         "the batch statistics, which the int8 model never uses")
    if any(_is_post_process(m) for m in int8_model.modules()):
        raise ValueError("int8_model must be the converted model (minqat.convert), but it still holds observers "
                         "or fake quants")


def _dequantized(value):
    """QTensors (also inside lists) -> their float values; anything else unchanged."""
    if isinstance(value, QTensor):
        return value.dequantize()
    if isinstance(value, (list, tuple)):
        return type(value)(_dequantized(v) for v in value)
    return value


def _run_hooked(model: nn.Module, x: torch.Tensor, handles: list, patched: tuple = ()) -> None:
    """``model(x)`` without gradients, then remove the hooks and the wrapped instance methods."""
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
        for module, op in patched:
            delattr(module, op)


def _record_int8_calls(int8_model: nn.Module, names, x: torch.Tensor) -> list:
    """Run the int8 model; return ``(name, kind, op, args, out)`` for every call of a compared layer."""
    calls, handles, patched = [], [], []
    modules = dict(int8_model.named_modules())

    def on_forward(name, kind):
        return lambda module, args, out: calls.append((name, kind, None, args, out))

    def recording(name, op, method):
        def call(*args, **kwargs):
            out = method(*args, **kwargs)
            calls.append((name, "QFunctional", op, (args, kwargs), out))
            return out
        return call

    for name in names:
        module = modules[name]
        if isinstance(module, QFunctional):  # its ops are methods, not forward: wrap them on the instance
            for op in OBSERVED_OPS:
                patched.append((module, op))
                setattr(module, op, recording(name, op, getattr(module, op)))
        else:
            handles.append(module.register_forward_hook(on_forward(name, type(module).__name__)))
    _run_hooked(int8_model, x, handles, patched)
    return calls


def _end_to_end_fake_quant_outputs(prepared: nn.Module, post_process_paths: dict, x: torch.Tensor) -> dict:
    """Run the prepared model on ``x``; return each compared layer's output fake-quant outputs, in call order."""
    outputs, handles = {}, []
    modules = dict(prepared.named_modules())
    for name, path in post_process_paths.items():
        hook = (lambda n: lambda module, args, out: outputs.setdefault(n, []).append(out))(name)
        handles.append(modules[path].register_forward_hook(hook))
    _run_hooked(prepared, x, handles)
    return outputs


def compare_layers(prepared: nn.Module, int8_model: nn.Module, x: torch.Tensor, *,
                   isolated: bool = True) -> LayerReport:
    """Run both models on ``x`` and report, layer by layer, the LSB difference (module docstring).

    Args:
        prepared: the prepared model (after ``prepare_qat`` / ``prepare``), in the mode to compare
            (normally ``eval()``: BN on running statistics). A copy with its observers disabled runs, so
            the fake quants use the qparams of their last forward and ``prepared`` is left untouched.
        int8_model: ``minqat.convert(prepared, ...)``.
        x: one batch, a float tensor.
        isolated: feed each fake-quant layer the int8 layer's own input, dequantized (default), or run
            the two models end to end side by side.
    """
    _check_models(prepared, int8_model)
    prepared = copy.deepcopy(prepared)
    prepared.apply(disable_observer)
    post_process_paths = _fake_quant_outputs(prepared)
    int8_names = dict(int8_model.named_modules())
    names = [name for name in post_process_paths if name in int8_names]
    calls = _record_int8_calls(int8_model, names, x)
    fq_modules = dict(prepared.named_modules())
    end_to_end = {} if isolated else _end_to_end_fake_quant_outputs(prepared, post_process_paths, x)
    seen: dict[str, int] = {}
    rows = []
    for name, kind, op, args, out in calls:
        if not isinstance(out, QTensor):
            continue
        if isolated:
            with torch.no_grad():
                if op is None:
                    y_fq = fq_modules[name](*_dequantized(args))
                else:
                    op_args, op_kwargs = args
                    y_fq = getattr(fq_modules[name], op)(*_dequantized(op_args), **op_kwargs)
        else:
            index = seen[name] = seen.get(name, -1) + 1
            y_fq = end_to_end[name][index]
        rows.append(_diff(name, kind, y_fq, out))
    return LayerReport(tuple(rows))
