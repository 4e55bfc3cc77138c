r"""Running an exported graph (ONNX Runtime, or onnx's pure-numpy reference) and comparing it with minqat.

* ``set_requantization(model, mode)`` switches every int8 module that has a ``requantization`` attribute to
  ``"fbgemm"`` (torch's arithmetic, the default), ``"fixed_point"`` or ``"onnxruntime"`` (ORT's,
  ``minqat.kernels.onnxruntime``). In ``"onnxruntime"`` mode the int8 model computes the integers ONNX Runtime's
  CPU kernels compute for the exported graph.
* ``run_onnxruntime(model, x)`` / ``run_reference(model, x)``: the graph's outputs as numpy arrays, from ORT's
  CPU execution provider (graph optimizations on: the QDQ patterns become QLinearConv, QGemm, QLinearAdd ...)
  or from ``onnx.reference.ReferenceEvaluator``, which computes the float ops in float32 and rounds once at each
  QuantizeLinear -- it differs from both integer paths where a value lies within float32 error of a tie.
* ``compare(model_int8, onnx_model, x)`` counts where minqat's ``"onnxruntime"`` mode and ORT differ;
  ``evaluate_onnxruntime`` is the demo's report (accuracy in ORT, agreement with minqat).

>>> import pytest; _ = pytest.importorskip("onnxruntime")
>>> from minqat.nn.quantized import DeQuantize, Linear, Quantize
>>> from minqat.onnx import export_onnx
>>> fc = Linear(2, 1)
>>> fc.set_weight_bias(torch.tensor([[1, -1]], dtype=torch.int8), torch.tensor(0.5), torch.tensor(0),
...                    torch.tensor([0.25]))
>>> fc.scale, fc.zero_point = 0.25, 64
>>> model = torch.nn.Sequential(Quantize(1.0, 0), fc, DeQuantize())
>>> proto = export_onnx(model, torch.zeros(1, 2), None)
>>> x = torch.tensor([[3.0, 1.0]])      # acc = 2; b_int = rint(0.25 / 0.5) = 0 (to even): 2 * 0.5 / 0.25 = 4
>>> run_onnxruntime(proto, x), run_reference(proto, x)
(array([[1.]], dtype=float32), array([[1.]], dtype=float32))
>>> model(x)                            # torch's arithmetic (the default): float bias, (2 + 0.5) * 2 = 5
tensor([[1.2500]])
>>> compare(model, proto, x)            # the model in "onnxruntime" mode
{'outputs': 1, 'mismatches': 0, 'max_abs_diff': 0.0}
"""
from __future__ import annotations

import contextlib
import os
import tempfile

import numpy as np
import torch
from torch import Tensor, nn

from ..kernels.requantize import REQUANTIZATION_MODES
from ..qtensor import QTensor
from .export import _int8_model, export_onnx, require

__all__ = ["set_requantization", "run_onnxruntime", "run_reference", "compare", "evaluate_onnxruntime"]


def set_requantization(model: nn.Module, mode: str) -> nn.Module:
    """Set ``requantization = mode`` on every module of ``model`` whose class has that attribute; returns ``model``.

    ``mode``: ``"fbgemm"`` (torch's float32 recipe, bit-exact with torch.ao), ``"fixed_point"`` (Jacob et al.
    2018's integer-only recipe) or ``"onnxruntime"`` (what ONNX Runtime computes for ``export_onnx``'s graph).

    >>> from minqat.nn.quantized import Conv2d
    >>> model = torch.nn.Sequential(Conv2d(1, 1, 1))
    >>> set_requantization(model, "onnxruntime")[0].requantization
    'onnxruntime'
    """
    if mode not in REQUANTIZATION_MODES:
        raise ValueError(f"mode must be one of {REQUANTIZATION_MODES}, got {mode!r}")
    for module in model.modules():
        if hasattr(type(module), "requantization"):
            module.requantization = mode
    return model


@contextlib.contextmanager
def _requantization(model: nn.Module, mode: str):
    """``set_requantization`` for the duration of a block; each module's own mode restored afterwards."""
    saved = [(m, m.__dict__.get("requantization")) for m in model.modules() if hasattr(type(m), "requantization")]
    set_requantization(model, mode)
    try:
        yield model
    finally:
        for module, value in saved:
            if value is None:
                module.__dict__.pop("requantization", None)
            else:
                module.requantization = value


def _load(model):
    onnx = require("onnx")
    if isinstance(model, (str, os.PathLike)):
        return onnx.load(os.fspath(model))
    if isinstance(model, onnx.ModelProto):
        return model
    raise ValueError(f"model must be a path to an .onnx file or an onnx.ModelProto, got {type(model).__name__}")


