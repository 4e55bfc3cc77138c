"""Fused QAT Conv-BN(-ReLU) 1d/2d/3d (minqat.nn.intrinsic.qat.conv_bn).

1. Parity with torch.ao.nn.intrinsic.qat (hypothesis over dims, channels, groups incl. depthwise,
   kernel, stride, padding, dilation, padding mode, bias, eps, momentum incl. None, qconfigs fbgemm
   v0/v1 and qnnpack v0/v1, approximate and slow path): from identical float weights and the same
   batches, SGD steps in train mode, after freeze_bn_stats, in eval mode and after disable_observer
   give BIT-EXACT outputs, input and parameter gradients and state dicts (BN running stats, every
   fake-quant buffer). Also: construction, from_float of torch.ao's containers, to_float, and
   state dicts loading across the two libraries mid-training.
2. Fused equals unfused in float64 without torch.ao: with identity weight fake quant the fused
   module reproduces conv -> bn (-> relu) over several SGD steps, both paths.
3. Properties: γ = 0 stays finite on the slow path; no host synchronisation in forward; the
   train()/freeze semantics; sharing in from_float; deepcopy / pickle; bad-input messages.
4. Golden vectors recorded from torch.ao (tests/golden/make_conv_bn.py), replayed without it.
"""
from __future__ import annotations

import copy
import pickle
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import minqat.fake_quantize as mfq
import minqat.nn.intrinsic as mni
from minqat.fold import fuse_conv_bn_weights
from minqat.nn.intrinsic.qat import conv_bn
from minqat.qconfig import QConfig, get_default_qat_qconfig
from tests.oracle import assert_bit_exact, requires_ao

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
QAT = {(1, False): conv_bn.ConvBn1d, (2, False): conv_bn.ConvBn2d, (3, False): conv_bn.ConvBn3d,
       (1, True): conv_bn.ConvBnReLU1d, (2, True): conv_bn.ConvBnReLU2d, (3, True): conv_bn.ConvBnReLU3d}
QCONFIGS = [("fbgemm", 0), ("fbgemm", 1), ("qnnpack", 0), ("qnnpack", 1)]
IDENTITY_QCONFIG = QConfig(activation=nn.Identity, weight=nn.Identity)


def float_parts(dim, cin, cout, kernel, stride=1, padding=0, dilation=1, groups=1, bias=True,
                padding_mode="zeros", eps=1e-5, momentum=0.1, seed=0, dtype=torch.float32, gamma_zero=()):
    """A float conv and BN with non-trivial γ, β and running statistics."""
    torch.manual_seed(seed)
    conv = CONV[dim](cin, cout, kernel, stride, padding, dilation, groups, bias, padding_mode)
    bn = BN[dim](cout, eps=eps, momentum=momentum)
    with torch.no_grad():
        sign = torch.where(torch.rand(cout) < 0.2, -1.0, 1.0)
        bn.weight.copy_((torch.rand(cout) + 0.5) * sign)  # γ away from 0 (the approximate path divides)
        bn.weight[list(gamma_zero)] = 0.0
        bn.bias.uniform_(-1, 1)
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.num_batches_tracked.fill_(3)
    return conv.to(dtype), bn.to(dtype)


def container(family, dim, relu, conv, bn, qconfig):
    """A float fused container of minqat (family=mni) or torch.ao (family=nni), with copies of the parts."""
    name = f"ConvBn{'ReLU' if relu else ''}{dim}d"
    parts = [copy.deepcopy(conv), copy.deepcopy(bn)] + ([nn.ReLU()] if relu else [])
    mod = getattr(family, name)(*parts)
    mod.qconfig = qconfig
    return mod


def batches(in_shape, seed, n, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(in_shape, generator=gen, dtype=dtype) for _ in range(n)]


