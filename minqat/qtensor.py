r"""``QTensor``: the int8 model's currency -- plain integers plus the scale and zero point that give them meaning.

torch.ao passes activations between int8 modules as quantized tensors (``torch.quint8``); minqat passes a
``QTensor``: an ordinary ``torch.uint8`` / ``torch.int8`` / ``torch.int32`` tensor ``int_repr`` with a per-tensor
``scale`` and ``zero_point`` (or per-channel ones along ``axis``), meaning ``x = scale * (int_repr - zero_point)``
(Jacob et al. 2018, §2.1). It answers the accessors model code uses on torch's quantized tensors --
``int_repr()``, ``q_scale()``, ``q_zero_point()``, ``q_per_channel_scales()``, ``dequantize()``, ``size()``,
``shape``, ``dim()``, ``is_quantized`` -- and the torch functions a CNN applies between modules, through the
``__torch_function__`` protocol and one explicit table (``TORCH_FUNCTIONS``):

* ops that only move integers (``torch.flatten``, ``x.view``, ``reshape``, ``transpose``, ``permute``, ``chunk``,
  ``split``, ``squeeze``, ``contiguous``, indexing, ``channel_shuffle``) apply to ``int_repr``, qparams unchanged;
* ``F.relu``/``relu6``/``hardtanh``, ``torch.clamp``, ``F.max_pool2d``, ``F.avg_pool2d``, ``F.adaptive_avg_pool2d``,
  ``x.mean(dims)`` and ``torch.cat`` run ``minqat.kernels.pooling`` / ``.elementwise``, bit-exact with torch's
  quantized CPU ops (same integers, same output qparams), and so do the ``nn.ReLU``, ``nn.ReLU6``,
  ``nn.MaxPool2d``, ``nn.AvgPool2d``, ``nn.AdaptiveAvgPool2d``, ``nn.Flatten``, ``nn.Dropout`` (eval) modules
  that call them;
* any other torch function raises ``TypeError`` naming it -- never a silent float fallback.

``dtype`` is the *plain* integer dtype (``torch.uint8``, not the deprecated ``torch.quint8``), the dtype of
``int_repr()``. The integer tensor keeps its memory layout, which decides some of torch's roundings (see
``minqat.kernels.pooling``): torch's quantized convs return channels-last tensors.

Module functions ``add``, ``add_relu``, ``mul``, ``add_scalar``, ``mul_scalar``, ``cat``, ``matmul`` are the QTensor
twins of ``torch.ops.quantized.*`` (what ``QFunctional`` calls).

>>> import torch.nn.functional as F
>>> x = QTensor.quantize(torch.tensor([[-1.0, 0.75, 2.0]]), scale=0.5, zero_point=2, dtype=torch.uint8)
>>> x
QTensor(int_repr=tensor([[0, 4, 6]], dtype=torch.uint8), scale=0.5, zero_point=2)
>>> F.relu(x).dequantize()
tensor([[0., 1., 2.]])
>>> torch.flatten(x.view(1, 3, 1), 1).shape
torch.Size([1, 3])
"""
from __future__ import annotations

import numbers
import warnings
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_axis
from .dtypes import dtype_range
from .functional.qparams_args import per_channel_scale, per_channel_zero_point, per_tensor_scale, per_tensor_zero_point
from .functional.quantize import QUANTIZED_DTYPES, dequantize, quantize_per_channel, quantize_per_tensor
from .kernels import elementwise, pooling

__all__ = ["QTensor", "TORCH_FUNCTIONS", "add", "add_relu", "mul", "add_scalar", "mul_scalar", "cat", "matmul"]


