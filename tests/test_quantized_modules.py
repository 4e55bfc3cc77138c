"""int8 modules (minqat.nn.quantized): Quantize, DeQuantize, Conv1d/2d/3d, ConvReLU*, Linear, LinearReLU,
QFunctional.

(1) hand-worked values: a quantize tie and clamp, a padded 3x3 conv whose bias makes an exact tie, the ReLU floor
at the output zero point, a per-tensor linear (bias by FMA), a residual add whose zero point is added before
rounding (torch's scalar loop), add_scalar / mul_scalar qparams;
(2) live parity of ``from_float`` with torch.ao.nn.quantized(.intrinsic): one QAT module (Conv / ConvReLU /
ConvBn / ConvBnReLU in 1-d, 2-d, 3-d -- zero or reflect padding, strides, dilation, groups --, Linear /
LinearReLU / LinearBn1d, with ``use_precomputed_fake_quant`` on or off) is prepared and trained by torch.ao,
its state is loaded into minqat's prepared twin (strict), and both are converted: int8 weight codes, weight
scales and zero points, float bias and output qparams identical, int8 outputs equal bit for bit on random
inputs (fbgemm engine; activations in [0, 127], numerics.md §7.2), for per-channel, per-tensor, asymmetric and
narrow-range weight fake quants, observers enabled (one more EMA step at convert) or disabled;
(3) properties: ConvReLU = max(Conv, z_y); per-channel weights with one common scale equal per-tensor weights
(without bias); state_dict round trip; deepcopy; plus every error message.
"""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import minqat
from minqat.convert import CONVERT_MODULE_MAPPING
from minqat.nn.quantized import (
    Conv2d,
    ConvReLU2d,
    DeQuantize,
    Linear,
    LinearReLU,
    QFunctional,
    Quantize,
)
from minqat.nn.quantized.common import quantize_weight, require_statistics
from minqat.qtensor import QTensor
from tests.oracle import ao, assert_bit_exact, quantized_engine, requires_ao  # noqa: F401 (quantized_engine: re-exported)

U8, I8 = torch.uint8, torch.int8


# ----------------------------------------------------------------------------------------------------------
# oracle helpers (also used by tests/test_convert.py)
# ----------------------------------------------------------------------------------------------------------
def torch_weight_parts(mod) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(int_repr, scales float64, zero points int64)`` of a torch.ao int8 module's packed weight."""
    w = mod.weight()
    if w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        return w.int_repr(), w.q_per_channel_scales().double(), w.q_per_channel_zero_points().long()
    return w.int_repr(), torch.tensor(w.q_scale(), dtype=torch.float64), torch.tensor(w.q_zero_point())


def assert_same_int8_module(ours: nn.Module, theirs: nn.Module, what: str) -> None:
    """Identical int8 weights, weight qparams, float bias and output qparams (atol=0)."""
    if callable(getattr(theirs, "weight", None)):
        w_int, w_scale, w_zp = torch_weight_parts(theirs)
        assert_bit_exact(ours.weight_int, w_int, f"{what} weight codes")
        assert_bit_exact(ours.weight_scale.double(), w_scale, f"{what} weight scales")  # float32 widens exactly
        assert_bit_exact(ours.weight_zero_point, w_zp, f"{what} weight zero points")
        if theirs.bias() is None:
            assert ours.bias() is None, f"{what}: a bias on our side only"
        else:
            assert_bit_exact(ours.bias(), theirs.bias(), f"{what} bias")
    if isinstance(theirs.scale, torch.Tensor):  # Quantize: (1,) buffers
        assert_bit_exact(ours.scale, theirs.scale, f"{what} scale")
        assert_bit_exact(ours.zero_point, theirs.zero_point, f"{what} zero point")
    elif hasattr(theirs, "scale"):
        assert (ours.scale, ours.zero_point) == (theirs.scale, theirs.zero_point), f"{what} output qparams"
        assert type(ours.scale) is float and type(ours.zero_point) is int


def to_torch(x: QTensor) -> torch.Tensor:
    """A per-tensor QTensor as torch's quantized tensor (the oracle's input)."""
    return torch._make_per_tensor_quantized_tensor(x.int_repr(), float(x.scale), int(x.zero_point))


def assert_same_qtensor(ours: QTensor, theirs: torch.Tensor, what: str) -> None:
    assert isinstance(ours, QTensor), f"{what}: got {type(ours).__name__}, not a QTensor"
    assert_bit_exact(ours.int_repr(), theirs.int_repr(), f"{what} int8 output")
    assert (float(ours.scale), int(ours.zero_point)) == (theirs.q_scale(), theirs.q_zero_point()), f"{what} qparams"


def dtypes(lib) -> tuple[torch.dtype, torch.dtype]:
    """(activation, weight) dtypes: plain for minqat (so the golden replay needs no quantized dtype), legacy
    quantized ones for torch.ao."""
    return (torch.uint8, torch.int8) if lib is minqat else (torch.quint8, torch.qint8)


