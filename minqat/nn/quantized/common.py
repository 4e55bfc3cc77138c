r"""What every int8 module shares: quantizing a float weight from its observer, reading output
qparams, and refusing inputs of the wrong kind.

**Weights** (numerics.md §6 steps 3-4; torch.ao's ``_quantize_weight`` and ``_clamp_weights``)::

    scale, zero_point = weight_post_process.calculate_qparams()      the Python observer formula
    per tensor:   w_int = quantize_per_tensor(W, float(scale), int(zero_point), int8)       §1.1, FMA
    per channel:  w_int = quantize_per_channel(W, scale.double(), zero_point, ch_axis, int8) §1.2
    w_int = clamp(w_int, quant_min, quant_max)      only if the observer's range is narrower than int8

The weight stays a plain ``torch.int8`` tensor next to its float32 scale and int64 zero point
(0-d per tensor, ``(C_out,)`` per channel); the int8 kernels (``minqat.kernels``) read them as is.

**Missing statistics.** An observer that never saw a batch has ``min_val = +inf, max_val = -inf``
(per tensor) or empty buffers (per channel). torch.ao warns and converts with ``scale = 1.0,
zero_point = 0``, which silently breaks the int8 model; minqat refuses (:func:`require_statistics`).

>>> from minqat.qconfig import default_per_channel_weight_fake_quant
>>> fq = default_per_channel_weight_fake_quant()
>>> w = torch.tensor([[0.5, -1.0], [0.25, 0.125]])
>>> _ = fq(w)                                            # observe: per-row max |w| is 1.0 and 0.25
>>> w_int, scale, zero_point = quantize_weight(w, fq)
>>> w_int, zero_point
(tensor([[  64, -127],
        [ 127,   64]], dtype=torch.int8), tensor([0, 0]))
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ...dtypes import dtype_range, plain_dtype
from ...fake_quantize import LearnableFakeQuantize
from ...functional import quantize_per_channel, quantize_per_tensor
from ...qparams import PER_CHANNEL_QSCHEMES, PER_TENSOR_QSCHEMES
from ...qtensor import QTensor
from .prepared import LayerCache

__all__ = ["quantize_weight", "observe_weight", "require_statistics", "require_qtensor", "output_qparams",
           "check_weight_dtype", "fold_bn_in_place", "clamp_to_output_range", "save_output_qparams", "load_output_qparams",
           "save_output_range", "load_output_range", "Int8WeightLayer"]


def _observer(post_process: nn.Module) -> nn.Module:
    """The observer inside a fake quant (``activation_post_process``), or the observer itself."""
    return getattr(post_process, "activation_post_process", post_process)


def require_statistics(post_process: nn.Module | None, what: str) -> None:
    """Raise ``ValueError`` if ``post_process`` (an observer or fake quant) never observed a batch.

    A ``LearnableFakeQuantize`` is exempt: its qparams are learned parameters, not statistics.

    >>> from minqat.observers import MinMaxObserver
    >>> require_statistics(MinMaxObserver(), "the output observer")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: the output observer (MinMaxObserver) never observed a batch (min_val=inf, max_val=-inf): run ...
    """
    if post_process is None or isinstance(post_process, LearnableFakeQuantize):
        return
    observer = _observer(post_process)
    min_val, max_val = getattr(observer, "min_val", None), getattr(observer, "max_val", None)
    if not isinstance(min_val, torch.Tensor) or not isinstance(max_val, torch.Tensor):
        return
    empty = min_val.numel() == 0 or max_val.numel() == 0
    if empty or bool(((min_val == math.inf) & (max_val == -math.inf)).all()):  # convert-time check, not a forward
        stats = "empty min_val/max_val" if empty else f"min_val={min_val.item():g}, max_val={max_val.item():g}"
        raise ValueError(f"{what} ({type(post_process).__name__}) never observed a batch ({stats}): run training "
                         "or calibration batches through the prepared model before convert")


def observe_weight(weight_post_process: nn.Module, weight: torch.Tensor) -> None:
    """Call the weight fake quant / observer once on ``weight``, as torch.ao's convert does (numerics.md §6.2).

    With its observer enabled this is one more statistics step; with it disabled the call only fake-quantizes,
    so the statistics must already be there (checked first, for a clear message).
    """
    enabled = getattr(weight_post_process, "observer_enabled", None)
    if isinstance(enabled, torch.Tensor) and not bool(enabled.all()):  # convert time: reading a flag is fine
        require_statistics(weight_post_process, "its weight fake quant")
    with torch.no_grad():
        weight_post_process(weight)
    require_statistics(weight_post_process, "its weight fake quant")


def check_weight_dtype(weight_post_process: nn.Module) -> None:
    """int8 modules hold ``torch.int8`` weights (torch.ao: 'Weight observer must have dtype qint8')."""
    dtype = plain_dtype(weight_post_process.dtype, "the weight observer's dtype")
    if dtype != torch.int8:
        raise ValueError("the weight observer must have dtype torch.int8 (or torch.qint8), "
                         f"got {weight_post_process.dtype}")


def _clamp_to_observer_range(w_int: torch.Tensor, weight_post_process: nn.Module) -> torch.Tensor:
    """torch.ao's ``_clamp_weights``: clamp to ``[quant_min, quant_max]`` only if narrower than int8."""
    observer = _observer(weight_post_process)
    lo, hi = dtype_range(torch.int8)
    if observer.quant_min > lo or observer.quant_max < hi:
        return w_int.clamp(observer.quant_min, observer.quant_max)
    return w_int