class QTensor:
    """Integers ``int_repr`` with ``scale``, ``zero_point`` and, per channel, ``axis``: ``x = scale * (q - zp)``.

    Per tensor, ``scale`` is a positive float or a one-element float tensor and ``zero_point`` an int or a
    one-element tensor inside the dtype's range; per channel (``axis`` given) both are 1-D tensors with one entry
    per index along ``axis``. ``int_repr()`` returns the stored tensor itself (no copy).
    """

    __slots__ = ("_int_repr", "scale", "zero_point", "axis")
    is_quantized = True

    def __init__(self, int_repr: Tensor, scale, zero_point, axis: int | None = None):
        if not isinstance(int_repr, Tensor) or int_repr.dtype not in QUANTIZED_DTYPES:
            raise ValueError("int_repr must be a torch.uint8, torch.int8 or torch.int32 tensor, "
                             f"got {type(int_repr).__name__} {getattr(int_repr, 'dtype', '')}")
        qmin, qmax = dtype_range(int_repr.dtype)
        if axis is None:
            if isinstance(scale, numbers.Real) and not isinstance(scale, bool):
                per_tensor_scale(scale, int_repr.device)  # validation; keep the Python float's precision
                scale = float(scale)
            else:
                scale = per_tensor_scale(scale, int_repr.device)
            zp = per_tensor_zero_point(zero_point, qmin, qmax, int_repr.device)
            zero_point = int(zero_point) if isinstance(zero_point, numbers.Integral) else zp
        else:
            axis = check_axis(axis, int_repr.dim())
            channels = int_repr.shape[axis]
            per_channel_scale(scale, channels, int_repr.device)  # validation; keep float64 scales
            scale = torch.as_tensor(scale).detach().to(int_repr.device)
            zero_point = per_channel_zero_point(zero_point, channels, qmin, qmax, int_repr.device)
            if zero_point.is_floating_point():
                raise ValueError(f"zero_point must be an integer tensor, got dtype {zero_point.dtype}")
        self._int_repr, self.scale, self.zero_point, self.axis = int_repr, scale, zero_point, axis

    @classmethod
    def _make(cls, int_repr: Tensor, scale, zero_point, axis: int | None = None) -> QTensor:
        """Wrap already validated parts (the ops' results)."""
        q = object.__new__(cls)
        q._int_repr, q.scale, q.zero_point, q.axis = int_repr, scale, zero_point, axis
        return q

    @classmethod
    def quantize(cls, x: Tensor, scale, zero_point, dtype: torch.dtype, axis: int | None = None) -> QTensor:
        """``torch.quantize_per_tensor`` (``axis=None``) / ``torch.quantize_per_channel``, bit for bit.

        >>> QTensor.quantize(torch.tensor([0.5, 1.5]), 1.0, 0, torch.uint8).int_repr()     # ties to even
        tensor([0, 2], dtype=torch.uint8)
        """
        if axis is None:
            x_int = quantize_per_tensor(x, scale, zero_point, dtype)
        else:
            x_int = quantize_per_channel(x, scale, zero_point, axis, dtype)
        x_int = x_int.contiguous(memory_format=elementwise.suggest_memory_format(x))  # torch's layout
        return cls(x_int, scale, zero_point, axis)

    def dequantize(self) -> Tensor:
        """float32 ``scale * (int_repr - zero_point)`` (numerics.md §1.3)."""
        return dequantize(self._int_repr, self.scale, self.zero_point, self.axis)

    # --- torch's quantized-tensor accessors -------------------------------------------------------------------
    def int_repr(self) -> Tensor:
        return self._int_repr

    def _require_per_tensor(self, what: str) -> None:
        if self.axis is not None:
            raise NotImplementedError(f"{what} needs a per-tensor QTensor; this one is quantized per channel along "
                                      f"axis {self.axis}: dequantize() first")

    def q_scale(self) -> float:
        self._require_per_tensor("q_scale()")
        return float(self.scale)

    def q_zero_point(self) -> int:
        self._require_per_tensor("q_zero_point()")
        return int(self.zero_point)

    def q_per_channel_scales(self) -> Tensor:
        if self.axis is None:
            raise NotImplementedError("q_per_channel_scales() needs a per-channel QTensor; use q_scale()")
        return self.scale.to(torch.float64)

    def q_per_channel_zero_points(self) -> Tensor:
        if self.axis is None:
            raise NotImplementedError("q_per_channel_zero_points() needs a per-channel QTensor; use q_zero_point()")
        return self.zero_point.to(torch.int64)

    def q_per_channel_axis(self) -> int:
        if self.axis is None:
            raise NotImplementedError("q_per_channel_axis() needs a per-channel QTensor")
        return self.axis

    def qscheme(self) -> torch.qscheme:
        return torch.per_tensor_affine if self.axis is None else torch.per_channel_affine

    # --- metadata ----------------------------------------------------------------------------------------------
    shape = property(lambda self: self._int_repr.shape)
    dtype = property(lambda self: self._int_repr.dtype, doc="The plain integer dtype of int_repr().")
    device = property(lambda self: self._int_repr.device)
    ndim = property(lambda self: self._int_repr.dim())

    def size(self, dim: int | None = None):
        return self._int_repr.size() if dim is None else self._int_repr.size(dim)

    def dim(self) -> int:
        return self._int_repr.dim()

    def numel(self) -> int:
        return self._int_repr.numel()

    def stride(self, dim: int | None = None):
        return self._int_repr.stride() if dim is None else self._int_repr.stride(dim)

    def is_contiguous(self, memory_format: torch.memory_format = torch.contiguous_format) -> bool:
        return self._int_repr.is_contiguous(memory_format=memory_format)

    def __len__(self) -> int:
        return len(self._int_repr)

    def __repr__(self) -> str:
        axis = "" if self.axis is None else f", axis={self.axis}"
        return f"QTensor(int_repr={self._int_repr!r}, scale={self.scale!r}, zero_point={self.zero_point!r}{axis})"

    def to(self, device) -> QTensor:
        """Move to ``device`` (the dtype never changes: requantize instead)."""
        if isinstance(device, torch.dtype):
            raise TypeError(f"QTensor.to cannot change the dtype (got {device}): dequantize() or requantize instead")
        move = (lambda v: v.to(device) if isinstance(v, Tensor) else v)
        return QTensor._make(self._int_repr.to(device), move(self.scale), move(self.zero_point), self.axis)

    def cpu(self) -> QTensor:
        return self.to("cpu")

    # --- numeric methods (bit-exact with torch's quantized ops) ---------------------------------------------------
    def mean(self, dim=None, keepdim: bool = False, *, dtype: torch.dtype | None = None) -> QTensor:
        return _mean(self, dim, keepdim, dtype=dtype)

    def relu(self) -> QTensor:
        return _relu(self)

    def relu_(self) -> QTensor:
        return _relu(self, inplace=True)

    def clamp(self, min: float | None = None, max: float | None = None) -> QTensor:
        return _clamp(self, min, max)

    # --- the protocol -----------------------------------------------------------------------------------------
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        impl = TORCH_FUNCTIONS.get(func)
        if impl is None:
            raise TypeError(f"minqat.QTensor does not support {_op_name(func)}: dequantize() first and run it in "
                            "float, or use a minqat int8 module / QFunctional op")
        return impl(*args, **(kwargs or {}))

    def __getattr__(self, name: str):  # only called for names QTensor does not define
        if not name.startswith("__") and hasattr(Tensor, name):
            raise AttributeError(f"minqat.QTensor does not support Tensor.{name}: dequantize() first and run it "
                                 "in float, or use a minqat int8 module / QFunctional op")
        raise AttributeError(f"'QTensor' object has no attribute {name!r}")

    def _arithmetic(self, other):
        raise TypeError("minqat.QTensor does not support +, -, * or / directly: the result needs output qparams; "
                        "use minqat.qtensor.add / mul (QFunctional) or dequantize() first")

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = __matmul__ = _arithmetic


