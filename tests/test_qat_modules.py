"""QAT Conv1d/2d/3d, Linear, ConvReLU and LinearReLU: bit-exact with torch.ao's QAT twins over SGD steps."""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import minqat.nn.intrinsic as mni
import minqat.nn.intrinsic.qat as mniqat
import minqat.nn.qat as mnqat
from minqat.qconfig import get_default_qat_qconfig

from .oracle import assert_bit_exact, requires_ao

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
QAT_CONV = {1: mnqat.Conv1d, 2: mnqat.Conv2d, 3: mnqat.Conv3d}
QAT_CONV_RELU = {1: mniqat.ConvReLU1d, 2: mniqat.ConvReLU2d, 3: mniqat.ConvReLU3d}
FUSED_CONV_RELU = {1: mni.ConvReLU1d, 2: mni.ConvReLU2d, 3: mni.ConvReLU3d}


@st.composite
def conv_cases(draw):
    dim = draw(st.sampled_from([1, 2, 2, 3]))
    groups = draw(st.sampled_from([1, 1, 2]))
    in_ch = groups * draw(st.integers(1, 3))
    out_ch = groups * draw(st.integers(1, 3))
    kernel = draw(st.integers(1, 3))
    stride = draw(st.integers(1, 2))
    padding = draw(st.integers(0, 1))
    dilation = draw(st.integers(1, 2))
    bias = draw(st.booleans())
    size = (kernel - 1) * dilation + draw(st.integers(1, 4))
    relu = draw(st.booleans())
    backend = draw(st.sampled_from(["fbgemm", "qnnpack"]))
    version = draw(st.sampled_from([0, 1]))
    seed = draw(st.integers(0, 2**16))
    return dim, in_ch, out_ch, kernel, stride, padding, dilation, groups, bias, size, relu, backend, version, seed


def _set_qconfig(model, qconfig):
    """Give every submodule the qconfig, as prepare's propagation does (torch's fused from_float reads
    the inner conv's qconfig)."""
    for m in model.modules():
        m.qconfig = qconfig