def qconfig(lib, name: str):
    """The same QConfig built from minqat's or torch.ao's classes (``lib`` is either module).

    Activations are uint8 on [0, 127] everywhere (the fbgemm/x86 ``reduce_range``), so the int8 kernels are
    exact on CPUs without AVX512-VNNI too (numerics.md §7.2).
    """
    if name in ("fbgemm-v0", "fbgemm-v1", "x86-v1"):
        backend, version = name.split("-v")
        return lib.get_default_qat_qconfig(backend, int(version))
    u8, i8 = dtypes(lib)
    act = lib.FakeQuantize.with_args(observer=lib.MovingAverageMinMaxObserver, quant_min=0, quant_max=127,
                                     dtype=u8, qscheme=torch.per_tensor_affine)
    weights = {
        "per-tensor": dict(observer=lib.MovingAverageMinMaxObserver, quant_min=-128, quant_max=127,
                           qscheme=torch.per_tensor_symmetric),
        "per-tensor-affine-narrow": dict(observer=lib.MovingAverageMinMaxObserver, quant_min=-100, quant_max=100,
                                         qscheme=torch.per_tensor_affine),
        "per-channel-narrow": dict(observer=lib.MovingAveragePerChannelMinMaxObserver, quant_min=-127,
                                   quant_max=127, qscheme=torch.per_channel_symmetric),
    }[name]
    return lib.QConfig(activation=act, weight=lib.FakeQuantize.with_args(dtype=i8, **weights))


QCONFIG_NAMES = ["fbgemm-v0", "fbgemm-v1", "x86-v1", "per-tensor", "per-tensor-affine-narrow", "per-channel-narrow"]


