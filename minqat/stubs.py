"""Markers that tell preparation where the int8 region starts and ends, and observed float ops.

Eager-mode quantization cannot see tensors flowing between modules, only modules. So the user
marks the points that need a quantization decision with modules that do nothing in float:

* ``QuantStub``  -- float -> int8 boundary. ``prepare`` / ``prepare_qat`` attach an observer (a
  fake quant in QAT) to its output, which is how the model input gets its scale and zero point;
  ``convert`` turns it into a quantize op.
* ``DeQuantStub`` -- int8 -> float boundary. Never observed (its output is float); ``convert``
  turns it into a dequantize op.
* ``QuantWrapper(module)`` -- ``quant -> module -> dequant`` around a whole module.
* ``FloatFunctional`` -- ``add``, ``mul``, ``cat``, ``add_relu``, ``matmul`` as a module, so that the
  *result* of a residual add (which belongs to no layer) has an ``activation_post_process`` to be
  observed or fake-quantized. Until preparation that is an ``nn.Identity``.

These mirror ``torch.ao.quantization.QuantStub`` / ``DeQuantStub`` / ``QuantWrapper`` and
``torch.ao.nn.quantized.FloatFunctional`` attribute for attribute, so prepared models have the same
``state_dict`` keys. Models that use torch.ao's own classes are accepted by ``minqat.prepare`` /
``minqat.prepare_qat``, which replace them with these (``minqat.mappings.torch_ao_equivalents``).

>>> import torch
>>> f = FloatFunctional()
>>> f.add(torch.tensor([1.0]), torch.tensor([2.0]))      # Identity until prepare replaces it
tensor([3.])
>>> QuantWrapper(torch.nn.ReLU())
QuantWrapper(
  (quant): QuantStub()
  (dequant): DeQuantStub()
  (module): ReLU()
)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .qconfig import QConfig

__all__ = ["QuantStub", "DeQuantStub", "QuantWrapper", "FloatFunctional"]


class QuantStub(nn.Module):
    """The float -> int8 boundary: the identity until ``convert`` makes it a quantize op.

    ``qconfig`` (optional) overrides the one propagated from the parent module. ``prepare`` attaches
    ``activation_post_process = qconfig.activation()`` as a forward hook on its output.
    """

    def __init__(self, qconfig: QConfig | None = None):
        super().__init__()
        if qconfig:  # as torch: no attribute at all unless given, so propagation fills it in
            self.qconfig = qconfig

    def forward(self, x: Tensor) -> Tensor:
        return x


class DeQuantStub(nn.Module):
    """The int8 -> float boundary: the identity until ``convert`` makes it a dequantize op.

    Never gets an ``activation_post_process``: its output is float.
    """

    def __init__(self, qconfig: QConfig | None = None):
        super().__init__()
        if qconfig:
            self.qconfig = qconfig

    def forward(self, x: Tensor) -> Tensor:
        return x


class QuantWrapper(nn.Module):
    """``quant -> module -> dequant``; the stubs take ``module.qconfig`` and the wrapper its mode.

    >>> QuantWrapper(nn.Linear(2, 2)).train(False).quant.training
    False
    """

    quant: QuantStub
    dequant: DeQuantStub
    module: nn.Module

    def __init__(self, module: nn.Module):
        super().__init__()
        qconfig = getattr(module, "qconfig", None)
        self.add_module("quant", QuantStub(qconfig))
        self.add_module("dequant", DeQuantStub(qconfig))
        self.add_module("module", module)
        self.train(module.training)

    def forward(self, x: Tensor) -> Tensor:
        x = self.quant(x)
        x = self.module(x)
        return self.dequant(x)


class FloatFunctional(nn.Module):
    """Tensor ops as a module, so their result has an ``activation_post_process`` to observe.

    ``add``, ``mul``, ``cat``, ``add_relu`` and ``matmul`` pass their result through
    ``self.activation_post_process`` (an ``nn.Identity`` until ``prepare`` replaces it with
    ``qconfig.activation()``). ``add_scalar`` and ``mul_scalar`` are **not** observed, exactly as in
    torch.ao: the int8 kernels derive their output qparams from the input's. Call the ops, not the
    module: ``forward`` raises.

    >>> f = FloatFunctional()
    >>> f.add_relu(torch.tensor([-3.0, 1.0]), torch.tensor([1.0, 1.0]))
    tensor([0., 2.])
    >>> f.cat([torch.zeros(1), torch.ones(1)], dim=0)
    tensor([0., 1.])
    """

    def __init__(self) -> None:
        super().__init__()
        self.activation_post_process = nn.Identity()

    def forward(self, x):
        raise RuntimeError("FloatFunctional is not meant to be called: use one of its ops, "
                           "e.g. f.add(x, y), f.mul(x, y), f.cat([x, y]), f.add_relu(x, y), f.matmul(x, y)")

    def add(self, x: Tensor, y: Tensor) -> Tensor:
        """``torch.add(x, y)``, observed."""
        return self.activation_post_process(torch.add(x, y))

    def add_scalar(self, x: Tensor, y: float) -> Tensor:
        """``torch.add(x, y)`` with a Python number, not observed (as torch.ao)."""
        return torch.add(x, y)

    def mul(self, x: Tensor, y: Tensor) -> Tensor:
        """``torch.mul(x, y)``, observed."""
        return self.activation_post_process(torch.mul(x, y))

    def mul_scalar(self, x: Tensor, y: float) -> Tensor:
        """``torch.mul(x, y)`` with a Python number, not observed (as torch.ao)."""
        return torch.mul(x, y)

    def cat(self, x: list[Tensor], dim: int = 0) -> Tensor:
        """``torch.cat(x, dim)``, observed."""
        return self.activation_post_process(torch.cat(x, dim=dim))

    def add_relu(self, x: Tensor, y: Tensor) -> Tensor:
        """``relu(x + y)``, observed after the ReLU."""
        return self.activation_post_process(F.relu(torch.add(x, y)))

    def matmul(self, x: Tensor, y: Tensor) -> Tensor:
        """``torch.matmul(x, y)``, observed."""
        return self.activation_post_process(torch.matmul(x, y))
