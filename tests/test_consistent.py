"""convert(..., consistent=True) and the layer-by-layer LSB report (minqat.consistent, minqat.report).

Claims, over generated models (tests/test_convert.py's chains: conv / conv-BN / conv-BN-ReLU, dense, grouped
and depthwise, residual add / add_relu / mul / cat blocks, linear / linear-ReLU / linear-BN heads) under every
QAT qconfig of the parity tests, trained a few SGD steps with minqat, then put in eval mode and run once:

1. weight codes identical: every int8 conv / linear weight dequantizes bit for bit to the fake-quantized
   weight its QAT module produced in that last eval forward (recorded by a hook on ``weight_fake_quant``,
   independently of minqat.consistent), and the int8 qparams equal the fake quants' buffers;
2. each layer's int8 output (Quantize, convs, linears, QFunctional ops) is within 1 LSB of its fake-quant
   layer given the same input (``compare_layers(isolated=True)``: the fake-quant layer is fed the int8
   layer's input, dequantized). The bound is the claim; measured, it is most often 0 (differences appear
   only where the float32 result lies within rounding of a .5 boundary);
3. the default convert (torch.ao's) is measured with the same report: it exceeds 1 LSB on these models
   (the reason consistent mode exists), and the report names the first such layer.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import minqat
from minqat.report import compare_layers
from tests.test_convert import MINQAT_PARTS, QM2, ChainNet, ResNet, chain_specs
from tests.test_quantized_modules import QCONFIG_NAMES, qconfig, randomize_bn

SHAPES = {"qm2": (4, 1, 5, 5), "resnet": (2, 3, 8, 8)}


def trained_prepared(float_model: nn.Module, qconfig_name: str, input_shape, classes: int, seed: int,
                     steps: int = 3) -> nn.Module:
    """minqat's fuse_modules_qat + prepare_qat + ``steps`` SGD steps; returned in train mode."""
    model = copy.deepcopy(float_model)
    model.qconfig = qconfig(minqat, qconfig_name)
    if float_model.groups():
        model = minqat.fuse_modules_qat(model, float_model.groups())
    model = minqat.prepare_qat(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(input_shape, generator=gen)
        y = model(x)
        target = torch.randint(0, classes, (input_shape[0],), generator=gen)
        loss = F.cross_entropy(y, target) if y.dim() == 2 else F.mse_loss(y, 2.0 * x + 1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def last_eval_forward(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Run ``model.eval()`` on ``x``; return each QAT module's fake-quantized weight of that forward."""
    weights, handles = {}, []
    for name, module in model.named_modules():
        if hasattr(module, "weight_fake_quant"):
            hook = (lambda n: lambda m, args, out: weights.__setitem__(n, out.detach().clone()))(name)
            handles.append(module.weight_fake_quant.register_forward_hook(hook))
    with torch.no_grad():
        model.eval()(x)
    for h in handles:
        h.remove()
    return weights


def build(spec_or_name, seed: int):
    torch.manual_seed(seed)
    if spec_or_name == "qm2":
        model, shape, classes = QM2(MINQAT_PARTS), SHAPES["qm2"], 1
    elif spec_or_name == "resnet":
        model, shape, classes = ResNet(MINQAT_PARTS), SHAPES["resnet"], 10
    else:
        spec = spec_or_name
        model, shape, classes = ChainNet(spec, MINQAT_PARTS), (3, spec.cin, spec.size, spec.size), spec.classes
    randomize_bn(model, torch.Generator().manual_seed(seed))
    return model.train(), shape, classes


def check_consistent(spec_or_name, qconfig_name: str, seed: int, observers_on: bool = True):
    float_model, shape, classes = build(spec_or_name, seed)
    prepared = trained_prepared(float_model, qconfig_name, shape, classes, seed)
    if not observers_on:
        prepared.apply(minqat.disable_observer)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1))
    fq_weights = last_eval_forward(prepared, x)
    int8 = minqat.convert(prepared, consistent=True)

    # 1. weight codes and qparams are the ones the fake quants used
    int8_modules = dict(int8.named_modules())
    prepared_modules = dict(prepared.named_modules())
    for name, w_hat in fq_weights.items():
        layer = int8_modules[name]
        assert torch.equal(layer.weight().dequantize(), w_hat), f"{name}: weight codes differ from training"
        fq = prepared_modules[name].weight_fake_quant
        assert torch.equal(layer.weight_scale.reshape(-1), fq.scale.reshape(-1)), name
        assert torch.equal(layer.weight_zero_point.reshape(-1), fq.zero_point.long().reshape(-1)), name
        out_fq = prepared_modules[name].activation_post_process
        assert (layer.scale, layer.zero_point) == (float(out_fq.scale), int(out_fq.zero_point)), name

    # 2. every layer within 1 LSB of its fake-quant twin, given the same input
    report = compare_layers(prepared, int8, x)
    assert report.layers, "no layer compared"
    for row in report.layers:
        assert row.max_lsb <= 1.0, f"{row} exceeds 1 LSB\n{report}"
    return prepared, x, report


@given(spec=chain_specs(), qconfig_name=st.sampled_from(QCONFIG_NAMES), observers_on=st.booleans(),
       seed=st.integers(0, 2**16))
def test_consistent_mode_deploys_the_training_codes_within_one_lsb(spec, qconfig_name, observers_on, seed):
    check_consistent(spec, qconfig_name, seed, observers_on)


@pytest.mark.parametrize("name, qconfig_name", [("qm2", "fbgemm-v1"), ("resnet", "fbgemm-v1"), ("resnet", "x86-v1"),
                                                ("resnet", "per-tensor")])
def test_consistent_mode_on_tutorial_and_resnet(name, qconfig_name):
    check_consistent(name, qconfig_name, seed=3)


def test_default_convert_drifts_and_the_report_names_the_first_layer():
    """torch.ao's convert on the ResNet: measured several LSB per layer (the report names where it starts)."""
    float_model, shape, classes = build("resnet", 5)
    prepared = trained_prepared(float_model, "fbgemm-v1", shape, classes, 5, steps=5)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(6))
    last_eval_forward(prepared, x)
    default = compare_layers(prepared, minqat.convert(prepared), x)
    consistent = compare_layers(prepared, minqat.convert(prepared, consistent=True), x)
    first = default.first_over(1.0)
    assert first is not None and first.name == next(r.name for r in default.layers if r.max_lsb > 1.0)
    assert default.max_lsb > 1.0 >= consistent.max_lsb
    assert "max LSB" in str(default) and first.name in str(default)
    assert consistent.first_over(2.0) is None


