"""FakeQuantize modules: an observer, the fake-quant math and two on/off switches.

A fake-quant module sits where a tensor would be quantized in the int8 model. Each call (numerics.md
§4.1):

1. if the observer is on: the observer folds ``x`` into its running min/max and the module copies
   the observer's *just updated* ``(scale, zero_point)`` into its buffers;
2. if fake quant is on: ``x_hat = (clamp(rint(x * fl32(1/scale)) + zero_point, quant_min,
   quant_max) - zero_point) * scale`` (``minqat.functional.fake_quantize``, clipped STE backward).

Three modules, bit-exact with torch.ao.quantization's classes (outputs, input gradients, buffers):

* :class:`FakeQuantize` -- any minqat observer + the Python qparams of ``minqat/qparams.py``;
* :class:`FusedMovingAvgObsFakeQuantize` -- what torch's default QAT qconfig builds: the moving
  average with a per-element re-seed and fbgemm's qparams (``minqat/qparams_fbgemm.py``, §4.2);
* :class:`LearnableFakeQuantize` -- LSQ (Esser et al. 2020): ``scale``/``zero_point`` are Parameters.

**No host synchronisation in forward.** torch.ao tests ``observer_enabled[0] == 1`` (a tensor read)
on every call; minqat keeps each switch as a Python bool that forward reads, and mirrors it into
the buffer of torch's name and dtype so state dicts interchange with torch.ao (``strict=True``).
The bools are set by the ``enable_*``/``disable_*`` methods (and the module-level helpers for
``model.apply``), copied by ``deepcopy``/pickle, and re-read from the buffers by ``load_state_dict``.
Writing a buffer directly (``fq.observer_enabled[0] = 0``) is *not* seen by forward: use the methods.

>>> fq = FakeQuantize(quant_min=0, quant_max=255)            # MovingAverageMinMaxObserver, uint8
>>> fq(torch.tensor([-1.0, 0.0, 0.5, 3.0]))   # scale 4/255, zero point 64; 3.0 -> 191.25 + 64, clamped
tensor([-1.0039,  0.0000,  0.5020,  2.9961])
>>> fq.scale, fq.zero_point
(tensor([0.0157]), tensor([64], dtype=torch.int32))
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from ._checks import check_quant_range
from .dtypes import dtype_range
from .functional.fake_quantize import fake_quantize_per_channel_affine, fake_quantize_per_tensor_affine
from .functional.learnable import (
    fake_quantize_learnable_per_channel_affine,
    fake_quantize_learnable_per_tensor_affine,
)
from .observers import (
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    ObserverFactory,
    _resize_buffer,
)
from .qparams import PER_CHANNEL_QSCHEMES, PER_TENSOR_QSCHEMES, SYMMETRIC_QSCHEMES
from .qparams_fbgemm import choose_qparams_fbgemm

__all__ = [
    "FakeQuantizeBase",
    "FakeQuantize",
    "FusedMovingAvgObsFakeQuantize",
    "LearnableFakeQuantize",
    "enable_observer",
    "disable_observer",
    "enable_fake_quant",
    "disable_fake_quant",
]


def _check_bounds(quant_min: int, quant_max: int, dtype: torch.dtype) -> None:
    """The requested range must fit the observer's dtype (torch.ao: "quant_min out of bound")."""
    lo, hi = dtype_range(dtype)
    if quant_min < lo:
        raise ValueError(f"quant_min must be >= {lo}, the smallest value of dtype {dtype}, got {quant_min}")
    if quant_max > hi:
        raise ValueError(f"quant_max must be <= {hi}, the largest value of dtype {dtype}, got {quant_max}")


