"""minqat.convert: a prepared, trained model -> an int8 model, bit-exact with torch.ao's convert (fbgemm engine).

(1) Live parity (hypothesis + fixed models). The same float model is prepared by torch.ao and trained two SGD
steps (train mode, observers and BN statistics updating), then put in eval mode; torch.ao's prepared
``state_dict`` is loaded into minqat's prepared twin with ``strict=True``; both are converted (torch.ao with
``torch.backends.quantized.engine = 'fbgemm'``). Asserted bit for bit (atol=0): the module tree, every int8
module's weight codes, weight scales and zero points, float bias and output scale / zero point, the Quantize
and QFunctional qparams, the int8 output (``int_repr``, scale, zero point) of *every* module on random
inputs, and the final dequantized float output. Models: generated chains of conv / conv-ReLU / conv-BN /
conv-BN-ReLU (dense, grouped, depthwise; strided, padded, dilated; with and without bias) with an optional
residual block (``FloatFunctional.add`` + ``nn.ReLU``, ``add_relu`` or ``mul``) or a two-branch
``FloatFunctional.cat``, a flatten / average-pool / mean head and linear / linear-ReLU / linear-BN layers,
under per-channel (FakeQuantize and the fused fake quant), per-tensor, asymmetric narrow-range and per-channel
narrow-range weight qconfigs, with observers enabled at convert (one more EMA step) or disabled; the issue's tutorial QM2;
a small ResNet (stem conv-BN-ReLU + max/avg pool, basic blocks with downsample, residual ``add_relu`` and
``add`` + ReLU, adaptive average pool, flatten, linear); and post-training quantization (``prepare`` +
calibration with HistogramObserver, then convert). Activations are uint8 with observed range [0, 127]
(reduce_range) and the inputs quantize into [0, 127]; an int8 layer may still output a value above 127 where
its result exceeds the observed range (the kernels clamp to [0, 255]: 0.3 % of intermediate outputs measured
on these models), so on a CPU without AVX512-VNNI, whose fbgemm kernels saturate int16 pairs of products above
127 (numerics.md §7.2), torch.ao itself could differ; this machine has VNNI (exact for 0..255).
(2) The x86 engine: its convolutions run on oneDNN, which is not bit-compatible (numerics.md §7.3); the
mismatch rate and the largest LSB difference are measured and bounded.
(3) Golden vectors recorded from torch.ao (tests/golden/make_convert.py) replayed without torch.ao.
(4) Behaviour: inplace, remove_qconfig, hooks kept, modules without qconfig left float; bad input.
"""
from __future__ import annotations

import copy
import pathlib
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import minqat
from minqat.convert import CONVERT_MODULE_MAPPING, convert, get_convert_module_mapping
from minqat.qtensor import QTensor
from tests.oracle import ao, assert_bit_exact, requires_ao
from tests.strategies import conv_geometries
from tests.test_quantized_modules import (
    QCONFIG_NAMES,
    assert_same_int8_module,
    dtypes,
    qconfig,
    quantized_engine,
    randomize_bn,
    torch_ao_parts,
)

MINQAT_PARTS = (minqat.QuantStub, minqat.DeQuantStub, minqat.FloatFunctional)
U8 = torch.uint8
GOLDEN = pathlib.Path(__file__).parent / "golden" / "convert.pt"


# --------------------------------------------------------------------------------------------------------
# models (built from minqat's or torch.ao's stubs: ``parts`` = (QuantStub, DeQuantStub, FloatFunctional))
# --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Unit:
    """conv (or linear when ``kernel == 0``) -> BN? -> ReLU?"""

    cout: int
    kernel: int = 3
    stride: int = 1
    padding: int = 1
    dilation: int = 1
    groups: int = 1
    bias: bool = True
    bn: bool = False
    relu: bool = False


def make_unit(cin: int, u: Unit) -> nn.Sequential:
    if u.kernel == 0:
        layers = [nn.Linear(cin, u.cout, bias=u.bias)] + ([nn.BatchNorm1d(u.cout)] if u.bn else [])
    else:
        layers = [nn.Conv2d(cin, u.cout, u.kernel, u.stride, u.padding, u.dilation, u.groups, bias=u.bias)]
        layers += [nn.BatchNorm2d(u.cout)] if u.bn else []
    return nn.Sequential(*layers, *([nn.ReLU()] if u.relu else []))


def unit_group(prefix: str, u: Unit) -> list[list[str]]:
    n = 1 + u.bn + u.relu
    return [[f"{prefix}.{i}" for i in range(n)]] if n > 1 else []


