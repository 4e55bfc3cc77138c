r"""Recording what an int8 model computes by running it once (no symbolic tracing).

``Recorder`` runs the converted model on the example input and writes every operation on the way into a
``Graph`` (``minqat.onnx.graph``):

* the int8 modules (``Quantize``, ``DeQuantize``, ``Conv*``, ``Linear*``) through forward hooks, from their
  inputs, their output and their buffers;
* ``QFunctional`` ops (``add``, ``add_relu``) through wrappers set on each instance for the run;
* ``QTensor``-level ops (``torch.flatten(x, 1)``, ``F.relu``, ``nn.MaxPool2d``, ``x.mean((2, 3))``, ...)
  through wrappers set, for the run, on ``minqat.qtensor.TORCH_FUNCTIONS`` and the ``QTensor`` methods.

Values are tracked by identity: every float tensor and every ``QTensor``'s integer tensor that the graph
computes is mapped to its ``Value`` (a ``QTensor``'s integers are what its methods hand to torch, and what
in-place ops write into). Ops inside an int8 module or a ``QFunctional`` op are not recorded (``depth``).

Everything the exporter cannot map raises ``ExportError`` (a ``ValueError``) naming the module path and type:
an op without an ONNX mapping, a module whose output the graph cannot see (a float layer running on a
dequantized tensor), a module input computed outside the graph. Not thread-safe: the wrappers are set on
shared objects for the duration of the run and always removed afterwards.
"""
from __future__ import annotations

import contextlib
import inspect

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import qtensor as qtensor_module
from ..kernels.pooling import quantize_scalar
from ..nn.quantized.conv import _ConvNd
from ..nn.quantized.functional import QFunctional
from ..nn.quantized.linear import Linear
from ..nn.quantized.stubs import DeQuantize, Quantize
from ..qtensor import QTensor
from .graph import Graph, Value

__all__ = ["ExportError", "Recorder"]

SEMANTIC_MODULES = (Quantize, DeQuantize, _ConvNd, Linear)
QFUNCTIONAL_SUPPORTED = ("add", "add_relu")
QFUNCTIONAL_OPS = ("add", "add_relu", "mul", "cat", "matmul", "add_scalar", "mul_scalar")

# torch function (a key of TORCH_FUNCTIONS) or QTensor method -> how it is exported; absent: not exportable
FUNCTION_KINDS = {
    torch.flatten: "reshape", torch.reshape: "reshape", torch.squeeze: "reshape", torch.unsqueeze: "reshape",
    torch.transpose: "transpose", torch.permute: "permute", torch.dequantize: "dequantize",
    torch.relu: "relu", torch.relu_: "relu", F.relu: "relu", F.relu6: "clamp", F.hardtanh: "clamp",
    torch.clamp: "clamp", F.max_pool2d: "max_pool2d", torch.max_pool2d: "max_pool2d", F.dropout: "identity",
    F.avg_pool2d: "avg_pool2d", F.adaptive_avg_pool2d: "adaptive_avg_pool2d",
    torch._C._nn.adaptive_avg_pool2d: "adaptive_avg_pool2d", torch.mean: "mean",
}
METHOD_KINDS = {
    "view": "reshape", "reshape": "reshape", "flatten": "reshape", "squeeze": "reshape", "unsqueeze": "reshape",
    "transpose": "transpose", "permute": "permute", "contiguous": "identity", "detach": "identity",
    "clone": "identity", "to": "identity", "cpu": "identity", "mean": "mean", "relu": "relu", "relu_": "relu",
    "clamp": "clamp", "dequantize": "dequantize", "chunk": None, "split": None, "__getitem__": None,
}
CLAMP_BOUNDS = {F.relu6: lambda a: (0.0, 6.0), F.hardtanh: lambda a: (a["min_val"], a["max_val"]),
                torch.clamp: lambda a: (a["min"], a["max"]), "clamp": lambda a: (a["min"], a["max"])}


class ExportError(ValueError):
    """A part of the model that the ONNX exporter cannot express (the message names the module)."""


def _pair(v) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(i) for i in v]