def test_end_to_end_report_runs_the_int8_model_as_deployed():
    prepared, x, isolated = check_consistent("resnet", "fbgemm-v1", seed=7)
    end_to_end = compare_layers(prepared, minqat.convert(prepared, consistent=True), x, isolated=False)
    assert [r.name for r in end_to_end.layers] == [r.name for r in isolated.layers]
    assert end_to_end.max_lsb >= isolated.layers[0].max_lsb


def test_convert_does_not_touch_the_prepared_model_in_consistent_mode():
    float_model, shape, classes = build("resnet", 9)
    prepared = trained_prepared(float_model, "fbgemm-v1", shape, classes, 9).eval()
    before = copy.deepcopy(prepared.state_dict())
    minqat.convert(prepared, consistent=True)
    after = prepared.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


# --- bad input -----------------------------------------------------------------------------------------
def test_consistent_mode_needs_eval_mode():
    float_model, shape, classes = build("qm2", 0)
    prepared = trained_prepared(float_model, "fbgemm-v1", shape, classes, 0)
    with pytest.raises(ValueError, match=r"consistent=True\) needs the model in eval mode"):
        minqat.convert(prepared, consistent=True)


def test_consistent_mode_refuses_disabled_fake_quant():
    float_model, shape, classes = build("qm2", 0)
    prepared = trained_prepared(float_model, "fbgemm-v1", shape, classes, 0).eval()
    prepared.conv.weight_fake_quant.disable_fake_quant()
    with pytest.raises(ValueError, match=r"'conv'.*fake quantization disabled"):
        minqat.convert(prepared, consistent=True)


