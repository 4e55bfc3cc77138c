r"""``QFunctional``: the int8 twin of ``FloatFunctional`` (residual adds, products, concatenations).

``convert`` turns each ``FloatFunctional`` into a ``QFunctional`` whose output qparams are those its
``activation_post_process`` observed during training (torch.ao's ``QFunctional.from_float``). Its ops
take ``QTensor`` s and return a ``QTensor``; each equals ``torch.ops.quantized.<op>`` bit for bit
(``minqat.kernels.elementwise``):

* ``add`` / ``add_relu`` / ``mul`` / ``cat`` requantize to ``(self.scale, self.zero_point)``;
* ``add_scalar`` / ``mul_scalar`` are not observed (as in torch.ao): their output qparams follow from
  the input's and the scalar (``add_scalar``: ``z' = z - rint(c / s)`` when that fits the dtype);
* with ``requantization = "onnxruntime"`` (``minqat.onnx.set_requantization``), ``add`` / ``add_relu`` compute
  ONNX Runtime's ``QLinearAdd`` instead (``minqat.kernels.onnxruntime.qlinear_add``);
* ``matmul`` requantizes to ``(self.scale, self.zero_point)`` too (torch.ao does not observe it; its
  FloatFunctional ``matmul`` result is observed, so the qparams are there).

A ``FloatFunctional`` used only for ``add_scalar`` / ``mul_scalar`` never observes anything; its
``QFunctional`` converts (``observed=False``) and raises only if an op that needs the output qparams
is called (torch.ao silently uses ``scale = 1, zero_point = 0`` there).

Like ``FloatFunctional``, calling the module itself raises: call one of its ops.

>>> import torch
>>> from minqat.qtensor import QTensor
>>> f = QFunctional()
>>> f.scale, f.zero_point = 0.5, 0
>>> x = QTensor.quantize(torch.tensor([0.5, 1.0]), 0.25, 0, torch.uint8)     # x_int = [2, 4]
>>> f.add(x, x).int_repr()                                                   # [1.0, 2.0] / 0.5
tensor([2, 4], dtype=torch.uint8)
"""
from __future__ import annotations

import functools
from typing import Sequence

from torch import nn

from ...kernels import elementwise
from ...kernels.onnxruntime import qlinear_add
from ...qtensor import QTensor
from ...stubs import FloatFunctional
from .common import (clamp_to_output_range, load_output_qparams, output_qparams, require_qtensor, require_statistics,
                     save_output_qparams)

__all__ = ["QFunctional", "OBSERVED_OPS"]

# the ops whose output the prepared FloatFunctional fake-quantizes (add_scalar / mul_scalar are not observed)
OBSERVED_OPS = ("add", "add_relu", "mul", "cat", "matmul")


