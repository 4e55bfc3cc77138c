"""What an int8 conv / linear keeps between calls: its packed weight and requantization constants.

fbgemm packs a layer's weight once (``PackedLinearWeight`` / ``PackedConvWeight``) and reuses it; minqat's int8
``Linear`` and ``Conv2d`` do the same on CPU. :class:`PreparedLayer` holds what depends only on the layer and
the qparams -- the packed weight (``minqat.kernels.linear.pack_weight``), the input offset's term, the bound
requantization, the checked output qparams -- and :class:`LayerCache` keeps it until any of its sources
changes (a new or written-in-place weight buffer, a new scale or zero point, another requantization mode).
The integers never depend on the cache: ``tests/test_quantized_modules.py`` checks the cached calls against
the kernel functions, which check and pack on every call, after every kind of change.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..._checks import reads_values
from ...dtypes import dtype_range
from ...functional.qparams_args import per_tensor_zero_point
from ...kernels.linear import PackedWeight, int8_offset
from ...qtensor import QTensor

__all__ = ["LayerCache", "PreparedLayer"]


def _stamp(value):
    """``value`` as part of a cache key, read only where that is free:

    * a Python number or string: itself;
    * a one-element CPU tensor (a scale, a zero point): its value and dtype -- a ``QTensor`` may carry a new
      view of the same scale buffer on every call;
    * any other tensor: its object, storage and version counter (bumped by every in-place write, e.g.
      ``load_state_dict``'s ``copy_``), never its values. An inference-mode tensor has no version counter:
      it gets a key that matches nothing, so it is never cached.
    """
    if not isinstance(value, torch.Tensor):
        return value
    if value.numel() == 1 and reads_values(value):
        return value.item(), value.dtype
    try:
        return id(value), value.data_ptr(), value._version
    except RuntimeError:  # "Inference tensors do not track version counter"
        return object()


class LayerCache:
    """One value derived from a layer's buffers and qparams, kept until any of its sources changes.

    ``get(sources, compute)`` returns the kept value if every source has the stamp it had when the value
    was computed (:func:`_stamp`), else ``compute()``'s. A new tensor (``set_weight_bias``, ``.to()``,
    ``load_state_dict``), an in-place write, a new scale or mode: each changes a stamp. The sources stay
    referenced, so no stamp's ``id`` or storage can pass to a new tensor while it is kept.

    >>> cache, t = LayerCache(), torch.zeros(2)
    >>> cache.get((t, 0.5), lambda: "computed")
    'computed'
    >>> cache.get((t, 0.5), lambda: "again"), cache.get((t.add_(1), 0.5), lambda: "after an in-place write")
    ('computed', 'after an in-place write')
    """

    def __init__(self):
        self._entry: tuple = (None, None, ())  # (key, value, sources), replaced whole: a reader sees one entry

    def get(self, sources: tuple, compute: Callable[[], object]):
        key = tuple(_stamp(source) for source in sources)
        entry = self._entry
        if key != entry[0]:
            entry = self._entry = (key, compute(), sources)
        return entry[1]

    def __reduce__(self):  # a copied or pickled module starts with an empty cache (the stamps name old objects)
        return LayerCache, ()


@dataclass(frozen=True)
class PreparedLayer:
    """What an int8 conv / linear derives from its weight and qparams for its integer path (CPU), once:
    the packed weight of the int8 GEMM (or a depthwise conv's centred int32 taps,
    ``minqat.kernels.conv.depthwise_weight``), the input zero point ``z_x`` and offset ``d``
    (``x - z_x = x' + d``) and its term ``packed.offset(d)``, the bound requantization, and the output
    qparams as ``QTensor`` normalises them."""

    packed: PackedWeight | torch.Tensor  # the GEMM operand, or (kh, kw, C, m) int32 depthwise taps
    z_x: int
    d: int
    offset: torch.Tensor | None  # (C,) int32; None for depthwise taps
    requantize: Callable[[torch.Tensor], torch.Tensor]  # int32 (..., C) -> (..., C) integers
    output_qparams: tuple  # (scale, zero_point)

    @classmethod
    def build(cls, packed: PackedWeight | torch.Tensor, x_int: torch.Tensor, x_zero_point, requantize, y_scale,
              y_zero_point):
        """Check ``x_zero_point`` and the output qparams against ``x_int``'s dtype, then bundle."""
        qmin, qmax = dtype_range(x_int.dtype)
        z_x = per_tensor_zero_point(x_zero_point, qmin, qmax, x_int.device, name="x_zero_point")
        d = int8_offset(x_int.dtype, z_x)
        output = QTensor(torch.zeros((), dtype=x_int.dtype), y_scale, y_zero_point)  # checked, normalised once
        offset = packed.offset(d) if isinstance(packed, PackedWeight) else None
        return cls(packed, int(z_x), int(d), offset, requantize, (output.scale, output.zero_point))
