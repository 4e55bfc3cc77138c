"""minqat.onnx: QDQ export of int8 models, checked against ONNX Runtime (CPU execution provider) bit for bit.

(1) Hand-worked values of ORT's arithmetic (``minqat.kernels.onnxruntime``) at ties and clamp edges.
(2) Live parity with ONNX Runtime (the oracle here): ``QuantizeLinear`` at ties and ``QLinearAdd`` on every input
    pair; single int8 conv (1-d, 2-d; grouped, strided, dilated, zero or reflect padding) and linear layers (2-d
    and 3-d inputs) with per-tensor / per-channel / asymmetric weights, with and without bias and ReLU (output
    zero point at qmin or above), uint8 or int8 activations, power-of-two scales (exact ties) -- exported, run in
    ORT, equal to minqat's ``"onnxruntime"`` mode bit for bit, with ORT running its integer kernels (QLinearConv,
    QGemm), not float ones.
(3) Whole models from the QAT flow (fuse, prepare_qat, observe, convert): conv-BN-ReLU chains, residual adds,
    max pool, flatten, linear layers, under per-channel, per-tensor and asymmetric weight qconfigs, and a
    ``convert(consistent=True)`` model (output clamps). Activations are uint8 on [0, 127]; on x86 CPUs without
    AVX512-VNNI / AVX-VNNI, ORT's u8s8 kernels saturate int16 pair sums of inputs above 127 (which a layer may
    output beyond its observed range), so there ORT itself could differ; this machine has VNNI.
(4) ``onnx.reference.ReferenceEvaluator`` (float ops in float32): measured mismatch rate vs ORT, and where minqat's
    torch-style average pools differ from ORT's QLinear(Global)AveragePool (measured, documented).
(5) Bad input: modules and ops without an ONNX mapping, prepared models, bad arguments.
"""
from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import minqat
from minqat.kernels.onnxruntime import bias_int32, qlinear_add, quantize_linear, requantize_onnxruntime
from minqat.kernels.requantize import requantizer
from minqat.nn import quantized as nnq
from minqat.onnx import compare, export_onnx, run_onnxruntime, run_reference, set_requantization
from tests.test_quantized_modules import qconfig, randomize_bn

try:
    import onnx
    import onnxruntime as ort
    from onnx.reference import ReferenceEvaluator
except ImportError:  # the hand-worked tests (1) and the kernel checks (5) still run
    onnx = ort = None
requires_ort = pytest.mark.skipif(ort is None, reason="onnx / onnxruntime are not installed (pip install "
                                  "'minqat[onnx]'): the ONNX Runtime checks are skipped")

U8 = torch.uint8


FLOAT_KERNELS = {"Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "MatMulIntegerToFloat", "Add"}


def ort_ops(proto) -> list[str]:
    """The op types of the graph ORT actually runs (its optimized graph)."""
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]


# --------------------------------------------------------------------------------------------------------
# (1) hand-worked values
# --------------------------------------------------------------------------------------------------------
def test_requantize_onnxruntime_by_hand():
    acc = torch.tensor([[5, 3, -3, 1000]], dtype=torch.int32)  # mult = 0.5: 2.5, 1.5, -1.5, 500
    assert requantize_onnxruntime(acc, 1.0, 0.5, 1.0, 1, axis=1).tolist() == [[3, 3, 0, 255]]  # rint, then + z
    relu = requantize_onnxruntime(acc, 1.0, 0.5, 1.0, 10, axis=1, relu=True)
    assert relu.tolist() == [[12, 12, 10, 255]]  # -2 + 10 = 8 -> clamped at z_y = 10
    # bias 0.375 / s_b 0.25 = 1.5 -> b_int 2 (to even): (1 + 2) * 0.5 = 1.5 -> 2; torch's float bias: (1 + 1.5) * 0.5
    bias = torch.tensor([0.375])
    ours = requantize_onnxruntime(torch.tensor([[1]], dtype=torch.int32), 0.5, 0.5, 0.5, 0, bias, axis=1)
    theirs = requantizer("fbgemm")(torch.tensor([[1]], dtype=torch.int32), 0.5, 0.5, 0.5, 0, bias, axis=1)
    assert ours.tolist() == [[2]] and theirs.tolist() == [[1]]  # 1.25 -> 1
    assert requantize_onnxruntime(acc, 1.0, 0.5, 1.0, 0, axis=1, dtype=torch.int8).tolist() == [[2, 2, -2, 127]]


def test_bias_int32_by_hand():
    b_int, s_b = bias_int32(torch.tensor([0.375, -0.125, 1e12]), 0.5, torch.tensor([0.5, 0.25, 1.0]))
    assert b_int.tolist() == [2, -1, 2**31 - 1] and s_b.tolist() == [0.25, 0.125, 0.5]  # 1.5 -> 2, saturated


def test_quantize_linear_by_hand():
    x = torch.tensor([0.25, 0.75, 1.25, -0.25, 200.0, -200.0, math.inf, -math.inf, math.nan])
    assert quantize_linear(x, 0.5, 3).tolist() == [3, 5, 5, 3, 255, 0, 255, 0, 0]  # 0.5 -> 0 then + 3
    # torch's quantize_per_tensor adds z before rounding: rint(0.5 + 3) = 4
    assert minqat.quantize_per_tensor(x[:1], 0.5, 3, U8).tolist() == [4]
    assert quantize_linear(x, 0.5, -1, torch.int8).tolist() == [-1, 1, 1, -1, 127, -128, 127, -128, -128]


