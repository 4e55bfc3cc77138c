"""Observers: running min/max statistics of the tensors seen in training -> qparams.

An observer is an ``nn.Module`` whose ``forward(x)`` returns ``x`` unchanged and updates buffers
``min_val`` / ``max_val``; ``calculate_qparams()`` hands them to :func:`minqat.qparams.calculate_qparams`.
Four observers, bit-exact with torch.ao.quantization's classes of the same names (numerics.md §3.2):

==========================================  =============================================================
``MinMaxObserver``                          ``min = minimum(min(x), min)``, ``max = maximum(max(x), max)``
``MovingAverageMinMaxObserver``             first batch: ``min, max = aminmax(x)``; then the EMA
                                            ``min = min + c * (min(x) - min)`` (float32, c rounded to float32)
``PerChannelMinMaxObserver``                the MinMax rule per slice along ``ch_axis``
``MovingAveragePerChannelMinMaxObserver``   the moving-average rule per slice along ``ch_axis``
==========================================  =============================================================

Buffers have torch.ao's names, shapes and state-dict version, so state dicts load both ways with
``strict=True``: per-tensor ``min_val``/``max_val`` are 0-d (+inf / -inf until the first batch),
per-channel ones start empty (shape [0]) and take the channel count of the first batch. That change
of shape swaps the buffer's storage (:func:`_resize_buffer`) instead of ``Tensor.resize_``, which
torch.ao uses and which fails on a model ``torch.load``-ed before its first batch.

Differences from torch.ao, all at the public boundary: bad arguments raise ``ValueError`` (torch
asserts or raises ``NotImplementedError``); on CPU a batch containing NaN or +-inf raises ``ValueError``
instead of silently turning the qparams into NaN (on accelerators the check would need a host sync, so
it is skipped and NaN propagates exactly like torch.ao); the moving average's first-batch test is a
``torch.where`` rather than a Python ``if`` on tensor values (same bits, no host sync); a whole
observer saved with ``torch.save`` before its first batch trains after ``torch.load`` (torch.ao's
raises "Trying to resize storage that is not resizable").

>>> obs = MovingAverageMinMaxObserver(averaging_constant=0.5)
>>> _ = obs(torch.tensor([-1.0, 2.0])); _ = obs(torch.tensor([0.0, 4.0]))
>>> obs.min_val, obs.max_val  # first batch as is, then the average with c = 0.5
(tensor(-0.5000), tensor(3.))
>>> obs.calculate_qparams()  # affine, uint8 [0, 255]: scale = 3.5 / 255, zero point = rint(0.5 / scale)
(tensor([0.0137]), tensor([36], dtype=torch.int32))
"""
from __future__ import annotations

import functools
import math
import numbers
import warnings

import torch
from torch import nn

from ._checks import check_axis, reads_values
from .dtypes import plain_dtype
from .qparams import (
    FLOAT32_EPS,
    PER_CHANNEL_QSCHEMES,
    PER_TENSOR_QSCHEMES,
    SYMMETRIC_QSCHEMES,
    calculate_qmin_qmax,
    calculate_qparams,
    check_qscheme,
)

__all__ = [
    "ObserverFactory",
    "ObserverBase",
    "UniformQuantizationObserverBase",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "PerChannelMinMaxObserver",
    "MovingAveragePerChannelMinMaxObserver",
]


class ObserverFactory(functools.partial):
    """A class with some constructor keywords bound, made by ``Observer.with_args(**kwargs)``.

    Each call builds a fresh module (keywords given at the call win); ``.with_args`` binds more.
    ``.func`` is the class and ``.keywords`` the bound arguments.

    >>> factory = MinMaxObserver.with_args(dtype=torch.int8).with_args(qscheme=torch.per_tensor_symmetric)
    >>> factory.keywords
    {'dtype': torch.int8, 'qscheme': torch.per_tensor_symmetric}
    >>> factory() is factory()
    False
    """

    def with_args(self, **kwargs) -> ObserverFactory:
        return ObserverFactory(self, **kwargs)