@dataclass(frozen=True)
class ChainSpec:
    cin: int
    size: int
    convs: tuple[Unit, ...]
    block: str | None  # None, "add", "add_relu", "mul", "cat"
    head: str  # "flatten", "pool", "mean"
    linears: tuple[Unit, ...]
    classes: int


class ChainNet(nn.Module):
    def __init__(self, spec: ChainSpec, parts):
        super().__init__()
        quant, dequant, functional = parts
        self.spec, self.quant, self.dequant = spec, quant(), dequant()
        c, size = spec.cin, spec.size
        self.convs = nn.Sequential()
        for i, u in enumerate(spec.convs):
            self.convs.add_module(str(i), make_unit(c, u))
            c, size = u.cout, (size + 2 * u.padding - u.dilation * (u.kernel - 1) - 1) // u.stride + 1
        if spec.block is not None:
            self.a = make_unit(c, Unit(c, bn=True, relu=True))
            self.b = make_unit(c, Unit(c, bn=True, relu=spec.block == "cat"))
            self.f = functional()
            self.relu = nn.ReLU()
            c = 2 * c if spec.block == "cat" else c
        self.pool = nn.AdaptiveAvgPool2d(1)
        features = c * size * size if spec.head == "flatten" else c
        self.linears = nn.Sequential()
        for i, u in enumerate(spec.linears):
            self.linears.add_module(str(i), make_unit(features, u))
            features = u.cout
        self.fc = nn.Linear(features, spec.classes)

    def groups(self) -> list[list[str]]:
        groups = [g for i, u in enumerate(self.spec.convs) for g in unit_group(f"convs.{i}", u)]
        if self.spec.block is not None:
            groups += [["a.0", "a.1", "a.2"], ["b.0", "b.1", "b.2"] if self.spec.block == "cat" else ["b.0", "b.1"]]
        return groups + [g for i, u in enumerate(self.spec.linears) for g in unit_group(f"linears.{i}", u)]

    def forward(self, x):
        x = self.convs(self.quant(x))
        if self.spec.block == "add":
            x = self.relu(self.f.add(self.b(self.a(x)), x))
        elif self.spec.block == "add_relu":
            x = self.f.add_relu(self.b(self.a(x)), x)
        elif self.spec.block == "mul":
            x = self.f.mul(self.b(self.a(x)), x)
        elif self.spec.block == "cat":
            x = self.f.cat([self.a(x), self.b(x)], 1)
        if self.spec.head == "flatten":
            x = torch.flatten(x, 1)
        elif self.spec.head == "pool":
            x = torch.flatten(self.pool(x), 1)
        else:
            x = x.mean([2, 3])
        return self.dequant(self.fc(self.linears(x)))


@st.composite
def conv_units(draw, cin: int, size: int):
    g = draw(conv_geometries(cin, size))
    return Unit(g["cout"], g["kernel"], g["stride"], g["padding"], g["dilation"], g["groups"], draw(st.booleans()),
                draw(st.booleans()), draw(st.booleans()))


@st.composite
def chain_specs(draw):
    cin, size = draw(st.integers(1, 4)), draw(st.integers(4, 7))
    convs, c, s = [], cin, size
    for _ in range(draw(st.integers(1, 3))):
        u = draw(conv_units(c, s))
        convs.append(u)
        c, s = u.cout, (s + 2 * u.padding - u.dilation * (u.kernel - 1) - 1) // u.stride + 1
    linears = tuple(Unit(draw(st.integers(2, 8)), kernel=0, bias=draw(st.booleans()), bn=bn, relu=relu)
                    for bn, relu in draw(st.lists(st.sampled_from([(False, False), (False, True), (True, False)]),
                                                  max_size=2)))
    block = draw(st.sampled_from([None, "add", "add_relu", "mul", "cat"]))
    # torch's quantized mean over (2, 3) fails on channels-last tensors with C == 1 or H == W == 1
    # ("required rank 4 tensor to use channels_last format", torch 2.13): only draw it where torch runs
    heads = ["flatten", "pool"] + (["mean"] if s > 1 and (c > 1 or block == "cat") else [])
    return ChainSpec(cin, size, tuple(convs), block, draw(st.sampled_from(heads)), linears, draw(st.integers(2, 5)))