def test_qlinear_add_by_hand():
    a = torch.tensor([10, 20, 30, 255], dtype=U8)
    # r_a = 0.5, r_b = 0.25, fixed = 5 - 5: 7.5 -> 8, 15, 22.5 -> 22, 191.25 -> 191
    assert qlinear_add(a, 0.5, 10, a, 0.25, 0, 1.0, 5).tolist() == [8, 15, 22, 191]
    # z_y is inside the rounding (unlike conv): 2.5 + 20 = 22.5 -> 22, 17.5 + 20 = 37.5 -> 38; relu: >= z_y
    assert qlinear_add(a, 0.5, 10, a, 0.25, 0, 1.0, 20, relu=True).tolist() == [22, 30, 38, 206]
    assert qlinear_add(a, 0.5, 10, a, 0.25, 0, 1.0, 30, relu=True).tolist() == [32, 40, 48, 216]
    assert qlinear_add(a, 0.5, 10, a, 0.25, 0, 0.125, 5).tolist() == [25, 85, 145, 255]  # saturates


# --------------------------------------------------------------------------------------------------------
# (2) kernels and single layers against ONNX Runtime
# --------------------------------------------------------------------------------------------------------
def _graph(nodes, inputs, outputs, inits):
    g = onnx.helper.make_graph(nodes, "g", inputs, outputs, [onnx.numpy_helper.from_array(np.asarray(v), k)
                                                          for k, v in inits.items()])
    return onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 21)])


@requires_ort
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8])
def test_qlinear_add_equals_onnxruntime_on_every_pair(dtype):
    np_dtype, elem = (np.uint8, onnx.TensorProto.UINT8) if dtype == U8 else (np.int8, onnx.TensorProto.INT8)
    lo, hi = (0, 255) if dtype == U8 else (-128, 127)
    a, b = torch.meshgrid(torch.arange(lo, hi + 1), torch.arange(lo, hi + 1), indexing="ij")
    a, b = a.reshape(-1).to(dtype), b.reshape(-1).to(dtype)
    gen = torch.Generator().manual_seed(0)
    for _ in range(6):
        s = (torch.rand(3, generator=gen) * 0.2 + 0.01).tolist()
        z = torch.randint(lo, hi + 1, (3,), generator=gen).tolist()
        model = _graph([onnx.helper.make_node("DequantizeLinear", ["a", "sa", "za"], ["af"]),
                        onnx.helper.make_node("DequantizeLinear", ["b", "sb", "zb"], ["bf"]),
                        onnx.helper.make_node("Add", ["af", "bf"], ["yf"]),
                        onnx.helper.make_node("QuantizeLinear", ["yf", "sy", "zy"], ["y"])],
                       [onnx.helper.make_tensor_value_info(n, elem, [a.numel()]) for n in "ab"],
                       [onnx.helper.make_tensor_value_info("y", elem, [a.numel()])],
                       {"sa": np.float32(s[0]), "sb": np.float32(s[1]), "sy": np.float32(s[2]),
                        "za": np_dtype(z[0]), "zb": np_dtype(z[1]), "zy": np_dtype(z[2])})
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        expected = session.run(None, {"a": a.numpy(), "b": b.numpy()})[0]
        got = qlinear_add(a, s[0], z[0], b, s[1], z[1], s[2], z[2]).numpy()
        assert (got == expected).all(), f"{int((got != expected).sum())} of {a.numel()} differ (s={s}, z={z})"


@requires_ort
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8])
def test_quantize_linear_equals_onnxruntime_at_ties(dtype):
    elem, np_dtype = (onnx.TensorProto.UINT8, np.uint8) if dtype == U8 else (onnx.TensorProto.INT8, np.int8)
    gen = torch.Generator().manual_seed(1)
    for _ in range(8):
        scale, zero_point = float(torch.rand(1, generator=gen) * 0.1 + 1e-3), int(torch.randint(0, 100, (1,)))
        k = torch.randint(-400, 400, (4000,), generator=gen).float()
        x = (k + torch.tensor([0.0, 0.5, -0.5, 0.25, 1e-4])[torch.randint(0, 5, (4000,), generator=gen)]) * scale
        x = torch.cat([x, torch.tensor([math.nan, math.inf, -math.inf, 0.0, -0.0])])
        model = _graph([onnx.helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"])],
                       [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [x.numel()])],
                       [onnx.helper.make_tensor_value_info("y", elem, [x.numel()])],
                       {"s": np.float32(scale), "z": np_dtype(zero_point)})
        expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            None, {"x": x.numpy()})[0]
        assert (quantize_linear(x, scale, zero_point, dtype).numpy() == expected).all()