def _feed(proto, x) -> dict:
    array = x.detach().cpu().float().numpy() if isinstance(x, Tensor) else np.asarray(x, dtype=np.float32)
    return {proto.graph.input[0].name: array}


def _single(outputs: list):
    return outputs[0] if len(outputs) == 1 else tuple(outputs)


def run_onnxruntime(model, x, threads: int = 1):
    """The graph's output on ``x`` from ONNX Runtime's CPU execution provider (all graph optimizations on).

    ``model``: a path or an ``onnx.ModelProto``; ``x``: a float tensor or array. Returns one numpy array, or a
    tuple of them for a graph with several outputs.
    """
    ort = require("onnxruntime")
    proto = _load(model)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return _single(session.run(None, _feed(proto, x)))


def run_reference(model, x):
    """The graph's output on ``x`` from ``onnx.reference.ReferenceEvaluator`` (pure numpy, float ops in float32)."""
    require("onnx")
    from onnx.reference import ReferenceEvaluator

    proto = _load(model)
    return _single(ReferenceEvaluator(proto).run(None, _feed(proto, x)))


def _numpy(y) -> np.ndarray:
    if isinstance(y, QTensor):
        return y.int_repr().cpu().numpy()
    return y.detach().cpu().numpy()


def compare(model_int8: nn.Module, onnx_model, x: Tensor) -> dict:
    """Run ``model_int8`` in ``"onnxruntime"`` mode and the exported graph in ORT on ``x``; count differences.

    Returns ``{"outputs": elements compared, "mismatches": elements that differ, "max_abs_diff": largest
    difference}`` over all outputs (integer codes for QTensor outputs, floats for dequantized ones). The
    model's own ``requantization`` settings are restored afterwards. A prepared model (eval mode) is compared
    through ``convert(model, consistent=True)``, the model ``export_onnx`` writes for it.
    """
    model_int8 = _int8_model(model_int8)  # a prepared model: its consistent conversion, as export_onnx
    y_ort = run_onnxruntime(onnx_model, x)
    y_ort = list(y_ort) if isinstance(y_ort, tuple) else [y_ort]
    with torch.no_grad(), _requantization(model_int8, "onnxruntime"):
        y = model_int8(x)
    y = [_numpy(t) for t in (y if isinstance(y, (tuple, list)) else [y])]
    if len(y) != len(y_ort):
        raise ValueError(f"the model has {len(y)} outputs and the graph {len(y_ort)}: was it exported from this model?")
    outputs = mismatches = 0
    worst = 0.0
    for ours, theirs in zip(y, y_ort):
        if ours.shape != theirs.shape:
            raise ValueError(f"output shapes differ: model {ours.shape}, graph {theirs.shape}")
        diff = np.abs(ours.astype(np.float64) - theirs.astype(np.float64))
        outputs, mismatches = outputs + diff.size, mismatches + int((diff != 0).sum())
        worst = max(worst, float(diff.max(initial=0.0)))
    return {"outputs": outputs, "mismatches": mismatches, "max_abs_diff": worst}


def evaluate_onnxruntime(model_int8: nn.Module, x: Tensor, labels: Tensor | None = None,
                         path: str | os.PathLike | None = None) -> dict:
    """Export ``model_int8``, run it in ONNX Runtime on ``x`` and report, for a classifier (logits out):

    ``accuracy`` (ORT's argmax vs ``labels``, if given), ``agreement`` (fraction of samples where ORT and
    minqat's ``"onnxruntime"`` mode pick the same class), ``mismatches`` / ``outputs`` (logits that differ, bit
    for bit) and ``path`` (the exported file; a temporary one, deleted, when ``path`` is None).
    """
    model_int8 = _int8_model(model_int8)  # a prepared model: its consistent conversion, as export_onnx
    with tempfile.TemporaryDirectory() as tmp:
        file = os.fspath(path) if path is not None else os.path.join(tmp, "model.onnx")
        proto = export_onnx(model_int8, x[:1], file)
        logits_ort = run_onnxruntime(proto, x)
        with torch.no_grad(), _requantization(model_int8, "onnxruntime"):
            logits = _numpy(model_int8(x))
    report = {"agreement": float((logits.argmax(1) == logits_ort.argmax(1)).mean()),
              "mismatches": int((logits != logits_ort).sum()), "outputs": int(logits.size),
              "path": None if path is None else file}
    if labels is not None:
        report["accuracy"] = float((logits_ort.argmax(1) == labels.cpu().numpy()).mean())
    return report
