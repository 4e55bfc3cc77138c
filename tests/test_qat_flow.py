"""The whole eager-mode QAT flow, end to end: fuse_modules_qat -> prepare_qat -> training, vs torch.ao.

1. Generated architectures (hypothesis): small CNNs of 1-4 blocks -- conv-bn-relu, conv-bn,
   conv-relu, an unfused conv / bn / relu chain (BN affine on or off), residual basic blocks whose
   add is a ``FloatFunctional`` (``add`` + ReLU or ``add_relu``, with a strided conv-bn downsample
   where the shape changes), two-branch blocks joined by ``FloatFunctional.cat`` -- with drawn
   channels, kernel size, stride, padding, dilation, groups (dense, grouped, depthwise), conv bias,
   BN eps and momentum (``None`` included), then average pooling or flattening and a Linear /
   Linear-ReLU / Linear-BN1d hidden layer before a Linear classifier, between QuantStub and
   DeQuantStub. The same float model is prepared three times: by torch.ao (with torch.ao's stubs
   and FloatFunctional), by minqat with minqat's, and by minqat *given torch.ao's* (which it must
   swap for its own). From identical weights and the same batches, for every default QAT qconfig
   (fbgemm / x86 / qnnpack, versions 0 and 1): three SGD steps in train mode, one after
   ``freeze_bn_stats``, one after ``disable_observer``, one in eval mode; at every step the output,
   the input gradient, every parameter gradient and the whole ``state_dict`` (fake-quant scales
   and zero points, observer min/max, flags, BN running statistics and counters) are BIT-EXACT
   (``atol=0``): minqat runs the same float ops in the same order as torch.ao and its fake-quant
   and observer arithmetic is bit-exact by construction (numerics.md §2-§5), so no tolerance is
   needed anywhere. A fixed model holding every block kind (KITCHEN_SINK) runs under each of the
   six qconfigs, which the bounded random draws need not all hit.
2. The issue's tutorial, verbatim (``class QM2(M2, QM)`` by multiple inheritance), runs with
   ``minqat`` names only, and gives torch.ao's numbers when the very same source runs with
   ``torch.ao.quantization`` bound to the name ``minqat``.
3. Model definitions written for torch.ao -- a torchvision-style quantizable ResNet (basic blocks with
   ``add_relu``, fused by the model's own ``fuse_model`` through torch.ao) and a MobileNetV2-style
   network of inverted residuals (``skip_add.add``) -- prepare with minqat unchanged and train
   bit-exactly like torch.ao's preparation of the same model.

One intra-op thread (tests/conftest.py): a float conv's weight gradient is summed in an order that
depends on the thread count, and both libraries must run under the same one.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import minqat
from tests.oracle import ao, assert_bit_exact, requires_ao
from tests.strategies import conv_geometries

QCONFIG_KEYS = [(backend, version) for backend in ("fbgemm", "x86", "qnnpack") for version in (0, 1)]


# --- architecture descriptions (plain data, so hypothesis can shrink them) ----------------------------


@dataclass(frozen=True)
class ConvSpec:
    cin: int
    cout: int
    kernel: int
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    groups: int = 1
    bias: bool = True

    def out_size(self, size: int) -> int:
        return (size + 2 * self.padding - self.dilation * (self.kernel - 1) - 1) // self.stride + 1


@dataclass(frozen=True)
class BnSpec:
    eps: float = 1e-5
    momentum: float | None = 0.1
    affine: bool = True


@dataclass(frozen=True)
class UnitSpec:
    """``conv (-> bn) (-> relu)``; ``fuse`` False keeps the three apart (a QAT Conv2d, an observed BN)."""

    conv: ConvSpec
    bn: BnSpec | None
    relu: bool
    fuse: bool = True


@dataclass(frozen=True)
class BlockSpec:
    """``kind``: "unit" (units[0]); "residual" (units[0] -> units[1], + identity or units[2], the
    downsample); "concat" (cat of units[0](x) and units[1](x) along channels)."""

    kind: str
    units: tuple[UnitSpec, ...]
    add_relu: bool = False


@dataclass(frozen=True)
class Arch:
    in_channels: int
    size: int
    batch: int
    blocks: tuple[BlockSpec, ...]
    pool: bool  # average-pool to 1x1 (else flatten the feature map)
    features: int  # classifier input
    hidden: str | None  # None, "linear", "linear-relu", "linear-bn"
    hidden_features: int
    classes: int


@st.composite
def conv_specs(draw, cin: int, size: int):
    """Any conv on a ``size x size`` input: dense, grouped or depthwise; padding enough for >= 1 output."""
    g = draw(conv_geometries(cin, size, max_dense_cout=4))
    return ConvSpec(cin, g["cout"], g["kernel"], g["stride"], g["padding"], g["dilation"], g["groups"],
                    draw(st.booleans()))


@st.composite
def same_convs(draw, cin: int, cout: int, stride: int, depthwise_ok: bool):
    """A conv that keeps the spatial size (odd kernel, 'same' padding) up to its stride."""
    kernel, dilation = draw(st.sampled_from([1, 3])), draw(st.integers(1, 2))
    groups = cin if depthwise_ok and cin == cout and draw(st.booleans()) else 1
    return ConvSpec(cin, cout, kernel, stride, dilation * (kernel - 1) // 2, dilation, groups, draw(st.booleans()))


EPS = st.sampled_from([1e-5, 1e-3, 0.1])
MOMENTA = st.sampled_from([0.1, 0.01, 0.5, None])  # None: BN's cumulative average
# Fused BN must be affine (γ, β are folded; torch.ao's QAT ConvBn cannot take a BN without them)
bn_specs = st.builds(BnSpec, eps=EPS, momentum=MOMENTA, affine=st.just(True))


@st.composite
def blocks(draw, cin: int, size: int):
    """One block and its output (channels, size)."""
    kind = draw(st.sampled_from(["conv-bn-relu", "residual", "conv-bn", "unfused", "conv-relu", "residual", "concat"]))
    if kind == "residual":
        cout, stride = draw(st.integers(1, 4)), draw(st.integers(1, 2))
        first = UnitSpec(draw(same_convs(cin, cout, stride, False)), draw(bn_specs), True)
        second = UnitSpec(draw(same_convs(cout, cout, 1, True)), draw(bn_specs), False)
        units = (first, second)
        if stride != 1 or cin != cout:  # torchvision's downsample: 1x1 conv (stride) + bn
            units += (UnitSpec(ConvSpec(cin, cout, 1, stride, 0, 1, 1, False), draw(bn_specs), False),)
        return BlockSpec("residual", units, draw(st.booleans())), cout, first.conv.out_size(size)
    if kind == "concat":  # two branches keeping the size: conv-bn-relu and conv-relu
        a = UnitSpec(draw(same_convs(cin, draw(st.integers(1, 3)), 1, False)), draw(bn_specs), True)
        b = UnitSpec(draw(same_convs(cin, draw(st.integers(1, 3)), 1, True)), None, True)
        return BlockSpec("concat", (a, b)), a.conv.cout + b.conv.cout, size
    conv = draw(conv_specs(cin, size))
    if kind == "unfused":  # conv, bn and relu stay apart: any BN, affine or not
        bn = BnSpec(draw(EPS), draw(MOMENTA), draw(st.booleans()))
        unit = UnitSpec(conv, bn, draw(st.booleans()), fuse=False)
    else:
        unit = UnitSpec(conv, draw(bn_specs) if "bn" in kind else None, kind.endswith("relu"))
    return BlockSpec("unit", (unit,)), conv.cout, conv.out_size(size)


@st.composite
def architectures(draw):
    in_channels = draw(st.integers(1, 3))
    input_size = size = draw(st.integers(4, 8))
    channels, specs = in_channels, []
    for _ in range(draw(st.integers(1, 4))):
        block, channels, size = draw(blocks(channels, size))
        specs.append(block)
    pool = draw(st.booleans())
    return Arch(in_channels, input_size, draw(st.integers(2, 4)), tuple(specs), pool,
                channels if pool else channels * size * size,
                draw(st.sampled_from([None, "linear", "linear-relu", "linear-bn"])),
                draw(st.integers(1, 5)), draw(st.integers(2, 4)))


# --- the float models ---------------------------------------------------------------------------------


class Unit(nn.Module):
    """``conv -> bn -> relu`` as a model writes it; fusion leaves ``nn.Identity`` in place of bn/relu."""

    def __init__(self, spec: UnitSpec):
        super().__init__()
        c = spec.conv
        self.conv = nn.Conv2d(c.cin, c.cout, c.kernel, c.stride, c.padding, c.dilation, c.groups, c.bias)
        self.bn = None if spec.bn is None else nn.BatchNorm2d(c.cout, spec.bn.eps, spec.bn.momentum, spec.bn.affine)
        self.relu = nn.ReLU() if spec.relu else None

    def forward(self, x):
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return x if self.relu is None else self.relu(x)


class Residual(nn.Module):
    """A ResNet basic block: ``unit2(unit1(x)) + identity`` through a FloatFunctional, then ReLU."""

    def __init__(self, spec: BlockSpec, functional: type[nn.Module]):
        super().__init__()
        self.unit1, self.unit2 = Unit(spec.units[0]), Unit(spec.units[1])
        self.downsample = Unit(spec.units[2]) if len(spec.units) > 2 else None
        self.skip = functional()
        self.relu = None if spec.add_relu else nn.ReLU()

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        y = self.unit2(self.unit1(x))
        if self.relu is None:
            return self.skip.add_relu(y, identity)
        return self.relu(self.skip.add(y, identity))


class Concat(nn.Module):
    """Two branches on the same input, concatenated along channels through a FloatFunctional."""

    def __init__(self, spec: BlockSpec, functional: type[nn.Module]):
        super().__init__()
        self.branch1, self.branch2 = Unit(spec.units[0]), Unit(spec.units[1])
        self.cat = functional()

    def forward(self, x):
        return self.cat.cat([self.branch1(x), self.branch2(x)], dim=1)


class Net(nn.Module):
    """``quant -> blocks -> pool/flatten -> [hidden] -> classifier -> dequant``."""

    def __init__(self, arch: Arch, quant: type[nn.Module], dequant: type[nn.Module], functional: type[nn.Module]):
        super().__init__()
        self.quant = quant()
        make = {"unit": lambda b: Unit(b.units[0]), "residual": lambda b: Residual(b, functional),
                "concat": lambda b: Concat(b, functional)}
        self.features = nn.Sequential(*[make[b.kind](b) for b in arch.blocks])
        self.pool = nn.AdaptiveAvgPool2d(1) if arch.pool else nn.Identity()
        self.flatten = nn.Flatten()
        features = arch.features
        self.fc = self.fc_bn = self.fc_relu = None
        if arch.hidden is not None:
            self.fc = nn.Linear(arch.features, arch.hidden_features)
            self.fc_bn = nn.BatchNorm1d(arch.hidden_features) if arch.hidden == "linear-bn" else None
            self.fc_relu = nn.ReLU() if arch.hidden == "linear-relu" else None
            features = arch.hidden_features
        self.classifier = nn.Linear(features, arch.classes)
        self.dequant = dequant()

    def forward(self, x):
        x = self.flatten(self.pool(self.features(self.quant(x))))
        for layer in (self.fc, self.fc_bn, self.fc_relu):
            if layer is not None:
                x = layer(x)
        return self.dequant(self.classifier(x))


def fusion_groups(arch: Arch) -> list[list[str]]:
    """What a user passes to ``fuse_modules_qat`` for this architecture."""
    def unit(spec: UnitSpec, path: str) -> list[list[str]]:
        names = [f"{path}.conv"] + ([f"{path}.bn"] if spec.bn else []) + ([f"{path}.relu"] if spec.relu else [])
        return [names] if spec.fuse and len(names) > 1 else []

    groups = []
    for i, block in enumerate(arch.blocks):
        names = {"unit": ["unit"], "residual": ["unit1", "unit2", "downsample"], "concat": ["branch1", "branch2"]}
        for spec, name in zip(block.units, names[block.kind]):
            groups += unit(spec, f"features.{i}" if block.kind == "unit" else f"features.{i}.{name}")
    if arch.hidden in ("linear-relu", "linear-bn"):
        groups.append(["fc", "fc_relu" if arch.hidden == "linear-relu" else "fc_bn"])
    return groups


def randomize_bn(model: nn.Module, seed: int) -> None:
    """Non-trivial BN state: γ away from 0 (20 % negative), β, running statistics, a batch count."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
            c = bn.num_features
            if bn.affine:
                sign = torch.where(torch.rand(c, generator=gen) < 0.2, -1.0, 1.0)
                bn.weight.copy_((torch.rand(c, generator=gen) + 0.5) * sign)  # the approximate path divides by γ
                bn.bias.copy_(torch.rand(c, generator=gen) * 2 - 1)
            bn.running_mean.copy_(torch.randn(c, generator=gen))
            bn.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
            bn.num_batches_tracked.fill_(3)  # matters for momentum=None (cumulative average)