def quantize_weight(weight: torch.Tensor, weight_post_process: nn.Module
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(w_int int8, scale float32, zero_point int64)`` of a float weight, as torch.ao's convert.

    ``weight_post_process`` is the observer (or fake quant) whose ``calculate_qparams()`` gives the
    qparams; it must already have observed (``from_float`` calls it once on the weight, like torch).
    Per-channel qparams are ``(C,)`` along the observer's ``ch_axis``, which must be 0 (the output
    channels of conv and linear weights); per-tensor ones are 0-d.
    """
    check_weight_dtype(weight_post_process)
    qscheme = weight_post_process.qscheme
    scale, zero_point = weight_post_process.calculate_qparams()
    weight = weight.detach().float()
    if qscheme in PER_TENSOR_QSCHEMES:
        w_int = quantize_per_tensor(weight, float(scale), int(zero_point), torch.int8)  # §1.1: the FMA form
        scale, zero_point = scale.reshape(()).float(), zero_point.reshape(()).long()
    elif qscheme in PER_CHANNEL_QSCHEMES and qscheme != torch.per_channel_affine_float_qparams:
        axis = weight_post_process.ch_axis
        if axis != 0:
            raise ValueError("per-channel weight qparams must run along the output channels (ch_axis=0), "
                             f"got ch_axis={axis}")
        w_int = quantize_per_channel(weight, scale.to(torch.float64), zero_point.to(torch.int64), axis, torch.int8)
        scale, zero_point = scale.float(), zero_point.long()
    else:
        raise ValueError("the weight observer's qscheme must be per-tensor or per-channel affine/symmetric, "
                         f"got {qscheme}")
    return _clamp_to_observer_range(w_int, weight_post_process), scale.detach().clone(), zero_point.detach().clone()


def output_qparams(activation_post_process: nn.Module) -> tuple[float, int]:
    """``(float(scale), int(zero_point))`` of the observed output, torch.ao's ``calculate_qparams()``."""
    scale, zero_point = activation_post_process.calculate_qparams()
    return float(scale), int(zero_point)


def require_qtensor(x, owner: str) -> QTensor:
    """Return ``x`` if it is a per-tensor ``QTensor``; else raise ``TypeError`` naming ``owner``."""
    if not isinstance(x, QTensor):
        kind = f"a torch.Tensor of dtype {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"{owner} expects a QTensor input (the output of a Quantize module or of another "
                         f"int8 module), got {kind}; put a QuantStub before it in the float model")
    if x.axis is not None:
        raise TypeError(f"{owner} expects a per-tensor QTensor input, got one quantized per channel (axis={x.axis})")
    return x


def clamp_to_output_range(y_int: torch.Tensor, output_range: tuple[int, int] | None) -> torch.Tensor:
    """Clamp output integers to ``output_range = (quant_min, quant_max)``, or leave them (``None``).

    torch.ao's int8 ops clamp to the dtype's range (uint8: [0, 255]) even where the fake quant trained
    with a narrower one (``reduce_range``: [0, 127]); ``convert(..., consistent=True)`` sets
    ``output_range`` to the fake quant's range so the int8 model clamps where training clamped.
    ``clamp(clamp(v, 0, 255), lo, hi) = clamp(v, lo, hi)`` for ``0 <= lo <= hi <= 255``, so clamping
    after the kernel is exact.
    """
    return y_int if output_range is None else y_int.clamp(*output_range)