# the tutorial (quant -> conv -> bn -> relu -> dequant, 1 channel)
class QM2(nn.Module):
    def __init__(self, parts):
        super().__init__()
        quant, dequant, _ = parts
        self.conv, self.bn, self.relu = nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1), nn.ReLU()
        self.quant, self.dequant = quant(), dequant()

    def groups(self):
        return [["conv", "bn", "relu"]]

    def forward(self, x):
        return self.dequant(self.relu(self.bn(self.conv(self.quant(x)))))


class BasicBlock(nn.Module):
    def __init__(self, parts, cin: int, cout: int, stride: int, relu_module: bool):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.skip = parts[2]()
        self.relu_module = relu_module
        self.relu2 = nn.ReLU()

    def groups(self, prefix: str):
        groups = [[f"{prefix}.conv1", f"{prefix}.bn1", f"{prefix}.relu1"], [f"{prefix}.conv2", f"{prefix}.bn2"]]
        return groups + ([[f"{prefix}.downsample.0", f"{prefix}.downsample.1"]] if self.downsample else [])

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        identity = x if self.downsample is None else self.downsample(x)
        if self.relu_module:  # add, then an nn.ReLU running on the QTensor
            return self.relu2(self.skip.add(out, identity))
        return self.skip.add_relu(out, identity)


class ResNet(nn.Module):
    def __init__(self, parts, pool: str = "max", classes: int = 10):
        super().__init__()
        quant, dequant, _ = parts
        self.quant, self.dequant = quant(), dequant()
        self.conv1, self.bn1, self.relu = nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        self.pool = nn.MaxPool2d(3, 2, 1) if pool == "max" else nn.AvgPool2d(2)
        self.layer1 = BasicBlock(parts, 8, 8, 1, relu_module=False)
        self.layer2 = BasicBlock(parts, 8, 16, 2, relu_module=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, classes)

    def groups(self):
        return [["conv1", "bn1", "relu"]] + self.layer1.groups("layer1") + self.layer2.groups("layer2")

    def forward(self, x):
        x = self.pool(self.relu(self.bn1(self.conv1(self.quant(x)))))
        x = self.layer2(self.layer1(x))
        return self.dequant(self.fc(torch.flatten(self.avgpool(x), 1)))


# --------------------------------------------------------------------------------------------------------
# the flow on both sides
# --------------------------------------------------------------------------------------------------------
def float_models(build, seed: int):
    """The same float model twice: with torch.ao's stubs and with minqat's (identical weights)."""
    torch.manual_seed(seed)
    theirs = build(torch_ao_parts()).train()
    randomize_bn(theirs, torch.Generator().manual_seed(seed))
    ours = build(MINQAT_PARTS).train()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