class QFunctional(nn.Module):
    """int8 ``add``, ``add_relu``, ``mul``, ``cat``, ``add_scalar``, ``mul_scalar``, ``matmul`` on ``QTensor`` s."""

    requantization: str = "fbgemm"  # "onnxruntime": add / add_relu as ONNX Runtime's QLinearAdd

    def __init__(self) -> None:
        super().__init__()
        self.scale: float = 1.0  # output qparams of add / add_relu / mul / cat / matmul
        self.zero_point: int = 0
        self.activation_post_process = nn.Identity()  # as torch.ao: kept, so hooks see the same structure
        self.observed = True  # False: converted from a FloatFunctional whose observer never saw a batch
        self.output_range: tuple[int, int] | None = None  # convert(consistent=True): the fake quant's range

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        save_output_qparams(self, destination, prefix)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        load_output_qparams(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _get_name(self) -> str:
        return "QFunctional"

    def extra_repr(self) -> str:
        return f"scale={self.scale}, zero_point={self.zero_point}"

    def forward(self, x):
        raise RuntimeError("QFunctional is not meant to be called: use one of its ops, "
                           "e.g. f.add(x, y), f.mul(x, y), f.cat([x, y]), f.add_relu(x, y)")

    def _require_observed(self, name: str) -> None:
        if not self.observed:
            raise ValueError(f"QFunctional.{name} needs output qparams, but the FloatFunctional it was converted from "
                             f"never observed a batch (was its {name} called during training or calibration?)")

    def _binary(self, op, x: QTensor, y: QTensor, name: str) -> QTensor:
        self._require_observed(name)
        x, y = require_qtensor(x, f"QFunctional.{name}"), require_qtensor(y, f"QFunctional.{name}")
        y_int = op(x.int_repr(), x.scale, x.zero_point, y.int_repr(), y.scale, y.zero_point,
                   self.scale, self.zero_point)
        y_int = clamp_to_output_range(y_int, self.output_range)
        return self.activation_post_process(QTensor(y_int, self.scale, self.zero_point))

    def add(self, x: QTensor, y: QTensor) -> QTensor:
        """``torch.ops.quantized.add``: ``x + y`` requantized to the observed output qparams."""
        op = qlinear_add if self.requantization == "onnxruntime" else elementwise.add
        return self._binary(op, x, y, "add")

    def add_relu(self, x: QTensor, y: QTensor) -> QTensor:
        """``torch.ops.quantized.add_relu``: ``relu(x + y)`` requantized to the observed output qparams."""
        op = functools.partial(qlinear_add, relu=True) if self.requantization == "onnxruntime" else elementwise.add_relu
        return self._binary(op, x, y, "add_relu")

    def mul(self, x: QTensor, y: QTensor) -> QTensor:
        """``torch.ops.quantized.mul``: ``x * y`` requantized to the observed output qparams."""
        return self._binary(elementwise.mul, x, y, "mul")

    def matmul(self, x: QTensor, y: QTensor) -> QTensor:
        """``torch.ops.quantized.matmul``: ``x @ y`` requantized to the output qparams (not observed, as torch.ao)."""
        self._require_observed("matmul")
        x, y = require_qtensor(x, "QFunctional.matmul"), require_qtensor(y, "QFunctional.matmul")
        y_int = elementwise.matmul(x.int_repr(), x.scale, x.zero_point, y.int_repr(), y.scale,
                                   y.zero_point, self.scale, self.zero_point)
        return QTensor(clamp_to_output_range(y_int, self.output_range), self.scale, self.zero_point)

    def add_scalar(self, x: QTensor, y: float) -> QTensor:
        """``torch.ops.quantized.add_scalar``: output qparams derived from ``x``'s (not observed)."""
        x = require_qtensor(x, "QFunctional.add_scalar")
        y_int, scale, zero_point = elementwise.add_scalar(x.int_repr(), x.scale, x.zero_point, y)
        return QTensor(y_int, scale, zero_point)

    def mul_scalar(self, x: QTensor, y: float) -> QTensor:
        """``torch.ops.quantized.mul_scalar``: output qparams derived from ``x``'s (not observed)."""
        x = require_qtensor(x, "QFunctional.mul_scalar")
        y_int, scale, zero_point = elementwise.mul_scalar(x.int_repr(), x.scale, x.zero_point, y)
        return QTensor(y_int, scale, zero_point)

    def cat(self, x: Sequence[QTensor], dim: int = 0) -> QTensor:
        """``torch.ops.quantized.cat``: concatenate and requantize to the observed output qparams."""
        self._require_observed("cat")
        if not isinstance(x, (list, tuple)) or not x:
            raise ValueError(f"QFunctional.cat expects a non-empty list of QTensors, got {x!r}")
        x = [require_qtensor(t, "QFunctional.cat") for t in x]
        y_int = elementwise.cat([t.int_repr() for t in x], [t.scale for t in x], [t.zero_point for t in x],
                                dim, self.scale, self.zero_point)
        y_int = clamp_to_output_range(y_int, self.output_range)
        return self.activation_post_process(QTensor(y_int, self.scale, self.zero_point))

    @classmethod
    def from_float(cls, mod: nn.Module, use_precomputed_fake_quant: bool = False) -> QFunctional:
        """The ``QFunctional`` of a prepared ``FloatFunctional``: its output observer's qparams."""
        if not isinstance(mod, FloatFunctional):
            raise ValueError(f"QFunctional.from_float expects a FloatFunctional, got {type(mod).__name__}")
        post_process = mod.activation_post_process
        if isinstance(post_process, nn.Identity):
            raise ValueError("QFunctional.from_float needs a prepared FloatFunctional (its activation_post_process "
                             "is still an nn.Identity): prepare the model (minqat.prepare_qat / minqat.prepare) first")
        new = cls()
        try:
            require_statistics(post_process, "its output observer (activation_post_process)")
        except ValueError:  # only add_scalar / mul_scalar used: fine until an observed op is called
            new.observed = False
            return new
        new.scale, new.zero_point = output_qparams(post_process)
        return new