def torch_ao_parts():
    """torch.ao's (QuantStub, DeQuantStub, FloatFunctional)."""
    import torch.ao.nn.quantized as tnnq

    tq = ao()
    return tq.QuantStub, tq.DeQuantStub, tnnq.FloatFunctional


MINQAT_PARTS = (minqat.QuantStub, minqat.DeQuantStub, minqat.FloatFunctional)


# --- running the flow ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Library:
    """The four calls of the flow, from minqat or from torch.ao."""

    qconfig: object
    fuse_modules_qat: object
    prepare_qat: object
    freeze_bn_stats: object
    disable_observer: object


def minqat_library(key) -> Library:
    return Library(minqat.get_default_qat_qconfig(*key), minqat.fuse_modules_qat, minqat.prepare_qat,
                   minqat.freeze_bn_stats, minqat.disable_observer)


def torch_ao_library(key) -> Library:
    import torch.ao.nn.intrinsic.qat as tniqat

    tq = ao()
    return Library(tq.get_default_qat_qconfig(*key), tq.fuse_modules_qat, tq.prepare_qat, tniqat.freeze_bn_stats,
                   tq.disable_observer)


def prepare_model(model: nn.Module, groups: list[list[str]], lib: Library) -> nn.Module:
    model = copy.deepcopy(model).train()
    model.qconfig = lib.qconfig
    if groups:
        model = lib.fuse_modules_qat(model, groups)
    return lib.prepare_qat(model)