def randomize_bn(model: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial BN affine parameters and running statistics, so folding changes the weights."""
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
            c = bn.num_features
            bn.weight.copy_((torch.rand(c, generator=gen) + 0.5) * torch.where(torch.rand(c, generator=gen) < 0.2,
                                                                                 -1.0, 1.0))
            bn.bias.copy_(torch.rand(c, generator=gen) * 2 - 1)
            bn.running_mean.copy_(torch.randn(c, generator=gen) * 0.3)
            bn.running_var.copy_(torch.rand(c, generator=gen) + 0.5)


def torch_ao_parts():
    import torch.ao.nn.quantized as tnnq

    tq = ao()
    return tq.QuantStub, tq.DeQuantStub, tnnq.FloatFunctional


def torch_conv1d_mappings():
    """torch.ao's QAT and convert mappings plus the 1-d conv entries minqat maps by default."""
    import torch.ao.nn.intrinsic as tni
    import torch.ao.nn.intrinsic.qat as tniqat
    import torch.ao.nn.intrinsic.quantized as tniq
    import torch.ao.nn.qat as tnnqat
    import torch.ao.nn.quantized as tnnq

    tq = ao()
    qat = tq.get_default_qat_module_mappings()
    qat.update({nn.Conv1d: tnnqat.Conv1d, tni.ConvReLU1d: tniqat.ConvReLU1d})
    static = tq.get_default_static_quant_module_mappings()
    static.update({tnnqat.Conv1d: tnnq.Conv1d, tniqat.ConvReLU1d: tniq.ConvReLU1d})
    return qat, static


# ----------------------------------------------------------------------------------------------------------
# (1) hand-worked values
# ----------------------------------------------------------------------------------------------------------
def test_quantize_and_dequantize_by_hand():
    q = Quantize(0.5, 2, torch.uint8)
    # x / 0.5 + 2: 0.25 -> 2.5 -> 2 (ties to even); 0.75 -> 3.5 -> 4; -5 -> -8 -> 0; 200 -> 402 -> 255
    y = q(torch.tensor([0.25, 0.75, -5.0, 200.0]))
    assert_bit_exact(y.int_repr(), torch.tensor([2, 4, 0, 255], dtype=U8), "quantized")
    assert (float(y.scale), int(y.zero_point)) == (0.5, 2)
    assert_bit_exact(DeQuantize()(y), torch.tensor([0.0, 1.0, -1.0, 126.5]), "dequantized")  # 0.5 * (q - 2)


def _conv_3x3_ones(relu: bool, w: int = 1, bias: float | None = 0.25) -> nn.Module:
    conv = (ConvReLU2d if relu else Conv2d)(1, 1, 3, padding=1, bias=bias is not None)
    conv.set_weight_bias(torch.full((1, 1, 3, 3), w, dtype=I8), torch.tensor([0.25]), torch.tensor([0]),
                         None if bias is None else torch.tensor([bias]))
    conv.scale, conv.zero_point = 0.5, 1
    return conv


def test_conv2d_by_hand_padding_tie_and_relu_floor():
    x = QTensor(torch.full((1, 1, 2, 2), 5, dtype=U8), 0.5, 2)  # centred 3 everywhere; padding holds z_x = 2
    # every 3x3 window covers the 4 input cells: acc = 4 * 3 = 12; atw = 0.5 * 0.25 = 0.125; mult = 0.125 / 0.5
    # bias 0.25 / atw = 2 -> (12 + 2) * 0.25 = 3.5 -> 4 (ties to even) -> + z_y 1 = 5
    assert_bit_exact(_conv_3x3_ones(False)(x).int_repr(), torch.full((1, 1, 2, 2), 5, dtype=U8), "conv")
    # no bias: 12 * 0.25 = 3 -> 4; weights -1: -3 + 1 = -2 -> 0 (dtype floor) / 1 (ReLU floor = z_y)
    assert_bit_exact(_conv_3x3_ones(False, bias=None)(x).int_repr(), torch.full((1, 1, 2, 2), 4, dtype=U8), "no bias")
    assert_bit_exact(_conv_3x3_ones(False, w=-1, bias=None)(x).int_repr(), torch.zeros(1, 1, 2, 2, dtype=U8), "neg")
    assert_bit_exact(_conv_3x3_ones(True, w=-1, bias=None)(x).int_repr(), torch.ones(1, 1, 2, 2, dtype=U8), "relu")
    assert (_conv_3x3_ones(True)(x).scale, _conv_3x3_ones(True)(x).zero_point) == (0.5, 1)


def test_linear_by_hand_per_tensor_bias_and_relu():
    lin = Linear(2, 2)
    lin.set_weight_bias(torch.tensor([[1, 0], [-1, 0]], dtype=I8), torch.tensor(0.5), torch.tensor(0),
                        torch.tensor([0.25, 0.25]))
    lin.scale, lin.zero_point = 1.0, 0
    x = QTensor(torch.tensor([[2, 7]], dtype=U8), 0.5, 1)  # centred [1, 6]
    # atw = 0.25, per-tensor bias: fma(b, 1/atw, acc) = acc + 1; mult = 0.25: (1 + 1) * 0.25 = 0.5 -> 0;
    # (-1 + 1) * 0.25 = 0
    assert_bit_exact(lin(x).int_repr(), torch.tensor([[0, 0]], dtype=U8), "linear")
    relu = LinearReLU(2, 1, bias_=False)
    relu.set_weight_bias(torch.tensor([[-4, 0]], dtype=I8), torch.tensor(0.5), torch.tensor(0), None)
    relu.scale, relu.zero_point = 0.25, 3
    # acc = -4 -> -4 * (0.25 / 0.25) = -4 + 3 = -1 -> ReLU floor 3
    assert_bit_exact(relu(x).int_repr(), torch.tensor([[3]], dtype=U8), "linear relu")


def test_qfunctional_by_hand():
    f = QFunctional()
    f.scale, f.zero_point = 1.0, 1
    x = QTensor(torch.tensor([1, 2, 3], dtype=U8), 0.25, 0)  # 0.25, 0.5, 0.75
    # x + x = 0.5, 1.0, 1.5; scalar loop (3 < 64 elements) adds z before rounding: 1.5 -> 2, 2.0, 2.5 -> 2
    assert_bit_exact(f.add(x, x).int_repr(), torch.tensor([2, 2, 2], dtype=U8), "add")
    neg = QTensor(torch.tensor([0, 0, 0], dtype=U8), 0.25, 3)  # -0.75 each
    assert_bit_exact(f.add_relu(x, neg).int_repr(), torch.tensor([1, 1, 1], dtype=U8), "add_relu")  # max(., 0) + 1
    # mul: (x - 0)(x - 0) * (0.25 * 0.25 / 1) = 0.0625, 0.25, 0.5625 -> 0, 0, 1; + z_y = 1
    assert_bit_exact(f.mul(x, x).int_repr(), torch.tensor([1, 1, 2], dtype=U8), "mul")
    y = f.cat([x, x], 0)
    # cat (1-d: the general path) = quantize_per_tensor: rint(fma(x, 1, 1)): 1.25 -> 1, 1.5 -> 2, 1.75 -> 2
    assert_bit_exact(y.int_repr(), torch.tensor([1, 2, 2, 1, 2, 2], dtype=U8), "cat")
    s = f.add_scalar(x, 1.0)  # c_q = rint(1.0 / 0.25) = 4: z - c_q < 0, so the range is stretched: z' = 0,
    assert int(s.zero_point) == 0 and float(s.scale) == (255 + 4) / 255 * 0.25  # s' = (255 + 4) / 255 * s
    # (x - z + c_q) * s / s' = 5, 6, 7 times 0.9653 = 4.83, 5.79, 6.76 -> 5, 6, 7
    assert_bit_exact(s.int_repr(), torch.tensor([5, 6, 7], dtype=U8), "add_scalar")
    m = f.mul_scalar(x, 2.0)  # only the scale changes
    assert_bit_exact(m.int_repr(), x.int_repr(), "mul_scalar")
    assert (float(m.scale), int(m.zero_point)) == (0.5, 0)


# ----------------------------------------------------------------------------------------------------------
# (2) from_float parity with torch.ao, one module at a time
# ----------------------------------------------------------------------------------------------------------
class Wrap(nn.Module):
    """quant -> body (a conv/linear, maybe with BN and ReLU, fused as one QAT module) -> dequant."""

    def __init__(self, parts, body: nn.Sequential):
        super().__init__()
        quant, dequant, _ = parts
        self.quant, self.body, self.dequant = quant(), body, dequant()

    def forward(self, x):
        return self.dequant(self.body(self.quant(x)))


KINDS = {  # kind -> (dims, layers after the conv / linear)
    "conv": (2, ()), "conv_relu": (2, ("relu",)), "conv_bn": (2, ("bn",)), "conv_bn_relu": (2, ("bn", "relu")),
    "conv1d": (1, ()), "conv_relu1d": (1, ("relu",)), "conv_bn1d": (1, ("bn",)), "conv_bn_relu1d": (1, ("bn", "relu")),
    "conv3d": (3, ()), "conv_bn_relu3d": (3, ("bn", "relu")),
    "linear": (0, ()), "linear_relu": (0, ("relu",)), "linear_bn": (0, ("bn",)),
}


@st.composite
def layer_specs(draw):
    kind = draw(st.sampled_from(sorted(KINDS)))
    dims = KINDS[kind][0]
    spec = dict(kind=kind, bias=draw(st.booleans()), qconfig=draw(st.sampled_from(QCONFIG_NAMES)),
                observers=draw(st.booleans()), precomputed=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))
    if dims == 0:
        spec.update(cin=draw(st.integers(1, 24)), cout=draw(st.integers(1, 12)))
        return spec
    groups = draw(st.sampled_from([1, 1, 2, 4])) if dims == 2 else 1
    spec.update(cin=groups * draw(st.integers(1, 3)), cout=groups * draw(st.integers(1, 3)), groups=groups,
                kernel=draw(st.integers(1, 3)), stride=draw(st.integers(1, 2)), padding=draw(st.integers(0, 2)),
                dilation=draw(st.integers(1, 2)), size=draw(st.integers(5, 8) if dims < 3 else st.just(4)))
    reflect = dims < 3 and spec["padding"] > 0 and draw(st.booleans())
    spec["padding_mode"] = "reflect" if reflect else "zeros"
    return spec


