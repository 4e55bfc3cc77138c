"""minqat.fold: BN folding into conv / linear weights.

(1) hand-worked values where every rsqrt is exact, (2) bit-exact parity with
torch.nn.utils.fusion (torch core, not torch.ao: it stays available, so no golden file is needed),
(3) properties: the folded layer equals layer -> BN(eval) in float64, for conv, transposed conv and
linear; rsqrt (not 1/sqrt) decides the bits; plus every bad-input message.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import fusion

from minqat.fold import fuse_conv_bn_weights, fuse_linear_bn_weights
from tests.oracle import assert_bit_exact

# --- (1) hand-worked -------------------------------------------------------------------------


def test_conv_fold_hand_worked():
    # σ² + ε = 4, 1, 0.25 -> rsqrt = 0.5, 1, 2 (exact). W_f = W·γ·r, b_f = ((b − μ)·r)·γ + β.
    w = torch.tensor([1.0, 2.0, -3.0]).reshape(3, 1, 1, 1)
    b = torch.tensor([1.0, 0.0, 2.0])
    mean = torch.tensor([3.0, -1.0, 0.5])
    var = torch.tensor([3.5, 0.5, -0.25])  # var + 0.5
    gamma = torch.tensor([2.0, -1.0, 4.0])
    beta = torch.tensor([0.25, 0.5, -1.0])
    wf, bf = fuse_conv_bn_weights(w, b, mean, var, 0.5, gamma, beta)
    # channel 0: w 1·2·0.5 = 1;  b ((1−3)·0.5)·2 + 0.25 = −1.75
    # channel 1: w 2·(−1)·1 = −2; b ((0+1)·1)·(−1) + 0.5 = −0.5
    # channel 2: w −3·4·2 = −24; b ((2−0.5)·2)·4 − 1 = 11
    assert wf.flatten().tolist() == [1.0, -2.0, -24.0]
    assert bf.tolist() == [-1.75, -0.5, 11.0]
    assert isinstance(wf, nn.Parameter) and isinstance(bf, nn.Parameter)


def test_conv_fold_defaults_and_transpose_hand_worked():
    # no conv bias (b = 0), no γ (1), no β (0); transposed weight (in=1, out=2, k=2): scale dim 1
    w = torch.ones(1, 2, 2)
    wf, bf = fuse_conv_bn_weights(w, None, torch.tensor([2.0, -4.0]), torch.tensor([3.0, 15.0]), 1.0,
                                  None, None, transpose=True)
    assert wf.tolist() == [[[0.5, 0.5], [0.25, 0.25]]]
    assert bf.tolist() == [-1.0, 1.0]  # (0 − 2)·0.5, (0 + 4)·0.25
    assert bf.requires_grad is False  # a missing bias gives a frozen one, as torch


def test_linear_fold_hand_worked_and_broadcast_bn():
    w = torch.tensor([[1.0, -2.0], [0.5, 4.0], [3.0, 3.0]])
    # one BN feature for all outputs (allowed, as torch's fuse_linear_bn_eval):
    # var + eps = 0.25 -> rsqrt = 2, s = γ·r = 1.5·2 = 3
    wf, bf = fuse_linear_bn_weights(w, torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0]),
                                    torch.tensor([0.0]), 0.25, torch.tensor([1.5]), torch.tensor([-1.0]))
    assert wf.tolist() == [[3.0, -6.0], [1.5, 12.0], [9.0, 9.0]]
    assert bf.tolist() == [-1.0, 2.0, 5.0]  # (b − 1)·3 − 1


# --- (2) parity with torch.nn.utils.fusion ----------------------------------------------------

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _stats(gen, c, dtype, adversarial):
    """Running mean/var and affine params; adversarial variances: 0, tiny, denormal, huge."""
    mean = torch.randn(c, generator=gen, dtype=torch.float64).mul(3).to(dtype)
    var = torch.rand(c, generator=gen, dtype=torch.float64).mul(5).to(dtype)
    if adversarial:
        special = torch.tensor([0.0, 1e-30, 1e-40, 3e4, 1e-7, 2.0**-24], dtype=torch.float64).to(dtype)
        var[: min(c, 6)] = special[: min(c, 6)]
    gamma = torch.randn(c, generator=gen, dtype=torch.float64).to(dtype)
    beta = torch.randn(c, generator=gen, dtype=torch.float64).to(dtype)
    return mean, var, gamma, beta


@given(
    ndim=st.integers(3, 5), c_out=st.integers(1, 9), c_in=st.integers(1, 4), k=st.integers(1, 3),
    w_dtype=st.sampled_from(DTYPES), bn_dtype=st.sampled_from(DTYPES[:2]), has_b=st.booleans(),
    has_gamma=st.booleans(), has_beta=st.booleans(), transpose=st.booleans(),
    eps=st.sampled_from([1e-5, 1e-3, 0.0, 0.1, 2.0**-20]), adversarial=st.booleans(),
    requires_grad=st.booleans(), seed=st.integers(0, 2**16),
)
def test_conv_fold_bit_exact_with_torch(ndim, c_out, c_in, k, w_dtype, bn_dtype, has_b, has_gamma, has_beta,
                                        transpose, eps, adversarial, requires_grad, seed):
    gen = torch.Generator().manual_seed(seed)
    shape = (c_in, c_out) if transpose else (c_out, c_in)
    w = torch.randn(shape + (k,) * (ndim - 2), generator=gen).to(w_dtype).requires_grad_(requires_grad)
    b = torch.randn(c_out, generator=gen).to(w_dtype).requires_grad_(requires_grad) if has_b else None
    mean, var, gamma, beta = _stats(gen, c_out, bn_dtype, adversarial)
    args = (mean, var, eps, gamma if has_gamma else None, beta if has_beta else None, transpose)
    got = fuse_conv_bn_weights(w, b, *args)
    want = fusion.fuse_conv_bn_weights(w, b, *args)
    for g, e, what in zip(got, want, ("weight", "bias")):
        assert type(g) is type(e) is nn.Parameter
        assert g.requires_grad == e.requires_grad, what
        assert_bit_exact(g, e, what)


@given(
    out_f=st.integers(1, 9), in_f=st.integers(1, 6), w_dtype=st.sampled_from(DTYPES),
    bn_dtype=st.sampled_from(DTYPES[:2]), has_b=st.booleans(), broadcast_bn=st.booleans(),
    eps=st.sampled_from([1e-5, 1e-3, 0.0, 0.1]), adversarial=st.booleans(), requires_grad=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_linear_fold_bit_exact_with_torch(out_f, in_f, w_dtype, bn_dtype, has_b, broadcast_bn, eps, adversarial,
                                          requires_grad, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=gen).to(w_dtype).requires_grad_(requires_grad)
    b = torch.randn(out_f, generator=gen).to(w_dtype).requires_grad_(requires_grad) if has_b else None
    stats = _stats(gen, 1 if broadcast_bn else out_f, bn_dtype, adversarial)
    mean, var, gamma, beta = stats
    got = fuse_linear_bn_weights(w, b, mean, var, eps, gamma, beta)
    want = fusion.fuse_linear_bn_weights(w, b, mean, var, eps, gamma, beta)
    for g, e, what in zip(got, want, ("weight", "bias")):
        assert type(g) is type(e) is nn.Parameter
        assert g.requires_grad == e.requires_grad, what
        assert_bit_exact(g, e, what)


def test_rsqrt_not_reciprocal_sqrt_decides_the_bits():
    """numerics §5.4: folding must use torch.rsqrt; 1/sqrt gives other bits on many inputs."""
    var = torch.linspace(0.01, 10.0, 4001)
    w = torch.ones(4001, 1, 1, 1)
    wf, _ = fuse_conv_bn_weights(w, None, torch.zeros(4001), var, 1e-5, None, None)
    via_rsqrt = torch.rsqrt(var + 1e-5)
    via_div = 1 / torch.sqrt(var + 1e-5)
    assert_bit_exact(wf.detach().flatten(), via_rsqrt, "rsqrt")
    assert (via_rsqrt != via_div).any()  # so the choice is observable


# --- (3) folded layer == layer followed by BN in eval mode (float64) ---------------------------


def _eval_bn(c, gen):
    bn = nn.BatchNorm1d(c, eps=1e-3).double().eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=gen, dtype=torch.float64))
        bn.running_var.copy_(torch.rand(c, generator=gen, dtype=torch.float64) + 0.1)
        bn.weight.copy_(torch.randn(c, generator=gen, dtype=torch.float64))
        bn.bias.copy_(torch.randn(c, generator=gen, dtype=torch.float64))
    return bn


@given(kind=st.sampled_from(["conv1d", "conv2d", "conv3d", "convT2d", "linear"]), has_b=st.booleans(),
       seed=st.integers(0, 2**16))
def test_folded_layer_equals_layer_then_bn(kind, has_b, seed):
    gen = torch.Generator().manual_seed(seed)
    c_in, c_out = 3, 4
    dims = {"conv1d": 1, "conv2d": 2, "conv3d": 3, "convT2d": 2, "linear": 0}[kind]
    x = torch.randn((2, c_in) + (4,) * dims, generator=gen, dtype=torch.float64)
    bn = _eval_bn(c_out, gen)
    if kind == "linear":
        layer = nn.Linear(c_in, c_out, bias=has_b).double()
        wf, bf = fuse_linear_bn_weights(layer.weight, layer.bias, bn.running_mean, bn.running_var, bn.eps,
                                        bn.weight, bn.bias)
        expected, got = bn(layer(x)), F.linear(x, wf, bf)
    else:
        transpose = kind == "convT2d"
        cls = nn.ConvTranspose2d if transpose else {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        layer = cls(c_in, c_out, 3, bias=has_b).double()
        wf, bf = fuse_conv_bn_weights(layer.weight, layer.bias, bn.running_mean, bn.running_var, bn.eps,
                                      bn.weight, bn.bias, transpose=transpose)
        y = layer(x)
        expected = F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        got = layer._conv_forward(x, wf, bf) if not transpose else F.conv_transpose2d(x, wf, bf)
    # the same affine map, associated differently: float64 rounding only
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_fold_keeps_dtypes_and_requires_grad():
    w = torch.randn(2, 1, 1, dtype=torch.float16, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64)
    stats = (torch.zeros(2), torch.ones(2), 1e-5, torch.ones(2), torch.zeros(2))
    wf, bf = fuse_conv_bn_weights(w, b, *stats)
    assert (wf.dtype, bf.dtype, wf.requires_grad, bf.requires_grad) == (torch.float16, torch.float64, True, False)
    assert wf.is_leaf and bf.is_leaf


def test_fold_matches_numpy_reference_float64():
    """An independent float64 reference (numpy) of the same association."""
    rng = np.random.default_rng(0)
    w, b, mean = rng.standard_normal((3, 2, 2)), rng.standard_normal(3), rng.standard_normal(3)
    var, gamma, beta = rng.random(3) + 0.5, rng.standard_normal(3), rng.standard_normal(3)
    r = 1 / np.sqrt(var + 1e-5)  # correctly rounded in float64, as torch.rsqrt is for doubles
    t = [torch.from_numpy(a) for a in (w, b, mean, var)]
    wf, bf = fuse_conv_bn_weights(t[0], t[1], t[2], t[3], 1e-5, torch.from_numpy(gamma), torch.from_numpy(beta))
    np.testing.assert_allclose(wf.detach().numpy(), w * (gamma * r)[:, None, None], rtol=1e-15)
    np.testing.assert_allclose(bf.detach().numpy(), (b - mean) * r * gamma + beta, rtol=1e-14, atol=1e-15)


# --- bad input ---------------------------------------------------------------------------------

_C = (torch.zeros(2), torch.ones(2))


@pytest.mark.parametrize("call, match", [
    (lambda: fuse_conv_bn_weights(torch.ones(2), None, *_C, 1e-5, None, None), "conv_w must be a conv weight"),
    (lambda: fuse_conv_bn_weights([1.0], None, *_C, 1e-5, None, None), "conv_w must be a conv weight"),
    (lambda: fuse_conv_bn_weights(torch.ones(3, 1, 1), None, *_C, 1e-5, None, None), "bn_rm must be a 1-D tensor of 3"),
    (lambda: fuse_conv_bn_weights(torch.ones(2, 1, 1), torch.ones(3), *_C, 1e-5, None, None), "conv_b must be"),
    (lambda: fuse_conv_bn_weights(torch.ones(2, 1, 1), None, torch.zeros(2), torch.ones(2, 1), 1e-5, None, None),
     "bn_rv must be a 1-D tensor"),
    (lambda: fuse_conv_bn_weights(torch.ones(2, 1, 1), None, *_C, 1e-5, torch.ones(3), None), "bn_w must be"),
    (lambda: fuse_conv_bn_weights(torch.ones(2, 1, 1), None, *_C, 1e-5, None, 1.0), "bn_b must be a tensor"),
    (lambda: fuse_conv_bn_weights(torch.ones(2, 1, 1), None, *_C, -1.0, None, None), "bn_eps must be a finite"),
    (lambda: fuse_conv_bn_weights(torch.ones(2, 1, 1), None, *_C, float("nan"), None, None), "bn_eps"),
    (lambda: fuse_conv_bn_weights(torch.ones(2, 1, 1), None, *_C, True, None, None), "bn_eps"),
    (lambda: fuse_conv_bn_weights(torch.ones(1, 3, 1), None, *_C, 1e-5, None, None, transpose=True), "bn_rm"),
    (lambda: fuse_linear_bn_weights(torch.ones(2, 1, 1), None, *_C, 1e-5, torch.ones(2), torch.ones(2)),
     "linear_w must be a 2-D"),
    (lambda: fuse_linear_bn_weights(torch.ones(2, 3), torch.ones(3), *_C, 1e-5, torch.ones(2), torch.ones(2)),
     "linear_b must be a 1-D tensor of 2"),
    (lambda: fuse_linear_bn_weights(torch.ones(2, 3), None, *_C, 1e-5, None, torch.ones(2)), "bn_w and bn_b"),
    (lambda: fuse_linear_bn_weights(torch.ones(2, 3), None, torch.zeros(3), torch.ones(3), 1e-5, torch.ones(3),
                                    torch.ones(3)), "bn_rm must be a 1-D tensor of 2 or 1 elements"),
])
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()
