r"""``export_onnx``: a converted int8 model -> an ONNX QDQ graph that ONNX Runtime runs on its integer kernels.

The model is run once on ``example_input`` and what it computes is written down (``minqat.onnx.trace``) as
QuantizeLinear / DequantizeLinear pairs around float ops (``minqat.onnx.graph``): per-channel int8 weights
(``DequantizeLinear`` with ``axis=0``), int32 biases with scale ``s_x * s_w``, ``QuantizeLinear`` /
``DequantizeLinear`` at the stubs. The graph is checked with ``onnx.checker.check_model(full_check=True)``.
The batch dimension is symbolic (``N``) wherever the model keeps it.

Supported (everything else raises ``ValueError`` naming the module path and type):

* int8 modules, uint8 or int8 activations: ``Quantize``, ``DeQuantize``, ``Conv1d/2d/3d``, ``ConvReLU1d/2d/3d``
  (zeros or reflect padding), ``Linear``, ``LinearReLU`` (inputs of any rank), with per-tensor or per-channel
  weights (a conv's unequal per-channel weight zero points are folded into its codes where ``w - z`` fits int8:
  ORT's QLinearConv takes one zero point), and the ``output_range`` clamps of ``convert(consistent=True)``;
* ``QFunctional.add`` / ``add_relu`` of same-shape tensors (residual blocks);
* on QTensors: ``nn.ReLU`` / ``F.relu`` / ``x.relu()``, ``ReLU6`` / ``hardtanh`` / ``clamp``, ``nn.MaxPool2d``,
  ``nn.AvgPool2d``, ``nn.AdaptiveAvgPool2d`` (to 1x1 or whole windows), ``x.mean`` over the spatial dims,
  ``torch.flatten`` / ``nn.Flatten`` / ``view`` / ``reshape`` / ``squeeze`` / ``unsqueeze``, ``transpose`` /
  ``permute``, ``nn.Dropout`` (eval), ``nn.Identity``, ``contiguous``, ``x.dequantize()``.

Not exported: ``QFunctional.mul`` / ``cat`` / ``matmul`` / ``add_scalar`` / ``mul_scalar``, ``torch.cat``,
``chunk`` / ``split`` / indexing, float layers (kept out of quantization) between a DeQuantStub and a QuantStub.
A prepared model (observers or fake quants still in it, in eval mode) is exported through a converted copy,
``minqat.convert(model, consistent=True)``: its QuantizeLinear / DequantizeLinear pairs carry the fake quants'
own scales and zero points, its weights the codes the fake quants produced, and the graph computes the
fake-quant model to within 1 LSB per layer (``minqat.consistent``; the bias becomes int32 on the s_x*s_w grid).

**Agreement with ONNX Runtime** (CPU execution provider, x86-64; verified with onnxruntime 1.32 in
``tests/test_onnx.py``): ORT computes the integers of minqat's ``"onnxruntime"`` mode (``set_requantization``,
arithmetic in ``minqat.kernels.onnxruntime``) bit for bit for convs, linear layers, residual adds, the input
quantization, ReLU / clamps, max pooling and reshapes. Average pools keep torch's formulas in minqat and differ
from ORT's QLinearAveragePool / QLinearGlobalAveragePool by 1 at ties (measured: 0.6 % of a 2x2 pool's outputs
on NCHW tensors, 9.6 % channels-last, 0.9 % global, 0 for 3x3). On x86 CPUs without AVX512-VNNI / AVX-VNNI,
ORT's u8s8 kernels saturate int16 pair sums when activations exceed 127 (torch's fbgemm too): keep activations on
[0, 127] (``reduce_range``, torch's x86 default) there.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from ..convert import convert
from ..fake_quantize import FakeQuantizeBase
from ..nn.quantized.stubs import Quantize
from ..observers import ObserverBase
from .graph import Graph, Value
from .trace import ExportError, Recorder

__all__ = ["export_onnx", "require"]

MIN_OPSET = 13  # per-channel DequantizeLinear (axis) and Squeeze/Unsqueeze with axes inputs


def require(package: str):
    """Import an optional dependency, or raise ImportError naming the extra that installs it."""
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError as err:
        raise ImportError(f"minqat.onnx needs the '{package}' package: pip install 'minqat[onnx]' "
                          "(installs onnx and onnxruntime)") from err


def _int8_model(model: nn.Module) -> nn.Module:
    """``model`` itself if converted; a prepared model converted (a copy) with ``consistent=True``."""
    prepared = next((p for p, m in model.named_modules() if isinstance(m, (FakeQuantizeBase, ObserverBase))), None)
    if prepared is not None:
        if model.training:
            raise ValueError(f"export_onnx got a prepared model ('{prepared}' is an observer or fake quant) in "
                             "training mode: call model.eval() (the export converts a copy with "
                             "minqat.convert(model, consistent=True), BatchNorm on its running statistics) or "
                             "convert it yourself")
        model = convert(model, consistent=True)
    if not any(isinstance(m, Quantize) for m in model.modules()):
        raise ValueError(f"export_onnx needs a converted int8 model (minqat.convert), but {type(model).__name__} "
                         "holds no Quantize module: its input would never be quantized")
    return model


def _check_opset(opset, onnx) -> int:
    newest = onnx.defs.onnx_opset_version()
    if not isinstance(opset, int) or isinstance(opset, bool) or not MIN_OPSET <= opset <= newest:
        raise ValueError(f"opset must be an int in [{MIN_OPSET}, {newest}] (this onnx package's newest), "
                         f"got {opset!r}")
    return opset


def _outputs(result) -> list:
    items = list(result) if isinstance(result, (tuple, list)) else [result]
    if not items:
        raise ValueError("the model returned nothing to export")
    return items


def _type(helper, onnx, v: Value, batch: int):
    elem = {None: onnx.TensorProto.FLOAT, torch.uint8: onnx.TensorProto.UINT8, torch.int8: onnx.TensorProto.INT8}
    shape = ["N", *v.shape[1:]] if v.shape[:1] == (batch,) else list(v.shape)
    return helper.make_tensor_value_info(v.name, elem[v.dtype], shape)


def export_onnx(model_int8: nn.Module, example_input: Tensor, path: str | os.PathLike | None,
                opset: int = 21):
    r"""Export a converted int8 model as an ONNX QDQ graph; returns the ``onnx.ModelProto`` (saved to ``path``).

    Args:
        model_int8: the model ``minqat.convert`` returned (float tensor in, float tensors or QTensors out),
            in eval mode; or a prepared model in eval mode, exported as ``minqat.convert(model,
            consistent=True)`` (a copy; the model itself is not changed).
        example_input: one float input; the model runs once on it (its batch dimension becomes ``N``).
        path: where to save the ``.onnx`` file, or ``None`` to only return the model.
        opset: the default-domain opset, 13 or newer (per-channel ``DequantizeLinear``).

    Raises:
        ValueError: a module or op without an ONNX mapping (the message names its path and type), a prepared
            model in training mode, a bad ``opset`` or ``example_input``.
        ImportError: the ``onnx`` package is missing (``pip install 'minqat[onnx]'``).

    >>> import pytest; _ = pytest.importorskip("onnx")
    >>> from minqat.nn.quantized import Conv2d, DeQuantize, Quantize
    >>> conv = Conv2d(1, 2, 1)                                            # an int8 layer, set by hand here
    >>> conv.set_weight_bias(torch.tensor([[[[2]]], [[[-3]]]], dtype=torch.int8), torch.tensor([0.5, 0.25]),
    ...                      torch.tensor([0, 0]), torch.tensor([0.25, 0.0]))
    >>> model = torch.nn.Sequential(Quantize(0.5, 0), conv, DeQuantize())
    >>> proto = export_onnx(model, torch.rand(1, 1, 2, 2), None)
    >>> [node.op_type for node in proto.graph.node]                      # doctest: +NORMALIZE_WHITESPACE
    ['QuantizeLinear', 'DequantizeLinear', 'DequantizeLinear', 'DequantizeLinear', 'Conv', 'QuantizeLinear',
     'DequantizeLinear']
    >>> [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    ['N', 1, 2, 2]
    """
    onnx = require("onnx")
    from onnx import helper, numpy_helper

    if not isinstance(model_int8, nn.Module):
        raise ValueError(f"model_int8 must be a torch.nn.Module, got {type(model_int8).__name__}")
    if not isinstance(example_input, Tensor) or not example_input.is_floating_point():
        raise ValueError("example_input must be a float tensor (the model's input, quantized by its first "
                         f"Quantize), got {type(example_input).__name__} {getattr(example_input, 'dtype', '')}")
    opset = _check_opset(opset, onnx)
    model_int8 = _int8_model(model_int8)
    graph = Graph(helper, numpy_helper)
    recorder = Recorder(model_int8, graph)
    x = example_input.detach().float()
    batch = x.shape[0] if x.dim() else -1
    graph_input = Value(graph.fresh("input"), tuple(x.shape))
    recorder.bind(x, graph_input)
    with torch.no_grad(), recorder.recording():
        try:
            result = model_int8(x)
        except ExportError:
            raise
        except (TypeError, RuntimeError, NotImplementedError) as err:
            raise ExportError(f"cannot export {recorder.where()}: running it failed: {err}") from err
        outputs = [recorder.lookup(y, "the model's output") for y in _outputs(result)]
    final: list[Value] = []
    for v in outputs:  # a graph output must be produced by a node, and listed once
        if v.name == graph_input.name or any(v.name == f.name for f in final):
            v = Value(graph.node("Identity", [v.name], "output"), v.shape, v.dtype, v.scale, v.zero_point)
        final.append(v)
    proto_graph = helper.make_graph(graph.nodes, type(model_int8).__name__, [_type(helper, onnx, graph_input, batch)],
                                    [_type(helper, onnx, v, batch) for v in final], graph.initializers)
    opsets = [helper.make_opsetid("", opset)]
    proto = helper.make_model(proto_graph, opset_imports=opsets, producer_name="minqat",
                              ir_version=helper.find_min_ir_version_for(opsets))  # the oldest that fits: older ORTs
    onnx.checker.check_model(proto, full_check=True)
    if path is not None:
        onnx.save(proto, os.fspath(path))
    return proto