def run_step(model, opt, x, seed):
    """Forward, backward with a fixed random output gradient, SGD step; returns what to compare."""
    x = x.clone().requires_grad_()
    y = model(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
    opt.zero_grad()
    y.backward(g)
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    opt.step()
    return y.detach(), x.grad, grads, {k: v.clone() for k, v in model.state_dict().items()}


def assert_steps_bit_exact(ours, theirs, what):
    (y, gx, grads, state), (ty, tgx, tgrads, tstate) = ours, theirs
    assert_bit_exact(y, ty, f"{what} output")
    assert_bit_exact(gx, tgx, f"{what} input grad")
    assert grads.keys() == tgrads.keys(), f"{what}: parameters {sorted(grads)} != {sorted(tgrads)}"
    for k in grads:
        assert_bit_exact(grads[k], tgrads[k], f"{what} grad {k}")
    assert state.keys() == tstate.keys(), f"{what}: state keys differ: {set(state) ^ set(tstate)}"
    for k in state:
        assert_bit_exact(state[k], tstate[k], f"{what} state {k}")


def run_parity_phases(ours, theirs, xs, ao_freeze, ao_update, ao_disable_observer, our_freeze, our_update):
    """train ×3 -> freeze_bn_stats ×2 -> eval ×1 -> train with BN updating, observers off ×2."""
    opt_o = torch.optim.SGD(ours.parameters(), lr=0.05)
    opt_t = torch.optim.SGD(theirs.parameters(), lr=0.05)
    phases = ["train"] * 3 + ["freeze_bn"] * 2 + ["eval"] + ["disable_observer"] * 2
    for step, (phase, x) in enumerate(zip(phases, xs)):
        if phase != phases[step - 1] or step == 0:
            if phase == "freeze_bn":
                ours.apply(our_freeze), theirs.apply(ao_freeze)
            elif phase == "eval":
                ours.eval(), theirs.eval()
            elif phase == "disable_observer":
                ours.train(), theirs.train()
                ours.apply(our_update), theirs.apply(ao_update)
                ours.apply(mfq.disable_observer), theirs.apply(ao_disable_observer)
        flags = [(n, m.training) for n, m in ours.named_modules()]
        assert flags == [(n, m.training) for n, m in theirs.named_modules()], f"training flags in {phase}"
        assert_steps_bit_exact(run_step(ours, opt_o, x, step), run_step(theirs, opt_t, x, step), f"{phase} #{step}")


# --- 1. parity with torch.ao --------------------------------------------------------------------


@st.composite
def conv_bn_cases(draw):
    dim = draw(st.sampled_from([1, 2, 2, 3]))
    kind = draw(st.sampled_from(["one", "depthwise", "grouped"]))
    if kind == "one":
        groups, cin, cout = 1, draw(st.integers(1, 3)), draw(st.integers(1, 4))
    elif kind == "depthwise":
        cin = draw(st.integers(1, 3))
        groups, cout = cin, cin * draw(st.integers(1, 2))
    else:
        groups = draw(st.integers(2, 3))
        cin, cout = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    kernel = draw(st.integers(1, 2 if dim == 3 else 3))
    dilation = draw(st.integers(1, 2))
    padding = draw(st.integers(0, 2))
    padding_mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "circular"]))
    low = max((kernel - 1) * dilation + 1 - 2 * padding, padding + 1, 1)
    size = draw(st.integers(low, low + (1 if dim == 3 else 3)))
    return dict(
        dim=dim, cin=cin, cout=cout, kernel=kernel, stride=draw(st.integers(1, 2)), padding=padding,
        dilation=dilation, groups=groups, bias=draw(st.booleans()), padding_mode=padding_mode,
        eps=draw(st.sampled_from([1e-5, 1e-3, 0.1, 2.0**-20])),
        momentum=draw(st.sampled_from([0.1, 0.5, None, 1.0, 0.0])), seed=draw(st.integers(0, 2**16)),
    ), size


@requires_ao
@given(case=conv_bn_cases(), relu=st.booleans(), qconfig=st.sampled_from(QCONFIGS), slow=st.booleans())
def test_parity_with_torch_ao_over_training(case, relu, qconfig, slow):
    import torch.ao.nn.intrinsic as nni
    import torch.ao.nn.intrinsic.qat as nniqat
    import torch.ao.quantization as tq

    args, size = case
    dim = args["dim"]
    conv, bn = float_parts(**args)
    theirs_float = container(nni, dim, relu, conv, bn, tq.get_default_qat_qconfig(*qconfig))
    ours_float = container(mni, dim, relu, conv, bn, get_default_qat_qconfig(*qconfig))
    theirs = getattr(nniqat, type(theirs_float).__name__).from_float(theirs_float)
    ours = QAT[dim, relu].from_float(ours_float)
    theirs._enable_slow_path_for_better_numerical_stability = slow
    ours.slow_path = slow
    xs = batches((2, args["cin"]) + (size,) * dim, args["seed"], 8)
    run_parity_phases(ours, theirs, xs, nniqat.freeze_bn_stats, nniqat.update_bn_stats, tq.disable_observer,
                      conv_bn.freeze_bn_stats, conv_bn.update_bn_stats)