@st.composite
def layers(draw):
    """One int8 conv (1-d / 2-d) or linear layer between a Quantize and a DeQuantize, with its input."""
    seed = draw(st.integers(0, 2**16))
    kind = draw(st.sampled_from(["conv2d", "conv2d", "conv1d", "linear"]))
    scheme = draw(st.sampled_from(["per_channel", "per_channel_affine", "per_tensor", "per_tensor_affine"]))
    pow2, bias, relu = draw(st.booleans()), draw(st.booleans()), draw(st.booleans())
    gen = torch.Generator().manual_seed(seed)
    cin = draw(st.integers(1, 6))
    if kind == "linear":
        cout, shape = draw(st.integers(1, 12)), ((3, cin), (2, 3, cin))[draw(st.integers(0, 1))]
        layer = (nnq.LinearReLU if relu else nnq.Linear)(cin, cout, bias)
        w_shape = (cout, cin)
    else:
        dims = 2 if kind == "conv2d" else 1
        groups = draw(st.sampled_from([g for g in (1, 2, cin) if cin % g == 0]))
        cout = groups * draw(st.integers(1, 3))
        k, dil, pad, stride = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(0, 2)), \
            draw(st.integers(1, 2))
        size = max(draw(st.integers(3, 7)), dil * (k - 1) + 1 - 2 * pad)
        cls = {(2, False): nnq.Conv2d, (2, True): nnq.ConvReLU2d, (1, False): nnq.Conv1d, (1, True): nnq.ConvReLU1d}
        layer = cls[dims, relu](cin, cout, k, stride, pad, dil, groups, bias,
                                draw(st.sampled_from(["zeros", "zeros", "reflect"])) if pad < size else "zeros")
        shape, w_shape = (2, cin) + (size,) * dims, tuple(layer.weight_int.shape)
    rand = (lambda *s: 2.0 ** -torch.randint(2, 9, s, generator=gen).float()) if pow2 else \
        (lambda *s: torch.rand(s, generator=gen) * 0.02 + 1e-3)
    # unequal per-channel zero points export only while w_int - zero_point stays in int8 (minqat.onnx.trace)
    w_max = 100 if scheme == "per_channel_affine" else 127
    w_int = torch.randint(-w_max - (w_max == 127), w_max + 1, w_shape, generator=gen, dtype=torch.int8)
    per_channel = scheme.startswith("per_channel")
    w_scale = rand(cout) if per_channel else rand(1)[0]
    if scheme == "per_channel_affine":  # unequal zero points per channel
        w_zp = torch.randint(-20, 21, (cout,), generator=gen)
    elif per_channel:
        w_zp = torch.zeros(cout, dtype=torch.long)
    else:
        w_zp = torch.tensor(int(torch.randint(-20, 21, (1,), generator=gen)) if scheme == "per_tensor_affine" else 0)
    act = draw(st.sampled_from([U8, U8, torch.int8]))  # activations: torch's quint8, or int8
    lo = 0 if act == U8 else -64  # inputs on [0, 127] / [-64, 63]: no int16 saturation on any x86 (see (3))
    s_x, z_x = float(rand(1) * 4), int(torch.randint(lo, lo + 128, (1,), generator=gen))
    b = torch.randn(cout, generator=gen) * float(s_x * w_scale.max()) * 200 if bias else None
    layer.set_weight_bias(w_int, w_scale, w_zp, b)
    x_int = torch.randint(lo, lo + 128, shape, generator=gen)
    layer.scale, layer.zero_point = _output_qparams(layer, x_int, s_x, z_x, relu, pow2, gen, act)
    model = nn.Sequential(nnq.Quantize(s_x, z_x, act), layer, nnq.DeQuantize())
    return model, ((x_int - z_x) * s_x).float()


def _output_qparams(layer, x_int, s_x, z_x, relu, pow2, gen, dtype) -> tuple[float, int]:
    """Output qparams that spread the layer's real output over roughly the dtype's range (some of it clamped)."""
    qmin = 0 if dtype == U8 else -128
    x = (x_int.double() - z_x) * s_x
    w_scale, w_zp = layer.weight_scale.double(), layer.weight_zero_point.double()
    shape = (-1,) + (1,) * (layer.weight_int.dim() - 1)
    w = (layer.weight_int.double() - w_zp.reshape(shape if w_zp.dim() else ())) * \
        w_scale.reshape(shape if w_scale.dim() else ())
    b = None if layer.bias_float is None else layer.bias_float.double()
    if isinstance(layer, nnq.Linear):
        real = x @ w.t() + (0 if b is None else b)
    else:
        conv = torch.nn.functional.conv2d if w.dim() == 4 else torch.nn.functional.conv1d
        padding = layer.padding
        if layer.padding_mode == "reflect":
            x = torch.nn.functional.pad(x, [p for p in reversed(padding) for _ in range(2)], mode="reflect")
            padding = 0
        real = conv(x, w, b, layer.stride, padding, layer.dilation, layer.groups)
    spread = float(real.max() - real.min()) or 1.0
    scale = spread / float(torch.rand(1, generator=gen) * 150 + 120)
    scale = 2.0 ** round(math.log2(scale)) if pow2 else scale
    zero_point = qmin if relu and bool(torch.rand(1, generator=gen) < 0.5) else \
        int(min(max(qmin + round(-float(real.min()) / scale), qmin), qmin + 255))
    return scale, zero_point