class FakeQuantizeBase(nn.Module):
    """The two switches every fake-quant module has: Python bools mirrored into buffers.

    ``fake_quant_enabled`` / ``observer_enabled`` are ``[1]`` buffers of dtype ``_flag_dtype``
    (uint8 like torch.ao's ``FakeQuantizeBase``; int64 in the fused module).
    """

    _flag_dtype = torch.uint8
    fake_quant_enabled: torch.Tensor
    observer_enabled: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self._fake_quant_on = True
        self._observer_on = True
        self.register_buffer("fake_quant_enabled", torch.tensor([1], dtype=self._flag_dtype))
        self.register_buffer("observer_enabled", torch.tensor([1], dtype=self._flag_dtype))

    def enable_fake_quant(self, enabled: bool = True) -> None:
        self._fake_quant_on = bool(enabled)
        self.fake_quant_enabled.fill_(int(self._fake_quant_on))  # a device fill: no host copy

    def disable_fake_quant(self) -> None:
        self.enable_fake_quant(False)

    def enable_observer(self, enabled: bool = True) -> None:
        self._observer_on = bool(enabled)
        self.observer_enabled.fill_(int(self._observer_on))

    def disable_observer(self) -> None:
        self.enable_observer(False)

    @classmethod
    def with_args(cls, **kwargs) -> ObserverFactory:
        """A factory building this module with ``kwargs`` bound (torch.ao's ``with_args``)."""
        return ObserverFactory(cls, **kwargs)

    def _read_flags(self) -> None:
        """Buffers -> Python bools (after ``load_state_dict``; one host read, never in forward)."""
        self._fake_quant_on = bool(self.fake_quant_enabled[0])
        self._observer_on = bool(self.observer_enabled[0])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._read_flags()