@requires_ao
@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("bias", [False, True])
def test_construction_matches_torch_ao_for_the_same_seed(dim, bias):
    import torch.ao.nn.intrinsic.qat as nniqat
    import torch.ao.quantization as tq

    torch.manual_seed(7)
    theirs = getattr(nniqat, f"ConvBnReLU{dim}d")(2, 4, 3, bias=bias, momentum=None, freeze_bn=True,
                                                   qconfig=tq.get_default_qat_qconfig("fbgemm"))
    torch.manual_seed(7)
    ours = QAT[dim, True](2, 4, 3, bias=bias, momentum=None, freeze_bn=True,
                          qconfig=get_default_qat_qconfig("fbgemm"))
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for k, v in theirs.state_dict().items():
        assert_bit_exact(ours.state_dict()[k], v, k)
    assert (ours.freeze_bn, ours.bn.training, ours.bn.momentum) == (True, False, None)
    assert repr(ours.bn) == repr(theirs.bn)
    assert (ours.kernel_size, ours.stride, ours.padding) == (theirs.kernel_size, theirs.stride, theirs.padding)


@requires_ao
@pytest.mark.parametrize("relu", [False, True])
def test_from_float_accepts_torch_ao_containers_and_to_float_matches(relu):
    import torch.ao.nn.intrinsic as nni
    import torch.ao.nn.intrinsic.qat as nniqat
    import torch.ao.quantization as tq

    conv, bn = float_parts(2, 2, 3, 3, momentum=None, seed=3)
    theirs = getattr(nniqat, f"ConvBn{'ReLU' if relu else ''}2d").from_float(
        container(nni, 2, relu, conv, bn, tq.get_default_qat_qconfig("fbgemm")))
    ao_float = container(nni, 2, relu, conv, bn, get_default_qat_qconfig("fbgemm"))
    ours = QAT[2, relu].from_float(ao_float)  # torch.ao's container, minqat's qconfig
    assert ours.weight is ao_float[0].weight and ours.bn.running_var is ao_float[1].running_var
    xs = batches((3, 2, 5, 5), 0, 2)
    for step, x in enumerate(xs):  # train a little so the running stats move
        assert_steps_bit_exact(run_step(ours, torch.optim.SGD(ours.parameters(), 0.1), x, step),
                               run_step(theirs, torch.optim.SGD(theirs.parameters(), 0.1), x, step), "train")
    ours.eval(), theirs.eval()
    f_ours, f_theirs = ours.to_float(), theirs.to_float()
    assert [type(m).__name__ for m in f_ours.modules()] == [type(m).__name__ for m in f_theirs.modules()]
    for (k, v), (tk, tv) in zip(f_ours.named_parameters(), f_theirs.named_parameters()):
        assert k == tk and v.requires_grad == tv.requires_grad
        assert_bit_exact(v, tv, k)
    assert f_ours.training is f_theirs.training is False


@requires_ao
@pytest.mark.parametrize("qconfig", QCONFIGS)
def test_state_dicts_load_across_libraries_mid_training(qconfig):
    """A torch.ao state dict loads into minqat's module (strict) and training continues bit-exactly;
    and the reverse."""
    import torch.ao.nn.intrinsic as nni
    import torch.ao.nn.intrinsic.qat as nniqat
    import torch.ao.quantization as tq

    conv, bn = float_parts(2, 2, 4, 3, bias=True, seed=5)
    xs = batches((2, 2, 6, 6), 1, 4)
    theirs = nniqat.ConvBnReLU2d.from_float(container(nni, 2, True, conv, bn, tq.get_default_qat_qconfig(*qconfig)))
    opt_t = torch.optim.SGD(theirs.parameters(), 0.1)
    for step in range(2):
        run_step(theirs, opt_t, xs[step], step)
    ours = conv_bn.ConvBnReLU2d(2, 4, 3, bias=True, qconfig=get_default_qat_qconfig(*qconfig))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    opt_o = torch.optim.SGD(ours.parameters(), 0.1)
    assert_steps_bit_exact(run_step(ours, opt_o, xs[2], 2), run_step(theirs, opt_t, xs[2], 2), "after load")
    fresh = nniqat.ConvBnReLU2d(2, 4, 3, bias=True, qconfig=tq.get_default_qat_qconfig(*qconfig))
    fresh.load_state_dict(ours.state_dict(), strict=True)
    assert_steps_bit_exact(run_step(ours, opt_o, xs[3], 3),
                           run_step(fresh, torch.optim.SGD(fresh.parameters(), 0.1), xs[3], 3), "reverse")