def test_report_rejects_models_in_the_wrong_roles():
    float_model, shape, classes = build("qm2", 0)
    prepared = trained_prepared(float_model, "fbgemm-v1", shape, classes, 0).eval()
    int8 = minqat.convert(prepared)
    x = torch.randn(shape)
    with pytest.raises(ValueError, match="prepared must be a model prepared for QAT.*no fake quant"):
        compare_layers(int8, int8, x)
    with pytest.raises(ValueError, match="int8_model must be the converted model"):
        compare_layers(prepared, prepared, x)


def test_output_range_survives_a_state_dict_round_trip():
    float_model, shape, classes = build("resnet", 11)
    prepared = trained_prepared(float_model, "fbgemm-v1", shape, classes, 11).eval()
    consistent = minqat.convert(prepared, consistent=True)
    assert consistent.conv1.output_range == (0, 127) and consistent.quant.output_range == (0, 127)
    fresh = minqat.convert(prepared)  # default mode: no output_range
    assert fresh.conv1.output_range is None
    fresh.load_state_dict(consistent.state_dict(), strict=True)
    assert fresh.conv1.output_range == (0, 127) and fresh.layer1.skip.output_range == (0, 127)
    x = torch.randn(shape) * 3  # beyond the observed range: clamped at 127 like the fake quants
    assert torch.equal(fresh(x), consistent(x))


def test_report_rejects_training_mode_and_post_training_quantization():
    float_model, shape, classes = build("qm2", 0)
    prepared = trained_prepared(float_model, "fbgemm-v1", shape, classes, 0)
    x = torch.randn(shape)
    with pytest.raises(ValueError, match=r"prepared must be in eval mode"):
        compare_layers(prepared, minqat.convert(prepared), x)
    ptq = post_training_prepared()
    with pytest.raises(ValueError, match="observers only"):
        compare_layers(ptq, minqat.convert(ptq), torch.randn(2, 2, 5, 5))


def post_training_prepared() -> nn.Module:
    torch.manual_seed(0)
    model = minqat.QuantWrapper(nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU())).eval()
    model.qconfig = minqat.get_default_qconfig("fbgemm")
    model = minqat.prepare(minqat.fuse_modules(model, [["module.0", "module.1"]]))
    for _ in range(3):
        model(torch.randn(4, 2, 5, 5))
    return model


def test_post_training_quantization_converts_the_same_in_both_modes():
    """Observers only: nothing was trained, so consistent mode is the default convert, module for module."""
    prepared = post_training_prepared()
    default, consistent = minqat.convert(prepared), minqat.convert(prepared, consistent=True)
    assert default.state_dict().keys() == consistent.state_dict().keys()
    assert all(torch.equal(v, consistent.state_dict()[k]) for k, v in default.state_dict().items())
    assert consistent.quant.output_range is None
    x = torch.randn(3, 2, 5, 5)
    assert torch.equal(default(x), consistent(x))


def test_matmul_clamps_to_the_fake_quant_range():
    """FloatFunctional.matmul is fake-quantized in training, so its int8 twin clamps where training clamped."""

    class MatMul(nn.Module):
        def __init__(self):
            super().__init__()
            self.quant, self.dequant, self.f = minqat.QuantStub(), minqat.DeQuantStub(), minqat.FloatFunctional()

        def forward(self, x):
            x = self.quant(x)
            return self.dequant(self.f.matmul(x, x))

    model = MatMul()
    model.qconfig = minqat.get_default_qat_qconfig("fbgemm")
    model = minqat.prepare_qat(model.train())
    model(torch.randn(4, 4) * 0.5)
    model.eval()(torch.randn(4, 4) * 0.5)
    int8 = minqat.convert(model, consistent=True)
    assert int8.f.output_range == (0, 127)
    report = compare_layers(model, int8, torch.randn(4, 4) * 2)  # well beyond the observed range
    assert report.max_lsb <= 1.0, str(report)