@requires_ort
@given(case=layers())
def test_layers_equal_onnxruntime(case):
    model, x = case
    proto = export_onnx(model, x[:1], None)
    result = compare(model, proto, x)
    assert result["mismatches"] == 0, result
    assert not FLOAT_KERNELS & set(ort_ops(proto))  # ORT ran QLinearConv / QGemm, not float ops


@requires_ort
def test_onnxruntime_runs_integer_kernels():
    """The exported patterns become ORT's integer kernels, not float ops between QDQ pairs."""
    model = _flow_model(Spec(convs=(Unit(4, relu=True), Unit(4)), block="add", head="maxpool", linears=(8,)),
                        "fbgemm-v1", seed=0)
    ops = ort_ops(export_onnx(model, torch.randn(1, 2, 6, 6), None))
    assert {"QLinearConv", "QLinearAdd", "QGemm"} <= set(ops) and not FLOAT_KERNELS & set(ops), ops
    assert not {"DequantizeLinear", "QuantizeLinear"} & set(ops[1:-1]), ops  # QDQ pairs all fused or dropped


# --------------------------------------------------------------------------------------------------------
# (3) whole models from the QAT flow
# --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Unit:
    cout: int
    kernel: int = 3
    stride: int = 1
    groups: int = 1
    bias: bool = True
    bn: bool = True
    relu: bool = False


@dataclass(frozen=True)
class Spec:
    convs: tuple[Unit, ...]
    block: str | None = None  # "add", "add_relu", "add+relu" (add, then an nn.ReLU on the QTensor)
    head: str = "flatten"  # "flatten", "maxpool" (then flatten), "gap" (adaptive average pool, then flatten)
    linears: tuple[int, ...] = ()
    cin: int = 2
    size: int = 6
    classes: int = 5