# --- 2. fused equals unfused in float64 (no torch.ao) ---------------------------------------------


def _normwise_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max(max |b|, 1): the error relative to the tensor's scale, or to 1 for tensors
    that are analytically zero (the conv bias gradient under training BN). Elementwise relative error
    is meaningless for BN outputs near 0. Inputs, γ, β and output gradients here are O(1)."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1.0))


# The folded path computes conv(x, W·f)/f (approximate) or conv(x, W·f)·σ_r/σ_b + β − γ·m/σ (slow)
# where the unfused chain computes conv(x, W) and BN: algebraically equal, associated differently.
# Measured worst normwise float64 error over the 60 hypothesis cases: 8e-14; bound stated at 1e-12.
FLOAT64_TOL = 1e-12


@given(dim=st.sampled_from([1, 2, 3]), relu=st.booleans(), slow=st.booleans(), bias=st.booleans(),
       groups=st.sampled_from([1, 2]), momentum=st.sampled_from([0.1, None]), seed=st.integers(0, 2**16))
def test_fused_equals_unfused_float64(dim, relu, slow, bias, groups, momentum, seed):
    conv, bn = float_parts(dim, 2, 4, 2, padding=1, groups=groups, bias=bias, momentum=momentum, seed=seed,
                           dtype=torch.float64)
    fused = QAT[dim, relu].from_float(container(mni, dim, relu, conv, bn, IDENTITY_QCONFIG))
    fused.slow_path = slow
    chain = nn.Sequential(copy.deepcopy(conv), copy.deepcopy(bn), *([nn.ReLU()] if relu else []))
    opt_f, opt_c = torch.optim.SGD(fused.parameters(), 0.1), torch.optim.SGD(chain.parameters(), 0.1)
    names = {"0.weight": "weight", "0.bias": "bias", "1.weight": "bn.weight", "1.bias": "bn.bias"}
    xs = batches((3, 2) + (4,) * dim, seed, 7, torch.float64)
    for step, x in enumerate(xs):
        if step == 4:
            fused.freeze_bn_stats(), chain[1].eval()
        if step == 6:
            fused.eval(), chain.eval()
        y, gx, grads, state = run_step(fused, opt_f, x, step)
        cy, cgx, cgrads, cstate = run_step(chain, opt_c, x, step)
        pairs = [("output", y, cy), ("input grad", gx, cgx)]
        pairs += [(f"grad {names[k]}", grads[names[k]], g) for k, g in cgrads.items()]
        pairs += [(k, state["bn." + k[2:]], v) for k, v in cstate.items() if k.startswith("1.running")]
        for what, a, b in pairs:
            assert _normwise_error(a, b) <= FLOAT64_TOL, f"step {step} {what}: {_normwise_error(a, b)}"
        assert torch.equal(state["bn.num_batches_tracked"], cstate["1.num_batches_tracked"])


def test_no_double_gradient_into_gamma_hand_checked():
    """1x1 conv, one channel, no quantization: dL/dγ is plain BN's Σ g·x̂ and dL/dβ is Σ g --
    the path through the weight scaling f = γ/σ (scale, then divide back) adds nothing."""
    conv, bn = float_parts(2, 1, 1, 1, bias=False, seed=0, dtype=torch.float64)
    fused = conv_bn.ConvBn2d.from_float(container(mni, 2, False, conv, bn, IDENTITY_QCONFIG))
    x = torch.tensor([1.0, 2.0, 4.0, 5.0], dtype=torch.float64).reshape(4, 1, 1, 1)
    y = conv(x).detach()  # BN normalises y: x̂ = (y − mean) / sqrt(var_biased + eps)
    x_hat = (y - y.mean()) / torch.sqrt(y.var(unbiased=False) + bn.eps)
    g = torch.tensor([1.0, -2.0, 3.0, 0.5], dtype=torch.float64).reshape(4, 1, 1, 1)
    for slow in (False, True):
        fused.slow_path = slow
        fused.zero_grad()
        fused(x).backward(g)
        assert abs(float(fused.bn.weight.grad) - float((g * x_hat).sum())) < 1e-12
        assert abs(float(fused.bn.bias.grad) - 2.5) < 1e-12