def test_isolated_and_end_to_end_reports_skip_unobserved_scalar_ops():
    class Scalar(nn.Module):
        def __init__(self):
            super().__init__()
            self.quant, self.dequant, self.f = minqat.QuantStub(), minqat.DeQuantStub(), minqat.FloatFunctional()
            self.conv = nn.Conv2d(1, 1, 1)

        def forward(self, x):
            y = self.f.add_scalar(self.quant(x), 0.5)
            return self.dequant(self.f.add(self.conv(y), y))

    model = Scalar()
    model.qconfig = minqat.get_default_qat_qconfig("fbgemm")
    model = minqat.prepare_qat(model.train())
    for _ in range(2):
        model(torch.randn(2, 1, 3, 3))
    x = torch.randn(2, 1, 3, 3)
    model.eval()(x)
    int8 = minqat.convert(model, consistent=True)
    for isolated in (True, False):
        report = compare_layers(model, int8, x, isolated=isolated)
        assert [r.name for r in report.layers] == ["quant", "conv", "f"]
        assert report.max_lsb <= 1.0, str(report)


def test_consistent_mode_refuses_a_submodule_left_in_training_mode():
    float_model, shape, classes = build("qm2", 0)
    prepared = trained_prepared(float_model, "fbgemm-v1", shape, classes, 0).eval()
    prepared.conv.train()
    with pytest.raises(ValueError, match=r"'conv' is in training mode"):
        minqat.convert(prepared, consistent=True)


def test_consistent_mode_refuses_an_unknown_int8_class():
    class MyConv(minqat.nn.quantized.Conv2d):
        pass

    float_model, shape, classes = build("qm2", 0)
    prepared = trained_prepared(float_model, "fbgemm-v1", shape, classes, 0).eval()
    mapping = minqat.get_convert_module_mapping()
    mapping[type(prepared.conv)] = nn.Identity
    with pytest.raises(ValueError, match=r"does not know how to build Identity for 'conv'"):
        minqat.convert(prepared, mapping=mapping, consistent=True)


class OffGridFakeQuantize(minqat.FakeQuantize):
    """A custom fake quant whose output is not on its own grid (it does not quantize at all)."""

    def _fake_quantize(self, x):
        return x


class UnclampedFakeQuantize(minqat.FakeQuantize):
    """A custom fake quant that rounds onto its grid but never clamps: codes may leave int8."""

    def _fake_quantize(self, x):
        return torch.round(x / self.scale.reshape(-1, 1, 1, 1)) * self.scale.reshape(-1, 1, 1, 1)


@pytest.mark.parametrize("fake_quant, message", [(OffGridFakeQuantize, "not on its own grid"),
                                                 (UnclampedFakeQuantize, r"weight codes must fit int8 \[-128, 127\]")])
def test_consistent_mode_refuses_weights_it_cannot_deploy_exactly(fake_quant, message):
    torch.manual_seed(0)
    model = QM2(MINQAT_PARTS)
    default = minqat.get_default_qat_qconfig("fbgemm")
    weight = fake_quant.with_args(observer=minqat.MovingAveragePerChannelMinMaxObserver, quant_min=-128,
                                  quant_max=127, dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    model.qconfig = minqat.QConfig(activation=default.activation, weight=weight)
    model = minqat.prepare_qat(minqat.fuse_modules_qat(model.train(), model.groups()))
    model(torch.randn(4, 1, 5, 5))
    model.eval()(torch.randn(4, 1, 5, 5))
    if fake_quant is UnclampedFakeQuantize:
        model.conv.weight_fake_quant.scale.fill_(1e-7)  # tiny scale: |W| / s far beyond 127
        model.apply(minqat.disable_observer)
    with pytest.raises(ValueError, match=message):
        minqat.convert(model, consistent=True)