def train_torch_ao(float_theirs: nn.Module, qconfig_name: str, input_shape, classes: int, seed: int, steps: int = 2):
    """torch.ao's fuse_modules_qat + prepare_qat + ``steps`` SGD steps, then eval mode."""
    tq = ao()
    model = copy.deepcopy(float_theirs)
    model.qconfig = qconfig(tq, qconfig_name)
    groups = float_theirs.groups()
    if groups:
        model = tq.fuse_modules_qat(model, groups)
    model = tq.prepare_qat(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, target = torch.randn(input_shape, generator=gen), torch.randint(0, classes, (input_shape[0],), generator=gen)
        y = model(x)
        loss = F.cross_entropy(y, target) if y.dim() == 2 else F.mse_loss(y, 2.0 * x + 1.0)  # QM2: the tutorial's
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def minqat_prepared_like(float_ours: nn.Module, qconfig_name: str, state: dict) -> nn.Module:
    """minqat's fuse_modules_qat + prepare_qat of the same float model, loaded with torch.ao's prepared state."""
    model = copy.deepcopy(float_ours)
    model.qconfig = qconfig(minqat, qconfig_name)
    groups = float_ours.groups()
    if groups:
        model = minqat.fuse_modules_qat(model, groups)
    model = minqat.prepare_qat(model)
    model.load_state_dict(state, strict=True)
    return model.eval()


def quantizable_input(model_int8: nn.Module, shape, seed: int) -> torch.Tensor:
    """Float inputs that the model's Quantize maps onto integers in [0, 127] (numerics.md §7.2)."""
    gen = torch.Generator().manual_seed(seed)
    scale, zero_point = float(model_int8.quant.scale), int(model_int8.quant.zero_point)
    x_int = torch.randint(0, 128, shape, generator=gen)
    return ((x_int - zero_point) * scale).float()


def record(model: nn.Module) -> dict:
    """Every module's output, by name, on the next forward (forward hooks)."""
    outputs = {}
    for name, module in model.named_modules():
        if name.endswith("_packed_params"):
            continue
        module.register_forward_hook(lambda m, args, out, name=name: outputs.__setitem__(name, out))
    return outputs


def assert_same_outputs(ours: dict, theirs: dict, what: str) -> int:
    assert ours.keys() == theirs.keys(), f"{what}: modules run differ {sorted(set(ours) ^ set(theirs))}"
    compared = 0
    for name, expected in theirs.items():
        got = ours[name]
        if isinstance(expected, torch.Tensor) and expected.is_quantized:
            assert isinstance(got, QTensor), f"{what} '{name}': {type(got).__name__}, not a QTensor"
            assert_bit_exact(got.int_repr(), expected.int_repr(), f"{what} '{name}' int8 output")
            assert float(got.scale) == expected.q_scale() and int(got.zero_point) == expected.q_zero_point(), name
            compared += expected.numel()
        elif isinstance(expected, torch.Tensor):
            assert_bit_exact(got, expected, f"{what} '{name}' float output")
    return compared


def tree(model: nn.Module) -> list[tuple[str, str]]:
    """(name, class name) of every module; torch.ao's linear layers hold their packed weight in a child."""
    return [(name, type(m).__name__) for name, m in model.named_modules() if not name.endswith("_packed_params")]


def assert_convert_parity(build, qconfig_name: str, input_shape, classes: int, seed: int,
                          observers: bool = True) -> tuple[nn.Module, nn.Module]:
    float_ours, float_theirs = float_models(build, seed)
    prepared_theirs = train_torch_ao(float_theirs, qconfig_name, input_shape, classes, seed)
    prepared_ours = minqat_prepared_like(float_ours, qconfig_name, prepared_theirs.state_dict())
    if not observers:
        prepared_theirs.apply(ao().disable_observer)
        prepared_ours.apply(minqat.disable_observer)
    state_before = copy.deepcopy(prepared_ours.state_dict())
    with quantized_engine("fbgemm"):
        theirs = ao().convert(prepared_theirs)
    ours = convert(prepared_ours)
    for key, value in prepared_ours.state_dict().items():  # inplace=False: the prepared model is untouched
        assert_bit_exact(value, state_before[key], f"prepared {key} after convert")

    assert tree(ours) == tree(theirs)
    modules = dict(ours.named_modules())
    for name, mod in theirs.named_modules():
        if hasattr(mod, "scale"):
            assert_same_int8_module(modules[name], mod, f"'{name}'")
    x = quantizable_input(ours, (3,) + tuple(input_shape[1:]), seed + 1)
    ours_out, theirs_out = record(ours), record(theirs)
    with quantized_engine("fbgemm"):
        y_theirs = theirs(x)
    y_ours = ours(x)
    assert assert_same_outputs(ours_out, theirs_out, "layer") > 0
    assert_bit_exact(y_ours, y_theirs, "float output")
    return ours, theirs


# --------------------------------------------------------------------------------------------------------
# (1) live parity
# --------------------------------------------------------------------------------------------------------
@requires_ao
@given(spec=chain_specs(), qconfig_name=st.sampled_from(QCONFIG_NAMES), observers=st.booleans(),
       seed=st.integers(0, 2**16))
def test_generated_models_convert_like_torch_ao(spec, qconfig_name, observers, seed):
    assert_convert_parity(lambda parts: ChainNet(spec, parts), qconfig_name, (4, spec.cin, spec.size, spec.size),
                          spec.classes, seed, observers)


@requires_ao
@pytest.mark.parametrize("qconfig_name", ["fbgemm-v0", "fbgemm-v1", "per-tensor"])
def test_tutorial_qm2_converts_like_torch_ao(qconfig_name):
    ours, _ = assert_convert_parity(QM2, qconfig_name, (8, 1, 6, 6), 6, seed=1)
    assert [type(m).__name__ for m in ours.children()] == ["ConvReLU2d", "Identity", "Identity", "Quantize",
                                                         "DeQuantize"]


@requires_ao
@pytest.mark.parametrize("pool, qconfig_name, observers", [("max", "fbgemm-v1", True), ("avg", "fbgemm-v0", False),
                                                           ("max", "per-tensor", True)])
def test_resnet_converts_like_torch_ao(pool, qconfig_name, observers):
    ours, _ = assert_convert_parity(lambda parts: ResNet(parts, pool), qconfig_name, (4, 3, 16, 16), 10, seed=3,
                                    observers=observers)
    assert type(ours.layer2.skip).__name__ == "QFunctional" and type(ours.layer2.relu2) is nn.ReLU


@requires_ao
@pytest.mark.parametrize("backend, model", [("fbgemm", "resnet"), ("per-tensor-narrow", "resnet"),
                                            ("fbgemm", "chain")])
def test_post_training_quantization_converts_like_torch_ao(backend, model):
    """prepare (observers) + calibration + convert: the float-module branch of every ``from_float``
    (fused float ConvReLU2d / LinearReLU containers, plain Conv2d / Linear)."""
    tq = ao()
    if model == "resnet":
        build, shape = (lambda parts: ResNet(parts, "avg")), (4, 3, 16, 16)
    else:
        build, shape = (lambda parts: ChainNet(GOLDEN_CHAIN, parts)), (4, 2, 6, 6)
    float_ours, float_theirs = float_models(build, seed=7)

    def prepared(lib, model):
        model = copy.deepcopy(model).eval()
        if backend == "fbgemm":
            model.qconfig = lib.get_default_qconfig("fbgemm")
        else:  # per-tensor weights, activations [0, 127]
            model.qconfig = lib.QConfig(activation=lib.MinMaxObserver.with_args(quant_min=0, quant_max=127),
                                        weight=lib.MinMaxObserver.with_args(dtype=dtypes(lib)[1], quant_min=-127,
                                                                            quant_max=127,
                                                                            qscheme=torch.per_tensor_symmetric))
        return lib.prepare(lib.fuse_modules(model, model.groups()))

    theirs, ours = prepared(tq, float_theirs), prepared(minqat, float_ours)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        theirs(torch.randn(shape, generator=gen))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    with quantized_engine("fbgemm"):
        theirs = tq.convert(theirs)
    ours = convert(ours)
    assert tree(ours) == tree(theirs)
    modules = dict(ours.named_modules())
    for name, mod in theirs.named_modules():
        if hasattr(mod, "scale"):
            assert_same_int8_module(modules[name], mod, f"'{name}'")
    x = quantizable_input(ours, shape, 1)
    ours_out, theirs_out = record(ours), record(theirs)
    with quantized_engine("fbgemm"):
        expected = theirs(x)
    assert_bit_exact(ours(x), expected, "output")
    assert assert_same_outputs(ours_out, theirs_out, "layer") > 0


# --------------------------------------------------------------------------------------------------------
# (2) the x86 engine (oneDNN convolutions): measured, not exact
# --------------------------------------------------------------------------------------------------------
def _mismatch(ours: torch.Tensor, theirs: torch.Tensor) -> tuple[int, int, int]:
    """(outputs compared, outputs differing, largest difference in LSB) of two integer tensors."""
    diff = (ours.int() - theirs.int()).abs()
    return diff.numel(), int((diff > 0).sum()), int(diff.max())


@requires_ao
def test_x86_engine_on_a_converted_resnet():
    """torch's ``x86`` engine runs symmetric-weight convs on oneDNN (AVX512-VNNI CPUs), which is not
    bit-compatible with fbgemm (numerics.md §7.3); its linear layers run fbgemm.

    Each int8 layer of the converted ResNet gets torch's own input for that layer, so differences cannot
    propagate. Measured here (AVX512-VNNI, torch 2.13): 0 of 123,200 layer outputs differ (0 of 1,048,576
    with a batch of 256; trained qparams rarely produce the exact ties oneDNN rounds differently). Asserted
    loosely: mismatch rate < 1e-3 and at most 1 LSB.
    """
    float_ours, float_theirs = float_models(lambda parts: ResNet(parts, "max"), seed=11)
    prepared_theirs = train_torch_ao(float_theirs, "x86-v1", (8, 3, 16, 16), 10, seed=11)
    prepared_ours = minqat_prepared_like(float_ours, "x86-v1", prepared_theirs.state_dict())
    with quantized_engine("x86"):
        theirs = ao().convert(prepared_theirs)
    ours = dict(convert(prepared_ours).named_modules())
    layers = {name: m for name, m in theirs.named_modules() if callable(getattr(m, "weight", None))}
    inputs, outputs = {}, {}

    def keep(name):
        def hook(module, args, out):
            inputs[name], outputs[name] = args[0], out
        return hook

    for name, m in layers.items():
        m.register_forward_hook(keep(name))
    with quantized_engine("x86"):
        theirs(torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    total = mismatched = max_diff = 0
    for name in layers:
        x = inputs[name]
        got = ours[name](QTensor(x.int_repr(), x.q_scale(), x.q_zero_point()))
        n, bad, worst = _mismatch(got.int_repr(), outputs[name].int_repr())
        total, mismatched, max_diff = total + n, mismatched + bad, max(max_diff, worst)
    assert total > 100_000
    assert mismatched / total < 1e-3 and max_diff <= 1, (mismatched, total, max_diff)


@requires_ao
def test_x86_engine_on_tie_heavy_conv_layers():
    """Where oneDNN departs from fbgemm: layers built so that many outputs are exact half-integers
    (power-of-two scales, an odd output zero point; oneDNN adds the zero point before rounding).

    Measured here (AVX512-VNNI, torch 2.13): 453 of 262,144 outputs differ (1.7e-3), all by 1 LSB; the same
    layers under torch's fbgemm engine equal minqat's on all 262,144. (On a CPU without VNNI the x86 engine
    dispatches these convs to fbgemm and nothing differs.) Asserted: rate < 1e-2, at most 1 LSB; fbgemm exact.
    """
    import torch.ao.nn.quantized as tnnq

    gen = torch.Generator().manual_seed(0)
    total = mismatched = max_diff = 0
    for _ in range(8):
        w = torch.randint(-127, 128, (16, 16, 3, 3), generator=gen, dtype=torch.int8)
        w_scale = 2.0 ** -torch.randint(6, 9, (16,), generator=gen).double()
        bias = torch.randint(-64, 64, (16,), generator=gen).float() * 2**-9
        x_scale, y_scale, x_zp, y_zp = 2.0**-4, 2.0 ** -int(torch.randint(3, 6, (1,), generator=gen)), 3, 63
        x = torch.randint(0, 128, (8, 16, 16, 16), generator=gen, dtype=U8)
        ours = minqat.nn.quantized.Conv2d(16, 16, 3, padding=1)
        ours.set_weight_bias(w, w_scale.float(), torch.zeros(16, dtype=torch.long), bias)
        ours.scale, ours.zero_point = y_scale, y_zp
        expected = ours(QTensor(x, x_scale, x_zp)).int_repr()
        for engine in ("x86", "fbgemm"):
            with quantized_engine(engine):
                theirs = tnnq.Conv2d(16, 16, 3, padding=1)
                theirs.set_weight_bias(torch._make_per_channel_quantized_tensor(w, w_scale, torch.zeros(16).long(), 0),
                                       bias)
                theirs.scale, theirs.zero_point = y_scale, y_zp
                y = theirs(torch._make_per_tensor_quantized_tensor(x, x_scale, x_zp)).int_repr()
            if engine == "fbgemm":
                assert_bit_exact(expected, y, "fbgemm engine")
            else:
                n, bad, worst = _mismatch(expected, y)
                total, mismatched, max_diff = total + n, mismatched + bad, max(max_diff, worst)
    assert mismatched / total < 1e-2 and max_diff <= 1, (mismatched, total, max_diff)


# --------------------------------------------------------------------------------------------------------
# (3) golden vectors (no torch.ao needed; regenerate with tests/golden/make_convert.py)
# --------------------------------------------------------------------------------------------------------
GOLDEN_MODELS = {  # name -> (builder, qconfig, training input shape, classes)
    "qm2-fbgemm-v1": (QM2, "fbgemm-v1", (8, 1, 6, 6), 1),
    "resnet-fbgemm-v0": (lambda parts: ResNet(parts, "max"), "fbgemm-v0", (4, 3, 16, 16), 10),
    "resnet-per-tensor": (lambda parts: ResNet(parts, "avg"), "per-tensor", (4, 3, 16, 16), 10),
    "chain-cat-narrow": (lambda parts: ChainNet(GOLDEN_CHAIN, parts), "per-tensor-affine-narrow", (4, 2, 6, 6), 3),
}
GOLDEN_CHAIN = ChainSpec(2, 6, (Unit(4, 3, 1, 1, 1, 2, True, True, True), Unit(4, 3, 2, 1, 1, 4, False, True, False)),
                         "cat", "pool", (Unit(6, kernel=0, relu=True),), 3)


def golden_record(int8_model: nn.Module, x: torch.Tensor, outputs: dict) -> dict:
    """What the golden file keeps of a converted torch.ao model: plain tensors and numbers only."""
    layers = {name: {"int_repr": out.int_repr(), "scale": out.q_scale(), "zero_point": out.q_zero_point()}
              for name, out in outputs.items() if isinstance(out, torch.Tensor) and out.is_quantized}
    return {"x": x, "layers": layers}


def _golden():
    if not GOLDEN.exists():
        pytest.skip("tests/golden/convert.pt is missing; run tests/golden/make_convert.py")
    return torch.load(GOLDEN, weights_only=True)


@pytest.mark.parametrize("name", sorted(GOLDEN_MODELS))
def test_golden_converted_models(name):
    recorded = _golden()[name]
    build, qconfig_name, _, _ = GOLDEN_MODELS[name]
    torch.manual_seed(0)
    model = build(MINQAT_PARTS).train()
    model.qconfig = qconfig(minqat, qconfig_name)
    model = minqat.prepare_qat(minqat.fuse_modules_qat(model, model.groups()))
    model.load_state_dict(recorded["prepared"], strict=True)
    int8 = convert(model.eval())
    modules = dict(int8.named_modules())
    for key, parts in recorded["modules"].items():
        mod = modules[key]
        for attr, expected in parts.items():
            value = getattr(mod, attr)
            if isinstance(expected, torch.Tensor):
                assert_bit_exact(value.reshape(expected.shape), expected, f"{name} {key}.{attr}")
            else:
                assert value == expected, f"{key}.{attr}"
    outputs = record(int8)
    assert_bit_exact(int8(recorded["x"]), recorded["output"], f"{name} output")
    for key, layer in recorded["layers"].items():
        assert_bit_exact(outputs[key].int_repr(), layer["int_repr"], f"{name} '{key}'")
        assert (float(outputs[key].scale), int(outputs[key].zero_point)) == (layer["scale"], layer["zero_point"])


# --------------------------------------------------------------------------------------------------------
# (4) behaviour and bad input
# --------------------------------------------------------------------------------------------------------
def trained_qm2(steps: int = 1, backend: str = "fbgemm") -> nn.Module:
    torch.manual_seed(0)
    model = QM2(MINQAT_PARTS).train()
    model.qconfig = minqat.get_default_qat_qconfig(backend)
    model = minqat.prepare_qat(minqat.fuse_modules_qat(model, model.groups()))
    for _ in range(steps):
        model(torch.randn(4, 1, 5, 5))
    return model


def test_convert_swaps_through_the_mapping_and_cleans_up():
    prepared = trained_qm2().eval()
    int8 = convert(prepared)
    assert int8 is not prepared and type(prepared.conv).__name__ == "ConvBnReLU2d"  # the original is untouched
    assert type(int8.conv) is CONVERT_MODULE_MAPPING[type(prepared.conv)]
    assert not [n for n, m in int8.named_modules() if hasattr(m, "qconfig") or hasattr(m, "activation_post_process")]
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in int8.modules())
    y = int8(torch.randn(2, 1, 5, 5))
    assert y.dtype == torch.float32 and y.shape == (2, 1, 5, 5)
    assert get_convert_module_mapping() == CONVERT_MODULE_MAPPING
    assert get_convert_module_mapping() is not CONVERT_MODULE_MAPPING


def test_inplace_and_remove_qconfig():
    prepared = trained_qm2().eval()
    int8 = convert(prepared, inplace=True, remove_qconfig=False)
    assert int8 is prepared and type(prepared.conv).__name__ == "ConvReLU2d"
    assert hasattr(int8, "qconfig") and hasattr(int8.bn, "qconfig")  # kept on the modules that stay


def test_user_hooks_are_kept_and_modules_without_qconfig_stay_float():
    prepared = trained_qm2()
    seen = []
    prepared.conv.register_forward_hook(lambda m, args, out: seen.append(type(out).__name__))
    prepared.conv.register_forward_pre_hook(lambda m, args: seen.append(type(args[0]).__name__))
    float_tail = nn.Linear(5, 5)
    prepared.tail = float_tail  # no qconfig: never swapped
    int8 = convert(prepared.eval())
    int8(torch.randn(1, 1, 5, 5))
    assert seen == ["QTensor", "QTensor"]
    assert int8.tail is not float_tail and type(int8.tail) is nn.Linear


def test_converted_model_state_dict_round_trip():
    int8 = convert(trained_qm2(steps=2).eval())
    again = convert(trained_qm2(steps=1).eval())
    again.load_state_dict(int8.state_dict(), strict=True)
    x = torch.randn(3, 1, 5, 5)
    assert_bit_exact(again(x), int8(x), "reloaded int8 model")
    assert_bit_exact(copy.deepcopy(int8)(x), int8(x), "deep copy")


def test_never_prepared_model_is_an_error():
    with pytest.raises(ValueError, match="convert needs a prepared model, but Sequential holds no minqat observer"):
        convert(nn.Sequential(nn.Conv2d(1, 1, 1)))
    model = QM2(MINQAT_PARTS)
    model.qconfig = minqat.get_default_qat_qconfig("fbgemm")
    minqat.propagate_qconfig_(model)  # a qconfig alone is not a preparation
    with pytest.raises(ValueError, match="convert needs a prepared model"):
        convert(model)


@requires_ao
def test_torch_ao_prepared_model_is_an_error():
    tq = ao()
    model = QM2(torch_ao_parts()).train()
    model.qconfig = tq.get_default_qat_qconfig("fbgemm")
    with pytest.raises(ValueError, match="prepared by torch.ao.quantization is converted by torch.ao's own convert"):
        convert(tq.prepare_qat(model))


def test_unobserved_model_in_train_mode_is_an_error_naming_the_module():
    with pytest.raises(ValueError, match=r"cannot convert 'conv' \(ConvBnReLU2d\) \(the model is still in training "
                                         r"mode: was it trained or calibrated\?\): its output observer"):
        convert(trained_qm2(steps=0))

    class TwoBranches(nn.Module):
        def __init__(self):
            super().__init__()
            self.quant, self.dequant = minqat.QuantStub(), minqat.DeQuantStub()
            self.body = nn.Sequential(nn.Conv2d(1, 1, 1), nn.Sequential(nn.Linear(1, 1)))

        def forward(self, x):  # body[1] is never run during training
            return self.dequant(self.body[0](self.quant(x)))

    model = TwoBranches().train()
    model.qconfig = minqat.get_default_qat_qconfig("fbgemm")
    model = minqat.prepare_qat(model)
    model(torch.randn(2, 1, 3, 3))
    with pytest.raises(ValueError, match=r"cannot convert 'body.1.0' \(Linear\) \(the model is still in training mode"
                                         r".*never observed a batch \(min_val=inf, max_val=-inf\)"):
        convert(model)
    with pytest.raises(ValueError, match=r"cannot convert 'body.1.0' \(Linear\): its output observer"):
        convert(model.eval())


def test_observed_module_without_int8_twin_is_an_error():
    model = nn.Sequential(minqat.QuantStub(), nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2), minqat.DeQuantStub()).train()
    model.qconfig = minqat.get_default_qat_qconfig("fbgemm")
    model = minqat.prepare_qat(model)  # BN left unfused: observed on its own
    model(torch.randn(2, 1, 3, 3))
    with pytest.raises(ValueError, match=r"cannot convert '2' \(BatchNorm2d\): it is observed but minqat has no int8 "
                                         r"module for it; set its qconfig to None"):
        convert(model.eval())