# --- 3. properties ------------------------------------------------------------------------------


@pytest.mark.parametrize("relu", [False, True])
def test_gamma_zero_is_finite_on_the_slow_path_only(relu):
    conv, bn = float_parts(2, 2, 3, 3, seed=1, gamma_zero=(0,))
    x = batches((4, 2, 5, 5), 0, 1)[0]
    slow = QAT[2, relu].from_float(container(mni, 2, relu, conv, bn, get_default_qat_qconfig("fbgemm")))
    slow.slow_path = True
    assert slow._enable_slow_path_for_better_numerical_stability is True
    for setup in (lambda m: m, conv_bn.freeze_bn_stats, lambda m: m.eval()):
        setup(slow)
        x_ = x.clone().requires_grad_()
        y = slow(x_)
        y.square().sum().backward()
        assert torch.isfinite(y).all() and torch.isfinite(x_.grad).all()
        assert all(torch.isfinite(p.grad).all() for p in slow.parameters())
        # channel 0 has γ = 0: BN outputs β there (relu(β) with ReLU)
        expected = bn.bias[0].expand_as(y[:, 0])
        torch.testing.assert_close(y[:, 0], expected.relu() if relu else expected, rtol=0, atol=1e-6)
        slow.zero_grad()
    approx = QAT[2, relu].from_float(container(mni, 2, relu, conv, bn, get_default_qat_qconfig("fbgemm")))
    assert not torch.isfinite(approx(x)[:, 0]).all()  # the approximate path divides by γ/σ = 0 (as torch.ao)