def _float_body(spec: dict) -> nn.Sequential:
    dims, extra = KINDS[spec["kind"]]
    if dims == 0:
        layers = [nn.Linear(spec["cin"], spec["cout"], bias=spec["bias"])]
        bn = nn.BatchNorm1d
    else:
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        layers = [conv(spec["cin"], spec["cout"], spec["kernel"], spec["stride"], spec["padding"],
                       spec["dilation"], spec["groups"], bias=spec["bias"], padding_mode=spec["padding_mode"])]
        bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    layers += [bn(spec["cout"]) if e == "bn" else nn.ReLU() for e in extra]
    return nn.Sequential(*layers)


def _input_shape(spec: dict, batch: int) -> tuple[int, ...]:
    dims = KINDS[spec["kind"]][0]
    return (batch, spec["cin"]) if dims == 0 else (batch, spec["cin"]) + (spec["size"],) * dims


def prepared_pair(spec: dict):
    """torch.ao's prepared ``Wrap`` after 3 training forwards and an SGD step, and minqat's with the same state."""
    gen = torch.Generator().manual_seed(spec["seed"])
    torch.manual_seed(spec["seed"])
    float_model = Wrap(torch_ao_parts(), _float_body(spec)).train()
    randomize_bn(float_model, gen)
    group = [f"body.{i}" for i in range(len(float_model.body))]
    tq = ao()
    qat_mapping, _ = torch_conv1d_mappings()

    theirs = copy.deepcopy(float_model)
    theirs.qconfig = qconfig(tq, spec["qconfig"])
    if len(group) > 1:
        theirs = tq.fuse_modules_qat(theirs, [group])
    theirs = tq.prepare_qat(theirs, mapping=qat_mapping)
    opt = torch.optim.SGD(theirs.parameters(), lr=0.05)
    for _ in range(3):
        x = torch.randn(_input_shape(spec, 4), generator=gen)
        loss = theirs(x).square().mean()
        opt.zero_grad()
        loss.backward()
    opt.step()

    ours = copy.deepcopy(float_model)  # minqat swaps torch.ao's stubs for its own
    ours.qconfig = qconfig(minqat, spec["qconfig"])
    if len(group) > 1:
        ours = minqat.fuse_modules_qat(ours, [group])
    ours = minqat.prepare_qat(ours)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    for model in (theirs, ours):
        model.eval()
    if not spec["observers"]:
        theirs.apply(tq.disable_observer)
        ours.apply(minqat.disable_observer)
    return ours, theirs


def random_input(shape, scale: float, zero_point: int, gen: torch.Generator) -> QTensor:
    """A QTensor with integers in [0, 127] (numerics.md §7.2)."""
    return QTensor(torch.randint(0, 128, shape, generator=gen, dtype=U8), scale, zero_point)


@requires_ao
@settings(max_examples=100)
@given(spec=layer_specs())
def test_from_float_matches_torch_ao(spec):
    ours_prepared, theirs_prepared = prepared_pair(spec)
    _, static_mapping = torch_conv1d_mappings()
    theirs_qat, ours_qat = theirs_prepared.body[0], ours_prepared.body[0]
    flag = spec["precomputed"]  # linear layers then skip the extra weight observer step; convs ignore it
    with quantized_engine("fbgemm"):
        theirs = static_mapping[type(theirs_qat)].from_float(copy.deepcopy(theirs_qat), use_precomputed_fake_quant=flag)
    ours = CONVERT_MODULE_MAPPING[type(ours_qat)].from_float(copy.deepcopy(ours_qat), use_precomputed_fake_quant=flag)
    assert type(ours).__name__ == type(theirs).__name__
    assert ours._get_name() == theirs._get_name()
    assert_same_int8_module(ours, theirs, spec["kind"])

    gen = torch.Generator().manual_seed(spec["seed"] + 1)
    x = random_input(_input_shape(spec, 3), 0.02 + torch.rand(1, generator=gen).item() / 10,
                     int(torch.randint(0, 128, (1,), generator=gen)), gen)
    with quantized_engine("fbgemm"):
        expected = theirs(to_torch(x))
    assert_same_qtensor(ours(x), expected, spec["kind"])


@requires_ao
def test_quantize_from_float_matches_torch_ao():
    ours_prepared, theirs_prepared = prepared_pair(dict(kind="linear", cin=3, cout=2, bias=True,
                                                        qconfig="fbgemm-v1", observers=True, seed=5))
    tnnq = pytest.importorskip("torch.ao.nn.quantized")
    theirs = tnnq.Quantize.from_float(theirs_prepared.quant)
    ours = Quantize.from_float(ours_prepared.quant)
    assert_same_int8_module(ours, theirs, "Quantize")
    assert ours.dtype == torch.uint8
    x = torch.randn(64, 8) * 3
    assert_same_qtensor(ours(x), theirs(x), "Quantize")
    assert_bit_exact(DeQuantize()(ours(x)), tnnq.DeQuantize()(theirs(x)), "DeQuantize")


