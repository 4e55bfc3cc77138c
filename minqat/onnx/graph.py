r"""The QDQ graph under construction: values, constants, and one emitter per int8 operation.

A *value* is an edge of the int8 model: a float tensor (the model input, a DeQuantize output) or a quantized
one (a ``QTensor``: integers with a per-tensor scale and zero point). A quantized value is carried by its
*integer* tensor, as in any QDQ graph; an op that computes on real numbers reads it through a
``DequantizeLinear`` of its own and writes its result through a ``QuantizeLinear`` -- the pattern ONNX
Runtime's graph optimizer fuses into its integer kernels::

    conv / linear:   DQ(x), DQ(w_int8, axis 0), DQ(b_int32, s_x*s_w, axis 0) -> Conv | Gemm -> Q(s_y, z_y)
                     ORT: QLinearConv | QGemm (requantization: minqat.kernels.onnxruntime)
    add (add_relu):  DQ(a), DQ(b) -> Add (-> Relu) -> Q                       ORT: QLinearAdd
    fused ReLU:      z_y == qmin: Conv -> Relu -> Q, the Relu absorbed by the clamp of Q (ORT drops it);
                     z_y > qmin:  Conv -> Q, then a relu below
    reflect padding: a Pad below, before the conv's own DQ
    linear, not 2-d: a Reshape to (M, in_features) -> the Gemm pattern -> a Reshape back (a MatMul with a
                     bias would become MatMulIntegerToFloat and a float Add)
    any other op:    DQ -> op -> Q with the input's qparams (relu, clip, pad, reshape, transpose, max pool,
                     average pools): ORT drops the pair around ops that only move or compare values and runs
                     QLinearAveragePool / QLinearGlobalAveragePool for the averages

Constants are initializers named after the module that owns them (``layer1.conv1.weight``); values are named
after the op that produced them (``layer1.conv1``, ``layer1.conv1.relu``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..dtypes import dtype_range
from ..kernels.onnxruntime import bias_int32

__all__ = ["Value", "Graph"]


@dataclass(frozen=True)
class Value:
    """One edge: ``name`` in the graph; quantized values also carry ``dtype``, ``scale``, ``zero_point``."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype | None = None  # torch.uint8 / torch.int8 for a quantized value, None for float32
    scale: float = 1.0
    zero_point: int = 0

    @property
    def quantized(self) -> bool:
        return self.dtype is not None


def _numpy_dtype(dtype: torch.dtype) -> type:
    return {torch.uint8: np.uint8, torch.int8: np.int8}[dtype]