def _train_steps(model, batches, lr=0.1):
    """Run SGD steps; return the outputs, input grads and parameter grads of every step."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    record = []
    for x, g in batches:
        x = x.clone().requires_grad_()
        opt.zero_grad()
        y = model(x)
        y.backward(g)
        record.append((y.detach(), x.grad, [p.grad.clone() for p in model.parameters()]))
        opt.step()
    return record


def _compare_runs(ours, theirs, ours_model, theirs_model):
    for step, ((y, gx, gp), (ty, tgx, tgp)) in enumerate(zip(ours, theirs)):
        assert_bit_exact(y, ty, f"step {step} output")
        assert_bit_exact(gx, tgx, f"step {step} input grad")
        for i, (a, b) in enumerate(zip(gp, tgp)):
            assert_bit_exact(a, b, f"step {step} param {i} grad")
    ours_state, theirs_state = ours_model.state_dict(), theirs_model.state_dict()
    assert ours_state.keys() == theirs_state.keys()
    for key in ours_state:
        assert_bit_exact(ours_state[key], theirs_state[key], key)


@requires_ao
@given(conv_cases())
def test_qat_conv_matches_torch_ao(case):
    import torch.ao.nn.intrinsic as tni
    import torch.ao.nn.intrinsic.qat as tniqat
    import torch.ao.nn.qat as tnqat
    import torch.ao.quantization as tq

    dim, in_ch, out_ch, kernel, stride, padding, dilation, groups, bias, size, relu, backend, version, seed = case
    torch.manual_seed(seed)
    conv = CONV[dim](in_ch, out_ch, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias)
    ours_float = copy.deepcopy(conv)
    theirs_float = copy.deepcopy(conv)
    if relu:
        ours_float = FUSED_CONV_RELU[dim](ours_float, nn.ReLU())
        theirs_float = getattr(tni, f"ConvReLU{dim}d")(theirs_float, nn.ReLU())
        ours_cls, theirs_cls = QAT_CONV_RELU[dim], getattr(tniqat, f"ConvReLU{dim}d")
    else:
        ours_cls, theirs_cls = QAT_CONV[dim], getattr(tnqat, f"Conv{dim}d")
    _set_qconfig(ours_float, get_default_qat_qconfig(backend, version))
    _set_qconfig(theirs_float, tq.get_default_qat_qconfig(backend, version))
    ours, theirs = ours_cls.from_float(ours_float), theirs_cls.from_float(theirs_float)

    shape = (2, in_ch) + (size,) * dim
    out_shape = theirs(torch.zeros(shape)).shape  # also one observer step on both, below
    ours(torch.zeros(shape))
    batches = [(torch.randn(shape), torch.randn(out_shape)) for _ in range(3)]
    _compare_runs(_train_steps(ours, batches), _train_steps(theirs, batches), ours, theirs)


@requires_ao
@given(st.integers(1, 5), st.integers(1, 5), st.booleans(), st.booleans(), st.sampled_from(["fbgemm", "qnnpack"]),
       st.sampled_from([0, 1]), st.integers(0, 2**16))
def test_qat_linear_matches_torch_ao(in_f, out_f, bias, relu, backend, version, seed):
    import torch.ao.nn.intrinsic as tni
    import torch.ao.nn.intrinsic.qat as tniqat
    import torch.ao.nn.qat as tnqat
    import torch.ao.quantization as tq

    torch.manual_seed(seed)
    linear = nn.Linear(in_f, out_f, bias=bias)
    ours_float, theirs_float = copy.deepcopy(linear), copy.deepcopy(linear)
    if relu:
        ours_float, theirs_float = mni.LinearReLU(ours_float, nn.ReLU()), tni.LinearReLU(theirs_float, nn.ReLU())
        ours_cls, theirs_cls = mniqat.LinearReLU, tniqat.LinearReLU
    else:
        ours_cls, theirs_cls = mnqat.Linear, tnqat.Linear
    _set_qconfig(ours_float, get_default_qat_qconfig(backend, version))
    _set_qconfig(theirs_float, tq.get_default_qat_qconfig(backend, version))
    ours, theirs = ours_cls.from_float(ours_float), theirs_cls.from_float(theirs_float)
    batches = [(torch.randn(3, in_f), torch.randn(3, out_f)) for _ in range(3)]
    _compare_runs(_train_steps(ours, batches), _train_steps(theirs, batches), ours, theirs)


def test_from_float_shares_parameters_and_to_float_round_trips():
    conv = nn.Conv2d(2, 3, 3, bias=True)
    conv.qconfig = get_default_qat_qconfig("fbgemm")
    qat = mnqat.Conv2d.from_float(conv)
    assert qat.weight is conv.weight and qat.bias is conv.bias  # the optimizer keeps its parameters
    back = qat.to_float()
    assert type(back) is nn.Conv2d
    assert torch.equal(back.weight, conv.weight) and torch.equal(back.bias, conv.bias)
    fused = mni.LinearReLU(nn.Linear(3, 2), nn.ReLU())
    fused.qconfig = get_default_qat_qconfig("qnnpack")
    back = mniqat.LinearReLU.from_float(fused).to_float()
    assert type(back) is mni.LinearReLU and torch.equal(back[0].weight, fused[0].weight)


def test_relu_variant_applies_relu_after_the_conv():
    torch.manual_seed(0)
    conv = nn.Conv1d(1, 2, 1)
    fused = mni.ConvReLU1d(conv, nn.ReLU())
    fused.qconfig = get_default_qat_qconfig("fbgemm")
    qat = mniqat.ConvReLU1d.from_float(fused)
    qat.weight_fake_quant.disable_fake_quant()
    x = torch.randn(2, 1, 5)
    assert torch.equal(qat(x), torch.relu(conv(x)))


def test_missing_qconfig_is_a_clear_error():
    with pytest.raises(ValueError, match="qconfig must be provided for the QAT module Conv2d"):
        mnqat.Conv2d(1, 1, 1)
    with pytest.raises(ValueError, match=r"qconfig must be provided for the QAT module Linear \(from Linear.qconfig\)"):
        mnqat.Linear.from_float(nn.Linear(2, 2))


def test_from_float_rejects_the_wrong_module_type():
    with pytest.raises(ValueError, match="Conv2d.from_float expects Conv2d, got Conv1d"):
        mnqat.Conv2d.from_float(nn.Conv1d(1, 1, 1))
    with pytest.raises(ValueError, match="ConvReLU2d.from_float expects ConvReLU2d, got Conv2d"):
        mniqat.ConvReLU2d.from_float(nn.Conv2d(1, 1, 1))