PHASES = ("train", "train", "train", "freeze_bn_stats", "disable_observer", "eval")


def enter_phase(model: nn.Module, phase: str, lib: Library) -> None:
    if phase == "freeze_bn_stats":
        model.apply(lib.freeze_bn_stats)
    elif phase == "disable_observer":
        model.apply(lib.disable_observer)
    elif phase == "eval":
        model.eval()


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, target: torch.Tensor,
               seed: int = 0) -> dict[str, torch.Tensor | None]:
    """Forward, cross-entropy backward, SGD step; everything worth comparing, by name."""
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)  # dropout, where a model has one, draws the same mask on both sides
    y = model(x)
    opt.zero_grad()
    F.cross_entropy(y, target).backward()
    record: dict[str, torch.Tensor | None] = {"output": y.detach().clone(), "input grad": x.grad.clone()}
    record.update({f"grad {k}": None if p.grad is None else p.grad.clone() for k, p in model.named_parameters()})
    opt.step()
    record.update({f"state {k}": v.clone() for k, v in model.state_dict().items()})
    return record


def assert_same_records(ours: dict, theirs: dict, what: str) -> None:
    assert ours.keys() == theirs.keys(), f"{what}: differing keys {sorted(set(ours) ^ set(theirs))}"
    for key, value in ours.items():
        if value is None or theirs[key] is None:
            assert value is None and theirs[key] is None, f"{what} {key}: a gradient on one side only"
        else:
            assert_bit_exact(value, theirs[key], f"{what} {key}")


