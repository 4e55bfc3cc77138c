r"""``Quantize`` and ``DeQuantize``: the float <-> int8 boundaries of a converted model.

``convert`` turns a ``QuantStub`` into ``Quantize`` and a ``DeQuantStub`` into ``DeQuantize``, exactly
as torch.ao does (``torch.ao.nn.quantized.Quantize`` / ``DeQuantize``):

* ``Quantize.from_float(stub)`` reads the stub's output fake quant / observer:
  ``scale, zero_point = activation_post_process.calculate_qparams()``, kept as a float32 ``scale``
  and an int64 ``zero_point`` buffer; its forward is ``QTensor.quantize`` (numerics.md §1.1:
  ``x_int = clamp(rint(fma32(x, fl32(1 / s), z)), 0, 255)`` -- the zero point is added *before*
  rounding, inside one FMA, and the clamp is the dtype's full range, not the observer's).
* ``DeQuantize``'s forward is ``QTensor.dequantize()``: ``x_hat = fl32(s * (x_int - z))``.

``Quantize.requantization = "onnxruntime"`` (``minqat.onnx.set_requantization``) quantizes as ONNX Runtime's
``QuantizeLinear`` does instead: ``clamp(rint(fl32(x / s)) + z)`` (``minqat.kernels.onnxruntime.quantize_linear``).

>>> q = Quantize(0.5, 2, torch.uint8)
>>> y = q(torch.tensor([-1.0, 0.25, 200.0]))      # -2 + 2 = 0; 0.5 + 2 = 2.5 -> 2 (ties to even); 402 -> 255
>>> y.int_repr()
tensor([  0,   2, 255], dtype=torch.uint8)
>>> DeQuantize()(y)
tensor([ -1.0000,   0.0000, 126.5000])
"""
from __future__ import annotations

import torch
from torch import nn

from ...dtypes import plain_dtype
from ...kernels.elementwise import suggest_memory_format
from ...kernels.onnxruntime import quantize_linear
from ...qtensor import QTensor
from .common import clamp_to_output_range, load_output_range, require_statistics, save_output_range

__all__ = ["Quantize", "DeQuantize"]


class Quantize(nn.Module):
    """float tensor -> ``QTensor`` with a fixed per-tensor ``scale`` and ``zero_point`` (``dtype``: uint8 or int8)."""

    requantization: str = "fbgemm"  # "onnxruntime": ONNX Runtime's QuantizeLinear; other modes: torch's
    scale: torch.Tensor  # (1,) float32
    zero_point: torch.Tensor  # (1,) int64

    def __init__(self, scale: float, zero_point: int, dtype: torch.dtype = torch.uint8, device=None):
        super().__init__()
        self.dtype = plain_dtype(dtype)
        if self.dtype not in (torch.uint8, torch.int8):
            raise ValueError(f"dtype must be torch.uint8 or torch.int8 (or torch.quint8 / torch.qint8), got {dtype}")
        self.register_buffer("scale", torch.tensor([scale], dtype=torch.float32, device=device))
        self.register_buffer("zero_point", torch.tensor([zero_point], dtype=torch.long, device=device))
        self.output_range: tuple[int, int] | None = None  # convert(consistent=True): the fake quant's range

    def forward(self, x: torch.Tensor) -> QTensor:
        if isinstance(x, QTensor) or not isinstance(x, torch.Tensor) or not x.is_floating_point():
            kind = "a QTensor (already quantized)" if isinstance(x, QTensor) else (
                f"a {x.dtype} tensor" if isinstance(x, torch.Tensor) else type(x).__name__)
            raise TypeError(f"Quantize expects a float tensor, got {kind}")
        if self.requantization == "onnxruntime":
            x_int = quantize_linear(x, self.scale, self.zero_point, self.dtype)
            q = QTensor(x_int.contiguous(memory_format=suggest_memory_format(x)), self.scale, self.zero_point)
        else:
            q = QTensor.quantize(x, self.scale, self.zero_point, self.dtype)
        if self.output_range is None:
            return q
        return QTensor(clamp_to_output_range(q.int_repr(), self.output_range), q.scale, q.zero_point)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        save_output_range(self, destination, prefix)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        load_output_range(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @staticmethod
    def from_float(mod: nn.Module, use_precomputed_fake_quant: bool = False) -> Quantize:
        """The ``Quantize`` of a prepared ``QuantStub``: its output observer's qparams."""
        post_process = getattr(mod, "activation_post_process", None)
        if post_process is None:
            raise ValueError(f"Quantize.from_float needs a {type(mod).__name__} with an output observer "
                             "(activation_post_process): prepare the model (minqat.prepare_qat / minqat.prepare) first")
        require_statistics(post_process, "its output observer (activation_post_process)")
        scale, zero_point = post_process.calculate_qparams()
        device = scale.device
        return Quantize(scale.float().item(), zero_point.long().item(), post_process.dtype, device=device)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, zero_point={self.zero_point}, dtype={self.dtype}"


class DeQuantize(nn.Module):
    """``QTensor`` -> float32 tensor: ``x_hat = fl32(s * (x_int - z))`` (numerics.md §1.3)."""

    def forward(self, x: QTensor) -> torch.Tensor:
        if not isinstance(x, QTensor):
            kind = f"a torch.Tensor of dtype {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(f"DeQuantize expects a QTensor (the output of an int8 module), got {kind}")
        return x.dequantize()

    @staticmethod
    def from_float(mod: nn.Module, use_precomputed_fake_quant: bool = False) -> DeQuantize:
        return DeQuantize()