class FakeQuantize(FakeQuantizeBase):
    r"""Observer + fake quantization, torch.ao's ``FakeQuantize`` (numerics.md §4.1).

    ``observer`` is an observer class or factory (``MovingAverageMinMaxObserver.with_args(...)``),
    built with ``observer_kwargs``; ``quant_min``/``quant_max`` (both or neither) are passed to it
    as a custom range and must fit its dtype. ``quant_min``, ``quant_max``, ``dtype``, ``qscheme``,
    ``ch_axis`` (-1 per tensor) and ``is_per_channel`` are copied from the built observer; the
    range applied is the observer's (``reduce_range`` halves it).

    Buffers: ``scale`` (float32) and ``zero_point`` (int32; float32 for the float-qparams scheme),
    shape ``[1]`` until a per-channel observer resizes them to ``[C]`` (in place, on a fresh storage:
    ``minqat.observers._resize_buffer``, so a module ``torch.load``-ed before its first batch works).

    >>> fq = FakeQuantize(MovingAveragePerChannelMinMaxObserver, quant_min=-128, quant_max=127,
    ...                   dtype=torch.int8, qscheme=torch.per_channel_symmetric)
    >>> fq(torch.tensor([[1.0, -0.5], [0.3, 0.2]]))   # scales 1/127.5 and 0.3/127.5, zero points 0
    tensor([[ 0.9961, -0.5020],
            [ 0.2988,  0.2000]])
    >>> fq.scale.shape, fq.is_per_channel
    (torch.Size([2]), True)
    """

    scale: torch.Tensor
    zero_point: torch.Tensor

    def __init__(self, observer=MovingAverageMinMaxObserver, quant_min: int | None = None,
                 quant_max: int | None = None, is_dynamic: bool = False, **observer_kwargs) -> None:
        super().__init__()
        if (quant_min is None) != (quant_max is None):
            raise ValueError("quant_min and quant_max must be given together or both be None, "
                             f"got quant_min={quant_min!r}, quant_max={quant_max!r}")
        if quant_min is not None:
            quant_min, quant_max = check_quant_range(quant_min, quant_max)
            observer_kwargs.update(quant_min=quant_min, quant_max=quant_max)
        observer_kwargs["is_dynamic"] = is_dynamic
        self.activation_post_process = observer(**observer_kwargs)
        obs = self.activation_post_process
        if quant_min is not None:
            _check_bounds(quant_min, quant_max, obs.dtype)
        self.qscheme = obs.qscheme
        if self.qscheme not in PER_TENSOR_QSCHEMES + PER_CHANNEL_QSCHEMES:
            raise ValueError(f"the observer's qscheme must be per-tensor or per-channel, got {self.qscheme}")
        self.quant_min, self.quant_max = obs.quant_min, obs.quant_max
        self.is_dynamic = obs.is_dynamic
        self.dtype = obs.dtype
        self.ch_axis = getattr(obs, "ch_axis", -1)
        self.is_per_channel = self.qscheme in PER_CHANNEL_QSCHEMES
        float_zero_point = self.qscheme == torch.per_channel_affine_float_qparams
        self.register_buffer("scale", torch.tensor([1.0], dtype=torch.float32))
        self.register_buffer("zero_point", torch.tensor([0], dtype=torch.float32 if float_zero_point else torch.int32))

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The observer's ``(scale, zero_point)`` (``minqat.qparams.calculate_qparams``)."""
        return self.activation_post_process.calculate_qparams()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._observer_on:
            self.activation_post_process(x.detach())
            self._store_qparams(*self.calculate_qparams())  # the just-updated qparams (§4.1)
        if not self._fake_quant_on:
            return x
        return self._fake_quantize(x)

    def _store_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Copy qparams into the buffers, resizing them on a change of shape (a metadata test)."""
        _resize_buffer(self.scale, scale.shape)  # [1] -> [C] on a per-channel observer's first batch
        _resize_buffer(self.zero_point, zero_point.shape)
        self.scale.copy_(scale)  # copy_ converts device and dtype (an int64 zero point -> int32)
        self.zero_point.copy_(zero_point)

    def _fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        quant_min, quant_max = self.activation_post_process.quant_min, self.activation_post_process.quant_max
        if self.is_per_channel:
            return fake_quantize_per_channel_affine(x, self.scale, self.zero_point, self.ch_axis, quant_min,
                                                    quant_max)
        return fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, quant_min, quant_max)

    def extra_repr(self) -> str:
        return (f"fake_quant_enabled={self.fake_quant_enabled}, observer_enabled={self.observer_enabled}, "
                f"quant_min={self.activation_post_process.quant_min}, "
                f"quant_max={self.activation_post_process.quant_max}, dtype={self.dtype}, qscheme={self.qscheme}, "
                f"ch_axis={self.ch_axis}, scale={self.scale}, zero_point={self.zero_point}")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # The qparam buffers are sized by the data: take the stored size first (torch.ao does too, with resize_).
        for name in ("scale", "zero_point"):
            if prefix + name in state_dict:
                _resize_buffer(getattr(self, name), state_dict[prefix + name].shape)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


class FusedMovingAvgObsFakeQuantize(FakeQuantize):
    r"""torch.ao's fused observer + fake quant (``torch.fused_moving_avg_obs_fake_quant``, CPU; §4.2).

    The observer must be a ``MovingAverageMinMaxObserver`` or a ``MovingAveragePerChannelMinMaxObserver``
    with ``ch_axis=0``; only its buffers and settings are used, not its ``forward``. Each call:

    1. observer on: per tensor ``(m, M) = aminmax(x)``, per channel the min/max of each slice
       ``x[c]``; then, element-wise in float32 with ``c = fl32(averaging_constant)``::

           running = cur                              where running is +-inf (per element: re-seed)
           running = running + c * (cur - running)    elsewhere

    2. fake quant on: ``(scale, zero_point) = choose_qparams_fbgemm(running_min, running_max, ...)``,
       ``preserve_sparsity`` = symmetric qscheme, written into the buffers and used at once;
       otherwise the output is a copy of ``x``.

    **This module disagrees with itself.** Training uses fbgemm's qparams (above), but
    :meth:`calculate_qparams` -- which ``convert`` calls -- delegates to the observer's *Python*
    formula, exactly like torch.ao, so it returns different numbers than the ``scale``/``zero_point``
    buffers: the symmetric scale always differs (``max(|min|/128, max/127)`` vs ``max(|min|, max)/127.5``),
    one-signed channels of a symmetric scheme train affinely with a non-zero zero point, and tiny
    ranges train with scale 6.1e-5 instead of ``eps`` (see ``minqat/qparams_fbgemm.py``).

    Flags are int64 buffers here (torch.ao's dtype). Per channel, the running min/max start empty and
    take the channel count of the first input (which needs at least 2 dims, like torch's kernel).

    >>> fq = FusedMovingAvgObsFakeQuantize(MovingAverageMinMaxObserver, -128, 127, dtype=torch.int8,
    ...                                    qscheme=torch.per_tensor_symmetric)
    >>> fq(torch.tensor([-1.0, 0.25, 0.5]))                  # scale 1/128 (the Python formula: 1/127.5)
    tensor([-1.0000,  0.2500,  0.5000])
    >>> fq.scale, fq.calculate_qparams()[0]
    (tensor([0.0078]), tensor([0.0078]))
    >>> fq.scale.item() == 2**-7, fq.calculate_qparams()[0].item() == 2**-7
    (True, False)
    """

    _flag_dtype = torch.int64

    def __init__(self, observer=MovingAverageMinMaxObserver, quant_min: int = 0, quant_max: int = 255,
                 **observer_kwargs) -> None:
        super().__init__(observer, quant_min, quant_max, **observer_kwargs)
        obs = self.activation_post_process
        if not isinstance(obs, (MovingAverageMinMaxObserver, MovingAveragePerChannelMinMaxObserver)):
            raise ValueError("observer must build a MovingAverageMinMaxObserver or a "
                             f"MovingAveragePerChannelMinMaxObserver, got {type(obs).__name__}")
        if self.qscheme == torch.per_channel_affine_float_qparams:
            raise ValueError("qscheme torch.per_channel_affine_float_qparams is not supported by the fused module")
        if self.is_per_channel and self.ch_axis != 0:
            raise ValueError(f"ch_axis must be 0 for the fused per-channel module (torch's kernel), got {self.ch_axis}")
        self.is_symmetric_quant = self.qscheme in SYMMETRIC_QSCHEMES

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == 0:
            return x.clone()
        if self.is_per_channel:
            self._init_channels(x)
        if self._observer_on:
            self._observe(x.detach())
        if not self._fake_quant_on:
            return x.clone()
        obs = self.activation_post_process
        scale, zero_point = choose_qparams_fbgemm(obs.min_val, obs.max_val, obs.quant_min, obs.quant_max,
                                                  self.is_symmetric_quant)
        self._store_qparams(scale.reshape(self.scale.shape), zero_point.reshape(self.zero_point.shape))
        return self._fake_quantize(x)

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as a (C, -1) matrix, one row per channel along dim 0."""
        if x.dim() < 2:
            raise ValueError(f"per-channel fused fake quant needs an input with at least 2 dims, got shape "
                             f"{tuple(x.shape)}")
        return x.reshape(x.size(0), -1)

    def _init_channels(self, x: torch.Tensor) -> None:
        """First call per channel: size the running min/max (+-inf) and the qparam buffers to C."""
        obs, channels = self.activation_post_process, self._rows(x).size(0)
        if obs.min_val.numel() == 0:
            _resize_buffer(obs.min_val, (channels,)).fill_(math.inf)
            _resize_buffer(obs.max_val, (channels,)).fill_(-math.inf)
            _resize_buffer(self.scale, (channels,)).fill_(1.0)
            _resize_buffer(self.zero_point, (channels,)).fill_(0)
        elif obs.min_val.numel() != channels:
            raise ValueError(f"this module has seen {obs.min_val.numel()} channels, got an input of shape "
                             f"{tuple(x.shape)} with {channels}")

    def _observe(self, x: torch.Tensor) -> None:
        """The moving average with a per-element re-seed of infinite entries (numerics.md §4.2)."""
        obs = self.activation_post_process
        x = x.to(torch.float32)
        if self.is_per_channel:
            min_cur, max_cur = torch.aminmax(self._rows(x), dim=1)  # (C,)
        else:
            min_cur, max_cur = torch.aminmax(x)  # 0-d, like the buffers
        c = obs.averaging_constant  # a Python float: rounded to float32 in the product (§0)
        for running, cur in ((obs.min_val, min_cur), (obs.max_val, max_cur)):
            running.copy_(torch.where(torch.isinf(running), cur, running + c * (cur - running)))

    def extra_repr(self) -> str:
        obs = self.activation_post_process
        return (f"fake_quant_enabled={self.fake_quant_enabled}, observer_enabled={self.observer_enabled}, "
                f"scale={self.scale}, zero_point={self.zero_point}, dtype={self.dtype}, "
                f"quant_min={obs.quant_min}, quant_max={obs.quant_max}, qscheme={self.qscheme}, "
                f"reduce_range={obs.reduce_range}")


class LearnableFakeQuantize(FakeQuantizeBase):
    r"""LSQ fake quantization (Esser et al. 2020), torch.ao's ``_LearnableFakeQuantize`` (§2.5).

    ``scale`` and ``zero_point`` are float32 Parameters (``[1]``, or ``[channel_len]`` per channel).
    Each call:

    1. observer on ("static estimate"): the observer sees ``x`` and its qparams are copied into the
       Parameters; otherwise ``scale`` is clamped in place to ``>= eps`` (2^-23);
    2. fake quant on: symmetric qschemes zero ``zero_point`` in place, then
       ``minqat.functional.learnable`` with ``grad_factor = 1/sqrt(x.numel() * quant_max)`` if
       ``use_grad_scaling`` else 1.

    Buffers as torch.ao's: ``fake_quant_enabled``, ``observer_enabled`` (unused, as in torch),
    ``static_enabled`` (the observer switch), ``learning_enabled`` (uint8) and ``eps``. The eps clamp
    takes a tensor bound, so no step reads a value back to the host (torch's calls ``eps.item()``).

    >>> fq = LearnableFakeQuantize(MovingAverageMinMaxObserver, quant_min=0, quant_max=255)
    >>> y = fq(torch.tensor([-1.0, 0.5, 3.0]))                # observer on: scale 4/255, zero point 64
    >>> _ = fq.enable_param_learning()                        # observer off, gradients for the qparams
    >>> fq(torch.tensor([-1.0, 0.5, 3.0])).sum().backward()
    >>> fq.scale.grad is not None and fq.zero_point.grad is not None
    True
    """

    def __init__(self, observer, quant_min: int = 0, quant_max: int = 255, scale: float = 1.0,
                 zero_point: float = 0.0, channel_len: int = -1, use_grad_scaling: bool = False,
                 **observer_kwargs) -> None:
        super().__init__()
        quant_min, quant_max = check_quant_range(quant_min, quant_max)
        if channel_len != -1 and not (isinstance(channel_len, numbers.Integral) and channel_len > 0):
            raise ValueError(f"channel_len must be a positive integer or -1 (per tensor), got {channel_len!r}")
        self.quant_min, self.quant_max = quant_min, quant_max
        self.use_grad_scaling = bool(use_grad_scaling)
        n = 1 if channel_len == -1 else int(channel_len)
        self.scale = nn.Parameter(torch.full((n,), float(scale), dtype=torch.float32))
        self.zero_point = nn.Parameter(torch.full((n,), float(zero_point), dtype=torch.float32))
        self.activation_post_process = observer(quant_min=quant_min, quant_max=quant_max, **observer_kwargs)
        obs = self.activation_post_process
        _check_bounds(quant_min, quant_max, obs.dtype)
        self.dtype, self.qscheme = obs.dtype, obs.qscheme
        self.ch_axis = getattr(obs, "ch_axis", -1)
        self.register_buffer("static_enabled", torch.tensor([1], dtype=torch.uint8))
        self.register_buffer("learning_enabled", torch.tensor([0], dtype=torch.uint8))
        self.bitwidth = int(math.log2(quant_max - quant_min + 1))
        self.register_buffer("eps", torch.tensor([torch.finfo(torch.float32).eps]))

    # --- switches (torch.ao's names; each returns self where torch's does) ---
    def enable_param_learning(self) -> LearnableFakeQuantize:
        """Learn the qparams: learning on, fake quant on, observer off."""
        return self.toggle_qparam_learning(True).toggle_fake_quant(True).toggle_observer_update(False)

    def enable_static_estimate(self) -> None:
        """Observer-estimated qparams: learning off, fake quant on, observer on."""
        self.toggle_qparam_learning(False).toggle_fake_quant(True).toggle_observer_update(True)

    def enable_static_observation(self) -> None:
        """Only observe: learning off, fake quant off (the output is ``x``), observer on."""
        self.toggle_qparam_learning(False).toggle_fake_quant(False).toggle_observer_update(True)

    def toggle_observer_update(self, enabled: bool = True) -> LearnableFakeQuantize:
        self._observer_on = bool(enabled)
        self.static_enabled.fill_(int(self._observer_on))
        return self

    def enable_observer(self, enabled: bool = True) -> None:
        self.toggle_observer_update(enabled)

    def toggle_qparam_learning(self, enabled: bool = True) -> LearnableFakeQuantize:
        self.learning_enabled.fill_(int(bool(enabled)))
        self.scale.requires_grad = bool(enabled)
        self.zero_point.requires_grad = bool(enabled)
        return self

    def toggle_fake_quant(self, enabled: bool = True) -> LearnableFakeQuantize:
        self.enable_fake_quant(enabled)
        return self

    def observe_quant_params(self) -> None:
        print(f"LearnableFakeQuantize Scale: {self.scale.detach()}")
        print(f"LearnableFakeQuantize Zero Point: {self.zero_point.detach()}")

    def _read_flags(self) -> None:
        self._fake_quant_on = bool(self.fake_quant_enabled[0])
        self._observer_on = bool(self.static_enabled[0])

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, clamp(rint(zero_point)))`` as float32 / int64, after clamping ``scale >= eps`` in place."""
        self.scale.data.clamp_(min=self.eps)
        zero_point = self.zero_point.detach().round().clamp(self.quant_min, self.quant_max).long()
        return self.scale.detach(), zero_point

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._observer_on:
            self.activation_post_process(x.detach())
            scale, zero_point = self.activation_post_process.calculate_qparams()
            self.scale.data.copy_(scale)
            self.zero_point.data.copy_(zero_point)
        else:
            self.scale.data.clamp_(min=self.eps)  # a tensor bound: no eps.item() sync
        if not self._fake_quant_on:
            return x
        if self.qscheme in SYMMETRIC_QSCHEMES:
            self.zero_point.data.zero_()
        grad_factor = 1.0 / (x.numel() * self.quant_max) ** 0.5 if self.use_grad_scaling else 1.0
        if self.qscheme in (torch.per_channel_symmetric, torch.per_channel_affine):
            return fake_quantize_learnable_per_channel_affine(x, self.scale, self.zero_point, self.ch_axis,
                                                              self.quant_min, self.quant_max, grad_factor)
        return fake_quantize_learnable_per_tensor_affine(x, self.scale, self.zero_point, self.quant_min,
                                                         self.quant_max, grad_factor)


# --- helpers for model.apply ---------------------------------------------------------------------


def enable_observer(module: nn.Module) -> None:
    """Turn the observer on if ``module`` is a minqat fake-quant module (``model.apply(enable_observer)``)."""
    if isinstance(module, FakeQuantizeBase):
        module.enable_observer()


def disable_observer(module: nn.Module) -> None:
    """Freeze the qparams of a minqat fake-quant module; other modules are left alone.

    >>> model = nn.Sequential(nn.Linear(2, 2), FakeQuantize())
    >>> _ = model.apply(disable_observer)
    >>> model[1].observer_enabled
    tensor([0], dtype=torch.uint8)
    """
    if isinstance(module, FakeQuantizeBase):
        module.disable_observer()


def enable_fake_quant(module: nn.Module) -> None:
    """Turn fake quantization on if ``module`` is a minqat fake-quant module."""
    if isinstance(module, FakeQuantizeBase):
        module.enable_fake_quant()


def disable_fake_quant(module: nn.Module) -> None:
    """Make a minqat fake-quant module pass its input through (its observer may still run)."""
    if isinstance(module, FakeQuantizeBase):
        module.disable_fake_quant()