def tree(model: nn.Module) -> list[tuple[str, str, bool]]:
    return [(name, type(m).__name__, m.training) for name, m in model.named_modules()]


def batches(arch: Arch, seed: int, n: int):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(arch.batch, arch.in_channels, arch.size, arch.size, generator=gen),
             torch.randint(0, arch.classes, (arch.batch,), generator=gen)) for _ in range(n)]


# --- 1. generated architectures vs torch.ao ---------------------------------------------------------------


@requires_ao
@settings(max_examples=25)  # ~0.2 s each: three preparations, six steps
@given(arch=architectures(), key=st.sampled_from(QCONFIG_KEYS), seed=st.integers(0, 2**16))
def test_generated_cnns_train_bit_exactly_like_torch_ao(arch, key, seed):
    check_against_torch_ao(arch, key, seed)


# Every block kind in one model: each default qconfig is run through it (the random draws above
# need not hit every qconfig in their bounded number of examples).
KITCHEN_SINK = Arch(
    in_channels=3, size=8, batch=4,
    blocks=(
        BlockSpec("unit", (UnitSpec(ConvSpec(3, 4, 3, 1, 1), BnSpec(), True),)),
        BlockSpec("residual", (UnitSpec(ConvSpec(4, 6, 3, 2, 1, bias=False), BnSpec(eps=1e-3), True),
                               UnitSpec(ConvSpec(6, 6, 3, 1, 1, groups=6), BnSpec(momentum=None), False),
                               UnitSpec(ConvSpec(4, 6, 1, 2, 0, bias=False), BnSpec(momentum=0.5), False)),
                  add_relu=True),
        BlockSpec("residual", (UnitSpec(ConvSpec(6, 6, 1), BnSpec(), True),
                               UnitSpec(ConvSpec(6, 6, 3, 1, 2, dilation=2), BnSpec(), False))),
        BlockSpec("concat", (UnitSpec(ConvSpec(6, 3, 1), BnSpec(), True),
                             UnitSpec(ConvSpec(6, 2, 3, 1, 2, dilation=2), None, True))),
        BlockSpec("unit", (UnitSpec(ConvSpec(5, 4, 3, 1, 1), BnSpec(affine=False), True, fuse=False),)),
        BlockSpec("unit", (UnitSpec(ConvSpec(4, 4, 2, 1, 0, groups=2), None, True),)),
        BlockSpec("unit", (UnitSpec(ConvSpec(4, 2, 1, bias=False), BnSpec(eps=0.1, momentum=0.01), False),)),
    ),
    pool=True, features=2, hidden="linear-bn", hidden_features=5, classes=3)