class _SyncDetector(TorchDispatchMode):
    """Records every op that would copy a tensor value to the host (a device sync on GPU)."""

    SYNC_OPS = {"aten::_local_scalar_dense", "aten::is_nonzero", "aten::item", "aten::equal"}

    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.SYNC_OPS:
            self.syncs.append(func._schema.name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("slow", [False, True])
@pytest.mark.parametrize("mode", ["train", "frozen", "eval"])
def test_forward_has_no_host_sync(slow, mode):
    conv, bn = float_parts(2, 2, 3, 3, bias=True, seed=2)
    m = conv_bn.ConvBnReLU2d.from_float(container(mni, 2, True, conv, bn, IDENTITY_QCONFIG))
    m.slow_path = slow
    if mode == "frozen":
        m.apply(conv_bn.freeze_bn_stats)
    elif mode == "eval":
        m.eval()
    x = batches((2, 2, 5, 5), 0, 1)[0].requires_grad_()
    with _SyncDetector() as detector:
        m(x).sum().backward()
    assert detector.syncs == []


@pytest.mark.cuda
@pytest.mark.parametrize("slow", [False, True])
def test_cuda_forward_backward_without_syncs_and_close_to_cpu(slow):
    conv, bn = float_parts(2, 2, 3, 3, bias=True, seed=2)
    x = batches((2, 2, 5, 5), 0, 1)[0]
    for qconfig in (IDENTITY_QCONFIG, get_default_qat_qconfig("fbgemm")):
        cpu = conv_bn.ConvBnReLU2d.from_float(container(mni, 2, True, conv, bn, qconfig))
        cpu.slow_path = slow
        gpu = copy.deepcopy(cpu).cuda()
        if qconfig is IDENTITY_QCONFIG:  # minqat's own ops: no host sync at all
            torch.cuda.set_sync_debug_mode("error")
        try:
            y_gpu = gpu(x.cuda())
            y_gpu.sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        y = cpu(x)
        y.sum().backward()
        torch.testing.assert_close(y_gpu.cpu(), y, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(gpu.weight.grad.cpu(), cpu.weight.grad, rtol=1e-4, atol=1e-4)


def test_train_eval_and_freeze_semantics():
    m = conv_bn.ConvBn2d(2, 2, 1, qconfig=get_default_qat_qconfig("fbgemm"))
    assert (m.freeze_bn, m.bn.training, m.slow_path) == (False, True, False)
    m.eval()
    assert not m.bn.training and not m.weight_fake_quant.training
    m.train()
    assert m.bn.training and m.weight_fake_quant.training
    m.apply(conv_bn.freeze_bn_stats)
    assert (m.freeze_bn, m.bn.training) == (True, False)
    m.eval(), m.train()  # while frozen, train()/eval() leave the children alone
    assert m.training and not m.bn.training
    m.apply(conv_bn.update_bn_stats)
    assert (m.freeze_bn, m.bn.training) == (False, True)
    assert conv_bn.ConvBn2d(2, 2, 1, freeze_bn=True, qconfig=get_default_qat_qconfig("fbgemm")).bn.training is False
    assert conv_bn.ConvBn2d(2, 2, 1, qconfig=get_default_qat_qconfig("fbgemm"), slow_path=True).slow_path
    lin = nn.Linear(2, 2)
    conv_bn.freeze_bn_stats(lin), conv_bn.update_bn_stats(lin)  # other modules: no-ops
    assert lin.training


@pytest.mark.parametrize("momentum", [None, 0.0, 0.25])
def test_from_float_shares_state_and_copies_eps_momentum_exactly(momentum):
    conv, bn = float_parts(1, 2, 3, 2, eps=2.0**-20 + 1e-9, momentum=momentum, seed=4)
    mod = container(mni, 1, True, conv, bn, get_default_qat_qconfig("qnnpack"))
    qat = conv_bn.ConvBnReLU1d.from_float(mod)
    assert qat.weight is mod[0].weight and qat.bias is mod[0].bias
    assert qat.bn.weight is mod[1].weight and qat.bn.bias is mod[1].bias
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert getattr(qat.bn, name) is getattr(mod[1], name)
    assert qat.bn.eps == bn.eps and qat.bn.momentum == momentum and qat.qconfig is mod.qconfig
    assert (qat.in_channels, qat.out_channels, qat.kernel_size, qat.groups) == (2, 3, (2,), 1)
    qat(torch.randn(2, 2, 4))  # training moves the float module's buffers (shared)
    assert int(mod[1].num_batches_tracked) == 4


def test_from_float_accepts_a_plain_sequential_of_the_parts():
    conv, bn = float_parts(2, 1, 2, 1)
    seq = nn.Sequential(conv, bn)
    seq.qconfig = get_default_qat_qconfig("fbgemm")
    assert isinstance(conv_bn.ConvBn2d.from_float(seq), conv_bn.ConvBn2d)


@pytest.mark.parametrize("relu", [False, True])
def test_to_float_folds_running_stats(relu):
    conv, bn = float_parts(3, 2, 2, 1, bias=False, seed=6)
    qat = QAT[3, relu].from_float(container(mni, 3, relu, conv, bn, get_default_qat_qconfig("fbgemm")))
    out = qat.to_float()
    want_w, want_b = fuse_conv_bn_weights(conv.weight, None, bn.running_mean, bn.running_var, bn.eps, bn.weight,
                                          bn.bias)
    float_conv = out[0] if relu else out
    assert type(out) is (mni.ConvReLU3d if relu else nn.Conv3d) and type(float_conv) is nn.Conv3d
    assert_bit_exact(float_conv.weight, want_w, "weight")
    assert_bit_exact(float_conv.bias, want_b, "bias")
    assert float_conv.bias.requires_grad is False  # no conv bias: the folded one is frozen, as torch
    x = torch.randn(1, 2, 3, 3, 3)
    qat.eval().apply(mfq.disable_fake_quant)
    torch.testing.assert_close(out(x), qat(x), rtol=1e-5, atol=1e-5)  # rsqrt vs sqrt: ulp-level only


def test_deepcopy_and_pickle():
    m = conv_bn.ConvBnReLU2d(2, 3, 3, bias=True, qconfig=get_default_qat_qconfig("fbgemm"), slow_path=True)
    x = torch.randn(2, 2, 5, 5)
    m(x)
    clones = [copy.deepcopy(m), pickle.loads(pickle.dumps(m))]
    y = m(x)
    for clone in clones:
        assert clone.slow_path and clone.freeze_bn is False
        assert_bit_exact(clone(x), y, "clone output")
        assert_bit_exact(clone.bn.running_var, m.bn.running_var, "clone running_var")


def test_bad_input():
    qconfig = get_default_qat_qconfig("fbgemm")
    with pytest.raises(ValueError, match="qconfig must be provided for the QAT module ConvBn2d, got None"):
        conv_bn.ConvBn2d(1, 1, 1)
    with pytest.raises(ValueError, match="qconfig must have a weight\\(\\) factory"):
        conv_bn.ConvBn2d(1, 1, 1, qconfig=("act", "weight"))
    conv, bn = float_parts(2, 1, 2, 1)
    with pytest.raises(ValueError, match=r"ConvBn2d.from_float expects a ConvBn2d \(Conv2d, BatchNorm2d\), got Conv2d"):
        conv_bn.ConvBn2d.from_float(conv)
    with pytest.raises(ValueError, match="expects a ConvBnReLU2d"):
        conv_bn.ConvBnReLU2d.from_float(container(mni, 2, False, conv, bn, qconfig))
    with pytest.raises(ValueError, match="qconfig must be provided .* \\(from mod.qconfig\\), got None"):
        conv_bn.ConvBn2d.from_float(container(mni, 2, False, conv, bn, None))
    for kwargs, match in [({"affine": False}, "mod\\[1\\] must have affine=True"),
                          ({"track_running_stats": False}, "mod\\[1\\] must have track_running_stats=True"),
                          ({"num_features": 3}, "mod\\[1\\].num_features must equal the conv's out_channels \\(2\\)")]:
        bad_bn = nn.BatchNorm2d(**{"num_features": 2, **kwargs})
        with pytest.raises(ValueError, match="ConvBn2d.from_float: " + match):
            conv_bn.ConvBn2d.from_float(container(mni, 2, False, conv, bad_bn, qconfig))


# --- 4. golden vectors (recorded from torch.ao, replayed without it) ------------------------------

GOLDEN_FILE = Path(__file__).parent / "golden" / "conv_bn.pt"
# Off the recording CPU capability or with several threads, the conv weight gradient and BN's
# reductions sum in another order: compare within float32 reduction noise instead of bit for bit.
GOLDEN_NOISE = 1e-5  # measured <= 1.1e-6 with 2 and 16 threads


def load_golden(kind: str) -> tuple[list[dict], bool]:
    data = torch.load(GOLDEN_FILE, weights_only=True)
    exact = data["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and torch.get_num_threads() == 1
    return [c for c in data["cases"] if c["kind"] == kind], exact


def _golden_compare(actual, expected, what, exact):
    if exact or not expected.is_floating_point():
        assert_bit_exact(actual, expected, what)
    else:
        assert actual.shape == expected.shape and _normwise_error(actual, expected) <= GOLDEN_NOISE, what


def replay_golden_case(case: dict, build, exact: bool) -> None:
    """Replay each recorded step from the recorded state before it (errors cannot accumulate)."""
    model = build(case)
    model.load_state_dict(case["init"], strict=False)  # float state; the fake quant starts fresh
    if case["slow"]:
        model.slow_path = True
    for step, rec in enumerate(case["steps"]):
        if step:
            model.load_state_dict(case["steps"][step - 1]["state"], strict=True)
        if rec["phase"] == "freeze_bn" and not model.freeze_bn:
            model.freeze_bn_stats()
        if rec["phase"] == "eval":
            model.eval()
        opt = torch.optim.SGD(model.parameters(), lr=case["lr"])  # plain SGD: stateless
        x = rec["x"].clone().requires_grad_()
        y = model(x)
        opt.zero_grad()
        y.backward(rec["g"])
        what = f"{case['name']} step {step}"
        _golden_compare(y.detach(), rec["y"], f"{what} output", exact)
        _golden_compare(x.grad, rec["dx"], f"{what} input grad", exact)
        for k, p in model.named_parameters():
            _golden_compare(p.grad, rec["grads"][k], f"{what} grad {k}", exact)
        opt.step()
        state = model.state_dict()
        assert state.keys() == rec["state"].keys()
        for k, v in rec["state"].items():
            _golden_compare(state[k], v, f"{what} state {k}", exact)


def _build_conv_bn(case):
    cls = QAT[case["dim"], case["relu"]]
    return cls(case["cin"], case["cout"], case["kernel"], bias=case["bias"], groups=case["groups"],
               momentum=case["momentum"], qconfig=get_default_qat_qconfig(case["backend"], case["version"]))


def test_golden_vectors():
    cases, exact = load_golden("conv_bn")
    assert len(cases) >= 6
    for case in cases:
        replay_golden_case(case, _build_conv_bn, exact)