class Net(nn.Module):
    def __init__(self, spec: Spec):
        super().__init__()
        self.spec, self.quant, self.dequant = spec, minqat.QuantStub(), minqat.DeQuantStub()
        c, size, self.convs = spec.cin, spec.size, nn.Sequential()
        for i, u in enumerate(spec.convs):
            unit = [nn.Conv2d(c, u.cout, u.kernel, u.stride, u.kernel // 2, groups=u.groups, bias=u.bias)]
            unit += [nn.BatchNorm2d(u.cout)] * u.bn + [nn.ReLU()] * u.relu
            self.convs.add_module(str(i), nn.Sequential(*unit))
            c, size = u.cout, (size - 1) // u.stride + 1
        if spec.block:
            self.a = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
            self.b = nn.Sequential(nn.Conv2d(c, c, 1), nn.BatchNorm2d(c))
            self.f, self.relu = minqat.FloatFunctional(), nn.ReLU()
        self.pool = {"flatten": nn.Identity(), "maxpool": nn.MaxPool2d(2, ceil_mode=True),
                     "gap": nn.AdaptiveAvgPool2d(1)}[spec.head]
        features = c * {"flatten": size * size, "maxpool": ((size + 1) // 2) ** 2, "gap": 1}[spec.head]
        self.linears = nn.Sequential(*[nn.Sequential(nn.Linear(i, o), nn.ReLU())
                                       for i, o in zip((features,) + spec.linears, spec.linears)])
        self.fc = nn.Linear(spec.linears[-1] if spec.linears else features, spec.classes)

    def groups(self) -> list[list[str]]:
        groups = [[f"convs.{i}.{j}" for j in range(1 + u.bn + u.relu)] for i, u in enumerate(self.spec.convs)
                  if u.bn or u.relu]
        groups += [["a.0", "a.1", "a.2"], ["b.0", "b.1"]] if self.spec.block else []
        return groups + [[f"linears.{i}.0", f"linears.{i}.1"] for i in range(len(self.spec.linears))]

    def forward(self, x):
        x = self.convs(self.quant(x))
        if self.spec.block == "add_relu":
            x = self.f.add_relu(self.b(self.a(x)), x)
        elif self.spec.block:
            x = self.f.add(self.b(self.a(x)), x)
            x = self.relu(x) if self.spec.block == "add+relu" else x
        x = torch.flatten(self.pool(x), 1)
        return self.dequant(self.fc(self.linears(x)))


def _flow_model(spec: Spec, qconfig_name: str, seed: int, consistent: bool = False) -> nn.Module:
    """fuse_modules_qat + prepare_qat, two observing forwards in train mode, convert in eval mode."""
    torch.manual_seed(seed)
    model = Net(spec).train()
    randomize_bn(model, torch.Generator().manual_seed(seed))
    model.qconfig = qconfig(minqat, qconfig_name)
    groups = model.groups()
    model = minqat.prepare_qat(minqat.fuse_modules_qat(model, groups) if groups else model)
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, spec.cin, spec.size, spec.size))
    return minqat.convert(model.eval(), consistent=consistent)


def _input(model: nn.Module, spec: Spec, seed: int, batch: int = 6) -> torch.Tensor:
    """Random float inputs (Quantize computes ORT's QuantizeLinear in the "onnxruntime" mode)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((batch, spec.cin, spec.size, spec.size), generator=gen)


@st.composite
def specs(draw):
    convs = []
    c = 2
    for _ in range(draw(st.integers(1, 3))):
        groups = draw(st.sampled_from([1, 1, c]))
        cout = groups * draw(st.integers(1, 3))
        convs.append(Unit(cout, draw(st.sampled_from([1, 3])), draw(st.integers(1, 2)), groups, draw(st.booleans()),
                          draw(st.booleans()), draw(st.booleans())))
        c = cout
    blocks = [None, "add", "add_relu", "add+relu"]
    return Spec(tuple(convs), draw(st.sampled_from(blocks)), draw(st.sampled_from(["flatten", "maxpool"])),
                tuple(draw(st.lists(st.integers(2, 8), max_size=2))))


@requires_ort
@given(spec=specs(), qconfig_name=st.sampled_from(["fbgemm-v1", "per-tensor", "per-tensor-affine-narrow",
                                                   "per-channel-narrow"]), seed=st.integers(0, 2**16))
def test_flow_models_equal_onnxruntime(spec, qconfig_name, seed):
    model = _flow_model(spec, qconfig_name, seed)
    x = _input(model, spec, seed)
    proto = export_onnx(model, x[:1], None)
    assert compare(model, proto, x)["mismatches"] == 0


@requires_ort
@pytest.mark.parametrize("block", ["add", "add_relu", "add+relu"])
def test_residual_models_equal_onnxruntime(block):
    spec = Spec(convs=(Unit(4, relu=True), Unit(6, stride=2)), block=block, head="maxpool", linears=(8,))
    for seed in range(3):
        model = _flow_model(spec, "fbgemm-v1", seed)
        x = _input(model, spec, seed, batch=16)
        assert compare(model, export_onnx(model, x[:1], None), x)["mismatches"] == 0


@requires_ort
def test_consistent_convert_exports_its_output_clamps():
    spec = Spec(convs=(Unit(4, relu=True), Unit(4)), head="maxpool", linears=(6,))
    model = _flow_model(spec, "fbgemm-v1", seed=5, consistent=True)
    x = _input(model, spec, seed=5, batch=16)
    proto = export_onnx(model, x[:1], None)
    assert "Clip" in [n.op_type for n in proto.graph.node]  # the output_range clamps
    assert compare(model, proto, x)["mismatches"] == 0


@requires_ort
def test_prepared_qat_models_export_as_qdq():
    """A prepared model (eval mode) is exported as ``convert(model, consistent=True)``: its QDQ pairs are the fake
    quants. ORT equals that int8 model bit for bit. Against the fake-quant model itself, end to end, the bound is
    2 LSB: each layer is within 1 LSB of its fake-quant twin given the same input (minqat.consistent), but a
    1-LSB difference entering a later layer can move its output once more, so the per-layer bounds do not compose
    to 1 (measured over 20 such models, 3,200 logits: max 1 LSB, 0.44 % of logits differ)."""
    spec = Spec(convs=(Unit(4, relu=True), Unit(6, stride=2)), head="maxpool", linears=(8,))
    worst, bad, total = 0, 0, 0
    for seed in range(4):
        torch.manual_seed(seed)
        model = Net(spec).train()
        randomize_bn(model, torch.Generator().manual_seed(seed))
        model.qconfig = qconfig(minqat, "fbgemm-v1")
        model = minqat.prepare_qat(minqat.fuse_modules_qat(model, model.groups()))
        with torch.no_grad():
            for _ in range(2):
                model(torch.randn(4, 2, 6, 6))
        model.eval().apply(minqat.disable_observer)  # the export deploys these qparams; keep them
        x = torch.randn(32, 2, 6, 6)
        proto = export_onnx(model, x[:1], None)
        assert any(isinstance(m, minqat.FakeQuantizeBase) for m in model.modules())  # the model is untouched
        int8 = minqat.convert(model, consistent=True)
        assert compare(int8, proto, x)["mismatches"] == 0
        assert compare(model, proto, x)["mismatches"] == 0  # a prepared model is compared as it is exported
        with torch.no_grad():
            lsb = np.rint(np.abs(model(x).numpy() - run_onnxruntime(proto, x)) / float(int8.fc.scale))
        worst, bad, total = max(worst, int(lsb.max())), bad + int((lsb > 0).sum()), total + lsb.size
    assert worst <= 2 and bad / total < 0.03, (worst, bad, total)


@requires_ort
def test_evaluate_onnxruntime_reports_accuracy_and_agreement(tmp_path):
    spec = Spec(convs=(Unit(4, relu=True),), head="maxpool", linears=(6,))
    model = _flow_model(spec, "fbgemm-v1", seed=4)
    x = _input(model, spec, seed=4, batch=40)
    labels = torch.randint(0, spec.classes, (40,), generator=torch.Generator().manual_seed(0))
    report = minqat.onnx.evaluate_onnxruntime(model, x, labels, tmp_path / "demo.onnx")
    with torch.no_grad():
        expected = float((model(x).argmax(1) == labels).float().mean())  # fbgemm mode: same classes here
    assert report["agreement"] == 1.0 and report["mismatches"] == 0 and report["outputs"] == 40 * spec.classes
    assert report["accuracy"] == pytest.approx(expected) and (tmp_path / "demo.onnx").exists()


@requires_ort
def test_export_writes_a_file_with_a_dynamic_batch(tmp_path):
    spec = Spec(convs=(Unit(3, relu=True),), linears=(4,))
    model = _flow_model(spec, "fbgemm-v1", seed=2)
    path = tmp_path / "model.onnx"
    export_onnx(model, _input(model, spec, 2, batch=1), path)
    x = _input(model, spec, 3, batch=7)
    assert run_onnxruntime(path, x).shape == (7, 5)
    assert compare(model, path, x)["mismatches"] == 0
    assert model.convs[0][0].requantization == "fbgemm"  # compare restored the model's own mode


# --------------------------------------------------------------------------------------------------------
# (4) onnx's reference evaluator, and where minqat's torch-style ops differ from ORT (measured)
# --------------------------------------------------------------------------------------------------------
@requires_ort
@given(case=layers())
def test_reference_evaluator_on_layers(case):
    """ReferenceEvaluator runs Conv / Gemm in float32 on dequantized values, adds the float bias and divides by
    s_y at QuantizeLinear: the same real number up to float32 rounding, so it can differ only within float32 error
    of a tie, by 1. Measured: 0 of 18,559 outputs of 300 generated layers (half with power-of-two scales, whose
    products are exact)."""
    model, x = case
    proto = export_onnx(model, x[:1], None)
    diff = np.abs(run_reference(proto, x) - run_onnxruntime(proto, x)) / np.float32(model[1].scale)
    assert diff.max() <= 1.0 and (diff > 0).mean() <= 0.01


def _add_graph(s, z):
    return _graph([onnx.helper.make_node("DequantizeLinear", ["a", "sa", "za"], ["af"]),
                   onnx.helper.make_node("DequantizeLinear", ["b", "sb", "zb"], ["bf"]),
                   onnx.helper.make_node("Add", ["af", "bf"], ["yf"]),
                   onnx.helper.make_node("QuantizeLinear", ["yf", "sy", "zy"], ["y"])],
                  [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.UINT8, [256 * 256]) for n in "ab"],
                  [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.UINT8, [256 * 256])],
                  {"sa": np.float32(s[0]), "sb": np.float32(s[1]), "sy": np.float32(s[2]),
                   "za": np.uint8(z[0]), "zb": np.uint8(z[1]), "zy": np.uint8(z[2])})


@requires_ort
@pytest.mark.parametrize("z_y", [7, 8])
def test_reference_evaluator_add_differs_at_ties_with_an_odd_zero_point(z_y):
    """s_a = s_y = 1/8, s_b = 1/16: y / s_y = (a - z_a) + (b - z_b) / 2 is a tie for every odd b - z_b. ORT's
    QLinearAdd rounds t + z_y (the zero point inside its fixed part); the reference (and ONNX's QuantizeLinear)
    rounds t and adds z_y after. With z_y odd the two differ by 1 on every tie inside the range; with z_y even,
    never."""
    a, b = (t.reshape(-1).numpy().astype(np.uint8) for t in torch.meshgrid(torch.arange(256), torch.arange(256),
                                                                            indexing="ij"))
    model = _add_graph((0.125, 0.0625, 0.125), (100, 31, z_y))
    y_ort = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"a": a, "b": b})[0].astype(int)
    y_ref = ReferenceEvaluator(model).run(None, {"a": a, "b": b})[0].astype(int)
    t = (a.astype(float) - 100) + (b.astype(float) - 31) / 2
    tie = ((b.astype(int) - 31) % 2 == 1) & (t + z_y > 0) & (t + z_y < 255)
    assert (np.abs(y_ort - y_ref) <= 1).all()
    assert ((y_ort != y_ref) == (tie if z_y % 2 else np.zeros_like(tie))).all()


def test_torch_add_differs_from_qlinear_add():
    """Why QFunctional needs the "onnxruntime" mode: torch's quantized add (dequantize with FMA, multiply by
    fl32(1/s_y), z_y after rounding) and ORT's QLinearAdd (z_y inside the rounding) disagree by 1 at ties.
    Measured over every input pair with s = (1/8, 1/16, 1/8) and z = (100, 31, 7): 40.6 % of the outputs (with
    random scales, exact ties are rare: 0 of 20,000 outputs of random residual adds)."""
    a, b = (t.reshape(1, -1, 1, 1).to(U8) for t in torch.meshgrid(torch.arange(256), torch.arange(256), indexing="ij"))
    args = (a, 0.125, 100, b, 0.0625, 31, 0.125, 7)
    diff = (minqat.kernels.add(*args).int() - qlinear_add(*args).int()).abs()
    assert int(diff.max()) == 1 and 0.35 < float((diff > 0).float().mean()) < 0.45


@requires_ort
@pytest.mark.parametrize("pool, channels_last, bound", [
    (nn.AvgPool2d(2), False, 0.02), (nn.AvgPool2d(2), True, 0.15), (nn.AvgPool2d(3, 2, 1), True, 0.0),
    (nn.AdaptiveAvgPool2d(1), False, 0.03), (nn.AdaptiveAvgPool2d(2), True, 0.03)])
def test_average_pools_differ_from_onnxruntime_by_one_at_ties(pool, channels_last, bound):
    """minqat's pools compute torch's formulas (``minqat.kernels.pooling``: the zero point before or after the
    rounding depending on the layout and loop), ORT's QLinearAveragePool / QLinearGlobalAveragePool its own: they
    differ by 1 at ties. Measured over 20 random qparams, 2x16x8x8 inputs: 2x2 pool 0.6 % (NCHW) and 9.6 %
    (channels last, as a conv's output), 3x3 stride 2 (divisor 9: no ties) 0, global 0.9 %, adaptive 2x2 0.9 %.
    No "onnxruntime" mode for QTensor-level pools yet: a model with average pools agrees with ORT to 1 LSB there."""
    gen = torch.Generator().manual_seed(0)
    worst, bad, total = 0.0, 0, 0
    for _ in range(20):
        s, z = float(torch.rand(1, generator=gen) * 0.1 + 0.01), int(torch.randint(0, 128, (1,), generator=gen))
        model = nn.Sequential(nnq.Quantize(s, z), pool, nnq.DeQuantize())
        x = ((torch.randint(0, 256, (2, 16, 8, 8), generator=gen) - z) * s).float()
        x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        with torch.no_grad():
            diff = np.rint(np.abs(model(x).numpy() - run_onnxruntime(export_onnx(model, x[:1], None), x)) / s)
        worst, bad, total = max(worst, float(diff.max())), bad + int((diff > 0).sum()), total + diff.size
    assert worst <= 1 and bad / total <= bound, (bad, total)


# --------------------------------------------------------------------------------------------------------
# (5) bad input
# --------------------------------------------------------------------------------------------------------
class Wrapped(nn.Module):
    """quant -> conv -> <body> -> dequant, converted; ``body(self, x)`` is the part under test."""

    def __init__(self, body, float_head: bool = False):
        super().__init__()
        self.quant, self.conv, self.dequant = minqat.QuantStub(), nn.Conv2d(2, 4, 3, padding=1), minqat.DeQuantStub()
        self.f, self.body = minqat.FloatFunctional(), body
        self.head = nn.Conv2d(4, 3, 1) if float_head else None  # kept float: runs on the dequantized tensor
        if float_head:
            self.head.qconfig = None

    def forward(self, x):
        x = self.dequant(self.body(self, self.conv(self.quant(x))))
        return self.head(x) if self.head is not None else x


def _converted(body, float_head: bool = False) -> nn.Module:
    model = Wrapped(body, float_head).train()
    model.qconfig = minqat.get_default_qat_qconfig("fbgemm")
    model = minqat.prepare_qat(model)
    with torch.no_grad():
        model(torch.randn(4, 2, 6, 6))
    return minqat.convert(model.eval())


X = torch.randn(2, 2, 6, 6)


@pytest.mark.parametrize("body, match", [
    (lambda self, x: self.f.mul(x, x), r"'f' \(QFunctional\): its mul has no ONNX mapping"),
    (lambda self, x: self.f.cat([x, x], 1), r"'f' \(QFunctional\): its cat has no ONNX mapping"),
    (lambda self, x: torch.cat([x, x], 1), r"'<model>' \(Wrapped\): torch.cat on a QTensor has no ONNX mapping"),
    (lambda self, x: x.chunk(2, 1)[0], r"'<model>' \(Wrapped\): chunk on a QTensor has no ONNX mapping"),
    (lambda self, x: x.mean(1, keepdim=True), r"mean over dims \[1\] of a 4-d QTensor"),
    (lambda self, x: torch.nn.functional.adaptive_avg_pool2d(x, 4), r"adaptive_avg_pool2d from \[6, 6\] to \[4, 4\]"),
    (lambda self, x: torch.nn.functional.avg_pool2d(x, 2, divisor_override=3), "divisor_override"),
])
@requires_ort
def test_ops_without_an_onnx_mapping_are_named(body, match):
    with pytest.raises(ValueError, match=match):
        export_onnx(_converted(body), X, None)


@requires_ort
def test_a_float_layer_after_the_dequant_stub_is_named():
    with pytest.raises(ValueError, match=r"'head' \(Conv2d\): it has no ONNX mapping"):
        export_onnx(_converted(lambda self, x: x, float_head=True), X, None)


@requires_ort
def test_a_float_op_on_a_dequantized_tensor_feeding_the_graph_is_named():
    model = _converted(lambda self, x: x)
    model.dequant.register_forward_hook(lambda m, args, out: out * 2)  # an op the exporter cannot see
    with pytest.raises(ValueError, match=r"'<model>' \(Wrapped\): the model's output was computed by operations"):
        export_onnx(model, X, None)


@requires_ort
def test_a_failing_op_is_reported_with_its_module():
    model = _converted(lambda self, x: torch.nn.functional.hardswish(x))
    with pytest.raises(ValueError, match=r"cannot export '<model>' \(Wrapped\): running it failed: .*hardswish"):
        export_onnx(model, X, None)


@requires_ort
def test_training_prepared_and_float_models_are_rejected():
    prepared = Wrapped(lambda self, x: x).train()
    prepared.qconfig = minqat.get_default_qat_qconfig("fbgemm")
    prepared = minqat.prepare_qat(prepared)
    with pytest.raises(ValueError, match=r"got a prepared model \('quant.activation_post_process' is an observer or "
                                         r"fake quant\) in training mode: call model.eval\(\)"):
        export_onnx(prepared, X, None)
    with pytest.raises(ValueError, match="holds no Quantize module"):
        export_onnx(nn.Sequential(nn.Conv2d(2, 2, 1)), X, None)


@requires_ort
def test_unequal_per_channel_weight_zero_points():
    """QLinearConv takes one weight zero point: unequal ones are folded into the codes where w - z fits int8
    (exact: the same accumulator), else rejected. (QGemm takes them as they are: the consistent-convert test.)"""
    model = _converted(lambda self, x: x)
    model.conv.weight_int = model.conv.weight_int.clamp(-100, 100)
    model.conv.weight_zero_point = torch.tensor([0, 5, 0, -3])
    assert compare(model, export_onnx(model, X, None), X)["mismatches"] == 0
    model.conv.weight_int[1, 0, 0, 0] = -128
    with pytest.raises(ValueError, match=r"'conv' \(Conv2d\): its per-channel weight zero points differ "
                                         r"\(\[0, 5, 0, -3\]\) and w_int - zero_point leaves int8"):
        export_onnx(model, X, None)


@requires_ort
def test_bad_arguments():
    model = _converted(lambda self, x: x)
    with pytest.raises(ValueError, match="opset must be an int in"):
        export_onnx(model, X, None, opset=12)
    with pytest.raises(ValueError, match="example_input must be a float tensor"):
        export_onnx(model, X.to(torch.uint8), None)
    with pytest.raises(ValueError, match="model_int8 must be a torch.nn.Module"):
        export_onnx(lambda x: x, X, None)
    with pytest.raises(ValueError, match="mode must be one of"):
        set_requantization(model, "tflite")
    with pytest.raises(ValueError, match="model must be a path to an .onnx file or an onnx.ModelProto"):
        run_onnxruntime(model, X)
    with pytest.raises(ValueError, match="requantization must be one of"):
        requantizer("tflite")


def test_bad_kernel_arguments():
    acc = torch.zeros(1, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="acc must be a torch.int32 tensor"):
        requantize_onnxruntime(acc.float(), 1.0, 1.0, 1.0, 0)
    with pytest.raises(ValueError, match="dtype must be torch.uint8 or torch.int8"):
        requantize_onnxruntime(acc, 1.0, 1.0, 1.0, 0, dtype=torch.int32)
    with pytest.raises(ValueError, match="axis must be a dimension of acc"):
        requantize_onnxruntime(acc, 1.0, 1.0, 1.0, 0, axis=2)
    with pytest.raises(ValueError, match=r"bias must be None or a 1-D float tensor with one entry per output channel"):
        requantize_onnxruntime(acc, 1.0, 1.0, 1.0, 0, torch.zeros(3))
    with pytest.raises(ValueError, match="bias must be a 1-D float tensor"):
        bias_int32(torch.zeros(2, dtype=torch.int32), 1.0, 1.0)
    with pytest.raises(ValueError, match="x must be a float tensor"):
        quantize_linear(acc, 1.0, 0)
    with pytest.raises(ValueError, match="dtype must be torch.uint8 or torch.int8"):
        quantize_linear(acc.float(), 1.0, 0, torch.int32)
    with pytest.raises(ValueError, match="a_int must be a torch.uint8 or torch.int8 tensor"):
        qlinear_add(acc, 1.0, 0, acc, 1.0, 0, 1.0, 0)
    with pytest.raises(ValueError, match="a_int and b_int must have the same dtype and shape"):
        qlinear_add(torch.zeros(2, dtype=U8), 1.0, 0, torch.zeros(3, dtype=U8), 1.0, 0, 1.0, 0)


def test_fbgemm_and_onnxruntime_requantization_differ_by_at_most_one_unit():
    """torch adds the float bias in float32 (``fl32(acc) + fl32(b / s_b)``), ORT adds ``rint(b / s_b)`` to the int32
    accumulator: the real results differ by less than half a unit of the bias scale, so outputs differ by at most 1,
    only near ties. Measured on these random layers: 13 of 102,400 outputs (1.3e-4)."""
    gen = torch.Generator().manual_seed(0)
    bad = total = 0
    for _ in range(200):
        acc = torch.randint(-20000, 20000, (64, 8), generator=gen, dtype=torch.int32)
        s_x, s_w = float(torch.rand(1, generator=gen) * 0.05 + 1e-3), torch.rand(8, generator=gen) * 0.01 + 1e-4
        b, s_y = torch.randn(8, generator=gen) * 0.5, float(torch.rand(1, generator=gen) * 0.5 + 0.05)
        fbgemm = requantizer("fbgemm")(acc, s_x, s_w, s_y, 128, b, axis=1).int()
        ort = requantize_onnxruntime(acc, s_x, s_w, s_y, 128, b, axis=1).int()
        diff = (fbgemm - ort).abs()
        assert int(diff.max()) <= 1
        bad, total = bad + int((diff > 0).sum()), total + diff.numel()
    assert 0 < bad / total < 1e-3, (bad, total)