@requires_ao
@pytest.mark.parametrize("key", QCONFIG_KEYS, ids=[f"{b}-v{v}" for b, v in QCONFIG_KEYS])
def test_every_block_kind_trains_bit_exactly_under_every_default_qconfig(key):
    check_against_torch_ao(KITCHEN_SINK, key, seed=5)


def check_against_torch_ao(arch: Arch, key: tuple[str, int], seed: int) -> None:
    """Prepare ``arch`` three ways (see the module docstring), train all phases, compare every step."""
    torch.manual_seed(seed)
    float_theirs = Net(arch, *torch_ao_parts())
    randomize_bn(float_theirs, seed)
    float_ours = Net(arch, *MINQAT_PARTS)
    float_ours.load_state_dict(float_theirs.state_dict(), strict=True)
    groups = fusion_groups(arch)

    ours_lib, theirs_lib = minqat_library(key), torch_ao_library(key)
    theirs = prepare_model(float_theirs, groups, theirs_lib)
    contenders = {"minqat stubs": prepare_model(float_ours, groups, ours_lib),
                  "torch.ao stubs": prepare_model(float_theirs, groups, ours_lib)}  # minqat swaps torch.ao's
    assert not [type(m) for m in contenders["torch.ao stubs"].modules() if type(m).__module__.startswith("torch.ao")]
    for model in contenders.values():
        assert [(n, t) for n, t, _ in tree(model)] == [(n, t) for n, t, _ in tree(theirs)]

    theirs_opt = sgd(theirs)
    opts = {name: sgd(model) for name, model in contenders.items()}
    for step, (phase, (x, target)) in enumerate(zip(PHASES, batches(arch, seed, len(PHASES)))):
        if step == 0 or phase != PHASES[step - 1]:
            enter_phase(theirs, phase, theirs_lib)
            for model in contenders.values():
                enter_phase(model, phase, ours_lib)
        expected = train_step(theirs, theirs_opt, x, target)
        for name, model in contenders.items():
            assert tree(model) == tree(theirs), f"{name}: module modes after {phase}"
            assert_same_records(train_step(model, opts[name], x, target), expected, f"{name}, step {step} ({phase})")