@dataclass
class Graph:
    """Nodes and initializers of the graph being built (``onnx`` protos are made by the caller's ``helper``)."""

    helper: object  # the onnx.helper module
    numpy_helper: object  # the onnx.numpy_helper module
    nodes: list = field(default_factory=list)
    initializers: list = field(default_factory=list)
    _names: set = field(default_factory=set)

    # --- names and constants ---------------------------------------------------------------------------------
    def fresh(self, hint: str) -> str:
        """A name not used yet, ``hint`` itself if possible (``hint.1``, ``hint.2`` ... otherwise)."""
        name, i = hint or "value", 0
        while name in self._names:
            i += 1
            name = f"{hint}.{i}"
        self._names.add(name)
        return name

    def const(self, hint: str, array: np.ndarray) -> str:
        name = self.fresh(hint)
        self.initializers.append(self.numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op_type: str, inputs: list[str], hint: str, **attrs) -> str:
        """Append a node with one output and return the output's name."""
        out = self.fresh(hint)
        self.nodes.append(self.helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def qparams(self, hint: str, scale: float, zero_point: int, dtype: torch.dtype) -> list[str]:
        """0-d float32 scale and zero point initializers (the zero point's type is the quantized type)."""
        return [self.const(f"{hint}.scale", np.float32(scale)),
                self.const(f"{hint}.zero_point", _numpy_dtype(dtype)(zero_point))]

    # --- the two boundaries ------------------------------------------------------------------------------------
    def quantize(self, x: str, hint: str, shape, scale: float, zero_point: int, dtype: torch.dtype) -> Value:
        name = self.node("QuantizeLinear", [x, *self.qparams(hint, scale, zero_point, dtype)], hint)
        return Value(name, tuple(shape), dtype, float(np.float32(scale)), int(zero_point))

    def dequantize(self, v: Value, hint: str | None = None) -> str:
        """A float name for ``v``: a DequantizeLinear of its own (one per consumer, as QDQ graphs have)."""
        if not v.quantized:
            return v.name
        hint = hint or f"{v.name}.dq"
        return self.node("DequantizeLinear", [v.name, *self.qparams(hint, v.scale, v.zero_point, v.dtype)], hint)

    # --- weighted layers ---------------------------------------------------------------------------------------
    def _weight(self, path: str, w_int: torch.Tensor, w_scale: torch.Tensor, w_zero_point: torch.Tensor,
                axis: int) -> str:
        per_channel = w_scale.dim() == 1
        w = self.const(f"{path}.weight", w_int.detach().cpu().numpy())
        s = self.const(f"{path}.weight.scale", w_scale.detach().cpu().numpy().astype(np.float32))
        z = self.const(f"{path}.weight.zero_point", w_zero_point.detach().cpu().numpy().astype(np.int8))
        attrs = {"axis": axis} if per_channel else {}
        return self.node("DequantizeLinear", [w, s, z], f"{path}.weight.dq", **attrs)

    def _bias(self, path: str, bias: torch.Tensor, x: Value, w_scale: torch.Tensor) -> str:
        """``DQ(b_int32, s_x * s_w, 0)``: ORT's fused kernels add ``b_int`` to the accumulator."""
        b_int, s_b = bias_int32(bias.detach().cpu().float(), x.scale, w_scale.detach().cpu())
        b = self.const(f"{path}.bias", b_int.numpy())
        s = self.const(f"{path}.bias.scale", s_b.numpy().astype(np.float32))
        z = self.const(f"{path}.bias.zero_point", np.zeros(s_b.shape, np.int32))
        attrs = {"axis": 0} if s_b.dim() == 1 else {}
        return self.node("DequantizeLinear", [b, s, z], f"{path}.bias.dq", **attrs)

    def _output(self, y: str, path: str, shape, scale: float, zero_point: int, dtype: torch.dtype,
                relu: bool) -> Value:
        """``Q(y)``, with a fused ReLU absorbed by Q's clamp (``z_y == qmin``) or applied after it."""
        absorbed = relu and zero_point == dtype_range(dtype)[0]
        if absorbed:  # Q clamps at qmin == z_y anyway; the Relu makes that explicit, ORT drops it
            y = self.node("Relu", [y], f"{path}.relu_float")
        v = self.quantize(y, path, shape, scale, zero_point, dtype)
        return self.relu(v, f"{path}.relu") if relu and not absorbed else v

    def conv(self, path: str, m, x: Value, weight: tuple, y_shape, y_scale: float, y_zero_point: int,
             relu: bool) -> Value:
        """An int8 ``Conv1d/2d/3d`` (``ConvReLU*`` with ``relu``): ``m`` its module, ``weight`` its
        ``(w_int, w_scale, w_zero_point)``."""
        w_int, w_scale, w_zero_point = weight
        dims = w_int.dim() - 2
        pads = [int(p) for p in m.padding] * 2  # begins, then ends
        x_in = x
        if m.padding_mode == "reflect":  # reflect the integers, then convolve unpadded (as the int8 module)
            pad_all = [0, 0, *m.padding, 0, 0, *m.padding]
            padded = (*x.shape[:2], *(n + 2 * int(p) for n, p in zip(x.shape[2:], m.padding)))
            x_in = self.same_qparams("Pad", x, f"{path}.pad", padded,
                                     [self.const(f"{path}.pads", np.array(pad_all, np.int64))], mode="reflect")
            pads = [0] * (2 * dims)
        inputs = [self.dequantize(x_in, f"{path}.input.dq"), self._weight(path, w_int, w_scale, w_zero_point, axis=0)]
        if m.bias_float is not None:
            inputs.append(self._bias(path, m.bias_float, x, w_scale))
        y = self.node("Conv", inputs, f"{path}.conv", kernel_shape=list(w_int.shape[2:]),
                      strides=list(m.stride), pads=pads, dilations=list(m.dilation), group=m.groups)
        return self._output(y, path, y_shape, y_scale, y_zero_point, x.dtype, relu)

    def linear(self, path: str, m, x: Value, weight: tuple, y_shape, y_scale: float, y_zero_point: int,
               relu: bool) -> Value:
        """An int8 ``Linear`` (``LinearReLU`` with ``relu``) as a Gemm. Inputs of another rank are reshaped to
        ``(M, in_features)`` around it, on the integers: ORT fuses DQ -> Gemm -> Q into QGemm, while a MatMul
        with a bias becomes MatMulIntegerToFloat and a float Add."""
        w_int, w_scale, w_zero_point = weight
        flat = len(x.shape) != 2
        if flat:
            x = self.reshape(x, f"{path}.to_2d", (-1, x.shape[-1]), [-1, x.shape[-1]])
        inputs = [self.dequantize(x, f"{path}.input.dq"), self._weight(path, w_int, w_scale, w_zero_point, axis=0)]
        if m.bias_float is not None:
            inputs.append(self._bias(path, m.bias_float, x, w_scale))
        y = self.node("Gemm", inputs, f"{path}.gemm", transB=1)
        out = self._output(y, path, (-1, y_shape[-1]) if flat else y_shape, y_scale, y_zero_point, x.dtype, relu)
        if flat:
            target = [-1, *y_shape[1:]] if len(y_shape) > 1 else [y_shape[0]]
            out = self.reshape(out, f"{path}.from_2d", y_shape, target)
        return out

    def reshape(self, x: Value, hint: str, shape, target: list[int]) -> Value:
        """Reshape to ``target`` (ONNX Reshape: 0 copies a dim, -1 infers one); qparams unchanged."""
        return self.same_qparams("Reshape", x, hint, shape, [self.const(f"{hint}.shape", np.array(target, np.int64))])

    # --- elementwise and pooling ---------------------------------------------------------------------------------
    def add(self, path: str, a: Value, b: Value, shape, scale: float, zero_point: int, relu: bool) -> Value:
        y = self.node("Add", [self.dequantize(a, f"{path}.a.dq"), self.dequantize(b, f"{path}.b.dq")],
                      f"{path}.add")
        return self._output(y, path, shape, scale, zero_point, a.dtype, relu)

    def relu(self, x: Value, hint: str) -> Value:
        """``max(x, z)``: DQ -> Relu -> Q with x's own qparams."""
        return self.same_qparams("Relu", x, hint, x.shape)

    def clip(self, x: Value, hint: str, low: int | None, high: int | None) -> Value:
        """``min(max(x, low), high)`` for integer bounds (already quantized, as the int8 op does), as DQ -> Clip
        -> Q with the bounds dequantized: float32 rounding is monotonic, so the comparisons are the integers'."""
        def bound(q, name):
            return "" if q is None else self.const(f"{hint}.{name}", np.float32(x.scale) * np.float32(q - x.zero_point))
        bounds = [bound(low, "min"), bound(high, "max")]
        while bounds and not bounds[-1]:
            bounds.pop()
        return self.same_qparams("Clip", x, hint, x.shape, bounds)

    def same_qparams(self, op_type: str, x: Value, hint: str, shape, extra: list[str] = (), **attrs) -> Value:
        """DQ -> ``op_type`` -> Q with x's own qparams, QDQ's form for an op on a quantized tensor.

        ORT drops the pair around ops that only move or compare values (Reshape, Transpose, MaxPool, ...) and
        fuses it around averages (QLinearAveragePool, QLinearGlobalAveragePool). Where it runs the op in float,
        values that are only moved or compared come back exactly: ``fl32(s * (q - z)) / s`` rounds to ``q - z``
        for ``|q - z| <= 255``.
        """
        y = self.node(op_type, [self.dequantize(x, f"{hint}.dq"), *extra], f"{hint}.float", **attrs)
        return self.quantize(y, hint, shape, x.scale, x.zero_point, x.dtype)