# ---------------------------------------------------------------------------------------------------------------
# implementations behind TORCH_FUNCTIONS (same signatures as the torch functions they replace)
# ---------------------------------------------------------------------------------------------------------------
def _op_name(func) -> str:
    name = getattr(func, "__name__", repr(func))
    qualname = getattr(func, "__qualname__", name)
    if qualname.startswith("_VariableFunctionsClass."):
        return f"torch.{name}"
    if qualname.startswith(("TensorBase.", "Tensor.")):
        return f"torch.Tensor.{name}"
    return f"{getattr(func, '__module__', None) or 'torch'}.{name}"


def _check_qtensor(x, name: str, per_tensor: bool = True) -> QTensor:
    if not isinstance(x, QTensor):
        got = f"a torch.Tensor of dtype {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"{name} must be a minqat.QTensor, got {got}: quantize it first (QTensor.quantize or a "
                        "Quantize module)")
    if per_tensor:
        x._require_per_tensor(name)
    return x


def _moves_integers(op: Callable, keeps_axis: bool = False) -> Callable:
    """An op that only moves or selects integers: applied to ``int_repr``, qparams unchanged."""
    def apply(input: QTensor, *args, **kwargs):
        _check_qtensor(input, f"{_op_name(op)}'s input", per_tensor=not keeps_axis)
        result = op(input._int_repr, *args, **kwargs)
        if isinstance(result, Tensor):
            return QTensor._make(result, input.scale, input.zero_point, input.axis)
        return tuple(QTensor._make(r, input.scale, input.zero_point) for r in result)
    apply.__name__ = apply.__qualname__ = getattr(op, "__name__", "op")
    apply.__doc__ = f"``{_op_name(op)}`` on the integers; scale and zero point unchanged."
    return apply


for _name in ("view", "reshape", "flatten", "transpose", "permute", "squeeze", "unsqueeze", "chunk", "split",
              "__getitem__"):
    setattr(QTensor, _name, _moves_integers(getattr(Tensor, _name)))
for _name in ("contiguous", "detach"):
    setattr(QTensor, _name, _moves_integers(getattr(Tensor, _name), keeps_axis=True))
del _name