# --- 2. the tutorial, verbatim ----------------------------------------------------------------

# Executed with exactly three names bound: torch, nn and minqat (plus the backend string).
TUTORIAL = '''
class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1)
        self.relu = nn.ReLU()

    def forward(self, x):
        x = self.conv(x)
        x = self.relu(x)
        return x


class QM(M):
    def __init__(self):
        super().__init__()
        self.quant = minqat.QuantStub()
        self.dequant = minqat.DeQuantStub()

    def forward(self, x):
        x = self.quant(x)
        x = self.conv(x)
        x = self.relu(x)
        x = self.dequant(x)
        return x


class M2(M):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(1)

    def forward(self, x):
        x = self.conv(x)
        x = self.bn(x)
        x = self.relu(x)
        return x


class QM2(M2, QM):
    def __init__(self):
        super().__init__()

    def forward(self, x):
        x = self.quant(x)
        x = self.conv(x)
        x = self.bn(x)
        x = self.relu(x)
        x = self.dequant(x)
        return x


def training_loop(model):
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(5):
        x = torch.randn(8, 1, 6, 6, generator=gen)
        target = 2.0 * x + 1.0
        opt.zero_grad()
        loss = ((model(x) - target) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


torch.manual_seed(0)
model = QM2().train()
model.qconfig = minqat.get_default_qat_qconfig(BACKEND)
model = minqat.fuse_modules_qat(model, [['conv', 'bn', 'relu']])
model = minqat.prepare_qat(model)
losses = training_loop(model)
model.eval()
eval_output = model(torch.linspace(-2, 2, 36).reshape(1, 1, 6, 6))
'''


def run_tutorial(library, backend: str) -> dict:
    namespace = {"__builtins__": __builtins__, "torch": torch, "nn": nn, "minqat": library, "BACKEND": backend}
    exec(compile(TUTORIAL, "<tutorial>", "exec"), namespace)
    return namespace


@pytest.mark.parametrize("backend", ["fbgemm", "x86", "qnnpack"])
def test_tutorial_runs_with_minqat_names_only(backend):
    done = run_tutorial(minqat, backend)
    model = done["model"]
    assert [name for name, _ in model.named_children()] == ["conv", "relu", "quant", "dequant", "bn"]
    assert type(model.conv) is minqat.nn.intrinsic.qat.ConvBnReLU2d
    assert type(model.bn) is nn.Identity and type(model.relu) is nn.Identity
    assert not [type(m) for m in model.modules() if type(m).__module__.startswith("torch.ao")]
    assert all(math.isfinite(loss) for loss in done["losses"]) and done["losses"][-1] < done["losses"][0]
    assert torch.isfinite(done["eval_output"]).all()
    assert not model.training and int(model.conv.bn.num_batches_tracked) == 5