def _resize_buffer(buffer: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Give ``buffer`` the shape ``shape`` in place, on a fresh storage of its dtype and device.

    Per-channel buffers (observer ``min_val``/``max_val``, fake-quant ``scale``/``zero_point``) take
    their size from the first batch or from a loaded state dict. torch.ao sizes them with
    ``Tensor.resize_``, which fails ("Trying to resize storage that is not resizable") when the
    storage came from ``torch.load`` (or numpy, or a memory map), and then leaves the tensor claiming
    the new shape over a 0-byte storage. ``buffer.set_(new)`` swaps the storage instead: the tensor
    *object* stays the module's buffer, so every holder of a reference to it (a hook, a cached
    ``named_buffers()`` list) sees the new shape exactly as after ``resize_``; only views taken
    before keep the old storage. The new contents are uninitialised (callers ``copy_`` or ``fill_`` next, as after a
    growing ``resize_``). The same shape: nothing happens, not even an allocation. No host sync.

    >>> b = torch.tensor([], dtype=torch.int32)
    >>> _resize_buffer(b, (3,)) is b, b.shape, b.dtype
    (True, torch.Size([3]), torch.int32)
    """
    shape = torch.Size(shape)
    if buffer.shape != shape:
        buffer.set_(torch.empty(shape, dtype=buffer.dtype, device=buffer.device))
    return buffer


class ObserverBase(nn.Module):
    """Base of all observers: ``forward(x)`` records statistics and returns ``x``;
    ``calculate_qparams()`` returns ``(scale, zero_point)``. ``dtype`` is stored as a plain integer
    dtype (``torch.quint8`` becomes ``torch.uint8``)."""

    def __init__(self, dtype: torch.dtype, is_dynamic: bool = False) -> None:
        super().__init__()
        self.dtype = plain_dtype(dtype)
        self.is_dynamic = bool(is_dynamic)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    @classmethod
    def with_args(cls, **kwargs) -> ObserverFactory:
        """A factory building this observer with ``kwargs`` (torch.ao's ``with_args``)."""
        return ObserverFactory(cls, **kwargs)


class UniformQuantizationObserverBase(ObserverBase):
    """Validated configuration (dtype, qscheme, integer range, eps) shared by the min/max observers.

    Subclasses own the ``min_val`` / ``max_val`` buffers and the ``forward`` that updates them.
    """

    # torch.ao's state-dict version; its loader resets ``eps`` for versions < 2 and renames
    # per-channel buffers for versions < 3, so ours must say 3 for state dicts to interchange.
    _version = 3
    _qschemes: tuple = PER_TENSOR_QSCHEMES + PER_CHANNEL_QSCHEMES
    eps: torch.Tensor
    min_val: torch.Tensor
    max_val: torch.Tensor

    def __init__(self, dtype, qscheme, reduce_range, quant_min, quant_max, factory_kwargs, eps,
                 is_dynamic) -> None:
        super().__init__(dtype, is_dynamic)
        self.qscheme = check_qscheme(qscheme, self._qschemes, name=f"{type(self).__name__}'s qscheme")
        self.reduce_range = bool(reduce_range)
        if (quant_min is None) != (quant_max is None):
            raise ValueError(
                "quant_min and quant_max must be given together (a custom range) or both be None, "
                f"got quant_min={quant_min!r}, quant_max={quant_max!r}"
            )
        self.has_customized_qrange = quant_min is not None
        self.quant_min, self.quant_max = calculate_qmin_qmax(
            quant_min, quant_max, self.has_customized_qrange, self.dtype, self.reduce_range
        )
        if self.qscheme in SYMMETRIC_QSCHEMES and self.reduce_range and self.dtype == torch.uint8:
            # the fixed zero point 128 would lie outside the reduced range [0, 127]
            raise ValueError("reduce_range=True is not supported with symmetric qscheme and dtype uint8 (quint8)")
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"eps must be a positive finite number, got {eps!r}")
        self.register_buffer("eps", torch.tensor([float(eps)], **nn.factory_kwargs(factory_kwargs)))

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero_point)`` from the running min/max (numerics.md §3.3).

        Never observed (empty buffers, or +inf / -inf): warns and returns torch.ao's defaults
        ``scale = [1.0]``, ``zero_point = [0]`` (int64). On an accelerator the +inf / -inf test would
        need a host sync, so there the defaults are blended in with ``torch.where`` (no warning; the
        zero point keeps the scheme's dtype). On CPU ``min_val > max_val`` (a corrupt state) raises.
        """
        min_val, max_val = self.min_val, self.max_val
        if self._never_observed():
            warnings.warn("must run observer before calling calculate_qparams. Returning default values.",
                          stacklevel=2)
            return (torch.ones(1, dtype=torch.float32, device=min_val.device),
                    torch.zeros(1, dtype=torch.int64, device=min_val.device))
        if reads_values(min_val) and bool((min_val > max_val).any()):
            raise ValueError(f"min_val must not exceed max_val, got min_val={min_val}, max_val={max_val}")
        scale, zero_point = calculate_qparams(min_val, max_val, self.quant_min, self.quant_max, self.qscheme,
                                              self.dtype, self.eps, self.has_customized_qrange)
        if min_val.dim() == 0 and not reads_values(min_val):
            unobserved = (min_val == math.inf) & (max_val == -math.inf)
            scale = torch.where(unobserved, torch.ones_like(scale), scale)
            zero_point = torch.where(unobserved, torch.zeros_like(zero_point), zero_point)
        return scale, zero_point

    def _never_observed(self) -> bool:
        if self.min_val.numel() == 0 or self.max_val.numel() == 0:
            return True
        if self.min_val.dim() == 0 and reads_values(self.min_val):
            return bool((self.min_val == math.inf) & (self.max_val == -math.inf))
        return False

    def _check_finite(self, min_cur: torch.Tensor, max_cur: torch.Tensor) -> None:
        """On CPU, reject a batch whose min or max is NaN or +-inf (they would poison the statistics)."""
        if reads_values(min_cur) and not bool((torch.isfinite(min_cur) & torch.isfinite(max_cur)).all()):
            raise ValueError(
                f"{type(self).__name__} observed a non-finite value (NaN or +-inf) in its input: "
                f"batch min={min_cur}, max={max_cur}"
            )

    def extra_repr(self) -> str:
        return (f"dtype={self.dtype}, qscheme={self.qscheme}, quant_min={self.quant_min}, "
                f"quant_max={self.quant_max}, min_val={self.min_val}, max_val={self.max_val}")


def _moving_average(running: torch.Tensor, current: torch.Tensor, averaging_constant: float) -> torch.Tensor:
    """``running + c * (current - running)``: three float32 ops, ``c`` rounded to float32 first
    (numerics.md §0, §3.2). Written exactly like torch.ao; ``(1 - c) * running + c * current`` differs."""
    return running + averaging_constant * (current - running)


def _check_averaging_constant(averaging_constant, is_dynamic: bool) -> float:
    c = averaging_constant
    if isinstance(c, bool) or not isinstance(c, numbers.Real) or not 0 < c <= 1:
        raise ValueError(f"averaging_constant must be a number in (0, 1], got {c!r}")
    if is_dynamic and c != 1:
        raise ValueError(f"is_dynamic=True needs averaging_constant=1, got {c!r}")
    return c


# ---------------------------------------------------------------------------------------------------
# per tensor
# ---------------------------------------------------------------------------------------------------


class MinMaxObserver(UniformQuantizationObserverBase):
    """Running minimum and maximum of every tensor seen (numerics.md §3.2).

    ``min_val = minimum(min(x), min_val)``, ``max_val = maximum(max(x), max_val)``, starting from
    +inf / -inf; qparams as in :func:`minqat.qparams.calculate_qparams` (per-tensor schemes only).

    >>> obs = MinMaxObserver(dtype=torch.int8, qscheme=torch.per_tensor_symmetric)
    >>> _ = obs(torch.tensor([-0.5, 1.0])); _ = obs(torch.tensor([-2.0]))
    >>> obs.min_val, obs.max_val
    (tensor(-2.), tensor(1.))
    >>> obs.calculate_qparams()  # scale = 2 / 127.5
    (tensor([0.0157]), tensor([0]))
    """

    _qschemes = PER_TENSOR_QSCHEMES

    def __init__(
        self,
        dtype: torch.dtype = torch.uint8,
        qscheme: torch.qscheme = torch.per_tensor_affine,
        reduce_range: bool = False,
        quant_min: int | None = None,
        quant_max: int | None = None,
        factory_kwargs: dict | None = None,
        eps: float = FLOAT32_EPS,
        is_dynamic: bool = False,
    ) -> None:
        super().__init__(dtype, qscheme, reduce_range, quant_min, quant_max, factory_kwargs, eps, is_dynamic)
        factory_kwargs = nn.factory_kwargs(factory_kwargs)
        self.register_buffer("min_val", torch.tensor(float("inf"), **factory_kwargs))  # ()
        self.register_buffer("max_val", torch.tensor(float("-inf"), **factory_kwargs))  # ()

    def forward(self, x_orig: torch.Tensor) -> torch.Tensor:
        """Fold ``x_orig`` into the running min/max; return it unchanged (empty input: no update)."""
        if x_orig.numel() == 0:
            return x_orig
        x = x_orig.detach().to(self.min_val.dtype)
        min_val_cur, max_val_cur = torch.aminmax(x)  # 0-d each
        self._check_finite(min_val_cur, max_val_cur)
        min_val, max_val = self._combine(min_val_cur, max_val_cur)
        self.min_val.copy_(min_val)
        self.max_val.copy_(max_val)
        return x_orig

    def _combine(self, min_val_cur: torch.Tensor, max_val_cur: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # argument order as in torch.ao: it decides which zero wins in minimum(-0.0, 0.0)
        return torch.min(min_val_cur, self.min_val), torch.max(max_val_cur, self.max_val)

    def reset_min_max_vals(self) -> None:
        """Forget everything observed: back to +inf / -inf."""
        self.min_val.fill_(math.inf)
        self.max_val.fill_(-math.inf)


class MovingAverageMinMaxObserver(MinMaxObserver):
    """Exponential moving average of the per-batch min and max (numerics.md §3.2).

    First batch (``min_val == +inf and max_val == -inf``): ``min_val, max_val = aminmax(x)``.
    Afterwards ``min_val = min_val + c * (min(x) - min_val)`` and the same for ``max_val``, with
    ``c = averaging_constant`` (default 0.01) rounded to float32. The first-batch test is a
    ``torch.where`` on the buffers, so no value is read back to the host.

    >>> obs = MovingAverageMinMaxObserver(averaging_constant=0.25)
    >>> for x in (torch.tensor([0.0, 4.0]), torch.tensor([0.0, 8.0])):
    ...     _ = obs(x)
    >>> obs.max_val  # 4 + 0.25 * (8 - 4)
    tensor(5.)
    """

    def __init__(
        self,
        averaging_constant: float = 0.01,
        dtype: torch.dtype = torch.uint8,
        qscheme: torch.qscheme = torch.per_tensor_affine,
        reduce_range: bool = False,
        quant_min: int | None = None,
        quant_max: int | None = None,
        eps: float = FLOAT32_EPS,
        is_dynamic: bool = False,
        *,
        factory_kwargs: dict | None = None,
    ) -> None:
        self.averaging_constant = _check_averaging_constant(averaging_constant, is_dynamic)
        super().__init__(dtype, qscheme, reduce_range, quant_min, quant_max, factory_kwargs, eps, is_dynamic)

    def _combine(self, min_val_cur: torch.Tensor, max_val_cur: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        first_batch = (self.min_val == math.inf) & (self.max_val == -math.inf)  # 0-d bool, stays on device
        c = self.averaging_constant
        min_val = torch.where(first_batch, min_val_cur, _moving_average(self.min_val, min_val_cur, c))
        max_val = torch.where(first_batch, max_val_cur, _moving_average(self.max_val, max_val_cur, c))
        return min_val, max_val


# ---------------------------------------------------------------------------------------------------
# per channel
# ---------------------------------------------------------------------------------------------------


def _channel_rows(x: torch.Tensor, ch_axis: int) -> torch.Tensor:
    """``x`` as a (C, -1) matrix with one row per slice along ``ch_axis`` (dims 0 and ch_axis swapped)."""
    dims = list(range(x.dim()))
    dims[0], dims[ch_axis] = ch_axis, 0
    # reshape rather than torch.ao's flatten(start_dim=1), which fails on 1-d inputs (one value per channel)
    return x.permute(dims).reshape(x.shape[ch_axis], -1)  # (C, numel / C)


class PerChannelMinMaxObserver(UniformQuantizationObserverBase):
    """Running min and max of every slice along ``ch_axis`` (numerics.md §3.2).

    ``min_val[c] = minimum(min(x[..., c, ...]), min_val[c])`` (``max_val`` likewise); the buffers start
    empty and take the channel count of the first batch; later batches must have the same count.

    >>> obs = PerChannelMinMaxObserver(ch_axis=1, dtype=torch.int8, qscheme=torch.per_channel_symmetric)
    >>> _ = obs(torch.tensor([[-1.0, 0.5], [0.25, 2.0]]))
    >>> obs.min_val, obs.max_val
    (tensor([-1.0000,  0.5000]), tensor([0.2500, 2.0000]))
    """

    _qschemes = PER_CHANNEL_QSCHEMES

    def __init__(
        self,
        ch_axis: int = 0,
        dtype: torch.dtype = torch.uint8,
        qscheme: torch.qscheme = torch.per_channel_affine,
        reduce_range: bool = False,
        quant_min: int | None = None,
        quant_max: int | None = None,
        factory_kwargs: dict | None = None,
        eps: float = FLOAT32_EPS,
        is_dynamic: bool = False,
    ) -> None:
        if isinstance(ch_axis, bool) or not isinstance(ch_axis, numbers.Integral):
            raise ValueError(f"ch_axis must be an integer, got {ch_axis!r}")
        if is_dynamic:
            raise ValueError(f"{type(self).__name__} does not support is_dynamic=True")
        super().__init__(dtype, qscheme, reduce_range, quant_min, quant_max, factory_kwargs, eps, is_dynamic)
        self.ch_axis = int(ch_axis)
        factory_kwargs = nn.factory_kwargs(factory_kwargs)
        self.register_buffer("min_val", torch.tensor([], **factory_kwargs))  # (0,) until the first batch, then (C,)
        self.register_buffer("max_val", torch.tensor([], **factory_kwargs))

    def forward(self, x_orig: torch.Tensor) -> torch.Tensor:
        """Fold each channel of ``x_orig`` into the running min/max; return it unchanged."""
        if x_orig.numel() == 0:
            return x_orig
        ch_axis = check_axis(self.ch_axis, x_orig.dim(), "ch_axis")
        y = _channel_rows(x_orig.detach().to(self.min_val.dtype), ch_axis)  # (C, N)
        min_val_cur, max_val_cur = torch.aminmax(y, dim=1)  # (C,) each
        self._check_finite(min_val_cur, max_val_cur)
        if self.min_val.numel() == 0 or self.max_val.numel() == 0:  # first batch (a shape test: no sync)
            min_val, max_val = min_val_cur, max_val_cur
        elif self.min_val.shape != min_val_cur.shape:
            raise ValueError(
                f"{type(self).__name__} has seen {self.min_val.numel()} channels along ch_axis={self.ch_axis}, "
                f"got an input of shape {tuple(x_orig.shape)} with {min_val_cur.numel()}"
            )
        else:
            min_val, max_val = self._combine(min_val_cur, max_val_cur)
        _resize_buffer(self.min_val, min_val.shape)  # (0,) -> (C,) on the first batch
        _resize_buffer(self.max_val, max_val.shape)
        self.min_val.copy_(min_val)
        self.max_val.copy_(max_val)
        return x_orig

    def _combine(self, min_val_cur: torch.Tensor, max_val_cur: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.min(min_val_cur, self.min_val), torch.max(max_val_cur, self.max_val)

    def reset_min_max_vals(self) -> None:
        """Forget everything observed: back to empty buffers."""
        _resize_buffer(self.min_val, (0,))
        _resize_buffer(self.max_val, (0,))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # The buffers are sized by the data; take the stored size (torch.ao does the same, with resize_).
        for name in ("min_val", "max_val"):
            if prefix + name in state_dict:
                _resize_buffer(getattr(self, name), state_dict[prefix + name].shape)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


class MovingAveragePerChannelMinMaxObserver(PerChannelMinMaxObserver):
    """Exponential moving average of each channel's min and max (numerics.md §3.2, §3.4).

    First batch (empty buffers): the batch's per-channel min/max. Then, per channel,
    ``min_val = min_val + c * (min(x_c) - min_val)`` (``max_val`` likewise), ``c`` rounded to float32.

    >>> obs = MovingAveragePerChannelMinMaxObserver(averaging_constant=0.5, dtype=torch.int8,
    ...                                             qscheme=torch.per_channel_symmetric)
    >>> _ = obs(torch.tensor([[1.0], [2.0]])); _ = obs(torch.tensor([[3.0], [2.0]]))
    >>> obs.max_val
    tensor([2., 2.])
    """

    def __init__(
        self,
        averaging_constant: float = 0.01,
        ch_axis: int = 0,
        dtype: torch.dtype = torch.uint8,
        qscheme: torch.qscheme = torch.per_channel_affine,
        reduce_range: bool = False,
        quant_min: int | None = None,
        quant_max: int | None = None,
        eps: float = FLOAT32_EPS,
        is_dynamic: bool = False,
        *,
        factory_kwargs: dict | None = None,
    ) -> None:
        self.averaging_constant = _check_averaging_constant(averaging_constant, is_dynamic)
        super().__init__(ch_axis, dtype, qscheme, reduce_range, quant_min, quant_max, factory_kwargs, eps, is_dynamic)

    def _combine(self, min_val_cur: torch.Tensor, max_val_cur: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (_moving_average(self.min_val, min_val_cur, self.averaging_constant),
                _moving_average(self.max_val, max_val_cur, self.averaging_constant))