class Recorder:
    """Maps the tensors of one run of ``model`` to graph values and writes each op into ``graph``."""

    def __init__(self, model: nn.Module, graph: Graph):
        self.model, self.graph = model, graph
        self.values: dict[int, Value] = {}
        self._alive: list = []  # keeps recorded tensors alive, so their ids stay unique
        self.stack: list[tuple[str, nn.Module]] = []
        self.depth = 0

    # --- values ------------------------------------------------------------------------------------------------
    @staticmethod
    def _key(obj):
        return obj.int_repr() if isinstance(obj, QTensor) else obj if isinstance(obj, Tensor) else None

    def bind(self, obj, value: Value) -> None:
        self.values[id(self._key(obj))] = value
        self._alive.append(obj)

    def known(self, obj) -> bool:
        key = self._key(obj)
        return key is not None and id(key) in self.values

    def lookup(self, obj, what: str) -> Value:
        if not self.known(obj):
            raise ExportError(f"cannot export {self.where()}: {what} was computed by operations the exporter does "
                              "not see (float ops on a dequantized tensor, or ops on constants)")
        return self.values[id(self._key(obj))]

    def where(self) -> str:
        path, module = self.stack[-1] if self.stack else ("", self.model)
        return f"'{path or '<model>'}' ({type(module).__name__})"

    def _hint(self, kind: str) -> str:
        path, module = self.stack[-1] if self.stack else ("", self.model)
        leaf = path and not any(True for _ in module.children())
        return path if leaf else f"{path}.{kind}" if path else kind

    # --- running -----------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def recording(self):
        """Hooks on every module, wrappers on the QTensor ops and QFunctional ops; all removed afterwards."""
        handles, restore = [], []
        try:
            for path, module in self.model.named_modules():
                # prepended: the hooks see what the module itself computed, before any user hook changes it
                handles.append(module.register_forward_pre_hook(self._pre_hook(path), prepend=True))
                handles.append(module.register_forward_hook(self._post_hook(path), prepend=True))
                if isinstance(module, QFunctional):
                    for name in QFUNCTIONAL_OPS:
                        setattr(module, name, self._wrap_qfunctional(path, module, name, getattr(module, name)))
                    restore.append(lambda m=module: [m.__dict__.pop(n, None) for n in QFUNCTIONAL_OPS])
            functions = qtensor_module.TORCH_FUNCTIONS
            saved = dict(functions)
            for func, impl in saved.items():
                functions[func] = self._wrap(FUNCTION_KINDS.get(func), impl, func)
            restore.append(lambda: functions.update(saved))
            for name, kind in METHOD_KINDS.items():
                method = QTensor.__dict__[name]
                setattr(QTensor, name, self._wrap(kind, method, name))
                restore.append(lambda n=name, m=method: setattr(QTensor, n, m))
            yield
        finally:
            for handle in handles:
                handle.remove()
            for undo in reversed(restore):
                undo()

    def _pre_hook(self, path: str):
        def hook(module, args):
            self.stack.append((path, module))
            self.depth += isinstance(module, SEMANTIC_MODULES)
        return hook

    def _post_hook(self, path: str):
        def hook(module, args, output):
            if isinstance(module, SEMANTIC_MODULES):
                self.depth -= 1
                if self.depth == 0:
                    self._module(path, module, args[0], output)
            elif path and self.depth == 0 and any(self.known(a) for a in args):  # (the root's outputs: export_onnx)
                outputs = output if isinstance(output, (tuple, list)) else (output,)
                for out in outputs:
                    if self._key(out) is not None and not self.known(out):
                        raise ExportError(f"cannot export {self.where()}: it has no ONNX mapping (its output is not "
                                          "computed by an int8 module or a QTensor op the exporter knows; a float "
                                          "layer after a DeQuantStub?)")
            self.stack.pop()
        return hook

    def _wrap(self, kind: str | None, impl, func):
        def wrapper(*args, **kwargs):
            if self.depth:
                return impl(*args, **kwargs)
            name = func if isinstance(func, str) else qtensor_module._op_name(func)
            if kind is None:
                raise ExportError(f"cannot export {self.where()}: {name} on a QTensor has no ONNX mapping in "
                                  "minqat.onnx")
            self.depth += 1
            try:
                result = impl(*args, **kwargs)
            finally:
                self.depth -= 1
            self._op(kind, func, impl, args, kwargs, result)
            return result
        return wrapper

    def _wrap_qfunctional(self, path: str, module: QFunctional, name: str, method):
        def wrapper(*args, **kwargs):
            if self.depth:
                return method(*args, **kwargs)
            if name not in QFUNCTIONAL_SUPPORTED:
                raise ExportError(f"cannot export '{path}' (QFunctional): its {name} has no ONNX mapping in "
                                  f"minqat.onnx (supported: {', '.join(QFUNCTIONAL_SUPPORTED)})")
            self.depth += 1
            try:
                result = method(*args, **kwargs)
            finally:
                self.depth -= 1
            a, b = (self.lookup(t, f"input {i} of its {name}") for i, t in enumerate(args[:2]))
            if a.shape != b.shape:
                raise ExportError(f"cannot export '{path}' (QFunctional): {name} of shapes {a.shape} and {b.shape}; "
                                  "only same-shape adds are exported")
            y = self.graph.add(path, a, b, tuple(result.shape), float(result.scale), int(result.zero_point),
                               relu=name == "add_relu")
            self.bind(result, self._output_range(module, y, path))
            return result
        return wrapper

    # --- recording ---------------------------------------------------------------------------------------------
    def _output_range(self, module: nn.Module, y: Value, path: str) -> Value:
        """The clamp of ``convert(consistent=True)`` (``output_range``) as a Clip, if the module has one."""
        output_range = getattr(module, "output_range", None)
        return y if output_range is None else self.graph.clip(y, f"{path}.output_range", *output_range)

    def _module(self, path: str, module: nn.Module, x, y) -> None:
        v = self.lookup(x, "its input")
        if isinstance(module, DeQuantize):
            self.bind(y, Value(self.graph.dequantize(v, path), tuple(y.shape)))
            return
        if isinstance(module, Quantize):
            q = self.graph.quantize(v.name, path, tuple(y.shape), float(y.scale), int(y.zero_point), y.dtype)
            self.bind(y, self._output_range(module, q, path))
            return
        weight = (module.weight_int, module.weight_scale, module.weight_zero_point)
        emit = self.graph.linear
        if isinstance(module, _ConvNd):
            weight, emit = self._conv_weight(*weight), self.graph.conv
        out = emit(path, module, v, weight, tuple(y.shape), float(module.scale), int(module.zero_point), module._RELU)
        self.bind(y, self._output_range(module, out, path))

    def _conv_weight(self, w_int: Tensor, w_scale: Tensor, w_zero_point: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """ORT's QLinearConv takes one weight zero point for all channels: unequal per-channel zero points are
        folded into the codes, ``w_int - z_w[c]`` with zero point 0 (the same accumulator), where that fits int8.
        (QGemm takes per-channel zero points as they are.)"""
        if w_zero_point.dim() == 0 or not bool((w_zero_point != w_zero_point[0]).any()):
            return w_int, w_scale, w_zero_point
        centered = w_int.long() - w_zero_point.reshape(-1, *([1] * (w_int.dim() - 1)))
        if int(centered.min()) < -128 or int(centered.max()) > 127:
            raise ExportError(f"cannot export {self.where()}: its per-channel weight zero points differ "
                              f"({w_zero_point.tolist()}) and w_int - zero_point leaves int8; ONNX Runtime's "
                              "QLinearConv needs one zero point for all channels")
        return centered.to(torch.int8), w_scale, torch.zeros_like(w_zero_point)

    def _op(self, kind: str, func, impl, args, kwargs, result) -> None:
        x_obj = args[0] if args else next(iter(kwargs.values()))
        x = self.lookup(x_obj, f"the input of {kind}")
        hint, shape = self._hint(kind), tuple(getattr(result, "shape", ()))
        graph = self.graph
        if kind == "identity":
            y = x
        elif kind == "dequantize":
            y = Value(graph.dequantize(x, hint), shape)
        elif kind == "reshape":
            y = graph.reshape(x, hint, shape, [0, *shape[1:]] if shape[:1] == x.shape[:1] else list(shape))
        elif kind in ("transpose", "permute"):
            y = graph.same_qparams("Transpose", x, hint, shape, perm=self._perm(kind, args, kwargs, len(x.shape)))
        elif kind == "relu":
            y = graph.relu(x, hint)
        elif kind == "clamp":
            low, high = CLAMP_BOUNDS[func](_bound(impl, args, kwargs))
            q = [None if b is None else int(quantize_scalar(b, x.scale, x.zero_point, x.dtype)) for b in (low, high)]
            y = graph.clip(x, hint, *q)
        else:
            y = self._pool(kind, x, hint, shape, _bound(impl, args, kwargs))
        self.bind(result, y)

    def _perm(self, kind: str, args, kwargs, ndim: int) -> list[int]:
        rest = list(args[1:]) + list(kwargs.values())
        if kind == "transpose":
            perm = list(range(ndim))
            d0, d1 = (int(d) % ndim for d in rest[:2])
            perm[d0], perm[d1] = perm[d1], perm[d0]
            return perm
        dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list, torch.Size)) else rest
        return [int(d) % ndim for d in dims]

    def _pool(self, kind: str, x: Value, hint: str, shape, a: dict) -> Value:
        graph, spatial = self.graph, len(x.shape) - 2
        if kind == "max_pool2d":
            kernel = _pair(a["kernel_size"])
            return graph.same_qparams("MaxPool", x, hint, shape, kernel_shape=kernel,
                                      strides=_pair(a["stride"]) if a["stride"] else kernel,
                                      pads=_pair(a["padding"]) * 2, dilations=_pair(a["dilation"]),
                                      ceil_mode=int(bool(a["ceil_mode"])))
        if kind == "avg_pool2d":
            if a["divisor_override"] is not None:
                raise ExportError(f"cannot export {self.where()}: avg_pool2d with divisor_override has no ONNX mapping")
            kernel = _pair(a["kernel_size"])
            return graph.same_qparams("AveragePool", x, hint, shape, kernel_shape=kernel,
                                      strides=_pair(a["stride"]) if a["stride"] else kernel,
                                      pads=_pair(a["padding"]) * 2, ceil_mode=int(bool(a["ceil_mode"])),
                                      count_include_pad=int(bool(a["count_include_pad"])))
        if kind == "adaptive_avg_pool2d":
            size_in, size_out = list(x.shape[2:]), list(shape[2:])
            if size_out == [1] * spatial:
                return graph.same_qparams("GlobalAveragePool", x, hint, shape)
            if all(i % o == 0 for i, o in zip(size_in, size_out)):  # torch's windows are then these
                kernel = [i // o for i, o in zip(size_in, size_out)]
                return graph.same_qparams("AveragePool", x, hint, shape, kernel_shape=kernel, strides=kernel)
            raise ExportError(f"cannot export {self.where()}: adaptive_avg_pool2d from {size_in} to {size_out} "
                              "(not a whole number of input windows) has no ONNX mapping")
        dims = a["dim"]  # kind == "mean"
        dims = sorted({int(d) % len(x.shape) for d in ((dims,) if isinstance(dims, int) else dims or ())})
        if spatial < 1 or dims != list(range(2, len(x.shape))):
            raise ExportError(f"cannot export {self.where()}: mean over dims {dims} of a {len(x.shape)}-d QTensor; "
                              "only the mean over all spatial dims (2, 3, ...) is exported")
        kept = tuple(x.shape[:2]) + (1,) * spatial
        y = graph.same_qparams("GlobalAveragePool", x, hint, kept)
        if a["keepdim"]:
            return y
        return graph.reshape(y, f"{hint}.squeeze", shape, [0, *shape[1:]])


def _bound(impl, args, kwargs) -> dict:
    """The call's arguments by name, defaults filled in (``impl``: the Python function QTensor runs)."""
    bound = inspect.signature(impl).bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)