def _clone(self: QTensor, memory_format: torch.memory_format = torch.contiguous_format) -> QTensor:
    """A copy; contiguous by default, as torch's quantized ``clone`` (which ignores ``preserve_format``)."""
    return QTensor._make(self._int_repr.clone(memory_format=memory_format), self.scale, self.zero_point, self.axis)


QTensor.clone = _clone


def _relu(input: QTensor, inplace: bool = False) -> QTensor:
    _check_qtensor(input, "relu's input")
    return _result(input, pooling.relu(input._int_repr, input.zero_point), inplace)


def _result(input: QTensor, y: Tensor, inplace: bool) -> QTensor:
    """Same qparams as ``input``; ``inplace`` writes the integers into ``input`` like torch's ``relu_``."""
    if inplace:
        input._int_repr.copy_(y)
        return input
    return QTensor._make(y, input.scale, input.zero_point)


def _clamp(input: QTensor, min=None, max=None, inplace: bool = False) -> QTensor:
    _check_qtensor(input, "clamp's input")
    if isinstance(min, Tensor) or isinstance(max, Tensor):
        raise ValueError("min and max must be Python numbers for a QTensor (torch does not support tensor bounds "
                         "on quantized tensors)")
    return _result(input, pooling.clamp(input._int_repr, input.scale, input.zero_point, min, max), inplace)


def _hardtanh(input: QTensor, min_val: float = -1.0, max_val: float = 1.0, inplace: bool = False) -> QTensor:
    return _clamp(input, min_val, max_val, inplace)


def _relu6(input: QTensor, inplace: bool = False) -> QTensor:
    return _clamp(input, 0.0, 6.0, inplace)


def _max_pool2d(input: QTensor, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
                return_indices=False) -> QTensor:
    _check_qtensor(input, "max_pool2d's input")
    if return_indices:
        raise NotImplementedError("max_pool2d with return_indices=True is not supported on a QTensor")
    y = pooling.max_pool2d(input._int_repr, kernel_size, stride, padding, dilation, ceil_mode)
    return QTensor._make(y, input.scale, input.zero_point)


def _avg_pool2d(input: QTensor, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
                divisor_override=None) -> QTensor:
    _check_qtensor(input, "avg_pool2d's input")
    y = pooling.avg_pool2d(input._int_repr, input.zero_point, kernel_size, stride, padding, ceil_mode,
                           count_include_pad, divisor_override)
    return QTensor._make(y, input.scale, input.zero_point)


def _adaptive_avg_pool2d(input: QTensor, output_size) -> QTensor:
    _check_qtensor(input, "adaptive_avg_pool2d's input")
    y = pooling.adaptive_avg_pool2d(input._int_repr, input.zero_point, output_size)
    return QTensor._make(y, input.scale, input.zero_point)


def _mean(input: QTensor, dim=None, keepdim: bool = False, *, dtype: torch.dtype | None = None) -> QTensor:
    _check_qtensor(input, "mean's input")
    if dtype is not None and dtype != input.dtype:
        raise ValueError(f"dtype must be None for the mean of a QTensor (torch: not supported), got {dtype}")
    y = pooling.mean(input._int_repr, input.scale, input.zero_point, dim, keepdim)
    return QTensor._make(y, input.scale, input.zero_point)