# ----------------------------------------------------------------------------------------------------------
# (3) properties
# ----------------------------------------------------------------------------------------------------------
@st.composite
def conv_modules(draw, relu: bool = False, per_channel: bool = True, bias: bool | None = None):
    cin, cout = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    has_bias = draw(st.booleans()) if bias is None else bias
    conv = (ConvReLU2d if relu else Conv2d)(cin, cout, draw(st.integers(1, 3)), padding=draw(st.integers(0, 1)),
                                           bias=has_bias)
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    w = torch.randint(-128, 128, conv.weight_int.shape, generator=gen, dtype=I8)
    scale = torch.rand(cout, generator=gen) / 50 + 1e-3
    scale, zp = (scale, torch.zeros(cout, dtype=torch.long)) if per_channel else (scale[0], torch.tensor(0))
    conv.set_weight_bias(w, scale, zp, torch.randn(cout, generator=gen) if has_bias else None)
    conv.scale, conv.zero_point = draw(st.floats(0.05, 2.0)), draw(st.integers(0, 127))
    x = random_input((2, cin, 5, 5), draw(st.floats(0.01, 0.5)), draw(st.integers(0, 127)), gen)
    return conv, x


@given(case=conv_modules())
def test_conv_relu_is_conv_clamped_at_the_zero_point(case):
    conv, x = case
    fused = ConvReLU2d(conv.in_channels, conv.out_channels, conv.kernel_size, padding=conv.padding,
                       bias=conv.bias() is not None)
    fused.load_state_dict(conv.state_dict())
    y, y_relu = conv(x), fused(x)
    assert_bit_exact(y_relu.int_repr(), y.int_repr().clamp_min(conv.zero_point), "relu")
    assert (float(y_relu.scale), int(y_relu.zero_point)) == (conv.scale, conv.zero_point)


@given(case=conv_modules(bias=False))
def test_per_channel_weights_with_one_scale_equal_per_tensor_weights(case):
    conv, x = case
    per_tensor = copy.deepcopy(conv)
    common = conv.weight_scale[0]
    conv.set_weight_bias(conv.weight_int, common.expand(conv.out_channels).clone(),
                         torch.zeros(conv.out_channels, dtype=torch.long), None)
    per_tensor.set_weight_bias(conv.weight_int, common.clone(), torch.tensor(0), None)
    assert conv.weight().axis == 0 and per_tensor.weight().axis is None
    assert_bit_exact(conv(x).int_repr(), per_tensor(x).int_repr(), "per channel vs per tensor")


@settings(max_examples=20)
@given(case=conv_modules(per_channel=False))
def test_state_dict_round_trip_and_deepcopy(case):
    conv, x = case
    fresh = Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, padding=conv.padding,
                   bias=conv.bias() is not None)
    state = conv.state_dict()
    assert {"weight_int", "weight_scale", "weight_zero_point", "scale", "zero_point"} <= set(state)
    fresh.load_state_dict(state, strict=True)
    for other in (fresh, copy.deepcopy(conv)):
        assert_bit_exact(other(x).int_repr(), conv(x).int_repr(), "reloaded")
        assert (other.scale, other.zero_point) == (conv.scale, conv.zero_point)
    lin = Linear(3, 2, bias_=False)
    lin.set_weight_bias(torch.ones(2, 3, dtype=I8), torch.tensor([0.5, 0.25]), torch.tensor([0, 1]), torch.ones(2))
    again = Linear(3, 2)
    again.load_state_dict(lin.state_dict(), strict=True)  # per-channel qparams replace the per-tensor defaults
    assert_bit_exact(again.weight_scale, lin.weight_scale, "linear scales")


def test_weight_accessor_is_a_qtensor():
    conv = _conv_3x3_ones(False)
    w = conv.weight()
    assert isinstance(w, QTensor) and w.axis == 0
    assert_bit_exact(w.dequantize(), torch.full((1, 1, 3, 3), 0.25), "weight")
    assert repr(conv).startswith("QuantizedConv2d(1, 1, kernel_size=(3, 3)")


# ----------------------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------------------
def test_wrong_input_kind_is_named():
    conv, x = _conv_3x3_ones(False), QTensor(torch.zeros(1, 1, 2, 2, dtype=U8), 0.5, 0)
    with pytest.raises(TypeError, match="QuantizedConv2d expects a QTensor input .* got a torch.Tensor of dtype "
                                        "torch.float32"):
        conv(torch.zeros(1, 1, 2, 2))
    with pytest.raises(TypeError, match="QuantizedLinear expects a QTensor input"):
        Linear(2, 2)(torch.zeros(1, 2))
    with pytest.raises(TypeError, match="QFunctional.add expects a QTensor input"):
        QFunctional().add(x, torch.zeros(1, 1, 2, 2))
    with pytest.raises(TypeError, match="Quantize expects a float tensor, got a QTensor"):
        Quantize(1.0, 0)(x)
    with pytest.raises(TypeError, match="Quantize expects a float tensor, got a torch.uint8 tensor"):
        Quantize(1.0, 0)(x.int_repr())
    with pytest.raises(TypeError, match="DeQuantize expects a QTensor .* got a torch.Tensor of dtype torch.float32"):
        DeQuantize()(torch.zeros(2))
    per_channel = QTensor(torch.zeros(1, 1, 2, 2, dtype=U8), torch.tensor([0.5]), torch.tensor([0]), axis=1)
    with pytest.raises(TypeError, match="expects a per-tensor QTensor input, got one quantized per channel"):
        conv(per_channel)
    with pytest.raises(ValueError, match=r"QuantizedConv2d expects an input of shape \(N, C, H, W\), got \(2, 2\)"):
        conv(QTensor(torch.zeros(2, 2, dtype=U8), 0.5, 0))
    with pytest.raises(ValueError, match=r"QuantizedLinear expects an input of shape \(\.\.\., 2\), got \(1, 3\)"):
        Linear(2, 2)(QTensor(torch.zeros(1, 3, dtype=U8), 0.5, 0))
    with pytest.raises(RuntimeError, match="QFunctional is not meant to be called"):
        QFunctional()(x)
    with pytest.raises(ValueError, match="QFunctional.cat expects a non-empty list of QTensors"):
        QFunctional().cat([])