@requires_ao
@pytest.mark.parametrize("backend", ["fbgemm", "x86", "qnnpack"])
def test_tutorial_gives_torch_ao_s_numbers(backend):
    ours, theirs = run_tutorial(minqat, backend), run_tutorial(ao(), backend)
    assert ours["losses"] == theirs["losses"]  # Python floats: exact
    assert_bit_exact(ours["eval_output"], theirs["eval_output"], "eval output")
    theirs_state = theirs["model"].state_dict()
    assert ours["model"].state_dict().keys() == theirs_state.keys()
    for key, value in ours["model"].state_dict().items():
        assert_bit_exact(value, theirs_state[key], key)


# --- 3. model definitions written for torch.ao, prepared by minqat unchanged -------------------------------


def quantizable_resnet():
    """A torchvision-style quantizable ResNet (``torchvision.models.quantization.resnet``), shrunk.

    Written against torch.ao exactly as torchvision writes it: torch.ao's stubs, ``add_relu`` of a
    torch.ao FloatFunctional, and a ``fuse_model`` that calls torch.ao's ``fuse_modules_qat``.
    """
    import torch.ao.nn.quantized as tnnq

    tq = ao()

    class BasicBlock(nn.Module):
        def __init__(self, inplanes, planes, stride=1, downsample=None):
            super().__init__()
            self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.relu = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.downsample = downsample

    class QuantizableBasicBlock(BasicBlock):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_relu = tnnq.FloatFunctional()

        def forward(self, x):
            identity = x
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            if self.downsample is not None:
                identity = self.downsample(x)
            return self.add_relu.add_relu(out, identity)

        def fuse_model(self):
            tq.fuse_modules_qat(self, [["conv1", "bn1", "relu"], ["conv2", "bn2"]], inplace=True)
            if self.downsample is not None:
                tq.fuse_modules_qat(self.downsample, ["0", "1"], inplace=True)

    class QuantizableResNet(nn.Module):
        def __init__(self, classes=5):
            super().__init__()
            self.conv1, self.bn1, self.relu = nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(True)
            self.maxpool = nn.MaxPool2d(2)
            down = nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False), nn.BatchNorm2d(16))
            self.layer1 = nn.Sequential(QuantizableBasicBlock(8, 8), QuantizableBasicBlock(8, 8))
            self.layer2 = nn.Sequential(QuantizableBasicBlock(8, 16, 2, down), QuantizableBasicBlock(16, 16))
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(16, classes)
            self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(self.quant(x)))))
            x = self.avgpool(self.layer2(self.layer1(x)))
            return self.dequant(self.fc(torch.flatten(x, 1)))

        def fuse_model(self):
            tq.fuse_modules_qat(self, ["conv1", "bn1", "relu"], inplace=True)
            for m in self.modules():
                if type(m) is QuantizableBasicBlock:
                    m.fuse_model()

    return QuantizableResNet()


def quantizable_mobilenet_v2():
    """A MobileNetV2-style network of torchvision's quantizable inverted residuals (``skip_add.add``)."""
    import torch.ao.nn.quantized as tnnq

    tq = ao()

    class ConvBNReLU(nn.Sequential):  # torchvision's Conv2dNormActivation, ReLU6 -> ReLU as its quantizable model
        def __init__(self, inp, oup, kernel=3, stride=1, groups=1):
            super().__init__(nn.Conv2d(inp, oup, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                             nn.BatchNorm2d(oup), nn.ReLU(inplace=False))

    class InvertedResidual(nn.Module):
        def __init__(self, inp, oup, stride, expand_ratio):
            super().__init__()
            hidden = inp * expand_ratio
            self.use_res_connect = stride == 1 and inp == oup
            layers = [ConvBNReLU(inp, hidden, kernel=1)] if expand_ratio != 1 else []
            layers += [ConvBNReLU(hidden, hidden, stride=stride, groups=hidden),
                       nn.Conv2d(hidden, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup)]
            self.conv = nn.Sequential(*layers)

    class QuantizableInvertedResidual(InvertedResidual):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.skip_add = tnnq.FloatFunctional()

        def forward(self, x):
            return self.skip_add.add(x, self.conv(x)) if self.use_res_connect else self.conv(x)

    class QuantizableMobileNetV2(nn.Module):
        def __init__(self, classes=5):
            super().__init__()
            self.features = nn.Sequential(ConvBNReLU(3, 8, stride=2), QuantizableInvertedResidual(8, 8, 1, 1),
                                          QuantizableInvertedResidual(8, 12, 2, 6),
                                          QuantizableInvertedResidual(12, 12, 1, 6), ConvBNReLU(12, 16, kernel=1))
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(16, classes))
            self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()

        def forward(self, x):
            x = self.features(self.quant(x))
            x = nn.functional.adaptive_avg_pool2d(x, (1, 1)).reshape(x.shape[0], -1)
            return self.dequant(self.classifier(x))

    return QuantizableMobileNetV2()