def _dropout(input: QTensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> QTensor:
    _check_qtensor(input, "dropout's input")
    if training:
        raise NotImplementedError("dropout in training mode is not supported on a QTensor (nor by torch); "
                                  "call model.eval() -- in eval mode dropout is the identity")
    return input


def _torch_cat(tensors: Sequence[QTensor], dim: int = 0) -> QTensor:
    """``torch.cat``: like torch, requantize every input to the *first* input's qparams, warning if they differ."""
    tensors = [_check_qtensor(t, f"tensors[{i}]") for i, t in enumerate(tensors)]
    if not tensors:
        raise ValueError("tensors must be a non-empty sequence of QTensors")
    first = tensors[0]
    numbers_only = all(not isinstance(v, Tensor) for t in tensors for v in (t.scale, t.zero_point))
    if numbers_only and any((t.scale, t.zero_point) != (first.scale, first.zero_point) for t in tensors):
        warnings.warn("All inputs of this cat operator must share the same quantization parameters. Otherwise large "
                      "numerical inaccuracies may occur. (minqat requantizes them to the first input's, as torch)",
                      UserWarning, stacklevel=3)
    return cat(tensors, dim % max(first.dim(), 1), first.scale, first.zero_point)


TORCH_FUNCTIONS: dict[Callable, Callable] = {
    # integers moved, qparams unchanged
    torch.flatten: _moves_integers(torch.flatten),
    torch.reshape: _moves_integers(torch.reshape),
    torch.transpose: _moves_integers(torch.transpose),
    torch.permute: _moves_integers(torch.permute),
    torch.squeeze: _moves_integers(torch.squeeze),
    torch.unsqueeze: _moves_integers(torch.unsqueeze),
    torch.chunk: _moves_integers(torch.chunk),
    torch.split: _moves_integers(torch.split),
    torch.channel_shuffle: _moves_integers(torch.channel_shuffle),
    torch.dequantize: QTensor.dequantize,
    # comparisons of integers
    torch.relu: _relu,
    torch.relu_: lambda input: _relu(input, inplace=True),
    F.relu: _relu,
    F.relu6: _relu6,
    F.hardtanh: _hardtanh,
    torch.clamp: _clamp,
    F.max_pool2d: _max_pool2d,
    torch.max_pool2d: _max_pool2d,
    F.dropout: _dropout,
    # averages and requantization (minqat.kernels)
    F.avg_pool2d: _avg_pool2d,
    F.adaptive_avg_pool2d: _adaptive_avg_pool2d,
    torch._C._nn.adaptive_avg_pool2d: _adaptive_avg_pool2d,
    torch.mean: _mean,
    torch.cat: _torch_cat,
}


# ---------------------------------------------------------------------------------------------------------------
# QTensor twins of torch.ops.quantized.* (what QFunctional calls)
# ---------------------------------------------------------------------------------------------------------------
def _pair(a, b) -> tuple[QTensor, QTensor]:
    return _check_qtensor(a, "a"), _check_qtensor(b, "b")


def add(a: QTensor, b: QTensor, scale, zero_point) -> QTensor:
    """``torch.ops.quantized.add(a, b, scale, zero_point)`` (see ``minqat.kernels.elementwise.add``)."""
    a, b = _pair(a, b)
    y = elementwise.add(a._int_repr, a.scale, a.zero_point, b._int_repr, b.scale, b.zero_point, scale, zero_point)
    return QTensor(y, scale, zero_point)


def add_relu(a: QTensor, b: QTensor, scale, zero_point) -> QTensor:
    """``torch.ops.quantized.add_relu(a, b, scale, zero_point)``."""
    a, b = _pair(a, b)
    y = elementwise.add_relu(a._int_repr, a.scale, a.zero_point, b._int_repr, b.scale, b.zero_point, scale, zero_point)
    return QTensor(y, scale, zero_point)


def mul(a: QTensor, b: QTensor, scale, zero_point) -> QTensor:
    """``torch.ops.quantized.mul(a, b, scale, zero_point)``; ``b`` broadcasts."""
    a, b = _pair(a, b)
    y = elementwise.mul(a._int_repr, a.scale, a.zero_point, b._int_repr, b.scale, b.zero_point, scale, zero_point)
    return QTensor(y, scale, zero_point)


def add_scalar(x: QTensor, other: float) -> QTensor:
    """``torch.ops.quantized.add_scalar(x, other)``: the output qparams follow from ``x``'s and ``other``."""
    x = _check_qtensor(x, "x")
    return QTensor._make(*elementwise.add_scalar(x._int_repr, x.scale, x.zero_point, other))


def mul_scalar(x: QTensor, other: float) -> QTensor:
    """``torch.ops.quantized.mul_scalar(x, other)``: the output qparams follow from ``x``'s and ``other``."""
    x = _check_qtensor(x, "x")
    return QTensor._make(*elementwise.mul_scalar(x._int_repr, x.scale, x.zero_point, other))


def cat(tensors: Sequence[QTensor], dim: int = 0, scale=None, zero_point=None) -> QTensor:
    """``torch.ops.quantized.cat(tensors, dim, scale, zero_point)``; ``None`` qparams: the first input's."""
    tensors = [_check_qtensor(t, f"tensors[{i}]") for i, t in enumerate(tensors)]
    if not tensors:
        raise ValueError("tensors must be a non-empty sequence of QTensors")
    scale = tensors[0].scale if scale is None else scale
    zero_point = tensors[0].zero_point if zero_point is None else zero_point
    y = elementwise.cat([t._int_repr for t in tensors], [t.scale for t in tensors],
                        [t.zero_point for t in tensors], dim, scale, zero_point)
    return QTensor(y, scale, zero_point)


def matmul(a: QTensor, b: QTensor, scale, zero_point) -> QTensor:
    """``torch.ops.quantized.matmul(a, b, scale, zero_point)``."""
    a, b = _pair(a, b)
    y = elementwise.matmul(a._int_repr, a.scale, a.zero_point, b._int_repr, b.scale, b.zero_point, scale, zero_point)
    return QTensor(y, scale, zero_point)
