"""The demo's network and quantization settings, written once for minqat and for torch.ao.

``DigitsCNN`` is the tutorial shape of eager-mode quantization: ``QuantStub`` -> two
conv-BN-ReLU blocks -> flatten -> linear -> ``DeQuantStub``. It takes its stubs as arguments, so the
same float weights can be prepared by minqat (with minqat's stubs) and by torch.ao (with torch.ao's).

``Library`` bundles the handful of names the flow calls, so one function runs the flow on either side.

Bit settings (``qat_qconfig`` / ``ptq_qconfig``):

* **8 bits**: the backend's defaults -- ``get_default_qat_qconfig(backend)`` and
  ``get_default_qconfig(backend)``. For x86 / fbgemm their activations use [0, 127] (``reduce_range``:
  fbgemm's int16 pair sums on CPUs without AVX512-VNNI stay exact, numerics.md §7.2), for qnnpack
  [0, 255]; weights are int8 symmetric, per channel (x86 / fbgemm) or per tensor (qnnpack).
* **b < 8 bits**: every weight on the symmetric int8 sub-range [-(2^(b-1) - 1), 2^(b-1) - 1] per output
  channel (2 bits: the ternary {-1, 0, 1}), every activation on uint8 [0, 2^b - 1] (affine) -- except the
  logits, which keep the backend's 8-bit output quantizer: with 2^b levels, classes would tie. QAT uses
  ``FakeQuantize`` with moving-average min/max observers; PTQ a ``HistogramObserver`` for activations
  and a per-channel min/max observer for weights. The int8 kernels run these narrow grids unchanged
  (every code fits uint8 / int8); like torch.ao's, they clamp a layer's output codes to [0, 255], not
  to [0, 2^b - 1], where a value exceeds the range observed in training.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

import torch
from torch import nn

from ..check.engine import quantized_engine

__all__ = ["DigitsCNN", "Library", "minqat_library", "torch_ao_library", "qat_qconfig", "ptq_qconfig",
           "classifier_qconfig", "FUSE_GROUPS"]

# the conv-BN-ReLU triples fused by fuse_modules_qat (QAT) and fuse_modules (PTQ)
FUSE_GROUPS = [["block1.0", "block1.1", "block1.2"], ["block2.0", "block2.1", "block2.2"]]


class DigitsCNN(nn.Module):
    """QuantStub -> conv 3x3 1->16 + BN + ReLU -> conv 3x3/2 16->32 + BN + ReLU -> flatten -> fc 512->10 -> DeQuantStub.

    >>> from minqat import QuantStub, DeQuantStub
    >>> DigitsCNN(QuantStub, DeQuantStub)(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    """

    def __init__(self, quant_stub: Callable[[], nn.Module], dequant_stub: Callable[[], nn.Module]):
        super().__init__()
        self.quant = quant_stub()
        self.block1 = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32),
                                    nn.ReLU())
        self.fc = nn.Linear(32 * 4 * 4, 10)
        self.dequant = dequant_stub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, 1, 8, 8)
        x = self.quant(x)
        x = self.block1(x)  # (N, 16, 8, 8)
        x = self.block2(x)  # (N, 32, 4, 4)
        x = torch.flatten(x, 1)  # (N, 512)
        return self.dequant(self.fc(x))  # (N, 10) logits


@dataclass(frozen=True)
class Library:
    """What the flow needs from ``minqat`` or ``torch.ao.quantization`` (``ns``: the namespace)."""

    name: str
    ns: ModuleType
    quant_stub: type
    dequant_stub: type
    freeze_bn_stats: Callable[[nn.Module], None]
    act_dtype: torch.dtype
    weight_dtype: torch.dtype
    engine: str | None = None  # torch.backends.quantized.engine pinned around convert and int8 inference

    def int8_context(self):
        """torch.ao packs weights for, and runs on, the current engine: pin it (numerics.md §6.8, §7.3)."""
        return quantized_engine(self.engine) if self.engine else contextlib.nullcontext()

    def build(self) -> DigitsCNN:
        return DigitsCNN(self.quant_stub, self.dequant_stub)



def minqat_library() -> Library:
    import minqat

    return Library("minqat", minqat, minqat.QuantStub, minqat.DeQuantStub, minqat.freeze_bn_stats,
                   torch.uint8, torch.int8)


def torch_ao_library() -> tuple[Library | None, str | None]:
    """torch.ao's side of the flow, pinned to the fbgemm engine (minqat's int8 kernels reproduce fbgemm's
    arithmetic; x86 convolutions may run on oneDNN, numerics.md §7.3), or ``(None, why)`` where it is
    missing. Imported here, lazily: minqat itself never imports torch.ao."""
    try:
        import torch.ao.nn.intrinsic.qat as tniqat
        import torch.ao.quantization as tq
    except ImportError as err:
        return None, f"torch.ao.quantization is not importable ({err})"
    if not hasattr(tq, "prepare_qat") or not hasattr(torch.ops.quantized, "conv2d_relu"):
        return None, f"torch {torch.__version__} has no eager-mode quantization (prepare_qat / quantized ops)"
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return None, "torch's fbgemm engine is missing here (the int8 kernels minqat reproduces)"
    quint8, qint8 = getattr(torch, "quint8", None), getattr(torch, "qint8", None)  # legacy dtypes, torch.ao's only
    if quint8 is None or qint8 is None:
        return None, f"torch {torch.__version__} has no quantized dtypes"
    return Library("torch.ao", tq, tq.QuantStub, tq.DeQuantStub, tniqat.freeze_bn_stats, quint8, qint8,
                   engine="fbgemm"), None


def _low_bit_ranges(bits: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(activation, weight) integer ranges of a ``bits``-bit setting: [0, 2^b - 1], symmetric +-(2^(b-1) - 1).

    >>> _low_bit_ranges(4)
    ((0, 15), (-7, 7))
    """
    return (0, 2 ** bits - 1), (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1)