def fold_bn_in_place(mod: nn.Module, fuse_weights) -> None:
    """``W, b <- fuse_weights(W, b, BN running stats)`` on a QAT conv-BN / linear-BN module itself, as torch.ao's
    convert does; ``fuse_weights`` is ``minqat.fold.fuse_conv_bn_weights`` or ``fuse_linear_bn_weights``."""
    bn = mod.bn
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"cannot fold the BatchNorm of {type(mod).__name__}: it tracks no running statistics")
    mod.weight, mod.bias = fuse_weights(mod.weight, mod.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight,
                                        bn.bias)


def save_output_qparams(module: nn.Module, destination: dict, prefix: str) -> None:
    """``scale`` (float64: an exact round trip of the Python float), ``zero_point`` and a set ``output_range``."""
    destination[prefix + "scale"] = torch.tensor(module.scale, dtype=torch.float64)
    destination[prefix + "zero_point"] = torch.tensor(module.zero_point)
    save_output_range(module, destination, prefix)


def load_output_qparams(module: nn.Module, state_dict: dict, prefix: str) -> None:
    """Pop what :func:`save_output_qparams` wrote and set the module's Python attributes from it."""
    module.scale = float(state_dict.pop(prefix + "scale", module.scale))
    module.zero_point = int(state_dict.pop(prefix + "zero_point", module.zero_point))
    load_output_range(module, state_dict, prefix)


def save_output_range(module: nn.Module, destination: dict, prefix: str) -> None:
    """Store a set ``output_range`` as an ``(2,)`` int64 entry of the state dict (absent when ``None``)."""
    if getattr(module, "output_range", None) is not None:
        destination[prefix + "output_range"] = torch.tensor(module.output_range)


def load_output_range(module: nn.Module, state_dict: dict, prefix: str) -> None:
    """Pop the ``output_range`` entry (if any) and set the attribute from it (``None`` when absent)."""
    value = state_dict.pop(prefix + "output_range", None)
    module.output_range = None if value is None else tuple(int(v) for v in value.tolist())


class Int8WeightLayer:
    """What the int8 conv and linear share, over their plain buffers ``weight_int``, ``weight_scale``,
    ``weight_zero_point``, ``bias_float`` and their output qparams ``scale``, ``zero_point``, ``output_range``:

    * torch's ``weight()`` / ``bias()`` accessors;
    * installing a weight (``_install_weight_bias``, after the subclass's ``set_weight_bias`` checked it);
    * the state dict: the buffers whose shape depends on the scheme (``_SCHEME_BUFFERS``) take the loaded
      shape, and the output qparams travel as ``scale`` / ``zero_point`` / ``output_range`` entries;
    * the kept constants (``self._prepared``, a ``prepared.LayerCache``) start empty after ``.to()`` /
      ``.half()`` and after unpickling a module saved before the cache existed.
    """

    _SCHEME_BUFFERS: tuple[str, ...] = ("weight_scale", "weight_zero_point")  # () per tensor, (C_out,) per channel

    def _install_weight_bias(self, w_int: torch.Tensor, w_scale: torch.Tensor, w_zero_point: torch.Tensor,
                             bias: torch.Tensor | None) -> None:
        self.weight_int = w_int.detach().clone()
        self.weight_scale = w_scale.detach().float().clone()
        self.weight_zero_point = w_zero_point.detach().long().clone()
        self.bias_float = None if bias is None else bias.detach().float().clone()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in self._SCHEME_BUFFERS:
            if prefix + name in state_dict:
                self._buffers[name] = torch.empty_like(state_dict[prefix + name])
        load_output_qparams(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        save_output_qparams(self, destination, prefix)

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("_prepared", LayerCache())  # pickled before the cache existed

    def _apply(self, fn, recurse=True):
        self._prepared = LayerCache()  # .to(), .half(): drop the kept constants with the buffers they came from
        return super()._apply(fn, recurse)

    def weight(self) -> QTensor:
        """The int8 weight as a ``QTensor`` (per channel along axis 0, or per tensor), like torch's ``weight()``."""
        axis = 0 if self.weight_scale.dim() == 1 else None
        return QTensor(self.weight_int, self.weight_scale, self.weight_zero_point, axis=axis)

    def bias(self) -> torch.Tensor | None:
        """The float32 bias (added in the real domain by the kernel), or None."""
        return self.bias_float