def mobilenet_fusion_groups(model: nn.Module) -> list[list[str]]:
    """torchvision's ``fuse_model``: every conv-bn-relu Sequential, and each residual's last conv-bn."""
    groups = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Sequential) and [type(c) for c in m] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]:
            groups.append([f"{name}.0", f"{name}.1", f"{name}.2"])
        elif name.endswith(".conv") and isinstance(m, nn.Sequential):
            groups += [[f"{name}.{i}", f"{name}.{i + 1}"] for i in range(len(m) - 1)
                       if type(m[i]) is nn.Conv2d and type(m[i + 1]) is nn.BatchNorm2d]
    return groups


def _train_both(ours: nn.Module, theirs: nn.Module, shape: tuple[int, ...], steps: int = 2) -> None:
    assert [(n, type(m).__name__) for n, m in ours.named_modules()] == \
        [(n, type(m).__name__) for n, m in theirs.named_modules()]
    assert not [type(m) for m in ours.modules() if type(m).__module__.startswith("torch.ao")]
    gen = torch.Generator().manual_seed(7)
    opt_ours, opt_theirs = sgd(ours), sgd(theirs)
    for step in range(steps):
        x, target = torch.randn(shape, generator=gen), torch.randint(0, 5, (shape[0],), generator=gen)
        assert_same_records(train_step(ours, opt_ours, x, target, seed=step),
                            train_step(theirs, opt_theirs, x, target, seed=step), f"step {step}")


@requires_ao
@pytest.mark.parametrize("key", [("fbgemm", 1), ("qnnpack", 0)])
def test_torchvision_style_quantizable_resnet_prepares_unchanged(key):
    torch.manual_seed(0)
    float_model = quantizable_resnet().train()
    randomize_bn(float_model, 0)
    models = []
    for lib in (minqat_library(key), torch_ao_library(key)):
        model = copy.deepcopy(float_model)
        model.fuse_model()  # the model's own fusion: torch.ao's fuse_modules_qat and fused containers
        model.qconfig = lib.qconfig
        models.append(lib.prepare_qat(model))
    assert type(models[0].layer2[0].add_relu).__module__ == "minqat.stubs"
    _train_both(*models, (4, 3, 12, 12))


@requires_ao
@pytest.mark.parametrize("key", [("x86", 1), ("fbgemm", 0)])
def test_mobilenet_v2_style_inverted_residuals_prepare_unchanged(key):
    torch.manual_seed(0)
    float_model = quantizable_mobilenet_v2().train()
    randomize_bn(float_model, 1)
    groups = mobilenet_fusion_groups(float_model)
    assert len(groups) == 10  # stem and head conv-bn-relu; 2 + 3 + 3 in the inverted residuals
    ours = prepare_model(float_model, groups, minqat_library(key))  # minqat's fusion of torch.ao's model
    theirs = prepare_model(float_model, groups, torch_ao_library(key))
    assert type(ours.features[1].skip_add).__module__ == "minqat.stubs"
    _train_both(ours, theirs, (4, 3, 16, 16))