def qat_qconfig(lib: Library, bits: int, backend: str):
    """The QConfig of QAT at ``bits`` (see the module docstring)."""
    if bits == 8:
        return lib.ns.get_default_qat_qconfig(backend)
    (a_min, a_max), (w_min, w_max) = _low_bit_ranges(bits)
    ns = lib.ns
    return ns.QConfig(
        activation=ns.FakeQuantize.with_args(observer=ns.MovingAverageMinMaxObserver, quant_min=a_min,
                                             quant_max=a_max, dtype=lib.act_dtype, qscheme=torch.per_tensor_affine),
        weight=ns.FakeQuantize.with_args(observer=ns.MovingAveragePerChannelMinMaxObserver, quant_min=w_min,
                                         quant_max=w_max, dtype=lib.weight_dtype,
                                         qscheme=torch.per_channel_symmetric, ch_axis=0))


def ptq_qconfig(lib: Library, bits: int, backend: str):
    """The QConfig of post-training quantization at ``bits`` (see the module docstring)."""
    if bits == 8:
        return lib.ns.get_default_qconfig(backend)
    (a_min, a_max), (w_min, w_max) = _low_bit_ranges(bits)
    ns = lib.ns
    return ns.QConfig(
        activation=ns.HistogramObserver.with_args(quant_min=a_min, quant_max=a_max, dtype=lib.act_dtype),
        weight=ns.PerChannelMinMaxObserver.with_args(quant_min=w_min, quant_max=w_max, dtype=lib.weight_dtype,
                                                     qscheme=torch.per_channel_symmetric))


def classifier_qconfig(lib: Library, bits: int, backend: str, qat: bool):
    """The classifier's QConfig: ``bits``-bit weights like every layer, but the backend's 8-bit output
    quantizer for the logits (None at 8 bits: the model's qconfig already is the backend's)."""
    if bits == 8:
        return None
    make = qat_qconfig if qat else ptq_qconfig
    return lib.ns.QConfig(activation=make(lib, 8, backend).activation, weight=make(lib, bits, backend).weight)