def test_bad_construction_is_named():
    with pytest.raises(ValueError, match="padding_mode must be one of"):
        Conv2d(1, 1, 1, padding_mode="circular")
    with pytest.raises(ValueError, match="padding='same' is not supported by the int8 convolution"):
        Conv2d(1, 1, 3, padding="same")
    with pytest.raises(ValueError, match="groups must divide in_channels"):
        Conv2d(3, 4, 1, groups=2)
    with pytest.raises(ValueError, match="in_channels and out_channels must be positive"):
        Conv2d(0, 1, 1)
    with pytest.raises(ValueError, match="in_features and out_features must be positive"):
        Linear(0, 1)
    with pytest.raises(ValueError, match="dtype must be torch.int8"):
        Linear(1, 1, dtype=torch.uint8)
    with pytest.raises(ValueError, match="dtype must be torch.uint8 or torch.int8"):
        Quantize(1.0, 0, torch.int32)
    conv = Conv2d(1, 2, 1)
    with pytest.raises(ValueError, match=r"w_int must be an int8 tensor of shape \(2, 1, 1, 1\)"):
        conv.set_weight_bias(torch.zeros(2, 1, 1, 1), torch.tensor(1.0), torch.tensor(0), torch.zeros(2))
    with pytest.raises(ValueError, match="w_scale and w_zero_point must both be 0-d or"):
        conv.set_weight_bias(torch.zeros(2, 1, 1, 1, dtype=I8), torch.ones(2), torch.tensor(0), torch.zeros(2))
    with pytest.raises(ValueError, match="bias must be a tensor for this module"):
        conv.set_weight_bias(torch.zeros(2, 1, 1, 1, dtype=I8), torch.tensor(1.0), torch.tensor(0), None)
    with pytest.raises(ValueError, match=r"w_int must be an int8 tensor of shape \(1, 1\)"):
        Linear(1, 1).set_weight_bias(torch.zeros(1, 2, dtype=I8), torch.tensor(1.0), torch.tensor(0), None)
    with pytest.raises(ValueError, match="w_scale and w_zero_point must both be 0-d or"):
        Linear(1, 1).set_weight_bias(torch.zeros(1, 1, dtype=I8), torch.ones(1, 1), torch.zeros(1, 1), None)


def _qat_conv(qconfig_=None) -> nn.Module:
    conv = nn.Conv2d(1, 2, 1)
    conv.qconfig = qconfig_ or minqat.get_default_qat_qconfig("fbgemm", 0)
    return minqat.nn.qat.Conv2d.from_float(conv)


def test_from_float_bad_input_is_named():
    qat = _qat_conv()
    with pytest.raises(ValueError, match="Conv2d.from_float needs a Conv2d with an output observer"):
        Conv2d.from_float(qat)
    qat.activation_post_process = qat.qconfig.activation()
    with pytest.raises(ValueError, match=r"its output observer \(activation_post_process\) \(FakeQuantize\) never "
                                         r"observed a batch \(min_val=inf, max_val=-inf\)"):
        Conv2d.from_float(qat)
    qat.activation_post_process(torch.randn(4))
    qat.weight_fake_quant.disable_observer()
    with pytest.raises(ValueError, match=r"its weight fake quant \(FakeQuantize\) never observed a batch \(empty"):
        Conv2d.from_float(qat)
    with pytest.raises(ValueError, match="Conv2d.from_float expects a QAT conv or a Conv2d, got Linear"):
        Conv2d.from_float(nn.Linear(1, 1))
    with pytest.raises(ValueError, match="Conv2d.from_float needs a Conv2d with a qconfig"):
        Conv2d.from_float(nn.Conv2d(1, 1, 1))
    with pytest.raises(ValueError, match="Linear.from_float expects a QAT linear or one of Linear"):
        lin = nn.Conv2d(1, 1, 1)
        lin.activation_post_process = nn.Identity()
        Linear.from_float(lin)
    with pytest.raises(ValueError, match="Linear.from_float needs a Linear with an output observer"):
        Linear.from_float(nn.Linear(1, 1))
    with pytest.raises(ValueError, match="QFunctional.from_float expects a FloatFunctional, got Linear"):
        QFunctional.from_float(nn.Linear(1, 1))
    with pytest.raises(ValueError, match="QFunctional.from_float needs a prepared FloatFunctional"):
        QFunctional.from_float(minqat.FloatFunctional())
    with pytest.raises(ValueError, match="Quantize.from_float needs a QuantStub with an output observer"):
        Quantize.from_float(minqat.QuantStub())


def test_unobserved_float_functional_converts_but_its_observed_ops_raise():
    ff = minqat.FloatFunctional()
    ff.activation_post_process = minqat.get_default_qat_qconfig("fbgemm").activation()
    q = QFunctional.from_float(ff)  # only add_scalar / mul_scalar used: nothing observed, still fine
    x = QTensor(torch.tensor([4], dtype=U8), 0.5, 0)
    assert int(q.add_scalar(x, 1.0).zero_point) == 0
    with pytest.raises(ValueError, match="QFunctional.add needs output qparams, but the FloatFunctional"):
        q.add(x, x)
    with pytest.raises(ValueError, match="QFunctional.cat needs output qparams"):
        q.cat([x])