def test_bad_mapping_and_wrong_inputs_at_inference():
    prepared = trained_qm2().eval()
    with pytest.raises(ValueError, match="mapping must be a dict from prepared module types to int8 module types"):
        convert(prepared, mapping=[])

    class SkipsTheStub(nn.Module):
        def __init__(self):
            super().__init__()
            self.quant, self.conv, self.dequant = minqat.QuantStub(), nn.Conv2d(1, 1, 1), minqat.DeQuantStub()

        def forward(self, x):
            return self.dequant(self.conv(self.quant(x) if self.training else x))  # bug: no quant in eval

    model = SkipsTheStub().train()
    model.qconfig = minqat.get_default_qat_qconfig("fbgemm")
    model = minqat.prepare_qat(model)
    model(torch.randn(2, 1, 3, 3))
    int8 = convert(model.eval())
    with pytest.raises(TypeError, match="QuantizedConv2d expects a QTensor input .* got a torch.Tensor of dtype "
                                        "torch.float32; put a QuantStub before it"):
        int8(torch.randn(1, 1, 3, 3))


@pytest.mark.cuda
def test_int8_model_on_cuda_equals_cpu():
    """The int8 modules are device-agnostic (the kernels' float64 path runs on any device)."""
    torch.manual_seed(0)
    model = ResNet(MINQAT_PARTS, "avg").train()
    model.qconfig = minqat.get_default_qat_qconfig("fbgemm")
    model = minqat.prepare_qat(minqat.fuse_modules_qat(model, model.groups()))
    model(torch.randn(4, 3, 16, 16))
    int8 = convert(model.eval())
    x = quantizable_input(int8, (2, 3, 16, 16), 0)
    expected = int8(x)
    assert_bit_exact(int8.to("cuda")(x.cuda()).cpu(), expected, "cuda int8 model")
