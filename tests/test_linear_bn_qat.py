"""Fused QAT Linear-BN (minqat.nn.intrinsic.qat.linear_bn.LinearBn1d).

1. Parity with torch.ao.nn.intrinsic.qat.LinearBn1d over SGD steps in train mode, after
   freeze_bn_stats, in eval mode and after disable_observer: bit-exact outputs, gradients, state.
2. Fused equals unfused (linear -> bn) in float64 without torch.ao, with identity weight fake quant.
3. Properties, to_float, from_float sharing, bad input; golden vectors replayed without torch.ao.
"""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import minqat.fake_quantize as mfq
import minqat.nn.intrinsic as mni
from minqat.fold import fuse_linear_bn_weights
from minqat.nn.intrinsic.qat.linear_bn import LinearBn1d
from minqat.qconfig import get_default_qat_qconfig
from tests.oracle import assert_bit_exact, requires_ao
from tests.test_conv_bn_qat import (
    FLOAT64_TOL,
    IDENTITY_QCONFIG,
    QCONFIGS,
    _normwise_error,
    assert_steps_bit_exact,
    batches,
    load_golden,
    replay_golden_case,
    run_step,
)


def float_parts(cin, cout, bias=True, eps=1e-5, momentum=0.1, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    linear = nn.Linear(cin, cout, bias=bias)
    bn = nn.BatchNorm1d(cout, eps=eps, momentum=momentum)
    with torch.no_grad():
        bn.weight.copy_((torch.rand(cout) + 0.5) * torch.where(torch.rand(cout) < 0.2, -1.0, 1.0))
        bn.bias.uniform_(-1, 1)
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.num_batches_tracked.fill_(3)
    return linear.to(dtype), bn.to(dtype)


def container(family, linear, bn, qconfig):
    mod = family.LinearBn1d(copy.deepcopy(linear), copy.deepcopy(bn))
    mod.qconfig = qconfig
    return mod


@requires_ao
@given(cin=st.integers(1, 6), cout=st.integers(1, 6), bias=st.booleans(),
       eps=st.sampled_from([1e-5, 1e-3, 0.1]), momentum=st.sampled_from([0.1, None, 1.0, 0.0]),
       qconfig=st.sampled_from(QCONFIGS), batch=st.integers(2, 5), seed=st.integers(0, 2**16))
def test_parity_with_torch_ao_over_training(cin, cout, bias, eps, momentum, qconfig, batch, seed):
    import torch.ao.nn.intrinsic as nni
    import torch.ao.nn.intrinsic.qat as nniqat
    import torch.ao.quantization as tq

    linear, bn = float_parts(cin, cout, bias, eps, momentum, seed)
    theirs = nniqat.LinearBn1d.from_float(container(nni, linear, bn, tq.get_default_qat_qconfig(*qconfig)))
    ours = LinearBn1d.from_float(container(mni, linear, bn, get_default_qat_qconfig(*qconfig)))
    opt_o, opt_t = torch.optim.SGD(ours.parameters(), 0.05), torch.optim.SGD(theirs.parameters(), 0.05)
    xs = batches((batch, cin), seed, 8)
    for step, x in enumerate(xs):
        if step == 3:
            ours.freeze_bn_stats(), theirs.freeze_bn_stats()
        if step == 5:
            ours.eval(), theirs.eval()
        if step == 6:
            ours.train(), theirs.train()
            ours.update_bn_stats(), theirs.update_bn_stats()
            ours.apply(mfq.disable_observer), theirs.apply(tq.disable_observer)
        assert [m.training for m in ours.modules()] == [m.training for m in theirs.modules()]
        assert_steps_bit_exact(run_step(ours, opt_o, x, step), run_step(theirs, opt_t, x, step), f"step {step}")


@requires_ao
@pytest.mark.parametrize("bias", [False, True])
def test_construction_to_float_and_state_dict_match_torch_ao(bias):
    import torch.ao.nn.intrinsic.qat as nniqat
    import torch.ao.quantization as tq

    torch.manual_seed(3)
    theirs = nniqat.LinearBn1d(3, 4, bias=bias, momentum=None, qconfig=tq.get_default_qat_qconfig("fbgemm"))
    torch.manual_seed(3)
    ours = LinearBn1d(3, 4, bias=bias, momentum=None, qconfig=get_default_qat_qconfig("fbgemm"))
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for k, v in theirs.state_dict().items():
        if k != "bias":  # torch.ao's bias is torch.empty (uninitialised); the random draws are the same
            assert_bit_exact(ours.state_dict()[k], v, k)
    assert repr(ours.bn) == repr(theirs.bn)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = batches((4, 3), 0, 1)[0]
    for step in range(2):
        assert_steps_bit_exact(run_step(ours, torch.optim.SGD(ours.parameters(), 0.1), x, step),
                               run_step(theirs, torch.optim.SGD(theirs.parameters(), 0.1), x, step), "after load")
    f_ours, f_theirs = ours.to_float(), theirs.to_float()
    assert type(f_ours) is type(f_theirs) is nn.Linear
    for name in ("weight", "bias"):
        assert getattr(f_ours, name).requires_grad == getattr(f_theirs, name).requires_grad
        assert_bit_exact(getattr(f_ours, name), getattr(f_theirs, name), name)


@given(bias=st.booleans(), momentum=st.sampled_from([0.1, None]), seed=st.integers(0, 2**16))
def test_fused_equals_unfused_float64(bias, momentum, seed):
    linear, bn = float_parts(3, 4, bias, momentum=momentum, seed=seed, dtype=torch.float64)
    fused = LinearBn1d.from_float(container(mni, linear, bn, IDENTITY_QCONFIG))
    chain = nn.Sequential(copy.deepcopy(linear), copy.deepcopy(bn))
    opt_f, opt_c = torch.optim.SGD(fused.parameters(), 0.1), torch.optim.SGD(chain.parameters(), 0.1)
    names = {"0.weight": "weight", "0.bias": "bias", "1.weight": "bn.weight", "1.bias": "bn.bias"}
    for step, x in enumerate(batches((5, 3), seed, 6, torch.float64)):
        if step == 3:
            fused.freeze_bn_stats(), chain[1].eval()
        if step == 5:
            fused.eval(), chain.eval()
        y, gx, grads, state = run_step(fused, opt_f, x, step)
        cy, cgx, cgrads, cstate = run_step(chain, opt_c, x, step)
        pairs = [("output", y, cy), ("input grad", gx, cgx)]
        pairs += [(f"grad {names[k]}", grads[names[k]], g) for k, g in cgrads.items()]
        pairs += [(k, state["bn." + k[2:]], v) for k, v in cstate.items() if k.startswith("1.running")]
        for what, a, b in pairs:
            assert _normwise_error(a, b) <= FLOAT64_TOL, f"step {step} {what}: {_normwise_error(a, b)}"


def test_from_float_shares_state_and_to_float_folds():
    linear, bn = float_parts(2, 3, bias=False, momentum=None, eps=1e-3, seed=1)
    mod = container(mni, linear, bn, get_default_qat_qconfig("qnnpack"))
    qat = LinearBn1d.from_float(mod)
    assert qat.weight is mod[0].weight and qat.bias is None
    assert qat.bn.weight is mod[1].weight and qat.bn.running_mean is mod[1].running_mean
    assert qat.bn.num_batches_tracked is mod[1].num_batches_tracked
    assert (qat.bn.eps, qat.bn.momentum, qat.in_features, qat.out_features) == (1e-3, None, 2, 3)
    qat(torch.randn(4, 2))
    assert int(mod[1].num_batches_tracked) == 4
    out = qat.to_float()
    want_w, want_b = fuse_linear_bn_weights(mod[0].weight, None, mod[1].running_mean, mod[1].running_var, 1e-3,
                                            mod[1].weight, mod[1].bias)
    assert_bit_exact(out.weight, want_w, "weight")
    assert_bit_exact(out.bias, want_b, "bias")
    x = torch.randn(3, 2)
    qat.eval().apply(mfq.disable_fake_quant)
    torch.testing.assert_close(out(x), qat(x), rtol=1e-5, atol=1e-5)  # rsqrt vs sqrt: ulp-level only


def test_float64_without_bias_works():
    """torch.ao's zero bias is float32 without a linear bias (its module fails on float64); minqat's
    takes the input's dtype."""
    linear, bn = float_parts(2, 2, bias=False, dtype=torch.float64)
    qat = LinearBn1d.from_float(container(mni, linear, bn, IDENTITY_QCONFIG))
    assert qat(torch.randn(3, 2, dtype=torch.float64)).dtype == torch.float64


def test_train_and_freeze_semantics():
    m = LinearBn1d(2, 2, qconfig=get_default_qat_qconfig("fbgemm"))
    assert (m.freeze_bn, m.bn.training) == (False, True)
    m.freeze_bn_stats()
    m.eval(), m.train()
    assert m.training and not m.bn.training
    m.update_bn_stats()
    assert m.bn.training
    assert LinearBn1d(2, 2, freeze_bn=True, qconfig=get_default_qat_qconfig("fbgemm")).bn.training is False


def test_bad_input():
    with pytest.raises(ValueError, match="qconfig must be provided for the QAT module LinearBn1d, got None"):
        LinearBn1d(2, 2)
    linear, bn = float_parts(2, 3)
    with pytest.raises(ValueError, match=r"from_float expects a LinearBn1d \(Linear, BatchNorm1d\), got Linear"):
        LinearBn1d.from_float(linear)
    with pytest.raises(ValueError, match="qconfig must be provided .* \\(from mod.qconfig\\), got None"):
        LinearBn1d.from_float(container(mni, linear, bn, None))
    for kwargs, match in [({"affine": False}, " must have affine=True"),
                          ({"track_running_stats": False}, " must have track_running_stats=True"),
                          ({"num_features": 2}, ".num_features must equal the linear's out_features \\(3\\), got 2")]:
        bad_bn = nn.BatchNorm1d(**{"num_features": 3, **kwargs})
        with pytest.raises(ValueError, match="LinearBn1d.from_float: mod\\[1\\]" + match):
            LinearBn1d.from_float(container(mni, linear, bad_bn, get_default_qat_qconfig("fbgemm")))


def _build_linear_bn(case):
    return LinearBn1d(case["cin"], case["cout"], bias=case["bias"], momentum=case["momentum"],
                      qconfig=get_default_qat_qconfig(case["backend"], case["version"]))


def test_golden_vectors():
    cases, exact = load_golden("linear_bn")
    assert len(cases) >= 2
    for case in cases:
        replay_golden_case(case, _build_linear_bn, exact)