def test_weight_quantization_bad_observers_are_named():
    obs = minqat.MovingAveragePerChannelMinMaxObserver(ch_axis=1, dtype=torch.int8,
                                                       qscheme=torch.per_channel_symmetric)
    obs(torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"per-channel weight qparams must run along the output channels "
                                         r"\(ch_axis=0\)"):
        quantize_weight(torch.randn(2, 3), obs)
    uint8 = minqat.MinMaxObserver(dtype=torch.uint8)
    uint8(torch.randn(3))
    with pytest.raises(ValueError, match="the weight observer must have dtype torch.int8"):
        quantize_weight(torch.randn(3), uint8)
    require_statistics(None, "nothing")  # no observer: nothing to check
    learnable = minqat.LearnableFakeQuantize(minqat.MovingAverageMinMaxObserver, quant_min=0, quant_max=255)
    require_statistics(learnable, "learned")  # qparams are parameters: never "unobserved"


# ----------------------------------------------------------------------------------------------------------
# the int8 GEMM path (CPU) keeps its packed weight and constants between calls (LayerCache): the kernels'
# integers on every call, recomputed whenever a buffer, qparam or mode changes
# ----------------------------------------------------------------------------------------------------------
import pickle  # noqa: E402  (this section's own imports: the file is extended, not rewritten)

from minqat.nn.quantized.prepared import LayerCache  # noqa: E402
from tests.test_kernels_conv_linear import (  # noqa: E402
    make_conv_case,
    make_linear_case,
    minqat_conv,
    minqat_linear,
    torch_conv,
    torch_linear,
)


def module_of(case: dict, requantization: str = "fbgemm") -> tuple[nn.Module, QTensor]:
    """The int8 module of a kernel test case (tests/test_kernels_conv_linear.py) and its QTensor input."""
    w, bias = case["w"], case["bias"]
    if "dims" in case:
        cls = ConvReLU2d if case["relu"] else Conv2d
        module = cls(w.size(1) * case["groups"], w.size(0), w.shape[2:], case["stride"], case["padding"],
                     case["dilation"], case["groups"], bias=bias is not None)
    else:
        module = (LinearReLU if case["relu"] else Linear)(w.size(1), w.size(0), bias_=bias is not None)
    w_scale = torch.as_tensor(case["w_scale"])  # float64 per channel or a Python float: float32 in the module
    module.set_weight_bias(w, w_scale, torch.as_tensor(case["w_zp"]), bias)
    module.scale, module.zero_point, module.requantization = case["y_scale"], case["y_zp"], requantization
    return module, QTensor(case["x"], case["x_scale"], case["x_zp"])


def as_int8(case: dict) -> dict:
    """The same layer on int8 activations and outputs: every code and zero point shifted by -128."""
    return dict(case, x=(case["x"].int() - 128).to(I8), x_zp=case["x_zp"] - 128, y_zp=case["y_zp"] - 128)


def fresh_output(module: nn.Module, x: QTensor) -> QTensor:
    """``module``'s output recomputed by a new module loaded from its state (nothing kept from earlier calls)."""
    if isinstance(module, Linear):
        fresh = type(module)(module.in_features, module.out_features, bias_=module.bias_float is not None)
    else:
        fresh = type(module)(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                             module.padding, module.dilation, module.groups, bias=module.bias_float is not None)
    fresh.load_state_dict(module.state_dict(), strict=True)
    fresh.requantization = module.requantization
    return fresh(x)


@settings(max_examples=60)
@given(seed=st.integers(0, 2**32 - 1), kind=st.sampled_from(["conv", "linear"]),
       mode=st.sampled_from(["fbgemm", "fbgemm", "fixed_point", "onnxruntime"]), signed=st.booleans())
def test_int8_modules_equal_the_kernel_functions_on_every_call(seed, kind, mode, signed):
    case = make_conv_case(seed, 2) if kind == "conv" else make_linear_case(seed)
    case = as_int8(case) if signed else case
    module, x = module_of(case, mode)
    kernel = (minqat_conv if kind == "conv" else minqat_linear)(case, requantization=mode, dtype=x.dtype)
    for call in ("first call", "second call (kept constants)"):
        y = module(x)
        assert_bit_exact(y.int_repr(), kernel, f"{kind} {mode}: {call}")
        assert (y.scale, y.zero_point) == (module.scale, module.zero_point)
        if kind == "conv":
            assert y.int_repr().is_contiguous(memory_format=torch.channels_last)


@requires_ao
@settings(max_examples=30)
@given(seed=st.integers(0, 2**32 - 1), kind=st.sampled_from(["conv", "linear"]))
def test_int8_modules_match_torch_on_every_call(seed, kind):
    case = make_conv_case(seed, 2) if kind == "conv" else make_linear_case(seed)
    module, x = module_of(case)
    expected = (torch_conv if kind == "conv" else torch_linear)(case)
    for call in ("first", "second"):
        assert_bit_exact(module(x).int_repr(), expected, f"{kind}, {call} call")


def _changes(module: nn.Module, x: QTensor, gen: torch.Generator):
    """``(name, change, must_change_the_output)``: every way the kept constants can go stale."""
    other_w = torch.randint(-128, 128, module.weight_int.shape, generator=gen).to(I8)
    twin = copy.deepcopy(module)
    twin.weight_int.copy_(other_w.clamp(max=63) * 2)
    return [
        ("set_weight_bias", lambda: module.set_weight_bias(other_w, module.weight_scale, module.weight_zero_point,
                                                           module.bias_float), True),
        ("in-place weight", lambda: module.weight_int.copy_(other_w.clamp(min=-127).neg()), True),
        ("in-place weight scale", lambda: module.weight_scale.mul_(1.75), True),
        ("in-place weight zero point", lambda: module.weight_zero_point.fill_(5), True),
        ("in-place bias", lambda: module.bias_float.sub_(50 * module.scale), True),
        ("load_state_dict", lambda: module.load_state_dict(twin.state_dict(), strict=True), True),
        (".half()", lambda: module.half(), False),  # float buffers rounded to float16: new tensors
        ("requantization", lambda: setattr(module, "requantization", "fixed_point"), False),
        ("requantization", lambda: setattr(module, "requantization", "fbgemm"), False),
        ("output scale", lambda: setattr(module, "scale", module.scale * 3), True),
        ("output zero point", lambda: setattr(module, "zero_point", module.zero_point // 2), True),
        ("output_range", lambda: setattr(module, "output_range", (10, 60)), True),
    ]


@pytest.mark.parametrize("kind", ["conv", "depthwise", "grouped", "linear"])
def test_kept_constants_follow_every_change(kind):
    gen = torch.Generator().manual_seed(0)
    groups_kind = {"conv": "one", "depthwise": "depthwise", "grouped": "grouped"}.get(kind)
    case = make_conv_case(3 if kind == "conv" else 5, 2, groups_kind, "random", True) if groups_kind else make_linear_case(5, "random", True)
    assert kind in ("conv", "linear") or case["groups"] > 1
    case = dict(case, bias=torch.randn(case["w"].size(0), generator=gen) * 1e-3, relu=False, y_zp=100)
    module, x = module_of(case)
    for name, change, must_change in _changes(module, x, gen):
        before = module(x).int_repr()
        change()
        after = module(x)
        assert_bit_exact(after.int_repr(), fresh_output(module, x).int_repr(), f"{kind}: after {name}")
        assert not must_change or not torch.equal(after.int_repr(), before), f"{kind}: {name} changed nothing"
    for x_scale, x_zero_point in ((x.scale * 2, x.zero_point), (x.scale, x.zero_point + 3),
                                  (torch.tensor([x.scale]), torch.tensor([x.zero_point]))):  # new input qparams
        x = QTensor(x.int_repr(), x_scale, x_zero_point)
        assert_bit_exact(module(x).int_repr(), fresh_output(module, x).int_repr(), f"{kind}: new input qparams")


def test_copies_start_with_their_own_constants():
    module, x = module_of(make_conv_case(7, 2, "one", "random", True))
    y = module(x).int_repr()  # constants kept
    copies = [copy.deepcopy(module), pickle.loads(pickle.dumps(module))]
    state = dict(module.__dict__)
    del state["_prepared"]  # a module pickled before the cache existed
    old = Conv2d.__new__(type(module))
    old.__setstate__(state)
    module.weight_int.copy_(torch.flip(module.weight_int, [0]))  # the original moves on
    for other in [*copies, old]:
        assert isinstance(other._prepared, LayerCache) and other._prepared is not module._prepared
        assert_bit_exact(other(x).int_repr(), y if other is not old else fresh_output(old, x).int_repr(), "copy")


def test_inference_tensors_are_never_kept():
    # tensors created under inference_mode have no version counter: the module recomputes on every call
    case = make_linear_case(11, "random", True)
    with torch.inference_mode():
        module, x = module_of(case)
        y = module(x)
        module.weight_int.copy_(torch.flip(module.weight_int, [1]))
        after = module(x)
    assert_bit_exact(y.int_repr(), minqat_linear(case), "inference mode")
    assert_bit_exact(after.int_repr(), fresh_output(module, x).int_repr(), "inference mode, after a change")


def test_kept_constants_keep_the_error_messages():
    conv, x = module_of(make_conv_case(2, 2, "one", "random", True))
    lin, x_lin = module_of(make_linear_case(2, "random", True))
    conv(x), lin(x_lin)  # warm
    with pytest.raises(ValueError, match="x_int must be a torch.uint8 or torch.int8 tensor"):
        conv(QTensor(x.int_repr().int(), x.scale, x.zero_point))
    with pytest.raises(ValueError, match="x_int must be a torch.uint8 or torch.int8 tensor"):
        lin(QTensor(x_lin.int_repr().int(), x_lin.scale, x_lin.zero_point))
    with pytest.raises(ValueError, match="groups must divide the output channels and match the input channels"):
        conv(QTensor(torch.zeros(1, conv.in_channels + 1, 9, 9, dtype=U8), 0.5, 0))
    small = Conv2d(1, 1, 3)  # unpadded 3x3
    small(QTensor(torch.zeros(1, 1, 5, 5, dtype=U8), 0.5, 0))  # warm
    with pytest.raises(ValueError, match="x_int is too small"):
        small(QTensor(torch.zeros(1, 1, 2, 5, dtype=U8), 0.5, 0))
    for mode in ("fbgemm", "fixed_point"):
        for module, inp in ((conv, x), (lin, x_lin)):
            bad = copy.deepcopy(module)
            bad.requantization, bad.scale = mode, 0.0
            with pytest.raises(ValueError, match="y_scale must be positive and finite"):
                bad(inp)
    assert Linear(3, 2)(QTensor(torch.zeros(0, 3, dtype=U8), 0.5, 0)).shape == (0, 2)  # empty: the kernel path
